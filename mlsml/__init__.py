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
"""

from . import bootstrap, simulate
from .bayes import compare_bayes
from .compare import LRTestResult, compare_models, lrtest
from .errors import (
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
from .results import MELSMResults, load

__version__ = "0.1.0"

__all__ = [
    "MELSM",
    "MELSMResults",
    "fit",
    "load",
    "lrtest",
    "LRTestResult",
    "compare_models",
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
    "__version__",
]
