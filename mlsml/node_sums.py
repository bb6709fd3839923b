r"""The likelihood with random slopes in the variance function, through per-node school sums.

With ``scale_re_formula`` (:class:`mlsml.integrand.PerObservation`) the residual variance
of row ``i`` of school ``j`` at the node ``v_jk`` of the u-exact rule is
``exp(lv_ik)``, ``lv_ik = w_i'alpha + g_i'v_jk``, so the data enter the integrand of node
``k`` through the *per-node* sums (``a_ik = e^{-lv_ik}``, ``r_i = y_i - x_i'beta``)

.. math::

    S_{0,jk} = \sum_{i \in j} a_{ik} r_i^2, \qquad S_{1,jk} = \sum_{i \in j} a_{ik} r_i z_i, \qquad
    S_{2,jk} = \sum_{i \in j} a_{ik} z_i z_i', \qquad
    \Lambda_{jk} = \sum_{i \in j} lv_{ik},

and, with ``M = S_2 + P_{uu}``, ``c = S_1 - P_{uv} v``, ``mu = M^{-1} c`` (:mod:`mlsml.gaussian`),

.. math::

    g_{jk} = -\tfrac{n_j}{2}\log 2\pi - \tfrac12\Lambda_{jk} - \tfrac12 S_{0,jk}
        - \tfrac{d}{2}\log 2\pi - \tfrac12\log|\Sigma| - \tfrac12 v'P_{vv}v
        + \tfrac q2 \log 2\pi - \tfrac12\log|M| + \tfrac12 c'\mu,
    \qquad \ell = \sum_j \Big[\log|C_j| + \log\sum_k e^{g_{jk} + \log\tilde w_k}\Big].

**Factorised nodes.** The u-exact rule's nodes are ``v_jk = m_j + C_j z_k`` with
``z_k = (x_{k_1}, ..., x_{k_{n_v}})`` a product of the one-dimensional Gauss-Hermite points
``x`` (:func:`mlsml.quadrature.place_nodes`), so the exponential of a linear function of
``v`` factorises over the coordinates of ``z``. With ``\gamma_i = C_j'g_i`` and the node
index split as ``k = (l, k_{last})`` (the last coordinate varies fastest),

.. math::

    a_{ik} = \Phi_{il}\,\phi_{i k_{last}}, \qquad
    \Phi_{il} = e^{-w_i'\alpha - g_i'm_j - \sum_{d < n_v} \gamma_{id} x_{l_d}}, \qquad
    \phi_{i\kappa} = e^{-\gamma_{i n_v} x_\kappa},

    S_{t,j(l\kappa)} = \sum_{i \in j} \Phi_{il}\, C_{ti}\, \phi_{i\kappa} = (\Phi_j' \operatorname{diag}(C_t) \phi_j)_{l\kappa},

with ``C_0 = r^2``, ``C_{1a} = r z_a``, ``C_{2ab} = z_a z_b``: one matrix product per school
(``n_agq^{n_v - 1} x n_j`` times ``n_j x n_agq``; schools of equal size in one batched product),
and ``n_agq^{n_v-1} + n_agq`` exponentials per row instead of ``n_agq^{n_v}``. The nodes are
exactly today's: the sums are the same numbers up to rounding.

**Derivatives** (the nodes held fixed, as :meth:`mlsml.likelihood.Likelihood.at_nodes`). With
the node weights ``p_jk`` and, for a direction ``a`` moving ``M``, ``c`` by ``dM_a``, ``dc_a``,

.. math::

    \partial_a g = \operatorname{tr}(G\,dM_a) + \mu'dc_a + dl_a, \quad G = -\tfrac12(M^{-1} + \mu\mu'),
    \qquad h_{ab} = \tfrac12\operatorname{tr}(M^{-1}dM_a M^{-1}dM_b) + e_a'M^{-1}e_b, \quad e_a = dc_a - dM_a\mu

(:mod:`mlsml.derivatives`): the sums ``S_0`` (``dl = -1/2``), ``S_{1a}`` (``dc = e_a``), ``S_{2ab}``
(``dM = E_ab + E_ba``) and the log-Cholesky parameters ``psi`` (``dM = dP_{uu}``,
``dc = -dP_{uv}v``, ``dl = -v'dP_{vv}v/2 - d\log|\Sigma|/2``). The sums depend on
``lambda = (beta, alpha)``, with ``J_{jk} = \partial S_{jk}/\partial\lambda'``
(``\partial_\beta S_t = \sum a D_t x``, ``D_0 = -2r``, ``D_{1a} = -z_a``, ``D_2 = 0``;
``\partial_\alpha S_t = -\sum a C_t w``: the same products with more columns), and
``\partial_\alpha \Lambda = \sum_i w_i`` at every node. Then

.. math::

    \frac{\partial\ell}{\partial\lambda} = \sum_i U_{ti} (D_{ti} x_i, -C_{ti} w_i) - \tfrac12 \sum_i w_i,
    \qquad U_{ti} = \sum_k a_{ik}\,\rho_{t,jk}, \quad \rho_{jk} = p_{jk}\, \partial_T g_{jk}

(``U = \sum_\kappa \phi_{i\kappa} (\Phi_i' \rho_j)_\kappa``, again one product per school), and every
parameter is a direction moving ``M``, ``c`` and the linear terms at every node (``lambda``
through ``J_{jk}``, ``psi`` through ``P``), so the Hessian is the weighted covariance over the
nodes of every school

.. math::

    \frac{\partial^2\ell}{\partial\theta\partial\theta'} = \sum_{jk} p_{jk}(h + \partial g\,\partial g')_{jk}
        - \sum_j \bar g_j \bar g_j' + \sum_{i,t} U_{ti}\,\frac{\partial^2 C_{ti}a_{i\cdot}}{\partial\lambda\partial\lambda'}
        + \sum_{jk} p_{jk}\,\frac{\partial g_{jk}}{\partial P}\cdot\frac{\partial^2 P}{\partial\psi\partial\psi'},

the third term the row weights ``2 U_0 xx'``, ``-\sum_t U_t D_t\, x w'`` and ``\sum_t U_t C_t\, ww'``,
the last with ``P`` as the likelihood computes it (through ``L^{-1}``). This replaces autograd's reverse passes over
``N x K`` arrays: tests/test_node_sums.py checks value, gradient and Hessian against autograd
on :meth:`~mlsml.likelihood.Likelihood.at_nodes`.
"""

