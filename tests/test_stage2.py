"""Stage 2 (mlsml.stage2): multiple imputation from the exact posterior, Rubin's rules, and the
joint model's term in the integrand (its derivatives and its value against closed forms).

Small data (the 40-school demo), one MELSM fit per module; the recovery and coverage study is
validation/stage2.py (results in validation/results/, written up in validation/REPORT.md).
"""

from __future__ import annotations

import autograd
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from patsy import dmatrices
from scipy import special, stats
from statsmodels.miscmodels.ordinal_model import OrderedModel

import mlsml
from mlsml.errors import DataError, MissingDataWarning, ModelSpecError
from mlsml.integrand import JointIntegrand, SchoolOutcome
from mlsml.likelihood import Likelihood
from mlsml.predict import PosteriorGrid, draw_effects
from mlsml.quadrature import QuadratureSpec, default_nagq
from mlsml.stage2 import (
    fit_random_intercept,
    fit_random_intercept_glmm,
    glmm_of,
    ordinal_natural,
    random_intercept_cov,
    rubin,
    school_data,
    school_outcome,
)


@pytest.fixture(scope="module")
def fitted():
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    res = mlsml.fit("y ~ x", df, groups="school")
    rng = np.random.default_rng(7)
    mean = res.random_effects()
    schools = pd.DataFrame({"school": res.model.design.group_labels})
    schools["w"] = rng.normal(size=40)
    eta = -0.3 + 4.0 * mean["u0"].to_numpy() + 3.0 * mean["v"].to_numpy() + 0.5 * schools["w"].to_numpy()
    schools["score"] = eta + rng.normal(0, 0.5, 40)
    schools["passed"] = (rng.random(40) < special.expit(eta)).astype(int)
    schools["count"] = rng.poisson(np.exp(0.5 + 0.3 * schools["w"]))
    schools["grade"] = np.digitize(eta + rng.logistic(size=40), [-1.0, 0.5])
    # a nominal outcome with codes 1, 3, 4 (category 1 the reference): multinomial logit on u0 and w
    eta_k = np.column_stack([np.zeros(40), 0.2 + 4.0 * mean["u0"].to_numpy(), -0.3 + 0.8 * schools["w"].to_numpy()])
    prob = special.softmax(eta_k, axis=1)
    pick = np.random.default_rng(8).random(40)[:, None] > np.cumsum(prob, axis=1)
    schools["kind"] = np.array([1, 3, 4])[pick.sum(axis=1)]
    return res, df, schools


def test_rubin_matches_the_formulas():
    rng = np.random.default_rng(0)
    Q = rng.normal(size=(8, 2))
    U = np.stack([np.diag([0.3, 0.1])] * 8)
    p = rubin(Q, U)
    B = Q.var(axis=0, ddof=1)
    T = np.array([0.3, 0.1]) + (1 + 1 / 8) * B
    np.testing.assert_allclose(p.total, T, rtol=1e-12)
    r = (1 + 1 / 8) * B / np.array([0.3, 0.1])
    df = 7 * (1 + 1 / r) ** 2
    np.testing.assert_allclose(p.df, df, rtol=1e-12)
    np.testing.assert_allclose(p.fmi, (r + 2 / (df + 3)) / (1 + r), rtol=1e-12)
    small = rubin(Q, U, df_complete=20.0)  # Barnard-Rubin: never more than the complete-data df
    assert np.all(small.df < 20.0) and np.all(small.df < df)


def test_identical_imputations_give_the_complete_data_fit(fitted):
    """A formula without school effects: every imputation is the same OLS fit, B = 0 (to rounding)."""
    res, _, schools = fitted
    s2 = res.stage2("score ~ w", data=schools, ndraws=6, seed=1)
    X = np.column_stack([np.ones(40), schools["w"]])
    beta, *_ = np.linalg.lstsq(X, schools["score"], rcond=None)
    np.testing.assert_allclose(s2.params[["Intercept", "w"]], beta, rtol=1e-10)
    assert np.all(s2.info["lambda"] < 1e-12) and np.all(s2.info["between"] < 1e-20)
    # Rubin's fmi keeps its small-sample term 2 / (df + 3) (as R's mice reports it)
    np.testing.assert_allclose(s2.fmi.iloc[:2], 2 / (s2.df.iloc[:2] + 3), rtol=1e-6)


