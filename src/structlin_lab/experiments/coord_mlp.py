"""Figure 2a of the paper: Δh against width for the CIFAR-10 MLP, structure-aware vs naive LR.

MLP depth 2, base width 64, Adam with constant LR 3e-3, input-layer LR multiplier 0.1, no biases:
the settings of the paper's coordinate check (Qiu et al., ICML 2024, §3 and Figure 2a) as its
code runs it. Every linear layer but the head is structured. Δh is measured on the residual
stream after the last block, on a fixed batch of test images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from structlin import structurize
from structlin.coord import coord_check, fit_slopes, plot_coord_check, save_csv
from structlin.io import atomic_write_text

from ..models import MLP
from ..train.tasks import CIFAR_MEAN, CIFAR_STD

__all__ = ["DEFAULT_STRUCTURES", "run_coord_check_mlp"]

#: The paper's Fig. 2a set (Monarch with 16 blocks, as in its check_dh script).
DEFAULT_STRUCTURES = ("dense", "btt", "monarch:blocks=16", "low_rank", "kron")


def _normalise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).float().div_(255.0)
    t = (t - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    return t.permute(0, 3, 1, 2).reshape(len(x), -1).contiguous()


def _make_model_fn(structure: str, depth: int):
    def make(width: int) -> torch.nn.Module:
        model = MLP(3072, 10, width, depth, bias=False)
        if structure != "dense":
            structurize(model, structure)
        return model

    return make


def run_coord_check_mlp(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    *,
    structures: Sequence[str] = DEFAULT_STRUCTURES,
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    steps: int = 40,
    batch_size: int = 512,
    lr: float = 3e-3,
    base_width: int = 64,
    depth: int = 2,
    input_lr_mult: float = 0.1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the check for every structure and LR rule; returns ``{"records", "fits"}``.

    ``train_x``/``eval_x`` are uint8 images ``(N, 32, 32, 3)``. With ``out_dir``, writes
    ``records.csv``, ``fits.json`` and, when matplotlib is installed, ``coord_check.{png,pdf}``.
    """
    eval_batch = _normalise(eval_x)
    labels = torch.from_numpy(np.asarray(train_y)).long()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = np.random.default_rng(seed)
        while True:
            idx = gen.integers(0, len(train_x), batch_size)
            yield _normalise(train_x[idx]), labels[idx]

    records: list[dict[str, Any]] = []
    for structure in structures:
        rules = ("structure-aware",) if structure == "dense" else ("structure-aware", "dense")
        for rule in rules:
            log(f"coord check: {structure} lr_rule={rule} widths={list(widths)} steps={steps}")
            recs = coord_check(
                _make_model_fn(structure, depth),
                widths,
                batches,
                base_width=base_width,
                lr=lr,
                steps=steps,
                lr_rule=rule,
                multipliers={r"^input_layer\.": input_lr_mult},
                record=[f"blocks.{depth - 1}", "input_layer"],
                eval_batch=eval_batch,
                seed=seed,
                label={"structure": structure, "lr_rule": rule},
            )
            if structure == "dense":  # both rules coincide for dense layers
                recs += [{**r, "lr_rule": "dense"} for r in recs]
            records += recs
    fits = fit_slopes(records, layer=f"blocks.{depth - 1}", first_step=2)
    for f in fits:
        log(f"  {f['structure']:<20} {f['lr_rule']:<16} slope {f['slope']:+.3f}")
    if out_dir is not None:
        _save(records, fits, Path(out_dir), depth, log)
    return {"records": records, "fits": fits}


def _save(records: list[dict], fits: list[dict], out: Path, depth: int, log) -> None:
    """``records.csv``, ``fits.json`` and (with matplotlib) ``coord_check.{png,pdf}``."""
    save_csv(records, out / "records.csv")
    atomic_write_text(out / "fits.json", json.dumps(fits, indent=2))
    try:
        plot_coord_check(
            fits,
            out / "coord_check",
            title=f"CIFAR-10 MLP depth {depth}: Δh after block {depth} vs width",
        )
    except ImportError as err:
        log(f"no plot: {err}")
