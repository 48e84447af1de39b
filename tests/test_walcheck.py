"""agor-walcheck on real SQLite files in tmp_path: outcomes, exit statuses, bad inputs, disk full,
kills, and the units that run it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agor_systemd.config import Config, ConfigError, WalcheckConfig, parse_config
from agor_systemd.unitfile import HomePath
from agor_systemd.verify import verify_units
from agor_systemd.walcheck import (
    EXIT_DATAERR,
    EXIT_IOERR,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_TEMPFAIL,
    CheckpointResult,
    checkpoint,
    default_databases,
    exit_status,
    size_text,
)
from agor_systemd.walcheck.units import WALCHECK_SERVICE, WALCHECK_TIMER, walcheck_units

REPO = Path(__file__).resolve().parent.parent
PYTHON = ["/usr/bin/python3", "-I"]
FAST = (0.01, 0.02)  # retry delays for tests


class WalDb:
    """A WAL-mode database with rows in its WAL: the connection stays open (a last close would
    checkpoint and delete the WAL), with automatic checkpoints off."""

    def __init__(self, path: Path, rows: int = 200, blob: int = 500):
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
        with self.db:
            self.db.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(blob)) for i in range(rows)))

    @property
    def wal_size(self) -> int:
        return os.path.getsize(f"{self.path}-wal")

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM t").fetchone()[0]

    def insert(self, rows: list[tuple[int, bytes]]) -> None:
        with self.db:
            self.db.executemany("INSERT INTO t VALUES (?, ?)", rows)

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def waldb(tmp_path):
    db = WalDb(tmp_path / "sessions.db")
    yield db
    db.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def walcheck(*args, env=None, preexec_fn=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agor_systemd.walcheck", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        preexec_fn=preexec_fn,
    )


def integrity(path: Path) -> str:
    """PRAGMA integrity_check from a fresh process, as agor would see the files after a restart.

    Read-write: after a SIGKILL a read-only connection may be unable to rebuild the wal-index.
    """
    code = (
        "import sqlite3, sys; c = sqlite3.connect(f'file:{sys.argv[1]}?mode=rw', uri=True); "
        "print(c.execute('PRAGMA integrity_check').fetchone()[0])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def header_journal_mode(path: Path) -> str:
    versions = path.read_bytes()[18:20]
    return {b"\x01\x01": "rollback", b"\x02\x02": "wal"}[versions]


# --- outcomes ------------------------------------------------------------------------------------


def test_truncates_the_wal_and_reports_the_row(waldb):
    before = waldb.wal_size
    assert before > 100_000
    result = checkpoint(waldb.path, busy_timeout_s=5)
    assert result.outcome == "truncated" and result.exit_status == EXIT_OK
    assert (result.busy, result.log_frames, result.checkpointed_frames) == (0, 0, 0)  # TRUNCATE resets the WAL
    assert result.passive[0] == 0 and result.passive[1] == result.passive[2] == (before - 32) // (4096 + 24)
    assert result.wal_bytes_before == before and result.wal_bytes_after == 0 == waldb.wal_size
    assert result.attempts == 1 and result.journal_mode == "wal"
    assert waldb.count() == 200 and integrity(waldb.path) == "ok"
    assert f"WAL {size_text(before)} -> 0 B" in result.line() and size_text(before).endswith(" KiB")
    data = result.as_dict()
    assert data["outcome"] == "truncated" and data["exit_status"] == 0 and data["path"] == str(waldb.path)
    json.dumps(data)


def test_missing_database_is_skipped_and_not_created(tmp_path):
    path = tmp_path / "nope" / "btmsg.db"
    result = checkpoint(path)
    assert (result.outcome, result.exit_status) == ("missing", EXIT_OK)
    assert "no such file" in result.message
    assert not path.parent.exists()
    result = checkpoint(tmp_path / "btmsg.db")
    assert result.outcome == "missing" and list(tmp_path.iterdir()) == []


def test_not_in_wal_mode_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "rollback.db"
    new_table(path, wal=False)
    digest = sha(path)
    result = checkpoint(path)
    assert (result.outcome, result.exit_status, result.journal_mode) == ("not-wal", EXIT_OK, "delete")
    assert "--ensure-wal" in result.message
    assert sha(path) == digest and header_journal_mode(path) == "rollback"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollback.db"]

    result = checkpoint(path, ensure_wal=True)
    assert (result.outcome, result.switched_to_wal, result.journal_mode) == ("truncated", True, "wal")
    assert header_journal_mode(path) == "wal"
    assert sqlite3.connect(str(path)).execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_reader_blocks_truncate_then_the_next_run_truncates(waldb):
    reader = sqlite3.connect(str(waldb.path), isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (200,)  # snapshot pins the WAL
    waldb.insert([(1000, b"x")])
    sleeps = []
    result = checkpoint(waldb.path, busy_timeout_s=0.3, retry_delays_s=FAST, sleep=sleeps.append)
    assert (result.outcome, result.exit_status, result.busy, result.attempts) == ("busy", EXIT_TEMPFAIL, 1, 3)
    assert sleeps == list(FAST)
    assert 0.25 < result.truncate_s < 0.3 + 0.3  # the three attempts share the busy timeout
    assert result.log_frames > 0 and result.wal_bytes_after == result.wal_bytes_before > 0
    assert "readers or writers held the database through 3 attempts" in result.message

    cp = walcheck("--busy-timeout", "0.05", "--retries", "0", waldb.path)
    assert cp.returncode == EXIT_TEMPFAIL and cp.stdout == ""
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith(f"agor-walcheck: {waldb.path}: busy: ")

    reader.execute("COMMIT")
    reader.close()
    result = checkpoint(waldb.path, busy_timeout_s=0.05)
    assert (result.outcome, result.wal_bytes_after) == ("truncated", 0)
    assert waldb.count() == 201


def test_an_open_write_transaction_makes_it_busy_and_loses_nothing(waldb):
    writer = sqlite3.connect(str(waldb.path), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t(id, b) VALUES (5000, 'pending')")
    result = checkpoint(waldb.path, busy_timeout_s=0.05, retry_delays_s=())
    assert (result.outcome, result.busy, result.attempts) == ("busy", 1, 1)
    writer.execute("COMMIT")
    writer.close()
    result = checkpoint(waldb.path, busy_timeout_s=0.05)
    assert result.outcome == "truncated" and result.wal_bytes_after == 0
    assert waldb.count() == 201 and integrity(waldb.path) == "ok"


def test_a_short_transaction_is_waited_for_within_the_busy_timeout(waldb):
    script = textwrap.dedent(f"""
        import sqlite3, time
        c = sqlite3.connect({str(waldb.path)!r}, isolation_level=None)
        c.execute("BEGIN IMMEDIATE"); c.execute("INSERT INTO t(id, b) VALUES (7000, 'x')")
        print("locked", flush=True); time.sleep(0.5); c.execute("COMMIT")
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    started = time.monotonic()
    result = checkpoint(waldb.path, busy_timeout_s=5, retry_delays_s=())
    holder.wait(timeout=10)
    assert result.outcome == "truncated" and result.attempts == 1
    assert 0.2 < time.monotonic() - started < 4
    assert waldb.count() == 201


