"""units.toml: defaults, loading, validation with one-line errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agor_systemd.config import (
    DEFAULT_COMMAND,
    Config,
    ConfigError,
    RestartPolicy,
    SidecarConfig,
    SocketConfig,
    config_home,
    default_config_path,
    home_text,
    load_config,
    parse_config,
    resolve_command,
    restart_policy,
    watchdog_config,
)
from agor_systemd.unitfile import HomePath


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads the developer's real ~/.config/agor/units.toml."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)


def write(tmp_path: Path, text: str | bytes, name: str = "units.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str | bytes) -> str:
    """The one-line message load_config gives for this file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


def make_executable(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


# --- defaults ---------------------------------------------------------------------------------


def test_defaults():
    config = Config()
    assert config.restart == RestartPolicy(base_s=1.0, cap_s=30.0, attempts=5, stability_window_s=300.0)
    assert config.sidecar == SidecarConfig(
        command=("/usr/bin/node", HomePath(".local/share/agor/dist/claude-runner.mjs")),
        working_directory=HomePath(".local/share/agor"),
        environment_file=None,
    )
    assert config.sidecar.command == DEFAULT_COMMAND


def test_empty_file_is_all_defaults(tmp_path):
    assert load_text(tmp_path, "") == Config()


def test_empty_tables_are_all_defaults(tmp_path):
    assert load_text(tmp_path, "[sidecar]\n[restart]\n") == Config()


# --- where the file is --------------------------------------------------------------------------


def test_default_path_honours_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_home() == tmp_path / "xdg"
    assert default_config_path() == tmp_path / "xdg" / "agor" / "units.toml"


@pytest.mark.parametrize("value", ["", "relative/xdg"])
def test_empty_or_relative_xdg_config_home_is_ignored(tmp_path, monkeypatch, value):
    # XDG Base Directory spec: relative paths are invalid and must be ignored
    monkeypatch.setenv("XDG_CONFIG_HOME", value)
    assert default_config_path() == tmp_path / "home" / ".config" / "agor" / "units.toml"


def test_unset_xdg_config_home_uses_home():
    assert default_config_path() == Path(os.environ["HOME"]) / ".config" / "agor" / "units.toml"


def test_default_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "agor").mkdir(parents=True)
    (tmp_path / "xdg" / "agor" / "units.toml").write_text("[restart]\nattempts = 3\n")
    assert load_config().restart.attempts == 3


def test_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing-here"))
    assert load_config() == Config()


def test_missing_explicit_file_is_an_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: no such file$"):
        load_config(path)


def test_directory_instead_of_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r": Is a directory$"):
        load_config(tmp_path)


def test_invalid_toml_names_the_file(tmp_path):
    message = config_error(tmp_path, "[restart\nattempts = 3\n")
    assert "line 1" in message


def test_non_utf8_file_names_the_file(tmp_path):
    assert config_error(tmp_path, b'[sidecar]\ncommand = ["/bin/\xff"]\n') == "not UTF-8 text"


# --- a full file --------------------------------------------------------------------------------


def test_full_file(tmp_path):
    config = load_text(
        tmp_path,
        """
        [sidecar]
        command = ["/usr/bin/node", "~/agor/dist/claude-runner.mjs", "--flag=~/not-home", "~"]
        working_directory = "~/agor"
        environment_file = "~/.config/agor/sidecar.env"

        [restart]
        base_s = 0.5
        cap_s = 20
        attempts = 7
        stability_window_s = 600.5
    """,
    )
    assert config.sidecar == SidecarConfig(
        command=("/usr/bin/node", HomePath("agor/dist/claude-runner.mjs"), "--flag=~/not-home", HomePath("")),
        working_directory=HomePath("agor"),
        environment_file=HomePath(".config/agor/sidecar.env"),
    )
    assert config.restart == RestartPolicy(base_s=0.5, cap_s=20, attempts=7, stability_window_s=600.5)


