"""Performance cliffs of issue 12, this tree against an older mlsml in one run.

Run from the repository root::

    python3 bench/bench_cliffs.py                      # old = merge-base of HEAD and main, 5 reps
    python3 bench/bench_cliffs.py --reps 3 --cases icc-1e-4 scale_re-20k
    MLSML_HSB_CSV=/path/to/hsb.csv python3 bench/bench_cliffs.py --cases hsb-slope hsb-budget

Cases (data simulated here, identical for both versions):

- ``icc-1e-2``, ``icc-1e-4``: Model 3 (``y ~ x``, ``scale_formula="~ x"``, random scale) on
  250 schools of 20 with school SD 1 and residual SD 1e-2 / 1e-4 (intraclass correlation
  near 1); ``icc-1``: the same with residual SD 1, for reference;
- ``model3-20k`` and ``scale_re-20k``: 500 schools of 40 (20,000 rows), Model 3 and the same
  with a random slope in the log variance (``scale_re_formula="~ x"``); issue 12's goal is
  ``scale_re-20k`` within 10 x ``model3-20k``;
- ``model3-tiny`` and ``slope-tiny``: 43 schools of 4 to 30 pupils (about 700 rows) with a
  random intercept and scale and no random slope in the data; Model 3, and the same with a
  random slope in the mean (``re_formula="~ x"``), whose fit ends singular
  (``var(u1) = 0``) and searches the boundary's faces (the slow class of issue 12's fuzz runs);
- ``hsb-slope``: the High School and Beyond variance-slope model (``mathach ~ ses``,
  ``scale_formula="~ ses"``, ``scale_re_formula="~ ses"``; 7,185 pupils in 160 schools) without
  a time budget, and ``hsb-budget`` with ``max_time=HSB_BUDGET`` (new version only: the old has
  no budget). The data are read from ``$MLSML_HSB_CSV`` or ``../shared/data/hsb.csv`` (columns
  ``school, ses, mathach``; not shipped: the copies found carry no licence that allows
  redistribution); without them a simulated look-alike of the same shape is used (school sizes
  14-67, the parameters of the real fit, a nearly rank-1 Sigma) and the output says so.

Each figure is the median over ``--reps`` calls of ``mlsml.fit`` from the data frame, after one
untimed warm-up fit of Model 3; old and new run in two worker processes started once, fits
alternating, with one BLAS thread. ``--clock cpu`` times the fits by the workers' CPU time
(``time.process_time``) instead of the wall clock: on a machine shared with other work the wall
time of a fit varies by a factor of two from run to run, its CPU time far less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from common import Worker  # bench/ is the script folder
from revisions import export_tree, merge_base

ROOT = Path(__file__).resolve().parents[1]
HSB_PATHS = [os.environ.get("MLSML_HSB_CSV", ""), str(ROOT.parent / "shared" / "data" / "hsb.csv")]

#: Time budget (seconds) of the ``hsb-budget`` case; the fit, its standard errors and checks
#: must end within ``HSB_GOAL`` seconds.
HSB_BUDGET = 40.0
HSB_GOAL = 60.0


# --------------------------------------------------------------------------- data
def icc_data(sd_e: float, J: int = 250, n: int = 20, seed: int = 1) -> pd.DataFrame:
    """School SD 1, residual SD ``sd_e`` (times a random scale with SD 0.3 and a slope 0.2 in x)."""
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(J), n)
    x = rng.standard_normal(J * n)
    u, v = rng.standard_normal(J), 0.3 * rng.standard_normal(J)
    y = 1 + 0.5 * x + u[school] + sd_e * np.exp(0.5 * (v[school] + 0.2 * x)) * rng.standard_normal(J * n)
    return pd.DataFrame({"y": y, "x": x, "school": school})


def slope_data(J: int = 500, n: int = 40, seed: int = 2) -> pd.DataFrame:
    """A random intercept (SD 0.5) and a random scale with a random slope in x (SD 0.3, 0.1)."""
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(J), n)
    x = rng.standard_normal(J * n)
    u = 0.5 * rng.standard_normal(J)
    v0, v1 = 0.3 * rng.standard_normal(J), 0.1 * rng.standard_normal(J)
    y = 1 + 0.5 * x + u[school] + np.exp(0.5 * (-0.5 + 0.2 * x + v0[school] + v1[school] * x)) * rng.standard_normal(J * n)
    return pd.DataFrame({"y": y, "x": x, "school": school})


def tiny_data(J: int = 43, seed: int = 7) -> pd.DataFrame:
    """Schools of 4-30: random intercept (SD 0.6) and scale (SD 0.4), a scale slope 0.3 in x."""
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(J), rng.integers(4, 31, size=J))
    x = rng.standard_normal(school.size)
    u, v = 0.6 * rng.standard_normal(J), 0.4 * rng.standard_normal(J)
    y = 0.5 * x + u[school] + np.exp(0.5 * (v[school] + 0.3 * x)) * rng.standard_normal(school.size)
    return pd.DataFrame({"y": y, "x": x, "school": school})


def hsb_data() -> tuple[pd.DataFrame, str]:
    """The High School and Beyond data if found, else a simulated look-alike (see the module docstring)."""
    for path in HSB_PATHS:
        if path and Path(path).is_file():
            df = pd.read_csv(path)
            return df[["school", "ses", "mathach"]], f"real data ({path})"
    rng = np.random.default_rng(82)
    sizes = rng.integers(14, 68, size=160)
    school = np.repeat(np.arange(160), sizes)
    ses = rng.normal(0.0, 0.41, 160)[school] + rng.normal(0.0, 0.66, school.size)
    sd = np.sqrt([4.59, 0.0103, 0.0413])
    corr = np.array([[1.0, -0.999, -0.999], [-0.999, 1.0, 0.999], [-0.999, 0.999, 1.0]])
    w, V = np.linalg.eigh(corr)
    L = (V * np.sqrt(np.clip(w, 0.0, None))) * 1.0
    b = (rng.standard_normal((160, 3)) @ L.T) * sd
    lv = 3.648 - 0.0205 * ses + b[school, 1] + b[school, 2] * ses
    y = 12.65 + 2.334 * ses + b[school, 0] + np.exp(0.5 * lv) * rng.standard_normal(school.size)
    return pd.DataFrame({"school": school, "ses": ses, "mathach": y}), "simulated look-alike (no hsb.csv found)"


def cases() -> dict:
    """Case name -> (data frame factory, formula, fit keywords, new version only)."""
    hsb = ("mathach ~ ses", dict(scale_formula="~ ses", scale_re_formula="~ ses"))
    return {
        "icc-1": (lambda: icc_data(1.0), "y ~ x", dict(scale_formula="~ x"), False),
        "icc-1e-2": (lambda: icc_data(1e-2), "y ~ x", dict(scale_formula="~ x"), False),
        "icc-1e-4": (lambda: icc_data(1e-4), "y ~ x", dict(scale_formula="~ x"), False),
        "model3-20k": (slope_data, "y ~ x", dict(scale_formula="~ x"), False),
        "scale_re-20k": (slope_data, "y ~ x", dict(scale_formula="~ x", scale_re_formula="~ x"), False),
        "model3-tiny": (tiny_data, "y ~ x", dict(scale_formula="~ x"), False),
        "slope-tiny": (tiny_data, "y ~ x", dict(scale_formula="~ x", re_formula="~ x"), False),
        "hsb-slope": (lambda: hsb_data()[0], hsb[0], hsb[1], False),
        "hsb-budget": (lambda: hsb_data()[0], hsb[0], dict(hsb[1], max_time=HSB_BUDGET), True),
    }


# --------------------------------------------------------------------------- worker
def _worker(tree: str) -> None:
    sys.path.insert(0, tree)
    import mlsml

    if not mlsml.__file__.startswith(tree):
        raise SystemExit(f"imported mlsml from {mlsml.__file__}, not from {tree}")
    table = cases()
    frames: dict = {}
    print(json.dumps({"ready": mlsml.__file__}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        make, formula, kw, _ = table[name]
        if name not in frames:
            frames[name] = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, c = time.perf_counter(), time.process_time()
            res = mlsml.fit(formula, frames[name], groups="school", **kw)
            dt, dc = time.perf_counter() - t, time.process_time() - c
        out = {"t": dt, "cpu": dc, "llf": float(res.llf), "converged": bool(res.converged), "message": str(res.message)}
        print(json.dumps(out), flush=True)


def worker(tree: Path) -> Worker:
    """A :class:`common.Worker` of this script for ``tree``, on one BLAS thread, importing that tree's mlsml."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return Worker(__file__, tree, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="old revision (default: merge-base of HEAD and main)")
    ap.add_argument("--reps", type=int, default=5, help="timed fits per case and version (default 5)")
    ap.add_argument("--cases", nargs="*", default=list(cases()), help="subset of: " + ", ".join(cases()))
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or the worker's CPU time (process time: with one BLAS thread the same on an "
        "idle machine, and far less disturbed by other processes on a loaded one)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    rev = args.rev or merge_base()
    print(f"HSB data: {hsb_data()[1]}")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = export_tree(rev, Path(tmp))
        workers = {"old": worker(old_tree), "new": worker(ROOT)}
        try:
            for w in workers.values():
                w.ask("icc-1")  # warm-up: lazy imports, caches
            origin = workers["old"].origin
            print(f"old = {rev[:8]} ({origin}), new = this tree; median of {args.reps}, one BLAS thread, {args.clock} time")
            print(f"{'case':<14}{'old (s)':>10}{'new (s)':>10}{'new/old':>9}  old llf / conv      new llf / conv")
            medians = {}
            for name in args.cases:
                only_new = cases()[name][3]
                runs: dict = {"old": [], "new": []}
                for _ in range(args.reps):
                    for version in ("new",) if only_new else ("old", "new"):
                        runs[version].append(workers[version].ask(name))
                key = "t" if args.clock == "wall" else "cpu"
                med = {v: statistics.median(r[key] for r in rs) if rs else float("nan") for v, rs in runs.items()}
                medians[name] = med
                last = {v: (rs[-1] if rs else None) for v, rs in runs.items()}
                desc = "  ".join(
                    f"{last[v]['llf']:.6f} {'yes' if last[v]['converged'] else 'NO'}" if last[v] else "-" for v in ("old", "new")
                )
                print(f"{name:<14}{med['old']:>10.2f}{med['new']:>10.2f}{med['new'] / med['old']:>9.2f}  {desc}", flush=True)
                if last["new"] and not last["new"]["converged"]:
                    print(f"{'':<14}new: {last['new']['message']}")
            for v in ("old", "new"):
                if "model3-20k" in medians and "scale_re-20k" in medians:
                    m3, sre = medians["model3-20k"][v], medians["scale_re-20k"][v]
                    print(f"scale_re-20k / model3-20k ({v}): {sre / m3:.1f} (goal <= 10)")
            if "hsb-budget" in medians:
                t = medians["hsb-budget"]["new"]
                print(f"hsb-budget (max_time={HSB_BUDGET:g} s): {t:.1f} s in all, goal <= {HSB_GOAL:g} s")
        finally:
            for w in workers.values():
                w.close()


if __name__ == "__main__":
    main()
