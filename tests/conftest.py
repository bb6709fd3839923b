"""Shared fixtures: bundled data, reference results, and the optional ../shared folder."""

from __future__ import annotations

import json
from pathlib import Path

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
