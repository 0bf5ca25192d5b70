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


def _gpu_cifar(tmp_path, env_extra, timeout=120):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env_extra}
    return subprocess.run(
        ["bash", str(SCRIPTS / "gpu_cifar_study.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EPOCHS": "many"}, "EPOCHS: expected a number, got 'many'"),
        ({"JOBS": "0"}, "JOBS: expected a positive number, got '0'"),
        ({"DATA": "/nonexistent/cifar.tgz"}, "DATA: no CIFAR-10 copy at '/nonexistent/cifar.tgz'"),
    ],
)
def test_gpu_cifar_study_rejects_bad_settings_before_running(tmp_path, fake_cifar, env, message):
    out = _gpu_cifar(tmp_path, {"DATA": str(fake_cifar), **env})
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "out" / "plan.txt").exists()


def test_gpu_cifar_study_spec_spans_the_issue_s_compute_range():
    """6 structures x at least 6 widths; each structure's forward MACs (so its training compute: the
    same epochs for every run) span at least 2.5 decades. The MLP's MACs are summed from its layers,
    built on the meta device: input 3072 -> w, 3 blocks of w -> 4w -> w, dense head w -> 10."""
    import yaml

    from structlin import make_linear

    spec = yaml.safe_load(
        (SCRIPTS.parent / "configs" / "sweeps" / "cifar10_mlp_scaling-gpu.yaml").read_text()
    )
    assert "train.epochs=100" in spec["set"] and spec["grid"]["lrs"] == [3.0e-3]
    entries = spec["grid"]["structures"]
    assert len(entries) == 6

    def macs(structure: str, w: int) -> int:
        shapes = [(3072, w)] + [(w, 4 * w), (4 * w, w)] * 3
        return sum(make_linear(structure, *s, device="meta").macs() for s in shapes) + 10 * w

    for entry in entries:
        assert len(entry["widths"]) >= 6
        lo, hi = (
            macs(entry["spec"], min(entry["widths"])),
            macs(entry["spec"], max(entry["widths"])),
        )
        assert math.log10(hi / lo) >= 2.5, entry["spec"]


@pytest.mark.slow
def test_gpu_cifar_study_writes_the_plan_of_36_runs(tmp_path, fake_cifar):
    out = _gpu_cifar(tmp_path, {"DATA": str(fake_cifar), "STAGES": ""}, timeout=600)
    assert out.returncode == 0, out.stderr
    plan = (tmp_path / "out" / "plan.txt").read_text()
    assert "36 runs" in plan and "btt_w8192_lr3e-03_s0" in plan


