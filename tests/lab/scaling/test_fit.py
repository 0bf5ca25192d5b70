import numpy as np
import pytest

pytest.importorskip("scipy")

from structlin_lab.scaling.fit import (
    PowerLawFit,
    bootstrap_multiplier,
    compute_frontier,
    compute_multiplier,
    compute_multipliers,
    fit_by_structure,
    fit_power_law,
    points_by_structure,
)

C = np.logspace(4, 10, 15)


@pytest.mark.parametrize(("a", "b"), [(3.0, 0.2), (0.7, 0.05), (120.0, 0.5)])
def test_exact_power_law_recovered(a, b):
    fit = fit_power_law(C, a * C**-b)
    assert fit.a == pytest.approx(a, rel=1e-9)
    assert fit.b == pytest.approx(b, rel=1e-9)
    assert fit.e0 == 0.0
    assert fit.r2 == pytest.approx(1.0)
    assert fit.n == C.size
    assert fit.b_stderr == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_noisy_exponent_within_three_stderr(seed):
    rng = np.random.default_rng(seed)
    err = 2.0 * C**-0.12 * np.exp(rng.normal(0, 0.05, C.size))
    fit = fit_power_law(C, err)
    assert fit.b_stderr > 0
    assert abs(fit.b - 0.12) < 3 * fit.b_stderr
    assert 0 < fit.r2 < 1


def test_matches_scipy_linregress():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    err = 2.0 * C**-0.12 * np.exp(rng.normal(0, 0.05, C.size))
    ref = stats.linregress(np.log(C), np.log(err))
    fit = fit_power_law(C, err)
    assert fit.b == pytest.approx(-ref.slope, rel=1e-12)
    assert fit.a == pytest.approx(np.exp(ref.intercept), rel=1e-12)
    assert fit.b_stderr == pytest.approx(ref.stderr, rel=1e-9)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)


def test_irreducible_term_recovered():
    pytest.importorskip("scipy")
    err = 0.1 + 5.0 * C**-0.3
    fit = fit_power_law(C, err, irreducible=True)
    assert fit.e0 == pytest.approx(0.1, rel=1e-6)
    assert fit.a == pytest.approx(5.0, rel=1e-5)
    assert fit.b == pytest.approx(0.3, rel=1e-6)
    np.testing.assert_allclose(fit.predict(C), err, rtol=1e-8)


def test_irreducible_noisy_stays_in_bounds():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    err = (0.2 + 3.0 * C**-0.25) * np.exp(rng.normal(0, 0.01, C.size))
    fit = fit_power_law(C, err, irreducible=True)
    assert 0 <= fit.e0 < err.min()
    assert abs(fit.b - 0.25) < max(3 * fit.b_stderr, 0.05)
    assert abs(fit.e0 - 0.2) < 0.05


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_points(n):
    with pytest.raises(ValueError, match=f"at least 3 points, got {n}"):
        fit_power_law(C[:n], C[:n] ** -0.1)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan])
def test_non_positive_values(bad):
    err = C**-0.1
    err[3] = bad
    with pytest.raises(ValueError, match="positive"):
        fit_power_law(C, err)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law(np.where(np.arange(C.size) == 2, bad, C), C**-0.1)


def test_mismatched_and_constant_compute():
    with pytest.raises(ValueError, match="differ in length"):
        fit_power_law(C, C[:-1])
    with pytest.raises(ValueError, match="same compute"):
        fit_power_law([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])


def test_frontier_of_three_histories():
    histories = [
        ([1, 10, 100], [1.0, 0.5, 0.4]),
        ([10, 100, 1000], [0.8, 0.3, 0.2]),
        ([100, 1000, 10000, 1e5], [0.6, 0.15, 0.14, 0.2]),  # last point: error rises
    ]
    Cf, ef = compute_frontier(histories)
    np.testing.assert_allclose(Cf, [1, 10, 1000, 10000])
    np.testing.assert_allclose(ef, [1.0, 0.5, 0.15, 0.14])


