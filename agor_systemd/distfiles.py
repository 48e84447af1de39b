"""Man pages and bash completion for every program, generated from their --help (docs.program_helps).

    man1/PROGRAM.1                       one page per program; a group's commands as subsections
    bash-completion/PROGRAM              commands and each command's options, files after them

Nothing here is a second copy of the help: a changed option changes the man page and the
completion at the next build. `python -m agor_systemd.distfiles DIR [--pyproject FILE]` writes them
under DIR (the Debian package's build does); with --pyproject, a [project.scripts] program that
has no help source is refused (tests/packaging/test_distfiles.py checks the same).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from agor_systemd import __version__
from agor_systemd.docs import program_helps
from agor_systemd.errors import AgorError
from agor_systemd.files import atomic_write
from agor_systemd.sidecar import launcher
from agor_systemd.unitfile import PACKAGED_DOCS

# Programs that are not run by people and have no --help: systemd runs them. Their man page is
# their module's docstring. Every other program's page comes from docs.program_helps().
INTERNAL_PROGRAMS = {"agor-launch": launcher.__doc__ or ""}

_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


class DistFilesError(AgorError, ValueError):
    """A program without a man page, or a help text the generator cannot read."""


def program_sections() -> dict[str, list[tuple[str, str]]]:
    """Program → [(command path, help text)], the program's own help first."""
    programs: dict[str, list[tuple[str, str]]] = {}
    for path, text in program_helps():
        programs.setdefault(path.split(" ", 1)[0], []).append((path, text))
    return programs


def entry_points(pyproject: Path) -> list[str]:
    """The programs pyproject.toml installs ([project.scripts])."""
    with pyproject.open("rb") as f:
        return sorted(tomllib.load(f)["project"]["scripts"])


def unmatched_programs(scripts: list[str]) -> tuple[list[str], list[str]]:
    """(installed programs without a help source, help sources that are no installed program)."""
    documented = set(program_sections()) | set(INTERNAL_PROGRAMS)
    return sorted(set(scripts) - documented), sorted(documented - set(scripts))


