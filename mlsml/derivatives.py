r"""Gradient and Hessian of the per-school-sums likelihood, chained through the sums.

For the per-school-sums integrand (:class:`mlsml.integrand.SchoolSums`) the data enter
the likelihood only through the sums :math:`T_j = (A_j, S_{0j}, S_{1j}, S_{2j})` of
school :math:`j`, functions of :math:`\lambda = (\beta, \alpha)`; the other parameters
:math:`\psi` (the Cholesky factor of :math:`\Sigma`, and :math:`\tau` of a
between-school variance model) enter directly. With the nodes held fixed,

.. math::

    \ell(\theta) = R(T(\lambda), \psi), \qquad R(T, \psi) = \sum_j r_j(T_j, \psi),

and the chain rule gives

.. math::

    \frac{\partial \ell}{\partial\lambda} = \sum_j J_j' \frac{\partial r_j}{\partial T_j}, \qquad
    \frac{\partial^2 \ell}{\partial\lambda\,\partial\lambda'}
        = \sum_j J_j' \frac{\partial^2 r_j}{\partial T_j \partial T_j'} J_j
        + \sum_j \sum_t \frac{\partial r_j}{\partial T_{jt}}
          \frac{\partial^2 T_{jt}}{\partial\lambda\,\partial\lambda'},

    \frac{\partial^2 \ell}{\partial\lambda\,\partial\psi'}
        = \sum_j J_j' \frac{\partial^2 r_j}{\partial T_j \partial\psi'}, \qquad
    \frac{\partial^2 \ell}{\partial\psi\,\partial\psi'} = \frac{\partial^2 R}{\partial\psi\,\partial\psi'},

with :math:`J_j = \partial T_j / \partial\lambda'`. With :math:`c_i = e^{-w_i'\alpha}`,
:math:`r_i = y_i - x_i'\beta` the sums and their derivatives are

.. math::

    A_j = \sum_i w_i'\alpha, \quad S_{0j} = \sum_i c_i r_i^2, \quad
    S_{1j} = \sum_i c_i r_i z_i, \quad S_{2j} = \sum_i c_i z_i z_i',

    \partial_\beta S_0 = -2\sum c r x, \quad \partial_\alpha S_0 = -\sum c r^2 w, \quad
    \partial_\beta S_{1a} = -\sum c z_a x, \quad \partial_\alpha S_{1a} = -\sum c r z_a w, \quad
    \partial_\alpha S_{2ab} = -\sum c z_a z_b w, \quad \partial_\alpha A = \sum w,

    \partial^2_{\beta\beta} S_0 = 2\sum c\, x x', \quad
    \partial^2_{\beta\alpha} S_0 = 2\sum c r\, x w', \quad
    \partial^2_{\alpha\alpha} S_0 = \sum c r^2\, w w', \quad
    \partial^2_{\beta\alpha} S_{1a} = \sum c z_a\, x w', \quad
    \partial^2_{\alpha\alpha} S_{1a} = \sum c r z_a\, w w', \quad
    \partial^2_{\alpha\alpha} S_{2ab} = \sum c z_a z_b\, w w',

so the gradient is two matrix-vector products ``X' u``, ``W' u`` and the second term of
the Hessian three weighted cross products of the designs.

**Hessian** (:func:`sums_hessian`, every ``SchoolSums`` model and rule): the derivatives
of ``R`` come from autograd on the likelihood itself with the sums as inputs (the same
code as the value, so nothing is written twice): since ``r_j`` involves school ``j``
only, its Hessian in ``T`` is block diagonal, and one Hessian-vector product with the
direction "sum ``t`` in every school" gives column ``t`` of every block. So
``m + n_psi`` reverse passes over a function of ``J x K`` arrays (``m = 2 + q + q^2``
sums, ``n_psi`` direct parameters) replace the ``n_params`` reverse passes over the
``N x p`` designs of ``autograd.hessian``: on London Model 6 (43 parameters) 7 instead
of 43.

**Closed form** (the core model, one ``Sigma`` and one plain random scale or none:
:func:`node_derivatives`, :func:`closed_form_gradient`, :func:`closed_form_reduced`). Every
direction ``a`` -- a sum ``T_jt`` or a log-Cholesky parameter ``psi_k`` -- changes the
integrand at node ``k`` of school ``j`` by ``g_a`` to first and ``h_ab`` to second order
(besides the second derivatives of ``P = Sigma^{-1}`` in ``psi``); with the node weights
:math:`p_{jk} \propto \exp\{h_j(b_{jk}) + \log\tilde w_k\}`,

.. math::

    \frac{\partial r_j}{\partial a} = \sum_k p_{jk} g_a, \qquad
    \frac{\partial^2 r_j}{\partial a\,\partial b} = \sum_k p_{jk}(h_{ab} + g_a g_b)
        - \frac{\partial r_j}{\partial a}\frac{\partial r_j}{\partial b}
        + \Big[\sum_k p_{jk} \frac{\partial h}{\partial P}\Big] \cdot
          \frac{\partial^2 P}{\partial a\,\partial b}.

*Product rule*: ``h_j(b) = log f + log phi`` is linear in the sums and in ``P``
(:math:`E = e^{-v}`, or 1 without a random scale): :math:`g_A = -\tfrac12`,
:math:`g_{S_0} = -\tfrac12 E`, :math:`g_{S_1} = E u`, :math:`g_{S_2} = -\tfrac12 E\,uu'`,
:math:`\partial h/\partial P = -\tfrac12 bb'`, :math:`\partial h / \partial\log|\Sigma| = -\tfrac12`,
and ``h_ab = 0``. *u-exact rule*: with :math:`M = E S_2 + P_{uu}`,
:math:`c = E S_1 - P_{uv} v`, :math:`\mu = M^{-1}c` (:mod:`mlsml.gaussian`) and
:math:`G = -\tfrac12(M^{-1} + \mu\mu')`, a direction moving ``M``, ``c`` and the linear
terms by ``dM_a``, ``dc_a``, ``dl_a`` gives

.. math::

    g_a = \operatorname{tr}(G\,dM_a) + \mu' dc_a + dl_a, \qquad
    h_{ab} = \tfrac12 \operatorname{tr}(M^{-1} dM_a M^{-1} dM_b) + e_a' M^{-1} e_b,
    \quad e_a = dc_a - dM_a\,\mu.

``P`` is differentiated through :math:`L^{-1}` as the likelihood computes it
(:math:`d(L^{-1}) = -L^{-1}\,dL\,L^{-1}`; with ``Sigma`` nearly singular ``P`` is
``O(1/lambda)`` but :math:`L^{-1}` only :math:`O(1/\sqrt\lambda)`). The symmetric ``S2``
moves as a symmetric matrix: the direction of entry ``(a, b)``, ``a <= b``, is
``E_ab + E_ba`` and that of ``(b, a)`` zero (their Jacobians are equal, so the chain
rule is unchanged). This replaces autograd's reverse pass at every one of the
optimiser's evaluations (about 280 traced operations, 5 ms on London Model 3) and the
Hessian-vector products; tests/test_derivatives.py checks both against autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import autograd
import autograd.numpy as anp
import numpy as np
from scipy import sparse

from .design import Design
from .integrand import Integrand, SchoolSums, Sums
from .params import chol_derivatives


class GivenSums(SchoolSums):
    """The per-school-sums integrand with the sums given (the function ``R`` of the module docstring)."""

    def __init__(self, integrand: SchoolSums, sums: Sums):
        super().__init__(integrand.design)
        self._sums = sums

    def sums(self, beta, alpha, Z=None) -> Sums:
        return self._sums


def _pack(s: Sums) -> np.ndarray:
    """``T`` as a ``(J, m)`` array: ``A, S0, S1[0..q), S2`` row by row."""
    J = s.A.shape[0]
    return np.concatenate([s.A[:, None], s.S0[:, None], s.S1.reshape(J, -1), s.S2.reshape(J, -1)], axis=1)


def _unpack(T, n: np.ndarray, q: int) -> Sums:
    """Inverse of :func:`_pack` (autograd)."""
    J = T.shape[0]
    return Sums(n, T[:, 0], T[:, 1], T[:, 2 : 2 + q], anp.reshape(T[:, 2 + q :], (J, q, q)))


class ReducedDerivatives(NamedTuple):
    """First and second derivatives of ``R(T, psi)`` (module docstring) at the sums of ``theta``.

    Attributes
    ----------
    RT : ndarray (J, m)
        ``dr_j / dT_j``.
    RTT : ndarray (J, m, m)
        ``d^2 r_j / dT_j dT_j'``.
    RTpsi : ndarray (J, m, n_psi)
        ``d^2 r_j / dT_j dpsi'``.
    Rpsipsi : ndarray (n_psi, n_psi)
        ``d^2 R / dpsi dpsi'``.
    """

    RT: np.ndarray
    RTT: np.ndarray
    RTpsi: np.ndarray
    Rpsipsi: np.ndarray


def sums_hessian(integrand: SchoolSums, theta: np.ndarray, reduced: ReducedDerivatives) -> np.ndarray:
    """The Hessian in ``theta`` from the derivatives of ``R`` by the chain rule through the sums.

    Parameters
    ----------
    integrand : SchoolSums
    theta : ndarray
        Optimiser-scale parameters.
    reduced : ReducedDerivatives
        From :func:`autograd_reduced` (any model) or :func:`closed_form_reduced` (the core model
        under the u-exact rule).

    Returns
    -------
    ndarray (n_params, n_params)
        Equal to autograd's Hessian of the same likelihood up to rounding.
    """
    lay = integrand.layout
    theta = np.asarray(theta, dtype=float)
    nl = lay.p + lay.k  # (beta, alpha): through the sums only
    RT, RTT, RTpsi, Rpsipsi = reduced
    J, m = RT.shape
    P = theta.size
    H = np.zeros((P, P))
    Jac, Hsecond = _sums_derivatives(integrand.design, theta[: lay.p], theta[lay.p : nl], lay.q, RT)
    flat = Jac.reshape(J * m, nl)
    H[:nl, :nl] = flat.T @ (RTT @ Jac).reshape(J * m, nl) + Hsecond
    H[:nl, nl:] = flat.T @ RTpsi.reshape(J * m, P - nl)
    H[nl:, :nl] = H[:nl, nl:].T
    H[nl:, nl:] = Rpsipsi
    return 0.5 * (H + H.T)


def autograd_reduced(integrand: SchoolSums, theta: np.ndarray, log_lik: Callable[[Integrand, object], object]) -> ReducedDerivatives:
    """The derivatives of ``R`` by autograd on the likelihood with the sums as inputs.

    Parameters
    ----------
    integrand : SchoolSums
    theta : ndarray
    log_lik : callable
        ``log_lik(integrand, theta)``: the log-likelihood with the nodes held fixed
        (autograd-differentiable; it must see the data only through ``integrand``).
    """
    lay = integrand.layout
    theta = np.asarray(theta, dtype=float)
    q = lay.q
    nl = lay.p + lay.k
    s = Sums(*(np.asarray(a, dtype=float) for a in integrand.sums(theta[: lay.p], theta[lay.p : nl])))
    T0 = _pack(s)
    J, m = T0.shape
    P = theta.size

    def R(x):
        T = anp.reshape(x[: J * m], (J, m))
        return log_lik(GivenSums(integrand, _unpack(T, s.n, q)), x[J * m :])

    x0 = np.concatenate([T0.ravel(), theta])
    hvp, grad = autograd.make_vjp(autograd.grad(R))(x0)
    RT = np.reshape(grad[: J * m], (J, m))
    RTT = np.empty((J, m, m))
    for t in range(m):
        v = np.zeros((J, m))
        v[:, t] = 1.0
        RTT[:, :, t] = np.reshape(hvp(np.concatenate([v.ravel(), np.zeros(P)]))[: J * m], (J, m))
    npsi = P - nl
    RTpsi = np.empty((J, m, npsi))
    Rpsipsi = np.empty((npsi, npsi))
    for a in range(npsi):
        e = np.zeros(J * m + P)
        e[J * m + nl + a] = 1.0
        col = hvp(e)
        RTpsi[:, :, a] = np.reshape(col[: J * m], (J, m))
        Rpsipsi[:, a] = col[J * m + nl :]
    return ReducedDerivatives(RT, RTT, RTpsi, Rpsipsi)


class NodeDerivatives(NamedTuple):
    """First and (weighted) second derivatives of the integrand at the nodes (module docstring).

    Attributes
    ----------
    g : ndarray (n, J, K)
        ``g_a`` for the ``n = m + n_psi`` directions (sums, then log-Cholesky parameters).
    hw : ndarray (n, n, J) or None
        ``sum_k p_jk h_ab``, including the second derivatives of ``P`` (``None`` when not asked for).
    m : int
        Number of sums.
    """

    g: np.ndarray
    hw: np.ndarray | None
    m: int


def _inverse_chol_derivatives(L: np.ndarray, free=None):
    """``L^-1``, ``dL_k``, ``d(L^-1)_k``, ``d^2(L^-1)_kl`` and ``d log|Sigma| / dpsi_k`` (the free entries ``psi_k`` only)."""
    d = L.shape[0]
    Linv = np.linalg.inv(L)
    dL = chol_derivatives(L, free)
    npsi = dL.shape[0]
    dLinv = -Linv @ dL @ Linv
    d2Linv = np.zeros((npsi, npsi, d, d))
    for k in range(npsi):
        for l_ in range(k, npsi):
            t = Linv @ dL[l_] @ Linv @ dL[k] @ Linv + Linv @ dL[k] @ Linv @ dL[l_] @ Linv
            if k == l_:  # d^2 L / dpsi_k^2: the diagonal entry again (exp), 0 off it
                t = t - Linv @ (dL[k] * np.eye(d)) @ Linv
            d2Linv[k, l_] = d2Linv[l_, k] = t
    dlogdet = 2.0 * np.sum(np.einsum("kii->ki", dL) / np.diag(L), axis=1)  # log|Sigma| = 2 sum log L_ii
    return Linv, dL, dLinv, d2Linv, dlogdet


def node_derivatives(
    integrand: SchoolSums, theta: np.ndarray, sums: Sums, b: np.ndarray, uexact: bool, weights: np.ndarray | None = None
) -> NodeDerivatives:
    """:class:`NodeDerivatives` of the core model's integrand at the nodes ``b`` (J, K, d).

    Parameters
    ----------
    integrand : SchoolSums
        Of a core model (:attr:`mlsml.integrand.Integrand.core`).
    theta : ndarray
    sums : Sums
        The sums at ``theta``.
    b : ndarray (J, K, d) or (J, K, 1)
        The nodes in all effects (product rule), or in ``v`` only (``uexact``).
    uexact : bool
    weights : ndarray (J, K), optional
        The node weights ``p_jk``; the second derivatives are computed only when given.
    """
    lay = integrand.layout
    q = lay.q
    L = np.asarray(lay.split(np.asarray(theta, dtype=float))[2], dtype=float)
    Linv, dL, dLinv, d2Linv, dlogdet = _inverse_chol_derivatives(L, lay.free_chol)
    npsi = dL.shape[0]
    J, K = b.shape[:2]
    m = 2 + q + q * q
    n = m + npsi
    g = np.zeros((n, J, K))
    hw = None
    if uexact:
        P = Linv.T @ Linv  # as log_h_uexact computes it
        dP = np.swapaxes(dLinv, 1, 2) @ Linv + Linv.T @ dLinv
        vv = b[:, :, 0]
        E = np.exp(-vv)
        M = E[:, :, None, None] * sums.S2[:, None] + P[:q, :q]
        c = E[:, :, None] * sums.S1[:, None, :] - P[:q, q] * vv[:, :, None]
        Minv = 1.0 / M if q == 1 else np.linalg.inv(M)
        mu = np.einsum("jkab,jkb->jka", Minv, c)
        G = -0.5 * (Minv + mu[:, :, :, None] * mu[:, :, None, :])
        dM = np.zeros((n, J, K, q, q))
        dc = np.zeros((n, J, K, q))
        g[0] = -0.5  # A
        g[1] = -0.5 * E  # S0
        for a in range(q):
            dc[2 + a, :, :, a] = E  # S1[a]
            for b_ in range(a, q):  # S2[a, b] as a symmetric direction
                t = 2 + q + a * q + b_
                dM[t, :, :, a, b_] = E
                dM[t, :, :, b_, a] = E
        for k in range(npsi):
            dM[m + k] = dP[k, :q, :q]
            dc[m + k] = -dP[k, :q, q] * vv[:, :, None]
            g[m + k] = -0.5 * dP[k, q, q] * vv**2 - 0.5 * dlogdet[k]
        g += np.einsum("jkxy,njkyx->njk", G, dM) + np.einsum("jkx,njkx->njk", mu, dc)
        if weights is not None:
            e = dc - np.einsum("njkxy,jky->njkx", dM, mu)
            A = np.einsum("jkxy,njkyz->njkxz", Minv, dM)
            Me = np.einsum("jkxy,njky->njkx", Minv, e)
            hw = 0.5 * _weighted_gram(A, np.swapaxes(A, 3, 4), weights) + _weighted_gram(e, Me, weights)
            # h is linear in P: dh/dP (entry by entry as used) times d^2 P
            d2P = np.swapaxes(d2Linv, 2, 3) @ Linv + np.swapaxes(dLinv, 1, 2)[:, None] @ dLinv[None, :]
            d2P = d2P + np.swapaxes(d2P, 2, 3)
            dh_dP = np.zeros((J, K) + L.shape)
            dh_dP[:, :, :q, :q] = G
            dh_dP[:, :, :q, q] = -vv[:, :, None] * mu
            dh_dP[:, :, q, q] = -0.5 * vv**2
            hw[m:, m:] += np.einsum("jk,jkxy,abxy->abj", weights, dh_dP, d2P)
        return NodeDerivatives(g, hw, m)
    # product rule: h = log f + log phi, linear in the sums; log phi = -|z|^2/2 - log|Sigma|/2
    # with z = L^-1 b (as log_prior computes it), so dz = d(L^-1) b
    u = b[:, :, :q]
    E = np.exp(-b[:, :, q]) if lay.random_scale else np.ones((J, K))
    g[0] = -0.5
    g[1] = -0.5 * E
    for a in range(q):
        g[2 + a] = E * u[:, :, a]
        for b_ in range(a, q):
            g[2 + q + a * q + b_] = -0.5 * E * u[:, :, a] * u[:, :, b_] * (1.0 if a == b_ else 2.0)
    z = b @ Linv.T
    dz = b[None] @ np.swapaxes(dLinv, 1, 2)[:, None]
    g[m:] = -np.sum(z[None] * dz, axis=3) - 0.5 * dlogdet[:, None, None]
    if weights is not None:
        # sum_k p (dz_a'dz_b + z'd^2z_ab) = tr(C_ab B_j), B_j = sum_k p b b', C = dLinv'dLinv + Linv'd2Linv
        B = np.einsum("jk,jkx,jky->jxy", weights, b, b)
        C = np.einsum("ayx,byz->abxz", dLinv, dLinv) + np.einsum("yx,abyz->abxz", Linv, d2Linv)
        hw = np.zeros((n, n, J))
        hw[m:, m:] = -np.einsum("abxy,jxy->abj", C, B)
    return NodeDerivatives(g, hw, m)


def _weighted_gram(X: np.ndarray, Y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``out[a, b, j] = sum_k weights[j, k] <X[a, j, k], Y[b, j, k]>`` by one batched matrix product."""
    n, J, K = X.shape[:3]
    Xw = (X * weights.reshape((1, J, K) + (1,) * (X.ndim - 3))).reshape(n, J, -1)
    Yr = Y.reshape(Y.shape[0], J, -1)
    return np.moveaxis(np.moveaxis(Xw, 0, 1) @ np.moveaxis(Yr, 0, 2), 0, 2)