@pytest.mark.slow
def test_gpu_cifar_study_tiny_cpu_slice_trains_fits_and_packs(tmp_path, fake_cifar):
    import tarfile

    spec = (SCRIPTS.parent / "configs" / "sweeps" / "cifar10_mlp_scaling-gpu.yaml").read_text()
    base = SCRIPTS.parent / "configs" / "cifar10_mlp.yaml"
    spec = spec.replace("base: ../cifar10_mlp.yaml", f"base: {base}")
    spec = spec.replace("out: ../../runs/cifar10_mlp_scaling_gpu", f"out: {tmp_path / 'runs'}")
    (tmp_path / "spec.yaml").write_text(spec)
    env = {
        "SPEC": str(tmp_path / "spec.yaml"),
        "DATA": str(fake_cifar),
        "DATA_ROOT": str(tmp_path / "cache"),
        "JOBS": "2",
        "STAGES": "core fit",
        "EPOCHS": "1",
        "ONLY": "dense_w64_* dense_w128_* dense_w256_* btt_w64_* btt_w256_* btt_w1024_*",
        "EXTRA_SET": "train.device=cpu train.ckpt_every=0 data.batch_size=64 train.progress=false",
    }
    out = _gpu_cifar(tmp_path, env, timeout=600)
    assert out.returncode == 0, out.stderr
    # (the fake data is learnt perfectly, test error 0: only train-error figures can be drawn)
    fit = (tmp_path / "out" / "fit_final_train_error_vs_train_macs.txt").read_text()
    assert "dense" in fit and "btt:rank=1" in fit
    assert (
        tmp_path / "out" / "figures" / "final_train_error_vs_wall_time_s" / "scaling.png"
    ).is_file()
    with tarfile.open(tmp_path / "out" / "cifar_runs.tgz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("metrics.jsonl") for n in names) == 6
    assert not any("checkpoints" in n for n in names)


@pytest.fixture(scope="module")
def compression():
    return _load("compression_study")


def test_scratch_compute_to_reach_a_loss_interpolates_in_log_compute(compression):
    curve = [
        {"train_macs": 1e10, "test_loss": 3.0},
        {"train_macs": 1e12, "test_loss": 2.0},
        {"train_macs": 1e13, "test_loss": 1.5},
    ]
    assert compression._macs_to_reach(curve, 2.5) == pytest.approx(1e11)
    assert compression._macs_to_reach(curve, 3.5) == 1e10  # reached at the first evaluation
    assert compression._macs_to_reach(curve, 1.0) is None  # never reached


@pytest.fixture(scope="module")
def einsum_report():
    pytest.importorskip("scipy")
    return _load("report_einsum")


@pytest.mark.parametrize(
    ("spec", "taxonomy"),
    [
        ("dense", (0.0, 1.0, 1.0)),
        ("einsum:theta=btt", (0.0, 1.0, 0.5)),
        ("einsum:theta=kron", (0.5, 1.0, 0.5)),
        ("einsum:theta=1/0/0/0/1/0/0.25", (0.0, 0.25, 0.25)),
        ("einsum:theta=0.5/0.25/0.25/0.25/0.5/0.25/0,norm=rms_clamp", (0.25, 1.0, 0.5)),
    ],
)
def test_the_theta_sweep_reads_each_points_taxonomy_from_its_spec(einsum_report, spec, taxonomy):
    assert tuple(einsum_report.theta_of(spec)[1]) == pytest.approx(taxonomy)


def test_spearman_is_the_rank_correlation(einsum_report):
    assert einsum_report._spearman([1, 2, 3, 4], [10, 40, 90, 160]) == pytest.approx(1.0)
    assert einsum_report._spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_gives_tied_values_their_mean_rank(einsum_report):
    # ω is 0 for most θ points: with ties broken arbitrarily the correlation would depend on order
    assert einsum_report._spearman([0, 0, 0.5], [1, 2, 3]) == pytest.approx(0.8660254)
    assert einsum_report._spearman([0, 0, 0.5], [2, 1, 3]) == pytest.approx(0.8660254)


def _theta_rows(group: str, spec: str, shift: float, widths, seeds=(0, 1, 2), noise=0.01, b=0.1):
    """Finished runs whose loss is 10 (shift * C)^-b, times a per-seed wobble."""
    rows = []
    for i, w in enumerate(widths):
        C = 1e12 * 2.0**i
        for s in seeds:
            loss = 10 * (shift * C) ** -b * (1 + noise * (s - 1))
            rows.append(
                {
                    "group": group,
                    "structure": spec,
                    "width": w,
                    "seed": s,
                    "status": "finished",
                    "train_macs": C,
                    "final_test_loss": loss,
                }
            )
    return rows


def test_seed_spread_gives_each_width_its_seed_mean_and_standard_deviation(einsum_report):
    rows = _theta_rows("dense", "dense", 1.0, [96, 128])
    rows[-1]["status"] = "running"  # left out: only finished runs count
    spread = einsum_report.seed_spread(rows, "final_test_loss")
    assert [(c["width"], c["seeds"]) for c in spread] == [(96, 3), (128, 2)]
    losses = [r["final_test_loss"] for r in rows[:3]]
    assert spread[0]["mean"] == pytest.approx(sum(losses) / 3)
    assert spread[0]["sd"] == pytest.approx(10 * 1e12**-0.1 * 0.01, rel=1e-9)
    one = einsum_report.seed_spread(rows[:1], "final_test_loss")
    assert one[0]["seeds"] == 1 and math.isnan(one[0]["sd"])


def test_theta_table_fits_every_seed_and_reads_the_multiplier_against_dense(einsum_report):
    rows = _theta_rows("dense", "dense", 1.0, [96, 128, 192, 256])
    rows += _theta_rows("btt", "einsum:theta=btt", 4.0, [128, 192, 256, 512])
    rows += _theta_rows("tt", "einsum:theta=tt", 2.0, [128, 192])  # too few widths to fit
    rows += _theta_rows("lr", "einsum:theta=1/0/0/0/1/0/0.5", 1.0, [128, 192, 256], b=-0.02)
    points = einsum_report.run_points(rows, "final_test_loss")
    assert points["btt"][0].size == 12  # every seed is a point of its own
    table = {
        t["group"]: t for t in einsum_report.theta_table(rows, {"test": "final_test_loss"}, "dense")
    }
    assert list(table) == ["dense", "btt", "lr", "tt"]
    assert table["lr"]["b_test"] < 0  # loss that rises with compute: no multiplier to read
    assert table["lr"]["mult_test"].startswith("never") and math.isnan(table["lr"]["mult_test_x"])
    assert table["btt"]["b_test"] == pytest.approx(0.1, abs=2e-3)
    assert table["btt"]["b_test_se"] > 0  # the seed wobble is noise the fit sees
    assert table["btt"]["mult_test_x"] == pytest.approx(4.0, rel=0.05)
    assert table["btt"]["omega"] == 0 and table["btt"]["nu"] == 0.5
    assert table["dense"]["mult_test"] == "reference"
    assert table["tt"]["mult_test"] == "n/a" and math.isnan(table["tt"]["b_test"])
    assert table["tt"]["n_test"] == 6
