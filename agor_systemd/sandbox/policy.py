"""The sidecar's sandbox policy: which paths and ports it gets (pure; docs/sandbox.md).

The launcher turns these rules into a Landlock ruleset (sandbox.enforce); systemd's
ReadWritePaths= mirrors the read-write table (sandbox.hardening).
"""

from __future__ import annotations

import os

from agor_systemd.config import Config, expand_home
from agor_systemd.sandbox.paths import contains_home
from agor_systemd.unitfile import HomePath, Text

# [sandbox] defaults, added to the configured lists (docs/sandbox.md)
SANDBOX_READ_WRITE: tuple[Text, ...] = (
    "/tmp",
    "/var/tmp",
    HomePath(".local/share/agor"),  # scratch space, sessions.db and btmsg.db
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/shm",
)
SANDBOX_READ_ONLY: tuple[Text, ...] = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    HomePath(".local"),
    HomePath(".config"),
    HomePath(".deno"),
    HomePath(".nvm"),
    HomePath(".gitconfig"),
    HomePath(".claude"),
)


def sandbox_paths(config: Config) -> tuple[tuple[Text, ...], tuple[Text, ...]]:
    """(read-write, read-only) paths of the sidecar's Landlock domain: defaults + configured; the
    working directory (the project the agents work in, as in agor) is read-write. The files the
    command names are added by the launcher at each start (sandbox.command_paths)."""
    read_write = (*SANDBOX_READ_WRITE, *config.sandbox.read_write_paths)
    if config.sidecar.working_directory not in read_write:
        read_write += (config.sidecar.working_directory,)
    return read_write, (*SANDBOX_READ_ONLY, *config.sandbox.read_only_paths)


def working_directory_problem(config: Config, home: str) -> str | None:
    """Why the sandbox cannot take the working directory as it is, or None.

    The working directory is read-write for the sidecar, so `~` (or `/`, or any parent of the
    home directory) would hand it the whole home directory, ~/.ssh included."""
    if not config.sandbox.enabled:
        return None
    path = os.path.normpath(expand_home(config.sidecar.working_directory, home))
    home = os.path.normpath(home)
    if not contains_home(path, home):
        return None
    what = "the home directory" if path == home else f"{path}, which contains the home directory"
    return (
        f"[sidecar] working_directory is {what}: the sandbox makes the working directory writable, "
        "which would open up every file in it (~/.ssh too); set it to a project directory "
        '(e.g. working_directory = "~/agor"), or turn the sandbox off with [sandbox] enabled = false'
    )
