"""The results of a fit: an immutable object built once by :meth:`MELSM.fit`.

Inference is Wald inference on the natural scale: the observed information is
the autograd Hessian of the log-likelihood on the optimiser scale ``theta``
(at nodes adapted to the estimates) and the covariance of the natural
parameters is ``J (-H)^{-1} J'`` with ``J = d natural / d theta`` (delta
method). At an interior maximum this equals the inverse observed information
in the natural parameterisation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import autograd
import numpy as np
import pandas as pd
from scipy import stats

from .errors import SingularFitWarning
from .params import ParamLayout

if TYPE_CHECKING:  # pragma: no cover
    from .model import MELSM


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class MELSMResults:
    """Maximum-likelihood fit of a mixed-effects location scale model.

    Do not build this yourself: :meth:`mlsml.MELSM.fit` returns it. All
    attributes are read-only.

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
    nagq : int
        Quadrature points per dimension.
    """

    model: MELSM
    theta: np.ndarray
    params: pd.Series
    llf: float
    converged: bool
    nagq: int
    hessian: np.ndarray
    grad: np.ndarray
    message: str
    n_passes: int
    n_iter: int
    fit_time: float
    method: str
    prune: float = 0.0
    _cov: np.ndarray = field(default=None, repr=False)
    _info: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ building
    @classmethod
    def from_optimum(cls, model: MELSM, opt, nagq: int, method: str, prune: float = 0.0) -> MELSMResults:
        """Assemble the results from an :class:`mlsml.optimize.Optimum`."""
        lay: ParamLayout = model.layout
        theta = _readonly(opt.theta)
        natural = np.asarray(lay.to_natural(theta), dtype=float)
        params = pd.Series(_readonly(natural), index=list(lay.names), name="estimate", copy=False)
        info: dict[str, Any] = {}
        H = np.asarray(opt.hessian, dtype=float)
        negH = -0.5 * (H + H.T)
        units = getattr(opt, "theta_units", None)
        try:
            # judged in the units of the standardised fit (see mlsml.optimize.maximize)
            w = np.linalg.eigvalsh(negH if units is None else negH * np.outer(units, units))
            pd_ok = bool(w.min() > 1e-10 * max(w.max(), 1e-300))
        except np.linalg.LinAlgError:
            pd_ok = False
        info["hessian_pd"] = pd_ok
        if pd_ok:
            cov_theta = np.linalg.inv(negH)
            jac = autograd.jacobian(lay.to_natural)(np.asarray(theta))
            cov = jac @ cov_theta @ jac.T
            cov = 0.5 * (cov + cov.T)
        else:
            cov = np.full((lay.n_params, lay.n_params), np.nan)
        res = cls(
            model=model,
            theta=theta,
            params=params,
            llf=float(opt.llf),
            converged=bool(opt.converged),
            nagq=int(nagq),
            hessian=_readonly(H),
            grad=_readonly(opt.grad),
            message=str(opt.message),
            n_passes=int(opt.n_passes),
            n_iter=int(opt.n_iter),
            fit_time=float(opt.time),
            method=method,
            prune=float(prune),
            _cov=_readonly(cov),
            _info=info,
        )
        return res

    # ------------------------------------------------------------ basics
    @property
    def layout(self) -> ParamLayout:
        """Parameter layout (names and sizes)."""
        return self.model.layout

    @property
    def nobs(self) -> int:
        """Number of observations used."""
        return self.model.design.nobs

    @property
    def ngroups(self) -> int:
        """Number of groups (schools)."""
        return self.model.design.ngroups

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
    def cov_params(self) -> pd.DataFrame:
        """Covariance matrix of the natural-scale estimates (delta method)."""
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
        """Wald confidence intervals ``params +/- z_{1-alpha/2} bse``."""
        z = stats.norm.ppf(1 - alpha / 2)
        lo = self.params - z * self.bse
        hi = self.params + z * self.bse
        return pd.DataFrame({f"{alpha / 2:g}": lo, f"{1 - alpha / 2:g}": hi})

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

    def re_correlations(self) -> pd.DataFrame:
        """Correlations of the school effects with delta-method standard errors."""
        lay = self.layout
        d = lay.d
        rows = []
        if d < 2:
            return pd.DataFrame(columns=["estimate", "std err"])

        def corr_vec(theta):
            _, _, L = lay.split(theta)
            S = autograd.numpy.dot(L, L.T)
            sd = autograd.numpy.sqrt(autograd.numpy.diag(S))
            iu = np.triu_indices(d, 1)
            return S[iu] / (sd[iu[0]] * sd[iu[1]])

        est = corr_vec(np.asarray(self.theta))
        if self._info.get("hessian_pd"):
            jac = autograd.jacobian(corr_vec)(np.asarray(self.theta))
            cov_t = np.linalg.inv(-0.5 * (self.hessian + self.hessian.T))
            se = np.sqrt(np.clip(np.diag(jac @ cov_t @ jac.T), 0, None))
        else:
            se = np.full(est.shape, np.nan)
        re = lay.re_names
        iu = np.triu_indices(d, 1)
        for n, (i, j) in enumerate(zip(*iu)):
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
        """
        lay = self.layout
        S = self.cov_re.to_numpy()
        reasons = []
        design = self.model.design
        resid_var = float(np.exp(np.mean(design.W @ self.fe_scale.to_numpy())))
        for i, name in enumerate(lay.re_names):
            if name == "v":
                ref = 1.0
            else:
                ref = resid_var / max(float(np.mean(design.Z[:, i] ** 2)), 1e-300)
            if S[i, i] < 1e-6 * ref:
                reasons.append(f"var({name}) = {S[i, i]:.3g} is effectively zero")
        sd = np.sqrt(np.clip(np.diag(S), 1e-300, None))
        R = S / np.outer(sd, sd)
        if lay.d > 1 and not reasons:
            ev = np.linalg.eigvalsh(R)
            if ev.min() < 1e-6:
                iu = np.triu_indices(lay.d, 1)
                worst = int(np.argmax(np.abs(R[iu])))
                i, j = iu[0][worst], iu[1][worst]
                reasons.append(
                    f"the school effects are (nearly) perfectly correlated: "
                    f"corr({lay.re_names[i]},{lay.re_names[j]}) = {R[i, j]:.6f}"
                )
        from .boundary import BOUNDARY_LR

        if "boundary" not in self._info:  # cached: d likelihood evaluations (mlsml.boundary)
            from .boundary import boundary_effects

            self._info["boundary"] = boundary_effects(self)
        for name, var, stat in self._info["boundary"]:
            if stat <= -BOUNDARY_LR:
                what = "making Sigma singular" if name == "rank" else f"dropping {name}"
                reasons.append(
                    f"{what} raises the log-likelihood by {-stat / 2:.3g}: these estimates are not the "
                    "maximum, the maximum is on the boundary"
                )
                continue
            if name == "rank":
                if any("correlated" in r for r in reasons):
                    continue
                iu = np.triu_indices(lay.d, 1)
                worst = int(np.argmax(np.abs(R[iu])))
                i, j = iu[0][worst], iu[1][worst]
                reasons.append(
                    f"Sigma is at the boundary: making the correlation matrix of the school effects singular "
                    f"(smallest eigenvalue {var:.2g} -> 0; largest correlation corr({lay.re_names[i]},"
                    f"{lay.re_names[j]}) = {R[i, j]:.6f}) changes 2*llf by only {-stat:+.1e}"
                )
            elif not any(r.startswith(f"var({name})") for r in reasons):
                reasons.append(  # the first check's threshold missed it
                    f"var({name}) = {var:.3g} is at the boundary: dropping {name} changes 2*llf by only {-stat:+.1e}"
                )
        if not self._info.get("hessian_pd", True):
            reasons.append("the observed information is not positive definite (standard errors unavailable)")
        return reasons

    def warn_if_problematic(self) -> None:
        """Issue the warnings a user must see (called by :meth:`MELSM.fit`)."""
        from .errors import ConvergenceWarning

        if not self.converged:
            warnings.warn(
                f"the fit did NOT converge ({self.message}); do not use these estimates",
                ConvergenceWarning,
                stacklevel=3,
            )
        reasons = self.singular_reasons()
        if reasons:
            warnings.warn("singular fit: " + "; ".join(reasons), SingularFitWarning, stacklevel=3)

    # ------------------------------------------------------------ output
    def summary(self, alpha: float = 0.05, style: str = "statsmodels"):
        """A statsmodels ``Summary`` (``.as_text()``, ``.as_html()``, ``.as_latex()``).

        Parameters
        ----------
        alpha : float
            Confidence level of the intervals is ``1 - alpha``.
        style : {"statsmodels"}
            Layout.
        """
        from .summary import summarize

        return summarize(self, alpha=alpha, style=style)

    def compare_lr_test(self, restricted: MELSMResults):
        """Likelihood-ratio test of ``restricted`` (nested) against this fit.

        See :func:`mlsml.lrtest`.
        """
        from .compare import lrtest

        return lrtest(restricted, self)

    def __repr__(self) -> str:
        return (
            f"<MELSMResults: {self.model.formula_spec.formula!r}, N={self.nobs}, J={self.ngroups}, "
            f"llf={self.llf:.4f}, converged={self.converged}>"
        )
