r"""The mean effects integrated exactly given the scale effects: one Gaussian block.

Given the scale effects ``v`` the integrand of school ``j`` is Gaussian in the
``q`` mean effects ``u``. With the data entering through (``v``-dependent) sums
``S1(v)``, ``S2(v)`` and the prior precision ``P = Sigma^{-1}`` split into
``(u, v)`` blocks,

.. math::

    M(v) = S_2(v) + P_{uu}, \qquad c(v) = S_1(v) - P_{uv} v,

    \int \exp\{-\tfrac12 u'M u + u'c\}\,du
        = (2\pi)^{q/2} |M|^{-1/2} \exp\{\tfrac12 c'M^{-1}c\},

and the conditional posterior of ``u`` given ``v`` is ``N(M^{-1} c, M^{-1})``.
This module computes ``log|M|`` and ``c'M^{-1}c`` (for the u-exact likelihood,
:class:`mlsml.likelihood.Likelihood` with ``QuadratureSpec("uexact")``) and the
conditional moments ``mu(v) = M^{-1} c`` and ``M^{-1}`` (for the posterior grid of
:mod:`mlsml.predict`). Everything is written elementwise in ``autograd.numpy``
(closed forms for ``q <= 2``, a Cholesky factorisation written out beyond), so the
likelihood can be differentiated exactly.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np


def block_entries(S1, S2, P, v, q: int, scale=None):
    r"""The entries of ``M(v)`` and ``c(v)``.

    .. math::

        M_{ab} = S_{2,ab} + P_{ab} f_a f_b, \qquad
        c_a = S_{1,a} - f_a \sum_r P_{a, q+r} v_r

    Parameters
    ----------
    S1 : list of q arrays
        ``S1[a]`` of a common shape ``(J, K)``.
    S2 : list of q lists of q arrays
    P : array (d, d)
        Prior precision (of ``Sigma0`` with a between-school variance model).
    v : array (J, K, n_v)
        Scale effects at the nodes.
    q : int
    scale : array (J, 1), optional
        ``f_0 = exp(-s_j' tau / 2)``: the per-school factor of row and column 0 of
        the precision with a between-school variance model (``P_j = D_j^{-1} P D_j^{-1}``).

    Returns
    -------
    Mx : list of lists of arrays, cx : list of arrays
    """
    f = [1.0] * q if scale is None else [scale] + [1.0] * (q - 1)
    Mx = [[S2[a][b] + P[a, b] * f[a] * f[b] for b in range(q)] for a in range(q)]
    nv = v.shape[-1]
    if nv == 1:
        cx = [S1[a] - P[a, q] * v[:, :, 0] * f[a] for a in range(q)]
    else:
        cx = [S1[a] - anp.einsum("jkv,v->jk", v, P[a, q:]) * f[a] for a in range(q)]
    return Mx, cx


def log_det_and_quad(Mx, cx, closed_form: bool = True):
    r"""``log|M|`` and ``c' M^{-1} c`` from the entries of a symmetric positive-definite ``M``.

    ``Mx[a][b]`` and ``cx[a]`` are arrays of a common shape (one ``M`` per element).
    ``q = 1, 2`` in closed form,

    .. math::

        q = 2:\quad |M| = m_{00} m_{11} - m_{01}^2, \qquad
        c'M^{-1}c = \frac{c_0^2}{m_{00}} + \Big(c_1 - \frac{m_{01}}{m_{00}} c_0\Big)^2 \frac{m_{00}}{|M|}

    larger ``q`` by a Cholesky factorisation and forward substitution written out
    elementwise (:func:`_cholesky_terms`; also for ``q <= 2`` when not ``closed_form``: the
    two agree to rounding, and each model class keeps the arithmetic it was validated with).
    With ``q = 0`` both are 0.
    """
    q = len(cx)
    if not closed_form:
        return _cholesky_terms(Mx, cx)
    if q == 1:
        return anp.log(Mx[0][0]), cx[0] ** 2 / Mx[0][0]
    if q == 2:
        m00, m01, m11 = Mx[0][0], Mx[0][1], Mx[1][1]
        c0, c1 = cx
        det = m00 * m11 - m01**2
        # by elimination, not the adjugate form (m11 c0^2 - 2 m01 c0 c1 + m00 c1^2) / |M|: near a
        # singular Sigma the prior precision in M is ~1e7 and c ~ 4e7, and the adjugate form's
        # three terms of order 1e22 cancel to 1e15, an error of 0.03 in log h; that noise made
        # two maxima 0.002 apart in fuzz case 8083005579234651320 (issue 12)
        return anp.log(det), c0**2 / m00 + (c1 - m01 / m00 * c0) ** 2 * m00 / det
    return _cholesky_terms(Mx, cx)


def _cholesky_terms(Mx, cx):
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


def conditional_moments(M: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Moments of ``u | v, y ~ N(M^{-1} c, M^{-1})`` (numpy, stacked matrices).

    Parameters
    ----------
    M : ndarray (..., q, q)
    c : ndarray (..., q)

    Returns
    -------
    mu : ndarray (..., q)
        ``M^{-1} c``.
    V : ndarray (..., q, q)
        ``M^{-1}`` (symmetrised).
    logdet : ndarray (...)
        ``log|M|``.
    quad : ndarray (...)
        ``c' M^{-1} c``.
    """
    q = M.shape[-1]
    shape = M.shape[:-2]
    if q == 0:
        return np.zeros(shape + (0,)), np.zeros(shape + (0, 0)), np.zeros(shape), np.zeros(shape)
    if q == 1:
        V = 1.0 / M
        mu = V[..., 0] * c
        return mu, V, np.log(M[..., 0, 0]), c[..., 0] * mu[..., 0]
    if q == 2:  # closed form, c'M^{-1}c by elimination as in log_det_and_quad
        m00, m01, m11 = M[..., 0, 0], M[..., 0, 1], M[..., 1, 1]
        c0, c1 = c[..., 0], c[..., 1]
        det = m00 * m11 - m01**2
        V = np.stack([np.stack([m11, -m01], axis=-1), np.stack([-m01, m00], axis=-1)], axis=-2) / det[..., None, None]
        mu = np.stack([(m11 * c0 - m01 * c1) / det, (m00 * c1 - m01 * c0) / det], axis=-1)
        return mu, V, np.log(det), c0**2 / m00 + (c1 - m01 / m00 * c0) ** 2 * m00 / det
    try:
        L = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:  # not positive definite to rounding: the general inverse
        V = np.linalg.inv(M)
        V = 0.5 * (V + np.swapaxes(V, -1, -2))
        mu = np.einsum("...qr,...r->...q", V, c)
        return mu, V, np.linalg.slogdet(M)[1], np.einsum("...q,...q->...", c, mu)
    # c'M^{-1}c = |L^{-1}c|^2, a sum of squares: c'(M^{-1}c) from an explicit inverse sums
    # terms of order 1e14 to 1e8 near a singular Sigma (the adjugate form's cancellation)
    y = np.linalg.solve(L, c[..., None])
    Lt = np.swapaxes(L, -1, -2)
    mu = np.linalg.solve(Lt, y)[..., 0]
    Linv = np.linalg.inv(L)
    V = np.einsum("...rq,...rs->...qs", Linv, Linv)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    return mu, 0.5 * (V + np.swapaxes(V, -1, -2)), logdet, np.sum(y[..., 0] ** 2, axis=-1)
