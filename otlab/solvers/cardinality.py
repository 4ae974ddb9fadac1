"""Cardinality-constrained optimal transport (Liu, Puigcerver & Blondel, "Sparsity-
constrained optimal transport", ICLR 2023).

Transport plans with at most ``k`` nonzeros in each column (``axis=0``; each
row with ``axis=1``), regularised by a squared norm:

$$ \\min_{T \\in U(a, b)} \\langle T, C\\rangle + \\sum_j \\frac{\\gamma}{2}\\|t_j\\|^2
   \\quad \\text{s.t.}\\ \\|t_j\\|_0 \\le k. $$

Its dual, over potentials ``f = alpha`` (rows) and ``g = beta`` (columns), is

$$ D(\\alpha, \\beta) = \\langle \\alpha, a\\rangle + \\langle \\beta, b\\rangle
   - \\sum_j \\delta_k(\\alpha + \\beta_j - c_j), \\qquad
   \\delta_k(s) = \\frac{1}{2\\gamma} \\sum_{i \\in \\mathrm{top}_k(s)} [s_i]_+^2, $$

concave and piecewise smooth; the plan column is ``t_j = [s]_+ / gamma`` on the
``k`` largest scores ``s = alpha + beta_j - c_j`` and zero elsewhere, and ``grad D
= (a - T 1, b - T^T 1)``. The semi-dual maximises over ``alpha`` alone,

$$ S(\\alpha) = \\langle \\alpha, a\\rangle - \\sum_j \\max_{t \\in b_j \\Delta^n,\\ \\|t\\|_0 \\le k}
   \\langle \\alpha - c_j, t\\rangle - \\frac{\\gamma}{2}\\|t\\|^2, $$

whose inner maximiser is the projection onto the ``k``-sparse simplex (top-``k``,
then a simplex projection with threshold ``theta_j``); ``S(alpha) = D(alpha,
-theta)``, so the semi-dual implies ``beta = -theta`` and its plan meets the column
marginals exactly. ``k = 1`` is unregularised OT's dual restricted to one entry per
column (its optimum lies on ties: the plan read from the potentials then misses the
marginals, by the duality gap of the nonconvex constraint); ``k = n`` is
quadratically regularised OT.

The dual is maximised, by default (``method="newton"``), by a semismooth Newton
method (Lorenz, Manns & Meyer, "Quadratically regularized optimal transport", 2021):
on the current support the dual is quadratic with Hessian ``-(1/gamma) [[diag(M 1),
M], [M^T, diag(M^T 1)]]``; it runs along a continuation in ``gamma`` and first with
``4k + 1`` entries per line. ``method="lbfgs"`` maximises either formulation by
optax's L-BFGS with its zoom line search. Both run in ``lax.while_loop`` under
``jax.jit``. The top-``k`` selection is a geometry
primitive (`otlab.Geometry.topk`): dense, or online with a running top-``k`` per
column over row blocks. Gradients come from `otlab.implicit` with the dual's
optimality condition and its sparse Hessian (``k`` entries per column): both
formulations are differentiated the same way, whatever the solver did.

Example:
    >>> import jax, otlab
    >>> x = jax.random.normal(jax.random.key(0), (40, 2))
    >>> y = jax.random.normal(jax.random.key(1), (30, 2))
    >>> sol = otlab.cardinality_constrained(otlab.PointCloud(x, y), k=3, gamma=1.0)
    >>> sol.indices.shape, bool(sol.converged)
    ((30, 3), True)
    >>> int((sol.plan() > 0).sum(0).max()) <= 3
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from otlab import _checks, implicit
from otlab import geometry as geometry_lib
from otlab.geometry import GeometryLike
from otlab.solution import Status

__all__ = ["CardinalitySolution", "Problem", "cardinality_constrained"]

Array = jax.Array


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


def _threshold(s: Array, z: Array) -> Array:
    """``theta`` with ``sum_i [s_i - theta]_+ = z`` per row of ``s`` (shape ``(L, k)``):
    the simplex projection's threshold (Held et al. 1974; Condat 2016)."""
    s = -jnp.sort(-s, axis=1)
    k = s.shape[1]
    cssv = jnp.cumsum(s, axis=1) - z[:, None]
    ind = jnp.arange(1, k + 1, dtype=s.dtype)
    rho = jnp.maximum(jnp.sum(s - cssv / ind > 0, axis=1), 1)
    return jnp.take_along_axis(cssv, (rho - 1)[:, None], axis=1)[:, 0] / rho


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """A cardinality-constrained OT problem (an `otlab.implicit.Problem`).

    ``geom``, ``a``, ``b`` and ``gamma`` are traced (the solution is differentiated
    against them); ``k`` and ``axis`` are static. The constrained *lines* are the
    columns (``axis=0``) or the rows (``axis=1``); each keeps ``k`` entries, indexed
    by ``topk(f, g)`` of shape ``(lines, k)``.

    ``support`` (optional, ``(lines, k)`` integer indices) fixes the kept entries
    instead of selecting the top-``k`` scores: the dual, the plan, the optimality
    condition and the Hessian are then those of quadratically regularised OT
    restricted to that support (smooth and concave; its optimum is the best plan
    with that support, when one meets the marginals).
    """

    geom: Any
    a: Array
    b: Array
    gamma: Array
    k: int = _static()
    axis: int = _static()
    support: Array | None = None

    # -- orientation: (line potential, other potential) <-> (f, g)
    def _lines(self, f, g):
        return (g, f) if self.axis == 0 else (f, g)

    def _join(self, u, v):
        return (v, u) if self.axis == 0 else (u, v)

    def topk(self, f: Array, g: Array) -> Array:
        """Indices ``(lines, k)`` of the ``k`` largest scores ``f_i + g_j - C_ij`` of
        each line (no gradient); the fixed ``support`` when there is one."""
        if self.support is not None:
            return jax.lax.stop_gradient(self.support)
        return self.geom.topk(f, g, self.k, self.axis)

    def line_costs(self, idx: Array) -> Array:
        """``C`` at the kept entries, shape ``(lines, k)``."""
        lines = jnp.arange(idx.shape[0])[:, None]
        if self.axis == 0:
            return self.geom.cost_at(idx, lines)
        return self.geom.cost_at(lines, idx)

    def scores(self, f: Array, g: Array, idx: Array) -> Array:
        """``f_i + g_j - C_ij`` at the kept entries, shape ``(lines, k)``."""
        u, v = self._lines(f, g)
        return u[:, None] + v[idx] - self.line_costs(idx)

    def dual(self, f: Array, g: Array, idx: Array | None = None) -> Array:
        """``D(f, g)``; ``idx`` defaults to the top-``k`` at ``(f, g)``."""
        idx = self.topk(f, g) if idx is None else idx
        s = jax.nn.relu(self.scores(f, g, idx))
        return jnp.sum(self.a * f) + jnp.sum(self.b * g) - jnp.sum(s * s) / (2 * self.gamma)

    def implied_line_potential(self, f: Array, g: Array) -> Array:
        """The semi-dual's line potential ``-theta`` given the other potential
        (projection of each line onto the ``k``-sparse simplex, total mass its weight)."""
        u, v = self._lines(f, g)
        zero = jnp.zeros_like(u)
        idx = self.geom.topk(*self._join(zero, v), self.k, self.axis)
        s = self.scores(*self._join(zero, v), idx)
        w_line = self.b if self.axis == 0 else self.a
        return -_threshold(s, self.gamma * w_line)

    def sparse_plan(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``(indices, values)``, both ``(lines, k)``: ``values = [s]_+ / gamma``."""
        idx = self.topk(f, g)
        return idx, jax.nn.relu(self.scores(f, g, idx)) / self.gamma

    def _sums(self, idx: Array, vals: Array) -> tuple[Array, Array]:
        """``(T 1, T^T 1)`` of the sparse matrix ``(idx, vals)``."""
        n, m = self.geom.shape
        other = jax.ops.segment_sum(vals.reshape(-1), idx.reshape(-1), n if self.axis == 0 else m)
        line = jnp.sum(vals, axis=1)
        return (other, line) if self.axis == 0 else (line, other)

    def marginals(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``(T 1, T^T 1)`` of the plan read from ``(f, g)``."""
        return self._sums(*self.sparse_plan(f, g))

    def gauge(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``(f - t, g + t)`` with ``<a, f> = <b, g>`` (the dual is invariant)."""
        t = (jnp.sum(self.a * f) - jnp.sum(self.b * g)) / (jnp.sum(self.a) + jnp.sum(self.b))
        return f - t, g + t

    def optimality(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``F = grad D - w phi / gamma``, ``w = (a, -b)``, ``phi = <a, f> - <b, g>``:
        zero exactly at the gauge-fixed solution (away from ties)."""
        row, col = self.marginals(f, g)
        phi = (jnp.sum(self.a * f) - jnp.sum(self.b * g)) / self.gamma
        return self.a - row - self.a * phi, self.b - col + self.b * phi

    def hessian_operator(self, f: Array, g: Array):
        """``(matvec, diagonal)`` of ``A = -dF/d(f, g)``.

        ``A = (1/gamma) [[diag(M 1), M], [M^T, diag(M^T 1)]] + (1/gamma) w w^T``,
        ``M`` the 0/1 pattern of the plan's nonzeros (``k`` per line, gathered and
        segment-summed: no ``n x m`` matrix), plus a ridge of ``1e-6`` (float32) or
        ``1e-12`` (float64) times the largest diagonal entry, which keeps the solve
        finite when the pattern leaves a row empty (only at ties).
        """
        idx = jax.lax.stop_gradient(self.topk(f, g))
        mask = (self.scores(f, g, idx) > 0).astype(f.dtype)
        inv = 1.0 / self.gamma
        n_row, n_col = self._sums(idx, mask)
        rel = 1e-12 if f.dtype == jnp.float64 else 1e-6
        ridge = rel * inv * jnp.maximum(jnp.max(n_row), jnp.max(n_col))
        da, db = inv * n_row + ridge, inv * n_col + ridge

        def apply_m(y):  # M y for y on the columns (``axis=0``) / rows
            return jax.ops.segment_sum(
                (mask * y[:, None]).reshape(-1), idx.reshape(-1), n_other
            )

        n_other = self.geom.shape[0] if self.axis == 0 else self.geom.shape[1]

        def matvec(z):
            x, y = z
            phi = inv * (jnp.sum(self.a * x) - jnp.sum(self.b * y))
            u, v = self._lines(x, y)
            line = inv * jnp.sum(mask * v[idx], axis=1)
            other = inv * apply_m(u)
            ox, oy = self._join(line, other)
            return da * x + ox + self.a * phi, db * y + oy - self.b * phi

        return matvec, (da + inv * self.a**2, db + inv * self.b**2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CardinalitySolution:
    """Solution of a cardinality-constrained OT problem (a pytree).

    Attributes:
        f: ``(n,)`` row potential ``alpha``; ``f`` and ``g`` are in the gauge
            ``<a, f> = <b, g>``.
        g: ``(m,)`` column potential ``beta`` (for the semi-dual, the one it implies).
        indices: ``(m, k)`` row index of each kept entry of each column
            (``axis=1``: ``(n, k)`` column indices of each row).
        values: same shape: the plan's values there (``0`` where the score is
            not positive).
        geom: the geometry.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        gamma: the quadratic regularisation.
        status: a `otlab.Status` code.
        n_iter: L-BFGS iterations.
        marginal_error: ``|T 1 - a|_1 + |T^T 1 - b|_1`` of the returned plan
            (``<= tol * sum(a)`` when ``converged``; see `duality_gap` for how
            close to optimal such a plan is).
        dual_value: the optimal value of the dual (or semi-dual), a lower bound on
            the objective of every ``k``-sparse plan that meets the marginals;
            differentiated by the envelope theorem.
        k: at most ``k`` nonzeros per line (static).
        axis: ``0``: per column; ``1``: per row (static).
    """

    f: Array
    g: Array
    indices: Array
    values: Array
    geom: Any
    a: Array
    b: Array
    gamma: Array
    status: Array
    n_iter: Array
    marginal_error: Array
    dual_value: Array
    k: int = _static()
    axis: int = _static()

    @property
    def converged(self) -> Array:
        """``status == SUCCESS``: the dual's L-BFGS met its stopping rule and the
        returned plan (at most ``k`` nonzeros per line) meets both marginals to
        ``tol`` (L1). When no plan on the dual's support meets them (a tie at a
        nonsmooth optimum), the status is ``MAX_ITER``."""
        return self.status == Status.SUCCESS

    def _lines(self):
        return jnp.arange(self.indices.shape[0])[:, None]

    def plan(self) -> Array:
        """The dense ``(n, m)`` plan (scattered from ``indices``, ``values``)."""
        n, m = self.geom.shape
        z = jnp.zeros((n, m), self.values.dtype)
        if self.axis == 0:
            return z.at[self.indices, self._lines()].add(self.values)
        return z.at[self._lines(), self.indices].add(self.values)

    def marginals(self) -> tuple[Array, Array]:
        """``(T 1, T^T 1)``."""
        return self._problem()._sums(self.indices, self.values)

    def apply(self, v: Array, axis: int = 1) -> Array:
        """``T v`` (``axis=1``, ``v`` of shape ``(m,)`` or ``(m, d)``) or ``T^T v``
        (``axis=0``), from the sparse plan."""
        n, m = self.geom.shape
        lines, idx, vals = self._lines()[:, 0], self.indices, self.values
        if (axis == 1) == (self.axis == 1):  # reduce along the kept entries of a line
            return jnp.einsum("lk,lk...->l...", vals, v[idx])
        if axis not in (0, 1):
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        contrib = vals[..., None] * v[lines][:, None] if v.ndim == 2 else vals * v[lines][:, None]
        size = n if self.axis == 0 else m
        return jax.ops.segment_sum(
            contrib.reshape((-1,) + v.shape[1:]), idx.reshape(-1), size
        )

    def _problem(self) -> Problem:
        return Problem(self.geom, self.a, self.b, self.gamma, self.k, self.axis)

    @property
    def cost(self) -> Array:
        """Transport cost ``<C, T>``."""
        return jnp.sum(self.values * self._problem().line_costs(self.indices))

    @property
    def reg_cost(self) -> Array:
        """Primal objective ``<C, T> + (gamma / 2) |T|^2`` of the returned plan."""
        return self.cost + 0.5 * self.gamma * jnp.sum(self.values**2)

    @property
    def duality_gap(self) -> Array:
        """``reg_cost - dual_value``: when the plan meets the marginals (``converged``)
        it is feasible, and no ``k``-sparse plan has an objective lower than
        ``dual_value`` (weak duality), so the plan is optimal to within this gap.
        Zero up to the tolerance at a smooth optimum of the dual; positive where the
        dual's optimum lies on a tie (the constraint is not convex)."""
        return self.reg_cost - self.dual_value


# ----------------------------------------------------------------------- the solver


class _Carry(NamedTuple):
    params: Any
    state: Any
    best: Any
    best_value: Array
    it: Array
    stall: Array
    restarts: Array
    status: Array
    done: Array


def _lbfgs(fun, x0, *, tol, gtol, max_iter, memory, patience=5, restarts=3):
    """Minimise ``fun`` with optax's L-BFGS (zoom line search) in a ``while_loop``.

    The dual is piecewise smooth: near a kink a strong-Wolfe line search can fail and
    return a worse point. Such a step is undone and the L-BFGS memory cleared (a
    restart from the best point, a gradient step next). Stops with ``SUCCESS`` when the
    L1 norm of the gradient is ``<= gtol`` or when ``patience`` consecutive steps each
    improve the best value by at most ``tol`` relative (the value is stationary: how a
    nonsmooth optimum, on a tie, shows); ``NONFINITE`` when the value is not finite;
    else ``MAX_ITER``. Returns the best point.
    """
    opt = optax.lbfgs(
        memory_size=memory,
        linesearch=optax.scale_by_zoom_linesearch(
            max_linesearch_steps=30, initial_guess_strategy="one"
        ),
    )
    value_and_grad = optax.value_and_grad_from_state(fun)

    def l1(t):
        return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t))

    def select(pred, x, y):
        return jax.tree.map(lambda u, v: jnp.where(pred, u, v), x, y)

    def body(c: _Carry) -> _Carry:
        value, grad = value_and_grad(c.params, state=c.state)
        updates, state = opt.update(grad, c.state, c.params, value=value, grad=grad, value_fn=fun)
        params = optax.apply_updates(c.params, updates)
        new_value = otu.tree_get(state, "value")
        new_grad = otu.tree_get(state, "grad")
        better = new_value < c.best_value  # False for NaN
        gain = c.best_value - new_value
        small = ~(gain > tol * jnp.maximum(jnp.abs(c.best_value), 1.0))
        stall = jnp.where(small, c.stall + 1, 0)
        best = select(better, params, c.best)
        best_value = jnp.where(better, new_value, c.best_value)
        # a worse (or non-finite) point, or a stall: restart from the best point,
        # memory cleared; ``restarts`` stalls in a row end the run
        stalled = stall >= patience
        restart = ~(new_value <= value) | stalled
        params = select(restart, best, params)
        state = select(restart, opt.init(best), state)
        n_restarts = jnp.where(stalled, c.restarts + 1, jnp.where(small, c.restarts, 0))
        stall = jnp.where(stalled, 0, stall)
        it = c.it + 1
        ok = (better & (l1(new_grad) <= gtol)) | (n_restarts > restarts)
        finite = jnp.isfinite(best_value)
        status = jnp.where(
            ~finite, Status.NONFINITE, jnp.where(ok, Status.SUCCESS, Status.MAX_ITER)
        ).astype(jnp.int32)
        done = ~finite | ok | (it >= max_iter)
        return _Carry(params, state, best, best_value, it, stall, n_restarts, status, done)

    v0 = fun(x0)
    finite0 = jnp.isfinite(v0)
    c = _Carry(
        x0, opt.init(x0), x0, v0, jnp.asarray(0), jnp.asarray(0), jnp.asarray(0),
        jnp.where(finite0, Status.MAX_ITER, Status.NONFINITE).astype(jnp.int32),
        ~finite0,
    )
    c = jax.lax.while_loop(lambda c: ~c.done, body, c)
    return c.best, c.status, c.it


def _loop_problem(problem: Problem) -> tuple[Problem, bool]:
    """The problem the iterations run on: dense costs evaluated once, and a dense
    column-wise problem transposed into a row-wise one (``top_k`` along contiguous
    rows). Returns it and whether it was transposed."""
    geom = problem.geom.materialize()
    # only a plain dense matrix is transposed: a sharded one keeps its split rows (its
    # top-k merges the devices' candidates), an online one has no matrix
    if problem.axis == 1 or not isinstance(geom, geometry_lib.Geometry):
        return dataclasses.replace(problem, geom=geom), False
    geom_t = geometry_lib.Geometry(geom.cost_matrix.T)
    return Problem(geom_t, problem.b, problem.a, problem.gamma, problem.k, 1, problem.support), True


def _newton_direction(p: Problem, f: Array, g: Array):
    """``A^{-1} F`` by preconditioned conjugate gradient on the sparse Hessian."""
    tol = 1e-12 if f.dtype == jnp.float64 else 1e-6
    matvec, (da, db) = p.hessian_operator(f, g)
    d, _ = jax.scipy.sparse.linalg.cg(
        matvec, p.optimality(f, g), tol=tol, maxiter=200, M=lambda z: (z[0] / da, z[1] / db)
    )
    return d


def _polish(p: Problem, f: Array, g: Array, steps: int = 3):
    """Newton steps on the dual with its sparse Hessian (conjugate gradient), each kept
    only if it increases the dual. Where the active set is right (a smooth optimum)
    the dual is quadratic and one step lands on it; at a tie the steps are refused."""

    def step(carry, _):
        f, g, val = carry
        d = _newton_direction(p, f, g)
        f2, g2 = f + d[0], g + d[1]
        v2 = p.dual(f2, g2)
        ok = v2 >= val
        return (jnp.where(ok, f2, f), jnp.where(ok, g2, g), jnp.where(ok, v2, val)), None

    (f, g, _), _ = jax.lax.scan(step, (f, g, p.dual(f, g)), None, length=steps)
    return f, g


class _State(NamedTuple):
    """The dual at one point: its top-``k`` support, plan values, value, marginals."""

    f: Array
    g: Array
    idx: Array
    vals: Array
    value: Array
    row: Array
    col: Array
    err: Array


def _evaluate(p: Problem, f: Array, g: Array, keep: Array) -> _State:
    """``D(f, g)`` with its support (one top-``k`` pass), plan and marginals, for the
    ``keep <= k`` largest scores of each line (``keep`` may be traced: one compiled
    loop serves every ``keep``)."""
    idx = p.topk(f, g)
    kept = jnp.arange(p.k) < keep
    vals = jnp.where(kept, jax.nn.relu(p.scores(f, g, idx)), 0.0) / p.gamma
    value = jnp.sum(p.a * f) + jnp.sum(p.b * g) - 0.5 * p.gamma * jnp.sum(vals * vals)
    row, col = p._sums(idx, vals)
    err = jnp.sum(jnp.abs(row - p.a)) + jnp.sum(jnp.abs(col - p.b))
    return _State(f, g, idx, vals, value, row, col, err)


class _NewtonCarry(NamedTuple):
    x: _State
    lam: Array
    it: Array
    slow: Array
    status: Array
    done: Array


def _newton(p: Problem, f0: Array, g0: Array, *, tol, vtol, max_iter, keep=None, patience=3,
            max_backtrack=20, cg_iter=None):
    """Maximise ``D`` by a globalised semismooth Newton method (Lorenz, Manns & Meyer
    2021 for quadratically regularised OT), the support recomputed at every step.

    At ``(f, g)`` the dual is quadratic on the current support (the positive entries
    of the top-``k`` of each line, pattern ``M``): its Hessian is ``-(1/gamma) [[diag(M
    1), M], [M^T, diag(M^T 1)]]``. The step solves ``(H_reg) d = grad D`` by conjugate
    gradient, with ``H_reg`` that Hessian negated, its empty rows' diagonal raised to
    ``1 / gamma`` (an entry's worth), plus ``(lam / gamma) I`` (Levenberg-Marquardt:
    ``lam`` is divided by 4 after a full step and multiplied by 4 per backtracking
    halving; the support graph is usually disconnected and each component's gauge
    direction is a null direction of the Hessian) and the gauge term ``w w^T / gamma``. ``d`` is an ascent direction of the concave
    ``D``; the step ``t = 1, 1/2, ...`` (at most ``max_backtrack`` halvings) is the
    first with Armijo's ascent ``D(x + t d) >= D(x) + 1e-4 t <grad, d>``; within the
    dual's rounding, a step that lowers the marginal error counts as one.

    Stops with ``SUCCESS`` once the plan meets the marginals to ``tol * sum(a)`` or
    when ``patience`` steps in a row raise ``D`` by at most ``vtol`` relative without
    halving the marginal error, or no step is an ascent (a nonsmooth optimum: a tie between ``k``-th and ``(k+1)``-th
    scores); ``NONFINITE``; else ``MAX_ITER``. Each iteration costs at most
    ``max_backtrack + 1`` top-``k`` passes and ``cg_iter`` sparse products: bounded, so
    ``vmap`` runs the batch in lockstep at little waste.
    """
    keep = p.k if keep is None else keep
    inv = 1.0 / p.gamma
    total = jnp.sum(p.a)
    gtol = tol * total
    n_lines, n_other = p.geom.shape[1 - p.axis], p.geom.shape[p.axis]
    if cg_iter is None:
        cg_iter = 2 * (n_lines + n_other)
    cg_tol_floor = 1e-10 if f0.dtype == jnp.float64 else 1e-5
    eps = jnp.finfo(f0.dtype).eps
    lam_min, lam_max = (1e-12, 1e8) if f0.dtype == jnp.float64 else (1e-6, 1e6)

    def direction(x: _State, lam: Array):
        mask = (x.vals > 0).astype(x.f.dtype)
        n_row, n_col = p._sums(x.idx, mask)
        da = inv * (jnp.maximum(n_row, 1.0) + lam)
        db = inv * (jnp.maximum(n_col, 1.0) + lam)
        idx = x.idx

        def matvec(z):
            zx, zy = z
            phi = inv * (jnp.sum(p.a * zx) - jnp.sum(p.b * zy))
            u, v = p._lines(zx, zy)
            line = inv * jnp.sum(mask * v[idx], axis=1)
            other = inv * jax.ops.segment_sum(
                (mask * u[:, None]).reshape(-1), idx.reshape(-1), n_other
            )
            ox, oy = p._join(line, other)
            return da * zx + ox + p.a * phi, db * zy + oy - p.b * phi

        rhs = (p.a - x.row, p.b - x.col)
        pa, pb = da + inv * p.a**2, db + inv * p.b**2
        forcing = jnp.clip(x.err / total, cg_tol_floor, 0.1)
        d, _ = jax.scipy.sparse.linalg.cg(
            matvec, rhs, tol=forcing, maxiter=cg_iter, M=lambda z: (z[0] / pa, z[1] / pb)
        )
        # an empty point (no positive entry) sees a linear dual until its potential
        # reaches the score that enters a line's top-k: jump there first
        du, dv = p._lines(*d)
        nl, no = p._lines(n_row, n_col)
        scores = p.scores(x.f, x.g, idx)  # (lines, k), decreasing (but see below)
        u, v = p._lines(x.f, x.g)
        line_gap = jnp.maximum(-jnp.max(scores, axis=1), 0.0)  # no positive score
        du = du + jnp.where(nl == 0, line_gap, 0.0)
        # what an entrant must beat: the keep-th score (the top-k indices are sorted
        # unless they are the whole line, where entering means turning positive)
        kth = jnp.take(scores, keep - 1, axis=1) if p.k < n_other else 0.0 * scores[:, 0]
        thr = jnp.maximum(kth, 0.0)

        def other_gap(_):  # one top-1 pass over the n x m scores: only when needed
            best = p.geom.topk(*p._join(u - thr, v), 1, 1 - p.axis)[:, 0]  # (others,)
            others = jnp.arange(n_other)
            cb = p.geom.cost_at(best, others) if p.axis == 1 else p.geom.cost_at(others, best)
            return jnp.maximum(thr[best] - (u[best] + v - cb), 0.0)

        empty = no == 0
        gap = jax.lax.cond(jnp.any(empty), other_gap, jnp.zeros_like, v)
        dv = dv + jnp.where(empty, gap, 0.0)
        return p._join(du, dv), rhs

    def body(c: _NewtonCarry) -> _NewtonCarry:
        x = c.x
        (df, dg), (rf, rg) = direction(x, c.lam)
        slope = jnp.sum(df * rf) + jnp.sum(dg * rg)  # <grad D, d> > 0
        slack = 16 * eps * (
            jnp.abs(x.value) + jnp.sum(jnp.abs(p.a * x.f)) + jnp.sum(jnp.abs(p.b * x.g))
        )

        def trial(t):
            return _evaluate(p, x.f + t * df, x.g + t * dg, keep)

        def accept(y, t):
            return (y.value >= x.value + 1e-4 * t * slope) | (
                (y.value >= x.value - slack) & (y.err < x.err)
            )

        def bt_cond(s):
            t, y, n = s
            return ~accept(y, t) & (n < max_backtrack)

        def bt_body(s):
            t, _, n = s
            return 0.5 * t, trial(0.5 * t), n + 1

        one = jnp.asarray(1.0, x.f.dtype)
        t, y, halvings = jax.lax.while_loop(
            bt_cond, bt_body, (one, trial(one), jnp.asarray(0))
        )
        # Levenberg-Marquardt: a full step shrinks the damping, each halving grows it
        lam = jnp.clip(c.lam * 4.0 ** (2 * halvings - 1), lam_min, lam_max)
        ok = accept(y, t) & jnp.isfinite(y.value)
        f2, g2 = p.gauge(y.f, y.g)
        y = y._replace(f=f2, g=g2)
        new = jax.tree.map(lambda u, v: jnp.where(ok, u, v), y, x)
        gain = new.value - x.value
        # stalled: neither the value nor the marginal error improves (at a tie the
        # error stays put; near a smooth optimum the value's gain drops below its
        # resolution while the error still shrinks)
        small = ~(gain > vtol * jnp.maximum(jnp.abs(x.value), 1.0)) & ~(new.err < 0.5 * x.err)
        slow = jnp.where(small, c.slow + 1, 0)
        it = c.it + 1
        met = new.err <= gtol
        stationary = ~ok | (slow >= patience)
        finite = jnp.isfinite(new.value)
        status = jnp.where(
            ~finite, Status.NONFINITE,
            jnp.where(met | stationary, Status.SUCCESS, Status.MAX_ITER),
        ).astype(jnp.int32)
        done = ~finite | met | stationary | (it >= max_iter)
        return _NewtonCarry(new, lam, it, slow, status, done)

    x0 = _evaluate(p, *p.gauge(f0, g0), keep)
    finite0 = jnp.isfinite(x0.value)
    met0 = x0.err <= gtol
    c = _NewtonCarry(
        x0, jnp.asarray(1.0, f0.dtype), jnp.asarray(0), jnp.asarray(0),
        jnp.where(finite0, jnp.where(met0, Status.SUCCESS, Status.MAX_ITER),
                  Status.NONFINITE).astype(jnp.int32),
        ~finite0 | met0,
    )
    c = jax.lax.while_loop(lambda c: ~c.done, body, c)
    return c.x.f, c.x.g, c.status, c.it


def _continuation(p: Problem, x0, *, keep, tol, vtol, max_iter, stages=2, factor=8.0,
                  stage_iter=60, stage_tol=1e-3):
    """Semismooth Newton along ``gamma_s = gamma * factor^s``, ``s = stages, ..., 0``,
    with all ``p.k`` entries per line, then once more at ``gamma`` with ``keep``.

    A small ``gamma`` (the default ``0.1 * mean(C)`` at ``n = 1000`` is one) makes the
    dual nearly that of unregularised OT: from a cold start many supports change and
    Newton's local model holds only over short steps (at ``n = 1000`` a cold start at
    ``gamma`` gained little in 300 steps). A larger ``gamma`` spreads each plan over
    more entries; its optimum is a warm start for the next, smaller one. Each stage
    before ``gamma`` stops at a marginal error of ``stage_tol * sum(a)`` or after
    ``stage_iter`` steps; the two at ``gamma`` run to ``tol`` or ``max_iter`` (the second
    only when ``keep < p.k``). One `lax.fori_loop` over the stages, so one
    compiled Newton loop. Returns the last stage's potentials and status and the
    total of Newton steps.
    """

    def stage(s, carry):
        f, g, _, total = carry
        ps = dataclasses.replace(p, gamma=p.gamma * factor ** jnp.maximum(stages - s, 0))
        final = s >= stages
        f, g, status, it = _newton(
            ps, f, g, tol=jnp.where(final, tol, stage_tol), vtol=vtol,
            max_iter=jnp.where(final, max_iter, stage_iter), keep=jnp.where(s > stages, keep, p.k),
        )
        return f, g, status, total + it

    f0, g0 = x0
    zero = jnp.asarray(0)
    n_stages = stages + 1 + int(keep < p.k)
    return jax.lax.fori_loop(0, n_stages, stage, (f0, g0, zero.astype(jnp.int32), zero))


def _error(p: Problem, f: Array, g: Array) -> Array:
    row, col = p.marginals(f, g)
    return jnp.sum(jnp.abs(row - p.a)) + jnp.sum(jnp.abs(col - p.b))


def _phase1(problem: Problem, init, *, method, formulation, tol, max_iter, memory):
    """Maximise the dual ``D`` by semismooth Newton, or ``D`` (or the semi-dual) by
    L-BFGS then polish. Returns the potentials (in ``problem``'s orientation), the
    optimiser's status and iteration count."""
    p, transposed = _loop_problem(problem)
    gtol = tol * jnp.sum(problem.a)
    # the dual value's stationarity test: never looser than 1e-6 (float32) / 1e-10
    vtol = min(tol, 1e-10 if problem.a.dtype == jnp.float64 else 1e-6)
    f0, g0 = init
    if transposed:
        f0, g0 = g0, f0
    if method == "newton":
        # from the semi-dual's line potential at ``(f0, g0)``: exact line marginals
        x0 = p._join(p.implied_line_potential(f0, g0), p._lines(f0, g0)[1])
        # First the looser problem with k' = 4k + 1 entries per line, then k from its
        # optimum. Where only a few lines need more than k entries, the k-sparse
        # dual's optimum sits on ties between their k-th and (k+1)-th scores, and
        # Newton along the gamma path cycles between supports there (n = 1000, k = 2:
        # 420 steps, dual 13% below the optimum); the k'-sparse path meets fewer
        # such kinks, and from its optimum the k-sparse run has few supports to fix.
        # (a whole line's top-k indices come unsorted: keep k' below the line length)
        k_pre = max(p.k, min(p.geom.shape[p.axis] - 1, 4 * p.k + 1))
        f, g, status, it = _continuation(
            dataclasses.replace(p, k=k_pre), x0, keep=p.k, tol=tol, vtol=vtol,
            max_iter=max_iter,
        )
        if formulation == "semi_dual":  # the line potential the semi-dual implies
            f, g = p._join(p.implied_line_potential(f, g), p._lines(f, g)[1])
    elif formulation == "dual":
        # Start from the semi-dual's line potential at ``f0``: exact line marginals.
        u0 = p.implied_line_potential(f0, g0)
        x0 = p._join(u0, p._lines(f0, g0)[1])
        (f, g), status, it = _lbfgs(
            lambda z: -p.dual(*z), x0, tol=vtol, gtol=gtol, max_iter=max_iter, memory=memory
        )
    else:

        def full(v):
            zero = jnp.zeros(p.geom.shape[1 - p.axis], v.dtype)
            u = jax.lax.stop_gradient(p.implied_line_potential(*p._join(zero, v)))
            return p._join(u, v)

        v0 = p._lines(f0, g0)[1]
        v, status, it = _lbfgs(
            lambda v: -p.dual(*full(v)), v0, tol=vtol, gtol=gtol, max_iter=max_iter,
            memory=memory,
        )
        f, g = full(v)
    if method == "lbfgs":
        f, g = _polish(p, f, g)
    if transposed:
        f, g = g, f
    return f, g, status, it


def _refine(problem: Problem, init, *, tol, max_steps):
    """The forward pass that `otlab.implicit` differentiates: Newton ascent, with a
    monotone backtracking step, on the dual restricted to ``problem.support``
    (quadratically regularised OT on a fixed ``k``-sparse support: smooth, concave),
    from the phase-1 potentials ``init``. Stops once the plan meets the marginals to
    ``tol`` and returns its potentials; else returns ``init`` unchanged.

    At a smooth optimum of ``D`` the start is already the answer (no step is taken).
    At a tie (the top-``k`` sets of the optimum are ambiguous) the plan read from the
    dual misses the marginals; on the fixed support its marginals are met whenever
    some plan with that support meets them, at the lowest cost on that support.
    """
    p, transposed = _loop_problem(problem)
    f0, g0 = init
    if transposed:
        f0, g0 = g0, f0
    gtol = tol * jnp.sum(problem.a)

    def cond(c):
        it, f, g, val, err, slow = c
        return (err > gtol) & (it < max_steps) & (slow < 3)

    def body(c):
        it, f, g, val, err, slow = c
        df, dg = _newton_direction(p, f, g)

        # the dual's rounding: a step within it that lowers the marginal error counts
        # as an ascent (near the optimum the increase is below the dual's resolution)
        slack = 16 * jnp.finfo(f.dtype).eps * (
            jnp.abs(val) + jnp.sum(jnp.abs(p.a * f)) + jnp.sum(jnp.abs(p.b * g))
        )

        def accept(t):
            f2, g2 = f + t * df, g + t * dg
            v2 = p.dual(f2, g2)
            return (v2 > val) | ((v2 >= val - slack) & (_error(p, f2, g2) < err))

        # the largest step in 1, 1/2, ..., 2^-30 that is an ascent
        t = jax.lax.while_loop(
            lambda t: ~accept(t) & (t > 2.0**-30), lambda t: 0.5 * t, jnp.asarray(1.0, f.dtype)
        )
        ok = accept(t)
        f2, g2 = jnp.where(ok, f + t * df, f), jnp.where(ok, g + t * dg, g)
        err2 = _error(p, f2, g2)
        # an unbounded restricted dual (no plan on this support meets the marginals)
        # shows as the dual growing while the marginal error stays put
        slow = jnp.where(ok & (err2 < 0.5 * err), 0, slow + 1)
        return it + 1, f2, g2, p.dual(f2, g2), err2, slow

    _, f, g, _, err, _ = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), f0, g0, p.dual(f0, g0), _error(p, f0, g0), jnp.asarray(0))
    )
    # only a plan that meets the marginals replaces the dual's (the restricted
    # potentials of an infeasible support run off to infinity)
    met = err <= gtol
    f, g = jnp.where(met, f, f0), jnp.where(met, g, g0)
    if transposed:
        f, g = g, f
    return f, g, None


