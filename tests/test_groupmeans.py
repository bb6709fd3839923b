"""within(x) and between(x) (mlsml.groupmeans): the same fit as hand-made columns, means on the
estimation data, new data, term names."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.errors import DataError, MissingDataWarning, ModelSpecError
from mlsml.groupmeans import display_name, expand_group_transforms, uses_group_transforms


@pytest.fixture(scope="module")
def data():
    df = mlsml.simulate.demo_data(n_groups=30, seed=4).iloc[::4].reset_index(drop=True)
    df["xb"] = df.groupby("school")["x"].transform("mean")
    df["xw"] = df["x"] - df["xb"]
    return df


@pytest.fixture(scope="module")
def fitted(data):
    return mlsml.fit("y ~ within(x) + between(x)", data, groups="school", scale_formula="~ within(x)")


def test_same_fit_as_hand_made_columns(data, fitted):
    ref = mlsml.fit("y ~ xw + xb", data, groups="school", scale_formula="~ xw")
    assert fitted.params.index.tolist()[:5] == [
        "mean:Intercept",
        "mean:within(x)",
        "mean:between(x)",
        "scale:Intercept",
        "scale:within(x)",
    ]
    assert abs(fitted.llf - ref.llf) < 1e-8
    np.testing.assert_allclose(fitted.params.to_numpy(), ref.params.to_numpy(), rtol=1e-6, atol=1e-8)


def test_in_the_random_effects_and_between_school_variance_formulas(data):
    model = mlsml.MELSM.from_formula("y ~ x", data, groups="school", re_formula="~ within(x)", bs_formula="~ between(x)")
    lay = model.layout
    assert lay.bs_terms == ("Intercept", "between(x)") and model.design.info["re_terms"] == ("Intercept", "within(x)")
    np.testing.assert_allclose(model.design.S[:, 1], data.groupby("school")["x"].mean().to_numpy(), rtol=1e-12)
    # within(x) varies within schools: a level-1 column of the between-school variance (issue 13)
    lev1 = mlsml.MELSM.from_formula("y ~ x", data, groups="school", bs_formula="~ within(x)")
    assert lev1.design.S_level1 is not None and np.all(lev1.design.S[:, 1] == 0)


def test_means_are_those_of_the_estimation_rows(data):
    """A row dropped for a missing response does not count in its school's mean."""
    df = data.copy()
    df.loc[0, "y"] = np.nan
    with pytest.warns(MissingDataWarning):
        model = mlsml.MELSM.from_formula("y ~ between(x)", df, groups="school")
    used = df.iloc[1:]
    expected = used.groupby("school")["x"].transform("mean").to_numpy()
    design = model.design
    np.testing.assert_allclose(design.X[np.argsort(design.order), 1], expected, rtol=1e-12)


def test_new_data_known_school_uses_the_fit_means_new_school_its_own(data, fitted):
    b = fitted.params
    new = data.iloc[:6].copy()
    new["x"] = new["x"] + 5.0  # a known school: its mean is the fit's, whatever the new rows
    fixed = fitted.predict(new, conditional=False)
    xb = data.loc[:5, "xb"].to_numpy()
    expected = b["mean:Intercept"] + b["mean:within(x)"] * (new["x"].to_numpy() - xb) + b["mean:between(x)"] * xb
    np.testing.assert_allclose(fixed.to_numpy(), expected, rtol=1e-12)
    other = new.assign(school=10_000)  # a new school: the mean of its own rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = fitted.predict(other)
    own = other["x"].mean()
    expected = b["mean:Intercept"] + b["mean:within(x)"] * (other["x"] - own) + b["mean:between(x)"] * own
    np.testing.assert_allclose(pred.to_numpy(), expected.to_numpy(), rtol=1e-12)
    with pytest.raises(DataError, match="need the grouping column 'school'"):
        fitted.predict(new.drop(columns="school"), conditional=False)


def test_formula_text():
    assert expand_group_transforms("y ~ within(x) + between(np.log(z)) + within(x, g)", "s") == (
        "y ~ within(x, s) + between(np.log(z), s) + within(x, g)"
    )
    assert expand_group_transforms("~ rewithin(x)", "s") == "~ rewithin(x)"
    assert display_name("within(x, Q('my id'))", "my id") == "within(x)"
    assert uses_group_transforms(None, "~ between(x)") and not uses_group_transforms("~ x")
    with pytest.raises(ModelSpecError, match="nested"):
        expand_group_transforms("~ within(between(x))", "s")
    with pytest.raises(DataError, match="numeric"):
        mlsml.groupmeans.within(np.array(["a", "b"]), np.array([1, 1]))


def test_pickle_keeps_the_means(fitted, data):
    import pickle

    again = pickle.loads(pickle.dumps(fitted))
    new = data.iloc[:4].assign(x=0.0)
    pd.testing.assert_series_equal(again.predict(new), fitted.predict(new))
