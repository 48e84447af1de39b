"""Every unit `agor-units install` writes, composed from each capability's own units (pure).

`python -m agor_systemd.units [DIR]` regenerates the reference units in units/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agor_systemd.btmsg.units import sweep_units
from agor_systemd.config import Config
from agor_systemd.relay.units import RELAY_SIDECAR_SOCKET_PATH, relay_unit
from agor_systemd.sidecar.units import (
    NATIVE_BACKOFF_VERSION,
    PACKAGED_LAUNCHER,
    RESTART_RESET_VERSION,
    SidecarNames,
    sidecar_socket,
    sidecar_unit,
)
from agor_systemd.unitfile import PACKAGED_DOCS, Specifier, UnitFile
from agor_systemd.walcheck.units import walcheck_units

# A session's sidecar: an instance (the session's id) of this template pair, rendered from the
# same settings and code as agor-sidecar.service and .socket, so it has their launcher, sandbox,
# hardening and restart schedule, and it outlives the relay's process.
RELAY_SIDECAR = SidecarNames(
    service="agor-relay-sidecar@.service",
    socket="agor-relay-sidecar@.socket",
    socket_path=RELAY_SIDECAR_SOCKET_PATH,
    launcher_unit=Specifier("n"),
    identifier="agor-relay-sidecar",
    description="agor relay session %i's sidecar, supervised by systemd",
    socket_description="agor relay session %i's sidecar stdin and stdout",
    socket_of_service="agor-relay-sidecar@%i.socket",
    service_of_socket="agor-relay-sidecar@%i.service",
    installed=False,
)


def relay_sidecar_units(
    config: Config,
    systemd_version: int,
    launcher: Sequence[str] = PACKAGED_LAUNCHER,
    hardening: set[str] | frozenset[str] | None = None,
    docs: str | None = PACKAGED_DOCS,
) -> list[UnitFile]:
    """agor-relay-sidecar@.service and .socket (none while [relay] is off): agor-sidecar's units for
    `[relay] sidecar_command` (else `[sidecar] command`), one instance per session."""
    if not config.relay.enabled:
        return []
    command = config.relay.sidecar_command or config.sidecar.command
    config = dataclasses.replace(
        config,
        sidecar=dataclasses.replace(config.sidecar, command=command),
        socket=dataclasses.replace(config.socket, enabled=True),
    )
    service = sidecar_unit(config, systemd_version, launcher, False, hardening, docs, names=RELAY_SIDECAR)
    socket = sidecar_socket(config, docs, names=RELAY_SIDECAR)
    assert socket is not None  # the socket is enabled above: it is how the relay talks to the sidecar
    return [service, socket]


def render_units(
    config: Config,
    systemd_version: int,
    launcher: Sequence[str] = PACKAGED_LAUNCHER,
    system: bool = False,
    hardening: set[str] | frozenset[str] | None = None,
    docs: str | None = PACKAGED_DOCS,
) -> dict[str, str]:
    """Unit name → file text for everything `agor-units install` writes."""
    units = [sidecar_unit(config, systemd_version, launcher, system, hardening, docs)]
    if (socket := sidecar_socket(config, docs)) is not None:
        units.append(socket)
    units += walcheck_units(config, [launcher[0], "-I"], docs)
    units += sweep_units(config, [launcher[0], "-I"], docs)
    if (relay := relay_unit(config, [launcher[0], "-I"], docs, systemd_version, hardening)) is not None:
        units.append(relay)
        units += relay_sidecar_units(config, systemd_version, launcher, hardening, docs)
    return {unit.name: unit.render() for unit in units}


# units/ in the repository: the default config rendered for each backoff mode,
# and the first version that takes RESTART_RESET=1 from the launcher
REFERENCE_VERSIONS = {"native": NATIVE_BACKOFF_VERSION, "fallback": 252, "258": RESTART_RESET_VERSION}


def reference_units() -> dict[str, str]:
    """Relative path under units/ → text, e.g. 'native/agor-sidecar.service'."""
    return {
        f"{mode}/{name}": text
        for mode, version in REFERENCE_VERSIONS.items()
        for name, text in render_units(Config(), version).items()
    }


if __name__ == "__main__":  # python -m agor_systemd.units [DIR]: regenerate units/
    import sys
    from pathlib import Path

    from agor_systemd.files import atomic_write

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "units")
    for relative, text in reference_units().items():
        atomic_write(root / relative, text)
        print(root / relative)
