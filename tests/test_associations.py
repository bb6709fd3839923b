"""Association types and covariance constraints (issue 13): mlsml.associations, params.constrain, and
how a constrained or quadratic fit travels through results, summaries, export, profiles, bootstrap and tests.

The exact comparisons with MIXREGLS (NCOV = 0/1/2) are in tests/test_reference.py, the derivative
checks of the new terms in tests/test_derivatives.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

import mlsml
from mlsml.errors import ModelSpecError


@pytest.fixture(scope="module")
def demo():
    return mlsml.simulate.demo_data(n_groups=40, seed=1)


@pytest.fixture(scope="module")
def cmp(demo):
    return mlsml.compare_associations("y ~ x", demo, groups="school", scale_formula="~ x")


def test_compare_associations_table_and_tests(cmp):
    t = cmp.table
    assert list(t.index) == ["no random scale", "none", "linear", "quadratic"] and t["NCOV"].tolist()[1:] == [0, 1, 2]
    assert t["npar"].tolist() == [5, 6, 7, 8] and t["converged"].all()
    # nested: each model's maximum is at least the simpler one's
    assert t["llf"]["none"] <= t["llf"]["linear"] + 1e-6 <= t["llf"]["quadratic"] + 2e-6
    np.testing.assert_allclose(t["AIC"], -2 * t["llf"] + 2 * t["npar"])
    lr = cmp.tests
    assert lr.loc["linear vs none", "LR chi2"] == pytest.approx(2 * (t["llf"]["linear"] - t["llf"]["none"]), abs=1e-9)
    interior = ["linear vs none", "quadratic vs linear", "quadratic vs none"]
    assert lr.loc[interior, "reference"].tolist() == ["chi2(1)", "chi2(1)", "chi2(2)"]  # interior nulls
    # var(v) = 0 on the boundary, with the free covariances of v (and quad(u0,v), an interior parameter)
    boundary = ["none vs no random scale", "linear vs no random scale", "quadratic vs no random scale"]
    assert [r.split(" (")[0] for r in lr.loc[boundary, "reference"]] == [
        "0.5 chi2(0) + 0.5 chi2(1)",
        "0.5 chi2(1) + 0.5 chi2(2)",
        "0.5 chi2(2) + 0.5 chi2(3)",
    ]
    assert cmp.best_aic in t.index and "Likelihood-ratio tests" in repr(cmp)
    assert set(cmp.fits["none"].params.index) < set(cmp.fits["linear"].params.index) < set(cmp.fits["quadratic"].params.index)


def test_compare_associations_checks_its_arguments(demo):
    with pytest.raises(ModelSpecError, match="do not pass association"):
        mlsml.compare_associations("y ~ x", demo, groups="school", association="none")
    with pytest.raises(ModelSpecError, match="two or three different types"):
        mlsml.compare_associations("y ~ x", demo, groups="school", associations=["none", "cubic"])
    with pytest.raises(ModelSpecError, match="two or three different types"):
        mlsml.compare_associations("y ~ x", demo, groups="school", associations=["none"])
    with pytest.raises(ModelSpecError, match="needs a random scale"):
        mlsml.compare_associations("y ~ x", demo, groups="school", random_scale=False)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(association="sideways"), "association must be one of 'linear', 'none', 'quadratic'"),
        (dict(association="none", random_scale=False), "needs both"),
        (dict(association="quadratic", re_formula="~ x"), "one random location effect"),
        (dict(association="quadratic", scale_re_formula="~ x"), "one random location effect"),
        (dict(cov_constraints=["cov(u0,w)"]), "'cov(u0,w)' is not a covariance of the model's school effects; they are ['cov(u0,v)']"),
        (dict(cov_constraints=3), "must be a covariance name or a list"),
        (dict(re_formula="~ x", cov_constraints=["cov(u1,v)"]), "needs cov(u0,u1) or cov(u0,v) fixed at 0 too"),
    ],
)
def test_bad_specifications_name_the_option(demo, kw, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        mlsml.MELSM.from_formula("y ~ x", demo, groups="school", **kw)


def test_constrained_names_are_absent_everywhere(cmp, tmp_path):
    """A fixed covariance is not a parameter: absent from params, bse, cov_params, the correlations,
    the summaries and the JSON, and a zero of cov_re; load() gives back the same fit."""
    res = cmp.fits["none"]
    assert "cov(u0,v)" not in res.params.index and res.layout.association == "none"
    assert res.cov_params().shape == (6, 6) and res.re_correlations().empty
    assert res.cov_re.loc["u0", "v"] == 0.0
    assert "cov(u0,v)" not in res.summary().as_text()
    text = res.summary(style="mixwild").as_text()
    assert "independent of u0 (NCOV = 0)" in text and "Loc  Eff" not in text
    back = mlsml.load(res.to_json())
    assert back.layout == res.layout and back.layout.association == "none"
    pd.testing.assert_series_equal(back.params, res.params)
    quad = mlsml.load(cmp.fits["quadratic"].to_json())
    assert quad.params.index[-1] == "quad(u0,v)" and quad.layout.quad_assoc
    mw = cmp.fits["quadratic"].summary(style="mixwild").as_text()
    assert "Random quadratic location (mean) effects on WS variance" in mw and "Quad Loc" in mw


def test_profile_and_wald_intervals_of_the_new_parameters(cmp):
    from mlsml.profile import profile_ci

    quad = cmp.fits["quadratic"]
    ci = profile_ci(quad, "quad(u0,v)")
    assert ci.lower < quad.params["quad(u0,v)"] < ci.upper
    wald = quad.conf_int().loc["quad(u0,v)"]
    assert ci.lower == pytest.approx(wald.iloc[0], abs=0.5 * quad.bse["quad(u0,v)"])
    none = cmp.fits["none"]
    ci_v = profile_ci(none, "var(v)")  # row v of the Cholesky factor has no free off-diagonal entry
    assert ci_v.lower < none.params["var(v)"] < ci_v.upper


def test_lrtest_boundary_mixture_counts_free_covariances(demo, cmp):
    """Dropping v from the association="none" model removes var(v) only: 0.5 chi2(0) + 0.5 chi2(1)."""
    m1 = mlsml.fit("y ~ x", demo, groups="school", scale_formula="~ x", random_scale=False)
    t = mlsml.lrtest(m1, cmp.fits["none"])
    assert t.df == 1 and t.reference.startswith("0.5 chi2(0) + 0.5 chi2(1)")
    assert t.pvalue == pytest.approx(0.5 * (t.statistic <= 0) + 0.5 * t.pvalue_naive)


def test_bootstrap_refits_keep_the_constraints(cmp):
    res = cmp.fits["none"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = res.bootstrap(2, seed=3, n_jobs=1, progress=False)
    assert list(boot.replicates.columns) == list(res.params.index)


def test_independent_random_slope_equals_statsmodels_variance_components(exam):
    """cov_constraints=["cov(u0,u1)"] without a random scale is lme4's (1 | school) + (0 + x | school):
    Gaussian, so exact; statsmodels MixedLM (ML) fits it with a variance component."""
    res = mlsml.fit(
        "normexam ~ standLRT", exam, groups="school", re_formula="~ standLRT", random_scale=False, cov_constraints=["cov(u0,u1)"]
    )
    assert list(res.params.index[-2:]) == ["var(u0)", "var(u1)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = smf.mixedlm("normexam ~ standLRT", exam, groups="school", re_formula="1", vc_formula={"slope": "0 + standLRT"}).fit(
            reml=False, method="lbfgs"
        )
    assert res.llf == pytest.approx(sm.llf, abs=1e-5)
    assert res.params["var(u0)"] == pytest.approx(float(sm.cov_re.iloc[0, 0]), rel=1e-3)
    assert res.params["var(u1)"] == pytest.approx(float(sm.vcomp[0]), rel=1e-3)
    assert res.params["mean:standLRT"] == pytest.approx(sm.fe_params["standLRT"], abs=1e-5)


def test_quadratic_model_is_simulated():
    """draw_responses (and so the parametric bootstrap) adds gamma (u0/sd(u0))^2 to the log variance:
    with var(v) ~ 0 and 400 pupils a school, the log of each school's residual variance is
    alpha0 + gamma theta1^2 up to sampling error (SD sqrt(2/400) = 0.07)."""
    rng = np.random.default_rng(11)
    J, n = 60, 400
    df = pd.DataFrame({"school": np.repeat(np.arange(J), n), "x": rng.normal(size=J * n), "y": rng.normal(size=J * n)})
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", association="quadratic")
    truth = pd.Series([0.0, 0.5, -1.0, 0.25, 1e-8, 0.0, 0.6], index=model.param_names)
    theta1 = np.random.default_rng(5).standard_normal((J, 2))[:, 0]  # the draws' first numbers: u0_j / sd(u0)
    y = mlsml.simulate.draw_responses(model.design, model.theta_from_params(truth), np.random.default_rng(5))[0]
    d = model.design
    r = y - d.X @ np.array([0.0, 0.5])
    mean = np.add.reduceat(r, d.starts) / d.counts
    logvar = np.log(np.add.reduceat((r - mean[d.group]) ** 2, d.starts) / (d.counts - 1))
    pred = -1.0 + 0.6 * theta1**2
    assert np.abs(logvar - pred).max() < 0.35 and np.std(pred) > 0.3  # the quadratic term is there
