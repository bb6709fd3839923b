"""MIXREGLS's raw parameters converted to mlsml's, with delta-method standard errors.

MIXREGLS (Hedeker & Nordgren 2013) writes the random-intercept location scale model
with standardised random effects ``theta1, theta2 ~ N(0, 1)``:

.. math::

    y_{ij} = x_{ij}'\\mathrm{BETA} + \\exp(\\mathrm{ALPHA}_0/2)\\,\\theta_{1j} + e_{ij}, \\qquad
    \\ln \\operatorname{var}(e_{ij}) = w_{ij}'\\mathrm{TAU}
        + \\mathrm{LocEff}\\,\\theta_{1j} + \\mathrm{SD}\\,\\theta_{2j}.

So MIXREGLS's ALPHA is the **between**-school variance model and TAU the
**within**-school one (our ``alpha``). With ``u = sigma_u theta1`` and
``v = LocEff theta1 + SD theta2``, ``[[sigma_u, 0], [LocEff, SD]]`` is the lower
Cholesky factor of ``Cov(u, v)`` and

.. math::

    \\sigma^2_u = e^{\\mathrm{ALPHA}_0}, \\quad
    \\sigma^2_v = \\mathrm{LocEff}^2 + \\mathrm{SD}^2, \\quad
    \\sigma_{uv} = e^{\\mathrm{ALPHA}_0/2}\\,\\mathrm{LocEff}, \\quad
    \\rho_{uv} = \\mathrm{LocEff} / \\sqrt{\\mathrm{LocEff}^2 + \\mathrm{SD}^2}.

``beta = BETA`` and ``alpha = TAU`` carry over unchanged. Standard errors of the
converted quantities are by the delta method, ``J V J'``, with ``V`` MIXREGLS's
inverse observed information on its raw scale and ``J`` the exact Jacobian (by
autograd) of the map above.

The reference JSONs (``../shared/validation/mixregls/*.json``) store the raw
parameters under the names ``beta_<term>``, ``ln_sigma2_u`` (= ALPHA_0),
``alpha_<term>`` (= TAU: already renamed to our letter), ``tau_loc`` (= LocEff)
and ``tau_scale`` (= SD), with ``raw_parameter_order`` and ``raw_covariance``.
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd

#: our name -> the name used in the reference JSONs' ``converted`` block
REFERENCE_NAMES = {"var(u0)": "sigma2_u", "var(v)": "sigma2_v", "cov(u0,v)": "sigma_uv", "corr(u0,v)": "rho_uv"}


def _our_name(raw: str) -> str:
    if raw.startswith("beta_"):
        return "mean:" + raw[len("beta_") :]
    if raw.startswith("alpha_"):
        return "scale:" + raw[len("alpha_") :]
    raise KeyError(raw)


def converted_names(order: list[str]) -> list[str]:
    """Our names, in our contract order, of the quantities converted from ``order``."""
    mean = [_our_name(r) for r in order if r.startswith("beta_")]
    scale = [_our_name(r) for r in order if r.startswith("alpha_")]
    out = mean + scale + ["var(u0)"]
    if "tau_scale" in order or "tau_loc" in order:
        out += ["var(v)", "cov(u0,v)", "corr(u0,v)"]
    return out


def _make_map(order: list[str]):
    """The function raw vector -> converted vector (autograd-differentiable)."""
    idx = {name: i for i, name in enumerate(order)}
    mean = [idx[r] for r in order if r.startswith("beta_")]
    scale = [idx[r] for r in order if r.startswith("alpha_")]
    if "ln_sigma2_u" not in idx:
        raise KeyError("the raw parameters lack ln_sigma2_u (MIXREGLS's ALPHA_0)")
    has_scale = "tau_scale" in idx or "tau_loc" in idx

    def g(raw):
        parts = [raw[mean], raw[scale]]
        ln_s2u = raw[idx["ln_sigma2_u"]]
        s2u = anp.exp(ln_s2u)
        parts.append(anp.array([s2u]) if not isinstance(s2u, anp.ndarray) else anp.reshape(s2u, (1,)))
        if has_scale:
            loc = raw[idx["tau_loc"]] if "tau_loc" in idx else 0.0 * ln_s2u
            sd = raw[idx["tau_scale"]] if "tau_scale" in idx else 0.0 * ln_s2u
            s2v = loc**2 + sd**2
            suv = anp.exp(0.5 * ln_s2u) * loc
            rho = loc / anp.sqrt(s2v)
            parts.append(anp.stack([s2v, suv, rho]))
        return anp.concatenate([anp.reshape(p, (-1,)) for p in parts])

    return g


def mixregls_to_ours(raw_estimates, raw_covariance, order: list[str]) -> tuple[pd.Series, pd.DataFrame]:
    """Convert MIXREGLS's raw estimates and their covariance to our parameters.

    Parameters
    ----------
    raw_estimates : mapping or sequence
        Raw estimates, by name (``beta_*``, ``ln_sigma2_u``, ``alpha_*``,
        ``tau_loc``, ``tau_scale``) or in the order ``order``.
    raw_covariance : array-like (n, n)
        MIXREGLS's covariance of the raw estimates (inverse observed information).
    order : list of str
        Raw parameter names in the order of ``raw_covariance``.

    Returns
    -------
    estimates : pandas.Series
        Indexed by our names (``mean:*``, ``scale:*``, ``var(u0)`` and, with a random
        scale, ``var(v)``, ``cov(u0,v)``, ``corr(u0,v)``).
    covariance : pandas.DataFrame
        Delta-method covariance ``J V J'`` of those estimates.
    """
    if isinstance(raw_estimates, dict):
        raw = np.array(
            [float(raw_estimates[n]["estimate"] if isinstance(raw_estimates[n], dict) else raw_estimates[n]) for n in order]
        )
    else:
        raw = np.asarray(raw_estimates, dtype=float)
    V = np.asarray(raw_covariance, dtype=float)
    if V.shape != (len(order), len(order)) or raw.shape != (len(order),):
        raise ValueError(f"expected {len(order)} raw estimates and a {len(order)}x{len(order)} covariance")
    g = _make_map(order)
    est = np.asarray(g(raw), dtype=float)
    J = np.asarray(autograd.jacobian(g)(raw), dtype=float)
    cov = J @ V @ J.T
    names = converted_names(order)
    return pd.Series(est, index=names), pd.DataFrame(0.5 * (cov + cov.T), index=names, columns=names)


def from_reference_json(ref: dict) -> pd.DataFrame:
    """Converted estimates and SEs of a MIXREGLS reference JSON (columns estimate, se).

    Works from ``raw_parameters``/``raw_covariance`` when the file has them
    (MIXREGLS runs); for MIXREGMLS (random-slope) runs, which print our scale
    directly, it reads the ``converted`` block and renames it.
    """
    if "raw_parameter_order" in ref:
        rc = ref["raw_covariance"]
        order = list(rc["names"]) if isinstance(rc, dict) else list(ref["raw_parameter_order"])
        matrix = rc["matrix"] if isinstance(rc, dict) else rc
        est, cov = mixregls_to_ours(ref["raw_parameters"], matrix, order)
        return pd.DataFrame({"estimate": est, "se": np.sqrt(np.clip(np.diag(cov), 0, None))})
    rename = {
        "sigma2_u0": "var(u0)",
        "sigma2_u1": "var(u1)",
        "sigma2_v": "var(v)",
        "sigma_u0u1": "cov(u0,u1)",
        "sigma_u0v": "cov(u0,v)",
        "sigma_u1v": "cov(u1,v)",
        "rho_u0u1": "corr(u0,u1)",
        "rho_u0v": "corr(u0,v)",
        "rho_u1v": "corr(u1,v)",
    }
    rows = {}
    for key, val in ref["converted"].items():
        name = rename.get(key) or _our_name(key)
        rows[name] = (val["estimate"], np.nan if val.get("se") is None else val["se"])
    return pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "se"])


def reference_key(our_name: str) -> str:
    """The key of ``our_name`` in a reference JSON's ``converted`` block."""
    if our_name in REFERENCE_NAMES:
        return REFERENCE_NAMES[our_name]
    if our_name.startswith("mean:"):
        return "beta_" + our_name[5:]
    if our_name.startswith("scale:"):
        return "alpha_" + our_name[6:]
    raise KeyError(our_name)


