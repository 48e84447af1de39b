"""systemd's own hardening for agor-sidecar.service, in groups the install-time probe can drop.

The sidecar runs agents that start git, node, python and shells and use the network, so the
set is what does not get in their way (docs/sandbox.md, "systemd hardening"):

* ``always``  — UMask=0077, KeyringMode=private: plain process attributes, nothing can refuse them;
* ``seccomp`` — NoNewPrivileges=, SystemCallFilter=@system-service plus the Landlock syscalls
  (the launcher needs them), RestrictAddressFamilies=, RestrictNamespaces=, ...: seccomp filters,
  which every user manager applies;
* ``userns``  — PrivateUsers=yes and an empty CapabilityBoundingSet= (dropping the bounding set
  needs the capabilities a user namespace gives; without one it fails with 218/CAPABILITIES);
* ``mounts``  — ProtectSystem=strict, ProtectHome=read-only, ReadWritePaths= mirroring the
  Landlock read-write table, ProtectKernel*=, ProtectClock=, ... : a mount namespace, which a
  user manager can only set up inside a user namespace, so it needs ``userns`` (and
  ProtectKernelModules/Logs=, ProtectClock= also drop capabilities: 218/CAPABILITIES without it).

Left out on purpose: MemoryDenyWriteExecute= (node's JIT maps W+X memory), PrivateTmp= (agents
share /tmp with the user's own tools), PrivateDevices= (its /dev has no usable pty in a user
namespace: openpty fails, and shells need ptys), PrivateNetwork=/IPAddressDeny= (agents reach the
network; the BPF firewall is not enforced in user managers anyway), ProtectProc=/ProcSubset=
(system-only, and node reads /proc/cpuinfo), SystemCallFilter=~@privileged/@resources (ulimit,
nice, chown in tar/npm).

Namespace directives fail the unit with 226/NAMESPACE where the host refuses user namespaces,
and systemd 252/253 user managers skip them silently without PrivateUsers=yes. So install probes
the user's manager with a transient unit per group and keeps what *took effect*
(:func:`probe`), and the launcher re-checks at every start (:func:`missing_effects`).

Import-light: the launcher imports this module (only ``os`` at the top).
"""

from __future__ import annotations

import errno
import os
import sys
import time

from agor_systemd.config import expand_home
from agor_systemd.sandbox.effects import (
    EFFECT_BITS,
    EFFECT_TEXT,
    EFFECTS,
    PROBE_BASE,
    home_directory,
)
from agor_systemd.sandbox.policy import sandbox_paths
from agor_systemd.unitfile import path_value

GROUPS = ("always", "seccomp", "userns", "mounts")
# a group that cannot work without another one (a mount namespace needs a user namespace here)
REQUIRES = {"mounts": ("userns",)}

SANDBOX_GROUP_VERSION = 254  # SystemCallFilter=@sandbox (landlock_*, seccomp)
LANDLOCK_SYSCALLS = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")
USER_MOUNTS_VERSION = 251  # namespace options in unprivileged user managers (with PrivateUsers=yes)
# the oldest version that knows each key; older managers would warn "Unknown key" and ignore it
KEY_VERSION = {"ProtectKernelLogs": 244, "ProtectClock": 245}
# devices, /proc and /sys stay writable under ProtectSystem=strict (other options cover them)
API_FILESYSTEMS = ("/dev", "/proc", "/sys")

EXIT_STEPS = {  # systemd's EXIT_* codes a failed exec step leaves in ExecMainStatus
    203: "EXEC",
    214: "SETSCHEDULER",
    217: "USER",
    218: "CAPABILITIES",
    226: "NAMESPACE",
    228: "SECCOMP",
    231: "SMACK",
    233: "PERSONALITY",
    237: "KEYRING",
    243: "CREDENTIALS",
}


# -- the directives ------------------------------------------------------------------------------


def version_gaps(systemd_version: int, system: bool = False) -> dict[str, str]:
    """Groups this version cannot apply at all, with the reason."""
    if not system and systemd_version < USER_MOUNTS_VERSION:
        return {
            "mounts": f"systemd {systemd_version} cannot set up mount namespaces in user managers "
            f"(needs ≥ {USER_MOUNTS_VERSION})"
        }
    return {}


def wanted_groups(
    systemd_version: int, available: set[str] | frozenset[str] | None = None, system: bool = False
) -> tuple[str, ...]:
    """The groups to emit, in GROUPS order: `available` (None: all) minus what the version or a
    missing required group rules out."""
    gaps = version_gaps(systemd_version, system)
    groups = [g for g in GROUPS if (available is None or g in available) and g not in gaps]
    return tuple(g for g in groups if all(r in groups for r in REQUIRES.get(g, ())))


