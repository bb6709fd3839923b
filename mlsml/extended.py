"""Richer variance structures: random slopes in the log variance, log-linear BS variance.

Two optional extensions of the core model (:mod:`mlsml.likelihood`)::

    y_ij = x_ij' beta + z_ij' u_j + e_ij
    ln var(e_ij) = w_ij' alpha + g_ij' v_j          (scale_re_formula: g_ij)
    b_j = (u_j, v_j) ~ N(0, Sigma_j)
    Sigma_j = S_j Sigma0 S_j,  S_j = diag(exp(s_j' tau / 2), 1, ..., 1)   (bs_formula: s_j)

so that ``ln var(u0_j) = s_j' tau`` while the correlations of the school effects
(and the variances of the other effects) are the same in every school; ``Sigma0``
has ``Sigma0[0, 0] = 1``. This is the between-subject variance model of MIXREGLS
(``u0_j = exp(s_j' tau / 2) theta1_j``, ``v_j = LocEff theta1_j + StdDev theta2_j``).

**Likelihood.** With only a BS variance model the conditional density still
depends on the data through the per-school sums of :mod:`mlsml.likelihood`; only
the prior ``phi(b; 0, Sigma_j)`` changes from school to school. With random
slopes in the log variance the conditional log-density no longer reduces to
sums, and is evaluated per observation and node::

    log f(y_j | b) = sum_i [-1/2 log 2 pi - 1/2 lv_ij - 1/2 exp(-lv_ij) (r_ij - z_ij' u)^2]
    lv_ij = w_ij' alpha + g_ij' v,   r_ij = y_ij - x_ij' beta

at cost ``O(N K d)`` per evaluation, in chunks of schools so that no array
exceeds :data:`CHUNK` elements. Everything is written with ``autograd.numpy``.

**Posterior modes.** Newton's method per school on
``h_j(b) = log f(y_j | b) + log phi(b; 0, Sigma_j)`` with exact derivatives
(``E_i = exp(-lv_i)``, ``e_i = r_i - z_i'u``, ``t_i = E_i e_i^2``)::

    dh/du = sum E_i e_i z_i - (P_j b)_u          d2h/du du' = -sum E_i z_i z_i' - P_uu
    dh/dv = sum (t_i - 1)/2 g_i - (P_j b)_v      d2h/dv dv' = -sum t_i/2 g_i g_i' - P_vv
                                                 d2h/du dv' = -sum E_i e_i z_i g_i' - P_uv

with ``P_j = Sigma_j^{-1}``, falling back to Fisher scoring (``t_i -> 1``, cross
term 0) where ``-H`` is not positive definite, and step halving.
"""

from __future__ import annotations

import dataclasses

import autograd.numpy as anp
import numpy as np
import pandas as pd

from .errors import DataError, ModelSpecError
from .likelihood import LOG2PI, group_expand, group_sum, log_conditional, logsumexp, school_sums
from .quadrature import Nodes, Rule

#: Largest number of (observation x node) elements held at once by the
#: per-observation likelihood.
CHUNK = 2_000_000


# ---------------------------------------------------------------------- designs
def extra_designs(frame: pd.DataFrame, extra: dict, codes, order, starts, groups: str):
    """Evaluate ``scale_re_formula`` and ``bs_formula`` (called by :func:`mlsml.design.build_design`).

    Returns
    -------
    G : ndarray (N, n_v) or None
        Sorted design of the log-variance school effects; ``None`` when absent or
        when it is only an intercept (then the plain random scale ``v`` is used).
    S : ndarray (J, m) or None
        One row per school of the BS-variance design.
    scale_re_terms, bs_terms : tuple of str
    """
    from .design import _check_columns, _materialise

    G = S = None
    g_terms: tuple[str, ...] = ()
    s_terms: tuple[str, ...] = ()
    if "scale_re" in extra:
        Gdf, _ = _materialise(extra["scale_re"], frame, "scale random-effects formula")
        names = [str(c) for c in Gdf.columns]
        if not names:
            raise ModelSpecError("scale_re_formula has no terms")
        Gm = Gdf.to_numpy(dtype=float)
        _check_columns(Gm, names, "the scale random-effects design")
        if names != ["Intercept"]:
            G = np.ascontiguousarray(Gm[order])
            g_terms = tuple(names)
    if "bs" in extra:
        Sdf, _ = _materialise(extra["bs"], frame, "between-school variance formula")
        names = [str(c) for c in Sdf.columns]
        if not names:
            raise ModelSpecError("bs_formula has no terms: it needs at least an intercept ('~ 1')")
        Sm = Sdf.to_numpy(dtype=float)[order]
        _check_columns(Sm, names, "the between-school variance design")
        codes_sorted = np.asarray(codes)[order]
        first = Sm[starts][codes_sorted]
        labels = frame[groups].to_numpy()[order]
        for c, name in enumerate(names):
            diff = np.nonzero(np.abs(Sm[:, c] - first[:, c]) > 1e-12 * (1 + np.abs(first[:, c])))[0]
            if diff.size:
                bad = labels[diff[0]]
                bad = bad.item() if isinstance(bad, np.generic) else bad
                raise DataError(
                    f"bs_formula column {name!r} is not constant within group {bad!r} of "
                    f"{groups!r}: the between-school variance model needs school-level covariates"
                )
        S = np.ascontiguousarray(Sm[starts])
        s_terms = tuple(names)
    return G, S, g_terms, s_terms


