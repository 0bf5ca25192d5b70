"""Layer benchmark: forward+backward time of every structure against ``nn.Linear``.

All candidates of one shape are built in one process and timed in rounds: in each round every
candidate runs ``inner`` consecutive steps (default 3, timed together, so each structure is
measured in its steady state as ``torch.utils.benchmark`` would), and the rounds interleave the
candidates so that slow drifts of a shared machine hit all of them alike. The median over rounds
of the per-step time is reported, and the time ratio to dense is the median over rounds of the
ratio within each round (paired, so a slow round does not bias it). ``inner=1`` gives a strict
round-robin in which every step starts with caches full of another candidate's data. A step is
``y = layer(x); y.backward(g)`` with fresh gradients, ``x`` requiring grad as it would inside a
network.

Efficiency of a structure = ``(t_dense / t_struct) / (macs_dense / macs_struct)``: 1.0 means
every FLOP saved is saved time; 0.5 means half of the saving is lost to overheads.

The reference point ``btt_naive`` is a straightforward 2-core BTT: two ``torch.bmm`` calls with
batch-first transposes between them and autograd's backward (the approach of the paper's code).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from structlin import BTTLinear, make_linear
from structlin.io import atomic_write_text
from structlin.kernels import cpu_jit

from .malloc import tune_malloc

__all__ = ["BenchRow", "NaiveBTT", "cpu_model", "main", "run_benchmark"]


class NaiveBTT(nn.Module):
    """Baseline 2-core BTT: batch-first ``bmm`` with transposes, autograd backward."""

    def __init__(self, layer: BTTLinear) -> None:
        super().__init__()
        if layer.cores != 2 or layer.in_padded != layer.in_features:
            raise ValueError("NaiveBTT wraps an unpadded 2-core BTTLinear")
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, w1 = self.layer.weights
        m1, h, m0 = w0.shape
        n0, n1, k = w1.shape
        r = h // n0
        batch = x.shape[0]
        z = torch.bmm(x.view(batch, m1, m0).transpose(0, 1), w0.transpose(1, 2))  # (m1, N, h)
        z = z.view(m1, batch, n0, r).permute(2, 1, 3, 0).reshape(n0, batch, k)
        y = torch.bmm(z, w1.transpose(1, 2)).transpose(0, 1).reshape(batch, n0 * n1)
        return y + self.layer.bias


@dataclass
class BenchRow:
    structure: str
    batch: int
    d: int
    rank: int | None
    time_ms: float
    gflops: float
    flop_ratio: float
    time_ratio: float
    efficiency: float
    speedup_vs_naive: float | None


def _candidates(d: int, ranks: list[int], device: str, dtype: torch.dtype) -> dict[str, tuple]:
    kw = {"device": device, "dtype": dtype}
    cands: dict[str, tuple] = {"dense": (nn.Linear(d, d, **kw), None, d * d)}
    for r in ranks:
        btt = make_linear("btt", d, d, rank=r, **kw)
        cands[f"btt:r={r}"] = (btt, r, btt.macs())
        cands[f"btt_naive:r={r}"] = (NaiveBTT(btt), r, btt.macs())
    for b in (4, 16):
        mon = make_linear("monarch", d, d, blocks=b, **kw)
        cands[f"monarch:b={b}"] = (mon, None, mon.macs())
    for spec in ("low_rank", "kron", "tt", "block_diag"):
        layer = make_linear(spec, d, d, **kw)
        cands[spec] = (layer, None, layer.macs())
    return cands


def _step_fn(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_benchmark(
    batches: list[int],
    dims: list[int],
    ranks: list[int],
    *,
    repeats: int = 9,
    inner: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Time every candidate at every (batch, d); returns one row per candidate and shape."""
    rows: list[BenchRow] = []
    torch.manual_seed(0)
    for d in dims:
        cands = _candidates(d, ranks, device, dtype)
        for batch in batches:
            x = torch.randn(batch, d, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(batch, d, device=device, dtype=dtype)
            steps = {name: _step_fn(c[0], x, g) for name, c in cands.items()}
            for step in steps.values():
                for _ in range(warmup):
                    step()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(repeats):
                for name, step in steps.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        step()
                    _sync(device)
                    times[name].append((time.perf_counter() - t0) / inner)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            for name, (_, rank, flops) in cands.items():
                structure = name.split(":")[0]
                flop_ratio = (d * d) / flops
                time_ratio = statistics.median(
                    td / ts for td, ts in zip(times["dense"], times[name], strict=True)
                )
                naive = f"btt_naive:r={rank}"
                speedup = med[naive] / med[name] if structure == "btt" else None
                row = BenchRow(
                    structure=name,
                    batch=batch,
                    d=d,
                    rank=rank,
                    time_ms=med[name] * 1e3,
                    gflops=3 * 2 * flops * batch / med[name] / 1e9,
                    flop_ratio=flop_ratio,
                    time_ratio=time_ratio,
                    efficiency=time_ratio / flop_ratio,
                    speedup_vs_naive=speedup,
                )
                rows.append(row)
            log(format_table([r for r in rows if r.batch == batch and r.d == d]))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = (
        f"{'structure':<16}{'batch':>6}{'d':>6}{'time ms':>10}{'GFLOP/s':>9}"
        f"{'flop x':>8}{'time x':>8}{'eff':>6}{'vs naive':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r.speedup_vs_naive:.2f}x" if r.speedup_vs_naive is not None else ""
        lines.append(
            f"{r.structure:<16}{r.batch:>6}{r.d:>6}{r.time_ms:>10.2f}{r.gflops:>9.1f}"
            f"{r.flop_ratio:>8.1f}{r.time_ratio:>8.2f}{r.efficiency:>6.2f}{vs:>9}"
        )
    return "\n".join(lines)


def machine_info(device: str) -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="structlin bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--batch", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--d", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rank", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=9, help="rounds (median over rounds)")
    p.add_argument("--inner", type=int, default=3, help="consecutive steps per candidate per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/layers.json"))
    p.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="keep glibc's default allocator behaviour (see structlin_lab.malloc)",
    )
    return p


def run_from_args(args: argparse.Namespace) -> list[BenchRow]:
    tuned = False if args.no_tune_malloc else tune_malloc()
    dtype = getattr(torch, args.dtype)
    info = machine_info(args.device) | {
        "dtype": args.dtype,
        "device": args.device,
        "malloc_tuned": tuned,
        # whether 2-core BTT layers with small blocks ran the fused C kernel (kernels.cpu_jit)
        "btt_cpu_kernel": args.device == "cpu" and cpu_jit.available(),
        "repeats": args.repeats,
        "inner": args.inner,
    }
    print(json.dumps(info))
    rows = run_benchmark(
        args.batch,
        args.d,
        args.rank,
        repeats=args.repeats,
        inner=args.inner,
        device=args.device,
        dtype=dtype,
    )
    atomic_write_text(
        args.out, json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    print(f"wrote {args.out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    run_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
