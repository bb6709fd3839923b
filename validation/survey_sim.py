"""Simulation studies of the survey features: sandwich coverage and informative sampling.

Studies
-------
``coverage``
    400 schools x 10 students (``COVERAGE_SCHOOLS``; the first run had 100:
    ``survey_coverage_J100.csv``, ``--schools 100``), ``x`` standard normal (intraclass
    correlation 0.2), Model 3 (``y ~ x``, ``scale ~ x``, random intercept and random scale)
    with ``beta = (0, 0.5)``, ``alpha = (-0.5, 0.3)``, ``var(u0) = 0.1``, ``var(v) = 0.2``,
    ``cov(u0, v) = 0``. Two scenarios: ``normal`` (the model is right) and ``misspecified``
    (residuals ``sigma_ij`` times a t(3) variable scaled to unit variance; random scale ``v_j``
    a centred and scaled chi-square(1) variable, skewness 2.8, same mean and variance). Each
    replication is fitted once and both covariances are computed from that fit: the inverse
    observed information and the cluster-robust sandwich (:mod:`mlsml.robust`).
``pseudo_true``
    The targets of the misspecified scenario: ``PSEUDO_TRUE_FITS`` fits of
    ``PSEUDO_TRUE_SCHOOLS`` schools each from its generator (:func:`run_pseudo_true`).
``informative``
    Per replication a finite population drawn from Model 3 (``beta = (0, 0.5)``,
    ``alpha = (-0.5, 0.2)``, ``var(u0) = 0.2``, ``var(v) = 0.2``, ``cov = 0``) and a two-stage
    Poisson sample that favours high ``u_j`` and high residuals (:func:`informative_sample`:
    design ``"two_valued"``, 1,000 schools of 50-100 students, probabilities 0.1/0.3 for
    schools and 0.25/0.75 for students; the first design, ``"steep"``, is kept in
    ``survey_informative_steep.csv``). The unweighted fit is biased; the pseudo-ML fits use
    the inverse probabilities as ``weights`` (conditional, level 1) and ``group_weights``
    (level 2) with the ``"size"``, ``"effective"`` and ``"none"`` scalings; all have robust SEs.
    Targets: the generating (superpopulation) values.
``informative_parts``
    The two-valued design with only the school stage or only the student stage informative,
    and the latter with schools three times as large (``INFORMATIVE_PARTS``): where the
    weighted fits' remaining bias comes from.
``concentration``
    For both informative designs: Kish's effective number of schools and the effective
    number of schools that carry the sandwich's meat (:func:`effective_clusters`).

Replication ``r`` of a study and scenario uses the seed ``BASE_SEED[...] + r``. Per
replication the estimates and SEs go to ``validation/results/survey_<study>.csv``; the report
(:mod:`validation.survey`) reads them. Run (niced, one process; CPU minutes measured here)::

    nice python -m validation.survey_sim --study coverage --reps 1000       # ~5 min
    nice python -m validation.survey_sim --study pseudo_true --reps 10      # ~2.5 min
    nice python -m validation.survey_sim --study informative --reps 500     # ~6 min
    nice python -m validation.survey_sim --study concentration --reps 100   # ~1.5 min
    nice python -m validation.survey_sim --study informative_parts --reps 150   # ~4 min
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

from .common import RESULTS, log

BASE_SEED = {"normal": 11_000_000, "misspecified": 12_000_000, "informative": 13_000_000, "pseudo_true": 14_000_000}

#: Schools (of 10 students) per data set of the coverage study. With 100 the robust SE of var(v)
#: under the misspecification is 9% small (``survey_coverage_J100.csv``): the sandwich of a
#: variance of a skewed, heavy-tailed random scale needs more clusters.
COVERAGE_SCHOOLS = 400

#: The pseudo-true values of the misspecified scenario: ``PSEUDO_TRUE_FITS`` fits of
#: ``PSEUDO_TRUE_SCHOOLS`` schools each (10 students) from the same generator, averaged.
PSEUDO_TRUE_FITS = 10
PSEUDO_TRUE_SCHOOLS = 50_000

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
#: Inclusion probabilities of the two-valued design: schools ``SCHOOL_PI[u_j > 0]``, students
#: ``PUPIL_PI[e_ij > 0]`` (both stages favour high values; weights within a factor of 3).
SCHOOL_PI = (0.1, 0.3)
PUPIL_PI = (0.25, 0.75)
#: The two-valued design's population: schools, and the smallest and largest school size.
TWO_VALUED_POPULATION = (1000, 50, 100)

MODEL = {"formula": "y ~ x", "groups": "school", "scale_formula": "~ x"}


def _x(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    school = np.repeat(np.arange(sizes.size), sizes)
    return (np.sqrt(0.2) * rng.standard_normal(sizes.size))[school] + np.sqrt(0.8) * rng.standard_normal(school.size)


def coverage_data(scenario: str, rep: int, J: int = COVERAGE_SCHOOLS, n: int = 10, seed: int | None = None) -> pd.DataFrame:
    """One data set of the coverage study (``seed`` overrides the replication's seed)."""
    rng = np.random.default_rng(BASE_SEED[scenario] + rep if seed is None else seed)
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


def informative_sample(
    rep: int, design: str = "two_valued", school_pi=SCHOOL_PI, pupil_pi=PUPIL_PI, population=TWO_VALUED_POPULATION
) -> pd.DataFrame:
    """The two-stage sample of replication ``rep`` of an informative ``design`` with its weights.

    ``"two_valued"`` (the study's design): 1,000 schools of 50 to 100 students; schools with
    probability ``SCHOOL_PI[u_j > 0]``, students with ``PUPIL_PI[e_ij > 0]``: weights within a
    factor of 3 at each level. ``"steep"`` (the first design, kept for the record): 2,000 schools
    of 100 to 200 students, probabilities ``expit(a + b u_j / sd(u))`` and
    ``expit(a + b e_ij / sigma_ij)`` (``SCHOOL_LOGIT``, ``PUPIL_LOGIT``): school weights from
    about 2.5 to 100. Columns ``w1`` (conditional level-1 weight) and ``w2`` (school weight).
    ``school_pi``, ``pupil_pi`` and ``population`` (schools, smallest and largest size) change
    the two-valued design (:func:`run_informative_parts`).
    """
    rng = np.random.default_rng(BASE_SEED["informative"] + rep)
    t = INFORMATIVE_TRUTH
    J_pop, lo, hi = population if design == "two_valued" else (2000, 100, 200)
    sizes = rng.integers(lo, hi + 1, J_pop)
    school = np.repeat(np.arange(J_pop), sizes)
    x = _x(rng, sizes)
    sd_u = np.sqrt(t["var(u0)"])
    u = sd_u * rng.standard_normal(J_pop)
    v = np.sqrt(t["var(v)"]) * rng.standard_normal(J_pop)
    lv = t["scale:Intercept"] + t["scale:x"] * x + v[school]
    z = rng.standard_normal(school.size)
    y = t["mean:Intercept"] + t["mean:x"] * x + u[school] + np.exp(0.5 * lv) * z
    if design == "two_valued":
        p_school = np.where(u > 0, school_pi[1], school_pi[0])
        p_pupil = np.where(z > 0, pupil_pi[1], pupil_pi[0])
    else:
        p_school = 1.0 / (1.0 + np.exp(-(SCHOOL_LOGIT[0] + SCHOOL_LOGIT[1] * u / sd_u)))
        p_pupil = 1.0 / (1.0 + np.exp(-(PUPIL_LOGIT[0] + PUPIL_LOGIT[1] * z)))
    in_school = rng.random(J_pop) < p_school
    take = in_school[school] & (rng.random(school.size) < p_pupil)
    df = pd.DataFrame({"y": y, "x": x, "school": school, "w1": 1.0 / p_pupil, "w2": (1.0 / p_school)[school]})[take]
    counts = df.groupby("school")["y"].transform("size")
    return df[counts >= 2].reset_index(drop=True)


def kish_schools(df: pd.DataFrame) -> float:
    r"""Kish's effective number of schools, :math:`(\sum_j W_j)^2 / \sum_j W_j^2`."""
    W = df.groupby("school")["w2"].first().to_numpy()
    return float(W.sum() ** 2 / (W**2).sum())


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


def run_coverage(reps: int, first: int = 0, J: int = COVERAGE_SCHOOLS, scenarios=("normal", "misspecified")) -> pd.DataFrame:
    import mlsml

    rows = []
    for scenario in scenarios:
        for r in range(first, first + reps):
            df = coverage_data(scenario, r, J=J)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    res = mlsml.fit(data=df, cov_type="robust", **MODEL)
                except Exception as exc:  # noqa: BLE001 - a failed replication is recorded
                    rows.append({"scenario": scenario, "rep": r, "converged": False, "error": str(exc)[:200]})
                    continue
            rows.append(_row(res, {"scenario": scenario, "rep": r, "J": J, "time": time.perf_counter() - t0}))
            if r % 50 == 0:
                log(f"coverage {scenario} rep {r}")
    return pd.DataFrame(rows)


def run_pseudo_true(reps: int = PSEUDO_TRUE_FITS, first: int = 0) -> pd.DataFrame:
    r"""Fits of very large data sets from the misspecified generator (the pseudo-true values).

    Under misspecification the maximum-likelihood estimator converges to the parameter
    :math:`\theta^*` that maximises the expected log-likelihood of one school,
    :math:`E_g \log L_j(\theta)` (the Kullback-Leibler projection of the generator :math:`g` on
    the model), and the sandwich SEs describe the spread around :math:`\theta^*`, not around the
    generating values. Each fit here has ``PSEUDO_TRUE_SCHOOLS`` schools of 10 students from
    :func:`coverage_data`'s misspecified generator; the mean of the fits estimates
    :math:`\theta^*` and their SD / sqrt(fits) its Monte-Carlo error.
    """
    import mlsml

    rows = []
    for r in range(first, first + reps):
        df = coverage_data("misspecified", r, J=PSEUDO_TRUE_SCHOOLS, seed=BASE_SEED["pseudo_true"] + r)
        t0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = mlsml.fit(data=df, cov_type="robust", **MODEL)
        rows.append(_row(res, {"rep": r, "J": PSEUDO_TRUE_SCHOOLS, "cpu": time.process_time() - t0}))
        log(f"pseudo-true fit {r}: converged {res.converged}")
    return pd.DataFrame(rows)


def run_informative(reps: int, first: int = 0, design: str = "two_valued") -> pd.DataFrame:
    import mlsml

    rows = []
    fits = {
        "unweighted": {"cov_type": "robust"},
        "size": {"weights": "w1", "group_weights": "w2", "weights_scale": "size"},
        "effective": {"weights": "w1", "group_weights": "w2", "weights_scale": "effective"},
        "none": {"weights": "w1", "group_weights": "w2", "weights_scale": "none"},
    }
    for r in range(first, first + reps):
        df = informative_sample(r, design)
        kish = kish_schools(df)
        for fit_name, kw in fits.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    res = mlsml.fit(data=df, **MODEL, **kw)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"fit": fit_name, "rep": r, "converged": False, "error": str(exc)[:200]})
                    continue
            rows.append(_row(res, {"fit": fit_name, "rep": r, "n": len(df), "J": df["school"].nunique(), "kish_J": kish}))
        if r % 25 == 0:
            log(f"informative rep {r}: n = {len(df)}, J = {df['school'].nunique()}")
    return pd.DataFrame(rows)


