"""Tests for the on-device image loaders: ``TensorImageLoader`` (batches, sharding, resume, eval)
and ``StreamingImageBatches``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from structlin_lab.data import ImageBatch, StreamingImageBatches, TensorImageLoader
from structlin_lab.data.augment import (
    mixup,
    normalize,
    resized_crop,
    sample_crop_boxes,
    smooth_one_hot,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
K = 10


def _data(n: int = 50, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, K, size=n).astype(np.int64)
    return images, labels


def _loader(images: np.ndarray, labels: np.ndarray, **kw: Any) -> TensorImageLoader:
    kw.setdefault("batch_size", 8)
    return TensorImageLoader(images, labels, num_classes=K, mean=MEAN, std=STD, **kw)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return x * std + mean


def _assert_same(a: list[ImageBatch], b: list[ImageBatch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        for name in ("x", "targets", "labels", "y_a", "y_b", "lam", "indices"):
            assert torch.equal(getattr(p, name), getattr(q, name)), name


def test_train_batches_shapes_dtypes_and_targets() -> None:
    images, labels = _data()
    loader = _loader(images, labels)
    assert len(loader) == 50 // 8
    # Stored once, as uint8 NCHW on the device.
    assert loader._images.dtype == torch.uint8 and loader._images.shape == (50, 3, 8, 8)
    assert torch.equal(loader._images, torch.from_numpy(images).permute(0, 3, 1, 2))
    batches = list(loader)
    assert len(batches) == 6
    for b in batches:
        assert b.x.shape == (8, 3, 8, 8) and b.x.dtype == torch.float32
        assert b.targets.shape == (8, K) and b.targets.dtype == torch.float32
        assert b.labels.dtype == torch.int64 and torch.equal(b.y_a, b.labels)
        assert torch.equal(b.labels, torch.from_numpy(labels)[b.indices])
        assert b.lam.ndim == 0 and 0 <= b.lam.item() <= 1
        # Smoothed (0.3) one-hots mixed with the batch's lambda.
        ref = b.lam * smooth_one_hot(b.y_a, K, 0.3) + (1 - b.lam) * smooth_one_hot(b.y_b, K, 0.3)
        torch.testing.assert_close(b.targets, ref)
        # y_b is a permutation of the batch's own labels.
        assert sorted(b.y_b.tolist()) == sorted(b.labels.tolist())
        # Crop + flip + mixup are convex combinations of pixels, so values stay in 0..255.
        raw = _unnormalize(b.x)
        assert raw.min() > -1e-3 and raw.max() < 255 + 1e-3
    seen = torch.cat([b.indices for b in batches])
    assert len(set(seen.tolist())) == 48  # no sample twice in an epoch
    # Augmentation is really applied: inputs differ from the stored images.
    first = batches[0]
    stored = torch.from_numpy(images).permute(0, 3, 1, 2).float()[first.indices]
    assert not torch.allclose(_unnormalize(first.x), stored, atol=1e-2)


def test_epochs_reshuffle_and_drop_last_false_covers_everything() -> None:
    images, labels = _data()
    loader = _loader(images, labels, augment=False, mixup_alpha=0.0)
    e0 = torch.cat([b.indices for b in loader])
    e1 = torch.cat([b.indices for b in loader])
    assert loader.epoch == 2 and not torch.equal(e0, e1)
    full = _loader(images, labels, drop_last=False)
    assert len(full) == 7
    sizes = [len(b.indices) for b in full]
    assert sizes == [8] * 6 + [2]
    assert sorted(torch.cat([b.indices for b in full]).tolist()) == list(range(50))


def test_no_mixup_no_augment_gives_exact_normalised_images() -> None:
    images, labels = _data()
    loader = _loader(images, labels, augment=False, mixup_alpha=0.0, label_smoothing=0.1)
    b = next(iter(loader))
    assert b.lam.item() == 1.0 and torch.equal(b.y_b, b.labels)
    torch.testing.assert_close(b.targets, smooth_one_hot(b.labels, K, 0.1))
    stored = torch.from_numpy(images).permute(0, 3, 1, 2).float()[b.indices]
    torch.testing.assert_close(_unnormalize(b.x), stored, atol=1e-3, rtol=0)


def test_eval_mode_is_plain_ordered_and_keeps_partial_batch() -> None:
    images, labels = _data()
    loader = _loader(images, labels, train=False)
    assert len(loader) == 7
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [8] * 6 + [2]
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(50))
    for b in batches:
        assert b.lam.item() == 1.0 and torch.equal(b.y_b, b.labels)
        assert torch.equal(b.targets, torch.nn.functional.one_hot(b.labels, K).float())
        stored = torch.from_numpy(images).permute(0, 3, 1, 2).float()[b.indices]
        torch.testing.assert_close(_unnormalize(b.x), stored, atol=1e-3, rtol=0)
    # A second pass is identical (no shuffling, no randomness).
    _assert_same(batches, list(loader))


def test_deterministic_given_seed() -> None:
    images, labels = _data()
    a = _loader(images, labels, seed=3)
    b = _loader(images, labels, seed=3)
    _assert_same([*a, *a], [*b, *b])
    c = _loader(images, labels, seed=4)
    assert not torch.equal(
        next(iter(c)).indices, next(iter(_loader(images, labels, seed=3))).indices
    )


@pytest.mark.parametrize(
    ("train", "drop_last", "n", "world"),
    [(True, True, 50, 2), (True, False, 49, 3), (False, True, 50, 2), (False, True, 49, 3)],
)
def test_sharding_ranks_are_disjoint_and_union_is_global_batch(
    train: bool, drop_last: bool, n: int, world: int
) -> None:
    images, labels = _data(n)
    kw = {"train": train, "drop_last": drop_last, "seed": 1}
    single = _loader(images, labels, batch_size=4 * world, **kw)
    ranks = [
        _loader(images, labels, batch_size=4, rank=r, world_size=world, **kw) for r in range(world)
    ]
    # Every rank yields the same number of steps, or DDP collectives would hang.
    assert {len(r) for r in ranks} == {len(single)}
    per_rank = [[b.indices for b in r] for r in ranks]
    for step, ref in enumerate(single):
        parts = [p[step] for p in per_rank]
        assert torch.equal(torch.cat(parts), ref.indices)
        if len(ref.indices) == 4 * world:
            assert all(len(p) == 4 for p in parts)
    everything = torch.cat([i for p in per_rank for i in p]).tolist()
    assert len(everything) == len(set(everything))  # disjoint across ranks and steps
    if not (train and drop_last):
        assert sorted(everything) == list(range(n))
        # 49 = 12 * 4 + 1 samples over 3 ranks: the last step is [1, 0, 0] samples (an empty batch
        # keeps the step count equal); 50 = 6 * 8 + 2 over 2 ranks gives [1, 1].
        assert [len(p[-1]) for p in per_rank] == ([1, 0, 0] if n == 49 else [1, 1])


def test_sharded_ranks_draw_different_augmentations() -> None:
    images, labels = _data()
    r0, r1 = (_loader(images, labels, batch_size=4, rank=r, world_size=2) for r in range(2))
    assert not torch.equal(next(iter(r0)).lam, next(iter(r1)).lam)


def test_too_small_for_a_global_batch_is_a_clear_error() -> None:
    images, labels = _data(10)
    with pytest.raises(ValueError, match=r"fewer than one global batch.*4 \* 3 = 12"):
        _loader(images, labels, batch_size=4, world_size=3)
    # Without drop_last (and in eval) a single partial batch is fine.
    assert len(_loader(images, labels, batch_size=4, world_size=3, drop_last=False)) == 1
    assert len(_loader(images, labels, batch_size=64, train=False)) == 1


@pytest.mark.parametrize("stop_after", [3, 6, 9])  # mid-epoch, epoch boundary, into epoch 1
def test_resume_reproduces_remaining_batches_bit_for_bit(stop_after: int) -> None:
    images, labels = _data()
    ref_loader = _loader(images, labels, seed=5)
    uninterrupted = [b for _ in range(3) for b in ref_loader]  # 3 epochs of 6 batches

    run = _loader(images, labels, seed=5)
    done: list[ImageBatch] = []
    it = iter(run)
    while len(done) < stop_after:
        try:
            done.append(next(it))
        except StopIteration:
            it = iter(run)
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)

    resumed = _loader(images, labels, seed=5)
    resumed.load_state_dict(state)
    rest: list[ImageBatch] = []
    while len(done) + len(rest) < len(uninterrupted):
        rest.extend(resumed)
    _assert_same(done + rest, uninterrupted)


def test_load_state_dict_rejects_other_configuration_and_stale_iterators() -> None:
    images, labels = _data()
    loader = _loader(images, labels)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        _loader(images, labels, batch_size=4).load_state_dict(state)
    old = iter(loader)
    next(old)
    new = iter(loader)
    with pytest.raises(RuntimeError, match="stale"):
        next(old)
    assert next(new).indices.shape == (8,)


def test_accepts_tensors_and_validates_inputs() -> None:
    images, labels = _data()
    from_np = next(iter(_loader(images, labels)))
    from_t = next(iter(_loader(torch.from_numpy(images), torch.from_numpy(labels))))
    _assert_same([from_np], [from_t])
    with pytest.raises(ValueError, match="uint8"):
        _loader(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="labels must lie"):
        _loader(images, labels + K)
    with pytest.raises(ValueError, match="rank"):
        _loader(images, labels, rank=2, world_size=2)


def test_set_epoch_matches_running_the_earlier_epochs() -> None:
    # Each epoch's order and augmentations depend only on (seed, epoch, rank), so jumping to an
    # epoch (e.g. resuming from an epoch-level checkpoint without loader state) reproduces it.
    images, labels = _data()
    ran = _loader(images, labels, seed=2)
    list(ran)
    epoch1 = list(ran)
    jumped = _loader(images, labels, seed=2)
    jumped.set_epoch(1)
    _assert_same(list(jumped), epoch1)


def test_train_batch_equals_crop_then_flip_then_mixup_then_normalise() -> None:
    # The loader folds the flip into the crop's grid and normalises after mixing; it must still
    # equal crop -> flip -> mixup -> normalise done step by step from the same generator stream.
    images, labels = _data()
    loader = _loader(images, labels, seed=7)
    g = torch.Generator()
    g.set_state(loader.state_dict()["aug_generator"])
    b = next(iter(loader))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)[b.indices]
    y = torch.from_numpy(labels)[b.indices]
    boxes = sample_crop_boxes(8, 8, 8, generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    x = resized_crop(x, boxes)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x, t, perm, lam = mixup(x, smooth_one_hot(y, K, 0.3), 0.8, generator=g)
    x = normalize(x, [m * 255 for m in MEAN], [s * 255 for s in STD])
    assert torch.equal(lam, b.lam) and torch.equal(y[perm], b.y_b)
    torch.testing.assert_close(b.x, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.targets, t)


# --- StreamingImageBatches (the ImageNet path's device-side half) ---------------------------------


class _FakeDataLoader:
    """Fixed uint8 batches, like imagenet_loader's, recording set_epoch calls."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def _stream(train: bool, **kw: Any) -> StreamingImageBatches:
    images, labels = _data(24)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels)
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]
    mean, std = [m * 255 for m in MEAN], [s * 255 for s in STD]
    return StreamingImageBatches(
        _FakeDataLoader(batches), device="cpu", num_classes=K, mean=mean, std=std, train=train, **kw
    )


