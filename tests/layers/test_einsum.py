"""The Einsum family: its named points are the library's structures, θ in specs, the taxonomy
against measured ranks and MAC counts, index sizes and padding, fast paths, from_dense, μP fans.

The shared contract tests (forward, gradients, round trips, padding, MAC counting) cover the
einsum cases of layer_cases.EINSUM_CASES.
"""

from __future__ import annotations

import doctest
import importlib
import math
import shlex

import numpy as np
import pytest
import torch
from layer_cases import build

from structlin import make_linear, mup_init_std, parse_spec
from structlin.layers import einsum as einsum_module
from structlin.layers.einsum import EinsumLinear, plan_einsum_sizes
from structlin.taxonomy import THETA_PRESETS, Taxonomy, Theta, parse_theta

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


# ------------------------------------------------------------------ named points = structures
def _cores(layer):
    a, b = (w.detach() for w in layer.weights)
    return a, b, layer.sizes


def _as_dense(layer):
    a, b, _ = _cores(layer)
    return "dense", {}, {"weight": a[0] * b.reshape(())}


def _as_low_rank(layer):
    a, b, s = _cores(layer)
    return "low_rank", {"rank": s.rho}, {"U": a[0], "V": b[0]}


def _as_kron(layer):  # W = B ⊗ A: input (β, α), output (ε, δ)
    a, b, s = _cores(layer)
    opts = {"in_factors": (s.beta, s.alpha), "out_factors": (s.epsilon, s.delta)}
    return "kron", opts, {"weights.0": b[0], "weights.1": a[0]}


def _as_tt(layer):  # W = sum_ρ B_ρ ⊗ A_ρ; TT core 0 is (ε ρ, β), core 1 is (δ, ρ α)
    a, b, s = _cores(layer)
    opts = {"in_factors": (s.beta, s.alpha), "out_factors": (s.epsilon, s.delta), "rank": s.rho}
    cores = {"weights.0": b[0].reshape(s.epsilon * s.rho, s.beta)}
    cores["weights.1"] = a[0].reshape(s.delta, s.rho * s.alpha)
    return "tt", opts, cores


def _as_btt(layer):  # the same tensors: A = (m1, n0 r, m0), B = (n0, n1, r m1)
    a, b, s = _cores(layer)
    opts = {"in_factors": (s.gamma, s.alpha), "out_factors": (s.phi, s.epsilon), "rank": s.rho}
    return "btt", opts, {"weights.0": a, "weights.1": b}


def _as_monarch(layer):  # sqrt(d) blocks: a rank-1 BTT with in/out factors (sqrt d, sqrt d)
    a, b, s = _cores(layer)
    return "monarch", {"blocks": s.gamma}, {"weights.0": a, "weights.1": b}


NAMED_POINTS = [
    ("dense", 12, 20, _as_dense),
    ("low_rank", 16, 36, _as_low_rank),
    ("1/0/0/0/1/0/0.25", 81, 16, _as_low_rank),
    ("kron", 12, 20, _as_kron),
    ("tt", 16, 81, _as_tt),
    ("0.333/0.667/0/0.333/0.667/0/0.5", 27, 8, _as_tt),
    ("btt", 12, 20, _as_btt),
    ("0.5/0/0.5/0/0.5/0.5/0.25", 16, 36, _as_btt),
    ("0.333/0/0.667/0/0.667/0.333/0", 27, 64, _as_btt),
    ("monarch", 64, 64, _as_monarch),
]


def _formula(layer) -> tuple[int, int]:
    """(params without bias, MACs per example) from the paper's formulas and the sizes."""
    a, b, g, d, e, f, r = layer.sizes
    params = f * d * r * g * a + f * e * r * g * b
    macs = (a * b * g) * d * f * r + f * d * r * g * b * e
    return params, macs


@pytest.mark.parametrize(
    ("theta", "d_in", "d_out", "mapping"),
    NAMED_POINTS,
    ids=[f"{t}-{i}x{o}-{m.__name__[4:]}" for t, i, o, m in NAMED_POINTS],
)
def test_named_point_is_the_structure(theta, d_in, d_out, mapping):
    layer = build("einsum", d_in, d_out, {"theta": theta})
    spec, opts, cores = mapping(layer)
    other = make_linear(spec, d_in, d_out, dtype=F64, **opts)
    with torch.no_grad():
        for name, value in cores.items():
            assert other.get_parameter(name).shape == value.shape, name
            other.get_parameter(name).copy_(value)
    torch.testing.assert_close(layer.to_dense(), other.to_dense(), **TIGHT)
    params, macs = _formula(layer)
    assert layer.num_params == params + d_out
    assert layer.macs() == macs
    if spec in ("btt", "monarch", "low_rank"):  # same contraction order: the same MACs
        assert layer.macs() == other.macs() and layer.num_params == other.num_params
    if spec in ("kron", "tt"):  # the same parameters; MACs depend on which side goes first
        assert layer.num_params == other.num_params


