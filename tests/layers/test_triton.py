"""Triton kernels of the 2-core BTT / Monarch product against the batched-matmul reference.

Where they run: on a CUDA device when there is one; otherwise on CPU tensors in Triton's
interpreter. Triton picks the interpreter when it defines the kernels, so ``TRITON_INTERPRET=1``
must be set before :mod:`structlin.kernels.triton_kernels` is imported: when this process does
not have it, the kernel tests skip here and :func:`test_kernels_in_the_interpreter` runs this
file in a child process that has it (other tests in this process keep compiled Triton).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[triton])")

from structlin import make_linear
from structlin.kernels import triton_btt
from structlin.kernels.btt import btt2_matmul
from structlin.kernels.triton_btt import (
    btt2_triton,
    btt2_triton_backward,
    btt2_triton_forward,
    fused_fits,
    triton_available,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
runs_here = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="no GPU and TRITON_INTERPRET is not set: test_kernels_in_the_interpreter runs these",
)

# (N, m1, m0, n0, n1, r, bias): non-power-of-two blocks, odd ranks, N not a multiple of the
# tile (32 rows under the interpreter), ranks 1 to 8, and a rank above the fused limit.
SHAPES = [
    (40, 6, 10, 10, 6, 3, True),
    (33, 5, 7, 3, 9, 5, False),
    (9, 4, 4, 4, 4, 1, True),
    (24, 3, 16, 4, 8, 8, False),
    (12, 4, 6, 2, 5, 20, True),
]


def _case(shape, dtype=torch.float32, seed=0):
    rows, m1, m0, n0, n1, r, bias = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    b = rand(n0 * n1) if bias else None
    return rand(rows, m1 * m0), rand(m1, n0 * r, m0), rand(n0, n1, r * m1), b


def _close(actual, expected, tol=1e-4):
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= tol * scale, (actual - expected).abs().max()


@runs_here
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_m{}x{}_n{}x{}_r{}_b{:d}".format(*s))
def test_forward_matches_reference(shape):
    x, w0, w1, b = _case(shape)
    expected = btt2_matmul(x, w0, w1, b)
    paths = [True, False] if fused_fits(w0, w1) else [False]
    assert fused_fits(w0, w1) == (shape[5] <= 16)
    for fused in paths:
        _close(btt2_triton_forward(x, w0, w1, b, fused=fused), expected)


@runs_here
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_m{}x{}_n{}x{}_r{}_b{:d}".format(*s))
def test_autograd_matches_reference(shape):
    inputs = [t for t in _case(shape) if t is not None]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.clone().requires_grad_() for t in inputs]
    y = btt2_triton(*ours)
    y_ref = btt2_matmul(*ref)
    _close(y, y_ref)
    grad = torch.randn_like(y_ref)
    # a non-contiguous upstream gradient: the kernels read it through its strides
    grad = torch.cat([grad, grad], 1)[:, : y.shape[1]]
    for a, e in zip(
        torch.autograd.grad(y, ours, grad), torch.autograd.grad(y_ref, ref, grad), strict=True
    ):
        _close(a, e)


@runs_here
def test_backward_computes_only_what_is_needed():
    x, w0, w1, _ = _case(SHAPES[0])
    grad = torch.randn(x.shape[0], w1.shape[0] * w1.shape[1], device=DEVICE)
    dx, dw0, dw1, db = btt2_triton_backward(grad, x, w0, w1, (True, False, False, False))
    assert dw0 is None and dw1 is None and db is None
    x_ = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(btt2_matmul(x_, w0, w1), x_, grad)
    _close(dx, expected)


# The fused backward: ranks 1, 3, 8 on blocks 6x10 and 5x7 (N = 40 and 33: not multiples of the
# 32-row tile), bias on and off.
FUSED_BACKWARD = [
    (rows, m1, m0, n0, n1, r, (r + m1) % 2 == 1)
    for rows, m1, m0, n0, n1 in [(40, 6, 10, 2, 7), (33, 5, 7, 3, 9)]
    for r in (1, 3, 8)
]
NEEDS = [
    (True, True, True, True),
    (True, False, False, False),  # only dx
    (False, True, True, False),  # only the weights
    (False, False, True, True),
    (False, True, False, False),
]


@runs_here
@pytest.mark.parametrize(
    "shape", FUSED_BACKWARD, ids=lambda s: "N{}_m{}x{}_n{}x{}_r{}_b{:d}".format(*s)
)
def test_fused_backward_matches_reference(shape):
    x, w0, w1, b = _case(shape, seed=1)
    assert fused_fits(w0, w1)
    leaves = [t.clone().requires_grad_() for t in (x, w0, w1, b) if t is not None]
    y = btt2_matmul(*leaves)
    grad = torch.randn(y.shape[1], y.shape[0], device=DEVICE).t()  # column-major: strided reads
    expected = list(torch.autograd.grad(y, leaves, grad)) + ([None] if b is None else [])
    for needs in NEEDS:
        needs = (*needs[:3], needs[3] and b is not None)
        got = btt2_triton_backward(grad, x, w0, w1, needs, fused=True)
        for need, a, e in zip(needs, got, expected, strict=True):
            if need:
                _close(a, e)
            else:
                assert a is None
    unfused = btt2_triton_backward(grad, x, w0, w1, fused=False)
    for a, e in zip(unfused[:3], expected[:3], strict=True):
        _close(a, e)


@runs_here
def test_fused_backward_is_the_default_and_skips_the_batched_matmuls(monkeypatch):
    x, w0, w1, _ = _case(SHAPES[2])
    grad = torch.randn(x.shape[0], w1.shape[0] * w1.shape[1], device=DEVICE)
    expected = btt2_triton_backward(grad, x, w0, w1, fused=False)

    def no_bmm(*args, **kwargs):
        raise AssertionError("the fused backward launched a batched-matmul stage")

    # every write of the intermediate z or of dz goes through _bmm: none may happen here
    monkeypatch.setattr(triton_btt, "_bmm", no_bmm)
    for a, e in zip(btt2_triton_backward(grad, x, w0, w1), expected, strict=True):
        _close(a, e)


@runs_here
def test_strided_input_is_read_in_place():
    x, w0, w1, b = _case(SHAPES[1])
    wide = torch.cat([x, x], 1)[:, 1 : x.shape[1] + 1]  # row stride 2 * width, not contiguous
    for fused in (True, False):
        _close(btt2_triton_forward(wide, w0, w1, b, fused=fused), btt2_matmul(wide, w0, w1, b))


@runs_here
@pytest.mark.parametrize(
    "spec, d_in, d_out",
    [
        ("btt:rank=3,in_factors=4x6,out_factors=5x6", 22, 27),
        ("monarch:blocks=4,pad_tolerance=0.25", 14, 10),
    ],
)
def test_padded_layers_match_reference_forward(monkeypatch, spec, d_in, d_out):
    torch.manual_seed(0)
    layer = make_linear(spec, d_in, d_out).to(DEVICE)
    assert (layer.in_padded, layer.out_padded) != (d_in, d_out)
    monkeypatch.setattr(layer, "_fast_matmul", lambda x, w, b: btt2_triton(x, w[0], w[1], b))
    x = torch.randn(3, 7, d_in, device=DEVICE, requires_grad=True)
    y, y_ref = layer(x), layer.reference_forward(x)
    _close(y, y_ref)
    params = [x, *layer.parameters()]
    grad = torch.randn_like(y)
    for a, e in zip(
        torch.autograd.grad(y, params, grad), torch.autograd.grad(y_ref, params, grad), strict=True
    ):
        _close(a, e)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic (numpy has no bfloat16)")
    x, w0, w1, b = _case(SHAPES[0], dtype)
    exact = btt2_matmul(*(t.double() for t in (x, w0, w1, b)))
    for fused in (True, False):
        y = btt2_triton_forward(x, w0, w1, b, fused=fused)
        assert y.dtype == dtype
        # one rounding of the intermediate and one of the output, each 2^-8 (bf16) at most
        assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2
    grad = torch.randn(x.shape[0], w1.shape[0] * w1.shape[1], device=DEVICE).to(dtype)
    leaves = [t.double().requires_grad_() for t in (x, w0, w1, b)]
    exact_grads = torch.autograd.grad(btt2_matmul(*leaves), leaves, grad.double())
    for fused in (True, False):
        got = btt2_triton_backward(grad, x, w0, w1, fused=fused)
        for a, e in zip(got, exact_grads, strict=True):
            assert a.dtype == dtype
            assert ((a.double() - e).norm() / e.norm()).item() < 2e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real shapes)")
@pytest.mark.parametrize(
    "spec", ["btt:rank=1", "btt:rank=4", "monarch:blocks=4", "monarch:blocks=16"]
)
def test_real_shapes_on_gpu(spec):
    torch.manual_seed(0)
    layer = make_linear(spec, 1024, 1024).to("cuda", torch.bfloat16)
    w0, w1 = layer.weights
    x = torch.randn(8192 + 5, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = btt2_triton(x, w0, w1, layer.bias)
    exact = btt2_matmul(x.double(), w0.double(), w1.double(), layer.bias.double())
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w0, w1], grad)
    xd, w0d, w1d = (t.detach().double().requires_grad_() for t in (x, w0, w1))
    want = torch.autograd.grad(btt2_matmul(xd, w0d, w1d), [xd, w0d, w1d], grad.double())
    for a, e in zip(got, want, strict=True):
        assert ((a.double() - e).norm() / e.norm()).item() < 2e-2


def test_bad_shapes_and_forced_fusion_raise():
    x, w0, w1, b = (t.cpu() for t in _case(SHAPES[0]))
    with pytest.raises(ValueError, match="do not fit"):
        btt2_triton_forward(x[:, :-1], w0, w1, b)
    with pytest.raises(ValueError, match="bias shape"):
        btt2_triton_forward(x, w0, w1, b[:-1])
    big = _case(SHAPES[-1])
    with pytest.raises(ValueError, match="fused forward needs rank <= 16"):
        btt2_triton_forward(big[0].cpu(), big[1].cpu(), big[2].cpu(), fused=True)
    grad = torch.zeros(big[0].shape[0], big[2].shape[0] * big[2].shape[1])
    with pytest.raises(ValueError, match="fused backward needs rank <= 16"):
        btt2_triton_backward(grad, big[0].cpu(), big[1].cpu(), big[2].cpu(), fused=True)


def test_availability():
    assert not triton_available("meta")
    assert triton_available("cuda") == CUDA


@pytest.mark.skipif(
    triton_available("cpu") or CUDA, reason="the kernels already run in this process"
)
def test_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    if "xdist" in sys.modules or _has_xdist():
        cmd += ["-n", "0"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None
