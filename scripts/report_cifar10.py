"""Tables, fits and figures of the CIFAR-10 MLP studies (docs/results.md, docs/results-lm.md §3).

    python scripts/report_cifar10.py [--sync RUNS_DIR] [RESULTS_DIR] [FIGURES_DIR]

``--sync RUNS_DIR`` first copies each run's config.yaml, metrics.jsonl and error.txt (no
checkpoints) from RUNS_DIR/cifar10_mlp_{lr_tune,scaling,lr_landscape} into RESULTS_DIR
(default results/cifar10_mlp) as lr_tune/, scaling/ and lr_landscape/. Then it writes one CSV
and JSON table per study, the figures (PNG and PDF) into FIGURES_DIR (default docs/figures),
and prints fits, multipliers, the frontier, the LR-landscape optima and the ξ comparison.

Compute is training MACs (3x forward MACs per example x examples seen). The paper's
slopes (Qiu et al., ICML 2024, §4) are fitted on error against forward FLOPs per example;
with the same number of epochs for every run the two differ by a constant factor, so the
exponents compare directly.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from structlin import make_linear
from structlin_lab.scaling import (
    collect_runs,
    compute_frontier,
    compute_multipliers,
    fit_by_structure,
    fit_power_law,
    points_by_structure,
    read_metrics,
    write_table,
)
from structlin_lab.scaling.plots import _pyplot, _save, plot_lr_landscape, plot_scaling

STUDIES = {"lr_tune": "cifar10_mlp_lr_tune", "scaling": "cifar10_mlp_scaling"}
STUDIES["lr_landscape"] = "cifar10_mlp_lr_landscape"
SCALING = ["dense", "btt", "monarch", "low_rank", "kron", "tt"]
XI = ["btt", "btt-rank2", "btt-rank4", "monarch", "monarch-b16"]
PAPER_SLOPE = {"dense": 0.104, "btt": 0.119, "monarch": 0.095, "low_rank": 0.095, "kron": 0.037}
PAPER_SLOPE["tt"] = 0.050


def sync(runs: Path, results: Path) -> None:
    for short, name in STUDIES.items():
        src = runs / name
        if not src.is_dir():
            continue
        for run in sorted(p for p in src.iterdir() if (p / "config.yaml").is_file()):
            dst = results / short / run.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("config.yaml", "metrics.jsonl", "error.txt"):
                if (run / f).is_file():
                    shutil.copy2(run / f, dst / f)


def table(results: Path, short: str) -> list[dict]:
    rows = collect_runs([results / short])
    for r in rows:
        r["path"] = str(Path(r["path"]).relative_to(results.parent.parent))
    write_table(rows, (results / short).with_suffix(".csv"), (results / short).with_suffix(".json"))
    return rows


def xi_of(spec: str, width: int) -> float:
    """Forward MACs per unit width of one width x width layer of this structure."""
    return make_linear(spec, width, width, device="meta").macs() / width


def history(run_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = read_metrics(run_path)
    return np.array([r["train_macs"] for r in rows]), np.array([1 - r["test_acc"] for r in rows])


def scaling_report(rows: list[dict], figures: Path) -> None:
    rows = [r for r in rows if r["group"] in SCALING]
    for y in ("final_train_error", "final_test_error"):
        print(f"\n## power-law fits: {y} = a * C^-b (C = training MACs), one point per width")
        fits = fit_by_structure(rows, y=y, by="group")
        pts = points_by_structure(rows, y=y, by="group")
        for g in SCALING:
            f, (C, e) = fits[g], pts[g]
            print(
                f"{g:9s} b={f.b:.4f} ± {f.b_stderr:.4f}  (paper {PAPER_SLOPE[g]:.3f})  "
                f"R2={f.r2:.2f} n={f.n}  C {C.min():.3g}..{C.max():.3g} "
                f"({math.log10(C.max() / C.min()):.2f} decades)  err {e.max():.4f}..{e.min():.4f}"
            )
        target, mults = compute_multipliers(rows, y=y, by="group", n_boot=2000)
        print(f"multipliers vs dense at dense's fitted {y} at its largest compute: {target:.4f}")
        for g in SCALING[1:]:
            m, lo, hi = mults[g]
            ci = f"{lo:.2f}-{hi:.2f}" if hi < 1e3 else f"{lo:.2g} to >1000 (undetermined)"
            print(f"  {g:9s} {m:8.2f}x  (95% bootstrap {ci})")
        name = "cifar10_scaling_" + y.split("_")[1]
        print("wrote", *plot_scaling(rows, figures / name, y=y, by="group"))

    print("\n## compute-optimal frontier of test error (all evaluations of all widths)")
    results_root = Path.cwd()
    for g in SCALING:
        hs = [history(results_root / r["path"]) for r in rows if r["group"] == g]
        C, e = compute_frontier(hs)
        fit = fit_power_law(C, e) if C.size >= 3 else None
        slope = f"frontier b={fit.b:.4f} ± {fit.b_stderr:.4f}" if fit else "too few points"
        print(f"{g:9s} {C.size:2d} frontier points, {slope}, best {e.min():.4f} at {C.max():.3g}")


def vertex(by_lr: dict[float, float]) -> float:
    """The optimum of a parabola through the best grid point and its two neighbours (in log lr);
    the grid point itself when it lies on the edge of the grid."""
    lrs = sorted(by_lr)
    i = min(range(len(lrs)), key=lambda k: by_lr[lrs[k]])
    if i == 0 or i == len(lrs) - 1:
        return lrs[i]
    x = np.log10(lrs[i - 1 : i + 2])
    y = np.array([by_lr[lr] for lr in lrs[i - 1 : i + 2]])
    a, b, _ = np.polyfit(x, y, 2)
    return float(10 ** (-b / (2 * a)))


def landscape_report(rows: list[dict], figures: Path) -> None:
    if not rows:
        print("\n(no LR-landscape runs yet)")
        return
    print("\n## LR landscape: final train error (constant LR, 1 epoch), mean over seeds")
    seeds: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "finished":
            seeds[(r["group"], r["width"], r["lr"])].append(r["final_train_error"])
    grid: dict[tuple[str, int], dict[float, float]] = defaultdict(dict)
    for (g, w, lr), errs in seeds.items():
        grid[(g, w)][lr] = float(np.mean(errs))
    n_seeds = sorted({len(v) for v in seeds.values()})
    print(f"(seeds per point: {', '.join(map(str, n_seeds))})")
    for (g, w), by_lr in sorted(grid.items()):
        best = min(by_lr, key=by_lr.get)
        cells = "  ".join(f"{lr:g}:{e:.3f}" for lr, e in sorted(by_lr.items()))
        print(f"{g:10s} w={w:5d} best lr {best:g} (interpolated {vertex(by_lr):.3g})   {cells}")
    print("wrote", *plot_lr_landscape(rows, figures / "cifar10_lr_landscape"))
    print(
        "wrote",
        *plot_lr_landscape(rows, figures / "cifar10_lr_landscape_test", y="final_test_error"),
    )


def xi_report(rows: list[dict], figures: Path) -> None:
    rows = [r for r in rows if r["group"] in XI and r["status"] == "finished"]
    present = sorted({r["group"] for r in rows}, key=XI.index)
    if len(present) < 2:
        print("\n(ξ study: not enough runs yet)")
        return
    print("\n## ξ study: fits of test error vs training MACs")
    fits = fit_by_structure(rows, y="final_test_error", by="group")
    pts = points_by_structure(rows, y="final_test_error", by="group")
    spec = {r["group"]: r["structure"] for r in rows}
    for g in present:
        if g in fits:
            f = fits[g]
            print(f"{g:12s} b={f.b:.4f} ± {f.b_stderr:.4f} R2={f.r2:.2f} n={f.n}")
    print(
        "wrote",
        *plot_scaling(rows, figures / "cifar10_xi_scaling", y="final_test_error", by="group"),
    )
    # matched compute: the fitted error and the width (log-log interpolation) at common C
    lo = max(pts[g][0].min() for g in fits)
    hi = min(pts[g][0].max() for g in fits)
    levels = np.geomspace(lo, hi, 3) if hi > lo else np.array([lo])
    print(f"matched compute levels {', '.join(f'{c:.3g}' for c in levels)} (overlap of all ranges)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for C in levels:
        xs, ys = [], []
        for g in fits:
            # width and ξ of the actual runs, interpolated in log-log at compute C (an
            # interpolated width need not factorise well, so ξ is not recomputed there)
            runs = sorted(
                (r["train_macs"], r["width"], xi_of(spec[g], r["width"]))
                for r in rows
                if r["group"] == g
            )
            cw = np.log(np.array(runs, dtype=float))
            w, xi = (float(np.exp(np.interp(np.log(C), cw[:, 0], cw[:, k]))) for k in (1, 2))
            err = float(fits[g].predict(np.array([C]))[0])
            xs.append(xi)
            ys.append(err)
            print(f"  C={C:.3g} {g:12s} width≈{w:7.0f} ξ≈{xi:7.1f} fitted test error {err:.4f}")
        order = np.argsort(xs)
        ax.plot(np.array(xs)[order], np.array(ys)[order] * 100, "o-", label=f"C = {C:.2g} MACs")
        for x, y, g in zip(xs, ys, fits, strict=True):
            ax.annotate(g, (x, y * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("ξ = forward MACs per unit width of a d×d layer")
    ax.set_ylabel("fitted test error (%)")
    ax.set_title("CIFAR-10 MLP: error vs compute per dimension at matched compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    print("wrote", *_save(fig, figures / "cifar10_xi_matched"))


def main(argv: list[str]) -> None:
    args = argv[1:]
    if args[:1] == ["--sync"]:
        sync(Path(args[1]), Path(args[2] if len(args) > 2 else "results/cifar10_mlp"))
        args = args[2:]
    results = Path(args[0] if args else "results/cifar10_mlp")
    figures = Path(args[1] if len(args) > 1 else "docs/figures")
    tune = table(results, "lr_tune")
    print("## base learning rate (dense, width 64, scaling recipe)")
    for r in sorted(tune, key=lambda r: r["lr"]):
        test, train = r["final_test_error"], r["final_train_error"]
        print(f"lr={r['lr']:g}: test error {test:.4f}, train {train:.4f}")
    rows = table(results, "scaling")
    scaling_report(rows, figures)
    xi_report(rows, figures)
    landscape = table(results, "lr_landscape") if (results / "lr_landscape").is_dir() else []
    landscape_report(landscape, figures)


if __name__ == "__main__":
    main(sys.argv)
