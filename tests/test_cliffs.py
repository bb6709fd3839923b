"""Performance cliffs of issue 12: the time budget (FitOptions.max_time) and the mode solver's
stall rule. Correctness only; the timings are in bench/bench_cliffs.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CountingModeProblem

import mlsml
from mlsml.integrand import make_integrand
from mlsml.modes import MAX_HALVINGS, posterior_modes
from mlsml.optimize import FitOptions, maximize


def _data(seed=3, J=30, n=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    b = rng.normal(scale=[0.3, 0.3, 0.2], size=(J, 3))
    y = 0.2 + 0.5 * x + b[g, 0] + rng.normal(size=J * n) * np.exp(0.5 * (-0.8 + b[g, 1] + b[g, 2] * x))
    return pd.DataFrame({"y": y, "x": x, "school": g})


def test_time_budget_stops_the_fit_loudly():
    """A spent budget gives converged=False, a message naming it and a ConvergenceWarning; the
    reported llf is the likelihood at the reported estimates (not a stale optimiser value)."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", scale_formula="~ x", scale_re_formula="~ x")
    with pytest.warns(mlsml.ConvergenceWarning, match="max_time"):
        res = model.fit(max_time=1e-9)
    assert not res.converged
    assert "time budget max_time=1e-09 s" in res.message
    assert np.isfinite(res.llf)
    assert res.llf == pytest.approx(res.likelihood.value(res.theta), abs=1e-8)


def test_time_budget_returns_the_best_point_seen():
    lik = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", scale_formula="~ x").objective()
    full = maximize(lik)
    cut = maximize(lik, FitOptions(max_time=0.0))
    assert full.converged and not cut.converged
    assert "time budget" in cut.message
    assert cut.llf <= full.llf + 1e-9
    assert cut.llf >= lik.value(cut.start) - 1e-9  # never worse than where it started


def test_no_budget_is_the_default_fit():
    df = _data()
    a = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    b = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", max_time=1e6)
    assert a.converged and b.converged
    assert a.llf == b.llf


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "60"])
def test_time_budget_is_checked(bad):
    with pytest.raises(mlsml.ModelSpecError, match="max_time"):
        mlsml.fit("y ~ x", _data(), groups="school", max_time=bad)


def test_mode_solver_stops_halving_below_rounding_near_a_singular_sigma():
    """Near a rank-1 Sigma (corr(u0, v0) = -0.999999) b'Pb is ~1e6 times h_j, whose rounding then
    hides the last Newton rises; the solver halved those steps MAX_HALVINGS times in iteration
    after iteration (as on High School and Beyond's variance-slope model). It now stops halving a
    step whose predicted rise is below the rounding of h_j, and the modes stay stationary."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(J=60, n=30), groups="school", scale_re_formula="~ x")
    lay = model.layout
    sd = np.array([0.3, 0.3, 0.2])
    corr = np.array([[1.0, -0.999999, 0.5], [-0.999999, 1.0, -0.5], [0.5, -0.5, 1.0]])
    corr[[0, 1, 2], [0, 1, 2]] = 1.0
    w, V = np.linalg.eigh(corr)
    corr = (V * np.maximum(w, 1e-7)) @ V.T
    dd = 1.0 / np.sqrt(np.diag(corr))
    sigma = np.outer(sd, sd) * corr * np.outer(dd, dd)
    theta = lay.theta_from_parts(np.array([0.2, 0.5]), np.array([-0.8]), sigma)
    problem = CountingModeProblem(make_integrand(model.design).mode_problem(theta))
    mode, negH = posterior_modes(problem, lay.q)
    g, _ = problem.derivs(mode)
    step = np.linalg.solve(negH, g[:, :, None])[:, :, 0]
    post_sd = np.sqrt(np.diagonal(np.linalg.inv(negH), axis1=1, axis2=2))
    assert np.abs(step / post_sd).max() < 1e-4
    assert problem.calls < 3 * MAX_HALVINGS


def _icc_data(sd_e: float, J: int = 40, n: int = 10, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    u, v = rng.normal(size=J), 0.3 * rng.normal(size=J)
    y = 1.0 + 0.5 * x + u[g] + sd_e * np.exp(0.5 * (v[g] + 0.2 * x)) * rng.normal(size=J * n)
    return pd.DataFrame({"y": y, "x": x, "school": g})


@pytest.mark.parametrize("sd_e", [1e-2, 1e-3])
def test_icc_near_one_fit_reaches_the_independent_maximum(sd_e):
    """Residual SD far below the school SD: the default fit converges to the maximum that
    trust-region Newton with the exact Hessian reaches, and its llf is the 31-point value."""
    df = _icc_data(sd_e)
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    ref = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", method="trust-exact")
    assert res.converged
    assert res.llf >= ref.llf - 1e-6
    assert abs(res.likelihood.with_spec(nagq=31).value(res.theta) - res.llf) < 1e-6
