"""install / uninstall edge cases on a real user manager (issue 15): a sidecar that takes its time
to stop, units edited or deleted by hand, a sidecar still running its old settings, a directory
the user may not write, and XDG_CONFIG_HOME set only in the installing shell."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agor_systemd.lab.testbed import OPT_ROOT

from .support import (
    ALL_UNITS,
    UNIT,
    agor_units,
    install_sidecar,
    wait_for,
    wait_health,
)

MANIFEST = ".agor-units.json"

# A sidecar with a graceful shutdown: on SIGTERM it takes STOP_S seconds, then exits 1 (failed).
STOP_S = 2.0
SLOW_STOP = f"""import signal, sys, time
def stop(*_):
    time.sleep({STOP_S})
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
print('{{"type":"ready"}}', flush=True)
while True:
    time.sleep(1)
"""


def failed_units(mgr) -> str:
    return mgr.systemctl("list-units", "--failed", "--all", "--plain", "--no-legend").stdout


def test_uninstall_waits_for_a_graceful_stop_and_leaves_no_ghost(user_manager):
    script = user_manager.write_file(".local/agor-test/slow_stop.py", SLOW_STOP)  # ~/.local: readable in the sandbox
    agor_units(user_manager, "install", "--now", "--", "/usr/bin/python3", "-I", "-S", str(script), check=True)
    wait_health(user_manager, "healthy", timeout=15)

    started = time.monotonic()
    report = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)
    took = time.monotonic() - started
    assert report["removed"] == sorted(ALL_UNITS)
    assert took >= STOP_S * 0.9, f"uninstall returned after {took:.2f}s, before the sidecar stopped"

    # whatever uninstall did, let a stop still under way end before looking for its trace
    wait_for(
        "the sidecar to stop",
        lambda: user_manager.unit_property(UNIT, "ActiveState") != "deactivating",
        timeout=STOP_S + 10,
    )
    assert "agor-sidecar" not in failed_units(user_manager)
    assert user_manager.unit_property(UNIT, "LoadState") == "not-found"
    cp = agor_units(user_manager, "health")
    assert cp.returncode == 1 and "not-found" in cp.stderr and "failed" not in cp.stdout


def test_uninstall_forgets_units_deleted_by_hand(user_manager):
    agor_units(user_manager, "install", "--", "/bin/sleep", "1000", check=True)
    unit_file = user_manager.unit_dir / UNIT
    unit_file.write_text(unit_file.read_text() + "# my own note\n")
    first = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)
    assert first["kept"] == [UNIT]

    unit_file.unlink()  # the user deletes the unit uninstall kept for them
    second = agor_units(user_manager, "uninstall")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"note: {unit_file} was deleted by hand: forgotten"
    assert not (user_manager.unit_dir / MANIFEST).exists()
    assert agor_units(user_manager, "uninstall", check=True).stdout.strip() == "nothing installed"


def test_uninstall_after_an_enabled_unit_was_deleted_by_hand(user_manager):
    agor_units(user_manager, "install", "--", "/bin/sleep", "1000", check=True)
    wants = user_manager.unit_dir / "default.target.wants" / UNIT
    assert wants.is_symlink()
    (user_manager.unit_dir / UNIT).unlink()

    report = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)
    assert report["removed"] == sorted(set(ALL_UNITS) - {UNIT})
    assert not wants.is_symlink()  # enable's link is gone too
    assert sorted(p.name for p in user_manager.unit_dir.rglob("*") if not p.is_dir()) == []


def test_install_does_not_overwrite_a_hand_edited_unit_without_force(user_manager):
    agor_units(user_manager, "install", "--", "/bin/sleep", "1000", check=True)
    unit_file = user_manager.unit_dir / UNIT
    edited = unit_file.read_text() + "# my own note\n"
    unit_file.write_text(edited)

    for command in (["/bin/sleep", "1000"], ["/bin/sleep", "2000"]):  # same text or new: the edit stays
        cp = agor_units(user_manager, "install", "--", *command)
        assert cp.returncode == 1
        assert cp.stderr.strip() == (
            f"agor-units: error: {unit_file} was edited since agor-units wrote it; "
            "pass --force to overwrite it (or move it away)"
        )
        assert unit_file.read_text() == edited

    forced = json.loads(
        agor_units(user_manager, "install", "--force", "--json", "--", "/bin/sleep", "2000", check=True).stdout
    )
    assert forced["written"] == [UNIT]
    assert '"--" "/bin/sleep" "2000"\n' in unit_file.read_text() and "my own note" not in unit_file.read_text()
    assert json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)["kept"] == []


def test_install_says_the_running_sidecar_keeps_its_old_settings(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["hang"])
    wait_health(user_manager, "healthy", timeout=15)
    command = ["--", *sidecar.command()]
    base = ["install", "--base-s=0.2", f"--read-write-path={sidecar.plan.parent}"]

    changed = agor_units(user_manager, *base, "--attempts=7", *command, check=True)
    note = (
        f"note: {UNIT} is still running with its old settings; "
        "`agor-units restart` (or `install --now`) applies the new ones"
    )
    assert note in changed.stdout.splitlines()
    unchanged = json.loads(agor_units(user_manager, *base, "--attempts=7", "--json", *command, check=True).stdout)
    assert unchanged["written"] == [] and unchanged["notes"] == []  # nothing new to apply
    restarted = json.loads(
        agor_units(user_manager, *base, "--attempts=8", "--now", "--json", *command, check=True).stdout
    )
    assert restarted["written"] == [UNIT] and restarted["notes"] == []


@pytest.fixture
def root_owned_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agor-root-owned-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_permission_error_names_the_unit_file_not_a_temporary_file(user_manager, root_owned_dir):
    assert os.stat(root_owned_dir).st_uid == 0
    cp = agor_units(user_manager, "install", "--output", str(root_owned_dir), "--systemd-version", "252")
    assert cp.returncode == 1
    assert cp.stderr.strip() == f"agor-units: error: cannot write {root_owned_dir / UNIT}: Permission denied"
    assert list(root_owned_dir.iterdir()) == []


def test_uninstall_from_another_shell_finds_what_install_wrote_with_xdg_config_home(user_manager):
    elsewhere = user_manager.home / "elsewhere"
    shutil.rmtree(elsewhere, ignore_errors=True)  # the test user's home outlives earlier runs
    shell_env = {"XDG_CONFIG_HOME": str(elsewhere)}
    installed = user_manager.run(
        [
            str(OPT_ROOT / "venv" / "bin" / "agor-units"),
            "install",
            "--now",
            "--json",
            "--ready=immediate",
            "--",
            "/bin/sleep",
            "1000",
        ],
        env=shell_env,
    )
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout)["directory"] == str(user_manager.unit_dir)
    wait_for("the sidecar to run", lambda: user_manager.unit_property(UNIT, "ActiveState") == "active", timeout=15)

    report = json.loads(agor_units(user_manager, "uninstall", "--json", check=True).stdout)  # no XDG_CONFIG_HOME
    assert report["removed"] == sorted(ALL_UNITS)
    assert user_manager.unit_property(UNIT, "ActiveState") == "inactive"
    assert not (elsewhere / "systemd").exists()


# Every line sets AGORT_<n>_OK or AGORT_<n>_BAD...; the parser must flag exactly the lines whose
# variable systemd does not set, on every manager version.
ENVIRONMENT_FILE = """AGORT_1_OK=1
export AGORT_2_BAD=1
AGORT-3-BAD=x
3AGORT_BAD=x
AGORT_5_BAD
   AGORT_6_OK=indented
