"""Model diagnostics computed from a fit (numbers, not figures).

- :func:`diagnose`: everything the results object reports about the fit, computed
  from the likelihood and the optimiser summary *before* the results are built
  (:class:`Diagnostics`): whether the observed information is positive definite,
  the boundary probes (:mod:`mlsml.boundary`), the quadrature check with about
  twice the points, and the reasons a fit is singular.
- :func:`standardised_residuals`: the students' residuals from their school's
  predicted mean, divided by their predicted residual standard deviation.
- :func:`tail_check`: whether those residuals have heavier tails within schools than
  the normal distribution the model assumes (their within-school kurtosis against its
  simulated reference), since heavy tails inflate the variance of the random scale.

The figures built on them (histograms with normal curves) are in
:mod:`mlsml.plots`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from .boundary import (
    BOUNDARY_LR,
    FACE_LLF_TOL,
    boundary_effects,
    covariance_rule,
    face_likelihood,
    face_name,
    far_from_boundary,
    interior_starts,
    probe_value,
    reduced_rank_covariance,
    reference_variances,
    search_faces,
    weakly_determined,
)
from .design import Design
from .integrand import Integrand
from .likelihood import Likelihood
from .optimize import FALLBACK_METHOD, FitOptions, OptSummary, information_pd, maximize, quadrature_check
from .predict import fitted_moments
from .rescale import reparametrise
from .validate import plain_value

#: A variance of a school effect counts as zero below this fraction of its reference
#: (the residual variance for mean effects, 1 on the ln var(e) scale for ``v``).
ZERO_VARIANCE = 1e-6

#: The correlation matrix of the school effects counts as singular when its smallest
#: eigenvalue is below this.
SINGULAR_CORRELATION = 1e-6

#: The reason given when the observed information is not positive definite.
NOT_PD_REASON = "the observed information is not positive definite (standard errors unavailable)"

#: A school counts as fitted exactly when its residual variance at its posterior mode of ``v``
#: is below this fraction of the model's (:func:`collapse_note`): a residual SD below 1% of
#: the model's. (1e-6 until 2026-11-29: with the u-exact rule exact near
#: ``|corr(u0, v)| = 1`` (the u-given-v form) the 7-school fuzz case 1478415917575154483
#: stops, not converged, at ``var(v) = 21`` with its one-row school at 4e-6, not at
#: ``var(v) = 96`` and 1e-12 as with the precision form.)
COLLAPSE_VARIANCE = 1e-4

#: Points of the grid in ``v`` on which :func:`collapse_note` finds each school's mode.
COLLAPSE_GRID = 241

#: A change of the log-likelihood above this with about twice the points gives a
#: :class:`~mlsml.errors.QuadratureWarning`.
QUADRATURE_TOL = 1e-4

#: :func:`tail_check` uses the schools with at least this many rows (the sample kurtosis
#: of 2 or 3 values is a constant, 1 and 1.5, whatever the distribution).
TAIL_MIN_SIZE = 4

#: :attr:`TailCheck.heavy` when the simulated p-value is below this.
TAIL_ALPHA = 0.01

#: Default number of simulated reference data sets of :func:`tail_check` (p-values in steps of 0.001).
TAIL_N_SIM = 999

#: Default seed of :func:`tail_check` (the check of a given fit is reproducible).
TAIL_SEED = 20190101

#: :func:`tail_note` simulates the reference only when the statistic is this many
#: (normal-approximation) standard deviations above its mean: the simulated p-value
#: cannot be below :data:`TAIL_ALPHA` otherwise (the reference is skewed to the right).
TAIL_SCREEN_Z = 2.0

#: Levels of :attr:`TailCheck.reference_quantiles`.
TAIL_QUANTILES = (0.05, 0.5, 0.95, 0.99)

#: A school's residuals count as all equal (no kurtosis) when their variance is below this
#: fraction of their mean square: what remains is rounding.
TAIL_EQUAL = 1e-20

#: Simulated standard normals per block of :func:`tail_check`'s reference (bounds its memory).
TAIL_BLOCK = 2_000_000


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
    faces : tuple of Face
        The maxima on the faces of the boundary (:func:`mlsml.boundary.search_faces`), best
        first; empty unless the fit is on the boundary.
    degenerate : tuple
        The faces the fit is on, ``("drop", e)`` or ``("rank", k)`` (:func:`degenerate_directions`).
    reduced_cov : ndarray or None
        At a singular fit whose information is not positive definite: the covariance of the
        estimates from the reduced-rank information (:func:`singular_covariance`), NaN for the
        undetermined entries of ``Sigma``.
    collapse : str or None
        At a fit that did not converge: why the likelihood may have no maximum, when a school
        is fitted exactly (:func:`collapse_note`).
    """

    hessian_pd: bool
    singular_reasons: tuple = ()
    boundary: tuple = ()
    quadrature_check: tuple | None = None
    faces: tuple = ()
    degenerate: tuple = ()
    reduced_cov: np.ndarray | None = field(default=None, compare=False, repr=False)
    collapse: str | None = None
    extra: dict = field(default_factory=dict, compare=False)


def hessian_pd(optsum: OptSummary) -> bool:
    """Whether ``-H`` is positive definite: Cholesky on the standardised scale of the fit (:func:`mlsml.optimize.information_pd`)."""
    return information_pd(optsum)


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
    log_resid_var = design.mean_log_variance_index(fe_scale)
    for i, name in enumerate(lay.re_names):
        if name.startswith("v"):  # v, or v0, v1, ... (scale_re_formula)
            has_g = bool(lay.scale_re_terms) and design.G is not None
            log_ref = -np.log(max(float(design.mean_squares("G")[i - lay.q]), 1e-300)) if has_g else 0.0
            of = "on the scale of ln var(e)"
        else:
            log_ref = log_resid_var - np.log(max(float(design.mean_squares("Z")[i]), 1e-300))
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
                f"{lay.re_names[j]}) = {R[i, j]:.6f}) {llf_change_words(stat)}"
            )
        elif not any(r.startswith(f"var({name})") for r in reasons):
            reasons.append(  # the first check's threshold missed it
                f"var({name}) = {var:.3g} is at the boundary: dropping {name} {llf_change_words(stat)}"
            )
    if not pd_ok:
        reasons.append(NOT_PD_REASON)
    return reasons


