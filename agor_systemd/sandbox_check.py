"""agor-sandbox check: what the sidecar's sandbox will be on this machine, before starting it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .config import ConfigError, load_config
from .sandbox import TERMINALS, command_paths, enforcement
from .unitfile import HomePath, Text
from .units import sandbox_paths


def expand(path: Text, home: str) -> str:
    return path.expand(home) if isinstance(path, HomePath) else path


def sandbox_report(config_path: Path | None = None) -> dict:
    """The configured sandbox against this kernel: level, what is missing, paths that don't exist."""
    from . import landlock

    config = load_config(config_path)
    home = str(Path.home())
    read_write, read_only = sandbox_paths(config)
    cap = os.environ.get("AGOR_LANDLOCK_ABI")
    abi = landlock.abi_version(int(cap) if cap and cap.isdigit() else None)
    level, missing = enforcement(abi)
    sandbox = config.sandbox
    paths = {"read_write": [expand(p, home) for p in read_write], "read_only": [expand(p, home) for p in read_only]}
    # what the launcher adds at each start for the command's own files
    paths["command_readable"] = command_paths([expand(w, home) for w in config.sidecar.command],
                                              expand(config.sidecar.working_directory, home), home,
                                              paths["read_write"] + paths["read_only"])
    return {
        "enabled": sandbox.enabled,
        "required": sandbox.required,
        "landlock_abi": abi,
        "level": level if sandbox.enabled else "off",
        "not_enforced": missing if sandbox.enabled else [],
        **paths,
        "terminals": list(TERMINALS),
        "missing_paths": [p for p in paths["read_write"] + paths["read_only"] if not os.path.exists(p)],
        "tcp_connect": "any" if sandbox.tcp_connect is None else list(sandbox.tcp_connect),
        "tcp_bind": list(sandbox.tcp_bind),
        "would_start": not (sandbox.enabled and sandbox.required and abi == 0),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect the Landlock sandbox agor-systemd puts around the sidecar."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="units.toml to use (default: $XDG_CONFIG_HOME/agor/units.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(config_path: Path | None, as_json: bool) -> None:
    """Validate [sandbox] and report what this kernel enforces.

    Exit status: 0 when the sidecar would start (even with a partial or no sandbox, unless
    `required = true`), 1 when it would be refused or the configuration is invalid.
    """
    try:
        report = sandbox_report(config_path)
    except ConfigError as e:
        click.echo(f"agor-sandbox: error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"sandbox: {report['level']} (kernel Landlock ABI {report['landlock_abi']})")
        for item in report["not_enforced"]:
            click.echo(f"  not enforced: {item}")
        click.echo(f"  read-write: {', '.join(report['read_write'])}")
        click.echo(f"  read-only: {', '.join(report['read_only'])}")
        if report["command_readable"]:
            click.echo(f"  read-only for the command: {', '.join(report['command_readable'])}")
        click.echo(f"  TCP connect: {report['tcp_connect']}; TCP bind: {report['tcp_bind'] or 'none'}")
        for path in report["missing_paths"]:
            click.echo(f"  missing (skipped at start): {path}")
        if not report["would_start"]:
            click.echo("refused: [sandbox] required = true, but this kernel has no Landlock", err=True)
    sys.exit(0 if report["would_start"] else 1)


if __name__ == "__main__":
    main()
