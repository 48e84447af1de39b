"""`btmsg`: agor's agent messaging CLI, with the heartbeats, dead letters and sweep agor documents.

Identity from $BTMSG_AGENT_ID (as agor's CLI), the database from --db, $AGOR_DATA_DIR or
~/.local/share/agor/btmsg.db. `btmsg heartbeat` — which agents call often — skips argparse: its
whole run is Python's start, sqlite3 and one transaction (bench/btmsg.py measures it).
"""

from __future__ import annotations

import os
import sys

from agor_systemd import tracing
from agor_systemd.btmsg.store import EXIT_DEAD_LETTER, Store, UnknownAgent, default_path, open_store
from agor_systemd.console import run_main
from agor_systemd.errors import UsageError

PROG = "btmsg"
EXIT_ATTENTION = 4  # sweep: an agent is stalled or a letter is parked
PREVIEW = 120  # agor's inbox previews
SWEEP_IDENTIFIER = "agor-btmsg-sweep"  # the sweep unit's SyslogIdentifier= (btmsg.units)

TYPE_CHECKING = False  # import cost: argparse and typing are loaded only off the heartbeat path
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def identity(args: argparse.Namespace) -> str:
    return identity_of(args.agent)


def identity_of(agent: str | None) -> str:
    agent = agent or os.environ.get("BTMSG_AGENT_ID", "")
    if not agent:
        raise UsageError("who is this? set BTMSG_AGENT_ID (agor sets it for its agents) or pass --agent ID")
    return agent


def emit(data: object, as_json: bool, text: str | None) -> None:
    if as_json:
        import json  # import cost: only --json output needs it

        print(json.dumps(data, ensure_ascii=False, indent=None if isinstance(data, dict) else 1))
    elif text:
        print(text)


def one_line(text: str, width: int = PREVIEW) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    import time  # import cost: text output only

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_register(db: Store, args: argparse.Namespace) -> int:
    db.register(args.id, args.name, args.role, args.group, args.tier, args.model, args.cwd)
    emit({"agent": args.id}, args.json, f"registered {args.id} in {db.path}")
    return 0


def cmd_allow(db: Store, args: argparse.Namespace) -> int:
    db.allow(args.sender, args.recipient, args.bidirectional)
    arrow = "<->" if args.bidirectional else "->"
    emit(
        {"from": args.sender, "to": args.recipient, "both_ways": args.bidirectional},
        args.json,
        f"{args.sender} {arrow} {args.recipient}",
    )
    return 0


def cmd_send(db: Store, args: argparse.Namespace) -> int:
    outcome = db.send(identity(args), args.recipient, " ".join(args.message), args.reply_to)
    if outcome.delivered:
        emit(outcome.as_dict(), args.json, f"sent {outcome.message_id} to {outcome.recipient}")
        return 0
    emit(outcome.as_dict(), args.json, None)
    if not args.json:
        sys.stderr.write(
            f"{PROG}: {outcome.error}: message {outcome.message_id} kept as a dead letter; it is "
            f"redelivered when {outcome.recipient} is live again (btmsg dead-letters)\n"
        )
    return EXIT_DEAD_LETTER


def cmd_inbox(db: Store, args: argparse.Namespace) -> int:
    rows = db.inbox(identity(args), args.all)
    keys = ("id", "from", "content", "created_at", "read")
    lines = [f"{'  ' if r[4] else '* '}{r[0][:8]}  {r[3]}  {r[1]}: {one_line(r[2])}" for r in rows]
    emit([dict(zip(keys, r)) for r in rows], args.json, "\n".join(lines) or "no unread messages")
    return 0


def cmd_read(db: Store, args: argparse.Namespace) -> int:
    message_id, sender, content, created_at = db.read_message(identity(args), args.id)
    text = f"id:   {message_id}\nfrom: {sender}\ndate: {created_at}\n\n{content}"
    emit({"id": message_id, "from": sender, "content": content, "created_at": created_at}, args.json, text)
    return 0


