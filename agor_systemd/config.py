"""units.toml: what to run as the sidecar and how to restart it.

    [sidecar]
    command = ["/usr/bin/node", "~/agor/dist/claude-runner.mjs"]
    working_directory = "~/agor"
    environment_file = "~/.config/agor/sidecar.env"

    [restart]
    base_s = 1
    cap_s = 30
    attempts = 5
    stability_window_s = 300

A leading `~` or `~/` in a path or command argument means the home directory of the user
whose manager runs the units (systemd's %h), exactly as in a shell.
"""

from __future__ import annotations

import math
import os
import shutil
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .backoff import RestartPolicy
from .unitfile import HomePath, Text, UnitValueError, check_text, path_value


class ConfigError(ValueError):
    """A configuration problem, worded as one line for the user."""


# agor starts its runner with Deno when it can; these are the flags it passes.
DEFAULT_COMMAND: tuple[Text, ...] = (
    "/usr/bin/node",
    HomePath(".local/share/agor/dist/claude-runner.mjs"),
)


@dataclass(frozen=True)
class SidecarConfig:
    command: tuple[Text, ...] = DEFAULT_COMMAND
    working_directory: Text = HomePath("")
    environment_file: Text | None = None


@dataclass(frozen=True)
class Config:
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    restart: RestartPolicy = field(default_factory=RestartPolicy)


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


_RESTART_LIMITS = {
    # key: (minimum, maximum); seconds are kept to whole microseconds by systemd
    "base_s": (0.001, 3600.0),
    "cap_s": (0.001, 86400.0),
    "attempts": (0, 1000),
    "stability_window_s": (1.0, 30 * 86400.0),
}


def _number(table: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"[{table}] {key} must be a number, got {value!r}")
    low, high = _RESTART_LIMITS[key]
    if not low <= value <= high:
        raise ConfigError(f"[{table}] {key} must be between {low:g} and {high:g}, got {value!r}")
    return value


def restart_policy(values: dict[str, Any], base: RestartPolicy | None = None) -> RestartPolicy:
    policy = base or RestartPolicy()
    for key, value in values.items():
        if key not in _RESTART_LIMITS:
            raise ConfigError(f"[restart] has no setting {key!r} (known: {', '.join(_RESTART_LIMITS)})")
        number = _number("restart", key, value)
        if key == "attempts":
            if not isinstance(value, int):
                raise ConfigError(f"[restart] attempts must be a whole number, got {value!r}")
            number = int(value)
        policy = replace(policy, **{key: number})
    if policy.cap_s < policy.base_s:
        raise ConfigError(f"[restart] cap_s ({policy.cap_s:g}) is smaller than base_s ({policy.base_s:g})")
    return policy


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
        _checked(f"argument {i}", lambda w: check_text(str(w), f"[sidecar] command argument {i}"), word)
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
                raise ConfigError("[sidecar] command must be a list of strings, e.g. [\"/usr/bin/node\", \"runner.mjs\"]")
            sidecar = replace(sidecar, command=resolve_command(value))
        elif key in ("working_directory", "environment_file"):
            if not isinstance(value, str):
                raise ConfigError(f"[sidecar] {key} must be a string path, got {value!r}")
            path = home_text(value)
            _checked(key, lambda p: path_value(p, f"[sidecar] {key}"), path)
            if key == "environment_file" and any(c in str(path) for c in "*?[\\"):
                # systemd globs EnvironmentFile= paths, so these characters would change meaning
                raise ConfigError(f"[sidecar] environment_file contains a glob character (* ? [ \\): {value!r}")
            sidecar = replace(sidecar, **{key: path})
        else:
            raise ConfigError(f"[sidecar] has no setting {key!r} (known: command, working_directory, environment_file)")
    return sidecar


def parse_config(data: dict[str, Any]) -> Config:
    config = Config()
    for table, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{table!r} must be a table like [{table}]")
        if table == "sidecar":
            config = replace(config, sidecar=sidecar_config(values))
        elif table == "restart":
            config = replace(config, restart=restart_policy(values))
        else:
            raise ConfigError(f"unknown table [{table}] (known: [sidecar], [restart])")
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
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
