"""Old and new mlsml give the same fits: llf, estimates and standard errors to ``TOL``.

For purely computational changes (the speed work of issue 12 on the ``scale_re_formula`` path,
see bench/README.md). Run from the repository root::

    python3 bench/identical_fits.py                 # old = merge-base of HEAD and main
    python3 bench/identical_fits.py --rev c131614

Each version fits every case in its own process (one BLAS thread); the script prints the
largest absolute difference of ``llf``, ``params`` and ``bse`` per case and fails when one
exceeds ``TOL``. Cases: the two 20,000-row fits of ``bench_cliffs.py`` (``model3-20k``,
``scale_re-20k``) and ``scale_re_formula`` variants on 60 schools of 4-30 pupils (two mean
effects, three scale effects, weights at both levels, a variance offset, no mean effect, the
7-point rule).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from revisions import export_tree, merge_base

ROOT = Path(__file__).resolve().parents[1]

#: Largest absolute difference of llf, an estimate or a standard error accepted as "the same".
TOL = 1e-10


def small_data(seed: int = 11) -> pd.DataFrame:
    """60 schools of 4 to 30 pupils, a random intercept and a random scale with random slopes in x and z."""
    rng = np.random.default_rng(seed)
    J = 60
    school = np.repeat(np.arange(J), rng.integers(4, 31, J))
    N = school.size
    x, z = rng.standard_normal(N), rng.standard_normal(N)
    u, v0, v1 = 0.5 * rng.standard_normal(J), 0.3 * rng.standard_normal(J), 0.2 * rng.standard_normal(J)
    lv = -0.5 + 0.2 * x + v0[school] + v1[school] * x
    y = 1 + 0.5 * x + u[school] + np.exp(0.5 * lv) * rng.standard_normal(N)
    frame = pd.DataFrame({"y": y, "x": x + 1.0, "z": z, "school": school})
    frame["w1"] = rng.uniform(0.5, 2.0, N)
    frame["w2"] = rng.uniform(0.5, 2.0, J)[school]
    frame["off"] = 0.3 * rng.standard_normal(N)
    return frame


def cases() -> dict:
    """Case name -> (data factory, fit keywords)."""
    from bench_cliffs import slope_data  # bench/ is the script folder

    sre = dict(scale_formula="~ x", scale_re_formula="~ x")
    return {
        "model3-20k": (slope_data, dict(scale_formula="~ x")),
        "scale_re-20k": (slope_data, sre),
        "small: random slope in the variance": (small_data, sre),
        "small: nagq=7": (small_data, dict(sre, nagq=7)),
        "small: two mean effects": (small_data, dict(sre, re_formula="~ x")),
        "small: no mean effect": (small_data, dict(sre, re_formula="~ 0")),
        "small: three scale effects": (small_data, dict(sre, scale_re_formula="~ x + z")),
        "small: weights at both levels": (small_data, dict(sre, weights="w1", group_weights="w2")),
        "small: variance offset, no u-v covariances": (small_data, dict(sre, scale_offset="off", association="none")),
    }


def _worker(tree: str, out: str) -> None:
    sys.path.insert(0, tree)
    import mlsml

    if not mlsml.__file__.startswith(tree):
        raise SystemExit(f"imported mlsml from {mlsml.__file__}, not from {tree}")
    results = {}
    for name, (make, kw) in cases().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = mlsml.fit("y ~ x", make(), groups="school", **kw)
        results[name] = {
            "llf": float(res.llf),
            "params": np.asarray(res.params, dtype=float).tolist(),
            "bse": np.asarray(res.bse, dtype=float).tolist(),
            "converged": bool(res.converged),
        }
    Path(out).write_text(json.dumps(results))


def run(tree: Path, out: Path) -> dict:
    """Fit every case with the mlsml of ``tree`` in a fresh process; the results by case."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, __file__, "--worker", str(tree), str(out)], env=env, check=True, cwd=ROOT / "bench")
    return json.loads(out.read_text())


def _diff(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return np.inf
    same_nan = np.isnan(a) & np.isnan(b)
    return float(np.max(np.where(same_nan, 0.0, np.abs(a - b)), initial=0.0))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="old revision (default: merge-base of HEAD and main)")
    args = ap.parse_args()
    rev = args.rev or merge_base()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = export_tree(rev, Path(tmp) / "old")
        old = run(old_tree, Path(tmp) / "old.json")
        new = run(ROOT, Path(tmp) / "new.json")
    worst = 0.0
    print(f"old = {rev}, new = {ROOT}; largest absolute differences (TOL = {TOL:g})")
    print(f"{'case':45s} {'llf':>10s} {'params':>10s} {'bse':>10s}  converged  llf")
    for name in old:
        o, n = old[name], new[name]
        d = [_diff(o[key], n[key]) for key in ("llf", "params", "bse")]
        worst = max(worst, *d)
        print(f"{name:45s} {d[0]:10.1e} {d[1]:10.1e} {d[2]:10.1e}  {o['converged']!s:5s}/{n['converged']!s:5s} {n['llf']:.10f}")
    print(f"largest difference {worst:.1e}: {'the same' if worst <= TOL else 'DIFFERENT'}")
    if worst > TOL:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
