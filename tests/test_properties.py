"""Property-based tests (hypothesis): invariances and equivariances of the fit,
quadrature accuracy and exactness of the autograd gradient.

Data sets are small (<= 12 schools of <= 12 students) and the number of
examples is fixed and derandomised so that the file is fast and reproducible.
Tolerances for refits are in units of the standard errors: the optimiser
stops when the Newton decrement is below 1e-6, i.e. within about 1e-3
standard errors of the maximum.
"""

from __future__ import annotations

import warnings

import autograd
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mlsml
from mlsml.likelihood import loglik_at_nodes
from mlsml.posterior import adapt
from mlsml.posterior import loglik as adapted_loglik
from mlsml.quadrature import gauss_hermite_rule

# no shrinking: each example costs a few fits, and a failure is reported as drawn
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def datasets(draw, min_groups=6, max_groups=12, max_n=12, max_var_v=0.5):
    J = draw(st.integers(min_groups, max_groups))
    sizes = draw(st.lists(st.integers(2, max_n), min_size=J, max_size=J))
    var_v = draw(st.sampled_from([0.05, 0.2, max_var_v]))
    seed = draw(st.integers(0, 2**31 - 1))
    return mlsml.simulate.simulate_data(sizes, cov=((0.1, 0.0), (0.0, var_v)), seed=seed)


def _fit(df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlsml.SingularFitWarning)
        return mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", **kw)


def _close(a, b_params) -> np.ndarray:
    """Estimates within 2e-3 standard errors; without SEs (a singular fit, where the
    likelihood is flat in some direction) within 1e-3 relative."""
    return np.abs(a.params.to_numpy() - b_params) <= _tol(a)


def _tol(a) -> np.ndarray:
    se = a.bse.to_numpy()
    p = np.abs(a.params.to_numpy())
    if not np.all(np.isfinite(se)):
        assert a.singular  # NaN standard errors only ever come with the singular flag
    return np.where(np.isfinite(se), 2e-3 * se, 1e-3 * (1 + p)) + 1e-7


@settings(max_examples=6, **SETTINGS)
@given(df=datasets(), perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_rows_and_relabelling_schools_changes_nothing(df, perm_seed):
    base = _fit(df)
    rng = np.random.default_rng(perm_seed)
    other = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    codes = rng.permutation(1000)[: df.school.nunique()]
    other["school"] = other["school"].map(dict(zip(sorted(df.school.unique()), (f"S{c}" for c in codes))))
    res = _fit(other)
    assert res.llf == pytest.approx(base.llf, abs=1e-6)
    assert _close(base, res.params.to_numpy()).all()
    assert res.converged == base.converged


@settings(max_examples=6, **SETTINGS)
@given(df=datasets(), c=st.floats(-1e3, 1e3, allow_nan=False))
def test_location_equivariance(df, c):
    base = _fit(df)
    res = _fit(df.assign(y=df.y + c))
    expected = base.params.to_numpy().copy()
    expected[0] += c
    assert res.llf == pytest.approx(base.llf, abs=1e-6)
    tol = _tol(base)
    tol[0] += 1e-12 * abs(c)  # the shift itself costs mean:Intercept a few digits
    assert np.all(np.abs(res.params.to_numpy() - expected) <= tol)


@settings(max_examples=6, **SETTINGS)
@given(df=datasets(), log10c=st.floats(-4, 4))
def test_scale_equivariance(df, log10c):
    c = 10.0**log10c
    base = _fit(df)
    res = _fit(df.assign(y=df.y * c))
    lay = base.layout
    expected = base.params.to_numpy().copy()
    expected[: lay.p] *= c
    expected[lay.p] += 2 * np.log(c)  # scale:Intercept
    names = list(base.params.index)
    expected[names.index("var(u0)")] *= c**2
    expected[names.index("cov(u0,v)")] *= c
    units = np.ones_like(expected)
    units[: lay.p] = c
    units[names.index("var(u0)")] = c**2
    units[names.index("cov(u0,v)")] = c
    tol = _tol(base) * units
    assert np.all(np.abs(res.params.to_numpy() - expected) <= tol)
    assert res.llf == pytest.approx(base.llf - res.nobs * np.log(c), abs=1e-6)


@settings(max_examples=10, **SETTINGS)
@given(df=datasets(min_groups=3, max_n=30, max_var_v=0.5))
def test_more_quadrature_points_move_llf_within_documented_error(df):
    """docs/quadrature.md ("Accuracy in small clusters"): with var(v) <= 0.5 and any
    cluster size, the default 11-point rule is within 1.1e-4 per school of the
    41-point rule and the 21-point rule within 7e-6 per school."""
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x")
    params = np.array([0.0, 0.7, -0.8, 0.05, 0.1, 0.5, 0.02])  # var(v) = 0.5: the documented worst case
    ll = {k: model.loglike(params, nagq=k) for k in (11, 21, 41)}
    J = model.design.ngroups
    assert abs(ll[11] - ll[41]) <= 1.1e-4 * J
    assert abs(ll[21] - ll[41]) <= 7e-6 * J


@settings(max_examples=8, **SETTINGS)
@given(
    df=datasets(min_groups=4, max_groups=8, max_n=8),
    theta_noise=st.lists(st.floats(-0.5, 0.5), min_size=7, max_size=7),
    random_scale=st.booleans(),
)
def test_autograd_gradient_equals_finite_differences(df, theta_noise, random_scale):
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_formula="~ x", random_scale=random_scale)
    design = model.design
    n = design.layout.n_params
    theta = np.array([0.0, 0.7, -0.8, 0.05, np.log(0.3), 0.1, np.log(0.4)])[:n] + np.array(theta_noise[:n])
    rule = gauss_hermite_rule(design.layout.d, 11)
    nodes = adapt(theta, design, rule)
    g = autograd.grad(loglik_at_nodes)(theta, design, nodes)
    h = 1e-5
    fd_fixed = np.empty(n)
    fd_adapted = np.empty(n)
    for i in range(n):
        e = np.zeros(n)
        e[i] = h
        fd_fixed[i] = (loglik_at_nodes(theta + e, design, nodes) - loglik_at_nodes(theta - e, design, nodes)) / (2 * h)
        fd_adapted[i] = (adapted_loglik(theta + e, design, 11) - adapted_loglik(theta - e, design, 11)) / (2 * h)
    # exact derivative of the function with the nodes held fixed
    np.testing.assert_allclose(g, fd_fixed, rtol=1e-5, atol=1e-5)
    # and of the adapted likelihood itself, up to the derivative of the quadrature error
    np.testing.assert_allclose(g, fd_adapted, rtol=1e-4, atol=1e-4 * design.ngroups)
