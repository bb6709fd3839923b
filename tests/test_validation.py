"""A small, fast subset of the validation suite (validation/), so CI guards it.

Uses only committed files: validation/reference/ (copies of the MIXREGLS, lme4 and
brms results) and the small data sets in tests/data. The full comparisons, including
London and the simulation study, run with ``python -m validation``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import mlsml
from validation import convert, frequentist, simstudy
from validation.common import REFERENCE

# MIXREGLS runs (raw parameters + covariance); the MIXREGMLS run m4 prints our scale directly
MIXREGLS_FILES = [p for p in sorted((REFERENCE / "mixregls").glob("*.json")) if "raw_covariance" in p.read_text()]


@pytest.mark.parametrize("path", MIXREGLS_FILES, ids=lambda p: p.stem)
def test_conversion_reproduces_converted_block(path):
    """Our conversion of MIXREGLS's raw parameters (ALPHA_0, TAU, LocEff, SD) and its raw
    covariance reproduces the reference file's converted estimates and delta-method SEs."""
    ref = json.loads(path.read_text())
    ours = convert.from_reference_json(ref)
    for name, row in ours.iterrows():
        theirs = ref["converted"][convert.reference_key(name)]
        assert row["estimate"] == pytest.approx(theirs["estimate"], rel=1e-12, abs=1e-14), name
        assert row["se"] == pytest.approx(theirs["se"], rel=1e-10), name


def test_all_mixregls_runs_are_covered():
    assert len(MIXREGLS_FILES) == 20


def test_conversion_formulas_by_hand():
    order = ["beta_Intercept", "ln_sigma2_u", "alpha_Intercept", "tau_loc", "tau_scale"]
    raw = np.array([0.1, np.log(0.04), -0.8, 0.03, 0.04])
    V = np.diag([1e-4, 4e-2, 1e-3, 1e-4, 4e-4])
    est, cov = convert.mixregls_to_ours(raw, V, order)
    assert est["var(u0)"] == pytest.approx(0.04)
    assert est["var(v)"] == pytest.approx(0.03**2 + 0.04**2)
    assert est["cov(u0,v)"] == pytest.approx(0.2 * 0.03)
    assert est["corr(u0,v)"] == pytest.approx(0.6)
    assert est["scale:Intercept"] == -0.8  # TAU is our alpha: unchanged
    # delta method: d var(u0) / d ln_sigma2_u = var(u0)
    assert cov.loc["var(u0)", "var(u0)"] == pytest.approx(0.04**2 * 4e-2)
    assert cov.loc["var(v)", "var(v)"] == pytest.approx((2 * 0.03) ** 2 * 1e-4 + (2 * 0.04) ** 2 * 4e-4)


def test_seed_sim_model3_agrees_with_mixregls(seed_sim):
    """The report's MIXREGLS comparison in miniature: seed_sim, Model 3."""
    ref = json.loads((REFERENCE / "mixregls" / "seed_sim__m3.json").read_text())
    theirs = convert.from_reference_json(ref)
    res = mlsml.fit("y ~ x", seed_sim, groups="school", scale_formula="~ x")
    exact = ref["independent_check"]["independent_loglik_by_nq"]["30"]
    assert res.llf == pytest.approx(exact, abs=1e-5)
    est = pd.concat([res.params, res.re_correlations()["estimate"]])
    se = pd.concat([res.bse, res.re_correlations()["std err"]])
    for name in theirs.index:
        assert abs(est[name] - theirs.loc[name, "estimate"]) <= max(1e-4, 0.01 * theirs.loc[name, "se"]), name
        assert se[name] == pytest.approx(theirs.loc[name, "se"], rel=5e-3), name


def test_lme4_random_slope_and_loglik_at_their_estimates(exam):
    """lme4's RS fit on exam: maxima agree to 1e-5, and our likelihood at lme4's estimates
    equals lme4's logL (the check the report uses when an optimiser stops short)."""
    s, t = frequentist.compare_r(REFERENCE / "r" / "exam__lme4__RS.json", fit=_fit_uncached)
    assert s["result"] == "PASS"
    assert abs(s["diff"]) <= 1e-5
    assert abs(s["ours at their estimates - theirs"]) <= 1e-5


