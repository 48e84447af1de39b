"""agor-walcheck.timer/.service under a real user manager: concurrent writers, SIGKILLs, a blocking
reader, bad inputs through the unit."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import time

from agor_systemd.lab.testbed import OPT_ROOT

from .support import agor_units, wait_for

SERVICE, TIMER = "agor-walcheck.service", "agor-walcheck.timer"
IDENTIFIER = "agor-walcheck"  # the service's SyslogIdentifier=
PYTHON = str(OPT_ROOT / "venv" / "bin" / "python")
DATA = ".local/share/agor"

CREATE = """
import sqlite3, sys
for db in sys.argv[1:]:
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, who INTEGER, b BLOB)")
    c.close()
"""

# commits small transactions forever; logs the ids of each transaction after COMMIT returned
WRITER = """
import random, sqlite3, sys, time
db, log, base = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(db, timeout=20, isolation_level=None)
c.execute("PRAGMA wal_autocheckpoint=0")  # only walcheck checkpoints, so the WAL grows
f = open(log, "a", buffering=1)
i = base
while True:
    n = random.randint(1, 20)
    c.execute("BEGIN IMMEDIATE")
    for k in range(n):
        c.execute("INSERT INTO t(id, who, b) VALUES (?, ?, randomblob(?))", (i + k, base, random.randint(10, 4000)))
    c.execute("COMMIT")
    f.write(f"{i} {n}\\n")
    i += n
    time.sleep(random.uniform(0, 0.01))
"""

CHECK = """
import json, sqlite3, sys
out = {}
for db in sys.argv[1:]:
    c = sqlite3.connect(f"file:{db}?mode=rw", uri=True)
    out[db] = {"integrity": c.execute("PRAGMA integrity_check").fetchone()[0],
               "ids": [r[0] for r in c.execute("SELECT id FROM t")]}
print(json.dumps(out))
"""

# holds a read transaction (a snapshot that pins the WAL) until stdin closes
READER = """
import sqlite3, sys
db = sys.argv[1]
r = sqlite3.connect(db, isolation_level=None)
r.execute("BEGIN"); r.execute("SELECT count(*) FROM t").fetchone()
w = sqlite3.connect(db, isolation_level=None)
w.execute("INSERT INTO t(id, who, b) VALUES (1, 0, randomblob(100))")
print("reading", flush=True)
sys.stdin.read()
r.execute("COMMIT")
"""


def popen_as_user(mgr, argv, **kw) -> subprocess.Popen:
    cmd = [
        *mgr.namespace.nsenter(wd=mgr.home),
        "setpriv",
        f"--reuid={mgr.uid}",
        f"--regid={mgr.gid}",
        "--init-groups",
        "--",
        *map(str, argv),
    ]
    return subprocess.Popen(cmd, env=mgr.env(), **kw)


def install_walcheck(mgr, **walcheck) -> None:
    toml = "[walcheck]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in walcheck.items())
    mgr.write_file(".config/agor/units.toml", toml)
    agor_units(mgr, "install", "--now", "--", "/bin/sleep", "1000", check=True)


def fresh(mgr) -> int:
    """An empty ~/.local/share/agor; returns a mark for tool_lines (the journal outlives tests)."""
    shutil.rmtree(mgr.home / DATA, ignore_errors=True)
    mgr.write_file(f"{DATA}/.keep", "")
    return len(mgr.journal_lines(SERVICE, identifier=IDENTIFIER))


def tool_lines(mgr, prefixes, mark: int = 0) -> list[str]:
    """agor-walcheck's own lines (by SyslogIdentifier: the process exits right after writing)."""
    lines = mgr.journal_lines(SERVICE, identifier=IDENTIFIER)[mark:]
    return [
        ln.removeprefix("agor-walcheck: ")
        for ln in lines
        if ln.removeprefix("agor-walcheck: ").startswith(tuple(prefixes))
    ]


def wait_tool_line(mgr, needle: str, mark: int, timeout: float) -> list[str]:
    return wait_for(
        repr(needle),
        lambda: [ln for ln in tool_lines(mgr, [needle.split(": ")[0]], mark) if needle in ln],
        timeout=timeout,
    )


