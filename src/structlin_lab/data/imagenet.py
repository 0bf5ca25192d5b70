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
uint8 ``(3, S, S)`` tensors. Normalisation, mixup and label smoothing run batched on the training
device afterwards (:class:`~structlin_lab.data.stream.StreamingImageBatches`).

Transforms (no torchvision needed; they follow torchvision's PIL code paths):

- train: ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))``, its box drawn by
  :func:`~structlin_lab.data.augment.sample_crop_box` (torchvision's sampling: 10 tries, then
  the central fallback), then a horizontal flip with probability 0.5.
- val: resize the shorter side to ``int(S / 0.875)`` (256 for 224), then a ``S x S`` centre crop.

Both resize with bicubic interpolation, as the timm recipe of the paper's ViT experiments does
(evaluation: bicubic resize to 256, centre crop 224).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from .augment import derive_seed, sample_crop_box

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
_HFLIP_P = 0.5


def _require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("ImageFolder needs Pillow: pip install 'structlin[data]'") from e
    return Image


# --- the folder index ----------------------------------------------------------------------------


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


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(
            f"image-folder root {root} does not exist or is not a folder; expected "
            f"{root}/{{train,val}}/<class>/*.JPEG (see structlin_lab.data.imagenet's docs)"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"split folder {split_dir} does not exist; expected {split_dir}/<class>/*.JPEG "
            "(for ILSVRC2012 val, sort the flat val images into <wnid>/ folders first)"
        )
    return split_dir


def _checked_classes(root: Path, split: str) -> list[str]:
    """The class folders of ``root/split``, which must equal the other split's (if present)."""
    classes = _list_classes(root / split)
    if not classes:
        raise ValueError(f"{root / split} has no class folders; expected {root / split}/<class>/")
    other = root / _SPLITS[1 - _SPLITS.index(split)]
    if other.is_dir():
        by_split = {split: classes, other.name: _list_classes(other)}
        if by_split["train"] != by_split["val"]:
            raise ValueError(
                f"class folders differ between {root / 'train'} ({len(by_split['train'])}) and "
                f"{root / 'val'} ({len(by_split['val'])}), so labels would not agree: "
                + _diff_message(by_split["train"], by_split["val"], "train", "val")
            )
    return classes


def _image_names(class_dir: Path) -> list[bytes]:
    names = sorted(
        e.name
        for e in os.scandir(class_dir)
        if not e.name.startswith(".")
        and os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES
        and e.is_file()
    )
    if not names:
        raise ValueError(f"class folder {class_dir} holds no images (*.JPEG, *.jpg, *.jpeg, *.png)")
    return [os.fsencode(n) for n in names]


