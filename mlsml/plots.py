"""Figures of the paper (matplotlib, an optional extra: ``pip install mlsml[plots]``).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot,
so nothing opens a window and no global state changes; save it with
``fig.savefig("file.png")`` or display it in a notebook.

- :func:`caterpillar`: school means and variances with intervals, ranked (Figure 2);
- :func:`mean_vs_variance`: school means against school variances (Figure 1);
- :func:`effect_histograms`: predicted school effects and standardised student
  residuals with normal and kernel density curves (Figures S4-S6);
- :func:`compare_models_plot`: school means, variances and their ranks under two
  models (Figure 4).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mlsml.plots needs matplotlib, an optional dependency: pip install 'mlsml[plots]' (or pip install matplotlib)"
        ) from exc
    return Figure(**kwargs)


def _median_variance(res, w=None) -> float:
    from .schools import reference_vector

    design = res.model.design
    wbar = reference_vector(w, design.layout.scale_terms, design.W, "w")
    return float(np.exp(wbar @ res.fe_scale.to_numpy()))


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
    panels = [
        ("mean", "School mean progress", 0.0, "average school (u = 0)"),
        ("var", "School residual variance", ref_var, "average school (v = 0)"),
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
    averaged variance ``exp(wbar'alpha + var(v)/2)``. The title gives the
    correlation of the predictions.

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
    ax.axhline(0.0, color="k", lw=1, ls="--", label="average school mean (u = 0)")
    wref = None if isinstance(w, str) else w
    med = _median_variance(res, wref)
    ax.axvline(med, color="k", lw=1, ls="--", label=f"average school variance (v = 0): {med:.3g}")
    if res.layout.random_scale:
        pav = med * float(np.exp(0.5 * res.cov_re.iloc[-1, -1]))
        ax.axvline(pav, color="tab:red", lw=1, ls=":", label=f"population-averaged variance: {pav:.3g}")
    r = float(np.corrcoef(t["var"], t["mean"])[0, 1]) if t["var"].std() > 0 else float("nan")
    ax.set_title(f"School means vs school variances (r = {r:.2f}); marker size ~ school size")
    ax.set_xlabel("predicted school residual variance")
    ax.set_ylabel("predicted school mean progress")
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
    """Standardised student residuals ``(y - x'beta - z'E(u_j)) / sqrt(exp(w'alpha) E(exp(v_j)))``.

    In the caller's row order, indexed by the row labels of the data used.
    """
    from .predict import PosteriorGrid, posterior_moments
    from .schools import posterior_nagq

    design = res.model.design
    lay = design.layout
    q = lay.q
    mean, C = posterior_moments(res.theta, design, posterior_nagq(res), res.prune)
    g = design.group
    fit = design.X @ res.fe_mean.to_numpy()
    if q:
        fit = fit + np.einsum("iq,iq->i", design.Z, mean[g, :q])
    var = np.exp(design.W @ res.fe_scale.to_numpy())
    if lay.random_scale:
        grid = PosteriorGrid.build(res.theta, design, mean[:, q], np.sqrt(C[:, q, q]))
        var = var * grid.mean_exp_v()[g]
    r = (design.y - fit) / np.sqrt(var)
    out = np.empty_like(r)
    out[design.order] = r
    return pd.Series(out, index=design.row_labels, name="std_resid")


def effect_histograms(res):
    """Histograms of the predicted school effects and of the standardised student residuals.

    One panel per school effect (``u0``, ``u1``, ..., ``v``: posterior means,
    with the normal curve of their mean and SD and a kernel density) and one of
    the standardised student residuals (:func:`standardised_residuals`, with the
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
    _hist_with_curves(axes[-1], standardised_residuals(res).to_numpy(), f"standardised residuals ({res.nobs} students)", standard=True)
    axes[-1].set_xlabel("standardised residual")
    return fig


def compare_models_plot(res_a, res_b, labels: tuple[str, str] = ("model A", "model B"), w="school"):
    """School means, variances and their ranks under two models (Figure 4).

    Top: predicted school means and variances of model B against model A;
    bottom: their ranks. The 45-degree line and the correlation across schools
    are shown. Schools present in both fits are matched by label.

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
    panels = [
        (axes[0, 0], ta["mean"], tb["mean"], "school mean progress"),
        (axes[0, 1], ta["var"], tb["var"], "school residual variance"),
        (axes[1, 0], ta["mean"].rank(), tb["mean"].rank(), "rank of school mean"),
        (axes[1, 1], ta["var"].rank(), tb["var"].rank(), "rank of school variance"),
    ]
    for ax, a, b, what in panels:
        a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        ax.scatter(a, b, s=10, alpha=0.5, color="tab:blue", edgecolor="none")
        lo = np.nanmin([a.min(), b.min()])
        hi = np.nanmax([a.max(), b.max()])
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--")
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        ax.set_title(f"{what} (r = {r:.2f})")
        ax.set_xlabel(f"{labels[0]}")
        ax.set_ylabel(f"{labels[1]}")
    return fig
