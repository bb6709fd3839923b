"""Side-by-side comparison of a maximum-likelihood fit with a Bayesian fit.

:func:`compare_bayes` takes a fitted :class:`~mlsml.results.MELSMResults` and a
posterior summary of the same model from brms (``posterior_summary()``) or an
ArviZ-style summary (``az.summary()``), converts the posterior summaries to
mlsml's parameters and returns our estimate and SE beside the posterior mean and
SD.

brms parameterises the residual **standard deviation**,
``ln sigma_ij = w_ij' b_sigma + v*_j`` with ``v*_j ~ N(0, sd_sigma^2)``, so with
our ``ln var(e_ij) = w_ij' alpha + v_j``:

.. math::

    \\alpha = 2\\, b_\\sigma, \\qquad v_j = 2 v^*_j, \\qquad
    \\sigma^2_v = (2\\, sd_\\sigma)^2, \\qquad
    \\sigma^2_{u_k} = sd_{u_k}^2, \\qquad
    \\operatorname{cov}(a, b) = \\rho_{ab}\\, s_a s_b,

with ``s = sd`` for mean effects and ``s = 2 sd`` for the scale effect; the
correlations are unchanged (the factor 2 is positive).

Converting a **summary** (not draws) is exact only for linear maps. What is done:

- ``b_*`` and ``b_sigma_*`` (x2): mean, SD and quantiles exactly.
- variances from ``sd``: the posterior mean of ``sd^2`` is computed exactly as
  ``E[sd^2] = E[sd]^2 + Var(sd)`` (it is **not** ``E[sd]^2``); the quantiles
  exactly as squared quantiles (squaring is monotone on ``sd > 0``) -- exact up to
  the ``(n-1)/n`` factor when ``Est.Error`` is the draws' sample SD (a relative
  ``1/n`` of ``Var(sd)``, negligible for thousands of draws); the posterior
  SD of ``sd^2`` is approximated as ``sqrt(4 m^2 s^2 + 2 s^4)`` (exact when ``sd`` is
  normal a posteriori, ``m, s`` its mean and SD).
- covariances ``rho s_a s_b``: the posterior mean is approximated by the product
  of the posterior means (exact only if the three are independent a posteriori)
  and the SD by the delta method under independence; no interval.

Rows already named with mlsml's names (``var(u0)``, ``cov(u0,v)``, ``scale:x``,
...), e.g. computed draw by draw in R, are taken as they are, which is exact and
preferred. The ``conversion`` column of the result says which rule was used.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ModelSpecError

_COLS_BRMS = {"Estimate": "mean", "Est.Error": "sd", "Q2.5": "lower", "Q97.5": "upper"}
_COLS_ARVIZ = {"mean": "mean", "sd": "sd"}


def _read(posterior_summary) -> pd.DataFrame:
    """Normalise a summary to columns mean, sd, lower, upper, indexed by parameter."""
    if isinstance(posterior_summary, (str, Path)):
        df = pd.read_csv(posterior_summary)
        first = df.columns[0]
        if first.startswith("Unnamed") or first in ("", "parameter", "variable", "term", "name"):
            df = df.set_index(first)
        elif df[first].dtype == object:
            df = df.set_index(first)
    elif isinstance(posterior_summary, pd.DataFrame):
        df = posterior_summary.copy()
    else:
        raise ModelSpecError("posterior_summary must be a CSV path or a pandas DataFrame")
    df.index = [str(i) for i in df.index]
    if {"Estimate", "Est.Error"} <= set(df.columns):
        lo = next((c for c in df.columns if re.fullmatch(r"Q\d+(\.\d+)?", c) and float(c[1:]) < 50), None)
        hi = next((c for c in df.columns[::-1] if re.fullmatch(r"Q\d+(\.\d+)?", c) and float(c[1:]) > 50), None)
        out = pd.DataFrame({"mean": df["Estimate"], "sd": df["Est.Error"]})
        out["lower"] = df[lo] if lo else np.nan
        out["upper"] = df[hi] if hi else np.nan
        out.attrs["interval"] = f"{lo}-{hi}" if lo and hi else ""
        return out.astype(float)
    if {"mean", "sd"} <= set(df.columns):

        def pct(c: str) -> float | None:
            m = re.fullmatch(r"(?:hdi_|eti_|q)?(\d+(?:\.\d+)?)%?", str(c))
            return float(m.group(1)) if m and (str(c).endswith("%") or str(c).startswith("q")) else None

        lo = next((c for c in df.columns if pct(c) is not None and pct(c) < 50), None)
        hi = next((c for c in df.columns[::-1] if pct(c) is not None and pct(c) > 50), None)
        out = pd.DataFrame({"mean": df["mean"], "sd": df["sd"]})
        out["lower"] = df[lo] if lo else np.nan
        out["upper"] = df[hi] if hi else np.nan
        out.attrs["interval"] = f"{lo}-{hi}" if lo and hi else ""
        return out.astype(float)
    raise ModelSpecError(
        "posterior_summary needs brms columns (Estimate, Est.Error[, Q2.5, Q97.5]) or ArviZ columns "
        f"(mean, sd[, hdi_3%, hdi_97%]); got {list(df.columns)}"
    )


def _var_from_sd(m: float, s: float, lo: float, hi: float, factor: float) -> tuple[float, float, float, float]:
    m, s, lo, hi = factor * m, factor * s, factor * lo, factor * hi
    mean = m**2 + s**2
    sd = float(np.sqrt(4 * m**2 * s**2 + 2 * s**4))
    return mean, sd, (max(lo, 0.0) ** 2 if np.isfinite(lo) else np.nan), (hi**2 if np.isfinite(hi) else np.nan)


def convert_brms(summary: pd.DataFrame, re_terms: list[str], random_scale: bool = True) -> pd.DataFrame:
    """Convert a normalised brms summary (see :func:`compare_bayes`) to mlsml's names.

    Parameters
    ----------
    summary : DataFrame
        Columns ``mean, sd, lower, upper``, indexed by brms names.
    re_terms : list of str
        Our random-effect terms in the mean, in order (``["Intercept", "x"]`` for
        ``u0, u1``).
    random_scale : bool
        Whether the model has the random scale ``v``.

    Returns
    -------
    DataFrame
        Columns ``mean, sd, lower, upper, conversion`` indexed by mlsml names.
    """
    rows: dict[str, tuple] = {}
    # effect name (ours) -> (brms sd row, factor)
    sds: dict[str, tuple[str, float]] = {}
    for name in summary.index:
        m, s, lo, hi = summary.loc[name, ["mean", "sd", "lower", "upper"]]
        if name.startswith("b_sigma_"):
            rows["scale:" + name[len("b_sigma_") :]] = (2 * m, 2 * s, 2 * lo, 2 * hi, "x2 (exact)")
        elif name.startswith("b_"):
            rows["mean:" + name[2:]] = (m, s, lo, hi, "identity")
        elif name.startswith("sd_"):
            term = name.split("__", 1)[1] if "__" in name else ""
            if term.startswith("sigma_"):
                if random_scale and term == "sigma_Intercept":
                    sds["v"] = (name, 2.0)
            elif term in re_terms:
                sds[f"u{re_terms.index(term)}"] = (name, 1.0)
    for eff, (name, factor) in sds.items():
        m, s, lo, hi = summary.loc[name, ["mean", "sd", "lower", "upper"]]
        how = "E[sd^2] = mean^2 + sd^2 (exact); SD normal approx.; quantiles squared"
        if factor == 2:
            how = "x2, then " + how
        rows[f"var({eff})"] = (*_var_from_sd(m, s, lo, hi, factor), how)

    def effect(term: str) -> str | None:
        if term == "sigma_Intercept":
            return "v" if random_scale else None
        return f"u{re_terms.index(term)}" if term in re_terms else None

    order = [f"u{i}" for i in range(len(re_terms))] + (["v"] if random_scale else [])
    for name in summary.index:
        if not name.startswith("cor_"):
            continue
        parts = name.split("__")
        if len(parts) != 3:
            continue
        a, b = effect(parts[1]), effect(parts[2])
        if a is None or b is None or a not in sds or b not in sds:
            continue
        if order.index(a) > order.index(b):
            a, b = b, a
        m, s, lo, hi = summary.loc[name, ["mean", "sd", "lower", "upper"]]
        rows[f"corr({a},{b})"] = (m, s, lo, hi, "identity")
        (na, fa), (nb, fb) = sds[a], sds[b]
        ma, sa = fa * summary.loc[na, "mean"], fa * summary.loc[na, "sd"]
        mb, sb = fb * summary.loc[nb, "mean"], fb * summary.loc[nb, "sd"]
        mean = m * ma * mb
        sd = float(np.sqrt((s * ma * mb) ** 2 + (m * sa * mb) ** 2 + (m * ma * sb) ** 2))
        rows[f"cov({a},{b})"] = (mean, sd, np.nan, np.nan, "product of posterior means (approx.); SD delta method")
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "sd", "lower", "upper", "conversion"])
    return out


def compare_bayes(res, posterior_summary, names: dict | None = None) -> pd.DataFrame:
    """Our ML estimates beside a Bayesian posterior summary of the same model.

    Parameters
    ----------
    res : MELSMResults
        The maximum-likelihood fit.
    posterior_summary : str, pathlib.Path or pandas.DataFrame
        A brms ``posterior_summary(fit)`` table (rows ``b_Intercept``, ``b_x``,
        ``b_sigma_Intercept``, ``b_sigma_x``, ``sd_school__Intercept``,
        ``sd_school__sigma_Intercept``, ``cor_school__Intercept__sigma_Intercept``,
        ...; columns ``Estimate, Est.Error, Q2.5, Q97.5``) or an ArviZ summary
        (columns ``mean, sd`` and optionally ``hdi_3%, hdi_97%``, ``eti_*`` or
        ``2.5%, 97.5%`` quantiles) whose rows are
        brms names or mlsml names; as a DataFrame or a CSV file (row names in the
        first column, as ``write.csv`` writes them).
    names : dict, optional
        Extra renaming of summary rows to brms or mlsml names, applied first
        (e.g. ``{"Intercept": "b_Intercept"}``).

    Returns
    -------
    pandas.DataFrame
        Indexed by mlsml parameter name (``corr(...)`` rows added), columns
        ``estimate``, ``std err`` (ours), ``post mean``, ``post sd``, ``post lower``,
        ``post upper`` (the summary's interval, e.g. 2.5%-97.5% for brms),
        ``diff`` (ours - posterior mean), ``diff/SE`` and ``conversion``
        (which rule converted the row; see the module docstring). Parameters
        absent from the summary have missing posterior columns.

    Examples
    --------
    >>> import pandas as pd, mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> post = pd.DataFrame({"Estimate": [0.0, -0.43], "Est.Error": [0.03, 0.01]},
    ...                     index=["b_Intercept", "b_sigma_Intercept"])
    >>> float(mlsml.compare_bayes(res, post).loc["scale:Intercept", "post mean"])
    -0.86
    """
    summ = _read(posterior_summary)
    if names:
        summ = summ.rename(index=names)
    lay = res.layout
    info = res.model.design.info
    re_terms = list(info.get("re_terms") or res.model.formula_spec.re_spec.column_names)
    brms_rows = summ[[not (i in lay.names or i.startswith("corr(")) for i in summ.index]]
    ours_rows = summ[[i in lay.names or i.startswith("corr(") for i in summ.index]]
    conv = convert_brms(brms_rows, re_terms, lay.random_scale)
    direct = ours_rows.assign(conversion="given on mlsml's scale")
    post = pd.concat([conv[~conv.index.isin(direct.index)], direct])
    est = res.params.copy()
    se = res.bse.copy()
    corr = res.re_correlations()
    for name in corr.index:
        est[name] = corr.loc[name, "estimate"]
        se[name] = corr.loc[name, "std err"]
    out = pd.DataFrame({"estimate": est, "std err": se})
    out["post mean"] = post["mean"].reindex(out.index)
    out["post sd"] = post["sd"].reindex(out.index)
    out["post lower"] = post["lower"].reindex(out.index)
    out["post upper"] = post["upper"].reindex(out.index)
    out["diff"] = out["estimate"] - out["post mean"]
    out["diff/SE"] = out["diff"] / out["std err"]
    out["conversion"] = post["conversion"].reindex(out.index)
    unknown = [i for i in post.index if i not in out.index]
    if unknown:
        out.attrs["unmatched"] = unknown
    return out
