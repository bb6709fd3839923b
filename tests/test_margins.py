"""Marginal effects (mlsml.margins) against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest

import mlsml


@pytest.fixture(scope="module")
def res():
    df = mlsml.simulate.demo_data(n_groups=15, seed=2)
    df = df.groupby("school").head(15).reset_index(drop=True)
    return mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", random_scale=False), df


def test_sigma_effect_is_the_closed_form(res):
    fit, df = res
    a1 = fit.params["scale:x"]
    me = fit.marginal_effects("x", dpar="sigma")
    # no random scale: sigma_i = exp((a0 + a1 x_i) / 2), d sigma / dx = a1 / 2 sigma_i
    sd = np.exp(0.5 * (fit.params["scale:Intercept"] + a1 * df["x"]))
    assert abs(me["dydx"].iloc[0] - np.mean(0.5 * a1 * sd)) < 1e-7
    # delta method by hand, on the natural scale (theta of this model is natural except var(u0))
    x = df["x"].to_numpy()
    s = np.exp(0.5 * (fit.params["scale:Intercept"] + a1 * x))
    grad = np.zeros(fit.df_model)
    grad[2] = np.mean(0.25 * a1 * s)
    grad[3] = np.mean(0.5 * s + 0.25 * a1 * x * s)
    se = np.sqrt(grad @ fit.cov_params().to_numpy() @ grad)
    assert abs(me["std err"].iloc[0] - se) < 1e-6 * se


def test_mean_effect_is_the_coefficient(res):
    fit, df = res
    me = fit.marginal_effects("x", dpar="mu", at=df.head(4))
    np.testing.assert_allclose(me["dydx"], fit.params["mean:x"], rtol=1e-7)
    np.testing.assert_allclose(me["std err"], fit.bse["mean:x"], rtol=1e-5)


def test_bad_arguments(res):
    fit, _ = res
    with pytest.raises(mlsml.ModelSpecError, match="dpar must be one of"):
        fit.marginal_effects("x", dpar="tau")
    with pytest.raises(mlsml.ModelSpecError, match="not a column"):
        fit.marginal_effects("nope")
