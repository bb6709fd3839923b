"""The results object: immutability, inference, summary, tests, warnings."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
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
    import warnings

    df = mlsml.simulate.simulate_data([6] * 300, cov=[[0.5, 0.3], [0.3, 1.5]], seed=4)
    with pytest.warns(mlsml.QuadratureWarning, match=r"refit with nagq=23"):
        coarse = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", quadrature="product")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mlsml.QuadratureWarning)
        fine = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", nagq=31)
    points, change = fine._info["quadrature_check"]
    assert points == 63 and change < 1e-6
    assert fine.llf - coarse.llf > 0.1  # the coarse rule was well below the likelihood
