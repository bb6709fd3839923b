"""Figures of the paper (matplotlib, an optional extra: ``pip install mlsml[plot]``).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot,
so nothing opens a window and no global state changes; save it with
``fig.savefig("file.png")`` or display it in a notebook.

- :func:`caterpillar`: school means and variances with intervals, ranked (Figure 2);
- :func:`mean_vs_variance`: school means against school variances (Figure 1);
- :func:`effect_histograms`: predicted school effects and standardised student
  residuals with normal and kernel density curves (Figures S4-S6);
- :func:`compare_models_plot`: school means, variances and their ranks under two
  models (Figure 4).

Axis labels and titles name the model's response (``normexam``, ...); the
paper's "progress" is its response. A correlation is shown only between values
that vary: see :data:`CONSTANT_RTOL`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from . import diagnostics
from .errors import warn
from .schools import variance_vectors

#: Values whose standard deviation is at most ``CONSTANT_RTOL`` times their largest
#: magnitude are treated as constant, and no correlation with them is computed or
#: shown. Predictions that are equal in exact arithmetic (the school variances of a
#: model without random scale) differ by rounding only, a few 1e-16 relative per
#: operation and well below 1e-12 after the exp, sums and products that make them;
#: their "correlation" is then nan when they happen to be bit-identical and rounding
#: noise otherwise (the figure printed "r = nan" or "r = -0.00" by platform).
#: Real differences between schools are many orders of magnitude larger.
CONSTANT_RTOL = 1e-9


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mlsml.plots needs matplotlib, an optional dependency: pip install 'mlsml[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure(**kwargs)


def _is_constant(x) -> bool:
    """True when ``x`` does not vary beyond rounding (see :data:`CONSTANT_RTOL`)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return x.size < 2 or float(np.std(x)) <= CONSTANT_RTOL * float(np.max(np.abs(x)))


def _correlation(a, b) -> float | None:
    """Pearson correlation of ``a`` and ``b``; ``None`` when either is constant."""
    if _is_constant(a) or _is_constant(b):
        return None
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def _ranks(x: pd.Series) -> pd.Series:
    """Ranks 1..n (ties averaged); constant values (up to rounding) are all tied."""
    if _is_constant(x):
        return pd.Series(np.full(len(x), (len(x) + 1) / 2), index=x.index)
    return x.rank()


def _r_text(r: float | None, constant: str) -> str:
    return f"r = {r:.2f}" if r is not None else f"no correlation: {constant} are all equal"


def _response(res) -> str:
    """The name of the model's response (``normexam``), for labels."""
    spec = getattr(res.model, "formula_spec", None)
    return getattr(spec, "response", None) or "the response"


def _median_variance(res, w=None) -> float:
    """``exp(wbar'alpha)``: the residual variance at ``w`` of the average school (``v = 0``)."""
    wbar, _ = variance_vectors(res, w)
    return float(np.exp(wbar @ res.fe_scale.to_numpy()))


def _pa_variance(res, w=None) -> float:
    """``exp(wbar'alpha + gbar'Sigma_vv gbar / 2)``: the population-averaged residual variance at ``w``."""
    wbar, gbar = variance_vectors(res, w)
    Svv = res.cov_re.to_numpy()[res.layout.q :, res.layout.q :]
    return float(np.exp(wbar @ res.fe_scale.to_numpy() + 0.5 * gbar @ Svv @ gbar))