def _check_layout(design) -> None:
    lay = design.layout
    if lay.bs_terms and lay.q == 0:
        raise ModelSpecError("bs_formula models the variance of the random intercept u0: re_formula must not be empty")


# ---------------------------------------------------------------------- pieces
def school_chol(theta, design):
    """``(beta, alpha, L)`` with ``L`` the Cholesky factor(s) of ``Sigma_j``.

    ``L`` has shape ``(d, d)`` without a BS variance model and ``(J, d, d)``
    with one (``L_j = S_j L0``: the first row of ``L0`` scaled by ``exp(s_j' tau / 2)``).
    """
    lay = design.layout
    if not lay.bs_terms:
        return lay.split(theta)
    beta, alpha, tau, L0 = lay.split_bs(theta)
    sd0 = anp.exp(0.5 * anp.dot(design.S, tau))
    J = design.ngroups
    rowscale = anp.concatenate([sd0[:, None], anp.ones((J, lay.d - 1))], axis=1)
    return beta, alpha, rowscale[:, :, None] * L0[None, :, :]


def log_prior_j(b, L):
    """``log phi(b_jk; 0, L_j L_j')`` for ``b`` (J, K, d) and ``L`` (d, d) or (J, d, d)."""
    d = b.shape[-1]
    if L.ndim == 2:
        L = L[None, :, :]
    xs = []
    for i in range(d):
        acc = b[:, :, i]
        for j in range(i):
            acc = acc - L[:, i, j][:, None] * xs[j]
        xs.append(acc / L[:, i, i][:, None])
    quad = sum(x**2 for x in xs)
    logdet = sum(anp.log(L[:, i, i]) for i in range(d))
    return -0.5 * d * LOG2PI - logdet[:, None] - 0.5 * quad


def _chunks(design, K: int):
    """School ranges ``[j0, j1)`` whose rows times ``K`` stay below :data:`CHUNK`."""
    counts = design.counts
    J = design.ngroups
    out = []
    j0 = 0
    rows = 0
    for j in range(J):
        if rows and (rows + counts[j]) * K > CHUNK:
            out.append((j0, j))
            j0, rows = j, 0
        rows += int(counts[j])
    out.append((j0, J))
    return out


def _chunk_slices(design, K: int):
    """For each chunk of :func:`_chunks`: schools ``j0:j1``, rows ``r0:r1``, and the
    chunk's group starts (relative to ``r0``) and counts."""
    for j0, j1 in _chunks(design, K):
        r0 = int(design.starts[j0])
        r1 = int(design.starts[j1 - 1] + design.counts[j1 - 1])
        yield j0, j1, r0, r1, design.starts[j0:j1] - r0, design.counts[j0:j1]


def log_conditional_obs(b, beta, alpha, design):
    """``log f(y_j | b_jk)`` by summing over observations; ``b`` (J, K, d) -> (J, K)."""
    lay = design.layout
    q = lay.q
    eta = anp.dot(design.W, alpha)
    r = design.y - anp.dot(design.X, beta)
    G = design.G
    K = b.shape[1]
    parts = []
    for j0, j1, r0, r1, st, cnt in _chunk_slices(design, K):
        bg = group_expand(b[j0:j1], st, cnt)  # (n, K, d)
        zu = anp.einsum("nkq,nq->nk", bg[:, :, :q], design.Z[r0:r1])
        gv = anp.einsum("nkv,nv->nk", bg[:, :, q:], G[r0:r1])
        e = r[r0:r1][:, None] - zu
        lv = eta[r0:r1][:, None] + gv
        ll = -0.5 * (LOG2PI + lv + anp.exp(-lv) * e**2)
        parts.append(group_sum(ll, st, cnt))
    return parts[0] if len(parts) == 1 else anp.concatenate(parts, axis=0)


