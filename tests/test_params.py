"""The parameter layout (mlsml.params): names, their order, and the two scales.

The layouts are drawn by hypothesis over every combination the module documents
(random slopes in the mean, plain random scale, variance slopes ``v0, v1, ...``,
a log-linear between-school variance ``bsvar:``). Tolerances come from the
conditioning of the values drawn (bounded entries), not from trying.
"""

from __future__ import annotations

import autograd
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsml.params import ParamLayout, chol_from_vector, vector_from_chol, wald_intervals

# entries of theta stay in [-BOUND, BOUND]: Sigma's condition number is then at most
# about exp(8 * BOUND) * d^2, so a round trip loses at most ~1e-9 relative accuracy
BOUND = 1.5
TERMS = ("Intercept", "x", "z[T.b]")


@st.composite
def layouts(draw) -> ParamLayout:
    p = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    q = draw(st.integers(0, 3))
    random_scale = draw(st.booleans())
    n_scale_re = draw(st.integers(0, 2)) if random_scale else 0
    n_bs = draw(st.integers(0, 2)) if q >= 1 else 0
    if q == 0 and not random_scale:
        random_scale = True  # a model has at least one school effect
    return ParamLayout(
        mean_terms=TERMS[:p],
        scale_terms=TERMS[:k],
        n_re_mean=q,
        random_scale=random_scale,
        scale_re_terms=("Intercept", "x")[:n_scale_re] if n_scale_re else (),
        bs_terms=("Intercept", "s")[:n_bs] if n_bs else (),
    )


@st.composite
def layouts_and_thetas(draw):
    lay = draw(layouts())
    theta = draw(st.lists(st.floats(-BOUND, BOUND, allow_nan=False), min_size=lay.n_params, max_size=lay.n_params).map(np.array))
    return lay, theta


def _sigma(lay: ParamLayout, theta: np.ndarray) -> np.ndarray:
    """Sigma (Sigma0 with bs_terms) built from theta as the module docstring describes it."""
    vec = theta[lay.p + lay.k + lay.m :]
    if lay.bs_terms:
        vec = np.concatenate([[0.0], vec])
    L = np.zeros((lay.d, lay.d))
    pos = 0
    for i in range(lay.d):
        for j in range(i + 1):
            L[i, j] = np.exp(vec[pos]) if i == j else vec[pos]
            pos += 1
    assert pos == len(vec)
    return L @ L.T


# ----------------------------------------------------------------- names and order
def test_documented_example_names_and_values():
    lay = ParamLayout(("Intercept", "x"), ("Intercept", "x"), n_re_mean=1, random_scale=True)
    assert lay.names == ("mean:Intercept", "mean:x", "scale:Intercept", "scale:x", "var(u0)", "var(v)", "cov(u0,v)")
    sigma = np.array([[0.05, 0.01], [0.01, 0.04]])
    theta = lay.theta_from_parts([0.0, 0.7], [-0.8, 0.05], sigma)
    np.testing.assert_allclose(lay.to_natural(theta), [0.0, 0.7, -0.8, 0.05, 0.05, 0.04, 0.01], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(n_re_mean=1, random_scale=False), ("var(u0)",)),
        (dict(n_re_mean=0, random_scale=True), ("var(v)",)),
        (
            dict(n_re_mean=2, random_scale=True),
            ("var(u0)", "var(u1)", "var(v)", "cov(u0,u1)", "cov(u0,v)", "cov(u1,v)"),
        ),
        (
            dict(n_re_mean=1, random_scale=True, scale_re_terms=("Intercept", "x")),
            ("var(u0)", "var(v0)", "var(v1)", "cov(u0,v0)", "cov(u0,v1)", "cov(v0,v1)"),
        ),
        (
            dict(n_re_mean=1, random_scale=True, bs_terms=("Intercept", "s")),
            ("bsvar:Intercept", "bsvar:s", "var(v)", "cov(u0,v)"),
        ),
        (dict(n_re_mean=1, random_scale=False, bs_terms=("Intercept",)), ("bsvar:Intercept",)),
    ],
    ids=["intercept", "scale only", "slope + scale", "variance slopes", "bs", "bs alone"],
)
def test_covariance_names_follow_the_contract(kwargs, names):
    lay = ParamLayout(("Intercept",), ("Intercept", "x"), **kwargs)
    assert lay.cov_names == names
    assert lay.names == ("mean:Intercept", "scale:Intercept", "scale:x") + names
    assert lay.n_cov == len(names) and lay.n_params == 3 + len(names)


