"""Sessions that outlive the relay (relay/host.py, --session-units): names, the fd store's names,
exit statuses, systemd's fd passing, and the sidecar template units (pure; the real thing runs in
tests/integration/test_relay.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from agor_systemd.config import Config
from agor_systemd.giveup import GAVE_UP_ENV, gave_up_variable
from agor_systemd.relay.host import exit_code, parse_pty_fd_name, passed_fds, pty_fd_name, pty_unit
from agor_systemd.relay.units import RELAY_UNIT, relay_sidecar_instance, relay_sidecar_socket_path
from agor_systemd.sandbox import landlock
from agor_systemd.units import render_units
from agor_systemd.verify import verify_units

SESSION, PTY = "0123456789abcdef0123456789abcdef", "fedcba9876543210"


def test_a_terminal_and_its_stored_master_are_named_by_session_and_pty():
    assert pty_unit(SESSION, PTY) == f"agor-relay-pty-{SESSION}-{PTY}.service"
    assert parse_pty_fd_name(pty_fd_name(SESSION, PTY)) == (SESSION, PTY)
    for stranger in ("pty-x-y", f"pty-{SESSION}", f"listen-{SESSION}-{PTY}", f"pty-{SESSION.upper()}-{PTY}", ""):
        assert parse_pty_fd_name(stranger) is None, stranger


def test_exit_statuses_read_as_subprocess_reports_them():
    assert exit_code(os.CLD_EXITED, 7) == 7
    assert exit_code(os.CLD_KILLED, 1) == -1  # SIGHUP: the terminal hung up
    assert exit_code(os.CLD_DUMPED, 11) == -11
    assert exit_code(0, 0) is None  # not ended (or systemd has not reaped it yet)


def test_only_fds_passed_to_this_very_process_are_taken():
    environ = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "pty-a-b:pty-c-d"}
    assert passed_fds(environ, 42) == {"pty-a-b": 3, "pty-c-d": 4, "unknown2": 5}
    assert passed_fds(environ, 43) == {}  # inherited by a child: not its fds
    assert passed_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == {}
    assert passed_fds({}, 42) == {}


def test_each_sidecar_instance_has_its_own_given_up_mark():
    service, socket = relay_sidecar_instance(SESSION)
    assert (service, socket) == (f"agor-relay-sidecar@{SESSION}.service", f"agor-relay-sidecar@{SESSION}.socket")
    assert gave_up_variable("agor-sidecar.service") == GAVE_UP_ENV  # unchanged for agor-sidecar
    mark = gave_up_variable(service)
    assert mark == f"{GAVE_UP_ENV}_{SESSION.upper()}" and mark != gave_up_variable(relay_sidecar_instance("0" * 32)[0])
    assert relay_sidecar_socket_path("/run/user/1000", SESSION) == f"/run/user/1000/agor/relay/{SESSION}.sock"


def relay_config(**values) -> Config:
    config = Config()
    return replace(config, relay=replace(config.relay, enabled=True, **values))


@pytest.mark.parametrize("version", [252, 254])
def test_the_sidecar_template_is_agor_sidecars_units_for_one_session(version):
    config = relay_config(sidecar_command=("/usr/bin/node", "/srv/relay-runner.mjs"))
    units = render_units(config, version)
    service, socket, main = units["agor-relay-sidecar@.service"], units["agor-relay-sidecar@.socket"], units[RELAY_UNIT]
    sidecar = render_units(config, version)["agor-sidecar.service"]
    assert '"--unit" "%n"' in service and '"--" "/usr/bin/node" "/srv/relay-runner.mjs"' in service
    assert "Sockets=agor-relay-sidecar@%i.socket" in service and "[Install]" not in service
    assert "ListenStream=%t/agor/relay/%i.sock" in socket and "Service=agor-relay-sidecar@%i.service" in socket
    assert "[Install]" not in socket
    # the schedule, the watchdog and the hardening are agor-sidecar's
    for line in sidecar.splitlines():
        if line.startswith(("Restart", "Watchdog", "Protect", "SystemCall", "NoNewPrivileges", "TimeoutStartSec")):
            assert line in service.splitlines(), line
    assert '"--session-units"' in main
    for setting in ("FileDescriptorStoreMax=4096", "RuntimeDirectory=agor-relay", "RuntimeDirectoryPreserve=restart"):
        assert setting in main.splitlines()
    assert "agor-relay-sidecar@.service" not in render_units(Config(), version)


def test_the_templates_verify():
    units = {name: text for name, text in render_units(relay_config(), 252).items() if "relay" in name}
    assert verify_units(units, user=False) == []


CONFINED = """
import socket, sys
from agor_systemd.relay.program import confine
from agor_systemd.relay.server import RelaySettings
confine(RelaySettings(token_digest=b"", tls=None, port=int(sys.argv[1]), state_directory=sys.argv[2]))
def attempt(what, action):
    try:
        action()
        print(f"{what}: allowed")
    except OSError:
        print(f"{what}: refused")
def bind(port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
def connect(port):
    with socket.socket() as s:
        s.connect(("127.0.0.1", port))
attempt("bind own port", lambda: bind(int(sys.argv[1])))
attempt("bind other port", lambda: bind(int(sys.argv[1]) + 1))
attempt("connect", lambda: connect(int(sys.argv[3])))
attempt("write state", lambda: open(sys.argv[2] + "/sessions.json", "w").close())
attempt("write elsewhere", lambda: open(sys.argv[4] + "/x", "w").close())
attempt("read", lambda: open("/etc/hostname").read())
"""


@pytest.mark.skipif(landlock.abi_version() < 4, reason="the kernel's Landlock has no network rules (ABI < 4)")
def test_the_relay_confines_itself_to_its_port_and_its_runtime_directory(tmp_path):
    state, elsewhere = tmp_path / "state", tmp_path / "home"
    state.mkdir()
    elsewhere.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "AGOR_OTLP_ENDPOINT"}
        argv = [sys.executable, "-c", CONFINED, str(port), str(state), str(listener.getsockname()[1]), str(elsewhere)]
        cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert f"confined (Landlock ABI {landlock.abi_version()}): TCP bind on port {port} only" in cp.stderr
    assert dict(line.split(": ") for line in cp.stdout.splitlines()) == {
        "bind own port": "allowed",
        "bind other port": "refused",
        "connect": "refused",
        "write state": "allowed",
        "write elsewhere": "refused",
        "read": "allowed",
    }, cp.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
