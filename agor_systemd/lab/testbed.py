"""An ephemeral, real, unprivileged ``systemd --user`` manager for tests and demos.

Everything here runs as root and builds what logind and PID-1 systemd would normally provide, so
that a real user manager can run on a machine where systemd is installed but is not PID 1:

* :class:`LabNamespace` -- a private mount namespace with its own ``/run`` (a tmpfs holding the
  directories PID-1 systemd would create) and a private ``systemd-journald`` writing per-user
  journal files (``SplitMode=uid``) to a state directory.  Nothing in the host's ``/run``,
  ``/var/log/journal`` or ``/etc`` changes.  The journald process is the namespace's handle: when
  it exits, the namespace goes away.
* :class:`UserManager` -- ``systemd --user`` for one Unix user, started inside a lab namespace
  with a per-user runtime tmpfs (``/run/user/UID``) and a delegated cgroup2 subtree named
  ``<lab>.slice/user-UID.slice/user@UID.service`` (that name makes journald attach the user-unit
  fields, so ``journalctl --user -u UNIT`` works for the user).
* :class:`SystemdBuild` -- which systemd to run: the host's, or a private one extracted under
  ``/opt/agor-systemd/systemd-NNN`` by ``scripts/setup.sh`` (e.g. 254 from bookworm-backports).

Typical use::

    with LabNamespace() as ns, UserManager("agordemo", host_build(), ns) as mgr:
        mgr.write_file(".config/systemd/user/hello.service", "...")
        mgr.systemctl("daemon-reload", check=True)
        mgr.systemctl("start", "hello.service", check=True)
        print(mgr.journal_lines("hello.service"))

Rules this module follows (learnt the hard way):

* never ``daemon-reexec`` a manager: it re-executes the compiled-in ``/lib/systemd/systemd``, which
  silently swaps a private 254 for the host's build;
* a private build needs ``LD_LIBRARY_PATH`` for its tools and manager; the manager would hand it to
  every unit, so it is removed from the manager's environment right after start;
* the manager must be started with ``--log-target=journal`` or its own log lines are lost;
* failures raise :class:`LabError` with a one-line reason, and stopping never hangs and always
  cleans up what was created, also after a start that failed half-way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import filecmp
import os
import pwd
import re
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from agor_systemd.errors import AgorError

__all__ = [
    "DEFAULT_PATH",
    "OPT_ROOT",
    "USER_LOCKS",
    "LabCommandError",
    "LabError",
    "LabNamespace",
    "SystemdBuild",
    "UserManager",
    "available_builds",
    "cgroup_layout",
    "ensure_user",
    "host_build",
    "sweep_stale_labs",
]

#: Where ``scripts/setup.sh`` puts private systemd builds (``systemd-NNN``) and the virtualenv;
#: ``$AGOR_PREFIX`` as in setup.sh (several work trees on one machine each test their own copy).
OPT_ROOT = Path(os.environ.get("AGOR_PREFIX") or "/opt/agor-systemd")
#: Name locks for test, demo and bench users: one directory per machine whatever the prefix, since
#: user names are machine-wide.
USER_LOCKS = Path("/opt/agor-systemd/locks")
#: ``PATH`` given to the manager and to commands run as the user.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_HOST_JOURNALD_CANDIDATES = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")


class LabError(AgorError, RuntimeError):
    """The lab could not do what was asked; the message is a one-line reason."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A command run with ``check=True`` failed; the message includes its stderr."""

    def __init__(
        self, returncode: int, cmd: Sequence[str], output: str | None = None, stderr: str | None = None
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(cmd), output, stderr)

    def __str__(self) -> str:
        detail = (self.stderr or self.stdout or "").strip().replace("\n", " | ")
        cmd = " ".join(str(c) for c in self.cmd)
        return f"{cmd} failed (rc={self.returncode})" + (f": {detail}" if detail else "")


# --------------------------------------------------------------------------------------------
# systemd builds
# --------------------------------------------------------------------------------------------


def _first_existing(root: Path, candidates: Sequence[str]) -> Path:
    for rel in candidates:
        p = root / rel
        if p.exists():
            return p
    return root / candidates[0]


