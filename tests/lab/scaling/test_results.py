import csv
import json
import os
import time

import pytest
import yaml

from structlin_lab.scaling.results import COLUMNS, collect_runs, format_table, write_table


def _config(name, spec="dense", width=64, lr=3e-3, seed=0):
    return {
        "name": name,
        "task": "classification",
        "model": {"name": "mlp", "width": width, "base_width": 64, "depth": 3, "kwargs": {}},
        "structure": {"spec": spec},
        "data": {"name": "cifar10"},
        "optim": {"lr": lr},
        "train": {"seed": seed},
    }


def _metric(step, train_acc, test_acc, status="running", **extra):
    return {
        "step": step,
        "epoch": step / 10,
        "lr": 3e-3,
        "train_loss": 2.0 - train_acc,
        "train_acc": train_acc,
        "test_loss": 2.1 - test_acc,
        "test_acc": test_acc,
        "samples_per_s": 1000.0,
        "samples": step * 32,
        "forward_macs_per_example": 5000,
        "train_macs": 3 * 5000 * step * 32,
        "status": status,
        **extra,
    }


def _make_run(path, cfg, metrics=None, error=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if error is not None:
        (path / "error.txt").write_text(error)
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "sweep"
    _make_run(
        root / "dense_w64",
        _config("dense_w64", width=64),
        [_metric(10, 0.3, 0.35), _metric(20, 0.6, 0.5), _metric(30, 0.7, 0.45, "finished")],
    )
    _make_run(
        root / "btt" / "w128",  # nested deeper
        _config("btt_w128", spec="btt", width=128, lr=1e-2, seed=1),
        [_metric(10, 0.4, 0.4, params=12345)],
    )
    old = _make_run(
        root / "lowrank_old",
        _config("lowrank_old", spec="lowrank"),
        [_metric(10, 0.2, 0.2)],
    )
    t = time.time() - 10 * 3600
    os.utime(old / "metrics.jsonl", (t, t))
    _make_run(
        root / "failed",
        _config("failed"),
        [_metric(10, 0.2, 0.2)],
        error="TrainingDiverged: loss became nan at step 11\n",
    )
    _make_run(root / "empty", _config("empty"))
    naive = _config("naive_w64", spec="btt")
    naive["optim"]["lr_rule"] = "dense"
    _make_run(root / "naive_w64", naive, [_metric(10, 0.3, 0.3, "finished")])
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "notes.txt").write_text("hi")
    return root


def test_collect_runs(runs):
    rows = {r["name"]: r for r in collect_runs([runs])}
    assert set(rows) == {"dense_w64", "btt_w128", "lowrank_old", "failed", "empty", "naive_w64"}
    for r in rows.values():
        assert set(COLUMNS) <= set(r)

    d = rows["dense_w64"]
    assert d["status"] == "finished"
    assert (d["structure"], d["model"], d["width"], d["depth"]) == ("dense", "mlp", 64, 3)
    assert (d["lr"], d["seed"], d["steps"]) == (3e-3, 0, 30)
    assert d["params"] is None
    assert d["forward_macs_per_example"] == 5000
    assert d["train_macs"] == 3 * 5000 * 30 * 32
    assert d["final_train_error"] == pytest.approx(0.3)
    assert d["best_train_error"] == pytest.approx(0.3)
    assert d["final_test_error"] == pytest.approx(0.55)
    assert d["best_test_error"] == pytest.approx(0.5)
    assert d["final_test_loss"] == pytest.approx(2.1 - 0.45)
    assert d["best_test_loss"] == pytest.approx(2.1 - 0.5)
    assert d["wall_time_s"] is None
    assert d["error"] is None

    b = rows["btt_w128"]
    assert (b["structure"], b["width"], b["lr"], b["seed"]) == ("btt", 128, 1e-2, 1)
    assert d["lr_rule"] == b["lr_rule"] == "structure-aware"
    assert rows["naive_w64"]["lr_rule"] == "dense"
    assert b["params"] == 12345
    assert b["status"] == "running"

    assert rows["lowrank_old"]["status"] == "interrupted"
    assert rows["failed"]["status"] == "failed"
    assert "loss became nan" in rows["failed"]["error"]
    e = rows["empty"]
    assert e["status"] == "empty"
    assert e["final_test_error"] is None and e["train_macs"] is None


def test_collect_runs_single_run_dir_and_dedup(runs):
    one = collect_runs(runs / "dense_w64")
    assert [r["name"] for r in one] == ["dense_w64"]
    both = collect_runs([runs, runs / "btt"])
    assert len(both) == 6


def test_truncated_last_line_is_skipped(tmp_path):
    run = _make_run(tmp_path / "r", _config("r"), [_metric(10, 0.5, 0.5)])
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 20, "train_')
    (row,) = collect_runs([tmp_path])
    assert row["steps"] == 10
    assert row["final_train_error"] == pytest.approx(0.5)


def test_no_runs_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no training runs \(folders with config.yaml\) under"
    ):
        collect_runs([tmp_path / "a"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        collect_runs([tmp_path / "missing"])


def test_write_and_format_table(runs, tmp_path):
    rows = collect_runs([runs])
    out_csv, out_json = tmp_path / "out" / "runs.csv", tmp_path / "out" / "runs.json"
    write_table(rows, out_csv, out_json)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs.csv", "runs.json"]
    assert json.loads(out_json.read_text()) == rows
    with open(out_csv) as fh:
        read = list(csv.DictReader(fh))
    assert [r["name"] for r in read] == [r["name"] for r in rows]
    assert list(read[0]) == COLUMNS
    assert read[[r["name"] for r in rows].index("empty")]["train_macs"] == ""
    # overwrite in place
    write_table(rows[:1], out_csv, None)
    with open(out_csv) as fh:
        assert len(list(csv.DictReader(fh))) == 1

    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows) + 1
    assert lines[0].split()[:3] == ["name", "structure", "width"]
    assert "interrupted" in text and "failed" in text


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("btt_head_w128_lr1e-02_s0", "btt_head"),
        ("btt-rank2_w64_lr3.000e-03_s12", "btt-rank2"),
        ("dense_w64", "dense_w64"),  # not a sweep name: the name itself
    ],
)
def test_group_is_the_sweep_entry_prefix(tmp_path, name, group):
    _make_run(tmp_path / name, _config(name), [_metric(10, 0.5, 0.5, "finished")])
    (row,) = collect_runs([tmp_path])
    assert row["group"] == group
