"""Stage 2 against MixWILD's stage-2 program on a simulated design with known truth (issue 13).

Design (section 7's gaussian condition, ``validation/stage2.py``): ``J = 100`` subjects of ``n``
observations, data from :func:`mlsml.simulate.simulate_data`

    y_ij = 0.5 x_ij + u_j + e_ij,   ln var(e_ij) = -0.5 + v_j,
    (u_j, v_j) ~ N(0, [[0.25, 0.05], [0.05, 0.25]]),   x_ij ~ N(0, 1),

and a subject-level outcome on the true effects, ``Y_j = 0.5 + 1.0 u_j + 1.0 v_j + N(0, 0.25)``.

Each replication is written in MixWILD's format (``data.dat``: id, y, x, Y; a MixWILD 2.0 .def:
stage 1 ``y ~ x`` with ``x`` in the WS variance, a random scale with the linear association,
11 adaptive points; stage 2 ``STAGE2 = 1`` with ``PFIXED PTHETA POMEGA PTO = 0 0 0 -1``, i.e.
``Y`` on an intercept, ``Locat_1`` and ``Scale_1``, ``NREPS`` imputations) and run by the MixWILD
2.0 binaries built as ``validation/reference/mixwild_stage2/README.md`` says. The same data are
fitted by mlsml (the same stage-1 model) and ``res.stage2(..., method="mi")`` and
``method="joint"``.

**The scale of the comparison.** MixWILD's regressors are its standardised effects
``theta1 = u / sigma_u`` and ``theta2 = (v - LocEff theta1) / SD`` (``LocEff = sigma_uv / sigma_u``,
``SD = (sigma_v^2 - LocEff^2)^{1/2}``, :class:`mlsml.mixregls.secondstage.ThetaMap`). Everything is
compared on MixWILD's scale: mlsml's stage 2 is given the regressors ``I(a*u0)`` and
``I(b*v + c*u0)`` with ``(a, b, c)`` from its own stage-1 estimates (as section 8 does), and the
truth is mapped through the true Sigma: ``Y = 0.5 + (sigma_u + LocEff) theta1 + SD theta2 + e``,
so the true coefficients are ``0.6`` (theta1) and ``sqrt(0.24) = 0.4899`` (theta2), residual
variance 0.25.

Replication ``r`` of ``n`` uses the seed ``BASE_SEED + 1000 * n + r`` (the data, MixWILD's
``MYSEED`` and mlsml's draws). Per-replication rows go to
``validation/results/mixwild_stage2_sim.csv``; ``section`` summarises them.

Run ``python -m validation.mixwild_stage2_sim --n 40 --reps 20 --jobs 1`` (``--nreps``: imputations, default
20; needs the binaries in ``MIXWILD_BIN``; on the shared, loaded machine about 40 s per replication with
n = 40 and 6 s with n = 5, mostly MixWILD's stage 1). Runs over disjoint ``--first .. --reps`` ranges
into separate ``--out`` files can be concatenated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from .common import RESULTS, md_table
from .mixwild_stage2 import _parse_table, _stage1_loglik, _theta_map

#: The built MixWILD 2.0 binaries (README of ``validation/reference/mixwild_stage2``).
MIXWILD_BIN = Path(os.environ.get("MIXWILD_BIN", "/tmp/h13e/bs"))
PROGRAMS = ("lsboth_random_mixblank", "stage2only64", "mixreg")
BASE_SEED = 13_800_000
J = 100
SIGMA = np.array([[0.25, 0.05], [0.05, 0.25]])
BETA, ALPHA0 = 0.5, -0.5
GAMMA = (0.5, 1.0, 1.0)
RESID_VAR = 0.25
NREPS = 20
OUT = RESULTS / "mixwild_stage2_sim.csv"
#: MixWILD's stage 1 counts as at the maximum when its log-likelihood (3 decimals printed) is within this of mlsml's.
LLF_TOL = 0.01
#: A stage-2 fit whose SE exceeds this multiple of the method's median SE is named in the report.
BLOWUP = 10
#: MixWILD's missing-value code in the data file (none are missing here).
YMISS = -999


def truth_theta() -> dict[str, float]:
    """The stage-2 coefficients on MixWILD's standardised scale, through the true Sigma.

    .. math::

        Y = \\gamma_0 + \\gamma_u u + \\gamma_v v + e, \\quad u = \\sigma_u \\theta_1, \\quad
        v = \\mathrm{LocEff}\\,\\theta_1 + \\mathrm{SD}\\,\\theta_2
        \\;\\Rightarrow\\; Y = \\gamma_0 + (\\gamma_u \\sigma_u + \\gamma_v \\mathrm{LocEff}) \\theta_1
        + \\gamma_v \\mathrm{SD}\\, \\theta_2 + e.
    """
    su = np.sqrt(SIGMA[0, 0])
    loceff = SIGMA[0, 1] / su
    sd = np.sqrt(SIGMA[1, 1] - loceff**2)
    g0, gu, gv = GAMMA
    return {"Intercept": g0, "theta1": gu * su + gv * loceff, "theta2": gv * sd, "var(resid)": RESID_VAR}


def make_data(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Level-1 data (``school, y, x``) from :func:`mlsml.simulate.simulate_data` and the subject outcome ``Y``.

    ``simulate_data`` does not return its school effects; they are recovered by replaying its
    random-number stream (the same generator calls in the same order) and checked by rebuilding
    ``y`` from them exactly, so a change of ``simulate_data`` stops the study instead of
    corrupting the truth.
    """
    from mlsml.simulate import simulate_data

    df = simulate_data([n] * J, beta=(0.0, BETA), alpha=(ALPHA0, 0.0), cov=SIGMA, x_between_sd=0.0, seed=seed)
    rng = np.random.default_rng(seed)  # replay: xm, x, b, then the level-1 errors
    rng.normal(0, 0.0, J)
    rng.normal(0, 1.0, J * n)
    b = rng.multivariate_normal(np.zeros(2), SIGMA, size=J)
    e = rng.standard_normal(J * n)
    s = df["school"].to_numpy() - 1
    y = BETA * df["x"].to_numpy() + b[s, 0] + np.exp(0.5 * (ALPHA0 + b[s, 1])) * e
    if not np.array_equal(y, df["y"].to_numpy()):
        raise RuntimeError("replaying simulate_data's random numbers did not rebuild y: its draws changed")
    g0, gu, gv = GAMMA
    Y = g0 + gu * b[:, 0] + gv * b[:, 1] + np.sqrt(RESID_VAR) * np.random.default_rng([seed, 2]).standard_normal(J)
    return df[["school", "y", "x"]], pd.DataFrame({"school": np.arange(1, J + 1), "Y": Y})