def summary(text: str) -> str:
    """The first line of a help's description (the paragraph after the usage line)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    for paragraph in paragraphs:
        if not paragraph.lower().startswith("usage:"):
            return paragraph.splitlines()[0].strip().rstrip(".")
    raise DistFilesError(f"no description in the help text: {text[:60]!r}")


def roff_text(line: str) -> str:
    """One line of literal text for roff: backslashes, minus signs and leading control characters."""
    escaped = line.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + escaped if escaped.startswith((".", "'")) else escaped


def roff_block(text: str) -> list[str]:
    return [".nf", *(roff_text(line) for line in text.rstrip("\n").splitlines()), ".fi"]


def man_page(program: str, sections: list[tuple[str, str]]) -> str:
    """A man(7) page: NAME from the help's first line, the help itself, then each command's."""
    own = sections[0][1]
    lines = [
        f'.TH {program.upper()} 1 "" "agor-systemd {__version__}" "User Commands"',
        ".SH NAME",
        f"{roff_text(program)} \\- {roff_text(summary(own))}",
        ".SH DESCRIPTION",
        *roff_block(own),
    ]
    if len(sections) > 1:
        lines.append(".SH COMMANDS")
        for path, text in sections[1:]:
            lines += [f".SS {roff_text(path)}", *roff_block(text)]
    lines += see_also(program)
    return "\n".join(lines) + "\n"


def internal_man_page(program: str, doc: str) -> str:
    first, _, rest = doc.strip().partition("\n")
    name_line = first.removeprefix(f"{program}:").strip().rstrip(".")
    lines = [
        f'.TH {program.upper()} 1 "" "agor-systemd {__version__}" "User Commands"',
        ".SH NAME",
        f"{roff_text(program)} \\- {roff_text(name_line)}",
        ".SH DESCRIPTION",
        "Not run by hand: systemd starts it from the unit that agor\\-units installs.",
        *roff_block(rest.strip("\n")),
        *see_also(program),
    ]
    return "\n".join(lines) + "\n"


def see_also(program: str) -> list[str]:
    others = sorted(set(program_sections()) | set(INTERNAL_PROGRAMS) - {program})
    return [
        ".SH SEE ALSO",
        ", ".join(f"\\fB{roff_text(p)}\\fR(1)" for p in others) + ",",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1);",
        f"{roff_text(PACKAGED_DOCS)}/README.md and docs/*.md (installed beside it).",
    ]


def man_pages() -> dict[str, str]:
    """Relative path → text for every program."""
    pages = {f"man1/{p}.1": man_page(p, s) for p, s in program_sections().items()}
    pages.update({f"man1/{p}.1": internal_man_page(p, doc) for p, doc in INTERNAL_PROGRAMS.items()})
    return pages


def options(text: str) -> list[str]:
    """The options a help text lists (after its usage paragraph), in order, without repeats."""
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    listed = [m.group(1) for line in body.splitlines() if line.lstrip().startswith("-") for m in _OPTION.finditer(line)]
    return list(dict.fromkeys(listed))


def bash_completion(program: str, sections: list[tuple[str, str]]) -> str:
    """A completion function: at the first word the commands (and the program's options), after a
    command its options; file names where no option is being typed."""
    function = "_" + re.sub(r"\W", "_", program)
    commands = [path.split(" ", 1)[1] for path, _ in sections[1:]]
    cases = [f'        "") words="{" ".join([*commands, *options(sections[0][1])])}" ;;']
    cases += [f'        {path.split(" ", 1)[1]}) words="{" ".join(options(text))}" ;;' for path, text in sections[1:]]
    # the first word that is not an option is the command; after `--` comes the sidecar's command line
    find_command = (
        ' case ${COMP_WORDS[i]} in -*) ;; *) [ -n "$command" ] || command=${COMP_WORDS[i]} ;; esac' if commands else ""
    )
    return "\n".join(
        [
            f"# bash completion for {program}, generated from its --help by agor_systemd.distfiles",
            f"{function}() {{",
            '    local cur=${COMP_WORDS[COMP_CWORD]} command="" words i',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            f'        [ "${{COMP_WORDS[i]}}" = "--" ] && return 0;{find_command}',
            "    done",
            '    case "$command" in',
            *cases,
            '        *) words="" ;;',
            "    esac",
            f"    if [[ $cur == -*{' || -z $command' if commands else ''} ]]; then",
            '        mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")',
            "    fi",
            "}",
            f"complete -o default -F {function} {program}",
            "",
        ]
    )


def bash_completions() -> dict[str, str]:
    """Relative path → text: a completion for every program people run (not the internal ones)."""
    return {f"bash-completion/{p}": bash_completion(p, s) for p, s in program_sections().items()}


def write(root: Path, pyproject: Path | None = None) -> list[Path]:
    if pyproject is not None:
        missing, extra = unmatched_programs(entry_points(pyproject))
        if missing or extra:
            raise DistFilesError(
                f"programs without a help source in docs.program_helps(): {', '.join(missing) or 'none'}; "
                f"help sources that {pyproject} does not install: {', '.join(extra) or 'none'}"
            )
    written = []
    for relative, text in {**man_pages(), **bash_completions()}.items():
        atomic_write(root / relative, text)
        written.append(root / relative)
    return written


def main() -> None:
    import argparse  # import cost: only for this build-time command

    parser = argparse.ArgumentParser(prog="python -m agor_systemd.distfiles", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--pyproject", type=Path, help="refuse a [project.scripts] program without a man page")
    args = parser.parse_args()
    for path in write(args.directory, args.pyproject):
        print(path)


if __name__ == "__main__":
    from agor_systemd.console import run_main

    run_main("agor-distfiles", main)
