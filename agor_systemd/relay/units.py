"""agor-relay.service from a Config: pure, like the other capabilities' units. None while [relay] is off.

The token reaches the relay as the credential `relay-token` (LoadCredential=, in user units since
systemd 247; read from $CREDENTIALS_DIRECTORY): never in the unit, the command line or the
environment. Encrypted credentials (LoadCredentialEncrypted=) work in user units only from 258.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from agor_systemd.config import Config, expand_home, telemetry_environment
from agor_systemd.sandbox.hardening import hardening_directives
from agor_systemd.unitfile import (
    HEADER,
    Text,
    UnitFile,
    documentation,
    environment_assignment,
    exec_line,
    path_value,
)

CREDENTIAL = "relay-token"  # LoadCredential=relay-token:... here; the program reads $CREDENTIALS_DIRECTORY/relay-token

RELAY_UNIT = "agor-relay.service"
WATCHDOG_S = 30
# the relay's own directory under $XDG_RUNTIME_DIR: its sessions, kept across a restart
RUNTIME_DIRECTORY = "agor-relay"
# PTY masters the fd store keeps while the relay restarts (one per live terminal of every session)
FD_STORE_MAX = 4096

# A session's sidecar is an instance (the session's id) of agor-relay-sidecar@.service and .socket,
# agor-sidecar's units for the relay (rendered with them: units.relay_sidecar_units).
RELAY_SIDECAR_SOCKET_PATH = "%t/agor/relay/%i.sock"


def relay_sidecar_instance(session: str) -> tuple[str, str]:
    """(service, socket) of a session's sidecar."""
    return f"agor-relay-sidecar@{session}.service", f"agor-relay-sidecar@{session}.socket"


def relay_sidecar_socket_path(runtime_dir: str, session: str) -> str:
    return RELAY_SIDECAR_SOCKET_PATH.replace("%t", runtime_dir).replace("%i", session)


def relay_unit(
    config: Config,
    python: Sequence[str],
    docs: str | None = None,
    systemd_version: int = 252,
    hardening: set[str] | frozenset[str] | None = None,
) -> UnitFile | None:
    """`python`: the interpreter argv (e.g. ["/usr/bin/python3", "-I"]); `hardening`: the groups the
    install probe found to take effect (None: all), as for agor-sidecar.service."""
    relay = config.relay
    if not relay.enabled:
        return None
    unit = UnitFile(RELAY_UNIT, header=HEADER)
    unit.add("Unit", "Description", "agor relay: TLS WebSocket relay for agor's controller on another machine")
    if (pages := documentation(docs, "relay.md")) is not None:
        unit.add("Unit", "Documentation", pages)
    unit.add("Service", "Type", "notify")
    unit.add("Service", "NotifyAccess", "main")
    argv: list[Text] = [*python, "-m", "agor_systemd.relay", "serve", "--port", str(relay.port)]
    if relay.bind:
        argv += ["--bind", relay.bind]
    argv += ["--tls-cert", relay.tls_cert, "--tls-key", relay.tls_key, "--session-units"]
    unit.add("Service", "ExecStart", exec_line(argv))
    for name, value in telemetry_environment(config.telemetry).items():
        unit.add("Service", "Environment", environment_assignment(name, value))
    # the certificate is read again on SIGHUP (a bad pair is refused and the old one kept)
    unit.add("Service", "ExecReload", "/bin/kill -HUP $MAINPID")
    unit.add("Service", "LoadCredential", f"{CREDENTIAL}:{path_value(relay.token_file, '[relay] token_file')}")
    # the relay pings systemd from its event loop: a loop stuck this long is killed and restarted
    unit.add("Service", "WatchdogSec", f"{WATCHDOG_S}s")
    unit.add("Service", "Restart", "on-failure")
    unit.add("Service", "RestartSec", "1s")
    # Sessions survive a restart (docs/relay.md): their terminals and sidecars are units of their
    # own (--session-units), the PTY masters wait in the fd store, the sessions' state in the runtime
    # directory; a stop ends the sessions (the relay asks systemd whether its stop is a restart).
    unit.add("Service", "FileDescriptorStoreMax", str(FD_STORE_MAX))
    unit.add("Service", "RuntimeDirectory", RUNTIME_DIRECTORY)
    unit.add("Service", "RuntimeDirectoryMode", "0700")
    unit.add("Service", "RuntimeDirectoryPreserve", "restart")
    unit.add("Service", "KillMode", "control-group")
    unit.add("Service", "TimeoutStopSec", "20s")
    unit.add("Service", "SyslogIdentifier", "agor-relay")
    # the project's hardening, as agor-sidecar.service's: the relay starts no program of its own
    # (its sessions' terminals and sidecars are units of their own); it writes only in its
    # RuntimeDirectory=, which systemd keeps writable, and confines itself with Landlock too
    for section, key, value in hardening_directives(config, systemd_version, hardening):
        if key != "ReadWritePaths":  # the sidecar's project directories: nothing the relay writes
            unit.add(section, key, value)
    unit.add("Install", "WantedBy", "default.target")
    return unit


def relay_files_missing(config: Config, home: str) -> str | None:
    """What agor-relay.service would fail on at start (a credential or certificate file that is not
    there), worded with the command that makes it; None when all are there or the relay is off."""
    relay = config.relay
    if not relay.enabled:
        return None
    token = expand_home(relay.token_file, home)
    if not os.path.isfile(token):
        return (
            f"[relay] token_file {token} does not exist: make it with "
            f"`head -c 32 /dev/urandom | base64 > {token}; chmod 600 {token}`"
        )
    for value, key in ((relay.tls_cert, "tls_cert"), (relay.tls_key, "tls_key")):
        path = expand_home(value, home)
        if not os.path.isfile(path):
            return f"[relay] {key} {path} does not exist: make the pair with `agor-relay cert --host NAME`"
    return None
