"""Posterior modes and curvatures of the school effects, and node adaptation.

For school ``j`` the log joint density of data and effects is
``h_j(b) = log f(y_j | b) + log phi(b; 0, Sigma)``. Its mode ``m_j`` and the
Hessian there centre and scale the quadrature (:mod:`mlsml.quadrature`). With
``E = exp(-v)`` and ``P = Sigma^{-1}`` the derivatives are::

    d h / d u     = E (S1 - S2 u) - (P b)_u
    d h / d v     = -n/2 + E Q(u)/2 - (P b)_v
    d2h / du du'  = -E S2 - P_uu
    d2h / du dv   = -E (S1 - S2 u) - P_uv
    d2h / dv2     = -E Q(u)/2 - P_vv

The mode is found by Newton's method, vectorised over schools, started at
the exact mode of the model without random scale (``v = 0``). Where ``-H`` is
not positive definite the Fisher-scoring matrix (``E Q/2`` replaced by its
expectation ``n/2`` and the ``u``-``v`` cross term dropped) is used, and every
step is halved until ``h`` does not decrease. The result is a deterministic
function of the parameters.
"""

from __future__ import annotations

import numpy as np

from .design import Design
from .likelihood import SchoolSums, loglik_at_nodes, school_sums
from .quadrature import Nodes, Rule, default_nagq, gauss_hermite_rule, place_nodes


def _log_joint(b: np.ndarray, s: SchoolSums, P: np.ndarray, q: int, rs: bool) -> np.ndarray:
    u = b[:, :q]
    Q = s.S0 - 2 * np.einsum("jq,jq->j", u, s.S1) + np.einsum("jq,jqr,jr->j", u, s.S2, u)
    if rs:
        v = b[:, q]
        ll = -0.5 * s.n * v - 0.5 * np.exp(-v) * Q
    else:
        ll = -0.5 * Q
    return ll - 0.5 * np.einsum("jd,de,je->j", b, P, b)


def _derivs(b: np.ndarray, s: SchoolSums, P: np.ndarray, q: int, rs: bool, fisher: bool = False):
    J, d = b.shape
    u = b[:, :q]
    S2u = np.einsum("jqr,jr->jq", s.S2, u)
    resid = s.S1 - S2u
    g = -(b @ P)  # P symmetric
    H = np.broadcast_to(-P, (J, d, d)).copy()
    if rs:
        v = b[:, q]
        E = np.exp(-v)
        Q = s.S0 - 2 * np.einsum("jq,jq->j", u, s.S1) + np.einsum("jq,jq->j", u, S2u)
        g[:, :q] += E[:, None] * resid
        g[:, q] += -0.5 * s.n + 0.5 * E * Q
        H[:, :q, :q] -= E[:, None, None] * s.S2
        if fisher:
            H[:, q, q] -= 0.5 * s.n
        else:
            H[:, :q, q] -= E[:, None] * resid
            H[:, q, :q] -= E[:, None] * resid
            H[:, q, q] -= 0.5 * E * Q
    else:
        g[:, :q] += resid
        H[:, :q, :q] -= s.S2
    return g, H


def _is_pd(M: np.ndarray) -> np.ndarray:
    sym = 0.5 * (M + np.swapaxes(M, 1, 2))
    return np.linalg.eigvalsh(sym)[:, 0] > 0


