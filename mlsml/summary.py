"""Summary tables of a fit, built with statsmodels' ``summary2`` machinery.

The table has four parts: a header (data, likelihood, information criteria,
quadrature and convergence), the mean function ``beta``, the residual
log-variance function ``alpha``, and the school effects (variances,
covariances, and correlations with delta-method standard errors).
``Summary.as_text()``, ``.as_html()`` and ``.as_latex()`` give the formats.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .diagnostics import tail_note
from .errors import ModelSpecError
from .mixregls.report import MixwildSummary, summarize_mixwild
from .params import is_variance
from .weights import describe_weights

#: The summary's note on the intervals of variances (:func:`mlsml.params.wald_intervals`).
VARIANCE_CI_NOTE = "Intervals of variances are symmetric on the log scale: var * exp(+/- z SE / var)."

summary2 = LazyModule("statsmodels.iolib.summary2")  # imported on first use: keeps `import mlsml` fast


def _param_frame(res, names: list[str], labels: list[str], alpha: float) -> pd.DataFrame:
    ci = res.conf_int(alpha)
    out = pd.DataFrame(
        {
            "Coef.": res.params[names].to_numpy(),
            "Std.Err.": res.bse[names].to_numpy(),
            "z": res.tvalues[names].to_numpy(),
            "P>|z|": res.pvalues[names].to_numpy(),
            f"[{alpha / 2:g}": ci.iloc[:, 0][names].to_numpy(),
            f"{1 - alpha / 2:g}]": ci.iloc[:, 1][names].to_numpy(),
        },
        index=labels,
    )
    return out


def _format_blocks(blocks: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """One table of strings with a title row before each block."""
    cols = list(blocks[0][1].columns)
    fmt = {"Coef.": "{:.4f}", "Std.Err.": "{:.4f}", "z": "{:.3f}", "P>|z|": "{:.3f}"}
    rows, index = [], []
    for title, frame in blocks:
        index.append(title)
        rows.append([""] * len(cols))
        for name, vals in frame.iterrows():
            index.append("  " + str(name))
            rows.append(["" if not np.isfinite(v) else fmt.get(c, "{:.4f}").format(v) for c, v in zip(cols, vals)])
    return pd.DataFrame(rows, index=index, columns=cols)


def _number(x: float) -> str:
    """A log-likelihood or criterion for the header: ``UNRELIABLE`` instead of a non-finite value."""
    return f"{x:.4f}" if np.isfinite(x) else "NaN (UNRELIABLE)"


def llf_note(res) -> str | None:
    """The loud note of a fit whose log-likelihood is not reported (:attr:`mlsml.optimize.OptSummary.llf_reliable`), or ``None``."""
    if np.isfinite(res.llf):
        return None
    opt = res.optsum
    why = "it is not finite at the estimates"
    if opt is not None and np.isfinite(opt.llf) and getattr(opt, "quadrature_check", None) is not None:
        points, change = opt.quadrature_check
        why = (
            f"the quadrature rule is not accurate at the estimates ({points} points per dimension instead of "
            f"{res.nagq} change it by {change:.3g}); refit with a larger nagq"
        )
    return (
        f"WARNING: the log-likelihood is NOT reported (NaN): {why}. The deviance, AIC and BIC are NaN too; "
        "do not use these estimates or compare this fit."
    )


def header_dict(res) -> dict[str, str]:
    """The header fields of the summary, as strings."""
    design = res.model.design
    spec = res.model.formula_spec
    counts = design.counts
    lay = res.layout
    sampling = (design.info.get("weights") or {}).get("kind") == "sampling"
    if res.quadrature == "marginal":
        quad = f"{res.nagq} per dim of v, u exact"
    elif res.prune == 0:
        quad = f"{res.nagq} per dim ({res.nagq**lay.d} nodes)"
    else:
        quad = f"{res.nagq} per dim, pruned {res.prune:g}"
    return {
        "Model:": "MELSM" + (" (random scale)" if lay.random_scale else ""),
        "Dependent Variable:": spec.response,
        "Groups:": spec.groups,
        "No. Observations:": f"{res.nobs}",
        "No. Groups:": f"{res.ngroups}",
        "Group size min/mean/max:": f"{counts.min()} / {counts.mean():.1f} / {counts.max()}",
        "Method:": ("pseudo-ML" if sampling else "ML") + ", adaptive Gauss-Hermite",
        "Quadrature:": quad,
        "Log-Likelihood:": _number(res.llf),
        "Deviance:": _number(res.deviance),
        "AIC:": _number(res.aic),
        "BIC:": _number(res.bic),
        "No. parameters:": f"{res.df_model}",
        "Converged:": "Yes" if res.converged else "NO",
        "Covariance type:": "robust (cluster: " + str(spec.groups) + ")" if res.cov_type == "robust" else "nonrobust",
        **({"Weights:": describe_weights(design.info["weights"])} if design.info.get("weights") else {}),
    }


def summarize(res, alpha: float = 0.05, style: str = "statsmodels"):
    """Build the summary of ``res`` (see module docstring).

    ``style="mixwild"`` gives the MIXREGLS report layout
    (:func:`mlsml.mixregls.summarize_mixwild`) wrapped in a
    :class:`mlsml.mixregls.MixwildSummary`.
    """
    if style == "mixwild":
        return MixwildSummary(summarize_mixwild(res, alpha=alpha))
    if style != "statsmodels":
        raise ModelSpecError(f"unknown summary style {style!r} (available: 'statsmodels', 'mixwild')")
    lay = res.layout
    smry = summary2.Summary()
    smry.add_title("Mixed-effects location scale model results")
    smry.add_dict(header_dict(res), ncols=2)
    mean_names = [f"mean:{t}" for t in lay.mean_terms]
    scale_names = [f"scale:{t}" for t in lay.scale_terms]
    blocks = [
        ("Mean function: y = x'b + z'u + e", _param_frame(res, mean_names, list(lay.mean_terms), alpha)),
        (
            "Residual variance: ln var(e) = w'a"
            + ((" + g'v" if lay.scale_re_terms else " + v") if lay.random_scale else "")
            + (" + quad(u0,v) (u0/sd(u0))^2" if lay.quad_assoc else ""),
            _param_frame(res, scale_names, list(lay.scale_terms), alpha),
        ),
        (
            "School effects ("
            + ", ".join(lay.re_names)
            + ") ~ N(0, Sigma)"
            + {"none": ", cov(u*,v) = 0", "linear": ""}.get(lay.association, ""),
            _param_frame(res, list(lay.cov_names), list(lay.cov_names), alpha),
        ),
    ]
    corr = res.re_correlations()
    if len(corr):
        extra = pd.DataFrame(np.nan, index=list(corr.index), columns=blocks[0][1].columns)
        extra["Coef."] = corr["estimate"].to_numpy()
        extra["Std.Err."] = corr["std err"].to_numpy()
        blocks.append(("Derived correlations (delta-method SE)", extra))
    smry.add_df(_format_blocks(blocks), index=True, header=True)
    notes = []
    note = llf_note(res)
    if note is not None:
        notes.append(note)
    if not res.converged:
        notes.append(f"WARNING: the fit did NOT converge ({res.message}). Do not use these estimates.")
        collapse = res.diagnostics.collapse
        if collapse:
            notes.append(f"NOTE: {collapse[0].upper()}{collapse[1:]}.")
    for r in res.singular_reasons():
        notes.append(f"WARNING: singular fit: {r}.")
    raised = getattr(res.optsum, "rule_raised", "") if res.optsum is not None else ""
    if raised:
        notes.append(f"NOTE: {raised} (the default rule was raised automatically).")
    tails = tail_note(res)
    if tails:
        notes.append(f"NOTE: {tails}")
    if (res.model.design.info.get("weights") or {}).get("kind") == "sampling":
        notes.append(
            "NOTE: sampling weights: a pseudo-likelihood; its llf, AIC and BIC do not compare fits, "
            "and likelihood-ratio tests do not apply (use Wald tests with the robust SEs)."
        )
    else:
        notes.append("Variance p-values are conservative (boundary); use mlsml.lrtest to test variances.")
    if any(is_variance(n) for n in res.params.index):
        notes.append(VARIANCE_CI_NOTE)
    for note in notes:  # one add_text each: statsmodels re-wraps a text, so newlines within one would be lost
        smry.add_text(note)
    return smry
