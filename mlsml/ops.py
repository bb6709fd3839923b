r"""Differentiable array primitives shared by the likelihood engine.

- :func:`group_sum` / :func:`group_expand`: sums within contiguous groups of rows
  and their adjoint (each is the other's vector-Jacobian product, so derivatives
  of any order work).
- :func:`logsumexp`: ``log sum exp`` over an axis with its derivative,

.. math::

    \operatorname{lse}(a)_j = \log \sum_k e^{a_{jk}}, \qquad
    \frac{\partial \operatorname{lse}(a)_j}{\partial a_{jk}} = e^{a_{jk} - \operatorname{lse}(a)_j}.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import scipy.special
from autograd.extend import defvjp, primitive

#: ``log(2 pi)``.
LOG2PI = float(np.log(2.0 * np.pi))


@primitive
def group_sum(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum the rows of ``x`` within contiguous groups (``axis=0``)."""
    return np.add.reduceat(x, starts, axis=0)


@primitive
def group_expand(g: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Repeat each group's row ``counts[j]`` times (the adjoint of :func:`group_sum`)."""
    return np.repeat(g, counts, axis=0)


defvjp(group_sum, lambda ans, x, starts, counts: lambda g: group_expand(g, starts, counts))
defvjp(group_expand, lambda ans, g, starts, counts: lambda h: group_sum(h, starts, counts))


@primitive
def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """``log(sum(exp(a), axis))`` without overflow, differentiable by autograd.

    The same primitive as ``autograd.scipy.special.logsumexp`` (scipy's function with
    this vector-Jacobian product), defined here because importing ``autograd.scipy``
    imports all of ``scipy.stats``, which would double the time of ``import mlsml``.
    """
    return scipy.special.logsumexp(a, axis=axis)


defvjp(logsumexp, lambda ans, a, axis: lambda g: anp.expand_dims(g, axis) * anp.exp(a - anp.expand_dims(ans, axis)))
