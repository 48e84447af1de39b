"""Landlock layer and sandbox report, against this machine's kernel (no systemd needed)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner

from agor_systemd.cli import sandbox_main as sandbox_cli
from agor_systemd.sandbox import landlock
from agor_systemd.sandbox.enforce import enforcement, prepare

ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK, lsm=)")


@pytest.mark.parametrize(
    ("abi", "level", "missing"),
    [
        (0, "none", ["Landlock"]),
        (1, "partial", ["moving/linking", "truncate", "ioctl", "TCP", "scoping"]),
        (3, "partial", ["ioctl", "TCP", "scoping"]),
        (4, "partial", ["ioctl", "scoping"]),
        (5, "partial", ["scoping"]),
        (6, "full", []),
        (7, "full", []),
    ],
)
def test_enforcement_names_what_each_abi_lacks(abi, level, missing):
    got_level, got_missing = enforcement(abi)
    assert got_level == level
    assert len(got_missing) == len(missing)
    for word, text in zip(missing, got_missing):
        assert word in text


def test_masks_only_use_rights_the_abi_knows():
    assert landlock.mask(("read_file", "truncate", "ioctl_dev"), landlock.FS_RIGHTS, 2) == 1 << 2
    assert landlock.mask(("truncate",), landlock.FS_RIGHTS, 3) == 1 << 14
    assert landlock.mask(("bind_tcp", "connect_tcp"), landlock.NET_RIGHTS, 3) == 0
    assert landlock.mask(("bind_tcp", "connect_tcp"), landlock.NET_RIGHTS, 4) == 3
    assert landlock.unsupported(("refer", "execute", "ioctl_dev"), landlock.FS_RIGHTS, 1) == ["refer", "ioctl_dev"]


def in_child(action) -> int:
    """Run `action` in a forked child; its return value (an errno, 0 for success) comes back."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(action())
        except BaseException:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def write_errno(path: str) -> int:
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError as e:
        return e.errno
    return 0


@needs_landlock
def test_a_confined_child_writes_only_where_allowed(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    prepared = prepare([str(allowed)], ["/usr", "/lib", "/lib64", "/etc"], None, (), required=False)

    def confined() -> int:
        prepared.ruleset.restrict_self()
        ok = write_errno(str(allowed / "file"))
        denied = write_errno(str(other / "file"))
        return 0 if ok == 0 and denied == errno.EACCES else 1

    assert in_child(confined) == 0
    assert (allowed / "file").exists() and not (other / "file").exists()
    assert write_errno(str(other / "parent-still-free")) == 0  # the parent is not confined


def test_played_abi_zero_gives_no_ruleset_or_a_refusal(monkeypatch):
    from agor_systemd.sandbox.enforce import SandboxRefused

    monkeypatch.setenv("AGOR_LANDLOCK_ABI", "0")
    prepared = prepare(["/tmp"], [], None, (), required=False)
    assert prepared.ruleset is None and prepared.level == "none"
    assert prepared.describe().startswith("sandbox none; not enforced: Landlock")
    with pytest.raises(SandboxRefused, match="sandbox required, but this kernel has no Landlock"):
        prepare(["/tmp"], [], None, (), required=True)


@needs_landlock
def test_missing_paths_are_listed(tmp_path):
    prepared = prepare([str(tmp_path / "nope")], [str(tmp_path)], (443,), (8080,), required=False)
    assert prepared.skipped == [str(tmp_path / "nope")]
    assert "paths not found, skipped: " + str(tmp_path / "nope") in prepared.describe()
    prepared.ruleset.close()


def run_check(tmp_path, *args, env=None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environment = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "config"), **(env or {})}
    return CliRunner(env=environment).invoke(sandbox_cli, ["check", *args], catch_exceptions=False)


def test_check_reports_level_paths_and_refusal(tmp_path):
    result = run_check(tmp_path, "--json", env={"AGOR_LANDLOCK_ABI": "3"})
    report = json.loads(result.stdout)
    assert result.exit_code == 0
    assert report["level"] == ("none" if ABI == 0 else "partial")  # playing ABI 3
    assert f"{tmp_path}/home/.local/share/agor" in report["read_write"]
    assert f"{tmp_path}/home/.claude" in report["missing_paths"]
    assert report["tcp_connect"] == "any" and report["tcp_bind"] == []

    config = tmp_path / "units.toml"
    config.write_text("[sandbox]\nrequired = true\n")
    refused = run_check(tmp_path, "--config", str(config), env={"AGOR_LANDLOCK_ABI": "0"})
    assert refused.exit_code == 1
    assert "refused: [sandbox] required = true" in refused.stderr

    config.write_text("[sandbox]\ntcp_bind = [70000]\n")
    bad = run_check(tmp_path, "--config", str(config))
    assert bad.exit_code == 1
    assert (
        bad.stderr.strip()
        == f"agor-sandbox: error: {config}: [sandbox] tcp_bind must be a list of TCP ports (1-65535), got [70000]"
    )
