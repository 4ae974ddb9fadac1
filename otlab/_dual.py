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


def _weighted_div(w, pot, epsilon, tau) -> Array:
    """``sum_i w_i (1 - e^{-kappa h_i}) / kappa`` with ``h = pot - eps log w``.

    Its derivative in a zero weight is the one-sided limit ``w -> 0+``,
    ``(1 - e^{-kappa h}) / kappa - eps e^{-kappa h}``: the ``- eps e^{-kappa h}``
    comes from ``d(w log w) / dw = log w + 1``, whose ``+ 1`` `safe_log` (constant
    below ``tiny``) drops. A zero-valued term ``(w - stop_gradient(w)) * (...)``
    restores it, so that the gradient in a zero weight is exact.
    """
    k = kappa(epsilon, tau)
    h = pot - epsilon * safe_log(w)
    dw = w - jax.lax.stop_gradient(w)
    missing = jnp.where(w > 0, 0.0, -epsilon * jnp.exp(-k * h))
    return jnp.sum(w * _div(h, k)) + jnp.sum(jax.lax.stop_gradient(missing) * dw)


def dual_objective(f, g, a, b, epsilon, tau_a, tau_b, total_mass) -> Array:
    """``D(f, g)``; ``total_mass`` is ``sum(P)`` at ``(f, g)``."""
    div_a = _weighted_div(a, f, epsilon, tau_a)
    div_b = _weighted_div(b, g, epsilon, tau_b)
    return div_a + div_b + epsilon * (jnp.sum(a) * jnp.sum(b) - total_mass)


def _reg_cost(f, g, theta):
    geom, a, b, epsilon, tau_a, tau_b = theta
    mass = jnp.sum(jnp.exp(geom.lse(f, g, epsilon, axis=1)))
    return dual_objective(f, g, a, b, epsilon, tau_a, tau_b, mass)


@jax.custom_jvp
def reg_cost(f, g, theta):
    """The dual objective at ``(f, g)`` (``theta = (geom, a, b, epsilon, tau_a, tau_b)``),
    differentiated by the envelope theorem (Danskin): ``dD/dtheta`` at fixed ``(f, g)``.
    """
    return _reg_cost(f, g, theta)


@reg_cost.defjvp
def _reg_cost_jvp(primals, tangents):
    f, g, theta = primals
    return jax.jvp(lambda th: _reg_cost(f, g, th), (theta,), (tangents[2],))


@jax.custom_jvp
def envelope(value: Array, f: Array, g: Array, theta) -> Array:
    """``value``, the value of the problem ``theta`` at its optimum ``(f, g)`` (all
    three computed elsewhere, constants), with `reg_cost`'s envelope derivative: that of
    the dual objective at ``(f, g)``. Unlike `reg_cost`, the dual's pass runs only when
    differentiated, and the potentials get no derivative; a non-finite dual value
    contributes none, never a NaN. (The value is ``value`` exactly: ``env +
    stop_gradient(value - env)`` would round, and at ``eps = 1e10`` the dual form's
    cancellation error, about ``eps`` times the machine epsilon, swamped it.)"""
    del f, g, theta
    return value


