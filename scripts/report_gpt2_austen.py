"""Tables, fits and figures of the GPT-2-on-Austen study (docs/results-lm.md).

    python scripts/report_gpt2_austen.py [RESULTS_DIR] [FIGURES_DIR]

RESULTS_DIR (default results/gpt2_austen) holds the run folders lr_tune/, scaling/,
wn_stability/ and optionally wn_dense_cpu/ (the dense reference run on the CPU) and
wn_mechanism/ (metrics.jsonl and config.yaml per run, as scripts/gpt2_austen_study.sh leaves
them). Writes one CSV and JSON table per study next to
them, the figures (PNG and PDF) into FIGURES_DIR (default docs/figures), and prints the fits,
multipliers and the stability table.

Compute is training MACs (3x forward, the trainer's convention) either in total or without the
output head ("non-embedding", the paper's x axis for GPT-2): 3 * macs_per_token(non_embedding)
* tokens seen.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from structlin_lab.scaling import (
    collect_runs,
    compute_multipliers,
    fit_by_structure,
    points_by_structure,
    read_metrics,
    write_table,
)
from structlin_lab.scaling.plots import plot_curves, plot_scaling
from structlin_lab.train import load_config
from structlin_lab.train.build import build_model, shapes_only


def nonemb_macs_per_token(run_dir: Path) -> int:
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model, _ = build_model(cfg, shapes_only(cfg), torch.device("meta"))
    return model.macs_per_token(non_embedding=True)


def collect(study_dir: Path) -> list[dict]:
    rows = collect_runs([study_dir])
    for r in rows:
        last = read_metrics(r["path"])[-1]
        cfg = load_config(Path(r["path"]) / "config.yaml")
        tokens = last["samples"] * cfg.data.block_size
        r["tokens"] = tokens
        r["train_macs_nonemb"] = 3 * nonemb_macs_per_token(Path(r["path"])) * tokens
        r["path"] = str(Path(r["path"]).relative_to(study_dir.parent.parent.parent))
    write_table(rows, study_dir.with_suffix(".csv"), study_dir.with_suffix(".json"))
    return rows


def fits_report(rows: list[dict], x: str) -> None:
    print(f"\n## fits of final val loss vs {x} (per sweep entry)")
    fits = fit_by_structure(rows, x=x, y="final_test_loss", by="group")
    pts = points_by_structure(rows, x, "final_test_loss", by="group")
    for g, f in fits.items():
        C, L = pts[g]
        print(
            f"{g:10s} b={f.b:.4f} ± {f.b_stderr:.4f}  a={f.a:.3g}  R2={f.r2:.2f}  n={f.n}  "
            f"C {C.min():.3g}..{C.max():.3g} ({C.max() / C.min():.1f}x)  "
            f"loss {L.max():.3f}..{L.min():.3f}"
        )
    target, mults = compute_multipliers(rows, x=x, y="final_test_loss", by="group", n_boot=2000)
    print(f"dense fit at its largest compute {pts['dense'][0].max():.3g}: loss {target:.3f}")
    for g, (m, lo, hi) in mults.items():
        ci = f"{lo:.2f}-{hi:.2f}" if hi < 1e3 else f"{lo:.2g} to >1000: undetermined"
        print(f"compute multiplier {g} vs dense at loss {target:.3f}: {m:.2f}x (95% {ci})")


# Every run logs these; 240 and 360 are where the first, cut-short GPU lease can be compared.
COMPARE_STEPS = (240, 360, 400)


def stability_report(studies: list[tuple[Path, str]], figures: Path) -> None:
    """``studies``: (run folder, device tag) pairs, e.g. the GPU runs of wn_stability/ and the
    CPU dense reference of wn_dense_cpu/; a non-empty tag is appended to the group name."""
    print("\n## weight-norm stability (spike = largest rise of the train loss above its running")
    print("## minimum after warm-up; a NaN or a failed run counts as diverged; val@S = the")
    print("## validation loss at step S)")
    # (group, lr) -> [(the run's line, its val loss by step)]
    groups: dict[tuple[str, float], list[tuple[str, dict[int, float]]]] = defaultdict(list)
    curves = []
    for study_dir, tag in studies:
        for r in sorted(collect_runs([study_dir]), key=lambda r: r["name"]):
            rows = read_metrics(r["path"])
            group = r["group"] + (f"-{tag}" if tag else "")
            losses = [m["train_loss"] for m in rows if m["step"] > 40]
            finite = all(math.isfinite(v) for v in losses)
            diverged = r["status"] == "failed" or not finite
            spike = max((v - min(losses[: i + 1]) for i, v in enumerate(losses)), default=0.0)
            # Largest stored-factor RMS over its init std (runs from before it was logged lack it).
            growth = max((m["factor_rms_max"] for m in rows if "factor_rms_max" in m), default=None)
            val_at = {m["step"]: m["test_loss"] for m in rows if m.get("test_loss") is not None}
            vals = ", ".join(f"val@{s} {val_at[s]:.3f}" for s in COMPARE_STEPS if s in val_at)
            line = (
                f"s{r['seed']}: steps {r['steps']}, final train {r['final_train_loss']:.3f}, "
                f"spike {spike:.3f}, {vals}"
                f"{'' if growth is None else f', factor rms/init max {growth:.2f}'}"
                f"{', DIVERGED' if diverged else ''}{'' if r['status'] == 'finished' else ' (cut)'}"
            )
            groups[(group, r["lr"])].append((line, val_at))
            curves.append((f"{group} lr={r['lr']:g} s{r['seed']}", rows))
    for (g, lr), runs in sorted(groups.items()):
        at = {s: [v[s] for _, v in runs if s in v] for s in COMPARE_STEPS}
        means = ", ".join(f"val@{s} {sum(v) / len(v):.3f} (n={len(v)})" for s, v in at.items() if v)
        print(f"{g:11s} lr={lr:g}  mean {means}")
        for line, _ in runs:
            print(f"    {line}")
    paths = plot_curves(
        curves,
        figures / "gpt2_austen_wn_curves",
        panel=lambda label: label.split()[1],
        colour=lambda label: label.split()[0],
        title="GPT-2 on Austen: BTT with/without weight norm at high LR (^ = off the chart)",
        # Dense at 100x the tuned LR spikes to ~85 nats; a free axis would flatten the rest.
        ylim=(4.5, 11.0),
    )
    print("wrote", *paths)


def mechanism_report(study_dir: Path, figures: Path) -> None:
    """Core growth with and without weight norm (the CPU study wn_mechanism/): per run, the
    largest stored-factor RMS over its μP init std at a few steps, and the final losses."""
    print("\n## core growth (factor_rms_max = largest stored-factor RMS / μP init std;")
    print("## mean = the average over all factors), BTT rank 4, width 256")
    curves = []
    for r in sorted(collect_runs([study_dir]), key=lambda r: (r["lr"], r["name"])):
        rows = read_metrics(r["path"])
        at = {m["step"]: m for m in rows}
        growth = "  ".join(
            f"@{s}: {at[s]['factor_rms_max']:.1f}/{at[s]['factor_rms_mean']:.1f}"
            for s in (10, 20, 50, 100)
            if s in at
        )
        print(
            f"{r['group']:11s} lr={r['lr']:g} s{r['seed']}: {growth}  "
            f"final train {r['final_train_loss']:.3f} "
            f"val {r['final_test_loss']:.3f}{', DIVERGED' if r['status'] == 'failed' else ''}"
        )
        curves.append((f"{r['group']} lr={r['lr']:g} s{r['seed']}", rows))
    paths = plot_curves(
        curves,
        figures / "gpt2_austen_wn_growth",
        y="factor_rms_max",
        panel=lambda label: label.split()[1],
        colour=lambda label: label.split()[0],
        title="GPT-2, BTT width 256: largest stored core RMS over its init std",
    )
    print("wrote", *paths)


def main(argv: list[str]) -> None:
    results = Path(argv[1] if len(argv) > 1 else "results/gpt2_austen")
    figures = Path(argv[2] if len(argv) > 2 else "docs/figures")
    tune = collect(results / "lr_tune")
    print("## learning-rate tuning (dense, width 128)")
    for r in sorted(tune, key=lambda r: r["lr"]):
        print(f"lr={r['lr']:g}: final val loss {r['final_test_loss']:.3f}")
    rows = collect(results / "scaling")
    print("\n## scaling runs")
    for r in sorted(rows, key=lambda r: (r["group"], r["width"])):
        print(
            f"{r['group']:9s} w={r['width']:5d} params={r['params'] or 0:>11,} "
            f"C={r['train_macs']:.3g} C_nonemb={r['train_macs_nonemb']:.3g} "
            f"val={r['final_test_loss']:.3f} train={r['final_train_loss']:.3f} {r['status']}"
        )
    for x in ("train_macs", "train_macs_nonemb"):
        fits_report(rows, x)
        suffix = "" if x == "train_macs" else "_nonemb"
        paths = plot_scaling(
            rows, figures / f"gpt2_austen_scaling{suffix}", x=x, y="final_test_loss", by="group"
        )
        print("wrote", *paths)
    studies = [(results / "wn_stability", "")]
    if (results / "wn_dense_cpu").is_dir():  # the dense reference, finished on the CPU
        studies.append((results / "wn_dense_cpu", "cpu"))
    for study_dir, _ in studies:
        collect(study_dir)
    stability_report(studies, figures)
    if (results / "wn_mechanism").is_dir():
        collect(results / "wn_mechanism")
        mechanism_report(results / "wn_mechanism", figures)


if __name__ == "__main__":
    main(sys.argv)
