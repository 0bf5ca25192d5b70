import copy
import math

import pytest
import torch
from torch import nn

from structlin import mup
from structlin.surgery import structurize
from structlin_lab.models import MLP


def mlp(width, structure=None, meta=True, **kw):
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        model = MLP(in_features=3072, num_classes=10, width=width, depth=2)
        if structure:
            structurize(model, structure, **kw)
    return model


def mults(model, base, **kw):
    return {i.name: i.lr_mult for i in mup.param_info(model, base=base, **kw)}


BASE = mlp(64)


@pytest.mark.parametrize(
    "width, fc1, fc2",
    # rank-1 BTT: 2 factors of fan-in sqrt(d_in), so lr_mult = d_in_base / (2 * sqrt(d_in)),
    # with d_in = w (fc1) or 4w (fc2) and the base at w = 64
    [(64, 4.0, 8.0), (1024, 1.0, 2.0), (4096, 0.5, 1.0)],
)
def test_btt_factor_multipliers_match_the_papers_table(width, fc1, fc2):
    m = mults(mlp(width, "btt"), BASE)
    assert m["blocks.0.fc1.weights.0"] == pytest.approx(fc1)
    assert m["blocks.0.fc1.weights.1"] == pytest.approx(fc1)
    assert m["blocks.0.fc2.weights.0"] == pytest.approx(fc2)
    assert m["blocks.0.fc2.weights.1"] == pytest.approx(fc2)


def test_multipliers_scale_with_width_as_the_formulas_say():
    widths = [64, 256, 1024]
    btt = [mults(mlp(w, "btt"), BASE)["blocks.1.fc1.weights.0"] for w in widths]
    dense = [mults(mlp(w), BASE)["blocks.1.fc1.weight"] for w in widths]
    naive = [mults(mlp(w, "btt"), BASE, lr_rule="dense")["blocks.1.fc1.weights.0"] for w in widths]
    for a, b, wa, wb in zip(btt, btt[1:], widths, widths[1:], strict=False):
        assert a / b == pytest.approx(math.sqrt(wb / wa))  # BTT: 1/sqrt(width)
    for a, b, wa, wb in zip(dense, dense[1:], widths, widths[1:], strict=False):
        assert a / b == pytest.approx(wb / wa)  # dense: 1/width
    assert naive == pytest.approx(dense)  # naive rule: the dense multiplier for every factor
    # input layer fan-in is fixed: its multipliers do not change with width
    inp = [mults(mlp(w, "btt"), BASE)["input_layer.weights.0"] for w in widths]
    assert inp == pytest.approx([inp[0]] * 3)


def test_roles_vectors_weight_decay_and_extra_multipliers():
    model = mlp(256, "btt", norm="rms_clamp")
    infos = {
        i.name: i
        for i in mup.param_info(
            model, base=BASE, weight_decay=0.1, multipliers={r"^input_layer\.weights": 0.1}
        )
    }
    assert infos["input_layer.weights.0"].role == "input"
    assert infos["blocks.0.fc1.weights.0"].role == "hidden"
    assert infos["head.weight"].role == "readout"
    assert infos["head.weight"].lr_mult == pytest.approx(64 / 256)
    assert infos["blocks.0.norm.weight"].role == "vector"
    assert infos["blocks.0.fc1.gammas.0"].role == "scalar"
    for i in infos.values():
        if i.role in ("vector", "scalar"):
            assert i.weight_decay == 0.0 and i.lr_mult == 1.0
        else:
            assert i.weight_decay == 0.1
    # input core 0: fan-in 64 of d_in 3072, two factors -> 3072 / 64 / 2 = 24, times 0.1
    assert infos["input_layer.weights.0"].lr_mult == pytest.approx(2.4)
    assert infos["input_layer.weights.0"].init_std == pytest.approx(math.sqrt(16) / 64)
    with pytest.warns(UserWarning, match="matched no parameter"):
        mup.param_info(model, base=BASE, multipliers={"no_such_param": 2.0})


def test_sgd_rule():
    m = mults(mlp(256), BASE, optimizer="sgd")
    assert m["blocks.0.fc1.weight"] == pytest.approx(1.0)  # hidden: fan_out/fan_in constant
    assert m["input_layer.weight"] == pytest.approx(4.0)  # input: grows with fan-out
    assert m["head.weight"] == pytest.approx(0.25)  # readout: 1/fan-in
    s = mults(mlp(256, "btt"), BASE, optimizer="sgd")
    # factor share: (fan_out/fan_in) / (d_out/d_in) / n_f; fc1 cores are 16 -> 32, layer 256 -> 1024
    assert s["blocks.0.fc1.weights.0"] == pytest.approx(1.0 * (32 / 16) / (1024 / 256) / 2)


def test_base_matching_by_name_and_mapping_equivalence():
    model = mlp(128, "btt")
    shapes = mup.base_shapes(BASE)
    assert mults(model, shapes) == mults(model, BASE)
    with torch.device("meta"):
        deeper = MLP(in_features=3072, num_classes=10, width=64, depth=3)
        shallow = MLP(in_features=3072, num_classes=10, width=64, depth=1)
    mup.param_info(model, base=deeper)  # extra base entries are fine
    with pytest.raises(ValueError, match=r"no base entry for \['blocks.1.norm.weight'|blocks\.1"):
        mup.param_info(model, base=shallow)


def test_param_groups_drive_a_real_optimizer_and_scheduler():
    torch.manual_seed(0)
    model = mlp(128, "btt", meta=False)
    groups = mup.param_groups(model, 1e-3, base=BASE, multipliers={"input_layer": 0.1})
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    x, y = torch.randn(8, 3072), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * 1e-3 * g["lr_mult"])


def test_nothing_stored_on_tensors_survives_copies_and_compile():
    model = mlp(128, "btt", meta=False)
    ref = mults(model, BASE)
    assert mults(copy.deepcopy(model), BASE) == ref
    fresh = mlp(128, "btt", meta=False)
    fresh.load_state_dict(model.state_dict())
    assert mults(fresh, BASE) == ref
    compiled = torch.compile(model, backend="eager")
    assert mults(compiled, BASE) == ref
    assert all(not hasattr(p, "lr_mult") for p in model.parameters())


def test_tied_weights_are_grouped_once():
    class Tied(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.emb = nn.Embedding(11, d)
            self.body = nn.Linear(d, d)
            self.head = nn.Linear(d, 11, bias=False)
            self.head.weight = self.emb.weight

    with torch.device("meta"):
        base = Tied(8)
    groups = mup.param_groups(Tied(32), 1e-3, base=base)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 3
    torch.optim.Adam(groups)


def test_describe_prints_one_line_per_parameter(capsys):
    model = mlp(128, "low_rank")
    text = mup.describe(model, base=BASE)
    out = capsys.readouterr().out
    assert text.strip() == out.strip()
    lines = out.strip().splitlines()
    assert len(lines) == 1 + len(list(model.parameters()))
    assert any(line.startswith("blocks.0.fc1.U") and "hidden" in line for line in lines)


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        mup.param_info(BASE, base=BASE, optimizer="lion")
    with pytest.raises(ValueError, match="lr_rule"):
        mup.param_info(BASE, base=BASE, lr_rule="naive")