from __future__ import annotations

import weakref
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .derivatives import _inverse_chol_derivatives
from .integrand import CHUNK, PerObservation
from .ops import LOG2PI
from .quadrature import Nodes, gauss_hermite_rule

#: Up to this many columns of ``coef`` :meth:`NodeSums._node_sums` forms ``phi_ikappa coef_it`` column
#: by column (2.5 instead of 3.8 ms for the three sums of one mean effect on 20,000 rows and 15
#: points; with twelve columns, the lambda directions of the Hessian, broadcasting is faster).
NARROW = 4


def applies(integrand, uexact: bool) -> bool:
    """Whether this module evaluates the likelihood: ``scale_re_formula`` under the u-exact rule,
    without a between-school variance model or a quadratic association (level-1 weights, a
    variance offset and covariance constraints are handled)."""
    lay = integrand.layout
    return type(integrand) is PerObservation and uexact and not lay.bs_terms and not lay.quad_assoc


def _size_groups(counts: np.ndarray, starts: np.ndarray, width: int) -> list[tuple[object, object, int]]:
    """Schools of equal size: ``(schools, rows, size)`` with at most :data:`CHUNK` / ``width`` rows each.

    ``schools`` and ``rows`` are slices where the schools are consecutive (then the rows are one
    block, read without a copy), else index arrays (``rows`` of shape ``(n_schools, size)``).
    """
    out = []
    for size in np.unique(counts):
        size = int(size)
        js = np.flatnonzero(counts == size)
        per = max(1, CHUNK // max(1, size * width))
        for a in range(0, js.size, per):
            part = js[a : a + per]
            if part[-1] - part[0] == part.size - 1:  # consecutive schools: consecutive rows
                r0 = int(starts[part[0]])
                out.append((slice(part[0], part[-1] + 1), slice(r0, r0 + part.size * size), size))
            else:
                out.append((part, starts[part][:, None] + np.arange(size), size))
    return out


def _block(M: np.ndarray, rows, size: int) -> np.ndarray:
    """The rows of a size group as ``(n_schools, size, ...)`` (a view for a slice)."""
    if isinstance(rows, slice):
        return M[rows].reshape((-1, size) + M.shape[1:])
    return M[rows]


class Factors(NamedTuple):
    """The factors ``Phi`` (N, L) and ``phi`` (N, n) of ``a_ik`` (module docstring)."""

    outer: np.ndarray
    inner: np.ndarray


def node_factors(design, eta: np.ndarray, nodes: Nodes, nagq: int) -> Factors | None:
    r"""``Phi`` and ``phi`` of the module docstring, or ``None`` when ``nodes`` are not the product
    rule of ``nagq`` points placed at ``nodes.mode`` with ``nodes.chol`` (then :class:`NodeSums` does not apply)."""
    v = np.asarray(nodes.v, dtype=float)
    J, K, nv = v.shape
    chol = np.asarray(nodes.chol, dtype=float)
    rule = gauss_hermite_rule(nv, nagq)
    if K != rule.size or chol.shape != (J, nv, nv):
        return None
    mode = np.asarray(nodes.mode, dtype=float)[:, -nv:]
    probe = np.unique([0, K // 2, K - 1])  # a cheap check that v = m + C z at these nodes
    if not np.allclose(mode[:, None, :] + np.einsum("jde,ke->jkd", chol, rule.points[probe]), v[:, probe], rtol=1e-13, atol=1e-13):
        return None
    x = gauss_hermite_rule(1, nagq).points[:, 0]
    G, ct = design.G, design.counts
    gamma = np.empty((G.shape[0], nv))  # C_j' g_i
    for d in range(nv):
        gamma[:, d] = sum(G[:, t] * np.repeat(chol[:, t, d], ct) for t in range(nv))
    base = eta + sum(G[:, t] * np.repeat(mode[:, t], ct) for t in range(nv))
    outer = base[:, None]
    for d in range(nv - 1):  # lexicographic in the first nv - 1 coordinates, as the rule
        outer = (outer[:, :, None] + gamma[:, d, None, None] * x[None, None, :]).reshape(len(base), -1)
    Phi = np.exp(-outer)
    if design.weights is not None:  # level-1 weights multiply every observation's term
        Phi *= design.weights[:, None]
    return Factors(Phi, np.exp(-gamma[:, nv - 1, None] * x[None, :]))


class NodeSums:
    """Value, gradient and Hessian of the per-observation likelihood at fixed nodes (module docstring).

    Parameters
    ----------
    integrand : PerObservation
    theta : ndarray
        Optimiser-scale parameters.
    nodes : Nodes
        Nodes of the u-exact rule (over the scale effects).
    factors : Factors
        :func:`node_factors` of the nodes (:meth:`build` makes them).
    """

    @classmethod
    def build(cls, integrand: PerObservation, theta, nodes: Nodes, nagq: int) -> NodeSums | None:
        """A :class:`NodeSums`, or ``None`` when the nodes are not the product rule of ``nagq`` points."""
        lay = integrand.layout
        alpha = np.asarray(theta, dtype=float)[lay.p : lay.p + lay.k]
        factors = node_factors(integrand.design, np.asarray(integrand.design.log_variance_index(alpha)), nodes, nagq)
        return None if factors is None else cls(integrand, theta, nodes, factors)

    def __init__(self, integrand: PerObservation, theta: np.ndarray, nodes: Nodes, factors: Factors):
        design = integrand.design
        lay = integrand.layout
        self.design, self.lay = design, lay
        q, nv, p, k = lay.q, lay.n_v, lay.p, lay.k
        self.q, self.nv = q, nv
        theta = np.asarray(theta, dtype=float)
        self.theta = theta
        beta, alpha = theta[:p], theta[p : p + k]
        L = np.asarray(lay.split(theta)[2], dtype=float)
        self.L = L
        G, Z = design.G, design.Z
        st, ct = design.starts, design.counts
        self.eta = np.asarray(design.log_variance_index(alpha))  # w'alpha (+ a variance offset)
        self.wt = design.weights  # level-1 weights or None
        self.r = design.y - design.X @ beta
        v = np.asarray(nodes.v, dtype=float)
        self.v = v
        J, K = v.shape[:2]
        self.factors = factors
        self.n_inner = factors.inner.shape[1]
        # row coefficients C_t of the sums: r^2, r z_a, z_a z_b (a <= b)
        self.pairs = [(a, b) for a in range(q) for b in range(a, q)]
        cols = [self.r**2] + [self.r * Z[:, a] for a in range(q)] + [Z[:, a] * Z[:, b] for a, b in self.pairs]
        self.C = np.column_stack(cols)  # (N, m)
        m = self.C.shape[1]
        self.m = m
        S = self._node_sums(self.C)  # (J, K, m)
        self.S = S
        wt = np.ones(design.nobs) if self.wt is None else self.wt
        n = np.add.reduceat(wt, st) if self.wt is not None else ct.astype(float)
        gsum = np.add.reduceat(G * wt[:, None], st, axis=0)
        lam = np.add.reduceat(self.eta * wt, st)[:, None] + sum(v[:, :, t] * gsum[:, t, None] for t in range(nv))
        # the prior, as log_h_uexact computes it
        Linv = np.linalg.inv(L)
        P = Linv.T @ Linv
        self.P = P
        logdet_sigma = 2.0 * np.sum(np.log(np.diag(L)))
        self.vv = _outer_terms(v)  # (n_v^2, J, K)
        vPv = np.tensordot(P[q:, q:].ravel(), self.vv, axes=1)
        g = -0.5 * n[:, None] * LOG2PI - 0.5 * lam - 0.5 * S[:, :, 0]
        g = g - 0.5 * (q + nv) * LOG2PI - 0.5 * logdet_sigma - 0.5 * vPv
        if q:
            M = np.empty((J, K, q, q))
            for i, (a, b) in enumerate(self.pairs):
                M[:, :, a, b] = M[:, :, b, a] = S[:, :, 1 + q + i]
            M += P[:q, :q]
            c = S[:, :, 1 : 1 + q] - v @ P[:q, q:].T
            if q == 1:
                Minv = 1.0 / M
                logdetM = np.log(M[:, :, 0, 0])
                mu = Minv[:, :, 0] * c
            else:
                Minv = np.linalg.inv(M)
                Minv = 0.5 * (Minv + np.swapaxes(Minv, 2, 3))
                logdetM = np.linalg.slogdet(M)[1]
                mu = (Minv @ c[:, :, :, None])[:, :, :, 0]
            g = g + 0.5 * q * LOG2PI - 0.5 * logdetM + 0.5 * np.sum(c * mu, axis=2)
            self.Minv, self.mu = Minv, mu
            self.Gm = -0.5 * (Minv + mu[:, :, :, None] * mu[:, :, None, :])
        a = g + nodes.logw[None, :]
        top = a.max(axis=1, keepdims=True)
        ea = np.exp(a - top)
        total = ea.sum(axis=1)
        # level-2 weights W_j: the log-likelihood is sum_j W_j log L_j, so every school's
        # derivatives are multiplied by W_j (pw: the node weights times W_j)
        W2 = design.group_weights
        self.W2 = np.ones(J) if W2 is None else np.asarray(W2, dtype=float)
        self.value = float(np.sum(self.W2 * (nodes.log_det + top[:, 0] + np.log(total))))
        self.p = ea / total[:, None]
        self.pw = self.p * self.W2[:, None]

    # ------------------------------------------------------------ pieces
    def _node_sums(self, coef: np.ndarray) -> np.ndarray:
        """``sum_{i in j} a_ik coef_i`` for every node, shape ``(J, K) + coef.shape[1:]`` (module docstring)."""
        design = self.design
        Phi, phi = self.factors
        n = self.n_inner
        J, K = self.v.shape[:2]
        L = Phi.shape[1]
        tail = coef.shape[1:]
        width = int(np.prod(tail, dtype=int))
        flat = coef.reshape(-1, width)
        if width <= NARROW:  # the products phi_ikappa coef_it sum by sum: the same numbers, faster for few sums
            right = np.empty((flat.shape[0], n, width))
            for t in range(width):
                right[:, :, t] = phi * flat[:, t, None]
        else:
            right = phi[:, :, None] * flat[:, None, :]
        right = right.reshape(-1, n * width)  # columns (kappa, t)
        out = np.empty((J, L, n * width))
        for js, rows, size in _size_groups(design.counts, design.starts, L + width * n):
            if isinstance(js, slice):  # consecutive schools: the product written in place
                np.matmul(np.swapaxes(_block(Phi, rows, size), 1, 2), _block(right, rows, size), out=out[js])
            else:
                out[js] = np.swapaxes(_block(Phi, rows, size), 1, 2) @ _block(right, rows, size)
        return out.reshape((J, K) + tail)  # k = l n + kappa

    def _row_weights(self, w: np.ndarray) -> np.ndarray:
        """``U_ti = sum_k a_ik rho_{t,jk}`` for every row, ``rho_{t,jk} = w_jk dg_jk / dT_t``, shape ``(N, m)``."""
        design = self.design
        Phi, phi = self.factors
        n, m = self.n_inner, self.m
        J, L = w.shape[0], Phi.shape[1]
        R = np.empty((J, L, m, n))  # columns (t, kappa)
        for t, dg in enumerate(self._grad_T()):
            R[:, :, t, :] = (w * dg).reshape(J, L, n)
        R = R.reshape(J, L, m * n)
        Y = np.empty((design.nobs, m * n))
        for js, rows, size in _size_groups(design.counts, design.starts, L + n * m):
            if isinstance(rows, slice):  # consecutive rows: the product written in place
                np.matmul(_block(Phi, rows, size), R[js], out=_block(Y, rows, size))
            else:
                Y[rows] = _block(Phi, rows, size) @ R[js]
        prod = Y.reshape(-1, m, n)
        np.multiply(prod, phi[:, None, :], out=prod)
        return np.sum(prod, axis=2)

    def _grad_T(self) -> list:
        """``dg_jk / dT`` for the sums ``S0, S1_a, S2_ab`` (a <= b): ``m`` arrays ``(J, K)`` (or scalars)."""
        q = self.q
        out: list = [-0.5]
        if q:
            out += [self.mu[:, :, a] for a in range(q)]
            out += [self.Gm[:, :, a, b] * (1.0 if a == b else 2.0) for a, b in self.pairs]
        return out

    def _psi_parts(self):
        """``(dM, dc, dl)`` of the log-Cholesky directions and ``d^2 P`` (module docstring)."""
        q = self.q
        Linv, _, dLinv, d2Linv, dlogdet = _inverse_chol_derivatives(self.L, self.lay.free_chol)
        dP = np.swapaxes(dLinv, 1, 2) @ Linv + Linv.T @ dLinv
        v = self.v
        npsi, nv = dP.shape[0], self.nv
        dl = -0.5 * np.tensordot(dP[:, q:, q:].reshape(npsi, nv * nv), self.vv, axes=1) - 0.5 * dlogdet[:, None, None]
        dM = dP[:, :q, :q]
        J, K = v.shape[:2]
        dc = v.reshape(J * K, nv) @ np.transpose(dP[:, :q, q:], (2, 0, 1)).reshape(nv, npsi * q)
        dc = -np.moveaxis(dc.reshape(J, K, npsi, q), 2, 0)  # (n_psi, J, K, q)
        d2P = np.swapaxes(d2Linv, 2, 3) @ Linv + np.swapaxes(dLinv, 1, 2)[:, None] @ dLinv[None, :]
        d2P = d2P + np.swapaxes(d2P, 2, 3)
        return dM, dc, dl, d2P

    def _grad_psi(self, dM, dc, dl) -> np.ndarray:
        """``dg_jk / dpsi``, shape ``(n_psi, J, K)``."""
        if not self.q:
            return dl
        return dl + _trace_product(self.Gm, dM[:, None, None]) + _dot_last(self.mu, dc)

    def _D(self) -> np.ndarray:
        """``D_t`` of the module docstring (``dC_t / dbeta = D_t x``), shape ``(N, m)``."""
        D = np.zeros_like(self.C)
        D[:, 0] = -2.0 * self.r
        Z = self.design.Z
        for a in range(self.q):
            D[:, 1 + a] = -Z[:, a]
        return D

    # ------------------------------------------------------------ results
    def gradient(self) -> np.ndarray:
        """The gradient in ``theta`` with the nodes held fixed."""
        design, lay = self.design, self.lay
        p, k = lay.p, lay.k
        U = self.U
        grad = np.empty(self.theta.size)
        grad[:p] = design.X.T @ np.einsum("nt,nt->n", U, self._D())
        row_w = np.repeat(self.W2, design.counts) * (1.0 if self.wt is None else self.wt)
        wsum = design.W.T @ row_w
        grad[p : p + k] = -(design.W.T @ np.einsum("nt,nt->n", U, self.C)) - 0.5 * wsum
        # by the chain rule through the entries of P: d/dpsi = (sum_jk p dg/dP) . dP - J dlog|Sigma| / 2
        Linv, _, dLinv, _, dlogdet = _inverse_chol_derivatives(self.L, self.lay.free_chol)
        dP = np.swapaxes(dLinv, 1, 2) @ Linv + Linv.T @ dLinv
        grad[p + k :] = np.einsum("xy,nxy->n", self.mean_dg_dP, dP) - 0.5 * self.W2.sum() * dlogdet
        return grad

    @cached_property
    def U(self) -> np.ndarray:
        """The row weights ``U_ti`` of :meth:`_row_weights` at the weights ``W_j p_jk`` (gradient and
        Hessian use the same, computed once), shape ``(N, m)``."""
        return self._row_weights(self.pw)

    @cached_property
    def mean_dg_dP(self) -> np.ndarray:
        """:meth:`_mean_dg_dP` (gradient and Hessian use the same, computed once)."""
        return self._mean_dg_dP()

    def _mean_dg_dP(self) -> np.ndarray:
        """``sum_jk p_jk dg_jk / dP`` (the entries of ``P`` as the likelihood uses them), shape ``(d, d)``."""
        q, w, v = self.q, self.pw, self.v
        out = np.zeros(self.L.shape)
        if q:
            out[:q, :q] = np.tensordot(w, self.Gm, axes=([0, 1], [0, 1]))
            out[:q, q:] = -_tensordot_nodes(_times_columns(w, self.mu), v)
        out[q:, q:] = -0.5 * _tensordot_nodes(_times_columns(w, v), v)
        return out

    def _lambda_directions(self):
        """``(dM, dc, dl)`` at every node of the ``p + k`` directions of ``lambda`` (through the sums)."""
        design = self.design
        q = self.q
        coef = np.concatenate([self._D()[:, :, None] * design.X[:, None, :], -self.C[:, :, None] * design.W[:, None, :]], axis=2)
        Jk = np.moveaxis(self._node_sums(coef), 3, 0)  # (nl, J, K, m): dS / dlambda'
        nl, J, K = Jk.shape[:3]
        dl = -0.5 * Jk[..., 0]
        dc = Jk[..., 1 : 1 + q]
        dM = np.empty((nl, J, K, q, q))
        for i, (a, b) in enumerate(self.pairs):
            dM[..., a, b] = dM[..., b, a] = Jk[..., 1 + q + i]
        return dM, dc, dl

    def hessian(self) -> np.ndarray:
        r"""The Hessian in ``theta`` with the nodes held fixed.

        Every parameter is a direction moving ``M``, ``c`` and the linear terms at every node
        (``lambda`` through the sums, ``J_jk``; ``psi`` through ``P``), so with the features
        ``phi_a = (g_a, e_a, A_a)`` and ``phi'_b = (g_b, M^{-1}e_b, A_b'/2)``, ``A_a = M^{-1} dM_a``,
        the weighted second moments ``sum_jk p_jk (h_ab + g_a g_b)`` are one matrix product per
        feature, ``sum_jk p_jk <phi_a, phi'_b>``; then the school means are removed and the
        second derivatives of the sums (row weights) and of ``P`` added (module docstring).
        """
        design, lay = self.design, self.lay
        X, W = design.X, design.W
        p, k, q = lay.p, lay.k, self.q
        nl = p + k
        w = self.pw
        J, K = w.shape
        dM_psi, dc_psi, dl_psi, d2P = self._psi_parts()
        npsi = dl_psi.shape[0]
        dM_l, dc_l, dl_l = self._lambda_directions()
        dl = np.concatenate([dl_l, dl_psi])  # (n, J, K)
        g = dl
        features = [g]
        dual = [g]
        n = nl + npsi
        if q:
            Minv, mu = self.Minv, self.mu
            g, e, A, Me = np.empty((n, J, K)), np.empty((n, J, K, q)), np.empty((n, J, K, q, q)), np.empty((n, J, K, q))
            for a in range(n):  # direction by direction (a psi direction's dM is one matrix for all nodes)
                lam = a < nl
                dM = dM_l[a : a + 1] if lam else dM_psi[a - nl][None, None, None]
                dc = dc_l[a : a + 1] if lam else dc_psi[a - nl : a - nl + 1]
                g[a] = (dl[a : a + 1] + _trace_product(self.Gm, dM) + _dot_last(mu, dc))[0]
                e[a] = (dc - _matvec(dM, mu))[0]
                A[a] = _matmul(Minv, dM)[0]
                Me[a] = _matvec(Minv, e[a : a + 1])[0]
            features = [g] + [e[..., x] for x in range(q)] + [A[..., x, y] for x in range(q) for y in range(q)]
            dual = [g] + [Me[..., x] for x in range(q)] + [0.5 * A[..., y, x] for x in range(q) for y in range(q)]
        gbar = np.sum(g * self.p, axis=2)  # (n, J)
        H = -(gbar * self.W2) @ gbar.T
        for phi_s, dual_s in zip(features, dual):  # sum_jk p_jk <phi_a, phi'_b>, feature by feature
            H += phi_s.reshape(n, -1) @ (dual_s * w).reshape(n, -1).T
        # second derivatives of the sums: row weights U_t (module docstring)
        U = self.U
        D = self._D()
        w_bb = 2.0 * U[:, 0]
        w_ba = -np.einsum("nt,nt->n", U, D)
        w_aa = np.einsum("nt,nt->n", U, self.C)
        H[:p, :p] += (X * w_bb[:, None]).T @ X
        H[:p, p:nl] += (X * w_ba[:, None]).T @ W
        H[p:nl, :p] = H[:p, p:nl].T
        H[p:nl, p:nl] += (W * w_aa[:, None]).T @ W
        # the chain rule's second term: dg/dP (entries as used) times d^2 P
        H[nl:, nl:] += np.einsum("xy,abxy->ab", self.mean_dg_dP, d2P)
        return 0.5 * (H + H.T)


def _times_columns(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w[:, :, None] * x`` for ``w`` (J, K) and ``x`` (J, K, n), a C-contiguous array filled column by
    column (the same numbers; broadcasting over a last axis of length one to three is slow)."""
    out = np.empty(x.shape)
    for t in range(x.shape[2]):
        out[:, :, t] = w * x[:, :, t]
    return out


def _tensordot_nodes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``numpy.tensordot(a, b, axes=([0, 1], [0, 1]))`` for ``a`` (J, K, m) and ``b`` (J, K, n): the
    same ``dot`` of the same views (so the same numbers), without tensordot's checks."""
    return np.dot(a.reshape(-1, a.shape[2]).T, b.reshape(-1, b.shape[2]))


def _total(terms):
    """The sum of the arrays ``terms`` in their order, starting from the first (not from ``0``, as the
    built-in ``sum`` does: the same numbers, one pass over the arrays fewer; with a single term, it)."""
    terms = iter(terms)
    out = next(terms)
    for term in terms:
        out = out + term
    return out


def _matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` over the last two axes (broadcast), written out: the matrices are ``q x q`` with small ``q``."""
    q = A.shape[-1]
    shape = np.broadcast_shapes(A.shape, B.shape)
    out = np.empty(shape)
    for x in range(q):
        for z in range(B.shape[-1]):
            out[..., x, z] = _total(A[..., x, y] * B[..., y, z] for y in range(q))
    return out


def _matvec(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A @ b`` for stacked ``q x q`` matrices and ``q``-vectors (broadcast), written out."""
    q = A.shape[-1]
    rows = [_total(A[..., x, y] * b[..., y] for y in range(q)) for x in range(q)]
    if q == 1:
        return rows[0][..., None]
    return np.stack(np.broadcast_arrays(*rows), axis=-1)


def _trace_product(Gm: np.ndarray, dM: np.ndarray) -> np.ndarray:
    """``tr(G dM_a)`` for ``G`` (J, K, q, q) and ``dM`` (n, J, K, q, q), shape ``(n, J, K)``."""
    q = Gm.shape[-1]
    return _total(Gm[:, :, x, y] * dM[:, :, :, y, x] for x in range(q) for y in range(q))


def _dot_last(mu: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """``mu' dc_a`` for ``mu`` (J, K, q) and ``dc`` (n, J, K, q), shape ``(n, J, K)``."""
    return _total(mu[:, :, x] * dc[..., x] for x in range(mu.shape[-1]))


def _outer_terms(v: np.ndarray) -> np.ndarray:
    """``v_r v_s`` for all ``(r, s)`` of ``v`` (J, K, n), shape ``(n^2, J, K)`` (row-major in ``(r, s)``)."""
    n = v.shape[2]
    return np.stack([v[:, :, r] * v[:, :, s] for r in range(n) for s in range(n)])


class _Last(NamedTuple):
    """The key and value of :data:`_LAST`."""

    integrand: weakref.ref
    nodes: weakref.ref
    theta: bytes
    nagq: int
    sums: NodeSums


#: The last :class:`NodeSums` of :func:`value_and_grad` (one slot): the Newton polish of
#: :mod:`mlsml.optimize` asks for the gradient and then the Hessian at the same ``theta`` and
#: the same nodes, and the Hessian then reuses the sums, weights and row weights instead of
#: computing them again (the same numbers). The slot is found by identity of the integrand and
#: the ``Nodes`` object and by the bytes of ``theta``, and emptied when those nodes are freed.
_LAST: dict[str, _Last] = {}


def _forget(nodes_ref: weakref.ref) -> None:
    """Empty :data:`_LAST` if it still holds the sums at the nodes of ``nodes_ref`` (freed)."""
    last = _LAST.get("sums")
    if last is not None and last.nodes is nodes_ref:
        _LAST.pop("sums", None)


def _sums(integrand: PerObservation, theta, nodes: Nodes, nagq: int, keep: bool) -> NodeSums | None:
    """:meth:`NodeSums.build`, or the sums of :data:`_LAST` when they are at the same arguments;
    ``keep``: put the result in :data:`_LAST`."""
    theta = np.asarray(theta, dtype=float)
    key = theta.tobytes()
    last = _LAST.get("sums")
    if last is not None and last.nodes() is nodes and last.integrand() is integrand and last.theta == key and last.nagq == nagq:
        return last.sums
    ns = NodeSums.build(integrand, theta, nodes, nagq)
    if ns is not None and keep:
        ref = weakref.ref(nodes, _forget)
        _LAST["sums"] = _Last(weakref.ref(integrand), ref, key, nagq, ns)
    return ns


def value_and_grad(integrand: PerObservation, theta, nodes: Nodes, nagq: int) -> tuple[float, np.ndarray] | None:
    """The log-likelihood and its gradient at fixed nodes (:class:`NodeSums`); ``None`` when the nodes
    are not the product rule of ``nagq`` points (:func:`node_factors`)."""
    ns = _sums(integrand, theta, nodes, nagq, keep=True)
    return None if ns is None else (ns.value, ns.gradient())


def hessian(integrand: PerObservation, theta, nodes: Nodes, nagq: int) -> np.ndarray | None:
    """The Hessian at fixed nodes (:class:`NodeSums`; those of the last :func:`value_and_grad` when
    at the same arguments); ``None`` as :func:`value_and_grad`."""
    ns = _sums(integrand, theta, nodes, nagq, keep=False)
    return None if ns is None else ns.hessian()
