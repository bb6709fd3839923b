"""Time of ``import mlsml`` against the import of its core dependencies, and against an older mlsml.

Run from the repository root::

    python3 bench/bench_import.py              # old version = the merge-base of HEAD and main
    python3 bench/bench_import.py --rev v0.1   # any git revision
    python3 bench/bench_import.py --reps 9

Each figure is the median over ``--reps`` fresh interpreters of the time spent in
the import statement alone (interpreter start-up excluded):

- baseline: ``import pandas, scipy.optimize, autograd`` (what a fit cannot do without);
- this tree: ``import mlsml`` from the working tree;
- the old version: ``import mlsml`` from ``git archive REV mlsml`` unpacked into a temporary folder.

The three are run in turn (baseline, this tree, old, baseline, ...) so that a change in
the machine's load affects all of them alike; one untimed round first fills the
bytecode caches. The goal is ``import mlsml`` <= ``GOAL`` x baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from revisions import export_tree, merge_base  # bench/ is the script folder

ROOT = Path(__file__).resolve().parents[1]

#: The target: ``import mlsml`` takes at most this multiple of the baseline import.
GOAL = 1.5

BASELINE = "import pandas, scipy.optimize, autograd"

#: Times the import statement only and reports where mlsml came from (to check which tree was imported).
PROBE = (
    "import time\n"
    "t0 = time.perf_counter()\n"
    "{stmt}\n"
    "dt = time.perf_counter() - t0\n"
    "import sys\n"
    "m = sys.modules.get('mlsml')\n"
    "print(dt, getattr(m, '__file__', '-'))\n"
)


def time_import(stmt: str, cwd: Path) -> tuple[float, str]:
    """Seconds spent in ``stmt`` in a fresh interpreter started in ``cwd`` (which comes first on sys.path)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt)], cwd=cwd, capture_output=True, text=True, check=True)
    dt, origin = out.stdout.split(maxsplit=1)
    return float(dt), origin.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="old revision to compare with (default: merge-base of HEAD and main)")
    ap.add_argument("--reps", type=int, default=5, help="fresh interpreters per figure (default 5)")
    args = ap.parse_args()
    rev = args.rev or merge_base()
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="mlsml-old-") as tmp:
        old = export_tree(rev, Path(tmp))
        cases = {
            "baseline (pandas, scipy.optimize, autograd)": (BASELINE, ROOT),
            "import mlsml (this tree)": ("import mlsml", ROOT),
            f"import mlsml ({short})": ("import mlsml", old),
        }
        for stmt, cwd in cases.values():  # warm-up: bytecode caches, file system cache
            _, origin = time_import(stmt, cwd)
            if stmt != BASELINE and not origin.startswith(str(cwd)):
                sys.exit(f"imported mlsml from {origin}, not from {cwd}")
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.reps):
            for name, (stmt, cwd) in cases.items():
                times[name].append(time_import(stmt, cwd)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[next(iter(med))]
    print(f"median of {args.reps} fresh interpreters, import statement only (python {sys.version.split()[0]})")
    for name, m in med.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"  {name:<45} {m:7.3f} s  (range {spread} s)  ratio to baseline {m / base:5.2f}")
    new = med["import mlsml (this tree)"]
    print(f"goal: import mlsml <= {GOAL} x baseline: {'met' if new <= GOAL * base else 'NOT met'} ({new / base:.2f})")


if __name__ == "__main__":
    main()
