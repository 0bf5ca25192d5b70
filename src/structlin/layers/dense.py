"""``dense``: an ordinary full matrix, with the μP init of the structured layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredLinear
from .registry import register_structure

__all__ = ["DenseLinear"]


@register_structure("dense")
class DenseLinear(StructuredLinear):
    """Dense ``W`` (``out x in``) under the structured-layer contract.

    Unlike ``nn.Linear`` its init std is ``sqrt(min(d_in, d_out)) / d_in`` (spectral μP) and its
    bias starts at zero. Params = MACs per example = ``d_in * d_out``.

    Factors: ``weight`` ``(out_features, in_features)``, fan-in ``d_in``, fan-out ``d_out``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = DenseLinear(64, 32)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
        >>> layer.macs(), layer.num_params, layer.spec
        (2048, 2080, 'dense')
        >>> [(f.name, f.fan_in, f.fan_out) for f in layer.factors()]
        [('weight', 64, 32)]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **self.factory_kwargs))

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        return [("weight", self.in_features, self.out_features)]

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weights[0])

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weights[0], bias)

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)
