"""Checks on the text of the formula arguments (mlsml.formulas), called directly.

The suggested-call table and the formula-sides table were in test_inputs.py
(through ``MELSM.from_formula``); test_inputs.py keeps the end-to-end checks that
the model runs these checks before patsy and that a suggested call is valid mlsml.
"""

from __future__ import annotations

import pytest

from mlsml import ModelSpecError
from mlsml.formulas import FORMULA_ARGS, bar_terms, check_formula_sides, check_no_lme4_terms

#: The formula arguments of mlsml.fit with their defaults, as build_design passes them.
DEFAULTS = {"formula": None, "scale_formula": "~ 1", "re_formula": "~ 1", "scale_re_formula": None, "bs_formula": None}


def _lme4_error(kwargs, groups="school") -> str:
    kwargs = dict(kwargs)
    random_scale = kwargs.pop("random_scale", True)
    with pytest.raises(ModelSpecError) as info:
        check_no_lme4_terms({**DEFAULTS, **kwargs}, groups=groups, random_scale=random_scale)
    return str(info.value)


def _suggested_call(message: str) -> str:
    """The ``mlsml.fit(...)`` line of an lme4-syntax error."""
    calls = [line.strip() for line in message.splitlines() if line.strip().startswith("mlsml.fit(")]
    assert len(calls) == 1, message
    return calls[0]


# ----------------------------------------------------------------- finding bar terms
@pytest.mark.parametrize(
    "formula,found",
    [
        ("y ~ x + (1 + x | school)", [("(1 + x | school)", "1 + x", "school", False, False)]),
        ("y ~ (0 + z || school) + x", [("(0 + z || school)", "0 + z", "school", True, False)]),
        ("y ~ x + (1|a) + (x|b)", [("(1|a)", "1", "a", False, False), ("(x|b)", "x", "b", False, False)]),
        ("y ~ x + (np.log(x) | g)", [("(np.log(x) | g)", "np.log(x)", "g", False, False)]),
        ("y ~ (x + (1|g))", [("(1|g)", "1", "g", False, False)]),
        ("y ~ x | school", [("x | school", "x", "school", False, True)]),
        ("y ~ x||g", [("x||g", "x", "g", True, True)]),
    ],
)
def test_bar_terms_found_with_their_span(formula, found):
    terms = bar_terms(formula)
    assert [(t.text(formula), t.lhs, t.group, t.double, t.bare) for t in terms] == found


@pytest.mark.parametrize(
    "formula",
    ["y ~ x", "y~x*z", "y ~ I(a | b) + C(g)", "y ~ I (a|b)", 'y ~ C(g, levels=["a|b"])', "y ~ np.log(x) + f(a)[0]", "~ 1", ""],
)
def test_formulas_without_bar_terms(formula):
    """Bitwise or inside a call and '|' inside a string are patsy's, not lme4's."""
    assert bar_terms(formula) == []
    check_no_lme4_terms({"formula": formula})  # no error


def test_non_string_formulas_are_left_to_the_type_check():
    check_no_lme4_terms({"formula": None, "scale_formula": 3, "re_formula": ["(1|g)"]})


