"""Gradient and Hessian of the likelihood through the per-school sums (mlsml.derivatives), and the
Jacobian of the natural parameters, against autograd on the same functions."""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import mlsml
from mlsml import derivatives
from mlsml.derivatives import conditional_prior_derivatives
from mlsml.integrand import SchoolSums, conditional_prior
from mlsml.params import ParamLayout, chol_from_vector

#: ``|H - H_autograd| <= RTOL * max |H_autograd|`` (the same for the gradient): the two
#: differ by rounding only (about 1e-14 here); a wrong term is of the order of the whole.
RTOL = 1e-9


def _check(lik, theta):
    nodes = lik.adapt(theta)
    value, grad = lik.value_and_grad(theta, nodes)
    ref_value, ref_grad = autograd.value_and_grad(lik.at_nodes)(theta, nodes)
    assert value == ref_value  # the same arithmetic
    # at the estimates the gradient is ~0, a difference of terms of order 1: an absolute floor
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=RTOL * max(np.abs(ref_grad).max(), 1.0))
    H = lik.hessian(theta, nodes)
    ref = np.asarray(autograd.hessian(lik.at_nodes)(theta, nodes))
    assert H.shape == ref.shape
    np.testing.assert_allclose(H, ref, rtol=0, atol=RTOL * np.abs(ref).max())
    return H, ref


MODELS = {
    "core (Model 3)": dict(scale_formula="~ standLRT"),
    "no random scale": dict(scale_formula="~ 1", random_scale=False),
    "random scale only": dict(scale_formula="~ standLRT", re_formula="~ 0"),
    "random slope": dict(scale_formula="~ standLRT", re_formula="~ standLRT"),
    "bs_formula": dict(scale_formula="~ standLRT", bs_formula="~ schavg"),
    "bs_formula + slope": dict(scale_formula="~ standLRT", re_formula="~ standLRT", bs_formula="~ schavg"),
    # issue 13: covariances fixed at zero (closed form on the free log-Cholesky entries) and quad(u0,v)
    "association none": dict(scale_formula="~ standLRT", association="none"),
    "slope, cov(u0,u1) = 0": dict(scale_formula="~ standLRT", re_formula="~ standLRT", cov_constraints=["cov(u0,u1)"]),
    "slope, association none": dict(scale_formula="~ standLRT", re_formula="~ standLRT", association="none"),
    "association quadratic": dict(scale_formula="~ standLRT", association="quadratic"),
    "quadratic + bs_formula": dict(scale_formula="~ standLRT", bs_formula="~ schavg", association="quadratic"),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["uexact", "product"])
def test_derivatives_equal_autograd(exam, name, kind):
    kw = MODELS[name]
    model = mlsml.MELSM.from_formula("normexam ~ standLRT + schgend", exam, groups="school", **kw)
    lay = model.layout
    if kind == "uexact" and not (lay.random_scale and lay.q >= 1):
        pytest.skip("the u-exact rule needs a random scale and a mean effect")
    lik = model.objective(nagq=5, quadrature="marginal" if kind == "uexact" else "product")
    assert isinstance(lik.integrand, SchoolSums)
    rng = np.random.default_rng(3)
    theta = mlsml.start.start_values(lik.integrand) + rng.normal(0, 0.2, lay.n_params)
    _check(lik, theta)


