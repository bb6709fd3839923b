"""Model diagnostics computed from a fit (numbers, not figures).

- :func:`diagnose`: everything the results object reports about the fit, computed
  from the likelihood and the optimiser summary *before* the results are built
  (:class:`Diagnostics`): whether the observed information is positive definite,
  the boundary probes (:mod:`mlsml.boundary`), the quadrature check with about
  twice the points, and the reasons a fit is singular.
- :func:`standardised_residuals`: the students' residuals from their school's
  predicted mean, divided by their predicted residual standard deviation.

The figures built on them (histograms with normal curves) are in
:mod:`mlsml.plots`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .boundary import BOUNDARY_LR, boundary_effects, far_from_boundary
from .likelihood import Likelihood
from .optimize import OptSummary, quadrature_check  # noqa: F401 - quadrature_check is part of this module's API
from .predict import fitted_moments

#: A variance of a school effect counts as zero below this fraction of its reference
#: (the residual variance for mean effects, 1 on the ln var(e) scale for ``v``).
ZERO_VARIANCE = 1e-6

#: The correlation matrix of the school effects counts as singular when its smallest
#: eigenvalue is below this.
SINGULAR_CORRELATION = 1e-6

#: The observed information counts as positive definite when its smallest eigenvalue
#: (in the units of the standardised fit) exceeds this fraction of its largest.
HESSIAN_PD_RTOL = 1e-10

#: A change of the log-likelihood above this with about twice the points gives a
#: :class:`~mlsml.errors.QuadratureWarning`.
QUADRATURE_TOL = 1e-4


@dataclass(frozen=True)
class Diagnostics:
    """What :func:`diagnose` found (passed to :class:`mlsml.results.MELSMResults`).

    Attributes
    ----------
    hessian_pd : bool
        Whether the observed information is positive definite.
    singular_reasons : tuple of str
        Why the fit is singular or at a boundary (empty if it is not).
    boundary : tuple
        The boundary probes of :func:`mlsml.boundary.boundary_effects`.
    quadrature_check : tuple or None
        ``(points, |llf(points) - llf|)`` with about twice the points, or ``None``.
    """

    hessian_pd: bool
    singular_reasons: tuple = ()
    boundary: tuple = ()
    quadrature_check: tuple | None = None
    extra: dict = field(default_factory=dict, compare=False)


def hessian_pd(optsum: OptSummary) -> bool:
    """Whether ``-H`` is positive definite, judged in the units of the standardised fit (:func:`mlsml.optimize.maximize`)."""
    H = np.asarray(optsum.hessian, dtype=float)
    negH = -0.5 * (H + H.T)
    units = optsum.theta_units
    try:
        w = np.linalg.eigvalsh(negH if units is None else negH * np.outer(units, units))
        return bool(w.min() > HESSIAN_PD_RTOL * max(w.max(), 1e-300))
    except np.linalg.LinAlgError:
        return False


def singular_reasons(lik: Likelihood, theta, boundary, pd_ok: bool) -> list[str]:
    """Why the fit is at a boundary: near-zero variances, correlations near +/-1 (see :meth:`mlsml.MELSMResults.singular_reasons`)."""
    lay = lik.layout
    design = lik.design
    natural = np.asarray(lay.to_natural(np.asarray(theta, dtype=float)), dtype=float)
    S = lay.sigma_from_natural(natural)
    fe_scale = natural[lay.p : lay.p + lay.k]
    reasons = []
    # compared on the log scale: exp(mean ln var(e)) overflowed for absurd estimates
    # (e.g. from huge start_params) and then every variance was "effectively zero"
    log_resid_var = float(np.mean(design.W @ fe_scale))
    for i, name in enumerate(lay.re_names):
        if name.startswith("v"):  # v, or v0, v1, ... (scale_re_formula)
            G = design.G
            log_ref = 0.0 if G is None else -np.log(max(float(np.mean(G[:, i - lay.q] ** 2)), 1e-300))
            of = "on the scale of ln var(e)"
        else:
            log_ref = log_resid_var - np.log(max(float(np.mean(design.Z[:, i] ** 2)), 1e-300))
            shown = f"exp({log_resid_var:.4g})" if abs(log_resid_var) > np.log(np.finfo(float).max) else f"{np.exp(log_resid_var):.3g}"
            of = f"times the residual variance, {shown}"
        if not S[i, i] > 0 or np.log(S[i, i]) < np.log(ZERO_VARIANCE) + log_ref:
            reasons.append(f"var({name}) = {S[i, i]:.3g} is effectively zero (below {ZERO_VARIANCE:g} {of})")
    sd = np.sqrt(np.clip(np.diag(S), 1e-300, None))
    R = S / np.outer(sd, sd)
    if lay.d > 1 and not reasons:
        ev = np.linalg.eigvalsh(R)
        if ev.min() < SINGULAR_CORRELATION:
            iu = np.triu_indices(lay.d, 1)
            worst = int(np.argmax(np.abs(R[iu])))
            i, j = iu[0][worst], iu[1][worst]
            reasons.append(
                f"the school effects are (nearly) perfectly correlated: corr({lay.re_names[i]},{lay.re_names[j]}) = {R[i, j]:.6f}"
            )
    reasons += lik.integrand.extra_singular_reasons(theta)
    for name, var, stat in boundary:
        if stat <= -BOUNDARY_LR:
            what = "making Sigma singular" if name == "rank" else f"dropping {name}"
            reasons.append(
                f"{what} raises the log-likelihood by {-stat / 2:.3g}: these estimates are not the "
                "maximum, the maximum is on the boundary"
            )
            continue
        if name == "rank":
            if any("correlated" in r for r in reasons):
                continue
            iu = np.triu_indices(lay.d, 1)
            worst = int(np.argmax(np.abs(R[iu])))
            i, j = iu[0][worst], iu[1][worst]
            reasons.append(
                f"Sigma is at the boundary: making the correlation matrix of the school effects singular "
                f"(smallest eigenvalue {var:.2g} -> 0; largest correlation corr({lay.re_names[i]},"
                f"{lay.re_names[j]}) = {R[i, j]:.6f}) changes 2*llf by only {-stat:+.1e}"
            )
        elif not any(r.startswith(f"var({name})") for r in reasons):
            reasons.append(  # the first check's threshold missed it
                f"var({name}) = {var:.3g} is at the boundary: dropping {name} changes 2*llf by only {-stat:+.1e}"
            )
    if not pd_ok:
        reasons.append("the observed information is not positive definite (standard errors unavailable)")
    return reasons


def diagnose(lik: Likelihood, optsum: OptSummary) -> Diagnostics:
    """All diagnostics of a fit, from its likelihood and optimiser summary.

    The boundary probes (:func:`mlsml.boundary.boundary_effects`) apply where the
    integrand is the core model (:attr:`mlsml.integrand.Integrand.core`), and run unless
    the fit converged with every variance and the smallest eigenvalue of the correlation
    matrix far from zero (:func:`mlsml.boundary.far_from_boundary`: then they cannot find
    anything).
    """
    theta = np.asarray(optsum.theta, dtype=float)
    pd_ok = hessian_pd(optsum)
    probe = lik.integrand.core and not (optsum.converged and far_from_boundary(lik.layout, theta, optsum.hessian))
    boundary = tuple(boundary_effects(lik, theta, optsum.llf)) if probe else ()
    return Diagnostics(
        hessian_pd=pd_ok,
        singular_reasons=tuple(singular_reasons(lik, theta, boundary, pd_ok)),
        boundary=boundary,
        # computed by the optimiser at these estimates (the same rule and points); again only for a hand-made summary
        quadrature_check=optsum.quadrature_check if optsum.quadrature_check is not None else quadrature_check(lik, theta, optsum.llf),
    )


def standardised_residuals(res) -> pd.Series:
    r"""Standardised student residuals.

    For student :math:`i` of school :math:`j`,

    .. math::

        r_{ij} = \frac{y_{ij} - x_{ij}'\hat\beta - z_{ij}'\,E(u_j \mid y)}
                      {\sqrt{\exp(w_{ij}'\hat\alpha)\, E(\exp(g_{ij}'v_j) \mid y)}}

    with the posterior expectations of the school effects at the estimates: the
    conditional predictions ``res.predict(kind="mean")`` and
    ``res.predict(kind="variance")`` (:func:`mlsml.predict.fitted_moments`), so every model
    class is covered (``g_ij = 1`` for the plain random scale; the variance slopes of
    ``scale_re_formula`` enter through ``g_ij``; without a random scale the expectation
    is 1). Under the model they are approximately standard normal (Figures S4-S6 of the paper).

    Parameters
    ----------
    res : MELSMResults
        A fitted model.

    Returns
    -------
    pandas.Series
        Named ``"std_resid"``, in the caller's row order, indexed by the row
        labels of the data used (rows removed for missing values are absent).

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.diagnostics import standardised_residuals
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> r = standardised_residuals(res)
    >>> r.name, len(r) == len(df), bool(abs(r.mean()) < 0.1 and abs(r.std() - 1) < 0.1)
    ('std_resid', True, True)
    """
    design = res.model.design
    y = np.empty(design.nobs)
    y[design.order] = design.y
    mean, var = fitted_moments(res)
    return pd.Series((y - mean) / np.sqrt(var), index=design.row_labels, name="std_resid")