# ----------------------------------------------------------------- lme4 syntax (from test_inputs.py)
LME4 = [
    # (arguments as the user wrote them, the mlsml call the error must suggest)
    ({"formula": "y ~ x + (1|school)"}, 'mlsml.fit("y ~ x", data, groups="school")'),
    ({"formula": "y ~ x + (1 + x | school)"}, 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")'),
    ({"formula": "y ~ x + (x || school)"}, 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")'),
    ({"formula": "y ~ x + (1|school) + (0 + x|school)"}, 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")'),
    ({"formula": "y ~ (0 + x | school) + x"}, 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ 0 + x")'),
    ({"formula": "y ~ x | school"}, 'mlsml.fit("y ~ x", data, groups="school")'),
    ({"formula": "y ~ x", "re_formula": "~ (1 + x | school)"}, 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")'),
    (
        {"formula": "y ~ x", "scale_formula": "~ x + (1 | school)"},
        'mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x")',
    ),
    (
        {"formula": "y ~ x", "scale_formula": "~ x + (1 + x | school)"},
        'mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x", scale_re_formula="~ x")',
    ),
    (
        {"formula": "y ~ x", "scale_re_formula": "~ x + (1 | school)"},
        'mlsml.fit("y ~ x", data, groups="school", scale_re_formula="~ x")',
    ),
    ({"formula": "y ~ x", "bs_formula": "~ (1 | school)"}, 'mlsml.fit("y ~ x", data, groups="school", bs_formula="~ 1")'),
    (
        {"formula": "y ~ x + (1 + x | school)", "scale_formula": "~ x", "random_scale": False},
        'mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x", re_formula="~ x", random_scale=False)',
    ),
]


@pytest.mark.parametrize("kwargs,expected", LME4, ids=[str(k) for k, _ in LME4])
def test_lme4_bar_terms_are_refused_with_the_mlsml_spelling(kwargs, expected):
    message = _lme4_error(kwargs)
    assert _suggested_call(message) == expected
    assert "re_formula" in message and "groups" in message


@pytest.mark.parametrize(
    "kwargs,arg,term",
    [
        ({"formula": "y ~ x + (1 + x | school)"}, "formula", "(1 + x | school)"),
        ({"formula": "y ~ x", "scale_formula": "~ x + (1 | school)"}, "scale_formula", "(1 | school)"),
        ({"formula": "y ~ x", "re_formula": "~ (0 + x || school)"}, "re_formula", "(0 + x || school)"),
        ({"formula": "y ~ x", "scale_re_formula": "~ (x | school)"}, "scale_re_formula", "(x | school)"),
        ({"formula": "y ~ x", "bs_formula": "~ s + (1 | school)"}, "bs_formula", "(1 | school)"),
        ({"formula": "y ~ x | school"}, "formula", "x | school"),
    ],
)
def test_lme4_error_names_the_argument_and_the_offending_term(kwargs, arg, term):
    first = _lme4_error(kwargs).splitlines()[0]
    assert first.startswith(f"{FORMULA_ARGS[arg]} {kwargs[arg]!r} uses ")
    assert f"{term!r}, which mlsml does not read" in first
    syntax = "a '|' outside any function call" if "(" not in term else "lme4's random-effects syntax"
    assert syntax in first


def test_lme4_error_names_the_first_argument_with_a_bar_term():
    message = _lme4_error({"formula": "y ~ x", "scale_formula": "~ (1|school)", "re_formula": "~ (x|school)"})
    assert message.startswith("the scale formula ")  # scale_formula comes before re_formula in fit's signature
    assert _suggested_call(message) == 'mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")'


def test_lme4_error_names_the_mismatch_with_groups_and_nesting():
    assert "you passed groups='student' but the formula groups by 'school'" in _lme4_error(
        {"formula": "y ~ x + (1 | school)"}, groups="student"
    )
    message = _lme4_error({"formula": "y ~ x + (1 | school/student)"})
    assert "'school/student' is not a single column" in message
    assert 'groups="school"' in _suggested_call(message)  # falls back on the groups argument
    assert 'groups="<grouping column>"' in _suggested_call(_lme4_error({"formula": "y ~ (1 | a:b)"}, groups=None))
    assert "group by 'school', 'student'" in _lme4_error({"formula": "y ~ x + (1 | school) + (1 | student)"})


def test_lme4_error_notes_double_bars_bs_formula_and_a_missing_response():
    assert "'||' (lme4's uncorrelated effects) has no mlsml counterpart" in _lme4_error({"formula": "y ~ (x || school)"})
    assert "bs_formula holds the covariates of ln var(u0)" in _lme4_error({"formula": "y ~ x", "bs_formula": "~ (1 | school)"})
    assert "the mean formula also needs a response" in _lme4_error({"formula": "~ x + (1 | school)"})


# ----------------------------------------------------------------- formula sides (from test_inputs.py)
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"formula": "~ x"}, "the mean formula '~ x' has no response: write it as 'y ~ x'"),
        ({"formula": "x"}, "the mean formula 'x' has no response: write it as 'y ~ x'"),
        ({"formula": "y ~ x", "scale_formula": "y ~ x"}, "scale_formula='y ~ x' has a left-hand side ('y'), but the scale formula"),
        ({"formula": "y ~ x", "scale_formula": "y ~ x"}, "is one-sided: write '~ x'"),
        ({"formula": "y ~ x", "re_formula": "y ~ x"}, "re_formula='y ~ x' has a left-hand side"),
        ({"formula": "y ~ x", "scale_re_formula": "y ~ x"}, "scale_re_formula='y ~ x' has a left-hand side"),
        ({"formula": "y ~ x", "bs_formula": "y ~ 1"}, "bs_formula='y ~ 1' has a left-hand side"),
        ({"formula": "y ~ x", "bs_formula": "s ~ "}, "bs_formula='s ~ ' has a left-hand side ('s'), but the between-school"),
        ({"formula": "y ~ x ~ z"}, "formula='y ~ x ~ z' has more than one '~'"),
        ({"formula": "y ~ x", "scale_formula": 3}, "scale_formula must be a formula string such as '~ x', not 3 (int)"),
        ({"formula": None}, "formula must be a formula string such as 'y ~ x', not None (NoneType)"),
        ({"formula": "y ~ x", "re_formula": b"~ x"}, "re_formula must be a formula string such as '~ x', not a bytes of length 3"),
        ({"formula": "y ~ x", "scale_formula": " "}, "scale_formula is an empty string; the scale formula needs at least"),
        ({"formula": ""}, "formula is an empty string"),
    ],
)
def test_formula_sides_and_types_give_a_model_spec_error(kwargs, message):
    with pytest.raises(ModelSpecError) as info:
        check_formula_sides({**DEFAULTS, **kwargs})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"formula": "y ~ x"},
        {"formula": "y~x", "scale_formula": "~x", "re_formula": "~ 0 + x"},
        {"formula": "np.log(y) ~ C(g) + x:z", "scale_formula": "x", "re_formula": "~1"},  # patsy reads 'x' as '~ x'
        {"formula": "y ~ x", "scale_re_formula": "~ x", "bs_formula": "~ s"},
        {"formula": "y ~ x", "scale_formula": None, "re_formula": None},  # None: the default
    ],
)
def test_accepted_spellings(kwargs):
    check_formula_sides({**DEFAULTS, **kwargs})
    check_no_lme4_terms({**DEFAULTS, **kwargs}, groups="school")
