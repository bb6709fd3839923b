"""Speed benchmarks on the London-design data (71,321 students, 465 schools).

Run: ``python bench/bench_fit.py`` (needs ../shared/data/london_sim.csv). Prints the
median wall time of several repetitions of each fit, *including* formula processing
and standard errors, and the statsmodels MixedLM(reml=False) time for Model 1.
Targets (issue #2): Model 3 < 0.5 s, Model 6 < 2 s, Model 1 no slower than statsmodels.
"""

from __future__ import annotations

import os
import sys
import warnings

from common import COV, london, timed  # noqa: E402  (bench/ is the script folder)

import mlsml

MODELS = {
    "Model 1": dict(formula="y ~ x", scale_formula="~ 1", random_scale=False),
    "Model 2": dict(formula="y ~ x", scale_formula="~ 1"),
    "Model 3": dict(formula="y ~ x", scale_formula="~ x"),
    "Model 5/6 (all 19 covariates)": dict(formula="y ~ " + COV, scale_formula="~ " + COV),
}


def main(reps: int = 5) -> None:
    df = london()
    print(f"london_sim: {len(df)} rows, {df.school.nunique()} schools; cores: {os.cpu_count()}")
    for name, spec in MODELS.items():
        spec = dict(spec)
        formula = spec.pop("formula")
        t, res = timed(lambda f=formula, s=spec: mlsml.fit(f, df, groups="school", **s), reps)
        print(f"{name:32s} {t:7.3f} s  llf={res.llf:.6f}  converged={res.converged}")
    import statsmodels.formula.api as smf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, sm = timed(lambda: smf.mixedlm("y ~ x", df, groups=df["school"]).fit(reml=False), reps)
    print(f"{'statsmodels MixedLM Model 1':32s} {t:7.3f} s  llf={sm.llf:.6f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
