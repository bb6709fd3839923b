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

Starting values come from :mod:`mlsml.start`; BFGS is seeded with the inverse of the
exact Hessian at the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize as sopt

from .design import Design
from .integrand import SchoolSums
from .likelihood import Likelihood
from .params import ParamLayout
from .quadrature import DEFAULT_NAGQ_UEXACT, QuadratureSpec
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
        Starting values on the optimiser scale.
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
    max_time: float | None = None


#: The message of a fit stopped by :attr:`FitOptions.max_time` (formatted with the budget,
#: the seconds used and the passes run).
TIME_BUDGET_MESSAGE = (
    "stopped by the time budget max_time={budget:g} s after {used:.1f} s and {passes} optimiser pass(es), "
    "before reaching a maximum: the estimates are the best point found so far, not a maximum likelihood fit"
)


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
        self.spent = False

    def wrap(self, fun):
        def budgeted(th):
            if self.max_time is not None and time.perf_counter() - self.t0 > self.max_time:
                raise _OutOfTime
            out = fun(th)
            if out[0] < self.best[0]:
                self.best = (out[0], np.array(th, dtype=float))
            return out

        return budgeted

    def minimize(self, fun, theta, **kw):
        try:
            return sopt.minimize(fun, theta, **kw)
        except _OutOfTime:
            self.spent = True
            value, x = self.best if np.isfinite(self.best[0]) else (np.inf, theta)
            return sopt.OptimizeResult(x=x, fun=value, nit=0, nfev=0, success=False, message="time budget spent")

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
    theta_units : ndarray or None
        Units of each element of ``theta`` relative to the fit on ``y / s``
        (``M`` of :func:`_response_scaling`); ``H * outer(M, M)`` is the Hessian in
        the standardised units, where eigenvalue cut-offs are meaningful.
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
    theta_units: np.ndarray | None = None

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


#: relative curvature below which a direction counts as flat (see _newton_decrement)
FLAT = 1e-6


def _newton_decrement(grad: np.ndarray, hess: np.ndarray) -> float:
    """``g' (-H)^{-1} g / 2``; infinite when ``-H`` is not positive definite.

    At a boundary optimum (a variance tending to zero on the log-Cholesky
    scale) the Hessian is singular; the decrement is then taken over the
    well-determined directions (eigenvalues above ``FLAT = 1e-6`` of the
    largest). Curvatures within ``+/- FLAT`` of the largest are treated as
    zero: the Hessian ignores the derivative of the quadrature error, so near a
    singular ``Sigma`` such tiny curvatures have either sign at random (seen
    in the property tests: a location shift of ``y`` flipped one from
    ``+3e-13`` to about ``-1e-8``). Only clearly negative curvature (a saddle)
    makes the decrement infinite.
    """
    if grad.size == 0:
        return 0.0
    if not (np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))):
        return float("inf")  # e.g. a likelihood that overflowed: not a maximum
    negH = -0.5 * (hess + hess.T)
    w, V = np.linalg.eigh(negH)
    if not np.all(np.isfinite(w)) or w.max() <= 0:
        return float("inf")
    keep = w > FLAT * w.max()
    if np.any(w < -FLAT * w.max()):
        return float("inf")
    gv = V.T @ grad
    return float(0.5 * np.sum(gv[keep] ** 2 / w[keep]))


def _newton_polish(theta, lik: Likelihood, dtol, max_steps: int = NEWTON_POLISH_STEPS):
    """Finish with Newton-Raphson steps on the exact Hessian (as MIXREGLS does).

    Quasi-Newton methods stop once their line search cannot make progress in
    floating point; a few exact Newton steps, each accepted only if the adapted
    log-likelihood does not fall, take the estimates to the maximum. Directions
    with (near-)zero curvature -- a variance at the boundary -- are left alone.

    Returns ``theta, llf, grad, hessian, n_steps`` at nodes adapted to ``theta``.
    """

    def at(th):
        nodes = lik.adapt(th)
        v, g = lik.value_and_grad(th, nodes)
        return float(v), np.asarray(g), nodes

    llf, grad, nodes = at(theta)
    H = lik.hessian(theta, nodes)
    steps = 0
    for steps in range(1, max_steps + 1):
        dec = _newton_decrement(grad, H)
        if not np.isfinite(dec) or dec < 1e-3 * dtol:
            steps -= 1
            break
        negH = -0.5 * (H + H.T)
        w, V = np.linalg.eigh(negH)
        keep = w > FLAT * w.max()
        step = V[:, keep] @ ((V[:, keep].T @ grad) / w[keep])
        t = 1.0
        for _ in range(30):
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
    return theta, llf, grad, H, steps


