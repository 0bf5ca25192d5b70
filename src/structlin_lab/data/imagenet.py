"""ImageNet-style image folders: per-sample decoding and cropping in DataLoader worker processes.

Layout::

    <root>/train/<class>/*.JPEG|jpg|jpeg|png
    <root>/val/<class>/*.JPEG|jpg|jpeg|png

Classes are the sorted folder names and must be identical in both splits (labels are indices into
that list). Hidden files and other extensions are ignored.

Pointing it at an extracted ILSVRC2012:

- ``train/``: ``ILSVRC2012_img_train.tar`` holds one tar per class named by WordNet id; extract
  each ``n01440764.tar`` into ``train/n01440764/`` and so on (1000 folders, 1,281,167 images).
- ``val/``: ``ILSVRC2012_img_val.tar`` extracts to 50,000 files in one flat folder and must be
  re-organised into ``val/<wnid>/`` folders first, because its labels live only in the devkit
  (``ILSVRC2012_validation_ground_truth.txt``, in the devkit's own class order), not in the file
  names or folders. The widely used ``valprep.sh`` script does exactly this move.

With this layout the labels follow sorted-wnid order, the same as torchvision's ``ImageFolder``.

Only cheap per-sample work happens here: decoding with Pillow and the geometric crop, yielding
uint8 ``(3, S, S)`` tensors. Normalisation, mixup and label smoothing are meant to run batched on
the training device afterwards, e.g. with :func:`structlin_lab.data.augment.normalize`,
:func:`~structlin_lab.data.augment.mixup` and :func:`~structlin_lab.data.augment.smooth_one_hot`.

Transforms (no torchvision needed; they follow torchvision's PIL code paths):

- train: ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))`` with torchvision's sampling
  (10 tries, then the central fallback), then a horizontal flip with probability 0.5.
- val: resize the shorter side to ``int(S / 0.875)`` (256 for 224), then a ``S x S`` centre crop.

Both resize with bicubic interpolation by default, as the paper's timm ViT recipe does (reference
§5.4: "Eval: bicubic, crop 224/256"); ``interpolation="bilinear"`` gives torchvision's default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "ImageFolder",
    "ImageNetLoader",
    "imagenet_loader",
]

# The usual ImageNet channel statistics, in 0..255 units to match the uint8 batches, e.g. for
# ``augment.normalize(x, IMAGENET_MEAN_255, IMAGENET_STD_255)``.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_SPLITS = ("train", "val")
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
# timm / torchvision convention: resize to size / crop_pct, then centre-crop to size.
_VAL_CROP_PCT = 0.875
_CROP_TRIES = 10
_INTERPOLATIONS = ("bilinear", "bicubic")


def _seed(*parts: int) -> int:
    # SeedSequence hashes its inputs, so nearby (seed, rank, epoch) give unrelated streams.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name[0] == ".")


def _diff_message(a: list[str], b: list[str], name_a: str, name_b: str) -> str:
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    parts = []
    for name, only in ((name_a, only_a), (name_b, only_b)):
        if only:
            shown = ", ".join(only[:5]) + (f", ... ({len(only)} in all)" if len(only) > 5 else "")
            parts.append(f"only in {name}: {shown}")
    return "; ".join(parts)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries draw an area fraction uniformly from ``scale`` and an aspect ratio
    log-uniformly from ``ratio``; the first box that fits is placed uniformly at random. If none
    fits, the largest centred box whose aspect ratio is clamped into ``ratio`` is used.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        # Python's round (half to even), as torchvision.
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def val_resize_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the shorter side to ``int(image_size / 0.875)``.

    Same arithmetic as torchvision's ``Resize(int)``: the longer side becomes
    ``int(short_new * long / short)`` (truncated, not rounded).
    """
    short_new = int(image_size / _VAL_CROP_PCT)
    if height <= width:
        return short_new, int(short_new * width / height)
    return int(short_new * height / width), short_new


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of a ``size x size`` centre crop, rounded as torchvision's ``CenterCrop``."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


