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
- :class:`QuadratureWarning` -- more quadrature points move the
  log-likelihood at the estimates: the rule is not accurate enough.
- :class:`ClusterWarning` -- about the Dask cluster of a fit (a ``LocalCluster``
  started for it).

Every warning is issued through :func:`warn`, which attributes it to the first
line outside the mlsml package (the user's call), not to a line of the library.

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

import os
import sys
import warnings

#: Folder of the mlsml package: frames whose code lives under it are the library's.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


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


class ClusterWarning(MLSMLWarning):
    """About the Dask cluster of a fit (:mod:`mlsml.distributed`): e.g. a ``LocalCluster`` started for it."""


def _in_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep)


def find_stack_level() -> int:
    """The ``stacklevel`` that makes :func:`warnings.warn`, called by this function's caller,
    report the first frame outside the mlsml package.

    Like pandas' ``find_stack_level``: walk from the caller outwards while the
    code belongs to the package. Level 1 is the caller itself; if every frame is
    the package's (``python -m mlsml``), the outermost frame's caller is reported.
    """
    frame = sys._getframe(1)  # the caller (it calls warnings.warn, so it is level 1)
    level = 1
    while frame is not None and _in_package(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """Issue ``message`` as a ``category`` warning attributed to the user's line.

    Use this instead of :func:`warnings.warn` everywhere in mlsml: the warning's
    ``filename`` and ``lineno`` are those of the first frame outside the package
    (the user's call of :func:`mlsml.fit`, ...), whatever the depth of the call
    inside the library, so that the message shows the user's code and warning
    filters by module work.

    Parameters
    ----------
    message : str
    category : type of Warning
        Usually a subclass of :class:`MLSMLWarning`.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn("rows were dropped", MissingDataWarning)
    >>> caught[0].category.__name__, caught[0].filename.endswith("errors.py")
    ('MissingDataWarning', False)
    """
    warnings.warn(message, category, stacklevel=find_stack_level())
