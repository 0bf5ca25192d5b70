"""Serialisation, copying, compilation, low precision and autocast."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from layer_cases import CASES, build, case_id

F64 = torch.float64
EXACT = {"rtol": 0, "atol": 0}

SMALL_CASES = [
    ("dense", 7, 13, {}),
    ("low_rank", 13, 7, {"rank": 3}),
    ("block_diag", 13, 7, {"blocks": 3}),
    ("tt", 12, 20, {"rank": 3}),
    ("kron", 7, 13, {}),
    ("btt", 12, 20, {"rank": 2}),
    ("btt", 7, 13, {"rank": 1}),
    ("btt", 8, 27, {"cores": 3, "rank": 2}),
    ("monarch", 16, 16, {"blocks": 4}),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_round_trip(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts, seed=1)
    fresh = build(spec, d_in, d_out, opts, seed=2)
    x = torch.randn(3, d_in, dtype=F64)
    assert not torch.equal(fresh(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), layer(x), **EXACT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deepcopy_and_pickle(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(2, 3, d_in, dtype=F64)
    y = layer(x)
    clone = copy.deepcopy(layer)
    unpickled = pickle.loads(pickle.dumps(layer))
    for other in (clone, unpickled):
        assert type(other) is type(layer)
        assert other.factors()[0].tensor is not layer.factors()[0].tensor
        torch.testing.assert_close(other(x), y, **EXACT)
        assert repr(other) == repr(layer)
    # the copy is independent
    with torch.no_grad():
        clone.bias.add_(1.0)
    torch.testing.assert_close(layer(x), y, **EXACT)


COMPILE_CASES = [
    ("btt", 12, 20, {"rank": 2}),  # custom autograd.Function
    ("btt", 8, 27, {"cores": 3, "rank": 2}),  # batch-last chain
    ("tt", 7, 13, {"rank": 2}),  # einsum path, padded
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=case_id)
def test_compile_aot_eager(case):
    spec, d_in, d_out, opts = case
    torch._dynamo.reset()
    layer = build(spec, d_in, d_out, opts)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, d_in, dtype=F64, requires_grad=True)
    g = torch.randn(4, d_out, dtype=F64)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12)
    (dx,) = torch.autograd.grad((y * g).sum(), (x,))
    (ref,) = torch.autograd.grad((layer(x) * g).sum(), (x,))
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compile_inductor_btt():
    torch._dynamo.reset()
    layer = build("btt", 64, 48, {"rank": 2}, dtype=torch.float32)
    compiled = torch.compile(layer)
    x = torch.randn(8, 64, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    ref = torch.autograd.grad(layer(x).sum(), (x,))[0]
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"]
)
def test_low_precision_layers(case, dtype, tol):
    spec, d_in, d_out, opts = case
    ref = build(spec, d_in, d_out, opts, dtype=torch.float32)
    layer = build(spec, d_in, d_out, opts, dtype=dtype)
    layer.load_state_dict(ref.state_dict())  # casts to the layer's dtype
    assert all(p.dtype == dtype for p in layer.parameters())
    x = torch.randn(5, d_in)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    y_ref = ref(x)
    scale = y_ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(
        layer.reference_forward(x.to(dtype)).float(), y_ref, rtol=tol, atol=tol * scale
    )
    y.float().sum().backward()
    ref(x).sum().backward()
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == dtype, name
        gscale = p_ref.grad.abs().max().item() + 1.0
        torch.testing.assert_close(p.grad.float(), p_ref.grad, rtol=4 * tol, atol=4 * tol * gscale)


@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
def test_autocast_bf16(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts, dtype=torch.float32)
    x = torch.randn(2, 3, d_in)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = layer.reference_forward(x)
        lin = torch.nn.Linear(d_in, d_out)
        assert lin(x).dtype == torch.bfloat16  # the behaviour we mirror
    assert y.dtype == torch.bfloat16 and y_ref.dtype == torch.bfloat16
    assert y.shape == (2, 3, d_out)
    expected = layer(x)
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(y.float(), expected, rtol=5e-2, atol=5e-2 * scale)
    y.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert layer.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_factory_dtype(dtype):
    for spec in ("dense", "low_rank", "block_diag", "tt", "kron", "btt", "monarch"):
        layer = build(spec, 12, 20, dtype=dtype)
        assert all(p.dtype == dtype for p in layer.parameters()), spec
        assert layer.to_dense().dtype == dtype


def test_layer_to_dtype():
    layer = build("btt", 12, 20, dtype=torch.float32).double()
    x = torch.randn(3, 12, dtype=F64)
    assert layer(x).dtype == F64
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("spec", ["dense", "btt"])
def test_forward_on_meta_device(spec):
    lin = torch.nn.Linear(12, 20, device="meta")
    x = torch.empty(3, 12, device="meta")
    assert lin(x).shape == (3, 20)
    layer = build(spec, 12, 20, dtype=torch.float32).to("meta")
    assert layer(x).shape == (3, 20)
