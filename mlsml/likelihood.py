"""The integrated log-likelihood of the mixed-effects location scale model.

Model (school ``j``, student ``i``)::

    y_ij = x_ij' beta + z_ij' u_j + e_ij,     e_ij ~ N(0, sigma2_ij)
    ln sigma2_ij = w_ij' alpha + v_j
    b_j = (u_j, v_j) ~ N(0, Sigma)

Given ``b = (u, v)`` the conditional log-likelihood of school ``j`` depends on
the data only through per-school weighted sums. With
``c_i = exp(-w_i' alpha)`` and ``r_i = y_i - x_i' beta``::

    log f(y_j | u, v) = -n_j/2 log(2 pi) - A_j/2 - n_j v/2 - exp(-v)/2 Q_j(u)
    Q_j(u) = S0_j - 2 u' S1_j + u' S2_j u
    n_j = #students,  A_j = sum_i w_i' alpha,  S0_j = sum_i c_i r_i^2,
    S1_j = sum_i c_i r_i z_i,  S2_j = sum_i c_i z_i z_i'

so one likelihood evaluation costs ``O(N p + J K q^2)`` for ``K`` quadrature
nodes, instead of ``O(N K)``, and memory stays ``O(N p)``.

Everything here is a pure function of the parameter vector, the design and
(where given) fixed quadrature nodes; it is written with ``autograd.numpy`` so
that gradients and Hessians are exact.
"""

from __future__ import annotations

from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
import scipy.special
from autograd.extend import defvjp, primitive

from .design import Design
from .quadrature import Nodes

LOG2PI = float(np.log(2.0 * np.pi))


