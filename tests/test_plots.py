"""The figures: each returns a Figure with the expected axes and content; no window opens."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml import diagnostics

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mlsml import plots  # noqa: E402


@pytest.fixture(scope="module")
def exam_m1(exam):
    return mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)


def test_caterpillar(exam_m3, tmp_path):
    fig = plots.caterpillar(exam_m3)
    assert isinstance(fig, Figure)
    ax_mean, ax_var = fig.axes
    t = exam_m3.school_effects()
    n_mean, n_var = int((t["mean_flag"] != 0).sum()), int((t["var_flag"] != 0).sum())
    assert f"{n_mean} of 65 schools" in ax_mean.get_title()
    assert f"{n_var} of 65 schools" in ax_var.get_title()
    assert ax_mean.get_xlabel() == "school rank"
    assert ax_mean.get_ylabel() == "School mean of normexam (95% interval)"
    assert ax_var.get_title().startswith("School residual variance of normexam\n")
    # the plotted points are the sorted predictions
    ys = np.sort(np.concatenate([line.get_ydata() for line in ax_mean.lines if len(line.get_ydata()) > 2]))
    np.testing.assert_allclose(ys, np.sort(t["mean"]))
    # reference lines: 0 and exp(wbar'alpha)
    refs = [line.get_ydata()[0] for line in ax_var.lines if line.get_linestyle() == "--"]
    med = np.exp(exam_m3.model.design.W.mean(axis=0) @ exam_m3.fe_scale.to_numpy())
    assert refs == [pytest.approx(med)]
    fig.savefig(tmp_path / "cat.png")
    assert (tmp_path / "cat.png").stat().st_size > 10_000


def _title_r(title: str) -> float:
    """The correlation printed in a title ("r = 0.52")."""
    m = re.search(r"r = (-?\d+\.\d\d)\b", title)
    assert m, title
    return float(m.group(1))


def _inside_figure(fig, artists) -> None:
    """Every artist is drawn entirely inside the figure (nothing clipped at its edges)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    for art in artists:
        bb = art.get_window_extent(renderer)
        assert box.x0 - 0.5 <= bb.x0 and bb.x1 <= box.x1 + 0.5 and box.y0 - 0.5 <= bb.y0 and bb.y1 <= box.y1 + 0.5, art


def test_mean_vs_variance(exam_m3):
    fig = plots.mean_vs_variance(exam_m3)
    (ax,) = fig.axes
    t = exam_m3.school_effects()
    pts = ax.collections[0]
    np.testing.assert_allclose(pts.get_offsets(), t[["var", "mean"]].to_numpy())
    sizes = pts.get_sizes()
    assert np.corrcoef(sizes, t["n"])[0, 1] == pytest.approx(1.0)
    # the printed r is the correlation to its two printed decimals
    assert _title_r(ax.get_title()) == pytest.approx(np.corrcoef(t["var"], t["mean"])[0, 1], abs=0.005 + 1e-12)
    # labels name the response, whatever it is (not the paper's "progress")
    assert ax.get_xlabel() == "predicted school residual variance of normexam"
    assert ax.get_ylabel() == "predicted school mean of normexam"
    assert len(ax.lines) == 3  # mean 0, average-school variance, population-averaged variance
    # three reference lines, three legend entries that can be told apart
    handles, labels = ax.get_legend_handles_labels()
    assert len(labels) == len(set(labels)) == 3
    looks = {(h.get_linestyle(), h.get_color()) for h in handles}
    assert len(looks) == 3, looks
    _inside_figure(fig, [ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend()])


def test_mean_vs_variance_without_random_scale_prints_no_correlation(exam_m1):
    fig = plots.mean_vs_variance(exam_m1)
    (ax,) = fig.axes
    title = ax.get_title()
    assert "r =" not in title and "nan" not in title
    assert "no correlation: the school variances are all equal" in title
    assert len(ax.lines) == 2  # no population-averaged variance without a random scale
    _inside_figure(fig, [ax.title, ax.get_legend()])


def _rounding_noise(t, key, seed=0):
    """The table with ``key`` perturbed by a few ulps, as another platform may compute it."""
    rng = np.random.default_rng(seed)
    out = t.copy()
    out[key] = out[key] * (1 + 4e-16 * rng.standard_normal(len(out)))
    assert out[key].std() > 0  # no longer bit-identical
    return out


def test_constant_up_to_rounding_is_constant(exam_m1):
    t = _rounding_noise(exam_m1.school_effects(), "var")
    title = plots.mean_vs_variance(exam_m1, table=t).axes[0].get_title()
    assert "r =" not in title and "all equal" in title
    # a real, if small, difference between schools is not rounding: its correlation is shown
    real = t.assign(var=t["var"] * (1 + 1e3 * plots.CONSTANT_RTOL * np.arange(len(t)) / len(t)))
    assert "r = " in plots.mean_vs_variance(exam_m1, table=real).axes[0].get_title()


def test_compare_models_plot(exam_m3, exam_m1):
    fig = plots.compare_models_plot(exam_m1, exam_m3, labels=("Model 1", "Model 3"))
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    ta, tb = exam_m1.school_effects(w="school"), exam_m3.school_effects(w="school")
    assert titles[0].startswith("school mean of normexam (r = ")
    assert _title_r(titles[0]) == pytest.approx(np.corrcoef(ta["mean"], tb["mean"])[0, 1], abs=0.005 + 1e-12)
    # Model 1 has no random scale: its variances exp(wbar_j'alpha) are equal (up to rounding)
    for title in titles[1], titles[3]:
        assert "r =" not in title and "nan" not in title
        assert "no correlation: the values under Model 1 are all equal" in title
    assert titles[1].startswith("school residual variance of normexam")
    assert titles[2].startswith("rank of school mean (r = ")
    # and their ranks are all tied, not an order made by rounding noise
    assert np.all(fig.axes[3].collections[0].get_offsets()[:, 0] == 33.0)
    assert fig.axes[0].get_xlabel() == "Model 1" and fig.axes[0].get_ylabel() == "Model 3"
    assert len(fig.axes[0].collections[0].get_offsets()) == 65
    _inside_figure(fig, [ax.title for ax in fig.axes])


def test_compare_models_plot_ignores_rounding_noise(exam_m3, exam_m1):
    """Model 1's equal variances computed with a few ulps of noise, as on another machine."""
    noisy = _rounding_noise(exam_m1.school_effects(w="school"), "var")
    stand_in = types.SimpleNamespace(school_effects=lambda w=None: noisy, model=exam_m1.model)
    fig = plots.compare_models_plot(stand_in, exam_m3, labels=("Model 1", "Model 3"))
    titles = [ax.get_title() for ax in fig.axes]
    assert "r =" not in titles[1] and "r =" not in titles[3]
    assert np.all(fig.axes[3].collections[0].get_offsets()[:, 0] == 33.0)


def test_standardised_residuals_live_in_diagnostics(exam_m3):
    r = diagnostics.standardised_residuals(exam_m3)
    assert r.name == "std_resid" and len(r) == 4059 and r.index.equals(exam_m3.model.design.row_labels)
    assert abs(r.mean()) < 0.05 and r.std() == pytest.approx(1.0, abs=0.05)
    with pytest.warns(FutureWarning, match="mlsml.diagnostics.standardised_residuals") as rec:
        old = plots.standardised_residuals(exam_m3)
    assert rec[0].filename == __file__  # the deprecation points at the caller
    pd.testing.assert_series_equal(old, r)


def test_clear_error_without_matplotlib(exam_m3, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"optional dependency: pip install 'mlsml\[plot\]'"):
        plots.mean_vs_variance(exam_m3)
