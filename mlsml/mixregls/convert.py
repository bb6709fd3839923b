"""Conversion between MIXREGLS's parameters and mlsml's, with delta-method standard errors.

MIXREGLS (Hedeker & Nordgren, 2013) writes the random-intercept location
scale model with standardised, independent random effects
``theta1_j, theta2_j ~ N(0, 1)``:

.. math::

    y_{ij} = x_{ij}'\\mathrm{BETA} + \\exp(s_j'\\mathrm{ALPHA}/2)\\,\\theta_{1j} + e_{ij},
    \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\mathrm{TAU}
        + \\mathrm{LocEff}\\,\\theta_{1j} + \\mathrm{StdDev}\\,\\theta_{2j}.

So MIXREGLS's ALPHA is the log **between**-cluster variance function and its
TAU is our ``alpha`` (the **within**-cluster variance function). With
``u_j = sd(u0_j) theta1_j`` and ``v_j = LocEff theta1_j + StdDev theta2_j``:

* without BS-variance covariates (``s_j = 1``)

  .. math::

      \\mathrm{ALPHA} = \\ln \\sigma^2_u,\\quad
      \\mathrm{LocEff} = \\sigma_{uv} / \\sigma_u,\\quad
      \\mathrm{StdDev} = \\sqrt{\\sigma^2_v - \\mathrm{LocEff}^2}

  (``[[sigma_u, 0], [LocEff, StdDev]]`` is the lower Cholesky factor of
  ``Cov(u, v)``), and back ``sigma2_u = exp(ALPHA)``,
  ``sigma2_v = LocEff^2 + StdDev^2``, ``sigma_uv = exp(ALPHA/2) LocEff``;

* with ``bs_formula`` (``ln var(u0_j) = s_j' tau``, parameters ``bsvar:<term>``)
  ALPHA is ``tau`` term by term, and since our ``cov(u0,v)`` is already the
  covariance of ``v`` with the *standardised* intercept effect
  (``Sigma0 = Cov(theta1, v)``, see :mod:`mlsml.params`):

  .. math::

      \\mathrm{ALPHA} = \\tau,\\quad
      \\mathrm{LocEff} = \\Sigma_{0,uv},\\quad
      \\mathrm{StdDev} = \\sqrt{\\sigma^2_v - \\mathrm{LocEff}^2}.

Standard errors of the converted quantities are by the delta method,
``J (-H)^{-1} J'``, with ``H`` the observed-information Hessian on the
optimiser scale (``res.hessian``) and ``J`` the autograd Jacobian of the map
from ``res.theta``.
"""

from __future__ import annotations

from collections.abc import Mapping

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd

from .._lazy import LazyModule
from ..errors import ModelSpecError
from ..params import QUAD_NAME

stats = LazyModule("scipy.stats")

#: Block names of MIXREGLS's parameters (as in its report).
BLOCKS = ("BETA", "ALPHA", "TAU", "SCALE_SD", "LOC_EFF", "QUAD_LOC")

#: The term names MIXREGLS prints for the random-scale parameters (``Quad Loc``: NCOV = 2).
TERMS = {"SCALE_SD": "Std Dev", "LOC_EFF": "Loc  Eff", "QUAD_LOC": "Quad Loc"}

#: The key of the BS log variance of a model without BS covariates in the MIXREGLS reference JSONs.
LN_SIGMA2_U = "ln_sigma2_u"


def is_mixregls_layout(res) -> bool:
    """Whether ``res`` (results or model) has MIXREGLS's random effects.

    One school effect in the mean, a random intercept, and at most the random
    scale intercept ``v`` in the log WS variance (MIXREGLS has no random slopes
    there). Otherwise MIXREGMLS's random-slope layout applies (see
    :mod:`mlsml.mixregls.report`).
    """
    model = getattr(res, "model", res)
    lay = model.layout
    return lay.q == 1 and not lay.scale_re_terms and tuple(model.design.info.get("re_terms", ())) == ("Intercept",)


def check_mixregls_layout(res) -> None:
    """Raise :class:`~mlsml.errors.ModelSpecError` unless ``res`` is a MIXREGLS model (see :func:`is_mixregls_layout`)."""
    lay = res.layout
    re_terms = tuple(res.model.design.info.get("re_terms", ()))
    if lay.q != 1 or re_terms != ("Intercept",):
        raise ModelSpecError(
            "MIXREGLS's parameterisation needs exactly one school effect in the mean, a random intercept "
            f"(re_formula='~ 1'); this model has random effects on {list(re_terms)}"
        )
    if lay.scale_re_terms:
        raise ModelSpecError(
            "MIXREGLS's parameterisation has one random scale effect (the intercept v); this model has random "
            f"effects on {list(lay.scale_re_terms)} in the WS variance (scale_re_formula): use the natural-scale "
            "parameters (res.params) instead"
        )


