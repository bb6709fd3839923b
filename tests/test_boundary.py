"""When the boundary probes may be skipped (mlsml.boundary.far_from_boundary)."""

from __future__ import annotations

import warnings

import autograd
import numpy as np
import pandas as pd
import pytest
from conftest import stored_fuzz_case, zero_u0_data

import mlsml
from mlsml import boundary, diagnostics
from mlsml.params import ParamLayout, chol_from_vector, constrain, sigma_derivatives, vector_from_chol
from validation import fuzz


def test_sigma_derivatives_match_autograd():
    L = np.array([[1.2, 0.0, 0.0], [0.3, 0.7, 0.0], [-0.2, 0.4, 0.5]])

    def sigma(psi):
        M = chol_from_vector(psi, 3)
        return M @ M.T

    jac = autograd.jacobian(sigma)(vector_from_chol(L))  # (3, 3, n_psi)
    np.testing.assert_allclose(sigma_derivatives(L), np.moveaxis(jac, 2, 0), rtol=1e-12, atol=1e-14)


def _z2_by_differences(res):
    """The same statistics from numerical derivatives of var(e) and the smallest correlation eigenvalue."""
    lay = res.layout
    off = lay.p + lay.k
    theta = np.asarray(res.theta, dtype=float)

    def quantities(psi):
        L = chol_from_vector(psi, lay.d)
        S = L @ L.T
        sd = np.sqrt(np.diag(S))
        out = list(np.diag(S))
        if lay.d > 1:
            out.append(np.linalg.eigvalsh(S / np.outer(sd, sd))[0])
        return np.array(out)

    psi = theta[off:]
    h = 1e-6
    grad = np.array([(quantities(psi + h * e) - quantities(psi - h * e)) / (2 * h) for e in np.eye(psi.size)])
    H = res.optsum.hessian
    cov = np.linalg.inv(-0.5 * (H + H.T))[off:, off:]
    f = quantities(psi)
    return f**2 / np.einsum("kf,kl,lf->f", grad, cov, grad)


@pytest.mark.parametrize("kw", [dict(scale_formula="~ standLRT"), dict(scale_formula="~ standLRT", re_formula="~ standLRT")])
def test_probe_statistics_match_numerical_derivatives(exam, kw):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", **kw)
    z2 = boundary.probe_z2(res.layout, res.theta, res.optsum.hessian)
    np.testing.assert_allclose(z2, _z2_by_differences(res), rtol=1e-5)


def test_skipped_probes_would_have_found_nothing(exam, seed_sim, monkeypatch):
    """With the threshold lowered to z = 1 (25 times less strict than the default), every fit
    called far from the boundary still has no probe below BOUNDARY_LR; the boundary fits are
    never called far from it."""
    monkeypatch.setattr(boundary, "FAR_FROM_BOUNDARY_Z2", 1.0)
    fits = [
        ("normexam ~ standLRT", exam, dict(scale_formula="~ standLRT")),
        ("normexam ~ standLRT", exam, dict(re_formula="~ standLRT", random_scale=False)),
        ("y ~ x", seed_sim, dict(scale_formula="~ x")),
    ]
    for formula, df, kw in fits:
        res = mlsml.fit(formula, df, groups="school", **kw)
        assert boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian), kw
        assert boundary.boundary_effects(res.likelihood, res.theta, res.llf) == []
    with pytest.warns(mlsml.SingularFitWarning):
        res = mlsml.fit("y ~ x", seed_sim, groups="school", re_formula="~ x", random_scale=False)
    assert not boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian)
    assert res.diagnostics.boundary  # the probes ran and found the rank-deficient Sigma


def test_default_threshold_leaves_small_data_to_the_probes(exam):
    """65 schools: var(v) is about 4 standard errors from zero, so the probes run (and find nothing)."""
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    assert min(boundary.probe_z2(res.layout, res.theta, res.optsum.hessian)) < boundary.FAR_FROM_BOUNDARY_Z2
    assert not boundary.far_from_boundary(res.layout, res.theta, res.optsum.hessian)
    assert res.diagnostics.boundary == ()