# --- library use: the caller's own connections keep their locks ----------------------------------


def count_elsewhere(path: Path) -> int:
    """The row count a fresh process sees (opens, reads, closes: a last close deletes the WAL)."""
    code = "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM t').fetchone()[0])"
    return int(
        subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )


def test_library_call_keeps_the_callers_writer_locks(waldb):
    # POSIX locks belong to the process: closing any descriptor of the database file drops the
    # locks of every connection this process holds on it. Another process's last close then
    # checkpoints and deletes -wal/-shm under the live writer, whose later commits go to the
    # unlinked WAL: no other process sees them, and they are gone once the writer exits.
    assert checkpoint(waldb.path).outcome == "truncated"
    assert count_elsewhere(waldb.path) == 200
    assert os.path.exists(f"{waldb.path}-wal") and os.path.exists(f"{waldb.path}-shm")
    waldb.insert([(1000 + i, b"after") for i in range(20)])
    assert count_elsewhere(waldb.path) == 220


# --- how long a run holds up agor's writers --------------------------------------------------------

# inserts without a busy timeout (as agor's sessions.db connection) until stdin closes; prints
# how long its inserts failed with "database is locked": each stall runs from the first failed
# insert to the next one that succeeded
NO_WAIT_WRITER = str(Path(__file__).parent / "programs" / "no_wait_writer.py")

# a read transaction that pins the WAL until stdin closes: every TRUNCATE attempt waits for it
PINNING_READER = """
import sqlite3, sys
r = sqlite3.connect(sys.argv[1], isolation_level=None)
r.execute("BEGIN"); r.execute("SELECT count(*) FROM t").fetchone()
print("reading", flush=True)
sys.stdin.read()
"""


