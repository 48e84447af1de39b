"""agor-launch: the process systemd starts as agor-sidecar.service's ExecStart=.

It starts the sidecar as its child and stays its supervisor (design (b) in
docs/supervision.md): it tells systemd READY=1 and STATUS=, forwards stop signals, and
when the sidecar dies it reports the cause and exits the way the sidecar did, so systemd's
Restart= logic reacts to the sidecar's fate. On top of systemd it adds what systemd lacks:

* give-up at once: after the last allowed crash it exits with GAVE_UP_STATUS, which the
  unit lists in RestartPreventExitStatus=, so the unit is `failed` immediately;
* fallback backoff (systemd < 254, or a schedule systemd cannot express): the unit
  restarts it at once (RestartSec=0) and the launcher waits out the rest of the delay
  measured from the crash, reading NRestarts and InactiveEnterTimestampMonotonic over D-Bus
  while the unit stays `activating` (Type=notify);
* stability window: after the sidecar has run that long it resets the unit's restart
  counter (ResetFailedUnit), so the next crash starts again at the first delay.

This runs on every restart, so it imports almost nothing: D-Bus goes through libsystemd
with ctypes (pystemd's import alone costs ~45 ms) and only when needed.
"""

from __future__ import annotations

import os
import sys
import time

from .protocol import (
    CLD_EXITED,
    CRASH_MARK,
    GAVE_UP_STATUS,
    LauncherOptions,
    describe_exit,
    parse_launcher_arguments,
)

STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def log(message: str) -> None:
    sys.stderr.write(f"agor-launch: {message}\n")
    sys.stderr.flush()


def notify(*fields: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(fields).encode("utf-8", "surrogateescape"))


def bus_path(unit: str) -> bytes:
    """systemd's object path for a unit (bus_label_escape)."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit) or "_"
    return f"/org/freedesktop/systemd1/unit/{label}".encode()


class ManagerBus:
    """The few D-Bus calls the launcher makes, through libsystemd's sd-bus via ctypes."""

    DESTINATION = b"org.freedesktop.systemd1"

    def __init__(self, system: bool) -> None:
        import ctypes

        self._ctypes = ctypes
        lib = ctypes.CDLL("libsystemd.so.0")
        self._lib = lib
        self._bus = ctypes.c_void_p()
        if system:
            self._check(lib.sd_bus_open_system(ctypes.byref(self._bus)), "connect to the system bus")
        else:
            runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
            address = b"unix:path=" + os.fsencode(runtime) + b"/systemd/private"
            self._check(lib.sd_bus_new(ctypes.byref(self._bus)), "create a bus")
            self._check(lib.sd_bus_set_address(self._bus, address), "set the bus address")
            self._check(lib.sd_bus_start(self._bus), f"connect to {address.decode(errors='replace')}")

    def _check(self, result: int, what: str) -> None:
        if result < 0:
            raise OSError(-result, f"cannot {what}: {os.strerror(-result)}")

    def _error(self):
        ctypes = self._ctypes

        class BusError(ctypes.Structure):
            _fields_ = [("name", ctypes.c_char_p), ("message", ctypes.c_char_p), ("need_free", ctypes.c_int)]

        return BusError()

    def _property(self, unit: str, interface: bytes, name: bytes, kind: bytes, ctype):
        ctypes = self._ctypes
        value = ctype()
        error = self._error()
        result = self._lib.sd_bus_get_property_trivial(
            self._bus, self.DESTINATION, bus_path(unit), interface, name,
            ctypes.byref(error), ctypes.c_char(kind), ctypes.byref(value))
        self._check(result, f"read {name.decode()} of {unit}")
        return value.value

    def restart_count(self, unit: str) -> int:
        return self._property(unit, b"org.freedesktop.systemd1.Service", b"NRestarts", b"u", self._ctypes.c_uint32)

    def inactive_since_usec(self, unit: str) -> int:
        return self._property(unit, b"org.freedesktop.systemd1.Unit", b"InactiveEnterTimestampMonotonic",
                              b"t", self._ctypes.c_uint64)

    def reset_failed(self, unit: str) -> None:
        """Manager.ResetFailedUnit: on an active unit it zeroes NRestarts and the start limiter."""
        ctypes = self._ctypes
        error = self._error()
        result = self._lib.sd_bus_call_method(
            self._bus, self.DESTINATION, b"/org/freedesktop/systemd1", b"org.freedesktop.systemd1.Manager",
            b"ResetFailedUnit", ctypes.byref(error), None, b"s", unit.encode())
        self._check(result, f"reset the restart counter of {unit}")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock of systemd's *TimestampMonotonic properties."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def wait_before_restart(options: LauncherOptions, bus: ManagerBus) -> int:
    """Fallback backoff: wait until delay(k) has passed since the crash; returns k."""
    attempt = bus.restart_count(options.unit)
    schedule = options.wait_schedule or ()
    if attempt == 0 or not schedule:
        return attempt
    delay_usec = round(schedule[min(attempt, len(schedule)) - 1] * 1_000_000)
    restart_at = bus.inactive_since_usec(options.unit) + delay_usec
    while (remaining := restart_at - monotonic_usec()) > 0:
        notify(f"STATUS=waiting {remaining / 1e6:.1f}s before restart {attempt}/{options.attempts}")
        time.sleep(min(remaining, 1_000_000) / 1e6)
    return attempt