def llf_change_words(stat: float) -> str:
    """A probe's likelihood-ratio statistic ``stat = 2 (llf - llf_probe)`` in words, with its sign.

    ``stat >= 0``: the probe *lowers* the log-likelihood by ``stat / 2``; a small negative
    ``stat`` (above ``-BOUNDARY_LR``) means it raises it by less than the rounding of the
    likelihood evaluations (the probe uses the product rule).

    Examples
    --------
    >>> llf_change_words(6.4e-07)
    'lowers the log-likelihood by only 3.2e-07 (likelihood-ratio statistic 6.4e-07)'
    >>> llf_change_words(-6.4e-07)
    'raises the log-likelihood by only 3.2e-07, within rounding (the estimates are at the maximum)'
    """
    if stat >= 0:
        return f"lowers the log-likelihood by only {stat / 2:.2g} (likelihood-ratio statistic {stat:.2g})"
    return f"raises the log-likelihood by only {-stat / 2:.2g}, within rounding (the estimates are at the maximum)"


def _effect_words(lay, re_terms, e: int, article: str = "the") -> str:
    """What school effect ``e`` does, in words: "the mean", "the slope on x", "the residual variance",
    "the slope of the log residual variance on x" (``scale_re_formula``)."""
    name = lay.re_names[e]
    if name.startswith("v"):
        term = lay.scale_re_terms[e - lay.q] if lay.scale_re_terms else "Intercept"
        return f"{article} residual variance" if term == "Intercept" else f"{article} slope of the log residual variance on {term}"
    term = re_terms[e] if e < len(re_terms) else name
    return f"{article} mean" if term == "Intercept" else f"{article} slope on {term}"


def _formula_without(arg: str, terms, drop: int) -> str | None:
    """``arg='~ ...'`` with column ``drop`` of ``terms`` left out (``None`` when nothing is left)."""
    rest = [t for i, t in enumerate(terms) if i != drop]
    if not rest:
        return None
    if "Intercept" in rest:
        return f"{arg}='~ " + (" + ".join(t for t in rest if t != "Intercept") or "1") + "'"
    return f"{arg}='~ 0 + " + " + ".join(rest) + "'"


def _drop_advice(lay, re_terms, e: int) -> str:
    """The fit arguments that remove school effect ``e``."""
    if lay.re_names[e].startswith("v"):
        rest = [t for i, t in enumerate(lay.scale_re_terms) if i != e - lay.q]
        if not lay.scale_re_terms:
            advice = "random_scale=False"
        elif not rest:
            advice = "random_scale=False, without scale_re_formula"
        elif rest == ["Intercept"]:
            advice = "without scale_re_formula: the plain random scale v"
        else:
            advice = str(_formula_without("scale_re_formula", lay.scale_re_terms, e - lay.q))
    else:
        advice = _formula_without("re_formula", re_terms[: lay.q], e)
        if advice is None:
            advice = "re_formula='~ 0'" if lay.random_scale else "a model without school effects"
        if e == 0 and lay.bs_terms:
            advice += ", without bs_formula"
    if lay.quad_assoc and e in (0, lay.q):  # quad(u0,v) needs both u0 and v
        advice += ", without association='quadratic'"
    return advice


def face_directions(lik: Likelihood, theta) -> tuple:
    r"""The faces of the boundary a fit is on, as ``("drop", e)`` or ``("rank", k)`` (:func:`mlsml.boundary.face_fixed`).

    ``("drop", e)`` when ``var(e)`` is effectively zero (below :data:`ZERO_VARIANCE` of its
    reference, as in :func:`singular_reasons`; with ``bs_formula``, ``var(u0_j)`` in every
    school, :meth:`mlsml.integrand.Integrand.extra_singular_reasons`); otherwise
    ``("rank", k)`` when the part of ``e_k`` not explained by ``e_0 .. e_{k-1}`` is below
    :data:`SINGULAR_CORRELATION` of its variance, :math:`L_{kk}^2 < 10^{-6}\,\Sigma_{kk}`
    (``Sigma0`` with ``bs_formula``). Every model class: the layouts differ only in what
    :func:`mlsml.boundary.degenerate_theta` and :func:`mlsml.boundary.degenerate_natural` make of
    a face. :func:`settle` steps inside these faces (:func:`mlsml.boundary.interior_starts`).
    """
    lay = lik.layout
    if lay.d == 0:
        return ()
    theta = np.asarray(theta, dtype=float)
    natural = np.asarray(lay.to_natural(theta), dtype=float)
    S = lay.sigma_from_natural(natural)
    ref = reference_variances(lik, natural)
    # with bs_formula S is Sigma0, whose [0, 0] entry is 1: var(u0_j) is judged school by school
    drops = tuple(("drop", e) for e in range(lay.d) if not (lay.bs_terms and e == 0) and not S[e, e] > ZERO_VARIANCE * ref[e])
    if lay.bs_terms and lik.integrand.extra_singular_reasons(theta):
        drops = (("drop", 0),) + drops
    if drops:
        return drops
    L = np.asarray(lay.chol(theta), dtype=float)
    return tuple(("rank", k) for k in range(1, lay.d) if L[k, k] ** 2 < SINGULAR_CORRELATION * S[k, k])


def degenerate_directions(lik: Likelihood, theta) -> tuple:
    r"""The degenerate directions of a singular fit, whose standard errors are reported from the rest.

    :func:`face_directions`; when there is none but the correlation matrix ``R`` of the school
    effects is singular by the test of :func:`singular_reasons` (its smallest eigenvalue below
    :data:`SINGULAR_CORRELATION`, which bounds every unexplained part
    :math:`L_{kk}^2/\Sigma_{kk} = 1 / (R^{-1})_{kk}` from below, so it can pass while they do not),
    ``("rank", k)`` for the effect ``k`` least explained by the effects before it.
    """
    faces = face_directions(lik, theta)
    lay = lik.layout
    if faces or lay.d < 2:
        return faces
    theta = np.asarray(theta, dtype=float)
    S = lay.sigma_from_natural(np.asarray(lay.to_natural(theta), dtype=float))
    sd = np.sqrt(np.clip(np.diag(S), 1e-300, None))
    if not np.linalg.eigvalsh(S / np.outer(sd, sd)).min() < SINGULAR_CORRELATION:
        return ()
    L = np.asarray(lay.chol(theta), dtype=float)
    unexplained = [L[k, k] ** 2 / S[k, k] if S[k, k] > 0 else 0.0 for k in range(1, lay.d)]
    return (("rank", 1 + int(np.argmin(unexplained))),)


