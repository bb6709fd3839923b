r"""How the random location enters the log variance: fitting every association type and comparing them.

MIXREGLS's ``NCOV`` (and MixLS's ``type = "all"``) offers three models for the
relation of a school's random location ``u0_j`` to its random scale:

.. math::

    \text{none } (NCOV = 0):&\quad \ln\sigma^2_{ij} = w_{ij}'\alpha + v_j, &\quad \operatorname{cov}(u_{0j}, v_j) = 0,\\
    \text{linear } (NCOV = 1):&\quad \ln\sigma^2_{ij} = w_{ij}'\alpha + v_j, &\quad \operatorname{cov}(u_{0j}, v_j) = \sigma_{uv},\\
    \text{quadratic } (NCOV = 2):&\quad \ln\sigma^2_{ij} = w_{ij}'\alpha + v_j + \gamma\,\theta_{1j}^2,
        &\quad \theta_{1j} = u_{0j}/\operatorname{sd}(u_{0j}),

each nested in the next (``cov(u0,v)`` is a parameter of the linear model and
``quad(u0,v)`` = :math:`\gamma` one of the quadratic). :func:`compare_associations`
fits them (:func:`mlsml.fit` with ``association=``) and tabulates the
log-likelihood, AIC and BIC with likelihood-ratio tests of each against the
simpler ones (:func:`mlsml.lrtest`; the nulls ``cov(u0,v) = 0`` and
``quad(u0,v) = 0`` are interior points, so the reference is ``chi2(df)``), and
against the model without a random scale, where ``var(v) = 0`` is on the boundary
and the boundary-corrected mixture applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .compare import lrtest
from .errors import ModelSpecError
from .model import fit
from .params import ASSOCIATIONS

#: MIXREGLS's ``NCOV`` of each association type.
NCOV = {"none": 0, "linear": 1, "quadratic": 2}

#: Row name of the model without a random scale (``baseline=True``).
BASELINE = "no random scale"


@dataclass(frozen=True)
class AssociationComparison:
    """The fits of :func:`compare_associations` and their comparison.

    Attributes
    ----------
    fits : dict of str to MELSMResults
        One fit per association type, in the order none, linear, quadratic (those asked
        for), after ``"no random scale"`` (``baseline=True``).
    table : pandas.DataFrame
        Indexed by association: ``NCOV``, ``npar``, ``llf``, ``deviance``, ``AIC``, ``BIC``
        (N students), ``BIC (groups)`` (J schools, as MIXREGLS prints it), ``converged``.
    tests : pandas.DataFrame
        One row per nested pair (``"linear vs none"``, ``"quadratic vs linear"``,
        ``"quadratic vs none"``, and each against ``"no random scale"``): ``LR chi2``,
        ``df``, ``p``, ``reference``.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> cmp = mlsml.compare_associations("y ~ x", df, groups="school", associations=["none", "linear"], baseline=False)
    >>> list(cmp.fits), cmp.best_aic in cmp.table.index
    (['none', 'linear'], True)
    """

    fits: dict
    table: pd.DataFrame
    tests: pd.DataFrame

    @property
    def best_aic(self) -> str:
        """The association with the smallest AIC."""
        return str(self.table["AIC"].idxmin())

    @property
    def best_bic(self) -> str:
        """The association with the smallest BIC."""
        return str(self.table["BIC"].idxmin())

    def __repr__(self) -> str:
        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return (
                "Association of the random location with the random scale\n"
                f"{self.table.to_string(float_format=lambda x: f'{x:.4f}')}\n\n"
                f"Likelihood-ratio tests\n{self.tests.to_string(float_format=lambda x: f'{x:.4g}')}"
            )


def compare_associations(
    formula: str, data, groups, associations=ASSOCIATIONS, baseline: bool = True, **kwargs
) -> AssociationComparison:
    """Fit the model with each association type and compare them (MixLS's ``type = "all"``).

    Parameters
    ----------
    formula, data, groups
        As :func:`mlsml.fit`.
    associations : sequence of str
        The types to fit, among ``"none"``, ``"linear"`` and ``"quadratic"`` (default:
        all three; see the module docstring).
    baseline : bool
        Also fit the model without the random scale (``random_scale=False``, first row
        ``"no random scale"``) and test each association against it: ``var(v) = 0`` is on
        the boundary, so these tests use the mixture ``0.5 chi2(c) + 0.5 chi2(c + 1)``
        (``c`` the free covariances of ``v``, plus ``quad(u0,v)``; :func:`mlsml.lrtest`).
    **kwargs
        Passed to :func:`mlsml.fit` for every fit (``scale_formula``, ``nagq``, ...).
        The model must have a random scale and one random location effect for
        ``"quadratic"``.

    Returns
    -------
    AssociationComparison
        ``.fits``, ``.table`` (llf, AIC, BIC) and ``.tests`` (LR tests).

    Raises
    ------
    ModelSpecError
        An unknown or repeated association type, fewer than two, or ``association``
        among ``kwargs``.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> cmp = mlsml.compare_associations("y ~ x", df, groups="school", scale_formula="~ x")
    >>> cmp.table["npar"].tolist()
    [5, 6, 7, 8]
    >>> cmp.tests.index.tolist()[:3]
    ['none vs no random scale', 'linear vs none', 'linear vs no random scale']
    >>> cmp.tests.loc["none vs no random scale", "reference"]
    '0.5 chi2(0) + 0.5 chi2(1) (boundary: var(v) = 0)'
    """
    if "association" in kwargs:
        raise ModelSpecError("compare_associations fits every association type itself: do not pass association=")
    chosen = [associations] if isinstance(associations, str) else list(associations)
    bad = [a for a in chosen if a not in ASSOCIATIONS]
    if bad or len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise ModelSpecError(
            f"associations must be two or three different types among {', '.join(map(repr, ASSOCIATIONS))}, not {associations!r}"
        )
    order = [a for a in ("none", "linear", "quadratic") if a in chosen]
    fits = {}
    if baseline:
        if kwargs.get("random_scale") is False:
            raise ModelSpecError("compare_associations needs a random scale: do not pass random_scale=False")
        fits[BASELINE] = fit(formula, data, groups, **{**kwargs, "random_scale": False})
    fits.update({a: fit(formula, data, groups, association=a, **kwargs) for a in order})
    order = list(fits)
    rows = []
    for a, r in fits.items():
        rows.append(
            {
                "association": a,
                "NCOV": NCOV.get(a),
                "npar": r.df_model,
                "llf": r.llf,
                "deviance": r.deviance,
                "AIC": r.aic,
                "BIC": r.bic,
                "BIC (groups)": r.bic_groups,
                "converged": r.converged,
            }
        )
    table = pd.DataFrame(rows).set_index("association")
    tests = []
    for i, big in enumerate(order):
        for small in reversed(order[:i]):
            t = lrtest(fits[small], fits[big])
            tests.append({"test": f"{big} vs {small}", "LR chi2": t.statistic, "df": t.df, "p": t.pvalue, "reference": t.reference})
    tests = pd.DataFrame(tests).set_index("test")
    tests = tests.loc[sorted(tests.index, key=lambda k: (order.index(k.split(" vs ")[0]), -order.index(k.split(" vs ")[1])))]
    tests["df"] = tests["df"].astype(np.int64)
    return AssociationComparison(fits=fits, table=table, tests=tests)
