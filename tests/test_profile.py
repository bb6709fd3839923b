"""Profile-likelihood intervals (mlsml.profile)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import mlsml
from mlsml.profile import _Profiler, profile_ci


@pytest.fixture(scope="module")
def seed_m3(seed_sim):
    return mlsml.fit("y ~ x", seed_sim, groups="school", scale_formula="~ x")


def test_reparameterisation_reproduces_theta(seed_m3):
    for name in ("var(u0)", "var(v)", "scale:x"):
        prof = _Profiler(seed_m3, name)
        free = prof.free_from_theta(seed_m3.theta)
        assert np.allclose(np.asarray(prof.theta(free, seed_m3.params[name])), seed_m3.theta, atol=1e-12)
        # the fixed value is what the model's natural parameter then equals
        th = np.asarray(prof.theta(free, 0.5 * seed_m3.params[name]))
        assert seed_m3.layout.to_natural(th)[list(seed_m3.layout.names).index(name)] == pytest.approx(0.5 * seed_m3.params[name])


def test_coefficient_interval_matches_wald(seed_m3):
    """For a well-determined coefficient the profile and Wald intervals nearly coincide."""
    ci = profile_ci(seed_m3, "mean:x")
    lo, hi = seed_m3.conf_int().loc["mean:x"]
    assert ci.lower == pytest.approx(lo, abs=0.02 * seed_m3.bse["mean:x"])
    assert ci.upper == pytest.approx(hi, abs=0.02 * seed_m3.bse["mean:x"])


def test_variance_interval_is_asymmetric_and_at_threshold(seed_m3):
    ci = profile_ci(seed_m3, "var(v)")
    est = seed_m3.params["var(v)"]
    assert 0 < ci.lower < est < ci.upper
    assert ci.upper - est > est - ci.lower  # right-skewed, unlike Wald
    prof = _Profiler(seed_m3, "var(v)")
    free = prof.free_from_theta(seed_m3.theta)
    crit = 0.5 * stats.chi2.ppf(0.95, 1)
    for end in (ci.lower, ci.upper):
        val, _ = prof.profile(end, free)
        assert seed_m3.llf - val == pytest.approx(crit, abs=0.02)


def test_covariance_is_refused(seed_m3):
    with pytest.raises(mlsml.ModelSpecError, match="covariances"):
        profile_ci(seed_m3, "cov(u0,v)")
    with pytest.raises(mlsml.ModelSpecError, match="unknown parameter"):
        profile_ci(seed_m3, "var(w)")


def test_profile_uses_the_fits_own_rule():
    """A regression test: profile_ci evaluated the product rule with the fit's nagq even for
    a u-exact fit (where nagq counts points in v), unlike schools/slopes/boundary."""
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    assert res.quadrature == "marginal"
    prof = _Profiler(res, "mean:x")
    assert prof.likelihood.spec == res.likelihood.spec
    value, _ = prof.profile(float(res.params["mean:x"]), prof.free_from_theta(res.theta))
    assert value == pytest.approx(res.llf, abs=1e-6)
    assert _Profiler(res, "mean:x", nagq=21).likelihood.spec.nagq == 21