def closed_form_reduced(nd: NodeDerivatives, weights: np.ndarray, group_weights: np.ndarray | None = None) -> ReducedDerivatives:
    """:class:`ReducedDerivatives` from the node derivatives (with ``hw``) and the node weights ``p_jk``.

    With level-2 weights ``W_j`` (:mod:`mlsml.weights`) ``R = sum_j W_j r_j``: every school's
    derivatives are multiplied by its weight.
    """
    g, m = nd.g, nd.m
    pg = np.sum(weights[None] * g, axis=2)
    second = _weighted_gram(g, g, weights) - pg[:, None] * pg[None, :] + nd.hw
    if group_weights is not None:
        pg = pg * group_weights
        second = second * group_weights
    return ReducedDerivatives(
        RT=pg[:m].T,
        RTT=np.moveaxis(second[:m, :m], 2, 0),
        RTpsi=np.moveaxis(second[:m, m:], 2, 0),
        Rpsipsi=second[m:, m:].sum(axis=2),
    )


def closed_form_gradient(
    integrand: SchoolSums, theta: np.ndarray, nd: NodeDerivatives, weights: np.ndarray, per_school: bool = False
) -> np.ndarray:
    """The gradient in ``theta`` from the node derivatives and the node weights ``p_jk`` (J, K).

    ``d/dpsi = sum_j dr_j/dpsi``; ``d/dbeta = X' sum_t a_t g_t``, ``d/dalpha = W' sum_t b_t g_t``
    with ``g_t`` the ``dr_j / dT_jt`` of each row's school (coefficients of :func:`_coefficients`);
    each school's terms times its level-2 weight. With ``per_school`` the ``(J, n_params)``
    contributions of the schools (their scores, :mod:`mlsml.robust`) instead of their sum.
    """
    design = integrand.design
    lay = integrand.layout
    q = lay.q
    theta = np.asarray(theta, dtype=float)
    beta, alpha = theta[: lay.p], theta[lay.p : lay.p + lay.k]
    pg = np.sum(weights[None] * nd.g, axis=2)
    if design.group_weights is not None:
        pg = pg * design.group_weights
    off = lay.p + lay.k
    grad = np.empty((design.ngroups, theta.size) if per_school else theta.size)
    grad[..., off:] = pg[nd.m :].T if per_school else pg[nd.m :].sum(axis=1)
    rows = np.repeat(pg[: nd.m], design.counts, axis=1)  # dr/dT of each row's school, (m, N)
    c, r, w = _weighted_c(design, beta, alpha)
    cr = c * r
    u_beta = -2.0 * cr * rows[1]
    u_alpha = (rows[0] if w is None else w * rows[0]) - cr * r * rows[1]
    Z = design.Z
    for i in range(q):
        cz = c * Z[:, i]
        u_beta -= cz * rows[2 + i]
        zsum = r * rows[2 + i]
        for k in range(q):
            zsum = zsum + Z[:, k] * rows[2 + q + i * q + k]
        u_alpha -= cz * zsum
    if per_school:
        grad[:, : lay.p] = np.add.reduceat(design.X * u_beta[:, None], design.starts, axis=0)
        grad[:, lay.p : off] = np.add.reduceat(design.W * u_alpha[:, None], design.starts, axis=0)
        return grad
    grad[: lay.p] = design.X.T @ u_beta
    grad[lay.p : off] = design.W.T @ u_alpha
    return grad


