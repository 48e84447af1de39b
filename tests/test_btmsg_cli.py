"""The `btmsg` program as agents and people run it: a separate process, exit statuses, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agor_systemd.btmsg.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent


def btmsg(*args: str, data: Path, agent: str | None = "mgr", check: int | None = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BTMSG_AGENT_ID", "AGOR_DATA_DIR")}
    env["AGOR_DATA_DIR"] = str(data)
    env["PYTHONPATH"] = str(REPO)
    if agent is not None:
        env["BTMSG_AGENT_ID"] = agent
    cp = subprocess.run(
        [sys.executable, "-m", "agor_systemd.btmsg", *args], env=env, capture_output=True, text=True, timeout=60
    )
    if check is not None:
        assert cp.returncode == check, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    return cp


@pytest.fixture
def data(tmp_path):
    """A project's agents under the test's home-like directory, as `btmsg register` makes them."""
    data = tmp_path / "home" / ".local" / "share" / "agor"
    btmsg("register", "admin", "Operator", "admin", "g", data=data)
    btmsg("register", "mgr", "Manager", "manager", "g", data=data)
    btmsg("register", "dev", "Developer", "project", "g", "--model", "opus", data=data)
    btmsg("allow", "mgr", "dev", "-b", data=data)
    return data


def test_every_command_has_help():
    for command in [None, *COMMANDS]:
        args = ["--help"] if command is None else [command, "--help"]
        cp = subprocess.run(
            [sys.executable, "-m", "agor_systemd.btmsg", *args],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        assert cp.returncode == 0 and "usage: btmsg" in cp.stdout and cp.stderr == ""


def test_the_round_trip_an_agent_makes(data):
    btmsg("heartbeat", data=data, agent="dev")
    sent = json.loads(btmsg("send", "dev", "run", "the", "suite", "--json", data=data).stdout)
    assert sent["delivered"] is True and sent["recipient"] == "dev"
    inbox = json.loads(btmsg("inbox", "--json", data=data, agent="dev").stdout)
    assert [(m["id"], m["from"], m["content"], m["read"]) for m in inbox] == [
        (sent["message_id"], "mgr", "run the suite", 0)
    ]
    shown = btmsg("read", sent["message_id"][:8], data=data, agent="dev").stdout
    assert "run the suite" in shown and sent["message_id"] in shown
    assert btmsg("inbox", data=data, agent="dev").stdout.strip() == "no unread messages"
    agents = json.loads(btmsg("agents", "--json", data=data).stdout)
    assert {a["id"]: a["state"] for a in agents["agents"]} == {"admin": "healthy", "dev": "healthy", "mgr": "stale"}
    # the process ended without its teardown checkpoint: every commit is there for the next reader
    with sqlite3.connect(str(data / "btmsg.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT read FROM messages").fetchall() == [(1,)]


def test_a_dead_letter_is_told_and_redelivered_on_heartbeat(data):
    cp = btmsg("send", "dev", "are you there?", data=data, check=3)
    assert cp.stdout == ""
    assert cp.stderr.startswith("btmsg: Recipient 'dev' is stale (no heartbeat in 300 seconds): message ")
    assert "redelivered when dev is live again" in cp.stderr and cp.stderr.count("\n") == 1
    letters = json.loads(btmsg("dead-letters", "--json", data=data).stdout)
    assert [(d["content"], d["reason"], d["state"]) for d in letters] == [("are you there?", "stale", "queued")]
    assert "stale" in btmsg("dead-letters", "--queued", data=data).stdout
    assert btmsg("dead-letters", "--parked", data=data).stdout.strip() == "no dead letters"
    hb = btmsg("heartbeat", data=data, agent="dev")
    assert hb.stdout.strip() == "1 dead letter(s) redelivered to dev: btmsg inbox"
    assert "are you there?" in btmsg("inbox", data=data, agent="dev").stdout
    assert btmsg("heartbeat", data=data, agent="dev").stdout == ""  # quiet when nothing happened


@pytest.mark.parametrize(
    ("args", "agent", "status", "words"),
    [
        (["send", "nobody", "hi"], "mgr", 67, "no agent 'nobody' is registered"),
        (["send", "dev", " "], "mgr", 2, "an empty message"),
        (["send", "admin", "hi"], "dev", 77, "not in its contacts"),
        (["heartbeat"], None, 2, "set BTMSG_AGENT_ID"),
        (["heartbeat"], "ghost", 67, "no agent 'ghost' is registered"),
        (["read", "zzzz"], "dev", 67, "no message to dev"),
        (["redeliver"], "mgr", 2, "name an agent or pass --all"),
        (["redeliver", "dev"], "mgr", 67, "dev is stale"),
        (["sweep", "--max-deliver", "0"], "mgr", 2, "--max-deliver must be between 1 and 1000"),
        (["frobnicate"], "mgr", 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_with_their_status(data, args, agent, status, words):
    cp = btmsg(*args, data=data, agent=agent, check=status)
    assert cp.stderr.startswith("btmsg: error: ") and words in cp.stderr and cp.stderr.count("\n") == 1


def test_an_oversize_message_is_refused(data):
    btmsg("sweep", "--max-message-kib", "1", data=data, check=None)
    cp = btmsg("send", "dev", "x" * 1025, data=data, check=2)
    assert "1025 bytes, more than the limit of 1024" in cp.stderr
    assert json.loads(btmsg("dead-letters", "--json", data=data).stdout) == []


def test_database_problems(tmp_path):
    missing = btmsg("inbox", data=tmp_path / "none", check=66)
    assert "no such database" in missing.stderr and not (tmp_path / "none").exists()
    early = btmsg("sweep", data=tmp_path / "none", check=0)  # the timer before agor's first start
    assert "nothing to sweep" in early.stderr and not (tmp_path / "none").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "btmsg.db").write_bytes(b"not a database" * 100)
    assert "not an SQLite database" in btmsg("heartbeat", data=tmp_path / "junk", check=65).stderr


def test_paths_with_newlines_and_percent_signs(tmp_path):
    odd = tmp_path / "100% agor\nproject"
    btmsg("register", "a", "A", "admin", "g", "--db", str(odd / "btmsg.db"), data=tmp_path)
    cp = btmsg("agents", "--json", "--db", str(odd / "btmsg.db"), data=tmp_path)
    assert [a["id"] for a in json.loads(cp.stdout)["agents"]] == ["a"]
    assert (odd / "btmsg.db").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare for a read-only mount")
def test_a_read_only_database_is_refused_with_77(data):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (as the suite runs in CI)")
    script = (
        f'mount --bind -o ro "$1" "$1" && AGOR_DATA_DIR="$1" BTMSG_AGENT_ID=dev PYTHONPATH={REPO} '
        f"{sys.executable} -m agor_systemd.btmsg heartbeat"
    )
    cp = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(data)],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 77, cp.stderr
    assert cp.stderr.startswith("btmsg: error: ") and "cannot be written by this user" in cp.stderr


def test_heartbeat_skips_argparse(data):
    code = (
        "import sys; from agor_systemd.btmsg import cli; status = cli.main(['heartbeat']); "
        "print(status, 'argparse' in sys.modules, 'sqlite3' in sys.modules, 'typing' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGOR_DATA_DIR": str(data), "BTMSG_AGENT_ID": "dev"}
    cp = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert cp.stdout.split() == ["0", "False", "False", "False"], cp.stderr
