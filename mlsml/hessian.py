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
    H[:nl, :nl] = np.einsum("jtp,jts,jsr->pr", Jac, RTT, Jac) + Hsecond
    H[:nl, nl:] = np.einsum("jtp,jta->pa", Jac, RTpsi)
    H[nl:, :nl] = H[:nl, nl:].T
    return 0.5 * (H + H.T)


def _sums_derivatives(design, beta: np.ndarray, alpha: np.ndarray, q: int, RT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``J_j`` of shape ``(J, m, p + k)`` and ``sum_j sum_t R_{T_jt} d^2 T_jt`` (the module docstring)."""
    X, W, Z = design.X, design.W, design.Z
    st = design.starts
    p, k = X.shape[1], W.shape[1]
    J, m = RT.shape
    eta = W @ alpha
    c = np.exp(-eta)
    r = design.y - X @ beta
    cr = c * r
    Jac = np.zeros((J, m, p + k))
    Jac[:, 0, p:] = np.add.reduceat(W, st, axis=0)
    Jac[:, 1, :p] = -2.0 * np.add.reduceat(cr[:, None] * X, st, axis=0)
    Jac[:, 1, p:] = -np.add.reduceat((cr * r)[:, None] * W, st, axis=0)
    g = RT[design.group]  # (N, m): R_T of each row's school
    w_bb = 2.0 * c * g[:, 1]
    w_ba = 2.0 * cr * g[:, 1]
    w_aa = cr * r * g[:, 1]
    for a in range(q):
        cz = c * Z[:, a]
        Jac[:, 2 + a, :p] = -np.add.reduceat(cz[:, None] * X, st, axis=0)
        Jac[:, 2 + a, p:] = -np.add.reduceat((cz * r)[:, None] * W, st, axis=0)
        w_ba = w_ba + cz * g[:, 2 + a]
        w_aa = w_aa + cz * r * g[:, 2 + a]
        for b in range(q):
            t = 2 + q + a * q + b
            czz = cz * Z[:, b]
            Jac[:, t, p:] = -np.add.reduceat(czz[:, None] * W, st, axis=0)
            w_aa = w_aa + czz * g[:, t]
    H = np.empty((p + k, p + k))
    H[:p, :p] = (X * w_bb[:, None]).T @ X
    H[:p, p:] = (X * w_ba[:, None]).T @ W
    H[p:, :p] = H[:p, p:].T
    H[p:, p:] = (W * w_aa[:, None]).T @ W
    return Jac, H
