"""The data sets shipped inside the package (``mlsml.datasets``).

The documentation's examples read ``mlsml.datasets.exam()``, so the CSV files
must be inside the installed package (wheel and sdist), not only in the
repository's ``tests/data``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlsml.datasets

ROOT = Path(__file__).resolve().parent.parent
PKG_DATA = ROOT / "mlsml" / "datasets" / "data"
TEST_DATA = ROOT / "tests" / "data"
SHIPPED = ["mlsml/datasets/data/exam.csv", "mlsml/datasets/data/riesby.csv", "mlsml/datasets/data/README.md"]


def test_exam_has_the_documented_shape_columns_and_types():
    df = mlsml.datasets.exam()
    assert df.shape == (4059, 10)
    assert list(df.columns) == ["school", "student", "normexam", "standLRT", "sex", "schgend", "schavg", "vr", "intake", "type"]
    assert df["school"].dtype == np.int64 and df["student"].dtype == np.int64
    for col in ("normexam", "standLRT", "schavg"):
        assert df[col].dtype == np.float64
    assert df["school"].nunique() == 65
    sizes = df.groupby("school").size()
    assert (sizes.min(), sizes.max(), sizes.median()) == (2, 198, 60)
    assert sorted(df["sex"].unique()) == ["F", "M"]
    assert sorted(df["schgend"].unique()) == ["boys", "girls", "mixed"]
    assert not df.isna().any().any()


def test_riesby_has_the_documented_shape_and_types():
    df = mlsml.datasets.riesby()
    assert df.shape == (375, 5)
    assert list(df.columns) == ["id", "hamdep", "week", "endog", "endweek"]
    assert (df.dtypes == np.int64).all()
    assert df["id"].nunique() == 66
    assert (df["endweek"] == df["endog"] * df["week"]).all()
    assert set(df["week"]) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("name", ["exam", "riesby"])
def test_shipped_files_are_the_test_data(name):
    """The package's copy and tests/data's copy are the same bytes (one data set, two places)."""
    assert (PKG_DATA / f"{name}.csv").read_bytes() == (TEST_DATA / f"{name}.csv").read_bytes()
    pd.testing.assert_frame_equal(getattr(mlsml.datasets, name)(), pd.read_csv(TEST_DATA / f"{name}.csv"), check_dtype=False)


def test_each_call_returns_a_fresh_frame():
    a = mlsml.datasets.exam()
    a.loc[:, "normexam"] = 0.0
    assert mlsml.datasets.exam()["normexam"].abs().sum() > 0


def test_docstrings_give_source_columns_and_licence():
    doc = mlsml.datasets.exam.__doc__
    for word in ("mlmRev", "Goldstein", "Licence", "GPL", "normexam", "standLRT", "schgend", "intake"):
        assert word in doc, word
    doc = mlsml.datasets.riesby.__doc__
    for word in ("MixLS", "MIT", "Reisby", "hamdep", "endweek"):
        assert word in doc, word
    readme = (PKG_DATA / "README.md").read_text()
    assert "Licence note" in readme and "exam.csv" in readme and "riesby.csv" in readme


def _copy_source(dest: Path) -> Path:
    """The files a build needs, copied so that building never writes into the checkout."""
    src = dest / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "mlsml", src / "mlsml", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.mark.slow
def test_wheel_and_sdist_ship_the_data_and_an_installed_copy_reads_it(tmp_path):
    src = _copy_source(tmp_path)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    (wheel,) = wheels.glob("mlsml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in SHIPPED:
        assert f in names, f"{f} missing from the wheel"

    # the sdist too (setuptools' PEP 517 backend, run in the copied tree)
    sdists = tmp_path / "sdist"
    sdists.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(sdists)!r})"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"sdist failed:\n{proc.stderr[-3000:]}"
    (sdist,) = sdists.glob("mlsml-*.tar.gz")
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    for f in SHIPPED:
        assert f in members, f"{f} missing from the sdist"

    # install the wheel into an empty folder and read the data from there (not from this checkout)
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stderr[-3000:]}"
    code = "import mlsml.datasets as d; print(d.__file__); print(d.exam().shape, d.riesby().shape)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, shapes = proc.stdout.strip().splitlines()
    assert Path(where).is_relative_to(target), where
    assert shapes == "(4059, 10) (375, 5)"
