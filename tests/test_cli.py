"""The command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlsml.cli import main


def test_fit_csv_with_json(tmp_path, capsys):
    from conftest import DATA

    out = tmp_path / "fit.json"
    code = main([
        "fit", str(DATA / "exam.csv"), "--formula", "normexam ~ standLRT", "--groups", "school",
        "--scale", "~ standLRT", "--json", str(out),
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "Mixed-effects location scale model results" in text
    d = json.loads(out.read_text())
    assert d["converged"] is True
    assert d["llf"] == pytest.approx(-4656.316442, abs=1e-5)
    assert set(d["params"]) == set(d["bse"])


def test_errors_are_one_line(tmp_path, capsys):
    code = main(["fit", str(tmp_path / "nope.csv"), "--formula", "y ~ x", "--groups", "g"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlsml: error:")
    from conftest import DATA

    code = main(["fit", str(DATA / "exam.csv"), "--formula", "normexam ~ nothere", "--groups", "school"])
    assert code == 2
    assert "'nothere'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_as_a_command():
    p = subprocess.run([sys.executable, "-m", "mlsml.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Model comparison" in p.stdout
    assert p.stdout.count("Mixed-effects location scale model results") == 3
