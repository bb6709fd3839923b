r"""The posterior of every school along one direction of its scale effects, for every model class.

The school tables of the extended models (:mod:`mlsml.schools`) need, for school ``j``,
the posterior of its mean effect ``zbar'u_j`` and of its log-variance effect at
covariate values ``w``,

.. math::

    t_j = \bar g'v_j, \qquad \ln\sigma^2_j(w) = w'\alpha + t_j,

where ``gbar`` is the row of ``scale_re_formula`` at ``w`` (``gbar = 1`` for the plain
random scale ``v_j``). The posterior of ``v_j`` is ``n_v``-dimensional; it is tabulated
in coordinates ``(t, z)`` along ``gbar`` and across it,

.. math::

    v(t, z) = m_j + a_j (t - \bar g'm_j) + R_j z, \qquad
    a_j = \frac{C_j \bar g}{\bar g'C_j \bar g}, \qquad
    R_j R_j' = C_j - \frac{C_j \bar g \bar g' C_j}{\bar g'C_j \bar g},

with ``m_j``, ``C_j`` the posterior mean and covariance of ``v_j`` (``gbar'R_j = 0``, and
the map is linear with a constant Jacobian). ``t`` runs over a uniform grid of
:data:`~mlsml.predict.GRID_POINTS` points over ``gbar'm_j +/-``
:data:`~mlsml.predict.GRID_HALFWIDTH` posterior SDs; ``z`` over the Gauss-Hermite
nodes of :data:`ACROSS_NAGQ` points per dimension in the ``n_v - 1`` other directions.
At every node the density is the fit's own integrand with the mean effects
integrated out exactly, ``exp g_j(v)`` (:meth:`mlsml.integrand.Integrand.log_h_uexact`:
the per-observation density with ``scale_re_formula``, the school's ``Sigma_j`` with
``bs_formula``), and ``u | v, y`` is normal (:meth:`mlsml.integrand.Integrand.conditional_u`).
Hence

.. math::

    p(t \mid y) \propto \sum_k \tilde w_k \exp g_j(v(t, z_k)),

whose distribution function is the integral of its cubic spline (``O(h^4)``), inverted
as :func:`mlsml.predict.invert_tabulated_cdf`; ``E(e^t | y)`` and the moments of ``u``
are trapezoid-times-Gauss-Hermite sums over the nodes (spectrally accurate for these
smooth, rapidly decaying integrands), and ``zbar'u_j`` has the normal-mixture marginal
``sum_ik omega_ik N(zbar'mu_ik, zbar'V_ik zbar)`` (:func:`mlsml.predict.mixture_quantiles`).
With one scale effect (``n_v = 1``: ``bs_formula`` with a random scale) there are no
other directions and this is the exact one-dimensional grid of
:class:`mlsml.predict.PosteriorGrid` with the school's own ``Sigma_j``. Without scale
effects the posterior of ``u`` is exactly normal (one node per school).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._lazy import LazyModule
from .gaussian import conditional_moments
from .integrand import Integrand
from .predict import GRID_HALFWIDTH, GRID_POINTS, invert_tabulated_cdf, mixture_quantiles
from .quadrature import gauss_hermite_rule

interpolate = LazyModule("scipy.interpolate")  # imported on first use: keeps `import mlsml` fast

#: Gauss-Hermite points per dimension across ``gbar`` (the ``n_v - 1`` directions of
#: ``v`` that leave the school's variance at ``w`` unchanged). Given ``t`` the posterior
#: of ``v`` is nearly normal in these directions; 15 points integrate it to about 1e-7
#: (the u-exact likelihood uses 15 points per dimension over all of ``v``).
ACROSS_NAGQ = 15

#: ``gbar'C_j gbar`` at or below this times ``trace(C_j)`` counts as zero: ``gbar = 0``
#: (e.g. ``scale_re_formula="~ 0 + x"`` at ``x = 0``), so the school's variance at ``w``
#: has no random part.
ZERO_DIRECTION_RTOL = 1e-14


@dataclass(frozen=True)
class ScaleGrid:
    """The posterior of every school on a grid in ``t = gbar'v`` times Gauss-Hermite nodes across.

    Attributes
    ----------
    t : ndarray (J, G)
        Grid of ``t`` per school (zeros, ``G = 1``, when ``t`` has no random part).
    weight : ndarray (J, G, K)
        Normalised weights of the nodes (sum to one per school).
    cdf, density : ndarray (J, G) or None
        Distribution function and density of ``t | y`` at the grid points.
    mu : ndarray (J, G, K, q)
        ``E(u | v, y)`` at the nodes.
    V : ndarray (J, G, K, q, q)
        ``cov(u | v, y)`` at the nodes.
    random : ndarray (J,) of bool
        Schools whose ``t`` has a random part (``gbar != 0`` and a random scale).
    """

    t: np.ndarray
    weight: np.ndarray
    cdf: np.ndarray | None
    density: np.ndarray | None
    mu: np.ndarray
    V: np.ndarray
    random: np.ndarray

    @classmethod
    def build(
        cls,
        integrand: Integrand,
        theta: np.ndarray,
        gbar: np.ndarray,
        mean: np.ndarray,
        cov: np.ndarray,
        points: int = GRID_POINTS,
        halfwidth: float = GRID_HALFWIDTH,
        across: int = ACROSS_NAGQ,
    ) -> ScaleGrid:
        """Tabulate the posterior of every school.

        Parameters
        ----------
        integrand : Integrand
            The fit's integrand (``res.likelihood.integrand``).
        theta : ndarray
            Optimiser-scale parameters.
        gbar : ndarray (n_v,) or (J, n_v)
            Direction(s) ``gbar`` (one per school with ``w="school"``).
        mean, cov : ndarray (J, d), (J, d, d)
            Posterior means and covariances of ``b_j`` (e.g. by the adaptive quadrature of
            :func:`mlsml.predict.posterior_moments`): they place the grid.
        points : int
            Grid points in ``t``.
        halfwidth : float
            The grid spans ``gbar'm_j +/- halfwidth`` posterior SDs of ``t``.
        across : int
            Gauss-Hermite points per dimension across ``gbar``.

        Examples
        --------
        With one ``Sigma`` and one ``v`` it is the core model's exact grid computed another way:

        >>> import mlsml
        >>> from mlsml.predict import PosteriorGrid, posterior_likelihood, posterior_moments
        >>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school")
        >>> mean, cov = posterior_moments(posterior_likelihood(res), res.theta)
        >>> grid = ScaleGrid.build(res.likelihood.integrand, res.theta, np.ones(1), mean, cov)
        >>> exact = PosteriorGrid.build(res.theta, res.model.design, mean[:, 1], np.sqrt(cov[:, 1, 1]))
        >>> bool(np.allclose(grid.quantile_t([0.025, 0.975]), exact.quantile_v([0.025, 0.975]), rtol=0, atol=1e-7))
        True
        """
        lay = integrand.layout
        q, nv = lay.q, lay.n_v
        theta = np.asarray(theta, dtype=float)
        J = mean.shape[0]
        if nv == 0:  # exactly normal: u | y ~ N(mean, cov)
            return cls(
                np.zeros((J, 1)),
                np.ones((J, 1, 1)),
                None,
                None,
                mean[:, None, None, :q],
                cov[:, None, None, :q, :q],
                np.zeros(J, dtype=bool),
            )
        g = np.broadcast_to(np.asarray(gbar, dtype=float), (J, nv))
        m, C = mean[:, q:], cov[:, q:, q:]
        Cg = np.einsum("jab,jb->ja", C, g)
        s2 = np.einsum("ja,ja->j", g, Cg)
        random = s2 > ZERO_DIRECTION_RTOL * np.trace(C, axis1=1, axis2=2)
        # where gbar = 0 the grid runs along the first scale effect instead (t is then not reported)
        e1 = np.zeros(nv)
        e1[0] = 1.0
        direction = np.where(random[:, None], g, e1)
        Cg = np.einsum("jab,jb->ja", C, direction)
        s2 = np.einsum("ja,ja->j", direction, Cg)
        sd = np.sqrt(s2)
        centre = np.einsum("ja,ja->j", direction, m)
        a = Cg / s2[:, None]
        tau = np.linspace(-halfwidth, halfwidth, int(points))
        t = centre[:, None] + sd[:, None] * tau[None, :]
        if nv > 1:
            rule = gauss_hermite_rule(nv - 1, across)
            Kc = C - Cg[:, :, None] * Cg[:, None, :] / s2[:, None, None]
            lam, vec = np.linalg.eigh(0.5 * (Kc + np.swapaxes(Kc, 1, 2)))  # ascending: the top nv-1 span gbar's complement
            R = vec[:, :, 1:] * np.sqrt(np.clip(lam[:, None, 1:], 0.0, None))
            across_v = np.einsum("jar,kr->jka", R, rule.points)  # (J, K, nv)
            logw = rule.logw
        else:
            across_v = np.zeros((J, 1, 1))
            logw = np.zeros(1)
        G, K = t.shape[1], logw.shape[0]
        v = m[:, None, None, :] + a[:, None, None, :] * (t - centre[:, None])[:, :, None, None] + across_v[:, None, :, :]
        flat = v.reshape(J, G * K, nv)
        lg = np.asarray(integrand.log_h_uexact(theta, flat), dtype=float).reshape(J, G, K) + logw[None, None, :]
        e = np.exp(lg - lg.max(axis=(1, 2), keepdims=True))
        Mx, cx = integrand.conditional_u(theta, flat)
        mu, V, _, _ = conditional_moments(Mx, cx)
        # the marginal density of t (per unit of tau = standardised t) and its integral
        dens = e.sum(axis=2)
        F = interpolate.CubicSpline(tau, dens, axis=1).antiderivative()(tau)
        F = np.maximum.accumulate(np.maximum(F - F[:, :1], 0.0), axis=1)  # monotone where the density underflows
        total = F[:, -1:]
        trap = np.full(G, tau[1] - tau[0])
        trap[[0, -1]] *= 0.5
        weight = trap[None, :, None] * e
        weight /= weight.sum(axis=(1, 2), keepdims=True)
        return cls(
            t=t,
            weight=weight,
            cdf=F / total,
            density=dens / (total * sd[:, None]),
            mu=mu.reshape(J, G, K, q),
            V=V.reshape(J, G, K, q, q),
            random=random,
        )

    # ------------------------------------------------------------ moments
    def mean_linear(self, c: np.ndarray) -> np.ndarray:
        """``E(c'u_j | y)``, shape ``(J,)``."""
        return np.einsum("jgk,jgkq,q->j", self.weight, self.mu, np.asarray(c, dtype=float))

    def mean_exp_t(self) -> np.ndarray:
        """``E(exp(t_j) | y)``, shape ``(J,)`` (1 where ``t`` has no random part)."""
        out = np.einsum("jgk,jg->j", self.weight, np.exp(self.t))
        return np.where(self.random, out, 1.0)

    # ------------------------------------------------------------ quantiles
    def quantile_t(self, probs) -> np.ndarray:
        """Quantiles of ``t_j | y``, shape ``(J, len(probs))`` (0 where ``t`` has no random part)."""
        probs = np.atleast_1d(np.asarray(probs, dtype=float))
        J = self.t.shape[0]
        if self.cdf is None:
            return np.zeros((J, probs.size))
        P = np.broadcast_to(probs, (J, probs.size))
        out = invert_tabulated_cdf(self.t, self.cdf, self.density, P)[0]
        return np.where(self.random[:, None], out, 0.0)

    def quantile_linear(self, c: np.ndarray, probs) -> np.ndarray:
        """Quantiles of ``c'u_j | y`` (a normal mixture over the nodes), shape ``(J, len(probs))``."""
        c = np.asarray(c, dtype=float)
        J = self.t.shape[0]
        m = np.einsum("jgkq,q->jgk", self.mu, c).reshape(J, -1)
        var = np.einsum("q,jgkqr,r->jgk", c, self.V, c).reshape(J, -1)
        sd = np.sqrt(np.clip(var, 1e-300, None))
        return mixture_quantiles(self.weight.reshape(J, -1), m, sd, probs)

    # ------------------------------------------------------------ draws
    def draws(self, c: np.ndarray | None, ndraws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Posterior draws of ``(c'u_j, t_j)``, each of shape ``(ndraws, J)``.

        ``t`` is drawn by inverting its distribution function; the other directions
        of ``v`` are drawn among the Gauss-Hermite nodes of the nearer grid point
        (with their weights there), and ``c'u | v`` from its normal distribution.
        Exact in ``t``; in ``c'u`` a mixture over the nodes, as its quantiles.
        """
        J, G = self.t.shape
        K = self.weight.shape[2]
        U = rng.random((ndraws, J))
        cols = np.arange(J)[None, :]
        if self.cdf is not None:
            tT, iT, fT = invert_tabulated_cdf(self.t, self.cdf, self.density, U.T, newton=2)
            t = np.where(self.random[None, :], tT.T, 0.0)
            cell = np.where(fT.T < 0.5, iT.T, iT.T + 1)
        else:
            t = np.zeros((ndraws, J))
            cell = np.zeros((ndraws, J), dtype=np.intp)
        if c is None or len(c) == 0:
            return np.zeros((ndraws, J)), t
        if self.cdf is not None and K > 1:
            wk = self.weight[cols, cell]  # (ndraws, J, K)
            cum = np.cumsum(wk, axis=2)
            k = (cum < rng.random((ndraws, J, 1)) * cum[:, :, -1:]).sum(axis=2)
            k = np.minimum(k, K - 1)
        else:
            k = np.zeros((ndraws, J), dtype=np.intp)
        c = np.asarray(c, dtype=float)
        m = np.einsum("jgkq,q->jgk", self.mu, c)[cols, cell, k]
        var = np.clip(np.einsum("q,jgkqr,r->jgk", c, self.V, c), 0, None)[cols, cell, k]
        return m + np.sqrt(var) * rng.standard_normal((ndraws, J)), t
