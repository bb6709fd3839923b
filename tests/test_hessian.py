"""The Hessian of the likelihood (mlsml.hessian): the chain rule through the per-school sums
against autograd's Hessian of the same function, for every model class and both rules."""

from __future__ import annotations

import autograd
import numpy as np
import pytest

import mlsml
from mlsml.integrand import PerObservation, SchoolSums
from mlsml.quadrature import QuadratureSpec

#: ``|H - H_autograd| <= RTOL * max |H_autograd|``: the two differ by rounding only (about
#: 1e-14 here); a wrong term of the chain rule is of the order of the Hessian itself.
RTOL = 1e-9


def _check(lik, theta):
    nodes = lik.adapt(theta)
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
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["uexact", "product"])
def test_sums_hessian_equals_autograd(exam, name, kind):
    kw = MODELS[name]
    model = mlsml.MELSM.from_formula("normexam ~ standLRT + schgend", exam, groups="school", **kw)
    lay = model.layout
    if kind == "uexact" and not (lay.random_scale and lay.q >= 1):
        pytest.skip("the u-exact rule needs a random scale and a mean effect")
    lik = model.objective(nagq=5, quadrature="marginal" if kind == "uexact" else "product")
    assert isinstance(lik.integrand, SchoolSums)
    rng = np.random.default_rng(3)
    theta = mlsml.start.start_values(model.design) + rng.normal(0, 0.2, lay.n_params)
    _check(lik, theta)


def test_sums_hessian_at_the_estimates_gives_the_same_standard_errors(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT")
    H, ref = _check(res.likelihood, res.theta)
    se = np.sqrt(np.diag(np.linalg.inv(-H)))
    se_ref = np.sqrt(np.diag(np.linalg.inv(-ref)))
    np.testing.assert_allclose(se, se_ref, rtol=1e-8)


def test_sums_hessian_next_to_the_boundary(seed_sim):
    """A fit whose estimate is on the boundary (corr(u0,u1) = -1, see test_reference): Sigma is
    nearly singular, so the prior terms are huge and cancel; the chain rule must still agree."""
    with pytest.warns(mlsml.SingularFitWarning):
        res = mlsml.fit("y ~ x", seed_sim, groups="school", re_formula="~ x", random_scale=False)
    assert res.singular
    _check(res.likelihood, res.theta)
    _check(res.likelihood, res.theta + 0.01)


def test_per_observation_integrand_keeps_autograd(exam):
    """scale_re_formula: the data do not enter through per-school sums; the Hessian is autograd's."""
    model = mlsml.MELSM.from_formula("normexam ~ standLRT", exam.iloc[:800], groups="school", scale_re_formula="~ standLRT")
    lik = mlsml.likelihood.Likelihood.build(model.design, QuadratureSpec("uexact", 5))
    assert isinstance(lik.integrand, PerObservation)
    _check(lik, mlsml.start.start_values(model.design) + 0.05)
