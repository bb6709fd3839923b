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
