"""Results to and from plain data: the JSON written by ``res.to_json()`` and read by ``mlsml.load``.

:func:`results_to_dict` gathers everything that describes a fit without its
data: the formulas (mean, scale, random effects, ``scale_re_formula``,
``bs_formula``), the parameter layout, the quadrature rule and points, the fit
options, the estimates on both scales with their covariance and the observed
information, the log-likelihood, the counts, the convergence record and the
boundary diagnosis. :func:`results_fields_from_dict` turns such a dictionary back
into the fields of a :class:`mlsml.MELSMResults`, whose model is then a
:class:`DetachedModel`: the numbers and everything computed from them (``params``,
``bse``, ``conf_int``, ``cov_params``, ``aic``, ``summary``, ``wald_test``, ...)
work, while methods that need the observations (predictions, school effects,
simulation, refits) raise a :class:`~mlsml.errors.DataError` that says so.
To keep the data with a result, pickle it instead.

The quadrature is written twice: as the fields ``quadrature`` (the kind),
``nagq`` and ``prune`` that :class:`mlsml.MELSMResults` has, and spelled out as
``quadrature_rule`` (:func:`quadrature_record`): the kind, the points per
dimension, which school effects the rule integrates numerically and the number
of nodes per school,

.. math::

    n_{\\text{nodes}} = n_{\\text{agq}}^{\\,\\dim}, \\qquad
    \\dim = \\begin{cases} d & \\text{product rule} \\\\
                           n_v & \\text{u-exact rule (mean effects integrated exactly)} \\end{cases}

(before pruning), so that a reader of the JSON need not know that ``nagq`` of a
u-exact fit counts points in ``v`` only.

Floats are written with Python's shortest round-trip representation and read
back exactly; NaN (e.g. standard errors without a positive-definite information
matrix) is written as ``null``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .design import FormulaSpec
from .diagnostics import Diagnostics
from .errors import DataError, ModelSpecError
from .optimize import FitOptions
from .params import ParamLayout
from .quadrature import QuadratureSpec

#: Identifies the JSON of a fit, and the version of its layout.
FORMAT = "mlsml.MELSMResults"
FORMAT_VERSION = 1

#: The message of every method that needs the data of a result read from JSON.
NO_DATA = (
    "{what} needs the data of the fit, which a result read from JSON (mlsml.load, MELSMResults.from_json) "
    "does not carry; refit the model on the data (or pickle results instead of writing JSON: a pickle keeps the data)"
)


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _nums(a) -> list:
    a = np.asarray(a, dtype=float)
    if a.ndim == 0:
        return _num(a)
    return [_nums(x) for x in a]


def _arr(v, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.array(v, dtype=object)
    out = np.where(a == None, np.nan, a).astype(float)  # noqa: E711  (elementwise: null -> NaN)
    if shape is not None and out.shape != shape:
        raise DataError(f"expected an array of shape {shape}, got {out.shape}")
    return out


#: The quadrature kinds a fit records: the product rule over all school effects, and the rule that
#: integrates the mean effects exactly given the scale effects ("u-exact").
QUADRATURE_KINDS = ("product", "marginal")

#: The options of :class:`mlsml.optimize.FitOptions` stored with a fit besides ``method``
#: (``start``, the start values, is not stored).
STORED_OPTIONS = ("maxiter", "max_passes", "xtol", "ftol", "gtol", "dtol")


def quadrature_record(kind: str | None, nagq: int, prune: float, layout: ParamLayout) -> dict[str, Any] | None:
    """The quadrature rule of a fit, spelled out (``None`` when the kind is not known).

    Parameters
    ----------
    kind : {"product", "marginal"} or None
        The rule: ``"product"`` integrates all ``d`` school effects numerically;
        ``"marginal"`` (u-exact) integrates the mean effects exactly and the
        ``n_v`` scale effects numerically.
    nagq : int
        Points per numerically integrated dimension.
    prune : float
        Pruning threshold of the product rule (0: none).
    layout : ParamLayout
        The parameter layout (names of the school effects).

    Returns
    -------
    dict or None
        ``kind``, ``points_per_dim``, ``integrated`` (names of the school effects
        integrated numerically), ``nodes`` (``points_per_dim ** len(integrated)``,
        before pruning) and ``prune``.

    Examples
    --------
    >>> from mlsml.params import ParamLayout
    >>> lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
    >>> quadrature_record("marginal", 15, 0.0, lay)
    {'kind': 'marginal', 'points_per_dim': 15, 'integrated': ['v'], 'nodes': 15, 'prune': 0.0}
    """
    if kind is None:
        return None
    if kind not in QUADRATURE_KINDS:
        raise DataError(f"unknown quadrature kind {kind!r} (expected one of {list(QUADRATURE_KINDS)})")
    names = list(layout.re_names)
    integrated = names if kind == "product" else names[layout.q :]
    return {
        "kind": kind,
        "points_per_dim": int(nagq),
        "integrated": integrated,
        "nodes": int(nagq) ** len(integrated),
        "prune": float(prune),
    }


def response_fingerprint(y_caller_order: np.ndarray) -> str:
    """SHA-256 of the response vector (caller's row order): compares fits without their data."""
    return hashlib.sha256(np.ascontiguousarray(y_caller_order, dtype="<f8").tobytes()).hexdigest()


def results_to_dict(res) -> dict[str, Any]:
    """Plain-Python content of a fit (see the module docstring); NaN becomes ``None``."""
    spec = res.model.formula_spec
    lay: ParamLayout = res.layout
    design = res.model.design
    diag = res.diagnostics
    check = diag.quadrature_check
    opts = res.options
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "formula": spec.formula,
        "scale_formula": spec.scale_formula,
        "re_formula": spec.re_formula,
        "scale_re_formula": spec.scale_re_formula,
        "bs_formula": spec.bs_formula,
        "groups": spec.groups,
        "response": spec.response,
        "random_scale": bool(lay.random_scale),
        "layout": {
            "mean_terms": list(lay.mean_terms),
            "scale_terms": list(lay.scale_terms),
            "n_re_mean": lay.q,
            "random_scale": bool(lay.random_scale),
            "scale_re_terms": list(lay.scale_re_terms),
            "bs_terms": list(lay.bs_terms),
            "re_terms": list(design.info.get("re_terms", ())),
            "fixed_cov": [list(pair) for pair in lay.fixed_cov],
            "quad_assoc": bool(lay.quad_assoc),
        },
        "association": lay.association,
        "nobs": design.nobs,
        "ngroups": design.ngroups,
        "group_sizes": [int(c) for c in design.counts],
        "n_dropped": int(design.info.get("n_dropped", 0)),
        "response_sha256": design.info.get("response_sha256") or response_fingerprint(_caller_y(design)),
        "nagq": res.nagq,
        "quadrature": res.quadrature,
        "prune": float(res.prune),
        "quadrature_rule": quadrature_record(res.quadrature, res.nagq, res.prune, lay),
        "method": res.method,
        "options": {"method": res.method, **{name: getattr(opts, name) for name in STORED_OPTIONS}},
        "quadrature_check": None if check is None else [int(check[0]), _num(check[1])],
        "llf": _num(res.llf),
        "aic": _num(res.aic),
        "bic": _num(res.bic),
        "bic_groups": _num(res.bic_groups),
        "df_model": res.df_model,
        "converged": bool(res.converged),
        "message": res.message,
        "n_iter": res.n_iter,
        "n_passes": res.n_passes,
        "fit_time": _num(res.fit_time),
        "singular": res.singular,
        "singular_reasons": list(res.singular_reasons()),
        "hessian_pd": bool(diag.hessian_pd),
        "params": {k: _num(v) for k, v in res.params.items()},
        "bse": {k: _num(v) for k, v in res.bse.items()},
        "cov_params": _nums(res._cov),
        "cov_type": res.cov_type,
        "cov_theta": None if res._cov_theta is None else _nums(res._cov_theta),
        "weights": _weights_record(design.info.get("weights")),
        "offsets": {k: design.info[k] for k in ("offset", "scale_offset") if k in design.info},
        "theta": _nums(res.theta),
        "grad": _nums(res.grad),
        "hessian": _nums(res.hessian),
    }


