"""The StructuredLinear contract: forward == dense matmul, fast == reference, same gradients."""

from __future__ import annotations

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

from structlin import StructuredLinear

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
    x = base.T  # (5, d_in), not contiguous
    assert not x.is_contiguous() or d_in == 1
    torch.testing.assert_close(layer(x), dense_forward(layer, x.contiguous()), **TIGHT)
    x3 = torch.randn(3, d_in, 4, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(layer(x3), dense_forward(layer, x3.contiguous()), **TIGHT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_to_dense_shape_and_linearity(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    w = layer.to_dense()
    assert w.shape == (d_out, d_in)
    assert isinstance(layer, StructuredLinear)
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