@pytest.mark.parametrize(
    ("theta", "params", "macs"),
    [  # square d = 64, the closed forms of Qiu et al. (ICML 2024), Table 1
        ("dense", 64 * 64 + 1, 64 * 64 + 64),  # B is a 1 x 1 core
        ("low_rank", 2 * 8 * 64, 2 * 8 * 64),  # r = sqrt(d) = 8
        ("kron", 2 * 64, 2 * 64**1.5),
        ("tt", 2 * 3 * 64, 2 * 3 * 64**1.5),  # r = round(64^(1/4)) = 3
        ("btt", 2 * 64**1.5, 2 * 64**1.5),
        ("monarch", 2 * 64**1.5, 2 * 64**1.5),
    ],
)
def test_closed_form_counts(theta, params, macs):
    layer = make_linear(f"einsum:theta={theta}", 64, 64, bias=False)
    assert layer.num_params == params
    assert layer.macs() == macs


def test_default_is_the_full_rank_btt_point():
    layer = make_linear("einsum", 768, 3072)
    assert layer.theta == Theta(0.5, 0, 0.5, 0, 0.5, 0.5, 0) == THETA_PRESETS["btt"]
    assert layer.spec == "einsum:theta=btt"


@pytest.mark.parametrize(("d_in", "d_out"), [(768, 3072), (97, 13), (7, 13), (12, 20), (64, 27)])
def test_btt_point_factorises_like_btt(d_in, d_out):
    layer = make_linear("einsum", d_in, d_out)
    btt = make_linear("btt", d_in, d_out)
    s = layer.sizes
    assert (s.gamma, s.alpha) == btt.in_factors and (s.phi, s.epsilon) == btt.out_factors
    assert (layer.in_padded, layer.out_padded) == (btt.in_padded, btt.out_padded)


# ------------------------------------------------------------------ taxonomy
@pytest.mark.parametrize(
    ("theta", "expected"),
    [  # Potapczynski et al. (NeurIPS 2024), Fig. 1: (omega, psi, nu)
        ("btt", (0, 1, 0.5)),
        ("monarch", (0, 1, 0.5)),
        ("dense", (0, 1, 1)),
        ("kron", (0.5, 1, 0.5)),
        ("1/0/0/0/1/0/0.25", (0, 0.25, 0.25)),  # low-rank, rho = 1/4
    ],
)
def test_taxonomy_of_named_points(theta, expected):
    tax = parse_theta(theta).taxonomy()
    assert isinstance(tax, Taxonomy)
    assert tax == pytest.approx(expected, abs=1e-12)
    layer = make_linear(f"einsum:theta={theta}", 16, 16, device="meta")
    assert layer.taxonomy() == tax
    assert f"taxonomy=({tax})" in repr(layer)


MEASURABLE = ["dense", "low_rank", "kron", "tt", "btt", "generic", "1/0/0/0/1/0/0.25"]


@pytest.mark.parametrize("theta", MEASURABLE)
def test_nu_and_omega_are_the_measured_growth_exponents(theta):
    # 256 and 4096 have exact sizes for exponents in quarters; on meta nothing is allocated.
    small, large = (
        make_linear(f"einsum:theta={theta}", d, d, False, device="meta") for d in (256, 4096)
    )
    tax = small.taxonomy()
    growth = math.log(16)
    nu = math.log(large.macs() / small.macs()) / growth - 1
    omega = math.log(large.macs() / large.num_params * small.num_params / small.macs()) / growth
    assert nu == pytest.approx(tax.nu, abs=0.01)  # dense: d^2 + d MACs
    assert omega == pytest.approx(tax.omega, abs=0.01)


@pytest.mark.parametrize("theta", MEASURABLE)
def test_psi_is_the_rank_exponent(theta):
    layer = build("einsum", 16, 16, {"theta": theta})
    rank = torch.linalg.matrix_rank(layer.to_dense().detach()).item()
    assert rank == round(16 ** layer.taxonomy().psi)


