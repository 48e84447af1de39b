"""install / uninstall / verify / doctor against a real user manager, and hostile input."""

from __future__ import annotations

import json
import os

import pytest

from agor_systemd.lab.testbed import OPT_ROOT

from .support import ALL_UNITS, UNIT, agor_units, health, install_sidecar, wait_health

HOSTILE_WORDS = [
    "plain",
    "two words",
    "new\nline",
    "tab\there",
    "percent %h %n %%",
    "dollar $HOME ${HOME} $$",
    'double"quote',
    "single'quote",
    "back\\slash \\n \\x41",
    "",
    ";",
    "\\;",
    "ünïcødé ✓",
    "--",
    "-x",
    "~not-home",
    "\x01\x1f\x7f",
]


def dbus_exec_start(mgr) -> list[str]:
    """ExecStart argv exactly as systemd reports it over D-Bus (read with the library)."""
    code = (
        "import json; from agor_systemd.manager import Systemd\n"
        "with Systemd() as m: p = m.unit_properties('agor-sidecar.service')\n"
        "print(json.dumps([list(e[1]) for e in p['ExecStart']]))"
    )
    cp = mgr.run([str(OPT_ROOT / "venv" / "bin" / "python"), "-c", code], check=True)
    return json.loads(cp.stdout)[0]


def test_hostile_arguments_and_paths_reach_the_sidecar_verbatim(user_manager, fake_sidecar_path):
    workdir = user_manager.write_file('odd dir %h $HOME "q" \\ back/.keep', "").parent
    envfile = user_manager.write_file("env dir %n $X/side car.env", "FAKE_VALUE=from env file\n")
    sidecar = install_sidecar(
        user_manager,
        fake_sidecar_path,
        ["hang"],
        extra_words=HOSTILE_WORDS,
        install_args=[f"--working-directory={workdir}", f"--environment-file={envfile}"],
    )
    wait_health(user_manager, "healthy", timeout=10)
    intended = sidecar.command(HOSTILE_WORDS)

    start = sidecar.starts()[-1]
    assert [bytes.fromhex(h).decode() for h in start["argv"]] == intended[3:]  # python's argv[0] is the script
    assert start["cwd"] == str(workdir)
    assert start["env"].get("FAKE_VALUE") == "from env file"
    # the launcher strips its own notify/watchdog channel from the sidecar's environment
    assert "NOTIFY_SOCKET" not in start["env"]

    exec_start = dbus_exec_start(user_manager)
    assert exec_start[exec_start.index("--") + 1 :] == intended
    # written as WorkingDirectory=-PATH (the launcher checks it); systemd shows that prefix as '!'
    assert user_manager.unit_property(UNIT, "WorkingDirectory") == "!" + str(workdir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--working-directory=/tmp/new\nline"], "control character"),
        (["--working-directory=relative/dir"], "absolute path"),
        (["--working-directory=/tmp/../etc"], "normalized"),
        (["--environment-file=/tmp/*.env"], "glob character"),
        (["--base-s=0"], "base_s"),
        (["--attempts=-1"], "attempts"),
        (["--", "/nonexistent/sidecar"], "does not exist"),
        (["--", "no-such-program-anywhere"], "not found on PATH"),
        (["--", "./relative-program"], "relative path"),
        (["--", "/bin/true", b"\xff\xfe-not-utf8"], "not valid UTF-8"),
    ],
    ids=[
        "newline-dir",
        "relative-dir",
        "dotdot-dir",
        "glob-envfile",
        "zero-base",
        "negative-attempts",
        "missing-program",
        "unknown-program",
        "relative-program",
        "non-utf8-arg",
    ],
)
def test_bad_input_is_one_line_error_and_writes_nothing(user_manager, args, message):
    if "--" not in args:
        args = [*args, "--", "/bin/true"]
    cp = agor_units(user_manager, "install", *args)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agor-units: error: "), cp.stderr
    assert message in lines[0]
    assert "Traceback" not in cp.stderr
    assert not (user_manager.unit_dir / UNIT).exists()


