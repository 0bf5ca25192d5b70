"""Shared layer configurations and helpers for the layer tests (not a test module)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from structlin import make_linear
from structlin.layers.factorize import plan_factors

ALL_STRUCTURES = ("dense", "low_rank", "block_diag", "tt", "kron", "btt", "monarch")

# (spec, d_in, d_out, options): every structure, awkward and padded widths, d_in != d_out.
CASES: list[tuple[str, int, int, dict]] = [
    ("dense", 1, 1, {}),
    ("dense", 7, 13, {}),
    ("low_rank", 13, 7, {"rank": 3}),
    ("low_rank", 1, 5, {"rank": 1}),
    ("block_diag", 13, 7, {"blocks": 3}),
    ("block_diag", 12, 20, {"blocks": 4}),
    ("tt", 12, 20, {"rank": 3}),
    ("tt", 7, 13, {"rank": 2}),  # both widths padded (8, 14)
    ("tt", 8, 27, {"cores": 3, "rank": 2}),
    ("kron", 12, 20, {}),
    ("kron", 7, 13, {}),
    ("kron", 8, 27, {"cores": 3}),
    ("btt", 12, 20, {"rank": 2}),
    ("btt", 7, 13, {"rank": 1}),
    ("btt", 97, 13, {"rank": 2}),  # 97 -> 98 = 7 x 14
    ("btt", 8, 27, {"cores": 3, "rank": 2}),
    ("btt", 14, 8, {"cores": 3, "rank": 1}),  # 14 -> 16 = 2 x 2 x 4
    ("monarch", 16, 16, {"blocks": 4}),
    ("monarch", 7, 13, {"blocks": 3, "pad_tolerance": 0.5}),  # pads 7 -> 9, 13 -> 15
    ("monarch", 13, 24, {"blocks": 2}),
]


def case_id(case: tuple[str, int, int, dict]) -> str:
    spec, d_in, d_out, opts = case
    extra = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"{spec}-{d_in}x{d_out}" + (f"-{extra}" if extra else "")


def build(
    spec: str,
    d_in: int,
    d_out: int,
    opts: dict | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
    seed: int = 0,
    random_bias: bool = True,
):
    """A layer with deterministic random factors and (by default) a non-zero bias."""
    torch.manual_seed(seed)
    layer = make_linear(spec, d_in, d_out, bias=bias, dtype=dtype, **(opts or {}))
    if bias and random_bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def plannable(d: int, c: int) -> bool:
    try:
        plan_factors(d, c)
    except ValueError:
        return False
    return True


def btt_rank_cap(d_in: int, d_out: int, c: int) -> int:
    """The largest useful BTT rank, from the docstring formula (computed independently)."""
    ms = tuple(reversed(plan_factors(d_in, c).factors))
    ns = plan_factors(d_out, c).factors
    return max(min(math.prod(ms[: t + 1]), math.prod(ns[t + 1 :])) for t in range(c - 1))


def tt_rank_cap(d_in: int, d_out: int, c: int) -> int:
    ms = plan_factors(d_in, c).factors
    ns = plan_factors(d_out, c).factors
    sizes = [m * n for m, n in zip(ms, ns, strict=True)]
    return max(min(math.prod(sizes[:t]), math.prod(sizes[t:])) for t in range(1, c))


DIMS = st.integers(1, 40)
FACTORISABLE_DIMS = st.integers(1, 40).filter(lambda d: plannable(d, 2))


@st.composite
def layer_configs(draw, structures=ALL_STRUCTURES):
    """(spec, d_in, d_out, options) with valid options for random small widths."""
    spec = draw(st.sampled_from(structures))
    d_in, d_out = draw(DIMS), draw(DIMS)
    opts: dict = {}
    if spec == "low_rank":
        opts["rank"] = draw(st.integers(1, min(d_in, d_out)))
    elif spec in ("block_diag", "monarch"):
        opts["blocks"] = draw(st.integers(1, min(d_in, d_out, 5)))
        if spec == "monarch":  # tiny widths pad a lot: d -> b * ceil(d / b) < 2 d
            opts["pad_tolerance"] = 1.0
    elif spec in ("tt", "kron", "btt"):
        # widths 1, 2, 3 and 5 have no 2-factor split without a degenerate factor of 1
        d_in, d_out = draw(FACTORISABLE_DIMS), draw(FACTORISABLE_DIMS)
        c = draw(st.sampled_from([2, 3]))
        if not (plannable(d_in, c) and plannable(d_out, c)):
            c = 2
        if c == 3:
            opts["cores"] = 3
        if spec == "btt":
            opts["rank"] = min(draw(st.integers(1, 3)), btt_rank_cap(d_in, d_out, c))
        elif spec == "tt":
            opts["rank"] = min(draw(st.integers(1, 4)), tt_rank_cap(d_in, d_out, c))
    return spec, d_in, d_out, opts


LEAD_SHAPES = [(), (3,), (2, 3)]


def dense_forward(layer, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.to_dense().T
    return y if layer.bias is None else y + layer.bias


def grads(layer, x: torch.Tensor, out_grad: torch.Tensor, reference: bool) -> dict:
    """Gradients of <forward(x), out_grad> w.r.t. x and every parameter."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer.reference_forward(x) if reference else layer(x)
    (y * out_grad).sum().backward()
    out = {"x": x.grad.clone()}
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        out[name] = p.grad.clone()
    layer.zero_grad(set_to_none=True)
    return out


# The Einsum family: its fast paths (BTT kernel, dense, low-rank), the general two-matmul path
# (Kronecker/TT and a generic point, which pads both widths: 7 -> 8, 13 -> 14).
EINSUM_CASES: list[tuple[str, int, int, dict]] = [
    ("einsum", 12, 20, {"theta": "btt"}),
    ("einsum", 8, 27, {"theta": "0.333/0/0.667/0/0.667/0.333/0.25"}),
    ("einsum", 16, 12, {"theta": "dense"}),
    ("einsum", 13, 7, {"theta": "1/0/0/0/1/0/0.5"}),
    ("einsum", 12, 20, {"theta": "tt"}),
    ("einsum", 7, 13, {"theta": "0.5/0.25/0.25/0.25/0.5/0.25/0.25"}),
]
CASES += EINSUM_CASES
