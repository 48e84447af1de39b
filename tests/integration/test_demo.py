"""`agor-units demo`, run the way the README says: the venv's console script, as root."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest

from agor_systemd.lab.testbed import available_builds, host_build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo starts a user manager and needs root")

ATTEMPTS = 5
TIMEOUT_S = 60


def run_demo(venv: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(venv / "bin" / "agor-units"), "demo", *args]
    if user is not None:
        pw = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, stdin=subprocess.DEVNULL, cwd="/"
    )


def assert_full_show(cp: subprocess.CompletedProcess[str], mode: str) -> None:
    out = cp.stdout
    assert cp.returncode == 0, f"demo exited {cp.returncode}\n--- stdout\n{out}\n--- stderr\n{cp.stderr}"
    assert "Traceback" not in out + cp.stderr
    assert re.search(rf"^== systemd \d+, restart backoff: {mode} ", out, re.M), out
    for k in range(1, ATTEMPTS + 1):
        assert f"restarting: attempt {k}/{ATTEMPTS}" in out, f"no line for restart {k}:\n{out}"
    give_up = "gave up: failed after 5 restarts (last error: exited with status 3)"
    assert give_up in out, out
    after_restart = out.split("$ agor-units restart", 1)
    assert len(after_restart) == 2, out
    assert re.search(
        r"^\s+[\d.]+s\s+healthy\s+\{\"status\": \"healthy\", \"sandbox\": \"(full|partial|none)\""
        r", \"clients\": 0, \"buffering_lines\": \d+\}",  # nobody attached to agor-sidecar.socket
        after_restart[1],
        re.M,
    ), out
    # systemd's own view, then the clean-up
    assert "agor-launch: sidecar exited with status 3; giving up after 5 restarts" in out
    assert "Active: active (running)" in out
    assert "removed " in out and "cleaned up:" in out
    # the order of the story
    positions = [
        out.index(s)
        for s in ("restarting: attempt 1/5", give_up, "fixing the sidecar", "$ agor-units restart", "cleaned up:")
    ]
    assert positions == sorted(positions), out


def test_demo_fast_with_the_installed_systemd(project_venv: Path) -> None:
    mode = "native" if host_build().version >= 254 else "launcher fallback"
    assert_full_show(run_demo(project_venv, "--fast"), mode)


def test_demo_fast_with_systemd_254(project_venv: Path) -> None:
    if not any(b.version == 254 for b in available_builds()):
        pytest.skip("systemd 254 not extracted (scripts/setup.sh)")
    cp = run_demo(project_venv, "--fast", "--systemd", "254")
    assert_full_show(cp, "native")
    assert "== systemd 254, " in cp.stdout


def test_demo_unknown_systemd_build_is_one_line(project_venv: Path) -> None:
    cp = run_demo(project_venv, "--fast", "--systemd", "999")
    assert cp.returncode == 1
    lines = (cp.stdout + cp.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("agor-units: error: no systemd 999 build")
    for build in available_builds():
        assert str(build.version) in lines[0]


def test_demo_needs_root(project_venv: Path) -> None:
    cp = run_demo(project_venv, "--fast", user="nobody")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    lines = (cp.stdout + cp.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "needs root" in lines[0] and "sudo agor-units demo" in lines[0]
    assert "agor-units install --now" in lines[0]
