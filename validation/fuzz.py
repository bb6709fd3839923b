"""Fuzz the fit against an independent maximum (issue 12).

Issue 12 ("Right on any data a user brings") is done when a fuzz run of at least
2,000 random data sets and specifications compares every converged fit with an
independent maximum and finds none more than :data:`BELOW_MAX_TOL` below it while
reported converged, and none printing a non-finite or impossible log-likelihood.
This module is that instrument::

    python -m validation.fuzz --cases 2000 --seed 12 --jobs 2 --out validation/results/fuzz_<date>.csv
    python -m validation.fuzz --summary validation/results/fuzz_<date>.csv   # the tallies, as Markdown
    python -m validation.fuzz --one CASE_SEED                                # one case, verbosely
    python -m validation.fuzz --recheck OLD.csv --jobs 2 --out NEW.csv       # OLD's cases refitted on this code

Each case (:func:`random_case`) is a simulated data set and an ``mlsml.fit``
specification drawn from one of the *families* of failures the issue reproduced:

``scaling``
    the covariate (used in the mean, the log variance and, with slopes, the random
    part) shifted or scaled by ``10**-8`` to ``10**10``, or recoded as a year, a
    Unix timestamp or a currency amount;
``tiny``
    many schools of 1 to 3 (1 to 8 with slopes) pupils, sometimes with a few big
    schools of up to 5,000;
``boundary``
    few schools (3 to 15) and true variances exactly zero or near zero, ``|corr|``
    up to 0.99;
``slopes``
    a random slope (``re_formula="~ x"``) in schools of 2 to 60.

Every family also draws, at lower rates, the features of the others (a scaled
covariate, a zero variance, a near-one correlation, heavy-tailed residuals,
an ICC near 1, ``scale_re_formula``), so the families overlap as real data do.
Sizes: at most :data:`MAX_ROWS` rows per case; see :func:`draw_sizes` for the
distribution (median about 300 rows, 90% below about 1,500).

The *independent maximum* comes from routes that do not share the failure's causes
(:func:`reference_routes`):

1. the same model fitted on data whose covariates are centred and scaled
   (``(x - mean) / sd``; :func:`standardize`). This is a linear change of
   parametrisation (:func:`param_maps`): the maximum log-likelihood is unchanged,
   and the estimates map back exactly;
2. ``method="trust-exact"`` (exact Hessian) on the standardized data from several
   starts: the defaults, the fit's own estimates (mapped), and a start on the
   other face of the boundary (``|corr(u0,v)|`` near 1, ``var(u0)`` small);

every route's estimates are evaluated under the fit's *own* rule on the
standardized data (the same log-likelihood; on the raw data a timestamp covariate
costs the evaluation itself up to millions of units in rounding), routes whose value
moves by more than :data:`IMPOSSIBLE_GAP` with :data:`ROUTE_CHECK_NAGQ` points (where
the quadrature overflowed) are set aside, and the best of the rest is the reference.
Where cheap (dimension of the school effects at most 3), the fit's and
the reference's estimates are also evaluated with the product rule with many
points (:data:`ACCURATE_NAGQ`), so that a quadrature error is not mistaken for an
optimisation failure (column ``gap_accurate``).

Each case gets one class (:func:`classify`), first match wins:

``error_uncaught``
    the fit raised something other than an :class:`mlsml.MLSMLError`;
``error_documented``
    the fit raised an :class:`mlsml.MLSMLError` (a refusal with a message);
``over_time_cap``
    the fit took longer than :data:`CASE_SECONDS`;
``bad_llf``
    the printed log-likelihood is not finite, an estimate is not finite, or the
    llf is *impossible*: more than :data:`IMPOSSIBLE_GAP` above the accurate
    evaluation at the fit's own estimates (a quadrature artefact printed as the
    maximum, e.g. the issue's ``llf = +4.2e14``);
``not_converged``
    the fit says it did not converge (flagged, so not silent);
``below_max``
    converged, but more than :data:`BELOW_MAX_TOL` below the reference: the
    silent wrong answer of issue 12;
``ok``
    converged and within the tolerance of the reference (or above it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import multiprocessing as mp
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: A converged fit more than this below the independent maximum is a failure
#: (issue 12: "none is more than 1e-3 below it while reported converged").
BELOW_MAX_TOL = 1e-3

#: A printed llf more than this above the accurate evaluation at the fit's own
#: estimates is impossible (a quadrature artefact, not a likelihood; issue 12 saw
#: ``+4.2e14``). One log-likelihood unit: well above the accurate rule's own error.
IMPOSSIBLE_GAP = 1.0

#: Time cap of the fit itself, seconds of CPU time (:func:`time_cap`; the issue's
#: performance cliffs show up as ``over_time_cap``).
CASE_SECONDS = 30.0

#: CPU-time cap of each reference route (a route over it is skipped, not a failure).
ROUTE_SECONDS = 20.0

#: Points per dimension of the check that a route's log-likelihood is real: a route whose
#: value under the fit's rule moves by more than :data:`IMPOSSIBLE_GAP` with this many
#: points sits where the quadrature overflowed, and is not a reference.
ROUTE_CHECK_NAGQ = 31

#: The trust-exact route from the default start (mostly a repeat of the standardized
#: BFGS fit's path) is run only on cases of at most this many rows, to bound the time.
TRUST_DEFAULT_MAX_ROWS = 500

#: Most rows in one case (keeps 2,000 cases well under an hour on 2 cores).
MAX_ROWS = 5000

#: Points per dimension of the accurate product-rule evaluation, by dimension of the
#: school effects; not done beyond dimension 3 (too costly) or above ACCURATE_MAX_WORK.
ACCURATE_NAGQ = {1: 60, 2: 30, 3: 12}

#: The accurate evaluation at the fit counts only where the product rule with 1.5 times the
#: points agrees with it to this (log-likelihood units; :func:`accurate_at_fit`).
ACCURATE_AGREE = 0.1

#: Largest rows x nodes of the accurate evaluation (beyond it, skipped as not cheap).
ACCURATE_MAX_WORK = 2e7

#: Case families (the issue's reproduced failures) and how often each is drawn.
FAMILIES = {"scaling": 0.3, "tiny": 0.25, "boundary": 0.25, "slopes": 0.2}

#: Outcome classes, in the order :func:`classify` tests them.
CLASSES = ("error_uncaught", "error_documented", "over_time_cap", "bad_llf", "not_converged", "below_max", "ok")

#: Columns of the results CSV.
COLUMNS = (
    "index",
    "case_seed",
    "family",
    "cls",
    "formula",
    "scale_formula",
    "re_formula",
    "random_scale",
    "scale_re_formula",
    "n_rows",
    "n_schools",
    "min_size",
    "max_size",
    "covariate",
    "x_loc",
    "x_scale",
    "true_var_u0",
    "true_var_v",
    "true_corr_u0v",
    "true_var_u1",
    "heavy_tails",
    "llf",
    "converged",
    "singular",
    "n_iter",
    "message",
    "fit_seconds",
    "fit_cpu_seconds",
    "n_finite_se",
    "n_params",
    "warnings",
    "error",
    "reference",
    "reference_route",
    "gap",
    "routes",
    "llf_accurate_fit",
    "llf_accurate_ref",
    "gap_accurate",
    "case_seconds",
)


# ---------------------------------------------------------------- the generator
@dataclass
class Case:
    """One fuzz case: raw data, its standardized twin, the specification and the truth."""

    case_seed: int
    family: str
    data: pd.DataFrame
    std_data: pd.DataFrame
    spec: dict[str, Any]
    truth: dict[str, Any] = field(default_factory=dict)


def draw_sizes(rng: np.random.Generator, family: str, max_rows: int = MAX_ROWS) -> np.ndarray:
    """School sizes of one case.

    ``tiny``: 20 to 300 schools of 1 to 3 pupils (30% of the time 1 to 8; 2 to 8
    when the case has slopes), plus in 30% of cases 1 to 3 big schools of 100 to
    5,000 (log-uniform). ``boundary``: 3 to 15 schools of 5 to 60. ``scaling`` and
    ``slopes``: 8 to 60 schools of 2 to 30, plus in 10% of cases 1 to 3 big schools
    of 100 to 5,000. The biggest school is then cut so that the total is at most
    ``max_rows``.
    """
    if family == "tiny":
        J = int(rng.integers(20, 301))
        hi = 9 if rng.random() < 0.3 else 4
        sizes = rng.integers(1, hi, J)
        if rng.random() < 0.3:
            sizes = np.concatenate([sizes, np.exp(rng.uniform(np.log(100), np.log(5000), int(rng.integers(1, 4)))).astype(int)])
    elif family == "boundary":
        sizes = rng.integers(5, 61, int(rng.integers(3, 16)))
    else:
        J = int(rng.integers(8, 61))
        sizes = rng.integers(2, 31, J)
        if rng.random() < 0.1:
            sizes = np.concatenate([sizes, np.exp(rng.uniform(np.log(100), np.log(5000), int(rng.integers(1, 4)))).astype(int)])
    return cap_sizes(np.maximum(sizes, 1), max_rows)


def cap_sizes(sizes: np.ndarray, max_rows: int) -> np.ndarray:
    """``sizes`` with at most ``max_rows`` in total: the biggest schools are cut first.

    With more than ``max_rows // 2`` schools (small ``max_rows``, as in the CI subset)
    only the first ``max_rows // 2`` are kept, so the cut always ends.
    """
    sizes = np.array(sizes, dtype=int)
    if sizes.size > max(1, max_rows // 2):
        sizes = sizes[: max(1, max_rows // 2)]
    while sizes.sum() > max_rows:
        i = int(np.argmax(sizes))
        sizes[i] = max(1, sizes[i] - (sizes.sum() - max_rows))
    return sizes


def _variance(rng: np.random.Generator, p_zero: float, p_near: float, lo: float, hi: float) -> float:
    r = rng.random()
    if r < p_zero:
        return 0.0
    if r < p_zero + p_near:
        return float(10 ** rng.uniform(-5, -2))
    return float(rng.uniform(lo, hi))


def _covariate(rng: np.random.Generator, x_std: np.ndarray, family: str) -> tuple[np.ndarray, str, float, float]:
    """The raw covariate: ``x_std`` moved to a user's units.

    Returns the raw values, the kind, and the location and scale (raw = loc + scale * x_std,
    approximately for the rounded kinds).
    """
    if family != "scaling" and rng.random() > 0.1:
        return x_std.copy(), "standard", 0.0, 1.0
    kind = str(rng.choice(["shift", "scale", "shift_scale", "year", "timestamp", "currency"]))
    if kind == "shift":
        loc, scale = float(rng.choice([-1, 1]) * 10 ** rng.uniform(0, 10)), 1.0
    elif kind == "scale":
        loc, scale = 0.0, float(10 ** rng.uniform(-8, 10))
    elif kind == "shift_scale":
        scale = float(10 ** rng.uniform(-8, 10))
        loc = float(rng.choice([-1, 1]) * scale * 10 ** rng.uniform(0, 6))
    elif kind == "year":
        loc, scale = float(rng.integers(1950, 2021)), float(rng.uniform(2, 10))
        return np.round(loc + scale * x_std), kind, loc, scale  # integers: ties are fine
    elif kind == "timestamp":
        loc, scale = float(rng.uniform(1.0e9, 1.8e9)), float(10 ** rng.uniform(3, 8))
        return np.round(loc + scale * x_std), kind, loc, scale  # whole seconds
    else:  # currency: a lognormal amount in cents
        loc = float(10 ** rng.uniform(2, 6))
        raw = np.round(loc * np.exp(0.5 * x_std), 2)
        return raw, kind, loc, float(raw.std())
    return loc + scale * x_std, kind, loc, scale


def _corr_matrix(rng: np.random.Generator, d: int, boundary: bool) -> np.ndarray:
    """A random correlation matrix of size ``d`` with ``|corr|`` up to 0.99 (often near it)."""
    for _ in range(100):
        R = np.eye(d)
        for i in range(d):
            for j in range(i + 1, d):
                if rng.random() < (0.5 if boundary else 0.3):
                    c = rng.uniform(0.9, 0.99) * rng.choice([-1, 1])
                else:
                    c = rng.uniform(-0.9, 0.9)
                R[i, j] = R[j, i] = c
        if np.linalg.eigvalsh(R).min() > 1e-6:
            return R
    return np.eye(d)


def random_case(case_seed: int, max_rows: int = MAX_ROWS, allow_scale_re: bool = True) -> Case:
    """Draw one case (data, standardized twin, specification, truth) from ``case_seed``.

    Parameters
    ----------
    case_seed : int
        Seed of this case alone; the same seed gives the same case.
    max_rows : int, optional
        Most rows (:data:`MAX_ROWS`); the CI subset uses fewer.
    allow_scale_re : bool, optional
        Whether ``scale_re_formula`` may be drawn (slow: issue 12's performance cliff).

    Returns
    -------
    Case
    """
    rng = np.random.default_rng(case_seed)
    families = list(FAMILIES)
    family = str(rng.choice(families, p=np.array(list(FAMILIES.values())) / sum(FAMILIES.values())))
    slopes = family == "slopes" or rng.random() < 0.1
    sizes = draw_sizes(rng, family, max_rows)
    if slopes and family == "tiny":
        sizes = cap_sizes(np.where(sizes < 9, rng.integers(2, 9, sizes.size), sizes), max_rows)
    J = sizes.size
    N = int(sizes.sum())
    g = np.repeat(np.arange(J), sizes)

    # covariate: between-school share r of its variance, standardized exactly
    r = rng.uniform(0, 0.8)
    x = np.sqrt(r) * rng.normal(size=J)[g] + np.sqrt(1 - r) * rng.normal(size=N)
    if N > 1 and x.std() > 0:
        x = (x - x.mean()) / x.std()
    x_raw, kind, loc, scale = _covariate(rng, x, family)

    # truth, on the standardized covariate
    boundary = family == "boundary"
    var_u0 = _variance(rng, 0.5 if boundary else 0.1, 0.25 if boundary else 0.1, 0.05, 1.0)
    if rng.random() < 0.05:  # ICC near 1
        var_u0 = float(rng.uniform(5, 50))
    random_scale = bool(rng.random() < 0.9)
    var_v = _variance(rng, 0.4 if boundary else 0.1, 0.25 if boundary else 0.1, 0.05, 1.0) if random_scale else 0.0
    var_u1 = _variance(rng, 0.3, 0.2, 0.02, 0.5) if slopes else 0.0
    names = ["u0"] + (["u1"] if slopes else []) + ["v"]
    R = _corr_matrix(rng, len(names), boundary)
    sd = np.sqrt([var_u0] + ([var_u1] if slopes else []) + [var_v])
    Sigma = R * np.outer(sd, sd)
    b = rng.multivariate_normal(np.zeros(len(names)), Sigma, size=J, method="eigh")
    u0, v = b[:, 0], b[:, -1]
    u1 = b[:, 1] if slopes else np.zeros(J)
    beta = rng.normal(0, [1.0, 0.5])
    scale_x = rng.random() < 0.7
    alpha = np.array([rng.uniform(-2, 1), rng.normal(0, 0.3) if scale_x else 0.0])
    if var_u0 > 4:
        alpha[0] -= 2
    heavy = bool(rng.random() < 0.08)
    e = rng.standard_t(3, N) / np.sqrt(3) if heavy else rng.normal(size=N)
    y_unit = float(10 ** rng.uniform(-3, 3)) if rng.random() < 0.1 else 1.0
    y = y_unit * (beta[0] + beta[1] * x + u0[g] + u1[g] * x + np.exp((alpha[0] + alpha[1] * x + v[g]) / 2) * e)

    data = pd.DataFrame({"school": g, "y": y, "x": x_raw})
    spec: dict[str, Any] = dict(
        formula="y ~ x",
        groups="school",
        scale_formula="~ x" if (scale_x or rng.random() < 0.3) else "~ 1",
        re_formula="~ x" if slopes else "~ 1",
        random_scale=random_scale,
    )
    if allow_scale_re and random_scale and not slopes and N <= 300 and rng.random() < 0.1:
        spec["scale_re_formula"] = "~ x"
    truth = dict(
        covariate=kind,
        x_loc=loc,
        x_scale=scale,
        true_var_u0=var_u0,
        true_var_v=var_v,
        true_corr_u0v=float(R[0, -1]),
        true_var_u1=var_u1,
        heavy_tails=heavy,
    )
    return Case(case_seed, family, data, standardize(data, ["x"]), spec, truth)


def standardize(data: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """A copy of ``data`` with each of ``columns`` centred and scaled: ``(x - mean) / sd``.

    The change of parametrisation route 1 rests on: every design column of the model
    on the copy is a linear combination of the original design's columns (the
    formulas keep the intercept and all main effects), so the maximum log-likelihood
    is the same.
    """
    out = data.copy()
    for c in columns:
        col = out[c].to_numpy(dtype=float)
        m = float(np.mean(col))
        s = float(np.std(col - m))
        out[c] = (col - m) / (s if s > 0 else 1.0)
    return out


# ---------------------------------------------------------------- the reference
@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeoutError` in the body after ``seconds`` of this process's CPU time (POSIX).

    CPU time (``ITIMER_PROF``: user + system time of the process), not wall time, so
    that a case's class does not depend on how busy the shared machine is: run with
    ``OPENBLAS_NUM_THREADS=1``, CPU time is the wall time the fit would take on an idle
    core. The error arrives at the next Python bytecode, so a long compiled call
    overruns by its own length.
    """

    def _raise(signum, frame):
        raise TimeoutError(f"over the time cap of {seconds:g} CPU s")

    if not hasattr(signal, "setitimer"):
        yield
        return
    old = signal.signal(signal.SIGPROF, _raise)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


