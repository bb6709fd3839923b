"""The model class: formulas in, :class:`~mlsml.results.MELSMResults` out.

.. math::

    y_{ij} = x_{ij}'\\beta + z_{ij}'u_j + e_{ij}, \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\alpha + v_j, \\qquad
    (u_j, v_j) \\sim N(0, \\Sigma).

Data flow: formulas -> :func:`mlsml.design.build_design` (arrays) ->
:func:`mlsml.likelihood.loglik_at_nodes` (objective) ->
:func:`mlsml.optimize.maximize` -> :class:`mlsml.results.MELSMResults`.
"""

from __future__ import annotations

from dataclasses import replace

import autograd
import numpy as np
import pandas as pd

from . import marginal as _marginal
from .design import Design, FormulaSpec, build_design
from .errors import ModelSpecError
from .likelihood import loglik_at_nodes
from .optimize import FitOptions, maximize
from .params import ParamLayout
from .posterior import adapt
from .posterior import loglik as _loglik_theta
from .quadrature import check_nagq, default_nagq, gauss_hermite_rule, max_nagq
from .results import MELSMResults
from .validate import check_choice, check_int, check_real, describe_value

_value_and_grad = autograd.value_and_grad(loglik_at_nodes)

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

#: Values of the ``quadrature`` option.
QUADRATURES = ("auto", "product", "marginal")


