"""Compressing a trained dense GPT-2 against training the structure from scratch.

The study behind docs/compression.md:

    python scripts/compression_study.py run --data ../shared/data/austen.txt.gz [--jobs 2]
    python scripts/compression_study.py report            # tables and figure from RESULTS

The study, in four kinds of job (each resumable: a finished job's JSON is never redone):

1. ``dense``: ``structlin train`` of the dense GPT-2 (``BASE_SETS``: Austen as characters).
2. ``compress``: for each structure and each target fraction of the linear layers' params
   (1/2 and 1/4), ``structlin_lab.compress.compress`` projects the trained model (``from_dense``),
   then fine-tunes it for ``FT_STEPS`` steps with the plain loss and, separately, with
   distillation from the dense logits. Validation loss after each.
3. ``scratch``: ``structlin train`` of the same structured model (same spec) from a fresh init,
   for as many steps as cost the same training MACs as the dense run plus the plain fine-tune.
4. ``report``: ``RESULTS/summary.{csv,json}`` and ``docs/figures/compression.{png,pdf}``.

Training compute is the trainer's convention: 3 x forward MACs (attention included) per
example seen. Distillation's extra teacher forwards are reported separately, not matched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/gpt2_austen-cpu.yaml"
DENSE_STEPS = 500
FT_STEPS = 100
FT_LRS = (3e-4,)  # more rates to try: the plain fine-tune tries each, distillation takes the best
BASE_SETS = [
    "data.tokenizer=char",
    "model.width=256",
    "data.batch_size=16",
    "data.eval_batches=20",
    "optim.warmup_steps=50",
    "train.eval_every=100",
    "train.progress=false",
    "train.seed=0",
]
STRUCTURES = ["btt", "monarch", "low_rank"]
FRACTIONS = [0.5, 0.25]


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _train(run_dir: Path, data: str, sets: list[str], log: Path) -> None:
    """``structlin train`` in a one-thread child process (two jobs share the two cores)."""
    cmd = [sys.executable, "-m", "structlin_lab", "train", CONFIG, "--out", str(run_dir)]
    cmd += ["--set", f"data.source={data}", *BASE_SETS, *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _model(spec: str) -> tuple[torch.nn.Module, Any]:
    """The study's GPT-2 with ``spec``, built as the trainer builds it, and its config."""
    from structlin_lab.train import load_config
    from structlin_lab.train.build import build_model, shapes_only

    cfg = load_config(ROOT / CONFIG, [*BASE_SETS, f"structure.spec={spec}"])
    return build_model(cfg, shapes_only(cfg, vocab=_vocab()), torch.device("cpu"))[0], cfg


def _spec_for(structure: str, fraction: float) -> tuple[str, float]:
    """The structure's size option giving ``fraction`` of the linear layers' params."""
    from structlin_lab.compress import densify, pick_size

    model, _ = _model("dense")
    densify(model)  # the dense baseline's layers are DenseLinear, as in a trained run
    return pick_size(model, structure, fraction, by="params")


def _vocab() -> int:
    from structlin_lab.data.text import prepare_text

    return prepare_text(os.environ["STUDY_DATA"], tokenizer="char").vocab_size


def _fwd_macs(spec: str) -> int:
    from structlin_lab.train.build import forward_macs

    model, cfg = _model(spec)
    return forward_macs(model, torch.zeros(1, cfg.data.block_size, dtype=torch.long))


# ------------------------------------------------------------------------------------- jobs
def job_dense(out: Path, results: Path, data: str) -> None:
    """Train the dense model (its run directory is the compression source)."""
    if (results / "dense.json").exists():
        return
    run = out / "dense"
    _train(
        run,
        data,
        [f"train.steps={DENSE_STEPS}", f"train.ckpt_every={DENSE_STEPS}"],
        out / "dense.log",
    )
    rows = _metrics(run)
    _atomic_json(
        results / "dense.json", {"curve": rows, "fwd_macs": rows[-1]["forward_macs_per_example"]}
    )


def _val_loss(model: torch.nn.Module, cfg: Any) -> float:
    from structlin_lab.train import build_task

    with torch.no_grad():
        return float(build_task(cfg, torch.device("cpu")).evaluate(model).loss)


