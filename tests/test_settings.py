"""One declaration per setting (config.SETTINGS) drives units.toml parsing and the override flags."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from agor_systemd.cli import main
from agor_systemd.config import (
    SETTINGS,
    TABLES,
    Config,
    ConfigError,
    SandboxConfig,
    apply_overrides,
    parse_config,
)
from agor_systemd.unitfile import HomePath


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads the developer's real ~/.config/agor/units.toml."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


# --- the declaration covers every field, once ----------------------------------------------------


def test_the_tables_are_the_fields_of_config():
    assert list(TABLES) == [f.name for f in fields(Config)]
    assert all(type(getattr(Config(), name)) is table.type for name, table in TABLES.items())


@pytest.mark.parametrize("table", list(TABLES))
def test_every_field_is_declared_once_in_order(table):
    declared = [s.key for s in SETTINGS if s.table == table]
    assert declared == [f.name for f in fields(TABLES[table].type)]


def test_every_number_has_limits_that_hold_its_default():
    numbers = [s for s in SETTINGS if isinstance(s.default, int | float) and not isinstance(s.default, bool)]
    assert numbers, "no numeric setting found"
    for setting in numbers:
        assert setting.limits is not None, setting.label
        low, high = setting.limits
        assert low <= setting.default <= high, setting.label
        assert setting.parse(setting, setting.default) == setting.default


def test_every_setting_accepts_its_own_default_from_the_file():
    """The declared parser of each setting takes the TOML spelling of its default back."""

    def toml_value(value):
        if isinstance(value, tuple):
            return [toml_value(v) for v in value]
        return str(value) if isinstance(value, HomePath) else value

    for setting in SETTINGS:
        if setting.default is None:  # no TOML spelling: leave the setting out
            continue
        parsed = parse_config({setting.table: {setting.key: toml_value(setting.default)}})
        assert getattr(getattr(parsed, setting.table), setting.key) == setting.default, setting.label


def test_unknown_keys_name_the_known_ones_in_declaration_order():
    with pytest.raises(ConfigError) as info:
        parse_config({"watchdog": {"intervall_s": 5}})
    assert str(info.value) == (
        "[watchdog] has no setting 'intervall_s' (known: interval_s, ready, ready_timeout_s, "
        "activity_timeout_s, probe, probe_timeout_s)"
    )


# --- the override flags -----------------------------------------------------------------------------

# The flags install, render and verify have had since issue 15: the declaration must keep them.
OVERRIDE_FLAGS = {
    "--working-directory": "TEXT",
    "--environment-file": "TEXT",
    "--base-s": "FLOAT",
    "--cap-s": "FLOAT",
    "--attempts": "INTEGER",
    "--stability-window-s": "FLOAT",
    "--watchdog-s": "FLOAT",
    "--ready": "TEXT",
    "--ready-timeout-s": "FLOAT",
    "--activity-timeout-s": "FLOAT",
    "--probe": "TEXT",
    "--probe-timeout-s": "FLOAT",
    "--sandbox": "BOOLEAN",
    "--sandbox-required": "BOOLEAN",
    "--read-write-path": "TEXT",
    "--read-only-path": "TEXT",
    "--relay": "BOOLEAN",
    "--otlp-endpoint": "TEXT",
}


@pytest.mark.parametrize("command", ["install", "render", "verify"])
def test_the_override_flags_are_generated_from_the_declaration(command):
    params = main.commands[command].params
    options = {
        p.opts[0]: p.type.name.upper()
        for p in params
        if isinstance(p, click.Option) and p.name in {s.name for s in SETTINGS}
    }
    assert options == OVERRIDE_FLAGS
    switch = next(p for p in params if p.opts == ["--sandbox"])
    assert switch.secondary_opts == ["--no-sandbox"]
    assert [p.multiple for p in params if p.opts[0] in ("--read-write-path", "--read-only-path")] == [True, True]
    command_words = [p for p in params if isinstance(p, click.Argument)]
    assert [(p.name, p.nargs) for p in command_words] == [("sidecar_command", -1)]


def test_every_flag_help_says_the_default_or_that_it_repeats():
    for param in main.commands["render"].params:
        if isinstance(param, click.Option) and param.name in {s.name for s in SETTINGS}:
            assert "(default " in param.help or "(repeatable" in param.help, param.opts


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_flag_value_is_checked_as_in_units_toml():
    result = run("render", "--systemd-version", "254", "--attempts", "2000", "--", "/bin/true")
    assert result.exit_code == 1
    assert result.stderr == "agor-units: error: [restart] attempts must be between 0 and 1000, got 2000\n"


def test_a_flag_that_breaks_a_rule_across_settings_is_refused(tmp_path):
    config = tmp_path / "units.toml"
    config.write_text("[restart]\ncap_s = 4\n")
    result = run("--config", str(config), "render", "--systemd-version", "254", "--base-s", "8", "--", "/bin/true")
    assert result.exit_code == 1
    assert result.stderr == "agor-units: error: [restart] cap_s (4) is smaller than base_s (8)\n"


def by_flag(flag: str):
    return next(s for s in SETTINGS if s.flag == flag)


def test_repeated_path_flags_add_to_the_files_list():
    config = parse_config({"sandbox": {"read_write_paths": ["/srv/a"], "read_only_paths": ["~/ro"]}})
    result = apply_overrides(config, {by_flag("--read-write-path"): ["/srv/b", "~/c"]})
    assert result.sandbox.read_write_paths == ("/srv/a", "/srv/b", HomePath("c"))
    assert result.sandbox.read_only_paths == (HomePath("ro"),)


def test_an_appended_path_is_checked_like_a_file_entry():
    with pytest.raises(ConfigError, match=r"^\[sandbox\] read_write_paths entry must be an absolute path"):
        apply_overrides(Config(), {by_flag("--read-write-path"): ["relative"]})


def test_switch_flags_replace_the_file_value():
    config = parse_config({"sandbox": {"enabled": True, "required": False}})
    result = apply_overrides(config, {by_flag("--sandbox/--no-sandbox"): False, by_flag("--sandbox-required"): True})
    assert result.sandbox == SandboxConfig(enabled=False, required=True)


@pytest.mark.parametrize(
    ("flags", "enabled"),
    [([], True), (["--no-sandbox"], False), (["--sandbox"], True)],
    ids=["none", "no-sandbox", "sandbox"],
)
def test_switches_left_out_keep_units_toml(tmp_path, flags, enabled):
    config = tmp_path / "units.toml"
    config.write_text("[sandbox]\nrequired = true\n")
    result = run("--config", str(config), "render", "--systemd-version", "254", *flags, "--", "/bin/true")
    assert result.exit_code == 0, result.output
    # the launcher gets no sandbox words at all when the sandbox is off
    words = '"--sandbox" "required"' if enabled else '"--sandbox"'
    assert (words in result.stdout) == enabled
