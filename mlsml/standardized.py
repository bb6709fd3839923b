r"""A fit's estimates for standardised covariates: what MixWILD reports with ``NCENT = 1``.

MixWILD (MIXREGLS, MIXREGMLS) offers to standardise every covariate before fitting
(``NCENT = 1``: each column of the mean, BS-variance and WS-variance designs, and of the
random-location design of MIXREGMLS, minus its mean over the level-1 rows and divided by
its SD with divisor ``N - 1``; an intercept column is left alone) and then prints the
estimates of the standardised model, labelled ``STANDARDIZED BETA``, ``STANDARDIZED
ALPHA``, ``STANDARDIZED TAU`` (its covariate descriptives are those before
standardising). It does not transform them back.

Standardising is an exact reparametrisation: with ``M_s = M P`` (column ``j`` of ``M``
replaced by ``(m_j - c_j) / s_j``, the intercept column absorbing the centring),

.. math::

    \beta_s = P_x^{-1}\beta, \qquad \alpha_s = P_w^{-1}\alpha, \qquad
    \tau_s = P_S^{-1}\tau, \qquad \Sigma_s = T\Sigma T', \quad T = \operatorname{diag}(P_z^{-1}, I),

and the log-likelihood is the same. So mlsml fits on the original scale (``res.params``:
the back-transformed estimates, internally the fit is standardised anyway, see
:mod:`mlsml.rescale`) and :func:`standardized_params` gives MixWILD's standardised table
from any fit, with standard errors by the (exact, linear) delta method: the same numbers as
a fit to standardised data. A design without an intercept column is scaled but not
centred (centring would change the model). With ``bs_formula`` the random-effects design
is not standardised (the log-linear variance of ``u0`` is not invariant to it). With random
slopes and covariances fixed at zero (``cov_constraints``) there is no standardised model of
the same form (centring mixes the intercept with the slopes): an error says so.

Examples
--------
>>> import mlsml, numpy as np
>>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school", scale_formula="~ x")
>>> std = res.standardized_params()
>>> bool(np.isclose(std.loc["mean:x", "estimate"], res.params["mean:x"] * std.attrs["sd"]["mean:x"], rtol=1e-12))
True
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .design import Design
from .errors import ModelSpecError

stats = LazyModule("scipy.stats")  # imported on first use: keeps `import mlsml` fast


def column_map(M: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``P`` with ``M P`` the standardised columns, and the means and SDs used.

    Means and SDs (divisor ``sum(weights) - 1``) over the rows of ``M``, each row counted
    ``weights`` times (the level-1 rows of a school-level design). An all-ones column is the
    intercept: it is kept and absorbs the centring; without one the columns are only scaled.
    Constant columns (SD 0) are left as they are, as MixWILD's ``STANDZ`` does.

    Examples
    --------
    >>> M = np.array([[1.0, 2.0], [1.0, 4.0], [1.0, 6.0]])
    >>> P, mean, sd = column_map(M)
    >>> (M @ P)[:, 1].tolist(), mean.tolist(), sd.tolist()
    ([-1.0, 0.0, 1.0], [1.0, 4.0], [0.0, 2.0])
    """
    M = np.asarray(M, dtype=float)
    w = np.ones(M.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    n = w.sum()
    mean = w @ M / n
    sd = np.sqrt(w @ (M - mean) ** 2 / (n - 1.0))
    return _map(mean, sd, np.all(M == 1.0, axis=0))


def column_map_from_moments(moments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`column_map` from a design's column moments (a fit on a Dask cluster, whose rows stay on
    the workers: :class:`mlsml.distributed.ColumnMoments`, with ``n``, ``lo``, ``hi``, ``mean``, ``m2``)."""
    n = float(moments.n)
    mean = np.asarray(moments.mean, dtype=float)
    sd = np.sqrt(np.asarray(moments.m2, dtype=float) / (n - 1.0))
    return _map(mean, sd, (np.asarray(moments.lo) == 1.0) & (np.asarray(moments.hi) == 1.0))


def _map(mean: np.ndarray, sd: np.ndarray, ones: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``P`` of :func:`column_map` from the means, SDs and which columns are all ones."""
    first = np.flatnonzero(ones)
    P = np.eye(mean.size)
    for j in range(mean.size):
        if sd[j] > 0:
            P[j, j] = 1.0 / sd[j]
            if first.size:
                P[first[0], j] = -mean[j] / sd[j]
    return P, mean, sd


def _design_map(design, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`column_map` of the design matrix ``name`` (``"X"``, ``"W"``, ``"Z"``), in memory or on a Dask cluster."""
    if isinstance(design, Design):
        return column_map(getattr(design, name))
    return column_map_from_moments(getattr(design.moments, name))


def _bs_map(design) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`column_map` of the ``bs_formula`` design: one row per school weighted by its rows, or,
    with level-1 columns, over the rows (as MixWILD standardises); in memory or on a Dask cluster."""
    if isinstance(design, Design):
        if design.S_level1 is None:
            return column_map(design.S, weights=design.counts)
        return column_map(design.S[design.group] + design.S_level1)
    level1 = design.S_level1_columns
    if level1 is not None and np.any(level1):
        return column_map_from_moments(design.moments.Srows)
    return column_map(design.school_bs_covariates(), weights=np.asarray(design.counts, dtype=float))


def _maps(res):
    """The linear map of the natural parameters to the standardised ones, and each parameter's SD factor."""
    design = res.model.design
    lay = res.layout
    p, k, m = lay.p, lay.k, lay.m
    Px, mx, sx = _design_map(design, "X")
    Pw, mw, sw = _design_map(design, "W")
    blocks = [np.linalg.inv(Px), np.linalg.inv(Pw)]
    sds = list(sx) + list(sw)
    means = list(mx) + list(mw)
    if lay.bs_terms:
        Ps, ms, ss = _bs_map(design)
        blocks.append(np.linalg.inv(Ps))
        sds += list(ss)
        means += list(ms)
        Tz = np.eye(lay.q)
    elif lay.q:
        Pz, _, sz = _design_map(design, "Z")
        Tz = np.linalg.inv(Pz)
    else:
        Tz = np.eye(0)
    n = lay.n_params
    off = p + k + m
    A = np.zeros((n, n))
    pos = 0
    for B in blocks:
        A[pos : pos + B.shape[0], pos : pos + B.shape[0]] = B
        pos += B.shape[0]
    full = lay.d * (lay.d + 1) // 2
    if lay.bs_terms or np.array_equal(Tz, np.eye(lay.q)):
        # Sigma0's entries (bs_formula), or a random-effects design without covariates: the
        # covariance parameters (and association="quadratic"'s quad(u0,v)) are unchanged
        A[off:, off:] = np.eye(n - off)
    elif n - off != full:
        raise ModelSpecError(
            "standardized_params: centring the random-slope covariates mixes the random intercept with the slopes, "
            "so a model with covariances fixed at zero (cov_constraints, association='none') has no standardised "
            "counterpart of the same form; standardise the data and fit that model instead"
        )
    else:
        T = np.eye(lay.d)
        T[: lay.q, : lay.q] = Tz
        for col in range(off, n):
            e = np.zeros(n)
            e[col] = 1.0
            S = T @ lay.sigma_from_natural(e) @ T.T
            iu = np.triu_indices(lay.d, 1)
            A[off:, col] = np.concatenate([np.diag(S), S[iu]])
    sds += [np.nan] * (n - len(sds))
    means += [np.nan] * (n - len(means))
    return A, np.asarray(sds), np.asarray(means)


def standardized_params(res, alpha: float = 0.05) -> pd.DataFrame:
    """The fit's estimates for standardised covariates, with standard errors (MixWILD's ``NCENT = 1``).

    Parameters
    ----------
    res : MELSMResults
    alpha : float
        For the confidence interval columns.

    Returns
    -------
    pandas.DataFrame
        ``estimate``, ``std err``, ``z``, ``P>|z|`` and the interval, indexed by the
        parameter names of ``res.params``; ``attrs["mean"]`` and ``attrs["sd"]`` hold the
        means and SDs of the design columns used (NaN for the covariance parameters).
    """
    A, sds, means = _maps(res)
    est = A @ res.params.to_numpy(dtype=float)
    cov = res.cov_params()
    se = np.full(est.shape, np.nan) if cov is None else np.sqrt(np.clip(np.diag(A @ cov.to_numpy() @ A.T), 0, None))
    z = est / se
    crit = stats.norm.ppf(1 - alpha / 2)
    out = pd.DataFrame(
        {
            "estimate": est,
            "std err": se,
            "z": z,
            "P>|z|": 2 * stats.norm.sf(np.abs(z)),
            f"[{alpha / 2:g}": est - crit * se,
            f"{1 - alpha / 2:g}]": est + crit * se,
        },
        index=res.params.index,
    )
    out.attrs["mean"] = dict(zip(res.params.index, means))
    out.attrs["sd"] = dict(zip(res.params.index, sds))
    return out
