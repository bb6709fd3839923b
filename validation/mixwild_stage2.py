"""Stage 2 against MixWILD 2.0's own stage-2 program on its example data.

MixWILD 2.0 (``MIXREGLS_both`` + ``stage2only`` + ``mixreg``, commit ``7200eeef0023``) was built
from source and run on the GUI's ``ExampleData.csv`` (``../shared/data/mixwild_examples/``):
stage 1 ``POS_AFFECT ~ WEEKEND`` with ``WEEKEND`` in the WS variance and a random scale
(linear location effect); stage 2 the subject-level ``BMI`` on the random location, the random
scale and their product, 200 replications. Its inputs and outputs are in
``validation/reference/mixwild_stage2/`` (README there: build and runs, and two crafted runs of
``stage2only`` that isolate its draws and its pooling).

MixWILD's stage-2 regressors are its standardised random effects: ``theta1 = u / sigma_u``
and ``theta2`` the part of the random scale independent of the location,
``v = LocEff * theta1 + SD * theta2``. mlsml's formula refers to ``u0`` and ``v`` in their own
units, so the comparison writes MixWILD's regressors as linear functions of them
(``theta1 = a u0``, ``theta2 = b v + c u0`` with the stage-1 estimates) inside ``I(...)``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .common import HERE, SHARED, md_table

REF = HERE / "reference" / "mixwild_stage2"
DATA = SHARED / "data" / "mixwild_examples" / "ExampleData.csv"
NDRAWS = 200
SEED = 20_261_128
#: MixWILD's printed stage-2 table (ex1_stage2.out) is parsed; these are its row labels.
LABELS = {
    "Intercept": "Intercept",
    "Locat_1": "theta1",
    "Scale_1": "theta2",
    "Locat_1*Scale": "theta1:theta2",
    "Residual.Varianc": "var(resid)",
}


def _parse_table(path: Path) -> pd.DataFrame:
    rows = {}
    take = False
    for line in path.read_text().splitlines():
        if line.startswith("Variable"):
            take = True
            continue
        label = re.sub(r"[^\x20-\x7e]", "", line[:16]).strip()  # "Locat_1*Scale" carries a char(1) (an I1 written as A1)
        if take and label in LABELS:
            parts = line[16:].split()
            rows[LABELS[label]] = (float(parts[0]), float(parts[1]))
    return pd.DataFrame(rows, index=["estimate", "se"]).T


def _stage1_loglik(path: Path) -> float:
    text = path.read_text().split("Model WITH RANDOM Scale")[-1]
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("Log Likelihood"))
    return float(line.split("=")[1])


def _fit_stage1():
    import mlsml

    df = pd.read_csv(DATA)
    d = df[df["BMI"] != -999]  # MixWILD drops the rows with a missing stage-2 variable from stage 1 too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("POS_AFFECT ~ WEEKEND", d, groups="ID", scale_formula="~ WEEKEND", missing_code=-999)
    schools = d[d["POS_AFFECT"] != -999].groupby("ID", as_index=False)["BMI"].first()
    return res, schools


def _theta_map(res) -> tuple[float, float, float]:
    """``theta1 = a u0``, ``theta2 = b v + c u0`` from the fit's Sigma (MIXREGLS's ALPHA, LocEff, SD)."""
    S = res.cov_re.to_numpy()
    su = np.sqrt(S[0, 0])
    loceff = S[0, 1] / su
    sd = np.sqrt(S[1, 1] - loceff**2)
    return 1.0 / su, 1.0 / sd, -loceff / (sd * su)


def _emulate_mixwild(y: np.ndarray, means: np.ndarray, covs: np.ndarray, ndraws: int, transposed: bool, mixwild_pooling: bool, rng):
    """MI as MixWILD's ``stage2only`` does it (normal draws, ML OLS), with its draws and pooling or the textbook ones."""
    J = len(y)
    L = np.linalg.cholesky(covs)
    Q, U = [], []
    for _ in range(ndraws):
        z = rng.standard_normal((J, 2))
        if transposed:  # simvals = z' L (row vector times the lower factor): covariance L'L
            t = means + np.einsum("ja,jab->jb", z, L)
        else:
            t = means + np.einsum("jab,jb->ja", L, z)
        X = np.column_stack([np.ones(J), t[:, 0], t[:, 1], t[:, 0] * t[:, 1]])
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        s2 = float(np.sum((y - X @ beta) ** 2) / J)  # mixreg: ML residual variance
        cov = s2 * np.linalg.inv(X.T @ X)
        Q.append(np.append(beta, s2))
        U.append(np.append(np.diag(cov), 2 * s2**2 / J))
    Q, U = np.asarray(Q), np.asarray(U)
    M = len(Q)
    B = Q.var(axis=0, ddof=1)
    if mixwild_pooling:  # sum(U) / (M - 1) + B * (1 + 1 / M) with 1 / M an integer division (0)
        total = U.sum(axis=0) / (M - 1) + B
    else:
        total = U.mean(axis=0) + (1 + 1 / M) * B
    return pd.DataFrame({"estimate": Q.mean(axis=0), "se": np.sqrt(total), "mc_se": np.sqrt(B / M)}, index=list(LABELS.values()))


