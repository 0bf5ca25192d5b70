"""The experiment lab of structlin: the paper's models, data sets, trainer, sweeps, fits, plots,
benchmarks and the ``structlin`` command (see docs/architecture.md).

The names below are what a user of trained runs needs; they are imported on first use, so that
``import structlin_lab.data`` (say) does not load the trainer:

- :func:`load_run`: a run directory's trained model (eval mode), its config and data sizes;
- :func:`export_run` / :func:`load_exported`: a run in ``structlin.save_structured``'s format.

Compression (``structlin compress``) is :func:`structlin_lab.compress.compress`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedRun", "export_run", "load_exported", "load_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'structlin_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