AGORT_7_OK = spaced
AGORT_8_OK='quoted
AGORT_9_BAD_INSIDE=a quote'
# AGORT_10_BAD commented out
AGORT_11_OK=continued \\
AGORT_12_BAD_CONTINUATION=x
AGORT 13 BAD=1
AGORT_14_OK="double \\" quote"
"""


def test_dropped_environment_lines_agree_with_systemd(user_manager):
    from agor_systemd.config import dropped_environment_lines

    env_file = user_manager.write_file("agor-env-test/sidecar.env", ENVIRONMENT_FILE)
    out = env_file.parent / "env.out"
    user_manager.write_file(
        ".config/systemd/user/agor-envtest.service",
        f"[Service]\nType=oneshot\nEnvironmentFile={env_file}\nExecStart=/bin/sh -c 'env -0 > {out}'\n",
    )  # values may hold newlines
    user_manager.systemctl("daemon-reload", check=True)
    user_manager.systemctl("start", "agor-envtest.service", check=True)
    applied = {entry.split("=", 1)[0] for entry in out.read_text().split("\0") if entry.startswith("AGORT")}
    assert applied == {"AGORT_1_OK", "AGORT_6_OK", "AGORT_7_OK", "AGORT_8_OK", "AGORT_11_OK", "AGORT_14_OK"}

    flagged = [number for number, _, _ in dropped_environment_lines(ENVIRONMENT_FILE)]
    assert flagged == [2, 3, 4, 5, 13]  # 9 and 12 continue lines 8 and 11; 10 is a comment
