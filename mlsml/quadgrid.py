r"""The posterior of a school's effects under the quadratic association, tabulated on a 2-d grid.

With ``association="quadratic"`` (MIXREGLS ``NCOV = 2``) the likelihood integrates over
``(u0, w)``, ``w = v + gamma theta1^2`` the school's whole log-variance shift
(:func:`mlsml.integrand.quad_prior_point`), by a nested rule: over ``w`` the outer nodes,
and for each of them over ``u0`` a rule centred and scaled at the conditional mode of
``u0`` given ``w`` (:meth:`mlsml.integrand.Integrand.log_h_nested`). Given ``w`` the
posterior of ``u0`` is not normal (its prior is not), so the paper's school table
(:func:`mlsml.schools.school_effects`), which needs quantiles and draws, tabulates the
posterior the same way, densely:

.. math::

    p(u_0, w \mid y_j) \propto e^{h_j(u_0, w)}, \qquad
    w_g = \bar w_j + s_j t_g, \qquad
    u_{0,gk} \in [m_{jg} - R c_{jg}^{-1/2},\ m_{jg} + R c_{jg}^{-1/2}],

a grid of ``W_POINTS`` values of ``w`` over ``+/- HALFWIDTH`` posterior SDs, and for each
a grid of ``U_POINTS`` values of ``u0`` over ``+/- HALFWIDTH`` conditional SDs around the
conditional mode ``m`` (curvature ``c``, :func:`mlsml.integrand.conditional_modes_u0`;
the span is widened to cover the mirror mode at ``-m`` when ``h`` has one). Trapezoid
rules (with the Hermite end correction for the distribution functions) give the marginal
density of ``w`` (``log int e^h du0``, what the nested rule integrates), the conditional
distribution functions of ``u0`` given each ``w_g``, and from them means, quantiles and
exact draws (``w`` by inverting its distribution function; ``u0`` given ``w`` from the
tabulated conditional of the grid point next to it, chosen with the linear-interpolation
weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .integrand import conditional_modes_u0
from .ops import logsumexp
from .predict import invert_tabulated_cdf

#: Grid points of ``w`` per school.
W_POINTS = 81
#: Grid points of ``u0`` per point of ``w``.
U_POINTS = 81
#: Each grid spans this many (posterior or conditional) standard deviations either side (the posterior of
#: a school with a large variance has a long tail in u0: 8 SDs missed 2e-4 of a mean at gamma = 0.5).
HALFWIDTH = 12.0
#: Points of the common ``u0`` grid on which the marginal distribution function of ``u0`` is evaluated.
MARGINAL_POINTS = 801


def _trapezoid(n: int) -> np.ndarray:
    w = np.ones(n)
    w[0] = w[-1] = 0.5
    return w


def _cumulative(logdens: np.ndarray, step: np.ndarray) -> np.ndarray:
    r"""Distribution functions from log densities on uniform grids (last axis), from 0 to 1.

    The cumulative trapezoid rule with the Hermite end correction, as
    :class:`mlsml.predict.PosteriorGrid` uses, the derivative ``f' = f (log f)'`` by central
    differences: :math:`\int_{x_i}^{x_{i+1}} f \approx \tfrac h2 (f_i + f_{i+1}) + \tfrac{h^2}{12}(f'_i - f'_{i+1})`.
    """
    f = np.exp(logdens - logdens.max(axis=-1, keepdims=True))
    h = step[..., None]
    df = f * np.gradient(logdens, axis=-1) / h
    area = 0.5 * h * (f[..., 1:] + f[..., :-1]) + h**2 / 12.0 * (df[..., :-1] - df[..., 1:])
    area = np.maximum(area, 0.0)  # monotone where the density underflows
    c = np.concatenate([np.zeros(f.shape[:-1] + (1,)), np.cumsum(area, axis=-1)], axis=-1)
    return c / c[..., -1:]


def _hermite_cdf(x: np.ndarray, cdf: np.ndarray, dens: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Distribution functions tabulated on uniform grids (rows of ``x``), at the points ``at``: the cubic
    Hermite interpolant through the values and the densities, 0 below and 1 above the grid. Shape ``(rows, len(at))``."""
    G, K = x.shape
    h = (x[:, -1] - x[:, 0]) / (K - 1)
    pos = (at[None, :] - x[:, :1]) / h[:, None]
    i = np.clip(np.floor(pos).astype(int), 0, K - 2)
    t = np.clip(pos - i, 0.0, 1.0)
    rows = np.arange(G)[:, None]
    t2, t3 = t * t, t * t * t
    F = (
        (2 * t3 - 3 * t2 + 1) * cdf[rows, i]
        + (t3 - 2 * t2 + t) * h[:, None] * dens[rows, i]
        + (-2 * t3 + 3 * t2) * cdf[rows, i + 1]
        + (t3 - t2) * h[:, None] * dens[rows, i + 1]
    )
    return np.where(pos < 0, 0.0, np.where(pos > K - 1, 1.0, F))