def test_partial_restart_table_keeps_other_defaults(tmp_path):
    assert load_text(tmp_path, "[restart]\ncap_s = 60\n").restart == RestartPolicy(cap_s=60)


def test_absolute_paths_stay_verbatim(tmp_path):
    config = load_text(
        tmp_path, '[sidecar]\nworking_directory = "/srv/agor data"\nenvironment_file = "/etc/agor/sidecar.env"\n'
    )
    assert config.sidecar.working_directory == "/srv/agor data"
    assert config.sidecar.environment_file == "/etc/agor/sidecar.env"


@pytest.mark.parametrize(
    "value, result",
    [
        ("~", HomePath("")),
        ("~/", HomePath("")),
        ("~/x", HomePath("x")),
        ("~//x", HomePath("x")),
        ("~user/x", "~user/x"),
        ("/abs/~/x", "/abs/~/x"),
        ("x~", "x~"),
    ],
)
def test_home_text(value, result):
    assert home_text(value) == result


# --- [restart] validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('[restart]\nbase_s = "1"', "[restart] base_s must be a number, got '1'"),
        ("[restart]\nbase_s = true", "[restart] base_s must be a number, got True"),
        ("[restart]\nattempts = false", "[restart] attempts must be a number, got False"),
        ("[restart]\ncap_s = nan", "[restart] cap_s must be a number, got nan"),
        ("[restart]\ncap_s = inf", "[restart] cap_s must be a number, got inf"),
        ("[restart]\ncap_s = [1]", "[restart] cap_s must be a number, got [1]"),
        ("[restart]\nbase_s = 0", "[restart] base_s must be between 0.001 and 3600, got 0"),
        ("[restart]\nbase_s = -1", "[restart] base_s must be between 0.001 and 3600, got -1"),
        ("[restart]\nbase_s = 3601", "[restart] base_s must be between 0.001 and 3600, got 3601"),
        ("[restart]\ncap_s = 86401", "[restart] cap_s must be between 0.001 and 86400, got 86401"),
        ("[restart]\nattempts = -1", "[restart] attempts must be between 0 and 1000, got -1"),
        ("[restart]\nattempts = 1001", "[restart] attempts must be between 0 and 1000, got 1001"),
        ("[restart]\nattempts = 2.5", "[restart] attempts must be a whole number, got 2.5"),
        ("[restart]\nattempts = 3.0", "[restart] attempts must be a whole number, got 3.0"),
        (
            "[restart]\nstability_window_s = 0.5",
            "[restart] stability_window_s must be between 1 and 2.592e+06, got 0.5",
        ),
        ("[restart]\nbase_s = 10\ncap_s = 5", "[restart] cap_s (5) is smaller than base_s (10)"),
        ("[restart]\nbase_s = 60", "[restart] cap_s (30) is smaller than base_s (60)"),
        (
            "[restart]\nbackoff = 2",
            "[restart] has no setting 'backoff' (known: base_s, cap_s, attempts, stability_window_s)",
        ),
    ],
)
def test_restart_errors(tmp_path, text, message):
    assert config_error(tmp_path, text + "\n") == message


@pytest.mark.parametrize(
    "key, value",
    [
        ("base_s", 0.001),
        ("base_s", 3600),
        ("cap_s", 3600),
        ("cap_s", 86400),
        ("attempts", 0),
        ("attempts", 1000),
        ("stability_window_s", 1),
        ("stability_window_s", 30 * 86400),
    ],
)
def test_restart_limits_are_inclusive(key, value):
    values = {"cap_s": 86400, key: value}  # a large cap so a large base_s is consistent
    assert getattr(restart_policy(values), key) == value


def test_restart_policy_overrides_a_base():
    base = RestartPolicy(base_s=2, cap_s=40, attempts=3)
    assert restart_policy({"attempts": 9}, base) == RestartPolicy(base_s=2, cap_s=40, attempts=9)


def test_cap_equal_to_base_is_fine():
    assert restart_policy({"base_s": 5, "cap_s": 5}) == RestartPolicy(base_s=5, cap_s=5)


