"""Issue 14: the fit on a 2-worker Dask ``LocalCluster`` against the in-memory fit, at 1M to 20M pupils.

Simulated London-style data (50 to 100 pupils per school; a student covariate ``x`` with a
school-level part, binary ``girl``, ``fsm``, ``eal``, a five-level ``ethnicity`` and a
school-level three-level ``school_type``) are written to Parquet in files of
:data:`CHUNK_ROWS` rows, each drawn by :func:`mlsml.simulate.draw_responses` from Model 6 at
:data:`TRUTH` (so Model 3 is the same data with the covariates left out). Each case runs in a
fresh Python process (and, for Dask, a fresh cluster), so its peak memory is its own::

    nice python3 bench/bench_dask.py --sizes 1000000 --models 3 6          # generate once, then run
    nice python3 bench/bench_dask.py --sizes 20000000 --models 6 --no-memory  # the cluster only

Reported per case: wall time (for Dask: from ``MELSM.from_formula(path)`` to the fitted results,
the cluster already running; for in memory: ``pandas.read_parquet``, ``from_formula`` and
``fit``), split into building the design and fitting, and the CPU time of all the processes
involved (driver and workers; the machine is shared, so CPU time is the steadier figure); the
peak resident memory of the driver and of each worker process (``VmHWM``), the number of
requests to the workers and the bytes per request (pickled request and replies, summed over
blocks; per kind of request). Results are appended to ``bench/dask_results.json`` and
printed as Markdown rows for ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tree this script is in

import mlsml  # noqa: E402

RESULTS = ROOT / "bench" / "dask_results.json"

#: Rows per Parquet file (one file = one input partition).
CHUNK_ROWS = 500_000

COVARIATES = "x + girl + fsm + eal + C(ethnicity, Treatment('White')) + C(school_type, Treatment('standard'))"
MODELS = {
    "3": dict(formula="y ~ x", scale_formula="~ x"),
    "6": dict(formula=f"y ~ {COVARIATES}", scale_formula=f"~ {COVARIATES}"),
}
ETHNICITY = ("White", "Asian", "Black", "Mixed", "Other")
ETHNICITY_P = (0.55, 0.18, 0.15, 0.07, 0.05)
SCHOOL_TYPE = ("standard", "faith", "grammar")

#: The parameters the data are drawn from (Model 6; close to the paper's Model 3 for x).
TRUTH = {
    "mean:Intercept": 0.0,
    "mean:x": 0.55,
    "mean:girl[T.True]": 0.1,
    "mean:fsm": -0.12,
    "mean:eal": 0.05,
    "mean:C(ethnicity, Treatment('White'))[T.Asian]": 0.1,
    "mean:C(ethnicity, Treatment('White'))[T.Black]": -0.05,
    "mean:C(ethnicity, Treatment('White'))[T.Mixed]": 0.0,
    "mean:C(ethnicity, Treatment('White'))[T.Other]": 0.05,
    "mean:C(school_type, Treatment('standard'))[T.faith]": 0.05,
    "mean:C(school_type, Treatment('standard'))[T.grammar]": 0.3,
    "scale:Intercept": -0.86,
    "scale:x": 0.03,
    "scale:girl[T.True]": -0.05,
    "scale:fsm": 0.1,
    "scale:eal": -0.05,
    "scale:C(ethnicity, Treatment('White'))[T.Asian]": 0.05,
    "scale:C(ethnicity, Treatment('White'))[T.Black]": 0.0,
    "scale:C(ethnicity, Treatment('White'))[T.Mixed]": 0.0,
    "scale:C(ethnicity, Treatment('White'))[T.Other]": -0.05,
    "scale:C(school_type, Treatment('standard'))[T.faith]": 0.0,
    "scale:C(school_type, Treatment('standard'))[T.grammar]": -0.1,
    "var(u0)": 0.058,
    "var(v)": 0.030,
    "cov(u0,v)": -0.015,
}


def _covariates(n_rows: int, first_school: int, rng: np.random.Generator) -> pd.DataFrame:
    """Schools of 50 to 100 pupils (ids from ``first_school``) with London-style covariates, about ``n_rows`` rows."""
    sizes = rng.integers(50, 101, int(n_rows / 75) + 50)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_rows)) + 1]
    sizes[-1] -= int(sizes.sum() - n_rows)  # exactly n_rows (the last school may be smaller)
    J = sizes.size
    school = np.repeat(np.arange(first_school, first_school + J), sizes)
    xm = rng.normal(0, 0.3, J)
    stype = rng.choice(len(SCHOOL_TYPE), J, p=(0.7, 0.2, 0.1))
    return pd.DataFrame(
        {
            "school": school,
            "y": rng.standard_normal(n_rows),  # replaced by the draw from the model
            "x": xm[school - first_school] + rng.normal(0, np.sqrt(1 - 0.09), n_rows),
            "girl": rng.random(n_rows) < 0.5,
            "fsm": (rng.random(n_rows) < 0.2).astype(float),
            "eal": (rng.random(n_rows) < 0.15).astype(float),
            "ethnicity": np.asarray(ETHNICITY, dtype=object)[rng.choice(len(ETHNICITY), n_rows, p=ETHNICITY_P)],
            "school_type": np.asarray(SCHOOL_TYPE, dtype=object)[stype[school - first_school]],
        }
    )


def generate(n_rows: int, folder: Path, seed: int = 2026) -> None:
    """Parquet files of :data:`CHUNK_ROWS` rows, each drawn from Model 6 at :data:`TRUTH`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = 1
    for c, start in enumerate(range(0, n_rows, CHUNK_ROWS)):
        rows = min(CHUNK_ROWS, n_rows - start)
        df = _covariates(rows, first, rng)
        model = mlsml.MELSM.from_formula(MODELS["6"]["formula"], df, groups="school", scale_formula=MODELS["6"]["scale_formula"])
        theta = model.theta_from_params(pd.Series(TRUTH))
        design = model.design
        y = np.empty(design.nobs)
        y[design.order] = mlsml.simulate.draw_responses(design, theta, rng)[0]
        df["y"] = y
        df.to_parquet(folder / f"part{c:03d}.parquet", index=False)
        first = int(df["school"].max()) + 1
        print(f"  wrote {folder / f'part{c:03d}.parquet'} ({rows} rows, {df['school'].nunique()} schools)", flush=True)


