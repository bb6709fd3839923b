"""Section 1c: association types against MIXREGLS (NCOV = 0 none, 1 linear, 2 quadratic).

References:

- ``validation/reference/mixregls_assoc/`` (copied from ``shared/validation/mixregls_assoc``):
  MIXREGLS (``mixregls_var.f90``, gfortran -O1), Model 3 on exam, riesby and seed_sim with NCOV = 0
  and 2 (riesby also 1), 21 adaptive points, full-precision logL, estimates and inverse information,
  and an independent rotated-AGQ logL at the program's estimates (11 to 100 points);
- ``validation/reference/mixregls_fortran_runs/riesby_assoc_{none,quadratic}.json``: MixWILD 2.0's
  MIXREGLS_both with a BS variance model (``bs_formula="~ endog"``), 11 unrotated points;
- ``validation/results/mixregls_assoc_built.json``: MIXREGLS built here from the same source
  (``python -m validation.mixregls_assoc --build``, see :func:`run_posmood`), NCOV = 0 and 2 on
  posmood (17,514 prompts, 515 subjects; BS variance ``~ genderf``: R = 1), 21 points; the same
  ``.def`` is run by ``mlsml mixregls`` (:func:`mlsml.mixregls.run_job`).

Tolerances: logL against the exact value at MIXREGLS's estimates (the independent 100-point
evaluation), ``|diff| <= 1e-5``; estimates ``|diff| <= max(1e-4, 0.01 SE)`` and SEs within 0.5%
(as section 1), compared in MIXREGLS's own parameters (:func:`mlsml.mixregls.to_mixregls`: BETA,
ALPHA = ln var(u0), TAU, Std Dev, Loc Eff, Quad Loc). The 11-point MIXREGLS_both runs: logL within
5e-3 (its rule is 2.4e-3 off on riesby's linear model), estimates within 0.05 SE, SEs within 3%.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .common import REFERENCE, RESULTS, SHARED, fit_quiet, load_json, log, md_table, md_tables, passfail

DATA = {"exam": ("normexam", "standLRT", "school"), "seed_sim": ("y", "x", "school"), "riesby": ("hamdep", "week", "id")}
RUNS = [
    "exam__m3_ncov0",
    "exam__m3_ncov2",
    "seed_sim__m3_ncov0",
    "seed_sim__m3_ncov2",
    "riesby__m3_ncov0",
    "riesby__m3_ncov1",
    "riesby__m3_ncov2",
]
ASSOCIATION = {0: "none", 1: "linear", 2: "quadratic"}
POSMOOD_RESULT = RESULTS / "mixregls_assoc_built.json"
#: MixWild commit of the MIXREGLS source (the shared references' build)
MIXWILD_COMMIT = "85921083ec3ede3bf9f800679d0b65b41201ac6b"


def _data(name: str) -> pd.DataFrame:
    import mlsml

    if name == "riesby":
        return mlsml.datasets.riesby()
    if name == "posmood":
        return pd.read_csv(SHARED / "data" / "posmood.csv")
    return pd.read_csv(Path(__file__).resolve().parents[1] / "tests" / "data" / f"{name}.csv")


def _compare(res, raw: dict, x: str) -> pd.DataFrame:
    """Our estimates in MIXREGLS's parameters beside the program's (raw_parameters of a reference JSON)."""
    from mlsml.mixregls import to_mixregls

    ours = to_mixregls(res)
    rows = []
    for _, r in ours.iterrows():
        key = r["ref_key"]
        theirs = raw.get(key) or raw.get(key.replace(f"_{x}", "_x"))
        rows.append(
            {
                "parameter": f"{r['block']}:{r['term']}",
                "ours": r["estimate"],
                "ours SE": r["std err"],
                "MIXREGLS": theirs["estimate"],
                "MIXREGLS SE": theirs["se"],
                "diff": r["estimate"] - theirs["estimate"],
                "diff/SE": (r["estimate"] - theirs["estimate"]) / theirs["se"],
                "SE rel diff": r["std err"] / theirs["se"] - 1,
            }
        )
    return pd.DataFrame(rows).set_index("parameter")


def _verdict(table: pd.DataFrame, dll: float, ll_tol: float, se_tol: float, est_se: float | None = None) -> bool:
    if est_se is None:
        est_ok = bool(np.all(np.abs(table["diff"]) <= np.maximum(1e-4, 0.01 * table["MIXREGLS SE"])))
    else:
        est_ok = bool(np.all(np.abs(table["diff/SE"]) <= est_se))
    return bool(abs(dll) <= ll_tol and est_ok and np.all(np.abs(table["SE rel diff"]) <= se_tol))


def _assoc_runs() -> tuple[list[dict], dict]:
    import mlsml
    from mlsml.mixregls import from_mixregls

    rows, tables = [], {}
    for run in RUNS:
        ref = load_json(REFERENCE / "mixregls_assoc" / f"{run}.json")
        dataset, model = run.split("__")
        ncov = int(model[-1])
        y, x, g = DATA[dataset]
        df = _data(dataset)
        log(f"  {run}")
        t0 = time.perf_counter()
        res, msgs = fit_quiet(f"{y} ~ {x}", df, groups=g, scale_formula=f"~ {x}", association=ASSOCIATION[ncov])
        elapsed = time.perf_counter() - t0
        exact = ref["independent_check"]["independent_loglik_by_nq"]["100"]
        table = _compare(res, ref["raw_parameters"], x)
        # our likelihood at MIXREGLS's own estimates: a check of the integrand independent of the optimiser
        est = {f"{b}": v for b, v in zip(table.index, table["MIXREGLS"])}
        theirs = from_mixregls(est, bs=False)
        ll_at_theirs = mlsml.MELSM.from_formula(
            f"{y} ~ {x}", df, groups=g, scale_formula=f"~ {x}", association=ASSOCIATION[ncov]
        ).loglike(theirs)
        ok = _verdict(table, res.llf - exact, 1e-5, 5e-3) and res.converged
        rows.append(
            {
                "reference": run,
                "association": ASSOCIATION[ncov],
                "rule": f"{res.quadrature} {res.nagq}",
                "our logL": res.llf,
                "MIXREGLS logL": ref["loglik"],
                "exact logL at theirs": exact,
                "ours − exact": res.llf - exact,
                "our logL at theirs − exact": ll_at_theirs - exact,
                "max |diff|/SE": float(np.abs(table["diff/SE"]).max()),
                "max SE rel diff": float(np.abs(table["SE rel diff"]).max()),
                "fit s": elapsed,
                "result": passfail(ok),
            }
        )
        tables[run] = table
    return rows, tables


def _side_by_side(res, est: dict, se: dict) -> pd.DataFrame:
    """Our estimates in MIXREGLS's parameters beside a run's (keys ``"<BLOCK>:<term>"``)."""
    from mlsml.mixregls import to_mixregls

    rows = []
    for idx, r in to_mixregls(res).iterrows():
        rows.append(
            {
                "parameter": idx,
                "ours": r["estimate"],
                "ours SE": r["std err"],
                "MIXREGLS": est[idx],
                "MIXREGLS SE": se[idx],
                "diff": r["estimate"] - est[idx],
                "diff/SE": (r["estimate"] - est[idx]) / se[idx],
                "SE rel diff": r["std err"] / se[idx] - 1,
            }
        )
    return pd.DataFrame(rows).set_index("parameter")


#: Why a comparison of section 1c differs, when it is understood.
EXPLAINED = {
    "riesby_assoc_quadratic": (
        "MixWILD 2.0's 11-point unrotated rule, not the model: MIXREGLS built here from the 2017 source reproduces "
        "this run to every printed digit at 11 points (next row), and at 21 points (last row) its estimates move to "
        "ours (within 0.0005 SE) and its SEs to within 0.4% of ours (the SE of ALPHA:Intercept from 4.5% to 0.02%); "
        "its 21-point logL is still 3e-4 below ours, its axis-wise rule's error on these small clusters"
    ),
}


def _mixwild2_runs() -> tuple[list[dict], dict, list[str]]:
    """MixWILD 2.0's MIXREGLS_both, riesby with a BS variance model, NCOV = 0 and 2 (11 unrotated points),
    and the same quadratic model by MIXREGLS built here at 11 and 21 points (when its results are there)."""
    from .fortran_runs import RIESBY, _riesby

    labels = {
        "Random scale standard deviation": "SCALE_SD:Std Dev",
        "Random location (mean) effect on WS variance": "LOC_EFF:Loc  Eff",
        "Random quadratic location (mean) effects on WS variance": "QUAD_LOC:Quad Loc",
    }
    built = load_json(POSMOOD_RESULT)["runs"] if POSMOOD_RESULT.exists() else {}
    rows, tables, notes = [], {}, []
    for name, assoc in (("riesby_assoc_none", "none"), ("riesby_assoc_quadratic", "quadratic")):
        ref = load_json(REFERENCE / "mixregls_fortran_runs" / f"{name}.json")
        st = ref["stages"][ref["final_stage"]]
        res, _ = fit_quiet(data=_riesby(), association=assoc, **RIESBY)
        est, se = {}, {}
        for p in st["parameters"]:
            term = "Intercept" if p["name"] == "intercept" else p["name"]
            k = f"{p['block']}:{term}" if p["block"] in ("BETA", "ALPHA", "TAU") else labels[p["block"]]
            est[k], se[k] = p["estimate"], p["se"]
        runs = [(f"{name} (MixWILD 2.0, 11 points)", est, se, st["loglik"], "11")]
        if assoc == "quadratic":
            for key, nq in (("rbq11", "11"), ("rbq21", "21")):
                if key in built:
                    b = built[key]
                    runs.append((f"same model, MIXREGLS built here, {nq} points", b["estimates"], b["se"], b["loglik"], nq))
        for label, e, s_, ll, nq in runs:
            table = _side_by_side(res, e, s_)
            dll = res.llf - ll
            if nq == "11":
                ok = _verdict(table, dll, 5e-3, 0.03, est_se=0.05)
            else:
                ok = _verdict(table, dll, 1e-3, 5e-3, est_se=0.01)
            verdict = passfail(ok and res.converged)
            if verdict != "PASS" and name in EXPLAINED and nq == "11":
                verdict += " (explained)"
                note = f"- `{name}` at 11 points: {EXPLAINED[name]}."
                if note not in notes:
                    notes.append(note)
            rows.append(
                {
                    "reference": label,
                    "association": assoc,
                    "our logL": res.llf,
                    "MIXREGLS logL": ll,
                    "ours − theirs": dll,
                    "max |diff|/SE": float(np.abs(table["diff/SE"]).max()),
                    "max SE rel diff": float(np.abs(table["SE rel diff"]).max()),
                    "result": verdict,
                }
            )
            tables[label] = table
    return rows, tables, notes


# ---------------------------------------------------------------- posmood: MIXREGLS built from source here

POSMOOD_DEF = (
    "posmood ncov={ncov} nq=21\nMIXREGLS location-scale model, BS ~ genderf\ndata.dat\nmodel.out\nmodel_echo.def\n"
    "4 2 1 2 0 0 0 0 0 0 1.0E-05 21 1 200 0 0 {ncov} 0.1 0\n1 2\n3 4\n4\n3 4\nposmood\nalone genderf\ngenderf\nalone genderf\n"
)


def _parse_est(path: Path) -> list[dict]:
    """MIXREGLS5.EST: per printed block -2logL, iterations, then BETA, ALPHA, TAU, random-scale and SE lines."""
    blocks, cur = [], None
    for line in path.read_text().splitlines():
        toks = line.split()
        if len(toks) == 3 and re.fullmatch(r"\d+", toks[1]) and re.fullmatch(r"\d+", toks[2]):
            cur = {"m2ll": float(toks[0]), "iter": int(toks[1]), "values": []}
            blocks.append(cur)
        elif cur is not None:
            cur["values"] += [float(t) for t in toks]
    return blocks


def run_posmood(workdir: Path) -> dict:
    """Build MIXREGLS (gfortran -O1) from the MixWild source and run NCOV = 0 and 2 on posmood; the numbers to JSON."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "mixregls_var.f90"
    mirror = Path("/work/.mirror/eldinidle+MixWild/repo")
    src.write_bytes(
        subprocess.run(
            ["git", "-C", str(mirror), "show", f"{MIXWILD_COMMIT}:mixregls_var.f90"], check=True, capture_output=True
        ).stdout
    )
    subprocess.run(["gfortran", "-O1", "-o", str(workdir / "mixregls"), str(src)], check=True, capture_output=True)
    df = _data("posmood")
    out = {"program": f"mixregls_var.f90, MixWild commit {MIXWILD_COMMIT}, gfortran -O1", "runs": {}}
    for ncov in (0, 2):
        d = workdir / f"posmood{ncov}"
        d.mkdir(exist_ok=True)
        (d / "data.dat").write_text(df[["id", "posmood", "alone", "genderf"]].to_csv(sep=" ", header=False, index=False))
        (d / "mixregls_var.def").write_text(POSMOOD_DEF.format(ncov=ncov))
        t0 = time.perf_counter()
        subprocess.run([str(workdir / "mixregls")], cwd=d, check=True, capture_output=True)
        out["runs"][f"posmood{ncov}"] = _read_run(d, BUILT_RUNS[f"posmood{ncov}"], time.perf_counter() - t0)
    return out


