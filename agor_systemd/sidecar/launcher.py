"""agor-launch: the process systemd starts as agor-sidecar.service's ExecStart=.

It starts the sidecar as its child and stays its supervisor (design (b) in
docs/supervision.md):

* readiness: READY=1 only once the sidecar is really ready — a {"type":"ready"} line on its
  stdout (agor's runners print one), a unix socket or TCP port that accepts, or at once; a
  sidecar not ready within the timeout fails that attempt ("not ready within 10 s");
* watchdog: WATCHDOG=1 at half of $WATCHDOG_USEC, but only while the sidecar is alive and
  answering its liveness check (not stopped/T state; optionally output activity and a probe);
  a hung sidecar gets WATCHDOG=trigger, so systemd kills and restarts it (Result=watchdog);
* STATUS= that keeps `systemctl status` truthful ("ready; pid 1234; up 2m; attempt 2/5");
* the sidecar's stdout/stderr go to the journal one line per record with a priority
  (stdout info, stderr warning; a line's own <0>..<7> prefix wins), every record of a long
  line included;
* stop signals are forwarded; after a stop it waits for the rest of the unit and exits 0;
  when the sidecar dies on its own the launcher reports the cause and exits the way the
  sidecar did, so systemd's Restart= logic follows the sidecar's fate;
* give-up at once: after the last allowed crash it exits with GAVE_UP_STATUS, which the unit
  lists in RestartPreventExitStatus=;
* a start that cannot spawn the sidecar (working directory, environment file or program gone)
  fails like a crash, inside the schedule and the budget; a start that is not a restart clears
  systemd's start limiter, so manual restarts never run into it;
* fallback backoff (systemd < 254, or a schedule systemd cannot express): the unit restarts
  it at once (RestartSec=0) and it waits out the rest of the delay, measured from the crash
  (InactiveEnterTimestampMonotonic), while the unit stays `activating`;
* stability window: after the sidecar has been ready that long, the restart counter is reset
  (RESTART_RESET=1 on systemd ≥ 258, ResetFailedUnit over D-Bus before).

With --forward-output it is the forwarder that takes a crashed sidecar's pipes over
(forward_output).

This runs on every restart, so it imports only C modules and the toolkit's import-light core up
front (tests/test_imports.py holds the list): D-Bus goes through libsystemd with ctypes
(pystemd's import alone costs ~45 ms), and each heavier module is imported where it is needed,
with its cost in an `import cost:` comment.
"""

from __future__ import annotations

import _signal  # the C module: `signal` would import enum and functools (~3 ms per start)
import errno
import fcntl
import os
import select
import sys
import time

from agor_systemd import journal
from agor_systemd.console import run_main
from agor_systemd.giveup import GAVE_UP_ENV, GAVE_UP_STATUS, gave_up_variable
from agor_systemd.journal import ERR, INFO, NOTICE, WARNING
from agor_systemd.notify import notify, watchdog_interval_s
from agor_systemd.sandbox.effects import EFFECT_TEXT, missing_effects
from agor_systemd.sidecar.protocol import (
    CLD_EXITED,
    CRASH_MARK,
    ParsedLauncherOptions,
    describe_exit,
    monotonic_usec,
    number_text,
    parse_launcher_arguments,
)

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, more than the launcher's whole start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Literal, NoReturn

    from agor_systemd.sandbox.enforce import Prepared
    from agor_systemd.sidecar.bridge import SocketBridge
    from agor_systemd.sidecar.trace import AttemptTrace

    ReadinessStep = Literal["give up", "poll"] | None
    SignalAction = Literal["pass on", "watchdog", "stop", "stop and pass on"]

# the socket's variables (and the given-up marks, GAVE_UP_ENV...) are the launcher's, never the sidecar's
STRIPPED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
LINE_MAX = 48 * 1024  # journald's default LineMax=: longer records are split there anyway
READY_POLL_S = 0.05
LIVENESS_CHECK_S = 0.25
STATUS_REFRESH_S = 10.0
CGROUP_CHECK_MS = 50  # on a stop: how often to look whether the rest of the unit has ended
READY_LINE = b'{"type":"ready"}'
FORWARD_OUTPUT = "--forward-output"  # the launcher's second role, see forward_output()
OTLP_ENDPOINT_ENV = "AGOR_OTLP_ENDPOINT"  # tracing.ENDPOINT_ENV: tracing is loaded only when it is set
TRACE: AttemptTrace | None = None  # this attempt's span, with tracing on (sidecar/trace.py)


def launcher_only(variable: str) -> bool:
    return variable in STRIPPED_ENV or variable.startswith(GAVE_UP_ENV)


def log(message: str, priority: int = NOTICE) -> None:
    """A line of the launcher's own in the journal (its stderr always is: systemd runs it)."""
    journal.log("agor-launch", message, priority, always_prefix=True)


# -- decisions ---------------------------------------------------------------------------------------
# What the launcher decides, as pure functions of its state (Sans-I/O): the Supervisor below only
# gathers the state, acts on the answer and does the I/O. tests/test_launcher.py tests each one.


def restart_delay_usec(schedule: tuple[float, ...], attempt: int) -> int | None:
    """Fallback backoff: how long restart `attempt` waits after the crash (past the end of the
    schedule, its last delay); None when it does not wait at all (a fresh start, no schedule)."""
    if attempt == 0 or not schedule:
        return None
    return round(schedule[min(attempt, len(schedule)) - 1] * 1_000_000)


def is_ready_line(line: bytes) -> bool:
    """Whether a stdout line is the sidecar's {"type":"ready"} message."""
    if b'"ready"' not in line:
        return False
    if b"".join(line.split()) == READY_LINE:  # agor's runners print exactly this
        return True
    import json  # import cost: ~8 ms; only a ready line spelt differently from agor's needs parsing

    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "ready"


def readiness_step(now: float, ready_deadline: float, next_ready_poll: float, ready_mode: str) -> ReadinessStep:
    """While waiting for readiness: give up once the timeout has passed, else poll a socket:/tcp:
    endpoint when its poll is due (a "line" comes on stdout by itself), else nothing."""
    if now >= ready_deadline:
        return "give up"
    if ready_mode != "line" and now >= next_ready_poll:
        return "poll"
    return None


def liveness_problem(
    state: str,
    now: float,
    last_output: float,
    activity_timeout_s: float,
    probe_failures: int,
    probe_reason: str | None,
) -> str | None:
    """Why a ready sidecar counts as hung, or None: stopped (its /proc state letter is T or t),
    silent for longer than the activity timeout (0: silence is fine), or two failed probes in a
    row (one may be a hiccup)."""
    if state in ("T", "t"):
        return "stopped (T state)"
    if activity_timeout_s and now - last_output > activity_timeout_s:
        return f"no output for {number_text(activity_timeout_s)} s"
    if probe_failures >= 2:
        return probe_reason
    return None


