"""What counts as a linear layer: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` and every
structured layer. Surgery, μP and the coordinate check all ask the same two questions here."""

from __future__ import annotations

from torch import nn

from .layers import StructuredLinear

__all__ = ["is_conv1d", "is_linear_like", "linear_dims"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2 ``Conv1D``: ``y = x @ weight + b``, with
    ``weight`` of shape ``(in_features, out_features)``, the transpose of ``nn.Linear``'s."""
    # Duck typing keeps transformers an optional dependency.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear``, a transformers ``Conv1D`` or a structured layer."""
    return isinstance(module, (nn.Linear, StructuredLinear)) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module; ``TypeError`` for anything else."""
    if isinstance(module, (nn.Linear, StructuredLinear)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    raise TypeError(f"{type(module).__name__} is not a linear layer")
