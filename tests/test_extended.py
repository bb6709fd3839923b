"""Random slopes in the log variance (scale_re_formula) and the log-linear BS variance (bs_formula)."""

from __future__ import annotations

import warnings

import autograd
import numpy as np
import pandas as pd
import pytest
from conftest import DATA, load_reference, scale_slope_data

import mlsml
from mlsml.errors import ModelSpecError, SingularFitWarning
from mlsml.integrand import PerObservation, log_conditional, make_integrand, school_sums
from mlsml.likelihood import Likelihood
from mlsml.quadrature import QuadratureSpec, default_nagq
from mlsml.start import start_values_ext


def _lik(design, nagq=None, kind="product"):
    return Likelihood.build(design, QuadratureSpec(kind, nagq or default_nagq(design.layout.d)))


def loglik(theta, design, nagq=None):
    return _lik(design, nagq).value(theta)


def uexact_loglik(theta, design, nagq):
    return _lik(design, nagq, "uexact").value(theta)


RIESBY = dict(formula="hamdep ~ week + endog + endweek", groups="id", scale_formula="~ week + endog")


@pytest.fixture(scope="module")
def riesby() -> pd.DataFrame:
    return pd.read_csv(DATA / "riesby.csv")


def simulate_scale_slope(J=40, n=12, sigma=None, seed=3) -> pd.DataFrame:
    """y = 0.2 + 0.5 x + u0 + e, ln var(e) = -0.8 + 0.1 x + v0 + v1 x (conftest.scale_slope_data)."""
    return scale_slope_data(J=J, n=n, seed=seed, sigma=sigma)


# ---------------------------------------------------------------- names and errors
def test_names_scale_slope_and_bs(riesby):
    df = simulate_scale_slope()
    m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    assert m.param_names[4:] == ["var(u0)", "var(v0)", "var(v1)", "cov(u0,v0)", "cov(u0,v1)", "cov(v0,v1)"]
    # an intercept-only scale_re_formula is the plain random scale, named v (the contract)
    m1 = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_re_formula="~ 1", random_scale=False)
    assert m1.param_names[-3:] == ["var(u0)", "var(v)", "cov(u0,v)"]
    mb = mlsml.MELSM.from_formula(data=riesby, bs_formula="~ endog", **RIESBY)
    assert mb.param_names[7:] == ["bsvar:Intercept", "bsvar:endog", "var(v)", "cov(u0,v)"]


def test_bs_formula_level1_columns_and_random_intercept(riesby):
    # a time-varying column is a level-1 column of the BS variance (MIXREGLS's u_ij'ALPHA; issue 13,
    # tests/test_bs_level1.py), no longer refused
    m = mlsml.MELSM.from_formula(data=riesby, bs_formula="~ week + endog", **RIESBY)
    assert m.design.S_level1 is not None and np.any(m.design.S_level1[:, 1] != 0)
    np.testing.assert_array_equal(m.design.S_level1[:, [0, 2]], 0.0)
    with pytest.raises(ModelSpecError, match="re_formula"):
        mlsml.MELSM.from_formula(data=riesby, bs_formula="~ endog", re_formula="~ 0", **RIESBY)


# ---------------------------------------------------------------- exactness of the pieces
def test_per_observation_path_equals_school_sums():
    """With g_ij = 1 the per-observation conditional equals the per-school-sums one."""
    df = simulate_scale_slope()
    df["one"] = 1.0
    m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", re_formula="~ x")
    d = m.design
    rng = np.random.default_rng(0)
    b = rng.normal(scale=0.3, size=(d.ngroups, 7, 3))
    beta, alpha = np.array([0.1, 0.4]), np.array([-0.7, 0.05])
    sums = school_sums(beta, alpha, d)
    ref = log_conditional(b, sums, 2, True)
    import dataclasses

    d1 = dataclasses.replace(d, G=np.ones((d.nobs, 1)))
    got = PerObservation(d1).log_conditional(beta, alpha, b)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["scale_slope", "bs"])
def test_gradient_matches_finite_differences(kind, riesby):
    if kind == "scale_slope":
        df = simulate_scale_slope()
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    else:
        m = mlsml.MELSM.from_formula(data=riesby, bs_formula="~ endog", **RIESBY)
    d = m.design
    theta = start_values_ext(d) + 0.05 * np.random.default_rng(1).normal(size=m.layout.n_params)
    lik = _lik(d, 5)
    nodes = lik.adapt(theta)
    g = autograd.grad(lik.at_nodes)(theta, nodes)
    eps = 1e-6
    fd = np.array(
        [(lik.at_nodes(theta + eps * e, nodes) - lik.at_nodes(theta - eps * e, nodes)) / (2 * eps) for e in np.eye(theta.size)]
    )
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(fd).max()))
    # the posterior modes are stationary points of h_j
    mode, negH = lik.modes(theta)
    assert np.all(np.linalg.eigvalsh(negH) > 0)
    g_mode, _ = make_integrand(d).mode_problem(theta).derivs(mode)
    assert np.abs(g_mode).max() < 1e-6
    # the u-exact rule over the scale effects too (per-school P_j with bs_formula)
    if m.layout.random_scale:
        lu = _lik(d, 5, "uexact")
        mn = lu.adapt(theta)
        gm = autograd.grad(lu.at_nodes)(theta, mn)
        fdm = np.array([(lu.at_nodes(theta + eps * e, mn) - lu.at_nodes(theta - eps * e, mn)) / (2 * eps) for e in np.eye(theta.size)])
        np.testing.assert_allclose(gm, fdm, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(fdm).max()))


