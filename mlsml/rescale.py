r"""The internal standardisation of a fit: an exact reparametrisation, mapped back.

The optimiser's tolerances (the gradient tolerance, the curvature below which a
direction counts as flat) are relative numbers. They are meaningful only when the
parameters have comparable units, which they do not when a covariate is a Unix
timestamp (mean ``1.7e9``), a calendar year, income in currency units or
``x * 1e-8``: the curvature of the likelihood in ``beta`` then spans twenty orders
of magnitude, the intercept and the slope are almost perfectly confounded, and a
quasi-Newton run stops far below the maximum while every check says it converged.

:func:`reparametrise` therefore fits a *standardised copy* of the design and maps
the estimates back exactly. Every matrix ``M`` of the design (``X``, ``W``, ``Z``,
``G`` and the school-level ``S``) is replaced by

.. math::

    M_s = M P, \qquad \text{column } j:\;
    m_{s,j} = (m_j - c_j\,\mathbf 1) / s_j,

with ``c_j`` the column mean (only if the column is off-centre,
``|mean| > CENTRE_RATIO * sd``, and the matrix has a constant column to absorb it)
and ``s_j`` the power of two nearest its standard deviation (only if that is not 1,
so the division is exact). Since ``M b = M_s P^{-1} b``, the coefficients of the
standardised fit are ``b_s = P^{-1} b``, and for the school effects ``u = P_z u_s``,
so that

.. math::

    \beta = \sigma P_x \beta_s, \qquad
    \alpha = P_w \alpha_s + \delta, \qquad
    \tau = P_S \tau_s, \qquad
    \Sigma = (D T)\,\Sigma_s\,(D T)', \quad T = \operatorname{diag}(P_z, P_g),

where the response is also divided by a power of two ``sigma`` near ``sd(y)``
(``W delta = 2 ln sigma``; ``D = diag(sigma, ..., sigma, 1, ..., 1)`` scales the
rows of the mean effects) and ``llf = llf_s - N ln sigma``. The maximum is the same
point; only the optimiser's path changes. The log-Cholesky factor of ``Sigma`` is
found from ``D T L_s`` by an LQ factorisation (accurate even when ``Sigma`` is
nearly singular), and the Jacobian :math:`J = \partial\theta/\partial\theta_s'` is
block diagonal with the linear blocks above and, for the log-Cholesky entries,

.. math::

    J_\psi = \Big[\tfrac{\partial\,\mathrm{vech}\,\Sigma}{\partial\psi'}\Big]^{-1}
             \tfrac{\partial\,\mathrm{vech}\,(D T \Sigma_s T' D)}{\partial\psi_s'} .

The gradient and Hessian map as :math:`g = J^{-T} g_s` and
:math:`H = J^{-T} H_s J^{-1}` (exact at a stationary point, where the term in the
second derivatives of the map times :math:`g_s` vanishes), and the covariance of
the estimates as :math:`J (-H_s)^{-1} J'` -- computed from the standardised
information, never by inverting the ill-conditioned ``H``.

With covariances fixed at zero (``cov_constraints``, ``association="none"``) ``Z`` and
``G`` are only scaled, never centred (``T`` diagonal keeps every zero of ``Sigma``), and
only the free entries of the log-Cholesky factor enter :math:`J_\psi`; the coefficient
``quad(u0,v)`` multiplies ``(u0 / sd(u0))^2``, which no rescaling changes.

Models with a between-school variance function (``bs_formula``) keep ``Z``, ``G``
and ``y`` as they are: their ``theta`` holds ``tau`` and a unit-diagonal factor of
``Sigma0``, to which the map of ``Sigma`` does not apply; ``X``, ``W`` and ``S``
are standardised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .design import Design
from .params import sigma_derivatives, vector_from_chol

#: A column is centred when its mean exceeds this many standard deviations (and the
#: matrix has a constant column): ``[1, x]`` is then far from orthogonal.
CENTRE_RATIO = 4.0

#: A column is scaled when the power of two nearest its standard deviation is at least
#: this factor away from 1 (``2**3``): within it the curvature of its coefficient is
#: within ``64`` of a standardised one, which the optimiser's relative tolerances absorb.
SCALE_RATIO = 8.0

#: A diagonal entry of a Cholesky factor below this (relative to the largest) is taken as
#: this when its log is needed (a school effect exactly at zero variance).
TINY_PIVOT = 1e-150


def _power_of_two(x: float) -> float:
    """The power of two nearest ``x > 0`` (on the log scale)."""
    return float(2.0 ** np.round(np.log2(x)))


def column_map(M: np.ndarray) -> np.ndarray:
    r"""``P`` with ``M_s = M P`` the standardised copy of ``M`` (module docstring).

    Parameters
    ----------
    M : ndarray (N, k)

    Returns
    -------
    ndarray (k, k)
        Identity on the constant columns and on columns already near mean 0 and SD 1;
        otherwise column ``j`` of ``P`` is :math:`(e_j - (c_j/k_0) e_{0}) / s_j` with ``e_0`` a
        constant column of value ``k_0``.

    Examples
    --------
    >>> M = np.column_stack([np.ones(4), 1e6 + np.arange(4.0)])
    >>> (M @ column_map(M))[:, 1].tolist()
    [-1.5, -0.5, 0.5, 1.5]
    """
    M = np.asarray(M, dtype=float)
    k = M.shape[1] if M.ndim == 2 else 0
    if k == 0 or M.shape[0] == 0:
        return np.eye(k)
    lo, hi = M.min(axis=0), M.max(axis=0)
    mean = np.array([np.mean(M[:, j]) for j in range(k)])
    sd = np.array([np.std(M[:, j]) for j in range(k)])
    return column_map_from_stats(lo, hi, mean, sd)


def column_map_from_stats(lo: np.ndarray, hi: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """:func:`column_map` from the columns' minima, maxima, means and (population) SDs.

    What a design held in pieces (:mod:`mlsml.distributed`) knows of its columns after one
    pass; :func:`column_map` computes them from the matrix.

    Examples
    --------
    >>> column_map_from_stats(np.array([1.0, 1e6]), np.array([1.0, 1e6 + 3]), np.array([1.0, 1e6 + 1.5]),
    ...                       np.array([0.0, 1.118])).round(1).tolist()
    [[1.0, -1000001.5], [0.0, 1.0]]
    """
    k = len(lo)
    P = np.eye(k)
    const = np.flatnonzero((lo == hi) & (lo != 0))
    i0 = int(const[0]) if const.size else None
    for j in range(k):
        if lo[j] == hi[j]:
            continue
        sdj = float(sd[j])
        if not (np.isfinite(sdj) and sdj > 0):
            continue
        s = _power_of_two(sdj)
        if max(s, 1.0 / s) < SCALE_RATIO:
            s = 1.0
        centre = i0 is not None and abs(float(mean[j])) > CENTRE_RATIO * sdj
        if centre:
            P[i0, j] = -float(mean[j]) / lo[i0] / s
        P[j, j] = 1.0 / s
    return P


@dataclass(frozen=True)
class Reparametrisation:
    r"""An exact map between a design's parameters and those of its standardised copy.

    Attributes
    ----------
    design : Design
        The standardised design the optimiser sees (the original when :attr:`identity`).
    sigma : float
        The power of two the response was divided by.
    Px, Pw, PS : ndarray
        Column maps of ``X``, ``W`` and ``S`` (``M_s = M P``; ``PS`` is empty without ``bs_formula``).
    T : ndarray (d, d)
        ``diag(sigma P_z, P_g)`` restricted to the school effects: ``Sigma = T Sigma_s T'``.
    delta : ndarray (k,)
        Shift of ``alpha`` from the response scaling, ``W delta = 2 ln sigma``.
    identity : bool
        Whether nothing was changed (the map is skipped).
    """

    design: Design
    sigma: float
    Px: np.ndarray
    Pw: np.ndarray
    PS: np.ndarray
    T: np.ndarray
    delta: np.ndarray
    identity: bool

    @property
    def layout(self):
        """The parameter layout (the same on both scales)."""
        return self.design.layout

    @property
    def log_shift(self) -> float:
        """``N ln sigma``: the standardised fit's log-likelihood minus the original one.

        ``N`` is the total weight of the observations with weights (:attr:`mlsml.design.Design.nobs_weighted`).
        """
        return float(self.design.nobs_weighted * np.log(self.sigma))

    # ------------------------------------------------------------ the map
    def _blocks(self):
        lay = self.layout
        off = lay.p + lay.k + lay.m
        return lay.p, lay.p + lay.k, off

    def to_original(self, theta_s: np.ndarray) -> np.ndarray:
        """``theta`` of the original design from ``theta_s`` of the standardised one."""
        theta_s = np.asarray(theta_s, dtype=float)
        if self.identity:
            return theta_s.copy()
        lay = self.layout
        p, pk, off = self._blocks()
        beta = self.sigma * (self.Px @ theta_s[:p])
        alpha = self.Pw @ theta_s[p:pk] + self.delta
        tau = self.PS @ theta_s[pk:off]
        rest = theta_s[off:]  # the log-Cholesky entries, then quad(u0,v) (unchanged: u0 / sd(u0) is)
        if not lay.bs_terms and lay.d:
            L_s = _factor(lay, theta_s)
            chol = vector_from_chol(_lower_factor(self.T @ L_s))[list(lay.free_chol)]
            rest = np.concatenate([chol, rest[lay.n_chol :]])
        return np.concatenate([beta, alpha, tau, rest])

    def to_standardised(self, theta: np.ndarray) -> np.ndarray:
        """``theta_s`` of the standardised design from ``theta`` of the original one."""
        theta = np.asarray(theta, dtype=float)
        if self.identity:
            return theta.copy()
        lay = self.layout
        p, pk, off = self._blocks()
        beta = np.linalg.solve(self.Px, theta[:p]) / self.sigma
        alpha = np.linalg.solve(self.Pw, theta[p:pk] - self.delta)
        tau = np.linalg.solve(self.PS, theta[pk:off]) if lay.m else theta[pk:off]
        rest = theta[off:]
        if not lay.bs_terms and lay.d:
            L = _factor(lay, theta)
            chol = vector_from_chol(_lower_factor(np.linalg.solve(self.T, L)))[list(lay.free_chol)]
            rest = np.concatenate([chol, rest[lay.n_chol :]])
        return np.concatenate([beta, alpha, tau, rest])

    def jacobian(self, theta_s: np.ndarray) -> np.ndarray:
        r""":math:`J = \partial\theta / \partial\theta_s'` at ``theta_s`` (module docstring)."""
        lay = self.layout
        n = lay.n_params
        if self.identity:
            return np.eye(n)
        theta_s = np.asarray(theta_s, dtype=float)
        p, pk, off = self._blocks()
        J = np.zeros((n, n))
        J[:p, :p] = self.sigma * self.Px
        J[p:pk, p:pk] = self.Pw
        J[pk:off, pk:off] = self.PS
        if lay.bs_terms or not lay.d:
            J[off:, off:] = np.eye(n - off)
            return J
        d = lay.d
        free = list(lay.free_chol)
        L_s = _factor(lay, theta_s)
        L = _factor(lay, self.to_original(theta_s))
        rows, cols = (ix[free] for ix in np.tril_indices(d))  # the entries of Sigma the free entries of L set
        dS_s = np.einsum("ab,kbc,dc->kad", self.T, sigma_derivatives(L_s, free), self.T)[:, rows, cols]
        dS = sigma_derivatives(L, free)[:, rows, cols]
        end = off + lay.n_chol
        J[off:end, off:end] = _solve(dS.T, dS_s.T)
        J[end:, end:] = np.eye(n - end)  # quad(u0,v)
        return J

    def gradient(self, grad_s: np.ndarray, J: np.ndarray) -> np.ndarray:
        """The gradient in ``theta``: :math:`J^{-T} g_s`."""
        return grad_s.copy() if self.identity else _solve(J.T, grad_s)

    def hessian(self, hess_s: np.ndarray, J: np.ndarray) -> np.ndarray:
        """The Hessian in ``theta`` at a stationary point: :math:`J^{-T} H_s J^{-1}`."""
        if self.identity:
            return hess_s.copy()
        Ji = _solve(J, np.eye(J.shape[0]))
        H = Ji.T @ hess_s @ Ji
        return 0.5 * (H + H.T)


def _solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A^{-1} B``; the least-squares (pseudo-inverse) solution where ``A`` is exactly singular.

    At a boundary point where a diagonal entry of the log-Cholesky factor has underflowed,
    the map's Jacobian loses rank; numpy 1.24's LAPACK call then raised ``Singular matrix``
    out of the fit (a stored fuzz case, 6253197893067880813), where newer releases returned
    a solution. The pseudo-inverse gives the minimum-norm solution on both.
    """
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, B, rcond=None)[0]


