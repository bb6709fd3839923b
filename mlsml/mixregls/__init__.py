"""MIXREGLS and MixWILD: their parameterisation, model sequence, report and job files.

MIXREGLS (Hedeker & Nordgren, 2013) and the MIXREGLS part of MixWILD fit the
mixed-effects location scale model with standardised random effects

.. math::

    y_{ij} = x_{ij}'\\mathrm{BETA} + \\exp(s_j'\\mathrm{ALPHA}/2)\\,\\theta_{1j} + e_{ij},
    \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\mathrm{TAU}
        + \\mathrm{LocEff}\\,\\theta_{1j} + \\mathrm{StdDev}\\,\\theta_{2j}.

One module per concept:

- :mod:`mlsml.mixregls.convert` -- our parameters to and from MIXREGLS's
  (:func:`to_mixregls`, :func:`from_mixregls`), with delta-method SEs;
- :mod:`mlsml.mixregls.stages` -- MIXREGLS's sequence of nested models
  (:func:`fit_stages`) and the LR tests between them (:func:`stage_tests`);
- :mod:`mlsml.mixregls.report` -- the MIXREGLS/MIXWILD text report
  (:func:`summarize_mixwild`, ``res.summary(style="mixwild")``);
- :mod:`mlsml.mixregls.deffile` -- reading and checking a job's .def and .dat
  files (:func:`parse_def`, :func:`read_dat`);
- :mod:`mlsml.mixregls.job` -- running a job as it is (:func:`run_job`,
  ``mlsml mixregls JOB.def``).

The names of the first four are imported here. :mod:`~mlsml.mixregls.job`
builds and fits models, so it imports :mod:`mlsml.model`; it is imported on
first use of ``mlsml.mixregls.job`` or of one of its names (PEP 562), which
keeps the report importable from the results without an import cycle.
"""

from __future__ import annotations

import importlib

from .convert import BLOCKS, from_mixregls, to_mixregls
from .deffile import MixreglsJob, parse_def, read_dat, read_regular_file
from .report import MixwildSummary, describe_data, summarize_mixwild
from .stages import STAGE_TITLES, fit_stages, stage_tests

#: Names of :mod:`mlsml.mixregls.job`, imported on first use.
JOB_NAMES = ("JobData", "JobRun", "job_data", "run_job")

__all__ = [
    "BLOCKS",
    "STAGE_TITLES",
    "to_mixregls",
    "from_mixregls",
    "fit_stages",
    "stage_tests",
    "describe_data",
    "summarize_mixwild",
    "MixwildSummary",
    "MixreglsJob",
    "parse_def",
    "read_dat",
    "read_regular_file",
    *JOB_NAMES,
]


def __getattr__(name: str):
    """:mod:`mlsml.mixregls.job` and its names on first access (PEP 562; see the module docstring)."""
    if name == "job" or name in JOB_NAMES:
        job = importlib.import_module(f"{__name__}.job")
        return job if name == "job" else getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, the job runner's included (for tab completion)."""
    return sorted(set(globals()) | set(JOB_NAMES) | {"job"})
