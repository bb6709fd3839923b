"""Export of results: tidy frame, JSON, and HTML/LaTeX summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_to_frame(exam_m3):
    f = exam_m3.to_frame()
    assert list(f.columns) == ["name", "block", "term", "estimate", "std err", "z", "p", "ci_lower", "ci_upper"]
    assert list(f["name"]) == list(exam_m3.params.index)
    assert list(f["block"]) == ["mean", "mean", "scale", "scale", "re", "re", "re"]
    assert list(f["term"][:4]) == ["Intercept", "standLRT", "Intercept", "standLRT"]
    np.testing.assert_array_equal(f["estimate"], exam_m3.params.to_numpy())
    np.testing.assert_array_equal(f["std err"], exam_m3.bse.to_numpy())
    np.testing.assert_allclose(f["ci_upper"] - f["estimate"], 1.959963984540054 * f["std err"])
    f90 = exam_m3.to_frame(alpha=0.1)
    assert (f90["ci_upper"] < f["ci_upper"]).all()


def test_to_json_round_trip(exam_m3, tmp_path):
    path = tmp_path / "fit.json"
    text = exam_m3.to_json(path)
    d = json.loads(path.read_text())
    assert d == json.loads(text)
    assert d["llf"] == exam_m3.llf  # exact: shortest round-trip float representation
    assert d["params"] == {k: float(v) for k, v in exam_m3.params.items()}
    assert d["bse"] == {k: float(v) for k, v in exam_m3.bse.items()}
    assert d["converged"] is True and d["nobs"] == 4059 and d["ngroups"] == 65
    assert np.array_equal(np.array(d["cov_params"]), exam_m3.cov_params().to_numpy())
    assert d["theta"] == [float(v) for v in exam_m3.theta]
    assert d["formula"] == "normexam ~ standLRT" and d["random_scale"] is True


def test_summary_html_and_latex(exam_m3):
    s = exam_m3.summary()
    assert "<table" in s.as_html()
    assert "\\begin{tabular}" in s.as_latex() or "tabular" in s.as_latex()


@pytest.mark.parametrize("style", ["statsmodels", "mixwild"])
def test_summary_formats_by_style(exam_m3, style):
    s = exam_m3.summary(style=style)
    for fmt in ("as_text", "as_html", "as_latex"):
        assert "Intercept" in getattr(s, fmt)()
