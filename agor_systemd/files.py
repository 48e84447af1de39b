"""Files written whole or not at all, and the digest install records of what it wrote."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from agor_systemd.errors import FileWriteError


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory and rename: never a half-written file.
    A failure names `path`, never the temp file."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FileWriteError(f"cannot write {path}: {e.strerror or e}") from None
        raise
