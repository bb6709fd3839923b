"""Power and false-alarm rate of the residual-tail check (issue 12, "heavy tails").

:func:`mlsml.diagnostics.tail_check` compares the within-school kurtosis of the
standardised residuals with its reference under normal residuals. This script fits
the model to data simulated with normal, t(5) and t(3) residuals (variance 1) and
counts how often the check says the tails are heavy::

    python -m validation.tails --seeds 100                      # every scenario, the table in Markdown
    python -m validation.tails --scenario slope --seeds 20 --verbose

The figures in docs/model.md ("Heavy tails or heterogeneity?") are from 100 seeds of
``plain``, ``scale_x`` and ``small`` and 60 of ``slope``; every data set is in
``validation/results/tails_issue12.csv``.

Scenarios (:data:`SCENARIOS`): ``plain``, 100 schools of 30, random intercept and random
scale (var(v) = 0.05); ``scale_x``, the same with ``ln var(e) = -0.5 + 0.2 x + v`` and
``scale_formula="~ x"``; ``small``, 200 schools of 4 to 12; ``slope``, a random slope of
``x`` (``re_formula="~ x"``), 100 schools of 20, so that ``z_ij`` varies within schools and
the posterior predictions cancel from the within-school kurtosis only approximately.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import mlsml
from mlsml.diagnostics import TAIL_ALPHA, tail_check

#: name: (schools, size range, scale slope on x, random slope of x, fit options)
SCENARIOS = {
    "plain": (100, (30, 30), 0.0, False, {}),
    "scale_x": (100, (30, 30), 0.2, False, {"scale_formula": "~ x"}),
    "small": (200, (4, 12), 0.0, False, {}),
    "slope": (100, (20, 20), 0.0, True, {"re_formula": "~ x"}),
}

#: Residual distributions: ``None`` is normal, a number the degrees of freedom of a t.
TAILS = (None, 5.0, 3.0)


def simulate(scenario: str, seed: int, t_df: float | None) -> pd.DataFrame:
    """One data set of ``scenario`` with normal (``t_df=None``) or t residuals of variance 1."""
    J, (lo, hi), a1, slope, _ = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    sizes = np.full(J, lo) if lo == hi else rng.integers(lo, hi + 1, J)
    school = np.repeat(np.arange(J), sizes)
    N = len(school)
    x = rng.normal(size=N)
    u0 = rng.normal(0, 0.3, J)[school]
    u1 = rng.normal(0, 0.2, J)[school] if slope else 0.0
    v = rng.normal(0, np.sqrt(0.05), J)[school]
    e = rng.standard_normal(N) if t_df is None else rng.standard_t(t_df, N) / np.sqrt(t_df / (t_df - 2))
    y = 0.5 * x + u0 + u1 * x + np.exp(0.5 * (-0.5 + a1 * x + v)) * e
    return pd.DataFrame({"y": y, "x": x, "school": school})


def run(scenario: str, seeds: range, verbose: bool = False) -> pd.DataFrame:
    """One row per data set: scenario, seed, tails, converged, var(v), statistic, reference mean, p-value."""
    rows = []
    for seed in seeds:
        for t_df in TAILS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mlsml.MLSMLWarning)
                res = mlsml.fit("y ~ x", simulate(scenario, seed, t_df), groups="school", **SCENARIOS[scenario][4])
            check = tail_check(res)
            row = {
                "scenario": scenario,
                "seed": seed,
                "tails": "normal" if t_df is None else f"t({t_df:g})",
                "converged": res.converged,
                "var_v": float(res.params["var(v)"]),
                "statistic": check.statistic,
                "reference_mean": check.reference_mean,
                "p_value": check.p_value,
            }
            if verbose:
                print(row, flush=True)
            rows.append(row)
    return pd.DataFrame(rows)


def table(results: pd.DataFrame) -> str:
    """The rates as a Markdown table: share flagged at TAIL_ALPHA and at 0.05, mean var(v) (true 0.05)."""
    g = results.groupby(["scenario", "tails"], sort=False)
    out = pd.DataFrame(
        {
            "data sets": g.size(),
            f"flagged (p < {TAIL_ALPHA:g})": g["p_value"].apply(lambda p: (p < TAIL_ALPHA).mean()),
            "flagged (p < 0.05)": g["p_value"].apply(lambda p: (p < 0.05).mean()),
            "mean K - E(K)": g.apply(lambda d: (d["statistic"] - d["reference_mean"]).mean()),
            "mean var(v)": g["var_v"].mean(),
        }
    )
    out = out.round(3).reset_index()
    lines = ["| " + " | ".join(out.columns) + " |", "|" + "---|" * len(out.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in out.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=list(SCENARIOS), action="append")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--out", help="CSV of every data set")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = pd.concat([run(s, seeds, args.verbose) for s in args.scenario or SCENARIOS], ignore_index=True)
    if args.out:
        results.to_csv(args.out, index=False)
    print(table(results))


if __name__ == "__main__":
    main()
