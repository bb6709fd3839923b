"""Behaviour that must not depend on the version of a dependency (setup.cfg's whole range).

CI runs the suite with the newest releases and with the oldest versions setup.cfg allows
(.ci/oldest-constraints.txt); these tests pin down the places where the library adapts
to the version it finds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mlsml
from mlsml import optimize
from mlsml.profile import profile_ci

# A converged fit has Newton decrement g'(-H)^{-1}g/2 < dtol = 1e-6 (mlsml.optimize), so each
# estimate is within sqrt(2 dtol) = 1.4e-3 standard errors of the exact maximum, and two
# converged fits of the same model within twice that.
TWO_FITS_IN_SE = 2 * np.sqrt(2 * 1e-6)


def test_fit_and_profile_pass_scipy_only_options_it_knows(seed_sim):
    """scipy < 1.12 warned "Unknown solver options: hess_inv0" (and ignored the warm start)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = mlsml.fit("y ~ x", seed_sim, groups="school", scale_formula="~ x")
        profile_ci(res, "mean:x")


def test_bfgs_without_initial_inverse_hessian_reaches_the_same_maximum(exam, monkeypatch):
    """What scipy 1.11 does (BFGS from the identity) gives the fit of scipy >= 1.12."""
    warm = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    monkeypatch.setattr(optimize, "BFGS_HAS_HESS_INV0", False)
    cold = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    assert warm.converged and cold.converged
    assert cold.llf == pytest.approx(warm.llf, abs=2e-6)  # each within dtol = 1e-6 of the maximum
    np.testing.assert_array_less(np.abs(cold.params - warm.params), TWO_FITS_IN_SE * warm.bse)