def test_a_busy_run_holds_up_a_writer_without_busy_timeout_at_most_the_busy_timeout(tmp_path):
    path = tmp_path / "sessions.db"
    new_table(path, wal=True)
    reader = subprocess.Popen(
        [sys.executable, "-c", PINNING_READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    writer = subprocess.Popen(
        [sys.executable, NO_WAIT_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline() == "reading\n" and writer.stdout.readline() == "writing\n"
        time.sleep(0.3)
        cp = walcheck("--json", path)  # the timer's defaults
        time.sleep(0.3)
    finally:
        stats = json.loads(writer.communicate("", timeout=30)[0])
        reader.communicate("", timeout=30)
    (entry,) = json.loads(cp.stdout)["databases"]
    assert (cp.returncode, entry["outcome"], entry["attempts"]) == (EXIT_TEMPFAIL, "busy", 4), cp.stdout
    # the attempts held the writer up while they waited for the reader, and only then
    assert stats["failed"] > 0 and 0 < len(stats["stalls"]) <= 4, stats
    # the four attempts share the 1 s default busy timeout (before: 5 s each, 20 s per run; agor's
    # own checkpoint: up to 5 s); the slack is for a loaded machine
    assert sum(stats["stalls"]) < 1.0 + 1.5 and max(stats["stalls"]) < 0.25 + 0.75, stats
    # each attempt waits out its 0.25 s, except one that meets the writer's own (automatic, PASSIVE)
    # checkpoint: SQLite then answers SQLITE_BUSY at once, without the busy handler (CI once: 0.75 s)
    assert 0.2 < entry["truncate_s"] < 1.0 + 1.0


# --- bad inputs: one line, non-zero, the file untouched -------------------------------------------


def new_table(path: Path, wal: bool, rows: int = 1, blob: int = 1) -> None:
    """Table t (id, b) with `rows` rows; closed, so its WAL (if any) is checkpointed and removed."""
    db = sqlite3.connect(str(path), isolation_level=None)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
    with db:
        db.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(blob)) for i in range(rows)))
    db.close()


def make_truncated(path: Path, wal: bool) -> None:
    new_table(path, wal, rows=300, blob=2000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("kind", "outcome", "needle"),
    [
        ("directory", "not-a-database", "is a directory"),
        ("empty", "not-a-database", "empty file (0 bytes)"),
        ("random", "not-a-database", "no valid SQLite header (65536 bytes)"),
        ("short", "not-a-database", "no valid SQLite header (19 bytes)"),
        ("header-then-garbage", "not-a-database", "file is not a database (SQLITE_NOTADB)"),
        ("truncated-rollback", "corrupt", "database disk image is malformed (SQLITE_CORRUPT)"),
        ("truncated-wal", "corrupt", "database disk image is malformed (SQLITE_CORRUPT)"),
    ],
)
def test_bad_input_is_one_line_error_and_left_untouched(tmp_path, kind, outcome, needle):
    path = tmp_path / "bad.db"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(1).randbytes(64 * 1024))
    elif kind == "short":
        path.write_bytes(b"SQLite format 3\x00abc")
    elif kind == "header-then-garbage":
        path.write_bytes(b"SQLite format 3\x00" + random.Random(2).randbytes(8192))
    else:
        make_truncated(path, wal=kind.endswith("wal"))
    digest = None if path.is_dir() else sha(path)
    before = sorted(p.name for p in tmp_path.iterdir())

    cp = walcheck(path)
    assert cp.returncode == EXIT_DATAERR, cp.stderr
    assert cp.stdout == ""
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"agor-walcheck: {path}: {outcome}: ") and needle in lines[0]
    assert "Traceback" not in cp.stderr
    if digest is not None:
        assert sha(path) == digest
        assert "file left untouched" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no -wal / -shm / -journal left behind


def test_empty_database_next_to_a_wal_keeps_the_wal(tmp_path, waldb):
    # SQLite deletes the WAL of a zero-byte database when it opens it; walcheck must not open it
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    shutil.copyfile(f"{waldb.path}-wal", f"{empty}-wal")
    wal_digest = sha(Path(f"{empty}-wal"))
    result = checkpoint(empty)
    assert result.outcome == "not-a-database" and "its WAL" in result.message and "left alone" in result.message
    assert sha(Path(f"{empty}-wal")) == wal_digest and empty.stat().st_size == 0