#: Our term names for the Riesby variables as MIXREGLS_both prints them.
RIESBY_TERMS = {"intercept": "Intercept", "week": "week", "endog": "endog", "endweek": "endweek"}


def fortran_run_to_ours(ref: dict, names, terms: dict | None = None) -> pd.Series:
    """Estimates of a ``mixregls_fortran_runs`` reference (final stage) on our scale.

    MIXREGLS_both prints BETA (ours ``mean:``), ALPHA (the log-linear between-subject
    variance, ours ``bsvar:``), TAU (ours ``scale:``), the random-scale ``Std Dev`` and the
    location effect ``Loc Eff`` on the log WS variance. With ``u0 = sd_u0 * theta1`` and
    ``v = LocEff * theta1 + StdDev * theta2``: ``var(v) = LocEff^2 + StdDev^2`` and, with a
    between-school variance function, ``cov(u0,v)`` is reported by mlsml against the
    *standardised* ``u0`` (:mod:`mlsml.integrand`), which is ``LocEff`` itself.

    Parameters
    ----------
    ref : dict
        A reference JSON (``stages``, ``final_stage``).
    names : sequence of str
        Our parameter names, in the order wanted.
    terms : dict, optional
        MIXREGLS variable name -> our term name (default :data:`RIESBY_TERMS`).
    """
    terms = terms or RIESBY_TERMS
    st = ref["stages"][ref["final_stage"]]["parameters"]
    get = {(p["block"], p["name"]): p["estimate"] for p in st}
    prefix = {"BETA": "mean", "TAU": "scale", "ALPHA": "bsvar"}
    out = {}
    for (block, name), value in get.items():
        if block in prefix:
            out[f"{prefix[block]}:{terms[name]}"] = value
    sd = get.get(("Random scale standard deviation", "Std Dev"))
    loc = get.get(("Random location (mean) effect on WS variance", "Loc Eff"))
    if sd is not None and loc is not None:
        out["var(v)"] = loc**2 + sd**2
        out["cov(u0,v)"] = loc
    return pd.Series(out)[list(names)]
