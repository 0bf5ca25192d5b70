"""Collect structlin training runs into one table (one row per run).

A run directory is any folder holding ``config.yaml`` (written by ``structlin_lab.train.Trainer``);
its ``metrics.jsonl`` has one JSON object per evaluation. A failed run may hold ``error.txt``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from structlin.io import atomic_write_text

COLUMNS = [
    "name",
    "path",
    "structure",
    "group",
    "model",
    "width",
    "depth",
    "lr",
    "lr_rule",
    "seed",
    "params",
    "forward_macs_per_example",
    "train_macs",
    "steps",
    "final_train_loss",
    "best_train_loss",
    "final_test_loss",
    "best_test_loss",
    "final_train_error",
    "best_train_error",
    "final_test_error",
    "best_test_error",
    "wall_time_s",
    "status",
    "error",
]

#: a run whose last row says "running" but whose metrics are older than this is "interrupted"
STALE_AFTER_S = 3600.0


def _find_run_dirs(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"no such directory: {d}")
        if (d / "config.yaml").is_file():
            found.append(d)
        found.extend(p.parent for p in d.rglob("config.yaml") if p.parent != d and p.is_file())
    # stable, de-duplicated order
    return sorted({p.resolve(): p for p in found}.values(), key=lambda p: str(p))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (empty if there is none). A truncated last line,
    left by a run killed while writing, is skipped."""
    return _read_metrics(Path(run_dir) / "metrics.jsonl")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # a truncated last line of a run killed while writing; skip it
                continue
    return rows


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for v in (_num(r.get(key)) for r in rows) if v is not None]


def _final(rows: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(rows):
        v = _num(r.get(key))
        if v is not None:
            return v
    return None


def _err(acc: float | None) -> float | None:
    return None if acc is None else 1.0 - acc


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


_SWEEP_NAME = re.compile(r"(.+)_w\d+_lr[^_]+_s-?\d+")


def _group(name: str) -> str:
    """A sweep run's entry prefix (``btt_head_w128_lr1e-02_s0`` -> ``btt_head``), else the name."""
    m = _SWEEP_NAME.fullmatch(name)
    return m.group(1) if m else name


def read_run(run_dir: str | os.PathLike, *, stale_after_s: float = STALE_AFTER_S) -> dict[str, Any]:
    """One table row for the run in ``run_dir`` (see ``COLUMNS``)."""
    import yaml

    run = Path(run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    metrics_path = run / "metrics.jsonl"
    rows = _read_metrics(metrics_path)
    last = rows[-1] if rows else {}

    error_text = None
    if (run / "error.txt").is_file():
        error_text = (run / "error.txt").read_text().strip()
        status = "failed"
    elif not rows:
        status = "empty"
    elif last.get("status") == "finished":
        status = "finished"
    else:
        age = time.time() - metrics_path.stat().st_mtime
        status = "running" if age < stale_after_s else "interrupted"

    train_acc = _series(rows, "train_acc")
    test_acc = _series(rows, "test_acc")
    train_loss = _series(rows, "train_loss")
    test_loss = _series(rows, "test_loss")
    wall = _final(rows, "wall_time_s")
    return {
        "name": cfg.get("name") or run.name,
        "path": str(run),
        "structure": _get(cfg, "structure", "spec") or "dense",
        "group": _group(cfg.get("name") or run.name),
        "model": _get(cfg, "model", "name"),
        "width": _get(cfg, "model", "width"),
        "depth": _get(cfg, "model", "depth"),
        "lr": _get(cfg, "optim", "lr"),
        "lr_rule": _get(cfg, "optim", "lr_rule") or "structure-aware",
        "seed": _get(cfg, "train", "seed"),
        "params": _final(rows, "params"),
        "forward_macs_per_example": _final(rows, "forward_macs_per_example"),
        "train_macs": _final(rows, "train_macs"),
        "steps": last.get("step"),
        "final_train_loss": _final(rows, "train_loss"),
        "best_train_loss": min(train_loss) if train_loss else None,
        "final_test_loss": _final(rows, "test_loss"),
        "best_test_loss": min(test_loss) if test_loss else None,
        "final_train_error": _err(_final(rows, "train_acc")),
        "best_train_error": _err(max(train_acc)) if train_acc else None,
        "final_test_error": _err(_final(rows, "test_acc")),
        "best_test_error": _err(max(test_acc)) if test_acc else None,
        "wall_time_s": wall,
        "status": status,
        "error": error_text,
    }


def collect_runs(
    dirs: Iterable[str | os.PathLike] | str | os.PathLike, *, stale_after_s: float = STALE_AFTER_S
) -> list[dict[str, Any]]:
    """Walk ``dirs`` recursively for run directories (folders with ``config.yaml``).

    Returns one row per run (keys ``COLUMNS``). Errors are ``1 - accuracy``; ``params`` and
    ``wall_time_s`` are None unless the metrics rows record them. ``status`` is ``failed`` (an
    ``error.txt`` exists; its text is in ``error``), ``empty`` (no metrics yet), ``finished``,
    ``running`` (the last row says running and metrics changed within ``stale_after_s``) or
    ``interrupted`` (it says running but is older).
    """
    if isinstance(dirs, str | os.PathLike):
        dirs = [dirs]
    dirs = list(dirs)
    run_dirs = _find_run_dirs(dirs)
    if not run_dirs:
        where = ", ".join(str(d) for d in dirs) or "(no directories given)"
        raise FileNotFoundError(f"no training runs (folders with config.yaml) under {where}")
    return [read_run(d, stale_after_s=stale_after_s) for d in run_dirs]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = [k for r in rows for k in r if k not in COLUMNS]
    return COLUMNS + list(dict.fromkeys(extra))


def write_table(
    rows: list[dict[str, Any]],
    path_csv: str | os.PathLike | None = None,
    path_json: str | os.PathLike | None = None,
) -> None:
    """Write ``rows`` as CSV and/or JSON (a list of objects), each atomically (temp + replace)."""
    if path_csv is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        atomic_write_text(path_csv, buf.getvalue())
    if path_json is not None:
        atomic_write_text(path_json, json.dumps(rows, indent=1) + "\n")


_SHOWN = [
    ("name", "name"),
    ("structure", "structure"),
    ("width", "width"),
    ("lr", "lr"),
    ("seed", "seed"),
    ("train_macs", "train_MACs"),
    ("final_train_error", "train_err"),
    ("final_test_error", "test_err"),
    ("best_test_error", "best_test_err"),
    ("status", "status"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the main columns, one line per run."""
    header = [h for _, h in _SHOWN]
    body = [[_cell(r.get(k)) for k, _ in _SHOWN] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    return "\n".join(lines)
