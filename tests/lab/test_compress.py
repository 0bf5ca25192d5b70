"""``structlin compress``: project a trained model onto a structure, report, fine-tune, save."""

from __future__ import annotations

import json
import re

import pytest
import torch

import structlin as sl
from structlin_lab import load_exported, load_run
from structlin_lab.cli import main
from structlin_lab.compress import (
    FinetuneOptions,
    TextOptions,
    compress,
    densify,
    load_source,
    pick_size,
    size_candidates,
)
from structlin_lab.train import Trainer, load_config

TEXT = "the quick brown fox jumps over the lazy dog. " * 100


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense character-level GPT-2 trained for a few steps (1-2 s)."""
    tmp = tmp_path_factory.mktemp("dense_run")
    (tmp / "t.txt").write_text(TEXT)
    cfg = load_config(
        None,
        [
            "task=lm",
            "model.name=gpt2",
            "model.width=32",
            "model.base_width=16",
            "model.depth=1",
            "model.kwargs={d_head: 8}",
            f"data.source={tmp / 't.txt'}",
            f"data.root={tmp / 'cache'}",
            "data.tokenizer=char",
            "data.block_size=16",
            "data.batch_size=8",
            "data.eval_batches=1",
            "train.steps=20",
            "train.eval_every=20",
            "train.progress=false",
            "optim.name=adamw",
            "optim.lr=1e-2",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, tmp / "run", log=None).fit()
    finally:
        torch.set_num_threads(threads)
    return tmp / "run"


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def test_projection_reports_errors_and_savings_and_saves_a_loadable_directory(dense_run, tmp_path):
    out = tmp_path / "out"
    result = compress(dense_run, out, "low_rank:rank=4", log=None)
    rows = [r for r in result.report if r.changed]
    assert len(rows) == 6 and all(0.0 < r.error < 1.0 for r in rows)
    totals = result.report.totals()
    assert totals["params_after"] == 4 * (4 * (32 + 32) + 2 * (32 + 128))
    assert totals["params_before"] == 4 * 32 * 32 + 2 * 32 * 128
    assert result.losses == {}  # no fine-tuning: no data read
    reloaded = load_exported(out).model  # dense base from lab_run.json + load_structured
    x = _tokens(load_run(dense_run).shapes.num_outputs)
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], result.model(x)[0])
    saved = json.loads((out / "compress.json").read_text())
    assert saved["spec"] == "low_rank:rank=4"
    assert [r["error"] for r in saved["report"]["rows"] if r["status"] == "replaced"] == [
        r.error for r in rows
    ]


def test_projection_is_exact_where_the_structure_represents_the_layer(dense_run):
    # Full rank represents every 32x32 and 32x128 weight: the error is rounding only.
    result = compress(dense_run, None, "low_rank:rank=32", log=None)
    assert max(r.error for r in result.report if r.changed) < 1e-5


@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distill"])
def test_finetuning_lowers_the_loss_below_the_projection(dense_run, tmp_path, distill):
    ft = FinetuneOptions(steps=25, lr=3e-3, distill=distill, alpha=0.5, temperature=2.0)
    result = compress(dense_run, tmp_path / "o", "btt:rank=1", finetune_options=ft, log=None)
    losses = result.losses
    assert losses["projected"] > losses["dense"]  # a rank-1 BTT projection loses something
    assert losses["finetuned"] < losses["projected"]
    assert len(result.train_losses) == 25
    assert json.loads((tmp_path / "o" / "compress.json").read_text())["losses"] == losses


def test_params_fraction_picks_the_closest_rank(dense_run):
    model = load_source(dense_run).model  # a dense run's layers are DenseLinear: densify first
    with pytest.raises(ValueError, match=r"densify\(model\) first"):
        pick_size(model, "low_rank", 0.5)
    densify(model)
    spec, ratio = pick_size(model, "low_rank", 0.5)
    # Independently: a rank-r low-rank layer has r (d_in + d_out) params.
    shapes = [(32, 32)] * 4 + [(32, 128), (128, 32)]
    before = sum(i * o for i, o in shapes)

    def frac(r):
        return sum(r * (i + o) for i, o in shapes) / before

    best = min(size_candidates(model), key=lambda r: abs(frac(r) - 0.5))
    assert spec == f"low_rank:rank={best}" and ratio == pytest.approx(frac(best))
    assert abs(frac(best) - 0.5) <= min(abs(frac(r) - 0.5) for r in range(1, 33))
    spec, ratio = pick_size(model, "monarch", 0.3, by="macs")
    assert sl.parse_spec(spec)[0] == "monarch" and abs(ratio - 0.3) < 0.15


def test_cli_compress_prints_the_report(dense_run, tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        main(["compress", str(dense_run), str(out), "--structure", "btt", "--params", "0.5"]) == 0
    )
    printed = capsys.readouterr().out
    assert "rel. error" in printed and "layer(s) structured" in printed and str(out) in printed
    spec = json.loads((out / "compress.json").read_text())["spec"]
    assert sl.parse_spec(spec)[0] == "btt" and "rank" in sl.parse_spec(spec)[1]
    # An exported directory is a source too (its dense base comes from lab_run.json).
    assert main(["export", str(dense_run), str(tmp_path / "e")]) == 0
    assert main(["compress", str(tmp_path / "e"), str(tmp_path / "c2"), "--structure", "tt"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--structure", "btt"], "is not a directory"),
        (["--structure", "nosuch"], "unknown structure 'nosuch'"),
        (["--structure", "btt", "--params", "0"], r"in \(0, 1\)"),
        (["--structure", "btt", "--params", "1.5"], r"in \(0, 1\)"),
        (["--structure", "btt:rank=2", "--params", "0.5"], "already sets rank"),
        (["--structure", "kron", "--macs", "0.5"], "has none"),
    ],
)
def test_bad_input_is_a_clear_error(dense_run, tmp_path, capsys, args, message):
    source = tmp_path / "missing" if message == "is not a directory" else dense_run
    assert main(["compress", str(source), str(tmp_path / "o"), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_errors_of_the_api(dense_run, tmp_path):
    with pytest.raises(ValueError, match="not a training run"):
        compress(tmp_path, None, "btt", log=None)
    with pytest.raises(ValueError, match="not both"):
        compress(dense_run, None, "btt", params=0.5, macs=0.5, log=None)
    with pytest.raises(ValueError, match="--text is for transformers"):
        ft = FinetuneOptions(steps=1)
        compress(dense_run, None, "btt", finetune_options=ft, text=TextOptions("x"), log=None)
    with pytest.raises(ValueError, match="alpha"):
        FinetuneOptions(alpha=2.0)


def test_a_dense_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "t.txt").write_text(TEXT)
    text = TextOptions(str(tmp_path / "t.txt"), cache_dir=str(tmp_path / "cache"), block_size=16)
    ft = FinetuneOptions(steps=10, lr=3e-3, distill=True)
    result = compress(
        tmp_path / "hf",
        tmp_path / "out",
        "low_rank",
        params=0.5,
        finetune_options=ft,
        text=text,
        log=None,
    )
    assert {r.old.split("(")[0] for r in result.report if r.changed} == {"Conv1D"}
    assert result.losses["finetuned"] < result.losses["projected"]
    # The documented reload: the dense base from the saved config.json, then load_structured.
    base_config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    reloaded = sl.load_structured(
        transformers.AutoModelForCausalLM.from_config(base_config), tmp_path / "out"
    ).eval()
    x = _tokens(64)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, result.model(x).logits)
    # ... and the saved (structured) directory is itself a source: its layers are made dense
    # (to_dense, as Conv1D again) and projected onto the new structure.
    again = compress(tmp_path / "out", None, "monarch", params=0.5, log=None)
    assert {r.old.split("(")[0] for r in again.report if r.changed} == {"Conv1D"}
    assert len([r for r in again.report if r.changed]) == 4