def _peak_mb() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss`` on Linux it is not
    inherited from the process that exec'd this one, e.g. the benchmark's driver)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_up() -> None:
    """Import on a worker what a fit uses (a cluster in use has done so already)."""
    import pyarrow.parquet  # noqa: F401, PLC0415
    import scipy.optimize  # noqa: F401, PLC0415

    import mlsml.distributed  # noqa: F401, PLC0415 - the point of the function


def run_case(kind: str, model: str, folder: Path, workers: int) -> dict:
    """One fit in this process: ``kind`` is ``"memory"`` or ``"dask"``."""
    spec = dict(MODELS[model])
    formula = spec.pop("formula")
    out: dict = {"kind": kind, "model": model, "data": str(folder)}
    if kind == "memory":
        t0, c0 = time.perf_counter(), time.process_time()
        df = pd.read_parquet(folder)
        t1 = time.perf_counter()
        model = mlsml.MELSM.from_formula(formula, df, groups="school", **spec)
        t2 = time.perf_counter()
        res = model.fit()
        t3 = time.perf_counter()
        out.update(read_s=t1 - t0, design_s=t2 - t1, fit_s=t3 - t2, time_s=t3 - t0, cpu_s=time.process_time() - c0)
    else:
        from distributed import Client, LocalCluster  # noqa: PLC0415 - the optional dependency, for this case only

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        client.run(_warm_up)  # a running cluster has imported its libraries
        worker_cpu0 = client.run(time.process_time)
        t1, c1 = time.perf_counter(), time.process_time()
        model = mlsml.MELSM.from_formula(formula, str(folder / "*.parquet"), groups="school", client=client, **spec)
        t2 = time.perf_counter()
        res = model.fit()
        t3 = time.perf_counter()
        worker_cpu = sum(v - worker_cpu0[k] for k, v in client.run(time.process_time).items())
        bs = res.likelihood.design.blockset
        out.update(cluster_s=t1 - t0, design_s=t2 - t1, fit_s=t3 - t2, time_s=t3 - t1, blocks=len(bs.blocks), requests=bs.requests)
        out.update(driver_cpu_s=time.process_time() - c1, workers_cpu_s=worker_cpu, cpu_s=time.process_time() - c1 + worker_cpu)
        out["traffic"] = {
            op: {"requests": n, "sent_per_request": s / n, "received_per_request": r / n} for op, (n, s, r) in bs.traffic.items()
        }
        out["worker_peak_mb"] = sorted(client.run(_peak_mb).values())
        client.close()
        cluster.close()
    out.update(
        llf=float(res.llf),
        converged=bool(res.converged),
        nobs=res.nobs,
        ngroups=res.ngroups,
        n_params=len(res.params),
        n_fev=int(res.optsum.n_fev),
        driver_peak_mb=_peak_mb(),
        params=res.params.round(6).to_dict(),
    )
    return out


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


