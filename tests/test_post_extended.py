"""Post-estimation of the extended model classes (issue 11): scale_re_formula and bs_formula.

Simulation, bootstrap, school table, population quantities and plots, checked against
brute-force integration that shares no code with mlsml's quadrature.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import scale_slope_data

import mlsml
from mlsml.simulate import draw_responses

#: Covariance of (u0, v0, v1) for the variance-slope data: clearly away from the boundary.
SIGMA_SLOPE = np.array([[0.10, -0.03, 0.02], [-0.03, 0.30, 0.05], [0.02, 0.05, 0.15]])


def bs_data(J: int = 40, n: int = 12, seed: int = 4) -> pd.DataFrame:
    """y = 0.2 + 0.5 x + u0 + e, ln var(e) = -0.8 + 0.1 x + v, ln var(u0_j) = -1.5 - 1.0 z_j (z_j = j mod 2)."""
    rng = np.random.default_rng(seed)
    z = (np.arange(J) % 2).astype(float)
    sd_u = np.exp(0.5 * (-1.5 - 1.0 * z))
    corr = -0.4
    e1, e2 = rng.standard_normal((2, J))
    u0 = sd_u * e1
    v = np.sqrt(0.25) * (corr * e1 + np.sqrt(1 - corr**2) * e2)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    y = 0.2 + 0.5 * x + u0[g] + rng.normal(size=J * n) * np.exp(0.5 * (-0.8 + 0.1 * x + v[g]))
    return pd.DataFrame({"y": y, "x": x, "z": z[g], "school": g})


# ---------------------------------------------------------------- simulate
def test_simulated_variance_slope_data_have_the_model_moments():
    """var(y_ij) = var(u0) + exp(w'a + g'S_vv g / 2) depends on x through g = (1, x): the draws
    must use g_ij'v_j, not v0 alone (which once happened: var would not grow with x^2)."""
    df = scale_slope_data(40, 12, seed=3, sigma=SIGMA_SLOPE)
    m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    design = m.design
    theta = m.layout.theta_from_parts([0.2, 0.5], [-0.8, 0.1], SIGMA_SLOPE)
    y = draw_responses(design, theta, np.random.default_rng(1), 4000)
    resid = y - design.X @ np.array([0.2, 0.5])
    x = design.X[:, 1]
    g = np.column_stack([np.ones_like(x), x])
    want = SIGMA_SLOPE[0, 0] + np.exp(-0.8 + 0.1 * x + 0.5 * np.einsum("ia,ab,ib->i", g, SIGMA_SLOPE[1:, 1:], g))
    ratio = (resid**2).mean(axis=0) / want
    # rows pooled in groups of |x|: 4000 x ~100 draws each, Monte Carlo error ~2% (heavy lognormal tails)
    for band in (np.abs(x) < 0.5, (np.abs(x) > 1.2) & (np.abs(x) < 2.0), np.abs(x) >= 2.0):
        assert band.sum() >= 10
        assert abs(ratio[band].mean() - 1) < 0.06, (band.sum(), ratio[band].mean())
    # pairs of students of one school: cov = var(u0)
    first, second = design.starts, design.starts + 1
    assert np.mean(resid[:, first] * resid[:, second]) == pytest.approx(SIGMA_SLOPE[0, 0], abs=0.01)


def test_simulated_bs_data_use_each_schools_intercept_variance():
    """cov(y_ij, y_ik) = var(u0_j) = exp(s_j' tau): 0.22 for z = 0, 0.08 for z = 1 (not Sigma0's 1)."""
    df = bs_data()
    m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", bs_formula="~ z")
    design = m.design
    theta = m.layout.theta_from_parts([0.2, 0.5], [-0.8, 0.1], [[1.0, -0.2], [-0.2, 0.25]], tau=[-1.5, -1.0])
    y = draw_responses(design, theta, np.random.default_rng(2), 4000)
    resid = y - design.X @ np.array([0.2, 0.5])
    pair = resid[:, design.starts] * resid[:, design.starts + 1]  # (reps, J)
    z = design.S[:, 1]
    for zz in (0.0, 1.0):
        want = np.exp(-1.5 - 1.0 * zz)
        got = pair[:, z == zz].mean()
        # Monte Carlo SE of the mean of 80000 products is < 0.003
        assert got == pytest.approx(want, abs=0.015), (zz, got, want)
    # the residual variance: exp(w'a + var(v)/2) on top
    x = design.X[:, 1]
    want_var = np.exp(-1.5 - 1.0 * design.S[design.group, 1]) + np.exp(-0.8 + 0.1 * x + 0.125)
    assert (resid**2).mean() == pytest.approx(want_var.mean(), rel=0.03)
