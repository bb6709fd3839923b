"""The results of a fit: an immutable object built once by :meth:`MELSM.fit`.

Inference is Wald inference on the natural scale: the observed information is
the autograd Hessian of the log-likelihood on the optimiser scale ``theta``
(at nodes adapted to the estimates) and the covariance of the natural
parameters is ``J (-H)^{-1} J'`` with ``J = d natural / d theta`` (delta
method). At an interior maximum this equals the inverse observed information
in the natural parameterisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import autograd
import numpy as np
import pandas as pd

from . import schools as _schools
from . import stage2 as _stage2
from . import standardized as _standardized
from . import summary as _summary
from ._lazy import LazyModule
from .bootstrap import bootstrap as _bootstrap
from .bootstrap import simulate_responses
from .compare import lrtest
from .diagnostics import TAIL_N_SIM, TAIL_SEED, Diagnostics, TailCheck, diagnose, tail_check
from .errors import ConvergenceWarning, DataError, ModelSpecError, QuadratureWarning, SingularFitWarning, warn
from .export import NO_DATA, DetachedModel, read_json, results_fields_from_dict, results_to_dict
from .likelihood import Likelihood
from .margins import marginal_effects as _marginal_effects
from .optimize import FitOptions, OptSummary, theta_covariance
from .params import ParamLayout, wald_intervals
from .predict import PredictionResults
from .predict import get_prediction as _get_prediction
from .predict import predict as _predict
from .quadrature import QuadratureSpec
from .robust import check_cov_type, sandwich, school_scores

stats = LazyModule("scipy.stats")  # imported on first use: it would double the time of `import mlsml`
patsy = LazyModule("patsy")  # likewise (only wald_test/t_test parse constraints)
patsy_constraint = LazyModule("patsy.constraint")

if TYPE_CHECKING:  # pragma: no cover
    from .model import MELSM


def load(source) -> MELSMResults:
    """Read a fit written by :meth:`MELSMResults.to_json` (JSON text, a path, or a dict).

    The same as :meth:`MELSMResults.from_json`.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> mlsml.load(res.to_json()).bse.equals(res.bse)
    True
    """
    return MELSMResults.from_json(source)


def _frequency_count(design, key: str, plain: int) -> int:
    """``nobs`` or ``ngroups`` of the replicated data with frequency weights (:mod:`mlsml.weights`), else ``plain``."""
    w = design.info.get("weights") or {}
    if w.get("kind") != "frequency" or key not in w:
        return plain
    value = float(w[key])
    return int(round(value)) if abs(value - round(value)) < 1e-9 * max(value, 1.0) else value


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class MELSMResults:
    """Maximum-likelihood fit of a mixed-effects location scale model.

    Do not build this yourself: :meth:`mlsml.MELSM.fit` returns it. All
    attributes are read-only.

    A result pickles with its data (``pickle.loads(pickle.dumps(res))`` works for
    every model class and in worker processes: the formula engine's design
    descriptions, which patsy cannot pickle, are rebuilt from the formulas and the
    fitted data, see :class:`mlsml.design.FormulaSpec`). :meth:`to_json` writes
    the fit without its data and :meth:`from_json` / :func:`mlsml.load` read it
    back (:attr:`has_data` is then False and data-dependent methods say so).

    Attributes
    ----------
    model : MELSM
        The model that was fitted (formulas, design).
    theta : ndarray
        Estimates on the optimiser scale (see :mod:`mlsml.params`).
    params : pandas.Series
        Estimates on the natural scale, named by the parameter contract.
    llf : float
        Maximised log-likelihood (all constants included; comparable with
        lme4's ``logLik(REML = FALSE)`` and MIXREGLS).
    converged : bool
        Whether the optimiser met its convergence criteria.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> res.params.round(3)
    mean:Intercept    -0.024
    mean:x             0.650
    scale:Intercept   -0.792
    scale:x            0.070
    var(u0)            0.041
    var(v)             0.029
    cov(u0,v)         -0.020
    Name: estimate, dtype: float64
    >>> res.bse.index.equals(res.params.index), res.conf_int().shape
    (True, (7, 2))
    >>> res.cov_re.round(3)
           u0      v
    u0  0.041 -0.020
    v  -0.020  0.029
    >>> res.re_correlations().round(2)
                estimate  std err
    name
    corr(u0,v)     -0.57     0.16
    >>> res.nobs, res.ngroups, res.df_model, round(res.llf, 2)
    (5404, 40, 7, -5550.63)
    >>> bool(res.aic == -2 * res.llf + 2 * res.df_model), res.singular
    (True, False)
    >>> text = res.summary().as_text()   # also .as_html(), .as_latex()
    """

    model: MELSM
    theta: np.ndarray
    params: pd.Series
    llf: float
    converged: bool
    #: The quadrature rule of the fit (kind, points per dimension, pruning).
    rule: QuadratureSpec
    hessian: np.ndarray
    grad: np.ndarray
    message: str
    n_passes: int
    n_iter: int
    fit_time: float
    method: str
    #: The optimiser's options (:class:`mlsml.optimize.FitOptions`).
    options: FitOptions
    #: The diagnostics computed before the results were built (:class:`mlsml.diagnostics.Diagnostics`;
    #: read from JSON, it has no boundary probes).
    diagnostics: Diagnostics
    _cov: np.ndarray = field(repr=False)
    #: How the standard errors were computed: ``"nonrobust"`` (the inverse observed information)
    #: or ``"robust"`` (the cluster-robust sandwich of :mod:`mlsml.robust`).
    cov_type: str = "nonrobust"
    #: The cluster-robust covariance of :attr:`theta` (``None`` unless ``cov_type == "robust"``).
    _cov_theta: np.ndarray | None = field(default=None, repr=False)

    #: The log-likelihood the fit maximised (its rule is the fit's rule); ``None`` when read from JSON.
    likelihood: Likelihood | None = field(default=None, repr=False)
    #: What the optimiser did (:class:`mlsml.optimize.OptSummary`); ``None`` when read from JSON.
    optsum: OptSummary | None = field(default=None, repr=False)

    # ------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        model: MELSM,
        likelihood: Likelihood,
        optsum: OptSummary,
        diagnostics: Diagnostics | None = None,
        cov_type: str | None = None,
    ) -> MELSMResults:
        """The results of a fit, built once from the model, its objective and the optimum.

        Parameters
        ----------
        model : MELSM
        likelihood : Likelihood
            The objective that was maximised (:meth:`mlsml.MELSM.objective`).
        optsum : OptSummary
            What :func:`mlsml.optimize.maximize` returned.
        diagnostics : Diagnostics, optional
            From :func:`mlsml.diagnostics.diagnose` (computed here when not given).
        cov_type : {"nonrobust", "robust"}, optional
            The standard errors (:mod:`mlsml.robust`); default robust with sampling weights,
            model-based otherwise.

        Examples
        --------
        The pipeline of :meth:`mlsml.MELSM.fit`, step by step:

        >>> import mlsml
        >>> from mlsml.optimize import maximize
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula="~ x")
        >>> f = model.objective(quadrature="product")
        >>> res = mlsml.MELSMResults.build(model, f, maximize(f))
        >>> res.nagq, res.quadrature
        (9, 'product')
        """
        if diagnostics is None:
            with np.errstate(all="ignore"):
                diagnostics = diagnose(likelihood, optsum)
        lay: ParamLayout = model.layout
        theta = _readonly(optsum.theta)
        natural = np.asarray(lay.to_natural(theta), dtype=float)
        params = pd.Series(_readonly(natural), index=list(lay.names), name="estimate", copy=False)
        H = np.asarray(optsum.hessian, dtype=float)
        cov_type = check_cov_type(cov_type, model.design)
        cov_theta = theta_covariance(optsum) if diagnostics.hessian_pd else None
        robust = None
        if cov_type == "robust":
            if diagnostics.reduced_cov is not None or cov_theta is None:
                warn(
                    "cluster-robust standard errors need a positive-definite information at an interior maximum; "
                    "this fit is singular or its information is not positive definite, so the model-based "
                    "standard errors are reported (res.cov_type == 'nonrobust')",
                    SingularFitWarning,
                )
                cov_type = "nonrobust"
            else:
                with np.errstate(all="ignore"):
                    robust = sandwich(cov_theta, school_scores(likelihood, theta), model.design)
                cov_theta = robust
        if diagnostics.reduced_cov is not None:  # singular fit: reduced-rank information (diagnostics.singular_covariance)
            cov = np.array(diagnostics.reduced_cov, dtype=float)
        elif cov_theta is not None:
            jac = lay.natural_jacobian(theta)
            cov = jac @ cov_theta @ jac.T
            cov = 0.5 * (cov + cov.T)
        else:
            cov = np.full((lay.n_params, lay.n_params), np.nan)
        with np.errstate(all="ignore"):
            return cls(
                model=model,
                theta=theta,
                params=params,
                # never an impossible number: NaN where the rule is not accurate or the value not finite
                llf=float(optsum.llf) if optsum.llf_reliable else float("nan"),
                converged=bool(optsum.converged),
                rule=optsum.quadrature,
                hessian=_readonly(H),
                grad=_readonly(optsum.grad),
                message=str(optsum.message),
                n_passes=int(optsum.n_passes),
                n_iter=int(optsum.n_iter),
                fit_time=float(optsum.time),
                method=optsum.method,
                options=optsum.options,
                diagnostics=diagnostics,
                _cov=_readonly(cov),
                cov_type=cov_type,
                _cov_theta=None if robust is None else _readonly(robust),
                likelihood=likelihood,
                optsum=optsum,
            )

    @classmethod
    def from_optimum(cls, model: MELSM, opt: OptSummary, likelihood: Likelihood | None = None, **_ignored) -> MELSMResults:
        """Results from an :class:`mlsml.optimize.OptSummary` (the rule and points are the optimum's own)."""
        if likelihood is None:
            likelihood = Likelihood.build(model.design, opt.quadrature)
        return cls.build(model, likelihood, opt)

    @property
    def quadrature(self) -> str:
        """The rule of the fit: ``"product"`` or ``"marginal"`` (u-exact)."""
        return self.rule.option

    @property
    def nagq(self) -> int:
        """Quadrature points per dimension of the fit's rule."""
        return int(self.rule.nagq)

    @property
    def prune(self) -> float:
        """Pruning threshold of the fit's product rule (0: none)."""
        return float(self.rule.prune)

    # ------------------------------------------------------------ basics
    @property
    def layout(self) -> ParamLayout:
        """Parameter layout (names and sizes)."""
        return self.model.layout

    @property
    def nobs(self) -> int:
        """Number of observations used (with frequency weights: of the replicated data set)."""
        return _frequency_count(self.model.design, "nobs", self.model.design.nobs)

    @property
    def ngroups(self) -> int:
        """Number of groups (schools; with frequency weights: of the replicated data set)."""
        return _frequency_count(self.model.design, "ngroups", self.model.design.ngroups)

    @property
    def df_model(self) -> int:
        """Number of estimated parameters."""
        return self.layout.n_params

    @property
    def deviance(self) -> float:
        """``-2 llf``."""
        return -2.0 * self.llf

    @property
    def aic(self) -> float:
        """``-2 llf + 2 k``."""
        return -2.0 * self.llf + 2.0 * self.df_model

    @property
    def bic(self) -> float:
        """``-2 llf + k ln N`` with ``N`` the number of observations (as lme4)."""
        return -2.0 * self.llf + self.df_model * np.log(self.nobs)

    @property
    def bic_groups(self) -> float:
        """``-2 llf + k ln J`` with ``J`` the number of groups (as MIXREGLS)."""
        return -2.0 * self.llf + self.df_model * np.log(self.ngroups)

    # ------------------------------------------------------------ inference
    def cov_theta(self) -> np.ndarray | None:
        r"""Covariance of :attr:`theta` (the optimiser scale), or ``None`` without a positive-definite information.

        From the standardised fit's information mapped with the Jacobian of the
        reparametrisation (:func:`mlsml.optimize.theta_covariance`), so that no digits are
        lost to badly scaled covariates; for results read from JSON, the inverse of
        ``-hessian``. With ``cov_type == "robust"`` the cluster-robust sandwich
        (:mod:`mlsml.robust`). Every delta-method standard error of the package starts here.
        """
        if self._cov_theta is not None:
            return self._cov_theta
        if not self.diagnostics.hessian_pd:
            return None
        if self.optsum is not None:
            cov = theta_covariance(self.optsum)
            return None if cov is None else _readonly(cov)
        H = np.asarray(self.hessian, dtype=float)
        return _readonly(np.linalg.inv(-0.5 * (H + H.T)))

    def cov_params(self) -> pd.DataFrame:
        """Covariance matrix of the natural-scale estimates (delta method).

        Examples
        --------
        >>> import numpy as np, mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> V = res.cov_params()
        >>> V.shape, bool(np.allclose(np.sqrt(np.diag(V)), res.bse))
        ((7, 7), True)
        """
        names = list(self.layout.names)
        return pd.DataFrame(np.array(self._cov), index=names, columns=names)

    @property
    def bse(self) -> pd.Series:
        """Standard errors of :attr:`params`."""
        se = np.sqrt(np.clip(np.diag(self._cov), 0, None))
        se[~np.isfinite(np.diag(self._cov))] = np.nan
        return pd.Series(se, index=self.params.index, name="std err")

    @property
    def tvalues(self) -> pd.Series:
        """Wald z statistics ``params / bse``."""
        return pd.Series(self.params.to_numpy() / self.bse.to_numpy(), index=self.params.index, name="z")

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided normal p-values of :attr:`tvalues`.

        For variances the null value 0 is on the boundary, so these p-values are
        conservative; use :func:`mlsml.lrtest` to test a variance.
        """
        return pd.Series(2 * stats.norm.sf(np.abs(self.tvalues.to_numpy())), index=self.params.index, name="P>|z|")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        r"""Wald confidence intervals: ``params +/- z_{1-alpha/2} bse``, variances on the log scale.

        Coefficients and covariances get :math:`\hat\theta \pm z\,\mathrm{se}`; a
        variance ``var(.)`` gets :math:`\hat\sigma^2 \exp(\pm z\,\mathrm{se}/\hat\sigma^2)`,
        the symmetric interval of its logarithm mapped back (as Stata's ``mixed``), which
        never includes a negative variance (:func:`mlsml.params.wald_intervals`). With
        ``cov_type="robust"`` ``bse`` is the sandwich SE. Profile-likelihood intervals:
        :func:`mlsml.profile.profile_ci`; bootstrap ones: :meth:`bootstrap`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> res.conf_int(0.1).loc["mean:x"].round(3).tolist()
        [0.634, 0.665]
        >>> bool((res.conf_int().loc["var(v)"] > 0).all())
        True
        """
        if not 0 < alpha < 1:
            raise ModelSpecError(f"alpha must be between 0 and 1, not {alpha!r}")
        z = stats.norm.ppf(1 - alpha / 2)
        lo, hi = wald_intervals(self.params.index, self.params.to_numpy(), self.bse.to_numpy(), z)
        return pd.DataFrame({f"{alpha / 2:g}": lo, f"{1 - alpha / 2:g}": hi}, index=self.params.index)

    def _constraints(self, r_matrix, q_matrix) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(R, q, labels)`` of the linear hypotheses ``R params = q``."""
        names = list(self.params.index)
        text = isinstance(r_matrix, str) or (
            isinstance(r_matrix, (list, tuple)) and len(r_matrix) > 0 and all(isinstance(c, str) for c in r_matrix)
        )
        if text:
            if q_matrix is not None:
                raise ModelSpecError("give the constants inside the constraints ('mean:x = 0.5'), not as q_matrix")
            try:
                lc = patsy_constraint.linear_constraint(r_matrix, names)
            except patsy.PatsyError as exc:
                raise ModelSpecError(f"could not read the constraints {r_matrix!r}: {exc}\n(parameters: {', '.join(names)})") from exc
            R, q = np.asarray(lc.coefs, dtype=float), np.asarray(lc.constants, dtype=float).ravel()
        else:
            R = np.atleast_2d(np.asarray(r_matrix, dtype=float))
            if R.ndim != 2 or R.shape[1] != len(names):
                raise ModelSpecError(f"r_matrix must have {len(names)} columns (one per parameter: {', '.join(names)}), got {R.shape}")
            q = np.zeros(R.shape[0]) if q_matrix is None else np.atleast_1d(np.asarray(q_matrix, dtype=float)).ravel()
            if q.shape != (R.shape[0],):
                raise ModelSpecError(f"q_matrix must have {R.shape[0]} values (one per row of r_matrix), got {q.size}")
        if not (np.all(np.isfinite(R)) and np.all(np.isfinite(q))):
            raise ModelSpecError("the hypotheses have non-finite coefficients or constants")
        if np.any(np.all(R == 0, axis=1)):
            raise ModelSpecError("a hypothesis involves no parameter (a row of r_matrix is all zeros)")

        def label(row: np.ndarray, const: float) -> str:
            terms = []
            for c, n in zip(row, names):
                if c != 0:
                    terms.append(("- " if c < 0 else "+ ") + (n if abs(c) == 1 else f"{abs(c):g}*{n}"))
            return " ".join(terms).removeprefix("+ ") + f" = {const:g}"

        return R, q, [label(r, c) for r, c in zip(R, q)]

    def _constraint_cov(self, R: np.ndarray) -> np.ndarray:
        V = np.asarray(self._cov, dtype=float)
        used = np.any(R != 0, axis=0)
        if not np.all(np.isfinite(V[np.ix_(used, used)])):
            raise ModelSpecError("no Wald test: the observed information is not positive definite (see res.singular_reasons())")
        V = np.where(np.isfinite(V), V, 0.0)
        return R @ V @ R.T

    def wald_test(self, r_matrix, q_matrix=None):
        """Wald chi-squared test of the linear hypotheses ``R params = q`` (jointly).

        .. math::

            W = (R\\hat\\psi - q)' (R \\hat V R')^{-1} (R\\hat\\psi - q) \\sim \\chi^2_r,

        with ``V`` = :meth:`cov_params` and ``r`` the number of hypotheses. As
        statsmodels' ``wald_test`` with ``use_f=False``.

        Parameters
        ----------
        r_matrix : str, list of str, or array_like
            Constraints naming parameters as in :attr:`params`, e.g.
            ``"mean:standLRT = 0, scale:standLRT = 0"`` or ``["scale:x", "var(v) = 0.1"]``;
            or a matrix ``R`` with one column per parameter.
        q_matrix : array_like, optional
            Right-hand sides for a matrix ``R`` (default zeros).

        Returns
        -------
        statsmodels.stats.contrast.ContrastResults
            ``.statistic``, ``.df_denom`` (the number of hypotheses), ``.pvalue``;
            printable.

        Notes
        -----
        A variance's null value 0 is on the boundary of the parameter space, where
        the chi-squared reference does not hold: test variances with :func:`mlsml.lrtest`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> w = res.wald_test("mean:x = 0.6, scale:x = 0")
        >>> w.df_denom, bool(w.pvalue < 0.05)
        (2, True)
        """
        R, q, _ = self._constraints(r_matrix, q_matrix)
        RVR = self._constraint_cov(R)
        r = int(np.linalg.matrix_rank(RVR))
        if r < R.shape[0]:
            raise ModelSpecError(f"the {R.shape[0]} hypotheses are linearly dependent (rank {r}): drop the redundant ones")
        diff = R @ self.params.to_numpy() - q
        stat = float(diff @ np.linalg.solve(RVR, diff))
        # statsmodels is heavy to import; only a test needs its result class
        from statsmodels.stats.contrast import ContrastResults

        return ContrastResults(chi2=stat, df_denom=r, statistic=stat, distribution="chi2", distargs=(r,))

    def t_test(self, r_matrix, q_matrix=None):
        """Wald z tests of each linear hypothesis ``(R params)_i = q_i`` separately.

        ``effect = R params``, ``sd = sqrt(diag(R V R'))``, ``z = (effect - q) / sd``
        with two-sided normal p-values; as statsmodels' ``t_test`` with
        ``use_t=False``. ``r_matrix`` and ``q_matrix`` as in :meth:`wald_test`.

        Returns
        -------
        statsmodels.stats.contrast.ContrastResults
            ``.effect``, ``.sd``, ``.statistic``, ``.pvalue``, ``.conf_int()``,
            ``.summary()``.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> t = res.t_test("mean:x = 0.6")
        >>> bool(t.effect[0] == res.params["mean:x"])
        True
        >>> bool(abs(t.statistic[0] - (res.params["mean:x"] - 0.6) / res.bse["mean:x"]) < 1e-9)
        True
        """
        R, q, labels = self._constraints(r_matrix, q_matrix)
        sd = np.sqrt(np.clip(np.diag(self._constraint_cov(R)), 0.0, None))
        effect = R @ self.params.to_numpy()
        # statsmodels is heavy to import; only a test needs its result class
        from statsmodels.stats.contrast import ContrastResults

        out = ContrastResults(effect=effect, statistic=(effect - q) / sd, sd=sd, df_denom=None, distribution="norm")
        out.c_names = labels  # the row labels of out.summary()
        return out

    # ------------------------------------------------------------ blocks
    @property
    def fe_mean(self) -> pd.Series:
        """Mean-function coefficients ``beta``, indexed by term."""
        p = self.layout.p
        return pd.Series(self.params.to_numpy()[:p], index=list(self.layout.mean_terms), name="beta")

    @property
    def fe_scale(self) -> pd.Series:
        """Residual-variance-function coefficients ``alpha``, indexed by term."""
        p, k = self.layout.p, self.layout.k
        return pd.Series(self.params.to_numpy()[p : p + k], index=list(self.layout.scale_terms), name="alpha")

    @property
    def cov_re(self) -> pd.DataFrame:
        """Covariance matrix ``Sigma`` of the school effects."""
        S = self.layout.sigma_from_natural(self.params.to_numpy())
        names = list(self.layout.re_names)
        return pd.DataFrame(S, index=names, columns=names)

    @property
    def corr_re(self) -> pd.DataFrame:
        """Correlation matrix of the school effects."""
        S = self.cov_re.to_numpy()
        sd = np.sqrt(np.diag(S))
        with np.errstate(invalid="ignore", divide="ignore"):
            R = S / np.outer(sd, sd)
        return pd.DataFrame(R, index=self.cov_re.index, columns=self.cov_re.columns)

    # ------------------------------------------------------------ schools (mlsml.schools)
    def random_effects(self, cov: bool = False):
        """Posterior (empirical-Bayes) means and SDs of the school effects.

        ``E(b_j | y)`` and ``sd(b_j | y)`` at the estimates, by the adaptive
        quadrature of the likelihood (:func:`mlsml.predict.posterior_moments`;
        the fit's points per dimension, at least the default for the dimension).

        Parameters
        ----------
        cov : bool
            Also return the posterior covariance matrices.

        Returns
        -------
        pandas.DataFrame or (DataFrame, ndarray (J, d, d))
            Indexed by group label; columns ``u0, u0_sd, [u1, u1_sd, ...], [v, v_sd], n``.
        """
        self._require_data("random_effects")

        return _schools.random_effects(self, cov=cov)

    def school_effects(self, w=None, level: float = 0.95, z=None, ndraws: int = 1000, seed: int = 20190101) -> pd.DataFrame:
        r"""School mean progress and school residual variance with intervals, ranks and flags.

        .. math::

            \text{mean}_j = E(\bar z'u_j \mid y), \qquad
            \text{var}_j = E\{\exp(\bar w'\alpha + \bar g'v_j) \mid y\},

        (``= E(u0_j | y)`` for a random intercept; ``gbar = 1`` for the plain random scale
        ``v_j``; with ``scale_re_formula`` ``gbar = g(w)`` is its row at the same covariate
        values as ``wbar``, so the school's variance is read off at ``w``). ``_lo/_hi`` are
        equal-tailed posterior quantiles at ``level`` (exact, not a normal approximation;
        see ``docs/predictions.md``); ranks (1 = lowest) of the posterior means with
        intervals from ``ndraws`` posterior draws (fixed ``seed``); flags ``+1/-1`` when the
        interval lies above/below the average school (``u = 0``, ``v = 0``), else 0. Each
        school's posterior is the fit's own (with ``bs_formula``, under its own ``Sigma_j``).

        Parameters
        ----------
        w : None, dict/Series of term -> value, array, or "school"
            Common covariate value ``wbar`` of the variance function (default:
            overall mean of each column, as in the paper). ``"school"`` uses each
            school's own mean ``wbar_j`` (intake-specific variances, the paper's Figure 4).
            With ``scale_re_formula`` the same values give ``gbar`` (a mapping may also
            name its terms; columns not given take their overall mean);
            ``table.attrs["gbar"]`` records it.
        level : float
            Interval level.
        z : None, dict/Series or array
            Common value ``zbar`` of the random-effects design (default: overall mean).
        ndraws, seed : int
            Posterior draws for the rank intervals.

        Returns
        -------
        pandas.DataFrame
            Indexed by group label; columns ``n, mean, mean_lo, mean_hi, mean_rank,
            mean_rank_lo, mean_rank_hi, mean_flag, var, var_lo, var_hi, var_rank,
            var_rank_lo, var_rank_hi, var_flag``.
        """
        self._require_data("school_effects")

        return _schools.school_effects(self, w=w, level=level, z=z, ndraws=ndraws, seed=seed)

    def stage2(
        self,
        formula: str,
        data=None,
        family: str = "gaussian",
        method: str = "mi",
        ndraws: int = _stage2.DEFAULT_NDRAWS,
        seed=None,
        level1_summaries=None,
        level1_data=None,
        stage1_uncertainty: bool = True,
        missing: str = "drop",
        nagq: int | None = None,
        multilevel: bool = False,
    ) -> _stage2.Stage2Results:
        r"""Regress a school-level outcome on the school effects (MixWILD's stage 2).

        .. math:: g(E[Y_j \mid b_j]) = x_j'\gamma_x + \gamma_u u_{0j} + \gamma_v v_j + \dots

        Parameters
        ----------
        formula : str
            ``"Y ~ u0 + v + u0:v + x"``: the school effects by name (``u0, u1, ..., v``;
            ``v0, v1, ...`` with ``scale_re_formula``), level-2 columns of ``data`` and the
            names of ``level1_summaries``.
        data : pandas.DataFrame
            The grouping column of the fit and the level-2 columns (one value per school;
            several rows per school are accepted when those columns are constant within it).
        family : {"gaussian", "binomial", "ordinal", "poisson", "nominal"}
        method : {"mi", "joint"}
            ``"mi"``: GLM fits to ``ndraws`` draws from each school's exact posterior, pooled by
            Rubin's rules (with the fraction of missing information); ``"joint"``: the one-stage
            model by maximum likelihood with the same quadrature (every family).
        ndraws : int
            Imputations of ``"mi"``.
        seed : int or numpy.random.Generator, optional
        level1_summaries : dict, optional
            ``{"name": "col"}`` (the school mean of level-1 column ``col``) or
            ``{"name": ("col", "sd")}`` (``mean``, ``sd``, ``var``, ``min``, ``max``, ``median``,
            ``sum``, ``count`` or a callable), computed on the fit's rows or ``level1_data``.
        level1_data : pandas.DataFrame, optional
            Level-1 data for the summaries (default: the rows and columns the fit used).
        stage1_uncertainty : bool
            ``"mi"``: draw the MELSM's parameters from their asymptotic distribution before each
            imputation (proper imputation); ``False`` draws at the estimates, as MixWILD does.
        missing : {"drop", "raise"}
            Schools without an outcome or covariate: left out with a counted warning, or an error.
        nagq : int, optional
            ``"joint"``: points per dimension of the product rule.
        multilevel : bool
            A level-1 outcome (MixWILD's ``MULTI2ND = 1``): ``data`` holds one row per
            observation (the grouping column, the outcome and level-1 or level-2 covariates),
            and each imputation fits a model with a random intercept per school by maximum
            likelihood: ``Y_ij = x_ij' gamma + gamma_u u_0j + ... + a_j + e_ij`` (``"gaussian"``),
            or a random-intercept GLMM by adaptive Gauss-Hermite quadrature (``"ordinal"``,
            ``"poisson"``, ``"nominal"``, ``"binomial"``); ``method="mi"``; see :mod:`mlsml.stage2`.

        Returns
        -------
        mlsml.stage2.Stage2Results

        Examples
        --------
        >>> import mlsml, numpy as np, pandas as pd
        >>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school")
        >>> schools = pd.DataFrame({"school": res.model.design.group_labels})
        >>> schools["score"] = np.random.default_rng(2).normal(size=40)
        >>> res.stage2("score ~ u0 + v", data=schools, ndraws=10, seed=1).params.index.tolist()
        ['Intercept', 'u0', 'v', 'var(resid)']
        """
        self._require_data("stage 2")
        return _stage2.stage2(
            self,
            formula,
            data,
            family,
            method,
            ndraws,
            seed,
            level1_summaries,
            level1_data,
            stage1_uncertainty,
            missing,
            nagq,
            multilevel,
        )

    def standardized_params(self, alpha: float = 0.05) -> pd.DataFrame:
        """The estimates for standardised covariates (mean 0, SD 1), as MixWILD prints them with ``NCENT = 1``.

        An exact reparametrisation of this fit (no refit): the same numbers as a fit to
        standardised data, with delta-method standard errors. See :mod:`mlsml.standardized`.

        Examples
        --------
        >>> import mlsml
        >>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school")
        >>> res.standardized_params()[["estimate", "std err"]].round(3).loc[["mean:Intercept", "mean:x"]]
                        estimate  std err
        mean:Intercept    -0.014    0.034
        mean:x             0.643    0.009
        """
        self._require_data("standardized_params")
        return _standardized.standardized_params(self, alpha)

    def population_quantities(self, w=None, z=None, s=None) -> pd.DataFrame:
        r"""Population quantities with delta-method standard errors.

        With ``sigma2_u = zbar'Sigma_uu zbar`` and ``sigma2_v = gbar'Sigma_vv gbar``
        (``gbar = 1`` for the plain random scale, ``g(w)`` with ``scale_re_formula``):

        .. math::

            \text{pa\_variance} = \exp(\bar w'\alpha + \sigma^2_v / 2), \qquad
            \text{vpc} = \frac{\sigma^2_u}{\sigma^2_u + \text{pa\_variance}}.

        Rows: ``pa_variance``, ``median_variance = exp(wbar'alpha)``,
        ``idr_mean_lo/hi = beta_0 -/+ z_.9 sd(zbar'u)``,
        ``idr_var_lo/hi = exp(wbar'alpha -/+ z_.9 sigma_v)``, ``sd_mean``,
        ``total_variance = sigma2_u + pa_variance``, ``vpc``, ``corr_uv = corr(zbar'u,
        gbar'v)`` (model-implied) and ``corr_pred`` (of the predicted school means and
        variances); NaN where the model lacks the effect.

        Parameters
        ----------
        w, z : see :meth:`school_effects` (not ``"school"``)
        s : None, dict/Series of term -> value, or array
            With ``bs_formula``: the school-level covariates at which ``Sigma(s) = D
            Sigma0 D``, ``D = diag(exp(s'tau / 2), 1, ...)``, is evaluated (default: the
            mean over schools of each column; recorded in ``table.attrs["sbar"]``).
            Must be ``None`` for other models.

        Returns
        -------
        pandas.DataFrame
            Columns ``estimate, std err``, one row per quantity.
        """
        self._require_data("population_quantities")

        return _schools.population_quantities(self, w=w, z=z, s=s)

    def predict(self, newdata=None, kind: str = "mean", conditional: bool = True) -> pd.Series:
        """Predicted mean, residual variance or residual SD, for new rows or the fitted rows.

        .. math::

            \\text{mean:}\\; x_i'\\beta + z_i'E(u_j \\mid y), \\qquad
            \\text{variance:}\\; e^{w_i'\\alpha} E(e^{g_i'v_j} \\mid y), \\qquad
            \\text{sd:}\\; e^{w_i'\\alpha/2} E(e^{g_i'v_j/2} \\mid y),

        the posterior (empirical-Bayes) means of the row's mean, variance and SD
        given its school's data (``g_i = 1`` for the plain random scale ``v``; so
        ``sd**2`` is not ``variance``). Population-level rows get the expectations
        over a new school: ``x_i'beta``, ``exp(w_i'alpha + g_i'Sigma_vv g_i/2)`` and
        ``exp(w_i'alpha/2 + g_i'Sigma_vv g_i/8)``.

        Parameters
        ----------
        newdata : pandas.DataFrame, dict of column -> array-like, or None
            Covariates (and the grouping column when ``conditional``). ``None``: the
            observations of the fit, in the caller's row order and with the
            caller's index (so ``res.predict()`` is :attr:`fittedvalues`). A dict of
            scalars is one row.
        kind : {"mean", "variance", "sd"}
            The mean, the residual variance or the residual standard deviation.
        conditional : bool
            Use the posterior of the school for schools of the fit; rows of other
            schools, and all rows when False, get population values. Rows whose
            school was not in the fit are counted in an
            :class:`~mlsml.errors.UnknownGroupWarning`, which also says when the
            group column has another type than in the fit (``"1"`` vs ``1``) and how
            to convert it.

        Returns
        -------
        pandas.Series
            Named ``kind``, indexed like ``newdata`` (or the fitted rows).

        Examples
        --------
        >>> import numpy as np, mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> pred = res.predict({"x": [0.0, 1.0], "school": [1, 1]})   # a dict, or a DataFrame
        >>> bool(abs(pred[1] - pred[0] - res.params["mean:x"]) < 1e-12)
        True
        >>> pop = res.predict({"x": 0.0}, kind="variance", conditional=False)   # a new school
        >>> bool(abs(pop[0] - np.exp(res.params["scale:Intercept"] + res.params["var(v)"] / 2)) < 1e-12)
        True
        >>> bool(res.predict().equals(res.fittedvalues.rename("mean")))   # the fitted rows
        True
        """
        self._require_data("predict")
        return _predict(self, newdata, kind=kind, conditional=conditional)

    def marginal_effects(self, variable: str, dpar: str = "sigma", at="overall", conditional: bool = False, alpha: float = 0.05):
        """Marginal effects of a covariate on the residual SD (``dpar="sigma"``), the mean or the variance.

        The change of the prediction per unit of ``variable`` (through every design column it
        enters), averaged over the fitted rows (``at="overall"``), at the covariate means
        (``"mean"``) or at given rows (a DataFrame), with delta-method standard errors from
        :meth:`cov_theta` (cluster-robust when :attr:`cov_type` is ``"robust"``) and intervals.
        See :func:`mlsml.margins.marginal_effects`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> me = res.marginal_effects("x", dpar="sigma")
        >>> bool(me["lower"].iloc[0] < me["dydx"].iloc[0] < me["upper"].iloc[0])
        True
        """
        self._require_data("marginal_effects")
        return _marginal_effects(self, variable, dpar=dpar, at=at, conditional=conditional, alpha=alpha)

    def get_prediction(self, newdata=None, kind: str = "mean", conditional: bool = True) -> PredictionResults:
        """Predictions (as :meth:`predict`) with standard errors and intervals.

        ``res.get_prediction(new).summary_frame(alpha=0.05)`` gives the columns
        ``mean, mean_se, mean_ci_lower, mean_ci_upper`` (statsmodels' names).

        **What the standard error contains.** For a population-level row
        (``conditional=False``, or a school not in the fit) the prediction is a
        function of the parameters only, and ``se`` is the delta-method standard
        error from the observed-information covariance of the estimates:
        ``se^2 = d' cov(theta_hat) d`` with ``d`` the gradient of the prediction.
        For a row of a school of the fit the prediction is a posterior mean
        ``E(f(b_j) | y; theta_hat)``, and ``se`` is the root mean squared error of
        prediction to first order (Booth & Hobert, 1998, JASA 93, 262-272):

        .. math::

            se^2 = \\operatorname{var}(f(b_j) \\mid y; \\hat\\theta)
                 + d'\\, \\operatorname{cov}(\\hat\\theta)\\, d,
            \\qquad d = \\partial E(f(b_j) \\mid y; \\theta) / \\partial\\theta,

        the school's posterior variance (``f(b) = x'beta + z'u`` for the mean,
        ``exp(w'alpha + g'v)`` for the variance, ``exp((w'alpha + g'v)/2)`` for the
        SD) plus the uncertainty of the estimates carried through the posterior
        mean (``d`` includes how the posterior mean moves with ``theta``; it is
        computed by central differences with the quadrature nodes held fixed). The
        two parts are ``se_posterior`` and ``se_params``. The second-order bias
        correction of the first term is not included. Without a positive-definite
        observed information ``se_params`` (hence ``se``) is NaN.

        Intervals are ``mean +/- z se`` for the mean and symmetric on the log scale
        for the variance and the SD (never below zero).

        Parameters
        ----------
        newdata, kind, conditional
            As :meth:`predict`.

        Returns
        -------
        mlsml.predict.PredictionResults
            ``.predicted``, ``.se``, ``.se_params``, ``.se_posterior`` (arrays) and
            ``.summary_frame(alpha)``.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> frame = res.get_prediction({"x": [0.0, 0.0], "school": [1, 1]}).summary_frame()
        >>> list(frame.columns)
        ['mean', 'mean_se', 'mean_ci_lower', 'mean_ci_upper']
        >>> pop = res.get_prediction({"x": [0.0]}, conditional=False)
        >>> bool(abs(pop.se[0] - res.bse["mean:Intercept"]) < 1e-9)   # x'b at x = 0 is the intercept
        True
        """
        self._require_data("get_prediction")
        return _get_prediction(self, newdata, kind=kind, conditional=conditional)

    @property
    def fittedvalues(self) -> pd.Series:
        """Conditional fitted means ``x_i'beta + z_i'E(u_j | y)`` of the observations used.

        As statsmodels' ``MixedLMResults.fittedvalues``: the school effects at their
        empirical-Bayes (posterior) means; in the caller's row order, indexed by
        the caller's index labels (rows dropped for missing values are absent).
        """
        self._require_data("fittedvalues")
        return _predict(self, None, kind="mean", conditional=True).rename("fittedvalues")

    @property
    def resid(self) -> pd.Series:
        """Residuals ``y - fittedvalues`` (same order and index as :attr:`fittedvalues`).

        Examples
        --------
        >>> import numpy as np, mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school")
        >>> bool(np.allclose(res.resid + res.fittedvalues, df["y"])), res.resid.index.equals(df.index)
        (True, True)
        """
        self._require_data("resid")
        fitted = self.fittedvalues
        design = self.model.design
        y = np.empty(design.nobs)
        y[design.order] = design.response  # back to the caller's order
        return pd.Series(y - fitted.to_numpy(), index=fitted.index, name="resid")

    @property
    def fe_params(self) -> pd.Series:
        """All fixed effects: ``mean:*``, then ``scale:*`` (and ``bsvar:*`` with ``bs_formula``).

        The regression coefficients, named as in :attr:`params` (statsmodels'
        ``MixedLMResults.fe_params`` holds the mean coefficients only; here the
        variance function's coefficients are fixed effects too).
        """
        names = [n for n in self.params.index if n.startswith(("mean:", "scale:", "bsvar:"))]
        return self.params[names].rename("fe_params")

    def re_correlations(self) -> pd.DataFrame:
        """Correlations of the school effects with delta-method standard errors.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", re_formula="~ x")
        >>> res.re_correlations().index.tolist()
        ['corr(u0,u1)', 'corr(u0,v)', 'corr(u1,v)']
        """
        lay = self.layout
        d = lay.d
        rows = []
        if d < 2:
            return pd.DataFrame(columns=["estimate", "std err"])

        pairs = lay.free_cov_pairs  # correlations fixed at zero (cov_constraints) are not estimates
        if not pairs:
            return pd.DataFrame(columns=["estimate", "std err"])
        iu = (np.array([i for i, _ in pairs]), np.array([j for _, j in pairs]))

        def corr_vec(theta):
            _, _, L = lay.split(theta)
            S = autograd.numpy.dot(L, L.T)
            sd = autograd.numpy.sqrt(autograd.numpy.diag(S))
            return S[iu] / (sd[iu[0]] * sd[iu[1]])

        est = corr_vec(np.asarray(self.theta))
        cov_t = self.cov_theta()
        if cov_t is not None:
            jac = autograd.jacobian(corr_vec)(np.asarray(self.theta))
            se = np.sqrt(np.clip(np.diag(jac @ cov_t @ jac.T), 0, None))
        else:
            se = np.full(est.shape, np.nan)
        re = lay.re_names
        for n, (i, j) in enumerate(pairs):
            rows.append((f"corr({re[i]},{re[j]})", est[n], se[n]))
        return pd.DataFrame(rows, columns=["name", "estimate", "std err"]).set_index("name")

    # ------------------------------------------------------------ diagnostics
    @property
    def singular(self) -> bool:
        """Whether ``Sigma`` is singular or on the boundary (see :meth:`singular_reasons`)."""
        return bool(self.singular_reasons())

    def singular_reasons(self) -> list[str]:
        """Why the fit is at a boundary: near-zero variances, correlations near +/-1.

        A variance of a mean effect counts as near zero when below ``1e-6`` times
        the average residual variance (scaled by ``mean(z^2)``); ``var(v)`` when
        below ``1e-6``; the correlation matrix when its smallest eigenvalue is below
        ``1e-6``.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> mlsml.fit("y ~ x", df, groups="school").singular_reasons()
        []
        """
        return list(self.diagnostics.singular_reasons)

    def residual_tails(self, n_sim: int = TAIL_N_SIM, seed: int | None = TAIL_SEED) -> TailCheck:
        """Whether the residuals are heavier-tailed within schools than normal (:func:`mlsml.diagnostics.tail_check`).

        Heavy tails make a random scale ``var(v)`` (and the scale coefficients) look
        larger than the differences of variance between schools are: check this before
        reading a variance effect as heterogeneity. ``summary()`` adds a note when it
        finds the tails heavy.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> check = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x").residual_tails(n_sim=199)
        >>> check.heavy, check.schools.shape
        (False, (40, 5))
        """
        self._require_data("residual_tails")
        return tail_check(self, n_sim=n_sim, seed=seed)

    def warn_if_problematic(self) -> None:
        """Issue the warnings a user must see (called by :meth:`MELSM.fit`)."""
        if not self.converged:
            collapse = self.diagnostics.collapse
            why = f". {collapse[0].upper()}{collapse[1:]}" if collapse else ""
            warn(f"the fit did NOT converge ({self.message}); do not use these estimates{why}", ConvergenceWarning)
        reasons = self.singular_reasons()
        if reasons:
            warn("singular fit: " + "; ".join(reasons), SingularFitWarning)
        check = self.diagnostics.quadrature_check
        if check is not None and np.isfinite(check[1]) and check[1] > 1e-4:
            warn(
                f"with {check[0]} quadrature points per dimension instead of {self.nagq} the log-likelihood "
                f"at the estimates changes by {check[1]:.2g}: the rule is not accurate enough for these data "
                f"(small clusters or a large random-scale variance); refit with nagq={check[0]} and compare",
                QuadratureWarning,
            )

    # ------------------------------------------------------------ output
    def summary(self, alpha: float = 0.05, style: str = "statsmodels"):
        """A statsmodels ``Summary`` (``.as_text()``, ``.as_html()``, ``.as_latex()``).

        Parameters
        ----------
        alpha : float
            Confidence level of the intervals is ``1 - alpha``.
        style : {"statsmodels", "mixwild"}
            Layout: statsmodels' summary2 tables, or the MIXREGLS/MIXWILD report
            (:func:`mlsml.mixwild.summarize_mixwild`; same ``as_*`` methods).
        """

        return _summary.summarize(self, alpha=alpha, style=style)

    def to_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Tidy table of the estimates: one row per parameter.

        Columns ``name`` (the parameter contract of :mod:`mlsml.params`),
        ``block`` (``mean``, ``scale`` or ``re``), ``term``, ``estimate``,
        ``std err``, ``z``, ``p`` (two-sided normal) and the Wald interval
        ``ci_lower``, ``ci_upper`` at level ``1 - alpha``.
        """
        ci = self.conf_int(alpha)
        names = list(self.params.index)
        blocks = [n.split(":", 1)[0] if ":" in n else "re" for n in names]
        terms = [n.split(":", 1)[1] if ":" in n else n for n in names]
        return pd.DataFrame(
            {
                "name": names,
                "block": blocks,
                "term": terms,
                "estimate": self.params.to_numpy(),
                "std err": self.bse.to_numpy(),
                "z": self.tvalues.to_numpy(),
                "p": self.pvalues.to_numpy(),
                "ci_lower": ci.iloc[:, 0].to_numpy(),
                "ci_upper": ci.iloc[:, 1].to_numpy(),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python content of the fit (what :meth:`to_json` writes); NaN becomes ``None``.

        Everything that describes the fit without its data: the formulas (also
        ``scale_re_formula``, ``bs_formula``), the parameter layout, the quadrature
        rule and points, the fit options, ``params``, ``bse``, ``cov_params``,
        ``theta`` with the observed information (``hessian``) and gradient,
        ``llf`` and the information criteria, ``nobs``, ``ngroups`` and the group
        sizes, the convergence record and the boundary diagnosis. See
        :mod:`mlsml.export`.
        """
        return results_to_dict(self)

    def to_json(self, path=None, indent: int = 2) -> str:
        """The fit as JSON (see :meth:`to_dict`); written to ``path`` when given.

        Floats are written with Python's shortest round-trip representation,
        so ``json.loads`` gives back exactly the same numbers, and
        :meth:`from_json` (or :func:`mlsml.load`) reads the fit back.
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, source) -> MELSMResults:
        """Read back a fit written by :meth:`to_json`.

        Parameters
        ----------
        source : str, path-like or dict
            JSON text, the path of a file :meth:`to_json` wrote, or the dict of
            :meth:`to_dict`.

        Returns
        -------
        MELSMResults
            With the estimates and everything computed from them (``params``,
            ``bse``, ``conf_int``, ``cov_params``, ``llf``, ``aic``, ``bic``,
            ``summary``, ``wald_test``, ``t_test``, ``re_correlations``,
            ``singular_reasons``); methods that need the observations
            (``predict``, ``fittedvalues``, ``school_effects``, ``simulate``, ...)
            raise :class:`~mlsml.errors.DataError` saying so. :func:`mlsml.lrtest`
            works between results read from JSON (the responses are compared by
            their SHA-256). Pickle a result to keep its data.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> back = mlsml.MELSMResults.from_json(res.to_json())
        >>> bool(back.params.equals(res.params)), back.llf == res.llf, back.has_data
        (True, True, False)
        """
        return cls(**results_fields_from_dict(read_json(source)))

    @property
    def has_data(self) -> bool:
        """Whether the fitted data travel with the result (not for results read from JSON)."""
        return not isinstance(self.model, DetachedModel)

    def _require_data(self, what: str) -> None:
        if not self.has_data:
            raise DataError(NO_DATA.format(what=what))

    def compare_lr_test(self, restricted: MELSMResults):
        """Likelihood-ratio test of ``restricted`` (nested) against this fit.

        See :func:`mlsml.lrtest`.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> m2 = mlsml.fit("y ~ x", df, groups="school")
        >>> m3 = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> m3.compare_lr_test(m2).df
        1
        """
        return lrtest(restricted, self)

    def simulate(self, n_reps: int = 1, seed=None) -> pd.DataFrame:
        """Draw new responses from the fitted model (covariates and groups as in the data).

        ``y*_ij = x_ij'b + z_ij'u*_j + exp{(w_ij'a + g_ij'v*_j)/2} e*_ij`` with
        ``(u*_j, v*_j) ~ N(0, S_j)``, ``e*_ij ~ N(0, 1)`` at the estimates ``(b, a, S)``
        (``g_ij = 1`` for the plain random scale; ``S_j = S`` unless ``bs_formula`` makes
        it school-specific; see :func:`mlsml.simulate.draw_responses`).

        Parameters
        ----------
        n_reps : int
            Number of independent response vectors.
        seed : int, numpy.random.Generator or None
            Seed of :func:`numpy.random.default_rng`.

        Returns
        -------
        pandas.DataFrame
            One row per observation used, in the caller's row order and indexed
            by the caller's index labels; one column per replicate.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        >>> sims = res.simulate(2, seed=3)
        >>> sims.shape == (len(df), 2), bool(sims.index.equals(df.index))
        (True, True)
        """
        self._require_data("simulate")
        return simulate_responses(self, n_reps=n_reps, seed=seed)

    def bootstrap(self, n: int, seed=None, n_jobs: int | None = None, progress: bool = True):
        """Parametric bootstrap: refit ``n`` simulated data sets in parallel.

        Bootstrap SEs are the SDs of the replicate estimates, the percentile
        intervals their quantiles; see :func:`mlsml.bootstrap.bootstrap`.

        Parameters
        ----------
        n : int
            Number of replicates (a few hundred for SEs, 1000+ for intervals).
        seed : int, numpy.random.Generator or None
            Seed of the simulated responses (results do not depend on ``n_jobs``).
        n_jobs : int, optional
            Worker processes (default: all CPUs; ``1``: no subprocesses).
        progress : bool
            Progress bar on stderr (tqdm if installed, else a counter).

        Returns
        -------
        mlsml.bootstrap.BootstrapResults

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.simulate_data([15] * 30, seed=1)
        >>> res = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
        >>> boot = res.bootstrap(20, seed=7, n_jobs=1, progress=False)
        >>> boot.n_converged, boot.bse.index.equals(res.params.index)
        (20, True)
        """
        self._require_data("bootstrap")
        return _bootstrap(self, n, seed=seed, n_jobs=n_jobs, progress=progress)

    def _repr_html_(self) -> str:
        """The summary as HTML (notebooks show it instead of the text repr)."""
        return self.summary().as_html()

    def __repr__(self) -> str:
        return (
            f"<MELSMResults: {self.model.formula_spec.formula!r}, N={self.nobs}, J={self.ngroups}, "
            f"llf={self.llf:.4f}, converged={self.converged}>"
        )