#: Parameters of the runs made here, in MIXREGLS's order before the random-scale ones (MIXREGLS5.EST).
BUILT_RUNS = {
    "posmood0": ["BETA:Intercept", "BETA:alone", "BETA:genderf", "ALPHA:Intercept", "ALPHA:genderf", "TAU:Intercept"]
    + ["TAU:alone", "TAU:genderf"],
    "posmood2": ["BETA:Intercept", "BETA:alone", "BETA:genderf", "ALPHA:Intercept", "ALPHA:genderf", "TAU:Intercept"]
    + ["TAU:alone", "TAU:genderf"],
    "rbq11": ["BETA:Intercept", "BETA:week", "BETA:endog", "BETA:endweek", "ALPHA:Intercept", "ALPHA:endog"]
    + ["TAU:Intercept", "TAU:week", "TAU:endog"],
    "rbq21": ["BETA:Intercept", "BETA:week", "BETA:endog", "BETA:endweek", "ALPHA:Intercept", "ALPHA:endog"]
    + ["TAU:Intercept", "TAU:week", "TAU:endog"],
}


def _read_run(d: Path, names: list[str], seconds: float | None) -> dict:
    """The final block of a run: logL, iterations, estimates and SEs in MIXREGLS's order (MIXREGLS5.EST)."""
    last = _parse_est(d / "MIXREGLS5.EST")[-1]
    vals = last["values"]
    n = len(vals) // 2
    ncov = n - len(names) - 1
    names = names + (["LOC_EFF:Loc  Eff"] if ncov >= 1 else []) + (["QUAD_LOC:Quad Loc"] if ncov == 2 else [])
    names = names + ["SCALE_SD:Std Dev"]
    if len(names) != n:
        raise ValueError(f"{d}: {len(vals)} values for {names}")
    text = (d / "MIXREGLS52.OUT").read_text() if (d / "MIXREGLS52.OUT").exists() else ""
    return {
        "loglik": -0.5 * last["m2ll"],
        "iterations": last["iter"],
        "estimates": dict(zip(names, vals[:n])),
        "se": dict(zip(names, vals[n:])),
        "cpu_seconds": seconds,
        "converged": "CONVERGENCE CRITERION WAS NOT ACHIEVED" not in text,
    }


