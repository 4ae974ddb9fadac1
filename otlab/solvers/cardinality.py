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
``4k + 1`` entries per line, by default from the potentials of entropic OT at
``gamma / 2`` (``init="entropic"``, with a rerun from zero where that run's top-``k``
support admits no feasible plan). ``method="lbfgs"`` maximises either formulation by
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
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from otlab import _checks, implicit
from otlab import geometry as geometry_lib
from otlab._control import alone_or_batched, if_any, one_at_a_time_on_cpu
from otlab.geometry import GeometryLike
from otlab.solution import Status
from otlab.solvers.sinkhorn import sinkhorn

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


def _line_sum(x: Array) -> Array:
    """``x.sum(-1)`` as a product with ones: XLA's CPU backend runs a float64 sum of
    the short rows of a ``(lines, k)`` array ~4x slower than this matrix-vector product
    (10.9 vs 2.5 us at 200 x 25), and the Newton loop's conjugate gradient takes one
    per iteration."""
    return x @ jnp.ones(x.shape[-1], x.dtype)


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

    def primal(self, idx: Array, vals: Array) -> Array:
        """``<C, T> + (gamma / 2) |T|^2`` of the sparse plan ``(idx, vals)``."""
        return jnp.sum(vals * self.line_costs(idx)) + 0.5 * self.gamma * jnp.sum(vals**2)

    def _sums(self, idx: Array, vals: Array) -> tuple[Array, Array]:
        """``(T 1, T^T 1)`` of the sparse matrix ``(idx, vals)``."""
        n, m = self.geom.shape
        other = jax.ops.segment_sum(vals.reshape(-1), idx.reshape(-1), n if self.axis == 0 else m)
        line = _line_sum(vals)
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

    def _pattern(self, f: Array, g: Array, kink: Array | float = 0.0):
        """``(idx, mask, da, db)``: the kept entries, the 0/1 pattern ``M`` of the
        plan's nonzeros there (with ``kink > 0``: of the scores ``> -kink``, the
        entries at or just below the kink of ``[s]_+`` included), and the diagonal of
        the Hessian's block part with its ridge (see `hessian_operator`)."""
        idx = jax.lax.stop_gradient(self.topk(f, g))
        mask = (self.scores(f, g, idx) > -kink).astype(f.dtype)
        inv = 1.0 / self.gamma
        n_row, n_col = self._sums(idx, mask)
        rel = 1e-12 if f.dtype == jnp.float64 else 1e-6
        ridge = rel * inv * jnp.maximum(jnp.max(n_row), jnp.max(n_col))
        return idx, mask, inv * n_row + ridge, inv * n_col + ridge

    def hessian_operator(self, f: Array, g: Array):
        """``(matvec, diagonal)`` of ``A = -dF/d(f, g)``.

        ``A = (1/gamma) [[diag(M 1), M], [M^T, diag(M^T 1)]] + (1/gamma) w w^T``,
        ``M`` the 0/1 pattern of the plan's nonzeros (``k`` per line, gathered and
        segment-summed: no ``n x m`` matrix), plus a ridge of ``1e-6`` (float32) or
        ``1e-12`` (float64) times the largest diagonal entry, which keeps the solve
        finite when the pattern leaves a row empty (only at ties).
        """
        idx, mask, da, db = self._pattern(f, g)
        inv = 1.0 / self.gamma

        def apply_m(y):  # M y for y on the columns (``axis=0``) / rows
            return jax.ops.segment_sum(
                (mask * y[:, None]).reshape(-1), idx.reshape(-1), n_other
            )

        n_other = self.geom.shape[0] if self.axis == 0 else self.geom.shape[1]

        def matvec(z):
            x, y = z
            phi = inv * (jnp.sum(self.a * x) - jnp.sum(self.b * y))
            u, v = self._lines(x, y)
            line = inv * _line_sum(mask * v[idx])
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
        """``status == SUCCESS``: phase 1 met its stopping rule and the returned plan
        (at most ``k`` nonzeros per line) meets both marginals to ``tol`` (L1). When
        no plan on the dual's support meets them (a tie at a nonsmooth optimum) and
        the support search finds no other support that admits one (or none exists:
        generic weights need ``k * lines >= n + m - 1``), the status is
        ``MAX_ITER``."""
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
        return self._problem().primal(self.indices, self.values)

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


def _compact(idx: Array, mask: Array, size: int, n_other: int) -> tuple[Array, Array]:
    """The entries of the ``(lines, w)`` pattern where ``mask > 0`` as ``size`` flat
    ``(line, other)`` index pairs, in line order; the unused slots hold ``(lines,
    n_other)``, out of range (the segment sums drop them). Needs ``size >= (mask >
    0).sum()``.

    Each entry's slot is its line's start (a prefix sum over the lines) plus its rank
    within the line (a product with a ``w x w`` triangular 0/1 matrix), then one
    scatter: `jnp.nonzero` over the ``lines * w`` flat pattern costs a prefix sum over
    all of it, which XLA's CPU backend runs as a scan of ``log2`` passes (n = 200, k =
    2: 31 against 16 us in the Newton loop)."""
    n_lines, w = mask.shape
    on = mask > 0
    count = jnp.sum(on, axis=1, dtype=jnp.int32)
    start = jnp.cumsum(count) - count
    rank = (on.astype(mask.dtype) @ jnp.triu(jnp.ones((w, w), mask.dtype), 1)).astype(jnp.int32)
    slot = jnp.where(on, start[:, None] + rank, size).reshape(-1)  # out of range: dropped
    lines = jnp.full((size,), n_lines, idx.dtype).at[slot].set(
        jnp.repeat(jnp.arange(n_lines, dtype=idx.dtype), w), mode="drop"
    )
    others = jnp.full((size,), n_other, idx.dtype).at[slot].set(idx.reshape(-1), mode="drop")
    return lines, others


def _schur_cg(p: Problem, idx: Array, mask: Array | None, da: Array, db: Array, rhs, *, tol,
              maxiter, lines: Array | None = None, atol: Array | float = 0.0):
    """Solve ``(B + (1/gamma) (0, w_o) (0, w_o)^T) z = rhs`` by conjugate gradient on
    the Schur complement of the lines, with ``B = [[D_l, M/gamma], [M^T/gamma, D_o]]``
    in (lines, others) order (``M`` the 0/1 pattern ``mask`` at ``idx``; ``D`` diagonal,
    positive; `p._lines` orders ``(da, db)``) and ``w_o`` the other side's weights.

    The lines are eliminated (``D_l`` is diagonal): Jacobi-preconditioned CG runs on
    ``S = D_o - M^T D_l^{-1} M / gamma^2 + w_o w_o^T / gamma`` over the other side's
    points, then ``z_l = D_l^{-1} (rhs_l - M z_o / gamma)``. On the bipartite ``B``
    Jacobi-preconditioned CG takes two iterations per one on ``S`` (a 2-cyclic
    matrix), and an iteration on ``S`` costs the same products with ``M`` and ``M^T``
    as one on ``B``: half the iterations, on half the vector (at ``n = 200`` an
    iteration is a few microseconds, mostly fixed costs per operation). The rank-one
    term fixes the null direction ``(1, -1)`` of a connected support, as ``w w^T /
    gamma`` with ``w = (a, -b)`` does: for a right-hand side orthogonal to it (as the
    dual's gradient is) the solutions differ only along ``(1, -1)``, a change of gauge.
    Dense or point-cloud geometries (a sharded one splits its sides differently).

    With ``lines`` the pattern is a flat list of entries (`_compact`: ``lines`` and
    ``idx`` of shape ``(size,)``, ``mask`` unused): the products then cost the
    pattern's nonzeros, not its ``(lines, k + 4)`` slots (n = 200, k = 5: ~330
    nonzeros at the final ``gamma`` against 5,000 slots; 1.8 against 7.8 us per
    iteration).
    """
    inv = 1.0 / p.gamma
    n_other = p.geom.shape[p.axis]
    dl, do = p._lines(da, db)
    rl, ro = p._lines(*rhs)
    wo = p._lines(p.a, p.b)[1]

    if lines is None:
        def m_lines(v):  # M v, per line
            return _line_sum(mask * v[idx])

        def m_other(u):  # M^T u, per point on the other side
            return jax.ops.segment_sum((mask * u[:, None]).reshape(-1), idx.reshape(-1), n_other)
    else:  # flat (line, other) pairs (`_compact`)
        n_lines = dl.shape[0]

        def m_lines(v):
            return jax.ops.segment_sum(v[idx], lines, n_lines, indices_are_sorted=True)

        def m_other(u):
            return jax.ops.segment_sum(u[lines], idx, n_other)

    def schur(v):
        return do * v + inv * (wo * (wo @ v) - inv * m_other(m_lines(v) / dl))

    pre = do + inv * (wo * wo - inv * m_other(1.0 / dl))
    zo = jax.scipy.sparse.linalg.cg(
        schur, ro - inv * m_other(rl / dl), tol=tol, atol=atol, maxiter=maxiter,
        M=lambda z: z / pre,
    )[0]
    return p._join((rl - inv * m_lines(zo)) / dl, zo)


def _reducible(geom) -> bool:
    return isinstance(geom, (geometry_lib.Geometry, geometry_lib.PointCloud))