def mixregls_vector(theta, lay):
    """``[BETA, ALPHA, TAU, (StdDev, LocEff)]`` from the optimiser-scale ``theta`` (autograd-safe).

    Without ``bs_terms`` ALPHA is ``ln var(u0)``; with them it is ``tau`` and the
    Cholesky factor is that of ``Sigma0`` (``Sigma0[0, 0] = 1``), so the same
    formulas give LocEff and StdDev.
    """
    if lay.bs_terms:
        beta, alpha, tau, L = lay.split_bs(theta)
        S = anp.dot(L, L.T)
        alpha_block = tau
    else:
        beta, alpha, L = lay.split(theta)
        S = anp.dot(L, L.T)
        alpha_block = anp.reshape(anp.log(S[0, 0]), (1,))
    parts = [beta, alpha_block, alpha]
    if lay.random_scale:
        loc = S[0, 1] / anp.sqrt(S[0, 0])
        sd = anp.sqrt(S[1, 1] - loc**2)
        parts.append(anp.reshape(sd, (1,)))
        if lay.association != "none":  # NCOV = 0: no Loc Eff
            parts.append(anp.reshape(loc, (1,)))
        if lay.quad_assoc:
            parts.append(anp.reshape(lay.quad(theta), (1,)))
    return anp.concatenate(parts)


def mixregls_index(lay) -> tuple[list[str], list[str], list[str]]:
    """Blocks, terms and reference keys of :func:`mixregls_vector`'s entries."""
    alpha_terms = list(lay.bs_terms) if lay.bs_terms else ["Intercept"]
    blocks = ["BETA"] * lay.p + ["ALPHA"] * len(alpha_terms) + ["TAU"] * lay.k
    terms = list(lay.mean_terms) + alpha_terms + list(lay.scale_terms)
    ref = [f"beta_{t}" for t in lay.mean_terms]
    ref += [f"{LN_SIGMA2_U}_{t}" for t in alpha_terms] if lay.bs_terms else [LN_SIGMA2_U]
    ref += [f"alpha_{t}" for t in lay.scale_terms]
    if lay.random_scale:
        extra = ["SCALE_SD"] + (["LOC_EFF"] if lay.association != "none" else []) + (["QUAD_LOC"] if lay.quad_assoc else [])
        keys = {"SCALE_SD": "tau_scale", "LOC_EFF": "tau_loc", "QUAD_LOC": "tau_quad"}
        blocks += extra
        terms += [TERMS[b] for b in extra]
        ref += [keys[b] for b in extra]
    return blocks, terms, ref


def to_mixregls(res) -> pd.DataFrame:
    """The estimates of ``res`` in MIXREGLS's parameterisation, with delta-method SEs.

    Parameters
    ----------
    res : MELSMResults
        A fit with a random intercept only in the mean (``re_formula="~ 1"``),
        with or without the random scale ``v`` and with or without a BS variance
        function (``bs_formula``).

    Returns
    -------
    pandas.DataFrame
        Indexed by ``"<BLOCK>:<term>"`` in MIXREGLS's print order (BETA, ALPHA,
        TAU, Std Dev, Loc Eff), with columns ``block`` (one of :data:`BLOCKS`),
        ``term``, ``estimate``, ``std err``, ``z``, ``P>|z|`` and ``ref_key``
        (the names used by the ``raw_parameters`` of the MIXREGLS reference
        JSONs: ``beta_<term>``, ``ln_sigma2_u`` (``ln_sigma2_u_<term>`` for the
        terms of ``bs_formula``), ``alpha_<term>``, ``tau_scale``, ``tau_loc``).
        ``ALPHA = ln var(u0)``, or ``bsvar:<term>`` with ``bs_formula``;
        ``TAU`` = our ``alpha``; ``LocEff = cov(u0,v)/sd(u0)`` (absent with
        ``association="none"``, MIXREGLS ``NCOV = 0``);
        ``StdDev = sqrt(var(v) - LocEff^2)``; ``Quad Loc`` (``QUAD_LOC``, ref key
        ``tau_quad``) = ``quad(u0,v)`` with ``association="quadratic"`` (``NCOV = 2``).

    Examples
    --------
    >>> import mlsml
    >>> from mlsml.mixregls import to_mixregls
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> list(to_mixregls(res)["block"])
    ['BETA', 'BETA', 'ALPHA', 'TAU', 'TAU', 'SCALE_SD', 'LOC_EFF']
    """
    check_mixregls_layout(res)
    lay = res.layout
    theta = np.asarray(res.theta, dtype=float)

    def f(t):
        return mixregls_vector(t, lay)

    est = np.asarray(f(theta), dtype=float)
    cov_t = res.cov_theta()
    if cov_t is not None and np.all(np.isfinite(res.cov_params().to_numpy())):  # positive-definite information
        J = autograd.jacobian(f)(theta)
        se = np.sqrt(np.clip(np.diag(J @ cov_t @ J.T), 0, None))
    else:  # no positive-definite information matrix: the fit's own SEs are NaN too
        se = np.full(est.shape, np.nan)
    blocks, terms, ref = mixregls_index(lay)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = est / se
    return pd.DataFrame(
        {
            "block": blocks,
            "term": terms,
            "estimate": est,
            "std err": se,
            "z": z,
            "P>|z|": 2 * stats.norm.sf(np.abs(z)),
            "ref_key": ref,
        },
        index=[f"{b}:{t}" for b, t in zip(blocks, terms)],
    )


