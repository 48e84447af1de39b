"""What systemd's hardening does to a process, observed from inside it.

The launcher checks at every start that the hardening its unit asks for is in effect (systemd
252 skips some of it silently); the install-time probe unit runs `probe_main` to report the same.
Import-light: only os, since both run inside units on every start.
"""

from __future__ import annotations

import os
import pwd

# what each group does to the process, checked by the probe and by the launcher at run time
EFFECTS = {
    "always": ("umask",),
    "seccomp": ("seccomp",),
    "userns": ("userns",),
    "mounts": ("ro-system", "ro-home"),
}
EFFECT_TEXT = {
    "umask": "umask (UMask=0077)",
    "seccomp": "seccomp (NoNewPrivileges=, SystemCallFilter=)",
    "userns": "userns (PrivateUsers=yes)",
    "ro-system": "ro-system (ProtectSystem=strict)",
    "ro-home": "ro-home (ProtectHome=read-only)",
}

# exit status of the probe program: PROBE_BASE | effect bits (systemd's own codes are 200-245)
PROBE_BASE = 64
EFFECT_BITS = {"umask": 1, "seccomp": 2, "userns": 4, "ro-system": 8, "ro-home": 16}


def _status_fields() -> dict[str, str]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def home_directory() -> str:
    home = os.environ.get("HOME")
    if home:
        return home

    return pwd.getpwuid(os.getuid()).pw_dir


def observed_effects() -> set[str]:
    """Which EFFECT_BITS hold for this process: a few reads of /proc/self and two statvfs."""
    effects = set()
    mask = os.umask(0o077)
    os.umask(mask)
    if mask == 0o077:
        effects.add("umask")
    fields = _status_fields()
    if fields.get("NoNewPrivs") == "1" and fields.get("Seccomp") == "2":
        effects.add("seccomp")
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:  # the initial namespace maps everything
                effects.add("userns")
    except OSError:
        pass
    if _read_only("/"):
        effects.add("ro-system")
    if _read_only(home_directory()):
        effects.add("ro-home")
    return effects


def missing_effects(expected) -> list[str]:
    """The expected effects that do not hold for this process (the launcher's run-time check)."""
    observed = observed_effects()
    return [effect for effect in expected if effect not in observed]


def probe_main() -> None:
    """The probe unit's program: exit PROBE_BASE | bits of what is in effect."""
    bits = sum(EFFECT_BITS[e] for e in observed_effects())
    os._exit(PROBE_BASE | bits)