def test_mi_fraction_of_missing_information_and_summary(fitted):
    res, _, schools = fitted
    s2 = res.stage2("score ~ u0 + v + w", data=schools, ndraws=20, seed=3)
    assert s2.ndraws == 20 and s2.n_failed == 0 and s2.nobs == 40
    assert s2.fmi["u0"] > s2.fmi["w"] and (s2.fmi > 0).all() and (s2.fmi < 1).all()
    assert (s2.df < np.inf).sum() >= 3
    again = res.stage2("score ~ u0 + v + w", data=schools, ndraws=20, seed=3)
    pd.testing.assert_series_equal(s2.params, again.params)  # a seed fixes the draws
    text = s2.summary().as_text()
    assert "fmi" in text and "Imputations" in text
    assert s2.conf_int().shape == (5, 2)


def test_every_family_runs_with_mi(fitted):
    res, _, schools = fitted
    for formula, family in [("passed ~ u0 + w", "binomial"), ("count ~ w + v", "poisson"), ("grade ~ u0 + w", "ordinal")]:
        s2 = res.stage2(formula, data=schools, family=family, ndraws=8, seed=1, stage1_uncertainty=False)
        assert np.all(np.isfinite(s2.params)) and np.all(s2.bse > 0)
    assert "Intercept" not in s2.params.index  # ordinal: the thresholds replace it


def test_level1_summaries_and_level1_rows_as_stage2_data(fitted):
    res, df, schools = fitted
    data = df.merge(schools, on="school")  # level-1 rows: constant level-2 columns are collapsed
    s2 = res.stage2("score ~ u0 + xbar + xsd", data=data, level1_summaries={"xbar": "x", "xsd": ("x", "sd")}, ndraws=6, seed=1)
    assert list(s2.params.index) == ["Intercept", "u0", "xbar", "xsd", "var(resid)"]
    sd = school_data(res, "score ~ xbar", schools, {"xbar": "x"})
    np.testing.assert_allclose(sd.frame["xbar"], df.groupby("school")["x"].mean().loc[sd.frame.index], rtol=1e-12)


def test_stage2_input_errors(fitted):
    res, df, schools = fitted
    with pytest.raises(DataError, match="'x' is not constant within school"):
        res.stage2("score ~ u0 + x", data=df.merge(schools, on="school"))
    with pytest.raises(ModelSpecError, match="'u0' names a school effect"):
        res.stage2("score ~ u0", data=schools.assign(u0=1.0))
    with pytest.raises(DataError, match="0/1 response"):
        res.stage2("score ~ u0", data=schools, family="binomial")
    with pytest.raises(ModelSpecError, match="family must be one of"):
        res.stage2("score ~ u0", data=schools, family="gamma")
    with pytest.raises(DataError, match="at least two categories"):
        res.stage2("grade ~ u0", data=schools.assign(grade=1), family="ordinal", method="joint")
    with pytest.raises(ModelSpecError, match="plain factors"):
        res.stage2("score ~ I(u0**2)", data=schools, method="joint")
    with pytest.raises(DataError, match="no grouping column"):
        res.stage2("score ~ u0", data=schools.rename(columns={"school": "id"}))
    with pytest.warns(MissingDataWarning, match=r"'score': 3"):
        s2 = res.stage2("score ~ u0", data=schools.assign(score=schools["score"].where(schools.index >= 3)), ndraws=5, seed=1)
    assert s2.nobs == 37


def test_draw_effects_match_the_grid_moments(fitted):
    res, _, _ = fitted
    grid = PosteriorGrid.build(res.theta, res.model.design)
    b = draw_effects(grid.v, grid.cdf, grid.density, grid.mu, grid.V, 4000, np.random.default_rng(5))
    mean, cov = grid.moments()
    se = np.sqrt(np.einsum("jii->ji", cov) / 4000)
    z = (b.mean(axis=0) - mean) / se
    assert np.abs(z).max() < 5  # 80 means, each within 5 SEs
    emp = np.einsum("mja,mjb->jab", b - mean, b - mean) / 4000
    corr = emp[:, 0, 1] / np.sqrt(emp[:, 0, 0] * emp[:, 1, 1])
    true = cov[:, 0, 1] / np.sqrt(cov[:, 0, 0] * cov[:, 1, 1])
    assert np.abs(corr - true).max() < 0.1  # the u-v posterior correlation is kept


# ------------------------------------------------------------------ the joint model's term
def _joint_likelihood(res, schools, formula, family, nagq=7):
    sd = school_data(res, formula, schools)
    outcome = school_outcome(sd, formula, family)
    lik = Likelihood(res.model.design, JointIntegrand(res.likelihood.integrand, outcome), QuadratureSpec("product", nagq))
    return lik, outcome