def _log_h(theta, design, nodes: Nodes):
    lay = design.layout
    beta, alpha, L = school_chol(theta, design)
    if lay.scale_re_terms:
        cond = log_conditional_obs(nodes.b, beta, alpha, design)
    else:
        sums = school_sums(beta, alpha, design)
        cond = log_conditional(nodes.b, sums, lay.q, lay.random_scale)
    return cond + log_prior_j(nodes.b, L)


def loglik_at_nodes_ext(theta, design, nodes: Nodes):
    """Integrated log-likelihood with the nodes held fixed (extended models)."""
    h = _log_h(theta, design, nodes)
    return anp.sum(nodes.log_det + logsumexp(h + nodes.logw[None, :], axis=1))


def loglik_per_school_ext(theta, design, nodes: Nodes) -> np.ndarray:
    """``log L_j`` for every school (extended models)."""
    h = _log_h(np.asarray(theta, float), design, nodes)
    return np.asarray(nodes.log_det + logsumexp(h + nodes.logw[None, :], axis=1))


# ---------------------------------------------------------------------- modes
def _scale_design(design) -> np.ndarray:
    lay = design.layout
    if lay.scale_re_terms:
        return design.G
    return np.ones((design.nobs, lay.n_v))


class _Obs:
    """Per-observation pieces of ``h_j`` for the Newton iterations (numpy)."""

    def __init__(self, theta, design):
        lay = design.layout
        beta, alpha, L = school_chol(np.asarray(theta, float), design)
        L = np.asarray(L)
        if L.ndim == 2:
            L = np.broadcast_to(L, (design.ngroups, lay.d, lay.d))
        Linv = np.linalg.inv(L)
        self.P = np.einsum("jed,jef->jdf", Linv, Linv)  # L^-T L^-1
        self.eta = design.W @ np.asarray(alpha)
        self.r = design.y - design.X @ np.asarray(beta)
        self.Z = design.Z
        self.G = _scale_design(design)
        self.q = lay.q
        self.group = design.group
        self.starts = design.starts

    def _parts(self, b):
        bg = b[self.group]
        q = self.q
        e = self.r - np.einsum("nq,nq->n", self.Z, bg[:, :q])
        lv = self.eta + np.einsum("nv,nv->n", self.G, bg[:, q:])
        E = np.exp(-lv)
        return e, lv, E

    def f(self, b):
        e, lv, E = self._parts(b)
        ll = np.add.reduceat(-0.5 * (lv + E * e**2), self.starts)
        return ll - 0.5 * np.einsum("jd,jde,je->j", b, self.P, b)

    def derivs(self, b, fisher: bool = False):
        e, lv, E = self._parts(b)
        q = self.q
        t = E * e**2
        Z, G = self.Z, self.G
        gu = (E * e)[:, None] * Z
        gv = (0.5 * (t - 1.0))[:, None] * G
        g = np.add.reduceat(np.concatenate([gu, gv], axis=1), self.starts) - np.einsum("jde,je->jd", self.P, b)
        Huu = -np.add.reduceat(E[:, None, None] * Z[:, :, None] * Z[:, None, :], self.starts)
        nv = G.shape[1]
        J = b.shape[0]
        H = -self.P.copy()
        H[:, :q, :q] += Huu
        if nv:
            wv = np.ones_like(t) if fisher else t
            Hvv = -0.5 * np.add.reduceat(wv[:, None, None] * G[:, :, None] * G[:, None, :], self.starts)
            H[:, q:, q:] += Hvv
            if not fisher and q:
                Huv = -np.add.reduceat((E * e)[:, None, None] * Z[:, :, None] * G[:, None, :], self.starts)
                H[:, :q, q:] += Huv
                H[:, q:, :q] += np.swapaxes(Huv, 1, 2)
        return g, H.reshape(J, b.shape[1], b.shape[1])


def _is_pd(M: np.ndarray) -> np.ndarray:
    sym = 0.5 * (M + np.swapaxes(M, 1, 2))
    return np.linalg.eigvalsh(sym)[:, 0] > 0


