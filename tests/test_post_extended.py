"""Post-estimation of the extended model classes (issue 11): scale_re_formula and bs_formula.

Simulation, bootstrap, school table, population quantities and plots, checked against
brute-force integration that shares no code with mlsml's quadrature.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import delta_se, scale_slope_data

import mlsml
from mlsml.predict import PosteriorGrid, posterior_likelihood, posterior_moments
from mlsml.scalegrid import ScaleGrid
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


def _brute_slope(res, j: int, gbar1: float, npts: int = 121, width: float = 8.0, sigma=None):
    """Posterior of school j's (u0, v0, v1) on a uniform tensor grid in (u0, t, v1) with t = v0 + gbar1 v1.

    The change of variables v0 = t - gbar1 v1 has unit Jacobian, so the masses are those of
    (u0, v0, v1) and the t-marginal is a sum over axes. A Riemann sum on a uniform grid is
    spectrally accurate for this smooth, rapidly decaying density. Parameters from res.params
    (natural scale) and ``sigma`` (default ``res.cov_re``) only; the grid is centred at the
    posterior means/SDs of random_effects.
    """
    P = res.params
    y, x = _school_rows(res, j)
    sigma = res.cov_re.to_numpy() if sigma is None else sigma
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


# ---------------------------------------------------------------- population quantities
def test_variance_slope_population_quantities(slope_fit):
    """At x: pa_variance = E exp(w'a + g'v) over schools = exp(w'a + g'S_vv g / 2), IDRs of g'v, vpc, corr(u0, g'v)."""
    res = slope_fit
    P = res.params
    pq = res.population_quantities(w={"x": 1.5})
    assert pq.attrs["gbar"] == {"Intercept": 1.0, "x": 1.5}
    S = res.cov_re.to_numpy()
    g = np.array([1.0, 1.5])
    sv2 = g @ S[1:, 1:] @ g
    wa = P["scale:Intercept"] + 1.5 * P["scale:x"]
    # brute force: E exp(g'v) for v ~ N(0, S_vv) on a 2-d grid (+/- 10 SDs per axis)
    ax = [np.linspace(-10 * np.sqrt(S[i, i]), 10 * np.sqrt(S[i, i]), 801) for i in (1, 2)]
    V0, V1 = np.meshgrid(*ax, indexing="ij")
    dens = np.exp(_log_prior(np.stack([V0, V1], axis=-1), S[1:, 1:]))
    ev = (dens * np.exp(V0 + 1.5 * V1)).sum() / dens.sum()
    assert pq.loc["pa_variance", "estimate"] == pytest.approx(np.exp(wa) * ev, rel=1e-10)
    assert pq.loc["median_variance", "estimate"] == pytest.approx(np.exp(wa), rel=1e-12)
    z90 = 1.2815515655446004
    assert pq.loc["idr_var_hi", "estimate"] == pytest.approx(np.exp(wa + z90 * np.sqrt(sv2)), rel=1e-12)
    pa = np.exp(wa + sv2 / 2)
    assert pq.loc["vpc", "estimate"] == pytest.approx(P["var(u0)"] / (P["var(u0)"] + pa), rel=1e-12)
    assert pq.loc["corr_uv", "estimate"] == pytest.approx((S[0, 1] + 1.5 * S[0, 2]) / np.sqrt(S[0, 0] * sv2), rel=1e-12)
    names = ["scale:Intercept", "scale:x", "var(v0)", "var(v1)", "cov(v0,v1)"]

    def pa_of(x):
        return np.exp(x[0] + 1.5 * x[1] + 0.5 * (x[2] + 2.25 * x[3] + 3.0 * x[4]))

    assert pq.loc["pa_variance", "std err"] == pytest.approx(delta_se(res, pa_of, names), rel=1e-5)
    # corr_pred: the correlation of the school table's columns at the same w (the posterior
    # means on the 9^3-point product rule of random_effects vs the grid: both within 1e-4 here)
    t = res.school_effects(w={"x": 1.5})
    assert pq.loc["corr_pred", "estimate"] == pytest.approx(np.corrcoef(t["mean"], t["var"])[0, 1], abs=1e-3)
    assert 0 < pq.loc["corr_pred", "std err"] < 1
    # the default w is the mean of each column, for both designs
    xbar = res.model.design.W[:, 1].mean()
    assert res.population_quantities().attrs["gbar"] == pytest.approx({"Intercept": 1.0, "x": xbar})
    with pytest.raises(mlsml.ModelSpecError, match="bs_formula only"):
        res.population_quantities(s={"z": 1})


def test_bs_population_quantities_at_school_covariates(bs_fit):
    """var(u0) at s is exp(tau's); the default s is the mean over schools of the bs_formula columns."""
    res = bs_fit
    P = res.params
    default = res.population_quantities()
    zbar = res.model.design.S[:, 1].mean()
    assert default.attrs["sbar"] == {"Intercept": 1.0, "z": zbar}
    wa = P["scale:Intercept"] + P["scale:x"] * res.model.design.W[:, 1].mean()
    pa = np.exp(wa + P["var(v)"] / 2)
    for s, zz in ((None, zbar), ({"z": 0.0}, 0.0), ([1.0, 1.0], 1.0)):
        pq = res.population_quantities(s=s)
        var_u = np.exp(P["bsvar:Intercept"] + P["bsvar:z"] * zz)
        assert pq.loc["sd_mean", "estimate"] == pytest.approx(np.sqrt(var_u), rel=1e-12)
        assert pq.loc["vpc", "estimate"] == pytest.approx(var_u / (var_u + pa), rel=1e-12)
        assert pq.loc["pa_variance", "estimate"] == pytest.approx(pa, rel=1e-12)
        # the reported cov(u0,v) is with the standardised u0: the correlation does not depend on s
        assert pq.loc["corr_uv", "estimate"] == pytest.approx(P["cov(u0,v)"] / np.sqrt(P["var(v)"]), rel=1e-12)

        def vpc(x, zz=zz):  # x = (tau0, tau1, a0, a1, var v)
            vu = np.exp(x[0] + x[1] * zz)
            return vu / (vu + np.exp(x[2] + x[3] * res.model.design.W[:, 1].mean() + x[4] / 2))

        names = ["bsvar:Intercept", "bsvar:z", "scale:Intercept", "scale:x", "var(v)"]
        assert pq.loc["vpc", "std err"] == pytest.approx(delta_se(res, vpc, names), rel=1e-5)
    with pytest.raises(mlsml.ModelSpecError, match="'nothere' is not a term"):
        res.population_quantities(s={"nothere": 1})
    with pytest.raises(mlsml.ModelSpecError, match="2 values"):
        res.population_quantities(s=[1.0])


def test_bs_without_random_scale_is_exactly_normal():
    """No random scale: u0_j | y ~ N(m_j, V_j) exactly, with V_j = 1 / (1/var(u0_j) + sum 1/sigma2_ij)."""
    res = mlsml.fit("y ~ x", bs_data(), groups="school", scale_formula="~ x", bs_formula="~ z", random_scale=False)
    P = res.params
    design = res.model.design
    var_u = np.exp(P["bsvar:Intercept"] + P["bsvar:z"] * design.S[:, 1])
    prec = 1.0 / np.exp(design.W @ res.fe_scale.to_numpy())
    r = design.y - design.X @ res.fe_mean.to_numpy()
    post_var = 1.0 / (1.0 / var_u + np.add.reduceat(prec, design.starts))
    post_mean = post_var * np.add.reduceat(prec * r, design.starts)
    t = res.school_effects(level=0.9)
    np.testing.assert_allclose(t["mean"], post_mean, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(t["mean_hi"] - t["mean"], 1.6448536269514722 * np.sqrt(post_var), rtol=1e-8)
    assert (t["var_flag"] == 0).all() and t["var_rank"].isna().all()
    assert np.isnan(res.population_quantities().loc["corr_uv", "estimate"])


def test_scale_grid_reproduces_the_core_grid(exam_m3):
    """With one scale effect and one Sigma, ScaleGrid is PosteriorGrid computed another way (the
    integrand's u-exact density, a spline CDF): both are O(h^4) on the same 201-point grid."""
    res = exam_m3
    mean, C = posterior_moments(posterior_likelihood(res), res.theta)
    sg = ScaleGrid.build(res.likelihood.integrand, res.theta, np.ones(1), mean, C)
    pg = PosteriorGrid.build(res.theta, res.model.design, mean[:, 1], np.sqrt(C[:, 1, 1]))
    sd_v = np.sqrt(C[:, 1, 1])
    assert np.all(np.abs(sg.quantile_t(PROBS) - pg.quantile_v(PROBS)) < QUANTILE_SD_TOL * sd_v[:, None])
    np.testing.assert_allclose(sg.quantile_linear(np.ones(1), PROBS), pg.quantile_linear(np.ones(1), PROBS), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sg.mean_exp_t(), pg.mean_exp_v(), rtol=VAR_RTOL)
    np.testing.assert_allclose(sg.mean_linear(np.ones(1)), pg.moments()[0][:, 0], rtol=0, atol=MEAN_ATOL)


# ---------------------------------------------------------------- plots
@pytest.mark.parametrize("which", ["slope", "bs"])
def test_plots_of_extended_models(which, slope_fit, bs_fit, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mlsml import plots

    res = slope_fit if which == "slope" else bs_fit
    t = res.school_effects()
    pq = res.population_quantities()
    fig = plots.caterpillar(res)
    n_var = int((t["var_flag"] != 0).sum())
    assert f"{n_var} of 40 schools" in fig.axes[1].get_title()
    fig2 = plots.mean_vs_variance(res)
    # the population-averaged variance line is pa_variance at the same w (gbar'S_vv gbar, not var(v1))
    labels = [line.get_label() for line in fig2.axes[0].lines]
    pa = [lab for lab in labels if lab.startswith("population-averaged")]
    assert pa == [f"population-averaged variance: {pq.loc['pa_variance', 'estimate']:.3g}"]
    fig3 = plots.effect_histograms(res)
    core = mlsml.fit("y ~ x", res.model.formula_spec.frame, groups="school", scale_formula="~ x")
    fig4 = plots.compare_models_plot(core, res, labels=("core", which))
    for k, f in enumerate((fig, fig2, fig3, fig4)):
        FigureCanvasAgg(f).print_png(str(tmp_path / f"{which}{k}.png"))
        assert (tmp_path / f"{which}{k}.png").stat().st_size > 1000


# ---------------------------------------------------------------- simulate: recovery; bootstrap: the fit's rule
@pytest.mark.parametrize("which", ["slope", "bs"])
def test_fits_to_simulated_data_recover_the_parameters(which):
    """Data drawn by draw_responses at known parameters on a modest design: the fit finds them (|z| < 4)."""
    if which == "slope":
        df = scale_slope_data(100, 15, seed=8, sigma=SIGMA_SLOPE)
        kw = dict(scale_formula="~ x", scale_re_formula="~ x")
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", **kw)
        theta = m.layout.theta_from_parts([0.2, 0.5], [-0.8, 0.1], SIGMA_SLOPE)
    else:
        df = bs_data(J=200, n=10, seed=9)
        kw = dict(scale_formula="~ x", bs_formula="~ z")
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", **kw)
        theta = m.layout.theta_from_parts([0.2, 0.5], [-0.8, 0.1], [[1.0, -0.2], [-0.2, 0.25]], tau=[-1.5, -1.0])
    truth = pd.Series(m.layout.to_natural(theta), index=m.param_names)
    y = draw_responses(m.design, theta, np.random.default_rng(12), 1)[0]
    res = mlsml.MELSM(m.design.with_response(y), None).fit()
    assert res.converged and not res.singular
    z = (res.params - truth) / res.bse
    assert np.all(np.abs(z) < 4), z


def test_bs_bootstrap_refits_with_the_fits_rule(bs_fit):
    """Replicates are drawn with each school's Sigma_j and refitted with the fit's own rule."""
    res = bs_fit
    assert res.quadrature == "marginal"
    boot = res.bootstrap(2, seed=5, n_jobs=1, progress=False)
    assert boot.n_converged == 2
    design = res.model.design
    ys = draw_responses(design, np.asarray(res.theta), np.random.default_rng(5), 2)
    spec = res.likelihood.spec
    for i in range(2):
        refit = mlsml.MELSM(design.with_response(ys[i]), None).fit(quadrature=spec.option, nagq=spec.nagq, start_params=res.params)
        assert boot.llf[i] == pytest.approx(refit.llf, abs=1e-9)
        np.testing.assert_allclose(boot.replicates.iloc[i].to_numpy(), refit.params.to_numpy(), rtol=0, atol=1e-9)
    # a product-rule fit is bootstrapped with the product rule
    prod = mlsml.fit("y ~ x", bs_data(), groups="school", scale_formula="~ x", bs_formula="~ z", quadrature="product", nagq=9)
    b2 = prod.bootstrap(1, seed=5, n_jobs=1, progress=False)
    y = draw_responses(design, np.asarray(prod.theta), np.random.default_rng(5), 1)[0]
    refit = mlsml.MELSM(design.with_response(y), None).fit(quadrature="product", nagq=9, start_params=prod.params)
    assert refit.quadrature == "product" and b2.llf[0] == pytest.approx(refit.llf, abs=1e-9)


# ---------------------------------------------------------------- the other combinations
def test_bs_and_variance_slopes_together_match_brute_force(slope_fit):
    """bs_formula with scale_re_formula: school j's prior is Sigma_j = D_j Sigma0 D_j over (u0, v0, v1)."""
    df = slope_fit.model.formula_spec.frame.assign(z=lambda f: (f["school"] % 2).astype(float))
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x", bs_formula="~ z")
    P = res.params
    a = res.fe_scale.to_numpy()
    t = res.school_effects()
    xbar = res.model.design.W[:, 1].mean()
    for j in (0, 1):
        sd0 = np.exp(0.5 * (P["bsvar:Intercept"] + P["bsvar:z"] * res.model.design.S[j, 1]))
        D = np.diag([sd0, 1.0, 1.0])
        axes, mass, (U, T) = _brute_slope(res, j, xbar, sigma=D @ res.cov_re.to_numpy() @ D)
        row = t.iloc[j]
        wa = a[0] + a[1] * xbar
        assert row["mean"] == pytest.approx((mass * U).sum(), abs=MEAN_ATOL)
        assert row["var"] == pytest.approx(np.exp(wa) * (mass * np.exp(T)).sum(), rel=VAR_RTOL)
        q_t = _spline_quantiles(axes[1], mass.sum(axis=(0, 2)), PROBS)
        lt = np.log(row[["var_lo", "var_hi"]].to_numpy(float)) - wa
        np.testing.assert_allclose(lt, q_t, rtol=0, atol=QUANTILE_SD_TOL * _sd(mass, T))


def test_variance_without_random_part_at_w(slope_fit):
    """scale_re_formula="~ 0 + x" at x = 0: gbar = 0, the variance is exp(w'a) in every school (no ranks, no flags)."""
    df = slope_fit.model.formula_spec.frame
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ 0 + x")
    t = res.school_effects(w={"x": 0.0})
    a = res.fe_scale.to_numpy()
    np.testing.assert_allclose(t[["var", "var_lo", "var_hi"]].to_numpy(), np.exp(a[0]), rtol=1e-14)
    assert (t["var_flag"] == 0).all() and t["var_rank"].isna().all()
    at1 = res.school_effects(w={"x": 1.0})  # gbar = 1: the slope effect itself
    assert (at1["var_lo"] < at1["var"]).all() and (at1["var"] < at1["var_hi"]).all()
    assert sorted(at1["var_rank"]) == list(range(1, 41))
    pq = res.population_quantities(w={"x": 0.0})
    assert pq.loc["pa_variance", "estimate"] == pytest.approx(np.exp(a[0]), rel=1e-12)
    assert np.isnan(pq.loc["corr_uv", "estimate"]) and np.isnan(pq.loc["corr_pred", "estimate"])


def test_variance_slopes_without_mean_effects(slope_fit):
    """re_formula="~ 0": no u; the table has only variances (q = 0 in the u-exact pieces)."""
    df = slope_fit.model.formula_spec.frame
    res = mlsml.fit("y ~ x", df, groups="school", re_formula="~ 0", scale_formula="~ x", scale_re_formula="~ x")
    t = res.school_effects()
    assert (t["mean"] == 0).all() and t["mean_rank"].isna().all()
    assert (t["var_lo"] < t["var"]).all() and (t["var"] < t["var_hi"]).all()
    re_ = res.random_effects()
    xbar = res.model.design.W[:, 1].mean()
    # posterior mean of the log variance effect: E(v0 + xbar v1) lies inside the interval of t
    lt = re_["v0"] + xbar * re_["v1"]
    wa = res.model.design.W.mean(axis=0) @ res.fe_scale.to_numpy()
    assert (np.log(t["var_lo"]) - wa < lt).all() and (lt < np.log(t["var_hi"]) - wa).all()


def test_scale_grid_draws_follow_the_posterior(slope_fit):
    """Rank intervals come from draws of (u0_j, gbar'v_j): their means, SDs and correlation match the grid's."""
    res = slope_fit
    mean, C = posterior_moments(posterior_likelihood(res), res.theta)
    g = np.array([1.0, 0.7])
    sg = ScaleGrid.build(res.likelihood.integrand, res.theta, g, mean, C)
    n = 20000
    cu, t = sg.draws(np.ones(1), n, np.random.default_rng(3))
    w = sg.weight
    Et = np.einsum("jgk,jg->j", w, sg.t)
    sd_t = np.sqrt(np.einsum("jgk,jg->j", w, sg.t**2) - Et**2)
    Eu = sg.mean_linear(np.ones(1))
    sd_u = np.sqrt(np.einsum("jgk,jgk->j", w, sg.mu[..., 0] ** 2 + sg.V[..., 0, 0]) - Eu**2)
    # Monte Carlo SE of a mean is sd / sqrt(n); of an SD about sd / sqrt(2n)
    assert np.all(np.abs(t.mean(axis=0) - Et) < 5 * sd_t / np.sqrt(n))
    assert np.all(np.abs(cu.mean(axis=0) - Eu) < 5 * sd_u / np.sqrt(n))
    assert np.all(np.abs(t.std(axis=0) / sd_t - 1) < 5 / np.sqrt(2 * n))
    assert np.all(np.abs(cu.std(axis=0) / sd_u - 1) < 5 / np.sqrt(2 * n))
    # the posterior correlation of u0 and t: from the grid vs from the draws (SE about 1/sqrt(n))
    cov_ut = np.einsum("jgk,jgk,jg->j", w, sg.mu[..., 0], sg.t) - Eu * Et
    r_grid = cov_ut / (sd_u * sd_t)
    r_draw = np.array([np.corrcoef(cu[:, j], t[:, j])[0, 1] for j in range(res.ngroups)])
    assert np.all(np.abs(r_draw - r_grid) < 5 / np.sqrt(n)), np.abs(r_draw - r_grid).max()
