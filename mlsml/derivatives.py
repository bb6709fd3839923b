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
and ``h_ab = 0``. *u-exact rule* (:func:`_uexact_node_derivatives`): with the prior of ``u``
given ``v``, :math:`u = m v + K\eta` (:func:`mlsml.integrand.conditional_prior`), the node's
exponent in :math:`\eta` is :math:`a_0 + b'\eta - \tfrac12\eta'A\eta` with
:math:`A = I + E K'S_2K`, :math:`b = E K'(S_1 - S_2 m v)`, linear in the sums and smooth in
:math:`\pi = (m, K, s_2)`; with :math:`\hat\eta = A^{-1}b`, a direction moving
:math:`a_0`, ``b`` and ``A`` by :math:`da_a`, :math:`db_a`, :math:`dA_a` gives

.. math::

    g_a = da_a + db_a'\hat\eta - \tfrac12\hat\eta' dA_a\hat\eta - \tfrac12\operatorname{tr}(A^{-1}dA_a), \qquad
    h_{ab} = Z_{ab} + e_a'A^{-1}e_b + \tfrac12\operatorname{tr}(A^{-1}dA_a A^{-1}dA_b),
    \quad e_a = db_a - dA_a\hat\eta,

with :math:`Z_{ab}` the second derivatives of :math:`a_0`, ``b`` and ``A`` themselves
(pairs with an entry of :math:`\pi`), and :math:`\pi` carried to the log-Cholesky
parameters by :func:`conditional_prior_derivatives`. No precision matrix appears: the earlier
form through :math:`P = \Sigma^{-1}` had terms of order :math:`1/\operatorname{var}(v \mid u)`
that cancelled near :math:`|\operatorname{corr}(u_0, v)| = 1`. The symmetric ``S2``
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
from .integrand import Integrand, SchoolSums, Sums, conditional_prior
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


