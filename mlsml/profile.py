"""Profile-likelihood confidence intervals.

For a scalar parameter ``psi`` the profile log-likelihood is

.. math::

    \\ell_p(\\psi) = \\max_{\\lambda} \\ell(\\psi, \\lambda),

the maximum over all other parameters ``lambda`` with ``psi`` held fixed, and the
``level`` profile interval is the set

.. math::

    \\{\\psi : 2\\,[\\ell(\\hat\\theta) - \\ell_p(\\psi)] \\le \\chi^2_{1}(\\text{level})\\}.

Unlike the Wald interval ``estimate +- z SE`` it is invariant to
re-parameterisation and respects the boundary ``psi >= 0`` of a variance, which is
why it covers better for variance components of few schools.

Each ``psi`` is held fixed by a **constrained re-parameterisation** of the
optimiser vector ``theta`` (see :mod:`mlsml.params`), so that the remaining
parameters stay unconstrained and autograd still gives exact gradients:

- a fixed-effect coefficient (``mean:<term>``, ``scale:<term>``) is one entry of
  ``theta`` and is simply held at ``psi``;
- a variance ``var(e_k)`` is the squared length of row ``k`` of the Cholesky factor
  ``L`` of ``Sigma``, ``var(e_k) = sum_{j<=k} L_kj^2``. Row ``k`` is written as

  .. math::

      L_{k,\\cdot} = \\sqrt{\\psi}\\, (z_1, \\dots, z_{k}, 1) / \\lVert (z, 1) \\rVert

  with free ``z`` in ``R^k``, which keeps ``L_kk > 0`` and fixes the row's squared
  length at ``psi``; no other row of ``L`` involves ``var(e_k)``.

The profile at each ``psi`` is maximised by BFGS on the adaptive Gauss-Hermite
likelihood, with the quadrature nodes re-adapted at every evaluation (as in
:func:`mlsml.optimize.maximize`), warm-started from the neighbouring ``psi``.
The interval ends are found by bracketing and Brent's method on ``ln psi`` for
variances and on ``psi`` otherwise. When the profile at a variance of
``1e-6`` times its estimate is still inside the threshold the lower end is
reported as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd
import autograd.numpy as anp
import numpy as np
from scipy import optimize as sopt
from scipy import stats

from .errors import ModelSpecError
from .optimize import BFGS_HAS_HESS_INV0
from .params import QUAD_NAME
from .quadrature import check_nagq


@dataclass(frozen=True)
class ProfileInterval:
    """A profile-likelihood interval for one parameter.

    Attributes
    ----------
    name : str
        Natural-scale parameter name.
    estimate : float
        The ML estimate.
    lower, upper : float
        Interval ends (``lower = 0`` for a variance whose profile stays above the
        threshold down to zero).
    level : float
        Confidence level.
    n_evals : int
        Number of profile maximisations performed.
    """

    name: str
    estimate: float
    lower: float
    upper: float
    level: float
    n_evals: int


class _Profiler:
    """Maps ``(free, psi)`` to ``theta`` and maximises over ``free``."""

    def __init__(self, res, name: str, nagq: int | None = None):
        lay = res.layout
        self.res = res
        self.design = res.model.design
        lik = res.likelihood  # the fit's own rule
        if nagq is not None:
            lik = lik.with_spec(nagq=check_nagq(nagq, lik.spec.dim(lay.q, lay.n_v)))
        self.likelihood = lik
        self.theta_hat = np.asarray(res.theta, dtype=float)
        names = list(lay.names)
        if name not in names:
            raise ModelSpecError(f"unknown parameter {name!r}; the model has {names}")
        idx = names.index(name)
        off = lay.p + lay.k
        n = self.theta_hat.size
        if idx < off or name == QUAD_NAME:  # quad(u0,v) is last in theta and in the names
            self.kind = "coef"
            self.fixed = [idx]
        elif idx < off + lay.d:
            self.kind = "var"
            k = idx - off
            # the free entries of row k of the log-Cholesky factor (diagonal last); covariances
            # fixed at zero (cov_constraints) leave out their entries of the row
            start = k * (k + 1) // 2
            row = [i for i, pos in enumerate(lay.free_chol) if start <= pos <= start + k]
            self.fixed = [lay.chol_offset + i for i in row]
            self.k = len(row) - 1
        else:
            raise ModelSpecError(
                f"profile intervals are available for coefficients and variances, not for {name!r}; "
                "use the Wald interval (res.conf_int()) for covariances"
            )
        self.free_idx = np.array([i for i in range(n) if i not in self.fixed], dtype=int)
        self.n = n
        self.name = name
        self.estimate = float(res.params[name])
        self.vg = autograd.value_and_grad(self._loglik_free)
        self.hess = autograd.hessian(self._loglik_free)
        self.n_evals = 0
        self.gtol = 1e-6

    # ----------------------------------------------------------- mapping
    def theta(self, free, psi):
        """Full optimiser vector from the free parameters and the fixed ``psi``."""
        if self.kind == "coef":
            fixed_part = [anp.array([psi])]
        else:
            z = free[len(free) - self.k :] if self.k else anp.zeros(0)
            norm = anp.sqrt(1.0 + anp.sum(z**2))
            root = anp.sqrt(psi)
            fixed_part = [root * z / norm, anp.array([anp.log(root / norm)])]
        # reassemble in order: free entries before the fixed block, the block, the rest
        head = self.fixed[0]
        n_head = head
        rest_free = free[n_head : len(free) - (self.k if self.kind == "var" else 0)]
        return anp.concatenate([free[:n_head]] + fixed_part + [rest_free])

    def free_from_theta(self, theta: np.ndarray) -> np.ndarray:
        """Free parameters reproducing the non-fixed part of ``theta``."""
        theta = np.asarray(theta, dtype=float)
        base = theta[self.free_idx]
        if self.kind == "var" and self.k:
            block = theta[self.fixed]
            offd, ldiag = block[:-1], np.exp(block[-1])
            z = offd / ldiag
            return np.concatenate([base, z])
        return base

    def _initial_inverse_hessian(self, free, psi, N):
        """Inverse exact Hessian of ``-loglik/N`` at the start (seeds BFGS), or None."""
        try:
            nodes = self.likelihood.adapt(np.asarray(self.theta(free, psi)))
            H = -np.asarray(self.hess(free, psi, nodes)) / N
            H = 0.5 * (H + H.T)
            w, V = np.linalg.eigh(H)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return None
        if not np.all(np.isfinite(w)) or w.max() <= 0:
            return None
        w = np.maximum(w, 1e-6 * w.max())
        M = (V / w) @ V.T
        return 0.5 * (M + M.T)

    def _loglik_free(self, free, psi, nodes):
        return self.likelihood.at_nodes(self.theta(free, psi), nodes)

    # ----------------------------------------------------------- profile
    def profile(self, psi: float, start: np.ndarray) -> tuple[float, np.ndarray]:
        """Maximised log-likelihood at ``psi`` and the maximising free parameters."""
        self.n_evals += 1
        N = self.design.nobs_weighted

        def fun(free):
            th = self.theta(free, psi)
            try:
                nodes = self.likelihood.adapt(np.asarray(th))
            except np.linalg.LinAlgError:
                return np.inf, np.zeros_like(free)
            v, g = self.vg(free, psi, nodes)
            if not np.isfinite(v) or not np.all(np.isfinite(g)):
                return np.inf, np.zeros_like(free)
            return -v / N, -np.asarray(g) / N

        # gtol on -loglik/N: 1e-6 N in loglik units; the profile value is then
        # accurate to far better than the 1e-3 the interval ends need
        opts = {"gtol": self.gtol, "maxiter": 100}
        hinv = self._initial_inverse_hessian(start, psi, N) if BFGS_HAS_HESS_INV0 else None
        if hinv is not None:
            opts["hess_inv0"] = hinv
        out = sopt.minimize(fun, start, jac=True, method="BFGS", options=opts)
        return -float(out.fun) * N, np.asarray(out.x, dtype=float)


def profile_ci(res, name: str, level: float = 0.95, nagq: int | None = None, max_expand: int = 12) -> ProfileInterval:
    """Profile-likelihood confidence interval for one parameter of a fitted model.

    Parameters
    ----------
    res : MELSMResults
        A converged fit.
    name : str
        Natural-scale name: ``mean:<term>``, ``scale:<term>`` or ``var(<effect>)``
        (e.g. ``var(u0)``, ``var(v)``). Covariances are not profiled.
    level : float
        Confidence level; the threshold is ``chi2_1(level) / 2`` below the maximum.
    nagq : int, optional
        Quadrature points per dimension (default: those of the fit). The rule is
        always the fit's own (product or u-exact, :attr:`MELSMResults.likelihood`).
    max_expand : int
        Maximum number of bracket expansions on each side.

    Returns
    -------
    ProfileInterval

    Raises
    ------
    ModelSpecError
        For an unknown name or a covariance.

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.profile import profile_ci
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> ci = profile_ci(res, "var(v)")
    >>> bool(ci.lower < res.params["var(v)"] < ci.upper)
    True
    """
    if not 0 < level < 1:
        raise ModelSpecError(f"level must be in (0, 1), got {level}")
    prof = _Profiler(res, name, nagq)
    crit = 0.5 * float(stats.chi2.ppf(level, 1))
    llf = float(res.llf)
    est = prof.estimate
    free_hat = prof.free_from_theta(prof.theta_hat)
    se = float(res.bse.get(name, np.nan))
    is_var = prof.kind == "var"
    # work on ln psi for variances
    if is_var:
        x_hat = np.log(max(est, 1e-300))
        step = se / est if np.isfinite(se) and se > 0 and est > 0 else 1.0
        step = float(np.clip(step, 0.05, 3.0))

        def to_psi(x):
            return float(np.exp(x))
    else:
        x_hat = est
        step = se if np.isfinite(se) and se > 0 else max(abs(est), 1.0) * 0.1

        def to_psi(x):
            return float(x)

    cache: dict[float, tuple[float, np.ndarray]] = {}

    def g(x, start):
        if x not in cache:
            cache[x] = prof.profile(to_psi(x), start)
        val, free = cache[x]
        return (llf - val) - crit, free

    def end(sign: int) -> float:
        start = free_hat
        inner = x_hat
        outer = x_hat + sign * 2.0 * step
        for _ in range(max_expand):
            val, free = g(outer, start)
            if val > 0:
                break
            inner, start = outer, free
            if is_var and sign < 0 and to_psi(outer) < 1e-6 * est:
                return 0.0
            outer = x_hat + sign * (abs(outer - x_hat) * 2.0)
            if is_var and sign < 0:
                outer = max(outer, x_hat + np.log(1e-7))
        else:
            return 0.0 if (is_var and sign < 0) else float(sign * np.inf)
        warm = start

        def f(x):
            return g(x, warm)[0]

        # ends to 0.1% of psi (variances, on ln psi) or 1e-3 SE (coefficients)
        xtol = 1e-3 if is_var else 1e-3 * step
        root = sopt.brentq(f, min(inner, outer), max(inner, outer), xtol=xtol, rtol=1e-6)
        return to_psi(root)

    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        lower = end(-1)
        upper = end(+1)
    return ProfileInterval(name=name, estimate=est, lower=lower, upper=upper, level=level, n_evals=prof.n_evals)
