"""Comparing fitted models: likelihood-ratio tests and comparison tables.

When the restricted model drops one school effect (e.g. the random scale
``v``: ``var(v) = 0`` and its covariances with the ``q`` other effects), the
null value is on the boundary of the parameter space and the LR statistic
follows the mixture ``0.5 chi2(q) + 0.5 chi2(q + 1)`` (Self & Liang, 1987;
Stram & Lee, 1994) rather than ``chi2(q + 1)``. :func:`lrtest` detects this
case from the parameter names and uses the mixture (``q`` counts the covariances
that are parameters: with ``association="none"`` dropping ``v`` is
``0.5 chi2(0) + 0.5 chi2(1)``). Tests of the association itself
(``cov(u0,v) = 0``, ``quad(u0,v) = 0``; :func:`mlsml.compare_associations`) have
interior nulls and use ``chi2(df)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .errors import MLSMLWarning, ModelSpecError, warn
from .export import response_fingerprint

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


def _response_id(res) -> str:
    """SHA-256 of the response in the caller's order (stored in results read from JSON)."""
    stored = res.model.design.info.get("response_sha256")
    if stored or not res.has_data:
        return stored or ""
    design = res.model.design
    y = np.empty(design.nobs)
    y[design.order] = design.y
    return response_fingerprint(y)  # not cached: nothing is written into a results object


def lrtest(a, b) -> LRTestResult:
    """Likelihood-ratio test of the nested model against the fuller one, in either order.

    Parameters
    ----------
    a, b : MELSMResults
        Fits to the same observations, one nested in the other (its parameter
        names a proper subset of the other's); the order does not matter. Results
        read from JSON (:func:`mlsml.load`) work too: their responses are
        compared by SHA-256.

    Returns
    -------
    LRTestResult
        ``statistic = 2 (llf_full - llf_restricted)``; the p-value uses the
        boundary-corrected mixture when exactly one school effect is removed.

    Raises
    ------
    ModelSpecError
        When the fits are to different data, or neither model is nested in the
        other (the message lists the parameters each has that the other lacks).

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
    >>> mlsml.lrtest(m2, m1).statistic == test.statistic   # either order
    True
    """
    if a.nobs != b.nobs or a.ngroups != b.ngroups:
        raise ModelSpecError(f"the models were fitted to different data (N = {a.nobs} vs {b.nobs}, J = {a.ngroups} vs {b.ngroups})")
    stored = a.model.design.info.get("response_sha256") or b.model.design.info.get("response_sha256")
    if a.has_data and b.has_data and not stored:  # (a fit on a Dask cluster stores a fingerprint)
        same_y = bool(np.allclose(a.model.design.y, b.model.design.y))
    else:
        same_y = _response_id(a) == _response_id(b) != ""
    if not same_y:
        raise ModelSpecError("the models were fitted to different responses")
    if any((r.model.design.info.get("weights") or {}).get("kind") == "sampling" for r in (a, b)):
        warn(
            "these are sampling-weighted pseudo-likelihoods: the likelihood-ratio statistic does not follow the chi-square "
            "distribution; test with Wald tests on the robust standard errors (res.wald_test) instead",
            MLSMLWarning,
        )
    a_names, b_names = set(a.params.index), set(b.params.index)
    if a_names < b_names:
        restricted, full = a, b
    elif b_names < a_names:
        restricted, full = b, a
    elif a_names == b_names:
        raise ModelSpecError("the two models have the same parameters: neither is nested in the other")
    else:
        raise ModelSpecError(
            "neither model is nested in the other: the first has "
            f"{sorted(a_names - b_names)} that the second lacks, and the second has {sorted(b_names - a_names)}"
        )
    r_names, f_names = set(restricted.params.index), set(full.params.index)
    df = len(f_names) - len(r_names)
    stat = max(0.0, 2.0 * (full.llf - restricted.llf))
    p_naive = float(stats.chi2.sf(stat, df))
    dropped_re = _re_set(full) - _re_set(restricted)
    if len(dropped_re) == 1:
        lay = full.layout
        e = lay.re_names.index(next(iter(dropped_re)))
        q = sum(1 for pair in lay.free_cov_pairs if e in pair)  # its covariances (those not fixed at zero)
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
