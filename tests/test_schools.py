"""School table, population quantities, predictions for new data, and the CLI option."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import delta_se
from scipy import stats

import mlsml
from mlsml import DataError, ModelSpecError

COLUMNS = [
    "n",
    "mean",
    "mean_lo",
    "mean_hi",
    "mean_rank",
    "mean_rank_lo",
    "mean_rank_hi",
    "mean_flag",
    "var",
    "var_lo",
    "var_hi",
    "var_rank",
    "var_rank_lo",
    "var_rank_hi",
    "var_flag",
]


def test_school_table_contract(exam_m3):
    t = exam_m3.school_effects()
    assert list(t.columns) == COLUMNS
    assert t.index.name == "school" and len(t) == 65
    assert t.index.equals(exam_m3.random_effects().index)
    assert (t["n"] == exam_m3.model.design.counts).all()
    assert (t["mean_lo"] < t["mean"]).all() and (t["mean"] < t["mean_hi"]).all()
    assert (t["var_lo"] < t["var"]).all() and (t["var"] < t["var_hi"]).all()
    for key in ("mean", "var"):
        assert sorted(t[f"{key}_rank"]) == list(range(1, 66))
        assert (t[f"{key}_rank_lo"] <= t[f"{key}_rank_hi"]).all()
        assert t[f"{key}_rank_lo"].min() >= 1 and t[f"{key}_rank_hi"].max() <= 65
    # flags: the interval excludes the average school (u = 0; v = 0, i.e. exp(wbar'alpha))
    med = np.exp(exam_m3.model.design.W.mean(axis=0) @ exam_m3.fe_scale.to_numpy())
    assert ((t["mean_flag"] == 1) == (t["mean_lo"] > 0)).all()
    assert ((t["mean_flag"] == -1) == (t["mean_hi"] < 0)).all()
    assert ((t["var_flag"] == 1) == (t["var_lo"] > med)).all()
    assert ((t["var_flag"] == -1) == (t["var_hi"] < med)).all()
    assert 0 < (t["mean_flag"] != 0).sum() < 65 and 0 < (t["var_flag"] != 0).sum() < 65
    # flagged high schools rank high
    assert t.loc[t["mean_flag"] == 1, "mean_rank"].min() > t.loc[t["mean_flag"] == -1, "mean_rank"].max()
    # the table is reproducible (fixed seed) and the level matters
    pd.testing.assert_frame_equal(t, exam_m3.school_effects())
    t80 = exam_m3.school_effects(level=0.8)
    assert ((t80["var_hi"] - t80["var_lo"]) < (t["var_hi"] - t["var_lo"])).all()


def test_common_covariate_value(exam_m3):
    alpha = exam_m3.fe_scale.to_numpy()
    base = exam_m3.school_effects()
    at1 = exam_m3.school_effects(w={"standLRT": 1.0})
    wbar = exam_m3.model.design.W.mean(axis=0)
    # sigma2_j = exp(wbar'alpha + v_j): moving wbar rescales every school by the same factor
    factor = np.exp(alpha[1] * (1.0 - wbar[1]))
    np.testing.assert_allclose(at1["var"], base["var"] * factor, rtol=1e-12)
    np.testing.assert_allclose(at1["var_hi"], base["var_hi"] * factor, rtol=1e-12)
    np.testing.assert_allclose(exam_m3.school_effects(w=[1.0, 1.0])["var"], at1["var"], rtol=1e-12)
    # each school's own intake
    own = exam_m3.school_effects(w="school")
    d = exam_m3.model.design
    wj = np.add.reduceat(d.W, d.starts, axis=0) / d.counts[:, None]
    np.testing.assert_allclose(own["var"], base["var"] * np.exp((wj - wbar) @ alpha), rtol=1e-10)
    with pytest.raises(ModelSpecError, match="'nothere' is not a term"):
        exam_m3.school_effects(w={"nothere": 1})
    with pytest.raises(ModelSpecError, match="2 values"):
        exam_m3.school_effects(w=[1.0])
    with pytest.raises(ModelSpecError, match="school_effects only"):
        exam_m3.population_quantities(w="school")
    with pytest.raises(ModelSpecError, match="'mean'"):
        exam_m3.school_effects(w="mean")
    with pytest.raises(ModelSpecError, match="level"):
        exam_m3.school_effects(level=95)


def test_population_quantities_formulas_and_ses(exam_m3):
    r = exam_m3
    pq = r.population_quantities()
    assert {"pa_variance", "idr_mean_lo", "idr_mean_hi", "idr_var_lo", "idr_var_hi", "vpc", "corr_uv", "corr_pred"} <= set(pq.index)
    assert list(pq.columns) == ["estimate", "std err"]
    xbar = r.model.design.W[:, 1].mean()
    z = stats.norm.ppf(0.9)
    P = r.params

    def pa(x):  # x = (a0, a1, var v)
        return np.exp(x[0] + x[1] * xbar + x[2] / 2)

    names = ["scale:Intercept", "scale:standLRT", "var(v)"]
    assert pq.loc["pa_variance", "estimate"] == pytest.approx(pa(P[names].to_numpy()), rel=1e-12)
    assert pq.loc["pa_variance", "std err"] == pytest.approx(delta_se(r, pa, names), rel=1e-5)
    assert pq.loc["idr_mean_lo", "estimate"] == pytest.approx(P["mean:Intercept"] - z * np.sqrt(P["var(u0)"]))
    se = delta_se(r, lambda x: x[0] + z * np.sqrt(x[1]), ["mean:Intercept", "var(u0)"])
    assert pq.loc["idr_mean_hi", "std err"] == pytest.approx(se, rel=1e-5)
    hi = np.exp(P["scale:Intercept"] + P["scale:standLRT"] * xbar + z * np.sqrt(P["var(v)"]))
    assert pq.loc["idr_var_hi", "estimate"] == pytest.approx(hi, rel=1e-12)
    vpc = P["var(u0)"] / (P["var(u0)"] + pa(P[names].to_numpy()))
    assert pq.loc["vpc", "estimate"] == pytest.approx(vpc, rel=1e-12)
    corr = r.re_correlations().loc["corr(u0,v)"]
    assert pq.loc["corr_uv", "estimate"] == pytest.approx(corr["estimate"], rel=1e-12)
    assert pq.loc["corr_uv", "std err"] == pytest.approx(corr["std err"], rel=1e-8)
    t = r.school_effects()
    assert pq.loc["corr_pred", "estimate"] == pytest.approx(np.corrcoef(t["mean"], t["var"])[0, 1], abs=1e-8)
    assert 0 < pq.loc["corr_pred", "std err"] < 0.5
    # shrinkage: the predictions vary less than the model says the effects do
    assert t["mean"].std() < np.sqrt(P["var(u0)"])


def test_population_quantities_without_random_scale(exam):
    r = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    pq = r.population_quantities()
    s2 = np.exp(r.params["scale:Intercept"])
    assert pq.loc["pa_variance", "estimate"] == pytest.approx(s2)
    assert pq.loc["idr_var_lo", "estimate"] == pytest.approx(s2) == pq.loc["idr_var_hi", "estimate"]
    assert pq.loc["vpc", "estimate"] == pytest.approx(r.params["var(u0)"] / (r.params["var(u0)"] + s2))
    assert np.isnan(pq.loc["corr_uv", "estimate"]) and np.isnan(pq.loc["corr_pred", "estimate"])


def test_predict_known_and_new_schools(exam):
    r = mlsml.fit("normexam ~ standLRT + C(sex)", exam, groups="school", scale_formula="~ standLRT")
    re_ = r.random_effects()
    t = r.school_effects()
    new = pd.DataFrame(
        {"school": [1, 1, 999, 65], "standLRT": [0.0, 1.0, 0.5, -1.0], "sex": ["F", "M", "F", "M"]}, index=[10, 11, 12, 13]
    )
    b, a = r.fe_mean, r.fe_scale
    xb = b["Intercept"] + b["standLRT"] * new["standLRT"] + b["C(sex)[T.M]"] * (new["sex"] == "M")
    wa = a["Intercept"] + a["standLRT"] * new["standLRT"]
    mean = r.predict(new)
    assert mean.name == "mean" and list(mean.index) == [10, 11, 12, 13]
    u = np.array([re_.loc[1, "u0"], re_.loc[1, "u0"], 0.0, re_.loc[65, "u0"]])
    np.testing.assert_allclose(mean, xb + u, rtol=1e-12)
    np.testing.assert_allclose(r.predict(new, conditional=False), xb, rtol=1e-12)
    var = r.predict(new, kind="variance")
    # known school: exp(w'alpha) E(exp v_j | y), which is the school table's variance rescaled
    wbar = r.model.design.W.mean(axis=0)
    ev1 = t.loc[1, "var"] / np.exp(wbar @ a.to_numpy())
    assert var.iloc[0] == pytest.approx(np.exp(wa.iloc[0]) * ev1, rel=1e-12)
    # new school: the population (marginal) variance exp(w'alpha + var(v)/2)
    assert var.iloc[2] == pytest.approx(np.exp(wa.iloc[2] + r.params["var(v)"] / 2), rel=1e-12)
    np.testing.assert_allclose(r.predict(new, kind="variance", conditional=False), np.exp(wa + r.params["var(v)"] / 2), rtol=1e-12)
    with pytest.raises(DataError, match="'school'"):
        r.predict(new.drop(columns="school"))
    assert r.predict(new.drop(columns="school"), conditional=False).shape == (4,)
    with pytest.raises(DataError, match="sex"):
        r.predict(new.drop(columns="sex"))
    with pytest.raises(DataError, match="missing"):
        r.predict(new.assign(standLRT=[np.nan, 0, 0, 0]))
    with pytest.raises(ModelSpecError, match="kind"):
        r.predict(new, kind="median")


def test_cli_writes_school_table(tmp_path):
    from conftest import DATA

    from mlsml.cli import main

    out = tmp_path / "schools.csv"
    code = main(
        [
            "fit",
            str(DATA / "exam.csv"),
            "--formula",
            "normexam ~ standLRT",
            "--groups",
            "school",
            "--scale",
            "~ standLRT",
            "--schools",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    t = pd.read_csv(out, index_col="school")
    assert list(t.columns) == COLUMNS[0:] and len(t) == 65
    assert t["mean_rank"].min() == 1


@pytest.mark.shared
@pytest.mark.slow
def test_london_counts_of_separable_schools(london):
    """The paper's Model 2 finds 320/465 (means) and 117/465 (variances); london_sim is simulated."""
    r = mlsml.fit("y ~ x", london, groups="school")
    t = r.school_effects()
    n_mean = int((t["mean_flag"] != 0).sum())
    n_var = int((t["var_flag"] != 0).sum())
    assert len(t) == 465
    # same shape of result as the paper: most schools separable on the mean, a minority on the variance
    assert 250 < n_mean < 380 and 50 < n_var < 150 and n_var < n_mean
