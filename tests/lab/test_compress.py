"""``structlin compress``: project a trained model onto a structure, report, fine-tune, save."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import structlin as sl
from lm_cases import TEXT, tiny_lm_config
from structlin_lab import load_exported, load_run
from structlin_lab.cli import main
from structlin_lab.compress import (
    FinetuneOptions,
    TextOptions,
    compress,
    densify,
    finetune_groups,
    load_source,
    pick_size,
    project,
    size_candidates,
)
from structlin_lab.models.gpt2 import GPT2, GPTConfig
from structlin_lab.train import Trainer


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense character-level GPT-2 trained for a few steps (1-2 s)."""
    tmp = tmp_path_factory.mktemp("dense_run")
    cfg = tiny_lm_config(tmp)
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


ATTN = ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.c_proj"]
MLP = ["blocks.0.mlp.c_fc", "blocks.0.mlp.mlp_proj"]


def test_a_target_compresses_only_those_layers_and_leaves_the_others_bit_identical():
    torch.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=20, block_size=16, n_layer=1, d_model=32, d_head=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = project(model, "low_rank:rank=4", target_modules=r".*\.mlp\..*")
    assert [r.name for r in report if r.changed] == MLP
    for name in ATTN:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, before[f"{name}.weight"])
    assert all(isinstance(model.get_submodule(n), sl.StructuredLinear) for n in MLP)
    # exclude_modules takes structurize's forms too (here a list of suffixes).
    model = GPT2(GPTConfig(vocab_size=20, block_size=16, n_layer=1, d_model=32, d_head=8))
    report = project(model, "low_rank:rank=4", exclude_modules=["c_fc", "q"])
    assert [r.name for r in report if r.changed] == [*ATTN[1:], MLP[1]]


def test_a_run_compressed_on_its_mlp_keeps_its_attention_dense(dense_run):
    source = load_source(dense_run).model
    result = compress(dense_run, None, "low_rank:rank=4", target_modules=".*mlp.*", log=None)
    assert [r.name for r in result.report if r.changed] == MLP
    for name in ATTN:  # the run's DenseLinear layers, made nn.Linear with the same weight
        layer = result.model.get_submodule(name)
        assert not isinstance(layer, sl.StructuredLinear)
        assert torch.equal(layer.weight, source.get_submodule(name).to_dense())


def test_pick_size_with_a_target_measures_the_ratio_over_those_layers_only(dense_run):
    model = load_source(dense_run).model
    densify(model)
    spec, ratio = pick_size(model, "low_rank", 0.5, target_modules=MLP)
    # Over the two MLP layers (32x128, 128x32) only: r (32 + 128) params each.
    before = 2 * 32 * 128

    def frac(r):
        return 2 * r * (32 + 128) / before

    best = min(range(1, 33), key=lambda r: abs(frac(r) - 0.5))
    assert spec == f"low_rank:rank={best}" and ratio == pytest.approx(frac(best))
    assert spec != pick_size(model, "low_rank", 0.5)[0]  # over all six layers: another rank
    spec, ratio = pick_size(model, "low_rank", 0.5, target_modules=".*mlp.*", by="macs")
    assert spec == f"low_rank:rank={best}" and ratio == pytest.approx(frac(best))


def test_cli_target_exclude_and_lr_rule_reach_compress(dense_run, tmp_path, monkeypatch):
    import structlin_lab.compress as compress_module

    rules = []

    def recording(model, options):
        rules.append(options.lr_rule)
        return finetune_groups(model, options)

    monkeypatch.setattr(compress_module, "finetune_groups", recording)
    out = tmp_path / "c"
    argv = ["compress", str(dense_run), str(out), "--structure", "low_rank", "--params", "0.5"]
    argv += ["--target", ".*mlp.*", "--exclude", ".*mlp_proj", "--steps", "2"]
    assert main([*argv, "--lr-rule", "plain"]) == 0
    saved = json.loads((out / "compress.json").read_text())
    replaced = [r["name"] for r in saved["report"]["rows"] if r["status"] == "replaced"]
    assert replaced == ["blocks.0.mlp.c_fc"] and len(saved["train_losses"]) == 2
    # --params is a fraction of c_fc's 32 x 128 alone: rank r keeps r (32 + 128) parameters.
    assert saved["spec"] == "low_rank:rank=13"
    assert [e.path for e in sl.read_structure(out).modules] == ["blocks.0.mlp.c_fc"]
    assert rules == ["plain"]


@pytest.mark.parametrize(
    ("targets", "named"),
    [
        ({"target_modules": "nosuch"}, "'nosuch'"),
        ({"target_modules": ["attn.nosuch"]}, r"\['attn.nosuch'\]"),
        ({"exclude_modules": ".*"}, "'.*'"),
    ],
)
def test_a_pattern_that_selects_no_layer_is_a_clear_error(dense_run, targets, named):
    with pytest.raises(ValueError, match=f"replaced no layer: .*{named}"):
        compress(dense_run, None, "btt", log=None, **targets)
    with pytest.raises(ValueError, match=f"replaced no layer: .*{named}"):
        compress(dense_run, None, "btt", params=0.5, log=None, **targets)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compress(dense_run, None, "btt", target_modules="mlp.(", log=None)


def _low_rank_model() -> nn.Module:
    """A 64 -> 16 -> 64 low-rank layer (factor fan-ins 64 and 16) between dense layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    sl.structurize(model, "low_rank:rank=16", target_modules=["1"], init="from_dense")
    return model


def test_mup_lr_rule_gives_each_factor_its_fan_in_rate_and_plain_one_rate():
    model = _low_rank_model()
    groups = finetune_groups(model, FinetuneOptions(lr=1e-3))
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    # lr * d_in / (n_f * fan_in): 64 / (2 * 64) for U (64 -> 16), 64 / (2 * 16) for V (16 -> 64).
    assert lr_of["1.U"] == pytest.approx(0.5e-3) and lr_of["1.V"] == pytest.approx(2e-3)
    rest = {n: lr for n, lr in lr_of.items() if n not in ("1.U", "1.V")}
    assert set(rest) == {"0.weight", "0.bias", "1.bias", "2.weight", "2.bias"}
    assert all(lr == pytest.approx(1e-3) for lr in rest.values())  # dense at its own width
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = finetune_groups(model, FinetuneOptions(lr=1e-3, lr_rule="plain"))
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3
    assert len(plain[0]["params"]) == len(list(model.parameters()))
    # AdamW keeps each group's rate (the extra "names" / "lr_mult" keys are carried along).
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.5e-3, 1e-3, 2e-3])


def test_a_bad_lr_rule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lr_rule must be one of mup, plain, got 'mpu'.*'mup'"):
        FinetuneOptions(lr_rule="mpu")


def test_a_dense_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "t.txt").write_text(TEXT * 100)
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
