"""What the trainer does differently for each kind of data: one small object per task.

A task owns everything that depends on what is learned from what: the example input whose
forward MACs are counted, the stream of training batches, the training loss and accuracy of a
batch, the evaluation on the held-out split, and the position in the training data that a
checkpoint must carry for an exact resume. The trainer (:mod:`.trainer`) calls only the methods
of :class:`Task` and never asks which kind of data it trains on.

- :class:`ImageClassification`: ``(B, C, H, W)`` images to ``(B, K)`` logits; soft-target
  cross-entropy (label smoothing and mixup are folded into the targets by the loader) and the
  mixup-aware training accuracy of the paper's code.
- :class:`LanguageModeling`: ``(B, T)`` token ids to ``(B, T, V)`` next-token logits; random
  windows of a token array, cross-entropy per position.

The metrics are written as ``test_loss`` / ``test_acc`` (keys that committed results and the fit
tools read), but they are measured on each task's held-out split ``val``: a text's validation
tokens, an image data set's test split (CIFAR, Fashion-MNIST) or validation folder (ImageNet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .build import DataShapes
from .config import Config, DataConfig

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "FASHION_MEAN",
    "FASHION_STD",
    "BatchResult",
    "Evaluation",
    "ImageClassification",
    "LanguageModeling",
    "Task",
    "build_task",
    "mixup_accuracy",
    "soft_cross_entropy",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)

#: The model applied to a batch of inputs (under the trainer's autocast).
Forward = Callable[[torch.Tensor], Any]


class BatchResult(NamedTuple):
    """One training batch: the mean ``loss`` to backpropagate (0-dim, float32), the batch's
    training ``accuracy`` in [0, 1], and the number of ``examples`` in it (on this process)."""

    loss: torch.Tensor
    accuracy: float
    examples: int


class Evaluation(NamedTuple):
    """Mean cross-entropy and top-1 accuracy over the held-out split, per prediction."""

    loss: float
    accuracy: float


class Task(Protocol):
    """What the trainer needs from a task (see the module docstring)."""

    #: The sizes the model takes from the data (its output width, the image shape).
    shapes: DataShapes
    #: Training steps in one pass over this process's share of the training data.
    steps_per_epoch: int

    def example_input(self) -> torch.Tensor:
        """One input with a leading batch dimension of 1, for counting forward MACs."""
        ...

    def train_batches(self) -> Iterator[Any]:
        """Training batches without end, continuing from the loaded data position."""
        ...

    def loss_and_accuracy(self, forward: Forward, batch: Any) -> BatchResult:
        """Forward ``batch`` through ``forward``; the loss keeps its graph for ``backward``."""
        ...

    def evaluate(self, forward: Forward) -> Evaluation:
        """Loss and accuracy on the held-out split (the same examples at every call)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This process's position in the training data."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position that :meth:`state_dict` returned."""
        ...


