r"""The paper's school-level and population quantities (predictions for rows live in :mod:`mlsml.predict`).

Everything here is computed at the maximum-likelihood estimates from the
posterior of the school effects under the fit's own integrand; the intervals are
empirical-Bayes intervals, i.e. they treat the estimates as known (see
``docs/predictions.md``).

School quantities (Leckie, Parker, Goldstein & Tilling, Sections 4 and 6), for every
model class:

.. math::

    \mu_j = \bar z'u_j, \qquad \sigma^2_j(w) = \exp(\bar w'\alpha + \bar g'v_j),

with ``wbar`` the overall mean of the variance-design columns (or any user-given
common value ``w``), ``zbar`` likewise for the random-effects design (``zbar = 1``
for a random-intercept model) and ``gbar`` the row of ``scale_re_formula`` at the
same covariate values (``gbar = 1`` for the plain random scale ``v_j``):
:func:`variance_vectors`. Core models (one ``Sigma``, one ``v``) use the exact grid
of ``v`` (:class:`mlsml.predict.PosteriorGrid`); ``scale_re_formula`` and
``bs_formula`` models the grid along ``gbar'v`` (:class:`mlsml.scalegrid.ScaleGrid`),
each school under its own ``Sigma_j``; the quadratic association a 2-d grid of ``(u0, w)``
(:class:`mlsml.quadgrid.QuadraticPosterior`; the scale effect is then ``w``, the school's
whole log-variance shift, as in :meth:`MELSMResults.random_effects`). Population quantities, with
``sigma2_u = zbar'Sigma_uu zbar`` and ``sigma2_v = gbar'Sigma_vv gbar`` (with
``bs_formula`` ``Sigma = Sigma(sbar)`` of a school with covariates ``sbar``,
:func:`school_covariates`)::

    pa_variance   = exp(wbar' alpha + sigma2_v / 2)        population-averaged residual variance
    idr_mean      = beta_0 +/- z_0.9 sigma_u
    idr_var       = exp(wbar' alpha +/- z_0.9 sigma_v)
    vpc           = sigma2_u / (sigma2_u + pa_variance)
    corr_uv       = cov(zbar'u, gbar'v) / (sigma_u sigma_v)  (model-implied)
    corr_pred     = correlation over schools of the predicted means and variances
"""

from __future__ import annotations

from collections.abc import Mapping

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd
from scipy import special

from ._lazy import LazyModule
from .design import Design
from .errors import ModelSpecError
from .predict import fit_scale_posterior, posterior_grid, posterior_likelihood, school_moments
from .quadgrid import QuadraticPosterior
from .scalegrid import ScaleGrid

stats = LazyModule("scipy.stats")  # imported on first use: keeps `import mlsml` fast

#: The 90th percentile of the standard normal (the interdecile range spans +/- Z90 SDs).
Z90 = float(special.ndtri(0.90))


