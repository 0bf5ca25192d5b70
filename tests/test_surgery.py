import warnings

import pytest
import torch
from torch import nn

import structlin as sl
from structlin.layers import BTTLinear, LowRankLinear
from structlin.surgery import structurize
from structlin_lab.models import MLP


def small_mlp(width=32, depth=2, bias=True):
    torch.manual_seed(0)
    return MLP(in_features=48, num_classes=5, width=width, depth=depth, bias=bias)


def test_all_linear_replaces_everything_but_the_head():
    model = small_mlp()
    report = structurize(model, "btt")
    assert report.replaced == [
        "input_layer",
        "blocks.0.fc1",
        "blocks.0.fc2",
        "blocks.1.fc1",
        "blocks.1.fc2",
    ]
    assert type(model.head) is nn.Linear
    assert isinstance(model.blocks[0].fc1, BTTLinear)
    assert [r.status for r in report if r.name == "head"] == ["kept (head)"]
    assert model(torch.randn(3, 48)).shape == (3, 5)


def test_report_counts_and_table():
    model = small_mlp()
    report = structurize(model, "low_rank:rank=2")
    row = next(r for r in report if r.name == "blocks.0.fc1")
    assert row.params_before == 32 * 128 + 128
    assert row.params_after == 2 * (32 + 128) + 128
    assert row.macs_before == 32 * 128 and row.macs_after == 2 * (32 + 128)
    text = str(report)
    assert "blocks.0.fc1" in text and "low_rank(rank=2)" in text and "replaced" in text
    totals = report.totals()
    assert totals["layers"] == 5 and totals["macs_after"] < totals["macs_before"]


def test_dry_run_changes_nothing_and_reports_the_same():
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dry = structurize(model, "btt", dry_run=True)
    assert all(type(m) is not BTTLinear for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    real = structurize(model, "btt")
    assert [(r.name, r.params_after, r.macs_after) for r in dry if r.changed] == [
        (r.name, r.params_after, r.macs_after) for r in real if r.changed
    ]


def test_target_list_suffix_regex_exclude_and_overrides():
    model = small_mlp()
    report = structurize(model, "btt", target_modules=["fc1"], exclude_modules=["blocks.1.fc1"])
    assert report.replaced == ["blocks.0.fc1"]

    model = small_mlp()
    report = structurize(model, "btt", target_modules=r"blocks\.\d+\.fc2")
    assert report.replaced == ["blocks.0.fc2", "blocks.1.fc2"]

    model = small_mlp()
    report = structurize(model, "btt", overrides={"head": "low_rank:rank=2", "fc2": {"rank": 2}})
    assert isinstance(model.head, LowRankLinear) and model.head.rank == 2
    assert model.blocks[0].fc2.rank == 2 and model.blocks[0].fc1.rank == 1
    assert "head" in report.replaced


def test_keeps_zero_init_zero_copies_bias_device_dtype():
    model = small_mlp().double()
    with torch.no_grad():
        model.blocks[0].fc1.bias.normal_()
    bias = model.blocks[0].fc1.bias.clone()
    structurize(model, "btt")
    fc2 = model.blocks[0].fc2
    assert torch.count_nonzero(fc2.to_dense()) == 0
    assert torch.count_nonzero(fc2.cores[0]) > 0 and torch.count_nonzero(fc2.cores[1]) == 0
    assert torch.equal(model.blocks[0].fc1.bias, bias)
    assert model.blocks[0].fc1.cores[0].dtype == torch.float64


def test_from_dense_init_preserves_function_when_representable():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3)
    )
    model.double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y0 = model(x)
    structurize(model, "btt", init="from_dense", rank=4)  # rank 4 = full for 4x4 / 4x6 blocks
    assert torch.allclose(model(x), y0, atol=1e-10)


def test_idempotent_and_refusals():
    model = small_mlp()
    structurize(model, "btt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = structurize(model, "btt")
    assert report.replaced == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.mha = nn.MultiheadAttention(8, 2)
            self.c = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

    model = Tied()
    with pytest.warns(UserWarning, match="kept some layers dense"):
        report = structurize(model, "btt")
    status = {r.name: r.status for r in report}
    assert status["a"].startswith("refused") and "shared" in status["a"]
    assert status["mha.out_proj"].startswith("refused")
    assert status["c"] == "replaced"
    assert type(model.a) is nn.Linear and type(model.mha.out_proj) is not BTTLinear


def test_bad_input():
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        structurize(nn.Sequential(nn.ReLU()), "btt")
    with pytest.raises(ValueError, match="unknown structure"):
        structurize(small_mlp(), "nope")
    with pytest.raises(ValueError, match="unknown option"):
        structurize(small_mlp(), "btt", rnak=2)
    with pytest.raises(ValueError, match="model is unchanged"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structurize(small_mlp(), "btt", target_modules=["nothing_like_this"])
    with pytest.warns(UserWarning, match="matched no linear layer.*candidates"):
        structurize(small_mlp(), "btt", target_modules=["fc1", "typo_fc3"])
    with pytest.raises(ValueError, match="init must be"):
        structurize(small_mlp(), "btt", init="xavier")


def test_meta_device_model():
    with torch.device("meta"):
        model = small_mlp()
    structurize(model, "btt")
    assert model.blocks[0].fc1.cores[0].is_meta


def test_structured_model_survives_state_dict_and_deepcopy():
    import copy

    model = small_mlp()
    structurize(model, "btt", norm="rms_clamp")
    x = torch.randn(4, 48)
    clone = copy.deepcopy(model)
    fresh = small_mlp()
    structurize(fresh, "btt", norm="rms_clamp")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), model(x)) and torch.equal(fresh(x), model(x))
    assert sl.StructuredLinear is type(model.blocks[0].fc1).__mro__[1]