def conditional_prior_derivatives(L: np.ndarray, free=None, second: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    r"""First and second derivatives of :func:`mlsml.integrand.conditional_prior` in ``psi``.

    ``pi = (m, vec K, s2)`` (``K`` row by row), ``q + q^2 + 1`` entries, as functions of the
    free row-wise log-Cholesky parameters ``psi`` (:func:`mlsml.params.chol_derivatives`;
    :math:`\partial^2 L / \partial\psi_k^2 = \partial L / \partial\psi_k` on the diagonal, 0
    elsewhere). With :math:`n = L_u l`, :math:`\sigma = \sqrt{s_2}`,
    :math:`t = s_2 + \sigma\ell` and :math:`c = 1/t`:

    .. math::

        s_2 = l'l + \ell^2, \qquad m = n / s_2, \qquad K = L_u - c\, n l',

    differentiated twice by the product and quotient rules.

    Returns
    -------
    T : ndarray (n_pi, n_psi)
        :math:`\partial\pi / \partial\psi'`.
    D2 : ndarray (n_pi, n_psi, n_psi) or None
        :math:`\partial^2\pi / \partial\psi\,\partial\psi'`; ``None`` unless ``second`` (a
        gradient needs ``T`` only, and ``D2``'s products of tiny arrays were most of this
        function's 1.7 ms a call).
    """
    L = np.asarray(L, dtype=float)
    d = L.shape[0]
    q = d - 1
    dL = chol_derivatives(L, free)
    npsi = dL.shape[0]
    Lu, l, ell = L[:q, :q], L[q, :q], L[q, q]
    dLu, dl, dell = dL[:, :q, :q], dL[:, q, :q], dL[:, q, q]
    s2 = l @ l + ell**2
    ds2 = 2.0 * dl @ l + 2.0 * ell * dell
    n = Lu @ l
    dn = dLu @ l + dl @ Lu.T  # (npsi, q)
    dm = dn / s2 - np.outer(ds2, n) / s2**2
    sig = np.sqrt(s2)
    dsig = ds2 / (2.0 * sig)
    t = s2 + sig * ell
    dt = ds2 + dsig * ell + sig * dell
    c = 1.0 / t
    dc = -dt / t**2
    dK = dLu - (dc[:, None, None] * np.outer(n, l) + c * np.einsum("ka,b->kab", dn, l) + c * np.einsum("a,kb->kab", n, dl))
    T = np.concatenate([dm.T, dK.reshape(npsi, q * q).T, ds2[None, :]], axis=0)
    if not second:
        return T, None
    d2L = np.zeros((npsi, npsi, d, d))
    for k in range(npsi):
        d2L[k, k] = dL[k] * np.eye(d)  # exp on the diagonal, linear off it
    d2Lu, d2l, d2ell = d2L[:, :, :q, :q], d2L[:, :, q, :q], d2L[:, :, q, q]
    d2s2 = 2.0 * dl @ dl.T + 2.0 * d2l @ l + 2.0 * np.outer(dell, dell) + 2.0 * ell * d2ell
    d2n = d2Lu @ l + np.einsum("kab,lb->kla", dLu, dl) + np.einsum("lab,kb->kla", dLu, dl) + d2l @ Lu.T
    d2m = (
        d2n / s2
        - (dn[:, None, :] * ds2[None, :, None] + dn[None, :, :] * ds2[:, None, None]) / s2**2
        - d2s2[:, :, None] * n / s2**2
        + 2.0 * np.outer(ds2, ds2)[:, :, None] * n / s2**3
    )
    d2sig = d2s2 / (2.0 * sig) - np.outer(ds2, ds2) / (4.0 * sig**3)
    d2t = d2s2 + d2sig * ell + np.outer(dsig, dell) + np.outer(dell, dsig) + sig * d2ell
    d2c = -d2t / t**2 + 2.0 * np.outer(dt, dt) / t**3
    d2K = d2Lu - (
        d2c[:, :, None, None] * np.outer(n, l)
        + np.einsum("k,la,b->klab", dc, dn, l)
        + np.einsum("l,ka,b->klab", dc, dn, l)
        + np.einsum("k,a,lb->klab", dc, n, dl)
        + np.einsum("l,a,kb->klab", dc, n, dl)
        + c * np.einsum("kla,b->klab", d2n, l)
        + c * np.einsum("ka,lb->klab", dn, dl)
        + c * np.einsum("la,kb->klab", dn, dl)
        + c * np.einsum("a,klb->klab", n, d2l)
    )
    D2 = np.concatenate([np.moveaxis(d2m, 2, 0), np.moveaxis(d2K.reshape(npsi, npsi, q * q), 2, 0), d2s2[None]], axis=0)
    return T, D2


def _inverse_of_small_blocks(A: np.ndarray) -> np.ndarray:
    r"""The inverse of every ``(q, q)`` block of ``A`` (``(..., q, q)``), by its adjugate for ``q <= 2``.

    .. math:: \begin{pmatrix} a & b \\ c & d \end{pmatrix}^{-1}
              = \frac{1}{ad - bc} \begin{pmatrix} d & -b \\ -c & a \end{pmatrix}

    For the u-exact rule's :math:`A = I + E K'S_2K` (eigenvalues at least 1, so ``ad - bc``
    is at least 1) this is as accurate as LU and a sixth of ``numpy.linalg.inv``'s 0.7 ms on
    43 schools x 15 nodes, where the batched LAPACK calls dominate; larger blocks by LAPACK.
    """
    q = A.shape[-1]
    if q == 1:
        return 1.0 / A
    if q != 2:
        return np.linalg.inv(A)  # (no mean effect: q = 0, empty blocks)
    a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
    det = a * d - b * c
    out = np.empty_like(A)
    out[..., 0, 0] = d / det
    out[..., 0, 1] = -b / det
    out[..., 1, 0] = -c / det
    out[..., 1, 1] = a / det
    return out


def _uexact_node_derivatives(L: np.ndarray, free, sums: Sums, v: np.ndarray, weights: np.ndarray | None) -> NodeDerivatives:
    r""":class:`NodeDerivatives` of the u-exact rule, through the prior of ``u`` given ``v``.

    At a node ``v`` (:math:`E = e^{-v}`) the log integrand is
    :math:`W = \max_\eta h(\eta) - \tfrac12\log|A| - \tfrac12\log(2\pi s_2) - v^2/(2s_2)`
    with :math:`h(\eta) = a_0 + b'\eta - \tfrac12\eta'A\eta` of
    :meth:`mlsml.integrand.SchoolSums._conditional_uexact`: :math:`a_0`, ``b`` and ``A`` are
    linear in the sums and smooth in :math:`\pi = (m, K, s_2)` (:func:`conditional_prior_derivatives`).
    For directions ``x``, ``y`` (a sum or an entry of ``pi``), with :math:`\hat\eta = A^{-1}b`,

    .. math::

        g_x = \partial_x a_0 + \partial_x b'\hat\eta - \tfrac12\hat\eta'\partial_x A\,\hat\eta
              - \tfrac12\operatorname{tr}(A^{-1}\partial_x A) + \partial_x(\text{prior}),

        h_{xy} = Z_{xy} + e_x'A^{-1}e_y + \tfrac12\operatorname{tr}(A^{-1}\partial_x A\,A^{-1}\partial_y A),
        \quad e_x = \partial_x b - \partial_x A\,\hat\eta,

    where :math:`Z_{xy} = \partial^2_{xy}a_0 + \partial^2_{xy}b'\hat\eta - \tfrac12\hat\eta'\partial^2_{xy}A\,\hat\eta
    - \tfrac12\operatorname{tr}(A^{-1}\partial^2_{xy}A)` (non-zero only for pairs with an entry of
    ``pi``). With :math:`\hat u = m v + K\hat\eta` and :math:`\rho = E(S_1 - S_2\hat u)`:
    :math:`g_{S_1} = E\hat u`, :math:`g_{S_2} = -\tfrac12 E(\hat u\hat u' + KA^{-1}K')`,
    :math:`g_m = v\rho`, :math:`g_K = \rho\hat\eta' - E S_2KA^{-1}`,
    :math:`g_{s_2} = -1/(2s_2) + v^2/(2s_2^2)`. The directions of ``pi`` are then carried to ``psi``:
    :math:`g_\psi = T'g_\pi`, :math:`h_{\psi\psi} = T'h_{\pi\pi}T + g_\pi \cdot D_2`. Nothing is
    divided by a small variance: at ``|corr(u0, v)| = 1`` the precision form's derivatives,
    of order ``1 / var(v | u)``, cancelled (a ``psi`` gradient of -0.138 against 0.0027).
    """
    q = L.shape[0] - 1
    m, K, s2 = (np.asarray(x, dtype=float) for x in conditional_prior(L))
    T, D2 = conditional_prior_derivatives(L, free, second=weights is not None)
    J, nk = v.shape
    E = np.exp(-v)
    S1, S2 = sums.S1, sums.S2
    S2K = np.einsum("jae,ec->jac", S2, K)  # (J, q, q); (K'S2)[:, a] = S2K[:, a, :]
    B0 = np.einsum("ac,jad->jcd", K, S2K)  # K'S2K
    A = np.eye(q) + E[:, :, None, None] * B0[:, None]
    Ainv = _inverse_of_small_blocks(A)
    r0 = S1[:, None, :] - np.einsum("jab,b->ja", S2, m)[:, None, :] * v[:, :, None]
    b = E[:, :, None] * np.einsum("ac,jka->jkc", K, r0)
    eta = np.einsum("jkcd,jkd->jkc", Ainv, b)
    u = m * v[:, :, None] + np.einsum("ac,jkc->jka", K, eta)
    rho = E[:, :, None] * (S1[:, None, :] - np.einsum("jab,jkb->jka", S2, u))
    KAinv = np.zeros_like(Ainv)  # K A^{-1}, by broadcasting as Ae below
    for c in range(q):
        KAinv += K[:, c, None] * Ainv[:, :, None, c, :]
    KAK = np.einsum("jkad,bd->jkab", KAinv, K)
    nS = 2 + q + q * q
    npi = q + q * q + 1
    nX = nS + npi

    def m_dir(a: int) -> int:
        return nS + a

    def k_dir(a: int, c: int) -> int:
        return nS + q + a * q + c

    s2_index = nS + q + q * q
    gX = np.zeros((nX, J, nk))
    gX[0] = -0.5
    gX[1] = -0.5 * E
    G = u[:, :, :, None] * u[:, :, None, :] + KAK
    for a in range(q):
        gX[2 + a] = E * u[:, :, a]
        for c in range(a, q):
            gX[2 + q + a * q + c] = -E * G[:, :, a, c] * (0.5 if a == c else 1.0)
        gX[m_dir(a)] = v * rho[:, :, a]
    S2KAinv = np.zeros_like(Ainv)
    for c in range(q):
        S2KAinv += S2K[:, None, :, c, None] * Ainv[:, :, None, c, :]
    for a in range(q):
        for c in range(q):
            gX[k_dir(a, c)] = rho[:, :, a] * eta[:, :, c] - E * S2KAinv[:, :, a, c]
    gX[s2_index] = -0.5 / s2 + 0.5 * v**2 / s2**2
    g = np.empty((nS + T.shape[1], J, nk))
    g[:nS] = gX[:nS]
    g[nS:] = np.einsum("pk,pjn->kjn", T, gX[nS:])
    if weights is None:
        return NodeDerivatives(g, None, nS)
    # e_x = db_x - dA_x eta and dA_x (in eta's coordinates)
    e = np.zeros((nX, J, nk, q))
    dA = np.zeros((nX, J, nk, q, q))
    for a in range(q):
        e[2 + a] = E[:, :, None] * K[a]
        for c in range(a, q):
            Du = np.zeros((J, nk, q))
            Du[:, :, a] += u[:, :, c]
            if c != a:
                Du[:, :, c] += u[:, :, a]
            e[2 + q + a * q + c] = -E[:, :, None] * np.einsum("ec,jke->jkc", K, Du)
            KDK = np.outer(K[a], K[c]) + (np.outer(K[c], K[a]) if c != a else 0.0)
            dA[2 + q + a * q + c] = E[:, :, None, None] * KDK
        e[m_dir(a)] = -(E * v)[:, :, None] * S2K[:, None, a, :]
        for c in range(q):
            i = k_dir(a, c)
            e[i] = -(E * eta[:, :, c])[:, :, None] * S2K[:, None, a, :]
            e[i][:, :, c] += rho[:, :, a]
            w_a = E[:, :, None] * S2K[:, None, a, :]  # (J, nk, q)
            dA[i][:, :, c, :] += w_a
            dA[i][:, :, :, c] += w_a
    # A^{-1} e_x and A^{-1} dA_x, summed over the q inner terms by broadcasting: the same sums
    # as einsum's (bitwise), at a quarter and half of its time for (q, q) blocks (einsum's
    # were 1 s of a random-slope fit's 2.6 CPU-s in 43 small schools)
    Ae = np.zeros_like(e)  # (q = 0: no mean effect, empty)
    AdA = np.zeros_like(dA)
    for y in range(q):
        Ae += Ainv[None, ..., y] * e[..., y, None]
        AdA += Ainv[None, :, :, :, y, None] * dA[:, :, :, None, y, :]
    hwX = _weighted_gram(e, Ae, weights) + 0.5 * _weighted_gram(AdA, np.swapaxes(AdA, 3, 4), weights)
    # Z: the second derivatives of a0, b and A themselves (pairs with an entry of pi)
    pE = weights * E
    pEv = pE * v
    sEv = pEv.sum(axis=1)
    sEv2 = (pEv * v).sum(axis=1)
    Eeta = np.einsum("jk,jkb->jb", pE, eta)
    Eveta = np.einsum("jk,jkb->jb", pEv, eta)
    Evu = np.einsum("jk,jka->ja", pEv, u)
    Eueta = np.einsum("jk,jkx,jkb->jxb", pE, u, eta)
    EKAinv = np.einsum("jk,jkab->jab", pE, KAinv)
    Eeta2 = np.einsum("jk,jkb,jkd->jbd", pE, eta, eta) + np.einsum("jk,jkbd->jbd", pE, Ainv)

    def put(i: int, k: int, val) -> None:
        hwX[i, k] += val
        if i != k:
            hwX[k, i] += val

    for a in range(q):
        put(2 + a, m_dir(a), sEv)
        for c in range(q):
            put(2 + a, k_dir(a, c), Eeta[:, c])
    for a in range(q):
        for c in range(a, q):
            i = 2 + q + a * q + c
            pairs = [(a, c)] if a == c else [(a, c), (c, a)]  # D u = e_a u_c + e_c u_a
            for x, y in pairs:
                put(i, m_dir(x), -Evu[:, y])
                for bb in range(q):
                    put(i, k_dir(x, bb), -(Eueta[:, y, bb] + EKAinv[:, y, bb]))
    for a in range(q):
        for c in range(a, q):
            put(m_dir(a), m_dir(c), -S2[:, a, c] * sEv2)
        for c in range(q):
            for bb in range(q):
                put(m_dir(a), k_dir(c, bb), -S2[:, c, a] * Eveta[:, bb])
    kk = [(a, bb) for a in range(q) for bb in range(q)]
    for i1, (a, bb) in enumerate(kk):
        for c, dd in kk[i1:]:
            put(k_dir(a, bb), k_dir(c, dd), -S2[:, a, c] * Eeta2[:, bb, dd])
    hwX[s2_index, s2_index] += np.sum(weights * (0.5 / s2**2 - v**2 / s2**3), axis=1)
    # to psi
    pg_pi = np.sum(weights[None] * gX[nS:], axis=2)  # (npi, J)
    n = nS + T.shape[1]
    hw = np.empty((n, n, J))
    hw[:nS, :nS] = hwX[:nS, :nS]
    hw[:nS, nS:] = np.einsum("spj,pk->skj", hwX[:nS, nS:], T)
    hw[nS:, :nS] = np.swapaxes(hw[:nS, nS:], 0, 1)
    hw[nS:, nS:] = np.einsum("pk,pqj,ql->klj", T, hwX[nS:, nS:], T) + np.einsum("pkl,pj->klj", D2, pg_pi)
    return NodeDerivatives(g, hw, nS)


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
    if uexact:
        return _uexact_node_derivatives(L, lay.free_chol, sums, b[:, :, 0], weights)
    Linv, dL, dLinv, d2Linv, dlogdet = _inverse_chol_derivatives(L, lay.free_chol)
    npsi = dL.shape[0]
    J, K = b.shape[:2]
    m = 2 + q + q * q
    n = m + npsi
    g = np.zeros((n, J, K))
    hw = None
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
