"""``monarch``: Monarch matrices (Dao et al., 2022) with ``b`` blocks, on the BTT kernel."""

from __future__ import annotations

import math
from typing import Any

from ..options import check_positive_int
from .base import StructuredLinear
from .btt import BTTLinear
from .factorize import DEFAULT_PAD_TOLERANCE
from .registry import register_structure

__all__ = ["MonarchLinear"]


@register_structure("monarch")
class MonarchLinear(BTTLinear):
    """Monarch matrix ``W = P_2 R P_1 L`` with ``b`` dense blocks in each factor.

    Block-diagonal ``L`` (``b`` blocks ``in_blk -> h``), a fixed permutation, block-diagonal ``R``
    (``b`` blocks ``h -> out_blk``), with ``in_blk = ceil(d_in / b)``, ``out_blk = ceil(d_out / b)``
    and hidden block width ``h = min(in_blk, out_blk)`` rounded up to a multiple of ``b``.
    This is exactly a 2-core :class:`BTTLinear` with ``in_factors=(b, in_blk)``,
    ``out_factors=(b, out_blk)`` and rank ``h / b``, so it runs on the same kernel. Widths that
    ``b`` does not divide are zero-padded to ``b * ceil(d / b)``, at most ``pad_tolerance``
    (relative) above ``d``; ``structurize``'s report shows the padding.

    Params = MACs per example = ``b * h * (in_blk + out_blk)``, about ``2 d^2 / b`` for square
    ``d`` (``b = 4``: half of dense).

    Args:
        blocks: ``b`` (default 4, the paper's setting), at most ``min(d_in, d_out)``.
        pad_tolerance: largest relative zero-padding ``(b * ceil(d / b) - d) / d`` accepted on
            either side (default 0.15, as for the other factorised structures).

    Factors: ``weights.0`` ``(b, h, in_blk)`` (fan-in ``in_blk``, fan-out ``h``) and
    ``weights.1`` ``(b, out_blk, h)`` (fan-in ``h``, fan-out ``out_blk``).

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = MonarchLinear(256, 256, blocks=4)
        >>> layer(torch.randn(8, 256)).shape
        torch.Size([8, 256])
        >>> [tuple(w.shape) for w in layer.weights]  # (b, h, in_blk), (b, out_blk, h)
        [(4, 64, 64), (4, 64, 64)]
        >>> layer.macs() / layer.dense_macs  # 2 / b
        0.5
        >>> layer.spec, (layer.cores, layer.rank)  # a 2-core BTT of rank h / b
        ('monarch:blocks=4', (2, 16))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocks: int = 4,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        name = f"{type(self).__name__}(in_features={in_features}, out_features={out_features})"
        check_positive_int(name, "in_features", in_features)
        check_positive_int(name, "out_features", out_features)
        b = check_positive_int(name, "blocks", blocks)
        if b > min(in_features, out_features):
            raise ValueError(
                f"{name}: blocks must be at most min(in_features, out_features) = "
                f"{min(in_features, out_features)}, got {b}"
            )
        in_blk = math.ceil(in_features / b)
        out_blk = math.ceil(out_features / b)
        for what, size, blk in (("in", in_features, in_blk), ("out", out_features, out_blk)):
            if b * blk > size * (1 + pad_tolerance):
                fits = [k for k in range(2, min(in_features, out_features) + 1) if size % k == 0]
                raise ValueError(
                    f"{name}: blocks={b} zero-pads {what}_features {size} -> {b * blk} "
                    f"({(b * blk - size) / size:.0%}), more than "
                    f"pad_tolerance={pad_tolerance:.0%}; "
                    f"pass blocks dividing {size} (e.g. {fits[:6]}) or raise pad_tolerance"
                )
        self.blocks = b
        self.monarch_pad_tolerance = pad_tolerance
        super().__init__(
            in_features,
            out_features,
            bias,
            cores=2,
            rank=math.ceil(min(in_blk, out_blk) / b),
            in_factors=(b, in_blk),
            out_factors=(b, out_blk),
            pad_tolerance=math.inf,
            **kwargs,
        )

    def options(self) -> dict[str, Any]:
        # blocks fixes the BTT options (cores, rank, factors), so only the common ones follow.
        opts: dict[str, Any] = {"blocks": self.blocks}
        if self.monarch_pad_tolerance != DEFAULT_PAD_TOLERANCE:
            opts["pad_tolerance"] = self.monarch_pad_tolerance
        return {**opts, **StructuredLinear.options(self)}
