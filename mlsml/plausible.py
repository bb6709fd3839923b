r"""Plausible values: one fit per value of the outcome, pooled by Rubin's rules.

Large-scale assessments (PISA, TIMSS, PIRLS) give ``M`` plausible values of each
student's score, draws from the posterior of the latent proficiency; an analysis is run once
per plausible value and the ``M`` results are combined (Rubin 1987; Mislevy et al. 1992; the
PISA Data Analysis Manual, OECD 2009, ch. 8). With :math:`\hat\theta_m` and :math:`U_m` the
estimates and their covariance from plausible value :math:`m`,

.. math::

    \bar\theta = \frac1M \sum_m \hat\theta_m, \qquad
    \bar U = \frac1M \sum_m U_m, \qquad
    B = \frac{1}{M-1} \sum_m (\hat\theta_m - \bar\theta)(\hat\theta_m - \bar\theta)', \qquad
    T = \bar U + \Big(1 + \frac1M\Big) B .

The standard errors are :math:`\sqrt{\operatorname{diag} T}`; the between-imputation part
:math:`(1 + 1/M) B` is reported with the fraction of missing information
:math:`\lambda = (1 + 1/M) B_{kk} / T_{kk}` and Rubin's degrees of freedom
:math:`\nu = (M - 1) / \lambda^2` (intervals use the :math:`t_\nu` quantile). Each fit's
covariance is its own ``cov_params()`` (cluster-robust with sampling weights,
:mod:`mlsml.robust`). School predictions (the posterior means and SDs of the school effects,
:meth:`mlsml.MELSMResults.random_effects`) are pooled the same way, with the posterior
variance in the role of :math:`U`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .errors import ConvergenceWarning, ModelSpecError, warn
from .model import fit
from .params import wald_intervals
from .results import MELSMResults
from .validate import describe_value

stats = LazyModule("scipy.stats")  # imported on first use (import time)


@dataclass(frozen=True)
class PlausibleValuesResults:
    """Estimates pooled over plausible values (:func:`fit_pv`; module docstring).

    Attributes
    ----------
    fits : tuple of MELSMResults
        One fit per plausible value, in the order of ``pv``.
    pv : tuple of str
        The plausible-value columns.
    params : pandas.Series
        :math:`\\bar\\theta`, the mean of the estimates.
    within : pandas.DataFrame
        :math:`\\bar U`, the mean covariance of the fits.
    between : pandas.DataFrame
        :math:`B`, the covariance of the estimates across plausible values.
    cov_type : str
        The fits' covariance type (``"robust"`` or ``"nonrobust"``).
    """

    fits: tuple
    pv: tuple
    params: pd.Series
    within: pd.DataFrame
    between: pd.DataFrame
    cov_type: str

    @property
    def n_pv(self) -> int:
        """The number of plausible values ``M``."""
        return len(self.fits)

    def cov_params(self) -> pd.DataFrame:
        """:math:`T = \\bar U + (1 + 1/M) B`."""
        return self.within + (1.0 + 1.0 / self.n_pv) * self.between

    @property
    def bse(self) -> pd.Series:
        """Standard errors :math:`\\sqrt{T_{kk}}`."""
        return pd.Series(np.sqrt(np.clip(np.diag(self.cov_params()), 0, None)), index=self.params.index, name="std err")

    @property
    def fmi(self) -> pd.Series:
        """Fraction of missing information :math:`(1 + 1/M) B_{kk} / T_{kk}`."""
        T = np.diag(self.cov_params())
        return pd.Series((1.0 + 1.0 / self.n_pv) * np.diag(self.between) / T, index=self.params.index, name="fmi")

    @property
    def df(self) -> pd.Series:
        """Rubin's degrees of freedom :math:`(M - 1) / \\lambda^2` (infinite where ``B`` is zero)."""
        lam = self.fmi.to_numpy()
        with np.errstate(divide="ignore"):
            out = np.where(lam > 0, (self.n_pv - 1) / lam**2, np.inf)
        return pd.Series(out, index=self.params.index, name="df")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Intervals ``params +/- t_{df, 1 - alpha/2} bse``; variances on the log scale.

        A variance's interval is symmetric on its log scale, with the pooled SE mapped
        by the delta method (:func:`mlsml.params.wald_intervals`), as for one fit
        (:meth:`mlsml.results.MELSMResults.conf_int`).
        """
        if not 0 < alpha < 1:
            raise ModelSpecError(f"alpha must be between 0 and 1, not {describe_value(alpha)}")
        q = stats.t.ppf(1 - alpha / 2, self.df.to_numpy())
        lo, hi = wald_intervals(self.params.index, self.params.to_numpy(), self.bse.to_numpy(), q)
        return pd.DataFrame({"lower": lo, "upper": hi}, index=self.params.index)

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Estimates, total SE, its between-imputation part, the fraction of missing information, df and interval.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=30, seed=1)
        >>> df["pv1"], df["pv2"] = df["y"], df["y"] + 0.1 * df["x"]
        >>> pooled = mlsml.fit_pv("score ~ x", df, pv=["pv1", "pv2"], groups="school", random_scale=False)
        >>> list(pooled.summary_frame().columns)
        ['estimate', 'std err', 'se between', 'fmi', 'df', 'lower', 'upper']
        """
        ci = self.conf_int(alpha)
        return pd.DataFrame(
            {
                "estimate": self.params,
                "std err": self.bse,
                "se between": np.sqrt((1.0 + 1.0 / self.n_pv) * np.clip(np.diag(self.between), 0, None)),
                "fmi": self.fmi,
                "df": self.df,
                "lower": ci["lower"],
                "upper": ci["upper"],
            }
        )

    def random_effects(self) -> pd.DataFrame:
        """The school effects' posterior means pooled over plausible values, with total and between SDs.

        For every effect ``e`` (``u0``, ``v``, ...): ``e`` (the mean over plausible values of the
        posterior means), ``e_sd`` (:math:`\\sqrt{\\bar U + (1 + 1/M) B}` with ``U`` the
        posterior variance) and ``e_sd_between`` (:math:`\\sqrt{(1 + 1/M) B}`); ``n`` as in each fit.
        """
        tables = [f.random_effects() for f in self.fits]
        first = tables[0]
        M = self.n_pv
        out = pd.DataFrame(index=first.index)
        effects = [c for c in first.columns if c != "n" and not c.endswith("_sd")]
        for e in effects:
            means = np.stack([t[e].to_numpy() for t in tables])
            var = np.stack([t[f"{e}_sd"].to_numpy() ** 2 for t in tables])
            B = means.var(axis=0, ddof=1) if M > 1 else np.zeros(means.shape[1])
            out[e] = means.mean(axis=0)
            out[f"{e}_sd"] = np.sqrt(var.mean(axis=0) + (1.0 + 1.0 / M) * B)
            out[f"{e}_sd_between"] = np.sqrt((1.0 + 1.0 / M) * B)
        if "n" in first.columns:
            out["n"] = first["n"]
        return out

    @property
    def llf(self) -> np.ndarray:
        """The log-likelihood of each fit (no pooled log-likelihood exists)."""
        return np.array([f.llf for f in self.fits])