def test_joint_term_without_effects_adds_the_closed_form_density(fitted):
    """No school effect in the formula: each school's integral factorises exactly."""
    res, _, schools = fitted
    lik, outcome = _joint_likelihood(res, schools, "score ~ w", "gaussian")
    phi = np.array([0.2, 0.9, np.log(1.7)])
    theta = np.concatenate([res.theta, phi])
    base = Likelihood(res.model.design, res.likelihood.integrand, QuadratureSpec("product", 7))
    eta = 0.2 + 0.9 * schools["w"].to_numpy()
    closed = stats.norm.logpdf(schools["score"], eta, np.sqrt(1.7))
    np.testing.assert_allclose(lik.per_school(theta), base.per_school(res.theta) + closed, rtol=1e-10)


@pytest.mark.parametrize(
    "family,formula",
    [
        ("gaussian", "score ~ u0 + v + u0:v + w"),
        ("binomial", "passed ~ u0 + v:w"),
        ("ordinal", "grade ~ u0 + v:w"),
        ("nominal", "kind ~ u0 + u0:v + v:w"),
    ],
)
def test_joint_mode_problem_derivatives_and_gradient(fitted, family, formula):
    res, _, schools = fitted
    lik, outcome = _joint_likelihood(res, schools, formula, family)
    rng = np.random.default_rng(2)
    phi = rng.normal(0, 1.0, outcome.n_params)
    theta = np.concatenate([res.theta, phi])
    prob = lik.integrand.mode_problem(theta)
    b = rng.normal(0, 0.2, (40, 2))
    g, H = prob.derivs(b)
    h = 1e-6
    for a in range(2):
        e = np.zeros(2)
        e[a] = h
        fd = (prob.f(b + e) - prob.f(b - e)) / (2 * h)
        np.testing.assert_allclose(g[:, a], fd, rtol=1e-5, atol=1e-6)
        fd2 = (prob.derivs(b + e)[0] - prob.derivs(b - e)[0]) / (2 * h)
        np.testing.assert_allclose(H[:, :, a], fd2, rtol=1e-5, atol=1e-5)
    # the likelihood's gradient (autograd, nodes fixed) against central differences
    nodes = lik.adapt(theta)
    _, grad = lik.value_and_grad(theta, nodes)
    for i in range(theta.size):
        e = np.zeros(theta.size)
        e[i] = 1e-6
        fd = (lik.at_nodes(theta + e, nodes) - lik.at_nodes(theta - e, nodes)) / 2e-6
        assert abs(grad[i] - fd) < 1e-4 * max(1.0, abs(fd))
    assert np.asarray(autograd.hessian(lik.at_nodes)(theta, nodes)).shape == (theta.size, theta.size)


def test_joint_fit_improves_on_the_two_stage_start_and_reports_both(fitted):
    res, _, schools = fitted
    j = res.stage2("score ~ u0 + v + w", data=schools, method="joint")
    assert j.converged and np.isfinite(j.llf)
    lik, _ = _joint_likelihood(res, schools, "score ~ u0 + v + w", "gaussian", nagq=11)
    start_phi = j.info["optsum"].start[res.layout.n_params :]
    assert j.llf >= lik.value(np.concatenate([res.theta, start_phi])) - 1e-8
    assert list(j.stage1.columns) == ["joint", "joint std err", "two-stage", "two-stage std err"]
    assert np.all(np.isfinite(j.bse)) and "Converged" in j.summary().as_text()
    jb = res.stage2("passed ~ u0 + w", data=schools, family="binomial", method="joint")
    assert jb.converged and jb.params.index.tolist() == ["Intercept", "u0", "w"]


def test_joint_ordinal_term_without_effects_is_statsmodels_ordered_logit(fitted):
    """No school effect in the formula: the ordinal term adds OrderedModel's log-likelihood per school,
    with the thresholds parametrised as statsmodels does (first threshold, logs of the increments)."""
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    res, _, schools = fitted
    lik, outcome = _joint_likelihood(res, schools, "grade ~ w", "ordinal")
    assert outcome.n_categories == 3 and outcome.n_params == 3
    phi = np.array([0.7, -0.4, 0.3])
    base = Likelihood(res.model.design, res.likelihood.integrand, QuadratureSpec("product", 7))
    om = OrderedModel(schools["grade"].to_numpy(), schools[["w"]].to_numpy(), distr="logit")
    np.testing.assert_allclose(
        lik.per_school(np.concatenate([res.theta, phi])), base.per_school(res.theta) + om.loglikeobs(phi), rtol=1e-10
    )
    tau, cov = ordinal_natural(phi, np.eye(3), 1)
    np.testing.assert_allclose(tau[1:], om.transform_threshold_params(phi)[1:-1], rtol=1e-12)
    fd = np.column_stack(
        [(ordinal_natural(phi + e, np.eye(3), 1)[0] - ordinal_natural(phi - e, np.eye(3), 1)[0]) / 2e-6 for e in 1e-6 * np.eye(3)]
    )
    np.testing.assert_allclose(cov, fd @ fd.T, rtol=1e-6)  # the delta method's Jacobian


