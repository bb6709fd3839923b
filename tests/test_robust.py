"""Cluster-robust (sandwich) standard errors (mlsml.robust): the schools' scores against finite
differences, the sandwich against a brute-force computation, and gllamm's published robust SEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.robust import check_cov_type, school_scores

DATA = Path(__file__).parent / "data"

#: Central-difference step of the brute-force scores (relative to 1 + |theta|).
FD_STEP = 1e-5


def _fd_scores(lik, theta, nodes):
    """``d (W_j log L_j) / d theta`` school by school, by central differences at fixed nodes."""
    W = np.ones(lik.design.ngroups) if lik.design.group_weights is None else lik.design.group_weights
    cols = []
    for a in range(theta.size):
        h = FD_STEP * (1.0 + abs(theta[a]))
        up, down = theta.copy(), theta.copy()
        up[a] += h
        down[a] -= h
        cols.append((lik.per_school(up, nodes) - lik.per_school(down, nodes)) / (2 * h))
    return np.stack(cols, axis=1) * W[:, None]


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    df = mlsml.simulate.demo_data(n_groups=15, seed=7)
    df = df.groupby("school").head(12).reset_index(drop=True)
    rng = np.random.default_rng(8)
    df["z"] = rng.normal(size=len(df))
    df["w1"] = rng.uniform(0.5, 2.0, size=len(df))
    df["w2"] = df["school"].map(dict(zip(df["school"].unique(), rng.uniform(1.0, 5.0, df["school"].nunique()))))
    return df


CASES = {
    "core u-exact (closed form)": dict(scale_formula="~ x"),
    "core product (autograd)": dict(scale_formula="~ x", quadrature="product"),
    "scale_re_formula (autograd)": dict(scale_re_formula="~ z"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_school_scores_are_the_derivatives_of_each_school(small, name):
    kw = dict(CASES[name])
    quadrature = kw.pop("quadrature", "auto")
    model = mlsml.MELSM.from_formula("y ~ x", small, groups="school", weights="w1", group_weights="w2", **kw)
    lik = model.objective(nagq=7, quadrature=quadrature)
    theta = mlsml.start.start_values(lik.integrand) + np.random.default_rng(2).normal(0, 0.1, model.layout.n_params)
    nodes = lik.adapt(theta)
    S = school_scores(lik, theta, nodes)
    ref = _fd_scores(lik, theta, nodes)
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(S.sum(axis=0), lik.value_and_grad(theta, nodes)[1], rtol=0, atol=1e-9 * np.abs(ref).max())


def test_sandwich_equals_brute_force(small):
    res = mlsml.fit("y ~ x", small, groups="school", scale_formula="~ x", weights="w1", group_weights="w2")
    assert res.cov_type == "robust"
    theta = np.asarray(res.theta)
    lik = res.likelihood
    S = _fd_scores(lik, theta, lik.adapt(theta))
    J = S.shape[0]
    A = np.linalg.inv(-lik.hessian(theta))
    V = A @ (J / (J - 1) * S.T @ S) @ A
    jac = res.layout.natural_jacobian(theta)
    np.testing.assert_allclose(res.cov_params().to_numpy(), jac @ V @ jac.T, rtol=1e-5, atol=1e-12)


def test_robust_reaches_every_standard_error(small):
    res = mlsml.fit("y ~ x", small, groups="school", scale_formula="~ x", cov_type="robust")
    base = mlsml.fit("y ~ x", small, groups="school", scale_formula="~ x")
    assert base.cov_type == "nonrobust" and not np.allclose(res.bse, base.bse)
    # correlations, predictions and the MIXWILD report use the robust covariance of theta
    assert not np.allclose(res.re_correlations()["std err"], base.re_correlations()["std err"])
    p, q = res.get_prediction(small.head(3), kind="sd"), base.get_prediction(small.head(3), kind="sd")
    assert not np.allclose(p.se_params, q.se_params)
    assert "robust" in res.summary().as_text()
    assert "cluster-robust" in res.summary(style="mixwild").as_text()


def test_gllamm_published_robust_standard_errors():
    """gllamm's robust SEs for lme4's sleepstudy (WeMix's tests/testthat/Examples.smcl):
    ``reaction days, i(subject) pweight(w) nip(13) adapt`` with unit weights."""
    ss = pd.read_csv(DATA / "sleepstudy.csv")
    res = mlsml.fit("Reaction ~ Days", ss, groups="Subject", random_scale=False, weights=np.ones(len(ss)))
    assert res.cov_type == "robust"
    assert abs(res.llf - (-897.03932)) < 1e-5
    np.testing.assert_allclose(res.params[["mean:Intercept", "mean:Days", "var(u0)"]], [251.4051, 10.46729, 1296.8768], rtol=6e-6)
    np.testing.assert_allclose(res.bse[["mean:Intercept", "mean:Days", "var(u0)"]], [6.824566, 1.545789, 516.67943], rtol=3e-6)
    # gllamm's level-1 variance 954.52789 (220.179): ours is its log
    assert abs(np.exp(res.params["scale:Intercept"]) - 954.52789) < 1e-3
    assert abs(res.bse["scale:Intercept"] * 954.52789 - 220.179) < 2e-3


def test_cov_type_is_checked(small):
    design = mlsml.MELSM.from_formula("y ~ x", small, groups="school").design
    with pytest.raises(mlsml.ModelSpecError, match="cov_type must be one of"):
        check_cov_type("HC0", design)