def test_not_positive_definite_information_runs_the_probes(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT")
    H = np.array(res.optsum.hessian)
    H[-1, -1] = abs(H[-1, -1])  # a direction of positive curvature: not a maximum
    assert boundary.probe_z2(res.layout, res.theta, H) is None
    assert not boundary.far_from_boundary(res.layout, res.theta, H)


# ---------------------------------------------------------------- faces of the boundary (issue 12)


def _fit(df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", **kw)


def test_fit_on_one_face_moves_to_the_higher_face():
    """Seed 1 of the generator: main stopped at var(u0) = 0 (llf -174.9098, "converged") while the
    maximum, 0.0049 higher, is at var(u0) = 4.5e-5 with corr(u0,v) = +1. The independent route:
    trust-exact (exact Hessian) started on the other face, by the fit's own rule."""
    df = zero_u0_data(1)
    res = _fit(df)
    start = res.params.copy()
    start["var(u0)"], start["var(v)"] = 0.05**2, max(start["var(v)"], 0.1)
    start["cov(u0,v)"] = 0.95 * 0.05 * np.sqrt(start["var(v)"])
    other = _fit(df, method="trust-exact", start_params=start)
    assert other.llf > -174.95  # the route reached the other face (main's fit: -174.9098)
    assert res.converged and res.llf >= other.llf - 1e-4  # 1e-4: boundary.FACE_LLF_TOL
    assert any("corr(u0,v) = +1" in r for r in res.singular_reasons())


def test_search_faces_names_and_ranks_the_faces():
    df = zero_u0_data(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", start_params=None)
    faces = boundary.search_faces(res.likelihood, res.theta)
    names = [f.name for f in faces]
    assert sorted(names) == sorted(["var(u0) = 0", "var(v) = 0", "corr(u0,v) = +1", "corr(u0,v) = -1"])
    assert [f.llf for f in faces] == sorted((f.llf for f in faces), reverse=True)
    # the fit is at the best face's maximum (within the tolerance): nothing left to gain
    assert faces[0].gain <= boundary.FACE_LLF_TOL
    # removing v costs many units here: the random scale is real
    assert dict(zip(names, (f.gain for f in faces)))["var(v) = 0"] < -1.0


@pytest.mark.parametrize("d", [1, 2, 3])
def test_face_fixed_entries_make_sigma_singular(d):
    rng = np.random.default_rng(d)
    kinds = [("drop", k) for k in range(d)] + [("rank", k) for k in range(1, d)]
    for kind, k in kinds:
        L = np.tril(rng.normal(size=(d, d))) + 2 * np.eye(d)
        for i, j in boundary.face_fixed(d, kind, k):
            L[i, j] = 0.0
        S = L @ L.T
        assert np.linalg.matrix_rank(S) == d - 1
        if kind == "drop":
            assert S[k, k] == 0.0 and not np.any(S[k])


def test_reduced_rank_covariance_inverts_the_rest():
    """The degenerate log-Cholesky directions are dropped and the rest inverted; undetermined entries are NaN."""
    lay = ParamLayout(("Intercept", "x"), ("Intercept",), n_re_mean=1, random_scale=True)
    theta = lay.theta_from_parts([0.0, 0.5], [-0.3], [[0.04, 0.02], [0.02, 0.01 + 1e-14]])
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 5))
    info = A @ A.T + 5 * np.eye(5)
    H = np.zeros((6, 6))
    H[:5, :5] = -info  # nothing in log L11: the rank-1 face corr(u0,v) = +1
    assert boundary.reduced_rank_covariance(H, lay, theta, []) is None  # singular without the reduction
    V = boundary.reduced_rank_covariance(H, lay, theta, [("rank", 1)])
    inv = np.linalg.inv(info)
    np.testing.assert_allclose(V[:3, :3], inv[:3, :3], rtol=1e-10)
    jac = lay.natural_jacobian(theta)[:, :5]
    np.testing.assert_allclose(V[3:5, 3:5], (jac @ inv @ jac.T)[3:5, 3:5], rtol=1e-10)
    assert np.all(np.isnan(V[-1])) and np.all(np.isnan(V[:, -1]))  # cov(u0,v): undetermined
    # dropping u0 instead keeps log L11, in which there is no information: still singular
    assert boundary.reduced_rank_covariance(H, lay, theta, [("drop", 0)]) is None


def test_a_face_does_not_win_by_the_product_rules_error():
    """Issue 12 fuzz case 7384623864426013180 (30 schools of 2-3 pupils, var(v) ~ 0.9): the
    9-point product rule is 8.9 units off at the fit, so the Gaussian face var(v) = 0 seemed
    2.13 higher and the fit was flagged not converged, although trust-exact and the
    standardized BFGS confirm it is the maximum (the face is 3.2 below by 61 points). A face is
    compared only where the product rule with about twice the points agrees with it."""
    case = fuzz.random_case(7384623864426013180, max_rows=60, allow_scale_re=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit(data=case.data, **case.spec)
    assert res.converged, res.message
    assert not any("NOT the maximum" in r for r in res.singular_reasons())


def test_an_interior_fit_near_the_boundary_is_compared_with_the_faces():
    """Issue 12 fuzz case 4623287202221590537 (4 schools, true var(u0) = 0): the fit stopped at an
    interior maximum (corr(u0,v) = -0.18), reported converged, 0.285 below a maximum at
    |corr| near 1 that the probes (which move the fit itself) could not see. Sigma is
    weakly determined there, so the faces are searched and the fit moves to the higher one."""
    row, data = stored_fuzz_case(4623287202221590537)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit(data=data, **row["spec"])
    lay, opt = res.model.layout, res.optsum
    assert boundary.weakly_determined(lay, opt.theta_std, opt.hessian_std)
    assert res.diagnostics.faces
    assert res.llf == pytest.approx(row["reference"], abs=fuzz.BELOW_MAX_TOL)


def test_interior_starts_move_a_face_entry_inside_and_keep_the_rest():
    lik = mlsml.MELSM.from_formula("y ~ x", mlsml.simulate.demo_data(n_groups=20, seed=3), groups="school").objective()
    lay = lik.layout
    L = np.array([[0.5, 0.0], [3.0, 1e-9]])  # corr(u0, v) = +1
    theta = np.concatenate([np.zeros(lay.p + lay.k), vector_from_chol(L)])
    starts = boundary.interior_starts(lik, theta)
    assert len(starts) == 1
    L_in = chol_from_vector(starts[0][lay.chol_offset :], 2)
    assert L_in[1, 1] == pytest.approx(boundary.INSIDE_RATIO * 3.0)  # above sqrt(0.01 * ref(v) = 1)
    np.testing.assert_array_equal(np.delete(starts[0], lay.chol_offset + 2), np.delete(theta, lay.chol_offset + 2))
    inside = vector_from_chol(np.array([[0.5, 0.0], [3.0, 0.2]]))
    assert boundary.interior_starts(lik, np.concatenate([np.zeros(lay.p + lay.k), inside])) == []


def test_a_fit_stopped_on_a_face_with_the_maximum_just_inside_reaches_it():
    """Issue 12 fuzz case 5413302752735107442 (29 schools of 1 to 8, random slope): BFGS stopped
    at corr(u0,u1) = -1 (log L11 -> -inf, where its gradient vanishes) and said converged 0.008
    below the maximum at corr -0.991; settle now refits from just inside the face."""
    row, data = stored_fuzz_case(5413302752735107442)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit(data=data, **row["spec"])
    # (with SciPy 1.11 the trust-krylov fallback gets there first: which step does is path-dependent)
    assert res.llf > row["reference"] - 1e-3 and res.converged


# ------------------------------------------------------------- faces of a constrained Sigma (issue 13)
def test_faces_of_association_none_are_the_submodels():
    """association="none" (cov(u0,v) fixed at 0): the faces are var(u0) = 0 and var(v) = 0, no rank
    face (L[1, 0] is fixed), and each face's maximum is the fit of the model without that effect
    (before issue 13 the search was skipped for constrained models)."""
    df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    d = df[df.groupby("school").cumcount() < 15]
    res = mlsml.fit("y ~ x", d, groups="school", association="none")
    faces = {f.name: f for f in boundary.search_faces(res.likelihood, res.theta)}
    assert set(faces) == {"var(u0) = 0", "var(v) = 0"}
    no_v = mlsml.fit("y ~ x", d, groups="school", random_scale=False)
    no_u = mlsml.fit("y ~ x", d, groups="school", re_formula="~ 0")
    assert faces["var(v) = 0"].llf == pytest.approx(no_v.llf, abs=1e-5)
    assert faces["var(u0) = 0"].llf == pytest.approx(no_u.llf, abs=1e-5)


def test_faces_respect_fixed_covariances_of_random_slopes():
    """cov_constraints=["cov(u0,u1)"] with a random scale: no rank face for u1 (its row of L has no
    free entry before the diagonal), the rank face of v keeps L[1, 0] = 0, and the var(v) = 0 face
    is the fit without the random scale."""
    df = mlsml.simulate.simulate_data(
        [12] * 40, beta=(0.0, 0.5), cov=((0.3, 0.0, 0.05), (0.0, 0.1, 0.0), (0.05, 0.0, 0.2)), random_slope=True, seed=4
    )
    kw = dict(groups="school", re_formula="~ x", cov_constraints=["cov(u0,u1)"])
    res = mlsml.fit("y ~ x", df, **kw)
    faces = boundary.search_faces(res.likelihood, res.theta)
    names = {f.name for f in faces}
    assert names == {"var(u0) = 0", "var(u1) = 0", "var(v) = 0", "v is an exact linear combination of u0, u1"}
    lay = res.layout
    for f in faces:  # a fixed covariance stays exactly zero on every face
        assert lay.sigma_from_natural(np.asarray(lay.to_natural(f.theta)))[0, 1] == 0.0
    no_v = mlsml.fit("y ~ x", df, random_scale=False, **kw)
    assert next(f for f in faces if f.name == "var(v) = 0").llf == pytest.approx(no_v.llf, abs=1e-5)


def test_reduced_rank_covariance_of_a_constrained_layout():
    """association="none": theta has no L[1, 0] and the natural vector no cov(u0,v). At var(u0) = 0
    the reduced-rank covariance drops only L[0, 0] (it dropped L[1, 1] too and then indexed a
    covariance that is not there: IndexError)."""
    lay = constrain(ParamLayout(("Intercept",), ("Intercept",), n_re_mean=1, random_scale=True), "none")
    theta = lay.theta_from_parts([0.0], [0.0], [[1e-12, 0.0], [0.0, 0.25]])
    V = boundary.reduced_rank_covariance(-np.diag([4.0, 1.0, 0.0, 1.0]), lay, theta, [("drop", 0)])
    se = np.sqrt(np.diag(V))
    np.testing.assert_allclose(se[[0, 1, 3]], [0.5, 1.0, 0.5])  # var(v) = exp(2 psi): d var / d psi = 0.5
    assert np.isnan(se[2])


def test_a_fit_that_moves_to_a_higher_face_searches_the_faces_once(monkeypatch):
    """The maxima on the faces do not depend on the fit: when settle moves the fit to a higher
    face (stored fuzz case 4623287202221590537, as above), the next round compares the first
    search's faces with the new fit instead of searching again (before: two searches; a random
    slope in 43 schools searched three times, 21 face fits, half of its 44 CPU-s)."""
    row, data = stored_fuzz_case(4623287202221590537)
    calls = []
    search = diagnostics.search_faces

    def counted(*args, **kwargs):
        calls.append(1)
        return search(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "search_faces", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit(data=data, **row["spec"])
    assert len(calls) == 1 and res.diagnostics.faces
    assert res.llf == pytest.approx(row["reference"], abs=fuzz.BELOW_MAX_TOL)


def test_the_faces_are_compared_where_the_product_rule_cannot_evaluate_the_fit():
    """Fuzz case 2119240842600127528 (random slope, 133 schools of 2 to 8): the fit converged at
    var(u0) = 5.9e-12 with v a combination of u0, u1 (L[v,v] = 9e-10), where the product rule of
    the face search is NaN (an exactly singular block in its mode search): no face was searched
    and the fit said converged 0.0169 below the maximum. probe_value evaluates the product rule
    with the vanished variances at FACE_ZERO of their reference (off_face) instead."""
    case = fuzz.random_case(2119240842600127528)
    lik = mlsml.MELSM.from_formula(data=case.data, **case.spec).objective()
    beta_alpha = [-0.7004879728651224, 0.3738434290743152, -1.0933294654509655, -0.4294989501666171]
    psi = [-12.925483681539816, -0.3270081719866869, -1.8381295749562447, 0.07432936103039448, -0.03628428021322194]
    theta = np.array(beta_alpha + psi + [-20.86529662232653])
    off = lik.layout.chol_offset
    moved = boundary.off_face(lik, theta)
    ref = boundary.reference_variances(lik, np.asarray(lik.layout.to_natural(theta)))
    assert moved[off] == pytest.approx(0.5 * np.log(boundary.FACE_ZERO * ref[0]))  # psi_00: var(u0) raised
    assert moved[off + 5] == pytest.approx(0.5 * np.log(boundary.FACE_ZERO * ref[2]))  # psi_vv
    np.testing.assert_array_equal(np.delete(moved, [off, off + 5]), np.delete(theta, [off, off + 5]))
    point, value = boundary.probe_value(lik, theta)
    # the log-likelihood at theta is -622.8161 by the u-given-v form of the u-exact rule (exact at
    # L[v,v] = 9e-10); the precision form it replaced gave -363.44 there (the cancellation near
    # |corr| = 1 of docs/failures.md)
    assert lik.value(theta) == pytest.approx(-622.8161, abs=1e-3)
    assert np.isfinite(value) and value == pytest.approx(-622.8161, abs=1e-3)
    assert np.array_equal(point, theta) or np.array_equal(point, moved)


def test_the_faces_are_fitted_by_the_fits_u_exact_rule_where_it_is_in_the_conditional_form():
    df = mlsml.simulate.demo_data(n_groups=20, seed=3)
    lik = mlsml.MELSM.from_formula("y ~ x", df, groups="school", re_formula="~ x").objective()
    assert lik.spec.uexact and boundary.face_likelihood(lik) is lik  # q = 2, a random scale
    product = lik.with_spec(kind="product", nagq=5, prune=0.0)
    assert boundary.face_likelihood(product) is product  # a product rule chosen by the user
    no_scale = mlsml.MELSM.from_formula("y ~ x", df, groups="school", random_scale=False).objective()
    assert not boundary.face_likelihood(no_scale).spec.uexact  # the precision form: the product rule
    scale_re = mlsml.MELSM.from_formula("y ~ x", df, groups="school", scale_re_formula="~ x").objective()
    assert not boundary.face_likelihood(scale_re).spec.uexact


@pytest.mark.parametrize("re_formula", ["~ 1", "~ x"])
def test_faces_by_the_u_exact_rule_equal_those_by_the_product_rule(re_formula):
    """The u-exact rule in the conditional form stays exact on the faces (15 nodes per school
    against the product rule's 11^2 or 9^3): the same faces, the same maxima."""
    df = zero_u0_data(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", re_formula=re_formula)
    lik = res.likelihood
    exact = {f.name: f.llf for f in boundary.search_faces(lik, res.theta)}
    product = {f.name: f.llf for f in boundary.search_faces(lik, res.theta, boundary.boundary_likelihood(lik))}
    assert set(exact) == set(product) and len(exact) >= 4
    for name, llf in exact.items():
        assert llf == pytest.approx(product[name], abs=boundary.FACE_RULE_TOL), name


def small_schools_slope_data(seed: int = 7, n_schools: int = 43) -> pd.DataFrame:
    """Schools of 4 to 30 with a random intercept and scale and no random slope (bench_cliffs.py's
    ``slope-tiny``): a random-slope fit ends at ``var(u1) = 0`` and its rank faces slide there."""
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(n_schools), rng.integers(4, 31, size=n_schools))
    x = rng.standard_normal(school.size)
    u, v = 0.6 * rng.standard_normal(n_schools), 0.4 * rng.standard_normal(n_schools)
    y = 0.5 * x + u[school] + np.exp(0.5 * (v[school] + 0.3 * x)) * rng.standard_normal(school.size)
    return pd.DataFrame({"y": y, "x": x, "school": school})


def test_a_face_fit_that_slides_onto_a_sub_face_stops_there_with_the_same_maxima(monkeypatch):
    """A face fit whose free variance reaches the faces' zero (FACE_ZERO) stops: the sub-face
    is searched on its own. The faces' maxima are those of fits run to their end, for fewer
    mode searches (the rank face of v slid var(u1) down by unit steps in log L for 30 Newton
    iterations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mlsml.fit("y ~ x", small_schools_slope_data(), groups="school", scale_formula="~ x", re_formula="~ x")
    lik = res.likelihood
    adapts = []
    adapt = type(lik).adapt
    monkeypatch.setattr(type(lik), "adapt", lambda self, theta: adapts.append(1) or adapt(self, theta))
    stopped = {f.name: f.llf for f in boundary.search_faces(lik, res.theta)}
    n_stopped = len(adapts)
    fit_face = boundary._fit_face
    monkeypatch.setattr(boundary, "_fit_face", lambda probe, start, free, zero_at=None: fit_face(probe, start, free))
    adapts.clear()
    full = {f.name: f.llf for f in boundary.search_faces(lik, res.theta)}
    assert set(stopped) == set(full) and len(full) >= 4
    for name, llf in full.items():
        assert stopped[name] == pytest.approx(llf, abs=1e-6), name
    assert n_stopped < 0.8 * len(adapts)
