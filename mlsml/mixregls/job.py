"""Running a MIXREGLS job: the job's data as an mlsml model, the fits, and the report.

:func:`job_data` turns a parsed job (:mod:`mlsml.mixregls.deffile`) into a data
frame and formulas, following MIXREGLS: rows where any used variable equals
``YMISS`` are dropped; clusters are runs of equal ``INT(id)`` in file order;
``PV``/``SV`` covariates ``x`` become a cluster mean ``x_BS`` and the deviation
from it ``x_WS``; ``NCENT = 1`` standardises every covariate column;
``DISCARD0 = 1`` drops clusters whose responses are all equal. mlsml's own keywords at the
end of the .def (:mod:`mlsml.mixregls.keywords`) add level-1 and level-2 weights
(``weights=``, ``group_weights=``, their kind and scaling) and the type of standard errors
(``cov_type``), which the report's header states. The model is

.. math::

    y_{ij} = x_{ij}'\\beta + u_j + e_{ij}, \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\alpha + v_j

(MIXREGLS's BETA and TAU; ALPHA and the random scale follow by
:mod:`mlsml.mixregls.convert`). mlsml fits it by maximum likelihood
(adaptive quadrature with ``NQ`` points per dimension, always adaptive and
rotated; its own optimiser, so ``CONV``, ``MAXIT`` and ``RIDGEIN`` are not
used). ``NCOV`` 0, 1, 2 is ``association="none"``, ``"linear"``, ``"quadratic"``
and the ``R`` BS-variance columns (MIXREGLS's ALPHA) are ``bs_formula``,
:math:`\\ln\\operatorname{var}(u_{0ij}) = u_{ij}'\\tau`, evaluated per observation as MIXREGLS
does (a time-varying column is a level-1 column of :attr:`mlsml.design.Design.S_level1`). MixWILD 2.0's
MIXREGMLS mode (``MLS = 1``) is read as a random-slope model: the ``R`` BS-variance
columns become random slopes (``re_formula``), all location effects correlated with
the random scale.

:func:`run_job` does it all: parse, read, fit MIXREGLS's stage sequence
(:mod:`mlsml.mixregls.stages`), run MixWILD 2.0's second stage when the job has one
(:mod:`mlsml.mixregls.secondstage`) and print the report
(:mod:`mlsml.mixregls.report`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, MissingDataWarning, ModelSpecError, warn
from ..model import MELSM
from .deffile import MAX_NQ, MIN_NQ, NCOV_ASSOCIATION, MixreglsJob, parse_def, read_dat
from .keywords import fit_arguments
from .report import summarize_mixwild
from .secondstage import run_stage2
from .stages import fit_stages

_RESERVED = {"C", "Q", "I", "np", "Intercept", "Treatment", "center", "standardize", "scale", "log", "exp", "True", "False", "None"}


def _ident(label: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", label.strip()) or "v"
    if name[0].isdigit() or name in _RESERVED:
        name = "v_" + name
    base, k = name, 2
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


@dataclass(frozen=True)
class JobData:
    """The data of a job as a frame, with the formulas that fit it."""

    frame: pd.DataFrame
    formula: str
    scale_formula: str
    random_scale: bool
    notes: tuple[str, ...]
    raw_frame: pd.DataFrame | None = None
    re_formula: str = "~ 1"
    bs_formula: str | None = None
    association: str = "linear"
    stage2_names: dict | None = None
    #: The job's weights and cov_type as arguments of :func:`mlsml.fit` (:mod:`mlsml.mixregls.keywords`).
    weighting: dict | None = None


def job_data(job: MixreglsJob, data: np.ndarray | None = None) -> JobData:
    """Read the job's data and build the frame and formulas mlsml fits.

    Follows MIXREGLS: rows with ``YMISS`` in any used variable are dropped,
    clusters are runs of equal ``INT(id)``, decomposed covariates get a
    cluster-mean column ``<label>_BS`` and a deviation column ``<label>_WS``,
    ``NCENT = 1`` standardises every covariate column, ``DISCARD0 = 1`` drops
    clusters with constant responses.
    """
    raw = read_dat(job.data_path, int(job.setting("NVAR"))) if data is None else np.asarray(data, float)
    notes = list(job.notes)
    taken: set[str] = {"_cluster"}
    names: dict[int, str] = {}

    def col(c: int, label: str) -> str:
        if c not in names:
            names[c] = _ident(label, taken)
        return names[c]

    y = col(job.y_col, job.y_label)
    x = [col(c, lab) for c, lab in zip(job.x_cols, job.x_labels)]
    w = [col(c, lab) for c, lab in zip(job.w_cols, job.w_labels)]
    u = [col(c, lab) for c, lab in zip(job.u_cols, job.u_labels)]
    pv = [col(c, lab) for c, lab in zip(job.pv_cols, job.pv_labels)]
    sv = [col(c, lab) for c, lab in zip(job.sv_cols, job.sv_labels)]
    # MixWILD's second stage: its columns of the stage-1 file are read too (YMISS in them drops the row)
    s2_names = {c: col(c, lab) for c, lab in job.stage2.columns()} if job.stage2 and job.stage2.data_file is None else {}
    weight_cols = {k: col(job.keywords[k], k.lower()) for k in ("WEIGHT1", "WEIGHT2") if k in job.keywords}
    used_cols = sorted(names)
    frame = pd.DataFrame({names[c]: raw[:, c - 1] for c in used_cols})
    ids = np.trunc(raw[:, job.id_col - 1])
    ymiss = job.setting("YMISS")
    if ymiss != 0.0:
        vals = raw[:, [c - 1 for c in used_cols]]
        hit = np.isclose(vals, ymiss, rtol=1e-12, atol=0.0)
        drop = hit.any(axis=1)
        if drop.any():
            per = ", ".join(f"{names[c]!r}: {int(hit[:, i].sum())}" for i, c in enumerate(used_cols) if hit[:, i].any())
            msg = f"missing-value code YMISS = {ymiss:g}: dropped {int(drop.sum())} of {len(drop)} rows (per column: {per})"
            warn(msg, MissingDataWarning)
            notes.append(msg)
            frame, ids = frame.loc[~drop].reset_index(drop=True), ids[~drop]
    if len(frame) == 0:
        raise DataError("no rows left after removing the missing-value code")
    bad_id = ~np.isfinite(ids)
    if bad_id.any():
        raise DataError(
            f"the cluster id (column {job.id_col}) is not a finite number in {int(bad_id.sum())} record(s), "
            f"the first being record {int(np.nonzero(bad_id)[0][0]) + 1} of the rows used"
        )
    run = np.concatenate([[0], np.cumsum(ids[1:] != ids[:-1])])
    first_ids = ids[np.r_[0, np.nonzero(np.diff(run))[0] + 1]]
    if len(np.unique(first_ids)) != len(first_ids) or np.any(np.diff(first_ids) < 0):
        msg = (
            "the data are not sorted by the cluster id: as MIXREGLS, each run of equal ids is one cluster (labelled by its run number)"
        )
        warn(msg, MissingDataWarning)
        notes.append(msg)
        frame["_cluster"] = run + 1
    else:
        frame["_cluster"] = ids.astype(np.int64) if np.all(np.abs(ids) < 2**62) else ids
    if int(job.setting("DISCARD0")) == 1:
        g = frame.groupby("_cluster", sort=False)[y]
        const = g.transform(lambda s: bool(np.all(s.to_numpy() == s.to_numpy()[0]))).astype(bool)
        if const.any():
            n_cl = frame.loc[const, "_cluster"].nunique()
            msg = f"DISCARD0 = 1: dropped {n_cl} cluster(s) ({int(const.sum())} rows) whose responses are all equal"
            warn(msg, MissingDataWarning)
            notes.append(msg)
            frame = frame.loc[~const.to_numpy()].reset_index(drop=True)
    mean_terms, scale_terms = list(x), list(w)
    for lab, name in zip(job.pv_labels, pv):
        bs, ws = _ident(f"{lab}_BS", taken), _ident(f"{lab}_WS", taken)
        frame[bs] = frame.groupby("_cluster", sort=False)[name].transform("mean")
        frame[ws] = frame[name] - frame[bs]
        mean_terms += [bs, ws]
    for lab, name in zip(job.sv_labels, sv):
        bs, ws = _ident(f"{lab}_BS", taken), _ident(f"{lab}_WS", taken)
        frame[bs] = frame.groupby("_cluster", sort=False)[name].transform("mean")
        frame[ws] = frame[name] - frame[bs]
        scale_terms += [bs, ws]
    raw_frame = frame
    if int(job.setting("NCENT")) == 1:
        frame = frame.copy()
        for c in dict.fromkeys(mean_terms + scale_terms + u):
            sd = frame[c].std(ddof=1)
            if sd > 0:
                frame[c] = (frame[c] - frame[c].mean()) / sd
        notes.append("NCENT = 1: all covariates standardised (mean 0, SD 1) before fitting, as MIXREGLS does")
    if int(job.setting("PNINT")) == 1 and not mean_terms:
        raise ModelSpecError("the mean model has no terms (P = 0 and PNINT = 1)")
    rhs = " + ".join(mean_terms) if mean_terms else "1"
    formula = f"{y} ~ {rhs}" + (" - 1" if int(job.setting("PNINT")) == 1 else "")
    srhs = " + ".join(scale_terms) if scale_terms else "1"
    scale_formula = f"~ {srhs}" + (" - 1" if int(job.setting("SNINT")) == 1 and scale_terms else "")
    re_formula = "~ 1"
    bs_formula = None
    if job.random_slopes:
        re_formula = "~ " + (" + ".join(u) if u else "1") + (" - 1" if int(job.setting("RNINT")) == 1 else "")
        notes.append(f"MLS = 1 (MIXREGMLS): random location effects {re_formula}, all correlated with the random scale")
    elif u:  # MIXREGLS's BS variance model: ln var(u0_j) = ALPHA'u_j
        bs_formula = "~ " + " + ".join(u)
    association = NCOV_ASSOCIATION[int(job.setting("NCOV"))] if job.random_scale and not job.random_slopes else "linear"
    return JobData(
        frame=frame,
        formula=formula,
        scale_formula=scale_formula,
        random_scale=job.random_scale,
        notes=tuple(notes),
        raw_frame=raw_frame,
        re_formula=re_formula,
        bs_formula=bs_formula,
        association=association,
        stage2_names=s2_names,
        weighting=fit_arguments(job.keywords, weight_cols),
    )


@dataclass(frozen=True)
class JobRun:
    """The outcome of :func:`run_job`."""

    job: MixreglsJob
    data: JobData
    results: object
    stages: list
    report: str
    stage2: object = None


def _job_model(jd: JobData, frame: pd.DataFrame) -> MELSM:
    """The job's model on ``frame`` (its data as fitted, or as read before standardising)."""
    weighting = {k: v for k, v in (jd.weighting or {}).items() if k != "cov_type"}
    return MELSM.from_formula(
        jd.formula,
        frame,
        groups="_cluster",
        scale_formula=jd.scale_formula,
        re_formula=jd.re_formula,
        random_scale=jd.random_scale,
        missing="raise",
        bs_formula=jd.bs_formula,
        association=jd.association,
        **weighting,
    )


