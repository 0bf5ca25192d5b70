"""Per-step learning-rate schedules, applied relative to each parameter group's own LR."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

__all__ = ["lr_factor"]


def lr_factor(
    schedule: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """``step -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warmup from ``1/warmup_steps`` to 1 over ``warmup_steps``, then ``cosine`` (to
    ``min_ratio`` at ``total_steps``), ``linear`` (likewise) or ``constant``. Because LambdaLR
    multiplies each group's initial LR, μP's per-group multipliers are preserved.
    """
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps >= total_steps:
        # The LR would still be ramping up when the run ends: it never reaches the peak LR.
        warnings.warn(
            f"optim.warmup_steps={warmup_steps} is not shorter than the run ({total_steps} "
            f"steps): the learning rate never reaches its peak (it ends at "
            f"{total_steps / warmup_steps:.3g}x of it); lower optim.warmup_steps below "
            f"{total_steps}, or train longer",
            stacklevel=2,
        )

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor
