"""mlsml: maximum-likelihood mixed-effects location scale models.

.. math::

    y_{ij} = x_{ij}'\\beta + z_{ij}'u_j + e_{ij}, \\quad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\alpha + v_j, \\quad
    (u_j, v_j) \\sim N(0, \\Sigma)

fitted by adaptive Gauss-Hermite quadrature with autograd gradients.

Quick use::

    import mlsml
    res = mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x")
    print(res.summary())

Every submodule (``mlsml.mixwild``, ``mlsml.profile``, ``mlsml.plots``, ...) is
an attribute of the package after a plain ``import mlsml``; the ones not
needed by :func:`fit` are imported on first access (PEP 562), which keeps
``import mlsml`` fast.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from . import bootstrap, simulate
from ._version import __version__
from .associations import AssociationComparison, compare_associations
from .bayes import compare_bayes
from .compare import LRTestResult, compare_models, lrtest
from .errors import (
    ClusterWarning,
    ConvergenceWarning,
    DataError,
    MissingDataWarning,
    MLSMLError,
    MLSMLWarning,
    ModelSpecError,
    QuadratureWarning,
    SingularFitWarning,
    UnknownGroupWarning,
)
from .model import MELSM, fit
from .plausible import fit_pv
from .results import MELSMResults, load

__all__ = [
    "MELSM",
    "MELSMResults",
    "fit",
    "fit_pv",
    "load",
    "lrtest",
    "LRTestResult",
    "compare_models",
    "compare_associations",
    "AssociationComparison",
    "compare_bayes",
    "simulate",
    "bootstrap",
    "MLSMLError",
    "DataError",
    "ModelSpecError",
    "MLSMLWarning",
    "MissingDataWarning",
    "ConvergenceWarning",
    "SingularFitWarning",
    "QuadratureWarning",
    "UnknownGroupWarning",
    "ClusterWarning",
    "__version__",
]


def __getattr__(name: str):
    """Import the submodule ``mlsml.<name>`` on first access (PEP 562).

    ``import mlsml`` imports only what :func:`fit` needs; the other submodules
    (``mixwild``, ``profile``, ``plots``, ``schools``, ...) and their heavy
    dependencies (scipy.stats, statsmodels' summary tables, matplotlib) load
    when first used, so ``mlsml.mixwild.to_mixregls(res)`` works without an
    explicit ``import mlsml.mixwild``.
    """
    if not name.startswith("_"):
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists but one of its imports is missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names and all its public submodules (for tab completion)."""
    subs = {m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return sorted(set(globals()) | subs)