def _run(script: Path, kind: str, model: str, folder: Path, workers: int, env: dict) -> dict | None:
    """One case in a fresh process running ``script`` (this tree's or an old tree's copy)."""
    cmd = [sys.executable, str(script), "--case", kind, "--model", model, "--folder", str(folder), "--workers", str(workers)]
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=dict(env, PYTHONPATH=str(script.parents[1])), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"{kind} Model {model} ({script}) failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    out = json.loads(lines[-1])
    out.update(
        wall_with_startup_s=time.perf_counter() - t0,
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_before=load,
        load=os.getloadavg()[0],
    )
    return out


def _row(n: int, model: str, label: str, out: dict) -> str:
    vg = out.get("traffic", {}).get("value_and_grad", {})
    workers = " / ".join(f"{m:.0f}" for m in out.get("worker_peak_mb", [])) or "-"
    return (
        f"| {_label(n)} | Model {model} | {label} | {out['time_s']:.1f} s ({out['design_s']:.1f} + {out['fit_s']:.1f}) | "
        f"{out['cpu_s']:.1f} s | {out['driver_peak_mb']:.0f} MB | {workers} MB | "
        f"{out.get('requests', '-')} | {vg.get('sent_per_request', 0):.0f} / {vg.get('received_per_request', 0):.0f} B | "
        f"{out['llf']:.6f} | {out['converged']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--models", nargs="+", default=["3", "6"], choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, default=Path("/tmp/mlsml_bench_dask"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory fits")
    parser.add_argument("--old", type=Path, help="an old tree (e.g. `git archive main`): its Dask fit runs too, alternating")
    parser.add_argument("--reps", type=int, default=1, help="runs of each case (medians reported)")
    parser.add_argument("--case", choices=["memory", "dask"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a worker process: one case, one JSON line
        print(json.dumps(run_case(args.case, args.model, args.folder, args.workers)), flush=True)
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    me = Path(__file__).resolve()
    cases = [] if args.no_memory else [("memory", "memory", me)]
    if args.old is not None:
        cases.append(("dask old", "dask", args.old.resolve() / "bench" / "bench_dask.py"))
    cases.append(("dask", "dask", me))
    for n in args.sizes:
        folder = args.data / f"n{_label(n)}"
        if not any(folder.glob("*.parquet")):
            print(f"generating {n} rows in {folder}", flush=True)
            generate(n, folder)
        for model in args.models:
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
            for rep in range(args.reps):  # the cases alternate, so a change of load hits all of them
                for label, kind, script in cases:
                    out = _run(script, kind, model, folder, args.workers, env)
                    if out is None:
                        continue
                    out.update(n=n, tree=label, rep=rep)
                    runs[label].append(out)
                    with RESULTS.open("a") as fh:
                        fh.write(json.dumps(out) + "\n")
                    print(_row(n, model, label, out), flush=True)
            if args.reps > 1:
                med = {label: statistics.median(o["time_s"] for o in outs) for label, outs in runs.items() if outs}
                print(f"Model {model} at {_label(n)}: median time " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
                if "memory" in med:
                    print("  ratios to in memory: " + ", ".join(f"{k} {v / med['memory']:.2f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
