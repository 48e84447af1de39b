"""The docs that restate code, generated from it (tests/test_docs.py fails when they drift).

    docs/settings.md   every units.toml setting, from config.SETTINGS
    docs/cli.md        every --help of agor-units, agor-sandbox, agor-walcheck, btmsg and agor-relay

`python -m agor_systemd.docs [DIR]` rewrites them under DIR (default: the current directory, the
repository's root).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from agor_systemd.btmsg.cli import argument_parser as btmsg_parser
from agor_systemd.cli import main as units_main
from agor_systemd.cli import sandbox_main
from agor_systemd.config import SETTINGS, TABLES, Setting
from agor_systemd.files import atomic_write
from agor_systemd.relay.program import argument_parser as relay_parser
from agor_systemd.relay.program import subcommand_parsers
from agor_systemd.unitfile import HomePath
from agor_systemd.walcheck import argument_parser as walcheck_parser

# wide enough for the option tables, narrow enough to read in a diff; fixed so that the output
# does not depend on the terminal that regenerates it
HELP_WIDTH = 100


def generated_notice(source: str) -> str:
    return f"<!-- Generated from {source} by `python -m agor_systemd.docs`; edit that, not this file. -->"


def number_text(value: float) -> str:
    """2592000, not :g's 2.592e+06."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def toml_text(value: Any) -> str:
    """A default as it would be written in units.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return number_text(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    if isinstance(value, HomePath | str):
        return json.dumps(str(value), ensure_ascii=False)
    raise TypeError(f"no TOML spelling for {value!r}")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def setting_row(setting: Setting) -> str:
    value = setting.kind
    if setting.limits is not None:
        low, high = setting.limits
        value += f", {number_text(low)} to {number_text(high)}"
    default = f"*{setting.unset}*" if setting.default is None else f"`{toml_text(setting.default)}`"
    if setting.flag is None:
        flag = ""
    elif setting.flag == "--":
        flag = "`-- COMMAND [ARG]...`"
    else:
        flag = " / ".join(f"`{f}{' ' + setting.metavar if setting.metavar else ''}`" for f in setting.flag.split("/"))
        flag += " (repeatable: adds to the list)" if setting.appends else ""
    return f"| `{setting.key}` | {cell(value)} | {cell(default)} | {cell(flag)} | {cell(setting.help)}. |"


def settings_markdown() -> str:
    lines = [
        "# Settings",
        "",
        generated_notice("agor_systemd/config.py (SETTINGS)"),
        "",
        "`agor-units` and `agor-sandbox` read `~/.config/agor/units.toml` (`$XDG_CONFIG_HOME` is honoured;",
        "`--config FILE` picks another). A setting left out keeps its default; an unknown table or",
        "setting, or a value out of range, is refused with a one-line error that names it. A flag",
        "overrides its setting for one run of `agor-units install`, `render` or `verify`, and is",
        "checked the same way; the sidecar command goes after `--`.",
    ]
    for table, spec in TABLES.items():
        lines += ["", f"## [{table}]", "", spec.help, ""]
        lines += ["| setting | value | default | flag | what it does |", "|---|---|---|---|---|"]
        lines += [setting_row(s) for s in SETTINGS if s.table == table]
    return "\n".join(lines) + "\n"


def click_helps(command: click.Command, name: str, parent: click.Context | None = None) -> list[tuple[str, str]]:
    """(command path, --help text) for a command and, for a group, each of its commands."""
    settings = {**command.context_settings, "terminal_width": HELP_WIDTH, "max_content_width": HELP_WIDTH}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    helps = [(ctx.command_path, command.get_help(ctx))]
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            subcommand = command.get_command(ctx, sub)
            assert subcommand is not None
            helps += click_helps(subcommand, sub, ctx)
    return helps


def argparse_help(parser: argparse.ArgumentParser) -> str:
    # wrapping or not as the parser chose, at a fixed width
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)  # type: ignore[arg-type]
    kind = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    parser.formatter_class = partial(kind, width=HELP_WIDTH)
    return parser.format_help()


def argparse_helps(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(command path, --help text) for a parser and each of its subcommands."""
    helps = [(parser.prog, argparse_help(parser))]
    for action in parser._actions:  # argparse keeps its subcommands here, with no public accessor
        if isinstance(action, argparse._SubParsersAction):
            helps += [(sub.prog, argparse_help(sub)) for sub in action.choices.values()]
    return helps


def program_helps() -> list[tuple[str, str]]:
    """(command path, --help text) of every command of every program, in the order of docs/cli.md."""
    return [
        *click_helps(units_main, "agor-units"),
        *click_helps(sandbox_main, "agor-sandbox"),
        ("agor-walcheck", argparse_help(walcheck_parser())),
        *argparse_helps(btmsg_parser()),
        ("agor-relay", argparse_help(relay_parser())),
        *((f"agor-relay {name}", argparse_help(sub)) for name, sub in subcommand_parsers(relay_parser()).items()),
    ]


def cli_markdown() -> str:
    lines = [
        "# Command-line reference",
        "",
        generated_notice("the programs' --help"),
        "",
        "The flags that override units.toml are described with their settings in [settings.md](settings.md).",
    ]
    for path, text in program_helps():
        heading = "##" if " " not in path else "###"
        lines += ["", f"{heading} {path}", "", "```text", text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def generated_docs() -> dict[str, str]:
    """Path relative to the repository's root → text."""
    return {"docs/settings.md": settings_markdown(), "docs/cli.md": cli_markdown()}


if __name__ == "__main__":  # python -m agor_systemd.docs [DIR]: regenerate the docs above
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for relative, text in generated_docs().items():
        atomic_write(root / relative, text)
        print(root / relative)