def test_frontier_tolerance_adds_near_points():
    histories = [([1, 10, 100], [1.0, 0.5, 0.4]), ([10, 100, 1000], [0.8, 0.3, 0.2])]
    Cf, _ = compute_frontier(histories)
    # (100, 0.3) lies just above the hull segment (10, 0.5) -> (1000, 0.2)
    assert 100 not in Cf
    Cf_tol, ef_tol = compute_frontier(histories, tol=0.05)
    np.testing.assert_allclose(Cf_tol, [1, 10, 100, 1000])
    assert np.all(np.diff(ef_tol) < 0)


def test_frontier_of_power_law_histories_lies_on_envelope():
    # training curves err_w(C) = a_w C^-0.5 + floor_w; the frontier is monotone and below all
    rng = np.random.default_rng(0)
    hist = []
    for w in range(4):
        c = np.logspace(2 + w, 6 + w, 30)
        hist.append((c, 10.0 * c**-0.5 + 0.3 * 0.5**w + rng.uniform(0, 1e-3, c.size)))
    Cf, ef = compute_frontier(hist)
    assert np.all(np.diff(Cf) > 0) and np.all(np.diff(ef) < 0)
    for c, e in hist:
        assert np.all(np.interp(np.log(c), np.log(Cf), np.log(ef)) <= np.log(e) + 1e-12)


def test_frontier_errors():
    with pytest.raises(ValueError, match="no positive"):
        compute_frontier([([0.0], [1.0])])
    with pytest.raises(ValueError, match="differ in length"):
        compute_frontier([([1.0, 2.0], [1.0])])


def test_compute_multiplier_analytic():
    ref = PowerLawFit(a=10.0, b=0.2, b_stderr=0, e0=0.0, r2=1, n=5)
    other = PowerLawFit(a=10.0, b=0.25, b_stderr=0, e0=0.0, r2=1, n=5)
    # C_ref = 20^5, C_other = 20^4 at err 0.5
    assert compute_multiplier(ref, other, 0.5) == pytest.approx(20.0, rel=1e-12)
    assert compute_multiplier(other, ref, 0.5) == pytest.approx(1 / 20.0, rel=1e-12)
    same_b = PowerLawFit(a=5.0, b=0.2, b_stderr=0, e0=0.0, r2=1, n=5)
    assert compute_multiplier(ref, same_b, 0.3) == pytest.approx(2.0**5, rel=1e-12)
    with_e0 = PowerLawFit(a=10.0, b=0.25, b_stderr=0, e0=0.1, r2=1, n=5)
    assert with_e0.compute_at(0.6) == pytest.approx(20.0**4, rel=1e-12)
    with pytest.raises(ValueError, match="never reached"):
        compute_multiplier(ref, with_e0, 0.05)


def test_compute_multiplier_from_fits():
    f_ref = fit_power_law(C, 10.0 * C**-0.2)
    f_other = fit_power_law(C, 10.0 * C**-0.25)
    assert compute_multiplier(f_ref, f_other, 0.5) == pytest.approx(20.0, rel=1e-8)


def test_bootstrap_interval_contains_truth():
    rng = np.random.default_rng(3)
    c = np.logspace(5, 9, 12)
    ref = (c, 4.0 * c**-0.15 * np.exp(rng.normal(0, 0.02, c.size)))
    other = (c, 2.0 * c**-0.15 * np.exp(rng.normal(0, 0.02, c.size)))
    truth = 2.0 ** (1 / 0.15)  # same exponent, half the prefactor
    est, lo, hi = bootstrap_multiplier(ref, other, at_error=0.2, n_boot=300, seed=0)
    assert lo < truth < hi
    assert lo <= est <= hi
    again = bootstrap_multiplier(ref, other, at_error=0.2, n_boot=300, seed=0)
    assert again == (est, lo, hi)


