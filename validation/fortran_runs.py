"""Section 1b: the between-subject variance models of MixWILD 2.0's MIXREGLS_both (Riesby).

References: ``validation/reference/mixregls_fortran_runs/`` (copied from
``shared/validation/mixregls_fortran_runs``; estimates printed to 5 decimals, logL to 3).
Our model: ``bs_formula="~ endog"`` (ln var(u0_j) = tau0 + tau1 endog_j), the WS variance
``~ week + endog`` and a random scale with a linear location effect.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import REFERENCE, ROOT, fit_quiet, load_json, log, md_table, md_tables, passfail
from .convert import fortran_run_to_ours

RIESBY = dict(formula="hamdep ~ week + endog + endweek", groups="id", scale_formula="~ week + endog", bs_formula="~ endog")

RUNS = {
    "riesby_linear_nq21": dict(random_scale=True),
    "riesby_linear": dict(random_scale=True),
    "riesby_no_random_scale": dict(random_scale=False),
}

NOT_EXPRESSIBLE = {
    "riesby_linear_nonadaptive": "non-adaptive 11-point quadrature (logL −1123.661, visibly biased estimates): "
    "not a maximum-likelihood reference; the adaptive runs above are",
    "riesby_assoc_none / riesby_assoc_quadratic": "the same model with NCOV = 0 and NCOV = 2 "
    "(association='none' and 'quadratic'): compared in section 1c",
    "posmood_alone_linear / posmood_alone_genderf_linear": "the between-subject variance covariate `alone` varies "
    "within subject: MIXREGLS evaluates ALPHA per observation, so the 'random intercept' has an observation-level "
    "variance; mlsml's bs_formula is a school (subject)-level variance function and refuses a time-varying column",
}


def _riesby() -> pd.DataFrame:
    return pd.read_csv(ROOT / "tests" / "data" / "riesby.csv")


def section() -> str:
    out = ["## 1b. Against MIXREGLS_both: between-subject variance functions (Riesby)", ""]
    out.append(
        "MixWILD 2.0's MIXREGLS_both on the Riesby data (66 patients, 375 visits): mean `hamdep ~ week + endog + "
        "endweek`, **between**-subject log variance `~ endog` (ALPHA, ours `bs_formula`, parameters `bsvar:`), "
        "within-subject log variance `~ week + endog` (TAU, ours `scale:`), random scale with a linear location "
        "effect. Conversion: `validation/convert.py::fortran_run_to_ours` (var(v) = LocEff² + StdDev², cov(u0,v) "
        "against the standardised u0 = LocEff). **Tolerances**: the program prints logL to 3 decimals and "
        "estimates to 5, and its 11-point unrotated rule is not at the limit on these small clusters (its "
        "21-point run is): logL within 2e-3 of the 21-point run, estimates within 0.02 SE, SEs within 2%."
    )
    out.append("")
    rows, tables = [], {}
    df = _riesby()
    for name, kw in RUNS.items():
        log(f"  MIXREGLS_both {name}")
        ref = load_json(REFERENCE / "mixregls_fortran_runs" / f"{name}.json")
        res, msgs = fit_quiet(data=df, **RIESBY, **kw)
        st = ref["stages"][ref["final_stage"]]
        theirs = fortran_run_to_ours(ref, res.params.index)
        se = res.bse
        d_se = ((res.params - theirs) / se).abs()
        se_ref = {}
        for p in st["parameters"]:
            blk = {"BETA": "mean", "TAU": "scale", "ALPHA": "bsvar"}.get(p["block"])
            if blk:
                se_ref[f"{blk}:{dict(intercept='Intercept').get(p['name'], p['name'])}"] = p["se"]
        se_rel = pd.Series({k: abs(se[k] / v - 1) for k, v in se_ref.items()})
        ll_ref = st["loglik"]
        ll_ok = abs(res.llf - ll_ref) <= (2e-3 if name != "riesby_linear" else 5e-3)
        ok = bool(ll_ok and d_se.max() <= 0.02 and se_rel.max() <= 0.02 and res.converged)
        rows.append(
            {
                "reference": name,
                "our nagq": res.nagq,
                "our logL": res.llf,
                "their logL (printed)": ll_ref,
                "ours − theirs": res.llf - ll_ref,
                "max |diff|/SE": d_se.max(),
                "max SE rel diff": se_rel.max(),
                "converged": res.converged,
                "result": passfail(ok),
            }
        )
        tables[name] = pd.DataFrame({"ours": res.params, "SE": se, "MIXREGLS": theirs, "diff/SE": d_se})
    summ = pd.DataFrame(rows).set_index("reference")
    out.append(md_table(summ, digits=6))
    out.append("")
    n_pass = int((summ["result"] == "PASS").sum())
    out.append(f"**{n_pass} of {len(summ)} comparisons pass.**")
    out.append("")
    out.append(
        "`riesby_linear` is the 11-point run: its logL (−1122.297) is 2.4e-3 below the limit −1122.2946 that its "
        "own 21-point run (−1122.295) and our default rule (u0 integrated exactly, 15 points in v: at the limit "
        "to 2e-7, see docs/quadrature.md) reach, so its logL tolerance is 5e-3."
    )
    out.append("")
    out.append("Reference runs not compared:")
    out.append("")
    for k, v in NOT_EXPRESSIBLE.items():
        out.append(f"- `{k}`: {v}.")
    out.append("")
    out += md_tables(tables, digits=5)
    out.append("")
    return "\n".join(out)


__all__ = ["section", "np"]
