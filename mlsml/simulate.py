"""Simulating data from the mixed-effects location scale model.

:func:`draw_responses` draws new responses for an existing design (the basis
of recovery tests and the parametric bootstrap); :func:`simulate_data` makes
a complete two-level data set with one covariate ``x``; :func:`demo_data` is
the London-style data set used by ``mlsml demo`` (fixed seed, parameters of
the paper's Model 3 on the London design).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .design import Design
from .integrand import loaded_Z, make_integrand

#: Parameters of the demo data: close to the paper's Model 3 estimates.
DEMO_TRUTH = {
    "beta": (0.0, 0.67),
    "alpha": (-0.86, 0.03),
    "cov": ((0.058, -0.015), (-0.015, 0.030)),
}


def draw_responses(design: Design, theta: np.ndarray, rng: np.random.Generator, n_reps: int = 1) -> np.ndarray:
    r"""Draw responses from the model with parameters ``theta`` (optimiser scale).

    .. math::

        b_j = (u_j, v_j) = L_j \epsilon_j, \qquad
        y_{ij} = x_{ij}'\beta + z_{ij}'u_j + \exp\{(w_{ij}'\alpha + g_{ij}'v_j)/2\}\, e_{ij},

    with ``epsilon_j``, ``e_ij`` standard normal, ``L_j`` the Cholesky factor of the
    prior of the school effects as the likelihood has it
    (:meth:`mlsml.integrand.Integrand.prior_chol`: school-specific ``Sigma_j`` with
    ``bs_formula``) and ``g_ij`` the row of ``scale_re_formula`` (1 for the plain
    random scale ``v_j``). With ``association="quadratic"`` the log variance has
    :math:`\gamma\,(u_{0j}/\operatorname{sd}(u_{0j}))^2` added (``quad(u0,v)``).

    Parameters
    ----------
    design : Design
        Covariates and grouping are kept; only ``y`` is drawn.
    theta : ndarray
        Parameters on the optimiser scale (see :mod:`mlsml.params`).
    rng : numpy.random.Generator
    n_reps : int
        Number of independent draws.

    Returns
    -------
    ndarray (n_reps, N)
        Responses in the design's (group-sorted) row order.

    Examples
    --------
    >>> import numpy as np, mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    >>> y = draw_responses(res.model.design, res.theta, np.random.default_rng(1), n_reps=2)
    >>> y.shape == (2, res.nobs)
    True

    :meth:`mlsml.MELSMResults.simulate` returns the same draws in the caller's row order.
    """
    lay = design.layout
    # the integrand's prior: Sigma_j = L_j L_j' is school-specific with bs_formula
    integrand = make_integrand(design)
    beta, alpha, prior = integrand.split(np.asarray(theta, dtype=float))
    beta, alpha, L = np.asarray(beta), np.asarray(alpha), np.asarray(prior.chol)
    Z = np.asarray(loaded_Z(design, prior))  # level-1 bs_formula columns load u0 row by row
    gamma = lay.quad(np.asarray(theta, dtype=float))  # quad(u0,v): + gamma (u0 / sd(u0))^2 in the log variance
    sd0 = (L[0, 0] if L.ndim == 2 else L[:, 0, 0]) if gamma is not None else None
    J, N, q = design.ngroups, design.nobs, lay.q
    mu = design.X @ beta
    eta = np.asarray(design.log_variance_index(alpha))
    out = np.empty((n_reps, N))
    for r in range(n_reps):
        z = rng.standard_normal((J, lay.d))
        b = z @ L.T if L.ndim == 2 else np.einsum("jde,je->jd", L, z)
        u = b[:, :q]
        if design.G is not None:  # scale_re_formula: g_ij'v_j
            lv = eta + np.einsum("nv,nv->n", design.G, b[design.group, q:])
        else:
            lv = eta + (b[design.group, q] if lay.random_scale else 0.0)
        if gamma is not None:
            lv = lv + (float(gamma) * (b[:, 0] / sd0) ** 2)[design.group]
        zu = np.einsum("iq,iq->i", Z, u[design.group])
        out[r] = mu + zu + np.exp(0.5 * lv) * rng.standard_normal(N)
    return out


def simulate_data(
    group_sizes,
    beta=(0.0, 0.7),
    alpha=(-0.8, 0.05),
    cov=((0.05, 0.025), (0.025, 0.05)),
    random_scale: bool = True,
    random_slope: bool = False,
    x_between_sd: float = 0.3,
    seed: int | None = None,
) -> pd.DataFrame:
    """Simulate a two-level data set with one student-level covariate ``x``.

    The model is ``y = beta0 + beta1 x + u0 (+ u1 x) + e`` with
    ``ln var(e) = alpha0 + alpha1 x (+ v)``; ``x`` has a school mean drawn from
    ``N(0, x_between_sd^2)`` and within-school ``N(0, 1 - x_between_sd^2)``.

    Parameters
    ----------
    group_sizes : int sequence
        Number of students in each school.
    beta, alpha : sequence of two floats
    cov : array-like
        Covariance of ``(u0[, u1][, v])``.
    random_scale, random_slope : bool
    x_between_sd : float
    seed : int, optional

    Returns
    -------
    pandas.DataFrame
        Columns ``school, student, y, x``.

    Examples
    --------
    Thirty schools of twenty students with a random intercept and a random scale:

    >>> df = simulate_data([20] * 30, seed=1)
    >>> df.shape, list(df.columns)
    ((600, 4), ['school', 'student', 'y', 'x'])
    >>> int(df["school"].nunique())
    30
    """
    rng = np.random.default_rng(seed)
    sizes = np.asarray(group_sizes, dtype=int)
    J, N = len(sizes), int(sizes.sum())
    cov = np.asarray(cov, dtype=float)
    d = 1 + int(random_slope) + int(random_scale)
    if cov.shape != (d, d):
        raise ValueError(f"cov must be {d}x{d} for random_slope={random_slope}, random_scale={random_scale}")
    school = np.repeat(np.arange(1, J + 1), sizes)
    xm = rng.normal(0, x_between_sd, J)
    x = xm[school - 1] + rng.normal(0, np.sqrt(max(1 - x_between_sd**2, 1e-12)), N)
    b = rng.multivariate_normal(np.zeros(d), cov, size=J)
    u0 = b[:, 0][school - 1]
    u1 = b[:, 1][school - 1] if random_slope else 0.0
    v = b[:, -1][school - 1] if random_scale else 0.0
    sd = np.exp(0.5 * (alpha[0] + alpha[1] * x + v))
    y = beta[0] + beta[1] * x + u0 + u1 * x + sd * rng.standard_normal(N)
    student = np.concatenate([np.arange(1, n + 1) for n in sizes]) if J else np.zeros(0, int)
    return pd.DataFrame({"school": school, "student": student, "y": y, "x": x})


def demo_data(n_groups: int = 150, seed: int = 2019) -> pd.DataFrame:
    """London-style demo data: ``n_groups`` schools of 10 to 400 students.

    School sizes are drawn from a gamma distribution with mean about 150
    (London secondary schools); parameters are :data:`DEMO_TRUTH`.

    Examples
    --------
    >>> df = demo_data(n_groups=40, seed=1)
    >>> int(df["school"].nunique()), len(df) > 1000
    (40, True)
    """
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.round(rng.gamma(3.0, 50.0, n_groups)), 10, 400).astype(int)
    return simulate_data(
        sizes,
        beta=DEMO_TRUTH["beta"],
        alpha=DEMO_TRUTH["alpha"],
        cov=DEMO_TRUTH["cov"],
        random_scale=True,
        seed=seed + 1,
    )