def _newton_direction(
    p: Problem, f: Array, g: Array, maxiter: int | None = None, reduced: bool = True,
    kink: Array | float = 0.0, atol: Array | float = 0.0, damping: Array | float = 0.0,
):
    """``A^{-1} F`` by preconditioned conjugate gradient on the sparse Hessian, at most
    ``maxiter`` iterations, default ``2 (n + m)`` (``n + m`` on the Schur complement;
    in exact arithmetic it ends within ``n + m`` iterations on the pair and within the
    other side's size on the Schur complement; with a cap of 200 the relative residual
    stayed at 1e-3 to 2e-2 on 100 x 100 problems, and phase 2 could stop short of the
    marginals by rounding chance). ``reduced`` (dense and point-cloud geometries): on the lines' Schur
    complement (`_schur_cg`), with the gauge term on the other side only; the step
    then differs along ``(1, -1)``, which the caller's `Problem.gauge` removes. The
    solve stops at a relative residual of 1e-12 (1e-6 in float32) or at the absolute
    residual ``atol`` (2-norm), whichever is larger. ``damping`` is
    added to the Hessian's diagonal: a Levenberg-Marquardt step, between Newton's
    (0) and a gradient step of length ``1 / damping``."""
    tol = 1e-12 if f.dtype == jnp.float64 else 1e-6
    rhs = p.optimality(f, g)
    if reduced and _reducible(p.geom):
        # an iteration on the Schur complement does the work of two on the pair:
        # ``n + m`` of them match the pair's ``2 (n + m)`` (the cap is reached where
        # no plan on the support meets the marginals, an inconsistent system, and
        # where the relative 1e-12 lies below rounding and no ``atol`` is given)
        idx, mask, da, db = p._pattern(f, g, kink)
        da, db = da + damping, db + damping
        maxiter = sum(p.geom.shape) if maxiter is None else maxiter
        return _schur_cg(p, idx, mask, da, db, rhs, tol=tol, maxiter=maxiter, atol=atol)
    maxiter = 2 * sum(p.geom.shape) if maxiter is None else maxiter
    matvec, (da, db) = p.hessian_operator(f, g)
    da, db = da + damping, db + damping
    d, _ = jax.scipy.sparse.linalg.cg(
        lambda z: jax.tree.map(lambda u, v: u + damping * v, matvec(z), z), rhs,
        tol=tol, atol=atol, maxiter=maxiter, M=lambda z: (z[0] / da, z[1] / db),
    )
    return d


def _polish(p: Problem, f: Array, g: Array, steps: int = 3):
    """Newton steps on the dual with its sparse Hessian (conjugate gradient), each kept
    only if it increases the dual. Where the active set is right (a smooth optimum)
    the dual is quadratic and one step lands on it; at a tie the steps are refused."""

    def step(carry, _):
        f, g, val = carry
        # (200 CG iterations, as before phase 2's cap was raised: with 2 (n + m),
        # L-BFGS's SUCCESS count over the benchmark's 64 problems fell from 54 to 52)
        d = _newton_direction(p, f, g, maxiter=200, reduced=False)
        f2, g2 = f + d[0], g + d[1]
        v2 = p.dual(f2, g2)
        ok = v2 >= val
        return (jnp.where(ok, f2, f), jnp.where(ok, g2, g), jnp.where(ok, v2, val)), None

    (f, g, _), _ = jax.lax.scan(step, (f, g, p.dual(f, g)), None, length=steps)
    return f, g


class _State(NamedTuple):
    """The dual at one point: its top-``k`` support, plan values, value, marginals,
    and the candidates that the support was selected from."""

    f: Array
    g: Array
    idx: Array  # (lines, k + 4) candidates, or (lines, k) top-k
    vals: Array  # the plan there: zero outside the keep largest
    smax: Array  # each line's largest score
    kth: Array  # each line's keep-th score where positive, else a value <= 0
    value: Array
    quad: Array  # the value's quadratic term, (gamma / 2) |vals|^2
    row: Array
    col: Array
    err: Array
    cand: Array  # the candidates (lines, 0 when there are none)


def _n_candidates(p: Problem) -> int:
    """How many candidates per line the Newton loop keeps (``0``: none, each
    evaluation is a full top-``k`` pass): dense costs only."""
    n_other = p.geom.shape[p.axis]
    if p.geom.is_online or p.k + 8 >= n_other:
        return 0
    return p.k + 4


def _candidates(p: Problem, f: Array, g: Array) -> Array:
    kc = _n_candidates(p)
    if kc == 0:
        return jnp.zeros((p.geom.shape[1 - p.axis], 0), jnp.int32)
    if _by_line(p):
        return _top_candidates(f[:, None] + g[None, :] - p.geom.cost_matrix, kc)
    return p.geom.topk(f, g, kc, p.axis)


def _by_line(p: Problem) -> bool:
    """Whether the candidates are refreshed line by line: a plain dense cost matrix,
    row-wise (where `_loop_problem` puts every dense problem)."""
    return type(p.geom) is geometry_lib.Geometry and p.axis == 1


def _top_keep(sc: Array, keep: Array) -> tuple[Array, Array]:
    """``(kept, kth)``: the ``keep`` largest entries of each row of ``sc`` (ties to the
    lower index) and the ``keep``-th largest score where it is positive (a value
    ``<= 0`` elsewhere). Where no row has more than ``keep`` positive scores (most
    Newton steps at small ``gamma``: a few per line) every entry is kept (the plan,
    ``[s]_+``, is the same) and the ranks are not computed."""
    npos = jnp.sum(sc > 0, axis=1, dtype=jnp.int32)

    def ranked(_):
        rank = geometry_lib._pairwise_ranks(sc)
        return rank < keep, jnp.max(jnp.where(rank == keep - 1, sc, -jnp.inf), axis=1)

    smallest = jnp.min(jnp.where(sc > 0, sc, jnp.inf), axis=1)
    few = (jnp.ones(sc.shape, bool), jnp.where(npos == keep, smallest, 0.0).astype(sc.dtype))
    return if_any(jnp.any(npos > keep), ranked, few)


def _top_candidates(sc: Array, kc: int) -> Array:
    """Indices of the ``kc`` largest entries of each row of ``sc``, in float32 and
    unsorted: candidates for the top ``kc - 4`` (XLA's CPU ``top_k`` sorts float64
    rows, ~50x slower). As with `otlab.Geometry.topk`'s float64 path, only more than
    4 entries tied with the ``(kc - 4)``-th in float32 could leave one out. (The
    exact float64 order of the candidates, which that path adds, is not needed: the
    candidates are ranked again at every evaluation.)"""
    return geometry_lib._lax_top_k(sc.astype(jnp.float32), kc)[1].astype(jnp.int32)


