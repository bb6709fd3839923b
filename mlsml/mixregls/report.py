"""The MIXREGLS/MIXWILD-style text report of a fit (the layout of MIXREGLS's ``.OUT`` file).

:func:`summarize_mixwild` prints, in MIXREGLS's order and formats: the
specifications; the descriptives of the data; for each model block (see
:mod:`mlsml.mixregls.stages`) the iterations, the log-likelihood and the
information criteria as MIXREGLS prints them -- "larger is better"

.. math::

    \\mathrm{AIC} = \\ell - k, \\qquad \\mathrm{BIC} = \\ell - \\tfrac{k}{2} \\ln J

(``J`` clusters), then the same multiplied by ``-2`` -- and the parameter blocks
in MIXREGLS's parameterisation (:mod:`mlsml.mixregls.convert`); the
likelihood-ratio tests between the stages; the BS and WS variance ratio tables;
and our own natural-scale parameters. Models with random slopes (or random
scale slopes) are printed in MIXREGMLS's (MixWILD 2.0) layout, with ``Sigma``
on its natural scale.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from .._lazy import LazyModule
from .._version import __version__
from ..errors import ModelSpecError
from ..weights import describe_weights
from .convert import BLOCKS, is_mixregls_layout, to_mixregls
from .stages import STAGE_TITLES, stage_tests

stats = LazyModule("scipy.stats")

_BLOCK_TITLES = {
    "BETA": "BETA (regression coefficients)",
    "ALPHA": "ALPHA (BS variance parameters: log-linear model)",
    "TAU": "TAU (WS variance parameters: log-linear model)",
    "SCALE_SD": "Random scale standard deviation",
    "LOC_EFF": "Random location (mean) effect on WS variance",
    "QUAD_LOC": "Random quadratic location (mean) effects on WS variance",
}


def _f200(label: str, vals) -> str:
    return " " + f"{label[:16]:<16}" + "".join(f"{v:12.4f}" for v in vals)


def _f804(label: str, vals) -> str:
    return f"{label[:16]:<16}" + "".join("    " + (f"{v:12.5f}" if np.isfinite(v) else f"{'NaN':>12}") for v in vals)


def _descr_rows(M: np.ndarray, names) -> list[str]:
    lines = []
    for j, name in enumerate(names):
        col = M[:, j]
        sd = float(np.std(col, ddof=1)) if col.size > 1 else 0.0
        lines.append(_f200(str(name), [col.mean(), col.min(), col.max(), sd]))
    return lines


_DESCR_HEAD = [
    "                         mean         min         max     std dev",
    " ----------------------------------------------------------------",
]


def describe_data(res, standardized: bool = False) -> str:
    """The "Descriptives" section of the MIXREGLS report for the data of ``res`` (results or model)."""
    model = getattr(res, "model", res)
    design, spec = model.design, model.formula_spec
    lay = design.layout
    out = ["------------", "Descriptives", "------------", ""]
    out.append(f" Number of level-1 observations = {design.nobs:8d}")
    out.append("")
    out.append(f" Number of level-2 clusters     = {design.ngroups:8d}")
    out.append("")
    out.append(" Number of level-1 observations for each level-2 cluster")
    counts = [int(c) for c in design.counts]
    for i in range(0, len(counts), 13):
        out.append(" " + "".join(f"{c:6d}" for c in counts[i : i + 13]))
    out.append("")
    out.append(" Dependent variable")
    out += _DESCR_HEAD
    out += _descr_rows(design.y[:, None], [spec.response])
    out.append("")
    if standardized:
        out += [
            " ==> Standardization of covariates has been selected",
            " ==> All covariates have mean=0 and std dev=1",
            " ==> Means and std devs listed below are pre-standardization",
            "",
        ]
    out.append(" Mean model covariates")
    out += _DESCR_HEAD + _descr_rows(design.X, lay.mean_terms)
    out.append("")
    out.append(" BS variance model covariates")
    if lay.bs_terms:  # bs_formula: one row per cluster, listed per observation as MIXREGLS does
        out += _DESCR_HEAD + _descr_rows(design.bs_rows, lay.bs_terms)
    elif is_mixregls_layout(model):
        out += _DESCR_HEAD + _descr_rows(np.ones((design.nobs, 1)), ["Intercept"])
    else:  # MIXREGMLS: the covariates of the random location effects
        out += _DESCR_HEAD + _descr_rows(design.Z, list(design.info.get("re_terms", lay.re_names)))
    out.append("")
    out.append(" WS variance model covariates")
    out += _DESCR_HEAD + _descr_rows(design.W, lay.scale_terms)
    out.append("")
    return "\n".join(out)


def _crit(x: float) -> str:
    """A criterion in the report's width; ``UNRELIABLE`` instead of a non-finite value."""
    return f"{x:12.3f}" if np.isfinite(x) else f"{'UNRELIABLE':>12}"


def _criteria(res) -> list[str]:
    ll, k, J = res.llf, res.df_model, res.ngroups
    aic, bic = ll - k, ll - 0.5 * k * np.log(J)
    out = [
        f" Log Likelihood                 = {_crit(ll)}",
        f" Akaike's Information Criterion = {_crit(aic)}",
        f" Schwarz's Bayesian Criterion   = {_crit(bic)}",
        "",
        " ==> multiplied by -2             ",
        f" Log Likelihood                 = {_crit(-2 * ll)}",
        f" Akaike's Information Criterion = {_crit(-2 * aic)}",
        f" Schwarz's Bayesian Criterion   = {_crit(-2 * bic)}",
    ]
    if not np.isfinite(ll):
        out.append(" NOTE: THE LOG LIKELIHOOD IS NOT REPORTED: it is not finite or the quadrature is not accurate")
        out.append("       at the estimates (see Converged above); do not use or compare this fit")
    return out


def _block_header(title: str, res) -> list[str]:
    """Title, iterations, convergence, criteria and the column header of a model block."""
    bar = "-" * len(title)
    out = ["", "", bar, title, bar]
    out.append(f" Total  Iterations = {res.n_iter:3d}")
    out.append(f" Converged         = {'yes' if res.converged else 'NO: ' + res.message}")
    out.append("")
    out += _criteria(res)
    out += [
        "",
        "",
        "Variable                Estimate    AsymStdError         z-value         p-value",
        "----------------    ------------    ------------    ------------    ------------",
    ]
    return out


def _model_block(title: str, res, standardized: bool = False) -> str:
    out = _block_header(title, res)
    tab = to_mixregls(res)
    for block in BLOCKS:
        part = tab[tab["block"] == block]
        if not len(part):
            continue
        std = standardized and ((block == "BETA" and res.layout.p > 1) or (block == "TAU" and res.layout.k > 1))
        out.append(("STANDARDIZED " if std else "") + _BLOCK_TITLES[block])
        for _, row in part.iterrows():
            out.append(_f804(row["term"], [row["estimate"], row["std err"], row["z"], row["P>|z|"]]))
    if not res.converged:
        out.append("NOTE: CONVERGENCE CRITERION WAS NOT ACHIEVED")
    for r in res.singular_reasons():
        out.append(f"NOTE: singular fit: {r}")
    return "\n".join(out)


def _mls_rows(res, names: list[str], labels: list[str]) -> list[str]:
    return [_f804(lab, [res.params[n], res.bse[n], res.tvalues[n], res.pvalues[n]]) for n, lab in zip(names, labels)]


