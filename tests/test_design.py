"""Formulas, data handling and input checks."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml import DataError, MissingDataWarning, ModelSpecError
from mlsml.design import build_design


def small(seed=0, J=30, n=20):
    return mlsml.simulate.simulate_data([n] * J, seed=seed)


def test_caller_frame_is_not_modified():
    df = small()
    df.loc[3, "x"] = np.nan
    df["g"] = df["school"].map(lambda s: f"s{s}")
    before = df.copy(deep=True)
    with pytest.warns(MissingDataWarning):
        mlsml.MELSM.from_formula("y ~ x", df, groups="g", scale_formula="~ x")
    pd.testing.assert_frame_equal(df, before)


def test_missing_values_are_counted_and_dropped():
    df = small()
    df.loc[[1, 2, 3], "x"] = np.nan
    df.loc[5, "y"] = np.nan
    with pytest.warns(MissingDataWarning, match=r"dropped 4 of 600 rows.*'y': 1.*'x': 3|dropped 4 of 600 rows.*'x': 3"):
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    assert m.design.nobs == 596


def test_missing_raise_names_the_column():
    df = small()
    df.loc[7, "x"] = np.inf
    with pytest.raises(DataError, match=r"'x': 1.*index 7"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school", missing="raise")


def test_missing_group_id_is_dropped_with_warning():
    df = small()
    df["school"] = df["school"].astype(float)
    df.loc[0, "school"] = np.nan
    with pytest.warns(MissingDataWarning, match="'school': 1"):
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    assert m.design.nobs == len(df) - 1


def test_unknown_column():
    with pytest.raises(ModelSpecError, match="'xx'"):
        mlsml.MELSM.from_formula("y ~ xx", small(), groups="school")
    with pytest.raises(ModelSpecError, match="'zz'"):
        mlsml.MELSM.from_formula("y ~ x", small(), groups="school", scale_formula="~ zz")
    with pytest.raises(ModelSpecError, match="groups"):
        mlsml.MELSM.from_formula("y ~ x", small(), groups="nope")


def test_constant_and_collinear_columns():
    df = small()
    df["c"] = 2.0
    df["x2"] = 2 * df["x"] + 1
    with pytest.raises(ModelSpecError, match="'c' is constant"):
        mlsml.MELSM.from_formula("y ~ x + c", df, groups="school")
    with pytest.raises(ModelSpecError, match="scale design.*'x2'"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x + x2")


def test_non_numeric_values_in_numeric_column():
    df = small()
    df["x"] = df["x"].astype(object)
    df.loc[4, "x"] = "."
    with pytest.raises(DataError, match=r"'x'.*'\.'"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school")


def test_too_few_groups_and_empty_data():
    df = small()
    with pytest.raises(DataError, match="at least two groups"):
        mlsml.MELSM.from_formula("y ~ x", df[df.school == 1], groups="school")
    with pytest.raises(DataError, match="empty"):
        mlsml.MELSM.from_formula("y ~ x", df.iloc[:0], groups="school")


def test_no_within_group_variation():
    df = small()
    df["y"] = df["school"] * 1.0
    with pytest.raises(DataError, match="does not vary within any group"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school")


def test_string_unsorted_groups_give_identical_fit():
    df = small(J=25)
    base = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    rng = np.random.default_rng(5)
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    names = {s: f"school-{rng.integers(1e6)}-{s}" for s in df.school.unique()}
    shuffled["sid"] = shuffled["school"].map(names)
    other = mlsml.fit("y ~ x", shuffled, groups="sid", scale_formula="~ x")
    assert other.llf == pytest.approx(base.llf, abs=1e-8)
    np.testing.assert_allclose(other.params.to_numpy(), base.params.to_numpy(), atol=1e-6)


def test_categorical_terms_and_interactions(exam):
    m = mlsml.MELSM.from_formula(
        "normexam ~ standLRT * C(sex, Treatment('M')) + C(vr)", exam, groups="school", scale_formula="~ C(sex)"
    )
    names = m.param_names
    assert "mean:C(sex, Treatment('M'))[T.F]" in names
    assert "mean:standLRT:C(sex, Treatment('M'))[T.F]" in names
    assert "scale:C(sex)[T.M]" in names
    assert names[-3:] == ["var(u0)", "var(v)", "cov(u0,v)"]


def test_singleton_groups_are_kept():
    df = small(J=20)
    extra = pd.DataFrame({"school": [100, 101], "student": [1, 1], "y": [0.1, -0.2], "x": [0.3, 0.0]})
    df = pd.concat([df, extra], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingDataWarning)
        m = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    assert m.design.ngroups == 22
    assert m.design.info["n_singletons"] == 2


def test_formula_functions_and_keyword_arguments_are_not_columns():
    """Functions (np.log, center, bs) and their keyword arguments (df=3) are patsy's business."""
    df = small()
    df["z"] = np.abs(df["x"]) + 1.0
    m = mlsml.MELSM.from_formula("y ~ np.log(z) + bs(x, df=3)", df, groups="school", scale_formula="~ center(x)")
    assert any(n.startswith("mean:bs(x, df=3)") for n in m.param_names)
    with pytest.raises(ModelSpecError, match="'zz'"):
        mlsml.MELSM.from_formula("y ~ np.log(zz)", df, groups="school")