def _response_scaling(design: Design) -> tuple[float, np.ndarray, np.ndarray]:
    """Power of two ``s`` near ``sd(y)`` and the affine map between optimiser scales.

    Dividing ``y`` by ``s`` is exact in floating point (``s = 2^k``). If
    ``theta`` are the parameters for ``y`` and ``theta_s`` those for ``y / s``,
    then ``theta = M * theta_s + c`` elementwise with

    - ``beta = s beta_s``;
    - ``alpha = alpha_s + delta`` where ``W delta = 2 ln s`` (a shift of the
      intercept, found by least squares; if the constant is not in the span of
      ``W`` no scaling is used);
    - the rows of ``L`` belonging to ``u`` are multiplied by ``s`` (the
      log-diagonal shifts by ``ln s``), the row of ``v`` is unchanged, since
      ``Sigma = D Sigma_s D`` with ``D = diag(s, ..., s, 1)``.

    Models with a between-school variance function (``bs_formula``) are fitted
    in the units of ``y`` (identity map): their ``theta`` holds ``tau`` and a
    unit-diagonal factor, to which the map above does not apply.

    Returns ``(s, M, c)``; ``s = 1`` gives the identity.
    """
    lay = design.layout
    n = lay.n_params
    ident = (1.0, np.ones(n), np.zeros(n))
    if lay.bs_terms:  # theta holds tau and a unit-diagonal L0 there: this map does not apply
        return ident
    sd = float(np.std(design.y))
    if not np.isfinite(sd) or sd <= 0:
        return ident
    s = float(2.0 ** np.round(np.log2(sd)))
    if s == 1.0:
        return ident
    ones = np.full(design.nobs, 2.0 * np.log(s))
    delta, *_ = np.linalg.lstsq(design.W, ones, rcond=None)
    if not np.allclose(design.W @ delta, ones, rtol=0, atol=1e-9 * abs(ones[0])):
        return ident
    M = np.ones(n)
    c = np.zeros(n)
    M[: lay.p] = s
    c[lay.p : lay.p + lay.k] = delta
    pos = lay.p + lay.k
    for i in range(lay.d):
        if i < lay.q:
            M[pos : pos + i] = s
            c[pos + i] = np.log(s)
        pos += i + 1
    return s, M, c


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
    cold = start_values(integrand)
    lay = likelihood.layout
    if isinstance(integrand, SchoolSums) or not lay.scale_re_terms or lay.bs_terms:
        return cold
    base = ParamLayout(lay.mean_terms, lay.scale_terms, lay.q, True)
    design = replace(likelihood.design, layout=base)
    core = Likelihood.build(design, QuadratureSpec("uexact", DEFAULT_NAGQ_UEXACT) if lay.q else likelihood.spec)
    try:
        opt = maximize(core, replace(opts, start=None, max_time=None))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return cold
    if not (np.isfinite(opt.llf) and np.all(np.isfinite(opt.theta))):
        return cold
    beta, alpha, L = base.split(opt.theta)
    S = np.asarray(L) @ np.asarray(L).T
    if not np.linalg.eigvalsh(S).min() > WARM_START_MIN_EIG * np.trace(S):
        return cold  # a singular core fit: its boundary is no place to start from
    _, _, L0 = lay.split(cold)
    sigma = np.asarray(L0) @ np.asarray(L0).T  # the cold start's variances of the slopes
    d0 = lay.q + 1
    sigma[:d0, :] = 0.0
    sigma[:, :d0] = 0.0
    sigma[:d0, :d0] = S
    return lay.theta_from_parts(np.asarray(beta), np.asarray(alpha), sigma)


