r"""MixWILD 2.0's second stage in a job file: its settings read, run by :meth:`mlsml.MELSMResults.stage2`, reported.

A MixWILD 2.0 job (``lsboth_random_mixblank`` layout) with ``STAGE2 > 0`` regresses a
subject-level outcome on the subject's random location and scale. After the stage-1
labels the .def file holds (``readdef_both`` in ``lsboth_random_mixblank.f90``)::

    PFIXED PTHETA POMEGA PTO          (PFIXED PTHETA when NORS = 1)
    MAXJ                              (STAGE2 = 2, 4: the number of categories ...)
    ICODE(1..MAXJ)                    (... and their values)
    FILEDAT2                          (SEPFILE = 1: a separate level-2 data file ...)
    NVARSEP ID2INDSEP                 (... its number of columns and its id column)
    column of the outcome
    PFIXED columns, PTHETA columns, POMEGA columns, PTO columns
    label of the outcome
    PFIXED labels, PTHETA labels, POMEGA labels, PTO labels

``STAGE2`` is the outcome's type: 1 continuous (``mixreg``), 2 ordinal (``mixors``), 3 count
(``mixpreg``), 4 nominal (``mixno``: ``family="nominal"``, the first category ``ICODE(1)`` the
reference). The regressors are (``stage2only.f90``, ``dostage2``):
an intercept and the ``PFIXED`` level-2 covariates when ``PFIXED >= 0``; each standardised
random location effect ``Locat_k`` (one, or one per random effect with ``MLS = 1``) and its
products with the ``PTHETA`` covariates when ``PTHETA >= 0``; the random scale's own part
``Scale_1`` and its products with the ``POMEGA`` covariates when ``POMEGA >= 0``;
``Locat_k Scale_1`` and its products with the ``PTO`` covariates when ``PTO >= 0`` (a count of
-1 leaves the effect out). Every stage-2 column
is averaged over the subject's rows, rows with the missing-value code ``YMISS`` in any
of them are dropped (from stage 1 too, when they are in the stage-1 data file). ``NREPS``
is the number of imputations and ``MYSEED`` the seed.

MixWILD's standardised effects ``theta`` (the quadrature variables of its stage 1, whose EB
means and covariances its ``_ebvar.dat`` passes to ``stage2only``) are functions of mlsml's
school effects ``b = (u0, [u1, ...], v)`` (:class:`ThetaMap`): with ``L0`` the lower Cholesky
factor of ``Sigma`` (of ``Sigma0`` with BS-variance covariates, ``R > 0``),
``D_j = diag(sd_j(u0), 1, ...)`` (``sd_j(u0) = exp(s_j' ALPHA / 2)`` with ``R > 0``, else 1) and
``gamma`` the quadratic association (``NCOV = 2``; else 0),

.. math::

    \theta_j = L_0^{-1} D_j^{-1} \tilde b_j, \qquad
    \tilde b_j = (u_0, \dots, v - \gamma\,\theta_{1j}^2), \qquad
    \theta_{1j} = (L_0^{-1})_{11}\, u_{0j} / \mathrm{sd}_j(u_0),

(``mlsml``'s ``v`` is the whole log-variance shift ``w`` under the quadratic association, so its
quadratic part is taken off first). Without them this is ``theta1 = u0 / sigma_u``,
``theta2 = (v - LocEff theta1) / SD``: MIXREGLS's ``LocEff = sigma_uv / sigma_u`` and
``SD = (sigma_v^2 - LocEff^2)^{1/2}``. With random slopes (``MLS = 1``, MIXREGMLS) ``L0`` is the
Cholesky factor of the covariance of all location effects and the scale, in the order
intercept, slopes, scale, as MIXREGMLS standardises them. So the job's model is a formula
``Y ~ I(a*u0) + I(b*v + c*u0) + ...`` of :func:`mlsml.stage2.stage2` with ``method="mi"``
(MixWILD's method; mlsml draws from the exact posterior and pools by Rubin's rules, see
``docs/stage2.md``), the per-subject ``1 / sd_j(u0)`` a column of its data when ``R > 0``.

``MULTI2ND = 1`` asks for a multilevel second stage: when the stage-2 outcome varies within
subjects, MixWILD fits it on the level-1 rows (the ``PFIXED`` covariates at their level-1
values, the subject's standardised effects repeated on its rows) with a random subject
intercept in each imputation (``mixreg``/``mixors``/``mixpreg``/``mixno`` with one random
effect). mlsml runs them as ``res.stage2(..., multilevel=True)`` with the job's family: the
continuous one (``STAGE2 = 1``) a gaussian random-intercept model fitted by exact ML in each
imputation, the ordinal, count and nominal ones (``STAGE2 = 2, 3, 4``) random-intercept GLMMs
fitted by ML with adaptive Gauss-Hermite quadrature over the intercept
(:func:`mlsml.stage2.fit_random_intercept_glmm`); the random-intercept variance is labelled
``Random.Int.Var`` as MixWILD labels it (the nominal family's per-category loadings
``Random.Int.SD``). When the outcome is constant within subjects MixWILD
falls back to the ordinary second stage (``adjustData2``), and so does mlsml, with a note.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .._lazy import LazyModule
from ..errors import DataError, MissingDataWarning, ModelSpecError, warn
from ..stage2 import GROUP_SD, GROUP_VAR

patsy = LazyModule("patsy")
stats = LazyModule("scipy.stats")

#: mlsml's ``family`` for each ``STAGE2`` (None: not available).
STAGE2_FAMILIES = {1: "gaussian", 2: "ordinal", 3: "poisson", 4: "nominal"}
#: MixWILD's stage-2 programs, for the report.
STAGE2_PROGRAMS = {1: "mixreg (continuous)", 2: "mixors (ordinal)", 3: "mixpreg (count)", 4: "mixno (nominal)"}
#: The fewest imputations :func:`mlsml.stage2.stage2` accepts (``NREPS`` below it is raised to it).
MIN_NREPS = 5


@dataclass(frozen=True)
class Stage2Job:
    """The second-stage settings of a MixWILD 2.0 job (module docstring)."""

    kind: int
    family: str
    counts: tuple[int, int, int, int]
    categories: tuple[float, ...]
    data_file: str | None
    nvar: int | None
    id_col: int | None
    y_col: int
    y_label: str
    cols: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    labels: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    ndraws: int
    seed: int
    multilevel: bool = False

    def columns(self) -> list[tuple[int, str]]:
        """``(column, label)`` of every stage-2 variable, the outcome first."""
        out = [(self.y_col, self.y_label)]
        for cols, labels in zip(self.cols, self.labels):
            out += list(zip(cols, labels))
        return out


def read_stage2(read_record: Callable, settings: dict[str, float], where: str) -> Stage2Job:
    """Read the second-stage records of a MixWILD 2.0 job (``STAGE2 > 0``), checking what mlsml can run.

    ``read_record(n, what, conv)`` reads the next ``n`` list-directed values (column numbers
    with ``conv=int``, text with ``conv=str``), as :func:`mlsml.mixregls.parse_def` does.
    """
    kind = int(settings["STAGE2"])

    def refuse(name: str, why: str) -> ModelSpecError:
        return ModelSpecError(f"{where}: MixWILD option {name} = {settings.get(name, 0):g} with STAGE2 = {kind}: {why}")

    if kind not in STAGE2_FAMILIES:
        raise refuse("STAGE2", "must be 0 (no second stage), 1 (continuous), 2 (ordinal), 3 (count) or 4 (nominal)")
    random_scale = int(settings.get("NORS", 0)) != 1
    n_counts = 4 if random_scale else 2
    counts = [int(c) for c in read_record(n_counts, "the stage-2 counts PFIXED PTHETA POMEGA PTO")] + [-1] * (4 - n_counts)
    for name, c in zip(("PFIXED", "PTHETA", "POMEGA", "PTO"), counts):
        if c < -1 or c > int(settings["NVAR"]):
            raise ModelSpecError(f"{where}: stage-2 count {name} = {c} must be from -1 (effect left out) to NVAR")
    categories: tuple[float, ...] = ()
    if kind in (2, 4):
        maxj = read_record(1, "the number of categories MAXJ")[0]
        if maxj < 2:
            raise ModelSpecError(f"{where}: MAXJ = {maxj}: a categorical outcome needs at least two categories")
        try:
            categories = tuple(float(t.replace("D", "E").replace("d", "e")) for t in read_record(maxj, "the category codes", str))
        except ValueError as exc:
            raise ModelSpecError(f"{where}: the category codes ICODE must be numbers") from exc
    data_file, nvar, id_col = None, None, None
    if int(settings.get("SEPFILE", 0)) == 1:
        data_file = read_record(1, "the stage-2 data file name", str)[0]
        nvar, id_col = read_record(2, "NVARSEP and the stage-2 id column")
    limit = int(settings["NVAR"]) if nvar is None else nvar
    y_col = read_record(1, "the stage-2 outcome column")[0]
    what = ("fixed (level-2)", "location-interaction", "scale-interaction", "location-by-scale-interaction")
    cols = tuple(tuple(read_record(c, f"the stage-2 {w} columns")) if c > 0 else () for c, w in zip(counts, what))
    y_label = read_record(1, "the stage-2 outcome label", str)[0]
    labels = tuple(tuple(read_record(c, f"the stage-2 {w} labels", str)) if c > 0 else () for c, w in zip(counts, what))
    for c in [y_col, *(c for group in cols for c in group)] + ([id_col] if id_col is not None else []):
        if not 1 <= c <= limit:
            raise ModelSpecError(f"{where}: stage-2 column number {c} is outside 1..{'NVARSEP' if nvar else 'NVAR'} = {limit}")
    return Stage2Job(
        kind=kind,
        family=STAGE2_FAMILIES[kind],
        counts=tuple(counts),
        categories=categories,
        data_file=data_file,
        nvar=nvar,
        id_col=id_col,
        y_col=y_col,
        y_label=y_label,
        cols=cols,
        labels=labels,
        ndraws=max(int(settings.get("NREPS", 0)), MIN_NREPS),
        seed=int(settings.get("MYSEED", 0)),
        multilevel=int(settings.get("MULTI2ND", 0)) == 1,
    )


# ---------------------------------------------------------------------- the model
def theta_map(res) -> tuple[float, float, float]:
    """``theta1 = a u0`` and ``theta2 = b v + c u0`` from the fit's ``Sigma`` (a random intercept, a constant ``Sigma``
    and the linear association; :class:`ThetaMap` in general)."""
    S = res.cov_re.to_numpy()
    su = np.sqrt(S[0, 0])
    if S.shape[0] < 2:
        return 1.0 / su, 0.0, 0.0
    loceff = S[0, 1] / su
    sd2 = S[1, 1] - loceff**2
    if not (su > 0 and sd2 > 0):
        raise DataError(
            "the stage-1 fit's random location or scale has no variance of its own (a boundary fit): "
            "MixWILD's standardised effects theta1, theta2 are not defined"
        )
    sd = np.sqrt(sd2)
    return 1.0 / su, 1.0 / sd, -loceff / (sd * su)


#: The stage-2 data column holding ``1 / sd_j(u0)`` of each subject (BS-variance covariates, ``R > 0``).
INV_SD_COLUMN = "_inv_sd_u0"


@dataclass(frozen=True)
class ThetaMap:
    """MixWILD's standardised effects as functions of mlsml's school effects (module docstring).

    Attributes
    ----------
    effects : tuple of str
        mlsml's effect names, ``u0, [u1, ...], [v]``.
    linv : ndarray (d, d)
        ``L0^{-1}``, lower triangular.
    inv_sd : ndarray (J,) or None
        ``1 / sd_j(u0)`` per school in the fit's order (``R > 0``), else None.
    quad : float or None
        ``gamma`` of the quadratic association.
    n_loc : int
        Number of location effects (the rest, at most one, is the scale).
    """

    effects: tuple[str, ...]
    linv: np.ndarray
    inv_sd: np.ndarray | None
    quad: float | None
    n_loc: int

    @classmethod
    def from_fit(cls, res) -> ThetaMap:
        """The map of a fit (``Sigma0`` and ``sd_j(u0)`` with BS-variance covariates)."""
        lay = res.layout
        S = res.cov_re.to_numpy()
        try:
            L = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            L = None
        if L is None or not np.all(np.diag(L) > 0):
            raise DataError(
                "the stage-1 fit's random location or scale has no variance of its own (a boundary fit): "
                "MixWILD's standardised effects theta1, theta2 are not defined"
            )
        linv = np.linalg.solve(L, np.eye(S.shape[0]))
        linv[np.triu_indices(S.shape[0], 1)] = 0.0  # exactly lower triangular
        inv_sd = None
        if lay.bs_terms:
            sig = res.likelihood.integrand.school_covariances(np.asarray(res.theta, dtype=float))
            inv_sd = 1.0 / np.sqrt(sig[:, 0, 0])
        quad = lay.natural_quad(res.params.to_numpy()) if lay.quad_assoc else None
        return cls(tuple(lay.re_names), linv, inv_sd, quad, lay.q)

    def _effect(self, m: int, column: str) -> str:
        name = self.effects[m]
        return f"{column} * {name}" if (m == 0 and self.inv_sd is not None) else name

    def expressions(self, column: str = INV_SD_COLUMN) -> list[str]:
        """One formula expression (the inside of ``I(...)``) per theta, ``column`` holding ``1 / sd_j(u0)``."""
        out = []
        for i in range(len(self.effects)):
            parts = []
            for m in range(i, -1, -1):  # the diagonal first: "b * v + c * u0", as MixWILD's Scale = (v - LocEff theta1) / SD
                coef = float(self.linv[i, m])
                if coef == 0.0:
                    continue
                term = self._effect(m, column)
                if self.quad is not None and m == self.n_loc:
                    term = f"({term} - {self.quad!r} * ({float(self.linv[0, 0])!r} * {self._effect(0, column)}) ** 2)"
                parts.append(f"{coef!r} * {term}")
            out.append(" + ".join(parts))
        return out

    def values(self, b: np.ndarray) -> np.ndarray:
        """``theta`` at school effects ``b`` (J, d) in the fit's school order, shape (J, d)."""
        b = np.array(b, dtype=float)
        if self.inv_sd is not None:
            b[:, 0] = b[:, 0] * self.inv_sd
        if self.quad is not None:
            b[:, self.n_loc] = b[:, self.n_loc] - self.quad * (self.linv[0, 0] * b[:, 0]) ** 2
        return b @ self.linv.T

    @property
    def labels(self) -> list[str]:
        """MixWILD's names of the thetas: ``Locat_1, ..., Scale_1``."""
        return [f"Locat_{k + 1}" for k in range(self.n_loc)] + ["Scale_1"] * (len(self.effects) - self.n_loc)