def _check_fit_options(method, maxiter, max_passes, xtol, gtol, callback) -> FitOptions:
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
    def from_formula(
        cls,
        formula: str,
        data: pd.DataFrame,
        groups: str,
        scale_formula: str = "~ 1",
        re_formula: str = "~ 1",
        random_scale: bool = True,
        missing: str = "drop",
        scale_re_formula: str | None = None,
        bs_formula: str | None = None,
    ) -> MELSM:
        """Create a model from formulas (statsmodels/patsy syntax).

        Parameters
        ----------
        formula : str
            Mean function, e.g. ``"y ~ x + C(ethnicity, Treatment('White'))"``.
        data : pandas.DataFrame
            One row per observation; need not be sorted; not modified.
        groups : str
            Grouping (school) column; any hashable ids.
        scale_formula : str
            Residual log-variance function, e.g. ``"~ x"``.
        re_formula : str
            School effects in the mean: ``"~ 1"`` (random intercept) or ``"~ x"``
            (random intercept and slope).
        random_scale : bool
            Include the school effect ``v_j`` on the log residual variance. With
            ``False`` and ``scale_formula="~ 1"`` this is the ordinary
            random-intercept model (the paper's Model 1).
        missing : {"drop", "raise"}
            Listwise deletion with a counted warning, or an error.
        scale_re_formula : str, optional
            School effects in the log residual variance,
            ``ln var(e_ij) = w_ij' alpha + g_ij' v_j``: ``"~ x"`` gives a random
            scale intercept and slope on ``x`` (effects ``v0, v1``); implies a random scale.
        bs_formula : str, optional
            Log-linear between-school variance of the random intercept,
            ``ln var(u0_j) = s_j' tau`` with school-level columns (parameters
            ``bsvar:<term>`` replace ``var(u0)``; correlations stay constant).
            See :mod:`mlsml.extended`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", re_formula="~ 1")
        >>> model.param_names
        ['mean:Intercept', 'mean:x', 'scale:Intercept', 'scale:x', 'var(u0)', 'var(v)', 'cov(u0,v)']
        """
        design, spec = build_design(
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
        if design.layout.extended:
            from .extended import _check_layout

            _check_layout(design)
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
            return lay.theta_from_parts(vec[: lay.p], vec[lay.p : lay.p + lay.k], sigma, tau=tau)
        except np.linalg.LinAlgError as exc:
            cov = ", ".join(f"{n} = {v:.6g}" for n, v in zip(names, vec) if n.startswith(("var(", "cov(")))
            raise ModelSpecError(
                f"the covariance parameters do not form a positive-definite matrix ({cov}): each |cov(a,b)| must be "
                "below sd(a) sd(b), and jointly the matrix must be positive definite"
            ) from exc

    def _natural(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(self.layout.to_natural(np.asarray(theta, dtype=float)), dtype=float)

    def _check_start(self, theta: np.ndarray, rule) -> None:
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
        W = self.design.W
        eta = W @ alpha
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
                value, grad = _value_and_grad(theta, self.design, adapt(theta, self.design, rule))
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
        quadrature = check_choice("quadrature", quadrature, QUADRATURES)
        if quadrature == "marginal" and not _marginal.supports(self.layout):
            raise ModelSpecError("quadrature='marginal' needs a random scale and a random effect in the mean (or scale_re_formula)")
        if quadrature != "product" and _marginal.supports(self.layout):
            rule = _marginal.marginal_rule(self._nagq(nagq, True), self.layout.n_v)
            return float(_marginal.loglik_marginal(theta, self.design, _marginal.adapt_marginal(theta, self.design, rule)))
        return _loglik_theta(theta, self.design, self._nagq(nagq, False))

    # ------------------------------------------------------------------
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
    ) -> MELSMResults:
        """Maximum-likelihood fit by adaptive Gauss-Hermite quadrature.

        Parameters
        ----------
        nagq : int, optional
            Quadrature points per dimension of the school effects. Default 11 for
            one or two dimensions, 9 for three, 5 beyond
            (:data:`mlsml.quadrature.DEFAULT_NAGQ`); 15 points in ``v`` for the
            marginal rule (see ``quadrature``).
        method : str
            ``scipy.optimize.minimize`` method for each pass (``"BFGS"``,
            ``"L-BFGS-B"``, ``"trust-exact"``, ``"Newton-CG"``).
        start_params : pandas.Series or array, optional
            Natural-scale starting values (names as :attr:`param_names`).
        maxiter, max_passes : int
            Iterations per optimiser pass; re-centring passes.
        prune : float
            Product rule only: drop nodes whose product weight is below ``prune``
            times the largest (:func:`mlsml.quadrature.gauss_hermite_rule`). Cheap but
            inaccurate (errors of 1e-3 and more in the llf even at ``1e-6``; see
            ``docs/quadrature.md``); for random slopes prefer the marginal rule.
        xtol, gtol : float
            Convergence tolerances (see :class:`mlsml.optimize.FitOptions`).
        callback : callable, optional
            ``callback(pass, theta, llf)`` after every pass.
        quadrature : {"auto", "product", "marginal"}
            ``"product"``: the rotated product Gauss-Hermite rule over all ``d``
            school effects. ``"marginal"``: the mean effects integrated out exactly
            and ``nagq`` (default 15) points per dimension over the scale effects only
            (:mod:`mlsml.marginal`; models with a random scale). ``"auto"`` uses
            ``"marginal"`` for every model with a random scale (and a school effect in
            the mean or ``scale_re_formula``/``bs_formula``) and ``"product"``
            otherwise. The u-exact rule is both faster (London Model 3: 0.15 s against
            0.28 s) and far more accurate for small clusters with a large random-scale
            variance (6 students a school, var(v) = 1.5: 15 points are within 1.2e-4
            of the limit where the 11-point product rule is 0.13 off).

        Returns
        -------
        MELSMResults
            Warns :class:`~mlsml.ConvergenceWarning` when the optimiser did not
            converge and :class:`~mlsml.SingularFitWarning` at a boundary.

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
        """
        opts = _check_fit_options(method, maxiter, max_passes, xtol, gtol, callback)
        method = opts.method
        quadrature = check_choice("quadrature", quadrature, QUADRATURES)
        prune = check_real("prune", prune, 0.0, 1.0, high_open=True)
        if quadrature == "marginal" and not _marginal.supports(self.layout):
            raise ModelSpecError(
                "quadrature='marginal' needs a random scale and a random effect in the mean "
                "(or scale_re_formula); use quadrature='product'"
            )
        use_marginal = quadrature == "marginal" or (quadrature == "auto" and _marginal.supports(self.layout))
        if use_marginal and prune:
            raise ModelSpecError("prune applies to the product rule only (quadrature='product')")
        nagq = self._nagq(nagq, use_marginal)
        if use_marginal:
            rule = _marginal.marginal_rule(nagq, self.layout.n_v)
        else:
            rule = gauss_hermite_rule(self.layout.d, nagq, prune)
        start = None
        if start_params is not None:
            start = self.theta_from_params(start_params)
            self._check_start(start, rule)
        if start is None and self.layout.extended:
            from .extended import start_values_ext

            start = start_values_ext(self.design)
        opts = replace(opts, start=start)
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            opt = maximize(self.design, rule, opts, callback=callback)
            res = MELSMResults.from_optimum(self, opt, nagq=nagq, method=method, prune=prune)
        res._info["quadrature"] = "marginal" if use_marginal else "product"
        res._info["quadrature_check"] = self._quadrature_check(res, use_marginal, nagq, prune)
        res.warn_if_problematic()
        return res

    def _nagq(self, nagq, use_marginal: bool) -> int:
        """The points per dimension: the default for ``None``, else ``nagq`` checked (:func:`mlsml.quadrature.check_nagq`)."""
        dim = self.layout.n_v if use_marginal else self.layout.d
        if nagq is None:
            return _marginal.DEFAULT_NAGQ_MARGINAL if use_marginal else default_nagq(dim)
        return check_nagq(nagq, dim, "u-exact (marginal)" if use_marginal else "product")

    def _quadrature_check(self, res, use_marginal: bool, nagq: int, prune: float):
        """``(points, |llf(points) - llf|)`` with about twice the points, or ``None``.

        Only where it is cheap and informative: a random scale (otherwise the
        integrand is Gaussian and the rule exact), and at most two dimensions in
        the product rule (the u-exact rule is one- or two-dimensional in ``v``).
        """
        lay = self.layout
        if not lay.random_scale or lay.extended or not np.isfinite(res.llf):
            return None
        more = min(2 * nagq + 1, max_nagq(lay.n_v if use_marginal else lay.d))
        if more <= nagq:
            return None
        theta = np.asarray(res.theta, dtype=float)
        with np.errstate(all="ignore"):
            if use_marginal:
                rule = _marginal.marginal_rule(more, lay.n_v)
                value = float(_marginal.loglik_marginal(theta, self.design, _marginal.adapt_marginal(theta, self.design, rule)))
            elif lay.d <= 2:
                value = _loglik_theta(theta, self.design, more, prune)
            else:
                return None
        return more, abs(value - res.llf)


def fit(
    formula: str,
    data: pd.DataFrame,
    groups: str,
    scale_formula: str = "~ 1",
    re_formula: str = "~ 1",
    random_scale: bool = True,
    missing: str = "drop",
    scale_re_formula: str | None = None,
    bs_formula: str | None = None,
    **fit_options,
) -> MELSMResults:
    """Build and fit a :class:`MELSM` in one call.

    ``fit_options`` are passed to :meth:`MELSM.fit`.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> list(res.params.index)
    ['mean:Intercept', 'mean:x', 'scale:Intercept', 'scale:x', 'var(u0)', 'var(v)', 'cov(u0,v)']
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
    )
    return model.fit(**fit_options)