@functools.partial(
    jax.jit,
    static_argnames=(
        "k", "axis", "method", "formulation", "tol", "max_iter", "memory", "implicit_diff"
    ),
)
def _solve(
    geom, a, b, gamma, init, *, k, axis, method, formulation, tol, max_iter, memory,
    implicit_diff,
):
    if gamma is None:
        gamma = 0.1 * jax.lax.stop_gradient(geom.mean_cost())
    dtype = geom.dtype
    if tol is None:
        tol = 1e-10 if dtype == jnp.float64 else 1e-4
    problem = Problem(geom, a, b, jnp.asarray(gamma, dtype), k, axis)
    # Phase 1: the dual's maximiser (no derivative of its own: the optimal value is
    # differentiated by the envelope theorem, the plan through phase 2).
    f1, g1, opt_status, n_iter = _phase1(
        jax.lax.stop_gradient(problem), jax.lax.stop_gradient(init),
        method=method, formulation=formulation, tol=tol, max_iter=max_iter, memory=memory,
    )
    f1, g1 = problem.gauge(f1, g1)
    support = problem.topk(f1, g1)  # one top-k pass serves the value and phase 2
    dual_value = problem.dual(f1, g1, support)  # envelope: d/dC = -plan, d/da = f
    # Phase 2: the support of the dual's plan, fixed; implicit gradients of this problem.
    restricted = dataclasses.replace(problem, support=support)
    f, g, _ = implicit.solve(
        functools.partial(_refine, tol=tol, max_steps=50), restricted, (f1, g1), implicit_diff
    )
    idx, vals = restricted.sparse_plan(f, g)
    row, col = restricted._sums(idx, vals)
    err = jnp.sum(jnp.abs(row - a)) + jnp.sum(jnp.abs(col - b))
    met = err <= tol * jnp.sum(a)
    status = jnp.where(
        (opt_status == Status.SUCCESS) & met, Status.SUCCESS, Status.MAX_ITER
    )
    finite = (
        jnp.isfinite(err) & jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
        & jnp.isfinite(dual_value)
    )
    status = jnp.where(finite, status, Status.NONFINITE)
    mass_gap = jnp.abs(jnp.sum(a) - jnp.sum(b)) > 1e-5 * jnp.maximum(jnp.sum(a), jnp.sum(b))
    # k entries per line cannot cover more points on the other side than k * lines
    n_lines = geom.shape[1 - axis]
    too_sparse = k * n_lines < jnp.sum((a if axis == 0 else b) > 0)
    bad = mass_gap | jnp.any(a < 0) | jnp.any(b < 0) | ~(problem.gamma > 0) | too_sparse
    status = jnp.where(bad & finite, Status.INFEASIBLE, status).astype(jnp.int32)
    return CardinalitySolution(
        f, g, idx, vals, geom, a, b, problem.gamma, status, n_iter, err, dual_value, k, axis,
    )


