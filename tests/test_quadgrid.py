"""The quadratic association's posterior grid (mlsml.quadgrid) and the school table it gives
(res.school_effects() for association="quadratic"), against brute-force integration of the same
integrand over a dense box per school, on a tiny data set (25 schools of 8)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special

import mlsml
from mlsml.predict import posterior_likelihood, posterior_moments
from mlsml.quadgrid import QuadraticPosterior
from mlsml.schools import variance_vectors
from mlsml.stage2 import _posterior_draws


def _brute(integrand, theta, mean, cov, half=20.0, points=401):
    """Each school's posterior of (u0, w) on a box of +/- ``half`` posterior SDs (the mirror mode
    of a school with a large variance lies far out: 10 SDs were too few in one case)."""
    sd = np.sqrt(np.einsum("jii->ji", cov))
    z = np.linspace(-half, half, points)
    U, W = np.meshgrid(z, z, indexing="ij")
    b = mean[:, None, :] + sd[:, None, :] * np.stack([U.ravel(), W.ravel()], axis=1)[None]
    h = np.asarray(integrand.log_h(np.asarray(theta, float), b))
    return b, np.exp(h - special.logsumexp(h, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def strong():
    """25 schools of 8 and a strong quadratic term (gamma = 0.5), at the true parameters (no fit:
    quadratic fits with a strong term take tens of seconds)."""
    rng = np.random.default_rng(11)
    J, n, su, sv, gamma = 25, 8, 0.6, 0.5, 0.5
    u = rng.normal(0, su, J)
    v = rng.normal(0, sv, J) + gamma * (u / su) ** 2
    school = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    y = 0.3 * x + u[school] + np.exp(0.5 * (-0.5 + v[school])) * rng.normal(size=J * n)
    df = pd.DataFrame({"school": school, "x": x, "y": y})
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", association="quadratic")
    theta = model.theta_from_params(pd.Series([0.0, 0.3, -0.5, su**2, sv**2, 0.0, gamma], index=model.param_names))
    integrand = model.objective().integrand
    mean, cov = posterior_moments(model.objective(nagq=21, quadrature="product"), theta)
    return integrand, theta, mean, cov


@pytest.fixture(scope="module")
def quad_fit():
    """A quadratic fit that is quick (gamma near 0): the 40-school demo, 12 students a school."""
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    return mlsml.fit("y ~ x", df[df.groupby("school").cumcount() < 12], groups="school", association="quadratic")


def _quantiles(x, p, probs):
    """Quantiles of a variable of the brute-force grid: its marginal masses sit on a uniform grid, so
    the distribution function at the cell boundaries ``x_i + h/2`` is their cumulative sum."""
    values, inverse = np.unique(np.round(x, 12), return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=p, minlength=values.size)
    h = values[1] - values[0]
    return np.interp(probs, np.cumsum(mass), values + h / 2)


def test_quadratic_grid_moments_and_quantiles_against_brute_force(strong):
    integrand, theta, mean, cov = strong
    qp = QuadraticPosterior.build(integrand, theta, mean, cov)
    b, p = _brute(integrand, theta, mean, cov)
    bm = np.einsum("jk,jka->ja", p, b)
    gm, gc = qp.moments()
    np.testing.assert_allclose(gm, bm, atol=2e-5)
    bc = np.einsum("jk,jka,jkb->jab", p, b - bm[:, None], b - bm[:, None])
    np.testing.assert_allclose(gc, bc, atol=2e-5)
    np.testing.assert_allclose(qp.mean_exp_w(), np.einsum("jk,jk->j", p, np.exp(b[:, :, 1])), rtol=2e-5)
    probs = [0.025, 0.5, 0.975]
    sd = np.sqrt(np.einsum("jii->ji", bc))
    qu, qw = qp.quantile_u(probs), qp.quantile_w(probs)
    for j in range(25):
        for a, quant in ((0, qu), (1, qw)):
            ref = _quantiles(b[j, :, a], p[j], probs)
            assert np.all(np.abs(quant[j] - ref) < 0.005 * sd[j, a]), (j, a, quant[j], ref)
    draws_u, draws_w = qp.draws(400, np.random.default_rng(3))
    z = (draws_u.mean(axis=0) - bm[:, 0]) / (sd[:, 0] / np.sqrt(400))
    assert np.abs(z).max() < 4.5  # 25 means of exact draws, each within 4.5 Monte Carlo SEs
    z = (draws_w.mean(axis=0) - bm[:, 1]) / (sd[:, 1] / np.sqrt(400))
    assert np.abs(z).max() < 4.5


def test_school_effects_of_a_quadratic_fit(quad_fit):
    """The school table (refused before: u | v, y is not normal with this association)."""
    res = quad_fit
    table = res.school_effects(ndraws=400, seed=3)
    mean, cov = posterior_moments(posterior_likelihood(res), res.theta)
    b, p = _brute(res.likelihood.integrand, res.theta, mean, cov, half=12.0, points=241)
    wbar, _ = variance_vectors(res, None)
    wa = float(wbar @ res.fe_scale.to_numpy())
    np.testing.assert_allclose(table["mean"], np.einsum("jk,jk->j", p, b[:, :, 0]), atol=1e-6)
    np.testing.assert_allclose(table["var"], np.exp(wa) * np.einsum("jk,jk->j", p, np.exp(b[:, :, 1])), rtol=1e-6)
    np.testing.assert_allclose(table["mean"], res.random_effects()["u0"], atol=1e-6)  # the nested rule's means
    assert np.all(table["mean_lo"] < table["mean"]) and np.all(table["mean"] < table["mean_hi"])
    assert np.all(table["var_lo"] < table["var"]) and np.all(table["var"] < table["var_hi"])
    assert table["mean_rank_lo"].le(table["mean_rank"]).all() and table["var_rank_hi"].ge(table["var_rank"]).all()


def test_stage2_mi_of_a_quadratic_fit_draws_from_the_grid(quad_fit):
    """res.stage2(method="mi") after association="quadratic" (refused before: no exact draws); the
    scale effect is w, as in random_effects(); the draws' means are the posterior means."""
    res = quad_fit
    rng = np.random.default_rng(8)
    re = res.random_effects()
    schools = pd.DataFrame({"school": re.index, "score": 2.0 * re["u0"].to_numpy() + rng.normal(0, 0.1, len(re))})
    s2 = res.stage2("score ~ u0 + v", data=schools, ndraws=40, seed=2, stage1_uncertainty=False)
    assert list(s2.params.index) == ["Intercept", "u0", "v", "var(resid)"] and np.all(np.isfinite(s2.bse))
    mean, cov = posterior_moments(posterior_likelihood(res), res.theta)
    b = _posterior_draws(res, np.asarray(res.theta, float), mean, cov, 400, np.random.default_rng(1))
    z = (b.mean(axis=0) - mean) / np.sqrt(np.einsum("jii->ji", cov) / 400)
    assert b.shape == (400, 40, 2) and np.abs(z).max() < 4.5
