"""btmsg.db both ways: agor's database opened here keeps working for agor, and a database made here is
agor's. agor's DDL is tests/programs/agor_btmsg.sql, transcribed from the facts file on its own."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from agor_systemd.btmsg.schema import EXIT_DATAERR, EXIT_NOINPUT, SCHEMA_VERSION, DatabaseError
from agor_systemd.btmsg.store import open_store

AGOR_SQL = (Path(__file__).parent / "programs" / "agor_btmsg.sql").read_text()
AGOR_TABLES = [
    "agents",
    "contacts",
    "messages",
    "channels",
    "channel_members",
    "channel_messages",
    "tasks",
    "task_comments",
    "heartbeats",
    "dead_letter_queue",
    "audit_log",
    "seen_messages",
]

# agor's own statements (Rust btmsg.rs and the Python CLI), as agor runs them on its database
AGOR_STATEMENTS = [
    ("INSERT OR IGNORE INTO agents (id, name, role, group_id, tier) VALUES ('admin', 'Operator', 'admin', 'g', 0)", ()),
    (
        "INSERT INTO agents (id, name, role, group_id, tier, status) "
        "VALUES ('p1', 'Project', 'project', 'g', 2, 'active')",
        (),
    ),
    ("INSERT INTO contacts (agent_id, contact_id) VALUES ('admin', 'p1')", ()),
    (
        "INSERT INTO messages (id, from_agent, to_agent, content, group_id, sender_group_id) "
        "VALUES ('agor-m2', 'admin', 'p1', 'from agor', 'g', 'g')",
        (),
    ),
    (
        "INSERT INTO heartbeats (agent_id, timestamp) VALUES ('p1', ?) "
        "ON CONFLICT(agent_id) DO UPDATE SET timestamp = excluded.timestamp",
        (int(time.time()),),
    ),
    (
        "INSERT INTO dead_letter_queue (from_agent, to_agent, content, error) VALUES ('p1', 'admin', 'x', "
        "'Recipient ''admin'' is stale (no heartbeat in 300 seconds)')",
        (),
    ),
    ("INSERT INTO audit_log (agent_id, event_type, detail) VALUES ('p1', 'dead_letter', 'x')", ()),
    ("INSERT INTO seen_messages (session_id, message_id) VALUES ('s1', 'agor-m2')", ()),
    ("UPDATE messages SET read = 1 WHERE id = 'agor-m2'", ()),
    (
        "SELECT d.id, d.from_agent, d.to_agent, d.content, d.error, d.created_at FROM dead_letter_queue d "
        "JOIN agents a ON d.to_agent = a.id WHERE a.group_id = ? ORDER BY d.created_at DESC LIMIT 50",
        ("g",),
    ),
    (
        "SELECT a.id FROM agents a LEFT JOIN heartbeats h ON a.id = h.agent_id "
        "WHERE a.group_id = ? AND a.tier > 0 AND (h.timestamp IS NULL OR h.timestamp < ?)",
        ("g", int(time.time()) - 300),
    ),
    (
        "SELECT m.id, m.from_agent, m.content FROM messages m WHERE m.to_agent = ? AND NOT EXISTS "
        "(SELECT 1 FROM seen_messages s WHERE s.message_id = m.id AND s.session_id = ?)",
        ("p1", "s1"),
    ),
    # btmsg_clear_all_comms, in agor's order
    ("DELETE FROM seen_messages WHERE message_id IN (SELECT id FROM messages WHERE group_id = ?)", ("g",)),
    ("DELETE FROM messages WHERE group_id = ?", ("g",)),
    ("DELETE FROM channel_messages WHERE channel_id IN (SELECT id FROM channels WHERE group_id = ?)", ("g",)),
    ("DELETE FROM dead_letter_queue WHERE to_agent IN (SELECT id FROM agents WHERE group_id = ?)", ("g",)),
]


def agor_connection(path: Path) -> sqlite3.Connection:
    """A connection as agor's Rust app opens one (open_db): WAL, 5 s busy timeout, foreign keys on,
    seen_messages ensured, sender_group_id added with the error ignored."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS seen_messages (session_id TEXT NOT NULL, message_id TEXT NOT NULL "
        "REFERENCES messages(id) ON DELETE CASCADE, seen_at INTEGER NOT NULL DEFAULT (unixepoch()), "
        "PRIMARY KEY (session_id, message_id))"
    )
    try:
        conn.execute("ALTER TABLE messages ADD COLUMN sender_group_id TEXT")
    except sqlite3.OperationalError:
        pass
    return conn


