r"""The Hessian of the integrated log-likelihood, chained through the per-school sums.

For the per-school-sums integrand (:class:`mlsml.integrand.SchoolSums`) the data enter
the likelihood only through the sums :math:`T_j = (A_j, S_{0j}, S_{1j}, S_{2j})` of
school :math:`j`, functions of :math:`\lambda = (\beta, \alpha)`; the other parameters
:math:`\psi` (the Cholesky factor of :math:`\Sigma`, and :math:`\tau` of a
between-school variance model) enter directly. With the nodes held fixed,

.. math::

    \ell(\theta) = R(T(\lambda), \psi), \qquad R(T, \psi) = \sum_j r_j(T_j, \psi),

and the chain rule gives

.. math::

    \frac{\partial^2 \ell}{\partial\lambda\,\partial\lambda'}
        = \sum_j J_j' \frac{\partial^2 r_j}{\partial T_j \partial T_j'} J_j
        + \sum_j \sum_t \frac{\partial r_j}{\partial T_{jt}}
          \frac{\partial^2 T_{jt}}{\partial\lambda\,\partial\lambda'}, \qquad
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

so the second term is three weighted cross products of the designs, ``X' diag(.) X``,
``X' diag(.) W`` and ``W' diag(.) W``. The derivatives of ``R`` come from autograd on the
likelihood itself with the sums as inputs (the same code as the value, so nothing is
written twice): since ``r_j`` involves school ``j`` only, its Hessian in ``T`` is block
diagonal, and one Hessian-vector product with the direction "sum ``t`` in every school"
gives column ``t`` of every block. So ``m + n_psi`` reverse passes over a function of
``J x K`` arrays (``m = 2 + q + q^2`` sums, ``n_psi`` direct parameters) replace the
``n_params`` reverse passes over the ``N x p`` designs of ``autograd.hessian``: on London
Model 6 (43 parameters) 7 instead of 43.
"""

from __future__ import annotations

from collections.abc import Callable

import autograd
import autograd.numpy as anp
import numpy as np
from scipy import sparse

from .design import Design
from .integrand import Integrand, SchoolSums, Sums


class _GivenSums(SchoolSums):
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


def sums_hessian(integrand: SchoolSums, theta: np.ndarray, log_lik: Callable[[Integrand, object], object]) -> np.ndarray:
    """The Hessian of ``log_lik(integrand, theta)`` in ``theta`` by the chain rule through the sums.

    Parameters
    ----------
    integrand : SchoolSums
    theta : ndarray
        Optimiser-scale parameters.
    log_lik : callable
        ``log_lik(integrand, theta)``: the log-likelihood with the nodes held fixed
        (autograd-differentiable; it must see the data only through ``integrand``).

    Returns
    -------
    ndarray (n_params, n_params)
        Equal to ``autograd.hessian(lambda th: log_lik(integrand, th))(theta)`` up to
        rounding.
    """
    design = integrand.design
    lay = integrand.layout
    theta = np.asarray(theta, dtype=float)
    q = lay.q
    nl = lay.p + lay.k  # (beta, alpha): through the sums only
    beta, alpha = theta[: lay.p], theta[lay.p : nl]
    s = Sums(*(np.asarray(a, dtype=float) for a in integrand.sums(beta, alpha)))
    T0 = _pack(s)
    J, m = T0.shape
    P = theta.size

    def R(x):
        T = anp.reshape(x[: J * m], (J, m))
        return log_lik(_GivenSums(integrand, _unpack(T, s.n, q)), x[J * m :])

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
    H = np.zeros((P, P))
    for a in range(npsi):
        e = np.zeros(J * m + P)
        e[J * m + nl + a] = 1.0
        col = hvp(e)
        RTpsi[:, :, a] = np.reshape(col[: J * m], (J, m))
        H[nl:, nl + a] = col[J * m + nl :]
    Jac, Hsecond = _sums_derivatives(design, beta, alpha, q, RT)
    flat = Jac.reshape(J * m, nl)
    H[:nl, :nl] = flat.T @ (RTT @ Jac).reshape(J * m, nl) + Hsecond
    H[:nl, nl:] = flat.T @ RTpsi.reshape(J * m, npsi)
    H[nl:, :nl] = H[:nl, nl:].T
    return 0.5 * (H + H.T)


def _sums_derivatives(design: Design, beta: np.ndarray, alpha: np.ndarray, q: int, RT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``J_j`` of shape ``(J, m, p + k)`` and ``sum_j sum_t R_{T_jt} d^2 T_jt`` (the module docstring).

    ``dT_jt / dbeta = sum_i a_ti x_i`` and ``dT_jt / dalpha = sum_i b_ti w_i`` over the rows of
    school ``j``: one sparse ``(m J) x N`` matrix of the ``a_ti`` (``b_ti``) times ``X`` (``W``).
    """
    X, W, Z = design.X, design.W, design.Z
    N, p = X.shape
    J, m = RT.shape
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