@settings(max_examples=60)
@given(layouts())
def test_names_are_unique_and_in_contract_order(lay):
    names = lay.names
    assert len(names) == len(set(names)) == lay.n_params
    re = [f"u{i}" for i in range(lay.q)]
    re += [f"v{i}" for i in range(len(lay.scale_re_terms))] if lay.scale_re_terms else (["v"] if lay.random_scale else [])
    assert list(lay.re_names) == re and lay.d == len(re)
    variances = [f"var({e})" for e in re]
    if lay.bs_terms:
        variances = [f"bsvar:{t}" for t in lay.bs_terms] + variances[1:]
    expected = (
        [f"mean:{t}" for t in lay.mean_terms]
        + [f"scale:{t}" for t in lay.scale_terms]
        + variances
        + [f"cov({re[i]},{re[j]})" for i in range(len(re)) for j in range(i + 1, len(re))]
    )
    assert list(names) == expected
    assert lay.extended == bool(lay.scale_re_terms or lay.bs_terms)


# ----------------------------------------------------------------- the two scales
@settings(max_examples=80)
@given(layouts_and_thetas())
def test_to_natural_puts_each_value_under_its_name(case):
    """var(e)/cov(e,f) are the entries of Sigma = L L' with L read row by row, log diagonal."""
    lay, theta = case
    nat = dict(zip(lay.names, np.asarray(lay.to_natural(theta))))
    assert len(nat) == lay.n_params
    sigma = _sigma(lay, theta)
    for i, t in enumerate(lay.mean_terms):
        assert nat[f"mean:{t}"] == theta[i]
    for i, t in enumerate(lay.scale_terms):
        assert nat[f"scale:{t}"] == theta[lay.p + i]
    for i, t in enumerate(lay.bs_terms):
        assert nat[f"bsvar:{t}"] == theta[lay.p + lay.k + i]
    re = lay.re_names
    scale = np.abs(sigma).max()
    for i in range(lay.d):
        if not (lay.bs_terms and i == 0):
            assert nat[f"var({re[i]})"] == pytest.approx(sigma[i, i], rel=1e-12, abs=1e-15 * scale)
        for j in range(i + 1, lay.d):
            assert nat[f"cov({re[i]},{re[j]})"] == pytest.approx(sigma[i, j], rel=1e-12, abs=1e-15 * scale)
    np.testing.assert_allclose(lay.sigma_from_natural(np.asarray(lay.to_natural(theta))), sigma, rtol=1e-12, atol=1e-15 * scale)


@settings(max_examples=80)
@given(layouts_and_thetas())
def test_theta_natural_theta_round_trip(case):
    lay, theta = case
    nat = np.asarray(lay.to_natural(theta))
    beta, alpha = nat[: lay.p], nat[lay.p : lay.p + lay.k]
    tau = nat[lay.p + lay.k : lay.p + lay.k + lay.m] if lay.bs_terms else None
    back = lay.theta_from_parts(beta, alpha, lay.sigma_from_natural(nat), tau=tau)
    assert back.shape == theta.shape
    np.testing.assert_allclose(back, theta, rtol=0, atol=1e-7)
    # and the natural scale back again
    np.testing.assert_allclose(np.asarray(lay.to_natural(back)), nat, rtol=1e-9, atol=1e-12)


@settings(max_examples=40)
@given(layouts_and_thetas())
def test_split_inverts_theta_from_parts(case):
    lay, theta = case
    beta, alpha, L = lay.split(theta)
    assert beta.shape == (lay.p,) and alpha.shape == (lay.k,) and L.shape == (lay.d, lay.d)
    assert np.all(np.triu(L, 1) == 0) and np.all(np.diag(L) > 0)
    if lay.bs_terms:
        assert L[0, 0] == 1.0  # L0[0, 0] is not a parameter
        _, _, tau, L0 = lay.split_bs(theta)
        np.testing.assert_array_equal(L0, L)
        np.testing.assert_array_equal(tau, theta[lay.p + lay.k : lay.p + lay.k + lay.m])
    np.testing.assert_allclose(lay.theta_from_parts(beta, alpha, L @ L.T, tau=None if not lay.bs_terms else tau), theta, atol=1e-7)


