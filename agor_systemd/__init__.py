"""agor-systemd: supervise agor's sidecar with systemd user units."""

__version__ = "0.1.0"