@envelope.defjvp
def _envelope_jvp(primals, tangents):
    value, f, g, theta = primals
    env, denv = jax.jvp(lambda th: _reg_cost(f, g, th), (theta,), (tangents[3],))
    return value, jnp.where(jnp.isfinite(env), denv, jnp.zeros_like(denv))


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

    def active(self) -> tuple[Array, Array]:
        """Masks of the points with positive weight. Zero-weight points are outside
        the problem: their potentials are the c-transforms (`complete`), and the
        implicit linear system holds them fixed (a unit diagonal, no coupling)."""
        return self.a > 0, self.b > 0

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
        ma, mb = self.active()
        # Zero-weight rows/columns: no condition (their potentials are c-transforms,
        # set after the solve); the masked Hessian has a unit diagonal there.
        return jnp.where(ma, ra - self.a * phi / eps, 0.0), jnp.where(mb, rb + self.b * phi / eps, 0.0)

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
        marginals) + (1/eps) w w^T`` (the last term only when balanced), restricted
        to the points of positive weight: zero-weight rows and columns are the
        identity (their condition is not part of the problem, see `optimality`), so
        ``A`` stays definite and the Jacobi preconditioner never divides by a zero
        marginal; the system is that of the problem with those points removed.
        """
        eps = self.epsilon
        ma, mb = self.active()
        op = self.geom.materialize().plan_operator(f, g, eps)
        row = op.matvec(jnp.ones(self.b.shape, f.dtype))
        col = op.rmatvec(jnp.ones(self.a.shape, f.dtype))
        da, db = self.hessian_diagonal(f, g, row, col)
        s = is_balanced(self.tau_a, self.tau_b) / eps

        def matvec(z):
            x, y = jnp.where(ma, z[0], 0.0), jnp.where(mb, z[1], 0.0)
            phi = s * (jnp.sum(self.a * x) - jnp.sum(self.b * y))
            return (
                jnp.where(ma, da * x + op.matvec(y) / eps + self.a * phi, z[0]),
                jnp.where(mb, db * y + op.rmatvec(x) / eps - self.b * phi, z[1]),
            )

        return matvec, (jnp.where(ma, da + s * self.a**2, 1.0), jnp.where(mb, db + s * self.b**2, 1.0))


def complete(problem: Problem, f: Array, g: Array) -> tuple[Array, Array, Array, Array]:
    """Finish a solver's potentials: ``(f, g, marginal_error, mass)``, in two log-domain
    passes.

    Every solver's returned potentials go through this (`otlab.solution.build`):

    * potentials at zero-weight points become the c-transforms of the other side
      (Sinkhorn's half-step, ``f_i = eps log a_i - tau_a eps log sum_j e^{(g_j - C_ij)/eps}``,
      with ``log 0`` the finite `safe_log`): the one-sided derivative of the
      problem's value in that weight, and what every engine and solver returns;
    * ``marginal_error``, the L1 norm of the optimality residual of the returned
      ``(f, g)`` re-evaluated in the log domain (max-shifted log-sum-exp passes; NaN
      if the potentials are not finite), whatever the solver's own estimate was (a
      scaled kernel can underestimate it).
      The change of the columns at zero weights moves the rows by at most the
      change of those columns' mass, which is added: a bound, not an estimate;
    * ``mass``, the plan's total mass at the returned ``(f, g)`` (what the dual
      objective needs besides O(n + m) terms: `dual_objective`).
    """
    eps = problem.epsilon
    geom = problem.geom.materialize()
    ma, mb = problem.active()
    log_row = geom.lse(f, g, eps, axis=1)
    f_c = eps * safe_log(problem.a) - problem.tau_a * (eps * log_row - f)
    f_new = jnp.where(ma, f, f_c)
    log_row = log_row + (f_new - f) / eps
    log_col = geom.lse(f_new, g, eps, axis=0)
    g_c = eps * safe_log(problem.b) - problem.tau_b * (eps * log_col - g)
    g_new = jnp.where(mb, g, g_c)
    log_col_new = log_col + (g_new - g) / eps
    ra, rb = problem.residual(f_new, g_new, jnp.exp(log_row), jnp.exp(log_col_new))
    moved = jnp.sum(jnp.abs(jnp.exp(log_col_new) - jnp.exp(log_col)))
    # (+ 0 * f: NaN unless the potentials are finite, which `solution.build` reads
    # from it: no separate reductions for that)
    err = jnp.sum(jnp.abs(ra + 0.0 * f_new)) + jnp.sum(jnp.abs(rb + 0.0 * g_new)) + moved
    return f_new, g_new, err, jnp.sum(jnp.exp(log_col_new))
