"""Balanced width factorisation and the zero-padding plan."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from structlin import balanced_factors
from structlin.layers.factorize import FactorPlan, WidthPlan, plan_factors, plan_widths


def _all_factorisations(n: int, c: int):
    if c == 1:
        yield (n,)
        return
    for f in range(1, n + 1):
        if n % f == 0:
            for rest in _all_factorisations(n // f, c - 1):
                yield (f, *rest)


def _good(factors) -> bool:
    """Balanced per the module docstring: largest factor <= 2 * ceil(d ** (1/c)), and no factor
    of 1 (a degenerate core)."""
    d, c = math.prod(factors), len(factors)
    return max(factors) <= 2 * math.ceil(round(d ** (1 / c), 9)) and min(factors) > 1


@pytest.mark.parametrize(
    ("n", "c", "expected"),
    [
        (768, 2, (24, 32)),
        (3072, 3, (12, 16, 16)),
        (3072, 2, (48, 64)),
        (1, 2, (1, 1)),
        (1, 3, (1, 1, 1)),
        (64, 3, (4, 4, 4)),
        (12, 3, (2, 2, 3)),
        (7, 2, (1, 7)),
        (97, 2, (1, 97)),
        (97, 3, (1, 1, 97)),
        (50257, 2, (29, 1733)),  # GPT-2's vocabulary: 29 * 1733, badly unbalanced
        (10, 1, (10,)),
    ],
)
def test_balanced_factors_examples(n, c, expected):
    assert balanced_factors(n, c) == expected


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), c=st.integers(1, 4))
def test_balanced_factors_optimal(n, c):
    got = balanced_factors(n, c)
    assert len(got) == c
    assert math.prod(got) == n
    assert list(got) == sorted(got)
    best_max = min(max(f) for f in _all_factorisations(n, c))
    assert max(got) == best_max
    # ties broken by the largest smallest factor
    best_min = max(min(f) for f in _all_factorisations(n, c) if max(f) == best_max)
    assert min(got) == best_min


@pytest.mark.parametrize(("n", "c"), [(0, 2), (-3, 2), (8, 0)])
def test_balanced_factors_invalid(n, c):
    with pytest.raises(ValueError, match=f"n={n}"):
        balanced_factors(n, c)


def test_plan_exact_when_balanced():
    plan = plan_factors(768, 2)
    assert plan == FactorPlan(768, (24, 32))
    assert plan.padded == 768 and plan.padding == 0
    assert plan_factors(3072, 3).factors == (12, 16, 16)


@pytest.mark.parametrize(
    ("size", "c"), [(50257, 2), (97, 2), (7, 2), (13, 2), (7, 3), (14, 3), (1009, 3)]
)
def test_plan_pads_to_nearest_good_size(size, c):
    plan = plan_factors(size, c)
    assert plan.size == size
    assert len(plan.factors) == c
    assert size < plan.padded <= size * 1.15
    assert plan.padding == plan.padded - size
    assert _good(plan.factors)
    # nothing in between is good
    for k in range(size, plan.padded):
        assert not _good(balanced_factors(k, c)), k


def test_plan_examples():
    assert plan_factors(97, 2).factors == (7, 14)
    assert plan_factors(7, 2).factors == (2, 4)
    assert plan_factors(13, 2).factors == (2, 7)
    plan = plan_factors(50257, 2)
    assert 50257 < plan.padded <= 50257 * 1.15


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 3000), c=st.integers(2, 3), tol=st.sampled_from([0.0, 0.05, 0.15, 0.5]))
def test_plan_property(size, c, tol):
    try:
        plan = plan_factors(size, c, pad_tolerance=tol)
    except ValueError as err:
        # only when no size in [size, size * (1 + tol)] factorises well
        assert str(size) in str(err)
        limit = math.floor(size * (1 + tol))
        assert not any(_good(balanced_factors(k, c)) for k in range(size, limit + 1))
        return
    assert math.prod(plan.factors) == plan.padded >= size
    assert plan.padded <= size * (1 + tol) + 1e-9
    assert _good(plan.factors)
    if plan.padded > size:
        assert not _good(balanced_factors(size, c))


def test_plan_error_when_out_of_tolerance():
    with pytest.raises(ValueError) as info:
        plan_factors(13, 2, pad_tolerance=0.0, owner="Foo", what="in_features")
    msg = str(info.value)
    assert "Foo" in msg and "in_features=13" in msg and "(1, 13)" in msg


def test_plan_explicit_factors():
    assert plan_factors(768, 2, (32, 24)).factors == (32, 24)  # order kept
    assert plan_factors(768, 2, [32, 24]).factors == (32, 24)
    plan = plan_factors(97, 2, (10, 10))  # 3% padding
    assert plan.padded == 100 and plan.padding == 3
    assert plan_factors(13, 2, (1, 13)).factors == (1, 13)  # lopsided but explicit


@pytest.mark.parametrize(
    ("factors", "needle"),
    [((24, 30), "720"), ((32, 32), "1024"), ((0, 768), "positive"), ((-1, -768), "positive")],
)
def test_plan_explicit_factors_invalid(factors, needle):
    with pytest.raises(ValueError, match="Owner") as info:
        plan_factors(768, 2, factors, owner="Owner", what="in_features")
    assert needle in str(info.value)
    assert str(factors) in str(info.value)


def test_plan_explicit_wrong_product_message():
    with pytest.raises(ValueError) as info:
        plan_factors(768, 2, (24, 30), owner="Owner", what="in_features")
    msg = str(info.value)
    assert "(24, 30)" in msg and "720" in msg and "768" in msg and "(24, 32)" in msg


def test_plan_explicit_wrong_count():
    with pytest.raises(ValueError, match="3 positive integers") as info:
        plan_factors(768, 3, (24, 32), owner="Owner")
    assert "(24, 32)" in str(info.value)


@pytest.mark.parametrize(("n", "c"), list(itertools.product([2, 6, 30, 210], [2, 3])))
def test_balanced_factors_cache_is_consistent(n, c):
    assert balanced_factors(n, c) == balanced_factors(n, c)
    assert math.prod(balanced_factors(n, c)) == n


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 300), d_out=st.integers(1, 300), cores=st.sampled_from([2, 3]))
def test_plan_widths_is_plan_factors_on_both_widths(d_in, d_out, cores):
    try:
        expected = [plan_factors(d, cores) for d in (d_in, d_out)]
    except ValueError:
        with pytest.raises(ValueError, match="owner"):
            plan_widths("owner", d_in, d_out, cores)
        return
    plan = plan_widths("owner", d_in, d_out, cores)
    assert plan == WidthPlan(
        cores, expected[0].factors, expected[1].factors, expected[0].padded, expected[1].padded
    )
    assert plan.in_padded >= d_in and plan.out_padded >= d_out


def test_plan_widths_explicit_factors_and_errors():
    plan = plan_widths("L", 768, 20, 2, in_factors=[32, 24], out_factors=(3, 7), pad_tolerance=0.1)
    assert plan == WidthPlan(2, (32, 24), (3, 7), 768, 21)
    for cores, needle in ((1, "at least 2, got 1"), (0, "positive integer, got 0"), (2.0, "2.0")):
        with pytest.raises(ValueError, match=needle) as info:
            plan_widths("MyLayer(8, 8)", 8, 8, cores)
        assert str(info.value).startswith("MyLayer(8, 8): cores")
    with pytest.raises(ValueError, match=r"MyLayer: .*out_features factors \(5, 5\)"):
        plan_widths("MyLayer", 8, 20, 2, out_factors=(5, 5))
