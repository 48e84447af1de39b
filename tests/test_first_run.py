"""The README's first run under the default sandbox: the working directory is the project (read-write),
the command's own files are readable, a home-directory working directory is refused, install checks
the sandbox before writing, and a denied path is explained (issue: the README's example crash-looped).

Landlock checks run against this machine's kernel in forked children; no systemd needed."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from agor_systemd.config import (
    Config,
    SidecarConfig,
    parse_config,
)
from agor_systemd.sandbox import landlock
from agor_systemd.sandbox.enforce import (
    command_files,
    command_paths,
    denial_hint,
    probe_start,
    readable_root,
)
from agor_systemd.sandbox.hardening import read_write_paths
from agor_systemd.sandbox.policy import sandbox_paths, working_directory_problem
from agor_systemd.unitfile import HomePath, documentation
from agor_systemd.units import render_units

needs_landlock = pytest.mark.skipif(
    landlock.abi_version() < 1, reason="this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK, lsm=)"
)
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev"]


def with_sidecar(**fields) -> Config:
    return replace(Config(), sidecar=replace(SidecarConfig(), **fields))


# --- the working directory ----------------------------------------------------------------------


def test_default_working_directory_is_agor_data_and_works_with_the_sandbox():
    config = Config()
    assert config.sidecar.working_directory == HomePath(".local/share/agor")
    assert working_directory_problem(config, "/home/u") is None


def test_working_directory_is_read_write_in_landlock_and_in_read_write_paths():
    config = parse_config({"sidecar": {"working_directory": "~/agor"}})
    read_write, read_only = sandbox_paths(config)
    assert HomePath("agor") in read_write and HomePath("agor") not in read_only
    assert HomePath("agor") in read_write_paths(config)  # systemd's ReadWritePaths= mirrors it
    text = render_units(config, 254)["agor-sidecar.service"]
    assert '"--rw" "%h/agor"' in text
    assert '"-%h/agor"' in text.split("ReadWritePaths=")[1].splitlines()[0]


def test_working_directory_already_in_the_table_is_not_repeated():
    read_write, _ = sandbox_paths(Config())
    assert read_write.count(HomePath(".local/share/agor")) == 1


@pytest.mark.parametrize("working_directory", [HomePath(""), "/", "/home", "/home/u", "/home/u/"])
def test_a_working_directory_that_holds_the_home_directory_is_refused(working_directory):
    problem = working_directory_problem(with_sidecar(working_directory=working_directory), "/home/u")
    assert problem is not None and "\n" not in problem
    assert "[sidecar] working_directory" in problem and "project directory" in problem
    assert "[sandbox] enabled = false" in problem


@pytest.mark.parametrize("working_directory", ["/home/uu", "/home/u/agor", HomePath("projects/site"), "/srv/agor"])
def test_project_directories_are_accepted(working_directory):
    assert working_directory_problem(with_sidecar(working_directory=working_directory), "/home/u") is None


def test_home_working_directory_is_fine_without_the_sandbox():
    config = replace(with_sidecar(working_directory=HomePath("")), sandbox=replace(Config().sandbox, enabled=False))
    assert working_directory_problem(config, "/home/u") is None


# --- the command's files ------------------------------------------------------------------------


def make(path: Path, text: str = "", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_node_runner_gets_its_project_root_with_the_packages_beside_it(tmp_path):
    home = tmp_path / "home"
    runner = make(home / "agor/dist/claude-runner.mjs")
    make(home / "agor/package.json", "{}")
    make(home / "agor/node_modules/dep/index.js")
    assert readable_root(str(runner), str(home)) == str(home / "agor")
    assert command_paths(["/usr/bin/node", str(runner)], str(home / "project"), str(home), SYSTEM_READ) == [
        str(home / "agor")
    ]


def test_a_script_without_a_project_gets_its_directory(tmp_path):
    home = tmp_path / "home"
    script = make(home / "tools/runner/run.py")
    assert command_paths(["/usr/bin/python3", str(script)], "/", str(home), SYSTEM_READ) == [str(home / "tools/runner")]


def test_a_script_directly_in_home_gets_only_itself(tmp_path):
    home = tmp_path / "home"
    script = make(home / "run.py")
    make(home / "package.json", "{}")  # a marker in the home directory never widens to it
    assert readable_root(str(script), str(home)) == str(script)


def test_a_program_in_a_bin_directory_gets_its_prefix(tmp_path):
    home = tmp_path / "home"
    python = make(home / "agor/.venv/bin/python", mode=0o755)
    assert readable_root(str(python), str(home)) == str(home / "agor/.venv")  # the virtualenv
    make(home / "agor/pyproject.toml")
    assert readable_root(str(python), str(home)) == str(home / "agor")  # the project that holds it


def test_shebang_interpreters_and_relative_arguments_are_followed(tmp_path):
    home = tmp_path / "home"
    interpreter = make(home / "opt/py/bin/python3", "#!/bin/sh\n", 0o755)
    script = make(home / "agor/bin/runner", f"#!{interpreter} -u\nprint()\n", 0o755)
    data = make(home / "agor/conf/settings.json", "{}")
    files = command_files([str(script), "conf/settings.json", "--flag", "not/there"], str(home / "agor"))
    assert files == [
        str(script),
        str(interpreter),
        "/bin/sh" if not os.path.islink("/bin/sh") else os.path.realpath("/bin/sh"),
        str(data),
    ]


def test_files_already_covered_add_nothing(tmp_path):
    home = tmp_path / "home"
    script = make(home / "agor/dist/runner.mjs")
    assert command_paths(["/usr/bin/node", str(script)], str(home), str(home), [*SYSTEM_READ, str(home / "agor")]) == []


def test_symlinked_scripts_are_granted_where_they_really_are(tmp_path):
    home = tmp_path / "home"
    real = make(home / "src/runner/main.py")
    link = home / "agor/run.py"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    assert command_paths(["/usr/bin/python3", str(link)], str(home), str(home), SYSTEM_READ) == [str(real.parent)]


# --- the install-time probe (the launcher's very ruleset, in a child) ---------------------------


def readme_layout(tmp_path: Path) -> tuple[Path, list[str], list[str], list[str]]:
    home = tmp_path / "home"
    runner = make(home / "agor/dist/runner.py", "print('ready')\n")
    (home / "agor/work").mkdir()
    # (not /tmp: tmp_path is under it)
    read_write = [str(home / ".local/share/agor"), str(home / "agor")]
    return home, [str(runner)], read_write, SYSTEM_READ


@needs_landlock
def test_probe_passes_the_readme_layout(tmp_path):
    home, (runner,), read_write, read_only = readme_layout(tmp_path)
    assert probe_start(read_write, read_only, ["/usr/bin/python3", runner], str(home / "agor"), str(home)) == []


@needs_landlock
def test_probe_reports_a_working_directory_outside_the_writable_paths(tmp_path):
    home, (runner,), read_write, read_only = readme_layout(tmp_path)
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    problems = probe_start(read_write, read_only, ["/usr/bin/python3", runner], str(elsewhere), str(home))
    assert problems == [f"its working directory {elsewhere} is not writable (Permission denied)"]


def test_probe_reports_a_missing_working_directory(tmp_path):
    home, (runner,), read_write, read_only = readme_layout(tmp_path)
    problems = probe_start(read_write, read_only, ["/usr/bin/python3", runner], str(home / "gone"), str(home))
    assert problems == [f"its working directory {home / 'gone'} does not exist"]


# an unreadable script (file modes; root would read it anyway) is reported by `agor-units install`
# as the test user: tests/integration/test_first_run.py


# --- the explanation of a denied path -----------------------------------------------------------

RW = ["/tmp", "/home/u/agor", "/home/u/.local/share/agor"]
RO = ["/usr", "/home/u/.config"]


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        (
            b"PermissionError: [Errno 13] Permission denied: '/home/u/secrets/x.json'",
            "permission denied: /home/u/secrets/x.json — outside the sandbox; add it to [sandbox] read_only_paths",
        ),
        (
            b"Error: EACCES: permission denied, open '/home/u/.ssh/id_rsa'",
            "permission denied: /home/u/.ssh/id_rsa — outside the sandbox",
        ),
        (b"cat: /home/u/notes/todo: Permission denied", "permission denied: /home/u/notes/todo — outside the sandbox"),
        (
            b"Error: EACCES: permission denied, mkdir '/home/u/.config/tool'",
            "permission denied: /home/u/.config/tool — not writable in the sandbox; add it (or its directory) to "
            "[sandbox] read_write_paths",
        ),
        (
            b"OSError: [Errno 30] Read-only file system: '/home/u/note.txt'",
            "read-only file system: /home/u/note.txt — not writable in the sandbox",
        ),
    ],
)
def test_denied_paths_are_explained(line, hint):
    explained = denial_hint(line, RW, RO)
    assert explained is not None and explained.startswith(hint)


@pytest.mark.parametrize(
    "line",
    [
        b"sh: 1: cannot create /home/u/agor/x: Permission denied",  # inside the project: file modes, not the sandbox
        b"reading /home/u/secrets/x.json",  # no denial
        b"permission denied",  # no path
    ],
)
def test_lines_that_are_not_sandbox_denials_are_left_alone(line):
    assert denial_hint(line, RW, RO) is None


# --- Documentation= ------------------------------------------------------------------------------


def test_documentation_names_installed_files_with_specifiers_escaped():
    assert documentation(None, "a.md") is None
    assert (
        documentation("/usr/share/doc/agor-systemd", "a.md", "b.md")
        == "file:/usr/share/doc/agor-systemd/a.md file:/usr/share/doc/agor-systemd/b.md"
    )
    assert (
        documentation("/opt/my venv/100%/share/doc/agor-systemd", "a.md")
        == "file:/opt/my%%20venv/100%%25/share/doc/agor-systemd/a.md"
    )


def test_no_unit_names_a_package_index():
    for text in render_units(Config(), 254).values():
        assert "pypi" not in text and "http" not in text


@pytest.fixture
def home_outside_tmp():
    """A home directory outside /tmp and /var/tmp, which the sandbox grants anyway."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=".agor-test-", dir=Path.home()))
    yield base / "home"
    shutil.rmtree(base)


def test_agor_sandbox_check_shows_what_the_command_gets(tmp_path, monkeypatch, home_outside_tmp):
    from click.testing import CliRunner

    from agor_systemd.cli import sandbox_main as sandbox_cli

    home = home_outside_tmp
    runner = make(home / "agor/dist/claude-runner.mjs")
    make(home / "agor/package.json", "{}")
    config = make(
        tmp_path / "units.toml",
        f'[sidecar]\ncommand = ["/usr/bin/node", "{runner}"]\nworking_directory = "~/projects/site"\n',
    )
    monkeypatch.setenv("HOME", str(home))
    result = CliRunner().invoke(sandbox_cli, ["check", "--json", "--config", str(config)])
    assert json.loads(result.output)["command_readable"] == [str(home / "agor")]
    assert str(home / "projects/site") in json.loads(result.output)["read_write"]