def compute() -> dict:
    """Every number of the section (stage 1, the posterior, stage 2 four ways, the two crafted checks)."""
    res, schools = _fit_stage1()
    a, b, c = _theta_map(res)
    out = {"llf": res.llf, "llf_mixwild": _stage1_loglik(REF / "ex1_stage1.out"), "J": res.ngroups, "N": res.nobs}
    # the posterior of theta: MixWILD's EB file against mlsml's exact moments, mapped
    from mlsml.predict import posterior_likelihood, posterior_moments

    mean, cov = posterior_moments(posterior_likelihood(res), res.theta)
    A = np.array([[a, 0.0], [c, b]])
    m_t = mean @ A.T
    c_t = np.einsum("ab,jbc,dc->jad", A, cov, A)
    eb = np.loadtxt(REF / "ex1_ebvar.dat")
    ids = pd.Index(res.model.design.group_labels)
    pos = ids.get_indexer(eb[:, 0].astype(int))
    out["eb_mean_diff"] = float(np.abs(eb[:, 1:3] - m_t[pos]).max())
    sd_mw = np.sqrt(eb[:, [3, 5]])
    sd_ml = np.sqrt(c_t[pos][:, [0, 1], [0, 1]])
    out["eb_sd_diff"] = float(np.abs(sd_mw - sd_ml).max())
    out["eb_cov_diff"] = float(np.abs(eb[:, 4] - c_t[pos][:, 1, 0]).max())
    # stage 2: mlsml
    t1, t2 = f"I({a!r} * u0)", f"I({b!r} * v + {c!r} * u0)"
    formula = f"BMI ~ {t1} + {t2} + I(({a!r} * u0) * ({b!r} * v + {c!r} * u0))"
    names = dict(zip(["Intercept", t1, t2], ["Intercept", "theta1", "theta2"]))
    tables = {}
    for key, unc in (("mlsml exact, EB draws", False), ("mlsml exact, proper MI", True)):
        s2 = res.stage2(formula, data=schools, ndraws=NDRAWS, seed=SEED, stage1_uncertainty=unc)
        idx = [names.get(n, "theta1:theta2" if n.startswith("I((") else n) for n in s2.params.index]
        mc = np.sqrt(s2.info["between"] / s2.ndraws)
        tables[key] = pd.DataFrame({"estimate": s2.params.to_numpy(), "se": s2.bse.to_numpy(), "mc_se": mc}, index=idx)
        tables[key].loc["var(resid)", "mc_se"] = np.sqrt(s2.draws["var(resid)"].var() / s2.ndraws)
    y = schools.set_index("ID").loc[eb[:, 0].astype(int), "BMI"].to_numpy(dtype=float)
    covs = np.stack([[[e[3], e[4]], [e[4], e[5]]] for e in eb])
    rng = np.random.default_rng(SEED)
    tables["MixWILD emulated (its draws and pooling)"] = _emulate_mixwild(y, eb[:, 1:3], covs, NDRAWS, True, True, rng)
    tables["normal approx., textbook draws and pooling"] = _emulate_mixwild(y, eb[:, 1:3], covs, NDRAWS, False, False, rng)
    out["tables"] = tables
    out["mixwild"] = _parse_table(REF / "ex1_stage2.out")
    # crafted check 1: the draws' covariance (one replication, 1182 subjects, EB covariance [[1, .9], [.9, 1]])
    last = np.loadtxt(REF / "check_draws_lastrep.dat")
    out["draws_cov"] = np.cov(last[:, 3:5].T)
    L = np.linalg.cholesky(np.array([[1.0, 0.9], [0.9, 1.0]]))
    out["LtL"] = L.T @ L
    # crafted check 2: zero EB variance, M = 2: every replication identical, B = 0
    data = np.loadtxt(REF / "check_pooling_data.dat")
    yy, X = data[:, 1], data[:, 2:6]
    beta, *_ = np.linalg.lstsq(X, yy, rcond=None)
    s2ml = float(np.sum((yy - X @ beta) ** 2) / len(yy))
    se_ml = np.sqrt(np.diag(s2ml * np.linalg.inv(X.T @ X)))
    printed = _parse_table(REF / "check_pooling.out")
    out["pooling_ratio"] = printed["se"].to_numpy()[:4] / se_ml
    return out


def section() -> str:
    lines = ["## 8. Stage 2 against MixWILD's stage-2 program (ExampleData)", ""]
    if not DATA.exists():
        return "\n".join(lines + [f"**Not produced**: `{DATA}` is absent (it is in ../shared).", ""])
    r = compute()
    ok_llf = abs(r["llf"] - r["llf_mixwild"]) < 1e-3
    lines += [
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"**Stage 1** (N = {r['N']}, J = {r['J']}): log-likelihood mlsml {r['llf']:.4f}, MixWILD {r['llf_mixwild']:.3f} "
        f"(printed to 3 decimals): **{'PASS' if ok_llf else 'DIFFERS'}** (agreement to the printed digits).",
        "",
        f"**The posterior of the school effects** (MixWILD's EB file against mlsml's exact posterior moments mapped to "
        f"theta): largest difference of the means {r['eb_mean_diff']:.2g}, of the SDs {r['eb_sd_diff']:.2g}, of the "
        f"covariances {r['eb_cov_diff']:.2g}. The moments agree; MixWILD then draws from the normal distribution with "
        "these moments, mlsml from the exact posterior (the random scale's posterior is skewed in small clusters).",
        "",
        f"**Stage 2**, `BMI ~ theta1 + theta2 + theta1:theta2`, {NDRAWS} imputations (MC se: the Monte Carlo "
        "standard error of the pooled estimate, sqrt(B/M)):",
        "",
    ]
    mw = r["mixwild"]
    rows = []
    for name in mw.index:
        row = {"parameter": name, "MixWILD": f"{mw.loc[name, 'estimate']:.4f} ({mw.loc[name, 'se']:.4f})"}
        for key, tab in r["tables"].items():
            row[key] = f"{tab.loc[name, 'estimate']:.4f} ({tab.loc[name, 'se']:.4f}) ±{tab.loc[name, 'mc_se']:.3f}"
        rows.append(row)
    lines += [md_table(pd.DataFrame(rows), index=False), ""]
    emu = r["tables"]["MixWILD emulated (its draws and pooling)"]
    textbook = r["tables"]["normal approx., textbook draws and pooling"]
    exact = r["tables"]["mlsml exact, EB draws"]
    z1 = abs(textbook.loc["theta1", "estimate"] - emu.loc["theta1", "estimate"]) / np.hypot(
        textbook.loc["theta1", "mc_se"], emu.loc["theta1", "mc_se"]
    )
    z2 = abs(exact.loc["theta1:theta2", "estimate"] - textbook.loc["theta1:theta2", "estimate"]) / np.hypot(
        exact.loc["theta1:theta2", "mc_se"], textbook.loc["theta1:theta2", "mc_se"]
    )
    z = (emu["estimate"] - mw["estimate"]) / np.hypot(emu["mc_se"], emu["mc_se"])
    lines += [
        f"MixWILD's numbers are reproduced by its own procedure written out in Python within Monte Carlo error "
        f"(largest |difference| / MC se of the difference: {np.abs(z).max():.2f}; different random numbers). "
        "mlsml's estimates differ from MixWILD's by more than that, for two reasons the other columns separate: "
        f"MixWILD's transposed Cholesky factor (item 3 below) moves the theta1 coefficient from "
        f"{textbook.loc['theta1', 'estimate']:.3f} (normal draws with the right factor) to "
        f"{emu.loc['theta1', 'estimate']:.3f}, and the exact posterior instead of its normal approximation moves the "
        f"theta1:theta2 coefficient from {textbook.loc['theta1:theta2', 'estimate']:.3f} to "
        f"{exact.loc['theta1:theta2', 'estimate']:.3f} (the product of the two effects is where the skewness of the "
        f"random scale's posterior shows): {z1:.1f} and {z2:.1f} Monte Carlo SEs of the differences.",
        "",
        "**How MixWILD's stage 2 differs from Rubin's rules and exact draws** (read in `stage2only.f90`, and checked by "
        "the two crafted runs):",
        "",
        "1. *Within-imputation variance*: `totalvarhats / (nvalid - 1)`, the sum of the M completed-data variances "
        f"divided by M - 1 instead of M. Crafted run (EB variances 0, M = 2, so B = 0): MixWILD's SEs are "
        f"{', '.join(f'{x:.4f}' for x in r['pooling_ratio'])} times the completed-data (ML) SEs: sqrt(2) = 1.4142 "
        "(the SE is inflated by sqrt(M / (M - 1)): 41% at M = 2, 0.25% at M = 200).",
        "2. *The (1 + 1/M) factor*: `varbetas * (1 + 1/nvalid)` with `nvalid` an integer, so `1/nvalid` is an integer "
        "division, 0 for M >= 2: B enters unmultiplied (T = Ubar M/(M-1) + B instead of Ubar + (1 + 1/M) B).",
        "3. *The draws*: `simvals = matmul(z, chol)` multiplies the row vector z by the lower Cholesky factor L of the "
        "posterior covariance, which gives covariance L'L, not LL'. Crafted run (EB covariance [[1, 0.9], [0.9, 1]] for "
        "all 1182 subjects, last replication's draws): sample covariance "
        f"[[{r['draws_cov'][0, 0]:.3f}, {r['draws_cov'][0, 1]:.3f}], [., {r['draws_cov'][1, 1]:.3f}]] against L'L = "
        f"[[{r['LtL'][0, 0]:.3f}, {r['LtL'][0, 1]:.3f}], [., {r['LtL'][1, 1]:.3f}]]. The variances of the draws are wrong "
        "wherever the posterior covariance of theta1 and theta2 is not zero; on ExampleData it moves the theta1 "
        "coefficient (above).",
        "4. *The draws are normal* (EB mean and covariance); mlsml draws v from its exact marginal posterior and u given "
        "v exactly. And MixWILD ignores the uncertainty of the stage-1 estimates (mlsml's default "
        "`stage1_uncertainty=True` draws them, which is what makes the imputations proper).",
        "5. *Tests*: MixWILD uses the normal distribution for every pooled estimate; mlsml the t distribution with "
        "Rubin's (gaussian: Barnard-Rubin) degrees of freedom. MixWILD's gaussian stage 2 (mixreg) reports the ML "
        "residual variance (divisor n) and ML standard errors; mlsml's GLM uses n - p (as statsmodels' OLS).",
        "6. *Regressors*: MixWILD's are the standardised theta1 and the independent part theta2 of the scale; mlsml's "
        "are u0 and v in their own units (any linear map of them can be written in the formula, as here).",
        "7. *Sample*: MixWILD drops the level-1 rows with a missing stage-2 variable from stage 1 too; mlsml fits "
        "stage 1 on every row with a response and stage 2 on the schools with an outcome (here stage 1 was given "
        "MixWILD's rows, for comparability).",
        "",
        "None of these explains away the attenuation of the two-stage estimates (section 7): MixWILD's stage 2 and "
        'mlsml\'s `method="mi"` both draw the effects without the outcome; `method="joint"` does not.',
        "",
    ]
    # theta_map_lines() (the R > 0, NCOV = 2, MLS = 1 jobs) is left out of the generated section: mlsml's quadratic job
    # alone takes about 20 min (100 proper imputations from the tabulated 2-d posterior), and MixWILD's NCOV = 2 run
    # failed (NaN); run it on its own: python -c "from validation.mixwild_stage2 import theta_map_lines as f; print(*f(), sep='\n')"
    return "\n".join(lines + def_job_lines() + ordinal_lines() + nominal_lines() + multilevel_lines() + multilevel_glmm_lines())


