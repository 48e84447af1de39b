"""btmsg.db: agor's tables as agor creates them, this toolkit's additions, and how a file is opened.

agor's Rust app creates the full schema (`open_db_or_create`); its Python CLI only a subset. This
module creates agor's tables exactly as the Rust app does when they are missing (so a database
made here is agor's), then adds what agent health needs — only new tables, indexes and columns with
defaults, recorded in `agor_systemd_schema` so that each step runs once. agor's own queries name
their columns, so they keep working on a database with the additions (tests/test_btmsg_schema.py
runs agor's statements against both).

A file is refused — with one line, and left as it is — when it is not an SQLite database, is
empty, is corrupt where SQLite reads it, holds other tables than agor's btmsg.db, or was upgraded
by a newer agor-systemd than this one.
"""

from __future__ import annotations

import _sqlite3 as sqlite3  # import cost: ~3 ms less than `sqlite3` (agor_systemd/sqlite.py says why)
import os

from agor_systemd.errors import AgorError
from agor_systemd.sqlite import EXIT_DATAERR, OUTCOME_EXIT, classify, sqlite_uri

# exit statuses of a database that cannot be used: the SQLite outcomes' (agor_systemd.sqlite; 65 also
# for a file that is not agor's btmsg.db or has a newer schema), and no database yet
EXIT_NOINPUT = 66

BUSY_TIMEOUT_S = 5.0  # agor's, on every connection

_OUTCOME_TEXT = {
    "busy": f"locked by another writer for more than {BUSY_TIMEOUT_S:g} s; try again",
    "not-a-database": "not an SQLite database; left untouched",
    "corrupt": "the database is corrupt; left untouched (agor-walcheck and `sqlite3 FILE .recover` can help)",
    "disk-full": "the disk is full; nothing was written",
    "io-error": "an I/O error; nothing was written",
    "permission-denied": "cannot be written by this user (read-only file or directory)",
}


class DatabaseError(AgorError):
    """btmsg.db cannot be used; one line naming the file and what to do, and a distinct exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def database_error(path: str, error: sqlite3.Error) -> DatabaseError:
    outcome, reason = classify(error)
    return DatabaseError(f"{path}: {_OUTCOME_TEXT.get(outcome, reason)}", OUTCOME_EXIT[outcome])


# agor's Rust `open_db_or_create` (agor-facts §3.4), statement for statement; "IF NOT EXISTS" so that
# the Python CLI's subset is completed the way the Rust app completes it
AGOR_TABLES = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    group_id TEXT NOT NULL,
    tier INTEGER NOT NULL DEFAULT 2,
    model TEXT,
    cwd TEXT,
    system_prompt TEXT,
    status TEXT DEFAULT 'stopped',
    last_active_at TEXT,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS contacts (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    contact_id TEXT NOT NULL REFERENCES agents(id),
    PRIMARY KEY (agent_id, contact_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    from_agent TEXT NOT NULL REFERENCES agents(id),
    to_agent TEXT NOT NULL REFERENCES agents(id),
    content TEXT NOT NULL,
    read INTEGER DEFAULT 0,
    reply_to TEXT,
    group_id TEXT NOT NULL,
    sender_group_id TEXT,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_messages_to ON messages(to_agent, read);
CREATE INDEX IF NOT EXISTS idx_messages_from ON messages(from_agent);
CREATE INDEX IF NOT EXISTS idx_messages_group ON messages(group_id);
CREATE INDEX IF NOT EXISTS idx_messages_reply ON messages(reply_to);
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    group_id TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS channel_members (
    channel_id TEXT NOT NULL REFERENCES channels(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    joined_at TEXT DEFAULT (datetime('now')),
    PRIMARY KEY (channel_id, agent_id)
);
CREATE TABLE IF NOT EXISTS channel_messages (
    id TEXT PRIMARY KEY,
    channel_id TEXT NOT NULL REFERENCES channels(id),
    from_agent TEXT NOT NULL REFERENCES agents(id),
    content TEXT NOT NULL,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_channel_messages ON channel_messages(channel_id, created_at);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT DEFAULT '',
    status TEXT DEFAULT 'todo',
    priority TEXT DEFAULT 'medium',
    assigned_to TEXT REFERENCES agents(id),
    created_by TEXT NOT NULL REFERENCES agents(id),
    group_id TEXT NOT NULL,
    parent_task_id TEXT,
    sort_order INTEGER DEFAULT 0,
    created_at TEXT DEFAULT (datetime('now')),
    updated_at TEXT DEFAULT (datetime('now')),
    version INTEGER DEFAULT 1
);
CREATE INDEX IF NOT EXISTS idx_tasks_group ON tasks(group_id);
CREATE INDEX IF NOT EXISTS idx_tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS idx_tasks_assigned ON tasks(assigned_to);
CREATE TABLE IF NOT EXISTS task_comments (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    agent_id TEXT NOT NULL REFERENCES agents(id),
    content TEXT NOT NULL,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_task_comments_task ON task_comments(task_id);
CREATE TABLE IF NOT EXISTS heartbeats (
    agent_id TEXT PRIMARY KEY REFERENCES agents(id),
    timestamp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    from_agent TEXT NOT NULL REFERENCES agents(id),
    to_agent TEXT NOT NULL REFERENCES agents(id),
    content TEXT NOT NULL,
    error TEXT NOT NULL,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_dead_letter_from ON dead_letter_queue(from_agent);
CREATE INDEX IF NOT EXISTS idx_dead_letter_to ON dead_letter_queue(to_agent);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    event_type TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at TEXT DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_audit_log_agent ON audit_log(agent_id);
CREATE INDEX IF NOT EXISTS idx_audit_log_type ON audit_log(event_type);
CREATE TABLE IF NOT EXISTS seen_messages (
    session_id TEXT NOT NULL,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seen_at INTEGER NOT NULL DEFAULT (unixepoch()),
    PRIMARY KEY (session_id, message_id)
);
CREATE INDEX IF NOT EXISTS idx_seen_messages_session ON seen_messages(session_id);
"""

