"""The likelihood engine: derivatives, quadrature accuracy, per-school sums."""

from __future__ import annotations

import autograd
import numpy as np
import pytest

import mlsml
from mlsml.integrand import Sums, SumsModeProblem, school_sums
from mlsml.likelihood import EVALUATION_ERRORS, Likelihood, value_or_nan
from mlsml.quadrature import QuadratureSpec, default_nagq, gauss_hermite_rule
from mlsml.start import start_values


def _lik(design, nagq=None, kind="product"):
    return Likelihood.build(design, QuadratureSpec(kind, nagq or default_nagq(design.layout.d)))


def loglik(theta, design, nagq=None):
    return _lik(design, nagq).value(theta)


def _design(df, y="normexam", x="standLRT", **kw):
    return mlsml.MELSM.from_formula(f"{y} ~ {x}", df, groups="school", **kw).design


def _random_theta(design, rng):
    lay = design.layout
    th = rng.normal(0, 0.3, lay.n_params)
    th[lay.p] = np.log(np.var(design.y)) + rng.normal(0, 0.3)
    return th


@pytest.mark.parametrize(
    "kw",
    [
        dict(scale_formula="~ standLRT"),
        dict(scale_formula="~ 1", random_scale=False),
        dict(scale_formula="~ standLRT", re_formula="~ standLRT"),
        dict(scale_formula="~ standLRT", re_formula="~ 0"),
    ],
)
def test_gradient_matches_central_differences(exam, kw):
    design = _design(exam, **kw)
    rng = np.random.default_rng(0)
    lik = _lik(design, 5)
    for _ in range(3):
        theta = _random_theta(design, rng)
        nodes = lik.adapt(theta)
        g = autograd.grad(lik.at_nodes)(theta, nodes)
        h = 1e-5
        fd = np.array(
            [(lik.at_nodes(theta + h * e, nodes) - lik.at_nodes(theta - h * e, nodes)) / (2 * h) for e in np.eye(theta.size)]
        )
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-4)