def test_bootstrap_needs_distinct_points():
    pts = ([1.0, 10.0, 100.0], [1.0, 0.5, 0.25])
    # with 3 runs most resamples repeat one; some (all distinct) remain usable
    est, lo, hi = bootstrap_multiplier(pts, pts, at_error=0.3, n_boot=200)
    assert est == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3 points, got 2"):
        bootstrap_multiplier(([1.0, 2.0], [1.0, 0.5]), pts, at_error=0.3)


def _row(struct, width, lr, seed, macs, err, status="finished"):
    return {
        "structure": struct,
        "width": width,
        "lr": lr,
        "seed": seed,
        "train_macs": macs,
        "final_test_error": err,
        "status": status,
    }


def test_fit_by_structure_picks_best_lr_and_averages_seeds():
    rows = []
    for struct, a in (("dense", 2.0), ("btt", 1.0)):
        for w in (16, 32, 64, 128):
            macs = 1e6 * w**2
            true = a * macs**-0.1
            for seed, jitter in ((0, 0.9), (1, 1.1)):  # seeds average to the truth
                rows.append(_row(struct, w, 1e-3, seed, macs, true * jitter))
                rows.append(_row(struct, w, 1e-2, seed, macs, true * jitter * 1.5))  # worse lr
    rows.append(_row("dense", 256, 1e-3, 0, 1e12, 1e-6, status="failed"))  # ignored
    rows.append(_row("lowrank", 16, 1e-3, 0, 1e8, 0.5))  # one width only: skipped
    rows.append(_row("btt", 8, 1e-3, 0, None, 0.5))  # no compute: ignored
    with pytest.warns(UserWarning, match="lowrank"):
        fits = fit_by_structure(rows)
    assert set(fits) == {"dense", "btt"}
    assert fits["dense"].b == pytest.approx(0.1, rel=1e-9)
    assert fits["dense"].a == pytest.approx(2.0, rel=1e-9)
    assert fits["btt"].a == pytest.approx(1.0, rel=1e-9)
    assert fits["dense"].n == 4
    pts = points_by_structure(rows, statuses=None)
    assert pts["dense"][0].size == 5  # the failed run counts when statuses=None


def test_group_key_separates_entries_with_one_spec():
    rows = []
    for group, a in (("btt", 2.0), ("btt_head", 1.0)):
        for w in (16, 32, 64):
            macs = 1e6 * w
            rows.append({**_row("btt:rank=4", w, 1e-3, 0, macs, a * macs**-0.2), "group": group})
    assert set(fit_by_structure(rows)) == {"btt:rank=4"}  # one spec: merged by default
    fits = fit_by_structure(rows, by="group")
    assert set(fits) == {"btt", "btt_head"}
    assert fits["btt"].a == pytest.approx(2.0, rel=1e-9)
    assert fits["btt_head"].b == pytest.approx(0.2, rel=1e-9)


def test_compute_multipliers_default_level_and_errors():
    rows = []
    for struct, a in (("dense", 2.0), ("btt", 1.0)):
        for w in (16, 32, 64, 128):
            macs = 1e6 * w**2
            rows.append(_row(struct, w, 1e-3, 0, macs, a * macs**-0.1))
    at, mults = compute_multipliers(rows, n_boot=200)
    # default level: the dense fit at dense's largest compute (here exact: the last point)
    assert at == pytest.approx(2.0 * (1e6 * 128**2) ** -0.1)
    est, lo, hi = mults["btt"]
    # same exponent, half the prefactor: 2^(1/b) = 1024x less compute
    assert est == pytest.approx(2.0**10, rel=1e-6)
    assert lo <= est <= hi
    assert set(mults) == {"btt"}
    at2, _ = compute_multipliers(rows, at_error=0.1, n_boot=50)
    assert at2 == 0.1
    with pytest.raises(ValueError, match="reference 'vit' has no fit"):
        compute_multipliers(rows, "vit")
