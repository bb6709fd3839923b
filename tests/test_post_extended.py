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


# ---------------------------------------------------------------- fits
@pytest.fixture(scope="module")
def slope_fit():
    """ln var(e) = a0 + a1 x + v0 + v1 x (u-exact rule, 15 x 15 points over (v0, v1)); about 2 s."""
    df = scale_slope_data(40, 12, seed=3, sigma=SIGMA_SLOPE)
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    assert res.converged and not res.singular
    return res


@pytest.fixture(scope="module")
def bs_fit():
    """ln var(u0_j) = tau0 + tau1 z_j with a random scale v (u-exact rule, 15 points in v); well under 1 s."""
    res = mlsml.fit("y ~ x", bs_data(), groups="school", scale_formula="~ x", bs_formula="~ z")
    assert res.converged and not res.singular
    return res


# ---------------------------------------------------------------- brute force (no mlsml code)
def _school_rows(res, j: int):
    """y, x of school code ``j`` (the fit's data, in the design's group order)."""
    design = res.model.design
    rows = slice(int(design.starts[j]), int(design.starts[j] + design.counts[j]))
    return design.y[rows], design.X[rows, 1]


def _log_normal(y, mean, log_var):
    return -0.5 * (np.log(2 * np.pi) + log_var + (y - mean) ** 2 / np.exp(log_var))