def degenerate_words(lik: Likelihood, theta, degenerate) -> list[str]:
    """Each degenerate direction in words a user understands, with what to do about it."""
    lay = lik.layout
    re_terms = list(lik.design.info.get("re_terms", ()))
    natural = np.asarray(lay.to_natural(np.asarray(theta, dtype=float)), dtype=float)
    S = lay.sigma_from_natural(natural)
    ref = reference_variances(lik, natural)
    names = lay.re_names
    test = "or test it with mlsml.lrtest(fit_without_it, res)"
    out = []
    for kind, k in degenerate:
        if kind == "drop":
            zero = "var(u0_j) is zero in every school" if lay.bs_terms and k == 0 else f"var({names[k]}) is zero"
            out.append(
                f"schools do not differ in {_effect_words(lay, re_terms, k, 'their')} ({zero} at the maximum): "
                f"drop the effect ({_drop_advice(lay, re_terms, k)}) {test}"
            )
            continue
        sd = np.sqrt(np.clip(np.diag(S), 1e-300, None))
        R = S / np.outer(sd, sd)
        j = int(np.argmax(np.abs(R[k, :k])))
        L = np.asarray(lay.chol(np.asarray(theta, dtype=float)), dtype=float)
        pair = face_name(names, "rank", k, L).startswith("corr(")
        # the effects the combination involves (a pair: j and k)
        involved = [j, k] if pair else [i for i in range(k) if abs(R[k, i]) > 1e-6] + [k]
        if lay.bs_terms and 0 in involved:  # Sigma0[0, 0] = 1 is no variance to compare
            drop = "Drop one of them: " + " or ".join(f"{names[i]} ({_drop_advice(lay, re_terms, i)})" for i in involved) + f", {test}"
        elif pair:
            weaker = min(involved, key=lambda i: S[i, i] / ref[i])
            drop = f"Drop the weaker one, {names[weaker]} ({_drop_advice(lay, re_terms, weaker)}), {test}"
        else:  # the face: k is the combination (the variances of different effects do not compare)
            drop = f"Drop {names[k]} ({_drop_advice(lay, re_terms, k)}), {test}"
        if pair:
            sign = "positively" if R[j, k] > 0 else "negatively"
            what = (
                f"the school effects on {_effect_words(lay, re_terms, j)} ({names[j]}) and on "
                f"{_effect_words(lay, re_terms, k)} ({names[k]}) are perfectly {sign} correlated "
                f"(corr({names[j]},{names[k]}) = {R[j, k]:+.6f})"
            )
        else:
            others = [i for i in involved if i != k]
            what = (
                f"the school effect on {_effect_words(lay, re_terms, k)} ({names[k]}) is an exact linear combination "
                "of those on "
                + " and ".join(f"{_effect_words(lay, re_terms, i)} ({names[i]})" for i in others)
                + f" (largest correlation corr({names[j]},{names[k]}) = {R[j, k]:+.6f})"
            )
        out.append(f"{what}: the data cannot separate them. {drop}")
    return out


def singular_covariance(lik: Likelihood, theta, degenerate) -> np.ndarray | None:
    """Covariance of the estimates at a singular fit (:func:`mlsml.boundary.reduced_rank_covariance`).

    The Hessian is that of :func:`mlsml.boundary.covariance_rule` (the fit's own u-exact rule
    where it is exact at a singular ``Sigma``, else the product rule unless that is the
    inaccurate one). Where that rule's reduced information is not positive definite, the
    fit's own rule's is tried: deep on a face the product rule's nodes, adapted at a nearly
    singular ``Sigma``, can give the wrong curvature. (Fuzz case 1702248772874852229, at
    ``corr(u0,v) = -1`` with ``L[v,v] = 1e-6``: the product rule's ``-H`` has ``-26`` on the
    diagonal in ``L[v,u0]`` where the u-exact rule, in the u-given-v form exact there, has
    ``92.6``, with the same value to 2e-9; every SE was NaN. On 66 of the 2,000 fuzz cases.)
    """
    theta = np.asarray(theta, dtype=float)
    first = covariance_rule(lik, theta)
    for rule in (first, lik) if first is not lik else (first,):
        try:
            with np.errstate(all="ignore"):
                H = rule.hessian(theta)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
        cov = reduced_rank_covariance(H, lik.layout, theta, degenerate)
        if cov is not None:
            return cov
    return None


