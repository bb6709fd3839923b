"""Parametric bootstrap of a fitted model.

For users who distrust Wald intervals on variances (whose sampling
distributions are skewed, and bounded at zero), the parametric bootstrap
estimates the sampling distribution of every estimate by simulation:

1. draw ``B`` new response vectors from the fitted model, keeping the
   covariates and the grouping of the data as they are:
   ``y*_ij = x_ij' b + z_ij' u*_j + exp{(w_ij' a + v*_j) / 2} e*_ij`` with
   ``(u*_j, v*_j) ~ N(0, S)`` and ``e*_ij ~ N(0, 1)``, where ``(b, a, S)``
   are the estimates (:func:`mlsml.simulate.draw_responses`);
2. refit the same model to each ``y*`` (same design matrices, only ``y``
   replaced, see :meth:`mlsml.design.Design.with_response`), starting from the
   original estimates, with the same number of quadrature points;
3. summarise the replicate estimates ``t*_1, ..., t*_B`` of each parameter:
   the bootstrap standard error is their standard deviation
   ``sqrt(sum (t*_b - mean t*)^2 / (B - 1))`` and the percentile interval at
   level ``1 - alpha`` is ``[q_{alpha/2}, q_{1 - alpha/2}]``, the empirical
   quantiles of the ``t*_b``.

Only converged replicate fits enter these summaries; the number that
converged is reported (and a warning issued when any did not). The refits run
in parallel over processes (:class:`concurrent.futures.ProcessPoolExecutor`);
the responses are drawn in the calling process from one seeded generator, so
the result does not depend on the number of processes or on the order in
which they finish.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import ConvergenceWarning, ModelSpecError, warn
from .simulate import draw_responses

if TYPE_CHECKING:  # pragma: no cover
    from .design import Design
    from .results import MELSMResults


# ---------------------------------------------------------------- simulation
def simulate_responses(res: MELSMResults, n_reps: int = 1, seed=None) -> pd.DataFrame:
    """Draw new responses from a fitted model, in the caller's row order.

    Parameters
    ----------
    res : MELSMResults
        The fit whose estimates are the parameters of the simulation.
    n_reps : int
        Number of independent response vectors.
    seed : int, numpy.random.Generator or None
        Seed of :func:`numpy.random.default_rng` (or a generator to use).

    Returns
    -------
    pandas.DataFrame
        ``N`` rows indexed like the rows of the data the model was fitted to
        (rows dropped for missing values are absent), one column per
        replicate (``0, ..., n_reps - 1``).

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.bootstrap import simulate_responses
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> sims = simulate_responses(res, n_reps=3, seed=1)
    >>> sims.shape == (len(df), 3)
    True
    >>> bool((sims.index == df.index).all())
    True
    """
    n_reps = _check_count(n_reps, "n_reps")
    design = res.model.design
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sorted_draws = draw_responses(design, np.asarray(res.theta), rng, n_reps)
    out = np.empty_like(sorted_draws)
    out[:, design.order] = sorted_draws
    return pd.DataFrame(out.T, index=design.row_labels.copy(), columns=pd.RangeIndex(n_reps))


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class BootstrapResults:
    """Replicate estimates of a parametric bootstrap and their summaries.

    Build it with :meth:`mlsml.MELSMResults.bootstrap`.

    Attributes
    ----------
    params : pandas.Series
        The original estimates (natural scale).
    wald_bse : pandas.Series
        The original Wald (observed-information) standard errors.
    replicates : pandas.DataFrame
        ``n`` rows (replicate ``0..n-1``) by parameter: the estimates of each
        replicate fit; rows of replicates that failed are NaN.
    llf : ndarray (n,)
        Log-likelihood of each replicate fit (NaN where it failed).
    converged : ndarray (n,) of bool
        Whether each replicate fit converged.
    singular : ndarray (n,) of bool
        Whether each replicate fit is at the boundary (kept in the summaries:
        a boundary estimate is a legitimate estimate).
    errors : dict
        Replicate number -> error message, for fits that raised.
    seed : object
        The seed the responses were drawn with.
    elapsed : float
        Wall-clock seconds.
    n_jobs : int
        Number of worker processes used (1: in the calling process).

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.simulate_data([15] * 30, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> boot = res.bootstrap(30, seed=7, n_jobs=1, progress=False)
    >>> boot.n_reps, boot.n_converged, boot.replicates.shape
    (30, 30, (30, 4))
    >>> list(boot.summary_frame().columns)
    ['estimate', 'wald se', 'boot se', 'bias', '0.025', '0.975']
    >>> bool((boot.conf_int(0.1)["0.05"] < boot.conf_int(0.1)["0.95"]).all())
    True
    """

    params: pd.Series
    wald_bse: pd.Series
    replicates: pd.DataFrame
    llf: np.ndarray
    converged: np.ndarray
    singular: np.ndarray
    errors: dict
    seed: Any
    elapsed: float
    n_jobs: int

    @property
    def n_reps(self) -> int:
        """Number of replicates drawn."""
        return int(self.converged.shape[0])

    @property
    def n_converged(self) -> int:
        """Number of replicate fits that converged (and enter the summaries)."""
        return int(self.converged.sum())

    @property
    def used(self) -> pd.DataFrame:
        """Replicate estimates of the converged fits (the ones summarised)."""
        return self.replicates.loc[self.converged]

    @property
    def bse(self) -> pd.Series:
        """Bootstrap standard errors: the SD (``ddof=1``) of the converged replicate estimates."""
        return self.used.std(ddof=1).rename("boot se")

    @property
    def bias(self) -> pd.Series:
        """Mean of the replicate estimates minus the original estimate."""
        return (self.used.mean() - self.params).rename("bias")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Percentile intervals: the ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicates.

        Parameters
        ----------
        alpha : float
            The interval level is ``1 - alpha``.

        Returns
        -------
        pandas.DataFrame
            Columns named by the quantiles (e.g. ``0.025`` and ``0.975``), one row per parameter.
        """
        if not 0 < alpha < 1:
            raise ModelSpecError(f"alpha must be between 0 and 1, got {alpha!r}")
        used = self.used
        if used.shape[0] == 0:
            lo = hi = pd.Series(np.nan, index=self.params.index)
        else:
            lo = used.quantile(alpha / 2)
            hi = used.quantile(1 - alpha / 2)
        return pd.DataFrame({f"{alpha / 2:g}": lo, f"{1 - alpha / 2:g}": hi})

    def summary_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """Estimates, Wald and bootstrap standard errors, bias and percentile intervals.

        Parameters
        ----------
        alpha : float
            The interval level is ``1 - alpha``.

        Returns
        -------
        pandas.DataFrame
            Columns ``estimate, wald se, boot se, bias`` and the two interval limits.
        """
        ci = self.conf_int(alpha)
        frame = pd.DataFrame({"estimate": self.params, "wald se": self.wald_bse, "boot se": self.bse, "bias": self.bias})
        return pd.concat([frame, ci], axis=1)

    def re_correlations(self, alpha: float = 0.05) -> pd.DataFrame:
        """Correlations of the school effects: estimate, bootstrap SE and percentile interval.

        Each replicate's ``corr(e,f) = cov(e,f) / sqrt(var(e) var(f))`` is computed
        from its own estimates, so the interval respects the bounds -1 and 1 (Wald
        intervals of a correlation need not).

        Parameters
        ----------
        alpha : float
            The interval level is ``1 - alpha``.

        Returns
        -------
        pandas.DataFrame
            Indexed by ``corr(e,f)``; columns ``estimate, boot se`` and the two limits.

        Examples
        --------
        >>> import mlsml
        >>> df = mlsml.simulate.simulate_data([15] * 30, cov=((0.05, 0.02), (0.02, 0.3)), seed=2)
        >>> res = mlsml.fit("y ~ x", df, groups="school")
        >>> boot = res.bootstrap(10, seed=7, n_jobs=1, progress=False)
        >>> table = boot.re_correlations()
        >>> table.index.tolist(), list(table.columns)
        (['corr(u0,v)'], ['estimate', 'boot se', '0.025', '0.975'])
        >>> bool(((table["0.025"] >= -1) & (table["0.975"] <= 1)).all())
        True
        """
        if not 0 < alpha < 1:
            raise ModelSpecError(f"alpha must be between 0 and 1, got {alpha!r}")
        rows = []
        used = self.used
        for name in self.params.index:
            if not (name.startswith("cov(") and name.endswith(")")):
                continue
            e, f = name[4:-1].split(",")
            ve, vf = f"var({e})", f"var({f})"

            def corr(frame, name=name, ve=ve, vf=vf):
                with np.errstate(invalid="ignore", divide="ignore"):
                    return frame[name] / np.sqrt(frame[ve] * frame[vf])

            est = float(corr(self.params.to_frame().T).iloc[0])
            reps = corr(used)
            rows.append(
                {
                    "name": f"corr({e},{f})",
                    "estimate": est,
                    "boot se": float(reps.std(ddof=1)),
                    f"{alpha / 2:g}": float(reps.quantile(alpha / 2)),
                    f"{1 - alpha / 2:g}": float(reps.quantile(1 - alpha / 2)),
                }
            )
        cols = ["estimate", "boot se", f"{alpha / 2:g}", f"{1 - alpha / 2:g}"]
        if not rows:
            return pd.DataFrame(columns=cols)
        return pd.DataFrame(rows).set_index("name")[cols]

    def __repr__(self) -> str:
        return (
            f"<BootstrapResults: {self.n_converged} of {self.n_reps} replicate fits converged, "
            f"{self.n_jobs} process(es), {self.elapsed:.1f} s>"
        )


# ---------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(design: Design, fit_kwargs: dict, model_class: type) -> None:
    """Keep the design, fit options and model class in each worker process (sent once, not per task).

    The model class is the fitted model's own (``type(res.model)``), handed down rather
    than imported, so that this module does not import :mod:`mlsml.model` (which
    imports the results, which offer the bootstrap): the import graph stays one-way.
    """
    _WORKER["design"] = design
    _WORKER["fit_kwargs"] = fit_kwargs
    _WORKER["model_class"] = model_class


def _fit_one(index: int, y: np.ndarray) -> tuple[int, np.ndarray | None, float, bool, bool, str | None]:
    """Refit the model with response ``y`` (group-sorted order); never raises."""
    design = _WORKER["design"]
    try:
        model = _WORKER["model_class"](design.with_response(y), None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = model.fit(**_WORKER["fit_kwargs"])
        return index, r.params.to_numpy(), float(r.llf), bool(r.converged), bool(r.singular), None
    except Exception as exc:  # a failed replicate is reported, not fatal
        return index, None, np.nan, False, False, f"{type(exc).__name__}: {exc}"


class _Progress:
    """A tqdm bar when tqdm is installed, else a counter on stderr."""

    def __init__(self, total: int, enabled: bool, desc: str = "bootstrap"):
        self.total, self.enabled, self.desc, self.done = total, enabled, desc, 0
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="fit", file=sys.stderr)
            except ImportError:
                self._bar = None

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.done == self.total:
            self._last = now
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} fits")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ModelSpecError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _run(
    tasks: Iterable[tuple[int, np.ndarray]],
    design: Design,
    fit_kwargs: dict,
    n_jobs: int,
    tick: Callable[[], None],
    model_class: type,
) -> list[tuple]:
    out: list[tuple] = []
    if n_jobs == 1:
        _init_worker(design, fit_kwargs, model_class)
        try:
            for i, y in tasks:
                out.append(_fit_one(i, y))
                tick()
        finally:
            _WORKER.clear()
        return out
    with ProcessPoolExecutor(max_workers=n_jobs, initializer=_init_worker, initargs=(design, fit_kwargs, model_class)) as pool:
        futures = [pool.submit(_fit_one, i, y) for i, y in tasks]
        try:
            for fut in as_completed(futures):
                out.append(fut.result())
                tick()
        except BaseException:  # Ctrl-C or a dead worker: do not wait for the queued refits
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return out


