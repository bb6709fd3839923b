r"""The integrand of every school: the only module that knows the model class.

The model (school ``j``, student ``i``)

.. math::

    y_{ij} = x_{ij}'\beta + z_{ij}'u_j + e_{ij}, \qquad
    \ln \operatorname{var}(e_{ij}) = w_{ij}'\alpha + g_{ij}'v_j, \qquad
    b_j = (u_j, v_j) \sim N(0, \Sigma_j),

with ``g_ij = 1`` for the plain random scale and ``Sigma_j = D_j Sigma0 D_j``,
``D_j = diag(exp(s_j' tau / 2), 1, ..., 1)`` with a between-school variance model
(``bs_formula``). Level-1 (time-varying) columns of ``bs_formula`` (MIXREGLS's
``u_ij'ALPHA``) load the random intercept row by row: ``z_ij0`` becomes
``z_ij0 exp(s1_ij' tau / 2)`` (:func:`loaded_Z`, ``s1_ij`` the row of
:attr:`mlsml.design.Design.S_level1`), so that the random location of row ``i`` has variance
``exp((s_j + s1_ij)' tau) Sigma0[0, 0]`` while the integration variables stay the school's
effects. The likelihood of school ``j`` is

.. math::

    L_j = \int \exp h_j(b)\, db, \qquad h_j(b) = \log f(y_j \mid b) + \log \phi(b; 0, \Sigma_j).

Two classes give ``log f`` with one interface:

- :class:`SchoolSums` (random intercept and slopes, random scale, ``bs_formula``):
  the conditional density depends on the data only through per-school sums
  (``O(N p)`` per evaluation). With ``c_i = exp(-w_i' alpha)``, ``r_i = y_i - x_i' beta``,

  .. math::

      \log f(y_j \mid u, v) = -\tfrac{n_j}{2} \log 2\pi - \tfrac{A_j}{2} - \tfrac{n_j v}{2}
          - \tfrac{e^{-v}}{2} (S_{0j} - 2u'S_{1j} + u'S_{2j}u),

  ``A_j = sum w_i' alpha``, ``S0 = sum c r^2``, ``S1 = sum c r z``, ``S2 = sum c z z'``.
- :class:`PerObservation` (random slopes in the log variance, ``scale_re_formula``):
  the sums depend on ``v`` through ``exp(-g_i' v)``, so the density is summed over
  observations and nodes (``O(N K d)``, in chunks of :data:`CHUNK` elements).

Each class also gives: the Cholesky factor(s) of the prior (:meth:`Integrand.prior`),
the pieces of the u-exact rule (``log f`` is quadratic in ``u`` given ``v``; the
Gaussian block of :mod:`mlsml.gaussian` integrates ``u`` out), and the numpy
function and derivatives of ``h_j`` for the Newton mode solver of :mod:`mlsml.modes`.
Everything that takes ``theta`` is written in ``autograd.numpy``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval
from numpy.polynomial.hermite_e import hermegauss
from scipy import special

from . import gaussian
from .design import Design
from .errors import ModelSpecError
from .ops import LOG2PI, group_expand, group_sum, logsumexp

#: Largest number of (observation x node) elements held at once by the
#: per-observation likelihood.
CHUNK = 2_000_000

#: With a between-school variance model, ``var(u0_j)`` counts as zero in every school
#: below this fraction of the residual variance.
ZERO_VARIANCE_BS = 1e-6


def bs_zero_variance_reasons(var0_max: float, mean_log_var: float, z0_mean_square: float) -> list[str]:
    r"""The boundary check of a between-school variance model (``bs_formula``): ``var(u0_j)`` zero in every school.

    With :math:`v_{\max} = \max_j \operatorname{var}(u_{0j})` (:meth:`Integrand.u0_variances`),
    the reference :math:`r = e^{\overline{w'\alpha}} / \overline{z_0^2}` (the residual variance at
    the mean log-variance index over the mean square of the random intercept's column), the
    model is at the boundary when :math:`v_{\max} <` :data:`ZERO_VARIANCE_BS` :math:`\, r`.
    Shared by the in-memory integrand and a fit on a Dask cluster (:mod:`mlsml.distributed`,
    whose blocks return their schools' largest ``var(u0_j)``).
    """
    ref = float(np.exp(mean_log_var)) / max(z0_mean_square, 1e-300)
    if var0_max < ZERO_VARIANCE_BS * ref:
        return [f"var(u0_j) is effectively zero in every school (max {var0_max:.3g})"]
    return []


#: Newton iterations, step halvings and the step (in conditional SDs) below which the
#: conditional mode of ``u0`` given ``v`` is final (:func:`conditional_modes_u0`).
INNER_MAXITER = 50
MAX_INNER_HALVINGS = 30
INNER_TOL = 1e-10

#: Two conditional modes of ``u0`` closer than this many conditional SDs are one mode
#: (:meth:`Integrand.log_h_nested`); farther apart the inner rule is placed at both, with
#: balance weights.
INNER_SAME_MODE = 1e-6

#: The u-exact rule takes a school's sums around its own least-squares fit
#: (:meth:`SchoolSums.log_h_uexact`) where ``max_k exp(-v_jk) S0_j`` exceeds this: there the
#: two halves of the exponent, each of order ``exp(-v) S0``, cancel, and their rounding
#: error (``2^-52`` of each) would exceed about ``1e-10``.
CANCELLATION_SCALE = 1e6

#: A school's u-integrated integrand cannot exceed the data's density at the best ``u`` times
#: the prior of ``v``, :math:`g_j(v) \le \sup_u f(y_j \mid u, v)\, p(v)` (the prior of ``u``
#: given ``v`` integrates to one). :meth:`SchoolSums.log_h_uexact` returns NaN at a node whose
#: value is above that bound by more than this relative amount: a cancellation, not a value.
#: (At ``var(u1) = 5e-21`` and ``L[v,v] = 1e-6``, stored fuzz case 8770553538507621726, the
#: far-school path gave ``+7e12`` at 127 points; the bound there is about -4.)
BOUND_RTOL = 1e-8


class Sums(NamedTuple):
    """Sufficient per-school sums for given ``beta`` and ``alpha``."""

    n: np.ndarray  # (J,)
    A: np.ndarray  # (J,)  sum of w'alpha
    S0: np.ndarray  # (J,)
    S1: np.ndarray  # (J, q)
    S2: np.ndarray  # (J, q, q)


class Prior(NamedTuple):
    r"""The prior of the school effects: ``Sigma_j = L_j L_j'`` with ``L_j = D_j L0``.

    Attributes
    ----------
    L0 : array (d, d)
        Cholesky factor of ``Sigma`` (of ``Sigma0`` with a between-school variance model).
    log_sd0 : array (J,) or None
        ``s_j' tau / 2``: ``D_j = diag(exp(log_sd0_j), 1, ..., 1)``; ``None`` without
        ``bs_formula``.
    quad : scalar or None
        ``gamma`` of ``quad(u0,v)`` (``association="quadratic"``), else ``None``.
    row_log_sd0 : array (N,) or None
        ``s1_ij' tau / 2`` of the level-1 columns of ``bs_formula`` (:func:`loaded_Z`);
        ``None`` without them.
    """

    L0: object
    log_sd0: object
    quad: object = None
    row_log_sd0: object = None

    @property
    def chol(self):
        """``L`` of shape ``(d, d)``, or ``(J, d, d)`` with a between-school variance model."""
        if self.log_sd0 is None:
            return self.L0
        J = self.log_sd0.shape[0]
        d = self.L0.shape[0]
        rowscale = anp.concatenate([anp.exp(self.log_sd0)[:, None], anp.ones((J, d - 1))], axis=1)
        return rowscale[:, :, None] * self.L0[None, :, :]


def loaded_Z(design: Design, prior: Prior):
    r"""The random-effects design with the level-1 between-school variance loading (autograd).

    .. math::

        \tilde z_{ij0} = z_{ij0} \exp(s^{(1)\prime}_{ij}\tau / 2), \qquad
        \tilde z_{ijr} = z_{ijr} \ (r > 0),

    so that :math:`\tilde z_{ij}'u_j` has :math:`\operatorname{var}(u_{0j} \tilde z_{ij0}) =
    z_{ij0}^2 \exp((s_j + s^{(1)}_{ij})'\tau)` (``Sigma0[0, 0] = 1``): MIXREGLS's
    :math:`\sqrt{\exp(u_{ij}'\alpha)}\,\theta_{1j}` with ``u0_j`` the school's random location
    where the level-1 covariates are zero. ``design.Z`` itself without level-1 columns.
    """
    if prior.row_log_sd0 is None:
        return design.Z
    col = design.Z[:, 0] * anp.exp(prior.row_log_sd0)
    return anp.concatenate([col[:, None], design.Z[:, 1:]], axis=1) if design.Z.shape[1] > 1 else col[:, None]


def school_sums(beta, alpha, design: Design, Z=None) -> Sums:
    r"""Per-school sums ``n, A, S0, S1, S2`` (see the module docstring).

    ``Z`` replaces ``design.Z`` (the loaded design of :func:`loaded_Z`).

    With level-1 weights :math:`w_i` (:mod:`mlsml.weights`) every observation's term is
    multiplied by its weight: :math:`n_j = \sum_i w_i`, :math:`A_j = \sum_i w_i \eta_i` and
    :math:`c_i` becomes :math:`w_i c_i` in ``S0``, ``S1``, ``S2``, so that ``log f`` below is
    :math:`\sum_i w_i \log f(y_{ij} \mid b)`.
    """
    st, ct = design.starts, design.counts
    eta = design.log_variance_index(alpha)
    c = anp.exp(-eta)
    r = design.y - anp.dot(design.X, beta)
    w = design.weights
    if w is not None:
        c = c * w
    cr = c * r
    Z = design.Z if Z is None else Z
    q = Z.shape[1]
    n = design.counts.astype(float) if w is None else np.add.reduceat(w, st)
    A = group_sum(eta if w is None else w * eta, st, ct)
    S0 = group_sum(cr * r, st, ct)
    if q == 0:  # random scale only: no school effect in the mean
        J = st.shape[0]
        S1 = anp.zeros((J, 0))
        S2 = anp.zeros((J, 0, 0))
    elif q == 1 and isinstance(Z, np.ndarray) and _is_ones(Z):
        S1 = group_sum(cr, st, ct)[:, None]
        S2 = group_sum(c, st, ct)[:, None, None]
    else:
        S1 = group_sum(cr[:, None] * Z, st, ct)
        zz = (Z[:, :, None] * Z[:, None, :]).reshape(Z.shape[0], q * q)
        S2 = anp.reshape(group_sum(c[:, None] * zz, st, ct), (-1, q, q))
    return Sums(n, A, S0, S1, S2)


def _is_ones(Z: np.ndarray) -> bool:
    return bool(Z.shape[1] == 1 and np.all(Z[:, 0] == 1.0))


def log_conditional(b, sums: Sums, q: int, random_scale: bool):
    """``log f(y_j | b_jk)`` from the sums, for nodes ``b`` of shape ``(J, K, d)``; returns ``(J, K)``."""
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
    r"""``log phi(b_jk; 0, L L')`` for ``b`` (J, K, d) and ``L`` (d, d) or (J, d, d); returns ``(J, K)``.

    .. math::

        \log\phi(b; 0, LL') = -\tfrac d2 \log 2\pi - \sum_i \log L_{ii} - \tfrac12 |L^{-1} b|^2

    (forward substitution written out for autograd).
    """
    d = b.shape[-1]
    shared = L.ndim == 2
    xs = []
    for i in range(d):
        acc = b[:, :, i]
        for j in range(i):
            acc = acc - (L[i, j] if shared else L[:, i, j][:, None]) * xs[j]
        xs.append(acc / (L[i, i] if shared else L[:, i, i][:, None]))
    quad = sum(x**2 for x in xs) if d else 0.0 * b[:, :, 0]
    if shared:
        logdet = anp.sum(anp.log(anp.diag(L)))
        return -0.5 * d * LOG2PI - logdet - 0.5 * quad
    logdet = sum(anp.log(L[:, i, i]) for i in range(d))
    return -0.5 * d * LOG2PI - logdet[:, None] - 0.5 * quad


def quad_prior_point(b, prior: Prior, q: int):
    r"""The point of the prior of ``(u, v)`` that the integration variables ``b = (u, w)`` stand for.

    With ``association="quadratic"`` (MIXREGLS ``NCOV = 2``) the school's log variance is

    .. math::

        \ln\sigma^2_{ij} = w_{ij}'\alpha + w_j, \qquad
        w_j = v_j + \gamma\,\theta_{1j}^2, \qquad
        \theta_{1j} = u_{0j} / \operatorname{sd}(u_{0j}) = u_{0j} / L_{j,00},

    (``L_j`` the Cholesky factor of ``Sigma_j``; ``L_00 = exp(s_j'tau/2)`` with a
    between-school variance model). The likelihood integrates over ``(u0, w)`` instead of
    ``(u0, v)`` (the change of variables has Jacobian 1): ``log f(y_j | u0, w)`` is then the
    linear model's, and the prior density is that of ``(u0, v)`` at ``v = w - gamma
    (u0 / L_00)^2``, which this returns (``b`` itself without a quadratic term). So the
    scale effect of a quadratic model's nodes, modes and school predictions is ``w_j``,
    the school's whole shift of the log variance.
    """
    if prior.quad is None:
        return b
    L = prior.chol
    sd0 = L[0, 0] if L.ndim == 2 else L[:, 0, 0][:, None]
    shift = prior.quad * (b[:, :, 0] / sd0) ** 2
    return anp.concatenate([b[:, :, :q], (b[:, :, q] - shift)[:, :, None], b[:, :, q + 1 :]], axis=2)


def quad_curvature(prior: Prior) -> np.ndarray | None:
    """``gamma / sd(u0_j)^2`` (numpy; a scalar or ``(J,)``): the shift of :func:`quad_prior_point` is this times ``u0^2``."""
    if prior.quad is None:
        return None
    L = np.asarray(prior.chol, dtype=float)
    sd0 = L[0, 0] if L.ndim == 2 else L[:, 0, 0]
    return float(prior.quad) / sd0**2


def _prior_precision(prior: Prior):
    """``(P, log|Sigma|)`` of the prior's Cholesky factor ``L0`` (autograd)."""
    L = prior.L0
    Linv = anp.linalg.inv(L)
    return anp.dot(Linv.T, Linv), 2.0 * anp.sum(anp.log(anp.diag(L)))


def conditional_prior(L):
    r"""``(m, K, s2)``: the prior of the school effects written as ``v`` and then ``u`` given ``v`` (autograd).

    With ``Sigma = LL'`` and the scale effect last,
    :math:`L = \begin{pmatrix} L_u & 0 \\ l' & \ell \end{pmatrix}`,

    .. math::

        v \sim N(0, s_2), \quad s_2 = l'l + \ell^2, \qquad
        u \mid v \sim N(m v, KK'), \quad m = \frac{L_u l}{s_2}, \quad
        K = L_u \Big(I - \frac{l l'}{\sigma(\sigma + \ell)}\Big), \quad \sigma = \sqrt{s_2},

    since :math:`(I - \kappa ll')^2 = I - ll'/s_2` for :math:`\kappa = 1/(\sigma(\sigma+\ell))`.
    Nothing here is divided by a small number: at ``|corr(u0, v)| = 1`` (``ell = 0``) ``K`` is
    singular and finite, where ``P = Sigma^{-1}`` has entries of order ``1/ell^2`` (the
    cancellation of :meth:`SchoolSums.log_h_uexact`).
    """
    q = L.shape[0] - 1
    Lu, l, ell = L[:q, :q], L[q, :q], L[q, q]
    s2 = anp.sum(l * l) + ell**2
    n = anp.dot(Lu, l)
    K = Lu - anp.outer(n, l) / (s2 + anp.sqrt(s2) * ell)
    return n / s2, K, s2


def _uexact_terms(s: Sums, v, q: int):
    """``(base, S1, S2)`` of the u-exact rule from the sums (:meth:`Integrand.u_exact_parts`):
    ``log f(y_j | u, v) = base - u'S2 u / 2 + u'S1`` with ``E = exp(-v)`` multiplied in."""
    vv = v[:, :, 0]
    E = anp.exp(-vv)
    n = s.n[:, None]
    base = -0.5 * n * LOG2PI - 0.5 * s.A[:, None] - 0.5 * n * vv - 0.5 * E * s.S0[:, None]
    S1 = [E * s.S1[:, None, a] for a in range(q)]
    S2 = [[E * s.S2[:, None, a, b] for b in range(q)] for a in range(q)]
    return base, S1, S2


def _value(x):
    """The numpy value of a possibly traced (autograd) array: nodes are placed from values, never differentiated."""
    return np.asarray(getval(x), dtype=float)


def conditional_modes_u0(
    integrand: Integrand, theta: np.ndarray, w: np.ndarray, start: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""The mode of ``u0`` given ``w`` and the curvature there, for every school and node (numpy, ``(J, K)`` each).

    For the quadratic association (``q = 1``; :func:`quad_prior_point`) with ``E = e^{-w}``,
    ``Q(u_0) = \sum_i c_i (r_i - u_0)^2`` and the prior at ``(u_0, t)``, ``t = w - a u_0^2``,
    ``a = gamma/sd(u0_j)^2``:

    .. math::

        h(u_0) = -\tfrac E2 Q - \tfrac12 (P_{00} u_0^2 + 2 P_{01} u_0 t + P_{11} t^2), \qquad
        h' = E R - (P_{00} u_0 + P_{01} t) - (P_{01} u_0 + P_{11} t)\, t',

        h'' = -E S_2 - P_{00} - 2 P_{01} t' - P_{11} t'^2 + 2a (P_{01} u_0 + P_{11} t),

    ``t' = -2 a u_0``, ``R = \sum_i c_i (r_i - u_0)``. Newton from ``start`` (default: the
    ``gamma = 0`` conditional mean, exact when ``gamma = 0``), with the Fisher curvature
    (without the last term) where ``h''`` is not negative and steps halved while ``h`` falls,
    until the step is below :data:`INNER_TOL` conditional SDs.
    """
    beta, alpha, prior = integrand.split(theta)
    Zl = _value(loaded_Z(integrand.design, prior))
    s = Sums(*(_value(a) for a in integrand.sums(_value(beta), _value(alpha), Zl)))
    P = integrand.precision(theta)
    P00 = P[0, 0] if P.ndim == 2 else P[:, 0, 0][:, None]
    P01 = P[0, 1] if P.ndim == 2 else P[:, 0, 1][:, None]
    P11 = P[1, 1] if P.ndim == 2 else P[:, 1, 1][:, None]
    a = np.broadcast_to(np.asarray(quad_curvature(prior), dtype=float), (s.n.shape[0],))[:, None]
    cen = centred_sums(integrand.design, _value(beta), _value(alpha), s, Zl)
    S2, uref, Q0, R1 = s.S2[:, 0, 0][:, None], cen.u_ref[:, 0][:, None], cen.Q0[:, None], cen.R1[:, 0][:, None]
    E = np.exp(-w)

    def parts(u):
        d = u - uref
        R = R1 - S2 * d
        Q = Q0 - d * (R1 + R)
        t = w - a * u**2
        tp = -2.0 * a * u
        Pb0, Pb1 = P00 * u + P01 * t, P01 * u + P11 * t
        h = -0.5 * E * Q - 0.5 * (u * Pb0 + t * Pb1)
        g = E * R - Pb0 - Pb1 * tp
        fisher = -(E * S2 + P00 + 2.0 * P01 * tp + P11 * tp**2)
        H = fisher + 2.0 * a * Pb1
        return h, g, np.where(H < 0, H, fisher)

    if start is None:
        u = (E * s.S1[:, 0][:, None] - P01 * w) / (E * S2 + P00)  # the gamma = 0 conditional mean
    else:
        u = np.array(start, dtype=float)
    h, g, H = parts(u)
    for _ in range(INNER_MAXITER):
        step = -g / H
        t = np.ones_like(u)
        for _ in range(MAX_INNER_HALVINGS):
            h_new, g_new, H_new = parts(u + t * step)
            bad = ~(h_new >= h - 1e-12 * np.abs(h))
            if not bad.any():
                break
            t = np.where(bad, 0.5 * t, t)
        u = u + t * step
        h, g, H = h_new, g_new, H_new
        if np.all(np.abs(t * step) * np.sqrt(-H) <= INNER_TOL):
            break
    return u, -parts(u)[2]


def _chunks(counts: np.ndarray, K: int) -> list[tuple[int, int]]:
    """School ranges ``[j0, j1)`` whose rows times ``K`` stay below :data:`CHUNK`."""
    J = counts.shape[0]
    out = []
    j0 = 0
    rows = 0
    for j in range(J):
        if rows and (rows + counts[j]) * K > CHUNK:
            out.append((j0, j))
            j0, rows = j, 0
        rows += int(counts[j])
    out.append((j0, J))
    return out


def chunk_slices(design: Design, K: int):
    """For each chunk of schools: ``j0:j1``, rows ``r0:r1``, the chunk's group starts (relative to ``r0``) and counts."""
    for j0, j1 in _chunks(design.counts, K):
        r0 = int(design.starts[j0])
        r1 = int(design.starts[j1 - 1] + design.counts[j1 - 1])
        yield j0, j1, r0, r1, design.starts[j0:j1] - r0, design.counts[j0:j1]


# ====================================================================== the integrands
class Integrand(ABC):
    """What the likelihood engine needs of a model class (see the module docstring).

    An abstract base: :class:`SchoolSums` and :class:`PerObservation` implement
    :meth:`log_conditional`, :meth:`u_exact_parts` and :meth:`mode_problem`; everything
    else (the prior, ``h_j``, the u-exact integrand) is shared here.

    Parameters
    ----------
    design : Design
    """

    def __init__(self, design: Design):
        self.design = design
        self.layout = design.layout

    @property
    def core(self) -> bool:
        """Whether this is the core model (one ``Sigma``, one plain random scale entering the log
        variance linearly), for which the boundary probes (:mod:`mlsml.boundary`) and the
        quadrature check are defined."""
        return not (self.layout.scale_re_terms or self.layout.bs_terms or self.layout.quad_assoc)

    @property
    def uexact_supported(self) -> bool:
        """Whether the u-exact rule applies: a random scale and a mean effect to integrate out
        (with ``quad(u0,v)`` by the inner rule of :meth:`log_h_nested`)."""
        return bool(self.layout.random_scale and self.layout.q >= 1)

    def school_covariances(self, theta) -> np.ndarray:
        """``Sigma_j`` for every school, shape ``(J, d, d)`` (equal without ``bs_formula``)."""
        _, _, L = self.prior_chol(np.asarray(theta, dtype=float))
        L = np.asarray(L)
        if L.ndim == 2:
            L = np.broadcast_to(L, (self.design.ngroups,) + L.shape)
        return np.einsum("jde,jfe->jdf", L, L)

    def extra_singular_reasons(self, theta) -> list[str]:
        """Boundary checks the core check cannot see.

        With a between-school variance model: ``var(u0_j)`` below
        :data:`ZERO_VARIANCE_BS` of the residual variance in every school.
        """
        lay = self.layout
        if not lay.bs_terms:
            return []
        design = self.design
        natural = np.asarray(lay.to_natural(np.asarray(theta, dtype=float)), dtype=float)
        mean_log_var = float(np.mean(design.log_variance_index(natural[lay.p : lay.p + lay.k])))
        return bs_zero_variance_reasons(float(self.u0_variances(theta).max()), mean_log_var, float(np.mean(design.Z[:, 0] ** 2)))

    def u0_variances(self, theta) -> np.ndarray:
        r"""``var(u0_j)`` of every school (J,), the largest over its rows with level-1 ``bs_formula`` columns.

        :math:`\Sigma_{j,00}\, \max_i e^{s^{(1)\prime}_{ij}\tau}` (the second factor 1 without
        level-1 columns): what :func:`bs_zero_variance_reasons` compares with the residual variance.
        """
        var0 = self.school_covariances(theta)[:, 0, 0]
        _, _, prior = self.split(np.asarray(theta, dtype=float))
        if prior.row_log_sd0 is not None:  # level-1 columns: the largest variance over each school's rows
            var0 = var0 * np.exp(2.0 * np.maximum.reduceat(np.asarray(prior.row_log_sd0, dtype=float), self.design.starts))
        return var0

    # ------------------------------------------------------------ prior
    def split(self, theta):
        """``(beta, alpha, Prior)`` from the optimiser-scale ``theta`` (autograd)."""
        lay = self.layout
        quad = lay.quad(theta)
        if not lay.bs_terms:
            beta, alpha, L = lay.split(theta)
            return beta, alpha, Prior(L, None, quad)
        beta, alpha, tau, L0 = lay.split_bs(theta)
        S1 = self.design.S_level1
        row = None if S1 is None else 0.5 * anp.dot(S1, tau)
        return beta, alpha, Prior(L0, 0.5 * anp.dot(self.design.S, tau), quad, row)

    def prior_chol(self, theta):
        """``(beta, alpha, L)`` with ``L`` of shape ``(d, d)`` or ``(J, d, d)``."""
        beta, alpha, prior = self.split(theta)
        return beta, alpha, prior.chol

    def precision(self, theta) -> np.ndarray:
        """``P_j = Sigma_j^{-1}`` (numpy), shape ``(d, d)`` or ``(J, d, d)``."""
        _, _, L = self.prior_chol(np.asarray(theta, dtype=float))
        L = np.asarray(L)
        Linv = np.linalg.inv(L)
        if L.ndim == 2:
            return Linv.T @ Linv
        return np.einsum("jed,jef->jdf", Linv, Linv)

    # ------------------------------------------------------------ product rule
    @abstractmethod
    def log_conditional(self, beta, alpha, b, Z=None):
        """``log f(y_j | b_jk)`` for nodes ``b`` (J, K, d); returns ``(J, K)`` (``Z``: :func:`loaded_Z`)."""

    def log_h(self, theta, b):
        """``h_j(b_jk) = log f(y_j | b_jk) + log phi(b_jk; 0, Sigma_j)``, shape ``(J, K)``."""
        beta, alpha, prior = self.split(theta)
        return self.log_conditional(beta, alpha, b, loaded_Z(self.design, prior)) + log_prior(
            quad_prior_point(b, prior, self.layout.q), prior.chol
        )

    # ------------------------------------------------------------ u-exact rule
    @abstractmethod
    def u_exact_parts(self, beta, alpha, v, Z=None):
        """Yield ``(j0, j1, base, S1, S2)`` per chunk of schools such that, given ``v`` (J, K, n_v),
        (``Z``: the loaded design of :func:`loaded_Z`, default ``design.Z``)

        ``log f(y_j | u, v) = base - 1/2 u' S2 u + u' S1`` (``S1[a]``, ``S2[a][b]`` arrays ``(j1-j0, K)``).
        """

    def log_h_uexact(self, theta, v):
        r"""``log int exp h_j(u, v) du`` at the nodes ``v`` (J, K, n_v), shape ``(J, K)`` (autograd).

        .. math::

            g_j(v) = \text{base} - \tfrac{d}{2}\log 2\pi - \tfrac12 \log|\Sigma_j| - \tfrac12 v'P_{vv}v
                     + \tfrac q2 \log 2\pi - \tfrac12 \log|M(v)| + \tfrac12 c'M^{-1}c

        with ``M``, ``c`` of :func:`mlsml.gaussian.block_entries`. With the quadratic
        association ``u0`` enters the log variance and the integral over it is not
        Gaussian: :meth:`log_h_nested` computes it by an inner adaptive rule.
        """
        if self.layout.quad_assoc:
            return self.log_h_nested(theta, v)
        beta, alpha, prior = self.split(theta)
        P, logdet_sigma = _prior_precision(prior)
        parts = []
        for j0, j1, base, S1, S2 in self.u_exact_parts(beta, alpha, v, loaded_Z(self.design, prior)):
            prior_v, scale = self._uexact_prior(prior, P, logdet_sigma, v, j0, j1)
            Mx, cx = gaussian.block_entries(S1, S2, P, v[j0:j1], self.layout.q, scale)
            logdetM, quad = gaussian.log_det_and_quad(Mx, cx, closed_form=self.core)
            parts.append(base + prior_v + 0.5 * self.layout.q * LOG2PI - 0.5 * logdetM + 0.5 * quad)
        return parts[0] if len(parts) == 1 else anp.concatenate(parts, axis=0)

    def _uexact_prior(self, prior: Prior, P, logdet_sigma, v, j0: int, j1: int, quadratic: bool = True):
        """``(prior_v, scale)`` of schools ``j0:j1`` for :meth:`log_h_uexact`: the log prior's terms
        in ``v`` (unless not ``quadratic``: then only its constants) and constants, and the
        per-school factor of the precision (``bs_formula``)."""
        q, nv = self.layout.q, self.layout.n_v
        vj = v[j0:j1]
        if not quadratic:
            vPv = 0.0
        elif nv == 1:
            vPv = P[q, q] * vj[:, :, 0] ** 2
        else:
            vPv = anp.einsum("jkv,vw,jkw->jk", vj, P[q:, q:], vj)
        prior_v = -0.5 * (q + nv) * LOG2PI - 0.5 * logdet_sigma - 0.5 * vPv
        scale = None
        if prior.log_sd0 is not None:  # P_j = D_j^-1 P0 D_j^-1, log|Sigma_j| = log|Sigma0| + s_j'tau
            prior_v = prior_v - prior.log_sd0[j0:j1][:, None]
            scale = anp.exp(-prior.log_sd0[j0:j1])[:, None]
        return prior_v, scale

    def log_h_nested(self, theta, v, npoints: int | None = None):
        r"""``log int exp h_j(u0, w) du0`` at the nodes ``w`` (J, K, 1) by an inner adaptive rule (autograd).

        For the quadratic association (one mean effect ``u0``; the scale effect is the
        school's whole log-variance shift ``w``, :func:`quad_prior_point`): for every school
        ``j`` and node ``w_k`` the conditional mode ``m_jk`` of ``h_j(., w_k)`` and the curvature
        ``c_jk = -d^2 h_j / du0^2`` there (:func:`conditional_modes_u0`, numpy, from the
        values of ``theta``: the nodes are held fixed, as the outer ones are) centre and
        scale a Gauss-Hermite rule of ``npoints`` points (default: as many as the outer rule
        has, the fit's ``nagq``, so that the quadrature check's ``2 nagq + 1`` points test both):

        .. math::

            g_j(w_k) \approx -\tfrac12 \log c_{jk}
                + \operatorname{lse}_l\{h_j(m_{jk} + c_{jk}^{-1/2} z_l,\, w_k) + \log\tilde w_l\}.

        The inner rule's size: the integrand is Gaussian in ``u0`` when ``quad(u0,v) = 0``
        (exact with one point). On riesby (clusters of 4 to 6 and a large random scale, the
        hardest reference; at MIXREGLS's NCOV = 2 estimates, 21 outer points) 9 inner points
        were 2.1e-5 from the limit, 11 points 8e-7, 15 points 1e-9 (the limit is 1.7e-7 from
        the 100-point product rule).

        Given ``w`` the data's density is Gaussian in ``u0`` (the linear model's) and only the
        prior, ``N(w; E(v | u0) + a u0^2, var(v | u0))`` in ``u0``, is not: with ``gamma = 0``
        this is exactly :meth:`log_h_uexact`'s ``g_j`` (any ``npoints``), and the outer rule
        over ``w`` is the u-exact rule's.

        ``gamma theta1^2`` is even in ``u0``, so a school with a large variance and a middling
        mean can have two conditional modes of opposite sign (one school of 150 in a
        simulation with ``gamma = 0.8``, ``var(v) = 0.1``: the rule at one mode missed 0.15 of
        its log-likelihood). Newton is also started from ``-m_jk``; where it ends elsewhere
        (:data:`INNER_SAME_MODE`) the rule is placed at both modes ``A``, ``B`` and each node
        weighted by :math:`q_A/(q_A + q_B)` (``q`` the normal densities of the two Laplace
        approximations: a partition of unity, so no mass is counted twice).
        """
        J, K = v.shape[:2]
        npoints = K if npoints is None else int(npoints)  # as many points in u0 as in w (the rule's nagq)
        th, wv = _value(theta), _value(v)[:, :, 0]
        mode, curv = conditional_modes_u0(self, th, wv)
        # gamma theta1^2 is even in u0: a school whose variance is large and whose mean is
        # middling has a mirror mode at the other sign of u0. Newton from -mode finds it
        mirror, mcurv = conditional_modes_u0(self, th, wv, start=-mode)
        z, w = hermegauss(npoints)
        logw = np.log(w) + 0.5 * z**2
        two = np.abs(mirror - mode) * np.sqrt(np.maximum(curv, mcurv)) > INNER_SAME_MODE
        centres = [(mode, curv)] + ([(mirror, mcurv)] if two.any() else [])
        terms = []
        for m, c in centres:
            scale = 1.0 / np.sqrt(c)
            u0 = m[:, :, None] + scale[:, :, None] * z[None, None, :]  # (J, K, L)
            b = anp.concatenate(
                [u0.reshape(J, K * npoints, 1), anp.reshape(anp.repeat(v, npoints, axis=1), (J, K * npoints, 1))], axis=2
            )
            h = anp.reshape(self.log_h(theta, b), (J, K, npoints)) + logw[None, None, :] + np.log(scale)[:, :, None]
            if len(centres) == 2:  # balance weights q_A / (q_A + q_B): a partition of unity, no mass counted twice
                lq = [-0.5 * cc[:, :, None] * (u0 - mm[:, :, None]) ** 2 + 0.5 * np.log(cc)[:, :, None] for mm, cc in centres]
                own = lq[0] if m is mode else lq[1]
                h = h + own - np.logaddexp(lq[0], lq[1])
            terms.append(h)
        return logsumexp(anp.concatenate(terms, axis=2) if len(terms) == 2 else terms[0], axis=2)

    def conditional_u(self, theta, v) -> tuple[np.ndarray, np.ndarray]:
        r"""``M(v)`` and ``c(v)`` of the u-exact rule at the nodes ``v`` (J, K, n_v) (numpy).

        Given ``v`` the mean effects are Gaussian a posteriori,

        .. math::

            u \mid v, y_j \sim N(M(v)^{-1} c(v),\, M(v)^{-1}),

        with the same ``M`` and ``c`` as :meth:`log_h_uexact` integrates
        (:func:`mlsml.gaussian.block_entries`; per-school precision with ``bs_formula``).

        Returns
        -------
        M : ndarray (J, K, q, q)
        c : ndarray (J, K, q)
        """
        lay = self.layout
        if lay.quad_assoc:
            raise ModelSpecError(
                "u | v, y is not normal with association='quadratic' (u0 enters the log variance); "
                "use the posterior summaries of res.random_effects()"
            )
        q = lay.q
        v = np.asarray(v, dtype=float)
        J, K = v.shape[:2]
        beta, alpha, prior = self.split(np.asarray(theta, dtype=float))
        M = np.zeros((J, K, q, q))
        c = np.zeros((J, K, q))
        if q == 0:
            return M, c
        L = np.asarray(prior.L0, dtype=float)
        Linv = np.linalg.inv(L)
        P = Linv.T @ Linv
        for j0, j1, _base, S1, S2 in self.u_exact_parts(beta, alpha, v, loaded_Z(self.design, prior)):
            scale = None if prior.log_sd0 is None else np.exp(-np.asarray(prior.log_sd0)[j0:j1])[:, None]
            Mx, cx = gaussian.block_entries(S1, S2, P, v[j0:j1], q, scale)
            for a in range(q):
                c[j0:j1, :, a] = cx[a]
                for b in range(q):
                    M[j0:j1, :, a, b] = Mx[a][b]
        return M, c

    # ------------------------------------------------------------ modes
    @abstractmethod
    def mode_problem(self, theta):
        """The numpy function ``h_j`` and its derivatives for :func:`mlsml.modes.posterior_modes`."""


class SchoolSums(Integrand):
    """Random intercept and slopes, random scale, between-school variance: per-school sums."""

    def sums(self, beta, alpha, Z=None) -> Sums:
        """The per-school sums at ``beta``, ``alpha`` (:func:`school_sums`): all the data the
        likelihood sees, which is why its Hessian can be chained through them (:mod:`mlsml.derivatives`;
        not with level-1 ``bs_formula`` columns, whose loaded ``Z`` depends on ``tau``)."""
        return school_sums(beta, alpha, self.design, Z)

    @property
    def through_sums(self) -> bool:
        """Whether ``theta`` reaches the data only through :meth:`sums` of ``(beta, alpha)`` (the
        chain rule of :func:`mlsml.derivatives.sums_hessian`): not with level-1 ``bs_formula``
        columns (:func:`loaded_Z` depends on ``tau``)."""
        return self.design.S_level1 is None

    def log_conditional(self, beta, alpha, b, Z=None):
        lay = self.layout
        return log_conditional(b, self.sums(beta, alpha, Z), lay.q, lay.random_scale)

    def u_exact_parts(self, beta, alpha, v, Z=None):
        yield (0, self.design.ngroups) + _uexact_terms(self.sums(beta, alpha, Z), v, self.layout.q)

    def log_h_uexact(self, theta, v):
        r"""``log int exp h_j(u, v) du`` at the nodes ``v`` (J, K, 1), without cancellation (autograd).

        Without a between-school variance model the schools near their nodes take the prior of
        ``u`` given ``v`` (:meth:`_conditional_uexact`: no precision matrix, so nothing
        cancels near ``|corr(u0, v)| = 1``); with one, :meth:`Integrand.log_h_uexact`'s
        arithmetic. The schools far from their nodes (:meth:`_far`: ``E S_0`` or
        ``E v^2 m'S_2 m`` above :data:`CANCELLATION_SCALE`) take the sums about their own
        fit. There the exponent
        ``-E S_0/2 + c'M^{-1}c/2`` (``E = e^{-v}``) is a difference of two numbers of order
        ``E S_0``. Where a school has fewer distinct rows than mean effects (one pupil, a random
        intercept and slope) ``S_2`` is singular, the difference is of order one however large
        ``E``, and the rounding error of each half (``E`` up to ``1e26`` at the far nodes of a
        large ``var(v)``) makes the integrand ``+5e24`` instead of ``-57,858``
        (docs/failures.md, 326285836212315627). For those schools the sums are taken around
        the school's own weighted least-squares fit ``u_r = S_2^+ S_1`` (fixed numbers, so the
        identity below is exact and its derivatives are those of the sums):

        .. math::

            S_{0c} = \sum_i d_i (r_i - z_i'u_r)^2 \ge 0, \qquad S_{1c} = S_1 - S_2 u_r, \qquad
            g = E S_{1c} - P_{uu} u_r - P_{uv} v,

            -\tfrac12 E S_0 + \tfrac12 c'M^{-1}c
                = \max_u \big\{-\tfrac12 E\,Q(u) - \tfrac12 u'P_{uu}u - u'P_{uv}v\big\}, \qquad
            Q(u) = \sum_i d_i (r_i - z_i'u)^2,

        taken at the maximiser :math:`\hat u = u_r + \delta`, :math:`\delta = M^{-1}g`, with
        :math:`Q(\hat u) = S_{0c} - 2\delta'S_{1c} + \delta'S_2\delta` and the prior's exponent
        whitened, :math:`[\hat u; v]'P[\hat u; v] = |L_0^{-1}F[\hat u; v]|^2`: every term is
        non-negative and of the size of the result. (Written as
        :math:`-\tfrac12 E S_{0c} - \tfrac12 u_r'P_{uu}u_r - u_r'P_{uv}v + \tfrac12 g'M^{-1}g`
        instead, the second and fourth terms cancel where :math:`P_{uu}` is huge: at
        ``var(u0) = 1.6e-13``, ``corr(u0, v) = 0.9999`` both were ``6e15`` and a one-pupil
        school's integrand was 3 units off, docs/failures.md, 1478415917575154483.)
        :math:`S_{0c}` and :math:`S_{1c}` come from the rows (their values; their derivatives from
        the identities :math:`S_{0c} = S_0 - 2u_r'S_1 + u_r'S_2u_r`, :math:`S_{1c} = S_1 - S_2u_r`),
        and for two mean effects

        .. math::

            |M| = |P_{uu}| + E\,\mathrm{tr}(\mathrm{adj}(P_{uu}) S_2) + E^2 |S_2|,

        a sum of non-negative terms, with :math:`|S_2| = S_{2,00} \sum_i d_i (z_{i1} - b z_{i0})^2`,
        :math:`b = S_{2,01}/S_{2,00}`, from the rows; :math:`\delta` by elimination, whose pivot
        :math:`|M|/m_{00}` comes from that stable :math:`|M|`, and
        :math:`\delta'S_2\delta = S_{2,00}(\delta_0 + b\delta_1)^2 + \delta_1^2 |S_2|/S_{2,00}`.
        Other classes (quadratic association, more than two mean effects, several scale
        effects) use the inherited arithmetic.
        """
        lay = self.layout
        q = lay.q
        if lay.quad_assoc or q not in (1, 2) or lay.n_v != 1:
            return super().log_h_uexact(theta, v)
        beta, alpha, prior = self.split(theta)
        Z = loaded_Z(self.design, prior)
        s = self.sums(beta, alpha, Z)
        P, logdet_sigma = _prior_precision(prior)
        J = self.design.ngroups
        far = self._far(s, prior, v)
        near, idx = np.flatnonzero(~far), np.flatnonzero(far)
        parts = []
        if near.size:
            s_near = Sums(*(a[near] for a in s)) if idx.size else s
            v_near = v[near] if idx.size else v
            if prior.log_sd0 is None:
                parts.append(self._conditional_uexact(s_near, prior.L0, v_near))
            else:  # a between-school variance model: the precision scaled school by school
                prior_v, scale = self._uexact_prior(prior, P, logdet_sigma, v, 0, J)
                if idx.size:
                    prior_v, scale = prior_v[near], scale[near]
                base, S1, S2 = _uexact_terms(s_near, v_near, q)
                Mx, cx = gaussian.block_entries(S1, S2, P, v_near, q, scale)
                logdetM, quad = gaussian.log_det_and_quad(Mx, cx, closed_form=self.core)
                parts.append(base + prior_v + 0.5 * q * LOG2PI - 0.5 * logdetM + 0.5 * quad)
        if not idx.size:
            return self._possible(s, prior, v, parts[0])
        # the prior's constants only: _centred_uexact has its whole exponent, whitened
        constants, scale = self._uexact_prior(prior, P, logdet_sigma, v, 0, J, quadratic=False)
        constants = constants + np.zeros((J, 1))
        centred = self._centred_uexact(beta, alpha, Z, s, prior, P, None if scale is None else scale[idx], v, idx)
        parts.append(centred + constants[idx] + 0.5 * q * LOG2PI)
        order = np.argsort(np.concatenate([near, idx]))
        return self._possible(s, prior, v, anp.concatenate(parts, axis=0)[order])

    def _possible(self, s: Sums, prior: Prior, v, value):
        r"""``value`` (J, K) of :meth:`log_h_uexact`, NaN where it exceeds its upper bound.

        Since the prior of ``u`` given ``v`` integrates to one and :math:`Q(u) \ge 0`,

        .. math::

            \log g_j(v) \le -\tfrac{n_j}{2}\log 2\pi - \tfrac12 A_j - \tfrac{n_j}{2} v
                - \tfrac12\log(2\pi s_2) - \frac{v^2}{2 s_2}

        (:func:`conditional_prior`'s ``s2``; with a between-school variance model ``s2``
        varies by school and no bound is applied). A value above it by more than
        :data:`BOUND_RTOL` is the rounding of cancelling terms, never a likelihood: NaN, which
        the optimiser treats as a failed evaluation and the fit's checks as an inaccurate rule.
        """
        if prior.log_sd0 is not None:
            return value
        vv = _value(v)[:, :, 0]
        n, A = _value(s.n)[:, None], _value(s.A)[:, None]
        s2 = float(_value(conditional_prior(_value(prior.L0))[2]))
        with np.errstate(all="ignore"):
            bound = -0.5 * n * (LOG2PI + vv) - 0.5 * A - 0.5 * (LOG2PI + np.log(s2)) - 0.5 * vv**2 / s2
            above = _value(value) > bound + BOUND_RTOL * (1.0 + np.abs(bound))
        return anp.where(above, np.nan, value) if np.any(above) else value

    def _far(self, s: Sums, prior: Prior, v) -> np.ndarray:
        r"""The schools (J,) that :meth:`log_h_uexact` takes about their own fit (numpy).

        Those where, at some node, :math:`E\,(S_0 + v^2 m'S_2 m)` exceeds
        :data:`CANCELLATION_SCALE` (``m`` of :func:`conditional_prior`): the exponent's terms are
        of order :math:`E S_0` and :math:`E\,\hat u'S_2\hat u`, and the maximiser :math:`\hat u`
        is near the prior's mean ``m v`` in the directions the school's rows leave free (one
        pupil and a random slope), where the rounding of ``S2`` (not exactly of rank one) times
        :math:`E|mv|^2` (``2e11`` at ``v = -20``, ``|corr(u0, v)| = 1``) was 2e-5 of the value.
        """
        vv = _value(v)[:, :, 0]
        E = np.exp(-vv)
        S2 = _value(s.S2)
        if prior.log_sd0 is None:
            m = np.asarray(_value(conditional_prior(_value(prior.L0))[0]), dtype=float)
            mS2m = np.einsum("a,jab,b->j", m, S2, m)
        else:  # the precision form for the near schools (bs_formula): as before
            mS2m = np.zeros(S2.shape[0])
        scale = np.abs(_value(s.S0))[:, None] + vv**2 * np.abs(mS2m)[:, None]
        return np.max(E * scale, axis=1) > CANCELLATION_SCALE

    def _conditional_uexact(self, s: Sums, L0, v):
        r""":meth:`log_h_uexact` of schools not far from their nodes, by the prior of ``u`` given ``v``.

        With :func:`conditional_prior`'s ``m``, ``K``, ``s2`` and ``u = m v + K\eta``,
        :math:`\eta \sim N(0, I)`, the exponent in :math:`\eta` is
        :math:`-\tfrac12 E\,Q(m v + K\eta) - \tfrac12|\eta|^2` with
        :math:`Q(u) = S_0 - 2u'S_1 + u'S_2u`, maximised at
        :math:`\hat\eta = A^{-1}b`, :math:`b = E K'(S_1 - S_2 m v)`, :math:`A = I + E K'S_2K`, so

        .. math::

            g_j(v) = \text{base}' - \tfrac12 E\,Q(\hat u) - \tfrac12|\hat\eta|^2 - \tfrac12\log|A|
                     - \tfrac12\log(2\pi s_2) - \frac{v^2}{2 s_2}, \qquad \hat u = m v + K\hat\eta

        (``base'`` the constants and :math:`-\tfrac12(A_j + n_j v)`), taken at the maximiser: as
        :math:`a_0 + \tfrac12 b'A^{-1}b` the two halves are of order :math:`E\,Q(mv)`, large where
        the prior's mean ``m v`` is far from the school's data. No entry of ``P = Sigma^{-1}`` appears: near
        :math:`|\operatorname{corr}(u_0, v)| = 1` with :math:`\operatorname{var}(v \mid u)`
        tiny, ``P_vv`` is huge and the precision form's :math:`v'P_{vv}v/2` (1e13 at
        :math:`\log L_{vv} = -15`) cancelled against :math:`c'M^{-1}c/2`, 0.017 off. For two
        mean effects :math:`|A| = 1 + \operatorname{tr}B + |K|^2 E^2|S_2|` (:math:`B = E K'S_2K`),
        non-negative terms, and :math:`b'A^{-1}b` by elimination.
        """
        q = self.layout.q
        m, K, s2 = conditional_prior(L0)
        base, S1, S2 = _uexact_terms(s, v, q)  # S1, S2 times E = exp(-v); base has -E S0 / 2
        vv = v[:, :, 0]
        mv = [m[a] * vv for a in range(q)]
        r0 = [S1[a] - sum(S2[a][b] * mv[b] for b in range(q)) for a in range(q)]
        b = [sum(K[a, c] * r0[a] for a in range(q)) for c in range(q)]
        S2K = [[sum(S2[a][e] * K[e, c] for e in range(q)) for c in range(q)] for a in range(q)]
        B = [[sum(K[a, c] * S2K[a][d] for a in range(q)) for d in range(q)] for c in range(q)]
        if q == 1:
            logdetA = anp.log(1.0 + B[0][0])
            eta = [b[0] / (1.0 + B[0][0])]
        else:
            detK = K[0, 0] * K[1, 1] - K[0, 1] * K[1, 0]
            detA = 1.0 + B[0][0] + B[1][1] + detK**2 * (S2[0][0] * S2[1][1] - S2[0][1] ** 2)
            logdetA = anp.log(detA)
            a00 = 1.0 + B[0][0]
            eta1 = (b[1] - B[0][1] / a00 * b[0]) * a00 / detA  # elimination, the pivot |A| / a00
            eta = [(b[0] - B[0][1] * eta1) / a00, eta1]
        # the exponent at its maximiser u_hat = m v + K eta_hat, -E Q(u_hat)/2 - |eta_hat|^2/2:
        # written as a0 + b'A^{-1}b/2, both halves are of order E Q(m v) where the prior's mean
        # m v is far from the school's data (1e10 at v = -20), and cancel
        u = [mv[a] + sum(K[a, c] * eta[c] for c in range(q)) for a in range(q)]
        fit = sum(u[a] * (S1[a] - 0.5 * sum(S2[a][e] * u[e] for e in range(q))) for a in range(q))
        return base + fit - 0.5 * sum(e * e for e in eta) - 0.5 * logdetA - 0.5 * (LOG2PI + anp.log(s2)) - 0.5 * vv**2 / s2

    def _centred_uexact(self, beta, alpha, Z, s: Sums, prior: Prior, P, scale, v, idx: np.ndarray):
        """The data's part of :meth:`log_h_uexact` for the schools ``idx``, from sums around each
        school's least-squares fit (see there); shape ``(len(idx), K)``."""
        q = self.layout.q
        design = self.design
        # numpy: the reference fits and the centred sums' values, from the schools' rows
        S1v, S2v = _value(s.S1)[idx], _value(s.S2)[idx]
        if q == 1:
            u_ref = np.where(S2v[:, 0, :] > 0, S1v / np.where(S2v[:, 0, :] > 0, S2v[:, 0, :], 1.0), 0.0)
        else:
            u_ref = np.einsum("jab,jb->ja", np.linalg.pinv(S2v), S1v)
        u_ref = np.where(np.isfinite(u_ref), u_ref, 0.0)
        counts = design.counts[idx]
        rows = np.concatenate([np.arange(design.starts[j], design.starts[j] + design.counts[j]) for j in idx])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        Zr = _value(Z)[rows]
        d = np.exp(-np.asarray(design.log_variance_index(_value(alpha)), dtype=float)[rows])
        if design.weights is not None:
            d = d * design.weights[rows]
        e = design.y[rows] - design.X[rows] @ _value(beta) - np.einsum("nq,nq->n", Zr, np.repeat(u_ref, counts, axis=0))
        s0c_rows = np.add.reduceat(d * e * e, starts)
        s1c_rows = np.add.reduceat((d * e)[:, None] * Zr, starts, axis=0)
        # autograd: the centred sums as functions of the sums (exact for fixed u_ref), valued from the rows
        S0, S1, S2 = s.S0[idx], s.S1[idx], s.S2[idx]
        S2u = [sum(S2[:, a, b] * u_ref[:, b] for b in range(q)) for a in range(q)]
        # S1c from the sums carries rounding of order eps |S2 u_ref| in every direction, also across
        # the rows' span where M is small, so its value too is taken from the rows (along z_i only)
        S1c = [S1[:, a] - S2u[a] for a in range(q)]
        S1c = [s1c_rows[:, a] + (S1c[a] - _value(S1c[a])) for a in range(q)]
        S0c = S0 - 2.0 * sum(u_ref[:, a] * S1[:, a] for a in range(q)) + sum(u_ref[:, a] * S2u[a] for a in range(q))
        # x - value(x) is exactly 0 (its derivative that of x), so the value is exactly the rows';
        # x + (rows - value(x)) kept x's rounding, eps |S0| against a centred S0c of order
        # eps^2 |S0| in a one-pupil school, and E = exp(-v) up to 1e43 at far nodes made it
        # log h = +5e7 with numpy 1.24 (tests/test_optimize.py, the var(v) = 53 start)
        S0c = s0c_rows + (S0c - _value(S0c))
        f = [anp.ones((idx.size, 1))] * q if scale is None else [scale] + [anp.ones((idx.size, 1))] * (q - 1)
        Puu = [[P[a, b] * f[a] * f[b] for b in range(q)] for a in range(q)]  # (J', 1) each
        Puv = [P[a, q] * f[a] for a in range(q)]
        vv = v[idx][:, :, 0]
        E = anp.exp(-vv)
        ur = [u_ref[:, a][:, None] for a in range(q)]
        Pu = [sum(Puu[a][b] * ur[b] for b in range(q)) for a in range(q)]
        g = [E * S1c[a][:, None] - Pu[a] - Puv[a] * vv for a in range(q)]
        m = [[E * S2[:, a, b][:, None] + Puu[a][b] for b in range(q)] for a in range(q)]
        # the maximiser u_hat = u_r + delta of the exponent in u, delta = M^{-1} g
        if q == 1:
            logdetM = anp.log(m[0][0])
            delta = [g[0] / m[0][0]]
            # delta'S2 delta, a single non-negative term
            s2_form = S2[:, 0, 0][:, None] * delta[0] ** 2
        else:
            z0, z1 = Zr[:, 0], Zr[:, 1]
            slope = np.where(S2v[:, 0, 0] > 0, S2v[:, 0, 1] / np.where(S2v[:, 0, 0] > 0, S2v[:, 0, 0], 1.0), 0.0)
            det_rows = S2v[:, 0, 0] * np.add.reduceat(d * (z1 - np.repeat(slope, counts) * z0) ** 2, starts)
            detS2 = S2[:, 0, 0] * S2[:, 1, 1] - S2[:, 0, 1] ** 2
            detS2 = det_rows + (detS2 - _value(detS2))
            detP = Puu[0][0] * Puu[1][1] - Puu[0][1] ** 2
            trace = Puu[1][1] * S2[:, 0, 0][:, None] - 2.0 * Puu[0][1] * S2[:, 0, 1][:, None] + Puu[0][0] * S2[:, 1, 1][:, None]
            det = detP + E * trace + E**2 * detS2[:, None]
            logdetM = anp.log(det)
            # M delta = g by elimination, with the pivot m11 - m01^2/m00 = |M|/m00 from the stable |M|
            delta1 = (g[1] - m[0][1] / m[0][0] * g[0]) * m[0][0] / det
            delta = [(g[0] - m[0][1] * delta1) / m[0][0], delta1]
            # delta'S2 delta = S2_00 (delta0 + b delta1)^2 + |S2|/S2_00 delta1^2 (b = S2_01/S2_00):
            # non-negative terms; expanded, E S2_00 delta0^2 and its partners (E up to 1e26 where
            # S2 is singular) would cancel
            s00 = S2[:, 0, 0][:, None]
            pos = S2v[:, 0, 0] > 0
            ratio = anp.where(pos[:, None], S2[:, 0, 1][:, None] / anp.where(pos[:, None], s00, 1.0), 0.0)
            pivot = anp.where(pos[:, None], detS2[:, None] / anp.where(pos[:, None], s00, 1.0), S2[:, 1, 1][:, None])
            s2_form = s00 * (delta[0] + ratio * delta[1]) ** 2 + pivot * delta[1] ** 2
        # the residual sum at u_hat, Q = S0c - 2 delta'S1c + delta'S2 delta (S1c is zero up to rounding)
        resid = S0c[:, None] - 2.0 * sum(delta[a] * S1c[a][:, None] for a in range(q)) + s2_form
        # the prior's whole exponent at (u_hat, v), whitened: |L0^{-1} F (u_hat, v)|^2, F = diag(f)
        # (the caller adds only the prior's constants: adding back P_vv v^2 / 2 here and taking it
        # off there cancelled 1e13 against 1e13 where var(v | u) is tiny)
        Linv = anp.linalg.inv(prior.L0)
        x = [(ur[a] + delta[a]) * f[a] for a in range(q)] + [vv]
        white = sum(sum(Linv[a, b] * x[b] for b in range(a + 1)) ** 2 for a in range(q + 1))
        n = s.n[idx][:, None]
        base = -0.5 * n * LOG2PI - 0.5 * s.A[idx][:, None] - 0.5 * n * vv
        return base - 0.5 * E * resid - 0.5 * white - 0.5 * logdetM

    def mode_problem(self, theta):
        lay = self.layout
        beta, alpha, prior = self.split(np.asarray(theta, dtype=float))
        beta, alpha = np.asarray(beta, dtype=float), np.asarray(alpha, dtype=float)
        Z = np.asarray(loaded_Z(self.design, prior), dtype=float)
        s = Sums(*(np.asarray(a, dtype=float) for a in self.sums(beta, alpha, Z)))
        centred = centred_sums(self.design, beta, alpha, s, Z) if lay.q else None
        return SumsModeProblem(s, self.precision(theta), lay.q, lay.random_scale, centred, quad_curvature(prior))


class PerObservation(Integrand):
    """Random slopes in the log variance (``scale_re_formula``): summed over observations."""

    @property
    def uexact_supported(self) -> bool:
        """Always: the scale effects are there, and without a mean effect the rule is the
        product rule over ``v`` on the u-exact path."""
        return True

    def log_conditional(self, beta, alpha, b, Z=None):
        design = self.design
        Z = design.Z if Z is None else Z
        q = self.layout.q
        eta = design.log_variance_index(alpha)
        r = design.y - anp.dot(design.X, beta)
        G = design.G
        w = design.weights
        parts = []
        for j0, j1, r0, r1, st, cnt in chunk_slices(design, b.shape[1]):
            bg = group_expand(b[j0:j1], st, cnt)  # (n, K, d)
            zu = anp.einsum("nkq,nq->nk", bg[:, :, :q], Z[r0:r1])
            gv = anp.einsum("nkv,nv->nk", bg[:, :, q:], G[r0:r1])
            e = r[r0:r1][:, None] - zu
            lv = eta[r0:r1][:, None] + gv
            ll = -0.5 * (LOG2PI + lv + anp.exp(-lv) * e**2)
            if w is not None:  # level-1 weights: each observation's log-density times its weight
                ll = ll * w[r0:r1][:, None]
            parts.append(group_sum(ll, st, cnt))
        return parts[0] if len(parts) == 1 else anp.concatenate(parts, axis=0)

    def u_exact_parts(self, beta, alpha, v, Z=None):
        design = self.design
        q = self.layout.q
        eta = design.log_variance_index(alpha)
        r = design.y - anp.dot(design.X, beta)
        G, Z = design.G, (design.Z if Z is None else Z)
        w = design.weights
        nv = G.shape[1]
        for j0, j1, r0, r1, st, cnt in chunk_slices(design, v.shape[1]):
            Gc, Zc = G[r0:r1], Z[r0:r1]
            wc = None if w is None else w[r0:r1]
            # lv = eta + g'v row by row, one (rows x nodes) array per scale effect (a column of
            # ones is not multiplied); its school sums from the per-school sums of eta and g
            # (weighted by the level-1 weights, which also multiply exp(-lv))
            lv = eta[r0:r1][:, None]
            sum_lv = group_sum(eta[r0:r1] if wc is None else wc * eta[r0:r1], st, cnt)[:, None]
            for t in range(nv):
                vt = v[j0:j1, :, t]
                gt = Gc[:, t]
                ex = group_expand(vt, st, cnt)
                lv = lv + (ex if _all_ones(gt) else ex * gt[:, None])
                sum_lv = sum_lv + group_sum(gt if wc is None else wc * gt, st, cnt)[:, None] * vt
            a = anp.exp(-lv)
            if wc is not None:
                a = a * wc[:, None]
            rr = r[r0:r1][:, None]
            ar = a * rr
            S0 = group_sum(ar * rr, st, cnt)
            S1 = [group_sum(_times_column(ar, Zc[:, i]), st, cnt) for i in range(q)]
            S2 = [[group_sum(_times_column(a, Zc[:, i] * Zc[:, k]), st, cnt) for k in range(q)] for i in range(q)]
            n = (cnt.astype(float) if wc is None else np.add.reduceat(wc, st))[:, None]
            base = -0.5 * n * LOG2PI - 0.5 * sum_lv - 0.5 * S0
            yield j0, j1, base, S1, S2

    def mode_problem(self, theta):
        design = self.design
        beta, alpha, prior = self.split(np.asarray(theta, dtype=float))
        Z = np.asarray(loaded_Z(design, prior), dtype=float)
        return ObsModeProblem(
            P=self.precision(theta),
            eta=np.asarray(design.log_variance_index(np.asarray(alpha))),
            r=design.y - design.X @ np.asarray(beta),
            Z=Z,
            G=design.G,
            q=self.layout.q,
            group=design.group,
            starts=design.starts,
            weights=design.weights,
            features=self._mode_features(Z),
        )

    def _mode_features(self, Z: np.ndarray) -> np.ndarray | None:
        """:meth:`ObsModeProblem.features` of the design's ``Z`` and ``G``, formed once per integrand
        (``None``, formed by the problem, when ``Z`` carries a level-1 loading and changes with theta)."""
        if Z is not self.design.Z:
            return None
        features = self.__dict__.get("_obs_features")
        if features is None:
            features = self._obs_features = ObsModeProblem.features(Z, self.design.G)
        return features


def _all_ones(col: np.ndarray) -> bool:
    """Whether a data column is all ones (an intercept: multiplying by it is skipped)."""
    return bool(np.all(col == 1.0))


def _times_column(A, col: np.ndarray):
    """``A * col[:, None]`` for a (rows x nodes) array, ``A`` itself when ``col`` is all ones."""
    return A if _all_ones(col) else A * col[:, None]


def make_integrand(design: Design) -> Integrand:
    """The integrand of the design's model class."""
    if design.layout.scale_re_terms:
        return PerObservation(design)
    return SchoolSums(design)


# ====================================================================== mode problems (numpy)
class Centred(NamedTuple):
    r"""The residual sum of squares of every school about a reference ``u_ref`` (numpy).

    With ``d = u - u_ref`` and ``e_i = r_i - z_i'u_ref``,

    .. math::

        Q(u) = \sum_i c_i (r_i - z_i'u)^2 = Q_0 - 2 d'R_1 + d'S_2 d, \qquad
        Q_0 = \sum_i c_i e_i^2, \quad R_1 = \sum_i c_i e_i z_i = S_1 - S_2 u_{ref},

    an identity for any ``u_ref``. Taken at the school's weighted least-squares solution
    (``S_2 u_ref = S_1``, so ``R_1`` is rounding) every term is as small as ``Q`` itself,
    whereas ``S_0 - 2u'S_1 + u'S_2u`` subtracts numbers ``var(u) / var(e)`` times larger
    than ``Q``: with an intraclass correlation near one (residual SD 1e-4 of the school SD)
    that left ``h_j`` with rounding noise above the Newton decrements the mode solver
    tests, and it iterated to its limit with dozens of step halvings (0.1 s per node
    adaptation instead of a few ms).
    """

    u_ref: np.ndarray  # (J, q)
    Q0: np.ndarray  # (J,)
    R1: np.ndarray  # (J, q)


def centred_sums(design: Design, beta: np.ndarray, alpha: np.ndarray, s: Sums, Z: np.ndarray | None = None) -> Centred:
    """:class:`Centred` at each school's weighted least-squares solution (pseudo-inverse of a singular ``S2``).

    ``Z``: the loaded design of :func:`loaded_Z` (default ``design.Z``)."""
    Z = design.Z if Z is None else Z
    q = s.S1.shape[1]
    if q == 1:
        u_ref = s.S1 / s.S2[:, 0]
    else:
        u_ref = np.einsum("jab,jb->ja", np.linalg.pinv(s.S2), s.S1)
    u_ref = np.where(np.isfinite(u_ref), u_ref, 0.0)
    st, ct = design.starts, design.counts
    c = np.exp(-np.asarray(design.log_variance_index(alpha)))
    if design.weights is not None:
        c = c * design.weights
    e = design.y - design.X @ beta - np.einsum("nq,nq->n", Z, np.repeat(u_ref, ct, axis=0))
    ce = c * e
    return Centred(u_ref, np.add.reduceat(ce * e, st), np.add.reduceat(ce[:, None] * Z, st, axis=0))


def _prior_times(P: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``P_j b_j`` for every school (``P`` of shape (J, d, d), possibly a broadcast (d, d))."""
    if P.strides[0] == 0:  # one P for all schools (np.broadcast_to)
        return b @ P[0].T
    return np.einsum("jde,je->jd", P, b)


def _quad_prior(b: np.ndarray, P: np.ndarray) -> np.ndarray:
    if P.ndim == 2:
        return np.einsum("jd,de,je->j", b, P, b)
    return np.einsum("jd,jde,je->j", b, P, b)


def _abs_quad_prior(b: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``|b|'|P||b|``: the magnitude of the terms of ``b'Pb``."""
    return _quad_prior(np.abs(b), np.abs(P))


class SumsModeProblem:
    r"""``h_j`` and its derivatives from the per-school sums (``E = exp(-v)``, ``P = Sigma_j^{-1}``).

    .. math::

        \partial_u h = E (S_1 - S_2 u) - (P b)_u, \qquad
        \partial_v h = -n/2 + E Q(u)/2 - (P b)_v,

        \partial^2_{uu} h = -E S_2 - P_{uu}, \quad
        \partial^2_{uv} h = -E (S_1 - S_2 u) - P_{uv}, \quad
        \partial^2_{vv} h = -E Q(u)/2 - P_{vv};

    the Fisher-scoring matrix replaces ``E Q/2`` by its expectation ``n/2`` and drops
    the ``u``-``v`` cross term. ``h`` is given up to a constant.

    With the quadratic association (``quad``: ``a_j = gamma / sd(u0_j)^2``) ``b = (u, w)``
    and the prior is at ``b~ = (u, w - a u_0^2)`` (:func:`quad_prior_point`); with
    ``J = db~/db`` (``J_{q0} = -2 a u_0``) its terms are ``-J'P b~`` and
    ``-J'PJ + 2a (P b~)_v e_0 e_0'`` (Fisher scoring drops the last).
    """

    def __init__(
        self, s: Sums, P: np.ndarray, q: int, random_scale: bool, centred: Centred | None = None, quad: np.ndarray | None = None
    ):
        self.s, self.P, self.q, self.rs = s, P, q, random_scale
        self.J = s.n.shape[0]
        self.d = q + int(random_scale)
        if centred is None:  # about u = 0: S0 - 2u'S1 + u'S2u
            centred = Centred(np.zeros_like(s.S1), s.S0, s.S1)
        self.c = centred
        self.a = None if quad is None else np.broadcast_to(np.asarray(quad, dtype=float), (self.J,))

    def _prior_point(self, b: np.ndarray) -> np.ndarray:
        """``b~``: ``b`` with ``w`` replaced by ``w - a u_0^2`` (``b`` without the quadratic association)."""
        if self.a is None:
            return b
        out = b.copy()
        out[:, self.q] -= self.a * b[:, 0] ** 2
        return out

    def _resid_and_Q(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``S_1 - S_2 u``, ``Q(u)`` and ``S_2 u`` by the centred identity of :class:`Centred`."""
        s, c = self.s, self.c
        dlt = u - c.u_ref
        S2d = np.einsum("jqr,jr->jq", s.S2, dlt)
        resid = c.R1 - S2d
        Q = c.Q0 - np.einsum("jq,jq->j", dlt, c.R1 + resid)  # Q0 - 2 d'R1 + d'S2 d
        return resid, Q, S2d

    def f(self, b: np.ndarray) -> np.ndarray:
        q = self.q
        s = self.s
        _, Q, _ = self._resid_and_Q(b[:, :q])
        if self.rs:
            v = b[:, q]
            ll = -0.5 * s.n * v - 0.5 * np.exp(-v) * Q
        else:
            ll = -0.5 * Q
        return ll - 0.5 * _quad_prior(self._prior_point(b), self.P)

    def magnitude(self, b: np.ndarray) -> np.ndarray:
        """The sum of the absolute values of the terms of :meth:`f` (its rounding scale)."""
        s, c, q = self.s, self.c, self.q
        dlt = b[:, :q] - c.u_ref
        Qabs = c.Q0 + 2.0 * np.abs(np.einsum("jq,jq->j", dlt, c.R1)) + np.einsum("jq,jqr,jr->j", dlt, s.S2, dlt)
        out = 0.5 * _abs_quad_prior(self._prior_point(b), self.P)
        if self.rs:
            v = b[:, q]
            return out + 0.5 * s.n * np.abs(v) + 0.5 * np.exp(-v) * Qabs
        return out + 0.5 * Qabs

    def derivs(self, b: np.ndarray, fisher: bool = False):
        s, P, q = self.s, self.P, self.q
        J, d = b.shape
        resid, Q, _ = self._resid_and_Q(b[:, :q])
        bp = self._prior_point(b)
        if P.ndim == 2:
            Pb = bp @ P  # P symmetric
            H = np.broadcast_to(-P, (J, d, d)).copy()
        else:
            Pb = np.einsum("jde,je->jd", P, bp)
            H = -P.copy()
        g = -Pb
        if self.a is not None:  # prior at (u, w - a u0^2): J = I + (-2 a u0) e_q e_0'
            tp = -2.0 * self.a * b[:, 0]
            g[:, 0] -= tp * Pb[:, q]
            Pcol = P[:, q] if P.ndim == 2 else P[:, :, q]  # (d,) or (J, d)
            col = tp[:, None] * Pcol  # (P J - P)[:, :, 0] = tp P[:, q]
            H[:, :, 0] -= col
            H[:, 0, :] -= col
            H[:, 0, 0] -= tp**2 * (P[q, q] if P.ndim == 2 else P[:, q, q])
            if not fisher:
                H[:, 0, 0] += 2.0 * self.a * Pb[:, q]
        if self.rs:
            E = np.exp(-b[:, q])
            R = E[:, None] * resid
            g[:, :q] += R
            g[:, q] += -0.5 * s.n + 0.5 * E * Q
            H[:, :q, :q] -= E[:, None, None] * s.S2
            if fisher:
                H[:, q, q] -= 0.5 * s.n
            else:
                H[:, :q, q] -= R
                H[:, q, :q] -= R
                H[:, q, q] -= 0.5 * E * Q
        else:
            g[:, :q] += resid
            H[:, :q, :q] -= s.S2
        return g, H


class ObsModeProblem:
    r"""``h_j`` and its derivatives summed over observations (``E_i = exp(-lv_i)``, ``e_i = r_i - z_i'u``, ``t_i = E_i e_i^2``).

    .. math::

        \partial_u h = \sum E_i e_i z_i - (P b)_u, \qquad
        \partial_v h = \sum (t_i - 1)/2\, g_i - (P b)_v,

        \partial^2_{uu} h = -\sum E_i z_i z_i' - P_{uu}, \quad
        \partial^2_{vv} h = -\sum t_i/2\, g_i g_i' - P_{vv}, \quad
        \partial^2_{uv} h = -\sum E_i e_i z_i g_i' - P_{uv};

    Fisher scoring replaces ``t_i`` by 1 and drops the cross term. With level-1 weights
    ``w_i`` every sum over observations is weighted (``E_i`` and the ``-lv_i/2`` term
    times ``w_i``). The school sums of all of them are taken by one ``reduceat`` over a
    feature-by-row array (the data's ``z, g, z z', g g', z g'`` formed once per problem,
    times one of four row weights; features as rows, so that ``reduceat`` runs along contiguous
    memory: the same sums, 0.3 instead of 1.4 ms on 20,000 rows and ten features).
    """

    def __init__(self, P, eta, r, Z, G, q, group, starts, weights=None, features=None):
        self.J = starts.shape[0]
        if P.ndim == 2:
            P = np.broadcast_to(P, (self.J,) + P.shape)
        self.P, self.eta, self.r, self.Z, self.G, self.q = P, eta, r, Z, G, q
        self.group, self.starts = group, starts
        self.w = np.ones_like(r) if weights is None else weights
        self._counts = np.diff(np.append(starts, group.shape[0]))
        nv = G.shape[1]
        self.d = q + nv
        # the data of the school sums in derivs() (features x rows, :meth:`features`) and which row
        # weight multiplies each feature (0: E e, 1: (t - 1)/2, 2: E, 3: t/2)
        self._features = self.features(Z, G) if features is None else features
        self._weight_of = np.repeat([0, 1, 2, 3, 0], [q, nv, q * q, nv * nv, q * nv])

    @staticmethod
    def features(Z: np.ndarray, G: np.ndarray) -> np.ndarray:
        """``z, g, z z', g g', z g'`` of every row, as a C-contiguous ``(features, N)`` array."""
        N, q, nv = Z.shape[0], Z.shape[1], G.shape[1]
        features = np.concatenate(
            [Z, G, (Z[:, :, None] * Z[:, None, :]).reshape(N, q * q), (G[:, :, None] * G[:, None, :]).reshape(N, nv * nv)]
            + [(Z[:, :, None] * G[:, None, :]).reshape(N, q * nv)],
            axis=1,
        )
        return np.ascontiguousarray(features.T)

    def _parts(self, b):
        bg = np.repeat(b, self._counts, axis=0)  # rows are sorted by school: b[group], faster
        q, Z, G = self.q, self.Z, self.G
        e = self.r - sum(Z[:, a] * bg[:, a] for a in range(q)) if q else self.r
        lv = self.eta + sum(G[:, t] * bg[:, q + t] for t in range(G.shape[1]))
        return e, lv, np.exp(-lv)

    def f(self, b: np.ndarray) -> np.ndarray:
        e, lv, E = self._parts(b)
        ll = np.add.reduceat(-0.5 * self.w * (lv + E * e**2), self.starts)
        return ll - 0.5 * np.sum(_prior_times(self.P, b) * b, axis=1)

    def magnitude(self, b: np.ndarray) -> np.ndarray:
        """The sum of the absolute values of the terms of :meth:`f` (its rounding scale)."""
        e, lv, E = self._parts(b)
        return np.add.reduceat(0.5 * self.w * (np.abs(lv) + E * e**2), self.starts) + 0.5 * _abs_quad_prior(b, self.P)

    def derivs(self, b: np.ndarray, fisher: bool = False):
        e, lv, E = self._parts(b)
        q, nv, J = self.q, self.G.shape[1], self.J
        E = E * self.w  # weighted rows (E enters every term; the 1 of t - 1 is weighted below)
        Ee = E * e
        t = Ee * e
        weights = np.stack([Ee, 0.5 * (t - self.w), E, 0.5 * self.w if fisher else 0.5 * t])
        ncol = self._features.shape[0] - (q * nv if fisher else 0)  # Fisher scoring: no u-v cross term
        sums = np.add.reduceat(weights[self._weight_of[:ncol]] * self._features[:ncol], self.starts, axis=1).T
        P = self.P
        d = self.d
        g = sums[:, :d] - _prior_times(P, b)
        H = -np.array(P)
        o = d
        if q:
            H[:, :q, :q] -= sums[:, o : o + q * q].reshape(J, q, q)
        o += q * q
        H[:, q:, q:] -= sums[:, o : o + nv * nv].reshape(J, nv, nv)
        o += nv * nv
        if not fisher and q:
            Huv = sums[:, o : o + q * nv].reshape(J, q, nv)
            H[:, :q, q:] -= Huv
            H[:, q:, :q] -= np.swapaxes(Huv, 1, 2)
        return g, H


# ====================================================================== the joint (one-stage) stage-2 model
#: Families of the school-level outcome the joint model supports (the ``family`` of
#: :class:`SchoolOutcome`): ``log f(Y_j | eta)`` in closed form with its first two derivatives.
JOINT_FAMILIES = ("gaussian", "binomial", "poisson", "ordinal", "nominal")


def _softplus(x):
    """``ln(1 + e^x)`` without overflow (autograd)."""
    return anp.logaddexp(0.0, x)


class SchoolOutcome(NamedTuple):
    r"""A school-level outcome whose regression on the school effects enters each school's integrand.

    With ``b = (u, v)`` the school effects and ``phi = (gamma, [ln sigma^2])`` its parameters,

    .. math::

        \eta_j(b) = \sum_c \gamma_c A_{jc} \prod_{a \in S_c} b_a, \qquad
        \log f(Y_j \mid b) =
        \begin{cases}
        -\tfrac12 \ln(2\pi\sigma^2) - (Y_j - \eta_j)^2 / (2\sigma^2) & \text{gaussian} \\
        Y_j \eta_j - \ln(1 + e^{\eta_j}) & \text{binomial (0/1)} \\
        Y_j \eta_j - e^{\eta_j} - \ln Y_j! & \text{poisson} \\
        \ln\{F(\tau_{Y_j} - \eta_j) - F(\tau_{Y_j - 1} - \eta_j)\} & \text{ordinal,}
        \end{cases}

    the ordinal outcome coded ``0..K-1`` (cumulative logit, ``F`` the logistic distribution
    function, ``tau_{-1} = -inf``, ``tau_{K-1} = +inf``, no intercept in ``eta``). Its
    thresholds are parametrised to stay ordered, as statsmodels' ``OrderedModel`` does:
    ``phi`` ends with ``(tau_0, ln(tau_1 - tau_0), ..., ln(tau_{K-2} - tau_{K-3}))``, and the
    log-probability is evaluated as

    .. math::

        -\operatorname{sp}(-(\tau_k - \eta)) - \operatorname{sp}(\tau_{k-1} - \eta)
        + \ln(1 - e^{-(\tau_k - \tau_{k-1})}),

    with ``sp(x) = ln(1 + e^x)`` (the terms with an infinite threshold left out), which
    neither overflows nor cancels.

    The nominal outcome (codes ``0..K-1``, the first the reference) has one linear predictor
    per category ``k >= 1``, ``eta_jk = sum_c gamma_{kc} A_jc prod_{a in S_c} b_a``
    (``phi`` holds the ``K - 1`` blocks of coefficients in turn, ``eta_j0 = 0``):

    .. math::

        \log f(Y_j \mid b) = \eta_{j Y_j} - \ln\Bigl(1 + \sum_{k \ge 1} e^{\eta_{jk}}\Bigr).

    In every family, column ``c`` of the stage-2 design is the product of a data part ``A_jc``
    (level-2 covariates, level-1 summaries, 1 for an intercept) and the school effects
    ``S_c`` its term names (``u0``, ``v``, ``u0:v``, ``u0:x``, ...). Schools without an
    outcome (``observed = False``) contribute 0.

    Attributes
    ----------
    family : str
        One of :data:`JOINT_FAMILIES`.
    y : ndarray (J,)
        The outcome (0 where not observed).
    A : ndarray (J, c)
        Data parts of the design columns (0 where not observed).
    effects : tuple of tuple of int
        ``S_c``: indices (into ``b``) of the school effects multiplying column ``c``.
    observed : ndarray (J,) of bool
    names : tuple of str
        Names of the columns (the coefficients ``gamma``).
    n_categories : int
        ``K`` of the ordinal and nominal families (``y`` holds the codes ``0..K-1``); 0 otherwise.
    """

    family: str
    y: np.ndarray
    A: np.ndarray
    effects: tuple
    observed: np.ndarray
    names: tuple
    n_categories: int = 0

    @property
    def n_params(self) -> int:
        """``len(phi)``: the coefficients, then ``ln sigma^2`` (gaussian) or the ``K - 1`` threshold parameters (ordinal);
        ``K - 1`` blocks of coefficients (nominal)."""
        if self.family == "nominal":
            return len(self.names) * (self.n_categories - 1)
        return len(self.names) + (self.family == "gaussian") + max(self.n_categories - 1, 0)

    def _nominal_log_density(self, phi, b):
        """``eta_{jY_j} - ln(1 + sum_k e^{eta_jk})`` (autograd; ``logaddexp`` so that nothing overflows)."""
        c = len(self.names)
        extra = (slice(None),) + (None,) * (b.ndim - 2)
        code = self.y.astype(int)
        lse, chosen = 0.0, 0.0
        for k in range(1, self.n_categories):
            e = self.eta(phi[(k - 1) * c : k * c], b)
            lse = anp.logaddexp(lse, e)
            chosen = chosen + (code == k)[extra] * e
        return chosen - lse

    def _nominal_point_derivs(self, phi: np.ndarray, b: np.ndarray, fisher: bool):
        r"""``point_derivs`` of the nominal family: with ``p_k`` the category probabilities and ``g_k``, ``H_k``
        the derivatives of ``eta_k`` in ``b``,

        .. math::

            \nabla_b \log f = \sum_k (y_k - p_k) g_k, \qquad
            \nabla^2_b \log f = -\Bigl(\sum_k p_k g_k g_k' - \bar g \bar g'\Bigr) + \sum_k (y_k - p_k) H_k,
            \quad \bar g = \sum_k p_k g_k,

        the last sum dropped for Fisher scoring.
        """
        J, d = b.shape
        c = len(self.names)
        code = self.y.astype(int)
        blocks = [phi[(k - 1) * c : k * c] for k in range(1, self.n_categories)]
        etas = np.column_stack([np.zeros(J)] + [np.asarray(self.eta(blk, b), dtype=float) for blk in blocks])
        lse = special.logsumexp(etas, axis=1)
        p = np.exp(etas - lse[:, None])
        g = np.zeros((J, d))
        gbar = np.zeros((J, d))
        H = np.zeros((J, d, d))
        for k, blk in enumerate(blocks, start=1):
            gk, Hk = self._eta_derivs(blk, b)
            resid = (code == k) - p[:, k]
            g += resid[:, None] * gk
            gbar += p[:, k, None] * gk
            H -= p[:, k, None, None] * gk[:, :, None] * gk[:, None, :]
            if not fisher:
                H += resid[:, None, None] * Hk
        H += gbar[:, :, None] * gbar[:, None, :]
        chosen = etas[np.arange(J), code]
        obs = self.observed.astype(float)
        return (chosen - lse) * obs, g * obs[:, None], H * obs[:, None, None], (np.abs(chosen) + lse) * obs

    def _eta_derivs(self, phi: np.ndarray, b: np.ndarray):
        """Gradient ``(J, d)`` and Hessian ``(J, d, d)`` in ``b`` of ``eta`` with the coefficients ``phi[:c]`` (numpy)."""
        J, d = b.shape
        grad = np.zeros((J, d))
        hess = np.zeros((J, d, d))
        for c, S in enumerate(self.effects):
            coef = phi[c] * self.A[:, c]
            for a in S:
                rest = [e for e in S if e != a]
                grad[:, a] += coef * np.prod(b[:, rest], axis=1) if rest else coef
                for a2 in rest:
                    rest2 = [e for e in rest if e != a2]
                    hess[:, a, a2] += coef * np.prod(b[:, rest2], axis=1) if rest2 else coef
        return grad, hess

    def thresholds(self, phi):
        """The ordinal thresholds ``tau_0 < ... < tau_{K-2}`` from their parameters (autograd)."""
        t = phi[len(self.names) :]
        return anp.cumsum(anp.concatenate([t[:1], anp.exp(t[1:])]))

    def _ordinal_parts(self, phi, eta):
        """``a = tau_k - eta``, ``c = tau_{k-1} - eta`` and the masks of the top and bottom categories."""
        K = self.n_categories
        code = self.y.astype(int)
        tau = self.thresholds(phi)
        extra = (slice(None),) + (None,) * (anp.ndim(eta) - 1)
        a = tau[np.minimum(code, K - 2)][extra] - eta
        c = tau[np.maximum(code - 1, 0)][extra] - eta
        top = (code == K - 1)[extra]
        bottom = (code == 0)[extra]
        return a, c, top, bottom, code

    def _ordinal_gap(self, phi, code):
        """``ln(1 - exp(-(tau_k - tau_{k-1})))`` for the middle categories, 0 for the end ones, shape (J,)."""
        K = self.n_categories
        if K <= 2:
            return np.zeros(code.shape)
        t = phi[len(self.names) + 1 :]  # ln(tau_k - tau_{k-1}), k = 1..K-2
        gap = anp.exp(t[np.clip(code - 1, 0, K - 3)])
        middle = (code > 0) & (code < K - 1)
        return anp.where(middle, anp.log(-anp.expm1(-gap)), 0.0)

    def _monomials(self, b):
        """``prod_{a in S_c} b_a`` for every column, a list of arrays of ``b``'s leading shape."""
        ones = 0.0 * b[..., 0] + 1.0
        out = []
        for S in self.effects:
            m = ones
            for a in S:
                m = m * b[..., a]
            out.append(m)
        return out

    def eta(self, phi, b):
        """``eta_j(b)`` at nodes ``b`` (J, K, d) or points (J, d) (autograd)."""
        mono = self._monomials(b)
        extra = (None,) * (b.ndim - 2)
        total = 0.0
        for c, m in enumerate(mono):
            total = total + phi[c] * self.A[(slice(None), c) + extra] * m
        return total

    def _constant(self):
        """The part of ``log f`` that does not depend on the parameters (``-ln Y!``, ``-ln 2pi/2``)."""
        if self.family == "poisson":
            return -special.gammaln(self.y + 1.0)
        if self.family == "gaussian":
            return np.full(self.y.shape, -0.5 * LOG2PI)
        return np.zeros(self.y.shape)

    def log_density(self, phi, b):
        """``log f(Y_j | b)`` at nodes ``b`` (J, K, d), shape ``(J, K)``, 0 for unobserved schools (autograd)."""
        if self.family == "nominal":
            return self._nominal_log_density(phi, b) * self.observed[:, None]
        eta = self.eta(phi, b)
        y = self.y[:, None]
        if self.family == "gaussian":
            lv = phi[len(self.names)]
            ll = -0.5 * lv - 0.5 * (y - eta) ** 2 * anp.exp(-lv)
        elif self.family == "binomial":
            ll = y * eta - anp.logaddexp(0.0, eta)
        elif self.family == "ordinal":
            a, c, top, bottom, code = self._ordinal_parts(phi, eta)
            ll = -anp.where(top, 0.0, _softplus(-a)) - anp.where(bottom, 0.0, _softplus(c))
            ll = ll + self._ordinal_gap(phi, code)[:, None]
        else:
            ll = y * eta - anp.exp(eta)
        ll = ll + self._constant()[:, None]
        return ll * self.observed[:, None]

    def point_derivs(self, phi: np.ndarray, b: np.ndarray, fisher: bool = False):
        r"""``log f``, its gradient and Hessian in ``b`` at one point per school (numpy).

        .. math::

            \nabla_b \log f = \ell'(\eta) \nabla\eta, \qquad
            \nabla^2_b \log f = \ell''(\eta) \nabla\eta\nabla\eta' + \ell'(\eta) \nabla^2\eta,

        the second term dropped for Fisher scoring (``E ell' = 0``). Returns ``f (J,)``,
        ``g (J, d)``, ``H (J, d, d)`` and ``magnitude (J,)`` (the absolute size of ``f``'s terms).
        """
        if self.family == "nominal":
            return self._nominal_point_derivs(phi, b, fisher)
        J, d = b.shape
        eta = np.asarray(self.eta(phi, b), dtype=float)
        grad, hess = self._eta_derivs(phi, b)
        y = self.y
        if self.family == "gaussian":
            iv = np.exp(-phi[len(self.names)])
            f = -0.5 * phi[len(self.names)] - 0.5 * (y - eta) ** 2 * iv
            d1, d2 = (y - eta) * iv, np.full(J, -iv)
            mag = 0.5 * abs(phi[len(self.names)]) + 0.5 * (y - eta) ** 2 * iv
        elif self.family == "binomial":
            p = special.expit(eta)
            f = y * eta - np.logaddexp(0.0, eta)
            d1, d2 = y - p, -p * (1.0 - p)
            mag = np.abs(y * eta) + np.logaddexp(0.0, eta)
        elif self.family == "ordinal":  # d/d eta: F(c) - (1 - F(a)); second: -f(a) - f(c), f = F(1 - F)
            a, c, top, bottom, code = self._ordinal_parts(phi, eta)
            gapterm = np.asarray(self._ordinal_gap(phi, code), dtype=float)
            sa, sc = np.where(top, 0.0, np.logaddexp(0.0, -a)), np.where(bottom, 0.0, np.logaddexp(0.0, c))
            f = -sa - sc + gapterm
            Fa, Fc = special.expit(a), special.expit(c)
            d1 = np.where(bottom, 0.0, Fc) - np.where(top, 0.0, 1.0 - Fa)
            d2 = -np.where(top, 0.0, Fa * (1.0 - Fa)) - np.where(bottom, 0.0, Fc * (1.0 - Fc))
            mag = sa + sc + np.abs(gapterm)
        else:
            mu = np.exp(eta)
            f = y * eta - mu
            d1, d2 = y - mu, -mu
            mag = np.abs(y * eta) + mu
        obs = self.observed.astype(float)
        H = d2[:, None, None] * grad[:, :, None] * grad[:, None, :]
        if not fisher:
            H = H + d1[:, None, None] * hess
        return f * obs, (d1 * obs)[:, None] * grad, H * obs[:, None, None], mag * obs


class JointModeProblem:
    """A mode problem plus the school-level outcome's ``log f`` (:meth:`SchoolOutcome.point_derivs`)."""

    def __init__(self, base, outcome: SchoolOutcome, phi: np.ndarray):
        self.base, self.outcome, self.phi = base, outcome, np.asarray(phi, dtype=float)
        self.J, self.d = base.J, base.d

    def f(self, b: np.ndarray) -> np.ndarray:
        return self.base.f(b) + self.outcome.point_derivs(self.phi, b)[0]

    def magnitude(self, b: np.ndarray) -> np.ndarray:
        """The base problem's magnitude plus the outcome term's."""
        return self.base.magnitude(b) + self.outcome.point_derivs(self.phi, b)[3]

    def derivs(self, b: np.ndarray, fisher: bool = False):
        g, H = self.base.derivs(b, fisher=fisher)
        _, g2, H2, _ = self.outcome.point_derivs(self.phi, b, fisher=fisher)
        return g + g2, H + H2


class JointIntegrand(Integrand):
    r"""The one-stage model of a school-level outcome and the MELSM: one more term in ``h_j``.

    .. math::

        h_j(b) = \log f(y_j \mid b) + \log f(Y_j \mid b) + \log\phi(b; 0, \Sigma_j),

    with ``log f(Y_j | b)`` of :class:`SchoolOutcome`. ``theta`` is the MELSM's
    ``theta`` followed by the outcome's ``phi``. The outcome term depends on the mean
    effects non-linearly (``binomial``, ``poisson``, ``u0:v``), so the rule is the product
    rule over all school effects (:attr:`uexact_supported` is False) and the derivatives
    are autograd's (the class is not a :class:`SchoolSums`).

    Parameters
    ----------
    base : Integrand
        The MELSM's integrand (:func:`make_integrand`).
    outcome : SchoolOutcome
    """

    def __init__(self, base: Integrand, outcome: SchoolOutcome):
        super().__init__(base.design)
        self.base = base
        self.outcome = outcome
        self.n_stage1 = base.layout.n_params

    @property
    def core(self) -> bool:
        """Never: the boundary probes and the quadrature check of the core model do not apply."""
        return False

    @property
    def uexact_supported(self) -> bool:
        """Never: the outcome term is not Gaussian in the mean effects."""
        return False

    def split(self, theta):
        """``(beta, alpha, Prior)`` of the MELSM part of ``theta``."""
        return self.base.split(theta[: self.n_stage1])

    def log_conditional(self, beta, alpha, b, Z=None):
        return self.base.log_conditional(beta, alpha, b, Z)

    def log_h(self, theta, b):
        """``h_j(b_jk)`` including the outcome term, shape ``(J, K)``."""
        return self.base.log_h(theta[: self.n_stage1], b) + self.outcome.log_density(theta[self.n_stage1 :], b)

    def u_exact_parts(self, beta, alpha, v, Z=None):
        raise ModelSpecError("the joint stage-2 model integrates every school effect by the product rule")

    def mode_problem(self, theta):
        theta = np.asarray(theta, dtype=float)
        return JointModeProblem(self.base.mode_problem(theta[: self.n_stage1]), self.outcome, theta[self.n_stage1 :])
