"""Training-time diagnostics logged with every evaluation row.

``factor_rms_max`` / ``factor_rms_mean``: over every factor of every structured layer, the
factor's RMS divided by its μP init std (:meth:`StructuredLinear.rms_ratios`). They start near 1
and track the growth that the paper blames for the instability of large BTT transformers
without weight normalisation (Qiu et al., ICML 2024, §5, "Training Structured Transformers").
With ``norm="rms_clamp"`` the ratio of the *stored* factor may exceed 1, but the forward pass
sees at most 1 (times the learnable gain): the excess is what the clamp removes.
"""

from __future__ import annotations

import torch
from torch import nn

from structlin import StructuredLinear

__all__ = ["factor_rms_stats"]


@torch.no_grad()
def factor_rms_stats(model: nn.Module) -> dict[str, float]:
    """``{"factor_rms_max": ..., "factor_rms_mean": ...}``; empty when ``model`` has no
    structured layer. Works through DDP and ``torch.compile`` wrappers (they hold the model as a
    submodule), and costs one reduction per factor."""
    ratios = [
        r.float()
        for m in model.modules()
        if isinstance(m, StructuredLinear)
        for r in m.rms_ratios()
    ]
    if not ratios:
        return {}
    stacked = torch.stack(ratios)
    top, mean = torch.stack([stacked.max(), stacked.mean()]).tolist()
    return {"factor_rms_max": top, "factor_rms_mean": mean}
