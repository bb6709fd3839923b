"""Posterior summaries of the school effects against brute-force integration."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import scale_slope_data
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq

import mlsml
from mlsml.integrand import Sums, log_conditional, log_prior
from mlsml.predict import PosteriorGrid, _sums, product_likelihood
from mlsml.predict import posterior_moments as _posterior_moments


def posterior_moments(theta, design, nagq=None):
    return _posterior_moments(product_likelihood(design, nagq), theta)


SCHOOLS = [0, 7, 30, 64]  # codes: a large, a middling, a small and the last school of exam


def _brute_force(res, j: int, npts: int, width: float = 9.0):
    """Posterior of school ``j`` on a fine uniform tensor grid (+/- width posterior SDs).

    A plain Riemann sum on a uniform grid is spectrally accurate for these smooth,
    rapidly decaying densities. Returns the grid axes, the normalised masses, the
    posterior mean and the covariance.
    """
    design = res.model.design
    lay = design.layout
    s = _sums(res.theta, design)
    sj = Sums(*(a[j : j + 1] for a in s))
    _, _, L = lay.split(np.asarray(res.theta))
    m, C = posterior_moments(res.theta, design, 21 if lay.d < 3 else 9)
    sd = np.sqrt(np.diag(C[j]))
    axes = [np.linspace(m[j, i] - width * sd[i], m[j, i] + width * sd[i], npts) for i in range(lay.d)]
    mesh = np.meshgrid(*axes, indexing="ij")
    b = np.stack([g.ravel() for g in mesh], axis=-1)[None]
    h = np.asarray(log_conditional(b, sj, lay.q, lay.random_scale) + log_prior(b, np.asarray(L)))[0]
    p = np.exp(h - h.max())
    p /= p.sum()
    mean = p @ b[0]
    dev = b[0] - mean
    cov = dev.T @ (dev * p[:, None])
    return axes, p.reshape((npts,) * lay.d), mean, cov


def _quantiles_1d(axis, mass, probs):
    """Quantiles of a 1-d marginal tabulated as masses on a uniform grid.

    The density is interpolated by a cubic spline, whose antiderivative is the CDF
    (O(h^4), as Simpson's rule), inverted by Brent's method. (Not
    ``scipy.integrate.cumulative_simpson``: it needs scipy 1.12, setup.cfg allows 1.11.)
    """
    h = axis[1] - axis[0]
    F = CubicSpline(axis, mass / h).antiderivative()
    total = F(axis[-1])
    return np.array([brentq(lambda x, p=p: F(x) / total - p, axis[0], axis[-1], xtol=1e-14) for p in probs])


@pytest.mark.parametrize("j", SCHOOLS)
def test_moments_match_brute_force_2d(exam_m3, j):
    _, _, mean, cov = _brute_force(exam_m3, j, 801)
    re_, C = exam_m3.random_effects(cov=True)
    row = re_.iloc[j]
    np.testing.assert_allclose([row["u0"], row["v"]], mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose([row["u0_sd"], row["v_sd"]], np.sqrt(np.diag(cov)), atol=1e-4, rtol=0)
    np.testing.assert_allclose(C[j], cov, atol=1e-5, rtol=0)
    # in fact the default 11-point rule is far more accurate than required
    np.testing.assert_allclose([row["u0"], row["v"]], mean, atol=1e-8, rtol=0)


@pytest.mark.parametrize("j", SCHOOLS[:3])
def test_interval_quantiles_match_brute_force(exam_m3, j):
    axes, mass, _, _ = _brute_force(exam_m3, j, 1601)
    probs = [0.025, 0.5, 0.975]
    grid = PosteriorGrid.build(exam_m3.theta, exam_m3.model.design)
    qv = grid.quantile_v(probs)[j]
    qu = grid.quantile_linear(np.array([1.0]), probs)[j]
    np.testing.assert_allclose(qv, _quantiles_1d(axes[1], mass.sum(axis=0), probs), atol=1e-6)
    np.testing.assert_allclose(qu, _quantiles_1d(axes[0], mass.sum(axis=1), probs), atol=1e-6)
    t = exam_m3.school_effects()
    alpha = exam_m3.fe_scale.to_numpy()
    wbar = exam_m3.model.design.W.mean(axis=0)
    np.testing.assert_allclose(t.iloc[j][["var_lo", "var_hi"]], np.exp(wbar @ alpha + qv[[0, 2]]), rtol=1e-12)
    np.testing.assert_allclose(t.iloc[j][["mean_lo", "mean_hi"]], qu[[0, 2]], rtol=1e-12)
    # posterior mean of the school variance, E exp(wbar'alpha + v), by brute force
    ev = mass.sum(axis=0) @ np.exp(axes[1])
    assert t.iloc[j]["var"] == pytest.approx(np.exp(wbar @ alpha) * ev, rel=1e-8)


def test_grid_and_quadrature_agree_for_all_schools(exam_m3):
    design = exam_m3.model.design
    m, C = posterior_moments(exam_m3.theta, design)
    m2, C2 = PosteriorGrid.build(exam_m3.theta, design).moments()
    np.testing.assert_allclose(m, m2, atol=1e-7)
    np.testing.assert_allclose(C, C2, atol=1e-7)


def test_no_random_scale_is_exactly_normal(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", random_scale=False)
    design = res.model.design
    # closed form: u_j | y ~ N(tau2 S1 / (1 + tau2 S2), tau2 / (1 + tau2 S2)) with S's scaled by 1/sigma2
    s = _sums(res.theta, design)
    tau2 = res.params["var(u0)"]
    post_var = tau2 / (1 + tau2 * s.S2[:, 0, 0])
    post_mean = post_var * s.S1[:, 0]
    re_ = res.random_effects()
    assert list(re_.columns) == ["u0", "u0_sd", "n"]
    np.testing.assert_allclose(re_["u0"], post_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(re_["u0_sd"], np.sqrt(post_var), rtol=1e-10)
    t = res.school_effects(level=0.9)
    np.testing.assert_allclose(t["mean_hi"] - t["mean"], 1.6448536269514722 * np.sqrt(post_var), rtol=1e-8)
    np.testing.assert_allclose(t["var"], np.exp(res.params["scale:Intercept"]), rtol=1e-14)  # equal up to rounding
    assert (t["var_flag"] == 0).all() and t["var_rank"].isna().all()


@pytest.mark.slow
def test_random_slopes_three_dimensions(exam):
    res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", re_formula="~ standLRT")
    re_, C = res.random_effects(cov=True)
    assert list(re_.columns) == ["u0", "u0_sd", "u1", "u1_sd", "v", "v_sd", "n"]
    assert C.shape == (65, 3, 3)
    # the default 7-point rule in 3-d against a brute-force 3-d grid
    t0 = res.school_effects(z={"standLRT": 0.0})
    wbar = res.model.design.W.mean(axis=0)
    for j in (0, 30):
        axes, mass, mean, cov = _brute_force(res, j, 121, width=8.0)
        np.testing.assert_allclose(re_.iloc[j][["u0", "u1", "v"]], mean, atol=1e-4)
        np.testing.assert_allclose(C[j], cov, atol=1e-4)
        # interval quantiles of u0 (mixture of normals over v) and of v (exact marginal)
        q_u0 = _quantiles_1d(axes[0], mass.sum(axis=(1, 2)), [0.025, 0.975])
        q_v = _quantiles_1d(axes[2], mass.sum(axis=(0, 1)), [0.025, 0.975])
        np.testing.assert_allclose(t0.iloc[j][["mean_lo", "mean_hi"]], q_u0, atol=1e-5)
        np.testing.assert_allclose(np.log(t0.iloc[j][["var_lo", "var_hi"]].to_numpy(float)) - wbar @ res.fe_scale, q_v, atol=1e-5)
    # the exact grid representation integrates u out in closed form (any q)
    m2, C2 = PosteriorGrid.build(res.theta, res.model.design).moments()
    np.testing.assert_allclose(re_[["u0", "u1", "v"]].to_numpy(), m2, atol=5e-5)
    np.testing.assert_allclose(C, C2, atol=5e-5)
    # school mean progress is zbar'u_j with zbar the overall mean of (1, standLRT)
    zbar = res.model.design.Z.mean(axis=0)
    t = res.school_effects()
    np.testing.assert_allclose(t["mean"], re_[["u0", "u1"]].to_numpy() @ zbar, atol=1e-12)
    np.testing.assert_allclose(t0["mean"], re_["u0"], atol=1e-12)


def test_draws_follow_the_posterior(exam_m3):
    design = exam_m3.model.design
    grid = PosteriorGrid.build(exam_m3.theta, design)
    m, C = grid.moments()
    cu, v = grid.draws(np.array([1.0]), 20000, np.random.default_rng(1))
    # Monte Carlo error of the mean is sd / sqrt(20000) < 0.001
    np.testing.assert_allclose(cu.mean(axis=0), m[:, 0], atol=5 * np.sqrt(C[:, 0, 0].max() / 20000))
    np.testing.assert_allclose(v.mean(axis=0), m[:, 1], atol=5 * np.sqrt(C[:, 1, 1].max() / 20000))
    np.testing.assert_allclose(v.std(axis=0), np.sqrt(C[:, 1, 1]), rtol=0.05)
    r = np.array([np.corrcoef(cu[:, j], v[:, j])[0, 1] for j in range(5)])
    np.testing.assert_allclose(r, C[:5, 0, 1] / np.sqrt(C[:5, 0, 0] * C[:5, 1, 1]), atol=0.05)


def test_coarse_fit_still_gets_accurate_posteriors(exam):
    with warnings.catch_warnings():  # whether a 3-point fit converges is not the point here
        warnings.simplefilter("ignore")
        res = mlsml.fit("normexam ~ standLRT", exam, groups="school", scale_formula="~ standLRT", nagq=3)
    assert res.nagq == 3
    re_, C = res.random_effects(cov=True)
    # the summaries use at least the default 11 points per dimension, not the fit's 3
    m, C11 = posterior_moments(res.theta, res.model.design, 11)
    np.testing.assert_allclose(re_[["u0", "v"]].to_numpy(), m, rtol=0, atol=1e-12)
    np.testing.assert_allclose(C, C11, rtol=0, atol=1e-12)
    m3, _ = posterior_moments(res.theta, res.model.design, 3)
    assert np.abs(m3 - m).max() > 1e-8  # 3 points would have been visibly less accurate


# ---------------------------------------------------------------- prediction standard errors (issue 10)
NEW = pd.DataFrame({"standLRT": [0.0, 1.2, -0.7, 0.3], "school": [1, 8, 31, 65]}, index=[10, 20, 30, 40])


def _at(res, psi: np.ndarray):
    """The results object with the estimates replaced by ``psi`` (natural scale): predictions re-adapt to it."""
    theta = res.model.theta_from_params(psi)
    params = pd.Series(res.layout.to_natural(theta), index=res.params.index, name="estimate")
    return dataclasses.replace(res, theta=theta, params=params)


def _brute_force_var_params(res, new, kind: str, conditional: bool, step: float = 1e-4) -> np.ndarray:
    """Delta-method variance from a central-difference Jacobian of the public ``predict`` in the natural
    parameters (every evaluation re-adapts the posterior, and the variance uses the exact grid of ``v``)
    times :meth:`cov_params`."""
    psi = res.params.to_numpy()
    cols = []
    for m in range(psi.size):
        h = step * max(1e-2, abs(psi[m]))
        up, down = psi.copy(), psi.copy()
        up[m] += h
        down[m] -= h
        f_up = _at(res, up).predict(new, kind=kind, conditional=conditional).to_numpy()
        f_down = _at(res, down).predict(new, kind=kind, conditional=conditional).to_numpy()
        cols.append((f_up - f_down) / (2 * h))
    jac = np.stack(cols, axis=1)
    return np.einsum("im,mn,in->i", jac, res.cov_params().to_numpy(), jac)


@pytest.mark.parametrize("kind", ["mean", "variance", "sd"])
def test_population_prediction_se_is_the_delta_method(exam_m3, kind):
    r = exam_m3
    pr = r.get_prediction(NEW, kind=kind, conditional=False)
    np.testing.assert_array_equal(pr.predicted, r.predict(NEW, kind=kind, conditional=False).to_numpy())
    assert not pr.known.any() and np.all(pr.se_posterior == 0)
    V = r.cov_params().to_numpy()
    x = np.column_stack([np.ones(4), NEW["standLRT"]])
    if kind == "mean":  # x'b: exactly sqrt(x' V_b x)
        want = np.sqrt(np.einsum("ia,ab,ib->i", x, V[:2, :2], x))
    else:  # exp(c w'a + c^2 var(v)/2): gradient c pred w (alpha) and c^2 pred / 2 (var(v))
        c = 1.0 if kind == "variance" else 0.5
        grad = np.zeros((4, 7))
        grad[:, 2:4] = c * pr.predicted[:, None] * x
        grad[:, 5] = c * c * pr.predicted / 2
        want = np.sqrt(np.einsum("im,mn,in->i", grad, V, grad))
    np.testing.assert_allclose(pr.se, want, rtol=1e-6)
    np.testing.assert_allclose(pr.se, np.sqrt(_brute_force_var_params(r, NEW, kind, False)), rtol=1e-5)


@pytest.mark.parametrize("kind", ["mean", "variance"])
def test_conditional_prediction_se_against_brute_force(exam_m3, kind):
    """se^2 = posterior variance of the school's quantity + delta-method variance of its posterior mean."""
    r = exam_m3
    pr = r.get_prediction(NEW, kind=kind)
    np.testing.assert_array_equal(pr.predicted, r.predict(NEW, kind=kind).to_numpy())
    assert pr.known.all()
    np.testing.assert_allclose(pr.se**2, pr.se_params**2 + pr.se_posterior**2, rtol=1e-12)
    # the parameter part: finite differences of the public predict (re-adapted posteriors) times cov_params
    np.testing.assert_allclose(pr.se_params**2, _brute_force_var_params(r, NEW, kind, True), rtol=2e-3)
    # the posterior part: a brute-force tensor-grid posterior of each school
    codes = list(r.model.design.group_labels)
    a = r.fe_scale.to_numpy()
    for i, (x, school) in enumerate(zip(NEW["standLRT"], NEW["school"])):
        axes, mass, mean, cov = _brute_force(r, codes.index(school), 161)
        if kind == "mean":
            want = cov[0, 0]
        else:
            v = np.meshgrid(*axes, indexing="ij")[1]
            e1, e2 = (mass * np.exp(v)).sum(), (mass * np.exp(2 * v)).sum()
            want = np.exp(2 * (a[0] + a[1] * x)) * (e2 - e1**2)
        assert pr.se_posterior[i] ** 2 == pytest.approx(want, rel=1e-5)
    # the school's posterior dominates: the conditional SE exceeds the population one for the mean
    if kind == "mean":
        assert np.all(pr.se > r.get_prediction(NEW, conditional=False).se)


def test_summary_frame_has_statsmodels_columns_and_positive_variance_intervals(exam_m3):
    r = exam_m3
    frame = r.get_prediction(NEW).summary_frame(alpha=0.1)
    assert list(frame.columns) == ["mean", "mean_se", "mean_ci_lower", "mean_ci_upper"]
    assert frame.index.equals(NEW.index)
    np.testing.assert_allclose(frame["mean_ci_upper"] - frame["mean"], 1.6448536269514722 * frame["mean_se"], rtol=1e-12)
    var = r.get_prediction(NEW, kind="variance").summary_frame()
    assert (var["mean_ci_lower"] > 0).all()
    np.testing.assert_allclose(
        np.log(var["mean_ci_upper"] / var["mean"]), 1.959963984540054 * var["mean_se"] / var["mean"], rtol=1e-12
    )
    # the fitted rows when newdata is None, with the caller's index
    assert r.get_prediction().summary_frame().index.equals(r.fittedvalues.index)
    with pytest.raises(mlsml.ModelSpecError, match="alpha"):
        r.get_prediction(NEW).summary_frame(alpha=1.5)


def test_prediction_se_without_random_scale(exam):
    r = mlsml.fit("normexam ~ standLRT", exam, groups="school", re_formula="~ standLRT", random_scale=False)
    pr = r.get_prediction(NEW)
    np.testing.assert_allclose(pr.se_params**2, _brute_force_var_params(r, NEW, "mean", True), rtol=2e-3)
    post = r.random_effects(cov=True)[1]
    codes = list(r.model.design.group_labels)
    z = np.column_stack([np.ones(4), NEW["standLRT"]])
    want = [z[i] @ post[codes.index(s)] @ z[i] for i, s in enumerate(NEW["school"])]
    np.testing.assert_allclose(pr.se_posterior**2, want, rtol=1e-10)
    v = r.get_prediction(NEW, kind="variance")  # no random scale: exp(w'a), a parameter function only
    assert np.all(v.se_posterior == 0) and np.all(v.se > 0)


# ---------------------------------------------------------------- schools not in the fit (issue 10)
def test_group_type_mismatch_warns_and_says_how_to_convert(exam_m3):
    r = exam_m3
    as_text = NEW.assign(school=NEW["school"].astype(str))
    with pytest.warns(mlsml.UnknownGroupWarning) as rec:
        pred = r.predict(as_text)
    msg = str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller's line
    assert "4 of 4 rows" in msg and "'1'" in msg and "integer" in msg and "string" in msg
    assert "pd.to_numeric(newdata['school'])" in msg
    np.testing.assert_allclose(pred, r.predict(NEW, conditional=False), rtol=1e-12)  # population predictions
    with pytest.warns(mlsml.UnknownGroupWarning, match="1 of 4 rows.*999") as rec:
        r.get_prediction(NEW.assign(school=[1, 8, 999, 65]))
    assert "convert" not in str(rec[0].message)  # same type: just a new school
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.predict(NEW)  # all schools known: no warning
        r.predict(as_text, conditional=False)  # population predictions asked for: no warning


def test_missing_or_float_group_values(exam_m3):
    with pytest.warns(mlsml.UnknownGroupWarning) as rec:
        exam_m3.predict(NEW.assign(school=[1.0, 8.0, np.nan, 65.0]))  # floats match integer ids
    msg = str(rec[0].message)
    assert "1 of 4 rows" in msg and "1 of them have no 'school' value (missing)" in msg and "floating" not in msg


def test_text_group_ids_with_numeric_newdata(exam):
    df = exam.assign(school=exam["school"].map("s{:02d}".format))
    r = mlsml.fit("normexam ~ standLRT", df, groups="school", random_scale=False)
    with pytest.warns(mlsml.UnknownGroupWarning, match="string but newdata's are integer") as rec:
        r.predict(NEW)
    assert "astype" not in str(rec[0].message)  # "1" would not match "s01": no conversion to suggest
    df2 = exam.assign(school=exam["school"].astype(str))
    r2 = mlsml.fit("normexam ~ standLRT", df2, groups="school", random_scale=False)
    with pytest.warns(mlsml.UnknownGroupWarning, match=r"newdata\['school'\].astype\(str\)"):
        r2.predict(NEW)


# ---------------------------------------------------------------- extended models
def test_predictions_of_a_scale_slope_model_use_each_rows_g():
    """ln var(e) = w'a + v0 + v1 x: the variance prediction is exp(w'a) E(exp(v0 + v1 x) | y) row by row."""
    df = scale_slope_data()
    r = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x", scale_re_formula="~ x", quadrature="product", nagq=3)
    new = pd.DataFrame({"x": [-1.0, 0.0, 1.5, 0.5], "school": [2, 2, 2, 11]})
    design = r.model.design
    lik = product_likelihood(design, 15)  # finer than the prediction's rule
    nodes = lik.adapt(r.theta)
    p = lik.posterior_weights(r.theta, nodes)
    codes = list(design.group_labels)
    a = r.fe_scale.to_numpy()
    want = []
    for x, s in zip(new["x"], new["school"]):
        j = codes.index(s)
        gv = nodes.b[j, :, 1] + nodes.b[j, :, 2] * x
        want.append(np.exp(a[0] + a[1] * x) * (p[j] @ np.exp(gv)))
    np.testing.assert_allclose(r.predict(new, kind="variance"), want, rtol=1e-4)
    pop = r.predict(new, kind="variance", conditional=False)
    S = r.cov_re.to_numpy()[1:, 1:]
    g = np.column_stack([np.ones(4), new["x"]])
    np.testing.assert_allclose(pop, np.exp(g @ a + 0.5 * np.einsum("ia,ab,ib->i", g, S, g)), rtol=1e-12)
    u = r.random_effects()["u0"]
    np.testing.assert_allclose(r.predict(new), r.predict(new, conditional=False) + u.loc[new["school"]].to_numpy(), rtol=1e-12)
    pr = r.get_prediction(new, kind="variance")
    assert np.all(np.isfinite(pr.se)) and np.all(pr.se_posterior > 0) and np.all(pr.se_params > 0)


@pytest.fixture(scope="module")
def timestamp_fits():
    """A random slope on ``x`` and on ``x + 1.7e9`` (a Unix timestamp): the same model."""
    df = mlsml.simulate.demo_data(n_groups=30, seed=4)
    shifted = df.assign(x=df["x"] + 1.7e9)
    kw = dict(groups="school", re_formula="~ x", scale_formula="~ x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlsml.fit("y ~ x", df, **kw), mlsml.fit("y ~ x", shifted, **kw)


def test_posteriors_of_a_timestamp_covariate_are_those_of_the_centred_fit(timestamp_fits):
    """The school posteriors are computed on the fit's standardised scale and mapped back
    (fuzz case 7772673247089237100: on the raw scale Z'Z of x ~ 8e9 is singular in floating
    point and ``summary()`` raised ``LinAlgError``); they are equivariant under the shift."""
    res, ts = timestamp_fits
    # two fits, each to the optimiser's tolerance: equal to ~1e-5 in llf, ~1e-4 in estimates
    assert ts.llf == pytest.approx(res.llf, abs=1e-3)
    for kind in ("mean", "variance"):
        np.testing.assert_allclose(ts.predict(kind=kind), res.predict(kind=kind), rtol=2e-3, atol=1e-3)
    re, re_ts = res.random_effects(), ts.random_effects()
    # u1 and v are the same effects; u0 is the intercept at x = 0, 1.7e9 away: u0 - 1.7e9 u1
    for col in ("u1", "u1_sd", "v", "v_sd"):
        np.testing.assert_allclose(re_ts[col], re[col], rtol=2e-3, atol=1e-3)
    assert "Log-Likelihood" in ts.summary().as_text()
    np.testing.assert_allclose(ts.resid, res.resid, rtol=2e-3, atol=1e-3)