def test_hessian_at_the_estimates_gives_the_same_standard_errors(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT")
    H, ref = _check(res.likelihood, res.theta)
    se = np.sqrt(np.diag(np.linalg.inv(-H)))
    se_ref = np.sqrt(np.diag(np.linalg.inv(-ref)))
    np.testing.assert_allclose(se, se_ref, rtol=1e-8)


def _inside(res, shift):
    """``theta`` with ``Sigma + shift * diag(Sigma)``: moved off the boundary, still next to it."""
    lay = res.layout
    natural = np.asarray(lay.to_natural(res.theta))
    S = lay.sigma_from_natural(natural)
    S = S + shift * np.diag(np.diag(S))
    ev = np.linalg.eigvalsh(S)
    return lay.theta_from_parts(natural[: lay.p], natural[lay.p : lay.p + lay.k], S), ev[0] / ev[-1]


@pytest.mark.parametrize(
    "kw",
    [
        dict(re_formula="~ x", random_scale=False),  # corr(u0,u1) = -1 (see test_reference), product rule
        dict(scale_formula="~ x", re_formula="~ x"),  # Sigma of rank 2 of 3, u-exact rule
    ],
)
def test_derivatives_next_to_the_boundary(seed_sim, kw):
    """Fits whose estimate is on the boundary: Sigma nearly singular, the prior terms huge.

    At the estimate (smallest eigenvalue ~1e-9 of the largest) the likelihood itself is
    rounding noise amplified by ``P ~ 1e9``, for autograd as for the closed form, and the two
    routes differ by rounding times the condition of Sigma (there the information is singular
    and no standard error is reported). They are compared a little inside, at a smallest
    eigenvalue ~1e-4 of the largest (|corr| ~ 0.9999)."""
    with pytest.warns(mlsml.SingularFitWarning):
        res = mlsml.fit("y ~ x", seed_sim, groups="school", **kw)
    assert res.singular
    theta, ratio = _inside(res, 1e-2)
    assert ratio < 1e-3
    _check(res.likelihood, theta)


@pytest.mark.parametrize(
    "layout",
    [
        dict(n_re_mean=1, random_scale=True),
        dict(n_re_mean=2, random_scale=True),
        dict(n_re_mean=1, random_scale=False),
        dict(n_re_mean=0, random_scale=False),
        dict(n_re_mean=1, random_scale=True, bs_terms=("Intercept", "s")),
        dict(n_re_mean=2, random_scale=True, bs_terms=("Intercept",)),
        dict(n_re_mean=1, random_scale=True, scale_re_terms=("Intercept", "x")),
        dict(n_re_mean=1, random_scale=True, fixed_cov=((0, 1),)),
        dict(n_re_mean=2, random_scale=True, fixed_cov=((0, 1),)),
        dict(n_re_mean=2, random_scale=True, fixed_cov=((0, 2), (1, 2))),
        dict(n_re_mean=1, random_scale=True, quad_assoc=True),
        dict(n_re_mean=1, random_scale=True, bs_terms=("Intercept", "s"), quad_assoc=True, fixed_cov=((0, 1),)),
    ],
)
def test_natural_jacobian_equals_autograd(layout):
    """The delta method's Jacobian of the natural parameters (ParamLayout.natural_jacobian)."""
    lay = ParamLayout(("Intercept", "x"), ("Intercept", "w"), **layout)
    theta = np.random.default_rng(lay.n_params).normal(size=lay.n_params)
    ref = autograd.jacobian(lay.to_natural)(theta)
    np.testing.assert_allclose(lay.natural_jacobian(theta), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["uexact", "product"])
@pytest.mark.parametrize("name", ["core (Model 3)", "bs_formula"])
def test_weighted_derivatives_equal_autograd(exam, name, kind):
    """Weights at both levels (mlsml.weights) in the closed-form gradient and the Hessian's chain."""
    rng = np.random.default_rng(11)
    df = exam.assign(w1=rng.uniform(0.5, 2.0, len(exam)))
    df["w2"] = df["school"].map(dict(zip(df["school"].unique(), rng.uniform(1.0, 4.0, df["school"].nunique()))))
    model = mlsml.MELSM.from_formula(
        "normexam ~ standLRT + schgend", df, groups="school", weights="w1", group_weights="w2", **MODELS[name]
    )
    lik = model.objective(nagq=5, quadrature="marginal" if kind == "uexact" else "product")
    theta = mlsml.start.start_values(lik.integrand) + rng.normal(0, 0.2, model.layout.n_params)
    _check(lik, theta)


# ---------------------------------------------------------------- issue 13: the quadratic association


def _fd_grad_hess(f, b, h=1e-4):
    """Central differences of ``f`` ((J, d) -> (J,)) in every coordinate: gradient (J, d), Hessian (J, d, d)."""
    J, d = b.shape
    g = np.zeros((J, d))
    H = np.zeros((J, d, d))
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        g[:, i] = (f(b + e) - f(b - e)) / (2 * h)
        for k in range(d):
            e2 = np.zeros(d)
            e2[k] = h
            H[:, i, k] = (f(b + e + e2) - f(b + e - e2) - f(b - e + e2) + f(b - e - e2)) / (4 * h * h)
    return g, H


@pytest.mark.parametrize("bs", [None, "~ schavg"])
def test_quadratic_mode_problem_derivatives_equal_finite_differences(exam, bs):
    """The hand-written gradient and Hessian of h_j(u0, w) with the prior at (u0, w - a u0^2)
    (SumsModeProblem with quad) against central differences of its own f, away from the mode."""
    model = mlsml.MELSM.from_formula(
        "normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", bs_formula=bs, association="quadratic"
    )
    lik = model.objective(nagq=5)
    lay = model.layout
    theta = mlsml.start.start_values(lik.integrand)
    theta[-1] = -0.6  # quad(u0,v): large, so its terms are not lost in the rest
    prob = lik.integrand.mode_problem(theta)
    assert prob.a is not None
    b = np.random.default_rng(5).normal(0, 0.4, (prob.J, lay.d))
    g, H = prob.derivs(b)
    g_fd, H_fd = _fd_grad_hess(prob.f, b)
    np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-5 * np.abs(g_fd).max())
    np.testing.assert_allclose(H, H_fd, rtol=1e-4, atol=1e-4 * np.abs(H_fd).max())
    _, Hf = prob.derivs(b, fisher=True)  # Fisher scoring: negative definite everywhere
    assert np.all(np.linalg.eigvalsh(-Hf) > 0)