def posterior_modes(theta: np.ndarray, design: Design, tol: float = 1e-18, maxiter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Modes ``m_j`` of ``h_j`` and ``-H_j`` there, for all schools.

    Iterates until every school's Newton decrement ``g' (-H)^{-1} g`` is
    below ``tol`` (Newton converges quadratically, so this costs one or two
    extra iterations over a loose tolerance).

    Returns
    -------
    mode : ndarray (J, d)
    neg_hess : ndarray (J, d, d)
    """
    lay = design.layout
    if lay.extended:  # scale_re_formula / bs_formula: see mlsml.extended
        from .extended import posterior_modes_ext

        return posterior_modes_ext(theta, design, tol=tol, maxiter=maxiter)
    beta, alpha, L = lay.split(np.asarray(theta, dtype=float))
    L = np.asarray(L)
    s = school_sums(beta, alpha, design)
    s = SchoolSums(*(np.asarray(a) for a in s))
    q, rs, d = lay.q, lay.random_scale, lay.d
    Linv = np.linalg.inv(L)
    P = Linv.T @ Linv
    J = design.ngroups
    b = np.zeros((J, d))
    # exact mode for v = 0 (and ignoring the u-v prior coupling)
    if q:
        A = s.S2 + P[None, :q, :q]
        b[:, :q] = np.linalg.solve(A, s.S1[:, :, None])[:, :, 0]
    f = _log_joint(b, s, P, q, rs)
    active = np.ones(J, dtype=bool)
    # A school is also finished when its (possibly damped) Newton step no longer
    # raises h at all: it is then at its mode to machine precision and its
    # decrement is rounding noise (as near a singular Sigma, where P is huge).
    # Without this such schools were iterated until maxiter with 40 halvings each.
    stalled = np.zeros(J, dtype=bool)
    for _ in range(maxiter):
        g, H = _derivs(b, s, P, q, rs)
        negH = -H
        pd_ok = _is_pd(negH)
        if not pd_ok.all():
            _, Hf = _derivs(b, s, P, q, rs, fisher=True)
            negH[~pd_ok] = -Hf[~pd_ok]
        step = np.linalg.solve(negH, g[:, :, None])[:, :, 0]
        dec = np.einsum("jd,jd->j", g, step)  # Newton decrement (squared)
        active = (dec > tol) & ~stalled
        if not active.any():
            break
        t = np.ones(J)
        for _half in range(40):
            bn = b + t[:, None] * step
            fn = _log_joint(bn, s, P, q, rs)
            ok = (fn >= f - 1e-12 * np.abs(f)) | ~active
            if ok.all():
                break
            t = np.where(ok, t, 0.5 * t)
        upd = active & ok
        stalled |= active & (~ok | (fn <= f))
        b[upd] = bn[upd]
        f[upd] = fn[upd]
    _, H = _derivs(b, s, P, q, rs)
    negH = -H
    bad = ~_is_pd(negH)
    if bad.any():  # a saddle or flat direction: fall back to the Fisher matrix
        _, Hf = _derivs(b, s, P, q, rs, fisher=True)
        negH[bad] = -Hf[bad]
    return b, negH


def adapt(theta: np.ndarray, design: Design, rule: Rule) -> Nodes:
    """Quadrature nodes adapted to the posterior of every school at ``theta``.

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.quadrature import gauss_hermite_rule
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> nodes = adapt(res.theta, res.model.design, gauss_hermite_rule(2, 11))
    >>> nodes.b.shape, nodes.mode.shape
    ((40, 121, 2), (40, 2))
    """
    if rule.marginal:  # u integrated exactly, nodes in v only (mlsml.marginal)
        from .marginal import adapt_marginal

        return adapt_marginal(theta, design, rule)
    mode, neg_hess = posterior_modes(theta, design)
    return place_nodes(mode, neg_hess, rule)


def loglik(theta: np.ndarray, design: Design, nagq: int | None = None, prune: float = 0.0) -> float:
    """Adaptive Gauss-Hermite log-likelihood at ``theta`` (nodes adapted at ``theta``).

    Parameters
    ----------
    theta : ndarray
        Optimiser-scale parameters (see :mod:`mlsml.params`).
    design : Design
    nagq : int, optional
        Points per dimension; default :func:`mlsml.quadrature.default_nagq`.
    prune : float
        Node pruning threshold (see :func:`mlsml.quadrature.gauss_hermite_rule`).

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> bool(abs(loglik(res.theta, res.model.design, nagq=21) - res.llf) < 1e-4)
    True
    """
    d = design.layout.d
    rule = gauss_hermite_rule(d, nagq or default_nagq(d), prune)
    return float(loglik_at_nodes(np.asarray(theta, float), design, adapt(theta, design, rule)))
