"""Small real data sets shipped with mlsml, for the examples and the documentation.

The files live in ``mlsml/datasets/data/`` inside the installed package (their
provenance is in ``data/README.md`` next to them), so every documented example
runs on a fresh install, without a checkout of the repository.

- :func:`exam` -- GCSE exam scores of 4,059 students in 65 inner-London schools
  (Goldstein et al. 1993): students in schools, for the seed paper's models.
- :func:`riesby` -- Hamilton depression scores of 66 patients over 6 weeks
  (Reisby et al. 1977): the MIXREGLS example of Hedeker & Nordgren (2013).

Each call reads the file afresh and returns a new DataFrame (modifying it
never changes what the next call returns):

>>> import mlsml.datasets
>>> df = mlsml.datasets.exam()
>>> df.shape, int(df["school"].nunique())
((4059, 10), 65)
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["exam", "riesby", "DATA_FILES"]

#: File of each data set, inside ``mlsml/datasets/data/``.
DATA_FILES = {"exam": "exam.csv", "riesby": "riesby.csv"}

#: Column types of the exam data (the text columns are read as strings).
EXAM_NUMERIC = {"school": "int64", "student": "int64", "normexam": "float64", "standLRT": "float64", "schavg": "float64"}

#: Column types of the Riesby data (all integers).
RIESBY_DTYPES = {"id": "int64", "hamdep": "int64", "week": "int64", "endog": "int64", "endweek": "int64"}


def _read(name: str, dtype: dict[str, str]) -> pd.DataFrame:
    """Read the shipped CSV file of data set ``name`` (works from a wheel or a zip too)."""
    with resources.files(__name__).joinpath("data", DATA_FILES[name]).open("rb") as fh:
        return pd.read_csv(fh, dtype=dtype)


def exam() -> pd.DataFrame:
    """GCSE exam scores of 4,059 students in 65 inner-London schools.

    The classic two-level data set of Goldstein et al. (1993), also distributed
    with MLwiN (as ``tutorial``) and with the R package mlmRev (as ``Exam``):
    the outcome ``normexam`` is the normalised exam score at age 16, the intake
    covariate ``standLRT`` the standardised London Reading Test score at age 11.
    Rows are sorted by school, in the original order within each school.

    Returns
    -------
    pandas.DataFrame
        4,059 rows (students), 10 columns:

        ========== ==========================================================
        column     meaning
        ========== ==========================================================
        school     school id, integer 1 to 65 (2 to 198 students a school)
        student    student id within school (not unique across schools;
                   4 (school, student) pairs are repeated in the original)
        normexam   normalised GCSE exam score (the outcome, ``y``)
        standLRT   standardised London Reading Test score at intake (``x``)
        sex        ``"F"`` / ``"M"``
        schgend    school gender: ``"mixed"``, ``"boys"`` or ``"girls"``
        schavg     school average of the intake LRT score
        vr         verbal reasoning band at intake: ``"bottom 25%"``,
                   ``"mid 50%"``, ``"top 25%"``
        intake     intake band: ``"bottom 25%"``, ``"mid 50%"``, ``"top 25%"``
        type       school type: ``"Mxd"`` (mixed) or ``"Sngl"`` (single sex)
        ========== ==========================================================

        ``school`` and ``student`` are integers, ``normexam``, ``standLRT`` and
        ``schavg`` floats, the other columns text.

    Notes
    -----
    Source: R package mlmRev 1.0-8, data set ``Exam``
    (``data(Exam, package = "mlmRev")``), exported with every original column;
    ``school`` and ``student`` converted from factors to integers (their labels
    were already those integers). Originally from the Centre for Multilevel
    Modelling, University of Bristol (the MLwiN tutorial data).

    Licence: mlmRev is distributed under the GNU GPL (version 2 or later), and
    the data are also part of the MLwiN teaching material. mlsml's BSD licence
    covers its code, not these data, which are included unchanged (apart from
    the integer recoding) as a teaching example. If you publish results from
    them, cite Goldstein et al. (1993); if you redistribute the file, keep this
    note with it (``mlsml/datasets/data/README.md``).

    References
    ----------
    Goldstein, H., Rasbash, J., Yang, M., Woodhouse, G., Pan, H., Nuttall, D.
    and Thomas, S. (1993). A multilevel analysis of school examination results.
    *Oxford Review of Education* 19(4), 425-433.

    Examples
    --------
    >>> import mlsml
    >>> import mlsml.datasets
    >>> df = mlsml.datasets.exam()
    >>> list(df.columns)
    ['school', 'student', 'normexam', 'standLRT', 'sex', 'schgend', 'schavg', 'vr', 'intake', 'type']
    >>> res = mlsml.fit("normexam ~ standLRT", df, groups="school", scale_formula="~ standLRT")
    >>> res.nobs, res.ngroups
    (4059, 65)
    """
    return _read("exam", EXAM_NUMERIC)


def riesby() -> pd.DataFrame:
    """Hamilton depression scores of 66 patients over six weeks (Reisby et al. 1977).

    The "RIESBY.DAT" example of Hedeker & Gibbons (2006) and Example 1 of the
    MIXREGLS paper (Hedeker & Nordgren 2013): longitudinal data with few
    observations per cluster, where the between-subject variance depends on a
    subject-level covariate (``endog``), i.e. a model with ``bs_formula``.

    Returns
    -------
    pandas.DataFrame
        375 rows (observations; the 21 visits with a missing score are already
        removed), 5 integer columns:

        ========== ==========================================================
        column     meaning
        ========== ==========================================================
        id         patient id (101 to 610); each patient's rows are contiguous
                   but the ids are not sorted
        hamdep     Hamilton Depression Rating Scale score (the outcome)
        week       week of the study, 0 to 5 (weeks 0-1 placebo, 2-5 imipramine)
        endog      1 = endogenous depression, 0 = reactive (patient-level)
        endweek    ``endog * week``
        ========== ==========================================================

    Notes
    -----
    Source: the R package MixLS (github.com/Jiananrui/MixLS, MIT licence), file
    ``data/riesby.rda``, converted to CSV unchanged (row order kept). The data
    are the teaching example distributed with MIXREGLS and with Hedeker &
    Gibbons's book. If you publish results from them, cite Reisby et al. (1977)
    and Hedeker & Nordgren (2013).

    References
    ----------
    Reisby, N., Gram, L. F., Bech, P. et al. (1977). Imipramine: clinical effects
    and pharmacokinetic variability. *Psychopharmacology* 54, 263-272.

    Hedeker, D. and Nordgren, R. (2013). MIXREGLS: a program for mixed-effects
    location scale analysis. *Journal of Statistical Software* 52(12).

    Examples
    --------
    >>> import mlsml.datasets
    >>> df = mlsml.datasets.riesby()
    >>> df.shape, int(df["id"].nunique())
    ((375, 5), 66)
    """
    return _read("riesby", RIESBY_DTYPES)
