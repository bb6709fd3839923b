"""What the benchmark scripts share: the London data, its covariate formula, a timer, a worker process."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def _shared() -> Path:
    """The nearest ``shared`` folder above the repository (``../shared``; ``../../shared`` from a worktree)."""
    for parent in Path(__file__).resolve().parents[1:]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared"
    return Path(__file__).resolve().parents[2] / "shared"


SHARED = _shared()

#: The paper's 19 student and school covariates (Models 5-6), as in london_sim.truth.json.
COV = (
    "x + summer + girl + C(ethnicity, Treatment('White')) + eal + sen + fsm"
    " + C(school_type, Treatment('standard')) + C(admissions, Treatment('comprehensive'))"
    " + C(school_gender, Treatment('mixed')) + religious"
)


def london() -> pd.DataFrame:
    """``../shared/data/london_sim.csv``; exits with a message when it is absent."""
    path = SHARED / "data" / "london_sim.csv"
    if not path.exists():
        sys.exit(f"{path} not found")
    return pd.read_csv(path)


def timed(fn, reps: int):
    """Median wall time of ``reps`` calls of ``fn`` and the last result."""
    times = []
    out = None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class Worker:
    """A worker process (``script --worker tree``) serving one mlsml tree, one JSON line per request.

    Old and new trees run side by side in their own processes, so each imports its own
    ``mlsml``; the driver sends a command line and reads one JSON line back.
    """

    def __init__(self, script: Path, tree: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(script).resolve()), "--worker", str(tree)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )
        self.origin = self._read()["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker failed (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        """Send one command line; the worker's JSON answer."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()
