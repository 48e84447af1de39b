"""The launcher's command line, read back by health from ExecStart; exit descriptions."""

from __future__ import annotations

import signal

import pytest

from agor_systemd.giveup import GAVE_UP_STATUS
from agor_systemd.sidecar.protocol import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    SIDECAR_UNIT,
    LauncherOptions,
    describe_exit,
    find_launcher_arguments,
    launcher_arguments,
    parse_launcher_arguments,
)

HOSTILE_COMMAND = ("/usr/bin/node", "--", "--unit", "x.service", "--system", "a b", "", "%h", "$HOME", "\n", "ü")


def options(**overrides) -> LauncherOptions:
    values = dict(unit=SIDECAR_UNIT, attempts=5, stability_window_s=300.0, command=("/usr/bin/node", "run.mjs"))
    values.update(overrides)
    return LauncherOptions(**values)


def round_trip(opts: LauncherOptions) -> LauncherOptions:
    return parse_launcher_arguments(launcher_arguments(opts))


def assert_same(a: LauncherOptions, b: LauncherOptions) -> None:
    assert {n: getattr(a, n) for n in LauncherOptions.__slots__} == {
        n: getattr(b, n) for n in LauncherOptions.__slots__
    }


def test_constants():
    assert SIDECAR_UNIT == "agor-sidecar.service"
    assert GAVE_UP_STATUS == 250
    assert (CLD_EXITED, CLD_KILLED, CLD_DUMPED) == (1, 2, 3)


def test_native_mode_arguments():
    assert launcher_arguments(options()) == [
        "--unit",
        "agor-sidecar.service",
        "--attempts",
        "5",
        "--stability-window",
        "300",
        "--",
        "/usr/bin/node",
        "run.mjs",
    ]


def test_fallback_mode_arguments():
    args = launcher_arguments(options(wait_schedule=(1.0, 2.0, 4.0, 8.0, 16.0), system=True))
    assert args == [
        "--unit",
        "agor-sidecar.service",
        "--attempts",
        "5",
        "--stability-window",
        "300",
        "--wait-schedule",
        "1,2,4,8,16",
        "--system",
        "--",
        "/usr/bin/node",
        "run.mjs",
    ]


@pytest.mark.parametrize(
    "opts",
    [
        options(),
        options(wait_schedule=(1.0, 2.0, 4.0, 8.0, 16.0)),
        options(wait_schedule=(0.2, 0.4, 0.8, 1.6, 3.2), system=True),
        options(system=True),
        options(attempts=0, stability_window_s=1.0),
        options(stability_window_s=600.5, wait_schedule=(30.0,)),
        options(command=HOSTILE_COMMAND),
        options(command=HOSTILE_COMMAND, wait_schedule=(1.0, 2.0), system=True),
        options(command=("/bin/x",)),
        options(unit="agor-other@instance.service"),
    ],
    ids=lambda o: repr(launcher_arguments(o))[:60],
)
def test_round_trip(opts):
    assert_same(round_trip(opts), opts)
    assert round_trip(opts) == opts


def test_double_dash_inside_the_command_is_kept():
    parsed = parse_launcher_arguments(
        ["--unit", "u", "--attempts", "1", "--stability-window", "5", "--", "/bin/x", "--", "--unit", "v"]
    )
    assert parsed.command == ("/bin/x", "--", "--unit", "v")
    assert parsed.unit == "u"


@pytest.mark.parametrize("value", [1234567.0, 2592000.0 - 1, 300.25, 1.0000001])
def test_stability_window_round_trips_exactly(value):
    """The launcher reads its stability window from this argv: it must be the configured one.

    f"{x:g}" keeps six significant digits, so 1234567 s comes back as 1234570 s.
    """
    assert round_trip(options(stability_window_s=value)).stability_window_s == value


@pytest.mark.parametrize("schedule", [(1.2345678, 2.4691356), (60.0, 86399.25)])
def test_wait_schedule_round_trips_exactly(schedule):
    """The launcher waits, and health predicts, from these numbers; both must be the configured delays."""
    assert round_trip(options(wait_schedule=schedule)).wait_schedule == schedule