def job_compress(out: Path, results: Path, structure: str, fraction: float) -> None:
    """Project the dense run onto ``structure`` at ``fraction`` of its linear params, then
    fine-tune (plain, and distilled); validation loss at each stage."""
    from structlin_lab.compress import FinetuneOptions, compress, load_source

    name = f"{structure}_{fraction:g}"
    path = results / f"compress_{name}.json"
    if path.exists():
        return
    torch.set_num_threads(1)
    src = load_source(out / "dense")
    cfg = src.config
    row: dict[str, Any] = {"structure": structure, "fraction": fraction, "ft_steps": FT_STEPS}
    for stage, ft in (
        ("projected", FinetuneOptions()),
        *((f"finetuned_lr{lr:g}", FinetuneOptions(steps=FT_STEPS, lr=lr)) for lr in FT_LRS),
        ("distilled", None),
    ):
        if ft is None:  # distil at the learning rate that fine-tuned best
            lr = min(FT_LRS, key=lambda v: row[f"finetuned_lr{v:g}"])
            ft = FinetuneOptions(steps=FT_STEPS, lr=lr, distill=True)
            row["distill_lr"], row["finetuned"] = lr, row[f"finetuned_lr{lr:g}"]
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = compress(src, None, structure, params=fraction, finetune_options=ft, log=None)
        row[stage] = _val_loss(res.model, cfg)
        row[f"{stage}_s"] = time.perf_counter() - t0
    row["spec"] = res.spec
    totals = res.report.totals()
    row["params_ratio"] = totals["params_after"] / totals["params_before"]
    row["macs_ratio"] = totals["macs_after"] / totals["macs_before"]
    row["rel_error"] = {r.name: r.error for r in res.report if r.error is not None}
    row["dense"] = _val_loss(src.model, cfg)
    row["fwd_macs"] = _fwd_macs(row["spec"])
    _atomic_json(path, row)


def job_dense_ft(out: Path, results: Path) -> None:
    """The control: the dense model fine-tuned exactly as the compressed ones are (projecting
    onto ``dense`` is exact), which separates what the extra steps give from what compression
    costs."""
    from structlin_lab.compress import FinetuneOptions, compress, load_source

    path = results / "dense_ft.json"
    if path.exists():
        return
    torch.set_num_threads(1)
    src = load_source(out / "dense")
    torch.manual_seed(0)
    ft = FinetuneOptions(steps=FT_STEPS, lr=FT_LRS[0])
    res = compress(src, None, "dense", finetune_options=ft, log=None)
    row = {"dense": _val_loss(src.model, src.config), "finetuned": _val_loss(res.model, src.config)}
    _atomic_json(path, {**row, "ft_steps": FT_STEPS, "lr": FT_LRS[0]})


def job_scratch(out: Path, results: Path, data: str, structure: str, fraction: float) -> None:
    """Train ``structure`` from scratch for the dense run's plus the fine-tune's compute."""
    name = f"{structure}_{fraction:g}"
    path = results / f"scratch_{name}.json"
    if path.exists():
        return
    spec, ratio = _spec_for(structure, fraction)
    dense_fwd = _fwd_macs("dense")
    fwd = _fwd_macs(spec)
    steps = FT_STEPS + math.ceil(DENSE_STEPS * dense_fwd / fwd)
    run = out / f"scratch_{name}"
    _train(
        run,
        data,
        [f"structure.spec={spec}", f"train.steps={steps}", "train.ckpt_every=0"],
        out / f"scratch_{name}.log",
    )
    _atomic_json(
        path,
        {
            "structure": structure,
            "fraction": fraction,
            "spec": spec,
            "params_ratio": ratio,
            "steps": steps,
            "fwd_macs": fwd,
            "curve": _metrics(run),
        },
    )


# ----------------------------------------------------------------------------------- report
def _train_macs(fwd: float, steps: float, batch: int) -> float:
    return 3.0 * fwd * steps * batch


