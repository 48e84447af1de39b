"""Benchmark: agor-walcheck against the bare sqlite3 CLI on two databases with a 64 MiB WAL each.

    python bench/walcheck.py [--rounds 7] [--wal-mib 64] [--json] [--dir DIR]

Each round restores the same two database + WAL pairs from a pristine copy, flushes the page
cache's dirty pages (sync), then times, in alternating order:

  walcheck: <python> -I -m agor_systemd.walcheck DB1 DB2           (what the timer's unit runs)
  sqlite3:  sqlite3 DB1 'PRAGMA wal_checkpoint(TRUNCATE)'; sqlite3 DB2 '...'

and reports the median wall times and their ratio (target <= 1.3). Exit status 1 if the target is
missed or a checkpoint did not truncate.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--wal-mib", type=int, default=64)
    ap.add_argument("--python", default=sys.executable, help="interpreter with agor_systemd installed")
    ap.add_argument("--dir", type=Path, default=None, help="where the databases live (default: a temp dir in /var/tmp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
    doc = {"wal_bytes": wal_sizes, "rounds": args.rounds, "seconds": results,
           "median_s": med, "ratio": round(ratio, 3), "target": TARGET, "met": ok, "truncated": truncated}
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
