"""Tests for the sweep runner (tiny fake CIFAR-10, a few steps per run)."""

import dataclasses
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from structlin_lab.scaling import sweep as sw

REPO = Path(__file__).resolve().parents[3]


BASE = """\
name: t
model: {name: mlp, width: 32, base_width: 16, depth: 1}
data: {batch_size: 32, eval_batch_size: 50, augment: false, mixup: 0.0}
optim: {lr: 3.0e-3}
train: {steps: 2, eval_every: 1, ckpt_every: 1, progress: false}
"""

STRUCTS = """\
    - {spec: dense, widths: [16, 32]}
    - {spec: "btt:rank=1", widths: [16, 32]}
"""


def write_spec(tmp_path, structures=STRUCTS, extra="", data=None, top=""):
    (tmp_path / "base.yaml").write_text(BASE)
    sets = [f"data.source={data}", f"data.root={tmp_path / 'cache'}"] if data else []
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"base: base.yaml\nset: {sets!r}\n{top}grid:\n  structures:\n{structures}{extra}out: runs\n"
    )
    return spec


# --------------------------------------------------------------------------- validation
def test_load_and_defaults(tmp_path):
    s = sw.load_sweep(write_spec(tmp_path))
    assert s.lrs == [3e-3] and s.seeds == [0]
    assert s.out == (tmp_path / "runs").resolve()
    assert s.base == tmp_path / "base.yaml"


@pytest.mark.parametrize(
    ("structures", "top", "match"),
    [
        (STRUCTS, "grdi: 1\n", "'grdi'.*did you mean 'grid'"),
        ("    - {spec: bttt, widths: [16]}\n", "", r"structures\[0\].*bttt.*unknown structure"),
        (
            "    - {spec: dense, widths: [16]}\n    - {spec: 'btt:rnak=1', widths: [16]}\n",
            "",
            r"structures\[1\].*rnak",
        ),
        ("    - {spec: dense, widths: [16, -3]}\n", "", r"structures\[0\].*positive.*-3"),
        ("    - {spec: dense, widths: [16.5]}\n", "", r"positive integers"),
        ("    - {spec: 'monarch:blocks=64', widths: [16]}\n", "", r"'monarch'.*width 16"),
        ("    - {spec: dense, widths: [16], sett: []}\n", "", r"structures\[0\].*'sett'"),
        ("    - {spec: dense, widths: [16], set: [model.widht=3]}\n", "", r"structures\[0\]"),
    ],
)
def test_validation_errors_name_the_entry(tmp_path, structures, top, match):
    with pytest.raises(ValueError, match=match):
        sw.load_sweep(write_spec(tmp_path, structures, top=top))


def test_duplicate_structure_names_get_options_in_run_names(tmp_path):
    structs = "    - {spec: 'btt:rank=1', widths: [16]}\n    - {spec: 'btt:rank=2', widths: [16]}\n"
    names = [r.name for r in sw.expand(sw.load_sweep(write_spec(tmp_path, structs)))]
    assert names == ["btt-rank1_w16_lr3e-03_s0", "btt-rank2_w16_lr3e-03_s0"]


def test_entry_lrs_and_extra_set(tmp_path):
    structs = (
        "    - {spec: dense, widths: [16]}\n"
        "    - {spec: 'btt:rank=1', name: naive, widths: [16], lrs: [1e-2, 3e-2],"
        " set: [optim.lr_rule=dense]}\n"
    )
    s = sw.load_sweep(write_spec(tmp_path, structs), extra_set=["optim.clip=0.5"])
    runs = sw.expand(s)
    assert [r.name for r in runs] == [
        "dense_w16_lr3e-03_s0",
        "naive_w16_lr1e-02_s0",
        "naive_w16_lr3e-02_s0",
    ]
    from structlin_lab.train import load_config

    cfgs = [load_config(r.base, r.overrides) for r in runs]
    assert [c.optim.lr for c in cfgs] == [3e-3, 1e-2, 3e-2]
    assert [c.optim.lr_rule for c in cfgs] == ["structure-aware", "dense", "dense"]
    assert all(c.optim.clip == 0.5 for c in cfgs)
    with pytest.raises(ValueError, match=r"structures\[0\]: lrs: learning rates must be positive"):
        sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16], lrs: [0]}\n"))
    with pytest.raises(ValueError, match=r"model.widht"):
        sw.load_sweep(write_spec(tmp_path), extra_set=["model.widht=3"])


# --------------------------------------------------------------------------- expand / dry run
def test_expand_counts_and_names(tmp_path):
    s = sw.load_sweep(write_spec(tmp_path, extra="  lrs: [1e-3, 3e-3]\n  seeds: [0, 1]\n"))
    runs = sw.expand(s)
    assert len(runs) == 2 * 2 * 2 * 2
    assert runs[0].name == "dense_w16_lr1e-03_s0"
    assert runs[-1].name == "btt_w32_lr3e-03_s1"
    assert len({r.out_dir for r in runs}) == len(runs)
    r = runs[-1]
    assert (r.structure, r.width, r.lr, r.seed) == ("btt:rank=1", 32, 3e-3, 1)
    from structlin_lab.train import load_config

    cfg = load_config(r.base, r.overrides)
    assert cfg.structure.spec == "btt:rank=1" and cfg.model.width == 32
    assert cfg.optim.lr == 3e-3 and cfg.train.seed == 1 and cfg.name == r.name