def from_mixregls(estimates: pd.DataFrame | Mapping[str, float], bs: bool | None = None) -> pd.Series:
    """Our natural-scale parameters from MIXREGLS estimates (the inverse of :func:`to_mixregls`).

    Parameters
    ----------
    estimates : DataFrame or mapping
        A frame like the output of :func:`to_mixregls` (columns ``block``,
        ``term``, ``estimate``), or a mapping ``"<BLOCK>:<term>" -> value``
        (keys ``BETA:<term>``, ``ALPHA:<term>``, ``TAU:<term>`` and, for a
        random scale, ``SCALE_SD:Std Dev`` and ``LOC_EFF:Loc  Eff``).
    bs : bool, optional
        Whether ALPHA is a BS variance function (our ``bs_formula``, parameters
        ``bsvar:<term>``) rather than the single ``ln var(u0)``. Default: a BS
        variance function when there is more than one ALPHA or its term is not
        ``Intercept``. Pass ``True`` for a fit with ``bs_formula="~ 1"``.

    Returns
    -------
    pandas.Series
        In the contract order of :mod:`mlsml.params`: ``mean:<term>`` = BETA,
        ``scale:<term>`` = TAU, then without a BS variance function
        ``var(u0) = exp(ALPHA)``, ``var(v) = LocEff^2 + StdDev^2``,
        ``cov(u0,v) = exp(ALPHA/2) LocEff``; with one ``bsvar:<term>`` = ALPHA,
        ``var(v) = LocEff^2 + StdDev^2`` and ``cov(u0,v) = LocEff`` (the
        covariance with the standardised intercept effect). Without LOC_EFF
        (NCOV = 0) there is no ``cov(u0,v)`` (``association="none"``); QUAD_LOC gives
        ``quad(u0,v)`` (NCOV = 2).

    Examples
    --------
    >>> from mlsml.mixregls import from_mixregls
    >>> from_mixregls({"BETA:Intercept": 1.0, "ALPHA:Intercept": 0.0, "TAU:Intercept": -1.0}).to_dict()
    {'mean:Intercept': 1.0, 'scale:Intercept': -1.0, 'var(u0)': 1.0}
    """
    if isinstance(estimates, pd.DataFrame):
        items = [(str(b), str(t), float(v)) for b, t, v in zip(estimates["block"], estimates["term"], estimates["estimate"])]
    else:
        items = []
        for key, v in estimates.items():
            if ":" not in str(key):
                raise ModelSpecError(f"MIXREGLS parameter name {key!r} is not of the form '<BLOCK>:<term>'")
            b, t = str(key).split(":", 1)
            items.append((b, t, float(v)))
    bad = [b for b, _, _ in items if b not in BLOCKS]
    if bad:
        raise ModelSpecError(f"unknown MIXREGLS block(s) {sorted(set(bad))}; expected {list(BLOCKS)}")
    alpha = [(t, v) for b, t, v in items if b == "ALPHA"]
    if not alpha:
        raise ModelSpecError("no ALPHA (log BS variance) parameter: MIXREGLS's model always has one")
    if bs is None:
        bs = len(alpha) > 1 or alpha[0][0] != "Intercept"
    if not bs and len(alpha) != 1:
        raise ModelSpecError(f"bs=False needs exactly one ALPHA (ln var(u0)), got {len(alpha)}")
    out: dict[str, float] = {}
    for b, t, v in items:
        if b == "BETA":
            out[f"mean:{t}"] = v
    for b, t, v in items:
        if b == "TAU":
            out[f"scale:{t}"] = v
    if bs:
        for t, v in alpha:
            out[f"bsvar:{t}"] = v
        sd_u = 1.0  # cov(u0,v) is against the standardised intercept effect
    else:
        out["var(u0)"] = float(np.exp(alpha[0][1]))
        sd_u = float(np.exp(alpha[0][1] / 2))
    sd = [v for b, _, v in items if b == "SCALE_SD"]
    loc = [v for b, _, v in items if b == "LOC_EFF"]
    quad = [v for b, _, v in items if b == "QUAD_LOC"]
    if sd or loc or quad:
        if len(sd) != 1 or len(loc) > 1 or len(quad) > 1 or (quad and not loc):
            raise ModelSpecError(
                "a random scale needs one SCALE_SD (Std Dev), with at most one LOC_EFF (Loc Eff; none for NCOV = 0) "
                "and at most one QUAD_LOC (Quad Loc, NCOV = 2, which needs Loc Eff too)"
            )
        out["var(v)"] = (loc[0] ** 2 if loc else 0.0) + sd[0] ** 2
        if loc:
            out["cov(u0,v)"] = sd_u * loc[0]
        if quad:
            out[QUAD_NAME] = quad[0]
    return pd.Series(out, name="estimate", dtype=float)