def cmd_heartbeat(db: Store, args: argparse.Namespace) -> int:
    return heartbeat(db, identity(args), args.json)


def heartbeat(db: Store, agent: str, as_json: bool) -> int:
    redelivered = db.heartbeat(agent)
    note = f"{redelivered} dead letter(s) redelivered to {agent}: btmsg inbox" if redelivered else None
    emit({"agent": agent, "redelivered": redelivered}, as_json, note)
    return 0


def cmd_agents(db: Store, args: argparse.Namespace) -> int:
    from agor_systemd.btmsg.sweep import report  # import cost: dataclasses, only for reports

    result = report(db)
    lines = [f"{'agent':<20} {'state':<8} {'last activity':<19}  letters  attention"]
    for a in result.agents:
        letters = f"{a.dead_letters}+{a.parked}p" if a.parked else str(a.dead_letters)
        lines.append(f"{a.id:<20} {a.state:<8} {when(a.last_activity):<19}  {letters:>7}  {a.attention_reason or ''}")
    emit(result.as_dict(), args.json, "\n".join(lines))
    return 0


def cmd_dead_letters(db: Store, args: argparse.Namespace) -> int:
    letters = db.dead_letters(args.to, args.state)
    lines = [
        f"{d['message_id'] or '#' + str(d['id'])}  {d['state']:<6} {d['reason']:<11} x{d['attempts']}  "
        f"{d['from_agent']} -> {d['to_agent']}: {one_line(str(d['content']), 60)}"
        for d in letters
    ]
    emit(letters, args.json, "\n".join(lines) or "no dead letters")
    return 0


def cmd_redeliver(db: Store, args: argparse.Namespace) -> int:
    if (args.target is None) == (not args.all):
        raise UsageError("name an agent or pass --all")
    done = db.redeliver(args.target, args.parked)
    if args.target is not None and not done:
        raise UnknownAgent(
            f"{args.target} is stale (no recent heartbeat): its dead letters stay queued until it is live"
        )
    lines = [f"{count} dead letter(s) redelivered to {agent}" for agent, count in done.items() if count]
    emit({"redelivered": done}, args.json, "\n".join(lines) or "nothing to redeliver")
    return 0


def cmd_sweep(db: Store, args: argparse.Namespace) -> int:
    from agor_systemd import journal  # import cost: these three only for the sweep (dataclasses: ~5 ms)
    from agor_systemd.btmsg.liveness import HEALTHY, STALE, STALLED, Thresholds  # import cost: as above
    from agor_systemd.btmsg.sweep import sweep  # import cost: as above
    from agor_systemd.config import SETTINGS  # import cost: units.toml's declarations, for the sweep only

    # the flags take what units.toml's [btmsg] takes (the sweep's unit passes those settings)
    for setting in SETTINGS:
        value = getattr(args, setting.key, None) if setting.table == "btmsg" else None
        if value is not None and setting.limits is not None and not setting.limits[0] <= value <= setting.limits[1]:
            low, high = setting.limits
            raise UsageError(f"--{setting.key.replace('_', '-')} must be between {low:g} and {high:g}, got {value:g}")
    configured = db.thresholds
    db.configure(
        Thresholds(
            args.stale_after_s if args.stale_after_s is not None else configured.stale_after_s,
            args.stall_threshold_min * 60 if args.stall_threshold_min is not None else configured.stall_after_s,
            args.max_deliver if args.max_deliver is not None else configured.max_deliver,
            round(args.max_message_kib * 1024) if args.max_message_kib is not None else configured.max_message_bytes,
        )
    )
    result = sweep(db)
    priority = {STALLED: journal.WARNING, STALE: journal.NOTICE}

    def log(text: str, level: int = journal.NOTICE) -> None:
        journal.log(PROG, text, level)  # with tracing on: TRACE_ID= and SPAN_ID= too (traced_main)

    for agent in result.agents:
        if agent.changed and (agent.previous_state is not None or agent.state != HEALTHY):  # not a new agent
            since = f"last activity {when(agent.last_activity)}"
            text = f"agent {agent.id} is {agent.state} ({agent.attention_reason or since})"
            log(text, priority.get(agent.state, journal.INFO))
    for agent_id, count in result.expired.items():
        log(f"{count} unread message(s) to stale {agent_id} returned to the dead-letter queue")
    for agent_id, count in result.redelivered.items():
        log(f"{count} dead letter(s) redelivered to {agent_id}")
    counts = ", ".join(f"{n} {state}" for state, n in result.counts().items())
    letters = result.dead_letter_counts()
    text = (
        f"{len(result.agents)} agents: {counts}; dead letters: {letters['queued']} queued, {letters['parked']} parked"
    )
    emit(result.as_dict(), args.json, text)
    return EXIT_ATTENTION if result.needs_attention else 0


