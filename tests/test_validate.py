"""Option checks (mlsml.validate): accepted ranges, refusals and messages.

Each bound is tried at the boundary: the bound itself (accepted when closed,
refused when open) and the nearest representable value beyond it. What the
public entry points pass through these helpers (nagq, maxiter, xtol, ...) is
tested end to end in test_inputs.py.
"""

from __future__ import annotations

import fractions

import numpy as np
import pandas as pd
import pytest

from mlsml import ModelSpecError
from mlsml.validate import check_choice, check_int, check_real, describe_value


# ----------------------------------------------------------------- describe_value
@pytest.mark.parametrize(
    "value,text",
    [
        (3, "3 (int)"),
        (2.5, "2.5 (float)"),
        ("3", "'3' (str)"),
        (None, "None (NoneType)"),
        (True, "True (bool)"),
        (np.int64(7), "7 (int64)"),
        (np.float64(2.5), "2.5 (float64)"),  # not 'np.float64(2.5)' (numpy >= 2 repr)
        (np.float32(0.5), "0.5 (float32)"),
        (pd.Series(range(4059), name="school"), "a Series named 'school' of length 4059"),
        (pd.Series([1.0, 2.0]), "a Series of length 2"),
        (pd.DataFrame({"a": [1, 2], "b": [3, 4]}), "a DataFrame of shape (2, 2)"),
        (np.zeros((3, 2)), "a ndarray of shape (3, 2)"),
        (np.zeros(5), "a ndarray of length 5"),
        ([1, 2, 3], "a list of length 3"),
        ({"a": 1}, "a dict of length 1"),
    ],
)
def test_describe_value(value, text):
    assert describe_value(value) == text


def test_describe_value_is_short():
    assert describe_value("x" * 1000) == "'" + "x" * 56 + "... (str)"
    assert len(describe_value(np.arange(10**6))) < 40  # never the array itself
    assert describe_value(np.bool_(True)).startswith("True (bool")  # 'bool_' before numpy 2, 'bool' after
    assert describe_value(object()) == "a object"


# ----------------------------------------------------------------- check_int
@pytest.mark.parametrize("value", [1, 5, 10, np.int64(1), np.int32(10), np.uint8(5)])
def test_check_int_accepts_integers_within_closed_bounds(value):
    out = check_int("maxiter", value, minimum=1, maximum=10)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize(
    "value,message",
    [
        (0, "maxiter must be an integer >= 1 and <= 10, not 0"),
        (11, "maxiter must be an integer >= 1 and <= 10, not 11"),
        (np.int64(-3), "maxiter must be an integer >= 1 and <= 10, not -3"),
        (2.0, "maxiter must be an integer >= 1 and <= 10, not 2.0 (float)"),  # not rounded
        (2.5, "maxiter must be an integer >= 1 and <= 10, not 2.5 (float)"),
        (np.float64(3.0), "maxiter must be an integer >= 1 and <= 10, not 3.0 (float64)"),
        ("3", "maxiter must be an integer >= 1 and <= 10, not '3' (str)"),  # not parsed
        (True, "maxiter must be an integer >= 1 and <= 10, not True (bool)"),  # a bool is no count
        (None, "maxiter must be an integer >= 1 and <= 10, not None (NoneType)"),
        (fractions.Fraction(3, 1), "maxiter must be an integer >= 1 and <= 10, not Fraction(3, 1) (Fraction)"),
    ],
)
def test_check_int_refusals_name_the_option_the_bounds_and_the_value(value, message):
    with pytest.raises(ModelSpecError) as info:
        check_int("maxiter", value, minimum=1, maximum=10)
    assert str(info.value) == message


def test_check_int_numpy_bool_is_refused():
    with pytest.raises(ModelSpecError, match=r"^n must be an integer, not True \(bool_?\)$"):
        check_int("n", np.bool_(True))


def test_check_int_bounds_are_optional():
    assert check_int("n", -(10**30)) == -(10**30)
    assert check_int("n", 10**30, minimum=0) == 10**30
    with pytest.raises(ModelSpecError, match=r"^n must be an integer <= 4, not 5$"):
        check_int("n", 5, maximum=4)
    assert check_int("n", 4, maximum=4) == 4


# ----------------------------------------------------------------- check_real
def test_check_real_closed_and_open_bounds_at_the_boundary():
    # prune's interval: [0, 1)
    assert check_real("prune", 0.0, 0.0, 1.0, high_open=True) == 0.0
    assert check_real("prune", np.nextafter(1.0, 0.0), 0.0, 1.0, high_open=True) < 1.0
    for bad in (1.0, np.nextafter(0.0, -1.0)):
        with pytest.raises(ModelSpecError, match=r"^prune must be a finite number >= 0 and < 1, not "):
            check_real("prune", bad, 0.0, 1.0, high_open=True)
    # xtol's: (0, inf)
    assert check_real("xtol", 5e-324, 0.0, low_open=True) == 5e-324
    with pytest.raises(ModelSpecError, match=r"^xtol must be a finite number > 0, not 0.0$"):
        check_real("xtol", 0, 0.0, low_open=True)
    # a closed upper bound
    assert check_real("a", 1, 0.0, 1.0) == 1.0
    with pytest.raises(ModelSpecError, match=r"^a must be a finite number >= 0 and <= 1, not 1.0000000000000002$"):
        check_real("a", np.nextafter(1.0, 2.0), 0.0, 1.0)
    assert check_real("c", -1e300) == -1e300  # no bounds: any finite number


@pytest.mark.parametrize("value", [3, np.int64(3), np.float32(0.5), 0.25, fractions.Fraction(1, 4)])
def test_check_real_returns_a_float(value):
    out = check_real("gtol", value, 0.0, low_open=True)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize(
    "value,shown",
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (-np.inf, "-inf"),
        ("1e-6", "'1e-6' (str)"),
        (True, "True (bool)"),
        (None, "None (NoneType)"),
        (1j, "1j (complex)"),
        (np.array([1e-6]), "a ndarray of length 1"),
    ],
)
def test_check_real_refusals(value, shown):
    with pytest.raises(ModelSpecError) as info:
        check_real("gtol", value, 0.0, low_open=True)
    assert str(info.value) == f"gtol must be a finite number > 0, not {shown}"


# ----------------------------------------------------------------- check_choice
def test_check_choice():
    methods = ("BFGS", "L-BFGS-B", "trust-exact")
    assert check_choice("method", "L-BFGS-B", methods) == "L-BFGS-B"
    assert check_choice("method", "l-bfgs-b", methods, case_insensitive=True) == "L-BFGS-B"  # the canonical spelling
    for bad in ("bfgs", " BFGS", "BFGS ", None, 1, ["BFGS"]):
        with pytest.raises(ModelSpecError) as info:
            check_choice("method", bad, methods)
        assert str(info.value) == f"method must be one of 'BFGS', 'L-BFGS-B', 'trust-exact'; not {describe_value(bad)}"
    with pytest.raises(ModelSpecError, match="; not 'newton' \\(str\\)$"):
        check_choice("method", "newton", methods, case_insensitive=True)