def _evaluate(p: Problem, f: Array, g: Array, keep: Array, cand: Array) -> _State:
    """``D(f, g)`` with its support, plan and marginals, for the ``keep <= k``
    largest scores of each line (``keep`` may be traced: one compiled loop serves
    every ``keep``).

    The support is the top-``keep`` of the scores at the ``cand`` entries of each
    line (the top-``k + 4`` of an earlier point; ranked by pairwise comparisons, no
    sort, and only when some line has more than ``keep`` positive scores:
    `_top_keep`), certified by one counting pass over the ``n x m`` scores
    (`otlab.Geometry.count_at_least`: no entry outside the candidates reaches the
    ``keep``-th score, when it is positive); the lines where that fails get new
    candidates here, by a float32 top-``k + 4`` over their rows of a dense cost matrix
    (`_top_candidates`; other geometries: one top-``k + 4`` pass over every line).
    Between Newton steps few supports change, so most evaluations cost one reduction
    pass instead of a top-``k`` selection (~10x slower on CPU). Without candidates (online geometries): one
    top-``k`` pass. ``idx`` holds the candidates (or the top-``k``), ``vals`` is zero
    outside the support.
    """
    u, v = p._lines(f, g)
    tiny = jnp.finfo(f.dtype).tiny

    if cand.shape[1] == 0:
        idx = p.topk(f, g)  # sorted, unless it is the whole line
        sc = p.scores(f, g, idx)
        rank = jnp.arange(idx.shape[1])
        kept = jnp.broadcast_to(rank < keep, sc.shape)
        if p.k < p.geom.shape[p.axis]:  # what an entrant must beat: the keep-th score
            kth = jnp.max(jnp.where(rank == keep - 1, sc, -jnp.inf), axis=1)
        else:  # the whole line: entering means turning positive
            kth = jnp.zeros_like(u)
    else:
        idx = cand
        c_cand = p.line_costs(cand)
        sc = u[:, None] + v[cand] - c_cand
        kept, kth = _top_keep(sc, keep)
        # no entry outside the candidates may reach the keep-th score, or (when it is
        # not positive) turn positive
        t = jnp.where(kth > 0, kth, tiny)
        inside = jnp.sum((u - t)[:, None] + v[cand] - c_cand >= 0, axis=1, dtype=jnp.int32)
        ok = inside == p.geom.count_at_least(f, g, t, p.axis)

        if _by_line(p):
            # only the lines whose certificate fails get new candidates, ``R`` lines per
            # round (a top-``k + 4`` over those rows of the cost matrix): under `jax.vmap`
            # a problem's failures no longer cost a selection over every line of every
            # problem, and one problem's failures leave the others' candidates as they are
            n_lines = cand.shape[0]
            n_sel = max(8, n_lines // 8)
            cost = p.geom.cost_matrix

            def refresh(c):
                idx, sc, kept, kth, todo = c
                rows = jnp.nonzero(todo, size=n_sel, fill_value=n_lines)[0]
                safe = jnp.minimum(rows, n_lines - 1)
                sc_rows = u[safe][:, None] + v[None, :] - cost[safe]
                new = _top_candidates(sc_rows, cand.shape[1])
                sc_new = jnp.take_along_axis(sc_rows, new, axis=1)
                put = lambda z, w: z.at[rows].set(w, mode="drop")  # noqa: E731
                kept_new, kth_new = _top_keep(sc_new, keep)
                return (put(idx, new), put(sc, sc_new), put(kept, kept_new), put(kth, kth_new),
                        put(todo, jnp.zeros_like(rows, dtype=bool)))

            idx, sc, kept, kth, _ = jax.lax.while_loop(
                lambda c: jnp.any(c[4]), refresh, (idx, sc, kept, kth, ~ok)
            )
        else:

            def recompute(_):
                new = _candidates(p, f, g)
                sc = u[:, None] + v[new] - p.line_costs(new)
                return (new, sc) + _top_keep(sc, keep)

            idx, sc, kept, kth = if_any(~jnp.all(ok), recompute, (idx, sc, kept, kth))
    vals = jnp.where(kept, jax.nn.relu(sc), 0.0) / p.gamma
    quad = 0.5 * p.gamma * jnp.sum(vals * vals)
    value = jnp.sum(p.a * f) + jnp.sum(p.b * g) - quad
    row, col = p._sums(idx, vals)
    err = jnp.sum(jnp.abs(row - p.a)) + jnp.sum(jnp.abs(col - p.b))
    return _State(f, g, idx, vals, jnp.max(sc, axis=1), kth, value, quad, row, col, err,
                  idx if cand.shape[1] else cand)


_DIRECT_MAX = 128  # under `jax.vmap`
_DIRECT_ALONE_MAX = 32  # a single problem


def _schur_solve(p: Problem, idx: Array, mask: Array, da: Array, db: Array, rhs):
    """Solve ``(B + (1/gamma) (0, w_o) (0, w_o)^T) z = rhs`` exactly, with ``B =
    [[D_l, M/gamma], [M^T/gamma, D_o]]`` in (lines, others) order (``M`` the 0/1
    pattern ``mask`` at ``idx``; ``D`` diagonal, positive) and ``w_o`` the other side's
    weights: the system of `_schur_cg`, whose solution differs from that with the full
    gauge term ``w w^T / gamma``, ``w = (a, -b)``, only along the gauge ``(1, -1)``.
    The lines are eliminated (``D_l`` is diagonal) and the Schur complement ``S = D_o -
    M^T D_l^{-1} M / gamma^2 + w_o w_o^T / gamma`` (``n_other x n_other``) is formed
    densely and factored by Cholesky. (It had the full gauge term by Sherman-Morrison:
    a second right-hand side, two more triangular solves per direction; under `vmap`
    over 64 problems at ``n = 100``, ``k = 5``: 1119 → 1079 ms, medians of 4
    interleaved runs, the same statuses, dual values equal to 2e-16.)

    A cost independent of the conditioning (conjugate gradient on these graph
    Laplacians takes from a few to hundreds of steps): under `jax.vmap` no problem
    waits on another's solve. ``O(n_other^3)``: the Newton loop uses it for
    ``n_other <= 32``, and under `jax.vmap` for ``n_other <= 128``; a single problem
    above 32 points runs conjugate gradient instead (`_control.alone_or_batched`: at
    ``n = 128`` a single solve took 2.3-2.5x less time that way, measured 2026-12-02,
    while under `vmap` the conjugate gradient's lockstep iterations cost more than
    the dense solves: 64 problems at ``n = 100``, 2.4 s against 1.4 s).
    """
    inv = 1.0 / p.gamma
    n_other = p.geom.shape[p.axis]
    dl, do = p._lines(da, db)
    wo = p._lines(p.a, p.b)[1]
    rl, ro = p._lines(*rhs)
    lines = jnp.arange(idx.shape[0])[:, None]
    m = jnp.zeros((idx.shape[0], n_other), mask.dtype).at[lines, idx].add(mask)  # dense M
    s = jnp.diag(do) + inv * jnp.outer(wo, wo) - (inv * inv) * (m.T / dl) @ m
    zo = jax.scipy.linalg.cho_solve(
        jax.scipy.linalg.cho_factor(s, lower=True), ro - inv * ((rl / dl) @ m)
    )
    return p._join((rl - inv * (m @ zo)) / dl, zo)


class _NewtonCarry(NamedTuple):
    x: _State  # the current iterate (evaluated at the current stage)
    d: tuple  # the Newton direction from ``x``
    slope: Array  # <grad D(x), d>
    t: Array  # the step tried last
    halvings: Array  # of the current line search
    lam: Array  # Levenberg-Marquardt damping
    slow: Array  # stalled steps in a row
    ref: Array  # the marginal error when it last halved
    stage: Array
    it: Array  # Newton steps in this stage
    total: Array  # Newton steps in all
    restart: Array  # a new stage: re-evaluate x first
    status: Array
    done: Array


def _newton(p: Problem, x0, *, keep, tol, vtol, max_iter, stages=2, factor=8.0,
            stage_iter=60, stage_tol=1e-2, patience=3, max_backtrack=20,
            tie_vtol=1e-8, kp_tol=1e-6, keep_iter=None):
    """Maximise ``D`` by a globalised semismooth Newton method (Lorenz, Manns & Meyer
    2021 for quadratically regularised OT), the support recomputed at every step,
    along a continuation in ``gamma``.

    At ``(f, g)`` the dual is quadratic on the current support (the positive entries
    of the top-``k`` of each line, pattern ``M``): its Hessian is ``-(1/gamma) [[diag(M
    1), M], [M^T, diag(M^T 1)]]``. The step solves ``(H_reg) d = grad D`` by conjugate
    gradient, with ``H_reg`` that Hessian negated, its empty rows' diagonal raised to
    ``1 / gamma`` (an entry's worth), plus ``(lam / gamma) I`` (Levenberg-Marquardt:
    ``lam`` is divided by 4 after a full step and multiplied by 4 per backtracking
    halving; the support graph is usually disconnected and each component's gauge
    direction is a null direction of the Hessian) and the gauge term ``w w^T /
    gamma`` (``w_o w_o^T / gamma`` on the other side only where the solve runs on the
    lines' Schur complement, `_schur_cg`: the step changes only along the gauge
    ``(1, -1)``, which the dual ignores). ``d`` is an ascent direction of the concave ``D``; the step ``t = 1,
    1/2, ...`` (at most ``max_backtrack`` halvings) is the first with Armijo's ascent
    ``D(x + t d) >= D(x) + 1e-4 t <grad, d>``; within the dual's rounding, a step that
    lowers the marginal error counts as one.

    Continuation: ``gamma_s = gamma * factor^(stages - s)`` for ``s = 0, ...,
    stages``, with all ``p.k`` entries per line, then (when ``keep < p.k``) once more
    at ``gamma`` with the ``keep`` largest. A small ``gamma`` (the default ``0.1 *
    mean(C)`` at ``n = 1000`` is one) makes the dual nearly that of unregularised OT:
    from a cold start many supports change and Newton's local model holds only over
    short steps (at ``n = 1000`` a cold start at ``gamma`` gained little in 300
    steps). A larger ``gamma`` spreads each plan over more entries; its optimum is a
    warm start for the next, smaller one. Each stage before ``gamma`` stops at a
    marginal error of ``stage_tol * sum(a)`` or after ``stage_iter`` steps (an
    intermediate optimum only starts the next stage: 1e-2 against 1e-3 took Newton
    steps 478 -> 443 and time 147 -> 131 ms over the twelve ``n = 200`` benchmark
    problems, six seeds and k in 2, 5, and 1030 -> 984 steps at ``n = 1000``, the
    statuses unchanged; 3e-2 left one ``n = 1000`` problem ``MAX_ITER``); those at
    ``gamma`` run to ``tol`` or ``max_iter`` steps. A stage also ends (``SUCCESS``)
    when ``patience`` steps in a row raise ``D`` by at most ``vtol`` relative
    without halving the marginal error, or when no step is an ascent (a nonsmooth
    optimum: a tie between ``k``-th and ``(k+1)``-th scores). In the last stage
    (``keep < p.k``) that threshold is ``max(vtol, tie_vtol)``: its optimum often lies on
    ties, where the steps cycle between supports while ``D`` creeps up by 1e-9 to 1e-8
    relative per step (n = 200, k = 2: 40 to 80 such steps, 1e-6 relative in all);
    the plan is then phase 2's (`_feasible_support`), not this stage's. So is the
    threshold of the ``k'`` stage at ``gamma`` before it, whose optimum only starts the
    last stage (n = 1000, seed 0 of the benchmark: Newton steps 123 → 112 at k = 2 and
    128 → 112 at k = 5, dual values lower by 3e-9 and 2e-10 relative; n = 200, six
    seeds: one changed, 69 → 62 steps and a higher dual value). For the same reason
    the ``k'`` stage at ``gamma`` stops at a marginal error of ``max(tol, kp_tol) *
    sum(a)`` instead of ``tol``: its last steps, from 1e-6 down, took about 640 of
    the 1,600 conjugate-gradient iterations of phase 1 at n = 200, k = 2. Over 72
    problems (n in 50 to 500, k in 1, 2, 5, six seeds each) the statuses are unchanged
    and the dual values move by -1.5e-8 to +7.5e-9 relative; a looser tie threshold
    (3e-8 or 1e-7) instead left phase 2 a support it could not complete (n = 1000,
    k = 5, seed 1: `MAX_ITER`, marginal error 3e-4 to 5e-3).

    One `lax.while_loop` runs all of it, one trial point per iteration (a new
    direction, or a halving of the step, or a change of stage): under `jax.vmap` the
    batch runs in lockstep for the longest problem's number of trials, instead of,
    with loops nested per stage and per line search, the sum over stages and steps of
    the batch's longest (a problem that backtracks held up the whole batch). Returns
    the potentials, the final stage's status and the total of Newton steps.
    """
    total_mass = jnp.sum(p.a)
    n_lines, n_other = p.geom.shape[1 - p.axis], p.geom.shape[p.axis]
    cg_iter = 2 * (n_lines + n_other)
    # the linear solve: dense Cholesky of the Schur complement (n_other x n_other)
    # up to 32 points, conjugate gradient above 128, and in between conjugate gradient
    # for one problem, the dense solve under `jax.vmap` (see `_schur_solve`)
    direct = n_other <= _DIRECT_MAX
    cg_tol_floor = 1e-10 if x0[0].dtype == jnp.float64 else 1e-5
    eps = jnp.finfo(x0[0].dtype).eps
    lam_min, lam_max = (1e-12, 1e8) if x0[0].dtype == jnp.float64 else (1e-6, 1e6)
    last = stages + int(keep < p.k)  # the index of the final stage
    first_tie = stages if keep < p.k else stages + 1
    # the ``k'`` stage at ``gamma``, when a ``keep``-``k`` stage follows it
    kp_stage_tol = max(tol, kp_tol) if keep < p.k else tol

    def at(s):  # the stage's problem, entries kept, tolerance and step cap
        ps = dataclasses.replace(p, gamma=p.gamma * factor ** jnp.maximum(stages - s, 0))
        final = s >= stages
        stol = jnp.where(final, jnp.where(s > stages, tol, kp_stage_tol), stage_tol)
        cap = jnp.where(final, max_iter, stage_iter)
        if keep_iter is not None:
            cap = jnp.where(s > stages, keep_iter, cap)
        return ps, jnp.where(s > stages, keep, p.k), stol * total_mass, cap

    def direction(ps: Problem, x: _State, lam: Array, fresh: Array):
        """The damped Newton direction at ``x`` and ``<grad D, d>`` (zero unless
        ``fresh``: the conjugate gradient then takes no step)."""
        inv = 1.0 / ps.gamma
        mask = (x.vals > 0).astype(x.f.dtype)
        n_row, n_col = ps._sums(x.idx, mask)
        da = inv * (jnp.maximum(n_row, 1.0) + lam)
        db = inv * (jnp.maximum(n_col, 1.0) + lam)
        idx = x.idx

        rhs = (jnp.where(fresh, ps.a - x.row, 0.0), jnp.where(fresh, ps.b - x.col, 0.0))
        forcing = jnp.clip(x.err / total_mass, cg_tol_floor, 0.1)

        def dense(ps, idx, mask, da, db, rhs, forcing):
            return _schur_solve(ps, idx, mask, da, db, rhs)

        def iterative(ps, idx, mask, da, db, rhs, forcing):
            # conjugate gradient on the lines' Schur complement
            size = n_lines + n_other

            def full(_):
                return _schur_cg(ps, idx, mask, da, db, rhs, tol=forcing, maxiter=cg_iter)

            if idx.shape[0] * idx.shape[1] <= size:
                return full(None)

            # the products on the plan's positive entries alone, as a flat list,
            # where they fit in ``n + m`` slots (at the final gamma a few per line:
            # n = 200, ~330 of the 5,000 candidate slots at k = 5); `if_any` twice:
            # under `jax.vmap` a batch runs both only when its problems disagree
            def compact(_):
                lines, others = _compact(idx, mask, size, n_other)
                return _schur_cg(ps, others, None, da, db, rhs, tol=forcing,
                                 maxiter=cg_iter, lines=lines)

            fits = jnp.sum(mask) <= size
            d = if_any(fits, compact, (jnp.zeros_like(rhs[0]), jnp.zeros_like(rhs[1])))
            return if_any(~fits, full, d)

        args = (ps, idx, mask, da, db, rhs, forcing)
        if direct and (n_other <= _DIRECT_ALONE_MAX or not _reducible(ps.geom)):
            d = dense(*args)
        elif direct:  # conjugate gradient alone, the dense solve under `jax.vmap`
            d = alone_or_batched(iterative, dense)(*args)
        elif _reducible(ps.geom):
            d = iterative(*args)
        else:  # a sharded geometry: on the pair (f and g are split differently)
            pa, pb = da + inv * ps.a**2, db + inv * ps.b**2

            def pair(z):
                zx, zy = z
                phi = inv * (jnp.sum(ps.a * zx) - jnp.sum(ps.b * zy))
                u, v = ps._lines(zx, zy)
                line = _line_sum(mask * v[idx])  # M v per line, M^T u per other point
                other = jax.ops.segment_sum(
                    (mask * u[:, None]).reshape(-1), idx.reshape(-1), n_other
                )
                ox, oy = ps._join(line, other)
                return da * zx + inv * ox + ps.a * phi, db * zy + inv * oy - ps.b * phi

            d = jax.scipy.sparse.linalg.cg(
                pair, rhs, tol=forcing, maxiter=cg_iter, M=lambda z: (z[0] / pa, z[1] / pb)
            )[0]
        slope = jnp.sum(d[0] * rhs[0]) + jnp.sum(d[1] * rhs[1])
        # an empty point (no positive entry) sees a linear dual until its potential
        # reaches the score that enters a line's top-k: jump there first
        du, dv = ps._lines(*d)
        nl, no = ps._lines(n_row, n_col)
        u, v = ps._lines(x.f, x.g)
        line_gap = jnp.maximum(-x.smax, 0.0)  # no positive score
        du = du + jnp.where(fresh & (nl == 0), line_gap, 0.0)
        thr = jnp.maximum(x.kth, 0.0)  # what an entrant must beat
        empty = fresh & (no == 0)

        def other_gap(_):  # one max pass over the n x m scores: only when needed
            return jnp.maximum(-ps.geom.max_score(*ps._join(u - thr, v), 1 - ps.axis), 0.0)

        gap = if_any(jnp.any(empty), other_gap, jnp.zeros_like(v))
        dv = dv + jnp.where(empty, gap, 0.0)
        return ps._join(du, dv), slope

    def body(c: _NewtonCarry) -> _NewtonCarry:
        x = c.x
        ps, keep_s, gtol_s, cap_s = at(c.stage)
        # a new stage first re-evaluates x (its gamma, its entries kept); a stage
        # that starts at its tolerance takes no step
        restart = c.restart
        skip = ~restart & ((x.err <= gtol_s) | (cap_s == 0))
        fresh = (c.halvings == 0) & ~skip & ~restart
        d, slope = if_any(
            fresh, lambda _: direction(ps, x, c.lam, fresh), (c.d, c.slope)
        )
        t = jnp.where(c.halvings == 0, 1.0, 0.5 * c.t).astype(c.t.dtype)
        y = _evaluate(
            ps, jnp.where(restart, x.f, x.f + t * d[0]), jnp.where(restart, x.g, x.g + t * d[1]),
            keep_s, x.cand,
        )
        # the gain, from the differences of the potentials; within the value's rounding
        # a step that lowers the marginal error counts as an ascent
        lin = jnp.sum(ps.a * (y.f - x.f)) + jnp.sum(ps.b * (y.g - x.g))
        gain = lin - (y.quad - x.quad)
        slack = 16 * eps * (
            jnp.abs(x.value) + jnp.sum(jnp.abs(ps.a * x.f)) + jnp.sum(jnp.abs(ps.b * x.g))
        )
        accept = (gain >= 1e-4 * t * slope) | ((gain >= -slack) & (y.err < x.err))
        # a step ends: accepted, or the last halving refused (x stays)
        stepped = ~skip & ~restart & (accept | (c.halvings >= max_backtrack))
        ok = accept & jnp.isfinite(y.value)
        fy, gy = ps.gauge(y.f, y.g)
        y = y._replace(f=fy, g=gy)
        new = jax.tree.map(lambda u, v: jnp.where(restart | (stepped & ok), u, v), y, x)
        # Levenberg-Marquardt: a full step shrinks the damping, each halving grows it
        lam = jnp.where(
            stepped, jnp.clip(c.lam * 4.0 ** (2 * c.halvings - 1), lam_min, lam_max), c.lam
        )
        gain = jnp.where(stepped & ok, gain, 0.0)
        # stalled: neither the value nor the marginal error improves (at a tie the
        # error stays put; near a smooth optimum the value's gain drops below its
        # resolution while the error still shrinks)
        halved = new.err < 0.5 * c.ref
        ref = jnp.where(restart | (stepped & halved), new.err, c.ref)
        # the stall threshold at ties: the keep-k stage, and the k' stage before it
        # (its optimum is only that stage's start)
        vtol_s = jnp.where(c.stage >= first_tie, jnp.maximum(vtol, tie_vtol), vtol)
        small = ~(gain > vtol_s * jnp.maximum(jnp.abs(x.value), 1.0)) & ~halved
        slow = jnp.where(stepped, jnp.where(small, c.slow + 1, 0), c.slow)
        it = c.it + stepped
        finite = jnp.isfinite(new.value)
        met = new.err <= gtol_s
        stationary = stepped & (~ok | (slow >= patience))
        end = skip | ~finite | (stepped & (met | stationary | (it >= cap_s)))
        status = jnp.where(
            ~finite, Status.NONFINITE,
            jnp.where(met | skip | stationary, Status.SUCCESS, Status.MAX_ITER),
        ).astype(jnp.int32)
        done = end & ((c.stage >= last) | ~finite)
        nxt = end & ~done  # the next stage
        return _NewtonCarry(
            new, d, slope, t, jnp.where(stepped | skip | restart, 0, c.halvings + 1),
            jnp.where(nxt, 1.0, lam).astype(lam.dtype), jnp.where(nxt, 0, slow), ref,
            c.stage + nxt, jnp.where(nxt, 0, it), c.total + stepped, nxt, status, done,
        )

    f0, g0 = x0
    ps0, keep0, _, _ = at(jnp.asarray(0))
    x = _evaluate(ps0, *p.gauge(f0, g0), keep0, _candidates(p, *p.gauge(f0, g0)))
    zero, one = jnp.asarray(0), jnp.asarray(1.0, f0.dtype)
    finite0 = jnp.isfinite(x.value)
    c = _NewtonCarry(
        x, (jnp.zeros_like(f0), jnp.zeros_like(g0)), 0 * one, one, zero, one, zero, x.err, zero,
        zero, zero, jnp.asarray(False), jnp.where(finite0, Status.MAX_ITER, Status.NONFINITE).astype(jnp.int32), ~finite0,
    )
    c = jax.lax.while_loop(lambda c: ~c.done, body, c)
    return c.x.f, c.x.g, c.status, c.total


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
        # k = 1 with whole units: the auction (`_feasible_support`) takes the k' optimum
        # to the assignment and certifies it; the k = 1 stage is skipped
        keep_iter = (
            jnp.where(_unit_capacities(p)[0], 0, max_iter) if p.k == 1 else None
        )
        f, g, status, it = _newton(
            dataclasses.replace(p, k=k_pre), x0, keep=p.k, tol=tol, vtol=vtol,
            max_iter=max_iter, keep_iter=keep_iter,
        )

        # Newton ending below its own start has failed (massive ties: with a constant
        # cost every line's top-k picks the same points and no step along the Newton
        # direction is an ascent): L-BFGS on the dual from the start instead, which
        # needs only its gradient. Not in a lockstep batch: there the check (a
        # `while_loop` of at most one step around optax's L-BFGS) made a batch of 64
        # problems (n = 100, k = 5) 20x slower although no problem needed it. (On CPU a
        # vmapped batch runs phase 1 one problem at a time, `one_at_a_time_on_cpu` in
        # `_solve`, so every problem gets the check; a lockstep batch runs off CPU.)
        def checked(p, f, g, status, it, x0):
            def first_order(c):
                (fl, gl), sl, il = _lbfgs(
                    lambda z: -p.dual(*z), x0, tol=vtol, gtol=tol * jnp.sum(p.a),
                    max_iter=10 * max_iter, memory=memory,
                )
                return fl, gl, sl.astype(c[2].dtype), c[3] + il

            return if_any(~(p.dual(f, g) >= p.dual(*x0)), first_order, (f, g, status, it))

        def unchecked(p, f, g, status, it, x0):
            return f, g, status, it

        f, g, status, it = alone_or_batched(checked, unchecked)(p, f, g, status, it, x0)
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


# phase 2's Newton matrix counts the entries with a score above ``-_KINK * gamma *
# mean weight`` (see `_refine`)
_KINK = 1e-4
# phase 2's conjugate gradient stops at a residual of ``_CG_ATOL * tol * sum(a) /
# sqrt(n + m)`` (see `_refine`)
_CG_ATOL = 0.5


def _refine(problem: Problem, init, *, tol, max_steps, patience=10):
    """The forward pass that `otlab.implicit` differentiates: `_restricted_ascent`
    from ``init``; its potentials where the plan meets the marginals to ``tol``, else
    ``init`` unchanged (the restricted potentials of an infeasible support run off to
    infinity)."""
    f, g, met = _restricted_ascent(problem, init, tol=tol, max_steps=max_steps,
                                   patience=patience)
    f0, g0 = init
    return jnp.where(met, f, f0), jnp.where(met, g, g0), None


def _restricted_ascent(problem: Problem, init, *, tol, max_steps, patience=10):
    """Newton ascent, with a
    monotone backtracking step, on the dual restricted to ``problem.support``
    (quadratically regularised OT on a fixed ``k``-sparse support: smooth, concave),
    from the phase-1 potentials ``init``. Stops once the plan meets the marginals to
    ``tol``; returns the last potentials and whether they meet them (where they do
    not, the last iterate shows which points lack mass: `_search_support`).

    At a smooth optimum of ``D`` the start is already the answer (no step is taken).
    At a tie (the top-``k`` sets of the optimum are ambiguous) the plan read from the
    dual misses the marginals; on the fixed support its marginals are met whenever
    some plan with that support meets them, at the lowest cost on that support.

    The restricted problem is often degenerate (uniform weights: many supports carry
    zero flow on some entries, whose scores sit at the kink of ``[s]_+``): the
    Hessian of the positive entries alone is then singular, each of its components
    missing mass moves only along its gauge direction, by ``residual / ridge``, and
    the steps stalled at marginal errors of ~1e-7. The Newton matrix therefore counts
    the entries with a score above ``-1e-4 gamma * mean weight`` (an element of the
    generalised Jacobian at the kink; entries that would carry at most 1e-4 of a
    point's mass), the step is still checked on the dual itself. The run stops at
    ``tol``, after ``max_steps``, when ``patience`` steps in a row do not lower the
    lowest marginal error (damped first steps may raise it while the dual climbs: at
    n = 1000, k = 2, eight of them before the step that meets the marginals), or when
    the dual exceeds what any plan on the support that meets the marginals costs
    (``max C * mass + (gamma / 2) mass^2``: weak duality; the dual of an infeasible
    support is unbounded and passes that bound within a few steps).
    """
    p, transposed = _loop_problem(problem)
    f0, g0 = init
    if transposed:
        f0, g0 = g0, f0
    gtol = tol * jnp.sum(problem.a)
    kink = _KINK * p.gamma * jnp.sum(p.a) / sum(p.geom.shape)
    # the linear solve need not be more exact than the tolerance: on the support's
    # quadratic model the next marginal error (L1, over ``n + m`` entries) is the
    # solve's residual, at most ``sqrt(n + m)`` times its 2-norm, so a residual of
    # ``_CG_ATOL * gtol / sqrt(n + m)`` leaves it at half the tolerance. Relative
    # 1e-12 alone asked for residuals of ~1e-15 that rounding rarely reaches: at
    # n = 200, k = 2 (seed 0) the recursive residual reached 3e-11 within 100
    # iterations, then wandered between 1e-14 and 3e-9 up to the 400-iteration cap in
    # 3 of 4 solves (1,381 iterations; 323 with this bound, the same Newton steps)
    cg_atol = _CG_ATOL * gtol / math.sqrt(sum(p.geom.shape))

    # weak duality: a plan on the support that meets the marginals costs at most
    # ``max C * mass + (gamma / 2) mass^2``; a restricted dual above that has no such
    # plan (the dual of an infeasible support is unbounded)
    mass = jnp.sum(p.a)
    bound = jnp.max(p.line_costs(p.support)) * mass + 0.5 * p.gamma * mass * mass

    # Levenberg-Marquardt damping, raised 100-fold after a step that found no ascent
    # and lowered 100-fold after one that did: where the pattern leaves a point with no
    # entry near its kink (its Hessian row is the ridge alone) the Newton step there is
    # ``residual / ridge``, ~1e8 long, and no step along it was an ascent: phase 2
    # stopped at its start on supports that admit a plan (uniform 45 x 60, k = 2:
    # marginal error 3e-2; one step of 2^-30 along it, then Newton, reached 5e-12)
    mu0 = 1e-6 / p.gamma * jnp.maximum(p.k, 1)

    def cond(c):
        it, f, g, val, err, best, slow, mu = c
        return (err > gtol) & (it < max_steps) & (slow < patience) & (val <= bound)

    def body(c):
        it, f, g, val, err, best, slow, mu = c
        df, dg = _newton_direction(p, f, g, kink=kink, atol=cg_atol, damping=mu)

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
        # (gauged: the reduced solve's step may move along (1, -1))
        f2, g2 = p.gauge(jnp.where(ok, f + t * df, f), jnp.where(ok, g + t * dg, g))
        err2 = _error(p, f2, g2)
        # stalled: no step lowers the lowest marginal error for ``patience`` steps
        # (damped first steps may raise the error while the dual climbs)
        better = ok & (err2 < best)
        mu2 = jnp.where(ok, jnp.where(mu > mu0, 0.01 * mu, 0.0), jnp.maximum(100 * mu, mu0))
        return (it + 1, f2, g2, p.dual(f2, g2), err2, jnp.where(better, err2, best),
                jnp.where(better, 0, slow + 1), mu2)

    err0 = _error(p, f0, g0)
    _, f, g, _, err, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), f0, g0, p.dual(f0, g0), err0, err0, jnp.asarray(0),
                     jnp.zeros((), f0.dtype))
    )
    if transposed:
        f, g = g, f
    return f, g, err <= gtol