def test_junk_next_to_a_wal_is_not_recovered_into(tmp_path, waldb):
    # a read-write SQLite connection would take page 1 from the WAL, accept the junk as a
    # database, and its last close would checkpoint the WAL into the junk and delete the WAL
    junk = tmp_path / "junk.db"
    junk.write_bytes(random.Random(3).randbytes(64 * 1024))
    shutil.copyfile(f"{waldb.path}-wal", f"{junk}-wal")
    digests = sha(junk), sha(Path(f"{junk}-wal"))
    result = checkpoint(junk)
    assert result.outcome == "not-a-database" and "SQLITE_NOTADB" in result.message
    assert (sha(junk), sha(Path(f"{junk}-wal"))) == digests
    assert not Path(f"{junk}-shm").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a read-only file (the integration test covers it)")
def test_read_only_file_is_permission_denied(waldb):
    waldb.close()
    waldb.path.chmod(0o444)
    result = checkpoint(waldb.path)
    assert (result.outcome, result.exit_status) == ("permission-denied", EXIT_NOPERM)


def test_path_with_spaces_and_percent(tmp_path):
    odd = tmp_path / "a dir %h %20 ?x #y" / "my sessions %s.db"
    odd.parent.mkdir()
    db = WalDb(odd, rows=50)
    try:
        cp = walcheck("--json", odd)
        assert cp.returncode == 0, cp.stderr
        (entry,) = json.loads(cp.stdout)["databases"]
        assert entry["path"] == str(odd) and entry["outcome"] == "truncated" and entry["wal_bytes_after"] == 0
        assert db.count() == 50
        assert not (tmp_path / "a dir ").exists() and sorted(p.name for p in tmp_path.iterdir()) == [odd.parent.name]
    finally:
        db.close()


def test_a_symlinked_database_reports_the_wal_beside_its_target(tmp_path):
    # SQLite follows the link: the WAL lives beside the target, not beside the link
    (tmp_path / "data").mkdir()
    (tmp_path / "links").mkdir()
    db = WalDb(tmp_path / "data" / "btmsg.db", rows=50)
    try:
        before = db.wal_size
        link = tmp_path / "links" / "btmsg.db"
        link.symlink_to("../data/btmsg.db")
        result = checkpoint(link)
        assert (result.outcome, result.path) == ("truncated", str(link))
        assert (result.wal_bytes_before, result.wal_bytes_after) == (before, 0) and db.wal_size == 0
        assert f"WAL {size_text(before)} -> 0 B" in result.message
        assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["btmsg.db"]
        assert db.count() == 50
    finally:
        db.close()


def test_a_symlink_to_an_empty_file_reports_the_wal_beside_the_target(tmp_path, waldb):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    shutil.copyfile(f"{waldb.path}-wal", f"{empty}-wal")
    link = tmp_path / "link.db"
    link.symlink_to(empty.name)
    result = checkpoint(link)
    assert result.outcome == "not-a-database" and f"its WAL ({size_text(waldb.wal_size)}) left alone" in result.message
    assert result.wal_bytes_before == waldb.wal_size


# --- disk full: nothing damaged, the next run succeeds --------------------------------------------


def test_file_size_limit_during_checkpoint_is_an_io_error_and_damages_nothing(waldb):
    limit = os.path.getsize(waldb.path) + 8192  # the checkpoint must grow the database file

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cp = walcheck("--json", waldb.path, preexec_fn=set_limit)
    assert cp.returncode == EXIT_IOERR, cp.stderr
    (entry,) = json.loads(cp.stdout)["databases"]
    assert entry["outcome"] == "io-error" and "SQLITE_IOERR_WRITE" in entry["message"]
    assert "the WAL still holds every commit" in entry["message"]
    assert cp.stderr.count("\n") == 1
    assert integrity(waldb.path) == "ok" and waldb.count() == 200
    assert checkpoint(waldb.path).outcome == "truncated"
    assert waldb.count() == 200 and integrity(waldb.path) == "ok"


