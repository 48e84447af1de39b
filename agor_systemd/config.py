"""units.toml: what to run as the sidecar, how to restart, watch and sandbox it, the WAL timer.

Every setting is declared once, in SETTINGS: its parser and limits, its command-line override flag
(install, render, verify) and its entry in docs/settings.md, which is generated from it.

    [sidecar]
    command = ["/usr/bin/node", "~/agor/dist/claude-runner.mjs"]
    working_directory = "~/agor"        # the project directory: read-write in the sandbox
    environment_file = "~/.config/agor/sidecar.env"

    [restart]
    base_s = 1
    cap_s = 30
    attempts = 5
    stability_window_s = 300

A leading `~` or `~/` in a path or command argument means the home directory of the user
whose manager runs the units (systemd's %h), exactly as in a shell.

With the sandbox on (the default) the working directory is read-write for the sidecar, like every
[sandbox] read_write_paths entry, and the files its command names are readable (docs/sandbox.md);
a working directory that would open up the whole home directory is refused.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agor_systemd.errors import AgorError
from agor_systemd.unitfile import HomePath, Text, UnitValueError, check_text, path_value


class ConfigError(AgorError, ValueError):
    """A configuration problem, worded as one line for the user."""


AGOR_DATA = ".local/share/agor"  # agor's data directory: sessions.db, btmsg.db

# agor's runner; a placeholder until the user names their own (doctor checks it exists)
DEFAULT_COMMAND: tuple[Text, ...] = (
    "/usr/bin/node",
    HomePath(f"{AGOR_DATA}/dist/claude-runner.mjs"),
)


@dataclass(frozen=True)
class RestartPolicy:
    """agor's supervisor defaults: 1 s doubling, cap 30 s, 5 restarts, 300 s stability window."""

    base_s: float = 1.0
    cap_s: float = 30.0
    attempts: int = 5
    stability_window_s: float = 300.0


@dataclass(frozen=True)
class SidecarConfig:
    command: tuple[Text, ...] = DEFAULT_COMMAND
    # read-write in the sandbox, so not the home directory; agor's data directory always exists
    working_directory: Text = HomePath(AGOR_DATA)
    environment_file: Text | None = None


@dataclass(frozen=True)
class WatchdogConfig:
    interval_s: float = 30.0  # WatchdogSec=; 0 turns the watchdog off
    ready: str = "line"  # "line", "immediate", "socket:PATH", "tcp:PORT"
    ready_timeout_s: float = 10.0  # agor's own readiness timeout
    activity_timeout_s: float = 0.0  # > 0: no output for this long counts as hung
    probe: str | None = None  # "socket:PATH", "tcp:PORT" or "exec:SHELL COMMAND" that must succeed
    probe_timeout_s: float = 5.0


@dataclass(frozen=True)
class WalcheckConfig:
    interval_s: float = 300.0
    databases: tuple[Text, ...] = (HomePath(f"{AGOR_DATA}/sessions.db"), HomePath(f"{AGOR_DATA}/btmsg.db"))
    # the most one run holds agor's writers up per database; agor's own checkpoint: up to 5 s
    busy_timeout_s: float = 1.0


@dataclass(frozen=True)
class SandboxConfig:
    """[sandbox]: Landlock for the sidecar and everything it starts, on by default.

    The path lists are added to the defaults (sandbox.policy.SANDBOX_READ_WRITE and
    SANDBOX_READ_ONLY): the sidecar's working directory, /tmp and ~/.local/share/agor read-write;
    system and runtime directories and ~/.claude read-only; the files the command names readable
    (sandbox.enforce.command_paths, decided by the launcher at each start).
    """

    enabled: bool = True
    required: bool = False  # refuse to start when the kernel cannot enforce it
    read_write_paths: tuple[Text, ...] = ()
    read_only_paths: tuple[Text, ...] = ()
    tcp_connect: tuple[int, ...] | None = None  # None: any port
    tcp_bind: tuple[int, ...] = ()  # none


@dataclass(frozen=True)
class SocketConfig:
    """[socket]: agor-sidecar.socket, the sidecar's stdio for agor (docs/socket.md), on by default."""

    enabled: bool = True
    buffer_mib: float = 4.0  # stdout kept while no client is connected
    client_queue_mib: float = 4.0  # output queued for one slow client before lines are dropped for it


