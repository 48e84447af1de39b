"""The sidecar `agor-units demo` installs: broken while a flag file exists, fine once it is gone.

    python -m agor_systemd.lab.demo_sidecar FLAG_FILE

It prints agor's ready line first. With FLAG_FILE present it prints a line (stdout goes to the
journal) and exits with status 3 after about 0.3 s, like a runner that dies on start-up. Without
it, it stays up until SIGTERM (a stop request), then exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time

CRASH_AFTER_S = 0.3
EXIT_STATUS = 3


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agor_systemd.lab.demo_sidecar FLAG_FILE", file=sys.stderr)
        return 2
    flag = args[0]
    print('{"type":"ready"}', flush=True)  # what agor's runners print once they are up
    if os.path.exists(flag):
        print(
            f"demo sidecar (pid {os.getpid()}): {flag} exists, so I am broken; "
            f"exiting with status {EXIT_STATUS} in {CRASH_AFTER_S:g}s",
            flush=True,
        )
        time.sleep(CRASH_AFTER_S)
        return EXIT_STATUS

    def stop(_signum, _frame) -> None:
        print(f"demo sidecar (pid {os.getpid()}): stop requested (SIGTERM), exiting 0", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"demo sidecar (pid {os.getpid()}): {flag} is gone, so I am fixed; serving until stopped", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
