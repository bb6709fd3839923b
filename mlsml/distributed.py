r"""The same fit on a Dask cluster: the likelihood summed over blocks of whole schools.

The integrated log-likelihood is a sum over schools, and each school's term needs only
that school's rows,

.. math::

    \ell(\theta) = \sum_b \ell_b(\theta), \qquad \ell_b(\theta) = \sum_{j \in b} \log L_j(\theta),
    \qquad \nabla \ell = \sum_b \nabla \ell_b, \qquad \nabla^2 \ell = \sum_b \nabla^2 \ell_b,

for any partition of the schools into blocks ``b``. Here every block is one partition of a
Dask DataFrame (or of a Parquet data set) holding whole schools. Each Dask worker builds the
arrays of its blocks from its own partitions (a :class:`mlsml.design.Design` per block) and
evaluates them with the one engine, :class:`mlsml.likelihood.Likelihood`; per evaluation it
returns ``ell_b`` and, when asked, its gradient (``p`` numbers) or Hessian (``p x p``). The
nodes of the adaptive quadrature are placed per school, on the worker, at the parameters the
driver names (:meth:`DaskLikelihood.adapt` returns only a handle). The driver holds a
:class:`DaskLikelihood` -- the interface of :class:`~mlsml.likelihood.Likelihood` -- and runs
the in-memory optimiser, diagnostics and results on it (:func:`mlsml.optimize.maximize`,
:func:`mlsml.diagnostics.settle`, :class:`mlsml.results.MELSMResults`): the data never travel
to the driver, and what travels per evaluation does not grow with the number of pupils.

Before the fit, one pass over the data (:func:`build_distributed_design`) learns what the
design needs from all partitions: missing values per column, the levels of every categorical
column (so a level that occurs in one partition only gets its column everywhere), the schools
of each partition (a school split across partitions is moved by a shuffle on the school id, or
refused with its id), one sample row; the formulas are then evaluated by patsy on a small
prototype frame covering every level, and each worker builds its blocks with those design
descriptions. A second pass over the built blocks gives the moments the standardisation of
:mod:`mlsml.rescale`, the starting values of :mod:`mlsml.start` and the boundary checks need
(column minima, maxima, means, variances and Gram matrices, merged exactly across blocks).

Faults and memory: the blocks are Dask futures, so a worker that dies costs the recomputation
of its blocks (from the source partitions) and the retry of the evaluation, not the fit; an
interrupted fit cancels its tasks; blocks held in memory spill to disk under Dask's worker
memory limits, and ``DaskData(..., keep="source")`` keeps nothing: every evaluation re-reads
its partition (from Parquet) and rebuilds the block.

Model classes: the core model (random intercept and slopes in the mean, a random scale,
covariates in the mean and in the log variance), with covariances fixed at zero by
``association="none"`` or ``cov_constraints``, the quadratic association
(``association="quadratic"``), offsets of the mean and of the log variance and weights at
both levels named as columns (:func:`_block_weights`; cluster-robust standard errors from
the blocks' per-school scores, :meth:`DaskLikelihood.school_scores`), ``missing_code`` and
``drop_constant_groups``, random slopes in the log variance (``scale_re_formula``: the
warm start's core fit runs on the same blocks, :meth:`DaskLikelihood.with_layout`) and
covariates of the between-school variance (``bs_formula``: which of its columns are level-1
is decided over all blocks before the fit, :func:`_classified_block`; the driver keeps every
school's covariates, :class:`SchoolCovariates`, and checks ``var(u0_j)`` from the blocks'
largest). Formulas with stateful transforms (``center(x)``, ``standardize(x)``, ``bs(x)``)
are refused with a :class:`~mlsml.ModelSpecError`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import pickle
import platform
import re
import threading
import time
import uuid
import warnings
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd
import threadpoolctl

from . import schools as _schools
from ._lazy import LazyModule
from .bootstrap import BootstrapResults
from .design import (
    Design,
    FormulaSpec,
    _check_dtypes,
    _check_formula_names,
    _check_numeric_like,
    _materialise_together,
    _MemoNAAction,
    _rhs,
    apply_missing_code,
    bs_level1_columns,
    check_extended_layout,
    formula_columns,
    report_constant_groups,
    response_values,
    split_bs_design,
    to_numpy_dtypes,
)
from .diagnostics import _tail_schools
from .errors import (
    ClusterWarning,
    ConvergenceWarning,
    DataError,
    MissingDataWarning,
    ModelSpecError,
    UnknownGroupWarning,
    warn,
)
from .formulas import check_formula_sides, check_no_lme4_terms
from .groupmeans import display_name
from .integrand import bs_zero_variance_reasons
from .likelihood import EVALUATION_ERRORS, Likelihood
from .params import ParamLayout, constrain
from .predict import PREDICTION_KINDS, PredictionResults, _as_frame, _unknown_group_message
from .predict import get_prediction as _get_prediction
from .predict import predict as _predict
from .quadrature import Nodes, QuadratureSpec
from .rescale import Reparametrisation, _power_of_two, column_map_from_stats, standardised_design
from .results import MELSMResults
from .robust import school_scores
from .simulate import draw_responses
from .start import START_VAR_V, core_layout, extended_start, school_variance_start
from .threads import FIT_BLAS_THREADS
from .validate import check_choice, describe_value
from .weights import (
    check_some_school_weight,
    check_weight_options,
    frequency_counts,
    level1_weights,
    row_values,
    school_weights_by_label,
    school_weights_from_rows,
)

# Dask is an optional dependency (the "dask" extra): imported on first use, so that
# `import mlsml` neither needs nor loads it.
dask = LazyModule("dask")
dd = LazyModule("dask.dataframe")
dist = LazyModule("distributed")
patsy = LazyModule("patsy")

#: Functions of patsy whose result depends on the whole column (their state is learned from
#: the data): refused, since one pass over partitions cannot learn their state exactly.
STATEFUL_TRANSFORMS = ("center", "standardize", "scale", "bs", "cr", "cc", "te")

#: The names of the optional formulas in :attr:`Plan.formulas` (as :func:`mlsml.design.extra_designs` names them).
SCALE_RE_WHAT = "scale random-effects formula"
BS_WHAT = "between-school variance formula"

#: Design descriptions (one per fitted model) kept per worker process.
WORKER_PLANS = 8

#: Node sets kept with each block per rule (the optimiser adapts, then evaluates).
WORKER_NODES = 2

#: Workers of the :class:`distributed.LocalCluster` started when no client is given or current.
LOCAL_WORKERS = 2

#: How a school split across input partitions is handled (:class:`DaskData`).
SPLIT_POLICIES = ("shuffle", "raise")

#: Where the blocks live between evaluations (:class:`DaskData`).
KEEP_POLICIES = ("memory", "source")

#: Most posterior draws (schools x draws) gathered on the driver for the rank intervals of
#: :meth:`DistributedResults.school_effects`; beyond, the rank intervals are NaN.
RANK_DRAWS_MAX = 20_000_000


# ====================================================================== input
@dataclass(frozen=True)
class DaskData:
    """Data on a Dask cluster, with how to hold it: pass as ``data=`` to :func:`mlsml.fit`.

    A Dask DataFrame or a Parquet path/glob passed directly means ``DaskData(source)``.

    Parameters
    ----------
    source : dask.dataframe.DataFrame, str or pathlib.Path
        The data, or a Parquet file, folder or glob (read with :func:`dask.dataframe.read_parquet`).
    split_schools : {"shuffle", "raise"}
        A school whose rows are in more than one partition: moved into one partition by a
        shuffle on the school id (``"shuffle"``), or refused with a
        :class:`~mlsml.DataError` naming the school (``"raise"``).
    keep : {"memory", "source"}
        ``"memory"``: each worker keeps the arrays of its blocks (spilled to disk by Dask
        when its memory limit is reached). ``"source"``: nothing is kept; every evaluation
        re-reads the block's partition and rebuilds its arrays (for data much larger than
        the cluster's memory; each evaluation costs a read of the data).
    npartitions : int, optional
        Merge neighbouring partitions into this many blocks (fewer tasks per evaluation);
        schools are never split by the merge.

    Examples
    --------
    >>> DaskData("pupils/*.parquet", keep="source").keep
    'source'
    """

    source: Any
    split_schools: str = "shuffle"
    keep: str = "memory"
    npartitions: int | None = None

    def __post_init__(self) -> None:
        check_choice("split_schools", self.split_schools, SPLIT_POLICIES)
        check_choice("keep", self.keep, KEEP_POLICIES)
        if self.npartitions is not None and (not isinstance(self.npartitions, int | np.integer) or self.npartitions < 1):
            raise ModelSpecError(f"npartitions must be a positive integer or None, not {describe_value(self.npartitions)}")


def is_distributed_data(data) -> bool:
    """Whether ``data`` is for a Dask fit: a :class:`DaskData`, a Dask DataFrame or a path (Parquet).

    Examples
    --------
    >>> import pandas as pd
    >>> is_distributed_data(pd.DataFrame({"y": [1.0]})), is_distributed_data("pupils/*.parquet")
    (False, True)
    """
    if isinstance(data, DaskData | str | Path):
        return True
    return type(data).__module__.split(".")[0] in ("dask", "dask_expr")


def _dask_frame(source):
    """The Dask DataFrame of a source (Parquet paths read lazily)."""
    if isinstance(source, str | Path):
        try:
            return dd.read_parquet(str(source))
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise DataError(f"could not read Parquet data from {str(source)!r}: {exc}") from exc
    return source


def get_client(client=None):
    """The client to fit with: ``client``, else the current one, else a new ``LocalCluster``.

    Returns ``(client, owned)``: ``owned`` is ``(client, cluster)`` when the cluster was
    started here (it is closed by the results' ``close()`` or when they are garbage-collected),
    else ``None``. Starting one warns with a :class:`~mlsml.ClusterWarning` saying how
    to use a cluster of one's own.
    """
    if client is not None:
        if not isinstance(client, dist.Client):
            raise ModelSpecError(f"client must be a distributed.Client or None, not {describe_value(client)}")
        return client, None
    try:
        return dist.get_client(), None
    except ValueError:
        pass
    warn(
        f"no Dask client is running: starting a LocalCluster of {LOCAL_WORKERS} worker processes for this fit "
        "(closed when it ends). To reuse a cluster, or to run on SLURM/PBS/Kubernetes, create a "
        "distributed.Client first (e.g. Client(LocalCluster()) or dask_jobqueue.SLURMCluster) and pass client=",
        ClusterWarning,
    )
    cluster = dist.LocalCluster(n_workers=LOCAL_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None)
    client = dist.Client(cluster)
    return client, (client, cluster)


# ====================================================================== the plan of the design
@dataclass(frozen=True)
class Plan:
    """What every worker needs to build the arrays of its blocks (small; shipped with each task).

    Attributes
    ----------
    formulas : tuple of (str, str)
        ``(formula, what)`` of the mean, scale and random-effects formulas (and the scale
        random-effects formula, ``scale_re_formula``, when given).
    groups : hashable
        The school column.
    used : tuple
        The columns the formulas and ``groups`` use.
    response : str
    categories : dict
        Text and categorical columns -> their categories (the union over all partitions,
        sorted as :class:`pandas.Categorical` sorts them).
    prototype : pandas.DataFrame or None
        Rows covering every level of every categorical column (with a sample row's other
        values): the design descriptions are learned from it (:func:`_design_infos`).
    layout : ParamLayout or None
    token : str
        Identifies the plan in the workers' caches.
    offsets : tuple of (str, column)
        ``(field, column)`` of the offsets read from the data (``"offset"``,
        ``"scale_offset"``; :mod:`mlsml.weights`).
    weights : column or None
        The column of the level-1 weights.
    group_weights : column, mapping or None
        The column of the level-2 weights (constant within each school) or a mapping
        ``{school: weight}`` such as a dict (shipped to every block: one number per school).
    weights_kind, weights_scale : str
        As :func:`mlsml.weights.with_weights_and_offsets` (the scale already defaulted).
    missing_code : float or None
        Values of the used columns that mean missing (:func:`mlsml.design.build_design`).
    drop_constant : bool
        ``drop_constant_groups``.
    dropped_schools : tuple
        The schools whose response is constant, found by the driver over all partitions
        (a school split across partitions is judged on all its rows) and dropped by every block.
    """

    formulas: tuple
    groups: Hashable
    used: tuple
    response: str
    in_c: frozenset
    categories: dict = field(default_factory=dict)
    prototype: pd.DataFrame | None = None
    layout: ParamLayout | None = None
    token: str = ""
    offsets: tuple = ()
    weights: Hashable | None = None
    group_weights: Any = None
    weights_kind: str = "sampling"
    weights_scale: str = "size"
    missing_code: float | None = None
    drop_constant: bool = False
    dropped_schools: tuple = ()

    @property
    def read(self) -> list:
        """The columns read from the data: those the formulas use, then the offsets' and the weights'."""
        extra = [c for _, c in self.offsets] + [c for c in (self.weights, self.group_weights) if isinstance(c, str)]
        out = list(self.used)
        for c in extra:
            if c not in out:
                out.append(c)
        return out

    @property
    def weighted(self) -> bool:
        """Whether the blocks carry weights (at either level)."""
        return self.weights is not None or self.group_weights is not None


def _row_offsets(frame: pd.DataFrame, plan: Plan, kept: np.ndarray) -> dict:
    """The offsets of a partition's kept rows (in its row order), checked as :func:`mlsml.weights.with_weights_and_offsets` does.

    An offset is not a column of the formulas: a missing value is an error naming the
    column and the row, not a reason to drop the row. ``kept`` marks the partition's kept rows.
    """
    out = {}
    for what, column in plan.offsets:
        series = frame[column]
        if pd.api.types.is_bool_dtype(series) or not (pd.api.types.is_numeric_dtype(series) or series.dtype == object):
            raise DataError(f"{what} (column {column!r}) must be numbers, not dtype {series.dtype}")
        try:
            values = pd.to_numeric(series, errors="raise").to_numpy(dtype=float, na_value=np.nan)[kept]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{what} (column {column!r}) must be numbers: {exc}") from exc
        wrong = ~np.isfinite(values)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            label = frame.index[kept][i]
            raise DataError(
                f"the {what} (column {column!r}) must be finite: missing or infinite in {int(wrong.sum())} row(s) of a "
                f"partition, first {values[i]!r} at index {label.item() if isinstance(label, np.generic) else label!r}"
            )
        out[what] = values
    return out


def _prepare(frame: pd.DataFrame, plan: Plan) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, dict]:
    """The used columns of a partition: the rows kept (numpy dtypes), the missing-value mask,
    the mask of the kept rows and the values made missing by ``missing_code`` per column.

    The arithmetic of :func:`mlsml.design.build_design`: values equal to ``missing_code``
    are missing (:func:`mlsml.design.apply_missing_code`); a row is dropped when any used
    column is missing (NaN, None, ``pd.NA``) or infinite, or (``drop_constant_groups``) when
    its school is one the driver found constant (:attr:`Plan.dropped_schools`).
    """
    frame = frame.loc[:, list(plan.used)]
    coded: dict = {}
    if plan.missing_code is not None:
        frame, coded = apply_missing_code(frame, plan.missing_code)
    na = frame.isna()
    bad = na.copy()
    for c in plan.used:
        s = frame[c]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            bad[c] = na[c].to_numpy() | (~np.isfinite(s.to_numpy(dtype=float, na_value=np.nan)) & ~na[c].to_numpy())
    dropped = bad.any(axis=1).to_numpy()
    if plan.dropped_schools:
        dropped = dropped | frame[plan.groups].isin(plan.dropped_schools).to_numpy()
    kept = to_numpy_dtypes(frame.loc[~dropped])
    for c, cats in plan.categories.items():
        kept[c] = pd.Categorical(kept[c], categories=cats)
    return kept, bad, ~dropped, coded


def _learn(frame: pd.DataFrame, plan: Plan) -> dict:
    """One partition's part of the pass that learns the design (see :func:`build_distributed_design`)."""
    _worker_setup()
    kept, bad, rows, coded = _prepare(frame, plan)
    _row_offsets(frame, plan, rows)
    out: dict[str, Any] = {
        "rows": int(frame.shape[0]),
        "coded": coded,
        "ranges": _response_ranges(kept, plan) if plan.drop_constant and not plan.dropped_schools else None,
        "bad": {c: int(bad[c].sum()) for c in plan.used if bad[c].any()},
        "dropped": int(bad.any(axis=1).sum()),
        "first_bad": frame.index[bad.any(axis=1).to_numpy()][0] if bad.any(axis=1).any() else None,
    }
    if kept.shape[0]:
        y = kept[plan.response]
        if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y) or pd.api.types.is_complex_dtype(y):
            raise DataError(
                f"the response {plan.response!r} is not real-valued numeric (dtype {y.dtype}); a MELSM needs a continuous response"
            )
        _check_dtypes(kept, [c for c in plan.used if c != plan.groups])
        _check_numeric_like(kept, [c for c in plan.used if c != plan.groups and c not in plan.in_c])
    levels = {}
    for c in plan.used:
        s = kept[c]
        if c == plan.groups:
            continue
        if isinstance(s.dtype, pd.CategoricalDtype):
            levels[c] = ("categorical", list(s.cat.categories))
        elif pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s):
            levels[c] = ("text", list(pd.unique(s)))
        elif c in plan.in_c:
            levels[c] = ("values", list(pd.unique(s)))
    out["levels"] = levels
    counts = kept[plan.groups].value_counts(sort=False)
    out["labels"] = counts.index.to_numpy()
    out["counts"] = counts.to_numpy()
    out["sample"] = kept.iloc[:1]
    return out