def test_theta_from_parts_rescales_sigma0_with_bs_terms():
    """With bs_terms only the correlations of u0 matter: Sigma0 is rescaled to Sigma0[0, 0] = 1."""
    lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True, bs_terms=("Intercept",))
    sigma0 = np.array([[1.0, 0.3], [0.3, 0.5]])
    a = lay.theta_from_parts([0.0], [0.0], sigma0, tau=[0.2])
    D = np.diag([2.0, 1.0])
    b = lay.theta_from_parts([0.0], [0.0], D @ sigma0 @ D, tau=[0.2])  # var(u0) = 4, same correlations
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert lay.names == ("mean:Intercept", "scale:Intercept", "bsvar:Intercept", "var(v)", "cov(u0,v)")
    np.testing.assert_allclose(lay.to_natural(a), [0.0, 0.0, 0.2, 0.5, 0.3], atol=1e-12)


# ----------------------------------------------------------------- Sigma is a covariance matrix
@settings(max_examples=60)
@given(layouts(), st.data())
def test_every_theta_gives_a_positive_semidefinite_sigma(lay, data):
    """Any real theta, far outside the comfortable range too, is a valid model."""
    theta = np.array(data.draw(st.lists(st.floats(-30, 30, allow_nan=False), min_size=lay.n_params, max_size=lay.n_params)))
    sigma = lay.sigma_from_natural(np.asarray(lay.to_natural(theta)))
    assert np.all(np.isfinite(sigma))
    np.testing.assert_array_equal(sigma, sigma.T)
    eig = np.linalg.eigvalsh(sigma)
    assert eig.min() >= -1e-12 * max(np.abs(sigma).max(), 1.0)
    assert np.all(np.diag(sigma) >= 0)


def test_boundary_values():
    lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
    # a variance at the boundary: a very negative log diagonal gives var = 0 (exp underflows), never NaN
    nat = np.asarray(lay.to_natural(np.array([0.0, 0.0, -800.0, 0.3, -800.0])))
    np.testing.assert_array_equal(nat[2:], [0.0, 0.09, 0.0])
    # a perfectly correlated pair: var(v) = cov(u0,v)^2 / var(u0)
    nat = np.asarray(lay.to_natural(np.array([0.0, 0.0, 0.0, 0.5, -800.0])))
    np.testing.assert_allclose(nat[2:], [1.0, 0.25, 0.5])
    # theta_from_parts needs a positive-definite Sigma (a singular one has no log-Cholesky point)
    with pytest.raises(np.linalg.LinAlgError):
        lay.theta_from_parts([0.0], [0.0], [[1.0, 1.0], [1.0, 1.0 - 1e-17]])
    # vector_from_chol of a zero diagonal is -inf, and chol_from_vector maps it back to 0
    with np.errstate(divide="ignore"):
        vec = vector_from_chol(np.array([[1.0, 0.0], [0.5, 0.0]]))
    np.testing.assert_array_equal(vec, [0.0, 0.5, -np.inf])
    np.testing.assert_array_equal(chol_from_vector(vec, 2), [[1.0, 0.0], [0.5, 0.0]])


def test_chol_vector_round_trip_and_row_order():
    L = np.array([[2.0, 0.0, 0.0], [-0.5, 0.3, 0.0], [1.5, 0.25, 4.0]])
    vec = vector_from_chol(L)
    np.testing.assert_allclose(vec, [np.log(2.0), -0.5, np.log(0.3), 1.5, 0.25, np.log(4.0)], rtol=1e-15)
    np.testing.assert_allclose(chol_from_vector(vec, 3), L, rtol=1e-15)
    assert chol_from_vector(np.zeros(0), 0).shape == (0, 0)


