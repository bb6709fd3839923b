"""Section 1b: the between-subject variance models of MixWILD 2.0's MIXREGLS_both (Riesby; posmood's level-1 ``alone``).

References: ``validation/reference/mixregls_fortran_runs/`` (copied from
``shared/validation/mixregls_fortran_runs``; estimates printed to 5 decimals, logL to 3).
Our model: ``bs_formula="~ endog"`` (ln var(u0_j) = tau0 + tau1 endog_j), the WS variance
``~ week + endog`` and a random scale with a linear location effect.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .common import REFERENCE, ROOT, SHARED, fit_quiet, load_json, log, md_table, md_tables, passfail
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
    "within subject (MIXREGLS evaluates ALPHA per observation): compared below, in the level-1 subsection",
}

#: posmood runs (issue 13): a time-varying column (``alone``) in the BS variance, MIXREGLS's u_ij'ALPHA
POSMOOD_RUNS = {"posmood_alone_linear": "alone", "posmood_alone_genderf_linear": "alone + genderf"}
POSMOOD_TERMS = {"intercept": "Intercept", "alone": "alone", "genderf": "genderf"}
#: the program prints estimates to 5 decimals and stops when its largest correction is below 1e-5
POSMOOD_EST_TOL = 3e-5
#: its 11-point rule: the independent check of the shared README gives -34148.129 (11) and -34148.128 (30)
POSMOOD_LL_TOL = 2e-3
POSMOOD_SE_TOL = 5e-3


def _riesby() -> pd.DataFrame:
    return pd.read_csv(ROOT / "tests" / "data" / "riesby.csv")


def section() -> str:
    out = ["## 1b. Against MIXREGLS_both: between-subject variance functions (Riesby; posmood, level-1)", ""]
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
    out += posmood_section()
    return "\n".join(out)


def posmood_section() -> list[str]:
    """Level-1 (time-varying) BS-variance covariates: posmood against MIXREGLS_both (issue 13)."""
    out = ["### Level-1 (time-varying) covariates of the between-subject variance: posmood (issue 13)", ""]
    out.append(
        "MIXREGLS evaluates the BS variance per observation, `y_ij = x_ij'BETA + sqrt(exp(u_ij'ALPHA)) theta1_j + e_ij`: "
        "posmood's `alone` (time-varying) changes the scale of the subject's random location from prompt to prompt. "
        "mlsml: `bs_formula` with a level-1 column loads the random intercept row by row "
        "(`mlsml.integrand.loaded_Z`; `bsvar:` = ALPHA, `var(v)` = LocEff² + StdDev², `cov(u0,v)` = LocEff). "
        "MixWILD 2.0's MIXREGLS_both, 11 adaptive points, posmood (17,514 prompts, 515 subjects), mean, BS and WS "
        "variance all `~ alone` or `~ alone + genderf`, linear association. Ours: the u-exact rule with 11 points "
        f"(and 21, to show the limit). **Tolerances**: estimates within {POSMOOD_EST_TOL:g} (printed to 5 decimals; "
        f"the program stops at a largest correction below 1e-5), SEs within {POSMOOD_SE_TOL:.1%}, logL within "
        f"{POSMOOD_LL_TOL:g} (printed to 3 decimals; the shared README's independent evaluation at the program's "
        "estimates gives -34148.129 with 11 and -34148.128 with 30 points)."
    )
    out.append("")
    path = SHARED / "data" / "posmood.csv"
    if not path.exists():
        out.append("*Skipped: ../shared/data/posmood.csv is not available.*")
        out.append("")
        return out
    df = pd.read_csv(path)
    rows, tables = [], {}
    for name, covs in POSMOOD_RUNS.items():
        log(f"  MIXREGLS_both {name}")
        ref = load_json(REFERENCE / "mixregls_fortran_runs" / f"{name}.json")
        st = ref["stages"][ref["final_stage"]]
        kw = dict(groups="id", scale_formula=f"~ {covs}", bs_formula=f"~ {covs}")
        t0 = time.perf_counter()
        res, msgs = fit_quiet(f"posmood ~ {covs}", df, nagq=11, **kw)
        secs = time.perf_counter() - t0
        ll21 = res.likelihood.with_spec(nagq=21).value(res.theta)
        theirs = fortran_run_to_ours(ref, res.params.index, POSMOOD_TERMS)
        diff = (res.params - theirs).abs()
        se_ref = {}
        for p in st["parameters"]:
            blk = {"BETA": "mean", "TAU": "scale", "ALPHA": "bsvar"}.get(p["block"])
            if blk:
                se_ref[f"{blk}:{POSMOOD_TERMS[p['name']]}"] = p["se"]
        se_rel = pd.Series({k: abs(res.bse[k] / v - 1) for k, v in se_ref.items()})
        ll_ref = st["loglik"]
        ok = bool(
            abs(res.llf - ll_ref) <= POSMOOD_LL_TOL
            and diff.max() <= POSMOOD_EST_TOL
            and se_rel.max() <= POSMOOD_SE_TOL
            and res.converged
        )
        rows.append(
            {
                "reference": name,
                "our logL (11)": res.llf,
                "our logL (21)": ll21,
                "their logL (printed)": ll_ref,
                "ours − theirs": res.llf - ll_ref,
                "max |diff|": diff.max(),
                "max |diff|/SE": (diff / res.bse).max(),
                "max SE rel diff": se_rel.max(),
                "fit seconds": secs,
                "result": passfail(ok),
            }
        )
        tables[name] = pd.DataFrame({"ours": res.params, "SE": res.bse, "MIXREGLS": theirs, "diff": res.params - theirs})
    summ = pd.DataFrame(rows).set_index("reference")
    out.append(md_table(summ, digits=6))
    out.append("")
    n_pass = int((summ["result"] == "PASS").sum())
    out.append(f"**{n_pass} of {len(summ)} posmood comparisons pass.**")
    out.append("")
    out.append(
        "Every estimate is within one unit of the printed fifth decimal except the mean intercepts (1.3e-5 and 1.0e-5 "
        "from the printed value: 2e-4 SE) and `bsvar:genderf` (1.0e-5): differences of the size of the program's "
        "stopping rule (largest correction below 1e-5), not of the model. Our logL is the same at 11 and 21 points to "
        "4e-5 (the u-exact rule integrates u0 exactly), and 4e-4 to 7e-4 above the printed values, consistent with the "
        "11-point rule error (about 1e-3) of MIXREGLS's own evaluation reported in the shared README. Each fit takes "
        "about half a second."
    )
    out.append("")
    out += md_tables(tables, digits=6)
    out.append("")
    return out


__all__ = ["section", "np"]