def _model_block_mls(title: str, res, standardized: bool = False) -> str:
    """A model block in MIXREGMLS's layout (random slopes): Sigma is printed on its natural scale."""
    lay = res.layout
    out = _block_header(title, res)
    out.append(("STANDARDIZED " if standardized and lay.p > 1 else "") + _BLOCK_TITLES["BETA"])
    out += _mls_rows(res, [f"mean:{t}" for t in lay.mean_terms], list(lay.mean_terms))
    out += ["", "Random (location) Effect Variances and Covariances"]
    terms = list(res.model.design.info.get("re_terms", lay.re_names[: lay.q]))
    names = [f"bsvar:{t}" for t in lay.bs_terms]  # bs_formula: ln var(u0) = s'tau replaces var(u0)
    labels = [f"BS var {t}" for t in lay.bs_terms]
    for i in range(lay.q):
        for j in range(i + 1):
            if i == j:
                if i == 0 and lay.bs_terms:
                    continue
                names.append(f"var(u{i})")
                labels.append(terms[i])
            else:
                names.append(f"cov(u{j},u{i})")
                labels.append("Covariance" if lay.q == 2 else f"Covariance{j + 1}{i + 1}")
    out += _mls_rows(res, names, labels)
    out.append("")
    if lay.k == 1 and not lay.random_scale and lay.scale_terms == ("Intercept",):
        a, se = float(res.params["scale:Intercept"]), float(res.bse["scale:Intercept"])
        ev, ev_se = np.exp(a), np.exp(a) * se
        out.append(_f804("Error variance", [ev, ev_se, ev / ev_se, 2 * stats.norm.sf(abs(ev / ev_se))]))
    else:
        out.append(("STANDARDIZED " if standardized and lay.k > 1 else "") + _BLOCK_TITLES["TAU"])
        out += _mls_rows(res, [f"scale:{t}" for t in lay.scale_terms], list(lay.scale_terms))
    if lay.scale_re_terms:  # random scale slopes: every entry of Sigma that involves a scale effect, by name
        out += ["", "Random Scale Variances and Covariances"]
        scale = [n for n in lay.cov_names if "(v" in n or ",v" in n]
        out += _mls_rows(res, scale, scale)
    elif lay.random_scale:
        out += ["", "Random Scale Variance and Covariance"]
        pairs = [(f"cov(u{i},v)", f"Cov {t}") for i, t in enumerate(terms)] + [("var(v)", "Scale int var")]
        pairs = [(n, lab) for n, lab in pairs if n in res.params.index]  # covariances fixed at 0 are not printed
        out += _mls_rows(res, [n for n, _ in pairs], [lab for _, lab in pairs])
    if not res.converged:
        out.append("NOTE: CONVERGENCE CRITERION WAS NOT ACHIEVED")
    for r in res.singular_reasons():
        out.append(f"NOTE: singular fit: {r}")
    return "\n".join(out)


def _ratio_tables(res, alpha: float) -> str:
    z = stats.norm.ppf(1 - alpha / 2)
    if not is_mixregls_layout(res):  # MIXREGMLS prints the WS ratios only
        level = f"{100 * (1 - alpha):g}%"
        title = f"WS variance ratios and {level} CIs"
        out = [
            "",
            "",
            title,
            "-" * len(title),
            "",
            f"{'Variable':<16}" + "".join(f"    {h:>12}" for h in ("Ratio", "Lower", "Upper")),
            "----------------    ------------    ------------    ------------",
            _BLOCK_TITLES["TAU"],
        ]
        for t in res.layout.scale_terms:
            e, s = float(res.params[f"scale:{t}"]), float(res.bse[f"scale:{t}"])
            out.append(_f804(t, [np.exp(e), np.exp(e - z * s), np.exp(e + z * s)]))
        return "\n".join(out)
    tab = to_mixregls(res)
    level = f"{100 * (1 - alpha):g}%"
    head = [
        f"{'Variable':<16}" + "".join(f"    {h:>12}" for h in ("Ratio", "Lower", "Upper")),
        "----------------    ------------    ------------    ------------",
    ]

    def rows(part, label=None):
        lines = []
        for _, r in part.iterrows():
            e, s = r["estimate"], r["std err"]
            lines.append(_f804(label or r["term"], [np.exp(e), np.exp(e - z * s), np.exp(e + z * s)]))
        return lines

    title = f"BS variance ratios and {level} CIs"
    out = ["", "", title, "-" * len(title), ""] + head
    out += [_BLOCK_TITLES["ALPHA"]] + rows(tab[tab["block"] == "ALPHA"])
    title = f"WS variance ratios and {level} CIs"
    out += ["", "", title, "-" * len(title), ""] + head
    out += [_BLOCK_TITLES["TAU"]] + rows(tab[tab["block"] == "TAU"])
    if res.layout.random_scale:
        if res.layout.association != "none":  # NCOV = 0 prints no location effect
            out += [_BLOCK_TITLES["LOC_EFF"]] + rows(tab[tab["block"] == "LOC_EFF"], "Location Effect")
            out += rows(tab[tab["block"] == "QUAD_LOC"], "Quad Location")
        out += ["", _BLOCK_TITLES["SCALE_SD"]] + rows(tab[tab["block"] == "SCALE_SD"])
        out.append("(exp(Std Dev) is printed as MIXREGLS prints it; it has no useful interpretation)")
    return "\n".join(out)


