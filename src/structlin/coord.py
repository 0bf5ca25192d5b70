"""Coordinate check: do feature updates stay the same size as width grows?

Under μP the per-coordinate size of every hidden feature, ``h``, and of its change after one
optimizer step, ``Δh``, are Θ(1) in width. :func:`coord_check` trains a family of models at
several widths for a few steps on the same batch stream and records, after every step, on a
fixed evaluation batch (the check of Qiu et al., ICML 2024, Section 3 and Fig. 2a):

* ``h``  = mean over examples of ``‖h‖₂ / sqrt(width)`` (the per-example RMS of a feature);
* ``Δh`` = the same statistic of ``h_t - h_{t-1}``, the change made by step ``t``.

:func:`fit_slopes` fits ``log Δh`` against ``log width``: a slope near 0 means the updates are
width-independent; the paper's naive LR rule makes BTT's slope about ``-1/2``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import mup
from .io import atomic_write, atomic_write_text
from .linear_like import is_linear_like

__all__ = ["coord_check", "default_record_modules", "fit_slopes", "plot_coord_check", "save_csv"]


def default_record_modules(model: nn.Module) -> list[str]:
    """Every linear layer and every element of an ``nn.ModuleList`` (transformer/MLP blocks)."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if is_linear_like(module) or isinstance(parent, nn.ModuleList):
            names.append(name)
    return names


def _rms(t: torch.Tensor) -> float:
    t = t.detach().float()
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    return float((flat.norm(dim=1) / math.sqrt(flat.shape[1])).mean())