def _response_ranges(kept: pd.DataFrame, plan: Plan) -> pd.DataFrame | None:
    """The minimum and maximum of the response per school of a partition (``drop_constant_groups``), or ``None``
    when the response is not one numeric column (the checks of the build say so)."""
    y = response_values(kept, plan.response)
    if y is None:
        return None
    return y.groupby(kept[plan.groups].to_numpy(), sort=False).agg(["min", "max"])


def _design_infos(plan: Plan):
    """patsy's design descriptions of the response and the three formulas, learned on the prototype.

    Cached per process (patsy cannot pickle them, so each worker makes its own from the plan).
    """
    with _CACHE_LOCK:
        hit = _INFOS.get(plan.token)
    if hit is not None:
        return hit
    evaluated = _materialise_together(list(plan.formulas), plan.prototype)
    ((ydf, _), mean_spec), *rest = evaluated
    infos = (ydf.design_info, mean_spec) + tuple(spec for _, spec in rest)  # scale, random effects[, scale_re]
    with _CACHE_LOCK:
        _INFOS[plan.token] = infos
        while len(_INFOS) > WORKER_PLANS:
            _INFOS.popitem(last=False)
    return infos


@dataclass(frozen=True)
class Block:
    """The arrays of one block of whole schools, built on a worker (never sent to the driver).

    Attributes
    ----------
    design : Design or None
        The block's design (rows sorted by school; ``None`` for an empty partition).
    token : str
        Identifies the block in the worker's caches (the same after a rebuild).
    """

    design: Design | None
    token: str
    #: What the worker derives from the design and keeps with it: the standardised copy and
    #: the latest node sets (:func:`_block_design`, :func:`_block_nodes`); released with the block.
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    def __sizeof__(self) -> int:
        """Bytes of the arrays held (what Dask's memory accounting and spilling see; a shared array once)."""
        held = [self.design] + [v for v in self.derived.values() if isinstance(v, Design)]
        arrays = {id(a): a for d in held if d is not None for a in _design_arrays(d)}
        return sum(a.nbytes for a in arrays.values()) + sum(
            sum(a.nbytes for a in v if isinstance(a, np.ndarray)) for k, v in self.derived.items() if k[0] == "nodes"
        )


def _design_arrays(design: Design) -> list:
    fields = (
        design.y,
        design.X,
        design.W,
        design.Z,
        design.G,
        design.S,
        design.S_level1,
        design.group,
        design.order,
        design.offset,
        design.scale_offset,
    )
    return [a for a in fields if a is not None]


def _build_block(frame: pd.DataFrame, plan: Plan, token: str) -> Block:
    """The :class:`Block` of one partition: the arrays of :func:`mlsml.design.build_design` for its rows."""
    _worker_setup()
    kept, _, kept_rows, _ = _prepare(frame, plan)
    if kept.shape[0] == 0:
        return Block(None, token)
    infos = _design_infos(plan)
    offsets = _row_offsets(frame, plan, kept_rows)
    ydf, Xdf, Wdf, Zdf, *extra = patsy.build_design_matrices(list(infos), kept, NA_action=_MemoNAAction(), return_type="dataframe")
    extra = dict(zip((what for _, what in plan.formulas[3:]), extra))
    codes, labels = pd.factorize(kept[plan.groups], sort=True)
    order = np.argsort(codes, kind="stable")
    codes_sorted = codes[order]
    counts = np.bincount(codes_sorted, minlength=len(labels))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    frames = {"X": Xdf, "W": Wdf, "Z": Zdf}
    if plan.layout.scale_re_terms:  # the design of the scale effects (scale_re_formula)
        frames["G"] = extra[SCALE_RE_WHAT]
    if plan.layout.bs_terms:  # the between-school variance design (bs_formula), split by _classified_block
        frames["S"] = extra[BS_WHAT]
    arrays = {name: f.to_numpy(dtype=float) for name, f in frames.items()}
    for name, M in arrays.items():
        bad = ~np.isfinite(M)
        if bad.any():
            j = int(np.nonzero(bad.any(axis=0))[0][0])
            names = frames[name].columns
            school = kept[plan.groups].iloc[int(np.nonzero(bad[:, j])[0][0])]
            raise DataError(f"design column {names[j]!r} has a non-finite value in a row of school {school!r}")
    offsets = {what: o[order] for what, o in offsets.items()}
    X = np.ascontiguousarray(arrays["X"][order])
    # the same covariates in the mean and the log variance (London Models 5-6): one array for both
    same = arrays["W"].shape == arrays["X"].shape and np.array_equal(arrays["W"], arrays["X"])
    y = ydf.to_numpy(dtype=float).ravel()[order]
    bs = {}
    if "S" in arrays:  # every column held as level-1 until the driver has decided which are (_classified_block)
        Sm = np.ascontiguousarray(arrays["S"][order])
        bs = {"S": np.zeros((len(labels), Sm.shape[1])), "S_level1": Sm, "S_level1_columns": np.ones(Sm.shape[1], dtype=bool)}
    design = Design(
        y=y - offsets["offset"] if "offset" in offsets else y,  # as in memory: y holds the response minus the offset
        X=X,
        W=X if same else np.ascontiguousarray(arrays["W"][order]),
        Z=np.ascontiguousarray(arrays["Z"][order]),
        G=np.ascontiguousarray(arrays["G"][order]) if "G" in arrays else None,
        group=codes_sorted.astype(np.intp),
        starts=starts.astype(np.intp),
        counts=counts.astype(np.intp),
        group_labels=np.asarray(labels),
        order=order.astype(np.intp),
        row_labels=kept.index,
        layout=plan.layout,
        info={"response": plan.response},
        **offsets,
        **bs,
    )
    if plan.weighted:
        design = dataclasses.replace(design, **_block_weights(frame.loc[kept_rows].iloc[order], plan, design))
    return Block(design, token)


def _classified_block(block: Block, level1: np.ndarray) -> Block:
    r"""A block whose ``bs_formula`` design is split into its school-level and level-1 columns.

    ``level1`` is the driver's decision over all blocks (a column is level-1 when it varies
    within some school of some block, :func:`mlsml.design.bs_level1_columns`), applied by the
    function the in-memory design uses (:func:`mlsml.design.split_bs_design`), so that every
    block has the in-memory :attr:`~mlsml.design.Design.S` and
    :attr:`~mlsml.design.Design.S_level1` of its schools.
    """
    design = block.design
    if design is None:
        return block
    S, S_level1 = split_bs_design(design.S_level1, level1, design.starts)
    return Block(dataclasses.replace(design, S=S, S_level1=S_level1, S_level1_columns=level1), block.token)


def _block_weights(rows: pd.DataFrame, plan: Plan, design: Design) -> dict:
    r"""The ``weights`` and ``group_weights`` of a block's design (its kept rows sorted by school).

    The checks and the within-school scaling of :func:`mlsml.weights.with_weights_and_offsets`
    (the same functions): every school is whole in its block, so the scaling's per-school sums
    (:math:`\sum_i w_{i|j}`, :math:`\sum_i w_{i|j}^2`, :math:`n_j`) are the block's own. What
    needs all schools (some school weight positive; the replicated data's size for frequency
    weights) is decided on the driver from the blocks' replies (:func:`_build`).
    """
    out = {}
    if plan.weights is not None:
        w, name = row_values(plan.weights, rows, "weights")
        out["weights"] = level1_weights(w, design, name, rows.index, plan.weights_scale)
    if isinstance(plan.group_weights, str):
        w, name = row_values(plan.group_weights, rows, "group_weights")
        out["group_weights"] = school_weights_from_rows(w, design, name, rows.index)
    elif plan.group_weights is not None:
        out["group_weights"] = school_weights_by_label(plan.group_weights, design.group_labels)
    return out


# ====================================================================== worker-side caches
_CACHE_LOCK = threading.Lock()
_INFOS: OrderedDict = OrderedDict()  # plan token -> patsy's design descriptions


@dataclass(frozen=True)
class Standardisation:
    """The maps of :func:`mlsml.rescale.reparametrise`, applied to every block on its worker."""

    sigma: float
    Px: np.ndarray
    Pw: np.ndarray
    PS: np.ndarray
    T: np.ndarray
    token: str


def _block_design(block: Block, transform: Standardisation | None, layout: ParamLayout | None = None) -> Design:
    """The block's design under ``layout`` (``None``: the block's own; another is the core model
    of the warm start of a ``scale_re_formula`` fit), standardised by ``transform`` (the copy kept
    with the block)."""
    design = block.design
    if layout is not None and layout != design.layout:
        design = dataclasses.replace(design, layout=layout)
    if transform is None:
        return design
    key = ("design", transform.token)
    hit = block.derived.get(key)
    if hit is None:
        hit = standardised_design(design, transform.sigma, transform.Px, transform.Pw, transform.PS, transform.T)
        if design.W is design.X and np.array_equal(transform.Pw, transform.Px):  # still one array
            hit = dataclasses.replace(hit, W=hit.X)
        for old in [k for k in block.derived if k[0] == "design"]:  # one standardisation at a time
            del block.derived[old]
        block.derived[key] = hit
    return hit


@dataclass(frozen=True)
class Request:
    """One evaluation asked of every block: ``op`` at ``theta`` with nodes adapted at ``nodes_at``."""

    op: str
    theta: np.ndarray | None
    nodes_at: np.ndarray | None
    spec: QuadratureSpec | None
    transform: Standardisation | None
    extra: Any = None
    layout: ParamLayout | None = None  # the design's layout (None: the blocks' own)


def _block_nodes(block: Block, lik: Likelihood, req: Request) -> Nodes:
    """Nodes adapted at ``req.nodes_at``, kept with the block for the next request at the same point
    (the optimiser adapts, then evaluates the value, gradient or Hessian there); the latest
    :data:`WORKER_NODES` sets per rule and standardisation are kept."""
    tag = ("nodes", None if req.transform is None else req.transform.token, req.spec, req.layout)
    key = tag + (req.nodes_at.tobytes(),)
    hit = block.derived.get(key)
    if hit is None:
        hit = lik.adapt(req.nodes_at)
        with _CACHE_LOCK:
            block.derived[key] = hit
            same = [k for k in block.derived if k[:3] == tag]
            for old in same[:-WORKER_NODES]:
                del block.derived[old]
    return hit


