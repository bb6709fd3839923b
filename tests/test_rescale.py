"""The internal standardisation (mlsml.rescale): the maps where the Jacobian loses rank."""

from __future__ import annotations

import warnings

import numpy as np
from conftest import stored_fuzz_case

import mlsml
from mlsml import rescale


def test_solve_falls_back_to_least_squares_when_exactly_singular():
    A = np.diag([2.0, 0.0])
    np.testing.assert_allclose(rescale._solve(A, np.array([4.0, 3.0])), [2.0, 0.0])
    np.testing.assert_allclose(rescale._solve(np.diag([2.0, 4.0]), np.array([4.0, 4.0])), [2.0, 1.0])


def test_a_fit_whose_jacobian_loses_rank_maps_back():
    """Fuzz case 6253197893067880813 (a random slope in small schools): at its end a log-Cholesky
    diagonal underflows and the Jacobian of the map to the standardised scale is singular; with
    numpy 1.24 the fit raised LinAlgError ("Singular matrix") out of mlsml.fit."""
    row, data = stored_fuzz_case(6253197893067880813)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit(data=data, **row["spec"])
    assert np.isfinite(res.llf) and res.llf >= row["reference"] - 1e-3
