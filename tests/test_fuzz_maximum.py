"""Fits against an independent maximum on random data (issue 12), and the instrument itself.

Issue 12 is done when no converged fit is more than ``BELOW_MAX_TOL = 1e-3`` below an
independent maximum and none prints a non-finite or impossible log-likelihood. The
instrument is :mod:`validation.fuzz` (its docstring describes the cases, the
independent routes and the classes); ``docs/failures.md`` ("Fuzz against an
independent maximum (issue 12)") records the full run on main.

Two kinds of test:

* **The instrument** (always run, a few seconds): the generator is reproducible and
  spans the issue's space; the parameter map between raw and standardized data is
  exact; the reference finds the maximum of the issue's own reproducer
  (``x + 1e6``), which the fit on main misses by about 1,684 units; the classes are
  assigned as documented.
* **The criterion** (:func:`test_no_stored_case_below_its_independent_maximum`, in CI as
  its own step, ``python3 -m pytest -q -m fuzz_criterion``, after the README's test
  command, whose ten minutes it would more than fill: about 4 CPU-minutes): the cases
  stored in ``tests/data/fuzz_maximum/`` (:func:`validation.fuzz.write_store`: 200 cases
  of the CI distribution -- the full run's generator with at most ``max_rows = 60``
  rows, no ``scale_re_formula`` -- and the full run's cases that failed before a fix, at
  their own size) carry their data and the independent maximum that every route of
  :func:`validation.fuzz.reference_routes` found when they were stored. The test fits
  each stored data set with the defaults and asserts what the issue asks: no converged
  fit more than ``BELOW_MAX_TOL`` below the stored maximum, no non-finite or impossible
  llf (more than ``IMPOSSIBLE_GAP`` above the maximum), no uncaught error, no fit over
  ``CI_CASE_SECONDS`` of CPU; flagged non-convergence and documented refusals are
  allowed, but not for more than a quarter of the cases. The routes run once, when the
  store is written (``python -m validation.fuzz --store tests/data/fuzz_maximum --cases
  200 --seed 20261128 --max-rows 60 --regression SEEDS``); the suite pays for the fits
  only. Data are stored, not regenerated, so the cases do not depend on a numpy
  version's random streams.
* **The live criterion** (:func:`test_no_fit_below_the_independent_maximum`): new cases
  with the quick routes computed in the test, SKIPPED unless ``MLSML_FUZZ_MAXIMUM=1``
  (about 5 CPU-s per case); ``MLSML_FUZZ_MAX_CASES`` and ``MLSML_FUZZ_MAX_SEED`` choose the
  cases.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlsml
from validation import fuzz

#: Whether the live criterion runs without the environment variable (the stored one always runs).
RUN_CRITERION = False

#: The stored cases of the CI criterion (validation.fuzz.write_store).
STORE = Path(__file__).parent / "data" / "fuzz_maximum"

#: Stored cases the fit still misses (issue 12 is open; docs/failures.md, "The 200 cases in
#: CI"), by case seed. The criterion fails on any OTHER failing case, so CI catches every new
#: miss; a known miss that starts to pass is printed, to be moved out of this list.
KNOWN_MISSES: dict[int, str] = {}
# Fixed on 2026-11-28 night (the u-exact block without cancellation, SchoolSums.log_h_uexact):
# 326285836212315627 (one-pupil schools with a random slope: the integrand was +5e24 at far
# nodes of v and the fit climbed it; now flagged not converged at the maximum of the raw data
# and of its standardized twin alike) and 4286144531236845312 (oldest versions only, 0.0011
# below after the trust-krylov fallback; it now reaches the maximum there too).
# Fixed on 2026-11-28 evening (raise_rule to 1e-3, interior_starts): 7384623864426013180 (the
# rule's error: 31/63 points), 5413302752735107442 (stopped on the face corr(u0,u1) = -1, the
# maximum just inside), 1478415917575154483 (7 schools: 31 to 127 points find a region 4 to 6
# units higher that no rule pins down to 1e-3; now reported not converged).

N_CASES = int(os.environ.get("MLSML_FUZZ_MAX_CASES", "200"))
SEED = int(os.environ.get("MLSML_FUZZ_MAX_SEED", "20261128"))

#: Most rows per CI case. Measured (2026-11-28, loaded 2-core machine): 4.2 s per case at 60
#: rows before issue 12's fixes, 5.1 s CPU (median 1.9 s) after them (face searches and
#: fallbacks cost time on exactly these small boundary cases); 200 cases need about 0.4 s
#: per case to fit a 60-90 s budget. Re-time when switching this on.
CI_MAX_ROWS = 60

#: Time cap of one CI fit (the full run uses validation.fuzz.CASE_SECONDS). 30, not 20: on
#: 2026-11-28 two cases that reach their maximum (6643363068582114928, 1478415917575154483)
#: took 20.8 and 22.6 CPU-s with four processes sharing the 2 cores (under 20 when alone);
#: CPU time grows with contention, and the cap guards CI's budget, not the criterion.
#: 45, not 30: on 2026-11-29, on an AMD machine, 7243029950449673878 (60 rows in 30 schools of
#: two, a scaled covariate: BFGS makes no step, then the trust-exact fallback and two rule raises
#: to 31 and 63 points, each a refit) took 30.0 CPU-s alone on 63e07d5 and 30.0-31.5 on later
#: commits. That is a performance cliff of its own, listed in docs/failures.md.
CI_CASE_SECONDS = 45.0

#: Classes that fail issue 12's criterion.
FAILING = ("below_max", "bad_llf", "error_uncaught", "over_time_cap")


# ---------------------------------------------------------------- the instrument
@pytest.mark.parametrize("case_seed", [1, 2, 3])
def test_case_generator_is_reproducible(case_seed):
    a, b = fuzz.random_case(case_seed), fuzz.random_case(case_seed)
    pd.testing.assert_frame_equal(a.data, b.data)
    pd.testing.assert_frame_equal(a.std_data, b.std_data)
    assert a.spec == b.spec and a.truth == b.truth and a.family == b.family


def test_case_generator_spans_the_issue():
    """Schools of 1 to thousands, covariates 1e-8 to 1e10, zero and near-zero variances, |corr| to 0.99."""
    cases = [fuzz.random_case(s) for s in fuzz.case_seeds(400, 7)]
    sizes = np.concatenate([c.data.groupby("school").size().to_numpy() for c in cases])
    assert sizes.min() == 1 and sizes.max() >= 1000
    assert max(len(c.data) for c in cases) <= fuzz.MAX_ROWS
    assert {c.family for c in cases} == set(fuzz.FAMILIES)
    mags = np.array([np.abs(c.data["x"]).max() for c in cases])
    assert mags.max() > 1e9 and mags.min() < 1e-6
    kinds = {c.truth["covariate"] for c in cases}
    assert {"shift", "scale", "shift_scale", "year", "timestamp", "currency", "standard"} <= kinds
    assert any(c.truth["true_var_u0"] == 0 for c in cases) and any(0 < c.truth["true_var_u0"] < 1e-2 for c in cases)
    assert any(c.truth["true_var_v"] == 0 for c in cases)
    assert max(abs(c.truth["true_corr_u0v"]) for c in cases) > 0.95
    assert any(c.spec["re_formula"] == "~ x" for c in cases)
    assert any("scale_re_formula" in c.spec for c in cases)
    for c in cases[:50]:  # the standardized twin: same rows, covariate centred and scaled
        assert np.allclose(c.std_data["x"].mean(), 0, atol=1e-8) and np.allclose(c.std_data["x"].std(ddof=0), 1)
        pd.testing.assert_series_equal(c.data["y"], c.std_data["y"])


def test_param_map_is_exact():
    """Estimates on standardized data, mapped back, give the same llf on the raw data (slopes too)."""
    df = mlsml.simulate.demo_data(n_groups=15, seed=3)
    df["x"] = 7.0 + 3.0 * df["x"]
    std = fuzz.standardize(df, ["x"])
    spec = dict(formula="y ~ x", groups="school", scale_formula="~ x", re_formula="~ x")
    raw_model = mlsml.MELSM.from_formula(data=df, **spec)
    std_model = mlsml.MELSM.from_formula(data=std, **spec)
    pm = fuzz.param_maps(raw_model, std_model)
    p_std = np.array([0.1, 0.5, -0.7, 0.2, 0.3, 0.05, 0.2, 0.01, 0.05, -0.02])
    p_raw = fuzz._natural(raw_model, *pm.to_raw(*fuzz._parts(std_model, p_std)))
    assert fuzz.evaluate(raw_model, p_raw) == pytest.approx(fuzz.evaluate(std_model, p_std), rel=1e-10)
    back = fuzz._natural(std_model, *pm.to_std(*fuzz._parts(raw_model, p_raw)))
    np.testing.assert_allclose(back, p_std, rtol=1e-9, atol=1e-12)


def test_reference_finds_the_maximum_of_the_issue_reproducer():
    """Issue 12's reproducer: ``x + 1e6``. The reference reaches the untransformed fit's llf."""
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    spec = dict(formula="y ~ x", groups="school", scale_formula="~ x")
    llf_plain = mlsml.fit(data=df, **spec).llf
    shifted = df.assign(x=df["x"] + 1e6)
    case = fuzz.Case(0, "scaling", shifted, fuzz.standardize(shifted, ["x"]), spec)
    model = mlsml.MELSM.from_formula(data=shifted, **spec)
    routes = fuzz.reference_routes(case, model, None, quick=True)
    ref = max(fuzz.evaluate(model, r["params_raw"]) for r in routes if r["params_raw"] is not None)
    assert ref == pytest.approx(llf_plain, abs=1e-4)


def _row(**kw):
    row = dict(error="", llf=-100.0, converged=True, gap=0.0, llf_accurate_fit=float("nan"))
    row.update(kw)
    return row


@pytest.mark.parametrize("re_formula", ["~ 1", "~ x"])
def test_brute_force_at_the_fit_is_the_fit_s_llf(re_formula):
    """The brute-force log-likelihood (u exact, v on a 40,001-point grid) that confirms an
    "impossible" llf without placing nodes equals the fit's own where the rule is accurate."""
    df = mlsml.simulate.demo_data(n_groups=30, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", re_formula=re_formula)
    assert fuzz.brute_force_at_fit(res) == pytest.approx(res.llf, abs=1e-6)
    no_scale = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    assert np.isnan(fuzz.brute_force_at_fit(no_scale))  # no v to integrate over


@pytest.mark.parametrize(
    "row, cls",
    [
        (_row(), "ok"),
        (_row(gap=-5.0), "ok"),
        (_row(gap=2 * fuzz.BELOW_MAX_TOL), "below_max"),
        (_row(gap=2 * fuzz.BELOW_MAX_TOL, converged=False), "not_converged"),
        (_row(llf=float("inf")), "bad_llf"),
        (_row(llf=4.2e14, llf_accurate_fit=-100.0), "bad_llf"),
        (_row(llf=-100.0, llf_accurate_fit=-100.5), "ok"),
        (_row(error="documented: DataError: ..."), "error_documented"),
        (_row(error="uncaught: KeyError: ..."), "error_uncaught"),
        (_row(error="timeout: over the time cap"), "over_time_cap"),
    ],
)
def test_classify(row, cls):
    assert fuzz.classify(row) == cls


# ---------------------------------------------------------------- the criterion
def _fit_stored(row: dict, data: pd.DataFrame) -> dict:
    """Fit one stored case with the defaults and classify it against its stored maximum."""
    out = dict(case=row["case"], case_seed=row["case_seed"], family=row["family"], reference=row["reference"])
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = mlsml.fit(data=data, **row["spec"])
        except mlsml.MLSMLError as exc:
            out.update(cls="error_documented", error=str(exc)[:120], seconds=time.process_time() - t0)
            return out
        except Exception as exc:  # noqa: BLE001 - the point is to report it
            out.update(cls="error_uncaught", error=f"{type(exc).__name__}: {exc}"[:200], seconds=time.process_time() - t0)
            return out
    out.update(seconds=time.process_time() - t0, llf=float(res.llf), converged=bool(res.converged), message=res.message[:120])
    ref = float(row["reference"])
    if res.optsum.rule_raised:
        # the stored maximum is the default rule's; the fit maximised a larger rule (it raised
        # the default where 2n+1 points moved the llf by more than 1e-3), whose maximum is
        # found again by the CI routes on the standardized twin of the data, with that rule
        case = fuzz.Case(int(row["case_seed"]), row["family"], data, fuzz.standardize(data, ["x"]), dict(row["spec"]))
        model = mlsml.MELSM.from_formula(data=data, **row["spec"])
        model_std = mlsml.MELSM.from_formula(data=case.std_data, **row["spec"])
        routes = fuzz.reference_routes(case, model, res.params.to_numpy(dtype=float), quick=True, model_std=model_std, nagq=res.nagq)
        # only where that rule is accurate to the criterion's tolerance (2n + 1 points agree)
        values = fuzz.accurate_route_values(model_std, routes, res.nagq)
        ref = max(values) if values else float("nan")
        out["reference"] = ref
    gap = ref - res.llf if np.isfinite(ref) else float("nan")
    if np.isfinite(gap) and -gap > fuzz.IMPOSSIBLE_GAP:
        # above every route's maximum: impossible only if the llf is not the likelihood at the
        # estimates. As validation.fuzz.classify, ask the accurate rule there; where it confirms
        # the llf, the routes fell short (a likelihood that rises without bound, as one-pupil
        # schools with a random scale can make it, has no maximum for them to find)
        nagq = fuzz.accurate_nagq(res.model)
        accurate = fuzz.accurate_at_fit(res, nagq) if nagq else float("nan")
        out["llf_accurate_fit"] = accurate
        if np.isfinite(accurate) and res.llf - accurate <= fuzz.IMPOSSIBLE_GAP:
            gap = float("nan")
    out["gap"] = gap
    if out["seconds"] > CI_CASE_SECONDS:
        out["cls"] = "over_time_cap"
    elif not np.isfinite(res.llf) or not np.all(np.isfinite(res.params.to_numpy(dtype=float))):
        out["cls"] = "bad_llf"
    elif np.isfinite(gap) and -gap > fuzz.IMPOSSIBLE_GAP:
        out["cls"] = "bad_llf"  # far above every route's maximum and not confirmed at the estimates
    elif not res.converged:
        out["cls"] = "not_converged"
    elif np.isfinite(gap) and gap > fuzz.BELOW_MAX_TOL:
        out["cls"] = "below_max"
    else:
        out["cls"] = "ok"
    return out


@pytest.fixture(scope="module")
def stored_outcomes() -> pd.DataFrame:
    return pd.DataFrame([_fit_stored(row, data) for row, data in fuzz.read_store(STORE)])


def test_the_store_spans_the_ci_distribution_and_the_regressions():
    index = pd.read_csv(STORE / fuzz.STORE_INDEX)
    ci = index[index["max_rows"] == 60]
    assert len(ci) == 200 and set(ci["family"]) == set(fuzz.FAMILIES)
    assert (index["n_rows"] <= index["max_rows"]).all()
    assert index["reference"].notna().mean() > 0.9, "most stored cases must carry an independent maximum"


@pytest.mark.fuzz_criterion
def test_no_stored_case_below_its_independent_maximum(stored_outcomes):
    df = stored_outcomes
    counts = df["cls"].value_counts().to_dict()
    print("stored fuzz-maximum outcomes:", counts, f"CPU {df['seconds'].sum():.0f} s")
    bad = df[df["cls"].isin(FAILING)]
    new = bad[~bad["case_seed"].isin(list(KNOWN_MISSES))]
    assert new.empty, "issue 12 criterion failed on cases that used to pass:\n" + new.to_string(max_colwidth=80)
    fixed = sorted(set(KNOWN_MISSES) - set(bad["case_seed"]))
    if fixed:
        print("known misses that now pass (move them out of KNOWN_MISSES):", fixed)
    assert counts.get("ok", 0) >= 0.75 * len(df), f"too few cases checked against the maximum: {counts}"


@pytest.mark.slow
@pytest.mark.skipif(
    not (RUN_CRITERION or os.environ.get("MLSML_FUZZ_MAXIMUM") == "1"),
    reason="the live criterion computes its routes in the test (about 5 CPU-s per case); the stored cases run in CI "
    "(-m fuzz_criterion); MLSML_FUZZ_MAXIMUM=1 runs it",
)
def test_no_fit_below_the_independent_maximum():
    seeds = fuzz.case_seeds(N_CASES, SEED)
    rows = [fuzz.run_case(s, i, quick=True, max_rows=CI_MAX_ROWS, case_seconds=CI_CASE_SECONDS) for i, s in enumerate(seeds)]
    df = pd.DataFrame(rows)
    counts = df["cls"].value_counts().to_dict()
    print("fuzz-maximum outcomes:", counts)
    bad = df[df["cls"].isin(FAILING)]
    assert bad.empty, "issue 12 criterion failed:\n" + bad[
        ["case_seed", "family", "cls", "re_formula", "covariate", "n_rows", "llf", "reference", "gap", "error"]
    ].to_string(max_colwidth=80)
    assert counts.get("ok", 0) >= N_CASES // 2, f"too few cases checked against the maximum: {counts}"


def test_a_route_value_counts_only_where_more_points_agree():
    """fuzz.accurate_route_values keeps a route's value under the fit's rule only where 2n + 1
    points agree to the criterion's 1e-3: at a demo fit (15 points, schools of 5 to 30) it is
    kept and equals the fit's llf; at var(v) = 40 in schools of two pupils, where 31 points
    move the 15-point value by more, it is left out, as is a route without estimates."""
    df = mlsml.simulate.demo_data(n_groups=30, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    params = res.params.to_numpy(dtype=float)
    kept = fuzz.accurate_route_values(res.model, [{"params_std": params}, {"params_std": None}], 15)
    assert len(kept) == 1 and kept[0] == pytest.approx(res.llf, abs=1e-8)
    rng = np.random.default_rng(2)
    tiny = pd.DataFrame({"school": np.repeat(np.arange(40), 2), "x": rng.normal(size=80)})
    tiny["y"] = tiny["x"] + np.repeat(rng.normal(size=40), 2) + rng.normal(size=80)
    model = mlsml.MELSM.from_formula("y ~ x", tiny, groups="school", scale_formula="~ x")
    wild = pd.Series(params.copy(), index=res.params.index)
    wild["var(v)"], wild["cov(u0,v)"] = 40.0, 0.0
    values = [fuzz.evaluate(model, wild.to_numpy(), nagq=n) for n in (15, 31)]
    assert abs(values[1] - values[0]) > fuzz.BELOW_MAX_TOL  # the premise: the rule is not accurate there
    assert fuzz.accurate_route_values(model, [{"params_std": wild.to_numpy()}], 15) == []
