"""Simulation from a fitted model and the parametric bootstrap (mlsml/bootstrap.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.bootstrap import bootstrap
from mlsml.errors import ConvergenceWarning, DataError, ModelSpecError
from mlsml.simulate import draw_responses


@pytest.fixture(scope="module")
def shuffled():
    """Small data in a scrambled row order with a non-default index."""
    df = mlsml.simulate.simulate_data([15] * 30, seed=11)
    df = df.sample(frac=1.0, random_state=3)
    df.index = [f"r{i}" for i in range(len(df))]
    return df


@pytest.fixture(scope="module")
def ri_fit(shuffled):
    """Random-intercept model without random scale: fast and well behaved."""
    return mlsml.fit("y ~ x", shuffled, groups="school", random_scale=False)


def test_with_response_roundtrip(shuffled):
    design = mlsml.MELSM.from_formula("y ~ x", shuffled, groups="school").design
    again = design.with_response(shuffled["y"].to_numpy(), caller_order=True)
    np.testing.assert_array_equal(again.y, design.y)
    assert again.X is design.X and again.group is design.group
    with pytest.raises(DataError, match="shape"):
        design.with_response(np.zeros(design.nobs - 1))
    with pytest.raises(DataError, match="non-finite"):
        design.with_response(np.full(design.nobs, np.nan))


def test_simulate_is_in_callers_row_order(ri_fit, shuffled):
    sims = ri_fit.simulate(3, seed=5)
    assert sims.shape == (len(shuffled), 3)
    assert sims.index.equals(shuffled.index)
    # the same draws as draw_responses (group-sorted order), mapped back row by row
    design = ri_fit.model.design
    raw = draw_responses(design, np.asarray(ri_fit.theta), np.random.default_rng(5), 3)
    for i in (0, 17, design.nobs - 1):
        label = design.row_labels[design.order[i]]
        np.testing.assert_array_equal(sims.loc[label].to_numpy(), raw[:, i])
    # seeded: reproducible; different seeds differ
    pd.testing.assert_frame_equal(sims, ri_fit.simulate(3, seed=5))
    assert not np.allclose(sims.to_numpy(), ri_fit.simulate(3, seed=6).to_numpy())


def test_simulated_means_follow_the_callers_covariate(ri_fit, shuffled):
    # E(y*_ij) = b0 + b1 x_ij: the average over replicates must track x row by row
    sims = ri_fit.simulate(400, seed=2)
    b0, b1 = ri_fit.fe_mean.to_numpy()
    expected = b0 + b1 * shuffled["x"].to_numpy()
    total_var = float(ri_fit.cov_re.iloc[0, 0] + np.exp(ri_fit.fe_scale.iloc[0]))
    z = (sims.mean(axis=1).to_numpy() - expected) / np.sqrt(total_var / 400)
    assert np.abs(z).max() < 5.0
    assert np.corrcoef(sims.mean(axis=1), shuffled["x"])[0, 1] > 0.95


def test_bootstrap_se_agree_with_wald_for_fixed_effects(ri_fit):
    boot = ri_fit.bootstrap(100, seed=20261126, n_jobs=1, progress=False)
    assert boot.n_reps == 100 and boot.n_converged == 100
    assert boot.replicates.shape == (100, len(ri_fit.params))
    wald = ri_fit.bse
    # Monte-Carlo relative SE of an SD from 100 draws is about 1/sqrt(198) = 7%
    for name in ("mean:Intercept", "mean:x", "scale:Intercept"):
        ratio = boot.bse[name] / wald[name]
        assert abs(ratio - 1) < 0.3, (name, ratio)
    ci = boot.conf_int(0.1)
    assert list(ci.columns) == ["0.05", "0.95"]
    assert (ci.iloc[:, 0] < ri_fit.params).all() and (ri_fit.params < ci.iloc[:, 1]).all()
    frame = boot.summary_frame()
    assert list(frame.columns) == ["estimate", "wald se", "boot se", "bias", "0.025", "0.975"]
    assert np.all(np.abs(frame["bias"]) < 3 * frame["boot se"] / np.sqrt(100) + 1e-3)


@pytest.mark.slow
def test_bootstrap_parallel_equals_serial(ri_fit):
    a = ri_fit.bootstrap(6, seed=9, n_jobs=1, progress=False)
    b = ri_fit.bootstrap(6, seed=9, n_jobs=2, progress=False)
    assert b.n_jobs == 2
    np.testing.assert_allclose(a.replicates.to_numpy(), b.replicates.to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.converged, b.converged)


def test_failed_replicates_are_counted_and_left_out(ri_fit, monkeypatch):
    real_fit = mlsml.MELSM.fit
    calls = {"n": 0}

    def flaky(self, **kw):
        calls["n"] += 1
        if calls["n"] in (2, 4):
            raise FloatingPointError("simulated failure")
        return real_fit(self, **kw)

    monkeypatch.setattr(mlsml.MELSM, "fit", flaky)
    with pytest.warns(ConvergenceWarning, match="2 of 5 bootstrap replicate fits"):
        boot = bootstrap(ri_fit, 5, seed=1, n_jobs=1, progress=False)
    assert boot.n_converged == 3
    assert sorted(boot.errors) == [1, 3] and "simulated failure" in boot.errors[1]
    assert boot.replicates.iloc[[1, 3]].isna().all().all()
    assert boot.used.shape[0] == 3 and np.isfinite(boot.bse).all()


def test_progress_counter_without_tqdm(ri_fit, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails -> plain counter
    seen = []
    bootstrap(ri_fit, 3, seed=1, n_jobs=1, progress=True, callback=lambda d, n: seen.append((d, n)))
    assert "3/3 fits" in capsys.readouterr().err
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_bad_arguments(ri_fit):
    with pytest.raises(ModelSpecError, match="n must be a positive integer"):
        ri_fit.bootstrap(0)
    with pytest.raises(ModelSpecError, match="n_jobs"):
        ri_fit.bootstrap(2, n_jobs=0)
    with pytest.raises(ModelSpecError, match="n_reps"):
        ri_fit.simulate(1.5)


def test_boundary_estimates_start_refits_from_default(ri_fit):
    # a fit with var(u0) = 0 has no Cholesky factor: the refits must not all fail
    import dataclasses

    params = ri_fit.params.copy()
    params["var(u0)"] = 0.0
    boundary = dataclasses.replace(ri_fit, params=params)
    boot = bootstrap(boundary, 3, seed=4, n_jobs=1, progress=False)
    assert boot.n_converged == 3 and not boot.errors


def test_bootstrap_correlations_match_replicate_covariances():
    # a clear random scale (var(v) = 0.3): refits far from the boundary are fast
    df = mlsml.simulate.simulate_data([15] * 30, cov=((0.05, 0.02), (0.02, 0.3)), seed=1)
    res = mlsml.fit("y ~ x", df, groups="school")
    assert not res.singular
    boot = res.bootstrap(8, seed=3, n_jobs=1, progress=False)
    table = boot.re_correlations(0.2)
    assert table.index.tolist() == ["corr(u0,v)"]
    assert table.loc["corr(u0,v)", "estimate"] == pytest.approx(res.re_correlations().loc["corr(u0,v)", "estimate"])
    reps = boot.used
    r = reps["cov(u0,v)"] / np.sqrt(reps["var(u0)"] * reps["var(v)"])
    assert table.loc["corr(u0,v)", "boot se"] == pytest.approx(r.std(ddof=1))
    assert table.loc["corr(u0,v)", "0.1"] == pytest.approx(r.quantile(0.1))
    # no covariances, no correlations
    ri = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    assert ri.bootstrap(2, seed=3, n_jobs=1, progress=False).re_correlations().empty


def test_a_product_rule_fit_is_bootstrapped_with_the_product_rule():
    """A regression test: the refits got the fit's nagq but not its rule, so a
    quadrature="product" fit was bootstrapped with the u-exact rule."""
    df = mlsml.simulate.demo_data(n_groups=30, seed=2)
    res = mlsml.fit("y ~ x", df, groups="school", quadrature="product", nagq=7)
    assert res.quadrature == "product"
    boot = res.bootstrap(1, seed=5, n_jobs=1, progress=False)
    design = res.model.design
    ys = draw_responses(design, np.asarray(res.theta), np.random.default_rng(5), 1)
    refit = mlsml.MELSM(design.with_response(ys[0]), None).fit(quadrature="product", nagq=7, start_params=res.params)
    assert refit.quadrature == "product"
    assert boot.llf[0] == pytest.approx(refit.llf, abs=1e-9)