def test_conditional_mode_of_u0_is_the_stationary_point_of_h(exam):
    """The inner rule's centre and scale (conditional_modes_u0): h_j(., w) has zero slope at the
    mode and the returned curvature is its second derivative there (finite differences of f)."""
    from mlsml.integrand import conditional_modes_u0

    model = mlsml.MELSM.from_formula("normexam ~ standLRT", exam, groups="school", association="quadratic")
    lik = model.objective()
    theta = mlsml.start.start_values(lik.integrand)
    theta[-1] = 0.5
    w = np.random.default_rng(2).normal(-0.5, 0.5, (model.design.ngroups, 3))
    mode, curv = conditional_modes_u0(lik.integrand, theta, w)
    prob = lik.integrand.mode_problem(theta)
    h = 1e-4
    for k in range(w.shape[1]):

        def f(u, k=k):
            return prob.f(np.column_stack([u, w[:, k]]))

        slope = (f(mode[:, k] + h) - f(mode[:, k] - h)) / (2 * h)
        second = (f(mode[:, k] + h) - 2 * f(mode[:, k]) + f(mode[:, k] - h)) / h**2
        assert np.abs(slope).max() < 1e-6 * np.abs(second).max()
        np.testing.assert_allclose(curv[:, k], -second, rtol=1e-4)


