"""BTT-MoE: routing, the selected-experts path against the all-experts reference and against
rank-1 BTTs, auxiliary losses, zero-initialised router, gradients, μP, MACs, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from structlin import counting_macs, is_counting_macs, make_linear, mup, parse_spec
from structlin.aux import clear_aux, collect_aux
from structlin.layers import BTTLinear
from structlin.layers.btt_moe import BTTMoELinear, moe_aux_losses, route_top_k
from structlin.surgery import structurize


def moe(d_in=64, d_out=48, seed=0, router_std=1.0, **kw):
    torch.manual_seed(seed)
    layer = BTTMoELinear(d_in, d_out, **kw)
    with torch.no_grad():
        layer.router.normal_(0.0, router_std)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer.eval()  # eval: no random tie-breaking, so two forwards route alike


def expert_btts(layer: BTTMoELinear) -> list[BTTLinear]:
    """Each expert as a stand-alone rank-1 ``BTTLinear`` with the same cores."""
    out = []
    for e in range(layer.experts):
        btt = BTTLinear(
            layer.in_features,
            layer.out_features,
            bias=False,
            rank=1,
            in_factors=layer.in_factors,
            out_factors=layer.out_factors,
        )
        with torch.no_grad():
            btt.weights[0].copy_(layer.weights[0][e])
            btt.weights[1].copy_(layer.weights[1][e])
        out.append(btt)
    return out


def test_route_top_k_picks_the_largest_logits_and_softmaxes_them():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]])
    r = route_top_k(logits, 2)
    assert [set(row) for row in r.indices.tolist()] == [{1, 3}, {0, 2}]
    expected = torch.softmax(logits.gather(1, r.indices), dim=1)
    torch.testing.assert_close(r.weights, expected)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(2))
    # the weight of logit 3 against logit 2 is e / (1 + e)
    row0 = dict(zip(r.indices[0].tolist(), r.weights[0].tolist(), strict=True))
    assert row0[1] == pytest.approx(math.e / (1 + math.e))


@pytest.mark.parametrize(("d_in", "d_out"), [(64, 48), (60, 50)])  # 60 and 50 are zero-padded
@pytest.mark.parametrize("bias", [True, False])
def test_selected_experts_equal_the_all_experts_reference_and_rank1_btts(d_in, d_out, bias):
    layer = moe(d_in, d_out, experts=6, top_k=2, compute="selected", bias=bias)
    x = torch.randn(300, d_in)
    y = layer(x)
    torch.testing.assert_close(y, layer.reference_forward(x), atol=1e-5, rtol=1e-5)
    layer.compute = "all"
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    # independent reference: per row, the gate-weighted sum of the selected rank-1 BTTs
    routing = layer.route(x)
    assert routing.indices.shape == (300, 2)
    experts = torch.stack([btt(x) for btt in expert_btts(layer)], dim=1)  # (N, E, d_out)
    picked = experts.gather(1, routing.indices[..., None].expand(-1, -1, d_out))
    expected = (routing.weights[..., None] * picked).sum(1)
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_leading_dimensions_and_a_row_routed_only_to_unused_experts():
    layer = moe(32, 32, experts=8, top_k=1, compute="selected")
    x = torch.randn(2, 3, 32)
    y = layer(x)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, layer.reference_forward(x), atol=1e-5, rtol=1e-5)


def test_aux_losses_have_their_formula_value_on_a_hand_built_case():
    # 4 rows, 3 experts, k=1: rows choose experts 0, 0, 1, 2.
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    r = route_top_k(logits, 1)
    terms = moe_aux_losses(r, 3)
    f = torch.tensor([0.5, 0.25, 0.25])
    p = torch.softmax(logits, 1).mean(0)
    torch.testing.assert_close(terms["expert_fraction"], f)
    assert terms["load_balance"].item() == pytest.approx(3 * float((f * p).sum()), rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert terms["router_z"].item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert terms["expert_entropy"].item() == pytest.approx(entropy, rel=1e-6)


def test_layer_records_weighted_aux_loss_and_utilisation():
    layer = moe(experts=4, top_k=2, aux_weight=0.5)
    x = torch.randn(50, 64)
    layer(x)
    aux = collect_aux(layer)
    terms = moe_aux_losses(layer.route(x), 4)
    expected = 0.5 * (terms["load_balance"] + 0.1 * terms["router_z"])
    torch.testing.assert_close(aux.loss, expected)
    torch.testing.assert_close(aux.stats["expert_fraction"][""], terms["expert_fraction"])
    assert collect_aux(layer).loss is None  # collected once, then cleared


def test_zero_initialised_router_routes_uniformly():
    torch.manual_seed(0)
    layer = BTTMoELinear(64, 64, experts=8, top_k=2)
    assert torch.count_nonzero(layer.router) == 0
    x = torch.randn(4000, 64)
    routing = layer.route(x)
    torch.testing.assert_close(routing.weights, torch.full((4000, 2), 0.5))
    torch.testing.assert_close(torch.softmax(routing.logits, 1), torch.full((4000, 8), 1 / 8))
    terms = moe_aux_losses(routing, 8)
    assert terms["load_balance"].item() == pytest.approx(1.0)
    assert terms["router_z"].item() == pytest.approx(math.log(8) ** 2)
    # in training, the exact ties are broken at random: every expert gets about 1/8 of the rows
    fraction = terms["expert_fraction"]
    assert fraction.min() > 0.1 and fraction.max() < 0.15
    # in eval the selection is deterministic
    layer.eval()
    assert torch.equal(layer.route(x).indices, layer.route(x).indices)


@pytest.mark.parametrize("compute", ["selected", "all"])
def test_gradients_reach_router_and_experts(compute):
    layer = moe(experts=4, top_k=2, compute=compute, router_std=0.1).train()
    x = torch.randn(64, 64)
    target = torch.randn(64, 48)
    loss = F.mse_loss(layer(x), target) + collect_aux(layer).loss
    loss.backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    for w in layer.weights:
        per_expert = w.grad.flatten(1).abs().sum(1)
        assert (per_expert > 0).all()  # every expert was selected by some row
    # the aux loss alone trains the router, not the experts
    layer.zero_grad()
    layer(x)
    collect_aux(layer).loss.backward()
    assert layer.router.grad.abs().sum() > 0
    assert all(w.grad is None or w.grad.abs().sum() == 0 for w in layer.weights)


def test_mup_gives_each_expert_the_rank1_btt_multipliers():
    def model(d, structure):
        return nn.Sequential(make_linear(structure, d, d))

    moe_infos = mup.param_info(model(1024, "btt_moe"), base=model(256, "btt_moe"))
    btt_infos = mup.param_info(model(1024, "btt:rank=1"), base=model(256, "btt:rank=1"))
    by_name = {i.name: i for i in moe_infos}
    for ref in btt_infos:
        if ref.name.startswith("0.weights"):
            got = by_name[ref.name]
            assert (got.fan_in, got.fan_out, got.role) == (ref.fan_in, ref.fan_out, ref.role)
            assert got.lr_mult == pytest.approx(ref.lr_mult)
            assert got.init_std == pytest.approx(ref.init_std)
    # the experts are also initialised as rank-1 BTT cores
    layer = BTTMoELinear(1024, 1024)
    for f in layer.factors():
        std = f.tensor.std().item()
        assert std == pytest.approx(math.sqrt(min(f.fan_in, f.fan_out)) / f.fan_in, rel=0.05)
    groups = mup.param_groups(model(1024, "btt_moe"), 1e-3, base=model(256, "btt_moe"))
    assert sum(len(g["params"]) for g in groups) == 4  # two cores, router, bias


def test_mup_router_is_a_readout_with_the_dense_multiplier():
    # needs structlin.mup to treat a 2-D non-factor matrix of the layer's input (the router)
    # as a dense map: fan-in d_in grows, fan-out E does not -> readout, lr x d_in_base / d_in
    infos = {
        i.name: i
        for i in mup.param_info(
            nn.Sequential(BTTMoELinear(1024, 1024)), base=nn.Sequential(BTTMoELinear(256, 256))
        )
    }
    router = infos["0.router"]
    assert (router.role, router.fan_in, router.fan_out) == ("readout", 1024, 8)
    assert router.lr_mult == pytest.approx(256 / 1024)


def test_macs_count_the_active_experts_and_the_router():
    layer = moe(64, 128, experts=8, top_k=2, compute="selected")
    (m1, _), (n0, _) = layer.in_factors, layer.out_factors
    all_experts = 8 * (n0 * 64 + m1 * 128)
    assert layer.macs() == all_experts * 2 // 8 + 8 * 64
    assert layer.macs(10) == 10 * layer.macs()
    assert layer.dense_macs == 64 * 128
    x = torch.randn(400, 64)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * layer.macs(400)  # only the selected experts ran


def test_spec_round_trip_and_options():
    layer = BTTMoELinear(64, 128, experts=4, top_k=1, aux_weight=0.1, compute="all")
    assert layer.spec == (
        "btt_moe:experts=4,top_k=1,aux_weight=0.1,compute=all,in_factors=8x8,out_factors=8x16"
    )
    structure, options = parse_spec(layer.spec)
    assert (structure, options) == ("btt_moe", layer.options())
    again = make_linear(layer.spec, 64, 128)
    assert type(again) is BTTMoELinear and again.options() == layer.options()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experts": 2, "top_k": 3}, "top_k"),
        ({"experts": 0}, "experts"),
        ({"compute": "sparse"}, "compute"),
        ({"aux_weight": float("nan")}, "aux_weight"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BTTMoELinear(64, 64, **kwargs)


def test_there_is_no_dense_matrix():
    layer = BTTMoELinear(64, 64)
    with pytest.raises(NotImplementedError, match="no single dense matrix"):
        layer.to_dense()
    with pytest.raises(NotImplementedError, match="from_dense"):
        layer.from_dense(torch.randn(64, 64))
    with pytest.raises(NotImplementedError, match="from_dense"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
        structurize(model, "btt_moe", target_modules=["0"], init="from_dense")


def test_state_dict_round_trip():
    layer = moe(experts=4, top_k=2)
    fresh = BTTMoELinear(64, 48, experts=4, top_k=2).eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(20, 64)
    torch.testing.assert_close(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weights.0", "weights.1", "router", "bias"}


def test_save_structured_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="save_structured needs safetensors")
    from structlin.persist import load_structured, save_structured

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    model = net()
    structurize(model, "btt_moe:experts=4,top_k=2", target_modules=["0"])
    with torch.no_grad():
        model[0].router.normal_()
    save_structured(model, tmp_path)
    loaded = load_structured(net(), tmp_path)
    assert isinstance(loaded[0], BTTMoELinear) and loaded[0].spec == model[0].spec
    model.eval(), loaded.eval()
    x = torch.randn(10, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_autocast_bfloat16():
    layer = moe(compute="selected")
    x = torch.randn(300, 64).bfloat16().float()  # so that fp32 and bf16 runs route alike
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


def test_compiles_without_graph_break():
    layer = moe(compute="auto").train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(32, 64)
    y = compiled(x)
    aux = collect_aux(layer)
    assert aux.loss is not None and set(aux.losses) == {"load_balance", "router_z"}
    (y.sum() + aux.loss).backward()
    assert layer.router.grad.abs().sum() > 0
    clear_aux(layer)


def test_counting_macs_counts_the_active_experts_of_a_small_input():
    # Below SELECTED_MIN_ROWS, "auto" computes every expert and masks: faster, but not the
    # algorithm macs() describes. Inside counting_macs() the count is the algorithm's.
    layer = moe(64, 128, experts=8, top_k=2)
    x = torch.randn(3, 64)
    with FlopCounterMode(display=False) as small:
        layer(x)
    with counting_macs(), FlopCounterMode(display=False) as counted:
        assert is_counting_macs()
        layer(x)
    assert not is_counting_macs()
    assert counted.get_total_flops() == 2 * layer.macs(3)
    assert small.get_total_flops() > counted.get_total_flops()  # every expert ran outside
