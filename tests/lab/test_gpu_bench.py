"""The prepared GPU benchmark (benchmarks/gpu_bench.py) at toy sizes on the CPU: every stage runs
and reports rows, the JSON has the structure the GPU run's report is read from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_fills_every_stage(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--tiny"]
    out = subprocess.run(
        [*cmd, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(result) == {"machine", "layers", "model", "targets"}
    assert result["machine"]["device"] == "cpu"

    layers = result["layers"]
    combos = {(r["spec"], r["path"]) for r in layers if r["status"] == "ok"}
    specs = {"dense", "btt:rank=1", "btt:rank=4", "monarch:blocks=4", "monarch:blocks=16"}
    assert {
        (s, p) for s in specs | {"low_rank"} for p in ("reference", "fast", "compile")
    } == combos
    for r in layers:
        assert r["time_ms"] > 0 and r["vs_dense"] > 0 and r["macs_ratio"] >= 1.0
    dense = [r for r in layers if r["spec"] == "dense"]
    assert all(r["vs_dense"] == 1.0 for r in dense)  # each path against its own dense row

    model = result["model"]
    ok = [r for r in model if r["status"] == "ok"]
    assert {(r["spec"], r["budget"], r["mode"]) for r in ok} == {
        (s, b, m)
        for s in ("dense", "btt:rank=4", "monarch:blocks=4")
        for b in ("equal width", "equal FLOPs")
        for m in ("eager", "compile")
        if not (s == "dense" and b == "equal FLOPs")
    }  # no CUDA graphs on the CPU
    macs = {(r["spec"], r["budget"]): r["macs_per_token"] for r in ok}
    for spec in ("btt:rank=4", "monarch:blocks=4"):  # equal FLOPs never exceeds dense
        assert macs[(spec, "equal FLOPs")] <= macs[("dense", "equal width")]
    assert all(r["tokens_per_s"] > 0 for r in ok)

    # targets are named for the GPU shapes (d=4096, 8192 rows): unmeasured at toy sizes
    assert [t["status"] for t in result["targets"]] == ["unmeasured"] * 5
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| btt:rank=1 | 32 | 64 | fast |" in table and "## GPT-2 training step" in table
