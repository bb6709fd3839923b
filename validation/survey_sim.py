"""Simulation studies of the survey features: sandwich coverage and informative sampling.

Studies
-------
``coverage``
    100 schools x 10 students, ``x`` standard normal (intraclass correlation 0.2), Model 3
    (``y ~ x``, ``scale ~ x``, random intercept and random scale) with ``beta = (0, 0.5)``,
    ``alpha = (-0.5, 0.3)``, ``var(u0) = 0.1``, ``var(v) = 0.2``, ``cov(u0, v) = 0``. Two
    scenarios: ``normal`` (the model is right) and ``misspecified`` (residuals ``sigma_ij``
    times a t(3) variable scaled to unit variance; random scale ``v_j`` a centred and scaled
    chi-square(1) variable, skewness 2.8, same mean and variance). Each replication is fitted
    once and both covariances are computed from that fit: the inverse observed information
    and the cluster-robust sandwich (:mod:`mlsml.robust`).
``informative``
    A finite population of 1,000 schools of 40 to 80 students drawn once per replication from
    Model 3 (``beta = (0, 0.5)``, ``alpha = (-0.5, 0.2)``, ``var(u0) = 0.2``, ``var(v) = 0.2``,
    ``cov = 0``); a two-stage Poisson sample: schools with probability
    ``expit(-2.8 + 1.5 u_j / sd(u))`` (about 60 of 1,000, more of the high-``u`` schools), then
    students with probability ``expit(-1.0 + 1.0 e_ij / sigma_ij)`` (about 30%, more of the
    high-residual ones). Both stages are informative, so the unweighted fit is biased; the
    pseudo-ML fit uses the inverse probabilities as ``weights`` (conditional, level 1) and
    ``group_weights`` (level 2), with the ``"size"`` and ``"effective"`` scalings, and the
    robust SEs. Targets: the generating (superpopulation) values.

Replication ``r`` of a study and scenario uses the seed ``BASE_SEED[...] + r``. Per
replication the estimates and SEs go to ``validation/results/survey_<study>.csv``; the report
(:mod:`validation.survey`) reads them. Run (niced, one process)::

    nice python -m validation.survey_sim --study coverage --reps 1000
    nice python -m validation.survey_sim --study informative --reps 300
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

from .common import RESULTS, log

BASE_SEED = {"normal": 11_000_000, "misspecified": 12_000_000, "informative": 13_000_000}

COVERAGE_TRUTH = {
    "mean:Intercept": 0.0,
    "mean:x": 0.5,
    "scale:Intercept": -0.5,
    "scale:x": 0.3,
    "var(u0)": 0.1,
    "var(v)": 0.2,
    "cov(u0,v)": 0.0,
}
INFORMATIVE_TRUTH = {
    "mean:Intercept": 0.0,
    "mean:x": 0.5,
    "scale:Intercept": -0.5,
    "scale:x": 0.2,
    "var(u0)": 0.2,
    "var(v)": 0.2,
    "cov(u0,v)": 0.0,
}
#: Inclusion probabilities of the informative sample: ``expit(a + b u_j / sd(u))`` for schools and
#: ``expit(a + b e_ij / sigma_ij)`` for students.
SCHOOL_LOGIT = (-2.5, 0.7)
PUPIL_LOGIT = (-1.0, 0.5)

MODEL = {"formula": "y ~ x", "groups": "school", "scale_formula": "~ x"}


def _x(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    school = np.repeat(np.arange(sizes.size), sizes)
    return (np.sqrt(0.2) * rng.standard_normal(sizes.size))[school] + np.sqrt(0.8) * rng.standard_normal(school.size)


def coverage_data(scenario: str, rep: int, J: int = 100, n: int = 10) -> pd.DataFrame:
    """One data set of the coverage study."""
    rng = np.random.default_rng(BASE_SEED[scenario] + rep)
    t = COVERAGE_TRUTH
    sizes = np.full(J, n)
    school = np.repeat(np.arange(J), sizes)
    x = _x(rng, sizes)
    u = np.sqrt(t["var(u0)"]) * rng.standard_normal(J)
    if scenario == "normal":
        v = np.sqrt(t["var(v)"]) * rng.standard_normal(J)
        eps = rng.standard_normal(school.size)
    else:
        v = np.sqrt(t["var(v)"]) * (rng.chisquare(1, J) - 1.0) / np.sqrt(2.0)
        eps = rng.standard_t(3, school.size) / np.sqrt(3.0)
    lv = t["scale:Intercept"] + t["scale:x"] * x + v[school]
    y = t["mean:Intercept"] + t["mean:x"] * x + u[school] + np.exp(0.5 * lv) * eps
    return pd.DataFrame({"y": y, "x": x, "school": school})


def informative_sample(rep: int, J_pop: int = 2000) -> pd.DataFrame:
    """The two-stage sample of replication ``rep`` with its weights (and the population's size)."""
    rng = np.random.default_rng(BASE_SEED["informative"] + rep)
    t = INFORMATIVE_TRUTH
    sizes = rng.integers(100, 201, J_pop)
    school = np.repeat(np.arange(J_pop), sizes)
    x = _x(rng, sizes)
    sd_u = np.sqrt(t["var(u0)"])
    u = sd_u * rng.standard_normal(J_pop)
    v = np.sqrt(t["var(v)"]) * rng.standard_normal(J_pop)
    lv = t["scale:Intercept"] + t["scale:x"] * x + v[school]
    z = rng.standard_normal(school.size)
    y = t["mean:Intercept"] + t["mean:x"] * x + u[school] + np.exp(0.5 * lv) * z
    p_school = 1.0 / (1.0 + np.exp(-(SCHOOL_LOGIT[0] + SCHOOL_LOGIT[1] * u / sd_u)))
    in_school = rng.random(J_pop) < p_school
    p_pupil = 1.0 / (1.0 + np.exp(-(PUPIL_LOGIT[0] + PUPIL_LOGIT[1] * z)))
    take = in_school[school] & (rng.random(school.size) < p_pupil)
    df = pd.DataFrame({"y": y, "x": x, "school": school, "w1": 1.0 / p_pupil, "w2": (1.0 / p_school)[school]})[take]
    counts = df.groupby("school")["y"].transform("size")
    return df[counts >= 2].reset_index(drop=True)


def _row(res, extra: dict) -> dict:
    from mlsml.optimize import theta_covariance

    out = dict(extra)
    out["converged"] = bool(res.converged)
    out["llf"] = res.llf
    for name, v in res.params.items():
        out[f"est:{name}"] = v
    for name, v in res.bse.items():
        out[f"se:{name}"] = v
    if res.cov_type == "robust" and res.optsum is not None:  # the model-based SEs of the same fit
        cov = theta_covariance(res.optsum)
        if cov is not None:
            jac = res.layout.natural_jacobian(np.asarray(res.theta))
            se = np.sqrt(np.clip(np.diag(jac @ cov @ jac.T), 0, None))
            for name, v in zip(res.params.index, se):
                out[f"semodel:{name}"] = v
    return out


def run_coverage(reps: int, first: int = 0) -> pd.DataFrame:
    import mlsml

    rows = []
    for scenario in ("normal", "misspecified"):
        for r in range(first, first + reps):
            df = coverage_data(scenario, r)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    res = mlsml.fit(data=df, cov_type="robust", **MODEL)
                except Exception as exc:  # noqa: BLE001 - a failed replication is recorded
                    rows.append({"scenario": scenario, "rep": r, "converged": False, "error": str(exc)[:200]})
                    continue
            rows.append(_row(res, {"scenario": scenario, "rep": r, "time": time.perf_counter() - t0}))
            if r % 50 == 0:
                log(f"coverage {scenario} rep {r}")
    return pd.DataFrame(rows)


def run_informative(reps: int, first: int = 0) -> pd.DataFrame:
    import mlsml

    rows = []
    fits = {
        "unweighted": {"cov_type": "robust"},
        "size": {"weights": "w1", "group_weights": "w2", "weights_scale": "size"},
        "effective": {"weights": "w1", "group_weights": "w2", "weights_scale": "effective"},
    }
    for r in range(first, first + reps):
        df = informative_sample(r)
        for fit_name, kw in fits.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    res = mlsml.fit(data=df, **MODEL, **kw)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"fit": fit_name, "rep": r, "converged": False, "error": str(exc)[:200]})
                    continue
            rows.append(_row(res, {"fit": fit_name, "rep": r, "n": len(df), "J": df["school"].nunique()}))
        if r % 25 == 0:
            log(f"informative rep {r}: n = {len(df)}, J = {df['school'].nunique()}")
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validation.survey_sim", description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=("coverage", "informative"), required=True)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--out", default=None, help="CSV path (default validation/results/survey_<study>.csv)")
    a = ap.parse_args(argv)
    out = RESULTS / f"survey_{a.study}.csv" if a.out is None else a.out
    df = run_coverage(a.reps, a.first) if a.study == "coverage" else run_informative(a.reps, a.first)
    df.to_csv(out, index=False)
    log(f"wrote {out} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
