"""The library behind `agor-units`, for a Tauri backend or another Python program.

    from agor_systemd.api import install, load_config, read_health

    install(load_config(), now=True)    # -> InstallReport
    read_health()                       # {"status": "restarting", "attempt": 2, "next_retry_s": 1.4}
    with connect() as sidecar:          # the sidecar's stdio (agor-sidecar.socket, docs/socket.md)
        sidecar.send('{"type":"query"}'); print(sidecar.readline())
    with open_store() as btmsg:         # agor's btmsg.db (docs/btmsg.md)
        btmsg.send("manager", "tester-1", "run the suite").delivered   # False: a dead letter

Every error these raise is an AgorError with a one-line message and an exit status.
"""

from agor_systemd.btmsg.store import SendOutcome, Store, open_store
from agor_systemd.btmsg.sweep import health_summary, report, sweep
from agor_systemd.config import Config, ConfigError, load_config
from agor_systemd.errors import AgorError
from agor_systemd.install import (
    InstallError,
    InstallReport,
    install,
    manual_restart,
    uninstall,
)
from agor_systemd.sandbox.check import sandbox_report
from agor_systemd.sidecar.client import LineStream, SocketUnavailable, connect, socket_path
from agor_systemd.sidecar.health import Health, NotInstalled, read_health
from agor_systemd.units import render_units
from agor_systemd.walcheck import CheckpointResult, checkpoint

__all__ = [
    "AgorError",
    "CheckpointResult",
    "Config",
    "ConfigError",
    "Health",
    "InstallError",
    "InstallReport",
    "LineStream",
    "NotInstalled",
    "SendOutcome",
    "SocketUnavailable",
    "Store",
    "checkpoint",
    "connect",
    "health_summary",
    "install",
    "load_config",
    "manual_restart",
    "open_store",
    "read_health",
    "render_units",
    "report",
    "sandbox_report",
    "socket_path",
    "sweep",
    "uninstall",
]
