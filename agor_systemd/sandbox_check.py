"""agor-sandbox check: what the sidecar's sandbox will be on this machine, before starting it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .cli import OneLineUsageGroup, chosen_config_path, config_path_option
from .config import Config, ConfigError, load_config
from .sandbox import TERMINALS, command_paths, enforcement
from .unitfile import HomePath, Text
from .units import sandbox_paths


def expand(path: Text, home: str) -> str:
    return path.expand(home) if isinstance(path, HomePath) else path


def broad_write_paths(read_write: list[str], home: str) -> list[str]:
    """Read-write paths that contain the home directory (`/`, `/home`, the home itself): with
    one of them the sandbox keeps nothing in the home directory, ~/.ssh included, from writes."""
    home = os.path.normpath(home)
    return [path for path in read_write
            if home == os.path.normpath(path) or home.startswith(os.path.normpath(path).rstrip("/") + "/")]


def broad_write_warnings(config: Config, home: str) -> list[str]:
    """A warning per configured read-write path that holds the home directory (the defaults are
    deliberate and do not)."""
    configured = [expand(p, home) for p in config.sandbox.read_write_paths]
    return [f"read-write {path} holds the home directory: nothing there, ~/.ssh included, is kept from writes"
            for path in broad_write_paths(configured, home)]


def port_list(ports: list[int] | str) -> str:
    """`any`, `none` or `80, 443` (an empty list means no port at all)."""
    return ports if isinstance(ports, str) else ", ".join(map(str, ports)) or "none"


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
        "warnings": broad_write_warnings(config, home) if sandbox.enabled else [],
    }


@click.group(cls=OneLineUsageGroup, prog="agor-sandbox", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="units.toml to use (default: $XDG_CONFIG_HOME/agor/units.toml); "
                   "may also go after the command.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Inspect the Landlock sandbox agor-systemd puts around the sidecar."""
    ctx.obj = {"config_path": config_path}


@main.command()
@config_path_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx: click.Context, command_config_path: Path | None, as_json: bool) -> None:
    """Validate [sandbox] and report what this kernel enforces.

    Exit status: 0 when the sidecar would start (even with a partial or no sandbox, unless
    `required = true`), 1 when it would be refused or the configuration is invalid.
    """
    try:
        report = sandbox_report(chosen_config_path(ctx, command_config_path))
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
        click.echo(f"  TCP connect: {port_list(report['tcp_connect'])}; TCP bind: {port_list(report['tcp_bind'])}")
        for path in report["missing_paths"]:
            click.echo(f"  missing (skipped at start): {path}")
        for warning in report["warnings"]:
            click.echo(f"warning: {warning}", err=True)
        if not report["would_start"]:
            click.echo("refused: [sandbox] required = true, but this kernel has no Landlock", err=True)
    sys.exit(0 if report["would_start"] else 1)


if __name__ == "__main__":
    main()
