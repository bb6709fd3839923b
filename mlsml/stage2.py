r"""Stage 2: a school-level outcome regressed on the school effects (MixWILD's second stage).

After a MELSM fit, a school- (subject-) level outcome ``Y_j`` is regressed on the school
effects ``b_j = (u_j, v_j)``, school-level covariates ``x_j`` and summaries of the level-1
data of the school (e.g. its mean of a level-1 column):

.. math::

    g(E[Y_j \mid b_j, x_j]) = \eta_j = x_j'\gamma_x + \gamma_u u_{0j} + \gamma_v v_j
                              + \gamma_{uv} u_{0j} v_j + \dots

The school effects are not observed. Two estimators:

``method="mi"`` (multiple imputation, what MixWILD does)
    Draw ``b_j^{(m)}``, ``m = 1..M``, from each school's posterior -- here the **exact**
    posterior of the fit (:func:`mlsml.predict.draw_effects`: ``v`` by inverting its
    tabulated distribution function, ``u | v`` normal), where MixWILD draws from a normal
    approximation -- fit the stage-2 GLM to each completed data set and pool by Rubin's
    rules:

    .. math::

        \bar Q = \frac1M \sum_m \hat Q_m, \quad \bar U = \frac1M \sum_m \hat U_m, \quad
        B = \frac{1}{M-1} \sum_m (\hat Q_m - \bar Q)^2, \quad
        T = \bar U + (1 + \tfrac1M) B,

    with ``r = (1 + 1/M) B / Ubar`` (relative increase in variance),
    ``nu = (M - 1)(1 + 1/r)^2`` degrees of freedom (Barnard & Rubin's small-sample
    version for the gaussian family, with complete-data ``n - p``) and the fraction of
    missing information ``fmi = (r + 2/(nu + 3)) / (1 + r)``. With
    ``stage1_uncertainty=True`` (default) each draw first draws the MELSM's parameters
    from their asymptotic normal distribution, so the imputations are proper (Rubin 1987);
    ``False`` draws at the estimates, as MixWILD does.

``method="joint"`` (the one-stage model)
    The outcome's likelihood enters each school's integrand,

    .. math::

        L_j = \int f(y_j \mid b)\, f(Y_j \mid b)\, \phi(b; 0, \Sigma)\, db,

    and the MELSM and the stage-2 parameters are estimated together by maximum likelihood
    with the same adaptive quadrature (:class:`mlsml.integrand.JointIntegrand`; the
    product rule over all school effects). This is the answer the two-stage estimates
    approximate. Families: ``gaussian``, ``binomial`` (0/1), ``poisson`` and ``ordinal``
    (cumulative logit). In the joint model the school effects enter the formula as plain
    factors (``u0``, ``v``, ``u0:v``, ``u0:x``), not inside functions (``I(u0**2)``).

``family="nominal"`` (MixWILD's ``mixno``, ``method="mi"``): a multinomial logit with the
first (smallest) category as the reference,

.. math::

    P(Y_j = k \mid b_j) = \frac{e^{\eta_{jk}}}{1 + \sum_{l \ge 1} e^{\eta_{jl}}}, \qquad
    \eta_{jk} = x_j'\gamma_k \ (k \ge 1), \quad \eta_{j0} = 0,

fitted by statsmodels' ``MNLogit`` on each completed data set; the coefficient of column
``c`` for category ``k`` is named ``"c[k]"`` (e.g. ``u0[2]``).

``multilevel=True`` (MixWILD's ``MULTI2ND = 1``, ``method="mi"``): an outcome of the
level-1 rows, ``data`` one row per observation, and in each imputation a linear mixed model
with a random school intercept fitted by exact ML (:func:`fit_random_intercept`),

.. math::

    Y_{ij} = x_{ij}'\gamma + \gamma_u u_{0j} + \gamma_v v_j + \dots + a_j + e_{ij}, \qquad
    a_j \sim N(0, \tau^2), \quad e_{ij} \sim N(0, \sigma^2),

pooled by Rubin's rules with large-sample degrees of freedom; ``tau^2`` is named
``var(1|<groups>)``. With ``family="ordinal"``, ``"poisson"``, ``"nominal"`` or ``"binomial"``
each imputation is a random-intercept GLMM (:class:`RandomInterceptGLMM`: the families'
conditional densities with ``eta_ij = x_ij'gamma + sigma_a theta_j``, ``theta_j ~ N(0, 1)``)
fitted by ML with adaptive Gauss-Hermite quadrature (:func:`fit_random_intercept_glmm`),
``sigma_a^2`` reported as ``var(1|<groups>)`` (the nominal family's loadings ``sigma_k`` as
``sd(1|<groups>)[k]``).

Level-1 summaries: ``level1_summaries={"x_mean": "x", "x_sd": ("x", "sd")}`` adds per-school
statistics of level-1 columns (``mean``, ``sd``, ``var``, ``min``, ``max``, ``median``,
``sum``, ``count``) computed on the fit's data (or ``level1_data=``) under those names.

Examples
--------
>>> import mlsml, numpy as np, pandas as pd
>>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
>>> res = mlsml.fit("y ~ x", df, groups="school")
>>> schools = pd.DataFrame({"school": res.model.design.group_labels})
>>> schools["score"] = np.random.default_rng(2).normal(size=len(schools))
>>> s2 = res.stage2("score ~ u0 + v", data=schools, ndraws=20, seed=1)
>>> list(s2.params.index)
['Intercept', 'u0', 'v', 'var(resid)']
>>> s2.ndraws, bool((s2.fmi.between(0, 1)).all())
(20, True)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd
from autograd.tracer import getval

from ._lazy import LazyModule
from .design import _check_columns, formula_columns
from .errors import ConvergenceWarning, DataError, MissingDataWarning, ModelSpecError, warn
from .integrand import JOINT_FAMILIES, JointIntegrand, SchoolOutcome
from .likelihood import Likelihood
from .ops import LOG2PI
from .optimize import maximize
from .params import wald_intervals
from .predict import PosteriorGrid, draw_effects, school_moments
from .quadgrid import QuadraticPosterior
from .quadrature import QuadratureSpec, default_nagq, gauss_hermite_rule
from .scalegrid import ScaleGrid
from .validate import describe_value

# imported on first use, to keep `import mlsml` fast (see tests/test_import.py)
patsy = LazyModule("patsy")
stats = LazyModule("scipy.stats")
glm = LazyModule("statsmodels.genmod.generalized_linear_model")
families = LazyModule("statsmodels.genmod.families")
ordinal_model = LazyModule("statsmodels.miscmodels.ordinal_model")
discrete_model = LazyModule("statsmodels.discrete.discrete_model")
summary2 = LazyModule("statsmodels.iolib.summary2")
scipy_optimize = LazyModule("scipy.optimize")

#: Stage-2 families (``family=``); :data:`mlsml.integrand.JOINT_FAMILIES` for ``method="joint"``.
FAMILIES = ("gaussian", "binomial", "ordinal", "poisson", "nominal")
#: Families of the multilevel stage 2 (``multilevel=True``).
MULTILEVEL_FAMILIES = ("gaussian", "binomial", "ordinal", "poisson", "nominal")
#: Estimation methods (``method=``).
METHODS = ("mi", "joint")
#: Default number of imputations (posterior draws) of ``method="mi"``.
DEFAULT_NDRAWS = 100
#: Fewest imputations accepted (Rubin's between-imputation variance needs several).
MIN_NDRAWS = 5
#: A MI analysis is refused when more than this share of the per-draw GLM fits fail.
MAX_FAILED_SHARE = 0.5
#: Per-school statistics of ``level1_summaries``.
SUMMARY_STATS = ("mean", "sd", "var", "min", "max", "median", "sum", "count")
#: Name of the residual variance of the gaussian family in the parameter table.
RESID_VAR = "var(resid)"
#: Name of the random-intercept variance of the multilevel stage 2 (``multilevel=True``), lme4's ``(1 | school)``.
GROUP_VAR = "var(1|{groups})"
#: Name of the nominal family's per-category intercept loadings ``sigma_k`` (``multilevel=True``), suffixed ``[k]``.
GROUP_SD = "sd(1|{groups})"


# ---------------------------------------------------------------------- the school-level data
@dataclass(frozen=True)
class SchoolData:
    """The stage-2 data: one row per school of the fit, in the fit's school order.

    Attributes
    ----------
    frame : pandas.DataFrame
        The columns the formula uses (and the level-1 summaries), indexed by the fit's
        school labels; rows of schools that cannot enter the stage-2 model are kept with
        ``observed = False``.
    observed : ndarray (J,) of bool
        Schools with an outcome and every covariate.
    response : str
    effects : tuple of str
        Names of the school effects (``u0, ..., v``) the formula may use.
    """

    frame: pd.DataFrame
    observed: np.ndarray
    response: str
    effects: tuple[str, ...]


def _level1_summaries(res, summaries: Mapping, level1_data) -> pd.DataFrame:
    """Per-school statistics of level-1 columns, indexed by the fit's school labels."""
    spec = res.model.formula_spec
    design = res.model.design
    source = spec.frame if level1_data is None else level1_data
    if source is None:
        raise DataError("level1_summaries need the level-1 data: pass level1_data= (this result carries no data)")
    if not isinstance(source, pd.DataFrame):
        raise DataError(f"level1_data must be a pandas DataFrame, not {describe_value(source)}")
    if spec.groups not in source.columns:
        raise DataError(f"level1_data has no grouping column {spec.groups!r}")
    grouped = source.groupby(spec.groups, sort=False)
    out = {}
    for name, how in summaries.items():
        if isinstance(how, str):
            col, stat = how, "mean"
        elif isinstance(how, tuple) and len(how) == 2:
            col, stat = how
        else:
            raise ModelSpecError(
                f"level1_summaries[{name!r}] must be a column name (its school mean) or (column, statistic), not {describe_value(how)}"
            )
        if col not in source.columns:
            where = "the fit's data (the columns its formulas use)" if level1_data is None else "level1_data"
            raise DataError(
                f"level1_summaries[{name!r}] summarises {col!r}, which is not a column of {where}"
                + ("; pass level1_data= with that column" if level1_data is None else "")
            )
        if callable(stat):
            values = grouped[col].agg(stat)
        elif stat in SUMMARY_STATS:
            values = grouped[col].agg({"sd": "std"}.get(stat, stat))
        else:
            raise ModelSpecError(
                f"level1_summaries[{name!r}] asks for statistic {stat!r}; available: {', '.join(SUMMARY_STATS)} or a callable"
            )
        out[name] = values
    frame = pd.DataFrame(out)
    return frame.reindex(pd.Index(design.group_labels))


