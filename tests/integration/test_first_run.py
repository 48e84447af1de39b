"""The README's own example, verbatim, on real systemd under the default sandbox: a node runner in
~/agor/dist with a package beside it, `working_directory = "~/agor"`; and what a user sees when a
first run cannot work (a home-directory working directory, an unreadable script, a denied path)."""

from __future__ import annotations

import json
import shutil

import pytest

from agor_systemd.sandbox import landlock

from .support import LOG_ID, UNIT, agor_units, health, wait_for, wait_health

# the README's units.toml, as written there
README_CONFIG = """\
[sidecar]
command = ["/usr/bin/node", "~/agor/dist/claude-runner.mjs"]
working_directory = "~/agor"
"""

# An agor-like runner: it reads a file beside it, imports a package from the project's node_modules,
# writes into the project (its working directory), tries to write elsewhere in the home directory
# and to read ~/.ssh, and reports each outcome before it prints agor's ready line.
RUNNER = """\
import { readFileSync, writeFileSync } from "node:fs";
const home = process.env.HOME;
const report = {};
async function attempt(name, action) {
  try { await action(); report[name] = "ok"; } catch (e) { report[name] = e.code || String(e); }
}
await attempt("read_beside_script", () => readFileSync(new URL("./prompt.txt", import.meta.url)));
await attempt("import_package", async () => { if ((await import("agor-dep")).default !== 42) throw new Error("bad"); });
await attempt("write_project", () => writeFileSync("out.txt", "written by the sidecar\\n"));
await attempt("write_home", () => writeFileSync(home + "/escape.txt", "x"));
await attempt("read_ssh", () => readFileSync(home + "/.ssh/id_ed25519"));
writeFileSync("report.json", JSON.stringify(report));
process.stdout.write('{"type":"ready"}\\n');
setInterval(() => {}, 1000);
"""


@pytest.fixture
def mgr(user_manager):
    """The user manager; afterwards the README layout is removed (the test user lives on)."""
    yield user_manager
    home = user_manager.home
    (home / ".config/agor/units.toml").unlink(missing_ok=True)
    (home / ".ssh/id_ed25519").unlink(missing_ok=True)
    for tree in ("agor", "secrets", "projects"):
        shutil.rmtree(home / tree, ignore_errors=True)


def readme_layout(mgr) -> None:
    mgr.write_file("agor/dist/claude-runner.mjs", RUNNER)
    mgr.write_file("agor/dist/prompt.txt", "You are an agent.\n")
    mgr.write_file("agor/package.json", json.dumps({"name": "agor", "type": "module"}))
    mgr.write_file(
        "agor/node_modules/agor-dep/package.json",
        json.dumps({"name": "agor-dep", "type": "module", "main": "index.js"}),
    )
    mgr.write_file("agor/node_modules/agor-dep/index.js", "export default 42;\n")
    mgr.write_file(".ssh/id_ed25519", "PRIVATE KEY\n", mode=0o600)
    mgr.write_file(".config/agor/units.toml", README_CONFIG)


def assert_nothing_installed(mgr) -> None:
    assert not (mgr.home / ".config/systemd/user" / UNIT).exists()


def runs_and_stays_confined(mgr, project) -> None:
    wait_health(mgr, "healthy", timeout=20)
    report_file = project / "report.json"
    report = json.loads(
        wait_for("the runner's report", lambda: report_file.exists() and report_file.read_text(), timeout=5)
    )
    assert report["read_beside_script"] == "ok"
    assert report["import_package"] == "ok"
    assert report["write_project"] == "ok"
    assert (project / "out.txt").read_text() == "written by the sidecar\n"
    assert report["write_home"] in ("EACCES", "EROFS")  # Landlock, or systemd's ProtectHome=read-only
    assert report["read_ssh"] == "EACCES"
    assert not (mgr.home / "escape.txt").exists()
    level = "full" if landlock.abi_version() >= 6 else "partial" if landlock.abi_version() else "none"
    state = health(mgr).health
    assert (state["status"], state["sandbox"], state["clients"]) == ("healthy", level, 0)


def test_the_readme_example_runs_as_written(mgr):
    readme_layout(mgr)
    agor_units(mgr, "install", "--now", check=True)
    runs_and_stays_confined(mgr, mgr.home / "agor")


def test_a_runner_outside_the_project_gets_its_own_tree_readable(mgr):
    """agor's usual layout: the agents work in a project, the runner and its packages live in ~/agor."""
    readme_layout(mgr)
    project = mgr.write_file("projects/website/index.html", "<h1>hi</h1>\n").parent
    mgr.write_file(".config/agor/units.toml", README_CONFIG.replace('"~/agor"', '"~/projects/website"'))
    agor_units(mgr, "install", "--now", check=True)
    runs_and_stays_confined(mgr, project)
    assert not (mgr.home / "agor/out.txt").exists()  # ~/agor is readable, not writable
    mgr.wait_journal(UNIT, f"readable for the command: {mgr.home / 'agor'}")


def test_a_home_directory_working_directory_is_refused_before_anything_is_written(mgr):
    readme_layout(mgr)
    mgr.write_file(".config/agor/units.toml", README_CONFIG.replace('"~/agor"', '"~"'))
    cp = agor_units(mgr, "install", "--now")
    assert cp.returncode == 1
    assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
    assert "working_directory is the home directory" in cp.stderr
    assert "[sandbox] enabled = false" in cp.stderr
    assert_nothing_installed(mgr)


def test_an_unreadable_script_is_reported_at_install(mgr):
    readme_layout(mgr)
    script = mgr.home / "agor/dist/claude-runner.mjs"
    script.chmod(0)
    cp = agor_units(mgr, "install", "--now")
    assert cp.returncode == 1
    assert cp.stderr == (
        f"agor-units: error: the sidecar could not start in its sandbox: it cannot read {script} "
        "(Permission denied) (docs/sandbox.md: what the sidecar may touch)\n"
    )
    assert_nothing_installed(mgr)


@pytest.mark.skipif(landlock.abi_version() < 1, reason="this kernel has no Landlock: nothing is denied")
def test_a_denied_path_is_named_in_the_journal_and_in_health(mgr):
    readme_layout(mgr)
    secret = mgr.write_file("secrets/token", "s3cret\n")
    mgr.write_file(
        "agor/dist/claude-runner.mjs",
        f'import {{ readFileSync }} from "node:fs";\nreadFileSync({json.dumps(str(secret))});\n',
    )
    agor_units(mgr, "install", "--now", "--attempts=1", "--base-s=0.1", check=True)
    failed = wait_health(mgr, "failed", timeout=20).health
    hint = f"permission denied: {secret} — outside the sandbox; add it to [sandbox] read_only_paths"
    assert failed["last_error"].startswith(f"exited with status 1; {hint}")
    lines = mgr.journal_lines(UNIT, identifier=LOG_ID)
    assert any(hint in line and "giving up" in line for line in lines), lines[-5:]
