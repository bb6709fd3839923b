"""MIXREGLS's sequence of nested models, fitted, and the likelihood-ratio tests between them.

MIXREGLS (and MixWILD's MIXREGLS_both) fits and prints three models, each
starting from the previous one:

1. "Model without Scale Parameters": the mean model with its random location
   effects (and the BS variance function, ALPHA, when there is one), and a
   constant WS variance ``ln var(e) = alpha_0``;
2. "Model WITH Scale Parameters": + the WS covariates (TAU) of the final model;
3. "Model WITH RANDOM Scale": + the random scale ``v`` correlated with the
   random location.

:func:`fit_stages` builds and fits that sequence from the final model;
:func:`stage_tests` gives the likelihood-ratio tests between consecutive stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from .._lazy import LazyModule
from ..compare import lrtest
from ..errors import ModelSpecError

patsy = LazyModule("patsy")

#: The block titles of MIXREGLS's report, one per stage.
STAGE_TITLES = (
    "Model without Scale Parameters",
    "Model WITH Scale Parameters",
    "Model WITH RANDOM Scale",
)


def stage_model(model, scale_intercept_only: bool, random_scale: bool):
    """A copy of ``model`` with the WS design cut to the intercept and/or without the random scale.

    Everything else is kept: the mean design, the random location effects and the
    BS variance function (``bs_formula``: MIXREGLS's ALPHA is in every stage).
    Without the random scale the random scale slopes (``scale_re_formula``) go too.
    The copy is of the same class as ``model`` (built as ``type(model)(design, spec)``).
    """
    design, spec = model.design, model.formula_spec
    lay = design.layout
    W, scale_terms, scale_formula, scale_spec = design.W, lay.scale_terms, spec.scale_formula, spec.scale_spec
    if scale_intercept_only:
        W = np.ones((design.nobs, 1))
        W.setflags(write=False)
        scale_terms = ("Intercept",)
        scale_formula = "~ 1"
        scale_spec = patsy.dmatrix("~ 1", pd.DataFrame({"_y": [0.0, 1.0]}), NA_action="raise").design_info
    keep = lay.d if random_scale else lay.q  # without the random scale its covariance constraints go too
    new_lay = dataclasses.replace(
        lay,
        scale_terms=tuple(scale_terms),
        random_scale=random_scale,
        scale_re_terms=lay.scale_re_terms if random_scale else (),
        fixed_cov=tuple((e, f) for e, f in lay.fixed_cov if f < keep),
        quad_assoc=lay.quad_assoc and random_scale,
    )
    new_design = dataclasses.replace(design, W=W, layout=new_lay, G=design.G if random_scale else None)
    new_spec = dataclasses.replace(
        spec,
        scale_formula=scale_formula,
        scale_spec=scale_spec,
        scale_re_formula=spec.scale_re_formula if random_scale else None,
    )
    return type(model)(new_design, new_spec)


def fit_stages(
    fitted,
    nagq: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **fit_options,
) -> list[tuple[str, object]]:
    """Fit the nested sequence of models that MIXREGLS reports.

    1. "Model without Scale Parameters": the mean model with its random
       location effects (and BS variance function), ``ln var(e) = alpha_0``
       (constant WS variance);
    2. "Model WITH Scale Parameters": + the WS covariates of the final model
       (skipped, as by MIXREGLS, when the WS model has only an intercept);
    3. "Model WITH RANDOM Scale": + the random scale ``v`` with the final model's
       association with the random location (``association``: MIXREGLS's NCOV = 1
       linear, 0 none, 2 quadratic) -- only when the final model has one.

    Random-slope models (MIXREGMLS) follow the same sequence.

    Parameters
    ----------
    fitted : MELSMResults or MELSM
        The final model. A results object is reused as the last stage (not refitted).
    nagq : int, optional
        Quadrature points per dimension for the stages that are fitted (default:
        that of ``fitted`` when it is a results object).
    progress : callable, optional
        ``progress(i, n, title)`` before stage ``i`` (1-based) of ``n`` is fitted.
    **fit_options
        Passed to :meth:`mlsml.MELSM.fit`.

    Returns
    -------
    list of (title, MELSMResults)
    """
    if hasattr(fitted, "theta"):  # a results object: its model is the last stage
        model, final = fitted.model, fitted
        if nagq is None:
            nagq = fitted.nagq
    else:
        model, final = fitted, None
    lay = model.layout
    if lay.q < 1:
        raise ModelSpecError("the MIXREGLS stage sequence needs random location effects (re_formula='~ 1' or '~ x')")
    plan: list[tuple[str, object]] = [(STAGE_TITLES[0], stage_model(model, True, False))]
    if lay.k > 1:
        plan.append((STAGE_TITLES[1], stage_model(model, False, False) if lay.random_scale else model))
    if lay.random_scale:
        plan.append((STAGE_TITLES[2], model))
    elif lay.k == 1:
        plan = [(STAGE_TITLES[0], model)]
    out = []
    for i, (title, m) in enumerate(plan, start=1):
        if progress is not None:
            progress(i, len(plan), title)
        if m is model and final is not None:
            out.append((title, final))
        else:
            out.append((title, m.fit(nagq=nagq, **fit_options)))
    return out


def stage_tests(stages: Sequence[tuple[str, object]]) -> pd.DataFrame:
    """Likelihood-ratio tests of each stage against the previous one (see :func:`mlsml.lrtest`).

    .. math::

        LR = 2 (\\ell_{s} - \\ell_{s-1})

    Adding the random scale puts ``var(v) = 0`` on the boundary under the
    null, so that test uses the ``0.5 chi2(1) + 0.5 chi2(2)`` mixture.
    """
    rows = []
    for (t0, r0), (t1, r1) in zip(stages[:-1], stages[1:]):
        t = lrtest(r0, r1)
        rows.append({"from": t0, "to": t1, "LR chi2": t.statistic, "df": t.df, "p": t.pvalue, "reference": t.reference})
    return pd.DataFrame(rows, columns=["from", "to", "LR chi2", "df", "p", "reference"])