@torch.no_grad()
def _features(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_m, _i, o, name=name):
            # Blocks of some models (transformers 4.x among them) return (hidden, extras...).
            if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor):
                o = o[0]
            if isinstance(o, torch.Tensor):
                out[name] = o.detach().clone()

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def coord_check(
    make_model: Callable[[int], nn.Module],
    widths: Sequence[int],
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    base_width: int,
    lr: float,
    steps: int = 10,
    optimizer: str = "adam",
    lr_rule: str = "structure-aware",
    multipliers: Mapping[str, float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    record: Sequence[str] | None = None,
    eval_batch: torch.Tensor | None = None,
    seed: int = 0,
    label: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``make_model(width)`` for ``steps`` steps at each width and record ``h`` and ``Δh``.

    Args:
        make_model: width -> model (already structured if that is what you test). Called once
            more with ``base_width`` on the meta device to get the μP base.
        widths: widths to test.
        batches: a callable returning a fresh iterable of ``(x, y)`` training batches, so every
            width sees the same stream.
        base_width, lr, optimizer, lr_rule, multipliers: passed to
            :func:`structlin.mup.param_groups`.
        loss_fn: ``loss_fn(model(x), y)``.
        record: module names whose outputs are measured (default :func:`default_record_modules`);
            a module returning a tuple is measured on its first element.
        eval_batch: fixed inputs for the measurements (default: the first training batch's).
        seed: seed for model init (the same for every width).
        label: extra fields copied into every record (e.g. ``{"structure": "btt"}``).

    Returns:
        One record per (width, step, layer): ``width, step, layer, h, dh`` plus ``label``.
        Step 0 is the initialisation (``dh`` is NaN there).
    """
    if optimizer.lower() not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    with torch.device("meta"):
        base = make_model(base_width)
    label = dict(label or {})
    records: list[dict[str, Any]] = []
    for width in widths:
        torch.manual_seed(seed)
        model = make_model(width)
        groups = mup.param_groups(
            model, lr, base=base, optimizer=optimizer, lr_rule=lr_rule, multipliers=multipliers
        )
        opt = _OPTIMIZERS[optimizer.lower()](groups)
        names = list(record) if record is not None else default_record_modules(model)
        measured = _train_and_measure(model, opt, names, batches(), steps, loss_fn, eval_batch)
        records += [{**label, "width": width, **r} for r in measured]
    return records


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _train_and_measure(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    names: list[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    eval_batch: torch.Tensor | None,
) -> list[dict[str, Any]]:
    """Records ``step, layer, h, dh[, loss]`` at initialisation (step 0) and after each of
    ``steps`` optimizer steps, measured on ``eval_batch`` (default: the first batch's inputs)."""
    stream: Iterator = iter(batches)
    first = next(stream)
    x_eval = eval_batch if eval_batch is not None else first[0]
    prev = _features(model, names, x_eval)
    records = _step_records(0, names, prev, None, None)
    for step in range(1, steps + 1):
        x, y = first if step == 1 else _next_batch(stream, step)
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = _features(model, names, x_eval)
        records += _step_records(step, names, cur, prev, float(loss.detach()))
        prev = cur
    return records


def _next_batch(stream: Iterator, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return next(stream)
    except StopIteration:
        raise ValueError(f"coord_check: the batch stream ended before step {step}") from None


def _step_records(
    step: int,
    names: list[str],
    cur: Mapping[str, torch.Tensor],
    prev: Mapping[str, torch.Tensor] | None,
    loss: float | None,
) -> list[dict[str, Any]]:
    """One record per measured module: ``h = rms(cur)``, ``dh = rms(cur - prev)`` (NaN at
    step 0, where there is no ``prev``), and the training loss of the step that led here."""
    out = []
    for name in names:
        if name not in cur:
            continue  # the module returned something other than a tensor
        dh = float("nan") if prev is None else _rms(cur[name] - prev[name])
        rec = {"step": step, "layer": name, "h": _rms(cur[name]), "dh": dh}
        if loss is not None:
            rec["loss"] = loss
        out.append(rec)
    return out


def fit_slopes(
    records: Iterable[Mapping[str, Any]],
    *,
    layer: str,
    group_by: Sequence[str] = ("structure", "lr_rule"),
    first_step: int = 1,
) -> list[dict[str, Any]]:
    """Per group, the least-squares slope of ``log(mean Δh)`` against ``log(width)`` at ``layer``.

    ``mean Δh`` averages steps ``>= first_step``. Returns ``[{**group, "slope", "widths",
    "dh": [...]}, ...]``.
    """
    table: dict[tuple, dict[int, list[float]]] = {}
    for r in records:
        if r["layer"] != layer or r["step"] < first_step or not np.isfinite(r["dh"]):
            continue
        key = tuple(r.get(k) for k in group_by)
        table.setdefault(key, {}).setdefault(int(r["width"]), []).append(float(r["dh"]))
    out = []
    for key, by_width in sorted(table.items(), key=lambda kv: str(kv[0])):
        widths = sorted(by_width)
        means = [float(np.mean(by_width[w])) for w in widths]
        if len(widths) < 2:
            raise ValueError(
                f"fit_slopes needs at least 2 widths for {dict(zip(group_by, key, strict=True))}"
            )
        slope = float(np.polyfit(np.log(widths), np.log(means), 1)[0])
        out.append(
            {**dict(zip(group_by, key, strict=True)), "slope": slope, "widths": widths, "dh": means}
        )
    return out


def save_csv(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records to CSV atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(records)
    return atomic_write_text(path, buf.getvalue())


def plot_coord_check(
    fits: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "Δh vs width",
) -> list[Path]:
    """Log-log plot of mean ``Δh`` against width, one panel per LR rule, one line per structure.

    Needs matplotlib (``pip install structlin[plot]``). Writes ``path`` with suffixes .png and
    .pdf; returns the written paths.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'structlin[plot]'") from err
    rules = sorted({f.get("lr_rule", "") for f in fits})
    fig, axes = plt.subplots(1, len(rules), figsize=(5 * len(rules), 4), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules, strict=True):
        for f in fits:
            if f.get("lr_rule", "") != rule:
                continue
            ax.plot(
                f["widths"],
                f["dh"],
                marker="o",
                label=f"{f.get('structure', '?')} (slope {f['slope']:+.2f})",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(f"LR rule: {rule}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean Δh per step")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        out = path.with_suffix(suffix)
        atomic_write(out, lambda f, fmt=suffix[1:]: fig.savefig(f, format=fmt, dpi=120))
        written.append(out)
    plt.close(fig)
    return written