def test_joint_ordinal_integral_against_brute_force(fitted):
    """The adaptive product rule of the joint ordinal model against a dense grid over each school's
    effects (an independent route to L_j = int f(y_j | b) P(Y_j | b) phi(b) db)."""
    res, _, schools = fitted
    lik, outcome = _joint_likelihood(res, schools, "grade ~ u0 + v + w", "ordinal", nagq=9)
    theta = np.concatenate([res.theta, [3.0, -2.0, 0.5, -0.8, 0.4]])
    nodes = lik.adapt(theta)
    ours = lik.per_school(theta, nodes)
    mean, cov = mlsml.predict.posterior_moments(lik, theta)
    sd = np.sqrt(np.einsum("jii->ji", cov))
    z = np.linspace(-9.0, 9.0, 301)
    U, V = np.meshgrid(z, z, indexing="ij")
    grid = np.stack([U.ravel(), V.ravel()], axis=1)
    pick = np.arange(0, 40, 8)
    b = mean[:, None, :] + sd[:, None, :] * grid[None, :, :]
    h = np.asarray(lik.integrand.log_h(theta, b))
    logw = np.log((z[1] - z[0]) ** 2 * sd[:, 0] * sd[:, 1])
    brute = special.logsumexp(h, axis=1) + logw
    np.testing.assert_allclose(ours[pick], brute[pick], rtol=0, atol=1e-6)


def test_joint_ordinal_fit_reports_ordered_thresholds(fitted):
    res, _, schools = fitted
    j = res.stage2("grade ~ u0 + w", data=schools, family="ordinal", method="joint")
    assert j.converged and j.params.index.tolist() == ["u0", "w", "0/1", "1/2"]
    assert j.params["0/1"] < j.params["1/2"] and np.all(np.isfinite(j.bse))
    mi = res.stage2("grade ~ u0 + w", data=schools, family="ordinal", ndraws=8, seed=1, stage1_uncertainty=False)
    assert mi.params.index.tolist() == j.params.index.tolist()
    assert abs(mi.params["1/2"] - j.params["1/2"]) < 0.5 * j.bse["1/2"]  # u0 is weak here: the two agree


def test_school_outcome_columns_are_data_part_times_effects(fitted):
    res, _, schools = fitted
    sd = school_data(res, "score ~ u0 * v + u0:w", schools)
    out = school_outcome(sd, "score ~ u0 * v + u0:w", "gaussian")
    assert out.names == ("Intercept", "u0", "v", "u0:v", "u0:w")
    assert out.effects == ((), (0,), (1,), (0, 1), (0,))
    np.testing.assert_allclose(out.A[:, 4], schools["w"].to_numpy())
    assert isinstance(out, SchoolOutcome) and out.n_params == 6


def test_draw_effects_with_a_singular_conditional_covariance():
    """var(u | v, y) rounding to a tiny negative number (a fit near var(u0) = 0) is no error (it was:
    Cholesky of a matrix not positive definite, in the stage-2 simulation)."""
    v = np.tile(np.linspace(-1, 1, 5), (3, 1))
    cdf = np.tile(np.linspace(0, 1, 5), (3, 1))
    density = np.full((3, 5), 0.5)
    mu = np.zeros((3, 5, 2))
    V = np.zeros((3, 5, 2, 2))
    V[..., 0, 0] = -1e-18
    V[..., 1, 1] = 1.0
    b = draw_effects(v, cdf, density, mu, V, 200, np.random.default_rng(0))
    assert np.all(b[..., 0] == 0.0) and abs(b[..., 1].std() - 1.0) < 0.1


def test_mi_on_a_boundary_fit_draws_at_the_estimates_with_a_warning():
    """A MELSM fit with corr(u0, v) = -1 (replication 35 of the stage-2 simulation): drawing its
    parameters from the normal approximation gave a singular Sigma and the run failed."""
    from validation.stage2 import BASE_SEED, make_data

    df, schools = make_data("gaussian", 5, BASE_SEED + 35)
    with pytest.warns(mlsml.SingularFitWarning):
        res = mlsml.fit("y ~ x", df, groups="school")
    # "on the boundary", or (with older numerical libraries) "no covariance": either way at the estimates
    with pytest.warns(mlsml.ConvergenceWarning, match="the imputations are drawn at the estimates"):
        s2 = res.stage2("Y ~ u0 + v", data=schools, ndraws=8, seed=1)
    assert s2.info["stage1_uncertainty"] is False and np.all(np.isfinite(s2.params))


