"""What a sidecar unit's give-up leaves behind, for the launcher and for every program that starts
a sidecar unit again (agor-units for agor-sidecar.service, the relay for its sessions' instances).

Import-light: the launcher, which systemd starts on every restart, imports it.
"""

from __future__ import annotations

# The launcher exits with this status after the last allowed crash; the unit lists it in
# RestartPreventExitStatus=, so the unit goes `failed` at once instead of after one more
# holdoff. 250 is outside the ranges used by shells (126–165) and systemd (200–245).
GAVE_UP_STATUS = 250

# in the manager's environment while a sidecar with a socket is given up (docs/socket.md)
GAVE_UP_ENV = "AGOR_SIDECAR_GAVE_UP"


def gave_up_variable(unit: str) -> str:
    """The given-up mark of `unit`: GAVE_UP_ENV for agor-sidecar.service; each instance of a
    template (the relay's per-session agor-relay-sidecar@ID.service) has one of its own, so one's
    give-up never stops another."""
    _, at, instance = unit.rpartition(".")[0].partition("@")
    if not at:
        return GAVE_UP_ENV
    return GAVE_UP_ENV + "_" + "".join(c if c.isascii() and c.isalnum() else "_" for c in instance).upper()