@dataclass(frozen=True)
class Stage2Model:
    """The job's second stage as an mlsml stage-2 formula and data, with MixWILD's labels."""

    formula: str
    data: pd.DataFrame
    labels: dict[str, str]
    theta: ThetaMap
    notes: tuple[str, ...]


def _names(variables: list[tuple[int, str]], taken: set[str]) -> dict[int, str]:
    """Column names (identifiers) of the stage-2 variables of a separate level-2 file."""
    out: dict[int, str] = {}
    for c, label in variables:
        if c in out:
            continue
        name = re.sub(r"\W", "_", label.strip()) or "v"
        if name[0].isdigit() or name in {"u0", "v", "I", "C", "Q", "np", "Intercept"}:
            name = "s2_" + name
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out[c] = name
    return out


def level2_data(
    s2: Stage2Job,
    raw: pd.DataFrame | None,
    raw_names: dict[int, str],
    cluster: str,
    ymiss: float,
    folder: Path | None,
    reader,
    per_row: bool = False,
) -> tuple[pd.DataFrame, dict[int, str], list[str]]:
    """Per-subject means of the stage-2 columns (MixWILD's ``tempsums / n``), their names, and notes.

    ``raw`` holds the stage-1 rows with the stage-2 columns (named ``raw_names[column]``) when
    ``SEPFILE = 0``; otherwise the separate file is read with ``reader(path, nvar)``. With
    ``per_row`` (the multilevel second stage) the rows themselves are returned, not the means.
    """
    notes = []
    if s2.data_file is None:
        names = dict(raw_names)
        frame = raw[[cluster, *dict.fromkeys(names.values())]]
    else:
        names = _names(s2.columns(), {cluster})
        p = Path(s2.data_file)
        if not p.is_absolute() and folder is not None:
            p = folder / p
        arr = reader(p, s2.nvar)
        cols = list(dict.fromkeys(names))
        frame = pd.DataFrame({names[c]: arr[:, c - 1] for c in cols})
        frame[cluster] = np.trunc(arr[:, s2.id_col - 1])
        if ymiss != 0.0:
            hit = np.isclose(frame[[names[c] for c in cols]].to_numpy(), ymiss, rtol=1e-12, atol=0.0).any(axis=1)
            if hit.any():
                msg = f"stage 2: YMISS = {ymiss:g}: dropped {int(hit.sum())} of {len(hit)} rows of {s2.data_file}"
                warn(msg, MissingDataWarning)
                notes.append(msg)
                frame = frame.loc[~hit]
    if per_row:
        return frame.reset_index(drop=True), names, notes
    g = frame.groupby(cluster, sort=False)
    varying = [n for n in dict.fromkeys(names.values()) if (g[n].nunique() > 1).any()]
    if varying:
        notes.append(f"stage 2: {', '.join(map(repr, varying))} vary within subjects and are averaged per subject, as MixWILD does")
    return g.mean().reset_index(), names, notes