def next_wakeup(
    *,
    stable_at: float,
    waiting_for_ready: bool,
    ready_mode: str,
    ready_deadline: float,
    next_ready_poll: float,
    reporting: bool,
    next_status: float,
    watching: bool,
    next_ping: float,
    next_check: float,
) -> float:
    """The poll loop's next deadline (monotonic s; inf: only an event can wake it): the stability
    window, and each timer that is running — the readiness timeout and poll, the STATUS= refresh
    while ready and not hung, the ping and liveness check while watching."""
    deadlines = [stable_at]
    if waiting_for_ready:
        deadlines.append(ready_deadline if ready_mode == "line" else min(ready_deadline, next_ready_poll))
    if reporting:
        deadlines.append(next_status)
    if watching:
        deadlines += [next_ping, next_check]
    return min(deadlines)


def poll_timeout_ms(wakeup: float, now: float) -> int:
    """poll()'s timeout for waking at `wakeup`: rounded up, so the deadline has passed on waking."""
    wait_s = wakeup - now
    return -1 if wait_s == float("inf") else max(0, int(wait_s * 1000) + 1)


def signal_action(signum: int, hung: str | None, systemd_doing: str | None) -> SignalAction:
    """What a SIGTERM, SIGINT or SIGHUP to the launcher means. `systemd_doing` is the unit's
    SubState when systemd signals every process of the unit itself (KillMode=control-group).

    SIGHUP is passed on. SIGTERM is also the unit's WatchdogSignal=: after our WATCHDOG=trigger,
    or in SubState stop-watchdog, it is the watchdog's. Anything else is a stop, passed on unless
    systemd has sent the sidecar its own SIGTERM already: a second one could end a once-only
    handler mid-shutdown."""
    if signum == _signal.SIGHUP:
        return "pass on"
    if signum == _signal.SIGTERM and (hung is not None or systemd_doing == "stop-watchdog"):
        return "watchdog"
    if systemd_doing == "stop-sigterm":
        return "stop"
    return "stop and pass on"


def budget_reset_via(attempt: int, reset_via: str) -> str | None:
    """At the end of the stability window: how to reset the restart budget ("notify": RESTART_RESET=1,
    "dbus": ResetFailedUnit), or None when a first start has nothing to reset."""
    return reset_via if attempt else None


def cause_of_death(
    code: int,
    status: int,
    *,
    watchdog_fired: bool,
    hung: str | None,
    not_ready: bool,
    ready_timeout_s: float,
    denial: str | None,
) -> str:
    """Why the sidecar ended, for STATUS= and the journal: the watchdog (and the hang it saw), the
    readiness timeout, or its own exit with the first path the sandbox refused."""
    if watchdog_fired:
        return "watchdog timeout" + (f" ({hung})" if hung else "")
    if not_ready:
        return f"not ready within {number_text(ready_timeout_s)} s"
    # "exited with status 1; permission denied: /x — outside the sandbox; add it to ..."
    return describe_exit(code, status) + (f"; {denial}" if denial else "")


class Exit:
    """How the launcher ends an attempt: the STATUS= it leaves, its own journal record, then its
    exit status — None: die the way the sidecar did (exit_like). `after_stop`: first wait for the
    rest of the unit to end, forwarding its output."""

    __slots__ = ("after_stop", "exit_status", "priority", "record", "status_line")

    def __init__(
        self, status_line: str, record: str, priority: int, exit_status: int | None, after_stop: bool = False
    ) -> None:
        self.status_line = status_line
        self.record = record
        self.priority = priority
        self.exit_status = exit_status
        self.after_stop = after_stop

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exit) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return "Exit(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def crash_exit(cause: str, record: str, attempt: int, attempts: int, priority: int, exit_status: int | None) -> Exit:
    """An attempt that failed: after the last allowed one, give up (GAVE_UP_STATUS, which the unit
    lists in RestartPreventExitStatus=); else leave the cause for health and let systemd restart."""
    if attempt >= attempts:
        return Exit(
            f"STATUS=gave up after {attempts} restarts; {CRASH_MARK}{cause}",
            f"{record}; giving up after {attempts} restarts",
            ERR,
            GAVE_UP_STATUS,
        )
    return Exit(
        f"STATUS={CRASH_MARK}{cause}", f"{record}; restart {attempt + 1}/{attempts} follows", priority, exit_status
    )


def verdict(cause: str, attempt: int, attempts: int, *, stopping: bool, watchdog_fired: bool, not_ready: bool) -> Exit:
    """How the launcher ends once the sidecar has: after a stop, exit 0 whatever the sidecar's
    status (a JVM's 143, exit(1) handlers), with no stale "ready; pid …" left in STATUS=; after
    the last allowed attempt, give up; after a watchdog or readiness timeout, exit 1 (the sidecar
    died of the launcher's own SIGTERM/SIGKILL: nothing to imitate); else die the way the sidecar
    did, so systemd's Result= and ExecMainStatus= follow it."""
    if stopping and not watchdog_fired:
        return Exit("STATUS=", f"sidecar {cause} after a stop request", INFO, 0, after_stop=True)
    exit_status = 1 if watchdog_fired or not_ready else None
    return crash_exit(cause, f"sidecar {cause}", attempt, attempts, WARNING, exit_status)


def start_failure(cause: str, attempt: int, attempts: int) -> Exit:
    """How an attempt that could not spawn the sidecar ends: like a crash, inside the schedule and
    the budget."""
    return crash_exit(cause, cause, attempt, attempts, ERR, 1)


def ready_status(pid: int, up_s: float, attempt: int, attempts: int, sandbox_level: str, clients: str = "") -> str:
    """STATUS= while the sidecar is ready; health reads the sandbox level (and the socket's clients,
    `clients` from the bridge's summary) back from it."""
    text = f"STATUS=ready; pid {pid}; up {duration_text(up_s)}; attempt {attempt}/{attempts}; {sandbox_level}"
    return text + (f"; {clients}" if clients else "")