def _posmood_section() -> list[str]:
    from mlsml.mixregls.job import run_job

    out = []
    if not POSMOOD_RESULT.exists():
        missing = "`validation/results/mixregls_assoc_built.json` is missing"
        return [f"**Not produced**: {missing} (run `python -m validation.mixregls_assoc --build DIR`)."]
    if not (SHARED / "data" / "posmood.csv").exists():
        return ["posmood comparison skipped: `../shared/data/posmood.csv` is not available."]
    ref = load_json(POSMOOD_RESULT)
    rows, tables = [], {}
    import tempfile

    df = _data("posmood")
    for name, run in ref["runs"].items():
        if not name.startswith("posmood"):
            continue
        ncov = int(name[-1])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "data.dat").write_text(df[["id", "posmood", "alone", "genderf"]].to_csv(sep=" ", header=False, index=False))
            (tmp / "job.def").write_text(POSMOOD_DEF.format(ncov=ncov))
            log(f"  posmood NCOV = {ncov} by mlsml mixregls")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                job = run_job(tmp / "job.def", stages=False)
            elapsed = time.perf_counter() - t0
        res = job.results
        from mlsml.mixregls import from_mixregls, to_mixregls

        ours = to_mixregls(res)
        est, se = run["estimates"], run["se"]
        table = pd.DataFrame(
            [
                {
                    "parameter": idx,
                    "ours": r["estimate"],
                    "ours SE": r["std err"],
                    "MIXREGLS": est[idx],
                    "MIXREGLS SE": se[idx],
                    "diff": r["estimate"] - est[idx],
                    "diff/SE": (r["estimate"] - est[idx]) / se[idx],
                    "SE rel diff": r["std err"] / se[idx] - 1,
                }
                for idx, r in ours.iterrows()
            ]
        ).set_index("parameter")
        at_theirs = res.model.loglike(from_mixregls(est, bs=True), nagq=41)
        ours41 = res.likelihood.with_spec(nagq=41).value(res.theta)
        dll = res.llf - run["loglik"]
        ok = _verdict(table, dll, 1e-4, 5e-3) and res.converged
        rows.append(
            {
                "NCOV": int(ncov),
                "association": res.layout.association,
                "our logL": res.llf,
                "MIXREGLS logL": run["loglik"],
                "ours − MIXREGLS": dll,
                "our logL (41 pts) at theirs − at ours": at_theirs - ours41,
                "max |diff|/SE": float(np.abs(table["diff/SE"]).max()),
                "max SE rel diff": float(np.abs(table["SE rel diff"]).max()),
                "mlsml s": elapsed,
                "MIXREGLS CPU s": run["cpu_seconds"],
                "result": passfail(ok),
            }
        )
        tables[f"posmood NCOV = {ncov}"] = table
    summ = pd.DataFrame(rows).set_index("NCOV")
    out.append(md_table(summ, digits=6))
    out.append("")
    out.append(f"**{int((summ['result'] == 'PASS').sum())} of {len(summ)} comparisons pass.**")
    out.append("")
    out.append(
        "Our logL is 2e-5 to 3e-5 *below* MIXREGLS's on these 515 subjects, while our likelihood at MIXREGLS's "
        "estimates equals ours at our maximum to 2e-10: the offset is MIXREGLS's single-precision sqrt(pi) in its "
        "Hermite weights (about 5e-8 per cluster, shared references' README), not a different maximum. The fit "
        "of the quadratic model took 24 s here against MIXREGLS's 237 CPU seconds (all its stages)."
    )
    out.append("")
    out += md_tables(tables, digits=6)
    return out


