"""Nothing lost, nothing doubled: 4 writers, a sweeper, a redeliverer and a heartbeater on one
btmsg.db, each SIGKILLed at random points and restarted, until the writers have had >= 10,000 sends
acknowledged. Then every acknowledged message is in `messages` exactly once, or in the dead-letter
queue with a reason — never both, never twice — and PRAGMA integrity_check is ok."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from agor_systemd.btmsg.liveness import Thresholds
from agor_systemd.btmsg.store import open_store

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "programs" / "btmsg_worker.py"
TARGET = 10_000
WRITERS = [f"w{i}" for i in range(4)]


def acknowledged(logs: Path) -> dict[str, str]:
    """content -> 'delivered' | 'dead', as the writers were told (a line cut by a kill is not counted)."""
    outcomes = {}
    for log in logs.glob("*.log"):
        for line in log.read_text().splitlines():
            content, _, outcome = line.partition(" ")
            if outcome in ("delivered", "dead"):
                outcomes[content] = outcome
    return outcomes


def test_random_kills_lose_and_double_nothing(tmp_path):
    db = tmp_path / "home" / ".local" / "share" / "agor" / "btmsg.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    with open_store(str(db), create=True) as store:
        # stale after 0.3 s: r4..r7 flip between live and stale many times during the run
        store.configure(Thresholds(stale_after_s=0.3, stall_after_s=3600, max_deliver=1000))
        store.register("admin", "Operator", "admin", "g")
        for agent in [*WRITERS, *(f"r{i}" for i in range(8))]:
            store.register(agent, agent, "project", "g")
        for writer in WRITERS:
            for i in range(8):
                store.allow(writer, f"r{i}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    generation = Counter[str]()

    def start(role: str) -> subprocess.Popen:
        generation[role] += 1
        if role in WRITERS:
            args = ["writer", role, str(generation[role]), str(logs / f"{role}.log")]
        else:
            args = [role]
        return subprocess.Popen([sys.executable, str(WORKER), str(db), *args], env=env, stderr=subprocess.PIPE)

    roles = [*WRITERS, "sweeper", "redeliverer", "heartbeater"]
    procs = {role: start(role) for role in roles}
    kills = Counter[str]()
    deadline = time.monotonic() + 240
    rng = random.Random(1)
    try:
        while len(acknowledged(logs)) < TARGET or min(kills[role] for role in roles) < 5:
            assert time.monotonic() < deadline, f"only {len(acknowledged(logs))} sends in 240 s"
            time.sleep(rng.uniform(0.005, 0.1))
            for name, proc in procs.items():  # nothing may die on its own
                assert proc.poll() is None, (name, proc.stderr.read().decode() if proc.stderr else "")
            role = rng.choice(roles)
            procs[role].send_signal(signal.SIGKILL)
            procs[role].wait()
            kills[role] += 1
            procs[role] = start(role)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()

    # everyone is back: the last redelivery runs, as the sweep or a heartbeat would run it
    with open_store(str(db)) as store:
        for i in range(8):
            store.heartbeat(f"r{i}")
        store.redeliver(None)
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    delivered = Counter(r[0] for r in conn.execute("SELECT content FROM messages"))
    letters = conn.execute("SELECT content, reason, state FROM dead_letter_queue").fetchall()
    dead = Counter(content for content, _, _ in letters)
    assert [c for c, n in (delivered + dead).items() if n > 1] == []  # nothing doubled
    assert set(delivered) & set(dead) == set()
    told = acknowledged(logs)
    lost = [content for content in told if content not in delivered and content not in dead]
    assert lost == []
    assert all(reason in ("stale", "expired", "max_deliver") for _, reason, _ in letters)
    # the dead letters were real: some sends were told "dead" and came back through redelivery
    assert sum(1 for outcome in told.values() if outcome == "dead") > 100
    assert letters == []  # every recipient is live again: the queue is empty
    ids_twice = conn.execute(
        "SELECT count(*) FROM messages m JOIN dead_letter_queue d ON d.message_id = m.id"
    ).fetchone()
    assert ids_twice == (0,)
    conn.close()
