"""The fused C kernel for 2-core BTT on CPU (structlin.kernels.cpu_jit): built on first use,
used for float32 on CPU, and equal to the torch.bmm path and to the einsum reference."""

from __future__ import annotations

import pytest
import torch

from structlin.kernels import btt2_matmul, cpu_jit
from structlin.layers import make_linear

SHAPES = [  # (m1, m0, n0, n1, r, batch)
    (32, 32, 32, 32, 1, 64),
    (8, 16, 8, 24, 1, 1),
    (16, 8, 8, 16, 2, 7),
    (8, 8, 16, 8, 2, 5),
    (24, 32, 24, 32, 1, 3),
]


def _einsum64(x, w0, w1, bias):
    m1, _, m0 = w0.shape
    n0, n1, _ = w1.shape
    r = w0.shape[1] // n0
    xv = x.double().reshape(-1, m1, m0)
    w0v = w0.double().reshape(m1, n0, r, m0)
    w1v = w1.double().reshape(n0, n1, r, m1)
    y = torch.einsum("nac,ajrc,jkra->njk", xv, w0v, w1v).reshape(-1, n0 * n1)
    return y + bias.double() if bias is not None else y


def _inputs(m1, m0, n0, n1, r, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m1, n0 * r, m0, generator=g) / m0**0.5).requires_grad_()
    w1 = (torch.randn(n0, n1, r * m1, generator=g) / (r * m1) ** 0.5).requires_grad_()
    bias = torch.randn(n0 * n1, generator=g).requires_grad_()
    x = torch.randn(batch, m1 * m0, generator=g).requires_grad_()
    grad = torch.randn(batch, n0 * n1, generator=g)
    return x, w0, w1, bias, grad


def _run(monkeypatch, flag, x, w0, w1, bias, grad):
    monkeypatch.setenv("STRUCTLIN_CPU_KERNEL", flag)
    leaves = [t for t in (x, w0, w1, bias) if t is not None]
    for t in leaves:
        t.grad = None
    y = btt2_matmul(x, w0, w1, bias)
    y.backward(grad)
    return [y.detach()] + [t.grad.clone() if t.grad is not None else None for t in leaves]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # One cache per test session, so each shape compiles once however many tests use it.
    monkeypatch.setenv("STRUCTLIN_CACHE", str(tmp_path_factory.getbasetemp() / "sl_cache"))


@pytest.fixture
def kernel_available():
    x, w0, w1, *_ = _inputs(8, 8, 8, 8, 1, 2)
    if cpu_jit.kernel_for(x, w0, w1) is None:
        pytest.skip("no C compiler with OpenMP here: the torch.bmm path is used instead")


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_bmm_path_and_einsum(shape, monkeypatch, kernel_available):
    x, w0, w1, bias, grad = _inputs(*shape)
    assert cpu_jit.kernel_for(x, w0, w1) is not None
    fused = _run(monkeypatch, "1", x, w0, w1, bias, grad)
    plain = _run(monkeypatch, "0", x, w0, w1, bias, grad)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    ref = _einsum64(x, w0, w1, bias)
    torch.testing.assert_close(fused[0].double(), ref, rtol=1e-5, atol=1e-5)
    # gradients against the float64 reference through autograd
    leaves = [t.detach().double().requires_grad_() for t in (x, w0, w1, bias)]
    _einsum64(*leaves).backward(grad.double())
    for got, leaf in zip(fused[1:], leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-4, atol=1e-4)


def test_kernel_without_bias_non_contiguous_input_and_frozen_input(monkeypatch, kernel_available):
    x, w0, w1, _, grad = _inputs(16, 8, 8, 16, 2, 9)
    wide = torch.randn(9, 3 * x.shape[1])
    xs = wide[:, 5 : 5 + x.shape[1]]  # a strided view: the kernel reads it through a copy
    assert not xs.is_contiguous()
    fused = _run(monkeypatch, "1", xs, w0, w1, None, grad)
    plain = _run(monkeypatch, "0", xs, w0, w1, None, grad)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    y = btt2_matmul(xs, w0, w1)
    assert y.is_contiguous() and y.shape == (9, w1.shape[0] * w1.shape[1])