def _feasible_support(p: Problem, f: Array, g: Array, support: Array, tol,
                      converged: Array | bool = True):
    """The support for phase 2 and its start: the top-``k`` at the dual's optimum, or, when no plan
    on it meets the marginals (and the dual is ``converged``), one found by
    `_search_support` (``k > 1``); where that fails too, or at ``k = 1`` without whole
    units, the top-``k`` after one step on the other side's
    potential towards its marginal (``+ gamma (w - T 1)``, ``w`` that side's weights).

    At a tie (the dual's optimum lies on a kink) each tied line keeps an arbitrary
    ``k`` of its tied entries, and the restricted problem can be infeasible: some
    point on the other side then lacks mass (or has too much) for any plan on that
    support. The step raises the scores of the points that lack mass by what one
    entry would need and lowers those in excess, so that the ties break in their
    favour; lines away from ties keep their support. Costs one trial of phase 2 (no
    gradient), and one more top-``k`` pass only where the first support fails.
    Returns the support and phase 2's start: that trial's potentials (refined where the
    first support is kept, so phase 2 does not repeat its steps; ``(f, g)`` unchanged
    where it failed, as `_refine` returns its start then); the dual point of the
    auction (``(f, g)`` where it did not run), whether it ran, whether the first
    support was kept, and whether the support returned admits a plan that meets the
    marginals (the first, or, ``k > 1``, one the search found).
    """
    first = dataclasses.replace(p, support=support)
    row, col = first.marginals(f, g)
    if p.axis == 0:  # lines are columns: the other side is the rows
        f2, g2 = f + p.gamma * (p.a - row), g
    else:
        f2, g2 = f, g + p.gamma * (p.b - col)

    def fallback(_):
        return p.topk(f2, g2)

    if p.k != 1:
        # (the search only at the dual's optimum: short of it the status is MAX_ITER
        # whatever the plan, and a search there cost 90 s at n = 1000 after L-BFGS's
        # 1000 steps)
        found, (fl, gl), met, kept = _search_support(p, f, g, support, tol, converged)
        support = jnp.where(met, found, if_any(~met & converged, fallback, support))
        start = (jnp.where(met, fl, f), jnp.where(met, gl, g))
        return support, start, (f, g), jnp.asarray(False), kept, met

    fl, gl, ok = _restricted_ascent(first, (f, g), tol=tol, **_TRIAL)
    f1, g1 = jnp.where(ok, fl, f), jnp.where(ok, gl, g)

    # k = 1 with whole units: the plan is an assignment. The auction gives a feasible
    # support where the first is not, and a dual point of its own (phase 1 can stop
    # short of the optimum at ties: see `_auction_support`)
    def auction(c):
        assigned, done, dual = _auction_support(p, f, g)
        keep = lambda x, y: jnp.where(done, x, y)  # noqa: E731
        return (keep(jnp.where(ok, support, assigned), c[0]), jax.tree.map(keep, dual, c[1]),
                done)

    support, dual, auctioned = if_any(
        _unit_capacities(p)[0], auction, (support, (f, g), jnp.asarray(False))
    )
    return if_any(~(ok | auctioned), fallback, support), (f1, g1), dual, auctioned, ok, ok


