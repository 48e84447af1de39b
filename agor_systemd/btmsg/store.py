"""The operations on btmsg.db that every path shares: the `btmsg` CLI, the library and the sweep.

Every write is one `BEGIN IMMEDIATE` transaction, so a process killed at any point leaves each
message either in `messages` or in `dead_letter_queue`, never in both and never in neither;
two processes doing the same thing (two sweeps, a sweep and a heartbeat) take turns.

Delivery, in agor's terms plus what agor lacks:

* `send` to a stale recipient (any sender tier; agor checks only tier > 0) stores the message as a
  dead letter (reason `stale`) with an audit row `dead_letter`, and says so; an unknown recipient
  is refused and nothing is stored.
* `redeliver` moves an agent's queued dead letters back into `messages`, in their original order
  and with their original ids (so a second run finds nothing to do); it runs when the agent
  heartbeats, from the sweep, and on request.
* `expire` returns the unread messages of an agent that went stale to the queue (reason
  `expired`); a message delivered `max_deliver` times and never read is parked for good (reason
  `max_deliver`, audit row `dead_letter_parked`) and only an explicit `redeliver --parked` moves it.

Import-light (no dataclasses, typing or json): `btmsg heartbeat` runs through here.
"""

from __future__ import annotations

import _sqlite3 as sqlite3  # import cost: ~3 ms less than `sqlite3` (agor_systemd/sqlite.py says why)
import os
import time

from agor_systemd import tracing
from agor_systemd.btmsg.liveness import OPERATOR_TIER, Thresholds, is_stale
from agor_systemd.btmsg.schema import connect, database_error
from agor_systemd.errors import AgorError, UsageError
from agor_systemd.sqlite import EXIT_NOPERM

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, a third of `btmsg heartbeat`'s budget
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")

EXIT_DEAD_LETTER = 3  # send: stored as a dead letter, not delivered (yet)
EXIT_NOUSER = 67  # no such agent (sysexits' EX_NOUSER)

# agor's tier by role (`btmsg register`): admin 0, the tier-1 roles 1, everything else a project agent
ROLE_TIERS = {"admin": 0, "manager": 1, "architect": 1, "tester": 1, "reviewer": 1}
PROJECT_TIER = 2

QUEUED, PARKED = "queued", "parked"
STALE_REASON, EXPIRED_REASON, MAX_DELIVER_REASON = "stale", "expired", "max_deliver"

_SETTING_TYPES = {"stale_after_s": float, "stall_after_s": float, "max_deliver": int, "max_message_bytes": int}


class UnknownAgent(AgorError, LookupError):
    exit_status = EXIT_NOUSER


class MessageError(UsageError, ValueError):
    """An empty or oversize message: refused before anything is stored."""


class NotAContact(AgorError, PermissionError):
    exit_status = EXIT_NOPERM


def default_path() -> str:
    """$AGOR_DATA_DIR/btmsg.db, else agor's ~/.local/share/agor/btmsg.db."""
    data = os.environ.get("AGOR_DATA_DIR")
    return os.path.join(data if data else os.path.expanduser("~/.local/share/agor"), "btmsg.db")


def tier_of(role: str) -> int:
    return ROLE_TIERS.get(role, PROJECT_TIER)


