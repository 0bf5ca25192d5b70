"""Atomic file writes: readers only ever see a complete file (write beside it, then rename)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary_file)`` on a temp file beside ``path``, then rename it over ``path``."""
    # Readers (and concurrent writers) only ever see a complete file: write beside it, then rename.
    # Not mkstemp: its 0600 mode would make a shared cache dir unreadable to others; "xb" honours
    # the umask and still refuses to clobber another writer's temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path
