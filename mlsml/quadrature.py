"""Adaptive Gauss-Hermite quadrature over the school effects.

For school ``j`` the marginal likelihood is ``L_j = int exp(h_j(b)) db`` with
``h_j(b) = log f(y_j | b) + log phi(b; 0, Sigma)``. With ``m_j`` the posterior
mode of ``h_j`` and ``C_j`` the lower Cholesky factor of ``(-H_j)^{-1}``
(``H_j`` the Hessian of ``h_j`` at ``m_j``), the change of variables
``b = m_j + C_j z`` gives

.. math::

    L_j = |C_j| \\int \\exp\\{h_j(m_j + C_j z)\\} dz
        \\approx |C_j| \\sum_k \\tilde w_k \\exp\\{h_j(m_j + C_j z_k)\\},

where ``(z_k, w_k)`` is the tensor product of the one-dimensional
Gauss-Hermite rule for the weight ``exp(-z^2/2)`` and
``tilde w_k = w_k exp(|z_k|^2 / 2)``. The sum is taken on the log scale
(log-sum-exp). When ``h_j`` is exactly quadratic (no random scale) the rule is
exact for any number of points; with a random scale, 11 points per
dimension in two dimensions agree with 21 points to better than 1e-8 in the
log-likelihood on every reference data set (see ``docs/quadrature.md``).

Sparse variant for higher dimensions: nodes whose weight ``tilde w_k``
multiplied by the standard-normal density is below ``prune`` relative to the
largest are dropped (``prune=0`` keeps the full product rule).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from .errors import ModelSpecError
from .validate import check_int, check_real

#: Default number of quadrature points per dimension, by dimension ``d`` of the
#: school effects. With full Cholesky rotation at the joint posterior mode these
#: reproduce the log-likelihood to < 1e-6 on the reference data sets (9 points in
#: three dimensions: 7 and 8 points missed the 11-point value by 1.2e-5 on London
#: Model 4 and 1.1e-5 on exam Model 4). Random-slope models with a random scale use
#: the u-exact rule (:class:`QuadratureSpec`) by default instead.
DEFAULT_NAGQ = {1: 11, 2: 11, 3: 9}

#: Most points per dimension. numpy's Gauss-Hermite weights fall below the smallest
#: double (and turn into NaN) a little beyond 370 points; the defaults (5 to 15) are
#: accurate to 1e-6 or better, so 200 leaves ample room for accuracy checks.
MAX_NAGQ = 200

#: Most nodes in one rule, ``nagq ** dim`` before any pruning. Every evaluation of the
#: log-likelihood holds arrays of (observations x nodes) values (and autograd keeps
#: several of them for the gradient), so memory and time grow as ``nagq ** dim``:
#: 20000 nodes with 4000 observations is already 640 MB per array.
MAX_QUAD_NODES = 20_000


def max_nagq(dim: int) -> int:
    """Most points per dimension for a rule in ``dim`` dimensions.

    The largest ``n <= MAX_NAGQ`` with ``n ** dim <= MAX_QUAD_NODES``.

    Parameters
    ----------
    dim : int
        Dimension of the rule.

    Returns
    -------
    int

    Examples
    --------
    >>> [max_nagq(d) for d in (1, 2, 3, 4, 5, 6)]
    [200, 141, 27, 11, 7, 5]
    """
    if dim <= 0:
        return MAX_NAGQ
    n = 1
    while n < MAX_NAGQ and (n + 1) ** dim <= MAX_QUAD_NODES:
        n += 1
    return n


def default_nagq(d: int) -> int:
    """Default points per dimension for ``d`` school effects.

    :data:`DEFAULT_NAGQ`, and 5 beyond three dimensions (fewer where ``5 ** d`` would
    exceed :data:`MAX_QUAD_NODES`, i.e. from seven dimensions on).

    Examples
    --------
    >>> default_nagq(2), default_nagq(3), default_nagq(4), default_nagq(7)
    (11, 9, 5, 4)
    """
    return min(DEFAULT_NAGQ.get(d, 5), max_nagq(d))


def check_nagq(nagq, dim: int, rule: str = "product") -> int:
    """``nagq`` as an ``int`` if it is a usable number of points per dimension.

    Parameters
    ----------
    nagq : int
        Points per dimension asked for.
    dim : int
        Dimension of the rule (school effects integrated numerically).
    rule : str
        Name of the rule, for the message.

    Returns
    -------
    int

    Raises
    ------
    ModelSpecError
        When ``nagq`` is not an integer (a float, a string or a bool is refused,
        not rounded or parsed), is below 1, or exceeds :func:`max_nagq` for ``dim``;
        the message gives the maximum and why it exists.

    Examples
    --------
    >>> check_nagq(21, 2)
    21
    >>> try:
    ...     check_nagq(10**6, 2)
    ... except ModelSpecError as err:
    ...     print(str(err)[:111])
    nagq=1000000 is too large for the product rule over 2 school effects: it would have 1e+12 nodes. At most 141 po
    """
    nagq = check_int("nagq (quadrature points per dimension)", nagq, minimum=1)
    top = max_nagq(dim)
    if nagq > top:
        nodes = float(nagq) ** max(dim, 1)
        if top == MAX_NAGQ:
            why = (
                f"at most MAX_NAGQ = {MAX_NAGQ} points per dimension, because beyond about 370 points numpy's "
                "Gauss-Hermite weights underflow to zero"
            )
        else:
            why = (
                f"at most MAX_QUAD_NODES = {MAX_QUAD_NODES} nodes in all (nagq ** {dim}), because every likelihood "
                "evaluation holds arrays of observations x nodes, so memory and time grow as nagq ** dimension"
            )
        effects = f"{dim} school effect{'s' if dim != 1 else ''}"
        raise ModelSpecError(
            f"nagq={nagq} is too large for the {rule} rule over {effects}: it would have {nodes:.3g} nodes. At most "
            f"{top} points per dimension are allowed for {effects}: the rule may have {why}. The defaults are "
            "accurate to 1e-6 or better; to check, refit with about twice the points and compare the log-likelihoods"
        )
    return nagq


#: Rules kept by :func:`gauss_hermite_rule` (each fit uses one or two; every node adaptation
#: asked for its rule again, and ``hermegauss`` cost 0.3 ms of a 4 ms adaptation).
RULE_CACHE_SIZE = 32


@dataclass(frozen=True)
class Rule:
    """A product Gauss-Hermite rule in ``d`` dimensions.

    Attributes
    ----------
    points : ndarray (K, d)
        Standardised nodes ``z_k``.
    logw : ndarray (K,)
        ``log tilde w_k = log w_k + |z_k|^2 / 2`` (for integrating a density
        against Lebesgue measure after the change of variables).
    nagq : int
        Points per dimension.
    """

    points: np.ndarray
    logw: np.ndarray
    nagq: int

    @property
    def size(self) -> int:
        """Number of nodes ``K``."""
        return int(self.points.shape[0])


def gauss_hermite_rule(d: int, nagq: int, prune: float = 0.0) -> Rule:
    """Tensor-product Gauss-Hermite rule with optional pruning.

    Parameters
    ----------
    d : int
        Dimension.
    nagq : int
        Points per dimension (>= 1).
    prune : float
        Drop nodes whose product weight ``prod w_i`` is below ``prune`` times the
        largest product weight (0 keeps all ``nagq**d`` nodes).

    Examples
    --------
    The rule integrates ``exp(-|z|^2 / 2)`` exactly: the weights ``exp(logw - |z|^2/2)``
    sum to ``(2 pi)^(d/2)``.

    >>> rule = gauss_hermite_rule(2, 11)
    >>> rule.size
    121
    >>> w = np.exp(rule.logw - 0.5 * (rule.points ** 2).sum(axis=1))
    >>> bool(np.isclose(w.sum(), 2 * np.pi))
    True
    >>> gauss_hermite_rule(3, 7, prune=1e-8).size < 7 ** 3
    True
    """
    return _rule(d, check_nagq(nagq, d), check_real("prune", prune, 0.0, 1.0, high_open=True))


@functools.lru_cache(maxsize=RULE_CACHE_SIZE)
def _rule(d: int, nagq: int, prune: float) -> Rule:
    """:func:`gauss_hermite_rule` for checked arguments, cached with read-only arrays."""
    x, w = hermegauss(nagq)
    logw1 = np.log(w)
    pts = np.array(list(itertools.product(x, repeat=d)), dtype=float).reshape(-1, d)
    lw = np.array([sum(c) for c in itertools.product(logw1, repeat=d)], dtype=float)
    if d == 0:
        pts = np.zeros((1, 0))
        lw = np.zeros(1)
    if prune > 0 and d > 0:
        keep = lw >= lw.max() + np.log(prune)
        pts, lw = pts[keep], lw[keep]
    logw = lw + 0.5 * np.sum(pts**2, axis=1)
    pts.setflags(write=False)
    logw.setflags(write=False)
    return Rule(points=pts, logw=logw, nagq=nagq)


@dataclass(frozen=True)
class Nodes:
    """Adapted quadrature nodes for every school.

    Attributes
    ----------
    b : ndarray (J, K, d)
        Nodes ``m_j + C_j z_k`` in the space of the school effects.
    logw : ndarray (K,)
        Log weights of the standard rule (see :class:`Rule`).
    log_det : ndarray (J,)
        ``log |C_j|``.
    mode : ndarray (J, d)
        Posterior modes ``m_j``.
    chol : ndarray (J, d - start, d - start)
        ``C_j`` (of the block of effects the rule covers).
    neg_hess : ndarray (J, d, d), optional
        ``-H_j`` at the mode.
    start : int
        The rule covers the effects ``start:`` (0: all of them, the product rule;
        ``q``: the scale effects, the u-exact rule); the entries before are zeros.
    """

    b: np.ndarray
    logw: np.ndarray
    log_det: np.ndarray
    mode: np.ndarray
    chol: np.ndarray
    neg_hess: np.ndarray | None = None
    start: int = 0

    @property
    def v(self) -> np.ndarray:
        """The nodes of the covered block, ``b[:, :, start:]``."""
        return self.b[:, :, self.start :]


def place_nodes(mode: np.ndarray, neg_hess: np.ndarray, rule: Rule, start: int = 0) -> Nodes:
    r"""Centre and rotate a rule at each school's mode.

    With ``C_j`` the lower Cholesky factor of the block ``start:`` of ``(-H_j)^{-1}``
    (the posterior covariance of those effects, all of them for ``start = 0``),

    .. math::

        b_{jk} = m_j + C_j z_k, \qquad \log|C_j| = \sum_i \log C_{j,ii};

    the entries before ``start`` are left at zero (the u-exact rule integrates them
    out exactly).

    Parameters
    ----------
    mode : ndarray (J, d)
    neg_hess : ndarray (J, d, d)
        Minus the Hessian of ``h_j`` at the mode (positive definite).
    rule : Rule
        A rule in ``d - start`` dimensions.
    start : int
        First effect of the block the rule covers.

    Examples
    --------
    >>> rule = gauss_hermite_rule(1, 3)
    >>> nodes = place_nodes(np.array([[1.0]]), np.array([[[4.0]]]), rule)   # mode 1, posterior sd 0.5
    >>> nodes.b[0, :, 0].round(4)
    array([0.134, 1.   , 1.866])
    >>> float(nodes.log_det[0]) == float(np.log(0.5))
    True
    """
    cov = np.linalg.inv(neg_hess)[:, start:, start:]
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    chol = np.linalg.cholesky(cov)
    log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    points = rule.points
    if points.shape[1] > 2:
        if start == 0:
            b = mode[:, None, :] + _rotate(chol, points)
        else:
            b = np.zeros((mode.shape[0], rule.size, mode.shape[1]))
            b[:, :, start:] = mode[:, None, start:] + _rotate(chol, points)
    else:  # coordinate by coordinate: the same numbers, without broadcasting over a last axis of length <= 2
        b = np.zeros((mode.shape[0], rule.size, mode.shape[1]))
        for t in range(points.shape[1]):
            b[:, :, start + t] = mode[:, start + t, None] + _rotate_coordinate(chol, points, t)
    return Nodes(b=b, logw=rule.logw, log_det=log_det, mode=mode, chol=chol, neg_hess=neg_hess, start=start)


def _rotate(chol: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``C_j z_k`` for all schools and nodes, shape ``(J, K, d)``.

    Up to two dimensions as the explicit sum over ``e`` (the same numbers as ``einsum``'s, which
    sums in that order, in 0.4 of its time: 4 instead of 9 ms for 500 schools and 15 x 15 nodes,
    at every node adaptation of a ``scale_re_formula`` fit); beyond, ``einsum``.
    """
    d = points.shape[1]
    if d > 2:
        return np.einsum("jde,ke->jkd", chol, points)
    return sum(chol[:, None, :, e] * points[None, :, None, e] for e in range(d))


