"""The dense-expert MoE FFN baseline and GPT-2's ``mlp="moe"`` option."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlin import mup
from structlin.aux import collect_aux
from structlin_lab.models import GPT2, GPTConfig
from structlin_lab.models.moe import MoEMLP

V, T = 50, 16


def config(**kw):
    base = dict(vocab_size=V, block_size=T, n_layer=2, d_model=32, d_head=16, mlp="moe")
    return GPTConfig(**{**base, "n_experts": 4, "top_k": 2, **kw})


def randomised(block: MoEMLP, seed: int = 0) -> MoEMLP:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.eval()


def test_moe_mlp_equals_the_per_row_sum_of_its_selected_experts():
    block = randomised(MoEMLP(16, 24, experts=4, top_k=2))
    x = torch.randn(3, 5, 16)
    y = block(x)
    assert y.shape == x.shape
    flat = x.reshape(-1, 16)
    logits = flat @ block.router.weight.T
    top = logits.topk(2, dim=1)
    weights = torch.softmax(top.values, dim=1)
    expected = torch.stack(
        [
            sum(
                w * block.experts[e].mlp_proj(F.gelu(block.experts[e].c_fc(row)))
                for w, e in zip(weights[n], top.indices[n].tolist(), strict=True)
            )
            for n, row in enumerate(flat)
        ]
    )
    torch.testing.assert_close(y.reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)


def test_moe_mlp_starts_as_zero_with_uniform_routing_and_records_aux():
    torch.manual_seed(0)
    block = MoEMLP(16, 32, experts=4, top_k=2)
    x = torch.randn(200, 16)
    y = block(x)
    assert torch.count_nonzero(y) == 0  # mlp_proj starts at zero, like GPT-2's FFN
    aux = collect_aux(block)
    assert aux.losses["load_balance"][""].item() == pytest.approx(1.0)
    fraction = aux.stats["expert_fraction"][""]
    assert fraction.min() > 0.15  # exact ties broken at random: every expert used


def test_moe_mlp_gradients_reach_router_and_every_expert():
    block = randomised(MoEMLP(16, 24, experts=4, top_k=2)).train()
    x = torch.randn(64, 16)
    (block(x).square().mean() + collect_aux(block).loss).backward()
    assert block.router.weight.grad.abs().sum() > 0
    for expert in block.experts:
        assert expert.c_fc.weight.grad.abs().sum() > 0


def test_moe_mlp_refuses_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(16, 16, experts=2, top_k=3)


def test_gpt2_with_moe_trains_with_the_collected_aux_loss():
    torch.manual_seed(0)
    model = GPT2(config())
    assert isinstance(model.blocks[0].mlp, MoEMLP)
    idx = torch.randint(0, V, (4, T))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, task = model(idx, idx)
        aux = collect_aux(model)
        assert set(aux.losses["load_balance"]) == {"blocks.0.mlp", "blocks.1.mlp"}
        opt.zero_grad()
        (task + aux.loss).backward()
        opt.step()
        losses.append(task.item())
    assert losses[-1] < losses[0] - 0.5
    metrics = aux.metrics()
    assert len(metrics["expert_fraction"]) == 4 and 0 < metrics["expert_entropy"] <= 1.3863


def test_gpt2_moe_macs_count_active_experts():
    dense = GPT2(config(mlp="dense"))
    moe = GPT2(config())
    d, h = 32, 4 * 32
    # per layer: the dense FFN's 2 d h is replaced by k = 2 experts' 2 d h plus the router's E d
    extra = 2 * (2 * 2 * d * h + 4 * d - 2 * d * h)
    assert moe.macs_per_token() == dense.macs_per_token() + extra


def test_gpt2_moe_mup_treats_experts_as_dense_layers_and_router_as_readout():
    model, base = GPT2(config(d_model=64)), GPT2(config(d_model=32))
    infos = {i.name: i for i in mup.param_info(model, base=base)}
    fc = infos["blocks.0.mlp.experts.3.c_fc.weight"]
    proj = infos["blocks.0.mlp.experts.3.mlp_proj.weight"]
    router = infos["blocks.0.mlp.router.weight"]
    assert (fc.role, fc.lr_mult) == ("hidden", pytest.approx(32 / 64))
    assert (proj.role, proj.lr_mult) == ("hidden", pytest.approx(128 / 256))
    assert (router.role, router.lr_mult) == ("readout", pytest.approx(32 / 64))


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"mlp": "sparse"}, "mlp"), ({"n_experts": 0}, "n_experts"), ({"top_k": 5}, "top_k")],
)
def test_gpt_config_validates_the_moe_options(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_replace_keeps_the_moe_option():
    cfg = dataclasses.replace(config(), d_model=64)
    assert (cfg.mlp, cfg.n_experts, cfg.top_k) == ("moe", 4, 2)
    assert isinstance(GPT2(cfg).blocks[1].mlp, MoEMLP)
    assert not isinstance(GPT2(config(mlp="dense")).blocks[1].mlp, (MoEMLP, nn.Linear))