# phase 2's trials of a support: Newton steps, and steps without progress before it stops
_TRIAL = dict(max_steps=100, patience=30)
_SEARCH_ROUNDS = 64


def _search_support(p: Problem, f: Array, g: Array, support: Array, tol, search, *,
                    rounds: int = _SEARCH_ROUNDS):
    """A ``k``-sparse support on which some plan meets the marginals: ``support`` (the
    dual's top-``k``) where phase 2's trial on it meets them; else, where ``search``,
    one found from it by single swaps. Returns the support, phase 2's start (the
    restricted optimum; meaningless where none was found), whether one was found and
    whether it was ``support`` itself.

    Where no plan on a support meets the marginals, some set of points on the other
    side needs more mass than the lines that reach them hold (Hall's condition,
    weighted). Phase 2's ascent on that support then ends with those points short of
    mass: they are the points that lack more than 1e-3 of the largest lack at its last
    iterate. Each round moves one line that reaches none of them: its weakest kept entry
    (lowest score at the dual's optimum ``(f, g)``) gives way to its best-scoring starved
    point (`Geometry.topk` with the other points masked: no ``n x m`` matrix), the line
    whose swap loses the least score; then phase 2 is tried on the new support. At ties
    the scores of the swapped entries are nearly equal, so a support found this way
    costs little above the dual's optimum (``duality_gap``). The first trial (round 0,
    no swap) and the rounds share one loop, so phase 2's ascent is compiled once for both.

    Generic weights need such a search: no proper subset of points on both sides has
    equal masses, so a feasible support is connected (at least ``n + m - 1`` entries),
    and the dual's top-``k`` at ties splits into many components. Finding a feasible
    ``k``-sparse support is combinatorial (``k = 1`` with generic weights is bin
    packing): this is a heuristic, which can miss a support that exists, mostly where
    the ``k m`` slots barely cover ``n + m - 1`` (docs/cardinality.md, "Support search",
    for what it finds).
    """
    _, wo = p._lines(p.a, p.b)
    lu, lv = p._lines(f, g)  # the lines' potentials, the other side's

    def swap(c):
        sup, fixed, (fl, gl) = c
        q = dataclasses.replace(p, support=sup)
        _, other = p._lines(*q.marginals(fl, gl))
        lack = wo - other
        starved = lack > 1e-3 * jnp.max(lack)
        touches = jnp.any(starved[sup], axis=1)
        best = p.geom.topk(*p._join(lu, jnp.where(starved, lv, -jnp.inf)), 1, p.axis)
        s_best = p.scores(f, g, best)[:, 0]
        kept = jnp.where(fixed, jnp.inf, p.scores(f, g, sup))  # swapped-in entries stay
        weak = jnp.argmin(kept, axis=1)
        loss = jnp.take_along_axis(kept, weak[:, None], axis=1)[:, 0] - s_best
        loss = jnp.where(touches | ~jnp.isfinite(s_best), jnp.inf, loss)
        j = jnp.argmin(loss)
        possible = jnp.isfinite(loss[j])
        sup = jnp.where(possible, sup.at[j, weak[j]].set(best[j, 0]), sup)
        return sup, fixed.at[j, weak[j]].set(True), possible

    def cond(c):
        it, _, _, _, met, _, possible = c
        return (it == 0) | (~met & possible & search & (it <= rounds))

    def body(c):
        it, sup, fixed, last, _, kept, _ = c
        sup, fixed, possible = jax.lax.cond(
            it > 0, swap, lambda c: (c[0], c[1], jnp.asarray(True)), (sup, fixed, last)
        )
        q = dataclasses.replace(p, support=sup)
        fl, gl, met = _restricted_ascent(q, (f, g), tol=tol, **_TRIAL)
        return it + 1, sup, fixed, (fl, gl), met, jnp.where(it == 0, met, kept), possible

    no = jnp.asarray(False)
    _, found, _, start, met, kept, _ = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), support, jnp.zeros(support.shape, bool), (f, g), no, no,
                     jnp.asarray(True))
    )
    return found, start, met, kept


