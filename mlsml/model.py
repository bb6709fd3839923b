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

import numpy as np
import pandas as pd

from .design import Design, FormulaSpec, build_design
from .errors import ModelSpecError
from .optimize import FitOptions, maximize
from .params import ParamLayout
from .posterior import loglik as _loglik_theta
from .quadrature import default_nagq, gauss_hermite_rule
from .results import MELSMResults


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
        if isinstance(params, pd.Series):
            missing = [n for n in lay.names if n not in params.index]
            if missing:
                raise ModelSpecError(f"params lacks {missing}")
            params = params.reindex(list(lay.names))
        vec = np.asarray(params, dtype=float)
        if vec.shape != (lay.n_params,):
            raise ModelSpecError(f"expected {lay.n_params} parameters, got {vec.shape}")
        sigma = lay.sigma_from_natural(vec)
        try:
            tau = vec[lay.p + lay.k : lay.p + lay.k + lay.m] if lay.bs_terms else None
            return lay.theta_from_parts(vec[: lay.p], vec[lay.p : lay.p + lay.k], sigma, tau=tau)
        except np.linalg.LinAlgError as exc:
            raise ModelSpecError("the covariance parameters do not form a positive-definite matrix") from exc

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
        from . import marginal as _marginal

        theta = self.theta_from_params(params)
        if quadrature not in ("auto", "product", "marginal"):
            raise ModelSpecError(f"quadrature must be 'auto', 'product' or 'marginal', not {quadrature!r}")
        if quadrature != "product" and _marginal.supports(self.layout):
            rule = _marginal.marginal_rule(int(nagq or _marginal.DEFAULT_NAGQ_MARGINAL), self.layout.n_v)
            return float(_marginal.loglik_marginal(theta, self.design, _marginal.adapt_marginal(theta, self.design, rule)))
        return _loglik_theta(theta, self.design, nagq)

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
        d = self.layout.d
        from . import marginal as _marginal

        if quadrature not in ("auto", "product", "marginal"):
            raise ModelSpecError(f"quadrature must be 'auto', 'product' or 'marginal', not {quadrature!r}")
        if quadrature == "marginal" and not _marginal.supports(self.layout):
            raise ModelSpecError(
                "quadrature='marginal' needs a random scale and a random effect in the mean "
                "(or scale_re_formula); use quadrature='product'"
            )
        if not 0.0 <= float(prune) < 1.0:
            raise ModelSpecError(f"prune must be in [0, 1), got {prune!r}")
        use_marginal = quadrature == "marginal" or (quadrature == "auto" and _marginal.supports(self.layout))
        if use_marginal and prune:
            raise ModelSpecError("prune applies to the product rule only (quadrature='product')")
        nagq = int(nagq or (_marginal.DEFAULT_NAGQ_MARGINAL if use_marginal else default_nagq(d)))
        if nagq < 1:
            raise ModelSpecError(f"nagq must be a positive integer, got {nagq}")
        if use_marginal:
            rule = _marginal.marginal_rule(nagq, self.layout.n_v)
        else:
            rule = gauss_hermite_rule(d, nagq, prune)
        start = None if start_params is None else self.theta_from_params(start_params)
        if start is None and self.layout.extended:
            from .extended import start_values_ext

            start = start_values_ext(self.design)
        opts = FitOptions(method=method, maxiter=maxiter, max_passes=max_passes, xtol=xtol, gtol=gtol, start=start)
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            opt = maximize(self.design, rule, opts, callback=callback)
            res = MELSMResults.from_optimum(self, opt, nagq=nagq, method=method, prune=prune)
        res._info["quadrature"] = "marginal" if use_marginal else "product"
        res._info["options"] = {"method": method, "maxiter": maxiter, "max_passes": max_passes, "xtol": xtol, "gtol": gtol}
        res._info["quadrature_check"] = self._quadrature_check(res, use_marginal, nagq, prune)
        res.warn_if_problematic()
        return res

    def _quadrature_check(self, res, use_marginal: bool, nagq: int, prune: float):
        """``(points, |llf(points) - llf|)`` with about twice the points, or ``None``.

        Only where it is cheap and informative: a random scale (otherwise the
        integrand is Gaussian and the rule exact), and at most two dimensions in
        the product rule (the u-exact rule is one- or two-dimensional in ``v``).
        """
        lay = self.layout
        if not lay.random_scale or lay.extended or not np.isfinite(res.llf):
            return None
        more = 2 * nagq + 1
        theta = np.asarray(res.theta, dtype=float)
        with np.errstate(all="ignore"):
            if use_marginal:
                from .marginal import adapt_marginal, loglik_marginal, marginal_rule

                rule = marginal_rule(more, lay.n_v)
                value = float(loglik_marginal(theta, self.design, adapt_marginal(theta, self.design, rule)))
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
