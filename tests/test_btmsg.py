"""btmsg's rules: liveness (pure), delivery and dead letters, redelivery, the sweep — on real files,
with the clock passed in (`now`), so thresholds of seconds need no sleeping."""

from __future__ import annotations

import sqlite3
import time

import pytest

from agor_systemd.btmsg import liveness, sweep
from agor_systemd.btmsg.liveness import HEALTHY, STALE, STALLED, Thresholds
from agor_systemd.btmsg.store import (
    EXIT_NOUSER,
    MessageError,
    NotAContact,
    Store,
    UnknownAgent,
    default_path,
    open_store,
    tier_of,
)

T0 = 1_800_000_000.0
FAST = Thresholds(stale_after_s=2, stall_after_s=5, max_deliver=3, max_message_bytes=1000)

# -- liveness, pure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "stale"),
    [(None, True), (0, False), (299, False), (300, False), (300.5, True), (3600, True)],
)
def test_stale_is_agors_rule(age, stale):
    """agor: COALESCE(timestamp, 0) < now - 300 — no heartbeat ever, or one older than 300 s."""
    heartbeat = None if age is None else T0 - age
    assert liveness.is_stale(T0, 1, heartbeat, Thresholds()) is stale


def test_the_operator_is_never_stale_nor_stalled():
    assert liveness.is_stale(T0, 0, None, Thresholds()) is False
    assert liveness.agent_state(T0, 0, None, T0 - 86400, Thresholds()) == HEALTHY


@pytest.mark.parametrize(
    ("heartbeat_age", "activity_age", "state"),
    [
        (1, 1, HEALTHY),
        (3, 1, STALE),  # a message sent a second ago, but no heartbeat for 3 s
        (3, 4.9, STALE),
        (6, 5, STALLED),  # no activity of any kind for the stall threshold
        (None, 5, STALLED),
    ],
)
def test_states(heartbeat_age, activity_age, state):
    heartbeat = None if heartbeat_age is None else T0 - heartbeat_age
    assert liveness.agent_state(T0, 2, heartbeat, T0 - activity_age, FAST) == state


def test_attention_is_agors_stalled_item():
    assert liveness.attention(STALLED, T0, T0 - 20 * 60 - 5) == (100, "Stalled — 20 min since last activity")
    assert liveness.attention(STALE, T0, T0 - 20 * 60) == (0, None)


@pytest.mark.parametrize(("role", "tier"), [("admin", 0), ("manager", 1), ("reviewer", 1), ("project", 2), ("x", 2)])
def test_tiers_come_from_the_role_as_in_agor(role, tier):
    assert tier_of(role) == tier


# -- the store -----------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
    """admin (operator), mgr (tier 1), dev (tier 2), contacts mgr <-> dev, mgr <-> admin; thresholds FAST."""
    store = open_store(str(tmp_path / "btmsg.db"), create=True)
    store.configure(FAST)
    store.register("admin", "Operator", "admin", "g")
    store.register("mgr", "Manager", "manager", "g")
    store.register("dev", "Developer", "project", "g")
    store.allow("mgr", "dev", both_ways=True)
    store.allow("mgr", "admin", both_ways=True)
    yield store
    store.close()


def messages_to(store: Store, agent: str) -> list[tuple]:
    return store.conn.execute(
        "SELECT id, content FROM messages WHERE to_agent = ? ORDER BY created_at, rowid", (agent,)
    ).fetchall()


def audit(store: Store, event: str) -> list[str]:
    return [r[0] for r in store.conn.execute("SELECT detail FROM audit_log WHERE event_type = ?", (event,))]


def test_a_message_to_a_live_agent_is_delivered(db):
    db.heartbeat("dev", now=T0)
    outcome = db.send("mgr", "dev", "hello", now=T0 + 1)
    assert (outcome.delivered, outcome.recipient, outcome.error) == (True, "dev", None)
    assert messages_to(db, "dev") == [(outcome.message_id, "hello")]
    assert db.dead_letters() == []


@pytest.mark.parametrize("sender", ["mgr", "admin"])  # agor checks only tier > 0 senders; every sender here
def test_a_message_to_a_stale_agent_becomes_a_dead_letter_with_agors_columns_and_ours(db, sender):
    db.heartbeat("dev", now=T0)
    outcome = db.send(sender, "dev", "are you there?", now=T0 + 2.5)
    assert not outcome.delivered
    assert outcome.error == "Recipient 'dev' is stale (no heartbeat in 2 seconds)"
    assert messages_to(db, "dev") == []
    [letter] = db.dead_letters()
    assert letter["message_id"] == outcome.message_id
    assert (letter["from_agent"], letter["to_agent"], letter["content"], letter["error"]) == (
        sender,
        "dev",
        "are you there?",
        outcome.error,
    )
    assert (letter["reason"], letter["state"], letter["attempts"]) == ("stale", "queued", 1)
    assert letter["first_failed_at"] == letter["last_failed_at"] == T0 + 2.5
    assert letter["created_at"] and letter["sent_at"]
    assert audit(db, "dead_letter") == [f"message {outcome.message_id} to dev: {outcome.error}"]