def school_data(
    res,
    formula: str,
    data,
    level1_summaries: Mapping | None = None,
    level1_data=None,
    missing: str = "drop",
) -> SchoolData:
    """Collect the stage-2 data of a fit: one row per school, in the fit's school order.

    ``data`` holds the grouping column of the fit and the level-2 columns the formula uses;
    it may have several rows per school (e.g. the level-1 data itself) as long as those
    columns are constant within each school. Schools of the fit without a row, or with a
    missing value in a column the formula uses, do not enter the stage-2 model (a
    :class:`~mlsml.errors.MissingDataWarning` counts them per column, or
    ``missing="raise"`` makes it an error); rows of schools that are not in the fit are
    ignored with a warning.
    """
    spec = res.model.formula_spec
    design = res.model.design
    lay = design.layout
    effects = lay.re_names
    if not isinstance(formula, str) or "~" not in formula or not formula.split("~", 1)[0].strip():
        raise ModelSpecError(f"the stage-2 formula must be a two-sided formula string such as 'Y ~ u0 + v', not {formula!r}")
    if missing not in ("drop", "raise"):
        raise ModelSpecError(f"missing must be 'drop' or 'raise', not {describe_value(missing)}")
    if data is None:
        data = pd.DataFrame({spec.groups: design.group_labels})
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame with one row per school, not {describe_value(data)}")
    if spec.groups not in data.columns:
        if data.index.name == spec.groups:
            data = data.reset_index()
        else:
            raise DataError(f"the stage-2 data has no grouping column {spec.groups!r} (the fit's groups) to match schools")
    summaries = dict(level1_summaries or {})
    clash = [c for c in effects if c in data.columns or c in summaries]
    if clash:
        raise ModelSpecError(
            f"{clash[0]!r} names a school effect of the fit, but it is also a column of the stage-2 data "
            "(or a level-1 summary): rename that column"
        )
    both = [c for c in summaries if c in data.columns]
    if both:
        raise ModelSpecError(f"level1_summaries name {both[0]!r} is already a column of the stage-2 data")
    used = [c for c in formula_columns(formula, data) if c != spec.groups]
    grouped = data.groupby(spec.groups, sort=False)
    for c in used:
        varies = grouped[c].nunique(dropna=False)
        if (varies > 1).any():
            bad = varies.index[np.argmax(varies.to_numpy() > 1)]
            raise DataError(
                f"stage-2 column {c!r} is not constant within school {bad!r} of {spec.groups!r}: "
                "stage 2 needs one value per school (summarise a level-1 column with level1_summaries=)"
            )
    first = grouped[used].first() if used else pd.DataFrame(index=grouped.size().index)
    labels = pd.Index(design.group_labels)
    extra = first.index.difference(labels)
    if len(extra):
        warn(
            f"the stage-2 data has {len(extra)} school(s) that are not in the fit (e.g. {extra[0]!r}); they are ignored",
            MissingDataWarning,
        )
    frame = first.reindex(labels)
    frame.index.name = spec.groups
    if summaries:
        frame = pd.concat([frame, _level1_summaries(res, summaries, level1_data)], axis=1)
    names = set(re.findall(r"[^\W\d][\w\.]*", formula))
    response = formula.split("~", 1)[0].strip()
    if response in effects:
        raise ModelSpecError(f"the stage-2 response {response!r} is a school effect; it must be a school-level outcome")
    check_cols = [c for c in frame.columns if c in names]
    absent = ~frame.index.isin(first.index)
    na = frame[check_cols].isna()
    bad = na.any(axis=1).to_numpy() | absent
    if bad.any():
        per_col = {c: int(na[c].sum()) for c in check_cols if na[c].any()}
        desc = ", ".join(f"{c!r}: {n}" for c, n in per_col.items())
        msg = f"{int(bad.sum())} of {len(frame)} schools do not enter the stage-2 model"
        parts = []
        if absent.any():
            parts.append(f"{int(absent.sum())} have no row in the stage-2 data")
        if desc:
            parts.append(f"missing values per column: {desc}")
        msg += " (" + "; ".join(parts) + ")"
        if missing == "raise":
            raise DataError(msg)
        warn(msg, MissingDataWarning)
    if (~bad).sum() < 3:
        raise DataError(f"only {int((~bad).sum())} schools have a stage-2 outcome and covariates; stage 2 needs more")
    return SchoolData(frame, ~bad, response, effects)


# ---------------------------------------------------------------------- posterior draws
def _posterior_draws(res, theta: np.ndarray, mean: np.ndarray, cov: np.ndarray, ndraws: int, rng) -> np.ndarray:
    """Exact posterior draws of every school's effects at ``theta``, shape ``(ndraws, J, d)``.

    The grid is placed at the posterior moments ``mean``, ``cov`` of the fit's estimates.
    """
    lay = res.layout
    q, nv = lay.q, lay.n_v
    integrand = res.likelihood.integrand
    if lay.quad_assoc:  # association="quadratic": (u0, w) from the 2-d grid (w, the whole log-variance shift, is "v")
        u, w = QuadraticPosterior.build(integrand, theta, mean, cov).draws(ndraws, rng)
        return np.stack([u, w], axis=-1)
    if integrand.core:
        grid = PosteriorGrid.build(theta, res.model.design, mean[:, q] if nv else None, np.sqrt(cov[:, q, q]) if nv else None)
        return draw_effects(grid.v, grid.cdf if nv else None, grid.density, grid.mu, grid.V, ndraws, rng)
    if nv <= 1:  # bs_formula: the exact one-dimensional grid of v with each school's Sigma_j
        sg = ScaleGrid.build(integrand, theta, np.ones(nv), mean, cov)
        return draw_effects(sg.t, sg.cdf if nv else None, sg.density, sg.mu[:, :, 0], sg.V[:, :, 0], ndraws, rng)
    raise ModelSpecError(
        "stage 2 with method='mi' draws from each school's exact posterior, which mlsml tabulates for one scale "
        f"effect; this model has {nv} (scale_re_formula): use method='joint'"
    )


# ---------------------------------------------------------------------- designs
def _design(sd: SchoolData, formula: str, family: str, effect_values: np.ndarray):
    """Response and design of the observed schools with the effects at ``effect_values`` (J, d)."""
    frame = sd.frame.loc[sd.observed].copy()
    for i, name in enumerate(sd.effects):
        frame[name] = effect_values[sd.observed, i]
    try:
        y, X = patsy.dmatrices(formula, frame, eval_env=0, NA_action="raise", return_type="dataframe")
    except Exception as exc:  # patsy raises many types
        raise ModelSpecError(f"could not evaluate the stage-2 formula {formula!r}: {exc}") from exc
    if y.shape[1] != 1:
        raise DataError(f"the stage-2 response {sd.response!r} must be one numeric column (got {y.shape[1]} columns)")
    if family == "ordinal" and "Intercept" in X.columns:  # the thresholds take its place
        info = X.design_info
        X = X.drop(columns="Intercept")
        X.attrs["design_info"] = info  # patsy's terms, for the joint model's outcome term
    return y.iloc[:, 0].to_numpy(dtype=float), X


def _check_response(y: np.ndarray, family: str, response: str) -> None:
    if family == "binomial" and not np.all(np.isin(y, (0.0, 1.0))):
        bad = np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]
        raise DataError(f"family='binomial' needs a 0/1 response; {response!r} has values {bad.tolist()}")
    if family == "binomial" and np.unique(y).size < 2:
        raise DataError(f"the stage-2 response {response!r} has one value only ({y[0]:g})")
    if family == "poisson" and not (np.all(y >= 0) and np.all(y == np.round(y))):
        raise DataError(f"family='poisson' needs a count response (non-negative integers); {response!r} is not")
    if family in ("ordinal", "nominal") and np.unique(y).size < 2:
        raise DataError(f"family={family!r} needs at least two categories; {response!r} has one")


