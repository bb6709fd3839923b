"""The integrands (mlsml.integrand): the u-exact pieces against brute-force integration over u."""

from __future__ import annotations

import decimal

import autograd
import autograd.numpy as anp
import numpy as np
import pandas as pd
import pytest
from conftest import stored_fuzz_case

import mlsml
from mlsml.integrand import CANCELLATION_SCALE, PerObservation, SchoolSums, make_integrand
from mlsml.start import start_values


def _data(seed=4):
    rng = np.random.default_rng(seed)
    J, n = 12, 6
    g = np.repeat(np.arange(J), n)
    x = rng.normal(size=J * n)
    y = 0.3 + 0.5 * x + rng.normal(scale=0.4, size=J)[g] + rng.normal(size=J * n) * np.exp(0.5 * (-0.5 + 0.2 * x))
    return pd.DataFrame({"y": y, "x": x, "s": (np.arange(J) % 2)[g].astype(float), "school": g})


@pytest.mark.parametrize(
    "kw, cls",
    [(dict(), SchoolSums), (dict(bs_formula="~ s"), SchoolSums), (dict(scale_re_formula="~ x"), PerObservation)],
)
def test_u_exact_integrand_equals_brute_force_integral_over_u(kw, cls):
    """g_j(v) = log int exp h_j(u, v) du (q = 1) by a fine Riemann sum over u."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", **kw)
    integrand = make_integrand(model.design)
    assert type(integrand) is cls
    lay = model.layout
    theta = start_values(integrand) + 0.05
    rng = np.random.default_rng(1)
    v = rng.normal(scale=0.3, size=(model.design.ngroups, 2, lay.n_v))
    g = np.asarray(integrand.log_h_uexact(theta, v))
    u = np.linspace(-4.0, 4.0, 4001)
    for k in range(2):
        b = np.concatenate(
            [np.broadcast_to(u[None, :, None], (v.shape[0], u.size, 1)), np.repeat(v[:, k : k + 1, :], u.size, axis=1)], axis=2
        )
        h = np.asarray(integrand.log_h(theta, b))
        top = h.max(axis=1, keepdims=True)
        brute = top[:, 0] + np.log(np.exp(h - top).sum(axis=1) * (u[1] - u[0]))
        np.testing.assert_allclose(g[:, k], brute, rtol=0, atol=1e-8)


def test_core_flag_and_school_covariances():
    df = _data()
    core = make_integrand(mlsml.MELSM.from_formula("y ~ x", df, groups="school").design)
    bs = make_integrand(mlsml.MELSM.from_formula("y ~ x", df, groups="school", bs_formula="~ s").design)
    assert core.core and not bs.core
    theta = start_values(bs) + 0.1  # bsvar:s != 0
    S = bs.school_covariances(theta)
    assert S.shape == (bs.design.ngroups, 2, 2)
    assert len(np.unique(np.round(S[:, 0, 0], 12))) == 2  # two values of s: two var(u0_j)
    np.testing.assert_allclose(S[:, 1, 1], S[0, 1, 1])  # var(v) is common


# ---------------------------------------------------------------- issue 12: no cancellation at far nodes of v
def _solve_decimal(C: list, e: list) -> tuple:
    """``(log|C|, e'C^{-1}e)`` by Gaussian elimination in 60-digit decimal arithmetic."""
    n = len(e)
    A = [row[:] + [e[i]] for i, row in enumerate(C)]
    logdet = decimal.Decimal(0)
    for i in range(n):
        piv = A[i][i]
        logdet += piv.ln()
        for r in range(i + 1, n):
            f = A[r][i] / piv
            A[r] = [a - f * b for a, b in zip(A[r], A[i])]
    x = [decimal.Decimal(0)] * n
    for i in reversed(range(n)):
        x[i] = (A[i][n] - sum(A[i][k] * x[k] for k in range(i + 1, n))) / A[i][i]
    return logdet, sum(a * b for a, b in zip(e, x))


def _marginal_given_v(integrand, theta, v):
    """``log f(y_j | v) + log phi(v)`` in the covariance form, in 60-digit decimal arithmetic (an
    independent computation): ``y_j | v ~ N(X b + Z E[u | v], Z Var(u | v) Z' + diag(exp(w'a + v)))``."""
    D = decimal.Decimal
    design, lay = integrand.design, integrand.layout
    q = lay.q
    nat = np.asarray(lay.to_natural(theta), dtype=float)
    beta, alpha = nat[: lay.p], nat[lay.p : lay.p + lay.k]
    L = np.asarray(integrand.prior_chol(theta)[2], dtype=float)
    eta = np.asarray(design.log_variance_index(alpha), dtype=float)
    out = np.empty(v.shape[:2])
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        # Sigma = L L' in decimal: at corr = 1 - 5e-14 the float Sigma keeps 3 digits of 1 - corr^2
        Ld = [[D(float(L[a, b])) for b in range(q + 1)] for a in range(q + 1)]
        Sd = [[sum(Ld[a][k] * Ld[b][k] for k in range(q + 1)) for b in range(q + 1)] for a in range(q + 1)]
        slope = [Sd[a][q] / Sd[q][q] for a in range(q)]
        cond = [[Sd[a][b] - Sd[a][q] * Sd[q][b] / Sd[q][q] for b in range(q)] for a in range(q)]
        two_pi = D(2) * D("3.14159265358979323846264338327950288419716939937510582097494")
        for j, (st, ct) in enumerate(zip(design.starts, design.counts)):
            rows = range(st, st + ct)
            r = [D(float(design.y[i])) - sum(D(float(design.X[i, c])) * D(float(beta[c])) for c in range(lay.p)) for i in rows]
            Z = [[D(float(design.Z[i, a])) for a in range(q)] for i in rows]
            ZcZ = [[sum(Z[i][a] * cond[a][b] * Z[k][b] for a in range(q) for b in range(q)) for k in range(ct)] for i in range(ct)]
            for k in range(v.shape[1]):
                vk = D(float(v[j, k, 0]))
                C = [[ZcZ[i][m] + ((D(float(eta[st + i])) + vk).exp() if i == m else 0) for m in range(ct)] for i in range(ct)]
                e = [r[i] - sum(Z[i][a] * slope[a] * vk for a in range(q)) for i in range(ct)]
                logdet, quad = _solve_decimal(C, e)
                val = -(ct * two_pi.ln() + logdet + quad) / 2 - (two_pi * Sd[q][q]).ln() / 2 - vk * vk / Sd[q][q] / 2
                out[j, k] = float(val)
    return out


@pytest.mark.parametrize("re_formula", ["~ x", "~ 1"])
def test_u_exact_rule_has_no_cancellation_at_far_nodes(re_formula):
    """One-pupil schools with a random slope: at v = -60 the sums' exponent, two halves of order
    exp(60) S0 that cancel, was +5e24 instead of about -6e4 (326285836212315627)."""
    rng = np.random.default_rng(12)
    sizes = np.array([1, 1, 1, 2, 3, 1, 2, 4, 1, 3])
    g = np.repeat(np.arange(sizes.size), sizes)
    x = rng.normal(size=g.size)
    df = pd.DataFrame({"y": 0.2 + 0.5 * x + rng.normal(size=g.size), "x": x, "school": g})
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula=re_formula, scale_formula="~ x")
    integrand = make_integrand(model.design)
    lay = model.layout
    theta = start_values(integrand)
    theta[lay.p + lay.k :] += 0.3  # a larger Sigma, every effect correlated
    v = np.broadcast_to(np.array([-60.0, -40.0, -25.0, -10.0, 0.0, 5.0])[None, :, None], (sizes.size, 6, 1)).copy()
    got = np.asarray(integrand.log_h_uexact(theta, v))
    want = _marginal_given_v(integrand, theta, v)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-7)  # E = 1e26 at v = -60: 3e-9 relative is left
    # the gradient at a far node (the one-pupil schools, whose values are moderate there): equal to
    # central differences of the covariance form
    one = np.flatnonzero(sizes == 1)
    vk = v[:, 2:3, :]
    grad = autograd.grad(lambda th: anp.sum(integrand.log_h_uexact(th, vk)[one]))(theta)
    h = 1e-5

    def total(th):
        return np.sum(_marginal_given_v(integrand, th, vk)[one])

    fd = np.array([(total(theta + h * e) - total(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8 * np.abs(fd).max())


def _small_schools(sizes: np.ndarray, re_formula: str, chol: list[float]):
    """``(model, theta)``: ``y ~ x`` in schools of ``sizes`` with a random scale, at the start values
    with the log-Cholesky entries ``chol`` (the same data for a given ``sizes``)."""
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(sizes.size), sizes)
    x = rng.normal(size=g.size)
    df = pd.DataFrame({"y": 0.2 + 0.5 * x + rng.normal(size=g.size), "x": x, "school": g})
    model = mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula=re_formula)
    lay = model.layout
    theta = start_values(make_integrand(model.design))
    theta[lay.p + lay.k :] = chol
    return model, theta


@pytest.mark.parametrize(
    "re_formula, chol",
    [
        # var(u0) = 1.6e-13, var(v) = 134, corr(u0, v) = 0.99991: the fit of fuzz case 1478415917575154483
        ("~ 1", [-14.72, 11.58, -1.85]),
        ("~ x", [-14.0, 0.3, -1.0, 11.6, 0.5, -2.0]),
        # corr(u0, v) = 1 - 5e-14 (var(v | u) tiny): P_vv = e^30
        ("~ 1", [0.0, 1.0, -15.0]),
        ("~ x", [0.0, 0.3, -1.0, 1.0, 0.5, -12.0]),
    ],
)
def test_u_exact_rule_has_no_cancellation_at_a_nearly_singular_sigma(re_formula, chol):
    """Where ``P_uu`` is huge (a tiny conditional variance of ``u`` given ``v``), the sums about the
    school's own fit added ``-u_r'P_uu u_r/2`` (about ``-6e15``) to ``g'M^{-1}g/2`` (about ``+6e15``):
    at every node of a one-pupil school the integrand was off by up to 3 units, and the fit of a
    7-school data set climbed that noise and printed ``llf = -97.67`` where the likelihood at its
    estimates is ``-98.84`` (oldest versions). The maximiser ``u_hat`` and the exponent there, a
    sum of non-negative terms, agree with the covariance form in 60-digit arithmetic."""
    sizes = np.array([1, 1, 1, 2, 3, 1, 2, 4, 1, 3])
    model, theta = _small_schools(sizes, re_formula, chol)
    integrand = make_integrand(model.design)
    v = np.broadcast_to(np.array([-20.0, -8.0, -2.0, 0.0, 4.0, 12.0])[None, :, None], (sizes.size, 6, 1)).copy()
    got = np.asarray(integrand.log_h_uexact(theta, v))
    want = _marginal_given_v(integrand, theta, v)
    S0 = np.asarray(integrand.sums(*integrand.split(theta)[:2]).S0)
    assert np.sum(np.exp(20.0) * S0 > CANCELLATION_SCALE) >= 8  # these schools take the sums about their own fit
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("re_formula, chol", [("~ 1", [0.0, 1.0, -15.0]), ("~ x", [0.0, 0.3, -1.0, 1.0, 0.5, -12.0])])
def test_u_exact_rule_has_no_cancellation_where_v_is_nearly_a_combination_of_u(re_formula, chol):
    """Near ``|corr(u0, v)| = 1`` with ``var(v | u)`` tiny (``log L[v,v] = -15``), ``P_vv = e^30``:
    the precision form's ``-v'P_vv v/2`` (1e13 at ``v = 2``) cancelled against ``c'M^{-1}c/2`` in
    every school, at nodes where no school is far from its fit, and the integrand was 0.017 off
    (8e-5 with a random slope at -12). Written with the prior of ``u`` given ``v``
    (:func:`mlsml.integrand.conditional_prior`) no precision appears; the 60-digit covariance
    form agrees."""
    sizes = np.array([3, 1, 4, 2, 5, 1, 2, 4])
    model, theta = _small_schools(sizes, re_formula, chol)
    integrand = make_integrand(model.design)
    v = np.broadcast_to(np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[None, :, None], (sizes.size, 5, 1)).copy()
    S0 = np.asarray(integrand.sums(*integrand.split(theta)[:2]).S0)
    assert not np.any(np.exp(2.0) * S0 > CANCELLATION_SCALE)  # no school is far: the plain sums
    np.testing.assert_allclose(
        np.asarray(integrand.log_h_uexact(theta, v)), _marginal_given_v(integrand, theta, v), rtol=1e-10, atol=1e-8
    )


@pytest.mark.parametrize("re_formula, chol", [("~ 1", [0.0, 1.0, -15.0]), ("~ x", [0.0, 0.3, -1.0, 1.0, 0.5, -12.0])])
def test_gradient_where_v_is_nearly_a_combination_of_u_is_that_of_the_value(re_formula, chol):
    """At ``var(v | u) = e^-30 var(v)`` the precision form's closed-form node derivatives lost the
    digits the value keeps (on seed_sim's random-slope fit their psi components were -0.138
    against 0.0027, and the fit stopped not converged). Through the prior of ``u`` given ``v``
    (:func:`mlsml.derivatives.conditional_prior_derivatives`) the gradient equals central
    differences of the 60-digit covariance form at the same nodes, and the Hessian autograd's on
    the value."""
    model, theta = _small_schools(np.array([3, 1, 4, 2, 5, 1, 2, 4]), re_formula, chol)
    lik = model.objective(nagq=7)
    assert lik.closed_form and lik.spec.uexact
    nodes = lik.adapt(theta)
    value, grad = lik.value_and_grad(theta, nodes)
    assert value == pytest.approx(float(lik.at_nodes(theta, nodes)), abs=1e-9)

    def exact(th):
        h_jk = _marginal_given_v(lik.integrand, th, nodes.v) + nodes.logw[None, :]
        return float(np.sum(nodes.log_det + mlsml.ops.logsumexp(h_jk, axis=1)))

    h = 1e-5
    fd = np.array([(exact(theta + e) - exact(theta - e)) / (2 * h) for e in h * np.eye(theta.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    H = lik.hessian(theta, nodes)
    np.testing.assert_allclose(H, autograd.hessian(lik.at_nodes)(theta, nodes), rtol=1e-6, atol=1e-6 * np.abs(H).max())


# ---------------------------------------------------------------- issue 13: the nested rule of the quadratic association


def test_nested_rule_equals_a_brute_force_integral_with_a_mirror_mode():
    """log_h_nested against a 600 x 600 grid over (u0, w) on six schools, one of them with a middling
    mean and a large variance: with gamma = 0.8 its conditional of u0 given w has two modes of
    opposite sign, which the rule finds (a rule at one mode only is 0.46 off for it)."""
    rng = np.random.default_rng(4)
    n = 20
    rows = []
    for j, (mu, sd) in enumerate([(0.0, 1.6), (0.6, 0.7), (-0.5, 0.6), (0.2, 0.5), (1.0, 1.2), (-0.1, 0.4)]):
        e = rng.normal(size=n)
        rows.append(pd.DataFrame({"school": j, "y": mu + sd * (e - e.mean()) / e.std()}))
    df = pd.concat(rows, ignore_index=True)
    model = mlsml.MELSM.from_formula("y ~ 1", df, groups="school", association="quadratic")
    theta = model.theta_from_params(pd.Series([0.0, -1.0, 0.3, 0.1, 0.05, 0.8], index=model.param_names))
    lik = model.objective(nagq=21)
    nodes = lik.adapt(theta)
    nested = np.asarray(lik.per_school(theta, nodes))
    u = np.linspace(-4.0, 4.0, 600)
    w = np.linspace(-6.0, 6.0, 600)
    U, W = np.meshgrid(u, w, indexing="ij")
    b = np.broadcast_to(np.stack([U.ravel(), W.ravel()], axis=1), (6, U.size, 2))
    h = np.asarray(lik.integrand.log_h(theta, b))
    grid = mlsml.ops.logsumexp(h, axis=1) + np.log((u[1] - u[0]) * (w[1] - w[0]))
    np.testing.assert_allclose(nested, grid, atol=1e-4)


def _bound(integrand, theta, v):
    """The upper bound of SchoolSums._possible, from the design (independent arithmetic)."""
    lay = integrand.layout
    design = integrand.design
    beta, alpha, L = lay.split(theta)
    S = np.asarray(L) @ np.asarray(L).T
    s2 = S[-1, -1]
    n = design.counts.astype(float)[:, None]
    a = np.add.reduceat(np.asarray(design.log_variance_index(np.asarray(alpha))), design.starts)[:, None]
    vv = v[:, :, 0]
    return -0.5 * n * (np.log(2 * np.pi) + vv) - 0.5 * a - 0.5 * np.log(2 * np.pi * s2) - 0.5 * vv**2 / s2


@pytest.mark.parametrize("re_formula", ["~ 1", "~ x"])
def test_u_exact_values_are_below_the_density_at_the_best_u(re_formula):
    """g_j(v) <= sup_u f(y_j | u, v) p(v): at random parameters and nodes every value is finite
    and below the bound, so the guard (integrand.BOUND_RTOL) never removes a real value."""
    model = mlsml.MELSM.from_formula("y ~ x", _data(), groups="school", re_formula=re_formula, scale_formula="~ x")
    integrand = make_integrand(model.design)
    rng = np.random.default_rng(5)
    for _ in range(20):
        theta = start_values(integrand) + rng.normal(0, 0.7, integrand.layout.n_params)
        v = rng.normal(0, 3, (integrand.design.ngroups, 7, 1))
        values = np.asarray(integrand.log_h_uexact(theta, v))
        assert np.all(np.isfinite(values))
        assert np.all(values <= _bound(integrand, theta, v) + 1e-9)


#: The maximum of stored fuzz case 8770553538507621726's likelihood under the 127-point rule
#: (and the 199-point one): the routes of validation.fuzz at the fit of a0c3aaf.
CASE_8770_MAX_127 = -129.58754


def test_an_impossible_u_exact_value_is_nan():
    """Stored fuzz case 8770553538507621726 at var(u1) = 5e-21, L[v,v] = 1e-6 (where its fit with
    nagq=15 stopped): with the newest releases the far-school path gave +7e12 with 127 points,
    above the bound by 13 orders; now NaN, so no fit or check can take it for a log-likelihood.
    (With numpy 1.24 / scipy 1.11 the same arithmetic gives -129.595 there: finite and below
    the rule's maximum, which is all that may be asked of it.)"""
    row, data = stored_fuzz_case(8770553538507621726)
    lik = mlsml.MELSM.from_formula(data=data, **row["spec"]).objective()
    psi = [0.718094515, 6.97584057e-11, -29.0581381, 1.24093075, -1.95512840e-03, -13.6875549]
    theta = np.array([-1.42704133, -2.05655101e-10, -0.167002524, -1.12910902e-10] + psi)
    assert np.isfinite(lik.with_spec(nagq=15).value(theta))
    value = lik.with_spec(nagq=127).value(theta)
    assert np.isnan(value) or value <= CASE_8770_MAX_127 + 1e-3, value
