"""From formulas and a data frame to the arrays the likelihood needs.

:func:`build_design` is the only place where user data are inspected. It

1. evaluates the mean formula (``y ~ x + ...``), the residual-variance formula
   (``~ x + ...``) and the random-effects formula (``~ 1`` or ``~ x``) with
   statsmodels' formula engine (patsy), so categorical terms, interactions and
   transformations behave exactly as in statsmodels;
2. handles missing values by listwise deletion with a :class:`MissingDataWarning`
   that counts the rows per column (or raises :class:`DataError` when
   ``missing="raise"``) -- rows are never dropped silently;
3. checks the result (non-finite values, constant or collinear columns, too
   few groups, a response without within-school variation) and raises errors
   that name the column or group at fault;
4. sorts the rows by group (stably) so that per-school sums are contiguous
   slices; ``Design.order`` maps back to the caller's row order.

The caller's data frame is never modified.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from typing import Any

import autograd.numpy as anp
import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .errors import DataError, MissingDataWarning, ModelSpecError, warn
from .formulas import check_formula_sides, check_no_lme4_terms
from .groupmeans import between, display_name, expand_group_transforms, within  # noqa: F401 (within, between: called by formulas)
from .params import ParamLayout
from .validate import describe_value

# patsy is imported when the first design is built: with statsmodels' formula front end it
# took a third of the time of `import mlsml` (tests/test_import.py keeps it lazy).
patsy = LazyModule("patsy")


#: The arrays of a :class:`Design` that are always read-only.
_ARRAYS = ("y", "X", "W", "Z", "group", "starts", "counts", "group_labels", "order", "G", "S", "S_level1", "S_level1_columns")


@dataclass(frozen=True)
class Design:
    """Arrays of one model, rows sorted by group.

    Attributes
    ----------
    y : ndarray (N,)
        Response.
    X : ndarray (N, p)
        Mean-function design.
    W : ndarray (N, k)
        Residual-variance-function design.
    Z : ndarray (N, q)
        Random-effects design of the mean function (``z_ij``).
    group : ndarray (N,) of int
        Group code ``0..J-1`` of each row.
    starts, counts : ndarray (J,) of int
        First row and number of rows of each group.
    group_labels : ndarray (J,)
        The caller's group identifiers, in code order.
    order : ndarray (N,) of int
        ``order[i]`` is the position, among the rows used, of sorted row ``i``
        in the caller's order.
    row_labels : pandas.Index
        Index labels (in the caller's frame) of the rows used, caller's order.
    layout : ParamLayout
        Parameter names and sizes.
    G : ndarray (N, n_v), optional
        Design of the school effects in the log variance (``scale_re_formula``).
    S : ndarray (J, m), optional
        School-level design of ``ln var(u0_j)`` (``bs_formula``), one row per school;
        zero in the level-1 columns.
    S_level1 : ndarray (N, m), optional
        The level-1 (time-varying) columns of the ``bs_formula`` design, one row per
        observation (sorted), zero in the school-level columns; ``None`` when every column is
        constant within each group. The BS-variance index of row ``i`` is
        :math:`s_{ij}'\tau = (S_j + S^{(1)}_{ij})'\tau` (MIXREGLS's :math:`u_{ij}'\alpha`).
    weights : ndarray (N,), optional
        Level-1 (observation) weights as the likelihood uses them (scaled, see
        :mod:`mlsml.weights`); ``None``: all one.
    group_weights : ndarray (J,), optional
        Level-2 (school) weights; ``None``: all one.
    offset : ndarray (N,), optional
        The mean offset ``o_ij``; ``y`` then holds the response minus the offset.
    scale_offset : ndarray (N,), optional
        The offset of the log residual variance (:meth:`log_variance_index`).
    S_level1_columns : ndarray (m,) of bool, optional
        Which columns of the ``bs_formula`` design are level-1 (:func:`bs_level1_columns`);
        ``None`` when ``S_level1`` is. By default the columns of ``S_level1`` with a nonzero
        value; a block of schools of a fit on a Dask cluster (:mod:`mlsml.distributed`) is
        given the mask decided over all blocks (a level-1 column may be zero in all its rows).
    """

    y: np.ndarray
    X: np.ndarray
    W: np.ndarray
    Z: np.ndarray
    group: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    group_labels: np.ndarray
    order: np.ndarray
    row_labels: pd.Index
    layout: ParamLayout
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    G: np.ndarray | None = None
    S: np.ndarray | None = None
    weights: np.ndarray | None = None
    S_level1: np.ndarray | None = None
    group_weights: np.ndarray | None = None
    offset: np.ndarray | None = None
    scale_offset: np.ndarray | None = None
    S_level1_columns: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.S_level1 is None:
            object.__setattr__(self, "S_level1_columns", None)
        elif self.S_level1_columns is None:
            object.__setattr__(self, "S_level1_columns", np.any(self.S_level1 != 0, axis=0))
        # read-only: a design is shared by the model, its likelihood and every result
        for name in (*_ARRAYS, "weights", "group_weights", "offset", "scale_offset"):
            a = getattr(self, name)
            if isinstance(a, np.ndarray):
                a.setflags(write=False)

    @property
    def nobs(self) -> int:
        """Number of observations (students)."""
        return int(self.y.shape[0])

    @property
    def ngroups(self) -> int:
        """Number of groups (schools)."""
        return int(self.counts.shape[0])

    @property
    def weighted(self) -> bool:
        """Whether the likelihood weights observations or schools (:mod:`mlsml.weights`)."""
        return self.weights is not None or self.group_weights is not None

    @property
    def nobs_weighted(self) -> float:
        r"""The total weight of the observations, :math:`\sum_j W_j \sum_i w_{ij}` (``nobs`` unweighted).

        The number of observations the (pseudo-)likelihood counts: with frequency weights the
        size of the replicated data set. The optimiser divides the objective by it.
        """
        if not self.weighted:
            return float(self.nobs)
        w = np.ones(self.nobs) if self.weights is None else self.weights
        per_school = np.add.reduceat(w, self.starts)
        W = np.ones(self.ngroups) if self.group_weights is None else self.group_weights
        return float(np.dot(W, per_school))

    @property
    def response(self) -> np.ndarray:
        """The response as observed (``y`` plus the mean offset; rows sorted by group)."""
        return self.y if self.offset is None else self.y + self.offset

    def log_variance_index(self, alpha):
        r"""The fixed part of the log residual variance, :math:`w_{ij}'\alpha + o^{(s)}_{ij}` (autograd).

        With a ``scale_offset`` the known term :math:`o^{(s)}_{ij}` is added to every row.
        """
        eta = anp.dot(self.W, alpha)
        return eta if self.scale_offset is None else eta + self.scale_offset

    def mean_log_variance_index(self, alpha) -> float:
        r"""The mean over rows of :meth:`log_variance_index` (what the boundary checks compare with).

        A design held by Dask workers (:mod:`mlsml.distributed`) answers from its column means.
        """
        return float(np.mean(self.log_variance_index(alpha)))

    @property
    def bs_rows(self) -> np.ndarray:
        r"""The ``bs_formula`` design of every row (N x m, sorted), :math:`s_{ij} = S_j + S^{(1)}_{ij}`.

        What the MIXREGLS report describes (level-1 columns by their per-observation values); a
        design held by Dask workers (:mod:`mlsml.distributed`) answers with the columns' moments.
        """
        rows = np.asarray(self.S)[self.group]
        return rows if self.S_level1 is None else rows + self.S_level1

    def school_bs_covariates(self) -> np.ndarray:
        r"""Every school's ``bs_formula`` covariates, :math:`\bar s_j = S_j + n_j^{-1} \sum_i S^{(1)}_{ij}` (J x m).

        The school-level columns and the mean of each level-1 column within the school
        (:func:`mlsml.schools.school_covariates` averages them over schools). A design held by
        Dask workers (:mod:`mlsml.distributed`) answers from its blocks' rows of this.
        """
        if self.S_level1 is None:
            return self.S
        return self.S + np.add.reduceat(self.S_level1, self.starts, axis=0) / self.counts[:, None]

    def column_means(self, name: str) -> np.ndarray:
        """The mean of every column of the matrix ``name`` (``"X"``, ``"W"``, ``"Z"`` or ``"G"``).

        With :meth:`mean_squares`, what the boundary checks need of the data; a design held
        by Dask workers (:mod:`mlsml.distributed`) answers from its moments.
        """
        return np.asarray(getattr(self, name), dtype=float).mean(axis=0)

    def mean_squares(self, name: str) -> np.ndarray:
        """The mean of the squares of every column of the matrix ``name`` (see :meth:`column_means`)."""
        return (np.asarray(getattr(self, name), dtype=float) ** 2).mean(axis=0)

    def with_response(self, y, caller_order: bool = False) -> Design:
        """The same design with a new response ``y`` (no formula re-evaluation).

        Used by the parametric bootstrap to refit simulated responses.

        Parameters
        ----------
        y : array-like (N,)
            New response values, in the design's group-sorted row order, or in
            the caller's row order (of the rows used) when ``caller_order``.
        caller_order : bool
            Whether ``y`` is in the caller's row order.

        Returns
        -------
        Design
            A new design sharing every other array with this one.

        Examples
        --------
        >>> import numpy as np, mlsml
        >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
        >>> design = mlsml.MELSM.from_formula("y ~ x", df, groups="school").design
        >>> new = design.with_response(np.zeros(design.nobs))
        >>> float(new.y.sum()), new.X is design.X
        (0.0, True)
        """
        import dataclasses

        y = np.asarray(y, dtype=float)
        if y.shape != (self.nobs,):
            raise DataError(f"the new response has shape {y.shape}; the design has {self.nobs} rows")
        if not np.all(np.isfinite(y)):
            raise DataError(f"the new response has {int((~np.isfinite(y)).sum())} non-finite values")
        if caller_order:
            y = y[self.order]
        y = y.copy()
        y.setflags(write=False)
        return dataclasses.replace(self, y=y)


@dataclass(frozen=True)
class FormulaSpec:
    """What is needed to rebuild the design matrices for new data.

    ``mean_spec``, ``scale_spec`` and ``re_spec`` are the formula engine's
    descriptions of the evaluated designs (patsy ``DesignInfo``): categorical
    levels, contrasts and the state of stateful transforms (``center(x)``,
    ``standardize(x)``, the knots of ``bs(x, df=3)``), which new data must reuse.
    ``frame`` is the data they were evaluated on (the columns the formulas use,
    the rows of the fit, after the preparation of :func:`build_design`).

    **Pickling.** patsy refuses to pickle a ``DesignInfo`` (patsy issue 26: it
    holds the formula's evaluation environment). A ``FormulaSpec`` therefore
    pickles as its formulas and ``frame``, and unpickling evaluates the formulas
    on ``frame`` again (:func:`_rebuild_formula_spec`). Every part of a
    ``DesignInfo`` is a deterministic function of the formula and that data, so
    the rebuilt descriptions are the fitted ones -- with any formula engine and
    any version of it, and without relying on the engine's private structures
    (which differ between patsy 0.5 and 1.0). The cost is one evaluation of the
    formulas on unpickling, about what building the design cost.
    """

    formula: str
    scale_formula: str
    re_formula: str
    groups: str
    mean_spec: Any
    scale_spec: Any
    re_spec: Any
    response: str
    scale_re_formula: str | None = None
    bs_formula: str | None = None
    frame: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def __reduce__(self):
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ENGINE_SPECS}
        return (_rebuild_formula_spec, (state,))


#: Fields of :class:`FormulaSpec` that hold the formula engine's (unpicklable) objects.
_ENGINE_SPECS = ("mean_spec", "scale_spec", "re_spec")


def _rebuild_formula_spec(state: dict[str, Any]) -> FormulaSpec:
    """Unpickle a :class:`FormulaSpec`: evaluate its formulas on its ``frame`` again."""
    frame = state.get("frame")
    specs: dict[str, Any] = dict.fromkeys(_ENGINE_SPECS)
    if frame is not None:
        groups = state["groups"]
        specs["mean_spec"] = _materialise(state["formula"], frame, "mean formula", groups)[1]
        specs["scale_spec"] = _materialise(state["scale_formula"], frame, "scale formula", groups)[1]
        specs["re_spec"] = _materialise(state["re_formula"], frame, "random-effects formula", groups)[1]
    return FormulaSpec(**state, **specs)


#: A name in a formula: a Python identifier in any script (patsy accepts ``école``),
#: possibly dotted (``np.log``).
_IDENT = re.compile(r"[^\W\d][\w\.]*")


def formula_columns(formula: str, data: pd.DataFrame) -> list[str]:
    """Columns of ``data`` that a formula refers to (by name).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"y": [1.0], "x": [2.0], "eth": ["a"], "unused": [0]})
    >>> formula_columns("y ~ x + C(eth)", df)
    ['y', 'x', 'eth']
    """
    names = set(_IDENT.findall(formula))
    quoted = set(re.findall(r"Q\(['\"](.+?)['\"]\)", formula))
    return [c for c in data.columns if str(c) in names or str(c) in quoted]


def _check_formula_names(formula: str, data: pd.DataFrame, what: str) -> None:
    """Every bare name in a formula must be a column (or a function/keyword of the formula language).

    Names followed by ``(`` are functions (``C(...)``, ``np.log(...)``, ``bs(...)``) and
    names followed by a single ``=`` are keyword arguments (``bs(x, df=3)``); patsy
    evaluates both itself and reports unknown functions. Anything else that is not a
    column is a typo the user should hear about by name.
    """
    builtin = {"Treatment", "Sum", "Poly", "Diff", "Helmert", "Intercept", "True", "False", "None"}
    stripped = re.sub(r"(['\"]).*?\1", "", formula)
    for match in _IDENT.finditer(stripped):
        name = match.group(0)
        rest = stripped[match.end() :].lstrip()
        if rest.startswith("(") or (rest.startswith("=") and not rest.startswith("==")):
            continue
        base = name.split(".")[0]
        if name in data.columns or base in builtin or base in ("np", "numpy", "math"):
            continue
        raise ModelSpecError(
            f"{what} {formula!r} names {name!r}, which is not a column of the data "
            f"(columns: {', '.join(map(str, data.columns[:20]))}{'...' if data.shape[1] > 20 else ''})"
        )


def _rhs(formula: str) -> str:
    formula = formula.strip()
    if "~" not in formula:
        formula = "~ " + formula
    return formula


class _MemoNAAction:
    """patsy's ``NAAction(on_NA="raise")`` that judges each distinct categorical value once.

    patsy converts a ``C(...)`` term to level codes element by element, asking
    ``NA_action.is_categorical_NA(value)`` for every row: the ``C(...)`` box hides
    the column's pandas ``Categorical`` dtype from patsy's vectorised path
    (``patsy.categorical.categorical_to_int`` tests for it before unboxing), and
    each answer goes through ``float(value)`` inside a ``try`` -- on the London
    Model 6 formulas 570,000 calls, 1.5 s. The answer is a function of the value
    alone, so it is memoised per distinct value; every value is still judged by
    patsy's own rule (so a text level ``"nan"`` counts as missing exactly as
    before); the values are hashable, since text columns are made pandas ``Categorical``
    before patsy sees them (which refuses unhashable values). Everything else (numerical
    missing values, what ``"raise"`` does) is patsy's ``NAAction``, by delegation,
    so the design matrices and the errors are unchanged. One instance per formula
    evaluation: the memo lives no longer than one call.
    """

    def __init__(self) -> None:
        self._base = patsy.NAAction(on_NA="raise")
        self._memo = _NAMemo(self._base)
        # patsy calls this once per row: the memo's own (C-level) lookup, no Python frame per
        # row for a value already judged (halves what is left of the loop on London Model 6)
        self.is_categorical_NA = self._memo.__getitem__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class _NAMemo(dict):
    """``value -> patsy's is_categorical_NA(value)``, filled on first sight of a value."""

    def __init__(self, base: Any) -> None:
        super().__init__()
        self._base = base

    def __missing__(self, obj: Any) -> bool:
        answer = self[obj] = bool(self._base.is_categorical_NA(obj))
        return answer


def _materialise(formula: str, data: pd.DataFrame, what: str, groups=None):
    """Design matrices of one formula and its patsy ``DesignInfo`` (of the right-hand side).

    With ``groups`` (the grouping column) the formula's ``within(x)`` and ``between(x)``
    get it as their second argument first (:func:`mlsml.groupmeans.expand_group_transforms`).

    patsy is called directly, as statsmodels' formula front end does by default:
    that front end is private and differs between statsmodels releases (0.14 has
    no ``statsmodels.formula._manager``). ``eval_env=0``: names in formulas
    (``np.log``) resolve in this module, as with statsmodels. Missing values raise
    (``NAAction(on_NA="raise")``, with the memo of :class:`_MemoNAAction`).
    """
    if groups is not None:
        formula = expand_group_transforms(formula, groups)
    try:
        if "~" not in formula or formula.strip().startswith("~"):  # one-sided
            out = patsy.dmatrix(formula, data, eval_env=0, NA_action=_MemoNAAction(), return_type="dataframe")
            spec = out.design_info
        else:
            out = patsy.dmatrices(formula, data, eval_env=0, NA_action=_MemoNAAction(), return_type="dataframe")
            spec = out[1].design_info
    except Exception as exc:  # patsy raises many types; re-raise with context
        if "dtype category" in str(exc) or "dtype object" in str(exc):  # arithmetic on a text column
            raise DataError(f"the {what} {formula!r} applies a numeric operation to a non-numeric (text) column: {exc}") from exc
        if "missing values" in str(exc):  # a transformation (np.log(x), ...) made NaN/inf
            raise DataError(
                f"the {what} {formula!r} produces missing or non-finite values from finite data "
                f"(e.g. the log of a non-positive number): {exc}"
            ) from exc
        raise ModelSpecError(f"could not evaluate the {what} {formula!r}: {exc}") from exc
    return out, spec


def _materialise_together(items: list[tuple[str, str]], data: pd.DataFrame):
    """:func:`_materialise` of several formulas on the same data, each factor evaluated once.

    ``items`` are ``(formula, what)``; the first may be two-sided (the mean formula),
    the others are one-sided. patsy's lower-level API (``design_matrix_builders`` and
    ``build_design_matrices`` on a list of term lists, what ``dmatrices`` does with its
    two) evaluates a factor shared by several formulas -- ``C(ethnicity, ...)`` in the
    mean and in the scale formula -- once, and makes one pass over the data to find the
    categorical levels instead of one per formula. The matrices and design infos are
    those of separate calls. Anything unusual (a one-sided formula with a left-hand
    side, a two-sided one without) and every error is left to :func:`_materialise`,
    formula by formula, so messages name the formula at fault exactly as before.

    Returns
    -------
    list of (matrices, DesignInfo)
        As :func:`_materialise` returns them, one per item.
    """
    try:
        descs = [patsy.ModelDesc.from_formula(f) for f, _ in items]
        # two-sided exactly where _materialise would call dmatrices (which needs an outcome)
        expected = [i == 0 and "~" in f and not f.strip().startswith("~") for i, (f, _) in enumerate(items)]
        if [bool(d.lhs_termlist) for d in descs] != expected:
            raise ValueError("left-hand sides differ from what _materialise expects")
        termlists = [descs[0].lhs_termlist] + [d.rhs_termlist for d in descs]
        na_action = _MemoNAAction()
        infos = patsy.design_matrix_builders(termlists, lambda: iter([data]), patsy.EvalEnvironment.capture(0), na_action)
        mats = patsy.build_design_matrices(infos, data, NA_action=na_action, return_type="dataframe")
        if expected[0] and mats[0].shape[1] == 0:
            raise ValueError("no outcome columns")
        two_sided = expected
    except Exception:  # the formula-by-formula path raises the right error, or succeeds
        return [_materialise(f, data, what) for f, what in items]
    out = []
    for i, rhs in enumerate(mats[1:]):
        out.append((((mats[0], rhs) if two_sided[i] else rhs), rhs.design_info))
    return out


#: A text column is taken for numbers stored as text when more than this share of its
#: values parse as numbers ...
NUMERIC_TEXT_SHARE = 0.5
#: ... or when it holds more than this many distinct numbers (among a few text codes).
NUMERIC_TEXT_DISTINCT = 20
#: How many offending values an error message lists.
SHOW_VALUES = 5


def _check_numeric_like(frame: pd.DataFrame, columns: list[str]) -> None:
    """A text column whose values (nearly) all parse as numbers is a data error, not a factor.

    patsy (like statsmodels) treats text columns as categorical. That is right for
    ``ethnicity`` but silently wrong for numbers stored as text -- a column of
    ``"-3" .. "3"`` becomes six dummy columns, a continuous ``x`` read as strings one
    dummy per distinct value -- and for a numeric column polluted by a few strings
    (``"."``, ``"n/a"``). Both raise :class:`~mlsml.DataError` naming the column, the
    non-numeric values and the fix. Columns wrapped in ``C(...)`` in a formula are
    meant as categories and are not checked.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"x": ["-1", "0", "2.5", "."]})
    >>> try:
    ...     _check_numeric_like(frame, ["x"])
    ... except DataError as err:
    ...     print(str(err)[:98])
    column 'x' is mostly numeric (3 of 4 values are numbers) but holds non-numeric values '.' (1 row);
    """
    for col in columns:
        s = frame[col]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            continue
        if not (pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s)):
            continue
        plain = s.map(lambda v: v if isinstance(v, str) or (isinstance(v, numbers.Real) and not isinstance(v, bool)) else None)
        as_num = pd.to_numeric(plain, errors="coerce")
        ok = as_num.notna().to_numpy()
        if not ok.any() or not (ok.mean() > NUMERIC_TEXT_SHARE or as_num[ok].nunique() > NUMERIC_TEXT_DISTINCT):
            continue
        levels = s.nunique()
        as_factor = f"a formula would make it a factor with {levels} levels (one dummy column per distinct value)"
        if ok.all():
            examples = ", ".join(repr(v) for v in pd.unique(s)[:SHOW_VALUES])
            stored = "text" if any(isinstance(v, str) for v in s) else "Python objects"
            raise DataError(
                f"column {col!r} holds numbers stored as {stored} (dtype {s.dtype}: {examples}, ...); {as_factor}. "
                f"Convert it with data[{col!r}] = pd.to_numeric(data[{col!r}]), or write C({col}) in the formula "
                "if the numbers are category codes"
            )
        bad = s[~ok]
        counts = bad.value_counts(sort=True)
        shown = ", ".join(f"{v!r} ({n} row{'s' if n != 1 else ''})" for v, n in counts.iloc[:SHOW_VALUES].items())
        more = f" and {len(counts) - SHOW_VALUES} more" if len(counts) > SHOW_VALUES else ""
        raise DataError(
            f"column {col!r} is mostly numeric ({int(ok.sum())} of {len(s)} values are numbers) but holds "
            f"non-numeric values {shown}{more}; first at index {bad.index[0]!r}; as it stands {as_factor}. "
            f"If these mark missing values, read the file with na_values=[...] (pd.read_csv) or convert with "
            f"pd.to_numeric(data[{col!r}], errors='coerce') so that those rows are dropped with a warning; "
            f"if the column is categorical, write C({col}) in the formula"
        )