# ---------------------------------------------------------------- helpers
def reference_vector(value, terms: tuple[str, ...], columns: np.ndarray, what: str) -> np.ndarray:
    """A common covariate vector for all schools.

    Parameters
    ----------
    value : None, mapping/Series of term -> value, or array_like
        ``None``: the overall mean of each design column (the paper's choice).
        Mapping: values for some terms (names as in the parameter names, e.g.
        ``{"x": 0}``); terms not given take their overall mean, the intercept is 1.
        Array: the full vector, one value per design column.
    terms : tuple of str
        Column names of the design.
    columns : ndarray (N, k)
        The design matrix (for the means).
    what : str
        Name of the argument, for error messages.
    """
    k = len(terms)
    if isinstance(value, str):
        raise ModelSpecError(
            f"{what}={value!r} is not a covariate value here: give None, a mapping of term -> value or an array"
            + (" (w='school' applies to school_effects only)" if value == "school" else "")
        )
    mean = columns.mean(axis=0) if columns.shape[0] else np.zeros(k)
    if value is None:
        return np.asarray(mean, dtype=float)
    if isinstance(value, (Mapping, pd.Series)):
        out = np.asarray(mean, dtype=float).copy()
        items = value.items()
        for key, val in items:
            if key not in terms:
                raise ModelSpecError(f"{what}: {key!r} is not a term of the design (terms: {', '.join(terms)})")
            out[terms.index(key)] = float(val)
        return out
    arr = np.asarray(value, dtype=float).ravel()
    if arr.shape != (k,):
        raise ModelSpecError(f"{what} must have {k} values (one per column: {', '.join(terms)}), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ModelSpecError(f"{what} has non-finite values: {arr}")
    return arr


def _zbar(res, z) -> np.ndarray:
    """``zbar``: the common value of the random-effects design (empty without mean effects)."""
    design = res.model.design
    lay = design.layout
    re_terms = tuple(design.info.get("re_terms", tuple(f"u{i}" for i in range(lay.q))))
    return reference_vector(z, re_terms, design.Z, "z") if lay.q else np.zeros(0)


def variance_vectors(res, w) -> tuple[np.ndarray, np.ndarray]:
    r"""``wbar`` and ``gbar``: the variance design and the scale-effect design at covariate values ``w``.

    The school's log variance at ``w`` is

    .. math::

        \ln \sigma^2_j(w) = \bar w'\alpha + \bar g'v_j,

    with ``gbar`` the row of ``scale_re_formula`` at ``w`` (``gbar = (1,)`` for the plain
    random scale ``v_j``, empty without a random scale). ``w`` is as in
    :func:`reference_vector`; with ``scale_re_formula`` a mapping may also name its terms
    (a term of both designs sets both), and an array gives the variance design, whose
    values carry over to the columns of ``scale_re_formula`` of the same name. Columns not
    given take their overall mean (the intercept 1).

    Parameters
    ----------
    res : MELSMResults
    w : None, mapping/Series of term -> value, or array_like

    Returns
    -------
    wbar : ndarray (k,)
    gbar : ndarray (n_v,)
    """
    design = res.model.design
    lay = design.layout
    sterms, gterms = lay.scale_terms, lay.scale_re_terms
    if not gterms:
        return reference_vector(w, sterms, design.W, "w"), np.ones(lay.n_v)
    if isinstance(w, (Mapping, pd.Series)):
        for key in w.keys():
            if key not in sterms and key not in gterms:
                raise ModelSpecError(
                    f"w: {key!r} is not a term of the variance design (terms: {', '.join(sterms)}) "
                    f"or of scale_re_formula (terms: {', '.join(gterms)})"
                )
        wbar = reference_vector({k: v for k, v in w.items() if k in sterms}, sterms, design.W, "w")
        gbar = reference_vector({k: v for k, v in w.items() if k in gterms}, gterms, design.G, "w")
        return wbar, gbar
    wbar = reference_vector(w, sterms, design.W, "w")
    given = {} if w is None else {t: wbar[i] for i, t in enumerate(sterms) if t in gterms}
    return wbar, reference_vector(given, gterms, design.G, "w")


def school_covariates(res, s) -> np.ndarray | None:
    """``sbar``: the school-level covariates of ``bs_formula`` at which population quantities are evaluated.

    ``None`` (the default) is the mean over schools of each column (each school counted
    once; a level-1 column by its mean within each school); a mapping or array as in
    :func:`reference_vector`. Returns ``None`` for models without ``bs_formula``, where ``s``
    must be ``None``. With level-1 columns (:attr:`mlsml.design.Design.S_level1`) ``s`` sets
    them too: the quantities are those of the random location at the covariates ``s``.
    """
    design = res.model.design
    lay = design.layout
    if not lay.bs_terms:
        if s is not None:
            raise ModelSpecError(f"s={s!r} is given, but s (school-level covariates) applies to models with bs_formula only")
        return None
    return reference_vector(s, lay.bs_terms, design.school_bs_covariates(), "s")


def level1_loading(res, sbar: np.ndarray | None) -> float:
    r"""The loading :math:`\exp(s^{(1)\prime}\tau/2)` of ``u0`` at the level-1 part of ``sbar`` (1 without level-1 columns).

    ``u0_j`` (the integration variable, :func:`mlsml.integrand.loaded_Z`) is the school's random
    location where the level-1 columns of ``bs_formula`` are zero; at covariates ``sbar`` it is
    ``u0_j`` times this.
    """
    design = res.model.design
    level1 = design.S_level1_columns
    if sbar is None or level1 is None:
        return 1.0
    tau = res.params[[f"bsvar:{t}" for t in res.layout.bs_terms]].to_numpy(dtype=float)
    return float(np.exp(0.5 * np.dot(np.where(level1, sbar, 0.0), tau)))


def _cov_theta(res) -> np.ndarray | None:
    return res.cov_theta()


def _index(res) -> pd.Index:
    return pd.Index(res.model.design.group_labels, name=res.model.formula_spec.groups)


# ---------------------------------------------------------------- random effects
def random_effects(res, cov: bool = False):
    """Posterior means and SDs of the school effects (see :meth:`MELSMResults.random_effects`)."""
    design = res.model.design
    lay = design.layout
    mean, C = school_moments(res)
    cols = {}
    for i, name in enumerate(lay.re_names):
        cols[name] = mean[:, i]
        cols[f"{name}_sd"] = np.sqrt(np.clip(C[:, i, i], 0, None))
    if getattr(design, "S_level1", None) is not None:  # the standardised random location theta1_j = u0_j / exp(s_j'tau/2)
        _, _, prior = res.likelihood.integrand.split(np.asarray(res.theta, dtype=float))
        sd0 = np.exp(np.asarray(prior.log_sd0, dtype=float))
        cols["theta1"] = mean[:, 0] / sd0
        cols["theta1_sd"] = np.sqrt(np.clip(C[:, 0, 0], 0, None)) / sd0
    cols["n"] = design.counts.astype(int)
    frame = pd.DataFrame(cols, index=_index(res))
    if cov:
        return frame, C
    return frame


# ---------------------------------------------------------------- school table
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..J (1 = lowest) along the last axis."""
    x = np.asarray(x)
    idx = np.argsort(x, axis=-1, kind="stable")
    r = np.empty(x.shape, dtype=np.intp)
    np.put_along_axis(r, idx, np.arange(1, x.shape[-1] + 1), axis=-1)
    return r


def school_effects(
    res,
    w=None,
    level: float = 0.95,
    z=None,
    ndraws: int = 1000,
    seed: int = 20190101,
    return_draws: bool = False,
    sbar: np.ndarray | None = None,
) -> pd.DataFrame:
    """The school table: means and variances with intervals, ranks and flags.

    See :meth:`MELSMResults.school_effects` for the columns. With ``return_draws`` also the
    posterior draws behind the rank intervals, ``{"mean": (ndraws, J), "var": (ndraws, J)}``
    (``None`` where the table has no ranks), for ranks over schools fitted in blocks
    (:mod:`mlsml.distributed`); ``sbar`` then gives the ``bs_formula`` covariates of the
    level-1 loading over all schools (default :func:`school_covariates`).
    """
    if not 0 < level < 1:
        raise ModelSpecError(f"level must be between 0 and 1, got {level!r}")
    if int(ndraws) < 100:
        raise ModelSpecError(f"ndraws must be at least 100 for rank intervals, got {ndraws!r}")
    design = res.model.design
    lay = design.layout
    q, rs = lay.q, lay.n_v > 0
    alpha = res.fe_scale.to_numpy()
    zbar = _zbar(res, z)
    if getattr(design, "S_level1", None) is not None:  # the random location at the mean level-1 bs_formula covariates
        zbar = zbar.copy()
        zbar[0] *= level1_loading(res, school_covariates(res, None) if sbar is None else sbar)
    if isinstance(w, str):
        if w != "school":
            raise ModelSpecError(f"w must be None, 'school', a mapping of term -> value or an array, not {w!r}")
        # each school's own mean covariate value (the paper's Figure 4)
        wbar_j = np.add.reduceat(design.W, design.starts, axis=0) / design.counts[:, None]
        wa = wbar_j @ alpha
        gbar = np.add.reduceat(design.G, design.starts, axis=0) / design.counts[:, None] if design.G is not None else None
    else:
        wbar, gbar = variance_vectors(res, w)
        wa = float(wbar @ alpha)
    probs = [(1 - level) / 2, (1 + level) / 2]
    post = fit_scale_posterior(res)
    mean, C = post.moments
    rng = np.random.default_rng(seed)
    if lay.quad_assoc:  # u0 | w, y is not normal: the 2-d grid of (u0, w) (mlsml.quadgrid)
        qp = QuadraticPosterior.build(res.likelihood.integrand, res.theta, mean, C)
        ud, vd = qp.draws(int(ndraws), rng)
        z0 = float(zbar[0])
        cu = z0 * ud
        m = z0 * qp.mean_u()
        qs = np.sort(z0 * qp.quantile_u(probs), axis=1)
        qv = qp.quantile_w(probs)
        ev = qp.mean_exp_w()
    elif res.likelihood.integrand.core:  # the exact grid of v (one Sigma, one v)
        grid = posterior_grid(res, post, mean[:, q] if rs else None, np.sqrt(C[:, q, q]) if rs else None)
        cu, vd = grid.draws(zbar if q else None, int(ndraws), rng)
        m = mean[:, :q] @ zbar if q else None
        qs = grid.quantile_linear(zbar, probs) if q else None
        qv = grid.quantile_v(probs) if rs else None
        ev = grid.mean_exp_v() if rs else None
    else:  # school-specific Sigma_j, or several scale effects: along gbar'v (mlsml.scalegrid)
        sg = ScaleGrid.build(res.likelihood.integrand, res.theta, np.ones(lay.n_v) if gbar is None else gbar, mean, C)
        cu, vd = sg.draws(zbar if q else None, int(ndraws), rng)
        m = sg.mean_linear(zbar) if q else None
        qs = sg.quantile_linear(zbar, probs) if q else None
        rs = rs and bool(sg.random.any())  # gbar = 0 at a common w: the variance has no random part there
        qv = sg.quantile_t(probs) if rs else None
        ev = sg.mean_exp_t() if rs else None
    out = pd.DataFrame({"n": design.counts.astype(int)}, index=_index(res))
    lo_q, hi_q = probs

    def rank_cols(prefix: str, point: np.ndarray, draws: np.ndarray) -> None:
        r = _ranks(draws)
        out[f"{prefix}_rank"] = _ranks(point)
        out[f"{prefix}_rank_lo"] = np.quantile(r, lo_q, axis=0, method="inverted_cdf").astype(int)
        out[f"{prefix}_rank_hi"] = np.quantile(r, hi_q, axis=0, method="inverted_cdf").astype(int)

    nan_rank = {"_rank": np.nan, "_rank_lo": np.nan, "_rank_hi": np.nan}
    if q:
        out["mean"], out["mean_lo"], out["mean_hi"] = m, qs[:, 0], qs[:, 1]
        rank_cols("mean", m, cu)
        out["mean_flag"] = np.where(qs[:, 0] > 0, 1, np.where(qs[:, 1] < 0, -1, 0))
    else:
        out["mean"] = out["mean_lo"] = out["mean_hi"] = 0.0
        for k, v in nan_rank.items():
            out["mean" + k] = v
        out["mean_flag"] = 0
    if rs:
        var = np.exp(wa) * ev
        out["var"], out["var_lo"], out["var_hi"] = var, np.exp(wa + qv[:, 0]), np.exp(wa + qv[:, 1])
        rank_cols("var", var, vd + wa)
        out["var_flag"] = np.where(qv[:, 0] > 0, 1, np.where(qv[:, 1] < 0, -1, 0))
    else:
        out["var"] = out["var_lo"] = out["var_hi"] = np.exp(wa)
        for k, v in nan_rank.items():
            out["var" + k] = v
        out["var_flag"] = 0
    ref = "school" if isinstance(w, str) else dict(zip(lay.scale_terms, wbar))
    out.attrs.update({"wbar": ref, "level": level, "ndraws": int(ndraws), "seed": seed})
    if lay.scale_re_terms:
        out.attrs["gbar"] = "school" if isinstance(w, str) else dict(zip(lay.scale_re_terms, gbar))
    if return_draws:
        return out, {"mean": cu if q else None, "var": vd + wa if rs else None}
    return out


# ---------------------------------------------------------------- population
def population_quantities(res, w=None, z=None, s=None) -> pd.DataFrame:
    """Population quantities with delta-method SEs (see :meth:`MELSMResults.population_quantities`)."""
    design = res.model.design
    lay = design.layout
    wbar, gbar = variance_vectors(res, w)
    q, rs = lay.q, lay.n_v > 0 and bool(np.any(gbar != 0))  # gbar = 0: no random part of the variance at w
    zbar = _zbar(res, z)
    sbar = school_covariates(res, s)
    i0 = lay.mean_terms.index("Intercept") if "Intercept" in lay.mean_terms else None

    def parts(theta):
        S, beta, alpha = _covariance_at(lay, theta, sbar)
        wa = anp.dot(wbar, alpha)
        su2 = anp.dot(zbar, anp.dot(S[:q, :q], zbar)) if q else 0.0
        sv2 = anp.dot(gbar, anp.dot(S[q:, q:], gbar)) if rs else 0.0
        pa = anp.exp(wa + 0.5 * sv2)
        vals = {"pa_variance": pa, "median_variance": anp.exp(wa)}
        if q:
            b0 = beta[i0] if i0 is not None else 0.0 * wa
            vals["sd_mean"] = anp.sqrt(su2)
            vals["idr_mean_lo"] = b0 - Z90 * anp.sqrt(su2)
            vals["idr_mean_hi"] = b0 + Z90 * anp.sqrt(su2)
        if rs:
            vals["idr_var_lo"] = anp.exp(wa - Z90 * anp.sqrt(sv2))
            vals["idr_var_hi"] = anp.exp(wa + Z90 * anp.sqrt(sv2))
        else:
            vals["idr_var_lo"] = vals["idr_var_hi"] = anp.exp(wa)
        if q:
            vals["total_variance"] = su2 + pa
            vals["vpc"] = su2 / (su2 + pa)
        if q and rs:
            cuv = anp.dot(zbar, anp.dot(S[:q, q:], gbar))
            vals["corr_uv"] = cuv / anp.sqrt(su2 * sv2)
        return vals

    theta = np.asarray(res.theta, dtype=float)
    est = parts(theta)
    names = list(est)

    def vec(theta):
        v = parts(theta)
        return anp.stack([anp.array(v[k], dtype=float) * 1.0 for k in names])

    values = np.asarray(vec(theta), dtype=float)
    cov_t = _cov_theta(res)
    if cov_t is not None:
        jac = autograd.jacobian(vec)(theta)
        se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", jac, cov_t, jac), 0, None))
    else:
        se = np.full(values.shape, np.nan)
    table = pd.DataFrame({"estimate": values, "std err": se}, index=pd.Index(names, name="quantity"))
    if q and rs:
        zl = zbar.copy()
        zl[0] *= level1_loading(res, sbar)  # E(u | y) is of u0 where level-1 bs_formula columns are 0
        r, r_se = _corr_predictions(res, wbar, zl, gbar, cov_t)
        table.loc["corr_pred"] = [r, r_se]
    for row in ("sd_mean", "idr_mean_lo", "idr_mean_hi", "total_variance", "vpc", "corr_uv", "corr_pred"):
        if row not in table.index:
            table.loc[row] = [np.nan, np.nan]
    order = [
        "pa_variance",
        "median_variance",
        "idr_mean_lo",
        "idr_mean_hi",
        "idr_var_lo",
        "idr_var_hi",
        "sd_mean",
        "total_variance",
        "vpc",
        "corr_uv",
        "corr_pred",
    ]
    table = table.loc[order]
    table.attrs["wbar"] = dict(zip(lay.scale_terms, wbar))
    if lay.scale_re_terms:
        table.attrs["gbar"] = dict(zip(lay.scale_re_terms, gbar))
    if sbar is not None:
        table.attrs["sbar"] = dict(zip(lay.bs_terms, sbar))
    return table


def _covariance_at(lay, theta, sbar: np.ndarray | None):
    r"""``(Sigma, beta, alpha)`` at ``theta`` (autograd); with ``bs_formula`` the ``Sigma_j`` of a school with covariates ``sbar``.

    .. math::

        \Sigma(\bar s) = D \Sigma_0 D, \qquad D = \operatorname{diag}(e^{\bar s'\tau / 2}, 1, \dots, 1).
    """
    if sbar is None:
        beta, alpha, L = lay.split(theta)
        return anp.dot(L, anp.transpose(L)), beta, alpha
    beta, alpha, tau, L0 = lay.split_bs(theta)
    D = anp.concatenate([anp.reshape(anp.exp(0.5 * anp.dot(sbar, tau)), (1,)), anp.ones(lay.d - 1)])
    return anp.dot(L0, anp.transpose(L0)) * (D[:, None] * D[None, :]), beta, alpha


def school_predictions(res, wbar, zbar, gbar):
    """``theta -> (m, v)``: every school's ``E(zbar'u_j | y)`` and ``E(exp(wbar'a + gbar'v_j) | y)`` (autograd).

    By the adaptive quadrature of :func:`mlsml.predict.posterior_likelihood` with the nodes
    held at their positions for the estimates.
    """
    design = res.model.design
    lay = design.layout
    q = lay.q
    lik = posterior_likelihood(res)
    nodes = fit_scale_posterior(res, lik).nodes
    zu = np.einsum("jkq,q->jk", nodes.b[:, :, :q], zbar)
    ev = np.exp(np.einsum("jkv,v->jk", nodes.b[:, :, q:], gbar))

    def predictions(theta):
        _, alpha, _ = lay.split(theta)
        h = lik.integrand.log_h(theta, nodes.b) + nodes.logw[None, :]
        h = h - anp.max(h, axis=1, keepdims=True)
        e = anp.exp(h)
        pw = e / anp.sum(e, axis=1, keepdims=True)
        return anp.sum(pw * zu, axis=1), anp.exp(anp.dot(wbar, alpha)) * anp.sum(pw * ev, axis=1)

    return predictions


def _corr_predictions(res, wbar, zbar, gbar, cov_t):
    """Correlation over schools of E(zbar'u_j | y) and E(exp(wbar'a + gbar'v_j) | y), with a delta-method SE.

    The posterior expectations are computed by the adaptive quadrature with the
    nodes held at their positions for the estimates; the SE reflects the
    uncertainty of the estimates only (the schools themselves are fixed).
    """
    if not isinstance(res.model.design, Design):  # rows held by Dask workers: from sums over blocks
        return res.corr_predictions(wbar, zbar, gbar, cov_t)
    predictions = school_predictions(res, wbar, zbar, gbar)
    theta0 = np.asarray(res.theta, dtype=float)

    def corr(theta):
        m, v = predictions(theta)
        mc, vc = m - anp.mean(m), v - anp.mean(v)
        return anp.sum(mc * vc) / anp.sqrt(anp.sum(mc**2) * anp.sum(vc**2))

    r = float(corr(theta0))
    if cov_t is None:
        return r, np.nan
    g = autograd.grad(corr)(theta0)
    return r, float(np.sqrt(max(g @ cov_t @ g, 0.0)))
