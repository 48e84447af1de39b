"""The linters as tests: ruff (format and check) over the package, tests/ and bench/, mypy over the package.

The tools come from the interpreter the tests run in (the `test` extra, which scripts/setup.sh
installs), with their settings from pyproject.toml; a finding fails the test with the tool's own
output. Neither writes a cache into the work tree.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUFF_PATHS = ["agor_systemd", "tests", "bench"]


def run_tool(*args: str) -> None:
    cp = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.fail(f"`{' '.join(args)}` exited with {cp.returncode}:\n{cp.stdout}{cp.stderr}", pytrace=False)


def test_ruff_format():
    run_tool("ruff", "format", "--check", "--no-cache", *RUFF_PATHS)


def test_ruff_check():
    run_tool("ruff", "check", "--no-cache", *RUFF_PATHS)


def test_mypy():
    # the whole package, whatever [tool.mypy] packages says; /dev/null: mypy's way to write no cache
    run_tool("mypy", "--cache-dir=/dev/null", "-p", "agor_systemd")
