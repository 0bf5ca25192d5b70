"""structlin.aux: modules record auxiliary losses and statistics; a training loop collects them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlin.aux import add_aux_loss, add_aux_stat, clear_aux, collect_aux
from structlin.layers.btt_moe import BTTMoELinear


class Penalised(nn.Module):
    """``y = x w``; records ``(w - 3)^2`` with weight ``lam`` and the mean output."""

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.w
        add_aux_loss(self, "pull", (self.w - 3.0).square(), self.lam)
        add_aux_stat(self, "mean", y.mean())
        return y


def test_collect_sums_weighted_terms_over_modules_and_clears():
    model = nn.Sequential(Penalised(1.0), Penalised(0.5))
    with torch.no_grad():
        model[1].w.fill_(1.0)
    model(torch.ones(4))
    aux = collect_aux(model)
    assert aux.loss.item() == pytest.approx(1.0 * 9 + 0.5 * 4)
    assert {k: v.item() for k, v in aux.losses["pull"].items()} == {"0": 9.0, "1": 4.0}
    assert aux.stats["mean"]["1"].item() == 0.0 and not aux.stats["mean"]["1"].requires_grad
    metrics = aux.metrics()
    assert metrics == {"aux_loss": 11.0, "pull": 6.5, "mean": 0.0}
    assert collect_aux(model).loss is None  # cleared


def test_each_call_replaces_the_record_and_clear_drops_it():
    m = Penalised()
    m(torch.ones(2))
    with torch.no_grad():
        m.w.fill_(2.0)
    m(torch.ones(2))
    assert collect_aux(m, clear=False).loss.item() == pytest.approx(1.0)  # the latest call only
    assert collect_aux(m).loss.item() == pytest.approx(1.0)  # clear=False kept it
    m(torch.ones(2))
    clear_aux(m)
    assert collect_aux(m).loss is None


def test_vector_stats_average_or_split_by_module():
    a, b, c = nn.Module(), nn.Module(), nn.Module()
    model = nn.ModuleDict({"a": a, "b": b, "c": c})
    add_aux_stat(a, "frac", torch.tensor([1.0, 0.0]))
    add_aux_stat(b, "frac", torch.tensor([0.0, 1.0]))
    assert collect_aux(model).metrics() == {"frac": [0.5, 0.5]}
    add_aux_stat(a, "frac", torch.tensor([1.0, 0.0]))
    add_aux_stat(c, "frac", torch.tensor([0.25, 0.25, 0.5]))
    assert collect_aux(model).metrics() == {"frac/a": [1.0, 0.0], "frac/c": [0.25, 0.25, 0.5]}


def test_a_training_loop_minimises_task_plus_aux_loss():
    # task: fit y = 1 * x; aux pulls w to 3 with weight lam; optimum w = (1 + 3 lam) / (1 + lam)
    torch.manual_seed(0)
    lam = 0.5
    model = nn.Sequential(Penalised(lam))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256)
    for _ in range(200):
        task = F.mse_loss(model(x), x) / x.square().mean()
        aux = collect_aux(model)
        opt.zero_grad()
        (task + aux.loss).backward()
        opt.step()
    assert model[0].w.item() == pytest.approx((1 + 3 * lam) / (1 + lam), abs=1e-3)


def test_compiled_forward_records_without_graph_break_or_recompilation():
    torch._dynamo.reset()
    model = Penalised(2.0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.0, 1.0, 2.0):
            with torch.no_grad():
                model.w.fill_(value)
            compiled(torch.ones(3))
            aux = collect_aux(compiled)
            assert aux.loss.item() == pytest.approx(2.0 * (value - 3.0) ** 2)
            aux.loss.backward()
            assert model.w.grad.item() == pytest.approx(4.0 * (value - 3.0))
            model.w.grad = None


def test_moe_aux_loss_steers_the_router_away_from_an_overloaded_expert():
    """Collapsed on expert 0, a step on the aux loss alone lowers expert 0's logits (the
    load-balancing term) and raises the others'."""
    torch.manual_seed(0)
    layer = BTTMoELinear(32, 32, experts=4, top_k=1, aux_weight=1.0)
    x = torch.randn(512, 32) + 1.0
    with torch.no_grad():
        layer.router[0].fill_(0.3)
    opt = torch.optim.SGD([layer.router], lr=0.01)
    before = layer.route(x).logits.mean(0)
    layer(x)
    aux = collect_aux(layer)
    assert aux.stats["expert_fraction"][""].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert aux.losses["load_balance"][""].item() > 3.9  # E * P_0 with P_0 near 1
    aux.loss.backward()
    opt.step()
    change = layer.route(x).logits.mean(0) - before
    assert change[0] < 0 and (change[1:] > 0).all()
    layer(x)
    assert collect_aux(layer).losses["load_balance"][""] < aux.losses["load_balance"][""]


def test_ddp_collects_records_of_the_wrapped_modules(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        layer = BTTMoELinear(16, 16, experts=4, top_k=2)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(layer))
        y = ddp(torch.randn(8, 16))
        aux = collect_aux(ddp)
        assert set(aux.losses) == {"load_balance", "router_z"}
        (y.square().mean() + aux.loss).backward()
        assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()
