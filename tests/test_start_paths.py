"""A missing working directory or environment file (issue 14, case 6): refused at install and by
verify; one removed later fails the attempt in the launcher, by name, inside the restart budget."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from agor_systemd.cli import main
from agor_systemd.config import Config, SidecarConfig
from agor_systemd.giveup import GAVE_UP_STATUS
from agor_systemd.install import InstallError, check_start_paths, start_path_problems
from agor_systemd.sidecar.launcher import fail_before_spawn, missing_start_path
from agor_systemd.sidecar.protocol import (
    LauncherOptions,
    launcher_arguments,
    parse_launcher_arguments,
)
from agor_systemd.unitfile import HomePath


def options(**kw) -> LauncherOptions:
    return LauncherOptions("agor-sidecar.service", kw.pop("attempts", 5), 300.0, ("/bin/true",), **kw)


# --- the launcher's arguments ----------------------------------------------------------------------


def test_paths_round_trip_through_the_launcher_arguments():
    opts = options(working_directory="/home/u/my proj", environment_file="/etc/agor/side car.env")
    assert parse_launcher_arguments(launcher_arguments(opts)) == opts


def test_home_paths_stay_home_paths_until_the_unit_is_written():
    args = launcher_arguments(options(working_directory=HomePath("proj")))
    assert args[args.index("--working-directory") + 1] == HomePath("proj")  # exec_word writes "%h/proj"


# --- the launcher's check ------------------------------------------------------------------------


def test_present_paths_pass_and_the_launcher_moves_into_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    env = tmp_path / "sidecar.env"
    env.write_text("A=1\n")
    assert missing_start_path(options(working_directory=str(tmp_path), environment_file=str(env))) is None
    assert os.getcwd() == str(tmp_path)


def test_a_missing_working_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    gone = tmp_path / "proj"
    assert missing_start_path(options(working_directory=str(gone))) == (
        f"working directory {gone}: No such file or directory"
    )


def test_a_missing_environment_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    gone = tmp_path / "sidecar.env"
    assert missing_start_path(options(working_directory=str(tmp_path), environment_file=str(gone))) == (
        f"environment file {gone}: No such file or directory"
    )


def test_nothing_configured_checks_nothing():
    assert missing_start_path(options()) is None


class FakeBus:
    def __init__(self, restarts: int) -> None:
        self.restarts = restarts

    def restart_count(self, unit: str) -> int:
        return self.restarts


@pytest.mark.parametrize(
    "attempt, attempts, status", [(0, 5, 1), (4, 5, 1), (5, 5, GAVE_UP_STATUS), (0, 0, GAVE_UP_STATUS)]
)
def test_a_failed_start_counts_like_a_crash(attempt, attempts, status, capfd):
    with pytest.raises(SystemExit) as exit_:
        fail_before_spawn(options(attempts=attempts), FakeBus(attempt), attempt, "working directory /p: gone")
    assert exit_.value.code == status
    err = capfd.readouterr().err
    if status == GAVE_UP_STATUS:
        assert f"working directory /p: gone; giving up after {attempts} restarts" in err
    else:
        assert f"working directory /p: gone; restart {attempt + 1}/{attempts} follows" in err


# --- install and verify refuse what they can check -----------------------------------------------


def sidecar(**kw) -> Config:
    return Config(sidecar=SidecarConfig(command=("/bin/true",), **kw))


def test_existing_paths_have_no_problems(tmp_path):
    env = tmp_path / "sidecar.env"
    env.write_text("")
    assert start_path_problems(sidecar(working_directory=str(tmp_path), environment_file=str(env))) == []


def test_home_paths_are_checked_in_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "proj").mkdir()
    assert start_path_problems(sidecar(working_directory=HomePath("proj"))) == []
    assert start_path_problems(sidecar(working_directory=HomePath("gone"))) == [
        f"working directory '{tmp_path}/gone' ([sidecar] working_directory) does not exist"
    ]


def test_agor_data_directory_is_not_missing_install_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert start_path_problems(sidecar(working_directory=HomePath(".local/share/agor"))) == []


def test_both_problems_in_one_line(tmp_path):
    config = sidecar(working_directory=str(tmp_path / "gone"), environment_file=str(tmp_path / "x.env"))
    with pytest.raises(InstallError) as info:
        check_start_paths(config)
    assert str(info.value) == (
        f"working directory '{tmp_path}/gone' ([sidecar] working_directory) does not exist; "
        f"environment file '{tmp_path}/x.env' ([sidecar] environment_file) does not exist or is not readable; "
        "create it or change the setting"
    )


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-bus",
    }


@pytest.mark.parametrize("flags", [["install"], ["install", "--dry-run"]])
def test_install_refuses_a_missing_working_directory_before_anything(env, tmp_path, flags):
    result = CliRunner(env=env).invoke(
        main, [*flags, "--working-directory", str(tmp_path / "gone"), "--", "/bin/true"], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"agor-units: error: working directory '{tmp_path}/gone' ([sidecar] working_directory) "
        "does not exist; create it or change the setting\n"
    )
    assert not (tmp_path / "config").exists()


def test_verify_reports_a_missing_environment_file(env, tmp_path):
    result = CliRunner(env=env).invoke(
        main,
        ["verify", "--systemd-version", "252", "--environment-file", str(tmp_path / "x.env"), "--", "/bin/true"],
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert f"environment file '{tmp_path}/x.env' ([sidecar] environment_file) does not exist" in result.stderr