def diagnose(lik: Likelihood, optsum: OptSummary, faces: tuple | None = None) -> Diagnostics:
    """All diagnostics of a fit, from its likelihood and optimiser summary.

    The boundary probes (:func:`mlsml.boundary.boundary_effects`) apply where the
    integrand is the core model (:attr:`mlsml.integrand.Integrand.core`), and run unless
    the fit converged with every variance and the smallest eigenvalue of the correlation
    matrix far from zero (:func:`mlsml.boundary.far_from_boundary`: then they cannot find
    anything). When the fit is on the boundary (a probe or a near-zero variance or
    correlation) or near it (:func:`mlsml.boundary.weakly_determined`: within two
    standard errors, where a second maximum near a face is common), the faces of the boundary are searched
    (:func:`mlsml.boundary.search_faces`) and the best is reported; ``faces`` gives the
    result of an earlier search instead (their gains are taken relative to this fit).

    The probes, the face search and the quadrature check evaluate the likelihood on the
    standardised scale the optimiser worked on (:func:`mlsml.rescale.reparametrise`): on
    the original design a covariate such as ``x + 1e6`` costs the evaluation about
    ``1e-3`` of log-likelihood in rounding, as much as the differences the checks look
    for. Their statistics (differences of log-likelihoods) are the same on both scales;
    the faces keep their ``theta`` on the standardised scale (:func:`settle` maps it back)
    and report their ``llf`` on the original one.
    """
    theta = np.asarray(optsum.theta, dtype=float)
    pd_ok = hessian_pd(optsum)
    lik_c, theta_c, hess_c, shift = lik, theta, optsum.hessian, 0.0
    if optsum.theta_std is not None:
        rp = reparametrise(lik.design)
        if not rp.identity:
            lik_c, theta_c = lik.with_design(rp.design), np.asarray(optsum.theta_std, dtype=float)
            hess_c, shift = optsum.hessian_std, rp.log_shift
    llf_c = optsum.llf + shift
    probe = lik.integrand.core and not (optsum.converged and far_from_boundary(lik.layout, theta_c, hess_c))
    boundary = tuple(boundary_effects(lik_c, theta_c, llf_c)) if probe else ()
    reasons = singular_reasons(lik, theta, boundary, pd_ok, optsum.theta_std)
    on_boundary = bool(boundary) or any(r != NOT_PD_REASON for r in reasons)
    # with one school effect the only face (its variance at zero) is what the probe tries
    weak = probe and not on_boundary and lik.layout.d > 1 and weakly_determined(lik.layout, theta_c, hess_c)
    if not (probe and np.isfinite(optsum.llf) and (on_boundary or weak)):
        faces = ()
    elif faces is None:
        faces = tuple(replace(f, llf=f.llf - shift) for f in search_faces(lik_c, theta_c))
    else:  # the earlier search's maxima, against this fit by the same rule (face_likelihood)
        base = probe_value(lik_c, theta_c, face_likelihood(lik_c))[1] - shift
        # where the product rule cannot be evaluated at this fit no face is compared with it
        faces = tuple(replace(f, gain=f.llf - base) for f in faces) if np.isfinite(base) else ()
    if on_boundary or (faces and faces[0].gain > FACE_LLF_TOL):
        # an interior fit searched only because Sigma is weakly determined says nothing
        # about the faces unless one is higher (then it is not the maximum)
        reasons += face_reasons(faces)
    degenerate = degenerate_directions(lik, theta) if reasons else ()
    reasons += degenerate_words(lik, theta, degenerate)
    reduced = None
    if degenerate and np.isfinite(optsum.llf):
        # whether or not the information passes the positive-definiteness threshold (the
        # two rules can fall on either side of it at the same boundary point), the Wald
        # SEs of a degenerate direction mean nothing: use the reduced-rank information
        reduced = singular_covariance(lik, theta, degenerate)
        if reduced is not None:
            missing = [n for n, ok in zip(lik.layout.names, np.isfinite(np.diag(reduced))) if not ok]
            if NOT_PD_REASON in reasons:
                reasons.remove(NOT_PD_REASON)
            reasons.append(
                "the observed information is singular in the degenerate direction(s) above: the standard errors "
                "come from the information of the reduced-rank Sigma (as lme4 reports at a singular fit); "
                f"those of {', '.join(missing)} are unavailable (not determined at the boundary)"
            )
    return Diagnostics(
        hessian_pd=pd_ok,
        singular_reasons=tuple(reasons),
        collapse=None if optsum.converged else collapse_note(lik_c, theta_c),
        boundary=boundary,
        # computed by the optimiser at these estimates (the same rule and points, on the standardised
        # scale, where the difference is the same); again only for a hand-made OptSummary
        quadrature_check=optsum.quadrature_check if optsum.quadrature_check is not None else quadrature_check(lik_c, theta_c, llf_c),
        faces=faces,
        degenerate=degenerate,
        reduced_cov=reduced,
    )


def collapse_note(lik: Likelihood, theta) -> str | None:
    r"""Why the likelihood may rise without bound: a school the estimates fit exactly, or None.

    With a random scale, a school whose residuals are all zero contributes

    .. math::

        \int \phi(v; 0, \sigma_v^2) \prod_{i \in j} (2\pi e^{w_i'\alpha + v})^{-1/2}\, dv
            = (2\pi)^{-n_j/2} e^{-\sum_i w_i'\alpha/2}\, e^{n_j^2 \sigma_v^2/8},

    which grows without bound with :math:`\sigma_v^2`, while each other school loses only
    about :math:`\log \sigma_v`. So wherever the mean function can make one school's
    residuals zero (a school of one pupil always: the intercept does it) the likelihood
    has no upper bound, as a normal mixture's has none when a component collapses onto one
    point. Maxima at moderate :math:`\sigma_v^2` are still the estimates to report, but with
    few schools there may be none, and an optimiser then follows the rise: ``var(v)``
    grows and one school's residuals shrink towards zero (fuzz case 1478415917575154483:
    7 schools, 3 of one pupil, a residual of ``1e-6`` at ``var(v) = 96``).

    This names the school whose residual variance at the mode of its integrand in ``v``
    (the mean effects integrated out exactly, on a grid of :data:`COLLAPSE_GRID` points) is
    below :data:`COLLAPSE_VARIANCE` of the model's (``v`` below its log), and says what to
    do. The joint posterior mode of ``(u, v)`` cannot tell: a one-pupil school's random
    intercept fits it exactly at any ``var(u0) > 0``, so its joint mode of ``v`` is at
    ``-var(v)/2`` whether or not the likelihood collapses. Only for a plain random scale
    (one scale effect, no quadratic association) of a design in memory; ``None`` when no
    school is fitted exactly (and for a variance slope without the plain random scale,
    ``scale_re_formula="~ 0 + x"``, where ``exp(v)`` is not a school's residual variance).
    """
    lay, integrand = lik.layout, lik.integrand
    if not isinstance(integrand, Integrand) or not lay.random_scale or lay.n_v != 1:
        return None  # a design held by workers (mlsml.distributed) is not evaluated on a grid
    if lay.scale_re_terms:
        # one variance slope (scale_re_formula="~ 0 + x"): v does not scale the residual
        # variance of a row at x = 0, so a school of such rows has a flat integrand in v
        # whose first grid point is no mode (it was named "fitted almost exactly")
        return None
    if lay.quad_assoc or not (lay.q == 0 or integrand.uexact_supported):
        return None  # the quadratic association's inner rule would take as many points as the grid
    theta = np.asarray(theta, dtype=float)
    nat = np.asarray(lay.to_natural(theta), dtype=float)
    var_v = float(nat[lay.names.index("var(v)")]) if "var(v)" in lay.names else float("nan")
    sd = math.sqrt(var_v) if np.isfinite(var_v) and var_v > 0 else 1.0
    grid = np.linspace(math.log(COLLAPSE_VARIANCE) - 30.0 - 6.0 * sd, 6.0 * sd + 5.0, COLLAPSE_GRID)
    J = lik.design.ngroups
    v_grid = np.broadcast_to(grid[None, :, None], (J, grid.size, 1))
    try:
        with np.errstate(all="ignore"):
            values = integrand.log_h_uexact(theta, v_grid) if lay.q else integrand.log_h(theta, v_grid)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None
    values = np.where(np.isfinite(values), np.asarray(values, dtype=float), -np.inf)
    v = grid[np.argmax(values, axis=1)]
    exact = np.flatnonzero(np.isfinite(values).any(axis=1) & (v < math.log(COLLAPSE_VARIANCE)))
    if exact.size == 0:
        return None
    j = int(exact[np.argmin(v[exact])])
    design = lik.design
    sizes = design.counts[exact]
    others = f" ({exact.size} such schools in all)" if exact.size > 1 else ""
    school = f"school {plain_value(design.group_labels[j])!r} ({_rows_words(int(design.counts[j]), exact=True)})"
    return (
        f"{school} is fitted almost exactly: "
        f"at the mode of its likelihood in v its residual variance is {math.exp(v[j]):.1g} of the model's, while var(v) = {var_v:.3g}"
        f"{others}. With a random scale the likelihood rises without bound as one school's residuals approach zero "
        "(as a normal mixture's does when a component collapses onto one point), so there may be no maximum to find. "
        f"Refit without the schools of {_rows_words(int(sizes.max()))}, or without the random scale (random_scale=False)"
    )