def caterpillar(res, w=None, level: float = 0.95, table: pd.DataFrame | None = None):
    """Caterpillar plots of the school means (left) and school variances (right).

    Schools are sorted by their predicted value; bars are the posterior
    intervals at ``level`` and the points the posterior means. Reference lines:
    0 for the means, ``exp(wbar'alpha)`` (the average school, ``v = 0``) for the
    variances. Schools whose interval excludes the reference are drawn in colour.

    Parameters
    ----------
    res : MELSMResults
    w : see :meth:`MELSMResults.school_effects`
    level : float
    table : DataFrame, optional
        A precomputed :meth:`~MELSMResults.school_effects` table.

    Returns
    -------
    matplotlib.figure.Figure
    """
    t = table if table is not None else res.school_effects(w=w, level=level)
    fig = _figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    ref_var = _median_variance(res, None if isinstance(w, str) else w)
    y = _response(res)
    panels = [
        ("mean", f"School mean of {y}", 0.0, "average school (u = 0)"),
        ("var", f"School residual variance of {y}", ref_var, "average school (v = 0)"),
    ]
    for ax, (key, label, ref, reflab) in zip(axes, panels):
        s = t.sort_values(key)
        x = np.arange(1, len(s) + 1)
        flag = s[f"{key}_flag"].to_numpy()
        colors = np.where(flag > 0, "tab:red", np.where(flag < 0, "tab:blue", "0.55"))
        lo = s[key] - s[f"{key}_lo"]
        hi = s[f"{key}_hi"] - s[key]
        for c in np.unique(colors):
            m = colors == c
            ax.errorbar(
                x[m],
                s[key].to_numpy()[m],
                yerr=[lo.to_numpy()[m], hi.to_numpy()[m]],
                fmt="o",
                ms=2.5,
                lw=0.7,
                color=c,
                ecolor=c,
                elinewidth=0.7,
            )
        ax.axhline(ref, color="k", lw=1, ls="--", label=reflab)
        n_sep = int((flag != 0).sum())
        ax.set_title(f"{label}\n{n_sep} of {len(s)} schools separable from the average", fontsize="medium")
        ax.set_xlabel("school rank")
        ax.set_ylabel(f"{label} ({100 * level:g}% interval)")
        ax.legend(loc="upper left", fontsize="small")
    return fig


def mean_vs_variance(res, w=None, table: pd.DataFrame | None = None):
    """Predicted school means (y) against predicted school variances (x), Figure 1.

    Marker area is proportional to school size; the reference lines are the
    average school (mean 0, variance ``exp(wbar'alpha)``) and the population-
    averaged variance ``exp(wbar'alpha + var(v)/2)``, each in its own line
    style. The title gives the correlation of the predictions (not when the
    school variances are all equal, as without a random scale).

    Parameters
    ----------
    res : MELSMResults
    w : see :meth:`MELSMResults.school_effects`
    table : DataFrame, optional
        A precomputed :meth:`~MELSMResults.school_effects` table.

    Returns
    -------
    matplotlib.figure.Figure
    """
    t = table if table is not None else res.school_effects(w=w)
    fig = _figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    n = t["n"].to_numpy(dtype=float)
    size = 60 * n / n.mean()
    ax.scatter(t["var"], t["mean"], s=size, alpha=0.45, edgecolor="k", linewidth=0.4, color="tab:blue")
    # three reference lines, three line styles: the legend must tell them apart
    ax.axhline(0.0, color="0.35", lw=1, ls="--", label="average school mean (u = 0)")
    wref = None if isinstance(w, str) else w
    med = _median_variance(res, wref)
    ax.axvline(med, color="k", lw=1, ls="-.", label=f"average school variance (v = 0): {med:.3g}")
    if res.layout.random_scale:
        pav = _pa_variance(res, wref)
        ax.axvline(pav, color="tab:red", lw=1, ls=":", label=f"population-averaged variance: {pav:.3g}")
    r = _correlation(t["var"], t["mean"])
    ax.set_title(
        f"School means vs school variances\n{_r_text(r, 'the school variances')}; marker area ~ school size",
        fontsize="medium",
    )
    y = _response(res)
    ax.set_xlabel(f"predicted school residual variance of {y}")
    ax.set_ylabel(f"predicted school mean of {y}")
    ax.legend(loc="best", fontsize="small")
    return fig


def _hist_with_curves(ax, x: np.ndarray, title: str, standard: bool = False) -> None:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    ax.hist(x, bins="auto" if x.size < 2000 else 60, density=True, color="0.8", edgecolor="0.5", lw=0.5)
    grid = np.linspace(x.min() - 0.5 * x.std(), x.max() + 0.5 * x.std(), 300)
    mu, sd = (0.0, 1.0) if standard else (float(x.mean()), float(x.std(ddof=1)))
    ax.plot(grid, stats.norm.pdf(grid, mu, sd), color="tab:red", lw=1.2, label=f"normal (mean {mu:.2f}, SD {sd:.2f})")
    if x.size > 2 and x.std() > 0:
        kde = stats.gaussian_kde(x)
        ax.plot(grid, kde(grid), color="tab:blue", lw=1.2, ls="--", label="kernel density")
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel("density")
    ax.legend(fontsize="x-small")


