"""The Python distributions: sdist and wheel from scripts/build-dist.sh (metadata checked by twine),
the wheel in a fresh virtualenv passing the same smoke test as the Debian package under a real user
manager, and in pipx (Debian's) as an unprivileged user."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from agor_systemd import __version__
from agor_systemd.lab.testbed import OPT_ROOT, UserManager, host_build
from tests.packaging.support import PROGRAMS_PEOPLE_RUN, REPO, entry_points, lab_user, run, smoke, uninstall

pytestmark = pytest.mark.packaging


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    lines = run(["bash", str(REPO / "scripts" / "build-dist.sh"), "--out", str(out)]).stdout.split()
    return {
        "wheel": next(Path(p) for p in lines if p.endswith(".whl")),
        "sdist": next(Path(p) for p in lines if p.endswith(".tar.gz")),
    }


@pytest.fixture
def readable_dir() -> Path:
    """A directory test users can read (the venv and the wheel go there), empty at the start."""
    directory = OPT_ROOT / "packaging-test"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o755, parents=True)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_distributions_carry_one_version_and_the_docs(dists):
    assert dists["wheel"].name == f"agor_systemd-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"agor_systemd-{__version__}.dist-info/METADATA").decode()
        scripts = wheel.read(f"agor_systemd-{__version__}.dist-info/entry_points.txt").decode()
    assert f"\nVersion: {__version__}\n" in metadata
    assert f"agor_systemd-{__version__}.data/data/share/doc/agor-systemd/supervision.md" in names
    assert all(f"{name} = " in scripts for name in entry_points())
    # the extras' requirements (relay: websockets) stay behind their markers
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(line.split()[1] for line in required) == ["click", "cryptography", "pystemd"]
    with tarfile.open(dists["sdist"]) as sdist:
        assert any(name.endswith("/docs/supervision.md") for name in sdist.getnames())


def test_wheel_in_a_fresh_venv_and_pipx(dists, readable_dir, lab_namespace, fake_sidecar_path):
    venv = readable_dir / "venv"
    run(["/usr/bin/python3", "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", str(dists["wheel"])])
    installed = run([str(venv / "bin/pip"), "list", "--format=freeze"]).stdout
    assert "sqlite-utils" not in installed and "pytest" not in installed, installed
    for name in entry_points():
        assert (venv / "bin" / name).is_file()

    with lab_user("agorwhl") as user, UserManager(user, host_build(), lab_namespace) as mgr:
        smoke(mgr, str(venv / "bin"), fake_sidecar_path)
        unit = (mgr.home / ".config/systemd/user/agor-sidecar.service").read_text()
        assert f'"{venv}/bin/python3" "-I" "-S"' in unit
        assert f"Documentation=file:{venv}/share/doc/agor-systemd/supervision.md" in unit
        uninstall(mgr, str(venv / "bin"))

        if shutil.which("pipx", path="/usr/bin") is None:
            pytest.fail("pipx is not installed (scripts/setup.sh installs Debian's)")
        # pipx as the user, from the wheel; pystemd from the wheel pip built (no compiler needed)
        wheels = readable_dir / "wheels"
        run([str(venv / "bin/pip"), "wheel", "-q", "--no-deps", "-w", str(wheels), "pystemd"])
        shutil.copy(dists["wheel"], wheels)
        wheels.chmod(0o755)
        for path in wheels.iterdir():
            path.chmod(0o644)
        cp = mgr.run(
            ["pipx", "install", f"--pip-args=--find-links={wheels}", str(wheels / dists["wheel"].name)], timeout=300
        )
        assert cp.returncode == 0, cp.stderr
        try:
            for name in PROGRAMS_PEOPLE_RUN:
                cp = mgr.run([str(mgr.home / ".local/bin" / name), "--help"])
                assert cp.returncode == 0 and "usage" in cp.stdout.lower(), (name, cp.stderr)
            version = mgr.run([str(mgr.home / ".local/bin/agor-units"), "--version"]).stdout
            assert version.split()[-1] == __version__
        finally:
            mgr.run(["pipx", "uninstall", "agor-systemd"])
