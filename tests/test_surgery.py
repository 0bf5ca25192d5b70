import copy
import warnings

import pytest
import torch
from torch import nn

from structlin import make_linear, parse_spec
from structlin.layers import BTTLinear, LowRankLinear
from structlin.surgery import structurize
from structlin.targets import EXCLUDED, HEAD, REPLACE, UNSELECTED, select_targets
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
    assert "blocks.0.fc1" in text and "low_rank:rank=2" in text and "replaced" in text
    # the new column is the layer's spec: it builds the same layer again
    assert parse_spec(row.new) == ("low_rank", {"rank": 2})
    rebuilt = make_linear(row.new, 32, 128)
    assert rebuilt.num_params == row.params_after and rebuilt.macs() == row.macs_after
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
    first, last = (f.tensor for f in fc2.factors())
    assert torch.count_nonzero(first) > 0 and torch.count_nonzero(last) == 0
    assert torch.equal(model.blocks[0].fc1.bias, bias)
    assert all(f.tensor.dtype == torch.float64 for f in model.blocks[0].fc1.factors())


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
    assert isinstance(model.blocks[0].fc1, BTTLinear)
    assert all(f.tensor.is_meta for f in model.blocks[0].fc1.factors())


def test_structured_model_survives_state_dict_and_deepcopy():
    model = small_mlp()
    structurize(model, "btt", norm="rms_clamp")
    with torch.no_grad():  # move off the seeded init, which a fresh surgery would reproduce
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 48)
    y = model(x)
    clone = copy.deepcopy(model)
    fresh = small_mlp()
    structurize(fresh, "btt", norm="rms_clamp")
    assert not torch.allclose(fresh(x), y)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), y) and torch.equal(fresh(x), y)
    assert clone.blocks[0].fc1.norm == "rms_clamp" and fresh.blocks[0].fc1.norm == "rms_clamp"
    with torch.no_grad():  # the copy owns its parameters
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.allclose(model(x), y) and torch.equal(clone(x), y)


def test_lazy_layer_is_refused_not_a_crash():
    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="kept some layers dense"):
        report = structurize(model, "btt")
    status = {r.name: r.status for r in report}
    assert status["1"] == "refused: lazy layer not initialised yet; run a forward pass first"
    assert status["0"] == "replaced" and type(model[1]) is nn.LazyLinear


# The target selector alone, on plain name lists.

NAMES = ["input_layer", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]


def test_select_all_linear_keeps_only_the_head():
    sel = select_targets(NAMES, "head")
    assert sel.actions == {n: REPLACE for n in NAMES[:-1]} | {"head": HEAD}
    assert sel.replaced == NAMES[:-1]
    assert sel.overrides == {} and sel.unmatched_targets == () and sel.unmatched_overrides == ()
    # the head is whichever module the caller names, not the last one
    assert select_targets(NAMES, "input_layer").actions["input_layer"] == HEAD
    assert select_targets(NAMES, "input_layer").actions["head"] == REPLACE


def test_select_suffix_list_matches_on_name_boundaries():
    names = [*NAMES, "blocks.0.xfc1"]
    sel = select_targets(names, "head", ["fc1", "head"])
    assert sel.replaced == ["blocks.0.fc1", "blocks.1.fc1", "head"]  # a listed head is replaced
    assert sel.actions["blocks.0.xfc1"] == UNSELECTED and sel.actions["input_layer"] == UNSELECTED
    assert select_targets(names, None, ["blocks.1.fc1"]).replaced == ["blocks.1.fc1"]


def test_select_regex_must_match_the_whole_name():
    assert select_targets(NAMES, "head", r"blocks\.\d+\.fc2").replaced == [
        "blocks.0.fc2",
        "blocks.1.fc2",
    ]
    sel = select_targets(NAMES, "head", "fc2")  # a string is a regex, not a suffix
    assert sel.replaced == [] and sel.unmatched_targets == ("fc2",)