@dataclasses.dataclass(frozen=True)
class SystemdBuild:
    """One systemd installation: the host's (``prefix is None``) or one extracted under a prefix.

    ``version`` is the major version (252, 254, 257, ...); ``full_version`` is what
    ``systemd --version`` prints in parentheses, e.g. ``252.39-1~deb12u2``.
    """

    version: int
    prefix: Path | None = None
    full_version: str = ""

    @property
    def is_host(self) -> bool:
        return self.prefix is None

    @property
    def root(self) -> Path:
        return self.prefix if self.prefix is not None else Path("/")

    @property
    def name(self) -> str:
        """A short identifier such as ``systemd254`` (used for test ids)."""
        return f"systemd{self.version}"

    def _tool(self, name: str, *dirs: str) -> Path:
        return _first_existing(self.root, [f"{d}/{name}" for d in dirs])

    @property
    def manager(self) -> Path:
        """The manager binary (``lib/systemd/systemd``)."""
        return self._tool("systemd", "lib/systemd", "usr/lib/systemd")

    @property
    def systemctl(self) -> Path:
        return self._tool("systemctl", "bin", "usr/bin")

    @property
    def journalctl(self) -> Path:
        return self._tool("journalctl", "bin", "usr/bin")

    @property
    def systemd_analyze(self) -> Path:
        return self._tool("systemd-analyze", "usr/bin", "bin")

    @property
    def systemd_run(self) -> Path:
        return self._tool("systemd-run", "usr/bin", "bin")

    @property
    def library_path(self) -> str | None:
        """``LD_LIBRARY_PATH`` the build's binaries need, or None for the host build.

        Private builds carry ``libsystemd-shared-NNN.so`` in ``usr/lib/<multiarch>/systemd`` but
        their RUNPATH points at the host's copy of that directory.
        """
        if self.prefix is None:
            return None
        for pattern in (
            "usr/lib/*/systemd/libsystemd-shared-*.so",
            "lib/*/systemd/libsystemd-shared-*.so",
            "usr/lib/systemd/libsystemd-shared-*.so",
        ):
            for hit in sorted(self.prefix.glob(pattern)):
                return str(hit.parent)
        return None

    def manager_command(self) -> list[str]:
        """argv prefix that starts the manager binary with the build's libraries.

        For a private build the manager is started through the dynamic loader with
        ``--library-path`` instead of ``LD_LIBRARY_PATH``: a manager copies the environment it was
        started with into every unit, and ``systemctl --user unset-environment`` cannot remove
        variables the manager inherited (it only edits the client-set environment).
        """
        lp = self.library_path
        if lp is None:
            return [str(self.manager)]
        interp = _elf_interpreter(self.manager)
        if interp is None:
            raise LabError(f"cannot find the ELF interpreter of {self.manager}")
        return [interp, "--library-path", lp, str(self.manager)]

    def tool_env(self) -> dict[str, str]:
        """Environment additions needed to run this build's own binaries."""
        lp = self.library_path
        return {"LD_LIBRARY_PATH": lp} if lp else {}

    @classmethod
    def probe(cls, prefix: Path | None = None) -> SystemdBuild:
        """Run ``systemd --version`` of the installation at *prefix* (None: host) and describe it."""
        stub = cls(version=0, prefix=prefix)
        binary = stub.manager
        if not binary.exists():
            raise LabError(f"no systemd manager binary at {binary}")
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **stub.tool_env()}
        try:
            out = subprocess.run(
                [str(binary), "--version"], capture_output=True, text=True, env=env, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LabError(f"cannot run {binary} --version: {e}") from e
        m = re.match(r"systemd (\d+) \(([^)]*)\)", out.stdout)
        if out.returncode != 0 or not m:
            detail = (out.stderr or out.stdout).strip().splitlines()
            raise LabError(f"{binary} --version failed (rc={out.returncode}): {detail[0] if detail else 'no output'}")
        return cls(version=int(m.group(1)), prefix=prefix, full_version=m.group(2))


def _elf_interpreter(binary: Path) -> str | None:
    """The PT_INTERP path (dynamic loader) of an ELF executable, or None."""
    try:
        with open(binary, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return None
            is64, order = head[4] == 2, "<" if head[5] == 1 else ">"
            if is64:
                (phoff,) = struct.unpack_from(order + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
            else:
                (phoff,) = struct.unpack_from(order + "I", head, 28)
                phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                entry = table[i * phentsize : (i + 1) * phentsize]
                if struct.unpack_from(order + "I", entry, 0)[0] != 3:  # PT_INTERP
                    continue
                if is64:
                    (off,) = struct.unpack_from(order + "Q", entry, 8)
                    (size,) = struct.unpack_from(order + "Q", entry, 32)
                else:
                    (off,) = struct.unpack_from(order + "I", entry, 4)
                    (size,) = struct.unpack_from(order + "I", entry, 16)
                f.seek(off)
                return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def host_build() -> SystemdBuild:
    """The systemd installed on this machine; :class:`LabError` if there is none."""
    return SystemdBuild.probe(None)


def available_builds(opt_root: Path = OPT_ROOT) -> list[SystemdBuild]:
    """The host build plus every private build in ``opt_root/systemd-*``, one per version.

    The host build wins a tie.  Builds that do not run are left out.  Sorted by version.
    """
    builds: dict[int, SystemdBuild] = {}
    with contextlib.suppress(LabError):
        host = host_build()
        builds[host.version] = host
    if opt_root.is_dir():
        for d in sorted(opt_root.glob("systemd-*")):
            if not d.is_dir():
                continue
            try:
                b = SystemdBuild.probe(d)
            except LabError:
                continue
            builds.setdefault(b.version, b)
    return [builds[v] for v in sorted(builds)]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _run_root(
    argv: Sequence[str], *, timeout: float = 30, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command as root (this process); LabError with its stderr when *check* fails."""
    try:
        cp = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)} timed out after {timeout}s") from e
    except OSError as e:
        raise LabError(f"cannot run {argv[0]}: {e}") from e
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip().replace("\n", " | ")
        raise LabError(f"{' '.join(argv)} failed (rc={cp.returncode}): {msg}")
    return cp


def ensure_user(name: str, *, attempts: int = 20) -> pwd.struct_passwd:
    """Return the passwd entry of *name*, creating the user (``useradd -m``) if needed.

    Retries while another process holds the passwd lock (parallel test workers).
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", name):
        raise LabError(f"invalid user name {name!r} (lowercase, at most 31 characters)")
    last = ""
    for i in range(attempts):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        if os.geteuid() != 0:
            raise LabError(f"user {name} does not exist and creating it needs root")
        cp = _run_root(["useradd", "-m", "-U", "-s", "/bin/sh", "-c", "agor-systemd lab user", name], check=False)
        if cp.returncode in (0, 9):  # 9: already exists (created concurrently)
            continue
        last = (cp.stderr or cp.stdout).strip().replace("\n", " | ")
        time.sleep(0.05 * (i + 1))  # 10: cannot lock /etc/passwd -- someone else is adding a user
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LabError(f"cannot create user {name}: {last}") from None


@dataclasses.dataclass(frozen=True)
class CgroupLayout:
    """Where cgroup2 is mounted, and the v1 ``name=systemd`` hierarchy on hybrid hosts."""

    unified: Path
    legacy: Path | None

    @property
    def hybrid(self) -> bool:
        return self.unified != _CGROUP_ROOT


def cgroup_layout(root: Path = _CGROUP_ROOT) -> CgroupLayout:
    """Detect pure cgroup2 (``/sys/fs/cgroup``) or hybrid (``/sys/fs/cgroup/unified``)."""
    if (root / "cgroup.controllers").exists():
        return CgroupLayout(unified=root, legacy=None)
    if (root / "unified" / "cgroup.controllers").exists():
        legacy = root / "systemd"
        return CgroupLayout(unified=root / "unified", legacy=legacy if (legacy / "cgroup.procs").exists() else None)
    raise LabError(
        "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified "
        "(a user manager needs a delegated cgroup2 subtree)"
    )


def _cgroup_populated(cg: Path) -> bool:
    try:
        text = (cg / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in text


def _cgroup_pids(cg: Path) -> list[int]:
    pids: list[int] = []
    if not cg.is_dir():
        return pids
    for procs in cg.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.extend(int(x) for x in procs.read_text().split())
    return pids


def _rmdir_tree(cg: Path) -> None:
    """Remove a cgroup directory and its children (cgroup dirs contain only kernel files)."""
    if not cg.is_dir():
        return
    dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, cg]:
        with contextlib.suppress(FileNotFoundError):
            try:
                d.rmdir()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise


def _kill_wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after *timeout*; always reaps."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _proc_start_time(pid: int) -> str | None:
    """Start time of *pid* (field 22 of /proc/PID/stat), to tell a live process from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    return _proc_start_time(pid) == start


def sweep_stale_labs(state_root: Path | str | None = None) -> list[str]:
    """Remove what labs of dead processes left behind (their owner was SIGKILLed, say).

    Kills the journald and every process in the lab's cgroups, removes the cgroups and the state
    directory.  Labs whose owning process still runs are left alone.  Returns the tokens swept.
    """
    root = Path(state_root) if state_root is not None else Path(tempfile.gettempdir())
    swept: list[str] = []
    for d in sorted(root.glob("agor-lab-*")):
        try:
            fields = (d / "owner").read_text().split()
            owner_pid, owner_start = int(fields[0]), fields[1]
        except (OSError, IndexError, ValueError):
            continue
        if _alive(owner_pid, owner_start):
            continue
        token = d.name.split("-")[2]
        if len(fields) >= 4 and _alive(int(fields[2]), fields[3]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(fields[2]), signal.SIGKILL)
        with contextlib.suppress(LabError):
            layout = cgroup_layout()
            for base in (layout.unified, layout.legacy):
                if base is None:
                    continue
                cg = base / f"agorlab{token}.slice"
                if not cg.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    (cg / "cgroup.kill").write_text("1")
                for pid in _cgroup_pids(cg):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _cgroup_pids(cg) and time.monotonic() < deadline:
                    time.sleep(0.02)
                with contextlib.suppress(OSError):
                    _rmdir_tree(cg)
        shutil.rmtree(d, ignore_errors=True)
        swept.append(token)
    return swept


# --------------------------------------------------------------------------------------------
# the namespace
# --------------------------------------------------------------------------------------------

_JOURNALD_CONF = """\
[Journal]
Storage=persistent
SplitMode=uid
ReadKMsg=no
RateLimitIntervalSec=0
"""

# Runs as the namespace's first process (root, private mount namespace), then becomes journald.
_NS_INIT = r"""
set -e
state=$1 journald=$2
mount -t tmpfs -o mode=755,nosuid,nodev agor-lab-run /run
mkdir -p /run/systemd/system /run/systemd/journal /run/systemd/journald.conf.d /run/log/journal \
         /run/user /run/lock /run/credentials
chmod 1777 /run/lock
mkdir -m 0555 /run/systemd/mount-rootfs   # systemd >= 254 sandboxing root; user managers can't create it
mkdir -m 0700 /run/systemd/unit-root      # systemd 252 sandboxing root
touch /run/systemd/journal/flushed        # journald writes to /var/log/journal at once (per-uid files)
cp "$state/journald.conf" /run/systemd/journald.conf.d/50-agor-lab.conf
mount --bind "$state/log" /var/log
exec "$journald"
"""


class LabNamespace:
    """A private mount namespace with its own ``/run`` and a private journald.

    Use as a context manager (or call :meth:`start` / :meth:`stop`).  :attr:`pid` (journald's PID)
    is the handle: commands enter the namespace with ``nsenter -t PID -m`` (:meth:`nsenter`), and
    files inside it are reachable from the host at :meth:`path`.  Journal files are written to
    ``state_dir/log/journal`` and can be read from the host with ``journalctl -D``.
    """

    def __init__(
        self, *, state_root: Path | str | None = None, journald: Path | str | None = None, ready_timeout: float = 10.0
    ) -> None:
        self.token = secrets.token_hex(3)
        self._state_root = Path(state_root) if state_root is not None else None
        self._journald = Path(journald) if journald is not None else None
        self.ready_timeout = ready_timeout
        self.state_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._managers: list[UserManager] = []
        self._users_in_use: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.stop()
        else:  # clean up, but do not hide the original error
            with contextlib.suppress(Exception):
                self.stop()

    def start(self) -> Self:
        if self._proc is not None:
            raise LabError("lab namespace already started")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates mount namespaces and cgroups)")
        journald = self._journald or next((Path(p) for p in _HOST_JOURNALD_CANDIDATES if Path(p).exists()), None)
        if journald is None or not journald.exists():
            raise LabError("systemd-journald not found (is systemd installed?)")
        for tool in ("unshare", "nsenter", "setpriv", "mount", "umount"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found (apt-get install util-linux mount)")
        with contextlib.suppress(Exception):
            sweep_stale_labs(self._state_root)
        try:
            self.state_dir = Path(tempfile.mkdtemp(prefix=f"agor-lab-{self.token}-", dir=self._state_root))
            me = f"{os.getpid()} {_proc_start_time(os.getpid())}"
            (self.state_dir / "owner").write_text(me + "\n")
            self.state_dir.chmod(0o755)
            log = self.state_dir / "log"
            jdir = log / "journal"
            jdir.mkdir(parents=True)
            log.chmod(0o755)
            with contextlib.suppress(KeyError):
                import grp

                os.chown(jdir, 0, grp.getgrnam("systemd-journal").gr_gid)
            jdir.chmod(0o2755)
            (self.state_dir / "journald.conf").write_text(_JOURNALD_CONF)
            out = open(self.state_dir / "journald.out", "wb")  # noqa: SIM115 - handed to Popen
            try:
                self._proc = subprocess.Popen(
                    [
                        "unshare",
                        "-m",
                        "--propagation",
                        "private",
                        "--",
                        "/bin/sh",
                        "-c",
                        _NS_INIT,
                        "agor-lab-init",
                        str(self.state_dir),
                        str(journald),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                )
            finally:
                out.close()
            jpid = self._proc.pid
            (self.state_dir / "owner").write_text(f"{me} {jpid} {_proc_start_time(jpid)}\n")
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.state_dir is not None
        deadline = time.monotonic() + self.ready_timeout
        sock = self.path("/run/systemd/journal/stdout")
        while True:
            if self._proc.poll() is not None:
                raise LabError(
                    f"lab journald exited with status {self._proc.returncode}: "
                    + _tail(self.state_dir / "journald.out", 5).replace("\n", " | ")
                )
            with contextlib.suppress(OSError):
                if sock.is_socket() and any(self.journal_dir.glob("*/system.journal")):
                    return
            if time.monotonic() > deadline:
                raise LabError(
                    f"lab journald not ready after {self.ready_timeout}s: "
                    + _tail(self.state_dir / "journald.out", 5).replace("\n", " | ")
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the managers still running in the lab, journald, and remove the state dir."""
        errors: list[str] = []
        for mgr in list(self._managers):
            try:
                mgr.stop()
            except Exception as e:  # keep going: everything must be cleaned up
                errors.append(f"{mgr.user}: {e}")
        self._managers.clear()
        if self._proc is not None:
            _kill_wait(self._proc, timeout=5)
            self._proc = None
        with contextlib.suppress(LabError):
            layout = cgroup_layout()
            for base in (layout.unified, layout.legacy):
                if base is not None:
                    with contextlib.suppress(OSError):
                        (base / self.cgroup_parent).rmdir()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
        if errors:
            raise LabError("lab stop: " + "; ".join(errors))

    # -- access ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of the lab's journald, which holds the namespace."""
        if self._proc is None:
            raise LabError("lab namespace is not running")
        return self._proc.pid

    @property
    def journal_dir(self) -> Path:
        """Host path of the lab's ``/var/log/journal`` (pass ``-D`` this/<machine-id>)."""
        if self.state_dir is None:
            raise LabError("lab namespace is not running")
        return self.state_dir / "log" / "journal"

    @property
    def cgroup_parent(self) -> str:
        """Name of the slice that holds this lab's user managers (unique per lab)."""
        return f"agorlab{self.token}.slice"

    def nsenter(self, wd: str | Path | None = None) -> list[str]:
        """Command prefix that runs a command inside the namespace (as the caller, root).

        Entering a mount namespace resets the working directory to ``/``: pass *wd* to start the
        command elsewhere.  ``-r`` keeps the lab's root directory (matters when the lab was made
        inside a chroot).
        """
        return ["nsenter", "-t", str(self.pid), "-m", "-r", *([f"--wd={wd}"] if wd is not None else [])]

    def path(self, inside: str | Path) -> Path:
        """Host path of an absolute path inside the namespace (via ``/proc/PID/root``)."""
        return Path(f"/proc/{self.pid}/root") / str(inside).lstrip("/")

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* as root inside the namespace."""
        return _run_root([*self.nsenter(), *argv], timeout=timeout, check=check, input=input)

    def sync_journal(self) -> None:
        """Ask the lab journald to write out everything it has received (``journalctl --sync``)."""
        self.run(["journalctl", "--sync"], timeout=15, check=False)

    # -- bookkeeping for UserManager ---------------------------------------------------------------

    def _register(self, mgr: UserManager) -> None:
        if mgr.uid in self._users_in_use:
            raise LabError(f"user {mgr.user} already has a manager in this lab")
        self._users_in_use.add(mgr.uid)
        self._managers.append(mgr)

    def _unregister(self, mgr: UserManager) -> None:
        self._users_in_use.discard(mgr.uid)
        with contextlib.suppress(ValueError):
            self._managers.remove(mgr)


# --------------------------------------------------------------------------------------------
# the user manager
# --------------------------------------------------------------------------------------------


class UserManager:
    """A real ``systemd --user`` for *user* running inside *namespace*.

    Start it with ``with UserManager(...) as mgr`` (or :meth:`start` / :meth:`stop`).  Commands run
    as the user inside the namespace with :meth:`run`, :meth:`systemctl` and :meth:`journalctl`.
    """

    def __init__(
        self,
        user: str,
        build: SystemdBuild,
        namespace: LabNamespace,
        *,
        create_user: bool = True,
        ready_timeout: float = 20.0,
        runtime_size: str = "64M",
    ) -> None:
        if create_user:
            pw = ensure_user(user)
        else:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise LabError(f"user {user} does not exist") from None
        self.user = user
        self.uid = pw.pw_uid
        self.gid = pw.pw_gid
        self.home = Path(pw.pw_dir)
        self.build = build
        self.namespace = namespace
        self.ready_timeout = ready_timeout
        self.runtime_size = runtime_size
        self.runtime_dir = Path(f"/run/user/{self.uid}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._registered = False
        self._runtime_mounted = False
        self._cgroups_created = False
        self._layout = cgroup_layout()
        parent, uslice, svc = namespace.cgroup_parent, f"user-{self.uid}.slice", f"user@{self.uid}.service"
        self.cgroup = self._layout.unified / parent / uslice / svc
        self.legacy_cgroup = (self._layout.legacy / parent / uslice / svc) if self._layout.legacy else None
        self.log_path: Path | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # -- properties -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.build.version

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LabError(f"manager of {self.user} is not running")
        return self._proc.pid

    @property
    def unit_dir(self) -> Path:
        """``~/.config/systemd/user`` of the user."""
        return self.home / ".config" / "systemd" / "user"

    @property
    def config_file(self) -> Path:
        """``~/.config/agor/units.toml`` of the user (agor-units' settings)."""
        return self.home / ".config" / "agor" / "units.toml"

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, *, build_tools: bool = False) -> dict[str, str]:
        """Environment of a command run as the user (like a login session would have).

        With *build_tools*, adds what the build's own binaries need (``LD_LIBRARY_PATH``).
        """
        env = {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": "/bin/sh",
            "PATH": DEFAULT_PATH,
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
        }
        if build_tools:
            env.update(self.build.tool_env())
        return env

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.stop()
        else:  # clean up, but do not hide the original error
            with contextlib.suppress(Exception):
                self.stop()

    def start(self) -> Self:
        if self._proc is not None:
            raise LabError(f"manager of {self.user} already started")
        ns = self.namespace
        if not ns.running:
            raise LabError("lab namespace is not running")
        t0 = time.monotonic()
        ns._register(self)
        self._registered = True
        try:
            self._setup_runtime_dir()
            self._setup_cgroups()
            self._spawn()
            self._wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _setup_runtime_dir(self) -> None:
        ns, rt = self.namespace, str(self.runtime_dir)
        if ns.path(rt).exists():
            raise LabError(f"{rt} already exists in the lab namespace")
        ns.run(["mkdir", "-p", "-m", "0700", rt])
        ns.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"mode=0700,uid={self.uid},gid={self.gid},size={self.runtime_size},nosuid,nodev",
                f"agor-lab-user-{self.uid}",
                rt,
            ]
        )
        self._runtime_mounted = True

    def _setup_cgroups(self) -> None:
        for base, target in ((self._layout.unified, self.cgroup), (self._layout.legacy, self.legacy_cgroup)):
            if base is None or target is None:
                continue
            if target.parent.exists():
                raise LabError(f"cgroup {target.parent} already exists (another manager for uid {self.uid}?)")
            self._cgroups_created = True
            target.mkdir(parents=True, exist_ok=True)
            # delegate: the manager owns its cgroup and the files it needs to write
            os.chown(target, self.uid, self.gid)
            for f in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks"):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(target / f, self.uid, self.gid)
        self._enable_controllers()

    def _enable_controllers(self) -> None:
        """Best effort: pass the available controllers down to the delegated subtree."""
        lab_slice = self.cgroup.parent.parent
        for cg in (lab_slice, self.cgroup.parent):
            try:
                available = (cg / "cgroup.controllers").read_text().split()
            except OSError:
                return
            for c in available:
                with contextlib.suppress(OSError):
                    (cg / "cgroup.subtree_control").write_text(f"+{c}")

    def _spawn(self) -> None:
        ns = self.namespace
        assert ns.state_dir is not None
        self.log_path = ns.state_dir / f"manager-{self.user}.log"
        env = self.env()
        del env["DBUS_SESSION_BUS_ADDRESS"]  # the manager sets up its own bus environment
        inner = [
            *ns.nsenter(),
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in env.items()),
            *self.build.manager_command(),
            "--user",
            "--log-target=journal",
        ]
        legacy_procs = str(self.legacy_cgroup / "cgroup.procs") if self.legacy_cgroup else ""
        # The shell moves itself into the delegated cgroup(s) and then execs: nsenter and setpriv
        # exec too, so the PID in the cgroup is the manager's, and we are its parent (reaping).
        script = 'echo $$ > "$1"; [ -z "$2" ] || echo $$ > "$2"; shift 2; exec "$@"'
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "agor-lab-mgr", str(self.cgroup / "cgroup.procs"), legacy_procs, *inner],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        private = self.namespace.path(self.runtime_dir / "systemd" / "private")
        state = ""
        while True:
            if self._proc.poll() is not None:
                raise LabError(
                    f"systemd {self.version} --user for {self.user} exited with status "
                    f"{self._proc.returncode}: {self._failure_log()}"
                )
            if private.is_socket():
                cp = self.systemctl("is-system-running", timeout=10)
                state = cp.stdout.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise LabError(
                    f"systemd {self.version} --user for {self.user} not ready after "
                    f"{self.ready_timeout}s (state {state or 'no socket'}): {self._failure_log()}"
                )
            time.sleep(0.02)

    def _failure_log(self) -> str:
        lines = []
        if self.log_path is not None:
            lines += _tail(self.log_path, 10).splitlines()
        with contextlib.suppress(Exception):
            lines += self.manager_log(lines=15)
        return " | ".join(line for line in lines if line.strip()) or "no log output"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the manager and remove its cgroups and runtime dir.  Never hangs; idempotent."""
        t0 = time.monotonic()
        problems: list[str] = []
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self.systemctl("exit", timeout=5)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"manager did not exit within {timeout}s, killed")
                self._kill_cgroup()
                _kill_wait(proc, timeout=2)
        elif proc is not None:
            proc.wait()
        self._proc = None
        # the units' processes: the manager stops them on exit, but be sure
        deadline = time.monotonic() + 5
        while _cgroup_populated(self.cgroup) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _cgroup_populated(self.cgroup):
            problems.append("cgroup still populated after the manager exited, killed its processes")
            self._kill_cgroup()
        # our user-UID.slice subtree; then the lab's slice if no other manager uses it any more
        for cg in (self.cgroup.parent, self.legacy_cgroup.parent if self.legacy_cgroup else None):
            if cg is None or not self._cgroups_created:
                continue
            try:
                _rmdir_tree(cg)
            except OSError as e:
                problems.append(f"cannot remove {cg}: {e}")
            with contextlib.suppress(OSError):
                cg.parent.rmdir()
        if self._runtime_mounted and self.namespace.running:
            rt = str(self.runtime_dir)
            cp = self.namespace.run(["umount", rt], check=False)
            if cp.returncode != 0:
                self.namespace.run(["umount", "-l", rt], check=False)
            self.namespace.run(["rmdir", rt], check=False)
        self._runtime_mounted = False
        if self._registered:
            self.namespace._unregister(self)
            self._registered = False
        self._cgroups_created = False
        self.stop_seconds = time.monotonic() - t0
        if problems:
            raise LabError(f"stopping the manager of {self.user}: " + "; ".join(problems))

    def _kill_cgroup(self) -> None:
        for cg in (self.cgroup, self.legacy_cgroup):
            if cg is None:
                continue
            kill = cg / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            for pid in _cgroup_pids(cg):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _cgroup_populated(self.cgroup) and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- commands as the user -------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str | bytes | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = 60,
        check: bool = False,
        build_tools: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* as the user inside the lab namespace; returns the completed process (text).

        The environment is :meth:`env` updated with *env*.  With *check*, a non-zero exit raises
        :class:`LabCommandError` (a :class:`subprocess.CalledProcessError` too); a timeout raises
        :class:`LabError` (the command is killed).
        """
        full_env = self.env(build_tools=build_tools)
        if env:
            full_env.update(env)
        cmd = [
            *self.namespace.nsenter(wd=self.home),
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *(a if isinstance(a, bytes) else str(a) for a in argv),
        ]
        try:
            cp = subprocess.run(
                cmd,
                env=full_env,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{' '.join(map(str, argv))} (as {self.user}) timed out after {timeout}s") from e
        if check and cp.returncode != 0:
            raise LabCommandError(cp.returncode, [str(a) for a in argv], cp.stdout, cp.stderr)
        return cp

    def systemctl(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` with the build's own systemctl (never use ``daemon-reexec``)."""
        if "daemon-reexec" in args:
            raise LabError("daemon-reexec would replace the manager with the host's systemd binary")
        return self.run([str(self.build.systemctl), "--user", "--no-pager", *args], build_tools=True, **kw)  # type: ignore[arg-type]

    def journalctl(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """``journalctl ARGS`` as the user with the build's own journalctl (add ``--user`` yourself)."""
        return self.run([str(self.build.journalctl), "--no-pager", *args], build_tools=True, **kw)  # type: ignore[arg-type]

    def journal_lines(self, unit: str, *, sync: bool = True, identifier: str | None = None) -> list[str]:
        """Messages logged for user unit *unit* (``journalctl --user -u UNIT -o cat`` as the user).

        This includes the unit's stdout/stderr and the manager's messages about it.  A process
        that exits right after writing can lose its unit attribution (journald reads the sender's
        cgroup when the line arrives): pass its ``SyslogIdentifier=`` as *identifier* to select
        its lines by that instead (``-t``), which is always recorded.  With *sync*, the lab
        journald first writes out everything it has received.
        """
        if sync:
            self.namespace.sync_journal()
        select = ["-t", identifier] if identifier else ["-u", unit]
        cp = self.journalctl("--user", *select, "-o", "cat", timeout=30)
        if cp.returncode != 0 and "No entries" not in cp.stdout + cp.stderr:
            raise LabError(f"journalctl --user {' '.join(select)} failed (rc={cp.returncode}): {cp.stderr.strip()}")
        return [line for line in cp.stdout.splitlines() if line != "-- No entries --"]

    def wait_journal(self, unit: str, needle: str, *, timeout: float = 10.0) -> list[str]:
        """Poll :meth:`journal_lines` until a line contains *needle*; LabError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.journal_lines(unit)
            if any(needle in line for line in lines):
                return lines
            if time.monotonic() > deadline:
                raise LabError(
                    f"{needle!r} not in the journal of {unit} after {timeout}s ({len(lines)} lines: {lines[-5:]})"
                )
            time.sleep(0.05)

    def manager_log(self, *, lines: int = 200) -> list[str]:
        """The manager's own journal messages (read as root from the lab's journal files)."""
        ns = self.namespace
        if self._proc is None or not ns.running:
            return []
        cp = ns.run(
            ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), f"_PID={self._proc.pid}"],
            check=False,
            timeout=15,
        )
        return [ln for ln in cp.stdout.splitlines() if ln != "-- No entries --"]

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl --user show -p PROP --value UNIT``)."""
        cp = self.systemctl("show", "-p", prop, "--value", unit, timeout=15)
        if cp.returncode != 0:
            raise LabError(f"systemctl --user show {unit} failed: {cp.stderr.strip()}")
        return cp.stdout.strip()

    def wait_property(self, unit: str, prop: str, values: str | Sequence[str], *, timeout: float = 10.0) -> str:
        """Poll until ``prop`` of *unit* is one of *values*; returns it, LabError on timeout."""
        wanted = (values,) if isinstance(values, str) else tuple(values)
        deadline = time.monotonic() + timeout
        while True:
            value = self.unit_property(unit, prop)
            if value in wanted:
                return value
            if time.monotonic() > deadline:
                raise LabError(f"{unit} {prop}={value!r}, expected {' or '.join(wanted)} within {timeout}s")
            time.sleep(0.05)

    # -- files ----------------------------------------------------------------------------------

    def write_file(self, path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
        """Write *text* to *path* (relative to the user's home), creating parents; owned by the user."""
        rel = Path(path)
        if rel.is_absolute() or ".." in rel.parts:
            raise LabError(f"write_file wants a path relative to the home directory, got {path}")
        target = self.home / rel
        cur = self.home
        for part in rel.parts[:-1]:
            cur = cur / part
            if not cur.is_dir():
                cur.mkdir(mode=0o755)
                os.chown(cur, self.uid, self.gid)
        tmp = target.with_name(f".{target.name}.agor-tmp")
        tmp.write_text(text)
        os.chown(tmp, self.uid, self.gid)
        tmp.chmod(mode)
        os.replace(tmp, target)
        return target

    def reset(self, *, unit_globs: Sequence[str] = ("agor-*", "run-*")) -> list[str]:
        """Bring the manager back to a clean state between tests; returns the units it stopped.

        Stops every unit defined in ``~/.config/systemd/user`` and every loaded unit matching
        *unit_globs* (transient ``systemd-run`` units are ``run-*``), removes
        ``~/.config/systemd/user`` and ``~/.config/agor/units.toml``, resets failed units and reloads.
        """
        names: set[str] = set()
        if self.unit_dir.is_dir():
            for p in self.unit_dir.iterdir():
                name = p.name.removesuffix(".d").removesuffix(".wants").removesuffix(".requires")
                if "." in name and not p.name.endswith((".wants", ".requires")):
                    names.add(name)
        cp = self.systemctl("list-units", "--all", "--plain", "--no-legend", *unit_globs, timeout=15)
        for line in cp.stdout.splitlines():
            fields = line.split()
            if fields:
                names.add(fields[0].lstrip("●"))
        names = {n for n in names if n}
        if names:
            self.systemctl("stop", *sorted(names), timeout=30)
        shutil.rmtree(self.unit_dir, ignore_errors=True)
        self.config_file.unlink(missing_ok=True)
        self.systemctl("reset-failed", timeout=15)
        self.systemctl("daemon-reload", check=True, timeout=30)
        return sorted(names)

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self._proc is not None else "stopped"
        return f"<UserManager {self.user} uid={self.uid} systemd {self.version} {state}>"


@contextlib.contextmanager
def lab(user: str, build: SystemdBuild | None = None) -> Iterator[UserManager]:
    """One-shot convenience: a lab namespace with one user manager (host build by default)."""
    with LabNamespace() as ns, UserManager(user, build or host_build(), ns) as mgr:
        yield mgr


def claim_name(names: Iterable[str], lock_dir: Path, prefix: str = "user-") -> tuple[str, IO[str]] | None:
    """The first of `names` no other process holds, with the open lock file that holds it (keep
    it open as long as the name is in use); None when all are taken."""
    lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in names:
        lock = open(lock_dir / f"{prefix}{name}.lock", "w")  # noqa: SIM115 - returned to the caller
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return name, lock
    return None


# -- the project's code for test users -----------------------------------------------------------
# Units run OPT_ROOT/venv/bin/python; test sessions and benchmarks copy the working tree's package
# over the venv's installed copy so the units run the code under test.

VENV = OPT_ROOT / "venv"


def venv_site(venv: Path = VENV) -> Path:
    """The venv's site-packages holding an installed agor_systemd (LabError if it is unusable)."""
    python = venv / "bin" / "python"
    try:
        cp = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        raise LabError(f"{venv} is missing: run scripts/setup.sh first (as root)") from None
    if cp.returncode != 0:
        raise LabError(f"{python} does not run ({cp.stderr.strip()}): run scripts/setup.sh again")
    site = Path(cp.stdout.strip())
    if not (site / "agor_systemd").is_dir():
        raise LabError(f"agor_systemd is not installed in {venv}: run scripts/setup.sh first")
    return site


def _package_files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


def deploy_package(package: Path, site: Path, lock_dir: Path = OPT_ROOT / "locks") -> None:
    """Make site/agor_systemd a copy of `package`, file by file with atomic renames, under a lock
    (pytest-xdist workers and benchmarks deploy at the same time)."""
    dst = site / package.name
    lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(lock_dir / "venv-sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = _package_files(package)
        for rel, src in wanted.items():
            target = dst / rel
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if target.is_file() and filecmp.cmp(src, target, shallow=False):
                continue
            tmp = target.with_name(f".{target.name}.agor-sync")
            shutil.copyfile(src, tmp)
            tmp.chmod(0o644)
            os.replace(tmp, target)
        for rel, target in _package_files(dst).items():
            if rel not in wanted:
                target.unlink(missing_ok=True)


def package_deployed(package: Path, site: Path) -> bool:
    """Whether site/agor_systemd still equals `package` (another session may have deployed since)."""
    src, dst = _package_files(package), _package_files(site / package.name)
    return src.keys() == dst.keys() and all(filecmp.cmp(p, dst[r], shallow=False) for r, p in src.items())
