"""The sidecar's sandbox policy: which paths and ports it gets (pure; docs/sandbox.md).

The launcher turns these rules into a Landlock ruleset (sandbox.enforce); systemd's
ReadWritePaths= mirrors the read-write table (sandbox.hardening).
"""

from __future__ import annotations

from agor_systemd.config import Config
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