def stage2_model(s2: Stage2Job, res, data: pd.DataFrame, names: dict[int, str]) -> Stage2Model:
    """The formula (MixWILD's regressors as functions of mlsml's school effects) and the labels of its columns.

    With BS-variance covariates ``data`` gets the column :data:`INV_SD_COLUMN` (``1 / sd_j(u0)``).
    """
    tm = ThetaMap.from_fit(res)
    notes: list[str] = []
    if tm.inv_sd is not None:
        inv = pd.Series(tm.inv_sd, index=pd.Index(res.model.design.group_labels))
        data = data.assign(**{INV_SD_COLUMN: data["_cluster"].map(inv).to_numpy()})
    exprs = [f"I({e})" for e in tm.expressions()]
    locs, scale = exprs[: tm.n_loc], (exprs[tm.n_loc] if len(exprs) > tm.n_loc else None)
    y = names[s2.y_col]
    pfixed, ptheta, pomega, pto = s2.counts
    fixed, by_theta, by_omega, by_to = ([names[k] for k in cols] for cols in s2.cols)
    lab_fixed, lab_theta, lab_omega, lab_to = s2.labels
    terms: list[tuple[str, str]] = []
    if pfixed >= 0:
        terms += list(zip(fixed, lab_fixed))
    if ptheta >= 0:
        for k, t1 in enumerate(locs, start=1):
            terms += [(t1, f"Locat_{k}")] + [(f"{t1}:{x}", f"Locat_{k}*{lab}") for x, lab in zip(by_theta, lab_theta)]
    if pomega >= 0 and scale is not None:
        terms += [(scale, "Scale_1")] + [(f"{scale}:{x}", f"Scale_1*{lab}") for x, lab in zip(by_omega, lab_omega)]
    if pto >= 0 and scale is not None:
        for k, t1 in enumerate(locs, start=1):
            tt = f"{t1}:{scale}"
            terms += [(tt, f"Locat_{k}*Scale")] + [(f"{tt}:{x}", f"Locat_{k}*S*{lab}") for x, lab in zip(by_to, lab_to)]
    if not terms and pfixed < 0:
        raise ModelSpecError("the stage-2 model has no regressors (PFIXED = PTHETA = POMEGA = PTO = -1)")
    rhs = " + ".join(t for t, _ in terms) or "1"
    formula = f"{y} ~ {rhs}" + (" - 1" if pfixed < 0 else "")
    desc = patsy.ModelDesc.from_formula(formula)
    labels = {"Intercept": "Intercept"}
    written = [t for t in desc.rhs_termlist if t.factors]
    for term, (_, label) in zip(written, terms):
        labels[term.name()] = label
    labels["var(resid)"] = "Residual.Variance"
    labels[GROUP_VAR.format(groups="_cluster")] = "Random.Int.Var"
    labels[GROUP_SD.format(groups="_cluster")] = "Random.Int.SD"
    return Stage2Model(formula, data, labels, tm, tuple(notes))