def _fit_uncached(dataset, model):
    return frequentist.fit_summary_for(dataset, model, cache=False)


def test_judge_rule():
    assert frequentist._judge(3e-6, 1e-6, False, True)[0]
    ok, note = frequentist._judge(3e-5, 2e-6, False, True)  # the other optimiser stopped short
    assert ok and "stopped" in note
    assert not frequentist._judge(3e-5, 3e-5, False, True)[0]  # the likelihoods themselves differ
    assert not frequentist._judge(-3e-5, 0.0, False, True)[0]  # we are lower: fail


def test_simulation_data_and_one_replication():
    a = simstudy.make_data("seed", 3)
    b = simstudy.make_data("seed", 3)
    pd.testing.assert_frame_equal(a, b)  # seeds fixed: replications are reproducible
    assert a["school"].nunique() == 100 and len(a) == 2500
    x_means = a.groupby("school")["x"].mean()
    assert 0.1 < x_means.var() < 0.35  # ICC of x about 0.2
    row = simstudy.run_one(("seed", 3, False))
    assert row["converged"]
    assert abs(row["est:mean:x"] - 0.7) < 4 * row["se:mean:x"]


def test_summaries_of_a_known_frame():
    truth = {"mean:x": 1.0}
    df = pd.DataFrame(
        {"converged": [True] * 4 + [False], "est:mean:x": [0.9, 1.1, 1.0, 1.5, 9.0], "se:mean:x": [0.1, 0.1, 0.1, 0.1, 0.1]}
    )
    s = simstudy.summarise(df, truth)
    assert s.loc["mean:x", "n"] == 4  # the failed fit is excluded
    assert s.loc["mean:x", "bias"] == pytest.approx(0.125)
    assert s.loc["mean:x", "Wald coverage %"] == pytest.approx(75.0)
    assert s.loc["mean:x", "RMSE"] == pytest.approx(np.sqrt((0.01 + 0.01 + 0 + 0.25) / 4))


def test_replication_reports_missing_issue4_api_or_uses_it(tmp_path):
    """The paper-replication code for issue 4's API (school_effects, population_quantities,
    mlsml.plots) is written against the contract names: without them it says which are
    missing; with contract-shaped stand-ins it produces the counts and Figures 1-4."""
    import types

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from validation import replication

    class Bare:
        pass

    text = "\n".join(replication._issue4({"Model 2": Bare()}, figures=tmp_path))
    assert "missing" in text and "school_effects" in text and "population_quantities" in text

    rng = np.random.default_rng(0)
    J = 50
    effects = pd.DataFrame(
        {
            "n": rng.integers(10, 200, J),
            "mean": rng.normal(0, 0.2, J),
            "var": np.exp(rng.normal(-0.9, 0.15, J)),
            "mean_flag": rng.choice([-1, 0, 1], J),
            "var_flag": rng.choice([-1, 0, 0, 1], J),
        }
    )
    pq = pd.DataFrame({"estimate": [0.43, 0.3], "std err": [0.01, 0.02]}, index=["pa_variance", "idr_var_lo"])

    class WithApi:
        def school_effects(self, w=None, level=0.95):
            return effects

        def population_quantities(self, w=None):
            return pq

    def figure(*args):
        fig, _ = plt.subplots()
        return fig

    plots = types.SimpleNamespace(mean_vs_variance=figure, caterpillar=figure, compare_models_plot=figure)
    fits = {name: WithApi() for name in ("Model 2", "Model 3", "Model 4", "Model 5")}
    text = "\n".join(replication._issue4(fits, plots=plots, figures=tmp_path))
    assert f"**{int((effects['mean_flag'] != 0).sum())} of {J}**" in text
    assert f"**{int((effects['var_flag'] != 0).sum())} of {J}**" in text
    assert "pa_variance" in text
    assert sorted(p.name for p in tmp_path.glob("fig*.png")) == [
        "fig1_mean_vs_variance.png",
        "fig2_caterpillar.png",
        "fig3_models3_4.png",
        "fig4_models5_3.png",
    ]


