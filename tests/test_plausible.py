"""Plausible values (mlsml.plausible): Rubin's rules by hand, identical values change nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.plausible import pool


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    df = mlsml.simulate.demo_data(n_groups=12, seed=3)
    df = df.groupby("school").head(10).reset_index(drop=True)
    rng = np.random.default_rng(4)
    for m in range(1, 4):
        df[f"pv{m}"] = df["y"] + rng.normal(0, 0.3, len(df))
    df["pv same"] = df["y"]
    return df


@pytest.fixture(scope="module")
def pooled(data):
    return mlsml.fit_pv("score ~ x", data, pv=["pv1", "pv2", "pv3"], groups="school", random_scale=False)


def test_rubins_rules_by_hand(pooled):
    P = np.stack([f.params.to_numpy() for f in pooled.fits])
    U = np.mean([np.diag(f.cov_params().to_numpy()) for f in pooled.fits], axis=0)
    B = P.var(axis=0, ddof=1)
    T = U + (1 + 1 / 3) * B
    np.testing.assert_allclose(pooled.params, P.mean(axis=0))
    np.testing.assert_allclose(pooled.bse, np.sqrt(T))
    frame = pooled.summary_frame()
    np.testing.assert_allclose(frame["se between"], np.sqrt((1 + 1 / 3) * B))
    np.testing.assert_allclose(frame["fmi"], (1 + 1 / 3) * B / T)
    np.testing.assert_allclose(frame["df"], 2 / ((1 + 1 / 3) * B / T) ** 2)
    re = pooled.random_effects()
    means = np.stack([f.random_effects()["u0"] for f in pooled.fits])
    np.testing.assert_allclose(re["u0"], means.mean(axis=0))
    assert (re["u0_sd"] > re["u0_sd_between"]).all()


def test_identical_plausible_values_are_one_fit(data):
    one = mlsml.fit("y ~ x", data, groups="school", random_scale=False)
    same = pool([one, one])
    np.testing.assert_array_equal(same.params, one.params)
    np.testing.assert_allclose(same.bse, one.bse)
    assert (same.summary_frame()["se between"] == 0).all()


def test_pv_arguments_are_checked(data):
    with pytest.raises(mlsml.ModelSpecError, match="at least two"):
        mlsml.fit_pv("y ~ x", data, pv="pv1", groups="school")
    with pytest.raises(mlsml.ModelSpecError, match=r"\['pv9'\] are not columns"):
        mlsml.fit_pv("y ~ x", data, pv=["pv1", "pv9"], groups="school")
    res = mlsml.fit_pv("y ~ x", data, pv=["pv1", "pv same"], groups="school", random_scale=False)  # a name patsy must quote
    assert res.pv == ("pv1", "pv same")
