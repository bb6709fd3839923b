r"""The integrated log-likelihood: one object for every model class and rule.

.. math::

    \ell(\theta) = \sum_j W_j \log L_j, \qquad L_j = \int \exp h_j(b)\, db,
    \qquad h_j(b) = \sum_i w_{ij} \log f(y_{ij} \mid b) + \log\phi(b; 0, \Sigma_j),

with the level-2 weights ``W_j`` and the level-1 weights ``w_ij`` of :mod:`mlsml.weights`
(all one without weights; the level-1 weights enter through the integrand).

A :class:`Likelihood` is built from a design, the integrand of its model class
(:mod:`mlsml.integrand`) and a :class:`~mlsml.quadrature.QuadratureSpec`. With
the posterior mode ``m_j`` (:mod:`mlsml.modes`) and ``C_j`` the Cholesky factor
of the posterior covariance of the block the rule covers
(:func:`mlsml.quadrature.place_nodes`),

- product rule: :math:`\log L_j \approx \log|C_j| + \operatorname{lse}_k\{h_j(m_j + C_j z_k) + \log\tilde w_k\}`;
- u-exact rule: the same over the scale effects ``v`` only, with ``h_j`` replaced by
  :math:`g_j(v) = \log\int \exp h_j(u, v)\,du` in closed form (:mod:`mlsml.gaussian`).

The value with the nodes held fixed (:meth:`Likelihood.at_nodes`) is written in
``autograd.numpy``: its gradient and Hessian are exact, and the optimiser
(:func:`mlsml.optimize.maximize`) re-adapts the nodes at every evaluation
(:meth:`Likelihood.adapt`), so :meth:`Likelihood.value` is a pure function of the
parameters. Every consumer (optimiser, results, boundary checks, profiles,
bootstrap, school predictions) receives the object and so evaluates the fit's own
rule; :meth:`Likelihood.with_spec` gives a new object for checks with another rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import autograd
import autograd.numpy as anp
import numpy as np

from . import node_sums
from .derivatives import GivenSums, autograd_reduced, closed_form_gradient, closed_form_reduced, node_derivatives, sums_hessian
from .design import Design
from .integrand import Integrand, SchoolSums, make_integrand
from .modes import posterior_modes
from .ops import logsumexp
from .quadrature import Nodes, QuadratureSpec, Rule, default_nagq, place_nodes

#: Points per dimension of the rule under which :meth:`Likelihood.start_hessian` seeds the
#: optimiser for ``scale_re_formula`` models with several scale effects.
START_HESSIAN_NAGQ = 7

#: What evaluating a rule can raise where it cannot be evaluated at all (an exactly singular
#: block in the mode finder, a NaN reaching SciPy): :func:`value_or_nan` turns them into NaN.
EVALUATION_ERRORS = (np.linalg.LinAlgError, ValueError, FloatingPointError)


@dataclass(frozen=True, eq=False)
class Likelihood:
    """The integrated log-likelihood of a design under a quadrature rule (frozen).

    Attributes
    ----------
    design : Design
    integrand : Integrand
    spec : QuadratureSpec

    Examples
    --------
    Without a random scale the adaptive rule is exact, so one point gives the exact
    log-likelihood (the Laplace approximation of a Gaussian integral):

    >>> import mlsml
    >>> df = mlsml.simulate.demo_data(n_groups=40, seed=1)
    >>> res = mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    >>> one = res.likelihood.with_spec(nagq=1)
    >>> bool(abs(one.value(res.theta) - res.llf) < 1e-6)
    True
    """

    design: Design
    integrand: Integrand
    spec: QuadratureSpec

    @classmethod
    def build(cls, design: Design, spec: QuadratureSpec) -> Likelihood:
        """The likelihood of ``design`` with the integrand of its model class under ``spec``."""
        return cls(design, make_integrand(design), spec)

    # ------------------------------------------------------------ the rule
    @property
    def layout(self):
        """The parameter layout of the design."""
        return self.design.layout

    @property
    def nagq(self) -> int:
        """Points per dimension of the rule."""
        return self.spec.nagq

    @property
    def rule(self) -> Rule:
        """The standard (unadapted) rule."""
        lay = self.layout
        return self.spec.rule(lay.q, lay.n_v)

    def with_spec(self, kind: str | None = None, nagq: int | None = None, prune: float | None = None) -> Likelihood:
        """A new likelihood of the same design with another rule (unchanged fields kept)."""
        spec = self.spec
        new = QuadratureSpec(
            kind=spec.kind if kind is None else kind,
            nagq=spec.nagq if nagq is None else int(nagq),
            prune=(spec.prune if kind is None or kind == "product" else 0.0) if prune is None else float(prune),
        )
        return dataclasses.replace(self, spec=new)

    def as_product(self) -> Likelihood:
        """This likelihood if it uses the product rule, else the product rule of the default size.

        For probes the u-exact rule cannot make (nearly singular ``Sigma``, see
        :mod:`mlsml.boundary`) and for the posterior nodes of every school effect.
        """
        if self.spec.uexact:
            return self.with_spec(kind="product", nagq=default_nagq(self.layout.d), prune=0.0)
        return self

    def with_design(self, design: Design) -> Likelihood:
        """The same integrand class and rule on another design (e.g. a simulated response)."""
        return Likelihood.build(design, self.spec)

    def with_layout(self, layout, spec: QuadratureSpec) -> Likelihood:
        """The likelihood of the same data under another parameter layout and rule (the core
        fit of :func:`mlsml.optimize._warm_start`)."""
        return Likelihood.build(dataclasses.replace(self.design, layout=layout), spec)

    # ------------------------------------------------------------ nodes
    def modes(self, theta) -> tuple[np.ndarray, np.ndarray]:
        """Posterior modes ``(J, d)`` and ``-H_j`` there ``(J, d, d)`` (:func:`mlsml.modes.posterior_modes`)."""
        return _modes(self.integrand, self.layout.q, theta)

    def adapt(self, theta) -> Nodes:
        """Nodes of the rule adapted to every school's posterior at ``theta``."""
        return self._adapt(self.integrand, theta)

    def _adapt(self, integrand: Integrand, theta) -> Nodes:
        mode, neg_hess = _modes(integrand, self.layout.q, theta)
        return place_nodes(mode, neg_hess, self.rule, self.spec.start(self.layout.q))

    # ------------------------------------------------------------ values
    def log_h(self, theta, nodes: Nodes):
        """The integrand at the nodes, ``(J, K)``: ``h_j(b_jk)`` (product) or ``g_j(v_jk)`` (u-exact)."""
        return _log_h(self.integrand, self.spec, theta, nodes)

    def _per_school(self, theta, nodes: Nodes):
        return _per_school(self.integrand, self.spec, theta, nodes)

    def at_nodes(self, theta, nodes: Nodes):
        """``sum_j W_j log L_j`` with the nodes held fixed (autograd-differentiable in ``theta``).

        ``W_j`` are the level-2 weights (:mod:`mlsml.weights`; one without them).
        """
        return _weighted_sum(self.design, self._per_school(theta, nodes))

    def per_school(self, theta, nodes: Nodes | None = None) -> np.ndarray:
        """``log L_j`` for every school (numpy), at nodes adapted to ``theta`` unless given.

        Not multiplied by the level-2 weights (the log-likelihood is ``sum_j W_j log L_j``).
        """
        theta = np.asarray(theta, dtype=float)
        if nodes is None:
            nodes = self.adapt(theta)
        return np.asarray(self._per_school(theta, nodes))

    def value(self, theta) -> float:
        """The adapted log-likelihood at ``theta`` (nodes adapted at ``theta``; the arithmetic of
        :meth:`value_and_grad`, so a fit's ``llf`` is this value at its estimates)."""
        theta = np.asarray(theta, dtype=float)
        nodes = self.adapt(theta)
        if node_sums.applies(self.integrand, self.spec.uexact):
            ns = node_sums.NodeSums.build(self.integrand, theta, nodes, self.nagq)
            if ns is not None:
                return ns.value
        return float(self.at_nodes(theta, nodes))

    @property
    def closed_form(self) -> bool:
        """Whether the derivatives are in closed form: the core model, one ``Sigma`` and one plain
        random scale or none (:func:`mlsml.derivatives.node_derivatives`)."""
        return isinstance(self.integrand, SchoolSums) and self.integrand.core

    def _closed_form_terms(self, theta: np.ndarray, nodes: Nodes | None, second: bool):
        """The value (the arithmetic of :meth:`at_nodes`), the node derivatives, the node weights
        and the nodes (adapted here when not given: the sums are computed once for both)."""
        lay = self.layout
        sums = self.integrand.sums(theta[: lay.p], theta[lay.p : lay.p + lay.k])
        fixed = GivenSums(self.integrand, sums)
        if nodes is None:
            nodes = self._adapt(fixed, theta)
        a = np.asarray(_log_h(fixed, self.spec, theta, nodes)) + nodes.logw[None, :]
        lse = logsumexp(a, axis=1)
        weights = np.exp(a - lse[:, None])
        b = nodes.v if self.spec.uexact else nodes.b
        nd = node_derivatives(self.integrand, theta, sums, b, self.spec.uexact, weights if second else None)
        return _weighted_sum(self.design, nodes.log_det + lse), nd, weights, nodes

    def value_and_grad(self, theta, nodes: Nodes | None = None) -> tuple[float, np.ndarray]:
        """The log-likelihood and its exact gradient with the nodes held fixed.

        In closed form where :attr:`closed_form` and the rule is u-exact
        (:func:`mlsml.derivatives.closed_form_gradient`: 3 instead of 5 ms on London Model 3),
        elsewhere autograd's (for the product rule the closed form costs ``n_directions x J x K``
        and was slower: 0.19 against 0.08 s on London Model 4 with 9^3 nodes); the value is
        the same arithmetic as :meth:`at_nodes`. With ``scale_re_formula`` under the u-exact rule
        in closed form through per-node sums (:mod:`mlsml.node_sums`; the same value up to rounding).
        """
        theta = np.asarray(theta, dtype=float)
        if self.closed_form and self.spec.uexact:
            value, nd, weights, _ = self._closed_form_terms(theta, nodes, second=False)
            return value, closed_form_gradient(self.integrand, theta, nd, weights)
        if nodes is None:
            nodes = self.adapt(theta)
        if node_sums.applies(self.integrand, self.spec.uexact):  # scale_re_formula: per-node sums
            out = node_sums.value_and_grad(self.integrand, theta, nodes, self.nagq)
            if out is not None:
                return out
        v, g = autograd.value_and_grad(self.at_nodes)(theta, nodes)
        return v, g

    def hessian(self, theta, nodes: Nodes | None = None) -> np.ndarray:
        """The exact Hessian with the nodes held fixed (the observed information is its negative).

        For the per-school-sums integrand by the chain rule through the sums
        (:func:`mlsml.derivatives.sums_hessian`), with the derivatives of the likelihood in
        the sums in closed form where :attr:`closed_form`, else from autograd with the sums as
        inputs (7 instead of 43 reverse passes on London Model 6); with ``scale_re_formula``
        under the u-exact rule in closed form through per-node sums (:mod:`mlsml.node_sums`);
        otherwise autograd's Hessian. All agree to rounding.
        """
        theta = np.asarray(theta, dtype=float)
        if self.closed_form:
            _, nd, weights, _ = self._closed_form_terms(theta, nodes, second=True)
            return sums_hessian(self.integrand, theta, closed_form_reduced(nd, weights, self.design.group_weights))
        if nodes is None:
            nodes = self.adapt(theta)
        if isinstance(self.integrand, SchoolSums) and self.integrand.through_sums:  # the data enter through per-school sums

            def log_lik(integrand, th):
                return _weighted_sum(self.design, _per_school(integrand, self.spec, th, nodes))

            return sums_hessian(self.integrand, theta, autograd_reduced(self.integrand, theta, log_lik))
        if node_sums.applies(self.integrand, self.spec.uexact):
            H = node_sums.hessian(self.integrand, theta, nodes, self.nagq)
            if H is not None:
                return H
        return np.asarray(autograd.hessian(self.at_nodes)(theta, nodes))

    def start_hessian(self, theta) -> np.ndarray:
        """The Hessian that seeds the quasi-Newton optimiser (:func:`mlsml.optimize.maximize`).

        :meth:`hessian` of this rule, except for the per-observation integrand
        (``scale_re_formula``) with more than one scale effect, whose Hessian costs
        ``O(J K n_params^2)`` at the nodes (:mod:`mlsml.node_sums`): there it is taken under
        the same kind of rule with :data:`START_HESSIAN_NAGQ` points per dimension (``7^2``
        instead of ``15^2`` nodes). It only preconditions BFGS, whose steps use the exact
        gradient of the fit's own rule; the Hessian of the results is always the fit's rule.
        """
        lay = self.layout
        if isinstance(self.integrand, SchoolSums) or lay.n_v < 2 or self.nagq <= START_HESSIAN_NAGQ:
            return self.hessian(theta)
        return self.with_spec(nagq=START_HESSIAN_NAGQ).hessian(theta)

    def posterior_weights(self, theta, nodes: Nodes) -> np.ndarray:
        r"""Normalised posterior weights ``p_jk`` of the nodes, shape ``(J, K)``.

        .. math:: p_{jk} \propto \exp\{h_j(b_{jk}) + \log\tilde w_k\}

        (over ``v`` for the u-exact rule: the weights of the marginal posterior of ``v``).
        """
        a = np.asarray(self.log_h(np.asarray(theta, dtype=float), nodes)) + nodes.logw[None, :]
        a = a - a.max(axis=1, keepdims=True)
        p = np.exp(a)
        return p / p.sum(axis=1, keepdims=True)