def run_job(path: str | Path, stages: bool = True, nagq: int | None = None, progress=None, **fit_options) -> JobRun:
    """Run a MIXREGLS job: parse the .def, read the data, fit, and build the MIXREGLS-style report.

    Parameters
    ----------
    path : str or Path
        The definition file.
    stages : bool
        Fit MIXREGLS's sequence of models (without scale, with scale
        covariates, with random scale) and print them with LR tests between
        them, as MIXREGLS does; ``False`` fits only the final model.
    nagq : int, optional
        Quadrature points per dimension (default: the job's ``NQ``).
    progress : callable, optional
        ``progress(i, n, title)`` before each model is fitted.
    **fit_options
        Passed to :meth:`mlsml.MELSM.fit` (a ``cov_type`` here overrides the job's ``COVTYPE``).

    Returns
    -------
    JobRun
        ``.results`` (the final fit), ``.stages``, ``.report`` (text).
    """
    job = parse_def(path)
    jd = job_data(job)
    model = _job_model(jd, jd.frame)
    if nagq is not None and (isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or not MIN_NQ <= nagq <= MAX_NQ):
        raise ModelSpecError(f"nagq must be a whole number from {MIN_NQ} to {MAX_NQ}, not {nagq!r}")
    nq = job.nq if nagq is None else int(nagq)
    if "COVTYPE" in job.keywords:
        fit_options.setdefault("cov_type", job.keywords["COVTYPE"])
    if stages:
        seq = fit_stages(model, nagq=nq, progress=progress, **fit_options)
        res = seq[-1][1]
    else:
        if progress is not None:
            progress(1, 1, "final model")
        res = model.fit(nagq=nq, **fit_options)
        seq = []
    title = [t for t in job.title if t]
    standardized = int(job.setting("NCENT")) == 1
    described = model
    if standardized:  # MIXREGLS describes the covariates before standardising them
        described = _job_model(jd, jd.raw_frame)
    report = summarize_mixwild(
        res, stages=seq or None, title=title, source=str(job.data_path), standardized=standardized, describe=described
    )
    if jd.notes:
        report = report.rstrip("\n") + "\n\nNotes on the job\n----------------\n" + "\n".join(" - " + n for n in jd.notes) + "\n"
    s2 = None
    if job.stage2 is not None:  # MixWILD 2.0's second stage (mlsml.mixregls.secondstage)
        s2, text = run_stage2(job, jd, res, read_dat)
        report = report.rstrip("\n") + "\n" + text
    return JobRun(job=job, data=jd, results=res, stages=seq, report=report, stage2=s2)