def def_job_lines() -> list[str]:
    """The same job run from its .def file by ``mlsml mixregls`` (the .def's stage-2 settings, issue 13)."""
    import tempfile

    from mlsml.mixregls.job import run_job

    mixwild = _parse_table(REF / "ex1_stage2.out")
    with tempfile.TemporaryDirectory() as tmp:
        pd.read_csv(DATA).to_csv(Path(tmp) / "data.dat", sep=" ", header=False, index=False)
        (Path(tmp) / "ex1.def").write_text((REF / "ex1.def").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_job(Path(tmp) / "ex1.def", stages=False)
    s2 = run.stage2
    names = {"Intercept": "Intercept", "theta1": "Locat_1", "theta2": "Scale_1", "theta1:theta2": "Locat_1*Scale"}
    ours = dict(zip(["Intercept", "theta1", "theta2", "theta1:theta2", "var(resid)"], zip(s2.params, s2.bse)))
    rows = [
        {
            "parameter": names.get(k, "Residual.Variance"),
            "MixWILD": f"{mixwild.loc[k, 'estimate']:.4f} ({mixwild.loc[k, 'se']:.4f})",
            "mlsml mixregls ex1.def": f"{ours[k][0]:.4f} ({ours[k][1]:.4f})",
        }
        for k in ours
    ]
    return [
        "**The job file itself.** `mlsml mixregls ex1.def` reads the job's stage-2 settings (`STAGE2 = 1`, "
        "`PFIXED PTHETA POMEGA PTO = 0 0 0 0`, `NREPS = 200`, `MYSEED = 13`; `mlsml.mixregls.secondstage`) and runs "
        'them as `res.stage2(method="mi")` with MixWILD\'s standardised regressors, dropping the rows with a missing '
        f"BMI from stage 1 as MixWILD does (stage-1 log-likelihood {run.results.llf:.3f}; MixWILD "
        f"{_stage1_loglik(REF / 'ex1_stage1.out'):.3f}). Its MixWILD-style stage-2 table (estimate (SE)), with mlsml's "
        "default proper imputations; the differences from MixWILD are those explained above:",
        "",
        md_table(pd.DataFrame(rows), index=False),
        "",
    ]


#: The ordinal job's table rows (``ord_stage2.out``): MixWILD's label and ours.
ORDINAL_LABELS = {
    "Locat_1": "theta1",
    "Scale_1": "theta2",
    "Locat_1*Scale": "theta1:theta2",
    "Threshold    1.0": "0/1",
    "Threshold    2.0": "1/2",
}
#: Imputations of the ordinal job (``NREPS`` of ``ord.def``).
ORDINAL_NDRAWS = 100


def _parse_ordinal(path: Path) -> pd.DataFrame:
    rows = {}
    for line in path.read_text().splitlines():
        label = re.sub(r"[^\x20-\x7e]", "", line[:16]).strip()
        if label in ORDINAL_LABELS:
            parts = line[16:].split()
            rows[ORDINAL_LABELS[label]] = (float(parts[0]), float(parts[1]))
    return pd.DataFrame(rows, index=["estimate", "se"]).T


def _emulate_mixwild_ordinal(y, means, covs, ndraws: int, rng) -> pd.DataFrame:
    """MixWILD's ordinal stage 2 (``stage2only`` + ``mixors``) written out: its transposed normal draws,
    a cumulative-logit fit per draw (statsmodels' ``OrderedModel``, thresholds on their own scale), its pooling."""
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    from mlsml.stage2 import ordinal_natural

    J = len(y)
    L = np.linalg.cholesky(covs)
    Q, U = [], []
    for _ in range(ndraws):
        t = means + np.einsum("ja,jab->jb", rng.standard_normal((J, 2)), L)
        X = np.column_stack([t[:, 0], t[:, 1], t[:, 0] * t[:, 1]])
        fit = OrderedModel(y, X, distr="logit").fit(method="bfgs", disp=False, maxiter=1000)
        params, cov = ordinal_natural(np.asarray(fit.params), np.asarray(fit.cov_params()), 3)
        Q.append(params)
        U.append(np.diag(cov))
    Q, U = np.asarray(Q), np.asarray(U)
    M = len(Q)
    B = Q.var(axis=0, ddof=1)
    total = U.sum(axis=0) / (M - 1) + B  # MixWILD's pooling (section text, items 1 and 2)
    return pd.DataFrame(
        {"estimate": Q.mean(axis=0), "se": np.sqrt(total), "mc_se": np.sqrt(B / M)}, index=list(ORDINAL_LABELS.values())
    )


def ordinal_lines() -> list[str]:
    """MixWILD's ordinal stage 2 (``STAGE2 = 2``, ``mixors``) on the example data against ``mlsml mixregls`` on the same job."""
    import tempfile

    from mlsml.mixregls.job import run_job

    mixwild = _parse_ordinal(REF / "ord_stage2.out")
    df = pd.read_csv(DATA)
    df["BMICAT"] = np.where(df["BMI"] == -999, -999, np.digitize(df["BMI"], [20.0, 25.0]))
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "data.dat", sep=" ", header=False, index=False)
        (Path(tmp) / "ord.def").write_text((REF / "ord.def").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_job(Path(tmp) / "ord.def", stages=False)
    s2 = run.stage2
    ours = pd.DataFrame(
        {"estimate": s2.params.to_numpy(), "se": s2.bse.to_numpy(), "mc_se": np.sqrt(s2.info["between"] / s2.ndraws)},
        index=list(ORDINAL_LABELS.values()),
    )
    eb = np.loadtxt(REF / "ex1_ebvar.dat")  # the ordinal job's EB file is the same file (same stage 1)
    first = df[df["BMI"] != -999].groupby("ID")["BMICAT"].first()
    y = first.loc[eb[:, 0].astype(int)].to_numpy(dtype=float)
    covs = np.stack([[[e[3], e[4]], [e[4], e[5]]] for e in eb])
    emulated = _emulate_mixwild_ordinal(y, eb[:, 1:3], covs, ORDINAL_NDRAWS, np.random.default_rng(SEED))
    # MC se of the difference, taking MixWILD's own Monte Carlo SE equal to the emulation's
    z = (emulated["estimate"] - mixwild["estimate"]).abs() / (np.sqrt(2.0) * emulated["mc_se"])
    rows = []
    for k in ORDINAL_LABELS.values():
        rows.append(
            {
                "parameter": k,
                "MixWILD": f"{mixwild.loc[k, 'estimate']:.4f} ({mixwild.loc[k, 'se']:.4f})",
                "mlsml mixregls ord.def": f"{ours.loc[k, 'estimate']:.4f} ({ours.loc[k, 'se']:.4f}) ±{ours.loc[k, 'mc_se']:.3f}",
                "MixWILD emulated": f"{emulated.loc[k, 'estimate']:.4f} ({emulated.loc[k, 'se']:.4f}) ±{emulated.loc[k, 'mc_se']:.3f}",
            }
        )
    return [
        "**An ordinal stage 2** (`STAGE2 = 2`, MixWILD's `mixors`, built from the same commit with the same flags and "
        "file-name change): the job `ord.def` (in `validation/reference/mixwild_stage2/`) has the same stage 1 and "
        "regresses `BMICAT` (BMI below 20, 20 to 25, above 25: 0, 1, 2; a column added to the data file) on "
        f"`Locat_1`, `Scale_1` and `Locat_1*Scale`, {ORDINAL_NDRAWS} imputations. MixWILD's thresholds are the "
        'cumulative ones, P(Y <= k) = F(threshold_k - x\'gamma), the convention of `family="ordinal"` (the signs and '
        "the thresholds agree). Estimate (SE) ±Monte Carlo SE:",
        "",
        md_table(pd.DataFrame(rows), index=False),
        "",
        "MixWILD's ordinal numbers are reproduced by its own procedure written out in Python (normal draws through the "
        "transposed Cholesky factor, a cumulative-logit fit per draw, its pooling) to within "
        f"{z.max():.1f} Monte Carlo SEs of the difference (the largest of five; different random numbers). "
        "mlsml's differ from them for the reasons of "
        "the continuous case above (the exact posterior, the right factor, proper imputations), most in the "
        "`Locat_1*Scale` coefficient.",
        "",
    ]


#: Imputations of the nominal job (``NREPS`` of ``nom.def`` / ``nom_stage2only.def``).
NOMINAL_NDRAWS = 100
#: The nominal parameters in mixno's order (category-major: category 1 vs 0, then 2 vs 0).
NOMINAL_NAMES = [f"{t}[{k}]" for k in (1, 2) for t in ("Intercept", "theta1", "theta2", "theta1:theta2")]
#: ``stage2only`` prints parameter ``jval`` on its row ``j`` (``dostage2``: ``jval = j - j/nvarpercat``, and
#: ``totalvar - maxj + 1 + j/nvarpercat`` on the last row of a category): rows 1..8 show parameters 1, 2, 3, 7, 4, 5, 6, 8.
NOMINAL_PRINTED = [1, 2, 3, 7, 4, 5, 6, 8]


def _parse_nominal(path: Path) -> pd.DataFrame:
    """MixWILD's pooled nominal table, its rows put back on the parameters they hold (:data:`NOMINAL_PRINTED`)."""
    text = path.read_text().split("Final Results")[1]
    vals = []
    for line in text.splitlines():
        label = re.sub(r"[^\x20-\x7e]", "", line[:16]).strip()
        if label in ("Intercept", "Locat_1", "Scale_1", "Locat_1*Scale"):
            parts = line[16:].split()
            vals.append((label, float(parts[0]), float(parts[1])))
    printed = pd.DataFrame(vals, columns=["printed label", "estimate", "se"])
    printed["holds"] = [NOMINAL_NAMES[j - 1] for j in NOMINAL_PRINTED]
    return printed


def _emulate_mixwild_nominal(y, means, covs, ndraws: int, rng) -> pd.DataFrame:
    """MixWILD's nominal stage 2 (``stage2only`` + ``mixno``) written out: its transposed normal draws, a
    multinomial-logit fit per draw (statsmodels' ``MNLogit``, category 0 the reference), its pooling."""
    from statsmodels.discrete.discrete_model import MNLogit

    J = len(y)
    L = np.linalg.cholesky(covs)
    Q, U = [], []
    for _ in range(ndraws):
        t = means + np.einsum("ja,jab->jb", rng.standard_normal((J, 2)), L)
        X = np.column_stack([np.ones(J), t[:, 0], t[:, 1], t[:, 0] * t[:, 1]])
        fit = MNLogit(y, X).fit(method="newton", disp=False)
        Q.append(np.asarray(fit.params).ravel(order="F"))
        U.append(np.diag(np.asarray(fit.cov_params())))
    Q, U = np.asarray(Q), np.asarray(U)
    M = len(Q)
    B = Q.var(axis=0, ddof=1)
    total = U.sum(axis=0) / (M - 1) + B  # MixWILD's pooling (items 1 and 2)
    return pd.DataFrame({"estimate": Q.mean(axis=0), "se": np.sqrt(total), "mc_se": np.sqrt(B / M)}, index=NOMINAL_NAMES)


def nominal_lines() -> list[str]:
    """MixWILD's nominal stage 2 (``STAGE2 = 4``, ``mixno``) on the example data against ``mlsml mixregls nom.def``."""
    import tempfile

    from mlsml.mixregls.job import run_job

    mixwild = _parse_nominal(REF / "nom_stage2.out")
    df = pd.read_csv(DATA)
    df["BMICAT"] = np.where(df["BMI"] == -999, -999, np.digitize(df["BMI"], [20.0, 25.0]))
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "data.dat", sep=" ", header=False, index=False)
        (Path(tmp) / "nom.def").write_text((REF / "nom.def").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_job(Path(tmp) / "nom.def", stages=False)
    s2 = run.stage2
    ours = pd.DataFrame(
        {"estimate": s2.params.to_numpy(), "se": s2.bse.to_numpy(), "mc_se": np.sqrt(s2.info["between"] / s2.ndraws)},
        index=NOMINAL_NAMES,
    )
    eb = np.loadtxt(REF / "ex1_ebvar.dat")
    first = df[df["BMI"] != -999].groupby("ID")["BMICAT"].first()
    y = first.loc[eb[:, 0].astype(int)].to_numpy(dtype=float)
    covs = np.stack([[[e[3], e[4]], [e[4], e[5]]] for e in eb])
    emulated = _emulate_mixwild_nominal(y, eb[:, 1:3], covs, NOMINAL_NDRAWS, np.random.default_rng(SEED))
    mw = mixwild.set_index("holds")
    z = (emulated["estimate"] - mw["estimate"]).abs() / (np.sqrt(2.0) * emulated["mc_se"])
    rows = []
    for i, k in enumerate(NOMINAL_NAMES):
        printed = mixwild.iloc[i]
        rows.append(
            {
                "parameter": k,
                "MixWILD (its row holding it)": f"{mw.loc[k, 'estimate']:.4f} ({mw.loc[k, 'se']:.4f})",
                "MixWILD's row here (label)": f"{printed['estimate']:.4f} ({printed['printed label']})",
                "mlsml mixregls nom.def": f"{ours.loc[k, 'estimate']:.4f} ({ours.loc[k, 'se']:.4f}) ±{ours.loc[k, 'mc_se']:.3f}",
                "MixWILD emulated": f"{emulated.loc[k, 'estimate']:.4f} ({emulated.loc[k, 'se']:.4f}) ±{emulated.loc[k, 'mc_se']:.3f}",
            }
        )
    return [
        "**A nominal stage 2** (`STAGE2 = 4`, MixWILD's `mixno`, built from the same commit with the same flags; "
        "`mixno` names its files in one case, so no change was needed): `BMICAT` as a nominal outcome, category 0 the "
        f"reference (`ICODE(1)`), on `Locat_1`, `Scale_1` and `Locat_1*Scale`, {NOMINAL_NDRAWS} imputations. MixWILD's "
        "`stage2only` was run alone (`nom_stage2only.def`) on the EB file of the continuous job (the same stage 1); "
        "mlsml runs the job `nom.def` (`ord.def` with `STAGE2 = 4`) from the start. Estimate (SE) ±Monte Carlo SE, "
        'in the parametrisation of `family="nominal"` (`c[k]`: column c, category k against 0):',
        "",
        md_table(pd.DataFrame(rows), index=False),
        "",
        "**MixWILD prints the nominal table with its labels on the wrong parameters.** `mixno` writes its estimates "
        "category by category (`mixno.est` of the last replication, `nom_lastrep_mixno.out`: intercept, Locat_1, "
        "Scale_1, Locat_1*Scale for category 1, then for category 2), but `stage2only`'s loop over the table rows "
        "prints, under the labels Intercept, Locat_1, Scale_1, Locat_1*Scale of each category, the parameters 1, 2, 3, 7 "
        "and 4, 5, 6, 8 (its `jval`, above): category 1's `Locat_1*Scale` row shows category 2's `Scale_1` "
        "coefficient, and category 2's four rows show category 1's `Locat_1*Scale`, then category 2's intercept, "
        "`Locat_1` and `Scale_1`. The SEs travel with their estimates. Put back on the parameters they hold (second "
        "column), MixWILD's numbers are reproduced by its procedure written out in Python to within "
        f"{z.max():.1f} Monte Carlo SEs of the difference (the largest of eight; different random numbers), and the "
        "mapping is confirmed by the last replication's own `mixno` output. mlsml's estimates differ from them for "
        "the reasons of the continuous case (the exact posterior, the right Cholesky factor, proper imputations).",
        "",
    ]


#: The MixWILD jobs whose standardised effects need the general map (:class:`mlsml.mixregls.secondstage.ThetaMap`):
#: name -> what the job adds to ex1's stage 1.
THETA_JOBS = {
    "bs": "BS variance ~ SEX (R = 1)",
    "quad": "quadratic association (NCOV = 2)",
    "mls": "random slope of WEEKEND (MLS = 1, MIXREGMLS)",
}


def _parse_any_table(text: str) -> pd.DataFrame:
    """Rows ``label estimate se ...`` of a MixWILD-layout stage-2 table (MixWILD's or mlsml's report)."""
    rows = {}
    take = False
    for line in text.splitlines():
        if line.startswith("Variable"):
            take = True
            continue
        label = re.sub(r"[^\x20-\x7e]", "", line[:16]).strip()
        parts = line[16:].split()
        if take and label and len(parts) >= 2:
            try:
                rows[label] = (float(parts[0]), float(parts[1]))
            except ValueError:
                continue
    return pd.DataFrame(rows, index=["estimate", "se"]).T


def _theta_moments(res):
    """mlsml's posterior means and covariances of MixWILD's theta, ``(J, d)`` and ``(J, d, d)`` (the fit's order).

    Linear maps carry the exact posterior moments over; under the quadratic association the map is not linear,
    and the moments are sums over the tabulated exact posterior (:class:`mlsml.quadgrid.QuadraticPosterior`).
    """
    from mlsml.mixregls.secondstage import ThetaMap
    from mlsml.predict import posterior_likelihood, posterior_moments
    from mlsml.quadgrid import QuadraticPosterior

    tm = ThetaMap.from_fit(res)
    theta = np.asarray(res.theta, dtype=float)
    mean, cov = posterior_moments(posterior_likelihood(res), theta)
    J, d = mean.shape
    if tm.quad is None:
        A = np.broadcast_to(tm.linv, (J, d, d)).copy()
        if tm.inv_sd is not None:
            A[:, :, 0] *= tm.inv_sd[:, None]
        return np.einsum("jab,jb->ja", A, mean), np.einsum("jab,jbc,jdc->jad", A, cov, A)
    qp = QuadraticPosterior.build(res.likelihood.integrand, theta, mean, cov)
    b = np.stack([qp.u, np.broadcast_to(qp.w[:, :, None], qp.u.shape)], axis=-1)
    t = tm.values(b.reshape(-1, 2)).reshape(b.shape)
    wt = qp.pw[:, :, None] * qp.pu
    wt = wt / wt.sum(axis=(1, 2), keepdims=True)
    m = np.einsum("jgk,jgka->ja", wt, t)
    dev = t - m[:, None, None, :]
    return m, np.einsum("jgk,jgka,jgkb->jab", wt, dev, dev)


def theta_map_lines() -> list[str]:
    """MixWILD's EB file (posterior moments of its theta) and stage-2 table against mlsml on the R > 0, NCOV = 2 and
    MLS = 1 jobs (``validation/reference/mixwild_stage2/{bs,quad,mls}*``)."""
    import tempfile

    from mlsml.mixregls.job import run_job

    df = pd.read_csv(DATA)
    df["BMICAT"] = np.where(df["BMI"] == -999, -999, np.digitize(df["BMI"], [20.0, 25.0]))
    lines = [
        "**Stage 2 after BS-variance covariates, the quadratic association and random slopes.** Three more MixWILD "
        "jobs on the same data, each ex1's stage 1 with one addition, stage 2 `BMI` on `Locat_k`, `Scale_1` and "
        "`Locat_k*Scale` (100 imputations): MixWILD's EB file holds the posterior means and covariances of its "
        "standardised effects theta; mlsml's are its exact posterior moments carried through "
        "`mlsml.mixregls.secondstage.ThetaMap` (theta = L0^-1 D_j^-1 b, with the quadratic term taken off v under "
        "NCOV = 2; sums over the tabulated exact posterior there, since that map is not linear). The stage-2 "
        "tables are MixWILD's and `mlsml mixregls JOB.def`'s (proper imputations from the exact posterior), "
        "estimate (SE):",
        "",
    ]
    rows, tables = [], []
    for name, what in THETA_JOBS.items():
        with tempfile.TemporaryDirectory() as tmp:
            df.to_csv(Path(tmp) / "data.dat", sep=" ", header=False, index=False)
            (Path(tmp) / f"{name}.def").write_text((REF / f"{name}.def").read_text())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = run_job(Path(tmp) / f"{name}.def", stages=False)
        res = run.results
        m, c = _theta_moments(res)
        eb = np.loadtxt(REF / f"{name}_ebvar.dat")
        d = m.shape[1]
        pos = pd.Index(res.model.design.group_labels).get_indexer(eb[:, 0].astype(int))
        il = np.tril_indices(d)
        packed = np.stack([c[:, i, j] for i, j in zip(*il)], axis=1)  # row-wise lower: (1,1), (2,1), (2,2), ...
        order = np.lexsort((il[1], il[0]))
        mw_mean, mw_cov = eb[:, 1 : 1 + d], eb[:, 1 + d :]
        rows.append(
            {
                "job": f"`{name}.def`: {what}",
                "llf mlsml": f"{res.llf:.3f}",
                "llf MixWILD": f"{_stage1_loglik(REF / f'{name}_stage1.out'):.3f}",
                "largest diff. of EB means": f"{np.abs(mw_mean - m[pos]).max():.2g}",
                "of EB (co)variances": f"{np.abs(mw_cov - packed[pos][:, order]).max():.2g}",
                "mean |theta|": f"{np.abs(mw_mean).mean():.2f}",
            }
        )
        mw_tab = _parse_any_table((REF / f"{name}_stage2.out").read_text().split("Final Results")[-1])
        ours = _parse_any_table(run.report.split("Final Results")[-1])
        for label in mw_tab.index:
            if label in ours.index:
                tables.append(
                    {
                        "job": name,
                        "parameter": label,
                        "MixWILD": f"{mw_tab.loc[label, 'estimate']:.4f} ({mw_tab.loc[label, 'se']:.4f})",
                        "mlsml": f"{ours.loc[label, 'estimate']:.4f} ({ours.loc[label, 'se']:.4f})",
                    }
                )
    lines += [md_table(pd.DataFrame(rows), index=False), "", md_table(pd.DataFrame(tables), index=False), ""]
    return lines


#: The multilevel job's table labels (MixWILD's, as ``_parse_any_table`` reads them; mlsml prints the same).
MULTILEVEL_LABELS = ("Intercept", "WEEKEND", "Locat_1", "Scale_1", "Locat_1*Scale", "Random.Int.Var", "Residual.Varianc")


def multilevel_lines() -> list[str]:
    """MULTI2ND = 1 with a level-1 outcome (``ml.def``): one imputation's fit against ``mixreg``'s, and the pooled tables."""
    import tempfile

    from mlsml.mixregls.job import run_job
    from mlsml.stage2 import fit_random_intercept

    # one completed data set, as stage2only wrote it for mixreg: id, y, 1, WEEKEND, Locat_1, Scale_1, Locat_1*Scale, 1
    rep = np.loadtxt(REF / "ml_lastrep.dat.gz")
    school = np.unique(rep[:, 0], return_inverse=True)[1]
    params, cov, llf = fit_random_intercept(rep[:, 1], pd.DataFrame(rep[:, 2:7]), school)
    est = [float(line.split()[-1]) for line in (REF / "ml_lastrep_mixreg.est").read_text().splitlines() if line.strip()]
    var = [[float(v) for v in line.split()] for line in (REF / "ml_lastrep_mixreg.var").read_text().splitlines() if line.strip()]
    mw_se = np.sqrt([var[i][i] for i in range(5)] + [var[5][0], var[6][1]])  # the fixed effects' 5x5, the variances' 2x2
    mw_llf = float((REF / "ml_lastrep_mixreg.lik").read_text().split()[0])
    one = pd.DataFrame(
        {
            "parameter": MULTILEVEL_LABELS,
            "mixreg": [f"{e:.5f} ({s:.5f})" for e, s in zip(est, mw_se)],
            "mlsml fit_random_intercept": [f"{e:.5f} ({s:.5f})" for e, s in zip(params, np.sqrt(np.diag(cov)))],
            "largest rel. diff.": [f"{abs(a - b) / abs(b):.1g}" for a, b in zip(params, est)],
        }
    )
    df = pd.read_csv(DATA)
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "data.dat", sep=" ", header=False, index=False)
        (Path(tmp) / "ml.def").write_text((REF / "ml.def").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_job(Path(tmp) / "ml.def", stages=False)
    s2 = run.stage2
    M = s2.ndraws
    # MixWILD's "Random.Int.Var" comes out as "random.int.var" (the build lower-cased its string literals; README)
    mw = _parse_any_table((REF / "ml_stage2.out").read_text().split("Final Results")[-1]).rename(index=str.lower)
    ours = _parse_any_table(run.report.split("Final Results")[-1]).rename(index=str.lower)
    # mlsml's imputations pooled as stage2only pools: Ubar M/(M-1) + B (its 1/M lost to an integer division)
    mw_pool = np.sqrt(s2.info["within"] * M / (M - 1) + s2.info["between"])
    keys = [k.lower() for k in MULTILEVEL_LABELS]
    pooled = pd.DataFrame(
        {
            "parameter": MULTILEVEL_LABELS,
            "MixWILD (EB normal draws)": [f"{mw.loc[k, 'estimate']:.4f} ({mw.loc[k, 'se']:.4f})" for k in keys],
            "mlsml exact, proper MI": [f"{ours.loc[k, 'estimate']:.4f} ({ours.loc[k, 'se']:.4f})" for k in keys],
            "mlsml draws, MixWILD's pooling SE": [f"{v:.4f}" for v in mw_pool],
            "fmi": [f"{v:.2f}" for v in s2.fmi],
        }
    )
    return [
        "**The multilevel second stage (`MULTI2ND = 1`).** `ml.def`: ex1's stage 1 with the stage-2 outcome "
        "`NEG_AFFECT`, which varies within subjects, on `WEEKEND` (a level-1 covariate, `PFIXED = 1`), `Locat_1`, "
        "`Scale_1` and `Locat_1*Scale`, `NREPS = 200`, `MYSEED = 13`. MixWILD's `stage2only` then writes the level-1 "
        "rows (the data file read again: every row with the stage-2 columns present, also those whose `POS_AFFECT` is "
        f"missing, so {s2.info['level1_rows']} rows against stage 1's {run.results.nobs}; mlsml reads them the same "
        "way) with each subject's drawn theta repeated on its rows and runs `mixreg` with one random effect, the "
        "subject intercept, in each replication; mlsml runs `res.stage2(..., multilevel=True)`: a gaussian "
        "random-intercept model fitted by exact ML in each imputation (`mlsml.stage2.fit_random_intercept`, "
        "`beta` and `sigma^2` profiled out), standard errors from the expected information as `mixreg`'s. Stage 1: "
        f"log-likelihood {run.results.llf:.3f} (MixWILD {_stage1_loglik(REF / 'ml_stage1.out'):.3f}).",
        "",
        "One completed data set (MixWILD's last replication, `ml_lastrep.dat.gz`) fitted by `mixreg` and by mlsml, "
        f"estimate (SE): the same model and likelihood (log-likelihood {llf:.4f} against `mixreg`'s {mw_llf:.4f}; "
        "`mixreg` stops at its convergence criterion 0.0005, so its last digits differ); the SEs agree because both "
        "invert the expected information:",
        "",
        md_table(one, index=False),
        "",
        "The pooled tables, estimate (SE). The two columns differ where the single-level stage 2 does, and for the "
        "same reasons (above): mlsml draws each subject's effects from the exact posterior and, by default, the "
        "stage-1 parameters from their sampling distribution (proper imputations), where MixWILD draws from the "
        "normal approximation at the estimates; and MixWILD pools with `Ubar M/(M-1) + B`, not "
        "`Ubar + (1 + 1/M) B` (the third column applies its rule to mlsml's imputations). The fixed effects of "
        "`WEEKEND` and the intercept and both variances, which the missing effects barely touch (fmi below 0.01), "
        "agree to a small fraction of their SE; the coefficients of the drawn effects differ by up to about 0.16 SE, "
        "the Monte Carlo and approximation differences of 200 imputations with fmi 0.2 to 0.5, and mlsml's SEs of "
        "`Scale_1` and `Locat_1*Scale` are larger (by 6 and 12 per cent), as in the single-level table: the proper "
        "imputations carry the stage-1 uncertainty of the scale parameters into the between-imputation variance, "
        "which the pooling rule does not explain (third column). In-memory data (`run_job(..., data=...)`) have no "
        "file to read again, and there the level-1 rows are stage 1's:",
        "",
        md_table(pooled, index=False),
        "",
    ]


#: The recoding of ``NEG_AFFECT`` (10, ..., 70 in the last replication) into an ordinal and a count outcome.
ORDINAL_CUTS = (20.0, 40.0)  # 0: below 20, 1: 20 to 39, 2: 40 and above
COUNT_DIVISOR = 10.0  # floor(y / 10) - 1: 0, ..., 6


def _mixwild_est(path: Path) -> np.ndarray:
    """The estimates of a ``mixors``/``mixpreg`` ``.est`` file (label, value per line)."""
    return np.array([float(line.split()[-1]) for line in path.read_text().splitlines() if line.strip()])


def _brute_poisson(phi: np.ndarray, y: np.ndarray, X: np.ndarray, school: np.ndarray) -> float:
    """The random-intercept Poisson log-likelihood by a 1601-point trapezoid rule over theta (independent of mlsml)."""
    from scipy import special, stats

    t = np.linspace(-8.0, 8.0, 1601)
    w = np.full(t.size, t[1] - t[0])
    w[[0, -1]] *= 0.5
    eta = (X @ phi[:-1])[:, None] + phi[-1] * t[None, :]
    ll = y[:, None] * eta - np.exp(eta) - special.gammaln(y + 1.0)[:, None]
    per = np.add.reduceat(ll, np.searchsorted(school, np.unique(school)), axis=0) + stats.norm.logpdf(t)[None, :]
    top = per.max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(per - top) @ w) + top[:, 0]))


