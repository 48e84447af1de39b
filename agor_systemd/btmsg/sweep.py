"""The sweep (agor-btmsg-sweep.timer) and the agents report (`btmsg agents`, `agor-units health`).

One sweep, in one transaction:

1. takes in the messages written since the last sweep — also by agor's own CLI and app — as
   their senders' activity (a watermark on `messages.rowid`, so only new rows are read);
2. assesses every agent (liveness.py) and records each state change once;
3. returns the unread messages of stale agents to the dead-letter queue (`expired`), and
   redelivers the queued dead letters of agents that are live again.

The journal gets one line per state change (stalled: warning), and the result says whether
anything needs attention: a stalled agent or a parked letter.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from agor_systemd import tracing
from agor_systemd.btmsg import liveness
from agor_systemd.btmsg.store import PARKED, QUEUED, Store, open_store
from agor_systemd.errors import AgorError

WATERMARK = "sweep_watermark"
NEW = "new"  # agor_systemd_agent_health.state before the first sweep

# (id, name, group, tier, last heartbeat or 0, last activity, recorded state); the last activity
# (liveness.py: the newest heartbeat, message sent or read, else the registration) is computed by
# SQLite, which parses agor's text timestamp only for agents that never did anything
_AGENTS = (
    "SELECT id, name, group_id, tier, heartbeat, "
    "CASE WHEN active > 0 THEN active ELSE unixepoch(created_at) END, state FROM ("
    "SELECT a.id, a.name, a.group_id, a.tier, a.created_at, ah.state, "
    "max(coalesce(h.timestamp, 0), coalesce(ah.last_heartbeat_at, 0)) AS heartbeat, "
    "max(coalesce(h.timestamp, 0), coalesce(ah.last_heartbeat_at, 0), coalesce(ah.last_sent_at, 0), "
    "coalesce(ah.last_read_at, 0)) AS active "
    "FROM agents a LEFT JOIN heartbeats h ON h.agent_id = a.id "
    "LEFT JOIN agor_systemd_agent_health ah ON ah.agent_id = a.id ORDER BY a.id)"
)


@dataclass
class AgentReport:
    id: str
    name: str
    group: str
    tier: int
    state: str
    last_heartbeat: float | None
    last_activity: float | None
    attention_score: int
    attention_reason: str | None
    dead_letters: int = 0  # queued
    parked: int = 0
    previous_state: str | None = None  # what the last sweep recorded

    @property
    def changed(self) -> bool:
        return self.state != self.previous_state


@dataclass
class Report:
    """Every agent's state at `now`, and (after a sweep) what the sweep did."""

    now: float
    thresholds: dict[str, float]
    agents: list[AgentReport]
    redelivered: dict[str, int] = field(default_factory=dict)
    expired: dict[str, int] = field(default_factory=dict)
    new_messages: int = 0

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(liveness.STATES, 0)
        for agent in self.agents:
            counts[agent.state] += 1
        return counts

    def attention(self) -> list[dict[str, object]]:
        """agor's attention queue: the top five items with a score, highest first (longest idle first)."""
        scored = [a for a in self.agents if a.attention_score > 0]
        scored.sort(key=lambda a: (-a.attention_score, a.last_activity or 0.0))
        return [
            {"agent": a.id, "score": a.attention_score, "reason": a.attention_reason}
            for a in scored[: liveness.ATTENTION_ITEMS]
        ]

    def dead_letter_counts(self) -> dict[str, int]:
        return {
            QUEUED: sum(a.dead_letters for a in self.agents),
            PARKED: sum(a.parked for a in self.agents),
        }

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention()) or self.dead_letter_counts()[PARKED] > 0

    def summary(self) -> dict[str, object]:
        """What `agor-units health --json` shows under "agents"."""
        return {
            "counts": self.counts(),
            "dead_letters": self.dead_letter_counts(),
            "attention": self.attention(),
        }

    def as_dict(self) -> dict[str, object]:
        return {
            **self.summary(),
            "thresholds": self.thresholds,
            "redelivered": self.redelivered,
            "expired": self.expired,
            "new_messages": self.new_messages,
            "agents": [asdict(a) for a in self.agents],
        }


def letter_counts(store: Store) -> dict[tuple[str, str], int]:
    """(agent, queued|parked) → dead letters."""
    rows = store.conn.execute("SELECT to_agent, state, count(*) FROM dead_letter_queue GROUP BY state, to_agent")
    return {(agent_id, state): count for agent_id, state, count in rows}