def _levels(y: np.ndarray) -> np.ndarray:
    """The categories of an ordinal response, in order."""
    return np.unique(y)


def threshold_names(levels) -> list[str]:
    """Names of the ordinal thresholds: ``"a/b"`` between categories ``a`` and ``b`` (as statsmodels)."""
    return [f"{lo:g}/{hi:g}" for lo, hi in zip(levels[:-1], levels[1:])]


def nominal_names(columns, levels) -> list[str]:
    """Names of the nominal coefficients: ``"c[k]"``, column ``c`` for category ``k`` against the first, category-major."""
    return [f"{c}[{lev:g}]" for lev in levels[1:] for c in columns]


def ordinal_natural(params: np.ndarray, cov: np.ndarray, n_coef: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Ordinal thresholds from their parameters ``(tau_0, ln(tau_1 - tau_0), ...)``, with the delta method.

    .. math::

        \tau_k = \tau_0 + \sum_{i=1}^{k} e^{r_i}, \qquad
        \partial\tau_k / \partial\tau_0 = 1, \quad \partial\tau_k / \partial r_i = e^{r_i}\ (i \le k).

    The coefficients (the first ``n_coef``) are unchanged.
    """
    natural, jac = _ordinal_jacobian(params, n_coef)
    return natural, jac @ np.asarray(cov, dtype=float) @ jac.T


def _ordinal_jacobian(params: np.ndarray, n_coef: int) -> tuple[np.ndarray, np.ndarray]:
    """The parameters with the thresholds on their own scale, and the Jacobian of the map (:func:`ordinal_natural`)."""
    params = np.asarray(params, dtype=float)
    t = params[n_coef:]
    jac = np.eye(params.size)
    if t.size:
        inc = np.exp(t[1:])
        tau = np.cumsum(np.concatenate([t[:1], inc]))
        for k in range(t.size):
            jac[n_coef + k, n_coef] = 1.0
            jac[n_coef + k, n_coef + 1 : n_coef + k + 1] = inc[:k]
        params = np.concatenate([params[:n_coef], tau])
    return params, jac


def _fit_glm(y: np.ndarray, X: pd.DataFrame, family: str, natural: bool = True):
    """One stage-2 fit: ``(params, cov, names)`` with the residual variance appended for the gaussian family.

    The ordinal family's thresholds follow the coefficients: on their own scale
    (:func:`ordinal_natural`) when ``natural``, else as statsmodels' ``OrderedModel``
    parametrises them (the first threshold and the logs of the increments; the joint
    model's start).
    """
    if family == "ordinal":
        levels = _levels(y)
        model = ordinal_model.OrderedModel(np.searchsorted(levels, y), X, distr="logit")
        fit = model.fit(method="bfgs", disp=False, maxiter=1000)
        if not fit.mle_retvals.get("converged", True):
            raise np.linalg.LinAlgError("ordinal fit did not converge")
        params, cov = np.asarray(fit.params), np.asarray(fit.cov_params())
        if natural:
            params, cov = ordinal_natural(params, cov, X.shape[1])
        return params, cov, list(X.columns) + threshold_names(levels)
    if family == "nominal":  # multinomial logit against the first category; params (p, K-1) read category-major
        levels = _levels(y)
        model = discrete_model.MNLogit(np.searchsorted(levels, y), X.to_numpy(dtype=float))
        fit = model.fit(method="newton", disp=False, maxiter=100)
        if not fit.mle_retvals.get("converged", True):
            raise np.linalg.LinAlgError("multinomial logit fit did not converge")
        params = np.asarray(fit.params).ravel(order="F")
        return params, np.asarray(fit.cov_params()), nominal_names(X.columns, levels)
    fam = {"gaussian": families.Gaussian, "binomial": families.Binomial, "poisson": families.Poisson}[family]()
    fit = glm.GLM(y, X, family=fam).fit()
    if not fit.converged:
        raise np.linalg.LinAlgError("IRLS did not converge")
    params, cov = np.asarray(fit.params), np.asarray(fit.cov_params())
    names = list(X.columns)
    if family == "gaussian":  # the residual variance and its OLS variance 2 s^4 / (n - p)
        dof = max(len(y) - X.shape[1], 1)
        s2 = float(fit.scale)
        params = np.append(params, s2)
        cov = np.pad(cov, ((0, 1), (0, 1)))
        cov[-1, -1] = 2.0 * s2**2 / dof
        names.append(RESID_VAR)
    return params, cov, names


# ---------------------------------------------------------------------- Rubin's rules
@dataclass(frozen=True)
class Pooled:
    """Rubin's rules over ``M`` completed-data estimates ``Q`` (M, p) with variances ``U`` (M, p, p).

    Attributes
    ----------
    params, within, between, total, riv, df, fmi, lam : ndarray (p,)
        ``Qbar``, ``diag(Ubar)``, ``diag(B)``, ``diag(T)``, ``r``, ``nu``, the fraction of
        missing information (Rubin's, as R's mice reports it: ``2/(nu + 3)`` even when
        ``B = 0``) and ``lambda = (1 + 1/M) B / T``, the share of the variance due to the
        missing school effects.
    cov : ndarray (p, p)
        ``T = Ubar + (1 + 1/M) B``.
    """

    params: np.ndarray
    within: np.ndarray
    between: np.ndarray
    total: np.ndarray
    riv: np.ndarray
    df: np.ndarray
    fmi: np.ndarray
    lam: np.ndarray
    cov: np.ndarray


def rubin(Q: np.ndarray, U: np.ndarray, df_complete: float = np.inf) -> Pooled:
    r"""Pool completed-data estimates by Rubin's rules.

    .. math::

        T = \bar U + (1 + M^{-1}) B, \qquad r = \frac{(1 + M^{-1}) B}{\bar U}, \qquad
        \nu_{old} = (M - 1)(1 + r^{-1})^2, \qquad
        \mathrm{fmi} = \frac{r + 2/(\nu + 3)}{1 + r},

    with Barnard and Rubin's (1999) ``nu = (1/nu_old + 1/nu_obs)^-1``,
    ``nu_obs = (nu_com + 1)/(nu_com + 3) nu_com (1 - lambda)``, ``lambda = (1 + 1/M) B / T``,
    when the complete-data degrees of freedom ``nu_com`` are finite.

    Parameters
    ----------
    Q : ndarray (M, p)
    U : ndarray (M, p, p)
    df_complete : float
        ``nu_com`` (``inf`` for large-sample, z-based analyses).

    Examples
    --------
    >>> Q = np.array([[1.0], [1.2], [0.8], [1.1], [0.9]])
    >>> U = np.full((5, 1, 1), 0.04)
    >>> p = rubin(Q, U)
    >>> float(p.params[0]), round(float(p.between[0]), 4), round(float(p.total[0]), 4)
    (1.0, 0.025, 0.07)
    """
    M = Q.shape[0]
    qbar = Q.mean(axis=0)
    ubar = U.mean(axis=0)
    B = np.atleast_2d(np.cov(Q, rowvar=False, ddof=1))
    T = ubar + (1.0 + 1.0 / M) * B
    w, b, t = np.diag(ubar), np.diag(B), np.diag(T)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(w > 0, (1.0 + 1.0 / M) * b / w, np.inf)
        df_old = np.where(b > 0, (M - 1) * (1.0 + 1.0 / r) ** 2, np.inf)
        lam = np.where(t > 0, (1.0 + 1.0 / M) * b / t, 0.0)
        if np.isfinite(df_complete):
            df_obs = (df_complete + 1.0) / (df_complete + 3.0) * df_complete * (1.0 - lam)
            df = 1.0 / (1.0 / df_old + 1.0 / df_obs)
        else:
            df = df_old
        fmi = np.where(np.isfinite(df), (r + 2.0 / (df + 3.0)) / (1.0 + r), r / (1.0 + r))
    return Pooled(qbar, w, b, t, r, df, fmi, lam, T)


# ---------------------------------------------------------------------- results
def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers as text with four decimals; a non-finite number as an empty cell (never printed)."""
    return pd.DataFrame(
        [[f"{v:.4f}" if np.isfinite(v) else "" for v in row] for row in table.to_numpy(dtype=float)],
        index=table.index,
        columns=table.columns,
    )


@dataclass(frozen=True)
class Stage2Results:
    """The stage-2 model of a MELSM fit (:meth:`mlsml.MELSMResults.stage2`). Read-only.

    Attributes
    ----------
    method, family, formula : str
    params, bse : pandas.Series
        Stage-2 estimates and standard errors (``var(resid)``: the residual variance of the
        gaussian family; ordinal thresholds as statsmodels' ``OrderedModel`` names them).
    df : pandas.Series
        Degrees of freedom of the reference t distribution (``inf``: normal).
    fmi, riv : pandas.Series or None
        Fraction of missing information and relative increase in variance (``mi``).
    ndraws, n_failed : int or None
        Imputations used, and draws whose GLM fit failed (left out; ``mi``).
    nobs, ngroups : int
        Schools in the stage-2 model, and in the MELSM fit.
    stage1 : pandas.DataFrame or None
        ``joint``: the MELSM's parameters re-estimated with the outcome (estimate, std err),
        next to the two-stage fit's.
    llf : float
        ``joint``: the maximised joint log-likelihood (NaN for ``mi``).
    converged : bool
    message : str
    draws : pandas.DataFrame or None
        ``mi``: the estimates of every completed data set (one row per draw).
    """

    method: str
    family: str
    formula: str
    params: pd.Series
    bse: pd.Series
    df: pd.Series
    cov: pd.DataFrame = field(repr=False)
    fmi: pd.Series | None = None
    riv: pd.Series | None = None
    ndraws: int | None = None
    n_failed: int | None = None
    nobs: int = 0
    ngroups: int = 0
    stage1: pd.DataFrame | None = None
    llf: float = float("nan")
    converged: bool = True
    message: str = ""
    draws: pd.DataFrame | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tvalues(self) -> pd.Series:
        """``params / bse``."""
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided p-values from the t distribution with :attr:`df` degrees of freedom."""
        return pd.Series(2.0 * stats.t.sf(np.abs(self.tvalues.to_numpy()), self.df.to_numpy()), index=self.params.index)

    def cov_params(self) -> pd.DataFrame:
        """Covariance of the stage-2 estimates (``T`` of Rubin's rules for ``mi``)."""
        return self.cov

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Confidence intervals ``params +/- t_{df, 1 - alpha/2} bse``; ``var(resid)`` on the log scale.

        The gaussian family's residual variance gets the symmetric interval of its
        logarithm mapped back (:func:`mlsml.params.wald_intervals`), never a negative one.
        """
        crit = stats.t.ppf(1.0 - alpha / 2.0, self.df.to_numpy())
        lo, hi = wald_intervals(self.params.index, self.params.to_numpy(), self.bse.to_numpy(), crit)
        return pd.DataFrame({"lower": lo, "upper": hi}, index=self.params.index)

    def to_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """The parameter table: estimate, std err, t, p, interval (and df, fmi for ``mi``)."""
        ci = self.conf_int(alpha)
        out = pd.DataFrame(
            {
                "estimate": self.params,
                "std err": self.bse,
                "t": self.tvalues,
                "P>|t|": self.pvalues,
                f"[{alpha / 2:g}": ci["lower"],
                f"{1 - alpha / 2:g}]": ci["upper"],
            }
        )
        if self.method == "mi":
            out["df"] = self.df
            out["fmi"] = self.fmi
        return out

    def summary(self, alpha: float = 0.05):
        """A statsmodels ``Summary`` (``.as_text()``, ``.as_html()``)."""
        smry = summary2.Summary()
        title = "Stage-2 model: " + ("multiple imputation from the exact posterior" if self.method == "mi" else "joint ML")
        smry.add_title(title)
        head = {
            "Formula:": self.formula,
            "Family:": self.family,
            "Method:": self.method,
            "Schools used:": f"{self.nobs} of {self.ngroups}",
        }
        if self.info.get("multilevel"):
            head["Level-1 rows:"] = f"{self.info['level1_rows']} (random intercept per school)"
        if self.method == "mi":
            head["Imputations:"] = f"{self.ndraws}" + (f" ({self.n_failed} failed, left out)" if self.n_failed else "")
            head["Stage-1 uncertainty:"] = "drawn" if self.info.get("stage1_uncertainty") else "ignored (EB draws)"
        else:
            head["Log-likelihood:"] = f"{self.llf:.4f}" if np.isfinite(self.llf) else "NaN (UNRELIABLE)"
            head["Quadrature:"] = self.info.get("quadrature", "")
            head["Converged:"] = "Yes" if self.converged else "NO"
        smry.add_dict(head, ncols=2)
        table = self.to_frame(alpha)
        smry.add_df(_formatted(table))
        if self.stage1 is not None:
            smry.add_df(_formatted(self.stage1))
            smry.add_text("Second table: the MELSM's parameters of the joint fit next to the two-stage (MELSM alone) fit.")
        if not self.converged:
            smry.add_text(f"WARNING: the joint fit did NOT converge: {self.message}")
        return smry

    def __repr__(self) -> str:
        return f"<Stage2Results method={self.method!r} family={self.family!r} schools={self.nobs}>"


# ---------------------------------------------------------------------- the two methods
#: A draw of the MELSM's parameters whose posterior cannot be tabulated (a nearly singular
#: ``Sigma``) is replaced by a new draw, at most this many times per imputation.
MAX_REDRAWS = 20


def _stage1_sampler(res, rng, stage1_uncertainty: bool):
    """A function giving one MELSM parameter draw ``theta_m ~ N(theta_hat, cov)`` (optimiser scale), or None.

    None (draws at the estimates, with a warning) when the fit has no covariance or is on the
    boundary of the parameter space: there the normal approximation of the estimates' distribution
    puts mass beyond the boundary (a variance of zero has no symmetric neighbourhood).
    """
    if not stage1_uncertainty:
        return None
    cov = res.cov_theta()
    why = None
    if cov is None:
        why = "has no covariance of its estimates (information not positive definite)"
    elif res.singular:
        why = f"is on the boundary of the parameter space ({'; '.join(res.singular_reasons()) or 'singular'})"
    if why is not None:
        warn(
            f"stage1_uncertainty=True draws the MELSM's parameters from their asymptotic normal distribution, but the fit "
            f"{why}: the imputations are drawn at the estimates (as with stage1_uncertainty=False)",
            ConvergenceWarning,
        )
        return None
    cov = 0.5 * (np.asarray(cov) + np.asarray(cov).T)
    theta = np.asarray(res.theta, dtype=float)
    return lambda: rng.multivariate_normal(theta, cov, method="eigh")


def _proper_draw(res, sampler, mean: np.ndarray, cov: np.ndarray, rng) -> np.ndarray:
    """One imputation of every school's effects under a draw of the MELSM's parameters, shape ``(1, J, d)``."""
    for _ in range(MAX_REDRAWS):
        try:
            with np.errstate(all="ignore"):
                b = _posterior_draws(res, sampler(), mean, cov, 1, rng)
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(b)):
            return b
    raise DataError(
        f"{MAX_REDRAWS} draws of the MELSM's parameters in a row gave a posterior that cannot be tabulated; "
        "use stage1_uncertainty=False"
    )


def _imputations(res, rng, mean: np.ndarray, cov: np.ndarray, ndraws: int, stage1_uncertainty: bool):
    """``(draws, proper)``: ``ndraws`` imputations of every school's effects ``(ndraws, J, d)``, and whether
    each drew the MELSM's parameters first."""
    sampler = _stage1_sampler(res, rng, stage1_uncertainty)
    try:
        if sampler is None:
            draws = _posterior_draws(res, np.asarray(res.theta, dtype=float), mean, cov, ndraws, rng)
        else:
            draws = np.concatenate([_proper_draw(res, sampler, mean, cov, rng) for _ in range(ndraws)], axis=0)
    except ModelSpecError as exc:  # a model class without exact posterior draws (several scale effects)
        raise ModelSpecError(f"stage 2 with method='mi' needs exact posterior draws: {exc}. Use method='joint'") from exc
    return draws, sampler is not None


def _fit_imputations(ndraws: int, fit_one, what: str) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Fit every imputed data set: ``fit_one(m) -> (params, cov, names)``; the estimates ``Q``
    (M, p), their covariances ``U`` (M, p, p) and the names, for Rubin's rules.

    A fit that raises or gives non-finite numbers is left out with a warning; more than
    :data:`MAX_FAILED_SHARE` of them, or fewer than :data:`MIN_NDRAWS` left, is an error.
    """
    Q, U, failed, names, last_error = [], [], 0, None, None
    for m in range(ndraws):
        try:
            with np.errstate(all="ignore"):
                params, cv, names = fit_one(m)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
            failed, last_error = failed + 1, exc
            continue
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(cv))):
            failed += 1
            continue
        Q.append(params)
        U.append(cv)
    if failed > MAX_FAILED_SHARE * ndraws or len(Q) < MIN_NDRAWS:
        why = f" (last error: {last_error})" if last_error is not None else ""
        raise DataError(f"the {what} fit failed on {failed} of {ndraws} imputed data sets{why}")
    if failed:
        warn(f"the {what} fit failed on {failed} of {ndraws} imputed data sets; they are left out", ConvergenceWarning)
    return np.asarray(Q), np.asarray(U), names


def fit_mi(res, sd: SchoolData, formula: str, family: str, ndraws: int, seed, stage1_uncertainty: bool) -> Stage2Results:
    """``method="mi"``: Rubin's rules over GLM fits to exact posterior draws (module docstring)."""
    rng = np.random.default_rng(seed)
    mean, cov = school_moments(res)
    y0, X0 = _design(sd, formula, family, mean)
    _check_response(y0, family, sd.response)
    _check_columns(X0.to_numpy(dtype=float), [str(c) for c in X0.columns], "the stage-2 design")
    draws, proper = _imputations(res, rng, mean, cov, ndraws, stage1_uncertainty)
    Q, U, names = _fit_imputations(ndraws, lambda m: _fit_glm(*_design(sd, formula, family, draws[m]), family), f"stage-2 {family}")
    n = int(sd.observed.sum())
    p_mean = X0.shape[1]
    pooled = rubin(Q, U, df_complete=float(max(n - p_mean, 1)) if family == "gaussian" else np.inf)
    idx = pd.Index(names, name="name")
    df = pd.Series(pooled.df, index=idx)
    if family == "gaussian":  # the residual variance: a large-sample (z) interval
        df.iloc[-1] = np.inf
    return Stage2Results(
        method="mi",
        family=family,
        formula=formula,
        params=pd.Series(pooled.params, index=idx, name="estimate"),
        bse=pd.Series(np.sqrt(pooled.total), index=idx, name="std err"),
        df=df,
        cov=pd.DataFrame(pooled.cov, index=idx, columns=idx),
        fmi=pd.Series(pooled.fmi, index=idx, name="fmi"),
        riv=pd.Series(pooled.riv, index=idx, name="riv"),
        ndraws=len(Q),
        n_failed=ndraws - len(Q),
        nobs=n,
        ngroups=res.ngroups,
        draws=pd.DataFrame(Q, columns=idx),
        info={
            "stage1_uncertainty": proper,
            "within": pooled.within,
            "between": pooled.between,
            "lambda": pooled.lam,
        },
    )


# ---------------------------------------------------------------------- the multilevel second stage
@dataclass(frozen=True)
class Level1Data:
    """The data of a multilevel stage 2 (``multilevel=True``): one row per level-1 observation.

    Attributes
    ----------
    frame : pandas.DataFrame
        The rows of the fit's schools with the outcome and every covariate the formula uses
        (rows with a missing value left out, counted in a warning).
    school : ndarray (n,) of int
        Each row's school, as its position in the fit's school order.
    response, groups : str
        The outcome column and the fit's grouping column.
    effects : tuple of str
        Names of the school effects the formula may use.
    """

    frame: pd.DataFrame
    school: np.ndarray
    response: str
    groups: str
    effects: tuple[str, ...]


def level1_data_of(res, formula: str, data, level1_summaries: Mapping | None, level1_data, missing: str) -> Level1Data:
    """Collect the level-1 rows of a multilevel stage 2, with the school effects' positions."""
    spec = res.model.formula_spec
    labels = pd.Index(res.model.design.group_labels)
    effects = res.model.design.layout.re_names
    if not isinstance(formula, str) or "~" not in formula or not formula.split("~", 1)[0].strip():
        raise ModelSpecError(f"the stage-2 formula must be a two-sided formula string such as 'Y ~ u0 + v', not {formula!r}")
    if missing not in ("drop", "raise"):
        raise ModelSpecError(f"missing must be 'drop' or 'raise', not {describe_value(missing)}")
    if not isinstance(data, pd.DataFrame):
        raise DataError(
            f"multilevel=True needs data= with one row per level-1 observation (a pandas DataFrame), not {describe_value(data)}"
        )
    if spec.groups not in data.columns:
        raise DataError(f"the stage-2 data has no grouping column {spec.groups!r} (the fit's groups) to match schools")
    summaries = dict(level1_summaries or {})
    clash = [c for c in effects if c in data.columns or c in summaries]
    if clash:
        raise ModelSpecError(
            f"{clash[0]!r} names a school effect of the fit, but it is also a column of the stage-2 data "
            "(or a level-1 summary): rename that column"
        )
    response = formula.split("~", 1)[0].strip()
    if response in effects:
        raise ModelSpecError(f"the stage-2 response {response!r} is a school effect; it must be an outcome")
    frame = data.reset_index(drop=True)
    if summaries:
        per_school = _level1_summaries(res, summaries, level1_data)
        frame = frame.assign(**{n: frame[spec.groups].map(per_school[n]).to_numpy() for n in per_school.columns})
    used = [c for c in formula_columns(formula, frame) if c != spec.groups]
    known = frame[spec.groups].isin(labels).to_numpy()
    if not known.all():
        first = frame.loc[~known, spec.groups].iloc[0]
        first = first.item() if isinstance(first, np.generic) else first  # 76.0, not np.float64(76.0)
        warn(
            f"{int((~known).sum())} stage-2 row(s) belong to schools that are not in the fit (e.g. {first!r}); they are ignored",
            MissingDataWarning,
        )
        frame = frame.loc[known]
    na = frame[used].isna()
    bad = na.any(axis=1).to_numpy()
    if bad.any():
        desc = ", ".join(f"{c!r}: {int(na[c].sum())}" for c in used if na[c].any())
        msg = f"{int(bad.sum())} of {len(frame)} stage-2 rows have missing values and are left out ({desc})"
        if missing == "raise":
            raise DataError(msg)
        warn(msg, MissingDataWarning)
        frame = frame.loc[~bad]
    frame = frame.reset_index(drop=True)
    school = labels.get_indexer(frame[spec.groups])
    if np.unique(school).size < 3:
        raise DataError(f"only {np.unique(school).size} schools have stage-2 rows; a multilevel stage 2 needs more")
    if frame.groupby(spec.groups, sort=False)[response].nunique().max() <= 1:
        raise DataError(
            f"the stage-2 outcome {response!r} is constant within every school: it is a school-level outcome, "
            "so use the single-level stage 2 (multilevel=False)"
        )
    return Level1Data(frame, school, response, spec.groups, effects)


def _design_level1(ld: Level1Data, formula: str, effect_values: np.ndarray, family: str = "gaussian"):
    """Response and design of the level-1 rows with each school's effects at ``effect_values`` (J, d)."""
    frame = ld.frame.copy()
    for i, name in enumerate(ld.effects):
        frame[name] = effect_values[ld.school, i]
    try:
        y, X = patsy.dmatrices(formula, frame, eval_env=0, NA_action="raise", return_type="dataframe")
    except Exception as exc:  # patsy raises many types
        raise ModelSpecError(f"could not evaluate the stage-2 formula {formula!r}: {exc}") from exc
    if y.shape[1] != 1:
        raise DataError(f"the stage-2 response {ld.response!r} must be one numeric column (got {y.shape[1]} columns)")
    if family == "ordinal" and "Intercept" in X.columns:  # the thresholds take its place
        X = X.drop(columns="Intercept")
    return y.iloc[:, 0].to_numpy(dtype=float), X


def random_intercept_cov(X: np.ndarray, school: np.ndarray, tau2: float, sigma2: float) -> np.ndarray:
    r"""Inverse expected information of the ML estimates of a gaussian random-intercept model.

    For ``y_j = X_j beta + a_j 1 + e_j``, ``a_j ~ N(0, tau^2)``, ``e_j ~ N(0, sigma^2 I)``,
    ``V_j = sigma^2 I + tau^2 1 1'`` and ``c_j = sigma^2 + n_j tau^2``:

    .. math::

        I_{\beta\beta} = \sum_j X_j' V_j^{-1} X_j
                       = \sigma^{-2} \sum_j \Big(X_j'X_j - \frac{\tau^2}{c_j} s_j s_j'\Big),
        \quad s_j = X_j' 1,

        I_{\tau\tau} = \tfrac12 \sum_j \frac{n_j^2}{c_j^2}, \quad
        I_{\tau\sigma} = \tfrac12 \sum_j \frac{n_j}{c_j^2}, \quad
        I_{\sigma\sigma} = \tfrac12 \sum_j \Big(\frac{n_j - 1}{\sigma^4} + \frac{1}{c_j^2}\Big),

    and ``beta`` orthogonal to ``(tau^2, sigma^2)``: ``tr(V^{-1} dV_a V^{-1} dV_b) / 2`` with
    ``dV = 1 1'`` and ``I``. This is the Fisher scoring information MixWILD's ``mixreg``
    reports its standard errors from. Returns the covariance of ``(beta, tau^2, sigma^2)``.
    """
    J = int(school.max()) + 1
    n = np.bincount(school, minlength=J).astype(float)
    S = np.zeros((J, X.shape[1]))
    np.add.at(S, school, X)
    c = sigma2 + n * tau2
    keep = n > 0
    info_b = (X.T @ X - (S[keep].T * (tau2 / c[keep])) @ S[keep]) / sigma2
    n, c = n[keep], c[keep]
    info_v = 0.5 * np.array(
        [
            [np.sum(n**2 / c**2), np.sum(n / c**2)],
            [np.sum(n / c**2), np.sum((n - 1.0) / sigma2**2 + 1.0 / c**2)],
        ]
    )
    p = X.shape[1]
    cov = np.zeros((p + 2, p + 2))
    cov[:p, :p] = np.linalg.inv(info_b)
    cov[p:, p:] = np.linalg.inv(info_v)
    return cov


#: Bracket of ``log(tau^2 / sigma^2)`` searched by :func:`fit_random_intercept` (``rho = 0`` is checked apart).
LOG_RHO_BOUNDS = (-23.0, 16.0)
#: Tolerance on ``log(tau^2 / sigma^2)`` of the profile-likelihood search.
LOG_RHO_XTOL = 1e-9


def _profile(rho: float, XtX, Xty, yty, S, t, n, N):
    """``(llf, beta, sigma2)`` of the random-intercept model at ``rho = tau^2 / sigma^2``."""
    w = rho / (1.0 + n * rho)
    A = XtX - (S.T * w) @ S
    b = Xty - S.T @ (w * t)
    beta = np.linalg.solve(A, b)
    rss = yty - np.sum(w * t**2) - beta @ b
    sigma2 = rss / N
    llf = -0.5 * N * (np.log(2.0 * np.pi * sigma2) + 1.0) - 0.5 * np.sum(np.log1p(n * rho))
    return llf, beta, sigma2


def fit_random_intercept(y: np.ndarray, X: pd.DataFrame, school: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Exact ML fit of a gaussian random-intercept model by profiling out ``beta`` and ``sigma^2``.

    .. math::

        y_{ij} = x_{ij}'\beta + a_j + e_{ij}, \quad a_j \sim N(0, \tau^2), \quad
        e_{ij} \sim N(0, \sigma^2);

    for ``rho = tau^2 / sigma^2``, ``W_j^{-1} = I - w_j 1 1'`` with ``w_j = rho / (1 + n_j rho)``,
    ``beta(rho)`` is generalised least squares, ``sigma^2(rho) = RSS(rho) / N`` and

    .. math::

        \ell_p(\rho) = -\tfrac N2 \big(\log 2\pi\sigma^2(\rho) + 1\big)
                       - \tfrac12 \sum_j \log(1 + n_j \rho),

    maximised over ``log rho`` by bounded Brent search (the boundary ``rho = 0`` compared
    apart). Every term uses the per-school sums ``s_j = X_j'1``, ``t_j = y_j'1``, so a fit costs
    ``O(N p^2)``. Statsmodels' ``MixedLM(reml=False)`` maximises the same likelihood (the tests
    check one against the other and against mlsml's engine with ``random_scale=False``); its
    optimiser fails on some of MixWILD's outcomes, this search does not.

    Returns ``(params, cov, llf)``: ``(beta, tau^2, sigma^2)``, their covariance from
    :func:`random_intercept_cov` and the maximised log-likelihood.
    """
    Xa = X.to_numpy(dtype=float) if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=float)
    J = int(school.max()) + 1
    n = np.bincount(school, minlength=J).astype(float)
    S = np.zeros((J, Xa.shape[1]))
    np.add.at(S, school, Xa)
    t = np.bincount(school, weights=y, minlength=J)
    keep = n > 0
    S, t, n = S[keep], t[keep], n[keep]
    args = (Xa.T @ Xa, Xa.T @ y, float(y @ y), S, t, n, float(y.size))
    opt = scipy_optimize.minimize_scalar(
        lambda eta: -_profile(np.exp(eta), *args)[0], bounds=LOG_RHO_BOUNDS, method="bounded", options={"xatol": LOG_RHO_XTOL}
    )
    rho = float(np.exp(opt.x))
    llf, beta, sigma2 = _profile(rho, *args)
    llf0, beta0, sigma20 = _profile(0.0, *args)
    if llf0 >= llf:  # the boundary: no between-school variance
        rho, llf, beta, sigma2 = 0.0, llf0, beta0, sigma20
    if not (np.isfinite(llf) and sigma2 > 0):
        raise np.linalg.LinAlgError("the random-intercept fit has no finite likelihood")
    tau2 = rho * sigma2
    params = np.concatenate([beta, [tau2, sigma2]])
    return params, random_intercept_cov(Xa, school, tau2, sigma2), float(llf)


# ---------------------------------------------------------------------- the non-gaussian multilevel second stage
#: Gauss-Hermite points over the subject intercept of :func:`fit_random_intercept_glmm` (adaptive, one dimension).
GLMM_NAGQ = 21
#: Largest number of re-adaptations of the nodes in :func:`fit_random_intercept_glmm`.
GLMM_MAX_ADAPT = 20
#: The nodes are adapted again until the log-likelihood changes by less than this.
GLMM_LLF_TOL = 1e-9
#: Newton steps of the conditional modes (a log-concave posterior: a few suffice).
GLMM_MODE_ITER = 100
#: Largest Newton step of a conditional mode (standardised intercept units).
GLMM_MODE_STEP = 2.0
#: Convergence of a conditional mode (standardised intercept units).
GLMM_MODE_TOL = 1e-10
#: Gradient tolerance of the optimiser at fixed nodes.
GLMM_GTOL = 1e-8
#: Start of the intercept's standard deviation ``sigma_a``.
GLMM_SIGMA_START = 0.5


@dataclass(frozen=True)
class RandomInterceptGLMM:
    r"""A random-intercept GLMM of a level-1 outcome and its adaptive Gauss-Hermite likelihood.

    Row ``i`` of school ``j`` has the linear predictor ``eta_ij = x_ij'beta + sigma_a theta_j``
    with ``theta_j ~ N(0, 1)`` (MIXOR's and MIXPREG's standardised random effect; the random
    intercept ``a_j = sigma_a theta_j`` has variance ``sigma_a^2``), and the conditional density
    of :class:`mlsml.integrand.SchoolOutcome` (one row per observation, the intercept's column
    ``1 * theta`` with coefficient ``sigma_a``):

    .. math::

        \log f(y_{ij} \mid \theta_j) =
        \begin{cases}
        \ln\{F(\tau_{y} - \eta_{ij}) - F(\tau_{y-1} - \eta_{ij})\} & \text{ordinal (cumulative logit, no intercept in } x) \\
        y\,\eta_{ij} - e^{\eta_{ij}} - \ln y! & \text{poisson} \\
        \eta_{ij y} - \ln(1 + \sum_{k \ge 1} e^{\eta_{ijk}}) & \text{nominal,}
        \end{cases}

    the nominal family with one predictor per category ``k >= 1``,
    ``eta_ijk = x_ij'beta_k + sigma_k theta_j`` (MIXNO's category-specific loading of one
    random intercept; ``eta_ij0 = 0``). The likelihood of school ``j`` is

    .. math::

        L_j = \int \prod_i f(y_{ij} \mid \theta)\, \phi(\theta)\, d\theta
            \approx s_j \sum_k w_k e^{z_k^2/2} \prod_i f(y_{ij} \mid m_j + s_j z_k)\, \phi(m_j + s_j z_k),

    with ``m_j`` the mode of the integrand and ``s_j = (-h_j'')^{-1/2}`` its curvature
    (adaptive Gauss-Hermite, :func:`mlsml.quadrature.gauss_hermite_rule`).

    Attributes
    ----------
    outcome : SchoolOutcome
        The rows (sorted by school) as the outcome term: the design columns, then the intercept's.
    school : ndarray (n,) of int
        Each row's school ``0..J-1`` (sorted).
    starts : ndarray (J + 1,) of int
        First row of each school, then ``n``.
    nagq : int
    """

    outcome: SchoolOutcome
    school: np.ndarray
    starts: np.ndarray
    nagq: int

    @property
    def n_schools(self) -> int:
        """``J``."""
        return int(self.starts.size - 1)

    def modes(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Conditional modes ``m_j`` and scales ``s_j`` of each school's integrand (Newton, numpy)."""
        J = self.n_schools
        m = np.zeros(J)
        for _ in range(GLMM_MODE_ITER):
            _, g, H, _ = self.outcome.point_derivs(phi, m[self.school][:, None])
            G = np.bincount(self.school, weights=g[:, 0], minlength=J) - m
            Hs = np.bincount(self.school, weights=H[:, 0, 0], minlength=J) - 1.0
            step = np.clip(-G / Hs, -GLMM_MODE_STEP, GLMM_MODE_STEP)
            m = m + step
            if np.max(np.abs(step)) < GLMM_MODE_TOL:
                break
        _, _, H, _ = self.outcome.point_derivs(phi, m[self.school][:, None])
        Hs = np.bincount(self.school, weights=H[:, 0, 0], minlength=J) - 1.0
        return m, 1.0 / np.sqrt(-Hs)

    def loglike(self, phi, m: np.ndarray, s: np.ndarray):
        """The adaptive Gauss-Hermite log-likelihood at nodes centred at ``m`` with scales ``s`` (autograd in ``phi``)."""
        rule = gauss_hermite_rule(1, self.nagq)
        z = rule.points[:, 0]
        theta = m[:, None] + s[:, None] * z[None, :]  # (J, K)
        ll = self.outcome.log_density(phi, theta[self.school][:, :, None])  # (n, K)
        cs = anp.concatenate([anp.zeros((1, z.size)), anp.cumsum(ll, axis=0)], axis=0)
        per_school = cs[self.starts[1:]] - cs[self.starts[:-1]]  # (J, K)
        terms = per_school - 0.5 * theta**2 + rule.logw[None, :]
        top = np.max(getval(terms), axis=1, keepdims=True)
        lj = anp.log(anp.sum(anp.exp(terms - top), axis=1)) + top[:, 0] + np.log(s) - 0.5 * LOG2PI
        return anp.sum(lj)


def glmm_of(y: np.ndarray, X: pd.DataFrame, school: np.ndarray, family: str, nagq: int = GLMM_NAGQ) -> RandomInterceptGLMM:
    """The :class:`RandomInterceptGLMM` of the rows ``(y, X)`` in schools ``school`` (codes ``0..J-1``)."""
    order = np.argsort(school, kind="stable")
    school = np.unique(school[order], return_inverse=True)[1]
    Xa = X.to_numpy(dtype=float)[order] if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=float)[order]
    y = np.asarray(y, dtype=float)[order]
    n_cat = 0
    if family in ("ordinal", "nominal"):
        levels = _levels(y)
        y, n_cat = np.searchsorted(levels, y).astype(float), levels.size
    p = Xa.shape[1]
    A = np.column_stack([Xa, np.ones(y.size)])
    names = tuple(str(c) for c in (X.columns if isinstance(X, pd.DataFrame) else range(p))) + ("sigma_a",)
    outcome = SchoolOutcome(family, y, A, ((),) * p + ((0,),), np.ones(y.size, dtype=bool), names, n_cat)
    starts = np.concatenate([np.searchsorted(school, np.arange(school.max() + 1)), [y.size]])
    return RandomInterceptGLMM(outcome, school, starts, int(nagq))


def _glmm_start(y: np.ndarray, X: pd.DataFrame, family: str) -> np.ndarray:
    """Start: the single-level GLM, ``sigma_a`` at :data:`GLMM_SIGMA_START` (the nominal family: in each block)."""
    params, _, _ = _fit_glm(y, X, family, natural=False)
    p = X.shape[1]
    if family == "nominal":
        blocks = params.reshape(-1, p)
        return np.column_stack([blocks, np.full(blocks.shape[0], GLMM_SIGMA_START)]).ravel()
    return np.concatenate([params[:p], [GLMM_SIGMA_START], params[p:]])


def _glmm_natural(phi: np.ndarray, p: int, family: str) -> tuple[np.ndarray, np.ndarray]:
    """``(natural, jacobian)``: ordinal thresholds on their scale, ``sigma_a`` as the variance ``sigma_a^2``, moved last."""
    if family == "nominal":  # blocks (beta_k, sigma_k): the coefficients category-major, then the sigma_k
        c = p + 1
        K1 = phi.size // c
        coef = [k * c + i for k in range(K1) for i in range(p)]
        sig = [k * c + p for k in range(K1)]
        perm = np.array(coef + sig)
        jac = np.eye(phi.size)[perm]
        return phi[perm], jac
    rest = np.concatenate([phi[:p], phi[p + 1 :]])
    nat, jr = _ordinal_jacobian(rest, p) if family == "ordinal" else (rest, np.eye(rest.size))
    k = phi.size
    jac = np.zeros((k, k))
    cols = [i for i in range(k) if i != p]
    jac[: k - 1, cols] = jr
    jac[k - 1, p] = 2.0 * phi[p]
    return np.append(nat, phi[p] ** 2), jac


def fit_random_intercept_glmm(
    y: np.ndarray, X: pd.DataFrame, school: np.ndarray, family: str, nagq: int = GLMM_NAGQ
) -> tuple[np.ndarray, np.ndarray, float]:
    r"""ML fit of a random-intercept GLMM (:class:`RandomInterceptGLMM`) by adaptive Gauss-Hermite quadrature.

    At fixed nodes (``m_j``, ``s_j``) the log-likelihood is maximised by a trust-region Newton
    method with autograd's gradient and Hessian; the nodes are then placed again at the new
    estimates, until the maximised log-likelihood changes by less than :data:`GLMM_LLF_TOL`.
    The covariance is the inverse of the observed information (the negative Hessian) at the
    last nodes, mapped to the reported scale by the delta method:

    .. math::

        \hat\psi = g(\hat\phi), \qquad \widehat{\mathrm{cov}}(\hat\psi) = G\, (-\nabla^2\ell)^{-1} G', \quad
        G = \partial g / \partial \phi',

    with ``g`` the ordinal thresholds on their own scale (:func:`ordinal_natural`) and
    ``sigma_a -> sigma_a^2`` (the variance of the random intercept, reported last; the nominal
    family's ``sigma_k`` are reported as they are, after the coefficients, with the first
    made positive). ``sigma_a`` is identified up to its sign (``theta -> -theta``); it is
    reported non-negative.

    Returns ``(params, cov, llf)``.
    """
    model = glmm_of(y, X, school, family, nagq)
    p = X.shape[1]
    phi = _glmm_start(np.asarray(y, dtype=float), X, family)
    grad = autograd.grad(model.loglike)
    hess = autograd.hessian(model.loglike)
    m, s = model.modes(phi)
    prev = -np.inf
    for _ in range(GLMM_MAX_ADAPT):
        opt = scipy_optimize.minimize(
            lambda ph, m=m, s=s: -model.loglike(ph, m, s),
            phi,
            jac=lambda ph, m=m, s=s: -grad(ph, m, s),
            hess=lambda ph, m=m, s=s: -hess(ph, m, s),
            method="trust-exact",
            options={"gtol": GLMM_GTOL},
        )
        phi = opt.x
        m, s = model.modes(phi)
        llf = float(model.loglike(phi, m, s))
        if not np.isfinite(llf):
            raise np.linalg.LinAlgError("the random-intercept GLMM has no finite likelihood")
        if abs(llf - prev) < GLMM_LLF_TOL:
            break
        prev = llf
    else:
        raise np.linalg.LinAlgError("the adaptive quadrature of the random-intercept GLMM did not settle")
    info = -np.asarray(hess(phi, m, s), dtype=float)
    info = 0.5 * (info + info.T)
    if np.max(np.abs(grad(phi, m, s))) > np.sqrt(GLMM_GTOL) * max(1.0, abs(llf)):
        raise np.linalg.LinAlgError("the random-intercept GLMM fit did not converge")
    np.linalg.cholesky(info)  # LinAlgError when the information is not positive definite
    cov = np.linalg.inv(info)
    sig = [k * (p + 1) + p for k in range(phi.size // (p + 1))] if family == "nominal" else [p]
    if phi[sig[0]] < 0:  # theta -> -theta
        flip = np.ones(phi.size)
        flip[sig] = -1.0
        phi, cov = phi * flip, cov * np.outer(flip, flip)
    nat, jac = _glmm_natural(phi, p, family)
    return nat, jac @ cov @ jac.T, llf


def _multilevel_names(X0: pd.DataFrame, y: np.ndarray, family: str, groups: str) -> list[str]:
    """Names of the multilevel stage-2 parameters, in the order of the fit's ``params``."""
    cols = [str(c) for c in X0.columns]
    var = GROUP_VAR.format(groups=groups)
    if family == "gaussian":
        return cols + [var, RESID_VAR]
    if family == "ordinal":
        return cols + threshold_names(_levels(y)) + [var]
    if family == "nominal":
        levels = _levels(y)
        return nominal_names(cols, levels) + [f"{GROUP_SD.format(groups=groups)}[{lev:g}]" for lev in levels[1:]]
    return cols + [var]


def fit_mi_multilevel(res, ld: Level1Data, formula: str, family: str, ndraws: int, seed, stage1_uncertainty: bool) -> Stage2Results:
    r"""``multilevel=True``: Rubin's rules over random-intercept fits to the level-1 rows (module docstring).

    The gaussian family by :func:`fit_random_intercept` (exact), the others by
    :func:`fit_random_intercept_glmm` (adaptive Gauss-Hermite quadrature over the intercept).
    """
    rng = np.random.default_rng(seed)
    mean, cov = school_moments(res)
    y0, X0 = _design_level1(ld, formula, mean, family)
    _check_response(y0, family, ld.response)
    _check_columns(X0.to_numpy(dtype=float), [str(c) for c in X0.columns], "the stage-2 design")
    draws, proper = _imputations(res, rng, mean, cov, ndraws, stage1_uncertainty)
    school = np.unique(ld.school, return_inverse=True)[1]

    def fit_one(m: int):
        y, X = _design_level1(ld, formula, draws[m], family)
        if family == "gaussian":
            return fit_random_intercept(y, X, school)
        return fit_random_intercept_glmm(y, X, school, family)

    Q, U, _ = _fit_imputations(ndraws, fit_one, "multilevel stage-2")
    pooled = rubin(Q, U)
    idx = pd.Index(_multilevel_names(X0, y0, family, ld.groups), name="name")
    return Stage2Results(
        method="mi",
        family=family,
        formula=formula,
        params=pd.Series(pooled.params, index=idx, name="estimate"),
        bse=pd.Series(np.sqrt(pooled.total), index=idx, name="std err"),
        df=pd.Series(pooled.df, index=idx),
        cov=pd.DataFrame(pooled.cov, index=idx, columns=idx),
        fmi=pd.Series(pooled.fmi, index=idx, name="fmi"),
        riv=pd.Series(pooled.riv, index=idx, name="riv"),
        ndraws=len(Q),
        n_failed=ndraws - len(Q),
        nobs=int(np.unique(school).size),
        ngroups=res.ngroups,
        draws=pd.DataFrame(Q, columns=idx),
        info={
            "stage1_uncertainty": proper,
            "within": pooled.within,
            "between": pooled.between,
            "lambda": pooled.lam,
            "multilevel": True,
            "level1_rows": int(ld.frame.shape[0]),
        },
    )


def school_outcome(sd: SchoolData, formula: str, family: str) -> SchoolOutcome:
    r"""The joint model's outcome term: design columns as data part times school effects.

    Every column of the stage-2 design is multilinear in the school effects when they enter
    as plain factors: ``A_jc prod_{a in S_c} b_a``, with ``A`` the design evaluated with
    every effect set to 1 and ``S_c`` the effects among its term's factors.
    """
    J = sd.frame.shape[0]
    y0, X = _design(sd, formula, family, np.ones((J, len(sd.effects))))
    _check_response(y0, family, sd.response)
    info = X.attrs.get("design_info", getattr(X, "design_info", None))
    effect_sets: list[tuple[int, ...]] = []
    for term, sl in info.term_slices.items():
        S = []
        for factor in term.factors:
            code = factor.name()
            if code in sd.effects:
                S.append(sd.effects.index(code))
            elif any(re.search(rf"(?<![\w.]){re.escape(e)}(?![\w])", code) for e in sd.effects):
                raise ModelSpecError(
                    f"the joint stage-2 model needs the school effects as plain factors of the formula "
                    f"(u0, v, u0:v, u0:x); {code!r} transforms one. Use method='mi' for such terms"
                )
        effect_sets += [tuple(S)] * (sl.stop - sl.start)
    kept = [i for i, c in enumerate(info.column_names) if c in X.columns]  # the ordinal family has no Intercept
    effect_sets = [effect_sets[i] for i in kept]
    A = np.zeros((J, X.shape[1]))
    A[sd.observed] = X.to_numpy(dtype=float)
    y = np.zeros(J)
    n_cat = 0
    if family in ("ordinal", "nominal"):  # the categories coded 0..K-1
        levels = _levels(y0)
        y0, n_cat = np.searchsorted(levels, y0).astype(float), levels.size
    y[sd.observed] = y0
    names = tuple(str(c) for c in X.columns)
    return SchoolOutcome(family, y, A, tuple(effect_sets), sd.observed.copy(), names, n_cat)


def _joint_start(res, sd: SchoolData, formula: str, family: str, outcome: SchoolOutcome) -> np.ndarray:
    """Start of the joint fit: the MELSM's estimates and the stage-2 GLM at the posterior means."""
    mean, _ = school_moments(res)
    y, X = _design(sd, formula, family, mean)
    params, _, _ = _fit_glm(y, X, family, natural=False)
    if family == "gaussian":
        params = np.append(params[:-1], np.log(max(params[-1], 1e-8)))
    return np.concatenate([np.asarray(res.theta, dtype=float), params])


def fit_joint(res, sd: SchoolData, formula: str, family: str, nagq: int | None) -> Stage2Results:
    """``method="joint"``: the one-stage model by ML with adaptive quadrature (module docstring)."""
    if family not in JOINT_FAMILIES:
        raise ModelSpecError(
            f"method='joint' supports the families {', '.join(JOINT_FAMILIES)}; for family={family!r} use method='mi'"
        )
    lay = res.layout
    outcome = school_outcome(sd, formula, family)
    integrand = JointIntegrand(res.likelihood.integrand, outcome)
    nagq = default_nagq(lay.d) if nagq is None else int(nagq)
    lik = Likelihood(res.model.design, integrand, QuadratureSpec("product", nagq))
    start = _joint_start(res, sd, formula, family, outcome)
    with np.errstate(all="ignore"):
        opt = maximize(lik, replace(res.options, start=start, max_time=None), standardise=False)
    n1 = lay.n_params
    theta = np.asarray(opt.theta, dtype=float)
    H = -0.5 * (opt.hessian + opt.hessian.T)
    try:
        np.linalg.cholesky(H)
        cov_theta = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        cov_theta = np.full(H.shape, np.nan)
    # natural scale: the MELSM's contract, the coefficients, sigma^2 = exp(ln sigma^2)
    jac = np.zeros((theta.size, theta.size))
    jac[:n1, :n1] = lay.natural_jacobian(theta[:n1])
    phi = theta[n1:].copy()
    jac[n1:, n1:] = np.eye(phi.size)
    names = list(outcome.names)
    if family == "gaussian":
        phi[-1] = np.exp(phi[-1])
        jac[-1, -1] = phi[-1]
        names.append(RESID_VAR)
    elif family == "ordinal":  # the thresholds on their own scale
        phi, jac[n1:, n1:] = _ordinal_jacobian(phi, len(outcome.names))
        names += threshold_names(_levels(outcome.y[outcome.observed]))
    elif family == "nominal":  # the coefficients of category k against the first, one block per category
        names = nominal_names(outcome.names, _levels(_design(sd, formula, family, np.zeros((sd.frame.shape[0], len(sd.effects))))[0]))
    cov_nat = jac @ cov_theta @ jac.T
    se = np.sqrt(np.clip(np.diag(cov_nat), 0, None))
    idx = pd.Index(names, name="name")
    natural1 = np.asarray(lay.to_natural(theta[:n1]), dtype=float)
    stage1 = pd.DataFrame(
        {"joint": natural1, "joint std err": se[:n1], "two-stage": res.params.to_numpy(), "two-stage std err": res.bse.to_numpy()},
        index=pd.Index(lay.names, name="name"),
    )
    converged = bool(opt.converged and np.all(np.isfinite(se)))
    message = opt.message if opt.converged else f"the joint fit did not converge: {opt.message}"
    if opt.converged and not np.all(np.isfinite(se)):
        message = "the information of the joint fit is not positive definite: no standard errors"
    if not converged:
        warn(message, ConvergenceWarning)
    k = phi.size
    return Stage2Results(
        method="joint",
        family=family,
        formula=formula,
        params=pd.Series(phi, index=idx, name="estimate"),
        bse=pd.Series(se[n1:], index=idx, name="std err"),
        df=pd.Series(np.inf, index=idx),
        cov=pd.DataFrame(cov_nat[n1:, n1:], index=idx, columns=idx),
        nobs=int(sd.observed.sum()),
        ngroups=res.ngroups,
        stage1=stage1,
        llf=float(opt.llf) if converged or np.isfinite(opt.llf) else float("nan"),
        converged=converged,
        message=message,
        info={"quadrature": f"product, {nagq} per dim ({nagq**lay.d} nodes)", "theta": theta, "n_stage2": k, "optsum": opt},
    )


def stage2(
    res,
    formula: str,
    data=None,
    family: str = "gaussian",
    method: str = "mi",
    ndraws: int = DEFAULT_NDRAWS,
    seed=None,
    level1_summaries: Mapping[str, str | tuple[str, str | Callable]] | None = None,
    level1_data=None,
    stage1_uncertainty: bool = True,
    missing: str = "drop",
    nagq: int | None = None,
    multilevel: bool = False,
) -> Stage2Results:
    """The stage-2 model of a fit (see :meth:`mlsml.MELSMResults.stage2` and the module docstring)."""
    if family not in FAMILIES:
        raise ModelSpecError(f"family must be one of {', '.join(map(repr, FAMILIES))}, not {describe_value(family)}")
    if method not in METHODS:
        raise ModelSpecError(f"method must be one of {', '.join(map(repr, METHODS))}, not {describe_value(method)}")
    if getattr(res, "likelihood", None) is None:
        raise DataError("stage 2 needs the fitted data: this result was read from JSON without its data")
    if multilevel:
        if family not in MULTILEVEL_FAMILIES:
            raise ModelSpecError(
                f"multilevel=True fits a random-intercept model per imputation: family must be one of "
                f"{', '.join(map(repr, MULTILEVEL_FAMILIES))}, not {family!r}"
            )
        if method != "mi":
            raise ModelSpecError("multilevel=True is a method='mi' analysis (a level-1 outcome in the joint model is not available)")
        if not isinstance(ndraws, int | np.integer) or ndraws < MIN_NDRAWS:
            raise ModelSpecError(f"ndraws must be an integer of at least {MIN_NDRAWS}, not {describe_value(ndraws)}")
        ld = level1_data_of(res, formula, data, level1_summaries, level1_data, missing)
        return fit_mi_multilevel(res, ld, formula, family, int(ndraws), seed, bool(stage1_uncertainty))
    sd = school_data(res, formula, data, level1_summaries, level1_data, missing)
    if method == "joint":
        return fit_joint(res, sd, formula, family, nagq)
    if not isinstance(ndraws, int | np.integer) or ndraws < MIN_NDRAWS:
        raise ModelSpecError(f"ndraws must be an integer of at least {MIN_NDRAWS}, not {describe_value(ndraws)}")
    return fit_mi(res, sd, formula, family, int(ndraws), seed, bool(stage1_uncertainty))