def _quoted_path(value, what: str) -> str:
    """One word of a space-separated path list (ReadWritePaths=): systemd unquotes and
    C-unescapes each word, then expands specifiers, so path_value's %h/%% survive the quotes;
    the '-' prefix (a missing path is not an error) goes inside them."""
    text = path_value(value, what)
    return '"-' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under(path, roots: tuple[str, ...]) -> bool:
    return isinstance(path, str) and any(path == r or path.startswith(r + "/") for r in roots)


def read_write_paths(config) -> list:
    """The Landlock read-write table without device files and API filesystems (strict keeps
    /dev, /proc and /sys writable; their own options protect them)."""
    seen, paths = set(), []
    for path in sandbox_paths(config)[0]:
        if not _under(path, API_FILESYSTEMS) and str(path) not in seen:
            seen.add(str(path))
            paths.append(path)
    return paths


def _table(config, systemd_version: int, system: bool) -> list[tuple[str, str, str, tuple]]:
    """(group, key, unit-file value, D-Bus (signature, value or callable(home))) for every
    directive of every group; the unit file and the probe use the same table."""
    filters = ["@system-service"]
    if systemd_version >= SANDBOX_GROUP_VERSION:
        filters.append("@sandbox")
    else:
        filters += LANDLOCK_SYSCALLS
    families = ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]  # netlink: getifaddrs, AI_ADDRCONFIG
    rw = read_write_paths(config)

    def rw_bus(home: str) -> list[str]:
        return ["-" + expand_home(p, home) for p in rw]

    rows = [
        ("always", "UMask", "0077", ("u", 0o077)),
        ("always", "KeyringMode", "private", ("s", "private")),
        ("seccomp", "NoNewPrivileges", "yes", ("b", True)),
        ("seccomp", "SystemCallFilter", " ".join(filters), ("(bas)", (True, filters))),
        ("seccomp", "SystemCallErrorNumber", "EPERM", ("i", errno.EPERM)),
        ("seccomp", "SystemCallArchitectures", "native", ("as", ["native"])),
        ("seccomp", "RestrictAddressFamilies", " ".join(families), ("(bas)", (True, families))),
        ("seccomp", "RestrictNamespaces", "yes", ("t", 0)),
        ("seccomp", "LockPersonality", "yes", ("b", True)),
        ("seccomp", "RestrictRealtime", "yes", ("b", True)),
        ("seccomp", "RestrictSUIDSGID", "yes", ("b", True)),
        # explicit: 252/253 user managers skip every namespace option silently without it;
        # 254+ implies it, and saying it keeps one unit text meaning the same everywhere
        ("userns", "PrivateUsers", "yes", ("b", True)),
        ("userns", "CapabilityBoundingSet", "", ("t", 0)),
        ("mounts", "ProtectSystem", "strict", ("s", "strict")),
        ("mounts", "ProtectHome", "read-only", ("s", "read-only")),
    ]
    if rw:
        rows.append(
            (
                "mounts",
                "ReadWritePaths",
                " ".join(_quoted_path(p, "[sandbox] read_write_paths entry") for p in rw),
                ("as", rw_bus),
            )
        )
    for key in (
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectClock",
        "ProtectHostname",
        "ProtectControlGroups",
    ):
        if systemd_version >= KEY_VERSION.get(key, 0):
            rows.append(("mounts", key, "yes", ("b", True)))
    return rows


def hardening_directives(
    config, systemd_version: int, available: set[str] | frozenset[str] | None = None, system: bool = False
) -> list[tuple[str, str, str]]:
    """(section, key, encoded value) for the groups in `available` (None: all groups)."""
    groups = wanted_groups(systemd_version, available, system)
    return [
        ("Service", key, text) for group, key, text, _ in _table(config, systemd_version, system) if group in groups
    ]


def bus_properties(
    config, systemd_version: int, groups, home: str, system: bool = False
) -> list[tuple[str, str, object]]:
    """The same directives as transient-unit properties (name, D-Bus signature, value), with
    the home directory expanded (specifiers mean nothing over D-Bus)."""
    props = []
    for group, key, _, (signature, value) in _table(config, systemd_version, system):
        if group in groups:
            props.append((key, signature, value(home) if callable(value) else value))
    return props


def expected_effects(groups) -> tuple[str, ...]:
    return tuple(effect for group in GROUPS if group in groups for effect in EFFECTS[group])


