"""Accuracy of the u-exact rule of scale_re_formula fits under two rotations of the same nodes.

Run from the repository root (``MLSML_HSB_CSV`` as for bench_cliffs.py; without it HSB is skipped)::

    python3 bench/scale_re_rotation.py

At each fit's estimates, the log-likelihood with ``n`` points per dimension minus the one with 41
(21 with three scale effects), for the nodes ``v = m + C z`` with ``C`` the Cholesky factor of
the posterior covariance of ``v`` in the order ``(v0, v1, ...)`` (the rule mlsml uses) and with
``v0`` last (then ``v1, ...`` take only ``n`` values per school, which would make the per-node
sums of mlsml.node_sums cheaper still). The second is up to 20 x less accurate at 15 points, so
mlsml keeps the first (bench/README.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from bench_cliffs import slope_data  # bench/ is the script folder

import mlsml
from mlsml.quadrature import Nodes, place_nodes

POINTS = (11, 13, 15, 17, 19)


def _v0_last(nodes: Nodes, rule, q: int) -> Nodes:
    """The same rule with the Cholesky factor taken with the first scale effect last."""
    cov = np.linalg.inv(nodes.neg_hess)[:, q:, q:]
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    nv = cov.shape[1]
    order = np.r_[np.arange(1, nv), 0]
    chol = np.empty_like(cov)
    chol[:, order, :] = np.linalg.cholesky(cov[:, order][:, :, order])
    b = nodes.b.copy()
    b[:, :, q:] = nodes.mode[:, None, q:] + np.einsum("jde,ke->jkd", chol, rule.points)
    return Nodes(b=b, logw=rule.logw, log_det=nodes.log_det, mode=nodes.mode, chol=chol, neg_hess=nodes.neg_hess, start=q)


def _value(at, n: int, last: bool) -> float:
    """The log-likelihood at the estimates with ``n`` points, in either rotation."""
    lik, theta, mode, neg_hess = at
    q = lik.layout.q
    other = lik.with_spec(nagq=n)
    nodes = place_nodes(mode, neg_hess, other.rule, q)
    return float(other.at_nodes(theta, _v0_last(nodes, other.rule, q) if last else nodes))


def studies():
    yield "slope_data 500 x 40 (bench_cliffs)", slope_data(), "y ~ x", {}
    path = os.environ.get("MLSML_HSB_CSV", "")
    if path and Path(path).is_file():
        hsb = pd.read_csv(path).rename(columns={"mathach": "y", "ses": "x"})
        yield "High School and Beyond", hsb, "y ~ x", {}
    for seed in (3, 4, 5):
        yield f"simulate_data 40 x 20, seed {seed}", mlsml.simulate.simulate_data([20] * 40, seed=seed), "y ~ x", {}
    yield "slope_data 100 x 10", slope_data(J=100, n=10, seed=7), "y ~ x", {}
    yield "slope_data 100 x 30", slope_data(J=100, n=30, seed=8), "y ~ x", {}
    z = np.random.default_rng(1).standard_normal(3000)
    yield "three scale effects, 100 x 30", slope_data(J=100, n=30, seed=9).assign(z=z), "y ~ x", {"scale_re_formula": "~ x + z"}


def main() -> None:
    warnings.simplefilter("ignore")
    print("llf(n points) - llf(reference) at the estimates; rotation: Cholesky in the order (v0, v1, ...) | v0 last")
    for name, df, formula, extra in studies():
        kw = {"scale_formula": "~ x", "scale_re_formula": "~ x", **extra}
        res = mlsml.fit(formula, df, groups="school", **kw)
        theta, lik = np.asarray(res.theta), res.likelihood
        mode, neg_hess = lik.modes(theta)
        ref_points = 41 if lik.layout.n_v == 2 else 21

        at = (lik, theta, mode, neg_hess)
        ref = _value(at, ref_points, False)
        print(f"{name} (reference {ref_points} points; the two rotations differ there by {_value(at, ref_points, True) - ref:+.1e})")
        for last in (False, True):
            label = "v0 last " if last else "v0 first"
            print(f"    {label}  " + "  ".join(f"{n}: {_value(at, n, last) - ref:+.1e}" for n in POINTS), flush=True)


if __name__ == "__main__":
    main()
