"""from_dense / from_linear: exact where representable, optimal projections otherwise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_cases import build, case_id, layer_configs
from torch import nn

from structlin import mup_init_std

F64 = torch.float64
CLOSE = {"rtol": 1e-8, "atol": 1e-9}

REPRESENTABLE = [
    ("dense", 7, 13, {}),
    ("dense", 1, 1, {}),
    ("low_rank", 13, 7, {"rank": 3}),
    ("low_rank", 6, 9, {"rank": 6}),
    ("block_diag", 12, 20, {"blocks": 4}),
    ("block_diag", 13, 7, {"blocks": 3}),  # padded
    ("monarch", 16, 16, {"blocks": 4}),
    ("monarch", 7, 13, {"blocks": 3, "pad_tolerance": 0.5}),  # padded
    ("btt", 12, 20, {"rank": 1}),
    ("btt", 12, 20, {"rank": 2}),
    ("btt", 7, 13, {"rank": 2}),  # padded
    ("btt", 97, 13, {"rank": 1}),  # padded
    ("btt", 8, 27, {"cores": 3, "rank": 1}),
    ("btt", 8, 27, {"cores": 3, "rank": 2}),
    ("btt", 27, 64, {"cores": 3, "rank": 2}),
    ("btt", 14, 8, {"cores": 3, "rank": 2}),  # padded
    ("tt", 12, 20, {"rank": 3}),
    ("tt", 8, 27, {"cores": 3, "rank": 2}),
    ("kron", 12, 20, {}),
    ("kron", 8, 27, {"cores": 3}),
]


@pytest.mark.parametrize("case", REPRESENTABLE, ids=case_id)
def test_round_trip_exact(case):
    spec, d_in, d_out, opts = case
    source = build(spec, d_in, d_out, opts, seed=1)
    target = build(spec, d_in, d_out, opts, seed=2)
    w = source.to_dense()
    assert not torch.allclose(target.to_dense(), w)
    out = target.from_dense(w, source.bias)
    assert out is target
    torch.testing.assert_close(target.to_dense(), w, **CLOSE)
    x = torch.randn(3, d_in, dtype=F64)
    torch.testing.assert_close(target(x), source(x), **CLOSE)


@settings(max_examples=20, deadline=None)
@given(
    cfg=layer_configs(("dense", "low_rank", "block_diag", "monarch", "btt")),
    seed=st.integers(0, 1000),
)
def test_round_trip_property(cfg, seed):
    spec, d_in, d_out, opts = cfg
    source = build(spec, d_in, d_out, opts, seed=seed)
    target = build(spec, d_in, d_out, opts, seed=seed + 1)
    target.from_dense(source.to_dense())
    torch.testing.assert_close(target.to_dense(), source.to_dense(), **CLOSE)


@pytest.mark.parametrize("case", REPRESENTABLE, ids=case_id)
def test_scales_balanced_after_from_dense(case):
    spec, d_in, d_out, opts = case
    target = build(spec, d_in, d_out, opts, seed=2)
    target.from_dense(build(spec, d_in, d_out, opts, seed=1).to_dense() * 1000.0)
    gains = [
        f.tensor.detach().pow(2).mean().sqrt().item() / mup_init_std(f.fan_in, f.fan_out)
        for f in target.factors()
    ]
    assert all(g > 0 for g in gains)
    assert max(gains) / min(gains) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(13, 7, 3), (20, 12, 1), (9, 9, 4)])
def test_low_rank_is_truncated_svd(d_in, d_out, rank):
    torch.manual_seed(3)
    w = torch.randn(d_out, d_in, dtype=F64)
    layer = build("low_rank", d_in, d_out, {"rank": rank}).from_dense(w)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(w - layer.to_dense())
    # Eckart-Young: the best rank-r error is the tail of the singular values
    torch.testing.assert_close(err, s[rank:].pow(2).sum().sqrt(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.linalg.svdvals(layer.to_dense())[:rank], s[:rank])


def _vlp_error(w, m, n):
    """Van Loan-Pitsianis: min ||W - A (x) B||_F over A (n0 x m0), B (n1 x m1)."""
    (m0, m1), (n0, n1) = m, n
    r = w.reshape(n0, n1, m0, m1).permute(0, 2, 1, 3).reshape(n0 * m0, n1 * m1)
    s = torch.linalg.svdvals(r)
    return (w.pow(2).sum() - s[0] ** 2).clamp_min(0).sqrt()


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 20), (6, 6), (16, 9)])
def test_kron_is_van_loan_pitsianis(d_in, d_out):
    torch.manual_seed(4)
    w = torch.randn(d_out, d_in, dtype=F64)
    layer = build("kron", d_in, d_out).from_dense(w)
    a0, a1 = (layer.get_parameter(f"weights.{t}").detach() for t in range(2))
    torch.testing.assert_close(layer.to_dense(), torch.kron(a0, a1), rtol=1e-10, atol=1e-10)
    err = torch.linalg.matrix_norm(w - layer.to_dense())
    expected = _vlp_error(w, layer.in_factors, layer.out_factors)
    torch.testing.assert_close(err, expected, rtol=1e-9, atol=1e-9)
    # and it is at least as good as any perturbation of the factors
    for _ in range(3):
        a0p = a0 + 1e-3 * torch.randn_like(a0)
        a1p = a1 + 1e-3 * torch.randn_like(a1)
        assert torch.linalg.matrix_norm(w - torch.kron(a0p, a1p)) >= err - 1e-12


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_btt2_from_dense_is_blockwise_truncated_svd(rank):
    """A 2-core BTT is an independent rank-r matrix per block (j0, i1): the optimum is known."""
    torch.manual_seed(5)
    w = torch.randn(20, 12, dtype=F64)
    layer = build("btt", 12, 20, {"rank": rank}).from_dense(w)
    (m1, m0), (n0, n1) = layer.in_factors, layer.out_factors
    blocks = w.view(n0, n1, m1, m0).permute(0, 2, 1, 3)  # (j0, i1, j1, i0)
    tail = torch.linalg.svdvals(blocks)[..., rank:].pow(2).sum().sqrt()
    err = torch.linalg.matrix_norm(w - layer.to_dense())
    torch.testing.assert_close(err, tail, rtol=1e-9, atol=1e-9)
    assert 0 < err < torch.linalg.matrix_norm(w)


@pytest.mark.parametrize("spec", ["dense", "low_rank", "btt", "monarch", "tt", "kron"])
def test_from_linear_copies_weight_and_bias(spec):
    torch.manual_seed(6)
    lin = nn.Linear(16, 16, dtype=F64)
    opts = {"rank": 16} if spec == "low_rank" else {}
    layer = build(spec, 16, 16, opts, random_bias=False)
    assert layer.from_linear(lin) is layer
    torch.testing.assert_close(layer.bias, lin.bias, rtol=0, atol=0)
    assert layer.bias is not lin.bias
    if spec in ("dense", "low_rank"):
        x = torch.randn(5, 16, dtype=F64)
        torch.testing.assert_close(layer(x), lin(x), **CLOSE)


def test_from_linear_float32_into_float64_layer():
    lin = nn.Linear(8, 12)
    layer = build("dense", 8, 12).from_linear(lin)
    assert layer.weight.dtype == F64
    torch.testing.assert_close(layer.weight, lin.weight.double(), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias.double(), rtol=0, atol=0)


def test_from_linear_bias_into_biasless_layer_raises():
    layer = build("btt", 12, 20, bias=False)
    with pytest.raises(ValueError, match="bias"):
        layer.from_linear(nn.Linear(12, 20))
    layer.from_linear(nn.Linear(12, 20, bias=False))  # fine without a bias


@pytest.mark.parametrize("spec", ["dense", "low_rank", "block_diag", "btt", "tt", "monarch"])
def test_from_dense_wrong_shapes(spec):
    layer = build(spec, 12, 20)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=name) as info:
        layer.from_dense(torch.randn(12, 20, dtype=F64))
    assert "(20, 12)" in str(info.value) and "(12, 20)" in str(info.value)
    with pytest.raises(ValueError, match=r"\(20,\)"):
        layer.from_dense(torch.randn(20, 12, dtype=F64), torch.randn(12, dtype=F64))
    with pytest.raises(ValueError, match=name):
        layer.from_dense(torch.randn(20 * 12, dtype=F64))
    with pytest.raises(ValueError, match="bias"):
        build(spec, 12, 20, bias=False).from_dense(torch.randn(20, 12), torch.randn(20))


def test_from_linear_wrong_shape():
    with pytest.raises(ValueError, match="BTTLinear"):
        build("btt", 12, 20).from_linear(nn.Linear(20, 12))


def test_from_dense_keeps_dtype_and_no_grad():
    layer = build("btt", 12, 20, dtype=torch.float32)
    w = torch.randn(20, 12, dtype=F64, requires_grad=True)
    layer.from_dense(w)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert all(p.grad is None and p.is_leaf for p in layer.parameters())
    assert w.grad is None
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("rank", [1, 2])
def test_btt_from_dense_sum_of_structures_not_representable(rank):
    """A generic dense matrix is not a rank-1 BTT: from_dense is then approximate."""
    torch.manual_seed(7)
    w = torch.randn(20, 12, dtype=F64)
    layer = build("btt", 12, 20, {"rank": rank}).from_dense(w)
    rel = torch.linalg.matrix_norm(w - layer.to_dense()) / torch.linalg.matrix_norm(w)
    assert 0.05 < rel.item() < 1.0
    assert math.isfinite(rel.item())


def test_from_linear_without_bias_clears_stale_bias():
    lin = nn.Linear(12, 20, bias=False, dtype=F64)
    layer = build("dense", 12, 20)  # random, non-zero bias (e.g. after training)
    layer.from_linear(lin)
    x = torch.randn(3, 12, dtype=F64)
    torch.testing.assert_close(layer(x), lin(x))


# Awkward widths: 97 is prime (padded to 98 = 7 x 14 or 2 x 7 x 7), 50 and 52 pad monarch and
# block_diag. The real block of a padded layer is all from_dense sees; its padded entries are free.
PADDED_AWKWARD = [
    ("tt", 97, 50, {"rank": 4}),
    ("tt", 97, 50, {"cores": 3}),
    ("tt", 50, 97, {"rank": 4}),
    ("kron", 97, 50, {}),
    ("kron", 97, 50, {"cores": 3}),
    ("kron", 50, 97, {}),
    ("btt", 97, 50, {"rank": 4}),
    ("btt", 97, 50, {"cores": 3, "rank": 2}),
    ("monarch", 97, 50, {"blocks": 4}),
    ("low_rank", 97, 50, {"rank": 4}),
    ("block_diag", 97, 50, {"blocks": 4}),
]


@pytest.mark.parametrize("case", PADDED_AWKWARD, ids=case_id)
def test_from_dense_exact_on_own_dense_at_padded_widths(case):
    spec, d_in, d_out, opts = case
    source = build(spec, d_in, d_out, opts, seed=11)
    target = build(spec, d_in, d_out, opts, seed=12)
    w = source.to_dense()
    assert torch.linalg.matrix_norm(target.to_dense() - w) > 0.1 * torch.linalg.matrix_norm(w)
    target.from_dense(w)
    rel = torch.linalg.matrix_norm(target.to_dense() - w) / torch.linalg.matrix_norm(w)
    assert rel.item() <= 1e-6, f"{case_id(case)}: relative error {rel.item():.2e}"


@pytest.mark.parametrize(("spec", "opts"), [("tt", {"rank": 4}), ("kron", {})])
def test_padded_from_dense_fits_the_real_block_better_than_zero_padding(spec, opts):
    """On a matrix the structure cannot represent, the refit of the real block is no worse than
    TT-SVD of the zero-padded matrix (the previous projection), and still a projection."""
    torch.manual_seed(13)
    w = torch.randn(50, 97, dtype=F64)
    layer = build(spec, 97, 50, opts).from_dense(w)
    padded = torch.nn.functional.pad(w, (0, layer.in_padded - 97, 0, layer.out_padded - 50))
    with torch.no_grad():
        plain = build(spec, 97, 50, opts)
        for param, core in zip(plain.weights, plain._tt_svd(padded), strict=True):
            param.copy_(core)
    err = torch.linalg.matrix_norm(layer.to_dense() - w)
    assert err <= torch.linalg.matrix_norm(plain.to_dense() - w) + 1e-12
    assert 0.5 * torch.linalg.matrix_norm(w) < err < torch.linalg.matrix_norm(w)
