"""What the launcher and its readers agree on: its command line, exit status and STATUS= text.

The health reader takes the restart budget and (in fallback mode) the wait schedule from
the launcher's ExecStart= argv as systemd reports it over D-Bus, so health is computed
from systemd's own state and never from a side file. Kept import-light: the launcher,
which systemd starts on every restart, imports this module.
"""

from __future__ import annotations

import _signal
import time

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, more than the launcher's whole start
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from agor_systemd.unitfile import Text, Word

SIDECAR_UNIT = "agor-sidecar.service"
SIDECAR_SOCKET = "agor-sidecar.socket"  # the sidecar's stdio for agor (docs/socket.md)

# STATUS= text after a sidecar death; health reads the cause back from it because the
# launcher's own exit can only imitate the child's (a core dump cannot be re-created).
CRASH_MARK = "sidecar crashed: "

# siginfo si_code values systemd reports as ExecMainCode
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


BUFFER_BYTES = 4 * 1024 * 1024  # [socket] buffer_mib's default
CLIENT_QUEUE_BYTES = 4 * 1024 * 1024  # [socket] client_queue_mib's default


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(d) for d in text.split(",")) if text else ()


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",")) if text else ()


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


def _join(values: Iterable[float]) -> str:
    return ",".join(number_text(v) for v in values)


def _as_is(value: Word) -> Word:
    """Paths stay as they are (a HomePath becomes %h/... when the unit is written)."""
    return value


# flag → (attribute, parse, render); flags whose value equals the default are left out
_FLAGS: dict[str, tuple[str, Callable[[str], object], Callable[[Any], Word] | None]] = {
    "--unit": ("unit", str, _as_is),  # a template's is Specifier("n"), %n
    "--attempts": ("attempts", int, str),
    "--stability-window": ("stability_window_s", float, None),
    "--wait-schedule": ("wait_schedule", _float_list, _join),
    "--ready": ("ready", str, str),
    "--ready-timeout": ("ready_timeout_s", float, None),
    "--activity-timeout": ("activity_timeout_s", float, None),
    "--probe": ("probe", str, str),
    "--probe-timeout": ("probe_timeout_s", float, None),
    "--reset-via": ("reset_via", str, str),
    "--sandbox": ("sandbox", str, str),
    "--tcp-connect": ("tcp_connect", _int_list, _join),
    "--tcp-bind": ("tcp_bind", _int_list, _join),
    "--expect-hardening": ("expect_hardening", _str_list, ",".join),
    "--working-directory": ("working_directory", str, _as_is),
    "--environment-file": ("environment_file", str, _as_is),
    "--buffer-bytes": ("buffer_bytes", int, str),
    "--client-queue-bytes": ("client_queue_bytes", int, str),
}
_LIST_FLAGS = {"--rw": "read_write", "--ro": "read_only"}  # repeated, one path each
_REQUIRED = ("--unit", "--attempts", "--stability-window")


class LauncherOptions:
    """The launcher's settings. A plain class: dataclasses costs the launcher ~12 ms to import."""

    __slots__ = (
        "activity_timeout_s",
        "attempts",
        "buffer_bytes",
        "client_queue_bytes",
        "command",
        "environment_file",
        "expect_hardening",
        "probe",
        "probe_timeout_s",
        "read_only",
        "read_write",
        "ready",
        "ready_timeout_s",
        "reset_via",
        "sandbox",
        "stability_window_s",
        "system",
        "tcp_bind",
        "tcp_connect",
        "unit",
        "wait_schedule",
        "working_directory",
    )

    def __init__(
        self,
        unit: Word,
        attempts: int,
        stability_window_s: float,
        command: tuple[Text, ...],
        wait_schedule: tuple[float, ...] | None = None,
        system: bool = False,
        ready: str = "immediate",
        ready_timeout_s: float = 10.0,
        activity_timeout_s: float = 0.0,
        probe: str | None = None,
        probe_timeout_s: float = 5.0,
        reset_via: str = "dbus",
        sandbox: str = "off",
        read_write: tuple[Text, ...] = (),
        read_only: tuple[Text, ...] = (),
        tcp_connect: tuple[int, ...] | None = None,
        tcp_bind: tuple[int, ...] = (),
        expect_hardening: tuple[str, ...] = (),
        working_directory: Text | None = None,
        environment_file: Text | None = None,
        buffer_bytes: int = BUFFER_BYTES,
        client_queue_bytes: int = CLIENT_QUEUE_BYTES,
    ) -> None:
        self.unit = unit
        self.attempts = attempts
        self.stability_window_s = stability_window_s
        self.command = command
        self.wait_schedule = wait_schedule  # fallback mode: the launcher waits out each delay itself
        self.system = system
        self.ready = ready  # "line", "immediate", "socket:PATH", "tcp:PORT"
        self.ready_timeout_s = ready_timeout_s
        self.activity_timeout_s = activity_timeout_s  # 0: output silence is not a hang
        self.probe = probe  # "socket:PATH", "tcp:PORT" or "exec:SHELL COMMAND"
        self.probe_timeout_s = probe_timeout_s
        self.reset_via = reset_via  # "notify" (RESTART_RESET=1, systemd ≥ 258) or "dbus" (ResetFailedUnit)
        self.sandbox = sandbox  # "off", "best" (Landlock if the kernel has it) or "required"
        self.read_write = read_write
        self.read_only = read_only
        self.tcp_connect = tcp_connect  # None: any port
        self.tcp_bind = tcp_bind
        self.expect_hardening = expect_hardening  # effects of the unit's systemd hardening (hardening.EFFECTS)
        # the unit's WorkingDirectory=-/EnvironmentFile=-: systemd skips them when missing, the launcher checks
        self.working_directory = working_directory
        self.environment_file = environment_file
        # agor-sidecar.socket's bridge: stdout kept while no client is connected; one slow client's queue
        self.buffer_bytes = buffer_bytes
        self.client_queue_bytes = client_queue_bytes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LauncherOptions) and all(
            getattr(self, name) == getattr(other, name) for name in LauncherOptions.__slots__
        )


