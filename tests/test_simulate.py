"""Drawing data from the model (mlsml.simulate).

The moment tests compare unbiased moment estimators with the parameters the data
were drawn with. Each estimator is a mean over independent units (schools, rows or
replicates) of a per-unit quantity ``q``, so its Monte-Carlo standard error is
``sd(q) / sqrt(n_units)`` from the sample itself; the bound is 5 standard errors
(a false alarm about once in 1.7 million checks), whatever the numpy version's
random streams. Nothing is fitted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special

import mlsml
from mlsml.simulate import DEMO_TRUTH, demo_data, draw_responses, simulate_data

Z_BOUND = 5.0


def assert_mean_is(q, truth, what=""):
    """The mean of the independent values ``q`` is within Z_BOUND standard errors of ``truth``."""
    q = np.asarray(q, dtype=float)
    se = q.std(ddof=1) / np.sqrt(q.size)
    z = (q.mean() - truth) / se
    assert abs(z) < Z_BOUND, f"{what}: mean {q.mean():.4g} vs {truth:.4g} ({z:+.1f} SE, SE {se:.2g})"


def _schools(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [g for _, g in df.groupby("school", sort=True)]


# ----------------------------------------------------------------- simulate_data
def test_simulate_data_layout():
    sizes = [3, 1, 5, 2]
    df = simulate_data(sizes, seed=1)
    assert list(df.columns) == ["school", "student", "y", "x"]
    assert len(df) == sum(sizes)
    assert df.groupby("school").size().tolist() == sizes
    assert df["school"].tolist() == [1, 1, 1, 2, 3, 3, 3, 3, 3, 4, 4]
    assert df["student"].tolist() == [1, 2, 3, 1, 1, 2, 3, 4, 5, 1, 2]
    assert np.isfinite(df[["y", "x"]].to_numpy()).all()


def test_seeds_reproduce():
    a = simulate_data([4] * 10, seed=7)
    pd.testing.assert_frame_equal(a, simulate_data([4] * 10, seed=7))
    assert not np.array_equal(a["y"], simulate_data([4] * 10, seed=8)["y"])
    pd.testing.assert_frame_equal(demo_data(n_groups=5, seed=3), demo_data(n_groups=5, seed=3))
    assert not demo_data(n_groups=5, seed=3).equals(demo_data(n_groups=5, seed=4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cov=[[0.05, 0.0], [0.0, 0.05]], random_scale=False), "cov must be 1x1 for random_slope=False, random_scale=False"),
        (dict(cov=[[0.05, 0.0], [0.0, 0.05]], random_slope=True), "cov must be 3x3 for random_slope=True, random_scale=True"),
        (dict(cov=[[0.05]]), "cov must be 2x2 for random_slope=False, random_scale=True"),
        (dict(cov=[0.05, 0.05]), "cov must be 2x2"),
    ],
)
def test_cov_must_match_the_school_effects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_data([5] * 4, seed=1, **kwargs)


def test_mean_and_variance_functions():
    """Without school effects e = y - b0 - b1 x is known exactly: E e = E e x = 0, and
    ln e^2 = a0 + a1 x + ln chi2_1 with E ln chi2_1 = psi(1/2) + ln 2, var = pi^2 / 2."""
    beta, alpha = (0.3, 0.7), (-0.8, 0.4)
    df = simulate_data([50] * 400, beta=beta, alpha=alpha, cov=[[0.0]], random_scale=False, seed=3)
    x = df["x"].to_numpy()
    e = df["y"].to_numpy() - beta[0] - beta[1] * x
    assert_mean_is(e, 0.0, "E e")
    assert_mean_is(e * x, 0.0, "E e x")
    le = np.log(e**2) - (special.digamma(0.5) + np.log(2.0))
    xc = x - x.mean()
    sxx = np.sum(xc**2)
    slope = np.sum(xc * le) / sxx
    intercept = le.mean() - slope * x.mean()
    var = np.pi**2 / 2
    assert abs(slope - alpha[1]) < Z_BOUND * np.sqrt(var / sxx)
    assert abs(intercept - alpha[0]) < Z_BOUND * np.sqrt(var * (1 / x.size + x.mean() ** 2 / sxx))


def test_covariate_between_and_within_schools():
    n, sd_b = 10, 0.5
    df = simulate_data([n] * 2000, x_between_sd=sd_b, seed=4)
    s2 = np.array([g["x"].var(ddof=1) for g in _schools(df)])
    xbar = np.array([g["x"].mean() for g in _schools(df)])
    assert_mean_is(s2, 1 - sd_b**2, "within-school variance of x")
    assert_mean_is(xbar**2 - s2 / n, sd_b**2, "between-school variance of x")


def test_random_intercept_and_scale_moments():
    """School j's residuals r = y - b0 - b1 x = u0_j + e (alpha1 = 0): with L_j = ln s_j^2 and
    c = psi((n-1)/2) + ln(2/(n-1)), E L_j = a0 + c, var L_j = var(v) + psi'((n-1)/2),
    E r_j^2 = var(u0) + E s_j^2 / n and E r_j (L_j - a0 - c) = cov(u0, v)."""
    n, J = 20, 2000
    beta, alpha = (0.2, 0.6), (-0.5, 0.0)
    cov = np.array([[0.3, -0.1], [-0.1, 0.25]])
    df = simulate_data([n] * J, beta=beta, alpha=alpha, cov=cov, seed=5)
    r = df["y"] - beta[0] - beta[1] * df["x"]
    by_school = r.groupby(df["school"])
    rbar = by_school.mean().to_numpy()
    s2 = by_school.var(ddof=1).to_numpy()
    c = special.digamma((n - 1) / 2) + np.log(2 / (n - 1))
    L = np.log(s2) - alpha[0] - c
    assert_mean_is(L, 0.0, "alpha0")
    assert_mean_is(L**2 - special.polygamma(1, (n - 1) / 2), cov[1, 1], "var(v)")
    assert_mean_is(rbar**2 - s2 / n, cov[0, 0], "var(u0)")
    assert_mean_is(rbar * L, cov[0, 1], "cov(u0,v)")


def test_random_slope_moments():
    """Per-school least squares of r = y - b0 - b1 x on (1, x) is (u0_j, u1_j) plus noise
    with covariance sigma^2 (X_j'X_j)^-1 (no random scale, so sigma^2 = exp(a0) is known)."""
    n, J = 15, 1500
    beta, alpha = (0.0, 0.5), (-1.0, 0.0)
    cov = np.array([[0.2, 0.05], [0.05, 0.1]])
    df = simulate_data([n] * J, beta=beta, alpha=alpha, cov=cov, random_scale=False, random_slope=True, seed=6)
    sigma2 = np.exp(alpha[0])
    q = {(0, 0): [], (1, 1): [], (0, 1): []}
    for g in _schools(df):
        X = np.column_stack([np.ones(len(g)), g["x"].to_numpy()])
        r = g["y"].to_numpy() - X @ np.asarray(beta)
        coef = np.linalg.solve(X.T @ X, X.T @ r)
        noise = sigma2 * np.linalg.inv(X.T @ X)
        for i, k in q:
            q[i, k].append(coef[i] * coef[k] - noise[i, k])
    for (i, k), values in q.items():
        assert_mean_is(values, cov[i, k], f"Sigma[{i},{k}]")


def test_demo_data():
    df = demo_data(n_groups=40, seed=1)
    sizes = df.groupby("school").size()
    assert len(sizes) == 40 and sizes.min() >= 10 and sizes.max() <= 400
    np.linalg.cholesky(np.array(DEMO_TRUTH["cov"]))  # a covariance matrix
    assert list(df.columns) == ["school", "student", "y", "x"]


# ----------------------------------------------------------------- draw_responses
def _design(**kwargs):
    rng = np.random.default_rng(0)
    J, n = 6, 4
    df = pd.DataFrame(
        {
            "school": np.repeat(np.arange(J), n),
            "x": np.tile([-1.5, -0.5, 0.5, 1.5], J),
            "s": np.repeat(np.linspace(-1.0, 1.0, J), n),
            "y": rng.normal(size=J * n),
        }
    )
    return mlsml.MELSM.from_formula("y ~ x", df, groups="school", **kwargs).design


def _check_draws(design, theta, var_y, var_u0, reps=20000):
    """Mean x'beta, variance var_y per row, covariance var_u0 within and 0 between schools."""
    y = draw_responses(design, theta, np.random.default_rng(11), n_reps=reps)
    assert y.shape == (reps, design.nobs)
    mu = design.X @ np.asarray(theta)[: design.layout.p]
    dev = y - mu
    for i in range(design.nobs):
        assert_mean_is(dev[:, i], 0.0, f"mean of row {i}")
        assert_mean_is(dev[:, i] ** 2, var_y[i], f"variance of row {i}")
    same = design.group[0] == design.group[1]
    assert same and design.group[0] != design.group[-1]
    assert_mean_is(dev[:, 0] * dev[:, 1], var_u0[0], "within-school covariance")
    assert_mean_is(dev[:, 0] * dev[:, -1], 0.0, "between-school covariance")


def test_draw_responses_random_intercept_and_scale():
    design = _design(scale_formula="~ x")
    lay = design.layout
    sigma = np.array([[0.3, -0.1], [-0.1, 0.4]])
    alpha = np.array([-0.6, 0.3])
    theta = lay.theta_from_parts([0.5, 1.0], alpha, sigma)
    eta = design.W @ alpha
    var_y = sigma[0, 0] + np.exp(eta + sigma[1, 1] / 2)
    _check_draws(design, theta, var_y, np.full(design.ngroups, sigma[0, 0]))


def test_draw_responses_variance_slopes():
    """ln var(e) = w'a + v0 + v1 x: var(y) = var(u0) + exp(w'a + g'S_vv g / 2) (the slope was ignored)."""
    design = _design(scale_re_formula="~ x")
    lay = design.layout
    assert lay.re_names == ("u0", "v0", "v1")
    sigma = np.array([[0.3, 0.05, -0.02], [0.05, 0.2, 0.05], [-0.02, 0.05, 0.15]])
    theta = lay.theta_from_parts([0.5, 1.0], [-0.4], sigma)
    G = design.G
    var_g = np.einsum("ia,ab,ib->i", G, sigma[1:, 1:], G)
    var_y = sigma[0, 0] + np.exp(-0.4 + var_g / 2)
    _check_draws(design, theta, var_y, np.full(design.ngroups, sigma[0, 0]))


def test_draw_responses_between_school_variance_model():
    """var(u0_j) = exp(s_j'tau) (the variance model was ignored: var(u0_j) was 1)."""
    design = _design(bs_formula="~ s")
    lay = design.layout
    tau = np.array([-0.5, 1.2])
    sigma0 = np.array([[1.0, 0.3], [0.3, 0.25]])
    theta = lay.theta_from_parts([0.5, 1.0], [-1.0], sigma0, tau=tau)
    var_u0 = np.exp(design.S @ tau)
    var_y = var_u0[design.group] + np.exp(-1.0 + sigma0[1, 1] / 2)
    _check_draws(design, theta, var_y, var_u0)


def test_draw_responses_without_random_scale_and_reproducibility():
    design = _design(random_scale=False)
    lay = design.layout
    theta = lay.theta_from_parts([0.5, 1.0], [-0.7], [[0.4]])
    _check_draws(design, theta, np.full(design.nobs, 0.4 + np.exp(-0.7)), np.full(design.ngroups, 0.4))
    a = draw_responses(design, theta, np.random.default_rng(3), n_reps=2)
    np.testing.assert_array_equal(a, draw_responses(design, theta, np.random.default_rng(3), n_reps=2))
    assert not np.array_equal(a[0], a[1])  # replicates are independent draws
