"""Build the model, its μP base, the optimizer and the data of a :class:`Config`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from structlin import mup, structurize

from .config import Config

__all__ = [
    "DataBundle",
    "build_data",
    "build_model",
    "build_optimizer",
    "forward_macs",
    "shapes_only",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)


@dataclass
class DataBundle:
    """What the trainer needs from a data set."""

    kind: str  # "image" or "text"
    train: Any  # image: TensorImageLoader; text: token array
    test: Any
    num_classes: int = 0  # image: classes; text: vocabulary size
    image_shape: tuple[int, int, int] = (3, 32, 32)
    steps_per_epoch: int = 0


_IMAGE_SHAPES = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "fashion_mnist": ((1, 28, 28), 10),
}


def shapes_only(cfg: Config, vocab: int | None = None) -> DataBundle | None:
    """A :class:`DataBundle` with the shapes a model needs but no data, from the config alone.

    Enough to build ``cfg``'s model (on ``meta``) to count its parameters and MACs. For text the
    vocabulary is ``vocab`` if given, else that of the GPT-2 BPE when the config uses it; a
    character vocabulary depends on the text, so then the result is None. Unknown image data
    sets are taken as CIFAR-shaped (3x32x32, 10 classes); ImageNet reads ``image_size`` from
    the model options (default 224).
    """
    if cfg.task == "lm":
        if vocab is None and (cfg.data.tokenizer == "gpt2" or cfg.data.name == "openwebtext"):
            from ..data.text import GPT2_VOCAB_SIZE

            vocab = GPT2_VOCAB_SIZE
        return None if vocab is None else DataBundle("text", None, None, vocab)
    if cfg.data.name == "imagenet":
        size = int(cfg.model.kwargs.get("image_size", 224))
        shape, classes = (3, size, size), 1000
    else:
        shape, classes = _IMAGE_SHAPES.get(cfg.data.name, ((3, 32, 32), 10))
    return DataBundle("image", None, None, classes, shape)


def build_data(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Load (and cache) the data set named in ``cfg.data``."""
    d = cfg.data
    if cfg.task == "lm":
        from ..data.text import load_openwebtext, prepare_text

        if d.name == "openwebtext":
            # streamed from the Hugging Face Hub (needs `datasets` and internet), cached once
            text = load_openwebtext(d.root, tokenizer_file=d.tokenizer_file)
        elif d.source is None:
            raise ValueError(
                "data.source must point to a UTF-8 text file (or .gz) for task 'lm' (or set "
                "data.name=openwebtext), e.g. --set data.source=../shared/data/austen.txt.gz"
            )
        else:
            text = prepare_text(
                d.source, tokenizer=d.tokenizer, tokenizer_file=d.tokenizer_file, cache_dir=d.root
            )
        per_epoch = max(1, len(text.train) // (d.batch_size * d.block_size * world_size))
        return DataBundle("text", text.train, text.val, text.vocab_size, steps_per_epoch=per_epoch)

    from ..data.loader import TensorImageLoader

    if d.batch_size % world_size:
        raise ValueError(
            f"data.batch_size={d.batch_size} is the global batch and must divide evenly across "
            f"{world_size} processes; use a multiple of {world_size}"
        )

    if d.name in ("cifar10", "cifar100"):
        from ..data.cifar import load_cifar

        arrays = load_cifar(d.name, d.root, source=d.source, download=d.download)
        mean, std = CIFAR_MEAN, CIFAR_STD
        train_x, test_x = arrays.train_x, arrays.test_x
        num_classes = len(arrays.classes)
    elif d.name == "imagenet":
        return _imagenet(cfg, device, rank, world_size)
    elif d.name == "fashion_mnist":
        from ..data.fashion_mnist import load_fashion_mnist

        arrays = load_fashion_mnist(d.root, source=d.source, download=d.download)
        mean, std = FASHION_MEAN, FASHION_STD
        train_x, test_x = arrays.train_x[..., None], arrays.test_x[..., None]
        num_classes = len(arrays.classes)
    else:
        raise ValueError(
            f"unknown data.name {d.name!r}; valid: cifar10, cifar100, fashion_mnist, imagenet "
            f"(or task 'lm' with a text file)"
        )
    common = {"device": device, "mean": mean, "std": std, "num_classes": num_classes}
    train = TensorImageLoader(
        train_x,
        arrays.train_y,
        batch_size=d.batch_size // world_size,
        train=True,
        augment=d.augment,
        mixup_alpha=d.mixup,
        label_smoothing=d.label_smoothing,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        **common,
    )
    test = TensorImageLoader(
        test_x,
        arrays.test_y,
        batch_size=d.eval_batch_size,
        train=False,
        augment=False,
        mixup_alpha=0.0,
        label_smoothing=0.0,
        **common,
    )
    h, w, c = train_x.shape[1:]
    return DataBundle("image", train, test, num_classes, (c, h, w), len(train))


def _imagenet(cfg: Config, device: torch.device, rank: int, world_size: int) -> DataBundle:
    from ..data.imagenet import IMAGENET_MEAN_255, IMAGENET_STD_255, imagenet_loader
    from ..data.stream import StreamingImageBatches

    d = cfg.data
    if d.source is None:
        raise ValueError("data.source must be the ImageNet root with train/ and val/ folders")
    size = int(cfg.model.kwargs.get("image_size", 224))
    common = {
        "image_size": size,
        "num_workers": d.num_workers,
        "seed": cfg.train.seed,
        "rank": rank,
        "world_size": world_size,
    }
    train_dl = imagenet_loader(d.source, "train", batch_size=d.batch_size // world_size, **common)
    val_dl = imagenet_loader(
        d.source, "val", batch_size=d.eval_batch_size, **{**common, "rank": 0, "world_size": 1}
    )
    classes = len(train_dl.dataset.classes)
    stats = {
        "device": device,
        "num_classes": classes,
        "mean": IMAGENET_MEAN_255,
        "std": IMAGENET_STD_255,
    }
    train = StreamingImageBatches(
        train_dl,
        train=True,
        mixup_alpha=d.mixup,
        label_smoothing=d.label_smoothing,
        seed=cfg.train.seed * 1000 + rank,
        **stats,
    )
    test = StreamingImageBatches(val_dl, train=False, **stats)
    return DataBundle("image", train, test, classes, (3, size, size), len(train))


def model_at_width(cfg: Config, width: int, data: DataBundle) -> nn.Module:
    """The configured model, unstructured, at hidden width ``width`` (on the current device)."""
    from ..models import create_model

    m = cfg.model
    kwargs = dict(m.kwargs)
    if m.name == "mlp":
        return create_model(
            "mlp",
            in_features=math.prod(data.image_shape),
            num_classes=data.num_classes,
            width=width,
            depth=m.depth,
            **kwargs,
        )
    if m.name == "vit":
        c, h, _ = data.image_shape
        kwargs.pop("image_size", None)  # the data decides (for ImageNet it is read from here)
        return create_model(
            "vit",
            num_classes=data.num_classes,
            width=width,
            depth=m.depth,
            image_size=h,
            in_channels=c,
            **kwargs,
        )
    if m.name == "gpt2":
        return create_model(
            "gpt2",
            vocab_size=data.num_classes,
            block_size=cfg.data.block_size,
            n_layer=m.depth,
            d_model=width,
            **kwargs,
        )
    return create_model(m.name, width=width, **kwargs)


def build_model(cfg: Config, data: DataBundle, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The model (structured as configured, on ``device``) and its μP base (on ``meta``)."""
    s = cfg.structure
    model = model_at_width(cfg, cfg.model.width, data)
    with torch.device("meta"):
        base = model_at_width(cfg, cfg.model.base_width, data)
    if s.spec != "dense":
        kw = {
            "target_modules": s.target_modules,
            "exclude_modules": s.exclude_modules,
            "overrides": s.overrides,
        }
        structurize(model, s.spec, **kw)
        structurize(base, s.spec, **kw)
    return model.to(device), base


def build_optimizer(cfg: Config, model: nn.Module, base: nn.Module) -> torch.optim.Optimizer:
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


@torch.no_grad()
def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Forward multiply-accumulates for ONE example, counted by ``FlopCounterMode`` (which
    counts 2 per MAC on every matmul, including attention and structured kernels; elementwise
    ops are not counted). ``example`` has a leading batch dimension of 1."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was)
    return int(counter.get_total_flops()) // 2


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- user code may draw from the global NumPy RNG
    torch.manual_seed(seed)
