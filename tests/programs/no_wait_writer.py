"""A writer like agor's sessions.db code: no busy timeout, so a held lock fails its insert at once.

    python no_wait_writer.py DB      (stops when its stdin closes; prints {"ok", "failed", "stalls"})

Prints "writing" after its first insert; a stall runs from the first failed insert ("database is
locked") to the next one that succeeded. Used by tests/test_walcheck.py and bench/walcheck.py.
"""

import json
import sqlite3
import sys
import threading
import time

c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
ok = failed = 0
stalls, stalled_since = [], None
while not stop.is_set():
    try:
        c.execute("INSERT INTO t(b) VALUES (randomblob(200))")
    except sqlite3.OperationalError:
        failed += 1
        stalled_since = stalled_since or time.monotonic()
    else:
        ok += 1
        if stalled_since is not None:
            stalls.append(time.monotonic() - stalled_since)
            stalled_since = None
        if ok == 1:
            print("writing", flush=True)
    time.sleep(0.001)
print(json.dumps({"ok": ok, "failed": failed, "stalls": stalls}))
