"""``tt``: tensor-train (TT-matrix) layers, a sum of ``r^(c-1)`` Kronecker products."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..options import check_positive_int
from .base import StructuredLinear
from .factorize import DEFAULT_PAD_TOLERANCE, plan_widths, width_options
from .registry import register_structure

__all__ = ["TTLinear"]


@register_structure("tt")
class TTLinear(StructuredLinear):
    """Tensor-train matrix with ``c`` cores and rank ``r``.

    The widths are factorised slowest index first, ``d_in = m_0 m_1 ... m_{c-1}`` and
    ``d_out = n_0 ... n_{c-1}`` (balanced by default), and

    ``W[(j_0..j_{c-1}), (i_0..i_{c-1})] = sum_rho prod_t G_t[rho_t, i_t, j_t, rho_{t+1}]``

    with ``rho_0 = rho_c = 1`` and interior ranks ``r``. Core ``t`` is a single dense map
    ``(r_t, m_t) -> (n_t, r_{t+1})`` applied at every position of the other modes, so parameters
    are far fewer than MACs (weight sharing):

    * params = ``sum_t r_t m_t n_t r_{t+1}``;
    * MACs per example = ``sum_t (prod_{s>t} m_s)(prod_{s<t} n_s) r_t m_t n_t r_{t+1}``
      (square ``d``, ``c = 2``: ``2 r d^{3/2}``).

    Args:
        cores: ``c >= 2``. Default 2.
        rank: interior TT rank (default 16, the paper's MLP setting). Each bond's rank is capped at
            the largest useful value ``min(prod_{s<t} m_s n_s, prod_{s>=t} m_s n_s)``; an explicit
            rank above every bond's cap is an error.
        in_factors, out_factors: explicit factorisations (slowest first); their product may exceed
            the width by at most ``pad_tolerance`` (zero-padding).
        pad_tolerance: largest relative zero-padding used when a width has no balanced split.

    Attributes:
        cores, rank: ``c`` and ``r`` as used (``rank`` is the largest bond rank after capping).
        ranks: all bond ranks ``(1, r_1, ..., r_{c-1}, 1)``.
        in_factors, out_factors: ``m`` and ``n``, slowest first.
        weights: the cores, a ``ParameterList``.

    Factors: ``weights.t`` stored as ``(n_t r_{t+1}, r_t m_t)``: fan-in ``r_t m_t``, fan-out
    ``n_t r_{t+1}``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = TTLinear(768, 3072, rank=4)
        >>> layer(torch.randn(2, 768)).shape
        torch.Size([2, 3072])
        >>> layer.in_factors, layer.out_factors, layer.ranks
        ((24, 32), (48, 64), (1, 4, 1))
        >>> [tuple(w.shape) for w in layer.weights]  # (n_t r_{t+1}, r_t m_t)
        [(192, 24), (64, 128)]
        >>> layer.num_params - 3072, layer.macs()  # weight sharing: far more MACs than params
        (12800, 540672)
        >>> layer.spec
        'tt:cores=2,rank=4,in_factors=24x32,out_factors=48x64'
    """

    _default_rank = 16

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        cores: int = 2,
        rank: int | None = None,
        in_factors: tuple[int, ...] | None = None,
        out_factors: tuple[int, ...] | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        plan = plan_widths(
            self._name(), in_features, out_features, cores, in_factors, out_factors, pad_tolerance
        )
        self.cores = plan.cores
        self.in_factors, self.out_factors = plan.in_factors, plan.out_factors
        self.in_padded, self.out_padded = plan.in_padded, plan.out_padded
        self.pad_tolerance = pad_tolerance
        self.ranks = self._plan_ranks(rank)
        self.rank = max(self.ranks)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(fo, fi, **self.factory_kwargs))
            for _, fi, fo in self._factor_fans()
        )

    def _plan_ranks(self, rank: int | None) -> tuple[int, ...]:
        c = len(self.in_factors)
        sizes = [m * n for m, n in zip(self.in_factors, self.out_factors, strict=True)]
        caps = [min(math.prod(sizes[:t]), math.prod(sizes[t:])) for t in range(1, c)]
        if rank is None:
            rank = self._default_rank
        else:
            rank = check_positive_int(self._name(), "rank", rank)
            if rank > max(caps):
                raise ValueError(
                    f"{self._name()}: rank {rank} exceeds the largest useful TT rank "
                    f"{max(caps)} for "
                    f"in_factors={self.in_factors}, out_factors={self.out_factors}; pass rank <= "
                    f"{max(caps)}"
                )
        return (1, *(min(rank, cap) for cap in caps), 1)

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        r, m, n = self.ranks, self.in_factors, self.out_factors
        return [(f"weights.{t}", r[t] * m[t], n[t] * r[t + 1]) for t in range(len(m))]

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        m, n, r = self.in_factors, self.out_factors, self.ranks
        batch = x.shape[0]
        # state (N, remaining inputs, produced outputs, rank); contract the slowest input left.
        s = x.reshape(batch, self.in_padded, 1, 1)
        for t, g in enumerate(weights):
            rest = s.shape[1] // m[t]
            done = s.shape[2]
            # (N, m_t, rest, done, r_t) -> rows (N, rest, done), columns (r_t, m_t): one matmul
            # with the core (a matmul, not an einsum, so FlopCounterMode counts size-1 contractions)
            s = s.reshape(batch, m[t], rest, done, r[t]).permute(0, 2, 3, 4, 1)
            s = s.reshape(batch * rest * done, r[t] * m[t]) @ g.T
            s = s.reshape(batch, rest, done * n[t], r[t + 1])
        return s.reshape(batch, self.out_padded)

    def _macs_per_example(self) -> int:
        m, n, r = self.in_factors, self.out_factors, self.ranks
        return sum(
            math.prod(m[t + 1 :]) * math.prod(n[:t]) * r[t] * m[t] * n[t] * r[t + 1]
            for t in range(len(m))
        )

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        cores = self._tt_svd(weight)
        if (self.in_padded, self.out_padded) != (self.in_features, self.out_features):
            cores = self._complete_padding(weight, cores)
        for param, core in zip(self.weights, cores, strict=True):
            param.copy_(core)

    def _tt_svd(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """TT-SVD of the padded ``W``: the cores in their stored layout (``weight``'s dtype)."""
        # W rearranged so that mode t is (i_t, j_t); for c = 2, rank 1 this is the Van
        # Loan-Pitsianis nearest Kronecker product.
        m, n, r = self.in_factors, self.out_factors, self.ranks
        c = len(m)
        t_ = weight.reshape(*n, *m)
        perm = [p for t in range(c) for p in (c + t, t)]  # (i_0, j_0, i_1, j_1, ...)
        rem = t_.permute(*perm).reshape(1, -1)
        cores = []
        for t in range(c):
            rows = r[t] * m[t] * n[t]
            mat = rem.reshape(rows, -1)
            if t == c - 1:
                core = mat.reshape(r[t], m[t], n[t], 1)
            else:
                u, s, vh = torch.linalg.svd(mat, full_matrices=False)
                k = min(r[t + 1], s.numel())
                core = torch.zeros(rows, r[t + 1], dtype=mat.dtype, device=mat.device)
                core[:, :k] = u[:, :k]
                rem = torch.zeros(r[t + 1], mat.shape[1], dtype=mat.dtype, device=mat.device)
                rem[:k] = s[:k, None] * vh[:k]
                core = core.reshape(r[t], m[t], n[t], r[t + 1])
            cores.append(core.permute(2, 3, 0, 1).reshape(n[t] * r[t + 1], r[t] * m[t]))
        return cores

    def _complete_padding(
        self, weight: torch.Tensor, cores: list[torch.Tensor], steps: int = 300
    ) -> list[torch.Tensor]:
        """Refit the cores to the real ``out_features x in_features`` block of ``weight`` alone.

        The padded rows and columns are not part of ``W``: a TT whose real block equals ``W``
        generally has non-zero padded entries, so TT-SVD of the zero-padded matrix is not exact
        even when ``W`` is representable. Hard imputation: fill the padded entries with the
        current fit's values and redo TT-SVD, keeping the best fit of the real block. Each step
        cannot be much worse than the last (TT-SVD is quasi-optimal), and a representable ``W``
        converges to it linearly; stops once the real-block error is at rounding level or stalls.
        """
        real = (slice(0, self.out_features), slice(0, self.in_features))
        target = weight[real]
        scale = float(target.norm()) or 1.0
        eye = torch.eye(self.in_padded, dtype=weight.dtype, device=weight.device)
        best, best_err, last_err = cores, math.inf, math.inf
        for _ in range(steps):
            dense = self._reference_matmul(eye, cores).T
            err = float((dense[real] - target).norm()) / scale
            if err < best_err:
                best, best_err = cores, err
            if err < 1e-13 or err > 0.999 * last_err:  # exact, or no longer improving
                break
            last_err = err
            dense[real] = target
            cores = self._tt_svd(dense)
        return best

    def options(self) -> dict[str, Any]:
        sizes = (self.in_factors, self.out_factors, self.pad_tolerance)
        return {**width_options(self.cores, self.rank, *sizes), **super().options()}