@pytest.mark.parametrize("kind", ["uexact", "product"])
def test_level1_bs_formula_derivatives_equal_finite_differences(exam, kind):
    """Level-1 bs_formula columns (issue 13): tau enters the data term through the loaded Z
    (mlsml.integrand.loaded_Z), so the gradient and Hessian (autograd on the likelihood, not
    through the sums) are checked against central differences of the value at fixed nodes; the
    numpy mode problem (loaded Z too) equals h_j and its derivatives its finite differences."""
    model = mlsml.MELSM.from_formula(
        "normexam ~ standLRT", exam[exam.school <= 20], groups="school", scale_formula="~ standLRT", bs_formula="~ standLRT"
    )
    assert model.design.S_level1 is not None
    lik = model.objective(nagq=5, quadrature="marginal" if kind == "uexact" else "product")
    assert not lik.integrand.through_sums
    theta = mlsml.start.start_values(lik.integrand) + np.random.default_rng(4).normal(0, 0.2, model.layout.n_params)
    nodes = lik.adapt(theta)
    value, grad = lik.value_and_grad(theta, nodes)
    H = lik.hessian(theta, nodes)
    h = 1e-5
    E = np.eye(theta.size) * h
    g_fd = np.array([(lik.at_nodes(theta + e, nodes) - lik.at_nodes(theta - e, nodes)) / (2 * h) for e in E])
    np.testing.assert_allclose(grad, g_fd, rtol=1e-6, atol=1e-6 * np.abs(g_fd).max())
    H_fd = np.array([(lik.value_and_grad(theta + e, nodes)[1] - lik.value_and_grad(theta - e, nodes)[1]) / (2 * h) for e in E])
    np.testing.assert_allclose(H, H_fd, rtol=1e-5, atol=1e-5 * np.abs(H_fd).max())
    assert abs(grad[model.layout.p + model.layout.k + 1]) > 1e-3  # bsvar:standLRT moves the likelihood
    # the mode problem sees the same loaded design as the likelihood
    prob = lik.integrand.mode_problem(theta)
    b = np.random.default_rng(5).normal(0, 0.4, (prob.J, model.layout.d))
    b2 = b + np.random.default_rng(6).normal(0, 0.4, b.shape)
    log_h = np.asarray(lik.integrand.log_h(theta, np.stack([b, b2], axis=1)))  # f is h_j up to a constant
    np.testing.assert_allclose(prob.f(b) - prob.f(b2), log_h[:, 0] - log_h[:, 1], rtol=1e-9, atol=1e-9)
    g, Hb = prob.derivs(b)
    gb_fd, Hb_fd = _fd_grad_hess(prob.f, b)
    np.testing.assert_allclose(g, gb_fd, rtol=1e-6, atol=1e-5 * np.abs(gb_fd).max())
    np.testing.assert_allclose(Hb, Hb_fd, rtol=1e-4, atol=1e-4 * np.abs(Hb_fd).max())


@pytest.mark.parametrize("d, free", [(2, None), (3, None), (3, [0, 2, 3, 4, 5]), (2, [0, 2])])
@pytest.mark.parametrize("log_ell", [0.3, -15.0])
def test_conditional_prior_derivatives_equal_autograd(d, free, log_ell):
    """The prior of u given v (m, K, s2) and its first and second derivatives in the free
    log-Cholesky parameters, also at |corr| = 1 - 5e-14 (log L[v,v] = -15) and with a fixed covariance."""
    n = d * (d + 1) // 2
    idx = list(range(n)) if free is None else free
    select = np.eye(n)[idx]  # the free parameters into the full vector (fixed entries of L at 0)
    x = np.random.default_rng(d).normal(scale=0.5, size=len(idx))
    x[-1] = log_ell  # the last entry of the vector is log L[v,v]

    def pi(xf):
        m, K, s2 = conditional_prior(chol_from_vector(anp.dot(xf, select), d))
        return anp.concatenate([m, anp.reshape(K, (-1,)), anp.reshape(s2, (1,))])

    T, D2 = conditional_prior_derivatives(np.asarray(chol_from_vector(x @ select, d)), free)
    np.testing.assert_allclose(T, autograd.jacobian(pi)(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(D2, autograd.hessian(pi)(x), rtol=1e-8, atol=1e-11)
    T1, none = conditional_prior_derivatives(np.asarray(chol_from_vector(x @ select, d)), free, second=False)
    np.testing.assert_array_equal(T1, T)  # a gradient's first derivatives are the same
    assert none is None


@pytest.mark.parametrize("q", [0, 1, 2, 3])
@pytest.mark.parametrize("log_scale", [0.0, 12.0])
def test_inverse_of_small_blocks_equals_lu(q, log_scale):
    """The adjugate inverse of the u-exact rule's A = I + E K'S2K blocks (eigenvalues at least 1),
    against LAPACK's: the residual A^{-1}A - I at rounding level, also at E K'S2K of order e^12."""
    rng = np.random.default_rng(q)
    M = rng.normal(size=(7, 5, q, q + 1))
    scale = np.exp(log_scale * rng.uniform(size=(7, 5, 1, 1)))
    A = np.eye(q) + scale * (M @ np.swapaxes(M, -1, -2))
    inv = derivatives._inverse_of_small_blocks(A)
    np.testing.assert_allclose(inv @ A, np.broadcast_to(np.eye(q), A.shape), atol=1e-10)
    np.testing.assert_allclose(inv, np.linalg.inv(A), rtol=1e-9, atol=1e-14)