def test_select_exclude_wins_over_targets_overrides_and_the_head():
    sel = select_targets(
        NAMES, "head", ["fc1"], exclude_modules=["blocks.1.fc1"], overrides=["blocks.1.fc1"]
    )
    assert sel.replaced == ["blocks.0.fc1"]
    assert sel.actions["blocks.1.fc1"] == EXCLUDED
    # a pattern that matched an excluded name was not a typo: no warning for it
    assert sel.unmatched_targets == () and sel.unmatched_overrides == ()
    sel = select_targets(NAMES, "head", exclude_modules=r"(head|input_layer)")
    assert sel.actions["head"] == EXCLUDED and sel.actions["input_layer"] == EXCLUDED
    assert HEAD not in sel.actions.values()


def test_select_overrides_replace_the_head_and_the_first_match_applies():
    sel = select_targets(NAMES, "head", overrides=["head", r"blocks\.0\..*", "fc2"])
    assert sel.actions["head"] == REPLACE and sel.replaced == NAMES
    assert sel.overrides == {
        "head": "head",
        "blocks.0.fc1": r"blocks\.0\..*",
        "blocks.0.fc2": r"blocks\.0\..*",  # first in order, although "fc2" matches too
        "blocks.1.fc2": "fc2",
    }
    # with an explicit target list, an override alone selects its module
    assert select_targets(NAMES, None, ["fc1"], overrides=["input_layer"]).replaced == [
        "input_layer",
        "blocks.0.fc1",
        "blocks.1.fc1",
    ]


def test_select_reports_patterns_that_match_nothing():
    sel = select_targets(NAMES, "head", ["fc1", "typo_fc3", "fc1"], overrides=["fc2", "nope"])
    assert sel.unmatched_targets == ("typo_fc3",)
    assert sel.unmatched_overrides == ("nope",)
    assert select_targets(NAMES, None, ["blocks.2.fc1"]).unmatched_targets == ("blocks.2.fc1",)


def test_from_dense_reports_each_layers_relative_error():
    model = small_mlp()
    with torch.no_grad():  # blocks.0.fc1 becomes exactly rank 2: its projection is exact
        w = model.blocks[0].fc1.weight
        w.copy_(torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]))
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    report = structurize(model, "low_rank:rank=2", init="from_dense")
    rows = {r.name: r for r in report}
    assert rows["blocks.0.fc1"].error < 1e-6
    nonzero = 0
    for name in [n for n in report.replaced if n != "blocks.0.fc1"]:
        fit = model.get_submodule(name).to_dense().double()
        norm = dense[name].double().norm()
        if norm == 0:  # a zero-initialised layer is represented exactly
            assert rows[name].error == 0.0
            continue
        nonzero += 1
        want = (fit - dense[name].double()).norm() / norm
        assert rows[name].error == pytest.approx(want.item(), rel=1e-9)
        assert 0.3 < rows[name].error < 1.0  # a random matrix is far from rank 2
    assert nonzero >= 2
    assert rows["head"].error is None  # kept dense
    assert "rel. error" in str(report) and f"{rows['input_layer'].error:.2e}" in str(report)
    mup = structurize(small_mlp(), "low_rank:rank=2")
    assert all(r.error is None for r in mup)


def test_already_structured_rows_show_the_spec():
    model = small_mlp()
    structurize(model, "btt:rank=2", target_modules=["input_layer"])
    report = structurize(model, "low_rank:rank=2")
    row = next(r for r in report if r.name == "input_layer")
    assert row.status == "already structured"
    assert row.new == model.input_layer.spec and parse_spec(row.new)[1]["rank"] == 2
    assert report.config.paths[0] == "input_layer" and len(report.config.paths) == 5


def test_report_shows_the_taxonomy_of_einsum_layers_only():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    report = structurize(model, "einsum:theta=kron", dry_run=True)
    assert report[0].taxonomy == "omega=0.5 psi=1 nu=0.5"
    assert "taxonomy" in str(report) and "omega=0.5 psi=1 nu=0.5" in str(report)
    plain = structurize(nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 10)), "btt", dry_run=True)
    assert plain[0].taxonomy == "" and "taxonomy" not in str(plain)


@pytest.mark.parametrize("what", ["target_modules", "exclude_modules"])
def test_a_pattern_that_is_not_a_regex_is_a_clear_error(what):
    with pytest.raises(ValueError, match=rf"{what} 'mlp\.\(' is not a valid regular expression"):
        select_targets(NAMES, "head", **{what: "mlp.("})
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        structurize(model, "btt", **{what: "mlp.("})