def _rows_words(n: int, exact: bool = False) -> str:
    """``one row``, ``n rows`` (``exact``) or ``n or fewer rows``."""
    if n == 1:
        return "one row"
    return f"{n} rows" if exact else f"{n} or fewer rows"


def face_reasons(faces) -> list[str]:
    """What the face search found, in words: the best face, its llf and how it compares to the fit."""
    if not faces:
        return []
    best = faces[0]
    if best.gain > FACE_LLF_TOL:
        return [
            f"the maximum is on another face of the boundary: with {best.name} the log-likelihood is "
            f"{best.llf:.4f}, {best.gain:.3g} higher than at these estimates, which are NOT the maximum"
        ]
    return [
        f"of the boundary's faces the highest is {best.name} (log-likelihood {best.llf:.4f}, "
        f"{abs(best.gain):.2g} {'below' if best.gain < 0 else 'above'} these estimates: they are the maximum)"
    ]


def _refit(lik: Likelihood, optsum: OptSummary, options: FitOptions) -> OptSummary:
    """:func:`mlsml.optimize.maximize` of ``lik`` with ``options``, keeping what ``optsum`` says of
    the rule (:attr:`mlsml.optimize.OptSummary.rule_raised`): the refit maximises the same raised
    rule. (Dropping it made a fit at the 63-point rule look like one at the default rule, and
    the CI criterion compared it with the default rule's maximum, 0.0106 off.)"""
    return replace(maximize(lik, options), rule_raised=optsum.rule_raised)


def _higher_by_product(lik: Likelihood, new: OptSummary, old: OptSummary) -> bool:
    """Whether ``new`` is above ``old`` by the product rule too (:func:`mlsml.boundary.boundary_likelihood`).

    Near a singular ``Sigma`` the u-exact rule can be too high: at ``var(u0) = 1.3e-8``,
    ``corr(u0,v) = -1`` (20 schools) it gave -139.433 where the product rule with 11 and 41
    points gives -139.607, below a fit at -139.488. A refit is kept only if both rules agree.
    """
    # where the product rule cannot be evaluated at either point, nor at the point with its
    # vanished variances at FACE_ZERO (mlsml.boundary.probe_value), it does not confirm the
    # refit: NaN > x is false
    return bool(probe_value(lik, new.theta)[1] > probe_value(lik, old.theta)[1])


def _step_inside(lik: Likelihood, optsum: OptSummary, diagnostics: Diagnostics) -> tuple[OptSummary, Diagnostics]:
    """Refit from just inside each face a singular fit is on (:func:`mlsml.boundary.interior_starts`).

    The best refit more than :data:`mlsml.boundary.FACE_LLF_TOL` higher than the fit, by its own
    rule and by the product rule (:func:`_higher_by_product`), replaces it.
    """
    rp = reparametrise(lik.design) if optsum.theta_std is not None else None
    if rp is not None and not rp.identity:
        starts = [rp.to_original(s) for s in interior_starts(lik.with_design(rp.design), optsum.theta_std)]
    else:
        starts = interior_starts(lik, optsum.theta)
    best = optsum
    for start in starts:
        try:
            refit = _refit(lik, optsum, replace(optsum.options, start=start))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
        if np.isfinite(refit.llf) and refit.llf > best.llf + FACE_LLF_TOL and _higher_by_product(lik, refit, best):
            best = refit
    if best is optsum:
        return optsum, diagnostics
    note = f"refitted from just inside the boundary, {best.llf - optsum.llf:.3g} higher than where the optimiser first stopped"
    best = replace(best, message=f"{best.message}; {note}")
    # the faces' maxima do not depend on the fit: the earlier search's are compared with the refit
    return best, diagnose(lik, best, faces=diagnostics.faces or None)


#: :func:`settle` fits a converged fit again from the wide start (:mod:`mlsml.start`: the
#: mean effects' variances at the upper end of their moment range) by trust-region Newton
#: (:data:`mlsml.optimize.FALLBACK_METHOD`), with at most this many iterations per pass,
#: when the fit is singular or its first method needed the fallback -- the signs of a
#: surface with more than one maximum. The likelihood can have two maxima that no face
#: search links: in fuzz cases of 8 and 4 schools BFGS stopped at a singular fit 0.0195 and
#: 0.0019 below a maximum with another sign of ``cov(u1, v)`` (2786524694026269037) or an
#: interior ``var(u0)`` (3765175424864893038, ``scale_re_formula``), in one of 58 schools (2
#: to 4,023 pupils, a covariate in currency units: 6713339560601521679) at
#: ``corr(u0, v) = +1``, 0.86 below the interior maximum at ``corr = 0.42``. With exact
#: derivatives near ``|corr| = 1`` (the u-given-v form of the u-exact rule) two more
#: appeared whose second fit from the *default* start stops where the first did: 169
#: schools (9184634196461148135) at ``corr(u0, v) = +1``, 6.25 below the interior maximum,
#: and 19 schools with a random slope (8770553538507621726, not singular, after the
#: fallback) at an interior maximum 0.30 below another; the default ``var(u0)`` there was
#: the floor of :func:`mlsml.start.school_variance_start` (1/79 of the variance of the school
#: means) and the moment estimate. From the wide start trust-exact reaches every one of these
#: maxima (0.1 to 0.7 s). The cap bounds the exact Hessians' cost on large data. Only a fit
#: that says it converged is fitted again (one that does not is already flagged; on a 60-row
#: fuzz case with a raised 63-point rule the second fit took the fit over its 20 CPU-s cap).
SECOND_START_MAXITER = 50


