"""Building the distributions, clean Debian roots (mmdebstrap) and the smoke test both packages pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agor_systemd import distfiles
from agor_systemd.config import Config
from agor_systemd.lab.testbed import USER_LOCKS, LabNamespace, UserManager, claim_name, ensure_user
from agor_systemd.units import render_units

REPO = Path(__file__).resolve().parents[2]
# Debian's tools, never a pyenv or virtualenv that happens to be first on PATH
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# everything derives from pyproject.toml and the generator: a program or unit added there is checked too
PROGRAMS_PEOPLE_RUN = tuple(
    p for p in distfiles.entry_points(REPO / "pyproject.toml") if p not in distfiles.INTERNAL_PROGRAMS
)
UNITS = tuple(sorted(render_units(Config(), 252)))  # what install writes (the names are the same on every version)


def entry_points() -> list[str]:
    return distfiles.entry_points(REPO / "pyproject.toml")


def run(argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    """Run as root with Debian's PATH; a failure raises with the command's output."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **kw.pop("env", {})}
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if cp.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {cp.returncode}:\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
    return cp


def debian_mirror() -> str:
    """The Debian (non-security) mirror this machine's apt configuration names, as setup.sh finds it."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                uris = [u for u in line.split()[1:] if "security" not in u and "debian" in u]
                if uris:
                    return uris[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
                if match and "security" not in match.group(1) and "debian" in match.group(1):
                    return match.group(1)
    raise AssertionError("no Debian mirror in this machine's apt configuration")


def build_deb(out: Path, version: str | None = None, lintian: bool = True) -> Path:
    argv = ["bash", str(REPO / "scripts" / "build-deb.sh"), "--out", str(out)]
    argv += ["--version", version] if version else []
    argv += [] if lintian else ["--no-lintian"]
    return Path(run(argv).stdout.strip().splitlines()[-1])


def build_depends() -> list[str]:
    """The packages packaging/debian/control's Build-Depends names (versions left to apt)."""
    control = (REPO / "packaging/debian/control").read_text()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.M | re.S)
    assert field, "no Build-Depends in packaging/debian/control"
    names = [re.sub(r"\(.*?\)", "", item).strip() for item in field.group(1).split(",")]
    return ["debhelper" if n == "debhelper-compat" else n for n in names if n]


