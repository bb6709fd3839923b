"""Estimates for standardised covariates (mlsml.standardized, MixWILD's NCENT = 1): the same as a
fit to standardised data, for the core model, a random slope and a between-school variance model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.standardized import column_map


@pytest.fixture(scope="module")
def data():
    df = mlsml.simulate.demo_data(n_groups=30, seed=5).iloc[::3].reset_index(drop=True)
    slope = np.random.default_rng(5).normal(0, 0.3, df["school"].max() + 1)
    df["y"] = df["y"] + slope[df["school"]] * df["x"]  # a random slope with a clear variance
    df["x"] = 50.0 + 7.0 * df["x"]  # off-centre and badly scaled, as real covariates are
    df["s"] = df.groupby("school")["x"].transform("mean")
    return df


def _standardised(df, cols):
    out = df.copy()
    for c in cols:
        out[c] = (df[c] - df[c].mean()) / df[c].std(ddof=1)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(scale_formula="~ x"),
        dict(re_formula="~ x", random_scale=False),
        dict(bs_formula="~ s"),
        dict(scale_formula="~ x", association="none"),
        dict(scale_formula="~ x", association="quadratic"),
    ],
    ids=["core", "random slope", "bs_formula", "association none", "association quadratic"],
)
def test_equals_a_fit_to_standardised_data(data, kw):
    res = mlsml.fit("y ~ x", data, groups="school", **kw)
    std = res.standardized_params()
    ref = mlsml.fit("y ~ x", _standardised(data, ["x", "s"]), groups="school", **kw)
    np.testing.assert_allclose(std["estimate"], ref.params, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(std["std err"], ref.bse, rtol=2e-4, atol=1e-7)
    assert abs(std.attrs["sd"]["mean:x"] - data["x"].std(ddof=1)) < 1e-12


def test_column_map_weights_school_rows_by_their_size():
    S = np.array([[1.0, 0.0], [1.0, 1.0]])
    P, mean, sd = column_map(S, weights=np.array([3, 1]))
    rows = np.repeat(S[:, 1], [3, 1])
    assert mean[1] == rows.mean() and np.isclose(sd[1], rows.std(ddof=1))
    assert np.allclose((S @ P)[:, 0], 1.0)  # the intercept column is kept
    scaled_only, _, _ = column_map(np.array([[2.0], [4.0]]))  # no intercept: scaled, not centred
    assert np.allclose(np.array([[2.0], [4.0]]) @ scaled_only, np.array([[2.0], [4.0]]) / np.sqrt(2.0))
    assert isinstance(pd.Series(mean), pd.Series)


def test_constrained_random_slopes_have_no_standardised_counterpart(data):
    res = mlsml.fit("y ~ x", data, groups="school", re_formula="~ x", random_scale=False, cov_constraints=["cov(u0,u1)"])
    with pytest.raises(mlsml.ModelSpecError, match="no standardised counterpart"):
        res.standardized_params()
