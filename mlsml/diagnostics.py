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
from .optimize import OptSummary, information_pd
from .predict import fitted_moments
from .quadrature import max_nagq
from .rescale import reparametrise

#: A variance of a school effect counts as zero below this fraction of its reference
#: (the residual variance for mean effects, 1 on the ln var(e) scale for ``v``).
ZERO_VARIANCE = 1e-6

#: The correlation matrix of the school effects counts as singular when its smallest
#: eigenvalue is below this.
SINGULAR_CORRELATION = 1e-6

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
    """Whether ``-H`` is positive definite: Cholesky on the standardised scale of the fit (:func:`mlsml.optimize.information_pd`)."""
    return information_pd(optsum)


def quadrature_check(lik: Likelihood, theta, llf: float) -> tuple[int, float] | None:
    """``(points, |llf(points) - llf|)`` with about twice the points, or ``None``.

    Only where it is cheap and informative: a random scale (otherwise the
    integrand is Gaussian and the rule exact), the core model, and at most
    two dimensions in the product rule (the u-exact rule is one-dimensional in ``v``).
    """
    lay = lik.layout
    if not lay.random_scale or not lik.integrand.core or not np.isfinite(llf):
        return None
    nagq = lik.spec.nagq
    more = min(2 * nagq + 1, max_nagq(lik.spec.dim(lay.q, lay.n_v)))
    if more <= nagq:
        return None
    if not lik.spec.uexact and lay.d > 2:
        return None
    with np.errstate(all="ignore"):
        value = lik.with_spec(nagq=more).value(theta)
    return more, abs(value - llf)


def singular_reasons(lik: Likelihood, theta, boundary, pd_ok: bool, theta_std=None) -> list[str]:
    """Why the fit is at a boundary: near-zero variances, correlations near +/-1 (see :meth:`mlsml.MELSMResults.singular_reasons`).

    ``theta_std`` (the estimates on the standardised scale of the fit,
    :attr:`mlsml.optimize.OptSummary.theta_std`) decides whether the correlation matrix
    is singular: a random slope on ``x + 1e6`` has ``corr(u0, u1) = -0.99999999`` in the
    original parametrisation (the intercept effect is the school effect at ``x = 0``, a
    million units away) without any singularity; with the covariates centred it does not.
    """
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
    R_dec = R
    if theta_std is not None and lay.d > 1 and not lay.bs_terms:
        S_std = lay.sigma_from_natural(np.asarray(lay.to_natural(np.asarray(theta_std, dtype=float)), dtype=float))
        sd_std = np.sqrt(np.clip(np.diag(S_std), 1e-300, None))
        R_dec = S_std / np.outer(sd_std, sd_std)
    if lay.d > 1 and not reasons:
        ev = np.linalg.eigvalsh(R_dec)
        if ev.min() < SINGULAR_CORRELATION:
            iu = np.triu_indices(lay.d, 1)
            worst = int(np.argmax(np.abs(R_dec[iu])))
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

    The probes and the quadrature check evaluate the likelihood on the standardised
    scale the optimiser worked on (:func:`mlsml.rescale.reparametrise`): on the original
    design a covariate such as ``x + 1e6`` costs the evaluation about ``1e-3`` of
    log-likelihood in rounding, as much as the differences the checks look for. Their
    statistics (differences of log-likelihoods) are the same on both scales.
    """
    theta = np.asarray(optsum.theta, dtype=float)
    pd_ok = hessian_pd(optsum)
    lik_c, theta_c, llf_c, hess_c = lik, theta, optsum.llf, optsum.hessian
    if optsum.theta_std is not None:
        rp = reparametrise(lik.design)
        if not rp.identity:
            lik_c, theta_c = lik.with_design(rp.design), np.asarray(optsum.theta_std, dtype=float)
            llf_c, hess_c = optsum.llf + rp.log_shift, optsum.hessian_std
    probe = lik.integrand.core and not (optsum.converged and far_from_boundary(lik.layout, theta_c, hess_c))
    boundary = tuple(boundary_effects(lik_c, theta_c, llf_c)) if probe else ()
    return Diagnostics(
        hessian_pd=pd_ok,
        singular_reasons=tuple(singular_reasons(lik, theta, boundary, pd_ok, optsum.theta_std)),
        boundary=boundary,
        quadrature_check=quadrature_check(lik_c, theta_c, llf_c),
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
