"""MixWILD 2.0's second stage in a .def job (mlsml.mixregls.secondstage): reading the settings, the
model they define (MixWILD's standardised effects as functions of u0 and v) and the report.

One small simulated job (40 subjects of 8 rows), fitted once per module; the comparison with
MixWILD's own stage-2 program on its example data is validation/mixwild_stage2.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import patsy
import pytest

import mlsml
from mlsml.errors import ModelSpecError
from mlsml.mixregls.deffile import parse_def
from mlsml.mixregls.job import run_job
from mlsml.mixregls.secondstage import INV_SD_COLUMN, ThetaMap, theta_map

SETTINGS = "6 1 {R} 0 0 0 0 0 0 0 0.00001 7 1 200 -999 0 {ncov} 0.15 0 {mls} 0 {nreps} 0 0 {seed} {stage2} {multi2nd} 0"


def _def(
    stage2: int = 1,
    multi2nd: int = 0,
    nreps: int = 10,
    seed: int = 5,
    tail: str | None = None,
    R: int = 0,
    ncov: int = 1,
    mls: int = 0,
) -> str:
    """A job; ``R = 1`` puts column 4 (W, a subject-level column) in the BS variance or, with ``mls = 1``,
    column 3 (x) as a random slope."""
    u_col, u_lab = ("3", "x") if mls else ("4", "W")
    settings = SETTINGS.format(nreps=nreps, seed=seed, stage2=stage2, multi2nd=multi2nd, R=R, ncov=ncov, mls=mls)
    head = ["stage-2 job", "", "data.dat", "job", settings, "1 2", "3"] + ([u_col] if R else []) + ["y", "x"] + ([u_lab] if R else [])
    if tail is None:
        tail = "1 0 0 -1\n5\n4\nScore\nW" if stage2 == 1 else "1 0 -1 -1\n3\n0 1 2\n6\n4\nGrade\nW"
    return "\n".join(head) + "\n" + tail + "\n"


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2job")
    df = mlsml.simulate.simulate_data([8] * 40, beta=(0.0, 0.5), alpha=(-0.5, 0.0), cov=((0.5, 0.1), (0.1, 0.3)), seed=3)
    rng = np.random.default_rng(4)
    w = rng.normal(size=40)
    mean_y = df.groupby("school")["y"].mean().to_numpy()
    score = 1.0 + 2.0 * mean_y + 0.5 * w + rng.normal(0, 0.5, 40)
    grade = np.digitize(2.0 * mean_y + rng.logistic(size=40), [-0.5, 0.5])
    s = df["school"].to_numpy() - df["school"].min()
    score_rows = score[s].copy()
    score_rows[(s == 3)] = -999.0  # subject 3's outcome missing: MixWILD drops its rows from both stages
    dat = np.column_stack([s + 1, df["y"], df["x"], w[s], score_rows, grade[s]])
    np.savetxt(d / "data.dat", dat, fmt="%.10g")
    return d


@pytest.fixture(scope="module")
def gaussian_run(job_dir):
    (job_dir / "job.def").write_text(_def())
    with pytest.warns(mlsml.MissingDataWarning, match="YMISS"):
        return run_job(job_dir / "job.def", stages=False)


def test_stage2_settings_are_read(job_dir):
    job = parse_def(text=_def(stage2=2), path=job_dir / "job.def")
    s2 = job.stage2
    assert s2.family == "ordinal" and s2.counts == (1, 0, -1, -1) and s2.categories == (0.0, 1.0, 2.0)
    assert s2.y_col == 6 and s2.cols[0] == (4,) and s2.labels[0] == ("W",) and s2.ndraws == 10 and s2.seed == 5
    assert parse_def(text=_def(stage2=0, tail=""), path=job_dir / "job.def").stage2 is None


def test_stage2_job_is_res_stage2_with_mixwilds_regressors(gaussian_run, job_dir):
    run = gaussian_run
    res, s2 = run.results, run.stage2
    assert res.ngroups == 39  # subject 3 dropped from stage 1 too (its stage-2 outcome is missing)
    a, b, c = (float(x) for x in theta_map(res))
    S = res.cov_re.to_numpy()
    np.testing.assert_allclose(a, 1 / np.sqrt(S[0, 0]), rtol=1e-12)
    # theta2 = b v + c u0 is uncorrelated with theta1 and has unit variance under Sigma
    M = np.array([[a, 0.0], [c, b]])
    np.testing.assert_allclose(M @ S @ M.T, np.eye(2), atol=1e-10)
    dat = np.loadtxt(job_dir / "data.dat")
    schools = pd.DataFrame({"_cluster": dat[:, 0].astype(int), "Score": dat[:, 4], "W": dat[:, 3]}).query("Score != -999")
    schools = schools.groupby("_cluster", as_index=False).first()
    direct = res.stage2(f"Score ~ W + I({a!r} * u0) + I({b!r} * v + {c!r} * u0)", data=schools, ndraws=10, seed=5)
    np.testing.assert_allclose(s2.params.to_numpy(), direct.params.to_numpy(), rtol=1e-10)
    text = run.report
    for label in ("Second stage: mixreg (continuous)", "Locat_1", "Scale_1", "Residual.Varianc", "Number of replications =        10"):
        assert label in text
    assert not re.search(r"^Locat_1\*Scale", text, re.M)  # PTO = -1: no interaction in the table
    assert re.search(r"^W\s+-?\d", text, re.M)  # the level-2 covariate's row


def test_ordinal_stage2_job(job_dir):
    (job_dir / "ord.def").write_text(_def(stage2=2))
    run = run_job(job_dir / "ord.def", stages=False)  # its columns have no YMISS: every subject is kept
    assert run.results.ngroups == 40 and run.stage2.nobs == 40
    assert run.stage2.family == "ordinal" and list(run.stage2.params.index)[-2:] == ["0/1", "1/2"]
    assert "Threshold 0/1" in run.report and "mixors (ordinal)" in run.report


def test_stage2_type_outside_mixwilds_is_refused(job_dir):
    with pytest.raises(ModelSpecError, match="must be 0 \\(no second stage\\)"):
        parse_def(text=_def(stage2=7, tail="1 0 0 -1\n5\n4\nScore\nW"), path=job_dir / "job.def")


def test_multilevel_second_stage(job_dir):
    """MULTI2ND = 1: an outcome constant within subjects is MixWILD's single-level stage 2 (adjustData2); one that
    varies within subjects (y, column 2, with the level-1 covariate x) is the multilevel stage 2, run as
    res.stage2(multilevel=True) on the level-1 rows (refused before issue 13's multilevel stage 2), and so is an
    ordinal one (STAGE2 = 2, a random-intercept cumulative logit; refused before h13g's non-gaussian families)."""
    (job_dir / "ml.def").write_text(_def(stage2=1, multi2nd=1, tail="1 0 -1 -1\n2\n3\nY\nX"))
    run = run_job(job_dir / "ml.def", stages=False)
    s2 = run.stage2
    assert s2.info["multilevel"] and s2.info["level1_rows"] == 320 and s2.nobs == 40
    assert list(s2.params.index)[-2:] == ["var(1|_cluster)", "var(resid)"]
    a = float(theta_map(run.results)[0])
    dat = pd.DataFrame(np.loadtxt(job_dir / "data.dat")[:, :3], columns=["_cluster", "Y", "X"])
    direct = run.results.stage2(f"Y ~ X + I({a!r} * u0)", data=dat, ndraws=10, seed=5, multilevel=True)
    np.testing.assert_allclose(s2.params.to_numpy(), direct.params.to_numpy(), rtol=1e-10)
    assert "Level 1 observations = 320" in run.report and re.search(r"^Random.Int.Var\s+\d", run.report, re.M)
    assert "the second stage is multilevel" in run.report
    (job_dir / "mlo.def").write_text(_def(stage2=2, multi2nd=1, tail="1 0 -1 -1\n3\n0 1 2\n6\n3\nGrade\nX"))
    text = (job_dir / "mlo.def").read_text()
    rows = np.loadtxt(job_dir / "data.dat")
    rows[::2, 5] = (rows[::2, 5] + 1) % 3  # the grade now varies within subjects
    np.savetxt(job_dir / "data_o.dat", rows, fmt="%.10g")
    (job_dir / "mlo.def").write_text(text.replace("data.dat", "data_o.dat"))
    run = run_job(job_dir / "mlo.def", stages=False)
    assert run.stage2.family == "ordinal" and run.stage2.info["multilevel"] and run.stage2.nobs == 40
    assert list(run.stage2.params.index)[-3:] == ["0/1", "1/2", "var(1|_cluster)"]
    dat = pd.DataFrame(rows[:, [0, 2, 5]], columns=["_cluster", "X", "Grade"])
    direct = run.results.stage2(f"Grade ~ X + I({a!r} * u0)", data=dat, family="ordinal", ndraws=10, seed=5, multilevel=True)
    np.testing.assert_allclose(run.stage2.params.to_numpy(), direct.params.to_numpy(), rtol=1e-8)
    assert re.search(r"^Random.Int.Var\s+\d", run.report, re.M) and "ordinal random-intercept model" in run.report
    (job_dir / "ml2.def").write_text(_def(stage2=2, multi2nd=1))
    run = run_job(job_dir / "ml2.def", stages=False)
    assert "MULTI2ND = 1: the stage-2 outcome is constant within subjects" in run.report
    assert run.stage2.family == "ordinal" and run.stage2.nobs == 40


def test_nominal_stage2_job_with_mixwilds_reference_category(job_dir):
    """STAGE2 = 4 (mixno): the categories in ICODE order, ICODE(1) = 2 the reference; the run is res.stage2 with
    family='nominal' on the recoded outcome."""
    (job_dir / "nom.def").write_text(_def(stage2=4, tail="1 0 -1 -1\n3\n2 0 1\n6\n4\nGrade\nW"))
    run = run_job(job_dir / "nom.def", stages=False)
    s2 = run.stage2
    assert s2.family == "nominal" and s2.nobs == 40 and s2.params.size == 6
    assert list(s2.params.index[:3]) == ["Intercept[1]", "W[1]", "I(" + run.report.split("Locat_1 = ")[1].split("\n")[0] + ")[1]"]
    assert "Category 0 vs Category 2" in run.report and "Category 1 vs Category 2" in run.report
    dat = np.loadtxt(job_dir / "data.dat")
    schools = (
        pd.DataFrame({"_cluster": dat[:, 0].astype(int), "Grade": dat[:, 5], "W": dat[:, 3]})
        .groupby("_cluster", as_index=False)
        .first()
    )
    schools["Grade"] = schools["Grade"].map({2.0: 0, 0.0: 1, 1.0: 2})
    a = float(theta_map(run.results)[0])
    direct = run.results.stage2(f"Grade ~ W + I({a!r} * u0)", data=schools, family="nominal", ndraws=10, seed=5)
    np.testing.assert_allclose(s2.params.to_numpy(), direct.params.to_numpy(), rtol=1e-8)


def _theta_round_trip(res):
    """MixWILD's theta from effects built out of theta by the model's own definition (Sigma_j = D_j L0 L0' D_j,
    v plus gamma theta1^2 under the quadratic association): the map must give theta back, and so must its
    formula expressions evaluated by patsy."""
    tm = ThetaMap.from_fit(res)
    J, d = res.ngroups, len(tm.effects)
    z = np.random.default_rng(0).normal(size=(J, d))
    sig = res.likelihood.integrand.school_covariances(np.asarray(res.theta, dtype=float))
    b = np.einsum("jde,je->jd", np.linalg.cholesky(sig), z)
    if tm.quad is not None:
        b[:, tm.n_loc] += tm.quad * (b[:, 0] / np.sqrt(sig[:, 0, 0])) ** 2
    np.testing.assert_allclose(tm.values(b), z, atol=1e-10)
    frame = pd.DataFrame(b, columns=list(tm.effects))
    if tm.inv_sd is not None:
        frame[INV_SD_COLUMN] = tm.inv_sd
    for i, expr in enumerate(tm.expressions()):
        np.testing.assert_allclose(patsy.dmatrix(f"I({expr}) - 1", frame)[:, 0], z[:, i], atol=1e-10)
    return tm


@pytest.mark.filterwarnings("ignore::mlsml.errors.QuadratureWarning")  # 7 points, as the job asks: enough for this check
def test_stage2_after_bs_variance_covariates_and_quadratic_association(job_dir):
    """R = 1 (ln sd(u0_j) depends on W) with NCOV = 2: theta1 = u0 / sd_j(u0) (a per-subject column of the
    stage-2 data), theta2 the scale's own part after the quadratic term is taken off."""
    (job_dir / "bsq.def").write_text(_def(R=1, ncov=2, nreps=5, tail="0 0 0 0\n5\nScore"))
    with pytest.warns(mlsml.MissingDataWarning, match="YMISS"):
        run = run_job(job_dir / "bsq.def", stages=False)
    res = run.results
    assert res.layout.bs_terms == ("Intercept", "W") and res.layout.quad_assoc
    tm = _theta_round_trip(res)
    assert tm.inv_sd is not None and tm.quad is not None and INV_SD_COLUMN in run.stage2.formula
    assert run.stage2.params.index.size == 5 and "Locat_1*Scale" in run.report


def test_stage2_after_random_slopes(job_dir):
    """MLS = 1 (MIXREGMLS): Locat_1, Locat_2 (intercept and slope of x) and Scale_1, with one Locat_k*Scale
    interaction per location effect."""
    (job_dir / "mls.def").write_text(_def(R=1, mls=1, nreps=5, tail="-1 0 0 0\n5\nScore"))
    with pytest.warns(mlsml.MissingDataWarning, match="YMISS"):
        run = run_job(job_dir / "mls.def", stages=False)
    tm = _theta_round_trip(run.results)
    assert tm.effects == ("u0", "u1", "v") and tm.labels == ["Locat_1", "Locat_2", "Scale_1"]
    assert "Intercept" not in run.stage2.params.index and run.stage2.params.index.size == 6  # PFIXED = -1
    for label in ("Locat_2 ", "Locat_1*Scale", "Locat_2*Scale"):
        assert label in run.report


def test_stage2_column_outside_the_file_is_refused(job_dir):
    with pytest.raises(ModelSpecError, match="stage-2 column number 9 is outside 1..NVAR = 6"):
        parse_def(text=_def(tail="1 0 0 -1\n9\n4\nScore\nW"), path=job_dir / "job.def")


def test_mixwilds_own_stage2_jobs_are_read():
    """The two MixWILD 2.0 jobs run for validation/REPORT.md section 8 (continuous and ordinal)."""
    ref = Path(__file__).resolve().parents[1] / "validation" / "reference" / "mixwild_stage2"
    ex1 = parse_def(ref / "ex1.def").stage2
    assert (ex1.family, ex1.counts, ex1.y_label, ex1.ndraws, ex1.seed) == ("gaussian", (0, 0, 0, 0), "BMI", 200, 13)
    ordinal = parse_def(ref / "ord.def").stage2
    assert (ordinal.family, ordinal.categories, ordinal.y_col, ordinal.ndraws) == ("ordinal", (0.0, 1.0, 2.0), 12, 100)


def test_stage2_from_a_separate_level2_file(job_dir, gaussian_run):
    """SEPFILE = 1: the level-2 data come from their own file (NVARSEP columns, its id column); the rows of
    stage 1 are then not filtered by the stage-2 columns."""
    dat = np.loadtxt(job_dir / "data.dat")
    ids, first = np.unique(dat[:, 0], return_index=True)
    level2 = np.column_stack([dat[first, 3], ids, dat[first, 4]])  # W, id, Score (subject 4's Score is -999)
    np.savetxt(job_dir / "level2.dat", level2, fmt="%.10g")
    text = _def().replace(" 1 0 0\n", " 1 0 1\n", 1).replace("1 0 0 -1\n", "1 0 0 -1\nlevel2.dat\n3 2\n", 1)
    text = text.replace("\n5\n4\nScore", "\n3\n1\nScore")
    (job_dir / "sep.def").write_text(text)
    job = parse_def(job_dir / "sep.def")
    assert job.stage2.data_file == "level2.dat" and (job.stage2.nvar, job.stage2.id_col) == (3, 2)
    with pytest.warns(mlsml.MissingDataWarning, match="level2.dat"):
        run = run_job(job_dir / "sep.def", stages=False)
    assert run.results.ngroups == 40 and run.stage2.nobs == 39  # stage 1 keeps subject 4; stage 2 does not
    np.testing.assert_allclose(run.stage2.params["W"], gaussian_run.stage2.params["W"], atol=0.3)
