"""Checks of option values: type, range and finiteness, with messages that name the option.

Python would coerce many wrong values without a word (``int(2.5) == 2``,
``float("0.1")``, ``bool("no") is True``) and numpy would accept ``nan`` in any
comparison-free arithmetic. The public entry points (:func:`mlsml.fit`,
:meth:`mlsml.MELSM.fit`, ...) pass every option through these helpers instead, so a
wrong value raises :class:`~mlsml.ModelSpecError` naming the option and the value.

Examples
--------
>>> check_int("maxiter", 100, minimum=1)
100
>>> try:
...     check_int("nagq", 2.5, minimum=1)
... except ModelSpecError as err:
...     print(err)
nagq must be an integer >= 1, not 2.5 (float)
"""

from __future__ import annotations

import numbers

import numpy as np

from .errors import ModelSpecError


def plain_value(value):
    """A numpy scalar as the Python value (for messages: ``1``, not ``np.int64(1)``)."""
    return value.item() if isinstance(value, np.generic) else value


def describe_value(value) -> str:
    """A short description of a value for an error message (never a whole Series or array).

    Examples
    --------
    >>> import pandas as pd
    >>> describe_value(pd.Series(range(4059), name="school")), describe_value("3")
    ("a Series named 'school' of length 4059", "'3' (str)")
    """
    # a numpy scalar by its value: its repr is 'np.float64(2.5)' from numpy 2 on ('2.5' before),
    # and a numpy bool is no numbers.Number (it was described as 'a bool of shape ()')
    scalar = isinstance(value, np.generic) and not isinstance(value, np.void)
    if scalar or isinstance(value, str | numbers.Number | bool | type(None)):
        text = repr(value.item() if scalar else value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"{text} ({type(value).__name__})"
    name = getattr(value, "name", None)
    size = getattr(value, "shape", None)
    if size is None and hasattr(value, "__len__"):
        try:
            size = len(value)
        except TypeError:
            size = None
    if isinstance(size, tuple) and len(size) == 1:
        size = size[0]
    parts = [type(value).__name__]
    if isinstance(name, str):
        parts.append(f"named {name!r}")
    if size is not None:
        parts.append(f"of shape {tuple(size)}" if isinstance(size, tuple) else f"of length {size}")
    return "a " + " ".join(parts)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, float or string) within bounds.

    Parameters
    ----------
    name : str
        The option's name, for the message.
    value : object
        The value given.
    minimum, maximum : int, optional
        Inclusive bounds.

    Returns
    -------
    int

    Raises
    ------
    ModelSpecError
        Naming the option, the value and the bounds.

    Examples
    --------
    >>> import numpy as np
    >>> check_int("max_passes", np.int64(30), minimum=1)
    30
    """
    bounds = [f">= {minimum}"] if minimum is not None else []
    bounds += [f"<= {maximum}"] if maximum is not None else []
    want = " ".join(["an integer", " and ".join(bounds)]).rstrip()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ModelSpecError(f"{name} must be {want}, not {describe_value(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ModelSpecError(f"{name} must be {want}, not {value}")
    return value


def check_real(
    name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (ends open when asked); no strings or bools.

    Parameters
    ----------
    name : str
        The option's name, for the message.
    value : object
        The value given.
    low, high : float, optional
        Bounds of the interval.
    low_open, high_open : bool
        Whether the bound itself is excluded.

    Returns
    -------
    float

    Raises
    ------
    ModelSpecError
        Naming the option, the value and the interval.

    Examples
    --------
    >>> check_real("prune", 1e-8, 0.0, 1.0, high_open=True)
    1e-08
    >>> try:
    ...     check_real("xtol", float("nan"), 0.0, low_open=True)
    ... except ModelSpecError as err:
    ...     print(err)
    xtol must be a finite number > 0, not nan
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    want = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ModelSpecError(f"{name} must be {want}, not {describe_value(value)}")
    value = float(value)
    bad = not np.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        raise ModelSpecError(f"{name} must be {want}, not {value!r}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...], case_insensitive: bool = False) -> str:
    """``value`` if it is one of the strings ``choices`` (returned in their spelling).

    Parameters
    ----------
    name : str
        The option's name, for the message.
    value : object
        The value given.
    choices : tuple of str
        The allowed values.
    case_insensitive : bool
        Match regardless of case.

    Returns
    -------
    str

    Raises
    ------
    ModelSpecError
        Listing the allowed values.

    Examples
    --------
    >>> check_choice("method", "bfgs", ("BFGS", "L-BFGS-B"), case_insensitive=True)
    'BFGS'
    """
    if isinstance(value, str):
        for c in choices:
            if value == c or (case_insensitive and value.lower() == c.lower()):
                return c
    listed = ", ".join(repr(c) for c in choices)
    raise ModelSpecError(f"{name} must be one of {listed}; not {describe_value(value)}")
