"""`python -m agor_systemd.walcheck`: what agor-walcheck.service runs (a contract of installed units)."""

from agor_systemd.walcheck import run

run()