# --- [sidecar] validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("[sidecar]\ncommand = []", "[sidecar] command is empty: give the program and its arguments"),
        (
            '[sidecar]\ncommand = "/usr/bin/node x"',
            '[sidecar] command must be a list of strings, e.g. ["/usr/bin/node", "runner.mjs"]',
        ),
        (
            '[sidecar]\ncommand = ["/usr/bin/node", 3]',
            '[sidecar] command must be a list of strings, e.g. ["/usr/bin/node", "runner.mjs"]',
        ),
        ('[sidecar]\ncommand = ["bin/node"]', "[sidecar] command 'bin/node' is a relative path; give an absolute path"),
        ('[sidecar]\ncommand = ["./node"]', "[sidecar] command './node' is a relative path; give an absolute path"),
        (
            '[sidecar]\ncommand = ["~user/node"]',
            "[sidecar] command '~user/node' is a relative path; give an absolute path",
        ),
        ('[sidecar]\ncommand = ["/bin/x", "a\\u0000b"]', "[sidecar] command argument 1 contains a NUL byte"),
        ("[sidecar]\nworking_directory = 3", "[sidecar] working_directory must be a string path, got 3"),
        (
            '[sidecar]\nworking_directory = "srv/agor"',
            "[sidecar] working_directory must be an absolute path, got 'srv/agor'",
        ),
        (
            '[sidecar]\nworking_directory = "/srv/../agor"',
            "[sidecar] working_directory is not a normalized path: '/srv/../agor'",
        ),
        (
            '[sidecar]\nworking_directory = "/srv/agor\\n"',
            "[sidecar] working_directory contains a control character (newline?): '/srv/agor\\n'",
        ),
        (
            '[sidecar]\nenvironment_file = "/etc/agor/*.env"',
            "[sidecar] environment_file contains a glob character (* ? [ \\): '/etc/agor/*.env'",
        ),
        (
            '[sidecar]\nenvironment_file = "~/agor/env?"',
            "[sidecar] environment_file contains a glob character (* ? [ \\): '~/agor/env?'",
        ),
        (
            '[sidecar]\nenvironment_file = "/etc/agor/[ab].env"',
            "[sidecar] environment_file contains a glob character (* ? [ \\): '/etc/agor/[ab].env'",
        ),
        ("[sidecar]\nenvironment_file = false", "[sidecar] environment_file must be a string path, got False"),
        (
            '[sidecar]\nrestart = "always"',
            "[sidecar] has no setting 'restart' (known: command, working_directory, environment_file)",
        ),
        (
            '[service]\nType = "simple"',
            "unknown table [service] (known: [sidecar], [restart], [watchdog], [walcheck], [sandbox], [socket], "
            "[btmsg], [relay], [telemetry])",
        ),
        ("sidecar = 1", "'sidecar' must be a table like [sidecar]"),
        ("attempts = 5", "'attempts' must be a table like [attempts]"),
    ],
)
def test_sidecar_and_table_errors(tmp_path, text, message):
    assert config_error(tmp_path, text + "\n") == message


def test_config_errors_name_the_key_through_parse_config():
    with pytest.raises(ConfigError, match=r"^\[restart\] attempts "):
        parse_config({"restart": {"attempts": "5"}})


# --- the program: absolute, ~/..., or looked up on PATH now ------------------------------------


def test_absolute_program_is_kept_even_if_missing():
    # install checks existence; the config only checks the spelling
    assert resolve_command(["/opt/not/there", "x"]) == ("/opt/not/there", "x")


def test_home_program_becomes_home_path():
    assert resolve_command(["~/bin/runner", "~/data"]) == (HomePath("bin/runner"), HomePath("data"))


def test_bare_program_is_resolved_on_path(tmp_path, monkeypatch):
    program = make_executable(tmp_path / "bin", "agor-runner")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert resolve_command(["agor-runner", "--x"]) == (str(program), "--x")


