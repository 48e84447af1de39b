"""Fixtures of the packaging tests: the built .debs (this tree's version and a "next" one for the
upgrade) and clean Debian roots. They need root (dpkg-buildpackage's Build-Depends, mmdebstrap,
chroot, the lab's user managers) and network to the machine's Debian mirror."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agor_systemd import __version__
from tests.packaging.support import build_deb

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("packaging") and os.geteuid():
            item.add_marker(pytest.mark.skip(reason="packaging tests build and install packages: they need root"))


@dataclass(frozen=True)
class Debs:
    current: Path  # this tree's version, lintian-clean
    next: Path  # the same tree as the next version: the upgrade test's new package
    next_version: str


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Debs]:
    out = tmp_path_factory.mktemp("debs")
    next_version = f"{__version__}.1"
    yield Debs(build_deb(out), build_deb(out, next_version, lintian=False), next_version)
