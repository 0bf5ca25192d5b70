"""CUDA paths of the layers: every structure, the BTT kernel, bf16, autocast and inductor.

CI has no GPU, so these skip there (with the reason); they are run on a lent GPU machine by
``benchmarks/gpu_check.sh``. The same code paths run on CPU in the rest of the suite.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import CASES, build, case_id, dense_forward
from torch import nn

from structlin import make_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Realistic widths on top of the small awkward CASES: the fast 2-core kernel, 3 cores, Monarch.
BIG = [
    ("btt", 1024, 1024, {"rank": 1}),
    ("btt", 768, 3072, {"rank": 4}),
    ("btt", 512, 1000, {"rank": 2, "cores": 3}),
    ("monarch", 1024, 1024, {"blocks": 16}),
    ("low_rank", 1024, 512, {}),
    ("kron", 1024, 1024, {}),
    ("tt", 1024, 1024, {"rank": 8}),
    ("block_diag", 1024, 1024, {"blocks": 8}),
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 comparisons against a float64 CPU reference need true fp32 GEMMs, not TF32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES + BIG, ids=case_id)
def test_cuda_float32_matches_cpu_float64(case):
    spec, d_in, d_out, opts = case
    ref = build(spec, d_in, d_out, opts)  # float64, CPU
    layer = build(spec, d_in, d_out, opts, dtype=torch.float32).cuda()
    layer.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(5, 3, d_in, dtype=torch.float64)
    g = torch.randn(5, 3, d_out, dtype=torch.float64)

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)
    xc = x.float().cuda().requires_grad_()
    yc = layer(xc)
    yc.backward(g.float().cuda())

    assert yc.device.type == "cuda" and yc.dtype == torch.float32
    assert _rel(yc, yr) < 1e-4
    assert _rel(yc, dense_forward(ref, x)) < 1e-4
    assert _rel(xc.grad, xr.grad) < 1e-4
    for (name, pr), (_, pc) in zip(ref.named_parameters(), layer.named_parameters(), strict=True):
        assert pc.grad is not None, name
        assert _rel(pc.grad, pr.grad) < 1e-4, name


@pytest.mark.parametrize("case", BIG, ids=case_id)
def test_cuda_bfloat16_layers(case):
    spec, d_in, d_out, opts = case
    ref = build(spec, d_in, d_out, opts, dtype=torch.float32).cuda()
    layer = build(spec, d_in, d_out, opts, dtype=torch.bfloat16).cuda()
    layer.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
    x = torch.randn(64, d_in, device="cuda")
    xb = x.bfloat16().requires_grad_()
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; a few products and fp32 accumulation stay within ~1-2%.
    assert _rel(y, ref(x)) < 3e-2
    y.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("spec", ["btt", "monarch", "low_rank", "kron", "tt", "dense"])
def test_cuda_autocast_behaves_like_nn_linear(spec):
    layer = make_linear(spec, 256, 256, device="cuda")
    lin = nn.Linear(256, 256, device="cuda")
    x = torch.randn(8, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, y_lin = layer(x), lin(x)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    y.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("spec", ["btt", "monarch"])
def test_cuda_nan_propagates(spec):
    layer = make_linear(spec, 64, 64, device="cuda")
    x = torch.randn(4, 64, device="cuda")
    x[1, 3] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).any() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("spec", ["btt:rank=2", "monarch:blocks=8", "btt:cores=3,rank=2"])
def test_cuda_inductor_matches_eager(spec):
    torch.manual_seed(0)
    layer = make_linear(spec, 512, 512, device="cuda")
    compiled = torch.compile(layer, backend="inductor")
    x = torch.randn(128, 512, device="cuda", requires_grad=True)
    y_eager = layer(x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    y_comp = compiled(x)
    (gx_comp,) = torch.autograd.grad(y_comp.square().sum(), x)
    assert _rel(y_comp, y_eager) < 1e-5
    assert _rel(gx_comp, gx_eager) < 1e-5