def test_bare_program_in_toml_is_resolved(tmp_path, monkeypatch):
    program = make_executable(tmp_path / "bin", "node")
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}:{tmp_path / 'bin'}")
    assert load_text(tmp_path, '[sidecar]\ncommand = ["node", "run.mjs"]\n').sidecar.command == (
        str(program),
        "run.mjs",
    )


def test_non_executable_on_path_is_not_found(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "node").write_text("not executable")
    (tmp_path / "bin" / "node").chmod(0o644)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    if os.access(tmp_path / "bin" / "node", os.X_OK):
        pytest.skip("root can execute anything here")
    assert config_error(tmp_path, '[sidecar]\ncommand = ["node"]\n') == (
        "[sidecar] command 'node' was not found on PATH; give an absolute path"
    )


def test_program_not_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert config_error(tmp_path, '[sidecar]\ncommand = ["agor-no-such-runner"]\n') == (
        "[sidecar] command 'agor-no-such-runner' was not found on PATH; give an absolute path"
    )


@pytest.mark.parametrize("path_entry", ["bin", ":/nonexistent"])
def test_program_found_through_a_relative_path_entry_is_made_absolute(tmp_path, monkeypatch, path_entry):
    """A unit needs an absolute program; PATH may contain relative entries ('' means '.')."""
    make_executable(tmp_path / "bin", "node")
    monkeypatch.chdir(tmp_path if path_entry == "bin" else tmp_path / "bin")
    monkeypatch.setenv("PATH", path_entry)
    program = resolve_command(["node"])[0]
    assert program == str(tmp_path / "bin" / "node")


# --- issue 15: a byte-order mark, environment-file lines systemd drops -------------------------


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = write(tmp_path, "\ufeff[restart]\nattempts = 3\n")
    assert load_config(path).restart.attempts == 3


def test_only_a_leading_byte_order_mark_is_forgiven(tmp_path):
    path = write(tmp_path, "[restart]\n\ufeffattempts = 3\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("export X=1\n", [(1, "export X=1", "systemd does not understand `export`; leave it out")]),
        (
            "GOOD=1\nWITH-DASH=x\n",
            [
                (
                    2,
                    "WITH-DASH=x",
                    "'WITH-DASH' is not a variable name (letters, digits and _, not starting with a digit)",
                )
            ],
        ),
        ("1ST=x\n", [(1, "1ST=x", "'1ST' is not a variable name (letters, digits and _, not starting with a digit)")]),
        ("JUST_A_NAME\n", [(1, "JUST_A_NAME", "no `=` in it")]),
        ("=value\n", [(1, "=value", "no variable name before `=`")]),
        ("A=1\r\nB\r\n", [(2, "B", "no `=` in it")]),
        (
            "BAD NAME=1\n",
            [(1, "BAD NAME=1", "'BAD NAME' is not a variable name (letters, digits and _, not starting with a digit)")],
        ),
    ],
    ids=["export", "dash", "digit-first", "no-equals", "no-name", "crlf", "space-in-name"],
)
def test_environment_lines_systemd_drops(text, expected):
    from agor_systemd.config import dropped_environment_lines

    assert dropped_environment_lines(text) == expected


def test_environment_lines_systemd_applies():
    """Comments, blank lines, spaces around `=`, quotes and continuations spanning lines: all kept."""
    from agor_systemd.config import dropped_environment_lines

    text = (
        "# a comment\n; another\n\n  INDENTED=1\nSPACED = 2\nQ='single\nnot-a-line'\n"
        'D="double \\" quote\nstill value"\nC=continued \\\nnot-a-key-either\n'
        "_UNDER_9=x\n"
    )
    assert dropped_environment_lines(text) == []


def test_a_line_after_a_comment_ending_in_a_backslash_is_flagged():
    """systemd < 254 reads it as more comment, ≥ 254 as a line of its own: neither applies it."""
    from agor_systemd.config import dropped_environment_lines

    assert dropped_environment_lines("# note \\\nNO_EQUALS\n") == [(2, "NO_EQUALS", "no `=` in it")]


# --- [watchdog] settings that cannot work are refused --------------------------------------------

