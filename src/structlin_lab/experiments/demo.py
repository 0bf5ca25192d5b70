"""The README demo: the paper's MLP, dense vs BTT at matched training compute, on a CPU.

Both models train with the same recipe, steps and batch size, so equal forward MACs per example
means equal training compute. The BTT width is the candidate whose forward MACs per example are
closest to the dense model's; μP (structure-aware for BTT) sets every layer's learning rate from
one base learning rate at base width 64.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from structlin import structurize
from structlin.io import atomic_write, atomic_write_text

from ..models import MLP
from ..train import Config, Trainer, load_config

__all__ = ["matched_width", "run_demo"]


def _linear_macs(model: torch.nn.Module) -> int:
    from structlin import StructuredLinear

    total = 0
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            total += m.macs()
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
    return total


def mlp_macs(in_features: int, classes: int, width: int, depth: int, structure: str) -> int:
    """Forward MACs per example of the paper's MLP (all linear layers; built on ``meta``)."""
    with torch.device("meta"):
        model = MLP(in_features, classes, width, depth)
        if structure != "dense":
            structurize(model, structure)
    return _linear_macs(model)


def matched_width(
    target_macs: int, in_features: int, classes: int, depth: int, structure: str
) -> int:
    """The width (a multiple of 16 up to 16384) whose MACs are closest to ``target_macs``.

    MACs grow with width, so a bisection over multiples of 16 finds the crossing point."""

    def macs(k: int) -> int:
        return mlp_macs(in_features, classes, 16 * k, depth, structure)

    lo, hi = 1, 1024
    while lo < hi:  # smallest k with macs(k) >= target
        mid = (lo + hi) // 2
        if macs(mid) >= target_macs:
            hi = mid
        else:
            lo = mid + 1
    candidates = [k for k in (lo - 1, lo) if k >= 1]
    best = min(candidates, key=lambda k: abs(macs(k) - target_macs))
    return 16 * best


def run_demo(
    *,
    data: str = "fashion_mnist",
    source: str | None = None,
    root: str | None = None,
    download: bool = True,
    dense_width: int = 256,
    depth: int = 3,
    structure: str = "btt",
    epochs: float = 2.0,
    batch_size: int = 512,
    lr: float = 3e-3,
    out_dir: str | Path = "demo_out",
    log=print,
) -> list[dict[str, Any]]:
    """Train dense and ``structure`` MLPs at matched compute; returns one summary row each."""
    out = Path(out_dir)
    shapes = {"fashion_mnist": (784, 10), "cifar10": (3072, 10), "cifar100": (3072, 100)}
    if data not in shapes:
        raise ValueError(f"demo data must be one of {sorted(shapes)}, got {data!r}")
    in_features, classes = shapes[data]
    target = mlp_macs(in_features, classes, dense_width, depth, "dense")
    width = matched_width(target, in_features, classes, depth, structure)
    data_settings = [f"data.name={data}", f"data.download={download}"]
    if source:
        data_settings.append(f"data.source={source}")
    if root:
        data_settings.append(f"data.root={root}")
    summary = []
    for spec, w in [("dense", dense_width), (structure, width)]:
        settings = _recipe(spec, w, depth, batch_size, lr, epochs) + data_settings
        log(f"training {spec} MLP width {w} ({epochs} epochs)...")
        summary.append(_train(load_config(None, settings), out / spec.split(":")[0], spec, w))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    log(format_summary(summary))
    try:
        _plot(summary, out / "demo.png")
        log(f"plot: {out / 'demo.png'}")
    except ImportError:
        log("matplotlib not installed: no plot (pip install 'structlin[plot]')")
    return summary


def _recipe(
    spec: str, width: int, depth: int, batch_size: int, lr: float, epochs: float
) -> list[str]:
    """Config overrides of one demo run: the same recipe for every structure, no augmentation."""
    return [
        f"name=demo-{spec.split(':')[0]}",
        "task=classify",
        "model.name=mlp",
        f"model.width={width}",
        "model.base_width=64",
        f"model.depth={depth}",
        f"structure.spec={spec}",
        f"data.batch_size={batch_size}",
        "data.eval_batch_size=2000",
        "data.augment=false",
        "data.mixup=0",
        "data.label_smoothing=0",
        "optim.name=adam",
        f"optim.lr={lr}",
        "optim.schedule=cosine",
        f"train.epochs={epochs}",
        "train.eval_every=1000000",
        "train.ckpt_every=1000000",
    ]


def _train(config: Config, out: Path, spec: str, width: int) -> dict[str, Any]:
    """Train one run and summarise it (errors are 1 - accuracy; the test split is held out)."""
    t0 = time.perf_counter()
    trainer = Trainer(config, out, overwrite=True, log=None)
    final = trainer.fit()
    elapsed = time.perf_counter() - t0
    return {
        "structure": spec,
        "width": width,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "macs_per_example": final["forward_macs_per_example"],
        "train_macs": final["train_macs"],
        "train_error": 1 - final["train_acc"],
        "test_error": 1 - final["test_acc"],
        "test_loss": final["test_loss"],
        "seconds": elapsed,
    }


def format_summary(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'structure':<12}{'width':>7}{'params':>11}{'MACs/ex':>11}"
        f"{'train err':>11}{'test err':>10}{'time s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['structure']:<12}{r['width']:>7}{r['params']:>11,}{r['macs_per_example']:>11,}"
            f"{r['train_error']:>11.3f}{r['test_error']:>10.3f}{r['seconds']:>8.0f}"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.bar(f"{r['structure']}\nwidth {r['width']}", 100 * r["test_error"])
        ax.annotate(
            f"{100 * r['test_error']:.1f}%\n{r['params']:,} params",
            (f"{r['structure']}\nwidth {r['width']}", 100 * r["test_error"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("test error (%)")
    ax.set_title("Paper MLP at matched training compute")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