def _check_unique_columns(data: pd.DataFrame, used: list) -> None:
    """Formulas and ``groups`` name columns: a name must not stand for two columns."""
    dup = data.columns[data.columns.duplicated()]
    clash = [c for c in used if c in set(dup)]
    if clash:
        c = clash[0]
        raise DataError(
            f"the data has {int((data.columns == c).sum())} columns named {c!r}; formulas and groups= refer to "
            "columns by name, so rename or drop the duplicates (e.g. data.loc[:, ~data.columns.duplicated()])"
        )


def to_numpy_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with pandas' nullable columns as plain numpy columns.

    Called after listwise deletion, so no ``pd.NA`` is left: ``boolean`` becomes
    ``bool`` (a two-level factor, as a numpy bool column), ``Int64`` etc. become
    ``int64``, ``Float64`` etc. become ``float64`` and the ``string`` dtype becomes
    ``object``. patsy (0.5 and 1.0) cannot read the nullable dtypes.
    """
    frame = frame.copy()
    for c in frame.columns:
        dtype = frame[c].dtype
        if not isinstance(dtype, pd.api.extensions.ExtensionDtype) or isinstance(dtype, pd.CategoricalDtype):
            continue
        s = frame[c]
        if pd.api.types.is_bool_dtype(dtype):
            frame[c] = s.to_numpy(dtype=bool)
        elif pd.api.types.is_integer_dtype(dtype):
            frame[c] = s.to_numpy(dtype=np.int64)
        elif pd.api.types.is_float_dtype(dtype):
            frame[c] = s.to_numpy(dtype=float)
        elif pd.api.types.is_string_dtype(dtype):
            frame[c] = s.to_numpy(dtype=object)
    return frame


def _check_dtypes(frame: pd.DataFrame, columns: list[str]) -> None:
    """Column types a formula cannot use sensibly: dates, durations, complex numbers.

    patsy would turn a date column into a factor with one level per distinct
    date, which is never what is meant.
    """
    for col in columns:
        s = frame[col]
        if pd.api.types.is_complex_dtype(s) or not (
            pd.api.types.is_numeric_dtype(s)
            or pd.api.types.is_bool_dtype(s)
            or pd.api.types.is_object_dtype(s)
            or pd.api.types.is_string_dtype(s)
            or isinstance(s.dtype, pd.CategoricalDtype)
        ):
            raise DataError(
                f"column {col!r} has dtype {s.dtype}, which a formula cannot use; convert it to a "
                "real number (e.g. days since a date) or to a categorical"
            )


#: :func:`_clearly_full_rank` accepts a design when the smallest eigenvalue of its column-scaled
#: Gram matrix exceeds the largest times this factor times ``N * p * eps`` (``N`` rows, ``p``
#: columns): far above the rounding error of forming and decomposing the Gram matrix.
GRAM_RANK_SAFETY = 1e3


def _clearly_full_rank(M: np.ndarray) -> bool:
    r"""Whether ``M`` (N x p) has full column rank beyond doubt, from its p x p Gram matrix.

    A cheap first test for :func:`_check_columns`: an SVD of the N x p design (what
    ``numpy.linalg.matrix_rank`` does) costs tens of milliseconds on large data, the
    Gram matrix one pass and a p x p eigenvalue problem. With :math:`D` the column
    norms of :math:`M` and :math:`\lambda` the eigenvalues of

    .. math:: C = D^{-1} M^\top M D^{-1},

    the answer is ``True`` when

    .. math:: \lambda_{\min}(C) > \mathrm{GRAM\_RANK\_SAFETY}\; N p\, \epsilon\; \lambda_{\max}(C).

    Forming :math:`M^\top M` perturbs it by at most about :math:`N p\,\epsilon\,\lambda_{\max}`
    (and the eigenvalue solver by much less), so then the smallest singular value of the
    scaled design is at least :math:`\sqrt{\lambda_{\min}/\lambda_{\max}} \gg N\epsilon` times the
    largest, and ``matrix_rank`` (tolerance :math:`\sigma_{\max} N \epsilon`) finds full
    rank too. ``False`` means "not sure": the caller then runs the exact SVD test, so the
    decision (and the error message) is the one ``matrix_rank`` gives.
    """
    n, p = M.shape
    gram = M.T @ M
    norm = np.sqrt(np.diag(gram))
    if not np.all(np.isfinite(gram)) or np.any(norm == 0):
        return False
    eig = np.linalg.eigvalsh(gram / np.outer(norm, norm))
    return bool(eig[0] > GRAM_RANK_SAFETY * n * p * np.finfo(float).eps * eig[-1])


def _check_columns(M: np.ndarray, names: list[str], what: str, groups: np.ndarray | None = None) -> None:
    """Constant and collinear columns, with the offending names."""
    if M.shape[1] == 0:
        return
    bad = ~np.isfinite(M)
    if bad.any():
        j = int(np.nonzero(bad.any(axis=0))[0][0])
        i = int(np.nonzero(bad[:, j])[0][0])
        raise DataError(f"{what} column {names[j]!r} has a non-finite value ({M[i, j]!r}) in row {i}")
    has_intercept = "Intercept" in names
    for j, name in enumerate(names):
        if name == "Intercept":
            continue
        col = M[:, j]
        if np.ptp(col) == 0 and has_intercept:
            raise ModelSpecError(
                f"{what} column {name!r} is constant (all values {col[0]!r}); it is collinear "
                "with the intercept -- remove it from the formula"
            )
    if _clearly_full_rank(M):
        return
    scale = np.sqrt((M**2).mean(axis=0))
    scale[scale == 0] = 1.0
    Ms = M / scale
    rank = np.linalg.matrix_rank(Ms)
    if rank < M.shape[1]:
        # find the first column that adds nothing
        for j in range(1, M.shape[1] + 1):
            if np.linalg.matrix_rank(Ms[:, :j]) < j:
                raise ModelSpecError(
                    f"{what} is rank deficient: column {names[j - 1]!r} is a linear combination "
                    f"of earlier columns ({', '.join(map(repr, names[: j - 1]))})"
                )


def _columns_list(data: pd.DataFrame) -> str:
    """``(columns: a, b, ...)`` for error messages (at most 20 names)."""
    more = "..." if data.shape[1] > 20 else ""
    return f"(columns: {', '.join(map(str, data.columns[:20]))}{more})"


def _unused_name(base: str, data: pd.DataFrame) -> str:
    name, i = base, 1
    while name in data.columns:
        name, i = f"{base}_{i}", i + 1
    return name


def resolve_groups(groups, data: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """The name of the grouping column and a frame that holds it.

    ``groups`` is a column name (the mlsml spelling) or, as in statsmodels'
    ``MixedLM(groups=df["school"])``, the group labels themselves: a
    :class:`pandas.Series`, :class:`pandas.Index`, 1-D array or list with one label
    per row of ``data``. Arrays and lists are aligned by position; a Series by its
    index when that holds the same labels as the data's index (in any order), and
    otherwise refused. Labels that are not a column yet are added to a shallow copy
    of ``data`` (the caller's frame is never modified) under the Series' name, or
    ``"groups"``.

    Parameters
    ----------
    groups : str or array-like
        Column name or group labels.
    data : pandas.DataFrame
        The caller's data (not modified).

    Returns
    -------
    name : hashable
        The grouping column's name in the returned frame.
    data : pandas.DataFrame
        ``data`` itself, or a shallow copy with the labels added.

    Raises
    ------
    ModelSpecError
        Unknown column name, labels of the wrong length or shape, or a Series whose
        index does not match the data's. Messages describe a Series by its name and
        length, never by its values.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"y": [1.0, 2.0, 3.0], "school": ["a", "a", "b"]})
    >>> resolve_groups("school", df)[0]
    'school'
    >>> resolve_groups(df["school"], df)[0]          # the column itself: used by name
    'school'
    >>> name, frame = resolve_groups(["p", "q", "q"], df)
    >>> name, frame[name].tolist(), list(df.columns)
    ('groups', ['p', 'q', 'q'], ['y', 'school'])
    """
    if isinstance(groups, str):
        if groups in data.columns:
            return groups, data
        near = [str(c) for c in data.columns if str(c).lower() == groups.lower()]
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ModelSpecError(f"groups={groups!r} is not a column of the data {_columns_list(data)}{hint}")
    if groups is None:
        raise ModelSpecError(
            f"groups is required: the name of the grouping (school) column, e.g. groups='school' {_columns_list(data)}"
        )
    if isinstance(groups, pd.DataFrame):
        raise ModelSpecError(
            f"groups is a DataFrame with {groups.shape[1]} column(s); pass one grouping column, by name "
            "(groups='school'): mlsml fits two-level models"
        )
    is_label = False
    try:
        is_label = not isinstance(groups, tuple | list) and groups in data.columns
    except TypeError:  # unhashable: an array of labels
        pass
    if is_label:  # a non-string column label (e.g. 0 for a frame read without a header)
        return groups, data
    if isinstance(groups, tuple | list) and groups and all(isinstance(g, str) and g in data.columns for g in groups):
        raise ModelSpecError(
            f"groups={list(groups)!r} names {len(groups)} columns; mlsml fits two-level models with one grouping "
            "column: pass one name (for nested ids build one column first, e.g. "
            "data['sch_class'] = data['school'].astype(str) + '/' + data['class'].astype(str))"
        )
    if not isinstance(groups, pd.Series | pd.Index | np.ndarray | list | tuple | pd.Categorical | pd.api.extensions.ExtensionArray):
        raise ModelSpecError(
            f"groups must be the name of the grouping column (e.g. groups='school') or one label per row, not {describe_value(groups)}"
        )
    if isinstance(groups, np.ndarray) and groups.ndim != 1:
        raise ModelSpecError(f"groups is an array of shape {groups.shape}; it must be 1-D (one label per row)")
    n = len(groups)
    if n != len(data):
        raise ModelSpecError(
            f"groups has {n} labels ({describe_value(groups)}) but the data has {len(data)} rows; pass the name "
            "of the grouping column (e.g. groups='school') or one label per row"
        )
    name = getattr(groups, "name", None)
    if isinstance(groups, pd.Series):
        if not groups.index.equals(data.index):
            same_labels = (
                groups.index.is_unique and data.index.is_unique and groups.index.sort_values().equals(data.index.sort_values())
            )
            if not same_labels:
                raise ModelSpecError(
                    f"groups is {describe_value(groups)} whose index does not match the data's index, so its "
                    "labels cannot be aligned with the rows; pass the column name (groups='school'), or "
                    "groups=series.to_numpy() to align by position"
                )
            groups = groups.reindex(data.index)
        values = pd.Series(groups.array, index=data.index)
    else:  # aligned by position (a list of tuples stays a column of tuples)
        values = pd.Series(list(groups) if isinstance(groups, list | tuple) else groups, index=data.index)
    if name is not None and name in data.columns and data[name].equals(values):
        return name, data
    if name is None or name in data.columns:
        name = _unused_name("groups" if name is None else f"{name}_groups", data)
    data = data.copy(deep=False)
    data[name] = values
    return name, data


def build_design(
    formula: str,
    data: pd.DataFrame,
    groups,
    scale_formula: str = "~ 1",
    re_formula: str = "~ 1",
    random_scale: bool = True,
    missing: str = "drop",
    scale_re_formula: str | None = None,
    bs_formula: str | None = None,
    missing_code: float | None = None,
    drop_constant_groups: bool = False,
) -> tuple[Design, FormulaSpec]:
    """Evaluate the formulas on ``data`` and return the sorted design.

    Parameters
    ----------
    formula : str
        Mean function, ``"y ~ x1 + x2"``.
    data : pandas.DataFrame
        One row per observation (student). Not modified.
    groups : str or array-like
        Name of the grouping (school) column, or the labels, one per row (see
        :func:`resolve_groups`). Any hashable values; need not be sorted.
    scale_formula : str
        Right-hand side of ``ln var(e_ij) = w_ij' alpha (+ v_j)``.
    re_formula : str
        Right-hand side of the random part of the mean, ``z_ij``; ``"~ 1"`` is a
        random intercept, ``"~ x"`` a random intercept and slope on ``x``.
    random_scale : bool
        Include the school effect ``v_j`` on the log residual variance.
    missing : {"drop", "raise"}
        Listwise deletion with a counted :class:`MissingDataWarning`, or an error.
    scale_re_formula : str, optional
        School effects in the log variance, ``ln var(e_ij) = w_ij' alpha + g_ij' v_j``
        (``"~ x"``: random scale intercept and slope on ``x``). Implies a random scale.
    bs_formula : str, optional
        Covariates of the between-school variance, ``ln var(u0) = s_ij' tau``: school-level
        columns (constant within each group) and level-1 (time-varying) ones, which load the
        random intercept row by row (:attr:`Design.S_level1`).
    missing_code : float, optional
        A value that stands for a missing value (MixWILD's ``YMISS``, e.g. ``-999``) in
        any numeric column a formula uses, or in ``groups``: those values become missing
        before the missing-value rule (``missing``) applies, and the warning counts them.
    drop_constant_groups : bool
        Drop the groups whose response is constant (all their responses equal, including
        groups of one row), with a :class:`MissingDataWarning` naming how many and which
        (MixWILD's ``DISCARD0 = 1``). Such a group carries no information on its own
        residual variance.

    Returns
    -------
    Design, FormulaSpec

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> design, spec = build_design("y ~ x", df, groups="school", scale_formula="~ x")
    >>> design.X.shape, design.W.shape, design.Z.shape, design.ngroups
    ((5404, 2), (5404, 2), (5404, 1), 40)
    >>> bool((np.diff(design.group) >= 0).all())   # rows sorted by group
    True
    >>> bool((design.y[np.argsort(design.order)] == df["y"].to_numpy()).all())   # back to the caller's order
    True
    """
    formulas = {
        "formula": formula,
        "scale_formula": scale_formula,
        "re_formula": re_formula,
        "scale_re_formula": scale_re_formula,
        "bs_formula": bs_formula,
    }
    check_no_lme4_terms(formulas, groups=groups, random_scale=random_scale)
    check_formula_sides(formulas)
    if not isinstance(data, pd.DataFrame):
        try:
            data = pd.DataFrame(data)
        except Exception as exc:
            raise DataError(f"data must be a pandas DataFrame (got {type(data).__name__})") from exc
    if not isinstance(missing, str) or missing not in ("drop", "raise"):
        raise ModelSpecError(f"missing must be 'drop' or 'raise', not {describe_value(missing)}")
    if not isinstance(random_scale, bool | np.bool_):
        raise ModelSpecError(f"random_scale must be True or False, not {describe_value(random_scale)}")
    if data.shape[0] == 0:
        raise DataError("the data frame is empty (0 rows)")
    groups, data = resolve_groups(groups, data)
    scale_formula = "~ 1" if scale_formula is None else scale_formula
    re_formula = "~ 1" if re_formula is None else re_formula
    scale_formula = _rhs(scale_formula)
    re_formula = _rhs(re_formula)
    extra = {}
    if scale_re_formula is not None:
        extra["scale_re"] = _rhs(scale_re_formula)
        _check_formula_names(extra["scale_re"], data, "the scale random-effects formula")
    if bs_formula is not None:
        extra["bs"] = _rhs(bs_formula)
        _check_formula_names(extra["bs"], data, "the between-school variance formula")
    response = formula.split("~", 1)[0].strip()
    _check_formula_names(formula, data, "the mean formula")
    _check_formula_names(scale_formula, data, "the scale formula")
    _check_formula_names(re_formula, data, "the random-effects formula")

    # ---- missing values: find them in every column any formula uses
    used = []
    for f in (formula, scale_formula, re_formula, *extra.values()):
        for c in formula_columns(f, data):
            if c not in used:
                used.append(c)
    if groups not in used:
        used.append(groups)
    _check_unique_columns(data, used)
    frame = data.loc[:, used]
    n_code = {}
    if missing_code is not None:
        frame, n_code = apply_missing_code(frame, missing_code)
    na = frame.isna()
    numeric = [c for c in used if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    inf = pd.DataFrame(False, index=frame.index, columns=used)
    for c in numeric:
        inf[c] = ~np.isfinite(frame[c].to_numpy(dtype=float, na_value=np.nan)) & ~na[c].to_numpy()
    bad = na | inf
    dropped = bad.any(axis=1).to_numpy()
    if dropped.any():
        per_col = {c: int(bad[c].sum()) for c in used if bad[c].any()}
        desc = ", ".join(f"{c!r}: {n}" for c, n in per_col.items())
        if n_code:
            coded = ", ".join(f"{c!r}: {n}" for c, n in n_code.items())
            desc += f"; of these, values equal to missing_code={missing_code!r}: {coded}"
        if missing == "raise":
            first = frame.index[np.nonzero(dropped)[0][0]]
            raise DataError(
                f"missing or non-finite values in {int(dropped.sum())} rows (per column: {desc}); "
                f"first at index {first!r}. Pass missing='drop' for listwise deletion."
            )
        warn(
            f"listwise deletion: dropped {int(dropped.sum())} of {len(dropped)} rows with missing "
            f"or non-finite values (per column: {desc})",
            MissingDataWarning,
        )
        frame = frame.loc[~dropped]
    if frame.shape[0] == 0:
        raise DataError("no rows left after removing missing values")
    frame = to_numpy_dtypes(frame)
    dropped_groups: list = []
    rows_used = np.flatnonzero(~dropped)  # positions in the caller's frame (weights, offsets)
    if drop_constant_groups:
        frame, dropped_groups, varying = _drop_constant_groups(frame, response, groups)
        rows_used = rows_used[varying]  # the rows of the groups kept: weights and offsets are read for these

    # ---- design matrices
    if response in frame.columns and (
        not pd.api.types.is_numeric_dtype(frame[response])
        or pd.api.types.is_bool_dtype(frame[response])
        or pd.api.types.is_complex_dtype(frame[response])
    ):
        rs = frame[response]
        textual = pd.api.types.is_object_dtype(rs) or pd.api.types.is_string_dtype(rs)
        bad = rs[pd.to_numeric(rs, errors="coerce").isna()] if textual else rs.iloc[:0]
        example = f" (e.g. {bad.iloc[0]!r} at index {bad.index[0]!r})" if len(bad) else ""
        if textual and not len(bad):
            example = f" (numbers stored as text: convert with data[{response!r}] = pd.to_numeric(data[{response!r}]))"
        raise DataError(
            f"the response {response!r} is not real-valued numeric (dtype {rs.dtype}){example}; a MELSM needs a continuous response"
        )
    _check_dtypes(frame, [c for c in used if c != groups])
    in_c = set(re.findall(r"C\(\s*([^\W\d][\w\.]*)", formula + scale_formula + re_formula + "".join(extra.values())))
    _check_numeric_like(frame, [c for c in used if c != groups and c not in in_c])
    # patsy inspects text columns element by element; categoricals are read from
    # their categories, which is ~50x faster on large data (same design matrices).
    for c in used:
        if c != groups and (pd.api.types.is_object_dtype(frame[c]) or pd.api.types.is_string_dtype(frame[c])):
            frame[c] = pd.Categorical(frame[c])
    evaluated = _materialise_together(
        [
            (expand_group_transforms(formula, groups), "mean formula"),
            (expand_group_transforms(scale_formula, groups), "scale formula"),
            (expand_group_transforms(re_formula, groups), "random-effects formula"),
        ],
        frame,
    )
    ((ydf, Xdf), mean_spec), (Wdf, scale_spec), (Zdf, re_spec) = evaluated
    if ydf.shape[1] != 1:
        raise ModelSpecError(f"the response of {formula!r} must be a single numeric column")
    y = ydf.to_numpy(dtype=float).ravel()
    X = Xdf.to_numpy(dtype=float)
    W = Wdf.to_numpy(dtype=float)
    Z = Zdf.to_numpy(dtype=float)
    mean_terms = [display_name(str(c), groups) for c in Xdf.columns]
    scale_terms = [display_name(str(c), groups) for c in Wdf.columns]
    if X.shape[1] == 0:
        raise ModelSpecError("the mean formula has no terms (not even an intercept)")
    if W.shape[1] == 0:
        raise ModelSpecError("the scale formula has no terms: it needs at least an intercept ('~ 1')")
    if not np.all(np.isfinite(y)):
        raise DataError(f"the response {response!r} has non-finite values")
    _check_columns(X, mean_terms, "the mean design")
    _check_columns(W, scale_terms, "the scale design")
    re_terms = [display_name(str(c), groups) for c in Zdf.columns]
    _check_columns(Z, re_terms, "the random-effects design")

    # ---- groups
    gcol = frame[groups]
    try:
        codes, labels = pd.factorize(gcol, sort=True)
    except TypeError as exc:  # unhashable ids (lists, dicts, arrays)
        bad = next(v for v in gcol if not isinstance(v, Hashable))
        raise DataError(
            f"the grouping column {groups!r} holds unhashable values (e.g. a {type(bad).__name__} at index "
            f"{gcol.index[[not isinstance(v, Hashable) for v in gcol]][0]!r}); group ids must be numbers, strings "
            "or tuples"
        ) from exc
    J = len(labels)
    if J < 2:
        raise DataError(f"the grouping column {groups!r} has {J} distinct value(s); at least two groups are needed")
    order = np.argsort(codes, kind="stable")
    codes_sorted = codes[order]
    counts = np.bincount(codes_sorted, minlength=J)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ys = y[order]
    # a response constant in every group leaves no within-school variance to model
    # (exact and independent of the units of y: every group's range is zero)
    if np.all(np.maximum.reduceat(ys, starts) == np.minimum.reduceat(ys, starts)) and np.ptp(ys) > 0:
        raise DataError(
            f"the response {response!r} does not vary within any group of {groups!r}: the residual variance cannot be estimated"
        )
    if np.ptp(ys) == 0:
        raise DataError(f"the response {response!r} is constant ({ys[0]!r})")

    G, S, scale_re_terms, bs_terms, S_level1 = extra_designs(frame, extra, codes, order, starts, groups)
    layout = ParamLayout(
        mean_terms=tuple(mean_terms),
        scale_terms=tuple(scale_terms),
        n_re_mean=Z.shape[1],
        random_scale=bool(random_scale) or "scale_re" in extra,
        scale_re_terms=scale_re_terms,
        bs_terms=bs_terms,
    )
    if layout.d == 0:
        raise ModelSpecError("the model has no school effects: give re_formula and/or random_scale=True")
    singles = int((counts == 1).sum())
    info = {
        "response": response,
        "rows_used": rows_used,
        "n_dropped": int(dropped.sum()),
        "constant_groups_dropped": tuple(dropped_groups),
        "n_singletons": singles,
        "re_terms": tuple(re_terms),
    }
    design = Design(
        y=ys,
        X=np.ascontiguousarray(X[order]),
        W=np.ascontiguousarray(W[order]),
        Z=np.ascontiguousarray(Z[order]),
        group=codes_sorted.astype(np.intp),
        starts=starts.astype(np.intp),
        counts=counts.astype(np.intp),
        group_labels=np.asarray(labels),
        order=order.astype(np.intp),
        row_labels=frame.index,
        layout=layout,
        info=info,
        G=G,
        S=S,
        S_level1=S_level1,
    )
    spec = FormulaSpec(
        formula=formula,
        scale_formula=scale_formula,
        re_formula=re_formula,
        groups=groups,
        mean_spec=mean_spec,
        scale_spec=scale_spec,
        re_spec=re_spec,
        response=response,
        scale_re_formula=extra.get("scale_re"),
        bs_formula=extra.get("bs"),
        frame=frame,
    )
    return design, spec


#: How many group labels a warning about dropped groups lists.
SHOW_GROUPS = 10


def apply_missing_code(frame: pd.DataFrame, code) -> tuple[pd.DataFrame, dict[str, int]]:
    """``frame`` with every numeric value equal to ``code`` made missing, and the count per column."""
    if isinstance(code, bool) or not isinstance(code, numbers.Real) or not np.isfinite(code):
        raise ModelSpecError(f"missing_code must be a finite number (e.g. -999), not {describe_value(code)}")
    out = frame.copy()
    counts = {}
    for c in frame.columns:
        s = frame[c]
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            continue
        hit = (s == code).fillna(False).to_numpy(dtype=bool)
        if hit.any():
            counts[c] = int(hit.sum())
            out[c] = s.astype("float64").where(~hit)
    return out, counts


def _drop_constant_groups(frame: pd.DataFrame, response: str, groups) -> tuple[pd.DataFrame, list, np.ndarray]:
    """Rows of the groups whose response varies, the labels of the groups dropped (with a warning)
    and the mask of the rows kept."""
    y = response_values(frame, response)
    keep = np.ones(frame.shape[0], dtype=bool)
    if y is None:
        return frame, [], keep  # not a numeric response: the checks below say so
    g = y.groupby(frame[groups].to_numpy(), sort=False)
    const = (g.transform("max") == g.transform("min")).to_numpy()
    if not const.any():
        return frame, [], keep
    labels = list(pd.unique(frame[groups].to_numpy()[const]))
    report_constant_groups(labels, frame[groups].nunique(), int(const.sum()), response, groups)
    return frame.loc[~const], [v.item() if isinstance(v, np.generic) else v for v in labels], ~const


def response_values(frame: pd.DataFrame, response: str) -> pd.Series | None:
    """The response evaluated on the rows of ``frame`` (by patsy), or ``None`` when it is not one numeric column."""
    try:
        values = _materialise(f"~ 0 + {response}", frame, "response")[0]
    except (ModelSpecError, DataError):
        return None
    if values.shape[1] != 1:
        return None
    return pd.Series(values.to_numpy(dtype=float)[:, 0], index=frame.index)


def report_constant_groups(labels: list, n_groups: int, n_rows: int, response: str, groups) -> None:
    """``drop_constant_groups``: the warning naming the groups dropped (an error when every group is)."""
    if len(labels) == n_groups:
        raise DataError(f"drop_constant_groups: the response {response!r} is constant within every group of {groups!r}")
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in labels[:SHOW_GROUPS])
    more = f" and {len(labels) - SHOW_GROUPS} more" if len(labels) > SHOW_GROUPS else ""
    warn(
        f"drop_constant_groups: dropped {len(labels)} of {n_groups} groups of {groups!r} ({n_rows} rows) whose "
        f"response {response!r} is constant: {shown}{more}",
        MissingDataWarning,
    )


def extra_designs(frame: pd.DataFrame, extra: dict, codes, order, starts, groups: str):
    """Evaluate ``scale_re_formula`` and ``bs_formula`` (called by :func:`build_design`).

    Returns
    -------
    G : ndarray (N, n_v) or None
        Sorted design of the log-variance school effects; ``None`` when absent or
        when it is only an intercept (then the plain random scale ``v`` is used).
    S : ndarray (J, m) or None
        One row per school of the BS-variance design's school-level columns (zero in the
        level-1 columns).
    scale_re_terms, bs_terms : tuple of str
    S_level1 : ndarray (N, m) or None
        The BS-variance design's level-1 columns (those not constant within some group;
        zero in the school-level columns), sorted rows; ``None`` when there are none.
    """
    G = S = S_level1 = None
    g_terms: tuple[str, ...] = ()
    s_terms: tuple[str, ...] = ()
    if "scale_re" in extra:
        Gdf, _ = _materialise(extra["scale_re"], frame, "scale random-effects formula", groups)
        names = [display_name(str(c), groups) for c in Gdf.columns]
        if not names:
            raise ModelSpecError("scale_re_formula has no terms")
        Gm = Gdf.to_numpy(dtype=float)
        _check_columns(Gm, names, "the scale random-effects design")
        if names != ["Intercept"]:
            G = np.ascontiguousarray(Gm[order])
            g_terms = tuple(names)
    if "bs" in extra:
        Sdf, _ = _materialise(extra["bs"], frame, "between-school variance formula", groups)
        names = [display_name(str(c), groups) for c in Sdf.columns]
        if not names:
            raise ModelSpecError("bs_formula has no terms: it needs at least an intercept ('~ 1')")
        Sm = Sdf.to_numpy(dtype=float)[order]
        _check_columns(Sm, names, "the between-school variance design")
        codes_sorted = np.asarray(codes)[order]
        S, S_level1 = split_bs_design(Sm, bs_level1_columns(Sm, codes_sorted, starts), starts)
        s_terms = tuple(names)
    return G, S, g_terms, s_terms, S_level1


#: A ``bs_formula`` column is level-1 when it differs within some school by more than this
#: relative amount (:func:`bs_level1_columns`).
LEVEL1_TOLERANCE = 1e-12


def bs_level1_columns(Sm: np.ndarray, codes_sorted: np.ndarray, starts: np.ndarray) -> np.ndarray:
    r"""Which columns of the ``bs_formula`` design are level-1 (time-varying): those not constant within some school.

    A column :math:`c` is level-1 when some row :math:`i` of some school :math:`j` differs from
    the school's first row :math:`f_j` by more than :data:`LEVEL1_TOLERANCE` relatively,

    .. math::

        |S_{ic} - S_{f_j c}| > \epsilon\,(1 + |S_{f_j c}|);

    it then loads the random intercept row by row (:attr:`Design.S_level1`). Called by
    :func:`extra_designs` on the whole data and by each block of a fit on a Dask cluster
    (:mod:`mlsml.distributed`), whose flags the driver combines with ``or`` (a column is
    level-1 when it is in some block).

    Parameters
    ----------
    Sm : ndarray (N, m)
        The design's rows sorted by school.
    codes_sorted : ndarray (N,)
        The school of every row (0..J-1, sorted).
    starts : ndarray (J,)
        The first row of every school.

    Returns
    -------
    ndarray (m,) of bool
    """
    first = Sm[starts][codes_sorted]
    # a column that varies within some group is level-1: it loads u0 row by row
    return np.array(
        [bool(np.any(np.abs(Sm[:, c] - first[:, c]) > LEVEL1_TOLERANCE * (1 + np.abs(first[:, c])))) for c in range(Sm.shape[1])],
        dtype=bool,
    )


def split_bs_design(Sm: np.ndarray, level1: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    r"""The school-level and level-1 parts of the ``bs_formula`` design: :math:`s_{ij} = S_j + S^{(1)}_{ij}`.

    ``S`` (J x m) is every school's first row with the level-1 columns (``level1``, from
    :func:`bs_level1_columns`) set to zero; ``S_level1`` (N x m) is the rows with the
    school-level columns set to zero, or ``None`` when no column is level-1.
    """
    S = np.ascontiguousarray(np.where(level1[None, :], 0.0, Sm[starts]))
    S_level1 = np.ascontiguousarray(np.where(level1[None, :], Sm, 0.0)) if level1.any() else None
    return S, S_level1


def check_extended_layout(layout) -> None:
    """Refuse a between-school variance model without a random intercept."""
    if layout.bs_terms and layout.q == 0:
        raise ModelSpecError("bs_formula models the variance of the random intercept u0: re_formula must not be empty")
