r"""Is a fitted variance at the boundary of the parameter space?

A variance whose true value is zero is estimated on the log-Cholesky scale,
where zero lies at ``-inf``; the optimiser stops once the log-likelihood no
longer changes, which can leave, say, ``var(v) = 2e-5`` rather than ``0``.
A fixed threshold on the variance cannot tell such a value from a small but
real variance (the units differ from effect to effect). The likelihood can:
for every school effect ``e`` we evaluate the log-likelihood at the
estimates with ``e`` removed (row and column ``e`` of ``Sigma`` set to zero,
apart from a negligible ``1e-12`` times its estimated variance on the
diagonal so that the quadrature stays well defined) and call the estimate
*at the boundary* when

.. math::

    2\,[\ell(\hat\theta) - \ell(\hat\theta_{-e})] < 10^{-3},

i.e. when the likelihood-ratio statistic for dropping ``e`` is below
``1e-3`` even before the other parameters are re-estimated. Since
re-estimation can only increase the restricted log-likelihood, the true
statistic is smaller still: the data carry no evidence for the effect, and
the test of ``var(e) = 0`` has to use the boundary-corrected mixture
reference distribution (:func:`mlsml.lrtest` does).

The probes cost ``d + 1`` likelihood evaluations by the product rule, the last one
at a singular ``Sigma`` where the mode solver is slow (0.07-0.12 s on London Models
3 and 6, a third of a fit). :func:`far_from_boundary` says when they cannot find
anything: each probe moves one quantity ``f`` of ``Sigma`` -- ``var(e)``, or the
smallest eigenvalue of the correlation matrix -- from its estimate to zero. If the
log-likelihood were quadratic in the entries of ``Sigma`` (natural scale) with
covariance ``V`` (the inverse observed information, by the delta method), then for
any move ``Delta`` that changes ``f`` by ``-f``,

.. math::

    2\,[\ell(\hat\theta) - \ell(\hat\theta + \Delta)] = \Delta' V^{-1} \Delta
        \ge \frac{f^2}{\nabla f' V \nabla f} = z_f^2

(Cauchy-Schwarz), whatever else the probe changes and even with the other
parameters fixed. The quadratic approximation *under*-states the fall towards a
zero variance: for a balanced one-way model with ``J`` groups and ``r`` the ratio of
the estimated to the smallest possible variance of a group mean, the fall is
:math:`J(r - 1 - \log r)` against the quadratic :math:`\tfrac J2 (1 - 1/r)^2`. So the
probes are skipped when every :math:`z_f^2` is at least :data:`FAR_FROM_BOUNDARY_Z2`,
25,000 times :data:`BOUNDARY_LR`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize as sopt

from .likelihood import Likelihood, value_or_nan
from .params import chol_from_vector, sigma_derivatives, vector_from_chol
from .quadrature import max_nagq

#: Likelihood-ratio statistic below which an effect counts as at the boundary.
BOUNDARY_LR = 1e-3

#: The probes run unless every quantity they move to zero is this many squared standard
#: errors away from it (a Wald z of 5): 25,000 times BOUNDARY_LR, so the quadratic
#: approximation would have to over-state the fall of the log-likelihood 25,000-fold for a
#: skipped probe to have found anything (see the module docstring; London Models 3 and 6
#: have z of 6 to 14).
FAR_FROM_BOUNDARY_Z2 = 25.0

#: The faces of the boundary are also searched at an interior fit whose Sigma is weakly
#: determined: a variance or the smallest eigenvalue of the correlation matrix within two
#: standard errors of zero (squared Wald z below this), or no Wald z at all (the
#: information not positive definite). There the likelihood can have a second maximum
#: near a face (fuzz case 4623287202221590537: 4 schools, true var(u0) = 0; the fit's
#: interior maximum at corr(u0,v) = -0.18 is 0.285 below one at ``|corr|`` near 1) that the
#: probes, which move the fit itself to the boundary, cannot see.
WEAK_Z2 = 4.0


def weakly_determined(layout, theta: np.ndarray, hessian: np.ndarray) -> bool:
    """Whether a fit's ``Sigma`` is within two standard errors of the boundary (:data:`WEAK_Z2`).

    ``True`` also when :func:`probe_z2` has no answer (the information not positive
    definite, or the smallest eigenvalue of the correlation matrix repeated).
    """
    z2 = probe_z2(layout, theta, hessian)
    return z2 is None or min(z2) < WEAK_Z2


#: Eigenvalues of the correlation matrix closer than this count as repeated: the smallest
#: one has no derivative then, and the probes run.
EIGEN_GAP = 1e-8


def far_from_boundary(layout, theta: np.ndarray, hessian: np.ndarray) -> bool:
    r"""Whether no probe of :func:`boundary_effects` can find a boundary (module docstring).

    Parameters
    ----------
    layout : ParamLayout
        The layout of a core model (one ``Sigma``; :attr:`mlsml.integrand.Integrand.core`).
    theta : ndarray
        The estimates (optimiser scale).
    hessian : ndarray
        The Hessian of the log-likelihood at ``theta`` (optimiser scale).

    Returns
    -------
    bool
        ``True`` when every :math:`z_f^2` of :func:`probe_z2` is at least
        :data:`FAR_FROM_BOUNDARY_Z2`; ``False`` when one is smaller or undefined.
    """
    z2 = probe_z2(layout, theta, hessian)
    return z2 is not None and all(z >= FAR_FROM_BOUNDARY_Z2 for z in z2)


def probe_z2(layout, theta: np.ndarray, hessian: np.ndarray) -> list[float] | None:
    r"""Squared Wald statistics :math:`z_f^2 = f^2 / \nabla f' V \nabla f` of what the probes move to zero.

    ``f`` is ``var(e)`` for every school effect ``e`` and, with ``d > 1``, the smallest
    eigenvalue of the correlation matrix; ``V`` is the inverse of ``-hessian`` restricted
    to the log-Cholesky parameters.

    Returns
    -------
    list of float or None
        ``None`` when ``-hessian`` is not positive definite or the smallest eigenvalue is
        repeated (closer than :data:`EIGEN_GAP`): no derivative, the probes must run.
    """
    theta = np.asarray(theta, dtype=float)
    H = np.asarray(hessian, dtype=float)
    d = layout.d
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(theta))):
        return None
    off = layout.chol_offset
    end = off + layout.n_chol
    try:
        w, V = np.linalg.eigh(-0.5 * (H + H.T))
    except np.linalg.LinAlgError:
        return None
    if not w.min() > 0:
        return None
    cov = ((V / w) @ V.T)[off:end, off:end]  # covariance of the log-Cholesky parameters
    L = np.asarray(layout.chol(theta), dtype=float)
    S = L @ L.T
    dS = sigma_derivatives(L, layout.free_chol)  # (n_psi, d, d)
    values = [S[e, e] for e in range(d)]
    grads = [dS[:, e, e] for e in range(d)]
    if d > 1 and layout.free_cov_pairs:  # (with every covariance fixed at 0 there is no rank face)
        sd = np.sqrt(np.diag(S))
        R = S / np.outer(sd, sd)
        ev, evec = np.linalg.eigh(R)
        if ev[1] - ev[0] < EIGEN_GAP:
            return None
        rel = np.einsum("kaa->ka", dS) / np.diag(S)  # d log S_aa
        dR = dS / np.outer(sd, sd) - 0.5 * R * (rel[:, :, None] + rel[:, None, :])
        values.append(ev[0])
        grads.append(np.einsum("a,kab,b->k", evec[:, 0], dR, evec[:, 0]))  # d lambda = v' dR v
    out = []
    for f, g in zip(values, grads):
        var = float(g @ cov @ g)
        out.append(f * f / var if var > 0 else 0.0)
    return out


def boundary_likelihood(lik: Likelihood) -> Likelihood:
    """The rule the boundary probes are evaluated with: the fit's product rule, or the default product rule.

    Fits that integrated the mean effects exactly (``quadrature="marginal"``)
    are re-evaluated with the product rule of the default size: the u-exact
    formula inverts ``Sigma`` and loses all accuracy at the nearly singular
    matrices probed here (a 2-llf error of 3.5e8 on London Model 4 at an
    eigenvalue of 1e-12), while the product rule is accurate to 1e-4 there and
    agrees with the u-exact rule to 1e-6 at the estimates.
    """
    return lik.as_product()


#: The u-exact rule's value is in the conditional form (:func:`mlsml.integrand.conditional_prior`,
#: no ``Sigma^{-1}``) for at most this many mean effects: there :func:`face_likelihood` fits the
#: faces by it.
FACE_UEXACT_MAX_Q = 2


def face_likelihood(lik: Likelihood) -> Likelihood:
    """The rule the faces of the boundary are fitted and compared with (:func:`search_faces`).

    The fit's own u-exact rule where its value is written with the prior of ``u`` given ``v``
    (the core model with at most :data:`FACE_UEXACT_MAX_Q` mean effects and a random scale),
    which stays exact at a singular ``Sigma``: a school's ``K`` nodes instead of the product
    rule's ``K^d`` (15 against 729 with a random slope, whose face search took 18 of a fit's
    22 CPU-s). Elsewhere :func:`boundary_likelihood` (the precision form inverts ``Sigma``).
    Either way a face counts only where about twice the points agree
    (:data:`FACE_RULE_TOL`).
    """
    lay = lik.layout
    if lik.spec.uexact and lik.integrand.core and lay.random_scale and 0 < lay.q <= FACE_UEXACT_MAX_Q:
        return lik
    return boundary_likelihood(lik)


def boundary_effects(lik: Likelihood, theta, llf: float) -> list[tuple[str, float, float]]:
    """School effects whose removal leaves the likelihood unchanged.

    Parameters
    ----------
    lik : Likelihood
        The fit's likelihood (evaluated by :func:`boundary_likelihood`).
    theta : ndarray
        The estimates (optimiser scale).
    llf : float
        The maximised log-likelihood.

    Returns
    -------
    list of (name, variance, LR statistic)
        One entry for every effect with ``2 (llf - llf_without) < BOUNDARY_LR``
        (a statistic below ``-BOUNDARY_LR`` means the likelihood is *higher* without
        the effect: the estimates are not the maximum);
        if there is none and ``d > 1``, possibly one entry ``("rank", lambda_min,
        statistic)`` when making the correlation matrix singular (smallest
        eigenvalue ``lambda_min`` set to zero) changes ``2 llf`` by less than
        ``BOUNDARY_LR``: the fit is on the boundary of the positive-definite cone.
    """
    lay = lik.layout
    probe = boundary_likelihood(lik)
    natural = np.asarray(lay.to_natural(np.asarray(theta, dtype=float)), dtype=float)
    beta, alpha = natural[: lay.p], natural[lay.p : lay.p + lay.k]
    S = lay.sigma_from_natural(natural)
    out = []
    if lay.d == 0:
        return out
    for i, name in enumerate(lay.re_names):
        if not S[i, i] > 0 or not np.isfinite(S[i, i]):
            continue
        R = S.copy()
        R[i, :] = 0.0
        R[:, i] = 0.0
        R[i, i] = 1e-12 * S[i, i]
        try:
            theta0 = lay.theta_from_parts(beta, alpha, R)
            with np.errstate(all="ignore"):
                llf0 = probe.value(theta0)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
        stat = 2.0 * (llf - llf0)
        if np.isfinite(stat) and stat < BOUNDARY_LR:  # (negative: the boundary is even better)
            out.append((name, float(S[i, i]), float(stat)))
    if lay.d > 1 and lay.free_cov_pairs and not out:
        stat, ev = _rank_deficient_stat(probe, llf, S, beta, alpha)
        if np.isfinite(stat) and stat < BOUNDARY_LR:
            out.append(("rank", ev, float(stat)))
    return out


def _rank_deficient_stat(probe: Likelihood, llf: float, S, beta, alpha) -> tuple[float, float]:
    """LR statistic for removing the weakest direction of the correlation matrix.

    ``R = D^-1 Sigma D^-1`` loses its smallest eigenvalue (set to ``1e-12``);
    for two effects this moves the correlation to exactly +/-1. Returns the
    statistic and the smallest eigenvalue of ``R``.
    """
    sd = np.sqrt(np.diag(S))
    R = S / np.outer(sd, sd)
    w, V = np.linalg.eigh(0.5 * (R + R.T))
    w0 = w.copy()
    w0[0] = 1e-12
    R0 = (V * w0) @ V.T
    S0 = R0 * np.outer(sd, sd)
    try:
        theta0 = probe.layout.theta_from_parts(beta, alpha, S0)
        with np.errstate(all="ignore"):
            llf0 = probe.value(theta0)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return float("nan"), float(w[0])
    return 2.0 * (llf - llf0), float(w[0])


# ---------------------------------------------------------------- faces of the boundary

#: A face of the boundary counts as higher than the fit when its maximised log-likelihood
#: exceeds the fit's (both by the rule of :func:`face_likelihood`) by more than
#: this. Issue 12's criterion for a fit below the maximum is 1e-3; the face fits are
#: accurate to about 1e-6, so 1e-4 leaves room on both sides.
FACE_LLF_TOL = 1e-4

#: A face's maximum counts only if the product rule with about twice the points moves its
#: log-likelihood by at most this: near a singular ``Sigma`` in schools of one to three
#: pupils the rule can overflow, and a face then seemed 383 units above a fit that an
#: independent route confirmed to be the maximum.
FACE_RULE_TOL = 1e-3

#: A removed direction of ``Sigma`` keeps this fraction of its variance (the squared
#: diagonal entry of the Cholesky factor), so the product rule stays well defined. The
#: log-likelihood is smooth in it, so it differs from the face's by about this fraction of
#: the score in that log-variance (3e-8 on 20 schools); smaller values make the mode search
#: slower (1e-12: 60 ms per evaluation against 27 ms at 1e-8 and 6 ms at the fit, 160 rows).
FACE_ZERO = 1e-8

#: On a face, a school effect whose fitted variance is negligible starts at this fraction of
#: its reference variance (the residual variance over ``mean(z^2)`` for a mean effect, 1 for
#: ``v``): from a variance of 1e-20 the gradient on the log-Cholesky scale vanishes and the
#: face fit could not leave it (the other face's maximum of issue 12 has ``var(u0) = 4.5e-5``).
FACE_START_FRACTION = 0.1

#: Iterations of the quasi-Newton fit on one face (a few dozen suffice on the test cases).
FACE_MAXITER = 200

#: Newton iterations on one face (then BFGS, :data:`FACE_MAXITER`, if Newton has not converged).
FACE_NEWTON_STEPS = 30

#: A face fit has converged when the Newton decrement ``g'(-H)^{-1}g`` is below this.
FACE_DECREMENT = 1e-8

#: Where no step along the Newton direction raises the log-likelihood (nodes re-adapted at
#: every evaluation make it noisy at about 1e-9), a decrement below this counts as converged.
FACE_STALL_DECREMENT = 1e-5


@dataclass(frozen=True)
class Face:
    """The maximum of the log-likelihood on one face of the boundary of ``Sigma``.

    Attributes
    ----------
    name : str
        The face in words, e.g. ``"var(u0) = 0"`` or ``"corr(u0,v) = -1"``.
    llf : float
        The maximised log-likelihood on the face (by the rule of :func:`face_likelihood`).
    gain : float
        ``llf`` minus the fit's log-likelihood by the same rule: positive when the face is higher.
    theta : ndarray
        The face maximum on the optimiser scale (the removed direction kept at :data:`FACE_ZERO`).
    zero : int
        Position in ``theta`` of the log-Cholesky diagonal entry the face holds at zero.
    """

    name: str
    llf: float
    gain: float
    theta: np.ndarray
    zero: int

    def inside(self, fraction: float = 1e-4) -> np.ndarray:
        """``theta`` moved off the face into the interior: the removed direction given ``fraction``
        of its variance (a start for the fit's own rule, which cannot evaluate the face itself)."""
        th = np.array(self.theta, dtype=float)
        th[self.zero] += 0.5 * np.log(fraction / FACE_ZERO)
        return th


def _psi_index(i: int, j: int) -> int:
    """Position of ``L[i, j]`` (``j <= i``) in the row-wise log-Cholesky vector."""
    return i * (i + 1) // 2 + j


def _face_rule_accurate(check: Likelihood, theta: np.ndarray, llf: float) -> bool:
    """Whether the rule with more points (``check``) agrees with ``llf`` at ``theta`` to :data:`FACE_RULE_TOL`."""
    if check.spec.nagq == 0:
        return True
    try:
        with np.errstate(all="ignore"):
            more = float(check.value(theta))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return False
    return bool(np.isfinite(more) and abs(more - llf) <= FACE_RULE_TOL)


def _check_rule(probe: Likelihood) -> Likelihood:
    """``probe`` with about twice the points (``2n + 1``, within :func:`mlsml.quadrature.max_nagq`)."""
    nagq = probe.spec.nagq
    dim = 1 if probe.spec.uexact else probe.layout.d
    return probe.with_spec(nagq=max(nagq, min(2 * nagq + 1, max_nagq(dim))))


def face_fixed(d: int, kind: str, k: int) -> list[tuple[int, int]]:
    r"""Entries ``(i, j)`` of the Cholesky factor ``L`` that a face fixes.

    Every singular ``Sigma = LL'`` has a lower-triangular factor with a zero on the diagonal,
    so the boundary is the union of the faces :math:`L_{kk} = 0`. With :math:`L_{kk} = 0` the
    entries :math:`L_{ik}` (``i > k``) are redundant (the rows below can be rotated to drop
    them) and are fixed at zero as well:

    - ``kind="drop"``: effect ``k`` removed: :math:`L_{kk} = 0`, :math:`L_{kj} = 0` (``j < k``),
      :math:`L_{ik} = 0` (``i > k``): ``var(e_k) = 0`` and the other effects free;
    - ``kind="rank"`` (``k >= 1``): :math:`L_{kk} = 0`, :math:`L_{ik} = 0` (``i > k``): effect
      ``k`` is an exact linear combination of effects ``0..k-1`` (for ``d = 2``:
      :math:`\operatorname{corr}(u_0, v) = \pm 1`).

    Examples
    --------
    >>> face_fixed(2, "rank", 1)
    [(1, 1)]
    >>> face_fixed(2, "drop", 0)
    [(0, 0), (1, 0)]
    """
    out = [(k, k)]
    if kind == "drop":
        out += [(k, j) for j in range(k)]
    out += [(i, k) for i in range(k + 1, d)]
    return out


def reference_variances(lik: Likelihood, natural: np.ndarray) -> np.ndarray:
    """Reference variance of every school effect: residual variance over ``mean(z^2)`` for ``u``,
    1 for ``v`` and ``1 / mean(g^2)`` for ``v0, v1, ...`` of ``scale_re_formula`` (as
    :func:`mlsml.diagnostics.singular_reasons` judges them)."""
    lay = lik.layout
    design = lik.design
    resid = float(np.exp(np.clip(design.mean_log_variance_index(natural[lay.p : lay.p + lay.k]), -700, 700)))
    ref = np.ones(lay.d)
    z2 = design.mean_squares("Z")
    for i in range(lay.q):
        ref[i] = resid / max(float(z2[i]), 1e-300)
    if lay.scale_re_terms and design.G is not None:
        g2 = design.mean_squares("G")
        for i in range(lay.n_v):
            ref[lay.q + i] = 1.0 / max(float(g2[i]), 1e-300)
    return ref


def off_face(lik: Likelihood, theta) -> np.ndarray:
    """``theta`` with every vanished direction of ``Sigma`` given :data:`FACE_ZERO` of its reference variance.

    Each diagonal entry of the Cholesky factor whose square is below ``FACE_ZERO`` times the
    reference variance of its effect (:func:`reference_variances`) is raised to that level:
    where the faces keep their removed directions. The product rule of
    :func:`boundary_likelihood` cannot be evaluated much closer to a face (its mode search
    meets an exactly singular block: NaN at ``var(u0) = 5.9e-12``), and the log-likelihood
    differs by about ``FACE_ZERO`` times its score in that log-variance.
    """
    lay = lik.layout
    theta = np.array(theta, dtype=float)
    if lay.d == 0:
        return theta
    off = lay.chol_offset
    free = list(lay.free_chol)
    L = np.asarray(lay.split(theta)[2], dtype=float)
    ref = reference_variances(lik, np.asarray(lay.to_natural(theta), dtype=float))
    for k in range(lay.d):
        floor = np.sqrt(FACE_ZERO * ref[k])
        if L[k, k] < floor and _psi_index(k, k) in free:
            theta[off + free.index(_psi_index(k, k))] = np.log(floor)
    return theta


def probe_value(lik: Likelihood, theta, probe: Likelihood | None = None) -> tuple[np.ndarray, float]:
    """``(point, value)``: ``probe`` (default: the product rule of :func:`boundary_likelihood`) at
    ``theta``, or, where it cannot be evaluated there, at :func:`off_face` of it (NaN if neither can)."""
    probe = boundary_likelihood(lik) if probe is None else probe
    theta = np.asarray(theta, dtype=float)
    value = value_or_nan(probe, theta)
    if np.isfinite(value):
        return theta, value
    point = off_face(lik, theta)
    return point, value_or_nan(probe, point)


def _face_start(L: np.ndarray, kind: str, k: int, sign: float, free_row: list[int] | None = None) -> np.ndarray:
    """The start on a face: the fit's factor ``L`` with the face's entries fixed, variances kept.

    For ``kind="rank"`` row ``k`` keeps its length (``var(e_k)``) but loses its own
    direction, ``L[k, :k]`` scaled up (or, when zero, along the first effect of ``free_row``,
    the entries of the row that covariance constraints leave free; default all), times ``sign``.
    """
    L = L.copy()
    d = L.shape[0]
    for i, j in face_fixed(d, kind, k):
        if i != j:
            L[i, j] = 0.0
    if kind == "rank":
        length = np.sqrt(np.sum(L[k, : k + 1] ** 2))
        row = L[k, :k].copy()
        norm = np.sqrt(np.sum(row**2))
        first = (free_row or [0])[0]
        row = row / norm if norm > 1e-8 * length else np.eye(k)[first]
        L[k, :k] = sign * length * row
    L[k, k] = 0.0
    return L


def face_name(names, kind: str, k: int, L: np.ndarray) -> str:
    """The face in words: ``var(e) = 0``, ``corr(e,f) = +1/-1``, or ``e is a combination of ...``."""
    if kind == "drop":
        return f"var({names[k]}) = 0"
    row = L[k, :k]
    big = np.flatnonzero(np.abs(row) > 1e-6 * max(np.abs(row).max(), 1e-300))
    S = L @ L.T
    if len(big) == 1 and np.count_nonzero(np.abs(L[big[0], : big[0] + 1]) > 1e-6 * np.sqrt(S[big[0], big[0]])) == 1:
        j = int(big[0])
        return f"corr({names[j]},{names[k]}) = {'+1' if row[j] * L[j, j] > 0 else '-1'}"
    return f"{names[k]} is an exact linear combination of " + ", ".join(names[:k])


def _fit_face(
    probe: Likelihood, start: np.ndarray, free: np.ndarray, zero_at: dict[int, float] | None = None
) -> tuple[np.ndarray, float]:
    r"""Maximise ``probe`` over the entries ``free`` of ``theta`` (the others fixed).

    Newton's method with the exact Hessian, its eigenvalues made negative (absolute values
    floored at ``1e-8`` of the largest: the starts on a face are not near its maximum) and
    step halving; then BFGS if Newton stalls. Each point's nodes are adapted once, for its
    value, gradient and Hessian: at a nearly singular ``Sigma`` the mode search is slow (30 ms
    against 6 ms at the fit on 160 rows), so the few Newton iterations cost less than BFGS's
    many line searches.

    ``zero_at`` maps positions of ``theta`` (free log-Cholesky diagonal entries
    :math:`\psi_{kk} = \log L_{kk}`) to the value at which that entry's direction has vanished
    as far as the faces represent a zero (:data:`FACE_ZERO`). An iterate below it has slid
    onto a sub-face, which lies in the face :math:`L_{kk} = 0` searched on its own: the fit
    stops there with the value reached. (A rank face of a random slope in 43 schools slid
    ``psi`` from -3.4 to -15.8 by unit Newton steps and 30-fold step halvings in the rounding
    noise of a vanished variance: 1.0 of the face search's 2.1 CPU-s.)
    """
    idx = np.flatnonzero(free)
    zero_at = {} if zero_at is None else zero_at
    slid = np.array([i for i in zero_at if free[i]], dtype=int)
    floors = np.array([zero_at[i] for i in slid], dtype=float)

    def full(phi):
        th = start.copy()
        th[idx] = phi
        return th

    def at(phi):
        """Value, gradient (in ``free``) and the nodes adapted at ``phi`` (``-inf`` where it fails)."""
        try:
            with np.errstate(all="ignore"):
                nodes = probe.adapt(full(phi))
                v, g = probe.value_and_grad(full(phi), nodes)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return -np.inf, np.zeros_like(phi), None
        g = np.asarray(g, dtype=float)[idx]
        if not (np.isfinite(v) and np.all(np.isfinite(g))):
            return -np.inf, np.zeros_like(phi), None
        return float(v), g, nodes

    def fun(phi):
        return at(phi)[:2]

    phi = start[idx].copy()
    f0, g0, nodes0 = at(phi)
    converged = False
    for _ in range(FACE_NEWTON_STEPS):
        if not np.isfinite(f0):
            break
        try:  # at the nodes the value and gradient were taken at: one mode search per point
            with np.errstate(all="ignore"):
                H = np.asarray(probe.hessian(full(phi), nodes0), dtype=float)[np.ix_(idx, idx)]
            w, V = np.linalg.eigh(-0.5 * (H + H.T))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            break
        if not np.all(np.isfinite(w)):
            break
        w = np.maximum(np.abs(w), 1e-8 * max(np.abs(w).max(), 1e-300))
        step = V @ ((V.T @ g0) / w)
        decrement = float(g0 @ step)
        if decrement < FACE_DECREMENT:
            converged = True
            break
        for _half in range(30):
            f1, g1, nodes1 = at(phi + step)
            if f1 >= f0:
                break
            step = 0.5 * step
        else:  # no ascent along a Newton direction: converged unless the decrement is large
            converged = decrement < FACE_STALL_DECREMENT
            break
        phi, f0, g0, nodes0, gained = phi + step, f1, g1, nodes1, f1 - f0
        if gained < FACE_DECREMENT:  # e.g. a variance sliding to zero: a sub-face, also searched
            converged = True
            break
        if slid.size and np.any(full(phi)[slid] < floors):  # on a sub-face, also searched
            converged = True
            break
    if not converged and np.isfinite(f0):  # Newton stalled: quasi-Newton from where it got

        def neg(x):
            f, g = fun(x)
            return (-f, -g) if np.isfinite(f) else (np.inf, np.zeros_like(x))

        r = sopt.minimize(neg, phi, jac=True, method="BFGS", options={"maxiter": FACE_MAXITER, "gtol": 1e-6})
        if np.isfinite(r.fun) and -r.fun > f0:
            phi, f0 = np.asarray(r.x, dtype=float), -float(r.fun)
    return full(phi), f0


def search_faces(lik: Likelihood, theta, probe: Likelihood | None = None) -> list[Face]:
    r"""Maximise the log-likelihood on every face of the boundary of ``Sigma`` (issue 12).

    A fit that ends on the boundary (say at ``var(u0) = 0``) is a maximum of that face, but
    the maximum over the closed parameter space can lie on another face (``var(u0)`` small
    with :math:`|\operatorname{corr}(u_0, v)| = 1`). The faces are those of
    :func:`face_fixed`: every school effect removed (``var(e) = 0``) and every rank
    reduction :math:`L_{kk} = 0` (for ``d = 2`` the correlation at ``+1`` and at ``-1``, two
    starts of one face). With covariances fixed at zero (``cov_constraints``,
    ``association="none"``) the faces are those of the constrained space: the fixed entries
    of ``L`` stay at zero, and a rank face exists only for a row with a free entry before
    the diagonal (else :math:`L_{kk} = 0` is the drop face). On each, ``beta``, ``alpha`` and
    the rest of ``Sigma`` are free, the removed direction is kept at :data:`FACE_ZERO` of its
    variance, and the log-likelihood is that of :func:`face_likelihood`. A vanished variance
    starts at :data:`FACE_START_FRACTION` of its reference.

    Parameters
    ----------
    lik : Likelihood
        The fit's likelihood (a core model).
    theta : ndarray
        The fit's estimates (optimiser scale).
    probe : Likelihood, optional
        The rule the faces are fitted with; default :func:`face_likelihood` (the product rule
        :func:`boundary_likelihood` gives the same maxima at ``K^d`` instead of ``K`` nodes per school).

    Returns
    -------
    list of Face
        Best first; ``gain`` is relative to the product-rule log-likelihood at ``theta``.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> [f.name for f in search_faces(res.likelihood, res.theta)]  # doctest: +SKIP
    ['corr(u0,v) = -1', 'var(u0) = 0', 'var(v) = 0', 'corr(u0,v) = +1']
    """
    lay = lik.layout
    d = lay.d
    if d == 0 or lay.bs_terms or lay.scale_re_terms or lay.quad_assoc:
        return []  # the faces are those of one Sigma of the core model
    probe = face_likelihood(lik) if probe is None else probe
    theta = np.asarray(theta, dtype=float)
    natural = np.asarray(lay.to_natural(theta), dtype=float)
    off = lay.p + lay.k
    # covariances fixed at 0 (cov_constraints, association="none") are entries of L fixed at 0
    # and absent from theta (mlsml.params): a face of the constrained space fixes more of them
    free_chol = list(lay.free_chol)
    S = lay.sigma_from_natural(natural)
    ref = reference_variances(lik, natural)
    var0 = np.where(np.diag(S) > 1e-4 * FACE_START_FRACTION * ref, np.diag(S), FACE_START_FRACTION * ref)
    sd = np.sqrt(np.clip(np.diag(S), 1e-300, None))
    R = np.clip(S / np.outer(sd, sd), -1.0, 1.0) * 0.99 + 0.01 * np.eye(d)  # away from singular to start
    L0 = np.linalg.cholesky(R * np.outer(np.sqrt(var0), np.sqrt(var0)))
    # NaN: the rule check below fails and no face is reported
    point, base = probe_value(lik, theta, probe)
    check = _check_rule(probe)
    if not _face_rule_accurate(check, point, base):
        # the product rule is not accurate at the fit itself (small schools, a large var(v)):
        # a face's gain over it would be the rule's error (a face 2.1 "higher" than a fit that
        # an independent route confirmed as the maximum), so no face is reported
        return []
    # a rank face needs a free L[k, j], j < k (else L_kk = 0 is the drop face: var(e_k) = 0)
    rank_rows = [k for k in range(1, d) if any(_psi_index(k, j) in free_chol for j in range(k))]
    jobs = [("drop", k, 1.0) for k in range(d)] + [("rank", k, s) for k in rank_rows for s in (1.0, -1.0)]
    faces = []
    for kind, k, sign in jobs:
        L = _face_start(L0, kind, k, sign, [j for j in range(k) if _psi_index(k, j) in free_chol])
        L[k, k] = np.sqrt(FACE_ZERO * var0[k])
        start = np.concatenate([theta[:off], vector_from_chol(L)[free_chol], theta[off + len(free_chol) :]])
        free = np.ones(theta.shape, dtype=bool)
        for i, j in face_fixed(d, kind, k):
            if _psi_index(i, j) in free_chol:
                free[off + free_chol.index(_psi_index(i, j))] = False
        # a free diagonal entry of L at the faces' zero: the iterate is on a sub-face
        zero_at = {
            off + free_chol.index(_psi_index(j, j)): 0.5 * np.log(FACE_ZERO * var0[j])
            for j in range(d)
            if _psi_index(j, j) in free_chol
        }
        th, llf = _fit_face(probe, start, free, zero_at)
        if not np.isfinite(llf) or not _face_rule_accurate(check, th, llf):
            continue
        full = np.zeros(d * (d + 1) // 2)
        full[free_chol] = th[off : off + len(free_chol)]
        Lf = np.asarray(chol_from_vector(full, d), dtype=float)
        name = face_name(lay.re_names, kind, k, Lf)
        faces.append(Face(name, float(llf), float(llf - base), th, off + free_chol.index(_psi_index(k, k))))
    faces.sort(key=lambda f: -f.llf)
    seen, out = set(), []
    for f in faces:  # two starts of a face can end on the same side
        if f.name not in seen:
            seen.add(f.name)
            out.append(f)
    return out


#: A diagonal entry of the Cholesky factor below this fraction of its row's length (the
#: school effect's SD) puts the fit on a face of the boundary for :func:`interior_starts`
#: (``|corr| > 1 - 5e-7`` for two effects, or a vanished variance).
ON_FACE_RATIO = 1e-3

#: :func:`interior_starts` moves such an entry to this fraction of the row's length
#: (``|corr| = 0.98`` for two effects), and a vanished variance to
#: :data:`INSIDE_VARIANCE_FRACTION` of its reference variance.
INSIDE_RATIO = 0.2
INSIDE_VARIANCE_FRACTION = 0.01


def interior_starts(lik: Likelihood, theta) -> list[np.ndarray]:
    r"""Starts just inside the boundary, one per face the fit is on (issue 12).

    On the row-wise log-Cholesky scale a face :math:`L_{kk} = 0` lies at
    :math:`\psi_{kk} = \log L_{kk} = -\infty`, where the gradient in :math:`\psi_{kk}`,
    :math:`L_{kk}\,\partial\ell/\partial L_{kk}`, vanishes whatever the likelihood does
    inside. A quasi-Newton run that drifted towards a face therefore stops there as if
    converged, even when the maximum is interior: in a fuzz case of 29 schools with a
    random slope the fit stopped at :math:`\operatorname{corr}(u_0, u_1) = -1`, 0.008 below
    the maximum at :math:`-0.991`. For every :math:`k` with
    :math:`L_{kk} < \rho\,\lVert L_{k\cdot}\rVert` (:data:`ON_FACE_RATIO`) the start sets

    .. math::

        L_{kk} = \max\bigl(r\,\lVert L_{k\cdot}\rVert,\;
                 \sqrt{f\,\sigma^2_{\mathrm{ref},k}}\bigr)

    with :math:`r` = :data:`INSIDE_RATIO`, :math:`f` = :data:`INSIDE_VARIANCE_FRACTION`
    and the reference variance of :func:`reference_variances`, the rest of ``theta`` kept.

    Parameters
    ----------
    lik : Likelihood
        The fit's likelihood (a core model; other classes give no starts).
    theta : ndarray
        The fit's estimates (optimiser scale).

    Returns
    -------
    list of ndarray
        One ``theta`` per face the fit is on (empty for an interior fit).
    """
    lay = lik.layout
    if lay.d == 0 or lay.bs_terms or lay.scale_re_terms or lay.fixed_cov or lay.quad_assoc:
        return []
    theta = np.asarray(theta, dtype=float)
    off = lay.chol_offset
    L = np.asarray(chol_from_vector(theta[off : off + lay.n_chol], lay.d), dtype=float)
    ref = reference_variances(lik, np.asarray(lay.to_natural(theta), dtype=float))
    starts = []
    for k in range(lay.d):
        length = float(np.sqrt(np.sum(L[k, : k + 1] ** 2)))
        if L[k, k] >= ON_FACE_RATIO * max(length, np.sqrt(ref[k])):
            continue
        th = theta.copy()
        th[off + _psi_index(k, k)] = np.log(max(INSIDE_RATIO * length, np.sqrt(INSIDE_VARIANCE_FRACTION * ref[k])))
        starts.append(th)
    return starts


# ---------------------------------------------------------------- singular fits: reduced-rank information

#: The reduced information (degenerate directions dropped, scaled to unit diagonal) counts as
#: positive definite when its smallest eigenvalue exceeds this.
REDUCED_PD_TOL = 1e-10


def degenerate_natural(layout, degenerate) -> list[int]:
    """Positions in the natural-scale vector of the entries of ``Sigma`` a degenerate direction leaves undetermined.

    ``("drop", e)``: ``var(e)`` and every ``cov(e, .)`` (with ``bs_formula`` and ``e = u0``: every
    ``bsvar:`` coefficient, the model of the vanished ``var(u0_j)``); ``("rank", k)``: every
    ``cov(., k)`` (effect ``k`` is a combination of the others: its covariances follow from the
    variances). Found by name (:attr:`mlsml.params.ParamLayout.names`), so every layout
    (covariances fixed at zero, ``bsvar:``, ``quad(u0,v)``) is covered.

    Examples
    --------
    >>> from mlsml.params import ParamLayout
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True, bs_terms=("Intercept", "s"))
    >>> [lay.names[i] for i in degenerate_natural(lay, [("drop", 0)])]
    ['bsvar:Intercept', 'bsvar:s', 'cov(u0,v)']
    """
    names = list(layout.names)
    re = layout.re_names
    out = set()
    for kind, k in degenerate:
        if kind == "drop":
            out.add(f"var({re[k]})")
            if k == 0 and layout.bs_terms:
                out.update(f"bsvar:{t}" for t in layout.bs_terms)
        out.update(f"cov({re[i]},{re[j]})" for i, j in layout.free_cov_pairs if k in (i, j))
    return sorted(names.index(n) for n in out if n in names)


def degenerate_theta(layout, degenerate) -> list[int]:
    """Positions in ``theta`` of the parameters a degenerate direction leaves flat (:func:`face_fixed`).

    The free log-Cholesky entries the face fixes; with ``bs_formula`` the face ``("drop", 0)``
    (``var(u0_j) = exp(s_j' tau) -> 0`` in every school) is not a face of ``L0`` (whose
    ``[0, 0]`` entry is 1) but ``tau -> -inf``: there ``tau`` and the first column of ``L0``
    are flat.

    Examples
    --------
    >>> from mlsml.params import ParamLayout
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True, scale_re_terms=("Intercept", "x"))
    >>> degenerate_theta(lay, [("drop", 2)])  # v1: L[2, 0], L[2, 1], log L[2, 2]
    [5, 6, 7]
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True, bs_terms=("Intercept",))
    >>> degenerate_theta(lay, [("drop", 0)])  # tau and L0[1, 0]
    [2, 3]
    """
    off = layout.chol_offset
    free = list(layout.free_chol)  # entries of L fixed by cov_constraints (or L0[0, 0]) are not in theta
    out = {
        off + free.index(_psi_index(i, j))
        for kind, k in degenerate
        for i, j in face_fixed(layout.d, kind, k)
        if _psi_index(i, j) in free
    }
    if layout.bs_terms and ("drop", 0) in [tuple(x) for x in degenerate]:
        out.update(range(layout.p + layout.k, layout.p + layout.k + layout.m))
    return sorted(out)


def covariance_rule(lik: Likelihood, theta) -> Likelihood:
    """The rule whose Hessian gives the standard errors at a singular fit (:func:`reduced_rank_covariance`).

    The fit's own u-exact rule where its value is in the u-given-v form (where
    :func:`face_likelihood` fits the faces by it): exact at a singular ``Sigma``, where the product rule's
    Hessian at nodes adapted to it can be wrong (a ``var(v)`` SE 25% below central differences
    of the values, fuzz case 1702248772874852229).

    Otherwise the product rule of :func:`boundary_likelihood`, so that a fit has the same standard errors
    under both rules -- unless the fit's own rule is another one, the two differ at ``theta``
    by more than :data:`FACE_RULE_TOL`, and the product rule is the inaccurate one (about twice
    the points move it by more than :data:`FACE_RULE_TOL`, the test of the face search). Then
    the fit's own rule. With ``association="quadratic"`` at ``corr(u0,v) = -1`` (40 schools of
    2-22) the product rule was 40 log-likelihood units below the u-exact rule and moved by 14
    with 23 points; its information gave an SE of 0.036 for the intercept against 0.094 from
    the fit's rule, which central differences of the fit's rule's values confirm (0.094).
    """
    probe = boundary_likelihood(lik)
    if probe is lik or face_likelihood(lik) is lik:
        return lik  # the u-given-v form: exact at a singular Sigma, where the product rule's Hessian is not
    with np.errstate(all="ignore"):
        product = value_or_nan(probe, theta)
        if abs(value_or_nan(lik, theta) - product) <= FACE_RULE_TOL:
            return probe
    check = _check_rule(probe)
    return probe if np.isfinite(product) and _face_rule_accurate(check, np.asarray(theta, dtype=float), product) else lik


def reduced_rank_covariance(hessian: np.ndarray, layout, theta, degenerate) -> np.ndarray | None:
    r"""Covariance of the natural-scale estimates at a singular fit, from the reduced-rank information.

    At a fit on a face of the boundary (:func:`face_fixed`) the log-likelihood is flat in the
    log-Cholesky parameters that the face holds fixed (:func:`degenerate_theta`), so the
    observed information :math:`-H` is singular and cannot be inverted. As lme4 does for the
    fixed effects at a singular fit, those parameters are dropped (set ``D``) and the rest
    inverted:

    .. math::

        V_\theta = [-H_{\bar D \bar D}]^{-1}, \qquad
        V = J_{\cdot \bar D}\, V_\theta\, J_{\cdot \bar D}'

    with ``J`` the Jacobian of the natural parameters (:meth:`mlsml.params.ParamLayout.natural_jacobian`).
    These are the standard errors of ``beta``, ``alpha`` and the determined entries of
    ``Sigma`` given that the fit is on that face; the entries the face leaves undetermined
    (:func:`degenerate_natural`) are NaN.

    Parameters
    ----------
    hessian : ndarray
        Hessian of the log-likelihood at ``theta`` (optimiser scale).
    layout : ParamLayout
        The layout of any model class: one ``Sigma`` (``Sigma0`` with ``bs_formula``) of the
        school effects, whatever enters the log variance (``scale_re_formula``,
        ``quad(u0,v)``) and whichever covariances are fixed at zero.
    theta : ndarray
        The estimates (optimiser scale).
    degenerate : sequence of (kind, k)
        The faces the fit is on (``("drop", e)`` or ``("rank", k)``, as in :func:`face_fixed`).

    Returns
    -------
    ndarray or None
        ``(n_params, n_params)``; ``None`` when the reduced information is not positive
        definite either (its smallest eigenvalue, at unit diagonal, below :data:`REDUCED_PD_TOL`).

    Examples
    --------
    A singular information (the last parameter has no curvature) loses only its own row:

    >>> from mlsml.params import ParamLayout
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
    >>> theta = lay.theta_from_parts([0.0], [0.0], [[1.0, 0.5], [0.5, 0.25 + 1e-12]])
    >>> H = -np.diag([4.0, 1.0, 2.0, 1.0, 0.0])
    >>> V = reduced_rank_covariance(H, lay, theta, [("rank", 1)])
    >>> np.sqrt(np.diag(V)).round(3).tolist()[:2], bool(np.isnan(V[-1, -1]))
    ([0.5, 1.0], True)
    """
    theta = np.asarray(theta, dtype=float)
    H = np.asarray(hessian, dtype=float)
    n = layout.n_params
    fixed = set(degenerate_theta(layout, degenerate))
    keep = np.array([i for i in range(n) if i not in fixed], dtype=int)
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(theta))) or keep.size == 0:
        return None
    A = -0.5 * (H + H.T)[np.ix_(keep, keep)]
    diag = np.diag(A)
    if not np.all(diag > 0):
        return None
    scale = np.sqrt(diag)
    As = A / np.outer(scale, scale)
    try:
        w, V = np.linalg.eigh(As)
    except np.linalg.LinAlgError:
        return None
    if not w.min() > REDUCED_PD_TOL:
        return None
    cov_red = ((V / w) @ V.T) / np.outer(scale, scale)
    jac = layout.natural_jacobian(theta)[:, keep]
    cov = jac @ cov_red @ jac.T
    cov = 0.5 * (cov + cov.T)
    bad = degenerate_natural(layout, degenerate)
    cov[bad, :] = np.nan
    cov[:, bad] = np.nan
    return cov
