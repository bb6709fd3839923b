"""MIXREGLS/MIXWILD-style output and the conversion between their parameters and ours.

MIXREGLS (Hedeker & Nordgren, 2013) writes the random-intercept location
scale model with standardised, independent random effects
``theta1_j, theta2_j ~ N(0, 1)``:

.. math::

    y_{ij} = x_{ij}'\\mathrm{BETA} + \\exp(\\mathrm{ALPHA}/2)\\,\\theta_{1j} + e_{ij},
    \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\mathrm{TAU}
        + \\mathrm{LocEff}\\,\\theta_{1j} + \\mathrm{StdDev}\\,\\theta_{2j}.

So MIXREGLS's ALPHA is the log **between**-cluster variance and its TAU is our
``alpha`` (the **within**-cluster variance function). With our
``u_j = sigma_u theta1_j`` and ``v_j = LocEff theta1_j + StdDev theta2_j``:

.. math::

    \\mathrm{ALPHA} = \\ln \\sigma^2_u,\\quad
    \\mathrm{LocEff} = \\sigma_{uv} / \\sigma_u,\\quad
    \\mathrm{StdDev} = \\sqrt{\\sigma^2_v - \\mathrm{LocEff}^2}

(``[[sigma_u, 0], [LocEff, StdDev]]`` is the lower Cholesky factor of
``Cov(u, v)``), and back: ``sigma2_u = exp(ALPHA)``,
``sigma2_v = LocEff^2 + StdDev^2``, ``sigma_uv = exp(ALPHA/2) LocEff``.
Standard errors of the converted quantities are by the delta method,
``J (-H)^{-1} J'``, with ``H`` the observed-information Hessian on the
optimiser scale (``res.hessian``) and ``J`` the autograd Jacobian of the map
from ``res.theta``.

:func:`summarize_mixwild` prints a fit in the layout of the MIXREGLS report
(``.OUT`` file); :func:`fit_stages` fits the sequence of models MIXREGLS
reports (random intercept with constant WS variance; + WS covariates; + random
scale) and :func:`stage_tests` gives the likelihood-ratio tests between them.
Information criteria are printed as MIXREGLS prints them: "larger is better"
``AIC = logL - k`` and ``BIC = logL - k ln(J) / 2`` (``J`` clusters), then the
same multiplied by ``-2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd
import patsy
from scipy import stats

from .errors import ModelSpecError

#: Block names of MIXREGLS's parameters (as in its report).
BLOCKS = ("BETA", "ALPHA", "TAU", "SCALE_SD", "LOC_EFF")

_BLOCK_TITLES = {
    "BETA": "BETA (regression coefficients)",
    "ALPHA": "ALPHA (BS variance parameters: log-linear model)",
    "TAU": "TAU (WS variance parameters: log-linear model)",
    "SCALE_SD": "Random scale standard deviation",
    "LOC_EFF": "Random location (mean) effect on WS variance",
}
_TERM = {"SCALE_SD": "Std Dev", "LOC_EFF": "Loc  Eff"}

STAGE_TITLES = (
    "Model without Scale Parameters",
    "Model WITH Scale Parameters",
    "Model WITH RANDOM Scale",
)


# ---------------------------------------------------------------------------- conversion
def _is_mixregls_layout(res) -> bool:
    """Whether ``res`` is a random-intercept model (MIXREGLS); otherwise MIXREGMLS's random-slope layout applies."""
    model = getattr(res, "model", res)
    return model.layout.q == 1 and tuple(model.design.info.get("re_terms", ())) == ("Intercept",)


def _check_mixregls_layout(res) -> None:
    lay = res.layout
    re_terms = tuple(res.model.design.info.get("re_terms", ()))
    if lay.q != 1 or re_terms != ("Intercept",):
        raise ModelSpecError(
            "MIXREGLS's parameterisation needs exactly one school effect in the mean, a random intercept "
            f"(re_formula='~ 1'); this model has random effects on {list(re_terms)}"
        )


