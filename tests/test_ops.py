"""Differentiable primitives (mlsml.ops): group sums, their adjoint, log-sum-exp.

Each is checked against a plain numpy loop on random inputs, and its derivatives
(first and second order, through autograd) against central finite differences.
The functions differentiated are polynomials or log-sum-exps of values in [-2, 2],
so the finite-difference error with h = 1e-5 is below 1e-7; tolerances leave a
factor of ten.
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsml.ops import LOG2PI, group_expand, group_sum, logsumexp


def _groups(counts):
    counts = np.asarray(counts, dtype=int)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    return starts, counts


def _fd_grad(f, x, h=1e-5):
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        out[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return out


group_counts = st.lists(st.integers(1, 5), min_size=1, max_size=8)


# ----------------------------------------------------------------- group sums
@settings(max_examples=40)
@given(counts=group_counts, ncols=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_group_sum_and_expand_match_a_loop(counts, ncols, seed):
    starts, counts = _groups(counts)
    N = int(counts.sum())
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N,) if ncols == 0 else (N, ncols))
    ref = np.stack([x[s : s + c].sum(axis=0) for s, c in zip(starts, counts)])
    np.testing.assert_allclose(group_sum(x, starts, counts), ref, rtol=1e-12, atol=1e-12)
    g = rng.normal(size=ref.shape)
    expanded = group_expand(g, starts, counts)
    assert expanded.shape == x.shape
    for j, (s, c) in enumerate(zip(starts, counts)):
        np.testing.assert_array_equal(expanded[s : s + c], np.broadcast_to(g[j], (c,) + g.shape[1:]))
    # adjoint: <group_sum(x), g> == <x, group_expand(g)>
    np.testing.assert_allclose(np.sum(group_sum(x, starts, counts) * g), np.sum(x * expanded), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("counts", [[1], [7], [1, 1, 1], [1, 4, 1]], ids=["one row", "one group", "all singletons", "mixed"])
def test_group_sum_edge_cases(counts):
    starts, counts = _groups(counts)
    x = np.arange(1.0, counts.sum() + 1.0)
    out = group_sum(x, starts, counts)
    assert out.shape == (len(counts),)
    np.testing.assert_array_equal(out, [x[s : s + c].sum() for s, c in zip(starts, counts)])
    np.testing.assert_array_equal(group_expand(out, starts, counts), np.repeat(out, counts))


def test_group_sum_derivatives_of_first_and_second_order():
    starts, counts = _groups([1, 3, 2])
    c = np.array([0.5, -1.0, 2.0])
    x = np.random.default_rng(0).uniform(-2, 2, size=6)

    def f(x):
        return anp.sum(c * group_sum(x, starts, counts) ** 3)

    grad = autograd.grad(f)(x)
    np.testing.assert_allclose(grad, _fd_grad(f, x), rtol=1e-6, atol=1e-7)
    # exact: df/dx_i = 3 c_j s_j^2 for row i of group j
    s = np.array([x[0], x[1:4].sum(), x[4:].sum()])
    np.testing.assert_allclose(grad, np.repeat(3 * c * s**2, counts), rtol=1e-12)
    hess = autograd.hessian(f)(x)
    fd_hess = np.stack([_fd_grad(lambda y, i=i: autograd.grad(f)(y)[i], x) for i in range(6)])
    np.testing.assert_allclose(hess, fd_hess, rtol=1e-6, atol=1e-6)
    block = np.equal.outer(np.repeat(np.arange(3), counts), np.repeat(np.arange(3), counts))
    np.testing.assert_array_equal(hess[~block], 0.0)  # rows of different groups do not interact


def test_group_expand_derivative():
    starts, counts = _groups([2, 1, 3])
    h = np.random.default_rng(1).uniform(-1, 1, size=(6, 2))
    g = np.random.default_rng(2).uniform(-2, 2, size=(3, 2))

    def f(g):
        return anp.sum(h * group_expand(g, starts, counts) ** 2)

    np.testing.assert_allclose(autograd.grad(f)(g), _fd_grad(f, g), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- log-sum-exp
@settings(max_examples=40)
@given(shape=st.sampled_from([(5,), (3, 4), (2, 3, 4)]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_logsumexp_matches_the_naive_formula(shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    a = np.random.default_rng(seed).uniform(-5, 5, size=shape)
    np.testing.assert_allclose(logsumexp(a, axis), np.log(np.sum(np.exp(a), axis=axis)), rtol=1e-13, atol=1e-13)


def test_logsumexp_does_not_overflow_or_underflow():
    a = np.array([[1000.0, 1000.0, -np.inf], [-1000.0, -1001.0, -1002.0], [0.0, -np.inf, -np.inf], [700.0, -700.0, 0.0]])
    out = logsumexp(a, 1)
    ref = np.array([1000.0 + np.log(2.0), -1000.0 + np.log1p(np.exp(-1.0) + np.exp(-2.0)), 0.0, 700.0])
    np.testing.assert_allclose(out, ref, rtol=1e-13)
    assert logsumexp(np.full(3, -np.inf), 0) == -np.inf
    # shift equivariance far from zero
    b = np.random.default_rng(3).normal(size=(4, 6))
    np.testing.assert_allclose(logsumexp(b + 800.0, 1), logsumexp(b, 1) + 800.0, rtol=1e-13)


def test_logsumexp_gradient_is_the_softmax():
    a = np.random.default_rng(4).uniform(-2, 2, size=(3, 5))
    w = np.array([0.3, -1.2, 2.0])

    def f(a):
        return anp.sum(w * logsumexp(a, 1))

    grad = autograd.grad(f)(a)
    np.testing.assert_allclose(grad, _fd_grad(f, a), rtol=1e-6, atol=1e-8)
    soft = np.exp(a - logsumexp(a, 1)[:, None])
    np.testing.assert_allclose(grad, w[:, None] * soft, rtol=1e-12)

    def f0(a):
        return anp.sum(w[:, None] * logsumexp(a.T, 0)[:, None] ** 2)  # axis 0, squared: a non-trivial outer derivative

    np.testing.assert_allclose(autograd.grad(f0)(a), _fd_grad(f0, a), rtol=1e-6, atol=1e-7)


def test_logsumexp_second_derivative():
    a = np.random.default_rng(5).uniform(-2, 2, size=4)
    hess = autograd.hessian(lambda a: logsumexp(a, 0))(a)
    p = np.exp(a - logsumexp(a, 0))
    np.testing.assert_allclose(hess, np.diag(p) - np.outer(p, p), rtol=1e-10, atol=1e-14)


def test_logsumexp_gradient_with_large_and_infinite_entries():
    """-inf entries (nodes with zero weight) get a zero derivative, and large ones no overflow."""
    a = np.array([[900.0, 899.0, -np.inf], [-900.0, -np.inf, -901.0]])
    grad = autograd.grad(lambda a: anp.sum(logsumexp(a, 1)))(a)
    assert np.all(np.isfinite(grad))
    e = np.exp(-1.0)
    np.testing.assert_allclose(grad, [[1 / (1 + e), e / (1 + e), 0.0], [1 / (1 + e), 0.0, e / (1 + e)]], rtol=1e-11)


def test_log2pi():
    assert LOG2PI == pytest.approx(np.log(2 * np.pi), rel=1e-15)
    assert isinstance(LOG2PI, float)
