"""``kron``: Kronecker product of ``c`` dense factors (a rank-1 tensor train)."""

from __future__ import annotations

from typing import Any

from .factorize import DEFAULT_PAD_TOLERANCE
from .registry import register_structure
from .tt import TTLinear

__all__ = ["KronLinear"]


@register_structure("kron")
class KronLinear(TTLinear):
    """``W = A_0 ⊗ A_1 ⊗ ... ⊗ A_{c-1}`` with ``A_t`` of shape ``(n_t, m_t)``.

    A :class:`TTLinear` with rank 1. Square ``d`` and ``c = 2``: params ``2d``, MACs
    ``2 d^{3/2}`` per example. ``from_dense`` gives the Van Loan-Pitsianis nearest Kronecker
    product for ``c = 2`` (TT-SVD with rank 1 in general).

    Args:
        cores: number of Kronecker factors ``c >= 2``. Default 2.
        in_factors, out_factors, pad_tolerance: as for :class:`TTLinear`.

    Factors: ``weights.t`` of shape ``(n_t, m_t)``: fan-in ``m_t``, fan-out ``n_t``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = KronLinear(64, 32, bias=False)
        >>> layer(torch.randn(3, 64)).shape
        torch.Size([3, 32])
        >>> a, b = layer.weights  # (n_0, m_0) = (4, 8), (n_1, m_1) = (8, 8)
        >>> torch.allclose(layer.to_dense(), torch.kron(a, b))
        True
        >>> layer.num_params, layer.macs(), layer.spec
        (96, 512, 'kron:cores=2,in_factors=8x8,out_factors=4x8')
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        cores: int = 2,
        in_factors: tuple[int, ...] | None = None,
        out_factors: tuple[int, ...] | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            cores=cores,
            rank=1,
            in_factors=in_factors,
            out_factors=out_factors,
            pad_tolerance=pad_tolerance,
            **kwargs,
        )

    def options(self) -> dict[str, Any]:
        opts = super().options()
        del opts["rank"]  # always 1, not an option of a Kronecker product
        return opts