def _mixregls_vector(theta, lay):
    """``[BETA, ALPHA_0, TAU, (StdDev, LocEff)]`` from the optimiser-scale ``theta`` (autograd-safe)."""
    beta, alpha, L = lay.split(theta)
    S = anp.dot(L, L.T)
    var_u = S[0, 0]
    parts = [beta, anp.reshape(anp.log(var_u), (1,)), alpha]
    if lay.random_scale:
        loc = S[0, 1] / anp.sqrt(var_u)
        sd = anp.sqrt(S[1, 1] - loc**2)
        parts += [anp.reshape(sd, (1,)), anp.reshape(loc, (1,))]
    return anp.concatenate(parts)


def _mixregls_index(lay) -> tuple[list[str], list[str]]:
    blocks = ["BETA"] * lay.p + ["ALPHA"] + ["TAU"] * lay.k
    terms = list(lay.mean_terms) + ["Intercept"] + list(lay.scale_terms)
    if lay.random_scale:
        blocks += ["SCALE_SD", "LOC_EFF"]
        terms += [_TERM["SCALE_SD"], _TERM["LOC_EFF"]]
    return blocks, terms


def to_mixregls(res) -> pd.DataFrame:
    """The estimates of ``res`` in MIXREGLS's parameterisation, with delta-method SEs.

    Parameters
    ----------
    res : MELSMResults
        A fit with a random intercept only in the mean (``re_formula="~ 1"``),
        with or without the random scale ``v``.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``"<BLOCK>:<term>"`` in MIXREGLS's print order (BETA, ALPHA,
        TAU, Std Dev, Loc Eff), with columns ``block`` (one of :data:`BLOCKS`),
        ``term``, ``estimate``, ``std err``, ``z``, ``P>|z|`` and ``ref_key``
        (the names used by the ``raw_parameters`` of the MIXREGLS reference
        JSONs: ``beta_<term>``, ``ln_sigma2_u``, ``alpha_<term>``, ``tau_scale``,
        ``tau_loc``). ``ALPHA = ln var(u0)``; ``TAU`` = our ``alpha``;
        ``LocEff = cov(u0,v)/sd(u0)``; ``StdDev = sqrt(var(v) - LocEff^2)``.

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.mixwild import to_mixregls
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> list(to_mixregls(res)["block"])
    ['BETA', 'BETA', 'ALPHA', 'TAU', 'TAU', 'SCALE_SD', 'LOC_EFF']
    """
    _check_mixregls_layout(res)
    lay = res.layout
    theta = np.asarray(res.theta, dtype=float)

    def f(t):
        return _mixregls_vector(t, lay)

    est = np.asarray(f(theta), dtype=float)
    if res._info.get("hessian_pd"):
        H = np.asarray(res.hessian, dtype=float)
        cov_t = np.linalg.inv(-0.5 * (H + H.T))
        J = autograd.jacobian(f)(theta)
        se = np.sqrt(np.clip(np.diag(J @ cov_t @ J.T), 0, None))
    else:
        se = np.full(est.shape, np.nan)
    blocks, terms = _mixregls_index(lay)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = est / se
    ref = []
    for b, t in zip(blocks, terms):
        ref.append(
            {"BETA": f"beta_{t}", "ALPHA": "ln_sigma2_u", "TAU": f"alpha_{t}", "SCALE_SD": "tau_scale", "LOC_EFF": "tau_loc"}[b]
        )
    out = pd.DataFrame(
        {
            "block": blocks,
            "term": terms,
            "estimate": est,
            "std err": se,
            "z": z,
            "P>|z|": 2 * stats.norm.sf(np.abs(z)),
            "ref_key": ref,
        },
        index=[f"{b}:{t}" for b, t in zip(blocks, terms)],
    )
    return out


