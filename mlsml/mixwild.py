"""``mlsml.mixwild``: the MIXREGLS/MIXWILD names under their first home (an alias of :mod:`mlsml.mixregls`).

The MIXREGLS layer lives in the package :mod:`mlsml.mixregls` (conversion,
staged fits, report, job files, job runner). This module re-exports its
public names so that code written for earlier versions keeps working::

    from mlsml.mixwild import to_mixregls   # the same function as mlsml.mixregls.to_mixregls

``MIXREGLS's ALPHA = ln var(u0)`` (or our ``bsvar:`` terms with
``bs_formula``), its TAU is our ``alpha`` (``scale:``), and

.. math::

    \\mathrm{LocEff} = \\operatorname{cov}(u_0, v) / \\operatorname{sd}(u_0), \\qquad
    \\mathrm{StdDev} = \\sqrt{\\operatorname{var}(v) - \\mathrm{LocEff}^2}

(see :mod:`mlsml.mixregls.convert`). New code should import from
:mod:`mlsml.mixregls`.
"""

from __future__ import annotations

from .mixregls import (
    BLOCKS,
    STAGE_TITLES,
    MixwildSummary,
    describe_data,
    fit_stages,
    from_mixregls,
    stage_tests,
    summarize_mixwild,
    to_mixregls,
)

__all__ = [
    "BLOCKS",
    "STAGE_TITLES",
    "MixwildSummary",
    "describe_data",
    "fit_stages",
    "from_mixregls",
    "stage_tests",
    "summarize_mixwild",
    "to_mixregls",
]
