"""``structlin.mup.prepare``: μP initialisation of models written for standard parametrisation."""

import pytest
import torch
from torch import nn

from structlin import BTTLinear, mup_init_std, structurize
from structlin.mup import prepare


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.c_proj(torch.relu(self.fc(self.ln(x))))


class Toy(nn.Module):
    """Embedding, two residual blocks, an unrecognised matrix and a head."""

    def __init__(self, d: int = 64, vocab: int = 11, tied: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.mix = Mixer(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        h = self.wte(idx)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.mix(h))


class Mixer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ self.table


def _rows(report):
    return {r.name: r for r in report}


def test_dense_layers_get_spectral_init_readout_and_residuals_zero():
    torch.manual_seed(0)
    model = Toy(d=128)
    report = prepare(model)
    fc = model.blocks[0].fc
    assert fc.weight.std().item() == pytest.approx(mup_init_std(128, 512), rel=0.05)
    assert not fc.bias.any()
    assert not model.blocks[1].c_proj.weight.any() and not model.lm_head.weight.any()
    rows = _rows(report)
    assert report.readout == "lm_head" and rows["lm_head"].kind == "readout"
    assert rows["blocks.0.c_proj"].action == "zeroed" and rows["blocks.0.fc"].action == "μP init"
    assert set(report.changed) == {f"blocks.{i}.{n}" for i in (0, 1) for n in ("fc", "c_proj")} | {
        "lm_head"
    }
    # The embedding keeps its init, the norms their gains; the unknown matrix is reported.
    assert rows["wte"].action == "kept" and rows["blocks.0.ln"].kind == "norm"
    assert [r.name for r in report.cannot_change] == ["mix"]
    assert "mup_init_std" in rows["mix"].detail
    logits = model(torch.randint(0, 11, (2, 5)))
    assert not logits.any()  # zero readout: initial logits exactly zero


def test_idempotent_same_report_and_with_a_seed_same_weights():
    model = Toy()
    first = prepare(model, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    second = prepare(model, seed=3)
    assert first.to_dict() == second.to_dict() and str(first) == str(second)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    rng = torch.get_rng_state()
    prepare(model, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone


def test_tied_readout_is_reported_not_zeroed():
    model = Toy(tied=True)
    before = model.wte.weight.clone()
    report = prepare(model)
    assert torch.equal(model.wte.weight, before)
    (row,) = [r for r in report.cannot_change if r.name == "lm_head"]
    assert "tied" in row.detail and "tie_word_embeddings=False" in row.detail
    assert "lm_head" not in report.changed


def test_options_readout_name_no_residual_and_errors():
    model = Toy()
    report = prepare(model, readout="blocks.1.c_proj", zero_init_residual=False)
    assert report.readout == "blocks.1.c_proj"
    assert model.blocks[0].c_proj.weight.any() and model.lm_head.weight.any()
    assert not model.blocks[1].c_proj.weight.any()
    report = prepare(Toy(), readout=None, residual_modules=["nothing"])
    assert report.readout is None
    assert any("residual_modules" in r.detail for r in report.cannot_change)
    with pytest.raises(ValueError, match="not a linear layer"):
        prepare(Toy(), readout="wte")


def test_keep_weights_changes_nothing_and_says_what_it_would_do():
    model = Toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = prepare(model, keep_weights=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert report.changed == []
    assert _rows(report)["lm_head"].action == "unchanged"
    assert "would set" in _rows(report)["lm_head"].detail


def test_structurize_then_prepare_resets_factors_and_zeroes_last():
    model = Toy(d=64)
    structurize(model, "btt")
    for p in model.parameters():
        p.data.fill_(1.0)
    prepare(model)
    c_proj, fc = model.blocks[0].c_proj, model.blocks[0].fc
    assert isinstance(c_proj, BTTLinear) and isinstance(fc, BTTLinear)
    assert not c_proj.factors()[-1].tensor.any() and c_proj.factors()[0].tensor.any()
    for f in fc.factors():
        assert f.tensor.std().item() == pytest.approx(mup_init_std(f.fan_in, f.fan_out), rel=0.2)


def test_prepare_then_structurize_keeps_zero_layers_zero_at_the_output():
    model = Toy(d=64)
    prepare(model)
    structurize(model, "btt")
    c_proj = model.blocks[1].c_proj
    assert isinstance(c_proj, BTTLinear) and not c_proj.to_dense().any()
    assert not c_proj.factors()[-1].tensor.any()


def test_from_dense_weights_survive_keep_weights():
    torch.manual_seed(0)
    model = Toy(d=64)
    x = torch.randint(0, 11, (2, 7))
    structurize(model, "btt", init="from_dense")
    before = model(x)
    report = prepare(model, keep_weights=True)
    assert torch.equal(model(x), before)
    assert all(r.action != "zeroed" for r in report)


def test_report_table_and_dict():
    report = prepare(Toy())
    text = str(report)
    assert text.splitlines()[0].split()[:4] == ["module", "kind", "action", "detail"]
    assert "re-initialised for μP" in text.splitlines()[-1]
    d = report.to_dict()
    assert d["readout"] == "lm_head" and "mix" in d["cannot_change"]
    assert {"name", "kind", "action", "detail"} <= set(d["rows"][0])


def test_attention_scaling_is_reported_with_the_fix():
    model = nn.Sequential(nn.MultiheadAttention(64, 4), nn.Linear(64, 3))
    (row,) = [r for r in prepare(model).cannot_change if r.kind == "attention"]
    assert f"d_head={64 // 4}" in row.detail and "1/d_head" in row.detail


def test_meta_device_model():
    with torch.device("meta"):
        model = Toy()
    report = prepare(model)
    assert report.changed == prepare(Toy()).changed
    assert model.lm_head.weight.is_meta  # nothing was allocated
    assert "std nan" in _rows(report)["wte"].detail  # no values to measure on meta


def test_attention_scale_is_kept_when_the_base_has_the_same_head_size():
    model = nn.Sequential(nn.MultiheadAttention(64, 4), nn.Linear(64, 3))
    with torch.device("meta"):
        fixed = nn.Sequential(nn.MultiheadAttention(32, 2), nn.Linear(32, 3))  # d_head 16
        growing = nn.Sequential(nn.MultiheadAttention(32, 4), nn.Linear(32, 3))  # d_head 8
    (row,) = [r for r in prepare(model, base=fixed) if r.kind == "attention"]
    assert row.action == "kept" and "d_head=16" in row.detail
    (row,) = [r for r in prepare(model, base=growing).cannot_change if r.kind == "attention"]
    assert "base model: d_head=8" in row.detail and "pass base=" not in row.detail
