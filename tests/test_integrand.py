"""The integrands (mlsml.integrand): the u-exact pieces against brute-force integration over u."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mlsml
from mlsml.integrand import PerObservation, SchoolSums, make_integrand
from mlsml.start import start_values


def _data(seed=4):
    rng = np.random.default_rng(seed)
    J, n = 12, 6
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    y = 0.3 + 0.5 * x + rng.normal(scale=0.4, size=J)[g] + rng.normal(size=J * n) * np.exp(0.5 * (-0.5 + 0.2 * x))
    return pd.DataFrame({"y": y, "x": x, "s": (np.arange(J) % 2)[g].astype(float), "school": g})


@pytest.mark.parametrize(
    "kw, cls",
    [(dict(), SchoolSums), (dict(bs_formula="~ s"), SchoolSums), (dict(scale_re_formula="~ x"), PerObservation)],
)
def test_u_exact_integrand_equals_brute_force_integral_over_u(kw, cls):
    """g_j(v) = log int exp h_j(u, v) du (q = 1) by a fine Riemann sum over u."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", **kw)
    integrand = make_integrand(model.design)
    assert type(integrand) is cls
    lay = model.layout
    theta = start_values(integrand) + 0.05
    rng = np.random.default_rng(1)
    v = rng.normal(scale=0.3, size=(model.design.ngroups, 2, lay.n_v))
    g = np.asarray(integrand.log_h_uexact(theta, v))
    u = np.linspace(-4.0, 4.0, 4001)
    for k in range(2):
        b = np.concatenate(
            [np.broadcast_to(u[None, :, None], (v.shape[0], u.size, 1)), np.repeat(v[:, k : k + 1, :], u.size, axis=1)], axis=2
        )
        h = np.asarray(integrand.log_h(theta, b))
        top = h.max(axis=1, keepdims=True)
        brute = top[:, 0] + np.log(np.exp(h - top).sum(axis=1) * (u[1] - u[0]))
        np.testing.assert_allclose(g[:, k], brute, rtol=0, atol=1e-8)


def test_core_flag_and_school_covariances():
    df = _data()
    core = make_integrand(mlsml.MELSM.from_formula("y ~ x", df, groups="school").design)
    bs = make_integrand(mlsml.MELSM.from_formula("y ~ x", df, groups="school", bs_formula="~ s").design)
    assert core.core and not bs.core
    theta = start_values(bs) + 0.1  # bsvar:s != 0
    S = bs.school_covariances(theta)
    assert S.shape == (bs.design.ngroups, 2, 2)
    assert len(np.unique(np.round(S[:, 0, 0], 12))) == 2  # two values of s: two var(u0_j)
    np.testing.assert_allclose(S[:, 1, 1], S[0, 1, 1])  # var(v) is common


# ---------------------------------------------------------------- issue 13: the nested rule of the quadratic association


def test_nested_rule_equals_a_brute_force_integral_with_a_mirror_mode():
    """log_h_nested against a 600 x 600 grid over (u0, w) on six schools, one of them with a middling
    mean and a large variance: with gamma = 0.8 its conditional of u0 given w has two modes of
    opposite sign, which the rule finds (a rule at one mode only is 0.46 off for it)."""
    rng = np.random.default_rng(4)
    n = 20
    rows = []
    for j, (mu, sd) in enumerate([(0.0, 1.6), (0.6, 0.7), (-0.5, 0.6), (0.2, 0.5), (1.0, 1.2), (-0.1, 0.4)]):
        e = rng.normal(size=n)
        rows.append(pd.DataFrame({"school": j, "y": mu + sd * (e - e.mean()) / e.std()}))
    df = pd.concat(rows, ignore_index=True)
    model = mlsml.MELSM.from_formula("y ~ 1", df, groups="school", association="quadratic")
    theta = model.theta_from_params(pd.Series([0.0, -1.0, 0.3, 0.1, 0.05, 0.8], index=model.param_names))
    lik = model.objective(nagq=21)
    nodes = lik.adapt(theta)
    nested = np.asarray(lik.per_school(theta, nodes))
    u = np.linspace(-4.0, 4.0, 600)
    w = np.linspace(-6.0, 6.0, 600)
    U, W = np.meshgrid(u, w, indexing="ij")
    b = np.broadcast_to(np.stack([U.ravel(), W.ravel()], axis=1), (6, U.size, 2))
    h = np.asarray(lik.integrand.log_h(theta, b))
    grid = mlsml.ops.logsumexp(h, axis=1) + np.log((u[1] - u[0]) * (w[1] - w[0]))
    np.testing.assert_allclose(nested, grid, atol=1e-4)
