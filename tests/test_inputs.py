"""Input checks of issue 10 (a new user's first hour): lme4 habits, statsmodels habits,
options that were silently coerced, column types and names.

Each test failed on main before the fix it guards (see the commit that added it).
The fits use the small bundled data (``tests/data``) and compare models with
themselves, so no expected value depends on floating-point rounding or on a
dependency's version.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import distance_to_maximum_in_se

import mlsml
from mlsml import DataError, MissingDataWarning, ModelSpecError


@pytest.fixture(scope="module")
def seed_df(seed_sim):
    return seed_sim.copy()


def _suggested_call(message: str) -> str:
    """The ``mlsml.fit(...)`` line of an lme4-syntax error."""
    calls = [line.strip() for line in message.splitlines() if line.strip().startswith("mlsml.fit(")]
    assert len(calls) == 1, message
    return calls[0]


# ----------------------------------------------------------------- lme4 syntax
# The messages themselves (the suggested call for each spelling, the notes) are tested
# on mlsml.formulas directly in test_formulas.py; here: the model runs the check, and the
# call it suggests is valid mlsml.
@pytest.mark.parametrize(
    "kwargs",
    [{"formula": "y ~ x + (1 + x | school)"}, {"formula": "y ~ x", "scale_formula": "~ x + (1 + x | school)"}],
    ids=["mean slope", "scale slope"],
)
def test_the_suggested_lme4_replacement_fits_the_intended_model(seed_df, kwargs):
    """Run the suggested call itself: it is valid mlsml and fits the model lme4 meant."""
    kwargs = dict(kwargs)
    formula = kwargs.pop("formula")
    with pytest.raises(ModelSpecError) as info:
        mlsml.MELSM.from_formula(formula, seed_df, groups="school", **kwargs)
    call = _suggested_call(str(info.value)).replace("mlsml.fit(", "mlsml.MELSM.from_formula(", 1)
    model = eval(call, {"mlsml": mlsml, "data": seed_df})
    assert not any("|" in name for name in model.param_names)
    if " re_formula=" in call:
        assert "var(u1)" in model.param_names  # the random slope lme4 meant
    else:
        assert "var(v1)" in model.param_names  # a random slope in the log variance


def test_bitwise_or_inside_a_function_call_is_still_patsy(seed_df):
    df = seed_df.assign(a=seed_df.x > 0, b=seed_df.x > 1)
    model = mlsml.MELSM.from_formula("y ~ I(a | b)", df, groups="school", random_scale=False)
    assert model.param_names[:2] == ["mean:Intercept", "mean:I(a | b)[T.True]"]


# ----------------------------------------------------------------- formula sides
# (the messages: test_formulas.py)
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"formula": "~ x"}, r"the mean formula '~ x' has no response"),
        ({"formula": "y ~ x", "scale_formula": 3}, r"scale_formula must be a formula string"),
    ],
)
def test_the_model_checks_formula_sides_and_types(seed_df, kwargs, pattern):
    kwargs = dict(kwargs)
    formula = kwargs.pop("formula")
    with pytest.raises(ModelSpecError, match=pattern):
        mlsml.MELSM.from_formula(formula, seed_df, groups="school", **kwargs)


def test_none_for_scale_and_re_formula_means_the_default(seed_df):
    a = mlsml.MELSM.from_formula("y ~ x", seed_df, groups="school", scale_formula=None, re_formula=None)
    b = mlsml.MELSM.from_formula("y ~ x", seed_df, groups="school")
    assert a.param_names == b.param_names


# ----------------------------------------------------------------- groups as labels
def test_groups_given_as_labels_fit_the_same_model(seed_df):
    ref = mlsml.fit("y ~ x", seed_df, groups="school")
    shuffled = seed_df["school"].sample(frac=1.0, random_state=1)  # same labels, other order: aligned by index
    for groups in (seed_df["school"], seed_df["school"].to_numpy(), list(seed_df["school"]), shuffled):
        before = seed_df.copy(deep=True)
        res = mlsml.fit("y ~ x", seed_df, groups=groups)
        pd.testing.assert_frame_equal(seed_df, before)
        np.testing.assert_array_equal(res.params.to_numpy(), ref.params.to_numpy())
        assert res.llf == ref.llf
    assert mlsml.MELSM.from_formula("y ~ x", seed_df, groups=seed_df["school"]).formula_spec.groups == "school"


def test_groups_labels_that_are_not_a_column_get_their_name(seed_df):
    labels = pd.Series(seed_df["school"].map(lambda s: f"S{s:02d}").to_numpy(), index=seed_df.index, name="site")
    res = mlsml.fit("y ~ x", seed_df, groups=labels, random_scale=False)
    assert res.school_effects().index.name == "site"
    assert res.school_effects().index[0] == "S01"
    assert "site" not in seed_df.columns
    unnamed = mlsml.MELSM.from_formula("y ~ x", seed_df, groups=labels.to_numpy(), random_scale=False)
    assert unnamed.formula_spec.groups == "groups"


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda d: d["school"].iloc[:-1], r"groups has 2499 labels \(a Series named 'school' of length 2499\).*2500 rows"),
        (lambda d: d["school"].reset_index(drop=True).set_axis(d.index + 7), "index does not match the data's index"),
        (lambda d: d[["school", "student"]], "groups is a DataFrame with 2 column"),
        (lambda d: ["school", "student"], "names 2 columns; mlsml fits two-level models"),
        (
            lambda d: "School",
            "groups='School' is not a column of the data \\(columns: school, student, y, x\\); did you mean 'school'",
        ),
        (lambda d: None, "groups is required"),
        (lambda d: 3.5, r"not 3.5 \(float\)"),
        (lambda d: d[["school"]].to_numpy(), r"shape \(2500, 1\)"),
    ],
    ids=["short Series", "other index", "DataFrame", "two names", "case", "None", "float", "2-D"],
)
def test_bad_groups_give_a_short_clear_error(seed_df, make, pattern):
    with pytest.raises(ModelSpecError, match=pattern) as info:
        mlsml.MELSM.from_formula("y ~ x", seed_df, groups=make(seed_df))
    message = str(info.value)
    assert len(message) < 400 and "dtype:" not in message and "Length:" not in message  # no Series printed


# ----------------------------------------------------------------- fit options
@pytest.fixture(scope="module")
def exam_model(exam):
    """Random intercept and random scale: the u-exact rule is one-dimensional, the product rule two."""
    return mlsml.MELSM.from_formula("normexam ~ standLRT", exam, groups="school")


BAD_OPTIONS = [
    ({"nagq": 0}, r"nagq \(quadrature points per dimension\) must be an integer >= 1, not 0$"),
    ({"nagq": 2.5}, r"must be an integer >= 1, not 2.5 \(float\)"),
    ({"nagq": "3"}, r"must be an integer >= 1, not '3' \(str\)"),
    ({"nagq": True}, r"not True \(bool\)"),
    ({"nagq": 10**6}, r"nagq=1000000 is too large for the u-exact .* over 1 school effect.*At most 200 points.*MAX_NAGQ = 200"),
    (
        {"nagq": 142, "quadrature": "product"},
        r"nagq=142 is too large for the product rule over 2 school effects.*At most 141 .*MAX_QUAD_NODES = 20000",
    ),
    ({"method": "Nelder-Mead"}, "does not use gradients"),
    ({"method": "newton"}, "method must be one of 'BFGS', 'L-BFGS-B'"),
    ({"method": None}, r"method must be one of .*not None"),
    ({"maxiter": 0}, "maxiter must be an integer >= 1, not 0"),
    ({"maxiter": 100.0}, r"maxiter must be an integer >= 1, not 100.0 \(float\)"),
    ({"max_passes": -1}, "max_passes must be an integer >= 1"),
    ({"xtol": 0}, "xtol must be a finite number > 0, not 0.0"),
    ({"gtol": float("nan")}, "gtol must be a finite number > 0, not nan"),
    ({"xtol": "1e-6"}, r"xtol must be a finite number > 0, not '1e-6' \(str\)"),
    ({"prune": "0.1", "quadrature": "product"}, r"prune must be a finite number >= 0 and < 1, not '0.1' \(str\)"),
    ({"prune": float("inf"), "quadrature": "product"}, "prune must be a finite number >= 0 and < 1, not inf"),
    ({"quadrature": "Product"}, "quadrature must be one of 'auto', 'product', 'marginal'"),
    ({"quadrature": None}, "quadrature must be one of"),
    ({"callback": 3}, r"callback must be a function .* not 3 \(int\)"),
]


@pytest.mark.parametrize("options,pattern", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_fit_options_are_checked_not_coerced(exam_model, options, pattern):
    with pytest.raises(ModelSpecError, match=pattern):
        exam_model.fit(**options)


def test_loglike_and_profile_check_nagq_too(exam_model):
    with pytest.raises(ModelSpecError, match="not 0"):
        exam_model.loglike([0.0, 0.5, -0.5, 0.1, 0.1, 0.0], nagq=0)
    from mlsml.profile import profile_ci

    res = exam_model.fit()
    with pytest.raises(ModelSpecError, match=r"not 2.5 \(float\)"):
        profile_ci(res, "mean:standLRT", nagq=2.5)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"random_scale": "no"}, r"random_scale must be True or False, not 'no' \(str\)"),
        ({"missing": None}, r"missing must be 'drop' or 'raise', not None"),
        ({"missing": "Drop"}, "missing must be 'drop' or 'raise'"),
    ],
)
def test_model_options_are_checked_not_coerced(seed_df, kwargs, pattern):
    with pytest.raises(ModelSpecError, match=pattern):
        mlsml.MELSM.from_formula("y ~ x", seed_df, groups="school", **kwargs)


def test_method_names_are_case_insensitive_and_keep_their_settings(exam_model):
    """``method="bfgs"`` used to reach scipy unchanged and lose the BFGS-only settings (a different path)."""
    a = exam_model.fit(method="BFGS")
    b = exam_model.fit(method="bfgs")
    assert b.method == "BFGS"
    np.testing.assert_array_equal(a.params.to_numpy(), b.params.to_numpy())


def test_numpy_integers_are_integers(exam_model):
    assert exam_model.fit(nagq=np.int64(7), maxiter=np.int32(500)).nagq == 7


def test_quadrature_bounds_keep_every_default_within_the_node_budget():
    from mlsml.quadrature import MAX_NAGQ, MAX_QUAD_NODES, default_nagq, max_nagq

    for d in range(1, 11):
        assert 1 <= default_nagq(d) <= max_nagq(d) <= MAX_NAGQ
        assert max_nagq(d) ** d <= MAX_QUAD_NODES < (max_nagq(d) + 1) ** d or max_nagq(d) == MAX_NAGQ


@pytest.mark.parametrize(
    "dim,top,cap",
    [(1, 200, "MAX_NAGQ = 200"), (2, 141, "MAX_QUAD_NODES = 20000"), (3, 27, "MAX_QUAD_NODES = 20000"), (6, 5, "MAX_QUAD_NODES")],
)
def test_nagq_caps_hold_at_the_boundary(dim, top, cap):
    """The largest allowed nagq is accepted and one more is refused, naming the cap (141**2 <= 20000 < 142**2)."""
    from mlsml.quadrature import check_nagq

    assert check_nagq(top, dim) == top
    with pytest.raises(ModelSpecError, match=rf"^nagq={top + 1} is too large .* At most {top} points per dimension .*{cap}"):
        check_nagq(top + 1, dim)


# ----------------------------------------------------------------- column types and names
def test_duplicate_column_names_are_a_data_error(seed_df):
    df = pd.concat([seed_df, seed_df[["x"]]], axis=1)  # two columns named 'x'
    with pytest.raises(DataError, match="the data has 2 columns named 'x'; .*rename or drop the duplicates"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    df = pd.concat([seed_df, seed_df[["school"]]], axis=1)
    with pytest.raises(DataError, match="2 columns named 'school'"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    # a duplicated column that no formula uses does not matter
    df = pd.concat([seed_df, seed_df[["student"]]], axis=1)
    assert mlsml.MELSM.from_formula("y ~ x", df, groups="school").design.nobs == len(seed_df)


def _with_flag(df):
    return df.assign(high=(df["x"] > 0.3).to_numpy())


def test_nullable_boolean_without_missing_values_is_a_bool(seed_df):
    plain = mlsml.fit("y ~ x + high", _with_flag(seed_df), groups="school", random_scale=False)
    df = _with_flag(seed_df)
    df["high"] = df["high"].astype("boolean")
    res = mlsml.fit("y ~ x + high", df, groups="school", random_scale=False)
    assert list(res.params.index) == list(plain.params.index)
    np.testing.assert_array_equal(res.params.to_numpy(), plain.params.to_numpy())


def test_nullable_boolean_with_missing_values_is_missing_data(seed_df):
    df = _with_flag(seed_df)
    df["high"] = df["high"].astype("boolean")
    df.loc[[3, 10], "high"] = pd.NA
    with pytest.warns(MissingDataWarning, match="dropped 2 of 2500 rows.*'high': 2"):
        res = mlsml.fit("y ~ x + high", df, groups="school", random_scale=False)
    ref = mlsml.fit("y ~ x + high", _with_flag(seed_df).drop(index=[3, 10]), groups="school", random_scale=False)
    np.testing.assert_array_equal(res.params.to_numpy(), ref.params.to_numpy())
    with pytest.raises(DataError, match="'high': 2"):
        mlsml.MELSM.from_formula("y ~ x + high", df, groups="school", missing="raise")


@pytest.mark.parametrize("column,dtype", [("x", "Float64"), ("y", "Float64"), ("school", "Int64"), ("school", "string")])
def test_other_nullable_dtypes_are_read_like_numpy_ones(seed_df, column, dtype):
    ref = mlsml.MELSM.from_formula("y ~ x", seed_df, groups="school")
    df = seed_df.astype({column: dtype})
    df.loc[5, column] = pd.NA
    with pytest.warns(MissingDataWarning, match=f"'{column}': 1"):
        model = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    assert model.design.nobs == ref.design.nobs - 1 and model.param_names == ref.param_names


def test_tuple_group_ids_are_supported(seed_df):
    df = seed_df.assign(site=[(s % 2, s) for s in seed_df["school"]])
    res = mlsml.fit("y ~ x", df, groups="site", random_scale=False)
    ref = mlsml.fit("y ~ x", seed_df, groups="school", random_scale=False)
    assert res.llf == pytest.approx(ref.llf, rel=0, abs=1e-8)
    table = res.school_effects()
    assert table.index[0] == (0, 2) and len(table) == 100
    # the schools are summed in another order, so the two fits stop at slightly different points
    # within the optimiser's tolerance: compare in standard errors (tests/conftest.py), not digits
    slack = distance_to_maximum_in_se(res) + distance_to_maximum_in_se(ref)
    assert np.all(np.abs(res.params - ref.params) <= slack * ref.bse + 1e-12)
    pred, want = res.get_prediction(df.head(3)).summary_frame(), ref.get_prediction(seed_df.head(3)).summary_frame()
    assert np.all(np.abs(pred["mean"].to_numpy() - want["mean"].to_numpy()) <= slack * want["mean_se"].to_numpy() + 1e-12)
    as_labels = mlsml.MELSM.from_formula("y ~ x", seed_df, groups=list(df["site"]), random_scale=False)
    assert as_labels.design.group_labels[0] == (0, 2)


def test_unhashable_group_ids_are_a_data_error(seed_df):
    df = seed_df.assign(site=[[s] for s in seed_df["school"]])
    with pytest.raises(DataError, match="grouping column 'site' holds unhashable values \\(e.g. a list at index 0\\)"):
        mlsml.MELSM.from_formula("y ~ x", df, groups="site")


def test_non_ascii_names_are_accepted(seed_df):
    ref = mlsml.fit("y ~ x", seed_df.assign(t=seed_df["x"] > 0), groups="school", scale_formula="~ x + t")
    df = seed_df.rename(columns={"x": "écart", "school": "école", "y": "note"}).assign(type_é=lambda d: d["écart"] > 0)
    res = mlsml.fit("note ~ écart", df, groups="école", scale_formula="~ écart + C(type_é)")
    assert list(res.params.index)[:4] == ["mean:Intercept", "mean:écart", "scale:Intercept", "scale:C(type_é)[T.True]"]
    np.testing.assert_array_equal(res.params.to_numpy(), ref.params.to_numpy())
    with pytest.raises(ModelSpecError, match="names 'écarts', which is not a column"):
        mlsml.MELSM.from_formula("note ~ écarts", df, groups="école")


# ----------------------------------------------------------------- numbers stored as text
def _codes(df):
    """A covariate of integer codes -3..3."""
    return df.assign(k=(np.floor(df["x"] * 1.5).clip(-3, 3)).astype(int))


@pytest.mark.parametrize(
    "make,pattern",
    [
        (
            lambda d: _codes(d).astype({"k": str}),
            r"column 'k' holds numbers stored as text \(dtype (object|str): .*factor with 7 levels.*pd.to_numeric\(data\['k'\]\)"
            r".*C\(k\)",
        ),
        (lambda d: d.assign(k=d["x"].astype(str)), r"column 'k' holds numbers stored as text.*factor with 2500 levels"),
        (
            lambda d: _codes(d).astype({"k": object}).assign(k=lambda e: e["k"].where(e.index % 500 != 7, ".")),
            r"column 'k' is mostly numeric \(2495 of 2500 values are numbers\) but holds non-numeric values "
            r"'\.' \(5 rows\); first at index 7.*na_values.*errors='coerce'",
        ),
        (
            lambda d: d.assign(k=d["x"].round(2).astype(object).where(d.index % 3 != 0, d.index.map(lambda i: f"n/a{i % 7}"))),
            r"non-numeric values 'n/a0' \(\d+ rows\), .* and 2 more;",
        ),
    ],
    ids=["integer codes", "continuous", "dots", "many codes"],
)
def test_numbers_stored_as_text_are_a_data_error(seed_df, make, pattern):
    df = make(seed_df)
    with pytest.raises(DataError, match=pattern):
        mlsml.MELSM.from_formula("y ~ x + k", df, groups="school")
    with pytest.raises(DataError, match="column 'k'"):  # in every formula
        mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ k")


def test_numbers_as_text_inside_c_are_categories(seed_df):
    df = _codes(seed_df).astype({"k": str})
    model = mlsml.MELSM.from_formula("y ~ x + C(k)", df, groups="school", random_scale=False)
    assert sum(name.startswith("mean:C(k)") for name in model.param_names) == 6


def test_response_stored_as_text_says_so(seed_df):
    with pytest.raises(DataError, match=r"response 'y' is not real-valued numeric .*numbers stored as text.*pd.to_numeric"):
        mlsml.MELSM.from_formula("y ~ x", seed_df.astype({"y": str}), groups="school")


# ----------------------------------------------------------------- start_params
GOOD_START = [0.0, 0.5, -0.5, 0.1, 0.1, 0.0]  # mean:Intercept, mean:standLRT, scale:Intercept, var(u0), var(v), cov(u0,v)


def _start(**changes):
    names = ["mean:Intercept", "mean:standLRT", "scale:Intercept", "var(u0)", "var(v)", "cov(u0,v)"]
    out = pd.Series(GOOD_START, index=names)
    for key, value in changes.items():
        out[{"b0": "mean:Intercept", "a0": "scale:Intercept", "u0": "var(u0)", "v": "var(v)", "c": "cov(u0,v)"}[key]] = value
    return out


@pytest.mark.parametrize(
    "start,pattern",
    [
        (_start(a0=np.nan), r"params must be finite numbers: scale:Intercept = nan"),
        (_start(u0=np.inf).to_numpy(), r"params must be finite numbers: var\(u0\) = inf"),
        (_start(v=-0.1), r"variances must be positive: var\(v\) = -0.1"),
        (_start(c=1.0), r"do not form a positive-definite matrix \(var\(u0\) = 0.1, var\(v\) = 0.1, cov\(u0,v\) = 1\)"),
        (GOOD_START[:5], r"params has shape \(5,\); the model has 6 parameters: \['mean:Intercept'"),
        (pd.concat([_start(), pd.Series({"scale:x": 0.1})]), r"params has names the model does not know: \['scale:x'\]"),
        (_start().drop("var(v)"), r"params lacks \['var\(v\)'\]"),
        (["0"] * 6, r"params must be numbers .* not a list of length 6"),
        ("0 0.5 -0.5 0.1 0.1 0", r"params must be numbers .* not '0 0.5"),
        (_start(a0=1e6), r"start_params give a residual log-variance up to 1e\+06 \(scale:Intercept = 1e\+06\).*MAX_LOG_VARIANCE"),
        (_start(v=1e6), r"start_params give var\(v\) = 1e\+06: a school 5 SD out"),
    ],
    ids=[
        "nan",
        "inf",
        "negative variance",
        "not PD",
        "short",
        "unknown name",
        "missing name",
        "strings",
        "text",
        "huge scale",
        "huge var(v)",
    ],
)
def test_bad_start_params_are_refused_by_name(exam_model, start, pattern):
    with pytest.raises(ModelSpecError, match=pattern):
        exam_model.fit(start_params=start)


def test_good_start_params_still_work(exam_model):
    res = exam_model.fit()
    again = exam_model.fit(start_params=res.params)
    assert again.converged and again.llf == pytest.approx(res.llf, rel=0, abs=1e-6)
    assert exam_model.fit(start_params=dict(res.params)).converged


def test_zero_variance_message_states_the_comparison_without_overflow(exam):
    """An absurd residual variance (exp(1e6)) overflowed the reference of the zero-variance
    check, so every variance, even 1e6, was reported as "effectively zero"."""
    from mlsml.diagnostics import singular_reasons

    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    params = res.params.copy()
    params["scale:Intercept"] = 1e6
    params["var(u0)"] = 1e6
    absurd = res.model.theta_from_params(params)
    reasons = singular_reasons(res.likelihood, absurd, boundary=(), pd_ok=True)
    assert reasons == ["var(u0) = 1e+06 is effectively zero (below 1e-06 times the residual variance, exp(1e+06))"]
    tiny = res.model.theta_from_params(res.params.copy().where(res.params.index != "var(u0)", 1e-9))
    assert re.fullmatch(
        r"var\(u0\) = 1e-09 is effectively zero \(below 1e-06 times the residual variance, 0\.\d+\)",
        singular_reasons(res.likelihood, tiny, boundary=(), pd_ok=True)[0],
    )


# ----------------------------------------------------------------- help(mlsml.fit)
def _documented_parameters(doc: str) -> list[str]:
    """Names in the numpydoc Parameters section (``name : type`` or ``a, b : type`` lines)."""
    section = doc.split("Parameters\n", 1)[1]
    section = re.split(r"\n\s*(Returns|Raises|Warns|See Also|Notes|Examples)\n\s*-+\n", section)[0]
    indent = min(len(line) - len(line.lstrip()) for line in section.splitlines() if line.strip())
    names = []
    for line in section.splitlines():
        if line.strip() and len(line) - len(line.lstrip()) == indent and " : " in line:
            names += [n.strip() for n in line.split(" : ")[0].split(",")]
    return names


@pytest.mark.parametrize("func", [mlsml.fit, mlsml.MELSM.from_formula, mlsml.MELSM.fit], ids=["fit", "from_formula", "MELSM.fit"])
def test_help_documents_every_parameter(func):
    import inspect

    doc = inspect.getdoc(func)
    params = [p for p in inspect.signature(func).parameters if p not in ("self", "cls")]
    assert _documented_parameters(doc) == params
    for section in ("Parameters", "Returns", "Raises", "Examples"):
        assert f"\n{section}\n{'-' * len(section)}\n" in doc, section
    assert "{" + "model_params}" not in doc and "{" + "fit_params}" not in doc  # every shared block filled in
    if func is not mlsml.MELSM.fit:
        assert ".. math::" in doc and r"\ln \sigma^2_{ij} = w_{ij}'\alpha" in doc