LONG_SOCKET = "/run/user/1000/" + "s" * 93  # 108 bytes: no room for sun_path's NUL


@pytest.mark.parametrize(
    "text, message",
    [
        ("[watchdog]\ninterval_s = 0.001", "[watchdog] interval_s must be 0 (off) or at least 1 s, got 0.001"),
        ("[watchdog]\ninterval_s = 1e-7", "[watchdog] interval_s must be 0 (off) or at least 1 s, got 1e-07"),
        ("[watchdog]\ninterval_s = 0.999", "[watchdog] interval_s must be 0 (off) or at least 1 s, got 0.999"),
        (
            f'[watchdog]\nready = "socket:{LONG_SOCKET}"',
            f"[watchdog] ready socket path is 108 bytes long; a unix socket path can have at most 107: '{LONG_SOCKET}'",
        ),
        (
            f'[watchdog]\nprobe = "socket:{LONG_SOCKET}"',
            f"[watchdog] probe socket path is 108 bytes long; a unix socket path can have at most 107: '{LONG_SOCKET}'",
        ),
        (
            '[watchdog]\ninterval_s = 0\nprobe = "tcp:8080"',
            "[watchdog] probe = 'tcp:8080' needs the watchdog, which interval_s = 0 turns off; "
            "set interval_s or remove it",
        ),
        (
            "[watchdog]\ninterval_s = 0\nactivity_timeout_s = 60",
            "[watchdog] activity_timeout_s = 60 needs the watchdog, which interval_s = 0 turns off; "
            "set interval_s or remove it",
        ),
        (
            '[watchdog]\ninterval_s = 0\nactivity_timeout_s = 60\nprobe = "exec:true"',
            "[watchdog] probe = 'exec:true' and activity_timeout_s = 60 need the watchdog, which interval_s = 0 "
            "turns off; set interval_s or remove it",
        ),
    ],
)
def test_watchdog_settings_that_cannot_work(tmp_path, text, message):
    assert config_error(tmp_path, text + "\n") == message


@pytest.mark.parametrize(
    "values",
    [
        {"interval_s": 0},
        {"interval_s": 1},
        {"interval_s": 1.5, "probe": "tcp:80", "activity_timeout_s": 9},
        {"ready": "socket:/run/user/1000/" + "s" * 92},  # 107 bytes: the longest that fits
        {"ready": "socket:/run/user/1000/" + "é" * 46},  # 107 bytes, 61 characters
    ],
)
def test_watchdog_settings_that_work(values):
    watchdog = watchdog_config(values)
    assert all(getattr(watchdog, key) == value for key, value in values.items())


def test_multibyte_socket_path_is_measured_in_bytes():
    with pytest.raises(ConfigError, match="is 108 bytes long"):
        watchdog_config({"ready": "socket:/run/user/1000/" + "é" * 46 + "x"})


def test_turning_the_watchdog_off_keeps_the_check_for_a_configured_probe():
    """A command-line override (--watchdog-s 0) is checked against the settings it lands on."""
    configured = watchdog_config({"probe": "tcp:8080"})
    with pytest.raises(ConfigError, match="probe = 'tcp:8080' needs the watchdog"):
        watchdog_config({"interval_s": 0}, configured)


def test_socket_table():
    config = parse_config({"socket": {"enabled": False, "buffer_mib": 16, "client_queue_mib": 0.5}})
    assert config.socket == SocketConfig(enabled=False, buffer_mib=16, client_queue_mib=0.5)
    assert parse_config({}).socket == SocketConfig(enabled=True, buffer_mib=4.0, client_queue_mib=4.0)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"enabled": "yes"}, "[socket] enabled must be true or false, got 'yes'"),
        ({"buffer_mib": 0}, "[socket] buffer_mib must be between 0.0625 and 1024, got 0"),
        ({"backlog": 1}, "[socket] has no setting 'backlog' (known: enabled, buffer_mib, client_queue_mib)"),
    ],
)
def test_socket_table_errors(values, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"socket": values})
    assert str(e.value) == message