#: What is set once in each worker process (:func:`_worker_setup`): the BLAS limit.
_WORKER_BLAS: list = []

#: glibc's ``mallopt`` parameters (``malloc.h``) set by :func:`_worker_setup`.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

#: Allocations at least this large are mapped afresh by glibc in a Dask worker (the largest
#: threshold glibc's own dynamic rule reaches on 64-bit Linux); smaller ones reuse freed memory.
WORKER_MMAP_THRESHOLD = 32 * 2**20

#: Free memory at the top of a worker's heap returned to the system beyond this (glibc's
#: dynamic rule: twice the mmap threshold).
WORKER_TRIM_THRESHOLD = 2 * WORKER_MMAP_THRESHOLD


def _worker_setup() -> None:
    """Set up the worker process for evaluations, once: single-threaded BLAS and glibc's malloc.

    BLAS: as an in-memory fit does (:func:`mlsml.threads.blas_limited`), the pools are limited
    to :data:`mlsml.threads.FIT_BLAS_THREADS`, but for the life of the worker process: a
    per-task limit costs about 4 ms (threadpoolctl scans the loaded libraries), and without
    it OpenBLAS's threads doubled the CPU time of an evaluation (0.18 to 0.27 instead of
    0.09 s for an evaluation of 500,000 rows of Model 3 in a process without
    ``OPENBLAS_NUM_THREADS=1`` on a loaded 2-core machine).

    malloc: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, and setting
    any threshold turns off glibc's dynamic mmap threshold, so every temporary array above
    128 KiB (each column of a block: 4 MB for 500,000 rows) was mapped, faulted in page by
    page and unmapped again at every evaluation. That doubled the CPU time of an evaluation
    (0.065 to 0.105 s for 500,000 rows of Model 3; wall 0.095 to 0.22 s) and made the 1M-row
    Model 3 fit on the cluster 4 times slower (11.5 against 2.7 s). The thresholds are set to
    :data:`WORKER_MMAP_THRESHOLD` and :data:`WORKER_TRIM_THRESHOLD` (on glibc only; elsewhere
    nothing is changed). Larger arrays, such as a block's design, are still mapped and
    returned to the system when freed.
    """
    if _WORKER_BLAS:
        return
    with _CACHE_LOCK:
        if _WORKER_BLAS:
            return
        if FIT_BLAS_THREADS is not None:
            _WORKER_BLAS.append(threadpoolctl.threadpool_limits(limits=FIT_BLAS_THREADS, user_api="blas"))
        else:
            _WORKER_BLAS.append(None)
        if platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                libc.mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
            except (OSError, AttributeError):  # no mallopt in this C library: leave malloc alone
                pass


@dataclass(frozen=True)
class _Failed:
    """A block's evaluation that raised one of :data:`mlsml.likelihood.EVALUATION_ERRORS`.

    Returned, not raised, so that Dask's workers do not log a "Compute Failed" error for
    what is a routine event of an optimisation (a trial point where the rule cannot be
    evaluated); :meth:`BlockSet.run` raises the error on the driver, as an in-memory fit would.
    """

    error: BaseException


def _new_frame(newdata) -> pd.DataFrame:
    """``newdata`` of a prediction as a pandas frame: a DataFrame, a dict of columns, or a Dask
    DataFrame (computed: its rows come to the driver, then each goes to the block of its school)."""
    if isinstance(newdata, DaskData | str | Path):
        raise DataError(
            f"newdata must be a pandas DataFrame, a dict of column -> values or a Dask DataFrame, not {describe_value(newdata)}"
        )
    if is_distributed_data(newdata):
        if not hasattr(newdata, "columns"):  # a Dask Series, array or bag
            raise DataError(f"newdata must be a pandas or Dask DataFrame, not a {type(newdata).__name__}")
        return newdata.compute()
    return _as_frame(newdata)


def _evaluate(block: Block, req: Request):
    """What one block returns for a :class:`Request` (runs on the worker holding the block);
    :class:`_Failed` where the likelihood cannot be evaluated."""
    try:
        return _evaluate_block(block, req)
    except EVALUATION_ERRORS as exc:
        return _Failed(exc)


def _evaluate_block(block: Block, req: Request):
    """:func:`_evaluate` itself."""
    _worker_setup()
    if block.design is None:
        return None
    design = _block_design(block, req.transform, req.layout)
    if req.op == "moments":
        return _moments(design)
    if req.op == "start_gram":
        return design.X.T @ design.X, design.X.T @ design.y
    if req.op == "start_resid":
        return _start_resid(design, req.extra)
    if req.op == "check_delta":
        return float(np.max(np.abs(design.W @ req.extra[0] - req.extra[1])))
    if req.op == "bs_level1":
        return bs_level1_columns(design.S_level1, design.group, design.starts)
    lik = Likelihood.build(design, req.spec)
    theta = req.theta
    nodes = None
    if req.nodes_at is not None:
        nodes = _block_nodes(block, lik, req)
    if req.op == "value":
        return float(lik.value(theta) if nodes is None else lik.at_nodes(theta, nodes))
    if req.op == "value_and_grad":
        v, g = lik.value_and_grad(theta, nodes)
        return float(v), np.asarray(g, dtype=float)
    if req.op == "hessian":
        return np.asarray(lik.hessian(theta, nodes), dtype=float)
    if req.op == "start_hessian":
        return np.asarray(lik.start_hessian(theta), dtype=float)
    if req.op == "u0_variance_max":
        return float(lik.integrand.u0_variances(theta).max())
    if req.op == "per_school":
        return lik.per_school(theta, nodes)
    if req.op == "school_scores":
        return school_scores(lik, theta, nodes)
    if req.op == "call":  # a function of the block's results object (school tables, predictions)
        fn, args = req.extra
        return fn(block, design, lik, *args)
    raise ValueError(f"unknown request {req.op!r}")


# ====================================================================== moments
@dataclass(frozen=True)
class ColumnMoments:
    """Count, minimum, maximum, mean and sum of squared deviations of every column (mergeable)."""

    n: int
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    sq: np.ndarray  # sum of squares

    @classmethod
    def of(cls, M: np.ndarray) -> ColumnMoments:
        """The moments of the columns of ``M`` (N x k).

        Reduced along the rows of the row-major matrix at once (a loop over its strided
        columns took 0.5 s for a 500,000-row block of Model 6's 24 columns); the blocks'
        moments are merged by :meth:`merge`, so they agree with the in-memory column
        moments to rounding, not bit for bit, either way.
        """
        M = np.asarray(M, dtype=float)
        if M.ndim == 1:
            M = M[:, None]
        n, k = M.shape
        if not n:
            return cls(0, np.full(k, np.inf), np.full(k, -np.inf), np.zeros(k), np.zeros(k), np.zeros(k))
        mean = M.mean(axis=0)
        dev = M - mean
        return cls(n, M.min(axis=0), M.max(axis=0), mean, np.einsum("ij,ij->j", dev, dev), np.einsum("ij,ij->j", M, M))

    def merge(self, other: ColumnMoments) -> ColumnMoments:
        r"""The moments of both row sets (Chan, Golub & LeVeque's update):
        :math:`M_2 = M_{2a} + M_{2b} + \delta^2 n_a n_b / n`."""
        n = self.n + other.n
        if not other.n:
            return self
        if not self.n:
            return other
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta**2 * self.n * other.n / n
        return ColumnMoments(n, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi), mean, m2, self.sq + other.sq)

    @property
    def sd(self) -> np.ndarray:
        """Population standard deviations (``numpy.std``)."""
        return np.sqrt(self.m2 / max(self.n, 1))


@dataclass(frozen=True)
class DesignMoments:
    """What the driver knows of a design held in blocks: column moments, Gram matrices, schools."""

    y: ColumnMoments
    X: ColumnMoments
    W: ColumnMoments
    Z: ColumnMoments
    XtX: np.ndarray
    WtW: np.ndarray
    Wt1: np.ndarray
    ZtZ: np.ndarray
    varying_schools: int  # schools whose response varies
    so: ColumnMoments | None = None  # of the scale offset, when the design has one
    Wtso: np.ndarray | None = None  # W' scale_offset
    G: ColumnMoments | None = None  # of the design of the scale effects (scale_re_formula)
    S: ColumnMoments | None = None  # of the school-level bs_formula design S, one row per school
    Srows: ColumnMoments | None = None  # of the rows' bs_formula design S[group] + S_level1
    StS: np.ndarray | None = None  # the Gram matrix of those rows

    def merge(self, other: DesignMoments) -> DesignMoments:
        """Both row sets' moments."""
        return DesignMoments(
            self.y.merge(other.y),
            self.X.merge(other.X),
            self.W.merge(other.W),
            self.Z.merge(other.Z),
            self.XtX + other.XtX,
            self.WtW + other.WtW,
            self.Wt1 + other.Wt1,
            self.ZtZ + other.ZtZ,
            self.varying_schools + other.varying_schools,
            None if self.so is None else self.so.merge(other.so),
            None if self.Wtso is None else self.Wtso + other.Wtso,
            None if self.G is None else self.G.merge(other.G),
            None if self.S is None else self.S.merge(other.S),
            None if self.Srows is None else self.Srows.merge(other.Srows),
            None if self.StS is None else self.StS + other.StS,
        )


def _school_digests(design: Design) -> np.ndarray:
    """An 8-byte digest of every school: its label and its sorted responses (the block's order)."""
    y = design.y
    return np.array(
        [
            hashlib.blake2b(repr(lab).encode() + np.sort(y[st : st + n]).tobytes(), digest_size=8).digest()
            for lab, st, n in zip(design.group_labels.tolist(), design.starts, design.counts)
        ],
        dtype="S8",
    )


def _moments(design: Design) -> tuple:
    """A block's :class:`DesignMoments`, school labels and counts, school digests (:func:`_school_digests`),
    level-2 weights (or ``None``), total weight of the observations (:attr:`mlsml.design.Design.nobs_weighted`)
    and the schools' ``bs_formula`` covariates (:meth:`mlsml.design.Design.school_bs_covariates`, or ``None``)."""
    ys = design.y
    bs = bool(design.layout.bs_terms and design.S is not None)
    Srows = (design.S[design.group] + (0.0 if design.S_level1 is None else design.S_level1)) if bs else None
    varying = int(np.sum(np.maximum.reduceat(ys, design.starts) != np.minimum.reduceat(ys, design.starts)))
    m = DesignMoments(
        ColumnMoments.of(design.y),
        ColumnMoments.of(design.X),
        ColumnMoments.of(design.W),
        ColumnMoments.of(design.Z),
        design.X.T @ design.X,
        design.W.T @ design.W,
        design.W.sum(axis=0),
        design.Z.T @ design.Z,
        varying,
        None if design.scale_offset is None else ColumnMoments.of(design.scale_offset),
        None if design.scale_offset is None else design.W.T @ design.scale_offset,
        ColumnMoments.of(design.G) if (design.layout.scale_re_terms and design.G is not None) else None,
        ColumnMoments.of(design.S) if bs else None,
        ColumnMoments.of(Srows) if bs else None,
        Srows.T @ Srows if bs else None,
    )
    covariates = design.school_bs_covariates() if bs else None
    return m, design.group_labels, design.counts, _school_digests(design), design.group_weights, design.nobs_weighted, covariates


def _start_resid(design: Design, beta: np.ndarray):
    """A block's part of the moment starting values at ``beta`` (:func:`mlsml.start.start_values_core`)."""
    r = design.y - design.X @ beta
    n = design.counts
    rbar = np.add.reduceat(r, design.starts) / n
    within = r - rbar[design.group]
    return float(np.sum(within**2)), ColumnMoments.of(rbar), float(np.sum(1.0 / n)), ColumnMoments.of(r)


# ====================================================================== the blocks on the cluster
class BlockSet:
    """The blocks of a fit on the cluster: futures (or graphs, ``keep="source"``) and their schools.

    Mutable bookkeeping shared by a design and its standardised copy: the number of requests
    and the bytes of requests and replies (pickled sizes; in all and per kind of request,
    :attr:`traffic`), reported by ``bench/bench_dask.py``.
    """

    def __init__(self, client, blocks: list, keep: str, owned=None):
        self.client = client
        self.blocks = blocks
        self.keep = keep
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.traffic: dict[str, list[int]] = {}  # op -> [requests, bytes sent, bytes received]
        # a cluster started for the fit ends with the last object using it (or with close())
        self._finalizer = weakref.finalize(self, _close_owned, owned) if owned is not None else None

    def run(self, req: Request) -> list:
        """Ask every block; the replies in block order (``None`` for empty blocks).

        A worker lost mid-request costs a recomputation of its blocks and a retry (Dask's
        scheduler); an interrupt (Ctrl-C) cancels the request's tasks before it propagates.
        """
        client = self.client
        if self.keep == "memory":
            futures = client.map(_evaluate, self.blocks, req=req, pure=False)
        else:
            futures = client.compute([dask.delayed(_evaluate, pure=False)(b, req) for b in self.blocks])
        out = _gather(client, futures)
        for reply in out:
            if isinstance(reply, _Failed):
                raise reply.error
        sent = len(pickle.dumps(req)) * len(self.blocks)
        received = sum(len(pickle.dumps(r)) for r in out)
        self.requests += 1
        self.bytes_sent += sent
        self.bytes_received += received
        count = self.traffic.setdefault(req.op, [0, 0, 0])
        count[0], count[1], count[2] = count[0] + 1, count[1] + sent, count[2] + received
        return out

    def run_some(self, requests: Mapping[int, Request]) -> dict:
        """Ask only some blocks, each its own request (``{block index: request}``); the replies by index.

        Used where each block needs other data, e.g. the new rows of its own schools
        (:meth:`DistributedResults.predict` with ``newdata``). Faults and interrupts as :meth:`run`.
        """
        if not requests:
            return {}
        client = self.client
        which = list(requests)
        if self.keep == "memory":
            futures = [client.submit(_evaluate, self.blocks[i], requests[i], pure=False) for i in which]
        else:
            futures = client.compute([dask.delayed(_evaluate, pure=False)(self.blocks[i], requests[i]) for i in which])
        out = _gather(client, futures)
        for reply in out:
            if isinstance(reply, _Failed):
                raise reply.error
        sent = sum(len(pickle.dumps(requests[i])) for i in which)
        received = sum(len(pickle.dumps(r)) for r in out)
        op = requests[which[0]].op
        self.requests += 1
        self.bytes_sent += sent
        self.bytes_received += received
        count = self.traffic.setdefault(op, [0, 0, 0])
        count[0], count[1], count[2] = count[0] + 1, count[1] + sent, count[2] + received
        return dict(zip(which, out))

    def close(self) -> None:
        """Release the blocks (and the cluster started for the fit, if any)."""
        if self.keep == "memory" and self.client.status == "running":
            self.client.cancel(self.blocks)
        if self._finalizer is not None:
            self._finalizer()