def _log_prior(b: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log N(b; 0, sigma) for points b (..., d)."""
    P = np.linalg.inv(sigma)
    d = sigma.shape[0]
    return -0.5 * (d * np.log(2 * np.pi) + np.linalg.slogdet(sigma)[1] + np.einsum("...a,ab,...b->...", b, P, b))


def _spline_quantiles(axis, mass, probs):
    """Quantiles of a 1-d marginal tabulated as masses on a uniform grid (cubic spline CDF, Brent)."""
    from scipy.interpolate import CubicSpline
    from scipy.optimize import brentq

    F = CubicSpline(axis, mass / (axis[1] - axis[0])).antiderivative()
    total = F(axis[-1])
    return np.array([brentq(lambda x, p=p: F(x) / total - p, axis[0], axis[-1], xtol=1e-14) for p in probs])


def _brute_slope(res, j: int, gbar1: float, npts: int = 121, width: float = 8.0):
    """Posterior of school j's (u0, v0, v1) on a uniform tensor grid in (u0, t, v1) with t = v0 + gbar1 v1.

    The change of variables v0 = t - gbar1 v1 has unit Jacobian, so the masses are those of
    (u0, v0, v1) and the t-marginal is a sum over axes. A Riemann sum on a uniform grid is
    spectrally accurate for this smooth, rapidly decaying density. Parameters from res.params
    (natural scale) only; the grid is centred at the posterior means/SDs of random_effects.
    """
    P = res.params
    y, x = _school_rows(res, j)
    sigma = res.cov_re.to_numpy()
    re_ = res.random_effects().iloc[j]
    g = np.array([1.0, gbar1])
    _, C = res.random_effects(cov=True)
    Cv = C[j, 1:, 1:]
    centre = [re_["u0"], re_["v0"] + gbar1 * re_["v1"], re_["v1"]]
    sds = [re_["u0_sd"], np.sqrt(g @ Cv @ g), re_["v1_sd"]]
    axes = [np.linspace(c - width * s, c + width * s, npts) for c, s in zip(centre, sds)]
    U, T, V1 = np.meshgrid(*axes, indexing="ij")
    V0 = T - gbar1 * V1
    h = _log_prior(np.stack([U, V0, V1], axis=-1), sigma)
    for yi, xi in zip(y, x):
        h += _log_normal(yi, P["mean:Intercept"] + P["mean:x"] * xi + U, P["scale:Intercept"] + P["scale:x"] * xi + V0 + V1 * xi)
    mass = np.exp(h - h.max())
    mass /= mass.sum()
    return axes, mass, (U, T)


def _brute_bs(res, j: int, npts: int = 801, width: float = 9.0):
    """Posterior of school j's (u0, v) on a uniform 2-d grid, with its own Sigma_j from res.params."""
    P = res.params
    y, x = _school_rows(res, j)
    zj = res.model.design.S[j, 1]
    var_u = np.exp(P["bsvar:Intercept"] + P["bsvar:z"] * zj)
    # the reported cov(u0,v) is Sigma0's: the covariance of v with the standardised u0
    sigma = np.array([[var_u, np.sqrt(var_u) * P["cov(u0,v)"]], [np.sqrt(var_u) * P["cov(u0,v)"], P["var(v)"]]])
    re_ = res.random_effects().iloc[j]
    axes = [np.linspace(re_[k] - width * re_[f"{k}_sd"], re_[k] + width * re_[f"{k}_sd"], npts) for k in ("u0", "v")]
    U, V = np.meshgrid(*axes, indexing="ij")
    h = _log_prior(np.stack([U, V], axis=-1), sigma)
    for yi, xi in zip(y, x):
        h += _log_normal(yi, P["mean:Intercept"] + P["mean:x"] * xi + U, P["scale:Intercept"] + P["scale:x"] * xi + V)
    mass = np.exp(h - h.max())
    mass /= mass.sum()
    return axes, mass, (U, V)


SLOPE_SCHOOLS = [0, 13, 39]
PROBS = [0.025, 0.975]

#: Tolerances against the brute force. Means and E(exp t) are trapezoid / Gauss-Hermite sums
#: on both sides, spectrally accurate here (the 15-point rule across gbar is exact for
#: polynomials of degree 29; measured differences are below 1e-9): MEAN_ATOL, VAR_RTOL.
#: Interval ends come from cubic-spline CDFs on both sides (grid steps 0.08 and 0.13 posterior
#: SDs): the CDF error is below h^4 max|f'''| / 384 ~ 1e-6, i.e. a quantile error below
#: ~2e-5 posterior SDs at the 2.5% and 97.5% points: QUANTILE_SD_TOL.
MEAN_ATOL = 1e-7
VAR_RTOL = 1e-6
QUANTILE_SD_TOL = 2e-5


def _sd(mass, X):
    return np.sqrt((mass * X**2).sum() - (mass * X).sum() ** 2)


@pytest.mark.parametrize("j", SLOPE_SCHOOLS)
def test_variance_slope_school_table_matches_brute_force(slope_fit, j):
    """mean = E(u0_j | y), var = exp(wbar'a) E(exp(gbar'v_j) | y) with gbar = (1, x), and their
    equal-tailed intervals, at the default wbar (mean x) and at x = 1.5."""
    res = slope_fit
    design = res.model.design
    a = res.fe_scale.to_numpy()
    for xw in (None, 1.5):
        t = res.school_effects(w=None if xw is None else {"x": xw})
        xbar = design.W[:, 1].mean() if xw is None else xw
        assert t.attrs["gbar"] == pytest.approx({"Intercept": 1.0, "x": xbar})
        axes, mass, (U, T) = _brute_slope(res, j, xbar)
        wa = a[0] + a[1] * xbar
        row = t.iloc[j]
        assert row["mean"] == pytest.approx((mass * U).sum(), abs=MEAN_ATOL)
        assert row["var"] == pytest.approx(np.exp(wa) * (mass * np.exp(T)).sum(), rel=VAR_RTOL)
        q_u = _spline_quantiles(axes[0], mass.sum(axis=(1, 2)), PROBS)
        q_t = _spline_quantiles(axes[1], mass.sum(axis=(0, 2)), PROBS)
        np.testing.assert_allclose(row[["mean_lo", "mean_hi"]].to_numpy(float), q_u, rtol=0, atol=QUANTILE_SD_TOL * _sd(mass, U))
        lt = np.log(row[["var_lo", "var_hi"]].to_numpy(float)) - wa
        np.testing.assert_allclose(lt, q_t, rtol=0, atol=QUANTILE_SD_TOL * _sd(mass, T))


def test_variance_slope_own_covariates_and_flags(slope_fit):
    """w="school": each school at its own mean x (gbar_j = (1, xbar_j)) is row j of the table at w = {"x": xbar_j}."""
    res = slope_fit
    design = res.model.design
    own = res.school_effects(w="school")
    assert own.attrs["gbar"] == "school"
    xj = np.add.reduceat(design.X[:, 1], design.starts) / design.counts
    cols = ["mean", "mean_lo", "mean_hi", "var", "var_lo", "var_hi"]
    for j in (2, 17):
        at = res.school_effects(w={"x": xj[j]}).iloc[j]
        np.testing.assert_allclose(own.iloc[j][cols].to_numpy(float), at[cols].to_numpy(float), rtol=1e-9)
    # flags: the interval excludes the school with v = 0 at w, whose variance is exp(wbar'a)
    t = res.school_effects()
    med = np.exp(design.W.mean(axis=0) @ res.fe_scale.to_numpy())
    assert ((t["var_flag"] == 1) == (t["var_lo"] > med)).all() and ((t["var_flag"] == -1) == (t["var_hi"] < med)).all()
    assert (t["var_flag"] != 0).any()
    assert sorted(t["var_rank"]) == list(range(1, 41)) and (t["var_rank_lo"] <= t["var_rank_hi"]).all()
    # a mapping may name a term of scale_re_formula; unknown terms are refused by name
    with pytest.raises(mlsml.ModelSpecError, match="'nothere' is not a term of the variance design"):
        res.school_effects(w={"nothere": 1.0})


@pytest.mark.parametrize("j", [0, 1, 22])
def test_bs_school_table_matches_brute_force(bs_fit, j):
    """Each school's posterior uses its own Sigma_j = D_j Sigma0 D_j (var(u0_j) = exp(tau0 + tau1 z_j))."""
    res = bs_fit
    design = res.model.design
    a = res.fe_scale.to_numpy()
    t = res.school_effects()
    xbar = design.W[:, 1].mean()
    axes, mass, (U, V) = _brute_bs(res, j)
    wa = a[0] + a[1] * xbar
    row = t.iloc[j]
    assert row["mean"] == pytest.approx((mass * U).sum(), abs=MEAN_ATOL)
    assert row["var"] == pytest.approx(np.exp(wa) * (mass * np.exp(V)).sum(), rel=VAR_RTOL)
    q_u = _spline_quantiles(axes[0], mass.sum(axis=1), PROBS)
    q_v = _spline_quantiles(axes[1], mass.sum(axis=0), PROBS)
    np.testing.assert_allclose(row[["mean_lo", "mean_hi"]].to_numpy(float), q_u, rtol=0, atol=QUANTILE_SD_TOL * _sd(mass, U))
    lv = np.log(row[["var_lo", "var_hi"]].to_numpy(float)) - wa
    np.testing.assert_allclose(lv, q_v, rtol=0, atol=QUANTILE_SD_TOL * _sd(mass, V))