def _rotate_coordinate(chol: np.ndarray, points: np.ndarray, t: int) -> np.ndarray:
    """Coordinate ``t`` of :func:`_rotate` for up to two dimensions, shape ``(J, K)``: the same
    sum over ``e`` in the same order (so the same numbers), with ``K`` as the last axis: a
    :func:`place_nodes` of 500 schools and 15 x 15 nodes over ``v`` (``start = 1``) in 4 instead of
    11 ms (a loaded machine), at every node adaptation of a ``scale_re_formula`` fit."""
    return sum(chol[:, t, e, None] * points[None, :, e] for e in range(points.shape[1]))


#: Kinds of rule: the product rule over all school effects, or the mean effects
#: integrated exactly and the product rule over the scale effects only.
QUADRATURE_KINDS = ("product", "uexact")

#: Default points per dimension of the u-exact rule (over the scale effects).
DEFAULT_NAGQ_UEXACT = 15


@dataclass(frozen=True)
class QuadratureSpec:
    """Which rule a likelihood uses.

    Attributes
    ----------
    kind : str
        ``"product"`` (adaptive Gauss-Hermite over all ``d`` school effects) or
        ``"uexact"`` (the ``q`` mean effects integrated exactly given the ``n_v``
        scale effects, which get the product rule; :mod:`mlsml.gaussian`).
    nagq : int
        Points per dimension.
    prune : float
        Pruning threshold of the product rule (:func:`gauss_hermite_rule`).
    """

    kind: str = "product"
    nagq: int = 11
    prune: float = 0.0

    def __post_init__(self):
        if self.kind not in QUADRATURE_KINDS:
            raise ModelSpecError(f"quadrature kind must be one of {QUADRATURE_KINDS}, not {self.kind!r}")

    @property
    def uexact(self) -> bool:
        """Whether the mean effects are integrated exactly."""
        return self.kind == "uexact"

    @property
    def option(self) -> str:
        """The name of the rule in :meth:`mlsml.MELSM.fit`'s ``quadrature`` option (``"product"``, ``"marginal"``)."""
        return "marginal" if self.uexact else "product"

    def dim(self, q: int, n_v: int) -> int:
        """Dimension of the rule for ``q`` mean and ``n_v`` scale effects."""
        return n_v if self.uexact else q + n_v

    def start(self, q: int) -> int:
        """First effect the rule covers (see :func:`place_nodes`)."""
        return q if self.uexact else 0

    def rule(self, q: int, n_v: int) -> Rule:
        """The standard (unadapted) rule."""
        return gauss_hermite_rule(self.dim(q, n_v), self.nagq, self.prune)
