"""``einsum``: the continuous two-core Einsum family (Potapczynski et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import btt2_matmul
from ..taxonomy import THETA_PRESETS, Taxonomy, Theta, parse_theta
from .base import StructuredLinear
from .factorize import DEFAULT_MAX_IMBALANCE, DEFAULT_PAD_TOLERANCE
from .registry import register_structure

__all__ = ["EinsumLinear", "EinsumSizes", "plan_einsum_sizes"]


class EinsumSizes(NamedTuple):
    """Integer index sizes ``d_α ... d_ρ`` of an Einsum layer (``d_in = d_α d_β d_γ`` padded)."""

    alpha: int
    beta: int
    gamma: int
    delta: int
    epsilon: int
    phi: int
    rho: int


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return small + [n // k for k in reversed(small) if k * k != n]


def _factorisations(p: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered way of writing ``p`` as a product of ``k`` positive integers."""
    if k == 1:
        return [(p,)]
    return [(f, *rest) for f in _divisors(p) for rest in _factorisations(p // f, k - 1)]


def _nearest_split(p: int, targets: tuple[float, ...]) -> tuple[int, ...] | None:
    """The split of ``p`` nearest to ``targets`` in log scale (ties: smallest first), among those
    whose every factor is at most ``DEFAULT_MAX_IMBALANCE * ceil(target)``; None if there is none.
    """
    best: tuple[float, tuple[int, ...]] | None = None
    caps = [DEFAULT_MAX_IMBALANCE * math.ceil(round(t, 9)) for t in targets]
    for sizes in _factorisations(p, len(targets)):
        if any(s > cap for s, cap in zip(sizes, caps, strict=True)):
            continue
        key = (max(abs(math.log(s / t)) for s, t in zip(sizes, targets, strict=True)), sizes)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


@lru_cache(maxsize=4096)
def _plan_width(size: int, exponents: tuple[float, ...]) -> tuple[int, ...]:
    """Sizes ``s_i ≈ size^{e_i}`` (slowest index first) whose product is the smallest ``p >= size``
    that has a split within ``DEFAULT_MAX_IMBALANCE`` of every target. A zero exponent gives 1.

    The search ends at the latest at ``prod(ceil(size^{e_i}))``, which always qualifies.
    """
    live = [i for i, e in enumerate(exponents) if e > 0]
    targets = tuple(size ** exponents[i] for i in live)
    p = size
    while (split := _nearest_split(p, targets)) is None:
        p += 1
    sizes = [1] * len(exponents)
    for i, s in zip(live, split, strict=True):
        sizes[i] = s
    return tuple(sizes)


def plan_einsum_sizes(
    in_features: int,
    out_features: int,
    theta: Theta,
    pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
    owner: str = "einsum",
) -> EinsumSizes:
    """Integer index sizes of the Einsum layer ``theta`` for the given widths.

    ``d_α, d_β, d_γ`` round ``d_in^α, d_in^β, d_in^γ`` to integers whose product ``in_padded`` is
    ``d_in`` when ``d_in`` has a split close to the targets (every size at most twice its rounded
    up target, as for BTT and TT), else the nearest larger width that has one: the input is then
    zero-padded. Likewise ``d_δ, d_ε, d_φ`` for ``d_out``, and ``d_ρ = round(min(d_in,
    d_out)^ρ)``. Padding beyond ``pad_tolerance`` (relative) is a ValueError.

    Examples::

        >>> plan_einsum_sizes(768, 3072, parse_theta("btt"))
        EinsumSizes(alpha=32, beta=1, gamma=24, delta=1, epsilon=64, phi=48, rho=1)
        >>> plan_einsum_sizes(97, 97, parse_theta("btt"))[:3]  # 97 is prime: 98 = 7 x 14
        (14, 1, 7)
    """
    a, b, g, d, e, f, r = theta
    sides = (
        ("in_features", in_features, (g, b, a), ("gamma", "beta", "alpha")),
        ("out_features", out_features, (f, e, d), ("phi", "epsilon", "delta")),
    )
    planned = []
    for what, size, exponents, names in sides:
        sizes = _plan_width(size, exponents)
        padding = (math.prod(sizes) - size) / size
        if padding > pad_tolerance:
            raise ValueError(
                f"{owner}: {what}={size} has no split near the sizes theta={theta} asks for "
                f"within pad_tolerance={pad_tolerance:g}; the nearest is {math.prod(sizes)} = "
                f"{' x '.join(f'd_{n}={s}' for n, s in zip(names, sizes, strict=True))} "
                f"({padding:.1%} zero-padding). Pass pad_tolerance "
                f">= {math.ceil(padding * 1000) / 1000:g}, another theta or another width."
            )
        planned.append(sizes)
    (sg, sb, sa), (sf, se, sd) = planned
    rank = max(1, math.floor(min(in_features, out_features) ** r + 0.5))
    return EinsumSizes(sa, sb, sg, sd, se, sf, rank)


@register_structure("einsum")
class EinsumLinear(StructuredLinear):
    """The Einsum layer ``θ = (α, β, γ, δ, ε, φ, ρ)``: one continuous family that contains dense,
    low-rank, Kronecker, tensor-train, Monarch and BTT matrices (Potapczynski et al., NeurIPS
    2024, §3).

    The input is viewed as ``X[γ, β, α]`` (α fastest) and the output as ``Y[φ, ε, δ]`` (δ
    fastest), with index sizes ``d_α ≈ d_in^α``, ..., ``d_ρ ≈ min(d_in, d_out)^ρ`` (see
    :func:`plan_einsum_sizes`; ``α + β + γ = 1 = δ + ε + φ``). Two cores ``A[φ, δ, ρ, γ, α]`` and
    ``B[φ, ε, ρ, γ, β]`` give::

        Z[φ, δ, ρ, γ, β] = sum_α A[φ, δ, ρ, γ, α] X[γ, β, α]
        Y[φ, ε, δ]       = sum_{ρ, γ, β} B[φ, ε, ρ, γ, β] Z[φ, δ, ρ, γ, β]

    α is seen by A only, β by B only, γ by both (a batch index of A); δ is produced by A, ε by
    B, φ by both (a batch index of B); ρ is the rank. A is reused for every β and B for every δ:
    that is the parameter sharing ω of :class:`structlin.taxonomy.Taxonomy`.

    * params = ``|A| + |B| = d_φ d_δ d_ρ d_γ d_α + d_φ d_ε d_ρ d_γ d_β``;
    * MACs per example = ``d_in d_δ d_φ d_ρ + d_φ d_δ d_ρ d_γ d_β d_ε`` (padded ``d_in``), about
      ``d^{1 + ν}`` for a square layer.

    Named points (``theta=`` a preset, see :data:`structlin.taxonomy.THETA_PRESETS`): ``dense``
    ``(1,0,0,1,0,0,0)``; ``low_rank`` ``(1,0,0,0,1,0,ρ)`` (rank ``d^ρ``); ``kron``
    ``(½,½,0,½,½,0,0)`` and ``tt`` ``(½,½,0,½,½,0,¼)`` (``W = sum_ρ B_ρ ⊗ A_ρ``); ``btt`` and
    ``monarch`` ``(½,0,½,0,½,½,0)`` (the 2-core BTT with ``in_factors=(d_γ, d_α)``,
    ``out_factors=(d_φ, d_ε)`` and rank ``d_ρ``: the default). The forward pass runs on the BTT
    kernel whenever ``d_δ = d_β = 1``, and as one or two plain matmuls for dense and low-rank
    sizes; other points use two batched matmuls.

    ``from_dense`` is the best approximation in Frobenius norm: each block ``W[(φ, ε, δ), (γ, β,
    α)]`` of fixed ``(φ, γ)`` is a sum of ``d_ρ`` Kronecker products ``B[ε, β] ⊗ A[δ, α]``, so a
    truncated SVD of the rearranged block (Van Loan and Pitsianis) is optimal, and exact when
    ``W`` is an Einsum matrix of these sizes. With zero-padding the fit is of the zero-padded
    ``W``: still exact at the BTT, low-rank and dense points (zeroing rows or columns of a block
    keeps its rank), otherwise the best fit of the padded matrix rather than of ``W`` alone.

    Args:
        theta: a preset name, a string ``"α/β/γ/δ/ε/φ/ρ"`` (``"0.5/0/0.5/0/0.5/0.5/0"``; the
            spec form, safe in shells and YAML) or seven numbers. Default: ``btt``.
        pad_tolerance: largest relative zero-padding of a width whose sizes do not multiply out.

    Attributes:
        theta: the :class:`structlin.taxonomy.Theta` used.
        sizes: the :class:`EinsumSizes` ``(d_α, d_β, d_γ, d_δ, d_ε, d_φ, d_ρ)``.
        rank: ``d_ρ``.
        weights: the cores ``[A, B]``, a ``ParameterList``.

    Factors: ``weights.0`` (A) stored as ``(d_γ, d_φ d_δ d_ρ, d_α)``: fan-in ``d_α``, fan-out
    ``d_φ d_δ d_ρ``; ``weights.1`` (B) stored as ``(d_φ, d_ε, d_ρ d_γ d_β)``: fan-in
    ``d_ρ d_γ d_β``, fan-out ``d_ε``. These are the fans of the paper's μP initialisation; B is
    the factor zeroed by ``zero_init_last``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = EinsumLinear(768, 3072)  # the full-rank BTT point
        >>> layer(torch.randn(4, 10, 768)).shape
        torch.Size([4, 10, 3072])
        >>> layer.sizes
        EinsumSizes(alpha=32, beta=1, gamma=24, delta=1, epsilon=64, phi=48, rho=1)
        >>> [tuple(w.shape) for w in layer.weights]  # (d_γ, d_φ d_δ d_ρ, d_α), (d_φ, d_ε, ...)
        [(24, 48, 32), (48, 64, 24)]
        >>> layer.macs(), layer.spec, str(layer.taxonomy())
        (110592, 'einsum:theta=btt', 'omega=0 psi=1 nu=0.5')
        >>> tt = EinsumLinear(64, 64, theta="0.5/0.5/0/0.5/0.5/0/0.25")  # TT, rank round(64^¼)
        >>> tt.rank, tt.num_params, tt.macs(), str(tt.taxonomy())
        (3, 448, 3072, 'omega=0.5 psi=1 nu=0.75')
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        theta: str | tuple[float, ...] | Theta | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        name = self._name()
        given = "btt" if theta is None else theta
        try:
            self.theta = parse_theta(given)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        preset = isinstance(given, str) and given.strip() in THETA_PRESETS
        self._theta_text = given.strip() if preset else str(self.theta)
        if isinstance(pad_tolerance, bool) or not isinstance(pad_tolerance, (int, float)):
            raise ValueError(f"{name}: pad_tolerance must be a number >= 0, got {pad_tolerance!r}")
        if not pad_tolerance >= 0:
            raise ValueError(f"{name}: pad_tolerance must be a number >= 0, got {pad_tolerance!r}")
        self.pad_tolerance = pad_tolerance
        self.sizes = s = plan_einsum_sizes(
            in_features, out_features, self.theta, pad_tolerance, owner=name
        )
        self.rank = s.rho
        self.in_padded = s.gamma * s.beta * s.alpha
        self.out_padded = s.phi * s.epsilon * s.delta
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(batch, fo, fi, **self.factory_kwargs))
            for batch, fi, fo in self._core_shapes()
        )

    def _core_shapes(self) -> list[tuple[int, int, int]]:
        """``(batch, fan_in, fan_out)`` of A and B."""
        a, b, g, d, e, f, r = self.sizes
        return [(g, a, f * d * r), (f, r * g * b, e)]

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        return [(f"weights.{t}", fi, fo) for t, (_, fi, fo) in enumerate(self._core_shapes())]

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        a_size, b_size, g, d, e, f, r = self.sizes
        core_a, core_b = weights
        n = x.shape[0]
        # X[n, γ, β, α] -> (γ, n β, α) @ A[γ]^T -> Z (γ, n β, φ δ ρ). Matmuls rather than einsum
        # so that FlopCounterMode also counts size-1 contractions.
        xs = x.reshape(n, g, b_size, a_size).transpose(0, 1).reshape(g, n * b_size, a_size)
        z = torch.matmul(xs, core_a.mT)
        z = z.reshape(g, n, b_size, f, d, r).permute(3, 1, 4, 5, 0, 2)  # (φ, n, δ, ρ, γ, β)
        y = torch.matmul(z.reshape(f, n * d, r * g * b_size), core_b.mT)  # (φ, n δ, ε)
        return y.reshape(f, n, d, e).permute(1, 0, 3, 2).reshape(n, self.out_padded)

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        _, b_size, g, d, _, f, _ = self.sizes
        core_a, core_b = weights
        if core_b.numel() == 1:  # dense in A (the "dense" point): W = b A
            return F.linear(x, core_a[0] * core_b.reshape(()), bias)
        if core_a.numel() == 1:  # dense in B
            return F.linear(x, core_b[0] * core_a.reshape(()), bias)
        if d == b_size == 1:
            if g == f == 1:  # low-rank: W = B A
                return F.linear(F.linear(x, core_a[0]), core_b[0], bias)
            # the BTT vector case: A = (m1, n0 r, m0), B = (n0, n1, r m1), the kernel's layout
            return btt2_matmul(x, core_a, core_b, bias)
        y = self._reference_matmul(x, weights)
        return y if bias is None else y + bias

    def _macs_per_example(self) -> int:
        _, b, g, d, e, f, r = self.sizes
        return self.in_padded * d * f * r + f * d * r * g * b * e

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        a, b, g, d, e, f, r = self.sizes
        # Block (φ, γ) rearranged to rows (ε, β) and columns (δ, α): rank <= d_ρ when W fits.
        blocks = weight.reshape(f, e, d, g, b, a).permute(0, 3, 1, 4, 2, 5)
        u, s, vh = torch.linalg.svd(blocks.reshape(f, g, e * b, d * a), full_matrices=False)
        q = min(r, s.shape[-1])
        root = s[..., :q].sqrt()
        left = weight.new_zeros(f, g, e * b, r)
        left[..., :q] = u[..., :q] * root[..., None, :]
        right = weight.new_zeros(f, g, r, d * a)
        right[..., :q, :] = root[..., :, None] * vh[..., :q, :]
        core_a = right.reshape(f, g, r, d, a).permute(1, 0, 3, 2, 4).reshape(g, f * d * r, a)
        core_b = left.reshape(f, g, e, b, r).permute(0, 2, 4, 1, 3).reshape(f, e, r * g * b)
        self.weights[0].copy_(core_a)
        self.weights[1].copy_(core_b)

    def taxonomy(self) -> Taxonomy:
        """ω (parameter sharing), ψ (rank) and ν (compute exponent) of ``theta``."""
        return self.theta.taxonomy()

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"theta": self._theta_text}
        if self.pad_tolerance != DEFAULT_PAD_TOLERANCE:
            opts["pad_tolerance"] = self.pad_tolerance
        return {**opts, **super().options()}

    def extra_repr(self) -> str:
        # theta as in the spec (unquoted), then where the layer sits in the taxonomy.
        text = super().extra_repr()
        text = text.replace(f"theta={self._theta_text!r}", f"theta={self._theta_text}", 1)
        return f"{text}, taxonomy=({self.taxonomy()})"