def pool(fits: Sequence[MELSMResults], pv: Sequence[str] | None = None) -> PlausibleValuesResults:
    """Pool fits of the same model to different plausible values by Rubin's rules (module docstring)."""
    fits = tuple(fits)
    if len(fits) < 2:
        raise ModelSpecError(f"pooling needs at least two fits (plausible values), got {len(fits)}")
    names = list(fits[0].params.index)
    if any(list(f.params.index) != names for f in fits):
        raise ModelSpecError("the fits to pool must have the same parameters (the same model on each plausible value)")
    P = np.stack([f.params.to_numpy() for f in fits])
    U = np.stack([f.cov_params().to_numpy() for f in fits])
    mean = P.mean(axis=0)
    D = P - mean
    B = D.T @ D / (len(fits) - 1)
    kinds = {f.cov_type for f in fits}
    return PlausibleValuesResults(
        fits=fits,
        pv=tuple(pv) if pv is not None else tuple(str(i) for i in range(len(fits))),
        params=pd.Series(mean, index=names, name="estimate"),
        within=pd.DataFrame(U.mean(axis=0), index=names, columns=names),
        between=pd.DataFrame(B, index=names, columns=names),
        cov_type=kinds.pop() if len(kinds) == 1 else "mixed",
    )


def fit_pv(formula: str, data: pd.DataFrame, pv: Sequence[str], groups, warm_start: bool = True, **kwargs) -> PlausibleValuesResults:
    r"""Fit the model once per plausible value and pool the results by Rubin's rules.

    Parameters
    ----------
    formula : str
        The mean formula; its left-hand side (any name, e.g. ``"math ~ escs"``) is replaced by
        each plausible-value column in turn.
    data : pandas.DataFrame
    pv : sequence of str
        The plausible-value columns (at least two), e.g. ``["PV1MATH", ..., "PV5MATH"]``.
    groups : str or array-like
        As :func:`mlsml.fit`.
    warm_start : bool, default True
        Start the fits after the first from the first one's estimates (the same maximum is
        found; fewer iterations).
    **kwargs
        Any other argument of :func:`mlsml.fit` (``scale_formula``, ``weights``,
        ``group_weights``, ``cov_type``, ...), the same for every plausible value.

    Returns
    -------
    PlausibleValuesResults

    Warns
    -----
    ConvergenceWarning
        When a fit did not converge (the pooled estimates then must not be used).

    Examples
    --------
    >>> import numpy as np, mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=30, seed=1)
    >>> rng = np.random.default_rng(0)
    >>> for m in range(1, 4):
    ...     df[f"pv{m}"] = df["y"] + rng.normal(0, 0.3, len(df))
    >>> pooled = mlsml.fit_pv("score ~ x", df, pv=["pv1", "pv2", "pv3"], groups="school", random_scale=False)
    >>> pooled.n_pv, bool(pooled.summary_frame()["se between"].gt(0).all())
    (3, True)
    """
    if isinstance(pv, str) or not isinstance(pv, Sequence) or len(pv) < 2:
        raise ModelSpecError(f"pv must be a list of at least two plausible-value columns, not {describe_value(pv)}")
    missing = [c for c in pv if c not in data.columns]
    if missing:
        raise ModelSpecError(f"the plausible values {missing} are not columns of the data")
    if "~" not in formula:
        raise ModelSpecError(f"formula {formula!r} needs a left-hand side (replaced by each plausible value) and a right-hand side")
    rhs = formula.split("~", 1)[1]
    fits = []
    start = kwargs.pop("start_params", None)
    for col in pv:
        lhs = col if str(col).isidentifier() else f"Q({col!r})"
        res = fit(f"{lhs} ~ {rhs}", data, groups, start_params=start, **kwargs)
        if not res.converged:
            message = f"the fit to plausible value {col!r} did not converge ({res.message}); the pooled estimates must not be used"
            warn(message, ConvergenceWarning)
        fits.append(res)
        if warm_start and start is None and res.converged:
            start = res.params
    return pool(fits, pv)
