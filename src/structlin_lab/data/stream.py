"""Device-side batching for data sets too large to hold on the device (ImageNet).

:class:`StreamingImageBatches` takes a DataLoader of ``(uint8 (B, C, H, W), int64 (B,))``
batches (decoded and cropped by worker processes) and produces the same
:class:`~structlin_lab.data.loader.ImageBatch` objects as
:class:`~structlin_lab.data.loader.TensorImageLoader`: moved to the device, with label smoothing,
mixup and normalisation applied batched there by the same code
(:func:`~structlin_lab.data.loader.make_image_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .loader import ImageBatch, make_image_batch

__all__ = ["StreamingImageBatches"]


class StreamingImageBatches:
    """Wrap a DataLoader of uint8 image batches into normalised, mixed :class:`ImageBatch` es.

    Args:
        loader: yields ``(images uint8 (B, C, H, W), labels int64 (B,))``; may have ``set_epoch``.
        device: where batches go.
        num_classes: K, for the soft targets.
        mean, std: per-channel, in the images' units (0..255 for uint8).
        train: apply mixup and label smoothing (eval batches get one-hot targets).
        mixup_alpha, label_smoothing: as in :class:`TensorImageLoader` (0 disables).
        seed: seeds the device generator for mixup.

    Resuming (``load_state_dict``) restarts the saved epoch and skips the batches already used.
    Skipped batches are still decoded by the workers, and worker-side crops are only reproducible
    from the start of a run, so a resumed run continues the same sample order but not
    bit-identical crops. ``ImageBatch.indices`` is empty: the workers do not report them.
    """

    def __init__(
        self,
        loader: Any,
        *,
        device: torch.device | str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        mixup_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.num_classes = num_classes
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.train = train
        self.mixup_alpha = mixup_alpha if train else 0.0
        self.label_smoothing = label_smoothing if train else 0.0
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        skip = self.position
        for i, (images, labels) in enumerate(self.loader):
            if i < skip:
                continue
            self.position = i + 1
            yield self._make(images, labels)
        self.epoch += 1
        self.position = 0

    def _make(self, images: torch.Tensor, labels: torch.Tensor) -> ImageBatch:
        return make_image_batch(
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True).long(),
            torch.empty(0, dtype=torch.long, device=self.device),
            num_classes=self.num_classes,
            label_smoothing=self.label_smoothing,
            mixup_alpha=self.mixup_alpha,
            mean=self._mean,
            std=self._std,
            generator=self.generator,
        )

    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``position`` (batches of that epoch already yielded) and the mixup
        generator's state."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration skips the batches already used."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