@dataclass(frozen=True)
class BtmsgConfig:
    """[btmsg]: agent health in agor's btmsg.db and agor-btmsg-sweep.timer (docs/btmsg.md), on by default."""

    enabled: bool = True
    database: Text = HomePath(f"{AGOR_DATA}/btmsg.db")
    interval_s: float = 30.0
    stale_after_s: float = 300.0  # agor's dead-letter rule
    stall_threshold_min: float = 15.0  # agor's stallThresholdMin
    max_deliver: int = 5
    max_message_kib: float = 256.0


@dataclass(frozen=True)
class RelayConfig:
    """[relay]: agor-relay, the TLS WebSocket relay for agor's controller on another machine
    (docs/relay.md). Off by default: a network listener is opt-in."""

    enabled: bool = False
    port: int = 9750  # agor's
    bind: str = ""  # every address, as agor
    tls_cert: Text = HomePath(".config/agor/relay-cert.pem")
    tls_key: Text = HomePath(".config/agor/relay-key.pem")
    token_file: Text = HomePath(".config/agor/relay-token")  # LoadCredential='s source, 0600
    sidecar_command: tuple[Text, ...] | None = None  # None: [sidecar] command
    session_linger_s: float = 600.0
    max_connections: int = 128
    max_frame_mib: float = 4.0
    ping_timeout_s: float = 15.0
    client_queue_mib: float = 4.0
    replay_mib: float = 4.0


@dataclass(frozen=True)
class TelemetryConfig:
    """[telemetry]: OTLP/HTTP traces from the units' programs (docs/telemetry.md), off by default."""

    otlp_endpoint: str | None = None  # None: $AGOR_OTLP_ENDPOINT when install runs; "": off
    flush_timeout_s: float = 0.25  # the most a program waits for the collector at its end


def telemetry_environment(telemetry: TelemetryConfig) -> dict[str, str]:
    """The variables every unit gets with tracing on (tracing.ENDPOINT_ENV, FLUSH_TIMEOUT_ENV);
    none when off. Units do not inherit install's environment: install resolves the endpoint."""
    if not telemetry.otlp_endpoint:
        return {}
    return {
        "AGOR_OTLP_ENDPOINT": telemetry.otlp_endpoint,
        "AGOR_OTLP_FLUSH_TIMEOUT_S": f"{telemetry.flush_timeout_s:g}",
    }