def from_mixregls(estimates: pd.DataFrame | Mapping[str, float]) -> pd.Series:
    """Our natural-scale parameters from MIXREGLS estimates (the inverse of :func:`to_mixregls`).

    Parameters
    ----------
    estimates : DataFrame or mapping
        A frame like the output of :func:`to_mixregls` (columns ``block``,
        ``term``, ``estimate``), or a mapping ``"<BLOCK>:<term>" -> value``
        (keys ``BETA:<term>``, ``ALPHA:Intercept``, ``TAU:<term>`` and, for a
        random scale, ``SCALE_SD:Std Dev`` and ``LOC_EFF:Loc  Eff``).

    Returns
    -------
    pandas.Series
        ``mean:<term>`` = BETA, ``scale:<term>`` = TAU,
        ``var(u0) = exp(ALPHA)``, ``var(v) = LocEff^2 + StdDev^2``,
        ``cov(u0,v) = exp(ALPHA/2) LocEff``, in the contract order of
        :mod:`mlsml.params`.
    """
    if isinstance(estimates, pd.DataFrame):
        items = [(str(b), str(t), float(v)) for b, t, v in zip(estimates["block"], estimates["term"], estimates["estimate"])]
    else:
        items = []
        for key, v in estimates.items():
            if ":" not in str(key):
                raise ModelSpecError(f"MIXREGLS parameter name {key!r} is not of the form '<BLOCK>:<term>'")
            b, t = str(key).split(":", 1)
            items.append((b, t, float(v)))
    bad = [b for b, _, _ in items if b not in BLOCKS]
    if bad:
        raise ModelSpecError(f"unknown MIXREGLS block(s) {sorted(set(bad))}; expected {list(BLOCKS)}")
    alpha = [v for b, _, v in items if b == "ALPHA"]
    if len(alpha) != 1:
        raise ModelSpecError(
            f"expected exactly one ALPHA (log BS variance) parameter, got {len(alpha)}: mlsml has no BS-variance covariates"
        )
    out: dict[str, float] = {}
    for b, t, v in items:
        if b == "BETA":
            out[f"mean:{t}"] = v
    for b, t, v in items:
        if b == "TAU":
            out[f"scale:{t}"] = v
    var_u = float(np.exp(alpha[0]))
    out["var(u0)"] = var_u
    sd = [v for b, _, v in items if b == "SCALE_SD"]
    loc = [v for b, _, v in items if b == "LOC_EFF"]
    if sd or loc:
        if len(sd) != 1 or len(loc) != 1:
            raise ModelSpecError("a random scale needs both SCALE_SD (Std Dev) and LOC_EFF (Loc Eff)")
        out["var(v)"] = loc[0] ** 2 + sd[0] ** 2
        out["cov(u0,v)"] = np.sqrt(var_u) * loc[0]
    return pd.Series(out, name="estimate", dtype=float)


# ---------------------------------------------------------------------------- stages
def _stage_model(model, scale_intercept_only: bool, random_scale: bool):
    """A copy of ``model`` with the WS design cut to the intercept and/or without the random scale."""
    from .model import MELSM
    from .params import ParamLayout

    design, spec = model.design, model.formula_spec
    lay = design.layout
    W, scale_terms, scale_formula, scale_spec = design.W, lay.scale_terms, spec.scale_formula, spec.scale_spec
    if scale_intercept_only:
        W = np.ones((design.nobs, 1))
        scale_terms = ("Intercept",)
        scale_formula = "~ 1"
        scale_spec = patsy.dmatrix("~ 1", pd.DataFrame({"_y": [0.0, 1.0]}), NA_action="raise").design_info
    new_lay = ParamLayout(mean_terms=lay.mean_terms, scale_terms=tuple(scale_terms), n_re_mean=lay.q, random_scale=random_scale)
    new_design = dataclasses.replace(design, W=np.ascontiguousarray(W), layout=new_lay)
    new_spec = dataclasses.replace(spec, scale_formula=scale_formula, scale_spec=scale_spec)
    return MELSM(new_design, new_spec)


def fit_stages(
    fitted,
    nagq: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **fit_options,
) -> list[tuple[str, object]]:
    """Fit the nested sequence of models that MIXREGLS reports.

    1. "Model without Scale Parameters": the mean model with its random
       location effects, ``ln var(e) = alpha_0`` (constant WS variance);
    2. "Model WITH Scale Parameters": + the WS covariates of the final model
       (skipped, as by MIXREGLS, when the WS model has only an intercept);
    3. "Model WITH RANDOM Scale": + the random scale ``v`` correlated with the
       random location (MIXREGLS's NCOV = 1) -- only when the final model has one.

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
    from .model import MELSM

    if isinstance(fitted, MELSM):
        model, final = fitted, None
    else:
        model, final = fitted.model, fitted
        if nagq is None:
            nagq = fitted.nagq
    lay = model.layout
    if lay.q < 1:
        raise ModelSpecError("the MIXREGLS stage sequence needs random location effects (re_formula='~ 1' or '~ x')")
    plan: list[tuple[str, object]] = [(STAGE_TITLES[0], _stage_model(model, True, False))]
    if lay.k > 1:
        plan.append((STAGE_TITLES[1], _stage_model(model, False, False) if lay.random_scale else model))
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

    Adding the random scale puts ``var(v) = 0`` on the boundary under the
    null, so that test uses the ``0.5 chi2(1) + 0.5 chi2(2)`` mixture.
    """
    from .compare import lrtest

    rows = []
    for (t0, r0), (t1, r1) in zip(stages[:-1], stages[1:]):
        t = lrtest(r0, r1)
        rows.append({"from": t0, "to": t1, "LR chi2": t.statistic, "df": t.df, "p": t.pvalue, "reference": t.reference})
    return pd.DataFrame(rows, columns=["from", "to", "LR chi2", "df", "p", "reference"])


