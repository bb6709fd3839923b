"""The scale_re_formula likelihood through per-node school sums (mlsml.node_sums): value, gradient
and Hessian against autograd on the same likelihood at the same nodes (Likelihood.at_nodes)."""

from __future__ import annotations

import dataclasses

import autograd
import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml import node_sums
from mlsml.integrand import PerObservation
from mlsml.quadrature import place_nodes

#: ``|x - x_autograd| <= RTOL * max |x_autograd|``: the two differ by rounding only (about
#: 1e-13 here); a wrong term is of the order of the whole.
RTOL = 1e-9


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    """30 schools of 4 to 12 pupils (schools of equal size are batched: some consecutive, some not),
    a random intercept and a random scale with random slopes in x and z."""
    rng = np.random.default_rng(5)
    J = 30
    school = np.repeat(np.arange(J), np.r_[[8, 8, 8], rng.integers(4, 13, J - 3)])
    N = school.size
    x, z = rng.standard_normal(N), rng.standard_normal(N)
    u, v0, v1 = 0.5 * rng.standard_normal(J), 0.3 * rng.standard_normal(J), 0.2 * rng.standard_normal(J)
    lv = -0.5 + 0.2 * x + v0[school] + v1[school] * x
    y = 1 + 0.5 * x + u[school] + np.exp(0.5 * lv) * rng.standard_normal(N)
    frame = pd.DataFrame({"y": y, "x": x + 3.0, "z": z, "school": school})  # x off-centre on purpose
    frame["w1"] = rng.uniform(0.5, 2.0, N)  # level-1 weights
    frame["w2"] = rng.uniform(0.5, 2.0, J)[school]  # level-2 weights
    frame["off"] = 0.3 * rng.standard_normal(N)  # a variance offset
    return frame


MODELS = {
    "random slope in the variance": dict(scale_re_formula="~ x"),
    "no mean effect": dict(scale_re_formula="~ x", re_formula="~ 0"),
    "two mean effects": dict(scale_re_formula="~ x", re_formula="~ x"),
    "slope only, no scale intercept": dict(scale_re_formula="~ 0 + x"),
    "three scale effects": dict(scale_re_formula="~ x + z"),
    "two slopes, no scale intercept": dict(scale_re_formula="~ 0 + x + z"),
    "weights at both levels": dict(scale_re_formula="~ x", weights="w1", group_weights="w2"),
    "variance offset, no u-v covariances": dict(scale_re_formula="~ x", scale_offset="off", association="none"),
}


def _likelihood(data, kw, nagq):
    model = mlsml.MELSM.from_formula("y ~ x", data, groups="school", scale_formula="~ x", **kw)
    lik = model.objective(nagq=nagq)
    assert isinstance(lik.integrand, PerObservation) and lik.spec.uexact
    return lik


def _compare(lik, theta, nodes):
    ref_value, ref_grad = autograd.value_and_grad(lik.at_nodes)(theta, nodes)
    ref_H = np.asarray(autograd.hessian(lik.at_nodes)(theta, nodes))
    ns = node_sums.NodeSums.build(lik.integrand, theta, nodes, lik.nagq)
    assert ns is not None
    assert abs(ns.value - ref_value) <= 1e-12 * abs(ref_value)
    np.testing.assert_allclose(ns.gradient(), ref_grad, rtol=0, atol=RTOL * max(np.abs(ref_grad).max(), 1.0))
    np.testing.assert_allclose(ns.hessian(), ref_H, rtol=0, atol=RTOL * np.abs(ref_H).max())
    # and through the Likelihood, which the optimiser and the results use
    value, grad = lik.value_and_grad(theta, nodes)
    assert value == ns.value
    np.testing.assert_allclose(lik.hessian(theta, nodes), ref_H, rtol=0, atol=RTOL * np.abs(ref_H).max())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("nagq", [4, 5])
def test_value_gradient_hessian_equal_autograd(data, name, nagq):
    lik = _likelihood(data, MODELS[name], nagq)
    rng = np.random.default_rng(nagq)
    theta = mlsml.start.start_values(lik.integrand) + rng.normal(0, 0.2, lik.layout.n_params)
    _compare(lik, theta, lik.adapt(theta))


def test_next_to_a_singular_sigma(data):
    """corr(u0, v0) = 0.999: P = Sigma^-1 is ~1000 x Sigma's scale; the derivatives through L^-1 still agree."""
    lik = _likelihood(data, MODELS["random slope in the variance"], 5)
    lay = lik.layout
    start = np.asarray(mlsml.start.start_values(lik.integrand))
    natural = np.asarray(lay.to_natural(start))
    sd = np.array([0.5, 0.3, 0.2])
    corr = np.array([[1.0, -0.999, 0.0], [-0.999, 1.0, 0.0], [0.0, 0.0, 1.0]])
    theta = lay.theta_from_parts(natural[: lay.p], natural[lay.p : lay.p + lay.k], corr * np.outer(sd, sd))
    _compare(lik, theta, lik.adapt(theta))


def test_other_nodes_fall_back_to_autograd(data):
    """Nodes that are not the likelihood's own product rule are not factorised: autograd's derivatives."""
    lik = _likelihood(data, MODELS["random slope in the variance"], 5)
    theta = np.asarray(mlsml.start.start_values(lik.integrand))
    nodes = lik.with_spec(nagq=4).adapt(theta)  # 16 nodes where the rule has 25
    assert node_sums.NodeSums.build(lik.integrand, theta, nodes, lik.nagq) is None
    moved = dataclasses.replace(nodes, b=nodes.b + 1e-3)  # not m + C z any more
    assert node_sums.NodeSums.build(lik.integrand, theta, moved, 4) is None
    value, grad = lik.with_spec(nagq=4).value_and_grad(theta, moved)
    ref_value, ref_grad = autograd.value_and_grad(lik.at_nodes)(theta, moved)
    assert value == ref_value
    np.testing.assert_array_equal(grad, ref_grad)


def test_any_rotation_of_the_rule_factorises(data):
    """The factorisation needs v = m + C z, not a triangular C: a rotated square root of the same covariance."""
    lik = _likelihood(data, MODELS["three scale effects"], 4)
    theta = np.asarray(mlsml.start.start_values(lik.integrand)) + 0.1
    mode, neg_hess = lik.modes(theta)
    q = lik.layout.q
    nodes = place_nodes(mode, neg_hess, lik.rule, q)
    angle = 0.7
    R = np.eye(3)
    R[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    chol = nodes.chol @ R  # C R R' C' = C C'
    b = nodes.b.copy()
    b[:, :, q:] = mode[:, None, q:] + np.einsum("jde,ke->jkd", chol, lik.rule.points)
    _compare(lik, theta, dataclasses.replace(nodes, b=b, chol=chol))


@pytest.mark.filterwarnings("ignore::mlsml.errors.SingularFitWarning")  # corr(v0, v1) near -1 here
def test_a_fit_reports_the_log_likelihood_autograd_computes(data):
    """A fit with the default rule (closed-form derivatives throughout) converges, and its llf is the
    likelihood that autograd's path computes at the estimates."""
    res = mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    assert res.converged
    lik = res.likelihood
    theta = np.asarray(res.theta)
    value = float(lik.at_nodes(theta, lik.adapt(theta)))
    assert abs(value - lik.value(theta)) < 1e-9 * abs(value)
    assert abs(value - res.llf) < 1e-6  # res.llf is the fit's on its standardised copy of the data
