"""Speed of random-slope models on the London design (71,321 students, 465 schools).

Run: ``PYTHONPATH=. python3 bench/bench_slopes.py [reps]`` (needs ../shared/data/london_sim.csv).
Median wall time of ``mlsml.fit(...)`` from a DataFrame (formula processing,
optimisation and standard errors included). Targets (issue #3): Model 4 < 2 s,
Model 6 + random slope on x < 5 s. Also prints the llf change when the points
are increased (product rule, 11 and 13 points per dimension, at the estimates).
"""

from __future__ import annotations

import os
import sys

from common import COV, london, timed  # noqa: E402  (bench/ is the script folder)

import mlsml
from mlsml.likelihood import Likelihood
from mlsml.quadrature import QuadratureSpec

MODELS = {
    "Model 4 (auto: u-exact, 15 pts in v)": dict(formula="y ~ x", scale_formula="~ x", re_formula="~ x"),
    "Model 4 (product rule, 9^3 pts)": dict(formula="y ~ x", scale_formula="~ x", re_formula="~ x", quadrature="product"),
    "Model 6 + random slope on x": dict(formula="y ~ " + COV, scale_formula="~ " + COV, re_formula="~ x"),
}


def main(reps: int = 5) -> None:
    df = london()
    print(f"london_sim: {len(df)} rows, {df.school.nunique()} schools; cores: {os.cpu_count()}")
    for name, spec in MODELS.items():
        spec = dict(spec)
        formula = spec.pop("formula")
        t, res = timed(lambda f=formula, s=spec: mlsml.fit(f, df, groups="school", **s), reps)
        d = res.model.design
        gap = max(abs(Likelihood.build(d, QuadratureSpec("product", nq)).value(res.theta) - res.llf) for nq in (11, 13))
        print(
            f"{name:40s} {t:7.3f} s  llf={res.llf:.6f}  k={res.df_model}  converged={res.converged}"
            f"  max|llf(11,13 pts) - llf|={gap:.1e}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
