"""Parameter recovery on data simulated from known values (a small coverage check).

The full coverage study (500 replications) lives in validation/; here 60 replications
of the seed paper's design (100 schools x 25 students) check that 95% Wald intervals
of the mean-function and variance-function coefficients cover the truth at a rate
consistent with 95% (binomial 99.9% acceptance band for 60 x 4 intervals), and that
the estimates are unbiased within Monte-Carlo error.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import mlsml
from mlsml.simulate import draw_responses

TRUTH = {  # the seed paper's supplement design (seed_sim.truth.json)
    "mean:Intercept": 0.0,
    "mean:x": 0.7,
    "scale:Intercept": -0.8,
    "scale:x": 0.05,
    "var(u0)": 0.05,
    "var(v)": 0.05,
    "cov(u0,v)": 0.025,
}


@pytest.mark.slow
def test_wald_coverage_and_bias(seed_sim):
    model = mlsml.MELSM.from_formula("y ~ x", seed_sim, groups="school", scale_formula="~ x")
    truth = np.array([TRUTH[n] for n in model.param_names])
    theta = model.theta_from_params(truth)
    rng = np.random.default_rng(20240)
    reps = 60
    ys = draw_responses(model.design, theta, rng, n_reps=reps)
    est, cover = [], []
    for r in range(reps):
        sim = seed_sim.copy()
        # draw_responses works in the design's sorted order; map back to the frame's rows
        y = np.empty_like(ys[r])
        y[model.design.order] = ys[r]
        sim["y"] = y
        res = mlsml.fit("y ~ x", sim, groups="school", scale_formula="~ x")
        assert res.converged
        ci = res.conf_int().to_numpy()
        est.append(res.params.to_numpy())
        cover.append((ci[:, 0] <= truth) & (truth <= ci[:, 1]))
    est, cover = np.array(est), np.array(cover)
    fixed = slice(0, 4)
    n_int = cover[:, fixed].size
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n_int, 0.95)
    assert lo <= cover[:, fixed].sum() <= hi, cover[:, fixed].mean(axis=0)
    # bias within 4 Monte-Carlo SEs for every parameter
    mc_se = est.std(axis=0, ddof=1) / np.sqrt(reps)
    bias = est.mean(axis=0) - truth
    assert np.all(np.abs(bias) < 4 * mc_se + 1e-3), dict(zip(model.param_names, bias))
