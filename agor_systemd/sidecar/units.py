"""agor-sidecar.service from a Config: pure, so every setting is testable without systemd."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agor_systemd.config import Config, telemetry_environment
from agor_systemd.giveup import GAVE_UP_STATUS
from agor_systemd.sandbox.hardening import (
    expected_effects,
    hardening_directives,
    wanted_groups,
)
from agor_systemd.sandbox.policy import sandbox_paths
from agor_systemd.sidecar.backoff import native_backoff, schedule
from agor_systemd.sidecar.protocol import (
    SIDECAR_SOCKET,
    SIDECAR_UNIT,
    LauncherOptions,
    launcher_arguments,
)
from agor_systemd.unitfile import (
    HEADER,
    PACKAGED_DOCS,
    UnitFile,
    Word,
    documentation,
    environment_assignment,
    exec_line,
    path_value,
    usec_text,
)

# RestartSteps= / RestartMaxDelaySec= / RestartUSecNext appeared in systemd 254,
# the RESTART_RESET=1 notify message in 258.
NATIVE_BACKOFF_VERSION = 254
RESTART_RESET_VERSION = 258

# %t: $XDG_RUNTIME_DIR for a user manager, /run for the system one
RUN_DIRECTORY = "%t/agor"
SOCKET_PATH = f"{RUN_DIRECTORY}/sidecar.sock"
MIB = 1024 * 1024

# How the units start the launcher when rendered for packagers and for units/:
# Debian's interpreter, with the package installed system-wide.
PACKAGED_LAUNCHER = ("/usr/bin/python3", "-I", "-S", "/usr/lib/python3/dist-packages/agor_systemd/_launch.py")


@dataclass(frozen=True)
class SidecarNames:
    """Who a sidecar's service and socket are: agor-sidecar's own (the default), or a template
    whose instances are the relay's per-session sidecars (relay/units.py)."""

    service: str = SIDECAR_UNIT
    socket: str = SIDECAR_SOCKET
    socket_path: str = SOCKET_PATH
    # the unit as the launcher asks systemd about it (Specifier("n") in a template: %n)
    launcher_unit: Word = SIDECAR_UNIT
    identifier: str = "agor-sidecar"
    description: str = "agor sidecar (agent runners), supervised by systemd"
    socket_description: str = "agor sidecar's stdin and stdout for agor (agor-units attach)"
    # what Sockets= and Service= name: the other unit of the pair (`@%i.` in a template)
    socket_of_service: str = SIDECAR_SOCKET
    service_of_socket: str = SIDECAR_UNIT
    installed: bool = True  # an [Install] section: enabled units start with the manager


AGOR_SIDECAR = SidecarNames()


def uses_native_backoff(config: Config, systemd_version: int) -> bool:
    return systemd_version >= NATIVE_BACKOFF_VERSION and native_backoff(config.restart) is not None