def exit_like(code: int, status: int) -> None:
    """Exit the way the sidecar did, so systemd's Result/ExecMainStatus follow it."""
    if code == CLD_EXITED:
        sys.exit(1 if status == GAVE_UP_STATUS else status)
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # imitate the signal, not a launcher core dump
    signal.signal(status, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [status])
    os.kill(os.getpid(), status)
    sys.exit(128 + status)  # the signal's default action is to ignore it


class Sidecar:
    """The child process and the signals forwarded to it."""

    def __init__(self, command: tuple[str, ...]) -> None:
        import signal

        env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
        self.stopping = False
        self.pid = os.posix_spawn(command[0], list(command), env)
        self.pidfd = os.pidfd_open(self.pid)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)

    def _forward(self, signum: int, _frame) -> None:
        import signal

        if signum != signal.SIGHUP:
            self.stopping = True
        os.kill(self.pid, signum)

    def wait(self, timeout_s: float | None) -> tuple[int, int] | None:
        """(si_code, si_status) once the child has ended, or None after timeout_s."""
        import select

        ready, _, _ = select.select([self.pidfd], [], [], timeout_s)
        if not ready:
            return None
        result = os.waitid(os.P_PID, self.pid, os.WEXITED)
        return result.si_code, result.si_status


def run(options: LauncherOptions) -> None:
    bus: ManagerBus | None = None
    attempt = 0
    if options.wait_schedule is not None:
        bus = ManagerBus(options.system)
        attempt = wait_before_restart(options, bus)
    started = time.monotonic()
    try:
        sidecar = Sidecar(options.command)
    except OSError as e:
        notify(f"STATUS={CRASH_MARK}cannot start {options.command[0]}: {e.strerror}")
        log(f"cannot start {options.command[0]!r}: {e.strerror}")
        sys.exit(127 if isinstance(e, FileNotFoundError) else 126)
    notify("READY=1", f"STATUS=running; pid {sidecar.pid}")
    if bus is None:
        try:
            bus = ManagerBus(options.system)
            attempt = bus.restart_count(options.unit)
        except OSError as e:  # keep supervising; StartLimitBurst= still ends a crash loop
            log(f"{e}; cannot tell the attempt number, so the start limit will end a crash loop")
    notify(f"STATUS=running; pid {sidecar.pid}; attempt {attempt}/{options.attempts}")

    ended = sidecar.wait(max(0.0, options.stability_window_s - (time.monotonic() - started)))
    if ended is None:
        if attempt and bus is not None:
            try:
                bus.reset_failed(options.unit)
                log(f"sidecar stable for {options.stability_window_s:g}s: restart budget reset")
            except OSError as e:
                log(f"{e}; the restart budget was not reset")
        attempt = 0
        notify(f"STATUS=running; pid {sidecar.pid}; stable")
        ended = sidecar.wait(None)
    code, status = ended
    cause = describe_exit(code, status)
    if sidecar.stopping:
        log(f"sidecar {cause} after stop request")
        exit_like(code, status)
    if attempt >= options.attempts:
        notify(f"STATUS=gave up after {options.attempts} restarts; {CRASH_MARK}{cause}")
        log(f"sidecar {cause}; giving up after {options.attempts} restarts")
        sys.exit(GAVE_UP_STATUS)
    notify(f"STATUS={CRASH_MARK}{cause}")
    log(f"sidecar {cause}; restart {attempt + 1}/{options.attempts} follows")
    exit_like(code, status)


def main(argv: list[str] | None = None) -> None:
    try:
        options = parse_launcher_arguments(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        log(f"usage error: {e}")
        sys.exit(2)
    try:
        run(options)
    except OSError as e:
        log(str(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
