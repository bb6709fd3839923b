"""mlsml.errors: the exception and warning hierarchy; warnings point at the user's line (errors.warn).

A warning's ``filename``/``lineno`` decide what Python prints and which
``warnings.filterwarnings(module=...)`` filters apply: they must be the caller's
(this file), however deep inside mlsml the warning was raised.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import mlsml
from mlsml.errors import PACKAGE_DIR, find_stack_level, warn
from mlsml.mixregls.deffile import parse_def
from mlsml.mixregls.job import job_data

HERE = str(Path(__file__).resolve())


def _next_line() -> int:
    return inspect.currentframe().f_back.f_lineno + 1


def _only(rec, category):
    hits = [w for w in rec if issubclass(w.category, category)]
    assert len(hits) == 1, [str(w.message) for w in rec]
    return hits[0]


def test_missing_data_warning_points_at_the_call_of_fit():
    df = mlsml.simulate.simulate_data([10] * 20, seed=1)
    df.loc[[2, 5], "x"] = np.nan
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _next_line()
        mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    w = _only(rec, mlsml.MissingDataWarning)
    assert (str(Path(w.filename).resolve()), w.lineno) == (HERE, line)


def test_singular_fit_warning_points_at_the_call_of_fit():
    # no school effect on the variance and tiny schools: var(v) ends on the boundary
    df = mlsml.simulate.simulate_data([4] * 60, cov=[[0.2, 0.0], [0.0, 1e-12]], seed=11)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _next_line()
        mlsml.fit("y ~ x", df, groups="school")
    w = _only(rec, mlsml.SingularFitWarning)
    assert (str(Path(w.filename).resolve()), w.lineno) == (HERE, line)


def test_convergence_warning_points_at_the_call_of_the_model_fit(exam):
    model = mlsml.MELSM.from_formula("normexam ~ standLRT", exam, groups="school")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _next_line()
        model.fit(maxiter=2, max_passes=1)
    w = _only(rec, mlsml.ConvergenceWarning)
    assert (str(Path(w.filename).resolve()), w.lineno) == (HERE, line)


def test_mixregls_job_warning_points_at_the_caller(tmp_path):
    # a MIXREGLS job whose data are not sorted by cluster id: a warning from the data reader
    (tmp_path / "data.dat").write_text("2 1 0.5\n2 1 0.2\n1 3 0.1\n1 4 0.3\n1 2 0.9\n2 5 0.4\n2 1 0.3\n")
    path = tmp_path / "job.def"
    path.write_text("t1\nt2\ndata.dat\nout.out\necho.def\n3 1 0 0 0 0 0 1e-5 11 1 200 0 0 1 0.1 0\n1 2\n3\ny\nx\n")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        line = _next_line()
        job_data(parse_def(path))
    w = _only(rec, mlsml.MissingDataWarning)
    assert "not sorted" in str(w.message)
    assert (str(Path(w.filename).resolve()), w.lineno) == (HERE, line)


def test_find_stack_level_counts_the_library_frames():
    # called from outside the package, the caller itself (level 1) is the user's frame
    assert find_stack_level() == 1
    with pytest.warns(UserWarning) as rec:
        line = _next_line()
        warn("from the test", UserWarning)
    assert (str(Path(rec[0].filename).resolve()), rec[0].lineno) == (HERE, line)


def test_every_warning_of_the_library_goes_through_the_helper():
    """A bare ``warnings.warn`` in mlsml/ would point at the library again."""
    offenders = []
    for path in sorted(Path(PACKAGE_DIR).rglob("*.py")):
        if path.name == "errors.py":
            continue
        for i, text in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bwarnings\.warn\s*\(", text):
                offenders.append(f"{path.name}:{i}")
    assert not offenders, f"use mlsml.errors.warn instead of warnings.warn at {offenders}"


def test_the_exception_and_warning_hierarchy():
    """Users catch every mlsml error as MLSMLError (and bad values as ValueError), every warning as MLSMLWarning."""
    for exc in (mlsml.DataError, mlsml.ModelSpecError):
        assert issubclass(exc, mlsml.MLSMLError) and issubclass(exc, ValueError)
    for w in (
        mlsml.MissingDataWarning,
        mlsml.ConvergenceWarning,
        mlsml.SingularFitWarning,
        mlsml.QuadratureWarning,
        mlsml.UnknownGroupWarning,
    ):
        assert issubclass(w, mlsml.MLSMLWarning) and issubclass(w, UserWarning)
    with pytest.raises(ValueError, match="names 'nope', which is not a column"):
        mlsml.fit("y ~ nope", mlsml.simulate.demo_data(n_groups=5, seed=1), groups="school")
