"""Weights at both levels and offsets (mlsml.weights): frequency weights are the replicated data
set exactly, sampling weights are scaled as documented, offsets are known terms, bad input is
refused by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.weights import scale_level1

#: Agreement of the log-likelihood (and its derivatives) of a frequency-weighted design with the
#: replicated data set: the same terms summed in another order, so rounding only.
RTOL = 1e-10


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    """12 schools of 6 to 10 students, integer frequency weights at both levels."""
    df = mlsml.simulate.demo_data(n_groups=12, seed=4)
    df = df.groupby("school").head(10).reset_index(drop=True)
    rng = np.random.default_rng(5)
    df["z"] = rng.normal(size=len(df))
    df["s"] = df.groupby("school")["x"].transform("mean")
    df["fw"] = rng.integers(1, 4, size=len(df))
    gw = dict(zip(df["school"].unique(), rng.integers(1, 3, size=df["school"].nunique())))
    df["gw"] = df["school"].map(gw)
    return df


@pytest.fixture(scope="module")
def replicated(small) -> pd.DataFrame:
    """``small`` with every row repeated ``fw`` times and every school ``gw`` times (as new schools)."""
    rows = small.loc[small.index.repeat(small["fw"])]
    parts = []
    for s, g in rows.groupby("school"):
        for k in range(int(g["gw"].iloc[0])):
            parts.append(g.assign(school=f"{s}_{k}"))
    return pd.concat(parts, ignore_index=True)


CLASSES = {
    "core u-exact": dict(scale_formula="~ x"),
    "core product": dict(scale_formula="~ x", quadrature="product"),
    "no random scale": dict(random_scale=False),
    "random slope": dict(re_formula="~ x"),
    "scale_re_formula": dict(scale_re_formula="~ z"),
    "bs_formula": dict(bs_formula="~ s"),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_frequency_weights_are_the_replicated_data(small, replicated, name):
    kw = dict(CLASSES[name])
    quadrature = kw.pop("quadrature", "auto")
    mw = mlsml.MELSM.from_formula("y ~ x", small, groups="school", weights="fw", group_weights="gw", weights_kind="frequency", **kw)
    mr = mlsml.MELSM.from_formula("y ~ x", replicated, groups="school", **kw)
    lw, lr = mw.objective(nagq=7, quadrature=quadrature), mr.objective(nagq=7, quadrature=quadrature)
    rng = np.random.default_rng(1)
    theta = mlsml.start.start_values(lw.integrand) + rng.normal(0, 0.2, mw.layout.n_params)
    vw, gw = lw.value_and_grad(theta)
    vr, gr = lr.value_and_grad(theta)
    assert abs(vw - vr) <= RTOL * abs(vr)
    np.testing.assert_allclose(gw, gr, rtol=0, atol=RTOL * np.abs(gr).max())
    Hw, Hr = lw.hessian(theta), lr.hessian(theta)
    np.testing.assert_allclose(Hw, Hr, rtol=0, atol=RTOL * np.abs(Hr).max())
    assert mw.design.nobs_weighted == mr.design.nobs


def test_frequency_weighted_fit_equals_the_replicated_fit(small, replicated):
    a = mlsml.fit("y ~ x", small, groups="school", scale_formula="~ x", weights="fw", group_weights="gw", weights_kind="frequency")
    b = mlsml.fit("y ~ x", replicated, groups="school", scale_formula="~ x")
    assert a.cov_type == b.cov_type == "nonrobust"
    assert abs(a.llf - b.llf) < 1e-8 * abs(b.llf)
    np.testing.assert_allclose(a.params, b.params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-5)
    assert (a.nobs, a.ngroups) == (b.nobs, b.ngroups) == (len(replicated), replicated["school"].nunique())
    assert abs(a.bic - b.bic) < 1e-6 * abs(b.bic)
    # the cluster sandwich counts a school of weight W as W clusters: the replicated data's
    ra = mlsml.fit(
        "y ~ x",
        small,
        groups="school",
        scale_formula="~ x",
        weights="fw",
        group_weights="gw",
        weights_kind="frequency",
        cov_type="robust",
        start_params=a.params,
    )
    rb = mlsml.fit("y ~ x", replicated, groups="school", scale_formula="~ x", cov_type="robust", start_params=b.params)
    np.testing.assert_allclose(ra.bse, rb.bse, rtol=1e-5)


#: Optimiser tolerances under which a fit must land on the maximum to 1e-8 (the final Newton step
#: of :func:`mlsml.optimize._newton_polish` honours ``xtol``).
TIGHT = {"xtol": 1e-10, "gtol": 1e-12}


@pytest.mark.parametrize("name", ["core product", "bs_formula"])
def test_frequency_weighted_estimates_equal_the_replicated_ones_to_1e8(small, replicated, name):
    # The two fits take different paths to the same maximum (the same terms summed in another
    # order); before the final Newton step honoured xtol they stopped up to 6e-8 apart.
    kw = dict(CLASSES[name])
    a = mlsml.fit("y ~ x", small, groups="school", weights="fw", group_weights="gw", weights_kind="frequency", **kw, **TIGHT)
    b = mlsml.fit("y ~ x", replicated, groups="school", **kw, **TIGHT)
    assert a.converged and b.converged
    np.testing.assert_allclose(a.params, b.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-7)


def test_unit_sampling_weights_change_nothing_and_school_weights_scale_the_llf(small):
    plain = mlsml.MELSM.from_formula("y ~ x", small, groups="school", scale_formula="~ x")
    ones = mlsml.MELSM.from_formula("y ~ x", small, groups="school", scale_formula="~ x", weights=np.ones(len(small)))
    three = mlsml.MELSM.from_formula(
        "y ~ x", small, groups="school", scale_formula="~ x", group_weights={s: 3.0 for s in small["school"].unique()}
    )
    theta = mlsml.start.start_values(plain.objective().integrand)
    v = plain.objective().value(theta)
    assert ones.objective().value(theta) == v
    assert abs(three.objective().value(theta) - 3.0 * v) < 1e-12 * abs(v)


def test_level1_scaling():
    w = np.array([1.0, 3.0, 2.0, 2.0, 4.0])
    st, ct = np.array([0, 2]), np.array([2, 3])
    size = scale_level1(w, st, ct, "size")
    eff = scale_level1(w, st, ct, "effective")
    np.testing.assert_allclose(np.add.reduceat(size, st), ct)  # sum to the school sizes
    # sum to the effective sizes (sum w)^2 / sum w^2
    np.testing.assert_allclose(np.add.reduceat(eff, st), [16 / 10, 64 / 24])
    np.testing.assert_array_equal(scale_level1(w, st, ct, "none"), w)


def test_sampling_weights_default_to_size_scaling_and_robust_ses(small):
    model = mlsml.MELSM.from_formula("y ~ x", small, groups="school", weights="fw", group_weights="gw")
    d = model.design
    np.testing.assert_allclose(np.add.reduceat(d.weights, d.starts), d.counts)
    assert d.info["weights"] == {"kind": "sampling", "level1": "column 'fw'", "scale": "size", "level2": "column 'gw'"}
    assert mlsml.robust.check_cov_type(None, d) == "robust"


def test_offsets_are_known_terms(small):
    rng = np.random.default_rng(2)
    df = small.assign(o=rng.normal(size=len(small)), so=0.3 * rng.normal(size=len(small)))
    with_offsets = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", offset="o", scale_offset="so")
    moved = mlsml.MELSM.from_formula(
        "y2 ~ x", df.assign(y2=df["y"] - df["o"]), groups="school", scale_formula="~ x", scale_offset="so"
    )
    theta = mlsml.start.start_values(moved.objective().integrand)
    assert with_offsets.objective().value(theta) == moved.objective().value(theta)
    # a constant scale offset is the scale intercept moved
    c = 0.7
    shifted = mlsml.MELSM.from_formula("y ~ x", df.assign(c=c), groups="school", scale_formula="~ x", scale_offset="c")
    plain = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x")
    theta2 = theta.copy()
    theta2[plain.layout.p] += c
    assert abs(shifted.objective().value(theta) - plain.objective().value(theta2)) < 1e-10 * abs(plain.objective().value(theta2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights="nope"), "not a column"),
        (dict(weights=[1.0, 2.0]), "one value per row"),
        (dict(weights="neg"), r"must not be negative: 1 row\(s\), first -1.0 at index 3"),
        (dict(weights="nan"), "missing or infinite in 1 row"),
        (dict(weights="zero_school"), "zero for every observation of school 1 "),
        (dict(group_weights="fw"), "must be constant within each school: school 1 has"),
        (dict(group_weights={1: 1.0}), r"no weight for school 2 \(11 school"),
        (dict(group_weights="zeros"), "zero for every one of the 12 schools"),
        (dict(weights="fw", weights_kind="frequency", weights_scale="size"), "are not scaled"),
        (dict(weights="fw", weights_kind="survey"), "weights_kind must be one of"),
        (dict(offset="nan"), r"offset \(column 'nan'\) must be finite"),
    ],
)
def test_bad_weights_are_refused_by_name(small, kwargs, match):
    df = small.assign(neg=1.0, nan=1.0, zero_school=1.0, zeros=0.0)
    df.loc[3, "neg"] = -1.0
    df.loc[5, "nan"] = np.nan
    df.loc[df["school"] == df["school"].iloc[0], "zero_school"] = 0.0
    with pytest.raises((mlsml.DataError, mlsml.ModelSpecError), match=match):
        mlsml.MELSM.from_formula("y ~ x", df, groups="school", **kwargs)


def test_weights_and_cov_type_survive_export(small):
    res = mlsml.fit("y ~ x", small, groups="school", random_scale=False, weights="fw", group_weights="gw")
    back = mlsml.load(res.to_json())
    assert back.cov_type == res.cov_type == "robust"
    assert back.bse.equals(res.bse)
    np.testing.assert_array_equal(back.cov_theta(), res.cov_theta())
    assert back.model.design.info["weights"]["kind"] == "sampling"
