"""Posterior summaries of the school effects (empirical Bayes).

Given the estimates ``theta``, the school effects ``b_j = (u_j, v_j)`` of
different schools are independent a posteriori, with density

.. math::

    p(b \\mid y_j) = \\exp\\{h_j(b)\\} / L_j, \\qquad
    h_j(b) = \\log f(y_j \\mid b) + \\log \\phi(b; 0, \\Sigma),

the integrand of the likelihood. Two representations are used.

**Adaptive quadrature** (:func:`posterior_moments`). The nodes ``b_jk`` and log
weights of the likelihood (:meth:`mlsml.likelihood.Likelihood.adapt`) give the posterior
weights ``p_jk = softmax_k(h_j(b_jk) + log w_k)``, so that

.. math::

    E(b_j \\mid y) \\approx \\sum_k p_{jk} b_{jk}, \\qquad
    \\operatorname{cov}(b_j \\mid y) \\approx \\sum_k p_{jk}
        (b_{jk} - \\bar b_j)(b_{jk} - \\bar b_j)'.

This works in any dimension ``d`` (``u0, u1, ..., v``).

**Exact marginal of v** (:class:`PosteriorGrid`). For fixed ``v`` the
function ``h_j`` is quadratic in ``u`` (the residual variance is
``exp(w'alpha + v)`` times a constant within the school), so ``u`` can be
integrated out in closed form. With ``E = exp(-v)``, the precision
``P = Sigma^{-1}`` split into blocks ``P_uu, P_uv, P_vv`` and the per-school
sums ``n, S0, S1, S2`` of :mod:`mlsml.likelihood`::

    M(v)  = E S2 + P_uu,            r(v) = E S1 - v P_uv
    u | v, y ~ N(M(v)^{-1} r(v), M(v)^{-1})
    log p(v | y) = const - n v/2 - E S0/2 - P_vv v^2/2
                   + r' M^{-1} r / 2 - log|M| / 2.

The one-dimensional marginal ``p(v | y)`` is tabulated on a fine uniform grid
around the school's posterior (201 points over +/- 8 posterior SDs), with the
exact derivative of the density; the CDF is integrated with the Hermite-corrected
trapezoid rule and interpolated by cubic Hermite polynomials, both ``O(h^4)``
(quantiles of ``v`` are accurate to about 1e-7), which gives
its distribution function, hence quantiles of ``v`` (and of any increasing
function of it, such as the school variance ``exp(w'alpha + v)``) without a
normal approximation; linear combinations ``c'u`` have a mixture-of-normals
marginal ``sum_g omega_g N(c'mu_g, c'V_g c)`` whose quantiles are found by
Newton's method. Exact posterior draws are ``v`` by inverse-CDF sampling from
the grid followed by ``u | v`` from its normal distribution. Without a random
scale the posterior is exactly normal and the grid has one point.

**Predictions for rows** (:func:`predict`, :func:`get_prediction`; the methods
of the same names of :class:`mlsml.MELSMResults`). For row ``i`` of school ``j``
the predictions are posterior means,

.. math::

    E(x_i'\\beta + z_i'u_j \\mid y), \\qquad
    E(e^{c(w_i'\\alpha + g_i'v_j)} \\mid y) \\quad (c = 1 \\text{ variance},
    c = 1/2 \\text{ SD}),

with ``g_i = 1`` for the plain random scale. ``E(exp(c v_j) | y)`` comes from the
exact grid of ``v`` in models with one ``Sigma`` and one ``v``, otherwise from the
adaptive quadrature (row by row when ``g_i`` varies). Rows of schools not in the
fit, and all rows with ``conditional=False``, get the expectations over a new
school: ``x_i'beta`` and ``exp(c w_i'alpha + c^2 g_i'Sigma_vv g_i / 2)``.
Standard errors: see :meth:`mlsml.MELSMResults.get_prediction`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from ._lazy import LazyModule
from .design import Design, FormulaSpec, _materialise
from .errors import DataError, ModelSpecError, UnknownGroupWarning, warn
from .gaussian import conditional_moments
from .groupmeans import uses_group_transforms
from .integrand import Sums, school_sums
from .likelihood import Likelihood
from .quadrature import Nodes, QuadratureSpec, default_nagq
from .rescale import reparametrise

# imported on first use, to keep `import mlsml` fast (see tests/test_import.py)
patsy = LazyModule("patsy")
stats = LazyModule("scipy.stats")

#: Number of grid points and half-width (in posterior SDs) of the grid for ``v``.
GRID_POINTS = 201
GRID_HALFWIDTH = 8.0


def _sums(theta: np.ndarray, design: Design) -> Sums:
    beta, alpha, _ = design.layout.split(np.asarray(theta, dtype=float))
    s = school_sums(beta, alpha, design)
    return Sums(*(np.asarray(a, dtype=float) for a in s))


def posterior_weights(lik: Likelihood, theta: np.ndarray, nodes: Nodes) -> np.ndarray:
    """Normalised posterior weights ``p_jk`` of the adapted nodes, shape ``(J, K)``.

    The same as :meth:`mlsml.likelihood.Likelihood.posterior_weights`.
    """
    return lik.posterior_weights(theta, nodes)


def posterior_moments(lik: Likelihood, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and covariances of ``b_j`` by adaptive Gauss-Hermite quadrature.

    Parameters
    ----------
    lik : Likelihood
        With a product rule (:func:`posterior_likelihood` gives the one of a fit).
    theta : ndarray
        Optimiser-scale parameters (see :mod:`mlsml.params`).

    Returns
    -------
    mean : ndarray (J, d)
        ``E(b_j | y)``, effects in the order ``u0, u1, ..., v``.
    cov : ndarray (J, d, d)
        ``cov(b_j | y)``.
    """
    theta = np.asarray(theta, dtype=float)
    nodes = lik.adapt(theta)
    return _moments(lik.posterior_weights(theta, nodes), nodes)


def product_likelihood(design: Design, nagq: int | None = None, prune: float = 0.0) -> Likelihood:
    """The likelihood of ``design`` under the product rule (default points for its dimension)."""
    d = design.layout.d
    return Likelihood.build(design, QuadratureSpec("product", int(nagq or default_nagq(d)), prune))


