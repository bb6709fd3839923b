"""The figures: each returns a Figure with the expected axes and content; no window opens."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlsml

pytest.importorskip("matplotlib")
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
    # the plotted points are the sorted predictions
    ys = np.sort(np.concatenate([line.get_ydata() for line in ax_mean.lines if len(line.get_ydata()) > 2]))
    np.testing.assert_allclose(ys, np.sort(t["mean"]))
    # reference lines: 0 and exp(wbar'alpha)
    refs = [line.get_ydata()[0] for line in ax_var.lines if line.get_linestyle() == "--"]
    med = np.exp(exam_m3.model.design.W.mean(axis=0) @ exam_m3.fe_scale.to_numpy())
    assert refs == [pytest.approx(med)]
    fig.savefig(tmp_path / "cat.png")
    assert (tmp_path / "cat.png").stat().st_size > 10_000


def test_mean_vs_variance(exam_m3):
    fig = plots.mean_vs_variance(exam_m3)
    (ax,) = fig.axes
    t = exam_m3.school_effects()
    pts = ax.collections[0]
    np.testing.assert_allclose(pts.get_offsets(), t[["var", "mean"]].to_numpy())
    sizes = pts.get_sizes()
    assert np.corrcoef(sizes, t["n"])[0, 1] == pytest.approx(1.0)
    r = np.corrcoef(t["var"], t["mean"])[0, 1]
    assert f"r = {r:.2f}" in ax.get_title()
    assert "variance" in ax.get_xlabel() and "mean" in ax.get_ylabel()
    assert len(ax.lines) == 3  # mean 0, average-school variance, population-averaged variance


def test_effect_histograms(exam_m3, exam_m1):
    fig = plots.effect_histograms(exam_m3)
    assert [ax.get_xlabel() for ax in fig.axes] == ["u0", "v", "standardised residual"]
    for ax in fig.axes:
        assert len(ax.patches) > 5  # histogram bars
        assert len(ax.lines) == 2  # normal and kernel density curves
    r = plots.standardised_residuals(exam_m3)
    assert len(r) == 4059 and abs(r.mean()) < 0.05 and r.std() == pytest.approx(1.0, abs=0.05)
    assert [ax.get_xlabel() for ax in plots.effect_histograms(exam_m1).axes] == ["u0", "standardised residual"]


def test_compare_models_plot(exam_m3, exam_m1):
    fig = plots.compare_models_plot(exam_m1, exam_m3, labels=("Model 1", "Model 3"))
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    ta, tb = exam_m1.school_effects(w="school"), exam_m3.school_effects(w="school")
    assert titles[0] == f"school mean progress (r = {np.corrcoef(ta['mean'], tb['mean'])[0, 1]:.2f})"
    # Model 1 has no random scale: its variances are exp(wbar_j'alpha) = constant
    assert titles[1] == "school residual variance (r = nan)"
    assert titles[2].startswith("rank of school mean")
    assert fig.axes[0].get_xlabel() == "Model 1" and fig.axes[0].get_ylabel() == "Model 3"
    assert len(fig.axes[0].collections[0].get_offsets()) == 65


def test_clear_error_without_matplotlib(exam_m3, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="optional dependency"):
        plots.mean_vs_variance(exam_m3)
