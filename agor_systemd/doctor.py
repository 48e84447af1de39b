"""`agor-units doctor`: what this machine's systemd can do for agor, and how to fix what's missing."""

from __future__ import annotations

import getpass
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from agor_systemd import __version__
from agor_systemd.config import DEFAULT_COMMAND, Config, expand_home
from agor_systemd.install import (
    InstallError,
    check_environment_file,
    current_launcher,
    digest,
    installed_docs,
    manifest_version,
    missing_sidecar_files,
    read_manifest,
    start_path_problems,
    unit_directory,
)
from agor_systemd.manager import BusError, Systemd, installed_systemd_version
from agor_systemd.sandbox.check import broad_write_warnings
from agor_systemd.sandbox.enforce import enforcement
from agor_systemd.sandbox.hardening import probe
from agor_systemd.sandbox.landlock import abi_version
from agor_systemd.sidecar.units import NATIVE_BACKOFF_VERSION, uses_native_backoff
from agor_systemd.tracing import SDK_MISSING, traces_url
from agor_systemd.units import render_units

# version → what it gates for agor-systemd
FEATURES = [
    (243, "ExecStart ':' prefix (argv passed verbatim, no $VAR expansion) — required"),
    (
        NATIVE_BACKOFF_VERSION,
        "RestartSteps=/RestartMaxDelaySec=/RestartUSecNext (native backoff; older: launcher fallback)",
    ),
    (255, "start rate limiter survives daemon-reload"),
    (258, "RESTART_RESET=1 notify message"),
]
MINIMUM_VERSION = 243


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "error"
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _probe_hardening(manager, config: Config, version: int, system: bool):
    """The install probe: which systemd hardening groups take effect on this manager."""

    try:
        probed = probe(manager, config, version, system)
    except BusError as e:
        return None, Check("systemd hardening", "warn", f"cannot probe: {e}")
    detail = f"in effect here: {', '.join(probed.applied) or 'none'}"
    if probed.left_out:
        detail += "; left out: " + "; ".join(f"{g}: {why}" for g, why in probed.left_out.items())
    return probed, Check(
        "systemd hardening",
        "warn" if probed.left_out else "ok",
        detail,
        "nothing to do if Landlock is on (it confines the sidecar's files alone); see docs/sandbox.md"
        if probed.left_out
        else "",
    )


def run_checks(config: Config, system: bool = False) -> list[Check]:
    checks: list[Check] = []
    installed = installed_systemd_version()
    checks.append(
        Check(
            "systemd installed",
            "ok" if installed else "error",
            f"systemd {installed}" if installed else "systemctl not found",
            "" if installed else "apt-get install systemd",
        )
    )
    version = None
    probed = None
    user = getpass.getuser()
    try:
        with Systemd(system) as manager:
            version = manager.version()
            probed, hardening_check = _probe_hardening(manager, config, version, system)
        checks.append(Check("manager reachable", "ok", f"{'system' if system else 'user'} manager, systemd {version}"))
        checks.append(hardening_check)
    except BusError as e:
        fix = "log in graphically or run `sudo loginctl enable-linger " + user + "`, then check $XDG_RUNTIME_DIR"
        # the message's pointer to this very command helps nobody here
        checks.append(
            Check("manager reachable", "error", str(e).removesuffix("; see `agor-units doctor`"), "" if system else fix)
        )

    running = version or installed
    if running:
        if running < MINIMUM_VERSION:
            checks.append(
                Check(
                    "systemd version", "error", f"systemd {running} is older than {MINIMUM_VERSION}", "upgrade systemd"
                )
            )
        for gate, feature in FEATURES:
            checks.append(Check(f"systemd ≥ {gate}", "ok" if running >= gate else "warn", feature))
        mode = "native" if uses_native_backoff(config, running) else "launcher fallback"
        checks.append(Check("restart backoff", "ok", f"{mode} for the configured schedule"))

    if not system:
        linger = Path("/var/lib/systemd/linger") / user
        checks.append(
            Check(
                "lingering",
                "ok" if linger.exists() else "warn",
                "user manager runs without a login session"
                if linger.exists()
                else "the sidecar stops when you log out",
                "" if linger.exists() else f"sudo loginctl enable-linger {user}",
            )
        )

    if config.sandbox.enabled:
        abi = abi_version()
        level, missing = enforcement(abi)
        refused = level == "none" and config.sandbox.required
        checks.append(
            Check(
                "sandbox",
                "ok" if level == "full" else "error" if refused else "warn",
                f"Landlock ABI {abi}: {level}" + (f"; not enforced: {', '.join(missing)}" if missing else ""),
                "" if level == "full" else "a kernel ≥ 6.7 with landlock in the lsm= list enforces everything",
            )
        )
        checks += _broad_write_paths(config)
    else:
        checks.append(
            Check("sandbox", "warn", "off ([sandbox] enabled = false)", "remove `enabled = false` from [sandbox]")
        )

    import ctypes.util  # import cost: ~12 ms, and agor-units imports this module for every command

    lib = ctypes.util.find_library("systemd")
    checks.append(
        Check(
            "libsystemd",
            "ok" if lib else "error",
            lib or "libsystemd.so.0 not found (the launcher needs it)",
            "" if lib else "apt-get install libsystemd0",
        )
    )

    checks.append(_sidecar_program(config))
    if config.sidecar.environment_file is not None:
        try:
            check_environment_file(config)
            checks.append(Check("environment file", "ok", "every line is an assignment systemd applies"))
        except InstallError as e:
            checks.append(Check("environment file", "error", str(e), "fix that line (NAME=value)"))

    missing = start_path_problems(config)
    checks.append(
        Check(
            "sidecar paths",
            "error" if missing else "ok",
            "; ".join(missing) or "working directory and environment file exist",
            "create it or change [sidecar] in ~/.config/agor/units.toml" if missing else "",
        )
    )

    directory = unit_directory(system)
    try:
        manifest = read_manifest(directory)
    except InstallError as e:
        checks.append(Check("units installed", "error", str(e), f"rm {directory / '.agor-units.json'}"))
        return checks
    if manifest:
        checks.append(generator_check(manifest_version(directory), __version__))
    if version is None:
        # what install would write depends on the manager's probe: without it, only what is there
        installed_units = ", ".join(sorted(manifest)) or "none"
        checks.append(
            Check(
                "units installed",
                "warn",
                f"{installed_units}; not compared with the configuration (the manager is unreachable)",
                "reach the manager, then run this again",
            )
        )
    else:
        wanted = render_units(
            config,
            version,
            current_launcher(),
            system,
            set(probed.applied) if probed is not None else None,
            installed_docs(),
        )
        stale = [name for name, text in wanted.items() if manifest.get(name) != digest(text)]
        checks.append(
            Check(
                "units installed",
                "warn" if stale else "ok",
                f"not installed or out of date: {', '.join(stale)}" if stale else f"up to date in {directory}",
                "agor-units install --now" if stale else "",
            )
        )
    checks.append(_telemetry(config))
    return checks


