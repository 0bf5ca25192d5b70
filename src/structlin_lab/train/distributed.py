"""Data parallelism for the trainer: DDP, or FSDP2 sharding with ``torch.distributed.checkpoint``.

``train.distributed`` chooses how a run launched under ``torchrun --nproc-per-node N`` spreads
the model (one process ignores it):

* ``ddp``: every rank holds the whole model; gradients are all-reduced
  (``DistributedDataParallel``). Checkpoints are one ``last.pt`` written by rank 0.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``). Every parameter becomes a
  ``DTensor`` sharded along dim 0 across the ranks: each rank stores ``1/N`` of the weights,
  gradients and optimizer state, and all-gathers a module's parameters for its forward and
  backward. Each structured layer is its own sharding unit, so only one layer's full factors
  are alive at a time; the root takes the rest. Sharding keeps the parameter names
  (``named_parameters`` is unchanged), so ``structlin.mup.param_groups`` matches factors to
  their μP fans by name exactly as without sharding. The optimizer is built after sharding, as
  it must hold the sharded parameters. Model and optimizer state are saved with
  ``torch.distributed.checkpoint`` (every rank writes its shards into ``checkpoints/dcp/``); the
  rest (step, RNG, data positions, scheduler) still goes to rank 0's ``last.pt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlin import StructuredLinear

__all__ = ["gathered", "load_sharded", "save_sharded", "shard_model", "wrap_ddp"]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under ``DistributedDataParallel`` (the module to call forward on)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_model(model: nn.Module) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` in place: every structured layer, then the root. Returns
    ``model`` (now an ``FSDPModule``), to be called as before."""
    from torch.distributed.fsdp import fully_shard

    # A unit must be a module whose forward uses its parameters (FSDP2 gathers them in its
    # forward hooks); a structured layer's norm gains live in a ParameterList that has no
    # forward, so the layer, not its leaves, is the unit.
    for module in list(model.modules())[1:]:
        if isinstance(module, StructuredLinear):
            fully_shard(module)
    fully_shard(model)
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every sharded unit of ``model`` holds its full parameters as plain
    tensors (for code outside a forward that reads weights, e.g. the factor RMS monitor);
    collective, and resharded on exit."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save the sharded model and optimizer state into the directory ``path`` (collective: every
    rank calls it and writes its own shards)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into the (already sharded) ``model`` and
    ``optimizer``; the world size may differ from the one that saved (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not Path(path).is_dir():
        raise FileNotFoundError(f"cannot resume: no sharded checkpoint at {path}")
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
