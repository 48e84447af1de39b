"""Man pages and bash completion come from the programs' --help, one for every installed program
(fast; no build)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agor_systemd import distfiles
from agor_systemd.docs import program_helps
from tests.packaging.support import REPO, entry_points


def test_every_installed_program_has_a_help_source_and_nothing_else_does():
    """A program added to [project.scripts] without its --help in docs.program_helps() (or an entry
    in INTERNAL_PROGRAMS) fails here, and the package build refuses it the same way."""
    assert distfiles.unmatched_programs(entry_points()) == ([], [])
    assert distfiles.unmatched_programs([*entry_points(), "agor-new"]) == (["agor-new"], [])


def test_the_build_refuses_a_program_without_a_man_page(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        (REPO / "pyproject.toml").read_text().replace("[project.scripts]\n", '[project.scripts]\nagor-new = "x:y"\n')
    )
    with pytest.raises(distfiles.DistFilesError, match=r"without a help source in docs\.program_helps\(\): agor-new"):
        distfiles.write(tmp_path / "out", pyproject)
    assert not (tmp_path / "out").exists()


def test_a_man_page_per_program_with_every_command_and_option():
    pages = distfiles.man_pages()
    assert sorted(pages) == sorted(f"man1/{name}.1" for name in entry_points())
    for path, text in program_helps():
        page = pages[f"man1/{path.split()[0]}.1"]
        if " " in path:
            assert f".SS {distfiles.roff_text(path)}\n" in page
        for option in distfiles.options(text):
            assert distfiles.roff_text(option) in page, (path, option)


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed (scripts/setup.sh installs it)")
def test_man_pages_render_without_warnings(tmp_path):
    for relative, text in distfiles.man_pages().items():
        page = tmp_path / relative.split("/")[-1]
        page.write_text(text)
        done = subprocess.run(
            ["man", "--warnings=all", "-l", "-Tutf8", str(page)],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MANWIDTH": "80"},
        )
        assert done.returncode == 0 and done.stderr == "", (relative, done.stderr)
        assert "agor-systemd" in done.stdout


def test_roff_escapes_what_roff_would_read_as_requests():
    assert distfiles.roff_text(".hidden") == "\\&.hidden"
    assert distfiles.roff_text("'quoted") == "\\&'quoted"
    assert distfiles.roff_text("a\\b --x") == "a\\eb \\-\\-x"


def complete(program: str, script: str, words: list[str]) -> list[str]:
    """What bash completion offers for `words` (the last one being typed)."""
    line = " ".join(words)
    bash = f"""{script}
COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; COMP_LINE={line!r}
_{program.replace("-", "_")} {program} {words[-1]!r} {words[-2]!r}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "--norc", "-c", bash], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_completion_offers_commands_then_their_options():
    scripts = distfiles.bash_completions()
    assert sorted(scripts) == sorted(f"bash-completion/{p}" for p in distfiles.program_sections())
    units = scripts["bash-completion/agor-units"]
    assert {"install", "uninstall", "doctor", "health"} <= set(complete("agor-units", units, ["agor-units", ""]))
    assert complete("agor-units", units, ["agor-units", "inst"]) == ["install"]
    assert "--now" in complete("agor-units", units, ["agor-units", "install", "--n"])
    assert complete("agor-units", units, ["agor-units", "install", "--now", "--", "--n"]) == []  # the sidecar's words
    walcheck = scripts["bash-completion/agor-walcheck"]
    assert complete("agor-walcheck", walcheck, ["agor-walcheck", "--e"]) == ["--ensure-wal"]
    assert complete("agor-walcheck", walcheck, ["agor-walcheck", "sess"]) == []  # files: bash's default