@primitive
def group_sum(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum the rows of ``x`` within contiguous groups (``axis=0``)."""
    return np.add.reduceat(x, starts, axis=0)


@primitive
def group_expand(g: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Repeat each group's row ``counts[j]`` times (the adjoint of :func:`group_sum`)."""
    return np.repeat(g, counts, axis=0)


# each is the other's vector-Jacobian product, so derivatives of any order work
defvjp(group_sum, lambda ans, x, starts, counts: lambda g: group_expand(g, starts, counts))
defvjp(group_expand, lambda ans, g, starts, counts: lambda h: group_sum(h, starts, counts))


@primitive
def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    r"""``log(sum(exp(a), axis))`` without overflow, differentiable by autograd.

    .. math::

        \operatorname{lse}(a)_j = \log \sum_k e^{a_{jk}}, \qquad
        \frac{\partial \operatorname{lse}(a)_j}{\partial a_{jk}} = e^{a_{jk} - \operatorname{lse}(a)_j}

    The same primitive as ``autograd.scipy.special.logsumexp`` (scipy's function with
    this vector-Jacobian product), defined here because importing ``autograd.scipy``
    imports all of ``scipy.stats``, which would double the time of ``import mlsml``.
    """
    return scipy.special.logsumexp(a, axis=axis)


defvjp(logsumexp, lambda ans, a, axis: lambda g: anp.expand_dims(g, axis) * anp.exp(a - anp.expand_dims(ans, axis)))


class SchoolSums(NamedTuple):
    """Sufficient per-school sums for given ``beta`` and ``alpha``."""

    n: np.ndarray  # (J,)
    A: np.ndarray  # (J,)  sum of w'alpha
    S0: np.ndarray  # (J,)
    S1: np.ndarray  # (J, q)
    S2: np.ndarray  # (J, q, q)


def school_sums(beta, alpha, design: Design) -> SchoolSums:
    """Per-school sums ``n, A, S0, S1, S2`` (see module docstring)."""
    st, ct = design.starts, design.counts
    eta = anp.dot(design.W, alpha)
    c = anp.exp(-eta)
    r = design.y - anp.dot(design.X, beta)
    cr = c * r
    Z = design.Z
    q = Z.shape[1]
    n = design.counts.astype(float)
    A = group_sum(eta, st, ct)
    S0 = group_sum(cr * r, st, ct)
    if q == 0:  # random scale only: no school effect in the mean
        J = st.shape[0]
        S1 = anp.zeros((J, 0))
        S2 = anp.zeros((J, 0, 0))
    elif q == 1 and _is_ones(Z):
        S1 = group_sum(cr, st, ct)[:, None]
        S2 = group_sum(c, st, ct)[:, None, None]
    else:
        S1 = group_sum(cr[:, None] * Z, st, ct)
        zz = (Z[:, :, None] * Z[:, None, :]).reshape(Z.shape[0], q * q)
        S2 = anp.reshape(group_sum(c[:, None] * zz, st, ct), (-1, q, q))
    return SchoolSums(n, A, S0, S1, S2)


def _is_ones(Z: np.ndarray) -> bool:
    return bool(Z.shape[1] == 1 and np.all(Z[:, 0] == 1.0))


def log_conditional(b, sums: SchoolSums, q: int, random_scale: bool):
    """``log f(y_j | b_jk)`` for nodes ``b`` of shape ``(J, K, d)``; returns ``(J, K)``."""
    u = b[:, :, :q]
    S1u = anp.einsum("jkq,jq->jk", u, sums.S1)
    uS2u = anp.einsum("jkq,jqr,jkr->jk", u, sums.S2, u)
    Q = sums.S0[:, None] - 2.0 * S1u + uS2u
    base = -0.5 * sums.n * LOG2PI - 0.5 * sums.A
    if random_scale:
        v = b[:, :, q]
        return base[:, None] - 0.5 * sums.n[:, None] * v - 0.5 * anp.exp(-v) * Q
    return base[:, None] - 0.5 * Q


def log_prior(b, L):
    """``log phi(b; 0, L L')`` for ``b`` of shape ``(J, K, d)``; returns ``(J, K)``."""
    d = b.shape[-1]
    # solve L x = b for every node: forward substitution, written out for autograd
    xs = []
    for i in range(d):
        acc = b[:, :, i]
        for j in range(i):
            acc = acc - L[i, j] * xs[j]
        xs.append(acc / L[i, i])
    quad = sum(x**2 for x in xs) if d else 0.0 * b[:, :, 0]
    logdet = anp.sum(anp.log(anp.diag(L)))
    return -0.5 * d * LOG2PI - logdet - 0.5 * quad


def loglik_at_nodes(theta, design: Design, nodes: Nodes):
    """Integrated log-likelihood with the quadrature nodes held fixed.

    This is the function the optimiser sees between re-centrings, and whose
    autograd Hessian gives the observed information.

    Parameters
    ----------
    theta : array
        Parameters on the optimiser scale (see :mod:`mlsml.params`).
    design : Design
    nodes : Nodes
        Adapted nodes (from :func:`mlsml.posterior.adapt`).

    Returns
    -------
    float
        ``sum_j log L_j``.

    Examples
    --------
    Without a random scale the adaptive rule is exact, so one point gives the exact
    log-likelihood (the Laplace approximation of a Gaussian integral):

    >>> import mlsml
    >>> from mlsml.posterior import adapt
    >>> from mlsml.quadrature import gauss_hermite_rule
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> design = res.model.design
    >>> one = loglik_at_nodes(res.theta, design, adapt(res.theta, design, gauss_hermite_rule(1, 1)))
    >>> bool(abs(one - res.llf) < 1e-6)
    True
    """
    lay = design.layout
    if nodes.marginal:  # u integrated exactly, v by 1-d quadrature: see mlsml.marginal
        from .marginal import loglik_marginal

        return loglik_marginal(theta, design, nodes)
    if lay.extended:  # scale_re_formula / bs_formula: see mlsml.extended
        from .extended import loglik_at_nodes_ext

        return loglik_at_nodes_ext(theta, design, nodes)
    beta, alpha, L = lay.split(theta)
    sums = school_sums(beta, alpha, design)
    h = log_conditional(nodes.b, sums, lay.q, lay.random_scale) + log_prior(nodes.b, L)
    per_school = nodes.log_det + logsumexp(h + nodes.logw[None, :], axis=1)
    return anp.sum(per_school)


def loglik_per_school(theta, design: Design, nodes: Nodes) -> np.ndarray:
    """``log L_j`` for every school (numpy, not differentiated)."""
    lay = design.layout
    if nodes.marginal:
        from .marginal import loglik_marginal_per_school

        return loglik_marginal_per_school(theta, design, nodes)
    if lay.extended:
        from .extended import loglik_per_school_ext

        return loglik_per_school_ext(theta, design, nodes)
    beta, alpha, L = lay.split(np.asarray(theta, float))
    sums = school_sums(beta, alpha, design)
    h = log_conditional(nodes.b, sums, lay.q, lay.random_scale) + log_prior(nodes.b, L)
    return nodes.log_det + logsumexp(h + nodes.logw[None, :], axis=1)
