"""Accuracy of the product and pruned Gauss-Hermite rules in 3 and 4 dimensions.

Run: ``PYTHONPATH=. python3 bench/quadrature_accuracy.py`` (needs ../shared/data/london_sim.csv).
Fits London Model 4 (d = 3: u0, u1, v) and Model 4 with a second random slope on
``girl`` (d = 4), then evaluates the adaptive log-likelihood at the estimates with
every rule and prints the error against a 13-point (d = 3) / 10-point (d = 4)
product rule. The table is in docs/quadrature.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mlsml
from mlsml.likelihood import Likelihood
from mlsml.quadrature import QuadratureSpec, gauss_hermite_rule

SHARED = Path(__file__).resolve().parents[2] / "shared"


def table(res, d, points, prunes, ref_points):
    design = res.model.design
    th = np.asarray(res.theta)

    def ll(nq, prune=0.0, kind="product"):
        t = time.perf_counter()
        v = Likelihood.build(design, QuadratureSpec(kind, nq, prune)).value(th)
        return v, time.perf_counter() - t

    ref, _ = ll(ref_points)
    print(f"d={d}: reference ({ref_points} points) llf = {ref:.6f}")
    for nq in (7, 11, 15, 21):
        t = time.perf_counter()
        v, _ = ll(nq, kind="uexact")
        print(f"| u-exact, {nq} in v | - | {nq} | {v - ref:.2e} | {time.perf_counter() - t:.3f} |")
    print("| points | prune | nodes | llf error | time (s) |")
    print("|---:|---:|---:|---:|---:|")
    for nq in points:
        for pr in prunes:
            rule = gauss_hermite_rule(d, nq, pr)
            v, t = ll(nq, pr)
            print(f"| {nq} | {pr:g} | {rule.size} | {v - ref:.2e} | {t:.3f} |")


def main() -> None:
    path = SHARED / "data" / "london_sim.csv"
    if not path.exists():
        sys.exit(f"{path} not found")
    df = pd.read_csv(path)
    m4 = mlsml.fit("y ~ x", df, groups="school", re_formula="~ x", scale_formula="~ x", nagq=10)
    table(m4, 3, (5, 6, 7, 8, 9, 11), (0.0, 1e-6, 1e-4, 1e-2), 13)
    m4g = mlsml.fit("y ~ x + girl", df, groups="school", re_formula="~ x + girl", scale_formula="~ x", nagq=7)
    print(m4g.params.to_string())
    table(m4g, 4, (4, 5, 6, 7, 8), (0.0, 1e-6, 1e-4, 1e-2), 10)


if __name__ == "__main__":
    main()
