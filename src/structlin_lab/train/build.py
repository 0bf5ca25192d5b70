"""Build the model, its μP base and the optimizer of a :class:`Config`.

The data and what is done with it (loss, accuracy, evaluation) are the task's: :mod:`.tasks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from structlin import counting_macs, mup, structurize

from .config import Config

__all__ = [
    "DataShapes",
    "build_model",
    "build_optimizer",
    "forward_macs",
    "model_at_width",
    "seed_everything",
    "shapes_only",
]


@dataclass(frozen=True)
class DataShapes:
    """The sizes a model takes from its data.

    Attributes:
        num_outputs: width of the model's output: the number of classes of an image data set,
            the vocabulary size of a text.
        image_shape: ``(C, H, W)`` of the images; None for text.
    """

    num_outputs: int
    image_shape: tuple[int, int, int] | None = None


_IMAGE_SHAPES = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "fashion_mnist": ((1, 28, 28), 10),
}


def shapes_only(cfg: Config, vocab: int | None = None) -> DataShapes | None:
    """The :class:`DataShapes` of ``cfg``'s data, from the config alone (no data is read).

    Enough to build ``cfg``'s model (on ``meta``) to count its parameters and MACs. For text the
    vocabulary is ``vocab`` if given, else that of the GPT-2 BPE when the config uses it; a
    character vocabulary depends on the text, so then the result is None. Unknown image data
    sets are taken as CIFAR-shaped (3x32x32, 10 classes); ImageNet reads ``image_size`` from
    the model options (default 224).
    """
    if cfg.task == "lm":
        if vocab is None and (cfg.data.tokenizer == "gpt2" or cfg.data.name == "openwebtext"):
            from ..data import GPT2_VOCAB_SIZE

            vocab = GPT2_VOCAB_SIZE
        return None if vocab is None else DataShapes(vocab)
    if cfg.data.name == "imagenet":
        size = int(cfg.model.kwargs.get("image_size", 224))
        shape, classes = (3, size, size), 1000
    else:
        shape, classes = _IMAGE_SHAPES.get(cfg.data.name, ((3, 32, 32), 10))
    return DataShapes(classes, shape)


def model_at_width(cfg: Config, width: int, shapes: DataShapes) -> nn.Module:
    """``cfg``'s model, unstructured, at hidden width ``width`` (on the current device).

    Everything but the width comes from ``cfg.model`` and from ``shapes``: the MLP's input is
    the flattened image (``C*H*W`` features) and its output ``shapes.num_outputs`` classes; the
    ViT reads channels and image size from ``shapes.image_shape``; GPT-2's vocabulary is
    ``shapes.num_outputs`` and its context ``cfg.data.block_size``. Building the μP base model
    at ``cfg.model.base_width`` the same way gives the fan-in/fan-out reference of every layer.
    """
    from ..models import create_model

    m = cfg.model
    kwargs = dict(m.kwargs)
    if m.name == "gpt2":
        return create_model(
            "gpt2",
            vocab_size=shapes.num_outputs,
            block_size=cfg.data.block_size,
            n_layer=m.depth,
            d_model=width,
            **kwargs,
        )
    if m.name not in ("mlp", "vit"):
        return create_model(m.name, width=width, **kwargs)
    if shapes.image_shape is None:
        raise ValueError(f"model.name={m.name!r} needs image data (task 'classify')")
    if m.name == "mlp":
        return create_model(
            "mlp",
            in_features=math.prod(shapes.image_shape),
            num_classes=shapes.num_outputs,
            width=width,
            depth=m.depth,
            **kwargs,
        )
    c, h, _ = shapes.image_shape
    kwargs.pop("image_size", None)  # the data decides (for ImageNet it is read from here)
    return create_model(
        "vit",
        num_classes=shapes.num_outputs,
        width=width,
        depth=m.depth,
        image_size=h,
        in_channels=c,
        **kwargs,
    )


def build_model(
    cfg: Config, shapes: DataShapes, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The model (structured as configured, on ``device``) and its μP base (on ``meta``)."""
    s = cfg.structure
    model = model_at_width(cfg, cfg.model.width, shapes)
    with torch.device("meta"):
        base = model_at_width(cfg, cfg.model.base_width, shapes)
    kw = {
        "target_modules": s.target_modules,
        "exclude_modules": s.exclude_modules,
        "overrides": s.overrides,
    }
    # "dense" goes through surgery too, as in the paper: its layers become DenseLinear, whose
    # spectral init is the paper's dense baseline's (nn.Linear's default is up to 3.5x larger);
    # the state dict keeps nn.Linear's names.
    structurize(model, s.spec, **kw)
    structurize(base, s.spec, **kw)
    return model.to(device), base


@torch.no_grad()
def build_optimizer(cfg: Config, model: nn.Module, base: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optim``'s optimizer over μP parameter groups (``structlin.mup.param_groups``):
    ``optim.lr`` is the learning rate at ``base``'s width, scaled per parameter by μP (Adam:
    ∝ 1/fan-in; SGD: ∝ fan-out/fan-in), per factor with ``optim.lr_rule="structure-aware"``;
    weight decay applies to matrices and factors only."""
    o = cfg.optim
    name = o.name.lower()
    groups = mup.param_groups(
        model,
        o.lr,
        base=base,
        optimizer=name,
        weight_decay=o.weight_decay,
        lr_rule=o.lr_rule,
        multipliers=o.multipliers or None,
    )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas))


def _cpu_attention_flops() -> dict[Any, Any]:
    """A FLOP formula for the CPU kernel of ``scaled_dot_product_attention``, which
    ``FlopCounterMode`` counts on CUDA but not on CPU: without it a CPU run's compute leaves out
    attention (``QK^T`` and ``AV``, the causal mask not discounted, as on CUDA)."""
    try:
        from torch.utils.flop_counter import sdpa_flop_count
    except ImportError:  # a torch without it: attention stays uncounted on CPU, as before
        return {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {} if op is None else {op: flops}


@torch.no_grad()
def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Forward multiply-accumulates for ONE example, counted by ``FlopCounterMode`` (which
    counts 2 per MAC on every matmul, including attention and structured kernels; elementwise
    ops are not counted). ``example`` has a leading batch dimension of 1."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:  # counting_macs: layers that choose by input size run what a training batch runs
        with (
            counting_macs(),
            FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter,
        ):
            model(example)
    finally:
        model.train(was)
    return int(counter.get_total_flops()) // 2


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- user code may draw from the global NumPy RNG
    torch.manual_seed(seed)