def test_tiny_slope_variance_agrees_with_plain_model(seed_sim):
    """A scale slope with variance ~0 (and no covariance) gives the plain Model 3 likelihood."""
    plain = mlsml.MELSM.from_formula("y ~ x", seed_sim, groups="school", scale_formula="~ x")
    ext = mlsml.MELSM.from_formula("y ~ x", seed_sim, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    p = pd.Series([0.02, 0.7, -0.8, 0.05, 0.05, 0.08, -0.02], index=plain.param_names)
    q = pd.Series(0.0, index=ext.param_names)
    for k in ("mean:Intercept", "mean:x", "scale:Intercept", "scale:x", "var(u0)"):
        q[k] = p[k]
    q["var(v0)"], q["cov(u0,v0)"], q["var(v1)"] = p["var(v)"], p["cov(u0,v)"], 1e-12
    ll_plain = plain.loglike(p, nagq=11)
    ll_ext = ext.loglike(q, nagq=11)
    assert abs(ll_ext - ll_plain) < 1e-6


def test_bs_with_zero_slope_agrees_with_plain_model(riesby):
    """bsvar:endog = 0 is the plain model with var(u0) = exp(bsvar:Intercept), cov = sd(u0) LocEff."""
    plain = mlsml.MELSM.from_formula(data=riesby, **RIESBY)
    ext = mlsml.MELSM.from_formula(data=riesby, bs_formula="~ endog", **RIESBY)
    beta_alpha = [22.4, -2.3, 1.9, 0.0, 2.1, 0.19, 0.29]
    tau0, varv, loc = 2.2, 0.48, 0.21
    q = pd.Series(beta_alpha + [tau0, 0.0, varv, loc], index=ext.param_names)
    p = pd.Series(beta_alpha + [np.exp(tau0), varv, np.exp(tau0 / 2) * loc], index=plain.param_names)
    assert abs(ext.loglike(q, nagq=15) - plain.loglike(p, nagq=15)) < 1e-8


# ---------------------------------------------------------------- MIXREGLS (Fortran) references
def _mixregls_params(ref: dict, names) -> pd.Series:
    from validation.convert import fortran_run_to_ours

    return fortran_run_to_ours(ref, names)


def test_riesby_bs_variance_matches_mixregls(riesby):
    """Hedeker & Nordgren's Riesby model (BS ~ endog, WS ~ week + endog, linear association).

    MIXREGLS uses 11 adaptive points per axis without rotation and prints estimates to
    5 decimals; its 21-point LL is -1122.295 (independent AGQ-30 check: -1122.295). With
    6 observations per patient and var(v) ~ 0.48 the posterior of v is skewed and the rule
    converges slowly in the 2-d product rule (21 points: 1.6e-4 from the limit -1122.29456).
    The default u-exact rule (u0 integrated exactly, 15 points in v) is at the limit to 2e-7.
    We agree with MIXREGLS to the printed precision of the LL and to 2% of a SE.
    """
    ref = load_reference("mixregls_fortran__riesby_linear_nq21")
    res = mlsml.fit(data=riesby, bs_formula="~ endog", **RIESBY)
    assert res.quadrature == "marginal" and res.nagq == 15
    st = ref["stages"]["stage3"]
    assert res.llf == pytest.approx(st["loglik"], abs=1e-3)
    theirs = _mixregls_params(ref, res.params.index)
    se = res.bse
    assert np.all(np.abs(res.params - theirs) < 0.02 * se), (res.params - theirs) / se
    # the printed MIXREGLS standard errors
    se_ref = {(p["block"], p["name"]): p["se"] for p in st["parameters"]}
    assert se["bsvar:endog"] == pytest.approx(se_ref[("ALPHA", "endog")], rel=0.02)
    assert se["cov(u0,v)"] == pytest.approx(se_ref[("Random location (mean) effect on WS variance", "Loc Eff")], rel=0.02)
    # more points change the log-likelihood at the estimates by < 1e-5
    assert abs(loglik(res.theta, res.model.design, 61) - res.llf) < 1e-5
    assert abs(res.likelihood.with_spec(nagq=41).value(res.theta) - res.llf) < 1e-6
    # the same model by the 2-d product rule (41 points per dimension) agrees
    prod = mlsml.fit(data=riesby, bs_formula="~ endog", quadrature="product", nagq=41, **RIESBY)
    assert abs(prod.llf - res.llf) < 1e-5


def test_riesby_bs_variance_no_random_scale_matches_mixregls(riesby):
    """Stage 2 of MIXREGLS (no random scale): the integrand is Gaussian, so the LL is exact."""
    ref = load_reference("mixregls_fortran__riesby_no_random_scale")
    res = mlsml.fit(data=riesby, bs_formula="~ endog", random_scale=False, **RIESBY)
    assert list(res.params.index[-2:]) == ["bsvar:Intercept", "bsvar:endog"]
    assert res.llf == pytest.approx(ref["stages"]["stage2"]["loglik"], abs=1e-3)
    theirs = _mixregls_params(ref, res.params.index)
    assert np.all(np.abs(res.params - theirs) < 0.01 * res.bse)


# ---------------------------------------------------------------- fitting a scale slope
def test_scale_slope_boundary_is_singular_and_llf_correct():
    """Data without a scale slope (var(v1) = 0): here ML puts Sigma on the boundary (corr matrix
    singular). The fit says so, with a warning, and its llf is still the correct likelihood: it
    agrees with a 15-point evaluation and is not below the nested model's maximum."""
    df = simulate_scale_slope(J=50, n=10, sigma=np.diag([0.1, 0.15, 0.0]) + 1e-12, seed=5)
    plain = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", nagq=7)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x", nagq=7)
    assert res.singular
    assert any(issubclass(w.category, SingularFitWarning) for w in rec)
    assert abs(loglik(res.theta, res.model.design, 15) - res.llf) < 1e-3
    assert res.llf >= plain.llf - 1e-4


