"""The StructuredLinear contract: forward == dense matmul, fast == reference, same gradients."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_cases import (
    CASES,
    LEAD_SHAPES,
    build,
    case_id,
    dense_forward,
    grads,
    layer_configs,
)
from torch import nn

from structlin import (
    KronLinear,
    StructuredLinear,
    make_linear,
    mup_init_std,
    parse_spec,
    register_structure,
)
from structlin.layers import registry

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
HYP = settings(max_examples=20, deadline=None)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("lead", LEAD_SHAPES, ids=str)
def test_forward_matches_dense_and_reference(case, lead):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, dense_forward(layer, x), **TIGHT)
    torch.testing.assert_close(y, layer.reference_forward(x), **TIGHT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_reference(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    g = torch.randn(2, 3, d_out, dtype=torch.float64)
    fast = grads(layer, x, g, reference=False)
    ref = grads(layer, x, g, reference=True)
    assert fast.keys() == ref.keys()
    assert len(fast) == 1 + len(list(layer.parameters()))
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], **TIGHT, msg=name)
    # gradient w.r.t. x equals g @ W, and w.r.t. the bias the summed output gradient
    torch.testing.assert_close(fast["x"], g @ layer.to_dense(), **TIGHT)
    torch.testing.assert_close(fast["bias"], g.sum((0, 1)), **TIGHT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_bias(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts, bias=False)
    assert layer.bias is None
    x = torch.randn(4, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T, **TIGHT)
    torch.testing.assert_close(layer.reference_forward(x), x @ layer.to_dense().T, **TIGHT)


@pytest.mark.parametrize(
    ("spec", "d_in", "d_out", "opts"),
    [
        ("btt", 768, 3072, {"rank": 1}),
        ("btt", 3072, 768, {"cores": 3, "rank": 1}),
        ("monarch", 768, 768, {"blocks": 4}),
        ("tt", 768, 97, {"rank": 2}),
        ("kron", 3072, 768, {"cores": 3}),
        ("low_rank", 768, 97, {"rank": 8}),
        ("block_diag", 97, 768, {"blocks": 7}),
    ],
)
def test_large_widths_tiny_batch(spec, d_in, d_out, opts):
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(2, d_in, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, d_out)
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, dense_forward(layer, x), rtol=1e-9, atol=1e-9)


@HYP
@given(cfg=layer_configs(), lead=st.sampled_from(LEAD_SHAPES), seed=st.integers(0, 2**16))
def test_forward_property(cfg, lead, seed):
    spec, d_in, d_out, opts = cfg
    layer = build(spec, d_in, d_out, opts, seed=seed)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    torch.testing.assert_close(y, dense_forward(layer, x), **TIGHT)
    torch.testing.assert_close(y, layer.reference_forward(x), **TIGHT)


@HYP
@given(cfg=layer_configs(), seed=st.integers(0, 2**16))
def test_gradient_property(cfg, seed):
    spec, d_in, d_out, opts = cfg
    layer = build(spec, d_in, d_out, opts, seed=seed)
    x = torch.randn(3, d_in, dtype=torch.float64)
    g = torch.randn(3, d_out, dtype=torch.float64)
    fast = grads(layer, x, g, reference=False)
    ref = grads(layer, x, g, reference=True)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], **TIGHT, msg=name)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_contiguous_input(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    base = torch.randn(d_in, 5, dtype=torch.float64)
    x = base.T  # (5, d_in), not contiguous (unless d_in == 1)
    expected = dense_forward(layer, x.contiguous())
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    torch.testing.assert_close(layer.reference_forward(x), expected, **TIGHT)
    x3 = torch.randn(3, d_in, 4, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(layer(x3), dense_forward(layer, x3.contiguous()), **TIGHT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_to_dense_shape_and_linearity(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    w = layer.to_dense()
    assert w.shape == (d_out, d_in) and w.dtype == torch.float64
    # differentiable in the factors (e.g. for a penalty on W), without touching the bias
    w.square().sum().backward()
    assert all(f.tensor.grad is not None for f in layer.factors())
    assert layer.bias.grad is None
    assert layer.in_padded >= d_in and layer.out_padded >= d_out
    # the columns of W are the images of the basis vectors (bias removed)
    eye = torch.eye(d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(eye) - layer.bias, w.T, **TIGHT)


def test_padding_reported_and_harmless():
    layer = build("btt", 97, 13, {"rank": 1})
    assert (layer.in_padded, layer.out_padded) == (98, 14)
    assert "padded=(98, 14)" in repr(layer)
    unpadded = build("btt", 12, 20)
    assert (unpadded.in_padded, unpadded.out_padded) == (12, 20)
    assert "padded" not in repr(unpadded)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_extra_repr(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    text = repr(layer)
    assert f"in_features={d_in}" in text and f"out_features={d_out}" in text
    for key, value in opts.items():
        assert f"{key}={value}" in text, (key, text)
    for f in layer.factors():
        assert f"{f.name}{tuple(f.tensor.shape)}" in text
    assert f"params={layer.num_params / layer.dense_params:.3g}x dense" in text
    assert f"macs={layer.macs() / layer.dense_macs:.3g}x dense" in text


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_factors_records(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    fs = layer.factors()
    assert fs
    params = dict(layer.named_parameters())
    for f in fs:
        assert params[f.name] is f.tensor
        assert layer.get_parameter(f.name) is f.tensor
        assert f.tensor.shape[-2:] == (f.fan_out, f.fan_in)
    # every parameter but the bias is a factor
    assert {f.name for f in fs} == set(params) - {"bias"}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_batch(case, lead):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    assert layer(x).shape == (*lead, d_out)
    assert layer.reference_forward(x).shape == (*lead, d_out)


# ---------------------------------------------------------------------------- spec and options
def _factor_shapes(layer) -> list:
    return [(f.name, tuple(f.tensor.shape), f.fan_in, f.fan_out) for f in layer.factors()]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    "common",
    [{}, {"norm": "rms_clamp"}, {"norm": "rms_clamp", "learn_gamma": False}],
    ids=["plain", "norm", "norm-fixed-gamma"],
)
def test_spec_round_trip(case, common):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, {**opts, **common})
    options = layer.options()
    assert parse_spec(layer.spec) == (layer.structure, options)
    for key, value in {**opts, **common}.items():  # every option given is reported as used
        assert options[key] == value, key
    for bias in (True, False):
        rebuilt = make_linear(layer.spec, d_in, d_out, bias=bias, dtype=torch.float64)
        assert type(rebuilt) is type(layer)
        assert _factor_shapes(rebuilt) == _factor_shapes(layer)
        assert (rebuilt.in_padded, rebuilt.out_padded) == (layer.in_padded, layer.out_padded)
        assert rebuilt.options() == options and rebuilt.macs() == layer.macs()
    # the same parameters, so the state dict loads and the function is the same
    rebuilt = make_linear(layer.spec, d_in, d_out, dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, d_in, dtype=torch.float64)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "d_in", "d_out", "opts", "text"),
    [
        ("btt", 20, 20, {"in_factors": (5, 5), "pad_tolerance": 0.3}, "pad_tolerance=0.3"),
        ("tt", 20, 20, {"in_factors": (8, 8), "pad_tolerance": math.inf}, "pad_tolerance=inf"),
        ("kron", 20, 24, {"out_factors": (5, 5), "pad_tolerance": 0.05}, "pad_tolerance=0.05"),
        ("btt", 768, 768, {"in_factors": (32, 24)}, "in_factors=32x24"),
    ],
)
def test_spec_keeps_the_padding_that_explicit_factors_need(spec, d_in, d_out, opts, text):
    layer = make_linear(spec, d_in, d_out, **opts)
    assert text in layer.spec
    assert parse_spec(layer.spec) == (layer.structure, layer.options())
    assert _factor_shapes(make_linear(layer.spec, d_in, d_out)) == _factor_shapes(layer)


def test_default_pad_tolerance_is_not_in_the_spec():
    assert "pad_tolerance" not in make_linear("btt", 97, 13).spec  # padded 97 -> 98 by default


@pytest.mark.parametrize(
    ("spec", "opts", "cores", "rank"),
    [
        # 4 has no 3-factor split without a factor of 1: such a split must be asked for
        ("tt", {"cores": 3, "rank": 2, "out_factors": (1, 2, 2)}, 3, 2),
        ("tt", {}, 2, 4),  # the default rank 16 is capped at the largest useful rank, 4
        ("kron", {"cores": 3, "out_factors": (1, 2, 2)}, 3, 1),
        ("btt", {"cores": 3, "rank": 2, "out_factors": (1, 2, 2)}, 3, 2),
        ("monarch", {"blocks": 2}, 2, 1),  # h = 2 (rounded up to a multiple of b), r = h / b
        ("low_rank", {"rank": 3}, None, 3),
    ],
)
def test_cores_and_rank_are_the_ints_used(spec, opts, cores, rank):
    layer = make_linear(spec, 8, 4, **opts)
    assert type(layer.rank) is int and layer.rank == rank
    if cores is None:
        assert not hasattr(layer, "cores")
        return
    assert type(layer.cores) is int and layer.cores == cores
    assert len(layer.weights) == len(layer.factors()) == len(layer.in_factors) == cores
    assert max(layer.ranks) == rank and len(layer.ranks) == cores + 1


def test_extra_repr_shows_the_options():
    layer = make_linear("btt", 64, 96, rank=2, norm="rms_clamp", learn_gamma=False)
    text = repr(layer)
    for key, value in layer.options().items():
        assert f"{key}={value!r}" in text
    assert "learn_gamma=False" in text and "norm='rms_clamp'" in text
    assert "learn_gamma" not in repr(make_linear("btt", 64, 96, norm="rms_clamp"))


# ---------------------------------------------------------------------------- the subclass contract
class TwoFactorLinear(StructuredLinear):
    """A complete structure: ``W = B A``, ``A`` (r, d_in) then ``B`` (d_out, r)."""

    def __init__(self, in_features, out_features, bias=True, *, rank=2, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.rank = rank
        self.A = nn.Parameter(torch.empty(rank, in_features, **self.factory_kwargs))
        self.B = nn.Parameter(torch.empty(out_features, rank, **self.factory_kwargs))

    def _factor_fans(self):
        return [("A", self.in_features, self.rank), ("B", self.rank, self.out_features)]

    def _reference_matmul(self, x, weights):
        a, b = weights
        return x @ a.T @ b.T

    def options(self):
        return {"rank": self.rank, **super().options()}


@pytest.fixture
def two_factor():
    """TwoFactorLinear registered under a test-only name (a subclass, so that the class itself
    stays unregistered) and unregistered afterwards."""
    name = "test_two_factor"
    assert name not in registry._REGISTRY
    try:
        yield name, register_structure(name)(type("TwoFactor", (TwoFactorLinear,), {}))
    finally:
        registry._REGISTRY.pop(name, None)


def test_a_new_structure_is_one_class(two_factor):
    name, cls = two_factor
    torch.manual_seed(0)
    layer = make_linear(f"{name}:rank=16", 256, 128, dtype=torch.float64)
    assert type(layer) is cls and layer.spec == f"{name}:rank=16"
    assert [(f.name, f.fan_in, f.fan_out) for f in layer.factors()] == [
        ("A", 256, 16),
        ("B", 16, 128),
    ]
    assert layer.macs(3) == 3 * 16 * (256 + 128)
    assert layer.num_params == 16 * 256 + 128 * 16 + 128
    # μP init: each factor drawn with its own std, the bias zero
    for f in layer.factors():
        std = f.tensor.std().item()
        assert std == pytest.approx(mup_init_std(f.fan_in, f.fan_out), rel=0.1), f.name
    assert torch.count_nonzero(layer.bias) == 0
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 5, 256, dtype=torch.float64)
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    torch.testing.assert_close(layer.reference_forward(x), expected, **TIGHT)
    layer.reset_parameters(zero_init_last=True)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.bias) == 0
    normed = make_linear(name, 8, 8, norm="rms_clamp")
    assert [n for n, _ in normed.named_parameters() if "gammas" in n] == ["gammas.0", "gammas.1"]


def test_spec_of_an_unregistered_class_is_an_error():
    layer = TwoFactorLinear(4, 3)
    assert layer.options() == {"rank": 2}
    with pytest.raises(ValueError, match="TwoFactorLinear is not registered"):
        _ = layer.spec


class _Counting(KronLinear):
    """Three ``__init__`` levels (this class, Kron, TT) that record when the layer is finished."""

    finished: ClassVar[list[bool]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.body_done = True

    def reset_parameters(self, zero_init_last: bool = False) -> None:
        type(self).finished.append(self.__dict__.get("body_done", False))
        super().reset_parameters(zero_init_last)


class _Inherited(_Counting):
    """No ``__init__`` of its own."""

    finished: ClassVar[list[bool]] = []


@pytest.mark.parametrize("cls", [_Counting, _Inherited])
def test_finishing_runs_once_after_the_outermost_init(cls):
    cls.finished.clear()
    layer = cls(12, 20)
    assert cls.finished == [True]  # once, and after the body of the outermost __init__
    assert not hasattr(layer, "factory_kwargs")  # construction-only
    layer.reset_parameters()
    assert cls.finished == [True, True]


def _half_structure(**methods):
    def __init__(self, in_features, out_features, bias=True, **kwargs):
        StructuredLinear.__init__(self, in_features, out_features, bias, **kwargs)
        self.w = nn.Parameter(torch.empty(out_features, in_features))

    return type("Half", (StructuredLinear,), {"__init__": __init__, **methods})


def test_a_forgotten_method_is_an_error_at_construction():
    fans = {"_factor_fans": lambda self: [("w", self.in_features, self.out_features)]}
    matmul = {"_reference_matmul": lambda self, x, ws: x @ ws[0].T}
    with pytest.raises(TypeError, match="Half must implement _reference_matmul"):
        _half_structure(**fans)(4, 3)
    with pytest.raises(TypeError, match="Half must implement _factor_fans"):
        _half_structure(**matmul)(4, 3)
    layer = _half_structure(**fans, **matmul)(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ layer.w.T + layer.bias)


def test_factor_fans_must_match_the_stored_shapes():
    swapped = {"_factor_fans": lambda self: [("w", self.out_features, self.in_features)]}
    matmul = {"_reference_matmul": lambda self, x, ws: x @ ws[0].T}
    with pytest.raises(TypeError, match=r"factor 'w' has shape \(3, 4\).*4 x 3"):
        _half_structure(**swapped, **matmul)(4, 3)
    missing = {"_factor_fans": lambda self: [("v", 4, 3)]}
    with pytest.raises(AttributeError, match="v"):
        _half_structure(**missing, **matmul)(4, 3)


PRE_CONTRACT = Path(__file__).parents[1] / "data" / "pre_contract_layers.pt"


@pytest.mark.parametrize(
    "spec", ["btt:rank=2,norm=rms_clamp", "monarch:blocks=4", "tt:rank=2", "kron"]
)
def test_state_dicts_from_before_the_contract_load_and_compute_the_same(spec):
    # Saved by the code before the layer contract (commit 83c9fd7^), which named the core tensors
    # ``cores.N``: a model inside a container, strict, must load them and give the same outputs.
    saved = torch.load(PRE_CONTRACT, weights_only=True)[spec]
    assert any(k.startswith("cores.") for k in saved["state"])
    model = torch.nn.Sequential(make_linear(spec, 64, 48))
    model.load_state_dict({f"0.{k}": v for k, v in saved["state"].items()}, strict=True)
    torch.testing.assert_close(model(saved["x"]), saved["y"], rtol=1e-5, atol=1e-6)
    assert all(k.startswith(("0.weights.", "0.bias", "0.gammas.")) for k in model.state_dict())
    fresh = make_linear(spec, 64, 48)
    fresh.load_state_dict(model[0].state_dict(), strict=True)  # today's names load unchanged
    torch.testing.assert_close(fresh(saved["x"]), saved["y"], rtol=1e-5, atol=1e-6)