def _second_start(lik: Likelihood, optsum: OptSummary, diagnostics: Diagnostics) -> tuple[OptSummary, Diagnostics]:
    """Refit by trust-exact from the wide start (:data:`SECOND_START_MAXITER`).

    Kept if more than :data:`mlsml.boundary.FACE_LLF_TOL` higher by the fit's rule and, for
    the core model, by the product rule (:func:`_higher_by_product`).
    """
    try:
        maxiter = min(optsum.options.maxiter, SECOND_START_MAXITER)
        opts = replace(optsum.options, start=None, wide_start=True, method=FALLBACK_METHOD, maxiter=maxiter)
        refit = _refit(lik, optsum, opts)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return optsum, diagnostics
    higher = np.isfinite(refit.llf) and refit.llf > optsum.llf + FACE_LLF_TOL and refit.llf_reliable
    if not higher or (lik.integrand.core and not _higher_by_product(lik, refit, optsum)):
        return optsum, diagnostics
    note = f"a second fit ({FALLBACK_METHOD} from the wide start) is {refit.llf - optsum.llf:.3g} higher than the first"
    refit = replace(refit, message=f"{refit.message}; {note}")
    return refit, diagnose(lik, refit, faces=diagnostics.faces or None)


def settle(lik: Likelihood, optsum: OptSummary, faces: tuple | None = None) -> tuple[OptSummary, Diagnostics]:
    """Diagnose a fit; if a face of the boundary is higher, refit from there (issue 12).

    When :func:`diagnose`'s face search finds a face more than
    :data:`mlsml.boundary.FACE_LLF_TOL` above the fit, the fit's own rule is maximised again
    from that face's maximum moved just inside (:meth:`mlsml.boundary.Face.inside`). The refit
    is kept when it is higher by both rules (:func:`_higher_by_product`); if a face is still higher after it, the fit is marked as not
    converged with a message naming the face, never left silently "converged" at the lower point.

    The maxima on the faces do not depend on the fit, so the face search runs once:
    ``faces`` (from an earlier :func:`settle` with the same boundary rule) and, after a refit,
    the first search's faces are compared with the new fit instead of searched again (a
    random slope in 43 schools of 4 to 30 pupils searched three times, 21 face fits, 3/4 of
    its 44 CPU-s).

    Returns
    -------
    (OptSummary, Diagnostics)
        The (possibly refitted) optimum and its diagnostics.
    """
    optsum, diagnostics = _settle(lik, optsum, faces)
    if optsum.converged and diagnostics.collapse is None:
        # a converged fit with a school fitted exactly is at no maximum: the likelihood rises
        # without bound along that school's collapse (fuzz case 1478415917575154483, oldest
        # versions: "converged" at var(v) = 148 after a refit from a face, 0.54 below a route)
        lik_c, theta_c = lik, optsum.theta
        if optsum.theta_std is not None:
            rp = reparametrise(lik.design)
            if not rp.identity:
                lik_c, theta_c = lik.with_design(rp.design), optsum.theta_std
        note = collapse_note(lik_c, theta_c) if _can_follow_a_collapse(lik_c, theta_c) else None
        if note:
            diagnostics = replace(diagnostics, collapse=note)
            optsum = replace(optsum, converged=False, message=f"no maximum: {note} ({optsum.message})")
    return optsum, diagnostics


def _can_follow_a_collapse(lik: Likelihood, theta) -> bool:
    r"""Whether ``var(v)`` is large enough for a converged fit to be following a school's collapse.

    A school of :math:`n` rows with zero residuals has the integrand
    :math:`-n v/2 - v^2/(2\sigma_v^2)` in ``v`` (up to a constant), whose mode is at
    :math:`v = -n\sigma_v^2/2`; the school collapses (:func:`collapse_note`) only where that
    is below :math:`\log` :data:`COLLAPSE_VARIANCE`, so only for
    :math:`\sigma_v^2 > 2|\log c| / n`, with ``n`` the largest school as the loosest bound.
    Below it a converged fit is at a maximum, whatever the grid of :func:`collapse_note`
    says: in fuzz case 3435855472640824117 (22 schools, ``var(u0) = 5e-86``,
    ``var(v) = 9e-10``) a school of three rows was named and a fit at its reference maximum
    called "no maximum".
    """
    lay = lik.layout
    if "var(v)" not in lay.names:
        return True  # (collapse_note decides)
    var_v = float(np.asarray(lay.to_natural(np.asarray(theta, dtype=float)), dtype=float)[lay.names.index("var(v)")])
    return bool(var_v * float(np.max(lik.design.counts)) / 2.0 > -math.log(COLLAPSE_VARIANCE))


def _settle(lik: Likelihood, optsum: OptSummary, faces: tuple | None = None) -> tuple[OptSummary, Diagnostics]:
    """:func:`settle` before its check for a school the converged estimates fit exactly."""
    diagnostics = diagnose(lik, optsum, faces=faces)
    # the refits from inside the faces are for the core model's faces (interior_starts); the
    # directions reported for other classes, or found by the correlation test alone, only
    # choose the standard errors (degenerate_directions)
    stepped = diagnostics.degenerate and lik.integrand.core and face_directions(lik, optsum.theta)
    if stepped and np.isfinite(optsum.llf):
        optsum, diagnostics = _step_inside(lik, optsum, diagnostics)
    if optsum.converged and (diagnostics.singular_reasons or optsum.fallback):
        optsum, diagnostics = _second_start(lik, optsum, diagnostics)
    faces = diagnostics.faces
    if not faces or faces[0].gain <= FACE_LLF_TOL:
        return optsum, diagnostics
    start = faces[0].inside()  # on the scale of the face search: the standardised one
    if optsum.theta_std is not None:
        start = reparametrise(lik.design).to_original(start)
    try:
        refit = _refit(lik, optsum, replace(optsum.options, start=start))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        refit = None
    if refit is not None and np.isfinite(refit.llf) and refit.llf > optsum.llf and _higher_by_product(lik, refit, optsum):
        optsum, diagnostics = refit, diagnose(lik, refit, faces=faces)
        faces = diagnostics.faces
    if faces and faces[0].gain > FACE_LLF_TOL and optsum.converged:
        optsum = replace(
            optsum,
            converged=False,
            message=f"the face {faces[0].name} of the boundary is {faces[0].gain:.3g} higher in log-likelihood "
            f"than these estimates ({optsum.message})",
        )
    return optsum, diagnostics


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
    y[design.order] = design.response
    mean, var = fitted_moments(res)
    return pd.Series((y - mean) / np.sqrt(var), index=design.row_labels, name="std_resid")


