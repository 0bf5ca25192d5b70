"""Auxiliary losses and statistics that any module reports from its forward pass.

Some layers add a term to the training objective that only they can compute, such as the load
balancing and router z-losses of a mixture of experts (Fedus et al., JMLR 2022, "Switch
Transformers"; Zoph et al., 2022, "ST-MoE"). Instead of returning it through every parent's
``forward``, a module records it on itself during ``forward``::

    add_aux_loss(self, "load_balance", value, weight=0.01)
    add_aux_stat(self, "expert_fraction", fractions)

and the training loop collects every record of the model after the forward pass::

    logits, task_loss = model(x, y)
    aux = collect_aux(model)  # also clears the records
    loss = task_loss if aux.loss is None else task_loss + aux.loss
    log.update(aux.metrics())

Rules:

* **One record per module and name, replaced by each call.** A module's records are those of its
  latest call, so records never pile up over steps; :func:`collect_aux` clears them, so nothing
  from an earlier forward is collected twice. (A module called twice in one forward keeps the
  second call's record.)
* **Losses** are scalar tensors that stay in the autograd graph; the collected ``loss`` is
  ``sum(weight * value)`` over all modules and names. **Statistics** are detached tensors
  (scalars or vectors) for logging only.
* **torch.compile.** Recording is a plain attribute write on the module, which TorchDynamo
  replays after the compiled graph: no graph break (``fullgraph=True`` compiles) and no
  recompilation. Collect outside the compiled region, as a training loop does.
* **DDP.** Records live on the wrapped modules, which ``collect_aux(ddp_model)`` visits; the
  aux loss is part of this forward's graph, so its gradients are reduced with the task loss'.
  Statistics are those of the local batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["AuxOutput", "add_aux_loss", "add_aux_stat", "clear_aux", "collect_aux"]

# A record is the module attribute ``_structlin_aux_loss__<name>`` (a ``(value, weight)`` tuple)
# or ``_structlin_aux_stat__<name>`` (a tensor). Recording only writes an attribute and never reads
# one, so TorchDynamo has nothing to guard on and compiles each forward once.
_LOSS = "_structlin_aux_loss__"
_STAT = "_structlin_aux_stat__"


def add_aux_loss(module: nn.Module, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
    """Record the scalar loss term ``weight * value`` of ``module`` for this forward pass.

    ``value`` stays in the graph (its gradient reaches the module's parameters when the
    collected loss is backpropagated); it replaces the record of the same name from the module's
    previous call.
    """
    setattr(module, _LOSS + name, (value, float(weight)))


def add_aux_stat(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Record a statistic of this forward pass (detached; a scalar or a vector) for logging."""
    setattr(module, _STAT + name, value.detach())


def _record_names(module: nn.Module) -> list[str]:
    return [key for key in vars(module) if key.startswith((_LOSS, _STAT))]


def clear_aux(model: nn.Module) -> None:
    """Drop every record of ``model`` and its submodules (e.g. after evaluation)."""
    for module in model.modules():
        for key in _record_names(module):
            delattr(module, key)


@dataclass(frozen=True)
class AuxOutput:
    """What :func:`collect_aux` found.

    Attributes:
        loss: ``sum(weight * value)`` over every recorded loss term, a scalar tensor in the
            graph; None when no module recorded a loss.
        losses: ``{name: {module_path: value}}``, the unweighted loss terms.
        stats: ``{name: {module_path: value}}``, the statistics.
    """

    loss: torch.Tensor | None = None
    losses: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | list[float]]:
        """JSON-ready values for a metrics log: ``aux_loss`` (the weighted total) and, for each
        loss term and statistic, its mean over the modules that recorded it (a list for vector
        statistics). Vectors of different lengths are logged per module as ``name/module``."""
        out: dict[str, float | list[float]] = {}
        if self.loss is not None:
            out["aux_loss"] = float(self.loss.detach())
        for name, per_module in (*self.losses.items(), *self.stats.items()):
            values = [v.detach().float().cpu() for v in per_module.values()]
            if len({tuple(v.shape) for v in values}) == 1:
                mean = torch.stack(values).mean(0)
                out[name] = mean.item() if mean.dim() == 0 else mean.tolist()
            else:
                for path, v in zip(per_module, values, strict=True):
                    out[f"{name}/{path}"] = v.item() if v.dim() == 0 else v.tolist()
        return out


def collect_aux(model: nn.Module, clear: bool = True) -> AuxOutput:
    """Gather the records of ``model`` and all its submodules (then clear them, by default).

    Works on wrapped models (``torch.compile``'s ``OptimizedModule``, DDP): the wrapped module is
    a submodule. Module paths are those of ``model.named_modules()``.
    """
    total: torch.Tensor | None = None
    losses: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for path, module in model.named_modules():
        for key in _record_names(module):
            record = getattr(module, key)
            if key.startswith(_LOSS):
                value, weight = record
                losses.setdefault(key[len(_LOSS) :], {})[path] = value
                total = value * weight if total is None else total + value * weight
            else:
                stats.setdefault(key[len(_STAT) :], {})[path] = record
            if clear:
                delattr(module, key)
    return AuxOutput(total, losses, stats)
