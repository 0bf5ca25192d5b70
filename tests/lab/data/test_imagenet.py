"""Tests for ``structlin_lab.data.imagenet`` on tiny fake image folders built in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from structlin_lab.data import ImageFolder, imagenet_loader
from structlin_lab.data.augment import derive_seed, sample_crop_boxes

Image = pytest.importorskip("PIL.Image", reason="image-folder tests need Pillow (structlin[data])")

S = 16
# Created in unsorted order: labels must follow sorted folder names.
CLASSES = ["n02", "n01", "n03"]
# (name, width, height): odd sizes, both orientations, every accepted extension.
FILES = [("a.png", 40, 30), ("b.JPEG", 17, 50), ("c.jpg", 33, 33), ("d.jpeg", 64, 21)]


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _noise(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in CLASSES:
            for name, w, h in FILES:
                _save(root / split / c / name, _noise(rng, w, h))
            # Ignored: other extensions and hidden files.
            (root / split / c / "notes.txt").write_text("not an image")
            _save(root / split / c / ".hidden.png", _noise(rng, 8, 8))
    # A hidden folder is not a class.
    (root / "train" / ".cache").mkdir()
    return root


def _batches(loader, epochs: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def _same(a, b) -> bool:
    if len(a) != len(b):
        return False
    pairs = zip(a, b, strict=True)
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def test_classes_lengths_and_order(root: Path) -> None:
    for split in ("train", "val"):
        ds = ImageFolder(root, split, image_size=S)
        assert ds.classes == ["n01", "n02", "n03"]
        assert ds.class_to_idx == {"n01": 0, "n02": 1, "n03": 2}
        assert len(ds) == 12
        assert ds.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert [ds.path(i).name for i in range(4)] == [f[0] for f in FILES]
        assert ds.path(5) == root / split / "n02" / "b.JPEG"
    assert ImageFolder(root, "train").train and not ImageFolder(root, "val").train


@pytest.mark.parametrize("split", ["train", "val"])
def test_shapes_and_dtypes(root: Path, split: str) -> None:
    ds = ImageFolder(root, split, image_size=S)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, S, S) and x.dtype == torch.uint8 and x.is_contiguous()
        assert isinstance(y, int) and y == ds.targets[i]
    loader = imagenet_loader(root, split, batch_size=5, image_size=S, num_workers=0)
    batches = list(loader)
    # Train drops the incomplete last batch by default; val keeps it.
    assert [len(y) for _, y in batches] == ([5, 5] if split == "train" else [5, 5, 2])
    x, y = batches[0]
    assert x.shape == (5, 3, S, S) and x.dtype == torch.uint8 and y.dtype == torch.int64
    if split == "val":
        assert torch.cat([y for _, y in batches]).tolist() == ds.targets.tolist()


def test_val_transform_hand_computed(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:50, 0:64]
    grad = np.stack([xx * 3, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    _save(tmp_path / "val" / "c" / "a_const.png", np.full((30, 40, 3), (200, 17, 90), np.uint8))
    _save(tmp_path / "val" / "c" / "b_wide.png", grad[:30, :40])
    _save(tmp_path / "val" / "c" / "c_tall.png", grad[:50, :17])
    # Shorter side already int(16 / 0.875) = 18, so no resize: only the crop offsets matter, and
    # left = round((47 - 16) / 2) = round(15.5) = 16 (half to even, as torchvision).
    _save(tmp_path / "val" / "c" / "d_exact.png", grad[:18, :47])
    _save(tmp_path / "val" / "c" / "e_grey.png", grad[:18, :47, 0])  # mode "L" -> RGB
    ds = ImageFolder(tmp_path, "val", image_size=S)
    out = [ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]
    assert all(np.array_equal(a, ds[i][0].permute(1, 2, 0).numpy()) for i, a in enumerate(out))

    assert (out[0] == np.array([200, 17, 90], np.uint8)).all()
    bicubic = Image.Resampling.BICUBIC
    # 40x30: short side 30 -> 18, long 40 -> int(18 * 40 / 30) = 24; crop at (1, 4).
    wide = np.asarray(Image.fromarray(grad[:30, :40]).resize((24, 18), bicubic))
    np.testing.assert_array_equal(out[1], wide[1:17, 4:20])
    # 17x50: short 17 -> 18, long 50 -> int(18 * 50 / 17) = int(52.94) = 52; crop at (18, 1).
    tall = np.asarray(Image.fromarray(grad[:50, :17]).resize((18, 52), bicubic))
    np.testing.assert_array_equal(out[2], tall[18:34, 1:17])
    np.testing.assert_array_equal(out[3], grad[1:17, 16:32])
    np.testing.assert_array_equal(out[4], np.repeat(grad[1:17, 16:32, :1], 3, axis=-1))


def test_train_transform_matches_replayed_generator(root: Path) -> None:
    ds = ImageFolder(root, "train", image_size=S, seed=123)
    got = [ds[i][0] for i in range(6)]
    # The main process's generator is seeded from the dataset seed alone; per sample it draws the
    # box (the loader's sampler) and then the flip.
    g = torch.Generator().manual_seed(derive_seed(123))
    flips = []
    for i in range(6):
        img = Image.open(ds.path(i)).convert("RGB")
        top, left, h, w = sample_crop_boxes(1, img.height, img.width, generator=g)[0].tolist()
        img = img.crop((left, top, left + w, top + h)).resize((S, S), Image.Resampling.BICUBIC)
        flips.append(torch.rand(1, generator=g).item() < 0.5)
        if flips[-1]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        np.testing.assert_array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(img))
    assert any(flips) and not all(flips)  # both branches were checked
    # The stream moves on: the same sample gets a new crop next time.
    assert not torch.equal(ds[0][0], got[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_reproducible_and_varies(root: Path, num_workers: int) -> None:
    def run(seed: int):
        loader = imagenet_loader(
            root, "train", batch_size=4, image_size=S, num_workers=num_workers, seed=seed
        )
        return _batches(loader)

    a, b, c = run(0), run(0), run(1)
    assert _same(a[0], b[0]) and _same(a[1], b[1])
    assert not _same(a[0], a[1])
    assert not _same(a[0], c[0])
    # Each epoch is a permutation of all samples (12 = 3 full batches).
    assert sorted(torch.cat([y for _, y in a[1]]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_set_epoch_keys_epoch_in_process(root: Path) -> None:
    # With num_workers=0 an epoch depends only on (seed, rank, epoch): a resumed run matches.
    full = _batches(imagenet_loader(root, "train", batch_size=4, image_size=S, num_workers=0))
    resumed = imagenet_loader(root, "train", batch_size=4, image_size=S, num_workers=0)
    resumed.set_epoch(1)
    assert _same(full[1], [(x, y) for x, y in resumed])


def test_distributed_shards(root: Path) -> None:
    loaders = [
        imagenet_loader(
            root, "train", batch_size=2, image_size=S, num_workers=0, rank=r, world_size=2
        )
        for r in range(2)
    ]
    assert all(isinstance(ld.sampler, DistributedSampler) for ld in loaders)
    for epoch in range(2):
        shards = []
        for ld in loaders:
            ld.set_epoch(epoch)
            shards.append(list(ld.sampler))
            labels = torch.cat([y for _, y in ld]).tolist()
            assert labels == [int(ld.dataset.targets[i]) for i in shards[-1]]
        assert set(shards[0]).isdisjoint(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(12))
        if epoch == 0:
            first = shards[0]
    assert shards[0] != first  # reshuffled by set_epoch

    val = [
        imagenet_loader(root, "val", batch_size=4, num_workers=0, rank=r, world_size=2)
        for r in range(2)
    ]
    assert [list(ld.sampler) for ld in val] == [list(range(0, 12, 2)), list(range(1, 12, 2))]


def test_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", "train")
    with pytest.raises(FileNotFoundError, match="split folder"):
        ImageFolder(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        ImageFolder(root, "test")

    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path, "train")

    _save(tmp_path / "train" / "n01" / "a.png", np.zeros((5, 5, 3), np.uint8))
    (tmp_path / "train" / "n02").mkdir()
    (tmp_path / "train" / "n02" / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"n02 holds no images"):
        ImageFolder(tmp_path, "train")

    _save(tmp_path / "train" / "n02" / "a.png", np.zeros((5, 5, 3), np.uint8))
    _save(tmp_path / "val" / "n01" / "a.png", np.zeros((5, 5, 3), np.uint8))
    _save(tmp_path / "val" / "n09" / "a.png", np.zeros((5, 5, 3), np.uint8))
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=r"differ.*only in train: n02.*only in val: n09"):
            ImageFolder(tmp_path, split)

    with pytest.raises(ValueError, match="rank"):
        imagenet_loader(root, "train", batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        imagenet_loader(root, "train", batch_size=0)
    with pytest.raises(IndexError):
        ImageFolder(root, "val", image_size=S)[12]