def sidecar_unit(
    config: Config,
    systemd_version: int,
    launcher: Sequence[str] = PACKAGED_LAUNCHER,
    system: bool = False,
    hardening: set[str] | frozenset[str] | None = None,
    docs: str | None = PACKAGED_DOCS,
    names: SidecarNames = AGOR_SIDECAR,
) -> UnitFile:
    """The sidecar's unit for a manager of `systemd_version`.

    Native mode (systemd ≥ 254 and a schedule its formula expresses): systemd waits
    RestartSec·ratio^k itself. Fallback mode: RestartSec=0 and the launcher waits out
    each delay while the unit stays `activating`.

    `hardening`: the groups of systemd hardening (hardening.GROUPS) to emit — what the install
    probe found to take effect; None: all of them (packagers, units/). `docs`: the directory of
    the installed docs (Documentation=), None to leave it out.
    """
    policy, watchdog = config.restart, config.watchdog
    native = native_backoff(policy) if systemd_version >= NATIVE_BACKOFF_VERSION else None
    delays = schedule(policy)
    options = LauncherOptions(
        unit=names.launcher_unit,
        attempts=policy.attempts,
        stability_window_s=policy.stability_window_s,
        command=tuple(config.sidecar.command),
        wait_schedule=None if native else tuple(delays),
        system=system,
        ready=watchdog.ready,
        ready_timeout_s=watchdog.ready_timeout_s,
        activity_timeout_s=watchdog.activity_timeout_s,
        probe=watchdog.probe,
        probe_timeout_s=watchdog.probe_timeout_s,
        reset_via="notify" if systemd_version >= RESTART_RESET_VERSION else "dbus",
        expect_hardening=expected_effects(wanted_groups(systemd_version, hardening, system)),
        working_directory=config.sidecar.working_directory,
        environment_file=config.sidecar.environment_file,
        buffer_bytes=round(config.socket.buffer_mib * MIB),
        client_queue_bytes=round(config.socket.client_queue_mib * MIB),
    )
    if config.sandbox.enabled:
        read_write, read_only = sandbox_paths(config)
        options.sandbox = "required" if config.sandbox.required else "best"
        options.read_write, options.read_only = read_write, read_only
        options.tcp_connect, options.tcp_bind = config.sandbox.tcp_connect, config.sandbox.tcp_bind
    unit = UnitFile(names.service, header=HEADER)
    unit.add("Unit", "Description", names.description)
    if (pages := documentation(docs, "supervision.md", "watchdog.md", "sandbox.md")) is not None:
        unit.add("Unit", "Documentation", pages)
    # A safety net for a launcher that cannot even start (its interpreter gone, ...): the launcher
    # gives up itself after `attempts` restarts, and it clears the limiter on every start that is
    # not a restart (NRestarts = 0: manual start or restart, boot), so only the restarts of one
    # budget count here and a user's `systemctl --user restart` always works.
    unit.add("Unit", "StartLimitIntervalSec", usec_text(round(policy.stability_window_s * 1e6)))
    unit.add("Unit", "StartLimitBurst", str(policy.attempts + 1))

    unit.add("Service", "Type", "notify")
    unit.add("Service", "NotifyAccess", "main")
    unit.add("Service", "ExecStart", exec_line([*launcher, *launcher_arguments(options)]))
    # `-`: a missing directory or file does not fail the start before the launcher runs (200/CHDIR,
    # outside the backoff and the budget); the launcher checks both and fails the attempt, by name.
    unit.add("Service", "WorkingDirectory", "-" + path_value(config.sidecar.working_directory, "working_directory"))
    if config.sidecar.environment_file is not None:
        unit.add("Service", "EnvironmentFile", "-" + path_value(config.sidecar.environment_file, "environment_file"))
    # Every exit nobody asked for is a crash, exit 0 included; a stop is never restarted.
    unit.add("Service", "Restart", "always")
    unit.add("Service", "RestartPreventExitStatus", str(GAVE_UP_STATUS))
    if native:
        unit.add("Service", "RestartSec", usec_text(native.restart_usec))
        if native.steps:
            unit.add("Service", "RestartSteps", str(native.steps))
            unit.add("Service", "RestartMaxDelaySec", usec_text(native.max_delay_usec))
    else:
        unit.add("Service", "RestartSec", "0")
    # The launcher fails an attempt itself after ready_timeout_s ("not ready within 10 s");
    # in fallback mode its wait also happens before READY=1. TimeoutStartSec= is the backstop.
    waited = 0 if native else math.ceil(max(delays, default=0))
    unit.add("Service", "TimeoutStartSec", f"{waited + math.ceil(watchdog.ready_timeout_s) + 30}s")
    if watchdog.interval_s:
        # WATCHDOG=1 comes from the launcher only while the sidecar answers its liveness checks;
        # a hang ends in WatchdogSignal= to everyone in the unit: the launcher kills the hung
        # sidecar, agents get SIGTERM (SIGABRT, the default, would abort them with core dumps)
        unit.add("Service", "WatchdogSec", usec_text(round(watchdog.interval_s * 1e6)))
        unit.add("Service", "WatchdogSignal", "SIGTERM")
        # the launcher ends at once on WatchdogSignal=; should it not, SIGKILL follows soon (the
        # default, TimeoutStopSec=, would keep a hung unit "deactivating" for 90 s)
        unit.add("Service", "TimeoutAbortSec", "5s")
    # On a stop (and after a crash) every process in the unit gets SIGTERM — the sidecar, its
    # agents, their git — and TimeoutStopSec= to finish; only then SIGKILL. (KillMode=mixed
    # would SIGKILL the agents the moment the launcher exits.)
    unit.add("Service", "KillMode", "control-group")
    unit.add("Service", "SyslogIdentifier", names.identifier)
    for name, value in telemetry_environment(config.telemetry).items():
        unit.add("Service", "Environment", environment_assignment(name, value))
    if config.socket.enabled:
        # the listening socket comes from agor-sidecar.socket (pulled in, and ordered before)
        unit.add("Service", "Sockets", names.socket_of_service)
    directives = hardening_directives(config, systemd_version, hardening, system)
    for section, key, value in directives:
        unit.add(section, key, value)
    if telemetry_environment(config.telemetry) and any(key == "ProtectSystem" for _, key, _ in directives):
        # the launcher keeps the run's trace context in %t/agor (sidecar/trace.py), read-only otherwise
        unit.add("Service", "ReadWritePaths", f'"-{RUN_DIRECTORY}"')
    if names.installed:
        unit.add("Install", "WantedBy", "default.target")
    return unit


def sidecar_socket(
    config: Config, docs: str | None = PACKAGED_DOCS, names: SidecarNames = AGOR_SIDECAR
) -> UnitFile | None:
    """agor-sidecar.socket: the sidecar's stdio as a unix socket that belongs to systemd, so it
    outlives every launcher: connections made during a restart wait in its backlog (docs/socket.md).
    None when [socket] enabled = false."""
    if not config.socket.enabled:
        return None
    unit = UnitFile(names.socket, header=HEADER)
    unit.add("Unit", "Description", names.socket_description)
    if (pages := documentation(docs, "socket.md")) is not None:
        unit.add("Unit", "Documentation", pages)
    unit.add("Socket", "ListenStream", names.socket_path)
    unit.add("Socket", "SocketMode", "0600")
    unit.add("Socket", "DirectoryMode", "0700")
    unit.add("Socket", "FileDescriptorName", "sidecar")  # bridge.FD_NAME, in LISTEN_FDNAMES
    unit.add("Socket", "Accept", "no")  # one launcher serves every client
    unit.add("Socket", "RemoveOnStop", "yes")
    unit.add("Socket", "Service", names.service_of_socket)
    if names.installed:
        unit.add("Install", "WantedBy", "sockets.target")
    return unit