# ---------------------------------------------------------------------- the nominal family (MixWILD's mixno)
def test_mi_nominal_without_effects_is_the_multinomial_logit(fitted):
    """No school effect in the formula: every imputation is statsmodels' MNLogit fit (B = 0), coefficients
    named column[category] against the first category, category by category."""
    from statsmodels.discrete.discrete_model import MNLogit

    res, _, schools = fitted
    s2 = res.stage2("kind ~ w", data=schools, family="nominal", ndraws=5, seed=1)
    assert s2.params.index.tolist() == ["Intercept[3]", "w[3]", "Intercept[4]", "w[4]"]
    ref = MNLogit(np.searchsorted([1, 3, 4], schools["kind"]), np.column_stack([np.ones(40), schools["w"]])).fit(disp=0)
    np.testing.assert_allclose(s2.params, np.asarray(ref.params).ravel(order="F"), rtol=1e-6)
    np.testing.assert_allclose(s2.bse, np.asarray(ref.bse).ravel(order="F"), rtol=1e-5)
    assert np.all(s2.info["between"] < 1e-12)


def test_mi_nominal_with_effects_pools_draws(fitted):
    res, _, schools = fitted
    s2 = res.stage2("kind ~ u0 + w", data=schools, family="nominal", ndraws=6, seed=2, stage1_uncertainty=False)
    assert s2.ndraws == 6 and s2.params.shape == (6,) and np.all(np.isfinite(s2.bse))
    assert s2.fmi["u0[3]"] > s2.fmi["w[3]"]  # the imputed effect carries the missing information
    with pytest.raises(DataError, match="at least two categories"):
        res.stage2("kind ~ w", data=schools.assign(kind=3), family="nominal", ndraws=5)


def test_joint_nominal_term_without_effects_is_the_multinomial_logit(fitted):
    """No school effect in the formula: the nominal term adds MNLogit's log-likelihood per school."""
    from statsmodels.discrete.discrete_model import MNLogit

    res, _, schools = fitted
    lik, outcome = _joint_likelihood(res, schools, "kind ~ w", "nominal")
    assert outcome.n_categories == 3 and outcome.n_params == 4
    phi = np.array([0.4, -0.7, -0.2, 1.1])
    base = Likelihood(res.model.design, res.likelihood.integrand, QuadratureSpec("product", 7))
    mn = MNLogit(np.searchsorted([1, 3, 4], schools["kind"]), np.column_stack([np.ones(40), schools["w"]]))
    closed = np.sum(mn.loglikeobs(phi.reshape(2, 2).T), axis=1)  # per school and category: summed over categories
    np.testing.assert_allclose(lik.per_school(np.concatenate([res.theta, phi])), base.per_school(res.theta) + closed, rtol=1e-10)


def test_joint_nominal_fit_against_mi(fitted):
    res, _, schools = fitted
    j = res.stage2("kind ~ u0 + w", data=schools, family="nominal", method="joint")
    assert j.converged and j.params.index.tolist() == ["Intercept[3]", "u0[3]", "w[3]", "Intercept[4]", "u0[4]", "w[4]"]
    lik, _ = _joint_likelihood(res, schools, "kind ~ u0 + w", "nominal", nagq=default_nagq(2))
    start_phi = j.info["optsum"].start[res.layout.n_params :]
    assert j.llf >= lik.value(np.concatenate([res.theta, start_phi])) - 1e-8
    assert np.all(np.isfinite(j.bse))


# ---------------------------------------------------------------------- the multilevel second stage (MULTI2ND = 1)
@pytest.fixture(scope="module")
def level1(fitted):
    """The demo fit's level-1 rows with an outcome z varying within schools (a school intercept, x and u0)."""
    res, df, _ = fitted
    rng = np.random.default_rng(11)
    s = np.unique(df["school"], return_inverse=True)[1]
    u0 = res.random_effects()["u0"].to_numpy()
    z = 1.0 + 0.5 * df["x"].to_numpy() + 3.0 * u0[s] + rng.normal(0, 0.7, 40)[s] + rng.normal(size=len(df))
    return df.assign(z=z).iloc[::4].reset_index(drop=True)  # about 40 rows per school


