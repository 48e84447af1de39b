"""Benchmark: agor-walcheck against the bare sqlite3 CLI on two databases with a 64 MiB WAL each,
and (--stall) how long a run holds up a writer that has no busy timeout.

    python bench/walcheck.py [--rounds 7] [--wal-mib 64] [--json] [--dir DIR]
    python bench/walcheck.py --stall [--rounds 5] [--json] [--dir DIR]

Each round restores the same two database + WAL pairs from a pristine copy, flushes the page
cache's dirty pages (sync), then times, in alternating order:

  walcheck: <python> -I -m agor_systemd.walcheck DB1 DB2           (what the timer's unit runs)
  sqlite3:  sqlite3 DB1 'PRAGMA wal_checkpoint(TRUNCATE)'; sqlite3 DB2 '...'

and reports the median wall times and their ratio (target <= 1.3). Exit status 1 if the target is
missed or a checkpoint did not truncate.

--stall: a writer process without busy timeout (agor's sessions.db connection) inserts a row
every millisecond into a small WAL database; a reader process holds a read transaction (the worst
case: every TRUNCATE attempt waits for it until its share of the busy timeout is used up), or no
reader (the usual case). Each round times one checkpointer in between:

  walcheck: <python> -m agor_systemd.walcheck DB   (the timer's defaults; this tree's code: run in it)
  agor:     sqlite3 DB '.timeout 5000' 'PRAGMA wal_checkpoint(TRUNCATE)'   (agor's own checkpoint)

and reports how long the writer's inserts failed ("database is locked") per run, in total and the
longest single stall. Exit status 1 if a walcheck run held the writer up longer than
walcheck.MAX_BUSY_TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.3
REPO = Path(__file__).resolve().parent.parent

GENERATE = r"""
import os, sqlite3, sys
path, target = sys.argv[1], int(sys.argv[2]) << 20
c = sqlite3.connect(path, isolation_level=None)
c.execute("PRAGMA journal_mode=wal"); c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
while not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") < target:
    c.execute("BEGIN")
    for _ in range(200):
        c.execute("INSERT INTO t(b) VALUES (randomblob(3000))")
    c.execute("COMMIT")
os._exit(0)  # no close: a last close would checkpoint and delete the WAL
"""


def restore(pristine: Path, work: Path, names: list[str]) -> list[str]:
    for name in names:
        for suffix in ("", "-wal", "-shm"):
            (work / f"{name}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(pristine / name, work / name)
        shutil.copyfile(pristine / f"{name}-wal", work / f"{name}-wal")
    os.sync()
    return [str(work / name) for name in names]


def timed(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        cp = subprocess.run(argv, capture_output=True, text=True, cwd="/")
        if cp.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
    return time.perf_counter() - start


# inserts without a busy timeout until stdin closes, then prints each stall: from the first
# failed insert to the next one that succeeded
NO_WAIT_WRITER = str(REPO / "tests" / "programs" / "no_wait_writer.py")

PINNING_READER = r"""
import sqlite3, sys
r = sqlite3.connect(sys.argv[1], isolation_level=None)
r.execute("BEGIN"); r.execute("SELECT count(*) FROM t").fetchone()
print("reading", flush=True)
sys.stdin.read()
"""

CREATE = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=wal"); c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
c.execute("INSERT INTO t(b) VALUES (x'00')")
"""


