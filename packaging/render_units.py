"""The Debian package's reference user units: `python3 packaging/render_units.py DIR`.

Renders the default configuration for the systemd of the release being built for (the build
environment's `systemctl --version`), with the launcher and docs at the package's paths, checks the
units with `systemd-analyze --user verify` (lintian does not look at user units) and writes them.
Run from the source tree by debian/rules (PYTHONPATH=.).
"""

import os
import sys
import tempfile
from pathlib import Path

from agor_systemd.config import Config
from agor_systemd.files import atomic_write
from agor_systemd.manager import installed_systemd_version
from agor_systemd.units import render_units
from agor_systemd.verify import verify_units


def main(directory: Path) -> None:
    version = installed_systemd_version()
    if version is None:
        sys.exit("render_units: systemctl --version failed (Build-Depends: systemd)")
    units = render_units(Config(), version)  # PACKAGED_LAUNCHER, PACKAGED_DOCS
    with tempfile.TemporaryDirectory(prefix="agor-runtime-") as runtime:  # --user needs one
        problems = verify_units(units, env={**os.environ, "XDG_RUNTIME_DIR": runtime})
    if problems:
        sys.exit("render_units: systemd-analyze --user verify: " + "; ".join(problems))
    for name, text in units.items():
        atomic_write(directory / name, text)
        print(f"{directory / name} (systemd {version})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
