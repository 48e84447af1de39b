"""`python -m agor_systemd.btmsg`: what agor-btmsg-sweep.service runs (a contract of installed units)."""

from agor_systemd.btmsg.cli import run

run()
