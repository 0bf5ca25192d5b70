"""Tables, fits and figures of the Einsum-family study (docs/results-einsum.md).

    python scripts/report_einsum.py [--sync RUNS_DIR] [RESULTS_DIR] [FIGURES_DIR]

``--sync RUNS_DIR`` first copies config.yaml and metrics.jsonl of every run in
RUNS_DIR/cifar10_mlp_einsum and RUNS_DIR/gpt2_austen_moe into RESULTS_DIR (default
results/einsum) as cifar10_theta/ and gpt2_moe/. Then it prints, and writes as CSV/JSON:

* the θ sweep (CIFAR-10 MLP): each θ point's taxonomy (ω, ψ, ν), its power-law exponent of
  test and train error against training MACs, with standard error, and its compute multiplier
  against dense with a bootstrap interval; the exponents' rank correlation with ω and ψ; the
  compute-optimal frontier of ω = 0 points against ω > 0 points;
* the MoE comparison (GPT-2 on Austen): validation loss against active training MACs for dense,
  a top-2-of-8 dense MoE, BTT rank 2 and BTT-MoE (8 experts, top 2), fits and multipliers.

The sweep entry's name carries its θ point (``btt_w0_p1_n.5``); θ itself is read from the spec.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from structlin.taxonomy import parse_theta
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
from structlin_lab.train import load_config

STUDIES = {"cifar10_theta": "cifar10_mlp_einsum", "gpt2_moe": "gpt2_austen_moe"}
MOE_GROUPS = ["dense", "dense_moe", "btt", "btt_moe"]


def sync(runs: Path, results: Path) -> None:
    """Copy what the tables need (no checkpoints) from the sweeps' run folders."""
    for short, name in STUDIES.items():
        for run in sorted(p for p in (runs / name).glob("*") if (p / "config.yaml").is_file()):
            dst = results / short / run.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("config.yaml", "metrics.jsonl", "error.txt"):
                if (run / f).is_file():
                    shutil.copy2(run / f, dst / f)


def theta_of(spec: str) -> tuple[Any, Any]:
    """θ and its taxonomy for an ``einsum:theta=...`` spec; dense is θ = (1,0,0,1,0,0,0)."""
    theta = parse_theta("dense" if spec == "dense" else spec.split("theta=", 1)[1].split(",")[0])
    return theta, theta.taxonomy()


