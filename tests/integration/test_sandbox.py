"""Landlock against the real kernel, from the sidecar's position in the real unit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid

import pytest

from agor_systemd.sandbox import landlock

from .support import (
    LOG_ID,
    UNIT,
    agor_units,
    health,
    install_sidecar,
    supervision_health,
    wait_for,
    wait_health,
)

KERNEL_ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(
    KERNEL_ABI < 6,
    reason=f"the kernel's Landlock ABI is {KERNEL_ABI}; the full escape corpus needs 6 (TCP rules, scoping)",
)


@pytest.fixture
def listeners():
    """Two TCP ports and an abstract unix socket, all listening outside the sandbox."""
    allowed, denied = socket.socket(), socket.socket()
    abstract = socket.socket(socket.AF_UNIX)
    name = f"agor-escape-{uuid.uuid4().hex[:8]}"
    for s, address in ((allowed, ("127.0.0.1", 0)), (denied, ("127.0.0.1", 0)), (abstract, "\0" + name)):
        s.bind(address)
        s.listen(8)
    yield {"allowed_port": allowed.getsockname()[1], "denied_port": denied.getsockname()[1], "abstract": name}
    for s in (allowed, denied, abstract):
        s.close()


@needs_landlock
def test_escape_corpus_is_denied_and_the_job_still_works(user_manager, escape_corpus_path, listeners):
    mgr = user_manager
    project = mgr.write_file("project/README", "a project\n").parent
    report_dir = mgr.write_file("escape-report/.keep", "").parent
    victim = mgr.write_file("victim.txt", "do not touch\n")
    mgr.write_file(".ssh/known_hosts", "")
    empty_dir = mgr.write_file("empty-dir/.keep", "").parent
    (empty_dir / ".keep").unlink()
    config_file = mgr.write_file(".config/agor/escape-test.toml", "x = 1\n")
    outside = subprocess.Popen(["setpriv", f"--reuid={mgr.uid}", f"--regid={mgr.gid}", "--init-groups", "sleep", "60"])
    try:
        spec = {
            "home": str(mgr.home),
            "project": str(project),
            "report": str(report_dir),
            "victim": str(victim),
            "config_file": str(config_file),
            "empty_dir": empty_dir.name,
            "runtime_dir": str(mgr.runtime_dir),
            "outside_pid": outside.pid,
            **listeners,
        }
        spec_file = mgr.write_file("escape-report/spec.json", json.dumps(spec))
        mgr.write_file(
            ".config/agor/units.toml",
            f"[sandbox]\nread_write_paths = [{json.dumps(str(project))}, {json.dumps(str(report_dir))}]\n"
            f"tcp_connect = [{listeners['allowed_port']}]\n",
        )
        agor_units(
            mgr,
            "install",
            "--now",
            "--",
            "/usr/bin/python3",
            "-I",
            "-S",
            str(escape_corpus_path),
            str(spec_file),
            check=True,
        )
        wait_health(mgr, "healthy", timeout=20)
        report = json.loads((report_dir / "escape-report.json").read_text())
    finally:
        outside.kill()
        outside.wait()
        (mgr.home / ".config/agor/units.toml").unlink(missing_ok=True)
    assert len(report["denied"]) >= 25
    escaped = {name: r["detail"] for name, r in report["denied"].items() if not r["blocked"]}
    assert escaped == {}, f"not blocked: {escaped}"
    broken = {name: r["detail"] for name, r in report["allowed"].items() if not r["worked"]}
    assert broken == {}, f"the sidecar's job broke: {broken}"
    assert victim.read_text() == "do not touch\n"
    assert not (mgr.home / "escape.txt").exists() and not (mgr.home / "escape-child.txt").exists()
    state = health(mgr).health
    assert (state["status"], state["sandbox"]) == ("healthy", "full")


def set_abi(mgr, abi: int | None) -> None:
    """Play a kernel with Landlock ABI `abi` (0: none) through the manager's environment."""
    if abi is None:
        mgr.systemctl("unset-environment", "AGOR_LANDLOCK_ABI", check=True)
    else:
        mgr.systemctl("set-environment", f"AGOR_LANDLOCK_ABI={abi}", check=True)


@pytest.fixture
def played_abi(user_manager):
    yield lambda abi: set_abi(user_manager, abi)
    set_abi(user_manager, None)


def test_without_landlock_the_sidecar_runs_and_says_so(user_manager, fake_sidecar_path, played_abi):
    played_abi(0)
    install_sidecar(user_manager, fake_sidecar_path, ["hang"])
    wait_health(user_manager, "healthy", timeout=10)
    assert supervision_health(user_manager) == {"status": "healthy", "sandbox": "none"}
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)
    assert any("sandbox none; not enforced: Landlock" in line for line in lines), lines[-5:]


def test_required_sandbox_refuses_to_start_without_landlock(user_manager, fake_sidecar_path, played_abi):
    played_abi(0)
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["hang"], install_args=["--sandbox-required"])
    failed = wait_health(user_manager, "failed", timeout=10)
    assert failed.health == {
        "status": "failed",
        "attempts": 0,
        "last_error": "sandbox required, but this kernel has no Landlock",
    }
    assert sidecar.starts() == []  # never started unconfined
    assert user_manager.unit_property(UNIT, "NRestarts") == "0"


def test_older_kernel_is_partial_and_names_what_is_missing(user_manager, fake_sidecar_path, played_abi):
    if KERNEL_ABI < 3:
        pytest.skip(f"the kernel's Landlock ABI is {KERNEL_ABI}; playing ABI 3 needs at least that")
    played_abi(3)
    install_sidecar(user_manager, fake_sidecar_path, ["hang"])
    wait_health(user_manager, "healthy", timeout=10)
    assert supervision_health(user_manager) == {"status": "healthy", "sandbox": "partial"}
    line = next(
        line for line in user_manager.journal_lines(UNIT, identifier=LOG_ID) if "agor-launch: sandbox partial" in line
    )
    assert "ioctl on devices (ABI 5)" in line and "TCP bind/connect rules (ABI 4)" in line
    assert "scoping (ABI 6)" in line and "truncate" not in line


def test_sandbox_off_is_reported(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["hang"], install_args=["--no-sandbox"])
    wait_health(user_manager, "healthy", timeout=10)
    assert supervision_health(user_manager) == {"status": "healthy", "sandbox": "off"}
    assert "--sandbox" not in user_manager.unit_property(UNIT, "ExecStart")


def test_missing_paths_are_reported_not_dropped(user_manager, fake_sidecar_path):
    ghost = user_manager.home / "no-such-project"
    install_sidecar(user_manager, fake_sidecar_path, ["hang"], install_args=[f"--read-write-path={ghost}"])
    wait_health(user_manager, "healthy", timeout=10)
    line = wait_for(
        "the skipped-paths note",
        lambda: next(
            (
                line
                for line in user_manager.journal_lines(UNIT, identifier=LOG_ID)
                if "paths not found, skipped" in line and str(ghost) in line
            ),
            None,
        ),
        timeout=5,
    )
    assert line.startswith("agor-launch: sandbox full")
    assert os.path.basename(str(ghost)) not in os.listdir(user_manager.home)