@pytest.mark.slow
def test_scale_slope_recovery():
    """Truth within 3.5 SE; the default u-exact rule (15 x 15 points over (v0, v1)) is at its
    limit (21 x 21 points change the llf by < 1e-6) and agrees with the 3-d product rule.

    The posterior of (v0, v1) with 20 students per school is clearly non-Gaussian: the
    3-d product rule needs 11 points per dimension to come within ~1e-5 (docs/quadrature.md).
    """
    sigma = np.array([[0.10, -0.03, 0.01], [-0.03, 0.15, 0.02], [0.01, 0.02, 0.06]])
    df = simulate_scale_slope(J=120, n=20, sigma=sigma, seed=11)
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    assert res.quadrature == "marginal" and res.nagq == 15
    truth = pd.Series([0.2, 0.5, -0.8, 0.1, 0.10, 0.15, 0.06, -0.03, 0.01, 0.02], index=res.params.index)
    z = (res.params - truth) / res.bse
    assert res.converged
    assert np.all(np.abs(z) < 3.5), z
    d = res.model.design
    th = res.theta
    assert abs(uexact_loglik(th, d, 21) - res.llf) < 1e-6
    assert abs(loglik(th, d, 11) - res.llf) < 5e-5


def test_bs_variance_at_boundary_is_reported():
    """No between-school variance in the mean: var(u0_j) -> 0 in every school. The fit is
    reported as singular (with SingularFitWarning), and its llf is the adaptive likelihood at
    the estimates (more points do not change it)."""
    rng = np.random.default_rng(2)
    J, n = 60, 10
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    v = rng.normal(scale=0.4, size=J)[g]
    y = 0.5 * x + rng.normal(size=J * n) * np.exp(0.5 * (-0.5 + v))
    df = pd.DataFrame({"y": y, "x": x, "s": (np.arange(J) % 2)[g], "school": g})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = mlsml.fit("y ~ x", df, groups="school", bs_formula="~ s")
    assert res.singular
    assert any(issubclass(w.category, SingularFitWarning) for w in rec)
    Sj = res.likelihood.integrand.school_covariances(res.theta)
    assert Sj.shape == (J, 2, 2)
    assert np.all(Sj[:, 0, 0] < 0.01 * np.exp(res.params["scale:Intercept"]))
    assert abs(loglik(res.theta, res.model.design, 21) - res.llf) < 1e-6


def test_posteriors_of_extended_models_use_their_own_density():
    """random_effects() must use the per-observation density of scale_re_formula models.

    A regression test: the posterior weights once came from the core (one random scale)
    density, which ignores v1. Check against brute-force weights from the integrand.
    """
    df = mlsml.simulate.simulate_data([20] * 40, seed=3)
    res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x", nagq=7)
    re = res.random_effects()
    assert list(re.columns) == ["u0", "u0_sd", "v0", "v0_sd", "v1", "v1_sd", "n"]
    design = res.model.design
    lik = _lik(design, 9)
    nodes = lik.adapt(np.asarray(res.theta))
    h = np.asarray(lik.integrand.log_h(np.asarray(res.theta), nodes.b)) + nodes.logw
    p = np.exp(h - h.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mean = np.einsum("jk,jkd->jd", p, nodes.b)
    np.testing.assert_allclose(re[["u0", "v0", "v1"]].to_numpy(), mean, atol=2e-3)