@dataclass(frozen=True)
class QuadraticPosterior:
    """Every school's posterior of ``(u0, w)`` on its grid (module docstring).

    Attributes
    ----------
    w : ndarray (J, G)
        The grid of ``w`` (uniform per school).
    pw : ndarray (J, G)
        Normalised weights of the grid points (trapezoid rule times the marginal density).
    cdf_w, dens_w : ndarray (J, G)
        The distribution function of ``w`` at the grid points and its density.
    u : ndarray (J, G, K)
        The grid of ``u0`` for each point of ``w`` (uniform per point).
    pu : ndarray (J, G, K)
        Normalised weights of ``u0`` given ``w_g``.
    cdf_u, dens_u : ndarray (J, G, K)
        The conditional distribution functions of ``u0`` given ``w_g`` and their densities.
    """

    w: np.ndarray
    pw: np.ndarray
    cdf_w: np.ndarray
    dens_w: np.ndarray
    u: np.ndarray
    pu: np.ndarray
    cdf_u: np.ndarray
    dens_u: np.ndarray

    @classmethod
    def build(cls, integrand, theta: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> QuadraticPosterior:
        """Tabulate the posterior at ``theta`` around the posterior moments ``mean`` (J, 2), ``cov`` (J, 2, 2)."""
        theta = np.asarray(theta, dtype=float)
        J = mean.shape[0]
        t = np.linspace(-HALFWIDTH, HALFWIDTH, W_POINTS)
        w = mean[:, 1:2] + np.sqrt(np.clip(cov[:, 1, 1], 1e-300, None))[:, None] * t[None, :]
        mode, curv = conditional_modes_u0(integrand, theta, w)
        mirror, mcurv = conditional_modes_u0(integrand, theta, w, start=-mode)
        sd, msd = 1.0 / np.sqrt(curv), 1.0 / np.sqrt(mcurv)
        lo = np.minimum(mode - HALFWIDTH * sd, mirror - HALFWIDTH * msd)
        hi = np.maximum(mode + HALFWIDTH * sd, mirror + HALFWIDTH * msd)
        s = np.linspace(0.0, 1.0, U_POINTS)
        u = lo[:, :, None] + (hi - lo)[:, :, None] * s[None, None, :]
        b = np.stack([u, np.broadcast_to(w[:, :, None], u.shape)], axis=-1).reshape(J, W_POINTS * U_POINTS, 2)
        h = np.asarray(integrand.log_h(theta, b), dtype=float).reshape(J, W_POINTS, U_POINTS)
        du = (hi - lo) / (U_POINTS - 1)
        logtrap = np.log(_trapezoid(U_POINTS))
        g = logsumexp(h + logtrap, axis=2) + np.log(du)  # log int e^h du0 at each w_g
        pu = np.exp(h + logtrap - logsumexp(h + logtrap, axis=2)[:, :, None])
        cdf_u = _cumulative(h, du)
        dens_u = np.exp(h - logsumexp(h + logtrap, axis=2)[:, :, None] - np.log(du)[:, :, None])
        dens = np.exp(g - g.max(axis=1, keepdims=True))
        pw = dens * _trapezoid(W_POINTS)
        pw = pw / pw.sum(axis=1, keepdims=True)
        dw = w[:, 1] - w[:, 0]
        area = (dens * _trapezoid(W_POINTS)).sum(axis=1) * dw
        return cls(w, pw, _cumulative(g, dw), dens / area[:, None], u, pu, cdf_u, dens_u)

    # ------------------------------------------------------------------ moments
    def mean_u(self) -> np.ndarray:
        """``E(u0_j | y)``, shape ``(J,)``."""
        return np.einsum("jg,jgk,jgk->j", self.pw, self.pu, self.u)

    def mean_w(self) -> np.ndarray:
        """``E(w_j | y)``, shape ``(J,)``."""
        return np.einsum("jg,jg->j", self.pw, self.w)

    def mean_exp_w(self) -> np.ndarray:
        """``E(exp(w_j) | y)``, shape ``(J,)``."""
        return np.einsum("jg,jg->j", self.pw, np.exp(self.w))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means ``(J, 2)`` and covariances ``(J, 2, 2)`` of ``(u0, w)``."""
        mu, mw = self.mean_u(), self.mean_w()
        du = self.u - mu[:, None, None]
        dw = (self.w - mw[:, None])[:, :, None]
        joint = self.pw[:, :, None] * self.pu
        cov = np.empty((mu.size, 2, 2))
        cov[:, 0, 0] = np.einsum("jgk,jgk->j", joint, du**2)
        cov[:, 1, 1] = np.einsum("jgk,jgk->j", joint, np.broadcast_to(dw**2, du.shape))
        cov[:, 0, 1] = cov[:, 1, 0] = np.einsum("jgk,jgk->j", joint, du * dw)
        return np.stack([mu, mw], axis=1), cov

    # ---------------------------------------------------------------- quantiles
    def quantile_w(self, probs) -> np.ndarray:
        """Quantiles of ``w_j | y``, shape ``(J, len(probs))`` (:func:`mlsml.predict.invert_tabulated_cdf`)."""
        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        P = np.broadcast_to(probs, (self.w.shape[0], probs.size))
        return invert_tabulated_cdf(self.w, self.cdf_w, self.dens_w, P)[0]

    def quantile_u(self, probs) -> np.ndarray:
        """Quantiles of ``u0_j | y``, shape ``(J, len(probs))``.

        The marginal distribution function ``F(x) = sum_g pw_g F(x | w_g)`` on a common grid
        of ``MARGINAL_POINTS`` values of ``u0`` per school (each conditional ``F(x | w_g)`` the
        cubic Hermite interpolant through its tabulated values and density), inverted by
        linear interpolation.
        """
        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        J, G, K = self.u.shape
        out = np.empty((J, probs.size))
        for j in range(J):
            x = np.linspace(self.u[j, :, 0].min(), self.u[j, :, -1].max(), MARGINAL_POINTS)
            F = np.einsum("g,gm->m", self.pw[j], _hermite_cdf(self.u[j], self.cdf_u[j], self.dens_u[j], x))
            out[j] = np.interp(probs, np.maximum.accumulate(F), x)
        return out

    # -------------------------------------------------------------------- draws
    def draws(self, ndraws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior draws of ``(u0_j, w_j)``, each of shape ``(ndraws, J)``.

        ``w`` by inverting its distribution function; ``u0`` given ``w`` from the tabulated
        conditional of grid point ``i`` or ``i + 1`` (the cell of ``w``), chosen with
        probabilities ``1 - t`` and ``t`` (``t`` the position in the cell).
        """
        J, G, K = self.u.shape
        U = rng.random((ndraws, J))
        wd, cell, pos = invert_tabulated_cdf(self.w, self.cdf_w, self.dens_w, U.T, newton=0)
        upper = rng.random((J, ndraws)) < pos
        g = np.clip(cell + upper, 0, G - 1)
        V = rng.random((J, ndraws))
        ud = np.empty((J, ndraws))
        for j in range(J):  # u0 | w_g by inverting the tabulated conditional of the chosen grid point
            gj = g[j]
            ud[j] = invert_tabulated_cdf(self.u[j, gj], self.cdf_u[j, gj], self.dens_u[j, gj], V[j][:, None], newton=2)[0][:, 0]
        return ud.T, wd.T
