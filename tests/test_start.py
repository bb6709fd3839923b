"""Starting values (mlsml.start): the least-squares helper."""

from __future__ import annotations

import numpy as np

from mlsml import start


def test_least_squares_equals_lstsq():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(500, 6)) * np.array([1e-3, 1.0, 1e3, 1.0, 5.0, 1e5])  # badly scaled columns
    b = rng.normal(size=500)
    x = start.least_squares(A, b)
    ref = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(x, ref, rtol=1e-8)


def test_least_squares_falls_back_to_lstsq_when_ill_conditioned():
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    A = np.column_stack([a, a + 1e-7 * rng.normal(size=400), np.ones(400)])  # condition ~1e7, Gram ~1e14
    b = A @ np.array([1.0, 2.0, 3.0]) + 1e-3 * rng.normal(size=400)
    Gs = A.T @ A
    d = np.sqrt(np.diag(Gs))
    assert np.linalg.cond(Gs / np.outer(d, d)) > start.NORMAL_EQUATIONS_MAX_COND
    np.testing.assert_array_equal(start.least_squares(A, b), np.linalg.lstsq(A, b, rcond=None)[0])
