"""The optimiser summary and the public pipeline objective -> maximize -> results (mlsml.optimize)."""

from __future__ import annotations

import numpy as np
import pytest

import mlsml
from mlsml.optimize import FitOptions, OptSummary, maximize

M4 = dict(re_formula="~ x", scale_formula="~ x")


@pytest.fixture(scope="module")
def demo():
    return mlsml.simulate.demo_data(n_groups=40, seed=1)


def test_optsum_records_the_fit(demo):
    res = mlsml.fit("y ~ x", demo, groups="school", scale_formula="~ x")
    opt = res.optsum
    assert isinstance(opt, OptSummary) and opt.converged
    assert opt.quadrature == res.likelihood.spec and opt.nagq == res.nagq == 15
    assert opt.method == "BFGS" and isinstance(opt.options, FitOptions)
    assert opt.n_fev > 0 and opt.n_passes == len(opt.history) and opt.n_iter >= 1
    assert opt.decrement < opt.options.dtol and opt.max_grad == pytest.approx(np.max(np.abs(res.grad)))
    assert opt.start.shape == opt.theta.shape and not np.allclose(opt.start, opt.theta)
    assert res.llf == opt.llf and res.message == opt.message and res.n_iter == opt.n_iter


def test_maximize_and_build_by_hand_report_the_rule_and_points(demo):
    """A regression test: MELSMResults.from_optimum took nagq from its caller, so a
    product-rule optimum composed by hand was reported with the wrong rule and points."""
    model = mlsml.MELSM.from_formula("y ~ x", demo, groups="school", **M4)
    f = model.objective(quadrature="product")
    opt = maximize(f)
    for res in (mlsml.MELSMResults.build(model, f, opt), mlsml.MELSMResults.from_optimum(model, opt)):
        assert res.quadrature == "product" and res.nagq == 9 and res.likelihood.spec.kind == "product"
        assert res.llf == pytest.approx(f.value(res.theta), abs=1e-9)
    fitted = model.fit(quadrature="product")
    assert fitted.llf == pytest.approx(opt.llf, abs=1e-9)


def test_objective_is_the_fits_rule(demo):
    model = mlsml.MELSM.from_formula("y ~ x", demo, groups="school", **M4)
    res = model.fit()
    f = model.objective()
    assert f.spec == res.likelihood.spec and f.spec.kind == "uexact"
    assert f.value(res.theta) == pytest.approx(res.llf, abs=1e-9)
    assert res.deviance == pytest.approx(-2 * f.value(res.theta), abs=1e-8)
    check = f.with_spec(nagq=31)
    assert check.spec.nagq == 31 and f.spec.nagq == 15  # a new object
    assert abs(check.value(res.theta) - res.llf) < 1e-6


def test_results_are_not_written_after_construction(demo):
    res = mlsml.fit("y ~ x", demo, groups="school")
    m1 = mlsml.fit("y ~ x", demo, groups="school", random_scale=False)
    before = dict(vars(res))
    res.singular_reasons(), res.fittedvalues, mlsml.lrtest(m1, res), res.school_effects(), res.to_dict()
    assert vars(res) == before  # the same objects, none added or replaced
    assert res.diagnostics.hessian_pd and res.diagnostics.boundary == ()
    with pytest.raises(ValueError, match="read-only"):
        res.model.design.y[0] = 1.0