def cardinality_constrained(
    geom: GeometryLike,
    a: Array | None = None,
    b: Array | None = None,
    *,
    k: int,
    gamma: float | Array | None = None,
    method: str = "newton",
    formulation: str = "dual",
    axis: int = 0,
    tol: float | None = None,
    max_iter: int | None = None,
    memory: int = 10,
    init: tuple[Array, Array] | None = None,
    implicit_diff: implicit.ImplicitDiff = implicit.DEFAULT,
) -> CardinalitySolution:
    """Solve sparsity-constrained OT: at most ``k`` nonzeros per column (or row).

    Args:
        geom: a geometry (dense or online), an ott-jax geometry or a cost matrix.
        a: ``(n,)`` source weights (traced); default uniform.
        b: ``(m,)`` target weights (traced); default uniform. ``sum a = sum b``.
        k: static. At most ``k`` nonzeros per column (``axis=0``: ``1 <= k <= n``)
            or per row (``axis=1``: ``1 <= k <= m``). ``k = n`` (``m``) is
            quadratically regularised OT.
        gamma: quadratic regularisation ``> 0`` (traced); default
            ``0.1 * mean(C)`` (under ``stop_gradient``).
        method: static. ``"newton"`` (the default: semismooth Newton on the dual
            with the support recomputed every step, Levenberg-Marquardt damping,
            Armijo backtracking, continuation in ``gamma`` and a first pass with
            ``4k + 1`` entries per line; see docs/cardinality.md) or ``"lbfgs"``
            (optax L-BFGS, zoom line search). With ``"newton"`` the semi-dual's
            potential is the one implied by the dual's optimum.
        formulation: static. ``"dual"`` (L-BFGS over ``(f, g)``) or
            ``"semi_dual"`` (L-BFGS over the other side's potential; the line
            marginals are then exact).
        axis: static. ``0``: at most ``k`` per column (the paper's convention);
            ``1``: per row.
        tol: static. The L1 marginal error ``<= tol * sum(a)`` that the returned
            plan must meet for ``SUCCESS``; L-BFGS also stops once five successive
            steps each improve the dual by at most ``min(tol, 1e-6)`` relative
            (``1e-10`` in float64). Default ``1e-4`` (float32: the rounding floor of
            the marginals is ~1e-5) or ``1e-10`` (float64).
        max_iter: static cap on L-BFGS iterations (default 1000) or, with Newton,
            on each of its two runs at the final ``gamma`` (``4k + 1`` entries per
            line, then ``k``; default 100; the larger ``gamma`` stages run at most
            60 steps each).
        memory: static L-BFGS memory size.
        init: initial potentials ``(f0, g0)`` (no gradient flows through them);
            default zeros.
        implicit_diff: options of the implicit backward pass (`otlab.ImplicitDiff`).

    Returns:
        CardinalitySolution: potentials, sparse and dense plan, diagnostics.

    Example:
        >>> import jax, otlab
        >>> c = jax.random.uniform(jax.random.key(0), (20, 20))
        >>> sol = otlab.cardinality_constrained(c, k=1, gamma=0.1, axis=1)
        >>> sol.indices.shape
        (20, 1)
    """
    geom = _checks.geometry(geom)
    n, m = geom.shape
    dtype = geom.dtype
    _checks.choice(axis, "axis", (0, 1))
    _checks.choice(formulation, "formulation", ("dual", "semi_dual"))
    size = n if axis == 0 else m
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= size:
        raise ValueError(
            f"`k` must be an int in [1, {size}] (the length of a {('column', 'row')[axis]}); "
            f"got {k!r}."
        )
    a = _checks.weights(a, n, "a", dtype)
    b = _checks.weights(b, m, "b", dtype)
    one = jnp.asarray(1.0, dtype)
    _checks.masses(a, b, one, one)
    if gamma is not None:
        gamma = _checks.positive_scalar(gamma, "gamma", dtype)
    _checks.choice(method, "method", ("newton", "lbfgs"))
    if max_iter is None:
        max_iter = 100 if method == "newton" else 1000
    _checks.positive_int(max_iter, "max_iter")
    _checks.positive_int(memory, "memory")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be a positive float or None; got {tol!r}.")
    if not isinstance(implicit_diff, implicit.ImplicitDiff):
        raise ValueError("`implicit_diff` must be an otlab.ImplicitDiff.")
    init = _checks.potentials(init, geom, a, b, None)
    return _solve(
        geom, a, b, gamma, init, k=k, axis=axis, method=method, formulation=formulation,
        tol=None if tol is None else float(tol), max_iter=int(max_iter), memory=int(memory),
        implicit_diff=implicit_diff,
    )