def test_an_agent_that_never_sent_a_heartbeat_is_stale(db):
    assert not db.send("mgr", "dev", "first", now=T0).delivered


def test_the_operator_always_receives(db):
    assert db.send("mgr", "admin", "report", now=T0).delivered is True


def test_refusals_store_nothing(db):
    before = db.conn.execute("SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM dead_letter_queue)")
    total = before.fetchone()
    with pytest.raises(UnknownAgent) as unknown:
        db.send("mgr", "nobody", "hi", now=T0)
    assert unknown.value.exit_status == EXIT_NOUSER and "nobody" in str(unknown.value)
    with pytest.raises(MessageError):
        db.send("mgr", "dev", "   \n", now=T0)
    with pytest.raises(MessageError, match="1001 bytes, more than the limit of 1000"):
        db.send("mgr", "dev", "x" * 1001, now=T0)
    with pytest.raises(NotAContact, match="btmsg allow dev admin"):
        db.send("dev", "admin", "hi", now=T0)
    with pytest.raises(UnknownAgent, match="not-registered"):
        db.send("not-registered", "dev", "hi", now=T0)
    assert (
        db.conn.execute("SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM dead_letter_queue)").fetchone()
        == total
    )
    assert audit(db, "dead_letter") == []


def test_recipients_by_unique_prefix_as_agor(db):
    db.heartbeat("dev", now=T0)
    assert db.send("mgr", "de", "hi", now=T0).recipient == "dev"
    db.register("dev2", "Second", "project", "g")
    with pytest.raises(UnknownAgent, match="several"):
        db.send("mgr", "de", "hi", now=T0)
    db.register("a_b", "Underscore", "project", "g")
    with pytest.raises(UnknownAgent):  # `_` is not a wildcard
        db.agent("aXb")


def test_heartbeat_redelivers_in_original_order_with_original_ids_exactly_once(db):
    ids = [db.send("mgr", "dev", f"letter {i}", now=T0 + i).message_id for i in range(5)]
    assert [d["message_id"] for d in db.dead_letters()] == ids
    assert db.heartbeat("dev", now=T0 + 10) == 5
    assert [m[0] for m in messages_to(db, "dev")] == ids
    assert [m[1] for m in messages_to(db, "dev")] == [f"letter {i}" for i in range(5)]
    assert db.dead_letters() == []
    assert db.heartbeat("dev", now=T0 + 11) == 0  # nothing twice
    assert db.redeliver("dev", now=T0 + 11) == {"dev": 0}
    assert len(messages_to(db, "dev")) == 5
    assert len(audit(db, "dead_letter_redelivered")) == 1


def test_redeliver_waits_for_a_live_agent(db):
    db.send("mgr", "dev", "queued", now=T0)
    assert db.redeliver("dev", now=T0 + 1) == {}  # still stale: stays queued
    assert len(db.dead_letters(state="queued")) == 1
    db.conn.execute("INSERT INTO heartbeats (agent_id, timestamp) VALUES ('dev', ?)", (int(T0 + 5),))  # agor's UI
    assert db.redeliver(None, now=T0 + 5.5) == {"dev": 1}


def test_agors_own_dead_letters_are_redelivered_with_a_new_id(db):
    db.conn.execute(
        "INSERT INTO dead_letter_queue (from_agent, to_agent, content, error) VALUES ('mgr', 'dev', 'agor''s', 'stale')"
    )
    assert db.heartbeat("dev", now=T0) == 1
    [(message_id, content)] = messages_to(db, "dev")
    assert content == "agor's" and len(message_id) == 36


def test_unread_messages_of_an_agent_that_went_stale_expire_then_park_after_max_deliver(db):
    db.heartbeat("dev", now=T0)
    message_id = db.send("mgr", "dev", "please read", now=T0).message_id
    now = T0
    for attempt in range(1, FAST.max_deliver + 1):
        now += 3  # dev goes stale without reading it
        result = sweep.sweep(db, now)
        [letter] = db.dead_letters()
        assert letter["message_id"] == message_id
        if attempt < FAST.max_deliver:
            assert result.expired == {"dev": 1}
            assert (letter["reason"], letter["state"], letter["attempts"]) == ("expired", "queued", attempt)
            assert "went stale" in letter["error"]
            now += 1
            assert db.heartbeat("dev", now=now) == 1  # back: redelivered, same id
            assert [m[0] for m in messages_to(db, "dev")] == [message_id]
        else:
            assert (letter["reason"], letter["state"], letter["attempts"]) == ("max_deliver", "parked", attempt)
            assert result.needs_attention
    assert letter["first_failed_at"] == T0 + 3
    assert len(audit(db, "dead_letter_parked")) == 1
    now += 1
    assert db.heartbeat("dev", now=now) == 0  # parked letters stay parked
    assert db.redeliver("dev", parked=True, now=now) == {"dev": 1}
    assert [m[0] for m in messages_to(db, "dev")] == [message_id]


