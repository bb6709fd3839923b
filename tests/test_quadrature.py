"""Rules, the rule specification and the one node placer (mlsml.quadrature)."""

from __future__ import annotations

import numpy as np
import pytest

from mlsml.errors import ModelSpecError
from mlsml.quadrature import QuadratureSpec, gauss_hermite_rule, place_nodes


def test_place_nodes_over_a_block_uses_the_marginal_covariance():
    """start=q: nodes in the scale block only, rotated by chol([(-H)^-1]_vv); the mean entries stay 0."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 3, 3))
    negH = np.einsum("jab,jcb->jac", A, A) + 3 * np.eye(3)
    mode = rng.normal(size=(5, 3))
    rule = gauss_hermite_rule(1, 7)
    nodes = place_nodes(mode, negH, rule, start=2)
    cov = np.linalg.inv(negH)
    s = np.sqrt(cov[:, 2, 2])
    assert nodes.b.shape == (5, 7, 3) and nodes.start == 2
    np.testing.assert_array_equal(nodes.b[:, :, :2], 0.0)
    np.testing.assert_allclose(nodes.b[:, :, 2], mode[:, 2:3] + s[:, None] * rule.points[:, 0])
    np.testing.assert_allclose(nodes.log_det, np.log(s))
    np.testing.assert_array_equal(nodes.v, nodes.b[:, :, 2:])
    full = place_nodes(mode, negH, gauss_hermite_rule(3, 3))
    np.testing.assert_allclose(full.log_det, 0.5 * np.linalg.slogdet(cov)[1])


def test_quadrature_spec():
    spec = QuadratureSpec("uexact", 15)
    assert spec.uexact and spec.option == "marginal" and spec.dim(2, 1) == 1 and spec.start(2) == 2
    assert spec.rule(2, 1).size == 15
    prod = QuadratureSpec("product", 5, 0.0)
    assert prod.dim(2, 1) == 3 and prod.start(2) == 0 and prod.rule(2, 1).size == 125 and prod.option == "product"
    with pytest.raises(ModelSpecError, match="kind"):
        QuadratureSpec("sparse", 5)