def _gather(client, futures: list) -> list:
    """The results of ``futures``; on an error or an interrupt (Ctrl-C) they are cancelled first."""
    try:
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def _close_owned(owned) -> None:
    """Close a client and the ``LocalCluster`` started for a fit (:func:`get_client`)."""
    client, cluster = owned
    client.close()
    cluster.close()


# ====================================================================== the design on the driver
@dataclass(frozen=True)
class Weighting:
    """What the driver knows of the weights of a design held in blocks (the rows' weights stay on the workers).

    Attributes
    ----------
    group_weights : ndarray (J,) or None
        The level-2 weights, one per school (``None``: all one).
    nobs_weighted : float
        :math:`\\sum_j W_j \\sum_i w_{ij}`, the sum of the blocks' own.
    """

    group_weights: np.ndarray | None
    nobs_weighted: float


class ColumnSummary:
    """Stands in for a design matrix held by the workers: per column its mean, minimum, maximum
    and SD (``M[:, j].mean()``, ``.min()``, ``.max()``, ``numpy.std(M[:, j], ddof=...)``), what
    the MIXREGLS descriptives (:func:`mlsml.mixregls.report.describe_data`) print. Anything that
    needs the values raises :class:`~mlsml.DataError`.
    """

    def __init__(self, moments: ColumnMoments, name: str, column: int | None = None):
        self._m, self._name, self._col = moments, name, column

    @property
    def shape(self) -> tuple:
        """``(N, k)``, or ``(N,)`` for one column."""
        return (self._m.n,) if self._col is not None else (self._m.n, len(self._m.mean))

    @property
    def size(self) -> int:
        """Number of values."""
        return int(np.prod(self.shape))

    def __getitem__(self, key):
        rows, col = key if isinstance(key, tuple) else (key, None)
        if not (isinstance(rows, slice) and rows == slice(None)):
            raise DataError(f"the rows of {self._name} are held by the Dask workers, not the driver")
        return self if col is None else ColumnSummary(self._m, self._name, int(col))

    def _pick(self, a: np.ndarray):
        return float(a[self._col]) if self._col is not None else a.copy()

    def mean(self, *args, **kwargs):
        """Column mean(s)."""
        return self._pick(self._m.mean)

    def min(self, *args, **kwargs):
        """Column minimum (minima)."""
        return self._pick(self._m.lo)

    def max(self, *args, **kwargs):
        """Column maximum (maxima)."""
        return self._pick(self._m.hi)

    def std(self, axis=None, dtype=None, out=None, ddof=0, **kwargs):
        """Column standard deviation(s) with ``ddof``."""
        return self._pick(np.sqrt(self._m.m2 / max(self._m.n - ddof, 1)))

    def __array__(self, *args, **kwargs):
        raise DataError(f"the values of {self._name} are held by the Dask workers, not the driver")


@dataclass(frozen=True)
class SchoolCovariates:
    """What the driver knows of the ``bs_formula`` design of a design held in blocks (J x m numbers).

    Attributes
    ----------
    covariates : ndarray (J, m)
        Every school's covariates (:meth:`mlsml.design.Design.school_bs_covariates`: the
        school-level columns and the school's mean of each level-1 column), in the order of
        the design's ``group_labels``.
    level1 : ndarray (m,) of bool or None
        Which columns are level-1 (``None``: none is).
    """

    covariates: np.ndarray
    level1: np.ndarray | None


class DistributedDesign:
    """Stands in for a :class:`~mlsml.design.Design` whose rows are held by Dask workers.

    It knows the schools (``counts``, ``group_labels`` in the order of the in-memory design),
    the layout, ``info`` and the moments of the columns (:class:`DesignMoments`); asking for the
    arrays raises :class:`~mlsml.DataError`. Its standardised copy (:meth:`reparametrise`) is
    the same blocks with :class:`Standardisation` applied on the workers.
    """

    def __init__(self, layout, counts, group_labels, info, blockset, moments, block_schools, transform=None, weighting=None, bs=None):
        self.layout = layout
        self.counts = np.asarray(counts, dtype=np.intp)
        self.group_labels = np.asarray(group_labels)
        self.info = info
        self.blockset = blockset
        self.moments = moments
        self.block_schools = block_schools  # per block: positions of its schools in group_labels
        self.transform = transform
        self.weighting = weighting  # the driver's part of the weights (Weighting), or None
        self.bs = bs  # the driver's part of the bs_formula design (SchoolCovariates), or None
        self._reparametrisation = None  # computed once: its copy is kept by the workers

    @property
    def nobs(self) -> int:
        """Number of observations."""
        return int(self.counts.sum())

    @property
    def ngroups(self) -> int:
        """Number of schools."""
        return int(self.counts.size)

    #: The level-1 weights and the offsets are held by the workers (``info["weights"]``,
    #: ``info["offset"]``, ``info["scale_offset"]`` name their columns).
    weights = offset = scale_offset = None

    @property
    def weighted(self) -> bool:
        """Whether the likelihood weights observations or schools (:attr:`mlsml.design.Design.weighted`)."""
        return self.weighting is not None

    @property
    def group_weights(self) -> np.ndarray | None:
        """The level-2 weights, one per school in the order of :attr:`group_labels` (``None``: all one)."""
        return None if self.weighting is None else self.weighting.group_weights

    @property
    def nobs_weighted(self) -> float:
        """The total weight of the observations (:attr:`mlsml.design.Design.nobs_weighted`, summed over blocks)."""
        return float(self.nobs) if self.weighting is None else self.weighting.nobs_weighted

    @property
    def y(self) -> ColumnSummary:
        """The response's mean, minimum, maximum and SD (:class:`ColumnSummary`), not its values."""
        return ColumnSummary(self.moments.y, "y")

    @property
    def X(self) -> ColumnSummary:
        """The mean design's column summaries (:class:`ColumnSummary`)."""
        return ColumnSummary(self.moments.X, "X")

    @property
    def W(self) -> ColumnSummary:
        """The scale design's column summaries (:class:`ColumnSummary`)."""
        return ColumnSummary(self.moments.W, "W")

    @property
    def Z(self) -> ColumnSummary:
        """The random-effects design's column summaries (:class:`ColumnSummary`)."""
        return ColumnSummary(self.moments.Z, "Z")

    @property
    def G(self) -> ColumnSummary | None:
        """The column summaries of the design of the scale effects (``scale_re_formula``), or ``None``."""
        return None if self.moments.G is None else ColumnSummary(self.moments.G, "G")

    @property
    def S(self):
        """``None`` without ``bs_formula``; with it the rows stay on the workers (:meth:`school_bs_covariates`)."""
        if self.bs is None:
            return None
        raise DataError(
            "the data of a Dask fit stay on the workers: the design's 'S' is not on the driver "
            "(school_bs_covariates() gives every school's bs_formula covariates)"
        )

    @property
    def bs_rows(self) -> ColumnSummary | None:
        """The column summaries of the rows' ``bs_formula`` design (:attr:`mlsml.design.Design.bs_rows`), or ``None``."""
        return None if self.moments.Srows is None else ColumnSummary(self.moments.Srows, "the bs_formula design")

    @property
    def S_level1_columns(self) -> np.ndarray | None:
        """Which ``bs_formula`` columns are level-1 (:attr:`mlsml.design.Design.S_level1_columns`), decided over all blocks."""
        return None if self.bs is None else self.bs.level1

    def school_bs_covariates(self) -> np.ndarray | None:
        """Every school's ``bs_formula`` covariates (:meth:`mlsml.design.Design.school_bs_covariates`), gathered from the blocks."""
        return None if self.bs is None else self.bs.covariates

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise DataError(
            f"the data of a Dask fit stay on the workers: the design's {name!r} is not on the driver "
            "(use the results' methods, which run on the cluster)"
        )

    # ------------------------------------------------------------ requests
    def run(self, op: str, theta=None, nodes_at=None, spec=None, extra=None) -> list:
        """Replies of the non-empty blocks to one request (see :class:`Request`)."""
        th = None if theta is None else np.asarray(theta, dtype=float)
        at = None if nodes_at is None else np.asarray(nodes_at, dtype=float)
        return self.blockset.run(Request(op, th, at, spec, self.transform, extra, self.layout))

    def with_layout(self, layout: ParamLayout) -> DistributedDesign:
        """The same blocks evaluated under another layout (the core model of the warm start of
        :func:`mlsml.optimize._warm_start`; the blocks replace the layout of their designs)."""
        return DistributedDesign(
            layout,
            self.counts,
            self.group_labels,
            self.info,
            self.blockset,
            self.moments,
            self.block_schools,
            None,
            self.weighting,
            self.bs,
        )

    def with_moments(self) -> DistributedDesign:
        """This design with the moments of its own (standardised) blocks."""
        replies = [r for r in self.run("moments") if r is not None]
        moments = replies[0][0]
        for m, *_ in replies[1:]:
            moments = moments.merge(m)
        return DistributedDesign(
            self.layout,
            self.counts,
            self.group_labels,
            self.info,
            self.blockset,
            moments,
            self.block_schools,
            self.transform,
            self.weighting,
            self.bs,
        )

    def mean_log_variance_index(self, alpha) -> float:
        """The mean of ``W alpha`` (plus the scale offset) over rows (:meth:`mlsml.design.Design.mean_log_variance_index`)."""
        so = self.moments.so
        return float(self.column_means("W") @ np.asarray(alpha, dtype=float)) + (0.0 if so is None else float(so.mean[0]))

    def simulated(self, theta: np.ndarray, seed: int) -> DistributedDesign:
        """The same schools and covariates with a response drawn at ``theta`` on the workers (new blocks)."""
        bs = self.blockset
        token = uuid.uuid4().hex
        theta = np.asarray(theta, dtype=float)
        if bs.keep == "memory":
            blocks = bs.client.map(_simulated_block, bs.blocks, theta=theta, seed=int(seed), token=token, pure=False)
        else:
            blocks = [dask.delayed(_simulated_block, pure=False)(b, theta, int(seed), token) for b in bs.blocks]
        blockset = BlockSet(bs.client, blocks, bs.keep)
        return DistributedDesign(
            self.layout,
            self.counts,
            self.group_labels,
            self.info,
            blockset,
            None,
            self.block_schools,
            weighting=self.weighting,
            bs=self.bs,
        ).with_moments()

    def column_means(self, name: str) -> np.ndarray:
        """The mean of every column of ``X``, ``W`` or ``Z`` (see :meth:`mlsml.design.Design.column_means`)."""
        return getattr(self.moments, name).mean.copy()

    def mean_squares(self, name: str) -> np.ndarray:
        """The mean of the squares of every column (see :meth:`mlsml.design.Design.mean_squares`)."""
        m = getattr(self.moments, name)
        return m.sq / max(m.n, 1)

    def column_ranges(self, name: str) -> np.ndarray:
        """The minimum and the maximum of every column of ``X``, ``W`` or ``Z`` (two rows)."""
        m = getattr(self.moments, name)
        return np.vstack([m.lo, m.hi])

    def likelihood(self, spec: QuadratureSpec) -> DaskLikelihood:
        """The likelihood of the design under ``spec``, evaluated on the cluster."""
        return DaskLikelihood(self, spec)

    # ------------------------------------------------------------ standardisation
    def reparametrise(self) -> Reparametrisation:
        """:func:`mlsml.rescale.reparametrise` from the moments; the copy is standardised on the workers.

        The same maps as in memory (column minima, maxima, means and SDs; the response SD),
        with ``delta`` (``W delta = 2 ln sigma``) from the normal equations and checked on
        every block. Computed once per design (the workers keep one standardised copy).
        """
        if self._reparametrisation is None:
            self._reparametrisation = self._reparametrise()
        return self._reparametrisation

    def _reparametrise(self) -> Reparametrisation:
        lay = self.layout
        mo = self.moments
        bs = bool(lay.bs_terms)
        sigma = 1.0
        delta = np.zeros(lay.k)
        sd = float(mo.y.sd[0])
        if np.isfinite(sd) and sd > 0 and not bs:  # as in memory: y, Z and the school effects unscaled with bs_formula
            sigma = _power_of_two(sd)
        if sigma != 1.0:
            target = 2.0 * np.log(sigma)
            const = np.flatnonzero((mo.W.lo == mo.W.hi) & (mo.W.lo != 0))
            if const.size:
                delta[const[0]] = target / mo.W.lo[const[0]]
            else:
                delta = np.linalg.lstsq(mo.WtW, mo.Wt1 * target, rcond=None)[0]
                worst = max(r for r in self.run("check_delta", extra=(delta, target)) if r is not None)
                if not worst <= 1e-9 * abs(target):
                    sigma, delta = 1.0, np.zeros(lay.k)  # the constant is not in the span of W
        Px = column_map_from_stats(mo.X.lo, mo.X.hi, mo.X.mean, mo.X.sd)
        Pw = column_map_from_stats(mo.W.lo, mo.W.hi, mo.W.mean, mo.W.sd)
        PS = np.eye(lay.m)
        if bs and mo.S is not None:  # one row per school; with level-1 columns the rows' whole design
            Sm = mo.S if self.S_level1_columns is None else mo.Srows
            PS = column_map_from_stats(Sm.lo, Sm.hi, Sm.mean, Sm.sd)
        d = lay.d
        T = np.eye(d)
        if d and lay.q and not bs:
            T[: lay.q, : lay.q] = sigma * column_map_from_stats(mo.Z.lo, mo.Z.hi, mo.Z.mean, mo.Z.sd)
        if lay.scale_re_terms and mo.G is not None and not bs:
            T[lay.q :, lay.q :] = column_map_from_stats(mo.G.lo, mo.G.hi, mo.G.mean, mo.G.sd)
        if lay.fixed_cov:  # scaling only, as in memory: centring a column would move a fixed zero
            T = np.diag(np.diag(T))
        eye = all(np.array_equal(P, np.eye(P.shape[0])) for P in (Px, Pw, PS))
        if sigma == 1.0 and eye and np.array_equal(T, np.eye(d)):
            return Reparametrisation(self, 1.0, Px, Pw, PS, T, delta, identity=True)
        transform = Standardisation(sigma, Px, Pw, PS, T, uuid.uuid4().hex)
        std = DistributedDesign(
            self.layout,
            self.counts,
            self.group_labels,
            self.info,
            self.blockset,
            None,
            self.block_schools,
            transform,
            self.weighting,
            self.bs,
        )
        return Reparametrisation(std.with_moments(), sigma, Px, Pw, PS, T, delta, identity=False)

    # ------------------------------------------------------------ starting values
    def start_values(self, wide: bool = False) -> np.ndarray:
        """:func:`mlsml.start.start_values_core` of the design, from sums over the blocks;
        outside the core model (``association="quadratic"``) extended as
        :func:`mlsml.start.start_values_ext` does (:func:`mlsml.start.extended_start`).
        ``wide``: the wide start (:mod:`mlsml.start`)."""
        lay = self.layout
        if lay.quad_assoc or lay.scale_re_terms or lay.bs_terms:
            g2 = self.mean_squares("G") if lay.scale_re_terms and self.moments.G is not None else np.ones(lay.n_v)
            return extended_start(lay, self._core_start(core_layout(lay), wide), [float(v) for v in g2])
        return self._core_start(lay, wide)

    def _core_start(self, lay: ParamLayout, wide: bool = False) -> np.ndarray:
        """:func:`mlsml.start.start_values_core` of the design under the core layout ``lay``."""
        grams = [g for g in self.run("start_gram") if g is not None]
        XtX = sum(g[0] for g in grams)
        Xty = sum(g[1] for g in grams)
        beta = _least_squares_gram(XtX, Xty)
        parts = [p for p in self.run("start_resid", extra=beta) if p is not None]
        within = sum(p[0] for p in parts)
        rbar, rall = parts[0][1], parts[0][3]
        for p in parts[1:]:
            rbar, rall = rbar.merge(p[1]), rall.merge(p[3])
        inv_n = sum(p[2] for p in parts)
        dfw = max(self.nobs - self.ngroups, 1)
        s2e = float(within / dfw)
        if not np.isfinite(s2e) or s2e <= 0:
            s2e = float(rall.sd[0] ** 2) or 1.0
        s2u = school_variance_start(float(rbar.sd[0] ** 2), s2e, float(inv_n / self.ngroups), float(np.mean(self.counts)), wide)
        Wt_target = self.moments.Wt1 * np.log(s2e)
        if self.moments.Wtso is not None:  # least squares of log s2e - scale_offset on W
            Wt_target = Wt_target - self.moments.Wtso
        alpha = _least_squares_gram(self.moments.WtW, Wt_target)
        diag = []
        z2 = self.mean_squares("Z")
        for i in range(lay.q):
            zi = float(z2[i]) or 1.0
            diag.append(s2u / zi if i == 0 else 0.1 * s2u / zi)
        if lay.random_scale:
            diag.append(START_VAR_V)
        return lay.theta_from_parts(beta, alpha, np.diag(diag))

    # ------------------------------------------------------------ schools
    def to_global(self, per_block: list) -> np.ndarray:
        """Per-school arrays of the blocks (in block order) put in the order of :attr:`group_labels`."""
        first = next(a for a in per_block if a is not None)
        out = np.empty((self.ngroups,) + np.shape(first)[1:], dtype=np.asarray(first).dtype)
        for pos, a in zip(self.block_schools, per_block):
            if a is not None:
                out[pos] = a
        return out


