"""The helpers of the report scripts in scripts/ whose numbers appear in docs/results*.md."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar():
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    return _load("report_cifar10")


def test_vertex_recovers_a_parabola_optimum_in_log_lr(cifar):
    # error = (log10 lr + 2.3)^2: optimum at lr = 10^-2.3 ~ 5.0e-3, between grid points
    by_lr = {lr: (math.log10(lr) + 2.3) ** 2 for lr in (1e-3, 3e-3, 1e-2, 3e-2)}
    assert cifar.vertex(by_lr) == pytest.approx(10**-2.3, rel=1e-6)


def test_vertex_at_the_edge_of_the_grid_is_the_grid_point(cifar):
    assert cifar.vertex({1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}) == 1e-3
    assert cifar.vertex({1e-3: 0.7, 3e-3: 0.6, 1e-2: 0.5}) == 1e-2


@pytest.mark.parametrize(
    ("spec", "width", "expected"),
    [("dense", 256, 256.0), ("btt:rank=1", 1024, 64.0), ("monarch:blocks=4", 1024, 512.0)],
)
def test_xi_is_macs_per_unit_width(cifar, spec, width, expected):
    # dense: d; BTT rank r on sqrt(d) x sqrt(d) factors: 2 r sqrt(d); Monarch with b blocks: 2d/b
    assert cifar.xi_of(spec, width) == pytest.approx(expected)


def test_study_script_runs_only_the_chosen_stages(tmp_path):
    """STAGES=wn with LR given: only the two weight-norm sweeps, at 10x and 3x that LR."""
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    env = {**os.environ, "STRUCTLIN": "echo SL", "STAGES": "wn", "LR": "0.002"}
    out = subprocess.run(
        ["bash", str(SCRIPTS / "gpt2_austen_study.sh"), str(tmp_path), "train.ckpt_every=0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sweeps = [line for line in out.splitlines() if line.startswith("SL sweep")]
    assert len(sweeps) == 2
    assert all("gpt2_austen_wn_stability.yaml" in s and "train.ckpt_every=0" in s for s in sweeps)
    assert sweeps[0].endswith("optim.lr=0.02") and sweeps[1].endswith("optim.lr=0.006")
    assert f"data.source={tmp_path}/austen.txt.gz" in sweeps[0]


def test_study_script_runs_the_lr_multiples_in_the_order_given(tmp_path):
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    script = str(SCRIPTS / "gpt2_austen_study.sh")
    env = {**os.environ, "STRUCTLIN": "echo SL", "STAGES": "wn", "LR": "0.01", "MULTS": "3 100"}
    out = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0
    sweeps = [line for line in out.stdout.splitlines() if line.startswith("SL sweep")]
    assert [s.rsplit("optim.lr=", 1)[1] for s in sweeps] == ["0.03", "1.0"]
    env["MULTS"] = "3 ten"
    bad = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "MULTS: expected numbers, got 'ten'" in bad.stderr
    assert "SL" not in bad.stdout  # checked before any stage ran


def test_malloc_step_benchmark_times_both_allocators(tmp_path):
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "malloc_step.py"
    out = tmp_path / "m.json"
    cmd = [sys.executable, str(bench), "--config", "configs/cifar10_mlp-cpu.yaml", "--pairs", "1"]
    cmd += ["--steps", "2", "--warmup", "1", "--out", str(out), "--set", "model.width=16"]
    subprocess.run(cmd, check=True, cwd=bench.parents[1], capture_output=True)
    res = json.loads(out.read_text())
    assert [p["order"] for p in res["pairs"]] == [["default", "tuned"]]
    for p in res["pairs"]:
        assert p["default"]["tuned"] is False and p["tuned"]["tuned"] is True
        assert len(p["tuned"]["steps_s"]) == 2 and all(t > 0 for t in p["tuned"]["steps_s"])
        assert p["ratio"] == pytest.approx(p["default"]["median_s"] / p["tuned"]["median_s"])
    assert res["median_ratio"] > 0 and not list(tmp_path.glob("*.tmp*"))
