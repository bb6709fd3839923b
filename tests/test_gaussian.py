"""The Gaussian block (mlsml.gaussian): closed forms, the elementwise Cholesky path, conditional moments."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mlsml import gaussian


def _spd(rng, q, n):
    A = rng.normal(size=(n, q, q))
    return np.einsum("nij,nkj->nik", A, A) + q * np.eye(q)


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_log_det_and_quad_match_numpy(q):
    rng = np.random.default_rng(q)
    M = _spd(rng, q, 6)
    c = rng.normal(size=(6, q))
    Mx = [[M[:, a, b] for b in range(q)] for a in range(q)]
    cx = [c[:, a] for a in range(q)]
    want_logdet = np.linalg.slogdet(M)[1]
    want_quad = np.einsum("nq,nq->n", c, np.linalg.solve(M, c[:, :, None])[:, :, 0])
    for closed in (True, False):
        logdet, quad = gaussian.log_det_and_quad(Mx, cx, closed_form=closed)
        np.testing.assert_allclose(logdet, want_logdet, rtol=1e-12)
        np.testing.assert_allclose(quad, want_quad, rtol=1e-10)


@pytest.mark.parametrize("q", [0, 1, 3])
def test_conditional_moments(q):
    rng = np.random.default_rng(10 + q)
    M = _spd(rng, q, 5) if q else np.zeros((5, 0, 0))
    c = rng.normal(size=(5, q))
    mu, V, logdet, quad = gaussian.conditional_moments(M, c)
    if q == 0:
        assert mu.shape == (5, 0) and np.all(logdet == 0) and np.all(quad == 0)
        return
    np.testing.assert_allclose(V, np.linalg.inv(M), rtol=1e-10)
    np.testing.assert_allclose(mu, np.linalg.solve(M, c[:, :, None])[:, :, 0], rtol=1e-10)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(M)[1], rtol=1e-12)
    np.testing.assert_allclose(quad, np.einsum("nq,nq->n", c, mu), rtol=1e-10)


def test_block_entries_with_school_scaling():
    """P_j = D_j^-1 P D_j^-1 with D_j = diag(exp(log_sd0_j), 1): row and column 0 scaled."""
    rng = np.random.default_rng(3)
    q, nv = 2, 1
    A = rng.normal(size=(3, 3))
    P = A @ A.T + 3 * np.eye(3)
    J, K = 4, 2
    S1 = [rng.normal(size=(J, K)) for _ in range(q)]
    S2m = _spd(rng, q, J * K).reshape(J, K, q, q)
    S2 = [[S2m[:, :, a, b] for b in range(q)] for a in range(q)]
    v = rng.normal(size=(J, K, nv))
    f0 = np.exp(-rng.normal(size=(J, 1)))
    Mx, cx = gaussian.block_entries(S1, S2, P, v, q, f0)
    for j in range(J):
        D = np.diag([f0[j, 0], 1.0, 1.0])
        Pj = D @ P @ D
        for k in range(K):
            np.testing.assert_allclose(Mx[0][0][j, k], S2m[j, k, 0, 0] + Pj[0, 0])
            np.testing.assert_allclose(Mx[0][1][j, k], S2m[j, k, 0, 1] + Pj[0, 1])
            np.testing.assert_allclose(cx[0][j, k], S1[0][j, k] - Pj[0, 2] * v[j, k, 0])
            np.testing.assert_allclose(cx[1][j, k], S1[1][j, k] - Pj[1, 2] * v[j, k, 0])


def test_q2_quadratic_form_near_a_singular_sigma_is_accurate():
    """Near a singular Sigma the prior precision in ``M`` has entries ~1e7 and ``c`` ~4e7 (fuzz
    case 8083005579234651320): the adjugate form's terms of order 1e22 cancelled to 1e15 and
    ``c'M^{-1}c`` was off by ~0.03, which made two maxima 0.002 apart. Against exact rational
    arithmetic on the same floating-point inputs."""
    m00, m01, m11 = 13512404.01, -8598994.08, 5472217.99
    c0, c1 = -4.28e7, 2.7251e7
    _, quad = gaussian.log_det_and_quad([[m00, m01], [m01, m11]], [c0, c1])
    M00, M01, M11, C0, C1 = (Fraction(x) for x in (m00, m01, m11, c0, c1))
    exact = (M11 * C0**2 - 2 * M01 * C0 * C1 + M00 * C1**2) / (M00 * M11 - M01**2)
    assert abs(quad - float(exact)) < 1e-3  # 4e-5; the adjugate form: 0.02


def test_conditional_moments_quadratic_form_near_a_singular_sigma_is_accurate():
    """:func:`mlsml.gaussian.conditional_moments` (the posterior grid's block) on the same ``M`` and ``c``."""
    m00, m01, m11 = 13512404.01, -8598994.08, 5472217.99
    c0, c1 = -4.28e7, 2.7251e7
    mu, V, logdet, quad = gaussian.conditional_moments(np.array([[m00, m01], [m01, m11]]), np.array([c0, c1]))
    M00, M01, M11, C0, C1 = (Fraction(x) for x in (m00, m01, m11, c0, c1))
    det = M00 * M11 - M01**2
    exact = (M11 * C0**2 - 2 * M01 * C0 * C1 + M00 * C1**2) / det
    assert abs(quad - float(exact)) < 1e-3  # from numpy's inverse: 0.03
    np.testing.assert_allclose(mu, [float((M11 * C0 - M01 * C1) / det), float((M00 * C1 - M01 * C0) / det)], rtol=1e-8)