def _brute_nominal(coef: np.ndarray, sd: np.ndarray, y: np.ndarray, X: np.ndarray, school: np.ndarray) -> float:
    """The random-intercept baseline-category logit's log-likelihood by a 1601-point trapezoid rule (independent of mlsml)."""
    from scipy import special, stats

    t = np.linspace(-8.0, 8.0, 1601)
    w = np.full(t.size, t[1] - t[0])
    w[[0, -1]] *= 0.5
    etas = [np.zeros((y.size, t.size))] + [(X @ b)[:, None] + s * t[None, :] for b, s in zip(coef, sd)]
    ll = np.choose(y.astype(int)[:, None], etas) - special.logsumexp(np.stack(etas), axis=0)
    per = np.add.reduceat(ll, np.searchsorted(school, np.unique(school)), axis=0) + stats.norm.logpdf(t)[None, :]
    top = per.max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(per - top) @ w) + top[:, 0]))


def multilevel_glmm_lines() -> list[str]:
    """MULTI2ND = 1 with STAGE2 = 2, 3, 4: one completed data set fitted by ``mixors``/``mixpreg``/``mixno`` and by mlsml."""
    from mlsml.stage2 import fit_random_intercept_glmm

    rep = np.loadtxt(REF / "ml_lastrep.dat.gz")
    school = np.unique(rep[:, 0], return_inverse=True)[1]
    cols = ["Intercept", "WEEKEND", "Locat_1", "Scale_1", "Locat_1*Scale"]
    X = pd.DataFrame(rep[:, 2:7], columns=cols)
    y_ord = np.digitize(rep[:, 1], ORDINAL_CUTS).astype(float)
    y_cnt = np.floor(rep[:, 1] / COUNT_DIVISOR) - 1.0
    rows = []
    # mixors: intercept, WEEKEND, ..., threshold 1 (= -intercept), threshold 2, VarCov; the .var rows in that order
    p_o, c_o, llf_o = fit_random_intercept_glmm(y_ord, X.drop(columns="Intercept"), school, "ordinal")
    est = _mixwild_est(REF / "ml_lastrep_mixors.est")
    var = np.loadtxt(REF / "ml_lastrep_mixors.var")
    mw = dict(
        zip(
            cols[1:] + ["Threshold 1", "Threshold 2", "Random.Int.Var"],
            zip(est[[1, 2, 3, 4, 5, 6, 7]], np.sqrt(np.diag(var))[[1, 2, 3, 4, 5, 6, 7]]),
        )
    )
    ours = dict(zip(cols[1:] + ["Threshold 1", "Threshold 2", "Random.Int.Var"], zip(p_o, np.sqrt(np.diag(c_o)))))
    sd_o = np.sqrt(p_o[-1])
    for k in mw:
        rows.append({"outcome": "ordinal (mixors)", "parameter": k, "MixWILD": mw[k], "mlsml": ours[k]})
    rows.append(
        {
            "outcome": "ordinal (mixors)",
            "parameter": "(sd of the intercept)",
            "MixWILD": (np.nan, np.nan),
            "mlsml": (sd_o, ours["Random.Int.Var"][1] / (2 * sd_o)),
        }
    )
    llf_mo = float((REF / "ml_lastrep_mixors.lik").read_text().split()[0])
    # mixpreg: the coefficients, then the intercept's SD (VarCov1); the .var in the same order
    p_c, c_c, llf_c = fit_random_intercept_glmm(y_cnt, X, school, "poisson")
    est = _mixwild_est(REF / "ml_lastrep_mixpreg.est")
    se = np.sqrt(np.diag(np.loadtxt(REF / "ml_lastrep_mixpreg.var")))
    sd_c = np.sqrt(p_c[-1])
    se_c = np.sqrt(np.diag(c_c))
    for i, k in enumerate(cols):
        rows.append({"outcome": "count (mixpreg)", "parameter": k, "MixWILD": (est[i], se[i]), "mlsml": (p_c[i], se_c[i])})
    rows.append(
        {
            "outcome": "count (mixpreg)",
            "parameter": "Random.Int SD",
            "MixWILD": (est[5], se[5]),
            "mlsml": (sd_c, se_c[-1] / (2 * sd_c)),
        }
    )
    llf_mp = float((REF / "ml_lastrep_mixpreg.lik").read_text().split()[0])
    # mixno: the coefficients of category 1 against 0, of 2 against 0, then each category's intercept SD; .var 12 x 12
    p_n, c_n, llf_n = fit_random_intercept_glmm(y_ord, X, school, "nominal")
    est_n = _mixwild_est(REF / "ml_lastrep_mixno.est")[: p_n.size]
    se_mn = np.sqrt(np.diag(np.array((REF / "ml_lastrep_mixno.var").read_text().split(), dtype=float).reshape(p_n.size, p_n.size)))
    se_n = np.sqrt(np.diag(c_n))
    labels = [f"{c} [{k} vs 0]" for k in (1, 2) for c in cols] + ["Random.Int SD [1 vs 0]", "Random.Int SD [2 vs 0]"]
    for i, k in enumerate(labels):
        rows.append({"outcome": "nominal (mixno)", "parameter": k, "MixWILD": (est_n[i], se_mn[i]), "mlsml": (p_n[i], se_n[i])})
    llf_mn = float((REF / "ml_lastrep_mixno.lik").read_text().split()[0])
    exact_n_ours = _brute_nominal(p_n[:10].reshape(2, 5), p_n[10:], y_ord, X.to_numpy(), school)
    exact_n_mw = _brute_nominal(est_n[:10].reshape(2, 5), est_n[10:], y_ord, X.to_numpy(), school)
    exact_ours = _brute_poisson(np.append(p_c[:5], sd_c), y_cnt, X.to_numpy(), school)
    exact_mw = _brute_poisson(est, y_cnt, X.to_numpy(), school)
    table = pd.DataFrame(
        {
            "outcome": [r["outcome"] for r in rows],
            "parameter": [r["parameter"] for r in rows],
            "MixWILD": ["" if np.isnan(r["MixWILD"][0]) else f"{r['MixWILD'][0]:.5f} ({r['MixWILD'][1]:.5f})" for r in rows],
            "mlsml fit_random_intercept_glmm": [f"{r['mlsml'][0]:.5f} ({r['mlsml'][1]:.5f})" for r in rows],
        }
    )
    return [
        "**The multilevel ordinal, count and nominal second stages (`MULTI2ND = 1`, `STAGE2 = 2, 3, 4`).** The same "
        "completed data "
        "set (`ml_lastrep.dat.gz`) with its outcome `NEG_AFFECT` (10 to 70) recoded as an ordinal outcome (0 below 20, "
        "1 from 20 to 39, 2 from 40) and as a count (`floor(y / 10) - 1`, 0 to 6), fitted by MixWILD's `mixors` and "
        "`mixpreg` (and the ordinal coding as a nominal outcome by `mixno`) with the `.def` files `stage2only` "
        "writes for a multilevel stage 2 (one random effect, the subject intercept; `ml_lastrep_mixors.*`, "
        "`ml_lastrep_mixpreg.*`, `ml_lastrep_mixno.*`) and by mlsml's `fit_random_intercept_glmm` (adaptive "
        "Gauss-Hermite, 21 points), estimate (SE):",
        "",
        md_table(table, index=False),
        "",
        f"*Ordinal.* The same model and parametrisation (`P(Y <= k) = F(threshold_k - x'beta)`, `mixors` printing its "
        f"intercept as minus the first threshold): log-likelihood {llf_o:.4f} against `mixors`'s {llf_mo:.4f} (11 "
        "adaptive points, convergence criterion 0.0005), the coefficients and thresholds to 5 decimals, the "
        "intercept variance to 1e-4 (within `mixors`'s convergence criterion), the SEs of the coefficients and of the "
        "second threshold to 4 digits. Two SEs differ: `mixors` prints next to the intercept variance the SE "
        "of the intercept's *standard deviation* (its parameter; mlsml's delta-method SE of the variance divided by "
        "`2 sd` reproduces it, last row of its block), and its SE of the first threshold is the SE of its own intercept "
        "(0.0236 against mlsml's 0.0285; the second threshold, a function of the same intercept, agrees), which we have "
        "not explained. The tests check mlsml's covariance against the inverse of a brute-force observed information.",
        "",
        "*Count.* `mixpreg` integrates with 11 *fixed* Gauss-Hermite points (the same nodes for every subject, its "
        f"`QUADP`; no adaptive option). mlsml's log-likelihood is "
        f"{llf_c:.4f} (a 1601-point trapezoid integral at mlsml's estimates: {exact_ours:.4f}); at `mixpreg`'s estimates "
        f"the exact log-likelihood is {exact_mw:.4f} (`mixpreg` reports {llf_mp:.4f}), so `mixpreg` stops "
        f"{exact_ours - exact_mw:.4f} short of the maximum and its quadrature is off by {exact_mw - llf_mp:.4f}; the "
        "estimates agree to about 1e-3. `mixpreg`'s SEs are smaller than mlsml's, by up to half for the subject-level "
        "regressors (`Locat_1`, `Scale_1`); mlsml's equal, to 7 digits, the SEs from a finite-difference Hessian of the "
        "trapezoid log-likelihood on these data (checked when this section was written; the tests check the same on "
        "small data), so `mixpreg`'s standard errors are too small here.",
        "",
        "*Nominal.* `mixno` fits the model mlsml fits (one standard normal subject intercept with a loading per "
        "category, `eta_ijk = x_ij'beta_k + sigma_k theta_j`, category 0 the reference; it prints `sigma_k` as the "
        "random effect's standard deviation): the estimates agree to about 3e-4. mlsml's log-likelihood is "
        f"{llf_n:.6f}, `mixno`'s {llf_mn:.6f}; a 1601-point trapezoid integral gives {exact_n_ours:.6f} at mlsml's "
        f"estimates and {exact_n_mw:.6f} at `mixno`'s, so `mixno`'s 11-point quadrature is {llf_mn - exact_n_mw:.1e} "
        "high and its estimates are just short of the maximum. Its SEs differ from mlsml's by up to a tenth, mostly "
        "smaller, and by a quarter for the loading of category 1 (0.034 against 0.046); the tests check mlsml's "
        "nominal covariance against the inverse of a brute-force observed information.",
        "",
    ]


if __name__ == "__main__":
    print(section())