def test_random_intercept_fit_is_ml_of_mlsml_and_statsmodels(level1):
    """The profile-likelihood fit against mlsml's engine (random_scale=False, constant variance) and MixedLM."""
    y, X = dmatrices("z ~ x", level1, return_type="dataframe")
    school = np.unique(level1["school"], return_inverse=True)[1]
    params, _, llf = fit_random_intercept(y.to_numpy().ravel(), X, school)
    ours = mlsml.fit("z ~ x", level1, groups="school", random_scale=False)
    assert llf == pytest.approx(ours.llf, abs=1e-6)
    np.testing.assert_allclose(params[:2], ours.params[["mean:Intercept", "mean:x"]], rtol=1e-4)
    np.testing.assert_allclose(params[2:], [ours.params["var(u0)"], np.exp(ours.params["scale:Intercept"])], rtol=1e-4)
    sm = smf.mixedlm("z ~ x", level1, groups="school").fit(reml=False)
    assert llf >= sm.llf - 1e-6 and llf == pytest.approx(sm.llf, abs=1e-4)
    np.testing.assert_allclose(params[:2], sm.fe_params, rtol=1e-3)


def test_random_intercept_cov_is_the_inverse_expected_information():
    """Closed-form information against V_j built explicitly: I_bb = sum X'V^-1X, I_ab = tr(V^-1 dV_a V^-1 dV_b) / 2."""
    rng = np.random.default_rng(2)
    school = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 7])
    X = np.column_stack([np.ones(school.size), rng.normal(size=school.size)])
    tau2, s2 = 0.7, 1.3
    Ibb, Ivv = np.zeros((2, 2)), np.zeros((2, 2))
    for j in range(6):
        Xj = X[school == j]
        n = Xj.shape[0]
        Vi = np.linalg.inv(s2 * np.eye(n) + tau2 * np.ones((n, n)))
        Ibb += Xj.T @ Vi @ Xj
        dV = [np.ones((n, n)), np.eye(n)]
        Ivv += 0.5 * np.array([[np.trace(Vi @ a @ Vi @ b) for b in dV] for a in dV])
    cov = random_intercept_cov(X, school, tau2, s2)
    np.testing.assert_allclose(cov[:2, :2], np.linalg.inv(Ibb), rtol=1e-10)
    np.testing.assert_allclose(cov[2:, 2:], np.linalg.inv(Ivv), rtol=1e-10)
    assert np.all(cov[:2, 2:] == 0.0)


def test_multilevel_stage2(fitted, level1):
    res, _, _ = fitted
    out = res.stage2("z ~ x + u0", data=level1, multilevel=True, ndraws=10, seed=3)
    assert list(out.params.index) == ["Intercept", "x", "u0", "var(1|school)", "var(resid)"]
    assert out.info["level1_rows"] == len(level1) and out.nobs == 40 and out.ndraws == 10
    assert out.params["x"] == pytest.approx(0.5, abs=0.15) and out.params["var(1|school)"] > 0
    assert np.all(out.fmi.between(0, 1)) and "Level-1 rows:" in out.summary().as_text()
    holed = level1.assign(z=level1["z"].where(level1.index % 10 != 0))
    with pytest.warns(MissingDataWarning, match="stage-2 rows have missing values.*'z'"):
        fewer = res.stage2("z ~ x + u0", data=holed, multilevel=True, ndraws=5, seed=3)
    assert fewer.info["level1_rows"] == holed["z"].notna().sum()


def test_multilevel_stage2_refusals(fitted, level1):
    res, _, schools = fitted
    with pytest.raises(DataError, match="family='poisson' needs a count response.*'z'"):
        res.stage2("z ~ u0", data=level1, multilevel=True, family="poisson", ndraws=5)
    with pytest.raises(ModelSpecError, match="multilevel=True is a method='mi' analysis"):
        res.stage2("z ~ u0", data=level1, multilevel=True, method="joint")
    with pytest.raises(DataError, match="'score' is constant within every school.*multilevel=False"):
        res.stage2("score ~ u0", data=schools, multilevel=True, ndraws=5)


# ---------------------------------------------------------------------- the non-gaussian multilevel second stage
def _glmm_rows(seed: int = 5, J: int = 30, n: int = 6):
    """Rows of a random-intercept GLMM: x, the school, and outcomes of each family (sigma_a = 0.8)."""
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    theta = rng.normal(size=J)[school]
    eta = 0.3 + 0.5 * x + 0.8 * theta
    eta_k = np.column_stack([np.zeros(J * n), 0.2 + 0.5 * x + 0.8 * theta, -0.3 - 0.4 * x + 0.3 * theta])
    frame = pd.DataFrame(
        {
            "x": x,
            "count": rng.poisson(np.exp(eta)).astype(float),
            "grade": np.digitize(eta + rng.logistic(size=J * n), [0.0, 1.0, 2.0]).astype(float),
            "kind": (rng.random(J * n)[:, None] > np.cumsum(special.softmax(eta_k, axis=1), axis=1)).sum(axis=1).astype(float),
        }
    )
    return frame, school