def test_options_equality():
    assert options() == options()
    assert options() != options(system=True)
    assert options() != options(wait_schedule=(1.0,))
    assert options() != "not options"


# --- parse errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attempts", "5", "--stability-window", "300", "--", "/bin/x"], "missing launcher argument --unit"),
        (["--unit", "u", "--stability-window", "300", "--", "/bin/x"], "missing launcher argument --attempts"),
        (["--unit", "u", "--attempts", "5", "--", "/bin/x"], "missing launcher argument --stability-window"),
        (["--unit", "u", "--attempts", "5", "--stability-window", "300", "--"], "no sidecar command after '--'"),
        (["--unit", "u", "--attempts", "5", "--stability-window", "300"], "no sidecar command after '--'"),
        ([], "no sidecar command after '--'"),
        (["--unit", "u", "--bogus", "1", "--", "/bin/x"], "unexpected launcher argument '--bogus'"),
        (["--unit", "u", "/bin/x"], "unexpected launcher argument '/bin/x'"),
        (["--unit"], "unexpected launcher argument '--unit'"),
    ],
)
def test_parse_errors(args, message):
    with pytest.raises(ValueError) as info:
        parse_launcher_arguments(args)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "flag, value", [("--attempts", "five"), ("--stability-window", "x"), ("--wait-schedule", "1,,2")]
)
def test_bad_numbers_raise_value_error(flag, value):
    args = {"--unit": "u", "--attempts": "5", "--stability-window": "300"} | {flag: value}
    with pytest.raises(ValueError):
        parse_launcher_arguments([w for kv in args.items() for w in kv] + ["--", "/bin/x"])


# --- finding the launcher in ExecStart's argv --------------------------------------------------


def test_find_in_python_module_invocation():
    args = launcher_arguments(options(wait_schedule=(1.0, 2.0)))
    argv = ["/usr/bin/python3", "-I", "-m", "agor_systemd.sidecar.launcher", *args]
    assert find_launcher_arguments(argv) == args
    assert parse_launcher_arguments(find_launcher_arguments(argv)) == options(wait_schedule=(1.0, 2.0))


def test_find_in_console_script_invocation():
    args = launcher_arguments(options())
    assert find_launcher_arguments(["/opt/venv/bin/agor-launch", *args]) == args


def test_find_uses_the_first_launcher_word():
    # a sidecar argument that looks like the launcher comes after the launcher's own word
    args = launcher_arguments(options(command=("/bin/x", "agor_systemd.sidecar.launcher")))
    argv = ["/usr/bin/python3", "-m", "agor_systemd.sidecar.launcher", *args]
    assert find_launcher_arguments(argv) == args


@pytest.mark.parametrize("argv", [[], ["/usr/bin/node", "run.mjs"], ["/usr/bin/python3", "-m", "agor_systemd"]])
def test_find_returns_none_without_a_launcher(argv):
    assert find_launcher_arguments(argv) is None


# --- describe_exit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, status, text",
    [
        (CLD_EXITED, 0, "exited with status 0"),
        (CLD_EXITED, 3, "exited with status 3"),
        (CLD_EXITED, 250, "exited with status 250"),
        (CLD_KILLED, signal.SIGTERM, "killed by SIGTERM"),
        (CLD_KILLED, signal.SIGKILL, "killed by SIGKILL"),
        (CLD_KILLED, 9, "killed by SIGKILL"),
        (CLD_DUMPED, signal.SIGSEGV, "killed by SIGSEGV (core dumped)"),
        (CLD_DUMPED, signal.SIGABRT, "killed by SIGABRT (core dumped)"),
        (CLD_KILLED, 0, "killed by signal 0"),
        (CLD_KILLED, 200, "killed by signal 200"),
        (CLD_DUMPED, 200, "killed by signal 200 (core dumped)"),
    ],
)
def test_describe_exit(code, status, text):
    assert describe_exit(code, status) == text
