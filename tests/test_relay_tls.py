"""agor-relay cert / fingerprint, the server context and its reload, the pins file, the unit, [relay]."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from agor_systemd.config import Config, ConfigError, parse_config
from agor_systemd.errors import UsageError
from agor_systemd.relay.program import argument_parser, main, read_token_file, subcommand_parsers
from agor_systemd.relay.tls import (
    KnownHosts,
    ReloadableContext,
    TLSError,
    certificate_pin,
    der_of_pem,
    make_certificate,
    server_context,
    spki_pin,
)
from agor_systemd.relay.units import RELAY_UNIT, relay_files_missing, relay_unit
from agor_systemd.units import render_units

REPO = Path(__file__).resolve().parent.parent

AGOR_RELAY = [sys.executable, "-m", "agor_systemd.relay"]


def make_pair(directory: Path, *hosts: str, name: str = "relay") -> tuple[Path, Path]:
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cp = subprocess.run(
        [*AGOR_RELAY, "cert", "--cert", str(cert), "--key", str(key), *(f"--host={h}" for h in hosts)],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 0, cp.stderr
    return cert, key


def test_cert_writes_a_private_key_and_prints_the_pins(tmp_path):
    cert, key = make_pair(tmp_path, "localhost", "127.0.0.1")
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [cert, key] or sorted(tmp_path.iterdir()) == sorted([cert, key])
    fingerprint = subprocess.run([*AGOR_RELAY, "fingerprint", str(cert), "--json"], capture_output=True, text=True)
    pins = json.loads(fingerprint.stdout)
    der = der_of_pem(cert.read_bytes())
    assert pins["spki"] == spki_pin(der) and pins["spki"].startswith("sha256/")
    assert pins["certificate_sha256"] == certificate_pin(der) and len(pins["certificate_sha256"]) == 64


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_the_certificate_passes_pythons_strict_verification(tmp_path, host):
    """create_default_context() with VERIFY_X509_STRICT (Python 3.13's default) needs SKI and AKI."""
    cert, key = make_pair(tmp_path, "localhost", "127.0.0.1")
    server = server_context(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
    c, d = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(a, b, server_hostname=host)
    server_side = server.wrap_bio(c, d, server_side=True)
    for _ in range(10):  # pump the handshake between the two memory pipes
        for side in (client_side, server_side):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        c.write(b.read())
        a.write(d.read())
    assert client_side.version() in ("TLSv1.3", "TLSv1.2")
    assert client_side.getpeercert()["subjectAltName"] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))


def test_cert_refuses_to_overwrite_without_force(tmp_path):
    cert, key = make_pair(tmp_path, "box")
    before = cert.read_bytes()
    cp = subprocess.run(
        [*AGOR_RELAY, "cert", "--host", "box", "--cert", str(cert), "--key", str(key)], capture_output=True, text=True
    )
    assert cp.returncode == 1 and "exists; --force replaces it" in cp.stderr and cert.read_bytes() == before


@pytest.mark.parametrize("host", ["", "a b", "https://x"])
def test_cert_refuses_a_host_that_is_no_name(tmp_path, host):
    with pytest.raises(TLSError, match="neither a host name nor an IP address"):
        make_certificate([host])


def test_a_key_of_another_certificate_is_refused(tmp_path):
    cert, _ = make_pair(tmp_path, "box", name="a")
    _, other_key = make_pair(tmp_path, "box", name="b")
    with pytest.raises(TLSError, match="the key does not match the certificate"):
        server_context(cert, other_key)


def test_reload_keeps_the_old_pair_when_the_new_one_is_bad(tmp_path):
    cert, key = make_pair(tmp_path, "box")
    live = ReloadableContext(cert, key)
    _, other_key = make_pair(tmp_path, "box", name="other")
    key.write_bytes(other_key.read_bytes())
    with pytest.raises(TLSError, match="does not match"):
        live.reload()
    subprocess.run(
        [*AGOR_RELAY, "cert", "--host", "box", "--cert", str(cert), "--key", str(key), "--force"], check=True
    )
    assert live.reload().startswith(spki_pin(der_of_pem(cert.read_bytes())))


def test_known_hosts_pins_forgets_and_names_lines(tmp_path):
    known = KnownHosts(tmp_path / "agor" / "relay_known_hosts")
    der_a = der_of_pem(make_certificate(["a"])[0])
    der_b = der_of_pem(make_certificate(["b"])[0])
    assert known.find("a", 9750) is None
    known.add("a", 9750, der_a)
    pin = known.add("b", 9751, der_b)
    assert (pin.host, pin.line, pin.der) == ("[b]:9751", 2, der_b)
    assert os.stat(known.path).st_mode & 0o777 == 0o600
    assert known.add("a", 9750, der_b).line == 2  # re-pinning replaces the line
    assert known.forget("a", 9750) and not known.forget("a", 9750)
    assert [p.host for p in known.pins()] == ["[b]:9751"]