# ------------------------------------------------------------------ theta in specs
def test_theta_string_survives_spec_shell_and_yaml():
    import yaml

    spec = "einsum:theta=0.5/0/0.5/0/0.5/0.5/0.25"
    assert parse_spec(spec) == ("einsum", {"theta": "0.5/0/0.5/0/0.5/0.5/0.25"})
    assert shlex.split(f"structlin info --layer {spec} 64 64")[3] == spec
    assert yaml.safe_load(f"structure:\n  spec: {spec}\n") == {"structure": {"spec": spec}}
    layer = make_linear(spec, 64, 64)
    assert layer.spec == spec and layer.rank == round(64**0.25)


@pytest.mark.parametrize(
    "theta",
    [(1 / 3, 0, 2 / 3, 0, 2 / 3, 1 / 3, 0), [0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25]],
    ids=["thirds", "list"],
)
def test_numeric_theta_round_trips_through_the_spec(theta):
    layer = make_linear("einsum", 27, 64, theta=theta)
    assert "/" in layer.spec and "theta='" not in repr(layer)
    rebuilt = make_linear(layer.spec, 27, 64)
    assert rebuilt.theta == layer.theta and rebuilt.sizes == layer.sizes
    assert rebuilt.spec == layer.spec


def test_presets_keep_their_name_and_pad_tolerance_is_kept():
    layer = make_linear("einsum:theta=tt", 11, 11, pad_tolerance=0.1)
    assert layer.spec == "einsum:theta=tt,pad_tolerance=0.1"
    assert make_linear(layer.spec, 11, 11).sizes == layer.sizes


@pytest.mark.parametrize(
    ("theta", "needles"),
    [
        ("0.5/0.5/0.5/0/1/0/0", ["alpha + beta + gamma must be 1 (it is 1.5)"]),
        ("0.5/0/0.5/0.5/0.4/0/0", ["delta + epsilon + phi must be 1 (it is 0.9)"]),
        ("0.5/0/0.5/0/0.5/0.5", ["seven exponents, found 6"]),
        ("1.5/0/-0.5/0/0.5/0.5/0", ["[0, 1]"]),
        ("a/b/c/d/e/f/g", ["must be a number"]),
        ("bt", ["unknown preset", "did you mean 'btt'?", "low_rank", "0.5/0/0.5/0/0.5/0.5/0"]),
        (3, ["expected a string or a sequence"]),
    ],
)
def test_bad_theta(theta, needles):
    with pytest.raises(ValueError) as info:
        make_linear("einsum", 16, 16, theta=theta)
    msg = str(info.value)
    assert msg.startswith("EinsumLinear(in_features=16, out_features=16): theta:")
    for needle in needles:
        assert needle in msg, msg


def test_padding_beyond_tolerance_is_a_clear_error():
    # 11 is prime: the nearest split near (sqrt 11, sqrt 11) is 12 = 3 x 4, 9.1% padding.
    with pytest.raises(
        ValueError,
        match=r"in_features=11 .* 12 = d_gamma=3 x d_beta=1 x d_alpha=4 \(9\.1%.*>= 0\.091",
    ):
        make_linear("einsum", 11, 16, pad_tolerance=0.05)
    layer = make_linear("einsum", 11, 16, pad_tolerance=0.1)
    assert (layer.in_padded, layer.sizes.gamma, layer.sizes.alpha) == (12, 3, 4)
    with pytest.raises(ValueError, match="pad_tolerance must be a number >= 0"):
        make_linear("einsum", 16, 16, pad_tolerance=-0.1)


def test_sizes_follow_the_exponents():
    theta = parse_theta("0.25/0.25/0.5/0.5/0.25/0.25/0.25")
    s = plan_einsum_sizes(4096, 256, theta)
    assert (s.gamma, s.beta, s.alpha) == (64, 8, 8)  # 4096^(1/2), 4096^(1/4), 4096^(1/4)
    assert (s.phi, s.epsilon, s.delta) == (4, 4, 16)
    assert s.rho == 4  # round(min(d_in, d_out)^(1/4))
    lopsided = plan_einsum_sizes(768, 768, parse_theta("0.667/0/0.333/0/0.333/0.667/0"))
    assert (lopsided.gamma * lopsided.alpha, lopsided.phi * lopsided.epsilon) == (768, 768)
    assert lopsided.gamma < lopsided.alpha and lopsided.phi > lopsided.epsilon