# Step 1, this toolkit's additions (docs/btmsg.md lists them beside agor's columns):
# * dead_letter_queue: what a debugger needs and agor's rows lack — the original message (id, reply,
#   groups, send time), a reason code, attempts, first/last failure; `state` queued or parked
# * agor_systemd_agent_health: each agent's activity times (sub-second, unlike heartbeats.timestamp)
#   and the state the sweep last saw, so a change is logged once
# * agor_systemd_deliveries: attempts of a redelivered message, kept until it is read or returns
# * agor_systemd_settings: the thresholds the sweep was configured with, so every send path uses them
# * indexes that keep the sweep and redelivery to index lookups (docs/btmsg.md shows the plans)
ADDITIONS = """
ALTER TABLE dead_letter_queue ADD COLUMN message_id TEXT;
ALTER TABLE dead_letter_queue ADD COLUMN reason TEXT NOT NULL DEFAULT 'stale';
ALTER TABLE dead_letter_queue ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE dead_letter_queue ADD COLUMN first_failed_at REAL;
ALTER TABLE dead_letter_queue ADD COLUMN last_failed_at REAL;
ALTER TABLE dead_letter_queue ADD COLUMN state TEXT NOT NULL DEFAULT 'queued';
ALTER TABLE dead_letter_queue ADD COLUMN reply_to TEXT;
ALTER TABLE dead_letter_queue ADD COLUMN group_id TEXT;
ALTER TABLE dead_letter_queue ADD COLUMN sender_group_id TEXT;
ALTER TABLE dead_letter_queue ADD COLUMN sent_at TEXT;
CREATE UNIQUE INDEX idx_dead_letter_message ON dead_letter_queue(message_id) WHERE message_id IS NOT NULL;
CREATE INDEX idx_dead_letter_pending ON dead_letter_queue(to_agent, state, id);
CREATE INDEX idx_dead_letter_state ON dead_letter_queue(state, to_agent);
CREATE INDEX idx_seen_messages_message ON seen_messages(message_id);
CREATE TABLE agor_systemd_agent_health (
    agent_id TEXT PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    last_heartbeat_at REAL,
    last_sent_at REAL,
    last_read_at REAL,
    state TEXT NOT NULL DEFAULT 'new',
    state_since REAL,
    attention_score INTEGER NOT NULL DEFAULT 0,
    attention_reason TEXT
);
CREATE TABLE agor_systemd_deliveries (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    attempts INTEGER NOT NULL,
    first_failed_at REAL
);
CREATE TABLE agor_systemd_settings (
    key TEXT PRIMARY KEY,
    value NOT NULL
);
"""