def run_stage2(job, jd, res, reader) -> tuple[object, str]:
    """Run the job's second stage on the stage-1 fit ``res``: ``(Stage2Results, MIXWILD-style text)``."""
    s2 = job.stage2
    folder = job.path.parent if job.path is not None else None
    rows, names, notes = level2_data(s2, jd.raw_frame, jd.stage2_names, "_cluster", job.setting("YMISS"), folder, reader, per_row=True)
    y = names[s2.y_col]
    multilevel = s2.multilevel and bool((rows.groupby("_cluster", sort=False)[y].nunique() > 1).any())
    if multilevel and s2.data_file is None and job.path is not None and Path(job.data_path).exists():
        # as stage2only, which reads the data file again: the rows with the stage-2 columns present, also those
        # whose stage-1 outcome or covariates are missing (stage 1 left those out)
        again = replace(s2, data_file=str(job.data_path), nvar=int(job.setting("NVAR")), id_col=job.id_col)
        rows, names, more = level2_data(again, None, {}, "_cluster", job.setting("YMISS"), folder, reader, per_row=True)
        notes += more
        y = names[s2.y_col]
    if multilevel:  # MixWILD's adjustData2: a level-1 outcome keeps the rows (covariates at their level-1 values)
        data = rows
        notes.append(
            "MULTI2ND = 1: the stage-2 outcome varies within subjects, so the second stage is multilevel (as MixWILD): "
            f"each imputation is a {s2.family} random-intercept model of the level-1 rows (a random subject intercept), by ML"
        )
    else:
        data, names, more = level2_data(s2, jd.raw_frame, jd.stage2_names, "_cluster", job.setting("YMISS"), folder, reader)
        notes += more
    if s2.multilevel and not multilevel:
        notes.append("MULTI2ND = 1: the stage-2 outcome is constant within subjects, so the second stage is single-level (as MixWILD)")
    if s2.family == "nominal":  # ICODE order: category ICODE(1) the reference (coded 0), as mixno
        data, recode_note = _nominal_codes(data, y, s2.categories)
        notes.append(recode_note)
    model = stage2_model(s2, res, data, names)
    data = model.data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingDataWarning)
        out = res.stage2(
            model.formula, data=data, family=s2.family, method="mi", ndraws=s2.ndraws, seed=s2.seed, multilevel=multilevel
        )
    for w in caught:
        notes.append(f"stage 2: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, stage2_report(s2, model, out, res, data, names, notes)


def _nominal_codes(data: pd.DataFrame, y: str, categories: tuple[float, ...]) -> tuple[pd.DataFrame, str]:
    """The nominal outcome recoded ``ICODE(k) -> k - 1`` (MixWILD's reference category ``ICODE(1)`` first)."""
    vals = data[y].to_numpy(dtype=float)
    code = np.full(vals.shape, np.nan)
    for k, c in enumerate(categories):
        code[np.isclose(vals, c, rtol=1e-12, atol=1e-12)] = k
    bad = np.isfinite(vals) & np.isnan(code)
    if bad.any():
        raise DataError(
            f"the nominal stage-2 outcome {y!r} has value(s) {sorted(set(vals[bad].tolist()))[:5]} that are not among "
            f"the categories ICODE = {list(categories)}"
        )
    listed = ", ".join(f"{k} = {c:g}" for k, c in enumerate(categories))
    return data.assign(**{y: code}), f"nominal outcome coded in ICODE order ({listed}; category {categories[0]:g} the reference)"


# ---------------------------------------------------------------------- the report
def _f200(label: str, vals) -> str:
    return " " + f"{label[:16]:<16}" + "".join(f"{v:12.4f}" for v in vals)


def _row(label: str, vals) -> str:
    return f"{label[:16]:<16}" + "".join("    " + (f"{v:12.5f}" if np.isfinite(v) else f"{'':>12}") for v in vals)


def stage2_report(s2: Stage2Job, model: Stage2Model, out, res, data: pd.DataFrame, names, notes) -> str:
    """The second stage in MixWILD's layout (``stage2only``'s ``.out``), with mlsml's df and fmi columns."""
    y = data.set_index("_cluster")[names[s2.y_col]]
    used = y.loc[[lab for lab in res.model.design.group_labels if lab in y.index]].dropna()
    re = res.random_effects()
    tm = model.theta
    theta = tm.values(re[list(tm.effects)].to_numpy())
    lines = [
        "",
        "=" * 72,
        f"Second stage: {STAGE2_PROGRAMS[s2.kind]}, family={s2.family!r}, by mlsml's res.stage2(method='mi')",
        "=" * 72,
        f" Level 2 units = {out.nobs:11d}",
        *([f" Level 1 observations = {out.info['level1_rows']:d}"] if out.info.get("multilevel") else []),
        "------------",
        "Descriptives",
        "------------",
        "",
        " Dependent variable",
        "                                 mean         min         max     std dev",
        " " + "-" * 72,
        _f200(s2.y_label, [used.mean(), used.min(), used.max(), used.std(ddof=1)]),
        "",
        "",
        " Random Location and Scale EB mean estimates",
        "                                 mean         min         max     std dev",
        " " + "-" * 72,
    ]
    cols = [(lab, theta[:, i]) for i, lab in enumerate(tm.labels[: tm.n_loc])]
    if theta.shape[1] > tm.n_loc:
        cols += [("Scale", theta[:, tm.n_loc])]
        cols += [(f"Locat_{k + 1}*Scale", theta[:, k] * theta[:, tm.n_loc]) for k in range(tm.n_loc)]
    for label, x in cols:
        lines.append(_f200(label, [x.mean(), x.min(), x.max(), x.std(ddof=1)]))
    lines += [
        "",
        f" Number of replications = {out.ndraws:9d}" + (f" ({out.n_failed} failed, left out)" if out.n_failed else ""),
        "",
        "-------------",
        "Final Results",
        "-------------",
        "",
        "Variable                Estimate    AsymStdError         t-value         p-value              df             fmi",
        "----------------    ------------    ------------    ------------    ------------    ------------    ------------",
    ]
    category = None
    for name in out.params.index:
        label = model.labels.get(name, f"Threshold {name}" if s2.family == "ordinal" else name)
        if s2.family == "nominal":  # "column[k]": the column's coefficient for category ICODE(k + 1) against ICODE(1)
            col, k = name[: name.rindex("[")], int(float(name[name.rindex("[") + 1 : -1]))
            if k != category:
                lines += ([""] if category is not None else []) + [f" Category {s2.categories[k]:g} vs Category {s2.categories[0]:g}"]
                category = k
            label = model.labels.get(col, col)
        vals = [out.params[name], out.bse[name], out.tvalues[name], out.pvalues[name], out.df[name], out.fmi[name]]
        lines.append(_row(label, vals))
    lines += [
        "",
        "Regressors: MixWILD's standardised effects theta = L0^-1 D_j^-1 b (Locat_k: the location effects, Scale_1: the",
        "random scale's part independent of them), written in mlsml's effects " + ", ".join(tm.effects) + ":",
        *(f"  {lab} = {e}" for lab, e in zip(tm.labels, tm.expressions())),
        *([f"  ({INV_SD_COLUMN} = 1 / sd_j(u0) of each subject, from its BS-variance covariates)"] if tm.inv_sd is not None else []),
        "the stage-2 formula run was",
        f"  {model.formula}",
        "mlsml draws the effects from their exact posterior "
        + ("and the stage-1 parameters from their sampling distribution" if out.info.get("stage1_uncertainty") else "")
        + "; pools by Rubin's rules (T = Ubar + (1 + 1/M) B), tests on t with Rubin's degrees of freedom.",
    ]
    if s2.family == "ordinal":
        lines.append("Ordinal: P(Y <= k) = F(threshold_k - x'gamma), no intercept (MixWILD's mixors prints its own parametrisation).")
    if notes:
        lines += ["", "Notes on the second stage", "-------------------------"] + [" - " + n for n in notes]
    return "\n".join(lines) + "\n"
