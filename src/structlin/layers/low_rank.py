"""``low_rank``: ``W = V U`` with ``U: d_in -> r`` and ``V: r -> d_out``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..options import check_positive_int
from .base import StructuredLinear
from .registry import register_structure

__all__ = ["LowRankLinear"]


@register_structure("low_rank")
class LowRankLinear(StructuredLinear):
    """Rank-``r`` layer ``y = (x U^T) V^T + b``.

    Args:
        rank: ``r``; default ``ceil(sqrt(min(d_in, d_out)))``, the paper's default, which gives a
            square ``d`` layer the same cost as a rank-1 BTT (``2 d^{3/2}``). Must be at most
            ``min(d_in, d_out)``.

    Factors: ``U`` ``(r, d_in)`` (fan-in ``d_in``, fan-out ``r``), then ``V`` ``(d_out, r)``
    (fan-in ``r``, fan-out ``d_out``). Params = MACs per example = ``r (d_in + d_out)``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = LowRankLinear(256, 512, rank=8)
        >>> layer(torch.randn(4, 10, 256)).shape
        torch.Size([4, 10, 512])
        >>> layer.U.shape, layer.V.shape
        (torch.Size([8, 256]), torch.Size([512, 8]))
        >>> layer.macs(), layer.dense_macs, layer.spec
        (6144, 131072, 'low_rank:rank=8')
        >>> torch.linalg.matrix_rank(layer.to_dense().detach()).item()
        8
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        full = min(in_features, out_features)
        if rank is None:
            rank = math.ceil(math.sqrt(full))
        rank = check_positive_int(self._name(), "rank", rank)
        if rank > full:
            raise ValueError(
                f"{self._name()}: rank must be at most min(in_features, out_features) = {full}, "
                f"got {rank}; use structure 'dense' for a full-rank layer"
            )
        self.rank = rank
        self.U = nn.Parameter(torch.empty(rank, in_features, **self.factory_kwargs))
        self.V = nn.Parameter(torch.empty(out_features, rank, **self.factory_kwargs))

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        return [("U", self.in_features, self.rank), ("V", self.rank, self.out_features)]

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        u, v = weights
        return F.linear(F.linear(x, u), v)

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        u, v = weights
        return F.linear(F.linear(x, u), v, bias)

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s[: self.rank].sqrt()
        self.V.copy_(u[:, : self.rank] * root)
        self.U.copy_(root[:, None] * vh[: self.rank])

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank, **super().options()}
