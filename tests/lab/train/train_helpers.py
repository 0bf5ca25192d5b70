"""Helpers shared by the trainer tests (not a test module)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def rows(run: Path) -> list[dict]:
    """The metrics rows a run wrote."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def after_step(trainer, hook: Callable[[int], None]) -> None:
    """Call ``hook(step)`` right after every optimizer step of ``trainer``.

    ``step`` is the trainer's counter before its increment, so ``step == 5`` follows the sixth
    update.
    """
    orig_step = trainer.optimizer.step

    def step(*a, **k):
        out = orig_step(*a, **k)
        hook(trainer.step)
        return out

    trainer.optimizer.step = step