def version_key(version: str) -> tuple[int, ...]:
    """'0.1.0' → (0, 1, 0); a suffix such as '+deb1' or 'rc1' ends the numbers."""
    numbers = []
    for part in version.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers)


def generator_check(written: str | None, installed: str) -> Check:
    """Units written by another agor-systemd than the installed one (an upgrade since install):
    the running sidecar keeps the launcher it started with until its next start."""
    name, fix = "units generator", "agor-units install --now"
    if written == installed:
        return Check(name, "ok", f"units written by this agor-systemd ({installed})")
    if written is None:
        return Check(
            name,
            "warn",
            f"units written by an older agor-systemd (the manifest names no version; this is {installed})",
            fix,
        )
    if version_key(written) > version_key(installed):
        return Check(name, "warn", f"units written by agor-systemd {written}, newer than this {installed}", fix)
    return Check(
        name,
        "warn",
        f"units written by agor-systemd {written}, older than the installed {installed}; "
        "the running sidecar keeps the old code until it restarts",
        fix,
    )


def _telemetry(config: Config) -> Check:
    """Whether the units send traces, and whether they can (the SDK is an optional extra)."""
    endpoint = config.telemetry.otlp_endpoint
    if not endpoint:
        return Check("telemetry", "ok", "off (set [telemetry] otlp_endpoint, or AGOR_OTLP_ENDPOINT when installing)")
    url = traces_url(endpoint)
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        return Check("telemetry", "warn", f"on ({url}), but {SDK_MISSING}", "pip install 'agor-systemd[otel]'")
    return Check("telemetry", "ok", f"on: spans go to {url}")


def _sidecar_program(config: Config) -> Check:
    command, home = config.sidecar.command, str(Path.home())
    missing = missing_sidecar_files(command, home)
    if missing:
        placeholder = " (of the placeholder default command)" if tuple(command) == DEFAULT_COMMAND else ""
        return Check(
            "sidecar program",
            "error",
            f"missing{placeholder}: {', '.join(missing)}",
            "set [sidecar] command in ~/.config/agor/units.toml",
        )
    return Check("sidecar program", "ok", expand_home(command[0], home))


def _broad_write_paths(config: Config) -> list[Check]:
    return [
        Check("sandbox paths", "warn", warning, "list only the project directories in read_write_paths")
        for warning in broad_write_warnings(config, str(Path.home()))
    ]
