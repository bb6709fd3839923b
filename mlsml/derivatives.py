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

**Gradient** (:func:`uexact_gradient`, the core model under the u-exact rule, which
every random-scale fit with a mean effect uses by default): ``R`` in closed form. With
the node weights :math:`p_{jk} \propto \exp\{g_j(v_{jk}) + \log\tilde w_k\}`,
:math:`E = e^{-v}`, :math:`M = E S_2 + P_{uu}`, :math:`c = E S_1 - P_{uv} v`,
:math:`\mu = M^{-1}c` (:mod:`mlsml.gaussian`) and :math:`G = -\tfrac12(M^{-1} + \mu\mu')`,

.. math::

    \frac{\partial r_j}{\partial A_j} = -\tfrac12, \quad
    \frac{\partial r_j}{\partial S_{0j}} = -\tfrac12 \sum_k p_{jk} E_{jk}, \quad
    \frac{\partial r_j}{\partial S_{1j}} = \sum_k p_{jk} E_{jk} \mu_{jk}, \quad
    \frac{\partial r_j}{\partial S_{2j}} = \sum_k p_{jk} E_{jk} G_{jk},

    \frac{\partial R}{\partial P_{uu}} = \sum_{jk} p_{jk} G_{jk}, \quad
    \frac{\partial R}{\partial P_{uv}} = -\sum_{jk} p_{jk} v_{jk} \mu_{jk}, \quad
    \frac{\partial R}{\partial P_{vv}} = -\tfrac12 \sum_{jk} p_{jk} v_{jk}^2, \quad
    \frac{\partial R}{\partial \log|\Sigma|} = -\tfrac J2,

