"""systemd's own hardening on the real managers (every build here): the install probe, an agent
workload inside the hardened unit, the launcher's run-time check, and a host that refuses namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

import pytest

from agor_systemd.sandbox.hardening import GROUPS

from .support import LOG_ID, UNIT, agor_units, wait_for, wait_health

# The agent workload, run as the sidecar: git, a python child writing project files, node if it
# is installed, a shell, a pty, an HTTP request to a loopback server; then it says what it saw.
WORKLOAD = r"""
import http.server, json, os, pty, shutil, subprocess, sys, threading, urllib.request
project, port = sys.argv[1], int(sys.argv[2])
report = {}
def step(name, fn):
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = "error: " + repr(e)
env = dict(os.environ, GIT_AUTHOR_NAME="agent", GIT_AUTHOR_EMAIL="agent@example.org",
           GIT_COMMITTER_NAME="agent", GIT_COMMITTER_EMAIL="agent@example.org")
repo = os.path.join(project, "repo")
def git():
    subprocess.run(["git", "init", "-q", repo], check=True, env=env)
    with open(os.path.join(repo, "a.txt"), "w") as f:
        f.write("hello\n")
    subprocess.run(["git", "-C", repo, "add", "a.txt"], check=True, env=env)
    subprocess.run(["git", "-C", repo, "commit", "-q", "-m", "first commit"], check=True, env=env)
    return subprocess.run(["git", "-C", repo, "log", "--format=%s"], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()
step("git", git)
def python_child():
    path = os.path.join(project, "py.txt")
    subprocess.run([sys.executable, "-c", f"open({path!r}, 'w').write('from python')"], check=True)
    return open(path).read() + " " + oct(os.stat(path).st_mode & 0o777)
step("python", python_child)
def node_child():
    node = shutil.which("node")
    if not node:
        return "absent"
    path = os.path.join(project, "node.txt")
    subprocess.run([node, "-e", f"require('fs').writeFileSync({json.dumps(path)}, 'from node')"], check=True)
    return open(path).read()
step("node", node_child)
step("shell", lambda: subprocess.run(["/bin/sh", "-c", "echo $((40 + 2))"], capture_output=True,
                                     text=True, check=True).stdout.strip())
step("pty", lambda: os.ttyname(pty.openpty()[1]))
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello over loopback")
    def log_message(self, *args):
        pass
def http_get():
    server = http.server.HTTPServer(("127.0.0.1", port), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
        return reply.read().decode()
step("http", http_get)
home = os.environ["HOME"]
report["home_read_only"] = bool(os.statvfs(home).f_flag & os.ST_RDONLY)
report["usr_read_only"] = bool(os.statvfs("/usr").f_flag & os.ST_RDONLY)
report["project_read_only"] = bool(os.statvfs(project).f_flag & os.ST_RDONLY)
report["status"] = {k: v.strip() for k, _, v in (l.partition(":") for l in open("/proc/self/status"))
                    if k in ("NoNewPrivs", "Seccomp", "CapBnd")}
with open(os.path.join(project, "report.json"), "w") as f:
    json.dump(report, f)
print(json.dumps({"type": "ready"}), flush=True)
threading.Event().wait()
"""


def installed_exposure(mgr) -> float:
    """systemd-analyze security --offline=yes of the unit install wrote (the build's own analyzer)."""
    cp = subprocess.run(
        [str(mgr.build.systemd_analyze), "security", "--offline=yes", "--no-pager", str(mgr.unit_dir / UNIT)],
        capture_output=True,
        text=True,
        env={**os.environ, **mgr.build.tool_env()},
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", cp.stdout + cp.stderr)
    assert match, cp.stdout[-400:] + cp.stderr[-400:]
    return float(match.group(1))


@pytest.fixture
def workload(user_manager):
    """(units.toml, project dir, workload script, loopback port) for the test user."""
    port = 20000 + user_manager.uid % 20000
    config = user_manager.write_file(".config/agor/units.toml", f"[sandbox]\ntcp_bind = [{port}]\n")
    project = user_manager.write_file("hardening-project/.keep", "").parent
    for old in ("report.json", "py.txt", "node.txt"):
        (project / old).unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(project / "repo")], check=True)
    script = user_manager.write_file("hardening-project/workload.py", WORKLOAD)
    yield project, script, port
    config.unlink(missing_ok=True)


def install_workload(mgr, project, script, port, *extra):
    cp = agor_units(
        mgr,
        "install",
        "--now",
        "--json",
        "--attempts=0",
        f"--read-write-path={project}",
        *extra,
        "--",
        "/usr/bin/python3",
        "-I",
        "-S",
        str(script),
        str(project),
        str(port),
        check=True,
    )
    return json.loads(cp.stdout)


def read_report(project) -> dict:
    path = project / "report.json"
    wait_for("the workload's report", path.exists, timeout=20)
    return json.loads(path.read_text())


def test_install_probes_and_the_agent_workload_runs_in_the_hardened_unit(user_manager, project_venv, workload):
    project, script, port = workload
    report = install_workload(user_manager, project, script, port)
    assert report["hardening"] == list(GROUPS) and report["left_out"] == {}
    text = (user_manager.unit_dir / UNIT).read_text()
    for line in (
        "PrivateUsers=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "NoNewPrivileges=yes",
        "UMask=0077",
        f'"-{project}"',
    ):
        assert line in text
    assert ("@sandbox" in text) == (user_manager.version >= 254)

    wait_health(user_manager, "healthy", timeout=20)
    seen = read_report(project)
    assert seen["git"] == "first commit", seen
    assert seen["python"] == "from python 0o600", seen  # UMask=0077
    assert seen["node"] in ("from node", "absent"), seen
    assert seen["shell"] == "42" and seen["pty"].startswith("/dev/pts/"), seen
    assert seen["http"] == "hello over loopback", seen
    assert seen["home_read_only"] and seen["usr_read_only"] and not seen["project_read_only"], seen
    assert seen["status"]["NoNewPrivs"] == "1" and seen["status"]["Seccomp"] == "2", seen
    assert int(seen["status"]["CapBnd"], 16) == 0, seen
    # the launcher found everything it was told to expect (and reached the notify socket: healthy)
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)
    assert not any("not in effect" in line for line in lines), lines[-10:]
    print(
        f"\nsystemd {user_manager.version}: probed unit exposure {installed_exposure(user_manager)}, "
        f"node {'ran' if seen['node'] != 'absent' else 'absent'}"
    )

    doctor = {c["name"]: c for c in json.loads(agor_units(user_manager, "doctor", "--json").stdout)}
    assert doctor["systemd hardening"]["status"] == "ok"
    assert doctor["systemd hardening"]["detail"] == "in effect here: " + ", ".join(GROUPS)


def test_launcher_warns_when_namespacing_is_skipped_silently(user_manager, project_venv, workload):
    """A unit without PrivateUsers=yes: 252 skips every mount option without a word, 254 implies it.
    The launcher's own check tells them apart."""
    project, script, port = workload
    install_workload(user_manager, project, script, port)
    unit = user_manager.unit_dir / UNIT
    text = unit.read_text()
    # what dropping capabilities needs a user namespace for (else 218/CAPABILITIES) goes too
    for line in (
        "PrivateUsers=yes",
        "CapabilityBoundingSet=",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
    ):
        text = text.replace(line + "\n", "")
    unit.write_text(text)
    user_manager.systemctl("daemon-reload", check=True)
    user_manager.systemctl("stop", UNIT, check=True)  # no workload may still be writing the repo
    (project / "report.json").unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(project / "repo")], check=True)
    user_manager.systemctl("start", UNIT, check=True)
    wait_health(user_manager, "healthy", timeout=20)
    seen = read_report(project)
    assert seen["git"] == "first commit", seen
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)
    warnings = [line for line in lines if "hardening asked for but not in effect" in line]
    if user_manager.version >= 254:
        assert not warnings and seen["home_read_only"], lines[-10:]
    else:
        assert not seen["home_read_only"], seen
        assert warnings and all(e in warnings[-1] for e in ("userns", "ro-system", "ro-home")), lines[-10:]


