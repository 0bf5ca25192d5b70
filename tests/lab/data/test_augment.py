"""Tests for ``structlin_lab.data.augment``: seeds, crop boxes, resampling, flips, mixup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from structlin_lab.data.augment import (
    derive_seed,
    mixup,
    normalize,
    random_resized_crop,
    resized_crop,
    sample_beta,
    sample_crop_box,
    sample_crop_boxes,
    sample_mixup,
    smooth_one_hot,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clone(g: torch.Generator) -> torch.Generator:
    twin = torch.Generator(device=g.device)
    twin.set_state(g.get_state())
    return twin


def _images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=_gen(seed))


# --- seeds ---------------------------------------------------------------------------------------


def test_derive_seed_is_deterministic_distinct_and_fits_both_generators() -> None:
    seeds = {
        derive_seed(s, stream, e, r)
        for s in (0, 1)
        for stream in (0, 1)
        for e in range(4)
        for r in range(4)
    }
    assert len(seeds) == 64  # nearby tuples give different seeds
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2) != derive_seed(3, 2, 1)
    assert all(0 <= s < 2**64 for s in seeds) and max(seeds) >= 2**63  # full 64-bit range used
    big = max(seeds)
    assert torch.Generator().manual_seed(big).initial_seed() == big
    assert derive_seed(big, 2**40) != derive_seed(big, 2**40 + 1)  # large parts are fine


# --- crop boxes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 40), (7, 5)])
def test_crop_boxes_stay_inside_image(h: int, w: int) -> None:
    boxes = sample_crop_boxes(4000, h, w, generator=_gen())
    assert boxes.shape == (4000, 4) and boxes.dtype == torch.int64
    top, left, bh, bw = boxes.unbind(1)
    assert (bh >= 1).all() and (bw >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()


def test_crop_boxes_respect_scale_and_ratio_bounds() -> None:
    # A large image makes rounding to whole pixels negligible, so the bounds can be checked tightly.
    size, scale, ratio = 1000, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(20000, size, size, scale=scale, ratio=ratio, generator=_gen(1))
    _, _, h, w = boxes.double().unbind(1)
    area = h * w / size**2
    aspect = w / h
    # Sides are >= 244 px, so rounding each to whole pixels moves it by < 0.21%.
    tol = 5e-3
    assert area.min() >= scale[0] * (1 - tol) and area.max() <= scale[1]
    assert aspect.min() >= ratio[0] * (1 - tol) and aspect.max() <= ratio[1] * (1 + tol)
    # ... and actually spans them, rather than collapsing to a constant box.
    assert area.min() < 0.09 and area.max() > 0.95
    assert aspect.min() < 0.76 and aspect.max() > 1.32
    # log-uniform aspect ratio: log(w / h) is symmetric around 0 for symmetric bounds.
    assert abs(torch.log(aspect).mean().item()) < 0.01


def test_crop_boxes_small_image_bounds_up_to_rounding() -> None:
    # On 32x32 each side is rounded to whole pixels; some real (w, h) within half a pixel of the
    # box must satisfy the bounds.
    boxes = sample_crop_boxes(4000, 32, 32, generator=_gen(2))
    _, _, h, w = boxes.double().unbind(1)
    area_hi = (w + 0.5) * (h + 0.5) / 1024
    area_lo = (w - 0.5) * (h - 0.5) / 1024
    assert (area_hi >= 0.08).all() and (area_lo <= 1.0).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()


def test_crop_boxes_fallback_is_torchvision_center_crop() -> None:
    # scale > 1 never fits, so every sample takes the fallback.
    square = sample_crop_boxes(5, 32, 32, scale=(2.0, 3.0), generator=_gen())
    assert torch.equal(square, torch.tensor([[0, 0, 32, 32]] * 5))
    # Too wide for the ratio bounds: full height, width clipped to the max ratio, centred.
    wide = sample_crop_boxes(3, 10, 40, scale=(2.0, 3.0), generator=_gen())
    w = round(10 * 4 / 3)
    assert torch.equal(wide, torch.tensor([[0, (40 - w) // 2, 10, w]] * 3))
    tall = sample_crop_boxes(3, 40, 10, scale=(2.0, 3.0), generator=_gen())
    h = round(10 / (3 / 4))
    assert torch.equal(tall, torch.tensor([[(40 - h) // 2, 0, h, 10]] * 3))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_crop_box_in_bounds_for_any_image_size(h: int, w: int, seed: int) -> None:
    # Includes the sizes ImageFolder meets: tiny, very wide and very tall images.
    top, left, ch, cw = sample_crop_boxes(1, h, w, generator=_gen(seed))[0].tolist()
    assert 1 <= ch <= h and 1 <= cw <= w
    assert 0 <= top <= h - ch and 0 <= left <= w - cw


def test_crop_boxes_reject_bad_bounds() -> None:
    with pytest.raises(ValueError, match="scale"):
        sample_crop_boxes(2, 8, 8, scale=(0.5, 0.1), generator=_gen())


# --- resampling -----------------------------------------------------------------------------------


def test_resized_crop_full_box_is_identity_and_integer_box_is_a_slice() -> None:
    x = _images(4)
    full = torch.tensor([[0, 0, 32, 32]] * 4)
    out = resized_crop(x, full)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, x.float(), atol=1e-3, rtol=0)
    # Same-size output of a sub-box samples exactly its pixel centres.
    box = torch.tensor([[8, 4, 16, 20]] * 4)
    out = resized_crop(x, box, out_size=(16, 20))
    torch.testing.assert_close(out, x[:, :, 8:24, 4:24].float(), atol=1e-3, rtol=0)


def test_resized_crop_upsampling_matches_interpolate_inside_the_box() -> None:
    x = _images(3).float()
    box = torch.tensor([[0, 0, 16, 12]] * 3)
    out = resized_crop(x, box, out_size=(32, 32))
    ref = F.interpolate(x[:, :, :16, :12], size=(32, 32), mode="bilinear", align_corners=False)
    # At the image border both repeat the edge pixel; only the last row/column, which reads half a
    # pixel past the box's inner edges into the real image, may differ (documented behaviour).
    torch.testing.assert_close(out[:, :, :31, :31], ref[:, :, :31, :31], atol=1e-3, rtol=0)
    assert not torch.allclose(out[:, :, 31], ref[:, :, 31], atol=1e-3)


def test_resized_crop_folded_flip_equals_flipping_after() -> None:
    x = _images(6)
    boxes = sample_crop_boxes(6, 32, 32, generator=_gen(3))
    flip = torch.tensor([True, False, True, True, False, False])
    out = resized_crop(x, boxes, flip=flip)
    plain = resized_crop(x, boxes)
    ref = torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


def test_random_resized_crop_shapes_range_and_determinism() -> None:
    x = _images(16)
    out = random_resized_crop(x, out_size=(24, 28), generator=_gen(5))
    assert out.shape == (16, 3, 24, 28) and out.dtype == torch.float32
    # Bilinear interpolation is a convex combination of input pixels.
    assert out.min() >= 0 and out.max() <= 255
    again = random_resized_crop(x, out_size=(24, 28), generator=_gen(5))
    assert torch.equal(out, again)
    other = random_resized_crop(x, out_size=(24, 28), generator=_gen(6))
    assert not torch.equal(out, other)
    # uint8 and float inputs give the same result.
    as_float = random_resized_crop(x.float(), out_size=(24, 28), generator=_gen(5))
    assert torch.equal(out, as_float)


def test_random_resized_crop_is_boxes_then_flips_from_one_stream() -> None:
    x = _images(200, h=6, w=9)
    g = _gen(7)
    replay = _clone(g)
    boxes = sample_crop_boxes(200, 6, 9, generator=replay)
    expected_flip = torch.rand(200, generator=replay) < 0.5
    out = random_resized_crop(x, generator=g)
    plain = resized_crop(x, boxes)
    flipped = torch.isclose(out, plain.flip(-1), atol=1e-3).flatten(1).all(1)
    kept = torch.isclose(out, plain, atol=1e-3).flatten(1).all(1)
    # A sample whose crop is left-right symmetric would count as both; random pixels never are.
    assert torch.equal(flipped, expected_flip) and torch.equal(kept, ~expected_flip)
    assert 60 < int(expected_flip.sum()) < 140
    # Both generators are now at the same point of the stream: the call consumed exactly that.
    assert torch.equal(g.get_state(), replay.get_state())
    # hflip_p 0 / 1 never / always mirror, but draw the same randomness.
    never = random_resized_crop(x, hflip_p=0.0, generator=_gen(7))
    always = random_resized_crop(x, hflip_p=1.0, generator=_gen(7))
    torch.testing.assert_close(never, plain, atol=1e-3, rtol=0)
    torch.testing.assert_close(always, plain.flip(-1), atol=1e-3, rtol=0)


# --- mixup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.8, 2.0])
def test_sample_beta_matches_beta_distribution(alpha: float) -> None:
    n = 100_000
    ours = sample_beta(alpha, n, generator=_gen(11)).float()
    assert ours.min() >= 0 and ours.max() <= 1 and torch.isfinite(ours).all()
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(ours.mean().item() - 0.5) < 0.01
    assert abs(ours.var().item() - var) < 0.05 * var
    # Two-sample Kolmogorov-Smirnov distance to torch's own Beta sampler.
    torch.manual_seed(0)
    ref = torch.distributions.Beta(alpha, alpha).sample((n,))
    # Interior points only: rounding to float32 turns some draws near 1 into exactly 1.0.
    grid = torch.linspace(0, 1, 401)[1:-1]
    cdf_ours = torch.searchsorted(ours.sort().values, grid).float() / n
    cdf_ref = torch.searchsorted(ref.sort().values, grid).float() / n
    assert (cdf_ours - cdf_ref).abs().max() < 0.012


def test_sample_beta_reproducible_from_generator_state() -> None:
    g = _gen(4)
    state = g.get_state()
    first = sample_beta(0.8, 5, generator=g)
    g.set_state(state)
    assert torch.equal(sample_beta(0.8, 5, generator=g), first)
    assert not torch.equal(sample_beta(0.8, 5, generator=g), first)
    with pytest.raises(ValueError, match="alpha"):
        sample_beta(0.0, 1, generator=g)


def test_mixup_is_the_convex_combination_with_the_drawn_lambda() -> None:
    x = torch.randn(32, 3, 4, 4, generator=_gen(1))
    y = torch.randint(0, 10, (32,), generator=_gen(2))
    t = smooth_one_hot(y, 10, 0.3)
    g = _gen(9)
    perm, lam = sample_mixup(32, 0.8, generator=_clone(g))
    assert sorted(perm.tolist()) == list(range(32))
    assert lam.ndim == 0 and 0 <= lam.item() <= 1
    mixed_x, mixed_t, perm_out, lam_out = mixup(x, t, 0.8, generator=g)
    assert torch.equal(lam_out, lam) and torch.equal(perm_out, perm)
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(mixed_t, lam * t + (1 - lam) * t[perm])
    torch.testing.assert_close(mixed_t.sum(1), torch.ones(32))
    # Soft CE on mixed targets is the lambda-weighted smoothed CE on both labels (paper's loss).
    logits = torch.randn(32, 10, generator=_gen(3))
    ref = lam * F.cross_entropy(logits, y, label_smoothing=0.3) + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=0.3
    )
    soft_ce = -(mixed_t * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(soft_ce, ref)


# --- targets and normalisation -------------------------------------------------------------------


def test_smooth_one_hot_mass() -> None:
    y = torch.tensor([0, 3, 9, 3])
    t = smooth_one_hot(y, 10, 0.3)
    assert t.shape == (4, 10) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    torch.testing.assert_close(t[torch.arange(4), y], torch.full((4,), 0.7 + 0.03))
    off = t.clone()
    off[torch.arange(4), y] = 0.03
    torch.testing.assert_close(off, torch.full((4, 10), 0.03))
    assert torch.equal(smooth_one_hot(y, 10, 0.0), F.one_hot(y, 10).float())


def test_normalize() -> None:
    x = _images(2, c=3, h=2, w=2)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    out = normalize(x, mean, std)
    ref = (x.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (1.0,), (1.0,))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 600),
    st.integers(1, 600),
    st.integers(0, 2**31),
    st.sampled_from([(0.08, 1.0), (0.5, 0.9), (2.0, 3.0), (1.0, 1.0)]),
)
def test_one_box_equals_the_batched_sampler_and_consumes_the_same_draws(h, w, seed, scale):
    # (2, 3) forces the fallback; tiny images make rounding to 0 and to the edge common.
    a, b = _gen(seed), _gen(seed)
    one = sample_crop_box(h, w, scale=scale, generator=a)
    batched = sample_crop_boxes(1, h, w, scale=scale, generator=b)[0].tolist()
    assert list(one) == batched and all(isinstance(v, int) for v in one)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_one_box_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="scale"):
        sample_crop_box(8, 8, ratio=(2.0, 1.0), generator=_gen())
