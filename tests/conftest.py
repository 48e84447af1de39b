"""Shared fixtures.

Integration tests (``tests/integration``) run units under a real, unprivileged ``systemd --user``
started by :mod:`agor_systemd.lab.testbed`.  They need root (to create the lab namespace, cgroups and test
users) and ``scripts/setup.sh`` having been run (the units execute the virtualenv's python).

Fixtures for integration tests:

* ``lab_namespace`` (session, i.e. per xdist worker): private ``/run`` + journald.
* ``user_manager`` (function, parametrized over :func:`available_builds`, ids ``systemd252``,
  ``systemd254``, ...): a running manager.  The manager itself lives for the whole session (one
  per build per worker); after each test it is reset: units defined in ``~/.config/systemd/user``
  and loaded ``agor-*`` / ``run-*`` units are stopped, that directory is removed, failed units are
  reset and the manager reloads.  Name your test units ``agor-*`` (or put them in that directory).
* ``project_venv`` (session): :data:`VENV`, with the working tree's ``agor_systemd`` copied over the
  installed package, so units running ``/opt/agor-systemd/venv/bin/python`` use the current code.
* ``fake_sidecar_path``, ``escape_corpus_path`` (session): world-readable copies of
  ``tests/programs/fake_sidecar.py`` and ``tests/programs/sandbox_escape.py``.
"""

from __future__ import annotations

import fcntl
import filecmp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agor_systemd.lab.testbed import (
    OPT_ROOT,
    USER_LOCKS,
    VENV,
    LabError,
    LabNamespace,
    SystemdBuild,
    UserManager,
    available_builds,
    claim_name,
    deploy_package,
    venv_site,
)

REPO = Path(__file__).resolve().parent.parent
TEST_SUPPORT = OPT_ROOT / "test-support"
LOCK_DIR = OPT_ROOT / "locks"


# ---------------------------------------------------------------------------------------------
# skip reasons a user would accept; anything else fails
# ---------------------------------------------------------------------------------------------

_BUILDS: list[SystemdBuild] = available_builds()


def _integration_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests start a real systemd user manager and need root"
    if not _BUILDS:
        return "systemd is not installed (no /lib/systemd/systemd)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = Path(__file__).resolve().parent / "integration"
    reason = _integration_skip_reason()
    for item in items:
        if integration_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# ---------------------------------------------------------------------------------------------
# the project's code for the test users
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def project_venv() -> Path:
    """The test virtualenv, with the working tree's ``agor_systemd`` over the installed copy."""
    try:
        deploy_package(REPO / "agor_systemd", venv_site(VENV), LOCK_DIR)
    except LabError as e:
        pytest.fail(str(e), pytrace=False)
    return VENV


def _support_copy(name: str) -> Path:
    """World-readable copy of ``tests/NAME`` that test users can execute."""
    src = REPO / "tests" / "programs" / name
    if not src.exists():
        pytest.fail(f"tests/programs/{name} does not exist", pytrace=False)
    TEST_SUPPORT.mkdir(mode=0o755, parents=True, exist_ok=True)
    dst = TEST_SUPPORT / name
    LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(LOCK_DIR / "test-support.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dst.exists() and filecmp.cmp(src, dst, shallow=False)):
            tmp = dst.with_name(f".{name}.agor-sync")
            shutil.copyfile(src, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, dst)
    return dst


@pytest.fixture(scope="session")
def fake_sidecar_path() -> Path:
    return _support_copy("fake_sidecar.py")


@pytest.fixture(scope="session")
def escape_corpus_path() -> Path:
    return _support_copy("sandbox_escape.py")


@pytest.fixture(scope="session")
def echo_sidecar_path() -> Path:
    return _support_copy("echo_sidecar.py")


# ---------------------------------------------------------------------------------------------
# lab namespace and managers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab_namespace() -> Iterator[LabNamespace]:
    """A private mount namespace with its own /run and journald (one per xdist worker)."""
    reason = _integration_skip_reason()
    if reason:
        pytest.skip(reason)
    with LabNamespace() as ns:
        yield ns


class _ManagerPool:
    """One manager per build for this worker, started on first use and restarted if it died."""

    def __init__(self, ns: LabNamespace) -> None:
        self.ns = ns
        self.managers: dict[int, UserManager] = {}
        self._locks: list[object] = []

    def _user_name(self, build: SystemdBuild) -> str:
        # A lock per user name keeps two pytest sessions on one machine apart (they would share
        # the user's home directory); the second session takes the next suffix.
        base = f"agort-{_worker()}-{build.version}"[:29]
        claimed = claim_name((f"{base}{suffix}" for suffix in ("", "b", "c", "d", "e", "f")), USER_LOCKS)
        if claimed:
            name, lock = claimed
            self._locks.append(lock)  # held for the session
            return name
        raise LabError(f"all test user names {base}* are in use by other test sessions")

    def get(self, build: SystemdBuild) -> UserManager:
        mgr = self.managers.get(build.version)
        if mgr is not None and not mgr.is_alive():
            try:
                mgr.stop()
            except LabError:
                pass
            mgr = None
        if mgr is None:
            old = self.managers.get(build.version)
            user = old.user if old is not None else self._user_name(build)
            mgr = UserManager(user, build, self.ns)
            # leftovers of an earlier session (perhaps of another checkout, with other settings)
            shutil.rmtree(mgr.unit_dir, ignore_errors=True)
            mgr.config_file.unlink(missing_ok=True)
            mgr.start()
            self.managers[build.version] = mgr
        return mgr

    def close(self) -> None:
        errors = []
        for mgr in self.managers.values():
            try:
                mgr.stop()
            except LabError as e:
                errors.append(str(e))
        for f in self._locks:
            f.close()  # type: ignore[attr-defined]
        if errors:
            raise LabError("; ".join(errors))


@pytest.fixture(scope="session")
def _manager_pool(lab_namespace: LabNamespace, project_venv: Path) -> Iterator[_ManagerPool]:
    pool = _ManagerPool(lab_namespace)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=_BUILDS or [None], ids=lambda b: b.name if b is not None else "no-systemd")
def user_manager(request: pytest.FixtureRequest, _manager_pool: _ManagerPool) -> Iterator[UserManager]:
    """A running ``systemd --user`` (one per build), clean at the start of every test."""
    build: SystemdBuild | None = request.param
    if build is None:
        pytest.skip("systemd is not installed")
    mgr = _manager_pool.get(build)
    yield mgr
    if not mgr.is_alive():
        return  # the test killed or stopped it: the next test gets a fresh one
    try:
        mgr.reset()
    except LabError:
        deadline = time.monotonic() + 2
        while mgr.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if mgr.is_alive():
            raise
