"""Summary tables (mlsml.summary): every parameter with its inference, the header, the flags.

Table cells are strings rounded to 4 decimals (z and p to 3), so numbers are compared
with half a unit of the last printed digit, never as exact strings. The flags of a
non-converged or singular fit are tested on copies of a good fit with that one field
changed (the fits that really end that way, with their warnings, are in test_results.py).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from scipy import stats

import mlsml
from mlsml import ModelSpecError
from mlsml.quadrature import QuadratureSpec
from mlsml.summary import VARIANCE_CI_NOTE, header_dict, summarize


@pytest.fixture(scope="module")
def demo_fit():
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    return mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x"), df


def _blocks(smry) -> dict[str, dict[str, list[str]]]:
    """The parameter table as {block title: {row label: cells}}."""
    table = smry.tables[1]
    blocks: dict[str, dict[str, list[str]]] = {}
    current = None
    for label, row in table.iterrows():
        if not label.startswith("  "):
            assert all(c == "" for c in row), label  # a title row
            current = blocks.setdefault(label, {})
        else:
            current[label.strip()] = list(row)
    return blocks


def _close(cell: str, value: float, decimals: int = 4):
    assert abs(float(cell) - value) <= 0.5 * 10**-decimals + 1e-12 * abs(value), (cell, value)


# ----------------------------------------------------------------- the parameter table
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_every_parameter_with_estimate_se_z_p_and_ci(demo_fit, alpha):
    res, _ = demo_fit
    smry = res.summary(alpha=alpha)
    table = smry.tables[1]
    assert list(table.columns) == ["Coef.", "Std.Err.", "z", "P>|z|", f"[{alpha / 2:g}", f"{1 - alpha / 2:g}]"]
    blocks = _blocks(smry)
    titles = list(blocks)
    assert titles[0].startswith("Mean function") and titles[1].startswith("Residual variance")
    assert titles[2] == "School effects (u0, v) ~ N(0, Sigma)"
    lay = res.layout
    rows = {f"mean:{t}": blocks[titles[0]][t] for t in lay.mean_terms}
    rows.update({f"scale:{t}": blocks[titles[1]][t] for t in lay.scale_terms})
    rows.update({n: blocks[titles[2]][n] for n in lay.cov_names})
    assert sorted(rows) == sorted(res.params.index)  # every parameter, once
    assert sum(len(b) for b in blocks.values()) == len(res.params) + len(res.re_correlations())
    ci = res.conf_int(alpha)
    for name, (coef, se, z, p, lo, hi) in rows.items():
        _close(coef, res.params[name])
        _close(se, res.bse[name])
        _close(z, res.params[name] / res.bse[name], 3)
        _close(p, 2 * stats.norm.sf(abs(res.params[name] / res.bse[name])), 3)
        _close(lo, ci.loc[name].iloc[0])
        _close(hi, ci.loc[name].iloc[1])
        assert float(lo) < float(coef) < float(hi)


def test_correlations_block(demo_fit):
    res, _ = demo_fit
    corr = _blocks(res.summary())["Derived correlations (delta-method SE)"]
    assert list(corr) == ["corr(u0,v)"]
    coef, se, *rest = corr["corr(u0,v)"]
    _close(coef, res.re_correlations().loc["corr(u0,v)", "estimate"])
    _close(se, res.re_correlations().loc["corr(u0,v)", "std err"])
    assert rest == ["", "", "", ""]  # no z, p or interval for a derived correlation


# ----------------------------------------------------------------- header
def test_header_states_data_likelihood_quadrature_and_convergence(demo_fit):
    res, df = demo_fit
    h = header_dict(res)
    sizes = df.groupby("school").size()
    assert h["Model:"] == "MELSM (random scale)"
    assert h["Dependent Variable:"] == "y" and h["Groups:"] == "school"
    assert h["No. Observations:"] == str(len(df)) == str(res.nobs)
    assert h["No. Groups:"] == "40"
    lo, mean, hi = (float(s) for s in h["Group size min/mean/max:"].split(" / "))
    assert (lo, hi) == (sizes.min(), sizes.max()) and abs(mean - sizes.mean()) <= 0.05
    assert h["Method:"] == "ML, adaptive Gauss-Hermite"
    for key, value in [("Log-Likelihood:", res.llf), ("Deviance:", -2 * res.llf), ("AIC:", res.aic), ("BIC:", res.bic)]:
        _close(h[key], value)
    assert h["No. parameters:"] == str(len(res.params))
    assert h["Converged:"] == "Yes"
    assert res.quadrature == "marginal" and h["Quadrature:"] == f"{res.nagq} per dim of v, u exact"
    text = res.summary().as_text()
    for key, value in h.items():
        assert re.search(re.escape(key) + r"\s+" + re.escape(value), text), key
    assert "WARNING" not in text


@pytest.mark.parametrize(
    "rule,text",
    [(QuadratureSpec("product", 7, 0.0), "7 per dim (49 nodes)"), (QuadratureSpec("product", 9, 1e-3), "9 per dim, pruned 0.001")],
)
def test_header_names_the_product_rule(demo_fit, rule, text):
    res = dataclasses.replace(demo_fit[0], rule=rule)
    assert header_dict(res)["Quadrature:"] == text


def test_model_without_random_scale(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    smry = res.summary()
    assert header_dict(res)["Model:"] == "MELSM"
    blocks = _blocks(smry)
    assert "Residual variance: ln var(e) = w'a" in blocks
    assert list(blocks["School effects (u0) ~ N(0, Sigma)"]) == ["var(u0)"]
    assert not any(t.startswith("Derived correlations") for t in blocks)  # one effect: no correlation


# ----------------------------------------------------------------- flags
def _notes(text: str) -> list[str]:
    """The notes under the table, one per paragraph (each starts on its own line; long ones wrap)."""
    tail = text.rsplit("=" * 20, 1)[1]
    return [" ".join(p.split()) for p in re.split(r"\n(?=WARNING:|Variance p-values|Intervals of variances)", tail.strip())]


def test_non_converged_fit_is_flagged(demo_fit):
    res = dataclasses.replace(demo_fit[0], converged=False, message="maximum number of passes reached")
    smry = summarize(res)
    text = smry.as_text()
    assert re.search(r"Converged:\s+NO", text)
    note = "WARNING: the fit did NOT converge (maximum number of passes reached). Do not use these estimates."
    assert _notes(text)[0] == note
    assert f"<br/>\n{note}<br/>\n" in smry.as_html()
    assert f"\n{note} \\newline \n" in smry.as_latex()


def test_singular_fit_is_flagged(demo_fit):
    res = demo_fit[0]
    reasons = ("var(v) = 3e-09 is near zero", "corr(u0,v) = -1.000")
    singular = dataclasses.replace(res, diagnostics=dataclasses.replace(res.diagnostics, singular_reasons=reasons))
    text = summarize(singular).as_text()
    assert _notes(text)[:2] == [f"WARNING: singular fit: {r}." for r in reasons]  # each on its own line
    assert "did NOT converge" not in text and "singular" not in summarize(res).as_text()
    assert _notes(summarize(res).as_text()) == [
        "Variance p-values are conservative (boundary); use mlsml.lrtest to test variances.",
        VARIANCE_CI_NOTE,
    ]


# ----------------------------------------------------------------- formats and styles
def test_summary_text_html_latex(exam_m3):
    """Moved from test_results.py (the HTML/LaTeX check of test_export.py merged in)."""
    s = exam_m3.summary()
    text = s.as_text()
    for piece in [
        "Mean function",
        "Residual variance",
        "var(u0)",
        "cov(u0,v)",
        "corr(u0,v)",
        "-4656.3164",
    ]:
        assert piece in text, piece
    assert re.search(r"Converged:\s+Yes", text)
    html = s.as_html()
    assert "<table" in html and "cov(u0,v)" in html
    latex = s.as_latex()
    assert "\\begin{tabular}" in latex and "cov(u0,v)" in latex


@pytest.mark.parametrize("style", ["statsmodels", "mixwild"])
def test_summary_formats_by_style(exam_m3, style):
    """Moved from test_export.py."""
    s = exam_m3.summary(style=style)
    for fmt in ("as_text", "as_html", "as_latex"):
        assert "Intercept" in getattr(s, fmt)()


def test_unknown_style_is_refused(demo_fit):
    with pytest.raises(ModelSpecError, match=r"unknown summary style 'stata' \(available: 'statsmodels', 'mixwild'\)"):
        summarize(demo_fit[0], style="stata")


def test_summary_is_the_results_method(demo_fit):
    res = demo_fit[0]
    assert summarize(res, alpha=0.1).as_text() == res.summary(alpha=0.1).as_text()
    assert np.isfinite(res.llf)


def test_an_impossible_llf_is_never_printed(demo_fit):
    """Issue 12: an overflowed quadrature gave llf = +4.2e14 and AIC = -8.4e14 in summary(). An
    optimiser end whose rule with twice the points disagrees by more than LLF_UNRELIABLE is
    reported as NaN, marked UNRELIABLE with a loud note, in both summary styles."""
    res = demo_fit[0]
    bad = dataclasses.replace(
        res.optsum, llf=4.2e14, converged=False, message="the quadrature is not accurate at the estimates", quadrature_check=(31, 3e25)
    )
    assert not bad.llf_reliable and res.optsum.llf_reliable
    out = mlsml.MELSMResults.build(res.model, res.likelihood, bad)
    assert np.isnan(out.llf) and np.isnan(out.aic) and np.isnan(out.bic)
    text = summarize(out).as_text()
    head = header_dict(out)
    assert head["Log-Likelihood:"] == head["AIC:"] == head["BIC:"] == head["Deviance:"] == "NaN (UNRELIABLE)"
    assert "4.2e" not in text and "e+14" not in text and "420000000" not in text
    note = _notes(text)[0]
    assert note.startswith("WARNING: the log-likelihood is NOT reported (NaN)") and "31 points" in note and "3e+25" in note
    mix = summarize(out, style="mixwild").as_text()
    criteria = [line for line in mix.splitlines() if line.startswith((" Log Likelihood ", " Akaike", " Schwarz"))]
    assert len(criteria) == 6 and all(line.endswith("UNRELIABLE") for line in criteria)
    assert "NOTE: THE LOG LIKELIHOOD IS NOT REPORTED" in mix and "e+14" not in mix
