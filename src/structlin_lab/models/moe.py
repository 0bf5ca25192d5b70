"""The standard mixture-of-experts FFN: ``E`` dense GELU experts, top-``k`` routing.

The baseline against which BTT-MoE (``structlin.layers.btt_moe``, Potapczynski et al., NeurIPS
2024) is compared at matched active compute: a Switch/GShard-style MoE whose experts are whole
dense FFNs ``d -> h -> d``. It replaces GPT-2's ``MLPBlock`` with ``GPTConfig(mlp="moe")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from structlin import (
    Routing,
    StructuredLinear,
    add_aux_loss,
    add_aux_stat,
    is_linear_like,
    linear_dims,
    moe_aux_losses,
    route_top_k,
)

from .mlp import dense_init

__all__ = ["MoEMLP"]


class MoEMLP(nn.Module):
    """``y = sum_{e in topk(x)} g_e(x) mlp_proj_e(GELU(c_fc_e(x)))``, ``(*, d) -> (*, d)``.

    Routing is that of BTT-MoE (:func:`structlin.layers.btt_moe.route_top_k`): a zero-initialised
    router ``Linear(d, E)`` (uniform routing at init; exact ties broken at random in training),
    weights the softmax of the ``k`` largest logits. Each forward records through
    :mod:`structlin.aux` the auxiliary loss ``aux_weight * (load_balance + 0.1 * router_z)`` and
    the expert utilisation (:func:`structlin.layers.btt_moe.moe_aux_losses`).

    Only the selected experts run: rows are grouped by expert, so the forward costs
    ``k * 2 d h`` MACs per token for the experts plus ``E d`` for the router
    (:meth:`macs_per_token`), against ``2 d h`` for the dense FFN with hidden size ``h``.

    μP: every expert is a pair of ``nn.Linear`` (``experts.{e}.c_fc``, ``experts.{e}.mlp_proj``)
    initialised like GPT-2's FFN (``mlp_proj`` at zero, so the block starts as the identity), so
    ``structlin.mup.param_groups`` treats each as the dense layer it is; the router is a readout
    (fan-in ``d`` grows, fan-out ``E`` does not) and gets the dense readout multiplier. Exclude
    ``router`` from a surgery (``exclude_modules=["router"]``) to keep it dense.

    Args:
        d_model: ``d``; hidden: ``h``; experts: ``E``; top_k: ``k``.
        aux_weight: weight of the auxiliary loss (0.01).
        bias: biases in the expert layers; dropout: on the output.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        experts: int = 8,
        top_k: int = 2,
        *,
        aux_weight: float = 0.01,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"MoEMLP: need 1 <= top_k <= experts, got {top_k}, {experts}")
        self.d_model, self.hidden = d_model, hidden
        self.num_experts, self.top_k = experts, top_k
        self.aux_weight, self.dropout = float(aux_weight), dropout
        self.router = nn.Linear(d_model, experts, bias=False)
        nn.init.zeros_(self.router.weight)
        self.experts = nn.ModuleList(_Expert(d_model, hidden, bias) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        logits = F.linear(flat.float(), self.router.weight.float())
        routing = route_top_k(logits, self.top_k, break_ties=self.training)
        terms = moe_aux_losses(routing, self.num_experts)
        add_aux_loss(self, "load_balance", terms["load_balance"], self.aux_weight)
        add_aux_loss(self, "router_z", terms["router_z"], 0.1 * self.aux_weight)
        add_aux_stat(self, "expert_fraction", terms["expert_fraction"])
        add_aux_stat(self, "expert_entropy", terms["expert_entropy"])
        y = self._experts(flat, routing)
        return F.dropout(y, self.dropout, self.training).reshape(*lead, self.d_model)

    def _experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Rows grouped by expert; each group through its FFN, weighted, added back."""
        k = self.top_k
        flat = routing.indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x.index_select(0, rows).split(counts)
        gates = routing.weights.reshape(-1)[order].to(x.dtype).split(counts)
        out = x.new_zeros(x.shape)
        parts = [
            expert(xs[e]) * gates[e][:, None] for e, expert in enumerate(self.experts) if counts[e]
        ]
        return out.index_add(0, rows, torch.cat(parts)) if parts else out

    def macs_per_token(self) -> int:
        """Forward MACs per token of the active experts and the router: ``k 2 d h + E d`` with
        dense experts (an expert structured by surgery counts its layers' ``macs()``; with
        experts of different costs, ``k`` times their mean)."""
        per_expert = [_linear_macs(expert) for expert in self.experts]
        mean = sum(per_expert) / len(per_expert)
        return round(self.top_k * mean) + _linear_macs(self.router)


def _linear_macs(module: nn.Module) -> int:
    """Forward MACs per row of the linear layers in ``module`` (itself included)."""
    total = 0
    for m in module.modules():
        if isinstance(m, StructuredLinear):
            total += m.macs()
        elif is_linear_like(m):
            d_in, d_out = linear_dims(m)
            total += d_in * d_out
    return total


class _Expert(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, hidden, bias=bias)
        self.mlp_proj = nn.Linear(hidden, d_model, bias=bias)
        dense_init(self.c_fc)
        dense_init(self.mlp_proj, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_proj(F.gelu(self.c_fc(x)))
