"""Maximising the integrated likelihood.

The objective handed to :func:`scipy.optimize.minimize` is the adaptive
Gauss-Hermite log-likelihood itself: at every evaluation the nodes are
**re-centred** at each school's posterior mode and scaled by its curvature at
the current parameters (:meth:`mlsml.likelihood.Likelihood.adapt`), then the likelihood is
summed over those nodes (:meth:`mlsml.likelihood.Likelihood.at_nodes`). The value
is therefore a pure function of the parameters. The gradient is autograd's
exact derivative with the nodes held fixed; because the integral does not
depend on where the nodes sit, this equals the derivative of the adapted
likelihood up to the (tiny) derivative of the quadrature error, and exactly
so when the integrand is Gaussian (models without a random scale).

Earlier versions held the nodes fixed for a whole optimiser pass and
re-centred between passes; near a singular ``Sigma`` the optimiser then
exploited the quadrature error of stale nodes (see
``tests/test_optimize.py::test_boundary_random_slope_matches_lme4``).
Re-centring on every evaluation removes that failure mode; the outer loop of
passes is kept as a check that a fresh BFGS run from the estimates does not
move them (``xtol``, ``ftol``).

Convergence is declared only when, in addition, the Newton decrement
``g' (-H)^{-1} g / 2`` at the estimates -- the log-likelihood still to be
gained to second order -- is below ``dtol`` (1e-6 by default). Standard errors
come from the autograd Hessian at nodes adapted to the estimates (the observed
information).

All of this runs on a standardised copy of the design (:mod:`mlsml.rescale`: the
response and every off-centre or badly scaled covariate column centred and scaled, an
exact reparametrisation), so that the relative tolerances above mean the same for a
covariate measured in seconds since 1970 as for a z-score; :func:`maximize` maps the
estimates, gradient and Hessian back with the Jacobian of the map, and
:func:`theta_covariance` inverts the standardised information.

Starting values come from :mod:`mlsml.start`; BFGS is seeded with the inverse of the
exact Hessian at the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize as sopt
from scipy.optimize import _trustregion_exact as _sp_trust_exact  # private: see TRUST_EXACT_BOUNDED

from .boundary import far_from_boundary
from .integrand import SchoolSums
from .likelihood import EVALUATION_ERRORS, Likelihood
from .params import ParamLayout
from .quadrature import DEFAULT_NAGQ_UEXACT, QuadratureSpec, max_nagq
from .rescale import reparametrise
from .start import start_values

#: Whether scipy's BFGS accepts an initial inverse Hessian (option ``hess_inv0``, new in
#: scipy 1.12; setup.cfg allows 1.11), read from scipy's own list of the method's options.
#: Without it BFGS starts from the identity: more iterations, the same maximum.
BFGS_HAS_HESS_INV0 = "hess_inv0" in (sopt.show_options("minimize", "BFGS", disp=False) or "")


@dataclass(frozen=True)
class FitOptions:
    """Options of :func:`maximize`.

    Attributes
    ----------
    method : str
        ``scipy.optimize.minimize`` method (``"BFGS"``, ``"L-BFGS-B"``,
        ``"trust-exact"``, ``"Newton-CG"``).
    maxiter : int
        Maximum iterations of one optimiser pass.
    max_passes : int
        Maximum number of re-centring passes.
    xtol, ftol : float
        Stopping tolerances of the outer loop (parameter change on the
        optimiser scale, absolute log-likelihood change).
    gtol : float
        Gradient tolerance of the inner optimiser, on ``-loglik / N``.
    dtol : float
        Final check: the Newton decrement ``g' (-H)^{-1} g / 2`` (the
        log-likelihood still to gain, to second order) must be below ``dtol``.
    start : ndarray, optional
        Starting values on the optimiser scale. Default: :func:`mlsml.start.start_values`.
    wide_start : bool
        Without ``start``: the wide start of :mod:`mlsml.start` (the mean effects' variances
        at the upper end of their moment range), the second start of
        :func:`mlsml.diagnostics.settle`.
    max_time : float, optional
        Time budget in seconds: once the optimiser has run this long, the next
        evaluation of the objective stops it and the fit is returned from the best
        point so far with ``converged=False`` and a message naming the budget (see
        :data:`TIME_BUDGET_MESSAGE`). ``None``: no budget.
    """

    method: str = "BFGS"
    maxiter: int = 1000
    max_passes: int = 30
    xtol: float = 1e-6
    ftol: float = 1e-8
    gtol: float = 1e-8
    dtol: float = 1e-6
    start: np.ndarray | None = None
    wide_start: bool = False
    max_time: float | None = None


#: The message of a fit stopped by :attr:`FitOptions.max_time` (formatted with the budget,
#: the seconds used and the passes run).
TIME_BUDGET_MESSAGE = (
    "stopped by the time budget max_time={budget:g} s after {used:.1f} s and {passes} optimiser pass(es), "
    "before reaching a maximum: the estimates are the best point found so far, not a maximum likelihood fit"
)


#: Exceptions SciPy's optimisers raise from their own code, not ours: the exact trust-region
#: subproblem solver of SciPy >= 1.14 leaves ``p`` unassigned when every one of its bounded
#: iterations fails to factorise the shifted Hessian (``UnboundLocalError`` in
#: ``_trustregion_exact.IterativeSubproblem.solve``; fuzz cases 7171776977957833427 and
#: 6860789989373240639). The pass stops at its best point and is not converged.
SCIPY_FAILURES: tuple[type[BaseException], ...] = (UnboundLocalError,)

#: The message of a pass that SciPy ended with one of :data:`SCIPY_FAILURES`.
SCIPY_FAILURE_MESSAGE = "SciPy's {method} failed inside its own code ({error}); the pass stopped at its best point"


class _OutOfTime(Exception):
    """Raised inside the objective when :attr:`FitOptions.max_time` has passed."""


class _Budget:
    """The time budget of one fit (:attr:`FitOptions.max_time`; ``None``: none).

    :meth:`wrap` makes the objective raise :class:`_OutOfTime` once the budget has passed
    and remember the best point it has seen; :meth:`minimize` is
    :func:`scipy.optimize.minimize` that returns that point (``success=False``) instead.
    """

    def __init__(self, t0: float, max_time: float | None, theta: np.ndarray):
        self.t0, self.max_time = t0, max_time
        self.best = (np.inf, np.array(theta, dtype=float))
        self.call_best = self.best  # the best point of the current minimize() call
        self.spent = False
        self.failed = ""  # SciPy's own failure (SCIPY_FAILURES) in the last minimize() call

    def wrap(self, fun):
        def budgeted(th):
            if self.max_time is not None and time.perf_counter() - self.t0 > self.max_time:
                raise _OutOfTime
            out = fun(th)
            if out[0] < self.best[0]:
                self.best = (out[0], np.array(th, dtype=float))
            if out[0] < self.call_best[0]:
                self.call_best = (out[0], np.array(th, dtype=float))
            return out

        return budgeted

    def minimize(self, fun, theta, **kw):
        self.call_best = (np.inf, np.array(theta, dtype=float))
        self.failed = ""
        try:
            return sopt.minimize(fun, theta, **kw)
        except _OutOfTime:
            self.spent = True
            value, x = self.best if np.isfinite(self.best[0]) else (np.inf, theta)
            return sopt.OptimizeResult(x=x, fun=value, nit=0, nfev=0, success=False, message="time budget spent")
        except SCIPY_FAILURES as exc:
            # SciPy's bug, not the data's: the pass ends at the best point it evaluated
            self.failed = SCIPY_FAILURE_MESSAGE.format(method=kw.get("method"), error=f"{type(exc).__name__}: {exc}")
            value, x = self.call_best
            return sopt.OptimizeResult(x=x, fun=value, nit=0, nfev=0, success=False, message=self.failed)

    def message(self, passes: int) -> str:
        return TIME_BUDGET_MESSAGE.format(budget=self.max_time, used=time.perf_counter() - self.t0, passes=passes)


@dataclass(frozen=True)
class OptSummary:
    """What the optimiser did and found (as MixedModels.jl's ``OptSummary``).

    Attributes
    ----------
    start : ndarray
        Starting values (optimiser scale, units of ``y``).
    theta : ndarray
        Final values.
    llf : float
        Log-likelihood at ``theta`` (the fit's own rule).
    grad : ndarray
        Its gradient there.
    hessian : ndarray
        Its Hessian there (the observed information is its negative).
    converged : bool
    message : str
    method : str
        The ``scipy.optimize.minimize`` method.
    options : FitOptions
    n_passes : int
        Re-centring passes.
    n_iter : int
        Optimiser iterations plus Newton polishing steps.
    n_fev : int
        Function evaluations reported by the optimiser.
    decrement : float
        Newton decrement ``g'(-H)^{-1}g/2`` at ``theta``.
    max_grad : float
        ``max |grad|``.
    history : tuple
        One ``(pass, llf, max step, success, message)`` per pass.
    quadrature : QuadratureSpec
        The rule of the likelihood that was maximised.
    time : float
        Seconds.
    theta_std : ndarray or None
        The estimates on the standardised scale the optimiser worked on
        (:func:`mlsml.rescale.reparametrise`); ``None`` when that is the original scale.
    hessian_std : ndarray or None
        The Hessian on the standardised scale the optimiser worked on
        (:func:`mlsml.rescale.reparametrise`); ``None`` when that is the original scale.
    jacobian : ndarray or None
        ``d theta / d theta_s'``, the Jacobian of the map from the standardised scale;
        ``None`` for the identity.
    fallback : str
        Empty when the requested method's result was kept; otherwise why the
        automatic fallback to :data:`FALLBACK_METHOD` ran and what it gave
        (:func:`_maximize`). ``method`` stays the requested method.
    quadrature_check : tuple or None
        ``(points, |llf(points) - llf|)`` at ``theta`` with about twice the points
        (:func:`quadrature_check`), or ``None`` where not cheap or not informative.
    rule_raised : str
        Empty unless the default rule was not accurate at its estimates and the fit
        was redone with more points (:func:`raise_rule`): what was tried and why.
    """

    start: np.ndarray
    theta: np.ndarray
    llf: float
    grad: np.ndarray
    hessian: np.ndarray
    converged: bool
    message: str
    method: str
    options: FitOptions
    n_passes: int
    n_iter: int
    n_fev: int
    decrement: float
    max_grad: float
    history: tuple
    quadrature: QuadratureSpec
    time: float
    theta_std: np.ndarray | None = None
    hessian_std: np.ndarray | None = None
    jacobian: np.ndarray | None = None
    fallback: str = ""
    quadrature_check: tuple | None = None
    rule_raised: str = ""

    @property
    def llf_reliable(self) -> bool:
        """Whether ``llf`` is a log-likelihood that may be reported.

        False when it is not finite or when the rule with about twice the points
        changes it by more than :data:`LLF_UNRELIABLE` at ``theta`` (the rule is not
        accurate there: e.g. ``llf = +4.2e14`` from an overflowed quadrature).
        """
        return bool(np.isfinite(self.llf)) and _check_ok(self.quadrature_check)

    @property
    def nagq(self) -> int:
        """Points per dimension of the rule."""
        return self.quadrature.nagq

    @property
    def feval(self) -> int:
        """Function evaluations (MixedModels.jl's name)."""
        return self.n_fev


#: Backward-compatible name of :class:`OptSummary`.
Optimum = OptSummary

#: The observed information counts as positive definite when the smallest eigenvalue of
#: its unit-diagonal form exceeds this (:func:`information_pd`).
HESSIAN_PD_RTOL = 1e-10

#: Most Newton polishing steps after the quasi-Newton passes.
NEWTON_POLISH_STEPS = 20


def _initial_inverse_hessian(theta, lik: Likelihood, N):
    """Inverse of the exact Hessian of ``-loglik/N`` at the start, when positive definite.

    Seeding BFGS with it removes most of the iterations spent learning the very
    different scales of ``beta``, ``alpha`` and the log-Cholesky parameters.
    """
    try:
        H = -lik.start_hessian(theta) / N
        H = 0.5 * (H + H.T)
        w, V = np.linalg.eigh(H)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None
    if not np.all(np.isfinite(w)) or w.max() <= 0:
        return None
    w = np.maximum(w, 1e-6 * w.max())  # repair an indefinite start
    M = (V / w) @ V.T
    return 0.5 * (M + M.T)  # exactly symmetric, as scipy checks


#: relative curvature below which a direction counts as flat (see _newton_step)
FLAT = 1e-6

#: The longest step (on the optimiser scale: a factor ``e`` in a school effect's SD) that
#: :func:`_newton_step` takes along a flat direction, where the quadratic model has no
#: maximum of its own.
FLAT_STEP = 1.0


def _newton_step(grad: np.ndarray, hess: np.ndarray, flat: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    r"""The Newton step and decrement (the log-likelihood still to gain, to second order).

    With :math:`-H = \sum_i w_i v_i v_i'` and :math:`g_i = v_i'g`, a direction of
    curvature :math:`w_i` above ``FLAT = 1e-6`` of the largest takes the Newton step
    :math:`s_i = g_i / w_i` and gains :math:`g_i^2 / (2 w_i)`. A flat direction
    (:math:`|w_i|` within ``FLAT`` of the largest) takes the step of the quadratic model
    bounded by :data:`FLAT_STEP` = :math:`R`,

    .. math::

        s_i = \operatorname{sign}(g_i)\,\min\bigl(|g_i| / w_i^+,\; R\bigr), \qquad
        \text{gain}_i = g_i s_i - \tfrac12 w_i^+ s_i^2,

    with :math:`w_i^+ = \max(w_i, 0)`. At a boundary optimum (a variance tending to zero
    on the log-Cholesky scale) both :math:`g_i` and :math:`w_i` vanish like the variance,
    so the gain does too; a flat direction whose gradient is not small is not a maximum.
    Ignoring flat directions (as before) declared a fit converged at
    :math:`g_i = -0.0116`, :math:`w_i = 0.023` (8.6e-7 of the largest curvature, a random
    slope near :math:`|\operatorname{corr}(u_0, v)| = 1` in schools of two pupils), 0.0058
    below the maximum. Curvatures within ``+/- FLAT`` of the largest count as flat because
    the Hessian ignores the derivative of the quadrature error, so near a singular
    ``Sigma`` such tiny curvatures have either sign at random (seen in the property tests: a
    location shift of ``y`` flipped one from ``+3e-13`` to about ``-1e-8``). Only clearly
    negative curvature (a saddle) makes the decrement infinite (and the step ``None``).

    Parameters
    ----------
    grad, hess : ndarray
        The gradient and Hessian of the log-likelihood (optimiser scale).
    flat : bool
        ``False``: leave the flat directions out (no step, no gain), as where a step along
        them was tried and did not raise the log-likelihood (:func:`_flat_checked_decrement`).

    Returns
    -------
    (ndarray or None, ndarray or None, float)
        The step along the well-determined directions, the step along the flat ones (both
        ``None`` at a saddle), and the decrement (the sum of the gains).
    """
    if grad.size == 0:
        return np.zeros(0), np.zeros(0), 0.0
    if not (np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))):
        return None, None, float("inf")  # e.g. a likelihood that overflowed: not a maximum
    negH = -0.5 * (hess + hess.T)
    w, V = np.linalg.eigh(negH)
    if not np.all(np.isfinite(w)) or w.max() <= 0 or np.any(w < -FLAT * w.max()):
        return None, None, float("inf")
    keep = w > FLAT * w.max()
    gv = V.T @ grad
    s = np.zeros_like(gv)
    s[keep] = gv[keep] / w[keep]
    use_flat, flat = flat, ~keep
    wp = np.maximum(w[flat], 0.0)
    reach = np.divide(np.abs(gv[flat]), wp, out=np.full(wp.shape, np.inf), where=wp > 0)
    s[flat] = np.sign(gv[flat]) * np.minimum(reach, FLAT_STEP) if use_flat else 0.0
    gain = 0.5 * np.sum(gv[keep] ** 2 / w[keep]) + np.sum(gv[flat] * s[flat] - 0.5 * wp * s[flat] ** 2)
    return V[:, keep] @ s[keep], V[:, flat] @ s[flat], float(gain)


def _newton_decrement(grad: np.ndarray, hess: np.ndarray) -> float:
    """The Newton decrement of :func:`_newton_step` (``g' (-H)^{-1} g / 2`` where ``-H`` is well
    conditioned); infinite when ``-H`` is not positive definite."""
    return _newton_step(grad, hess)[2]


#: Step halvings of one Newton step of :func:`_newton_polish` before the polish ends. Where
#: the Newton step is good the full step is taken; where it is not (the quadrature's noise
#: near a boundary, an indefinite Hessian) a step cut below ``2**-12`` of its length gains
#: nothing, and 30 halvings per step cost a 60-row fuzz case 2,000 evaluations (28 s).
POLISH_HALVINGS = 12


def _newton_polish(theta, lik: Likelihood, dtol, max_steps: int = NEWTON_POLISH_STEPS, xtol: float = np.inf):
    """Finish with Newton-Raphson steps on the exact Hessian (as MIXREGLS does).

    Quasi-Newton methods stop once their line search cannot make progress in
    floating point; a few exact Newton steps, each accepted only if the adapted
    log-likelihood does not fall, take the estimates to the maximum. Directions
    with (near-)zero curvature (:func:`_newton_step`) -- a variance at the boundary --
    are left alone; the decrement returned counts their gain where the likelihood
    confirms it (:func:`_flat_checked_decrement`).

    The steps stop once the Newton decrement is below ``1e-3 * dtol`` and the Newton
    step (the distance to the maximum, to second order) is at most ``xtol`` on the
    optimiser scale. A decrement that small can still leave the estimates a step of
    ``sqrt(2 * decrement / curvature)`` from the maximum in a direction of small curvature
    (two fits of the same likelihood, frequency weights and the replicated data, ended
    6e-8 apart with decrements of 1e-13 and 1e-22): when that step exceeds ``xtol`` one
    final step is taken, which by Newton's quadratic convergence lands on the maximum to
    the precision of the gradient (the two fits then agree to 1e-11). With the default
    ``xtol`` the final step is rarely needed.

    Returns ``theta, llf, grad, hessian, n_steps, decrement`` at nodes adapted to ``theta``.
    """

    def at(th):
        nodes = lik.adapt(th)
        v, g = lik.value_and_grad(th, nodes)
        return float(v), np.asarray(g), nodes

    llf, grad, nodes = at(theta)
    H = lik.hessian(theta, nodes)
    steps = 0
    for steps in range(1, max_steps + 1):
        step, _, dec = _newton_step(grad, H, flat=False)
        if not np.isfinite(dec):
            steps -= 1
            break
        final = dec < 1e-3 * dtol  # within the tolerance: at most this last step
        if final and not (step.size and np.max(np.abs(step)) > xtol):
            steps -= 1
            break
        t = 1.0
        for _ in range(POLISH_HALVINGS):
            new = theta + t * step
            try:
                llf_new, grad_new, nodes_new = at(new)
            except np.linalg.LinAlgError:
                llf_new = -np.inf
            if np.isfinite(llf_new) and llf_new >= llf - 1e-12 * abs(llf):
                break
            t *= 0.5
        else:
            break
        theta, llf, grad, nodes = new, llf_new, grad_new, nodes_new
        H = lik.hessian(theta, nodes)
        if final:
            break
    return theta, llf, grad, H, steps, _flat_checked_decrement(lik, theta, llf, grad, H, dtol)


#: Halvings of the flat directions' bounded step that :func:`_flat_checked_decrement` tries.
FLAT_CHECK_HALVINGS = 2

#: The flat directions' gain counts in the decrement only above this (and when the likelihood
#: confirms a rise of as much): the accuracy to which the faces of the boundary are compared
#: (:data:`mlsml.boundary.FACE_LLF_TOL`), a tenth of issue 12's criterion of 1e-3. Along a
#: flat direction the quadratic model is poor (a stored fuzz case of 29 schools has curvature
#: 7e-8 of the largest and a modelled gain of 6e-6 that the likelihood confirms but that no
#: route can take further); fits with such gains were called converged before and still are.
FLAT_GAIN_TOL = 1e-4


def _flat_checked_decrement(lik: Likelihood, theta, llf: float, grad, H, dtol: float) -> float:
    """The Newton decrement of :func:`_newton_step`, its flat directions' gain checked by the likelihood itself.

    Where the flat directions' modelled gain is :data:`FLAT_GAIN_TOL` (or ``dtol``) or more,
    their bounded step (and up to :data:`FLAT_CHECK_HALVINGS` halvings of it) is evaluated: if
    none raises the adapted log-likelihood by as much the modelled gain is not real (near a
    singular ``Sigma`` the quadrature's noise there is of the order of the gain) and is left
    out. The estimates do not move: following a flat direction can lead where the rule
    fails (a variance of ``v`` growing without bound in schools of one pupil, where a
    log-likelihood of +1.7e14 was reached), so the fit is flagged instead.
    """
    _, flat_step, dec = _newton_step(grad, H)
    kept = _newton_step(grad, H, flat=False)[2]
    if not (np.isfinite(dec) and dec - kept >= max(dtol, FLAT_GAIN_TOL)):
        return kept  # infinite with dec at a saddle
    t = 1.0
    for _ in range(FLAT_CHECK_HALVINGS + 1):
        try:
            with np.errstate(all="ignore"):
                rise = float(lik.value(theta + t * flat_step)) - llf
        except EVALUATION_ERRORS:
            rise = float("nan")
        if rise >= max(dtol, FLAT_GAIN_TOL):  # NaN compares False
            return dec
        t *= 0.5
    return kept


#: The core fit of :func:`_warm_start` is used only when the smallest eigenvalue of its
#: ``Sigma`` exceeds this fraction of the trace (not at the boundary).
WARM_START_MIN_EIG = 1e-6


def _warm_start(likelihood: Likelihood, opts: FitOptions) -> np.ndarray:
    r"""Start values of a model outside the core (in the units of ``y``).

    With ``scale_re_formula`` (the per-observation integrand, whose every evaluation costs
    ``O(N K)``) the core model with the same mean and variance functions and one random
    scale ``v0`` is fitted first (its own fast path, ``O(N p + J K)`` per evaluation) and the
    extended model starts from its ``beta``, ``alpha`` and ``Sigma`` of ``(u, v0)``, the
    log-variance slopes independent with variance
    :data:`mlsml.start.START_VAR_SLOPE` ``/ mean(g^2)``: on 20,000 rows 10 instead of 43
    expensive evaluations. Elsewhere, or when that fit fails, :func:`mlsml.start.start_values`.
    """
    integrand = likelihood.integrand
    cold = start_values(integrand, opts.wide_start)
    lay = likelihood.layout
    if isinstance(integrand, SchoolSums) or not lay.scale_re_terms or lay.bs_terms:
        return cold
    base = ParamLayout(lay.mean_terms, lay.scale_terms, lay.q, True)
    core = likelihood.with_layout(base, QuadratureSpec("uexact", DEFAULT_NAGQ_UEXACT) if lay.q else likelihood.spec)
    try:
        opt = maximize(core, replace(opts, start=None, max_time=None))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return cold
    if not (np.isfinite(opt.llf) and np.all(np.isfinite(opt.theta))):
        return cold
    beta, alpha, L = base.split(opt.theta)
    S = np.asarray(L) @ np.asarray(L).T
    th, H = (opt.theta, opt.hessian) if opt.theta_std is None else (opt.theta_std, opt.hessian_std)
    if not (np.linalg.eigvalsh(S).min() > WARM_START_MIN_EIG * np.trace(S) and far_from_boundary(base, th, H)):
        # a singular core fit: its boundary is no place to start from. The eigenvalue ratio
        # alone passed a core fit with every variance ~1e-15 (fuzz case 1341479044579192759),
        # from which the extended fit stayed at Sigma = 0, 0.43 below its maximum, "converged"
        return cold
    _, _, L0 = lay.split(cold)
    sigma = np.asarray(L0) @ np.asarray(L0).T  # the cold start's variances of the slopes
    d0 = lay.q + 1
    sigma[:d0, :] = 0.0
    sigma[:, :d0] = 0.0
    sigma[:d0, :d0] = S
    return lay.theta_from_parts(np.asarray(beta), np.asarray(alpha), sigma)


def maximize(likelihood: Likelihood, options: FitOptions | None = None, callback=None, standardise: bool = True) -> OptSummary:
    """Maximum-likelihood estimates, fitted internally on a standardised copy of the design.

    Parameters
    ----------
    likelihood : Likelihood
        The objective (:meth:`mlsml.MELSM.objective`); its rule is the fit's rule.
    options : FitOptions, optional
    callback : callable, optional
        Called as ``callback(pass_number, theta, llf)`` after every pass (original scale).
    standardise : bool
        Fit on the standardised copy (below). ``False`` fits on the design as it is: for
        integrands whose parameters the map of :mod:`mlsml.rescale` does not cover (the
        joint stage-2 model of :mod:`mlsml.stage2`, which starts at the MELSM's estimates).

    Returns
    -------
    OptSummary

    Notes
    -----
    The optimiser's tolerances (``gtol`` on the gradient, the relative curvature below
    which a direction counts as flat) are not invariant to the units of the data: with
    a covariate such as a Unix timestamp the curvature in ``beta`` spans twenty orders
    of magnitude and a quasi-Newton run stops far below the maximum. The fit is
    therefore done on the standardised copy of :func:`mlsml.rescale.reparametrise`
    (response divided by a power of two near ``sd(y)``; off-centre or badly scaled
    columns of ``X``, ``W``, ``Z``, ``G``, ``S`` centred and scaled), and the
    estimates, gradient, Hessian and log-likelihood are mapped back exactly with the
    Jacobian ``J`` of the map: ``theta = f(theta_s)``, ``grad = J^{-T} grad_s``,
    ``H = J^{-T} H_s J^{-1}``, ``llf = llf_s - N ln sigma``. The standardised Hessian
    and ``J`` are kept (:attr:`OptSummary.hessian_std`, :attr:`OptSummary.jacobian`):
    positive definiteness and the covariance of the estimates are computed from them
    (:func:`theta_covariance`). Results are therefore equivariant under affine changes
    of the response and of every covariate.

    Examples
    --------
    What :meth:`mlsml.MELSM.fit` does, step by step:

    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> model = mlsml.MELSM.from_formula("y ~ x", df, groups="school")
    >>> opt = maximize(model.objective())
    >>> opt.converged, opt.quadrature.kind, bool(abs(opt.llf - model.fit().llf) < 1e-6)
    (True, 'uexact', True)
    """
    opts = options or FitOptions()
    if not standardise:
        return _maximize(likelihood, opts, callback)
    design = likelihood.design
    if opts.start is None and not likelihood.integrand.core:  # in the units of y (see mlsml.start)
        opts = replace(opts, start=_warm_start(likelihood, opts))
    rp = reparametrise(design)
    if rp.identity:
        return _maximize(likelihood, opts, callback)
    shift = rp.log_shift
    std = likelihood.with_design(rp.design)
    start = None if opts.start is None else rp.to_standardised(opts.start)
    cb = None if callback is None else (lambda k, th, llf: callback(k, rp.to_original(th), llf - shift))
    opt = _maximize(std, replace(opts, start=start), cb)
    J = rp.jacobian(opt.theta)
    grad = rp.gradient(opt.grad, J)
    return replace(
        opt,
        start=rp.to_original(opt.start),
        theta=rp.to_original(opt.theta),
        llf=float(opt.llf - shift),
        grad=grad,
        hessian=rp.hessian(opt.hessian, J),
        max_grad=float(np.max(np.abs(grad))) if grad.size else 0.0,
        history=tuple((k, llf - shift, step, ok, msg) for (k, llf, step, ok, msg) in opt.history),
        options=opts,
        theta_std=opt.theta,
        hessian_std=opt.hessian,
        jacobian=J,
    )


def information_pd(optsum: OptSummary) -> bool:
    r"""Whether the observed information is positive definite, decided by Cholesky.

    On the standardised scale of the fit (:attr:`OptSummary.hessian_std`, where the
    response and every covariate column have unit-order scale, :mod:`mlsml.rescale`):
    positive definite when the Cholesky factorisation of
    :math:`-H_s - \epsilon\,\max_i(-H_s)_{ii}\,I` exists, :math:`\epsilon` =
    :data:`HESSIAN_PD_RTOL`, i.e. when no direction is flatter than that fraction of the
    best-determined one. The threshold is relative to curvatures in standardised units,
    so it does not depend on the units the user measured the data in; a direction that
    is flat because a variance sits at zero (a singular fit) fails it.
    """
    H = optsum.hessian if optsum.hessian_std is None else optsum.hessian_std
    return _cholesky_pd(np.asarray(H, dtype=float))


def _cholesky_pd(H: np.ndarray) -> bool:
    if H.size == 0:
        return True
    negH = -0.5 * (H + H.T)
    if not np.all(np.isfinite(negH)):
        return False
    top = float(np.max(np.diag(negH)))
    if not top > 0:
        return False
    try:
        np.linalg.cholesky(negH - HESSIAN_PD_RTOL * top * np.eye(negH.shape[0]))
    except np.linalg.LinAlgError:
        return False
    return True


def theta_covariance(optsum: OptSummary) -> np.ndarray | None:
    r"""Covariance of the estimates on the optimiser scale, :math:`J(-H_s)^{-1}J'`.

    ``None`` when the information is not positive definite (:func:`information_pd`).
    Inverting the standardised information and mapping it with the Jacobian of
    :func:`mlsml.rescale.reparametrise` keeps the digits that inverting the Hessian in
    the original units (condition numbers up to ``1e20`` with timestamp covariates)
    would lose.
    """
    if not information_pd(optsum):
        return None
    H = optsum.hessian if optsum.hessian_std is None else optsum.hessian_std
    negH = -0.5 * (np.asarray(H, dtype=float) + np.asarray(H, dtype=float).T)
    sd = np.sqrt(np.diag(negH))
    cov = np.linalg.inv(negH / np.outer(sd, sd)) / np.outer(sd, sd)  # equilibrated inverse
    if optsum.jacobian is not None:
        J = np.asarray(optsum.jacobian, dtype=float)
        cov = J @ cov @ J.T
    return 0.5 * (cov + cov.T)


#: Methods that step with the exact Hessian (no fallback from one of them to another).
HESSIAN_METHODS = ("trust-exact", "Newton-CG", "trust-krylov", "trust-ncg")

#: Whether SciPy's ``trust-exact`` bounds the iterations of its subproblem solver
#: (``IterativeSubproblem.MAXITER_DEFAULT``: present in SciPy 1.17, absent in 1.11). Without it the solver can
#: loop for ever (scipy/scipy#12513, #20244: a stale Cholesky factor): with SciPy 1.11 the
#: fallback of a 7-school fuzz case never returned. There the fallback is ``trust-krylov``,
#: trust-region Newton on the same exact Hessian with a bounded (Lanczos) subproblem solver.
TRUST_EXACT_BOUNDED = hasattr(_sp_trust_exact.IterativeSubproblem, "MAXITER_DEFAULT")

#: The automatic fallback (:func:`_fallback`): trust-region Newton on the exact Hessian,
#: whose steps stay inside a region where the quadratic model is trusted, so it neither
#: stalls at a saddle nor runs off to where the quadrature overflows.
FALLBACK_METHOD = "trust-exact" if TRUST_EXACT_BOUNDED else "trust-krylov"

#: A log-likelihood that the rule with about twice the points changes by more than this
#: (log-likelihood units) is not reported: the rule is not accurate at the estimates
#: (:attr:`OptSummary.llf_reliable`). One unit moves a likelihood-ratio statistic by 2.
LLF_UNRELIABLE = 1.0

#: Budget of the fallback, per start: iterations of one trust-exact pass and re-centring
#: passes (each iteration costs an exact Hessian; trust-exact needs 10 to 40 where it
#: converges, and on a fit that cannot converge an unbounded fallback cost minutes: with
#: 200 iterations a 26-row fuzz case whose variance function runs to minus infinity
#: spent 900 Hessians, 40 s, in the fallback).
FALLBACK_MAXITER = 60
FALLBACK_PASSES = 4

#: Consecutive quasi-Newton passes that end without SciPy's success flag (in practice
#: "precision loss" in the line search) while the passes have not settled: BFGS is
#: creeping along a curved ridge, each pass gaining a little (on a 7-row fuzz case 30
#: passes gained 0.004 in 10 s, where the exact-Hessian fallback reached a maximum 0.008
#: higher in 2 passes). The run stops there, not converged, and the fallback takes over.
#: Fits that converge need 2 to 5 passes (fuzz of issue 12: 669 of 695).
STALL_PASSES = 6

#: A quasi-Newton end with a Newton decrement above this many ``dtol`` is a stall;
#: any decrement above ``dtol`` already makes the fit not converged (:func:`_trouble`).
STALL_FACTOR = 1.0


def quadrature_check(lik: Likelihood, theta, llf: float) -> tuple[int, float] | None:
    r"""``(points, |llf(points) - llf|)`` with about twice the points, or ``None``.

    ``points = min(2 n + 1, max_nagq)`` for the rule's ``n`` points per dimension:

    .. math:: \Delta = |\ell_{2n+1}(\theta) - \ell_n(\theta)|.

    Only where it is cheap and informative: a random scale (otherwise the
    integrand is Gaussian and the rule exact), the core model (or the quadratic
    association, whose outer rule is the u-exact one), and at most
    two dimensions in the product rule (the u-exact rule is one-dimensional in ``v``).
    A rule that cannot be evaluated at the points gives ``(points, inf)``.
    """
    out = _more_points(lik, theta, llf)
    return None if out is None else (out[0], out[2])


def _more_points(lik: Likelihood, theta, llf: float) -> tuple[int, float, float] | None:
    """``(points, llf(points), |llf(points) - llf|)`` of :func:`quadrature_check`, or ``None``."""
    lay = lik.layout
    if not lay.random_scale or not (lik.integrand.core or lay.quad_assoc) or not np.isfinite(llf):
        return None
    nagq = lik.spec.nagq
    more = min(2 * nagq + 1, max_nagq(lik.spec.dim(lay.q, lay.n_v)))
    if more <= nagq:
        return None
    if not lik.spec.uexact and lay.d > 2:
        return None
    try:
        with np.errstate(all="ignore"):
            value = lik.with_spec(nagq=more).value(theta)
    except (np.linalg.LinAlgError, FloatingPointError, ValueError):
        value = np.nan
    diff = abs(value - llf)
    return more, float(value), float(diff) if np.isfinite(diff) else float("inf")


#: :func:`raise_rule` raises the default rule when about twice the points move the
#: log-likelihood at the estimates by more than this: the precision to which issue 12's
#: criterion compares a fit with an independent maximum. Where the rule errs by more, the
#: maximum of the rule is not that of the likelihood to that precision (in a fuzz case
#: with 7 schools the 15-point rule put a maximum 0.02 above the fit, where 41 points put
#: it 0.08 below). On data with schools of tens of pupils 15 points are accurate to
#: 1e-6 or better, and nothing is refitted.
RULE_RAISE_TOL = 1e-3

#: How many times :func:`raise_rule` doubles the points of a default rule that is not
#: accurate at its estimates (15 -> 31 -> 63 points in ``v`` for the u-exact rule).
MAX_RULE_RAISES = 2


def raise_rule(lik: Likelihood, optsum: OptSummary, options: FitOptions | None = None, callback=None) -> tuple[Likelihood, OptSummary]:
    r"""Refit with more points while the rule is not accurate at the estimates.

    When the rule with about twice the points (:func:`quadrature_check`) moves the
    log-likelihood at the estimates by more than :data:`RULE_RAISE_TOL`, the rule's
    maximum is not the likelihood's to that precision, and by more than
    :data:`LLF_UNRELIABLE` the fit's llf is not even reported
    (:attr:`OptSummary.llf_reliable`). That happens where a school's
    posterior is far from normal (schools of one to three pupils with a large
    ``var(v)``, or :math:`|\mathrm{corr}(u_0, v)|` near 1). The likelihood is then
    maximised again with the check's rule (:math:`n \to 2n + 1` points per dimension,
    from the fit's estimates, and from its starting values when that refit is not usable:
    from the estimates of a fuzz case a 15-to-31-point refit ran off to where 63 points
    moved the llf by 1.5e23), at most :data:`MAX_RULE_RAISES` times, until the check agrees to
    :data:`RULE_RAISE_TOL`; a refit whose llf is not reliable where the smaller rule's was
    is not taken. The optimiser summary
    says what was done (:attr:`OptSummary.rule_raised`). :meth:`mlsml.MELSM.fit` does this
    only for its default rule (``nagq=None``); a rule the user chose is kept, and the
    fit's message says to raise ``nagq``.

    Returns
    -------
    (Likelihood, OptSummary)
        The likelihood with the rule finally used, and its fit (``lik`` and ``optsum``
        unchanged when the rule was accurate, or no larger rule could be built).
    """
    opts = options or optsum.options
    notes = [optsum.rule_raised] if optsum.rule_raised else []  # an earlier round's raises are kept
    for _ in range(MAX_RULE_RAISES):
        check = optsum.quadrature_check
        if check is None or check[0] <= lik.spec.nagq or check[1] <= RULE_RAISE_TOL:
            break
        points, change = check
        new_lik = lik.with_spec(nagq=points)
        new = None
        # from the estimates first (a warm start: a few iterations where the rules differ
        # little); from the starting values if that run is not usable
        # (from the estimates of one fuzz case a 31-point refit ran off to where 63 points
        # moved the llf by 1.5e23)
        for start in (np.asarray(optsum.theta, dtype=float), opts.start):
            try:
                run = maximize(new_lik, replace(opts, start=start), callback=callback)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                continue
            if run.llf_reliable and (new is None or not new.llf_reliable or run.llf > new.llf):
                new = run
            if new is not None and new.llf_reliable:
                break
        if new is None or (optsum.llf_reliable and not new.llf_reliable):
            break  # the larger rule failed where the smaller one was usable: keep the smaller
        notes.append(
            f"with {lik.spec.nagq} points per dimension the rule was not accurate at the estimates "
            f"({points} points moved the log-likelihood by {change:.3g}): refitted with {points} points"
        )
        lik, optsum = new_lik, replace(new, rule_raised="; ".join(notes))
    check = optsum.quadrature_check
    if optsum.converged and optsum.llf_reliable and check is not None and check[1] > RULE_RAISE_TOL:
        optsum = replace(
            optsum,
            converged=False,
            message=f"the quadrature is not accurate enough at the estimates to locate the maximum: with "
            f"{check[0]} points per dimension the log-likelihood moves by {check[1]:.3g} (more than "
            f"{RULE_RAISE_TOL:g}) even after raising the rule to {lik.spec.nagq} points; the data may not "
            f"determine the school effects (very small schools or a very large var(v)) ({optsum.message})",
        )
    return lik, optsum


def _check_ok(check: tuple | None) -> bool:
    """Whether a :func:`quadrature_check` result says the rule is accurate enough to report the llf."""
    return check is None or bool(check[1] <= LLF_UNRELIABLE)


@dataclass(frozen=True)
class _Run:
    """One optimiser run (passes, Newton polish) and the checks at its end (:func:`_run`)."""

    theta: np.ndarray
    llf: float
    grad: np.ndarray
    hessian: np.ndarray
    converged: bool
    message: str
    decrement: float
    check: tuple | None
    passes: int
    n_steps: int  # optimiser iterations, without the Newton polish
    n_iter: int
    n_fev: int
    history: tuple
    llf_more: float = float("nan")  # the llf with the check's points (NaN without a check)

    @property
    def reliable(self) -> bool:
        return bool(np.isfinite(self.llf)) and _check_ok(self.check)


def _run(
    lik: Likelihood, opts: FitOptions, method: str, theta: np.ndarray, budget: _Budget, callback=None, first_pass: int = 1
) -> _Run:
    """Re-centring passes of ``method`` from ``theta``, the Newton polish, and the end checks.

    The objective counts against ``budget`` (:attr:`FitOptions.max_time`): once it is
    spent, the run ends at the best point seen, without the Newton polish.
    """
    N = lik.design.nobs_weighted  # the number of observations (their total weight with weights)

    @budget.wrap
    def fun(th):
        # nodes re-adapted at every evaluation (inside value_and_grad): the AGQ likelihood at th
        try:
            v, g = lik.value_and_grad(th)
        except np.linalg.LinAlgError:  # no positive-definite posterior curvature to adapt to
            return np.inf, np.zeros_like(th)
        if not np.isfinite(v) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(th)
        return -v / N, -g / N

    hess_inv = _initial_inverse_hessian(theta, lik, N) if method == "BFGS" and BFGS_HAS_HESS_INV0 else None
    llf_old = -np.inf
    n_steps = n_fev = 0
    history = []
    converged = False
    message = "maximum number of passes reached"
    passes = 0
    unsettled = 0  # consecutive quasi-Newton passes ended without success (see STALL_PASSES)
    for passes in range(1, opts.max_passes + 1):
        kw: dict = {"maxiter": opts.maxiter}
        if method == "BFGS":
            kw["gtol"] = opts.gtol
            if hess_inv is not None and BFGS_HAS_HESS_INV0:
                kw["hess_inv0"] = hess_inv
        elif method == "L-BFGS-B":
            kw["gtol"] = opts.gtol
            kw["ftol"] = 1e-15
        hess_fun = None
        if method in HESSIAN_METHODS:

            def hess_fun(th):
                H = -lik.hessian(th) / N
                # scipy's trust-exact needs a finite matrix; where the Hessian cannot be
                # evaluated the value is inf too, and the step is rejected.
                return H if np.all(np.isfinite(H)) else np.eye(th.size)

        with np.errstate(all="ignore"):
            res = budget.minimize(fun, theta, jac=True, hess=hess_fun, method=method, options=kw)
            if "hess_inv0" in kw and int(getattr(res, "nit", 0)) == 0:
                # not one step from the warm start: near a saddle the repaired inverse Hessian
                # points its first step nowhere useful, and the fit stayed at the starting values
                # (a row order of the same data could decide it). BFGS from the identity does not
                # depend on that matrix.
                del kw["hess_inv0"]
                hess_inv = None
                n_fev += int(getattr(res, "nfev", 0))
                res = budget.minimize(fun, theta, jac=True, method=method, options=kw)
        n_steps += int(getattr(res, "nit", 0))
        n_fev += int(getattr(res, "nfev", 0))
        if method == "BFGS" and isinstance(getattr(res, "hess_inv", None), np.ndarray):
            hi = 0.5 * (res.hess_inv + res.hess_inv.T)
            if np.all(np.isfinite(hi)) and np.all(np.linalg.eigvalsh(hi) > 1e-12 * np.abs(hi).max()):
                hess_inv = hi
        new = np.asarray(res.x, dtype=float)
        step = float(np.max(np.abs(new - theta))) if new.size else 0.0
        theta = new
        llf = -float(res.fun) * N
        history.append((first_pass + passes - 1, llf, step, bool(res.success), str(res.message)))
        if callback is not None:
            callback(first_pass + passes - 1, theta, llf)
        if budget.spent:
            message = budget.message(passes)
            break
        if budget.failed:
            message = budget.failed
            break
        if step < opts.xtol and abs(llf - llf_old) < opts.ftol * max(1.0, 1e-3 * abs(llf)):
            converged = True
            message = f"converged after {passes} passes"
            break
        unsettled = unsettled + 1 if method not in HESSIAN_METHODS and not res.success else 0
        if unsettled >= STALL_PASSES:
            why = str(res.message).rstrip(".").lower()
            message = f"{method} stalled: {unsettled} passes in a row ended in {why!r} while the estimates still moved"
            break
        llf_old = llf
    with np.errstate(all="ignore"):
        theta, llf, grad, H, n_newton, decrement = _newton_polish(
            theta, lik, opts.dtol, 0 if budget.spent else NEWTON_POLISH_STEPS, opts.xtol
        )
    grad = np.asarray(grad)
    H = np.asarray(H)
    more = _more_points(lik, theta, llf)
    check = None if more is None else (more[0], more[2])
    if budget.spent:
        converged = False
    elif not np.isfinite(llf):
        converged = False
        message = "the log-likelihood is not finite at the estimates"
    elif not _check_ok(check):
        converged = False
        message = (
            f"the quadrature is not accurate at the estimates: with {check[0]} points per dimension "
            f"the log-likelihood changes by {check[1]:.3g} (more than {LLF_UNRELIABLE:g}), "
            "so it is not reported"
        )
    elif converged and not decrement < opts.dtol:
        converged = False
        message = (
            f"re-centring converged but the log-likelihood is not at a maximum "
            f"(Newton decrement {decrement:.2e}, max |gradient| {float(np.max(np.abs(grad))) if grad.size else 0.0:.2e})"
        )
    return _Run(
        theta,
        float(llf),
        grad,
        H,
        converged,
        message,
        float(decrement),
        check,
        passes,
        n_steps,
        n_steps + n_newton,
        n_fev,
        tuple(history),
        float("nan") if more is None else more[1],
    )


def _trouble(run: _Run, opts: FitOptions, start_llf: float) -> str:
    """Why ``run`` (the requested method's) needs the fallback, or ``""``.

    - not one step from the start (and the start is not the maximum);
    - the log-likelihood not finite, or not improved over the start;
    - the rule not accurate at the estimates (:func:`quadrature_check` above :data:`LLF_UNRELIABLE`);
    - not converged: the Newton decrement above ``STALL_FACTOR * dtol`` or the passes not settled.
    """
    if not np.isfinite(run.llf):
        return "the log-likelihood is not finite at its estimates"
    if not _check_ok(run.check):
        points, change = run.check
        return f"the quadrature is not accurate at its estimates (the rule with {points} points moves the llf by {change:.3g})"
    if run.n_steps == 0 and not run.decrement < opts.dtol:
        return "it made no step from the starting values"
    if np.isfinite(start_llf) and run.llf < start_llf and not run.converged:
        return f"it ended below the starting values' log-likelihood ({run.llf:.6g} < {start_llf:.6g})"
    if not run.decrement < STALL_FACTOR * opts.dtol:
        return f"it stopped where the Newton decrement is {run.decrement:.2e} (above dtol = {opts.dtol:g})"
    if not run.converged:
        return f"it did not converge ({run.message})"
    return ""


def _better(a: _Run, b: _Run) -> bool:
    """Whether ``b`` is a better end than ``a``: reliable first, then converged, then the higher llf."""

    def key(r: _Run):
        # judged by the rule with more points where the check ran: an end that gains only
        # by the quadrature error of the fit's rule (a ridge towards the boundary) does not win
        value = r.llf if r.check is None else r.llf_more
        return (r.reliable, r.converged, value if r.reliable and np.isfinite(value) else -np.inf)

    return key(b) > key(a)


def _fallback(lik: Likelihood, opts: FitOptions, first: _Run, start: np.ndarray, budget: _Budget, callback=None) -> list[_Run]:
    """Trust-region Newton runs (:data:`FALLBACK_METHOD`) after a troubled first run.

    From the first run's estimates when they are usable (finite, the rule accurate
    there, at least one step taken), then, until one converges with an accurate rule,
    from the starting values (the first run may have run off to where the quadrature
    fails, or into a saddle's basin) and from the default starting values
    (:func:`mlsml.start.start_values`) when the given start differs (a start where the
    quadrature overflows, e.g. a huge ``var(v)`` in schools of one or two pupils).
    """
    starts = []
    if first.reliable and np.all(np.isfinite(first.theta)) and first.n_steps > 0:
        starts.append(first.theta)
    starts.append(start)
    if lik.integrand.core:  # elsewhere maximize() always passes the default start
        default = np.asarray(start_values(lik.integrand), dtype=float)
        if default.shape == start.shape and not np.allclose(default, start):
            starts.append(default)
    out: list[_Run] = []
    k = first.history[-1][0] + 1 if first.history else 1
    for i, x0 in enumerate(starts):
        if i > 0 or x0 is not first.theta:  # a start where the rule already fails leads nowhere
            try:
                with np.errstate(all="ignore"):
                    llf0 = float(lik.value(x0))
            except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                continue
            if not np.isfinite(llf0) or not _check_ok(quadrature_check(lik, x0, llf0)):
                continue
        try:
            bounded = replace(opts, maxiter=min(opts.maxiter, FALLBACK_MAXITER), max_passes=min(opts.max_passes, FALLBACK_PASSES))
            r = _run(lik, bounded, FALLBACK_METHOD, np.array(x0, dtype=float), budget, callback, first_pass=k)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
        out.append(r)
        k += r.passes
        if (r.converged and r.reliable) or budget.spent:
            break
    return out


def _maximize(lik: Likelihood, opts: FitOptions, callback=None) -> OptSummary:
    """Maximum-likelihood estimates by re-centred adaptive quadrature (on the scale given).

    Runs ``opts.method`` (:func:`_run`); if its end is in trouble (:func:`_trouble`)
    and the method is not already one with the exact Hessian, runs the fallback
    (:func:`_fallback`) and keeps the best end (:func:`_better`), recording why in
    ``OptSummary.fallback``.
    """
    t0 = time.perf_counter()
    theta = np.array(opts.start if opts.start is not None else start_values(lik.integrand, opts.wide_start), dtype=float)
    start = theta.copy()
    budget = _Budget(t0, opts.max_time, theta)
    best = _run(lik, opts, opts.method, theta, budget, callback)
    runs = [best]
    fallback = ""
    why = ""
    if opts.method not in HESSIAN_METHODS and not budget.spent:
        start_llf = -np.inf
        if best.n_steps == 0 or not best.converged:
            with np.errstate(all="ignore"):
                try:
                    start_llf = float(lik.value(start))
                except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                    start_llf = -np.inf
        why = _trouble(best, opts, start_llf)
    if why:
        extra = _fallback(lik, opts, best, start, budget, callback)
        runs += extra
        kept = best
        for r in extra:
            if _better(kept, r):
                kept = r
        if kept is best:
            fallback = f"{opts.method}: {why}; the {FALLBACK_METHOD} fallback did not do better, the {opts.method} result is kept"
        else:
            fallback = f"{opts.method}: {why}; {FALLBACK_METHOD} (exact Hessian) took over: {kept.message}"
        best = kept
    message = best.message if not fallback or best is runs[0] else f"{best.message} (by the {FALLBACK_METHOD} fallback)"
    history = tuple(h for r in runs for h in r.history)
    return OptSummary(
        start=start,
        theta=best.theta,
        llf=float(best.llf),
        grad=best.grad,
        hessian=best.hessian,
        converged=best.converged,
        message=message,
        method=opts.method,
        options=opts,
        n_passes=sum(r.passes for r in runs),
        n_iter=sum(r.n_iter for r in runs),
        n_fev=sum(r.n_fev for r in runs),
        decrement=float(best.decrement),
        max_grad=float(np.max(np.abs(best.grad))) if best.grad.size else 0.0,
        history=history,
        quadrature=lik.spec,
        time=time.perf_counter() - t0,
        fallback=fallback,
        quadrature_check=best.check,
    )
