"""The in-memory form of a small image classification data set."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from structlin.io import atomic_write

__all__ = ["ImageArrays", "load_first_npz", "load_npz", "save_npz"]

log = logging.getLogger(__name__)
A = TypeVar("A", bound="ImageArrays")


# eq=False: dataclass equality would compare arrays elementwise and raise on truth testing.
@dataclass(frozen=True, eq=False)
class ImageArrays:
    """Train and test images (uint8) with int64 labels and the class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train_x={self.train_x.shape}, test_x={self.test_x.shape}, "
            f"classes={len(self.classes)})"
        )


def save_npz(arrays: ImageArrays, path: Path) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` atomically (no pickles inside).

    A failure to write (e.g. a read-only cache dir) is logged, not raised: it should cost a
    re-decode next time, not the data now.
    """
    try:
        _write_npz(arrays, path)
    except OSError as e:
        log.warning("could not write cache %s: %s", path, e)


def _write_npz(arrays: ImageArrays, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f: Any) -> None:
        np.savez(
            f,
            train_x=arrays.train_x,
            train_y=arrays.train_y,
            test_x=arrays.test_x,
            test_y=arrays.test_y,
            classes=np.array(arrays.classes, dtype=str),
        )

    atomic_write(path, write)


def load_npz(cls: type[A], path: Path) -> A | None:
    """Read a :func:`save_npz` file as ``cls``; None (with a warning) if it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                train_x=f["train_x"],
                train_y=f["train_y"],
                test_x=f["test_x"],
                test_y=f["test_y"],
                classes=[str(c) for c in f["classes"]],
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # A damaged cache is only a lost shortcut; the caller decodes again and overwrites it.
        log.warning("ignoring unreadable cache %s: %s", path, e)
        return None


def load_first_npz(
    cls: type[A], preferred: list[Path], pattern_dir: Path, pattern: str
) -> A | None:
    """The first readable cache among ``preferred``, then ``pattern_dir.glob(pattern)`` newest
    first; None if there is none. Temp files start with "." so the glob skips them."""
    others = sorted(pattern_dir.glob(pattern), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in [*preferred, *others]:
        if path.is_file():
            arrays = load_npz(cls, path)
            if arrays is not None:
                return arrays
    return None