def _ours_block(res, alpha: float) -> str:
    names = list(res.layout.cov_names)
    ci = res.conf_int(alpha)
    title = f"mlsml parameters (natural scale: Sigma = Cov({', '.join(res.layout.re_names)}))"
    out = ["", "", title, "-" * len(title), ""]
    out.append(f"{'Variable':<16}" + "".join(f"    {h:>12}" for h in ("Estimate", "StdError", "Lower", "Upper")))
    out.append("----------------    ------------    ------------    ------------    ------------")
    for n in names:
        out.append(_f804(n, [res.params[n], res.bse[n], ci.loc[n].iloc[0], ci.loc[n].iloc[1]]))
    corr = res.re_correlations()
    for n, row in corr.iterrows():
        out.append(_f804(str(n), [row["estimate"], row["std err"], np.nan, np.nan]))
    out.append("(the intervals of variances are symmetric on the log scale: var * exp(+/- z SE / var))")
    return "\n".join(out)


def _quadrature_lines(res) -> list[str]:
    """The NQ and QUADRATURE lines: the fit's own rule (``res.quadrature``, which results read
    back from JSON also carry).

    With the u-exact rule the ``nagq`` points lie in the scale effects only (the mean
    effects are integrated in closed form), so "per dimension" would overstate the
    integral's dimension; with the product rule they span every school effect.
    """
    lay = res.layout
    nagq = int(res.nagq)
    if res.quadrature == "marginal":  # the u-exact rule
        dims = "v" if lay.n_v == 1 else f"the {lay.n_v} scale effects"
        return [
            f" NQ         = {nagq:4d} per dimension of {dims} (u-exact rule)",
            " QUADRATURE = adaptive Gauss-Hermite over the scale effects at each cluster's posterior mode;",
            "              the location effects integrated exactly (closed form) given them",
        ]
    return [
        f" NQ         = {nagq:4d} per dimension ({lay.d} school effects, product rule)",
        " QUADRATURE = adaptive Gauss-Hermite, rotated at each cluster's posterior mode",
    ]


