"""Balanced integer factorisation of layer widths, with zero-padding for awkward sizes.

Tensor-train, Kronecker and Block Tensor-Train layers reshape a width ``d`` into ``c`` factors
``d = f_1 * ... * f_c``. Their cost and expressiveness depend on the factors being close to
``d ** (1/c)``: ``768 = 24 * 32`` is good, ``16 * 48`` (a greedy prime split) is worse, and a prime
such as GPT-2's vocabulary size 50257 only splits as ``1 * 50257``, which makes the layer
essentially dense in one core.

:func:`balanced_factors` finds the factorisation with the smallest largest factor.
:func:`plan_factors` decides whether that is balanced enough; if not, it looks for the nearest
larger size (within a relative tolerance) that factorises well, and the layer zero-pads its input
or output to that size. :func:`plan_widths` does both widths of a ``c``-core layer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from ..options import check_positive_int

__all__ = [
    "FactorPlan",
    "WidthPlan",
    "balanced_factors",
    "is_balanced",
    "plan_factors",
    "plan_widths",
    "width_options",
]

#: A factorisation is "balanced" when its largest factor is at most this many times
#: ``ceil(d ** (1/c))``. With 2 this admits 24 x 32 for 768 and 2 x 4 for 8, but not 1 x 13.
DEFAULT_MAX_IMBALANCE = 2.0
#: Default largest relative zero-padding accepted for a width that does not factorise well.
DEFAULT_PAD_TOLERANCE = 0.15


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for k in range(1, math.isqrt(n) + 1):
        if n % k == 0:
            small.append(k)
            if k != n // k:
                large.append(n // k)
    return small + large[::-1]


@lru_cache(maxsize=4096)
def balanced_factors(n: int, c: int) -> tuple[int, ...]:
    """Split ``n`` into ``c`` integer factors whose product is exactly ``n``.

    Among all such factorisations, returns the one with the smallest largest factor (ties broken
    by the largest smallest factor), sorted ascending. ``balanced_factors(768, 2) == (24, 32)``,
    ``balanced_factors(3072, 3) == (12, 16, 16)``, and a prime ``p`` gives ``(1, ..., 1, p)``.
    """
    if n < 1 or c < 1:
        raise ValueError(f"balanced_factors expects n >= 1 and c >= 1, got n={n}, c={c}")
    if c == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    best_key: tuple[int, int] | None = None
    # The smallest factor f of a balanced split satisfies f <= n ** (1/c).
    for f in _divisors(n):
        if f**c > n:
            break
        rest = balanced_factors(n // f, c - 1)
        cand = tuple(sorted((f, *rest)))
        key = (cand[-1], -cand[0])
        if best_key is None or key < best_key:
            best, best_key = cand, key
    assert best is not None
    return best


def is_balanced(factors: tuple[int, ...], max_imbalance: float = DEFAULT_MAX_IMBALANCE) -> bool:
    """Whether the largest factor is at most ``max_imbalance * ceil(d ** (1/c))``."""
    d, c = math.prod(factors), len(factors)
    ideal = math.ceil(round(d ** (1.0 / c), 9))
    return max(factors) <= max_imbalance * ideal


def _usable(factors: tuple[int, ...], max_imbalance: float) -> bool:
    """Balanced, and no factor is 1 (with two or more factors, a factor of 1 is a degenerate
    core: ``btt:cores=10`` on 64 would otherwise split it as ``(1, 1, 1, 1, 2, ..., 2)``)."""
    return is_balanced(factors, max_imbalance) and (len(factors) == 1 or min(factors) > 1)


@dataclass(frozen=True)
class FactorPlan:
    """How a width ``size`` is factorised: ``padded = prod(factors) >= size``."""

    size: int
    factors: tuple[int, ...]

    @property
    def padded(self) -> int:
        return math.prod(self.factors)

    @property
    def padding(self) -> int:
        return self.padded - self.size


def plan_factors(
    size: int,
    c: int,
    factors: tuple[int, ...] | list[int] | None = None,
    *,
    pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
    what: str = "width",
    owner: str = "layer",
) -> FactorPlan:
    """Factorise ``size`` into ``c`` factors, zero-padding ``size`` if it has no balanced split.

    Args:
        size: the width to factorise (``in_features`` or ``out_features``).
        c: number of factors.
        factors: explicit factors chosen by the user. Their product must be at least ``size`` and
            at most ``size * (1 + pad_tolerance)``; the excess is zero-padding.
        pad_tolerance: largest accepted relative padding ``(padded - size) / size``.
        max_imbalance: see :func:`is_balanced`.
        what, owner: used in error messages ("in_features of BTTLinear").

    Returns:
        A :class:`FactorPlan`. Factors are in ascending order unless given explicitly. A
        factorisation of its own never has a factor of 1 when ``c >= 2`` (a degenerate core);
        explicit factors may, since the user asked for them.
    """
    if factors is not None:
        factors = tuple(int(f) for f in factors)
        if len(factors) != c or any(f < 1 for f in factors):
            raise ValueError(
                f"{owner}: {what} factors must be {c} positive integers, got {factors}"
            )
        prod = math.prod(factors)
        if prod < size or prod > size * (1 + pad_tolerance):
            raise ValueError(
                f"{owner}: the product of the {what} factors {factors} is {prod}, but {what} is "
                f"{size}; the product must be {size} (or up to {pad_tolerance:.0%} larger, which "
                f"zero-pads). Pass factors whose product is {size}, e.g. "
                f"{balanced_factors(size, c)}."
            )
        return FactorPlan(size, factors)
    exact = balanced_factors(size, c)
    if _usable(exact, max_imbalance):
        return FactorPlan(size, exact)
    limit = math.floor(size * (1 + pad_tolerance))
    for padded in range(size + 1, limit + 1):
        cand = balanced_factors(padded, c)
        if _usable(cand, max_imbalance):
            return FactorPlan(size, cand)
    raise _no_plan_error(size, c, exact, limit, pad_tolerance, what, owner)


def _no_plan_error(
    size: int,
    c: int,
    exact: tuple[int, ...],
    limit: int,
    pad_tolerance: float,
    what: str,
    owner: str,
) -> ValueError:
    """Why ``size`` has no usable ``c``-factor plan, and what to pass instead."""
    if c > 1 and limit < 2**c:  # every split of every size up to limit has a factor of 1
        most = max(1, int(math.log2(limit)))
        return ValueError(
            f"{owner}: {what}={size} cannot be split into {c} factors without a factor of 1 (best "
            f"split {exact}), even zero-padded by up to {pad_tolerance:.0%}: a factor of 1 makes "
            f"a degenerate core that does nothing. "
            + (
                f"A width of {size} allows at most {most} factors >= 2: pass cores <= {most}, "
                f"or explicit factors ({what.split('_')[0]}_factors=...) if you want this split."
                if most >= 2
                else f"A width of {size} is too narrow to factorise: keep this layer dense or "
                f"use another structure (e.g. low_rank) for it."
            )
        )
    return ValueError(
        f"{owner}: {what}={size} has no balanced factorisation into {c} factors (best exact split "
        f"is {exact}) and no size within {pad_tolerance:.0%} above it has one either. Pass "
        f"explicit "
        f"factors (e.g. {what.split('_')[0]}_factors={exact} to accept the lopsided split), raise "
        f"pad_tolerance, or change the width."
    )


class WidthPlan(NamedTuple):
    """Both widths of a ``cores``-core layer, factorised (slowest factor first) and padded."""

    cores: int
    in_factors: tuple[int, ...]
    out_factors: tuple[int, ...]
    in_padded: int
    out_padded: int


def plan_widths(
    owner: str,
    in_features: int,
    out_features: int,
    cores: int,
    in_factors: tuple[int, ...] | list[int] | None = None,
    out_factors: tuple[int, ...] | list[int] | None = None,
    pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
) -> WidthPlan:
    """Factorise ``in_features`` and ``out_features`` into ``cores >= 2`` factors each.

    Each width goes through :func:`plan_factors` (explicit factors are checked, others balanced,
    zero-padding within ``pad_tolerance`` when needed). ``owner`` starts every error message.

    Examples::

        >>> plan = plan_widths("layer", 768, 3072, 2)
        >>> plan.in_factors, plan.out_factors, plan.in_padded, plan.out_padded
        ((24, 32), (48, 64), 768, 3072)
        >>> plan_widths("layer", 97, 13, 2).in_padded  # 97 is prime: padded to 98 = 7 x 14
        98
    """
    cores = check_positive_int(owner, "cores", cores)
    if cores < 2:
        raise ValueError(f"{owner}: cores must be at least 2, got {cores}")
    p_in, p_out = (
        plan_factors(size, cores, factors, pad_tolerance=pad_tolerance, what=what, owner=owner)
        for size, factors, what in (
            (in_features, in_factors, "in_features"),
            (out_features, out_factors, "out_features"),
        )
    )
    return WidthPlan(cores, p_in.factors, p_out.factors, p_in.padded, p_out.padded)


def width_options(
    cores: int,
    rank: int,
    in_factors: tuple[int, ...],
    out_factors: tuple[int, ...],
    pad_tolerance: float,
) -> dict[str, object]:
    """The options that rebuild a factorised layer (TT, Kron, BTT) with the same factor shapes:
    the factors are spelled out; ``pad_tolerance`` only when it is not the default."""
    opts: dict[str, object] = {"cores": cores, "rank": rank}
    opts.update(in_factors=in_factors, out_factors=out_factors)
    if pad_tolerance != DEFAULT_PAD_TOLERANCE:
        opts["pad_tolerance"] = pad_tolerance
    return opts
