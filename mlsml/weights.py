r"""Weights at both levels and offsets: from the caller's columns to the arrays of a :class:`~mlsml.design.Design`.

**Sampling (design) weights** (``weights_kind="sampling"``, the default) give the
pseudo-maximum-likelihood estimator of Pfeffermann et al. (1998) and Rabe-Hesketh and
Skrondal (2006): with :math:`w_{i|j}` the level-1 weight of observation :math:`i` given its
school (the inverse of its conditional inclusion probability) and :math:`W_j` the level-2
weight of school :math:`j`, the weights enter at each level of the integrated likelihood,

.. math::

    \ell_w(\theta) = \sum_j W_j \log \int \exp\Big\{\sum_i w^*_{i|j} \log f(y_{ij} \mid b)\Big\}
        \phi(b; 0, \Sigma_j)\, db,

the level-1 weights multiplying each observation's log-density inside the school's integral
and the level-2 weights each school's log integral. The level-1 weights are scaled within
each school (``weights_scale``):

.. math::

    \text{"size"}:\; w^*_{i|j} = w_{i|j} \frac{n_j}{\sum_i w_{i|j}}, \qquad
    \text{"effective"}:\; w^*_{i|j} = w_{i|j} \frac{\sum_i w_{i|j}}{\sum_i w_{i|j}^2}, \qquad
    \text{"none"}:\; w^*_{i|j} = w_{i|j},

so that they sum to the school's size ("size", Rabe-Hesketh and Skrondal's method 1, Stata's
``pwscale(size)``) or to its effective sample size :math:`(\sum_i w)^2 / \sum_i w^2`
("effective", method 2). Unscaled level-1 weights bias the variance components when schools
are small (Pfeffermann et al. 1998); the level-2 weights are never scaled (a constant factor
does not move the estimates). The weights are *conditional*: when a survey gives the
unconditional student weight (PISA's ``W_FSTUWT``), pass it divided by the school weight. The
standard errors of a sampling-weighted fit are the cluster-robust ones by default
(:mod:`mlsml.robust`).

**Frequency weights** (``weights_kind="frequency"``) say how often a row (level 1) or a whole
school (level 2) occurs: the likelihood, the estimates and the model-based standard errors
are exactly those of the replicated data set (no scaling; ``nobs`` counts the replicates).

**Offsets** are known terms of the mean and of the log residual variance,

.. math::

    y_{ij} = o_{ij} + x_{ij}'\beta + z_{ij}'u_j + e_{ij}, \qquad
    \ln\sigma^2_{ij} = o^{(s)}_{ij} + w_{ij}'\alpha + g_{ij}'v_j

(statsmodels' ``offset``; ``scale_offset`` for the variance function).

Every value is checked: a weight that is missing, infinite or negative, a school whose
level-1 weights are all zero, a level-2 weight that differs within a school, all weights
zero, or a non-finite offset raise :class:`~mlsml.DataError` naming the column, the school
and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .design import Design
from .errors import DataError, ModelSpecError
from .validate import describe_value, plain_value

#: Values of ``weights_kind``.
WEIGHT_KINDS = ("sampling", "frequency")

#: Values of ``weights_scale`` (the level-1 scaling of sampling weights).
WEIGHT_SCALES = ("size", "effective", "none")

#: A level-2 weight counts as constant within a school when its values differ by at most this
#: relative amount (rounding of a weight stored per row).
GROUP_WEIGHT_RTOL = 1e-9


def row_values(values, data: pd.DataFrame, what: str) -> tuple[np.ndarray, str]:
    """One float per row of ``data`` and the name to use in messages.

    Parameters
    ----------
    values : str, pandas.Series or array-like
        A column name; a Series aligned by its index with ``data``; or one value per row,
        by position.
    data : pandas.DataFrame
    what : str
        The argument's name (``"weights"``, ``"offset"``, ...), for messages.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"w": [1.0, 2.0]}, index=[10, 11])
    >>> row_values("w", df, "weights")[0].tolist(), row_values([3, 4], df, "weights")[1]
    ([1.0, 2.0], 'weights')
    """
    if isinstance(values, str):
        if values not in data.columns:
            raise ModelSpecError(f"{what}={values!r} is not a column of the data (columns: {', '.join(map(str, data.columns[:20]))})")
        name = f"column {values!r}"
        series = data[values]
    elif isinstance(values, pd.Series):
        if not values.index.equals(data.index):
            if not (values.index.is_unique and data.index.is_unique and set(values.index) == set(data.index)):
                raise ModelSpecError(
                    f"{what} is {describe_value(values)} whose index does not match the data's index; pass a column "
                    f"name ({what}='w') or an array (aligned by position)"
                )
            values = values.reindex(data.index)
        name = what
        series = values
    else:
        arr = np.asarray(values, dtype=object)
        if arr.ndim != 1 or arr.shape[0] != data.shape[0]:
            raise ModelSpecError(f"{what} must give one value per row of the data ({data.shape[0]}), not {describe_value(values)}")
        name = what
        series = pd.Series(arr, index=data.index)
    if pd.api.types.is_bool_dtype(series) or not (pd.api.types.is_numeric_dtype(series) or series.dtype == object):
        raise DataError(f"{what} ({name}) must be numbers, not dtype {series.dtype}")
    try:
        out = pd.to_numeric(series, errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} ({name}) must be numbers: {exc}") from exc
    return out, name


def _first_bad(mask: np.ndarray, values: np.ndarray, labels: pd.Index) -> str:
    i = int(np.flatnonzero(mask)[0])
    return f"{int(mask.sum())} row(s), first {plain_value(values[i])!r} at index {plain_value(labels[i])!r}"


def _checked_nonnegative(values: np.ndarray, name: str, labels: pd.Index) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"the weights ({name}) must be finite numbers: missing or infinite in {_first_bad(bad, values, labels)}")
    neg = values < 0
    if neg.any():
        raise DataError(f"the weights ({name}) must not be negative: {_first_bad(neg, values, labels)}")


def scale_level1(w: np.ndarray, starts: np.ndarray, counts: np.ndarray, method: str) -> np.ndarray:
    r"""Level-1 weights scaled within each school (module docstring).

    Parameters
    ----------
    w : ndarray (N,)
        Weights, rows sorted by school (contiguous).
    starts, counts : ndarray (J,)
    method : {"size", "effective", "none"}

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([1.0, 3.0, 2.0, 2.0])
    >>> st, ct = np.array([0, 2]), np.array([2, 2])
    >>> scale_level1(w, st, ct, "size").tolist(), scale_level1(w, st, ct, "effective").round(12).tolist()
    ([0.5, 1.5, 1.0, 1.0], [0.4, 1.2, 1.0, 1.0])
    """
    if method == "none":
        return w.astype(float, copy=True)
    total = np.add.reduceat(w, starts)
    if method == "size":
        factor = counts / total
    else:
        factor = total / np.add.reduceat(w * w, starts)
    return w * np.repeat(factor, counts)


def check_weight_options(weights_kind: str, weights_scale: str | None) -> str:
    """The level-1 scaling of a fit's weights (the default for ``None``), the kind and scale checked.

    Examples
    --------
    >>> check_weight_options("sampling", None), check_weight_options("frequency", None)
    ('size', 'none')
    """
    if weights_kind not in WEIGHT_KINDS:
        raise ModelSpecError(f"weights_kind must be one of {WEIGHT_KINDS}, not {describe_value(weights_kind)}")
    if weights_scale is None:
        weights_scale = "size" if weights_kind == "sampling" else "none"
    if weights_scale not in WEIGHT_SCALES:
        raise ModelSpecError(f"weights_scale must be one of {WEIGHT_SCALES}, not {describe_value(weights_scale)}")
    if weights_kind == "frequency" and weights_scale != "none":
        raise ModelSpecError(
            f"frequency weights count replicates and are not scaled: weights_scale must be 'none', not {weights_scale!r}"
        )
    return weights_scale


def level1_weights(w: np.ndarray, design: Design, name: str, labels: pd.Index, method: str) -> np.ndarray:
    """The level-1 weights of a design's rows (sorted by school), checked and scaled within each school.

    Parameters
    ----------
    w : ndarray (N,)
        The caller's weights of the design's rows, in the design's (sorted) order.
    design : Design
        Its ``starts``, ``counts`` and ``group_labels`` (every school whole: the scaling
        needs only the school's own rows, so a block of whole schools scales its own).
    name : str
        The weights' name in messages.
    labels : pandas.Index
        The rows' index labels (sorted order), for messages.
    method : {"size", "effective", "none"}
        :func:`scale_level1`.
    """
    _checked_nonnegative(w, name, labels)
    totals = np.add.reduceat(w, design.starts)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        school = plain_value(design.group_labels[empty[0]])
        raise DataError(
            f"the weights ({name}) are zero for every observation of school {school!r} ({empty.size} school(s) in all): "
            "such a school contributes nothing; drop it from the data"
        )
    return scale_level1(w, design.starts, design.counts, method)


def check_some_school_weight(Wj: np.ndarray, name: str) -> None:
    """Refuse level-2 weights that are zero for every school."""
    if not np.any(np.asarray(Wj) > 0):
        raise DataError(f"the school weights ({name}) are zero for every one of the {np.size(Wj)} schools")


def school_weights_by_label(mapping, group_labels: np.ndarray) -> np.ndarray:
    """The level-2 weights of the schools ``group_labels`` from a mapping ``{school: weight}`` (a dict or a Series), checked."""
    mapping = pd.Series(mapping) if isinstance(mapping, Mapping) else mapping
    missing = [g for g in group_labels if g not in mapping.index]
    if missing:
        raise DataError(f"group_weights has no weight for school {plain_value(missing[0])!r} ({len(missing)} school(s) in all)")
    Wj = pd.to_numeric(mapping.reindex(group_labels), errors="coerce").to_numpy(dtype=float)
    _checked_nonnegative(Wj, "group_weights", pd.Index(group_labels))
    return Wj


def school_weights_from_rows(w: np.ndarray, design: Design, name: str, labels: pd.Index) -> np.ndarray:
    """The level-2 weights of a design's schools from one value per row (sorted order), checked constant within each school."""
    _checked_nonnegative(w, name, labels)
    Wj = w[design.starts]
    first = np.repeat(Wj, design.counts)
    differs = np.abs(w - first) > GROUP_WEIGHT_RTOL * np.maximum(np.abs(first), 1e-300)
    if differs.any():
        i = int(np.flatnonzero(differs)[0])
        j = int(design.group[i])
        raise DataError(
            f"the school weights ({name}) must be constant within each school: school {plain_value(design.group_labels[j])!r} "
            f"has {plain_value(Wj[j])!r} and {plain_value(w[i])!r} (at index {plain_value(labels[i])!r})"
        )
    return Wj


def with_weights_and_offsets(
    design: Design,
    data: pd.DataFrame,
    weights=None,
    group_weights=None,
    weights_kind: str = "sampling",
    weights_scale: str | None = None,
    offset=None,
    scale_offset=None,
) -> Design:
    """The design with its weights and offsets (``design`` itself when none are given).

    Parameters
    ----------
    design : Design
        From :func:`mlsml.design.build_design` on ``data``.
    data : pandas.DataFrame
        The caller's data (the frame ``design`` was built from).
    weights : str, Series or array-like, optional
        Level-1 weights, one per row (module docstring).
    group_weights : str, Series, mapping or array-like, optional
        Level-2 weights: a column (one value per row, constant within each school), a
        per-row array, or a mapping ``{school: weight}`` (a dict, or a Series indexed by the
        school labels).
    weights_kind : {"sampling", "frequency"}
    weights_scale : {"size", "effective", "none"}, optional
        Level-1 scaling of sampling weights; default "size" (frequency weights: "none", the
        only value allowed).
    offset, scale_offset : str, Series or array-like, optional
        Offsets of the mean and of the log residual variance, one per row.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> df["w"] = 1.0 + (df["x"] > 0)
    >>> design = mlsml.MELSM.from_formula("y ~ x", df, groups="school", weights="w").design
    >>> bool(abs(design.weights.sum() - design.nobs) < 1e-6)   # scaled to the schools' sizes
    True
    """
    weights_scale = check_weight_options(weights_kind, weights_scale)
    if weights is None and group_weights is None and offset is None and scale_offset is None:
        return design
    rows = design.info["rows_used"][design.order]  # caller's positions of the sorted rows
    labels = data.index[rows]
    changes: dict = {}
    info = dict(design.info)
    described: dict = {"kind": weights_kind}
    if weights is not None:
        w, name = row_values(weights, data, "weights")
        changes["weights"] = level1_weights(w[rows], design, name, labels, weights_scale)
        info["row_weights"] = w[rows]  # unscaled (times the school weights below): population averages
        described.update(level1=name, scale=weights_scale)
    if group_weights is not None:
        Wj, name = _school_values(group_weights, data, design, rows, labels)
        check_some_school_weight(Wj, name)
        changes["group_weights"] = Wj
        described["level2"] = name
        info["row_weights"] = info.get("row_weights", np.ones(design.nobs)) * np.repeat(Wj, design.counts)
    if weights is not None or group_weights is not None:
        info["weights"] = described
    for arg, field, value in (("offset", "offset", offset), ("scale_offset", "scale_offset", scale_offset)):
        if value is None:
            continue
        o, name = row_values(value, data, arg)
        o = o[rows]
        bad = ~np.isfinite(o)
        if bad.any():
            raise DataError(f"the {arg} ({name}) must be finite: missing or infinite in {_first_bad(bad, o, labels)}")
        changes[field] = o
        info[arg] = name
        info[f"{arg}_column"] = value if isinstance(value, str) else None  # read from newdata by predictions
    if "offset" in changes:
        changes["y"] = design.y - changes["offset"]
    out = dataclasses.replace(design, info=info, **changes)
    if weights_kind == "frequency" and "weights" in info:  # the size of the replicated data set
        Wj = np.ones(out.ngroups) if out.group_weights is None else out.group_weights
        info["weights"].update(frequency_counts(out.nobs_weighted, Wj))
    return out


def frequency_counts(nobs_weighted: float, Wj: np.ndarray) -> dict:
    """``nobs`` and ``ngroups`` of the replicated data set of a frequency-weighted fit (its ``info["weights"]``)."""
    return {"nobs": nobs_weighted, "ngroups": float(np.sum(Wj))}


def describe_weights(info: dict) -> str:
    """One line on a fit's weights (its ``design.info["weights"]``), for the summaries.

    Examples
    --------
    >>> describe_weights({"kind": "sampling", "level1": "column 'w'", "scale": "size", "level2": "column 'ws'"})
    "sampling: level 1 column 'w' (scaled: size), level 2 column 'ws'"
    """
    parts = []
    if "level1" in info:
        parts.append(f"level 1 {info['level1']}" + (f" (scaled: {info['scale']})" if info.get("kind") == "sampling" else ""))
    if "level2" in info:
        parts.append(f"level 2 {info['level2']}")
    return f"{info.get('kind', 'sampling')}: " + ", ".join(parts)


def _school_values(values, data: pd.DataFrame, design: Design, rows: np.ndarray, labels: pd.Index) -> tuple[np.ndarray, str]:
    """The level-2 weights, one per school in code order, checked."""
    per_row_series = isinstance(values, pd.Series) and (values.index.equals(data.index) or set(values.index) == set(data.index))
    by_school = isinstance(values, Mapping) or (isinstance(values, pd.Series) and not per_row_series)
    if by_school:
        return school_weights_by_label(values, design.group_labels), "group_weights"
    w, name = row_values(values, data, "group_weights")
    return school_weights_from_rows(w[rows], design, name, labels), name