# ---- formula processing speed (issue 11): same design matrices, fewer per-row calls


def _london_like(n_groups=40, seed=3):
    """Text factors as in the London data, a few missing values in a factor and in x."""
    df = small(seed=seed, J=n_groups)
    rng = np.random.default_rng(seed)
    df["eth"] = rng.choice(["White", "Black", "Asian", "Mixed"], size=len(df))
    df["stype"] = rng.choice(["standard", "sponsored", "converter"], size=len(df))
    df["code"] = rng.integers(0, 3, size=len(df))
    df["cat"] = pd.Categorical(rng.choice(["p", "q", "r"], size=len(df)))
    df.loc[[2, 11], "eth"] = None
    df.loc[5, "x"] = np.nan
    return df


@pytest.mark.parametrize(
    ("formula", "scale_formula"),
    [
        ("y ~ x + C(eth, Treatment('White')) + C(stype, Treatment('standard'))", "~ x + C(eth, Treatment('White'))"),
        ("y ~ x * C(eth, Treatment('Black')) + C(code) + C(cat, Sum)", "~ C(stype):x + C(eth)*C(code)"),
        ("y ~ x + eth + stype", "~ eth:x + cat"),
    ],
)
def test_designs_are_patsy_designs_of_the_rows_used(formula, scale_formula):
    """build_design's X and W are patsy's own matrices (NA_action='raise') of the rows kept."""
    import patsy

    df = _london_like()
    with pytest.warns(MissingDataWarning, match="dropped 3 of"):
        design, spec = mlsml.design.build_design(formula, df, groups="school", scale_formula=scale_formula)
    kept = df.loc[design.row_labels].astype({"eth": object, "stype": object})  # plain Python strings for patsy
    y, X = patsy.dmatrices(formula, kept, eval_env=0, NA_action="raise", return_type="dataframe")
    W = patsy.dmatrix(scale_formula, kept, eval_env=0, NA_action="raise", return_type="dataframe")
    np.testing.assert_array_equal(design.X, X.to_numpy()[design.order])
    np.testing.assert_array_equal(design.W, W.to_numpy()[design.order])
    np.testing.assert_array_equal(design.y, y.to_numpy().ravel()[design.order])
    assert list(design.layout.mean_terms) == list(X.columns)
    assert list(design.layout.scale_terms) == list(W.columns)


def test_categorical_missing_values_are_judged_once_per_level(monkeypatch):
    """patsy asks ``is_categorical_NA`` per row of a C(...) term; the design asks it per level.

    Before issue 11 this made 2 x 1200 calls here (570,000 on the London Model 6 formulas);
    now one per distinct value for the mean and scale formulas together.
    """
    import patsy.missing

    calls = []
    original = patsy.missing.NAAction.is_categorical_NA

    def counting(self, obj):
        calls.append(obj)
        return original(self, obj)

    monkeypatch.setattr(patsy.missing.NAAction, "is_categorical_NA", counting)
    df = small(J=60)
    df["eth"] = np.resize(["White", "Black", "Asian"], len(df))
    mlsml.design.build_design("y ~ x + C(eth, Treatment('White'))", df, groups="school", scale_formula="~ C(eth)")
    assert 0 < len(calls) <= 3


def test_a_text_level_patsy_reads_as_missing_still_raises(exam):
    """patsy counts the text 'nan' in a C(...) term as missing: the memo keeps that rule."""
    df = exam.copy()
    df.loc[5, "vr"] = "nan"
    with pytest.raises(DataError, match="missing"):
        mlsml.MELSM.from_formula("normexam ~ standLRT + C(vr)", df, groups="school")


def test_gram_rank_test_is_conclusive_only_when_the_svd_agrees():
    """The cheap Gram-matrix test says 'full rank' only where matrix_rank does; else the SVD decides."""
    from mlsml.design import _clearly_full_rank

    rng = np.random.default_rng(0)
    M = np.column_stack([np.ones(500), rng.normal(size=(500, 4))])
    assert _clearly_full_rank(M)
    collinear = np.column_stack([M, M[:, 1] - 2 * M[:, 2]])
    nearly = np.column_stack([M, M[:, 1] + 1e-9 * rng.normal(size=500)])
    zero = np.column_stack([M, np.zeros(500)])
    for bad in (collinear, nearly, zero):
        assert not _clearly_full_rank(bad)
    assert np.linalg.matrix_rank(nearly) == nearly.shape[1]  # the SVD keeps it: the fallback decides
    mlsml.design._check_columns(nearly, [f"c{j}" for j in range(nearly.shape[1])], "the mean design")
    with pytest.raises(ModelSpecError, match="rank deficient: column 'c5'"):
        mlsml.design._check_columns(collinear, [f"c{j}" for j in range(collinear.shape[1])], "the mean design")