def posterior_modes_ext(theta, design, tol: float = 1e-18, maxiter: int = 100):
    """Modes of ``h_j`` and ``-H_j`` there for the extended models (see module docstring)."""
    lay = design.layout
    obs = _Obs(theta, design)
    J, d, q = design.ngroups, lay.d, lay.q
    b = np.zeros((J, d))
    if q:  # exact u-mode at v = 0
        g, H = obs.derivs(b, fisher=True)
        b[:, :q] = np.linalg.solve(-H[:, :q, :q], g[:, :q, None])[:, :, 0]
    f = obs.f(b)
    for _ in range(maxiter):
        g, H = obs.derivs(b)
        negH = -H
        ok_pd = _is_pd(negH)
        if not ok_pd.all():
            _, Hf = obs.derivs(b, fisher=True)
            negH[~ok_pd] = -Hf[~ok_pd]
        step = np.linalg.solve(negH, g[:, :, None])[:, :, 0]
        active = np.einsum("jd,jd->j", g, step) > tol
        if not active.any():
            break
        t = np.ones(J)
        for _half in range(40):
            bn = b + t[:, None] * step
            fn = obs.f(bn)
            ok = (fn >= f - 1e-12 * np.abs(f)) | ~active
            if ok.all():
                break
            t = np.where(ok, t, 0.5 * t)
        upd = active & ok
        b[upd] = bn[upd]
        f[upd] = fn[upd]
    _, H = obs.derivs(b)
    negH = -H
    bad = ~_is_pd(negH)
    if bad.any():
        _, Hf = obs.derivs(b, fisher=True)
        negH[bad] = -Hf[bad]
    return b, negH


# ---------------------------------------------------------------------- start
def start_values_ext(design) -> np.ndarray:
    """Starting values for the extended models, from the core moment estimates.

    ``beta``, ``alpha`` and the variance of the mean effects are those of
    :func:`mlsml.optimize.start_values` for the model without the extensions;
    ``tau`` reproduces that ``var(u0)`` (intercept only); the log-variance
    effects start independent with variance 0.1 (``v0``) and
    ``0.01 / mean(g^2)`` (slopes).
    """
    from .optimize import start_values
    from .params import ParamLayout

    lay = design.layout
    base = ParamLayout(lay.mean_terms, lay.scale_terms, lay.q, lay.n_v > 0)
    th = start_values(dataclasses.replace(design, layout=base))
    beta, alpha, L = base.split(th)
    Sb = np.asarray(L) @ np.asarray(L).T
    diag = list(np.diag(Sb)[: lay.q])
    G = _scale_design(design)
    for i in range(lay.n_v):
        diag.append(0.1 if i == 0 else 0.01 / max(float(np.mean(G[:, i] ** 2)), 1e-12))
    sigma = np.diag(diag)
    tau = None
    if lay.bs_terms:
        tau = np.zeros(lay.m)
        if "Intercept" in lay.bs_terms:
            tau[lay.bs_terms.index("Intercept")] = np.log(diag[0])
    return lay.theta_from_parts(np.asarray(beta), np.asarray(alpha), sigma, tau=tau)


# ---------------------------------------------------------------------- results
def school_covariances(res) -> np.ndarray:
    """``Sigma_j`` for every school, shape ``(J, d, d)`` (equal without ``bs_formula``)."""
    design = res.model.design
    _, _, L = school_chol(np.asarray(res.theta), design)
    L = np.asarray(L)
    if L.ndim == 2:
        L = np.broadcast_to(L, (design.ngroups,) + L.shape)
    return np.einsum("jde,jfe->jdf", L, L)


def extra_singular_reasons(res) -> list[str]:
    """Boundary checks for the extended structures.

    With a BS variance model: ``var(u0_j)`` effectively zero (below ``1e-6`` of
    the residual variance) in every school, or the standardised ``Sigma0``
    (correlations) singular. With log-variance slopes: a variance of ``v_r``
    below ``1e-6 / mean(g_r^2)``. Each applies to the parameters the core check
    cannot see.
    """
    lay = res.layout
    design = res.model.design
    reasons = []
    if lay.bs_terms:
        Sj = school_covariances(res)
        resid_var = float(np.exp(np.mean(design.W @ res.fe_scale.to_numpy())))
        ref = resid_var / max(float(np.mean(design.Z[:, 0] ** 2)), 1e-300)
        if np.all(Sj[:, 0, 0] < 1e-6 * ref):
            reasons.append(f"var(u0_j) is effectively zero in every school (max {Sj[:, 0, 0].max():.3g})")
    return reasons


