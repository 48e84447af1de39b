"""The launcher's side of the sandbox: build the Landlock ruleset, report what is enforced.

The ruleset is built in the launcher (opening every path there, so a missing path is
reported, not silently dropped) and applied in the forked child just before it execs the
sidecar: the domain then binds the sidecar and everything it starts, while the launcher
keeps its own access (D-Bus, the notify socket, signalling the sidecar). Import-light: the
launcher loads this only when the sandbox is on.
"""

from __future__ import annotations

import os

from . import landlock

ALL_FS = tuple(landlock.FS_RIGHTS)
READ_WRITE = tuple(r for r in ALL_FS if r != "ioctl_dev")  # ioctl on devices only for terminals
TERMINALS = ("/dev/tty", "/dev/pts", "/dev/ptmx")  # shells and agents need their ioctls
SCOPES = ("abstract_unix_socket", "signal")

# what each ABI step adds, in words for `partial: ...`
MISSING_TEXT = {
    "refer": "moving/linking files between directories (ABI 2)",
    "truncate": "truncate (ABI 3)",
    "ioctl_dev": "ioctl on devices (ABI 5)",
    "tcp": "TCP bind/connect rules (ABI 4)",
    "scope": "abstract unix socket and signal scoping (ABI 6)",
}


class SandboxRefused(RuntimeError):
    """sandbox.required is set and the kernel cannot enforce Landlock at all."""


def enforcement(abi: int) -> tuple[str, list[str]]:
    """("full" | "partial" | "none", what the kernel cannot enforce)."""
    if abi <= 0:
        return "none", ["Landlock (kernel without it, or not in the active LSM list)"]
    missing = [MISSING_TEXT[r] for r in landlock.unsupported(ALL_FS, landlock.FS_RIGHTS, abi)]
    if abi < 4:
        missing.append(MISSING_TEXT["tcp"])
    if abi < 6:
        missing.append(MISSING_TEXT["scope"])
    return ("partial" if missing else "full"), missing


class Prepared:
    """A ruleset ready to apply in the child, and the report for STATUS= and the journal."""

    def __init__(self, ruleset: landlock.Ruleset | None, abi: int, skipped: list[str]) -> None:
        self.ruleset = ruleset
        self.abi = abi
        self.level, self.missing = enforcement(abi) if ruleset else ("none", enforcement(0)[1])
        self.skipped = skipped

    def describe(self) -> str:
        text = f"sandbox {self.level}"
        if self.ruleset:
            text += f" (Landlock ABI {self.abi})"
        if self.missing:
            text += "; not enforced: " + ", ".join(self.missing)
        if self.skipped:
            text += "; paths not found, skipped: " + ", ".join(self.skipped)
        return text


def prepare(read_write: list[str], read_only: list[str], tcp_connect: tuple[int, ...] | None,
            tcp_bind: tuple[int, ...], required: bool) -> Prepared:
    cap = os.environ.get("AGOR_LANDLOCK_ABI")  # lets tests (and the curious) play an older kernel
    abi = landlock.abi_version(int(cap) if cap and cap.isdigit() else None)
    if abi <= 0:
        if required:
            raise SandboxRefused("sandbox required, but this kernel has no Landlock")
        return Prepared(None, 0, [])
    net = ("bind_tcp",) + (("connect_tcp",) if tcp_connect is not None else ())
    ruleset = landlock.Ruleset(abi, ALL_FS, net, SCOPES)
    skipped = []
    for paths, rights in ((read_only, landlock.READ_ONLY), (read_write, READ_WRITE), (TERMINALS, ALL_FS)):
        for path in paths:
            try:
                ruleset.allow_path(path, rights)
            except FileNotFoundError:
                skipped.append(path)
    for port in tcp_connect or ():
        ruleset.allow_port(port, ("connect_tcp",))
    for port in tcp_bind:
        ruleset.allow_port(port, ("bind_tcp",))
    return Prepared(ruleset, abi, [p for p in skipped if p not in TERMINALS])