def _unit_capacities(p: Problem):
    """``(ok, unit, cap)``: whether every line has the same weight ``unit`` and every
    point on the other side a whole number ``cap`` of units (``sum(cap)`` = lines),
    within ``1e-6`` relative: where a ``k = 1`` plan is an assignment of whole lines."""
    wl, wo = p._lines(p.a, p.b)
    unit = jnp.mean(wl)
    cap = jnp.round(wo / unit)
    close = lambda x, y: jnp.all(jnp.abs(x - y) <= 1e-6 * unit)  # noqa: E731
    ok = close(wl, unit) & close(wo, cap * unit) & (jnp.sum(cap) == wl.shape[0]) & (unit > 0)
    return ok, unit, cap.astype(jnp.int32)


_AUCTION_EPS = 1e-9
_AUCTION_PHASES = 7


def _auction_support(p: Problem, f: Array, g: Array, *, candidates: int = 8,
                     max_rounds: int | None = None):
    """A ``k = 1`` support on which the plan meets the marginals, where the weights
    allow one (`_unit_capacities`): each line assigned to one point on the other side,
    point ``o`` receiving exactly ``cap_o`` lines. Returns ``(lines, 1)`` indices and
    whether every line was assigned.

    Bertsekas' auction (Jacobi bidding; the other side's points copied ``cap_o``
    times), its prices started at the dual potentials (``-v``): the dual's optimum is a
    near-optimal set of prices, and at a tie only the few lines that compete for a point
    bid more than once. Each unassigned line bids for the cheapest copy of its best
    point, raising its price by the line's margin over its second-best choice plus
    ``eps``; the highest bid wins and the former holder bids again in the next round.
    Epsilon scaling: ``eps`` starts at ``8^7 * 1e-9 * gamma * unit`` (at the dual's
    optimum a kept entry's score is ``gamma * unit``) and, each time every line holds a
    copy, shrinks 8-fold, the lines then more than ``eps`` below their best choice
    bidding again, down to ``eps_final = 1e-9 * gamma * unit``: the assignment is then
    within ``eps_final`` per line of the best. The bids first run over each line's
    ``candidates`` best points at the start (a ``(lines, candidates)`` problem: a round
    costs microseconds); one pass over the ``n x m`` scores (`otlab.Geometry.max_score`)
    then checks that no line prefers a point outside its candidates by more than
    ``eps``, and where one does the auction goes on over every point (a top-2 pass per
    round; from the start again where the candidates' auction did not complete). At most ``max_rounds`` rounds each (default ``64 *
    lines + 256``): with many exact ties (a constant cost) the rounds can run out, and
    the solver's status then says so.

    Also returns the dual point the final prices give: each point's potential is minus
    its dearest copy's price, each line's such that its best score is ``gamma * unit``.
    """
    ok, unit, cap = _unit_capacities(p)
    u, v = p._lines(f, g)
    n_lines, n_other = u.shape[0], v.shape[0]
    # rounds: the candidates' (a few microseconds each) and the top-2 passes' (one n x m
    # pass each); exact ties cost ~8 rounds per line and eps phase
    max_rounds = 64 * n_lines + 256 if max_rounds is None else max_rounds
    obj = jnp.repeat(jnp.arange(n_other), jnp.maximum(cap, 0), total_repeat_length=n_lines)
    copies = jnp.arange(n_lines)
    lines = jnp.arange(n_lines)
    eps_final = _AUCTION_EPS * p.gamma * unit
    zero = jnp.zeros_like(u)
    inf = jnp.asarray(jnp.inf, u.dtype)

    def cheapest(price):  # each point's cheapest copy, its price and the next one's
        low = jax.ops.segment_min(price, obj, n_other)
        first = jax.ops.segment_min(jnp.where(price == low[obj], copies, n_lines), obj, n_other)
        low2 = jax.ops.segment_min(jnp.where(copies == first[obj], inf, price), obj, n_other)
        return low, first, low2

    def held_value(price, assign):  # each line's value -C - price of the copy it holds
        held = jnp.maximum(assign, 0)
        return held, -p.line_costs(obj[held][:, None])[:, 0] - price[held]

    def auction(top2, c, max_rounds):
        """Rounds until every line holds a copy at the final ``eps``; ``top2(low)``:
        each line's best point, its value ``-C - low`` and the second-best value."""

        def body(c):
            (price, owner, assign, eps), r = c
            low, first, low2 = cheapest(price)
            o1, v1, v2 = top2(low)
            # epsilon scaling: once every line holds a copy, eps shrinks 8-fold and the
            # lines no longer within it of their best choice bid again
            held, value = held_value(price, assign)
            nxt = jnp.all(assign >= 0)
            eps = jnp.where(nxt, jnp.maximum(eps / 8, eps_final), eps)
            out = nxt & (value < v1 - eps)
            owner = owner.at[jnp.where(out, held, n_lines)].set(-1, mode="drop")
            assign = jnp.where(out, -1, assign)
            v2 = jnp.maximum(v2, v1 - low2[o1] + low[o1])  # o1's second copy
            margin = jnp.where(jnp.isfinite(v2), v1 - v2, 0.0)
            bidding = assign < 0
            target = jnp.where(bidding, first[o1], n_lines)  # out of range: dropped
            at = jnp.minimum(target, n_lines - 1)
            amount = price[at] + margin + eps
            top = jax.ops.segment_max(jnp.where(bidding, amount, -inf), target, n_lines)
            win = jax.ops.segment_min(
                jnp.where(bidding & (amount >= top[at]), lines, n_lines), target, n_lines
            )
            won = win < n_lines
            drop = jnp.where(won & (owner >= 0), owner, n_lines)
            assign = assign.at[drop].set(-1, mode="drop")
            assign = assign.at[jnp.where(won, win, n_lines)].set(copies, mode="drop")
            return (jnp.where(won, top, price), jnp.where(won, win, owner), assign, eps), r + 1

        def more(c):
            (_, _, assign, eps), r = c
            return (jnp.any(assign < 0) | (eps > eps_final)) & (r < max_rounds) & ok

        return jax.lax.while_loop(more, body, (c, jnp.asarray(0)))[0]

    def best_two(val, idx):
        o1 = jnp.take_along_axis(idx, jnp.argmax(val, axis=1)[:, None], axis=1)[:, 0]
        v1 = jnp.max(val, axis=1)
        if val.shape[1] == 1:
            return o1, v1, jnp.full_like(v1, -inf)
        return o1, v1, jnp.max(jnp.where(idx == o1[:, None], -inf, val), axis=1)

    # over each line's candidates
    cand = dataclasses.replace(p, k=min(candidates, n_other), support=None).topk(f, g)
    c_cand = p.line_costs(cand)
    # the rounding of the values -C - price: eps stays well above it (float32)
    floor = 16 * jnp.finfo(u.dtype).eps * (jnp.max(jnp.abs(v)) + jnp.max(jnp.abs(c_cand)))
    eps_final = jnp.maximum(eps_final, floor)
    c0 = (-v[obj], jnp.full(n_lines, -1), jnp.full(n_lines, -1),
          jnp.maximum(_AUCTION_EPS * p.gamma * unit * 8.0**_AUCTION_PHASES, eps_final))
    c = auction(lambda low: best_two(-c_cand - low[cand], cand), c0, max_rounds)

    # the certificate: no line prefers a point outside its candidates by more than eps
    price, _, assign, eps = c
    _, value = held_value(price, assign)
    best = p.geom.max_score(*p._join(zero, -cheapest(price)[0]), p.axis)
    fine = jnp.all(assign >= 0) & jnp.all(value >= best - eps)
    two = dataclasses.replace(p, k=min(2, n_other), support=None)

    def top2(low):
        fv = p._join(zero, -low)
        idx = two.topk(*fv)
        return best_two(two.scores(*fv, idx), idx)

    # else the auction over every point (a top-2 pass per round): from where it stands if
    # the candidates' auction completed (a few lines prefer an outside point), else from
    # the start (a candidate set that misses the answer, every line's the same few points
    # at exact ties, leaves those points' prices inflated by a long bidding war)
    if cand.shape[1] < n_other:  # (else the candidates were every point)
        complete = jnp.all(assign >= 0)
        start = jax.tree.map(lambda x, y: jnp.where(complete, x, y), c, c0)
        price, _, assign, _ = if_any(ok & ~fine, lambda _: auction(top2, start, max_rounds), c)
    done = ok & jnp.all(assign >= 0)
    # the dual point the prices give: each point's potential minus its dearest copy's
    # price, each line's such that its best score is ``gamma * unit`` (a kept entry's)
    v_a = -jax.ops.segment_max(price, obj, n_other)
    v_a = jnp.where(jnp.isfinite(v_a), v_a, jnp.min(jnp.where(jnp.isfinite(v_a), v_a, jnp.inf)))
    u_a = p.gamma * unit - p.geom.max_score(*p._join(zero, v_a), p.axis)
    return obj[jnp.maximum(assign, 0)][:, None].astype(jnp.int32), done, p._join(u_a, v_a)


