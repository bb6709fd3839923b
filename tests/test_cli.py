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
    code = main(
        [
            "fit",
            str(DATA / "exam.csv"),
            "--formula",
            "normexam ~ standLRT",
            "--groups",
            "school",
            "--scale",
            "~ standLRT",
            "--json",
            str(out),
        ]
    )
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


@pytest.mark.parametrize("command", [[], ["demo"], ["fit"], ["mixregls"]])
def test_help_for_every_command_has_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mlsml" in out
    if command:
        assert "example" in out and f"mlsml {command[0]}" in out


def test_fit_formats_styles_and_verbose(capsys):
    from conftest import DATA

    base = ["fit", str(DATA / "exam.csv"), "--formula", "normexam ~ standLRT", "--groups", "school", "--scale", "~ standLRT"]
    assert main(base + ["--format", "html"]) == 0
    assert "<table" in capsys.readouterr().out
    assert main(base + ["--format", "latex", "-v"]) == 0
    cap = capsys.readouterr()
    assert "tabular" in cap.out and "pass 1: logL =" in cap.err
    assert main(base + ["--style", "mixwild", "--stages"]) == 0
    cap = capsys.readouterr()
    assert "Model without Scale Parameters" in cap.out and "ALPHA (BS variance" in cap.out
    assert "[3/3] Model WITH RANDOM Scale" in cap.err
    assert main(base + ["--stages"]) == 2
    assert capsys.readouterr().err.strip() == "mlsml: error: --stages needs --style mixwild"
    assert main(base + ["--quiet"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "formula, text",
    [("normexam ~ C(", "could not evaluate the mean formula"), ("normexam ~ standLRT +", "could not evaluate")],
)
def test_formula_errors_are_one_line(formula, text, capsys):
    from conftest import DATA

    code = main(["fit", str(DATA / "exam.csv"), "--formula", formula, "--groups", "school"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlsml: error:") and text in err[0]


def test_unreadable_data_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    assert main(["fit", str(bad), "--formula", "y ~ x", "--groups", "g"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlsml: error: cannot read")
    d = tmp_path / "adir.csv"
    d.mkdir()
    assert main(["fit", str(d), "--formula", "y ~ x", "--groups", "g"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlsml: error:")


def test_fit_with_between_school_variance_function(tmp_path, capsys):
    """--bs and --scale-re reach the model (Riesby: ln var(u0) = tau0 + tau1 endog)."""
    from conftest import DATA

    out = tmp_path / "fit.json"
    code = main(
        [
            "fit",
            str(DATA / "riesby.csv"),
            "--formula",
            "hamdep ~ week + endog + endweek",
            "--groups",
            "id",
            "--scale",
            "~ week + endog",
            "--bs",
            "~ endog",
            "--json",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    d = json.loads(out.read_text())
    assert "bsvar:endog" in d["params"]
    assert d["llf"] == pytest.approx(-1122.2946, abs=1e-3)
    code = main(["fit", str(DATA / "riesby.csv"), "--formula", "hamdep ~ week", "--groups", "id", "--bs", "~ week", "-q"])
    assert code == 2
    assert "week" in capsys.readouterr().err
