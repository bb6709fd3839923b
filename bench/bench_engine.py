"""Fit times of this tree against an older mlsml, in one run, on the London design.

Run from the repository root (needs ../shared/data/london_sim.csv)::

    python3 bench/bench_engine.py                 # old version = the merge-base of HEAD and main
    python3 bench/bench_engine.py --rev v0.1      # any git revision
    python3 bench/bench_engine.py --reps 5 --profile
    python3 bench/bench_engine.py --busy 1        # with one busy process competing for the cores

Each figure is the median over ``--reps`` calls of ``mlsml.fit(...)`` from the data
frame (formula processing, optimisation, standard errors and every check of a fit
included), after one untimed warm-up fit per model (lazy imports, caches). The old
version is ``git archive REV mlsml`` unpacked into a temporary folder. Both versions
run in their own worker process, started once, and the fits alternate (old, new,
old, new, ...) so that a change in the machine's load affects both alike.

The workers get the *default* environment: the thread variables
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...) are
removed, so BLAS runs as a user who never heard of them gets it.

``--profile`` also profiles one fit per model and version (cProfile) and prints the
fixed costs -- formula processing (``build_design``), the Hessians, the
boundary check and the quadrature check -- as their share of the profiled time
times the unprofiled median (cProfile slows Python-heavy code such as autograd more
than BLAS-heavy code, so these are estimates), and the top entries of the new
version's profile.

The goals of issue 11: Model 3 at most ``GOALS["Model 3"]`` x the old time, Model 6
at most ``GOALS["Model 6"]`` x, and no model slower.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Worker  # bench/ is the script folder
from revisions import export_tree, merge_base

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

#: The models: London Models 1, 3 and 6 of the paper (as in bench_fit.py).
MODELS = {
    "Model 1": dict(formula="y ~ x", scale_formula="~ 1", random_scale=False),
    "Model 3": dict(formula="y ~ x", scale_formula="~ x"),
    "Model 6": dict(formula="y ~ {COV}", scale_formula="~ {COV}"),
}

#: Largest allowed ratio new / old time (issue 11); every other model: 1.0.
GOALS = {"Model 3": 0.5, "Model 6": 0.3}

#: Environment variables that set thread counts; the workers run without them.
THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "GOTO_NUM_THREADS",
)

#: Fixed costs found in a profile: label -> alternatives (file name ending, function names);
#: the alternative with the largest cumulative time counts (the Hessians were autograd's
#: ``hessian`` before issue 11 and ``Likelihood.hessian`` in likelihood.py after).
FIXED_COSTS = {
    "formula processing": [("design.py", ("build_design",))],
    "Hessians": [("differential_operators.py", ("hessian",)), ("likelihood.py", ("hessian",))],
    "boundary check": [(".py", ("boundary_effects",))],
    "quadrature check": [(".py", ("_quadrature_check", "quadrature_check"))],
}

#: Lines of the profile listing printed per model with --profile.
PROFILE_LINES = 30


# --------------------------------------------------------------------------- worker side
def _worker(tree: str) -> None:
    """Serve ``fit MODEL`` / ``profile MODEL`` / ``quit`` lines on stdin, one JSON line per answer."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(BENCH))
    import warnings

    from common import COV, london

    import mlsml

    if not mlsml.__file__.startswith(tree):
        raise SystemExit(f"imported mlsml from {mlsml.__file__}, not from {tree}")
    df = london()
    specs = {}
    for name, spec in MODELS.items():
        spec = {k: v.format(COV=COV) if isinstance(v, str) else v for k, v in spec.items()}
        specs[name] = (spec.pop("formula"), spec)

    def fit(name):
        formula, spec = specs[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mlsml.fit(formula, df, groups="school", **spec)

    print(json.dumps({"ready": mlsml.__file__}), flush=True)
    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd == "fit":
            t = time.perf_counter()
            res = fit(name)
            dt = time.perf_counter() - t
            print(json.dumps({"t": dt, "llf": float(res.llf), "converged": bool(res.converged)}), flush=True)
        elif cmd == "profile":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            fit(name)
            prof.disable()
            stats = pstats.Stats(prof)
            total = max(row[3] for row in stats.stats.values())  # the outermost cumulative time
            fixed = {}
            for label, alternatives in FIXED_COSTS.items():
                best = {"calls": 0, "share": 0.0}
                for ending, funcs in alternatives:
                    rows = [
                        (row[1], row[3])
                        for (file, _, func), row in stats.stats.items()
                        if func in funcs and file.endswith(ending) and ("mlsml" in file or ending != ".py")
                    ]
                    # nested calls of the same function: the outermost (largest) cumulative time counts once
                    share = max((r[1] for r in rows), default=0.0) / total
                    if share > best["share"]:
                        best = {"calls": sum(r[0] for r in rows), "share": share}
                fixed[label] = best
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(PROFILE_LINES)
            tot = io.StringIO()
            pstats.Stats(prof, stream=tot).sort_stats("tottime").print_stats(PROFILE_LINES // 2)
            print(json.dumps({"total": total, "fixed": fixed, "cumulative": out.getvalue(), "tottime": tot.getvalue()}), flush=True)


# --------------------------------------------------------------------------- driver side
def _busy() -> None:  # pragma: no cover - load generator
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="old revision (default: merge-base of HEAD and main)")
    ap.add_argument("--reps", type=int, default=5, help="timed fits per model and version (default 5)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="subset of: " + ", ".join(MODELS))
    ap.add_argument("--profile", action="store_true", help="fixed costs and the new version's profile")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes competing for the cores meanwhile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    rev = args.rev or merge_base()
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and k != "PYTHONPATH"}
    removed = [k for k in THREAD_VARS if k in os.environ]
    busy = []
    if args.busy:
        import multiprocessing

        busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.busy)]
        for p in busy:
            p.start()
    load0 = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="mlsml-old-") as tmp:
            old_tree = export_tree(rev, Path(tmp))
            workers = {f"old ({short})": Worker(__file__, old_tree, env), "new (this tree)": Worker(__file__, ROOT, env)}
            try:
                results = run(workers, args)
            finally:
                for w in workers.values():
                    w.close()
    finally:
        for p in busy:
            p.terminate()
    load1 = os.getloadavg()
    report(results, workers, args, short, removed, load0, load1)