def _weights_record(info) -> dict[str, Any] | None:
    """The description of a fit's weights (:mod:`mlsml.weights`) as plain JSON values."""
    if not info:
        return None
    return {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in info.items()}


def _caller_y(design) -> np.ndarray:
    y = np.empty(design.nobs)
    y[design.order] = design.response
    return y


class DetachedDesign:
    """Stands in for the :class:`~mlsml.design.Design` of a result read from JSON.

    It knows the counts (``nobs``, ``ngroups``, ``counts``), the layout and the
    design's ``info``; asking for anything else (the arrays) raises
    :class:`~mlsml.errors.DataError`.
    """

    def __init__(self, layout: ParamLayout, counts: np.ndarray, info: dict[str, Any]):
        self.layout = layout
        self.counts = np.asarray(counts, dtype=np.intp)
        self.info = info

    @property
    def nobs(self) -> int:
        """Number of observations of the fit."""
        return int(self.counts.sum())

    @property
    def ngroups(self) -> int:
        """Number of groups of the fit."""
        return int(self.counts.size)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise DataError(NO_DATA.format(what=f"this (the design's {name!r})"))


class DetachedModel:
    """Stands in for the :class:`~mlsml.MELSM` of a result read from JSON (formulas and layout, no data)."""

    def __init__(self, design: DetachedDesign, formula_spec: FormulaSpec):
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

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise DataError(NO_DATA.format(what=f"model.{name}"))


