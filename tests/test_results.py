"""The results object: immutability, inference, summary flags of real fits, tests, warnings.

The summary table itself is tested in test_summary.py."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import multiprocessing
import operator
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import scale_slope_data
from scipy import stats

import mlsml
from mlsml import ConvergenceWarning, SingularFitWarning


def test_results_are_immutable(exam_m3):
    with pytest.raises(dataclasses.FrozenInstanceError):
        exam_m3.llf = 0.0
    with pytest.raises(ValueError):
        exam_m3.theta[0] = 1.0
    with pytest.raises(ValueError):
        exam_m3.params.iloc[0] = 1.0


def test_inference_is_consistent(exam_m3):
    r = exam_m3
    assert list(r.params.index) == r.model.param_names
    np.testing.assert_allclose(r.bse.to_numpy() ** 2, np.diag(r.cov_params().to_numpy()))
    np.testing.assert_allclose(r.tvalues, r.params / r.bse)
    np.testing.assert_allclose(r.pvalues, 2 * stats.norm.sf(np.abs(r.tvalues)))
    ci = r.conf_int(0.1)
    z = stats.norm.ppf(0.95)
    var = [n for n in r.params.index if n.startswith("var(")]
    other = [n for n in r.params.index if n not in var]
    assert var == ["var(u0)", "var(v)"]
    np.testing.assert_allclose(ci.iloc[:, 1][other] - r.params[other], z * r.bse[other])
    np.testing.assert_allclose(r.params[other] - ci.iloc[:, 0][other], z * r.bse[other])
    # variances: symmetric on the log scale, exp(log v +/- z se / v)
    v, se = r.params[var], r.bse[var]
    np.testing.assert_allclose(np.log(ci.iloc[:, 1][var]) - np.log(v), z * se / v)
    np.testing.assert_allclose(np.log(v) - np.log(ci.iloc[:, 0][var]), z * se / v)
    assert r.deviance == pytest.approx(-2 * r.llf)
    assert r.aic == pytest.approx(-2 * r.llf + 14)
    assert r.bic == pytest.approx(-2 * r.llf + 7 * np.log(4059))
    assert r.bic_groups == pytest.approx(-2 * r.llf + 7 * np.log(65))
    assert r.nobs == 4059 and r.ngroups == 65 and r.nagq == 15
    assert not r.singular
    S = r.cov_re.to_numpy()
    assert S[0, 1] == pytest.approx(r.params["cov(u0,v)"])
    assert r.corr_re.iloc[0, 1] == pytest.approx(r.re_correlations().loc["corr(u0,v)", "estimate"])


def test_lrtest_boundary_mixture(exam):
    r1 = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    r2 = mlsml.fit("normexam ~ standLRT", exam, groups="school")
    t = mlsml.lrtest(r1, r2)
    assert t.df == 2
    assert t.statistic == pytest.approx(2 * (r2.llf - r1.llf))
    assert t.pvalue == pytest.approx(0.5 * stats.chi2.sf(t.statistic, 1) + 0.5 * stats.chi2.sf(t.statistic, 2))
    assert t.pvalue < t.pvalue_naive
    assert r2.compare_lr_test(r1).statistic == t.statistic
    assert mlsml.lrtest(r2, r1) == t  # either order
    table = mlsml.compare_models([r1, r2])
    assert table["LR chi2"].iloc[1] == pytest.approx(t.statistic)


def test_nonconvergence_is_loud(exam):
    with pytest.warns(ConvergenceWarning, match="NOT converge"):
        r = mlsml.fit("normexam ~ standLRT", exam, groups="school", maxiter=2, max_passes=1)
    assert not r.converged
    assert "did NOT converge" in r.summary().as_text()


def test_singular_fit_is_reported():
    # no school effect on the variance in the truth and tiny groups: var(v) goes to the boundary
    df = mlsml.simulate.simulate_data([4] * 60, cov=[[0.2, 0.0], [0.0, 1e-12]], seed=11)
    with pytest.warns(SingularFitWarning):
        r = mlsml.fit("y ~ x", df, groups="school")
    assert r.singular
    assert "singular" in r.summary().as_text()
    assert np.isfinite(r.llf)


def test_start_params_and_loglike_roundtrip(exam_m3):
    m = exam_m3.model
    assert m.loglike(exam_m3.params) == pytest.approx(exam_m3.llf, abs=1e-8)
    again = m.fit(start_params=exam_m3.params)
    assert again.llf == pytest.approx(exam_m3.llf, abs=1e-7)


def test_methods_agree(exam):
    base = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    for method in ("L-BFGS-B", "trust-exact"):
        r = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", method=method)
        assert r.llf == pytest.approx(base.llf, abs=1e-6), method
        np.testing.assert_allclose(r.params, base.params, atol=2e-4)


def test_deterministic(exam):
    a = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    b = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    assert a.llf == b.llf
    np.testing.assert_array_equal(a.params.to_numpy(), b.params.to_numpy())
    np.testing.assert_array_equal(a.bse.to_numpy(), b.bse.to_numpy())


def test_quadrature_warning_when_more_points_move_the_llf():
    """Small clusters with a large random-scale variance: the 11-point product rule is 0.13 off.

    The rule is the user's (``nagq=11``): a default rule is raised instead (optimize.raise_rule).
    """
    df = mlsml.simulate.simulate_data([6] * 300, cov=[[0.5, 0.3], [0.3, 1.5]], seed=4)
    with pytest.warns(mlsml.QuadratureWarning, match=r"refit with nagq=23"):
        coarse = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", quadrature="product", nagq=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mlsml.QuadratureWarning)
        fine = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", nagq=31)
    points, change = fine.diagnostics.quadrature_check
    assert points == 63 and change < 1e-6
    assert fine.llf - coarse.llf > 0.1  # the coarse rule was well below the likelihood


# ---------------------------------------------------------------- pickling (issue 10)
@pytest.fixture(scope="module")
def model_classes(exam, exam_m3):
    """One fit of every model class: core, random slope, scale random slope, BS variance function."""
    slopes = mlsml.fit(
        "normexam ~ center(standLRT) + C(sex)", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT"
    )
    scale_re = mlsml.fit(
        "y ~ x", scale_slope_data(), groups="school", scale_formula="~ x", scale_re_formula="~ x", quadrature="product", nagq=3
    )
    bs = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", bs_formula="~ schavg")
    return {"core": exam_m3, "slopes": slopes, "scale_re": scale_re, "bs": bs}


def _newdata(name: str, exam: pd.DataFrame) -> pd.DataFrame:
    if name == "scale_re":
        return pd.DataFrame({"x": [-1.0, 0.0, 2.0], "school": [0, 5, 99]})
    return exam.iloc[[0, 500, 4000]].assign(school=[1, 20, 999])


@pytest.mark.parametrize("name", ["core", "slopes", "scale_re", "bs"])
def test_results_pickle_round_trip(model_classes, exam, name):
    res = model_classes[name]
    back = pickle.loads(pickle.dumps(res))
    pd.testing.assert_series_equal(back.params, res.params)
    pd.testing.assert_series_equal(back.bse, res.bse)
    assert back.llf == res.llf and back.nobs == res.nobs and back.ngroups == res.ngroups
    assert back.summary().as_text() == res.summary().as_text()
    pd.testing.assert_frame_equal(back.random_effects(), res.random_effects())
    new = _newdata(name, exam)
    with pytest.warns(mlsml.UnknownGroupWarning, match="1 of 3 rows"):  # the last row's school
        for kind in ("mean", "variance", "sd"):
            pd.testing.assert_series_equal(back.predict(new, kind=kind), res.predict(new, kind=kind))
    pd.testing.assert_series_equal(back.fittedvalues, res.fittedvalues)
    pd.testing.assert_frame_equal(back.school_effects(), res.school_effects())  # every model class (issue 11)
    # the design descriptions are rebuilt from the formulas and the fitted data, not copied
    spec, spec_back = res.model.formula_spec, back.model.formula_spec
    assert spec_back.mean_spec is not spec.mean_spec
    assert spec_back.mean_spec.column_names == spec.mean_spec.column_names


def test_pickled_stateful_transform_keeps_its_state(model_classes, exam):
    """center(standLRT) is centred at the fitted data's mean, also for new data after unpickling."""
    res = model_classes["slopes"]
    back = pickle.loads(pickle.dumps(res))
    one = exam.iloc[[7]]  # a single row: re-centring on newdata would give standLRT - standLRT = 0
    fe = back.fe_mean
    want = (
        fe["Intercept"]
        + fe["center(standLRT)"] * (one["standLRT"] - exam["standLRT"].mean())
        + fe["C(sex)[T.M]"] * (one["sex"] == "M")
    )
    np.testing.assert_allclose(back.predict(one, conditional=False), want, rtol=1e-12)