def _interval(m: float, lo: float, hi: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    wide = hi > 1e3 or lo < 1e-3
    return f"{m:.2f}x [{lo:.2g}, {hi:.2g}]" + (" (undetermined)" if wide else "")


def theta_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per θ point: taxonomy, exponents (test and train error), multipliers."""
    groups = sorted({r["group"] for r in rows}, key=lambda g: (g != "dense_w0_p1_n1", g))
    table = {g: {"group": g} for g in groups}
    for g in groups:
        spec = next(r["structure"] for r in rows if r["group"] == g)
        theta, tax = theta_of(spec)
        table[g].update(theta=str(theta), omega=tax.omega, psi=tax.psi, nu=tax.nu)
    for y in ("final_test_error", "final_train_error"):
        fits = fit_by_structure(rows, y=y, by="group")
        ref = "dense_w0_p1_n1"
        _, mults = compute_multipliers(rows, reference=ref, y=y, by="group", n_boot=2000)
        short = y.split("_")[1]
        for g in groups:
            f = fits[g]
            table[g].update({f"b_{short}": f.b, f"b_{short}_se": f.b_stderr, f"n_{short}": f.n})
            table[g][f"mult_{short}"] = _interval(*mults[g]) if g in mults else "reference"
            table[g][f"mult_{short}_x"] = mults[g][0] if g in mults else 1.0
            pts = points_by_structure(rows, y=y, by="group")[g]
            table[g][f"best_{short}"] = float(pts[1].min())
            table[g]["decades"] = float(math.log10(pts[0].max() / pts[0].min()))
    return list(table.values())


def _spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation, ties given their mean rank (many θ points share ω = 0 or ψ = 1)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def frontier_by_omega(rows: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """The compute-optimal frontier of test error over every evaluation of every run, pooled
    over the θ points with ω = 0 and, separately, with ω > 0 (dense on its own)."""
    classes: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in rows:
        omega = theta_of(r["structure"])[1].omega
        key = "dense" if r["structure"] == "dense" else ("omega=0" if omega == 0 else "omega>0")
        hist = read_metrics(root / r["path"])
        C = np.array([h["train_macs"] for h in hist])
        e = np.array([1 - h["test_acc"] for h in hist])
        classes.setdefault(key, []).append((C, e))
    out = {}
    for key, hs in classes.items():
        C, e = compute_frontier(hs)
        fit = fit_power_law(C, e) if C.size >= 3 else None
        out[key] = {
            "C": C.tolist(),
            "err": e.tolist(),
            "b": fit.b if fit else None,
            "b_se": fit.b_stderr if fit else None,
        }
    return out


def moe_table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per run: active MACs per token, params, validation loss, expert use; per group: the fit
    of loss against training MACs and the multiplier against dense."""
    out = []
    for r in rows:
        last = read_metrics(Path.cwd() / r["path"])[-1]
        out.append(
            {
                "group": r["group"],
                "width": r["width"],
                "params": r["params"],
                "active_macs_per_token": r["forward_macs_per_example"] / _block(r),
                "train_macs": r["train_macs"],
                "val_loss": r["final_test_loss"],
                "train_loss": r["final_train_loss"],
                "expert_entropy": last.get("expert_entropy"),
                "expert_fraction_max": _max_fraction(last),
                "wall_time_s": r["wall_time_s"],
            }
        )
    fits = fit_by_structure(rows, y="final_test_loss", by="group")
    _, mults = compute_multipliers(rows, y="final_test_loss", by="group", n_boot=2000)
    summary = {
        g: {
            "b": fits[g].b,
            "b_se": fits[g].b_stderr,
            "n": fits[g].n,
            "mult": _interval(*mults[g]) if g in mults else "reference",
        }
        for g in MOE_GROUPS
        if g in fits
    }
    return out, summary


def _block(row: dict[str, Any]) -> int:
    return load_config(Path.cwd() / row["path"] / "config.yaml").data.block_size


def _max_fraction(metrics: dict[str, Any]) -> float | None:
    """The largest share of routed tokens any expert got (1/E is perfectly balanced)."""
    value = metrics.get("expert_fraction")
    if isinstance(value, list):
        return float(max(value))
    return None if value is None else float(value)


def figures(theta_rows, frontier, moe_rows, fig_dir: Path) -> list[Path]:
    """Test error against compute per θ point coloured by ω, the frontiers by ω, and GPT-2
    validation loss against active training compute per MoE group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cmap = plt.get_cmap("viridis")
    for g, (C, e) in points_by_structure(theta_rows, y="final_test_error", by="group").items():
        tax = theta_of(next(r["structure"] for r in theta_rows if r["group"] == g))[1]
        style = {"color": cmap(tax.omega * 1.6), "ls": "-" if tax.psi == 1 else "--"}
        if g.startswith("dense"):
            style = {"color": "k", "lw": 2}
        order = np.argsort(C)
        axes[0].plot(C[order], e[order], marker="o", ms=3, label=g, **style)
    _label(axes[0], "final test error", "CIFAR-10 MLP, θ sweep (colour: ω; dashed: ψ < 1)")
    for key, f in frontier.items():
        axes[1].plot(f["C"], f["err"], marker=".", label=f"{key} (b={f['b'] or float('nan'):.3f})")
    _label(axes[1], "test error (frontier)", "compute-optimal frontier by parameter sharing ω")
    for g in MOE_GROUPS:
        pts = sorted((r["train_macs"], r["val_loss"]) for r in moe_rows if r["group"] == g)
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=g)
    _label(axes[2], "validation loss (nats/char)", "GPT-2 on Austen, MoE at matched active MACs")
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [fig_dir / f"einsum_study.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def _label(ax: Any, ylabel: str, title: str) -> None:
    ax.set(xscale="log", xlabel="training MACs", ylabel=ylabel, title=title)
    ax.legend(fontsize=6)


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}")
    for r in rows:
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.items()))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sync"]:
        runs, argv = Path(argv[1]), argv[2:]
        results = Path(argv[0]) if argv else Path("results/einsum")
        sync(runs, results)
    results = Path(argv[0]) if argv else Path("results/einsum")
    fig_dir = Path(argv[1]) if len(argv) > 1 else Path("docs/figures")
    theta_rows = collect_runs([results / "cifar10_theta"])
    table = theta_table(theta_rows)
    write_table(table, results / "cifar10_theta.csv", results / "cifar10_theta.json")
    _print_rows("θ sweep: exponents b (error = a C^-b) and multipliers vs dense", table)
    structured = [t for t in table if t["group"] != "dense_w0_p1_n1"]
    for short in ("test", "train"):
        for what in ("b", "mult"):  # the exponent, and the multiplier (error at fixed compute)
            key = f"b_{short}" if what == "b" else f"mult_{short}_x"
            values = [t[key] for t in structured]
            corr = [_spearman(values, [t[x] for t in structured]) for x in ("omega", "psi", "nu")]
            print(f"Spearman({short} {what}; ω, ψ, ν) = " + ", ".join(f"{v:+.2f}" for v in corr))
    frontier = frontier_by_omega(theta_rows, Path.cwd())
    for key, f in frontier.items():
        print(
            f"frontier {key}: {len(f['C'])} points, b={f['b']}, se={f['b_se']}, "
            f"best {min(f['err']):.4f}"
        )
    moe_rows, moe_summary = moe_table(collect_runs([results / "gpt2_moe"]))
    write_table(moe_rows, results / "gpt2_moe.csv", results / "gpt2_moe.json")
    _print_rows("GPT-2 MoE comparison (per run)", moe_rows)
    _print_rows(
        "GPT-2 MoE fits (val loss = a C^-b) and multipliers vs dense",
        [{"group": g, **s} for g, s in moe_summary.items()],
    )
    print("wrote", *figures(theta_rows, frontier, moe_rows, fig_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
