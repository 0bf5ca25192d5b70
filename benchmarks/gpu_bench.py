"""GPU benchmark of structured layers and whole GPT-2 training steps (issue 15, item 5).

Stages, each time-boxed (what does not fit is reported as ``skipped`` rows, never dropped):

* ``layers``: forward+backward of one layer on ``rows`` rows for dense, BTT r=1/4, Monarch b=4/16
  and low-rank at every ``d``, through three paths: ``reference`` (``layer.reference_forward``,
  plain torch ops), ``fast`` (``layer(x)``: the ``structlin::btt2`` custom op, running the Triton
  kernels on CUDA when triton is installed) and ``compile`` (``torch.compile(layer)``). Dense is
  ``nn.Linear`` eager on the first two paths and compiled on the third. ``vs_dense`` is dense's
  time over the layer's on the same path, measured in the same process.
* ``model``: training steps (AdamW, forward+backward+update) of the lab's GPT-2 with every linear
  layer structured, ``lm_head`` included, at equal width and at equal training FLOPs (the
  structured model's width chosen so its MACs per token come closest to dense's without
  exceeding them); tokens/s and peak memory for dense, BTT r=4 and Monarch b=4 in ``eager``,
  ``compile`` and (CUDA only) ``cudagraphs`` (``torch.compile(mode="reduce-overhead")``).

The issue's targets are evaluated at the end from the measured rows; a target whose rows were not
measured is reported as ``unmeasured``. Output: ``$OUT/gpu_bench.json`` and ``gpu_bench.md``.

``--device cpu --tiny`` runs every stage at toy sizes in seconds (``aot_eager`` instead of
inductor), to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlin import StructuredLinear, make_linear, structurize
from structlin.io import atomic_write_text
from structlin_lab.models import GPT2, GPTConfig

LAYER_SPECS = [
    "dense",
    "btt:rank=1",
    "btt:rank=4",
    "monarch:blocks=4",
    "monarch:blocks=16",
    "low_rank",
]
MODEL_SPECS = ["dense", "btt:rank=4", "monarch:blocks=4"]
# (name, layer spec, d, minimum dense time / layer time on the fast path) from the issue
LAYER_TARGETS = [
    ("BTT r=1 d=4096 >= 4x dense", "btt:rank=1", 4096, 4.0),
    ("BTT r=1 d=1024 >= 1.5x dense", "btt:rank=1", 1024, 1.5),
    ("BTT r=4 d=4096 >= 2.5x dense", "btt:rank=4", 4096, 2.5),
    ("Monarch b=4 d=4096 >= 1.6x dense", "monarch:blocks=4", 4096, 1.6),
]


class Clock:
    """The stage's deadline; ``left()`` seconds remain."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- layers


def _layer(spec: str, d: int, device: str, dtype: torch.dtype) -> nn.Module:
    if spec == "dense":
        return nn.Linear(d, d, device=device, dtype=dtype)
    return make_linear(spec, d, d, device=device, dtype=dtype)