COMMANDS = {
    "register": cmd_register,
    "allow": cmd_allow,
    "send": cmd_send,
    "inbox": cmd_inbox,
    "read": cmd_read,
    "heartbeat": cmd_heartbeat,
    "agents": cmd_agents,
    "dead-letters": cmd_dead_letters,
    "redeliver": cmd_redeliver,
    "sweep": cmd_sweep,
}

HELP = f"""
identity and database:
  $BTMSG_AGENT_ID      who you are (agor sets it for its agents); --agent overrides
  --db, $AGOR_DATA_DIR btmsg.db (default ~/.local/share/agor/btmsg.db, agor's own)

states (docs/btmsg.md): healthy; stale — no heartbeat for stale_after_s (300 s): messages to it
become dead letters and are redelivered, in order, when it heartbeats again; stalled — no
heartbeat, message sent or message read for stall_threshold_min (15): attention 100.

exit statuses:
   0  done
   2  usage: bad command line, an empty message or one over the size limit; nothing stored
   {EXIT_DEAD_LETTER}  send: the recipient is stale, the message is kept as a dead letter
   {EXIT_ATTENTION}  sweep: an agent is stalled or a dead letter is parked
  65  btmsg.db is not SQLite, is corrupt, is not agor's, or is newer than this program
  66  no btmsg.db yet (`btmsg register` creates it)
  67  no such agent (or message)
  70  an SQLite error this program does not know
  74  I/O error or disk full; nothing was written
  75  locked by another writer for more than 5 s; nothing was written
  77  cannot write btmsg.db, or the sender may not message the recipient (contacts)
"""