def duration_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def bus_path(unit: str) -> bytes:
    """systemd's object path for a unit (bus_label_escape)."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit) or "_"
    return f"/org/freedesktop/systemd1/unit/{label}".encode()


class ManagerBus:
    """The few D-Bus calls the launcher makes, through libsystemd's sd-bus via ctypes.

    The connection is opened at start and used again at the stability window, possibly hours
    later: a manager re-exec in between (distribution upgrades do one) resets it. Each call
    therefore reconnects and retries while the manager is coming back."""

    DESTINATION = b"org.freedesktop.systemd1"
    RECONNECT_S = 10.0  # a re-exec takes well under a second; a loaded machine gets more
    RECONNECT_PAUSE_S = 0.1

    def __init__(self, system: bool) -> None:
        import ctypes  # import cost: ~2 ms; natively D-Bus comes after the spawn (fallback: before, for the wait)

        self._ctypes = ctypes
        self._lib = ctypes.CDLL("libsystemd.so.0")
        self._system = system
        self._bus = ctypes.c_void_p()
        self._check(self._connect(), "connect to the service manager")

    def _connect(self) -> int:
        """Open the connection; a negative errno on failure."""
        ctypes, lib = self._ctypes, self._lib
        if self._bus.value:
            lib.sd_bus_unref(self._bus)
        self._bus = ctypes.c_void_p()
        if self._system:
            return lib.sd_bus_open_system(ctypes.byref(self._bus))
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        result = lib.sd_bus_new(ctypes.byref(self._bus))
        if result >= 0:
            result = lib.sd_bus_set_address(self._bus, b"unix:path=" + os.fsencode(runtime) + b"/systemd/private")
        return lib.sd_bus_start(self._bus) if result >= 0 else result

    def _call(self, what: str, call) -> None:
        """Run `call` (an sd-bus call returning a negative errno on failure); on a connection
        the manager dropped, reconnect and retry for up to RECONNECT_S."""
        dropped = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
        coming_back = (*dropped, errno.ECONNREFUSED, errno.ENOENT)  # the socket is re-created
        deadline = time.monotonic() + self.RECONNECT_S
        result = call()
        if result < 0 and -result in dropped:
            while True:
                result = self._connect()
                if result >= 0:
                    result = call()
                if result >= 0 or -result not in coming_back or time.monotonic() > deadline:
                    break
                time.sleep(self.RECONNECT_PAUSE_S)
        self._check(result, what)

    def _check(self, result: int, what: str) -> None:
        if result < 0:
            raise OSError(-result, f"cannot {what}: {os.strerror(-result)}")

    def _error(self):
        ctypes = self._ctypes

        class BusError(ctypes.Structure):  # type: ignore[name-defined]  # ctypes is self._ctypes, loaded lazily
            _fields_ = [("name", ctypes.c_char_p), ("message", ctypes.c_char_p), ("need_free", ctypes.c_int)]

        return BusError()

    def _property(self, unit: str, interface: bytes, name: bytes, kind: bytes, ctype):
        ctypes = self._ctypes
        value = ctype()

        def get() -> int:
            return self._lib.sd_bus_get_property_trivial(
                self._bus,
                self.DESTINATION,
                bus_path(unit),
                interface,
                name,
                ctypes.byref(self._error()),
                ctypes.c_char(kind),
                ctypes.byref(value),
            )

        self._call(f"read {name.decode()} of {unit}", get)
        return value.value

    def _string_property(self, unit: str, interface: bytes, name: bytes) -> str:
        ctypes = self._ctypes
        value = ctypes.c_void_p()  # a malloc'ed C string, ours to free

        def get() -> int:
            return self._lib.sd_bus_get_property_string(
                self._bus,
                self.DESTINATION,
                bus_path(unit),
                interface,
                name,
                ctypes.byref(self._error()),
                ctypes.byref(value),
            )

        self._call(f"read {name.decode()} of {unit}", get)
        try:
            return ctypes.string_at(value).decode()
        finally:
            ctypes.CDLL(None).free(value)

    def sub_state(self, unit: str) -> str:
        return self._string_property(unit, b"org.freedesktop.systemd1.Unit", b"SubState")

    def kill_mode(self, unit: str) -> str:
        return self._string_property(unit, b"org.freedesktop.systemd1.Service", b"KillMode")

    def close(self) -> None:
        self._lib.sd_bus_unref(self._bus)
        self._bus = self._ctypes.c_void_p()

    def restart_count(self, unit: str) -> int:
        return self._property(unit, b"org.freedesktop.systemd1.Service", b"NRestarts", b"u", self._ctypes.c_uint32)

    def inactive_since_usec(self, unit: str) -> int:
        return self._property(
            unit, b"org.freedesktop.systemd1.Unit", b"InactiveEnterTimestampMonotonic", b"t", self._ctypes.c_uint64
        )

    def reset_failed(self, unit: str) -> None:
        """Manager.ResetFailedUnit: on an active unit it zeroes NRestarts and the start limiter."""
        ctypes = self._ctypes

        def reset() -> int:
            return self._lib.sd_bus_call_method(
                self._bus,
                self.DESTINATION,
                b"/org/freedesktop/systemd1",
                b"org.freedesktop.systemd1.Manager",
                b"ResetFailedUnit",
                ctypes.byref(self._error()),
                None,
                b"s",
                unit.encode(),
            )

        self._call(f"reset the restart counter of {unit}", reset)

    def manager_environment(self, method: bytes, word: str) -> None:
        """Manager.SetEnvironment / UnsetEnvironment with one word (NAME=value, or NAME)."""
        ctypes = self._ctypes

        def call() -> int:
            return self._lib.sd_bus_call_method(
                self._bus,
                self.DESTINATION,
                b"/org/freedesktop/systemd1",
                b"org.freedesktop.systemd1.Manager",
                method,
                ctypes.byref(self._error()),
                None,
                b"as",
                ctypes.c_int(1),
                ctypes.c_char_p(word.encode()),
            )

        self._call(f"{method.decode()} in the service manager", call)


def wait_before_restart(options: ParsedLauncherOptions, bus: ManagerBus) -> int:
    """Fallback backoff: wait until delay(k) has passed since the crash; returns k."""
    attempt = bus.restart_count(options.unit)
    delay_usec = restart_delay_usec(options.wait_schedule or (), attempt)
    if delay_usec is None:
        return attempt
    restart_at = bus.inactive_since_usec(options.unit) + delay_usec
    while (remaining := restart_at - monotonic_usec()) > 0:
        notify(f"STATUS=waiting {remaining / 1e6:.1f}s before restart {attempt}/{options.attempts}")
        time.sleep(min(remaining, 1_000_000) / 1e6)
    return attempt


def exit_like(code: int, status: int) -> NoReturn:
    """Exit the way the sidecar did, so systemd's Result/ExecMainStatus follow it."""
    if code == CLD_EXITED:
        sys.exit(1 if status == GAVE_UP_STATUS else status)

    import resource  # import cost: ~0.2 ms (a shared library) on every start; only a signal death needs it

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # imitate the signal, not a launcher core dump
    if status != _signal.SIGKILL:  # SIGKILL (the OOM killer, kill -9) can have no handler and no mask
        _signal.signal(status, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [status])
    os.kill(os.getpid(), status)
    sys.exit(128 + status)  # the signal's default action is to ignore it


def process_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat ('R', 'S', 'T' stopped, 'Z', ...); '' if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(b")") + 2 :][:1].decode()  # comm may contain spaces and parentheses