def read_json(source) -> dict[str, Any]:
    """The dictionary in ``source``: JSON text, a path to a JSON file, or a dict already."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text = source
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise DataError(f"could not read the results file {str(source)!r}: {exc}") from exc
    else:
        raise DataError(f"expected JSON text, a path to a JSON file or a dict, got {type(source).__name__}")
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}") from exc
    if not isinstance(out, dict):
        raise DataError(f"the JSON holds a {type(out).__name__}, not the object MELSMResults.to_json writes")
    return out


def results_fields_from_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of :class:`mlsml.MELSMResults` from :func:`results_to_dict`'s output."""
    if d.get("format") != FORMAT:
        missing = "layout" not in d
        raise DataError(
            f"this is not the JSON of a fit written by MELSMResults.to_json (format {d.get('format')!r}, expected {FORMAT!r})"
            + (
                "; it lacks the parameter layout (written by an older mlsml?): refit and write it again"
                if missing and "params" in d
                else ""
            )
        )
    if int(d.get("format_version", 0)) > FORMAT_VERSION:
        raise DataError(f"the JSON has format version {d['format_version']}, newer than this mlsml reads ({FORMAT_VERSION})")
    try:
        L = d["layout"]
        lay = ParamLayout(
            mean_terms=tuple(L["mean_terms"]),
            scale_terms=tuple(L["scale_terms"]),
            n_re_mean=int(L["n_re_mean"]),
            random_scale=bool(L["random_scale"]),
            scale_re_terms=tuple(L["scale_re_terms"]),
            bs_terms=tuple(L["bs_terms"]),
            fixed_cov=tuple((int(e), int(f)) for e, f in L.get("fixed_cov", ())),  # absent before issue 13
            quad_assoc=bool(L.get("quad_assoc", False)),
        )
        names = list(lay.names)
        if list(d["params"]) != names:
            raise DataError(f"the parameters {list(d['params'])} do not match the layout's {names}")
        n = len(names)
        values = np.array([np.nan if v is None else float(v) for v in d["params"].values()])
        values.setflags(write=False)
        params = pd.Series(values, index=names, name="estimate", copy=False)
        theta = _arr(d["theta"], (n,))
        cov = _arr(d["cov_params"], (n, n))
        hessian = _arr(d["hessian"], (n, n))
        grad = _arr(d["grad"], (n,))
        counts = np.asarray(d["group_sizes"], dtype=np.intp)
        if counts.sum() != int(d["nobs"]) or counts.size != int(d["ngroups"]):
            raise DataError("the group sizes do not add up to nobs and ngroups")
        spec = FormulaSpec(
            formula=d["formula"],
            scale_formula=d["scale_formula"],
            re_formula=d["re_formula"],
            groups=d["groups"],
            mean_spec=None,
            scale_spec=None,
            re_spec=None,
            response=d["response"],
            scale_re_formula=d.get("scale_re_formula"),
            bs_formula=d.get("bs_formula"),
        )
        design_info = {
            "response": d["response"],
            "n_dropped": int(d.get("n_dropped", 0)),
            "re_terms": tuple(L.get("re_terms", ())),
            "response_sha256": d.get("response_sha256"),
        }
        if d.get("weights"):
            design_info["weights"] = dict(d["weights"])
        design_info.update(d.get("offsets") or {})
        cov_type = str(d.get("cov_type", "nonrobust"))
        if cov_type not in ("nonrobust", "robust"):
            raise DataError(f"unknown cov_type {cov_type!r} (expected 'nonrobust' or 'robust')")
        cov_theta = None if d.get("cov_theta") is None else _arr(d["cov_theta"], (n, n))
        check = d.get("quadrature_check")
        kind = d["quadrature"]
        rule = d.get("quadrature_rule")
        if rule is not None and rule != quadrature_record(kind, int(d["nagq"]), float(d.get("prune", 0.0)), lay):
            raise DataError(
                f"the quadrature_rule {rule} does not match quadrature={kind!r}, nagq={d['nagq']} and prune={d.get('prune')}"
            )
        if kind not in QUADRATURE_KINDS:
            raise DataError(f"unknown quadrature kind {kind!r} (expected one of {list(QUADRATURE_KINDS)})")
        stored = dict(d.get("options") or {})
        stored.pop("method", None)  # the same as the top-level entry, which rules
        unknown = sorted(set(stored) - set(STORED_OPTIONS))
        if unknown:
            raise DataError(f"the results JSON has unknown options {unknown} (expected some of {list(STORED_OPTIONS)})")
        diagnostics = Diagnostics(
            hessian_pd=bool(d["hessian_pd"]),
            singular_reasons=tuple(d.get("singular_reasons", [])),
            quadrature_check=None if check is None else (int(check[0]), np.nan if check[1] is None else float(check[1])),
        )
        fields = {
            "model": DetachedModel(DetachedDesign(lay, counts, design_info), spec),
            "theta": theta,
            "params": params,
            "llf": np.nan if d["llf"] is None else float(d["llf"]),
            "converged": bool(d["converged"]),
            "rule": QuadratureSpec(
                kind="uexact" if kind == "marginal" else "product", nagq=int(d["nagq"]), prune=float(d.get("prune", 0.0))
            ),
            "hessian": hessian,
            "grad": grad,
            "message": str(d["message"]),
            "n_passes": int(d["n_passes"]),
            "n_iter": int(d["n_iter"]),
            "fit_time": np.nan if d.get("fit_time") is None else float(d["fit_time"]),
            "method": str(d["method"]),
            "options": FitOptions(method=str(d["method"]), **stored),
            "diagnostics": diagnostics,
            "_cov": cov,
            "cov_type": cov_type,
            "_cov_theta": cov_theta,
        }
    except KeyError as exc:
        raise DataError(f"the results JSON lacks the entry {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, (DataError, ModelSpecError)):
            raise
        raise DataError(f"the results JSON has an entry of the wrong type: {exc}") from exc
    for a in (fields["theta"], fields["hessian"], fields["grad"], fields["_cov"], fields["_cov_theta"]):
        if a is not None:
            a.setflags(write=False)
    return fields