def test_select_keeps_matching_runs_in_grid_order(tmp_path):
    s = sw.load_sweep(write_spec(tmp_path, extra="  lrs: [1e-3, 3e-3]\n  seeds: [0, 1]\n"))
    every = [r.name for r in sw.expand(s)]
    some = sw.select(s, ["btt_*_s1", "dense_w32_lr1e-03_s0"])
    names = [r.name for r in sw.expand(some)]
    assert names == [
        n for n in every if (n.startswith("btt_") and n.endswith("_s1")) or n == every[4]
    ]
    assert len(names) == 5 and every[4] == "dense_w32_lr1e-03_s0"
    assert [r.name for r in sw.expand(s)] == every  # the original sweep is unchanged
    assert sw.dry_run(some).count("\n") < sw.dry_run(s).count("\n")
    with pytest.raises(ValueError, match=r"'btt_w64_\*' matches none of the 16 runs.*closest"):
        sw.select(s, ["btt_w64_*"])
    with pytest.raises(ValueError, match="matches none"):  # case matters, on every OS
        sw.select(s, ["BTT_*"])


def test_run_sweep_only_trains_selected_runs(tmp_path, fake_cifar):
    s = sw.load_sweep(write_spec(tmp_path, data=fake_cifar))
    res = sw.run_sweep(sw.select(s, ["*_w32_*"]), jobs=1, log=None)
    assert [r["name"] for r in res] == ["dense_w32_lr3e-03_s0", "btt_w32_lr3e-03_s0"]
    states = {r.name: sw.run_state(r.out_dir) for r in sw.expand(s)}
    assert states == {
        "dense_w16_lr3e-03_s0": "new",
        "dense_w32_lr3e-03_s0": "finished",
        "btt_w16_lr3e-03_s0": "new",
        "btt_w32_lr3e-03_s0": "finished",
    }


def test_dry_run_macs_increase_with_width(tmp_path):
    structs = (
        "    - {spec: dense, widths: [16, 32, 64]}\n    - {spec: 'btt:rank=1', widths: [16, 64]}\n"
    )
    s = sw.load_sweep(write_spec(tmp_path, structs))
    table = sw.dry_run(s)
    for r in sw.expand(s):
        assert r.name in table
    macs = [sw.measure(r)["macs"] for r in sw.expand(s)]
    assert macs[0] < macs[1] < macs[2] and macs[3] < macs[4]
    # dense MLP depth 1: input 3072*w + block 8*w^2 + head w*10
    assert macs[0] == 3072 * 16 + 8 * 16 * 16 + 16 * 10
    assert "new" in table and "MACs/ex" in table


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=str)
def test_every_shipped_sweep_loads(path):
    assert sw.expand(sw.load_sweep(path))


def test_shipped_cpu_sweep_is_valid():
    s = sw.load_sweep(REPO / "configs/sweeps/cifar10_mlp_scaling-cpu.yaml")
    from structlin.layers.registry import parse_spec

    names = {parse_spec(e.spec)[0] for e in s.structures}
    assert names == {"dense", "btt", "monarch", "low_rank", "kron", "tt"}
    assert all(len(e.widths) >= 5 for e in s.structures)
    assert s.out.name == "cifar10_mlp_scaling"


# --------------------------------------------------------------------------- running
def test_run_sweep_finishes_then_skips_and_records_failures(tmp_path, fake_cifar):
    s = sw.load_sweep(write_spec(tmp_path, data=fake_cifar))
    logs = []
    res = sw.run_sweep(s, jobs=1, log=logs.append)
    assert [r["status"] for r in res] == ["finished"] * 4
    for r in sw.expand(s):
        assert sw.run_state(r.out_dir) == "finished"
        assert (Path(r.out_dir) / "checkpoints" / "last.pt").is_file()
    mtimes = {r.name: (Path(r.out_dir) / "metrics.jsonl").stat().st_mtime_ns for r in sw.expand(s)}

    again = sw.run_sweep(s, jobs=1, log=logs.append)
    assert [r["status"] for r in again] == ["skipped"] * 4
    for r in sw.expand(s):
        assert (Path(r.out_dir) / "metrics.jsonl").stat().st_mtime_ns == mtimes[r.name]

    # a run that fails at build time records its traceback; the others still run
    runs = sw.expand(s)
    bad = dataclasses.replace(
        runs[0],
        name="bad",
        out_dir=str(tmp_path / "runs" / "bad"),
        overrides=[*runs[0].overrides, "structure.spec=btt:nonsense=3"],
    )
    good = dataclasses.replace(runs[1], name="good", out_dir=str(tmp_path / "runs" / "good"))
    orig = sw.expand
    try:
        sw.expand = lambda _s: [bad, good]
        res = sw.run_sweep(s, jobs=1, log=None)
    finally:
        sw.expand = orig
    assert [r["status"] for r in res] == ["failed", "finished"]
    assert "nonsense" in (tmp_path / "runs" / "bad" / "error.txt").read_text()
    assert "nonsense" in res[0]["error"]
    assert sw.run_state(tmp_path / "runs" / "bad") == "failed"


