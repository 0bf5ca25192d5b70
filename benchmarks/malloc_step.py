"""Training-step time with glibc's default allocator against ``tune_malloc()`` (CPU).

Why: PyTorch hands large CPU tensors to ``malloc``; above glibc's mmap threshold each one is a
fresh ``mmap`` that is unmapped on free, so every step page-faults and zero-fills its largest
activations again. A GPT-2 with a 50257-way head makes several (B*T, 50257) float32 tensors per
step (logits, log-softmax, their gradients: 824 MB each at B*T = 4096), so it is the case where
this should matter most. ``structlin train`` and ``structlin sweep`` apply ``tune_malloc()`` by
default; this script measures what that buys.

What it times: one process per measurement (the allocator setting is process-wide), alternating
``default`` and ``tuned`` in each pair. A process builds the model from a training config
(``--config`` plus ``--set`` overrides, the same builder the Trainer uses), runs ``--warmup``
steps, then times ``--steps`` steps of forward + loss + backward + AdamW step + zero_grad on
fixed random tokens (GPT-2) or images (MLP) and reports its median step. The ratio
``default / tuned`` is taken within each pair (paired, so a slow moment of the shared machine
biases neither side); we report the median over pairs.

Usage: ``python benchmarks/malloc_step.py [--config configs/gpt2_austen-cpu.yaml]
[--set model.width=384 data.batch_size=32] [--pairs 2] [--steps 4] [--warmup 3] [--out PATH]``.
The first steps of a tuned process still grow the heap (page faults), so keep ``--warmup`` >= 3.
Writes ``benchmarks/out/malloc_step.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(config: str, sets: list[str], steps: int, warmup: int, tuned: bool) -> dict:
    """Run in the child process: median seconds per training step."""
    from structlin_lab.malloc import tune_malloc

    applied = tune_malloc() if tuned else False
    import torch
    import torch.nn.functional as F

    from structlin_lab.train import load_config
    from structlin_lab.train.build import build_model, build_optimizer, shapes_only

    cfg = load_config(config, sets)
    torch.manual_seed(0)
    lm = cfg.task == "lm"
    vocab = 50257 if lm else None  # GPT-2 BPE; random token ids need no tokenizer file
    model, base = build_model(cfg, shapes_only(cfg, vocab=vocab), torch.device("cpu"))
    opt = build_optimizer(cfg, model, base)
    b = cfg.data.batch_size
    if lm:
        x = torch.randint(0, vocab, (b, cfg.data.block_size))
        y = torch.randint(0, vocab, (b, cfg.data.block_size))
    else:
        x = torch.randn(b, 3, 32, 32)
        y = torch.randint(0, 10, (b,))

    def step() -> None:
        if lm:
            _, loss = model(x, y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"tuned": applied, "median_s": statistics.median(times), "steps_s": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/gpt2_austen-cpu.yaml")
    ap.add_argument("--set", nargs="*", default=["model.width=384", "data.batch_size=32"])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "malloc_step.json")
    ap.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = measure(args.config, args.set, args.steps, args.warmup, args.child == "tuned")
        print(json.dumps(res))
        return 0

    from structlin.io import atomic_write_text
    from structlin_lab.bench import machine_info

    def child(mode: str) -> dict:
        cmd = [sys.executable, __file__, "--child", mode, "--config", args.config]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--set", *args.set]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    pairs = []
    for i in range(args.pairs):
        order = ["default", "tuned"] if i % 2 == 0 else ["tuned", "default"]
        got = {mode: child(mode) for mode in order}
        ratio = got["default"]["median_s"] / got["tuned"]["median_s"]
        pairs.append({"order": order, **got, "ratio": ratio})
        print(
            f"pair {i}: default {got['default']['median_s']:.2f} s, "
            f"tuned {got['tuned']['median_s']:.2f} s, ratio {ratio:.2f}",
            flush=True,
        )
    summary = {
        "config": args.config,
        "set": args.set,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine_info("cpu"),
        "median_default_s": statistics.median(p["default"]["median_s"] for p in pairs),
        "median_tuned_s": statistics.median(p["tuned"]["median_s"] for p in pairs),
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "pairs": pairs,
    }
    print(
        f"median step: default {summary['median_default_s']:.2f} s, "
        f"tuned {summary['median_tuned_s']:.2f} s; default/tuned {summary['median_ratio']:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
