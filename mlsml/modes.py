r"""One Newton solver for the posterior modes of the school effects, vectorised over schools.

For school ``j`` the mode ``m_j`` of ``h_j(b) = log f(y_j | b) + log phi(b; 0, Sigma_j)``
and the curvature ``-H_j`` there centre and scale the quadrature
(:func:`mlsml.quadrature.place_nodes`). The integrand (:mod:`mlsml.integrand`)
supplies ``h_j`` (up to a constant) and its gradient and Hessian; this module only
iterates:

.. math::

    b \leftarrow b + t\,(-H)^{-1} g, \qquad t = 1, 1/2, 1/4, \dots

until ``h_j`` does not decrease, for every school until its Newton decrement
``g'(-H)^{-1}g`` is below ``tol``. Where ``-H`` is not positive definite the
Fisher-scoring matrix is used. The start is the exact mode of the mean effects at
``v = 0`` (one Fisher step in ``u``).

A school is also finished when its (possibly damped) step no longer raises ``h`` at
all: it is then at its mode to machine precision and its decrement is rounding
noise (as near a singular ``Sigma``, where ``P`` is huge). Without this such
schools were iterated until ``maxiter`` with :data:`MAX_HALVINGS` halvings each.
"""

from __future__ import annotations

import numpy as np

#: Step halvings tried per Newton iteration.
MAX_HALVINGS = 40

#: Relative tolerance of the "h did not decrease" test of a step.
ASCENT_RTOL = 1e-12

#: Default squared Newton decrement below which a school's mode is final.
MODE_TOL = 1e-18

#: Default maximum Newton iterations.
MODE_MAXITER = 100

#: A step that fails the ascent test is not halved further once the rise it still predicts
#: (``t`` times the squared Newton decrement) is below this fraction of the magnitude of the
#: terms ``h_j`` is summed from (the problem's ``magnitude(b)``): rounding hides such a rise,
#: so the school has stalled at its mode. Near a singular ``Sigma``, where ``b'Pb`` is large,
#: High School and Beyond's variance-slope model otherwise went through all
#: :data:`MAX_HALVINGS` halvings in 6 of its ~13 iterations (250-360 evaluations of ``h`` per
#: node adaptation, 0.13 s). A full Newton step is always tried, so well-conditioned schools
#: still converge quadratically to ``tol``.
MODE_NOISE_RTOL = 1e-13


#: Largest dimension solved and tested in closed form (numpy's batched ``solve`` and
#: ``eigvalsh`` cost about 0.2 ms each for the 465 2 x 2 systems of London, as much as
#: the rest of a Newton iteration; the node adaptation runs them ~7 times per evaluation).
CLOSED_FORM_DIM = 2


def is_pd(M: np.ndarray) -> np.ndarray:
    """Whether each of the stacked matrices ``M`` (J, d, d) is positive definite (after symmetrising).

    For ``d <= CLOSED_FORM_DIM`` by the leading minors (Sylvester's criterion), beyond by
    the smallest eigenvalue.
    """
    sym = 0.5 * (M + np.swapaxes(M, 1, 2))
    d = sym.shape[-1]
    if d == 1:
        return sym[:, 0, 0] > 0
    if d == 2:
        return (sym[:, 0, 0] > 0) & (sym[:, 0, 0] * sym[:, 1, 1] - sym[:, 0, 1] ** 2 > 0)
    return np.linalg.eigvalsh(sym)[:, 0] > 0


def solve(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``A_j^{-1} g_j`` for stacked ``A`` (J, d, d) and ``g`` (J, d).

    For ``d <= CLOSED_FORM_DIM`` by Cramer's rule when every determinant is finite and
    non-zero; otherwise (and beyond) :func:`numpy.linalg.solve`, which raises
    :class:`numpy.linalg.LinAlgError` for an exactly singular ``A``.
    """
    d = A.shape[-1]
    if d == 1 and np.all(np.isfinite(A)) and np.all(A[:, 0, 0] != 0):
        return g / A[:, :, 0]
    if d == 2:
        a, b, c, e = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
        det = a * e - b * c
        if np.all(np.isfinite(det)) and np.all(det != 0):
            return np.stack([(e * g[:, 0] - b * g[:, 1]) / det, (a * g[:, 1] - c * g[:, 0]) / det], axis=1)
    return np.linalg.solve(A, g[:, :, None])[:, :, 0]


def _neg_hessian(problem, b: np.ndarray):
    g, H = problem.derivs(b)
    negH = -H
    ok = is_pd(negH)
    if not ok.all():
        _, Hf = problem.derivs(b, fisher=True)
        negH[~ok] = -Hf[~ok]
    return g, negH


def posterior_modes(problem, q: int, tol: float = MODE_TOL, maxiter: int = MODE_MAXITER) -> tuple[np.ndarray, np.ndarray]:
    """Modes ``m_j`` of ``h_j`` and ``-H_j`` there, for all schools.

    Parameters
    ----------
    problem : object
        With attributes ``J``, ``d`` and methods ``f(b) -> (J,)``,
        ``magnitude(b) -> (J,)`` (the sum of the absolute values of the terms of ``f``:
        its rounding scale) and
        ``derivs(b, fisher=False) -> (g (J, d), H (J, d, d))`` (numpy), as
        :meth:`mlsml.integrand.Integrand.mode_problem` returns.
    q : int
        Number of mean effects (the first ``q`` entries of ``b``).
    tol : float
        Squared Newton decrement below which a school is finished.
    maxiter : int

    Returns
    -------
    mode : ndarray (J, d)
    neg_hess : ndarray (J, d, d)
    """
    J, d = problem.J, problem.d
    b = np.zeros((J, d))
    if q:  # exact u-mode at v = 0 (ignoring the u-v prior coupling)
        g, H = problem.derivs(b, fisher=True)
        b[:, :q] = solve(-H[:, :q, :q], g[:, :q])
    f = problem.f(b)
    stalled = np.zeros(J, dtype=bool)
    negH = None
    for _ in range(maxiter):
        g, negH = _neg_hessian(problem, b)
        step = solve(negH, g)
        dec = np.einsum("jd,jd->j", g, step)  # Newton decrement (squared)
        active = (dec > tol) & ~stalled
        if not active.any():
            break  # negH is the curvature at the final b
        floor = None  # the rounding scale, computed once a step fails the ascent test
        t = np.ones(J)
        for _half in range(MAX_HALVINGS):
            bn = b + t[:, None] * step
            fn = problem.f(bn)
            ok = (fn >= f - ASCENT_RTOL * np.abs(f)) | ~active
            if ok.all():
                break
            if floor is None:
                floor = MODE_NOISE_RTOL * problem.magnitude(b)
            lost = ~ok & (t * dec <= floor)  # the rise left to see is below rounding: stalled
            if (ok | lost).all():
                break
            t = np.where(ok | lost, t, 0.5 * t)
        upd = active & ok
        stalled |= active & (~ok | (fn <= f))
        b[upd] = bn[upd]
        f[upd] = fn[upd]
        negH = None
    if negH is None:
        _, negH = _neg_hessian(problem, b)
    return b, negH
