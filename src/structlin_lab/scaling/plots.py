"""Paper-style figures from ``collect_runs`` rows: scaling laws and learning-rate landscapes.

Every figure is saved as both PNG and PDF next to each other (``path`` with its suffix replaced),
each written atomically (a temp file in the same folder, then ``os.replace``). matplotlib is
imported lazily with the non-interactive ``Agg`` backend; install it with
``pip install 'structlin[plot]'``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from structlin.io import atomic_write
from structlin_lab.scaling.fit import fit_by_structure, points_by_structure

#: the lr rule assumed for rows (runs) that do not record one
DEFAULT_LR_RULE = "structure-aware"

_FORMATS = ("png", "pdf")

_LABELS = {
    "train_macs": "training compute (MACs)",
    "forward_macs_per_example": "forward compute per example (MACs)",
    "params": "parameters",
    "steps": "training steps",
    "step": "training step",
    "train_loss": "train loss (nats)",
    "test_loss": "test loss (nats)",
    "wall_time_s": "wall time (s)",
    "lr": "learning rate",
    "final_test_error": "final test error (%)",
    "best_test_error": "best test error (%)",
    "final_train_error": "final train error (%)",
    "best_train_error": "best train error (%)",
    "final_test_loss": "final test loss (nats)",
    "best_test_loss": "best test loss (nats)",
    "final_train_loss": "final train loss (nats)",
    "best_train_loss": "best train loss (nats)",
}


def _is_error(key: str) -> bool:
    return key.endswith("_error")


def _label(key: str) -> str:
    return _LABELS.get(key, key)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "structlin plots need matplotlib, which is not installed: pip install 'structlin[plot]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> list[Path]:
    """Save ``fig`` as ``path`` with suffixes .png and .pdf, each atomically; close it."""
    base = Path(path)
    if base.suffix.lower().lstrip(".") in _FORMATS:
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    try:
        for fmt in _FORMATS:
            target = base.with_name(f"{base.name}.{fmt}")
            # No creation date in the PDF, so re-running a report over the same results leaves
            # the committed figures byte-identical.
            meta = {"CreationDate": None} if fmt == "pdf" else None
            atomic_write(
                target,
                lambda f, fmt=fmt, meta=meta: fig.savefig(
                    f, format=fmt, dpi=200, bbox_inches="tight", metadata=meta
                ),
            )
            out.append(target)
    finally:
        _pyplot().close(fig)
    return out


def _colours(n: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _plain_log_ticks(axis: Any) -> None:
    """Label a log axis with plain numbers (errors and losses span well under a decade)."""
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def plot_scaling(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    x: str = "train_macs",
    y: str = "final_test_error",
    irreducible: bool = False,
    statuses: Sequence[str] | None = ("finished",),
    by: str = "structure",
) -> list[Path]:
    """Log-log ``y`` against compute ``x``, one colour per structure, with power-law fits.

    Points are the best learning rate per (structure, width), seeds averaged
    (``points_by_structure``); lines are ``fit_by_structure`` fits, their exponent ``b`` and its
    standard error in the legend. Errors are shown in percent. A structure with fewer than 3
    widths is drawn without a line (marked "no fit" in the legend). Returns the PNG and PDF paths.

    Raises ValueError when no row is usable or no structure has the 3 widths a fit needs.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_scaling: no rows to plot (empty run table)")
    points = points_by_structure(rows, x, y, statuses=statuses, by=by)
    if not points:
        raise ValueError(
            f"plot_scaling: none of the {len(rows)} row(s) has status in {statuses} and "
            f"positive {x!r} and {y!r}"
        )
    fittable = {s: p for s, p in points.items() if p[0].size >= 3}
    if not fittable:
        counts = ", ".join(f"{s}: {p[0].size}" for s, p in points.items())
        raise ValueError(
            f"plot_scaling: a power-law fit needs at least 3 widths per structure; got {counts}"
        )
    fits = fit_by_structure(
        [r for r in rows if str(r.get(by)) in fittable],
        x,
        y,
        irreducible,
        statuses=statuses,
        by=by,
    )
    scale = 100.0 if _is_error(y) else 1.0

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for colour, (struct, (C, err)) in zip(_colours(len(points)), points.items(), strict=True):
        fit = fits.get(struct)
        if fit is None:
            label = f"{struct} (no fit: {C.size} width{'s' if C.size != 1 else ''})"
        else:
            label = f"{struct}: $b = {fit.b:.3f} \\pm {fit.b_stderr:.3f}$"
            if irreducible:
                label += f", $e_0 = {fit.e0 * scale:.3g}$"
        ax.plot(C, err * scale, "o", color=colour, label=label, zorder=3)
        if fit is not None:
            grid = np.geomspace(C.min(), C.max(), 100)
            ax.plot(grid, fit.predict(grid) * scale, "-", color=colour, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    law = "e_0 + a C^{-b}" if irreducible else "a C^{-b}"
    ax.set_title(f"{_label(y).split(' (')[0]} vs compute (fit: ${law}$, best lr per width)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="structure: exponent ± s.e.", fontsize="small")
    return _save(fig, path)


def _lr_rule(row: dict[str, Any]) -> str:
    rule = row.get("lr_rule")
    return DEFAULT_LR_RULE if rule in (None, "") else str(rule)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def plot_lr_landscape(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    y: str = "final_train_error",
    statuses: Sequence[str] | None = ("finished",),
) -> list[Path]:
    """``y`` against learning rate (log x), one line per width, one panel per (structure, lr rule).

    The lr rule is the row's ``"lr_rule"`` key (``collect_runs`` reads it from the run's config;
    rows without it count as ``"structure-aware"``). Seeds are averaged per (structure, rule,
    width, lr). Errors are shown in percent. Returns the PNG and PDF paths. Raises ValueError
    when no row is usable.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_lr_landscape: no rows to plot (empty run table)")
    groups: dict[tuple[str, str], dict[Any, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in rows:
        if statuses is not None and r.get("status") not in statuses:
            continue
        lr, yv = _finite(r.get("lr")), _finite(r.get(y))
        if lr is None or lr <= 0 or yv is None:
            continue
        groups[(str(r.get("structure")), _lr_rule(r))][r.get("width")][lr].append(yv)
    if not groups:
        raise ValueError(
            f"plot_lr_landscape: none of the {len(rows)} row(s) has status in {statuses}, "
            f"a positive 'lr' and a finite {y!r}"
        )
    scale = 100.0 if _is_error(y) else 1.0
    widths = sorted({w for g in groups.values() for w in g}, key=lambda w: (w is None, w or 0))
    colour_of = dict(zip(widths, _colours(len(widths)), strict=True))

    plt = _pyplot()
    panels = sorted(groups)
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False, sharey=True
    )
    for ax, key in zip(axes.flat, panels, strict=False):
        for width in sorted(groups[key], key=lambda w: (w is None, w or 0)):
            by_lr = groups[key][width]
            lrs = sorted(by_lr)
            ax.plot(
                lrs,
                [float(np.mean(by_lr[lr])) * scale for lr in lrs],
                "o-",
                color=colour_of[width],
                label=f"width {width}",
            )
        ax.set_xscale("log")
        ax.set_title(f"{key[0]} (lr rule: {key[1]})")
        ax.set_xlabel(_label("lr"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[:, 0]:
        ax.set_ylabel(_label(y))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{_label(y).split(' (')[0]} vs learning rate (mean over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | os.PathLike,
    *,
    x: str = "step",
    y: str = "train_loss",
    panel: Callable[[str], str] | None = None,
    colour: Callable[[str], str] | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> list[Path]:
    """Training curves: ``y`` against ``x`` from each run's metrics rows, one line per run.

    ``runs`` is ``[(label, metrics rows)]`` (rows as in ``metrics.jsonl``). ``panel(label)``
    splits the runs into side-by-side panels (shared y axis) and ``colour(label)`` gives runs
    the same colour when it returns the same key (e.g. one colour per variant, seeds alike);
    both default to one group. A run that ends before the longest one is marked with an ``x``
    at its last point (stopped, diverged or cut short). Non-finite values end a line. Returns
    the PNG and PDF paths; raises ValueError when no run has a finite point.

    ``ylim=(low, high)`` fixes the shared y range, so that one run's loss spike does not flatten
    every other curve; a run that leaves the range upwards gets a ``^`` on the top edge at each
    stretch off the chart.
    """
    if ylim is not None:
        low, high = (float(v) for v in ylim)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"plot_curves: ylim must be two finite numbers, low < high; got {ylim!r}"
            )
    panel = panel or (lambda _label: "")
    colour = colour or (lambda label: label)
    series = []
    for label, rows in runs:
        pts = []
        for r in rows:
            xv, yv = _finite(r.get(x)), _finite(r.get(y))
            if xv is None or yv is None:
                break
            pts.append((xv, yv))
        if pts:
            series.append((label, np.array(pts)))
    if not series:
        raise ValueError(f"plot_curves: no run has a finite {x!r}/{y!r} point")
    panels = sorted({panel(label) for label, _ in series})
    keys = sorted({colour(label) for label, _ in series})
    colour_of = dict(zip(keys, _colours(len(keys)), strict=True))
    longest = max(float(pts[-1, 0]) for _, pts in series)

    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, panels, strict=True):
        shown: set[str] = set()
        for label, pts in series:
            if panel(label) != name:
                continue
            key = colour(label)
            ax.plot(
                pts[:, 0],
                pts[:, 1],
                "-",
                color=colour_of[key],
                alpha=0.8,
                label=None if key in shown else key,
            )
            shown.add(key)
            if pts[-1, 0] < longest:
                ax.plot(pts[-1, 0], pts[-1, 1], "x", color=colour_of[key], ms=8)
            if ylim is not None:
                above = pts[:, 1] > high
                starts = above & ~np.concatenate(([False], above[:-1]))
                if starts.any():
                    ax.plot(
                        pts[starts, 0],
                        np.full(int(starts.sum()), high),
                        "^",
                        color=colour_of[key],
                        ms=8,
                        clip_on=False,
                    )
        if ylim is not None:
            ax.set_ylim(low, high)
        ax.set_xlabel(_label(x))
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes.flat[0].set_ylabel(_label(y))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_from_dirs(
    dirs: Iterable[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "scaling",
    **kwargs: Any,
) -> list[Path]:
    """Collect runs under ``dirs`` and draw ``kind`` ("scaling" or "lr") into ``out_dir``.

    Files are ``out_dir/scaling.{png,pdf}`` or ``out_dir/lr_landscape.{png,pdf}``; ``kwargs`` go
    to ``plot_scaling`` / ``plot_lr_landscape``.
    """
    from structlin_lab.scaling.results import collect_runs

    plotters = {"scaling": (plot_scaling, "scaling"), "lr": (plot_lr_landscape, "lr_landscape")}
    if kind not in plotters:
        raise ValueError(f"unknown plot kind {kind!r}; expected one of {sorted(plotters)}")
    fn, name = plotters[kind]
    return fn(collect_runs(dirs), Path(out_dir) / name, **kwargs)