@dataclass
class ParamMap:
    """Linear maps between the parameters of a model on raw and on standardized data.

    ``X_raw = X_std A``, ``W_raw = W_std Aw``, ``Z_raw = Z_std B`` and (with
    ``scale_re_formula``) ``G_raw = G_std C``; then ``beta_std = A beta_raw``,
    ``alpha_std = Aw alpha_raw`` and ``Sigma_std = T Sigma_raw T'`` with
    ``T = blockdiag(B, C)``.
    """

    A: np.ndarray
    Aw: np.ndarray
    T: np.ndarray

    def to_raw(self, beta: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw-data parameters from standardized-data parameters."""
        Ti = np.linalg.inv(self.T)
        return np.linalg.solve(self.A, beta), np.linalg.solve(self.Aw, alpha), Ti @ sigma @ Ti.T

    def to_std(self, beta: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Standardized-data parameters from raw-data parameters."""
        return self.A @ beta, self.Aw @ alpha, self.T @ sigma @ self.T.T


def _block(std: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """``M`` with ``raw = std M`` (exact up to rounding when the spans agree)."""
    M, *_ = np.linalg.lstsq(std, raw, rcond=None)
    return M


def param_maps(model_raw, model_std) -> ParamMap:
    """The :class:`ParamMap` between two models of the same specification on raw and standardized data."""
    dr, ds = model_raw.design, model_std.design
    lay = dr.layout
    A = _block(ds.X, dr.X)
    Aw = _block(ds.W, dr.W)
    blocks = [_block(ds.Z, dr.Z)] if lay.q else []
    if lay.n_v:
        blocks.append(_block(ds.G, dr.G) if dr.G is not None else np.eye(lay.n_v))
    d = lay.d
    T = np.zeros((d, d))
    i = 0
    for blk in blocks:
        n = blk.shape[0]
        T[i : i + n, i : i + n] = blk
        i += n
    return ParamMap(A, Aw, T)


def _parts(model, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lay = model.layout
    params = np.asarray(params, dtype=float)
    return params[: lay.p], params[lay.p : lay.p + lay.k], lay.sigma_from_natural(params)


def _natural(model, beta: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    lay = model.layout
    d = lay.d
    iu = np.triu_indices(d, 1)
    return np.concatenate([beta, alpha, np.diag(sigma), sigma[iu]])


def evaluate(model, params: np.ndarray, nagq: int | None = None, quadrature: str = "auto") -> float:
    """Log-likelihood of ``model`` at natural ``params`` (NaN when it cannot be evaluated).

    Goes through the optimiser-scale vector directly (not :meth:`MELSM.loglike`), so
    that estimates on the boundary (a singular ``Sigma``) are evaluated with the
    smallest diagonal jitter that makes ``Sigma`` positive definite.
    """
    lay = model.layout
    params = np.asarray(params, dtype=float)
    if not np.all(np.isfinite(params)):
        return float("nan")
    beta, alpha, sigma = _parts(model, params)
    sigma = (sigma + sigma.T) / 2
    for jitter in (0.0, 1e-14, 1e-12, 1e-10):
        try:
            theta = lay.theta_from_parts(beta, alpha, sigma + jitter * np.diag(np.maximum(np.diag(sigma), 1e-300)))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        return float("nan")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return float(model.objective(nagq=nagq, quadrature=quadrature).value(theta))
    except Exception:  # noqa: BLE001 - an evaluation that fails is recorded as NaN
        return float("nan")


def accurate_route_values(model_std, routes: list[dict[str, Any]], nagq: int, tol: float = BELOW_MAX_TOL) -> list[float]:
    """The routes' values under the rule with ``nagq`` points, where about twice the points agree.

    Each route's estimates (``params_std``, on the standardized data) are evaluated with
    ``nagq`` and ``2 nagq + 1`` points; a value that moves by more than ``tol`` is the rule's
    error, not a maximum, and is left out (a reference for a criterion of ``tol`` must itself
    be accurate to ``tol``). Stored case 8770553538507621726 at 31 points: the trust-exact
    route ended at ``corr(u0,v) = 0.9993``, ``var(u1) = 5e-21``, valued -128.53, 1.06 above the
    fit; 63 and 127 points gave -128.88 and -129.22 there, and the product rule -144.8.
    """
    out = []
    for r in routes:
        p_std = r.get("params_std")
        if p_std is None:
            continue
        val = evaluate(model_std, p_std, nagq=nagq)
        if np.isfinite(val) and abs(evaluate(model_std, p_std, nagq=2 * nagq + 1) - val) <= tol:
            out.append(val)
    return out


def _boundary_start(model_std, params: np.ndarray) -> np.ndarray | None:
    """``params`` moved to the other face of the boundary: ``var(u0)`` small, ``|corr(u0,v)|`` = 0.95."""
    lay = model_std.layout
    if not (lay.q and lay.n_v):
        return None
    beta, alpha, sigma = _parts(model_std, params)
    sigma = sigma.copy()
    sd = np.sqrt(np.maximum(np.diag(sigma), 1e-8))
    sd_u0 = max(0.1 * sd[0], 1e-3)
    sd_v = max(sd[-1], 0.1)
    c = np.sign(sigma[0, -1]) or 1.0
    sigma[0, :] = sigma[:, 0] = 0.0
    sigma[-1, :] = sigma[:, -1] = 0.0
    sigma[0, 0] = sd_u0**2
    sigma[-1, -1] = sd_v**2
    sigma[0, -1] = sigma[-1, 0] = 0.95 * c * sd_u0 * sd_v
    if np.linalg.eigvalsh(sigma).min() <= 0:
        return None
    return _natural(model_std, beta, alpha, sigma)


def reference_routes(
    case: Case, model_raw, fit_params: np.ndarray | None, quick: bool = False, model_std=None, nagq: int | None = None
) -> list[dict[str, Any]]:
    """Fit the case by the independent routes; each route's estimates mapped to the raw data.

    Parameters
    ----------
    case : Case
    model_raw : mlsml.MELSM
        The user's model (raw data).
    fit_params : ndarray or None
        The fit's estimates (a start for the polishing route), if it gave any.
    quick : bool, optional
        Only the standardized BFGS fit and the trust-exact polish (the CI subset).
    model_std : mlsml.MELSM, optional
        The same model on the standardized data (built here when not given).
    nagq : int, optional
        The rule every route maximises: the fit's, where it raised the default one
        (:func:`mlsml.optimize.raise_rule`); the default rule otherwise.

    Returns
    -------
    list of dict
        One per route: ``route``, ``llf_route`` (its own llf, standardized data),
        ``params_raw``, ``seconds``, ``error``.
    """
    import mlsml

    if model_std is None:
        model_std = mlsml.MELSM.from_formula(data=case.std_data, **dict(case.spec))
    pm = param_maps(model_raw, model_std)
    out: list[dict[str, Any]] = []

    def run(name: str, **kw) -> None:
        t0 = time.perf_counter()
        row: dict[str, Any] = dict(route=name, llf_route=float("nan"), params_raw=None, error="")
        try:
            with time_cap(ROUTE_SECONDS), warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                res = model_std.fit(nagq=nagq, **kw)
            p = res.params.to_numpy(dtype=float)
            row["llf_route"] = float(res.llf)
            row["converged"] = bool(res.converged)
            row["params_raw"] = _natural(model_raw, *pm.to_raw(*_parts(model_std, p)))
            row["params_std"] = p
        except Exception as exc:  # noqa: BLE001 - a failed route is recorded, others still count
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        row["seconds"] = time.perf_counter() - t0
        out.append(row)

    run("std_bfgs")
    if fit_params is not None and np.all(np.isfinite(fit_params)):
        start = _natural(model_std, *pm.to_std(*_parts(model_raw, fit_params)))
        if np.all(np.isfinite(start)):
            run("std_trust_from_fit", method="trust-exact", start_params=start)
    if quick:
        return out
    if case.family != "boundary":  # the other starts target the boundary (issue 12, failure 3)
        return out
    if len(case.data) <= TRUST_DEFAULT_MAX_ROWS:
        run("std_trust_default", method="trust-exact")
    best = max((r for r in out if r.get("params_std") is not None), key=lambda r: r["llf_route"], default=None)
    if best is not None:
        start = _boundary_start(model_std, best["params_std"])
        if start is not None:
            run("std_trust_boundary", method="trust-exact", start_params=start)
    return out


def accurate_nagq(model) -> int | None:
    """Points per dimension of the accurate product rule for ``model``, or None when not cheap."""
    d = model.layout.d
    nagq = ACCURATE_NAGQ.get(d)
    if nagq is None or model.layout.extended:
        return None
    if len(model.design.y) * nagq**d > ACCURATE_MAX_WORK:
        return None
    return nagq


def _optimiser_scale(res):
    """``(likelihood, theta, shift)`` on the standardised design the fit was made on
    (:func:`mlsml.rescale.reparametrise`): ``llf = llf_s - shift`` exactly."""
    from mlsml.rescale import reparametrise

    lik, theta, shift = res.likelihood, np.asarray(res.optsum.theta, dtype=float), 0.0
    if res.optsum.theta_std is not None:
        rp = reparametrise(lik.design)
        if not rp.identity:
            lik, theta, shift = lik.with_design(rp.design), np.asarray(res.optsum.theta_std, dtype=float), rp.log_shift
    return lik, theta, shift


def accurate_at_fit(res, nagq: int) -> float:
    """The product rule with ``nagq`` points per dimension at the fit's own estimates (NaN if it cannot be trusted).

    Evaluated on the standardised copy of the design the fit was made on
    (:func:`mlsml.rescale.reparametrise`), at the optimiser's own ``theta_std``, and mapped
    back exactly (``llf = llf_s - log_shift``): no round trip through the natural
    parameters, which on a covariate shifted by ``1e9`` lose the estimates' digits (a
    random-slope fit with ``var(u0) = 8.6e15`` in raw units evaluated 31 units too low
    through the round trip, and was counted an impossible llf).

    The value counts only if the rule with half as many points again agrees with it to
    :data:`ACCURATE_AGREE`: near ``|corr(u0, v)| = 1`` with a school of 2,051 pupils the
    product rule with 20, 30, 45 and 60 points gave -3621.5, -3614.3, -3602.9 and -3607.6,
    and such an "accurate" value cannot make a printed llf impossible.
    """
    lik, theta, shift = _optimiser_scale(res)
    values = []
    for n in (nagq, (3 * nagq) // 2):
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                values.append(float(lik.with_spec(kind="product", nagq=n).value(theta)) - shift)
        except Exception:  # noqa: BLE001 - an evaluation that fails is recorded as NaN
            return float("nan")
    return values[0] if abs(values[1] - values[0]) <= ACCURATE_AGREE else float("nan")


#: Points of the uniform grid in ``v`` of :func:`brute_force_at_fit`, and how many are
#: evaluated at once (memory: schools x chunk of each intermediate array).
BRUTE_FORCE_POINTS = 40001
BRUTE_FORCE_CHUNK = 1000


def brute_force_at_fit(res) -> float:
    r"""The log-likelihood at the fit's estimates by brute force: the mean effects exactly, ``v`` on a grid.

    .. math::

        \log L = \sum_j W_j \log \int e^{g_j(v)}\,dv, \qquad
        v \in [-40 - 10\sigma_v,\; 15 + 10\sigma_v]

    by the trapezoid rule on :data:`BRUTE_FORCE_POINTS` points, with ``g_j`` the u-exact
    integrand (:meth:`mlsml.integrand.Integrand.log_h_uexact`, exact against the 60-digit
    covariance form in tests/test_integrand.py). No node is placed, so no school's mode can be
    missed: in fuzz case 8505688769798965838 (154 schools of 1 to 3) one school of two pupils
    whose residuals nearly coincide has a second mode of ``g`` that the product rules of
    :func:`accurate_at_fit` (30 and 45 points, adapted at the joint mode) missed; they gave
    -411.97 where this gives -395.198 and the fit's own 63-point rule -395.211.
    NaN where it does not apply (no random scale, no mean effect, several scale effects, the
    quadratic association, a design held by workers).
    """
    from mlsml.integrand import Integrand
    from mlsml.ops import logsumexp

    lay = res.likelihood.layout
    one_scale_effect = lay.random_scale and lay.n_v == 1 and not lay.quad_assoc
    if not (isinstance(res.likelihood.integrand, Integrand) and one_scale_effect and lay.q >= 1):
        return float("nan")
    lik, theta, shift = _optimiser_scale(res)
    S = lay.sigma_from_natural(np.asarray(lay.to_natural(theta), dtype=float))
    sd = float(np.sqrt(max(S[lay.q, lay.q], 0.0)))
    grid = np.linspace(-40.0 - 10.0 * sd, 15.0 + 10.0 * sd, BRUTE_FORCE_POINTS)
    logw = np.full(grid.size, np.log(grid[1] - grid[0]))
    logw[[0, -1]] -= np.log(2.0)
    J = lik.design.ngroups
    acc = np.full(J, -np.inf)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for i in range(0, grid.size, BRUTE_FORCE_CHUNK):
                g = grid[i : i + BRUTE_FORCE_CHUNK]
                v = np.broadcast_to(g[None, :, None], (J, g.size, 1)).copy()
                h = np.asarray(lik.integrand.log_h_uexact(theta, v), dtype=float) + logw[i : i + g.size][None, :]
                acc = np.logaddexp(acc, logsumexp(h, axis=1))
    except Exception:  # noqa: BLE001 - an evaluation that fails is recorded as NaN
        return float("nan")
    weights = lik.design.group_weights
    total = float(np.sum(acc if weights is None else weights * acc))
    return total - shift if np.isfinite(total) else float("nan")


def accurate_or_brute(res, nagq: int) -> float:
    """:func:`accurate_at_fit`, or :func:`brute_force_at_fit` where that would make the fit's llf
    impossible (more than :data:`IMPOSSIBLE_GAP` below it) and the brute force applies."""
    accurate = accurate_at_fit(res, nagq)
    if float(res.llf) - accurate > IMPOSSIBLE_GAP:  # confirm without placing nodes
        brute = brute_force_at_fit(res)
        return brute if np.isfinite(brute) else accurate
    return accurate


# ---------------------------------------------------------------- one case
def classify(row: dict[str, Any]) -> str:
    """The outcome class of a finished case (see the module docstring)."""
    err = row.get("error") or ""
    if err.startswith("uncaught:"):
        return "error_uncaught"
    if err.startswith("documented:"):
        return "error_documented"
    if err.startswith("timeout"):
        return "over_time_cap"
    llf = row["llf"]
    if not np.isfinite(llf) or not row.get("params_finite", True):
        return "bad_llf"
    acc = row.get("llf_accurate_fit", float("nan"))
    if np.isfinite(acc) and llf - acc > IMPOSSIBLE_GAP:
        return "bad_llf"
    if not row["converged"]:
        return "not_converged"
    if np.isfinite(row.get("gap", float("nan"))) and row["gap"] > BELOW_MAX_TOL:
        return "below_max"
    return "ok"


def run_case(
    case_seed: int,
    index: int = 0,
    quick: bool = False,
    max_rows: int = MAX_ROWS,
    case_seconds: float = CASE_SECONDS,
    allow_scale_re: bool | None = None,
    stored: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """Generate, fit, find the reference and classify one case; a flat row of :data:`COLUMNS`.

    ``allow_scale_re`` (default: not ``quick``) lets the generator draw ``scale_re_formula``.
    ``stored``: the reference (value and route) of an earlier run of the case (``--recheck``):
    the fit is compared with it instead of computing the routes again (most of a case's time).
    """
    import mlsml

    t_case = time.perf_counter()
    case = random_case(case_seed, max_rows=max_rows, allow_scale_re=(not quick) if allow_scale_re is None else allow_scale_re)
    sizes = case.data.groupby("school").size()
    row: dict[str, Any] = dict(
        index=index,
        case_seed=case_seed,
        family=case.family,
        formula=case.spec["formula"],
        scale_formula=case.spec["scale_formula"],
        re_formula=case.spec["re_formula"],
        random_scale=case.spec["random_scale"],
        scale_re_formula=case.spec.get("scale_re_formula", ""),
        n_rows=len(case.data),
        n_schools=len(sizes),
        min_size=int(sizes.min()),
        max_size=int(sizes.max()),
        **case.truth,
    )
    row.update(
        llf=float("nan"),
        converged=False,
        singular=False,
        n_iter=-1,
        message="",
        error="",
        warnings="",
        n_finite_se=0,
        n_params=0,
        reference=float("nan"),
        reference_route="",
        gap=float("nan"),
        routes="",
        llf_accurate_fit=float("nan"),
        llf_accurate_ref=float("nan"),
        gap_accurate=float("nan"),
    )
    res = None
    model = None
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            with time_cap(case_seconds):
                model = mlsml.MELSM.from_formula(data=case.data, **case.spec)
                res = model.fit()
        except TimeoutError as exc:
            row["error"] = f"timeout: {exc}"
        except mlsml.MLSMLError as exc:
            row["error"] = f"documented: {type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - the point is to record it
            tb = traceback.format_exception(exc)[-3:]
            row["error"] = f"uncaught: {type(exc).__name__}: {exc} | {''.join(tb)}"[:600]
    row["fit_seconds"] = time.perf_counter() - t0
    row["fit_cpu_seconds"] = time.process_time() - c0
    cats = Counter(type(w.message).__name__ for w in rec)
    row["warnings"] = "; ".join(f"{k} x{v}" for k, v in sorted(cats.items()))
    fit_params = None
    if res is not None:
        fit_params = res.params.to_numpy(dtype=float)
        row.update(
            llf=float(res.llf),
            converged=bool(res.converged),
            singular=bool(res.singular),
            n_iter=int(res.n_iter),
            message=str(res.message)[:200],
            n_finite_se=int(np.isfinite(res.bse.to_numpy(dtype=float)).sum()),
            n_params=len(fit_params),
            params_finite=bool(np.all(np.isfinite(fit_params))),
        )
    if stored is not None and not row["error"]:
        ref, route = stored
        row.update(reference=float(ref), reference_route=f"{route} (stored)")
        if np.isfinite(row["llf"]) and np.isfinite(ref):
            row["gap"] = float(ref) - row["llf"]
        nagq = accurate_nagq(model)
        if nagq is not None and not quick and res is not None and np.all(np.isfinite(res.optsum.theta)):
            row["llf_accurate_fit"] = accurate_or_brute(res, nagq)
    elif model is not None and not row["error"]:
        # every evaluation is made on the standardized data (the same log-likelihood, exactly:
        # a linear change of parametrisation): on the raw data a covariate such as a Unix
        # timestamp costs the evaluation itself up to millions of units in rounding, which
        # made the first baseline's references (e.g. +2.3e6) impossible
        model_std = mlsml.MELSM.from_formula(data=case.std_data, **dict(case.spec))
        # the fit's own rule: the defaults (nagq=None, quadrature="auto"), or the rule the fit
        # raised them to where they were not accurate (optimize.raise_rule): the maxima of two
        # different rules differ by the rules' error, not by the fit's
        fit_nagq = res.nagq if res is not None and res.optsum.rule_raised else None
        routes = reference_routes(case, model, fit_params, quick=quick, model_std=model_std, nagq=fit_nagq)
        check = accurate_nagq(model) is not None
        best_val, best_route, best_params = -np.inf, "", None
        parts = []
        for r in routes:
            p_std = r.get("params_std")
            val = evaluate(model_std, p_std, nagq=fit_nagq) if p_std is not None else float("nan")
            real = np.isfinite(val)
            if real and check:  # not where the quadrature overflowed (the value must survive more points)
                real = abs(evaluate(model_std, p_std, nagq=ROUTE_CHECK_NAGQ) - val) <= IMPOSSIBLE_GAP
            parts.append(
                f"{r['route']}={r['llf_route']:.6f}/{val:.6f}/{r['seconds']:.1f}s"
                + ("" if real or not np.isfinite(val) else "[rule inaccurate]")
                + (f"[{r['error'][:60]}]" if r["error"] else "")
            )
            if real and val > best_val:
                best_val, best_route, best_params = val, r["route"], p_std
        row["routes"] = " ".join(parts)
        if best_params is not None:
            row.update(reference=best_val, reference_route=best_route)
            if np.isfinite(row["llf"]):
                row["gap"] = best_val - row["llf"]
        nagq = accurate_nagq(model)
        if nagq is not None and not quick:
            if res is not None and np.all(np.isfinite(res.optsum.theta)):
                row["llf_accurate_fit"] = accurate_or_brute(res, nagq)
            if best_params is not None:
                row["llf_accurate_ref"] = evaluate(model_std, best_params, nagq=nagq, quadrature="product")
            row["gap_accurate"] = row["llf_accurate_ref"] - row["llf_accurate_fit"]
    row["cls"] = classify(row)
    row["case_seconds"] = time.perf_counter() - t_case
    row.pop("params_finite", None)
    return row


def _worker(args: tuple) -> dict[str, Any]:
    index, case_seed, quick, max_rows, case_seconds, *rest = args
    allow_scale_re, stored = (list(rest) + [None, None])[:2]
    try:
        return run_case(
            case_seed,
            index,
            quick=quick,
            max_rows=max_rows,
            case_seconds=case_seconds,
            allow_scale_re=allow_scale_re,
            stored=stored,
        )
    except Exception as exc:  # noqa: BLE001 - the instrument itself failed on this case: keep going
        return dict(index=index, case_seed=case_seed, cls="instrument_error", error=f"{type(exc).__name__}: {exc}"[:300])


def case_seeds(n: int, seed: int) -> list[int]:
    """The case seeds of a run: ``n`` draws from ``seed`` (a case is reproduced by its seed alone)."""
    return [int(s) for s in np.random.default_rng(seed).integers(2**63 - 1, size=n)]


def run(
    n: int,
    seed: int,
    jobs: int = 1,
    out: Path | None = None,
    quick: bool = False,
    max_rows: int = MAX_ROWS,
    case_seconds: float = CASE_SECONDS,
    first: int = 0,
    indices: list[int] | None = None,
    stored: dict[int, tuple[float, str]] | None = None,
) -> pd.DataFrame:
    """Run cases ``first`` to ``n - 1`` of the sequence (in ``jobs`` processes), writing each row to ``out``.

    A run can be split in pieces (``first``) and the CSVs concatenated: case ``i`` is the
    same data and specification whatever piece it is run in. ``indices`` runs only those
    cases of the sequence, in that order (a piece, or earlier cases re-run on newer code).
    ``stored`` maps a case's index to the reference of an earlier run (:func:`run_case`,
    ``--recheck``): those cases are fitted and compared with it, without the routes.

    Returns
    -------
    pandas.DataFrame
        One row per case, sorted by index, columns :data:`COLUMNS`.
    """
    seeds = case_seeds(n, seed)
    order = [i for i in range(n) if i >= first] if indices is None else list(indices)
    stored = stored or {}
    tasks = [(i, seeds[i], quick, max_rows, case_seconds, None, stored.get(i)) for i in order]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open(out, "w", newline=""))
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
        if jobs > 1:
            ctx = mp.get_context("fork") if sys.platform != "win32" else mp.get_context()
            pool = stack.enter_context(ctx.Pool(jobs, maxtasksperchild=50))
            results = pool.imap_unordered(_worker, tasks)
        else:
            results = map(_worker, tasks)
        for row in results:
            rows.append(row)
            if writer is not None:
                writer.writerow(row)
                fh.flush()
            _progress(rows, len(tasks), t0)
    df = pd.DataFrame(rows).sort_values("index").reset_index(drop=True)
    if out is not None:  # rewrite in index order
        df.reindex(columns=list(COLUMNS)).to_csv(out, index=False)
    return df


def _progress(rows: list[dict[str, Any]], n: int, t0: float) -> None:
    k = len(rows)
    if k % 25 == 0 or k == n:
        c = Counter(r.get("cls", "?") for r in rows)
        print(
            f"[{time.perf_counter() - t0:7.1f}s] {k}/{n} " + " ".join(f"{a}={b}" for a, b in sorted(c.items())),
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------- the CI store
#: Files of a store of cases (:func:`write_store`): the data of every case, and one row per
#: case with its specification and independent maximum.
STORE_DATA = "cases.csv.gz"
STORE_INDEX = "reference.csv"

#: The columns of :data:`STORE_INDEX`: a case's identity and specification (those of
#: :data:`COLUMNS` from ``formula`` to ``covariate``), its independent maximum and the
#: fit's outcome when the case was stored.
STORE_COLUMNS = (
    "case",
    "case_seed",
    "max_rows",
    "family",
    *COLUMNS[COLUMNS.index("formula") : COLUMNS.index("covariate") + 1],
    "reference",
    "reference_route",
    "llf",
    "cls",
    "routes",
)


def write_store(
    directory: Path, cases: list[tuple[int, int, bool]], jobs: int = 1, case_seconds: float = CASE_SECONDS
) -> pd.DataFrame:
    """Run ``cases`` (``(case_seed, max_rows, allow_scale_re)``) with every route and store them.

    The CI criterion (``tests/test_fuzz_maximum.py``) then fits the stored data and
    compares with the stored independent maximum: the expensive routes run once, here,
    and the suite pays only for the fits. Data are stored, not regenerated, so that the
    cases do not depend on the random-number streams of a numpy version. Writes
    :data:`STORE_DATA` (columns ``case, school, y, x``; 17 significant digits) and
    :data:`STORE_INDEX` (:data:`STORE_COLUMNS`) in ``directory``.
    """
    tasks = [(i, seed, False, rows, case_seconds, scale_re) for i, (seed, rows, scale_re) in enumerate(cases)]
    rows_out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            ctx = mp.get_context("fork") if sys.platform != "win32" else mp.get_context()
            results = stack.enter_context(ctx.Pool(jobs, maxtasksperchild=50)).imap_unordered(_worker, tasks)
        else:
            results = map(_worker, tasks)
        for row in results:
            rows_out.append(row)
            _progress(rows_out, len(tasks), t0)
    index = pd.DataFrame(rows_out).sort_values("index").reset_index(drop=True)
    frames = []
    for k, (seed, rows, scale_re) in enumerate(cases):
        case = random_case(seed, max_rows=rows, allow_scale_re=scale_re)
        frames.append(case.data.assign(case=k)[["case", "school", "y", "x"]])
    index["case"] = index["index"]
    index["max_rows"] = [rows for _, rows, _ in cases]
    directory.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(directory / STORE_DATA, index=False, float_format="%.17g")
    index = index.reindex(columns=list(STORE_COLUMNS))
    index.to_csv(directory / STORE_INDEX, index=False, float_format="%.17g")
    return index


def read_store(directory: Path) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """The cases of a store: ``(row of STORE_INDEX, data)``, with ``row["spec"]`` the ``mlsml.fit`` keywords."""
    index = pd.read_csv(directory / STORE_INDEX)
    data = pd.read_csv(directory / STORE_DATA)
    out = []
    for row, (_, d) in zip(index.to_dict("records"), data.groupby("case", sort=True)):
        spec = dict(
            formula=row["formula"],
            groups="school",
            scale_formula=row["scale_formula"],
            re_formula=row["re_formula"],
            random_scale=bool(row["random_scale"]),
        )
        if isinstance(row["scale_re_formula"], str) and row["scale_re_formula"]:
            spec["scale_re_formula"] = row["scale_re_formula"]
        row["spec"] = spec
        out.append((row, d.drop(columns="case").reset_index(drop=True)))
    return out


# ---------------------------------------------------------------- tallies
def tallies(df: pd.DataFrame) -> str:
    """Markdown tallies of a run: by class, by family x class, the worst cases, the sizes and times."""
    classes = [c for c in CLASSES if c in set(df["cls"])] + sorted(set(df["cls"]) - set(CLASSES))
    lines = [f"{len(df)} cases.", "", "| class | cases | share |", "|---|---:|---:|"]
    for c in classes:
        k = int((df["cls"] == c).sum())
        lines.append(f"| {c} | {k} | {k / len(df):.1%} |")
    ct = pd.crosstab(df["family"], df["cls"]).reindex(columns=classes, fill_value=0)
    lines += ["", "| family | " + " | ".join(classes) + " | total |", "|---|" + "---:|" * (len(classes) + 1)]
    for fam, r in ct.iterrows():
        lines.append(f"| {fam} | " + " | ".join(str(int(r[c])) for c in classes) + f" | {int(r.sum())} |")
    below = df[df["cls"] == "below_max"]
    if len(below):
        gaps = below["gap"]
        acc = below["gap_accurate"]
        lines += [
            "",
            f"Of the {len(below)} `below_max` cases: {int(below['singular'].astype(bool).sum())} were flagged singular "
            f"(SEs NaN) but reported converged; by how far below: {int((gaps <= 0.1).sum())} by at most 0.1, "
            f"{int(((gaps > 0.1) & (gaps <= 10)).sum())} by 0.1 to 10, {int((gaps > 10).sum())} by more than 10 "
            f"(largest {gaps.max():.4g}); where the accurate product rule was cheap ({int(acc.notna().sum())} cases) it "
            f"gives a gap within {BELOW_MAX_TOL:g} of this one in {int(((acc - gaps).abs() <= BELOW_MAX_TOL).sum())} "
            f"and below {BELOW_MAX_TOL:g} in {int((acc <= BELOW_MAX_TOL).sum())} (that rule is trusted to "
            f"{ACCURATE_AGREE:g} only, and with three school effects it has 12 points: it cannot decide a gap of "
            f"{BELOW_MAX_TOL:g}; the fit's own rule with more points can).",
        ]
    nc = df[df["cls"] == "not_converged"]
    if len(nc):
        at_max = int((nc["gap"].abs() <= BELOW_MAX_TOL).sum())
        lines += [
            "",
            f"Of the {len(nc)} `not_converged` cases, {at_max} are at the reference maximum (|gap| <= {BELOW_MAX_TOL:g}: "
            f"a conservative flag) and {int((nc['gap'] > BELOW_MAX_TOL).sum())} below it (flagged, so not silent).",
        ]
    ok = df[df["cls"] == "ok"]
    if len(ok):
        nan_se = ok[ok["singular"].astype(bool) & (ok["n_finite_se"] == 0)]
        fams = ", ".join(f"{f} {k}" for f, k in nan_se["family"].value_counts().sort_index().items())
        lines += [
            "",
            f"Of the {len(ok)} `ok` cases (at the maximum), {len(nan_se)} are flagged singular with every SE NaN ({fams}); "
            f"in {int(((nan_se['true_var_u0'] > 0.01) & (nan_se['true_var_v'] > 0.01)).sum())} of them the true var(u0) and "
            "var(v) are both above 0.01 (issue 12, failure 4).",
        ]
    if "covariate" in df:
        ct = pd.crosstab(df["covariate"], df["cls"]).reindex(columns=classes, fill_value=0)
        lines += ["", "| covariate | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for kind, r in ct.iterrows():
            lines.append(f"| {kind} | " + " | ".join(str(int(r[c])) for c in classes) + " |")
    q = [0.1, 0.5, 0.9, 1.0]
    lines += [
        "",
        "| quantile | rows | schools | smallest school | largest school | fit s | case s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for qq in q:
        lines.append(
            f"| {qq:.0%} | {df['n_rows'].quantile(qq):.0f} | {df['n_schools'].quantile(qq):.0f} | {df['min_size'].quantile(qq):.0f} "
            f"| {df['max_size'].quantile(qq):.0f} | {df['fit_seconds'].quantile(qq):.2f} | {df['case_seconds'].quantile(qq):.2f} |"
        )
    lines.append(
        f"\nMean seconds per case: fit {df['fit_seconds'].mean():.2f}, case with routes {df['case_seconds'].mean():.2f} "
        f"(total {df['case_seconds'].sum() / 60:.0f} CPU-ish minutes)."
    )
    lines.append("")
    return "\n".join(lines)


def worst(df: pd.DataFrame, k: int = 10) -> str:
    """Markdown table of the ``k`` converged fits furthest below the reference."""
    sub = df[df["cls"] == "below_max"].sort_values("gap", ascending=False).head(k)
    lines = [
        "| case seed | family | spec | rows / schools (min-max size) | covariate | llf | below reference by | accurate-rule gap |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for _, r in sub.iterrows():
        spec = f"`{r['formula']}`, scale `{r['scale_formula']}`, re `{r['re_formula']}`" + (
            f", scale_re `{r['scale_re_formula']}`" if isinstance(r["scale_re_formula"], str) and r["scale_re_formula"] else ""
        )
        cov = r["covariate"] if r["covariate"] == "standard" else f"{r['covariate']} (loc {r['x_loc']:.3g}, scale {r['x_scale']:.3g})"
        lines.append(
            f"| {r['case_seed']} | {r['family']} | {spec} | {r['n_rows']} / {r['n_schools']} ({r['min_size']}-{r['max_size']}) "
            f"| {cov} | {r['llf']:.4f} | {r['gap']:.4g} | {r['gap_accurate']:.4g} |"
        )
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not in a checkout
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Command line: run cases, summarise a results CSV, or show one case."""
    ap = argparse.ArgumentParser(prog="python -m validation.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--first", type=int, default=0, help="skip the cases before this index (to run a sequence in pieces)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--indices", type=str, default="", help="comma-separated indices of the sequence to run (instead of --first)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--out", type=Path, default=None, help="results CSV (one row per case)")
    ap.add_argument("--quick", action="store_true", help="CI routes only (standardized BFGS + trust-exact polish)")
    ap.add_argument("--max-rows", type=int, default=MAX_ROWS)
    ap.add_argument("--case-seconds", type=float, default=CASE_SECONDS, help="time cap of each fit")
    ap.add_argument("--summary", type=Path, default=None, help="print the Markdown tallies of a results CSV and exit")
    ap.add_argument("--one", type=int, default=None, help="run the case with this case seed and print its row")
    ap.add_argument(
        "--recheck",
        type=Path,
        default=None,
        help="results CSV of an earlier run: fit its cases (--indices, default all) on this code and compare each with "
        "its stored reference, without the routes (a fraction of a case's time)",
    )
    ap.add_argument(
        "--store",
        type=Path,
        default=None,
        help="write a store of cases for the CI criterion (--cases from --seed at --max-rows, without scale_re_formula, "
        "plus the --regression seeds at the full run's settings) in this folder",
    )
    ap.add_argument("--regression", type=str, default="", help="comma-separated case seeds of the full run to add to --store")
    a = ap.parse_args(argv)
    if a.summary is not None:
        df = pd.read_csv(a.summary)
        print(tallies(df))
        print(worst(df))
        return 0
    if a.one is not None:
        row = run_case(a.one, quick=a.quick, max_rows=a.max_rows, case_seconds=a.case_seconds)
        case = random_case(a.one, max_rows=a.max_rows, allow_scale_re=not a.quick)
        print(json.dumps(case.spec), file=sys.stderr)
        for k in COLUMNS:
            print(f"{k:>18}: {row.get(k)}")
        return 0
    if a.store is not None:
        cases = [(s, a.max_rows, False) for s in case_seeds(a.cases, a.seed)]
        cases += [(int(s), MAX_ROWS, True) for s in a.regression.split(",") if s.strip()]
        index = write_store(a.store, cases, jobs=a.jobs, case_seconds=a.case_seconds)
        print(index["cls"].value_counts().to_string())
        return 0
    stored = None
    indices = [int(i) for i in a.indices.split(",") if i.strip()] or None
    if a.recheck is not None:
        old = pd.read_csv(a.recheck).drop_duplicates("index", keep="last")
        old = old[np.isfinite(old["reference"])]
        stored = {int(i): (float(r), str(route)) for i, r, route in zip(old["index"], old["reference"], old["reference_route"])}
        indices = [i for i in (indices or sorted(stored)) if i in stored]
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    df = run(
        a.cases,
        a.seed,
        jobs=a.jobs,
        out=a.out,
        quick=a.quick,
        max_rows=a.max_rows,
        case_seconds=a.case_seconds,
        first=a.first,
        indices=indices,
        stored=stored,
    )
    print(f"started {started}, commit {_git_commit()}, {time.perf_counter() - t0:.0f} s wall, {a.jobs} jobs")
    print(tallies(df))
    if "gap" in df:
        print(worst(df))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