def _compare_section() -> list[str]:
    import mlsml

    out = []
    for dataset in ("exam", "seed_sim", "riesby"):
        y, x, g = DATA[dataset]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp = mlsml.compare_associations(f"{y} ~ {x}", _data(dataset), groups=g, scale_formula=f"~ {x}")
        out.append(f"**{dataset}** (`mlsml.compare_associations`): lowest AIC {cmp.best_aic}, lowest BIC {cmp.best_bic}")
        out.append("")
        out.append(md_table(cmp.table.drop(columns=["deviance"]), digits=4))
        out.append("")
        out.append(md_table(cmp.tests, digits=4))
        out.append("")
    return out


def section() -> str:
    out = ["## 1c. Association types: MIXREGLS NCOV = 0 (none), 1 (linear), 2 (quadratic)", ""]
    out.append(
        '`association="none"` fixes cov(u0,v) = 0 (MIXREGLS NCOV = 0); `"quadratic"` adds `quad(u0,v)`·θ1², '
        'θ1 = u0/sd(u0), to the log WS variance (NCOV = 2, MIXREGLS\'s "Quad Loc"). Model 3 (`y ~ x`, WS ~ x, '
        "random intercept and scale), MIXREGLS at 21 adaptive points. **Tolerances**: logL within 1e-5 of the exact "
        "logL at MIXREGLS's estimates (the references' independent 100-point rotated evaluation); estimates within "
        "max(1e-4, 0.01 SE) and SEs within 0.5%, in MIXREGLS's parameters (BETA, ALPHA = ln var(u0), TAU, Std Dev, "
        "Loc Eff, Quad Loc; `mlsml.mixregls.to_mixregls`). `our logL at theirs − exact` evaluates our likelihood "
        "at MIXREGLS's estimates: a check of the integrand alone."
    )
    out.append("")
    rows, tables = _assoc_runs()
    summ = pd.DataFrame(rows).set_index("reference")
    out.append(md_table(summ, digits=7))
    out.append("")
    n_pass = int((summ["result"] == "PASS").sum())
    out.append(f"**{n_pass} of {len(summ)} comparisons pass.**")
    out.append("")
    out.append(
        "On the school data our maximum equals the exact logL at MIXREGLS's estimates to 1e-11, and estimates and "
        "SEs agree to 1e-7 (MIXREGLS's printed logL is 3e-6 to 5e-6 above: its single-precision sqrt(pi)). On riesby "
        "(clusters of 4 to 6, a large random scale) MIXREGLS's own logL is 7e-5 (NCOV 0, 1) and 1.5e-4 (NCOV 2) "
        "*below* the exact value: its 21-point axis-wise rule is not at the limit there; its estimates are up to "
        "2.8e-4 SE from the exact maximum, and its SEs (from the Hessian of that rule) differ from ours by up to 0.2%. "
        "Our quadratic model is integrated by the nested rule of docs/model.md (u-exact outer rule over the "
        "whole log-variance shift w = v + γθ1², 15 inner points over u0 given w): on riesby it is 1.1e-6 from the "
        "exact value, where a 2-d product rule needs about 60 points per dimension (11 points: 0.017 below)."
    )
    out.append("")
    out.append("### MixWILD 2.0's MIXREGLS_both: NCOV = 0 and 2 with a BS variance model (riesby, 11 unrotated points)")
    out.append("")
    out.append(
        'Section 1b\'s model (`bs_formula="~ endog"`, WS ~ week + endog) with `association="none"` and '
        '`"quadratic"`. The program\'s 11-point unrotated rule is not at the limit on these clusters (its linear '
        "run is 2.4e-3 below, section 1b), so: logL within 5e-3, estimates within 0.05 SE, SEs within 3%."
    )
    out.append("")
    rows2, tables2, notes2 = _mixwild2_runs()
    summ2 = pd.DataFrame(rows2).set_index("reference")
    out.append(md_table(summ2, digits=6))
    out.append("")
    n_ok = int(summ2["result"].str.startswith("PASS").sum())
    n_expl = int(summ2["result"].str.contains("explained").sum())
    out.append(f"**{n_ok} of {len(summ2)} comparisons pass; {n_expl} differ{'s' if n_expl == 1 else ''} for a reason shown below.**")
    out.append("")
    out += notes2
    out.append("")
    out.append("### posmood: MIXREGLS built from source here, NCOV = 0 and 2, BS variance ~ genderf (R = 1), 21 points")
    out.append("")
    out.append(
        "MIXREGLS (`mixregls_var.f90`, MixWild commit 85921083ec3e, gfortran -O1; the build reproduces the "
        "riesby NCOV = 0 reference block of the shared folder to every printed digit) on posmood (17,514 prompts, "
        "515 subjects): mean ~ alone + genderf, BS log variance ~ genderf, WS log variance ~ alone + genderf. The "
        "same `.def` is run by `mlsml mixregls` (stage sequence off). MIXREGLS writes -2logL to 6 decimals and the "
        "estimates to 8 (MIXREGLS5.EST): logL within 1e-4, estimates within max(1e-4, 0.01 SE), SEs within 0.5%. "
        "The last column is our 41-point logL at MIXREGLS's estimates minus at ours."
    )
    out.append("")
    out += _posmood_section()
    out.append("")
    out.append("### compare_associations on the three data sets")
    out.append("")
    out += _compare_section()
    out += md_tables(tables, digits=6)
    out += md_tables(tables2, digits=5)
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validation.mixregls_assoc", description=__doc__.split("\n")[0])
    ap.add_argument("--build", metavar="DIR", help="build MIXREGLS in DIR, run posmood NCOV 0/2, write the results JSON")
    ap.add_argument("--read", metavar="DIR", help="read finished posmood runs (DIR/posmood0, DIR/posmood2) into the results JSON")
    a = ap.parse_args(argv)
    if a.build:
        out = run_posmood(Path(a.build))
    elif a.read:
        out = {"program": f"mixregls_var.f90, MixWild commit {MIXWILD_COMMIT}, gfortran -O1", "runs": {}}
        for name, names in BUILT_RUNS.items():
            d = Path(a.read) / name
            if not (d / "MIXREGLS5.EST").exists():
                continue
            secs = None
            tl = d / "time.log"
            if tl.exists():
                m = re.search(r"User time \(seconds\): ([\d.]+)", tl.read_text())
                secs = float(m.group(1)) if m else None
            out["runs"][name] = _read_run(d, names, secs)
    else:
        print(section())
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    POSMOOD_RESULT.write_text(json.dumps(out, indent=1))
    log(f"wrote {POSMOOD_RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