def _brute_llf(family: str, phi: np.ndarray, y: np.ndarray, X: np.ndarray, school: np.ndarray) -> float:
    """The random-intercept GLMM's log-likelihood by the trapezoid rule on a fine grid (densities written out apart)."""
    t = np.linspace(-8.0, 8.0, 801)
    p = X.shape[1]
    if family == "nominal":
        blocks = phi.reshape(-1, p + 1)
        etas = [np.zeros((y.size, t.size))] + [(X @ b[:p])[:, None] + b[p] * t[None, :] for b in blocks]
        ll = np.choose(y.astype(int)[:, None], etas) - special.logsumexp(np.stack(etas), axis=0)
    else:
        eta = (X @ phi[:p])[:, None] + phi[p] * t[None, :]
        if family == "poisson":
            ll = stats.poisson.logpmf(y[:, None], np.exp(eta))
        else:  # ordinal: thresholds tau_0, ln increments
            tau = np.concatenate([[-np.inf], np.cumsum(np.concatenate([phi[p + 1 : p + 2], np.exp(phi[p + 2 :])])), [np.inf]])
            k = y.astype(int)[:, None]
            ll = np.log(special.expit(tau[k + 1] - eta) - special.expit(tau[k] - eta))
    per = np.add.reduceat(ll, np.searchsorted(school, np.unique(school)), axis=0) + stats.norm.logpdf(t)[None, :]
    top = per.max(axis=1, keepdims=True)
    w = np.full(t.size, t[1] - t[0])
    w[[0, -1]] *= 0.5  # the trapezoid rule
    return float(np.sum(np.log(np.exp(per - top) @ w) + top[:, 0]))


GLMM_CASES = {
    "poisson": ("count", ["Intercept", "x"], np.array([0.2, 0.4, 0.7])),
    "ordinal": ("grade", ["x"], np.array([0.4, 0.9, -0.5, 0.2, 0.1])),
    "nominal": ("kind", ["Intercept", "x"], np.array([0.1, 0.4, 0.6, -0.2, -0.3, 0.5])),
}


