"""Starting values (mlsml.start): the least-squares helper and the default and wide starts."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import mlsml
from mlsml import start


def test_least_squares_equals_lstsq():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(500, 6)) * np.array([1e-3, 1.0, 1e3, 1.0, 5.0, 1e5])  # badly scaled columns
    b = rng.normal(size=500)
    x = start.least_squares(A, b)
    ref = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(x, ref, rtol=1e-8)


def test_least_squares_falls_back_to_lstsq_when_ill_conditioned():
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    A = np.column_stack([a, a + 1e-7 * rng.normal(size=400), np.ones(400)])  # condition ~1e7, Gram ~1e14
    b = A @ np.array([1.0, 2.0, 3.0]) + 1e-3 * rng.normal(size=400)
    Gs = A.T @ A
    d = np.sqrt(np.diag(Gs))
    assert np.linalg.cond(Gs / np.outer(d, d)) > start.NORMAL_EQUATIONS_MAX_COND
    np.testing.assert_array_equal(start.least_squares(A, b), np.linalg.lstsq(A, b, rcond=None)[0])


@given(
    var_means=st.floats(1e-6, 1e3),
    s2e=st.floats(1e-6, 1e3),
    mean_n=st.floats(1.0, 5000.0),
)
def test_the_wide_start_is_at_the_upper_end_of_the_moment_range(var_means, s2e, mean_n):
    mean_inv_n = 1.0 / mean_n  # (a lower bound of mean(1/n); any value in (0, 1] will do)
    default = start.school_variance_start(var_means, s2e, mean_inv_n, mean_n)
    wide = start.school_variance_start(var_means, s2e, mean_inv_n, mean_n, wide=True)
    moment = var_means - s2e * mean_inv_n
    assert default > 0 and default >= moment  # the moment estimate, kept away from zero
    assert wide >= var_means and wide >= start.WIDE_START_MIN_FACTOR * default


def test_wide_start_values_differ_only_in_the_mean_effects_variances():
    df = mlsml.simulate.demo_data(n_groups=30, seed=2)
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", re_formula="~ x")
    integrand = model.objective().integrand
    lay = model.layout
    b0, a0, L0 = lay.split(start.start_values(integrand))
    b1, a1, L1 = lay.split(start.start_values(integrand, wide=True))
    np.testing.assert_array_equal(np.asarray(b0), np.asarray(b1))
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(a1))
    S0, S1 = (np.asarray(L) @ np.asarray(L).T for L in (L0, L1))
    ratio = np.diag(S1)[: lay.q] / np.diag(S0)[: lay.q]
    # (L is built from square roots, so the ratio of its squares is 4 only to rounding: CI saw 3.9999999999999987)
    assert ratio[0] >= start.WIDE_START_MIN_FACTOR * (1.0 - 1e-10)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)  # the slope's variance scaled with var(u0)
    np.testing.assert_allclose(np.diag(S1)[lay.q :], np.diag(S0)[lay.q :], rtol=1e-12)  # var(v) as before
    np.testing.assert_allclose(S1 - np.diag(np.diag(S1)), 0.0, atol=1e-12)  # independent effects
