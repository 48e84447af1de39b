"""Docs that restate code stay true to it (like sqlite-utils' `cog --check` and its test_docs.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import click
import pytest

from agor_systemd.cli import main as units_main
from agor_systemd.cli import sandbox_main
from agor_systemd.config import SETTINGS, parse_config
from agor_systemd.docs import cli_markdown, generated_docs
from agor_systemd.walcheck import argument_parser as walcheck_parser

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "regenerate it with `python -m agor_systemd.docs` and review the diff"

PROGRAMS = {"agor-units": units_main, "agor-sandbox": sandbox_main}


@pytest.mark.parametrize("relative", list(generated_docs()))
def test_generated_docs_have_not_drifted(relative):
    path = REPO / relative
    assert path.is_file(), f"{relative} is missing; {REGENERATE}"
    assert path.read_text() == generated_docs()[relative], f"{relative} differs from its source; {REGENERATE}"


def click_commands() -> list[tuple[str, click.Command]]:
    """(command path, command) of every agor-units and agor-sandbox command, the groups too."""
    found: list[tuple[str, click.Command]] = []
    for program, group in PROGRAMS.items():
        assert isinstance(group, click.Group)
        found.append((program, group))
        found += [(f"{program} {name}", command) for name, command in group.commands.items()]
    return found


@pytest.mark.parametrize(("path", "command"), click_commands(), ids=[path for path, _ in click_commands()])
def test_every_command_and_option_has_help(path, command):
    assert (command.help or "").strip(), f"`{path}` has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"`{path} {param.opts[0]}` has no help text"


def test_every_walcheck_option_has_help():
    for action in walcheck_parser()._actions:
        assert (action.help or "").strip(), f"agor-walcheck {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(("path", "command"), click_commands(), ids=[path for path, _ in click_commands()])
def test_cli_md_shows_every_commands_help(path, command):
    heading = "## " if " " not in path else "### "
    assert f"\n{heading}{path}\n" in cli_markdown()
    assert f"Usage: {path} " in cli_markdown()


def test_cli_md_shows_agor_walcheck():
    assert "\n## agor-walcheck\n" in cli_markdown() and "usage: agor-walcheck " in cli_markdown()


# --- the README's command table ---------------------------------------------------------------------


def readme_command_rows() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return [line for line in readme.splitlines() if re.match(r"\| `(agor-|--)", line)]


def own_flags(command: click.Command) -> list[str]:
    """A command's flags, without help and the settings' override flags (docs/settings.md has those)."""
    overrides = {s.name for s in SETTINGS}
    return [
        opt
        for param in command.params
        if isinstance(param, click.Option) and param.name not in overrides and param.name != "help"
        for opt in param.opts + param.secondary_opts
    ]


def mentioned(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize(("path", "command"), click_commands(), ids=[path for path, _ in click_commands()])
def test_the_readme_table_names_every_command_and_its_flags(path, command):
    rows = readme_command_rows()
    flags = own_flags(command)
    if " " in path:  # a command: the rows that start with it; the program's own flags have rows of their own
        rows = [row for row in rows if row.startswith(f"| `{path}")]
        assert rows, f"README's command table has no row for `{path}`"
        flags = [flag for flag in flags if flag not in own_flags(PROGRAMS[path.split()[0]])]
    missing = [flag for flag in flags if not mentioned(flag, " ".join(rows))]
    assert missing == [], f"README's command table does not mention {missing} of `{path}`"


def test_the_readme_table_names_every_walcheck_flag():
    rows = [row for row in readme_command_rows() if row.startswith("| `agor-walcheck")]
    assert rows, "README's command table has no row for agor-walcheck"
    flags = [
        opt for action in walcheck_parser()._actions for opt in action.option_strings if opt not in ("-h", "--help")
    ]
    assert [flag for flag in flags if not mentioned(flag, rows[0])] == []


def test_the_readme_points_to_the_generated_references():
    readme = (REPO / "README.md").read_text()
    assert "docs/settings.md" in readme and "docs/cli.md" in readme


# --- units.toml examples ----------------------------------------------------------------------------

EXAMPLE_FILES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def toml_examples() -> list[tuple[str, str]]:
    found = []
    for relative in EXAMPLE_FILES:
        text = (REPO / relative).read_text()
        found += [(relative, block) for block in re.findall(r"```toml\n(.*?)```", text, re.DOTALL)]
    return found


@pytest.mark.parametrize(("relative", "example"), toml_examples(), ids=[r for r, _ in toml_examples()])
def test_every_units_toml_example_is_a_valid_configuration(relative, example):
    """An example with a setting that was renamed or a value out of range fails here, not for a user."""
    parse_config(tomllib.loads(example))