FULL_DISK = r"""
import json, os, sqlite3, subprocess, sys
d = sys.argv[1]; db = os.path.join(d, "full.db")
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA journal_mode=wal"); c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
for i in range(300):
    c.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(1000),))
fd = os.open(os.path.join(d, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\1" * 4096)
except OSError:
    pass
os.close(fd)
walcheck = [sys.executable, "-m", "agor_systemd.walcheck", "--json", db]
full = subprocess.run(walcheck, capture_output=True, text=True)
check = c.execute("PRAGMA integrity_check").fetchone()[0], c.execute("SELECT count(*) FROM t").fetchone()[0]
os.unlink(os.path.join(d, "filler"))
again = subprocess.run(walcheck, capture_output=True, text=True)
after = c.execute("SELECT count(*) FROM t").fetchone()[0]
print(json.dumps({"full": [full.returncode, full.stdout, full.stderr], "check": check,
                  "again": [again.returncode, again.stdout], "after": after}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="mounting a tiny tmpfs needs root")
def test_disk_full_during_checkpoint_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    cp = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=4m tmpfs "$1" && exec "$2" "$3" "$1"',
            "sh",
            str(mnt),
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    status, stdout, stderr = out["full"]
    assert status == EXIT_IOERR
    (entry,) = json.loads(stdout)["databases"]
    assert entry["outcome"] == "disk-full" and "SQLITE_FULL" in entry["message"]
    assert stderr.startswith("agor-walcheck: ") and stderr.count("\n") == 1 and "disk full" in stderr
    assert out["check"] == ["ok", 300]
    assert out["again"][0] == 0 and json.loads(out["again"][1])["databases"][0]["outcome"] == "truncated"
    assert out["after"] == 300


# --- kills --------------------------------------------------------------------------------------


def test_checkpointer_killed_at_random_points_loses_nothing(tmp_path):
    rng = random.Random(7)
    # how long one unkilled run takes here (on a twin), so the kills land inside runs; never
    # copy a database file while this process holds a connection to it: closing the copy's
    # descriptor would drop that connection's POSIX locks
    twin = WalDb(tmp_path / "twin.db", rows=2500, blob=4000)
    started = time.monotonic()
    assert walcheck(twin.path).returncode == 0
    run_s = time.monotonic() - started
    twin.close()
    db = WalDb(tmp_path / "big.db", rows=2500, blob=4000)  # ~13 MiB of WAL
    try:
        kills = 0
        for round_ in range(6):
            db.insert([(100_000 + round_, b"marker")])
            proc = subprocess.Popen(
                [sys.executable, "-m", "agor_systemd.walcheck", str(db.path)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.2, 0.9) * run_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            assert integrity(db.path) == "ok"
            # the same writer connection carries on through every kill
            db.insert([(200_000 + round_ * 1000 + i, os.urandom(4000)) for i in range(500)])
        assert kills >= 2
        assert checkpoint(db.path).outcome == "truncated"
        assert integrity(db.path) == "ok"
        assert db.count() == 2500 + 6 + 6 * 500
    finally:
        db.close()


# --- command line --------------------------------------------------------------------------------


def test_exit_status_precedence():
    def r(outcome):
        return CheckpointResult("x", outcome, "")

    assert exit_status([]) == EXIT_OK
    assert exit_status([r("truncated"), r("missing"), r("not-wal")]) == EXIT_OK
    assert exit_status([r("truncated"), r("busy")]) == EXIT_TEMPFAIL
    assert exit_status([r("busy"), r("permission-denied")]) == EXIT_NOPERM
    assert exit_status([r("busy"), r("disk-full"), r("permission-denied")]) == EXIT_IOERR
    assert exit_status([r("io-error"), r("corrupt")]) == EXIT_DATAERR


def test_cli_json_mixed_outcomes_and_exit_status(tmp_path, waldb):
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 10)
    cp = walcheck("--json", waldb.path, tmp_path / "gone.db", tmp_path / "junk.db")
    assert cp.returncode == EXIT_DATAERR
    doc = json.loads(cp.stdout)
    assert doc["exit_status"] == EXIT_DATAERR
    assert [d["outcome"] for d in doc["databases"]] == ["truncated", "missing", "not-a-database"]
    assert cp.stderr.splitlines() == [
        f"agor-walcheck: {tmp_path / 'junk.db'}: not-a-database: no valid SQLite "
        "header (170 bytes), not an SQLite database: file is not a database "
        "(SQLITE_NOTADB); file left untouched"
    ]


def test_cli_lines_go_to_stdout_and_defaults_are_agors_databases(tmp_path):
    home = tmp_path / "home"
    data = home / ".local/share/agor"
    data.mkdir(parents=True)
    db = WalDb(data / "btmsg.db", rows=10)
    try:
        env = {**os.environ, "HOME": str(home)}
        cp = walcheck(env=env)
        assert cp.returncode == 0 and cp.stderr == ""
        assert cp.stdout.splitlines()[0] == f"{data / 'sessions.db'}: missing: no such file; skipped"
        assert cp.stdout.splitlines()[1].startswith(f"{data / 'btmsg.db'}: truncated: checkpointed ")
        assert len(cp.stdout.splitlines()) == 2
    finally:
        db.close()
    assert default_databases("/home/u") == [
        "/home/u/.local/share/agor/sessions.db",
        "/home/u/.local/share/agor/btmsg.db",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--busy-timeout", "soon"],
        ["--busy-timeout", "-1"],
        ["--busy-timeout", "5.5"],
        ["--busy-timeout", "nan"],
        ["--retries", "9"],
    ],
)
def test_cli_usage_errors_are_one_line(args):
    cp = walcheck(*args)
    assert cp.returncode == 2 and cp.stdout == ""
    assert len(cp.stderr.splitlines()) == 1 and cp.stderr.startswith("agor-walcheck: error: ")


def test_cli_empty_database_argument_is_a_usage_error():
    cp = walcheck("")
    assert (cp.returncode, cp.stdout) == (2, "")
    assert cp.stderr == "agor-walcheck: error: an empty database path (see --help)\n"


def test_cli_help_explains_outcomes_and_statuses():
    cp = walcheck("--help")
    assert cp.returncode == 0
    for needle in (
        "--json",
        "--ensure-wal",
        "--busy-timeout",
        "65  not-a-database",
        "74  disk-full",
        "75  busy",
        "77  permission-denied",
        "0  missing",
        "0  not-wal",
        "0  truncated",
    ):
        assert needle in cp.stdout, needle


# --- the units ----------------------------------------------------------------------------------


def settings(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_default_units():
    service, timer = walcheck_units(Config(), PYTHON)
    assert (service.name, timer.name) == (WALCHECK_SERVICE, WALCHECK_TIMER)
    s, t = settings(service.render()), settings(timer.render())
    assert s["Type"] == ["oneshot"]
    assert s["ExecStart"] == [
        ':"/usr/bin/python3" "-I" "-m" "agor_systemd.walcheck" "--busy-timeout" "1" "--" '
        '"%h/.local/share/agor/sessions.db" "%h/.local/share/agor/btmsg.db"'
    ]
    assert s["StartLimitIntervalSec"] == ["0"] and s["TimeoutStartSec"] == ["606s"]
    assert "[Install]" not in service.render()  # started by the timer only
    assert t["OnStartupSec"] == ["60s"] and t["OnUnitInactiveSec"] == ["300s"] and t["AccuracySec"] == ["1s"]
    assert "OnCalendar" not in t and "Persistent" not in t and "OnUnitActiveSec" not in t
    assert timer.render().endswith("[Install]\nWantedBy=timers.target\n")


def test_units_from_a_walcheck_table_with_odd_paths():
    config = parse_config(
        {"walcheck": {"interval_s": 1, "busy_timeout_s": 0.25, "databases": ["~/data %h dir/s.db", "/srv/a b/c%d.db"]}}
    )
    service, timer = walcheck_units(config, ["/usr/bin/python3", "-I"])
    s, t = settings(service.render()), settings(timer.render())
    assert s["ExecStart"] == [
        ':"/usr/bin/python3" "-I" "-m" "agor_systemd.walcheck" "--busy-timeout" "0.25" '
        '"--" "%h/data %%h dir/s.db" "/srv/a b/c%%d.db"'
    ]
    assert t["OnStartupSec"] == ["1s"] and t["OnUnitInactiveSec"] == ["1s"]
    assert verify_units({service.name: service.render(), timer.name: timer.render()}) == []


def test_an_empty_databases_list_is_refused():
    # empty would run the CLI without paths, which checkpoints agor's default databases
    with pytest.raises(ConfigError, match=r"\[walcheck\] databases is empty"):
        parse_config({"walcheck": {"databases": []}})


def test_busy_timeout_is_at_most_agors_five_seconds(tmp_path):
    assert parse_config({"walcheck": {"busy_timeout_s": 5}}).walcheck.busy_timeout_s == 5
    with pytest.raises(ConfigError, match="busy_timeout_s"):
        parse_config({"walcheck": {"busy_timeout_s": 5.5}})
    with pytest.raises(ValueError, match="between 0 and 5"):
        checkpoint(tmp_path / "x.db", busy_timeout_s=6)


def test_timer_interval_keeps_sub_second_precision():
    config = Config(walcheck=replace(WalcheckConfig(), interval_s=2.5, databases=(HomePath("x.db"),)))
    _, timer = walcheck_units(config, PYTHON)
    assert settings(timer.render())["OnUnitInactiveSec"] == ["2500ms"]
