"""Spectral μP initialisation: per-factor std, zero_init_last, width-independent spectral norm."""

from __future__ import annotations

import math

import pytest
import torch
from layer_cases import CASES, build, case_id

from structlin import make_linear, mup_init_std

INIT_CASES = [
    ("dense", {}),
    ("low_rank", {}),
    ("block_diag", {}),
    ("tt", {"rank": 4}),
    ("kron", {}),
    ("btt", {}),
    ("btt", {"rank": 2}),
    ("btt", {"cores": 3}),
    ("monarch", {}),
    ("tt", {"cores": 3, "rank": 4}),
    ("kron", {"cores": 3}),
]


def _init_id(case):
    spec, opts = case
    return spec + "".join(f"-{k}={v}" for k, v in opts.items())


def test_mup_init_std_formula():
    assert mup_init_std(64, 64) == pytest.approx(1 / 8)
    assert mup_init_std(256, 64) == pytest.approx(8 / 256)
    assert mup_init_std(64, 256) == pytest.approx(8 / 64)
    assert mup_init_std(1, 1) == 1.0


@pytest.mark.parametrize("case", INIT_CASES, ids=_init_id)
@pytest.mark.parametrize(("d_in", "d_out"), [(256, 256), (64, 256)])
def test_per_factor_std(case, d_in, d_out):
    spec, opts = case
    torch.manual_seed(0)
    layer = make_linear(spec, d_in, d_out, **opts)
    assert torch.count_nonzero(layer.bias) == 0
    factors = layer.factors()
    # pool samples over re-initialisations so that every factor has >= 4000 of them
    repeats = max(1, math.ceil(4000 / min(f.tensor.numel() for f in factors)))
    samples: dict[str, list[torch.Tensor]] = {f.name: [] for f in factors}
    for _ in range(repeats):
        layer.reset_parameters()
        for f in factors:
            samples[f.name].append(f.tensor.detach().flatten().clone())
    for f in factors:
        values = torch.cat(samples[f.name])
        expected = mup_init_std(f.fan_in, f.fan_out)
        assert values.std().item() == pytest.approx(expected, rel=0.07), f.name
        assert abs(values.mean().item()) < 5 * expected / math.sqrt(values.numel()), f.name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reset_parameters_restores_init(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(100.0)
    layer.reset_parameters()
    assert torch.count_nonzero(layer.bias) == 0
    for f in layer.factors():
        bound = 8 * mup_init_std(f.fan_in, f.fan_out)
        assert f.tensor.abs().max().item() < bound


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_init_last(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts, random_bias=False)
    layer.reset_parameters(zero_init_last=True)
    factors = layer.factors()
    assert torch.count_nonzero(factors[-1].tensor) == 0
    for f in factors[:-1]:
        assert torch.count_nonzero(f.tensor) == f.tensor.numel(), f.name
    x = torch.randn(4, d_in, dtype=torch.float64)
    y = layer(x)
    assert torch.count_nonzero(y) == 0
    assert torch.count_nonzero(layer.reference_forward(x)) == 0

    # first step: only the last factor (and the bias) get gradient
    g = torch.randn(4, d_out, dtype=torch.float64)
    (y * g).sum().backward()
    assert factors[-1].tensor.grad.abs().sum() > 0
    assert layer.bias.grad.abs().sum() > 0
    for f in factors[:-1]:
        assert torch.count_nonzero(f.tensor.grad) == 0, f.name

    # after one SGD step on every parameter, every factor gets gradient
    with torch.no_grad():
        for p in layer.parameters():
            p -= 0.1 * p.grad
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    for f in factors:
        assert f.tensor.grad.abs().sum() > 0, f.name


def test_zero_init_last_is_a_single_factor_for_dense():
    layer = build("dense", 8, 8)
    layer.reset_parameters(zero_init_last=True)
    assert torch.count_nonzero(layer.weight) == 0
    assert len(layer.factors()) == 1


def _spectral_norm(w: torch.Tensor) -> float:
    w = w.double()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt().item()


def test_spectral_norm_helper():
    w = torch.randn(30, 20, dtype=torch.float64)
    assert _spectral_norm(w) == pytest.approx(torch.linalg.matrix_norm(w, 2).item(), rel=1e-9)
    assert _spectral_norm(w.T) == pytest.approx(torch.linalg.matrix_norm(w, 2).item(), rel=1e-9)


def _spectral_ratio(spec, d_in, d_out, opts, seeds=3):
    """Mean over seeds of ||W||_2 / sqrt(d_out / d_in), the μP-normalised spectral norm."""
    vals = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = make_linear(spec, d_in, d_out, **opts)
        vals.append(_spectral_norm(layer.to_dense().detach()) / math.sqrt(d_out / d_in))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("case", INIT_CASES, ids=_init_id)
@pytest.mark.parametrize("aspect", [1, 2, 0.5], ids=["square", "wide", "narrow"])
def test_spectral_norm_band_and_width_independence(case, aspect):
    spec, opts = case
    ratios = [_spectral_ratio(spec, d, int(d * aspect), opts) for d in (64, 256)]
    for r in ratios:
        assert 0.3 <= r <= 8.0, ratios
    assert 1 / 1.6 <= ratios[1] / ratios[0] <= 1.6, ratios