def test_results_travel_to_a_worker_process(model_classes, exam):
    """Users send fits to worker processes: a fresh interpreter (spawn) unpickles and uses them."""
    res = model_classes["slopes"]
    new = exam.iloc[[0, 1, 2]]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pred = pool.submit(operator.methodcaller("predict", new), res).result(timeout=300)
        table = pool.submit(operator.methodcaller("school_effects"), res).result(timeout=300)
        text = pool.submit(operator.methodcaller("as_text"), res.summary()).result(timeout=300)
        back = pool.submit(copy.copy, res).result(timeout=300)  # and back again
    pd.testing.assert_series_equal(pred, res.predict(new))
    pd.testing.assert_frame_equal(table, res.school_effects())
    assert text == res.summary().as_text()
    pd.testing.assert_series_equal(back.params, res.params)


# ---------------------------------------------------------------- statsmodels staples (issue 10)
@pytest.fixture(scope="module")
def shuffled(exam):
    """The exam data in a random row order with a non-default index (strings), and its fit."""
    rng = np.random.default_rng(5)
    df = exam.iloc[rng.permutation(len(exam))].copy()
    df.index = [f"r{i}" for i in rng.permutation(len(df))]
    res = mlsml.fit("normexam ~ standLRT + C(sex)", df, groups="school", scale_formula="~ standLRT")
    return df, res


