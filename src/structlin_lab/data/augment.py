"""Batched image augmentation and mixup for image classification, on the data's device.

The recipe of the paper's image experiments (Qiu et al., ICML 2024), which the CIFAR configs use: a
random resized crop (area 8-100 % of the image, aspect ratio 3/4-4/3) with a random horizontal
flip, mixup with one Beta(alpha, alpha) lambda per batch, and label smoothing.

Everything works on whole batches with tensor ops on the data's device: no per-sample Python and no
host syncs, so the same code runs on CPU and CUDA. All randomness is drawn from an explicit
``torch.Generator`` living on the data's device, so restoring the generator's state reproduces the
same augmentations bit-for-bit (on the same device type and torch build).

Conventions: images are ``(B, C, H, W)``; labels are ``(B,)`` int64; soft targets are ``(B, K)``
float rows that sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "derive_seed",
    "mixup",
    "normalize",
    "random_resized_crop",
    "resized_crop",
    "sample_beta",
    "sample_crop_box",
    "sample_crop_boxes",
    "sample_mixup",
    "smooth_one_hot",
]

# torchvision's RandomResizedCrop makes this many attempts before falling back to a center crop.
_CROP_TRIES = 10
# Marsaglia-Tsang accepts >95% of candidates for shape >= 1; with this many candidates drawn at once
# the chance that all are rejected is < 1e-20, so a fixed draw count costs nothing in fidelity and
# keeps the number of random numbers consumed (hence resumability) independent of the outcome.
_GAMMA_CANDIDATES = 16


def derive_seed(*parts: int) -> int:
    """A 64-bit seed derived from non-negative integers, e.g. ``(seed, stream, epoch, rank)``.

    ``numpy.random.SeedSequence`` hashes its inputs, so nearby tuples give unrelated streams; the
    result fits ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def _check_image_batch(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Integer images become float32 with their values unchanged (0..255 for uint8)."""
    return x if x.is_floating_point() else x.to(torch.float32)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback ``(h, w)``: the whole image, clipped to the nearest allowed ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return round(width / ratio[0]), width
    if in_ratio > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def _check_crop_bounds(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
        )


def sample_crop_box(
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """One box ``(top, left, h, w)``: the box ``sample_crop_boxes(1, ...)`` gives from the same
    generator state, with the same draws consumed, worked out in Python floats.

    For one image at a time (a data-loader worker cropping each decoded JPEG) the dozen small
    tensor ops of the batched sampler cost more than the arithmetic; see
    :func:`sample_crop_boxes` for the semantics and arguments.
    """
    _check_crop_bounds(scale, ratio)
    f64 = {"dtype": torch.float64, "device": generator.device, "generator": generator}
    u_area = torch.rand(_CROP_TRIES, **f64).tolist()
    u_ratio = torch.rand(_CROP_TRIES, **f64).tolist()
    u_top, u_left = torch.rand(2, **f64).tolist()
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for ua, ur in zip(u_area, u_ratio, strict=True):
        area = float(height * width) * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(math.floor(u_top * (height - h + 1)), height - h)
            left = min(math.floor(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    h, w = _fallback_box(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample ``batch`` crop boxes with torchvision's ``RandomResizedCrop.get_params`` semantics.

    Per sample: up to 10 tries of an area fraction ``~ U(scale)`` and an aspect ratio (w / h)
    that is log-uniform on ``ratio``; the first try whose rounded box fits the image wins, and its
    top-left corner is uniform over the valid positions. Samples where no try fits get
    torchvision's fallback center crop. All tries are drawn at once, so a call always consumes the
    same amount of randomness: ``2 * 10 + 2`` float64 uniforms per box.

    Args:
        batch: number of boxes ``B``.
        height, width: image size ``H, W`` in pixels.
        scale: bounds of the crop area as a fraction of ``H * W``.
        ratio: bounds of the crop aspect ratio ``w / h``.
        generator: source of randomness; the boxes are created on its device.

    Returns:
        ``(B, 4)`` int64 ``[top, left, h, w]`` with ``0 <= top``, ``top + h <= H`` (same for width)
        and ``h, w >= 1``.
    """
    _check_crop_bounds(scale, ratio)
    # float64 mirrors torchvision's Python-float arithmetic, so rounding decisions match it.
    f64 = {"dtype": torch.float64, "device": generator.device, "generator": generator}
    u_area = torch.rand(batch, _CROP_TRIES, **f64)
    u_ratio = torch.rand(batch, _CROP_TRIES, **f64)
    u_pos = torch.rand(batch, 2, **f64)

    target_area = float(height * width) * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round and Python's round both round half to even.
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    ok = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    # argmax returns the first maximal index, i.e. the first successful try.
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    fb_h, fb_w = _fallback_box(height, width, ratio)
    w = torch.where(found, w_try.gather(1, first).squeeze(1), float(fb_w))
    h = torch.where(found, h_try.gather(1, first).squeeze(1), float(fb_h))
    # Uniform integer in [0, H - h], like randint(0, H - h + 1); the clamp guards u -> 1 rounding.
    top = torch.minimum(torch.floor(u_pos[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_pos[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fb_h) // 2))
    left = torch.where(found, left, float((width - fb_w) // 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resized_crop(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_size: tuple[int, int] | None = None,
    *,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each image to its box and resize all crops to ``out_size`` with one ``grid_sample``.

    The affine grid maps the output's pixel centres onto the box's pixel extent (half-pixel
    convention, ``align_corners=False``), which is what ``F.interpolate(crop, mode="bilinear")``
    does. One difference from cropping first: when upsampling, output pixels next to the box edge
    read up to half an input pixel outside the box, i.e. they blend in the real neighbouring pixel
    rather than repeating the edge; at the image border ``padding_mode="border"`` repeats the edge
    as interpolate does. There is no antialiasing, so strong downsampling aliases; for the CIFAR
    recipe (crops of a 32x32 image resized to 32x32) it only ever upsamples.

    Args:
        x: ``(B, C, H, W)`` images, uint8 or float.
        boxes: ``(B, 4)`` ``[top, left, h, w]`` in pixels, as from :func:`sample_crop_boxes`.
        out_size: ``(H_out, W_out)``; default ``(H, W)``.
        flip: optional ``(B,)`` bool; where true the output is mirrored left-right, at no extra
            cost because the mirror is folded into the sampling grid.

    Returns:
        ``(B, C, H_out, W_out)`` float (float32 for integer input, else ``x.dtype``), in the value
        range of ``x`` (0..255 for uint8).
    """
    _check_image_batch(x)
    b, c, height, width = x.shape
    oh, ow = out_size if out_size is not None else (height, width)
    xf = _as_float(x)
    if b == 0:
        # affine_grid rejects empty sizes; a sharded last batch can be empty (see the loader).
        return xf.new_empty(0, c, oh, ow)
    top, left, h, w = boxes.to(device=x.device, dtype=torch.float64).unbind(1)
    # Normalised coords with align_corners=False: pixel edge e maps to 2 * e / size - 1, so the
    # box's edges [left, left + w] map to [2 left / W - 1, 2 (left + w) / W - 1].
    sx = w / width
    sy = h / height
    if flip is not None:
        sx = torch.where(flip.to(x.device), -sx, sx)
    tx = (2 * left + w) / width - 1
    ty = (2 * top + h) / height - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, tx, zero, sy, ty], dim=1).view(b, 2, 3).to(xf.dtype)
    grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    *,
    hflip_p: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    out_size: tuple[int, int] | None = None,
    generator: torch.Generator,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` then ``RandomHorizontalFlip(hflip_p)`` on a whole batch.

    One independent box (:func:`sample_crop_boxes`) and one flip draw (``U(0, 1) < hflip_p``, drawn
    for every image even when ``hflip_p`` is 0 or 1, so the randomness consumed is fixed) per image;
    the flip is folded into :func:`resized_crop`'s sampling grid.

    Args:
        x: ``(B, C, H, W)`` images, uint8 or float.
        hflip_p: probability of mirroring an image left-right.
        scale, ratio: see :func:`sample_crop_boxes`.
        out_size: ``(H_out, W_out)``; default ``(H, W)``.
        generator: on ``x.device``.

    Returns:
        ``(B, C, H_out, W_out)`` float, in the value range of ``x`` (see :func:`resized_crop`).
    """
    _check_image_batch(x)
    b, _, height, width = x.shape
    boxes = sample_crop_boxes(b, height, width, scale=scale, ratio=ratio, generator=generator)
    flip = torch.rand(b, device=x.device, generator=generator) < hflip_p
    return resized_crop(x, boxes, out_size, flip=flip)


def _log_gamma_variate(shape: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` float64 logs of Gamma(shape, 1) draws (Marsaglia-Tsang, vectorised, fixed draws).

    Sampling Gamma(shape + 1) and multiplying by ``U ** (1 / shape)`` is exact for every shape > 0
    and keeps Marsaglia-Tsang in its high-acceptance regime; working in logs keeps tiny draws (small
    shapes) from underflowing to 0.
    """
    kw = {"dtype": torch.float64, "device": generator.device, "generator": generator}
    d = shape + 1 - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(n, _GAMMA_CANDIDATES, **kw)
    # 1 - rand lies in (0, 1], so its log is finite.
    u = 1 - torch.rand(n, _GAMMA_CANDIDATES, **kw)
    boost = 1 - torch.rand(n, **kw)
    v = (1 + c * z) ** 3
    log_v = torch.log(v.clamp_min(torch.finfo(torch.float64).tiny))
    accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
    first = accept.to(torch.uint8).argmax(dim=1, keepdim=True)
    # If all candidates were rejected (p < 1e-20) fall back to v = 1, the mode of the proposal.
    log_v = torch.where(accept.any(dim=1), log_v.gather(1, first).squeeze(1), 0.0)
    return math.log(d) + log_v + torch.log(boost) / shape


def sample_beta(alpha: float, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` float64 draws from Beta(alpha, alpha) on the generator's device.

    Built from two Gamma draws because ``torch.distributions`` cannot take a generator; each call
    consumes a fixed amount of the generator's stream, so it is reproducible from its state.
    """
    if alpha <= 0:
        raise ValueError(f"Beta(alpha, alpha) needs alpha > 0, got {alpha}")
    log_g1 = _log_gamma_variate(alpha, n, generator)
    log_g2 = _log_gamma_variate(alpha, n, generator)
    # g1 / (g1 + g2) = sigmoid(log g1 - log g2), stable even when both are tiny.
    return torch.sigmoid(log_g1 - log_g2)


def sample_mixup(
    batch: int, alpha: float = 0.8, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one batch's mixup parameters: a pairing permutation and one shared lambda.

    Returns:
        ``perm``: ``(B,)`` int64, a uniform random permutation; ``lam``: 0-dim float32 tensor
        ``~ Beta(alpha, alpha)``. Both on the generator's device (``lam`` stays a tensor so that
        nothing syncs with the host).
    """
    lam = sample_beta(alpha, 1, generator=generator)[0].to(torch.float32)
    perm = torch.randperm(batch, device=generator.device, generator=generator)
    return perm, lam


def mixup(
    x: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.8,
    *,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup with one lambda for the whole batch: ``lam * x + (1 - lam) * x[perm]``.

    Targets are mixed the same way, so the soft-target cross-entropy
    ``-(mixed_targets * log_softmax(logits)).sum(-1)`` equals
    ``lam * CE(logits, t) + (1 - lam) * CE(logits, t[perm])`` (the loss is linear in the targets).
    Pairing uses a random permutation (as in the mixup paper's code), not FFCV's roll-by-one of an
    already shuffled batch; both pair each image with a random partner.

    Args:
        x: ``(B, ...)`` float inputs (integer inputs are converted to float32).
        targets: ``(B, K)`` one-hot or soft targets (float).
        alpha: Beta(alpha, alpha) concentration, > 0.
        generator: on ``x.device``.

    Returns:
        ``(mixed_x, mixed_targets, perm, lam)``: ``perm`` is the ``(B,)`` int64 partner of each
        sample (``labels[perm]`` are the partners' labels) and ``lam`` a 0-dim float32 tensor.
    """
    perm, lam = sample_mixup(x.shape[0], alpha, generator=generator)
    xf = _as_float(x)
    # lerp(x[perm], x, lam) = x[perm] + lam * (x - x[perm]): one fused kernel. index_select, not
    # x[perm]: advanced indexing is ~6x slower on CPU.
    mixed_x = torch.lerp(xf.index_select(0, perm), xf, lam.to(xf.dtype))
    mixed_t = torch.lerp(targets.index_select(0, perm), targets, lam.to(targets.dtype))
    return mixed_x, mixed_t, perm, lam


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot targets, matching ``F.cross_entropy(label_smoothing=smoothing)``.

    Args:
        y: ``(B,)`` int64 labels in ``[0, num_classes)``.
        num_classes: ``K``.
        smoothing: mass spread uniformly over all ``K`` classes (the true one included).

    Returns:
        ``(B, K)`` float32 rows: ``1 - smoothing + smoothing / K`` at the label,
        ``smoothing / K`` elsewhere; each row sums to 1.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must lie in [0, 1], got {smoothing}")
    one_hot = F.one_hot(y, num_classes).to(torch.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``.

    Args:
        x: ``(B, C, H, W)``; integer inputs are converted to float32.
        mean, std: ``(C,)`` (or any shape with ``C`` elements), in the same units as ``x`` (e.g.
            0..255 for uint8-valued images).

    Returns:
        ``(B, C, H, W)`` float.
    """
    _check_image_batch(x)
    xf = _as_float(x)
    m = torch.as_tensor(mean, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=xf.dtype, device=xf.device).view(1, -1, 1, 1)
    if m.shape[1] != xf.shape[1] or s.shape[1] != xf.shape[1]:
        raise ValueError(f"mean/std need {xf.shape[1]} channels, got {m.shape[1]} and {s.shape[1]}")
    return (xf - m) / s
