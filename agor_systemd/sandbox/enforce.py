"""The launcher's side of the sandbox: build the Landlock ruleset, report what is enforced.

The ruleset is built in the launcher (opening every path there, so a missing path is
reported, not silently dropped) and applied in the forked child just before it execs the
sidecar: the domain then binds the sidecar and everything it starts, while the launcher
keeps its own access (D-Bus, the notify socket, signalling the sidecar). Import-light: the
launcher loads this only when the sandbox is on.
"""

from __future__ import annotations

import os

from agor_systemd.errors import AgorError
from agor_systemd.sandbox import landlock
from agor_systemd.sandbox.paths import beneath, contains_home

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


class SandboxRefused(AgorError, RuntimeError):
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


# A directory holding one of these is the root of the program's project: node resolves packages
# from node_modules beside or above the script, python from the project's own tree.
PROJECT_MARKERS = ("package.json", "node_modules", "pyproject.toml")


def interpreter(path: str) -> str | None:
    """The program a `#!` line at the top of `path` names (`env NAME` looked up on PATH)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env":
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        if not names:
            return None
        import shutil  # import cost: ~7 ms in the launcher, for a `#!/usr/bin/env NAME` script only

        return shutil.which(names[0])
    return words[0]


def command_files(command: tuple[str, ...] | list[str], cwd: str) -> list[str]:
    """The files the sidecar must be able to read to start: the program, every argument that names
    an existing file (relative ones from the working directory) and `#!` interpreters, resolved
    through symlinks, in order, without repeats."""
    files: list[str] = []
    todo = [word for i, word in enumerate(command) if i == 0 or "/" in word]
    while todo:
        word = todo.pop(0)
        path = os.path.realpath(os.path.join(cwd, word))
        if path in files or not os.path.isfile(path):
            continue
        files.append(path)
        if (program := interpreter(path)) is not None:
            todo.insert(0, program)
    return files


def readable_root(path: str, home: str) -> str:
    """What to make readable so the file at `path` works: its project (the nearest directory up
    with package.json, node_modules or pyproject.toml), or the prefix of a program in a bin/
    directory (a virtualenv, ~/.local, a node install), or else its directory; never the home
    directory or a parent of it (then the file alone)."""
    directory = os.path.dirname(path)
    if os.path.basename(directory) == "bin":
        directory = os.path.dirname(directory)
    candidate = directory
    while not contains_home(candidate, home) and candidate != "/":
        if any(os.path.exists(os.path.join(candidate, marker)) for marker in PROJECT_MARKERS):
            return candidate
        candidate = os.path.dirname(candidate)
    return path if contains_home(directory, home) or directory == "/" else directory


def command_paths(command: tuple[str, ...] | list[str], cwd: str, home: str, covered) -> list[str]:
    """Read-only paths to add so the command can start (command_files, each widened by
    readable_root), leaving out what the rules in `covered` already allow."""
    covered = [os.path.realpath(p) for p in covered]
    paths: list[str] = []
    for file in command_files(command, cwd):
        root = readable_root(file, home)
        if not beneath(file, covered) and root not in paths:
            paths.append(root)
    return paths


class Prepared:
    """A ruleset ready to apply in the child, and the report for STATUS= and the journal."""

    def __init__(
        self, ruleset: landlock.Ruleset | None, abi: int, skipped: list[str], command_read: list[str] | None = None
    ) -> None:
        self.ruleset = ruleset
        self.abi = abi
        self.level, self.missing = enforcement(abi) if ruleset else ("none", enforcement(0)[1])
        self.skipped = skipped
        self.command_read = command_read or []

    def describe(self) -> str:
        text = f"sandbox {self.level}"
        if self.ruleset:
            text += f" (Landlock ABI {self.abi})"
        if self.missing:
            text += "; not enforced: " + ", ".join(self.missing)
        if self.ruleset and self.command_read:
            text += "; readable for the command: " + ", ".join(self.command_read)
        if self.skipped:
            text += "; paths not found, skipped: " + ", ".join(self.skipped)
        return text


def prepare(
    read_write: list[str],
    read_only: list[str],
    tcp_connect: tuple[int, ...] | None,
    tcp_bind: tuple[int, ...],
    required: bool,
    command_read: list[str] | None = None,
    scopes: tuple[str, ...] = SCOPES,
) -> Prepared:
    """The ruleset for these rules; `command_read`: the command_paths, read-only too. `scopes`: the
    IPC the domain may not reach outside itself (abstract unix sockets, signals)."""
    cap = os.environ.get("AGOR_LANDLOCK_ABI")  # lets tests (and the curious) play an older kernel
    abi = landlock.abi_version(int(cap) if cap and cap.isdigit() else None)
    if abi <= 0:
        if required:
            raise SandboxRefused("sandbox required, but this kernel has no Landlock")
        return Prepared(None, 0, [])
    read_only = read_only + (command_read or [])
    net = ("bind_tcp",) + (("connect_tcp",) if tcp_connect is not None else ())
    ruleset = landlock.Ruleset(abi, ALL_FS, net, scopes)
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
    return Prepared(ruleset, abi, [p for p in skipped if p not in TERMINALS], command_read)


# how programs word a refused open/create: Python ("[Errno 13] Permission denied: '/x'"), node
# ("EACCES: permission denied, open '/x'"), coreutils and shells ("cat: /x: Permission denied")
DENIAL_WORDS = (b"ermission denied", b"EACCES", b"peration not permitted", b"EPERM", b"ead-only file system", b"EROFS")
_READ_ONLY_FS = ("read-only file system", "erofs")


def _quoted_or_bare_paths(text: str) -> list[str]:
    import re  # import cost: ~5 ms in the launcher, for a line that reports a denial only

    return [
        quoted or bare for quoted, bare in re.findall(r"""['"`‘](/[^'"`’]*)['"`’]|(?<![\w.~-])(/[^\s:'",;)]+)""", text)
    ]


def denial_hint(line: bytes, read_write, read_only) -> str | None:
    """Explain a line that reports a path the sandbox refused, or None.

    "permission denied: /home/u/secrets — outside the sandbox; add it to [sandbox] read_only_paths".
    A path inside the read-write rules was refused by file permissions, not by the sandbox: None.
    Writes outside the writable paths fail with EROFS (systemd's ProtectHome=/ProtectSystem=) or
    EACCES (Landlock)."""
    if not any(word in line for word in DENIAL_WORDS):  # most lines: no regex, no decoding
        return None
    text = line.decode("utf-8", "replace")
    lower = text.lower()
    read_only_fs = any(word in lower for word in _READ_ONLY_FS)
    for path in _quoted_or_bare_paths(text):
        path = os.path.normpath(path)
        if beneath(path, read_write):
            continue
        if read_only_fs or beneath(path, read_only):
            what = "read-only file system" if read_only_fs else "permission denied"
            return (
                f"{what}: {path} — not writable in the sandbox; add it (or its directory) to [sandbox] read_write_paths"
            )
        return (
            f"permission denied: {path} — outside the sandbox; add it to [sandbox] read_only_paths "
            "(read_write_paths if the sidecar writes there)"
        )
    return None


def _access_problems(command, cwd: str, check_cwd: bool) -> list[str]:
    """What the sidecar could not do to start, checked from the calling process."""
    import tempfile  # import cost: ~8 ms in the launcher, which never probes (install does)

    problems = []
    try:
        if check_cwd:
            os.listdir(cwd)
            fd, name = tempfile.mkstemp(prefix=".agor-units-probe.", dir=cwd)
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        problems.append(f"its working directory {cwd} is not writable ({e.strerror})")
    for path in command_files(command, cwd):
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            problems.append(f"it cannot read {path} ({e.strerror})")
    return problems


def probe_start(
    read_write: list[str], read_only: list[str], command: list[str], cwd: str, home: str, check_cwd: bool = True
) -> list[str]:
    """What would keep the sidecar from starting under the ruleset the launcher builds (the same
    rules and command_paths), checked in a forked child that enters that Landlock domain.
    Without Landlock the checks still run, unconfined. Empty: it can start. `check_cwd=False`:
    the working directory is made later (agor's data directory, by install)."""
    if check_cwd and not os.path.isdir(cwd):
        return [f"its working directory {cwd} does not exist"]
    readable = command_paths(command, cwd, home, (*read_write, *read_only))
    prepared = prepare(read_write, read_only, None, (), required=False, command_read=readable)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the caller's code
        try:
            if prepared.ruleset is not None:
                prepared.ruleset.restrict_self()
            problems = _access_problems(command, cwd, check_cwd)
            os.write(result_w, "\n".join(problems).encode("utf-8", "surrogateescape"))
        except BaseException as e:
            os.write(result_w, f"the probe failed: {e}".encode("utf-8", "surrogateescape"))
        finally:
            os._exit(0)
    os.close(result_w)
    if prepared.ruleset is not None:
        prepared.ruleset.close()
    with os.fdopen(result_r, "rb") as results:
        text = results.read().decode("utf-8", "surrogateescape")
    os.waitpid(pid, 0)
    return [line for line in text.split("\n") if line]
