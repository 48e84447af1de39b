"""Write, reload, enable and start the units; remove exactly what was written."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agor_systemd import __version__
from agor_systemd.config import (
    AGOR_DATA,
    DEFAULT_COMMAND,
    Config,
    dropped_environment_lines,
    expand_home,
)
from agor_systemd.errors import AgorError
from agor_systemd.files import atomic_write, digest
from agor_systemd.giveup import GAVE_UP_ENV
from agor_systemd.manager import BusError, Systemd, installed_systemd_version
from agor_systemd.relay.units import RELAY_UNIT, relay_files_missing
from agor_systemd.sandbox.enforce import probe_start
from agor_systemd.sandbox.hardening import probe, version_gaps, wanted_groups
from agor_systemd.sandbox.policy import sandbox_paths, working_directory_problem
from agor_systemd.sidecar.protocol import SIDECAR_UNIT
from agor_systemd.sidecar.trace import begin_run, mark_manual_restart
from agor_systemd.unitfile import HEADER, HomePath, Text
from agor_systemd.units import render_units

MANIFEST = ".agor-units.json"  # in the unit directory; systemd ignores files without a unit suffix
# what the manifest may name: unit files in the unit directory, never a path elsewhere
_MANIFEST_UNIT_NAME = re.compile(r"[A-Za-z0-9_@:-][A-Za-z0-9_@:.-]*\.(service|socket|timer)")
# a unit still stopping after its own stop timeout (systemd has sent SIGKILL by then) plus this is
# stuck; TimeoutStopSec=infinity waits no longer than MAX_STOP_WAIT_S
STOP_GRACE_S = 5.0
MAX_STOP_WAIT_S = 300.0


class InstallError(AgorError, RuntimeError):
    """A one-line reason why installing or uninstalling cannot go on."""


@dataclass
class InstallReport:
    directory: Path
    systemd_version: int
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # edited since install: left in place
    actions: list[str] = field(default_factory=list)
    dry_run: bool = False
    hardening: list[str] = field(default_factory=list)  # systemd hardening groups in the sidecar's unit
    left_out: dict[str, str] = field(default_factory=dict)  # group → why (probe or version)
    notes: list[str] = field(default_factory=list)  # what the user should know or do next

    def as_dict(self) -> dict:
        return {
            "directory": str(self.directory),
            "systemd_version": self.systemd_version,
            "written": self.written,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "kept": self.kept,
            "actions": self.actions,
            "dry_run": self.dry_run,
            "hardening": self.hardening,
            "left_out": self.left_out,
            "notes": self.notes,
        }


def unit_directory(system: bool = False) -> Path:
    """Where install writes the units and its manifest. For a user: ~/.config/systemd/user, even when
    the calling shell sets $XDG_CONFIG_HOME — the user manager does not see that shell's environment,
    and an uninstall from any other shell must find what was installed."""
    return Path("/etc/systemd/system") if system else Path.home() / ".config" / "systemd" / "user"


def current_launcher() -> list[str]:
    """Start the launcher with this very interpreter and this very copy of the package."""
    return [sys.executable, "-I", "-S", str(Path(__file__).resolve().parent / "_launch.py")]


def installed_docs() -> str | None:
    """The directory pip or the Debian package put README.md and docs/*.md in (data-files in
    pyproject.toml), for Documentation=; None when this copy runs from a source tree."""
    from importlib import metadata  # import cost: ~30 ms, for install and doctor only

    try:
        files = metadata.distribution("agor-systemd").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "supervision.md" and file.parent.name == "agor-systemd":
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return str(path.parent)
    # Debian's RECORD names the data files where the wheel had them (../data/...); they are under
    # the interpreter's prefix (/usr/share/doc/agor-systemd, unitfile.PACKAGED_DOCS)
    shared = Path(sys.prefix) / "share" / "doc" / "agor-systemd"
    return str(shared) if (shared / "supervision.md").is_file() else None


def read_manifest(directory: Path) -> dict[str, str]:
    """{unit name: sha256 of the text install wrote}; anything else is refused in one line."""
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InstallError(f"{path}: unreadable ({e}); remove it to start over") from None
    units = data.get("units") if isinstance(data, dict) else None
    if not isinstance(units, dict) or not all(
        isinstance(name, str)
        and _MANIFEST_UNIT_NAME.fullmatch(name)
        and isinstance(sha, str)
        and re.fullmatch(r"[0-9a-f]{64}", sha)
        for name, sha in units.items()
    ):
        raise InstallError(
            f'{path}: not an agor-units manifest ({{"units": {{unit name: sha256}}}} expected); remove it to start over'
        )
    return dict(units)


def manifest_version(directory: Path) -> str | None:
    """The agor-systemd version that last wrote the units (None: no manifest, or one written
    before the manifest named it)."""
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def write_manifest(directory: Path, units: dict[str, str]) -> None:
    """The units' digests, and the version that wrote them (doctor: units older than the generator)."""
    if units:
        text = json.dumps({"units": units, "version": __version__}, indent=2, sort_keys=True) + "\n"
        atomic_write(directory / MANIFEST, text)
    else:
        (directory / MANIFEST).unlink(missing_ok=True)


def missing_sidecar_files(command: tuple[Text, ...], home: str) -> list[str]:
    """The sidecar's program if it is not an executable file, and — for the placeholder default
    command, whose program (node) is often installed — its script if it does not exist."""
    program = expand_home(command[0], home)
    missing = [] if os.path.isfile(program) and os.access(program, os.X_OK) else [program]
    if tuple(command) == DEFAULT_COMMAND:
        missing += [path for path in (expand_home(word, home) for word in command[1:]) if not os.path.exists(path)]
    return missing


def check_sidecar(config: Config) -> None:
    """The sidecar must be able to start now: a unit that can only crash-loop helps nobody."""
    home = str(Path.home())
    command = config.sidecar.command
    missing = missing_sidecar_files(command, home)
    if missing and tuple(command) == DEFAULT_COMMAND:
        raise InstallError(
            f"no sidecar configured (the default command is a placeholder; missing: "
            f"{', '.join(missing)}); set [sidecar] command in units.toml or pass it after `--`"
        )
    if missing:
        raise InstallError(
            f"sidecar program {missing[0]!r} does not exist or is not executable; "
            "set [sidecar] command in units.toml or pass it after `--`"
        )
    check_start_paths(config)
    if (problem := working_directory_problem(config, home)) is not None:
        raise InstallError(problem)
    if config.sandbox.enabled:
        check_sandbox_start(config, home)


def check_sandbox_start(config: Config, home: str) -> None:
    """Enter the Landlock domain the launcher will build, in a child, and try what the sidecar
    needs to start: read its program and scripts, write in its working directory."""
    read_write, read_only = ([expand_home(p, home) for p in paths] for paths in sandbox_paths(config))
    command = [expand_home(word, home) for word in config.sidecar.command]
    cwd = expand_home(config.sidecar.working_directory, home)
    made_later = made_by_install(cwd, home) and not os.path.exists(cwd)
    problems = probe_start(read_write, read_only, command, cwd, home, check_cwd=not made_later)
    if problems:
        raise InstallError(
            "the sidecar could not start in its sandbox: "
            + "; ".join(problems)
            + " (docs/sandbox.md: what the sidecar may touch)"
        )


def made_by_install(path: str, home: str) -> bool:
    """agor's data directory (the default working directory): install makes it before any start."""
    return path == expand_home(HomePath(AGOR_DATA), home)


def start_path_problems(config: Config) -> list[str]:
    """A working directory or environment file that is missing now: the sidecar could not start.
    (One removed later is caught by the launcher at each start, as a failed attempt.)"""
    home = str(Path.home())
    sidecar = config.sidecar
    problems = []
    directory = expand_home(sidecar.working_directory, home)
    if not os.path.isdir(directory) and not made_by_install(directory, home):
        problems.append(f"working directory {directory!r} ([sidecar] working_directory) does not exist")
    if sidecar.environment_file is not None:
        env_path = expand_home(sidecar.environment_file, home)
        if not os.path.isfile(env_path) or not os.access(env_path, os.R_OK):
            problems.append(
                f"environment file {env_path!r} ([sidecar] environment_file) does not exist or is not readable"
            )
    return problems


def check_start_paths(config: Config) -> None:
    if problems := start_path_problems(config):
        raise InstallError("; ".join(problems) + "; create it or change the setting")


def check_environment_file(config: Config) -> None:
    """Lines systemd would drop without a word (`export X=1`, `WITH-DASH=x`) are refused now."""
    env_file = config.sidecar.environment_file
    if env_file is None:
        return
    path = Path(expand_home(env_file, str(Path.home())))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return  # systemd reports an unreadable file when the unit starts
    dropped = dropped_environment_lines(text)
    if dropped:
        number, line, why = dropped[0]
        more = f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else ""
        raise InstallError(f"{path} line {number}: systemd would ignore {line!r}: {why}{more}")


def is_generated(text: str) -> bool:
    """A unit file agor-units rendered (it starts with the generated header)."""
    return text.startswith(f"# {HEADER.splitlines()[0]}\n")


def write_units(
    directory: Path, units: dict[str, str], report: InstallReport, manifest: dict[str, str] | None, force: bool = False
) -> None:
    """Write what changed. With a manifest (an install), a unit edited since it was written is
    overwritten only with `force`; without one (--output, a package directory), a file is ours
    when it carries the generated header. Anything else is never overwritten."""
    for name, text in units.items():
        path = directory / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        except (OSError, UnicodeDecodeError) as e:
            raise InstallError(f"{path}: cannot read ({e})") from None
        if current is not None and current != text:
            ours = is_generated(current) if manifest is None else name in manifest
            if not ours:
                raise InstallError(f"{path} exists and was not written by agor-units; move it away first")
            if manifest is not None and digest(current) != manifest[name] and not force:
                raise InstallError(
                    f"{path} was edited since agor-units wrote it; pass --force to overwrite it (or move it away)"
                )
        if current == text:
            report.unchanged.append(name)
        else:
            report.written.append(name)
            if not report.dry_run:
                atomic_write(path, text)
        if manifest is not None:
            manifest[name] = digest(text)
    # the same text from a newer agor-systemd: the manifest records the version that wrote it
    if manifest is not None and not report.dry_run and (report.written or manifest_version(directory) != __version__):
        write_manifest(directory, manifest)


def note_running_old_settings(manager, report: InstallReport) -> None:
    """A rewritten unit takes effect at the sidecar's next start, not in the running one."""
    if SIDECAR_UNIT in report.written and manager.unit_properties(SIDECAR_UNIT).get("ActiveState") in (
        "active",
        "activating",
        "reloading",
    ):
        report.notes.append(
            f"{SIDECAR_UNIT} is still running with its old settings; "
            "`agor-units restart` (or `install --now`) applies the new ones"
        )


def install(
    config: Config,
    *,
    system: bool = False,
    output: Path | None = None,
    now: bool = False,
    dry_run: bool = False,
    systemd_version: int | None = None,
    force: bool = False,
) -> InstallReport:
    """Render the units for the running manager (or `systemd_version` for --output) and install them."""
    if output is not None:
        version = systemd_version or installed_systemd_version()
        if version is None:
            raise InstallError("cannot tell the systemd version; pass --systemd-version")
        report = InstallReport(output, version, dry_run=dry_run)
        # packagers: every group the version supports, unprobed; the launcher checks at run time

        report.hardening, report.left_out = list(wanted_groups(version, None, system)), version_gaps(version, system)
        write_units(
            output,
            render_units(config, version, current_launcher(), system, docs=installed_docs()),
            report,
            manifest=None,
        )
        return report

    check_sidecar(config)
    check_environment_file(config)
    if (missing := relay_files_missing(config, str(Path.home()))) is not None:
        raise InstallError(missing)
    directory = unit_directory(system)
    manifest = read_manifest(directory)  # a broken one stops us before probing
    with Systemd(system) as manager:
        version = systemd_version or manager.version()
        report = InstallReport(directory, version, dry_run=dry_run)
        # only the systemd hardening that takes effect on this manager: never a unit that cannot start

        probed = probe(manager, config, version, system)
        report.hardening, report.left_out = list(probed.applied), probed.left_out
        units = render_units(config, version, current_launcher(), system, set(probed.applied), installed_docs())
        write_units(directory, units, report, manifest, force)
        if dry_run:
            return report
        # the sandbox lets the sidecar write its databases here, but not create the directory
        (Path.home() / AGOR_DATA).mkdir(mode=0o700, parents=True, exist_ok=True)
        manager.reload()
        # templates (agor-relay-sidecar@) have no [Install]: the relay starts their instances
        manager.enable([str(directory / name) for name in units if "@." not in name])
        report.actions += ["daemon-reload", "enable " + " ".join(units)]
        if now:
            # a fresh start with a full restart budget, running the units just written; with
            # tracing on, the sidecar's new run is in this command's trace
            begin_run(system)
            fresh_start(manager)
            report.actions.append(f"restart {SIDECAR_UNIT}")
            for timer in (name for name in units if name.endswith(".timer")):
                manager.restart(timer)  # (re)arms it with the timer just written
                report.actions.append(f"restart {timer}")
            if RELAY_UNIT in units:
                manager.restart(RELAY_UNIT)
                report.actions.append(f"restart {RELAY_UNIT}")
        else:
            note_running_old_settings(manager, report)
    return report


def wait_stopped(manager, names: list[str]) -> list[str]:
    """Wait until no unit of `names` is stopping; the ones still stopping after their own stop
    timeout (when systemd has sent SIGKILL) plus STOP_GRACE_S."""
    deadlines: dict[str, float] = {}
    pending = list(names)
    stuck: list[str] = []
    while pending:
        still: list[str] = []
        for name in pending:
            try:
                props = manager.unit_properties(name)
            except BusError:
                continue  # not loaded: not running
            job = props.get("Job") or (0, "/")
            if not job[0] and props.get("ActiveState") in ("inactive", "failed"):
                continue
            stop_timeout_s = min((props.get("TimeoutStopUSec") or 0) / 1e6, MAX_STOP_WAIT_S)
            deadline = deadlines.setdefault(name, time.monotonic() + stop_timeout_s + STOP_GRACE_S)
            (still if time.monotonic() < deadline else stuck).append(name)
        pending = still
        if pending:
            time.sleep(0.05)
    return stuck


def remove_dangling_links(directory: Path, name: str) -> None:
    """`enable` links left for a unit file that is gone (systemd refuses to disable a missing unit)."""
    for wants in directory.glob("*.wants"):  # (a glob for the link itself skips dangling ones)
        link = wants / name
        if link.is_symlink() and not link.exists():
            link.unlink()


def uninstall(*, system: bool = False, dry_run: bool = False) -> InstallReport:
    """Stop (and wait for it), disable and delete the units install wrote; a unit edited since is
    kept and reported, one deleted since is forgotten."""
    directory = unit_directory(system)
    manifest = read_manifest(directory)
    with Systemd(system) as manager:
        report = InstallReport(directory, manager.version(), dry_run=dry_run)
        names = sorted(manifest)
        for name in names:
            path = directory / name
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise InstallError(f"{path}: cannot read ({e})") from None
            (report.removed if digest(text) == manifest[name] else report.kept).append(name)
        if dry_run or not names:
            return report
        for name in sorted(names, key=stop_order):
            try:
                manager.stop(name)
            except BusError:
                pass  # not loaded: nothing to stop
        # files removed under a unit that is still stopping leave a `not-found failed` ghost
        stuck = wait_stopped(manager, names)
        if stuck:
            status = "systemctl status" if system else "systemctl --user status"
            raise InstallError(
                f"{', '.join(stuck)} did not stop; nothing was removed — "
                f"see `{status}`, then run `agor-units uninstall` again"
            )
        present = report.removed + report.kept
        if present:
            manager.disable(present)
        for name in names:
            if name not in present:
                remove_dangling_links(directory, name)
                report.notes.append(f"{directory / name} was deleted by hand: forgotten")
        for name in report.removed:
            (directory / name).unlink()
        write_manifest(directory, {n: manifest[n] for n in report.kept})
        manager.reload()
        for name in names:
            manager.reset_failed(name)
        report.actions += ["stop", "disable", "daemon-reload"]
    return report


def stop_order(name: str) -> tuple[bool, str]:
    """Sockets first: a client connecting while the service stops must not start it again."""
    return (not name.endswith(".socket"), name)


def fresh_start(manager) -> None:
    """Clear failed state, budget and the given-up mark (docs/socket.md), and start afresh; the
    service pulls its socket in (Sockets=)."""
    manager.unset_environment([GAVE_UP_ENV])
    manager.reset_failed(SIDECAR_UNIT)
    manager.restart(SIDECAR_UNIT)


def manual_restart(system: bool = False) -> None:
    """The 'manual restart' button: clear failed state and budget, start afresh. With tracing on,
    the sidecar's run goes on in the same trace, its next attempt linked to this command."""
    with Systemd(system) as manager:
        mark_manual_restart(system)
        fresh_start(manager)
