"""Debian 13 (trixie: systemd 257, Python 3.13) on this Debian 12 machine: the package is built by
scripts/build-deb.sh inside a trixie root made by mmdebstrap (its Build-Depends, build-essential and
lintian: no lintian error there either), installed by apt into a second, clean trixie root, and
passes the smoke test under trixie's own systemd 257 user manager (the root's /usr in a lab
namespace, as in test_deb.py); then remove and purge."""

from __future__ import annotations

import pytest

from agor_systemd.lab.testbed import UserManager, host_build
from tests.packaging.support import (
    apt_install,
    build_depends,
    copy_tree,
    in_root,
    lab_user,
    make_root,
    packaged_lab,
    smoke,
    uninstall,
    verify_shipped_units,
)

pytestmark = pytest.mark.packaging


def test_deb_builds_installs_and_runs_on_debian_13(tmp_path, fake_sidecar_path):
    build_root = make_root("trixie", tmp_path / "build", ("build-essential", "lintian", *build_depends()))
    copy_tree(build_root / "src")
    built = in_root(build_root, "bash /src/scripts/build-deb.sh --out /out").stdout.strip().splitlines()[-1]
    deb = build_root / built.lstrip("/")
    assert deb.name.endswith("_all.deb")

    root = make_root("trixie", tmp_path / "root")
    apt_install(root, deb)
    assert "RestartSteps=4" in (root / "usr/lib/systemd/user/agor-sidecar.service").read_text()  # for 257
    with packaged_lab(root) as ns, lab_user("agorpkg13") as user, UserManager(user, host_build(), ns) as mgr:
        assert mgr.systemctl("--version").stdout.split()[1] == "257"
        assert mgr.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[1])"]).stdout.strip() == "13"
        verify_shipped_units(mgr)
        smoke(mgr, "/usr/bin", fake_sidecar_path)
        uninstall(mgr, "/usr/bin")
    in_root(root, "apt-get purge -y -q agor-systemd")
    assert not (root / "usr/bin/agor-units").exists()