@dataclass(frozen=True)
class Config:
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    walcheck: WalcheckConfig = field(default_factory=WalcheckConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    btmsg: BtmsgConfig = field(default_factory=BtmsgConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def config_home() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"


def default_config_path() -> Path:
    return config_home() / "agor" / "units.toml"


def home_text(value: str) -> Text:
    """`~` and `~/rest` become HomePath (%h in units); everything else stays verbatim."""
    if value == "~":
        return HomePath("")
    if value.startswith("~/"):
        return HomePath(value[2:].lstrip("/"))
    return value


# -- one declaration per setting ------------------------------------------------------------------
#
# Each setting is declared once, in SETTINGS below (the idea of mkosi's ConfigSetting/SETTINGS):
# that declaration parses and checks its units.toml value, makes its command-line override flag
# (cli.config_options) and its row in docs/settings.md (python -m agor_systemd.docs). The frozen
# dataclasses above stay the typed result and hold the defaults.

# the value parser of a setting: the TOML (or command-line) value -> the typed value, or ConfigError
Parse = Callable[["Setting", Any], Any]


@dataclass(frozen=True)
class Setting:
    """One units.toml setting: `[table] key`, how its value is checked, its flag and its docs."""

    table: str
    key: str
    parse: Parse
    kind: str  # what the value is, for docs/settings.md: "seconds", "list of paths", ...
    help: str  # one sentence without its period: docs/settings.md and the flag's --help
    limits: tuple[float, float] | None = None  # a number's inclusive bounds
    flag: str | None = None  # "--x", a switch "--x/--no-x", or "--" for the words after `--`
    metavar: str | None = None
    appends: bool = False  # a repeatable flag whose values are added to the units.toml list
    unset: str = "none"  # what a default of None means

    @property
    def label(self) -> str:
        """How errors name the setting: `[restart] attempts`."""
        return f"[{self.table}] {self.key}"

    @property
    def name(self) -> str:
        """A Python identifier for the setting: `restart_attempts`."""
        return f"{self.table}_{self.key}"

    @property
    def default(self) -> Any:
        return getattr(TABLES[self.table].type(), self.key)


@dataclass(frozen=True)
class Table:
    """One [table] of units.toml: its dataclass (the field of Config with the table's name)."""

    type: type
    help: str  # what the table is for and the rules across its settings, for docs/settings.md
    check: Callable[[Any], None] | None = None  # cross-field checks, run on the merged table


def _checked(check: Callable[[], object]) -> None:
    try:
        check()
    except UnitValueError as e:
        raise ConfigError(str(e)) from None


def _number(setting: Setting, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{setting.label} must be a number, got {value!r}")
    if type(setting.default) is int and not isinstance(value, int):
        raise ConfigError(f"{setting.label} must be a whole number, got {value!r}")
    assert setting.limits is not None, f"{setting.label} is a number without limits"
    low, high = setting.limits
    if not low <= value <= high:
        raise ConfigError(f"{setting.label} must be between {low:g} and {high:g}, got {value!r}")
    return value


def _switch(setting: Setting, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{setting.label} must be true or false, got {value!r}")
    return value


def _path(setting: Setting, value: Any) -> Text:
    if not isinstance(value, str):
        raise ConfigError(f"{setting.label} must be a string path, got {value!r}")
    path = home_text(value)
    _checked(lambda: path_value(path, setting.label))
    return path


def _environment_file(setting: Setting, value: Any) -> Text:
    path = _path(setting, value)
    if any(c in str(path) for c in "*?[\\"):
        # systemd globs EnvironmentFile= paths, so these characters would change meaning
        raise ConfigError(f"{setting.label} contains a glob character (* ? [ \\): {value!r}")
    return path


def _paths(setting: Setting, value: Any) -> tuple[Text, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{setting.label} must be a list of paths")
    paths = tuple(home_text(p) for p in value)
    for path in paths:
        _checked(lambda: path_value(path, f"{setting.label} entry"))  # noqa: B023 - called at once
    return paths


def _databases(setting: Setting, value: Any) -> tuple[Text, ...]:
    paths = _paths(setting, value)
    if not paths:  # agor-walcheck without paths would checkpoint agor's default databases
        raise ConfigError(
            f"{setting.label} is empty: list at least one database, or leave the setting out for agor's two"
        )
    return paths


def _ports(setting: Setting, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value
    ):
        raise ConfigError(f"{setting.label} must be a list of TCP ports (1-65535), got {value!r}")
    return tuple(value)


def _command(setting: Setting, value: Any) -> tuple[Text, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f'{setting.label} must be a list of strings, e.g. ["/usr/bin/node", "runner.mjs"]')
    return resolve_command(value, setting.label)


def resolve_command(argv: list[str], label: str = "[sidecar] command") -> tuple[Text, ...]:
    """Validate the sidecar argv; a bare program name is looked up on PATH now, so the unit
    names the exact binary it will run."""
    if not argv:
        raise ConfigError(f"{label} is empty: give the program and its arguments")
    words = [home_text(a) for a in argv]
    for i, word in enumerate(words):
        _checked(lambda: check_text(str(word), f"{label} argument {i}"))  # noqa: B023 - called at once
    program = words[0]
    if isinstance(program, str) and not program.startswith("/"):
        if "/" in program:
            raise ConfigError(f"{label} {program!r} is a relative path; give an absolute path")
        found = shutil.which(program)
        if found is None:
            raise ConfigError(f"{label} {program!r} was not found on PATH; give an absolute path")
        words[0] = os.path.abspath(found)  # PATH may hold relative entries
    return tuple(words)


READY_MODES = ("line", "immediate", "socket:PATH", "tcp:PORT")
# A unix socket path is at most sizeof(sun_path) - 1 bytes (the rest is its NUL terminator);
# a longer one would only show up later as "not ready" or a failing probe.
SUN_PATH_MAX = 107
# The launcher pings at half the interval and checks liveness every 0.25 s; below 1 s a loaded
# machine misses pings and every attempt is killed (and 1e-7 s would render WatchdogSec=0s: off).
WATCHDOG_MIN_S = 1.0
PROBE_MODES = ("socket:PATH", "tcp:PORT", "exec:COMMAND")


def check_endpoint(key: str, value: Any, plain: tuple[str, ...], modes: tuple[str, ...]) -> str:
    """A readiness/liveness endpoint: one of `plain`, socket:/abs/path, tcp:PORT (or exec:CMD)."""
    if isinstance(value, str):
        kind, _, arg = value.partition(":")
        if value in plain:
            return value
        if kind == "socket" and arg.startswith("/"):
            _checked(lambda: check_text(arg, f"[watchdog] {key} socket path"))
            if len(arg.encode()) > SUN_PATH_MAX:
                raise ConfigError(
                    f"[watchdog] {key} socket path is {len(arg.encode())} bytes long; a unix socket "
                    f"path can have at most {SUN_PATH_MAX}: {arg!r}"
                )
            return value
        if kind == "tcp" and arg.isdigit() and 1 <= int(arg) <= 65535:
            return value
        if kind == "exec" and "exec:COMMAND" in modes and arg.strip():
            _checked(lambda: check_text(arg, f"[watchdog] {key} command"))
            return value
    raise ConfigError(
        f"[watchdog] {key} must be one of {', '.join(modes)} (absolute socket path, port 1-65535), got {value!r}"
    )


def _ready(setting: Setting, value: Any) -> str:
    return check_endpoint(setting.key, value, ("line", "immediate"), READY_MODES)


def _probe(setting: Setting, value: Any) -> str:
    return check_endpoint(setting.key, value, (), PROBE_MODES)


def _bind_address(setting: Setting, value: Any) -> str:
    if value == "":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f'{setting.label} must be an IP address, or "" for every address; got {value!r}') from None
    return str(value)


def _otlp_endpoint(setting: Setting, value: Any) -> str:
    """An http:// or https:// base URL (/v1/traces is added), or "" for off."""
    if not isinstance(value, str):
        raise ConfigError(f"{setting.label} must be a URL string, got {value!r}")
    if value and (
        not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise ConfigError(f'{setting.label} must be an http:// or https:// URL (or "" for off), got {value!r}')
    _checked(lambda: check_text(value, setting.label))
    return value


def check_restart(policy: RestartPolicy) -> None:
    if policy.cap_s < policy.base_s:
        raise ConfigError(f"[restart] cap_s ({policy.cap_s:g}) is smaller than base_s ({policy.base_s:g})")


def check_watchdog_works(watchdog: WatchdogConfig) -> None:
    """Refuse watchdog settings that would be silently ignored or kill every attempt."""
    if 0 < watchdog.interval_s < WATCHDOG_MIN_S:
        raise ConfigError(
            f"[watchdog] interval_s must be 0 (off) or at least {WATCHDOG_MIN_S:g} s, got {watchdog.interval_s!r}"
        )
    if watchdog.interval_s == 0:
        # the launcher checks liveness only to decide on watchdog pings
        unused = [
            f"{key} = {value!r}"
            for key, value in (("probe", watchdog.probe), ("activity_timeout_s", watchdog.activity_timeout_s))
            if value
        ]
        if unused:
            verb = "needs" if len(unused) == 1 else "need"
            raise ConfigError(
                f"[watchdog] {' and '.join(unused)} {verb} the watchdog, which interval_s = 0 "
                "turns off; set interval_s or remove it"
            )


# in the order of docs/settings.md
TABLES = {
    "sidecar": Table(
        SidecarConfig,
        "What runs as the sidecar. `~` and `~/…` mean the home directory of the user whose manager runs "
        "the unit (systemd's `%h`).",
    ),
    "restart": Table(
        RestartPolicy,
        "agor's restart backoff: the delay starts at `base_s` and doubles up to `cap_s` (which may not be "
        "smaller than `base_s`); after `attempts` restarts the unit fails.",
        check_restart,
    ),
    "watchdog": Table(
        WatchdogConfig,
        "Readiness and liveness ([watchdog.md](watchdog.md)). `interval_s` is 0 (off) or at least 1 s; "
        "`probe` and `activity_timeout_s` need the watchdog on.",
        check_watchdog_works,
    ),
    "walcheck": Table(WalcheckConfig, "The WAL checkpoint timer ([walcheck.md](walcheck.md)).", None),
    "sandbox": Table(
        SandboxConfig,
        "Landlock for the sidecar and everything it starts ([sandbox.md](sandbox.md)). The path lists add to "
        "the defaults: the working directory, /tmp and ~/.local/share/agor read-write; system and runtime "
        "directories, ~/.claude and the files the command names read-only.",
        None,
    ),
    "socket": Table(
        SocketConfig,
        "agor-sidecar.socket: the sidecar's stdin and stdout on a unix socket, for agor and `agor-units attach` "
        "([socket.md](socket.md)).",
        None,
    ),
    "btmsg": Table(
        BtmsgConfig,
        "Agent health in agor's btmsg.db: heartbeats, stale and stalled agents, dead letters that are "
        "redelivered, and agor-btmsg-sweep.timer ([btmsg.md](btmsg.md)). The thresholds reach every sender "
        "through the database, where each sweep stores them.",
        None,
    ),
    "relay": Table(
        RelayConfig,
        "agor-relay, the TLS WebSocket relay for agor's controller on another machine ([relay.md](relay.md)). "
        "Off by default; `agor-units install --relay` turns it on for one install. The token is read by systemd "
        "from `token_file` (LoadCredential=), never put in the unit. Each controller's session runs its sidecar "
        "with the launcher, [sandbox], [restart] and [watchdog] of agor-sidecar.service.",
        None,
    ),
    "telemetry": Table(
        TelemetryConfig,
        "OTLP/HTTP traces from agor-units, the launcher and agor-walcheck ([telemetry.md](telemetry.md)): the "
        "endpoint reaches every unit as `Environment=AGOR_OTLP_ENDPOINT=…`.",
        None,
    ),
}

# in the order of the dataclasses' fields (a test checks), of the flags in --help and of docs/settings.md;
# limits in seconds are kept to whole microseconds by systemd
SETTINGS = (
    Setting(
        "sidecar",
        "command",
        _command,
        "list of strings",
        "The sidecar's program and its arguments, passed verbatim; a bare program name is looked up on PATH",
        flag="--",
    ),
    Setting(
        "sidecar",
        "working_directory",
        _path,
        "path",
        "The sidecar's working directory (absolute, or ~/...), read-write in the sandbox",
        flag="--working-directory",
        metavar="PATH",
    ),
    Setting(
        "sidecar",
        "environment_file",
        _environment_file,
        "path",
        "A file of NAME=value lines for the sidecar's environment",
        flag="--environment-file",
        metavar="PATH",
    ),
    Setting(
        "restart",
        "base_s",
        _number,
        "seconds",
        "The first restart delay; each restart doubles it",
        (0.001, 3600.0),
        flag="--base-s",
    ),
    Setting("restart", "cap_s", _number, "seconds", "The longest restart delay", (0.001, 86400.0), flag="--cap-s"),
    Setting("restart", "attempts", _number, "whole number", "Restarts before giving up", (0, 1000), flag="--attempts"),
    Setting(
        "restart",
        "stability_window_s",
        _number,
        "seconds",
        "Running this long refills the restart budget",
        (1.0, 30 * 86400.0),
        flag="--stability-window-s",
    ),
    Setting(
        "watchdog",
        "interval_s",
        _number,
        "seconds",
        "WatchdogSec=: a sidecar hung this long is killed and restarted; 0 turns the watchdog off",
        (0.0, 86400.0),
        flag="--watchdog-s",
    ),
    Setting(
        "watchdog",
        "ready",
        _ready,
        "string",
        'When the sidecar is ready: line (it prints {"type":"ready"}), immediate, or when socket:PATH or '
        "tcp:PORT accepts a connection",
        flag="--ready",
        metavar="MODE",
    ),
    Setting(
        "watchdog",
        "ready_timeout_s",
        _number,
        "seconds",
        "Not ready within this long fails the attempt",
        (0.1, 3600.0),
        flag="--ready-timeout-s",
    ),
    Setting(
        "watchdog",
        "activity_timeout_s",
        _number,
        "seconds",
        "No output for this long counts as hung; 0 turns this check off",
        (0.0, 86400.0),
        flag="--activity-timeout-s",
    ),
    Setting(
        "watchdog",
        "probe",
        _probe,
        "string",
        "A liveness probe that must succeed while the watchdog is on: socket:PATH, tcp:PORT or exec:SHELL-COMMAND",
        flag="--probe",
        metavar="CHECK",
    ),
    Setting(
        "watchdog",
        "probe_timeout_s",
        _number,
        "seconds",
        "How long the probe may take",
        (0.1, 3600.0),
        flag="--probe-timeout-s",
    ),
    Setting(
        "walcheck",
        "interval_s",
        _number,
        "seconds",
        "How often agor-walcheck.timer runs, counted from the end of the previous run",
        (1.0, 7 * 86400.0),
    ),
    Setting(
        "walcheck",
        "databases",
        _databases,
        "list of paths",
        "The SQLite databases to checkpoint; an empty list is refused (leave the setting out for agor's two)",
    ),
    Setting(
        "walcheck",
        "busy_timeout_s",
        _number,
        "seconds",
        "The most one run holds agor's writers up per database (agor's own checkpoint may take 5 s)",
        (0.0, 5.0),  # walcheck.MAX_BUSY_TIMEOUT_S
    ),
    Setting(
        "sandbox",
        "enabled",
        _switch,
        "true or false",
        "Landlock for the sidecar and everything it starts",
        flag="--sandbox/--no-sandbox",
    ),
    Setting(
        "sandbox",
        "required",
        _switch,
        "true or false",
        "Refuse to start the sidecar when the kernel cannot enforce Landlock",
        flag="--sandbox-required",
    ),
    Setting(
        "sandbox",
        "read_write_paths",
        _paths,
        "list of paths",
        "Also writable in the sandbox, e.g. a project directory",
        flag="--read-write-path",
        metavar="PATH",
        appends=True,
    ),
    Setting(
        "sandbox",
        "read_only_paths",
        _paths,
        "list of paths",
        "Also readable in the sandbox",
        flag="--read-only-path",
        metavar="PATH",
        appends=True,
    ),
    Setting(
        "sandbox", "tcp_connect", _ports, "list of ports", "TCP ports the sidecar may connect to", unset="any port"
    ),
    Setting("sandbox", "tcp_bind", _ports, "list of ports", "TCP ports the sidecar may listen on"),
    Setting("socket", "enabled", _switch, "true or false", "Install agor-sidecar.socket and bridge it to the sidecar"),
    Setting(
        "socket",
        "buffer_mib",
        _number,
        "MiB",
        "The sidecar's output kept while no client is connected, delivered oldest first on connect",
        (0.0625, 1024.0),
    ),
    Setting(
        "socket",
        "client_queue_mib",
        _number,
        "MiB",
        "Output queued for one slow client before its lines are dropped (and it is told how many)",
        (0.0625, 1024.0),
    ),
    Setting("btmsg", "enabled", _switch, "true or false", "Install agor-btmsg-sweep.timer"),
    Setting("btmsg", "database", _path, "path", "agor's btmsg.db, which the sweep watches"),
    Setting(
        "btmsg",
        "interval_s",
        _number,
        "seconds",
        "How often agor-btmsg-sweep.timer runs, counted from the end of the previous run",
        (0.2, 86400.0),
    ),
    Setting(
        "btmsg",
        "stale_after_s",
        _number,
        "seconds",
        "No heartbeat for this long: the agent is stale and messages to it become dead letters (agor: 300)",
        (1.0, 7 * 86400.0),
    ),
    Setting(
        "btmsg",
        "stall_threshold_min",
        _number,
        "minutes",
        "No heartbeat, message sent or message read for this long: the agent is stalled, attention 100 "
        "(agor's slider: 5 to 60)",
        (0.01, 7 * 1440.0),
    ),
    Setting(
        "btmsg",
        "max_deliver",
        _number,
        "whole number",
        "Deliveries of a message that is never read before it is parked for good",
        (1, 1000),
    ),
    Setting(
        "btmsg",
        "max_message_kib",
        _number,
        "KiB",
        "The largest message `btmsg send` accepts",
        (1.0, 65536.0),
    ),
    Setting(
        "relay",
        "enabled",
        _switch,
        "true or false",
        "Install agor-relay.service, a network listener for agor's controller",
        flag="--relay/--no-relay",
    ),
    Setting("relay", "port", _number, "whole number", "The TCP port the relay listens on", (1, 65535)),
    Setting("relay", "bind", _bind_address, "IP address", 'The address it listens on; "" for every address'),
    Setting("relay", "tls_cert", _path, "path", "The certificate (PEM); make one with `agor-relay cert`"),
    Setting("relay", "tls_key", _path, "path", "Its private key (PEM), mode 0600"),
    Setting(
        "relay",
        "token_file",
        _path,
        "path",
        "The file that holds the token (mode 0600), handed to the relay as the credential relay-token",
    ),
    Setting(
        "relay",
        "sidecar_command",
        _command,
        "list of strings",
        "The sidecar each controller session runs",
        unset="[sidecar] command",
    ),
    Setting(
        "relay",
        "session_linger_s",
        _number,
        "seconds",
        "How long a session's PTYs and sidecar outlive their controller's connection, waiting for it to resume",
        (0.0, 7 * 86400.0),
    ),
    Setting(
        "relay", "max_connections", _number, "whole number", "Connections at most, all clients together", (1, 100000)
    ),
    Setting("relay", "max_frame_mib", _number, "MiB", "The largest frame a controller may send", (0.0625, 16.0)),
    Setting(
        "relay",
        "ping_timeout_s",
        _number,
        "seconds",
        "A peer is pinged this often and dropped when it does not answer within as long again",
        (1.0, 3600.0),
    ),
    Setting(
        "relay",
        "client_queue_mib",
        _number,
        "MiB",
        "Output queued for one slow controller before it is closed with 1013 (its session replays the rest)",
        (0.0625, 1024.0),
    ),
    Setting(
        "relay",
        "replay_mib",
        _number,
        "MiB",
        "A session's output kept while no controller is attached; past it the oldest goes, counted in state_sync",
        (0.0625, 1024.0),
    ),
    Setting(
        "telemetry",
        "otlp_endpoint",
        _otlp_endpoint,
        "URL",
        'The OTLP/HTTP collector, e.g. http://localhost:4318 (spans go to its /v1/traces); "" turns tracing off',
        flag="--otlp-endpoint",
        metavar="URL",
        unset="$AGOR_OTLP_ENDPOINT when install runs, else off",
    ),
    Setting(
        "telemetry",
        "flush_timeout_s",
        _number,
        "seconds",
        "The most a program waits at its end for the collector; spans not sent by then are counted as dropped",
        (0.05, 5.0),
    ),
)


def _apply(table: str, base: Any, values: list[tuple[Setting, Any]], command_line: bool = False) -> Any:
    """`base` (a table's dataclass) with the values parsed onto it, then the table's own checks."""
    for setting, value in values:
        parsed = setting.parse(setting, value)
        if command_line and setting.appends:
            parsed = getattr(base, setting.key) + parsed
        base = replace(base, **{setting.key: parsed})
    check = TABLES[table].check
    if check is not None:
        check(base)
    return base


def table_config(table: str, values: dict[str, Any], base: Any = None) -> Any:
    """One [table] of units.toml onto `base` (default: the table's defaults)."""
    settings = {s.key: s for s in SETTINGS if s.table == table}
    unknown = [key for key in values if key not in settings]
    if unknown:
        raise ConfigError(f"[{table}] has no setting {unknown[0]!r} (known: {', '.join(settings)})")
    return _apply(table, TABLES[table].type() if base is None else base, [(settings[k], v) for k, v in values.items()])


def restart_policy(values: dict[str, Any], base: RestartPolicy | None = None) -> RestartPolicy:
    return table_config("restart", values, base)


def watchdog_config(values: dict[str, Any], base: WatchdogConfig | None = None) -> WatchdogConfig:
    """How the launcher knows the sidecar is ready (a {"type":"ready"} line on stdout, which
    agor's runners print; a unix socket or TCP port that accepts; or at once) and alive."""
    return table_config("watchdog", values, base)


def apply_overrides(config: Config, overrides: dict[Setting, Any]) -> Config:
    """`config` with command-line values applied, each checked as in units.toml; the values of an
    appending setting are added to the file's list. Every table's cross-field checks run again, so
    `--watchdog-s 0` is refused when units.toml configures a probe."""
    for table in TABLES:
        values = [(setting, value) for setting, value in overrides.items() if setting.table == table]
        config = replace(config, **{table: _apply(table, getattr(config, table), values, command_line=True)})
    return config


def expand_home(value: Text, home: str) -> str:
    return value.expand(home) if isinstance(value, HomePath) else value


def parse_config(data: dict[str, Any]) -> Config:
    config = Config()
    for table, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{table!r} must be a table like [{table}]")
        if table not in TABLES:
            known = ", ".join(f"[{name}]" for name in TABLES)
            raise ConfigError(f"unknown table [{table}] (known: {known})")
        config = replace(config, **{table: table_config(table, values)})
    return config


def load_config(path: Path | None = None) -> Config:
    """Read units.toml; a missing file at the default location means all defaults."""
    explicit = path is not None
    path = path or default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        # a byte-order mark, as some editors write, is not TOML but means nothing here either
        data = tomllib.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def with_endpoint_from_environment(config: Config) -> Config:
    """[telemetry] otlp_endpoint left out of units.toml: $AGOR_OTLP_ENDPOINT of whoever installs
    (units do not inherit it), else off."""
    if config.telemetry.otlp_endpoint is not None:
        return config
    found = os.environ.get("AGOR_OTLP_ENDPOINT", "").strip()
    setting = next(s for s in SETTINGS if s.name == "telemetry_otlp_endpoint")
    return replace(config, telemetry=replace(config.telemetry, otlp_endpoint=setting.parse(setting, found)))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dropped_environment_lines(text: str) -> list[tuple[int, str, str]]:
    """Assignments of an EnvironmentFile= that systemd ignores without failing the unit:
    (line number, line, why). Follows systemd's parser (env-file.c): blank lines and `#`/`;`
    comments are skipped, a line ends at \\n or \\r, the name runs to the first `=` (trailing blanks
    dropped) and must be a shell variable name; quoted values and backslash-newline continue onto further lines."""
    lines = text.split("\n")
    dropped: list[tuple[int, str, str]] = []
    state, key, start, line_no = "pre_key", "", 0, 1

    def drop(why: str) -> None:
        dropped.append((start, lines[start - 1].rstrip("\r"), why))

    for c in text + "\n":
        if state == "pre_key":
            if c == "#" or c == ";":
                state = "comment"
            elif c not in " \t\r\n":
                state, key, start = "key", c, line_no
        elif state == "key":
            if c in "\n\r":
                drop("no variable name before `=`" if key.startswith("=") else "no `=` in it")
                state = "pre_key"
            elif c == "=":
                name = key.rstrip(" \t\r")
                if name.startswith("export ") and _ENV_NAME.fullmatch(name.removeprefix("export ").strip()):
                    drop("systemd does not understand `export`; leave it out")
                elif not _ENV_NAME.fullmatch(name):
                    drop(f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)")
                state = "pre_value"
            else:
                key += c
        elif state == "pre_value":
            if c in "\n\r":
                state = "pre_key"
            elif c == "'":
                state = "single_quote"
            elif c == '"':
                state = "double_quote"
            elif c == "\\":
                state = "value_escape"
            elif c not in " \t\r":
                state = "value"
        elif state == "value":
            if c in "\n\r":
                state = "pre_key"
            elif c == "\\":
                state = "value_escape"
        elif state == "value_escape":
            state = "value"  # even a newline: the value goes on
        elif state == "single_quote":
            if c == "'":
                state = "pre_value"
        elif state == "double_quote":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_quote_escape"
        elif state == "double_quote_escape":
            state = "double_quote"
        elif state == "comment":
            if c in "\n\r":
                state = "pre_key"
            elif c == "\\":
                state = "comment_escape"
        elif state == "comment_escape":
            # a comment ending in `\` went on to the next line before systemd 254, not since
            state = "pre_key" if c in "\n\r" else "comment"
        if c == "\n":
            line_no += 1
    return dropped
