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
(``mixpreg``), 4 nominal (``mixno``). The regressors are (``stage2only.f90``, ``dostage2``):
an intercept and the ``PFIXED`` level-2 covariates when ``PFIXED >= 0``; the standardised
random location ``theta1`` and its products with the ``PTHETA`` covariates when
``PTHETA >= 0``; the random scale's own part ``theta2`` and its products with the ``POMEGA``
covariates when ``POMEGA >= 0``; ``theta1 theta2`` and its products with the ``PTO``
covariates when ``PTO >= 0`` (a count of -1 leaves the effect out). Every stage-2 column
is averaged over the subject's rows, rows with the missing-value code ``YMISS`` in any
of them are dropped (from stage 1 too, when they are in the stage-1 data file). ``NREPS``
is the number of imputations and ``MYSEED`` the seed.

MIXREGLS's standardised effects are linear in mlsml's ``u0`` and ``v``
(:mod:`mlsml.mixregls`):

.. math::

    \theta_1 = u_0 / \sigma_u, \qquad
    \theta_2 = (v - \mathrm{LocEff}\,\theta_1) / \mathrm{SD}, \qquad
    \mathrm{LocEff} = \sigma_{uv} / \sigma_u, \quad \mathrm{SD} = (\sigma_v^2 - \mathrm{LocEff}^2)^{1/2},

so the job's model is the formula ``Y ~ I(a*u0) + I(b*v + c*u0) + ...`` of
:func:`mlsml.stage2.stage2` with ``method="mi"`` (MixWILD's method; mlsml draws from the
exact posterior and pools by Rubin's rules, see ``docs/stage2.md``). Settings mlsml cannot run
raise :class:`~mlsml.errors.ModelSpecError` naming them: ``STAGE2 = 4`` (nominal),
``MULTI2ND = 1`` (a multilevel second stage), and stage 2 after a model whose ``Sigma``
varies by subject (BS-variance covariates, ``R > 0``), with random slopes (``MLS = 1``) or
with the quadratic association (``NCOV = 2``: MixWILD's ``theta2`` is then not the
linear map of this module; ``res.stage2`` runs on such a fit directly).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._lazy import LazyModule
from ..errors import DataError, MissingDataWarning, ModelSpecError, warn

patsy = LazyModule("patsy")
stats = LazyModule("scipy.stats")

#: mlsml's ``family`` for each ``STAGE2`` (None: not available).
STAGE2_FAMILIES = {1: "gaussian", 2: "ordinal", 3: "poisson", 4: None}
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
    if STAGE2_FAMILIES[kind] is None:
        raise refuse("STAGE2", "a nominal (multinomial) second stage is not available in mlsml; use 1, 2 or 3")
    if int(settings.get("MULTI2ND", 0)) == 1:
        raise refuse("MULTI2ND", "a multilevel second stage (a level-1 outcome) is not available; set MULTI2ND = 0")
    if int(settings.get("MLS", 0)) == 1:
        raise refuse("MLS", "stage 2 after a random-slope (MIXREGMLS) model is not available")
    if int(settings.get("R", 0)) > 0:
        raise refuse("R", "stage 2 after a model with BS-variance covariates (a Sigma per subject) is not available")
    random_scale = int(settings.get("NORS", 0)) != 1
    if random_scale and int(settings["NCOV"]) == 2:
        raise refuse(
            "NCOV",
            "the job's stage 2 after the quadratic association is not mapped (theta2 is not linear in u0, v); "
            "fit the job's stage 1 and call res.stage2 on it",
        )
    n_counts = 4 if random_scale else 2
    counts = [int(c) for c in read_record(n_counts, "the stage-2 counts PFIXED PTHETA POMEGA PTO")] + [-1] * (4 - n_counts)
    for name, c in zip(("PFIXED", "PTHETA", "POMEGA", "PTO"), counts):
        if c < -1 or c > int(settings["NVAR"]):
            raise ModelSpecError(f"{where}: stage-2 count {name} = {c} must be from -1 (effect left out) to NVAR")
    categories: tuple[float, ...] = ()
    if kind == 2:
        maxj = read_record(1, "the number of categories MAXJ")[0]
        if maxj < 2:
            raise ModelSpecError(f"{where}: MAXJ = {maxj}: an ordinal outcome needs at least two categories")
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
    )


# ---------------------------------------------------------------------- the model
def theta_map(res) -> tuple[float, float, float]:
    """``theta1 = a u0`` and ``theta2 = b v + c u0`` from the fit's ``Sigma`` (module docstring)."""
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


