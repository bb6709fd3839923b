"""The paper's Model 4 quantities: how much of a school's variance is due to a random slope.

With a random slope ``u1_j`` on ``x`` in the mean and a random scale, the
variance of student progress in school ``j`` over a reference distribution of
``x`` with mean ``xbar`` and variance ``s2x`` is (Leckie et al., Section 6.4)::

    u1_j^2 s2x + sigma2_e,j,      sigma2_e,j = exp(w(xbar)' alpha + g(xbar)' v_j)

where ``w(xbar)`` is the residual-variance design at ``x = xbar`` (``a0 + a1 xbar``
for Model 4) and ``g(xbar)' v_j`` is ``v_j`` (or ``v0_j + v1_j xbar`` with a random
slope in the log variance). The first term is the variance attributable to the
school-by-``x`` interaction, the second all remaining variance. The paper's
defaults are ``xbar`` = the mean of the school means of ``x`` and ``s2x`` = the mean
of the school variances of ``x``.

School effects are replaced by their posterior (empirical-Bayes) means, computed
on the adapted quadrature nodes: with ``h_jk`` the log joint density at node
``b_jk`` and ``w_k`` the rule's weights, ``E(b_j | y) = sum_k p_jk b_jk`` with
``p_jk = exp(h_jk + log w_k) / sum_k' exp(h_jk' + log w_k')``. The posterior
expectations of the two components themselves (``E(u1_j^2 | y) s2x`` and
``E(sigma2_e,j | y)``) are reported alongside.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import ModelSpecError
from .predict import fit_scale_posterior


def _posterior_weights(res):
    """Adapted nodes and normalised posterior weights ``p_jk`` (J, K) at the estimates.

    The weights are those of :meth:`mlsml.likelihood.Likelihood.posterior_weights` (shared with
    ``res.random_effects``), on the fit's product rule (the product default when the
    fit integrated the mean effects exactly: :meth:`mlsml.likelihood.Likelihood.as_product`).
    """
    post = fit_scale_posterior(res, res.likelihood.as_product())  # adapted on the fit's standardised scale
    return post.nodes, post.weights


def slope_variance_components(
    res, x: str | None = None, mean: float | None = None, var: float | None = None, at: dict | None = None
) -> pd.DataFrame:
    """Per-school variance attributable to a random slope, and the remaining variance.

    Parameters
    ----------
    res : MELSMResults
        A fit with a random slope in the mean (``re_formula="~ x"``) and, for the
        second component to vary by school, a random scale.
    x : str, optional
        The random-slope term (a column of ``re_formula``); default the first
        non-intercept term.
    mean, var : float, optional
        Mean ``xbar`` and variance ``s2x`` of the reference distribution of ``x``.
        Defaults (the paper's): the mean of the school means of ``x`` and the mean of
        the school (population) variances of ``x``, taken from the random-effects
        design.
    at : dict, optional
        Values of any other terms of the residual-variance design (besides
        ``Intercept`` and ``x``) at which ``sigma2_e,j`` is evaluated.

    Returns
    -------
    pandas.DataFrame
        Indexed by group label, columns ``n``, ``u1`` (posterior mean of the slope
        effect), ``v`` (posterior mean of the log-variance effect at ``xbar``),
        ``interaction_var = u1^2 s2x``, ``resid_var = exp(w(xbar)'alpha + v)``,
        ``total_var`` (their sum), and the posterior expectations
        ``interaction_var_pm = E(u1_j^2 | y) s2x`` and ``resid_var_pm``. The
        reference ``xbar`` and ``s2x`` are in ``.attrs``.
    """
    design = res.model.design
    lay = design.layout
    re_terms = list(design.info.get("re_terms", ()))
    slope_terms = [t for t in re_terms if t != "Intercept"]
    if not slope_terms:
        raise ModelSpecError("the model has no random slope in the mean (re_formula has no term besides 1)")
    x = x or slope_terms[0]
    if x not in re_terms:
        raise ModelSpecError(f"{x!r} is not a random-slope term; the random-effects terms are {re_terms}")
    ix = re_terms.index(x)
    zx = design.Z[:, ix]
    st, n = design.starts, design.counts
    smean = np.add.reduceat(zx, st) / n
    svar = np.add.reduceat((zx - smean[design.group]) ** 2, st) / n
    xbar = float(np.mean(smean)) if mean is None else float(mean)
    s2x = float(np.mean(svar)) if var is None else float(var)
    if s2x < 0:
        raise ModelSpecError(f"the reference variance of {x!r} must be >= 0, got {s2x}")
    values = {"Intercept": 1.0, x: xbar, **(at or {})}

    def row(terms, what):
        missing = [t for t in terms if t not in values]
        if missing:
            raise ModelSpecError(f"give values for the {what} terms {missing} in `at`")
        return np.array([values[t] for t in terms], dtype=float)

    w = row(lay.scale_terms, "residual-variance")
    eta = float(w @ res.fe_scale.to_numpy())
    nodes, p = _posterior_weights(res)
    b = nodes.b
    u1 = b[:, :, ix]
    if lay.n_v == 0:
        lv = np.full(u1.shape, eta)
    elif lay.scale_re_terms:
        g = row(lay.scale_re_terms, "scale random-effects")
        lv = eta + np.einsum("jkv,v->jk", b[:, :, lay.q :], g)
    else:
        lv = eta + b[:, :, lay.q]
    u1_pm = np.sum(p * u1, axis=1)
    v_pm = np.sum(p * (lv - eta), axis=1)
    out = pd.DataFrame(
        {
            "n": n,
            "u1": u1_pm,
            "v": v_pm,
            "interaction_var": u1_pm**2 * s2x,
            "resid_var": np.exp(eta + v_pm),
            "interaction_var_pm": np.sum(p * u1**2, axis=1) * s2x,
            "resid_var_pm": np.sum(p * np.exp(lv), axis=1),
        },
        index=pd.Index(design.group_labels, name=res.model.formula_spec.groups),
    )
    out["total_var"] = out["interaction_var"] + out["resid_var"]
    out.attrs.update({"x": x, "mean": xbar, "var": s2x})
    return out


def idr(values, level: float = 0.8) -> tuple[float, float]:
    """Inter-decile (by default) range of ``values`` across schools: the 10th and 90th percentiles."""
    lo = (1 - level) / 2
    q = np.quantile(np.asarray(values, float), [lo, 1 - lo])
    return float(q[0]), float(q[1])
