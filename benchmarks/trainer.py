"""Trainer throughput against a bare PyTorch loop (CIFAR-10, the paper's MLP, CPU).

Three variants train ``MLP(3072, 10, width, 3)`` with Adam on the μP parameter groups the trainer
uses (``structlin.mup.param_groups`` against a base model of ``--base-width``) and the trainer's
cosine schedule, batch ``--batch``:

- ``bare``: a hand-written loop on a normalised float32 ``(N, 3, 32, 32)`` tensor of the training
  images, built once and held in memory. Step ``i`` takes the contiguous slice
  ``[i * B, (i + 1) * B)`` (a view: no gather, no copy), then ``F.cross_entropy`` on the integer
  labels, ``zero_grad``, ``backward``, ``step``, ``scheduler.step``. No logging, no host syncs.
- ``trainer``: ``structlin_lab.train.Trainer`` with ``augment=false, mixup=0, label_smoothing=0``.
- ``trainer+aug``: the same with ``augment=true, mixup=0.8, label_smoothing=0.3`` (the §5.1
  recipe: on-device random resized crop, flip, mixup and label smoothing).

Timing. Every variant timestamps the start of each step (for the trainer: a wrapper around the
trainer's task stamps before asking it for the next training batch, so a step's interval covers
batch construction, forward, backward, optimizer and scheduler steps and the trainer's
bookkeeping). A trainer run has ``warmup + steps + 1`` steps with ``eval_every`` and
``ckpt_every`` beyond the run, so the only evaluation and checkpoint follow the last step, whose
interval is never closed and is not counted. ``samples/s = steps * B / (stamp[warmup + steps] -
stamp[warmup])``. Each round runs every variant once (fresh model and optimizer, so the trainer
and the bare loop pay the same warm-up) in a rotating order; we report the median over rounds,
and the ratio to ``bare`` is the median over rounds of the within-round ratio (paired, so a slow
round of the shared machine does not bias it). ``tune_malloc()`` is applied once to the whole
process (all variants alike) unless ``--no-tune-malloc``.

Usage: ``python benchmarks/trainer.py [--rounds 9] [--steps 30] [--warmup 3] [--no-tune-malloc]``;
``--profile`` prints a per-phase breakdown and the top operators of each variant instead.
Writes ``benchmarks/out/trainer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import structlin_lab.data as data_package
from structlin import mup
from structlin.io import atomic_write_text
from structlin_lab.bench import cpu_model
from structlin_lab.malloc import tune_malloc
from structlin_lab.models import MLP
from structlin_lab.train import Trainer, load_config
from structlin_lab.train.schedule import lr_factor
from structlin_lab.train.tasks import CIFAR_MEAN, CIFAR_STD

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TARGETS = {"trainer": 0.90, "trainer+aug": 0.75}


class TimedTask:
    """A trainer's task that timestamps the start of every training step (and, for
    ``--profile``, labels the batch and forward/loss phases for ``torch.profiler``)."""

    def __init__(self, task, label: bool) -> None:
        self.task = task
        self.label = label
        self.stamps: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def train_batches(self):
        inner = self.task.train_batches()
        self.stamps = []
        while True:
            self.stamps.append(time.perf_counter())
            with _label(self.label, "phase: batch (loader)"):
                item = next(inner)
            yield item

    def loss_and_accuracy(self, forward, batch):
        with _label(self.label, "phase: forward + loss + acc"):
            return self.task.loss_and_accuracy(forward, batch)


def _label(on: bool, name: str):
    return torch.profiler.record_function(name) if on else contextlib.nullcontext()


def trainer_config(args: argparse.Namespace, total_steps: int, aug: bool):
    recipe = (
        ["data.augment=true", "data.mixup=0.8", "data.label_smoothing=0.3"]
        if aug
        else ["data.augment=false", "data.mixup=0", "data.label_smoothing=0"]
    )
    return load_config(
        None,
        [
            "name=bench",
            "model.name=mlp",
            f"model.width={args.width}",
            f"model.base_width={args.base_width}",
            "model.depth=3",
            "data.name=cifar10",
            f"data.source={args.source}",
            f"data.root={args.root}",
            f"data.batch_size={args.batch}",
            *recipe,
            "optim.name=adam",
            f"optim.lr={args.lr}",
            "optim.schedule=cosine",
            f"train.steps={total_steps}",
            "train.eval_every=1000000000",
            "train.ckpt_every=1000000000",
            "train.progress=false",
            "train.device=cpu",
            "train.seed=0",
        ],
    )


def run_trainer(args: argparse.Namespace, aug: bool, steps: int) -> float:
    total = args.warmup + steps + 1  # the last step's interval (with eval and ckpt) stays open
    with tempfile.TemporaryDirectory(prefix="sl_bench_") as tmp:
        t = Trainer(trainer_config(args, total, aug), Path(tmp) / "run", log=None)
        timed = t.task = TimedTask(t.task, label=args.profile)
        fit = t.fit
        if args.profile:
            name = "trainer+aug" if aug else "trainer"
            fit = _profiled(fit, args, steps, name, lambda: timed.stamps)
        fit()
        s = timed.stamps
    assert len(s) == total, (len(s), total)
    return steps * args.batch / (s[args.warmup + steps] - s[args.warmup])


class BareLoop:
    """The reference: model + Adam (μP groups) + cosine LambdaLR on in-memory float tensors."""

    def __init__(self, args: argparse.Namespace, train_x: np.ndarray, train_y: np.ndarray):
        self.args = args
        x = torch.from_numpy(train_x).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        self.x = x.sub_(mean).div_(std).contiguous()
        self.y = torch.from_numpy(train_y).to(torch.int64)
        self.per_epoch = self.x.shape[0] // args.batch

    def run(self, steps: int) -> float:
        a = self.args
        total = a.warmup + steps + 1
        torch.manual_seed(0)
        model = MLP(3072, 10, a.width, 3)
        with torch.device("meta"):
            base = MLP(3072, 10, a.base_width, 3)
        groups = mup.param_groups(model, a.lr, base=base, optimizer="adam")
        opt = torch.optim.Adam(groups, lr=a.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", total))
        model.train()
        stamps = []
        b = a.batch
        on = a.profile

        def loop():
            for i in range(total):
                stamps.append(time.perf_counter())
                j = i % self.per_epoch
                with _label(on, "phase: batch (loader)"):
                    x, y = self.x[j * b : (j + 1) * b], self.y[j * b : (j + 1) * b]
                with _label(on, "phase: forward + loss + acc"):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

        (_profiled(loop, a, steps, "bare", lambda: stamps) if on else loop)()
        return steps * b / (stamps[a.warmup + steps] - stamps[a.warmup])


def _profiled(fn, args: argparse.Namespace, steps: int, name: str, stamps):
    """Run ``fn`` under ``torch.profiler`` and print where the time of a step goes."""

    def wrapped():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        events = prof.key_averages()
        s = stamps()
        step_ms = 1e3 * statistics.median(s[i + 1] - s[i] for i in range(args.warmup, len(s) - 1))
        print(f"\n=== {name}: {len(s)} steps, median step {step_ms:.1f} ms (under the profiler)")
        known = 0.0
        for e in events:
            if e.key.startswith("phase:") or e.key.startswith("Optimizer.step"):
                ms = e.cpu_time_total / e.count / 1e3
                known += ms
                print(f"  {e.key:40s} {ms:7.1f} ms/step  ({e.count} calls)")
        print(f"  {'rest (backward, zero_grad, bookkeeping)':40s} {step_ms - known:7.1f} ms/step")
        # The trace also holds the warm-up steps and (trainer) the final evaluation.
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        return out

    return wrapped


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="CIFAR-10 archive or folder")
    p.add_argument("--root", default="/tmp/sl_cache", help="decode cache directory")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--base-width", type=int, default=64, help="μP base width (config default)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rounds", type=int, default=9, help="repetitions of every variant")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per repetition")
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's defaults")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark, run each variant once under torch.profiler and print "
        "its top operators (per-step phases are labelled 'phase: ...')",
    )
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--out", default=str(HERE / "out" / "trainer.json"))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("need --rounds >= 1, --steps >= 1, --warmup >= 0")
    return args


def _load_once(args: argparse.Namespace) -> BareLoop:
    """Decode CIFAR-10 once; every Trainer is then served the arrays already loaded (instead of
    re-reading the 185 MB cache) and the bare loop gets its in-memory tensors."""
    arrays = data_package.load_cifar("cifar10", args.root, source=args.source)
    cached = functools.lru_cache(maxsize=None)(data_package.load_cifar)
    data_package.load_cifar = cached  # the trainer's tasks look the loader up at call time
    cached("cifar10", args.root, source=args.source, download=False)
    return BareLoop(args, arrays.train_x, arrays.train_y)


def _rounds(variants: dict, args: argparse.Namespace, t0: float) -> dict[str, list[float]]:
    """Samples/s of every variant in every round, in a rotating order."""
    names = list(variants)
    for name in names:  # one untimed pass each: first-call costs, allocator warm-up
        variants[name](2)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(variants[name](args.steps))
        line = "  ".join(f"{n} {results[n][-1]:7.0f}" for n in names)
        elapsed = time.perf_counter() - t0
        print(f"round {r + 1}/{args.rounds} ({elapsed:5.0f} s): {line}", flush=True)
    return results


def _summary_rows(results: dict[str, list[float]]) -> list[dict]:
    rows = []
    for name, values in results.items():
        ratios = [v / b for v, b in zip(values, results["bare"], strict=True)]
        rows.append(
            {
                "variant": name,
                "samples_per_s": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "ratio_to_bare": statistics.median(ratios),
                "target": TARGETS.get(name),
                "per_round": values,
            }
        )
    print()
    print("| variant | samples/s (median) | range | ratio to bare | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        target = f">= {row['target']:.2f}" if row["target"] is not None else ""
        print(
            f"| {row['variant']} | {row['samples_per_s']:.0f} | {row['min']:.0f}-{row['max']:.0f}"
            f" | {row['ratio_to_bare']:.3f} | {target} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    tuned = False if args.no_tune_malloc else tune_malloc()
    t0 = time.perf_counter()
    bare = _load_once(args)
    print(f"data ready in {time.perf_counter() - t0:.1f} s; malloc tuned: {tuned}", flush=True)
    variants = {
        "bare": bare.run,
        "trainer": functools.partial(run_trainer, args, False),
        "trainer+aug": functools.partial(run_trainer, args, True),
    }
    if args.profile:
        for run in variants.values():
            run(args.steps)
        return 0
    rows = _summary_rows(_rounds(variants, args, t0))
    payload = {
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "malloc_tuned": tuned,
        "model": f"MLP(3072, 10, {args.width}, 3), base width {args.base_width}",
        "batch": args.batch,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "method": "step-start timestamps; samples/s = steps*batch/time of steps after warm-up; "
        "median over rounds; ratio = median of within-round ratios",
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