def test_read_and_seen_messages_do_not_expire(db):
    db.heartbeat("dev", now=T0)
    read_id = db.send("mgr", "dev", "read it", now=T0).message_id
    seen_id = db.send("mgr", "dev", "agor injected it", now=T0).message_id
    db.read_message("dev", read_id[:8], now=T0 + 1)
    db.conn.execute("INSERT INTO seen_messages (session_id, message_id) VALUES ('session', ?)", (seen_id,))
    assert sweep.sweep(db, T0 + 10).expired == {}
    assert {m[0] for m in messages_to(db, "dev")} == {read_id, seen_id}


def test_messages_agors_cli_delivers_to_a_stale_agent_become_dead_letters_at_the_sweep(db):
    db.heartbeat("dev", now=T0)
    sweep.sweep(db, T0 + 3)  # dev is stale now
    db.conn.execute(
        "INSERT INTO messages (id, from_agent, to_agent, content, group_id) VALUES ('agor-1', 'mgr', 'dev', 'hi', 'g')"
    )
    result = sweep.sweep(db, T0 + 4)
    assert result.expired == {"dev": 1} and result.new_messages == 1
    assert [d["message_id"] for d in db.dead_letters()] == ["agor-1"]


def test_activity_keeps_an_agent_from_stalling_but_not_from_going_stale(db):
    db.heartbeat("dev", now=T0)
    db.conn.execute(  # a message dev sent with agor's own CLI counts too (the sweep reads new rows)
        "INSERT INTO messages (id, from_agent, to_agent, content, group_id, created_at) "
        "VALUES ('agor-2', 'dev', 'mgr', 'busy', 'g', datetime(?, 'unixepoch'))",
        (int(T0 + 4),),
    )
    states = {a.id: a.state for a in sweep.sweep(db, T0 + 8).agents}
    assert states["dev"] == STALE  # 8 s without a heartbeat, 4 s since it sent something
    states = {a.id: a.state for a in sweep.sweep(db, T0 + 9.5).agents}
    assert states["dev"] == STALLED


def test_the_sweep_records_each_change_once_and_reports_attention(db):
    db.heartbeat("dev", now=T0)
    db.heartbeat("mgr", now=T0)
    first = sweep.sweep(db, T0 + 1)
    assert {a.id: (a.previous_state, a.state) for a in first.agents if a.changed} == {
        "admin": (None, HEALTHY),
        "mgr": (None, HEALTHY),
        "dev": (None, HEALTHY),
    }
    assert not first.needs_attention
    assert [a.id for a in sweep.sweep(db, T0 + 1.5).agents if a.changed] == []
    db.heartbeat("mgr", now=T0 + 5)
    late = sweep.sweep(db, T0 + 6)
    assert {a.id: (a.previous_state, a.state) for a in late.agents if a.changed} == {"dev": (HEALTHY, STALLED)}
    assert late.attention() == [{"agent": "dev", "score": 100, "reason": "Stalled — 0 min since last activity"}]
    assert late.needs_attention and late.counts() == {HEALTHY: 2, STALE: 0, STALLED: 1}
    row = db.conn.execute(
        "SELECT state, state_since, attention_score FROM agor_systemd_agent_health WHERE agent_id = 'dev'"
    )
    assert row.fetchone() == (STALLED, T0 + 6, 100)


def test_thresholds_are_stored_for_every_sender(tmp_path):
    path = str(tmp_path / "btmsg.db")
    with open_store(path, create=True) as store:
        assert store.thresholds == Thresholds()
        store.configure(FAST)
    with open_store(path) as store:
        assert store.thresholds == FAST


def test_a_locked_database_is_one_line_and_nothing_written(db, monkeypatch):
    monkeypatch.setattr("agor_systemd.btmsg.schema.BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    db.conn.execute("PRAGMA busy_timeout = 200")
    other.execute("BEGIN IMMEDIATE")
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        db.send("mgr", "admin", "hi")
    assert time.monotonic() - start < 2
    assert getattr(caught.value, "exit_status", None) == 75 and "locked by another writer" in str(caught.value)
    other.execute("ROLLBACK")
    assert db.conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    other.close()


def test_the_default_database_follows_agor_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AGOR_DATA_DIR", str(tmp_path))
    assert default_path() == str(tmp_path / "btmsg.db")
    monkeypatch.delenv("AGOR_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_path() == str(tmp_path / ".local/share/agor/btmsg.db")