and :math:`dP = d(L^{-1})'L^{-1} + L^{-\prime} d(L^{-1})` with :math:`d(L^{-1}) = -L^{-1}\,dL\,L^{-1}`,
:math:`d\log|\Sigma| = 2\sum_i d\log L_{ii}`. This
replaces autograd's reverse pass (about 280 traced operations, 6 ms on London Model 3,
at every one of the optimiser's evaluations); tests/test_derivatives.py checks it
against autograd on every model it applies to.
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

    def sums(self, beta, alpha) -> Sums:
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
        From :func:`autograd_reduced` (any rule) or :func:`uexact_reduced` (the core model
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


def uexact_reduced(integrand: SchoolSums, theta: np.ndarray, sums: Sums, v: np.ndarray, weights: np.ndarray) -> ReducedDerivatives:
    r"""The derivatives of ``R`` for the core model under the u-exact rule, in closed form.

    Every direction ``a`` (a sum ``T_jt``, or a log-Cholesky parameter ``psi_k``) moves
    ``M``, ``c`` and the terms linear in them by ``dM_a``, ``dc_a``, ``dl_a``; with
    :math:`f = -\tfrac12\log|M| + \tfrac12 c'M^{-1}c`, :math:`G = -\tfrac12(M^{-1} + \mu\mu')`,

    .. math::

        g_a = \operatorname{tr}(G\,dM_a) + \mu' dc_a + dl_a, \qquad
        g_{ab} = \tfrac12 \operatorname{tr}(M^{-1} dM_a M^{-1} dM_b)
                 + e_a' M^{-1} e_b, \quad e_a = dc_a - dM_a\,\mu,

    at every node, and per school (node weights ``p_jk``)

    .. math::

        \partial_a r_j = \sum_k p_{jk} g_a, \qquad
        \partial^2_{ab} r_j = \sum_k p_{jk}(g_{ab} + g_a g_b) - \partial_a r_j\,\partial_b r_j,

    plus, for two log-Cholesky parameters, :math:`\partial R / \partial P` (as in
    :func:`uexact_gradient`) times :math:`\partial^2 P / \partial\psi_k\partial\psi_l`. The
    symmetric ``S2`` moves as a symmetric matrix: the direction of entry ``(a, b)``,
    ``a <= b``, is ``E_ab + E_ba`` and that of ``(b, a)`` is zero (their Jacobians are equal,
    so the chain rule is unchanged).

    Parameters
    ----------
    integrand, theta, sums, v, weights
        As :func:`uexact_gradient`.
    """
    lay = integrand.layout
    q, d = lay.q, lay.d
    theta = np.asarray(theta, dtype=float)
    L = np.asarray(lay.split(theta)[2], dtype=float)
    Linv = np.linalg.inv(L)
    P = Linv.T @ Linv
    vv = v[:, :, 0]
    J, K = vv.shape
    E = np.exp(-vv)
    M = E[:, :, None, None] * sums.S2[:, None] + P[:q, :q]
    c = E[:, :, None] * sums.S1[:, None, :] - P[:q, q] * vv[:, :, None]
    Minv = np.linalg.inv(M)
    mu = np.einsum("jkab,jkb->jka", Minv, c)
    G = -0.5 * (Minv + mu[:, :, :, None] * mu[:, :, None, :])
    dL = chol_derivatives(L)
    npsi = dL.shape[0]
    dLinv = -Linv @ dL @ Linv
    dP = np.swapaxes(dLinv, 1, 2) @ Linv + Linv.T @ dLinv
    m = 2 + q + q * q
    n = m + npsi
    dM = np.zeros((n, J, K, q, q))
    dc = np.zeros((n, J, K, q))
    dl = np.zeros((n, J, K))
    dl[0] = -0.5  # A
    dl[1] = -0.5 * E  # S0
    for a in range(q):
        dc[2 + a, :, :, a] = E  # S1[a]
        for b in range(a, q):  # S2[a, b] as a symmetric direction
            t = 2 + q + a * q + b
            dM[t, :, :, a, b] = E
            dM[t, :, :, b, a] = E
    dlogdet = 2.0 * np.sum(np.einsum("kii->ki", dL) / np.diag(L), axis=1)
    for k in range(npsi):
        dM[m + k] = dP[k, :q, :q]
        dc[m + k] = -dP[k, :q, q] * vv[:, :, None]
        dl[m + k] = -0.5 * dP[k, q, q] * vv**2 - 0.5 * dlogdet[k]
    g = dl + np.einsum("jkxy,njkyx->njk", G, dM) + np.einsum("jkx,njkx->njk", mu, dc)
    e = dc - np.einsum("njkxy,jky->njkx", dM, mu)
    A = np.einsum("jkxy,njkyz->njkxz", Minv, dM)
    h = 0.5 * np.einsum("ajkxy,bjkyx->abjk", A, A) + np.einsum("ajkx,jkxy,bjky->abjk", e, Minv, e)
    pg = np.einsum("jk,njk->nj", weights, g)
    second = np.einsum("jk,abjk->abj", weights, h + g[:, None] * g[None, :]) - pg[:, None] * pg[None, :]
    # dR/dP entry by entry (as in uexact_gradient) times the second derivatives of P
    GP = np.zeros((d, d))
    GP[:q, :q] = np.einsum("jk,jkab->ab", weights, G)
    GP[:q, q] = -np.einsum("jk,jka->a", weights * vv, mu)
    GP[q, q] = -0.5 * np.sum(weights * vv**2)
    d2P = np.zeros((npsi, npsi, d, d))
    for k in range(npsi):
        for l_ in range(npsi):
            d2Linv = Linv @ dL[l_] @ Linv @ dL[k] @ Linv + Linv @ dL[k] @ Linv @ dL[l_] @ Linv
            if k == l_:  # d^2 L / dpsi_k^2 = dL_k on the diagonal (exp), 0 off it
                d2Linv = d2Linv - Linv @ (dL[k] * np.eye(d)) @ Linv
            d2P[k, l_] = d2Linv.T @ Linv + dLinv[k].T @ dLinv[l_] + dLinv[l_].T @ dLinv[k] + Linv.T @ d2Linv
    Rpsipsi = second[m:, m:].sum(axis=2) + np.einsum("ab,klab->kl", GP, d2P)
    return ReducedDerivatives(
        RT=pg[:m].T,
        RTT=np.moveaxis(second[:m, :m], 2, 0),
        RTpsi=np.moveaxis(second[:m, m:], 2, 0),
        Rpsipsi=Rpsipsi,
    )


def uexact_gradient(integrand: SchoolSums, theta: np.ndarray, sums: Sums, v: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The gradient of the core model's u-exact log-likelihood at fixed nodes (module docstring).

    Parameters
    ----------
    integrand : SchoolSums
        Of a core model (:attr:`mlsml.integrand.Integrand.core`: one ``Sigma``, ``n_v = 1``).
    theta : ndarray
        Optimiser-scale parameters.
    sums : Sums
        The sums at ``theta``.
    v : ndarray (J, K, 1)
        The nodes in ``v``.
    weights : ndarray (J, K)
        ``p_jk``: the normalised ``exp(g_j(v_jk) + log w_k)``.

    Returns
    -------
    ndarray
        Equal to autograd's gradient of the same likelihood up to rounding.
    """
    design = integrand.design
    lay = integrand.layout
    q, d = lay.q, lay.d
    theta = np.asarray(theta, dtype=float)
    beta, alpha, L = lay.split(theta)
    L = np.asarray(L, dtype=float)
    Linv = np.linalg.inv(L)
    P = Linv.T @ Linv
    vv = v[:, :, 0]
    E = np.exp(-vv)
    pE = weights * E
    J = vv.shape[0]
    m = 2 + q + q * q
    g = np.empty((J, m))  # dR / dT_j
    g[:, 0] = -0.5 * weights.sum(axis=1)
    g[:, 1] = -0.5 * pE.sum(axis=1)
    GP = np.zeros((d, d))  # dR / dP, entry by entry as the likelihood uses them
    GP[q, q] = -0.5 * np.sum(weights * vv**2)
    if q:
        M = E[:, :, None, None] * sums.S2[:, None] + P[:q, :q]
        c = E[:, :, None] * sums.S1[:, None, :] - P[:q, q] * vv[:, :, None]
        Minv = 1.0 / M if q == 1 else np.linalg.inv(M)
        mu = np.einsum("jkab,jkb->jka", Minv, c)
        G = -0.5 * (Minv + mu[:, :, :, None] * mu[:, :, None, :])
        g[:, 2 : 2 + q] = np.einsum("jk,jka->ja", pE, mu)
        g[:, 2 + q :] = np.einsum("jk,jkab->jab", pE, G).reshape(J, q * q)
        GP[:q, :q] = np.einsum("jk,jkab->ab", weights, G)
        GP[:q, q] = -np.einsum("jk,jka->a", weights * vv, mu)
    # through L^{-1} as the likelihood computes P (with Sigma nearly singular, P = O(1/lambda)
    # but L^{-1} only O(1/sqrt(lambda)): -P dSigma P would lose the gradient to cancellation)
    dL = chol_derivatives(L)
    dLinv = -Linv @ dL @ Linv
    dP = np.swapaxes(dLinv, 1, 2) @ Linv + Linv.T @ dLinv
    dlogdet = 2.0 * np.sum(np.einsum("kii->ki", dL) / np.diag(L), axis=1)  # log|Sigma| = 2 sum log L_ii
    grad = np.empty(theta.size)
    off = lay.p + lay.k
    grad[off:] = np.einsum("ab,kab->k", GP, dP) - 0.5 * weights.sum() * dlogdet
    # d/dbeta = X' sum_t a_t g_t, d/dalpha = W' sum_t b_t g_t (coefficients of _coefficients)
    rows = np.repeat(g.T, design.counts, axis=1)  # dR / dT of each row's school, (m, N)
    c = np.exp(-(design.W @ alpha))
    r = design.y - design.X @ beta
    cr = c * r
    u_beta = -2.0 * cr * rows[1]
    u_alpha = rows[0] - cr * r * rows[1]
    Z = design.Z
    for i in range(q):
        cz = c * Z[:, i]
        u_beta -= cz * rows[2 + i]
        zsum = r * rows[2 + i]
        for k in range(q):
            zsum = zsum + Z[:, k] * rows[2 + q + i * q + k]
        u_alpha -= cz * zsum
    grad[: lay.p] = design.X.T @ u_beta
    grad[lay.p : off] = design.W.T @ u_alpha
    return grad


def _coefficients(design: Design, beta: np.ndarray, alpha: np.ndarray, q: int, m: int):
    """``c``, ``r`` and the ``(m, N)`` coefficients of the sums' first derivatives.

    ``dT_jt / dbeta = sum_i a_ti x_i`` and ``dT_jt / dalpha = sum_i b_ti w_i`` over the rows
    ``i`` of school ``j`` (the module docstring).
    """
    X, W, Z = design.X, design.W, design.Z
    N = X.shape[0]
    c = np.exp(-(W @ alpha))
    r = design.y - X @ beta
    cr = c * r
    a = np.zeros((m, N))  # rows t, columns i (contiguous rows: fast sums over t)
    b = np.zeros((m, N))
    b[0] = 1.0  # A
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
