"""Scale on one machine: Model 6 on up to 1,000,000 students in 5,000 schools.

Run from the repository root::

    PYTHONPATH=. python3 bench/bench_scale.py            # N = 125k, 250k, 500k, 1M
    PYTHONPATH=. python3 bench/bench_scale.py 125000     # one size

Each size is fitted in a fresh child process so that its peak resident memory
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) is that fit's alone. The
figure includes the data frame itself, formula processing (patsy), the
optimisation and the standard errors; time is wall-clock of the whole
``mlsml.fit`` call (data generation excluded).

The data are simulated here (no ../shared needed) with the covariate structure
of the London design (``../shared/data/london_sim.csv``): a continuous prior
attainment score ``x`` with a school-level mean, binary student covariates
with the London proportions (summer, girl, eal, sen, fsm), a six-level
ethnicity factor, and school-level factors (school type, admissions, school
gender, religious). Responses come from the London simulation's parameters
(``london_sim.truth.json``: beta, alpha and the covariance of ``(u0, v)``;
the random slope is left out because Model 6 has none). 5,000 schools have
sizes drawn from a gamma distribution with mean ``N / 5000`` (at least 2).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

COV = (
    "x + summer + girl + C(ethnicity, Treatment('White')) + eal + sen + fsm"
    " + C(school_type, Treatment('standard')) + C(admissions, Treatment('comprehensive'))"
    " + C(school_gender, Treatment('mixed')) + religious"
)
ETH = (["White", "Asian", "Black", "Other", "Mixed", "Chinese"], [0.397, 0.221, 0.207, 0.086, 0.083, 0.006])
TYPE = (["converter", "standard", "sponsored", "other"], [0.394, 0.329, 0.188, 0.089])
ADM = (["comprehensive", "secondary_modern", "grammar"], [0.902, 0.051, 0.047])
GEN = (["mixed", "girls", "boys"], [0.733, 0.164, 0.103])
# london_sim.truth.json (beta, alpha in the order of the terms below; cov of (u0, v))
BETA = dict(
    Intercept=-0.235,
    x=0.632,
    summer=0.044,
    girl=0.218,
    Black=0.014,
    Asian=0.15,
    Chinese=0.29,
    Mixed=0.0,
    Other=0.088,
    eal=0.162,
    sen=-0.276,
    fsm=-0.192,
    sponsored=0.055,
    converter=0.082,
    other=0.023,
    grammar=0.396,
    secondary_modern=-0.118,
    boys=0.053,
    girls=0.064,
    religious=0.139,
)
ALPHA = dict(
    Intercept=-0.889,
    x=0.081,
    summer=-0.045,
    girl=-0.061,
    Black=-0.156,
    Asian=-0.106,
    Chinese=-0.08,
    Mixed=-0.035,
    Other=-0.015,
    eal=-0.005,
    sen=0.203,
    fsm=0.099,
    sponsored=0.011,
    converter=-0.048,
    other=0.053,
    grammar=-0.28,
    secondary_modern=-0.068,
    boys=0.002,
    girls=0.015,
    religious=-0.11,
)
COV_UV = np.array([[0.037, -0.008747], [-0.008747, 0.026]])


def london_like(n_students: int, n_schools: int = 5000, seed: int = 1) -> pd.DataFrame:
    """Simulated London-design data with ``n_students`` rows in ``n_schools`` schools."""
    rng = np.random.default_rng(seed)
    mean = n_students / n_schools
    sizes = np.maximum(2, rng.gamma(6.0, mean / 6.0, n_schools)).astype(int)
    # adjust to the exact total
    diff = n_students - sizes.sum()
    idx = rng.choice(n_schools, abs(diff), replace=True)
    np.add.at(sizes, idx, np.sign(diff))
    while (sizes < 2).any():  # keep every school at two or more students
        lo = sizes < 2
        hi = int(np.argmax(sizes))
        sizes[hi] -= int((2 - sizes[lo]).sum())
        sizes[lo] = 2
    J, N = n_schools, int(sizes.sum())
    school = np.repeat(np.arange(1, J + 1), sizes)
    g = school - 1

    def cat(levels, p, n):
        p = np.asarray(p) / np.sum(p)
        return np.asarray(levels, dtype=object)[rng.choice(len(levels), n, p=p)]

    df = pd.DataFrame({"school": school})
    df["x"] = rng.normal(0, 0.45, J)[g] + rng.normal(0, 0.89, N)
    for name, p in (("summer", 0.256), ("girl", 0.484), ("eal", 0.406), ("sen", 0.137), ("fsm", 0.363)):
        df[name] = (rng.random(N) < p).astype(np.int64)
    df["ethnicity"] = cat(*ETH, N)
    df["school_type"] = cat(*TYPE, J)[g]
    df["admissions"] = cat(*ADM, J)[g]
    df["school_gender"] = cat(*GEN, J)[g]
    df["religious"] = (rng.random(J) < 0.26).astype(np.int64)[g]
    mu = np.full(N, BETA["Intercept"])
    eta = np.full(N, ALPHA["Intercept"])
    for name in ("x", "summer", "girl", "eal", "sen", "fsm", "religious"):
        mu += BETA[name] * df[name].to_numpy()
        eta += ALPHA[name] * df[name].to_numpy()
    for col in ("ethnicity", "school_type", "admissions", "school_gender"):
        vals = df[col].to_numpy()
        for level in np.unique(vals):
            if level in BETA:
                m = vals == level
                mu[m] += BETA[level]
                eta[m] += ALPHA[level]
    b = rng.multivariate_normal(np.zeros(2), COV_UV, size=J)
    df["y"] = mu + b[g, 0] + np.exp(0.5 * (eta + b[g, 1])) * rng.standard_normal(N)
    return df


def child(n: int) -> None:
    """Fit Model 6 once on ``n`` simulated students; print one JSON line."""
    import mlsml

    df = london_like(n)
    t = time.perf_counter()
    res = mlsml.fit("y ~ " + COV, df, groups="school", scale_formula="~ " + COV)
    wall = time.perf_counter() - t
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "N": res.nobs,
                "J": res.ngroups,
                "npar": res.df_model,
                "time_s": round(wall, 2),
                "optimise_s": round(res.fit_time, 2),
                "n_iter": res.n_iter,
                "peak_rss_mb": round(maxrss_kb / 1024, 1),
                "llf": res.llf,
                "converged": res.converged,
                "var_u0": float(res.params["var(u0)"]),
                "var_v": float(res.params["var(v)"]),
                "cov_u0_v": float(res.params["cov(u0,v)"]),
            }
        )
    )


def main(sizes: list[int]) -> None:
    print(f"cores: {os.cpu_count()}; truth var(u0)={COV_UV[0, 0]}, var(v)={COV_UV[1, 1]}, cov={COV_UV[0, 1]}")
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if out.returncode != 0:
            print(out.stderr)
            raise SystemExit(f"N={n} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        base = rows[0]
        print("\n|   N | J | time (s) | time / N (µs) | optimiser (s) | iterations | peak RSS (MB) | llf | converged |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
        for r in rows:
            print(
                f"| {r['N']:,} | {r['J']:,} | {r['time_s']:.1f} | {1e6 * r['time_s'] / r['N']:.1f} | "
                f"{r['optimise_s']:.1f} | {r['n_iter']} | {r['peak_rss_mb']:.0f} | {r['llf']:.2f} | {r['converged']} |"
            )
        print(f"time ratio {rows[-1]['time_s'] / base['time_s']:.2f} for N ratio {rows[-1]['N'] / base['N']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main([int(a) for a in sys.argv[1:]] or [125_000, 250_000, 500_000, 1_000_000])