def make_agor_db(path: Path) -> None:
    conn = sqlite3.connect(str(path))
    conn.executescript(AGOR_SQL)
    conn.execute("INSERT INTO agents (id, name, role, group_id, tier) VALUES ('admin', 'Operator', 'admin', 'g', 0)")
    conn.execute("INSERT INTO agents (id, name, role, group_id, tier) VALUES ('mgr', 'Manager', 'manager', 'g', 1)")
    conn.execute(
        "INSERT INTO messages (id, from_agent, to_agent, content, group_id) "
        "VALUES ('agor-m1', 'admin', 'mgr', 'hi', 'g')"
    )
    conn.execute(
        "INSERT INTO dead_letter_queue (from_agent, to_agent, content, error) VALUES ('mgr', 'admin', 'old', 'stale')"
    )
    conn.commit()
    conn.close()


def columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """(name, type, notnull, default, pk) of each column, in order."""
    return [tuple(row[1:]) for row in conn.execute(f"PRAGMA table_info({table})")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_agor_statements(path: Path) -> None:
    conn = agor_connection(path)
    for sql, params in AGOR_STATEMENTS:
        conn.execute(sql, params).fetchall()
    conn.close()


def test_agor_database_is_migrated_additively_and_agor_keeps_working(tmp_path):
    path = tmp_path / "btmsg.db"
    make_agor_db(path)
    reference = tmp_path / "reference.db"
    make_agor_db(reference)
    with sqlite3.connect(str(reference)) as ref:
        agor_columns = {table: columns(ref, table) for table in AGOR_TABLES}
    with open_store(str(path)) as store:
        for table in AGOR_TABLES:
            ours = columns(store.conn, table)
            assert ours[: len(agor_columns[table])] == agor_columns[table], table  # agor's columns, unchanged
        added = columns(store.conn, "dead_letter_queue")[len(agor_columns["dead_letter_queue"]) :]
        assert [c[0] for c in added] == [
            "message_id",
            "reason",
            "attempts",
            "first_failed_at",
            "last_failed_at",
            "state",
            "reply_to",
            "group_id",
            "sender_group_id",
            "sent_at",
        ]
        assert all(c[2] == 0 or c[3] is not None for c in added)  # NOT NULL only with a default
        assert store.conn.execute("SELECT content FROM messages WHERE id = 'agor-m1'").fetchone() == ("hi",)
        # agor's own dead letter (no message id) is one of ours now: queued, reason stale
        assert [(d["content"], d["state"], d["reason"]) for d in store.dead_letters()] == [("old", "queued", "stale")]
    run_agor_statements(path)
    with open_store(str(path)) as store:  # and still ours after agor wrote to it
        assert store.conn.execute("SELECT max(version) FROM agor_systemd_schema").fetchone() == (SCHEMA_VERSION,)


def test_a_database_made_here_is_agors(tmp_path):
    path = tmp_path / "btmsg.db"
    with open_store(str(path), create=True) as store:
        store.register("admin", "Operator", "admin", "g")
        store.send("admin", "admin", "note to self")
    reference = tmp_path / "reference.db"
    make_agor_db(reference)
    with sqlite3.connect(str(reference)) as ref, sqlite3.connect(str(path)) as ours:
        for table in AGOR_TABLES:
            agor = columns(ref, table)
            assert columns(ours, table)[: len(agor)] == agor, table
        agor_indexes = {
            r[0] for r in ref.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
        our_indexes = {
            r[0] for r in ours.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
        assert agor_indexes <= our_indexes
    run_agor_statements(path)


def test_agors_python_cli_subset_is_completed_as_agor_would(tmp_path):
    """agor's Python CLI creates agents, contacts, messages (no sender_group_id) and channels only."""
    path = tmp_path / "btmsg.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(
        "CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, group_id TEXT NOT NULL, "
        "tier INTEGER NOT NULL DEFAULT 2, model TEXT, cwd TEXT, system_prompt TEXT, status TEXT DEFAULT 'stopped', "
        "last_active_at TEXT, created_at TEXT DEFAULT (datetime('now')));"
        "CREATE TABLE contacts (agent_id TEXT NOT NULL, contact_id TEXT NOT NULL, PRIMARY KEY (agent_id, contact_id));"
        "CREATE TABLE messages (id TEXT PRIMARY KEY, from_agent TEXT NOT NULL, to_agent TEXT NOT NULL, "
        "content TEXT NOT NULL, read INTEGER DEFAULT 0, reply_to TEXT, group_id TEXT NOT NULL, "
        "created_at TEXT DEFAULT (datetime('now')));"
        "INSERT INTO agents (id, name, role, group_id) VALUES ('a', 'A', 'project', 'g');"
    )
    conn.close()
    with open_store(str(path)) as store:
        assert "sender_group_id" in [c[0] for c in columns(store.conn, "messages")]
        names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert set(AGOR_TABLES) <= names
    run_agor_statements(path)


def unusable(path: Path, expected_status: int, words: str) -> None:
    before = sha(path) if path.exists() else None
    listing = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(DatabaseError) as caught:
        open_store(str(path))
    assert caught.value.exit_status == expected_status
    assert words in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert (sha(path) if path.exists() else None) == before
    assert sorted(p.name for p in path.parent.iterdir()) == listing  # no WAL, no journal left behind


def test_a_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "btmsg.db"
    open_store(str(path), create=True).close()
    with sqlite3.connect(str(path)) as conn:
        conn.execute("INSERT INTO agor_systemd_schema VALUES (?, datetime('now'))", (SCHEMA_VERSION + 1,))
        conn.execute("PRAGMA journal_mode=DELETE")
    unusable(path, EXIT_DATAERR, "newer than this agor-systemd")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "an empty file"),
        (b"this is not a database, just text " * 200, "not an SQLite database"),
        (os.urandom(8192), "not an SQLite database"),
    ],
    ids=["empty", "text", "random"],
)
def test_files_that_are_not_databases_are_refused_untouched(tmp_path, content, words):
    path = tmp_path / "btmsg.db"
    path.write_bytes(content)
    unusable(path, EXIT_DATAERR, words)


