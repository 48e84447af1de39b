"""units.toml: what to run as the sidecar and how to restart it.

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

import math
import os
import re
import shutil
import tomllib
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

    The path lists and port lists are added to the defaults (units.SANDBOX_READ_WRITE and
    SANDBOX_READ_ONLY): the sidecar's working directory, /tmp and ~/.local/share/agor read-write;
    system and runtime directories and ~/.claude read-only; the files the command names readable
    (sandbox.command_paths, decided by the launcher at each start).
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
class Config:
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    walcheck: WalcheckConfig = field(default_factory=WalcheckConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)


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


# key: (minimum, maximum); seconds are kept to whole microseconds by systemd
_RESTART_LIMITS = {
    "base_s": (0.001, 3600.0),
    "cap_s": (0.001, 86400.0),
    "attempts": (0, 1000),
    "stability_window_s": (1.0, 30 * 86400.0),
}
_WATCHDOG_LIMITS = {
    "interval_s": (0.0, 86400.0),  # 0 turns the watchdog off; else at least WATCHDOG_MIN_S
    "ready_timeout_s": (0.1, 3600.0),
    "activity_timeout_s": (0.0, 86400.0),
    "probe_timeout_s": (0.1, 3600.0),
}
_WALCHECK_LIMITS = {
    "interval_s": (1.0, 7 * 86400.0),
    "busy_timeout_s": (0.0, 5.0),  # walcheck.MAX_BUSY_TIMEOUT_S
}
_SOCKET_LIMITS = {
    "buffer_mib": (0.0625, 1024.0),
    "client_queue_mib": (0.0625, 1024.0),
}
_WHOLE_NUMBERS = {"attempts"}


def _number(table: str, key: str, value: Any, limits: dict[str, tuple[float, float]]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"[{table}] {key} must be a number, got {value!r}")
    if key in _WHOLE_NUMBERS and not isinstance(value, int):
        raise ConfigError(f"[{table}] {key} must be a whole number, got {value!r}")
    low, high = limits[key]
    if not low <= value <= high:
        raise ConfigError(f"[{table}] {key} must be between {low:g} and {high:g}, got {value!r}")
    return value


def _numbers(
    table: str, values: dict[str, Any], base, limits: dict[str, tuple[float, float]], other_keys: tuple[str, ...] = ()
):
    """Apply the numeric settings of one table to the dataclass `base`; other keys are skipped."""
    for key, value in values.items():
        if key in other_keys:
            continue
        if key not in limits:
            known = ", ".join([*limits, *other_keys])
            raise ConfigError(f"[{table}] has no setting {key!r} (known: {known})")
        base = replace(base, **{key: _number(table, key, value, limits)})
    return base


def restart_policy(values: dict[str, Any], base: RestartPolicy | None = None) -> RestartPolicy:
    policy = _numbers("restart", values, base or RestartPolicy(), _RESTART_LIMITS)
    if policy.cap_s < policy.base_s:
        raise ConfigError(f"[restart] cap_s ({policy.cap_s:g}) is smaller than base_s ({policy.base_s:g})")
    return policy


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
            _checked(key, lambda a: check_text(a, f"[watchdog] {key} socket path"), arg)
            if len(arg.encode()) > SUN_PATH_MAX:
                raise ConfigError(
                    f"[watchdog] {key} socket path is {len(arg.encode())} bytes long; a unix socket "
                    f"path can have at most {SUN_PATH_MAX}: {arg!r}"
                )
            return value
        if kind == "tcp" and arg.isdigit() and 1 <= int(arg) <= 65535:
            return value
        if kind == "exec" and "exec:COMMAND" in modes and arg.strip():
            _checked(key, lambda a: check_text(a, f"[watchdog] {key} command"), arg)
            return value
    raise ConfigError(
        f"[watchdog] {key} must be one of {', '.join(modes)} (absolute socket path, port 1-65535), got {value!r}"
    )


def watchdog_config(values: dict[str, Any], base: WatchdogConfig | None = None) -> WatchdogConfig:
    """How the launcher knows the sidecar is ready (a {"type":"ready"} line on stdout, which
    agor's runners print; a unix socket or TCP port that accepts; or at once) and alive."""
    watchdog = _numbers("watchdog", values, base or WatchdogConfig(), _WATCHDOG_LIMITS, ("ready", "probe"))
    if "ready" in values:
        watchdog = replace(watchdog, ready=check_endpoint("ready", values["ready"], ("line", "immediate"), READY_MODES))
    if "probe" in values:
        watchdog = replace(watchdog, probe=check_endpoint("probe", values["probe"], (), PROBE_MODES))
    check_watchdog_works(watchdog)
    return watchdog


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


def walcheck_config(values: dict[str, Any], base: WalcheckConfig | None = None) -> WalcheckConfig:
    walcheck = _numbers("walcheck", values, base or WalcheckConfig(), _WALCHECK_LIMITS, ("databases",))
    if "databases" in values:
        paths = values["databases"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError("[walcheck] databases must be a list of paths")
        if not paths:  # agor-walcheck without paths would checkpoint agor's default databases
            raise ConfigError(
                "[walcheck] databases is empty: list at least one database, or leave the setting out for agor's two"
            )
        words = tuple(home_text(p) for p in paths)
        for word in words:
            _checked("database", lambda w: path_value(w, "[walcheck] databases entry"), word)
        walcheck = replace(walcheck, databases=words)
    return walcheck


def _checked(what: str, check, value):
    try:
        return check(value)
    except UnitValueError as e:
        raise ConfigError(str(e)) from None


def resolve_command(argv: list[str]) -> tuple[Text, ...]:
    """Validate the sidecar argv; a bare program name is looked up on PATH now, so the unit
    names the exact binary it will run."""
    if not argv:
        raise ConfigError("[sidecar] command is empty: give the program and its arguments")
    words = [home_text(a) for a in argv]
    for i, word in enumerate(words):
        _checked(f"argument {i}", lambda w: check_text(str(w), f"[sidecar] command argument {i}"), word)  # noqa: B023 - called at once
    program = words[0]
    if isinstance(program, str) and not program.startswith("/"):
        if "/" in program:
            raise ConfigError(f"[sidecar] command {program!r} is a relative path; give an absolute path")
        found = shutil.which(program)
        if found is None:
            raise ConfigError(f"[sidecar] command {program!r} was not found on PATH; give an absolute path")
        words[0] = os.path.abspath(found)  # PATH may hold relative entries
    return tuple(words)


def sidecar_config(values: dict[str, Any], base: SidecarConfig | None = None) -> SidecarConfig:
    sidecar = base or SidecarConfig()
    for key, value in values.items():
        if key == "command":
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise ConfigError('[sidecar] command must be a list of strings, e.g. ["/usr/bin/node", "runner.mjs"]')
            sidecar = replace(sidecar, command=resolve_command(value))
        elif key in ("working_directory", "environment_file"):
            if not isinstance(value, str):
                raise ConfigError(f"[sidecar] {key} must be a string path, got {value!r}")
            path = home_text(value)
            _checked(key, lambda p: path_value(p, f"[sidecar] {key}"), path)  # noqa: B023 - called at once
            if key == "environment_file" and any(c in str(path) for c in "*?[\\"):
                # systemd globs EnvironmentFile= paths, so these characters would change meaning
                raise ConfigError(f"[sidecar] environment_file contains a glob character (* ? [ \\): {value!r}")
            sidecar = replace(sidecar, **{key: path})
        else:
            raise ConfigError(f"[sidecar] has no setting {key!r} (known: command, working_directory, environment_file)")
    return sidecar


def _paths(key: str, value: Any) -> tuple[Text, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"[sandbox] {key} must be a list of paths")
    paths = tuple(home_text(p) for p in value)
    for path in paths:
        _checked(key, lambda p: path_value(p, f"[sandbox] {key} entry"), path)
    return paths


def _ports(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value
    ):
        raise ConfigError(f"[sandbox] {key} must be a list of TCP ports (1-65535), got {value!r}")
    return tuple(value)


def sandbox_config(values: dict[str, Any], base: SandboxConfig | None = None) -> SandboxConfig:
    sandbox = base or SandboxConfig()
    for key, value in values.items():
        if key in ("enabled", "required"):
            if not isinstance(value, bool):
                raise ConfigError(f"[sandbox] {key} must be true or false, got {value!r}")
            sandbox = replace(sandbox, **{key: value})
        elif key in ("read_write_paths", "read_only_paths"):
            sandbox = replace(sandbox, **{key: _paths(key, value)})
        elif key in ("tcp_connect", "tcp_bind"):
            sandbox = replace(sandbox, **{key: _ports(key, value)})
        else:
            raise ConfigError(
                f"[sandbox] has no setting {key!r} (known: enabled, required, read_write_paths, "
                "read_only_paths, tcp_connect, tcp_bind)"
            )
    return sandbox


def expand_home(value: Text, home: str) -> str:
    return value.expand(home) if isinstance(value, HomePath) else value


def working_directory_problem(config: Config, home: str) -> str | None:
    """Why the sandbox cannot take the working directory as it is, or None.

    The working directory is read-write for the sidecar, so `~` (or `/`, or any parent of the
    home directory) would hand it the whole home directory, ~/.ssh included."""
    if not config.sandbox.enabled:
        return None
    path = os.path.normpath(expand_home(config.sidecar.working_directory, home))
    home = os.path.normpath(home)
    if path != home and not (home + "/").startswith(path.rstrip("/") + "/"):
        return None
    what = "the home directory" if path == home else f"{path}, which contains the home directory"
    return (
        f"[sidecar] working_directory is {what}: the sandbox makes the working directory writable, "
        "which would open up every file in it (~/.ssh too); set it to a project directory "
        '(e.g. working_directory = "~/agor"), or turn the sandbox off with [sandbox] enabled = false'
    )


def socket_config(values: dict[str, Any], base: SocketConfig | None = None) -> SocketConfig:
    socket = _numbers("socket", values, base or SocketConfig(), _SOCKET_LIMITS, ("enabled",))
    if "enabled" in values:
        if not isinstance(values["enabled"], bool):
            raise ConfigError(f"[socket] enabled must be true or false, got {values['enabled']!r}")
        socket = replace(socket, enabled=values["enabled"])
    return socket


def parse_config(data: dict[str, Any]) -> Config:
    config = Config()
    for table, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{table!r} must be a table like [{table}]")
        if table == "sidecar":
            config = replace(config, sidecar=sidecar_config(values))
        elif table == "restart":
            config = replace(config, restart=restart_policy(values))
        elif table == "watchdog":
            config = replace(config, watchdog=watchdog_config(values))
        elif table == "walcheck":
            config = replace(config, walcheck=walcheck_config(values))
        elif table == "sandbox":
            config = replace(config, sandbox=sandbox_config(values))
        elif table == "socket":
            config = replace(config, socket=socket_config(values))
        else:
            raise ConfigError(
                f"unknown table [{table}] (known: [sidecar], [restart], [watchdog], [walcheck], [sandbox], [socket])"
            )
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
