"""MIXREGLS/MIXWILD-style output and the conversion between MIXREGLS's parameters and ours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import mlsml
from mlsml.errors import ModelSpecError
from mlsml.mixregls import fit_stages, from_mixregls, stage_tests, summarize_mixwild, to_mixregls


def test_to_mixregls_matches_the_reference_raw_parameters(exam_m3):
    ref = load_reference("mixregls__exam__m3")["raw_parameters"]
    tab = to_mixregls(exam_m3)
    assert list(tab["block"]) == ["BETA", "BETA", "ALPHA", "TAU", "TAU", "SCALE_SD", "LOC_EFF"]
    assert set(tab["ref_key"]) == set(ref)
    for _, row in tab.iterrows():
        r = ref[row["ref_key"]]
        assert row["estimate"] == pytest.approx(r["estimate"], abs=1e-4), row["ref_key"]
        assert row["std err"] == pytest.approx(r["se"], rel=1e-3), row["ref_key"]
    # z and p follow from estimate and SE
    np.testing.assert_allclose(tab["z"], tab["estimate"] / tab["std err"])


def test_to_mixregls_model_without_random_scale(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    ref = load_reference("mixregls__exam__m1")["raw_parameters"]
    tab = to_mixregls(res)
    assert list(tab["block"]) == ["BETA", "BETA", "ALPHA", "TAU"]
    for _, row in tab.iterrows():
        assert row["estimate"] == pytest.approx(ref[row["ref_key"]]["estimate"], abs=1e-4)
        assert row["std err"] == pytest.approx(ref[row["ref_key"]]["se"], rel=1e-3)


def test_conversion_round_trip_and_reference_direction(exam_m3):
    back = from_mixregls(to_mixregls(exam_m3))
    pd.testing.assert_index_equal(back.index, exam_m3.params.index)
    np.testing.assert_allclose(back.to_numpy(), exam_m3.params.to_numpy(), rtol=1e-10, atol=1e-12)
    # MIXREGLS's own estimates -> our scale gives the reference's converted values
    ref = load_reference("mixregls__exam__m3")
    raw = {k: v["estimate"] for k, v in ref["raw_parameters"].items()}
    ours = from_mixregls(
        {
            "BETA:Intercept": raw["beta_Intercept"],
            "BETA:standLRT": raw["beta_standLRT"],
            "ALPHA:Intercept": raw["ln_sigma2_u"],
            "TAU:Intercept": raw["alpha_Intercept"],
            "TAU:standLRT": raw["alpha_standLRT"],
            "SCALE_SD:Std Dev": raw["tau_scale"],
            "LOC_EFF:Loc  Eff": raw["tau_loc"],
        }
    )
    conv = ref["converted"]
    assert ours["var(u0)"] == pytest.approx(conv["sigma2_u"]["estimate"], rel=1e-12)
    assert ours["var(v)"] == pytest.approx(conv["sigma2_v"]["estimate"], rel=1e-12)
    assert ours["cov(u0,v)"] == pytest.approx(conv["sigma_uv"]["estimate"], rel=1e-12)
    with pytest.raises(ModelSpecError, match="ALPHA"):
        from_mixregls({"BETA:Intercept": 0.0, "TAU:Intercept": 0.0})
    with pytest.raises(ModelSpecError, match="block"):
        from_mixregls({"GAMMA:x": 1.0})


def test_conversion_refuses_random_slopes(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", re_formula="~ standLRT", random_scale=False)
    with pytest.raises(ModelSpecError, match="random intercept"):
        to_mixregls(res)
    # the report uses MIXREGMLS's layout instead: Sigma on its natural scale
    text = res.summary(style="mixwild").as_text()
    assert "Random (location) Effect Variances and Covariances" in text and "ALPHA (BS" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("Covariance "))
    assert float(row.split()[1]) == pytest.approx(res.params["cov(u0,u1)"], abs=1e-5)
    assert float(row.split()[2]) == pytest.approx(res.bse["cov(u0,u1)"], abs=1e-5)


def test_summary_style_mixwild_prints_the_mixregls_criteria(exam_m3):
    smry = exam_m3.summary(style="mixwild")
    text = smry.as_text()
    ref = load_reference("mixregls__exam__m3")
    # the "larger is better" criteria first, then x(-2): the latter are the reference's aic/bic_groups
    lines = [ln for ln in text.splitlines() if "Information Criterion" in ln or "Bayesian Criterion" in ln]
    vals = [float(ln.split("=")[1]) for ln in lines]
    k, J, ll = 7, 65, exam_m3.llf
    assert vals[0] == pytest.approx(ll - k, abs=1e-3)
    assert vals[1] == pytest.approx(ll - k * np.log(J) / 2, abs=1e-3)
    assert vals[2] == pytest.approx(ref["printed"]["aic_printed"], abs=2e-3)
    assert vals[3] == pytest.approx(ref["printed"]["bic_printed"], abs=2e-3)
    for block in (
        "BETA (regression coefficients)",
        "ALPHA (BS variance",
        "TAU (WS variance",
        "Random scale standard deviation",
        "Random location (mean) effect",
        "BS variance ratios and 95% CIs",
        "WS variance ratios and 95% CIs",
    ):
        assert block in text
    assert "<pre>" in smry.as_html() and "\\begin{verbatim}" in smry.as_latex()
    with pytest.raises(ModelSpecError, match="unknown summary style"):
        exam_m3.summary(style="nope")


def test_stage_sequence_matches_mixregls_nested_blocks(exam_m3):
    calls = []
    stages = fit_stages(exam_m3, progress=lambda i, n, t: calls.append((i, n, t)))
    assert [t for t, _ in stages] == ["Model without Scale Parameters", "Model WITH Scale Parameters", "Model WITH RANDOM Scale"]
    assert calls == [(i + 1, 3, t) for i, (t, _) in enumerate(stages)]
    assert stages[-1][1] is exam_m3
    nested = load_reference("mixregls__exam__m3")["nested_models_from_same_run"]
    c1 = nested["cycle1_random_intercept_only"]
    assert stages[0][1].llf == pytest.approx(c1["loglik"], abs=2e-5)
    assert stages[0][1].df_model == 4 and stages[1][1].df_model == 5
    tests = stage_tests(stages)
    assert list(tests["df"]) == [1, 2]
    assert tests["LR chi2"].iloc[1] == pytest.approx(2 * (exam_m3.llf - stages[1][1].llf))
    assert "0.5 chi2(1) + 0.5 chi2(2)" in tests["reference"].iloc[1]
    text = summarize_mixwild(exam_m3, stages=stages, title="exam")
    assert text.count("Log Likelihood                 =") == 6
    assert "Likelihood-ratio tests between the models" in text
    with pytest.raises(ModelSpecError, match="last of"):
        summarize_mixwild(exam_m3, stages=stages[:2])


def test_stage_sequence_without_scale_covariates(seed_sim):
    res = mlsml.fit("y ~ x", seed_sim, groups="school")  # WS ~ 1: MIXREGLS skips the "WITH Scale" block
    stages = fit_stages(res)
    assert [t for t, _ in stages] == ["Model without Scale Parameters", "Model WITH RANDOM Scale"]
    ref = load_reference("mixregls__seed_sim__m1")
    assert stages[0][1].llf == pytest.approx(ref["loglik"], abs=1e-5)
