"""The package's layering, read from its source: lowest layer first, nothing imports upward.

    core          errors journal notify console files sqlite unitfile config manager usage tracing otlp
                  giveup
                  (and __init__)
    sandbox       sandbox/*
    capabilities  sidecar/*, walcheck/*, btmsg/*, relay/*  (never each other)
    composition   units install verify doctor cli api docs _launch logbridge distfiles
    lab           lab/*                        (the test bed and the demo: nothing imports it)

Also: no import cycle, a function-level import only with an `import cost:` comment, and the
launcher — started by systemd on every restart — loads only an allow-listed set of modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "agor_systemd"

CORE = {
    "agor_systemd",
    "agor_systemd.errors",
    "agor_systemd.journal",
    "agor_systemd.notify",
    "agor_systemd.giveup",
    "agor_systemd.console",
    "agor_systemd.files",
    "agor_systemd.sqlite",
    "agor_systemd.unitfile",
    "agor_systemd.config",
    "agor_systemd.manager",
    "agor_systemd.usage",
    "agor_systemd.tracing",
    "agor_systemd.otlp",
}
COMPOSITION = {
    "agor_systemd.units",
    "agor_systemd.install",
    "agor_systemd.verify",
    "agor_systemd.doctor",
    "agor_systemd.cli",
    "agor_systemd.api",
    "agor_systemd.distfiles",
    "agor_systemd.docs",
    "agor_systemd._launch",
    "agor_systemd.logbridge",
}
CAPABILITIES = ("agor_systemd.sidecar", "agor_systemd.walcheck", "agor_systemd.btmsg", "agor_systemd.relay")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    """The capability package a module belongs to ('agor_systemd.sidecar'), or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer(module: str) -> int:
    if module in CORE:
        return 0
    if package_of(module) == "agor_systemd.sandbox":
        return 1
    if package_of(module) in CAPABILITIES:
        return 2
    if module in COMPOSITION:
        return 3
    if package_of(module) == "agor_systemd.lab":
        return 4
    raise AssertionError(f"{module} is in no layer: add it to tests/test_imports.py")


class Import:
    def __init__(self, source: str, target: str, line: int, in_function: bool) -> None:
        self.source, self.target, self.line, self.in_function = source, target, line, in_function

    def __repr__(self) -> str:
        return f"{MODULES[self.source].relative_to(REPO)}:{self.line} imports {self.target}"


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    in_function = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{MODULES[module]}:{node.lineno}: relative import; write agor_systemd.…"
            # `from agor_systemd.sandbox import landlock` imports the module agor_systemd.sandbox.landlock
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        for name in names:
            if name == "agor_systemd" or name.startswith("agor_systemd."):
                found.append(Import(module, name, node.lineno, id(node) in in_function))
    return found


EDGES = [edge for module in MODULES for edge in imports_of(module)]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_nothing_imports_upward():
    upward = [edge for edge in EDGES if layer(edge.target) > layer(edge.source)]
    assert upward == []


def test_capabilities_do_not_import_each_other():
    across = [
        edge
        for edge in EDGES
        if layer(edge.source) == layer(edge.target) == 2 and package_of(edge.source) != package_of(edge.target)
    ]
    assert across == []


def test_no_product_module_imports_the_test_bed():
    fenced = [edge for edge in EDGES if layer(edge.target) == 4 and layer(edge.source) < 4]
    assert fenced == []


def test_no_import_cycle():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for edge in EDGES:
        if edge.target != edge.source:
            graph[edge.source].add(edge.target)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_function_level_imports_say_what_they_save():
    """Lazy only for a measured cost, said where it happens (`# import cost: ...`)."""
    unexplained = []
    for module, path in MODULES.items():
        if layer(module) == 4:
            continue  # the test bed runs as root on a test machine: start-up time is not its concern
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    nearby = " ".join(lines[max(0, sub.lineno - 2) : sub.end_lineno or sub.lineno])
                    if "import cost" not in nearby:
                        unexplained.append(f"{path.relative_to(REPO)}:{sub.lineno}")
    assert unexplained == []


# What `python -I -S _launch.py` loads before the launcher does anything: the interpreter's own
# start-up set, C modules, and the toolkit's import-light core. A new entry is a new cost on every
# restart of every user's sidecar: measure it (docs/benchmarks.md, launcher start-up) first.
LAUNCHER_MODULES = {
    "agor_systemd",
    "agor_systemd.console",
    "agor_systemd.errors",
    "agor_systemd.giveup",
    "agor_systemd.journal",
    "agor_systemd.notify",
    "agor_systemd.sandbox",
    "agor_systemd.sandbox.effects",
    "agor_systemd.sidecar",
    "agor_systemd.sidecar.launcher",
    "agor_systemd.sidecar.protocol",
    "__future__",
    "_signal",
    "errno",
    "fcntl",
    "pwd",
    "select",
    "time",
    "os",
    "os.path",
    "posixpath",
    "genericpath",
    "stat",
    "_stat",
    "_collections_abc",  # os itself
}


def test_the_launcher_loads_only_its_allow_list():
    code = (
        "import sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]); "
        "import agor_systemd.sidecar.launcher; print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    cp = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    loaded = set(cp.stdout.split())
    assert loaded - LAUNCHER_MODULES == set()


@pytest.mark.parametrize("entry", ["agor_systemd.walcheck", "agor_systemd.sidecar.launcher"])
def test_programs_systemd_runs_do_not_load_click_or_pystemd(entry):
    code = f"import sys; sys.path.insert(0, sys.argv[1]); import {entry}; print(' '.join(sorted(sys.modules)))"
    cp = subprocess.run([sys.executable, "-I", "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    loaded = set(cp.stdout.split())
    assert {"click", "pystemd"} & loaded == set()


def test_the_readme_module_map_names_every_module():
    """README's Development section lists every module by name (a new one must be placed there)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    missing = [
        module
        for module in MODULES
        if module.count(".") >= 1
        and not module.endswith(("__main__", "._launch"))
        and f"`{module.rsplit('.', 1)[1]}`" not in section
        and f"`{module.rsplit('.', 1)[1]}/`" not in section
    ]
    assert missing == []


def test_agor_units_does_not_load_the_relay_s_libraries():
    """agor-units composes the relay's unit; its certificates (cryptography, ~95 ms) and WebSockets
    load only in agor-relay."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import agor_systemd.cli; print(' '.join(sorted(sys.modules)))"
    cp = subprocess.run([sys.executable, "-I", "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in cp.stdout.split()}
    assert {"cryptography", "websockets", "opentelemetry"} & loaded == set()