def argument_parser() -> argparse.ArgumentParser:
    import argparse  # import cost: ~4 ms, which `btmsg heartbeat` does not pay

    from agor_systemd.usage import ArgumentParser as Parser  # import cost: argparse and typing, as above

    common = Parser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="btmsg.db (default: $AGOR_DATA_DIR/btmsg.db, else agor's)",
    )
    common.add_argument(
        "--agent", metavar="ID", default=argparse.SUPPRESS, help="act as this agent (default: $BTMSG_AGENT_ID)"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p = Parser(
        prog=PROG,
        description="agor's agent messaging, with heartbeats, stall detection and dead letters that are redelivered.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.set_defaults(db=None, agent=None, json=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    c = command("register", "Register an agent (or update it), creating btmsg.db if needed, as agor's register.")
    c.add_argument("id")
    c.add_argument("name")
    c.add_argument("role", help="admin (tier 0), manager/architect/tester/reviewer (tier 1), anything else (tier 2)")
    c.add_argument("group")
    c.add_argument("--tier", type=int, choices=range(3), help="override the tier the role gives")
    c.add_argument("--model")
    c.add_argument("--cwd")
    c = command("allow", "Let SENDER message RECIPIENT (agor's contacts; the operator, tier 0, needs none).")
    c.add_argument("sender")
    c.add_argument("recipient")
    c.add_argument("-b", "--bidirectional", action="store_true", help="and RECIPIENT message SENDER")
    c = command(
        "send",
        f"Send a message. To a stale recipient it is kept as a dead letter (exit status {EXIT_DEAD_LETTER}) and "
        "redelivered when the recipient is live again; an unknown recipient is refused.",
    )
    c.add_argument("recipient", metavar="TO", help="agent id or unique id prefix")
    c.add_argument("message", nargs="+", metavar="MESSAGE", help="the words are joined with spaces")
    c.add_argument("--reply-to", metavar="ID", help="the message this answers")
    c = command("inbox", "Your unread messages, oldest first (* marks unread).")
    c.add_argument("--all", action="store_true", help="the newest 50, read or not, newest first")
    c = command("read", "Show a message to you and mark it read (counts as activity).")
    c.add_argument("id", help="message id or unique prefix")
    command("heartbeat", "Record that you are alive; your queued dead letters are redelivered at once.")
    command("agents", "Every agent's state (healthy, stale, stalled), last activity, dead letters and attention.")
    c = command("dead-letters", "Dead letters, oldest first, with their reason (stale, expired, max_deliver).")
    c.add_argument("--to", metavar="AGENT", help="only those to this agent")
    state = c.add_mutually_exclusive_group()
    state.add_argument("--queued", dest="state", action="store_const", const="queued", help="only those waiting")
    state.add_argument("--parked", dest="state", action="store_const", const="parked", help="only parked ones")
    c = command("redeliver", "Redeliver the queued dead letters of a live agent (or every live agent) now.")
    c.add_argument("target", nargs="?", metavar="AGENT")
    c.add_argument("--all", action="store_true", help="every live agent with dead letters")
    c.add_argument("--parked", action="store_true", help="queue parked letters again first (attempts start over)")
    c = command(
        "sweep",
        "Assess every agent, log state changes, expire and redeliver (what agor-btmsg-sweep.timer runs). "
        "Threshold flags are stored in btmsg.db, for every sender to use.",
    )
    c.add_argument("--stale-after-s", type=float, metavar="S", help="no heartbeat for this long: stale (300)")
    c.add_argument("--stall-threshold-min", type=float, metavar="MIN", help="no activity for this long: stalled (15)")
    c.add_argument("--max-deliver", type=int, metavar="N", help="deliveries before a letter is parked (5)")
    c.add_argument("--max-message-kib", type=float, metavar="KIB", help="the largest message accepted (256)")
    return p


def main(argv: Sequence[str] | None = None, leave_open: bool = False) -> int:
    """`leave_open`: do not close btmsg.db — the program then ends without checkpointing it (run())."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tracing.current().rename(f"{PROG} {argv[0] if argv and not argv[0].startswith('-') else ''}".strip())
    if argv == ["heartbeat"]:  # the hot path, without argparse
        agent = identity_of(None)
        db = open_store()
        try:
            return heartbeat(db, agent, False)
        finally:
            if not leave_open:
                db.close()
    args = argument_parser().parse_args(argv)
    if args.command == "sweep" and not os.path.lexists(path := os.path.expanduser(args.db or default_path())):
        # the timer is installed before agor has ever run: not a failure of the unit
        sys.stderr.write(f"{PROG}: no database at {path} yet: nothing to sweep\n")
        return 0
    db = open_store(args.db, create=args.command == "register")
    try:
        return COMMANDS[args.command](db, args)
    finally:
        if not leave_open:
            db.close()


def traced_main() -> int:
    """main() in the span of this invocation (tracing on: $AGOR_OTLP_ENDPOINT), named after its command."""
    # the sweep's journal lines carry the trace's ids (the unit's SyslogIdentifier=, native protocol)
    tracing.start(PROG, journal_identifier=SWEEP_IDENTIFIER if sys.argv[1:2] == ["sweep"] else None)
    with tracing.span(PROG) as span:
        status = main(leave_open=True)
        span.set(**{"exit.status": status})
        return status


def run() -> None:
    """The btmsg program (and `python -m agor_systemd.btmsg`)."""
    run_main(PROG, traced_main, quick_exit=True)
