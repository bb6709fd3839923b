r"""Cluster-robust (sandwich) standard errors from the schools' score contributions.

The model-based covariance of the estimates is the inverse observed information
:math:`A = (-H)^{-1}`. When the model is misspecified (heavy-tailed residuals, a skewed
random scale) or the likelihood is a pseudo-likelihood (sampling weights, :mod:`mlsml.weights`)
that is not the estimator's covariance. With the log-likelihood a sum over independent
schools, :math:`\ell(\theta) = \sum_j \ell_j(\theta)` (each :math:`\ell_j = W_j \log L_j`
with its level-2 weight), the estimator's covariance is estimated by the sandwich

.. math::

    V = A\, B\, A, \qquad B = \frac{J}{J-1} \sum_{j=1}^J s_j s_j', \qquad
    s_j = \frac{\partial \ell_j}{\partial\theta}\Big|_{\hat\theta}

(Huber 1967, White 1982; for multilevel models Rabe-Hesketh and Skrondal 2006; statsmodels'
``cov_type="cluster"`` and Stata's ``vce(robust)`` with the schools as clusters, with the same
:math:`J/(J-1)` factor). It is computed on the optimiser scale ``theta`` (the bread from the
standardised information, :func:`mlsml.optimize.theta_covariance`) and mapped to the natural
parameters by the delta method like the model-based one, so every standard error of the
package (``bse``, correlations, school tables, predictions, the MIXWILD-style report) uses it
when ``res.cov_type == "robust"``.

With **frequency weights** a school of weight :math:`W_j` stands for :math:`W_j` identical
clusters, so :math:`B = \frac{J^*}{J^*-1}\sum_j W_j\, s_j s_j'` with :math:`s_j` the
contribution of one copy and :math:`J^* = \sum_j W_j`: the sandwich of the replicated data.

The score contributions :math:`s_j` are the derivatives of each school's term with the
quadrature nodes held where the likelihood adapted them (as the gradient the optimiser
uses): in closed form for the core model under the u-exact rule
(:func:`mlsml.derivatives.closed_form_gradient`), otherwise by autograd as the derivative of
:math:`\nabla_\theta \sum_j c_j \ell_j` in the school multipliers :math:`c_j`
(:func:`school_scores`), ``n_params`` reverse passes, the cost of one Hessian.
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np

from .derivatives import closed_form_gradient
from .errors import ModelSpecError
from .likelihood import Likelihood
from .quadrature import Nodes
from .validate import describe_value

#: The values of ``cov_type`` (statsmodels' spelling for the model-based one).
COV_TYPES = ("nonrobust", "robust")


def check_cov_type(cov_type, design) -> str:
    """The covariance type of a fit: the default for ``None`` (robust with sampling weights), else checked.

    Examples
    --------
    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> check_cov_type(None, mlsml.MELSM.from_formula("y ~ x", df, groups="school").design)
    'nonrobust'
    """
    if cov_type is None:
        kind = (design.info.get("weights") or {}).get("kind")
        return "robust" if kind == "sampling" else "nonrobust"
    if not isinstance(cov_type, str) or cov_type not in COV_TYPES:
        raise ModelSpecError(f"cov_type must be one of {COV_TYPES} (or None for the default), not {describe_value(cov_type)}")
    return cov_type


def school_scores(lik: Likelihood, theta, nodes: Nodes | None = None) -> np.ndarray:
    r"""The score contribution of every school, shape ``(J, n_params)`` (optimiser scale).

    Row ``j`` is :math:`\partial (W_j \log L_j) / \partial\theta` with the nodes held fixed
    (adapted at ``theta`` unless given); the rows sum to :meth:`Likelihood.value_and_grad`'s
    gradient.

    Examples
    --------
    >>> import numpy as np, mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school")
    >>> S = school_scores(res.likelihood, res.theta)
    >>> S.shape, bool(np.allclose(S.sum(axis=0), res.likelihood.value_and_grad(res.theta)[1]))
    ((40, 6), True)
    """
    theta = np.asarray(theta, dtype=float)
    if not isinstance(lik, Likelihood):  # a likelihood summed over blocks (mlsml.distributed): this, per block
        return lik.school_scores(theta, nodes)
    if lik.closed_form and lik.spec.uexact:
        _, nd, weights, _ = lik._closed_form_terms(theta, nodes, second=False)
        return closed_form_gradient(lik.integrand, theta, nd, weights, per_school=True)
    if nodes is None:
        nodes = lik.adapt(theta)
    design = lik.design
    J = design.ngroups
    W = np.ones(J) if design.group_weights is None else np.asarray(design.group_weights, dtype=float)

    def weighted_gradient(c):
        return autograd.grad(lambda th: anp.sum(c * lik._per_school(th, nodes)))(theta)

    vjp, _ = autograd.make_vjp(weighted_gradient)(np.ones(J))
    P = theta.size
    out = np.empty((J, P))
    for a in range(P):
        e = np.zeros(P)
        e[a] = 1.0
        out[:, a] = vjp(e)
    return out * W[:, None]


def meat(scores: np.ndarray, design) -> np.ndarray:
    r"""``B`` of the module docstring from the weighted score contributions ``(J, n_params)``.

    With frequency weights the rows are divided by ``W_j`` (one copy's score) and counted
    ``W_j`` times.
    """
    kind = (design.info.get("weights") or {}).get("kind")
    if kind == "frequency" and design.group_weights is not None:
        W = np.asarray(design.group_weights, dtype=float)
        keep = W > 0
        one = scores[keep] / W[keep, None]
        n_clusters = float(W.sum())
        B = (one * W[keep, None]).T @ one
    else:
        n_clusters = float(scores.shape[0])
        B = scores.T @ scores
    if n_clusters > 1:
        B = B * (n_clusters / (n_clusters - 1.0))
    return 0.5 * (B + B.T)


def sandwich(bread: np.ndarray, scores: np.ndarray, design) -> np.ndarray:
    r"""The cluster-robust covariance :math:`A B A` (module docstring) on the scale of ``bread``.

    Parameters
    ----------
    bread : ndarray (n_params, n_params)
        The model-based covariance :math:`(-H)^{-1}`.
    scores : ndarray (J, n_params)
        :func:`school_scores` (same parameterisation as ``bread``).
    design : Design
        For the kind of weights.

    Examples
    --------
    >>> import numpy as np, mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", cov_type="robust")
    >>> A = np.linalg.inv(-res.hessian)
    >>> V = sandwich(A, school_scores(res.likelihood, res.theta), res.model.design)
    >>> bool(np.allclose(V, res.cov_theta(), rtol=1e-6))
    True
    """
    V = bread @ meat(scores, design) @ bread
    return 0.5 * (V + V.T)
