"""Comparing fitted models: likelihood-ratio tests and comparison tables.

When the restricted model drops one school effect (e.g. the random scale
``v``: ``var(v) = 0`` and its covariances with the ``q`` other effects), the
null value is on the boundary of the parameter space and the LR statistic
follows the mixture ``0.5 chi2(q) + 0.5 chi2(q + 1)`` (Self & Liang, 1987;
Stram & Lee, 1994) rather than ``chi2(q + 1)``. :func:`lrtest` detects this
case from the parameter names and uses the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .errors import ModelSpecError

stats = LazyModule("scipy.stats")  # imported on first use: it would double the time of `import mlsml`


@dataclass(frozen=True)
class LRTestResult:
    """Result of :func:`lrtest`.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> m1 = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> m2 = mlsml.fit("y ~ x", df, groups="school")
    >>> t = mlsml.lrtest(m1, m2)
    >>> t.df, t.pvalue < t.pvalue_naive
    (2, True)
    """

    statistic: float
    df: int
    pvalue: float
    reference: str
    pvalue_naive: float

    def __repr__(self) -> str:
        return f"LR test: chi2 = {self.statistic:.4f}, df = {self.df}, p = {self.pvalue:.4g} (reference: {self.reference})"


def _re_set(res) -> set[str]:
    return set(res.layout.re_names)


def lrtest(restricted, full) -> LRTestResult:
    """Likelihood-ratio test of a restricted model nested in a fuller one.

    Parameters
    ----------
    restricted, full : MELSMResults
        Fits to the same observations; ``restricted`` must be nested in ``full``
        (this function checks the observations and the parameter names).

    Returns
    -------
    LRTestResult
        ``statistic = 2 (llf_full - llf_restricted)``; the p-value uses the
        boundary-corrected mixture when exactly one school effect is removed.

    Examples
    --------
    Does the residual variance differ between schools (Model 1 against Model 2)?

    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> m1 = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> m2 = mlsml.fit("y ~ x", df, groups="school")
    >>> test = mlsml.lrtest(m1, m2)
    >>> test.reference
    '0.5 chi2(1) + 0.5 chi2(2) (boundary: var(v) = 0)'
    >>> bool(test.statistic == 2 * (m2.llf - m1.llf)), test.pvalue < 0.05
    (True, True)
    """
    if restricted.nobs != full.nobs or restricted.ngroups != full.ngroups:
        raise ModelSpecError(
            f"the models were fitted to different data (N = {restricted.nobs} vs {full.nobs}, "
            f"J = {restricted.ngroups} vs {full.ngroups})"
        )
    if not np.allclose(restricted.model.design.y, full.model.design.y):
        raise ModelSpecError("the models were fitted to different responses")
    r_names, f_names = set(restricted.params.index), set(full.params.index)
    extra = r_names - f_names
    if extra:
        raise ModelSpecError(f"the restricted model is not nested: it has parameters {sorted(extra)} the full one lacks")
    df = len(f_names) - len(r_names)
    if df <= 0:
        raise ModelSpecError("the full model must have more parameters than the restricted one")
    stat = max(0.0, 2.0 * (full.llf - restricted.llf))
    p_naive = float(stats.chi2.sf(stat, df))
    dropped_re = _re_set(full) - _re_set(restricted)
    if len(dropped_re) == 1:
        q = len(_re_set(restricted))
        other = df - (q + 1)  # fixed-effect terms dropped at the same time
        lo, hi = q + other, q + 1 + other
        p_lo = stats.chi2.sf(stat, lo) if lo > 0 else float(stat <= 0)
        p = float(0.5 * p_lo + 0.5 * stats.chi2.sf(stat, hi))
        ref = f"0.5 chi2({lo}) + 0.5 chi2({hi}) (boundary: var({next(iter(dropped_re))}) = 0)"
    else:
        p = p_naive
        ref = f"chi2({df})"
    return LRTestResult(statistic=stat, df=df, pvalue=p, reference=ref, pvalue_naive=p_naive)


def compare_models(results, names=None) -> pd.DataFrame:
    """Table of fit statistics, with LR tests of each model against the previous one.

    Parameters
    ----------
    results : sequence of MELSMResults
        Fits to the same data, in increasing complexity.
    names : sequence of str, optional
        Row labels (default ``Model 1, Model 2, ...``).

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> m1 = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> m2 = mlsml.fit("y ~ x", df, groups="school")
    >>> m3 = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> table = mlsml.compare_models([m1, m2, m3])
    >>> list(table.columns)
    ['npar', 'llf', 'deviance', 'AIC', 'BIC', 'converged', 'LR chi2', 'df', 'p']
    >>> table["npar"].tolist()
    [4, 6, 7]
    """
    names = list(names or [f"Model {i + 1}" for i in range(len(results))])
    rows = []
    for i, r in enumerate(results):
        row = {
            "model": names[i],
            "npar": r.df_model,
            "llf": r.llf,
            "deviance": r.deviance,
            "AIC": r.aic,
            "BIC": r.bic,
            "converged": r.converged,
            "LR chi2": np.nan,
            "df": np.nan,
            "p": np.nan,
        }
        if i > 0:
            prev = results[i - 1]
            if set(prev.params.index) < set(r.params.index):
                t = lrtest(prev, r)
                row.update({"LR chi2": t.statistic, "df": t.df, "p": t.pvalue})
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
