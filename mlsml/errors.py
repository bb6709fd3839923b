"""Exceptions and warnings raised by mlsml.

The hierarchy is small and documented so that callers can catch precisely:

- :class:`MLSMLError` -- base class of every exception raised on purpose.
- :class:`DataError` -- the data cannot be used as given (missing or
  non-finite values when ``missing="raise"``, non-numeric columns, empty
  data, too few groups, ...). The message names the column, group or value.
- :class:`ModelSpecError` -- the model specification is inconsistent
  (unknown column in a formula, collinear or constant design columns,
  unsupported options, ...).
- :class:`MLSMLWarning` -- base class of all warnings.
- :class:`MissingDataWarning` -- rows were removed by listwise deletion; the
  message counts them per column.
- :class:`ConvergenceWarning` -- the optimiser did not reach its convergence
  criteria; estimates must not be trusted.
- :class:`SingularFitWarning` -- the random-effects covariance matrix is at
  (or numerically near) the boundary of the parameter space.
- :class:`UnknownGroupWarning` -- rows of ``newdata`` belong to groups that
  were not in the fit (often a type mismatch, ``"1"`` vs ``1``); they get
  population-level predictions.

Examples
--------
Errors name the column at fault; every error is an :class:`MLSMLError` (and a
``ValueError``):

>>> import pandas as pd, mlsml
>>> df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "x": [1, 2, 3, 4], "school": [1, 1, 2, 2]})
>>> try:
...     mlsml.fit("y ~ z", df, groups="school")
... except mlsml.ModelSpecError as err:
...     print(err)
the mean formula 'y ~ z' names 'z', which is not a column of the data (columns: y, x, school)

Warnings can be turned into errors with the standard :mod:`warnings` filters:

>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("error", mlsml.ConvergenceWarning)
...     issubclass(mlsml.ConvergenceWarning, mlsml.MLSMLWarning)
True
"""

from __future__ import annotations


class MLSMLError(Exception):
    """Base class of all exceptions raised deliberately by mlsml."""


class DataError(MLSMLError, ValueError):
    """The data cannot be used for the requested model."""


class ModelSpecError(MLSMLError, ValueError):
    """The model specification is inconsistent or unsupported."""


class MLSMLWarning(UserWarning):
    """Base class of all warnings issued by mlsml."""


class MissingDataWarning(MLSMLWarning):
    """Rows with missing values were removed (listwise deletion)."""


class ConvergenceWarning(MLSMLWarning):
    """The optimiser did not converge; results are not reliable."""


class SingularFitWarning(MLSMLWarning):
    """The random-effects covariance matrix is singular or on the boundary."""


class QuadratureWarning(MLSMLWarning):
    """The quadrature rule is not accurate enough at the estimates; increase ``nagq``."""


class UnknownGroupWarning(MLSMLWarning):
    """Rows of ``newdata`` name groups that were not in the fit; they get population-level predictions."""
