r"""Marginal effects of a covariate on the mean, the residual SD or the residual variance.

How much does a student's expected score, or the residual SD around it, change per unit of
a covariate :math:`x`? With :math:`f_i(\theta)` the prediction of row :math:`i` (the
population-level prediction of :mod:`mlsml.predict`, marginal over the school effects, or
the school's own with ``conditional=True``),

.. math::

    \text{mu}:\; f_i = o_i + x_i'\beta, \qquad
    \text{sigma}:\; f_i = E\,\sigma_{ij} = \exp\{\tfrac12 (w_i'\alpha + o^{(s)}_i) + \tfrac18 g_i'\Sigma_{vv} g_i\},
    \qquad \text{variance}:\; f_i = E\,\sigma^2_{ij},

the marginal effect of row :math:`i` is :math:`\partial f_i / \partial x`, taken through
every column of the designs that depends on :math:`x` (polynomials, interactions, splines:
the designs are evaluated at :math:`x \pm h` by the fit's own formulas, a central difference
with :math:`h` = :data:`REL_STEP` times the SD of :math:`x`). ``at="overall"`` averages the
rows of the fit (the average marginal effect, statsmodels' ``get_margeff(at="overall")``;
weighted by the rows' population weights :math:`w_{i|j} W_j` with sampling weights),
``at="mean"`` takes one row at the means of the numeric columns, a DataFrame gives one effect
per row. The standard errors are the delta method's with the fit's covariance of
:math:`\theta` (cluster-robust when ``res.cov_type == "robust"``, :mod:`mlsml.robust`), as brms
users get intervals for ``dpar = "sigma"``; on the log-variance scale the effect of ``x`` is
simply its ``scale:`` coefficient.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._lazy import LazyModule
from .errors import DataError, ModelSpecError
from .predict import _central_jacobian, _conditional_fixed_nodes, _population, _posterior, prediction_rows
from .validate import describe_value

stats = LazyModule("scipy.stats")  # imported on first use (import time)

#: The distributional parameters (brms's ``dpar`` names) and the prediction kind of each.
DPARS = {"mu": "mean", "sigma": "sd", "variance": "variance"}

#: The step of the central difference in ``x``, relative to its standard deviation (or to
#: ``max(|x|, 1)`` when it does not vary): truncation error ``O(h^2)``, about ``1e-8``.
REL_STEP = 1e-4


def _rows_frame(res, at) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None]:
    """The rows at which the effects are taken, their offset of the predicted part, and their averaging weights."""
    spec = res.model.formula_spec
    design = res.model.design
    if isinstance(at, pd.DataFrame) or isinstance(at, dict):
        return pd.DataFrame(at), None, None
    if spec.frame is None:
        raise DataError("marginal effects at the fitted rows need the fitted data, which did not travel with this result")
    inv = np.argsort(design.order)
    frame = spec.frame.copy()
    weights = design.info.get("row_weights")
    weights = None if weights is None else np.asarray(weights)[inv]
    if at == "overall":
        return frame, inv, weights
    if at == "mean":
        row = frame.iloc[[0]].copy()
        for c in frame.columns:
            if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) and c != spec.groups:
                row[c] = float(np.average(frame[c].to_numpy(dtype=float), weights=weights))
        return row, inv, weights
    raise ModelSpecError(f"at must be 'overall', 'mean' or a DataFrame of rows, not {describe_value(at)}")


def marginal_effects(
    res, variable: str, dpar: str = "sigma", at="overall", conditional: bool = False, alpha: float = 0.05
) -> pd.DataFrame:
    """Marginal effects of ``variable`` with delta-method standard errors (module docstring).

    Parameters
    ----------
    res : MELSMResults
    variable : str
        A numeric column used by the formulas.
    dpar : {"sigma", "mu", "variance"}
        The residual SD (brms's ``dpar = "sigma"``), the mean or the residual variance.
    at : "overall", "mean" or DataFrame
        Averaged over the fitted rows, at the covariate means, or at each given row.
    conditional : bool
        Predictions of each row's own school (its posterior) instead of the population's;
        rows need the grouping column.
    alpha : float
        ``1 - alpha`` intervals.

    Returns
    -------
    pandas.DataFrame
        ``dydx``, ``std err``, ``z``, ``P>|z|``, ``lower``, ``upper``; one row (``at``
        "overall"/"mean", indexed by the variable) or one per given row.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> me = res.marginal_effects("x", dpar="sigma")
    >>> list(me.columns), me.index[0]
    (['dydx', 'std err', 'z', 'P>|z|', 'lower', 'upper'], 'x')
    >>> bool(abs(res.marginal_effects("x", dpar="mu")["dydx"].iloc[0] - res.params["mean:x"]) < 1e-6)
    True
    """
    if dpar not in DPARS:
        raise ModelSpecError(f"dpar must be one of {list(DPARS)}, not {describe_value(dpar)}")
    if not 0 < alpha < 1:
        raise ModelSpecError(f"alpha must be between 0 and 1, not {describe_value(alpha)}")
    kind = DPARS[dpar]
    design = res.model.design
    frame, inv, weights = _rows_frame(res, at)
    if variable not in frame.columns:
        raise ModelSpecError(f"variable {variable!r} is not a column the formulas use (columns: {', '.join(map(str, frame.columns))})")
    xs = frame[variable]
    if not pd.api.types.is_numeric_dtype(xs) or pd.api.types.is_bool_dtype(xs):
        raise DataError(f"marginal effects need a numeric variable; {variable!r} has dtype {xs.dtype} (compare predictions instead)")
    x = xs.to_numpy(dtype=float)
    sd = float(np.std(x))
    h = REL_STEP * (sd if sd > 0 else max(float(np.max(np.abs(x))), 1.0))
    off = None
    source = design.offset if kind == "mean" else design.scale_offset
    if inv is not None and source is not None:  # fitted rows: the design's offsets, in the caller's order
        caller = np.asarray(source)[inv]
        off = caller if at == "overall" else np.array([np.average(caller, weights=weights)])
    rows = [prediction_rows(res, frame.assign(**{variable: x + s * h}), kind, conditional, offset=off) for s in (1.0, -1.0)]
    post = _posterior(res) if conditional and rows[0].known.any() else None

    def effects(theta):
        if post is None:
            up, down = (_population(theta, res.layout, r, kind) for r in rows)
        else:
            up, down = (_conditional_fixed_nodes(theta, post.likelihood, post.nodes, r, kind) for r in rows)
        d = (up - down) / (2.0 * h)
        if isinstance(at, str):
            return np.array([np.average(d, weights=weights if at == "overall" else None)])
        return d

    theta = np.asarray(res.theta, dtype=float)
    est = effects(theta)
    cov = res.cov_theta()
    if cov is None:
        se = np.full(est.shape, np.nan)
    else:
        jac = _central_jacobian(effects, theta)
        se = np.sqrt(np.clip(np.einsum("im,mn,in->i", jac, cov, jac), 0.0, None))
    z = est / se
    q = float(stats.norm.ppf(1 - alpha / 2))
    index = pd.Index([variable]) if isinstance(at, str) else frame.index
    return pd.DataFrame(
        {"dydx": est, "std err": se, "z": z, "P>|z|": 2 * stats.norm.sf(np.abs(z)), "lower": est - q * se, "upper": est + q * se},
        index=index,
    ).rename_axis(None)