def _least_squares_gram(G: np.ndarray, Atb: np.ndarray) -> np.ndarray:
    """:func:`mlsml.start.least_squares` from ``A'A`` and ``A'b`` (column-scaled normal equations)."""
    D = np.sqrt(np.diag(G))
    if G.shape[0] and np.all(D > 0) and np.all(np.isfinite(G)):
        Gs = G / np.outer(D, D)
        return np.linalg.lstsq(Gs, Atb / D, rcond=None)[0] / D if np.linalg.cond(Gs) >= 1e8 else np.linalg.solve(Gs, Atb / D) / D
    return np.linalg.lstsq(G, Atb, rcond=None)[0]


class DistributedIntegrand:
    """What the optimiser and the diagnostics ask of the integrand of a design held by workers."""

    def __init__(self, design: DistributedDesign, spec: QuadratureSpec):
        self.design = design
        self.layout = design.layout
        self.spec = spec

    @property
    def core(self) -> bool:
        """Whether the model is the core one (:attr:`mlsml.integrand.Integrand.core`; not with ``association="quadratic"``)."""
        lay = self.layout
        return not (lay.scale_re_terms or lay.bs_terms or lay.quad_assoc)

    @property
    def uexact_supported(self) -> bool:
        """As :attr:`mlsml.integrand.Integrand.uexact_supported`."""
        return bool(self.layout.random_scale and self.layout.q >= 1)

    def extra_singular_reasons(self, theta) -> list[str]:
        """:meth:`mlsml.integrand.Integrand.extra_singular_reasons`: with ``bs_formula`` the check of
        :func:`mlsml.integrand.bs_zero_variance_reasons` on the largest ``var(u0_j)`` of the blocks
        (each from :meth:`mlsml.integrand.Integrand.u0_variances`); none otherwise."""
        lay = self.layout
        if not lay.bs_terms:
            return []
        theta = np.asarray(theta, dtype=float)
        var0_max = max(r for r in self.design.run("u0_variance_max", theta, spec=self.spec) if r is not None)
        natural = np.asarray(lay.to_natural(theta), dtype=float)
        mean_log_var = self.design.mean_log_variance_index(natural[lay.p : lay.p + lay.k])
        return bs_zero_variance_reasons(var0_max, mean_log_var, float(self.design.mean_squares("Z")[0]))

    def start_values(self, wide: bool = False) -> np.ndarray:
        """The moment starting values (:meth:`DistributedDesign.start_values`)."""
        return self.design.start_values(wide)


@dataclass(frozen=True)
class RemoteNodes:
    """Nodes adapted at ``theta`` on the workers (each block's are placed and kept there)."""

    theta: np.ndarray


@dataclass(frozen=True, eq=False)
class DaskLikelihood:
    """The interface of :class:`mlsml.likelihood.Likelihood`, summed over blocks on a Dask cluster.

    Every method asks each block for its part (:class:`Request`) and sums: the value, the
    gradient and the Hessian are sums over schools. :meth:`adapt` returns a
    :class:`RemoteNodes` handle: the workers place each school's nodes at its ``theta``.

    Attributes
    ----------
    design : DistributedDesign
    spec : QuadratureSpec
    """

    design: DistributedDesign
    spec: QuadratureSpec

    # the rule: the same code as the in-memory likelihood
    layout = Likelihood.layout
    nagq = Likelihood.nagq
    rule = Likelihood.rule
    with_spec = Likelihood.with_spec
    as_product = Likelihood.as_product

    @property
    def integrand(self) -> DistributedIntegrand:
        """The driver's view of the integrand (:class:`DistributedIntegrand`)."""
        return DistributedIntegrand(self.design, self.spec)

    @property
    def closed_form(self) -> bool:
        """Whether the blocks use closed-form derivatives (the core model does: :attr:`mlsml.likelihood.Likelihood.closed_form`)."""
        return self.integrand.core

    def with_design(self, design: DistributedDesign) -> DaskLikelihood:
        """The same rule on another design (the standardised copy)."""
        return DaskLikelihood(design, self.spec)

    def with_layout(self, layout: ParamLayout, spec: QuadratureSpec) -> DaskLikelihood:
        """The same blocks under another layout and rule (:meth:`mlsml.likelihood.Likelihood.with_layout`)."""
        return DaskLikelihood(self.design.with_layout(layout), spec)

    def adapt(self, theta) -> RemoteNodes:
        """A handle on nodes adapted at ``theta`` (placed by the workers when first used)."""
        return RemoteNodes(np.array(theta, dtype=float))

    def _run(self, op: str, theta, nodes) -> list:
        at = None if nodes is None else nodes.theta
        return [r for r in self.design.run(op, theta, at, self.spec) if r is not None]

    def value(self, theta) -> float:
        """The adapted log-likelihood at ``theta``."""
        return float(sum(self._run("value", theta, None)))

    def at_nodes(self, theta, nodes: RemoteNodes) -> float:
        """The log-likelihood with nodes adapted at ``nodes.theta``."""
        return float(sum(self._run("value", theta, nodes)))

    def value_and_grad(self, theta, nodes: RemoteNodes | None = None) -> tuple[float, np.ndarray]:
        """The log-likelihood and its gradient (nodes held fixed), summed over blocks."""
        parts = self._run("value_and_grad", theta, nodes)
        return float(sum(v for v, _ in parts)), np.sum([g for _, g in parts], axis=0)

    def hessian(self, theta, nodes: RemoteNodes | None = None) -> np.ndarray:
        """The Hessian (nodes held fixed), summed over blocks."""
        return np.sum(self._run("hessian", theta, nodes), axis=0)

    def start_hessian(self, theta) -> np.ndarray:
        """:meth:`mlsml.likelihood.Likelihood.start_hessian`, summed over blocks."""
        return np.sum(self._run("start_hessian", theta, None), axis=0)

    def per_school(self, theta, nodes: RemoteNodes | None = None) -> np.ndarray:
        """``log L_j`` of every school, in the order of the design's ``group_labels``."""
        at = None if nodes is None else nodes.theta
        return self.design.to_global(self.design.run("per_school", theta, at, self.spec))

    def school_scores(self, theta, nodes: RemoteNodes | None = None) -> np.ndarray:
        """The score contributions of the schools, ``(J, n_params)`` (:func:`mlsml.robust.school_scores`, on each block).

        Each block returns its schools' rows (``p`` numbers per school, computed by the one
        engine on its worker, nodes adapted at ``nodes.theta`` or at ``theta``); the driver
        forms the sandwich (:func:`mlsml.robust.sandwich`).
        """
        at = np.asarray(theta, dtype=float) if nodes is None else nodes.theta
        return self.design.to_global(self.design.run("school_scores", theta, at, self.spec))


# ====================================================================== building the design
def _check_formulas(formulas: dict) -> None:
    """Refuse what one pass over partitions cannot fit exactly (see the module docstring)."""
    for name, f in formulas.items():
        if f is None:
            continue
        for t in STATEFUL_TRANSFORMS:
            if re.search(rf"(?<![\w.]){t}\s*\(", f):
                raise ModelSpecError(
                    f"{name} {f!r} uses {t}(...), whose state (means, SDs, knots) patsy learns from the whole column: "
                    "on a Dask cluster compute the transformed column first (e.g. with the data's own mean and SD) "
                    "and use it in the formula"
                )


