"""The ImageNet loader's per-image crop box: the batched torch sampler against the scalar one.

A data-loader worker decodes one JPEG at a time and draws one ``RandomResizedCrop`` box for it.
This times, per image and on one thread:

- ``batched(1)``: ``sample_crop_boxes(1, H, W)`` then ``.tolist()`` (a dozen small tensor ops);
- ``scalar``: ``sample_crop_box(H, W)``, the same box from the same draws in Python floats;
- ``decode+crop``: what a worker does per image around the box, for scale: ``Image.open`` and
  ``convert("RGB")`` of a 500 x 375 JPEG (a typical ILSVRC2012 size, random content, quality
  90), then the loader's train transform: the scalar box, crop, bicubic resize to 224.

Each variant runs ``--n`` calls per round; we report the median over ``--rounds`` rounds of the
time per call, rounds interleaved so a slow moment of the shared machine hits all variants.

Usage: ``python benchmarks/crop_sampler.py [--rounds 7] [--n 2000]``; writes
``benchmarks/out/crop_sampler.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from structlin_lab.data.augment import sample_crop_box, sample_crop_boxes


def _jpeg(width: int = 500, height: int = 375) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode_and_crop(jpeg: bytes, g: torch.Generator) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    top, left, h, w = sample_crop_box(img.height, img.width, generator=g)
    img = img.crop((left, top, left + w, top + h))
    return img.resize((224, 224), Image.Resampling.BICUBIC)


def _variants(jpeg: bytes) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "batched(1)": lambda: sample_crop_boxes(1, 375, 500, generator=g)[0].tolist(),
        "scalar": lambda: sample_crop_box(375, 500, generator=g),
        "decode+crop": lambda: _decode_and_crop(jpeg, g),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = _variants(_jpeg())
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            n = args.n if name != "decode+crop" else max(1, args.n // 50)
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    result = {
        "ms_per_call": {k: statistics.median(v) for k, v in times.items()},
        "rounds": args.rounds,
        "n": args.n,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    for k, v in result["ms_per_call"].items():
        print(f"{k:12s} {v:.4f} ms")
    out = Path(__file__).parent / "out" / "crop_sampler.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