def standardised_residuals(res) -> pd.Series:
    """Deprecated alias of :func:`mlsml.diagnostics.standardised_residuals`.

    It returns numbers, not a figure, so it lives in :mod:`mlsml.diagnostics`;
    this alias warns (``FutureWarning``) and will be removed.

    Examples
    --------
    >>> import warnings, mlsml
    >>> from mlsml import plots
    >>> res = mlsml.fit("y ~ x", mlsml.simulate.demo_data(n_groups=40, seed=1), groups="school")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     r = plots.standardised_residuals(res)
    >>> caught[0].category.__name__, r.name
    ('FutureWarning', 'std_resid')
    """
    warn(
        "mlsml.plots.standardised_residuals is deprecated and will be removed: use mlsml.diagnostics.standardised_residuals",
        FutureWarning,
    )
    return diagnostics.standardised_residuals(res)


def effect_histograms(res):
    """Histograms of the predicted school effects and of the standardised student residuals.

    One panel per school effect (``u0``, ``u1``, ..., ``v``: posterior means,
    with the normal curve of their mean and SD and a kernel density) and one of
    the standardised student residuals (:func:`mlsml.diagnostics.standardised_residuals`, with the
    standard normal curve), as the paper's Figures S4-S6.

    Returns
    -------
    matplotlib.figure.Figure
    """
    re_ = res.random_effects()
    names = list(res.layout.re_names)
    k = len(names) + 1
    fig = _figure(figsize=(3.6 * k, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, k))
    for ax, name in zip(axes, names):
        _hist_with_curves(ax, re_[name].to_numpy(), f"predicted {name}_j ({len(re_)} schools)")
        ax.set_xlabel(name)
    resid = diagnostics.standardised_residuals(res).to_numpy()
    _hist_with_curves(axes[-1], resid, f"standardised residuals ({res.nobs} students)", standard=True)
    axes[-1].set_xlabel("standardised residual")
    return fig


def compare_models_plot(res_a, res_b, labels: tuple[str, str] = ("model A", "model B"), w="school"):
    """School means, variances and their ranks under two models (Figure 4).

    Top: predicted school means and variances of model B against model A;
    bottom: their ranks. The 45-degree line and the correlation across schools
    are shown; when one model's values are all equal (the school variances of a
    model without random scale) the title says so instead of a correlation, and
    their ranks are all tied. Schools present in both fits are matched by label.

    Parameters
    ----------
    res_a, res_b : MELSMResults
    labels : (str, str)
        Axis labels of the two models.
    w : "school", None, mapping or array
        Covariate value for the school variances, passed to
        :meth:`MELSMResults.school_effects`. The default ``"school"`` uses each
        school's own mean covariates ``wbar_j`` as the paper does for Figure 4
        (a mapping/array applies to both models, so their variance designs
        must match).

    Returns
    -------
    matplotlib.figure.Figure
    """
    ta = res_a.school_effects(w=w)
    tb = res_b.school_effects(w=w)
    common = ta.index.intersection(tb.index)
    if len(common) < 2:
        raise ValueError("the two fits have fewer than two schools in common")
    ta, tb = ta.loc[common], tb.loc[common]
    fig = _figure(figsize=(9, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    ya, yb = _response(res_a), _response(res_b)
    y = ya if ya == yb else f"{ya} / {yb}"
    panels = [
        (axes[0, 0], ta["mean"], tb["mean"], f"school mean of {y}", "mean"),
        (axes[0, 1], ta["var"], tb["var"], f"school residual variance of {y}", "var"),
        (axes[1, 0], _ranks(ta["mean"]), _ranks(tb["mean"]), "rank of school mean", "mean"),
        (axes[1, 1], _ranks(ta["var"]), _ranks(tb["var"]), "rank of school variance", "var"),
    ]
    for ax, a, b, what, key in panels:
        a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        ax.scatter(a, b, s=10, alpha=0.5, color="tab:blue", edgecolor="none")
        lo = np.nanmin([a.min(), b.min()])
        hi = np.nanmax([a.max(), b.max()])
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--")
        # constancy is judged on the values, not on their ranks (ranks of rounding noise vary)
        const = [lab for lab, t in zip(labels, (ta, tb)) if _is_constant(t[key])]
        r = None if const else _correlation(a, b)
        sep = " " if r is not None else "\n"  # the longer note on a line of its own
        ax.set_title(f"{what}{sep}({_r_text(r, f'the values under {const[0]}' if const else '')})", fontsize="medium")
        ax.set_xlabel(f"{labels[0]}")
        ax.set_ylabel(f"{labels[1]}")
    return fig