def build_distributed_design(
    formula: str,
    data,
    groups,
    scale_formula: str | None = "~ 1",
    re_formula: str | None = "~ 1",
    random_scale: bool = True,
    missing: str = "drop",
    scale_re_formula: str | None = None,
    bs_formula: str | None = None,
    client=None,
    association: str = "linear",
    cov_constraints=None,
    offset=None,
    scale_offset=None,
    weights=None,
    group_weights=None,
    weights_kind: str = "sampling",
    weights_scale: str | None = None,
    missing_code: float | None = None,
    drop_constant_groups: bool = False,
) -> tuple[DistributedDesign, FormulaSpec]:
    """The design of a model whose data are a Dask DataFrame or Parquet files (the arrays stay on the workers).

    The checks and messages of :func:`mlsml.design.build_design`, from one pass over the
    partitions (:func:`_learn`), then one building the blocks (:func:`_build_block`) and their
    moments. ``association`` and ``cov_constraints`` constrain the layout
    (:func:`mlsml.params.constrain`) before the blocks are built, so every block evaluates
    the constrained model (``association="quadratic"`` too: its starting values need only
    the moments, :meth:`DistributedDesign.start_values`). ``offset`` and
    ``scale_offset`` name columns of the data, read and checked on the workers (as
    :func:`mlsml.weights.with_weights_and_offsets` does in memory); so do ``weights`` and
    ``group_weights`` (``group_weights`` also a mapping ``{school: weight}``), checked and
    scaled within each school on the workers by the functions of :mod:`mlsml.weights`
    (:func:`_block_weights`). ``missing_code`` is applied on the workers as in memory;
    ``drop_constant_groups`` is decided on the driver from every partition's per-school
    response ranges (a school split across partitions judged on all its rows), and the schools
    found are dropped by every block (:attr:`Plan.dropped_schools`). Returns the driver's
    :class:`DistributedDesign` and the :class:`FormulaSpec` (whose ``frame`` is the
    prototype the formulas were evaluated on).
    """
    source = data if isinstance(data, DaskData) else DaskData(data)
    formulas = {
        "formula": formula,
        "scale_formula": scale_formula,
        "re_formula": re_formula,
        "scale_re_formula": scale_re_formula,
        "bs_formula": bs_formula,
    }
    check_no_lme4_terms(formulas, groups=groups, random_scale=random_scale)
    check_formula_sides(formulas)
    if not isinstance(missing, str) or missing not in ("drop", "raise"):
        raise ModelSpecError(f"missing must be 'drop' or 'raise', not {describe_value(missing)}")
    if not isinstance(random_scale, bool | np.bool_):
        raise ModelSpecError(f"random_scale must be True or False, not {describe_value(random_scale)}")
    _check_formulas(formulas)
    constraints = (association, cov_constraints)
    ddf = _dask_frame(source.source)
    meta = pd.DataFrame(columns=list(ddf.columns))
    if not isinstance(groups, Hashable) or groups not in meta.columns:
        raise ModelSpecError(
            f"groups must name a column of the Dask data (columns: {', '.join(map(str, meta.columns[:20]))}), "
            f"not {describe_value(groups)}"
        )
    scale_formula = _rhs("~ 1" if scale_formula is None else scale_formula)
    re_formula = _rhs("~ 1" if re_formula is None else re_formula)
    response = formula.split("~", 1)[0].strip()
    _check_formula_names(formula, meta, "the mean formula")
    _check_formula_names(scale_formula, meta, "the scale formula")
    _check_formula_names(re_formula, meta, "the random-effects formula")
    sre_formula = None if scale_re_formula is None else _rhs(scale_re_formula)
    if sre_formula is not None:
        _check_formula_names(sre_formula, meta, "the scale random-effects formula")
    bs_rhs = None if bs_formula is None else _rhs(bs_formula)
    if bs_rhs is not None:
        _check_formula_names(bs_rhs, meta, "the between-school variance formula")
    extras = tuple(f for f in (sre_formula, bs_rhs) if f is not None)
    used: list = []
    for f in (formula, scale_formula, re_formula) + extras:
        for c in formula_columns(f, meta):
            if c not in used:
                used.append(c)
    if groups not in used:
        used.append(groups)
    dup = meta.columns[meta.columns.duplicated()]
    if any(c in set(dup) for c in used):
        raise DataError(f"the data has duplicate columns named {[c for c in used if c in set(dup)][0]!r}")
    in_c = frozenset(re.findall(r"C\(\s*([^\W\d][\w\.]*)", formula + scale_formula + re_formula + "".join(extras)))
    items = ((formula, "mean formula"), (scale_formula, "scale formula"), (re_formula, "random-effects formula"))
    if sre_formula is not None:
        items += ((sre_formula, SCALE_RE_WHAT),)
    if bs_rhs is not None:
        items += ((bs_rhs, BS_WHAT),)
    offsets = []
    for what, column in (("offset", offset), ("scale_offset", scale_offset)):
        if column is None:
            continue
        if not isinstance(column, str):
            raise ModelSpecError(
                f"on a Dask cluster {what} must name a column of the data (values given as {describe_value(column)} "
                "cannot be matched to the rows of the partitions)"
            )
        if column not in meta.columns:
            raise ModelSpecError(f"{what}={column!r} is not a column of the data (columns: {', '.join(map(str, meta.columns[:20]))})")
        offsets.append((what, column))
    weights_scale = check_weight_options(weights_kind, weights_scale)
    if missing_code is not None:
        apply_missing_code(meta, missing_code)  # the check of the value (a finite number)
    for what, value in (("weights", weights), ("group_weights", group_weights)):
        if value is None or (what == "group_weights" and isinstance(value, Mapping)):
            continue
        if not isinstance(value, str):  # a Series too: in memory one indexed like the data is per row
            raise ModelSpecError(
                f"on a Dask cluster {what} must name a column of the data"
                + (" (or be a dict {school: weight}, e.g. series.to_dict())" if what == "group_weights" else "")
                + f" (values given as {describe_value(value)} cannot be matched to the rows of the partitions)"
            )
        if value not in meta.columns:
            raise ModelSpecError(f"{what}={value!r} is not a column of the data (columns: {', '.join(map(str, meta.columns[:20]))})")
    plan = Plan(
        items,
        groups,
        tuple(used),
        response,
        in_c,
        offsets=tuple(offsets),
        weights=weights,
        group_weights=group_weights,
        weights_kind=weights_kind,
        weights_scale=weights_scale,
        missing_code=missing_code,
        drop_constant=bool(drop_constant_groups),
    )

    client, owned = get_client(client)
    try:
        return _build(source, ddf, plan, missing, random_scale, constraints, client, owned)
    except BaseException:
        if owned is not None:
            owned[0].close()
            owned[1].close()
        raise


def _build(source: DaskData, ddf, plan: Plan, missing: str, random_scale: bool, constraints: tuple, client, owned):
    # ---- pass 1: learn the design from every partition
    workers = len(client.scheduler_info()["workers"])
    ddf, parts = _input_partitions(ddf[plan.read], workers)
    if len(parts) < workers:  # fewer blocks than workers: spread the schools over the workers
        ddf = ddf.shuffle(on=plan.groups, npartitions=workers)
        if source.keep == "memory":  # shuffled once for both passes (small data: fewer partitions than workers)
            ddf = client.persist(ddf)
        parts = ddf.to_delayed()
    learned = _gather(client, client.compute([dask.delayed(_learn)(p, plan) for p in parts]))
    _report_missing(learned, plan, missing)
    if plan.drop_constant:
        constant = _constant_schools(learned, plan)
        if constant:  # learned again without them: the levels and schools of the rows kept
            plan = dataclasses.replace(plan, dropped_schools=tuple(constant))
            learned = _gather(client, client.compute([dask.delayed(_learn)(p, plan) for p in parts]))
    categories = _categories(learned)
    schools = [(lab, i) for i, s in enumerate(learned) for lab in s["labels"]]
    split = _split_school(schools)
    if split is not None:
        label, where = split
        if source.split_schools == "raise":
            raise DataError(
                f"school {label!r} of {plan.groups!r} has rows in partitions {where[0]} and {where[1]}: each school must be "
                "in one partition (repartition by school, e.g. ddf.shuffle(on=...), or pass "
                "mlsml.distributed.DaskData(data, split_schools='shuffle'))"
            )
        ddf = ddf.shuffle(on=plan.groups, npartitions=len(parts))
        parts = ddf.to_delayed()
    if source.npartitions is not None and source.npartitions < len(parts):
        ddf = ddf.repartition(npartitions=source.npartitions)  # neighbours merged: schools stay whole
        parts = ddf.to_delayed()
    samples = [s["sample"] for s in learned if s["sample"].shape[0]]
    if not samples:
        raise DataError("no rows left after removing missing values")
    plan = dataclasses.replace(plan, categories=categories)
    prototype = _prototype(samples[0], learned, plan)
    ((ydf, Xdf), mean_spec), (Wdf, scale_spec), (Zdf, re_spec), *rest = _materialise_together(list(plan.formulas), prototype)
    extra = dict(zip((what for _, what in plan.formulas[3:]), rest))
    sre = extra.get(SCALE_RE_WHAT)
    scale_re_terms: tuple = ()
    if sre:  # as extra_designs in memory: an intercept alone is the core model's random scale
        names = [display_name(str(c), plan.groups) for c in sre[0].columns]
        if not names:
            raise ModelSpecError("scale_re_formula has no terms")
        if names != ["Intercept"]:
            scale_re_terms = tuple(names)
    bs_terms: tuple = ()
    if BS_WHAT in extra:
        bs_terms = tuple(display_name(str(c), plan.groups) for c in extra[BS_WHAT][0].columns)
        if not bs_terms:
            raise ModelSpecError("bs_formula has no terms: it needs at least an intercept ('~ 1')")
    if ydf.shape[1] != 1:
        raise ModelSpecError(f"the response of {plan.formulas[0][0]!r} must be a single numeric column")
    layout = ParamLayout(
        mean_terms=tuple(str(c) for c in Xdf.columns),
        scale_terms=tuple(str(c) for c in Wdf.columns),
        n_re_mean=Zdf.shape[1],
        random_scale=bool(random_scale) or SCALE_RE_WHAT in extra,
        scale_re_terms=scale_re_terms,
        bs_terms=bs_terms,
    )
    if layout.d == 0:
        raise ModelSpecError("the model has no school effects: give re_formula and/or random_scale=True")
    if layout.p == 0:
        raise ModelSpecError("the mean formula has no terms (not even an intercept)")
    if layout.k == 0:
        raise ModelSpecError("the scale formula has no terms: it needs at least an intercept ('~ 1')")
    check_extended_layout(layout)
    layout = constrain(layout, *constraints)
    plan = dataclasses.replace(plan, prototype=prototype, layout=layout, token=uuid.uuid4().hex)

    # ---- pass 2: the blocks, built on the workers, and their moments
    graphs = [dask.delayed(_build_block, pure=False)(p, plan, f"{plan.token}-{i}") for i, p in enumerate(parts)]
    blocks = client.compute(graphs) if source.keep == "memory" else graphs
    blockset = BlockSet(client, blocks, source.keep, owned)
    level1 = None
    if layout.bs_terms:  # which bs_formula columns vary within some school, decided over all blocks
        flags = [f for f in blockset.run(Request("bs_level1", None, None, None, None)) if f is not None]
        level1 = np.logical_or.reduce(flags)
        if source.keep == "memory":
            blocks = client.map(_classified_block, blocks, level1=level1, pure=False)
        else:
            blocks = [dask.delayed(_classified_block, pure=False)(b, level1) for b in blocks]
        blockset.blocks = blocks
        level1 = level1 if level1.any() else None
    replies = blockset.run(Request("moments", None, None, None, None))
    keep = [i for i, r in enumerate(replies) if r is not None]
    blockset.blocks = [blocks[i] for i in keep]
    replies = [replies[i] for i in keep]
    moments = replies[0][0]
    for m, *_ in replies[1:]:
        moments = moments.merge(m)
    labels = np.concatenate([r[1] for r in replies])
    counts = np.concatenate([r[2] for r in replies])
    codes, uniques = pd.factorize(pd.Series(labels), sort=True)
    if len(uniques) != len(labels):
        raise DataError("a school is in more than one block after the shuffle (an internal error: please report it)")
    J = len(uniques)
    if J < 2:
        raise DataError(f"the grouping column {plan.groups!r} has {J} distinct value(s); at least two groups are needed")
    global_counts = np.empty(J, dtype=np.intp)
    global_counts[codes] = counts
    offsets = np.cumsum([0] + [len(r[1]) for r in replies])
    block_schools = [codes[offsets[i] : offsets[i + 1]] for i in range(len(replies))]
    re_terms = tuple(str(c) for c in Zdf.columns)
    _check_design(moments, layout, plan, re_terms)
    bs = None
    if layout.bs_terms:
        covariates = np.empty((J, layout.m))
        covariates[codes] = np.concatenate([r[6] for r in replies])
        covariates.setflags(write=False)
        bs = SchoolCovariates(covariates, level1)
    digests = np.empty(J, dtype="S8")
    digests[codes] = np.concatenate([r[3] for r in replies])
    n_dropped = sum(s["dropped"] for s in learned)
    info = {
        "response": plan.response,
        "n_dropped": int(n_dropped),
        "constant_groups_dropped": plan.dropped_schools,
        "n_singletons": int((global_counts == 1).sum()),
        "re_terms": re_terms,
        "partitions": len(blockset.blocks),
        # the response's fingerprint (mlsml.compare.lrtest): of the schools' sorted responses, not of
        # y in row order (which the driver never sees), so the same for any partitioning of the data
        "response_sha256": "dask-" + hashlib.sha256(digests.tobytes()).hexdigest(),
    }
    for what, column in plan.offsets:  # as with_weights_and_offsets: named, and read from newdata by predictions
        info[what] = f"column {column!r}"
        info[f"{what}_column"] = column
    weighting = _weighting(plan, replies, codes, J, info) if plan.weighted else None
    design = DistributedDesign(
        layout, global_counts, np.asarray(uniques), info, blockset, moments, block_schools, weighting=weighting, bs=bs
    )
    spec = FormulaSpec(
        formula=plan.formulas[0][0],
        scale_formula=plan.formulas[1][0],
        re_formula=plan.formulas[2][0],
        groups=plan.groups,
        mean_spec=mean_spec,
        scale_spec=scale_spec,
        re_spec=re_spec,
        response=plan.response,
        scale_re_formula=next((f for f, what in plan.formulas if what == SCALE_RE_WHAT), None),
        bs_formula=next((f for f, what in plan.formulas if what == BS_WHAT), None),
        frame=prototype,
    )
    return design, spec


def _weighting(plan: Plan, replies: list, codes: np.ndarray, J: int, info: dict) -> Weighting:
    """The driver's :class:`Weighting` from the blocks' replies, and ``info["weights"]`` as in memory.

    The global decisions of :func:`mlsml.weights.with_weights_and_offsets`: some school's
    weight must be positive (checked over all schools here), and the replicated data of
    frequency weights counts :math:`\\sum_j W_j \\sum_i w_{ij}` observations in
    :math:`\\sum_j W_j` schools (sums of the blocks' parts).
    """
    described: dict = {"kind": plan.weights_kind}
    if plan.weights is not None:
        described.update(level1=f"column {plan.weights!r}", scale=plan.weights_scale)
    Wj = None
    if plan.group_weights is not None:
        name = f"column {plan.group_weights!r}" if isinstance(plan.group_weights, str) else "group_weights"
        Wj = np.empty(J)
        Wj[codes] = np.concatenate([r[4] for r in replies])
        check_some_school_weight(Wj, name)
        Wj.setflags(write=False)
        described["level2"] = name
    nobs_weighted = float(sum(r[5] for r in replies))
    if plan.weights_kind == "frequency":
        described.update(frequency_counts(nobs_weighted, np.ones(J) if Wj is None else Wj))
    info["weights"] = described
    return Weighting(Wj, nobs_weighted)


