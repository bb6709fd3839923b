"""The model class: formulas in, :class:`~mlsml.results.MELSMResults` out.

.. math::

    y_{ij} = x_{ij}'\\beta + z_{ij}'u_j + e_{ij}, \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\alpha + v_j, \\qquad
    (u_j, v_j) \\sim N(0, \\Sigma).

Data flow (as lme4's ``lFormula -> mkLmerDevfun -> optimizeLmer -> mkMerMod``):
formulas -> :func:`mlsml.design.build_design` (arrays) ->
:meth:`MELSM.objective` (a :class:`mlsml.likelihood.Likelihood`) ->
:func:`mlsml.optimize.maximize` (an :class:`mlsml.optimize.OptSummary`) ->
:func:`mlsml.diagnostics.diagnose` -> :class:`mlsml.results.MELSMResults`, built once.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pandas as pd

from .boundary import face_likelihood
from .design import Design, FormulaSpec, build_design, check_extended_layout
from .diagnostics import settle
from .distributed import (
    DaskLikelihood,
    DistributedDesign,
    DistributedResults,
    build_distributed_design,
    is_distributed_data,
)
from .errors import ModelSpecError
from .integrand import Integrand, make_integrand
from .likelihood import Likelihood
from .optimize import FitOptions, maximize, raise_rule
from .params import ParamLayout, constrain
from .quadrature import DEFAULT_NAGQ_UEXACT, QuadratureSpec, check_nagq, default_nagq
from .results import MELSMResults
from .robust import check_cov_type
from .threads import blas_limited
from .validate import check_choice, check_int, check_real, describe_value
from .weights import with_weights_and_offsets

#: ``scipy.optimize.minimize`` methods :meth:`MELSM.fit` accepts (matched case-insensitively):
#: those that use the exact autograd gradient. Derivative-free methods (Nelder-Mead,
#: Powell, COBYLA) ignore it and took 15 to 100 times as long on the demo data.
METHODS = ("BFGS", "L-BFGS-B", "CG", "Newton-CG", "trust-exact", "trust-krylov", "trust-ncg", "SLSQP", "trust-constr")

#: Largest ``|ln var(e_ij)|`` accepted at ``start_params``: ``exp(709.8)`` is the largest
#: double, so beyond this the residual variance (or its inverse) overflows.
MAX_LOG_VARIANCE = 700.0

#: How many standard deviations of the scale effects ``v`` the starting values must
#: cover within :data:`MAX_LOG_VARIANCE` (the quadrature nodes reach that far out).
START_V_SDS = 5.0

#: Rounds of :func:`mlsml.optimize.raise_rule` and :func:`mlsml.diagnostics.settle` in
#: :meth:`MELSM.fit`: when settling moves the fit (to a face, or just inside one), the
#: default rule is checked again there (in a fuzz case with 7 schools the 15-point rule was
#: accurate to 1e-3 where BFGS stopped, and 0.04 off where the face search moved the fit).
SETTLE_ROUNDS = 2

#: Values of the ``quadrature`` option.
QUADRATURES = ("auto", "product", "marginal")


# ---------------------------------------------------------------- shared docs
# The parameters of mlsml.fit, MELSM.from_formula and MELSM.fit are documented once
# here and put into each docstring by _doc (one line '{name}' per block).
_MODEL_PARAMS_DOC = r"""formula : str
    The mean function in statsmodels/patsy syntax, response on the left:
    ``"normexam ~ standLRT + C(sex)"``. Categorical terms (``C(x)``, or any text
    column), interactions (``a:b``, ``a*b``) and transformations (``np.log(x)``,
    ``I(x**2)``) work as in statsmodels; names may use any script (``écart``).
    Fixed effects only: the school effects come from ``re_formula``,
    ``random_scale``/``scale_re_formula`` and ``groups``. lme4's
    ``(1 + x | school)`` in any formula argument raises
    :class:`~mlsml.ModelSpecError` showing the mlsml call that fits what it means.
data : pandas.DataFrame
    One row per observation (student), in any order and with any index; never
    modified (anything ``pandas.DataFrame`` accepts, e.g. a dict of columns, is
    converted). Columns used by a formula may be numeric, boolean (also pandas'
    nullable ``"boolean"``, ``"Int64"``, ``"Float64"``), categorical or text (a
    factor). Column names must be unique. A text column whose values are numbers
    (``"-3"`` ... ``"3"``, or a few ``"."`` among numbers) raises
    :class:`~mlsml.DataError` naming it, unless it is wrapped in ``C(...)``.
    A Dask DataFrame, a Parquet path or glob, or a
    :class:`mlsml.distributed.DaskData` fits on a Dask cluster: the rows stay on
    the workers (``groups`` then names a column; see ``docs/distributed.md``).
