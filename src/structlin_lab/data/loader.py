"""An on-device batch loader for small uint8 image datasets (CIFAR-size).

The whole dataset is held once as a uint8 ``(N, C, H, W)`` tensor on the training device, and each
batch is gathered, augmented (random resized crop + horizontal flip), mixed (mixup) and normalised
there with batched tensor ops (the recipe of :mod:`structlin_lab.data.augment`). For CIFAR-10 that
is 150 MiB of device memory and no worker processes, host-device copies or per-sample Python.

Sampling, sharding and resume:

- Each training epoch uses a permutation drawn from a generator seeded by ``(seed, epoch)`` only,
  so every DDP rank computes the same permutation without communicating.
- Step ``s`` of an epoch covers the global batch ``perm[s * G : (s + 1) * G]`` with
  ``G = batch_size * world_size``; rank ``r`` takes its ``r``-th contiguous chunk of ``batch_size``
  samples. So the ranks' batches are disjoint and, concatenated in rank order, equal the batch of a
  single-process loader with ``batch_size = G`` and the same seed.
- Training with ``drop_last=True`` (the default) drops the ``N mod G`` samples left at the end of
  each epoch; as the permutation changes every epoch, a different remainder is dropped each time.
  No divisibility of ``N`` is required, but ``N >= G`` is (otherwise there would be no step at all,
  which is an error). With ``drop_last=False``, and always in eval mode, the last global batch is
  partial and is split across ranks as evenly as possible (sizes differ by at most one), so every
  rank yields the same number of batches, which DDP collectives need; if ``N mod G`` is smaller
  than ``world_size``, some ranks' last batch is empty. Sum per-rank counts rather than averaging
  per-rank means when evaluating sharded; and keep ``drop_last=True`` for sharded training, since
  the mean loss of an empty batch is NaN.
- Augmentation randomness comes from a per-rank generator, reseeded from ``(seed, epoch, rank)`` at
  the start of each epoch, so an epoch's augmentations do not depend on earlier epochs.
  ``state_dict`` records the epoch, the number of batches already yielded in it and that
  generator's state; after ``load_state_dict`` iteration continues with bit-identical batches
  (same device type and torch build: CPU and CUDA generators have different streams and state
  formats, so a state does not carry across device types).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .augment import (
    derive_seed,
    mixup,
    normalize,
    random_resized_crop,
    smooth_one_hot,
)

__all__ = ["ImageBatch", "TensorImageLoader", "make_image_batch"]

# Independent seed streams for the permutation and the augmentations, so they never collide.
_PERM_STREAM = 0
_AUG_STREAM = 1


@dataclass(frozen=True)
class ImageBatch:
    """One batch, all tensors on the loader's device.

    Attributes:
        x: ``(B, C, H, W)`` float32, augmented, mixed and normalised inputs.
        targets: ``(B, K)`` float32 soft targets (label smoothing and mixup applied; plain one-hot
            in eval mode): the loss is ``-(targets * log_softmax(logits)).sum(-1)``.
        labels: ``(B,)`` int64 true labels of the samples in ``x`` (before mixing).
        y_a: ``(B,)`` int64, equal to ``labels``.
        y_b: ``(B,)`` int64 labels of the mixup partners (``labels`` when mixup is off).
        lam: 0-dim float32 weight of ``y_a`` in the mix (1 when mixup is off).
        indices: ``(B,)`` int64 dataset indices of the samples, for debugging and bookkeeping
            (empty where the source does not know them).
    """

    x: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor
    indices: torch.Tensor


def make_image_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    *,
    num_classes: int,
    label_smoothing: float,
    mixup_alpha: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
) -> ImageBatch:
    """Targets, mixup and normalisation of one batch, batched on its device (both loaders).

    Args:
        images: ``(B, C, H, W)`` uint8 or float images (already cropped), in 0..255 units.
        labels: ``(B,)`` int64; ``indices``: ``(B,)`` int64, passed through.
        num_classes: ``K``; label_smoothing: mass spread over the ``K`` classes.
        mixup_alpha: Beta(alpha, alpha) mixup with one lambda per batch; 0 disables it (and then
            draws nothing from ``generator``).
        mean, std: ``(C,)`` float32 per-channel statistics in the images' units.
        generator: on the images' device.
    """
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    y_b, lam = labels, torch.ones((), device=images.device)
    if mixup_alpha > 0:
        images, targets, perm, lam = mixup(images, targets, mixup_alpha, generator=generator)
        y_b = labels.index_select(0, perm)
    # Normalising after mixing equals mixing normalised images (both are affine), as in FFCV.
    x = normalize(images, mean, std)
    return ImageBatch(
        x=x, targets=targets, labels=labels, y_a=labels, y_b=y_b, lam=lam, indices=indices
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # A generator and the tensors it fills must agree on the exact device.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _to_nchw_uint8(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    is_uint8 = (
        images.dtype == torch.uint8
        if isinstance(images, torch.Tensor)
        else isinstance(images, np.ndarray) and images.dtype == np.uint8
    )
    if images.ndim != 4 or not is_uint8:
        raise ValueError(
            f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}"
        )
    if isinstance(images, np.ndarray):
        # Transpose on the host so the device receives exactly one NCHW copy; np.array always
        # copies, which also avoids torch's warning on read-only (e.g. memory-mapped) arrays.
        return torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C")).to(device)
    return images.to(device).permute(0, 3, 1, 2).contiguous()


def _to_labels(
    labels: np.ndarray | torch.Tensor, n: int, num_classes: int, device: torch.device
) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    if y.shape != (n,) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be {n} integers, got {y.dtype} {tuple(y.shape)}")
    y = y.to(device=device, dtype=torch.int64)
    # One host sync at construction is cheap; out-of-range labels would fail later in one_hot.
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return y


def _stats_in_255_units(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, C, 1, 1)`` float32 ``mean * 255`` and ``std * 255``: uint8 data are 0..255, so the
    ``/ 255`` folds into the statistics and normalising is one fused op per batch."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel)")
    shape = (1, channels, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
    return m * 255.0, s * 255.0


class TensorImageLoader:
    """Iterate over shuffled, augmented, mixup'd batches of an in-memory uint8 image dataset.

    Iterating runs (the rest of) the current epoch; the next iteration runs the next epoch. Breaking
    out of a loop keeps the position, so a later iteration continues the same epoch. Only one
    iterator may be active at a time: starting a new one invalidates the previous one.

    Args:
        images: ``(N, H, W, C)`` uint8 numpy array or tensor (e.g. ``CifarArrays.train_x``).
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        batch_size: samples per batch on this rank (global batch is ``batch_size * world_size``).
        num_classes: ``K``, width of the targets.
        mean, std: ``(C,)`` per-channel statistics in [0, 1] units (as usually quoted, e.g.
            CIFAR-10's mean ``(0.4914, 0.4822, 0.4465)``); inputs are ``(x / 255 - mean) / std``.
        device: where the dataset lives and batches are built.
        train: training mode. ``False`` (eval) disables augmentation, mixup, smoothing and
            shuffling, and keeps the last partial batch.
        augment: random resized crop + horizontal flip (training only).
        mixup_alpha: Beta(alpha, alpha) mixup with one lambda per batch; 0 disables it.
        label_smoothing: smoothing of the training targets (applied before mixing, which equals
            the smoothed cross-entropy on both labels weighted by lambda).
        seed: base seed of the permutation and augmentation streams.
        drop_last: drop the incomplete last global batch in training (see module docs).
        rank, world_size: this process's shard for DDP.

    Raises:
        ValueError: malformed inputs, or a training dataset too small for one global batch with
            ``drop_last=True``.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        *,
        batch_size: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        train: bool = True,
        augment: bool = True,
        mixup_alpha: float = 0.8,
        label_smoothing: float = 0.3,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                f"rank={rank}, world_size={world_size}"
            )
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 disables mixup), got {mixup_alpha}")
        self.device = _resolve_device(device)
        self._images = _to_nchw_uint8(images, self.device)
        n, c = self._images.shape[:2]
        self._labels = _to_labels(labels, n, num_classes, self.device)
        self._mean, self._std = _stats_in_255_units(mean, std, c, self.device)
        self.batch_size, self.num_classes, self.seed = batch_size, num_classes, seed
        self.rank, self.world_size = rank, world_size
        self.train = train
        self.augment = train and augment
        self.mixup_alpha = mixup_alpha if train else 0.0
        self.label_smoothing = label_smoothing if train else 0.0
        self.drop_last = drop_last and train
        if self.drop_last and n < self.global_batch_size:
            raise ValueError(
                f"the dataset has {n} samples, fewer than one global batch of batch_size * "
                f"world_size = {batch_size} * {world_size} = {self.global_batch_size}; lower "
                "batch_size or pass drop_last=False"
            )
        self._perm_gen = torch.Generator(device=self.device)
        self._aug_gen = torch.Generator(device=self.device)
        self._iter_token = 0
        self.set_epoch(0)

    @property
    def num_samples(self) -> int:
        """``N``, the dataset size (all ranks)."""
        return self._images.shape[0]

    @property
    def global_batch_size(self) -> int:
        """``batch_size * world_size``, samples per optimiser step across all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (normally not needed: iteration advances the epoch)."""
        self.epoch = epoch
        self.position = 0
        self._aug_gen.manual_seed(derive_seed(self.seed, _AUG_STREAM, epoch, self.rank))

    def _order(self, epoch: int) -> torch.Tensor:
        """``(N,)`` int64 sample order of ``epoch``, identical on every rank."""
        n = self.num_samples
        if not self.train:
            return torch.arange(n, device=self.device)
        self._perm_gen.manual_seed(derive_seed(self.seed, _PERM_STREAM, epoch))
        return torch.randperm(n, device=self.device, generator=self._perm_gen)

    def _shard(self, order: torch.Tensor, step: int) -> torch.Tensor:
        g = self.global_batch_size
        chunk = order[step * g : (step + 1) * g]
        # For a full global batch this is rank's [r*B, (r+1)*B) slice; a partial one is split as
        # evenly as possible so that every rank still yields a (possibly empty) batch.
        return torch.tensor_split(chunk, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[ImageBatch]:
        self._iter_token += 1
        return self._run(self._iter_token)

    def _run(self, token: int) -> Iterator[ImageBatch]:
        order = self._order(self.epoch)
        while self.position < len(self):
            if token != self._iter_token:
                # Continuing would consume the generator and position that the newer owner uses.
                raise RuntimeError("the loader was re-iterated or reloaded; this iterator is stale")
            batch = self._make_batch(self._shard(order, self.position))
            self.position += 1
            yield batch
        if token == self._iter_token:
            self.set_epoch(self.epoch + 1)

    def _make_batch(self, idx: torch.Tensor) -> ImageBatch:
        images = self._images.index_select(0, idx)
        if self.augment:
            images = random_resized_crop(images, generator=self._aug_gen)
        return make_image_batch(
            images,
            self._labels.index_select(0, idx),
            idx,
            num_classes=self.num_classes,
            label_smoothing=self.label_smoothing,
            mixup_alpha=self.mixup_alpha,
            mean=self._mean,
            std=self._std,
            generator=self._aug_gen,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where iteration stands.

        Returns:
            ``epoch``, ``position`` (batches of that epoch already yielded), ``aug_generator``
            (CPU uint8 state tensor) and the sampling configuration, which ``load_state_dict``
            checks because a position means nothing under another batch size or sharding.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "aug_generator": self._aug_gen.get_state(),
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues with identical batches.

        Raises:
            ValueError: the state was saved under a different sampling configuration.
        """
        if state["config"] != self._config():
            raise ValueError(
                f"loader state was saved with {state['config']}, but this loader has "
                f"{self._config()}; resuming would not reproduce the same batches"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._aug_gen.set_state(state["aug_generator"])
        self._iter_token += 1  # an iterator from before the load must not continue

    def _config(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "train": self.train,
            "drop_last": self.drop_last,
        }