SCHEMA_TABLE = "agor_systemd_schema"
MIGRATIONS = (AGOR_TABLES, ADDITIONS)  # step N+1 is MIGRATIONS[N]; append, never edit
SCHEMA_VERSION = len(MIGRATIONS)


def configure(conn: sqlite3.Connection) -> None:
    """agor's per-connection pragmas, and `synchronous=NORMAL`: in WAL mode a commit survives any
    crash of a process (it is not fsync'd until the checkpoint, so a power cut can lose the last ones).
    Only for a database check_version() accepted: switching to WAL writes the file's header."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The applied steps; None for a database without agor's `agents` table and no steps (not btmsg.db)."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if SCHEMA_TABLE in names:
        return int(conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}").fetchone()[0])
    if not names:
        return 0  # a new, empty database
    if "agents" in names and "messages" in names:
        return 0  # agor's, not yet migrated
    return None


def check_version(version: int | None, path: str) -> int:
    """The applied steps of a database this code may use; refuse any other, before it is touched."""
    if version is None:
        raise DatabaseError(
            f"{path}: an SQLite database, but not agor's btmsg.db (no agents and messages tables); left untouched",
            EXIT_DATAERR,
        )
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"{path}: its schema (step {version}) is newer than this agor-systemd knows (step "
            f"{SCHEMA_VERSION}); upgrade agor-systemd. Left untouched",
            EXIT_DATAERR,
        )
    return version


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction, or refuse a file this code must not touch."""
    conn.execute("BEGIN IMMEDIATE")  # a second process migrating at the same time waits, then sees it done
    try:
        version = check_version(schema_version(conn), path)
        if version < SCHEMA_VERSION:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER PRIMARY KEY, applied_at TEXT)")
            for step in range(version, SCHEMA_VERSION):
                if step == 0:
                    _complete_agor_tables(conn)
                else:
                    for statement in MIGRATIONS[step].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (?, datetime('now'))", (step + 1,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _complete_agor_tables(conn: sqlite3.Connection) -> None:
    for statement in AGOR_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    # agor's `open_db` adds this column to the Python CLI's messages table on every open
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "sender_group_id" not in columns:
        conn.execute("ALTER TABLE messages ADD COLUMN sender_group_id TEXT")


def connect(path: str, create: bool = False) -> sqlite3.Connection:
    """An open, migrated btmsg.db in autocommit mode (transactions are explicit).

    `create`: make the file (and its directory) when missing, as agor's `open_db_or_create`;
    otherwise a missing file is an error naming the command that creates it."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        if not create:
            raise DatabaseError(
                f"{path}: no such database; `btmsg register` creates it (agor does on its first start)",
                EXIT_NOINPUT,
            ) from None
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        size = None
    if size == 0:  # SQLite would take it for a new database and write one into it
        raise DatabaseError(f"{path}: an empty file, not an SQLite database; left untouched", EXIT_DATAERR)
    try:
        return _open(path, "rwc" if size is None else "rw")
    except sqlite3.Error as e:
        raise database_error(path, e) from None


def _open(path: str, mode: str) -> sqlite3.Connection:
    conn = sqlite3.connect(sqlite_uri(path, f"mode={mode}"), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        version = check_version(schema_version(conn), path)  # reads page 1: not SQLite, corrupt
        configure(conn)
        if version != SCHEMA_VERSION:
            migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn
