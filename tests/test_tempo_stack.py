"""packaging/tempo checked statically: Docker cannot run here, so what would break `docker compose
up` or make no trace arrive is checked in the files themselves."""

from __future__ import annotations

from pathlib import Path

import yaml

STACK = Path(__file__).resolve().parent.parent / "packaging" / "tempo"
TEMPO_UID = "10001"  # the user Tempo's image runs as


def load(name: str):
    return yaml.safe_load((STACK / name).read_text())


COMPOSE = load("compose.yaml")
SERVICES = COMPOSE["services"]


def test_every_image_is_pinned():
    for name, service in SERVICES.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned"
        assert all(part.isdigit() for part in tag.split(".")), f"{name}: {image} is not a release tag"
    tempo_images = {s["image"] for s in SERVICES.values() if s["image"].startswith("grafana/tempo:")}
    assert len(tempo_images) == 1, "the init container and Tempo must be the same image"


def test_ports_otlp_query_and_grafana_on_9715():
    assert set(SERVICES["tempo"]["ports"]) >= {"4318:4318", "4317:4317", "3200:3200"}
    assert SERVICES["grafana"]["ports"] == ["9715:3000"]


def test_tempo_listens_for_otlp_on_every_interface():
    config = load("tempo.yaml")
    protocols = config["distributor"]["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert config["server"]["http_listen_port"] == 3200
    mounts = SERVICES["tempo"]["volumes"]
    assert "./tempo.yaml:/etc/tempo.yaml:ro" in mounts
    assert SERVICES["tempo"]["command"] == ["-config.file=/etc/tempo.yaml"]


def test_tempo_s_data_volume_is_made_writable_for_its_user_first():
    storage = load("tempo.yaml")["storage"]["trace"]
    data = "/var/tempo"
    assert storage["wal"]["path"].startswith(data + "/") and storage["local"]["path"].startswith(data + "/")
    assert f"tempo-data:{data}" in SERVICES["tempo"]["volumes"] and "tempo-data" in COMPOSE["volumes"]
    init = SERVICES["tempo-init"]
    assert init["user"] == "root" and f"tempo-data:{data}" in init["volumes"]
    assert init["entrypoint"][0] == "chown" and f"{TEMPO_UID}:{TEMPO_UID}" in init["entrypoint"]
    assert init["entrypoint"][-1] == data
    assert SERVICES["tempo"]["depends_on"]["tempo-init"] == {"condition": "service_completed_successfully"}


def test_grafana_has_the_tempo_data_source_provisioned():
    mount = next(v for v in SERVICES["grafana"]["volumes"] if v.endswith(":/etc/grafana/provisioning:ro"))
    provisioning = STACK / mount.split(":")[0]
    files = sorted((provisioning / "datasources").glob("*.yaml"))
    assert files, f"no data source in {provisioning}/datasources"
    sources = [s for f in files for s in yaml.safe_load(f.read_text())["datasources"]]
    (tempo,) = [s for s in sources if s["type"] == "tempo"]
    assert tempo["url"] == "http://tempo:3200" and tempo["access"] == "proxy" and tempo["isDefault"] is True
    environment = dict(item.split("=", 1) for item in SERVICES["grafana"]["environment"])
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
