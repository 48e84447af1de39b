"""Check unit text with `systemd-analyze verify`, which also catches keys systemd ignores."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


def verify_units(
    units: dict[str, str], analyze: str = "systemd-analyze", user: bool = True, env: dict[str, str] | None = None
) -> list[str]:
    """Problems systemd-analyze reports for these units; an empty list means clean.

    `verify` exits 0 on unknown keys ("Unknown key 'RestartSteps' ... ignoring"), so every
    line that names one of our files counts as a problem, whatever the exit status.
    """
    with tempfile.TemporaryDirectory(prefix="agor-verify-") as tmp:
        paths = []
        for name, text in units.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        run_env = dict(os.environ if env is None else env)
        mode = ["--user"] if user and run_env.get("XDG_RUNTIME_DIR") else []
        try:
            done = subprocess.run(
                [analyze, *mode, "verify", *paths], capture_output=True, text=True, env=run_env, timeout=60
            )
        except FileNotFoundError:
            return [f"{analyze} not found (apt-get install systemd)"]
        except subprocess.TimeoutExpired:
            return [f"{analyze} verify timed out"]
        lines = (done.stdout + done.stderr).splitlines()
        problems = [line.replace(tmp + "/", "") for line in lines if any(name in line for name in units)]
        if done.returncode != 0 and not problems:
            problems = [line for line in lines if line.strip()] or [f"{analyze} verify exited {done.returncode}"]
        return problems