# -- the probe -----------------------------------------------------------------------------------


class ProbeResult:
    def __init__(self, applied: tuple[str, ...], left_out: dict[str, str], seconds: float) -> None:
        self.applied = applied
        self.left_out = left_out
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"ProbeResult(applied={self.applied!r}, left_out={self.left_out!r})"


def _probe_command() -> list[str]:
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agor_systemd.sandbox.effects import probe_main; probe_main()"
    )
    return [sys.executable, "-I", "-S", "-c", code, package_parent]


def _failure_reason(outcome: dict, groups) -> str:
    """Why a probe unit did not show the effects of `groups`."""
    if outcome.get("error"):
        return f"refused by the manager: {outcome['error']}"
    status = outcome.get("status")
    if outcome.get("code") == 1 and status in EXIT_STEPS:  # CLD_EXITED with systemd's step code
        step = EXIT_STEPS[status]
        if step == "NAMESPACE":
            return (
                f"the unit failed with {status}/NAMESPACE: the manager could not set up the namespace "
                "(unprivileged user namespaces restricted, e.g. by AppArmor on Ubuntu ≥ 23.10, or "
                "/run/systemd/mount-rootfs or unit-root missing, which PID 1 creates)"
            )
        return f"the unit failed with {status}/{step}"
    if outcome.get("code") == 1 and isinstance(status, int) and (status & ~0x1F) == PROBE_BASE:
        missing = [e for e in expected_effects(groups) if not status & EFFECT_BITS[e]]
        return (
            "accepted but not in effect ("
            + ", ".join(EFFECT_TEXT[e] for e in missing)
            + "): the manager skipped it silently, no usable user namespace"
        )
    return f"the probe unit ended unexpectedly ({outcome.get('result') or 'no result'}, status {status})"


def _passed(outcome: dict, groups) -> bool:
    status = outcome.get("status")
    if outcome.get("error") or outcome.get("code") != 1 or not isinstance(status, int):
        return False
    if (status & ~0x1F) != PROBE_BASE:
        return False
    return all(status & EFFECT_BITS[e] for e in expected_effects(groups))


def probe(manager, config, systemd_version: int, system: bool = False, timeout_s: float = 5.0) -> ProbeResult:
    """Which hardening groups take effect on `manager` (a bus.Systemd), and why others do not.

    Round 1 runs one transient unit with every candidate group; when all effects show, that is
    the answer (the usual case: one unit, ~0.1 s). Otherwise round 2 runs one unit per group
    (mounts together with what it requires) in parallel, and round 3 checks the surviving
    combination once more.
    """
    started = time.monotonic()
    left_out = dict(version_gaps(systemd_version, system))
    candidates = wanted_groups(systemd_version, None, system)
    home = home_directory()
    command = _probe_command()

    def run(sets: list[tuple[str, ...]]) -> list[dict]:
        return manager.run_probes(
            [bus_properties(config, systemd_version, groups, home, system) for groups in sets],
            command,
            success_statuses=list(range(PROBE_BASE, PROBE_BASE + 32)),
            timeout_s=timeout_s,
        )

    outcome = run([candidates])[0]
    if _passed(outcome, candidates):
        return ProbeResult(candidates, left_out, time.monotonic() - started)

    singles = [g for g in candidates if g not in REQUIRES]
    sets = [(g,) for g in singles] + [tuple(r for r in REQUIRES[g]) + (g,) for g in candidates if g in REQUIRES]
    working: list[str] = []
    for groups, result in zip(sets, run(sets)):
        group = groups[-1]
        if _passed(result, groups):
            working.append(group)
        elif any(r in left_out for r in REQUIRES.get(group, ())):
            left_out[group] = "needs " + ", ".join(r for r in REQUIRES[group] if r in left_out) + ", left out"
        else:
            left_out[group] = _failure_reason(result, groups)
    applied = wanted_groups(systemd_version, set(working), system)
    for group in working:
        if group not in applied and group not in left_out:
            left_out[group] = "needs " + ", ".join(r for r in REQUIRES.get(group, ()) if r not in applied)
    if applied and applied != candidates:
        outcome = run([applied])[0]
        if not _passed(outcome, applied):  # each works alone but not together: keep the safe part
            reason = _failure_reason(outcome, applied)
            for group in applied:
                if group != "always":
                    left_out[group] = f"works alone, not combined with the rest: {reason}"
            applied = tuple(g for g in applied if g == "always")
    return ProbeResult(applied, {g: left_out[g] for g in GROUPS if g in left_out}, time.monotonic() - started)