@pytest.fixture
def config_file(user_manager):
    path = user_manager.home / ".config" / "agor" / "units.toml"
    yield path
    path.unlink(missing_ok=True)


def test_broken_config_file_is_one_line_error(user_manager, config_file):
    user_manager.write_file(".config/agor/units.toml", "[restart]\nbase_s = 'soon'\n")
    cp = agor_units(user_manager, "install", "--", "/bin/true")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == [
        f"agor-units: error: {config_file}: [restart] base_s must be a number, got 'soon'"
    ]
    user_manager.write_file(".config/agor/units.toml", "[restart\n")
    cp = agor_units(user_manager, "render")
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == [
        f"agor-units: error: {config_file}: Expected ']' at the end of a table declaration (at line 1, column 9)"
    ]


def test_install_is_idempotent_and_uninstall_removes_exactly_what_it_wrote(user_manager, fake_sidecar_path):
    dry = agor_units(user_manager, "install", "--dry-run", "--", "/bin/sleep", "1000")
    assert dry.returncode == 0 and "would write" in dry.stdout
    assert not (user_manager.unit_dir / UNIT).exists()

    first = json.loads(agor_units(user_manager, "install", "--json", "--", "/bin/sleep", "1000", check=True).stdout)
    assert first["written"] == ALL_UNITS and "daemon-reload" in first["actions"]
    unit_file = user_manager.unit_dir / UNIT
    mtime = unit_file.stat().st_mtime_ns
    second = json.loads(agor_units(user_manager, "install", "--json", "--", "/bin/sleep", "1000", check=True).stdout)
    assert second["written"] == [] and second["unchanged"] == ALL_UNITS
    assert unit_file.stat().st_mtime_ns == mtime
    assert user_manager.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert health(user_manager).health == {"status": "stopped"}  # installed, not started without --now

    foreign = user_manager.write_file(".config/systemd/user/mine.service", "[Service]\nExecStart=/bin/true\n")
    report = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)
    assert report["removed"] == sorted(ALL_UNITS)
    assert not unit_file.exists() and foreign.exists()
    assert sorted(p.name for p in user_manager.unit_dir.iterdir() if not p.is_dir()) == ["mine.service"]
    cp = agor_units(user_manager, "health")
    assert cp.returncode == 1 and "not-found" in cp.stderr and "agor-units install" in cp.stderr


def test_uninstall_keeps_a_unit_edited_since_install(user_manager):
    agor_units(user_manager, "install", "--", "/bin/sleep", "1000", check=True)
    unit_file = user_manager.unit_dir / UNIT
    unit_file.write_text(unit_file.read_text() + "# my own note\n")
    report = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)
    assert report["kept"] == [UNIT] and report["removed"] == sorted(set(ALL_UNITS) - {UNIT})
    assert unit_file.exists()


def build_tool_env(mgr) -> dict[str, str]:
    """PATH with the manager's own systemd tools first, as on a machine that runs that version."""
    return {"PATH": f"{os.path.dirname(mgr.build.systemd_analyze)}:{mgr.env()['PATH']}", **mgr.build.tool_env()}


def test_verify_passes_on_the_running_version(user_manager):
    cp = user_manager.run(
        [str(OPT_ROOT / "venv" / "bin" / "agor-units"), "verify", "--", "/bin/true", "a b", "%x"],
        env=build_tool_env(user_manager),
    )
    assert cp.returncode == 0, cp.stderr
    assert "pass systemd-analyze verify" in cp.stdout


def test_doctor_reports_version_mode_and_fixes(user_manager):
    cp = agor_units(user_manager, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(cp.stdout)}
    assert checks["manager reachable"]["status"] == "ok"
    assert f"systemd {user_manager.version}" in checks["manager reachable"]["detail"]
    mode = "native" if user_manager.version >= 254 else "launcher fallback"
    assert checks["restart backoff"]["detail"].startswith(mode)
    assert checks["lingering"]["status"] == "warn"
    assert checks["lingering"]["fix"] == f"sudo loginctl enable-linger {user_manager.user}"
    assert checks["units installed"]["fix"] == "agor-units install --now"
