"""Sinkhorn–Newton–Sparse (Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil,
Xiao & Ying, "Accelerating Sinkhorn algorithm with sparse Newton iterations",
ICLR 2024), made safe in the manner of SSNS (Tang & Qiu, 2024).

The entropic dual ``D(f, g)`` (`otlab._dual`) is concave; its gradient is the
marginal violation ``G = (a - P 1, b - P^T 1)`` (balanced case) and its Hessian is
``-H`` with

$$ H = \\frac{1}{\\varepsilon}\\begin{pmatrix} \\mathrm{diag}(P1) & P \\\\ P^T & \\mathrm{diag}(P^T 1)\\end{pmatrix} + \\mathrm{diag}(\\kappa_a\\,\\tilde a, \\kappa_b\\,\\tilde b). $$

Stage 1 runs Sinkhorn iterations until their measured linear rate predicts that
``tol`` is out of reach within ``warmup`` iterations (or ``tol`` is met). Stage 2
takes regularised Newton steps ``z <- z + t d`` with

$$ (\\tilde H + \\mu I)\\, d = G, \\qquad \\mu = \\nu\\,\\frac{|G|_1}{\\sum a}\\,\\bar h, $$

where ``H~`` keeps the exact diagonal and a sparse sketch of ``P``: for each row,
the largest entry in each of ``k`` strided column bins (static shapes, one pass of
comparisons, no sort; see `otlab.Geometry.row_sparsify`), ``h`` is the mean
diagonal of ``H~``, and ``d`` comes from Jacobi-preconditioned conjugate gradient
on the Schur complement of one block (`_schur_cg`) with matrix-free products over the
kept entries (a gather and a segment sum).

Globalisation. A backtracking (Armijo) line search on the dual picks ``t`` among
``1, 1/2, ..., 2^-9``: a step never decreases ``D`` (once the change in ``D`` is
below its rounding error, near marginal error 1e-9 in float64, it must decrease
``|G|_1`` instead); with no acceptable ``t`` the iterate is kept and a block of
Sinkhorn iterations runs instead. ``nu`` shrinks after full steps that the model
predicts well (towards a pure Newton step, quadratic convergence) and grows
otherwise (SSNS, Tang & Qiu 2024). Far from the solution at small epsilon Newton's
model is poor (the dual is exponential in ``f / eps``), so the solver continues in
epsilon: while no stage has converged, a step that is not a full step with fair
progress moves the stage to ``4 epsilon`` (up to ``0.1`` times the mean cost); a stage
that reaches an L1 error of ``0.1 sum(a)`` hands its potentials to the stage at
``epsilon / 4``, after Sinkhorn iterations at the new epsilon (stopped, as in stage 1,
by their measured rate). Convergence is declared at the target epsilon on the
gauge-fixed potentials re-evaluated in the log domain.

Adaptive budget: ``budgets`` is a static ladder of kept entries per row. The
solver starts on the first rung and climbs one rung when a full step with a shift no
larger than the start's (``nu <= 1``) reduces ``|G|`` by less than 4x — the sign that
the sparse Hessian is too crude for Newton's fast convergence. Dense geometries end
the ladder with the exact Hessian, solved first by conjugate gradient and, once that
costs more than a factorisation (at small epsilon the Hessian is badly conditioned and CG
stalls), by a Cholesky factorisation of its Schur complement. Each rung is compiled
once; ``lax.switch`` runs only the current one (under ``vmap`` all rungs run, as for
any batched switch).

Dense geometries keep the plan materialised at an anchor ``(f0, g0)``; the plan at
nearby ``(f, g)`` is ``diag(u) P0 diag(v)`` with ``u = exp((f - f0) / eps)``, so a
line-search trial costs two matrix-vector products instead of a pass of exponentials,
and the Hessian's plan a scaling pass. Blocks of Sinkhorn iterations start their
kernel from the plan at the current potentials and their final kernel becomes the
anchor; it is also renewed once a potential has moved by more than ``ANCHOR_DRIFT``
epsilon.

Gradients come from `otlab.implicit`, like every otlab solver.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from otlab import _checks, _dual, implicit, solution
from otlab._checks import Init
from otlab.geometry import GeometryLike, PlanOperator
from otlab.solution import OTSolution, Status
from otlab.solvers import sinkhorn as sinkhorn_lib  # the module

__all__ = ["sns"]

Array = jax.Array


class _State(NamedTuple):
    f: Array
    g: Array
    row: Array  # P 1 at (f, g)
    col: Array  # P^T 1
    obj: Array  # D(f, g)
    err: Array  # |G|_1
    nu: Array  # regularisation weight
    level: Array  # rung of the budget ladder
    it: Array
    errors: Array
    status: Array
    done: Array
    stage: Array  # continuation stage: epsilon * STAGE_FACTOR**stage
    settled: Array  # a stage has converged: no more retreats
    anchor: tuple | None  # dense geometries: (f0, g0, P0), the plan at (f0, g0) (see `_fresh`)
    calm: Array  # consecutive steps at stage 0


def _anchored(problem: _dual.Problem, geom, anchor) -> PlanOperator:
    fa, ga, p = anchor
    return PlanOperator(geom, fa, ga, problem.epsilon, p)


def _evaluate(problem: _dual.Problem, geom, f, g, anchor=None):
    """``(P 1, P^T 1, D, G)`` at ``(f, g)``: with an ``anchor`` (a materialised plan at
    nearby potentials, `_fresh`) by its diagonal scalings (two matrix-vector
    products), else by one pass of exponentials."""
    if anchor is None:
        row, col = geom.marginals(f, g, problem.epsilon)
    else:
        row, col = _anchored(problem, geom, anchor).marginals_at(f, g)
    obj = _dual.dual_objective(
        f, g, problem.a, problem.b, problem.epsilon, problem.tau_a, problem.tau_b, jnp.sum(row)
    )
    ga, gb = problem.residual(f, g, row, col)
    return row, col, obj, ga, gb


def _fresh(problem: _dual.Problem, geom, f, g):
    """`_evaluate` at ``(f, g)`` that also returns the anchor of later evaluations:
    for dense geometries the plan materialised at ``(f, g)`` (one pass of
    exponentials, as `_evaluate` costs), for online geometries ``None``."""
    if geom.is_online:
        return None, *_evaluate(problem, geom, f, g)
    op = geom.plan_operator(f, g, problem.epsilon)
    anchor = (f, g, op.matrix)
    return anchor, *_evaluate(problem, geom, f, g, anchor)


def _log_domain_error(problem: _dual.Problem, geom, f, g):
    """The L1 residual with the marginals re-evaluated by max-shifted log-sum-exp
    (two passes): what `OTSolution.marginals` reports. `_evaluate`'s single pass of
    unshifted exponentials is faster but rounds differently (in float32 by up to
    a few percent of ``tol``); convergence is declared on this one."""
    eps = problem.epsilon
    row = jnp.exp(geom.lse(f, g, eps, 1))
    col = jnp.exp(geom.lse(f, g, eps, 0))
    ga, gb = problem.residual(f, g, row, col)
    return jnp.sum(jnp.abs(ga)) + jnp.sum(jnp.abs(gb))


def _pcg(matvec, rhs: Array, diag: Array, stop: Array, max_iter):
    """Jacobi-preconditioned conjugate gradient; returns ``(x, iterations)``.

    Stops when ``|r|^2 <= stop`` (Euclidean norm of the residual).
    """
    x = jnp.zeros_like(rhs)
    z = rhs / diag
    init = (x, rhs, z, z, jnp.sum(rhs * z), jnp.asarray(0))

    def cond(c):
        _, r, _, _, _, k = c
        return (jnp.sum(r * r) > stop) & (k < max_iter)

    def body(c):
        x, r, z, p, rz, k = c
        ap = matvec(p)
        alpha = rz / jnp.sum(p * ap)
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = jnp.sum(r * z)
        p = z + (rz_new / rz) * p
        return x, r, z, p, rz_new, k + 1

    x, *_, k = jax.lax.while_loop(cond, body, init)
    return x, k


def _schur_cg(mv, rmv, dx: Array, dy: Array, gx: Array, gy: Array, tol, max_iter):
    """Solve ``[[diag(dx), K], [K^T, diag(dy)]] (x, y) = (gx, gy)`` by conjugate
    gradient on the Schur complement of one block; returns ``((x, y), iterations)``.

    ``mv(y) = K y``, ``rmv(x) = K^T x``. With ``x = (gx - K y) / dx`` the first block
    of the residual is zero and the second is that of
    ``(diag(dy) - K^T diag(1/dx) K) y = gy - K^T (gx / dx)``, solved by
    Jacobi-preconditioned CG (preconditioner ``dy``) to ``|r| <= tol |(gx, gy)|``:
    the stopping rule of CG on the whole system. The system is 2-cyclic, so CG on the
    whole of it (Jacobi-preconditioned, from zero) makes progress only every other
    iteration (its even iterates are those of CG on the Schur complement); each
    iteration here costs the same two products (``K`` and ``K^T``), and half as many
    are needed. Iterates on the smaller block.
    """
    if gx.shape[0] < gy.shape[0]:  # static: iterate on the smaller block (x)
        (y, x), k = _schur_cg(rmv, mv, dy, dx, gy, gx, tol, max_iter)
        return (x, y), k
    stop = tol**2 * (jnp.sum(gx * gx) + jnp.sum(gy * gy))
    rhs = gy - rmv(gx / dx)
    y, k = _pcg(lambda y: dy * y - rmv(mv(y) / dx), rhs, dy, stop, max_iter)
    return ((gx - mv(y)) / dx, y), k


def _schur_solve(k: Array, dx: Array, dy: Array, gx: Array, gy: Array, gauge: Array):
    """Solve ``[[diag(dx), K], [K^T, diag(dy)]] (x, y) = (gx, gy)`` directly.

    Eliminates the larger block and factorises the Schur complement of the smaller
    one, ``diag(dy) - K^T diag(1/dx) K`` (one GEMM and one Cholesky,
    ``O(n m min(n, m))``). ``gauge`` (``> 0`` for balanced problems) adds
    ``gauge / m * 1 1^T`` to it: the Schur complement of the balanced dual Hessian
    is singular along ``1`` (the ``(1, -1)`` direction of the full system) and the
    right-hand side is orthogonal to it, so the term fixes the gauge without
    changing the step.
    """
    if k.shape[0] < k.shape[1]:
        y, x = _schur_solve(k.T, dy, dx, gy, gx, gauge)
        return x, y
    q = k * jax.lax.rsqrt(dx)[:, None]
    s = jnp.diag(dy) - q.T @ q + gauge / k.shape[1]
    rhs = gy - (gx / dx) @ k
    chol = jnp.linalg.cholesky(s)
    y = jax.scipy.linalg.cho_solve((chol, True), rhs)
    x = (gx - k @ y) / dx
    return x, y


def _newton_direction(problem: _dual.Problem, geom, s: _State, ga, gb, *, rung, cg_max_iter):
    """Solve ``(H~ + mu I) d = G``; ``rung`` is ``("sparse", bins)`` (a ``bins``-per-row
    sketch of ``P``, conjugate gradient), ``("exact", None)`` (the materialised plan,
    conjugate gradient) or ``("direct", None)`` (the materialised plan, Cholesky)."""
    eps = problem.epsilon
    m = geom.shape[1]
    kind, bins = rung
    # Dense geometries: the plan at (f, g) from the anchor's, by diagonal scalings.
    op = None if s.anchor is None else _anchored(problem, geom, s.anchor).moved(s.f, s.g)
    if kind == "sparse":
        if op is None:
            logv, idx = geom.row_sparsify(s.f, s.g, eps, bins)
        else:
            logv, idx = op.row_sparsify(bins)
        vals = jnp.exp(logv) / eps
        mv = lambda y: jnp.sum(vals * y[idx], axis=1)  # noqa: E731
        rmv = lambda x: jax.ops.segment_sum(  # noqa: E731
            (vals * x[:, None]).ravel(), idx.ravel(), num_segments=m
        )
    else:  # the full Hessian: products with the materialised plan
        op = geom.plan_operator(s.f, s.g, eps) if op is None else op
        mv = lambda y: op.matvec(y) / eps  # noqa: E731
        rmv = lambda x: op.rmatvec(x) / eps  # noqa: E731

    da, db = problem.hessian_diagonal(s.f, s.g, s.row, s.col)
    hbar = 0.5 * (jnp.mean(da) + jnp.mean(db))
    mu = s.nu * s.err / jnp.sum(problem.a) * hbar

    def hess(z):
        return da * z[0] + mv(z[1]), db * z[1] + rmv(z[0])

    if kind == "direct":
        gauge = _dual.is_balanced(problem.tau_a, problem.tau_b) * hbar
        d = _schur_solve(op.matrix / eps, da + mu, db + mu, ga, gb, gauge)
        cg_iters = jnp.asarray(0)
    else:
        # Inexact Newton: forcing term min(0.1, sqrt(relative residual)).
        rel = s.err / jnp.sum(problem.a)
        cg_tol = jnp.minimum(0.1, jnp.sqrt(rel))
        d, cg_iters = _schur_cg(mv, rmv, da + mu, db + mu, ga, gb, cg_tol, cg_max_iter)
    hd = hess(d)
    gd = jnp.sum(ga * d[0]) + jnp.sum(gb * d[1])
    pred = gd - 0.5 * (jnp.sum(d[0] * hd[0]) + jnp.sum(d[1] * hd[1]))
    return d, pred, gd, cg_iters


def _ladder(geom, budgets, dense_rung, direct_max):
    """The static rungs: sparse sketches, then the exact Hessian by CG, then by
    Cholesky (dense geometries whose smaller side is at most ``direct_max``)."""
    n, m = geom.shape
    if geom.is_online:
        return tuple(("sparse", min(k, m)) for k in budgets)
    # A gather/segment-sum product over more than m/12 entries per row costs more
    # than a dense matrix-vector product (measured on CPU, float64: at k = m/9 twice
    # as much, at k = m/16 1.6x less): such rungs give way to the exact one.
    rungs = tuple(("sparse", k) for k in budgets if SPARSE_RATIO * k <= m)
    if dense_rung or not rungs:
        rungs += (("exact", None),)
        if min(n, m) <= direct_max:
            rungs += (("direct", None),)
    return rungs


#: Dense geometries keep a sparse rung of ``k`` entries per row only when
#: ``SPARSE_RATIO * k <= m`` (see `_ladder`).
SPARSE_RATIO = 12
#: epsilon-continuation: stage ``k`` solves at ``epsilon * STAGE_FACTOR**k``.
STAGE_FACTOR = 4.0
#: the highest stage epsilon, relative to the mean cost.
STAGE_MAX_REL = 0.1
#: an intermediate stage ends at an L1 error of ``STAGE_TOL_REL * sum(a)``.
STAGE_TOL_REL = 0.1
#: step-length halvings of the backtracking line search.
LINE_SEARCH_HALVINGS = 10
#: Sinkhorn iterations run when a Newton step finds no acceptable step length.
FALLBACK_ITERS = 20
#: Dense geometries: the anchored plan is re-materialised once a potential has moved
#: by more than this many epsilon from the anchor (float64, float32): scalings stay
#: below e^30 (e^10), so entries that underflowed at the anchor stay negligible.
ANCHOR_DRIFT = {"float64": 30.0, "float32": 10.0}
#: Stagnation: stop (MAX_ITER) when STALL_WINDOW steps at the target epsilon end above
#: STALL_FACTOR times the error before them (less than 10 % progress in 30 steps).
STALL_WINDOW = 30
STALL_FACTOR = 0.9


class _Trial(NamedTuple):
    k: Array  # halvings tried
    ok: Array  # accepted
    f: Array
    g: Array
    row: Array
    col: Array
    obj: Array
    err: Array


def _line_search(problem, geom, s: _State, d, gd, resolvable):
    """Backtracking (Armijo) line search on the dual along ``d``: the first of
    ``t = 1, 1/2, 1/4, ...`` with ``D(z + t d) >= D(z) + 1e-4 t G.d`` (or, once the
    change of ``D`` is below rounding, a smaller ``|G|_1``). Returns the accepted
    trial, or ``ok = False`` with the iterate unchanged."""

    def cond(c: _Trial):
        return ~c.ok & (c.k < LINE_SEARCH_HALVINGS)

    def body(c: _Trial):
        t = 0.5 ** c.k.astype(s.obj.dtype)
        f, g = s.f + t * d[0], s.g + t * d[1]
        row, col, obj, na, nb = _evaluate(problem, geom, f, g, s.anchor)
        err = jnp.sum(jnp.abs(na)) + jnp.sum(jnp.abs(nb))
        finite = jnp.isfinite(obj) & jnp.isfinite(err)
        armijo = obj - s.obj >= 1e-4 * t * gd
        ok = finite & (gd > 0) & jnp.where(resolvable, armijo, err < s.err)
        return _Trial(c.k + 1, ok, f, g, row, col, obj, err)

    c = jax.lax.while_loop(
        cond, body, _Trial(jnp.asarray(0), jnp.asarray(False), s.f, s.g, s.row, s.col, s.obj, s.err)
    )
    keep = lambda new, old: jnp.where(c.ok, new, old)  # noqa: E731
    t = jnp.where(c.ok, 0.5 ** (c.k - 1).astype(s.obj.dtype), 0.0)
    return c._replace(
        f=keep(c.f, s.f), g=keep(c.g, s.g), row=keep(c.row, s.row), col=keep(c.col, s.col),
        obj=keep(c.obj, s.obj), err=keep(c.err, s.err),
    ), t


def _sinkhorn_iters(problem, geom, f, g, iters: int, tol: float, stall: bool, plan=None):
    """Up to ``iters`` Sinkhorn iterations at ``problem.epsilon`` (kernel engine for
    dense, log domain for online geometries): stops at ``tol`` and, with ``stall``,
    once a block of 10 iterations reduces the error by less than that factor.
    ``plan``: dense geometries, ``(op, P 1, P^T 1)`` at ``(f, g)``, the kernel's start
    (see `otlab.solvers.sinkhorn._forward`); then also returns the kernel's final plan,
    an anchor for `_evaluate` (else ``None``)."""
    if iters == 1:
        eps = problem.epsilon
        f = sinkhorn_lib._half_step(problem.a, f, geom.lse(f, g, eps, 1), eps, problem.tau_a)
        g = sinkhorn_lib._half_step(problem.b, g, geom.lse(f, g, eps, 0), eps, problem.tau_b)
        return f, g, None
    f, g, _, *kernel = sinkhorn_lib._forward(
        problem, (f, g, None), mode="log" if geom.is_online else "kernel", tol=tol,
        max_iter=iters, check_every=min(iters, 10), epsilon_decay=0.9, unroll=False,
        stall=stall, plan=plan,
    )  # fmt: skip
    return f, g, (kernel[0] if kernel else None)


def _forward(
    problem: _dual.Problem, init, *, tol, max_iter, warmup, budgets, dense_rung, direct_max,
    cg_max_iter, translate=False,
):
    geom = problem.geom.materialize()
    dtype = problem.a.dtype
    eps = problem.epsilon
    f0, g0 = init
    if warmup > 0:
        f0, g0, _ = sinkhorn_lib._forward(
            problem,
            (f0, g0, None),
            mode="log" if geom.is_online else "kernel",
            tol=tol,
            max_iter=warmup,
            check_every=min(warmup, 10),
            epsilon_decay=0.9,
            unroll=False,
            translate=translate,
            stall=True,
        )
    rungs = _ladder(geom, budgets, dense_rung, direct_max)
    kinds = [kind for kind, _ in rungs]
    # Climbing by slowness stops below the Cholesky rung; that rung is reached when
    # conjugate gradient on the exact Hessian costs more than a factorisation (about
    # min(n, m) / 10 products, measured on CPU).
    top_cg = kinds.index("exact") if "exact" in kinds else len(rungs) - 1
    direct = kinds.index("direct") if "direct" in kinds else -1
    breakeven = max(20, min(geom.shape) // 10)
    rounding = 100.0 * jnp.finfo(dtype).eps
    # The highest continuation stage: epsilon * 4**top <= max(epsilon, 0.1 * mean cost).
    ratio_max = STAGE_MAX_REL * jax.lax.stop_gradient(geom.mean_cost()) / eps
    top_stage = jnp.floor(jnp.log(jnp.maximum(ratio_max, 1.0)) / jnp.log(STAGE_FACTOR))
    top_stage = jnp.where(jnp.isfinite(top_stage), top_stage, 0.0).astype(jnp.int32)
    stage_tol = jnp.maximum(tol, STAGE_TOL_REL * jnp.sum(problem.a))
    stop = solution.stop_tol(tol)  # convergence at stage 0 (see `otlab.solution.STOP_FRACTION`)

    def at(stage):
        e = eps * STAGE_FACTOR ** stage.astype(dtype)
        return dataclasses.replace(problem, epsilon=e)

    def verify(f, g):
        """Convergence is declared on the potentials returned: put them in the gauge
        `otlab.implicit` returns (in float32 the shift alone moves the error by a few
        percent of ``tol``) and re-evaluate the error in the log domain."""
        shift = lambda f, g: _dual.gauge_shift(  # noqa: E731
            f, g, problem.a, problem.b, problem.tau_a, problem.tau_b
        )
        f, g = shift(f, g)
        # `otlab.implicit` shifts again, by a rounding error: check what it returns.
        return _log_domain_error(problem, geom, *shift(f, g)) <= stop, f, g

    def body(s: _State) -> _State:
        pk = at(s.stage)
        ga, gb = pk.residual(s.f, s.g, s.row, s.col)
        branches = [
            functools.partial(_newton_direction, rung=r, cg_max_iter=cg_max_iter) for r in rungs
        ]
        d, pred, gd, cgi = jax.lax.switch(s.level, branches, pk, geom, s, ga, gb)
        resolvable = jnp.abs(pred) > rounding * (jnp.abs(s.obj) + 1.0)
        c, t = _line_search(pk, geom, s, d, gd, resolvable)
        accept = c.ok
        # The model's prediction at step t: t G.d - t^2 d^T H d / 2.
        pred_t = t * gd - t**2 * (gd - pred)
        ratio = (c.obj - s.obj) / jnp.where(pred_t > 0, pred_t, 1.0)
        full = accept & (t == 1.0)
        good = full & (~resolvable | (ratio >= 0.75))
        nu = jnp.where(good, s.nu / 4, jnp.where(full & (ratio >= 0.25), s.nu, 4 * s.nu))
        nu = jnp.clip(nu, 1e-8, 1e8)
        # Slow progress of a full step that is not heavily damped (a reduction of |G| by
        # less than 4x at nu <= 1) means the sketch is too crude: climb one rung.
        slow = full & (c.err > 0.25 * s.err) & (s.nu <= 1.0)
        level = jnp.where(slow & (s.level < top_cg), s.level + 1, s.level)
        if direct >= 0:
            expensive = (s.level == top_cg) & (cgi > breakeven)
            level = jnp.where(expensive, direct, level)
        # Continuation. Before any stage has converged, a step that is not a full
        # Newton step with fair progress means Newton's fast region is out of reach at
        # this epsilon: retreat to 4x epsilon. A stage that reaches its tolerance hands
        # its potentials to the next, 4x smaller, epsilon. A step with no acceptable
        # length falls back to a block of Sinkhorn iterations.
        poor = ~full | (ratio < 0.25) | (c.err > 0.5 * s.err)
        retreat = poor & ~s.settled & (s.stage < top_stage)
        descend = (c.err <= stage_tol) & (s.stage > 0)
        stage = jnp.where(descend, s.stage - 1, jnp.where(retreat, s.stage + 1, s.stage))
        settled = s.settled | descend
        fallback = ~accept & ~retreat
        branch = jnp.where(stage != s.stage, 1, jnp.where(fallback, 2, 0))
        pn = at(stage)

        def keep(f, g):
            return c.f, c.g, c.row, c.col, c.obj, c.err, s.anchor

        def sinkhorn_then_evaluate(iters, stall):
            def run(f, g):
                plan = None
                if s.anchor is not None:  # static: dense geometries
                    # The kernel starts from a plan at (f, g): at the same epsilon the
                    # anchored one by its scalings (no exponentials), at a new epsilon
                    # one pass of exponentials (not the three of a safe absorption).
                    op = jax.lax.cond(
                        stage == s.stage,
                        lambda: _anchored(pn, geom, s.anchor).moved(f, g),
                        lambda: geom.plan_operator(f, g, pn.epsilon),
                    )
                    ones_n, ones_m = jnp.ones_like(f), jnp.ones_like(g)
                    plan = (op, op.matvec(ones_m), op.rmatvec(ones_n))
                f, g, anchor = _sinkhorn_iters(pn, geom, f, g, iters, tol, stall, plan)
                if anchor is None:  # static
                    anchor, row, col, obj, na, nb = _fresh(pn, geom, f, g)
                else:  # the kernel's plan: the marginals by its scalings
                    row, col, obj, na, nb = _evaluate(pn, geom, f, g, anchor)
                return f, g, row, col, obj, jnp.sum(jnp.abs(na)) + jnp.sum(jnp.abs(nb)), anchor

            return run

        f, g, row, col, obj, err, anchor = jax.lax.switch(
            branch,
            [
                keep,
                sinkhorn_then_evaluate(max(warmup, 1), True),
                sinkhorn_then_evaluate(FALLBACK_ITERS, False),
            ],
            c.f, c.g,
        )
        finite = jnp.isfinite(err) & jnp.isfinite(obj)
        # Never worse than the start of the step: a Sinkhorn block that fails keeps it.
        bad = ~finite & (branch > 0)
        f, g, row, col, obj, err, anchor = jax.tree.map(
            lambda new, old: jnp.where(bad, old, new),
            (f, g, row, col, obj, err, anchor), (c.f, c.g, c.row, c.col, c.obj, c.err, s.anchor),
        )  # fmt: skip
        stage = jnp.where(bad, s.stage, stage)
        if anchor is not None:  # static: dense geometries
            # Potentials that moved far from the anchor (the scalings exp(df / eps) leave
            # the range where the anchored plan is accurate): a fresh anchor.
            fa, ga, _ = anchor
            drift = jnp.maximum(jnp.max(jnp.abs(f - fa)), jnp.max(jnp.abs(g - ga)))
            far = ~(drift < ANCHOR_DRIFT.get(jnp.dtype(dtype).name, 10.0) * at(stage).epsilon)

            def refresh(f, g, row, col, obj, err, anchor):
                anchor, row, col, obj, na, nb = _fresh(at(stage), geom, f, g)
                return f, g, row, col, obj, jnp.sum(jnp.abs(na)) + jnp.sum(jnp.abs(nb)), anchor

            f, g, row, col, obj, err, anchor = jax.lax.cond(
                far, refresh, lambda *x: x, f, g, row, col, obj, err, anchor
            )
        converged, f, g = jax.lax.cond(
            (err <= stop) & (stage == 0), verify, lambda f, g: (jnp.asarray(False), f, g), f, g
        )
        status = jnp.where(converged, Status.SUCCESS, s.status)
        # Stagnation at the target epsilon (the rounding floor of float32, below a `tol`
        # it cannot reach): STALL_WINDOW steps at stage 0 have not brought the error
        # below STALL_FACTOR times the error before them. Stop with MAX_ITER.
        errors = s.errors.at[s.it].set(err)
        calm = jnp.where((stage == 0) & (s.stage == 0), s.calm + 1, 0)
        stalled = jnp.asarray(False)
        if max_iter > STALL_WINDOW:  # static
            start = jnp.maximum(s.it + 1 - STALL_WINDOW, 0)
            window = jax.lax.dynamic_slice(errors, (start,), (STALL_WINDOW,))
            before = errors[jnp.maximum(s.it - STALL_WINDOW, 0)]
            stalled = (calm > STALL_WINDOW) & ~(jnp.min(window) <= STALL_FACTOR * before)
        return _State(
            f, g, row, col, obj, err, nu, level, s.it + 1, errors,
            status.astype(jnp.int32), converged | stalled, stage, settled, anchor, calm,
        )  # fmt: skip

    anchor, row, col, obj, ga, gb = _fresh(problem, geom, f0, g0)
    err = jnp.sum(jnp.abs(ga)) + jnp.sum(jnp.abs(gb))
    finite = jnp.isfinite(err) & jnp.isfinite(obj)
    done, f0, g0 = jax.lax.cond(err <= stop, verify, lambda f, g: (jnp.asarray(False), f, g), f0, g0)
    s = _State(
        f0,
        g0,
        row,
        col,
        obj,
        err,
        jnp.asarray(1.0, dtype),
        jnp.asarray(0),
        jnp.asarray(0),
        jnp.full((max_iter,), -1.0, dtype),
        jnp.where(
            finite, jnp.where(done, Status.SUCCESS, Status.MAX_ITER), Status.NONFINITE
        ).astype(jnp.int32),
        done | ~finite,
        jnp.asarray(0, jnp.int32),
        jnp.asarray(False),
        anchor,
        jnp.asarray(0),
    )
    s = jax.lax.while_loop(lambda s: (~s.done) & (s.it < max_iter), body, s)
    return s.f, s.g, (s.status, s.it, s.err, s.errors)


@functools.partial(
    jax.jit,
    static_argnames=(
        "init_fn", "tol", "max_iter", "warmup", "budgets", "dense_rung", "direct_max",
        "cg_max_iter",
        "implicit_diff",
    ),
)
def _sns(
    geom, a, b, epsilon, tau_a, tau_b, init_pair, *, init_fn, tol, max_iter, warmup, budgets,
    dense_rung, direct_max, cg_max_iter, implicit_diff,
):
    translate = init_fn is not None or init_pair is not None
    epsilon, init_pair = sinkhorn_lib._traced_defaults(geom, a, b, epsilon, init_fn, init_pair)
    if tol is None:
        tol = 1e-9 if geom.dtype == jnp.float64 else 1e-4
    problem = _dual.Problem(geom, a, b, epsilon, tau_a, tau_b)
    forward = functools.partial(
        _forward, tol=tol, max_iter=max_iter, warmup=warmup, budgets=budgets,
        dense_rung=dense_rung, direct_max=direct_max, cg_max_iter=cg_max_iter, translate=translate,
    )
    return sinkhorn_lib._solve(forward, problem, init_pair, implicit_diff, tol)


def sns(
    geom: GeometryLike,
    a: Array | None = None,
    b: Array | None = None,
    *,
    epsilon: float | Array | None = None,
    tau_a: float | Array = 1.0,
    tau_b: float | Array = 1.0,
    tol: float | None = None,
    max_iter: int = 200,
    warmup: int = 500,
    budgets: tuple[int, ...] = (16, 64, 256),
    dense_rung: bool = True,
    direct_max: int = 2048,
    cg_max_iter: int = 500,
    init: Init = None,
    implicit_diff: implicit.ImplicitDiff | None = implicit.DEFAULT,
) -> OTSolution:
    """Solve entropic OT with Sinkhorn–Newton–Sparse (safe, adaptive variant).

    float64 is recommended: Newton's fast local convergence shows down to marginal
    errors of ~1e-12. In float32 the plan is recomputed from rounded potentials,
    so the attainable L1 marginal error grows like ``1e-7 * max|C| / epsilon``
    (about 1e-5 at ``epsilon = 1e-3 * max|C|``); the default ``tol`` is 1e-4 there,
    and a run stopped at the floor reports ``MAX_ITER`` (it stops once 30 steps at
    the target epsilon bring less than 10 % progress).

    Args:
        geom: a geometry (dense or online), an ott-jax geometry or a cost matrix.
        a: ``(n,)`` source weights (traced); default uniform.
        b: ``(m,)`` target weights (traced); default uniform.
        epsilon: entropic regularisation (traced); default as in `sinkhorn`.
        tau_a: marginal relaxation in ``(0, 1]`` (traced), as in
            `sinkhorn`.
        tau_b: same for ``b``.
        tol: static. Stop when the L1 optimality residual is ``<= tol``;
            default 1e-9 (float64) or 1e-4 (float32).
        max_iter: static cap on Newton steps (each a direction, its line search and,
            at a change of the continuation stage or when no step length is
            acceptable, a block of Sinkhorn iterations).
        warmup: static cap on the Sinkhorn iterations before the Newton stage (and
            at each change of epsilon); they stop earlier once their measured rate
            predicts that ``tol`` is out of reach within the cap.
        budgets: static ladder of kept Hessian entries per row (strided-bin
            maxima); the solver climbs it when convergence is slow. Budgets
            ``>= m`` become the exact Hessian.
        dense_rung: static. Append the exact Hessian (products with the
            materialised plan) as the top rungs for dense geometries: first
            solved by conjugate gradient, then, once conjugate gradient costs more
            than a factorisation, by a Cholesky factorisation of its Schur
            complement.
        direct_max: static. The Cholesky rung exists when ``min(n, m) <=
            direct_max`` (its cost grows like ``n m min(n, m)``); ``0`` disables it.
        cg_max_iter: static cap on conjugate-gradient iterations per Newton step.
        init: as in `sinkhorn`.
        implicit_diff: as in `sinkhorn`; ``None`` is not supported
            (a Newton loop is not unrolled).

    Returns:
        OTSolution: the solution; ``n_iter`` counts Newton steps (not the Sinkhorn
        iterations) and ``errors`` has one entry per step (the error at that step's
        continuation stage).

    Example:
        >>> import jax, otlab
        >>> jax.config.update("jax_enable_x64", True)
        >>> x = jax.random.uniform(jax.random.key(0), (300, 2))
        >>> y = jax.random.uniform(jax.random.key(1), (300, 2))
        >>> sol = otlab.sns(otlab.PointCloud(x, y), epsilon=1e-3)
        >>> bool(sol.converged), bool(sol.marginal_error < 1e-9)
        (True, True)
        >>> jax.config.update("jax_enable_x64", False)
    """
    geom, a, b, epsilon, tau_a, tau_b = _checks.problem(geom, a, b, epsilon, tau_a, tau_b)
    _checks.positive_int(max_iter, "max_iter")
    _checks.positive_int(cg_max_iter, "cg_max_iter")
    _checks.nonnegative_int(direct_max, "direct_max")
    _checks.nonnegative_int(warmup, "warmup")
    budgets = tuple(budgets) if isinstance(budgets, (tuple, list)) else (budgets,)
    if not budgets and (geom.is_online or not dense_rung):
        raise ValueError("`budgets` is empty and no dense rung is allowed: nothing to solve with.")
    for k in budgets:
        _checks.positive_int(k, "budgets")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be a positive float or None; got {tol!r}.")
    if implicit_diff is None or not isinstance(implicit_diff, implicit.ImplicitDiff):
        raise ValueError("`implicit_diff` must be an otlab.ImplicitDiff (SNS is not unrolled).")
    init_fn, init_pair = _checks.split_init(init, geom, a, b, epsilon)
    return _sns(
        geom, a, b, epsilon, tau_a, tau_b, init_pair,
        init_fn=init_fn, tol=None if tol is None else float(tol), max_iter=int(max_iter),
        warmup=int(warmup), budgets=tuple(int(k) for k in budgets), dense_rung=bool(dense_rung),
        direct_max=int(direct_max),
        cg_max_iter=int(cg_max_iter), implicit_diff=implicit_diff,
    )