def build_task(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> Task:
    """The task of ``cfg.task`` on the data of ``cfg.data``, loaded (and cached) for process
    ``rank`` of ``world_size``."""
    tasks = {"classify": ImageClassification, "lm": LanguageModeling}
    return tasks[cfg.task].from_config(cfg, device, rank, world_size)


# ---------------------------------------------------------------------------- losses and metrics
def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k soft_targets[b, k] * log_softmax(logits)[b, k]``.

    ``logits`` and ``soft_targets`` are ``(B, K)``; each target row sums to 1. With one-hot
    targets this is ``F.cross_entropy``; with smoothed targets it is ``F.cross_entropy`` with
    ``label_smoothing``; with mixed targets ``lam * t_a + (1 - lam) * t_b`` it is the
    ``lam``-weighted sum of the two cross-entropies (mixup's loss).
    """
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


@torch.no_grad()
def mixup_accuracy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
    """Training accuracy under mixup as the paper's code measures it: the larger of the batch
    accuracy against ``y_a`` and against ``y_b`` (the max of two batch means, not per sample).

    ``logits`` is ``(B, K)``; ``y_a``, ``y_b`` are ``(B,)`` labels of the two mixed images
    (``y_b = y_a`` without mixup). It overstates accuracy against the mixed targets: a cheap
    progress signal, not comparable to the evaluation accuracy. Returns a 0-dim tensor (no sync).
    """
    pred = logits.argmax(-1)
    return torch.maximum((pred == y_a).float().mean(), (pred == y_b).float().mean())


# ---------------------------------------------------------------------------- images
class ImageClassification:
    """Classify images into ``num_classes`` classes.

    Args:
        train: training loader yielding :class:`~structlin_lab.data.ImageBatch` (one pass per
            ``iter``), with ``len`` (batches per pass) and ``state_dict``/``load_state_dict``:
            a ``TensorImageLoader`` or ``StreamingImageBatches``.
        val: held-out loader yielding ``ImageBatch`` (only ``x`` and ``labels`` are used).
        num_classes: ``K``, the width of the logits.
        image_shape: ``(C, H, W)``.
        device: where the example input lives.
    """

    def __init__(
        self,
        train: Any,
        val: Any,
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        device: torch.device,
    ) -> None:
        self.train = train
        self.val = val
        self.shapes = DataShapes(num_classes, image_shape)
        self.steps_per_epoch = len(train)
        self.device = device

    @classmethod
    def from_config(
        cls, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> ImageClassification:
        """CIFAR-10/100 or Fashion-MNIST in memory on ``device``, or ImageNet streamed from
        folders; each process gets ``data.batch_size / world_size`` examples per step."""
        d = cfg.data
        if d.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={d.batch_size} is the global batch and must divide evenly "
                f"across {world_size} processes; use a multiple of {world_size}"
            )
        if d.name == "imagenet":
            return cls._imagenet(cfg, device, rank, world_size)
        return cls._in_memory(cfg, _image_arrays(d), device, rank, world_size)

    @classmethod
    def _in_memory(
        cls, cfg: Config, a: _ImageArrays, device: torch.device, rank: int, world_size: int
    ) -> ImageClassification:
        from ..data import TensorImageLoader

        d = cfg.data
        common = {"device": device, "mean": a.mean, "std": a.std, "num_classes": a.num_classes}
        train = TensorImageLoader(
            a.train_x,
            a.train_y,
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
        val = TensorImageLoader(
            a.val_x,
            a.val_y,
            batch_size=d.eval_batch_size,
            train=False,
            augment=False,
            mixup_alpha=0.0,
            label_smoothing=0.0,
            **common,
        )
        h, w, c = a.train_x.shape[1:]
        return cls(train, val, num_classes=a.num_classes, image_shape=(c, h, w), device=device)

    @classmethod
    def _imagenet(
        cls, cfg: Config, device: torch.device, rank: int, world_size: int
    ) -> ImageClassification:
        from ..data import (
            IMAGENET_MEAN_255,
            IMAGENET_STD_255,
            StreamingImageBatches,
            imagenet_loader,
        )

        d = cfg.data
        if d.source is None:
            raise ValueError("data.source must be the ImageNet root with train/ and val/ folders")
        size = int(cfg.model.kwargs.get("image_size", 224))
        common = {"image_size": size, "num_workers": d.num_workers, "seed": cfg.train.seed}
        train_dl = imagenet_loader(
            d.source,
            "train",
            batch_size=d.batch_size // world_size,
            rank=rank,
            world_size=world_size,
            **common,
        )
        # every process evaluates the whole validation split
        val_dl = imagenet_loader(d.source, "val", batch_size=d.eval_batch_size, **common)
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
        val = StreamingImageBatches(val_dl, train=False, **stats)
        return cls(train, val, num_classes=classes, image_shape=(3, size, size), device=device)

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.shapes.image_shape, device=self.device)

    def train_batches(self) -> Iterator[Any]:
        while True:
            yield from self.train

    def loss_and_accuracy(self, forward: Forward, batch: Any) -> BatchResult:
        logits = forward(batch.x).float()
        loss = soft_cross_entropy(logits, batch.targets)
        accuracy = mixup_accuracy(logits, batch.y_a, batch.y_b).item()
        return BatchResult(loss, accuracy, batch.x.shape[0])

    @torch.no_grad()
    def evaluate(self, forward: Forward) -> Evaluation:
        total_loss, total_correct, count = 0.0, 0.0, 0
        for b in self.val:
            logits = forward(b.x).float()
            total_loss += F.cross_entropy(logits, b.labels, reduction="sum").item()
            total_correct += (logits.argmax(-1) == b.labels).sum().item()
            count += b.labels.numel()
        return Evaluation(total_loss / count, total_correct / count)

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)


@dataclass(frozen=True)
class _ImageArrays:
    """A small image data set as uint8 ``(N, H, W, C)`` arrays with its normalisation."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _image_arrays(d: DataConfig) -> _ImageArrays:
    if d.name in ("cifar10", "cifar100"):
        from ..data import load_cifar

        a = load_cifar(d.name, d.root, source=d.source, download=d.download)
        return _ImageArrays(
            a.train_x, a.train_y, a.test_x, a.test_y, len(a.classes), CIFAR_MEAN, CIFAR_STD
        )
    if d.name == "fashion_mnist":
        from ..data import load_fashion_mnist

        a = load_fashion_mnist(d.root, source=d.source, download=d.download)
        return _ImageArrays(
            a.train_x[..., None],  # (N, 28, 28) grey: one channel
            a.train_y,
            a.test_x[..., None],
            a.test_y,
            len(a.classes),
            FASHION_MEAN,
            FASHION_STD,
        )
    raise ValueError(
        f"unknown data.name {d.name!r}; valid: cifar10, cifar100, fashion_mnist, imagenet "
        f"(or task 'lm' with a text file)"
    )


# ---------------------------------------------------------------------------- text
class LanguageModeling:
    """Predict every next token of random windows of a token array.

    Args:
        train, val: 1-D token arrays (e.g. ``TextData.train`` / ``TextData.val``).
        vocab_size: ``V``, the width of the logits.
        batch_size, block_size: ``B`` windows of ``T`` tokens per step (per process).
        eval_batches: batches of ``val`` per evaluation, drawn from a fixed seed.
        seed: seed of the generator that draws the training windows; its state is the data
            position a checkpoint carries.
        steps_per_epoch: steps that see as many tokens as ``train`` holds (across processes).
        device: where batches and the example input live.
    """

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        vocab_size: int,
        batch_size: int,
        block_size: int,
        eval_batches: int,
        seed: int,
        steps_per_epoch: int,
        device: torch.device,
    ) -> None:
        self.train = train
        self.val = val
        self.shapes = DataShapes(vocab_size)
        self.batch_size = batch_size
        self.block_size = block_size
        self.eval_batches = eval_batches
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(
        cls, cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> LanguageModeling:
        """The text of ``data.source`` (or OpenWebText), tokenised and cached. Every process
        draws its own ``data.batch_size`` windows per step, seeded ``train.seed + rank``."""
        from ..data import load_openwebtext, prepare_text

        d = cfg.data
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
        return cls(
            text.train,
            text.val,
            vocab_size=text.vocab_size,
            batch_size=d.batch_size,
            block_size=d.block_size,
            eval_batches=d.eval_batches,
            seed=cfg.train.seed + rank,
            steps_per_epoch=max(1, len(text.train) // (d.batch_size * d.block_size * world_size)),
            device=device,
        )

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, self.block_size, dtype=torch.long, device=self.device)

    def _batch(self, tokens: np.ndarray, generator: torch.Generator):
        from ..data import get_batch

        return get_batch(tokens, self.batch_size, self.block_size, generator, device=self.device)

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self._batch(self.train, self.generator)

    def loss_and_accuracy(
        self, forward: Forward, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> BatchResult:
        x, y = batch
        logits = forward(x)[0].float()  # the model returns (logits, loss)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        return BatchResult(loss, accuracy, x.shape[0])

    @torch.no_grad()
    def evaluate(self, forward: Forward) -> Evaluation:
        generator = torch.Generator().manual_seed(12345)  # the same batches at every evaluation
        total_loss, total_correct, count = 0.0, 0.0, 0
        for _ in range(self.eval_batches):
            x, y = self._batch(self.val, generator)
            logits = forward(x)[0].float()
            total_loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            total_correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
        return Evaluation(total_loss / count, total_correct / count)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