def _moments(p: np.ndarray, nodes: Nodes) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means ``(J, d)`` and covariances ``(J, d, d)`` from the weights ``p`` of the nodes."""
    mean = np.einsum("jk,jkd->jd", p, nodes.b)
    dev = nodes.b - mean[:, None, :]
    cov = np.einsum("jk,jkd,jke->jde", p, dev, dev)
    return mean, 0.5 * (cov + np.swapaxes(cov, 1, 2))


@dataclass(frozen=True)
class PosteriorGrid:
    """The posterior of every school as a mixture over a grid of ``v``.

    Attributes
    ----------
    v : ndarray (J, G)
        Grid of ``v`` values per school (zeros, ``G = 1``, without random scale).
    weight : ndarray (J, G)
        Normalised quadrature weights of the grid points (trapezoid rule times
        the marginal density ``p(v | y)``); they sum to one per school.
    cdf : ndarray (J, G)
        Distribution function of ``v`` at the grid points (cumulative
        trapezoid rule with the Hermite end correction
        ``h^2/12 (f'_i - f'_{i+1})``, exact derivatives; from 0 at the first
        point to 1 at the last).
    mu : ndarray (J, G, q)
        ``E(u | v, y)`` at the grid points.
    V : ndarray (J, G, q, q)
        ``cov(u | v, y)`` at the grid points.
    random_scale : bool
    density, ddensity : ndarray (J, G)
        The normalised density ``p(v | y)`` and its derivative at the grid points
        (with the CDF, they define a cubic Hermite interpolant of the CDF).
    """

    v: np.ndarray
    weight: np.ndarray
    cdf: np.ndarray
    mu: np.ndarray
    V: np.ndarray
    random_scale: bool
    density: np.ndarray | None = None
    ddensity: np.ndarray | None = None

    def mapped(self, Tuu: np.ndarray) -> PosteriorGrid:
        r"""The same grid for mean effects ``u = T_uu u_s`` (``v`` unchanged): ``mu = T_uu mu_s``, ``V = T_uu V_s T_uu'``."""
        mu = np.einsum("qr,jgr->jgq", Tuu, self.mu)
        V = np.einsum("qr,jgrs,ts->jgqt", Tuu, self.V, Tuu)
        return dataclasses.replace(self, mu=mu, V=V)

    @classmethod
    def build(
        cls,
        theta: np.ndarray,
        design: Design,
        centre: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        points: int = GRID_POINTS,
        halfwidth: float = GRID_HALFWIDTH,
    ) -> PosteriorGrid:
        """Tabulate the posterior of every school.

        Parameters
        ----------
        theta : ndarray
            Optimiser-scale parameters.
        design : Design
        centre, scale : ndarray (J,), optional
            Centre and scale of each school's grid for ``v`` (default: the
            posterior mean and SD of ``v`` by :func:`posterior_moments`).
        points : int
            Grid points per school (odd numbers put one at the centre).
        halfwidth : float
            The grid spans ``centre +/- halfwidth * scale``.
        """
        lay = design.layout
        theta = np.asarray(theta, dtype=float)
        q, rs = lay.q, lay.random_scale
        s = _sums(theta, design)
        _, _, L = lay.split(theta)
        L = np.asarray(L, dtype=float)
        P = np.linalg.inv(L @ L.T)
        P = 0.5 * (P + P.T)
        J = design.ngroups
        if not rs:
            M = s.S2 + P[None, :q, :q]
            V = np.linalg.inv(M)
            mu = np.einsum("jqr,jr->jq", V, s.S1)
            one = np.ones((J, 1))
            return cls(np.zeros((J, 1)), one, one, mu[:, None, :], V[:, None, :, :], False)
        if centre is None or scale is None:
            m, c = posterior_moments(product_likelihood(design), theta)
            centre = m[:, q] if centre is None else centre
            scale = np.sqrt(c[:, q, q]) if scale is None else scale
        t = np.linspace(-halfwidth, halfwidth, int(points))
        v = np.asarray(centre, float)[:, None] + np.asarray(scale, float)[:, None] * t[None, :]
        E = np.exp(-v)
        Puu, Puv, Pvv = P[:q, :q], P[:q, q], P[q, q]
        M = E[:, :, None, None] * s.S2[:, None, :, :] + Puu[None, None]
        r = E[:, :, None] * s.S1[:, None, :] - v[:, :, None] * Puv[None, None, :]
        mu, V, logdet, quad = conditional_moments(M, r)
        lp = -0.5 * s.n[:, None] * v - 0.5 * E * s.S0[:, None] - 0.5 * Pvv * v**2 + 0.5 * quad - 0.5 * logdet
        # exact derivative of lp (for the Hermite-corrected CDF)
        S1mu = np.einsum("jq,jgq->jg", s.S1, mu)
        muS2mu = np.einsum("jgq,jqr,jgr->jg", mu, s.S2, mu)
        trVS2 = np.einsum("jgqr,jrq->jg", V, s.S2)
        dlp = -0.5 * s.n[:, None] + 0.5 * E * s.S0[:, None] - Pvv * v - E * S1mu - mu @ Puv + 0.5 * E * muS2mu + 0.5 * E * trVS2
        dens = np.exp(lp - lp.max(axis=1, keepdims=True))
        ddens = dens * dlp
        h = v[:, 1:2] - v[:, :1]
        # cumulative integral with the Hermite end correction: O(h^4) at every grid point
        area = 0.5 * h * (dens[:, 1:] + dens[:, :-1]) + h**2 / 12.0 * (ddens[:, :-1] - ddens[:, 1:])
        area = np.maximum(area, 0.0)  # keep the CDF monotone where the density underflows
        cum = np.concatenate([np.zeros((J, 1)), np.cumsum(area, axis=1)], axis=1)
        total = cum[:, -1:]
        tw = np.full_like(v, 1.0) * h
        tw[:, 0] *= 0.5
        tw[:, -1] *= 0.5
        weight = tw * dens
        weight = weight / weight.sum(axis=1, keepdims=True)
        return cls(v, weight, cum / total, mu, V, True, dens / total, ddens / total)

    # -------------------------------------------------------------- moments
    def mean_v(self) -> np.ndarray:
        """``E(v_j | y)``, shape ``(J,)``."""
        return np.einsum("jg,jg->j", self.weight, self.v)

    def mean_exp_v(self, scale: float = 1.0) -> np.ndarray:
        """``E(exp(scale * v_j) | y)``, shape ``(J,)``."""
        return np.einsum("jg,jg->j", self.weight, np.exp(scale * self.v))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means ``(J, d)`` and covariances ``(J, d, d)`` from the grid."""
        w = self.weight
        mu_u = np.einsum("jg,jgq->jq", w, self.mu)
        second = np.einsum("jg,jgqr->jqr", w, self.V + self.mu[..., :, None] * self.mu[..., None, :])
        cov_u = second - mu_u[:, :, None] * mu_u[:, None, :]
        if not self.random_scale:
            return mu_u, cov_u
        mv = self.mean_v()
        var_v = np.einsum("jg,jg->j", w, (self.v - mv[:, None]) ** 2)
        cuv = np.einsum("jg,jgq,jg->jq", w, self.mu, self.v) - mu_u * mv[:, None]
        J, q = mu_u.shape
        cov = np.zeros((J, q + 1, q + 1))
        cov[:, :q, :q] = cov_u
        cov[:, :q, q] = cuv
        cov[:, q, :q] = cuv
        cov[:, q, q] = var_v
        return np.concatenate([mu_u, mv[:, None]], axis=1), cov

    # ------------------------------------------------------------ quantiles
    def quantile_v(self, probs) -> np.ndarray:
        """Quantiles of ``v_j | y``, shape ``(J, len(probs))``.

        Inverse of the distribution function, interpolated between grid points
        by the cubic Hermite polynomial through the CDF and the density.
        """
        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        J = self.v.shape[0]
        if not self.random_scale:
            return np.zeros((J, probs.size))
        return self.invert_cdf(np.broadcast_to(probs, (J, probs.size)))[0]

    def invert_cdf(self, P: np.ndarray, newton: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``F_j^{-1}(P[j, k])`` for every school ``j`` (rows) and probability (columns).

        See :func:`invert_tabulated_cdf` (the grid, CDF and density of ``v``).
        """
        return invert_tabulated_cdf(self.v, self.cdf, self.density, P, newton)

    def quantile_linear(self, c: np.ndarray, probs) -> np.ndarray:
        """Quantiles of ``c'u_j | y`` (mixture of normals over the grid), shape ``(J, len(probs))``.

        Parameters
        ----------
        c : ndarray (q,)
            Coefficients of the linear combination of the mean effects.
        probs : array_like
            Probabilities.
        """
        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        c = np.asarray(c, dtype=float)
        # the mixture CDF is a smooth integral over v: about 100 of the grid points
        # are ample for the trapezoid rule (spectrally accurate here)
        sub = slice(None, None, max(1, (self.v.shape[1] - 1) // 100))
        m = np.einsum("jgq,q->jg", self.mu[:, sub], c)
        sd = np.sqrt(np.clip(np.einsum("q,jgqr,r->jg", c, self.V[:, sub], c), 1e-300, None))
        w = self.weight[:, sub] / self.weight[:, sub].sum(axis=1, keepdims=True)
        return mixture_quantiles(w, m, sd, probs)

    # ---------------------------------------------------------------- draws
    def draws(self, c: np.ndarray | None, ndraws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior draws of ``(c'u_j, v_j)``, each of shape ``(ndraws, J)``.

        ``v`` is drawn by inverting the CDF (:meth:`invert_cdf`), then ``c'u | v`` from its normal distribution with mean and variance
        interpolated linearly in ``v`` between grid points. Without a random
        scale the ``v`` draws are zero; without mean effects (``c`` is None or
        empty) the ``c'u`` draws are zero.
        """
        J, G = self.v.shape
        U = rng.random((ndraws, J))
        if self.random_scale:
            vT, iT, tT = self.invert_cdf(U.T, newton=2)
            v, i, t = vT.T, iT.T, tT.T
            cols = np.arange(J)[None, :]
        else:
            v = np.zeros((ndraws, J))
        if c is None or len(c) == 0:
            return np.zeros((ndraws, J)), v
        c = np.asarray(c, dtype=float)
        m = np.einsum("jgq,q->jg", self.mu, c)
        var = np.clip(np.einsum("q,jgqr,r->jg", c, self.V, c), 0, None)
        if self.random_scale:
            mm = m[cols, i] + t * (m[cols, i + 1] - m[cols, i])
            vv = var[cols, i] + t * (var[cols, i + 1] - var[cols, i])
        else:
            mm = np.broadcast_to(m[:, 0], (ndraws, J))
            vv = np.broadcast_to(var[:, 0], (ndraws, J))
        cu = mm + np.sqrt(vv) * rng.standard_normal((ndraws, J))
        return cu, v


def draw_effects(
    v: np.ndarray,
    cdf: np.ndarray | None,
    density: np.ndarray | None,
    mu: np.ndarray,
    V: np.ndarray,
    ndraws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    r"""Exact posterior draws of the whole vector ``b_j = (u_j, v_j)`` from a grid of ``v``, shape ``(ndraws, J, d)``.

    ``v`` by inverting its tabulated distribution function (:func:`invert_tabulated_cdf`,
    as :meth:`PosteriorGrid.draws`), then

    .. math:: u \mid v, y \sim N(\mu(v), V(v))

    with ``mu`` and ``V`` interpolated linearly in ``v`` between grid points (a convex
    combination of covariance matrices is one) and drawn through its symmetric square root
    (eigenvalues clipped at 0, so a numerically singular ``V`` is no error).
    Without a random scale (``cdf`` is None) ``u | y ~ N(mu[:, 0], V[:, 0])`` and no ``v``
    column is returned.

    Parameters
    ----------
    v, cdf, density : ndarray (J, G)
        The grid of ``v``, its distribution function and density (``cdf = None``: no ``v``).
    mu, V : ndarray (J, G, q), (J, G, q, q)
        ``E(u | v, y)`` and ``cov(u | v, y)`` at the grid points.
    ndraws : int
    rng : numpy.random.Generator

    Examples
    --------
    >>> import mlsml
    >>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school")
    >>> grid = PosteriorGrid.build(res.theta, res.model.design)
    >>> b = draw_effects(grid.v, grid.cdf, grid.density, grid.mu, grid.V, 2000, np.random.default_rng(1))
    >>> b.shape
    (2000, 40, 2)
    >>> mean, cov = grid.moments()
    >>> bool(np.abs(b.mean(axis=0) - mean).max() < 4 * np.sqrt(cov[:, [0, 1], [0, 1]].max() / 2000))
    True
    """
    J, G, q = mu.shape
    if cdf is None:
        m = np.broadcast_to(mu[:, 0], (ndraws, J, q))
        C = np.broadcast_to(V[:, 0], (ndraws, J, q, q))
        vcol = None
    else:
        U = rng.random((ndraws, J))
        vT, iT, tT = invert_tabulated_cdf(v, cdf, density, U.T, newton=2)
        vd, i, t = vT.T, iT.T, tT.T
        cols = np.arange(J)[None, :]
        m = mu[cols, i] + t[:, :, None] * (mu[cols, i + 1] - mu[cols, i])
        C = V[cols, i] + t[:, :, None, None] * (V[cols, i + 1] - V[cols, i])
        vcol = vd[:, :, None]
    if q:
        # a symmetric square root F (F F' = V) with the eigenvalues clipped at 0: V is positive
        # semi-definite but may round to a (tiny) negative eigenvalue where var(u | v, y) is ~0 (a fit
        # near var(u0) = 0), where a Cholesky factor does not exist
        lam, vec = np.linalg.eigh(0.5 * (C + np.swapaxes(C, -1, -2)))
        F = vec * np.sqrt(np.clip(lam, 0.0, None))[..., None, :]
        u = m + np.einsum("...ab,...b->...a", F, rng.standard_normal((ndraws, J, q)))
    else:
        u = np.zeros((ndraws, J, 0))
    return u if vcol is None else np.concatenate([u, vcol], axis=2)


def mixture_quantiles(w: np.ndarray, m: np.ndarray, sd: np.ndarray, probs) -> np.ndarray:
    r"""Quantiles of normal mixtures, one per row: :math:`F_j(x) = \sum_g w_{jg} \Phi((x - m_{jg}) / s_{jg})`.

    Newton's method from the moment-matched normal, safeguarded by bisection
    (the bracket is kept from the signs of ``F - p``), to ``1e-12`` relative.

    Parameters
    ----------
    w, m, sd : ndarray (J, N)
        Weights (summing to one per row), means and SDs of the components.
    probs : array_like
        Probabilities.

    Returns
    -------
    ndarray (J, len(probs))
    """
    probs = np.atleast_1d(np.asarray(probs, dtype=float))
    mean = np.einsum("jg,jg->j", w, m)
    tot_sd = np.sqrt(np.einsum("jg,jg->j", w, sd**2 + (m - mean[:, None]) ** 2))
    out = np.empty((m.shape[0], probs.size))
    for k, p in enumerate(probs):
        x = mean + tot_sd * stats.norm.ppf(p)
        lo = np.min(m - 40 * sd, axis=1)
        hi = np.max(m + 40 * sd, axis=1)
        for _it in range(100):
            zz = (x[:, None] - m) / sd
            F = np.einsum("jg,jg->j", w, special.ndtr(zz)) - p
            f = np.einsum("jg,jg->j", w, np.exp(-0.5 * zz**2) / (np.sqrt(2 * np.pi) * sd))
            lo = np.where(F < 0, x, lo)
            hi = np.where(F > 0, x, hi)
            step = F / np.maximum(f, 1e-300)
            xn = x - step
            bad = (xn <= lo) | (xn >= hi) | ~np.isfinite(xn)
            xn = np.where(bad, 0.5 * (lo + hi), xn)
            done = np.abs(xn - x) <= 1e-12 * (1 + np.abs(x))
            x = xn
            if done.all():
                break
        out[:, k] = x
    return out


def invert_tabulated_cdf(
    x: np.ndarray, cdf: np.ndarray, density: np.ndarray, P: np.ndarray, newton: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invert distribution functions tabulated on uniform grids, one per row.

    The CDF of row ``j`` is the cubic Hermite interpolant through ``cdf[j]`` and the
    density ``density[j]`` at the grid ``x[j]`` (uniform, increasing). Starts from
    linear interpolation within the grid cell and takes ``newton`` Newton steps on
    the interpolant (each squares the error).

    Parameters
    ----------
    x, cdf, density : ndarray (J, G)
    P : ndarray (J, m)
        Probabilities, one row per distribution.
    newton : int

    Returns
    -------
    values : ndarray (J, m)
        ``F_j^{-1}(P[j, k])``.
    cell, t : ndarray (J, m)
        The grid cell ``i`` and the position ``t`` in it (``value = x_i + t h``).
    """
    P = np.asarray(P, dtype=float)
    J, G = x.shape
    m = P.shape[1]
    off = 2.0 * np.arange(J)
    flat = (cdf + off[:, None]).ravel()
    pos = np.searchsorted(flat, (P + off[:, None]).ravel(), side="right") - 1
    i = np.clip(pos.reshape(J, m) - (np.arange(J) * G)[:, None], 0, G - 2)
    rows = np.arange(J)[:, None]
    h = (x[:, 1] - x[:, 0])[:, None]
    F0, F1 = cdf[rows, i], cdf[rows, i + 1]
    f0, f1 = density[rows, i] * h, density[rows, i + 1] * h
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(F1 > F0, (P - F0) / (F1 - F0), 0.5)
    t = np.clip(t, 0.0, 1.0)
    for _ in range(newton):  # Newton on the cubic Hermite interpolant within the cell
        t2, t3 = t * t, t * t * t
        H = F0 * (2 * t3 - 3 * t2 + 1) + f0 * (t3 - 2 * t2 + t) + F1 * (-2 * t3 + 3 * t2) + f1 * (t3 - t2)
        dH = F0 * (6 * t2 - 6 * t) + f0 * (3 * t2 - 4 * t + 1) + F1 * (-6 * t2 + 6 * t) + f1 * (3 * t2 - 2 * t)
        with np.errstate(divide="ignore", invalid="ignore"):
            tn = t - (H - P) / dH
        t = np.where(np.isfinite(tn) & (dH > 0), np.clip(tn, 0.0, 1.0), t)
    return x[rows, i] + h * t, i, t


# ==================================================================== predictions for rows
#: Kinds of prediction (:func:`predict`): the mean, the residual variance, the residual SD.
PREDICTION_KINDS = ("mean", "variance", "sd")

#: Relative step of the central differences in ``theta`` that differentiate the
#: posterior expectations (nodes held fixed) for prediction standard errors: the
#: truncation error is about ``FD_STEP**2`` relative, the rounding error about
#: ``1e-16 / FD_STEP``, both far below what a standard error needs.
FD_STEP = 1e-5

#: Largest number of (row x node) elements held at once when a posterior
#: expectation differs between the rows of a school (``scale_re_formula``).
ROW_CHUNK = 2_000_000


def posterior_nagq(res) -> int:
    """Quadrature points per dimension for the posterior summaries.

    The fit's own rule, but never fewer points than the default for the
    dimension: a fit with very few points (``nagq=1`` is the Laplace
    approximation) would otherwise report posterior SDs of zero.
    """
    d = res.layout.d
    spec = res.likelihood.spec
    if spec.uexact:  # the fit's nagq counted points in v only
        return default_nagq(d)
    return max(int(spec.nagq), default_nagq(d))


def posterior_likelihood(res) -> Likelihood:
    """The fit's likelihood with the product rule of :func:`posterior_nagq` points (the fit's pruning)."""
    lik = res.likelihood
    return lik.with_spec(kind="product", nagq=posterior_nagq(res), prune=lik.spec.prune)


@dataclass(frozen=True)
class FitScalePosterior:
    r"""Every school's adapted nodes and posterior weights, computed on the scale the fit ran on.

    The fit maximised a standardised copy of the design (:mod:`mlsml.rescale`), whose school
    effects are ``b = T b_s``. The posterior is the same distribution on either scale, but
    only the standardised one is well conditioned for a covariate such as a Unix timestamp
    (``x ~ 1e9``): there :math:`Z_j'Z_j` has a condition number near ``1e20`` and the mode
    finder meets an exactly singular matrix. So the nodes are adapted and weighted on the
    standardised scale and mapped back, :math:`b_{jk} = T\,b_{s,jk}` (the weights
    :math:`p_{jk}` do not change).

    Attributes
    ----------
    nodes : Nodes
        The nodes in the fit's own units (``neg_hess`` dropped).
    weights : ndarray (J, K)
        Normalised posterior weights of the nodes.
    likelihood, theta : Likelihood, ndarray
        The standardised likelihood and its estimates (the fit's own when nothing was standardised).
    T : ndarray (d, d)
        The map of the school effects, ``b = T b_s``.
    """

    nodes: Nodes
    weights: np.ndarray
    likelihood: Likelihood
    theta: np.ndarray
    T: np.ndarray

    @property
    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means ``(J, d)`` and covariances ``(J, d, d)`` of ``b_j`` (the fit's units)."""
        return _moments(self.weights, self.nodes)

    @property
    def v_unscaled(self) -> bool:
        """Whether the scale effects are not rescaled (``T`` is the identity on them)."""
        q = self.likelihood.layout.q
        return bool(np.array_equal(self.T[q:, q:], np.eye(self.T.shape[0] - q)) and not self.T[q:, :q].any())


def fit_scale_posterior(res, lik: Likelihood | None = None) -> FitScalePosterior:
    """The school posteriors of a fit under ``lik`` (default :func:`posterior_likelihood`), see :class:`FitScalePosterior`."""
    lik = posterior_likelihood(res) if lik is None else lik
    theta = np.asarray(res.theta, dtype=float)
    d = lik.layout.d
    theta_s = getattr(res.optsum, "theta_std", None)
    rp = reparametrise(lik.design) if theta_s is not None and isinstance(lik.design, Design) else None
    if rp is None or rp.identity:
        nodes = lik.adapt(theta)
        return FitScalePosterior(nodes, lik.posterior_weights(theta, nodes), lik, theta, np.eye(d))
    lik_s, theta_s = lik.with_design(rp.design), np.asarray(theta_s, dtype=float)
    ns = lik_s.adapt(theta_s)
    T = rp.T
    Tb = T[ns.start :, ns.start :]
    nodes = dataclasses.replace(
        ns,
        b=np.einsum("de,jke->jkd", T, ns.b),
        mode=ns.mode @ T.T,
        chol=np.einsum("de,jef->jdf", Tb, ns.chol),
        log_det=ns.log_det + float(np.linalg.slogdet(Tb)[1]),
        neg_hess=None,
    )
    return FitScalePosterior(nodes, lik_s.posterior_weights(theta_s, ns), lik_s, theta_s, T)


def school_moments(res) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means ``(J, d)`` and covariances ``(J, d, d)`` of every school's effects at the estimates.

    :func:`posterior_moments` of :func:`posterior_likelihood`, computed on the fit's
    standardised scale (:class:`FitScalePosterior`).
    """
    return fit_scale_posterior(res).moments


def posterior_grid(res, post: FitScalePosterior, mean: np.ndarray | None, sd: np.ndarray | None) -> PosteriorGrid:
    """:meth:`PosteriorGrid.build` for a fit, on the standardised scale where ``v`` is not rescaled, mapped back."""
    q = res.layout.q
    if post.v_unscaled:
        return PosteriorGrid.build(post.theta, post.likelihood.design, mean, sd).mapped(post.T[:q, :q])
    return PosteriorGrid.build(np.asarray(res.theta, dtype=float), res.model.design, mean, sd)


@dataclass(frozen=True)
class PredictionRows:
    """The covariates of the rows to predict, and their schools.

    Attributes
    ----------
    X, Z : ndarray (n, p), (n, q) or None
        Mean and random-effects designs (``kind="mean"``).
    W, G : ndarray (n, k), (n, n_v) or None
        Variance design and design of the scale effects ``g_i`` (``kind`` is
        ``"variance"`` or ``"sd"``); ``G`` is a column of ones for the plain random
        scale ``v`` and has no columns without a random scale.
    pos : ndarray (n,) of int
        Code of each row's school in the fit, ``-1`` for population-level rows.
    index : pandas.Index
        Labels of the rows (newdata's index, or the caller's index of the fit).
    offset : ndarray (n,) or None
        The offset of the mean (``kind="mean"``) or of the log variance (the other kinds)
        of each row, when the fit has one (:mod:`mlsml.weights`).
    S1 : ndarray (n, m) or None
        The level-1 columns of ``bs_formula`` of each row (:attr:`mlsml.design.Design.S_level1`),
        which load ``u0`` (:meth:`loaded_Z`); ``None`` without them.
    """

    X: np.ndarray | None
    Z: np.ndarray | None
    W: np.ndarray | None
    G: np.ndarray | None
    pos: np.ndarray
    index: pd.Index
    offset: np.ndarray | None = None
    S1: np.ndarray | None = None

    def shift(self, values: np.ndarray) -> np.ndarray:
        """``values`` plus the rows' offset (unchanged without one)."""
        return values if self.offset is None else values + self.offset

    def loaded_Z(self, theta: np.ndarray, layout) -> np.ndarray:
        r"""``Z`` with column 0 times :math:`e^{s^{(1)\prime}_i\tau/2}` at ``theta`` (:func:`mlsml.integrand.loaded_Z`)."""
        if self.S1 is None:
            return self.Z
        tau = np.asarray(theta, dtype=float)[layout.p + layout.k : layout.p + layout.k + layout.m]
        Z = np.array(self.Z, dtype=float)
        Z[:, 0] *= np.exp(0.5 * self.S1 @ tau)
        return Z

    @property
    def known(self) -> np.ndarray:
        """Rows predicted from their school's posterior."""
        return self.pos >= 0


def _as_frame(newdata) -> pd.DataFrame:
    """A DataFrame from a DataFrame or a mapping of column -> values (scalars give one row)."""
    if isinstance(newdata, pd.DataFrame):
        return newdata
    if isinstance(newdata, Mapping):
        data = dict(newdata)
        if data and all(np.ndim(v) == 0 for v in data.values()):
            return pd.DataFrame(data, index=[0])
        try:
            return pd.DataFrame(data)
        except ValueError as exc:  # columns of different lengths
            lengths = {k: len(v) for k, v in data.items() if np.ndim(v) > 0}
            raise DataError(f"the columns of newdata must have equal lengths (got {lengths}): {exc}") from exc
    if isinstance(newdata, pd.Series):
        raise DataError("newdata is a Series (one column); pass a DataFrame or a dict of column -> values")
    raise DataError(f"newdata must be a pandas DataFrame or a dict of column -> values (got {type(newdata).__name__})")


def _design_for(info, newdata: pd.DataFrame, what: str) -> np.ndarray:
    try:
        M = patsy.dmatrix(info, newdata, NA_action="raise", return_type="dataframe")
    except Exception as exc:  # patsy raises many types
        raise DataError(f"could not build the {what} for newdata: {exc}") from exc
    return M.to_numpy(dtype=float)


def _scale_re_info(spec: FormulaSpec):
    """The design description of ``scale_re_formula``, evaluated on the fitted data."""
    if spec.frame is None:
        raise DataError("the scale random-effects formula cannot be evaluated: the fitted data did not travel with this result")
    return _materialise(spec.scale_re_formula, spec.frame, "scale random-effects formula", spec.groups)[1]


def _bs_info(spec: FormulaSpec):
    """The design description of ``bs_formula``, evaluated on the fitted data."""
    if spec.frame is None:
        raise DataError("the between-school variance formula cannot be evaluated: the fitted data did not travel with this result")
    return _materialise(spec.bs_formula, spec.frame, "between-school variance formula", spec.groups)[1]


def _unknown_group_message(labels: pd.Index, groups: str, values: pd.Series, unknown: np.ndarray) -> str:
    """How many rows name a group the fit did not have, and the type conversion that would match them."""
    n, total = int(unknown.sum()), len(values)
    first = values[unknown].iloc[0]
    first = first.item() if isinstance(first, np.generic) else first
    msg = (
        f"{n} of {total} rows of newdata have a {groups!r} value that was not in the fit (e.g. {first!r}); "
        "they get population-level predictions (as with conditional=False)"
    )
    missing = int(pd.isna(values[unknown]).sum())
    if missing:
        msg += f"; {missing} of them have no {groups!r} value (missing)"
    fit_kind, new_kind = pd.api.types.infer_dtype(labels, skipna=True), pd.api.types.infer_dtype(values, skipna=True)
    numbers = {"integer", "floating", "mixed-integer-float", "decimal", "empty"}  # compare equal across these
    if fit_kind == new_kind or (fit_kind in numbers and new_kind in numbers):
        return msg
    convert = None
    try:  # would the usual conversion match some of the unknown rows?
        if pd.api.types.is_numeric_dtype(labels.dtype):
            as_num = pd.to_numeric(pd.Series(np.asarray(values[unknown], dtype=object)), errors="coerce")
            if (labels.get_indexer(as_num) >= 0).any():
                convert = f"pd.to_numeric(newdata[{groups!r}])"
        elif fit_kind == "string":
            if (labels.get_indexer(np.asarray(values[unknown]).astype(str)) >= 0).any():
                convert = f"newdata[{groups!r}].astype(str)"
    except (TypeError, ValueError):  # values that do not convert: no suggestion
        convert = None
    msg += f". The fit's {groups!r} values are {fit_kind} but newdata's are {new_kind}"
    if convert:
        msg += f": convert them with newdata[{groups!r}] = {convert}"
    return msg


def prediction_rows(res, newdata, kind: str, conditional: bool, offset: np.ndarray | None = None) -> PredictionRows:
    """The rows to predict: ``newdata`` (a DataFrame or dict), or the fitted rows when ``None``.

    With ``newdata=None`` the rows are the observations used in the fit, in the
    caller's row order and with the caller's index. Rows of ``newdata`` whose
    school was not in the fit are predicted at the population level, with an
    :class:`~mlsml.errors.UnknownGroupWarning` that counts them (and names the
    type conversion when the group column has another type than in the fit).
    ``offset`` gives the rows' offset (of the mean for ``kind="mean"``, else of the log
    variance) instead of reading the fit's offset column from ``newdata``.
    """
    if kind not in PREDICTION_KINDS:
        raise ModelSpecError(f"kind must be one of {', '.join(map(repr, PREDICTION_KINDS))}, not {kind!r}")
    design = res.model.design
    lay = design.layout
    spec = res.model.formula_spec
    mean = kind == "mean"
    # level-1 bs_formula columns: a row's random location is u0_j exp(s1_ij' tau / 2)
    level1 = bool(mean and conditional and lay.q and getattr(design, "S_level1", None) is not None)
    if newdata is None:
        inv = np.argsort(design.order)  # sorted row -> caller's row
        n = design.nobs
        X, Z = (design.X[inv], design.Z[inv]) if mean else (None, None)
        W = None if mean else design.W[inv]
        pos = design.group[inv] if conditional else np.full(n, -1)
        G = None
        if not mean:
            G = design.G[inv] if design.G is not None else np.ones((n, lay.n_v))
        off = design.offset if mean else design.scale_offset
        S1 = design.S_level1[inv] if level1 else None
        pos = np.asarray(pos, dtype=np.intp)
        return PredictionRows(X, Z, W, G, pos, design.row_labels, None if off is None else off[inv], S1)
    frame = _as_frame(newdata)
    n = len(frame)
    pos = np.full(n, -1, dtype=np.intp)
    formulas = (spec.formula, spec.scale_formula, spec.re_formula, spec.scale_re_formula, spec.bs_formula if level1 else None)
    if spec.groups not in frame.columns and uses_group_transforms(*formulas):
        raise DataError(
            f"the model's within()/between() terms need the grouping column {spec.groups!r} in newdata "
            "(a school of the fit uses its mean from the fit, a new school the mean of its rows in newdata)"
        )
    if conditional:
        if spec.groups not in frame.columns:
            raise DataError(
                f"conditional predictions need the grouping column {spec.groups!r} in newdata "
                "(or pass conditional=False for population predictions)"
            )
        labels = pd.Index(design.group_labels)
        values = frame[spec.groups]
        pos = np.asarray(labels.get_indexer(values), dtype=np.intp)
        unknown = pos < 0
        if unknown.any():
            warn(_unknown_group_message(labels, spec.groups, values, unknown), UnknownGroupWarning)
    X = Z = W = G = None
    if mean:
        X = _design_for(spec.mean_spec, frame, "mean design")
        Z = _design_for(spec.re_spec, frame, "random-effects design") if lay.q else np.zeros((n, 0))
    else:
        W = _design_for(spec.scale_spec, frame, "scale design")
        if design.G is not None:
            G = _design_for(_scale_re_info(spec), frame, "scale random-effects design")
        else:
            G = np.ones((n, lay.n_v))
    off = _new_offset(design, frame, "offset" if mean else "scale_offset") if offset is None else np.asarray(offset, dtype=float)
    S1 = None
    if level1:  # the rows' level-1 bs_formula columns (the fit's design description; zero in the school-level ones)
        Sfull = _design_for(_bs_info(spec), frame, "between-school variance design")
        # the fit's decision of which columns are level-1 (on a Dask block: over all blocks, also
        # for a level-1 column that is zero in every row of the block)
        S1 = np.where(np.asarray(design.S_level1_columns, dtype=bool)[None, :], Sfull, 0.0)
    return PredictionRows(X, Z, W, G, pos, frame.index, off, S1)


def _new_offset(design: Design, frame: pd.DataFrame, which: str) -> np.ndarray | None:
    """The ``offset`` or ``scale_offset`` of new rows: the fit's offset column, read from ``newdata``."""
    if getattr(design, which, None) is None and which not in design.info:
        return None
    column = design.info.get(f"{which}_column")
    if column is None:
        raise DataError(
            f"the fit has a {which} given as an array, so it is unknown for new rows; fit with {which}='<column>' "
            "and give that column in newdata"
        )
    if column not in frame.columns:
        raise DataError(f"newdata lacks the {which} column {column!r} of the fit")
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(values)):
        raise DataError(f"the {which} column {column!r} of newdata has missing or non-finite values")
    return values


def _power(kind: str) -> float:
    """``c`` in ``exp(c (w'alpha + g'v))``: 1 for the variance, 1/2 for the SD."""
    return 1.0 if kind == "variance" else 0.5


def _population(theta: np.ndarray, lay, rows: PredictionRows, kind: str) -> np.ndarray:
    """Population-level predictions at ``theta`` (every row)."""
    beta, alpha, L = lay.split(np.asarray(theta, dtype=float))
    if kind == "mean":
        return rows.shift(rows.X @ np.asarray(beta))
    c = _power(kind)
    L = np.asarray(L)
    Svv = (L @ L.T)[lay.q :, lay.q :]
    gSg = np.einsum("ia,ab,ib->i", rows.G, Svv, rows.G)
    return np.exp(c * rows.shift(rows.W @ np.asarray(alpha)) + 0.5 * c * c * gSg)


def _posterior_exp(p: np.ndarray, b: np.ndarray, rows: PredictionRows, q: int, c: float) -> np.ndarray:
    """``E(exp(c g_i'v_j) | y)`` for the known rows, from posterior weights ``p`` (J, K) on nodes ``b``."""
    idx = np.nonzero(rows.known)[0]
    out = np.empty(idx.size)
    if rows.G.shape[1] == 1 and np.all(rows.G[idx, 0] == 1.0):  # one value per school
        per_school = np.einsum("jk,jk->j", p, np.exp(c * b[:, :, q]))
        return per_school[rows.pos[idx]]
    step = max(1, ROW_CHUNK // max(1, b.shape[1]))
    for s in range(0, idx.size, step):
        rr = idx[s : s + step]
        j = rows.pos[rr]
        gv = np.einsum("ikv,iv->ik", b[j, :, q:], rows.G[rr])
        out[s : s + step] = np.einsum("ik,ik->i", p[j], np.exp(c * gv))
    return out


def _conditional_fixed_nodes(theta: np.ndarray, lik: Likelihood, nodes: Nodes, rows: PredictionRows, kind: str) -> np.ndarray:
    """Predictions at ``theta`` with the posterior evaluated on fixed nodes (differentiable in ``theta``)."""
    lay = lik.layout
    out = _population(theta, lay, rows, kind)
    known = rows.known
    if not known.any() or (kind == "mean" and lay.q == 0) or (kind != "mean" and lay.n_v == 0):
        return out
    p = lik.posterior_weights(theta, nodes)
    _, alpha, _ = lay.split(np.asarray(theta, dtype=float))
    if kind == "mean":
        Eu = np.einsum("jk,jkq->jq", p, nodes.b[:, :, : lay.q])
        out[known] += np.einsum("iq,iq->i", rows.loaded_Z(theta, lay)[known], Eu[rows.pos[known]])
    else:
        c = _power(kind)
        out[known] = np.exp(c * rows.shift(rows.W @ np.asarray(alpha))[known]) * _posterior_exp(p, nodes.b, rows, lay.q, c)
    return out


def _central_jacobian(fun, theta: np.ndarray) -> np.ndarray:
    """Jacobian of a vector function by central differences (relative step :data:`FD_STEP`)."""
    theta = np.asarray(theta, dtype=float)
    cols = []
    for m in range(theta.size):
        h = FD_STEP * (1.0 + abs(theta[m]))
        up, down = theta.copy(), theta.copy()
        up[m] += h
        down[m] -= h
        cols.append((fun(up) - fun(down)) / (up[m] - down[m]))
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class _Posterior:
    """The posterior summaries a prediction needs: moments, nodes, and the exact grid of ``v``."""

    mean: np.ndarray
    cov: np.ndarray
    nodes: Nodes
    grid: PosteriorGrid | None
    likelihood: Likelihood
    weights: np.ndarray


def _posterior(res) -> _Posterior:
    lay = res.model.design.layout
    lik = posterior_likelihood(res)
    post = fit_scale_posterior(res, lik)
    mean, cov = post.moments
    grid = None
    if lay.random_scale and lik.integrand.core:  # the exact marginal of v (core models)
        q = lay.q
        grid = posterior_grid(res, post, mean[:, q], np.sqrt(cov[:, q, q]))
    return _Posterior(mean, cov, post.nodes, grid, lik, post.weights)


def _predicted(res, rows: PredictionRows, kind: str, post: _Posterior | None) -> tuple[np.ndarray, np.ndarray]:
    """Predictions at the estimates and the posterior variance of each (zero for population rows)."""
    lay = res.layout
    theta = np.asarray(res.theta, dtype=float)
    out = _population(theta, lay, rows, kind)
    post_var = np.zeros(out.shape)
    known = rows.known
    if post is None or not known.any():
        return out, post_var
    q = lay.q
    j = rows.pos[known]
    if kind == "mean":
        if q:
            Zk = rows.loaded_Z(theta, lay)[known]
            out[known] += np.einsum("iq,iq->i", Zk, post.mean[j, :q])
            post_var[known] = np.einsum("iq,iqr,ir->i", Zk, post.cov[j, :q, :q], Zk)
        return out, post_var
    if lay.n_v == 0:
        return out, post_var
    c = _power(kind)
    scale = np.exp(c * rows.shift(rows.W @ res.fe_scale.to_numpy())[known])
    if post.grid is not None:
        e1, e2 = post.grid.mean_exp_v(c)[j], post.grid.mean_exp_v(2 * c)[j]
    else:
        e1 = _posterior_exp(post.weights, post.nodes.b, rows, q, c)
        e2 = _posterior_exp(post.weights, post.nodes.b, rows, q, 2 * c)
    out[known] = scale * e1
    post_var[known] = scale**2 * np.clip(e2 - e1**2, 0.0, None)
    return out, post_var


def predict(res, newdata=None, kind: str = "mean", conditional: bool = True) -> pd.Series:
    """Predictions for new rows or the fitted rows (see :meth:`mlsml.MELSMResults.predict`)."""
    rows = prediction_rows(res, newdata, kind, conditional)
    post = _posterior(res) if rows.known.any() else None
    out, _ = _predicted(res, rows, kind, post)
    return pd.Series(out, index=rows.index, name=kind)


def fitted_moments(res) -> tuple[np.ndarray, np.ndarray]:
    r"""Conditional mean and residual variance of every fitted row, from one posterior.

    .. math::

        E(y_{ij} \mid y) = x_{ij}'\hat\beta + z_{ij}'E(u_j \mid y), \qquad
        E(\sigma^2_{ij} \mid y) = \exp(w_{ij}'\hat\alpha)\, E(\exp(g_{ij}'v_j) \mid y)

    The same numbers as ``predict(res, kind="mean")`` and ``predict(res, kind="variance")``
    (caller's row order), with the school posteriors computed once for both.
    """
    post = _posterior(res)
    mean, _ = _predicted(res, prediction_rows(res, None, "mean", True), "mean", post)
    var, _ = _predicted(res, prediction_rows(res, None, "variance", True), "variance", post)
    return mean, var


@dataclass(frozen=True)
class PredictionResults:
    """Predictions with delta-method standard errors (:meth:`mlsml.MELSMResults.get_prediction`).

    Attributes
    ----------
    predicted : ndarray
        The predictions (as :meth:`mlsml.MELSMResults.predict`).
    se : ndarray
        Their standard errors, ``sqrt(se_params**2 + se_posterior**2)``.
    se_params : ndarray
        The part from the uncertainty of the estimates (delta method).
    se_posterior : ndarray
        The part from the school's posterior (zero for population-level rows).
    known : ndarray of bool
        Rows predicted conditionally on their school.
    kind : str
    conditional : bool
    index : pandas.Index
    """

    predicted: np.ndarray
    se: np.ndarray
    se_params: np.ndarray
    se_posterior: np.ndarray
    known: np.ndarray
    kind: str
    conditional: bool
    index: pd.Index

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Predictions, standard errors and ``1 - alpha`` intervals (statsmodels' column names).

        The interval of the mean is ``mean +/- z se``; the variance and the SD are
        positive, so their intervals are ``mean * exp(-/+ z se / mean)`` (symmetric on
        the log scale, by the delta method for ``log mean``), which never go below zero.

        Returns
        -------
        pandas.DataFrame
            Columns ``mean, mean_se, mean_ci_lower, mean_ci_upper``; the rows'
            index.
        """
        if not 0 < alpha < 1:
            raise ModelSpecError(f"alpha must be between 0 and 1, got {alpha!r}")
        z = float(stats.norm.ppf(1 - alpha / 2))
        m, se = self.predicted, self.se
        if self.kind == "mean":
            lo, hi = m - z * se, m + z * se
        else:
            r = np.exp(z * se / m)
            lo, hi = m / r, m * r
        return pd.DataFrame({"mean": m, "mean_se": se, "mean_ci_lower": lo, "mean_ci_upper": hi}, index=self.index)


def get_prediction(res, newdata=None, kind: str = "mean", conditional: bool = True) -> PredictionResults:
    """Predictions with standard errors (see :meth:`mlsml.MELSMResults.get_prediction`)."""
    rows = prediction_rows(res, newdata, kind, conditional)
    post = _posterior(res) if rows.known.any() else None
    out, post_var = _predicted(res, rows, kind, post)
    theta = np.asarray(res.theta, dtype=float)
    cov_theta = res.cov_theta()
    if cov_theta is not None:
        if post is None:
            jac = _central_jacobian(lambda t: _population(t, res.layout, rows, kind), theta)
        else:
            jac = _central_jacobian(lambda t: _conditional_fixed_nodes(t, post.likelihood, post.nodes, rows, kind), theta)
        var_params = np.clip(np.einsum("im,mn,in->i", jac, cov_theta, jac), 0.0, None)
    else:  # no standard errors without a positive-definite observed information
        var_params = np.full(out.shape, np.nan)
    se = np.sqrt(var_params + post_var)
    return PredictionResults(out, se, np.sqrt(var_params), np.sqrt(post_var), rows.known, kind, conditional, rows.index)