class ImageFolder(Dataset):
    """One split of an ImageNet-style image folder, yielding ``(uint8 (3, S, S) tensor, label)``.

    See the module docstring for the expected layout, how to prepare ILSVRC2012 and the exact
    transforms. Images are decoded with Pillow and converted to RGB (greyscale and CMYK JPEGs, which
    ILSVRC2012 contains, included).

    Randomness (train mode): each process keeps its own ``numpy`` generator, created lazily on the
    first sample it loads. In a DataLoader worker it is seeded from ``(seed, worker seed)``, where
    the worker seed (``torch.initial_seed()`` there) derives from the DataLoader's ``generator``;
    in the main process (``num_workers=0`` or direct indexing) from ``seed`` alone. So a run is
    reproducible given the seeds, the batch size and the number of workers (the DataLoader hands
    batch ``k`` of every epoch to worker ``k mod num_workers``). Assigning a new ``seed`` reseeds
    the generator on its next use in that process (worker processes hold their own copy).

    Samples are ordered by class, then file name. File names are kept in one numpy byte buffer
    rather than a list of Python strings, so forked workers do not gradually copy the whole list
    (reference counting touches every object's page; with 1.28M paths that costs each worker
    hundreds of MB).

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        image_size: output side ``S``.
        train: random-resized-crop + flip if true, resize + centre crop if false; default
            ``split == "train"``.
        interpolation: ``"bicubic"`` (default, the paper's timm recipe) or ``"bilinear"``.
        seed: seed of the per-process augmentation generator (see above).

    Raises:
        ImportError: Pillow is not installed.
        FileNotFoundError: ``root`` or ``root/split`` does not exist.
        ValueError: unknown ``split``, no class folders, a class folder without images, or class
            folders that differ between ``train/`` and ``val/``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        image_size: int = 224,
        train: bool | None = None,
        interpolation: str = "bicubic",
        seed: int = 0,
    ) -> None:
        try:
            from PIL import Image
        except ImportError as e:
            raise ImportError("ImageFolder needs Pillow: pip install 'structlin[data]'") from e
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}"
            )
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = image_size
        self.train = split == "train" if train is None else train
        self.interpolation = interpolation
        self.seed = seed
        self._resample = (
            Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
        )

        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image-folder root {self.root} does not exist or is not a folder; expected "
                f"{self.root}/{{train,val}}/<class>/*.JPEG (see structlin_lab.data.imagenet's docs)"
            )
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"split folder {split_dir} does not exist; expected {split_dir}/<class>/*.JPEG "
                "(for ILSVRC2012 val, sort the flat val images into <wnid>/ folders first)"
            )
        self.classes = _list_classes(split_dir)
        if not self.classes:
            raise ValueError(f"{split_dir} has no class folders; expected {split_dir}/<class>/")
        other = self.root / _SPLITS[1 - _SPLITS.index(split)]
        if other.is_dir():
            other_classes = _list_classes(other)
            if other_classes != self.classes:
                by_split = {split: self.classes, other.name: other_classes}
                raise ValueError(
                    f"class folders differ between {self.root / 'train'} "
                    f"({len(by_split['train'])}) and {self.root / 'val'} ({len(by_split['val'])}), "
                    "so labels would not agree: "
                    + _diff_message(by_split["train"], by_split["val"], "train", "val")
                )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        names: list[bytes] = []
        counts: list[int] = []
        for c in self.classes:
            files = sorted(
                e.name
                for e in os.scandir(split_dir / c)
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES
                and e.is_file()
            )
            if not files:
                raise ValueError(
                    f"class folder {split_dir / c} holds no images (*.JPEG, *.jpg, *.jpeg, *.png)"
                )
            names += (os.fsencode(f) for f in files)
            counts.append(len(files))
        lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
        self._offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)
        self.targets = np.repeat(np.arange(len(self.classes), dtype=np.int64), counts)
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[Any, ...] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"ImageFolder({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes, image_size={self.image_size}, {mode} transform)"
        )

    def path(self, index: int) -> Path:
        """File of sample ``index``."""
        name = os.fsdecode(self._names[self._offsets[index] : self._offsets[index + 1]].tobytes())
        return self.root / self.split / self.classes[self.targets[index]] / name

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """``(path, label)`` of every sample, built on demand (torchvision-style; not cheap)."""
        return [(self.path(i), int(self.targets[i])) for i in range(len(self))]

    def __getstate__(self) -> dict[str, Any]:
        # A generator created in the parent must not be inherited by workers (they would all
        # replay the same stream); each process builds its own.
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_key"] = None
        return state

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        # The pid catches forked copies that inherited a generator without being pickled.
        key = (os.getpid(), self.seed, None if info is None else (info.id, info.seed))
        if self._rng is None or self._rng_key != key:
            entropy = [self.seed] if info is None else [self.seed, info.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_key = key
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        from PIL import Image

        with Image.open(self.path(index)) as f:
            img = f.convert("RGB")
        size = self.image_size
        if self.train:
            rng = self._generator()
            top, left, h, w = random_resized_crop_box(img.height, img.width, rng)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), self._resample)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            h, w = val_resize_size(img.height, img.width, size)
            img = img.resize((w, h), self._resample)
            top, left = center_crop_offsets(h, w, size)
            img = img.crop((left, top, left + size, top + size))
        # np.array copies into a writable array (np.asarray of a PIL image may be read-only).
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return x, int(self.targets[index])


class ImageNetLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` with :meth:`set_epoch`; built by
    :func:`imagenet_loader`."""

    def __init__(self, dataset: ImageFolder, *, seed: int, rank: int, **kwargs: Any) -> None:
        self._loader_seed = seed
        self._rank = rank
        super().__init__(dataset, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Key the next epoch's shuffle and seeds to ``(seed, rank, epoch)``; call it every epoch.

        Required under DDP: it forwards to ``DistributedSampler.set_epoch``, without which every
        epoch reuses epoch 0's order. It also reseeds the loader's generator (the single-process
        shuffle and the seeds of newly started workers) and the main-process augmentation
        generator, so with ``num_workers=0`` an epoch depends only on ``(seed, rank, epoch)``, and
        a resumed run sees the same order as an uninterrupted one. Persistent workers keep their
        augmentation generators across epochs: their crops stay reproducible for a run started
        from epoch 0, but not across a resume.
        """
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(_seed(self._loader_seed, self._rank, epoch))
        if isinstance(self.dataset, ImageFolder):
            self.dataset.seed = _seed(self._loader_seed, self._rank, epoch, 1)


def imagenet_loader(
    root: str | Path,
    split: str,
    *,
    batch_size: int,
    image_size: int = 224,
    num_workers: int = 4,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool | None = None,
    interpolation: str = "bicubic",
) -> ImageNetLoader:
    """A DataLoader of ``(uint8 (B, 3, S, S), int64 (B,))`` batches over one split of ``root``.

    Train mode (random-resized-crop + flip, shuffled) for ``split="train"``, eval mode (resize +
    centre crop, in order) for ``"val"``; see the module docstring for layout and transforms.
    Move batches to the device and finish there, e.g.::

        loader = imagenet_loader(root, "train", batch_size=384, rank=rank, world_size=world)
        for epoch in range(epochs):
            loader.set_epoch(epoch)  # needed under DDP, see ImageNetLoader.set_epoch
            for x, y in loader:
                x = normalize(x.to(device, non_blocking=True), IMAGENET_MEAN_255, IMAGENET_STD_255)
                ...

    With ``world_size > 1`` each rank reads a disjoint shard through a
    :class:`~torch.utils.data.distributed.DistributedSampler` (shuffled with ``seed`` and the
    epoch for train; in order for val). For val with ``drop_last=False`` that sampler pads the
    shards to equal length by repeating up to ``world_size - 1`` samples, so sharded val metrics
    count those twice; evaluate on one rank, or de-duplicate, where exact numbers matter.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        batch_size: samples per batch on this rank.
        image_size: output side ``S``.
        num_workers: decoding processes (kept alive across epochs when > 0); 0 decodes in the
            calling process.
        seed: seeds the shuffle (through a dedicated ``torch.Generator``, and the
            DistributedSampler's ``seed``), the workers' seeds and the augmentation generator.
        rank, world_size: this process's shard for DDP.
        drop_last: drop the incomplete last batch; default true for train, false for val.
        interpolation: ``"bicubic"`` or ``"bilinear"``.

    Pinned memory is used when CUDA is available.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need world_size >= 1 and 0 <= rank < world_size, got {rank}/{world_size}"
        )
    train = split == "train"
    if drop_last is None:
        drop_last = train
    # Rank enters the augmentation and worker seeds (the shuffle is shared through the sampler),
    # so that ranks do not apply identical crop sequences.
    dataset = ImageFolder(
        root,
        split,
        image_size=image_size,
        train=train,
        interpolation=interpolation,
        seed=_seed(seed, rank, 0, 1),
    )
    generator = torch.Generator()
    generator.manual_seed(_seed(seed, rank, 0))
    sampler: DistributedSampler | None = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=train,
            seed=seed,
            drop_last=drop_last,
        )
    return ImageNetLoader(
        dataset,
        seed=seed,
        rank=rank,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
