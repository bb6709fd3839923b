"""Shared fixtures: bundled data, reference results, and the optional ../shared folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

HERE = Path(__file__).parent
DATA = HERE / "data"
REF = DATA / "reference"
SHARED = HERE.parent.parent / "shared"


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


def scale_slope_data(J: int = 40, n: int = 12, seed: int = 3) -> pd.DataFrame:
    """y = 0.2 + 0.5 x + u0 + e, ln var(e) = -0.8 + 0.1 x + v0 + v1 x (as tests/test_extended.py)."""
    rng = np.random.default_rng(seed)
    sigma = np.array([[0.10, -0.03, 0.01], [-0.03, 0.15, 0.02], [0.01, 0.02, 0.06]])
    b = rng.multivariate_normal(np.zeros(3), sigma, size=J)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    lv = -0.8 + 0.1 * x + b[g, 1] + b[g, 2] * x
    y = 0.2 + 0.5 * x + b[g, 0] + rng.normal(size=J * n) * np.exp(lv / 2)
    return pd.DataFrame({"y": y, "x": x, "school": g})
