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
  ``ln var(u0_j) = s_j' tau`` with school-level ``s_j`` (level-1 columns, varying within a
  school, load ``u0`` row by row: :func:`mlsml.integrand.loaded_Z`). The names ``bsvar:<term>``
  (the ``tau``) replace ``var(u0)`` and come right after the ``scale:`` block. The
  correlations are constant: ``Sigma_j = S_j Sigma0 S_j`` with
  ``S_j = diag(exp(s_j' tau / 2), 1, ..., 1)`` and ``Sigma0[0, 0] = 1``; the reported
  ``cov(u0,e)`` is ``Sigma0[0, e] = cov(u0_j, e_j) / sd(u0_j)``, the covariance of ``e``
  with the standardised intercept effect (MIXREGLS's "Loc Eff" for ``e = v``). On the
  optimiser scale ``tau`` follows ``alpha`` and ``L0[0, 0] = 1`` is not a parameter.

**Association of location and scale** (issue 13; ``association=`` and ``cov_constraints=``
of :func:`mlsml.fit`, see ``docs/model.md``):

- covariances fixed at zero (``fixed_cov``: pairs of school effects): their ``cov(e,f)``
  is not a parameter and is absent from the names. ``association="none"`` fixes every
  ``cov(u*, v*)`` (MIXREGLS ``NCOV = 0``); ``cov_constraints=["cov(u0,u1)"]`` gives
  independent random slopes (lme4's ``||``). The constraint is linear on the
  log-Cholesky scale -- ``Sigma[f, e] = 0`` exactly when ``L[f, e] = 0`` -- when for every
  fixed pair ``(e, f)`` (``e`` before ``f``) and every effect ``c`` before ``e`` the
  pair ``(c, e)`` or ``(c, f)`` is fixed too (:func:`check_cov_constraints`); the
  fixed entries of ``L`` are then simply left out of ``theta``.
- a quadratic effect of the standardised random intercept on the log variance
  (``association="quadratic"``, MIXREGLS ``NCOV = 2``, ``quad_assoc``):
  ``ln var(e_ij) = w_ij' alpha + v_j + gamma (u0_j / sd(u0_j))^2``, named
  ``quad(u0,v)`` (MIXREGLS "Quad Loc"), last in ``theta`` and in the names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd.tracer import isbox

from .errors import ModelSpecError

#: Name of the coefficient of the squared standardised random intercept in the log
#: variance (``association="quadratic"``; MIXREGLS "Quad Loc").
QUAD_NAME = "quad(u0,v)"

#: Prefix of the names of variances (school effects ``var(u0)``, ``var(v)``, ...; stage 2's
#: ``var(resid)``): their Wald intervals are symmetric on the log scale
#: (:func:`wald_intervals`).
VARIANCE_PREFIX = "var("


def is_variance(name: str) -> bool:
    """Whether the parameter ``name`` is a variance (a positive quantity; see :data:`VARIANCE_PREFIX`)."""
    return str(name).startswith(VARIANCE_PREFIX)


def wald_intervals(names, estimates, se, crit) -> tuple[np.ndarray, np.ndarray]:
    r"""Wald intervals, symmetric on the log scale for variances and on the natural scale otherwise.

    For a coefficient or a covariance :math:`\theta` with standard error :math:`s`
    and critical value :math:`c` (``z_{1-\alpha/2}`` or a t quantile):

    .. math:: \hat\theta \pm c\, s .

    For a variance :math:`\sigma^2 > 0` the interval of :math:`\ln\sigma^2`, whose
    delta-method standard error is :math:`s / \hat\sigma^2`, mapped back:

    .. math:: \bigl[\hat\sigma^2 e^{-c s/\hat\sigma^2},\;
              \hat\sigma^2 e^{c s/\hat\sigma^2}\bigr],

    as Stata's ``mixed`` reports variance components. It never includes a negative
    variance, and it covers better where the sampling distribution of
    :math:`\hat\sigma^2` is skewed (few schools, a small variance; validation report,
    section 6). A variance estimated at zero (a boundary fit) has no such interval: NaN.

    Parameters
    ----------
    names : sequence of str
        Parameter names (:func:`is_variance` picks the variances).
    estimates, se : array_like
        Estimates and their standard errors, in the order of ``names``.
    crit : float or array_like
        Critical value(s), one or one per parameter.

    Returns
    -------
    lower, upper : numpy.ndarray
    """
    est = np.asarray(estimates, dtype=float)
    s = np.asarray(se, dtype=float)
    c = np.broadcast_to(np.asarray(crit, dtype=float), est.shape)
    lo, hi = est - c * s, est + c * s
    var = np.array([is_variance(n) for n in names], dtype=bool)
    if var.any():
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            positive = var & (est > 0)
            half = np.where(positive, c * s / np.where(positive, est, 1.0), np.nan)
            lo = np.where(var, np.where(positive, est * np.exp(-half), np.nan), lo)
            hi = np.where(var, np.where(positive, est * np.exp(half), np.nan), hi)
    return lo, hi


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
    fixed_cov: tuple[tuple[int, int], ...] = ()
    quad_assoc: bool = False

    def __post_init__(self):
        if self.fixed_cov:
            check_cov_constraints(self.fixed_cov, self.re_names)
        if self.quad_assoc and not (self.random_scale and self.q >= 1):
            raise ModelSpecError("a quadratic association needs a random intercept u0 and a random scale v")

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
    def uv_pairs(self) -> tuple[tuple[int, int], ...]:
        """Every pair ``(u_a, v_b)`` of a location and a scale effect (the covariances ``association="none"`` fixes)."""
        return tuple((a, self.q + b) for a in range(self.q) for b in range(self.n_v))

    @property
    def association(self) -> str:
        """How the random location enters the log variance: ``"quadratic"`` (``quad(u0,v)``),
        ``"none"`` (every ``cov(u*, v*)`` fixed at zero), else ``"linear"`` (MIXREGLS ``NCOV`` 2, 0, 1)."""
        if self.quad_assoc:
            return "quadratic"
        if self.uv_pairs and set(self.uv_pairs) <= set(self.fixed_cov):
            return "none"
        return "linear"

    @property
    def free_chol(self) -> tuple[int, ...]:
        """Positions in the full row-wise log-Cholesky vector of ``L`` (``d (d + 1) / 2``) that are parameters.

        Left out: ``log L0[0, 0] = 0`` with ``bs_terms`` and ``L[f, e] = 0`` for every pair
        ``(e, f)`` of :attr:`fixed_cov`.
        """
        fixed = {f * (f + 1) // 2 + e for e, f in self.fixed_cov}
        if self.bs_terms:
            fixed.add(0)
        return tuple(i for i in range(self.d * (self.d + 1) // 2) if i not in fixed)

    @property
    def n_chol(self) -> int:
        """Number of log-Cholesky parameters in ``theta``."""
        return len(self.free_chol)

    @property
    def chol_offset(self) -> int:
        """Position of the first log-Cholesky parameter in ``theta`` (after ``beta``, ``alpha``, ``tau``)."""
        return self.p + self.k + self.m

    @property
    def free_cov_pairs(self) -> tuple[tuple[int, int], ...]:
        """The pairs ``(e, f)``, ``e < f``, whose covariance is a parameter, in contract order."""
        fixed = set(self.fixed_cov)
        return tuple((i, j) for i in range(self.d) for j in range(i + 1, self.d) if (i, j) not in fixed)

    @property
    def n_cov(self) -> int:
        """Number of free parameters of ``Sigma`` (of ``tau`` and ``Sigma0`` with ``bs_terms``; with ``quad(u0,v)``)."""
        return self.m + self.n_chol + int(self.quad_assoc)

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
        covs = tuple(f"cov({re[i]},{re[j]})" for i, j in self.free_cov_pairs)
        return variances + covs + ((QUAD_NAME,) if self.quad_assoc else ())

    @property
    def names(self) -> tuple[str, ...]:
        """All natural-scale parameter names in contract order."""
        return tuple(f"mean:{t}" for t in self.mean_terms) + tuple(f"scale:{t}" for t in self.scale_terms) + self.cov_names

    def chol_vector(self, free):
        """The full row-wise log-Cholesky vector from its free entries (zeros at the fixed ones; autograd)."""
        n_full = self.d * (self.d + 1) // 2
        if len(self.free_chol) == n_full:
            return free
        E = np.zeros((n_full, len(self.free_chol)))
        E[list(self.free_chol), np.arange(len(self.free_chol))] = 1.0
        return anp.dot(E, free)

    def chol(self, theta):
        """``L`` (``L0`` with ``bs_terms``) from ``theta`` (autograd)."""
        off = self.chol_offset
        return chol_from_vector(self.chol_vector(theta[off : off + self.n_chol]), self.d)

    def quad(self, theta):
        """``gamma``, the coefficient of ``quad(u0,v)``; ``None`` without a quadratic association."""
        return theta[self.chol_offset + self.n_chol] if self.quad_assoc else None

    def split_bs(self, theta):
        """``(beta, alpha, tau, L0)`` for a model with ``bs_terms`` (``L0[0, 0] = 1``)."""
        beta = theta[: self.p]
        alpha = theta[self.p : self.p + self.k]
        off = self.p + self.k
        tau = theta[off : off + self.m]
        return beta, alpha, tau, self.chol(theta)

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
        return beta, alpha, self.chol(theta)

    def to_natural(self, theta):
        """Map ``theta`` to the natural-scale vector (``beta, alpha, vars, covs``)."""
        pairs = self.free_cov_pairs
        iu = (np.array([i for i, _ in pairs], dtype=int), np.array([j for _, j in pairs], dtype=int))
        quad = [anp.reshape(self.quad(theta), (1,))] if self.quad_assoc else []
        if self.bs_terms:
            beta, alpha, tau, L = self.split_bs(theta)
            sigma = anp.dot(L, L.T)
            cov = sigma[iu] if pairs else anp.zeros(0)
            return anp.concatenate([beta, alpha, tau, anp.diag(sigma)[1:], cov] + quad)
        beta, alpha, L = self.split(theta)
        sigma = anp.dot(L, L.T)
        var = anp.diag(sigma)
        cov = sigma[iu] if pairs else anp.zeros(0)
        return anp.concatenate([beta, alpha, var, cov] + quad)

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
        off = self.chol_offset
        d = self.d
        jac = np.zeros((n, n))
        L = np.asarray(self.chol(theta), dtype=float)
        dS = sigma_derivatives(L, self.free_chol)  # only the free entries are parameters
        diag = np.arange(1, d) if self.bs_terms else np.arange(d)  # var(u0) is replaced by tau
        jac[:off, :off] = np.eye(off)
        iu = (np.array([i for i, _ in self.free_cov_pairs], dtype=int), np.array([j for _, j in self.free_cov_pairs], dtype=int))
        rows = np.concatenate([dS[:, diag, diag], dS[:, iu[0], iu[1]]], axis=1)  # (n_psi, n_cov)
        end = off + self.n_chol
        jac[off:end, off:end] = rows.T
        if self.quad_assoc:
            jac[end, end] = 1.0
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
        pairs = self.free_cov_pairs
        for t, (i, j) in enumerate(pairs):
            sigma[i, j] = sigma[j, i] = natural[off + d + t]
        return sigma

    def natural_quad(self, natural) -> float | None:
        """``quad(u0,v)`` from the natural-scale vector (``None`` without a quadratic association)."""
        return float(natural[self.n_params - 1]) if self.quad_assoc else None

    def theta_from_parts(self, beta, alpha, sigma, tau=None, quad=None) -> np.ndarray:
        """Inverse of :meth:`split` for a positive-definite ``sigma``.

        With ``bs_terms`` give ``tau`` too; ``sigma`` is then ``Sigma0`` (its
        ``[0, 0]`` entry is taken as 1 after rescaling the first row and column).
        Covariances fixed at zero (:attr:`fixed_cov`) are taken as zero (the entries of
        the Cholesky factor they fix are dropped); ``quad`` is ``quad(u0,v)`` (default 0).
        """
        sigma = np.asarray(sigma, dtype=float)
        tail = [np.array([0.0 if quad is None else float(quad)])] if self.quad_assoc else []
        if self.bs_terms:
            s0 = np.sqrt(sigma[0, 0])
            scale = np.ones(self.d)
            scale[0] = 1.0 / s0
            sigma = sigma * np.outer(scale, scale)
        else:
            tau = np.zeros(0)
        sigma = self._constrained(sigma)
        L = np.linalg.cholesky(sigma)
        tau = np.zeros(self.m) if tau is None else np.asarray(tau, float)
        free = vector_from_chol(L)[list(self.free_chol)]
        return np.concatenate([np.asarray(beta, float), np.asarray(alpha, float), tau, free] + tail)

    def _constrained(self, sigma: np.ndarray) -> np.ndarray:
        """``sigma`` with the covariances of :attr:`fixed_cov` set to zero (when it stays positive definite)."""
        if not self.fixed_cov:
            return sigma
        out = sigma.copy()
        for e, f in self.fixed_cov:
            out[e, f] = out[f, e] = 0.0
        try:
            np.linalg.cholesky(out)
        except np.linalg.LinAlgError:
            return sigma  # the dropped Cholesky entries then give a positive-definite projection
        return out


def chol_from_vector(vec, d: int):
    """Lower-triangular ``L`` from its row-wise vector with log diagonal.

    Built without in-place assignment so that autograd can differentiate it; a plain array
    takes a NumPy path with the same values (the traced one cost 0.9 ms per call, a tenth of
    a random-slope fit's time in 43 small schools).

    Examples
    --------
    >>> chol_from_vector(np.array([0.0, 0.5, np.log(2.0)]), 2)
    array([[1. , 0. ],
           [0.5, 2. ]])
    """
    if not isbox(vec):
        vec = np.asarray(vec, dtype=float)
        L = np.zeros((d, d))
        pos = 0
        for i in range(d):
            L[i, :i] = vec[pos : pos + i]
            L[i, i] = np.exp(vec[pos + i])
            L[i, i + 1 :] = 0.0 * vec[pos]  # as the traced path: NaN above a non-finite row
            pos += i + 1
        return L
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


def chol_derivatives(L: np.ndarray, free=None) -> np.ndarray:
    r"""``d L / d psi_k`` for the row-wise log-Cholesky vector ``psi`` of ``L``, shape ``(n_psi, d, d)``.

    .. math:: \frac{\partial L}{\partial\psi_k} = E_{ij}\,(L_{ii} \text{ if } i = j \text{ else } 1)

    for the entry ``(i, j)`` that ``psi_k`` holds (:func:`chol_from_vector` stores the
    diagonal as its log); only the positions ``free`` of that vector when given.

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
    return out if free is None else out[list(free)]


def sigma_derivatives(L: np.ndarray, free=None) -> np.ndarray:
    r"""``d Sigma / d psi_k`` for ``Sigma = L L'``: :math:`\dot L_k L' + L \dot L_k'` (:func:`chol_derivatives`).

    ``free``: the positions of the full log-Cholesky vector that are parameters
    (:attr:`ParamLayout.free_chol`); all by default.

    Examples
    --------
    >>> sigma_derivatives(np.array([[2.0]]))[0]   # Sigma = exp(2 psi): dSigma/dpsi = 2 Sigma
    array([[8.]])
    """
    L = np.asarray(L, dtype=float)
    dL = chol_derivatives(L, free)
    return dL @ L.T + L @ np.swapaxes(dL, 1, 2)


def check_cov_constraints(pairs, re_names) -> None:
    """Refuse covariance constraints that are not linear on the log-Cholesky scale (see the module docstring).

    Parameters
    ----------
    pairs : iterable of (int, int)
        ``(e, f)`` with ``e < f``: ``cov(re_names[e], re_names[f])`` fixed at zero.
    re_names : sequence of str

    Raises
    ------
    ModelSpecError
        A pair out of range or not ordered, or a pattern the log-Cholesky factor cannot
        express by zeros (naming the constraint and the covariances that would also have
        to be fixed).

    Examples
    --------
    >>> check_cov_constraints([(0, 2), (1, 2)], ("u0", "u1", "v"))   # association="none"
    >>> try:
    ...     check_cov_constraints([(1, 2)], ("u0", "u1", "v"))
    ... except ModelSpecError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    cov_constraints: fixing cov(u1,v) at 0 needs cov(u0,u1) or cov(u0,v) fixed at 0 too ...
    """
    d = len(re_names)
    fixed = set()
    for e, f in pairs:
        if not (0 <= e < f < d):
            raise ModelSpecError(f"cov_constraints: ({e}, {f}) is not a pair of school effects e < f of {tuple(re_names)}")
        fixed.add((e, f))
    for e, f in sorted(fixed, key=lambda t: (t[0], t[1])):
        for c in range(e):
            if (c, e) not in fixed and (c, f) not in fixed:
                n = re_names
                raise ModelSpecError(
                    f"cov_constraints: fixing cov({n[e]},{n[f]}) at 0 needs cov({n[c]},{n[e]}) or cov({n[c]},{n[f]}) "
                    "fixed at 0 too (with both free the constraint is not a zero of the Cholesky factor of Sigma, "
                    "whose entries mlsml estimates)"
                )


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


#: The association types of :func:`constrain` (MIXREGLS ``NCOV = 1, 0, 2``).
ASSOCIATIONS = ("linear", "none", "quadratic")


def constrain(layout: ParamLayout, association: str = "linear", cov_constraints=None) -> ParamLayout:
    """``layout`` with an association type and covariances fixed at zero.

    Parameters
    ----------
    layout : ParamLayout
        An unconstrained layout (as :func:`mlsml.design.build_design` makes it).
    association : {"linear", "none", "quadratic"}
        ``"linear"``: ``Sigma`` unstructured (the default, MIXREGLS ``NCOV = 1``);
        ``"none"``: every ``cov(u*, v*)`` fixed at zero (``NCOV = 0``); ``"quadratic"``:
        ``"linear"`` plus ``quad(u0,v)`` (``NCOV = 2``; a random intercept only, and the
        plain random scale ``v``).
    cov_constraints : str or sequence of str, optional
        Names of covariances fixed at zero, e.g. ``["cov(u0,u1)"]`` (either order of the
        two effects); added to those of ``association``.

    Raises
    ------
    ModelSpecError
        An unknown association, a name that is not a covariance of the model (listing
        those that are), an association without a location and a scale effect, or a
        pattern of zeros :func:`check_cov_constraints` refuses.

    Examples
    --------
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=2, random_scale=True)
    >>> constrain(lay, "none").cov_names
    ('var(u0)', 'var(u1)', 'var(v)', 'cov(u0,u1)')
    >>> constrain(lay, cov_constraints="cov(u1,u0)").cov_names
    ('var(u0)', 'var(u1)', 'var(v)', 'cov(u0,v)', 'cov(u1,v)')
    >>> one = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
    >>> constrain(one, "quadratic").cov_names
    ('var(u0)', 'var(v)', 'cov(u0,v)', 'quad(u0,v)')
    """
    if not isinstance(association, str) or association not in ASSOCIATIONS:
        raise ModelSpecError(f"association must be one of {', '.join(map(repr, ASSOCIATIONS))}, not {association!r}")
    fixed = set(layout.fixed_cov)
    if association != "linear" and not layout.uv_pairs:
        raise ModelSpecError(
            f"association={association!r} relates the random location to the random scale: the model needs both "
            "(a random effect in re_formula and random_scale=True)"
        )
    if association == "none":
        fixed |= set(layout.uv_pairs)
    quad = association == "quadratic"
    if quad and (layout.q != 1 or layout.scale_re_terms):
        raise ModelSpecError(
            "association='quadratic' (MIXREGLS NCOV = 2) is defined for one random location effect (re_formula "
            "'~ 1') and the plain random scale v (no scale_re_formula)"
        )
    if cov_constraints is not None:
        items = [cov_constraints] if isinstance(cov_constraints, str) else cov_constraints
        try:
            items = list(items)
        except TypeError:
            raise ModelSpecError(
                f"cov_constraints must be a covariance name or a list of them, e.g. ['cov(u0,u1)'], not {cov_constraints!r}"
            ) from None
        re = layout.re_names
        index = {}
        for i in range(layout.d):
            for j in range(i + 1, layout.d):
                index[f"cov({re[i]},{re[j]})"] = index[f"cov({re[j]},{re[i]})"] = (i, j)
        for item in items:
            key = item.replace(" ", "") if isinstance(item, str) else item
            if key not in index:
                known = [f"cov({re[i]},{re[j]})" for i in range(layout.d) for j in range(i + 1, layout.d)]
                raise ModelSpecError(
                    f"cov_constraints: {item!r} is not a covariance of the model's school effects; "
                    f"they are {known if known else 'none (one school effect)'}"
                )
            fixed.add(index[key])
    pairs = tuple(sorted(fixed))
    if pairs == layout.fixed_cov and quad == layout.quad_assoc:
        return layout
    return dataclasses.replace(layout, fixed_cov=pairs, quad_assoc=quad or layout.quad_assoc)