def test_fittedvalues_and_resid_follow_the_callers_rows(shuffled):
    df, res = shuffled
    fitted, resid = res.fittedvalues, res.resid
    assert fitted.name == "fittedvalues" and resid.name == "resid"
    assert fitted.index.equals(df.index) and resid.index.equals(df.index)
    b = res.fe_mean
    u = res.random_effects()["u0"]
    want = b["Intercept"] + b["standLRT"] * df["standLRT"] + b["C(sex)[T.M]"] * (df["sex"] == "M") + u.loc[df["school"]].to_numpy()
    np.testing.assert_allclose(fitted, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(resid.to_numpy(), (df["normexam"] - fitted).to_numpy())
    # predict() without data is the same, for every kind, and the population version is x'b
    pd.testing.assert_series_equal(res.predict(), fitted.rename("mean"))
    assert res.predict(kind="variance").index.equals(df.index)
    xb = want - u.loc[df["school"]].to_numpy()
    np.testing.assert_allclose(res.predict(conditional=False), xb, rtol=1e-12, atol=1e-12)


def test_fittedvalues_skip_the_rows_dropped_for_missing_values(exam):
    df = exam.assign(standLRT=exam["standLRT"].where(exam.index % 50 != 3))
    with pytest.warns(mlsml.MissingDataWarning):
        res = mlsml.fit("normexam ~ standLRT", df, groups="school", random_scale=False)
    kept = df.index[df["standLRT"].notna()]
    assert res.fittedvalues.index.equals(kept) and res.resid.index.equals(kept)
    np.testing.assert_allclose(res.resid + res.fittedvalues, df.loc[kept, "normexam"], rtol=1e-12)


def test_predict_accepts_a_dict(exam_m3):
    frame = pd.DataFrame({"standLRT": [-1.0, 0.5], "school": [3, 7]})
    as_dict = {"standLRT": [-1.0, 0.5], "school": [3, 7]}
    for kind in ("mean", "variance", "sd"):
        pd.testing.assert_series_equal(exam_m3.predict(as_dict, kind=kind), exam_m3.predict(frame, kind=kind))
    one = exam_m3.predict({"standLRT": 0.5, "school": 7})  # scalars: one row
    assert one.to_numpy()[0] == exam_m3.predict(frame).to_numpy()[1]
    with pytest.raises(mlsml.DataError, match="equal lengths"):
        exam_m3.predict({"standLRT": [0.0, 1.0], "school": [1, 2, 3]})
    with pytest.raises(mlsml.DataError, match="DataFrame or a dict"):
        exam_m3.predict([[0.0, 1]])


def test_predicted_sd_is_the_posterior_mean_of_the_residual_sd(exam_m3):
    r = exam_m3
    new = pd.DataFrame({"standLRT": [0.0, 1.0], "school": [4, 4]})
    a = r.fe_scale.to_numpy()
    w = np.column_stack([np.ones(2), new["standLRT"]])
    pop = r.predict(new, kind="sd", conditional=False)
    np.testing.assert_allclose(pop, np.exp(w @ a / 2 + r.params["var(v)"] / 8), rtol=1e-12)
    # E(exp(v/2) | y) from an independent, finer quadrature of the posterior of school 4
    from mlsml.predict import product_likelihood

    design = r.model.design
    lik = product_likelihood(design, 31)
    nodes = lik.adapt(r.theta)
    p = lik.posterior_weights(r.theta, nodes)
    j = list(design.group_labels).index(4)
    ev = float(p[j] @ np.exp(nodes.b[j, :, 1] / 2))
    np.testing.assert_allclose(r.predict(new, kind="sd"), np.exp(w @ a / 2) * ev, rtol=1e-7)


def test_fe_params_and_html(exam_m3, model_classes):
    fe = exam_m3.fe_params
    assert list(fe.index) == ["mean:Intercept", "mean:standLRT", "scale:Intercept", "scale:standLRT"]
    np.testing.assert_array_equal(fe.to_numpy(), exam_m3.params.to_numpy()[:4])
    assert list(model_classes["bs"].fe_params.index)[-2:] == ["bsvar:Intercept", "bsvar:schavg"]
    html = exam_m3._repr_html_()
    assert html.startswith("<table") and "mean:" not in html and "standLRT" in html and "cov(u0,v)" in html


# ---------------------------------------------------------------- Wald and t tests (issue 10)
def _statsmodels_results(res):
    """statsmodels' own results object on the same estimates and covariance (z tests, chi2 Wald tests)."""
    from types import SimpleNamespace

    from statsmodels.base.model import LikelihoodModelResults

    names = list(res.params.index)
    model = SimpleNamespace(data=SimpleNamespace(cov_names=names, param_names=names), exog_names=names)
    sm = LikelihoodModelResults(model, res.params.to_numpy(), normalized_cov_params=res.cov_params().to_numpy(), scale=1.0)
    sm.use_t = False
    sm.df_resid = res.nobs - res.df_model
    return sm


def test_wald_and_t_tests_match_statsmodels(exam_m3):
    r = exam_m3
    sm = _statsmodels_results(r)
    R = np.zeros((2, 7))
    R[0, 1] = 1.0  # mean:standLRT
    R[1, 3] = 1.0  # scale:standLRT
    q = np.array([0.5, 0.0])
    ours = r.wald_test(R, q)
    theirs = sm.wald_test((R, q), use_f=False, scalar=True)
    assert ours.distribution == theirs.distribution == "chi2"
    assert ours.df_denom == theirs.df_denom == 2
    np.testing.assert_allclose(ours.statistic, theirs.statistic, rtol=1e-10)
    np.testing.assert_allclose(ours.pvalue, theirs.pvalue, rtol=1e-8)
    # by hand
    d = R @ r.params.to_numpy() - q
    chi2 = d @ np.linalg.solve(R @ r.cov_params().to_numpy() @ R.T, d)
    np.testing.assert_allclose(ours.statistic, chi2, rtol=1e-10)
    # the same hypotheses as text
    text = r.wald_test("mean:standLRT = 0.5, scale:standLRT = 0")
    np.testing.assert_allclose(text.statistic, ours.statistic, rtol=1e-12)
    t_ours = r.t_test(["mean:standLRT = 0.5", "scale:standLRT"])
    t_theirs = sm.t_test((R, q), use_t=False)
    for attr in ("effect", "sd", "statistic", "pvalue"):
        np.testing.assert_allclose(np.ravel(getattr(t_ours, attr)), np.ravel(getattr(t_theirs, attr)), rtol=1e-10)
    np.testing.assert_allclose(t_ours.conf_int(), t_theirs.conf_int(), rtol=1e-10)
    assert "mean:standLRT = 0.5" in t_ours.summary().as_text()
    # a combination of a covariance parameter, whose name has a comma and parentheses
    c = r.t_test("2 * var(u0) - cov(u0,v) = 0")
    assert c.effect[0] == pytest.approx(2 * r.params["var(u0)"] - r.params["cov(u0,v)"], rel=1e-12)


def test_wald_test_errors_name_the_problem(exam_m3):
    with pytest.raises(mlsml.ModelSpecError, match="(?s)scale:x.*parameters: mean:Intercept"):
        exam_m3.wald_test("scale:x = 0")
    with pytest.raises(mlsml.ModelSpecError, match="7 columns"):
        exam_m3.wald_test(np.eye(3))
    with pytest.raises(mlsml.ModelSpecError, match="linearly dependent"):
        exam_m3.wald_test("mean:standLRT = 0, 2 * mean:standLRT = 0")
    with pytest.raises(mlsml.ModelSpecError, match="q_matrix"):
        exam_m3.wald_test("mean:standLRT = 0", q_matrix=[1.0])