def copy_tree(target: Path) -> None:
    """The repository's files (as a clean clone has them) into `target`."""
    target.mkdir(parents=True)
    files = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    existing = "\0".join(f for f in files.split("\0") if f and (REPO / f).exists())
    pack = subprocess.run(
        ["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"],
        input=existing.encode(),
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-C", str(target), "-xf", "-"], input=pack.stdout, check=True)


def make_root(suite: str, directory: Path, include: tuple[str, ...] = ()) -> Path:
    """A clean Debian root of `suite` from the machine's mirror: apt and what apt needs, nothing more."""
    packages = ",".join(("ca-certificates", *include))
    run(["mmdebstrap", "--variant=apt", f"--include={packages}", suite, str(directory), debian_mirror()])
    return directory


def in_root(root: Path, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run(["chroot", str(root), "/bin/sh", "-c", command], timeout=timeout)


def apt_install(root: Path, deb: Path) -> str:
    """`apt install ./agor-systemd_*.deb` inside the root, from Debian's archive only; apt's output."""
    (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
    in_root(root, '[ -n "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null)" ] || apt-get update -q')
    return in_root(root, f"apt-get install -y -q --no-install-recommends /tmp/{deb.name}").stdout


@contextmanager
def packaged_lab(root: Path) -> Iterator[LabNamespace]:
    """A lab namespace whose /usr is the Debian root's: the user manager, python3, the package and
    its dependencies are the files dpkg installed there (/etc, /home and the kernel are the host's)."""
    with LabNamespace() as ns:
        ns.run(["mount", "--bind", str(root / "usr"), "/usr"])
        yield ns


@contextmanager
def lab_user(base: str) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    claimed = claim_name((f"{base}-{worker}{s}"[:31] for s in ("", "b", "c", "d")), USER_LOCKS)
    if claimed is None:
        raise AssertionError(f"all test user names {base}-{worker}* are in use")
    name, lock = claimed
    home = Path(ensure_user(name).pw_dir)
    for leftover in (".config/systemd", ".config/agor", ".local/share/agor", "sidecar-data"):  # homes outlive runs
        shutil.rmtree(home / leftover, ignore_errors=True)
    try:
        yield name
    finally:
        lock.close()


def program(mgr: UserManager, bin_dir: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return mgr.run([f"{bin_dir}/{args[0]}", *args[1:]], timeout=timeout)


def health(mgr: UserManager, bin_dir: str) -> dict:
    return json.loads(program(mgr, bin_dir, "agor-units", "health", "--json").stdout)


def wait_for(what: str, predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return value


def doctor(mgr: UserManager, bin_dir: str) -> dict[str, dict]:
    cp = program(mgr, bin_dir, "agor-units", "doctor", "--json")
    assert cp.stdout, cp.stderr
    return {check["name"]: check for check in json.loads(cp.stdout)}


def verify_shipped_units(mgr: UserManager) -> None:
    """`systemd-analyze --user verify` of the package's units, by the user manager's own systemd
    (lintian does not look at user units)."""
    cp = mgr.run(["systemd-analyze", "--user", "verify", *(f"/usr/lib/systemd/user/{unit}" for unit in UNITS)])
    assert cp.returncode == 0 and "agor-" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr


def smoke(mgr: UserManager, bin_dir: str, fake_sidecar: Path) -> int:
    """What a user does first, through the installed programs: doctor, install --now, health
    healthy, the walcheck timer armed and its service run; the sidecar's MainPID."""
    for name in PROGRAMS_PEOPLE_RUN:
        cp = program(mgr, bin_dir, name, "--help")
        assert cp.returncode == 0 and "usage" in cp.stdout.lower(), (name, cp.stderr)
    checks = doctor(mgr, bin_dir)
    assert checks["manager reachable"]["status"] == "ok", checks["manager reachable"]
    assert checks["libsystemd"]["status"] == "ok", checks["libsystemd"]
    # the settings in units.toml (doctor compares the installed units with them), as a user keeps them
    log = mgr.home / "sidecar-data" / "starts.jsonl"
    mgr.write_file("sidecar-data/.keep", "")
    command = ["/usr/bin/python3", "-I", "-S", str(fake_sidecar), "--log", str(log), "hang"]
    mgr.write_file(
        ".config/agor/units.toml",
        f"[sidecar]\ncommand = {json.dumps(command)}\n\n"
        f"[sandbox]\nread_write_paths = [{json.dumps(str(log.parent))}]\n",
    )
    cp = program(mgr, bin_dir, "agor-units", "install", "--now")
    assert cp.returncode == 0, cp.stderr
    wait_for("health healthy", lambda: health(mgr, bin_dir)["status"] == "healthy")
    assert mgr.systemctl("is-active", "agor-walcheck.timer").stdout.strip() == "active"
    assert mgr.unit_property("agor-walcheck.timer", "NextElapseUSecMonotonic") not in ("", "0", "infinity")
    mgr.systemctl("start", "agor-walcheck.service", check=True, timeout=60)  # a oneshot: waits for the run
    assert mgr.unit_property("agor-walcheck.service", "ExecMainStatus") == "0"
    checks = doctor(mgr, bin_dir)
    assert checks["units installed"]["status"] == "ok", checks["units installed"]
    assert checks["units generator"]["status"] == "ok", checks["units generator"]
    return int(mgr.unit_property("agor-sidecar.service", "MainPID"))


def uninstall(mgr: UserManager, bin_dir: str) -> None:
    cp = program(mgr, bin_dir, "agor-units", "uninstall", "--json")
    assert cp.returncode == 0, cp.stderr
    assert sorted(json.loads(cp.stdout)["removed"]) == sorted(UNITS)
    assert mgr.unit_property("agor-sidecar.service", "ActiveState") == "inactive"