def test_token_files(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert read_token_file(token) == "s3cret"  # the trailing newline is not part of it
    token.write_text("two\nlines\n")
    with pytest.raises(Exception, match="one non-empty line"):
        read_token_file(token)


def test_serve_refuses_to_start_without_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match="make one with `agor-relay cert --host NAME`, or --insecure"):
        main(["--token-file", "/dev/null"])
    with pytest.raises(UsageError, match="give both --tls-cert and --tls-key"):
        main(["--tls-cert", str(tmp_path / "c.pem"), "--insecure"])


def test_an_unknown_option_is_one_line_with_status_2():
    cp = subprocess.run([*AGOR_RELAY, "--prot", "1"], capture_output=True, text=True)
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "unrecognized arguments: --prot" in cp.stderr


# -- [relay] and agor-relay.service ------------------------------------------------------------------------


def relay_config(**values) -> Config:
    config = Config()
    return replace(config, relay=replace(config.relay, enabled=True, **values))


def test_the_relay_is_off_by_default():
    assert RELAY_UNIT not in render_units(Config(), 254)


def test_the_unit_loads_the_token_as_a_credential_and_never_holds_it():
    text = render_units(relay_config(bind="192.168.1.20"), 252)[RELAY_UNIT]
    assert "LoadCredential=relay-token:%h/.config/agor/relay-token\n" in text
    assert '"--bind" "192.168.1.20"' in text and '"--tls-cert" "%h/.config/agor/relay-cert.pem"' in text
    assert "--token" not in text.replace("--token-file", "") and "Type=notify" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text


def test_the_unit_verifies(tmp_path):
    unit = relay_unit(relay_config(), ["/usr/bin/python3", "-I"])
    assert unit is not None
    path = tmp_path / RELAY_UNIT
    path.write_text(unit.render())
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True)
    assert (cp.returncode, cp.stderr) == (0, "")  # systemd-analyze exits 0 on unknown keys, but says so


def test_install_names_the_missing_files_first(tmp_path):
    config = relay_config()
    assert "token_file" in (relay_files_missing(config, str(tmp_path)) or "")
    token = tmp_path / ".config/agor/relay-token"
    token.parent.mkdir(parents=True)
    token.write_text("x\n")
    assert "agor-relay cert --host NAME" in (relay_files_missing(config, str(tmp_path)) or "")
    make_pair(token.parent, "box")
    assert relay_files_missing(config, str(tmp_path)) is None
    assert relay_files_missing(Config(), str(tmp_path)) is None


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('bind = "my host"', r"\[relay\] bind must be an IP address"),
        ("port = 0", r"\[relay\] port must be between 1 and 65535"),
        ("max_frame_mib = 64", r"\[relay\] max_frame_mib must be between"),
        ("sidecar_command = []", r"\[relay\] sidecar_command is empty"),
    ],
)
def test_relay_settings_are_checked(toml, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tomllib.loads("[relay]\n" + toml))


def test_the_readme_table_names_every_agor_relay_command_and_flag():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = " ".join(line for line in readme.splitlines() if line.startswith("| `agor-relay"))
    missing = [
        f"{name} {flag}"
        for name, parser in subcommand_parsers(argument_parser()).items()
        for action in parser._actions
        for flag in action.option_strings
        if flag not in ("-h", "--help") and ((f"agor-relay {name}" not in rows and name != "serve") or flag not in rows)
    ]
    assert missing == []


def test_without_websockets_serve_and_connect_say_what_to_install(tmp_path):
    """websockets is the optional [relay] extra (Debian 12's is too old): one line, exit 69."""
    token = tmp_path / "token"
    token.write_text("secret\n")
    for argv in (
        ["serve", "--insecure", "--token-file", str(token)],
        ["connect", "wss://h:1", "--token-file", str(token)],
    ):
        code = (
            "import sys; sys.modules['websockets'] = None; sys.argv = ['agor-relay', *sys.argv[1:]]; "
            "from agor_systemd.relay.program import run; run()"
        )
        cp = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO)
        assert cp.returncode == 69, cp.stderr
        assert cp.stderr.startswith("agor-relay: error: agor-relay needs websockets 14 or newer")
        assert cp.stderr.count("\n") == 1
