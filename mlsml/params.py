"""Parameter layout: the one contract for names, order and scales.

The model has three blocks of parameters:

- ``beta`` (length ``p``): the mean function, ``y_ij = x_ij' beta + z_ij' u_j + e_ij``;
- ``alpha`` (length ``k``): the residual variance function,
  ``ln var(e_ij) = w_ij' alpha + v_j``;
- ``Sigma`` (``d x d``): the covariance of the school effects
  ``b_j = (u_j0, ..., u_j(q-1), v_j) ~ N(0, Sigma)``, with ``d = q + 1`` when the
  model has a random scale and ``d = q`` otherwise.

**Optimiser scale** (``theta``): ``[beta, alpha, lchol]`` where ``lchol`` holds
the lower Cholesky factor ``L`` of ``Sigma`` row by row (``L[0,0], L[1,0],
L[1,1], L[2,0], ...``) with the diagonal entries on the log scale. Every
``theta`` in R^n is a valid model, which is why the optimiser works there.

**Natural scale** (reported, the public contract): a :class:`pandas.Series`
whose index is

- ``mean:<term>`` for each column of the mean design, e.g. ``mean:Intercept``;
- ``scale:<term>`` for each column of the variance design, e.g. ``scale:x``;
- ``var(<e>)`` for each school effect ``e`` in the order ``u0, u1, ..., v``;
- ``cov(<e>,<f>)`` for each pair ``e`` before ``f`` in that order, e.g.
  ``cov(u0,u1)``, ``cov(u0,v)``, ``cov(u1,v)``.

Term names are those of the formula engine. ``u0, u1, ...`` follow the columns
of ``re_formula`` (``u0`` is the random intercept when there is one).

**Extensions** (issue 3; both optional, see ``docs/model.md``):

- a random slope in the residual variance function (``scale_re_formula="~ x"``):
  ``ln var(e_ij) = w_ij' alpha + g_ij' v_j`` with ``g_ij`` the columns of
  ``scale_re_formula``; the scale effects are then named ``v0, v1, ...`` (in that
  formula's column order) instead of ``v``, e.g. ``var(v1)``, ``cov(u0,v1)``.
  ``v`` is kept when there is only the random scale intercept (the contract).
- a log-linear between-school variance of the random intercept (``bs_formula="~ s"``):
  ``ln var(u0_j) = s_j' tau`` with school-level ``s_j``. The names ``bsvar:<term>``
  (the ``tau``) replace ``var(u0)`` and come right after the ``scale:`` block. The
  correlations are constant: ``Sigma_j = S_j Sigma0 S_j`` with
  ``S_j = diag(exp(s_j' tau / 2), 1, ..., 1)`` and ``Sigma0[0, 0] = 1``; the reported
  ``cov(u0,e)`` is ``Sigma0[0, e] = cov(u0_j, e_j) / sd(u0_j)``, the covariance of ``e``
  with the standardised intercept effect (MIXREGLS's "Loc Eff" for ``e = v``). On the
  optimiser scale ``tau`` follows ``alpha`` and ``L0[0, 0] = 1`` is not a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np


@dataclass(frozen=True)
class ParamLayout:
    """Sizes and names of a model's parameters.

    Parameters
    ----------
    mean_terms, scale_terms : tuple of str
        Column names of the mean design ``X`` and the variance design ``W``.
    n_re_mean : int
        ``q``, the number of school effects in the mean function.
    random_scale : bool
        Whether the model has the school effect ``v_j`` on the log variance.
    scale_re_terms : tuple of str
        Columns of ``scale_re_formula`` (random effects in the log variance); empty
        for the plain random scale ``v_j`` (or none).
    bs_terms : tuple of str
        Columns of ``bs_formula`` (log-linear variance of ``u0``); empty if none.

    Examples
    --------
    >>> lay = ParamLayout(("Intercept", "x"), ("Intercept", "x"), n_re_mean=1, random_scale=True)
    >>> lay.names
    ('mean:Intercept', 'mean:x', 'scale:Intercept', 'scale:x', 'var(u0)', 'var(v)', 'cov(u0,v)')
    >>> lay.d, lay.n_cov, lay.n_params
    (2, 3, 7)
    >>> theta = lay.theta_from_parts([0.0, 0.7], [-0.8, 0.05], [[0.05, 0.01], [0.01, 0.04]])
    >>> np.round(lay.to_natural(theta), 6).tolist()
    [0.0, 0.7, -0.8, 0.05, 0.05, 0.04, 0.01]
    """

    mean_terms: tuple[str, ...]
    scale_terms: tuple[str, ...]
    n_re_mean: int
    random_scale: bool
    scale_re_terms: tuple[str, ...] = ()
    bs_terms: tuple[str, ...] = ()

    @property
    def p(self) -> int:
        """Number of mean-function coefficients."""
        return len(self.mean_terms)

    @property
    def k(self) -> int:
        """Number of variance-function coefficients."""
        return len(self.scale_terms)

    @property
    def q(self) -> int:
        """Number of school effects in the mean function."""
        return self.n_re_mean

    @property
    def n_v(self) -> int:
        """Number of school effects in the log variance (``v`` or ``v0, v1, ...``)."""
        if self.scale_re_terms:
            return len(self.scale_re_terms)
        return int(self.random_scale)

    @property
    def m(self) -> int:
        """Number of between-school variance coefficients ``tau``."""
        return len(self.bs_terms)

    @property
    def extended(self) -> bool:
        """Whether the model needs the per-observation integrand or school-specific covariances (:mod:`mlsml.integrand`)."""
        return bool(self.scale_re_terms or self.bs_terms)

    @property
    def d(self) -> int:
        """Dimension of the school effects ``b_j``."""
        return self.q + self.n_v

    @property
    def n_cov(self) -> int:
        """Number of free parameters of ``Sigma`` (of ``tau`` and ``Sigma0`` with ``bs_terms``)."""
        return self.d * (self.d + 1) // 2 + (self.m - 1 if self.bs_terms else 0)

    @property
    def n_params(self) -> int:
        """Total number of free parameters."""
        return self.p + self.k + self.n_cov

    @property
    def re_names(self) -> tuple[str, ...]:
        """Names of the school effects, ``u0, u1, ..., v`` (``v0, v1, ...`` with scale slopes)."""
        names = tuple(f"u{i}" for i in range(self.q))
        if self.scale_re_terms:
            return names + tuple(f"v{i}" for i in range(len(self.scale_re_terms)))
        return names + (("v",) if self.random_scale else ())

    @property
    def cov_names(self) -> tuple[str, ...]:
        """Names of the covariance parameters in contract order."""
        re = self.re_names
        variances = tuple(f"var({e})" for e in re)
        if self.bs_terms:
            variances = tuple(f"bsvar:{t}" for t in self.bs_terms) + variances[1:]
        covs = tuple(f"cov({re[i]},{re[j]})" for i in range(self.d) for j in range(i + 1, self.d))
        return variances + covs

    @property
    def names(self) -> tuple[str, ...]:
        """All natural-scale parameter names in contract order."""
        return tuple(f"mean:{t}" for t in self.mean_terms) + tuple(f"scale:{t}" for t in self.scale_terms) + self.cov_names

    def split_bs(self, theta):
        """``(beta, alpha, tau, L0)`` for a model with ``bs_terms`` (``L0[0, 0] = 1``)."""
        beta = theta[: self.p]
        alpha = theta[self.p : self.p + self.k]
        off = self.p + self.k
        tau = theta[off : off + self.m]
        rest = theta[off + self.m :]
        vec = anp.concatenate([anp.zeros(1), rest])  # log L0[0,0] = 0
        return beta, alpha, tau, chol_from_vector(vec, self.d)

    # ----------------------------------------------------------------- theta
    def split(self, theta):
        """Split ``theta`` into ``(beta, alpha, L)`` with ``L`` the Cholesky factor of Sigma.

        Works on autograd boxes, so it can sit inside the objective. With
        ``bs_terms`` use :meth:`split_bs` (``L`` is then ``L0``).
        """
        if self.bs_terms:
            beta, alpha, _, L0 = self.split_bs(theta)
            return beta, alpha, L0
        beta = theta[: self.p]
        alpha = theta[self.p : self.p + self.k]
        return beta, alpha, chol_from_vector(theta[self.p + self.k :], self.d)

    def to_natural(self, theta):
        """Map ``theta`` to the natural-scale vector (``beta, alpha, vars, covs``)."""
        if self.bs_terms:
            beta, alpha, tau, L = self.split_bs(theta)
            sigma = anp.dot(L, L.T)
            iu = np.triu_indices(self.d, 1)
            cov = sigma[iu] if self.d > 1 else anp.zeros(0)
            return anp.concatenate([beta, alpha, tau, anp.diag(sigma)[1:], cov])
        beta, alpha, L = self.split(theta)
        sigma = anp.dot(L, L.T)
        var = anp.diag(sigma)
        iu = np.triu_indices(self.d, 1)
        cov = sigma[iu] if self.d > 1 else anp.zeros(0)
        return anp.concatenate([beta, alpha, var, cov])

    def natural_jacobian(self, theta) -> np.ndarray:
        r"""``d to_natural(theta) / d theta'`` (numpy), for the delta method.

        The identity on ``beta``, ``alpha`` (and ``tau``); for the covariances
        :math:`\partial\Sigma/\partial\psi_k = \dot L_k L' + L \dot L_k'`
        (:func:`sigma_derivatives`), in the order of :meth:`to_natural`. Equal to
        ``autograd.jacobian(self.to_natural)(theta)``, whose ``n_params`` reverse passes
        cost 25 ms on London Model 6.

        Examples
        --------
        >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
        >>> theta = lay.theta_from_parts([0.0], [0.0], [[0.05, 0.01], [0.01, 0.04]])
        >>> lay.natural_jacobian(theta).shape
        (5, 5)
        """
        theta = np.asarray(theta, dtype=float)
        n = self.n_params
        off = self.p + self.k
        d = self.d
        jac = np.zeros((n, n))
        if self.bs_terms:
            off += self.m
            L = np.asarray(self.split_bs(theta)[3], dtype=float)
            dS = sigma_derivatives(L)[1:]  # log L0[0, 0] = 0 is not a parameter
            diag = np.arange(1, d)  # var(u0) is replaced by tau
        else:
            L = np.asarray(self.split(theta)[2], dtype=float)
            dS = sigma_derivatives(L)
            diag = np.arange(d)
        jac[:off, :off] = np.eye(off)
        iu = np.triu_indices(d, 1)
        rows = np.concatenate([dS[:, diag, diag], dS[:, iu[0], iu[1]]], axis=1)  # (n_psi, n_cov)
        jac[off:, off:] = rows.T
        return jac

    def sigma_from_natural(self, natural: np.ndarray) -> np.ndarray:
        """Rebuild ``Sigma`` from the natural-scale vector (``Sigma0`` with ``bs_terms``)."""
        off = self.p + self.k
        d = self.d
        sigma = np.zeros((d, d))
        if self.bs_terms:
            diag = np.concatenate([[1.0], natural[off + self.m : off + self.m + d - 1]])
            sigma[np.diag_indices(d)] = diag
            off += self.m - 1
        else:
            sigma[np.diag_indices(d)] = natural[off : off + d]
        iu = np.triu_indices(d, 1)
        sigma[iu] = natural[off + d : off + d + d * (d - 1) // 2]
        sigma[(iu[1], iu[0])] = sigma[iu]
        return sigma

    def theta_from_parts(self, beta, alpha, sigma, tau=None) -> np.ndarray:
        """Inverse of :meth:`split` for a positive-definite ``sigma``.

        With ``bs_terms`` give ``tau`` too; ``sigma`` is then ``Sigma0`` (its
        ``[0, 0]`` entry is taken as 1 after rescaling the first row and column).
        """
        sigma = np.asarray(sigma, dtype=float)
        if self.bs_terms:
            s0 = np.sqrt(sigma[0, 0])
            scale = np.ones(self.d)
            scale[0] = 1.0 / s0
            L = np.linalg.cholesky(sigma * np.outer(scale, scale))
            tau = np.zeros(self.m) if tau is None else np.asarray(tau, float)
            return np.concatenate([np.asarray(beta, float), np.asarray(alpha, float), tau, vector_from_chol(L)[1:]])
        L = np.linalg.cholesky(sigma)
        return np.concatenate([np.asarray(beta, float), np.asarray(alpha, float), vector_from_chol(L)])


def chol_from_vector(vec, d: int):
    """Lower-triangular ``L`` from its row-wise vector with log diagonal.

    Built without in-place assignment so that autograd can differentiate it.

    Examples
    --------
    >>> chol_from_vector(np.array([0.0, 0.5, np.log(2.0)]), 2)
    array([[1. , 0. ],
           [0.5, 2. ]])
    """
    rows = []
    pos = 0
    for i in range(d):
        entries = []
        for j in range(d):
            if j < i:
                entries.append(vec[pos + j])
            elif j == i:
                entries.append(anp.exp(vec[pos + j]))
            else:
                entries.append(0.0 * vec[pos])
        pos += i + 1
        rows.append(anp.stack(entries))
    if d == 0:
        return anp.zeros((0, 0))
    return anp.stack(rows)


def chol_derivatives(L: np.ndarray) -> np.ndarray:
    r"""``d L / d psi_k`` for the row-wise log-Cholesky vector ``psi`` of ``L``, shape ``(n_psi, d, d)``.

    .. math:: \frac{\partial L}{\partial\psi_k} = E_{ij}\,(L_{ii} \text{ if } i = j \text{ else } 1)

    for the entry ``(i, j)`` that ``psi_k`` holds (:func:`chol_from_vector` stores the
    diagonal as its log).

    Examples
    --------
    >>> chol_derivatives(np.array([[2.0, 0.0], [0.5, 3.0]]))[:, 1, :]
    array([[0., 0.],
           [1., 0.],
           [0., 3.]])
    """
    L = np.asarray(L, dtype=float)
    d = L.shape[0]
    out = np.zeros((d * (d + 1) // 2, d, d))
    k = 0
    for i in range(d):
        for j in range(i + 1):
            out[k, i, j] = L[i, i] if i == j else 1.0
            k += 1
    return out


def sigma_derivatives(L: np.ndarray) -> np.ndarray:
    r"""``d Sigma / d psi_k`` for ``Sigma = L L'``: :math:`\dot L_k L' + L \dot L_k'` (:func:`chol_derivatives`).

    Examples
    --------
    >>> sigma_derivatives(np.array([[2.0]]))[0]   # Sigma = exp(2 psi): dSigma/dpsi = 2 Sigma
    array([[8.]])
    """
    L = np.asarray(L, dtype=float)
    dL = chol_derivatives(L)
    return dL @ L.T + L @ np.swapaxes(dL, 1, 2)


def vector_from_chol(L: np.ndarray) -> np.ndarray:
    """Row-wise vector of a lower-triangular ``L`` with its diagonal logged.

    Examples
    --------
    >>> vector_from_chol(np.array([[1.0, 0.0], [0.5, 2.0]])).round(4)
    array([0.    , 0.5   , 0.6931])
    """
    L = np.asarray(L, dtype=float)
    out = []
    for i in range(L.shape[0]):
        for j in range(i + 1):
            out.append(np.log(L[i, i]) if i == j else L[i, j])
    return np.asarray(out, dtype=float)