# ---------------------------------------------------------------------------- report
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
    if _is_mixregls_layout(model):
        out += _DESCR_HEAD + _descr_rows(np.ones((design.nobs, 1)), ["Intercept"])
    else:  # MIXREGMLS: the covariates of the random location effects
        out += _DESCR_HEAD + _descr_rows(design.Z, list(design.info.get("re_terms", lay.re_names)))
    out.append("")
    out.append(" WS variance model covariates")
    out += _DESCR_HEAD + _descr_rows(design.W, lay.scale_terms)
    out.append("")
    return "\n".join(out)


def _criteria(res) -> list[str]:
    ll, k, J = res.llf, res.df_model, res.ngroups
    aic, bic = ll - k, ll - 0.5 * k * np.log(J)
    return [
        f" Log Likelihood                 = {ll:12.3f}",
        f" Akaike's Information Criterion = {aic:12.3f}",
        f" Schwarz's Bayesian Criterion   = {bic:12.3f}",
        "",
        " ==> multiplied by -2             ",
        f" Log Likelihood                 = {-2 * ll:12.3f}",
        f" Akaike's Information Criterion = {-2 * aic:12.3f}",
        f" Schwarz's Bayesian Criterion   = {-2 * bic:12.3f}",
    ]


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
    names, labels = [], []
    for i in range(lay.q):
        for j in range(i + 1):
            if i == j:
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
    if lay.random_scale:
        out += ["", "Random Scale Variance and Covariance"]
        out += _mls_rows(res, [f"cov(u{i},v)" for i in range(lay.q)] + ["var(v)"], [f"Cov {t}" for t in terms] + ["Scale int var"])
    if not res.converged:
        out.append("NOTE: CONVERGENCE CRITERION WAS NOT ACHIEVED")
    for r in res.singular_reasons():
        out.append(f"NOTE: singular fit: {r}")
    return "\n".join(out)


def _ratio_tables(res, alpha: float) -> str:
    z = stats.norm.ppf(1 - alpha / 2)
    if not _is_mixregls_layout(res):  # MIXREGMLS prints the WS ratios only
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
        out += [_BLOCK_TITLES["LOC_EFF"]] + rows(tab[tab["block"] == "LOC_EFF"], "Location Effect")
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
    return "\n".join(out)


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
    from . import __version__

    if res.layout.q < 1:
        raise ModelSpecError("the MIXREGLS report needs random location effects (re_formula='~ 1' or '~ x')")
    mls = not _is_mixregls_layout(res)
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
    rs = "  + random scale v (correlated with u0)" if res.layout.random_scale else ""
    out.append(f" WS variance model   : {spec.scale_formula}{rs}")
    if mls:
        out.append(f" random location     : {spec.re_formula}  (cluster: {spec.groups}; MIXREGMLS layout)")
    else:
        out.append(f" BS variance model   : ~ 1  (cluster: {spec.groups})")
    out.append(f" NQ         = {res.nagq:4d} per dimension")
    out.append(" QUADRATURE = adaptive Gauss-Hermite, rotated at each cluster's posterior mode")
    out.append(f" OPTIMISER  = {res.method} + Newton polish (autograd derivatives); SEs from the observed information")
    out.append("")
    out.append("")
    out.append(describe_data(res if describe is None else describe, standardized=standardized))
    for t, r in stages:
        block = _model_block_mls if mls else _model_block
        out.append(block(t, r, standardized=standardized))
    if len(stages) > 1:
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
        import html

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
