"""Tables, fits and figures of the Einsum-family study (docs/results-einsum.md).

    python scripts/report_einsum.py [--sync RUNS_DIR] [RESULTS_DIR] [FIGURES_DIR]

``--sync RUNS_DIR`` first copies config.yaml and metrics.jsonl of every run in
RUNS_DIR/cifar10_mlp_einsum, RUNS_DIR/gpt2_austen_einsum and RUNS_DIR/gpt2_austen_moe into
RESULTS_DIR (default results/einsum) as cifar10_theta/, gpt2_theta/ and gpt2_moe/. Then it
prints, and writes as CSV/JSON:

* the θ sweep (CIFAR-10 MLP): each θ point's taxonomy (ω, ψ, ν), its power-law exponent of
  test and train error against training MACs, with standard error, and its compute multiplier
  against dense with a bootstrap interval; the exponents' rank correlation with ω and ψ; the
  compute-optimal frontier of ω = 0 points against ω > 0 points;
* the θ sweep (GPT-2 on Austen, characters): the same table for validation loss (every seed's
  run a point of the fits), the seed-to-seed spread per width, and the rank correlations;
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
    bootstrap_multiplier,
    collect_runs,
    compute_frontier,
    compute_multipliers,
    fit_by_structure,
    fit_power_law,
    read_metrics,
    write_table,
)
from structlin_lab.train import load_config

STUDIES = {
    "cifar10_theta": "cifar10_mlp_einsum",
    "gpt2_theta": "gpt2_austen_einsum",
    "gpt2_moe": "gpt2_austen_moe",
}
CIFAR_Y = {"test": "final_test_error", "train": "final_train_error"}
GPT2_Y = {"test": "final_test_loss", "train": "final_train_loss"}
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


def run_points(rows: list[dict[str, Any]], y: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{group: (training MACs, y)}`` with one point per finished run, every seed kept, so
    that fits and bootstrap intervals see the seed-to-seed noise (with one seed per width this
    is the one point per width of ``points_by_structure``)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        C, v = r.get("train_macs"), r.get(y)
        if r.get("status") == "finished" and isinstance(C, float) and isinstance(v, float):
            out.setdefault(r["group"], []).append((C, v))
    return {g: tuple(np.array(c) for c in zip(*sorted(p), strict=True)) for g, p in out.items()}


def theta_table(
    rows: list[dict[str, Any]], ys: dict[str, str], reference: str
) -> list[dict[str, Any]]:
    """One row per θ point: taxonomy, and for each metric of ``ys`` (short name -> column) the
    power-law exponent with its standard error and the compute multiplier against
    ``reference`` with its bootstrap interval, all fitted to every finished run."""
    groups = sorted({r["group"] for r in rows}, key=lambda g: (g != reference, g))
    table = {g: {"group": g} for g in groups}
    for g in groups:
        spec = next(r["structure"] for r in rows if r["group"] == g)
        theta, tax = theta_of(spec)
        table[g].update(theta=str(theta), omega=tax.omega, psi=tax.psi, nu=tax.nu)
    for short, y in ys.items():
        points = run_points(rows, y)
        C_ref, v_ref = points[reference]
        level = float(fit_power_law(C_ref, v_ref).predict(np.array([C_ref.max()]))[0])
        for g in groups:
            table[g].update(_fit_columns(points, g, reference, level, short))
    return list(table.values())


def _fit_columns(
    points: dict, group: str, reference: str, level: float, short: str
) -> dict[str, Any]:
    """Exponent, multiplier against ``reference`` at ``level`` (the reference fit's value at its
    largest compute) and the best run of one θ point; NaN / "n/a" below 3 distinct widths."""
    nan = float("nan")
    C, v = points.get(group, (np.array([nan]), np.array([nan])))
    out = {f"n_{short}": int(np.isfinite(C).sum()), f"best_{short}": float(np.nanmin(v))}
    out["decades"] = float(np.log10(np.nanmax(C) / np.nanmin(C)))
    if np.unique(C).size < 3:
        return out | {
            f"b_{short}": nan,
            f"b_{short}_se": nan,
            f"mult_{short}": "n/a",
            f"mult_{short}_x": nan,
        }
    fit = fit_power_law(C, v)
    out |= {f"b_{short}": fit.b, f"b_{short}_se": fit.b_stderr}
    if group == reference:
        return out | {f"mult_{short}": "reference", f"mult_{short}_x": 1.0}
    if fit.b <= 0:  # solving a law that does not fall for the reference's level means nothing
        return out | {f"mult_{short}": "never (no fall with compute)", f"mult_{short}_x": nan}
    m = bootstrap_multiplier(points[reference], (C, v), level, n_boot=2000)
    return out | {f"mult_{short}": _interval(*m), f"mult_{short}_x": m[0]}


def seed_spread(rows: list[dict[str, Any]], y: str) -> list[dict[str, Any]]:
    """Per (θ point, width): the number of finished seeds, their mean ``y`` and its sample
    standard deviation (NaN with one seed): how far one run is from another, the noise any
    difference between θ points has to beat."""
    cells: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.get("status") == "finished" and isinstance(r.get(y), float):
            cells.setdefault((r["group"], int(r["width"])), []).append(r[y])
    return [
        {
            "group": g,
            "width": w,
            "seeds": len(v),
            "mean": float(np.mean(v)),
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
        }
        for (g, w), v in sorted(cells.items())
    ]


def _spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation, ties given their mean rank (many θ points share ω = 0 or ψ = 1)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def frontier_by_omega(
    rows: list[dict[str, Any]], root: Path, metric: str = "test_error"
) -> dict[str, Any]:
    """The compute-optimal frontier of ``metric`` (``test_error`` or ``test_loss``) over every
    evaluation of every run, pooled over the θ points with ω = 0 and, separately, with ω > 0
    (dense on its own)."""
    classes: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in rows:
        omega = theta_of(r["structure"])[1].omega
        key = "dense" if r["structure"] == "dense" else ("omega=0" if omega == 0 else "omega>0")
        hist = read_metrics(root / r["path"])
        hist = [h for h in hist if "test_acc" in h or "test_loss" in h]
        C = np.array([h["train_macs"] for h in hist])
        e = np.array([1 - h["test_acc"] if metric == "test_error" else h[metric] for h in hist])
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


def figures(cifar, gpt2, moe_rows, fig_dir: Path) -> list[Path]:
    """A 2 x 2 figure: CIFAR-10 test error against compute per θ point, the CIFAR frontiers by
    ω, GPT-2 validation loss per θ point (seed means, bars one standard deviation) and GPT-2
    validation loss per MoE group. ``cifar`` and ``gpt2`` are ``(rows, frontier)`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    _theta_panel(axes[0, 0], cifar[0], "final_test_error")
    _label(axes[0, 0], "final test error", "CIFAR-10 MLP, θ sweep (colour: ω; dashed: ψ < 1)")
    for key, f in cifar[1].items():
        b = f["b"] if f["b"] is not None else float("nan")
        axes[0, 1].plot(f["C"], f["err"], marker=".", label=f"{key} (b={b:.3f})")
    _label(axes[0, 1], "test error (frontier)", "CIFAR-10: compute-optimal frontier by ω")
    _theta_panel(axes[1, 0], gpt2[0], "final_test_loss")
    _label(axes[1, 0], "validation loss (nats/char)", "GPT-2 on Austen, θ sweep (seed means)")
    for g in MOE_GROUPS:
        pts = sorted((r["train_macs"], r["val_loss"]) for r in moe_rows if r["group"] == g)
        if pts:
            axes[1, 1].plot(*zip(*pts, strict=True), marker="o", label=g)
    _label(axes[1, 1], "validation loss (nats/char)", "GPT-2 on Austen, MoE at matched MACs")
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [fig_dir / f"einsum_study.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def _theta_panel(ax: Any, rows: list[dict[str, Any]], y: str) -> None:
    """One line per θ point (seed means per width; bars: seed standard deviation), coloured by
    ω, dashed where ψ < 1, dense in black, a marker of its own each."""
    import matplotlib.pyplot as plt

    macs = {(r["group"], int(r["width"])): r["train_macs"] for r in rows}
    cells: dict[str, list[dict[str, Any]]] = {}
    for c in seed_spread(rows, y):  # sorted by group, then width
        cells.setdefault(c["group"], []).append(c)
    markers = "osv^DPX*h<>"
    for i, (g, cs) in enumerate(cells.items()):
        tax = theta_of(next(r["structure"] for r in rows if r["group"] == g))[1]
        style = {"color": plt.get_cmap("viridis")(tax.omega * 1.6)}
        style["ls"] = "-" if tax.psi == 1 else "--"
        if g.startswith("dense"):
            style = {"color": "k", "lw": 2}
        C = [macs[(g, c["width"])] for c in cs]
        sd = [0.0 if math.isnan(c["sd"]) else c["sd"] for c in cs]
        marker = markers[i % len(markers)]
        ax.errorbar(
            C, [c["mean"] for c in cs], yerr=sd, marker=marker, ms=4, capsize=2, label=g, **style
        )


def _label(ax: Any, ylabel: str, title: str) -> None:
    ax.set(xscale="log", xlabel="training MACs", ylabel=ylabel, title=title)
    ax.legend(fontsize=6)


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}")
    for r in rows:
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.items()))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_theta(rows: list[dict[str, Any]], ys: dict[str, str], reference: str, title: str):
    """Print the θ table and the exponents' and multipliers' rank correlations with ω, ψ, ν."""
    table = theta_table(rows, ys, reference)
    _print_rows(f"{title}: exponents b (y = a C^-b) and multipliers vs {reference}", table)
    for short in ys:
        for what in ("b", "mult"):  # the exponent, and the multiplier (y at fixed compute)
            key = f"b_{short}" if what == "b" else f"mult_{short}_x"
            pts = [t for t in table if t["group"] != reference and math.isfinite(t[key])]
            values = [t[key] for t in pts]
            corr = [_spearman(values, [t[x] for t in pts]) for x in ("omega", "psi", "nu")]
            print(f"Spearman({short} {what}; ω, ψ, ν) = " + ", ".join(f"{v:+.2f}" for v in corr))
            full = [t for t in pts if t["psi"] == 1]  # ω apart from ψ: every ω > 0 has ψ = 1
            rho = _spearman([t[key] for t in full], [t["omega"] for t in full])
            print(f"  at ψ = 1 ({len(full)} points): Spearman({short} {what}; ω) = {rho:+.2f}")
    return table


def _print_frontier(frontier: dict[str, Any]) -> None:
    for key, f in frontier.items():
        print(
            f"frontier {key}: {len(f['C'])} points, b={f['b']}, se={f['b_se']}, "
            f"best {min(f['err']):.4f}"
        )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sync"]:
        runs, argv = Path(argv[1]), argv[2:]
        results = Path(argv[0]) if argv else Path("results/einsum")
        sync(runs, results)
    results = Path(argv[0]) if argv else Path("results/einsum")
    fig_dir = Path(argv[1]) if len(argv) > 1 else Path("docs/figures")
    cifar_rows = collect_runs([results / "cifar10_theta"])
    table = report_theta(cifar_rows, CIFAR_Y, "dense_w0_p1_n1", "CIFAR-10 θ sweep")
    write_table(table, results / "cifar10_theta.csv", results / "cifar10_theta.json")
    cifar_frontier = frontier_by_omega(cifar_rows, Path.cwd())
    _print_frontier(cifar_frontier)
    gpt2_rows = collect_runs([results / "gpt2_theta"])
    table = report_theta(gpt2_rows, GPT2_Y, "dense", "GPT-2 θ sweep (validation loss)")
    write_table(table, results / "gpt2_theta.csv", results / "gpt2_theta.json")
    spread = seed_spread(gpt2_rows, "final_test_loss")
    write_table(spread, results / "gpt2_theta_seeds.csv", results / "gpt2_theta_seeds.json")
    _print_rows("GPT-2 θ sweep: validation loss per width over seeds", spread)
    gpt2_frontier = frontier_by_omega(gpt2_rows, Path.cwd(), metric="test_loss")
    _print_frontier(gpt2_frontier)
    moe_rows, moe_summary = moe_table(collect_runs([results / "gpt2_moe"]))
    write_table(moe_rows, results / "gpt2_moe.csv", results / "gpt2_moe.json")
    _print_rows("GPT-2 MoE comparison (per run)", moe_rows)
    _print_rows(
        "GPT-2 MoE fits (val loss = a C^-b) and multipliers vs dense",
        [{"group": g, **s} for g, s in moe_summary.items()],
    )
    paths = figures((cifar_rows, cifar_frontier), (gpt2_rows, gpt2_frontier), moe_rows, fig_dir)
    print("wrote", *paths)


if __name__ == "__main__":
    main(sys.argv[1:])
