"""Path containment for the sandbox's rules (pure; the launcher loads it with the sandbox on)."""

from __future__ import annotations


def beneath(path: str, roots) -> bool:
    """`path` is one of `roots` or inside one (normalized paths)."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def contains_home(path: str, home: str) -> bool:
    """`path` is the home directory, / or a parent of the home directory."""
    return beneath(home, [path])
