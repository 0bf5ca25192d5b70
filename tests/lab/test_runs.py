"""Runs that reload: ``load_run`` rebuilds a run's trained model through the lab's own build
functions, and ``structlin export`` writes it in ``save_structured``'s format."""

from __future__ import annotations

import json

import pytest
import torch

import structlin as sl
from lm_cases import tiny_lm_config
from structlin_lab import export_run, load_exported, load_run
from structlin_lab.cli import main
from structlin_lab.train import Trainer
from structlin_lab.train.build import model_at_width


def _lm_config(tmp, *extra):
    return tiny_lm_config(tmp, "data.batch_size=4", "train.steps=6", "train.eval_every=6", *extra)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A structured (BTT, rms_clamp) character-level GPT-2 run and its trainer."""
    tmp = tmp_path_factory.mktemp("lm_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _lm_config(tmp, "structure.spec=btt:rank=2,norm=rms_clamp")
        trainer = Trainer(cfg, tmp / "run", log=None)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return tmp / "run", trainer


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))


def test_load_run_gives_the_trainers_model(lm_run):
    run_dir, trainer = lm_run
    model, config, shapes = load_run(run_dir)
    assert not model.training and config == trainer.cfg
    assert shapes.num_outputs == trainer.task.shapes.num_outputs  # read off the weights
    assert type(model.blocks[0].mlp.c_fc).__name__ == "BTTLinear"
    x = _tokens(shapes.num_outputs)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], trainer.model(x)[0])


def test_load_run_of_an_image_run(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("structure.spec=monarch", "train.steps=4"), tmp_path, log=None)
    trainer.fit()
    run = load_run(tmp_path)
    assert run.shapes == trainer.task.shapes
    trainer.model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run.model(x), trainer.model(x))


def test_checkpoint_loads_with_weights_only(lm_run):
    run_dir, trainer = lm_run
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["config"] == trainer.cfg.to_dict()
    assert state["rng"]["numpy"]["key"].dtype == torch.int64


def test_export_reloads_onto_a_fresh_dense_model_exactly(lm_run, tmp_path, capsys):
    run_dir, _ = lm_run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    run = load_run(run_dir)
    config = sl.read_structure(out)
    specs = [sl.parse_spec(m.spec) for m in config.modules]
    assert len(specs) == 6  # q, k, v, c_proj, c_fc, mlp_proj; the head stays dense
    assert all(name == "btt" and o["rank"] == 2 and o["norm"] == "rms_clamp" for name, o in specs)
    assert {m.base for m in config.modules} == {"Linear"}
    # The user's path: the dense model of the run's config, then load_structured.
    dense = model_at_width(run.config, run.config.model.width, run.shapes)
    reloaded = sl.load_structured(dense, out).eval()
    x = _tokens(run.shapes.num_outputs)
    with torch.no_grad():
        want = run.model(x)[0]
        assert torch.equal(reloaded(x)[0], want)
        assert torch.equal(load_exported(out).model(x)[0], want)
    saved = json.loads((out / "lab_run.json").read_text())
    assert saved["num_outputs"] == run.shapes.num_outputs


def test_export_refuses_to_overwrite_a_foreign_directory(lm_run, tmp_path):
    run_dir, _ = lm_run
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by save_structured"):
        export_run(run_dir, tmp_path / "x")


def test_load_run_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/last\.pt"):
        load_run(tmp_path)
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not exported from a lab run"):
        load_exported(tmp_path)
