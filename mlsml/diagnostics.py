"""Model diagnostics computed from a fit (numbers, not figures).

- :func:`standardised_residuals`: the students' residuals from their school's
  predicted mean, divided by their predicted residual standard deviation.

The figures built on them (histograms with normal curves) are in
:mod:`mlsml.plots`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .predict import PosteriorGrid, posterior_moments
from .schools import posterior_nagq


def standardised_residuals(res) -> pd.Series:
    r"""Standardised student residuals.

    For student :math:`i` of school :math:`j`,

    .. math::

        r_{ij} = \frac{y_{ij} - x_{ij}'\hat\beta - z_{ij}'\,E(u_j \mid y)}
                      {\sqrt{\exp(w_{ij}'\hat\alpha)\, E(\exp v_j \mid y)}}

    with the posterior expectations of the school effects at the estimates
    (without a random scale, :math:`E(\exp v_j \mid y) = 1`). Under the model
    they are approximately standard normal (Figures S4-S6 of the paper).

    Parameters
    ----------
    res : MELSMResults
        A fitted model.

    Returns
    -------
    pandas.Series
        Named ``"std_resid"``, in the caller's row order, indexed by the row
        labels of the data used (rows removed for missing values are absent).

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.diagnostics import standardised_residuals
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> r = standardised_residuals(res)
    >>> r.name, len(r) == len(df), bool(abs(r.mean()) < 0.1 and abs(r.std() - 1) < 0.1)
    ('std_resid', True, True)
    """
    design = res.model.design
    lay = design.layout
    q = lay.q
    mean, C = posterior_moments(res.theta, design, posterior_nagq(res), res.prune)
    g = design.group
    fit = design.X @ res.fe_mean.to_numpy()
    if q:
        fit = fit + np.einsum("iq,iq->i", design.Z, mean[g, :q])
    var = np.exp(design.W @ res.fe_scale.to_numpy())
    if lay.random_scale:
        grid = PosteriorGrid.build(res.theta, design, mean[:, q], np.sqrt(C[:, q, q]))
        var = var * grid.mean_exp_v()[g]
    r = (design.y - fit) / np.sqrt(var)
    out = np.empty_like(r)
    out[design.order] = r
    return pd.Series(out, index=design.row_labels, name="std_resid")
