"""Posterior summaries of the school effects against brute-force integration."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq

import mlsml
from mlsml.likelihood import SchoolSums, log_conditional, log_prior
from mlsml.predict import PosteriorGrid, _sums, posterior_moments

SCHOOLS = [0, 7, 30, 64]  # codes: a large, a middling, a small and the last school of exam


def _brute_force(res, j: int, npts: int, width: float = 9.0):
    """Posterior of school ``j`` on a fine uniform tensor grid (+/- width posterior SDs).

    A plain Riemann sum on a uniform grid is spectrally accurate for these smooth,
    rapidly decaying densities. Returns the grid axes, the normalised masses, the
    posterior mean and the covariance.
    """
    design = res.model.design
    lay = design.layout
    s = _sums(res.theta, design)
    sj = SchoolSums(*(a[j : j + 1] for a in s))
    _, _, L = lay.split(np.asarray(res.theta))
    m, C = posterior_moments(res.theta, design, 21 if lay.d < 3 else 9)
    sd = np.sqrt(np.diag(C[j]))
    axes = [np.linspace(m[j, i] - width * sd[i], m[j, i] + width * sd[i], npts) for i in range(lay.d)]
    mesh = np.meshgrid(*axes, indexing="ij")
    b = np.stack([g.ravel() for g in mesh], axis=-1)[None]
    h = np.asarray(log_conditional(b, sj, lay.q, lay.random_scale) + log_prior(b, np.asarray(L)))[0]
    p = np.exp(h - h.max())
    p /= p.sum()
    mean = p @ b[0]
    dev = b[0] - mean
    cov = dev.T @ (dev * p[:, None])
    return axes, p.reshape((npts,) * lay.d), mean, cov


def _quantiles_1d(axis, mass, probs):
    """Quantiles of a 1-d marginal tabulated as masses on a uniform grid.

    The density is interpolated by a cubic spline, whose antiderivative is the CDF
    (O(h^4), as Simpson's rule), inverted by Brent's method. (Not
    ``scipy.integrate.cumulative_simpson``: it needs scipy 1.12, setup.cfg allows 1.11.)
    """
    h = axis[1] - axis[0]
    F = CubicSpline(axis, mass / h).antiderivative()
    total = F(axis[-1])
    return np.array([brentq(lambda x, p=p: F(x) / total - p, axis[0], axis[-1], xtol=1e-14) for p in probs])


@pytest.mark.parametrize("j", SCHOOLS)
def test_moments_match_brute_force_2d(exam_m3, j):
    _, _, mean, cov = _brute_force(exam_m3, j, 801)
    re_, C = exam_m3.random_effects(cov=True)
    row = re_.iloc[j]
    np.testing.assert_allclose([row["u0"], row["v"]], mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose([row["u0_sd"], row["v_sd"]], np.sqrt(np.diag(cov)), atol=1e-4, rtol=0)
    np.testing.assert_allclose(C[j], cov, atol=1e-5, rtol=0)
    # in fact the default 11-point rule is far more accurate than required
    np.testing.assert_allclose([row["u0"], row["v"]], mean, atol=1e-8, rtol=0)


@pytest.mark.parametrize("j", SCHOOLS[:3])
def test_interval_quantiles_match_brute_force(exam_m3, j):
    axes, mass, _, _ = _brute_force(exam_m3, j, 1601)
    probs = [0.025, 0.5, 0.975]
    grid = PosteriorGrid.build(exam_m3.theta, exam_m3.model.design)
    qv = grid.quantile_v(probs)[j]
    qu = grid.quantile_linear(np.array([1.0]), probs)[j]
    np.testing.assert_allclose(qv, _quantiles_1d(axes[1], mass.sum(axis=0), probs), atol=1e-6)
    np.testing.assert_allclose(qu, _quantiles_1d(axes[0], mass.sum(axis=1), probs), atol=1e-6)
    t = exam_m3.school_effects()
    alpha = exam_m3.fe_scale.to_numpy()
    wbar = exam_m3.model.design.W.mean(axis=0)
    np.testing.assert_allclose(t.iloc[j][["var_lo", "var_hi"]], np.exp(wbar @ alpha + qv[[0, 2]]), rtol=1e-12)
    np.testing.assert_allclose(t.iloc[j][["mean_lo", "mean_hi"]], qu[[0, 2]], rtol=1e-12)
    # posterior mean of the school variance, E exp(wbar'alpha + v), by brute force
    ev = mass.sum(axis=0) @ np.exp(axes[1])
    assert t.iloc[j]["var"] == pytest.approx(np.exp(wbar @ alpha) * ev, rel=1e-8)


def test_grid_and_quadrature_agree_for_all_schools(exam_m3):
    design = exam_m3.model.design
    m, C = posterior_moments(exam_m3.theta, design)
    m2, C2 = PosteriorGrid.build(exam_m3.theta, design).moments()
    np.testing.assert_allclose(m, m2, atol=1e-7)
    np.testing.assert_allclose(C, C2, atol=1e-7)


def test_no_random_scale_is_exactly_normal(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    design = res.model.design
    # closed form: u_j | y ~ N(tau2 S1 / (1 + tau2 S2), tau2 / (1 + tau2 S2)) with S's scaled by 1/sigma2
    s = _sums(res.theta, design)
    tau2 = res.params["var(u0)"]
    post_var = tau2 / (1 + tau2 * s.S2[:, 0, 0])
    post_mean = post_var * s.S1[:, 0]
    re_ = res.random_effects()
    assert list(re_.columns) == ["u0", "u0_sd", "n"]
    np.testing.assert_allclose(re_["u0"], post_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(re_["u0_sd"], np.sqrt(post_var), rtol=1e-10)
    t = res.school_effects(level=0.9)
    np.testing.assert_allclose(t["mean_hi"] - t["mean"], 1.6448536269514722 * np.sqrt(post_var), rtol=1e-8)
    np.testing.assert_allclose(t["var"], np.exp(res.params["scale:Intercept"]), rtol=1e-14)  # equal up to rounding
    assert (t["var_flag"] == 0).all() and t["var_rank"].isna().all()


@pytest.mark.slow
def test_random_slopes_three_dimensions(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT")
    re_, C = res.random_effects(cov=True)
    assert list(re_.columns) == ["u0", "u0_sd", "u1", "u1_sd", "v", "v_sd", "n"]
    assert C.shape == (65, 3, 3)
    # the default 7-point rule in 3-d against a brute-force 3-d grid
    t0 = res.school_effects(z={"standLRT": 0.0})
    wbar = res.model.design.W.mean(axis=0)
    for j in (0, 30):
        axes, mass, mean, cov = _brute_force(res, j, 121, width=8.0)
        np.testing.assert_allclose(re_.iloc[j][["u0", "u1", "v"]], mean, atol=1e-4)
        np.testing.assert_allclose(C[j], cov, atol=1e-4)
        # interval quantiles of u0 (mixture of normals over v) and of v (exact marginal)
        q_u0 = _quantiles_1d(axes[0], mass.sum(axis=(1, 2)), [0.025, 0.975])
        q_v = _quantiles_1d(axes[2], mass.sum(axis=(0, 1)), [0.025, 0.975])
        np.testing.assert_allclose(t0.iloc[j][["mean_lo", "mean_hi"]], q_u0, atol=1e-5)
        np.testing.assert_allclose(np.log(t0.iloc[j][["var_lo", "var_hi"]].to_numpy(float)) - wbar @ res.fe_scale, q_v, atol=1e-5)
    # the exact grid representation integrates u out in closed form (any q)
    m2, C2 = PosteriorGrid.build(res.theta, res.model.design).moments()
    np.testing.assert_allclose(re_[["u0", "u1", "v"]].to_numpy(), m2, atol=5e-5)
    np.testing.assert_allclose(C, C2, atol=5e-5)
    # school mean progress is zbar'u_j with zbar the overall mean of (1, standLRT)
    zbar = res.model.design.Z.mean(axis=0)
    t = res.school_effects()
    np.testing.assert_allclose(t["mean"], re_[["u0", "u1"]].to_numpy() @ zbar, atol=1e-12)
    np.testing.assert_allclose(t0["mean"], re_["u0"], atol=1e-12)


def test_draws_follow_the_posterior(exam_m3):
    design = exam_m3.model.design
    grid = PosteriorGrid.build(exam_m3.theta, design)
    m, C = grid.moments()
    cu, v = grid.draws(np.array([1.0]), 20000, np.random.default_rng(1))
    # Monte Carlo error of the mean is sd / sqrt(20000) < 0.001
    np.testing.assert_allclose(cu.mean(axis=0), m[:, 0], atol=5 * np.sqrt(C[:, 0, 0].max() / 20000))
    np.testing.assert_allclose(v.mean(axis=0), m[:, 1], atol=5 * np.sqrt(C[:, 1, 1].max() / 20000))
    np.testing.assert_allclose(v.std(axis=0), np.sqrt(C[:, 1, 1]), rtol=0.05)
    r = np.array([np.corrcoef(cu[:, j], v[:, j])[0, 1] for j in range(5)])
    np.testing.assert_allclose(r, C[:5, 0, 1] / np.sqrt(C[:5, 0, 0] * C[:5, 1, 1]), atol=0.05)


def test_coarse_fit_still_gets_accurate_posteriors(exam):
    with warnings.catch_warnings():  # whether a 3-point fit converges is not the point here
        warnings.simplefilter("ignore")
        res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", nagq=3)
    assert res.nagq == 3
    re_, C = res.random_effects(cov=True)
    # the summaries use at least the default 11 points per dimension, not the fit's 3
    m, C11 = posterior_moments(res.theta, res.model.design, 11)
    np.testing.assert_allclose(re_[["u0", "v"]].to_numpy(), m, rtol=0, atol=1e-12)
    np.testing.assert_allclose(C, C11, rtol=0, atol=1e-12)
    m3, _ = posterior_moments(res.theta, res.model.design, 3)
    assert np.abs(m3 - m).max() > 1e-8  # 3 points would have been visibly less accurate
