"""Speed of the empirical-Bayes school predictions on the London-design data.

Run: ``PYTHONPATH=. python3 bench/bench_predict.py`` (needs ../shared/data/london_sim.csv).
Fits Models 2, 3 and a random-slope Model 4 once (not timed), then prints the median
wall time of 5 repetitions of each prediction method, and the numbers of schools whose
95% interval excludes the average (the paper's "320 of 465 / 117 of 465" on its Model 2).
Target (issue #4): all school predictions for London-size data well under a second.
"""

from __future__ import annotations

import warnings

from common import london, timed  # noqa: E402  (bench/ is the script folder)

import mlsml

MODELS = {
    "Model 2": dict(formula="y ~ x", scale_formula="~ 1"),
    "Model 3": dict(formula="y ~ x", scale_formula="~ x"),
    "Model 4 (random slope)": dict(formula="y ~ x", scale_formula="~ x", re_formula="~ x"),
}


def main(reps: int = 5) -> None:
    df = london()
    print(f"London design: {len(df)} students, {df['school'].nunique()} schools; median of {reps} runs")
    print(
        f"{'model':24s} {'random_effects':>15s} {'school_effects':>15s} {'population':>11s} "
        f"{'predict(N rows)':>16s} {'all four':>9s}  separable: means / variances"
    )
    for name, spec in MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = mlsml.fit(
                spec["formula"], df, groups="school", scale_formula=spec["scale_formula"], re_formula=spec.get("re_formula", "~ 1")
            )
        t_re, _ = timed(res.random_effects, reps)
        t_se, table = timed(res.school_effects, reps)
        t_pq, _ = timed(res.population_quantities, reps)
        t_pr, _ = timed(lambda res=res: res.predict(df, kind="variance"), reps)
        n_mean = int((table["mean_flag"] != 0).sum())
        n_var = int((table["var_flag"] != 0).sum())
        total = t_re + t_se + t_pq + t_pr
        print(f"{name:24s} {t_re:14.3f}s {t_se:14.3f}s {t_pq:10.3f}s {t_pr:15.3f}s {total:8.3f}s  {n_mean} / {n_var} of {len(table)}")


if __name__ == "__main__":
    main()
