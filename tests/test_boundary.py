"""When the boundary probes may be skipped (mlsml.boundary.far_from_boundary)."""

from __future__ import annotations

import autograd
import numpy as np
import pytest

import mlsml
from mlsml import boundary
from mlsml.params import chol_from_vector, sigma_derivatives, vector_from_chol


def test_sigma_derivatives_match_autograd():
    L = np.array([[1.2, 0.0, 0.0], [0.3, 0.7, 0.0], [-0.2, 0.4, 0.5]])

    def sigma(psi):
        M = chol_from_vector(psi, 3)
        return M @ M.T

    jac = autograd.jacobian(sigma)(vector_from_chol(L))  # (3, 3, n_psi)
    np.testing.assert_allclose(sigma_derivatives(L), np.moveaxis(jac, 2, 0), rtol=1e-12, atol=1e-14)


def _z2_by_differences(res):
    """The same statistics from numerical derivatives of var(e) and the smallest correlation eigenvalue."""
    lay = res.layout
    off = lay.p + lay.k
    theta = np.asarray(res.theta, dtype=float)

    def quantities(psi):
        L = chol_from_vector(psi, lay.d)
        S = L @ L.T
        sd = np.sqrt(np.diag(S))
        out = list(np.diag(S))
        if lay.d > 1:
            out.append(np.linalg.eigvalsh(S / np.outer(sd, sd))[0])
        return np.array(out)

    psi = theta[off:]
    h = 1e-6
    grad = np.array([(quantities(psi + h * e) - quantities(psi - h * e)) / (2 * h) for e in np.eye(psi.size)])
    H = res.optsum.hessian
    cov = np.linalg.inv(-0.5 * (H + H.T))[off:, off:]
    f = quantities(psi)
    return f**2 / np.einsum("kf,kl,lf->f", grad, cov, grad)


@pytest.mark.parametrize("kw", [dict(scale_formula="~ standLRT"), dict(scale_formula="~ standLRT", re_formula="~ standLRT")])
def test_probe_statistics_match_numerical_derivatives(exam, kw):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", **kw)
    z2 = boundary.probe_z2(res.layout, res.theta, res.optsum.hessian)
    np.testing.assert_allclose(z2, _z2_by_differences(res), rtol=1e-5)


def test_skipped_probes_would_have_found_nothing(exam, seed_sim, monkeypatch):
    """With the threshold lowered to z = 1 (25 times less strict than the default), every fit
    called far from the boundary still has no probe below BOUNDARY_LR; the boundary fits are
    never called far from it."""
    monkeypatch.setattr(boundary, "FAR_FROM_BOUNDARY_Z2", 1.0)
    fits = [
        ("normexam ~ standLRT", exam, dict(scale_formula="~ standLRT")),
        ("normexam ~ standLRT", exam, dict(re_formula="~ standLRT", random_scale=False)),
        ("y ~ x", seed_sim, dict(scale_formula="~ x")),
    ]
    for formula, df, kw in fits:
        res = mlsml.fit(formula, df, groups="school", **kw)
        assert boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian), kw
        assert boundary.boundary_effects(res.likelihood, res.theta, res.llf) == []
    with pytest.warns(mlsml.SingularFitWarning):
        res = mlsml.fit("y ~ x", seed_sim, groups="school", re_formula="~ x", random_scale=False)
    assert not boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian)
    assert res.diagnostics.boundary  # the probes ran and found the rank-deficient Sigma


def test_default_threshold_leaves_small_data_to_the_probes(exam):
    """65 schools: var(v) is about 4 standard errors from zero, so the probes run (and find nothing)."""
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    assert min(boundary.probe_z2(res.layout, res.theta, res.optsum.hessian)) < boundary.FAR_FROM_BOUNDARY_Z2
    assert not boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian)
    assert res.diagnostics.boundary == ()


def test_not_positive_definite_information_runs_the_probes(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    H = np.array(res.optsum.hessian)
    H[-1, -1] = abs(H[-1, -1])  # a direction of positive curvature: not a maximum
    assert boundary.probe_z2(res.layout, res.theta, H) is None
    assert not boundary.far_from_boundary(res.layout, res.theta, H)