def _factor(layout, theta: np.ndarray) -> np.ndarray:
    """``L`` of ``theta`` (:meth:`mlsml.params.ParamLayout.chol`, as numpy)."""
    return np.asarray(layout.chol(np.asarray(theta, dtype=float)), dtype=float)


def _lower_factor(M: np.ndarray) -> np.ndarray:
    r"""The lower-triangular ``L`` with positive diagonal and ``L L' = M M'`` (LQ of ``M``).

    From the QR factorisation :math:`M' = Q R`: :math:`M M' = R'R`, so ``L = R'`` with the
    signs of its columns made positive; accurate when ``M M'`` is nearly singular, where a
    Cholesky factorisation of the product would lose the small pivots.
    """
    R = np.linalg.qr(M.T, mode="r")
    L = R.T.copy()
    sign = np.where(np.diag(L) < 0, -1.0, 1.0)
    L *= sign[None, :]
    diag = np.diag(L)
    floor = TINY_PIVOT * max(float(np.abs(L).max()), TINY_PIVOT)
    L[np.diag_indices_from(L)] = np.maximum(diag, floor)
    return L


def reparametrise(design: Design) -> Reparametrisation:
    """The standardised copy of ``design`` and the map back (module docstring).

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> df["x"] = df["x"] + 1e6
    >>> rp = reparametrise(mlsml.MELSM.from_formula("y ~ x", df, groups="school").design)
    >>> rp.identity, float(abs(rp.design.X[:, 1].mean())) < 1e-6
    (False, True)
    """
    if not isinstance(design, Design):  # held in blocks by Dask workers: standardised from its moments
        return design.reparametrise()
    lay = design.layout
    n = design.nobs
    bs = bool(lay.bs_terms)
    sigma = 1.0
    delta = np.zeros(lay.k)
    if not bs:
        sd = float(np.std(design.y))
        if np.isfinite(sd) and sd > 0:
            sigma = _power_of_two(sd)
        if sigma != 1.0:
            target = np.full(n, 2.0 * np.log(sigma))
            delta, *_ = np.linalg.lstsq(design.W, target, rcond=None)
            if not np.allclose(design.W @ delta, target, rtol=0, atol=1e-9 * abs(target[0])):
                sigma, delta = 1.0, np.zeros(lay.k)  # the constant is not in the span of W
    Px, Pw = column_map(design.X), column_map(design.W)
    PS = column_map(design.S) if (bs and design.S is not None) else np.eye(lay.m)
    if bs and design.S_level1 is not None:  # level-1 columns: the map of the rows' whole design
        PS = column_map(design.S[design.group] + design.S_level1)
    d = lay.d
    T = np.eye(d)
    if not bs and d:
        T[: lay.q, : lay.q] = sigma * column_map(design.Z) if lay.q else T[: lay.q, : lay.q]
        if lay.scale_re_terms and design.G is not None:
            T[lay.q :, lay.q :] = column_map(design.G)
        if lay.fixed_cov:  # scaling only: centring a column mixes the effects and moves a fixed zero
            T = np.diag(np.diag(T))
    eye = all(np.array_equal(P, np.eye(P.shape[0])) for P in (Px, Pw, PS))
    if sigma == 1.0 and eye and np.array_equal(T, np.eye(d)):
        return Reparametrisation(design, 1.0, Px, Pw, PS, T, delta, identity=True)
    return Reparametrisation(standardised_design(design, sigma, Px, Pw, PS, T), sigma, Px, Pw, PS, T, delta, identity=False)


def standardised_design(design: Design, sigma: float, Px: np.ndarray, Pw: np.ndarray, PS: np.ndarray, T: np.ndarray) -> Design:
    """The standardised copy of ``design`` under the maps of a :class:`Reparametrisation`.

    ``y / sigma``, ``X Px``, ``W Pw``, ``Z T_zz / sigma``, ``G T_gg`` and ``S PS`` (``Z``, ``G``
    and ``y`` unchanged with ``bs_formula``, module docstring); also applied to each block of
    schools of a design held by Dask workers (:mod:`mlsml.distributed`).
    """
    lay = design.layout
    bs = bool(lay.bs_terms)
    return dataclasses.replace(
        design,
        y=design.y / sigma,
        X=design.X @ Px,
        W=design.W @ Pw,
        Z=design.Z @ (T[: lay.q, : lay.q] / sigma) if (not bs and lay.q) else design.Z,
        G=design.G @ T[lay.q :, lay.q :] if (not bs and lay.scale_re_terms and design.G is not None) else design.G,
        S=design.S @ PS if (bs and design.S is not None) else design.S,
        S_level1=design.S_level1 @ PS if design.S_level1 is not None else None,
    )
