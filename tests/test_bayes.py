"""mlsml.compare_bayes: brms / ArviZ posterior summaries converted to mlsml's parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import mlsml
from mlsml.bayes import convert_brms


@pytest.fixture(scope="module")
def seed_m3(seed_sim):
    return mlsml.fit("y ~ x", seed_sim, groups="school", scale_formula="~ x")


@pytest.fixture(scope="module")
def brms_seed():
    return load_reference("r__seed_sim__brms__M3")


def _native(ref) -> pd.DataFrame:
    rows = {k: {"Estimate": v["mean"], "Est.Error": v["sd"]} for k, v in ref["brms_native"].items()}
    return pd.DataFrame(rows).T


def test_conversion_matches_draw_by_draw(seed_m3, brms_seed):
    """From brms's own summary we must recover the draw-by-draw conversion stored with the fit:
    linear parameters exactly, E[sd^2] up to the (n-1)/n of the draws' sample SD (rel. 2.5e-4 of
    Var(sd), here 2e-6 of the mean), the approximations (SD of a variance, covariance)
    to a few percent."""
    out = mlsml.compare_bayes(seed_m3, _native(brms_seed))
    ours = brms_seed["ours"]
    exact = {
        "mean:Intercept": "beta0",
        "mean:x": "beta1",
        "scale:Intercept": "alpha0",
        "scale:x": "alpha1",
        "var(u0)": "sigma2_u",
        "var(v)": "sigma2_v",
        "corr(u0,v)": "rho_uv",
    }
    for name, key in exact.items():
        assert out.loc[name, "post mean"] == pytest.approx(ours[key]["mean"], rel=1e-5, abs=1e-9), name
    for name, key in {"mean:x": "beta1", "scale:x": "alpha1", "corr(u0,v)": "rho_uv"}.items():
        assert out.loc[name, "post sd"] == pytest.approx(ours[key]["sd"], rel=1e-6), name
    assert out.loc["var(u0)", "post sd"] == pytest.approx(ours["sigma2_u"]["sd"], rel=0.05)
    assert out.loc["var(v)", "post sd"] == pytest.approx(ours["sigma2_v"]["sd"], rel=0.05)
    assert out.loc["cov(u0,v)", "post mean"] == pytest.approx(ours["sigma_uv"]["mean"], rel=0.02)
    assert out.loc["cov(u0,v)", "post sd"] == pytest.approx(ours["sigma_uv"]["sd"], rel=0.05)
    # ML and posterior agree within a fraction of an SE for the location parameters
    assert np.all(np.abs(out.loc[["mean:Intercept", "mean:x", "scale:x"], "diff/SE"]) < 0.1)
    assert out.loc["var(u0)", "estimate"] == seed_m3.params["var(u0)"]
    assert "exact" in out.loc["var(v)", "conversion"] and "approx" in out.loc["cov(u0,v)", "conversion"]


def test_quantiles_and_csv_roundtrip(seed_m3, tmp_path):
    post = pd.DataFrame(
        {"Estimate": [-0.39, 0.12, 0.25], "Est.Error": [0.02, 0.02, 0.02], "Q2.5": [-0.43, 0.08, 0.2], "Q97.5": [-0.35, 0.16, 0.3]},
        index=["b_sigma_Intercept", "sd_school__sigma_Intercept", "sd_school__Intercept"],
    )
    path = tmp_path / "post.csv"
    post.to_csv(path)  # row names in an unnamed first column, as R's write.csv
    out = mlsml.compare_bayes(seed_m3, path)
    assert out.loc["scale:Intercept", ["post mean", "post lower", "post upper"]].tolist() == pytest.approx([-0.78, -0.86, -0.70])
    assert out.loc["var(v)", "post lower"] == pytest.approx(0.16**2)
    assert out.loc["var(v)", "post upper"] == pytest.approx(0.32**2)
    assert out.loc["var(v)", "post mean"] == pytest.approx(0.24**2 + 0.04**2)
    assert out.loc["var(u0)", "post mean"] == pytest.approx(0.25**2 + 0.02**2)
    assert np.isnan(out.loc["mean:x", "post mean"])  # absent from the summary: missing, not invented


def test_arviz_summary_and_our_names(seed_m3):
    post = pd.DataFrame(
        {"mean": [0.69, 0.06], "sd": [0.015, 0.012], "hdi_3%": [0.66, 0.04], "hdi_97%": [0.72, 0.085]},
        index=["b_x", "var(u0)"],
    )
    out = mlsml.compare_bayes(seed_m3, post)
    assert out.loc["mean:x", "post upper"] == 0.72
    assert out.loc["var(u0)", "post mean"] == 0.06  # given on our scale: taken as is
    assert out.loc["var(u0)", "conversion"] == "given on mlsml's scale"


def test_random_slope_names(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", re_formula="~ standLRT", random_scale=False)
    post = pd.DataFrame(
        {"Estimate": [0.3, 0.12, 0.5], "Est.Error": [0.03, 0.02, 0.1]},
        index=["sd_school__Intercept", "sd_school__standLRT", "cor_school__Intercept__standLRT"],
    )
    conv = convert_brms(
        post.rename(columns={"Estimate": "mean", "Est.Error": "sd"}).assign(lower=np.nan, upper=np.nan),
        ["Intercept", "standLRT"],
        random_scale=False,
    )
    assert conv.loc["cov(u0,u1)", "mean"] == pytest.approx(0.5 * 0.3 * 0.12)
    out = mlsml.compare_bayes(res, post)
    assert out.loc["var(u1)", "post mean"] == pytest.approx(0.12**2 + 0.02**2)


def test_bad_summary_is_a_clear_error(seed_m3):
    with pytest.raises(mlsml.ModelSpecError, match="Estimate"):
        mlsml.compare_bayes(seed_m3, pd.DataFrame({"foo": [1.0]}, index=["b_x"]))
