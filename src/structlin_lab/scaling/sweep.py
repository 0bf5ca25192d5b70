"""Sweep runner: train a grid of (structure, width, lr, seed) runs from one base config.

A sweep spec is a small YAML file::

    base: ../cifar10_mlp-cpu.yaml          # training config, relative to this file
    set: [train.epochs=2]                  # overrides common to every run
    grid:
      structures:
        - {spec: dense, widths: [32, 64, 128]}
        - {spec: "btt:rank=1", widths: [64, 256, 1024], set: [optim.clip=1.0]}
      lrs: [3e-3]                          # optional; default: the base config's optim.lr
      seeds: [0]                           # optional; default [0]
    out: ../../runs/my_sweep               # relative to this file unless absolute

``load_sweep`` validates it (before anything trains), ``expand`` lists the runs, ``dry_run``
prints them with their forward MACs and parameters, ``run_sweep`` trains them locally (skipping
finished runs, resuming interrupted ones, N at a time) and ``submit_slurm`` submits them as a
``submitit`` job array. Every run goes to ``out/<run name>`` with the usual Trainer files.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from structlin.options import suggest

__all__ = [
    "RunSpec",
    "Sweep",
    "SweepStructure",
    "dry_run",
    "expand",
    "load_sweep",
    "run_one",
    "run_state",
    "run_sweep",
    "select",
    "submit_slurm",
]

_TOP_KEYS = ["base", "set", "grid", "out"]
_GRID_KEYS = ["structures", "lrs", "seeds"]
_ENTRY_KEYS = ["spec", "widths", "set", "name", "lrs"]


@dataclass
class SweepStructure:
    """One ``grid.structures`` entry."""

    spec: str
    widths: list[int]
    set: list[str] = field(default_factory=list)
    name: str | None = None  # run-name prefix; default: the structure name
    lrs: list[float] | None = None  # this entry's learning rates; default: grid.lrs


@dataclass
class Sweep:
    """A validated sweep spec (all paths resolved)."""

    base: Path
    out: Path
    structures: list[SweepStructure]
    lrs: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)
    path: Path | None = None
    only: list[str] = field(default_factory=list)  # run-name patterns; empty: every run


@dataclass
class RunSpec:
    """One training run of a sweep; everything the (picklable) per-run function needs."""

    name: str
    out_dir: str
    base: str
    overrides: list[str]
    structure: str
    width: int
    lr: float
    seed: int


# --------------------------------------------------------------------------- loading
def _check_keys(data: dict, valid: list[str], where: str) -> None:
    for key in data:
        if key not in valid:
            raise ValueError(
                f"{where}: unknown key {key!r}{suggest(key, valid)} (valid keys: "
                f"{', '.join(valid)})"
            )


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of 'key=value' strings, got {value!r}")
    for v in value:
        if "=" not in v:
            raise ValueError(f"{where}: expected 'key=value', got {v!r}")
    return list(value)


def _check_structure(entry: SweepStructure, where: str) -> None:
    from structlin import get_structure, make_linear, parse_spec, structure_options
    from structlin.options import check_options

    label = f"{where} (spec {entry.spec!r})"
    try:
        name, options = parse_spec(entry.spec)
        cls = get_structure(name)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    check_options(f"{label}: structure {name!r}", options, structure_options(cls))
    if not isinstance(entry.widths, list) or not entry.widths:
        raise ValueError(f"{label}: 'widths' must be a non-empty list of positive integers")
    for w in entry.widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"{label}: widths must be positive integers, got {w!r}")
    for w in entry.widths:
        for shape in ((w, 4 * w), (w, w)):
            try:
                make_linear(entry.spec, *shape, device="meta")
            except Exception as e:
                raise ValueError(
                    f"{label}: structure {name!r} cannot be built at width {w} "
                    f"({shape[0]} -> {shape[1]}): {e}"
                ) from None


def load_sweep(path: str | Path, extra_set: list[str] | None = None) -> Sweep:
    """Read and validate a sweep spec. Errors name the offending key or structure entry.

    ``extra_set`` is appended to the spec's top-level ``set`` (the CLI's ``--set``), for
    machine-specific overrides such as ``data.source=...`` that do not belong in the spec.
    """
    import yaml

    from ..train.config import load_config

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep spec {p} does not exist")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a sweep spec must contain a mapping at the top level")
    _check_keys(data, _TOP_KEYS, str(p))
    for key in ("base", "grid", "out"):
        if key not in data:
            raise ValueError(f"{p}: missing required key {key!r}")
    here = p.resolve().parent
    base = Path(data["base"])
    base = base if base.is_absolute() else here / base
    if not base.is_file():
        raise FileNotFoundError(f"{p}: base config {base} does not exist")
    out = Path(data["out"])
    out = (out if out.is_absolute() else here / out).resolve()
    common = _str_list(data.get("set"), f"{p}: set") + list(extra_set or [])
    try:
        cfg = load_config(base, common)
    except ValueError as e:
        raise ValueError(f"{p}: base config {base} with set {common}: {e}") from None

    grid = data["grid"]
    if not isinstance(grid, dict):
        raise ValueError(f"{p}: 'grid' must be a mapping")
    _check_keys(grid, _GRID_KEYS, f"{p}: grid")
    raw = grid.get("structures")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{p}: grid.structures must be a non-empty list")
    structures = []
    for i, item in enumerate(raw):
        where = f"{p}: grid.structures[{i}]"
        if not isinstance(item, dict) or "spec" not in item or "widths" not in item:
            raise ValueError(f"{where}: expected a mapping with 'spec' and 'widths', got {item!r}")
        _check_keys(item, _ENTRY_KEYS, where)
        entry = SweepStructure(
            spec=str(item["spec"]),
            widths=item["widths"],
            set=_str_list(item.get("set"), f"{where}: set"),
            name=item.get("name"),
            lrs=None if item.get("lrs") is None else _parse_lrs(item["lrs"], f"{where}: lrs"),
        )
        _check_structure(entry, where)
        if entry.set:
            try:
                load_config(base, common + entry.set)
            except ValueError as e:
                raise ValueError(f"{where} (spec {entry.spec!r}): set {entry.set}: {e}") from None
        structures.append(entry)

    lrs = grid.get("lrs")
    parsed = [cfg.optim.lr] if lrs is None else _parse_lrs(lrs, f"{p}: grid.lrs")
    seeds = grid.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{p}: grid.seeds must be a non-empty list of integers")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"{p}: grid.seeds: expected integers, got {s!r}")
    sweep = Sweep(base, out, structures, parsed, list(seeds), common, p)
    expand(sweep)  # raises on duplicate run names
    return sweep


def _parse_lrs(lrs: Any, where: str) -> list[float]:
    if not isinstance(lrs, list) or not lrs:
        raise ValueError(f"{where} must be a non-empty list of numbers, got {lrs!r}")
    parsed = []
    for lr in lrs:
        try:
            value = float(lr)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {lr!r}") from None
        if isinstance(lr, bool) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{where}: learning rates must be positive, got {lr!r}")
        parsed.append(value)
    return parsed


# --------------------------------------------------------------------------- expansion
def _lr_tag(lr: float) -> str:
    short = f"{lr:.0e}"
    return short if float(short) == lr else f"{lr:.3e}"


def _prefixes(sweep: Sweep) -> list[str]:
    from structlin import parse_spec

    names = [parse_spec(e.spec)[0] for e in sweep.structures]
    out = []
    for entry, name in zip(sweep.structures, names, strict=True):
        if entry.name:
            out.append(str(entry.name))
        elif names.count(name) > 1:  # e.g. two btt ranks: spell the options out
            opts = parse_spec(entry.spec)[1]
            out.append(name + "".join(f"-{k}{v}" for k, v in opts.items()).replace(" ", ""))
        else:
            out.append(name)
    return out


def select(sweep: Sweep, patterns: list[str]) -> Sweep:
    """``sweep`` restricted to the runs whose names match any of ``patterns`` (shell-style, as in
    ``fnmatch``: ``'dense_*'``, ``'*_lr3e-02_s0'``), e.g. to run the most-needed runs of a long
    sweep first. Raises ``ValueError``, listing the run names, if a pattern matches no run."""
    names = [r.name for r in expand(replace(sweep, only=[]))]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.5)
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(
                f"--only {pat!r} matches none of the {len(names)} runs of "
                f"{sweep.path or 'this sweep'} ({shown}){hint}; patterns are shell-style "
                f"(fnmatch), e.g. '*_s0'"
            )
    return replace(sweep, only=list(patterns))


def expand(sweep: Sweep) -> list[RunSpec]:
    """Every run of the grid, in order: structure, width, lr, seed (only those matching
    ``sweep.only`` when it is set; see ``select``)."""
    runs = []
    for entry, prefix in zip(sweep.structures, _prefixes(sweep), strict=True):
        for width in entry.widths:
            for lr in entry.lrs or sweep.lrs:
                for seed in sweep.seeds:
                    name = f"{prefix}_w{width}_lr{_lr_tag(lr)}_s{seed}"
                    overrides = [
                        *sweep.set,
                        *entry.set,
                        f"structure.spec={json.dumps(entry.spec)}",
                        f"model.width={width}",
                        f"optim.lr={lr!r}",
                        f"train.seed={seed}",
                        f"name={json.dumps(name)}",
                    ]
                    runs.append(
                        RunSpec(
                            name=name,
                            out_dir=str(sweep.out / name),
                            base=str(sweep.base),
                            overrides=overrides,
                            structure=entry.spec,
                            width=width,
                            lr=lr,
                            seed=seed,
                        )
                    )
    seen: set[str] = set()
    for r in runs:
        if r.name in seen:
            raise ValueError(
                f"two runs are both named {r.name!r}; give the structure entries distinct "
                f"'name' keys"
            )
        seen.add(r.name)
    if sweep.only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in sweep.only)]
    return runs


# --------------------------------------------------------------------------- dry run
def _linear_macs_params(model: Any) -> tuple[int, int]:
    import torch

    from structlin import StructuredLinear

    macs = params = 0
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            macs += m.macs()
            params += sum(p.numel() for p in m.parameters())
        elif isinstance(m, torch.nn.Linear):
            macs += m.in_features * m.out_features
            params += sum(p.numel() for p in m.parameters())
    return macs, params


def measure(run: RunSpec) -> dict[str, Any]:
    """Forward MACs per example and parameters of ``run``'s model, built on ``meta``.

    For the MLP these are the whole model's (its MACs are all in linear layers). For GPT-2 with
    the GPT-2 BPE (vocabulary 50257, known without reading the text) an example is one sequence
    of ``block_size`` tokens, as the trainer counts it (``macs_per_token() * block_size``), and
    params are all parameters. For other models only the linear layers' parameters are reported
    (``macs`` is None)."""
    import torch

    from ..train.build import build_model, shapes_only
    from ..train.config import load_config

    cfg = load_config(run.base, run.overrides)
    data = shapes_only(cfg)
    if data is None or (cfg.task == "lm" and cfg.model.name != "gpt2"):
        return {"macs": None, "params": None}  # e.g. a char vocabulary depends on the text
    with torch.device("meta"):
        model, _ = build_model(cfg, data, torch.device("meta"))
    if cfg.task == "lm":
        return {
            "macs": model.macs_per_token() * cfg.data.block_size,
            "params": model.num_params(non_embedding=False),
        }
    macs, linear_params = _linear_macs_params(model)
    if cfg.model.name == "mlp":
        return {"macs": macs, "params": sum(p.numel() for p in model.parameters())}
    return {"macs": None, "params": linear_params}


def _fmt_num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def dry_run(sweep: Sweep) -> str:
    """A table of every run with its MACs per example, parameters and current state."""
    runs = expand(sweep)
    rows = [("run", "structure", "width", "lr", "seed", "MACs/ex", "params", "state")]
    for r in runs:
        m = measure(r)
        rows.append(
            (
                r.name,
                r.structure,
                str(r.width),
                f"{r.lr:g}",
                str(r.seed),
                _fmt_num(m["macs"]),
                _fmt_num(m["params"]),
                run_state(r.out_dir),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(runs)} runs -> {sweep.out}")
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- running
def run_state(out_dir: str | Path) -> str:
    """``"finished"`` (last metrics row says so), ``"interrupted"`` (a checkpoint exists),
    ``"failed"`` (error.txt, no checkpoint) or ``"new"``."""
    out = Path(out_dir)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                if json.loads(lines[-1]).get("status") == "finished":
                    return "finished"
            except json.JSONDecodeError:
                pass
    if (out / "checkpoints" / "last.pt").is_file():
        return "interrupted"
    if (out / "error.txt").is_file():
        return "failed"
    return "new"


def _result(run: RunSpec, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": run.name,
        "out_dir": run.out_dir,
        "structure": run.structure,
        "width": run.width,
        "lr": run.lr,
        "seed": run.seed,
        "status": status,
        **extra,
    }


def run_one(
    run: RunSpec,
    threads: int | None = None,
    progress: bool | None = None,
    tune_malloc: bool = False,
) -> dict:
    """Train one run (top-level, so picklable for process pools and submitit).

    Skips a finished run, resumes an interrupted one, and on failure writes the traceback to
    ``RUN/error.txt`` and returns ``status="failed"`` instead of raising. ``tune_malloc=True``
    applies :func:`structlin_lab.malloc.tune_malloc` to this process first (process-wide, so
    only for processes the caller owns, such as the CLI's and the sweep's workers)."""
    import torch

    from ..train import Trainer, load_config

    if tune_malloc:
        from ..malloc import tune_malloc as _tune_malloc

        _tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    out = Path(run.out_dir)
    state = run_state(out)
    if state == "finished":
        return _result(run, "skipped")
    resume = state == "interrupted"
    try:
        cfg = load_config(run.base, run.overrides)
        if progress is not None:
            cfg.train.progress = progress  # not part of the config hash: resume still works
        trainer = Trainer(
            cfg,
            out,
            resume=resume,
            overwrite=not resume,
            log=lambda msg: print(f"[{run.name}] {msg}", flush=True),
        )
        row = trainer.fit()
    except Exception:
        out.mkdir(parents=True, exist_ok=True)
        tb = traceback.format_exc()
        (out / "error.txt").write_text(tb)
        return _result(run, "failed", resumed=resume, error=tb.strip().splitlines()[-1])
    (out / "error.txt").unlink(missing_ok=True)
    return _result(
        run,
        row.get("status", "finished"),
        resumed=resume,
        test_acc=row.get("test_acc"),
        test_loss=row.get("test_loss"),
        step=row.get("step"),
    )


def stop_with_parent(parent_pid: int, poll_s: float = 1.0) -> threading.Thread:
    """Watch, in a daemon thread, for this process's parent ``parent_pid`` to go away (killed,
    crashed: the process is then re-parented) and send this process SIGTERM when it does, so
    that a sweep worker stops its run as on a user's SIGTERM (the trainer checkpoints and
    exits) instead of training on as an orphan that a restarted sweep would race with."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="stop-with-parent", daemon=True)
    thread.start()
    return thread


