"""Write, reload, enable and start the units; remove exactly what was written."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import AGOR_DATA, Config, config_home
from .protocol import SIDECAR_UNIT
from .unitfile import HomePath
from .units import render_units

MANIFEST = ".agor-units.json"  # in the unit directory; systemd ignores files without a unit suffix


class InstallError(RuntimeError):
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

    def as_dict(self) -> dict:
        return {"directory": str(self.directory), "systemd_version": self.systemd_version,
                "written": self.written, "unchanged": self.unchanged, "removed": self.removed, "kept": self.kept,
                "actions": self.actions, "dry_run": self.dry_run, "hardening": self.hardening,
                "left_out": self.left_out}


def unit_directory(system: bool = False) -> Path:
    return Path("/etc/systemd/system") if system else config_home() / "systemd" / "user"


def current_launcher() -> list[str]:
    """Start the launcher with this very interpreter and this very copy of the package."""
    return [sys.executable, "-I", "-S", str(Path(__file__).resolve().parent / "_launch.py")]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory and rename: never a half-written unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: Path) -> dict[str, str]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InstallError(f"{directory / MANIFEST}: unreadable ({e}); remove it to start over") from None
    return {str(k): str(v) for k, v in data.get("units", {}).items()}


def check_sidecar(config: Config) -> None:
    """The program must exist now: a unit that can only crash-loop helps nobody."""
    program = config.sidecar.command[0]
    path = program.expand(str(Path.home())) if isinstance(program, HomePath) else program
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise InstallError(f"sidecar program {path!r} does not exist or is not executable; "
                           "set [sidecar] command in units.toml or pass it after `--`")


def start_path_problems(config: Config) -> list[str]:
    """A working directory or environment file that is missing now: the sidecar could not start.
    (One removed later is caught by the launcher at each start, as a failed attempt.)"""
    home = str(Path.home())
    sidecar = config.sidecar
    problems = []
    directory = sidecar.working_directory
    directory_path = directory.expand(home) if isinstance(directory, HomePath) else directory
    if not os.path.isdir(directory_path):
        problems.append(f"working directory {directory_path!r} ([sidecar] working_directory) does not exist")
    if sidecar.environment_file is not None:
        env = sidecar.environment_file
        env_path = env.expand(home) if isinstance(env, HomePath) else env
        if not os.path.isfile(env_path) or not os.access(env_path, os.R_OK):
            problems.append(f"environment file {env_path!r} ([sidecar] environment_file) does not exist "
                            "or is not readable")
    return problems


def check_start_paths(config: Config) -> None:
    problems = start_path_problems(config)
    if problems:
        raise InstallError("; ".join(problems) + "; create it or change the setting")


def write_units(directory: Path, units: dict[str, str], report: InstallReport) -> None:
    manifest = read_manifest(directory)
    for name, text in units.items():
        path = directory / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        except (OSError, UnicodeDecodeError) as e:
            raise InstallError(f"{path}: cannot read ({e})") from None
        if current is not None and name not in manifest and current != text:
            raise InstallError(f"{path} exists and was not written by agor-units; move it away first")
        if current == text:
            report.unchanged.append(name)
        else:
            report.written.append(name)
            if not report.dry_run:
                atomic_write(path, text)
        manifest[name] = digest(text)
    if not report.dry_run and report.written:
        atomic_write(directory / MANIFEST, json.dumps({"units": manifest}, indent=2, sort_keys=True) + "\n")


def install(config: Config, *, system: bool = False, output: Path | None = None, now: bool = False,
            dry_run: bool = False, systemd_version: int | None = None) -> InstallReport:
    """Render the units for the running manager (or `systemd_version` for --output) and install them."""
    from .bus import Systemd, installed_systemd_version

    if output is not None:
        version = systemd_version or installed_systemd_version()
        if version is None:
            raise InstallError("cannot tell the systemd version; pass --systemd-version")
        report = InstallReport(output, version, dry_run=dry_run)
        # packagers: every group the version supports, unprobed; the launcher checks at run time
        from .hardening import version_gaps, wanted_groups

        report.hardening, report.left_out = list(wanted_groups(version, None, system)), version_gaps(version, system)
        write_units(output, render_units(config, version, current_launcher(), system), report)
        return report

    check_sidecar(config)
    check_start_paths(config)
    directory = unit_directory(system)
    with Systemd(system) as manager:
        version = systemd_version or manager.version()
        report = InstallReport(directory, version, dry_run=dry_run)
        # only the systemd hardening that takes effect on this manager: never a unit that cannot start
        from .hardening import probe

        probed = probe(manager, config, version, system)
        report.hardening, report.left_out = list(probed.applied), probed.left_out
        units = render_units(config, version, current_launcher(), system, set(probed.applied))
        write_units(directory, units, report)
        if dry_run:
            return report
        # the sandbox lets the sidecar write its databases here, but not create the directory
        (Path.home() / AGOR_DATA).mkdir(mode=0o700, parents=True, exist_ok=True)
        manager.reload()
        manager.enable([str(directory / name) for name in units])
        report.actions += ["daemon-reload", "enable " + " ".join(units)]
        if now:
            # a fresh start with a full restart budget, running the units just written
            manager.reset_failed(SIDECAR_UNIT)
            manager.restart(SIDECAR_UNIT)
            report.actions.append(f"restart {SIDECAR_UNIT}")
            from .walcheck_units import WALCHECK_TIMER
            manager.restart(WALCHECK_TIMER)  # (re)arms it with the timer just written
            report.actions.append(f"restart {WALCHECK_TIMER}")
    return report


def uninstall(*, system: bool = False, dry_run: bool = False) -> InstallReport:
    """Stop, disable and delete the units install wrote; a unit edited since is kept and reported."""
    from .bus import BusError, Systemd

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
        for name in names:
            try:
                manager.stop(name)
            except BusError:
                pass  # not loaded: nothing to stop
        manager.disable(names)
        for name in report.removed:
            (directory / name).unlink()
        if report.kept:
            atomic_write(directory / MANIFEST, json.dumps({"units": {n: manifest[n] for n in report.kept}},
                                                          indent=2, sort_keys=True) + "\n")
        else:
            (directory / MANIFEST).unlink(missing_ok=True)
        manager.reload()
        for name in report.removed:
            manager.reset_failed(name)
        report.actions += ["stop", "disable", "daemon-reload"]
    return report


def manual_restart(system: bool = False) -> None:
    """The 'manual restart' button: clear failed state and budget, start afresh."""
    from .bus import Systemd

    with Systemd(system) as manager:
        manager.reset_failed(SIDECAR_UNIT)
        manager.restart(SIDECAR_UNIT)