def connects(endpoint: str, timeout_s: float) -> str | None:
    """None if socket:PATH / tcp:PORT (on loopback) accepts a connection, else why not."""
    import socket  # import cost: ~5 ms (enum); only socket:/tcp: readiness and probes connect

    kind, _, arg = endpoint.partition(":")
    family, address = (socket.AF_UNIX, arg) if kind == "socket" else (socket.AF_INET, ("127.0.0.1", int(arg)))
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError as e:
            return f"{endpoint}: {e.strerror or 'timed out'}"
    return None


def probe_once(probe: str, timeout_s: float) -> str | None:
    """Run the liveness probe once; None when it passed, else the reason."""
    if not probe.startswith("exec:"):
        return connects(probe, timeout_s)
    import subprocess  # import cost: ~11 ms; only exec: probes run a command

    try:
        done = subprocess.run(
            ["/bin/sh", "-c", probe[5:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
            env={k: v for k, v in os.environ.items() if not launcher_only(k)},
        )
    except subprocess.TimeoutExpired:
        return f"probe did not answer within {number_text(timeout_s)} s"
    return None if done.returncode == 0 else f"probe exited with status {done.returncode}"


def split_priority(line: bytes, default: bytes) -> tuple[bytes, bytes]:
    """(prefix, text): a line's own sd-daemon prefix <0>…<7>, else the stream's `default`.
    journald accepts no other (<8>, <9> would be logged as text at info)."""
    if len(line) >= 3 and line[:1] == b"<" and b"0" <= line[1:2] <= b"7" and line[2:3] == b">":
        return line[:3], line[3:]
    return default, line


def journal_records(prefix: bytes, text: bytes) -> list[bytes]:
    """`text` as records that each carry `prefix` and fit journald's LineMax=, which counts the
    prefix: a longer record would be split by journald and its tail logged at info."""
    size = LINE_MAX - 1 - len(prefix)  # journald needs the newline within LineMax bytes
    return [prefix + text[i : i + size] for i in range(0, max(len(text), 1), size)]


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class OutputStream:
    """One of the sidecar's output pipes, forwarded to the journal line by line."""

    def __init__(self, fd: int, priority: int, on_line, is_stdout: bool) -> None:
        self.fd = fd
        self.is_stdout = is_stdout
        self.prefix = f"<{priority}>".encode()
        self.on_line = on_line
        self.pending = b""
        self.pending_prefix: bytes | None = None  # the priority of a long line whose start went out
        self.open = True
        self.tap: Callable[[bytes], None] | None = None  # stdout with a socket: the bridge gets the raw bytes too

    def read(self) -> bool:
        """Forward what is available; False at end of file."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            self.flush()
            self.open = False
            return False
        self.feed(data)
        return True

    def feed(self, data: bytes) -> None:
        if self.tap is not None:
            self.tap(data)
        # journald ends a record at a NUL byte too: make it a line break so the rest keeps a priority
        lines = (self.pending + data.replace(b"\0", b"\n")).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            self.emit(line)
        prefix, text = self.split(self.pending)
        size = LINE_MAX - 1 - len(prefix)
        if len(text) > size:  # send the full records of a long line now, the rest keeps its priority
            whole = (len(text) - 1) // size * size
            self.write(prefix, text[:whole])
            self.pending, self.pending_prefix = text[whole:], prefix

    def split(self, line: bytes) -> tuple[bytes, bytes]:
        if self.pending_prefix is not None:
            return self.pending_prefix, line
        return split_priority(line, self.prefix)

    def emit(self, line: bytes) -> None:
        prefix, text = self.split(line)
        self.pending_prefix = None
        self.write(prefix, text)

    def write(self, prefix: bytes, text: bytes) -> None:
        write_all(1, b"".join(record + b"\n" for record in journal_records(prefix, text)))
        self.on_line(self, text)

    def flush(self) -> None:
        """End a last line that has no newline."""
        if self.pending or self.pending_prefix is not None:
            self.emit(self.pending)
            self.pending = b""

    def drain_available(self) -> None:
        """After the sidecar exited: forward what is in the pipe at this moment, and not a byte
        more. A descendant (an agent, `yes`, a build) may hold the pipe open and write forever;
        waiting for it would keep the sidecar a zombie and the crash unnoticed."""
        import termios  # import cost: ~0.2 ms (a shared library) on every start; needed at the sidecar's end only

        os.set_blocking(self.fd, False)
        available = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        left = int.from_bytes(available, sys.byteorder)
        while left > 0:
            data = os.read(self.fd, min(left, 65536))  # these bytes are in the pipe: no EOF, no wait
            self.feed(data)
            left -= len(data)
        if self.open:
            self.read()  # at end of file unless a descendant still holds the pipe
        self.flush()


def cgroup_procs_file(proc_self_cgroup: str, unit: str) -> str | None:
    """The cgroup.procs file of `unit`, when this process is in that unit's cgroup, in the hierarchy
    systemd tracks units in: the legacy name=systemd one on hybrid machines, else the unified one.
    None elsewhere: a launcher the relay started by hand shares the relay's cgroup (and the shell's),
    which never empties."""
    paths = {}
    for line in proc_self_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        paths[controllers if hierarchy != "0" else ""] = path
    root = "/sys/fs/cgroup/systemd" if "name=systemd" in paths else "/sys/fs/cgroup"
    unit_path = paths.get("name=systemd", paths.get(""))
    if unit_path is None or unit_path.rpartition("/")[2] != unit:
        return None
    return f"{root}{unit_path}/cgroup.procs"


def own_cgroup_procs_file(unit: str) -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            return cgroup_procs_file(f.read(), unit)
    except OSError:
        return None


def others_in_cgroup(procs_file: str | None) -> bool:
    """Whether processes other than this one are left in the unit (False when unknown)."""
    if procs_file is None:
        return False
    try:
        with open(procs_file) as f:
            return any(int(pid) != os.getpid() for pid in f.read().split())
    except OSError:
        return False


def forward_until_closed(streams: dict[int, OutputStream], until_alone_in: str | None = None) -> None:
    """Forward the streams until every writer has closed them and, with `until_alone_in` (a
    cgroup.procs file), until no other process is left in the unit."""
    poller = select.poll()
    for fd, stream in streams.items():
        if stream.open:
            poller.register(fd, select.POLLIN)
    while any(stream.open for stream in streams.values()) or others_in_cgroup(until_alone_in):
        for fd, _ in poller.poll(CGROUP_CHECK_MS if until_alone_in else -1):
            if not streams[fd].read():
                poller.unregister(fd)


def forward_output() -> None:
    """agor-launch --forward-output: fds 3 and 4 are the stdout and stderr pipes of a sidecar that
    ended, handed over by the launcher; forward them until the sidecar's descendants are gone."""
    for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(signum, _signal.SIG_IGN)  # the descendants' last words come after a SIGTERM

    def ignore(_stream: OutputStream, _line: bytes) -> None:
        pass

    forward_until_closed(
        {3: OutputStream(3, INFO, ignore, is_stdout=True), 4: OutputStream(4, WARNING, ignore, is_stdout=False)}
    )


def spawn_confined(
    command: tuple[str, ...], env: dict[str, str], out_w: int, err_w: int, ruleset, in_r: int | None = None
) -> int:
    """fork, enter the Landlock domain in the child, exec the sidecar.

    posix_spawn cannot run code between fork and exec. The ruleset is complete before the
    fork, so the child only redirects output, calls prctl + landlock_restrict_self and execs;
    an exec failure comes back through a close-on-exec pipe as an errno.
    """
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, ever
        try:
            if in_r is not None:
                os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            ruleset.restrict_self()
            os.execve(command[0], list(command), env)
        except OSError as e:
            os.write(errors_w, str(e.errno or 1).encode())
        finally:
            os._exit(127)
    os.close(errors_w)
    with os.fdopen(errors_r, "rb") as errors:
        failure = errors.read()
    if failure:
        os.waitpid(pid, 0)
        errno = int(failure)
        raise OSError(errno, os.strerror(errno))
    return pid


class Supervisor:
    """Supervises one running sidecar: readiness, watchdog, output, stop signals, stability reset.

    Supervisor.spawn() starts the sidecar and returns its supervisor, so every attribute holds
    from the start. Its decisions are the pure functions above; this class does the I/O."""

    def __init__(
        self,
        options: ParsedLauncherOptions,
        pid: int,
        pidfd: int,
        pipes: tuple[int, int],
        started: float,
        *,
        sandbox: Prepared | None,
        bus: ManagerBus | None,
        attempt: int,
        listen: int | None = None,
        stdin_w: int | None = None,
    ) -> None:
        self.options = options
        self.pid = pid
        self.pidfd = pidfd  # signals go here: once reaped, the pid may be another process's
        out_r, err_r = pipes
        self.streams = {
            out_r: OutputStream(out_r, INFO, self.on_line, is_stdout=True),
            err_r: OutputStream(err_r, WARNING, self.on_line, is_stdout=False),
        }
        self.started = started
        self.sandbox = sandbox  # the Landlock set-up, when the sandbox is on
        self.bus = bus  # fallback mode: connected before the spawn; native: by count_attempt()
        self.attempt = attempt
        # None when this process is not its unit's: a relay run by hand started it, and has no
        # unit of that name to ask about; the relay keeps the restart count itself
        self.unit_procs_file = own_cgroup_procs_file(options.unit)
        self.stopping = False
        self.watchdog_fired = False
        self.ready_at: float | None = None
        self.hung: str | None = None
        self.not_ready = False
        self.probe_failures = 0
        self.probe_reason: str | None = None
        self.denial: str | None = None  # the first path the sandbox refused, explained (sandbox.denial_hint)
        self.last_output = started
        self.stable_at = float("inf")  # set at READY: a run counts as stable only from then
        self.ping_s = watchdog_interval_s()
        self.listen = listen  # agor-sidecar.socket's fd, when systemd passed it
        self.stdin_w = stdin_w  # the sidecar's stdin, fed by the bridge
        self.bridge: SocketBridge | None = None  # serving the socket, from the first poll on

    # -- start -----------------------------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        options: ParsedLauncherOptions,
        sandbox: Prepared | None,
        bus: ManagerBus | None,
        attempt: int,
        listen: int | None = None,
    ) -> Supervisor:
        """Start the sidecar and its supervisor; from here on, stop signals reach the sidecar.
        With the socket (`listen`), the sidecar's stdin is a pipe the bridge feeds (else systemd's
        /dev/null)."""
        env = {k: v for k, v in os.environ.items() if not launcher_only(k)}
        if TRACE is not None and TRACE.traceparent is not None:
            env["TRACEPARENT"] = TRACE.traceparent  # the sidecar can join the trace (environment carrier)
        ruleset = sandbox.ruleset if sandbox is not None else None
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, stdin_w = os.pipe2(os.O_CLOEXEC) if listen is not None else (None, None)
        redirects = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        if in_r is not None:
            redirects.append((os.POSIX_SPAWN_DUP2, in_r, 0))
        try:
            if ruleset is not None:
                pid = spawn_confined(options.command, env, out_w, err_w, ruleset, in_r)
            else:
                pid = os.posix_spawn(options.command[0], list(options.command), env, file_actions=redirects)
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_r is not None:
                os.close(in_r)
            if ruleset is not None:
                ruleset.close()
        started = time.monotonic()
        supervisor = cls(
            options,
            pid,
            os.pidfd_open(pid),
            (out_r, err_r),
            started,
            sandbox=sandbox,
            bus=bus,
            attempt=attempt,
            listen=listen,
            stdin_w=stdin_w,
        )
        supervisor.install_signal_handlers()
        return supervisor

    def count_attempt(self) -> None:
        """Native backoff: which restart this is, asked of the manager once the sidecar runs (its
        start does not wait for D-Bus); the connection stays for the stability-window reset."""
        try:
            self.bus = ManagerBus(self.options.system)
            self.attempt = self.bus.restart_count(self.options.unit)
        except OSError as e:  # keep supervising; StartLimitBurst= still ends a crash loop
            log(f"{e}; cannot tell the attempt number, so the start limit will end a crash loop", WARNING)

    def install_signal_handlers(self) -> None:
        for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
            _signal.signal(signum, self.forward)
        _signal.signal(_signal.SIGABRT, self.watchdog_timeout)  # systemd's default WatchdogSignal=

    def forward(self, signum: int, _frame) -> None:
        # only a SIGTERM can be the watchdog's, and after WATCHDOG=trigger it is: no need to ask
        systemd_doing = self.systemd_signalling_all() if signum == _signal.SIGTERM and self.hung is None else None
        action = signal_action(signum, self.hung, systemd_doing)
        if action == "watchdog":
            self.watchdog_timeout(signum, _frame)
            return
        if action != "pass on":
            self.stopping = True
        if action != "stop":
            self.signal_child(signum)

    def systemd_signalling_all(self) -> str | None:
        """The unit's SubState when systemd is signalling every process of the unit itself
        (KillMode=control-group), else None; None also when systemd cannot be asked."""
        if self.unit_procs_file is None:
            return None
        try:
            bus = ManagerBus(self.options.system)
            try:
                if bus.kill_mode(self.options.unit) != "control-group":
                    return None
                return bus.sub_state(self.options.unit)
            finally:
                bus.close()
        except OSError:
            return None

    def watchdog_timeout(self, _signum: int, _frame) -> None:
        """systemd gave up on us: end the sidecar for good, even if it is stopped (SIGSTOP)."""
        self.watchdog_fired = True
        self.signal_child(_signal.SIGKILL)
        if TRACE is not None:
            TRACE.event("watchdog.timeout")

    def signal_child(self, signum: int) -> None:
        """Signal the sidecar through its pidfd: once it is reaped, its PID may belong to another
        process, the pidfd never does."""
        try:
            _signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass  # already gone

    # -- events ----------------------------------------------------------------------------------

    def on_line(self, stream: OutputStream, line: bytes) -> None:
        self.last_output = time.monotonic()
        if self.denial is None and self.sandbox is not None and self.sandbox.ruleset is not None:
            # import cost: none, the sandbox is on and prepare_sandbox loaded it already
            from agor_systemd.sandbox.enforce import denial_hint

            self.denial = denial_hint(line, self.options.read_write, self.options.read_only)
        if self.waiting_for_ready() and self.options.ready == "line" and stream.is_stdout and is_ready_line(line):
            self.become_ready()

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    def waiting_for_ready(self) -> bool:
        return not self.ready and not self.not_ready

    def become_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.last_output = self.ready_at
        self.stable_at = self.ready_at + self.options.stability_window_s
        notify("READY=1", self.status_text())
        if TRACE is not None:
            TRACE.ready(self.spawned_ns(), self.sandbox_level())
        if self.ping_s:
            notify("WATCHDOG=1")
            if self.options.probe:
                self.start_probe_thread()

    def spawned_ns(self) -> int:
        """When the sidecar was started, in wall-clock time (spans carry it)."""
        return time.time_ns() - round((time.monotonic() - self.started) * 1e9)

    def status_text(self) -> str:
        up_s = time.monotonic() - self.ready_at if self.ready_at is not None else 0.0
        clients = self.bridge.core.summary() if self.bridge is not None else ""
        return ready_status(self.pid, up_s, self.attempt, self.options.attempts, self.sandbox_level(), clients)

    def start_bridge(self, poller: select.poll) -> None:
        """Serve agor-sidecar.socket: its clients get the sidecar's stdout and feed its stdin."""
        # import cost: ~1 ms (C modules only); a launcher without the socket unit never loads it
        from agor_systemd.sidecar.bridge import Bridge, SocketBridge

        assert self.listen is not None and self.stdin_w is not None
        core = Bridge(self.options.buffer_bytes, self.options.client_queue_bytes)
        self.bridge = SocketBridge(self.listen, self.stdin_w, poller, core, self.clients_changed)
        stdout = next(stream for stream in self.streams.values() if stream.is_stdout)
        stdout.tap = self.bridge.sidecar_output

    def clients_changed(self) -> None:
        if self.ready and self.hung is None:
            notify(self.status_text())

    def sandbox_level(self) -> str:
        """'sandbox full|partial|none|off' — health reads it back from STATUS=."""
        return f"sandbox {self.sandbox.level}" if self.sandbox is not None else "sandbox off"

    def start_probe_thread(self) -> None:
        import threading  # import cost: ~3 ms; only a probe or a not-ready kill timer needs a thread

        def probe_loop() -> None:
            probe = self.options.probe
            assert probe is not None  # the thread starts only when a probe is configured
            while True:
                reason = probe_once(probe, self.options.probe_timeout_s)
                self.probe_failures = self.probe_failures + 1 if reason else 0
                self.probe_reason = reason
                time.sleep(self.ping_s)

        threading.Thread(target=probe_loop, name="probe", daemon=True).start()

    def check_liveness(self, now: float) -> str | None:
        return liveness_problem(
            process_state(self.pid),
            now,
            self.last_output,
            self.options.activity_timeout_s,
            self.probe_failures,
            self.probe_reason,
        )

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        """Supervise until the sidecar ends; returns its (si_code, si_status)."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        for fd in self.streams:
            poller.register(fd, select.POLLIN)
        if self.listen is not None:
            self.start_bridge(poller)
        ready_mode = self.options.ready
        notify(
            f"STATUS=waiting for readiness ({ready_mode}); pid {self.pid}; "
            f"attempt {self.attempt}/{self.options.attempts}"
        )
        if ready_mode == "immediate":
            self.become_ready()
        ready_deadline = self.started + self.options.ready_timeout_s
        next_ping = next_check = next_status = next_ready_poll = self.started
        while True:
            now = time.monotonic()
            if self.waiting_for_ready():
                step = readiness_step(now, ready_deadline, next_ready_poll, ready_mode)
                if step == "give up":
                    self.give_up_waiting()
                elif step == "poll":
                    if connects(ready_mode, READY_POLL_S) is None:
                        self.become_ready()
                    next_ready_poll = now + READY_POLL_S
            watching = self.ready and self.ping_s > 0 and self.hung is None
            if watching and now >= next_check:
                self.hung = self.check_liveness(now)
                next_check = now + LIVENESS_CHECK_S
                if self.hung:
                    self.report_hang()
                    watching = False
            if watching and now >= next_ping:
                notify("WATCHDOG=1")
                next_ping = now + self.ping_s
            reporting = self.ready and self.hung is None
            if reporting and now >= next_status:
                notify(self.status_text())
                next_status = now + STATUS_REFRESH_S
            if now >= self.stable_at:
                self.reset_budget()
                self.stable_at = float("inf")
            wakeup = next_wakeup(
                stable_at=self.stable_at,
                waiting_for_ready=self.waiting_for_ready(),
                ready_mode=ready_mode,
                ready_deadline=ready_deadline,
                next_ready_poll=next_ready_poll,
                reporting=reporting,
                next_status=next_status,
                watching=watching,
                next_ping=next_ping,
                next_check=next_check,
            )
            for fd, events in poller.poll(poll_timeout_ms(wakeup, time.monotonic())):
                if fd == self.pidfd:
                    for stream in self.streams.values():
                        stream.drain_available()
                    result = os.waitid(os.P_PID, self.pid, os.WEXITED)
                    assert result is not None  # None only with WNOHANG
                    return result.si_code, result.si_status
                if self.bridge is not None and self.bridge.owns(fd):
                    self.bridge.handle(fd, events)
                    continue
                if not self.streams[fd].read():
                    poller.unregister(fd)

    def hand_over_output(self) -> None:
        """After a crash the launcher must exit at once (that is what systemd acts on), but the
        sidecar's descendants may still hold its pipes and write while they shut down: a small
        forwarder takes the pipes over, so their writes reach the journal instead of dying of
        SIGPIPE. It ends when the last writer is gone (or with the rest of the unit)."""
        if not any(stream.open for stream in self.streams.values()):
            return
        out_r, err_r = self.streams  # stdout's pipe, then stderr's
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")
        try:
            os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", script, FORWARD_OUTPUT],
                {k: v for k, v in os.environ.items() if not launcher_only(k)},
                file_actions=[(os.POSIX_SPAWN_DUP2, out_r, 3), (os.POSIX_SPAWN_DUP2, err_r, 4)],
            )
        except OSError as e:
            log(f"cannot hand the sidecar's output over: {e.strerror}; descendants lose it", WARNING)

    def give_up_waiting(self) -> None:
        """Not ready in time: this attempt failed; end the sidecar (SIGTERM, then SIGKILL)."""
        self.not_ready = True
        log(
            f"sidecar not ready within {number_text(self.options.ready_timeout_s)} s "
            f"({self.options.ready}); stopping it",
            ERR,
        )
        self.signal_child(_signal.SIGTERM)
        import threading  # import cost: ~3 ms; only a probe or a not-ready kill timer needs a thread

        kill = threading.Timer(2.0, self.signal_child, (_signal.SIGKILL,))
        kill.daemon = True  # a pending timer must not hold up the launcher's exit
        kill.start()

    def report_hang(self) -> None:
        if TRACE is not None:  # before the trigger: systemd's SIGTERM may come at once
            TRACE.event("watchdog.trigger", reason=self.hung or "")
        notify(f"STATUS=hung: {self.hung}; pid {self.pid}; asking systemd's watchdog to restart it", "WATCHDOG=trigger")
        log(f"sidecar (pid {self.pid}) is hung: {self.hung}; no more watchdog pings", ERR)

    def reset_budget(self) -> None:
        """Stable for the window: the next crash starts the schedule again with a full budget."""
        via = budget_reset_via(self.attempt, self.options.reset_via)
        if via is not None:
            try:
                if via == "notify":
                    notify("RESTART_RESET=1")
                elif self.bus is not None:
                    self.bus.reset_failed(self.options.unit)
                log(f"sidecar stable for {number_text(self.options.stability_window_s)} s: restart budget reset", INFO)
                if TRACE is not None:
                    TRACE.event("budget.reset")
            except OSError as e:
                log(f"{e}; the restart budget was not reset", WARNING)
        self.attempt = 0

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, code: int, status: int) -> NoReturn:
        cause = cause_of_death(
            code,
            status,
            watchdog_fired=self.watchdog_fired,
            hung=self.hung,
            not_ready=self.not_ready,
            ready_timeout_s=self.options.ready_timeout_s,
            denial=self.denial,
        )
        end = verdict(
            cause,
            self.attempt,
            self.options.attempts,
            stopping=self.stopping,
            watchdog_fired=self.watchdog_fired,
            not_ready=self.not_ready,
        )
        giving_up = end.exit_status == GAVE_UP_STATUS
        if self.bridge is not None:  # its clients get EOF now, as agor gets it from a runner's stdout
            exit_code = status if code == CLD_EXITED else -status
            last: bytes | None = None  # a stop: EOF alone
            if giving_up:
                last = failed_line(cause, self.options.attempts, exit_code)
            elif not end.after_stop:
                last = restarting_line(cause, self.attempt + 1, self.options.attempts, exit_code)
            self.bridge.finish(last)
        if end.after_stop:
            notify(end.status_line)
            log(end.record, end.priority)
            if TRACE is not None:
                TRACE.ended(cause, stopped=True, gave_up=False)
            # Everyone in the unit got SIGTERM too. Stay until they are done: systemd SIGKILLs
            # what is left once the main process is gone on a hybrid cgroup hierarchy in a
            # container, and a write to a pipe nobody reads would kill them with SIGPIPE.
            # systemd's stop timeout bounds the wait.
            forward_until_closed(self.streams, until_alone_in=self.unit_procs_file)
            sys.exit(end.exit_status)
        self.hand_over_output()
        if giving_up:
            mark_given_up(self.options, self.bus, self.listen, cause)
        notify(end.status_line)
        log(end.record, end.priority)
        if TRACE is not None:  # sent before the exit: a signal death runs no exit hooks
            TRACE.ended(cause, stopped=False, gave_up=giving_up)
        if end.exit_status is not None:
            sys.exit(end.exit_status)
        exit_like(code, status)


def prepare_sandbox(options: ParsedLauncherOptions) -> Prepared:
    """The Landlock ruleset for the sidecar, reported in the journal; refusal ends the unit."""
    # import cost: Landlock's ctypes layer, loaded only when the sandbox is on
    from agor_systemd.sandbox.enforce import SandboxRefused, command_paths, prepare

    home = os.path.expanduser("~")  # $HOME, which the manager sets for the unit
    try:
        readable = command_paths(options.command, os.getcwd(), home, (*options.read_write, *options.read_only))
        prepared = prepare(
            list(options.read_write),
            list(options.read_only),
            options.tcp_connect,
            options.tcp_bind,
            required=options.sandbox == "required",
            command_read=readable,
        )
    except SandboxRefused as e:
        notify(f"STATUS=gave up: {CRASH_MARK}{e}")
        log(f"{e}; not starting the sidecar ([sandbox] required = true)", ERR)
        if TRACE is not None:
            TRACE.ended(str(e), stopped=False, gave_up=True)
        sys.exit(GAVE_UP_STATUS)  # no restart can fix the kernel
    except OSError as e:
        log(f"cannot build the Landlock ruleset: {e}", ERR)
        raise
    log(prepared.describe(), INFO if prepared.level == "full" else WARNING)
    return prepared


def check_hardening(expected: tuple[str, ...]) -> None:
    """Warn when systemd hardening the unit asks for is not in effect (e.g. skipped silently)."""
    if not expected:
        return
    missing = missing_effects(expected)
    if missing:
        log("hardening asked for but not in effect: " + ", ".join(EFFECT_TEXT.get(m, m) for m in missing), WARNING)


def missing_start_path(options: ParsedLauncherOptions) -> str | None:
    """Why the sidecar cannot start in the unit's working directory or with its environment file.

    The unit prefixes both with `-`, so systemd starts the launcher even when they are missing
    (else it fails before the launcher, 200/CHDIR, with no backoff and no give-up); the check is
    here instead, and the attempt fails like a crash, with the path in the cause.
    """
    if options.working_directory is not None:
        try:
            os.chdir(options.working_directory)  # where systemd put us unless it was missing
        except OSError as e:
            return f"working directory {options.working_directory}: {e.strerror}"
    if options.environment_file is not None:
        try:
            os.close(os.open(options.environment_file, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            return f"environment file {options.environment_file}: {e.strerror}"
    return None


def fail_before_spawn(
    options: ParsedLauncherOptions, bus: ManagerBus | None, attempt: int, cause: str, listen: int | None = None
) -> NoReturn:
    """End an attempt that cannot spawn the sidecar as a crash: the schedule and the budget apply."""
    # native backoff: the attempt number is needed only now, and only systemd's own process of the
    # unit can ask (as count_attempt)
    if bus is None and options.attempts and own_cgroup_procs_file(options.unit) is not None:
        attempt = ManagerBus(options.system).restart_count(options.unit)
    end = start_failure(cause, attempt, options.attempts)
    if end.exit_status == GAVE_UP_STATUS:
        mark_given_up(options, bus, listen, cause)
    notify(end.status_line)
    log(end.record, end.priority)
    if TRACE is not None:
        TRACE.ended(cause, stopped=False, gave_up=end.exit_status == GAVE_UP_STATUS)
    sys.exit(end.exit_status)


def socket_from_systemd() -> int | None:
    """agor-sidecar.socket's listening fd when systemd passed it (close-on-exec from here: the
    sidecar never gets it), else None."""
    if "LISTEN_FDS" not in os.environ:
        return None
    # import cost: ~1 ms (C modules only), and only a unit with the socket gets here
    from agor_systemd.sidecar.bridge import listen_fd

    fd = listen_fd(dict(os.environ), os.getpid())
    if fd is not None:
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return fd


def failed_line(cause: str, attempts: int, exit_code: int | None = None) -> bytes:
    """What a client of a given-up sidecar is told, as one JSON line (`exit_code`: the sidecar's
    status, minus the signal that killed it; left out when it is not known any more)."""
    import json  # import cost: ~8 ms, only at a give-up

    state = {"type": "supervisor", "state": "failed", "attempts": attempts, "last_error": cause}
    if exit_code is not None:
        state["exit_code"] = exit_code
    return json.dumps({**state, "hint": "run `agor-units restart` to start it again"}).encode() + b"\n"


def restarting_line(cause: str, restart: int, attempts: int, exit_code: int) -> bytes:
    """What the clients are told before the EOF of a sidecar that ended on its own and is restarted."""
    import json  # import cost: ~8 ms, only when the sidecar has ended

    state = {"type": "supervisor", "state": "restarting", "restart": restart, "attempts": attempts}
    return json.dumps({**state, "last_error": cause, "exit_code": exit_code}).encode() + b"\n"


def mark_given_up(options: ParsedLauncherOptions, bus: ManagerBus | None, listen: int | None, cause: str) -> None:
    """Socket activation would start a given-up sidecar again at the next connection: leave the
    cause in the manager's environment, where the next launcher finds it (answer_given_up)."""
    if listen is None:
        return
    try:
        (bus or ManagerBus(options.system)).manager_environment(
            b"SetEnvironment", f"{gave_up_variable(options.unit)}={cause}"
        )
    except OSError as e:
        log(f"{e}; a client connecting to the socket will start the sidecar again", WARNING)


