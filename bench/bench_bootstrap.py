"""Parametric bootstrap timings: serial against parallel refits.

Run from the repository root: ``python bench/bench_bootstrap.py [B]`` (default B = 100).
Uses the bundled exam data (tests/data/exam.csv: 4,059 students, 65 schools) and the
seed paper's Model 3. Prints the wall time of ``res.bootstrap(B)`` with 1 and with all
worker processes, the number of converged replicates, and the Wald and bootstrap SEs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pandas as pd

import mlsml

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "exam.csv"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    df = pd.read_csv(DATA)
    t0 = time.perf_counter()
    res = mlsml.fit("normexam ~ standLRT", df, groups="school", scale_formula="~ standLRT")
    print(f"one fit: {time.perf_counter() - t0:.3f} s, llf {res.llf:.6f}")
    boots = {}
    for jobs in sorted({1, os.cpu_count() or 1}):
        boot = res.bootstrap(n, seed=20261126, n_jobs=jobs, progress=False)
        boots[jobs] = boot
        print(f"B = {n}, n_jobs = {jobs}: {boot.elapsed:.1f} s ({boot.elapsed / n:.3f} s per replicate), {boot.n_converged} converged")
    print(boots[max(boots)].summary_frame().round(4).to_string())


if __name__ == "__main__":
    main()