def test_double_backward_after_the_fused_forward(monkeypatch, kernel_available):
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("STRUCTLIN_CPU_KERNEL", flag)
        x, w0, w1, bias, grad = _inputs(8, 16, 8, 8, 2, 4)
        y = btt2_matmul(x, w0, w1, bias)
        (gx,) = torch.autograd.grad((y * grad).sum(), x, create_graph=True)
        gx.square().sum().backward()
        results.append([gx.detach(), w0.grad.clone(), w1.grad.clone()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_thread_count_does_not_change_results(monkeypatch, kernel_available):
    x, w0, w1, bias, grad = _inputs(32, 32, 32, 32, 1, 33)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(monkeypatch, "1", x, w0, w1, bias, grad)
    finally:
        torch.set_num_threads(threads)
    many = _run(monkeypatch, "1", x, w0, w1, bias, grad)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layers_use_the_kernel_for_float32_only(monkeypatch, kernel_available):
    layer = make_linear("btt", 1024, 768, rank=1)
    w0, w1 = layer.weights
    x32 = torch.randn(3, 1024)
    assert cpu_jit.kernel_for(x32, w0, w1) is not None
    assert cpu_jit.kernel_for(x32.double(), w0.double(), w1.double()) is None
    assert cpu_jit.kernel_for(x32.bfloat16(), w0.bfloat16(), w1.bfloat16()) is None
    odd = make_linear("btt", 36, 36, rank=1)  # 6x6 blocks: not a multiple of 8
    assert cpu_jit.kernel_for(torch.randn(2, 36), *odd.weights) is None
    for big in (make_linear("btt", 1024, 1024, rank=4), make_linear("btt", 4096, 4096, rank=1)):
        # rank 4, or 64x64 blocks: the torch.bmm path measured faster there
        assert cpu_jit.kernel_for(torch.randn(2, big.in_features), *big.weights) is None
    assert cpu_jit.available()
    monkeypatch.setenv("STRUCTLIN_CPU_KERNEL", "0")
    assert cpu_jit.kernel_for(x32, w0, w1) is None
    assert not cpu_jit.available()
    monkeypatch.setenv("STRUCTLIN_CPU_KERNEL", "1")
    # through the layer: float32 output equals the float64 layer's
    ref = layer.double()(x32.double())
    torch.testing.assert_close(layer.float()(x32).double(), ref, rtol=1e-5, atol=1e-5)


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("STRUCTLIN_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_jit, "_KERNELS", {})
    monkeypatch.setattr(cpu_jit, "_WARNED", False)
    x, w0, w1, bias, _ = _inputs(8, 8, 8, 8, 1, 3)
    with pytest.warns(RuntimeWarning, match="could not build the fused CPU BTT kernel"):
        assert cpu_jit.kernel_for(x, w0, w1) is None
    assert not cpu_jit.available()
    y = btt2_matmul(x, w0, w1, bias)  # the torch.bmm path, no second warning
    torch.testing.assert_close(y.double(), _einsum64(x, w0, w1, bias), rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "empty").rglob("*.so"))  # nothing half-written left behind


def test_built_library_is_cached_on_disk(monkeypatch, tmp_path, kernel_available):
    monkeypatch.setenv("STRUCTLIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_jit, "_KERNELS", {})
    x, w0, w1, *_ = _inputs(16, 16, 16, 16, 1, 2)
    assert cpu_jit.kernel_for(x, w0, w1) is not None
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    monkeypatch.setattr(cpu_jit, "_KERNELS", {})

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached library should have been loaded, not rebuilt")

    monkeypatch.setattr(cpu_jit.subprocess, "run", no_compiler)
    assert cpu_jit.kernel_for(x, w0, w1) is not None
    assert list((tmp_path / "cache" / "kernels").iterdir()) == built


def test_flop_counting_sees_the_torch_ops(kernel_available):
    """FlopCounterMode (the trainer's MAC count) cannot see a ctypes call: under it, the torch
    path runs and the count equals the analytic one."""
    from torch.utils.flop_counter import FlopCounterMode

    from structlin_lab.train.build import forward_macs

    layer = make_linear("btt", 1024, 1024, rank=1)
    x = torch.randn(4, 1024)
    assert cpu_jit.kernel_for(x, *layer.weights) is not None
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * layer.macs(4)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), make_linear("btt", 1024, 256, rank=2))
    assert forward_macs(model, torch.randn(1, 1024)) == layer.macs() + model[2].macs()


def test_inconsistent_inputs_take_the_torch_path_and_its_errors(kernel_available):
    """The C code trusts its sizes; anything inconsistent must go to the torch path, which
    raises instead of reading past the end of a buffer."""
    x, w0, w1, bias, _ = _inputs(8, 8, 8, 8, 1, 3)
    assert cpu_jit.kernel_for(x, w0, w1, bias) is not None
    wrong_x = torch.randn(3, 72)  # m1 * m0 = 64
    assert cpu_jit.kernel_for(wrong_x, w0, w1, bias) is None
    with pytest.raises(RuntimeError):
        btt2_matmul(wrong_x, w0, w1, bias)
    assert cpu_jit.kernel_for(x, w0, w1, torch.randn(65)) is None
    assert cpu_jit.kernel_for(x, w0, w1, bias.double()) is None
    assert cpu_jit.kernel_for(x, w0, torch.randn(8, 8, 16)) is None  # k != r * m1