def _input_partitions(ddf, workers: int) -> tuple[Any, list]:
    """The frame to build from and its partitions as Dask delayed objects (the frame optimised).

    Dask's optimiser fuses Parquet files whose projected columns are small into fewer
    partitions (for Model 3 the two 500,000-row files of 1M pupils became one). When that
    leaves fewer partitions than workers, each input partition is taken on its own instead
    (still reading only the used columns): every worker gets schools without a shuffle.
    """
    fused = ddf.optimize()
    if fused.npartitions >= workers or ddf.npartitions <= fused.npartitions:
        return fused, fused.to_delayed()
    return ddf, [ddf.partitions[i].to_delayed()[0] for i in range(ddf.npartitions)]


def _report_missing(learned: list[dict], plan: Plan, missing: str) -> None:
    """The missing-value warning (or error) of :func:`mlsml.design.build_design`, over all partitions."""
    per_col: dict = {}
    for s in learned:
        for c, n in s["bad"].items():
            per_col[c] = per_col.get(c, 0) + n
    dropped = sum(s["dropped"] for s in learned)
    if not dropped:
        return
    rows = sum(s["rows"] for s in learned)
    desc = ", ".join(f"{c!r}: {per_col[c]}" for c in plan.used if c in per_col)
    coded: dict = {}
    for s in learned:
        for c, n in s["coded"].items():
            coded[c] = coded.get(c, 0) + n
    if coded:
        desc += f"; of these, values equal to missing_code={plan.missing_code!r}: " + ", ".join(
            f"{c!r}: {coded[c]}" for c in plan.used if c in coded
        )
    if missing == "raise":
        first = next(s["first_bad"] for s in learned if s["first_bad"] is not None)
        raise DataError(
            f"missing or non-finite values in {dropped} rows (per column: {desc}); first at index {first!r}. "
            "Pass missing='drop' for listwise deletion."
        )
    warn(
        f"listwise deletion: dropped {dropped} of {rows} rows with missing or non-finite values (per column: {desc})",
        MissingDataWarning,
    )


def _constant_schools(learned: list[dict], plan: Plan) -> list:
    """``drop_constant_groups``: the schools whose response is constant over all their rows (all
    partitions), in the order they first occur, with the warning (or error) of the in-memory build
    (:func:`mlsml.design.report_constant_groups`)."""
    ranges = [s["ranges"] for s in learned if s["ranges"] is not None and len(s["ranges"])]
    if not ranges or any(s["ranges"] is None and s["labels"].size for s in learned):
        return []  # no rows, or a response that is not numeric: the checks of the build say so
    both = pd.concat(ranges)
    g = both.groupby(level=0, sort=False)
    merged = pd.DataFrame({"min": g["min"].min(), "max": g["max"].max()})
    labels = list(merged.index[(merged["min"] == merged["max"]).to_numpy()])
    if not labels:
        return []
    counts = pd.Series(np.concatenate([s["counts"] for s in learned])).groupby(np.concatenate([s["labels"] for s in learned])).sum()
    report_constant_groups(labels, len(merged), int(counts.loc[labels].sum()), plan.response, plan.groups)
    return [v.item() if isinstance(v, np.generic) else v for v in labels]


def _categories(learned: list[dict]) -> dict:
    """Text columns -> the sorted union of their values; categorical columns -> their categories."""
    kinds: dict = {}
    values: dict = {}
    for s in learned:
        for c, (kind, vals) in s["levels"].items():
            kinds.setdefault(c, kind)
            if kind == "categorical":
                seen = values.setdefault(c, [])
                seen.extend(v for v in vals if v not in seen)
            else:
                values.setdefault(c, set()).update(vals)
    out = {}
    for c, kind in kinds.items():
        if kind == "text":
            out[c] = tuple(pd.Categorical(list(values[c])).categories)
        elif kind == "categorical":
            out[c] = tuple(values[c])
    return out


def _prototype(sample: pd.DataFrame, learned: list[dict], plan: Plan) -> pd.DataFrame:
    """A few rows covering every level of every categorical column (patsy learns the design from them)."""
    levels: dict = {}
    for s in learned:
        for c, (kind, vals) in s["levels"].items():
            if kind == "values":
                levels.setdefault(c, set()).update(vals)
    cover = {c: plan.categories[c] for c in plan.categories}
    cover.update({c: tuple(sorted(v)) for c, v in levels.items()})
    n = max([len(v) for v in cover.values()] + [1])
    proto = pd.concat([sample] * n, ignore_index=True)
    for c, vals in cover.items():
        cycled = list(itertools.islice(itertools.cycle(vals), n)) if vals else [sample[c].iloc[0]] * n
        if c in plan.categories:
            proto[c] = pd.Categorical(cycled, categories=plan.categories[c])
        else:
            proto[c] = np.asarray(cycled, dtype=sample[c].dtype)
    return proto


def _split_school(schools: list[tuple]) -> tuple | None:
    """The first school found in two partitions, with the two partitions, or ``None``."""
    seen: dict = {}
    for label, part in schools:
        if label in seen and seen[label] != part:
            return (label.item() if isinstance(label, np.generic) else label), (seen[label], part)
        seen.setdefault(label, part)
    return None


def _check_design(m: DesignMoments, layout: ParamLayout, plan: Plan, re_terms: tuple) -> None:
    """The column and response checks of :func:`mlsml.design.build_design`, from the moments."""
    if m.y.lo[0] == m.y.hi[0]:
        raise DataError(f"the response {plan.response!r} is constant ({m.y.lo[0]!r})")
    if m.varying_schools == 0:
        raise DataError(
            f"the response {plan.response!r} does not vary within any group of {plan.groups!r}: "
            "the residual variance cannot be estimated"
        )
    checks = [
        ("the mean design", m.X, m.XtX, layout.mean_terms),
        ("the scale design", m.W, m.WtW, layout.scale_terms),
        ("the random-effects design", m.Z, m.ZtZ, re_terms),
    ]
    if layout.bs_terms and m.Srows is not None:
        checks.append(("the between-school variance design", m.Srows, m.StS, layout.bs_terms))
    for what, cm, G, names in checks:
        names = list(names)
        if "Intercept" in names:
            for j, name in enumerate(names):
                if name != "Intercept" and cm.lo[j] == cm.hi[j]:
                    raise ModelSpecError(
                        f"{what} column {name!r} is constant (all values {cm.lo[j]!r}); it is collinear "
                        "with the intercept -- remove it from the formula"
                    )
        _check_gram_rank(G, cm.n, names, what)


def _check_gram_rank(G: np.ndarray, n: int, names: list, what: str) -> None:
    """Rank deficiency from the Gram matrix: the first column whose column-scaled leading Gram
    block has an eigenvalue at the rounding level of its largest (``N p eps``).

    The in-memory check (:func:`mlsml.design._check_columns`) ends with an SVD of the design,
    which a design held in blocks does not have; with the Gram matrix only, columns that are
    collinear up to the rounding of the Gram matrix count as dependent.
    """
    p = G.shape[0]
    if p == 0:
        return
    norm = np.sqrt(np.diag(G))
    norm[norm == 0] = 1.0
    C = G / np.outer(norm, norm)
    tol = n * p * np.finfo(float).eps  # the rounding of the Gram matrix: below it a column adds nothing
    for j in range(1, p + 1):
        eig = np.linalg.eigvalsh(C[:j, :j])
        if not eig[0] > tol * max(eig[-1], 1e-300):
            raise ModelSpecError(
                f"{what} is rank deficient: column {names[j - 1]!r} is a linear combination "
                f"of earlier columns ({', '.join(map(repr, names[: j - 1]))})"
            )


# ====================================================================== results
class _BlockModel:
    """The model of one block on its worker: what the in-memory results' methods read of a model."""

    def __init__(self, design: Design, formula_spec: FormulaSpec):
        self.design = design
        self.formula_spec = formula_spec

    @property
    def layout(self) -> ParamLayout:
        """Parameter names and sizes."""
        return self.design.layout

    @property
    def param_names(self) -> list[str]:
        """Natural-scale parameter names."""
        return list(self.layout.names)


def _block_results(design: Design, lik: Likelihood, state: tuple) -> MELSMResults:
    """The fit's results restricted to one block's schools (the global estimates and covariance).

    With ``cov_type="robust"`` the fit's sandwich (over all schools) replaces the block's
    model-based covariance, so that the school tables' standard errors are the in-memory ones.
    """
    formula_spec, optsum, diagnostics, cov_type, cov, cov_theta = state
    res = MELSMResults.build(_BlockModel(design, formula_spec), lik, optsum, diagnostics, cov_type="nonrobust")
    if cov_type != "nonrobust":
        res = dataclasses.replace(res, cov_type=cov_type, _cov=cov, _cov_theta=cov_theta)
    return res


def _block_seed(seed, design: Design) -> list[int]:
    """A block's random stream: the fit's seed and its first school (the same for the same blocks)."""
    return [int(seed), zlib.crc32(repr(design.group_labels[0]).encode())]


def _random_effects_block(block, design, lik, state, cov):
    return _schools.random_effects(_block_results(design, lik, state), cov=cov)


def _school_effects_block(block, design, lik, state, w, level, z, ndraws, seed, sbar):
    res = _block_results(design, lik, state)
    seed = _block_seed(seed, design)
    return _schools.school_effects(res, w=w, level=level, z=z, ndraws=ndraws, seed=seed, return_draws=True, sbar=sbar)


def _predict_block(block, design, lik, state, kind, conditional):
    return _predict(_block_results(design, lik, state), None, kind=kind, conditional=conditional)


def _get_prediction_block(block, design, lik, state, kind, conditional):
    return _get_prediction(_block_results(design, lik, state), None, kind=kind, conditional=conditional)


def _predict_new_block(block, design, lik, state, rows, kind):
    """Conditional predictions of new rows of the block's own schools (the in-memory code)."""
    return _predict(_block_results(design, lik, state), rows, kind=kind, conditional=True)


def _get_prediction_new_block(block, design, lik, state, rows, kind):
    """:func:`_predict_new_block` with standard errors (the in-memory code, the fit's covariance)."""
    return _get_prediction(_block_results(design, lik, state), rows, kind=kind, conditional=True)


def _resid_block(block, design, lik, state):
    fitted = _predict(_block_results(design, lik, state), None, kind="mean", conditional=True)
    y = np.empty(design.nobs)
    y[design.order] = design.y  # the block's rows in their order in the partition
    return pd.Series(y - fitted.to_numpy(), index=fitted.index, name="resid")


def _tail_schools_block(block, design, lik, state):
    return _tail_schools(_block_results(design, lik, state))


def _prediction_sums(block, design, lik, state, wbar, zbar, gbar):
    """A block's sums of ``m, v, m^2, v^2, m v`` over its schools and their Jacobian in ``theta``."""
    res = _block_results(design, lik, state)
    predictions = _schools.school_predictions(res, wbar, zbar, gbar)

    def sums(theta):
        m, v = predictions(theta)
        return anp.stack([anp.sum(m), anp.sum(v), anp.sum(m * m), anp.sum(v * v), anp.sum(m * v)])

    theta = np.asarray(res.theta, dtype=float)
    return np.asarray(sums(theta)), np.asarray(autograd.jacobian(sums)(theta))


def _simulate_block(block, design, lik, theta, n_reps, seed):
    draws = draw_responses(design, theta, np.random.default_rng(_block_seed(seed, design)), n_reps)
    out = np.empty_like(draws)
    out[:, design.order] = draws
    return pd.DataFrame(out.T, index=design.row_labels.copy(), columns=[f"y{r}" for r in range(n_reps)])


def _simulated_block(block: Block, theta: np.ndarray, seed: int, token: str) -> Block:
    """A block with a response drawn from the model at ``theta`` (:func:`mlsml.simulate.draw_responses`)."""
    design = block.design
    token = f"{token}-{block.token}"
    if design is None:
        return Block(None, token)
    y = draw_responses(design, theta, np.random.default_rng(_block_seed(seed, design)), 1)[0]
    return Block(design.with_response(y), token)


