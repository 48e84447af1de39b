"""agor-units on the command line, without a service manager (click's CliRunner)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agor_systemd.btmsg.units import SWEEP_SERVICE, SWEEP_TIMER
from agor_systemd.cli import main
from agor_systemd.config import Config, SidecarConfig
from agor_systemd.install import MANIFEST, current_launcher
from agor_systemd.sandbox.policy import sandbox_paths
from agor_systemd.sidecar.protocol import SIDECAR_SOCKET, SIDECAR_UNIT
from agor_systemd.walcheck.units import WALCHECK_SERVICE, WALCHECK_TIMER

TIMER_UNITS = [WALCHECK_SERVICE, WALCHECK_TIMER, SWEEP_SERVICE, SWEEP_TIMER]
SIDECAR_UNITS = [SIDECAR_UNIT, SIDECAR_SOCKET]

COMMANDS = ["render", "install", "uninstall", "health", "restart", "verify", "doctor", "demo"]


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A user with no config, no runtime directory contents and no reachable bus."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(runtime),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-bus",
    }


def launch_script() -> str:
    return current_launcher()[-1]


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stdout == ""
    assert result.stderr.startswith("agor-units: error: "), result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def sandbox_words(program: str) -> str:
    read_write, read_only = sandbox_paths(Config(sidecar=SidecarConfig(command=(program,))))
    return "".join(f'"--rw" "{p}" ' for p in map(exec_text, read_write)) + "".join(
        f'"--ro" "{p}" ' for p in map(exec_text, read_only)
    )


def exec_text(path) -> str:
    return str(path) if isinstance(path, str) else "%h/" + path.relative


def launcher_prefix() -> str:
    """install/render start the launcher with the running interpreter."""
    return f':"{sys.executable}" "-I" "-S" "{launch_script()}" '


# --- help and version ---------------------------------------------------------------------------


def test_main_help_lists_every_command(env):
    result = run(env, "--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_command_help(env, command, flag):
    result = run(env, command, flag)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: main {command} ")
    assert result.stderr == ""


def test_version(env):
    from agor_systemd import __version__

    result = run(env, "--version")
    assert result.exit_code == 0
    assert result.stdout == f"agor-units, version {__version__}\n"


# --- render ----------------------------------------------------------------------------------


def test_render_quotes_the_command(env):
    result = run(env, "render", "--systemd-version", "254", "--", "/bin/true", "a b", "$HOME", "50%")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"# {SIDECAR_UNIT}"
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_start[:1] == [
        f"ExecStart={launcher_prefix()}"
        '"--unit" "agor-sidecar.service" "--attempts" "5" "--stability-window" "300" '
        '"--ready" "line" "--sandbox" "best" "--expect-hardening" "umask,seccomp,userns,ro-system,ro-home" '
        '"--working-directory" "%h/.local/share/agor" '
        + sandbox_words("/bin/true")
        + '"--" "/bin/true" "a b" "$HOME" "50%%"'
    ]
    assert "RestartSteps=4" in lines


def test_render_for_252_uses_the_launchers_wait(env):
    result = run(env, "render", "--systemd-version", "252", "--", "/bin/true")
    assert result.exit_code == 0, result.output
    assert '"--wait-schedule" "1,2,4,8,16"' in result.stdout
    assert "RestartSec=0" in result.stdout.splitlines()


def test_render_json(env):
    result = run(env, "render", "--systemd-version", "254", "--json", "--", "/bin/true", "a b")
    assert result.exit_code == 0, result.output
    units = json.loads(result.stdout)
    assert list(units) == [*SIDECAR_UNITS, *TIMER_UNITS]
    assert '"--" "/bin/true" "a b"\n' in units[SIDECAR_UNIT]
    assert units[SIDECAR_UNIT].endswith("[Install]\nWantedBy=default.target\n")


def test_render_flags_override_the_config(env, tmp_path):
    config = tmp_path / "units.toml"
    config.write_text('[sidecar]\ncommand = ["/bin/false"]\n[restart]\nattempts = 3\n')
    result = run(
        env,
        "--config",
        str(config),
        "render",
        "--systemd-version",
        "254",
        "--attempts",
        "7",
        "--working-directory",
        "~/agor",
        "--environment-file",
        "/etc/agor.env",
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert '"--attempts" "7"' in text and '"--wait-schedule" "1,2,4,8,16,30,30"' in text  # not expressible
    assert '"--" "/bin/false"\n' in text
    assert "WorkingDirectory=-%h/agor\n" in text and "EnvironmentFile=-/etc/agor.env\n" in text
    assert '"--working-directory" "%h/agor" "--environment-file" "/etc/agor.env"' in text


def test_render_reads_the_default_config_file(env):
    config_dir = Path(env["XDG_CONFIG_HOME"]) / "agor"
    config_dir.mkdir(parents=True)
    (config_dir / "units.toml").write_text('[sidecar]\ncommand = ["/bin/echo", "from file"]\n')
    result = run(env, "render", "--systemd-version", "254")
    assert '"--" "/bin/echo" "from file"\n' in result.stdout


def test_render_without_version_and_manager_asks_systemctl(env):
    import shutil

    if shutil.which("systemctl") is None:
        pytest.skip("no systemctl")
    from agor_systemd.manager import installed_systemd_version

    version = installed_systemd_version()
    result = run(env, "render", "--", "/bin/true")
    assert result.exit_code == 0, result.output
    assert ("RestartSteps=4" in result.stdout) == (version >= 254)


# --- errors are one line, exit 1 ----------------------------------------------------------------


def test_bad_config_file(env, tmp_path):
    config = tmp_path / "units.toml"
    config.write_text("[restart]\nattempts = 'five'\n")
    result = run(env, "--config", str(config), "render", "--systemd-version", "254")
    assert_one_line_error(result, str(config), "[restart] attempts must be a number")


def test_invalid_toml(env, tmp_path):
    config = tmp_path / "units.toml"
    config.write_text("[restart\n")
    assert_one_line_error(run(env, "--config", str(config), "render", "--systemd-version", "254"), str(config))


def test_missing_config_file(env, tmp_path):
    result = run(env, "--config", str(tmp_path / "nope.toml"), "render", "--systemd-version", "254")
    assert_one_line_error(result, "nope.toml: no such file")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--base-s", "0"], "[restart] base_s must be between 0.001 and 3600"),
        (["--cap-s", "0.5"], "[restart] cap_s (0.5) is smaller than base_s (1)"),
        (["--working-directory", "relative"], "working_directory must be an absolute path"),
        (["--environment-file", "/etc/*.env"], "glob character"),
        (["--", "no-such-agor-program"], "[sidecar] command 'no-such-agor-program' was not found on PATH"),
        (["--", "/bin/true", "\udcff"], "[sidecar] command argument 1 is not valid UTF-8"),
    ],
)
def test_bad_overrides(env, args, fragment):
    assert_one_line_error(run(env, "render", "--systemd-version", "254", *args), fragment)


# --- install --output (packagers: no manager) ---------------------------------------------------


def test_install_output_writes_atomically_and_is_idempotent(env, tmp_path):
    out = tmp_path / "out"
    first = run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        *(f"wrote {out / name}" for name in [*SIDECAR_UNITS, *TIMER_UNITS]),
        "systemd 252: restart backoff launcher fallback, delays 1s, 2s, 4s, 8s, 16s",
        "systemd hardening: always, seccomp, userns, mounts (not probed: --output renders every group)",
    ]
    # no temp files, and no hidden manifest in a package directory
    assert sorted(p.name for p in out.iterdir()) == sorted([*SIDECAR_UNITS, *TIMER_UNITS])
    text = (out / SIDECAR_UNIT).read_text()
    assert f"ExecStart={launcher_prefix()}" in text and '"--" "/bin/true"\n' in text
    assert oct((out / SIDECAR_UNIT).stat().st_mode & 0o777) == oct(0o644)

    unit_before = (out / SIDECAR_UNIT).stat().st_mtime_ns
    second = run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    assert second.exit_code == 0, second.output
    assert second.stdout.splitlines()[0] == f"unchanged {out / SIDECAR_UNIT}"
    assert not any(line.startswith("wrote ") for line in second.stdout.splitlines())
    assert (out / SIDECAR_UNIT).stat().st_mtime_ns == unit_before
    assert sorted(p.name for p in out.iterdir()) == sorted([*SIDECAR_UNITS, *TIMER_UNITS])


def test_install_output_native_report(env, tmp_path):
    result = run(env, "install", "--output", str(tmp_path / "o"), "--systemd-version", "254", "--", "/bin/true")
    assert "systemd 254: restart backoff native, delays 1s, 2s, 4s, 8s, 16s" in result.stdout


def test_install_output_rewrites_its_own_unit_when_the_config_changes(env, tmp_path):
    out = tmp_path / "out"
    run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    result = run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/false")
    assert result.stdout.splitlines()[0] == f"wrote {out / SIDECAR_UNIT}"
    assert '"--" "/bin/false"\n' in (out / SIDECAR_UNIT).read_text()


def test_install_output_dry_run_writes_nothing(env, tmp_path):
    out = tmp_path / "out"
    result = run(env, "install", "--output", str(out), "--systemd-version", "252", "--dry-run", "--", "/bin/true")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"would write {out / SIDECAR_UNIT}"
    assert not out.exists() or list(out.iterdir()) == []


def test_install_output_json(env, tmp_path):
    out = tmp_path / "out"
    result = run(env, "install", "--output", str(out), "--systemd-version", "254", "--json", "--", "/bin/true")
    report = json.loads(result.stdout)
    assert report == {
        "directory": str(out),
        "systemd_version": 254,
        "written": [*SIDECAR_UNITS, *TIMER_UNITS],
        "unchanged": [],
        "removed": [],
        "kept": [],
        "actions": [],
        "dry_run": False,
        "backoff": "native",
        "hardening": ["always", "seccomp", "userns", "mounts"],
        "left_out": {},
        "notes": [],
    }


def test_install_output_refuses_a_foreign_unit(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / SIDECAR_UNIT).write_text("[Service]\nExecStart=/usr/bin/someone-elses\n")
    result = run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    assert_one_line_error(result, "exists and was not written by agor-units")
    assert (out / SIDECAR_UNIT).read_text() == "[Service]\nExecStart=/usr/bin/someone-elses\n"


def test_install_with_a_corrupt_manifest(env):
    unit_dir = Path(env["HOME"]) / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / MANIFEST).write_text("{not json")
    result = run(env, "install", "--", "/bin/true")
    assert_one_line_error(result, MANIFEST, "unreadable", "remove it to start over")


# --- commands that need the manager fail in one line without one ---------------------------------


def test_health_without_a_manager(env):
    stderr = assert_one_line_error(run(env, "health"), "cannot connect to the user manager")
    assert "agor-units doctor" in stderr


def test_health_json_without_a_manager(env):
    assert_one_line_error(run(env, "health", "--json"), "cannot connect to the user manager")


def test_restart_without_a_manager(env):
    assert_one_line_error(run(env, "restart"), "cannot connect to the user manager")


# --- issue 15: usage errors, --config, --output, manifests, doctor, sandbox report ---------------


def assert_one_line_usage_error(result: Result, prog: str, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    assert result.stderr.startswith(f"{prog}: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "No such option '--bogus'"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["install", "--bogus"], "No such option '--bogus' (see `main install --help`)"),
        (["health", "extra"], "unexpected extra argument (extra)"),
        (["render", "--attempts", "many"], "'many' is not a valid integer"),
        (["render", "--systemd-version", "-1"], "--systemd-version"),
        (["render", "--systemd-version", "242"], "--systemd-version"),
        (["install", "--output", "OUT", "--now"], "--now cannot be used with --output"),
    ],
    ids=[
        "option",
        "command",
        "command-option",
        "extra-argument",
        "bad-number",
        "negative-version",
        "version-too-old",
        "now-with-output",
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(env, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_one_line_usage_error(run(env, *(str(out) if a == "OUT" else a for a in args)), "agor-units", fragment)
    assert not out.exists()


def test_agor_sandbox_usage_errors_are_one_line(tmp_path):
    from agor_systemd.cli import sandbox_main as sandbox_cli

    result = CliRunner(env={"HOME": str(tmp_path)}).invoke(sandbox_cli, ["check", "--bogus"])
    assert_one_line_usage_error(result, "agor-sandbox", "No such option '--bogus'")


def test_config_goes_before_or_after_the_command_in_both_programs(env, tmp_path):
    from agor_systemd.cli import sandbox_main as sandbox_cli

    config = tmp_path / "units.toml"
    config.write_text('[sidecar]\ncommand = ["/bin/echo", "from --config"]\n[sandbox]\ntcp_bind = [5173]\n')
    for args in (["--config", str(config), "render"], ["render", "--config", str(config)]):
        result = run(env, *args, "--systemd-version", "254")
        assert result.exit_code == 0, result.output
        assert '"--" "/bin/echo" "from --config"\n' in result.stdout
    for args in (["--config", str(config), "check"], ["check", "--config", str(config)]):
        result = CliRunner(env=env).invoke(sandbox_cli, [*args, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tcp_bind"] == [5173]


def test_install_output_renders_the_default_configuration_unless_config_is_given(env, tmp_path):
    own = Path(env["XDG_CONFIG_HOME"]) / "agor" / "units.toml"
    own.parent.mkdir(parents=True)
    own.write_text('[sidecar]\ncommand = ["/bin/echo", "the build user\'s"]\n[restart]\nattempts = 3\n')
    out = tmp_path / "out"
    result = run(env, "install", "--output", str(out), "--systemd-version", "254")
    assert result.exit_code == 0, result.output
    text = (out / SIDECAR_UNIT).read_text()
    assert "build user" not in text and '"--attempts" "5"' in text
    assert text.endswith(
        '"--" "/usr/bin/node" "%h/.local/share/agor/dist/claude-runner.mjs"\n'
        + text.split('claude-runner.mjs"\n', 1)[1]
    )

    explicit = run(env, "install", "--output", str(out), "--systemd-version", "254", "--config", str(own))
    assert explicit.exit_code == 0, explicit.output
    assert "the build user's" in (out / SIDECAR_UNIT).read_text()


def test_install_output_rewrites_a_generated_unit_without_a_manifest(env, tmp_path):
    """A package directory has no manifest: the generated header marks what agor-units may replace."""
    out = tmp_path / "out"
    run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    (out / SIDECAR_UNIT).write_text((out / SIDECAR_UNIT).read_text() + "# packager's note\n")
    result = run(env, "install", "--output", str(out), "--systemd-version", "252", "--", "/bin/true")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"wrote {out / SIDECAR_UNIT}"
    assert not (out / MANIFEST).exists()


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        "null",
        '{"units": []}',
        '{"units": {"agor-sidecar.service": 1}}',
        '{"units": {"agor-sidecar.service": "not-a-digest"}}',
        '{"units": {"../../.bashrc.service": "' + "0" * 64 + '"}}',
    ],
    ids=["list", "null", "units-list", "digest-number", "digest-text", "path-escape"],
)
@pytest.mark.parametrize("command", [["uninstall"], ["install", "--", "/bin/true"]])
def test_a_manifest_of_the_wrong_shape_is_one_line_error(env, manifest, command):
    unit_dir = Path(env["HOME"]) / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / MANIFEST).write_text(manifest)
    assert_one_line_error(
        run(env, *command), str(unit_dir / MANIFEST), "not an agor-units manifest", "remove it to start over"
    )


def test_doctor_reports_a_manifest_of_the_wrong_shape(env):
    unit_dir = Path(env["HOME"]) / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / MANIFEST).write_text('{"units": ["agor-sidecar.service"]}')
    result = run(env, "doctor", "--json")
    assert "Traceback" not in result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["units installed"]["status"] == "error"
    assert "not an agor-units manifest" in checks["units installed"]["detail"]


def test_doctor_without_a_manager_points_nowhere_circular_and_calls_nothing_out_of_date(env):
    result = run(env, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["manager reachable"]["status"] == "error"
    assert "agor-units doctor" not in checks["manager reachable"]["detail"]
    assert checks["units installed"]["status"] == "warn"
    assert "out of date" not in checks["units installed"]["detail"]
    assert "manager is unreachable" in checks["units installed"]["detail"]


def test_the_placeholder_command_is_refused_while_its_script_is_missing(env):
    script = Path(env["HOME"]) / ".local/share/agor/dist/claude-runner.mjs"
    assert_one_line_error(run(env, "install"), "no sidecar configured", str(script))
    checks = {c["name"]: c for c in json.loads(run(env, "doctor", "--json").stdout)}
    assert checks["sidecar program"]["status"] == "error"
    assert str(script) in checks["sidecar program"]["detail"]

    from agor_systemd.config import DEFAULT_COMMAND
    from agor_systemd.install import missing_sidecar_files

    script.parent.mkdir(parents=True)
    script.write_text("// agor's runner\n")
    assert str(script) not in missing_sidecar_files(DEFAULT_COMMAND, env["HOME"])


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("export FAKE_X=1", "systemd does not understand `export`"),
        ("WITH-DASH=x", "'WITH-DASH' is not a variable name"),
    ],
)
def test_install_refuses_environment_file_lines_systemd_would_drop(env, tmp_path, line, fragment):
    env_file = tmp_path / "sidecar.env"
    env_file.write_text(f"GOOD=1\n{line}\n")
    result = run(env, "install", "--environment-file", str(env_file), "--", "/bin/true")
    assert_one_line_error(result, f"{env_file} line 2: systemd would ignore {line!r}", fragment)
    checks = {
        c["name"]: c
        for c in json.loads(run(env, "--config", str(write_env_config(tmp_path, env_file)), "doctor", "--json").stdout)
    }
    assert checks["environment file"]["status"] == "error" and fragment in checks["environment file"]["detail"]


def write_env_config(tmp_path: Path, env_file: Path) -> Path:
    config = tmp_path / "units.toml"
    config.write_text(f'[sidecar]\ncommand = ["/bin/true"]\nenvironment_file = "{env_file}"\n')
    return config


def test_user_units_go_to_the_managers_directory_whatever_xdg_config_home_says(env, monkeypatch):
    from agor_systemd.install import unit_directory

    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    assert unit_directory() == Path(env["HOME"]) / ".config" / "systemd" / "user"


def sandbox_check(env: dict[str, str], config_text: str, tmp_path: Path, *args: str) -> Result:
    from agor_systemd.cli import sandbox_main as sandbox_cli

    config = tmp_path / "units.toml"
    config.write_text(config_text)
    return CliRunner(env=env).invoke(sandbox_cli, ["check", "--config", str(config), *args], catch_exceptions=False)


def test_sandbox_check_shows_an_empty_port_list_as_none(env, tmp_path):
    result = sandbox_check(env, "[sandbox]\ntcp_connect = []\ntcp_bind = [5173, 8080]\n", tmp_path)
    assert "  TCP connect: none; TCP bind: 5173, 8080\n" in result.stdout
    report = json.loads(sandbox_check(env, "[sandbox]\ntcp_connect = []\n", tmp_path, "--json").stdout)
    assert report["tcp_connect"] == [] and report["tcp_bind"] == []
    assert "  TCP connect: any; TCP bind: none\n" in sandbox_check(env, "", tmp_path).stdout


@pytest.mark.parametrize("path", ["/", "~", "~/", "HOME-PARENT"])
def test_sandbox_check_and_doctor_warn_when_the_home_directory_is_writable(env, tmp_path, path):
    path = str(Path(env["HOME"]).parent) if path == "HOME-PARENT" else path
    config_text = f'[sidecar]\ncommand = ["/bin/true"]\n[sandbox]\nread_write_paths = ["{path}"]\n'
    result = sandbox_check(env, config_text, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: read-write ") and "holds the home directory" in result.stderr
    assert len(json.loads(sandbox_check(env, config_text, tmp_path, "--json").stdout)["warnings"]) == 1
    checks = json.loads(run(env, "--config", str(tmp_path / "units.toml"), "doctor", "--json").stdout)
    assert [c["status"] for c in checks if c["name"] == "sandbox paths"] == ["warn"]


def test_sandbox_check_does_not_warn_about_a_project_directory(env, tmp_path):
    result = sandbox_check(env, '[sandbox]\nread_write_paths = ["~/projects", "/srv/www"]\n', tmp_path)
    assert result.exit_code == 0 and result.stderr == ""