def answer_given_up(options: ParsedLauncherOptions, listen: int, cause: str) -> None:
    """A start after the give-up: a client's connection (socket activation) gets the state and EOF,
    and the sidecar stays down; a start with nobody waiting is a user's restart and clears the mark."""
    # import cost: none, socket_from_systemd loaded it
    from agor_systemd.sidecar.bridge import connection_pending, respond_and_close

    bus = ManagerBus(options.system)
    if not connection_pending(listen):
        bus.manager_environment(b"UnsetEnvironment", gave_up_variable(options.unit))
        return
    bus.reset_failed(options.unit)  # else a reconnecting app hits the start limit, and the socket fails
    answered = respond_and_close(listen, failed_line(cause, options.attempts))
    notify(f"STATUS=gave up after {options.attempts} restarts; {CRASH_MARK}{cause}")
    log(f"the sidecar gave up earlier ({cause}); told {answered} client(s), not starting it", NOTICE)
    sys.exit(GAVE_UP_STATUS)


def forget_earlier_starts(bus: ManagerBus, unit: str) -> None:
    """On a start that is not a restart (NRestarts = 0: a manual start or restart, boot), clear the
    start limiter, so that only the restarts of one budget count against StartLimitBurst= and a
    user's restart always works. NRestarts is 0 already: the restart budget is unchanged."""
    try:
        bus.reset_failed(unit)
    except OSError as e:
        log(f"{e}; repeated manual restarts may hit the start limit", WARNING)


