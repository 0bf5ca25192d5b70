"""Bad input raises ValueError naming the layer, what was expected and what was given."""

from __future__ import annotations

import re

import pytest
import torch
from layer_cases import CASES, build, case_id

from structlin import make_linear

F64 = torch.float64


def _raises(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_wrong_last_dimension(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    name = type(layer).__name__
    for shape in [(3, d_in + 1), (d_in + 2,), (2, 3, d_in + 5)]:
        x = torch.randn(*shape, dtype=F64)
        for fn in (layer, layer.reference_forward):
            _raises(lambda fn=fn, x=x: fn(x), name, f"(..., {d_in})", str(tuple(shape)))
    _raises(lambda: layer(torch.tensor(1.0, dtype=F64)), name, f"(..., {d_in})")


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8], ids=str)
def test_non_floating_input(case, dtype):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.ones(3, d_in, dtype=dtype)
    _raises(lambda: layer(x), type(layer).__name__, "floating", str(dtype).replace("torch.", ""))
    _raises(lambda: layer.reference_forward(x), type(layer).__name__, "floating")


def test_non_tensor_input():
    layer = build("btt", 12, 20)
    _raises(lambda: layer([[0.0] * 12]), "BTTLinear", "Tensor", "list")


@pytest.mark.parametrize(
    ("spec", "opts", "needles"),
    [
        ("low_rank", {"rank": 0}, ["LowRankLinear", "rank", "got 0"]),
        ("low_rank", {"rank": -2}, ["LowRankLinear", "rank", "got -2"]),
        ("low_rank", {"rank": 13}, ["LowRankLinear", "rank", "12", "got 13"]),
        ("low_rank", {"rank": 2.0}, ["LowRankLinear", "rank", "2.0"]),
        ("btt", {"rank": 0}, ["BTTLinear", "rank", "got 0"]),
        ("btt", {"rank": 5}, ["BTTLinear", "rank 5", "4"]),
        ("btt", {"cores": 1}, ["BTTLinear", "cores", "got 1"]),
        ("btt", {"cores": 0}, ["BTTLinear", "cores", "got 0"]),
        ("tt", {"rank": 0}, ["TTLinear", "rank", "got 0"]),
        ("tt", {"rank": 10_000}, ["TTLinear", "rank 10000"]),
        ("tt", {"cores": 1}, ["TTLinear", "cores", "got 1"]),
        ("kron", {"cores": 1}, ["KronLinear", "cores", "got 1"]),
        ("block_diag", {"blocks": 0}, ["BlockDiagLinear", "blocks", "got 0"]),
        ("block_diag", {"blocks": 13}, ["BlockDiagLinear", "blocks", "12", "got 13"]),
        ("monarch", {"blocks": 0}, ["MonarchLinear", "blocks", "got 0"]),
        ("monarch", {"blocks": 13}, ["MonarchLinear", "blocks", "12", "got 13"]),
        ("monarch", {"blocks": True}, ["MonarchLinear", "blocks", "True"]),
    ],
)
def test_bad_options(spec, opts, needles):
    # 12 -> 20: btt factors (3, 4) -> (4, 5): largest useful rank min(m0, n1) = min(4, 5) = 4
    _raises(lambda: make_linear(spec, 12, 20, **opts), *needles)


def test_btt_rank_cap_is_accepted():
    layer = make_linear("btt", 12, 20, rank=4)
    assert layer.rank == 4
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("spec", ["btt", "tt", "kron"])
@pytest.mark.parametrize(
    ("key", "factors", "needles"),
    [
        ("in_factors", (24, 30), ["(24, 30)", "720", "768"]),
        ("in_factors", (32, 32), ["(32, 32)", "1024", "768"]),
        ("out_factors", (5, 5), ["(5, 5)", "25", "20"]),
        ("in_factors", (2, 3, 128), ["2 positive integers", "(2, 3, 128)"]),
    ],
)
def test_explicit_factors_wrong_product(spec, key, factors, needles):
    cls_name = {"btt": "BTTLinear", "tt": "TTLinear", "kron": "KronLinear"}[spec]
    _raises(lambda: make_linear(spec, 768, 20, **{key: factors}), cls_name, *needles)


@pytest.mark.parametrize(
    "spec",
    [
        "dense",
        "low_rank",
        "block_diag",
        "tt",
        "kron",
        "btt",
        "monarch",
    ],
)
def test_bad_widths_and_dtype(spec):
    _raises(lambda: make_linear(spec, 0, 8), "in_features", "got 0")
    _raises(lambda: make_linear(spec, 8, -1), "out_features", "got -1")
    _raises(lambda: make_linear(spec, 8, 8, dtype=torch.int64), "dtype", "int64")


def test_no_balanced_split_error():
    msg = _raises(lambda: make_linear("btt", 13, 8, cores=3), "BTTLinear", "in_features=13")
    assert re.search(r"\(1, 1, 13\)", msg)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_propagates(case):
    spec, d_in, d_out, opts = case
    layer = build(spec, d_in, d_out, opts)
    x = torch.randn(4, d_in, dtype=F64)
    x[1, 0] = float("nan")
    for fn in (layer, layer.reference_forward):
        y = fn(x)
        assert torch.isnan(y[1]).any()
        assert not torch.isnan(y[[0, 2, 3]]).any()
        assert torch.isnan(fn(torch.full((2, d_in), float("nan"), dtype=F64))).all()


@pytest.mark.parametrize("spec", ["dense", "low_rank", "tt", "kron", "btt", "monarch"])
def test_nan_reaches_every_output_of_connected_structures(spec):
    layer = build(spec, 16, 12)
    x = torch.randn(2, 16, dtype=F64)
    x[0, 5] = float("nan")
    y = layer(x)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()