def maximize(likelihood: Likelihood, options: FitOptions | None = None, callback=None) -> OptSummary:
    """Maximum-likelihood estimates, fitted internally to ``y / s`` with ``s ~ sd(y)``.

    Parameters
    ----------
    likelihood : Likelihood
        The objective (:meth:`mlsml.MELSM.objective`); its rule is the fit's rule.
    options : FitOptions, optional
    callback : callable, optional
        Called as ``callback(pass_number, theta, llf)`` after every pass.

    Returns
    -------
    OptSummary

    Notes
    -----
    The optimiser's tolerances (``gtol`` on the gradient, the relative
    eigenvalue cut-offs of the Newton steps) are not invariant to the units of
    ``y``: with responses of order ``1e-4`` the curvature in ``beta`` is
    ``1e8`` times that in the variance parameters. The fit is therefore done
    on ``y / s`` (``s`` a power of two near ``sd(y)``, so the division is
    exact and data with ``sd(y)`` in ``[0.71, 1.41]`` are untouched) and the
    estimates, gradient, Hessian and log-likelihood are mapped back exactly
    by :func:`_response_scaling`: ``theta = M theta_s + c``,
    ``grad = grad_s / M``, ``H = H_s / (M M')``, ``llf = llf_s - N ln s``.
    Results therefore transform exactly under rescaling of ``y``.

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
    design = likelihood.design
    if opts.start is None and not likelihood.integrand.core:  # in the units of y (see mlsml.start)
        opts = replace(opts, start=_warm_start(likelihood, opts))
    s, M, c = _response_scaling(design)
    if s == 1.0:
        return _maximize(likelihood, opts, callback)
    shift = design.nobs * np.log(s)
    std = likelihood.with_design(replace(design, y=design.y / s))
    start = None if opts.start is None else (np.asarray(opts.start, float) - c) / M
    cb = None if callback is None else (lambda k, th, llf: callback(k, M * th + c, llf - shift))
    opt = _maximize(std, replace(opts, start=start), cb)
    return replace(
        opt,
        start=M * opt.start + c,
        theta=M * opt.theta + c,
        llf=float(opt.llf - shift),
        grad=opt.grad / M,
        hessian=opt.hessian / np.outer(M, M),
        max_grad=float(np.max(np.abs(opt.grad / M))) if opt.grad.size else 0.0,
        history=tuple((k, llf - shift, step, ok, msg) for (k, llf, step, ok, msg) in opt.history),
        options=opts,
        theta_units=M,
    )


def _maximize(lik: Likelihood, opts: FitOptions, callback=None) -> OptSummary:
    """Maximum-likelihood estimates by re-centred adaptive quadrature (on the scale given)."""
    t0 = time.perf_counter()
    theta = np.array(opts.start if opts.start is not None else start_values(lik.integrand), dtype=float)
    start = theta.copy()
    N = float(lik.design.nobs)
    budget = _Budget(t0, opts.max_time, theta)

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

    hess_inv = _initial_inverse_hessian(theta, lik, N) if opts.method == "BFGS" and BFGS_HAS_HESS_INV0 else None
    llf_old = -np.inf
    n_iter = n_fev = 0
    history = []
    converged = False
    message = "maximum number of passes reached"
    passes = 0
    for passes in range(1, opts.max_passes + 1):
        kw: dict = {"maxiter": opts.maxiter}
        method = opts.method
        if method == "BFGS":
            kw["gtol"] = opts.gtol
            if hess_inv is not None and BFGS_HAS_HESS_INV0:
                kw["hess_inv0"] = hess_inv
        elif method == "L-BFGS-B":
            kw["gtol"] = opts.gtol
            kw["ftol"] = 1e-15
        hess_fun = None
        if method in ("trust-exact", "Newton-CG", "trust-krylov", "trust-ncg"):

            def hess_fun(th):
                return -lik.hessian(th) / N

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
        n_iter += int(getattr(res, "nit", 0))
        n_fev += int(getattr(res, "nfev", 0))
        if method == "BFGS" and isinstance(getattr(res, "hess_inv", None), np.ndarray):
            hi = 0.5 * (res.hess_inv + res.hess_inv.T)
            if np.all(np.isfinite(hi)) and np.all(np.linalg.eigvalsh(hi) > 1e-12 * np.abs(hi).max()):
                hess_inv = hi
        new = np.asarray(res.x, dtype=float)
        step = float(np.max(np.abs(new - theta))) if new.size else 0.0
        theta = new
        llf = -float(res.fun) * N
        history.append((passes, llf, step, bool(res.success), str(res.message)))
        if callback is not None:
            callback(passes, theta, llf)
        if budget.spent:
            message = budget.message(passes)
            break
        if step < opts.xtol and abs(llf - llf_old) < opts.ftol * max(1.0, 1e-3 * abs(llf)):
            converged = True
            message = f"converged after {passes} passes"
            break
        llf_old = llf
    theta, llf, grad, H, n_newton = _newton_polish(theta, lik, opts.dtol, 0 if budget.spent else NEWTON_POLISH_STEPS)
    n_iter += n_newton
    if not np.isfinite(llf):
        converged = False
        message = "the log-likelihood is not finite at the estimates"
    decrement = _newton_decrement(np.asarray(grad), np.asarray(H))
    if converged and not decrement < opts.dtol:
        converged = False
        message = (
            f"re-centring converged but the log-likelihood is not at a maximum "
            f"(Newton decrement {decrement:.2e}, max |gradient| {float(np.max(np.abs(grad))):.2e})"
        )
    grad = np.asarray(grad)
    return OptSummary(
        start=start,
        theta=theta,
        llf=float(llf),
        grad=grad,
        hessian=np.asarray(H),
        converged=converged,
        message=message,
        method=opts.method,
        options=opts,
        n_passes=passes,
        n_iter=n_iter,
        n_fev=n_fev,
        decrement=float(decrement),
        max_grad=float(np.max(np.abs(grad))) if grad.size else 0.0,
        history=tuple(history),
        quadrature=lik.spec,
        time=time.perf_counter() - t0,
    )