def stall_round(tmp: Path, checkpointer: list[str], reader: bool) -> dict:
    """One checkpointer run (its argv with "DB" for the database) between a writer without busy
    timeout and, if `reader`, a reader pinning the WAL."""
    db = tmp / "stall.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", CREATE, str(db)], check=True)
    procs = []
    if reader:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", PINNING_READER, str(db)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        assert procs[-1].stdout.readline() == "reading\n"
    writer = subprocess.Popen(
        [sys.executable, NO_WAIT_WRITER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    procs.append(writer)
    try:
        assert writer.stdout.readline() == "writing\n"
        time.sleep(0.3)
        started = time.perf_counter()
        argv = [str(db) if arg == "DB" else arg for arg in checkpointer]
        cp = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        run_s = time.perf_counter() - started
        time.sleep(0.3)
    finally:
        outputs = [p.communicate("", timeout=60)[0] for p in reversed(procs)]
    stats = json.loads(outputs[0])
    row = {
        "run_s": run_s,
        "exit": cp.returncode,
        "stall_s": sum(stats["stalls"]),
        "longest_s": max(stats["stalls"], default=0.0),
        "stalls": len(stats["stalls"]),
        "failed_inserts": stats["failed"],
    }
    if "--json" in argv:  # walcheck's own account: time in TRUNCATE, the most it held the writer
        row["truncate_s"] = json.loads(cp.stdout)["databases"][0]["truncate_s"]
    return row


def stall_main(args) -> int:
    sqlite3_cli = shutil.which("sqlite3")
    if sqlite3_cli is None:
        raise SystemExit("sqlite3 CLI not found (apt-get install sqlite3)")
    sys.path.insert(0, str(REPO))
    from agor_systemd.walcheck import MAX_BUSY_TIMEOUT_S

    checkpointers = {
        "walcheck": [args.python, "-m", "agor_systemd.walcheck", "--json", "DB"],
        "agor": [sqlite3_cli, "DB", ".timeout 5000", "PRAGMA wal_checkpoint(TRUNCATE)"],
    }
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="agor-walstall-", dir=args.dir or "/var/tmp") as tmp:
        for _ in range(args.rounds):
            for name, argv in checkpointers.items():
                for reader in (True, False):
                    case = f"{name} {'reader pinning the WAL' if reader else 'no reader'}"
                    rows.setdefault(case, []).append(stall_round(Path(tmp), argv, reader))
    worst = {
        k: {f: max(r.get(f, 0) for r in v) for f in ("stall_s", "longest_s", "truncate_s", "run_s", "failed_inserts")}
        | {"exits": sorted({r["exit"] for r in v})}
        for k, v in rows.items()
    }
    ok = all(w["stall_s"] <= MAX_BUSY_TIMEOUT_S for k, w in worst.items() if k.startswith("walcheck"))
    if args.json:
        print(json.dumps({"rounds": args.rounds, "worst": worst, "runs": rows, "met": ok}, indent=2))
    else:
        print(f"writer without busy timeout, one insert per ms; {args.rounds} rounds; worst round of each")
        print(
            "| checkpointer | case | writer held up, s | longest stall, s | failed inserts | in TRUNCATE, s "
            "| run s | exit |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for k, w in worst.items():
            name, case = k.split(" ", 1)
            truncate = f"{w['truncate_s']:.2f}" if name == "walcheck" else "–"
            print(
                f"| {name} | {case} | {w['stall_s']:.2f} | {w['longest_s']:.2f} | {w['failed_inserts']} "
                f"| {truncate} | {w['run_s']:.2f} | {','.join(map(str, w['exits']))} |"
            )
        print(f"walcheck within {MAX_BUSY_TIMEOUT_S:g} s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stall", action="store_true", help="measure how long a run holds up a writer")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--wal-mib", type=int, default=64)
    ap.add_argument("--python", default=sys.executable, help="interpreter with agor_systemd installed")
    ap.add_argument("--dir", type=Path, default=None, help="where the databases live (default: a temp dir in /var/tmp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.stall:
        return stall_main(args)
    sqlite3_cli = shutil.which("sqlite3")
    if sqlite3_cli is None:
        raise SystemExit("sqlite3 CLI not found (apt-get install sqlite3)")

    with tempfile.TemporaryDirectory(prefix="agor-walbench-", dir=args.dir or "/var/tmp") as tmp:
        pristine, work = Path(tmp, "pristine"), Path(tmp, "work")
        pristine.mkdir()
        work.mkdir()
        names = ["sessions.db", "btmsg.db"]
        for name in names:
            subprocess.run([sys.executable, "-c", GENERATE, str(pristine / name), str(args.wal_mib)], check=True)
        wal_sizes = [(pristine / f"{n}-wal").stat().st_size for n in names]

        results: dict[str, list[float]] = {"walcheck": [], "sqlite3": []}
        truncated = True
        for r in range(args.rounds):
            order = ["walcheck", "sqlite3"] if r % 2 == 0 else ["sqlite3", "walcheck"]
            for which in order:
                dbs = restore(pristine, work, names)
                if which == "walcheck":
                    argvs = [[args.python, "-I", "-m", "agor_systemd.walcheck", *dbs]]
                else:
                    argvs = [[sqlite3_cli, db, "PRAGMA wal_checkpoint(TRUNCATE)"] for db in dbs]
                results[which].append(timed(argvs))
                # the WAL is truncated (walcheck) or deleted on the CLI's last close (sqlite3)
                truncated &= all(not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0 for db in dbs)

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["walcheck"] / med["sqlite3"]
    ok = ratio <= TARGET and truncated
    doc = {
        "wal_bytes": wal_sizes,
        "rounds": args.rounds,
        "seconds": results,
        "median_s": med,
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ok,
        "truncated": truncated,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"two databases, WAL {', '.join(f'{w / 2**20:.1f} MiB' for w in wal_sizes)}; {args.rounds} rounds")
        print("| tool | median s | min s | max s |")
        print("|---|---|---|---|")
        for k, v in results.items():
            print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {max(v):.3f} |")
        print(f"ratio walcheck / sqlite3 (medians): {ratio:.2f} (target <= {TARGET}) -> {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