def test_mixwild_stage2_reference_files_and_its_pooling_divisor():
    """The committed MixWILD stage-2 outputs parse, and its crafted pooling run (EB variances 0,
    M = 2) shows SEs sqrt(2) times the completed-data ML SEs: the within variance over M - 1."""
    from validation import mixwild_stage2 as mw

    table = mw._parse_table(mw.REF / "ex1_stage2.out")
    assert list(table.index) == ["Intercept", "theta1", "theta2", "theta1:theta2", "var(resid)"]
    data = np.loadtxt(mw.REF / "check_pooling_data.dat")
    y, X = data[:, 1], data[:, 2:6]
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    s2 = np.sum((y - X @ beta) ** 2) / len(y)
    se = np.sqrt(np.diag(s2 * np.linalg.inv(X.T @ X)))
    printed = mw._parse_table(mw.REF / "check_pooling.out")
    np.testing.assert_allclose(printed["se"].to_numpy()[:4] / se, np.sqrt(2.0), rtol=2e-4)  # 5 printed digits
    np.testing.assert_allclose(printed["estimate"].to_numpy()[:4], beta, atol=1e-5)


def test_stage2_simulation_summary_of_a_known_frame():
    from validation import stage2

    rows = []
    for rep, est in enumerate([0.8, 1.2, 1.0]):
        for method in ("mi", "joint"):
            rows.append(
                dict(
                    family="gaussian",
                    n=5,
                    rep=rep,
                    method=method,
                    param="u0",
                    truth=1.0,
                    estimate=est,
                    se=0.1,
                    lo=est - 0.15,
                    hi=est + 0.15,
                    fmi=0.3,
                    stage1_converged=True,
                    joint_converged=True,
                )
            )
    summ = stage2.summarise(pd.DataFrame(rows))
    row = summ.loc[("gaussian", 5, "u0", "mi")]
    assert row["mean est"] == pytest.approx(1.0) and row["coverage"] == pytest.approx(1 / 3) and row["reps"] == 3
    data, schools = stage2.make_data("binomial", 5, 1)
    assert data.shape == (500, 3) and set(schools["Y"].unique()) <= {0.0, 1.0}


def test_mixwild_simulation_job_writer(tmp_path):
    """The simulated replication MixWILD runs: mlsml's own .def reader finds the intended job (stage 1
    y ~ x with x in the WS variance, stage 2 Y on Locat_1 and Scale_1 only) and data.dat holds the data."""
    from mlsml.mixregls.deffile import parse_def, read_dat
    from validation import mixwild_stage2_sim as sim

    df, schools = sim.make_data(5, 3)  # replays simulate_data's draws and checks them
    sim.write_job(tmp_path, df, schools, nreps=7, seed=11)
    job = parse_def(tmp_path / "lsboth_random_mixblank.def")
    assert (job.id_col, job.y_col, job.x_cols, job.w_cols, job.layout) == (1, 2, (3,), (3,), "mixwild_2")
    assert job.setting("NCOV") == 1 and job.stage2.kind == 1 and job.stage2.counts == (0, 0, 0, -1)
    assert (job.stage2.y_col, job.stage2.ndraws, job.stage2.seed) == (4, 7, 11)
    dat = read_dat(tmp_path / "data.dat", 4)
    Y = schools.set_index("school")["Y"].reindex(df["school"]).to_numpy()
    np.testing.assert_allclose(dat, np.column_stack([df["school"], df["y"], df["x"], Y]), rtol=1e-9, atol=1e-9)
    assert sim.truth_theta()["theta1"] == pytest.approx(0.6) and sim.truth_theta()["theta2"] == pytest.approx(0.24**0.5)