def _rows(results: Path, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dense run and one row per (structure, fraction) with every loss and compute."""
    dense = json.loads((results / "dense.json").read_text())
    batch = _batch(dense)
    dense_c = dense["curve"][-1]["train_macs"]
    rows = []
    for f in FRACTIONS:
        for s in STRUCTURES:
            comp = json.loads((results / f"compress_{s}_{f:g}.json").read_text())
            scratch = _scratch(results, out, s, f)
            ft_c = _train_macs(comp["fwd_macs"], comp["ft_steps"], batch)
            best_ft = min(comp["finetuned"], comp["distilled"])
            last = scratch["curve"][-1] if scratch["curve"] else {}
            rows.append(
                {
                    **{
                        k: comp[k]
                        for k in (
                            "structure",
                            "fraction",
                            "spec",
                            "params_ratio",
                            "macs_ratio",
                            "dense",
                            "projected",
                            "finetuned",
                            "distilled",
                            "distill_lr",
                        )
                    },
                    "scratch": last.get("test_loss", math.nan),
                    "scratch_steps": scratch["steps"],
                    "scratch_done": scratch["done"],
                    "compress_macs": dense_c + ft_c,
                    "scratch_macs": last.get("train_macs", math.nan),
                    "max_rel_error": max(comp["rel_error"].values()),
                    "scratch_curve": [(r["train_macs"], r["test_loss"]) for r in scratch["curve"]],
                    "scratch_macs_to_match": _macs_to_reach(scratch["curve"], best_ft),
                }
            )
    return dense, rows


def _scratch(results: Path, out: Path, structure: str, fraction: float) -> dict[str, Any]:
    """A from-scratch run's record; for one still running (or stopped), its curve so far."""
    name = f"{structure}_{fraction:g}"
    path = results / f"scratch_{name}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "done": True}
    run = out / f"scratch_{name}"
    curve = _metrics(run) if (run / "metrics.jsonl").exists() else []
    return {"curve": curve, "steps": curve[-1]["step"] if curve else 0, "done": False}


def _macs_to_reach(curve: list[dict[str, Any]], loss: float) -> float | None:
    """The training MACs at which a from-scratch run's validation loss first reaches ``loss``
    (log-linear interpolation between evaluations); None if it never does. Mid-run points of a
    cosine schedule are pessimistic: a shorter run would have annealed by then."""
    prev = None
    for r in curve:
        c, l = r["train_macs"], r["test_loss"]
        if l <= loss:
            if prev is None:
                return c
            c0, l0 = prev
            t = (l0 - loss) / (l0 - l)
            return float(math.exp(math.log(c0) + t * (math.log(c) - math.log(c0))))
        prev = (c, l)
    return None


def _batch(dense: dict[str, Any]) -> int:
    last = dense["curve"][-1]
    return round(last["samples"] / last["step"])


def report(args: argparse.Namespace) -> None:
    """``summary.csv`` / ``summary.json`` in RESULTS and the figure in FIGURES."""
    results = Path(args.results)
    dense, rows = _rows(results, Path(args.out))
    keys = [k for k in rows[0] if k != "scratch_curve"]
    lines = [",".join(keys)] + [",".join(f"{r[k]}" for k in keys) for r in rows]
    tmp = results / "summary.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, results / "summary.csv")
    _atomic_json(results / "summary.json", {"dense": dense["curve"][-1], "rows": rows})
    control = _control(results)
    if control:
        print(f"control: dense {control['dense']:.4f}, dense fine-tuned {control['finetuned']:.4f}")
    for r in rows:
        print(
            f"{r['spec']:<18} params {r['params_ratio']:.3f}  projected {r['projected']:.4f}  "
            f"finetuned {r['finetuned']:.4f}  distilled {r['distilled']:.4f}  "
            f"scratch {r['scratch']:.4f}{'' if r['scratch_done'] else ' (unfinished)'}  "
            f"MACs: compress {r['compress_macs']:.3g}, scratch {r['scratch_macs']:.3g}, "
            f"scratch to match {r['scratch_macs_to_match'] or float('nan'):.3g}"
        )
    _figure(dense, rows, control, Path(args.figures))


def _control(results: Path) -> dict[str, Any] | None:
    path = results / "dense_ft.json"
    return json.loads(path.read_text()) if path.exists() else None


def _figure(dense: dict[str, Any], rows: list[dict[str, Any]], control: Any, figures: Path) -> None:
    """Left: validation loss against the fraction of linear params kept, per structure and
    stage. Right: validation loss against training compute (scratch curves, dense curve,
    compressed-and-fine-tuned points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(STRUCTURES, ("C0", "C1", "C2"), strict=True))
    marks = {"projected": "x", "finetuned": "o", "distilled": "s", "scratch": "^"}
    dense_loss = rows[0]["dense"]
    left.axhline(dense_loss, color="k", lw=1, ls="--", label="dense (trained)")
    if control:
        left.axhline(control["finetuned"], color="k", lw=1, ls=":", label="dense + fine-tune")
    for s in STRUCTURES:
        mine = sorted((r for r in rows if r["structure"] == s), key=lambda r: r["params_ratio"])
        x = [r["params_ratio"] for r in mine]
        for stage, mark in marks.items():
            left.plot(
                x,
                [r[stage] for r in mine],
                marker=mark,
                color=colours[s],
                ls="-" if stage != "projected" else ":",
                alpha=0.9,
                label=f"{s} {stage}",
            )
        for r in mine:
            right.plot([r["compress_macs"]], [r["finetuned"]], marker="o", color=colours[s])
            if r["scratch_curve"]:
                c, l = zip(*r["scratch_curve"], strict=True)
                solid = r["fraction"] < 0.4  # the 1/4 models solid, the 1/2 ones dashed
                right.plot(
                    c,
                    l,
                    color=colours[s],
                    ls="-" if solid else "--",
                    lw=1,
                    label=f"{s} {r['fraction']:g} from scratch",
                )
    c, l = zip(*[(r["train_macs"], r["test_loss"]) for r in dense["curve"]], strict=True)
    right.plot(c, l, color="k", lw=1.5, label="dense")
    left.set(
        xlabel="fraction of the linear layers' params kept",
        ylabel="validation loss",
        title="compressing the trained dense GPT-2",
        ylim=(None, dense_loss + 1.2),
    )
    right.set(
        xscale="log",
        xlabel="training MACs",
        ylabel="validation loss",
        title="from scratch (lines) vs compressed + fine-tuned (dots)",
        ylim=(min(r["scratch"] for r in rows) - 0.05, dense_loss + 0.9),
    )
    left.legend(fontsize=6, ncol=3)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(figures / f"compression.{ext}", dpi=130)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    """Dense and the scratch runs start at once; the compress jobs wait for the dense run."""
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["STUDY_DATA"] = args.data
    cases = [(s, f) for f in FRACTIONS for s in STRUCTURES]
    with ThreadPoolExecutor(args.jobs) as pool:
        dense = pool.submit(job_dense, out, results, args.data)
        scratch = [pool.submit(_child, "scratch", args, s, f) for s, f in cases]
        dense.result()
        comp = [pool.submit(_child, "compress", args, s, f) for s, f in cases]
        comp.append(pool.submit(_child, "control", args, "dense", 1.0))
        for fut in [*scratch, *comp]:
            fut.result()


def _child(kind: str, args: argparse.Namespace, structure: str, fraction: float) -> None:
    """One job in its own process, so that its one thread is its own."""
    cmd = [
        sys.executable,
        __file__,
        "one",
        kind,
        structure,
        str(fraction),
        "--data",
        args.data,
        "--out",
        args.out,
        "--results",
        args.results,
        "--dense-steps",
        str(DENSE_STEPS),
        "--ft-steps",
        str(FT_STEPS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = Path(args.out) / f"{kind}_{structure}_{fraction:g}.job.log"
    with log.open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)


def one(args: argparse.Namespace) -> None:
    os.environ["STUDY_DATA"] = args.data
    out, results = Path(args.out), Path(args.results)
    if args.kind == "control":
        job_dense_ft(out, results)
    elif args.kind == "compress":
        job_compress(out, results, args.structure, args.fraction)
    else:
        job_scratch(out, results, args.data, args.structure, args.fraction)


def main(argv: list[str] | None = None) -> None:
    global DENSE_STEPS, FT_STEPS  # one study: its sizes are set once per process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "one", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/compression", help="run directories")
        p.add_argument("--results", default="results/compression", help="study results")
        if name != "report":
            p.add_argument("--data", required=True, help="austen.txt.gz")
            p.add_argument("--dense-steps", type=int, default=DENSE_STEPS)
            p.add_argument("--ft-steps", type=int, default=FT_STEPS)
        if name == "run":
            p.add_argument("--jobs", type=int, default=2)
        if name == "one":
            p.add_argument("kind", choices=["compress", "scratch", "control"])
            p.add_argument("structure")
            p.add_argument("fraction", type=float)
        if name == "report":
            p.add_argument("--figures", default="docs/figures")
    args = parser.parse_args(argv)
    DENSE_STEPS = getattr(args, "dense_steps", DENSE_STEPS)
    FT_STEPS = getattr(args, "ft_steps", FT_STEPS)
    {"run": run, "one": one, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
