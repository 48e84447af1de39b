"""Start the launcher fast: systemd runs `python3 -I -S <this file> ARGS` on every restart.

`-S` skips the site module (and `-m` would add runpy): together ~6 ms of a ~17 ms start.
Without site, the package's own directory is put on sys.path by hand.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from agor_systemd.sidecar.launcher import main

main()
