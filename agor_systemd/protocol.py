"""What the launcher and its readers agree on: its command line, exit status and STATUS= text.

The health reader takes the restart budget and (in fallback mode) the wait schedule from
the launcher's ExecStart= argv as systemd reports it over D-Bus, so health is computed
from systemd's own state and never from a side file. Kept import-light: the launcher,
which systemd starts on every restart, imports this module.
"""

from __future__ import annotations

SIDECAR_UNIT = "agor-sidecar.service"

# The launcher exits with this status after the last allowed crash; the unit lists it in
# RestartPreventExitStatus=, so the unit goes `failed` at once instead of after one more
# holdoff. 250 is outside the ranges used by shells (126–165) and systemd (200–245).
GAVE_UP_STATUS = 250

# STATUS= text after a sidecar death; health reads the cause back from it because the
# launcher's own exit can only imitate the child's (a core dump cannot be re-created).
CRASH_MARK = "sidecar crashed: "

# siginfo si_code values systemd reports as ExecMainCode
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


class LauncherOptions:
    """The launcher's settings. A plain class: dataclasses costs the launcher ~12 ms to import."""

    __slots__ = ("unit", "attempts", "stability_window_s", "command", "wait_schedule", "system")

    def __init__(self, unit: str, attempts: int, stability_window_s: float, command: tuple[str, ...],
                 wait_schedule: tuple[float, ...] | None = None, system: bool = False) -> None:
        self.unit = unit
        self.attempts = attempts
        self.stability_window_s = stability_window_s
        self.command = command
        self.wait_schedule = wait_schedule  # fallback mode: the launcher waits out each delay itself
        self.system = system

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LauncherOptions) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)


def number_text(value: float) -> str:
    """Shortest text that parses back to exactly `value` ('300', '0.2', '1.0000001')."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def launcher_arguments(options: LauncherOptions) -> list[str]:
    """The launcher's arguments (after the interpreter and module), ending with `--` argv."""
    args = ["--unit", options.unit, "--attempts", str(options.attempts),
            "--stability-window", number_text(options.stability_window_s)]
    if options.wait_schedule is not None:
        args += ["--wait-schedule", ",".join(number_text(d) for d in options.wait_schedule)]
    if options.system:
        args.append("--system")
    return args + ["--", *options.command]


def parse_launcher_arguments(args: list[str]) -> LauncherOptions:
    """Inverse of launcher_arguments; raises ValueError with a one-line reason."""
    values: dict[str, str] = {}
    system = False
    i = 0
    while i < len(args) and args[i] != "--":
        flag = args[i]
        if flag == "--system":
            system = True
            i += 1
            continue
        if flag not in ("--unit", "--attempts", "--stability-window", "--wait-schedule") or i + 1 >= len(args):
            raise ValueError(f"unexpected launcher argument {flag!r}")
        values[flag] = args[i + 1]
        i += 2
    command = tuple(args[i + 1:])
    if not command:
        raise ValueError("no sidecar command after '--'")
    for required in ("--unit", "--attempts", "--stability-window"):
        if required not in values:
            raise ValueError(f"missing launcher argument {required}")
    schedule = values.get("--wait-schedule")
    return LauncherOptions(
        unit=values["--unit"],
        attempts=int(values["--attempts"]),
        stability_window_s=float(values["--stability-window"]),
        command=command,
        wait_schedule=None if schedule is None else tuple(float(d) for d in schedule.split(",")) if schedule else (),
        system=system,
    )


def find_launcher_arguments(argv: list[str]) -> list[str] | None:
    """The launcher's own arguments inside a full ExecStart argv (interpreter, -m, module, ...)."""
    for i, word in enumerate(argv):
        if word == "agor_systemd.launcher" or word.endswith(("/agor_systemd/_launch.py", "/agor-launch")):
            return argv[i + 1:]
    return None


def describe_exit(code: int, status: int) -> str:
    """'exited with status 3', 'killed by SIGTERM', 'killed by SIGSEGV (core dumped)'."""
    if code == CLD_EXITED:
        return f"exited with status {status}"
    import signal

    try:
        name = signal.Signals(status).name
    except ValueError:
        name = f"signal {status}"
    return f"killed by {name}" + (" (core dumped)" if code == CLD_DUMPED else "")