# ------------------------------------------------------------------ fast paths
@pytest.mark.parametrize(
    ("theta", "uses_btt_kernel"),
    [
        ("btt", True),
        ("0.333/0/0.667/0/0.667/0.333/0.25", True),
        ("dense", False),
        ("low_rank", False),
        ("tt", False),
        ("generic", False),
    ],
)
def test_btt_points_route_to_the_btt_kernel(monkeypatch, theta, uses_btt_kernel):
    calls = []

    def counting(*args):
        calls.append(args[1].shape)
        return btt2(*args)

    btt2 = einsum_module.btt2_matmul
    monkeypatch.setattr(einsum_module, "btt2_matmul", counting)
    layer = build("einsum", 16, 36, {"theta": theta})
    x = torch.randn(5, 16, dtype=F64)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), **TIGHT)
    assert calls == ([tuple(layer.weights[0].shape)] if uses_btt_kernel else [])


# ------------------------------------------------------------------ from_dense
@pytest.mark.parametrize(
    ("theta", "d_in", "d_out"),
    [
        ("btt", 12, 20),
        ("tt", 16, 36),
        ("generic", 16, 16),
        ("dense", 5, 3),
        ("1/0/0/0/1/0/0.5", 13, 7),
        ("btt", 7, 13),  # padded 8 x 14
        ("0.333/0/0.667/0/0.667/0.333/0", 13, 20),  # padded 14 x 20
    ],
)
def test_from_dense_is_exact_where_representable(theta, d_in, d_out):
    source = build("einsum", d_in, d_out, {"theta": theta}, seed=1)
    target = build("einsum", d_in, d_out, {"theta": theta}, seed=2)
    w = source.to_dense().detach()
    assert not torch.allclose(target.to_dense(), w)
    target.from_dense(w)
    torch.testing.assert_close(target.to_dense(), w, rtol=1e-9, atol=1e-9)


def _best_error_squared(w: np.ndarray, layer) -> float:
    """Eckart-Young per (φ, γ) block: the sum of the discarded squared singular values, with the
    blocks read out of W index by index."""
    a, b, g, d, e, f, r = layer.sizes
    total = 0.0
    for fi in range(f):
        for gi in range(g):
            block = np.empty((e * b, d * a))
            for ei in range(e):
                for bi in range(b):
                    for di in range(d):
                        for ai in range(a):
                            row = (fi * e + ei) * d + di
                            col = (gi * b + bi) * a + ai
                            block[ei * b + bi, di * a + ai] = w[row, col]
            sv = np.linalg.svd(block, compute_uv=False)
            total += float(np.sum(sv[r:] ** 2))
    return total


@pytest.mark.parametrize("theta", ["generic", "0.5/0.25/0.25/0.25/0.5/0.25/0.25", "tt", "btt"])
def test_from_dense_is_the_best_fit(theta):
    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=F64)
    layer = build("einsum", 16, 16, {"theta": theta}).from_dense(w)
    fit = layer.to_dense().detach()
    error = (w - fit).square().sum().item()
    assert error == pytest.approx(_best_error_squared(w.numpy(), layer), rel=1e-9)
    assert 0 < error < w.square().sum().item()
    # a projection: fitting the fit changes nothing
    torch.testing.assert_close(layer.from_dense(fit).to_dense(), fit, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ μP
def test_fans_and_init_std():
    torch.manual_seed(0)
    layer = make_linear("einsum:theta=0.5/0.25/0.25/0.25/0.5/0.25/0.25", 256, 256)
    a, b, g, d, e, f, r = layer.sizes
    assert [(x.fan_in, x.fan_out) for x in layer.factors()] == [(a, f * d * r), (r * g * b, e)]
    assert [tuple(x.tensor.shape) for x in layer.factors()] == [
        (g, f * d * r, a),
        (f, e, r * g * b),
    ]
    for factor in layer.factors():
        std = factor.tensor.detach().std().item()
        assert std == pytest.approx(mup_init_std(factor.fan_in, factor.fan_out), rel=0.07)
    layer.reset_parameters(zero_init_last=True)
    assert torch.count_nonzero(layer.weights[1]) == 0 and torch.count_nonzero(layer.weights[0]) > 0


# ------------------------------------------------------------------ documentation
@pytest.mark.parametrize("module", ["structlin.layers.einsum", "structlin.taxonomy"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    torch.manual_seed(0)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
    doc = EinsumLinear.__doc__
    for needle in ("Shape:", "Input: ``(*, H_in)``", "Output: ``(*, H_out)``", "Examples::"):
        assert needle in doc
