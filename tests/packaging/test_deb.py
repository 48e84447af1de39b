"""The Debian package, built from this tree, installed into a clean Debian 12 root by apt, and used
there: the installed units verified, not enabled; doctor, install --now, health, walcheck under a
real user manager; an upgrade under a running sidecar; uninstall, remove (users' data kept), purge.

What runs where: dpkg and apt run inside the clean root (chroot). The user manager cannot run
inside a chroot (it needs the lab's mount namespace, /run tmpfs and a delegated cgroup, which the
host's test bed makes), so it runs in a lab namespace on this machine whose /usr is the root's /usr
(bind mount): the manager binary, python3, the package and its Debian dependencies are the files
apt installed in the root; /etc, the test user's home and the kernel are this machine's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agor_systemd.lab.testbed import UserManager, host_build
from tests.packaging.support import (
    PROGRAMS_PEOPLE_RUN,
    UNITS,
    apt_install,
    doctor,
    entry_points,
    health,
    in_root,
    lab_user,
    make_root,
    packaged_lab,
    program,
    smoke,
    uninstall,
    verify_shipped_units,
    wait_for,
)

pytestmark = pytest.mark.packaging
USR_BIN = "/usr/bin"


def test_deb_install_upgrade_remove_purge_on_debian_12(debs, tmp_path, fake_sidecar_path):
    root = make_root("bookworm", tmp_path / "root")
    output = apt_install(root, debs.current)
    assert "agor-systemd" in output
    # what the package ships, and that nothing is enabled for every user
    for name in entry_points():
        assert (root / "usr/bin" / name).is_file()
        assert (root / f"usr/share/man/man1/{name}.1.gz").is_file(), f"no man page for {name}"
    for name in PROGRAMS_PEOPLE_RUN:
        assert (root / "usr/share/bash-completion/completions" / name).is_file()
    for unit in UNITS:
        text = (root / "usr/lib/systemd/user" / unit).read_text()
        assert "Documentation=file:/usr/share/doc/agor-systemd/" in text
        page = text.split("Documentation=file:", 1)[1].split()[0]
        assert (root / page.lstrip("/")).is_file(), f"{unit}: Documentation= names {page}, not installed"
    assert not list((root / "etc/systemd/user").glob("*/agor-*")), "a user unit was enabled for every user"

    with packaged_lab(root) as ns, lab_user("agorpkg") as user, UserManager(user, host_build(), ns) as mgr:
        verify_shipped_units(mgr)
        assert mgr.systemctl("is-enabled", "agor-sidecar.service").stdout.strip() == "disabled"
        mgr.write_file(".config/systemd/user/mine.service", "[Service]\nExecStart=/bin/true\n")

        pid = smoke(mgr, USR_BIN, fake_sidecar_path)
        installed = (mgr.home / ".config/systemd/user/agor-sidecar.service").read_text()
        assert '"/usr/bin/python3" "-I" "-S" "/usr/lib/python3/dist-packages/agor_systemd/_launch.py"' in installed
        assert "Documentation=file:/usr/share/doc/agor-systemd/supervision.md" in installed

        # upgrade under the running sidecar: it keeps running; doctor names the older units
        upgraded_at = time.time()
        apt_install(root, debs.next)
        assert program(mgr, USR_BIN, "agor-units", "--version").stdout.split()[-1] == debs.next_version
        assert health(mgr, USR_BIN)["status"] == "healthy"
        assert int(mgr.unit_property("agor-sidecar.service", "MainPID")) == pid
        generator = doctor(mgr, USR_BIN)["units generator"]
        assert generator["status"] == "warn" and "older than the installed" in generator["detail"], generator
        assert generator["fix"] == "agor-units install --now"
        # the next start runs the new files (Python reads them at start; the old process had its own)
        assert program(mgr, USR_BIN, "agor-units", "install", "--now").returncode == 0
        wait_for("health healthy", lambda: health(mgr, USR_BIN)["status"] == "healthy")
        new_pid = int(mgr.unit_property("agor-sidecar.service", "MainPID"))
        assert new_pid != pid
        assert process_start(ns.path(f"/proc/{new_pid}")) > upgraded_at
        assert doctor(mgr, USR_BIN)["units generator"]["status"] == "ok"

        uninstall(mgr, USR_BIN)

    # remove keeps what users have (data, settings, their own units); purge removes no more of theirs
    in_root(root, "apt-get remove -y -q agor-systemd")
    assert not (root / "usr/bin/agor-units").exists()
    assert not (root / "usr/lib/systemd/user/agor-sidecar.service").exists()
    assert (mgr.home / ".local/share/agor").is_dir()
    assert (mgr.home / ".config/systemd/user/mine.service").is_file()
    in_root(root, "apt-get purge -y -q agor-systemd")
    status = in_root(root, "dpkg-query -W -f='${db:Status-Abbrev}' agor-systemd 2>/dev/null || true").stdout
    assert status.strip() in ("", "un", "pn")
    assert not (root / "usr/lib/python3/dist-packages/agor_systemd").exists()
    assert (mgr.home / ".config/systemd/user/mine.service").is_file()


def process_start(proc: Path) -> float:
    """When a process started, in seconds since the epoch (from /proc/PID/stat and the boot time)."""
    ticks = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")