def normal_kurtosis_moments(n) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and variance of the sample kurtosis of ``n`` independent normal values.

    .. math::

        E(b_2) = \frac{3(n-1)}{n+1}, \qquad
        \operatorname{var}(b_2) = \frac{24\,n(n-2)(n-3)}{(n+1)^2(n+3)(n+5)}

    for :math:`b_2 = m_4 / m_2^2` with the moments about the sample mean divided by
    ``n`` (Pearson's exact moments; the normal-theory reference of :func:`tail_check`).
    """
    n = np.asarray(n, dtype=float)
    return 3 * (n - 1) / (n + 1), 24 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))


def _school_kurtosis(r: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sample kurtosis ``m4 / m2**2`` of each school's block of ``r`` (last axis, group-sorted)."""
    mean = np.add.reduceat(r, starts, axis=-1) / counts
    c = r - np.repeat(mean, counts, axis=-1)
    c2 = c * c
    m2 = np.add.reduceat(c2, starts, axis=-1) / counts
    m4 = np.add.reduceat(c2 * c2, starts, axis=-1) / counts
    spread = m2 > TAIL_EQUAL * (m2 + mean * mean)
    return np.where(spread, m4 / np.where(spread, m2, 1.0) ** 2, np.nan)


@dataclass(frozen=True, eq=False)  # pandas fields: compared by identity
class TailCheck:
    """What :func:`tail_check` found (see there for the statistic).

    Attributes
    ----------
    statistic : float
        The within-school kurtosis of the standardised residuals, averaged over the
        schools used with their sizes as weights (3 for normal data in large schools).
    reference_mean : float
        Its exact mean for normal residuals (:func:`normal_kurtosis_moments`).
    reference_quantiles : pandas.Series
        Its 5%, 50%, 95% and 99% points among the simulated normal data sets.
    p_value : float
        ``(1 + #{simulated >= statistic}) / (n_sim + 1)``.
    n_sim : int
    seed : int or None
    n_schools, n_rows : int
        Schools (with at least :data:`TAIL_MIN_SIZE` rows and residuals not all equal)
        and their rows that enter the statistic.
    schools : pandas.DataFrame
        One row per school (index: the school labels): ``n``, ``kurtosis``,
        ``reference_mean``, ``reference_sd`` (exact, for ``n`` normal values) and
        ``z = (kurtosis - reference_mean) / reference_sd``; ``NaN`` for schools not used.
    """

    statistic: float
    reference_mean: float
    reference_quantiles: pd.Series
    p_value: float
    n_sim: int
    seed: int | None
    n_schools: int
    n_rows: int
    schools: pd.DataFrame = field(repr=False)

    @property
    def heavy(self) -> bool:
        """Whether the tails are heavier than normal at level :data:`TAIL_ALPHA`."""
        return bool(self.p_value < TAIL_ALPHA)

    def message(self) -> str:
        """One sentence saying what the check found."""
        if not self.n_schools:
            return f"residual tails not checked: no school has {TAIL_MIN_SIZE} or more rows with distinct residuals"
        found = (
            f"within-school kurtosis of the standardised residuals {self.statistic:.3g}; "
            f"{self.reference_mean:.3g} expected for normal residuals "
            f"(95% of simulated normal data sets below {self.reference_quantiles[0.95]:.3g}; p {self._p_text()}, "
            f"{self.n_schools} schools of {TAIL_MIN_SIZE} or more rows)"
        )
        if not self.heavy and self.p_value <= 1 / (self.n_sim + 1) and 1 / (self.n_sim + 1) >= TAIL_ALPHA:
            # above every simulated data set, but too few of them to reach the level
            return (
                f"residual tails not decided: the statistic is above all {self.n_sim} simulated normal data sets, "
                f"so p {self._p_text()} cannot fall below {TAIL_ALPHA:g}; use n_sim >= {math.ceil(1 / TAIL_ALPHA)}: " + found
            )
        if not self.heavy:
            return "residual tails consistent with the normal distribution: " + found
        return (
            "the residuals have heavier tails than normal within schools: "
            + found
            + ". A random scale var(v) and the scale coefficients absorb heavy tails as if they were "
            "differences in variance: they may be tails, not heterogeneity"
        )

    def _p_text(self) -> str:
        smallest = 1 / (self.n_sim + 1)
        return f"<= {smallest:.2g}" if self.p_value <= smallest else f"= {self.p_value:.3g}"

    def __str__(self) -> str:
        return self.message()


def tail_check(res, n_sim: int = TAIL_N_SIM, seed: int | None = TAIL_SEED) -> TailCheck:
    r"""Are the residuals heavier-tailed within schools than normal?

    The model's residuals are normal given the school effects. Heavy-tailed residuals
    (a t distribution, outliers) make some schools look more variable than others, and
    a random scale ``v`` or the scale coefficients absorb this as heterogeneity of the
    variance: with :math:`t_3` residuals a fit estimated var(v) = 0.25 where the true
    value was 0.05. The within-school kurtosis tells the two apart: differences of
    variance *between* schools do not change it, tails do.

    For school :math:`j` with :math:`n_j \ge` :data:`TAIL_MIN_SIZE` standardised
    residuals :math:`r_{ij}` (:func:`standardised_residuals`),

    .. math::

        k_j = \frac{m_{4j}}{m_{2j}^2}, \quad
        m_{sj} = \frac{1}{n_j}\sum_i (r_{ij} - \bar r_j)^s, \qquad
        K = \frac{\sum_j n_j k_j}{\sum_j n_j}.

    ``k_j`` does not change when a school's residuals are shifted or rescaled, so the
    school's posterior predictions of ``u_j`` and ``exp(v_j)``, used to standardise them,
    cancel (exactly when ``z_ij`` and ``g_ij`` are constant within schools, otherwise
    up to the posterior uncertainty of the effects' within-school variation, which
    vanishes as :math:`n_j` grows). Under the model, ``k_j`` is then the sample
    kurtosis of :math:`n_j` independent normal values, and the reference of ``K`` is
    simulated exactly that way: ``n_sim`` data sets of standard normal values with the
    schools' sizes. A reference simulated from the fitted model (new responses,
    standardised with the posterior at the estimates) gives the same distribution up to
    the estimation of the fixed effects. (Pooling the standardised residuals of all
    schools instead would compare with the wrong reference: divided by predicted
    rather than true standard deviations, they are a scale mixture of normals whose
    kurtosis exceeds 3 under the model itself, the more so the smaller the schools.)

    Parameters
    ----------
    res : MELSMResults
        A fitted model, with its data.
    n_sim : int
        Number of simulated reference data sets (the smallest p-value is ``1 / (n_sim + 1)``).
    seed : int or None
        Seed of :func:`numpy.random.default_rng` for the reference (the default makes
        the check of a fit reproducible).

    Returns
    -------
    TailCheck
        ``statistic``, ``reference_mean``, ``reference_quantiles``, ``p_value``,
        ``heavy`` and the per-school table ``schools``.

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.diagnostics import tail_check
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> check = tail_check(res, n_sim=199, seed=1)
    >>> check.heavy, check.n_schools, list(check.schools.columns)
    (False, 40, ['n', 'kurtosis', 'reference_mean', 'reference_sd', 'z'])
    """
    if not isinstance(n_sim, (int, np.integer)) or isinstance(n_sim, bool) or n_sim < 1:
        raise ValueError(f"n_sim must be a positive integer, got {n_sim!r}")
    schools = _tail_schools(res)
    used = schools["kurtosis"].notna().to_numpy()
    n_used = schools["n"].to_numpy()[used]
    n_rows = int(n_used.sum())
    if not n_rows:
        nan_q = pd.Series(np.nan, index=list(TAIL_QUANTILES))
        return TailCheck(np.nan, np.nan, nan_q, np.nan, int(n_sim), seed, 0, 0, schools)
    k = schools["kurtosis"].to_numpy()[used]
    statistic = float(n_used @ k / n_rows)
    sims = _reference(n_used, int(n_sim), np.random.default_rng(seed))
    quantiles = pd.Series(np.quantile(sims, TAIL_QUANTILES), index=list(TAIL_QUANTILES))
    return TailCheck(
        statistic=statistic,
        reference_mean=float(n_used @ schools["reference_mean"].to_numpy()[used] / n_rows),
        reference_quantiles=quantiles,
        p_value=float((1 + np.count_nonzero(sims >= statistic)) / (n_sim + 1)),
        n_sim=int(n_sim),
        seed=seed,
        n_schools=int(used.sum()),
        n_rows=n_rows,
        schools=schools,
    )


def _tail_schools(res) -> pd.DataFrame:
    """The per-school table of :class:`TailCheck` (``NaN`` for the schools not used)."""
    design = res.model.design
    if not isinstance(design, Design):  # rows held by Dask workers: the table is made block by block
        return res.tail_schools()
    r = standardised_residuals(res).to_numpy()[design.order]  # group-sorted, as the design
    counts = np.asarray(design.counts, dtype=int)
    k = _school_kurtosis(r, np.asarray(design.starts), counts)
    used = (counts >= TAIL_MIN_SIZE) & np.isfinite(k)
    ref_mean, ref_var = normal_kurtosis_moments(np.where(used, counts, TAIL_MIN_SIZE))
    ref_sd = np.sqrt(ref_var)
    return pd.DataFrame(
        {
            "n": counts,
            "kurtosis": np.where(used, k, np.nan),
            "reference_mean": np.where(used, ref_mean, np.nan),
            "reference_sd": np.where(used, ref_sd, np.nan),
            "z": np.where(used, (k - ref_mean) / ref_sd, np.nan),
        },
        index=pd.Index(design.group_labels, name=res.model.formula_spec.groups),
    )


def tail_note(res) -> str | None:
    r"""The note of ``summary()`` when the residuals are heavy-tailed within schools, else ``None``.

    Cheap in the common case: the statistic :math:`K` of :func:`tail_check` is compared
    with its exact normal-theory mean and standard deviation,
    :math:`\sum_j n_j E(b_2 \mid n_j) / N` and
    :math:`\{\sum_j n_j^2 \operatorname{var}(b_2 \mid n_j)\}^{1/2} / N`
    (:func:`normal_kurtosis_moments`); only above :data:`TAIL_SCREEN_Z` of them is the
    reference simulated (:func:`tail_check` with its defaults), and the note is given
    when that check finds the tails heavy. Results without their data have no note.
    """
    if not res.has_data:
        return None
    schools = _tail_schools(res).dropna()
    n = schools["n"].to_numpy(dtype=float)
    if not n.size:
        return None
    N = n.sum()
    mean = n @ schools["reference_mean"].to_numpy() / N
    sd = np.sqrt((n**2) @ schools["reference_sd"].to_numpy() ** 2) / N
    if (n @ schools["kurtosis"].to_numpy() / N - mean) / sd < TAIL_SCREEN_Z:
        return None
    check = tail_check(res)
    return f"{check.message()} (see res.residual_tails())." if check.heavy else None


def _reference(sizes: np.ndarray, n_sim: int, rng: np.random.Generator) -> np.ndarray:
    """``n_sim`` draws of the statistic of :func:`tail_check` for standard normal schools of ``sizes``."""
    n_rows = int(sizes.sum())
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    block = max(1, TAIL_BLOCK // n_rows)
    out = np.empty(n_sim)
    for s in range(0, n_sim, block):
        m = min(block, n_sim - s)
        k = _school_kurtosis(rng.standard_normal((m, n_rows)), starts, sizes)
        out[s : s + m] = k @ sizes / n_rows
    return out