def bootstrap(
    res: MELSMResults,
    n: int,
    seed=None,
    n_jobs: int | None = None,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
) -> BootstrapResults:
    """Parametric bootstrap: refit the model to ``n`` data sets simulated from ``res``.

    Parameters
    ----------
    res : MELSMResults
        The fit to bootstrap.
    n : int
        Number of replicates.
    seed : int, numpy.random.Generator or None
        Seed for the simulated responses; the result is reproducible for a
        given seed whatever ``n_jobs`` is.
    n_jobs : int, optional
        Worker processes; default ``min(n, os.cpu_count())``. ``1`` runs in
        the calling process.
    progress : bool
        Show a progress bar on stderr (tqdm when installed, else a counter).
    callback : callable, optional
        ``callback(done, n)`` after each finished replicate.

    Returns
    -------
    BootstrapResults
        Bootstrap standard errors (:attr:`~BootstrapResults.bse`), percentile
        intervals (:meth:`~BootstrapResults.conf_int`), the replicate
        estimates and how many replicates converged. Warns
        :class:`~mlsml.ConvergenceWarning` when some replicate fits failed.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.simulate_data([15] * 30, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> boot = mlsml.bootstrap.bootstrap(res, 20, seed=7, n_jobs=1, progress=False)
    >>> boot.n_converged
    20
    >>> list(boot.conf_int().columns)
    ['0.025', '0.975']
    """
    n = _check_count(n, "n")
    if n_jobs is None:
        n_jobs = max(1, min(n, os.cpu_count() or 1))
    n_jobs = _check_count(n_jobs, "n_jobs")
    design = res.model.design
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    ys = draw_responses(design, np.asarray(res.theta), rng, n)
    # start each refit at the estimates, unless they are on the boundary (a singular
    # Sigma has no Cholesky factor): then from the default moment-based start
    start = res.params.copy()
    try:
        res.model.theta_from_params(start)
    except (ModelSpecError, np.linalg.LinAlgError):
        start = None
    # the fit's own rule (kind, points, pruning), from its likelihood
    spec = res.likelihood.spec
    fit_kwargs = dict(nagq=spec.nagq, quadrature=spec.option, method=res.method, prune=spec.prune, start_params=start)
    bar = _Progress(n, progress)
    t0 = time.perf_counter()

    def tick() -> None:
        bar.update()
        if callback is not None:
            callback(bar.done, n)

    try:
        rows = _run(((i, ys[i]) for i in range(n)), design, fit_kwargs, n_jobs, tick, type(res.model))
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    names = list(res.params.index)
    est = np.full((n, len(names)), np.nan)
    llf = np.full(n, np.nan)
    conv = np.zeros(n, dtype=bool)
    sing = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    for i, p, ll, c, s, err in rows:
        if p is not None:
            est[i] = p
        llf[i], conv[i], sing[i] = ll, c, s
        if err is not None:
            errors[i] = err
    n_bad = int(n - conv.sum())
    if n_bad:
        detail = f"; {len(errors)} raised errors (first: {next(iter(errors.values()))})" if errors else ""
        warn(
            f"{n_bad} of {n} bootstrap replicate fits did not converge and are left out of the bootstrap SEs and intervals{detail}",
            ConvergenceWarning,
        )
    return BootstrapResults(
        params=res.params.copy(),
        wald_bse=res.bse,
        replicates=pd.DataFrame(est, columns=names, index=pd.RangeIndex(n, name="replicate")),
        llf=llf,
        converged=conv,
        singular=sing,
        errors=errors,
        seed=seed,
        elapsed=elapsed,
        n_jobs=n_jobs,
    )
