r"""Within- and between-school parts of a level-1 covariate: ``within(x)`` and ``between(x)``.

MixWILD's "disaggregate" option splits a level-1 covariate into its school mean and the
deviation from it,

.. math::

    x_{ij} = \underbrace{\bar x_j}_{\texttt{between(x)}}
           + \underbrace{(x_{ij} - \bar x_j)}_{\texttt{within(x)}},

so that a model can give the two parts different effects (in the mean, the scale, the
random-effects or the between-school variance formula: ``between(x)`` is constant within
each school, so it may enter ``bs_formula``). In a formula write ``within(x)`` and
``between(x)``; the grouping column is the fit's (``groups=``), added by
:func:`expand_group_transforms` before the formula engine sees the formula, and term
names show the call as written (``within(x)``).

**Which means.** The school means are computed once, on the estimation data: the rows
the fit uses, after listwise deletion of missing values in any column of any formula.
They are the state of a stateful transform (as patsy's ``center(x)``), so they travel
with the fit (and are recomputed identically from the fitted data on unpickling).

**New data** (:meth:`mlsml.MELSMResults.predict`): a row of a school that was in the fit
uses that school's mean *from the fit* (not the mean of the new rows); a row of a school
that was not in the fit uses the mean of the new data's rows of that school. New data
therefore need the grouping column, also for ``conditional=False``.

Examples
--------
>>> import numpy as np
>>> x = np.array([1.0, 3.0, 10.0, 14.0])
>>> g = np.array(["a", "a", "b", "b"])
>>> within(x, g).tolist(), between(x, g).tolist()
([-1.0, 1.0, -2.0, 2.0], [2.0, 2.0, 12.0, 12.0])
>>> expand_group_transforms("y ~ within(x) + between(x)", "school")
'y ~ within(x, school) + between(x, school)'
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from .errors import DataError, ModelSpecError

#: The transforms, by the name a formula calls them.
TRANSFORMS = ("within", "between")

_CALL = re.compile(r"(?<![\w.])(within|between)\s*\(")


def _stateful_transform(class_):
    """patsy's ``stateful_transform`` (the same protocol; patsy itself is imported lazily).

    A direct call memorises and transforms in one go; inside a formula patsy finds the
    class through ``__patsy_stateful_transform__`` and keeps its state for new data.
    """

    @functools.wraps(class_)
    def stateful_transform_wrapper(*args, **kwargs):
        transform = class_()
        transform.memorize_chunk(*args, **kwargs)
        transform.memorize_finish()
        return transform.transform(*args, **kwargs)

    stateful_transform_wrapper.__patsy_stateful_transform__ = class_
    return stateful_transform_wrapper


def _as_numeric(x, name: str) -> np.ndarray:
    values = np.asarray(x)
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise DataError(f"{name}() needs one numeric column (got dtype {values.dtype}, shape {values.shape})")
    return values.astype(float)


def _labels(groups, n: int, name: str) -> pd.Index:
    if groups is None:
        raise ModelSpecError(f"{name}(x) needs the grouping column (added from groups= in a model formula)")
    labels = pd.Index(np.asarray(groups, dtype=object) if not isinstance(groups, pd.Series) else groups.array)
    if len(labels) != n:
        raise DataError(f"{name}(): the covariate has {n} values but the grouping column {len(labels)}")
    return labels


class _GroupMean:
    """Stateful transform: the school means of ``x`` on the data it memorises (the fit's)."""

    name = ""

    def __init__(self) -> None:
        self._chunks: list[pd.Series] = []
        self.means: pd.Series | None = None

    def memorize_chunk(self, x, groups=None) -> None:
        values = _as_numeric(x, self.name)
        self._chunks.append(pd.Series(values, index=_labels(groups, values.size, self.name)))

    def memorize_finish(self) -> None:
        data = pd.concat(self._chunks)
        self.means = data.groupby(level=0, sort=False).mean()
        self._chunks = []

    def group_means(self, x, groups=None) -> np.ndarray:
        """Each row's school mean: the memorised one, or the given data's own for a new school."""
        values = _as_numeric(x, self.name)
        labels = _labels(groups, values.size, self.name)
        means = np.array(self.means.reindex(labels).to_numpy(dtype=float))
        new = np.isnan(means)
        if new.any():
            own = pd.Series(values[new], index=labels[new]).groupby(level=0, sort=False).mean()
            means[new] = own.reindex(labels[new]).to_numpy(dtype=float)
        return means


class Within(_GroupMean):
    """``x - mean_j(x)`` (see the module docstring for the means)."""

    name = "within"

    def transform(self, x, groups=None) -> np.ndarray:
        return _as_numeric(x, self.name) - self.group_means(x, groups)


class Between(_GroupMean):
    """``mean_j(x)`` on every row of school ``j`` (see the module docstring for the means)."""

    name = "between"

    def transform(self, x, groups=None) -> np.ndarray:
        return self.group_means(x, groups)


#: ``within(x)`` in a formula: the deviation of ``x`` from its school mean.
within = _stateful_transform(Within)
#: ``between(x)`` in a formula: the school mean of ``x``.
between = _stateful_transform(Between)


def _group_text(groups) -> str:
    """How the formula refers to the grouping column: its name, or ``Q("...")`` if it is not an identifier."""
    name = str(groups)
    return name if name.isidentifier() else f"Q({name!r})"


def _calls(text: str):
    """``(start of the argument list, index of the closing parenthesis, number of top-level commas)`` of each call."""
    previous = -1
    for match in _CALL.finditer(text):
        if match.start() < previous:
            raise ModelSpecError(f"within() and between() cannot be nested ({text!r})")
        depth, commas, i = 1, 0, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch in "'\"":
                j = text.find(ch, i + 1)
                i = len(text) if j < 0 else j + 1
                continue
            depth += ch == "("
            depth -= ch == ")"
            commas += ch == "," and depth == 1
            i += 1
        if depth:
            raise ModelSpecError(f"unbalanced parentheses in {match.group(1)}(...) of {text!r}")
        previous = i - 1
        yield match.end(), i - 1, commas


def uses_group_transforms(*formulas: str | None) -> bool:
    """Whether any of the formulas calls ``within()`` or ``between()``."""
    return any(f is not None and _CALL.search(f) is not None for f in formulas)


def expand_group_transforms(formula: str | None, groups) -> str | None:
    """Give every ``within(x)`` / ``between(x)`` of a formula the grouping column as a second argument.

    Calls that already name a second argument are left as they are.

    Examples
    --------
    >>> expand_group_transforms("~ within(np.log(x)) + z", "school")
    '~ within(np.log(x), school) + z'
    >>> expand_group_transforms("~ between(x)", "school id")
    "~ between(x, Q('school id'))"
    """
    if formula is None or not _CALL.search(formula):
        return formula
    out, last = [], 0
    for _start, close, commas in _calls(formula):
        if commas == 0:
            out.append(formula[last:close] + ", " + _group_text(groups))
            last = close
    out.append(formula[last:])
    return "".join(out)


def display_name(term: str, groups) -> str:
    """A term name as the user wrote it: ``within(x, school)`` -> ``within(x)``.

    Examples
    --------
    >>> display_name("within(x, school):z", "school")
    'within(x):z'
    """
    if not _CALL.search(term):
        return term
    suffix = ", " + _group_text(groups)
    out, last = [], 0
    for _start, close, _commas in _calls(term):
        if term[last:close].endswith(suffix):
            out.append(term[last : close - len(suffix)])
            last = close
    out.append(term[last:])
    return "".join(out)
