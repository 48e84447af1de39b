"""One worker of the btmsg crash test (tests/test_btmsg_crash.py), killed and restarted at random.

btmsg_worker.py DB writer NAME GENERATION LOG   send to r0..r7 until killed; after each send
                                                 returns, append "content delivered|dead" to LOG
btmsg_worker.py DB sweeper                       sweep in a loop
btmsg_worker.py DB redeliverer                   redeliver --all in a loop
btmsg_worker.py DB heartbeater                   heartbeat r0..r3 always, r4..r7 in bursts (so they
                                                 go stale, get dead letters, come back)
"""

from __future__ import annotations

import os
import sys
import time

from agor_systemd.btmsg.store import open_store
from agor_systemd.btmsg.sweep import sweep

RECIPIENTS = [f"r{i}" for i in range(8)]


def main() -> None:
    path, role = sys.argv[1], sys.argv[2]
    store = open_store(path)
    if role == "writer":
        name, generation, log_path = sys.argv[3], sys.argv[4], sys.argv[5]
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        n = 0
        while True:
            content = f"{name}-{generation}-{n}"
            outcome = store.send(name, RECIPIENTS[n % len(RECIPIENTS)], content)
            os.write(log, f"{content} {'delivered' if outcome.delivered else 'dead'}\n".encode())
            n += 1
    while True:
        if role == "sweeper":
            sweep(store)
        elif role == "redeliverer":
            store.redeliver(None)
        elif role == "heartbeater":
            for agent in RECIPIENTS[:4]:
                store.heartbeat(agent)
            if int(time.time() * 2) % 3 == 0:  # r4..r7: alive a third of the time
                for agent in RECIPIENTS[4:]:
                    store.heartbeat(agent)
        time.sleep(0.01)


if __name__ == "__main__":
    main()
