r"""mlsml's own keywords in a MIXREGLS definition file: weights and the type of standard errors.

MIXREGLS and MixWILD have no weights and only model-based standard errors, so their .def
files have no field for them. mlsml reads a few extra lines of the form ``NAME = value``
placed **at the end of the file**, after the last record MIXREGLS reads (MIXREGLS stops
reading there, so the same file still runs in MIXREGLS, unweighted):

=====================  ======================================================================
keyword                meaning
=====================  ======================================================================
``WEIGHT1 = c``        column number (1..NVAR) of the level-1 (observation) weights
                       :math:`w_{i|j}`, conditional on the cluster (``weights=`` of
                       :func:`mlsml.fit`)
``WEIGHT2 = c``        column number of the level-2 (cluster) weights :math:`W_j`, constant
                       within each cluster (``group_weights=``)
``WEIGHTKIND = k``     ``sampling`` (the default: pseudo-maximum likelihood) or ``frequency``
                       (replicate counts: the fit of the replicated data set)
``WEIGHTSCALE = s``    scaling of sampling weights within each cluster: ``size`` (the
                       default), ``effective`` or ``none`` (``weights_scale=``)
``COVTYPE = t``        ``robust`` (cluster-robust sandwich over the clusters; the default with
                       sampling weights) or ``nonrobust`` (inverse observed information)
=====================  ======================================================================

The pseudo-log-likelihood with sampling weights is

.. math::

    \ell_w(\theta) = \sum_j W_j \log \int \exp\Big\{\sum_i w^*_{i|j}
        \log f(y_{ij} \mid b)\Big\}\, \phi(b; 0, \Sigma_j)\, db

with :math:`w^*_{i|j}` the scaled level-1 weights (:mod:`mlsml.weights`), and the robust
covariance is :math:`A B A` (:mod:`mlsml.robust`). Names and values are case-insensitive;
text after ``!`` (a Fortran comment) is ignored; a blank line or any other line (MixWILD's
second-stage records) is left to the positional reader. A keyword that is unknown, repeated,
has a bad value, or (``WEIGHTKIND``, ``WEIGHTSCALE``) is given without a weight column raises
:class:`~mlsml.errors.ModelSpecError` naming the line. A weight column is a used variable:
rows where it equals ``YMISS`` are dropped like the others. Example (the last lines of a job)::

    WEIGHT1 = 5        ! student weight given the school
    WEIGHT2 = 6        ! school weight
    WEIGHTSCALE = effective
"""

from __future__ import annotations

import re

from ..errors import ModelSpecError
from ..robust import COV_TYPES
from ..weights import WEIGHT_KINDS, WEIGHT_SCALES

#: The keywords and what each holds (column keywords take a column number, the others one of a set of words).
KEYWORDS = {
    "WEIGHT1": "column of the level-1 weights",
    "WEIGHT2": "column of the level-2 (cluster) weights",
    "WEIGHTKIND": "kind of weights: " + " | ".join(WEIGHT_KINDS),
    "WEIGHTSCALE": "scaling of level-1 sampling weights: " + " | ".join(WEIGHT_SCALES),
    "COVTYPE": "standard errors: " + " | ".join(COV_TYPES),
}
_CHOICES = {"WEIGHTKIND": WEIGHT_KINDS, "WEIGHTSCALE": WEIGHT_SCALES, "COVTYPE": COV_TYPES}
_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_keywords(lines: list[str], first: int, where: str, nvar: int) -> dict[str, object]:
    """The keyword lines (``NAME = value``) among ``lines[first:]``, checked (module docstring).

    Parameters
    ----------
    lines : list of str
        The definition file's lines.
    first : int
        Index of the first line after the records MIXREGLS reads.
    where : str
        The file's name, for messages.
    nvar : int
        ``NVAR``, the bound of the column numbers.

    Returns
    -------
    dict
        Upper-case keyword to value: ``int`` column numbers for ``WEIGHT1``/``WEIGHT2``,
        lower-case words for the others; only the keywords present.

    Raises
    ------
    ModelSpecError
        Naming the line, the keyword and the value at fault.

    Examples
    --------
    >>> read_keywords(["3", "WEIGHT1 = 4  ! w", "covtype = Robust"], 1, "job.def", nvar=5)
    {'WEIGHT1': 4, 'COVTYPE': 'robust'}
    """
    out: dict[str, object] = {}
    for i in range(first, len(lines)):
        m = _LINE.match(lines[i].split("!", 1)[0])
        if m is None:
            continue
        name, value = m.group(1).upper(), m.group(2).strip().strip("'\"")
        at = f"{where}, line {i + 1}"
        if name not in KEYWORDS:
            known = "; ".join(f"{k} ({v})" for k, v in KEYWORDS.items())
            raise ModelSpecError(f"{at}: unknown keyword {m.group(1)!r}; mlsml's .def keywords are {known}")
        if name in out:
            raise ModelSpecError(f"{at}: keyword {name} is given twice")
        if name in _CHOICES:
            if value.lower() not in _CHOICES[name]:
                raise ModelSpecError(f"{at}: {name} = {value!r} must be one of {', '.join(_CHOICES[name])}")
            out[name] = value.lower()
        else:
            if not re.fullmatch(r"\d{1,9}", value) or not 1 <= int(value) <= nvar:
                raise ModelSpecError(f"{at}: {name} = {value!r} must be a column number from 1 to NVAR = {nvar}")
            out[name] = int(value)
    if ("WEIGHTKIND" in out or "WEIGHTSCALE" in out) and not ("WEIGHT1" in out or "WEIGHT2" in out):
        given = " and ".join(k for k in ("WEIGHTKIND", "WEIGHTSCALE") if k in out)
        raise ModelSpecError(f"{where}: {given} given without a weight column (WEIGHT1 or WEIGHT2)")
    if "WEIGHTSCALE" in out and "WEIGHT1" not in out:
        raise ModelSpecError(f"{where}: WEIGHTSCALE scales level-1 weights, but no WEIGHT1 column is given")
    return out


def fit_arguments(keywords: dict[str, object], names: dict[str, str]) -> dict[str, object]:
    """The keywords as arguments of :func:`mlsml.fit` (``names``: weight keyword to data column).

    Examples
    --------
    >>> fit_arguments({"WEIGHT2": 6, "COVTYPE": "nonrobust"}, {"WEIGHT2": "weight2"})
    {'group_weights': 'weight2', 'cov_type': 'nonrobust'}
    """
    out: dict[str, object] = {}
    if "WEIGHT1" in keywords:
        out["weights"] = names["WEIGHT1"]
    if "WEIGHT2" in keywords:
        out["group_weights"] = names["WEIGHT2"]
    if "WEIGHTKIND" in keywords:
        out["weights_kind"] = keywords["WEIGHTKIND"]
    if "WEIGHTSCALE" in keywords:
        out["weights_scale"] = keywords["WEIGHTSCALE"]
    if "COVTYPE" in keywords:
        out["cov_type"] = keywords["COVTYPE"]
    return out