#: Variants of the two-valued design that take it apart (:func:`run_informative_parts`).
INFORMATIVE_PARTS = {
    "level 2 only": {"pupil_pi": (0.5, 0.5)},
    "level 1 only": {"school_pi": (0.2, 0.2)},
    "level 1 only, 3x larger schools": {"school_pi": (0.2, 0.2), "population": (1000, 150, 300)},
}


def run_informative_parts(reps: int, first: int = 0) -> pd.DataFrame:
    """The two-valued design with only one stage informative, and with larger schools (size scaling)."""
    import mlsml

    rows = []
    for part, kw in INFORMATIVE_PARTS.items():
        for r in range(first, first + reps):
            df = informative_sample(r, "two_valued", **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = mlsml.fit(data=df, weights="w1", group_weights="w2", **MODEL)
            rows.append(_row(res, {"fit": part, "rep": r, "n": len(df), "J": df["school"].nunique()}))
        log(f"informative part {part!r} done")
    return pd.DataFrame(rows)


def effective_clusters(scores: np.ndarray) -> np.ndarray:
    r"""The effective number of clusters of the sandwich's meat, per parameter.

    With :math:`s_{jk}` school :math:`j`'s score for parameter :math:`k`, the meat's diagonal is
    :math:`\sum_j s_{jk}^2`, and :math:`(\sum_j s_{jk}^2)^2 / \sum_j s_{jk}^4` counts the schools that
    carry it (all :math:`J` when they carry it equally, 1 when one does): the Kish formula
    applied to the squared scores, the quantity behind the poor coverage of cluster-robust
    SEs with heterogeneous clusters (Carter, Schnepel and Steigerwald 2017; MacKinnon and Webb 2017).
    """
    a = scores**2
    return a.sum(axis=0) ** 2 / (a**2).sum(axis=0)


def run_concentration(reps: int, first: int = 0) -> pd.DataFrame:
    """Per replication and informative design: Kish's and the sandwich's effective numbers of schools (size scaling)."""
    import mlsml
    from mlsml.robust import school_scores

    rows = []
    for design in ("steep", "two_valued"):
        for r in range(first, first + reps):
            df = informative_sample(r, design)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = mlsml.fit(data=df, weights="w1", group_weights="w2", **MODEL)
            theta = np.asarray(res.theta)
            S = school_scores(res.likelihood, theta) @ np.linalg.inv(res.layout.natural_jacobian(theta))
            row = {"design": design, "rep": r, "J": df["school"].nunique(), "kish_J": kish_schools(df)}
            row.update({f"Geff:{k}": v for k, v in zip(res.params.index, effective_clusters(S))})
            rows.append(row)
        log(f"concentration {design} done")
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validation.survey_sim", description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=("coverage", "informative", "pseudo_true", "concentration", "informative_parts"), required=True)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--schools", type=int, default=COVERAGE_SCHOOLS, help="schools per data set of the coverage study")
    ap.add_argument("--out", default=None, help="CSV path (default validation/results/survey_<study>.csv)")
    a = ap.parse_args(argv)
    out = RESULTS / f"survey_{a.study}.csv" if a.out is None else a.out
    if a.study == "coverage":
        df = run_coverage(a.reps, a.first, J=a.schools)
    else:
        run = {
            "informative": run_informative,
            "pseudo_true": run_pseudo_true,
            "concentration": run_concentration,
            "informative_parts": run_informative_parts,
        }[a.study]
        df = run(a.reps, a.first)
    df.to_csv(out, index=False)
    log(f"wrote {out} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