def test_formulas_evaluated_together_equal_formula_by_formula():
    """One patsy evaluation of the three formulas gives each formula's own matrices and column names."""
    from mlsml.design import _materialise, _materialise_together

    df = _london_like().dropna()
    df["eth"] = pd.Categorical(df["eth"])
    items = [
        ("y ~ x * C(eth, Treatment('Black')) + C(code)", "mean formula"),
        ("~ C(eth, Treatment('Black')) + center(x)", "scale formula"),
        ("~ x", "random-effects formula"),
    ]
    together = _materialise_together(items, df)
    for (formula, what), (out, spec) in zip(items, together, strict=True):
        alone, spec_alone = _materialise(formula, df, what)
        for a, b in zip(out if isinstance(out, tuple) else (out,), alone if isinstance(alone, tuple) else (alone,), strict=True):
            pd.testing.assert_frame_equal(a, b)
        assert spec.column_names == spec_alone.column_names


def test_an_error_in_one_formula_is_reported_for_that_formula():
    df = small()
    with pytest.raises(ModelSpecError, match="scale formula"):
        mlsml.design.build_design("y ~ x", df, groups="school", scale_formula="~ nosuchfunction(x)")
    with pytest.raises(ModelSpecError, match="random-effects formula"):
        mlsml.design.build_design("y ~ x", df, groups="school", re_formula="~ nosuchfunction(x)")


def test_missing_code_becomes_missing_and_is_counted():
    df = mlsml.simulate.demo_data(n_groups=20, seed=2)
    coded = df.copy()
    coded.loc[[1, 2], "y"] = -999
    coded.loc[5, "x"] = -999
    with pytest.warns(MissingDataWarning, match=r"dropped 3 of .*missing_code=-999: 'y': 2, 'x': 1"):
        design, _ = build_design("y ~ x", coded, groups="school", missing_code=-999)
    ref, _ = build_design("y ~ x", df.drop(index=[1, 2, 5]), groups="school")
    assert np.array_equal(design.y, ref.y) and np.array_equal(design.X, ref.X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the code is absent: nothing dropped, nothing said
        build_design("y ~ x", df, groups="school", missing_code=-12345.0)
    with pytest.raises(ModelSpecError, match="missing_code must be a finite number"):
        build_design("y ~ x", df, groups="school", missing_code="-999")
    with pytest.raises(DataError, match="missing or non-finite values in 3 rows"):
        build_design("y ~ x", coded, groups="school", missing_code=-999, missing="raise")


def test_drop_constant_groups_is_opt_in_and_names_the_groups():
    df = mlsml.simulate.demo_data(n_groups=20, seed=2)
    df.loc[df["school"] == 4, "y"] = 0.25
    df = pd.concat([df, pd.DataFrame({"school": [99], "student": [1], "y": [0.1], "x": [0.0]})], ignore_index=True)
    kept, _ = build_design("y ~ x", df, groups="school")  # off by default: every group stays
    assert kept.ngroups == 21
    with pytest.warns(
        MissingDataWarning, match=r"dropped 2 of 21 groups of 'school' \(\d+ rows\) whose response 'y' is constant: 4, 99"
    ):
        design, _ = build_design("y ~ x", df, groups="school", drop_constant_groups=True)
    assert design.ngroups == 19 and design.info["constant_groups_dropped"] == (4, 99)
    with pytest.raises(DataError, match="constant within every group"):
        build_design("y ~ x", df.assign(y=df["school"] * 1.0), groups="school", drop_constant_groups=True)


def test_weights_and_offsets_follow_the_rows_left_by_drop_constant_groups():
    """Regression: ``rows_used`` ignored the groups dropped for a constant response, so the
    weights and offsets of later rows were read from the wrong rows (a school weight then
    'varied within a school'; offsets were silently shifted)."""
    df = mlsml.simulate.demo_data(n_groups=20, seed=2)
    df.loc[df["school"] == 4, "y"] = 0.25
    df["off"] = np.arange(len(df)) / len(df)
    df["ws"] = df["school"] * 0.5 + 1.0
    kw = dict(groups="school", offset="off", group_weights="ws")
    with pytest.warns(MissingDataWarning, match="constant: 4"):
        dropped = mlsml.MELSM.from_formula("y ~ x", df, drop_constant_groups=True, **kw).design
    by_hand = mlsml.MELSM.from_formula("y ~ x", df[df["school"] != 4], **kw).design
    np.testing.assert_array_equal(dropped.offset, by_hand.offset)
    np.testing.assert_array_equal(dropped.group_weights, by_hand.group_weights)