def _pack_names(names: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 buffer of all names and the ``(n + 1,)`` int64 offsets that slice it.

    A numpy buffer rather than a list of Python strings, so forked workers do not gradually copy
    the list: reference counting writes to every object's page, and with 1.28M paths that costs
    each worker hundreds of MB.
    """
    lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.frombuffer(b"".join(names), dtype=np.uint8), offsets


# --- transforms ----------------------------------------------------------------------------------


def _eval_crop(img: Any, size: int) -> Any:
    """Resize the shorter side to ``int(size / 0.875)``, then centre-crop ``size x size``.

    Same arithmetic as torchvision's ``Resize(int)`` (the longer side becomes
    ``int(short_new * long / short)``, truncated) and ``CenterCrop`` (offsets rounded half to even).
    """
    short_new = int(size / _VAL_CROP_PCT)
    height, width = img.height, img.width
    if height <= width:
        h, w = short_new, int(short_new * width / height)
    else:
        h, w = int(short_new * height / width), short_new
    img = img.resize((w, h), _require_pillow().Resampling.BICUBIC)
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def _train_crop(img: Any, size: int, generator: torch.Generator) -> Any:
    """Random resized crop to ``size x size``, then a horizontal flip with probability 0.5."""
    image = _require_pillow()
    top, left, h, w = sample_crop_box(img.height, img.width, generator=generator)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), image.Resampling.BICUBIC)
    if torch.rand(1, generator=generator).item() < _HFLIP_P:
        img = img.transpose(image.Transpose.FLIP_LEFT_RIGHT)
    return img


class ImageFolder(Dataset):
    """One split of an ImageNet-style image folder, yielding ``(uint8 (3, S, S) tensor, label)``.

    See the module docstring for the expected layout, how to prepare ILSVRC2012 and the exact
    transforms. Images are decoded with Pillow and converted to RGB (greyscale and CMYK JPEGs, which
    ILSVRC2012 contains, included). Samples are ordered by class, then file name.

    Randomness (train mode): each process keeps its own CPU ``torch.Generator``, created lazily on
    the first sample it loads. In a DataLoader worker it is seeded from ``(seed, worker seed)``,
    where the worker seed (``torch.initial_seed()`` there) derives from the DataLoader's
    ``generator``; in the main process (``num_workers=0`` or direct indexing) from ``seed`` alone.
    So a run is reproducible given the seeds, the batch size and the number of workers (the
    DataLoader hands batch ``k`` of every epoch to worker ``k mod num_workers``). Assigning a new
    ``seed`` reseeds the generator on its next use in that process (workers hold their own copy).

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        image_size: output side ``S``.
        train: random-resized-crop + flip if true, resize + centre crop if false; default
            ``split == "train"``.
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
        seed: int = 0,
    ) -> None:
        _require_pillow()
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = image_size
        self.train = split == "train" if train is None else train
        self.seed = seed
        split_dir = _split_dir(self.root, split)
        self.classes = _checked_classes(self.root, split)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        per_class = [_image_names(split_dir / c) for c in self.classes]
        self._names, self._offsets = _pack_names([n for names in per_class for n in names])
        counts = [len(names) for names in per_class]
        self.targets = np.repeat(np.arange(len(self.classes), dtype=np.int64), counts)
        self._rng: torch.Generator | None = None
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

    def __getstate__(self) -> dict[str, Any]:
        # A generator created in the parent must not be inherited by workers (they would all
        # replay the same stream); each process builds its own.
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_key"] = None
        return state

    def _generator(self) -> torch.Generator:
        info = get_worker_info()
        # The pid catches forked copies that inherited a generator without being pickled.
        key = (os.getpid(), self.seed, None if info is None else (info.id, info.seed))
        if self._rng is None or self._rng_key != key:
            parts = [self.seed] if info is None else [self.seed, info.seed]
            self._rng = torch.Generator().manual_seed(derive_seed(*parts))
            self._rng_key = key
        return self._rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        with _require_pillow().open(self.path(index)) as f:
            img = f.convert("RGB")
        if self.train:
            img = _train_crop(img, self.image_size, self._generator())
        else:
            img = _eval_crop(img, self.image_size)
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
        from epoch 0, but not across a resume. Rank enters the seeds (the shuffle is shared
        through the sampler), so that ranks do not apply identical crop sequences.
        """
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(derive_seed(self._loader_seed, self._rank, epoch))
        if isinstance(self.dataset, ImageFolder):
            self.dataset.seed = derive_seed(self._loader_seed, self._rank, epoch, 1)


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
) -> ImageNetLoader:
    """A DataLoader of ``(uint8 (B, 3, S, S), int64 (B,))`` batches over one split of ``root``.

    Train mode (random-resized-crop + flip, shuffled) for ``split="train"``, eval mode (resize +
    centre crop, in order) for ``"val"``; see the module docstring for layout and transforms. Call
    ``set_epoch(epoch)`` before every epoch (needed under DDP, see :meth:`ImageNetLoader.set_epoch`)
    and finish the batches on the device with
    :class:`~structlin_lab.data.stream.StreamingImageBatches`.

    With ``world_size > 1`` each rank reads a disjoint shard through a ``DistributedSampler``
    (shuffled with ``seed`` and the epoch for train; in order for val). For val with
    ``drop_last=False`` it pads the shards to equal length by repeating up to ``world_size - 1``
    samples, which sharded val metrics count twice; evaluate on one rank where that matters.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        batch_size: samples per batch on this rank.
        image_size: output side ``S``.
        num_workers: decoding processes (kept alive across epochs when > 0); 0 decodes in the
            calling process. Pinned memory is used when CUDA is available.
        seed: seeds the shuffle (through a dedicated ``torch.Generator``, and the
            DistributedSampler's ``seed``), the workers' seeds and the augmentation generator.
        rank, world_size: this process's shard for DDP.
        drop_last: drop the incomplete last batch; default true for train, false for val.
    """
    _check_loader_args(split, batch_size, num_workers, rank, world_size)
    train = split == "train"
    drop_last = train if drop_last is None else drop_last
    dataset = ImageFolder(root, split, image_size=image_size, train=train)
    sampler = _shard_sampler(dataset, rank, world_size, train=train, seed=seed, drop_last=drop_last)
    loader = ImageNetLoader(
        dataset,
        seed=seed,
        rank=rank,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=torch.Generator(),
        persistent_workers=num_workers > 0,
    )
    loader.set_epoch(0)  # seeds the shuffle and the augmentations
    return loader


def _shard_sampler(
    dataset: ImageFolder, rank: int, world_size: int, *, train: bool, seed: int, drop_last: bool
) -> DistributedSampler | None:
    """This rank's ``DistributedSampler`` (shuffled in train mode), or None for one process."""
    if world_size == 1:
        return None
    return DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=train,
        seed=seed,
        drop_last=drop_last,
    )


def _check_loader_args(
    split: str, batch_size: int, num_workers: int, rank: int, world_size: int
) -> None:
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
