"""Likelihood-ratio tests between fits: either order, nesting checks, fits read from JSON (issue 10)."""

from __future__ import annotations

import pytest

import mlsml


@pytest.fixture(scope="module")
def fits(exam):
    m1 = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    m2 = mlsml.fit("normexam ~ standLRT", exam, groups="school")
    m_sex = mlsml.fit("normexam ~ standLRT + C(sex)", exam, groups="school", random_scale=False)
    return m1, m2, m_sex


def test_lrtest_accepts_either_order(fits):
    m1, m2, _ = fits
    forward, backward = mlsml.lrtest(m1, m2), mlsml.lrtest(m2, m1)
    assert forward == backward
    assert forward.df == 2 and forward.statistic == pytest.approx(2 * (m2.llf - m1.llf), rel=1e-12)
    assert forward.reference.startswith("0.5 chi2(1) + 0.5 chi2(2)")


def test_lrtest_says_when_neither_model_is_nested(fits):
    _, m2, m_sex = fits
    with pytest.raises(mlsml.ModelSpecError, match=r"neither model is nested.*mean:C\(sex\)\[T\.M\].*var\(v\)"):
        mlsml.lrtest(m_sex, m2)
    with pytest.raises(mlsml.ModelSpecError, match="same parameters"):
        mlsml.lrtest(m2, m2)


def test_lrtest_refuses_fits_to_other_data(exam, fits):
    m1, _, _ = fits
    other = mlsml.fit("normexam ~ standLRT", exam.assign(normexam=exam["normexam"] * 2), groups="school")
    with pytest.raises(mlsml.ModelSpecError, match="different responses"):
        mlsml.lrtest(m1, other)
    with pytest.raises(mlsml.ModelSpecError, match="different responses"):  # also when read from JSON
        mlsml.lrtest(mlsml.load(m1.to_json()), mlsml.load(other.to_json()))


def test_lrtest_between_fits_read_from_json(fits):
    m1, m2, _ = fits
    t = mlsml.lrtest(mlsml.load(m2.to_json()), mlsml.load(m1.to_json()))
    assert t == mlsml.lrtest(m1, m2)
    assert mlsml.lrtest(m1, mlsml.load(m2.to_json())) == t  # one of each