def _run_in_worker(parent_pid: int, run: RunSpec, threads: int, tune_malloc: bool) -> dict:
    """``run_one`` in a pool worker that stops when the sweep process dies."""
    stop_with_parent(parent_pid)
    return run_one(run, threads, False, tune_malloc)


def run_sweep(
    sweep: Sweep,
    *,
    jobs: int = 1,
    threads_per_job: int | None = None,
    log: Callable[[str], None] | None = print,
    tune_malloc: bool = False,
) -> list[dict]:
    """Train every run of ``sweep``: ``jobs`` at a time in spawned processes (in this process
    when ``jobs == 1``). Returns one status dict per run, in ``expand`` order: ``status`` is
    ``"skipped"`` (already finished), ``"finished"``, ``"interrupted"`` or ``"failed"``.
    ``tune_malloc`` is passed to ``run_one`` (it then changes this process's allocator when
    ``jobs == 1``)."""
    import torch

    if jobs < 1 or (threads_per_job is not None and threads_per_job < 1):
        raise ValueError(
            f"run_sweep needs jobs >= 1 and threads_per_job >= 1 (or None), got jobs={jobs}, "
            f"threads_per_job={threads_per_job}"
        )
    say = log or (lambda _msg: None)
    runs = expand(sweep)
    results: dict[str, dict] = {}
    todo = []
    for r in runs:
        if run_state(r.out_dir) == "finished":
            results[r.name] = _result(r, "skipped")
            say(f"skip {r.name} (finished)")
        else:
            todo.append(r)
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs <= 1:
        before = torch.get_num_threads()
        try:
            for r in todo:
                say(f"start {r.name}")
                results[r.name] = res = run_one(r, threads, tune_malloc=tune_malloc)
                say(f"{res['status']} {r.name}")
        finally:
            torch.set_num_threads(before)
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            me = os.getpid()
            futures = {pool.submit(_run_in_worker, me, r, threads, tune_malloc): r for r in todo}
            say(f"started {len(todo)} runs, {jobs} at a time, {threads} threads each")
            for fut in as_completed(futures):
                r = futures[fut]
                try:
                    res = fut.result()
                except Exception:
                    out = Path(r.out_dir)
                    out.mkdir(parents=True, exist_ok=True)
                    tb = traceback.format_exc()
                    (out / "error.txt").write_text(tb)
                    res = _result(r, "failed", error=tb.strip().splitlines()[-1])
                results[r.name] = res
                say(f"{res['status']} {r.name}")
    return [results[r.name] for r in runs]


def submit_slurm(
    sweep: Sweep,
    *,
    partition: str | None = None,
    timeout_min: int = 24 * 60,
    gpus_per_job: int = 1,
    cpus_per_job: int | None = None,
    folder: str | Path | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Submit the unfinished runs as one SLURM job array (``submitit``); returns the jobs.

    ``kwargs`` go to ``AutoExecutor.update_parameters`` (e.g. ``slurm_mem="32G"``). A job that
    is preempted and requeued resumes from its checkpoint."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError("submit_slurm needs submitit: pip install submitit") from e
    runs = [r for r in expand(sweep) if run_state(r.out_dir) != "finished"]
    if not runs:
        return []
    executor = submitit.AutoExecutor(folder=str(folder or sweep.out / "_slurm" / "%j"))
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "gpus_per_node": gpus_per_job,
        "nodes": 1,
        "tasks_per_node": 1,
        "name": sweep.out.name,
    }
    if partition:
        params["slurm_partition"] = partition
    if cpus_per_job:
        params["cpus_per_task"] = cpus_per_job
    params.update(kwargs)
    executor.update_parameters(**params)
    return executor.map_array(run_one, runs)
