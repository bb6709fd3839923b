"""Starting values of the optimiser, for every model class, in one place.

Core models (:func:`start_values`): ``beta`` by least squares; ``sigma2_e`` by the
pooled within-school variance of the residuals and ``sigma2_u`` by the method of
moments from the school means; ``alpha`` reproduces ``ln sigma2_e`` with zero
slopes; random slopes start at 10% of the scaled intercept variance; the random
scale starts at ``var(v) = 0.1`` with zero correlations -- away from the saddle at
``sd(v) = 0`` where the likelihood's gradient vanishes.

The *wide* start (``wide=True``) is the same with the mean effects' variances at the
other end of their moment range (:func:`school_variance_start`): every between-school
variance of the residual means counted as school effect. It is the second start of
:func:`mlsml.diagnostics.settle`: the likelihood of a small or heteroscedastic data set can
have a second maximum, and which one a run reaches can depend on the side of it where
``var(u0)`` starts.

Models with ``scale_re_formula`` or ``bs_formula`` (:func:`start_values_ext`):
the core values of the model without the extensions, ``tau`` reproducing its
``var(u0)``, the log-variance effects independent with variance
:data:`START_VAR_V` (``v0``) and ``START_VAR_SLOPE / mean(g^2)`` (slopes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .design import Design
from .integrand import Integrand
from .params import ParamLayout

#: Starting variance of the (first) random scale effect ``v``.
START_VAR_V = 0.1

#: Starting variance of a random slope in the log variance, times ``mean(g^2)``.
START_VAR_SLOPE = 0.01

#: The wide start's ``var(u0)`` is at least this multiple of the default start's: where the
#: moment estimate is positive the variance of the residual means exceeds it only by the
#: sampling variance, too little to reach the other side (stored fuzz case
#: 8770553538507621726: 1.18 times the default start still led to the interior maximum
#: 0.28 below the global one; 2 times and more reached the global one).
WIDE_START_MIN_FACTOR = 4.0

#: Least squares by the normal equations when the column-scaled Gram matrix has a condition
#: number below this: squaring the condition of the design then still leaves about 8 correct
#: digits, ample for starting values, at the cost of one matrix product (``lstsq``'s SVD of
#: the N x p design took 2 x 33 ms on London Model 6); beyond it, ``lstsq``.
NORMAL_EQUATIONS_MAX_COND = 1e8


def start_values(integrand: Integrand, wide: bool = False) -> np.ndarray:
    """Starting values on the optimiser scale for the model class of ``integrand``.

    :func:`start_values_core` for the core model (:attr:`mlsml.integrand.Integrand.core`),
    :func:`start_values_ext` for the others; ``wide``: the wide start (module docstring).

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    >>> theta0 = start_values(model.objective().integrand)
    >>> theta0.shape == (model.layout.n_params,)
    True
    """
    if not isinstance(integrand, Integrand):  # the schools are held by Dask workers (mlsml.distributed)
        return integrand.start_values(wide=wide)
    if integrand.core:
        return start_values_core(integrand.design, wide)
    return start_values_ext(integrand.design, wide)


def school_variance_start(var_means: float, s2e: float, mean_inv_n: float, mean_n: float, wide: bool = False) -> float:
    r"""The starting ``var(u0)`` from the moments of the school means of the OLS residuals.

    .. math::

        \hat\sigma^2_u = \max\bigl(s^2_{\bar r} - s^2_e\,\overline{n^{-1}},\;
        0.1\, s^2_e / \bar n,\; 10^{-3} s^2_e\bigr),

    the method of moments kept away from zero; the wide start
    :math:`\max(s^2_{\bar r}, c\,\hat\sigma^2_u)` with :math:`c` =
    :data:`WIDE_START_MIN_FACTOR` (all variance of the school means counted as school effect).

    Parameters
    ----------
    var_means : float
        Variance of the schools' mean residuals, :math:`s^2_{\bar r}`.
    s2e : float
        Pooled within-school variance, :math:`s^2_e`.
    mean_inv_n, mean_n : float
        Mean of ``1 / n_j`` and of ``n_j`` over the schools.
    wide : bool
        The wide start.

    Examples
    --------
    >>> school_variance_start(1.0, 2.0, 0.25, 5.0)
    0.5
    >>> school_variance_start(1.0, 2.0, 0.25, 5.0, wide=True)
    2.0
    """
    s2u = max(var_means - s2e * mean_inv_n, 0.1 * s2e / max(mean_n, 1.0), 1e-3 * s2e)
    return max(var_means, WIDE_START_MIN_FACTOR * s2u) if wide else s2u


def start_values_core(design: Design, wide: bool = False) -> np.ndarray:
    """Moment-based starting values of a core model (see the module docstring)."""
    lay = design.layout
    y, X = design.y, design.X
    beta = least_squares(X, y)
    r = y - X @ beta
    n = design.counts
    rbar = np.add.reduceat(r, design.starts) / n
    within = r - rbar[design.group]
    dfw = max(design.nobs - design.ngroups, 1)
    s2e = float(np.sum(within**2) / dfw)
    if not np.isfinite(s2e) or s2e <= 0:
        s2e = float(np.var(r)) or 1.0
    s2u = school_variance_start(float(np.var(rbar)), s2e, float(np.mean(1.0 / n)), float(np.mean(n)), wide)
    target = np.full(design.nobs, np.log(s2e))
    alpha = least_squares(design.W, target if design.scale_offset is None else target - design.scale_offset)
    diag = []
    for i in range(lay.q):
        z2 = float(np.mean(design.Z[:, i] ** 2)) or 1.0
        diag.append(s2u / z2 if i == 0 else 0.1 * s2u / z2)
    if lay.random_scale:
        diag.append(START_VAR_V)
    return lay.theta_from_parts(beta, alpha, np.diag(diag))


def least_squares(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""The least-squares solution of ``A x = b`` for a full-column-rank ``A``.

    By the normal equations with the columns scaled to unit length,

    .. math:: (D^{-1} A'A D^{-1})\, (D x) = D^{-1} A'b, \qquad D = \operatorname{diag}\|a_i\|,

    when their condition number is below :data:`NORMAL_EQUATIONS_MAX_COND`, else by
    :func:`numpy.linalg.lstsq`.
    """
    G = A.T @ A
    D = np.sqrt(np.diag(G))
    if A.shape[1] and np.all(D > 0) and np.all(np.isfinite(G)):
        Gs = G / np.outer(D, D)
        if np.linalg.cond(Gs) < NORMAL_EQUATIONS_MAX_COND:
            return np.linalg.solve(Gs, (A.T @ b) / D) / D
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return x