def _entropic_start(p: Problem):
    """Potentials of entropic OT at ``epsilon = gamma / 2`` (`otlab.sinkhorn`, to a
    loose 1e-2 and at most 200 iterations; non-finite entries set to zero): close to
    the dual's optimum, they spare phase 1 most of its continuation from zero."""
    eps = jnp.where(p.gamma > 0, 0.5 * p.gamma, 1.0)
    sol = sinkhorn(p.geom, p.a, p.b, epsilon=eps, tol=1e-2, max_iter=200)
    return tuple(jnp.where(jnp.isfinite(z), z, 0.0) for z in (sol.f, sol.g))


def _dual_and_support(problem: Problem, init, *, start_from, method, formulation, tol, max_iter,
                      memory):
    """Phase 1 and the support of phase 2 (`_phase1`, `_feasible_support`), from
    ``init`` (``start_from="zeros"`` or ``"given"``) or from the entropic start
    (``"entropic"``); from a start other than zeros, once more from zero potentials
    where that run fails: phase 1 does not end ``SUCCESS``, or the dual's own support
    admits no plan that meets the marginals (`_feasible_support`'s first support
    fails) and no auction certified another. At ties the path decides which optimal
    dual point phase 1 ends on, and so whether its support is feasible; where the warm
    run fails, the answer is the cold start's, unless only the warm run's support
    search found a support that admits a plan (until 2026-12-03 the cold run replaced
    it even then, and its own search could fail: the 45 x 60, k = 2 sweep problem with
    generic weights ended ``MAX_ITER``, now ``SUCCESS``).

    Returns ``(f, g, status, n_iter, the top-k support at (f, g), phase 2's support,
    its start, the auction's dual point, whether the auction ran)``; ``n_iter``
    counts the steps of both runs."""

    def attempt(x0):
        f, g, status, it = _phase1(
            problem, x0, method=method, formulation=formulation, tol=tol,
            max_iter=max_iter, memory=memory,
        )
        f, g = problem.gauge(f, g)
        top = problem.topk(f, g)  # one top-k pass serves the dual value and phase 2
        support, begin, dual, auctioned, kept, found = _feasible_support(
            problem, f, g, top, tol, status == Status.SUCCESS
        )
        converged = status == Status.SUCCESS
        out = (f, g, status, it, top, support, begin, dual, auctioned)
        return out, auctioned | (kept & converged), auctioned | (found & converged)

    if start_from == "zeros":
        return attempt(init)[0]
    first = _entropic_start(problem) if start_from == "entropic" else init

    def body(c):
        tries, out, _, good = c
        x0 = jax.tree.map(lambda w, z: jnp.where(tries == 0, w, jnp.zeros_like(z)), first, init)
        new, kept, found = attempt(x0)
        total = new[3] + out[3]  # n_iter: both runs (``out`` is blank before the first)
        # the cold run replaces the warm one unless only the warm one found a support
        stay = (tries == 1) & good & ~found
        new = jax.tree.map(lambda o, w: jnp.where(stay, o, w), out, new)
        return tries + 1, new[:3] + (total,) + new[4:], kept, good | found

    # (a given start of zeros is the cold start: no second run)
    warm = jnp.any(first[0] != 0) | jnp.any(first[1] != 0)
    blank = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: attempt(init))[0])
    no = jnp.asarray(False)
    _, out, _, _ = jax.lax.while_loop(
        lambda c: (c[0] == 0) | ((c[0] == 1) & ~c[2] & warm), body,
        (jnp.asarray(0), blank, no, no),
    )
    return out