# ---------------------------------------------------------------------- u-exact rule
def adapt_marginal_ext(theta, design, rule: Rule) -> Nodes:
    """Nodes over the scale effects only, centred at the joint mode's ``v`` part and rotated
    by the Cholesky factor of the ``v``-marginal posterior covariance ``[(-H_j)^{-1}]_vv``."""
    q = design.layout.q
    mode, neg_hess = posterior_modes_ext(np.asarray(theta, float), design)
    cov = np.linalg.inv(neg_hess)[:, q:, q:]
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    chol = np.linalg.cholesky(cov)
    J, K = mode.shape[0], rule.size
    b = np.zeros((J, K, mode.shape[1]))
    b[:, :, q:] = mode[:, None, q:] + np.einsum("jde,ke->jkd", chol, rule.points)
    log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    return Nodes(b=b, logw=rule.logw, log_det=log_det, mode=mode, chol=chol, marginal=True)


def marginal_per_school_ext(theta, design, nodes: Nodes):
    """``log L_j`` with the mean effects integrated exactly given the scale effects ``v``.

    For node ``v`` of school ``j``, with ``a_i = exp(-lv_i)``, ``lv_i = w_i' alpha + g_i' v``::

        S0 = sum a_i r_i^2,  S1 = sum a_i r_i z_i,  S2 = sum a_i z_i z_i'
        M = S2 + P_uu,  c = S1 - P_uv v
        g(v) = -n/2 log 2pi - sum lv_i / 2 - S0/2 - 1/2 log|2 pi Sigma| - v' P_vv v / 2
               + q/2 log 2pi - 1/2 log|M| + c' M^{-1} c / 2

    (the sums are per observation and node: ``O(N K)`` for ``K`` nodes over ``v``).
    """
    from .marginal import gauss_terms

    lay = design.layout
    q, nv = lay.q, lay.n_v
    if lay.bs_terms:  # Sigma_j = S_j Sigma0 S_j: P_j = S_j^-1 P0 S_j^-1, log|Sigma_j| = log|Sigma0| + s_j'tau
        beta, alpha, tau, L = lay.split_bs(theta)
        log_sd0 = 0.5 * anp.dot(design.S, tau)
    else:
        beta, alpha, L = lay.split(theta)
        log_sd0 = None
    Linv = anp.linalg.inv(L)
    P = anp.dot(Linv.T, Linv)
    logdet_sigma = 2.0 * anp.sum(anp.log(anp.diag(L)))
    eta = anp.dot(design.W, alpha)
    r = design.y - anp.dot(design.X, beta)
    G = _scale_design(design)
    Z = design.Z
    vK = nodes.b[:, :, q:]  # (J, K, nv)
    K = vK.shape[1]
    parts = []
    for j0, j1, r0, r1, st, cnt in _chunk_slices(design, K):
        vj = vK[j0:j1]
        lv = eta[r0:r1][:, None] + anp.einsum("nkv,nv->nk", group_expand(vj, st, cnt), G[r0:r1])
        a = anp.exp(-lv)
        rr = r[r0:r1][:, None]
        Zc = Z[r0:r1]
        S0 = group_sum(a * rr**2, st, cnt)
        S1 = [group_sum(a * rr * Zc[:, i : i + 1], st, cnt) for i in range(q)]
        S2 = [[group_sum(a * (Zc[:, i] * Zc[:, k])[:, None], st, cnt) for k in range(q)] for i in range(q)]
        n = cnt.astype(float)[:, None]
        base = -0.5 * n * LOG2PI - 0.5 * group_sum(lv, st, cnt) - 0.5 * S0
        vPv = anp.einsum("jkv,vw,jkw->jk", vj, P[q:, q:], vj)
        prior = -0.5 * (q + nv) * LOG2PI - 0.5 * logdet_sigma - 0.5 * vPv
        if log_sd0 is None:
            f = [1.0] * q
        else:  # row/column 0 of P_j divided by sd(u0_j)
            prior = prior - log_sd0[j0:j1][:, None]
            f = [anp.exp(-log_sd0[j0:j1])[:, None]] + [1.0] * (q - 1)
        Mx = [[S2[i][k] + P[i, k] * f[i] * f[k] for k in range(q)] for i in range(q)]
        cx = [S1[i] - anp.einsum("jkv,v->jk", vj, P[i, q:]) * f[i] for i in range(q)]
        logdetM, quad = gauss_terms(Mx, cx)
        g = base + prior + 0.5 * q * LOG2PI - 0.5 * logdetM + 0.5 * quad
        parts.append(nodes.log_det[j0:j1] + logsumexp(g + nodes.logw[None, :], axis=1))
    return parts[0] if len(parts) == 1 else anp.concatenate(parts)


def loglik_marginal_ext(theta, design, nodes: Nodes):
    """``sum_j log L_j`` by :func:`marginal_per_school_ext` (autograd)."""
    return anp.sum(marginal_per_school_ext(theta, design, nodes))
