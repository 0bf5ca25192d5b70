from pathlib import Path

import pytest

from structlin.cli import main
from structlin.train import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