def _layer_step(module: nn.Module, path: str, x: torch.Tensor, g: torch.Tensor, backend: str):
    if path == "reference" and isinstance(module, StructuredLinear):
        forward = module.reference_forward
    elif path == "compile":
        # every layer instance would be a recompilation of the same forward code: start afresh
        torch.compiler.reset()
        forward = torch.compile(module, backend=backend, fullgraph=True)
    else:
        forward = module
    params = list(module.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(g)

    return step


def bench_layers(args: argparse.Namespace, clock: Clock) -> list[dict[str, Any]]:
    """One row per (spec, d, rows, path): ``time_ms``, ``vs_dense``, ``macs_ratio``."""
    rows: list[dict[str, Any]] = []
    dtype = getattr(torch, args.dtype)
    for n in args.rows:  # the targets' shapes first, so the time box cuts the rest
        for d in args.dims:
            dense_ms: dict[str, float] = {}
            for spec in LAYER_SPECS:
                for path in ("reference", "fast", "compile"):
                    row = {"spec": spec, "d": d, "rows": n, "path": path}
                    if clock.left() <= 0:
                        rows.append({**row, "status": "skipped (stage time box)"})
                        continue
                    try:
                        layer = _layer(spec, d, args.device, dtype)
                        x = torch.randn(n, d, device=args.device, dtype=dtype, requires_grad=True)
                        g = torch.randn(n, d, device=args.device, dtype=dtype)
                        step = _layer_step(layer, path, x, g, args.backend)
                        sec = time_fn(step, args.device, args.repeats)
                    except Exception as exc:  # one failing path must not stop the benchmark
                        rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
                        continue
                    macs = layer.macs() if isinstance(layer, StructuredLinear) else d * d
                    if spec == "dense":
                        dense_ms[path] = sec * 1e3
                    base = dense_ms.get(path)
                    rows.append(
                        {
                            **row,
                            "status": "ok",
                            "time_ms": sec * 1e3,
                            "macs_ratio": d * d / macs,
                            "vs_dense": base / (sec * 1e3) if base else None,
                        }
                    )
                    del layer, x, g, step
            _log(f"layers d={d} rows={n} done, {clock.left():.0f}s left in the stage")
    return rows


# ---------------------------------------------------------------- GPT-2


def _gpt_config(args: argparse.Namespace, width: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.vocab,
        block_size=args.context,
        n_layer=args.n_layer,
        d_model=width,
        d_head=64 if width >= 64 else width // 2,
    )


def _gpt(args: argparse.Namespace, spec: str, width: int, device: str) -> nn.Module:
    with torch.device(device):
        model = GPT2(_gpt_config(args, width))
    if spec != "dense":
        structurize(model, spec, overrides={"lm_head": spec})  # every linear, the head too
    return model


def macs_per_token(model: nn.Module, n_layer: int, context: int, width: int) -> int:
    """Forward MACs per token: every linear layer plus attention's two products (QK^T and AV,
    ``2 * context * width`` per layer, counted in full as FlopCounterMode does)."""
    total = 2 * n_layer * context * width
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            total += m.macs()
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def equal_flops_width(args: argparse.Namespace, spec: str, width: int) -> int:
    """The widest multiple of 64 (8 when tiny) whose model costs at most dense's MACs/token."""
    step = 8 if args.tiny else 64
    target = macs_per_token(_gpt(args, "dense", width, "meta"), args.n_layer, args.context, width)
    best = width
    for w in range(width, 4 * width + 1, step):
        model = _gpt(args, spec, w, "meta")
        if macs_per_token(model, args.n_layer, args.context, w) > target:
            break
        best = w
    return best


def _train_step(model: nn.Module, mode: str, args: argparse.Namespace) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    forward = model
    torch.compiler.reset()
    if mode == "compile":
        forward = torch.compile(model, backend=args.backend)
    elif mode == "cudagraphs":
        forward = torch.compile(model, mode="reduce-overhead")
    idx = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=args.device)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            _, loss = forward(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_model(args: argparse.Namespace, clock: Clock) -> list[dict[str, Any]]:
    """One row per (width, spec, budget, mode): tokens/s and peak memory of a training step."""
    rows: list[dict[str, Any]] = []
    modes = ["eager", "compile"] + (["cudagraphs"] if args.device.startswith("cuda") else [])
    for width in args.widths:
        for spec in MODEL_SPECS:
            budgets = [("equal width", width)]
            if spec != "dense":
                budgets.append(("equal FLOPs", equal_flops_width(args, spec, width)))
            for budget, w in budgets:
                for mode in modes:
                    row = {"width": width, "spec": spec, "budget": budget, "model_width": w}
                    row["mode"] = mode
                    if clock.left() <= 0:
                        rows.append({**row, "status": "skipped (stage time box)"})
                        continue
                    rows.append({**row, **_measure_model(args, spec, w, mode)})
                    _log(f"model {rows[-1]}")
    return rows


def _measure_model(args: argparse.Namespace, spec: str, width: int, mode: str) -> dict[str, Any]:
    try:
        torch.manual_seed(0)
        model = _gpt(args, spec, width, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = _train_step(model, mode, args)
        sec = time_fn(step, args.device, args.model_repeats, warmup=3)
    except Exception as exc:  # e.g. out of memory at the largest width
        return {"status": f"error: {type(exc).__name__}: {exc}"[:300]}
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    macs = macs_per_token(model, args.n_layer, args.context, width)
    del model, step
    return {
        "status": "ok",
        "step_ms": sec * 1e3,
        "tokens_per_s": args.batch * args.context / sec,
        "peak_gib": peak,
        "macs_per_token": macs,
    }


# ---------------------------------------------------------------- targets and report


def evaluate_targets(layers: list[dict], models: list[dict], rows: int) -> list[dict[str, Any]]:
    """The issue's targets against the measured rows (``unmeasured`` where a row is missing)."""
    out = []
    for name, spec, d, need in LAYER_TARGETS:
        hit = [
            r for r in layers
            if r["spec"] == spec and r["d"] == d and r["rows"] == rows and r["path"] == "fast"
            and r.get("vs_dense") is not None
        ]  # fmt: skip
        got = hit[0]["vs_dense"] if hit else None
        out.append(_verdict(name, got, need))
    best = {}
    for r in models:
        if r.get("status") == "ok" and r["width"] == 1024 and r["budget"] == "equal width":
            best[r["spec"]] = max(best.get(r["spec"], 0.0), r["tokens_per_s"])
    got = best["btt:rank=4"] / best["dense"] if {"dense", "btt:rank=4"} <= set(best) else None
    out.append(_verdict("GPT-2 width 1024, BTT r=4: >= 1.5x dense tokens/s", got, 1.5))
    return out


def _verdict(name: str, got: float | None, need: float) -> dict[str, Any]:
    status = "unmeasured" if got is None else ("met" if got >= need else "missed")
    return {"target": name, "need": need, "measured": got, "status": status}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark ({result['machine'].get('gpu', result['machine']['device'])})", ""]
    lines += ["| target | need | measured | status |", "|---|---|---|---|"]
    for t in result["targets"]:
        got = f"{t['measured']:.2f}x" if t["measured"] is not None else "-"
        lines.append(f"| {t['target']} | {t['need']}x | {got} | {t['status']} |")
    lines += ["", "## Layers (forward+backward)", ""]
    lines += ["| layer | d | rows | path | ms | vs dense | MACs x | status |", "|---" * 8 + "|"]
    for r in result["layers"]:
        ms = f"{r['time_ms']:.3f}" if "time_ms" in r else "-"
        vs = f"{r['vs_dense']:.2f}x" if r.get("vs_dense") else "-"
        mx = f"{r['macs_ratio']:.1f}" if "macs_ratio" in r else "-"
        lines.append(
            f"| {r['spec']} | {r['d']} | {r['rows']} | {r['path']} | {ms} | {vs} | {mx} | "
            f"{r['status']} |"
        )
    lines += ["", "## GPT-2 training step", ""]
    lines += ["| width | layers | budget | model width | mode | tokens/s | peak GiB | status |"]
    lines += ["|---" * 8 + "|"]
    for r in result["model"]:
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        mem = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        lines.append(
            f"| {r['width']} | {r['spec']} | {r['budget']} | {r['model_width']} | {r['mode']} | "
            f"{tps} | {mem} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def _log(msg: str) -> None:
    print(msg, flush=True)


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_in_op": os.environ.get("STRUCTLIN_TRITON", "1") != "0",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes, every stage in seconds")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    p.add_argument("--layer-seconds", type=float, default=200.0, help="time box of the layers")
    p.add_argument("--model-seconds", type=float, default=220.0, help="time box of GPT-2")
    args = p.parse_args(argv)
    full = {
        "dims": [4096, 1024, 2048, 768], "rows": [8192, 32768], "repeats": 10,
        "dtype": "bfloat16", "widths": [768, 1024, 2048], "n_layer": 12, "context": 1024,
        "vocab": 50304, "batch": 8, "model_repeats": 5, "backend": "inductor",
    }  # fmt: skip
    tiny = {
        "dims": [32], "rows": [64], "repeats": 2, "dtype": "float32", "widths": [32],
        "n_layer": 2, "context": 16, "vocab": 64, "batch": 2, "model_repeats": 1,
        "backend": "aot_eager",
    }  # fmt: skip
    for key, value in (tiny if args.tiny else full).items():
        setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    layers = bench_layers(args, Clock(args.layer_seconds))
    models = bench_model(args, Clock(args.model_seconds))
    result = {
        "machine": machine(args.device),
        "layers": layers,
        "model": models,
        "targets": evaluate_targets(layers, models, 8192),
    }
    atomic_write_text(args.out / "gpu_bench.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "gpu_bench.md", markdown(result))
    _log(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