def start_values_ext(design: Design, wide: bool = False) -> np.ndarray:
    """Starting values of a model with ``scale_re_formula`` or ``bs_formula`` (see the module docstring)."""
    lay = design.layout
    base = core_layout(lay)
    th = start_values_core(dataclasses.replace(design, layout=base), wide)
    G = design.G if lay.scale_re_terms else np.ones((design.nobs, lay.n_v))
    return extended_start(lay, th, [float(np.mean(G[:, i] ** 2)) for i in range(lay.n_v)])


def core_layout(lay: ParamLayout) -> ParamLayout:
    """The core model whose starting values :func:`start_values_ext` extends (same mean and variance functions)."""
    return ParamLayout(lay.mean_terms, lay.scale_terms, lay.q, lay.n_v > 0)


def extended_start(lay: ParamLayout, th: np.ndarray, g_mean_squares: list[float]) -> np.ndarray:
    r"""The starting values of :func:`start_values_ext` from the core model's, ``th`` (layout :func:`core_layout`).

    The mean-effect variances are the core model's, the random scale's variance
    :data:`START_VAR_V`, every further log-variance slope's :data:`START_VAR_SLOPE` over the
    mean square of its column of ``G`` (``g_mean_squares``), the between-school variance
    function's intercept the log of ``var(u0)``.
    """
    base = core_layout(lay)
    beta, alpha, L = base.split(th)
    Sb = np.asarray(L) @ np.asarray(L).T
    diag = list(np.diag(Sb)[: lay.q])
    for i in range(lay.n_v):
        diag.append(START_VAR_V if i == 0 else START_VAR_SLOPE / max(g_mean_squares[i], 1e-12))
    sigma = np.diag(diag)
    tau = None
    if lay.bs_terms:
        tau = np.zeros(lay.m)
        if "Intercept" in lay.bs_terms:
            tau[lay.bs_terms.index("Intercept")] = np.log(diag[0])
    return lay.theta_from_parts(np.asarray(beta), np.asarray(alpha), sigma, tau=tau)
