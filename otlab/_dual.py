"""The entropic OT dual: objective, gradient (optimality condition) and Hessian.

Problem (``rho = eps * tau / (1 - tau)``, ``tau = 1`` balanced; the unbalanced
problem of Chizat et al. 2018 and Séjourné et al. 2019, as POT's
``sinkhorn_unbalanced`` — ott-jax 0.6 relaxes a different entropic term, so its
unbalanced plans differ; balanced problems coincide):

$$ \\min_P \\langle C, P\\rangle + \\varepsilon\\,\\mathrm{KL}(P \\| a b^T) + \\rho_a \\mathrm{KL}(P 1 \\| a) + \\rho_b \\mathrm{KL}(P^T 1 \\| b). $$

Its dual, in potentials ``f, g`` that absorb ``eps log a`` and ``eps log b``
(``P = exp((f + g - C) / eps)``, ``h_a = f - eps log a``, ``kappa = 1 / rho``):

$$ D(f, g) = \\sum_i a_i \\frac{1 - e^{-\\kappa_a h_{a,i}}}{\\kappa_a} + \\sum_j b_j \\frac{1 - e^{-\\kappa_b h_{b,j}}}{\\kappa_b} + \\varepsilon\\,(\\textstyle\\sum a \\sum b - \\sum_{ij} P_{ij}), $$

with ``(1 - e^{-k h}) / k -> h`` as ``kappa -> 0``. Its gradient,
``(a e^{-kappa_a h_a} - P 1, b e^{-kappa_b h_b} - P^T 1)``, is the optimality
condition that every otlab entropic solver satisfies at convergence, and the
L1 norm of this gradient is the solvers' ``marginal_error``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def safe_log(a: Array) -> Array:
    """``log a`` with zero weights mapped to ``log(tiny)`` (finite, plan rows ~ 0)."""
    return jnp.log(jnp.maximum(a, jnp.finfo(a.dtype).tiny))


def kappa(epsilon: Array, tau: Array) -> Array:
    """``1 / rho = (1 - tau) / (tau * eps)``; zero for a balanced marginal."""
    return (1.0 - tau) / (tau * epsilon)


def _div(h: Array, k: Array) -> Array:
    """``(1 - exp(-k h)) / k``, equal to ``h`` at ``k = 0``."""
    pos = k > 0
    k_safe = jnp.where(pos, k, 1.0)
    return jnp.where(pos, -jnp.expm1(-k_safe * h) / k_safe, h)


def relaxed_marginal(w: Array, pot: Array, epsilon: Array, tau: Array) -> Array:
    """``w * exp(-kappa (pot - eps log w))``: the marginal a (relaxed) constraint targets."""
    k = kappa(epsilon, tau)
    return w * jnp.exp(-k * (pot - epsilon * safe_log(w)))


def dual_objective(f, g, a, b, epsilon, tau_a, tau_b, total_mass) -> Array:
    """``D(f, g)``; ``total_mass`` is ``sum(P)`` at ``(f, g)``."""
    div_a = jnp.sum(a * _div(f - epsilon * safe_log(a), kappa(epsilon, tau_a)))
    div_b = jnp.sum(b * _div(g - epsilon * safe_log(b), kappa(epsilon, tau_b)))
    return div_a + div_b + epsilon * (jnp.sum(a) * jnp.sum(b) - total_mass)


def is_balanced(tau_a: Array, tau_b: Array) -> Array:
    """1.0 where both marginals are hard constraints, else 0.0 (traced-safe)."""
    return jnp.asarray((tau_a == 1.0) & (tau_b == 1.0), dtype=jnp.result_type(tau_a, float))


def gauge_shift(f, g, a, b, tau_a, tau_b):
    """Fix the balanced gauge ``(f + t, g - t)``: shift so that ``<a, f> = <b, g>``.

    Unbalanced potentials are unique and are returned unchanged.
    """
    t = (jnp.sum(a * f) - jnp.sum(b * g)) / (jnp.sum(a) + jnp.sum(b))
    t = t * is_balanced(tau_a, tau_b)
    return f - t, g + t


def half_step_lse(geom, g, epsilon) -> Array:
    """``L_i = log sum_j exp((g_j - C_ij) / eps)``: what Sinkhorn's first half-step
    from ``g`` needs (one log-sum-exp pass over the rows)."""
    n, _ = geom.shape
    return geom.lse(jnp.zeros((n,), g.dtype), g, epsilon, axis=1)


def half_step_dual(g, log_l, a, b, epsilon, tau_a, tau_b) -> Array:
    """The dual ``D(f, g)`` after Sinkhorn's first half-step from ``g``, in O(n + m).

    ``log_l`` is `half_step_lse` of ``g``. The half-step gives ``f = eps log a - tau_a eps L``
    (``h_a = -tau_a eps L``), whose plan has row sums ``a e^{(1 - tau_a) L}``.
    """
    h_a = -tau_a * epsilon * log_l
    mass = jnp.sum(jnp.where(a > 0, a * jnp.exp((1.0 - tau_a) * log_l), 0.0))
    div_a = jnp.sum(a * _div(h_a, kappa(epsilon, tau_a)))
    div_b = jnp.sum(b * _div(g - epsilon * safe_log(b), kappa(epsilon, tau_b)))
    return div_a + div_b + epsilon * (jnp.sum(a) * jnp.sum(b) - mass)


def translate_start(g, log_l, a, b, epsilon, tau_a, tau_b) -> Array:
    """The constant ``t`` that makes ``g + t`` the best start of an unbalanced Sinkhorn.

    ``log_l`` is `half_step_lse` of ``g`` (``L(g + t) = L(g) + t / eps``). Sinkhorn's
    first half-step maps ``g + t`` to ``f^(g) - tau_a t`` (``f^`` the half-step from
    ``g``). Along that line the dual is
    ``D(t) = const - (tau_a A + (1 - tau_a) S) e^{alpha t} / alpha - B e^{-kappa_b t} / kappa_b``
    with ``alpha = (1 - tau_a) / eps``, ``S = sum P`` and ``A = sum_i a_i e^{-kappa_a h_{a,i}}``
    after the half-step, ``B = sum_j b_j e^{-kappa_b h_{b,j}}`` at ``g``. The half-step
    makes the row marginal exact, so ``A = S`` and the maximiser is

    ``t* = log(B / S) / (alpha + kappa_b)``,

    the translation of Séjourné et al. (2022, translation-invariant Sinkhorn) applied
    once, to the start. Balanced problems (``alpha + kappa_b = 0``) return ``0``: a
    constant there is a gauge. O(n + m) given ``log_l``.
    """
    log_s = jax.nn.logsumexp(safe_log(a) + (1.0 - tau_a) * log_l, where=a > 0)
    k_b = kappa(epsilon, tau_b)
    log_b = jax.nn.logsumexp(safe_log(b) - k_b * (g - epsilon * safe_log(b)), where=b > 0)
    rate = (1.0 - tau_a) / epsilon + k_b
    unbalanced = rate > 0
    return jnp.where(unbalanced, (log_b - log_s) / jnp.where(unbalanced, rate, 1.0), 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """An entropic OT problem: everything a solution is differentiated against.

    All fields are traced: points and cost parameters (inside ``geom``), weights,
    ``epsilon`` and the marginal relaxations ``tau_a``, ``tau_b``.
    """

    geom: Any
    a: Array
    b: Array
    epsilon: Array
    tau_a: Array
    tau_b: Array

    def residual(self, f: Array, g: Array, row: Array, col: Array) -> tuple[Array, Array]:
        """Dual gradient given the plan's marginals ``row = P 1`` and ``col = P^T 1``."""
        ra = relaxed_marginal(self.a, f, self.epsilon, self.tau_a) - row
        rb = relaxed_marginal(self.b, g, self.epsilon, self.tau_b) - col
        return ra, rb

    def optimality(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``F(f, g) = grad D - (s w) phi``: zero exactly at the solution in its gauge.

        ``phi = <a, f> - <b, g>`` fixes the balanced gauge (``w = (a, -b)``,
        ``s = 1 / eps``); it is switched off for unbalanced problems, whose
        potentials are unique.
        """
        eps = self.epsilon
        row = jnp.exp(self.geom.lse(f, g, eps, axis=1))
        col = jnp.exp(self.geom.lse(f, g, eps, axis=0))
        ra, rb = self.residual(f, g, row, col)
        phi = (jnp.sum(self.a * f) - jnp.sum(self.b * g)) * is_balanced(self.tau_a, self.tau_b)
        return ra - self.a * phi / eps, rb + self.b * phi / eps

    def hessian_diagonal(self, f: Array, g: Array, row: Array, col: Array):
        """Diagonal blocks of ``-dF/d(f, g)`` given the marginals ``row = P 1``,
        ``col = P^T 1``: ``row / eps + kappa_a * a~`` and ``col / eps + kappa_b * b~``."""
        eps = self.epsilon
        da = row / eps + kappa(eps, self.tau_a) * relaxed_marginal(self.a, f, eps, self.tau_a)
        db = col / eps + kappa(eps, self.tau_b) * relaxed_marginal(self.b, g, eps, self.tau_b)
        return da, db

    def hessian_operator(self, f: Array, g: Array):
        """``(matvec, diagonal)`` of ``A = -dF/d(f, g)``, symmetric positive definite.

        ``A = (1/eps) [[diag(P1), P], [P^T, diag(P^T 1)]] + diag(kappa * relaxed
        marginals) + (1/eps) w w^T`` (the last term only when balanced).
        """
        eps = self.epsilon
        op = self.geom.materialize().plan_operator(f, g, eps)
        row = op.matvec(jnp.ones(self.b.shape, f.dtype))
        col = op.rmatvec(jnp.ones(self.a.shape, f.dtype))
        da, db = self.hessian_diagonal(f, g, row, col)
        s = is_balanced(self.tau_a, self.tau_b) / eps

        def matvec(z):
            x, y = z
            phi = s * (jnp.sum(self.a * x) - jnp.sum(self.b * y))
            return (
                da * x + op.matvec(y) / eps + self.a * phi,
                db * y + op.rmatvec(x) / eps - self.b * phi,
            )

        return matvec, (da + s * self.a**2, db + s * self.b**2)