@contextlib.contextmanager
def without_namespace_roots(mgr):
    """The lab namespace without the directories PID 1 would create: what a host that cannot set
    up the mount namespace looks like to the manager (every namespaced unit fails 226/NAMESPACE)."""
    roots = [mgr.namespace.path(p) for p in ("/run/systemd/mount-rootfs", "/run/systemd/unit-root")]
    for root in roots:
        os.rename(root, f"{root}.agor-off")
    try:
        yield
    finally:
        for root in roots:
            os.rename(f"{root}.agor-off", root)


def test_probe_leaves_out_what_the_host_refuses_and_the_sidecar_still_starts(user_manager, project_venv, workload):
    project, script, port = workload
    with without_namespace_roots(user_manager):
        report = install_workload(user_manager, project, script, port)
        assert report["hardening"] == ["always", "seccomp", "userns"], report
        assert "226/NAMESPACE" in report["left_out"]["mounts"], report
        text = agor_units(
            user_manager,
            "install",
            f"--read-write-path={project}",
            "--",
            "/usr/bin/python3",
            "-I",
            "-S",
            str(script),
            str(project),
            str(port),
            check=True,
        ).stdout
        assert "hardening left out: mounts: the unit failed with 226/NAMESPACE" in text
        wait_health(user_manager, "healthy", timeout=20)
        seen = read_report(project)
        assert seen["git"] == "first commit" and seen["http"] == "hello over loopback", seen
        assert not seen["home_read_only"], seen  # Landlock alone confines the files now
        doctor = {c["name"]: c for c in json.loads(agor_units(user_manager, "doctor", "--json").stdout)}
        assert doctor["systemd hardening"]["status"] == "warn"
        assert "mounts: the unit failed with 226/NAMESPACE" in doctor["systemd hardening"]["detail"]
        print(
            f"\nsystemd {user_manager.version} without namespaces: probed unit exposure "
            f"{installed_exposure(user_manager)}"
        )
