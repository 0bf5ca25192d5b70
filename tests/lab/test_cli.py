from pathlib import Path

import pytest

from structlin_lab.cli import main
from structlin_lab.train import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.name == path.stem


def test_every_experiment_has_a_cpu_variant():
    names = {p.stem for p in CONFIGS}
    for name in names:
        if not name.endswith("-cpu") and name != "gpt2_openwebtext":
            assert f"{name}-cpu" in names, name
    assert "gpt2_austen-cpu" in names  # the CPU stand-in for the OpenWebText run


def test_info_lists_structures_models_and_a_config_report(capsys):
    assert main(["info", "--layer", "btt:rank=2", "64", "256"]) == 0
    out = capsys.readouterr().out
    assert "btt" in out and "monarch" in out and "models: gpt2, mlp, vit" in out
    assert "BTTLinear" in out
    assert main(["info", "--config", str(CONFIGS[0]), "--set", "structure.spec=btt"]) == 0
    assert "layer(s) structured" in capsys.readouterr().out


def test_train_reports_bad_config_keys_clearly(capsys):
    assert main(["train", "--set", "optim.lrr=1", "train.steps=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_data_fetch_text(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 50)
    rc = main(
        [
            "data",
            "fetch",
            "text",
            "--source",
            str(src),
            "--tokenizer",
            "char",
            "--root",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    assert "vocabulary 9" in capsys.readouterr().out
    assert main(["data", "fetch", "mnist"]) == 2


def test_sweep_dry_run_lists_runs(capsys):
    spec = (
        Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "cifar10_mlp_scaling-cpu.yaml"
    )
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dense_w32_lr1e-02_s0" in out and "btt" in out and "MACs/ex" in out


def test_sweep_only_narrows_the_dry_run(capsys):
    spec = (
        Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "cifar10_mlp_scaling-cpu.yaml"
    )
    assert main(["sweep", str(spec), "--dry-run", "--only", "dense_w32_*", "btt_*"]) == 0
    out = capsys.readouterr().out
    assert "dense_w32_lr1e-02_s0" in out and "btt_" in out
    assert "dense_w64" not in out and "monarch" not in out
    assert main(["sweep", str(spec), "--dry-run", "--only", "nothing_*"]) == 2
    assert "matches none" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--no-tune-malloc"]])
def test_train_and_sweep_tune_malloc_unless_told_not_to(tmp_path, monkeypatch, flag):
    import structlin_lab.malloc
    import structlin_lab.scaling.sweep as sweep_mod
    import structlin_lab.train

    calls = []
    monkeypatch.setattr(structlin_lab.malloc, "tune_malloc", lambda: calls.append(1) or True)

    class FakeTrainer:
        def __init__(self, cfg, out, **kw):
            pass

        def fit(self):
            return {"status": "finished", "step": 1}

    monkeypatch.setattr(structlin_lab.train, "Trainer", FakeTrainer)
    config = Path(__file__).resolve().parents[2] / "configs/cifar10_mlp-cpu.yaml"
    assert main(["train", str(config), "--out", str(tmp_path / "run"), *flag]) == 0
    assert len(calls) == (0 if flag else 1)

    seen = {}

    def fake_run_sweep(sweep, *, jobs, threads_per_job, tune_malloc):
        seen["tune_malloc"] = tune_malloc
        return []

    monkeypatch.setattr(sweep_mod, "run_sweep", fake_run_sweep)
    spec = Path(__file__).resolve().parents[2] / "configs/sweeps/cifar10_mlp_scaling-cpu.yaml"
    assert main(["sweep", str(spec), "--only", "dense_w32_*", *flag]) == 0
    assert seen == {"tune_malloc": not flag}


def _fake_run(root, structure, width, macs, err, name=None):
    import json

    import yaml

    run = root / (name or f"{structure}_{width}")
    run.mkdir(parents=True)
    cfg = {
        "name": run.name,
        "task": "classify",
        "model": {"name": "mlp", "width": width, "depth": 3},
        "structure": {"spec": structure},
        "optim": {"lr": 3e-3},
        "train": {"seed": 0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = {
        "step": 10,
        "epoch": 1.0,
        "lr": 0.0,
        "train_loss": 1.0,
        "train_acc": 1 - err,
        "test_loss": 1.0,
        "test_acc": 1 - err,
        "samples_per_s": 1.0,
        "samples": 100,
        "forward_macs_per_example": macs,
        "train_macs": 300 * macs,
        "status": "finished",
    }
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")


def test_results_and_fit_commands(tmp_path, capsys):
    for structure, b in (("dense", 0.10), ("btt", 0.12)):
        for width, macs in ((64, 1e5), (128, 1e6), (256, 1e7), (512, 1e8)):
            _fake_run(tmp_path, structure, width, macs, 2.0 * (300 * macs) ** -b)
    assert main(["results", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().count("\n") == 9
    capsys.readouterr()
    assert main(["fit", str(tmp_path), "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "0.1200" in out and "0.1000" in out
    assert "compute multiplier of btt vs dense" in out
    assert main(["fit", str(tmp_path / "nothing_here")]) == 2


def test_plot_command(tmp_path, capsys):
    for width, macs in ((64, 1e5), (128, 1e6), (256, 1e7)):
        _fake_run(tmp_path / "runs", "dense", width, macs, 2.0 * (300 * macs) ** -0.1)
    assert main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "scaling.png").stat().st_size > 0
    assert (tmp_path / "fig" / "scaling.pdf").stat().st_size > 0
    for width, macs in ((64, 1e5), (128, 1e6), (256, 1e7)):  # sweep-style names: one group
        name = f"btt_head_w{width}_lr3e-03_s0"
        _fake_run(tmp_path / "sweep", "btt", width, macs, (300 * macs) ** -0.1, name=name)
    args = ["plot", str(tmp_path / "sweep"), "--out", str(tmp_path / "g"), "--by", "group"]
    assert main([*args, "--y", "best_test_error"]) == 0
    assert (tmp_path / "g" / "scaling.png").stat().st_size > 0
    # --by makes no sense for an LR landscape: a clear error, exit status 2
    assert main(["plot", str(tmp_path / "runs"), "--kind", "lr", "--by", "group"]) == 2
    assert "--kind scaling only" in capsys.readouterr().err


def test_bench_command_writes_rows_and_settings(tmp_path):
    import json

    out = tmp_path / "b.json"
    args = [
        "bench",
        "--d",
        "64",
        "--batch",
        "8",
        "--rank",
        "1",
        "--repeats",
        "2",
        "--inner",
        "2",
        "--no-tune-malloc",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["inner"] == 2 and data["machine"]["repeats"] == 2
    names = {r["structure"] for r in data["rows"]}
    assert {"dense", "btt:r=1", "btt_naive:r=1", "monarch:b=4", "tt"} <= names
    btt = next(r for r in data["rows"] if r["structure"] == "btt:r=1")
    assert btt["flop_ratio"] > 1 and btt["speedup_vs_naive"] > 0


def test_coord_check_on_a_text_file_and_an_hf_config(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is a test extra")
    import json
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(2000)) + "\n")
    out = tmp_path / "out"
    args = ["coord-check", "--text", str(text), "--hf-config", "gpt2", "--widths", "32", "64"]
    args += ["--structures", "dense", "btt", "--steps", "3", "--block-size", "16", "--d-head", "8"]
    args += ["--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    fits = json.loads((out / "fits.json").read_text())
    assert {(f["structure"], f["lr_rule"]) for f in fits} == {
        ("dense", "dense"),
        ("dense", "structure-aware"),
        ("btt", "dense"),
        ("btt", "structure-aware"),
    }
    assert all(f["widths"] == [32, 64] and all(d > 0 for d in f["dh"]) for f in fits)
    header = (out / "records.csv").read_text().splitlines()[0]
    assert header.startswith("structure,lr_rule,width,step,layer,h,dh")
    assert "transformer.h.1" in (out / "records.csv").read_text()
    assert "records.csv" in capsys.readouterr().out
    assert main(["coord-check", "--text", str(text)]) == 2  # --hf-config is needed too


def test_info_lists_einsum_presets_with_their_taxonomy(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "einsum presets" in out
    btt_line = next(
        line for line in out.splitlines() if line.strip().startswith("btt ") and "theta" in line
    )
    assert "theta=0.5/0/0.5/0/0.5/0.5/0" in btt_line and "omega=0 psi=1 nu=0.5" in btt_line
