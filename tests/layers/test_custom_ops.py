"""The 2-core BTT product as custom ops: opcheck, FlopCounterMode, torch.func, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.utils.flop_counter import FlopCounterMode

from structlin import make_linear
from structlin.kernels import cpu_jit, ops

# (spec, width): btt r=1 at 16x16 blocks and monarch with 16 blocks of 16 (rank 1) take the
# fused C kernel where it builds; btt r=2 at 36 (6x6 blocks, not a multiple of 8) and monarch
# with 4 blocks (rank 4) always take torch.bmm.
LAYERS = [
    ("btt:rank=1", 256),
    ("monarch:blocks=16", 256),
    ("btt:rank=2", 36),
    ("monarch:blocks=4", 64),
]


def _layer(spec: str, d: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = make_linear(spec, d, d)
    with torch.no_grad():
        layer.bias.normal_()  # a zero bias would hide a wrong bias gradient
    return layer


def _fused(layer, x) -> bool:
    w0, w1 = layer.weights
    return ops._use_fused(x, w0, w1, layer.bias)


def test_the_layers_cover_both_implementations():
    fused = [_fused(_layer(s, d), torch.randn(2, d)) for s, d in LAYERS]
    assert fused[2:] == [False, False]
    if cpu_jit.available():
        assert fused[:2] == [True, True]


# The AOT-dispatch checks take ~10 s per op on a 2-core machine: they run in the slow suite.
QUICK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize(
    "fused, utils",
    [
        (False, QUICK),
        (True, QUICK),
        pytest.param(False, None, marks=pytest.mark.slow),
        pytest.param(True, None, marks=pytest.mark.slow),
    ],
    ids=["bmm", "c_kernel", "bmm-all", "c_kernel-all"],
)
def test_opcheck(fused, utils):
    """Schema, fake implementation, autograd registration (and AOT dispatch) of both ops."""
    kwargs = {} if utils is None else {"test_utils": utils}
    if fused and not cpu_jit.available():
        pytest.skip("no C compiler with OpenMP here")
    torch.manual_seed(0)
    x = torch.randn(5, 16 * 8, requires_grad=True)
    w0 = torch.randn(16, 8, 8, requires_grad=True)  # m1=16, n0*r = 8 (r = 1), m0 = 8
    w1 = torch.randn(8, 16, 16, requires_grad=True)  # n0=8, n1=16, r*m1 = 16
    bias = torch.randn(128, requires_grad=True)
    assert ops._use_fused(x, w0, w1, bias) or not fused  # the shapes suit the C kernel
    torch.library.opcheck(torch.ops.structlin.btt2.default, (x, w0, w1, bias, fused), **kwargs)
    torch.library.opcheck(torch.ops.structlin.btt2.default, (x, w0, w1, None, fused), **kwargs)
    _, z = torch.ops.structlin.btt2(x.detach(), w0.detach(), w1.detach(), None, fused)
    g = torch.randn(5, 128)
    args = (x.detach(), w0.detach(), w1.detach(), z, g, fused, True, True, True, True)
    torch.library.opcheck(torch.ops.structlin.btt2_backward.default, args, **kwargs)


@pytest.mark.parametrize(("spec", "d"), LAYERS, ids=[s for s, _ in LAYERS])
def test_flop_counter_counts_the_fast_path(spec, d, monkeypatch):
    """Forward: 2 * macs; forward+backward with the input gradient: 6 * macs (each of the four
    backward products costs what its forward product did)."""
    layer = _layer(spec, d)
    x = torch.randn(6, d, requires_grad=True)
    used = []
    real = cpu_jit.BTT2Kernel.forward
    monkeypatch.setattr(cpu_jit.BTT2Kernel, "forward", lambda *a: used.append(1) or real(*a))
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
    assert counter.get_total_flops() == 2 * layer.macs(6)
    assert bool(used) == _fused(layer, x)  # the C kernel ran under the mode when it applies
    with FlopCounterMode(display=False) as counter:
        layer(x).backward(torch.randn_like(y))
    assert counter.get_total_flops() == 6 * layer.macs(6)
    with FlopCounterMode(display=False) as counter:  # no input gradient: dx is not computed
        layer(x.detach()).sum().backward()
    p1, p2 = ops.btt2_macs(6, layer.weights[0].shape, layer.weights[1].shape)
    assert counter.get_total_flops() == 2 * (2 * p1 + 3 * p2)


@pytest.mark.parametrize(("spec", "d"), LAYERS, ids=[s for s, _ in LAYERS])
def test_per_sample_gradients_with_torch_func(spec, d):
    layer = _layer(spec, d)
    x = torch.randn(5, d)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(5):
        layer.zero_grad()
        layer(x[i : i + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)


def _grads(layer, x):
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.sin().sum().backward()
    return [y.detach(), xr.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize(("spec", "d"), LAYERS, ids=[s for s, _ in LAYERS])
def test_plain_eager_calls_skip_the_op_and_match_it(spec, d, monkeypatch):
    """Unobserved eager calls take the direct autograd.Function; where torch cannot say whether
    a torch.func transform is active, every call takes the op, with the same numbers."""
    layer, x = _layer(spec, d), torch.randn(6, d)
    calls = []
    apply = ops._EagerBTT2.apply
    monkeypatch.setattr(ops._EagerBTT2, "apply", lambda *a: calls.append(1) or apply(*a))
    eager = _grads(layer, x)
    assert calls, "a plain eager call went through the op's dispatch layers"
    calls.clear()
    monkeypatch.setattr(ops, "_transforms_active", lambda: True)
    through_op = _grads(layer, x)
    assert not calls
    for a, b in zip(eager, through_op, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("spec", "d"), LAYERS, ids=[s for s, _ in LAYERS])
def test_vmap_forward_and_input_gradient(spec, d):
    layer = _layer(spec, d)
    x = torch.randn(3, 4, d)  # vmap over 3 batches of 4 rows
    with torch.no_grad():
        torch.testing.assert_close(vmap(layer)(x), layer(x), rtol=1e-5, atol=1e-5)
    gx = vmap(grad(lambda xi: layer(xi).sin().sum()))(x)
    xr = x.clone().requires_grad_()
    layer(xr).sin().sum().backward()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)


def test_vmap_over_batched_cores():
    """vmap over the weights (an ensemble of layers) takes the one-call-per-index rule."""
    torch.manual_seed(0)
    w0, w1 = torch.randn(3, 4, 6, 5), torch.randn(3, 3, 7, 8)  # m1=4, n0=3, r=2, m0=5, n1=7
    x = torch.randn(6, 20)
    y = vmap(lambda a, b: ops.btt2(x, a, b), in_dims=(0, 0))(w0, w1)
    for i in range(3):
        torch.testing.assert_close(y[i], ops.btt2(x, w0[i], w1[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("spec", "d"), LAYERS, ids=[s for s, _ in LAYERS])
def test_compile_fullgraph_no_graph_break(spec, d):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward."""
    layer = _layer(spec, d)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, d, requires_grad=True)
    g = torch.randn(8, d)
    y = compiled(x)
    y.backward(g)
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    layer(x).backward(g)
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_fullgraph_forward_and_backward():
    for spec, d in LAYERS[:2]:
        layer = _layer(spec, d)
        compiled = torch.compile(layer, fullgraph=True)
        x = torch.randn(16, d, requires_grad=True)
        compiled(x).square().sum().backward()
        got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
        layer.zero_grad()
        layer(x).square().sum().backward()
        want = [x.grad] + [p.grad for p in layer.parameters()]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_double_backward_through_the_op():
    layer = _layer("btt:rank=1", 256)
    x = torch.randn(4, 256, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (gx_ref,) = torch.autograd.grad(layer.reference_forward(x).square().sum(), x, create_graph=True)
    gx_ref.square().sum().backward()
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for a, p in zip(got, layer.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4)


def test_no_triton_route_for_cpu_tensors():
    assert ops._triton_btt2(torch.zeros(2, 4)) is None


# Run in a child process: Triton picks its interpreter when the kernels are first defined, so
# TRITON_INTERPRET must be set before this process could have imported them.
_TRITON_IN_OP = r"""
import torch
from torch.utils.flop_counter import FlopCounterMode
from structlin import make_linear
from structlin.kernels import ops, triton_btt

calls = {"forward": 0, "backward": 0}
for name in calls:
    real = getattr(triton_btt, f"btt2_triton_{name}")
    def spy(*a, _real=real, _name=name, **k):
        calls[_name] += 1
        return _real(*a, **k)
    setattr(triton_btt, f"btt2_triton_{name}", spy)

assert ops._triton_btt2(torch.zeros(2, 4)) is triton_btt  # told to: STRUCTLIN_TRITON=force
for spec, d in (("btt:rank=3", 24), ("monarch:blocks=4", 16)):
    torch.manual_seed(0)
    layer = make_linear(spec, d, d)
    with torch.no_grad():
        layer.bias.normal_()
    w0, w1 = (w.detach().requires_grad_() for w in layer.weights)
    b = layer.bias.detach().requires_grad_()
    x = torch.randn(10, d, requires_grad=True)
    y, z = torch.ops.structlin.btt2(x.detach(), w0.detach(), w1.detach(), b.detach(), False, True)
    assert z.numel() == 0  # the Triton branch: the intermediate is never stored
    y_ref, _ = torch.ops.structlin.btt2(x.detach(), w0.detach(), w1.detach(), b.detach(), False)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    before = dict(calls)
    with FlopCounterMode(display=False) as counter:  # sees the op, though Triton runs inside
        out = ops.btt2(x, w0, w1, b)
        got = torch.autograd.grad(out, (x, w0, w1, b), g)
    assert calls["forward"] == before["forward"] + 1, calls
    assert calls["backward"] == before["backward"] + 1, calls
    # forward and the backward's two products, 2 FLOPs per MAC
    assert counter.get_total_flops() == 2 * 3 * layer.macs(10), counter.get_total_flops()
    want = torch.autograd.grad(
        torch.ops.structlin.btt2(x, w0, w1, b, False)[0], (x, w0, w1, b), g
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
print("ok", calls)
"""


def test_triton_runs_inside_the_op_in_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e .[triton])")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "STRUCTLIN_TRITON": "force"}
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_IN_OP], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "ok {'forward': 4, 'backward': 2}" in out.stdout


def test_constant_marking_matches_the_public_decorator_and_import_stays_light():
    """ops marks its kernel choices as torch.compile constants the way
    ``torch.compiler.assume_constant_result`` does, without importing dynamo at import time."""
    import subprocess
    import sys

    from structlin.kernels import ops

    marked = torch.compiler.assume_constant_result(lambda: 0)
    flags = {k for k, v in vars(marked).items() if v is True}
    assert flags == {"_dynamo_marked_constant"}
    assert ops._fused_for._dynamo_marked_constant is True
    code = "import sys, structlin; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