def test_streaming_eval_batches_are_normalised_with_one_hot_targets() -> None:
    stream = _stream(train=False, mixup_alpha=0.8, label_smoothing=0.3)  # ignored in eval
    out = list(stream)
    assert len(out) == len(stream) == 4 and stream.loader.epochs == [0]
    for b, (x, y) in zip(out, stream.loader.batches, strict=True):
        torch.testing.assert_close(_unnormalize(b.x), x.float(), atol=1e-3, rtol=0)
        assert torch.equal(b.labels, y) and torch.equal(b.y_b, y) and b.lam.item() == 1.0
        assert torch.equal(b.targets, torch.nn.functional.one_hot(y, K).float())
        assert b.indices.numel() == 0


def test_streaming_train_mixes_and_resumes_mid_epoch() -> None:
    ref = _stream(train=True, mixup_alpha=0.8, label_smoothing=0.3, seed=4)
    uninterrupted = [*ref, *ref]  # two epochs
    assert ref.loader.epochs == [0, 1]
    for b in uninterrupted:
        assert 0 < b.lam.item() < 1 and sorted(b.y_b.tolist()) == sorted(b.labels.tolist())
        mixed = b.lam * smooth_one_hot(b.y_a, K, 0.3) + (1 - b.lam) * smooth_one_hot(b.y_b, K, 0.3)
        torch.testing.assert_close(b.targets, mixed)
    assert len({b.lam.item() for b in uninterrupted}) == 8  # a fresh lambda per batch

    run = _stream(train=True, mixup_alpha=0.8, label_smoothing=0.3, seed=4)
    it = iter(run)
    done = [next(it), next(it), next(it)]
    resumed = _stream(train=True, mixup_alpha=0.8, label_smoothing=0.3, seed=4)
    resumed.load_state_dict(run.state_dict())
    rest = [*resumed, *resumed]
    # The fake loader repeats its batches exactly, so the resumed run is bit-identical.
    _assert_same(done + rest, uninterrupted)