def assess(store: Store, now: float) -> Report:
    """Every agent's state, read only (inside the sweep's transaction or on its own)."""
    thresholds = store.thresholds
    letters = letter_counts(store)
    agents = []
    for agent_id, name, group, tier, heartbeat, active, recorded in store.conn.execute(_AGENTS):
        heartbeat = heartbeat or None
        state = liveness.agent_state(now, tier, heartbeat, active, thresholds)
        score, reason = liveness.attention(state, now, active)
        agents.append(
            AgentReport(
                agent_id,
                name,
                group,
                tier,
                state,
                heartbeat,
                active,
                score,
                reason,
                letters.get((agent_id, QUEUED), 0),
                letters.get((agent_id, PARKED), 0),
                None if recorded == NEW else recorded,
            )
        )
    return Report(now, thresholds.as_dict(), agents)


def report(store: Store, now: float | None = None) -> Report:
    return store.guarded(assess, store, time.time() if now is None else now)


def sweep(store: Store, now: float | None = None) -> Report:
    """One sweep (see the module's docstring), in one transaction."""
    with tracing.span("btmsg.sweep", database=store.path) as span:
        result = store.write(_sweep, store, time.time() if now is None else now)
        span.set(
            agents=len(result.agents),
            changes=sum(1 for a in result.agents if a.changed),
            redelivered=sum(result.redelivered.values()),
            expired=sum(result.expired.values()),
            new_messages=result.new_messages,
            needs_attention=result.needs_attention,
            **{f"agents.{state}": n for state, n in result.counts().items()},
            **{f"dead_letters.{state}": n for state, n in result.dead_letter_counts().items()},
        )
        return result


def _sweep(store: Store, now: float) -> Report:
    conn = store.conn
    watermark = conn.execute("SELECT value FROM agor_systemd_settings WHERE key = ?", (WATERMARK,)).fetchone()
    newest = conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]
    since = watermark[0] if watermark and watermark[0] <= newest else 0  # a VACUUM may renumber rows
    senders = conn.execute(
        # NOT INDEXED: a rowid range over the new rows, not a walk of idx_messages_from over all of them
        "SELECT from_agent, max(unixepoch(created_at)), count(*) FROM messages NOT INDEXED WHERE rowid > ? "
        "GROUP BY from_agent",
        (since,),
    ).fetchall()
    conn.executemany(
        "INSERT INTO agor_systemd_agent_health (agent_id, last_sent_at) VALUES (?, ?) ON CONFLICT(agent_id) "
        "DO UPDATE SET last_sent_at = max(coalesce(last_sent_at, 0), excluded.last_sent_at)",
        [(sender, sent_at) for sender, sent_at, _ in senders],
    )
    recipients = {
        row[0] for row in conn.execute("SELECT DISTINCT to_agent FROM messages NOT INDEXED WHERE rowid > ?", (since,))
    }

    result = assess(store, now)
    result.new_messages = sum(count for _, _, count in senders)
    thresholds = store.thresholds
    changed = [a for a in result.agents if a.changed]
    conn.executemany(
        "INSERT INTO agor_systemd_agent_health (agent_id, state, state_since, attention_score, attention_reason) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET state = excluded.state, "
        "state_since = excluded.state_since, attention_score = excluded.attention_score, "
        "attention_reason = excluded.attention_reason",
        [(a.id, a.state, now, a.attention_score, a.attention_reason) for a in changed],
    )
    for agent in result.agents:
        if liveness.is_stale(now, agent.tier, agent.last_heartbeat, thresholds):
            # only when it just went stale, or got messages since (agor's CLI delivers to anyone)
            fresh = agent.changed or agent.id in recipients
            if fresh and (expired := store.expire(agent.id, now)):
                result.expired[agent.id] = expired
        elif agent.dead_letters:
            result.redelivered[agent.id] = store.deliver_dead_letters(agent.id, now)
    if result.expired or result.redelivered:  # the queue moved: count it again for the report
        letters = letter_counts(store)
        for agent in result.agents:
            agent.dead_letters, agent.parked = letters.get((agent.id, QUEUED), 0), letters.get((agent.id, PARKED), 0)
    conn.execute(
        "INSERT INTO agor_systemd_settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (WATERMARK, conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]),
    )
    return result


def health_summary(path: str, now: float | None = None) -> dict[str, object] | None:
    """`agor-units health`'s "agents": counts by state, dead letters, the attention queue; the
    one-line reason when btmsg.db cannot be read; None before agor (or btmsg) has created it."""
    if not os.path.lexists(path):
        return None
    try:
        with open_store(path) as store:
            return {"database": path, **report(store, now).summary()}
    except AgorError as e:
        return {"database": path, "error": str(e)}