def test_another_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "sessions.db"
    with sqlite3.connect(str(path)) as conn:
        conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY)")
    unusable(path, EXIT_DATAERR, "not agor's btmsg.db")


def test_a_corrupt_database_is_refused(tmp_path):
    path = tmp_path / "btmsg.db"
    make_agor_db(path)
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # page 1 past the header: sqlite_master's b-tree
    path.write_bytes(bytes(data))
    unusable(path, EXIT_DATAERR, "corrupt")


def test_a_missing_database_is_not_created_except_by_register(tmp_path):
    path = tmp_path / "data" / "btmsg.db"
    with pytest.raises(DatabaseError) as caught:
        open_store(str(path))
    assert caught.value.exit_status == EXIT_NOINPUT and "btmsg register" in str(caught.value)
    assert not path.parent.exists()
    open_store(str(path), create=True).close()
    assert path.exists() and oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_two_processes_migrating_at_once_apply_each_step_once(tmp_path):
    path = tmp_path / "btmsg.db"
    make_agor_db(path)
    first = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    first.execute("PRAGMA journal_mode=WAL")
    first.execute("BEGIN IMMEDIATE")  # a migration in progress elsewhere
    done = []

    def release() -> None:
        time.sleep(0.3)
        first.execute("ROLLBACK")
        done.append(time.monotonic())

    import threading

    threading.Thread(target=release).start()
    with open_store(str(path)) as store:  # waits for the lock (busy timeout), then migrates
        assert done
        versions = [r[0] for r in store.conn.execute("SELECT version FROM agor_systemd_schema ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    with open_store(str(path)) as store:  # nothing to do the second time
        assert [r[0] for r in store.conn.execute("SELECT version FROM agor_systemd_schema")] == versions
    first.close()