groups : str or array-like
    The grouping (school) variable: the name of a column of ``data``
    (``groups="school"``), or the labels themselves, one per row of ``data`` (the
    statsmodels habit ``groups=df["school"]``): a Series is aligned by its index
    (which must hold the labels of ``data.index``, in any order), an array or list
    by position. Labels may be any hashable values (numbers, strings, tuples);
    schools need not be sorted or contiguous.
scale_formula : str, default "~ 1"
    One-sided formula of the log residual variance, the ``w_ij`` of
    :math:`\ln \sigma^2_{ij}` (e.g. ``"~ standLRT + C(sex)"``). ``None`` means
    ``"~ 1"``.
re_formula : str, default "~ 1"
    One-sided formula of the school effects in the mean, the ``z_ij``: ``"~ 1"`` a
    random intercept (``u0``), ``"~ x"`` a random intercept and a random slope on
    ``x`` (``u0, u1``), ``"~ 0"`` none (then ``random_scale`` must be true).
    ``None`` means ``"~ 1"``.
random_scale : bool, default True
    Include the school effect :math:`v_j` on the log residual variance (the
    location scale model). ``False`` with ``scale_formula="~ 1"`` is the ordinary
    random-intercept model. Must be ``True`` or ``False``.
missing : {"drop", "raise"}, default "drop"
    Rows with a missing (NaN, None, ``pd.NA``) or infinite value in any column a
    formula uses, or in ``groups``: ``"drop"`` removes them and warns with a
    :class:`~mlsml.MissingDataWarning` that counts them per column; ``"raise"``
    raises :class:`~mlsml.DataError` instead. Other columns do not matter.
scale_re_formula : str, optional
    One-sided formula of the school effects in the log residual variance, the
    ``g_ij``: ``"~ x"`` gives a random scale intercept and a random scale slope on
    ``x`` (effects ``v0, v1``). Implies ``random_scale=True``.
bs_formula : str, optional
    One-sided formula of a log-linear between-school variance of the random
    intercept, :math:`\ln \operatorname{var}(u_{0j}) = s_j'\tau`, in school-level
    columns (constant within each school); the parameters ``bsvar:<term>`` replace
    ``var(u0)``. A level-1 (time-varying) column, as MIXREGLS allows, makes the
    variance of the random location vary by row, :math:`\exp(s_{ij}'\tau)`
    (:func:`mlsml.integrand.loaded_Z`; ``u0_j`` is then the location where those
    columns are zero). See :mod:`mlsml.integrand` and docs/model.md.
association : {"linear", "none", "quadratic"}, default "linear"
    How the random location enters the log residual variance (MIXREGLS ``NCOV``
    1, 0, 2): ``"linear"``, through ``cov(u0,v)`` (Sigma unstructured);
    ``"none"``, not at all (every ``cov(u*, v*)`` fixed at zero and absent from
    ``params``); ``"quadratic"``, ``"linear"`` plus ``quad(u0,v)`` times the squared
    standardised random intercept, :math:`\gamma\,(u_{0j}/\operatorname{sd}(u_{0j}))^2`
    (one random location effect, the plain random scale). See ``docs/model.md`` and
    :func:`mlsml.compare_associations`.
