"""The results object: immutability, inference, summary, tests, warnings."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import multiprocessing
import operator
import pickle
import re
import warnings

import numpy as np
import pandas as pd
import pytest
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
    np.testing.assert_allclose(ci.iloc[:, 1] - r.params, stats.norm.ppf(0.95) * r.bse)
    assert r.deviance == pytest.approx(-2 * r.llf)
    assert r.aic == pytest.approx(-2 * r.llf + 14)
    assert r.bic == pytest.approx(-2 * r.llf + 7 * np.log(4059))
    assert r.bic_groups == pytest.approx(-2 * r.llf + 7 * np.log(65))
    assert r.nobs == 4059 and r.ngroups == 65 and r.nagq == 15
    assert not r.singular
    S = r.cov_re.to_numpy()
    assert S[0, 1] == pytest.approx(r.params["cov(u0,v)"])
    assert r.corr_re.iloc[0, 1] == pytest.approx(r.re_correlations().loc["corr(u0,v)", "estimate"])


def test_summary_text_html_latex(exam_m3):
    s = exam_m3.summary()
    text = s.as_text()
    for piece in [
        "Mean function",
        "Residual variance",
        "var(u0)",
        "cov(u0,v)",
        "corr(u0,v)",
        "-4656.3164",
    ]:
        assert piece in text, piece
    assert re.search(r"Converged:\s+Yes", text)
    assert "<table" in s.as_html()
    assert "tabular" in s.as_latex()


def test_lrtest_boundary_mixture(exam):
    r1 = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    r2 = mlsml.fit("normexam ~ standLRT", exam, groups="school")
    t = mlsml.lrtest(r1, r2)
    assert t.df == 2
    assert t.statistic == pytest.approx(2 * (r2.llf - r1.llf))
    assert t.pvalue == pytest.approx(0.5 * stats.chi2.sf(t.statistic, 1) + 0.5 * stats.chi2.sf(t.statistic, 2))
    assert t.pvalue < t.pvalue_naive
    assert r2.compare_lr_test(r1).statistic == t.statistic
    with pytest.raises(mlsml.ModelSpecError):
        mlsml.lrtest(r2, r1)
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
    """Small clusters with a large random-scale variance: the 11-point product rule is 0.13 off."""
    df = mlsml.simulate.simulate_data([6] * 300, cov=[[0.5, 0.3], [0.3, 1.5]], seed=4)
    with pytest.warns(mlsml.QuadratureWarning, match=r"refit with nagq=23"):
        coarse = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", quadrature="product")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mlsml.QuadratureWarning)
        fine = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", nagq=31)
    points, change = fine._info["quadrature_check"]
    assert points == 63 and change < 1e-6
    assert fine.llf - coarse.llf > 0.1  # the coarse rule was well below the likelihood


# ---------------------------------------------------------------- pickling (issue 10)
def _scale_slope_data(J: int = 40, n: int = 12, seed: int = 3) -> pd.DataFrame:
    """y = 0.2 + 0.5 x + u0 + e, ln var(e) = -0.8 + 0.1 x + v0 + v1 x (as tests/test_extended.py)."""
    rng = np.random.default_rng(seed)
    sigma = np.array([[0.10, -0.03, 0.01], [-0.03, 0.15, 0.02], [0.01, 0.02, 0.06]])
    b = rng.multivariate_normal(np.zeros(3), sigma, size=J)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    lv = -0.8 + 0.1 * x + b[g, 1] + b[g, 2] * x
    y = 0.2 + 0.5 * x + b[g, 0] + rng.normal(size=J * n) * np.exp(lv / 2)
    return pd.DataFrame({"y": y, "x": x, "school": g})


@pytest.fixture(scope="module")
def model_classes(exam, exam_m3):
    """One fit of every model class: core, random slope, scale random slope, BS variance function."""
    slopes = mlsml.fit(
        "normexam ~ center(standLRT) + C(sex)", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT"
    )
    scale_re = mlsml.fit(
        "y ~ x", _scale_slope_data(), groups="school", scale_formula="~ x", scale_re_formula="~ x", quadrature="product", nagq=3
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
    if res.layout.extended:
        with pytest.raises(mlsml.ModelSpecError, match="predict"):
            back.predict(new)
    else:
        for kind in ("mean", "variance"):
            pd.testing.assert_series_equal(back.predict(new, kind=kind), res.predict(new, kind=kind))
    if res.layout.extended:
        with pytest.raises(mlsml.ModelSpecError, match="school_effects"):
            back.school_effects()
    else:
        pd.testing.assert_frame_equal(back.school_effects(), res.school_effects())
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