def number_text(value: float) -> str:
    """Shortest text that parses back to exactly `value` ('300', '0.2', '1.0000001')."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def launcher_arguments(options: LauncherOptions) -> list[Word]:
    """The launcher's arguments (after the interpreter and script), ending with `--` argv; a
    HomePath stays one until the unit is written (exec_line)."""
    defaults = LauncherOptions("", 0, 0.0, ())
    args: list[Word] = []
    for flag, (attr, _, render) in _FLAGS.items():
        value = getattr(options, attr)
        if flag not in _REQUIRED and (value is None or value == getattr(defaults, attr)):
            continue
        args += [flag, render(value) if render else number_text(value)]
    for flag, attr in _LIST_FLAGS.items():
        for path in getattr(options, attr):
            args += [flag, path]
    if options.system:
        args.append("--system")
    return args + ["--", *options.command]


class ParsedLauncherOptions(LauncherOptions):
    """LauncherOptions read from the launcher's argv: systemd expanded every %h already, so each
    path is a plain str (what the launcher hands to the kernel)."""

    __slots__ = ()
    unit: str
    command: tuple[str, ...]
    read_write: tuple[str, ...]
    read_only: tuple[str, ...]
    working_directory: str | None
    environment_file: str | None


def parse_launcher_arguments(args: list[str]) -> ParsedLauncherOptions:
    """Inverse of launcher_arguments; raises ValueError with a one-line reason."""
    values: dict[str, object] = {}
    lists: dict[str, list[str]] = {attr: [] for attr in _LIST_FLAGS.values()}
    system = False
    i = 0
    while i < len(args) and args[i] != "--":
        flag = args[i]
        if flag == "--system":
            system = True
            i += 1
            continue
        if (flag not in _FLAGS and flag not in _LIST_FLAGS) or i + 1 >= len(args):
            raise ValueError(f"unexpected launcher argument {flag!r}")
        if flag in _LIST_FLAGS:
            lists[_LIST_FLAGS[flag]].append(args[i + 1])
        else:
            attr, parse, _ = _FLAGS[flag]
            values[attr] = parse(args[i + 1])
        i += 2
    command = tuple(args[i + 1 :])
    if not command:
        raise ValueError("no sidecar command after '--'")
    for required in _REQUIRED:
        if _FLAGS[required][0] not in values:
            raise ValueError(f"missing launcher argument {required}")
    values.update({attr: tuple(paths) for attr, paths in lists.items()})
    # each value has the type its _FLAGS parser gives it, which a dict of them cannot say
    return ParsedLauncherOptions(command=command, system=system, **values)  # type: ignore[arg-type]


def find_launcher_arguments(argv: list[str]) -> list[str] | None:
    """The launcher's own arguments inside a full ExecStart argv (interpreter, -m, module, ...)."""
    for i, word in enumerate(argv):
        if word == "agor_systemd.sidecar.launcher" or word.endswith(("/agor_systemd/_launch.py", "/agor-launch")):
            return argv[i + 1 :]
    return None


def describe_exit(code: int, status: int) -> str:
    """'exited with status 3', 'killed by SIGTERM', 'killed by SIGSEGV (core dumped)'."""
    if code == CLD_EXITED:
        return f"exited with status {status}"

    names = {
        getattr(_signal, n): n
        for n in dir(_signal)
        if n.startswith("SIG") and not n.startswith("SIG_") and n not in ("SIGIOT", "SIGPOLL", "SIGCLD")
    }  # prefer the usual name of aliases
    name = names.get(status, f"signal {status}")
    return f"killed by {name}" + (" (core dumped)" if code == CLD_DUMPED else "")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock of systemd's *TimestampMonotonic properties."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
