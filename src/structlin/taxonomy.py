"""The Einsum space of structured matrices: the exponents θ and the taxonomy (ω, ψ, ν).

Potapczynski et al. (NeurIPS 2024, "Searching for Efficient Linear Layers over a Continuous Space
of Structured Matrices", §3) write every structure of this library as one two-core einsum whose
index sizes are powers of the widths: ``θ = (α, β, γ, δ, ε, φ, ρ)`` with ``α + β + γ = 1`` (the
input ``d_in = d_in^α · d_in^β · d_in^γ``), ``δ + ε + φ = 1`` (the output) and the rank
``min(d_in, d_out)^ρ``. :class:`structlin.layers.EinsumLinear` builds the layer; this module
holds θ, its spec form, the named points of the paper and the three numbers by which the paper
sorts structures (§4):

* **ω, parameter sharing** ``= min(α + δ, β + ε) - min(α, ε)``: 0 when every parameter is used
  once per example (dense, low-rank, BTT, Monarch), ½ for a Kronecker product;
* **ψ, rank** ``= 1 + min(0, 1 + ρ - α - ε)``: the matrix rank is about ``d^ψ`` (1 = full rank);
* **ν, compute exponent** ``= 1 + ρ - min(α, ε)``: MACs per example grow as ``d^{1 + ν}`` for a
  square ``d x d`` layer (1 for dense, ½ for BTT).

The paper finds that structures with ω = 0 and ψ = 1 (the full-rank BTT family) scale best,
while ν matters little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from .options import suggest

__all__ = ["THETA_PRESETS", "Taxonomy", "Theta", "parse_theta"]

#: How far ``α + β + γ`` and ``δ + ε + φ`` may be from 1 (thirds written as 0.333 pass).
SUM_TOLERANCE = 1e-2


def _fmt(value: float) -> str:
    """Compact decimal form: ``0.5``, ``0``, ``1``, ``0.333333``."""
    return f"{value:.6g}"


class Taxonomy(NamedTuple):
    """The three numbers that place a structure in the Einsum space (see the module docstring).

    Attributes:
        omega: parameter sharing ω.
        psi: rank exponent ψ (the rank is about ``d^ψ``).
        nu: compute exponent ν (MACs per example about ``d^{1 + ν}``).
    """

    omega: float
    psi: float
    nu: float

    def __str__(self) -> str:
        return f"omega={self.omega:.3g} psi={self.psi:.3g} nu={self.nu:.3g}"


class Theta(NamedTuple):
    """The exponents ``(α, β, γ, δ, ε, φ, ρ)`` of an Einsum structure.

    ``str(theta)`` is the spec form ``"α/β/γ/δ/ε/φ/ρ"`` (``0.5/0/0.5/0/0.5/0.5/0``), which
    :func:`parse_theta` reads back; it needs no quoting in a shell or in YAML.

    Examples::

        >>> theta = parse_theta("btt")
        >>> str(theta), theta.taxonomy()
        ('0.5/0/0.5/0/0.5/0.5/0', Taxonomy(omega=0.0, psi=1.0, nu=0.5))
        >>> str(parse_theta("kron").taxonomy())
        'omega=0.5 psi=1 nu=0.5'
    """

    alpha: float
    beta: float
    gamma: float
    delta: float
    epsilon: float
    phi: float
    rho: float

    def __str__(self) -> str:
        return "/".join(_fmt(v) for v in self)

    def taxonomy(self) -> Taxonomy:
        """ω, ψ and ν of this point (formulas in the module docstring)."""
        a, b, _, d, e, _, r = self
        omega = min(a + d, b + e) - min(a, e)
        psi = 1.0 + min(0.0, 1.0 + r - a - e)
        nu = 1.0 + r - min(a, e)
        return Taxonomy(*(round(v, 12) + 0.0 for v in (omega, psi, nu)))


_H, _Q = 0.5, 0.25
#: Named points of the Einsum space (Potapczynski et al., NeurIPS 2024, §3 and Fig. 1).
#: ``monarch`` is the same point as ``btt``: a rank-1 two-core BTT with ``sqrt(d)`` blocks is a
#: Monarch matrix with ``sqrt(d)`` blocks.
THETA_PRESETS: dict[str, Theta] = {
    "dense": Theta(1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0),
    "low_rank": Theta(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, _H),
    "kron": Theta(_H, _H, 0.0, _H, _H, 0.0, 0.0),
    "tt": Theta(_H, _H, 0.0, _H, _H, 0.0, _Q),
    "btt": Theta(_H, 0.0, _H, 0.0, _H, _H, 0.0),
    "monarch": Theta(_H, 0.0, _H, 0.0, _H, _H, 0.0),
    "generic": Theta(_H, _Q, _Q, _Q, _H, _Q, 0.0),
}


def _theta_error(value: Any, why: str, hint: str = "") -> ValueError:
    return ValueError(
        f"theta: {why}, got {value!r}{hint}; pass a preset ({', '.join(THETA_PRESETS)}) or seven "
        f"exponents alpha/beta/gamma/delta/epsilon/phi/rho, e.g. '0.5/0/0.5/0/0.5/0.5/0'"
    )


def _numbers(value: Any) -> list[float]:
    if isinstance(value, str):
        if "/" not in value:
            raise _theta_error(value, "unknown preset", suggest(value.strip(), THETA_PRESETS))
        parts = value.split("/")
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise _theta_error(value, "expected a string or a sequence of seven numbers")
    if len(parts) != 7:
        raise _theta_error(value, f"expected seven exponents, found {len(parts)}")
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise _theta_error(value, "every exponent must be a number") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in numbers):
        raise _theta_error(value, "every exponent must lie in [0, 1]")
    return [float(_fmt(v)) for v in numbers]  # the precision of the spec form, so it round-trips


def parse_theta(value: str | Sequence[float] | Theta) -> Theta:
    """A :class:`Theta` from a preset name, an ``"α/β/γ/δ/ε/φ/ρ"`` string or seven numbers.

    Checks that every exponent lies in ``[0, 1]`` and that ``α + β + γ`` and ``δ + ε + φ`` are 1
    (within 0.01). Exponents are kept to 6 significant digits, the precision of ``str(theta)``.

    Examples::

        >>> parse_theta("0.5/0/0.5/0/0.5/0.5/0.25").rho
        0.25
        >>> parse_theta((1, 0, 0, 1, 0, 0, 0)) == THETA_PRESETS["dense"]
        True
        >>> parse_theta("0.5/0.5/0.5/0/1/0/0")
        Traceback (most recent call last):
        ...
        ValueError: theta: alpha + beta + gamma must be 1 (it is 1.5), got ...
    """
    if isinstance(value, str) and value.strip() in THETA_PRESETS:
        return THETA_PRESETS[value.strip()]
    numbers = _numbers(value)
    for names, part in (
        ("alpha + beta + gamma", numbers[:3]),
        ("delta + epsilon + phi", numbers[3:6]),
    ):
        total = sum(part)
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise _theta_error(value, f"{names} must be 1 (it is {_fmt(total)})")
    return Theta(*numbers)
