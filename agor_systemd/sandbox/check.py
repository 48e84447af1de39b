"""What the sidecar's sandbox will be on this machine, before starting it (`agor-sandbox check`)."""

from __future__ import annotations

import os
from pathlib import Path

from agor_systemd.config import Config, expand_home, load_config
from agor_systemd.sandbox import landlock
from agor_systemd.sandbox.enforce import TERMINALS, command_paths, enforcement
from agor_systemd.sandbox.paths import contains_home
from agor_systemd.sandbox.policy import sandbox_paths


def broad_write_paths(read_write: list[str], home: str) -> list[str]:
    """Read-write paths that contain the home directory (`/`, `/home`, the home itself): with
    one of them the sandbox keeps nothing in the home directory, ~/.ssh included, from writes."""
    home = os.path.normpath(home)
    return [path for path in read_write if contains_home(os.path.normpath(path), home)]


def broad_write_warnings(config: Config, home: str) -> list[str]:
    """A warning per configured read-write path that holds the home directory (the defaults are
    deliberate and do not)."""
    configured = [expand_home(p, home) for p in config.sandbox.read_write_paths]
    return [
        f"read-write {path} holds the home directory: nothing there, ~/.ssh included, is kept from writes"
        for path in broad_write_paths(configured, home)
    ]


def sandbox_report(config_path: Path | None = None) -> dict:
    """The configured sandbox against this kernel: level, what is missing, paths that don't exist."""
    config = load_config(config_path)
    home = str(Path.home())
    read_write, read_only = sandbox_paths(config)
    cap = os.environ.get("AGOR_LANDLOCK_ABI")
    abi = landlock.abi_version(int(cap) if cap and cap.isdigit() else None)
    level, missing = enforcement(abi)
    sandbox = config.sandbox
    paths = {
        "read_write": [expand_home(p, home) for p in read_write],
        "read_only": [expand_home(p, home) for p in read_only],
    }
    # what the launcher adds at each start for the command's own files
    paths["command_readable"] = command_paths(
        [expand_home(w, home) for w in config.sidecar.command],
        expand_home(config.sidecar.working_directory, home),
        home,
        paths["read_write"] + paths["read_only"],
    )
    return {
        "enabled": sandbox.enabled,
        "required": sandbox.required,
        "landlock_abi": abi,
        "level": level if sandbox.enabled else "off",
        "not_enforced": missing if sandbox.enabled else [],
        **paths,
        "terminals": list(TERMINALS),
        "missing_paths": [p for p in paths["read_write"] + paths["read_only"] if not os.path.exists(p)],
        "tcp_connect": "any" if sandbox.tcp_connect is None else list(sandbox.tcp_connect),
        "tcp_bind": list(sandbox.tcp_bind),
        "would_start": not (sandbox.enabled and sandbox.required and abi == 0),
        "warnings": broad_write_warnings(config, home) if sandbox.enabled else [],
    }