@pytest.mark.parametrize("family", list(GLMM_CASES))
def test_glmm_adaptive_quadrature_against_brute_force(family):
    """The adaptive Gauss-Hermite log-likelihood (21 points) against an 801-point trapezoid rule, at a point that is not
    the maximum; with sigma_a = 0 it is statsmodels' single-level likelihood (Poisson GLM, OrderedModel, MNLogit)."""
    frame, school = _glmm_rows()
    col, xcols, phi = GLMM_CASES[family]
    X = frame.assign(Intercept=1.0)[xcols]
    y = frame[col].to_numpy()
    model = glmm_of(y, X, school, family)
    m, s = model.modes(phi)
    assert float(model.loglike(phi, m, s)) == pytest.approx(_brute_llf(family, phi, y, X.to_numpy(), school), abs=1e-6)
    p = X.shape[1]
    flat = phi.copy()
    flat[[k * (p + 1) + p for k in range(phi.size // (p + 1))] if family == "nominal" else [p]] = 0.0
    m, s = model.modes(flat)
    if family == "poisson":
        ref = sm.GLM(y, X, family=sm.families.Poisson()).loglike(flat[:p])
    elif family == "ordinal":
        ref = OrderedModel(y, X, distr="logit").loglike(np.delete(flat, p))
    else:
        ref = sm.MNLogit(y, X).loglike(flat.reshape(-1, p + 1)[:, :p].T)
    assert float(model.loglike(flat, m, s)) == pytest.approx(ref, abs=1e-8)


@pytest.mark.parametrize("family", ["poisson", "ordinal", "nominal"])
def test_glmm_fit_is_the_maximum_with_the_observed_information(family):
    """The fit maximises the brute-force likelihood (its gradient ~ 0, its value equal) and the covariance is the
    inverse of the brute-force observed information, mapped by the delta method (variance = sigma_a^2, thresholds)."""
    frame, school = _glmm_rows()
    col, xcols, _ = GLMM_CASES[family]
    X = frame.assign(Intercept=1.0)[xcols]
    y = frame[col].to_numpy()
    params, cov, llf = fit_random_intercept_glmm(y, X, school, family)
    p = X.shape[1]
    if family == "nominal":  # back to the blocks (beta_k, sigma_k); reported: the coefficients category-major, the sigma_k
        K1 = params.size // (p + 1)
        phi = np.column_stack([params[: K1 * p].reshape(K1, p), params[K1 * p :]]).ravel()
        order = [k * (p + 1) + i for k in range(K1) for i in range(p)] + [k * (p + 1) + p for k in range(K1)]
    else:
        phi = np.concatenate([params[:p], [np.sqrt(params[-1])]])
    if family == "ordinal":  # back to (tau_0, ln increments)
        tau = params[p:-1]
        phi = np.concatenate([phi, [tau[0]], np.log(np.diff(tau))])
    Xa = X.to_numpy()
    assert llf == pytest.approx(_brute_llf(family, phi, y, Xa, school), abs=1e-6)
    h = 1e-4
    eye = np.eye(phi.size) * h
    grad = np.array([(_brute_llf(family, phi + e, y, Xa, school) - _brute_llf(family, phi - e, y, Xa, school)) / (2 * h) for e in eye])
    assert np.max(np.abs(grad)) < 1e-4
    f = lambda a, b: _brute_llf(family, phi + a + b, y, Xa, school)  # noqa: E731
    H = np.zeros((phi.size, phi.size))
    for i, j in zip(*np.triu_indices(phi.size)):
        H[i, j] = H[j, i] = (f(eye[i], eye[j]) - f(eye[i], -eye[j]) - f(-eye[i], eye[j]) + f(-eye[i], -eye[j])) / (4 * h * h)
    jac = np.eye(phi.size)  # d(beta, sigma^2, tau_k) / d(beta, sigma, tau_0, ln increments); the nominal family: identity
    if family != "nominal":
        jac[p, p] = 2.0 * phi[p]
        order = list(range(p)) + list(range(p + 1, phi.size)) + [p]
    for k in range(1, phi.size - p - 1 if family == "ordinal" else 1):  # tau_k = tau_0 + sum_{i <= k} e^{r_i}
        jac[p + 1 + k, p + 2 : p + 2 + k] = np.exp(phi[p + 2 : p + 2 + k])
        jac[p + 1 + k, p + 1] = 1.0
    ref = (jac @ np.linalg.inv(-H) @ jac.T)[np.ix_(order, order)]
    np.testing.assert_allclose(cov, ref, rtol=2e-3, atol=1e-7)


def test_multilevel_stage2_ordinal_poisson_nominal(fitted, level1):
    """multilevel=True with the non-gaussian families: names, ordered thresholds, pooled results, the variance > 0."""
    res, _, _ = fitted
    rng = np.random.default_rng(12)
    level1 = level1.iloc[::2].reset_index(drop=True)  # about 20 rows per school
    s = np.unique(level1["school"], return_inverse=True)[1]
    a = rng.normal(0, 0.7, 40)[s]
    eta = 0.5 * level1["x"].to_numpy() + a
    rows = level1.assign(
        count=rng.poisson(np.exp(eta)), grade=np.digitize(eta + rng.logistic(size=len(level1)), [-0.5, 0.5]), kind=lambda d: d["grade"]
    )
    out = res.stage2("count ~ x + u0", data=rows, family="poisson", multilevel=True, ndraws=5, seed=3)
    assert list(out.params.index) == ["Intercept", "x", "u0", "var(1|school)"] and out.family == "poisson"
    assert out.params["x"] == pytest.approx(0.5, abs=0.15) and out.params["var(1|school)"] > 0.1
    assert np.all(np.isfinite(out.bse)) and np.all(out.fmi.between(0, 1))
    out = res.stage2("grade ~ x + u0", data=rows, family="ordinal", multilevel=True, ndraws=5, seed=3)
    assert list(out.params.index) == ["x", "u0", "0/1", "1/2", "var(1|school)"]
    assert out.params["0/1"] < out.params["1/2"] and out.params["x"] == pytest.approx(0.5, abs=0.2)
    out = res.stage2("kind ~ x", data=rows, family="nominal", multilevel=True, ndraws=5, seed=3)
    assert list(out.params.index) == ["Intercept[1]", "x[1]", "Intercept[2]", "x[2]", "sd(1|school)[1]", "sd(1|school)[2]"]
    assert out.params["sd(1|school)[1]"] > 0
    out = res.stage2(
        "any ~ x", data=rows.assign(any=(rows["count"] > 0).astype(int)), family="binomial", multilevel=True, ndraws=5, seed=3
    )
    assert list(out.params.index) == ["Intercept", "x", "var(1|school)"] and np.all(np.isfinite(out.bse))
