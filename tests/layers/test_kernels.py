"""The BTT kernels: btt2_matmul (hand-written backward) and btt_chain_matmul vs einsum."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structlin.kernels import btt2_matmul, btt_chain_matmul

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _cores2(m1, m0, n0, n1, r, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m1, n0 * r, m0, dtype=F64, generator=g)
    w1 = torch.randn(n0, n1, r * m1, dtype=F64, generator=g)
    return w0.requires_grad_(requires_grad), w1.requires_grad_(requires_grad)


def _einsum2(x, w0, w1):
    """y[n, j0, j1] = sum_{i1, rho, i0} W1[j0, j1, rho*m1+i1] W0[i1, j0*r+rho, i0] x[n, i1, i0]."""
    m1, _, m0 = w0.shape
    n0, n1, _ = w1.shape
    r = w0.shape[1] // n0
    xv = x.reshape(-1, m1, m0)
    w0v = w0.reshape(m1, n0, r, m0)
    w1v = w1.reshape(n0, n1, r, m1)
    return torch.einsum("nac,ajrc,jkra->njk", xv, w0v, w1v).reshape(-1, n0 * n1)


def _chain2(x, w0, w1):
    m1, _, m0 = w0.shape
    n0, n1, _ = w1.shape
    r = w0.shape[1] // n0
    return btt_chain_matmul(x, [w0, w1], (m0, m1), (n0, n1), (1, r, 1))


SHAPES2 = [
    # (N, m1, m0, n0, n1, r)
    (4, 2, 3, 2, 3, 2),
    (1, 3, 2, 2, 4, 1),
    (5, 1, 4, 3, 2, 1),
    (3, 4, 4, 4, 4, 3),
    (2, 3, 5, 1, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES2, ids=str)
def test_btt2_forward_matches_einsum_and_chain(shape):
    n, m1, m0, n0, n1, r = shape
    w0, w1 = _cores2(m1, m0, n0, n1, r, requires_grad=False)
    x = torch.randn(n, m1 * m0, dtype=F64)
    y = btt2_matmul(x, w0, w1)
    assert y.shape == (n, n0 * n1)
    torch.testing.assert_close(y, _einsum2(x, w0, w1), **TIGHT)
    torch.testing.assert_close(_chain2(x, w0, w1), y, **TIGHT)


@pytest.mark.parametrize("shape", SHAPES2, ids=str)
@pytest.mark.parametrize("fn", [btt2_matmul, _chain2], ids=["btt2", "chain"])
def test_gradcheck(shape, fn):
    n, m1, m0, n0, n1, r = shape
    w0, w1 = _cores2(m1, m0, n0, n1, r)
    x = torch.randn(n, m1 * m0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, w0, w1))


@pytest.mark.parametrize("shape", SHAPES2[:3], ids=str)
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
def test_partial_requires_grad(shape, needs):
    n, m1, m0, n0, n1, r = shape
    w0, w1 = _cores2(m1, m0, n0, n1, r, requires_grad=False)
    x = torch.randn(n, m1 * m0, dtype=F64)
    inputs = [t.clone().requires_grad_(need) for t, need in zip((x, w0, w1), needs, strict=True)]
    assert torch.autograd.gradcheck(btt2_matmul, tuple(inputs))
    g = torch.randn(n, n0 * n1, dtype=F64)
    (btt2_matmul(*inputs) * g).sum().backward()
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    (_einsum2(*ref_inputs) * g).sum().backward()
    for t, ref, need in zip(inputs, ref_inputs, needs, strict=True):
        if need:
            torch.testing.assert_close(t.grad, ref.grad, **TIGHT)
        else:
            assert t.grad is None


def test_no_grad_needed_gives_no_graph():
    w0, w1 = _cores2(2, 3, 2, 3, 2, requires_grad=False)
    y = btt2_matmul(torch.randn(4, 6, dtype=F64), w0, w1)
    assert not y.requires_grad and y.grad_fn is None


@pytest.mark.parametrize("fn", [btt2_matmul, _chain2], ids=["btt2", "chain"])
def test_non_contiguous_inputs(fn):
    m1, m0, n0, n1, r, n = 3, 4, 2, 5, 2, 6
    # x: a transposed view; w0, w1: views with permuted strides
    x = torch.randn(m1 * m0, n, dtype=F64).T.requires_grad_(True)
    w0 = torch.randn(m1, m0, n0 * r, dtype=F64).transpose(1, 2).requires_grad_(True)
    w1 = torch.randn(n1, n0, r * m1, dtype=F64).transpose(0, 1).requires_grad_(True)
    assert not (x.is_contiguous() or w0.is_contiguous() or w1.is_contiguous())
    y = fn(x, w0, w1)
    torch.testing.assert_close(y, _einsum2(x, w0, w1), **TIGHT)
    assert torch.autograd.gradcheck(fn, (x, w0, w1))
    # a non-contiguous (expanded / transposed) output gradient
    for gy in (torch.ones(1, 1, dtype=F64).expand(n, n0 * n1), torch.randn(n0 * n1, n).T):
        grads = torch.autograd.grad(fn(x, w0, w1), (x, w0, w1), gy)
        ref = torch.autograd.grad(_einsum2(x, w0, w1), (x, w0, w1), gy)
        for a, b in zip(grads, ref, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_batch_size_one():
    w0, w1 = _cores2(4, 3, 3, 4, 2)
    x = torch.randn(1, 12, dtype=F64, requires_grad=True)
    torch.testing.assert_close(btt2_matmul(x, w0, w1), _einsum2(x, w0, w1), **TIGHT)
    assert torch.autograd.gradcheck(btt2_matmul, (x, w0, w1))


# ---------------------------------------------------------------- chain, c = 3


def _cores_chain(ms, ns, r, seed=0):
    """Random cores for btt_chain_matmul; ms fastest first, ns slowest first."""
    c = len(ms)
    ranks = (1, *([r] * (c - 1)), 1)
    g = torch.Generator().manual_seed(seed)
    cores = []
    for t in range(c):
        batch = math.prod(ns[:t]) * math.prod(ms[t + 1 :])
        shape = (batch, ns[t] * ranks[t + 1], ranks[t] * ms[t])
        cores.append(torch.randn(*shape, dtype=F64, generator=g).requires_grad_(True))
    return cores, ranks


def _einsum3(x, cores, ms, ns, r):
    m0, m1, m2 = ms
    n0, n1, n2 = ns
    g0 = cores[0].reshape(m2, m1, n0, r, m0)
    g1 = cores[1].reshape(n0, m2, n1, r, r, m1)
    g2 = cores[2].reshape(n0, n1, n2, r, m2)
    xv = x.reshape(-1, m2, m1, m0)
    y = torch.einsum("nabc,abjpc,jakqpb,jklqa->njkl", xv, g0, g1, g2)
    return y.reshape(-1, n0 * n1 * n2)


@pytest.mark.parametrize(
    ("ms", "ns", "r", "n"),
    [((2, 3, 2), (3, 2, 2), 2, 4), ((2, 2, 2), (2, 2, 2), 1, 1), ((3, 1, 2), (2, 3, 1), 2, 3)],
)
def test_chain3_matches_einsum_and_gradcheck(ms, ns, r, n):
    cores, ranks = _cores_chain(ms, ns, r)
    x = torch.randn(n, math.prod(ms), dtype=F64, requires_grad=True)

    def fn(x, *cs):
        return btt_chain_matmul(x, list(cs), ms, ns, ranks)

    torch.testing.assert_close(fn(x, *cores), _einsum3(x, cores, ms, ns, r), **TIGHT)
    assert torch.autograd.gradcheck(fn, (x, *cores))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 4),
    m1=st.integers(1, 4),
    m0=st.integers(1, 4),
    n0=st.integers(1, 4),
    n1=st.integers(1, 4),
    r=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_btt2_property(n, m1, m0, n0, n1, r, seed):
    w0, w1 = _cores2(m1, m0, n0, n1, r, seed=seed)
    x = torch.randn(n, m1 * m0, dtype=F64, requires_grad=True)
    gy = torch.randn(n, n0 * n1, dtype=F64)
    y = btt2_matmul(x, w0, w1)
    torch.testing.assert_close(y, _einsum2(x, w0, w1), **TIGHT)
    torch.testing.assert_close(y, _chain2(x, w0, w1), **TIGHT)
    got = torch.autograd.grad(y, (x, w0, w1), gy)
    ref = torch.autograd.grad(_einsum2(x, w0, w1), (x, w0, w1), gy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_btt2_double_backward():
    w0, w1 = _cores2(2, 3, 2, 3, 2)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    # Hessian-vector product of <y, g> w.r.t. all of (x, w0, w1), read off on x
    g = torch.randn(4, 6, dtype=F64)
    vs = [torch.randn_like(t) for t in (x, w0, w1)]

    def hvp(fn):
        first = torch.autograd.grad((fn(x, w0, w1) * g).sum(), (x, w0, w1), create_graph=True)
        dot = sum((d * v).sum() for d, v in zip(first, vs, strict=True))
        return torch.autograd.grad(dot, (x, w0, w1))

    ref = hvp(_einsum2)
    got = hvp(btt2_matmul)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