class SendOutcome:
    __slots__ = ("delivered", "error", "message_id", "recipient")

    def __init__(self, message_id: str, recipient: str, delivered: bool, error: str | None) -> None:
        self.message_id = message_id
        self.recipient = recipient
        self.delivered = delivered
        self.error = error  # why it became a dead letter

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def new_message_id() -> str:
    """A uuid4 string, as agor's ids, without importing `uuid` (~3 ms) on every send."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def stale_error(recipient: str, thresholds: Thresholds) -> str:
    # agor's own wording (Rust send_message), with this threshold
    return f"Recipient '{recipient}' is stale (no heartbeat in {thresholds.stale_after_s:g} seconds)"


class Store:
    """An open btmsg.db. Use as a context manager, or call close()."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self.conn = connect(path, create)
        self._thresholds: Thresholds | None = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # -- transactions ------------------------------------------------------------------------

    def guarded(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)`, an SQLite error turned into one line naming the database."""
        try:
            return function(*args)
        except sqlite3.Error as e:
            raise database_error(self.path, e) from None

    def write(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` in one BEGIN IMMEDIATE transaction, rolled back on any error."""
        self.guarded(self.conn.execute, "BEGIN IMMEDIATE")
        try:
            result = self.guarded(function, *args)
            self.guarded(self.conn.execute, "COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.rollback()
            raise
        return result

    def read(self, sql: str, params: tuple = ()) -> list:
        return self.guarded(lambda: self.conn.execute(sql, params).fetchall())

    # -- settings ----------------------------------------------------------------------------

    @property
    def thresholds(self) -> Thresholds:
        """What the sweep was last configured with (units.toml [btmsg]); agor's defaults before that."""
        if self._thresholds is None:
            stored = dict(self.read("SELECT key, value FROM agor_systemd_settings"))
            values = {key: kind(stored[key]) for key, kind in _SETTING_TYPES.items() if key in stored}
            self._thresholds = Thresholds(**values)
        return self._thresholds

    def configure(self, thresholds: Thresholds) -> None:
        def store() -> None:
            self.conn.executemany(
                "INSERT INTO agor_systemd_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(thresholds.as_dict().items()),
            )

        self.write(store)
        self._thresholds = thresholds

    # -- agents ------------------------------------------------------------------------------

    def register(
        self,
        agent_id: str,
        name: str,
        role: str,
        group_id: str,
        tier: int | None = None,
        model: str | None = None,
        cwd: str | None = None,
    ) -> None:
        """agor's `btmsg register`: insert or update the agent (tier from the role unless given)."""
        for what, value in (("agent id", agent_id), ("name", name), ("role", role), ("group", group_id)):
            if not value.strip():
                raise MessageError(f"an empty {what}")
        tier = tier_of(role) if tier is None else tier
        self.write(
            self.conn.execute,
            "INSERT INTO agents (id, name, role, group_id, tier, model, cwd) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET name = excluded.name, role = excluded.role, group_id = excluded.group_id, "
            "tier = excluded.tier, model = coalesce(excluded.model, model), cwd = coalesce(excluded.cwd, cwd)",
            (agent_id, name, role, group_id, tier, model, cwd),
        )

    def allow(self, agent_id: str, contact_id: str, both_ways: bool = False) -> None:
        """agor's `btmsg allow`: `agent_id` may message `contact_id` (and back with both_ways)."""

        def add() -> None:
            first, second = self.agent(agent_id)[0], self.agent(contact_id)[0]
            pairs = [(first, second), (second, first)] if both_ways else [(first, second)]
            self.conn.executemany("INSERT OR IGNORE INTO contacts (agent_id, contact_id) VALUES (?, ?)", pairs)

        self.write(add)

    def agent(self, reference: str, exact: bool = False) -> tuple:
        """(id, tier, group_id, last heartbeat) of the agent with this id or (unless `exact`) unique id prefix."""
        query = (
            "SELECT a.id, a.tier, a.group_id, max(coalesce(h.timestamp, 0), coalesce(ah.last_heartbeat_at, 0)) "
            "FROM agents a LEFT JOIN heartbeats h ON h.agent_id = a.id "
            "LEFT JOIN agor_systemd_agent_health ah ON ah.agent_id = a.id "
        )
        rows = self.conn.execute(query + "WHERE a.id = ?", (reference,)).fetchall()
        if not rows and reference and not exact:
            # agor's CLI accepts an id prefix; LIKE would treat _ and % as wildcards
            rows = self.conn.execute(
                query + "WHERE a.id >= ? AND a.id < ? LIMIT 3", (reference, reference + "\U0010ffff")
            ).fetchall()
        if len(rows) != 1:
            if not rows:
                raise UnknownAgent(f"no agent {reference!r} is registered (btmsg agents lists them)")
            raise UnknownAgent(f"{reference!r} matches several agents ({', '.join(r[0] for r in rows)}, ...)")
        agent_id, tier, group_id, heartbeat = rows[0]
        return agent_id, tier, group_id, heartbeat or None

    def _touch(self, agent_id: str, column: str, when: float) -> None:
        self.conn.execute(
            f"INSERT INTO agor_systemd_agent_health (agent_id, {column}) VALUES (?, ?) "
            f"ON CONFLICT(agent_id) DO UPDATE SET {column} = max(coalesce({column}, 0), excluded.{column})",
            (agent_id, when),
        )

    # -- messages ----------------------------------------------------------------------------

    def check_content(self, content: str) -> None:
        if not content.strip():
            raise MessageError("an empty message; nothing was sent")
        size = len(content.encode("utf-8", "surrogatepass"))
        limit = self.thresholds.max_message_bytes
        if size > limit:
            raise MessageError(f"the message is {size} bytes, more than the limit of {limit}; nothing was sent")

    def send(
        self, sender: str, recipient: str, content: str, reply_to: str | None = None, now: float | None = None
    ) -> SendOutcome:
        """Deliver, or store as a dead letter when the recipient is stale (the outcome says which)."""
        with tracing.span("btmsg.send", sender=sender, recipient=recipient, bytes=len(content)) as span:
            self.check_content(content)
            outcome = self.write(self._send, sender, recipient, content, reply_to, time.time() if now is None else now)
            span.set(message_id=outcome.message_id, delivered=outcome.delivered)
            return outcome

    def _send(self, sender: str, recipient: str, content: str, reply_to: str | None, now: float) -> SendOutcome:
        from_id, from_tier, from_group, _ = self.agent(sender, exact=True)
        to_id, to_tier, to_group, heartbeat = self.agent(recipient)
        if from_tier != OPERATOR_TIER and from_id != to_id:
            allowed = self.conn.execute(
                "SELECT 1 FROM contacts WHERE agent_id = ? AND contact_id = ?", (from_id, to_id)
            ).fetchone()
            if allowed is None:
                raise NotAContact(
                    f"{from_id} may not message {to_id}: not in its contacts (as in agor; `btmsg allow {from_id} "
                    f"{to_id}` adds it); nothing was sent"
                )
        message_id = new_message_id()
        self._touch(from_id, "last_sent_at", now)
        thresholds = self.thresholds
        if is_stale(now, to_tier, heartbeat, thresholds):
            error = stale_error(to_id, thresholds)
            sent_at = self.conn.execute("SELECT datetime('now')").fetchone()[0]
            message = (message_id, from_id, to_id, content, reply_to, to_group, from_group, sent_at)
            self._dead_letter(message, STALE_REASON, error, 1, now, now)
            return SendOutcome(message_id, to_id, False, error)
        self.conn.execute(
            "INSERT INTO messages (id, from_agent, to_agent, content, read, reply_to, group_id, sender_group_id) "
            "VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
            (message_id, from_id, to_id, content, reply_to, to_group, from_group),
        )
        return SendOutcome(message_id, to_id, True, None)

    def _dead_letter(
        self, message: tuple, reason: str, error: str, attempts: int, first_failed_at: float, now: float
    ) -> None:
        """`message`: (id, from, to, content, reply_to, group_id, sender_group_id, sent_at)."""
        message_id, from_id, to_id = message[:3]
        state = QUEUED
        if reason != STALE_REASON and attempts >= self.thresholds.max_deliver:
            state, reason = PARKED, MAX_DELIVER_REASON
            error = (
                f"delivered to '{to_id}' {attempts} times and never read (max_deliver {self.thresholds.max_deliver}); "
                "parked: `btmsg redeliver --parked` sends it again"
            )
        self.conn.execute(
            "INSERT INTO dead_letter_queue (message_id, from_agent, to_agent, content, reply_to, group_id, "
            "sender_group_id, sent_at, error, reason, attempts, first_failed_at, last_failed_at, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*message, error, reason, attempts, first_failed_at, now, state),
        )
        event = "dead_letter_parked" if state == PARKED else "dead_letter"
        self._audit(from_id, event, f"message {message_id} to {to_id}: {error}")
        tracing.event(event, message_id=message_id, recipient=to_id, reason=reason, attempts=attempts)

    def _audit(self, agent_id: str, event: str, detail: str) -> None:
        self.conn.execute(
            "INSERT INTO audit_log (agent_id, event_type, detail) VALUES (?, ?, ?)", (agent_id, event, detail)
        )

    def inbox(self, agent: str, everything: bool = False) -> list[tuple]:
        """agor's inbox: unread oldest first; `everything`: the newest 50, read or not.
        Rows: (id, from_agent, content, created_at, read)."""
        agent_id = self.guarded(self.agent, agent, True)[0]
        if everything:
            sql = "WHERE to_agent = ? ORDER BY created_at DESC, rowid DESC LIMIT 50"
        else:
            sql = "WHERE to_agent = ? AND read = 0 ORDER BY created_at, rowid"
        return self.read("SELECT id, from_agent, content, created_at, read FROM messages " + sql, (agent_id,))

    def read_message(self, agent: str, reference: str, now: float | None = None) -> tuple:
        """Mark a message to `agent` read (id or unique prefix); (id, from_agent, content, created_at)."""
        return self.write(self._read_message, agent, reference, time.time() if now is None else now)

    def _read_message(self, agent: str, reference: str, now: float) -> tuple:
        agent_id = self.agent(agent, exact=True)[0]
        rows = self.conn.execute(
            "SELECT id, from_agent, content, created_at FROM messages "
            "WHERE to_agent = ? AND id >= ? AND id < ? LIMIT 2",
            (agent_id, reference, reference + "\U0010ffff"),
        ).fetchall()
        if len(rows) != 1 or not reference:
            what = "no message" if not rows else "several messages"
            raise UnknownAgent(f"{what} to {agent_id} with id {reference!r} (btmsg inbox --all lists them)")
        message_id = rows[0][0]
        self.conn.execute("UPDATE messages SET read = 1 WHERE id = ?", (message_id,))
        self.conn.execute("DELETE FROM agor_systemd_deliveries WHERE message_id = ?", (message_id,))
        self._touch(agent_id, "last_read_at", now)
        return rows[0]

    # -- heartbeats and redelivery -----------------------------------------------------------

    def heartbeat(self, agent: str, now: float | None = None) -> int:
        """Record a heartbeat (agor's table and a sub-second copy); a returning agent gets its queued
        dead letters at once. Returns how many were redelivered."""
        with tracing.span("btmsg.heartbeat", agent=agent) as span:
            redelivered = self.write(self._heartbeat, agent, time.time() if now is None else now)
            span.set(redelivered=redelivered)
            return redelivered

    def _heartbeat(self, agent_id: str, now: float) -> int:
        try:
            self.conn.execute(
                "INSERT INTO heartbeats (agent_id, timestamp) VALUES (?, ?) "
                "ON CONFLICT(agent_id) DO UPDATE SET timestamp = excluded.timestamp",
                (agent_id, int(now)),
            )
        except sqlite3.IntegrityError:  # the foreign key to agents
            raise UnknownAgent(f"no agent {agent_id!r} is registered; `btmsg register` first") from None
        self._touch(agent_id, "last_heartbeat_at", now)
        pending = self.conn.execute(
            "SELECT 1 FROM dead_letter_queue WHERE to_agent = ? AND state = ? LIMIT 1", (agent_id, QUEUED)
        ).fetchone()
        return self.deliver_dead_letters(agent_id, now) if pending else 0

    def redeliver(self, agent: str | None = None, parked: bool = False, now: float | None = None) -> dict[str, int]:
        """Redeliver the queued dead letters of `agent` (None: every agent) that is live; `parked`: first
        return parked letters to the queue with their attempts reset. {agent: letters redelivered}."""
        return self.write(self._redeliver_live, agent, parked, time.time() if now is None else now)

    def _redeliver_live(self, agent: str | None, parked: bool, now: float) -> dict[str, int]:
        agent_ids = [self.agent(agent)[0]] if agent is not None else None
        if parked:
            where, params = ("AND to_agent = ?", tuple(agent_ids)) if agent_ids else ("", ())
            self.conn.execute(
                f"UPDATE dead_letter_queue SET state = ?, attempts = 0 WHERE state = ? {where}",
                (QUEUED, PARKED, *params),
            )
        if agent_ids is None:
            agent_ids = [
                r[0]
                for r in self.conn.execute("SELECT DISTINCT to_agent FROM dead_letter_queue WHERE state = ?", (QUEUED,))
            ]
        done = {}
        thresholds = self.thresholds
        for agent_id in agent_ids:
            _, tier, _, heartbeat = self.agent(agent_id)
            if not is_stale(now, tier, heartbeat, thresholds):
                done[agent_id] = self.deliver_dead_letters(agent_id, now)
        return done

    def deliver_dead_letters(self, agent_id: str, now: float) -> int:
        """Inside a transaction: move the agent's queued dead letters into `messages`, oldest first."""
        letters = self.conn.execute(
            "SELECT d.id, d.message_id, d.from_agent, d.content, d.reply_to, coalesce(d.group_id, a.group_id), "
            "d.sender_group_id, coalesce(d.sent_at, d.created_at), d.attempts, coalesce(d.first_failed_at, "
            "unixepoch(d.created_at)) FROM dead_letter_queue d JOIN agents a ON a.id = d.to_agent "
            "WHERE d.to_agent = ? AND d.state = ? ORDER BY d.id",
            (agent_id, QUEUED),
        ).fetchall()
        if not letters:
            return 0
        # rows agor queued have no message id: they get one now, in this same transaction
        ids = [letter[1] or new_message_id() for letter in letters]
        self.conn.executemany(
            "INSERT OR IGNORE INTO messages (id, from_agent, to_agent, content, read, reply_to, group_id, "
            "sender_group_id, created_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
            [(mid, letter[2], agent_id, *letter[3:8]) for mid, letter in zip(ids, letters)],
        )
        self.conn.executemany(
            "INSERT OR REPLACE INTO agor_systemd_deliveries (message_id, attempts, first_failed_at) VALUES (?, ?, ?)",
            [(mid, letter[8] + 1, letter[9]) for mid, letter in zip(ids, letters)],
        )
        self.conn.executemany("DELETE FROM dead_letter_queue WHERE id = ?", [(letter[0],) for letter in letters])
        self._audit(
            agent_id,
            "dead_letter_redelivered",
            f"{len(letters)} dead letter(s) redelivered in their original order: {ids[0]} … {ids[-1]}",
        )
        tracing.event("dead_letter_redelivered", agent=agent_id, letters=len(letters), first=ids[0], last=ids[-1])
        return len(letters)

    def expire(self, agent_id: str, now: float) -> int:
        """Inside a transaction: return the unread, unseen messages of a stale agent to the queue."""
        rows = self.conn.execute(
            "SELECT m.id, m.from_agent, m.to_agent, m.content, m.reply_to, m.group_id, m.sender_group_id, "
            "m.created_at, coalesce(d.attempts, 1), coalesce(d.first_failed_at, ?) FROM messages m "
            "LEFT JOIN agor_systemd_deliveries d ON d.message_id = m.id "
            "WHERE m.to_agent = ? AND m.read = 0 "
            "AND NOT EXISTS (SELECT 1 FROM seen_messages s WHERE s.message_id = m.id) ORDER BY m.created_at, m.rowid",
            (now, agent_id),
        ).fetchall()
        error = (
            f"Recipient '{agent_id}' went stale (no heartbeat in {self.thresholds.stale_after_s:g} seconds) "
            "before reading it"
        )
        for row in rows:
            self.conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
            self._dead_letter(row[:8], EXPIRED_REASON, error, row[8], row[9], now)
        return len(rows)

    def dead_letters(self, agent: str | None = None, state: str | None = None) -> list[dict[str, object]]:
        """Dead letters oldest first, with agor's columns and the additions, as dicts."""
        where, params = [], []
        if agent is not None:
            where.append("to_agent = ?")
            params.append(self.guarded(self.agent, agent)[0])
        if state is not None:
            where.append("state = ?")
            params.append(state)
        columns = (
            "id, message_id, from_agent, to_agent, content, error, reason, state, attempts, "
            "first_failed_at, last_failed_at, sent_at, created_at"
        )
        sql = f"SELECT {columns} FROM dead_letter_queue"
        if where:
            sql += " WHERE " + " AND ".join(where)
        names = [c.strip() for c in columns.split(",")]
        return [dict(zip(names, row)) for row in self.read(sql + " ORDER BY id", tuple(params))]


def open_store(path: str | None = None, create: bool = False) -> Store:
    """btmsg.db at `path` (default: default_path()); `create`: make it if missing (as `register`)."""
    return Store(os.path.expanduser(path) if path else default_path(), create)
