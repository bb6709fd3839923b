"""Integrating the mean effects out exactly: one-dimensional quadrature for random slopes.

Given the random scale ``v``, the integrand of school ``j`` is Gaussian in the
mean effects ``u`` (``q`` of them), so they can be integrated out in closed
form and only ``v`` needs quadrature. With ``E = exp(-v)``, ``P = Sigma^{-1}``
partitioned into ``(u, v)`` blocks and the per-school sums of
:mod:`mlsml.likelihood`::

    M(v) = E S2 + P_uu                       (q x q)
    c(v) = E S1 - P_uv v                     (q)
    g_j(v) = -n/2 log 2pi - A/2 - n v/2 - E S0/2          (data given u = 0)
             - 1/2 log|2 pi Sigma| - P_vv v^2/2
             + q/2 log 2pi - 1/2 log|M(v)| + c' M^{-1} c / 2
    L_j = int exp(g_j(v)) dv

``L_j`` is then computed by adaptive Gauss-Hermite in one dimension, centred at
the ``v``-component of the joint posterior mode and scaled by the ``v``-marginal
posterior standard deviation ``sqrt([(-H_j)^{-1}]_vv)`` (both from
:func:`mlsml.posterior.posterior_modes`). This is exact in ``u`` and costs
``O(J K q^3)`` with ``K`` one-dimensional nodes instead of ``K^{q+1}``: for the
paper's Model 4 (``q = 2``) 15 points reproduce the limit of the rotated 3-d
product rule to better than 1e-8 at a fraction of the cost (``docs/quadrature.md``).
``q <= 2`` use closed-form determinants and inverses, larger ``q`` a Cholesky
factorisation written out elementwise.

Used by :meth:`mlsml.MELSM.fit` (``quadrature="auto"``) for models with a random
scale and ``q >= 2`` mean effects (random intercept and slopes) and without the
extensions of :mod:`mlsml.extended`; ``quadrature="product"`` keeps the full product
rule. Models 2 and 3 (``q = 1``) keep the product rule by default (the core fast
path) and can use this one with ``quadrature="marginal"``.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from .likelihood import LOG2PI, logsumexp, school_sums
from .quadrature import Nodes, Rule, gauss_hermite_rule

#: Default one-dimensional points for the marginal rule.
DEFAULT_NAGQ_MARGINAL = 15


def supports(layout) -> bool:
    """Whether the marginal (u-exact) rule applies.

    A random scale and a random effect in the mean, or any model of
    :mod:`mlsml.extended` with a random scale
    (:func:`mlsml.extended.marginal_per_school_ext`).
    """
    if not layout.random_scale:
        return False
    if layout.extended:
        return True
    return layout.q >= 1


def marginal_rule(nagq: int, dim: int = 1) -> Rule:
    """The product Gauss-Hermite rule over the ``dim`` scale effects, flagged for :func:`adapt_marginal`."""
    r = gauss_hermite_rule(dim, nagq)
    return Rule(points=r.points, logw=r.logw, nagq=r.nagq, marginal=True)


def adapt_marginal(theta, design, rule: Rule) -> Nodes:
    """Nodes in ``v`` only: ``b[:, k, q] = m_j + s_j z_k`` (the ``u`` entries are unused zeros)."""
    from .posterior import posterior_modes

    if design.layout.extended:
        from .extended import adapt_marginal_ext

        return adapt_marginal_ext(theta, design, rule)
    q = design.layout.q
    mode, neg_hess = posterior_modes(np.asarray(theta, float), design)
    cov = np.linalg.inv(neg_hess)
    s = np.sqrt(cov[:, q, q])
    z = rule.points[:, 0]
    J, K = mode.shape[0], z.shape[0]
    b = np.zeros((J, K, q + 1))
    b[:, :, q] = mode[:, q, None] + s[:, None] * z[None, :]
    return Nodes(b=b, logw=rule.logw, log_det=np.log(s), mode=mode, chol=np.sqrt(cov[:, q:, q:]), marginal=True)


def loglik_marginal(theta, design, nodes: Nodes):
    """``sum_j log L_j`` with ``u`` integrated exactly and ``v`` on the given nodes (autograd)."""
    if design.layout.extended:
        from .extended import loglik_marginal_ext

        return loglik_marginal_ext(theta, design, nodes)
    return anp.sum(_per_school(theta, design, nodes))


def loglik_marginal_per_school(theta, design, nodes: Nodes) -> np.ndarray:
    """``log L_j`` for every school (numpy)."""
    if design.layout.extended:
        from .extended import marginal_per_school_ext

        return np.asarray(marginal_per_school_ext(np.asarray(theta, float), design, nodes))
    return np.asarray(_per_school(np.asarray(theta, float), design, nodes))


def _per_school(theta, design, nodes: Nodes):
    lay = design.layout
    q = lay.q
    beta, alpha, L = lay.split(theta)
    s = school_sums(beta, alpha, design)
    Linv = anp.linalg.inv(L)
    P = anp.dot(Linv.T, Linv)
    logdet_sigma = 2.0 * anp.sum(anp.log(anp.diag(L)))
    v = nodes.b[:, :, q]  # (J, K)
    E = anp.exp(-v)
    n = s.n[:, None]
    base = -0.5 * n * LOG2PI - 0.5 * s.A[:, None] - 0.5 * n * v - 0.5 * E * s.S0[:, None]
    prior = -0.5 * (q + 1) * LOG2PI - 0.5 * logdet_sigma - 0.5 * P[q, q] * v**2
    if q == 1:
        M = E * s.S2[:, None, 0, 0] + P[0, 0]
        c = E * s.S1[:, None, 0] - P[0, 1] * v
        logdetM = anp.log(M)
        quad = c**2 / M
    elif q == 2:
        m00 = E * s.S2[:, None, 0, 0] + P[0, 0]
        m01 = E * s.S2[:, None, 0, 1] + P[0, 1]
        m11 = E * s.S2[:, None, 1, 1] + P[1, 1]
        c0 = E * s.S1[:, None, 0] - P[0, 2] * v
        c1 = E * s.S1[:, None, 1] - P[1, 2] * v
        det = m00 * m11 - m01**2
        logdetM = anp.log(det)
        quad = (m11 * c0**2 - 2.0 * m01 * c0 * c1 + m00 * c1**2) / det
    else:
        Mx = [[E * s.S2[:, None, a, b] + P[a, b] for b in range(q)] for a in range(q)]
        cx = [E * s.S1[:, None, a] - P[a, q] * v for a in range(q)]
        logdetM, quad = gauss_terms(Mx, cx)
    g = base + prior + 0.5 * q * LOG2PI - 0.5 * logdetM + 0.5 * quad
    return nodes.log_det + logsumexp(g + nodes.logw[None, :], axis=1)


def gauss_terms(Mx, cx):
    """``log|M|`` and ``c' M^{-1} c`` from the entries of a symmetric positive-definite ``M``.

    ``Mx[a][b]`` and ``cx[a]`` are arrays of a common shape (one ``M`` per element):
    Cholesky factorisation and forward substitution written out elementwise, so that
    autograd can differentiate them. With ``q = 0`` both are 0.
    """
    q = len(cx)
    Lm: list = [[None] * q for _ in range(q)]
    logdetM = 0.0
    quad = 0.0
    y = []
    for i in range(q):
        for j in range(i + 1):
            acc = Mx[i][j]
            for k in range(j):
                acc = acc - Lm[i][k] * Lm[j][k]
            Lm[i][j] = anp.sqrt(acc) if i == j else acc / Lm[j][j]
        logdetM = logdetM + 2.0 * anp.log(Lm[i][i])
        acc = cx[i]
        for k in range(i):
            acc = acc - Lm[i][k] * y[k]
        y.append(acc / Lm[i][i])
        quad = quad + y[i] ** 2
    return logdetM, quad
