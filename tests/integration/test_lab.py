"""The test bed itself: real user managers for every available systemd build."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agor_systemd.lab.testbed import (
    LabError,
    LabNamespace,
    SystemdBuild,
    UserManager,
    available_builds,
)


def test_manager_reports_its_build(user_manager: UserManager) -> None:
    version = user_manager.systemctl("show", "-p", "Version", "--value", check=True).stdout.strip()
    assert version.split(".")[0] == str(user_manager.version)
    assert version == user_manager.build.full_version
    assert user_manager.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
    # the manager hands no private-build library path to units
    env = user_manager.systemctl("show-environment", check=True).stdout
    assert "LD_LIBRARY_PATH" not in env
    # the manager runs in its delegated cgroup
    cgroup = user_manager.systemctl("show", "-p", "ControlGroup", "--value", check=True).stdout.strip()
    assert cgroup.endswith(f"/user-{user_manager.uid}.slice/user@{user_manager.uid}.service")


def test_unit_output_reaches_journal(user_manager: UserManager) -> None:
    user_manager.write_file(
        ".config/systemd/user/agor-lab-hello.service",
        """\
[Service]
Type=oneshot
# journald attributes a line to its unit by the sender's cgroup; a process that is already gone
# when journald reads it loses that (systemd-lab-details.md §5), so stay around for a moment
ExecStart=/bin/sh -c 'echo hello from the lab; sleep 0.5'
SyslogIdentifier=agor-lab-hello
""",
    )
    user_manager.systemctl("daemon-reload", check=True)
    user_manager.systemctl("start", "agor-lab-hello.service", check=True)
    lines = user_manager.wait_journal("agor-lab-hello.service", "hello from the lab")
    assert "hello from the lab" in lines
    assert user_manager.unit_property("agor-lab-hello.service", "Result") == "success"


def test_notify_unit_becomes_active(user_manager: UserManager) -> None:
    user_manager.write_file(
        "lab/notify.py",
        """\
import os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\\0" + addr[1:]
print("about to be ready", flush=True)
time.sleep(0.2)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(addr)
    s.sendall(b"READY=1\\nSTATUS=ready and waiting")
while True:
    time.sleep(1)
""",
    )
    user_manager.write_file(
        ".config/systemd/user/agor-lab-notify.service",
        f"""\
[Service]
Type=notify
ExecStart=/usr/bin/python3 {user_manager.home}/lab/notify.py
SyslogIdentifier=agor-lab-notify
""",
    )
    user_manager.systemctl("daemon-reload", check=True)
    t0 = time.monotonic()
    user_manager.systemctl("start", "agor-lab-notify.service", check=True, timeout=20)  # returns at READY=1
    assert time.monotonic() - t0 >= 0.2
    assert user_manager.unit_property("agor-lab-notify.service", "ActiveState") == "active"
    assert user_manager.unit_property("agor-lab-notify.service", "StatusText") == "ready and waiting"
    user_manager.wait_journal("agor-lab-notify.service", "about to be ready")
    # the reset after this test stops the still-running unit


def test_commands_run_as_the_user(user_manager: UserManager) -> None:
    cp = user_manager.run(
        ["sh", "-c", 'id -u; echo "$HOME $XDG_RUNTIME_DIR"; pwd; test -O "$XDG_RUNTIME_DIR"'], check=True
    )
    uid, paths, cwd = cp.stdout.splitlines()
    assert int(uid) == user_manager.uid
    assert paths == f"{user_manager.home} {user_manager.runtime_dir}"
    assert cwd == str(user_manager.home)
    path = user_manager.write_file("lab/sub/dir/file.txt", "x\n", mode=0o600)
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (user_manager.uid, 0o600)
    assert path.parent.stat().st_uid == user_manager.uid
    assert user_manager.run(["cat", str(path)], check=True).stdout == "x\n"


@pytest.mark.parametrize("build", available_builds(), ids=lambda b: b.name)
def test_start_stop_leaves_nothing_behind(lab_namespace: LabNamespace, build: SystemdBuild) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    mgr = UserManager(f"agort-{worker}-{build.version}x"[:31], build, lab_namespace)
    with mgr:
        mgr.write_file(".config/systemd/user/agor-lab-sleep.service", "[Service]\nExecStart=/bin/sleep 600\n")
        mgr.systemctl("daemon-reload", check=True)
        mgr.systemctl("start", "agor-lab-sleep.service", check=True)
        pid = int(mgr.unit_property("agor-lab-sleep.service", "MainPID"))
        manager_pid = mgr.pid
        assert pid > 0
        cgroup = mgr.cgroup
        assert (cgroup / "app.slice" / "agor-lab-sleep.service").is_dir()
    assert not cgroup.exists()
    assert not cgroup.parent.exists()  # user-UID.slice
    if mgr.legacy_cgroup is not None:
        assert not mgr.legacy_cgroup.parent.exists()
    for p in (pid, manager_pid):
        assert not Path(f"/proc/{p}").exists(), f"process {p} survived the manager's stop"
    assert not lab_namespace.path(mgr.runtime_dir).exists()
    assert mgr.stop_seconds is not None and mgr.stop_seconds < 5
    import shutil

    shutil.rmtree(mgr.unit_dir, ignore_errors=True)


def test_start_failure_is_reported_and_cleaned_up(lab_namespace: LabNamespace) -> None:
    build = available_builds()[0]
    broken = SystemdBuild(version=build.version, prefix=Path("/nonexistent-agor-build"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    mgr = UserManager(f"agort-{worker}-broken", broken, lab_namespace, ready_timeout=3)
    with pytest.raises(LabError, match="exited with status"):
        mgr.start()
    assert not mgr.is_alive()
    assert not mgr.cgroup.parent.exists()
    assert not lab_namespace.path(mgr.runtime_dir).exists()


def test_daemon_reexec_is_refused(user_manager: UserManager) -> None:
    with pytest.raises(LabError, match="daemon-reexec"):
        user_manager.systemctl("daemon-reexec")


def test_reset_stops_units_and_removes_files(user_manager: UserManager) -> None:
    user_manager.write_file(".config/systemd/user/agor-lab-reset.service", "[Service]\nExecStart=/bin/sleep 600\n")
    user_manager.systemctl("daemon-reload", check=True)
    user_manager.systemctl("start", "agor-lab-reset.service", check=True)
    user_manager.run(
        [str(user_manager.build.systemd_run), "--user", "--unit=agor-lab-transient", "/bin/sleep", "600"],
        check=True,
        build_tools=True,
    )
    assert user_manager.unit_property("agor-lab-transient.service", "ActiveState") == "active"
    stopped = user_manager.reset()
    assert {"agor-lab-reset.service", "agor-lab-transient.service"} <= set(stopped)
    assert not user_manager.unit_dir.exists()
    for unit in ("agor-lab-reset.service", "agor-lab-transient.service"):
        assert user_manager.unit_property(unit, "ActiveState") == "inactive"
    assert user_manager.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