def test_hessian_matches_differences_of_gradient(exam):
    design = _design(exam, scale_formula="~ standLRT")
    theta = _random_theta(design, np.random.default_rng(1))
    lik = _lik(design, 5)
    nodes = lik.adapt(theta)
    H = lik.hessian(theta, nodes)
    grad = autograd.grad(lik.at_nodes)
    h = 1e-5
    fd = np.array([(grad(theta + h * e, nodes) - grad(theta - h * e, nodes)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(H, fd, rtol=1e-5, atol=1e-3)


def test_gradient_of_adapted_likelihood(exam):
    """The gradient with nodes held fixed equals the derivative of the re-adapted AGQ likelihood."""
    design = _design(exam, scale_formula="~ standLRT")
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    theta = np.array(res.theta) + 0.05
    lik = _lik(design, 11)
    g = autograd.grad(lik.at_nodes)(theta, lik.adapt(theta))
    h = 1e-5
    fd = np.array([(loglik(theta + h * e, design) - loglik(theta - h * e, design)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-4)


def test_more_points_change_llf_by_less_than_1e6(exam_m3):
    """At the estimates, more points (in either rule) move the log-likelihood by < 1e-6."""
    design = exam_m3.model.design
    theta = np.array(exam_m3.theta)
    assert exam_m3.model.loglike(exam_m3.params) == pytest.approx(exam_m3.llf, abs=1e-9)
    for nq in (21, 31):  # the u-exact rule of the fit (15 points in v by default)
        assert abs(exam_m3.model.loglike(exam_m3.params, nagq=nq) - exam_m3.llf) < 1e-6
    for nq in (11, 15, 21, 31):  # the rotated product rule over (u0, v)
        assert abs(loglik(theta, design, nq) - exam_m3.llf) < 1e-6


def test_no_random_scale_is_exact_with_one_point(exam):
    """Without a random scale the integrand is Gaussian: adaptive GH is exact for any nagq."""
    design = _design(exam, scale_formula="~ standLRT", random_scale=False)
    theta = _random_theta(design, np.random.default_rng(2))
    vals = [loglik(theta, design, nq) for nq in (1, 2, 5, 11)]
    np.testing.assert_allclose(vals, vals[-1], rtol=0, atol=1e-8)


def test_per_school_sums_equal_brute_force(exam):
    """The sufficient-sum likelihood equals a direct O(N K) evaluation at the nodes."""
    design = _design(exam, scale_formula="~ standLRT")
    lay = design.layout
    theta = _random_theta(design, np.random.default_rng(3))
    lik = _lik(design, 7)
    nodes = lik.adapt(theta)
    fast = lik.per_school(theta, nodes)
    beta, alpha, L = lay.split(theta)
    S = np.asarray(L) @ np.asarray(L).T
    Sinv = np.linalg.inv(S)
    slow = np.empty(design.ngroups)
    for j in range(design.ngroups):
        sl = slice(design.starts[j], design.starts[j] + design.counts[j])
        y, X, W = design.y[sl], design.X[sl], design.W[sl]
        terms = []
        for k in range(nodes.b.shape[1]):
            u, v = nodes.b[j, k]
            var = np.exp(W @ alpha + v)
            r = y - X @ beta - u
            ll = np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * r**2 / var)
            b = nodes.b[j, k]
            lp = -np.log(2 * np.pi) - 0.5 * np.log(np.linalg.det(S)) - 0.5 * b @ Sinv @ b
            terms.append(ll + lp + nodes.logw[k])
        terms = np.array(terms)
        slow[j] = nodes.log_det[j] + terms.max() + np.log(np.exp(terms - terms.max()).sum())
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-9)


def test_posterior_mode_is_stationary(exam):
    design = _design(exam, scale_formula="~ standLRT")
    theta = _random_theta(design, np.random.default_rng(4))
    mode, neg_hess = _lik(design).modes(theta)
    assert np.all(np.linalg.eigvalsh(neg_hess) > 0)
    lay = design.layout
    beta, alpha, L = lay.split(theta)
    s = Sums(*(np.asarray(a) for a in school_sums(beta, alpha, design)))
    P = np.linalg.inv(np.asarray(L) @ np.asarray(L).T)
    g, _ = SumsModeProblem(s, P, lay.q, lay.random_scale).derivs(mode)
    assert np.max(np.abs(g)) < 1e-6


def test_rule_integrates_gaussian_moments():
    rule = gauss_hermite_rule(2, 7)
    w = np.exp(rule.logw - 0.5 * np.sum(rule.points**2, axis=1)) / (2 * np.pi)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    z = rule.points
    assert np.sum(w * z[:, 0] ** 2) == pytest.approx(1.0, abs=1e-12)
    assert np.sum(w * z[:, 0] ** 4 * z[:, 1] ** 2) == pytest.approx(3.0, abs=1e-10)
    pruned = gauss_hermite_rule(3, 7, prune=1e-4)
    assert pruned.size < 7**3


def test_random_scale_only_model_is_nested(exam):
    """re_formula="~ 0": a school effect on the variance only (q = 0, d = 1)."""
    only_v = mlsml.fit("normexam ~ standLRT", exam, groups="school", re_formula="~ 0")
    both = mlsml.fit("normexam ~ standLRT", exam, groups="school")
    assert only_v.model.layout.re_names == ("v",)
    assert list(only_v.params.index[-1:]) == ["var(v)"]
    assert only_v.llf < both.llf
    assert np.isfinite(only_v.bse).all()


def test_value_or_nan_is_nan_where_the_rule_cannot_be_evaluated(exam):
    """The face probe's comparisons (fuzz cases 7772673247089237100, 8873838884344575339:
    an exactly singular block in the mode finder just inside a face) see NaN, not an error."""
    lik = mlsml.MELSM.from_formula("normexam ~ standLRT", exam, groups="school").objective()
    theta = np.asarray(start_values(lik.integrand), dtype=float)
    assert value_or_nan(lik, theta) == pytest.approx(float(lik.value(theta)))

    class Failing:
        def value(self, theta):
            raise EVALUATION_ERRORS[0]("Singular matrix")

    assert np.isnan(value_or_nan(Failing(), theta))
