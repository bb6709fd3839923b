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
    # a time-varying column is a level-1 column of the BS variance (MIXREGLS's u_ij'ALPHA, issue 13)
    out1 = tmp_path / "fit1.json"
    argv = ["fit", str(DATA / "riesby.csv"), "--formula", "hamdep ~ week", "--groups", "id", "--bs", "~ week", "-q"]
    assert main([*argv, "--json", str(out1)]) == 0
    assert "bsvar:week" in json.loads(out1.read_text())["params"]
    assert main(["fit", str(DATA / "riesby.csv"), "--formula", "hamdep ~ week", "--groups", "id", "--bs", "~ nosuch", "-q"]) == 2
    assert "nosuch" in capsys.readouterr().err


def _demo_csv(tmp_path, labels=None, sep=",", name="d.csv", **kw):
    """demo data (20 schools) as a file; ``labels`` maps school 1..20 to the text written for it."""
    import mlsml

    df = mlsml.simulate.demo_data(n_groups=20, seed=1)
    if labels is not None:
        df["school"] = df["school"].map(labels)
    path = tmp_path / name
    df.to_csv(path, sep=sep, index=False, **kw)
    return path, df


def _fit_json(tmp_path, args, capsys=None):
    out = tmp_path / "fit.json"
    code = main(["fit", *map(str, args), "--formula", "y ~ x", "--groups", "school", "--no-random-scale", "-q", "--json", str(out)])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_group_ids_are_read_as_text(tmp_path):
    """'01' and '1' are two schools, not one (pandas would read both as the number 1)."""
    labels = {k: (f"0{(k + 1) // 2}" if k % 2 else str(k // 2)) for k in range(1, 21)}  # 01, 1, 02, 2, ..., 010, 10
    path, _ = _demo_csv(tmp_path, labels)
    schools = tmp_path / "schools.csv"
    code, d = _fit_json(tmp_path, [path, "--schools", schools])
    assert code == 0 and d["ngroups"] == 20
    import pandas as pd

    written = pd.read_csv(schools, dtype={"school": str})["school"]
    assert set(written) == set(labels.values()) and {"01", "1", "010", "10"} <= set(written)


def test_integer_group_ids_keep_their_numeric_order(tmp_path):
    path, _ = _demo_csv(tmp_path)
    schools = tmp_path / "schools.csv"
    code, d = _fit_json(tmp_path, [path, "--schools", schools])
    assert code == 0 and d["ngroups"] == 20
    assert [ln.split(",")[0] for ln in schools.read_text().splitlines()[1:4]] == ["1", "2", "3"]


@pytest.mark.parametrize("sep, option", [(";", ";"), ("\t", "\\t"), ("\t", "tab"), ("|", "|")])
def test_sep_option(tmp_path, sep, option):
    path, _ = _demo_csv(tmp_path, sep=sep)
    ref_code, ref = _fit_json(tmp_path, [_demo_csv(tmp_path, name="ref.csv")[0]])
    code, d = _fit_json(tmp_path, [path, "--sep", option])
    assert code == ref_code == 0
    assert d["llf"] == ref["llf"] and d["nobs"] == ref["nobs"]


@pytest.mark.parametrize("sep, hint", [(";", "--sep ';'"), ("\t", "--sep '\\t'"), (" ", "--sep whitespace")])
def test_wrong_separator_lists_the_columns_and_suggests_sep(tmp_path, capsys, sep, hint):
    path, _ = _demo_csv(tmp_path, sep=sep)
    code, _ = _fit_json(tmp_path, [path])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlsml: error: groups='school' is not a column")
    assert "found 1 column: 'school" in err[0] and hint in err[0]


def test_missing_column_in_formula_gets_the_separator_hint(tmp_path, capsys):
    """The group column happens to be the first field; the formula's columns are not found."""
    path = tmp_path / "d.csv"
    path.write_text("school,y;x\n" + "".join(f"{g},{g * 0.5};{g}\n" for g in range(1, 9)))
    assert main(["fit", str(path), "--formula", "y ~ x", "--groups", "school"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'y'" in err[0] and "--sep ';'" in err[0]


def test_unknown_group_column_lists_columns_without_hint(tmp_path, capsys):
    path, _ = _demo_csv(tmp_path)
    assert main(["fit", str(path), "--formula", "y ~ x", "--groups", "id"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mlsml: error: groups='id' is not a column of {str(path)!r} (found 4 columns: 'school', 'student', 'y', 'x')"


def test_na_values(tmp_path, capsys):
    """-999 codes: repeated or comma-separated; rows holding one are dropped and counted."""
    import numpy as np

    path, df = _demo_csv(tmp_path)
    coded = df.astype({"y": object, "x": object})
    coded.loc[3, "y"], coded.loc[7, "x"], coded.loc[10, "y"] = "-999", "-99.0", "."
    coded.to_csv(path, index=False)
    df.drop(index=[3, 7, 10]).to_csv(tmp_path / "ref.csv", index=False)
    _, ref = _fit_json(tmp_path, [tmp_path / "ref.csv"])
    for opts in (["--na-values", "-999", "--na-values", "-99,."], ["--na-values", "-999,-99,."], ["--na-values=-999,-99,."]):
        code, d = _fit_json(tmp_path, [path, *opts])
        assert code == 0 and d["nobs"] == len(df) - 3 == ref["nobs"]
        assert np.isclose(d["llf"], ref["llf"], rtol=0, atol=1e-6)
        assert "dropped 3 of" in capsys.readouterr().err
    code, _ = _fit_json(tmp_path, [path, "--na-values", "-999,-99,.", "--missing", "raise"])
    assert code == 2
    code, _ = _fit_json(tmp_path, [path])  # without the codes, "." makes y text: refused, not fitted
    assert code == 2


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    """Every way a data file can be unusable: one line, exit status 2, no traceback."""
    cases = {
        "absent.csv": None,
        "empty.csv": b"",
        "blank.csv": b"\n\n  \n",
        "header_only.csv": b"school,y,x\n",
        "dup.csv": b"school,y,x,x\n1,2,3,4\n",
        "shifted.csv": b"y,x\n1,2,3\n4,5,6\n",
        "ragged.csv": b"school,y,x\n1,2,3\n4,5,6,7\n",
        "latin1.csv": "school,y,x,\xe9cole\n1,2,3,4\n".encode("latin-1"),
        "binary.csv": bytes(range(256)) * 4,
    }
    expect = {
        "absent.csv": "no such file",
        "empty.csv": "the file is empty",
        "blank.csv": "the file is empty",
        "header_only.csv": "holds no data rows (found 3 columns: 'school', 'y', 'x')",
        "dup.csv": "the header names the column(s) 'x' more than once",
        "shifted.csv": "rows hold more fields than the header",
        "ragged.csv": "cannot read",
        "latin1.csv": "not UTF-8 text",
        "binary.csv": "cannot read",
    }
    (tmp_path / "adir").mkdir()
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    for name in [*cases, "adir"]:
        code = main(["fit", str(tmp_path / name), "--formula", "y ~ x", "--groups", "school"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(err) == 1 and err[0].startswith("mlsml: error:"), (name, err)
        assert expect.get(name, "is a directory") in err[0], (name, err)


@pytest.mark.parametrize("command", [["fit", "d.csv", "--formula", "y ~ x", "--groups", "g"], ["mixregls", "job.def"]])
@pytest.mark.parametrize("value", ["0", "-3", "2.5", "x"])
def test_nagq_must_be_a_positive_whole_number(command, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--nagq", value])
    assert info.value.code == 2
    assert f"argument --nagq: must be a whole number >= 1, not '{value}'" in capsys.readouterr().err


def test_fit_reads_a_pipe(tmp_path):
    """A FIFO (``<(zcat data.csv.gz)``) is read once and parsed: the file is not opened twice."""
    import os
    import threading

    path, _ = _demo_csv(tmp_path)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    data = path.read_bytes()

    def writer():
        with open(fifo, "wb") as fh:
            fh.write(data)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    code, d = _fit_json(tmp_path, [fifo])
    t.join(timeout=10)
    assert code == 0 and d["ngroups"] == 20


def test_fit_with_weights_offsets_and_robust_ses(tmp_path, capsys):
    from conftest import DATA

    ss = DATA / "sleepstudy.csv"
    data = tmp_path / "ss.csv"
    text = ss.read_text().splitlines()
    rows = [text[0] + ",w,o"] + [f"{line},{1 + (i % 3)},0.5" for i, line in enumerate(text[1:])]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit.json"
    args = ["fit", str(data), "--formula", "Reaction ~ Days", "--groups", "Subject", "--no-random-scale"]
    code = main([*args, "--weights", "w", "--scale-offset", "o", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "robust (cluster: Subject)" in text and "pseudo-ML" in text
    d = json.loads(out.read_text())
    assert d["cov_type"] == "robust" and d["weights"]["level1"] == "column 'w'" and d["offsets"]["scale_offset"] == "column 'o'"
    code = main([*args, "--weights", "w", "--weights-kind", "frequency", "--cov-type", "nonrobust", "-q", "--json", str(out)])
    assert code == 0 and json.loads(out.read_text())["cov_type"] == "nonrobust"


def test_fit_association_and_cov_zero_options(tmp_path, capsys):
    """--association and --cov-zero reach the model (issue 13); a bad name is a one-line error."""
    from conftest import DATA

    out = tmp_path / "fit.json"
    args = ["fit", str(DATA / "riesby.csv"), "--formula", "hamdep ~ week", "--groups", "id", "--scale", "~ week", "-q"]
    assert main([*args, "--association", "quadratic", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert list(d["params"])[-1] == "quad(u0,v)"
    assert d["llf"] == pytest.approx(-1124.0032264, abs=1e-5)  # MIXREGLS NCOV = 2 (exact value at its estimates)
    assert main([*args, "--cov-zero", "cov(u0,v)", "--json", str(out)]) == 0
    assert "cov(u0,v)" not in json.loads(out.read_text())["params"]
    assert main([*args, "--cov-zero", "cov(u0,w)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a covariance" in err[0]


def test_mixwild_conventions_missing_code_constant_groups_standardize(tmp_path, capsys):
    """--missing-code counts the coded values per column, --drop-constant-groups names the groups,
    --standardize prints the estimates for standardised covariates."""
    path, df = _demo_csv(tmp_path)
    coded = df.copy()
    coded.loc[[3, 8], "y"] = -999
    coded.loc[coded["school"] == 5, "y"] = 1.5  # a school with a constant response
    coded.to_csv(path, index=False)
    code = main(
        ["fit", str(path), "--formula", "y ~ x", "--groups", "school", "--no-random-scale", "--missing-code", "-999"]
        + ["--drop-constant-groups", "--standardize"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "values equal to missing_code=-999.0: 'y': 2" in err
    assert "dropped 1 of 20 groups of 'school'" in err and "constant: 5" in err
    assert "Estimates for standardised covariates" in out and "mean:x" in out.split("standardised covariates")[1]