@dataclass(frozen=True)
class Stage2Model:
    """The job's second stage as an mlsml stage-2 formula and data, with MixWILD's labels."""

    formula: str
    data: pd.DataFrame
    labels: dict[str, str]
    theta: tuple[float, float, float]
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
    s2: Stage2Job, raw: pd.DataFrame | None, raw_names: dict[int, str], cluster: str, ymiss: float, folder: Path | None, reader
) -> tuple[pd.DataFrame, dict[int, str], list[str]]:
    """Per-subject means of the stage-2 columns (MixWILD's ``tempsums / n``), their names, and notes.

    ``raw`` holds the stage-1 rows with the stage-2 columns (named ``raw_names[column]``) when
    ``SEPFILE = 0``; otherwise the separate file is read with ``reader(path, nvar)``.
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
    g = frame.groupby(cluster, sort=False)
    varying = [n for n in dict.fromkeys(names.values()) if (g[n].nunique() > 1).any()]
    if varying:
        notes.append(f"stage 2: {', '.join(map(repr, varying))} vary within subjects and are averaged per subject, as MixWILD does")
    return g.mean().reset_index(), names, notes


def stage2_model(s2: Stage2Job, res, data: pd.DataFrame, names: dict[int, str]) -> Stage2Model:
    """The formula (MixWILD's regressors as functions of ``u0`` and ``v``) and the labels of its columns."""
    a, b, c = (float(x) for x in theta_map(res))
    y = names[s2.y_col]
    t1 = f"I({a!r} * u0)"
    t2 = f"I({b!r} * v)" if c == 0.0 else f"I({b!r} * v + {c!r} * u0)"
    pfixed, ptheta, pomega, pto = s2.counts
    fixed, by_theta, by_omega, by_to = ([names[k] for k in cols] for cols in s2.cols)
    lab_fixed, lab_theta, lab_omega, lab_to = s2.labels
    terms: list[tuple[str, str]] = []
    if pfixed >= 0:
        terms += list(zip(fixed, lab_fixed))
    if ptheta >= 0:
        terms += [(t1, "Locat_1")] + [(f"{t1}:{x}", f"Locat_1*{lab}") for x, lab in zip(by_theta, lab_theta)]
    if pomega >= 0:
        terms += [(t2, "Scale_1")] + [(f"{t2}:{x}", f"Scale_1*{lab}") for x, lab in zip(by_omega, lab_omega)]
    if pto >= 0:
        tt = f"{t1}:{t2}"
        terms += [(tt, "Locat_1*Scale")] + [(f"{tt}:{x}", f"Locat_1*S*{lab}") for x, lab in zip(by_to, lab_to)]
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
    return Stage2Model(formula, data, labels, (a, b, c), ())


def run_stage2(job, jd, res, reader) -> tuple[object, str]:
    """Run the job's second stage on the stage-1 fit ``res``: ``(Stage2Results, MIXWILD-style text)``."""
    s2 = job.stage2
    data, names, notes = level2_data(
        s2, jd.raw_frame, jd.stage2_names, "_cluster", job.setting("YMISS"), job.path.parent if job.path is not None else None, reader
    )
    model = stage2_model(s2, res, data, names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingDataWarning)
        out = res.stage2(model.formula, data=data, family=s2.family, method="mi", ndraws=s2.ndraws, seed=s2.seed)
    for w in caught:
        notes.append(f"stage 2: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, stage2_report(s2, model, out, res, data, names, notes)


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
    a, b, c = model.theta
    theta1 = a * re["u0"].to_numpy()
    lines = [
        "",
        "=" * 72,
        f"Second stage: {STAGE2_PROGRAMS[s2.kind]}, family={s2.family!r}, by mlsml's res.stage2(method='mi')",
        "=" * 72,
        f" Level 2 units = {out.nobs:11d}",
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
    cols = [("Locat_1", theta1)]
    if "v" in re.columns:
        theta2 = b * re["v"].to_numpy() + c * re["u0"].to_numpy()
        cols += [("Scale", theta2), ("Locat_1*Scale", theta1 * theta2)]
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
    for name in out.params.index:
        label = model.labels.get(name, f"Threshold {name}" if s2.family == "ordinal" else name)
        vals = [out.params[name], out.bse[name], out.tvalues[name], out.pvalues[name], out.df[name], out.fmi[name]]
        lines.append(_row(label, vals))
    lines += [
        "",
        "Regressors: theta1 (Locat_1) = u0 / sd(u0), theta2 (Scale_1) = the random scale's part independent of the",
        f"location, = {b:.6g} v {c:+.6g} u0; the stage-2 formula run was",
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