class DistributedResults(MELSMResults):
    """:class:`~mlsml.MELSMResults` of a fit on a Dask cluster.

    The estimates, standard errors, tests, diagnostics and summaries are those of the
    in-memory class, computed on the driver from what the workers returned. The methods that
    need the rows run on the cluster, block by block, with the fit's estimates and covariance:
    :meth:`random_effects` and :meth:`school_effects` return pandas frames (one row per
    school, in the order of the in-memory fit); :meth:`predict`, :attr:`fittedvalues`,
    :attr:`resid` and :meth:`simulate` return Dask collections (one partition per block), or
    write Parquet with ``path=``; :meth:`predict` and :meth:`get_prediction` of new rows
    (``newdata``) send each block only the new rows of its own schools; :meth:`bootstrap` refits simulated responses on the cluster.
    """

    @property
    def _design(self) -> DistributedDesign:
        return self.likelihood.design

    def _state(self) -> tuple:
        return (self.model.formula_spec, self.optsum, self.diagnostics, self.cov_type, self._cov, self._cov_theta)

    def _on_blocks(self, fn, *args) -> list:
        """``fn(block, design, likelihood, *args)`` on every block (the fit's rule), gathered."""
        return self._design.run("call", spec=self.rule, extra=(fn, args))

    def _lazy_blocks(self, fn, *args) -> list:
        """``fn(block, design, likelihood, *args)`` on every block, as Dask delayed objects."""
        req = Request("call", None, None, self.rule, None, (fn, args))
        return [dask.delayed(_evaluate, pure=False)(b, req) for b in self._design.blockset.blocks]

    def close(self) -> None:
        """Release the blocks held by the workers (and the cluster started for the fit, if any)."""
        self._design.blockset.close()

    # ------------------------------------------------------------ schools
    def random_effects(self, cov: bool = False):
        """Posterior means and SDs of the school effects (:meth:`mlsml.MELSMResults.random_effects`), on the cluster."""
        parts = self._on_blocks(_random_effects_block, self._state(), cov)
        if cov:
            frame = self._in_order([p[0] for p in parts])
            return frame, self._design.to_global([p[1] for p in parts])
        return self._in_order(parts)

    def school_effects(self, w=None, level: float = 0.95, z=None, ndraws: int = 1000, seed: int = 20190101) -> pd.DataFrame:
        """The school table (:meth:`mlsml.MELSMResults.school_effects`), computed block by block.

        Every column but the rank intervals is what the in-memory fit gives. The ranks are over
        all schools; the rank intervals come from posterior draws made on each block's worker
        (its own random stream, from ``seed`` and the block's first school), so they equal the
        in-memory ones in distribution, not draw by draw; with more than
        :data:`RANK_DRAWS_MAX` draws in all (schools x ``ndraws``) they are NaN.
        """
        design = self._design
        if w is None:
            w = design.column_means("W")
        if z is None and self.layout.q:
            z = design.column_means("Z")
        sbar = _schools.school_covariates(self, None)  # over all schools (bs_formula; else None)
        parts = self._on_blocks(_school_effects_block, self._state(), w, level, z, ndraws, seed, sbar)
        table = self._in_order([p[0] for p in parts])
        table.attrs = dict(parts[0][0].attrs, seed=seed)
        lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
        many = self.ngroups * int(ndraws) > RANK_DRAWS_MAX
        if many:
            warn(
                f"{self.ngroups} schools x {ndraws} draws exceed RANK_DRAWS_MAX = {RANK_DRAWS_MAX}: the rank intervals are NaN",
                ClusterWarning,
            )
        for prefix, point in (("mean", "mean"), ("var", "var")):
            draws = [p[1][prefix] for p in parts]
            if draws[0] is None:
                continue
            table[f"{prefix}_rank"] = _schools._ranks(table[point].to_numpy())
            if many:
                table[f"{prefix}_rank_lo"] = table[f"{prefix}_rank_hi"] = np.nan
                continue
            full = self._design.to_global([d.T for d in draws]).T
            r = _schools._ranks(full)
            table[f"{prefix}_rank_lo"] = np.quantile(r, lo_q, axis=0, method="inverted_cdf").astype(int)
            table[f"{prefix}_rank_hi"] = np.quantile(r, hi_q, axis=0, method="inverted_cdf").astype(int)
        return table

    def _in_order(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
        """Per-block school frames as one frame in the order of the in-memory fit."""
        pos = np.concatenate(self._design.block_schools)
        return pd.concat(frames).iloc[np.argsort(pos, kind="stable")]

    # ------------------------------------------------------------ rows
    def predict(self, newdata=None, kind: str = "mean", conditional: bool = True, path=None):
        r"""Predictions (:meth:`mlsml.MELSMResults.predict`) of the fitted rows, on the cluster.

        Returns a Dask Series (one partition per block, indexed by the rows' index labels),
        or writes it to Parquet when ``path`` is given (and returns ``path``).

        New rows (``newdata``: a pandas DataFrame, a dict of columns or a Dask DataFrame,
        which is computed) give a pandas Series in newdata's order, equal to the in-memory
        :meth:`mlsml.MELSMResults.predict`: with ``conditional=True`` the rows of each school
        of the fit are sent to the block holding that school, whose posterior of
        :math:`(u_j, v_j)` gives, for the mean and the variance,

        .. math::

            x_{ij}'\hat\beta + z_{ij}'E(u_j \mid y), \qquad
            \exp(w_{ij}'\hat\alpha)\, E(\exp(g_{ij}'v_j) \mid y);

        rows of schools not in the fit get the population-level prediction on the driver, with
        an :class:`~mlsml.errors.UnknownGroupWarning` (as in memory). ``path`` is for the fitted
        rows only (refused with ``newdata``).
        """
        if newdata is not None:
            if path is not None:
                raise ModelSpecError("path= writes the predictions of the fitted rows (newdata=None); new rows give a pandas Series")
            frame = _new_frame(newdata)
            if not conditional:
                return _predict(self, frame, kind=kind, conditional=False)
            out = np.empty(len(frame))
            for idx, part in self._new_rows(frame, kind, _predict_new_block, _predict):
                out[idx] = part.to_numpy()
            return pd.Series(out, index=frame.index, name=kind)
        parts = self._lazy_blocks(_predict_block, self._state(), kind, conditional)
        series = dd.from_delayed(parts, meta=pd.Series(dtype=float, name=kind), verify_meta=False)
        if path is None:
            return series
        series.to_frame().to_parquet(str(path))
        return path

    def _new_rows(self, frame: pd.DataFrame, kind: str, on_block, on_driver) -> list:
        """Conditional predictions of new rows: ``[(row positions, part), ...]`` covering every row.

        A school's posterior depends only on its own rows, which one block holds, so the
        rows of each known school go (as a small pandas frame) to the block holding it, whose
        results object runs the in-memory code on them (``on_block``); rows of schools not in
        the fit get population-level predictions on the driver (``on_driver`` with
        ``conditional=False``), with the in-memory :class:`~mlsml.errors.UnknownGroupWarning`.
        """
        if kind not in PREDICTION_KINDS:
            raise ModelSpecError(f"kind must be one of {', '.join(map(repr, PREDICTION_KINDS))}, not {kind!r}")
        design = self._design
        groups = self.model.formula_spec.groups
        if groups not in frame.columns:
            raise DataError(
                f"conditional predictions need the grouping column {groups!r} in newdata "
                "(or pass conditional=False for population predictions)"
            )
        labels = pd.Index(design.group_labels)
        values = frame[groups]
        pos = np.asarray(labels.get_indexer(values), dtype=np.intp)
        unknown = pos < 0
        if unknown.any():
            warn(_unknown_group_message(labels, groups, values, unknown), UnknownGroupWarning)
        owner = np.empty(len(labels), dtype=np.intp)  # school -> the block holding it
        for b, schools in enumerate(design.block_schools):
            owner[schools] = b
        block_of = np.where(unknown, -1, owner[np.where(unknown, 0, pos)])
        rows = {int(b): np.flatnonzero(block_of == b) for b in np.unique(block_of[~unknown])}
        state = self._state()
        requests = {
            b: Request("call", None, None, self.rule, design.transform, (on_block, (state, frame.iloc[idx], kind)), design.layout)
            for b, idx in rows.items()
        }
        replies = design.blockset.run_some(requests)
        parts = [(rows[b], replies[b]) for b in rows]
        if unknown.any():
            idx = np.flatnonzero(unknown)
            parts.append((idx, on_driver(self, frame.iloc[idx], kind=kind, conditional=False)))
        return parts

    @property
    def fittedvalues(self):
        """Conditional fitted means of the fitted rows (a Dask Series, see :meth:`predict`)."""
        return self.predict(kind="mean").rename("fittedvalues")

    @property
    def resid(self):
        """Residuals ``y - fittedvalues`` (a Dask Series, see :meth:`predict`)."""
        parts = self._lazy_blocks(_resid_block, self._state())
        return dd.from_delayed(parts, meta=pd.Series(dtype=float, name="resid"), verify_meta=False)

    def simulate(self, n_reps: int = 1, seed=None, path=None):
        """Responses drawn from the fitted model (:meth:`mlsml.MELSMResults.simulate`), block by block.

        A Dask DataFrame with columns ``y0, y1, ...`` (one partition per block; each block draws
        from its own stream, from ``seed`` and its first school), or written to Parquet at ``path``.
        """
        n_reps = int(n_reps)
        if n_reps < 1:
            raise ModelSpecError(f"n_reps must be a positive integer, not {n_reps!r}")
        seed = 0 if seed is None else int(seed)
        parts = self._lazy_blocks(_simulate_block, np.asarray(self.theta), n_reps, seed)
        meta = pd.DataFrame({f"y{r}": pd.Series(dtype=float) for r in range(n_reps)})
        frame = dd.from_delayed(parts, meta=meta, verify_meta=False)
        if path is None:
            return frame
        frame.to_parquet(str(path))
        return path

    def bootstrap(self, n: int, seed=None, n_jobs: int | None = None, progress: bool = False) -> BootstrapResults:
        """Parametric bootstrap on the cluster (:meth:`mlsml.MELSMResults.bootstrap`).

        Every replicate draws its response on the workers, block by block
        (:func:`mlsml.simulate.draw_responses` with the block's own stream from the replicate's
        seed), and is refitted on the cluster with the fit's rule from the estimates: its
        evaluations are Dask tasks over all blocks. ``n_jobs`` replicate fits run at once
        (default 1; more keep the workers busy while the driver steps the optimiser).
        """
        n = int(n)
        if n < 1:
            raise ModelSpecError(f"n must be a positive integer, not {n!r}")
        n_jobs = 1 if n_jobs is None else int(n_jobs)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        spec = self.rule
        kwargs = dict(nagq=spec.nagq, quadrature=spec.option, method=self.method, prune=spec.prune, start_params=self.params)
        t0 = time.perf_counter()

        def one(i: int):
            design = self._design.simulated(np.asarray(self.theta), seeds[i])
            try:
                r = type(self.model)(design, self.model.formula_spec).fit(**kwargs)
                return i, r.params.to_numpy(), float(r.llf), bool(r.converged), bool(r.singular), None
            except Exception as exc:  # a failed replicate is reported, not fatal
                return i, None, np.nan, False, False, f"{type(exc).__name__}: {exc}"
            finally:
                design.blockset.close()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ThreadPoolExecutor(max_workers=n_jobs) as pool:
                rows = list(pool.map(one, range(n)))
        names = list(self.params.index)
        est = np.full((n, len(names)), np.nan)
        llf, conv, sing = np.full(n, np.nan), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        errors = {}
        for i, p, ll, c, sg, err in rows:
            if p is not None:
                est[i] = p
            llf[i], conv[i], sing[i] = ll, c, sg
            if err is not None:
                errors[i] = err
        if not conv.all():
            warn(f"{int(n - conv.sum())} of {n} bootstrap replicate fits did not converge and are left out", ConvergenceWarning)
        return BootstrapResults(
            params=self.params.copy(),
            wald_bse=self.bse,
            replicates=pd.DataFrame(est, columns=names, index=pd.RangeIndex(n, name="replicate")),
            llf=llf,
            converged=conv,
            singular=sing,
            errors=errors,
            seed=seed,
            elapsed=time.perf_counter() - t0,
            n_jobs=n_jobs,
        )

    def get_prediction(self, newdata=None, kind: str = "mean", conditional: bool = True) -> PredictionResults:
        """Predictions with standard errors (:meth:`mlsml.MELSMResults.get_prediction`), block by block.

        For the fitted rows (``newdata=None``) every block computes its rows' predictions,
        posterior variances and delta-method parts with the fit's estimates and covariance
        (cluster-robust when :attr:`cov_type` is ``"robust"``): a row's prediction depends only
        on its school and ``theta``, so each block's are the in-memory ones. The blocks' results
        are gathered on the driver (four numbers per row), in block order (the order of
        :meth:`predict`).

        New rows (``newdata``, as in :meth:`predict`): with ``conditional=True`` each block
        computes the rows of its own schools with the in-memory code and the fit's covariance
        (the delta-method part ``se_params`` and the posterior part ``se_posterior``, a
        school's posterior needing only its own rows); rows of schools not in the fit are
        predicted at the population level on the driver. The result is in newdata's order and
        equals the in-memory one.
        """
        if newdata is not None:
            frame = _new_frame(newdata)
            if not conditional:
                return _get_prediction(self, frame, kind=kind, conditional=False)
            fields = ("predicted", "se", "se_params", "se_posterior", "known")
            arrays = {f: np.empty(len(frame), dtype=bool if f == "known" else float) for f in fields}
            for idx, part in self._new_rows(frame, kind, _get_prediction_new_block, _get_prediction):
                for f in fields:
                    arrays[f][idx] = getattr(part, f)
            return PredictionResults(*(arrays[f] for f in fields), kind=kind, conditional=True, index=frame.index)
        parts = [p for p in self._on_blocks(_get_prediction_block, self._state(), kind, conditional) if p is not None]
        return PredictionResults(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("predicted", "se", "se_params", "se_posterior", "known")),
            kind=parts[0].kind,
            conditional=parts[0].conditional,
            index=parts[0].index.append([p.index for p in parts[1:]]),
        )

    def corr_predictions(self, wbar, zbar, gbar, cov_t) -> tuple[float, float]:
        r"""``corr_pred`` of :meth:`population_quantities` and its delta-method SE, from sums over blocks.

        With :math:`S = (\sum m_j, \sum v_j, \sum m_j^2, \sum v_j^2, \sum m_j v_j)` over the
        ``J`` schools,

        .. math::

            r = \frac{S_5 - S_1 S_2 / J}{\sqrt{(S_3 - S_1^2/J)(S_4 - S_2^2/J)}},

        and its gradient in ``theta`` by the chain rule through the blocks' Jacobians of ``S``.
        """
        parts = self._on_blocks(_prediction_sums, self._state(), wbar, zbar, gbar)
        S = np.sum([p[0] for p in parts], axis=0)
        dS = np.sum([p[1] for p in parts], axis=0)
        J = float(self.ngroups)

        def corr(S):
            return (S[4] - S[0] * S[1] / J) / anp.sqrt((S[2] - S[0] ** 2 / J) * (S[3] - S[1] ** 2 / J))

        r = float(corr(S))
        if cov_t is None:
            return r, np.nan
        g = dS.T @ autograd.grad(corr)(S)
        return r, float(np.sqrt(max(g @ cov_t @ g, 0.0)))

    def tail_schools(self) -> pd.DataFrame:
        """The per-school table of :func:`mlsml.diagnostics.tail_check`, made block by block."""
        return self._in_order(self._on_blocks(_tail_schools_block, self._state()))