def _weighted_c(design: Design, beta: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    r"""``c_i`` (times the level-1 weight ``w_i``), ``r_i`` and the weights (``None`` unweighted).

    The sums are :math:`\sum_i w_i c_i (\cdot)` and :math:`A_j = \sum_i w_i \eta_i`
    (:func:`mlsml.integrand.school_sums`); the weights are constants, so every derivative of
    the sums carries them as ``c`` does.
    """
    c = np.exp(-np.asarray(design.log_variance_index(alpha)))
    w = design.weights
    if w is not None:
        c = c * w
    return c, design.y - design.X @ beta, w


def _coefficients(design: Design, beta: np.ndarray, alpha: np.ndarray, q: int, m: int):
    """``c``, ``r`` and the ``(m, N)`` coefficients of the sums' first derivatives.

    ``dT_jt / dbeta = sum_i a_ti x_i`` and ``dT_jt / dalpha = sum_i b_ti w_i`` over the rows
    ``i`` of school ``j`` (the module docstring).
    """
    X, Z = design.X, design.Z
    N = X.shape[0]
    c, r, w = _weighted_c(design, beta, alpha)
    cr = c * r
    a = np.zeros((m, N))  # rows t, columns i (contiguous rows: fast sums over t)
    b = np.zeros((m, N))
    b[0] = 1.0 if w is None else w  # A
    a[1] = -2.0 * cr  # S0
    b[1] = -cr * r
    for i in range(q):
        cz = c * Z[:, i]
        a[2 + i] = -cz  # S1[i]
        b[2 + i] = -cz * r
        for k in range(q):
            b[2 + q + i * q + k] = -cz * Z[:, k]  # S2[i, k]
    return c, r, a, b


def _sums_derivatives(design: Design, beta: np.ndarray, alpha: np.ndarray, q: int, RT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``J_j`` of shape ``(J, m, p + k)`` and ``sum_j sum_t R_{T_jt} d^2 T_jt`` (the module docstring).

    ``J_j`` is one sparse ``(m J) x N`` matrix of the coefficients ``a`` (``b``) of
    :func:`_coefficients` times ``X`` (``W``); the second derivatives of the sums are
    ``-a`` in (``beta``, ``alpha``), ``-b`` in (``alpha``, ``alpha``) (except ``A``) times
    the designs, and ``2 c x x'`` for ``S0`` in (``beta``, ``beta``).
    """
    X, W = design.X, design.W
    p = X.shape[1]
    m = RT.shape[1]
    c, _, a, b = _coefficients(design, beta, alpha, q, m)
    Jac = np.concatenate([_school_sums_of(design, a, X), _school_sums_of(design, b, W)], axis=2)
    g = np.repeat(RT.T, design.counts, axis=1)  # R_T of each row's school, (m, N)
    w_bb = 2.0 * c * g[1]
    w_ba = -np.einsum("tn,tn->n", a, g)
    w_aa = -np.einsum("tn,tn->n", b[1:], g[1:])
    H = np.empty((p + W.shape[1],) * 2)
    H[:p, :p] = (X * w_bb[:, None]).T @ X
    H[:p, p:] = (X * w_ba[:, None]).T @ W
    H[p:, :p] = H[:p, p:].T
    H[p:, p:] = (W * w_aa[:, None]).T @ W
    return Jac, H


def _school_sums_of(design: Design, coef: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``out[j, t] = sum_{i in j} coef[t, i] M[i]``, shape ``(J, m, M.shape[1])``, by one sparse product."""
    m, N = coef.shape
    J = design.ngroups
    indptr = np.concatenate([t * N + design.starts for t in range(m)] + [[m * N]])
    S = sparse.csr_matrix((coef.ravel(), np.tile(np.arange(N), m), indptr), shape=(m * J, N))
    return np.asarray(S @ M).reshape(m, J, M.shape[1]).transpose(1, 0, 2)