def def_text(nreps: int, seed: int, name: str = "sim") -> str:
    """A MixWILD 2.0 job (``lsboth_random_mixblank.def``) for ``data.dat`` = id, y, x, Y.

    Settings line (MixWILD 2.0 layout, :mod:`mlsml.mixregls.deffile`): ``NVAR P R S PNINT RNINT SNINT
    PV RV SV CONV NQ AQUAD MAXIT YMISS NCENT NCOV RIDGEIN DISCARD0 MLS CHOL NREPS CUTOFF NORS MYSEED
    STAGE2 MULTI2ND SEPFILE``; then the id and response columns, the mean and WS-variance
    covariate columns, the labels, the stage-2 counts ``PFIXED PTHETA POMEGA PTO = 0 0 0 -1``
    (intercept, ``Locat_1``, ``Scale_1``; no ``Locat_1*Scale``), the outcome column and label.
    """
    return "\n".join(
        [
            "mlsml simulation (validation/mixwild_stage2_sim.py): y ~ x; WS ~ x; Y ~ Locat_1 + Scale_1",
            "second title line",
            "data.dat",
            name,
            f"4 1 0 1 0 0 0 0 0 0 0.00001 11 1 200 {YMISS} 0 1 0.15 0 0 0 {nreps} 0 0 {seed} 1 0 0",
            "1 2",
            "3",
            "3",
            "y",
            "x",
            "x",
            "0 0 0 -1",
            "4",
            "Y",
            "",
        ]
    )