def stop_before_start(_signum: int, _frame) -> None:
    """A stop during the fallback wait or the sandbox set-up: nothing to forward it to. Leave no
    "waiting 2.0s before restart 2/5" behind on the stopped unit."""
    notify("STATUS=")
    log("stop requested before the sidecar started", INFO)
    if TRACE is not None:
        TRACE.ended("stop requested before the sidecar started", stopped=True, gave_up=False)
    sys.exit(0)


def start_tracing(options: ParsedLauncherOptions) -> None:
    """With AGOR_OTLP_ENDPOINT set (the unit's Environment=): this attempt's span, in the run's
    trace; its journal lines carry TRACE_ID= and SPAN_ID= from here on (docs/telemetry.md)."""
    global TRACE
    if os.environ.get(OTLP_ENDPOINT_ENV, "").strip():
        # import cost: ~4 ms (tracing, the run file; the SDK loads later, in a thread); only with tracing on
        from agor_systemd.sidecar.trace import AttemptTrace

        TRACE = AttemptTrace(options.unit, options.system)


def run(options: ParsedLauncherOptions) -> None:
    for signum in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(signum, stop_before_start)
    bus: ManagerBus | None = None
    attempt = 0
    listen = socket_from_systemd()
    if listen is not None and gave_up_variable(options.unit) in os.environ:
        answer_given_up(options, listen, os.environ[gave_up_variable(options.unit)])
    start_tracing(options)
    if options.wait_schedule is not None:
        bus = ManagerBus(options.system)
        attempt = wait_before_restart(options, bus)
    notify(f"STATUS=starting (attempt {attempt}/{options.attempts})")
    missing = missing_start_path(options)
    if missing is not None:
        fail_before_spawn(options, bus, attempt, missing, listen)
    check_hardening(options.expect_hardening)
    sandbox = prepare_sandbox(options) if options.sandbox != "off" else None
    try:
        supervisor = Supervisor.spawn(options, sandbox, bus, attempt, listen)
    except OSError as e:  # e.g. the program was removed after install
        fail_before_spawn(options, bus, attempt, f"cannot start {options.command[0]}: {e.strerror}", listen)
    if bus is None and supervisor.unit_procs_file is not None:
        supervisor.count_attempt()
    if TRACE is not None:
        TRACE.running(supervisor.pid, supervisor.attempt, options.attempts, supervisor.spawned_ns())
    if supervisor.bus is not None and supervisor.attempt == 0:
        forget_earlier_starts(supervisor.bus, options.unit)
    supervisor.finish(*supervisor.run())


def main(argv: list[str] | None = None) -> None:
    """The agor-launch program (`_launch.py` runs it on every start of the unit)."""
    run_main("agor-launch", lambda: launch(sys.argv[1:] if argv is None else argv))


def launch(args: list[str]) -> None:
    if args == [FORWARD_OUTPUT]:
        forward_output()
        return
    try:
        options = parse_launcher_arguments(args)
    except ValueError as e:
        log(f"usage error: {e}", ERR)
        sys.exit(2)
    try:
        run(options)
    except OSError as e:
        log(str(e), ERR)
        sys.exit(1)


if __name__ == "__main__":
    main()