def run(workers: dict[str, Worker], args) -> dict:
    times: dict = {m: {v: [] for v in workers} for m in args.models}
    llf: dict = {m: {} for m in args.models}
    for m in args.models:
        for w in workers.values():
            w.ask(f"fit {m}")  # warm-up
    for _ in range(args.reps):
        for m in args.models:
            for v, w in workers.items():
                out = w.ask(f"fit {m}")
                times[m][v].append(out["t"])
                llf[m][v] = (out["llf"], out["converged"])
    prof = {}
    if args.profile:
        for m in args.models:
            prof[m] = {v: w.ask(f"profile {m}") for v, w in workers.items()}
    return {"times": times, "llf": llf, "profile": prof}


def report(results, workers, args, short, removed, load0, load1) -> None:
    times, llf, prof = results["times"], results["llf"], results["profile"]
    old, new = list(workers)
    py = sys.version.split()[0]
    print(f"London design; median of {args.reps} fits per model after one warm-up; python {py}, {os.cpu_count()} cores")
    print(f"old = {workers[old].origin}\nnew = {workers[new].origin}")
    print(
        f"thread variables: {'removed ' + ', '.join(removed) if removed else 'none set'}; busy processes: {args.busy}; "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after"
    )
    print(f"{'model':10s} {'old':>9s} {'new':>9s} {'new/old':>8s} {'goal':>6s}  {'llf old':>17s} {'llf new':>17s}")
    met = True
    for m in times:
        to, tn = statistics.median(times[m][old]), statistics.median(times[m][new])
        goal = GOALS.get(m, 1.0)
        ok = tn / to <= goal
        met &= ok
        (lo, co), (ln, cn) = llf[m][old], llf[m][new]
        print(
            f"{m:10s} {to:8.3f}s {tn:8.3f}s {tn / to:8.2f} {goal:6.2f}{'' if ok else '!'} {lo:17.6f} {ln:17.6f}"
            f"{'' if co and cn else '  NOT CONVERGED'}"
        )
    for m in times:
        spread = "  ".join(f"{v}: {' '.join(f'{t:.3f}' for t in times[m][v])}" for v in workers)
        print(f"  {m} all times: {spread}")
    print(f"goals {'met' if met else 'NOT met'}")
    if not prof:
        return
    print("\nfixed costs per fit (share of the profiled fit x unprofiled median; calls in brackets)")
    labels = list(FIXED_COSTS)
    print(f"{'model':10s} {'version':22s} " + " ".join(f"{lab:>22s}" for lab in labels))
    for m in prof:
        for v in workers:
            med = statistics.median(times[m][v])
            cells = [f"{prof[m][v]['fixed'][lab]['share'] * med:8.3f}s ({prof[m][v]['fixed'][lab]['calls']:3d})" for lab in labels]
            print(f"{m:10s} {v:22s} " + " ".join(f"{c:>22s}" for c in cells))
    for m in prof:
        print(f"\n===== profile of one fit, {m}, new tree (cProfile, cumulative) =====")
        print(prof[m][new]["cumulative"])
        print(f"----- {m}, new tree, by own time -----")
        print(prof[m][new]["tottime"])


if __name__ == "__main__":
    main()