def write_job(folder: Path, df: pd.DataFrame, schools: pd.DataFrame, nreps: int, seed: int) -> None:
    """``data.dat`` (space-delimited, no header: id, y, x, Y) and ``lsboth_random_mixblank.def`` in ``folder``."""
    Y = schools.set_index("school")["Y"].reindex(df["school"]).to_numpy()
    data = np.column_stack([df["school"].to_numpy(), df["y"].to_numpy(), df["x"].to_numpy(), Y])
    np.savetxt(folder / "data.dat", data, fmt=["%d", "%.10f", "%.10f", "%.10f"])
    (folder / "lsboth_random_mixblank.def").write_text(def_text(nreps, seed))


def run_mixwild(df: pd.DataFrame, schools: pd.DataFrame, nreps: int, seed: int) -> tuple[pd.DataFrame, float, float]:
    """MixWILD's pooled stage-2 table (estimate, se), its stage-1 log-likelihood and its run time."""
    with tempfile.TemporaryDirectory(prefix="mwsim") as tmp:
        folder = Path(tmp)
        write_job(folder, df, schools, nreps, seed)
        for p in PROGRAMS:
            shutil.copy(MIXWILD_BIN / p, folder / p)
        (folder / "work").mkdir()
        t = time.perf_counter()
        subprocess.run(
            ["nice", "-n", "10", "./lsboth_random_mixblank"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
            check=False,
            timeout=1800,
        )
        secs = time.perf_counter() - t
        tab = _parse_table(folder / "sim_stage2.out")
        llf = _stage1_loglik(folder / "sim_stage1.out")
    return tab, llf, secs


def run_mlsml(df: pd.DataFrame, schools: pd.DataFrame, nreps: int, seed: int) -> tuple[dict[str, pd.DataFrame], float, bool]:
    """mlsml's stage 1 and its stage 2 (mi, joint) on MixWILD's standardised scale."""
    import mlsml

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        a, b, c = _theta_map(res)
        t1, t2 = f"I({a!r} * u0)", f"I({b!r} * v + {c!r} * u0)"
        formula = f"Y ~ {t1} + {t2}"
        names = {"Intercept": "Intercept", t1: "theta1", t2: "theta2", "var(resid)": "var(resid)"}
        out = {}
        mi = res.stage2(formula, data=schools, method="mi", ndraws=nreps, seed=seed)
        ci = mi.conf_int()
        M = mi.ndraws
        # MixWILD's pooling (stage2only.f90): sum(U) / (M - 1) + B, the (1 + 1/M) lost to an integer division
        se_mw = np.sqrt(np.asarray(mi.info["within"]) * M / (M - 1) + np.asarray(mi.info["between"]))
        out["mlsml mi"] = pd.DataFrame(
            {"estimate": mi.params, "se": mi.bse, "lo": ci["lower"], "hi": ci["upper"], "fmi": mi.fmi, "se_mixwild_rule": se_mw},
            index=mi.params.index,
        )
        # the joint model takes the effects as plain factors: Y ~ u0 + v, mapped to theta afterwards,
        # gamma_theta = T gamma_(u0, v) with T = [[1/a, -c/(a b)], [0, 1/b]] (a, b, c fixed at the estimates, as
        # the mi formula's are)
        js = res.stage2("Y ~ u0 + v", data=schools, method="joint")
        T = np.eye(len(js.params))
        k = {name: i for i, name in enumerate(js.params.index)}
        iu, iv = k["u0"], k["v"]
        T[iu, iu], T[iu, iv], T[iv, iv] = 1.0 / a, -c / (a * b), 1.0 / b
        est = T @ js.params.to_numpy()
        se = np.sqrt(np.diag(T @ js.cov_params().to_numpy() @ T.T))
        z = 1.959963984540054
        idx = [{"u0": t1, "v": t2}.get(i, i) for i in js.params.index]
        out["mlsml joint"] = pd.DataFrame({"estimate": est, "se": se, "lo": est - z * se, "hi": est + z * se}, index=idx)
    for k in out:
        out[k].index = [names.get(i, i) for i in out[k].index]
    return out, res.llf, bool(res.converged and js.converged)


def run_one(n: int, rep: int, nreps: int) -> list[dict]:
    seed = BASE_SEED + 1000 * n + rep
    df, schools = make_data(n, seed)
    t = time.perf_counter()
    tables, llf, ok = run_mlsml(df, schools, nreps, seed)
    ml_secs = time.perf_counter() - t
    try:
        mw, llf_mw, mw_secs = run_mixwild(df, schools, nreps, seed)
        mw = mw.rename(index={"var(resid)": "var(resid)"})
        z = 1.959963984540054  # MixWILD's tests use the normal distribution
        tables["MixWILD"] = mw.assign(lo=mw["estimate"] - z * mw["se"], hi=mw["estimate"] + z * mw["se"])
        mw_ok = True
    except (FileNotFoundError, StopIteration, ValueError, KeyError, subprocess.TimeoutExpired):
        llf_mw, mw_secs, mw_ok = np.nan, np.nan, False
    truth = truth_theta()
    rows = []
    for method, tab in tables.items():
        for name, row in tab.iterrows():
            if name not in truth:
                continue
            rows.append(
                {
                    "n": n,
                    "rep": rep,
                    "seed": seed,
                    "method": method,
                    "param": name,
                    "truth": truth[name],
                    "estimate": row["estimate"],
                    "se": row["se"],
                    "lo": row["lo"],
                    "hi": row["hi"],
                    "fmi": row.get("fmi", np.nan),
                    "se_mixwild_rule": row.get("se_mixwild_rule", np.nan),
                    "llf_mlsml": llf,
                    "llf_mixwild": llf_mw,
                    "mlsml_converged": ok,
                    "mixwild_ran": mw_ok,
                    "seconds": mw_secs if method == "MixWILD" else ml_secs,
                }
            )
    return rows


def run(n: int, reps: int, nreps: int = NREPS, jobs: int = 2, first: int = 0, out: Path = OUT) -> pd.DataFrame:
    """Replications ``first .. reps - 1`` of ``n``, ``jobs`` at a time, appended to ``out`` as each ends."""
    old = pd.read_csv(out) if Path(out).exists() else pd.DataFrame()
    rows = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for part in pool.map(lambda r: run_one(n, r, nreps), range(first, reps)):
            rows += part
            new = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
            new = new.drop_duplicates(subset=["n", "rep", "method", "param"], keep="last")
            new.to_csv(out, index=False)
            print(f"n = {n}: replication {part[0]['rep']} done", flush=True)
    return pd.read_csv(out)


def _usable(df: pd.DataFrame) -> pd.Series:
    """Rows of replications where mlsml converged, MixWILD ran and its stage 1 reached mlsml's maximum."""
    at_max = (df["llf_mlsml"] - df["llf_mixwild"]).abs() < LLF_TOL
    return df["mlsml_converged"] & df["mixwild_ran"] & at_max


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per n, parameter and method: mean estimate, relative bias, empirical SD, mean SE, coverage, Monte Carlo SEs."""
    ok = df[_usable(df)]
    rows = []
    for (n, param, method), d in ok.groupby(["n", "param", "method"], sort=False):
        R = len(d)
        t = d["truth"].iloc[0]
        cov = float(((d["lo"] <= t) & (t <= d["hi"])).mean())
        sd = d["estimate"].std(ddof=1)
        rows.append(
            {
                "n": n,
                "param": param,
                "method": method,
                "truth": t,
                "mean est": d["estimate"].mean(),
                "median est": d["estimate"].median(),
                "rel. bias (MC SE)": f"{(d['estimate'].mean() - t) / abs(t):+.3f} ({sd / np.sqrt(R) / abs(t):.3f})",
                "emp. SD": sd,
                "mean SE": d["se"].mean(),
                "median SE": d["se"].median(),
                "coverage (MC SE)": f"{cov:.2f} ({np.sqrt(0.95 * 0.05 / R):.2f})",
                "reps": R,
            }
        )
    return pd.DataFrame(rows)


ORDER = {"MixWILD": 0, "mlsml mi": 1, "mlsml joint": 2}


def section() -> str:
    """The report's subsection of section 8 (reads the committed CSV; does not rerun MixWILD)."""
    lines = ["### Against MixWILD on a simulated design with known truth", ""]
    if not OUT.exists():
        return "\n".join(lines + ["**Not produced**: run `python -m validation.mixwild_stage2_sim`.", ""])
    df = pd.read_csv(OUT)
    ok = df[_usable(df)]
    reps = ok.groupby("n")["rep"].nunique()
    per_rep = df.assign(usable=_usable(df)).groupby(["n", "rep"])
    n_bad = int((~per_rep["usable"].all()).sum())
    mw_off = df[df["mixwild_ran"] & ((df["llf_mlsml"] - df["llf_mixwild"]).abs() >= LLF_TOL)].drop_duplicates(["n", "rep"])
    nreps = NREPS
    tr = truth_theta()
    lines += [
        "Issue 13's second comparison (`validation/mixwild_stage2_sim.py`): section 7's gaussian design, J = 100 "
        "subjects of n = " + " or ".join(str(n) for n in reps.index) + " observations, data from "
        "`mlsml.simulate.simulate_data` (y = 0.5 x + u + e, ln var(e) = -0.5 + v, var(u) = var(v) = 0.25, "
        "cov(u, v) = 0.05) and a subject-level `Y = 0.5 + u + v + N(0, 0.25)`. Each replication was written in "
        "MixWILD's format (`data.dat` and a MixWILD 2.0 .def: stage 1 `y ~ x`, `x` in the WS variance, random scale, "
        f"linear association, 11 adaptive points; stage 2 `STAGE2 = 1`, `PFIXED PTHETA POMEGA PTO = 0 0 0 -1`, "
        f"`NREPS = {nreps}`) and run by the MixWILD 2.0 binaries of `validation/reference/mixwild_stage2/README.md`; "
        f'the same data by mlsml (the same stage-1 model), `res.stage2(..., method="mi", ndraws={nreps})` and '
        '`method="joint"`. Replications: '
        + ", ".join(f"{int(r)} with n = {n}" for n, r in reps.items())
        + f" (left out: {n_bad}: a MixWILD run without output, a MixWILD stage 1 whose log-likelihood is not within "
        f"{LLF_TOL} of mlsml's, or an mlsml fit that did not converge); per-replication rows in "
        "`validation/results/mixwild_stage2_sim.csv`.",
        "",
        "**One scale: MixWILD's.** MixWILD's regressors are its standardised effects theta1 = u / sigma_u and "
        "theta2 = (v - LocEff theta1) / SD (`ThetaMap`, `docs/stage2.md`). mlsml's `mi` is given the regressors "
        "`I(a*u0)` and `I(b*v + c*u0)` (a, b, c from its stage-1 estimates, as above); its `joint` model takes u0 and "
        "v as plain factors, so `Y ~ u0 + v` is fitted and its coefficients mapped by the same (a, b, c) (standard "
        "errors by the delta method with the map fixed, as the `mi` formula fixes it). The truth is mapped through the "
        f"true Sigma: Y = 0.5 + (sigma_u + LocEff) theta1 + SD theta2 + e, coefficients {tr['theta1']:.4f} and "
        f"{tr['theta2']:.4f}, residual variance {tr['var(resid)']}. MixWILD's intervals are estimate +- 1.96 SE (its "
        "tests are normal), mlsml's its own (`mi`: t with Barnard-Rubin df).",
        "",
    ]
    dl = (ok["llf_mlsml"] - ok["llf_mixwild"]).abs()
    off = "; ".join(
        f"n = {r.n}, replication {r.rep}: MixWILD {r.llf_mixwild:.3f} against mlsml {r.llf_mlsml:.3f}" for r in mw_off.itertuples()
    )
    lines += [
        f"**Stage 1** agrees in {len(ok.drop_duplicates(['n', 'rep']))} replications: largest |log-likelihood difference| "
        f"{dl.max():.4f} (MixWILD prints 3 decimals)."
        + (
            f" In {len(mw_off)} MixWILD's stage 1 ended far from the maximum ({off}); its stage-2 theta "
            "coefficients there are exactly 0 where its log-likelihood is the recurring -70839.642 (its EB means all 0) "
            "and off elsewhere; those replications are left out."
            if len(mw_off)
            else ""
        ),
        "",
    ]
    summ = summarise(df)
    summ["_o"] = summ["method"].map(ORDER)
    summ = summ.sort_values(["n", "param", "_o"], kind="stable").drop(columns="_o")
    for n, part in summ.groupby("n", sort=True):
        head = f"**n = {n} observations per subject** (relative bias with its Monte Carlo SE; coverage with the Monte Carlo SE"
        lines += [head + " of a 0.95 coverage)", ""]
        lines += [md_table(part.drop(columns="n"), digits=3, index=False), ""]
    # paired agreement of MixWILD and mlsml mi, replication by replication
    wide = ok.pivot_table(index=["n", "rep", "param"], columns="method", values="estimate")
    diff = (wide["mlsml mi"] - wide["MixWILD"]).groupby(level=["n", "param"])
    emp = wide["MixWILD"].groupby(level=["n", "param"]).std()
    pair = pd.DataFrame(
        {"mean diff": diff.mean(), "median diff": diff.median(), "SD of diff": diff.std(), "MixWILD emp. SD": emp}
    ).reset_index()
    lines += [
        "**MixWILD against mlsml `mi`, replication by replication** (mlsml minus MixWILD, same data):",
        "",
        md_table(pair, digits=3, index=False),
        "",
    ]
    # MixWILD's pooling rule applied to mlsml's imputations
    mi = ok[ok["method"] == "mlsml mi"]
    ratio = (mi["se_mixwild_rule"] / mi["se"]).groupby([mi["n"], mi["param"]]).mean()
    half = 1.959963984540054 * mi["se_mixwild_rule"]
    inside = (mi["estimate"] - half <= mi["truth"]) & (mi["truth"] <= mi["estimate"] + half)
    cover_mw_rule = inside.groupby([mi["n"], mi["param"]]).mean()
    pool = pd.DataFrame({"SE ratio (MixWILD rule / Rubin)": ratio, "coverage with MixWILD's rule": cover_mw_rule}).reset_index()
    lines += [
        f"**MixWILD's pooled-SE formula** (`sum(U) / (M - 1) + B`, the (1 + 1/M) factor lost to an integer division; "
        f"M = {nreps}) applied to mlsml's own imputations, against Rubin's `Ubar + (1 + 1/M) B`:",
        "",
        md_table(pool, digits=3, index=False),
        "",
    ]
    lines += _findings(summ, pair, pool, ok)
    return "\n".join(lines)


#: What the one blown-up ``mi`` fit of the committed run (n = 5, replication 22) is (examined by hand).
_REP22 = (
    " With n = 5, replication 22, the stage-1 estimate of corr(u0, v) is 0.96: mlsml's proper imputations draw the "
    "stage-1 parameters too, and a draw near the singular Sigma makes the drawn u0 and v (hence the regressors "
    "`I(a*u0)`, `I(b*v + c*u0)`, whose a, b, c are fixed at the estimates) nearly collinear in some imputations, "
    "so their coefficients and SEs explode (theta1 5.3 (SE 37), theta2 8.1 (SE 63); without stage-1 uncertainty "
    "the `Y ~ u0 + v` fit has SEs about 1). MixWILD draws at the estimates in its orthogonalised theta and does not "
    "see it; the joint model is unaffected there. Such replications dominate the `mi` means and empirical SDs at "
    "n = 5, hence the median columns and the medians below. (The joint fits named have a nearly unidentified scale "
    "effect and a very large delta-method SE.)"
)


def _findings(summ: pd.DataFrame, pair: pd.DataFrame, pool: pd.DataFrame, ok: pd.DataFrame) -> list[str]:
    """The subsection's conclusions, their numbers read from the tables above."""
    s = summ.set_index(["n", "param", "method"])

    def rb(n, p, m):  # relative bias of the median estimate (robust to the blow-ups below)
        t = s.loc[(n, p, m), "truth"]
        return f"{(s.loc[(n, p, m), 'median est'] - t) / t:+.2f}"

    ns = sorted(summ["n"].unique())
    att = "; ".join(
        f"n = {n}: theta1 {rb(n, 'theta1', 'MixWILD')} (MixWILD), {rb(n, 'theta1', 'mlsml mi')} (mi), "
        f"{rb(n, 'theta1', 'mlsml joint')} (joint); theta2 {rb(n, 'theta2', 'MixWILD')}, {rb(n, 'theta2', 'mlsml mi')}, "
        f"{rb(n, 'theta2', 'mlsml joint')}"
        for n in ns
    )
    eff = pair[pair["param"].isin(["theta1", "theta2"])]
    worst = float((eff["median diff"].abs() / eff["MixWILD emp. SD"]).max())
    big = max(ns)
    se = {m: s.loc[(big, "Intercept", m), "mean SE"] for m in ORDER}
    cov = {m: s.loc[(big, "Intercept", m), "coverage (MC SE)"].split(" ")[0] for m in ORDER}
    emp = s.loc[(big, "Intercept", "mlsml mi"), "emp. SD"]
    r = pool["SE ratio (MixWILD rule / Rubin)"]
    th = ok[ok["param"].isin(["theta1", "theta2"])]
    med = th.groupby(["n", "param", "method"])["se"].transform("median")
    blown = th[th["se"] > BLOWUP * med].drop_duplicates(["n", "rep", "method"])
    blow = "; ".join(f"{r.method}, n = {r.n}, replication {r.rep}" for r in blown.itertuples()) or "none"
    return [
        "What it shows:",
        "",
        "- **MixWILD and mlsml `mi` agree with each other**, replication by replication: the median paired difference "
        f"of the theta coefficients is at most {worst:.2f} of their empirical SD (the exact posterior against MixWILD's "
        "normal approximation with its transposed Cholesky factor, mlsml's proper imputations, and the Monte Carlo "
        "error of 20 imputations). The residual variance differs by about the divisor: mixreg's ML `n` against "
        "mlsml's `n - p` (100/97).",
        f"- **Stage-2 fits with an SE over {BLOWUP} times the method's median**: {blow}."
        + (_REP22 if ((blown["method"] == "mlsml mi") & (blown["n"] == 5) & (blown["rep"] == 22)).any() else ""),
        f"- **Both two-stage methods are attenuated against the joint model and the truth** (relative bias of the "
        f"median estimate, {att}). The attenuation is section 7's: the imputations are drawn from the stage-1 "
        "posterior p(theta_j | y_j), which does not condition on Y_j, so only the E[theta_j | y_j] part of a draw "
        "carries information on Y_j and the coefficient is shrunk by about the reliability of the effect (least "
        "reliable: the scale with n = 5); the lost part of the regression moves into the residual variance, which "
        "both overestimate. Rubin's rules (or MixWILD's) cannot undo an uncongenial imputation model; coverage of the "
        "effects falls accordingly. The joint model integrates each subject's effects with Y_j in the likelihood and "
        "recovers the truth (its n = 5 scale coefficient is noisy: in a few replications the scale effect is nearly "
        "unidentified and its delta-method SE very large, hence mean SE above median SE). On this scale every method's "
        "SE treats the map (a, b, c), i.e. the estimated Sigma, as known, while the truth uses the true Sigma; that is "
        "why even the joint model's theta coverage with n = 40 is below 0.95 (its mean SE below its empirical SD); on "
        "the u0, v scale of section 7 the same joint fits cover at 0.93 to 0.95.",
        f"- **MixWILD's intercept SE ignores the stage-1 uncertainty**: with n = {big}, its mean SE {se['MixWILD']:.3f} "
        f"against mlsml `mi` {se['mlsml mi']:.3f} and `joint` {se['mlsml joint']:.3f} (empirical SD {emp:.3f}); "
        f"coverage {cov['MixWILD']} against {cov['mlsml mi']} and {cov['mlsml joint']}. MixWILD draws the effects "
        "at the stage-1 estimates; the estimated fixed intercept shifts every subject's location effect together, "
        "which only the outcome's intercept absorbs. mlsml's default `stage1_uncertainty=True` carries it.",
        f"- **MixWILD's pooled-SE formula** (`sum(U)/(M - 1) + B`) changes the SEs of mlsml's own imputations by a "
        f"factor {r.min():.3f} to {r.max():.3f} at M = {NREPS} against Rubin's rule: a small inflation of the "
        "within part (1/(M - 1)) against a small loss of the between part (B/M), immaterial beside the attenuation.",
        "",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m validation.mixwild_stage2_sim", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--nreps", type=int, default=NREPS, help="imputations (MixWILD's NREPS and mlsml's ndraws)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    run(a.n, a.reps, a.nreps, a.jobs, a.first, Path(a.out))


if __name__ == "__main__":
    main()