def value_or_nan(lik: Likelihood, theta) -> float:
    """``lik.value(theta)``, or NaN where the rule cannot be evaluated (:data:`EVALUATION_ERRORS`).

    For probes that compare two points by a second rule (the diagnostics' face search): a
    point where that rule fails is one the probe cannot vouch for, and every comparison with
    NaN is false.
    """
    try:
        with np.errstate(all="ignore"):
            return float(lik.value(np.asarray(theta, dtype=float)))
    except EVALUATION_ERRORS:
        return float("nan")


def _weighted_sum(design: Design, per_school):
    r""":math:`\sum_j W_j \log L_j` with the level-2 weights of the design (the plain sum without them; autograd)."""
    if design.group_weights is None:
        return anp.sum(per_school)
    return anp.sum(design.group_weights * per_school)


def _modes(integrand: Integrand, q: int, theta) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Likelihood.modes` of a given integrand."""
    return posterior_modes(integrand.mode_problem(np.asarray(theta, dtype=float)), q)


def _log_h(integrand: Integrand, spec: QuadratureSpec, theta, nodes: Nodes):
    """:meth:`Likelihood.log_h` of a given integrand."""
    if spec.uexact:
        return integrand.log_h_uexact(theta, nodes.v)
    return integrand.log_h(theta, nodes.b)


def _per_school(integrand: Integrand, spec: QuadratureSpec, theta, nodes: Nodes):
    r"""``log L_j`` at fixed nodes: :math:`\log|C_j| + \operatorname{lse}_k\{h_j(b_{jk}) + \log\tilde w_k\}` (autograd)."""
    return nodes.log_det + logsumexp(_log_h(integrand, spec, theta, nodes) + nodes.logw[None, :], axis=1)


def likelihood_for(design: Design, spec: QuadratureSpec, integrand: Integrand | None = None) -> Likelihood:
    """A :class:`Likelihood` (the integrand of the design's model class unless given)."""
    return Likelihood(design, integrand or make_integrand(design), spec)