def _float32_tol(n: int, m: int) -> float:
    """The default ``tol`` in float32: ``max(1e-4, 1.25e-6 (n + m))``.

    The plan is read from potentials of the size of the costs, which float32 holds
    to ``ulp(max C)``: each entry only to about ``ulp(max C) / gamma``, so the L1 error
    of the ``n + m`` marginals has a floor that grows with ``n + m``. Rounding the
    float64 optimum's potentials to float32 leaves 4.3e-5 at ``n = m = 100`` and
    1.8e-4 at ``400`` (benchmark problems, ``k = 2``, default ``gamma``). Below the
    floor no support passes phase 2's test, and the plan fell back to the dual's own,
    off by ~1e-2: at ``n = 400`` with ``tol = 1e-4``, 0/8 ``SUCCESS`` (errors 2.1e-2
    median); with ``3e-4`` 5/8, with ``1e-3`` 8/8 (errors 6e-4 median)."""
    return max(1e-4, 1.25e-6 * (n + m))


@functools.partial(
    jax.jit,
    static_argnames=(
        "k", "axis", "method", "formulation", "tol", "max_iter", "memory", "implicit_diff",
        "start_from",
    ),
)
def _solve(
    geom, a, b, gamma, init, *, k, axis, method, formulation, tol, max_iter, memory,
    implicit_diff, start_from,
):
    if gamma is None:
        gamma = 0.1 * jax.lax.stop_gradient(geom.mean_cost())
    dtype = geom.dtype
    if tol is None:
        tol = 1e-10 if dtype == jnp.float64 else _float32_tol(*geom.shape)
    problem = Problem(geom, a, b, jnp.asarray(gamma, dtype), k, axis)
    # Phase 1, the dual's maximiser (no derivative of its own: the optimal value is
    # differentiated by the envelope theorem, the plan through phase 2), and the
    # support of phase 2. Under `jax.vmap` on CPU they run one problem at a time
    # (`one_at_a_time_on_cpu`: each problem stops at its own step count and takes only
    # its own rare branches; 64 problems at n = 100, k = 5: 906 -> 365 ms, and with
    # L-BFGS 37 -> 2.6 s, now faster than a Python loop of solves).
    f1, g1, opt_status, n_iter, top, support, start, (fa, ga), auctioned = (
        one_at_a_time_on_cpu(functools.partial(
            _dual_and_support, start_from=start_from, method=method,
            formulation=formulation, tol=tol, max_iter=max_iter, memory=memory,
        ))(problem, init)
    )
    dual_value = problem.dual(f1, g1, top)  # envelope: d/dC = -plan, d/da = f
    if k == 1:  # the auction's prices give a dual point of their own: the better bound
        alt = problem.dual(fa, ga)
        better = auctioned & (alt > dual_value)
        dual_value = jnp.where(better, alt, dual_value)
    restricted = dataclasses.replace(problem, support=support)
    f, g, _ = implicit.solve(
        functools.partial(_refine, tol=tol, max_steps=50), restricted, start, implicit_diff
    )
    idx, vals = restricted.sparse_plan(f, g)
    row, col = restricted._sums(idx, vals)
    err = jnp.sum(jnp.abs(row - a)) + jnp.sum(jnp.abs(col - b))
    met = err <= tol * jnp.sum(a)
    status = jnp.where(
        (opt_status == Status.SUCCESS) & met, Status.SUCCESS, Status.MAX_ITER
    )
    if k == 1:
        # where the auction ran, its dual point certifies the plan: the status is that
        # of the duality gap (weak duality: no feasible plan costs less than the dual)
        reg = restricted.primal(idx, vals)
        gap_ok = reg - dual_value <= tol * (jnp.abs(dual_value) + jnp.abs(reg))
        status = jnp.where(
            auctioned, jnp.where(met & gap_ok, Status.SUCCESS, Status.MAX_ITER), status
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
    init: tuple[Array, Array] | str | None = None,
    implicit_diff: implicit.ImplicitDiff = implicit.DEFAULT,
) -> CardinalitySolution:
    """Solve sparsity-constrained OT: at most ``k`` nonzeros per column (or row).

    Args:
        geom: a geometry (dense or online), an ott-jax geometry or a cost matrix.
        a: ``(n,)`` source weights (traced); default uniform.
        b: ``(m,)`` target weights (traced); default uniform. ``sum a = sum b``.
        k: static. At most ``k`` nonzeros per column (``axis=0``: ``1 <= k <= n``)
            or per row (``axis=1``: ``1 <= k <= m``). ``k = n`` (``m``) is
            quadratically regularised OT. ``k = 1`` with equal line weights and a
            whole number of them on each point of the other side (uniform square
            weights; capacity-limited routing) is an assignment problem: the plan is
            the optimal assignment, found by an auction from the dual's prices, and
            ``SUCCESS`` means its duality gap is within ``tol`` (relative).
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
            (``1e-10`` in float64). Default ``1e-10`` in float64; in float32
            ``max(1e-4, 1.25e-6 (n + m))``: the plan, read from potentials of the
            size of the costs, meets the marginals only to a rounding floor that
            grows with ``n + m`` (1.8e-4 at ``n = m = 400`` on Gaussian clouds); a
            ``tol`` below it leaves every support rejected and the plan off by ~1e-2.
            Use float64 for tight plans (docs/cardinality.md).
        max_iter: static cap on L-BFGS iterations (default 1000) or, with Newton,
            on each of its two runs at the final ``gamma`` (``4k + 1`` entries per
            line, then ``k``, a run skipped where ``k = 1`` is an assignment;
            default 100; the larger ``gamma`` stages run at most 60 steps each).
        memory: static L-BFGS memory size.
        init: static ``"entropic"``, ``"zeros"``, or initial potentials ``(f0, g0)``
            (no gradient flows through them). ``"entropic"`` (the default with
            ``method="newton"``) starts from the potentials of entropic OT at
            ``epsilon = gamma / 2`` (`otlab.sinkhorn` to 1e-2, at most 200
            iterations); ``"zeros"`` (the default with ``"lbfgs"``) from zero. From
            any start but zeros, where that run fails (typically: the dual's optimum
            lies on ties and its support admits no plan that meets the marginals; the
            path through the ties decides the support), the solve runs once more from
            zero and returns that run's answer, unless only the first run's support
            search found a support that admits a plan; ``n_iter`` counts both runs.
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
    if init is None:
        init = "entropic" if method == "newton" else "zeros"
    if isinstance(init, str):
        _checks.choice(init, "init", ("zeros", "entropic"))
        start_from, init = init, None
    else:
        start_from = "given"
    init = _checks.potentials(init, geom, a, b, None)
    return _solve(
        geom, a, b, gamma, init, k=k, axis=axis, method=method, formulation=formulation,
        tol=None if tol is None else float(tol), max_iter=int(max_iter), memory=int(memory),
        implicit_diff=implicit_diff, start_from=start_from,
    )
