"""btmsg: agent health in agor's btmsg.db — heartbeats, stall detection, dead letters that are redelivered.

    schema    agor's tables (created as agor's Rust `open_db_or_create` does) and this toolkit's
              additions, versioned; opening refuses a newer, corrupt or foreign file untouched
    liveness  pure: an agent's state (healthy, stale, stalled) and agor's attention score
    store     the operations every path shares (CLI, library, sweep): register, send, read,
              heartbeat, dead letters, redelivery, the sweep
    cli       the `btmsg` program (identity from $BTMSG_AGENT_ID, as agor's)
    units     agor-btmsg-sweep.service + .timer

Library use::

    from agor_systemd.btmsg import store
    with store.open_store("~/.local/share/agor/btmsg.db") as db:
        outcome = db.send("manager", "tester-1", "run the suite")
        outcome.delivered, outcome.message_id

This file stays empty of imports: `btmsg heartbeat` loads it on every call.
"""