cov_constraints : str or list of str, optional
    Covariances of the school effects fixed at zero, by name:
    ``["cov(u0,u1)"]`` makes a random slope independent of the random intercept
    (lme4's ``(x || school)``). Fixed covariances are absent from ``params``.
weights : str, pandas.Series or array-like, optional
    Level-1 (observation) weights: a column name, a Series aligned by index or one
    value per row. Sampling weights are the conditional ones (given the school); the
    fit is then the pseudo-maximum-likelihood estimator of :mod:`mlsml.weights` and
    its standard errors are cluster-robust by default (``cov_type``).
group_weights : str, mapping or array-like, optional
    Level-2 (school) weights: a column constant within each school, one value per
    row, or a mapping ``{school: weight}``; they multiply each school's log-likelihood.
weights_kind : {"sampling", "frequency"}, default "sampling"
    Sampling (design) weights, or frequency weights (a row or a school standing for
    that many identical copies: the fit of the replicated data set).
weights_scale : {"size", "effective", "none"}, optional
    Scaling of the level-1 sampling weights within each school (:mod:`mlsml.weights`);
    default ``"size"`` (they sum to the school's size).
offset : str, pandas.Series or array-like, optional
    A known term added to the mean, :math:`y_{ij} = o_{ij} + x_{ij}'\beta + \dots`
    (statsmodels' ``offset``).
scale_offset : str, pandas.Series or array-like, optional
    A known term added to the log residual variance.
missing_code : float, optional
    A value that stands for a missing value in the data (MixWILD's missing-value code,
    e.g. ``-999``): in every numeric column a formula uses (and ``groups``) it becomes
    missing before ``missing`` applies; the warning counts those values per column.
drop_constant_groups : bool, default False
    Drop the schools whose response is constant (all equal, including schools with one
    row), as MixWILD's ``DISCARD0 = 1`` does, with a :class:`~mlsml.MissingDataWarning`
    naming how many and which. Off by default: rows are never dropped unasked.
client : distributed.Client, optional
    For Dask data: the cluster to fit on (default: the current client, else a
    ``LocalCluster`` started for the fit, with a :class:`~mlsml.ClusterWarning`).
    Ignored for a pandas DataFrame."""

_FIT_PARAMS_DOC = r"""nagq : int, optional
    Quadrature points per dimension of the rule. Default: 15 for the u-exact rule
    (over the scale effects only, see ``quadrature``); for the product rule 11 in
    one or two dimensions, 9 in three, 5 beyond
    (:func:`mlsml.quadrature.default_nagq`). An integer from 1 to
    :func:`mlsml.quadrature.max_nagq` of the rule's dimension: 200 in one
    dimension, 141 in two, 27 in three (a rule has at most
    :data:`mlsml.quadrature.MAX_QUAD_NODES` = 20000 nodes, since every evaluation
    holds observations x nodes arrays). Floats and strings are refused, not
    rounded. To check the accuracy, refit with about twice the points; the fit
    warns with :class:`~mlsml.QuadratureWarning` when that would move the
    log-likelihood.
method : str, default "BFGS"
    ``scipy.optimize.minimize`` method of each optimiser pass, one of the
    gradient-based :data:`mlsml.model.METHODS` (``"BFGS"``, ``"L-BFGS-B"``,
    ``"CG"``, ``"Newton-CG"``, ``"trust-exact"``, ``"trust-krylov"``,
    ``"trust-ncg"``, ``"SLSQP"``, ``"trust-constr"``; case-insensitive).
start_params : pandas.Series, dict or array-like, optional
    Starting values on the natural scale, named and ordered as
    :attr:`MELSM.param_names` (e.g. ``res.params`` of an earlier fit). They must
    be finite numbers, the variances positive and the covariance matrix positive
    definite, and the residual variance they imply must be representable;
    anything else raises :class:`~mlsml.ModelSpecError` naming the parameter.
    Default: moment estimates (:func:`mlsml.optimize.start_values`).
maxiter : int, default 1000
    Most iterations of one optimiser pass (at least 1).
max_passes : int, default 30
    Most re-centring passes of the optimiser (at least 1); the fit has converged
    when a fresh pass from the estimates no longer moves them (``xtol``).
prune : float, default 0
    Product rule only: drop the nodes whose product weight is below ``prune``
    times the largest, in ``[0, 1)`` (:func:`mlsml.quadrature.gauss_hermite_rule`).
    Cheap but inaccurate (errors of 1e-3 and more in the log-likelihood even at
    ``1e-6``; see ``docs/quadrature.md``); for random slopes prefer the u-exact
    rule.
xtol : float, default 1e-6
    Convergence: largest change of the optimiser-scale parameters between two
    passes (a finite number > 0; see :class:`mlsml.optimize.FitOptions`).
gtol : float, default 1e-8
    Gradient tolerance of each optimiser pass, on ``-llf / N`` (a finite number
    > 0).
callback : callable, optional
    Called as ``callback(pass, theta, llf)`` after every pass (``theta`` on the
    optimiser scale, see :mod:`mlsml.params`).
quadrature : {"auto", "product", "marginal"}, default "auto"
    ``"product"``: the rotated product Gauss-Hermite rule over all ``d`` school
    effects. ``"marginal"`` (u-exact): the mean effects integrated out exactly and
    ``nagq`` points per dimension over the scale effects only
    (:mod:`mlsml.gaussian`; models with a random scale and a school effect in the
    mean or ``scale_re_formula``). ``"auto"`` uses ``"marginal"`` wherever it
    applies and ``"product"`` otherwise. The u-exact rule is both faster (London
    Model 3: 0.15 s against 0.28 s) and far more accurate for small clusters with
    a large random-scale variance (6 students a school, var(v) = 1.5: 15 points
    are within 1.2e-4 of the limit where the 11-point product rule is 0.13 off).
max_time : float, optional
    Time budget of the optimiser in seconds (positive). When it runs out the fit
    stops at the best point found so far and says so: ``res.converged`` is
    ``False``, the message names the budget, and a
    :class:`~mlsml.ConvergenceWarning` is issued. Default: no budget.
cov_type : {"nonrobust", "robust"}, optional
    Standard errors from the inverse observed information (``"nonrobust"``) or the
    cluster-robust sandwich over schools (``"robust"``, :mod:`mlsml.robust`; also
    under misspecification). Default: ``"robust"`` with sampling weights,
    ``"nonrobust"`` otherwise. Recorded as ``res.cov_type``."""

_MODEL_EQUATION_DOC = r""".. math::

    y_{ij} = x_{ij}'\beta + z_{ij}'u_j + e_{ij}, \qquad
    e_{ij} \sim N(0, \sigma^2_{ij}), \qquad
    \ln \sigma^2_{ij} = w_{ij}'\alpha + g_{ij}'v_j, \qquad
    (u_j, v_j) \sim N(0, \Sigma),

for observation (student) :math:`i` in group (school) :math:`j`. The columns
:math:`x_{ij}` come from ``formula``, :math:`z_{ij}` from ``re_formula``,
:math:`w_{ij}` from ``scale_formula`` and :math:`g_{ij}` is 1 (``random_scale``)
or the columns of ``scale_re_formula``. The parameters are named ``mean:<term>``
(:math:`\beta`), ``scale:<term>`` (:math:`\alpha`) and ``var(...)``,
``cov(...)`` for :math:`\Sigma` over the effects ``u0, u1, ..., v``
(:mod:`mlsml.params`). The log-likelihood integrates the school effects out by
adaptive Gauss-Hermite quadrature, with autograd gradients."""

_RAISES_DOC = r"""ModelSpecError
    The model cannot be built as specified: lme4 ``(... | ...)`` syntax in a
    formula, a mean formula without a response or a two-sided scale, random-effects,
    ``scale_re_formula`` or ``bs_formula``, a name that is not a column, constant or
    collinear design columns, no school effects at all, ``groups`` that is not a
    column or has the wrong length, or an option of the wrong type or out of range.
DataError
    The data cannot be used: empty, fewer than two groups, a response that is not
    real-valued or does not vary within groups, numbers stored as text, duplicate
    column names, unhashable group ids, or missing values with ``missing="raise"``."""

_FIT_RAISES_DOC = r"""ModelSpecError
    An option of the wrong type or out of range (each names the option and the
    value), or unusable ``start_params`` (naming the parameter)."""

_RETURNS_DOC = r"""MELSMResults
    Estimates (``params``, ``bse``, ``conf_int()``, ``summary()``), the
    log-likelihood (``llf``, ``aic``, ``bic``), convergence (``converged``,
    ``message``), school effects (``school_effects()``) and predictions
    (``predict``)."""

_WARNS_DOC = r"""MissingDataWarning
    Rows were dropped for missing values (counted per column).
ConvergenceWarning
    The optimiser did not reach a maximum; ``res.converged`` is ``False`` and the
    estimates must not be used.
SingularFitWarning
    The covariance matrix of the school effects is at (or near) the boundary.
QuadratureWarning
    About twice the quadrature points would change the log-likelihood noticeably."""


def _doc(**blocks: str):
    """Replace each docstring line ``{name}`` by ``blocks[name]``, indented like that line."""

    def decorate(obj):
        if obj.__doc__:  # None under python -OO
            lines = []
            for line in obj.__doc__.splitlines():
                key = line.strip()[1:-1]
                if line.strip().startswith("{") and key in blocks:
                    indent = line[: len(line) - len(line.lstrip())]
                    lines.extend(indent + b if b else "" for b in blocks[key].splitlines())
                else:
                    lines.append(line)
            obj.__doc__ = "\n".join(lines)
        return obj

    return decorate


def _check_fit_options(method, maxiter, max_passes, xtol, gtol, callback, max_time=None) -> FitOptions:
    """The optimiser options of :meth:`MELSM.fit`, checked for type and range.

    Raises :class:`~mlsml.ModelSpecError` naming the option; nothing is rounded,
    parsed from a string or clipped.
    """
    if isinstance(method, str) and method.lower() in ("nelder-mead", "powell", "cobyla", "cobyqa"):
        raise ModelSpecError(
            f"method={method!r} does not use gradients; mlsml supplies the exact gradient of the likelihood, "
            f"so use one of {', '.join(METHODS)} (BFGS is the default)"
        )
    method = check_choice("method", method, METHODS, case_insensitive=True)
    if callback is not None and not callable(callback):
        raise ModelSpecError(f"callback must be a function callback(pass, theta, llf) or None, not {describe_value(callback)}")
    return FitOptions(
        method=method,
        maxiter=check_int("maxiter", maxiter, minimum=1),
        max_passes=check_int("max_passes", max_passes, minimum=1),
        xtol=check_real("xtol", xtol, 0.0, low_open=True),
        gtol=check_real("gtol", gtol, 0.0, low_open=True),
        max_time=None if max_time is None else check_real("max_time", max_time, 0.0, low_open=True),
    )


class MELSM:
    """Mixed-effects location scale model (two levels).

    Build it with :meth:`from_formula`; fit it with :meth:`fit`.

    Parameters
    ----------
    design : Design
        Arrays of the model (see :func:`mlsml.design.build_design`).
    formula_spec : FormulaSpec
        The formulas, kept to rebuild designs for new data.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> model = mlsml.MELSM.from_formula("y ~ x", data=df, groups="school", scale_formula="~ x")
    >>> res = model.fit()
    >>> res.converged
    True
    """

    def __init__(self, design: Design, formula_spec: FormulaSpec):
        self.design = design
        self.formula_spec = formula_spec

    @classmethod
    @_doc(equation=_MODEL_EQUATION_DOC, model_params=_MODEL_PARAMS_DOC, raises=_RAISES_DOC)
    def from_formula(
        cls,
        formula: str,
        data: pd.DataFrame,
        groups,
        scale_formula: str | None = "~ 1",
        re_formula: str | None = "~ 1",
        random_scale: bool = True,
        missing: str = "drop",
        scale_re_formula: str | None = None,
        bs_formula: str | None = None,
        association: str = "linear",
        cov_constraints=None,
        weights=None,
        group_weights=None,
        weights_kind: str = "sampling",
        weights_scale: str | None = None,
        offset=None,
        scale_offset=None,
        *,
        missing_code: float | None = None,
        drop_constant_groups: bool = False,
        client=None,
    ) -> MELSM:
        """Create a model from formulas (statsmodels/patsy syntax) without fitting it.

        The model is

        {equation}

        Parameters
        ----------
        {model_params}

        Returns
        -------
        MELSM
            The model, with its design (:attr:`design`) and parameter names
            (:attr:`param_names`); fit it with :meth:`fit`.

        Raises
        ------
        {raises}

        Warns
        -----
        MissingDataWarning
            Rows were dropped for missing values (counted per column).

        See Also
        --------
        mlsml.fit : Build and fit in one call.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", re_formula="~ 1")
        >>> model.param_names
        ['mean:Intercept', 'mean:x', 'scale:Intercept', 'scale:x', 'var(u0)', 'var(v)', 'cov(u0,v)']

        A random slope on ``x`` (lme4's ``y ~ x + (1 + x | school)``) and no random scale:

        >>> mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula="~ x", random_scale=False).param_names[-3:]
        ['var(u0)', 'var(u1)', 'cov(u0,u1)']
        """
        if is_distributed_data(data):  # a Dask DataFrame or Parquet files: the arrays are built and kept by the workers
            constraints = dict(association=association, cov_constraints=cov_constraints)
            weighting = dict(weights=weights, group_weights=group_weights, weights_kind=weights_kind, weights_scale=weights_scale)
            rows = dict(missing_code=missing_code, drop_constant_groups=drop_constant_groups)
            build = partial(
                build_distributed_design, client=client, offset=offset, scale_offset=scale_offset, **constraints, **weighting, **rows
            )
        else:
            build = partial(build_design, missing_code=missing_code, drop_constant_groups=drop_constant_groups)
        design, spec = build(
            formula,
            data,
            groups,
            scale_formula=scale_formula,
            re_formula=re_formula,
            random_scale=random_scale,
            missing=missing,
            scale_re_formula=scale_re_formula,
            bs_formula=bs_formula,
        )
        check_extended_layout(design.layout)
        if isinstance(design, DistributedDesign):
            return cls(design, spec)
        if not isinstance(data, pd.DataFrame):
            data = pd.DataFrame(data)
        design = with_weights_and_offsets(design, data, weights, group_weights, weights_kind, weights_scale, offset, scale_offset)
        layout = constrain(design.layout, association, cov_constraints)
        if layout is not design.layout:
            design = replace(design, layout=layout)
        return cls(design, spec)

    # ------------------------------------------------------------------
    @property
    def layout(self) -> ParamLayout:
        """Parameter names and sizes."""
        return self.design.layout

    @property
    def param_names(self) -> list[str]:
        """Natural-scale parameter names (the contract of :mod:`mlsml.params`).

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> mlsml.MELSM.from_formula("y ~ x", df, groups="school", random_scale=False).param_names
        ['mean:Intercept', 'mean:x', 'scale:Intercept', 'var(u0)']
        """
        return list(self.layout.names)

    def theta_from_params(self, params) -> np.ndarray:
        """Optimiser-scale vector from natural-scale ``params`` (Series or array).

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", random_scale=False)
        >>> model.theta_from_params([0.0, 0.7, -0.8, 0.04]).round(4).tolist()  # log-Cholesky: ln sd(u0)
        [0.0, 0.7, -0.8, -1.6094]
        """
        lay = self.layout
        names = list(lay.names)
        if isinstance(params, dict):
            params = pd.Series(params, dtype=object)
        if isinstance(params, pd.Series):
            missing = [n for n in names if n not in params.index]
            extra = [str(n) for n in params.index if n not in names]
            if missing or extra:
                raise ModelSpecError(
                    f"params lacks {missing} and has names the model does not know: {extra}; the model's parameters are {names}"
                    if missing and extra
                    else f"params lacks {missing}; the model's parameters are {names}"
                    if missing
                    else f"params has names the model does not know: {extra}; the model's parameters are {names}"
                )
            params = params.reindex(names)
        try:
            raw = np.asarray(params, dtype=object).ravel()
            if isinstance(params, str | bytes) or any(isinstance(v, str | bytes | bool | np.bool_) for v in raw):
                raise TypeError("text or booleans")  # numbers as text are not parsed silently
            vec = np.asarray(params, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(
                f"params must be numbers (a Series indexed by {names} or an array), not {describe_value(params)}"
            ) from exc
        if vec.shape != (lay.n_params,):
            raise ModelSpecError(f"params has shape {vec.shape}; the model has {lay.n_params} parameters: {names}")
        bad = [f"{n} = {v}" for n, v in zip(names, vec) if not np.isfinite(v)]
        if bad:
            raise ModelSpecError(f"params must be finite numbers: {', '.join(bad)}")
        negative = [f"{n} = {v:.6g}" for n, v in zip(names, vec) if (n.startswith("var(")) and v <= 0]
        if negative:
            raise ModelSpecError(f"variances must be positive: {', '.join(negative)}")
        sigma = lay.sigma_from_natural(vec)
        try:
            tau = vec[lay.p + lay.k : lay.p + lay.k + lay.m] if lay.bs_terms else None
            return lay.theta_from_parts(vec[: lay.p], vec[lay.p : lay.p + lay.k], sigma, tau=tau, quad=lay.natural_quad(vec))
        except np.linalg.LinAlgError as exc:
            cov = ", ".join(f"{n} = {v:.6g}" for n, v in zip(names, vec) if n.startswith(("var(", "cov(")))
            raise ModelSpecError(
                f"the covariance parameters do not form a positive-definite matrix ({cov}): each |cov(a,b)| must be "
                "below sd(a) sd(b), and jointly the matrix must be positive definite"
            ) from exc

    def _natural(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(self.layout.to_natural(np.asarray(theta, dtype=float)), dtype=float)

    def _check_start(self, theta: np.ndarray, lik: Likelihood) -> None:
        """Refuse starting values at which the fit cannot start.

        The residual log-variance ``w_ij' alpha`` must stay within
        :data:`MAX_LOG_VARIANCE` of zero (beyond, ``exp`` overflows or underflows and
        the optimiser cannot move), also for a school :data:`START_V_SDS` standard
        deviations of ``v`` out, and the log-likelihood and its gradient must be
        finite there.
        """
        lay = self.layout
        names = list(lay.names)
        alpha = theta[lay.p : lay.p + lay.k]
        # on a Dask cluster the rows are not here: W alpha at the columns' minima and maxima
        held = isinstance(self.design, Design)
        W = self.design.W if held else self.design.column_ranges("W")
        eta = np.asarray(self.design.log_variance_index(alpha)) if held else W @ alpha
        if not np.all(np.abs(eta) <= MAX_LOG_VARIANCE):
            contrib = np.max(np.abs(W * alpha), axis=0)
            k = int(np.argmax(contrib))
            raise ModelSpecError(
                f"start_params give a residual log-variance up to {float(np.max(np.abs(eta))):.3g} "
                f"({names[lay.p + k]} = {alpha[k]:.6g}): var(e) = exp of that is outside the range of doubles "
                f"(|ln var(e)| must stay below MAX_LOG_VARIANCE = {MAX_LOG_VARIANCE}). Start from the defaults "
                "(start_params=None) or from the params of a fit on data in the same units"
            )
        if lay.n_v:
            _, _, L = lay.split(theta)
            Lv = np.asarray(L)[lay.q :, :]
            G = self.design.G if self.design.G is not None else np.ones((1, 1))
            if not held and self.design.G is not None:  # on a Dask cluster: G at the columns' minima and maxima, as W
                G = self.design.column_ranges("G")
            sd_v = float(np.sqrt(np.max(np.sum((G @ Lv[:, : lay.d]) ** 2, axis=1))))
            reach = float(np.max(np.abs(eta))) + START_V_SDS * sd_v
            if not reach <= MAX_LOG_VARIANCE:
                v_names = [n for n in names if n.startswith("var(v")]
                shown = ", ".join(f"{n} = {float(self._natural(theta)[names.index(n)]):.6g}" for n in v_names)
                raise ModelSpecError(
                    f"start_params give {shown}: a school {START_V_SDS:g} SD out would have a residual log-variance "
                    f"of {reach:.3g}, and var(e) = exp of that is outside the range of doubles (|ln var(e)| must stay "
                    f"below MAX_LOG_VARIANCE = {MAX_LOG_VARIANCE}). Start from the defaults (start_params=None) or "
                    "from the params of a fit on data in the same units"
                )
        with np.errstate(all="ignore"):
            try:
                value, grad = lik.value_and_grad(theta)
            except (np.linalg.LinAlgError, FloatingPointError, ValueError):
                value, grad = np.nan, np.full(theta.shape, np.nan)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            what = "log-likelihood" if not np.isfinite(value) else "gradient of the log-likelihood"
            raise ModelSpecError(
                f"the {what} is not finite at start_params, so the optimiser cannot start from there; start from "
                "the defaults (start_params=None) or from the params of a fit on data in the same units"
            )

    def loglike(self, params, nagq: int | None = None, quadrature: str = "auto") -> float:
        """Log-likelihood at natural-scale ``params`` (adaptive quadrature at ``params``).

        ``nagq`` and ``quadrature`` have the meaning and defaults of :meth:`fit`, so
        ``model.loglike(res.params)`` reproduces ``res.llf``.

        Examples
        --------
        The log-likelihood at the estimates is the maximised one:

        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x")
        >>> res = model.fit()
        >>> abs(model.loglike(res.params) - res.llf) < 1e-9
        True
        """
        theta = self.theta_from_params(params)
        return self.objective(nagq=nagq, quadrature=quadrature).value(theta)

    def objective(self, nagq: int | None = None, quadrature: str = "auto", prune: float = 0.0) -> Likelihood:
        """The log-likelihood function the fit maximises (lme4's ``devFunOnly``).

        Parameters
        ----------
        nagq, quadrature, prune
            As :meth:`fit` (the defaults give the rule :meth:`fit` uses).

        Returns
        -------
        mlsml.likelihood.Likelihood
            ``.value(theta)``, ``.value_and_grad``, ``.hessian``, ``.per_school``,
            ``.adapt`` on the optimiser scale (:meth:`theta_from_params`); hand it to
            :func:`mlsml.optimize.maximize`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula="~ x")
        >>> f = model.objective()
        >>> f.spec.kind, f.spec.nagq
        ('uexact', 15)
        >>> res = model.fit()
        >>> abs(f.value(res.theta) - res.llf) < 1e-9
        True
        """
        integrand = make_integrand(self.design)
        spec = self._spec(nagq, quadrature, prune, integrand)
        if isinstance(self.design, DistributedDesign):  # summed over blocks of schools on a Dask cluster
            return self.design.likelihood(spec)
        return Likelihood(self.design, integrand, spec)

    def _spec(self, nagq, quadrature: str, prune, integrand: Integrand) -> QuadratureSpec:
        """The rule of :meth:`objective` / :meth:`fit` (options checked) for the model's integrand."""
        quadrature = check_choice("quadrature", quadrature, QUADRATURES)
        prune = check_real("prune", prune, 0.0, 1.0, high_open=True)
        supported = integrand.uexact_supported
        if quadrature == "marginal" and not supported:
            raise ModelSpecError(
                "quadrature='marginal' needs a random scale and a random effect in the mean "
                "(or scale_re_formula); use quadrature='product'"
            )
        uexact = quadrature == "marginal" or (quadrature == "auto" and supported)
        if uexact and prune:
            raise ModelSpecError("prune applies to the product rule only (quadrature='product')")
        return QuadratureSpec("uexact" if uexact else "product", self._nagq(nagq, uexact), prune)

    # ------------------------------------------------------------------
    @_doc(fit_params=_FIT_PARAMS_DOC, raises=_FIT_RAISES_DOC, warns=_WARNS_DOC, returns=_RETURNS_DOC)
    @blas_limited
    def fit(
        self,
        nagq: int | None = None,
        method: str = "BFGS",
        start_params=None,
        maxiter: int = 1000,
        max_passes: int = 30,
        prune: float = 0.0,
        xtol: float = 1e-6,
        gtol: float = 1e-8,
        callback=None,
        quadrature: str = "auto",
        max_time: float | None = None,
        cov_type: str | None = None,
    ) -> MELSMResults:
        """Maximum-likelihood fit by adaptive Gauss-Hermite quadrature.

        Every option is checked for type and range before the fit starts (nothing
        is rounded, parsed from text or clipped).

        Parameters
        ----------
        {fit_params}

        Returns
        -------
        {returns}

        Raises
        ------
        {raises}

        Warns
        -----
        {warns}

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x")
        >>> res = model.fit()
        >>> res.converged, res.nagq
        (True, 15)
        >>> res21 = model.fit(nagq=21, start_params=res.params)   # check the quadrature
        >>> abs(res21.llf - res.llf) < 1e-4
        True
        >>> try:
        ...     model.fit(nagq=2.5)
        ... except mlsml.ModelSpecError as err:
        ...     print(err)
        nagq (quadrature points per dimension) must be an integer >= 1, not 2.5 (float)
        """
        opts = _check_fit_options(method, maxiter, max_passes, xtol, gtol, callback, max_time)
        cov_type = check_cov_type(cov_type, self.design)
        lik = self.objective(nagq=nagq, quadrature=quadrature, prune=prune)
        if start_params is not None:
            start = self.theta_from_params(start_params)
            self._check_start(start, lik)
            opts = replace(opts, start=start)
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            optsum = maximize(lik, opts, callback=callback)
            faces, searched_with = None, None
            for _ in range(SETTLE_ROUNDS):
                if nagq is None:  # the default rule: more points where it is not accurate at the estimates
                    lik, optsum = raise_rule(lik, optsum, opts, callback=callback)
                # the faces found in the last round, unless the rule they were found with changed
                rule = face_likelihood(lik).spec
                settled, diagnostics = settle(lik, optsum, faces=faces if rule == searched_with else None)
                faces, searched_with = diagnostics.faces or None, rule
                moved, optsum = settled is not optsum, settled
                if not moved or nagq is not None:
                    break  # else the rule is checked again where settle moved the fit
        results = DistributedResults if isinstance(lik, DaskLikelihood) else MELSMResults
        res = results.build(self, lik, optsum, diagnostics, cov_type=cov_type)
        res.warn_if_problematic()
        return res

    def _nagq(self, nagq, use_marginal: bool) -> int:
        """The points per dimension: the default for ``None``, else ``nagq`` checked (:func:`mlsml.quadrature.check_nagq`)."""
        dim = self.layout.n_v if use_marginal else self.layout.d
        if nagq is None:
            return DEFAULT_NAGQ_UEXACT if use_marginal else default_nagq(dim)
        return check_nagq(nagq, dim, "u-exact (marginal)" if use_marginal else "product")


@_doc(
    equation=_MODEL_EQUATION_DOC,
    model_params=_MODEL_PARAMS_DOC,
    fit_params=_FIT_PARAMS_DOC,
    raises=_RAISES_DOC,
    warns=_WARNS_DOC,
    returns=_RETURNS_DOC,
)
@blas_limited
def fit(
    formula: str,
    data: pd.DataFrame,
    groups,
    scale_formula: str | None = "~ 1",
    re_formula: str | None = "~ 1",
    random_scale: bool = True,
    missing: str = "drop",
    scale_re_formula: str | None = None,
    bs_formula: str | None = None,
    association: str = "linear",
    cov_constraints=None,
    *,
    weights=None,
    group_weights=None,
    weights_kind: str = "sampling",
    weights_scale: str | None = None,
    offset=None,
    scale_offset=None,
    missing_code: float | None = None,
    drop_constant_groups: bool = False,
    client=None,
    nagq: int | None = None,
    method: str = "BFGS",
    start_params=None,
    maxiter: int = 1000,
    max_passes: int = 30,
    prune: float = 0.0,
    xtol: float = 1e-6,
    gtol: float = 1e-8,
    callback=None,
    quadrature: str = "auto",
    max_time: float | None = None,
    cov_type: str | None = None,
) -> MELSMResults:
    """Fit a mixed-effects location scale model by maximum likelihood.

    Builds the model (:meth:`MELSM.from_formula`) and fits it (:meth:`MELSM.fit`)
    in one call. The model is

    {equation}

    Parameters
    ----------
    {model_params}
    {fit_params}

    Returns
    -------
    {returns}

    Raises
    ------
    {raises}

    Warns
    -----
    {warns}

    See Also
    --------
    MELSM.from_formula : Build the model without fitting it.
    MELSM.fit : Fit a built model (e.g. again, with other options).
    lrtest : Likelihood-ratio test of nested fits.

    Examples
    --------
    The location scale model with a covariate in the mean and in the log variance:

    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> list(res.params.index)
    ['mean:Intercept', 'mean:x', 'scale:Intercept', 'scale:x', 'var(u0)', 'var(v)', 'cov(u0,v)']

    The ordinary random-intercept model, with the groups given as a Series (as in
    statsmodels):

    >>> m1 = mlsml.fit("y ~ x", df, groups=df["school"], random_scale=False)
    >>> list(m1.params.index)
    ['mean:Intercept', 'mean:x', 'scale:Intercept', 'var(u0)']

    lme4's syntax is refused with the mlsml spelling of the same model:

    >>> try:
    ...     mlsml.fit("y ~ x + (1 + x | school)", df, groups="school")
    ... except mlsml.ModelSpecError as err:
    ...     print(str(err).splitlines()[-2].strip())
    mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")
    """
    model = MELSM.from_formula(
        formula,
        data,
        groups,
        scale_formula=scale_formula,
        re_formula=re_formula,
        random_scale=random_scale,
        missing=missing,
        scale_re_formula=scale_re_formula,
        bs_formula=bs_formula,
        weights=weights,
        group_weights=group_weights,
        weights_kind=weights_kind,
        weights_scale=weights_scale,
        offset=offset,
        scale_offset=scale_offset,
        association=association,
        cov_constraints=cov_constraints,
        missing_code=missing_code,
        drop_constant_groups=drop_constant_groups,
        client=client,
    )
    return model.fit(
        nagq=nagq,
        method=method,
        start_params=start_params,
        maxiter=maxiter,
        max_passes=max_passes,
        prune=prune,
        xtol=xtol,
        gtol=gtol,
        callback=callback,
        quadrature=quadrature,
        max_time=max_time,
        cov_type=cov_type,
    )
