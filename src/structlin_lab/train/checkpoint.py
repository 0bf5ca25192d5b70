"""Atomic checkpoints and RNG state capture for exact resumption.

A checkpoint holds only tensors and plain Python values (dicts, lists, tuples, strings, numbers,
None), so ``torch.load(path, weights_only=True)`` reads it: the global NumPy RNG state, which
NumPy returns as a tuple around a ``uint32`` array, is stored as a dict with an ``int64`` tensor
key. :func:`save_checkpoint` converts any other NumPy value it finds the same way, and
:func:`load_checkpoint` always loads with ``weights_only=True``; a checkpoint written before this
format (NumPy arrays pickled inside) is still read, but only when NumPy's array classes are the
only non-plain things in it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "load_checkpoint", "plain", "restore_rng", "save_checkpoint"]

# The globals a checkpoint written before the plain format may hold: NumPy's array pickling.
_OLD_NUMPY_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
    }
)


def capture_rng() -> dict[str, Any]:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) as plain values and tensors.

    NumPy's legacy state ``("MT19937", key[624] uint32, pos, has_gauss, cached_gaussian)`` is
    stored as ``{"bit_generator", "key" (int64 tensor), "pos", "has_gauss", "cached_gaussian"}``.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 -- the global one
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> tuple:
    """The ``np.random.set_state`` tuple of a saved state (plain dict, or an old raw tuple)."""
    if not isinstance(saved, dict):
        return saved
    key = saved["key"].numpy().astype(np.uint32)
    return (
        saved["bit_generator"],
        key,
        saved["pos"],
        saved["has_gauss"],
        saved["cached_gaussian"],
    )


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned (or an old checkpoint's raw NumPy tuple)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the devices this one has.
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays as tensors and NumPy scalars as Python numbers, recursively
    through dicts, lists and tuples; anything else is returned as it is."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain(v) for v in obj)
    return obj


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``plain(payload)`` with ``torch.save`` to a temp file, fsync it, then rename it
    over ``path``.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(plain(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)`` (no code is run).

    A checkpoint from before the plain format is read if the only non-plain things in it are
    NumPy arrays (its RNG state); anything else raises a ``ValueError`` naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    if not unsafe:
        return torch.load(path, map_location=map_location, weights_only=True)
    if unsafe <= _OLD_NUMPY_GLOBALS:
        # An old checkpoint: the same content with the NumPy RNG state as an array.
        return torch.load(path, map_location=map_location, weights_only=False)
    raise ValueError(
        f"{path} is not a structlin checkpoint that loads with weights_only=True: it pickles "
        f"{sorted(unsafe)}; only tensors and plain Python values are read"
    )