def walcheck_json(mgr, *dbs) -> dict:
    cp = mgr.run([PYTHON, "-m", "agor_systemd.walcheck", "--json", *dbs], timeout=60)
    return json.loads(cp.stdout) | {"returncode": cp.returncode, "stderr": cp.stderr}


def committed_ids(log_text: str) -> set[int]:
    ids: set[int] = set()
    for line in log_text.split("\n")[:-1]:  # a last line without newline was cut by SIGKILL
        start, n = map(int, line.split())
        ids.update(range(start, start + n))
    return ids


def test_timer_checkpoints_under_concurrent_writers_and_sigkills(user_manager):
    mgr = user_manager
    rng = random.Random(mgr.version)
    dbs = [str(mgr.home / DATA / "sessions.db"), str(mgr.home / DATA / "btmsg.db")]
    mark = fresh(mgr)
    unit_mark = len(mgr.journal_lines(SERVICE))
    mgr.run([PYTHON, "-c", CREATE, *dbs], check=True)
    logs = [mgr.write_file(f"writer-{i}.log", "") for i in range(4)]
    writers: list[subprocess.Popen] = []
    bases = iter(range(1_000_000, 10**9, 1_000_000))

    def start_writer(i: int) -> subprocess.Popen:
        return popen_as_user(
            mgr,
            [PYTHON, "-c", WRITER, dbs[i % 2], logs[i], next(bases)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    writers = [start_writer(i) for i in range(4)]
    try:
        install_walcheck(mgr, interval_s=1, busy_timeout_s=2)
        assert "agor-walcheck.timer" in mgr.systemctl("list-timers", "--all").stdout
        writer_kills = checkpointer_kills = 0
        deadline = time.monotonic() + 14
        while time.monotonic() < deadline and (writer_kills < 4 or checkpointer_kills < 2):
            if rng.random() < 0.3:
                i = rng.randrange(4)
                time.sleep(rng.uniform(0, 0.2))
                writers[i].send_signal(signal.SIGKILL)
                writers[i].wait()
                writers[i] = start_writer(i)
                writer_kills += 1
                continue
            # wait for a checkpoint run, kill it at a random point
            try:
                mgr.wait_property(SERVICE, "ActiveState", "activating", timeout=3)
            except Exception:
                continue
            time.sleep(rng.uniform(0, 0.08))
            if mgr.systemctl("kill", "--signal=SIGKILL", SERVICE).returncode == 0:
                checkpointer_kills += 1
        assert writer_kills >= 4 and checkpointer_kills >= 2, (writer_kills, checkpointer_kills)
        time.sleep(3.5)  # unkilled timer runs with the writers still going
    finally:
        for w in writers:
            w.send_signal(signal.SIGKILL)
            w.wait()
    mgr.systemctl("stop", TIMER, check=True)
    mgr.wait_property(SERVICE, "ActiveState", ("inactive", "failed"), timeout=20)

    lines = tool_lines(mgr, dbs, mark)
    outcomes = [ln.split(": ")[1] for ln in lines]
    # no reader ever blocked: every run that was not killed truncated both WALs
    assert outcomes and set(outcomes) == {"truncated"}, lines[-6:]
    assert {ln.split(": ")[0] for ln in lines} == set(dbs)  # unkilled runs reached both databases
    killed = [ln for ln in mgr.journal_lines(SERVICE, sync=False)[unit_mark:] if "status=9/KILL" in ln]
    assert killed, "the checkpointer was never killed while running"

    final = walcheck_json(mgr, *dbs)
    assert final["returncode"] == 0, final
    assert [(d["outcome"], d["wal_bytes_after"]) for d in final["databases"]] == [("truncated", 0)] * 2
    check = json.loads(mgr.run([PYTHON, "-c", CHECK, *dbs], check=True).stdout)
    for i, log in enumerate(logs):
        db = check[dbs[i % 2]]
        assert db["integrity"] == "ok"
        logged = committed_ids(log.read_text())
        assert len(logged) > 100
        assert logged <= set(db["ids"]), f"lost {len(logged - set(db['ids']))} committed rows"


def test_a_long_reader_makes_the_run_busy_then_the_next_run_truncates(user_manager):
    mgr = user_manager
    db = str(mgr.home / DATA / "btmsg.db")
    mark = fresh(mgr)
    mgr.run([PYTHON, "-c", CREATE, db], check=True)
    reader = popen_as_user(mgr, [PYTHON, "-c", READER, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "reading\n"
        install_walcheck(mgr, interval_s=1, busy_timeout_s=0.2, databases=[db])
        wait_tool_line(mgr, f"{db}: busy: ", mark, timeout=15)
        wait_for("exit status 75", lambda: mgr.unit_property(SERVICE, "ExecMainStatus") == "75", timeout=10)
        status = mgr.systemctl("status", SERVICE).stdout
        assert "status=75" in status, status
        assert mgr.unit_property(SERVICE, "Result") == "exit-code"
        busy = tool_lines(mgr, [db], mark)[-1]
        assert "readers or writers held the database through 4 attempts" in busy and "busy=1" in busy
        # the unit's --busy-timeout bounds all four attempts together: agor's writers were held
        # up at most that long per run (slack for a loaded machine)
        assert "busy timeout 0.2 s in all" in busy, busy
        assert float(re.search(r"\((\d+\.\d+) s in TRUNCATE", busy)[1]) < 0.2 + 0.4, busy
    finally:
        reader.stdin.close()
        reader.wait(timeout=10)
    wait_tool_line(mgr, f"{db}: truncated: ", mark, timeout=15)
    lines = tool_lines(mgr, [db], mark)
    first = next(i for i, ln in enumerate(lines) if ": truncated: " in ln)
    assert all(": busy: " in ln for ln in lines[:first]) and first >= 1
    assert "-> 0 B" in lines[first]
    wait_for("a successful run", lambda: mgr.unit_property(SERVICE, "ExecMainStatus") == "0", timeout=10)
    mgr.systemctl("stop", TIMER, check=True)


def test_bad_inputs_through_the_unit_and_list_timers(user_manager):
    mgr = user_manager
    odd_dir = mgr.home / "odd dir %h 50%"
    good = str(odd_dir / "s p a c e %n.db")
    mark = fresh(mgr)
    readonly = str(mgr.home / DATA / "sessions.db")
    junk = mgr.write_file(f"{DATA}/junk.db", "x" * 500)
    mgr.write_file("odd dir %h 50%/.keep", "")
    mgr.run([PYTHON, "-c", CREATE, good, readonly], check=True)
    (mgr.home / DATA / "sessions.db").chmod(0o444)
    before = (mgr.home / DATA / "sessions.db").read_bytes()
    missing = str(mgr.home / DATA / "missing.db")
    install_walcheck(
        mgr,
        interval_s=3600,
        busy_timeout_s=0.2,
        databases=["~/odd dir %h 50%/s p a c e %n.db", missing, readonly, str(junk)],
    )
    timers = mgr.systemctl("list-timers", "--all", "--no-legend").stdout
    assert any(TIMER in ln and SERVICE in ln for ln in timers.splitlines()), timers
    # run it now (the timer's next run is an hour away); a oneshot start waits for the run's end
    cp = mgr.systemctl("start", SERVICE, timeout=30)
    assert cp.returncode != 0 and mgr.unit_property(SERVICE, "ActiveState") == "failed"
    # the timer's OnStartupSec= has long passed in this manager, so installing it may already have
    # run the service once: look at the last run's four lines
    lines = tool_lines(mgr, [good, missing, readonly, str(junk)], mark)[-4:]
    assert [ln.split(": ")[1] for ln in lines] == ["truncated", "missing", "permission-denied", "not-a-database"]
    assert lines[0].startswith(f"{good}: truncated: ")
    assert mgr.unit_property(SERVICE, "ExecMainStatus") == "65"  # not-a-database outranks permission-denied
    assert (mgr.home / DATA / "sessions.db").read_bytes() == before
    mgr.systemctl("stop", TIMER, check=True)