def summarize_mixwild(
    res,
    stages: Sequence[tuple[str, object]] | None = None,
    alpha: float = 0.05,
    title: Sequence[str] | str | None = None,
    source: str | None = None,
    standardized: bool = False,
    describe=None,
) -> str:
    """The MIXREGLS/MIXWILD-style text report of a fit.

    Sections, in MIXREGLS's order and formats: specifications; descriptives
    (observations, clusters, observations per cluster, mean/min/max/SD of the
    dependent variable and of the covariates of the mean, BS variance and WS
    variance models); for each model block the iterations, log-likelihood,
    AIC = logL - k and BIC = logL - k ln(J)/2 and the same times -2, and the
    parameter blocks BETA, ALPHA (``ln var(u0)``), TAU (our ``alpha``), random
    scale Std Dev and location effect Loc Eff (see the module docstring) with
    asymptotic SE, z and two-sided p; then likelihood-ratio tests between the
    stages, the BS and WS variance ratio tables ``exp(estimate)`` with
    ``1 - alpha`` intervals ``exp(estimate +/- z SE)``, and our own
    natural-scale covariance parameters.

    Parameters
    ----------
    res : MELSMResults
        The final fit, with or without a random scale. A random-intercept model
        is printed in MIXREGLS's parameterisation; a model with random slopes
        in MIXREGMLS's (MixWILD) layout, which prints ``Sigma`` directly:
        location variances and covariances, TAU, and the random-scale
        covariances ``Cov <term>`` and variance ``Scale int var``.
    stages : sequence of (title, MELSMResults), optional
        Earlier models to print before it (see :func:`fit_stages`); the last
        entry must be ``res``. Default: ``res`` alone.
    alpha : float
        The intervals of the ratio tables are ``1 - alpha``.
    title : str or sequence of str, optional
        Title lines (MIXREGLS prints the two title lines of the .def file).
    source : str, optional
        Where the data came from (printed in the specifications).
    standardized : bool
        The covariates were standardised before fitting (MIXREGLS's NCENT = 1):
        the BETA/TAU headings say "STANDARDIZED" as MIXREGLS's do.
    describe : MELSM or MELSMResults, optional
        Whose data the Descriptives section describes (default ``res``); with
        ``standardized``, pass the model on the unstandardised data, as MIXREGLS
        lists the covariates before standardisation.

    Returns
    -------
    str
    """
    if res.layout.q < 1:
        raise ModelSpecError("the MIXREGLS report needs random location effects (re_formula='~ 1' or '~ x')")
    mls = not is_mixregls_layout(res)
    if stages is None or len(stages) == 0:
        lay = res.layout
        t = STAGE_TITLES[2] if lay.random_scale else (STAGE_TITLES[1] if lay.k > 1 else STAGE_TITLES[0])
        stages = [(t, res)]
    elif stages[-1][1] is not res:
        raise ModelSpecError("the last of `stages` must be the results being summarised")
    spec = res.model.formula_spec
    out = ["MIXREGLS: Mixed-effects Location Scale Model with BS and WS variance models", ""]
    out += ["---------------------------", "Specifications (mlsml " + __version__ + ")", "---------------------------"]
    if title:
        for line in [title] if isinstance(title, str) else title:
            out.append(" " + str(line))
        out.append("")
    if source:
        out += [" data:", " " + source, ""]
    out.append(f" mean model          : {spec.formula}")
    lay = res.layout
    if lay.scale_re_terms:
        rs = f"  + random scale effects {spec.scale_re_formula} (correlated with the location effects)"
    else:
        link = {
            "none": "independent of u0 (NCOV = 0)",
            "linear": "correlated with u0",
            "quadratic": "linear and quadratic in u0/sd(u0) (NCOV = 2)",
        }
        rs = f"  + random scale v ({link[lay.association]})" if lay.random_scale else ""
    out.append(f" WS variance model   : {spec.scale_formula}{rs}")
    if mls:
        out.append(f" random location     : {spec.re_formula}  (cluster: {spec.groups}; MIXREGMLS layout)")
    else:
        out.append(f" BS variance model   : {spec.bs_formula or '~ 1'}  (cluster: {spec.groups})")
    out += _quadrature_lines(res)
    ses = (
        f"cluster-robust (sandwich) SEs over {spec.groups}"
        if getattr(res, "cov_type", "nonrobust") == "robust"
        else "SEs from the observed information"
    )
    out.append(f" OPTIMISER  = {res.method} + Newton polish (autograd derivatives); {ses}")
    weights = res.model.design.info.get("weights")
    if weights:
        out.append(f" WEIGHTS    = {describe_weights(weights)}")
    out.append("")
    out.append("")
    out.append(describe_data(res if describe is None else describe, standardized=standardized))
    for t, r in stages:
        block = _model_block_mls if mls else _model_block
        out.append(block(t, r, standardized=standardized))
    sampling = (weights or {}).get("kind") == "sampling"
    if len(stages) > 1 and sampling:
        out += ["", "(no likelihood-ratio tests between the models: sampling-weighted pseudo-likelihoods)"]
    if len(stages) > 1 and not sampling:
        tests = stage_tests(stages)
        ttl = "Likelihood-ratio tests between the models"
        out += ["", "", ttl, "-" * len(ttl), ""]
        out.append(f"{'Model':<32}{'LR chi2':>12}{'df':>6}{'p-value':>12}  reference")
        for _, row in tests.iterrows():
            out.append(f"{row['to'][:31]:<32}{row['LR chi2']:12.3f}{int(row['df']):6d}{row['p']:12.5f}  {row['reference']}")
    out.append(_ratio_tables(res, alpha))
    out.append(_ours_block(res, alpha))
    return "\n".join(out) + "\n"


class MixwildSummary:
    """A MIXREGLS-style report with the ``as_text``/``as_html``/``as_latex`` methods of a statsmodels summary."""

    def __init__(self, text: str):
        self.text = text

    def as_text(self) -> str:
        """The report as plain text."""
        return self.text

    def as_html(self) -> str:
        """The report in an HTML ``<pre>`` block (the layout is fixed-width)."""
        return "<pre>\n" + html.escape(self.text) + "</pre>\n"

    def as_latex(self) -> str:
        """The report in a LaTeX ``verbatim`` environment."""
        return "\\begin{verbatim}\n" + self.text + "\\end{verbatim}\n"

    def _repr_html_(self) -> str:
        return self.as_html()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text
