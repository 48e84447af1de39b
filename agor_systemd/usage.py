"""argparse for the toolkit's argparse programs (agor-walcheck, agor-relay): a usage error is one line.

`console.run_main` prints the UsageError as `PROG: error: ... (see --help)` and exits 2, as click does.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from agor_systemd.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise UsageError(f"{message} (see --help)")
