"""``btt``: Block Tensor-Train layers (Qiu et al., 2024), Monarch's generalisation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels.btt import btt2_matmul, btt_chain_matmul
from ..options import check_positive_int
from .base import StructuredLinear
from .factorize import DEFAULT_PAD_TOLERANCE, plan_widths, width_options
from .registry import register_structure

__all__ = ["BTTLinear"]


@register_structure("btt")
class BTTLinear(StructuredLinear):
    """Block Tensor-Train matrix with ``c`` cores and rank ``r``.

    The widths are factorised slowest index first: ``x`` is viewed as ``(m_{c-1}, ..., m_1, m_0)``
    and ``y`` as ``(n_0, ..., n_{c-1})``. Core ``t`` contracts input factor ``m_t`` (fastest first)
    together with the incoming rank, and emits output factor ``n_t`` with the outgoing rank; it
    is a batch of independent dense blocks ``(r_t, m_t) -> (n_t, r_{t+1})``, one for every value
    of the outputs already produced (``P_t = prod_{s<t} n_s``) and the inputs not yet contracted
    (``Q_t = prod_{s>t} m_s``). Ranks are ``r_0 = r_c = 1`` and ``r`` inside.

    For ``c = 2``::

        y[j0, j1] = sum_{i1, rho} W1[j0, j1, (rho, i1)] sum_{i0} W0[i1, (j0, rho), i0] x[i1, i0]

    i.e. block-diagonal, permute, block-diagonal: with ``r = 1`` and ``m = n = sqrt(d)`` this is a
    Monarch matrix with ``sqrt(d)`` blocks; it is full rank for any ``r``.

    No weight is shared, so params = MACs per example ``= sum_t P_t Q_t r_t m_t n_t r_{t+1}``;
    for ``c = 2``: ``r (d_in n_0 + d_out m_1)``, i.e. ``2 r d^{3/2}`` for square ``d``.

    Args:
        cores: ``c >= 2``. Default 2 (the paper's fast path; two batched matmuls with a
            hand-written backward). ``c > 2`` uses a general batch-last matmul chain.
        rank: ``r`` (default 1). At most ``max_t min(prod_{s<=t} m_s, prod_{s>t} n_s)``; for
            ``c = 2`` that is ``min(m_0, n_1)``.
        in_factors, out_factors: explicit factorisations, slowest first (``in_factors=(24, 32)``
            views the input as 24 blocks of 32); balanced by default. Their product may exceed the
            width by at most ``pad_tolerance`` (zero-padding).
        pad_tolerance: largest relative zero-padding used when a width has no balanced split.

    Attributes:
        cores, rank: ``c`` and ``r``.
        ranks: all bond ranks ``(1, r, ..., r, 1)``.
        in_factors, out_factors: ``m`` and ``n``, slowest first.
        weights: the cores, a ``ParameterList``.

    Factors: ``weights.t`` of shape ``(P_t Q_t, n_t r_{t+1}, r_t m_t)``: fan-in ``r_t m_t``,
    fan-out ``n_t r_{t+1}``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = BTTLinear(768, 3072, rank=2)
        >>> layer(torch.randn(4, 10, 768)).shape
        torch.Size([4, 10, 3072])
        >>> layer.in_factors, layer.out_factors
        ((24, 32), (48, 64))
        >>> [tuple(w.shape) for w in layer.weights]  # (P_t Q_t, n_t r_{t+1}, r_t m_t)
        [(24, 96, 32), (48, 64, 48)]
        >>> [(f.fan_in, f.fan_out) for f in layer.factors()]
        [(32, 96), (48, 64)]
        >>> layer.macs(), layer.dense_macs  # r (d_in n_0 + d_out m_1)
        (221184, 2359296)
        >>> layer.spec
        'btt:cores=2,rank=2,in_factors=24x32,out_factors=48x64'
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        cores: int = 2,
        rank: int = 1,
        in_factors: tuple[int, ...] | None = None,
        out_factors: tuple[int, ...] | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        name = self._name()
        rank = check_positive_int(name, "rank", rank)
        plan = plan_widths(
            name, in_features, out_features, cores, in_factors, out_factors, pad_tolerance
        )
        self.cores = cores = plan.cores
        self.in_factors, self.out_factors = plan.in_factors, plan.out_factors
        self.in_padded, self.out_padded = plan.in_padded, plan.out_padded
        self.pad_tolerance = pad_tolerance
        ms, ns = self._ms, self.out_factors
        cap = max(min(math.prod(ms[: t + 1]), math.prod(ns[t + 1 :])) for t in range(cores - 1))
        if rank > cap:
            raise ValueError(
                f"{name}: rank {rank} exceeds the largest useful BTT rank {cap} for "
                f"in_factors={self.in_factors}, out_factors={self.out_factors}; pass rank <= {cap}"
            )
        self.rank = rank
        self.ranks = (1, *([rank] * (cores - 1)), 1)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(batch, fo, fi, **self.factory_kwargs))
            for batch, fi, fo in self._core_shapes()
        )

    @property
    def _ms(self) -> tuple[int, ...]:
        """Input factors in contraction order (fastest first)."""
        return tuple(reversed(self.in_factors))

    def _core_shapes(self) -> list[tuple[int, int, int]]:
        ms, ns, rs = self._ms, self.out_factors, self.ranks
        return [
            (math.prod(ns[:t]) * math.prod(ms[t + 1 :]), rs[t] * ms[t], ns[t] * rs[t + 1])
            for t in range(len(ms))
        ]

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        return [(f"weights.{t}", fi, fo) for t, (_, fi, fo) in enumerate(self._core_shapes())]

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        if len(weights) == 2:
            return btt2_matmul(x, weights[0], weights[1], bias)
        return btt_chain_matmul(x, weights, self._ms, self.out_factors, self.ranks, bias)

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        ms, ns, rs = self._ms, self.out_factors, self.ranks
        batch = x.shape[0]
        s = x.reshape(batch, 1, self.in_padded // ms[0], ms[0])  # (N, P, Q, r*m)
        for t, g in enumerate(weights):
            p, q = s.shape[1], s.shape[2]
            # batched over (p, q): (N, k) @ (k, o); a matmul so that FlopCounterMode also counts
            # size-1 contractions (einsum turns those into an uncounted elementwise product)
            z = torch.matmul(s.permute(1, 2, 0, 3), g.view(p, q, g.shape[1], g.shape[2]).mT)
            z = z.permute(2, 0, 1, 3)  # (N, p, q, o)
            if t == len(weights) - 1:
                return z.reshape(batch, self.out_padded)
            q_next = q // ms[t + 1]
            z = z.view(batch, p, q_next, ms[t + 1], ns[t], rs[t + 1]).permute(0, 1, 4, 2, 5, 3)
            s = z.reshape(batch, p * ns[t], q_next, rs[t + 1] * ms[t + 1])
        raise AssertionError("unreachable")

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        for core, value in zip(self.weights, self._decompose(weight), strict=True):
            core.copy_(value)

    def _decompose(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """Blockwise truncated SVDs, last core first (exact when ``W`` is a rank-r BTT).

        Splitting off the last core leaves, for every value of the last input factor, a map from
        the remaining inputs to (the remaining outputs, rank) that is again a BTT with one core
        fewer; it is decomposed the same way.
        """
        ms, ns, r = self._ms, self.out_factors, self.rank
        cores: list[torch.Tensor] = []
        # a: (E, outputs of the sub-problem, inputs of the sub-problem); E = fixed slow inputs.
        a = weight.reshape(1, weight.shape[0], weight.shape[1])
        out_last = ns[-1]
        for k in range(len(ms), 1, -1):
            e = a.shape[0]
            m_last, m_first = ms[k - 1], math.prod(ms[: k - 1])
            jf = a.shape[1] // out_last
            blocks = a.reshape(e, jf, out_last, m_last, m_first).permute(0, 3, 1, 2, 4)
            u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # over (e, i_last, jf)
            q = min(r, s.shape[-1])
            root = s[..., :q].sqrt()
            left = torch.zeros(*u.shape[:-1], r, dtype=u.dtype, device=u.device)
            left[..., :q] = u[..., :q] * root[..., None, :]
            right = torch.zeros(*vh.shape[:-2], r, m_first, dtype=u.dtype, device=u.device)
            right[..., :q, :] = root[..., :, None] * vh[..., :q, :]
            # last core: batch (jf, e), fan-out out_last, fan-in (rho, i_last)
            core = left.permute(2, 0, 3, 4, 1).reshape(jf * e, out_last, r * m_last)
            cores.append(core)
            # remaining: E' = (e, i_last); outputs (jf, rho); inputs m_first
            a = right.reshape(e * m_last, jf * r, m_first)
            out_last = ns[k - 2] * r
        cores.append(a)
        return cores[::-1]

    def options(self) -> dict[str, Any]:
        sizes = (self.in_factors, self.out_factors, self.pad_tolerance)
        return {**width_options(self.cores, self.rank, *sizes), **super().options()}
