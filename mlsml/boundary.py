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

import numpy as np

from .likelihood import Likelihood
from .params import chol_from_vector, sigma_derivatives

#: Likelihood-ratio statistic below which an effect counts as at the boundary.
BOUNDARY_LR = 1e-3

#: The probes run unless every quantity they move to zero is this many squared standard
#: errors away from it (a Wald z of 5): 25,000 times BOUNDARY_LR, so the quadratic
#: approximation would have to over-state the fall of the log-likelihood 25,000-fold for a
#: skipped probe to have found anything (see the module docstring; London Models 3 and 6
#: have z of 6 to 14).
FAR_FROM_BOUNDARY_Z2 = 25.0

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
    off = layout.p + layout.k
    try:
        w, V = np.linalg.eigh(-0.5 * (H + H.T))
    except np.linalg.LinAlgError:
        return None
    if not w.min() > 0:
        return None
    cov = ((V / w) @ V.T)[off:, off:]  # covariance of the log-Cholesky parameters
    L = np.asarray(chol_from_vector(theta[off:], d), dtype=float)
    S = L @ L.T
    dS = sigma_derivatives(L)  # (n_psi, d, d)
    values = [S[e, e] for e in range(d)]
    grads = [dS[:, e, e] for e in range(d)]
    if d > 1:
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
    if lay.d > 1 and not out:
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