@given(
    d=st.integers(1, 4),
    data=st.data(),
)
def test_chol_from_vector_plain_arrays_take_the_traced_paths_values(d, data):
    """The NumPy path for plain arrays gives the values autograd's traced path gives, bit for bit
    (NaN above the diagonal of a row whose first entry is not finite, as ``0 * inf``)."""
    entry = st.one_of(st.floats(-50, 50), st.sampled_from([np.inf, -np.inf, np.nan]))
    vec = np.array(data.draw(st.lists(entry, min_size=d * (d + 1) // 2, max_size=d * (d + 1) // 2)))
    with np.errstate(all="ignore"):
        plain = chol_from_vector(vec, d)
        _, traced = autograd.make_vjp(lambda x: chol_from_vector(x, d))(vec)
    assert isinstance(plain, np.ndarray) and plain.shape == (d, d)
    np.testing.assert_array_equal(plain, np.asarray(traced))


# ----------------------------------------------------------------- derivatives
@settings(max_examples=30)
@given(layouts_and_thetas())
def test_jacobian_of_to_natural_matches_finite_differences(case):
    """autograd's Jacobian (what the delta-method SEs use) against central differences.

    Entries of theta are in [-1.5, 1.5], so third derivatives of to_natural are at most
    ~ d * exp(6) and the central-difference error with h = 1e-5 is below ~1e-6.
    """
    lay, theta = case
    jac = autograd.jacobian(lay.to_natural)(theta)
    assert jac.shape == (lay.n_params, lay.n_params)
    h = 1e-5
    fd = np.empty_like(jac)
    for i in range(lay.n_params):
        e = np.zeros(lay.n_params)
        e[i] = h
        fd[:, i] = (np.asarray(lay.to_natural(theta + e)) - np.asarray(lay.to_natural(theta - e))) / (2 * h)
    np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-5)


def test_jacobian_known_entries():
    """d var(u0) / d log L00 = 2 L00^2 and d cov(u0,v) / d L10 = L00: a wrong chain rule fails."""
    lay = ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True)
    theta = np.array([0.1, -0.2, np.log(0.7), 0.4, np.log(0.3)])
    jac = autograd.jacobian(lay.to_natural)(theta)
    np.testing.assert_allclose(jac[2, 2], 2 * 0.7**2, rtol=1e-12)
    np.testing.assert_allclose(jac[4, 3], 0.7, rtol=1e-12)
    np.testing.assert_allclose(jac[3, 4], 2 * 0.3**2, rtol=1e-12)
    np.testing.assert_allclose(jac[3, 3], 2 * 0.4, rtol=1e-12)
    np.testing.assert_array_equal(jac[:2], np.eye(5)[:2])


def test_wald_intervals_variances_on_the_log_scale():
    names = ["mean:x", "var(u0)", "cov(u0,v)", "var(v)", "var(u1)"]
    est = np.array([0.5, 0.01, -0.02, 0.04, 0.0])
    se = np.array([0.1, 0.02, 0.05, 0.01, 0.3])
    lo, hi = wald_intervals(names, est, se, 1.96)
    # coefficients and covariances: symmetric, may be negative
    np.testing.assert_allclose([lo[0], hi[0]], [0.5 - 0.196, 0.5 + 0.196])
    np.testing.assert_allclose([lo[2], hi[2]], [-0.02 - 0.098, -0.02 + 0.098])
    # a variance with SE twice its estimate: the natural-scale interval would reach -0.029
    np.testing.assert_allclose([lo[1], hi[1]], [0.01 * np.exp(-3.92), 0.01 * np.exp(3.92)])
    assert lo[1] > 0 and lo[3] > 0
    np.testing.assert_allclose(np.sqrt(lo[3] * hi[3]), 0.04)  # geometric midpoint = estimate
    # a variance at zero (boundary fit) has no log-scale interval
    assert np.isnan(lo[4]) and np.isnan(hi[4])


@given(
    st.floats(1e-12, 1e12),
    st.floats(1e-12, 1e12),
    st.floats(0.1, 4.0),
)
def test_wald_intervals_contain_a_variance_and_stay_positive(v, s, c):
    lo, hi = wald_intervals(["var(v)"], [v], [s], c)
    assert 0 <= lo[0] <= v <= hi[0]
