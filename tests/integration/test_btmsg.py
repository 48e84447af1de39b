"""agor-btmsg-sweep.timer under a real user manager: states flip on the timer within threshold + 1 s,
the journal says so with priorities, dead letters come back when agor's UI writes a heartbeat, and
`agor-units health --json` shows the agents. Agents run `btmsg` from a project directory, as agor's do."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

from agor_systemd.lab.testbed import OPT_ROOT

from .support import agor_units, health, wait_for

BTMSG = str(OPT_ROOT / "venv" / "bin" / "btmsg")
SERVICE, TIMER = "agor-btmsg-sweep.service", "agor-btmsg-sweep.timer"
IDENTIFIER = "agor-btmsg-sweep"
STALE_S, STALL_MIN, INTERVAL_S = 2.0, 0.1, 0.25  # stalled after 6 s
DB = ".local/share/agor/btmsg.db"


def fresh(mgr) -> None:
    """No btmsg.db from an earlier test (the test user and its home outlive tests)."""
    shutil.rmtree(mgr.home / ".local/share/agor", ignore_errors=True)


def journal_since(mgr, priority: str, marks: dict[str, int] | None = None) -> list[str]:
    """The sweep's journal lines up to `priority`, after `marks` (the journal outlives tests)."""
    mgr.namespace.sync_journal()
    lines = mgr.journalctl("--user", "-t", IDENTIFIER, "-p", priority, "-o", "cat").stdout.splitlines()
    return [line for line in lines if line != "-- No entries --"][(marks or {}).get(priority, 0) :]


def btmsg(mgr, *args: str, agent: str | None = None, status: int = 0):
    env = {"BTMSG_AGENT_ID": agent} if agent else None
    cp = mgr.run([BTMSG, *args], env=env, timeout=30)
    assert cp.returncode == status, (args, cp.returncode, cp.stdout, cp.stderr)
    return cp


def health_row(mgr, agent: str) -> tuple | None:
    with sqlite3.connect(f"file:{mgr.home / DB}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT state, state_since, last_heartbeat_at, max(coalesce(last_heartbeat_at, 0), "
            "coalesce(last_sent_at, 0), coalesce(last_read_at, 0)) FROM agor_systemd_agent_health WHERE agent_id = ?",
            (agent,),
        ).fetchone()


def wait_state(mgr, agent: str, state: str, timeout: float) -> tuple:
    return wait_for(f"{agent} {state}", lambda: (row := health_row(mgr, agent)) and row[0] == state and row, timeout)


def test_states_flip_on_the_timer_and_dead_letters_come_back(user_manager):
    mgr = user_manager
    fresh(mgr)
    project = mgr.home / "projects" / "shop"
    mgr.write_file("projects/shop/README", "an agent's project\n")
    mgr.write_file(
        ".config/agor/units.toml",
        f"[btmsg]\ninterval_s = {INTERVAL_S}\nstale_after_s = {STALE_S}\nstall_threshold_min = {STALL_MIN}\n",
    )
    agor_units(mgr, "install", "--now", "--", "/bin/sleep", "1000", check=True)
    assert TIMER in mgr.systemctl("list-timers", "--all").stdout

    btmsg(mgr, "register", "admin", "Operator", "admin", "shop", "--cwd", str(project))
    btmsg(mgr, "register", "dev", "Developer", "project", "shop", "--cwd", str(project))
    btmsg(mgr, "allow", "admin", "dev", "-b")
    btmsg(mgr, "heartbeat", agent="dev")
    _, _, heartbeat, _ = wait_state(mgr, "dev", "healthy", timeout=10)
    # the journal from here on: a sweep between `register` and `heartbeat` rightly found dev stale
    # (agor's rule: no heartbeat ever), which is not the change this test is about
    marks = {priority: len(journal_since(mgr, priority)) for priority in ("warning", "notice")}

    # stale on the timer: within threshold + 1 s of the heartbeat, not before the threshold
    _, stale_since, _, _ = wait_state(mgr, "dev", "stale", timeout=STALE_S + 10)
    assert STALE_S < stale_since - heartbeat <= STALE_S + 1, stale_since - heartbeat
    sent = btmsg(mgr, "send", "dev", "are you there?", "--json", agent="admin", status=3)
    letter_id = json.loads(sent.stdout)["message_id"]

    _, stalled_since, _, active = wait_state(mgr, "dev", "stalled", timeout=STALL_MIN * 60 + 10)
    assert STALL_MIN * 60 <= stalled_since - active <= STALL_MIN * 60 + 1, stalled_since - active
    unit = mgr.run(
        [str(mgr.build.systemctl), "--user", "show", SERVICE, "-p", "Result", "-p", "ExecMainStatus"], build_tools=True
    )
    assert "ExecMainStatus=4" in unit.stdout  # attention needed: the unit shows it
    agents = health(mgr).agents
    assert agents is not None and agents["counts"] == {"healthy": 1, "stale": 0, "stalled": 1}
    assert agents["dead_letters"] == {"queued": 1, "parked": 0}
    [item] = agents["attention"]
    assert (item["agent"], item["score"]) == ("dev", 100) and item["reason"].startswith("Stalled — ")

    # the journal: one line per change, stalled as a warning (priority 4), stale as a notice
    warnings = journal_since(mgr, "warning", marks)
    assert warnings == ["btmsg: agent dev is stalled (Stalled — 0 min since last activity)"]
    notices = journal_since(mgr, "notice", marks)
    assert [line for line in notices if "agent dev is" in line] == [warnings[0], notices[0]][::-1]
    assert notices[0].startswith("btmsg: agent dev is stale (last activity ")

    # agor's UI records a heartbeat (its own SQL, as its Rust app does): the sweep redelivers
    with sqlite3.connect(str(mgr.home / DB)) as conn:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute(
            "INSERT INTO heartbeats (agent_id, timestamp) VALUES ('dev', unixepoch()) "
            "ON CONFLICT(agent_id) DO UPDATE SET timestamp = excluded.timestamp"
        )
    wait_state(mgr, "dev", "healthy", timeout=5)
    inbox = wait_for(
        "redelivery", lambda: json.loads(btmsg(mgr, "inbox", "--json", agent="dev").stdout) or None, timeout=5
    )
    assert [(m["id"], m["content"]) for m in inbox] == [(letter_id, "are you there?")]
    assert "dead letter(s) redelivered to dev" in "\n".join(mgr.journal_lines(SERVICE, identifier=IDENTIFIER))
    agor_units(mgr, "uninstall", check=True)
    assert TIMER not in mgr.systemctl("list-timers", "--all").stdout


def readme_example() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Agent health in btmsg.db.**") :]
    return re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]


def test_the_readme_example_as_written(user_manager):
    """The README's btmsg lines, run by the user's shell from a project directory."""
    mgr = user_manager
    fresh(mgr)
    mgr.write_file("projects/shop/.keep", "")
    script = f"cd ~/projects/shop && {readme_example()}"
    env = {"PATH": f"{OPT_ROOT / 'venv' / 'bin'}:/usr/bin:/bin", "AGOR_DATA_DIR": ""}
    cp = mgr.run(["bash", "-c", script], env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "Recipient 'manager' is stale" in cp.stderr  # the send's dead letter, told
    agents = json.loads(cp.stdout[cp.stdout.index("{") :])
    assert {a["id"]: a["state"] for a in agents["agents"]} == {"manager": "stale", "tester-1": "healthy"}
    assert agents["dead_letters"] == {"queued": 1, "parked": 0}
    assert (mgr.home / DB).exists()
