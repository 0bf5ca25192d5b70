"""``block_diag``: ``b`` independent dense blocks on the diagonal."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..options import check_positive_int
from .base import StructuredLinear
from .registry import register_structure

__all__ = ["BlockDiagLinear"]


@register_structure("block_diag")
class BlockDiagLinear(StructuredLinear):
    """Block-diagonal ``W`` with ``b`` blocks of size ``ceil(d_out/b) x ceil(d_in/b)``.

    Input block ``k`` (features ``k*in_blk ... (k+1)*in_blk - 1``) feeds only output block ``k``.
    Widths that ``b`` does not divide are zero-padded to ``b * ceil(d / b)``.

    Args:
        blocks: ``b``, at most ``min(d_in, d_out)``. Default 4.

    Factors: ``weight`` ``(b, out_blk, in_blk)``, fan-in ``in_blk``, fan-out ``out_blk``.
    Params = MACs per example = ``b * in_blk * out_blk`` (about ``d_in d_out / b``).

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = BlockDiagLinear(96, 64, blocks=4)
        >>> layer(torch.randn(5, 96)).shape
        torch.Size([5, 64])
        >>> layer.weight.shape, layer.macs(), layer.spec  # 4 blocks of 16 x 24
        (torch.Size([4, 16, 24]), 1536, 'block_diag:blocks=4')
        >>> w = layer.to_dense()
        >>> bool(w[:16, 24:].eq(0).all())  # output block 0 sees only input block 0
        True
        >>> BlockDiagLinear(10, 10, blocks=4).in_padded  # widths padded to 4 * ceil(10 / 4)
        12
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocks: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        blocks = check_positive_int(self._name(), "blocks", blocks)
        if blocks > min(in_features, out_features):
            raise ValueError(
                f"{self._name()}: blocks must be at most min(in_features, out_features) = "
                f"{min(in_features, out_features)}, got {blocks}"
            )
        self.blocks = blocks
        self.in_blk = math.ceil(in_features / blocks)
        self.out_blk = math.ceil(out_features / blocks)
        self.in_padded = blocks * self.in_blk
        self.out_padded = blocks * self.out_blk
        shape = (blocks, self.out_blk, self.in_blk)
        self.weight = nn.Parameter(torch.empty(shape, **self.factory_kwargs))

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        return [("weight", self.in_blk, self.out_blk)]

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        batch = x.shape[0]
        xb = x.view(batch, self.blocks, self.in_blk).transpose(0, 1)  # (b, N, in_blk)
        # bmm rather than einsum: einsum turns a size-1 contraction into an elementwise product,
        # which FlopCounterMode does not count.
        y = torch.bmm(xb, weights[0].mT)  # (b, N, out_blk)
        return y.transpose(0, 1).reshape(batch, self.out_padded)

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        w = weight.view(self.blocks, self.out_blk, self.blocks, self.in_blk)
        self.weight.copy_(torch.diagonal(w, dim1=0, dim2=2).permute(2, 0, 1))

    def options(self) -> dict[str, Any]:
        return {"blocks": self.blocks, **super().options()}
