"""The one Newton posterior-mode solver (mlsml.modes) for every integrand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CountingModeProblem

import mlsml
from mlsml import modes
from mlsml.integrand import SumsModeProblem, make_integrand
from mlsml.modes import posterior_modes


def _data(seed=3):
    rng = np.random.default_rng(seed)
    J, n = 30, 8
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    b = rng.normal(scale=[0.3, 0.3, 0.2], size=(J, 3))
    y = 0.2 + 0.5 * x + b[g, 0] + rng.normal(size=J * n) * np.exp(0.5 * (-0.8 + b[g, 1] + b[g, 2] * x))
    s = (np.arange(J) % 2)[g]
    return pd.DataFrame({"y": y, "x": x, "s": s, "school": g})


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(re_formula="~ x"),
        dict(random_scale=False),
        dict(scale_re_formula="~ x"),
        dict(bs_formula="~ s"),
    ],
)
def test_modes_are_stationary_with_positive_definite_curvature(kw):
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", **kw)
    integrand = make_integrand(model.design)
    theta = mlsml.start.start_values(integrand) + 0.05
    problem = integrand.mode_problem(theta)
    mode, negH = posterior_modes(problem, model.layout.q)
    g, _ = problem.derivs(mode)
    assert np.abs(g).max() < 1e-6
    assert np.all(np.linalg.eigvalsh(negH) > 0)


def test_stalled_steps_end_the_iterations_for_every_integrand():
    """Near a singular Sigma the decrement of a converged school is rounding noise; the solver
    stops when a step no longer raises h. Before the engine was unified, the per-observation
    solver (scale_re_formula) lacked this and iterated to maxiter with 40 halvings a time."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", scale_re_formula="~ x")
    lay = model.layout
    sigma = np.diag([0.1, 0.1, 1e-14])
    sigma[0, 2] = sigma[2, 0] = 0.0
    theta = lay.theta_from_parts(np.array([0.2, 0.5]), np.array([-0.8]), sigma)
    problem = CountingModeProblem(make_integrand(model.design).mode_problem(theta))
    posterior_modes(problem, lay.q, tol=0.0)  # tol 0: only the stalled-step rule can stop it
    assert problem.calls < 20  # without the rule: 101 evaluations (maxiter)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_closed_form_solve_and_positive_definiteness_match_numpy(d):
    rng = np.random.default_rng(d)
    A = rng.normal(size=(200, d, d))
    A = A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(d)  # positive definite
    A[::3] *= -1.0  # and some negative definite
    A[1::7, 0, 0] = -1e-3  # and some indefinite (d > 1) or negative (d = 1)
    g = rng.normal(size=(200, d))
    np.testing.assert_allclose(modes.solve(A, g), np.linalg.solve(A, g[:, :, None])[:, :, 0], rtol=1e-10, atol=1e-12)
    sym = 0.5 * (A + np.swapaxes(A, 1, 2))
    np.testing.assert_array_equal(modes.is_pd(A), np.linalg.eigvalsh(sym)[:, 0] > 0)


def test_closed_form_solve_raises_like_numpy_for_a_singular_matrix():
    A = np.array([[[1.0, 2.0], [2.0, 4.0]], [[2.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(np.linalg.LinAlgError):
        modes.solve(A, np.ones((2, 2)))


def _icc_near_one(sd_e: float, J: int = 40, n: int = 10, seed: int = 5) -> pd.DataFrame:
    """School SD 1, residual SD ``sd_e``: the intraclass correlation is ``1 / (1 + sd_e^2)``."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    u, v = rng.normal(size=J), 0.3 * rng.normal(size=J)
    y = 1.0 + 0.5 * x + u[g] + sd_e * np.exp(0.5 * (v[g] + 0.2 * x)) * rng.normal(size=J * n)
    return pd.DataFrame({"y": y, "x": x, "school": g})


@pytest.mark.parametrize("kw", [dict(), dict(re_formula="~ x")])
def test_modes_need_few_evaluations_when_the_icc_is_near_one(kw):
    """Residual SD 1e-4 of the school SD (issue 12, performance cliffs): h_j was computed as
    S0 - 2u'S1 + u'S2u, a difference of numbers 1e8 times larger than h, so its rounding noise
    exceeded the decrements the solver tests; it ran to maxiter with dozens of halvings (over
    1,000 evaluations of h per node adaptation; a 5,000-row fit took 20-40 s). About the
    school's least-squares solution (integrand.Centred) the Newton iterations converge."""
    model = mlsml.MELSM.from_formula("y ~ x", _icc_near_one(1e-4), groups="school", scale_formula="~ x", **kw)
    integrand = make_integrand(model.design)
    lay = model.layout
    sigma = np.diag([1.0, 0.09] if lay.d == 2 else [1.0, 0.01, 0.09])
    theta = lay.theta_from_parts(np.array([1.0, 0.5]), np.array([2.0 * np.log(1e-4), 0.2]), sigma)  # the truth
    problem = CountingModeProblem(integrand.mode_problem(theta))
    mode, negH = posterior_modes(problem, model.layout.q)
    assert problem.calls < 100
    g, _ = problem.derivs(mode)
    # the remaining Newton step in units of the posterior SD of each effect
    step = np.linalg.solve(negH, g[:, :, None])[:, :, 0]
    sd = np.sqrt(np.diagonal(np.linalg.inv(negH), axis1=1, axis2=2))
    assert np.abs(step / sd).max() < 1e-6


def test_centred_mode_problem_is_the_same_function():
    """h_j and its derivatives about the least-squares reference equal the uncentred
    formulas (an identity; on well-conditioned data they agree to rounding)."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", scale_formula="~ x", re_formula="~ x")
    integrand = make_integrand(model.design)
    theta = mlsml.start.start_values(integrand) + 0.05
    centred = integrand.mode_problem(theta)
    plain = SumsModeProblem(centred.s, centred.P, centred.q, centred.rs)
    b = np.random.default_rng(0).normal(scale=0.3, size=(centred.J, centred.d))
    np.testing.assert_allclose(centred.f(b), plain.f(b), rtol=1e-12)
    for fisher in (False, True):
        for x, y in zip(centred.derivs(b, fisher), plain.derivs(b, fisher)):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10)


def test_icc_near_one_likelihood_matches_brute_force_integration():
    """The adapted u-exact likelihood at residual SD 1e-3 equals a 1-D trapezoid integral over
    v on a wide uniform grid (exact in u given v; no mode or curvature used beyond centring)."""
    model = mlsml.MELSM.from_formula("y ~ x", _icc_near_one(1e-3), groups="school", scale_formula="~ x")
    lik = model.objective()
    theta = mlsml.start.start_values(lik.integrand) + 0.05
    nodes = lik.adapt(theta)
    sd = nodes.chol[:, 0, 0]
    grid = np.linspace(-12.0, 12.0, 2001)
    v = nodes.mode[:, 1][:, None] + sd[:, None] * grid[None, :]
    lg = np.asarray(lik.integrand.log_h_uexact(theta, v[:, :, None]))
    top = lg.max(axis=1, keepdims=True)
    e = np.exp(lg - top)
    trap = (e.sum(axis=1) - 0.5 * (e[:, 0] + e[:, -1])) * (v[:, 1] - v[:, 0])  # uniform grid
    brute = top[:, 0] + np.log(trap)
    assert abs(lik.value(theta) - brute.sum()) < 1e-6 * len(brute)
