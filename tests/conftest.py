"""Shared fixtures: bundled data, reference results, and the optional ../shared folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, settings

from validation import fuzz

HERE = Path(__file__).parent
DATA = HERE / "data"
REF = DATA / "reference"
SHARED = HERE.parent.parent / "shared"

# Hypothesis (tests/test_properties.py). The default profile, "ci", is what CI and the
# README's `pytest` run: derandomised (the examples are a fixed function of the test and of
# the hypothesis version) and without the example database, so a run never depends on an
# earlier one; no deadline and no too_slow check, since an example is a few model fits
# whose time depends on the machine's load. `HYPOTHESIS_PROFILE=explore` draws new random
# examples on every run (run it repeatedly to search for failures); a failure prints the
# @reproduce_failure blob that replays it. The tests set their own (small) max_examples.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def distance_to_maximum_in_se(res) -> float:
    """How far, in standard errors, a fit's estimates may be from the exact maximum.

    To second order the maximum is at ``theta + (-H)^{-1} g`` (``g``, ``H``: the gradient and
    Hessian at the estimates, ``res.grad`` and ``res.hessian``), so by Cauchy-Schwarz every
    linear function ``a'theta`` is within ``sqrt(g'(-H)^{-1} g) = sqrt(2 * decrement)`` of
    its standard errors of its value at the maximum; to first order (delta method) so is
    every natural parameter. A converged fit has ``decrement < 1e-6`` (mlsml.optimize), so
    this is at most 1.4e-3; after the final Newton steps it is usually far smaller. Tests
    comparing two fits that should agree use this, not a tolerance found by trying.
    """
    negH = -0.5 * (res.hessian + res.hessian.T)
    g = np.asarray(res.grad, dtype=float)
    return float(np.sqrt(max(g @ np.linalg.solve(negH, g), 0.0)))


def delta_se(res, f, names) -> float:
    """SE of ``f(natural params)`` by central differences on ``res.cov_params()`` (no mlsml autograd)."""
    x = res.params[names].to_numpy()
    V = res.cov_params().loc[names, names].to_numpy()
    g = np.array([(f(x + e) - f(x - e)) / (2 * 1e-6) for e in np.eye(len(x)) * 1e-6])
    return float(np.sqrt(g @ V @ g))


def load_reference(name: str) -> dict:
    """A copied reference JSON (see tests/data/README.md)."""
    return json.loads((REF / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def exam() -> pd.DataFrame:
    return pd.read_csv(DATA / "exam.csv")


@pytest.fixture(scope="session")
def seed_sim() -> pd.DataFrame:
    return pd.read_csv(DATA / "seed_sim.csv")


@pytest.fixture(scope="session")
def london() -> pd.DataFrame:
    path = SHARED / "data" / "london_sim.csv"
    if not path.exists():
        pytest.skip("../shared/data/london_sim.csv is not available")
    return pd.read_csv(path)


@pytest.fixture(scope="session")
def exam_m3(exam):
    import mlsml

    return mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")


class CountingModeProblem:
    """Wraps a mode problem (:mod:`mlsml.modes`) and counts the evaluations of h."""

    def __init__(self, problem):
        self.p, self.J, self.d, self.calls = problem, problem.J, problem.d, 0

    def f(self, b):
        self.calls += 1
        return self.p.f(b)

    def magnitude(self, b):
        return self.p.magnitude(b)

    def derivs(self, b, fisher=False):
        return self.p.derivs(b, fisher)


def zero_u0_data(seed: int) -> pd.DataFrame:
    """Few schools (10-30 of 3-14 pupils), true var(u0) = 0 and a random scale: fits end on
    the boundary (issue 12's "boundary on another face" and singular-fit cases)."""
    rng = np.random.default_rng(seed)
    J = int(rng.integers(10, 31))
    g = np.repeat(np.arange(J), rng.integers(3, 15, size=J))
    x = rng.normal(size=g.size)
    v = rng.normal(0.0, np.sqrt(rng.uniform(0.2, 1.0)), J)
    y = 1.0 + 0.5 * x + np.exp((-0.5 + 0.2 * x + v[g]) / 2) * rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "x": x, "school": g})


def scale_slope_data(J: int = 40, n: int = 12, seed: int = 3, sigma: np.ndarray | None = None) -> pd.DataFrame:
    """y = 0.2 + 0.5 x + u0 + e, ln var(e) = -0.8 + 0.1 x + v0 + v1 x; (u0, v0, v1) ~ N(0, sigma).

    The one simulator of variance-slope data for every test module.
    """
    rng = np.random.default_rng(seed)
    if sigma is None:
        sigma = np.array([[0.10, -0.03, 0.01], [-0.03, 0.15, 0.02], [0.01, 0.02, 0.06]])
    b = rng.multivariate_normal(np.zeros(3), sigma, size=J)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    lv = -0.8 + 0.1 * x + b[g, 1] + b[g, 2] * x
    y = 0.2 + 0.5 * x + b[g, 0] + rng.normal(size=J * n) * np.exp(lv / 2)
    return pd.DataFrame({"y": y, "x": x, "school": g})


def stored_fuzz_case(case_seed: int):
    """``(row, data)`` of a case stored for issue 12's fuzz criterion (tests/data/fuzz_maximum).

    ``row["spec"]`` holds the ``mlsml.fit`` keywords and ``row["reference"]`` the
    independent maximum every route found when the case was stored.
    """
    for row, data in fuzz.read_store(Path(__file__).parent / "data" / "fuzz_maximum"):
        if int(row["case_seed"]) == case_seed:
            return row, data
    raise KeyError(f"fuzz case {case_seed} is not in tests/data/fuzz_maximum")
