"""mlsml's own .def keywords (mlsml.mixregls.keywords): weights at both levels and the type of SEs
in a MIXREGLS job, equal to the direct fit, shown in the report, bad lines refused by line."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import mlsml
from mlsml.cli import main
from mlsml.errors import ModelSpecError
from mlsml.mixregls.deffile import parse_def
from mlsml.mixregls.job import run_job

#: The seed_sim job's header and records (MIXREGLS layout), with two more columns: the weights.
HEAD = (
    "seed_sim weighted\nMIXREGLS location-scale model\ndata.dat\nmodel.out\nmodel_echo.def\n"
    "5 1 0 1 0 0 0 0 0 0 1.0E-05 11 1 200 0 0 1 0.1 0\n1 2\n3\n3\ny\nx\nx\n"
)


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """40 clusters of seed_sim with a level-1 and a level-2 weight column, written as a job's data."""
    path = tmp_path_factory.mktemp("job")
    raw = np.loadtxt(DATA / "mixwild" / "seed_sim__m3" / "data.dat")
    raw = raw[raw[:, 0] <= 40]
    rng = np.random.default_rng(15)
    w1 = rng.uniform(0.5, 3.0, len(raw))
    w2 = dict(zip(np.unique(raw[:, 0]), rng.uniform(1.0, 10.0, 40)))
    data = np.column_stack([raw, w1, [w2[i] for i in raw[:, 0]]])
    np.savetxt(path / "data.dat", data, fmt="%.10g")
    frame = pd.DataFrame(np.loadtxt(path / "data.dat"), columns=["cluster", "y", "x", "w1", "w2"])  # as written
    return path, frame


def _job(path, extra: str):
    (path / "job.def").write_text(HEAD + extra)
    return path / "job.def"


def test_weighted_job_equals_the_direct_fit_and_says_so(weighted):
    path, frame = weighted
    job = _job(path, "WEIGHT1 = 4   ! student weight given the school\nweight2 = 5\nWEIGHTSCALE = effective\n")
    assert parse_def(job).keywords == {"WEIGHT1": 4, "WEIGHT2": 5, "WEIGHTSCALE": "effective"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_job(job, stages=False)
        direct = mlsml.fit(
            "y ~ x", frame, groups="cluster", scale_formula="~ x", weights="w1", group_weights="w2", weights_scale="effective", nagq=11
        )
    assert run.results.cov_type == direct.cov_type == "robust"
    assert run.results.llf == pytest.approx(direct.llf, rel=1e-10)
    np.testing.assert_allclose(run.results.params.to_numpy(), direct.params.to_numpy(), atol=1e-6)
    np.testing.assert_allclose(run.results.bse.to_numpy(), direct.bse.to_numpy(), rtol=1e-5)
    assert " WEIGHTS    = sampling: level 1 column 'weight1' (scaled: effective), level 2 column 'weight2'" in run.report
    assert "cluster-robust (sandwich) SEs over _cluster" in run.report
    # the report's SEs are the robust ones
    row = next(ln for ln in run.report.splitlines() if ln.startswith("x ") and "BETA" not in ln)
    assert float(row.split()[2]) == pytest.approx(direct.bse["mean:x"], abs=1e-5)  # printed to 5 decimals


def test_covtype_and_frequency_weights_from_the_def(weighted, capsys):
    path, frame = weighted
    job = _job(path, "WEIGHT2 = 5\nWEIGHTKIND = frequency\nCOVTYPE = robust\n")
    assert main(["mixregls", str(job), "--no-stages", "--json", str(path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "WEIGHTS    = frequency: level 2 column 'weight2'" in out and "cluster-robust" in out
    res = mlsml.load(path / "r.json")
    assert res.cov_type == "robust" and res.ngroups == pytest.approx(frame.groupby("cluster")["w2"].first().sum())
    plain = _job(path, "")
    assert parse_def(plain).keywords == {}
    assert "WEIGHTS" not in run_job(plain, stages=False).report


@pytest.mark.parametrize(
    "extra, message",
    [
        ("WIEGHT1 = 4\n", "line 13: unknown keyword 'WIEGHT1'"),
        ("WEIGHT1 = 4\nWEIGHT1 = 5\n", "line 14: keyword WEIGHT1 is given twice"),
        ("WEIGHT1 = 6\n", "WEIGHT1 = '6' must be a column number from 1 to NVAR = 5"),
        ("WEIGHT1 = 4.5\n", "must be a column number"),
        ("WEIGHT1 = 4\nWEIGHTSCALE = sum\n", "WEIGHTSCALE = 'sum' must be one of size, effective, none"),
        ("COVTYPE = sandwich\n", "COVTYPE = 'sandwich' must be one of nonrobust, robust"),
        ("WEIGHTKIND = frequency\n", "WEIGHTKIND given without a weight column"),
        ("WEIGHT2 = 5\nWEIGHTSCALE = size\n", "no WEIGHT1 column"),
    ],
)
def test_bad_keywords_are_refused_by_line(weighted, extra, message):
    path, _ = weighted
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_def(_job(path, extra))


def test_a_weight_that_varies_within_a_cluster_is_refused_by_name(weighted):
    path, _ = weighted
    with pytest.raises(mlsml.DataError, match="school weights \\(column 'weight2'\\) must be constant"):
        run_job(_job(path, "WEIGHT2 = 4\n"), stages=False)
