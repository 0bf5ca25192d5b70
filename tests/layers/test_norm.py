import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structlin as sl
from structlin.layers.base import mup_init_std

STRUCTS = ["dense", "low_rank", "kron", "tt", "btt", "monarch", "block_diag"]


def _rms(t):
    return t.double().square().mean().sqrt().item()


@pytest.mark.parametrize("name", STRUCTS)
def test_clamp_caps_factor_rms_at_init_and_leaves_smaller_factors(name):
    torch.manual_seed(0)
    layer = sl.make_linear(name, 48, 64, norm="rms_clamp", dtype=torch.float64)
    plain = sl.make_linear(name, 48, 64, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "gammas" not in k})
    factors = layer.factors()
    with torch.no_grad():
        factors[0].tensor.mul_(10.0)
        if len(factors) > 1:
            factors[-1].tensor.mul_(0.5)
        layer.gammas[0].fill_(2.0)
    used = layer._forward_weights()
    f0, fl = factors[0], factors[-1]
    assert _rms(used[0]) == pytest.approx(2.0 * mup_init_std(f0.fan_in, f0.fan_out), rel=1e-6)
    if len(factors) > 1:
        assert torch.allclose(used[-1], fl.tensor)  # below the cap: untouched
    x = torch.randn(3, 48, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.reference_forward(x))
    assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias)


def test_gammas_and_learn_gamma_false():
    layer = sl.make_linear("btt", 64, 64, norm="rms_clamp")
    assert [n for n, _ in layer.named_parameters() if "gammas" in n] == ["gammas.0", "gammas.1"]
    assert all(g.item() == 1.0 and g.dim() == 0 for g in layer.gammas)
    fixed = sl.make_linear("btt", 64, 64, norm="rms_clamp", learn_gamma=False)
    assert fixed.gammas is None and len(list(fixed.parameters())) == 3
    with pytest.raises(ValueError, match="norm must be None or one of"):
        sl.make_linear("btt", 64, 64, norm="spectral")


@pytest.mark.parametrize("name", ["btt", "tt", "low_rank"])
def test_norm_does_not_change_macs(name):
    x = torch.randn(16, 64)
    counts = []
    for norm in (None, "rms_clamp"):
        layer = sl.make_linear(name, 64, 96, norm=norm)
        assert layer.macs(16) == sl.make_linear(name, 64, 96).macs(16)
        with FlopCounterMode(display=False) as fc:
            layer.reference_forward(x)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 2 * layer.macs(16)


def test_norm_gradients_flow_to_factors_and_gammas():
    torch.manual_seed(0)
    layer = sl.make_linear("btt", 64, 64, norm="rms_clamp", dtype=torch.float64)
    with torch.no_grad():
        layer.weights[0].mul_(5.0)  # clamped: gradient goes through the RMS as well
    x = torch.randn(4, 64, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in layer.parameters()
        if p is not layer.bias
    )
    small = sl.make_linear("btt", 16, 16, norm="rms_clamp", dtype=torch.float64)
    with torch.no_grad():
        small.weights[0].mul_(4.0)
    params = {k: v.detach().clone().requires_grad_() for k, v in small.named_parameters()}
    names = list(params)

    def fn(x, *values):
        return torch.func.functional_call(small, dict(zip(names, values, strict=True)), (x,))

    xs = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (xs, *params.values()))


def test_norm_zero_init_last_and_from_dense():
    torch.manual_seed(0)
    layer = sl.make_linear("btt", 64, 64, norm="rms_clamp", dtype=torch.float64)
    layer.reset_parameters(zero_init_last=True)
    assert torch.count_nonzero(layer.to_dense()) == 0
    target = sl.make_linear("btt", 64, 64, dtype=torch.float64)
    with torch.no_grad():
        target.weights[0].mul_(7.0)  # well above the init RMS
    layer.from_dense(target.to_dense())
    assert torch.allclose(layer.to_dense(), target.to_dense(), atol=1e-10)


def test_norm_under_autocast_and_compile():
    layer = sl.make_linear("btt", 64, 64, norm="rms_clamp")
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.gammas[0].grad is not None and layer.gammas[0].grad.dtype == torch.float32
    compiled = torch.compile(layer, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("name", STRUCTS)
def test_rms_ratios_are_one_at_init_and_follow_the_stored_factors(name):
    torch.manual_seed(0)
    layer = sl.make_linear(name, 256, 192, norm="rms_clamp", dtype=torch.float64)
    ratios = [r.item() for r in layer.rms_ratios()]
    assert len(ratios) == len(layer.factors())
    assert ratios == pytest.approx([1.0] * len(ratios), rel=0.25)
    with torch.no_grad():
        layer.factors()[0].tensor.mul_(3.0)
    assert layer.rms_ratios()[0].item() == pytest.approx(3.0 * ratios[0], rel=1e-4)  # eps
    # The clamp divides by exactly this ratio, so the used factor is back at its init RMS.
    used = layer._forward_weights()[0]
    f0 = layer.factors()[0]
    assert _rms(used) == pytest.approx(mup_init_std(f0.fan_in, f0.fan_out), rel=1e-4)
    layer.reset_parameters(zero_init_last=True)
    assert layer.rms_ratios()[-1].item() < 1e-2
    layer.rms_ratios()[0].backward()
    assert layer.factors()[0].tensor.grad is not None