def test_interrupted_run_resumes(tmp_path, fake_cifar):
    s = sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16]}\n", data=fake_cifar))
    (run,) = sw.expand(s)
    # an interrupted run: checkpoint written, metrics not finished
    from structlin_lab.train import Trainer, load_config

    short = load_config(run.base, [*run.overrides])
    trainer = Trainer(short, run.out_dir, log=None)
    trainer._stop_signal = 15  # as if SIGTERM arrived during the first step
    row = trainer.fit()
    assert row["status"] == "interrupted"
    assert sw.run_state(run.out_dir) == "interrupted"

    res = sw.run_sweep(s, jobs=1, log=None)
    assert res[0]["status"] == "finished" and res[0]["resumed"] is True
    assert sw.run_state(run.out_dir) == "finished"


def test_resume_flag_passed_to_trainer(tmp_path, monkeypatch):
    s = sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16, 32]}\n"))
    a, b = sw.expand(s)
    (Path(a.out_dir) / "checkpoints").mkdir(parents=True)
    (Path(a.out_dir) / "checkpoints" / "last.pt").write_bytes(b"")
    (Path(a.out_dir) / "metrics.jsonl").write_text('{"step": 1, "status": "running"}\n')
    calls = {}

    class FakeTrainer:
        def __init__(self, cfg, out, *, resume, overwrite, log):
            calls[cfg.name] = (resume, overwrite)

        def fit(self):
            return {"status": "finished", "step": 2}

    import structlin_lab.train

    monkeypatch.setattr(structlin_lab.train, "Trainer", FakeTrainer)
    res = sw.run_sweep(s, jobs=1, log=None)
    assert calls == {a.name: (True, False), b.name: (False, True)}
    assert [r["resumed"] for r in res] == [True, False]


def test_run_sweep_passes_tune_malloc_to_each_run(tmp_path, monkeypatch):
    s = sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16, 32]}\n"))
    seen = []

    def fake_run_one(run, threads=None, progress=None, tune_malloc=False):
        seen.append(tune_malloc)
        return sw._result(run, "finished")

    monkeypatch.setattr(sw, "run_one", fake_run_one)
    sw.run_sweep(s, jobs=1, log=None, tune_malloc=True)
    sw.run_sweep(s, jobs=1, log=None)
    assert seen == [True, True, False, False]


def test_run_one_tunes_malloc_only_when_asked(tmp_path, monkeypatch):
    import structlin_lab.malloc

    calls = []
    monkeypatch.setattr(structlin_lab.malloc, "tune_malloc", lambda: calls.append(1) or True)
    s = sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16]}\n"))
    (run,) = sw.expand(s)
    Path(run.out_dir).mkdir(parents=True)
    (Path(run.out_dir) / "config.yaml").write_text("not: a config\n")
    sw.run_one(run, tune_malloc=False)
    assert calls == []
    sw.run_one(run, tune_malloc=True)
    assert calls == [1]


def test_parallel_jobs(tmp_path, fake_cifar):
    s = sw.load_sweep(
        write_spec(tmp_path, "    - {spec: dense, widths: [16, 32]}\n", data=fake_cifar)
    )
    res = sw.run_sweep(s, jobs=2, log=None)
    assert [r["status"] for r in res] == ["finished", "finished"]


# --------------------------------------------------------------------------- slurm
def test_submit_slurm_needs_submitit(tmp_path, monkeypatch):
    s = sw.load_sweep(write_spec(tmp_path))
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match="pip install submitit"):
        sw.submit_slurm(s, partition="gpu")


def test_slurm_function_is_picklable_and_callable(tmp_path, fake_cifar):
    s = sw.load_sweep(write_spec(tmp_path, "    - {spec: dense, widths: [16]}\n", data=fake_cifar))
    fn = pickle.loads(pickle.dumps(sw.run_one))
    (run,) = pickle.loads(pickle.dumps(sw.expand(s)))
    assert fn(run)["status"] == "finished"
    assert fn(run)["status"] == "skipped"


_GRANDCHILD = """
import os, signal, sys, time
from pathlib import Path
from structlin_lab.scaling.sweep import stop_with_parent
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("stopped").write_text("1"), sys.exit(0)))
stop_with_parent(os.getppid(), poll_s=0.05)
out.joinpath("ready").write_text("1")
time.sleep(60)
"""

_PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX re-parenting and signals")
def test_a_sweep_worker_stops_when_its_sweep_process_is_killed(tmp_path):
    # A killed `structlin sweep` used to leave its workers training on as orphans, racing the
    # runs of the next sweep started over the same folder.
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _GRANDCHILD, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "ready").exists(), "the worker never started"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "stopped").exists(), "the orphaned worker was not stopped"
    finally:
        parent.kill()
