"""``btt_moe``: a mixture of rank-1 BTT experts along the BTT rank (Potapczynski et al.,
NeurIPS 2024, "Searching for Efficient Linear Layers over a Continuous Space of Structured
Matrices", Section 5)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..aux import add_aux_loss, add_aux_stat
from ..kernels.btt import btt2_matmul
from ..options import check_positive_int
from .base import StructuredLinear, is_counting_macs
from .factorize import DEFAULT_PAD_TOLERANCE, plan_widths
from .registry import register_structure

__all__ = ["COMPUTE_MODES", "BTTMoELinear", "Routing", "moe_aux_losses", "route_top_k"]

#: ``compute`` options: pick by input size, only the selected experts, all experts then mask.
COMPUTE_MODES = ("auto", "selected", "all")
#: With ``compute="auto"``, the selected experts alone are computed from this many rows on
#: (benchmarks/moe_routing.py, E=8, k=2, 2-core CPU: up to 64 rows the per-expert gather and
#: loop cost more than the ``E / k`` times larger masked product; from 1024 rows on they win by
#: 1.5-5x; 256 rows is the crossover, width-dependent).
SELECTED_MIN_ROWS = 512
# Random tie-breaking noise on the logits used for selection (not for the weights), in training,
# relative to the logits' size: far above float32 rounding (1.2e-7), far below any real margin.
_TIE_JITTER = 1e-5


class Routing(NamedTuple):
    """The router's decision for ``N`` rows and ``E`` experts.

    Attributes:
        logits: ``(N, E)`` float32 router logits.
        indices: ``(N, k)`` the selected experts of each row.
        weights: ``(N, k)`` softmax of the selected logits (each row sums to 1).
    """

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


def route_top_k(logits: torch.Tensor, top_k: int, break_ties: bool = False) -> Routing:
    """Top-``k`` routing: the ``k`` largest logits of each row, weighted by their softmax.

    ``break_ties`` adds uniform noise of relative size ``1e-5`` (``1e-5 (1 + |logit|)``) to the
    logits used for the selection only,
    so that exactly tied logits (a zero-initialised router gives all experts the same logit)
    send tokens to random experts instead of always to experts ``0..k-1``; the weights use the
    logits themselves.
    """
    scores = logits
    if break_ties:
        scores = logits + torch.rand_like(logits) * (_TIE_JITTER * (1.0 + logits.abs()))
    indices = scores.topk(top_k, dim=-1).indices
    weights = torch.softmax(logits.gather(-1, indices), dim=-1)
    return Routing(logits, indices, weights)


def moe_aux_losses(routing: Routing, num_experts: int) -> dict[str, torch.Tensor]:
    """Load balancing, router z-loss and utilisation of one routing decision.

    With ``f_e`` the fraction of the ``N k`` assignments sent to expert ``e`` (not
    differentiable) and ``P_e`` the mean over rows of the full softmax ``softmax(logits)_e``:

    * ``load_balance = E * sum_e f_e P_e`` (the Switch Transformer loss, Fedus et al. 2022,
      Eq. 4, with assignments counted over the ``k`` choices): 1 when both are uniform;
    * ``router_z = mean_n logsumexp(logits_n)^2`` (Zoph et al., 2022, Eq. 5): ``log(E)^2`` for a
      zero router;
    * ``expert_fraction = f`` and ``expert_entropy = -sum_e f_e log f_e`` (nats; ``log E`` when
      balanced), for logging.
    """
    logits = routing.logits
    counts = F.one_hot(routing.indices, num_experts).sum(dim=(0, 1)).to(logits.dtype)
    fraction = counts / routing.indices.numel()
    mean_prob = torch.softmax(logits, dim=-1).mean(0)
    entropy = -(fraction * torch.log(fraction.clamp_min(1e-12))).sum()
    return {
        "load_balance": num_experts * (fraction * mean_prob).sum(),
        "router_z": torch.logsumexp(logits, dim=-1).square().mean(),
        "expert_fraction": fraction,
        "expert_entropy": entropy,
    }


def _all_experts(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """``sum_e gates[:, e] * BTT_e(x)`` computing every expert: a rank-``E`` BTT whose
    intermediate is scaled along the rank by the ``(N, E)`` gates (0 for unselected experts).

    ``x``: ``(N, m1*m0)``; ``w0``: ``(E, m1, n0, m0)``; ``w1``: ``(E, n0, n1, m1)``.
    """
    n = x.shape[0]
    e, m1, n0, m0 = w0.shape
    n1 = w1.shape[2]
    a = w0.permute(1, 0, 2, 3).reshape(m1, e * n0, m0)  # block i1: m0 -> (e, j0)
    z = torch.matmul(x.view(n, m1, m0).transpose(0, 1), a.mT)  # (m1, N, E*n0)
    z = z.view(m1, n, e, n0) * gates.view(1, n, e, 1)
    z = z.permute(3, 1, 2, 0).reshape(n0, n, e * m1)  # block j0 reads (e, i1)
    b = w1.permute(1, 2, 0, 3).reshape(n0, n1, e * m1)
    y = torch.matmul(z, b.mT)  # (n0, N, n1)
    return y.transpose(0, 1).reshape(n, n0 * n1)


def _selected_experts(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """The same sum over the selected experts only: rows are grouped by expert, each group goes
    through its rank-1 BTT (the ``structlin::btt2`` kernel), and the weighted outputs are added
    back to their rows. ``k/E`` of the expert MACs of :func:`_all_experts`."""
    n, k = routing.indices.shape
    e = w0.shape[0]
    flat = routing.indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // k
    counts = torch.bincount(flat, minlength=e).tolist()  # group sizes (a host sync)
    xs = x.index_select(0, rows).split(counts)
    gates = routing.weights.reshape(-1)[order].to(x.dtype).split(counts)
    parts = [btt2_matmul(xs[i], w0[i], w1[i]) * gates[i][:, None] for i in range(e) if counts[i]]
    out = x.new_zeros(n, w1.shape[1] * w1.shape[2])
    return out.index_add(0, rows, torch.cat(parts)) if parts else out


@register_structure("btt_moe")
class BTTMoELinear(StructuredLinear):
    """BTT mixture of experts: ``y = sum_{e in topk(x)} g_e(x) BTT_e(x) + b``.

    ``E`` experts, each a rank-1 two-core BTT ``d_in -> d_out`` (a Monarch-like matrix); together
    they are the ``E`` rank components of a rank-``E`` BTT, and the router keeps ``k`` of them
    per row (Potapczynski et al., NeurIPS 2024, Section 5). The router is ``logits = x R^T`` with
    ``R`` of shape ``(E, d_in)``, zero-initialised (every row starts routed uniformly: weights
    ``1/k``); ``g`` is the softmax of the ``k`` largest logits. In training, exactly tied logits
    are broken at random (see :func:`route_top_k`). The router runs in float32.

    **Auxiliary loss.** Each forward records, through :mod:`structlin.aux`,
    ``aux_weight * (load_balance + 0.1 * router_z)`` (see :func:`moe_aux_losses`) and the expert
    utilisation (``expert_fraction``, ``expert_entropy``); ``structlin.collect_aux(model)``
    gathers them for the training loop.

    **μP.** Each expert is initialised and trained as a rank-1 BTT: the factors ``weights.0``
    ``(E, m1, n0, m0)`` and ``weights.1`` ``(E, n0, n1, m1)`` are batches of rank-1 blocks with
    fans ``m0 -> n0`` and ``m1 -> n1``, so ``mup.param_groups`` gives them the multipliers of a
    rank-1 BTT's cores, whatever ``E``. The router is a dense map whose fan-in ``d_in`` grows
    with width and whose fan-out ``E`` does not: a readout. As it starts at zero, its init needs
    no scaling; for its logits to move by Θ(1) per Adam step at any width it needs the dense
    readout learning rate ``lr * d_in_base / d_in`` (the layer's dense multiplier).

    **MACs** per row: the ``k`` active experts, ``k (n0 d_in + m1 d_out)`` (``k/E`` of all
    experts), plus the router's ``E d_in``. Parameters: ``E (n0 d_in + m1 d_out) + E d_in``.

    **Compute.** ``compute="selected"`` runs only the selected experts (rows grouped by expert,
    ``k/E`` of the expert MACs); ``"all"`` runs all ``E`` and zeroes the unselected ones by
    their gates (``E/k`` times the MACs, no gather, fixed shapes); ``"auto"`` (default) takes
    ``"selected"`` from ``SELECTED_MIN_ROWS`` rows on and ``"all"`` below it or under
    ``torch.compile``. ``reference_forward`` always computes all experts with plain torch ops.

    **No dense matrix.** The map depends on the input through the router, so there is no ``W``:
    ``to_dense`` and ``from_dense`` raise ``NotImplementedError`` (surgery with
    ``init="from_dense"`` is refused; use the μP init).

    Args:
        experts: ``E`` (default 8).
        top_k: ``k`` (default 2), at most ``E``.
        aux_weight: weight of the auxiliary loss (default 0.01, Potapczynski et al.).
        compute: ``"auto"``, ``"selected"`` or ``"all"``.
        in_factors, out_factors: the two-core factorisations ``(m1, m0)``, ``(n0, n1)`` (slowest
            first; balanced by default), zero-padded within ``pad_tolerance`` as for ``btt``.

    Shape:
        - Input: ``(*, H_in)`` with ``H_in = in_features``.
        - Output: ``(*, H_out)`` with ``H_out = out_features``.

    Examples::

        >>> layer = BTTMoELinear(64, 128, experts=8, top_k=2)
        >>> layer(torch.randn(4, 10, 64)).shape
        torch.Size([4, 10, 128])
        >>> [tuple(w.shape) for w in layer.weights], tuple(layer.router.shape)
        ([(8, 8, 8, 8), (8, 8, 16, 8)], (8, 64))
        >>> [(f.name, f.fan_in, f.fan_out) for f in layer.factors()]  # those of a rank-1 BTT
        [('weights.0', 8, 8), ('weights.1', 8, 16)]
        >>> layer.macs(), layer.dense_macs  # 2 * (8*64 + 8*128) + 8*64
        (3584, 8192)
        >>> layer.spec
        'btt_moe:experts=8,top_k=2,in_factors=8x8,out_factors=8x16'
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        experts: int = 8,
        top_k: int = 2,
        aux_weight: float = 0.01,
        compute: str = "auto",
        in_factors: tuple[int, ...] | None = None,
        out_factors: tuple[int, ...] | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        name = self._name()
        self.experts = check_positive_int(name, "experts", experts)
        self.top_k = check_positive_int(name, "top_k", top_k)
        if self.top_k > self.experts:
            raise ValueError(f"{name}: top_k must be at most experts={experts}, got {top_k}")
        if compute not in COMPUTE_MODES:
            raise ValueError(f"{name}: compute must be one of {COMPUTE_MODES}, got {compute!r}")
        if not (isinstance(aux_weight, (int, float)) and math.isfinite(aux_weight)):
            raise ValueError(f"{name}: aux_weight must be a finite number, got {aux_weight!r}")
        self.aux_weight, self.compute = float(aux_weight), compute
        plan = plan_widths(
            name, in_features, out_features, 2, in_factors, out_factors, pad_tolerance
        )
        self.in_factors, self.out_factors = plan.in_factors, plan.out_factors
        self.in_padded, self.out_padded = plan.in_padded, plan.out_padded
        self.pad_tolerance = pad_tolerance
        (m1, m0), (n0, n1) = self.in_factors, self.out_factors
        fk = self.factory_kwargs
        self.weights = nn.ParameterList(
            [
                nn.Parameter(torch.empty(self.experts, m1, n0, m0, **fk)),
                nn.Parameter(torch.empty(self.experts, n0, n1, m1, **fk)),
            ]
        )
        self.router = nn.Parameter(torch.empty(self.experts, in_features, **fk))

    def _factor_fans(self) -> list[tuple[str, int, int]]:
        (m1, m0), (n0, n1) = self.in_factors, self.out_factors
        return [("weights.0", m0, n0), ("weights.1", m1, n1)]

    def reset_parameters(self, zero_init_last: bool = False) -> None:
        """The experts' factors as rank-1 BTT cores (μP), the bias and the router at zero."""
        super().reset_parameters(zero_init_last)
        router = getattr(self, "router", None)
        if router is not None:
            with torch.no_grad():
                router.zero_()

    def _macs_per_example(self) -> int:
        (m1, _), (n0, _) = self.in_factors, self.out_factors
        expert = n0 * self.in_padded + m1 * self.out_padded
        return self.top_k * expert + self.experts * self.in_features

    def route(self, x: torch.Tensor) -> Routing:
        """The routing of the rows of ``x`` (``(N, in_features)`` or zero-padded)."""
        x = x[:, : self.in_features].float()
        logits = F.linear(x, self.router.float())
        return route_top_k(logits, self.top_k, break_ties=self.training)

    def _record(self, routing: Routing) -> None:
        terms = moe_aux_losses(routing, self.experts)
        add_aux_loss(self, "load_balance", terms["load_balance"], self.aux_weight)
        add_aux_loss(self, "router_z", terms["router_z"], 0.1 * self.aux_weight)
        add_aux_stat(self, "expert_fraction", terms["expert_fraction"])
        add_aux_stat(self, "expert_entropy", terms["expert_entropy"])

    def _gates(self, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
        n = routing.indices.shape[0]
        dense = routing.weights.new_zeros(n, self.experts)
        return dense.scatter(1, routing.indices, routing.weights).to(dtype)

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        routing = self.route(x)
        self._record(routing)
        return _all_experts(x, weights[0], weights[1], self._gates(routing, x.dtype))

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        routing = self.route(x)
        self._record(routing)
        if self._selected_only(x.shape[0]):
            y = _selected_experts(x, weights[0], weights[1], routing)
        else:
            y = _all_experts(x, weights[0], weights[1], self._gates(routing, x.dtype))
        return y if bias is None else y + bias

    def _selected_only(self, rows: int) -> bool:
        if self.compute != "auto":
            return self.compute == "selected"
        if is_counting_macs():  # count the algorithm (the active experts), not the small case
            return True
        return rows >= SELECTED_MIN_ROWS and not torch.compiler.is_compiling()

    def to_dense(self) -> torch.Tensor:
        """Not defined: the layer's map depends on its input through the router."""
        raise NotImplementedError(
            f"{self._name()}: a mixture of experts has no single dense matrix (the experts "
            f"used depend on the input); use forward, or one expert's BTT"
        )

    def from_dense(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> StructuredLinear:
        """Not defined: there is no single matrix to project onto."""
        raise NotImplementedError(
            f"{self._name()}: from_dense is not defined for a mixture of experts (no single "
            f"matrix to project onto); initialise it with reset_parameters (μP) instead"
        )

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"experts": self.experts, "top_k": self.top_k}
        if self.aux_weight != 0.01:
            opts["aux_weight"] = self.aux_weight
        if self.compute != "auto":
            opts["compute"] = self.compute
        opts.update(in_factors=self.in_factors, out_factors=self.out_factors)
        if self.pad_tolerance != DEFAULT_PAD_TOLERANCE:
            opts["pad_tolerance"] = self.pad_tolerance
        return {**opts, **super().options()}
