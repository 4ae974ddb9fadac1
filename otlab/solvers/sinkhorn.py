"""Log-domain Sinkhorn: balanced and unbalanced, with epsilon annealing.

Sinkhorn (Cuturi, 2013) alternates the two block maximisations of the entropic
dual (see `otlab._dual`); in log domain, for ``P = exp((f + g - C)/eps)``,

$$ f \\leftarrow \\varepsilon \\log a - \\tau_a\\,\\big(\\varepsilon \\log(P 1) - f\\big), \\qquad g \\leftarrow \\varepsilon \\log b - \\tau_b\\,\\big(\\varepsilon \\log(P^T 1) - g\\big), $$

with ``tau = 1`` for a hard marginal constraint and ``tau = rho / (rho + eps)``
for a KL-relaxed one (Chizat et al., 2018; Séjourné et al., 2019).

Two engines run these updates, with identical iterates up to rounding (at
zero-weight points both return the c-transform, set when the solution is built):

``mode="log"``
    every half-step is a max-shifted log-sum-exp pass over the geometry
    (``geom.lse``): exponentials of ``n * m`` entries per pass. Used for online
    geometries.
``mode="kernel"``
    the stabilised scaling form (Schmitzer, 2019, "Stabilized sparse scaling
    algorithms for entropy regularized transport problems", Alg. 2): potentials
    are split as ``f = f~ + eps log u`` and ``g = g~ + eps log v``; the kernel
    ``K~ = exp((f~ + g~ - C)/eps)`` is built once and the half-steps become
    matrix-vector products ``K~ v`` and ``u K~`` (bandwidth-bound, an order of
    magnitude cheaper than a pass of exponentials on CPU). When ``|log u|`` or
    ``|log v|`` would exceed a dtype-dependent bound (40 in float32, 300 in
    float64; absorption at 3/4 of it), the scalings are absorbed into ``f~, g~`` and the kernel is rebuilt
    (one pass of exponentials). The bound is checked once per block: a block at
    whose end a scaling is past it (or overflowed) is discarded. After such a
    block, at the start and when epsilon changes, the rebuild is preceded by one
    log-domain iteration, which makes every row and column of ``K~`` carry mass
    (no row underflows in float32 at small epsilon). The default for dense
    geometries.

For unbalanced problems a given start (``init``) is first shifted by the constant
that maximises the dual after the first half-step (`otlab._dual.translate_start`; one step of the
translation-invariant Sinkhorn of Séjourné et al., 2022, applied to the start).

The marginal residual is checked every ``check_every`` iterations (after a
``lax.fori_loop`` block inside the ``while_loop``), and after every iteration of the first
block (O(n + m) from the engines' marginals), so that a start that converges within
it, e.g. a warm start, stops there. Gradients come from
`otlab.implicit` (implicit function theorem), never from unrolling, unless
``implicit_diff=None``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from otlab import _checks, _dual, implicit, solution
from otlab._checks import Init
from otlab._control import if_any, one_at_a_time_on_cpu
from otlab.costs import CostLike
from otlab.geometry import GeometryLike, PlanOperator
from otlab.solution import OTSolution, Status

__all__ = ["sinkhorn", "sinkhorn_divergence"]

Array = jax.Array


# ------------------------------------------------------------------------- engines


class _LogState(NamedTuple):
    f: Array
    g: Array
    log_row: Array  # log(P 1) at (f, g)
    log_col: Array  # log(P^T 1) at (f, g)
    eps: Array


class _KernelState(NamedTuple):
    f_abs: Array  # absorbed potentials f~, g~
    g_abs: Array
    log_u: Array  # f = f~ + eps log u
    log_v: Array
    kv: Array  # K~ v
    ku: Array  # u K~ (for the current u)
    op: Any  # PlanOperator of K~
    eps: Array
    stale: Array  # block discarded or verification failed: absorb safely before continuing
    grown: Array  # the scalings passed 3/4 of the bound: rebuild before the next block


def _half_step(w, pot, log_marg, eps, tau):
    """The log-domain update of one potential given ``log`` of its current marginal."""
    return eps * _dual.safe_log(w) - tau * (eps * log_marg - pot)


def _symmetrize(sym, f, g):
    """``(f, g) -> ((f + g) / 2,) * 2`` where ``sym`` (a traced bool), else unchanged."""
    m = 0.5 * (f + g)
    return jnp.where(sym, m, f), jnp.where(sym, m, g)


class _LogEngine:
    """Alternating log-domain Sinkhorn; with ``sym`` (a traced bool, or the static
    ``False``) the symmetric update of self problems ``OT(a, a)`` on a symmetric
    cost (the debiasing terms of `sinkhorn_divergence`).

    Symmetric update: with ``g = f``, one iteration is ``h = T(f)``,
    ``f <- (h + T(h)) / 2``, ``T`` the log-domain half-step (the c-transform): an
    alternating iteration followed by averaging its two potentials, so two
    log-sum-exp passes as before. Linearised at the solution, ``T`` is ``-P~``
    (``P~`` the row-normalised plan, its eigenvalues ``lambda`` in ``[0, 1]`` for a
    positive-definite kernel such as the squared Euclidean one), so the error
    contracts by ``(lambda^2 - lambda) / 2``: at most 1/8 per iteration, exact at
    ``lambda = 0`` (huge epsilon) and at ``lambda = 1`` (the constant gauge and the
    nearly-diagonal plans of points far apart on the scale of epsilon). Alternating
    Sinkhorn contracts by ``lambda^2``, near 1 there: measured 2000 iterations
    stalling at a marginal error of 7e-7 on 7 points where this needs a handful; the
    plain average ``(f + T(f)) / 2`` of Feydy et al. (2019) contracts by
    ``(1 - lambda) / 2``, 1/2 at huge epsilon, where the primal form of ``reg_cost``
    needs the marginals to rounding."""

    @staticmethod
    def init(p: _dual.Problem, geom, f, g, eps, log_row=None, sym=False):
        """``log_row``: ``geom.lse(f, g, eps, 1)`` if the caller has it (saves a pass)."""
        if sym is not False:  # a symmetric start; a given log_row (old pair) is not reused
            f, g = _symmetrize(sym, f, g)
            log_row = None
        log_row = geom.lse(f, g, eps, 1) if log_row is None else log_row
        return _LogState(f, g, log_row, geom.lse(f, g, eps, 0), eps)

    @staticmethod
    def step(p: _dual.Problem, geom, s: _LogState, sym=False) -> _LogState:
        eps = s.eps
        f = _half_step(p.a, s.f, s.log_row, eps, p.tau_a)
        # shifts (online factored costs skip a max pass): the last column sums, and the
        # row sums at (f, old g), exact: log_row + (f - old f) / eps
        log_col = geom.lse(f, s.g, eps, 0, shift=s.log_col)
        g = _half_step(p.b, s.g, log_col, eps, p.tau_b)
        log_col = log_col + (g - s.g) / eps
        if sym is not False:
            f, g = _symmetrize(sym, f, g)
        log_row = geom.lse(f, g, eps, 1, shift=s.log_row + (f - s.f) / eps)
        if sym is not False:  # a symmetric cost at g = f: the columns are the rows
            log_col = jnp.where(sym, log_row, log_col)
        return _LogState(f, g, log_row, log_col, eps)

    @staticmethod
    def potentials(s: _LogState):
        return s.f, s.g

    @staticmethod
    def marginals(s: _LogState):
        return jnp.exp(s.log_row), jnp.exp(s.log_col)

    @staticmethod
    def maybe_absorb(p, geom, s, sym=False, differentiable=False):
        return s

    @staticmethod
    def needs_rebuild(s):
        return jnp.asarray(False)

    @staticmethod
    def split(s):
        return None, s

    @staticmethod
    def join(invariant, s):
        return s

    @staticmethod
    def end_block(p, start, s):
        return s


def _log_bound(dtype) -> float:
    """Largest ``|log u|`` a scaling may reach before it is absorbed (no overflow of
    ``u K~`` in the dtype, and underflowed kernel entries stay negligible)."""
    return 300.0 if dtype == jnp.float64 else 40.0


class _KernelEngine:
    @staticmethod
    def _build(p: _dual.Problem, geom, f, g, eps) -> _KernelState:
        op = geom.plan_operator(f, g, eps)
        zf, zg = jnp.zeros_like(f), jnp.zeros_like(g)
        kv = op.matvec(jnp.ones_like(g))
        ku = op.rmatvec(jnp.ones_like(f))
        false = jnp.asarray(False)
        return _KernelState(f, g, zf, zg, kv, ku, op, eps, false, false)

    @staticmethod
    def absorb(p: _dual.Problem, geom, f, g, eps, log_row=None, sym=False) -> _KernelState:
        """Safe absorption: one log-domain iteration first (rows, then columns, carry
        mass, so no row or column of ``K~`` underflows), then the kernel."""
        f, g = _KernelEngine._log_iteration(p, geom, f, g, eps, log_row, sym)
        return _KernelEngine._build(p, geom, f, g, eps)

    @staticmethod
    def _log_iteration(p: _dual.Problem, geom, f, g, eps, log_row=None, sym=False):
        """One log-domain iteration; with ``sym``, the symmetric one (`_LogEngine`),
        which keeps ``f~ = g~``: the kernel of a self problem stays symmetric."""
        log_row = geom.lse(f, g, eps, 1) if log_row is None else log_row
        f = _half_step(p.a, f, log_row, eps, p.tau_a)
        g = _half_step(p.b, g, geom.lse(f, g, eps, 0), eps, p.tau_b)
        return (f, g) if sym is False else _symmetrize(sym, f, g)

    @staticmethod
    def init(p: _dual.Problem, geom, f, g, eps, log_row=None, sym=False) -> _KernelState:
        """The state at ``(f, g)``. With ``log_row`` (a caller's row log-sum-exp), the
        safe absorption now; without, a placeholder marked stale, whose kernel the loop's
        first `maybe_absorb` builds by the same safe absorption (one traced copy of it
        instead of two: fewer kernels to compile)."""
        if sym is not False:  # a symmetric start; a given log_row (old pair) is not reused
            f, g = _symmetrize(sym, f, g)
            log_row = None
        if log_row is not None:
            return _KernelEngine.absorb(p, geom, f, g, eps, log_row)
        matrix = None if geom.is_online else jnp.zeros(geom.shape, f.dtype)
        op = PlanOperator(geom, f, g, jnp.asarray(eps), matrix)
        zf, zg = jnp.zeros_like(f), jnp.zeros_like(g)
        true, false = jnp.asarray(True), jnp.asarray(False)
        return _KernelState(f, g, zf, zg, zf, zg, op, eps, true, false)

    @staticmethod
    def from_plan(op: PlanOperator, row: Array, col: Array) -> _KernelState:
        """The state at ``(op.f, op.g)`` from a caller's materialised plan there and
        its marginals ``(P 1, P^T 1)``: no pass over ``n x m``. No safe absorption
        first: a row or column of the plan that underflowed makes the first block
        leave the scalings' bound, which discards it and absorbs safely (`end_block`)."""
        zf, zg = jnp.zeros_like(op.f), jnp.zeros_like(op.g)
        false = jnp.asarray(False)
        return _KernelState(op.f, op.g, zf, zg, row, col, op, op.epsilon, false, false)

    @staticmethod
    def potentials(s: _KernelState):
        return s.f_abs + s.eps * s.log_u, s.g_abs + s.eps * s.log_v

    @staticmethod
    def _scaling(w, k_marg, pot_abs, eps, tau):
        tiny = jnp.finfo(k_marg.dtype).tiny
        return _dual.safe_log(w) - tau * jnp.log(jnp.maximum(k_marg, tiny)) + (tau - 1.0) * (
            pot_abs / eps
        )

    @staticmethod
    def _largest(p, log_u, log_v):
        """``max |log u|, |log v|`` (NaN if any is). Zero weights have ``log u ~
        log(tiny)``: they never ask for absorption."""
        return jnp.maximum(jnp.max(jnp.where(p.a > 0, jnp.abs(log_u), 0.0)),
                           jnp.max(jnp.where(p.b > 0, jnp.abs(log_v), 0.0)))  # fmt: skip

    @staticmethod
    def step(p: _dual.Problem, geom, s: _KernelState, sym=False) -> _KernelState:
        log_u = _KernelEngine._scaling(p.a, s.kv, s.f_abs, s.eps, p.tau_a)
        ku = s.op.rmatvec(jnp.exp(log_u))
        log_v = _KernelEngine._scaling(p.b, ku, s.g_abs, s.eps, p.tau_b)
        if sym is not False:
            # a self problem keeps f~ = g~ (`_log_iteration`): averaging the potentials
            # averages the scalings, and the symmetric kernel's columns are its rows
            log_u, log_v = _symmetrize(sym, log_u, log_v)
        kv = s.op.matvec(jnp.exp(log_v))
        if sym is not False:
            ku = jnp.where(sym, kv, ku)
        return s._replace(log_u=log_u, log_v=log_v, kv=kv, ku=ku)

    @staticmethod
    def end_block(p: _dual.Problem, start: _KernelState, s: _KernelState) -> _KernelState:
        """After a block of unguarded steps: a scaling that left the safe range (or
        overflowed) discards the block (back to its start, cheap vector selects) and
        marks the kernel stale, to be rebuilt safely before the next block; one past
        3/4 of the bound asks for a plain rebuild (one pass of exponentials). One
        check per block instead of one per iteration: the iteration stays two
        products and O(n + m) work, and XLA compiles fewer kernels."""
        largest = _KernelEngine._largest(p, s.log_u, s.log_v)
        bound = _log_bound(s.kv.dtype)
        bad = ~(largest < bound)
        pick = lambda old, new: jnp.where(bad, old, new)  # noqa: E731
        return s._replace(
            log_u=pick(start.log_u, s.log_u), log_v=pick(start.log_v, s.log_v),
            kv=pick(start.kv, s.kv), ku=pick(start.ku, s.ku), stale=bad | s.stale,
            grown=largest >= 0.75 * bound,
        )  # fmt: skip

    @staticmethod
    def marginals(s: _KernelState):
        return jnp.exp(s.log_u) * s.kv, jnp.exp(s.log_v) * s.ku

    @staticmethod
    def maybe_absorb(p, geom, s: _KernelState, sym=False, differentiable=False):
        """Rebuild the kernel when the scalings grew past 3/4 of the bound (one pass
        of exponentials; see `end_block`), or safely after a discarded block or a
        failed verification (three passes)."""

        def rebuild(s):
            # Safe absorption after a discarded block: one log-domain iteration first
            # (a nested `if_any`: one traced copy of the kernel build serves every case).
            f, g = _KernelEngine.potentials(s)
            f, g = if_any(
                s.stale, lambda fg: _KernelEngine._log_iteration(p, geom, *fg, s.eps, None, sym),
                (f, g), differentiable=differentiable,
            )  # fmt: skip
            return _KernelEngine._build(p, geom, f, g, s.eps)

        # (`if_any`: under vmap only when some problem needs it, not a select per block)
        return if_any(s.stale | s.grown, rebuild, s, differentiable=differentiable)

    @staticmethod
    def needs_rebuild(s: _KernelState):
        return s.stale | s.grown

    @staticmethod
    def split(s: _KernelState):
        """``(K~, the rest)``: the kernel is constant between rebuilds, so the loop over
        blocks closes over it instead of carrying it (see `_forward`)."""
        return s.op, s._replace(op=None)

    @staticmethod
    def join(op, s: _KernelState) -> _KernelState:
        return s._replace(op=op)


# --------------------------------------------------------------------------- loop

#: Most entries of ``OTSolution.errors``: with more than ``MAX_HISTORY`` blocks of
#: ``check_every`` iterations, ``errors[k]`` is the last check of blocks
#: ``k * stride ... (k + 1) * stride - 1``, ``stride = ceil(blocks / MAX_HISTORY)``.
MAX_HISTORY = 4096


class _Loop(NamedTuple):
    state: Any
    block: Array  # blocks run
    iters: Array  # iterations run
    err: Array
    errors: Array
    status: Array
    done: Array
    pending: Array  # the last block looks converged: verify it (`settle`)
    slot: Array  # the entry of ``errors`` the last block wrote


def _translation(p: _dual.Problem, geom, f, g, eps):
    """``(f - tau_a t, g + t, L)``: the start shifted by the constant of
    `otlab._dual.translate_start`, and ``L = half_step_lse`` of the shifted ``g`` (one pass)."""
    log_l = _dual.half_step_lse(geom, g, eps)
    t = _dual.translate_start(g, log_l, p.a, p.b, eps, p.tau_a, p.tau_b).astype(g.dtype)
    return f - p.tau_a * t, g + t, log_l + t / eps


def _unbalanced_start(problem: _dual.Problem, geom, f, g, eps, check: bool):
    """``(f, g, log_row)`` to start an engine from: for an unbalanced problem, ``(f, g)``
    shifted by `_translation`, and with ``check``, kept only if the dual after the first
    half-step from it is at least that from zeros; ``log_row = geom.lse(f, g, eps, 1)``,
    which the engines' first half-step reuses (so the shift is free; the check costs one
    pass, the zero start's). Balanced problems only compute ``log_row`` (a ``lax.cond``:
    a constant is a gauge there).

    A start built for the balanced problem can have the wrong shape under strong
    relaxation (measured: 2-D Gaussian start, tau = 0.9, 51 iterations against 40 from
    zeros), and the dual flags it (as ``initializers.auto``'s safeguard does).
    """
    p = problem

    def balanced(f, g):
        return f, g, geom.lse(f, g, eps, 1)

    def unbalanced(f, g):
        f, g, log_l = _translation(p, geom, f, g, eps)
        if check:
            d_start = _dual.half_step_dual(g, log_l, p.a, p.b, eps, p.tau_a, p.tau_b)
            zeros = jnp.zeros_like(g)
            log_l0 = _dual.half_step_lse(geom, zeros, eps)
            d_zeros = _dual.half_step_dual(zeros, log_l0, p.a, p.b, eps, p.tau_a, p.tau_b)
            keep = d_start >= d_zeros
            f, g = jnp.where(keep, f, 0.0), jnp.where(keep, g, 0.0)
            log_l = jnp.where(keep, log_l, log_l0)
        return f, g, f / eps + log_l

    return jax.lax.cond(_dual.is_balanced(p.tau_a, p.tau_b) > 0, balanced, unbalanced, f, g)


def _forward(
    problem: _dual.Problem,
    init,
    *,
    mode: str,
    tol: float,
    max_iter: int,
    check_every: int,
    epsilon_decay: float,
    unroll: bool,
    translate: bool = False,
    stall: bool = False,
    symmetric: Any = False,
    plan: tuple | None = None,
):
    """Run Sinkhorn from ``init = (f0, g0, epsilon_init)``; returns ``(f, g, aux)``.

    ``plan`` (kernel mode, no annealing, not ``translate``, not ``symmetric``): a
    caller's materialised `PlanOperator` at ``(f0, g0)`` and ``problem.epsilon`` and
    its marginals, ``(op, P 1, P^T 1)``; the kernel starts from it (`otlab.sns`'s
    Sinkhorn blocks start from its anchored plan: no passes of exponentials), and the
    kernel's final plan ``(f~, g~, K~)`` is returned as a fourth output (the plan at
    ``(f~, g~)``; ``(f, g)`` differ from them by the scalings ``eps log u``, ``eps log v``).

    ``symmetric``: a traced bool (or the static ``False``): the problem is a self
    problem ``OT(a, a)`` on a symmetric cost, solved by the symmetric update (see
    `_LogEngine`) with ``g = f`` throughout.

    ``stall`` (static, for `otlab.sns`'s warm-up): also stop after a block (other than
    the first) when the linear rate of that block (its error over the previous one)
    predicts that ``tol`` is out of reach within ``max_iter`` iterations: Sinkhorn has
    become too slow for the budget. The status is then ``MAX_ITER``.

    ``translate`` (static): a given start of an unbalanced problem is shifted by the
    constant of `otlab._dual.translate_start` and kept only if it beats zeros on the
    half-step dual (`_unbalanced_start`). Not done for the zero start, whose level is
    already the problem's own (measured: the shift helped data-dependent starts but
    slowed zeros on some problems)."""
    f0, g0, epsilon_init = init
    geom = problem.geom.materialize()
    engine = {"kernel": _KernelEngine, "log": _LogEngine}[mode]
    # Exactly max_iter iterations at most: blocks of check_every, then a shorter one.
    check_every = min(check_every, max_iter)
    n_full, rem = divmod(max_iter, check_every)
    n_blocks = n_full + (rem > 0)
    stride = -(-n_blocks // MAX_HISTORY)  # errors[k]: the last check of blocks k*stride...
    dtype = problem.a.dtype
    eps_target = problem.epsilon
    stop = solution.stop_tol(tol)

    def eps_at(k):
        if epsilon_init is None:
            return eps_target
        return jnp.maximum(eps_target, epsilon_init * epsilon_decay ** k.astype(dtype))

    def new_epsilon(s, eps):
        # The level of unbalanced potentials depends on epsilon: re-translate.
        f, g, log_row = _unbalanced_start(problem, geom, *engine.potentials(s), eps, check=False)
        return engine.init(problem, geom, f, g, eps, log_row, symmetric)

    def check(s, eps):
        """``(err, finite, converged)`` at state ``s``: O(n + m), from its marginals."""
        f, g = engine.potentials(s)
        ra, rb = problem.residual(f, g, *engine.marginals(s))
        # (+ 0 * f: non-finite potentials make the error NaN; two reductions, not four)
        err = jnp.sum(jnp.abs(ra + 0.0 * f)) + jnp.sum(jnp.abs(rb + 0.0 * g))
        finite = jnp.isfinite(err)
        return err, finite, (err <= stop) & (eps <= eps_target)

    def verify(s, eps, err, converged):
        """A block that looks converged is re-checked as the solution will be
        (`otlab.solution.build`): potentials in the canonical gauge, marginals in the
        log domain (two passes, once per solve as a rule: a ``lax.cond``). The kernel
        engine's marginals come from the scaled kernel and can miss the true error
        when the potentials are large (rounding of ``K~``), and in float32 near the
        rounding floor the gauge shift alone can move the error past ``tol``. If the
        check fails the loop goes on (the kernel engine rebuilds its kernel safely
        first). (The same passes as the final check, not the kernel's marginals: a
        kernel rebuilt at the potentials reads marginals that differ by rounding, up
        to 1 % of ``tol`` in float32. The same formula compiled in another fusion
        context still differs by rounding, hence the threshold `solution.stop_tol`,
        below ``tol``.)"""

        def log_error(s):
            f, g = _dual.gauge_shift(*engine.potentials(s), p.a, p.b, p.tau_a, p.tau_b)
            row = jnp.exp(geom.lse(f, g, eps, 1))
            col = jnp.exp(geom.lse(f, g, eps, 0))
            ra, rb = problem.residual(f, g, row, col)
            return (jnp.sum(jnp.abs(ra)) + jnp.sum(jnp.abs(rb))).astype(err.dtype)

        p = problem
        err = if_any(converged, lambda _: log_error(s), err, differentiable=unroll)
        ok = err <= stop
        if mode == "kernel":
            s = s._replace(stale=s.stale | (converged & ~ok))
        return s, err, converged & ok

    def prepare(loop: _Loop) -> _Loop:
        """Before a block: a new epsilon (annealing), a kernel rebuilt where needed.
        The rare, expensive branches (`if_any`)."""
        eps = eps_at(loop.block)
        s = loop.state
        if epsilon_init is not None:  # static: annealing on or off
            s = if_any(eps != s.eps, lambda s: new_epsilon(s, eps), s, differentiable=unroll)
        s = engine.maybe_absorb(problem, geom, s, symmetric, differentiable=unroll)
        return loop._replace(state=s)

    def run_block(loop: _Loop, length: int = check_every) -> _Loop:
        """One block: ``length`` iterations, then the O(n + m) residual check. A block
        that looks converged is marked ``pending``: `settle` verifies it. The first
        block is checked after every iteration (a block of one iteration each time,
        with ``loop.block`` still 0), so that a good start (``init``) that converges
        within it stops there. One traced copy of the iteration and of the check serves
        both (a separate first-block scan doubled the kernels XLA compiles); with
        ``unroll`` every block is a fixed-length scan (reverse-differentiable)."""
        eps = eps_at(loop.block)
        s = loop.state
        if unroll:
            ran = length
            s, _ = jax.lax.scan(lambda s, _: (engine.step(problem, geom, s, symmetric), None), s, length=ran)
        else:
            ran = jnp.where(loop.iters < check_every, 1, length)
            start = s
            s = jax.lax.fori_loop(0, ran, lambda _, s: engine.step(problem, geom, s, symmetric), s)
            s = engine.end_block(problem, start, s)
        err, finite, converged = check(s, eps)
        slow = False
        if stall:  # not in the first block (checked after every iteration)
            rate = err / loop.err
            need = ran * jnp.log(stop / err) / jnp.log(jnp.where(rate < 1, rate, 0.5))
            left = max_iter - (loop.iters + ran)
            slow = ((rate >= 1) | (need > left)) & (eps <= eps_target) & (loop.iters >= check_every)
        slot = loop.block // stride if stride > 1 else loop.block
        status = jnp.where(~finite, Status.NONFINITE, Status.MAX_ITER)
        return _Loop(
            s,
            (loop.iters + ran) // check_every,
            loop.iters + ran,
            err,
            loop.errors.at[slot].set(err),
            status.astype(jnp.int32),
            (~finite) | (slow & ~converged),
            converged,
            jnp.asarray(slot),
        )

    def settle(loop: _Loop) -> _Loop:
        """Verify the ``pending`` blocks (`verify`): converged, or back to iterating
        (the kernel engine rebuilds its kernel safely first)."""
        s, err, ok = verify(loop.state, eps_target, loop.err, loop.pending)
        return loop._replace(
            state=s,
            err=err,
            errors=loop.errors.at[loop.slot].set(err),
            status=jnp.where(ok, Status.SUCCESS, loop.status).astype(jnp.int32),
            done=loop.done | ok,
            pending=jnp.asarray(False),
        )

    def body(loop: _Loop, length: int = check_every) -> _Loop:
        """One whole block: `prepare`, `run_block`, `settle`."""
        return settle(run_block(prepare(loop), length))

    eps0 = eps_at(jnp.asarray(0))
    log_row = None
    if translate:
        f0, g0, log_row = _unbalanced_start(problem, geom, f0, g0, eps0, check=True)
    if plan is None:
        state = engine.init(problem, geom, f0, g0, eps0, log_row, symmetric)
    else:  # static
        if mode != "kernel" or epsilon_init is not None or translate or symmetric is not False:
            raise ValueError("`plan` starts the kernel engine of a plain, fixed-epsilon run.")
        state = _KernelEngine.from_plan(*plan)
    loop = _Loop(
        state,
        jnp.asarray(0),
        jnp.asarray(0),
        jnp.asarray(jnp.inf, dtype),
        jnp.full((-(-n_blocks // stride),), -1.0, dtype),
        jnp.asarray(Status.MAX_ITER, jnp.int32),
        jnp.asarray(False),
        jnp.asarray(False),
        jnp.asarray(0),
    )
    if unroll:
        # A fixed-length scan (reverse-differentiable); blocks after the stop are skipped
        # by a `lax.cond` (a select under `vmap`): computed and discarded, they made a
        # solve cost O(max_iter) (n = 100, converged after 40 iterations: 8.5 ms at
        # max_iter = 200 and 41 ms at 1000, against 0.8 ms for the implicit path).
        def scan_body(loop, _, length=check_every):
            new = jax.lax.cond(
                loop.done, lambda lp: lp, functools.partial(body, length=length), loop
            )
            return new, None

        loop, _ = jax.lax.scan(scan_body, loop, length=n_full)
        if rem:
            loop, _ = scan_body(loop, None, length=rem)
    else:
        # Two loops. The inner one runs blocks while none needs a rebuild (or a new
        # epsilon) or a verification, closing over the kernel (`engine.split`): under
        # `jax.vmap` a while loop selects every carried array per iteration, and a
        # carried n x m kernel was copied per block (ragged batch of 32: 0.66 s, the
        # loop of solves 0.05 s). The outer one verifies, rebuilds and re-enters; under
        # vmap it runs when every problem waits for it (a problem whose block converged
        # or whose kernel must be rebuilt idles until then: the same iterates).
        def inner_cond(lp: _Loop):
            go = (~lp.done) & (~lp.pending) & (lp.block < n_full)
            go = go & ~engine.needs_rebuild(lp.state)
            if epsilon_init is not None:
                go = go & (eps_at(lp.block) == lp.state.eps)
            return go

        def outer_body(lp: _Loop) -> _Loop:
            lp = prepare(settle(lp))
            invariant, rest = engine.split(lp.state)

            def inner_body(lp: _Loop) -> _Loop:
                lp = run_block(lp._replace(state=engine.join(invariant, lp.state)))
                return lp._replace(state=engine.split(lp.state)[1])

            lp = jax.lax.while_loop(inner_cond, inner_body, lp._replace(state=rest))
            return lp._replace(state=engine.join(invariant, lp.state))

        loop = jax.lax.while_loop(
            lambda lp: (~lp.done) & ((lp.block < n_full) | lp.pending), outer_body, loop
        )
        if rem:  # static: only when check_every does not divide max_iter
            loop = jax.lax.cond(loop.done, lambda lp: lp, lambda lp: body(lp, length=rem), loop)
    f, g = engine.potentials(loop.state)
    aux = (loop.status, loop.iters, loop.err, loop.errors)
    if plan is not None:  # static: also the kernel's plan, (f~, g~, K~) with K~ at (f~, g~)
        return f, g, aux, (loop.state.f_abs, loop.state.g_abs, loop.state.op.matrix)
    return f, g, aux


# ----------------------------------------------------------------------- public API


def _traced_defaults(geom, a, b, epsilon, init_fn, init_pair):
    """Inside a solver's ``jit``: the default epsilon and the initial potentials."""
    if epsilon is None:
        epsilon = geom.default_epsilon()
    if init_fn is not None or init_pair is None:
        init_pair = _checks.potentials(init_fn, geom, a, b, epsilon)
    return epsilon, init_pair


def _solve(forward, problem: _dual.Problem, init, implicit_diff, tol: float) -> OTSolution:
    """Run a solver's ``forward`` through `otlab.implicit` and pack the solution
    (`otlab.solution.build`: zero-weight potentials and the final log-domain check)."""
    f, g, (status, n_iter, _, errors) = implicit.solve(forward, problem, init, implicit_diff)
    p = problem
    status = _runtime_status(status, p.a, p.b, p.epsilon, p.tau_a, p.tau_b)
    return solution.build(problem, f, g, status, n_iter, errors, tol)


def _runtime_status(status, a, b, epsilon, tau_a, tau_b):
    """Final status: run-time infeasibility (values the eager checks could not see
    under ``jit``) overrides the loop's status (non-finite potentials are
    `otlab.solution.build`'s to flag)."""
    # (NaN parameters are not infeasible but NONFINITE: these comparisons are False.)
    bad_param = (epsilon <= 0) | (tau_a <= 0) | (tau_a > 1) | (tau_b <= 0) | (tau_b > 1)
    negative = jnp.any(a < 0) | jnp.any(b < 0) | bad_param
    unequal = (jnp.abs(jnp.sum(a) - jnp.sum(b)) > 1e-5 * jnp.maximum(jnp.sum(a), jnp.sum(b))) & (
        _dual.is_balanced(tau_a, tau_b) > 0
    )
    # An infeasible problem (e.g. epsilon = 0, which also makes the potentials NaN)
    # is reported as such, not as the NaN it causes.
    return jnp.where(negative | unequal, Status.INFEASIBLE, status).astype(jnp.int32)



@functools.partial(
    jax.jit,
    static_argnames=(
        "init_fn",
        "tol",
        "max_iter",
        "check_every",
        "epsilon_decay",
        "mode",
        "implicit_diff",
    ),
)
def _sinkhorn(
    geom,
    a,
    b,
    epsilon,
    tau_a,
    tau_b,
    init_pair,
    epsilon_init,
    *,
    init_fn,
    tol,
    max_iter,
    check_every,
    epsilon_decay,
    mode,
    implicit_diff,
):
    translate = init_fn is not None or init_pair is not None
    epsilon, init_pair = _traced_defaults(geom, a, b, epsilon, init_fn, init_pair)
    symmetric = mode == "symmetric"  # private: a self problem (see `_LogEngine`)
    if mode in ("auto", "symmetric"):
        mode = "log" if geom.is_online else "kernel"
    unroll = implicit_diff is None
    if unroll:
        mode = "log"
    problem = _dual.Problem(geom, a, b, epsilon, tau_a, tau_b)
    forward = functools.partial(
        _forward,
        mode=mode,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        epsilon_decay=epsilon_decay,
        unroll=unroll,
        translate=translate,
        symmetric=symmetric,
    )
    return _solve(forward, problem, (*init_pair, epsilon_init), implicit_diff, tol)


def sinkhorn(
    geom: GeometryLike,
    a: Array | None = None,
    b: Array | None = None,
    *,
    epsilon: float | Array | None = None,
    tau_a: float | Array = 1.0,
    tau_b: float | Array = 1.0,
    tol: float = 1e-4,
    max_iter: int = 2000,
    check_every: int = 10,
    init: Init = None,
    epsilon_init: float | Array | None = None,
    epsilon_decay: float = 0.9,
    mode: str = "auto",
    implicit_diff: implicit.ImplicitDiff | None = implicit.DEFAULT,
) -> OTSolution:
    """Solve entropic OT with log-domain Sinkhorn.

    Args:
        geom: an otlab `Geometry` / `PointCloud`, an
            ott-jax geometry, or an ``(n, m)`` cost matrix.
        a: ``(n,)`` non-negative source weights (traced); default uniform.
        b: ``(m,)`` non-negative target weights (traced); default uniform.
        epsilon: entropic regularisation (traced); default: the ott-jax geometry's
            own, else ``geom.default_epsilon()`` (``0.05 *`` the mean finite cost;
            finite and positive for every input).
        tau_a: ``rho_a / (rho_a + epsilon)`` in ``(0, 1]`` (traced); ``1`` is a
            hard marginal constraint, smaller relaxes it with a KL penalty.
        tau_b: same for ``b``.
        tol: static. Stop when the L1 optimality residual (``|P1 - a|_1 +
            |P^T1 - b|_1`` when balanced) is ``<= tol``; ``SUCCESS`` means the
            returned potentials meet it when re-evaluated in the log domain.
        max_iter: static iteration cap, honoured exactly (the last block is
            shortened when ``check_every`` does not divide it).
        check_every: static. Iterations between residual checks.
        init: ``None`` (zero potentials), ``"auto"`` (`otlab.initializers.auto`:
            the best applicable data-dependent initializer), a pair ``(f0, g0)``
            (traced), or a static callable ``init(geom, a, b, epsilon) -> (f0, g0)``
            such as the initializers of `otlab.initializers`. Never changes
            gradients.
        epsilon_init: if given (traced), anneal epsilon geometrically from this
            value to ``epsilon``, one step per ``check_every`` iterations.
        epsilon_decay: static decay factor of the annealing.
        mode: static, ``"auto"``, ``"kernel"`` or ``"log"`` (see the module
            docstring); ``"auto"`` is ``"kernel"`` for dense and ``"log"`` for
            online geometries.
        implicit_diff: static options of implicit differentiation, or ``None`` to
            unroll the iterations (a fixed-length scan in log mode: for testing).

    Returns:
        OTSolution: potentials, diagnostics and the lazy plan.

    Raises:
        ValueError: on bad shapes or options, and — for concrete inputs — negative
            or non-finite weights, ``epsilon <= 0``, ``tau`` outside ``(0, 1]`` or
            unequal masses in a balanced problem. Under ``jit`` the value checks
            become ``status`` codes instead.

    Example:
        >>> import jax, otlab
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 2))
        >>> y = jax.random.normal(ky, (300, 2)) + 1.0
        >>> sol = otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.05)
        >>> bool(sol.converged), sol.plan().shape
        (True, (200, 300))
    """
    _checks.choice(mode, "mode", ("auto", "kernel", "log"))
    return _checked_sinkhorn(
        geom, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b, tol=tol, max_iter=max_iter,
        check_every=check_every, init=init, epsilon_init=epsilon_init,
        epsilon_decay=epsilon_decay, mode=mode, implicit_diff=implicit_diff,
    )


def _check_loop_options(tol, max_iter, check_every):
    _checks.positive_int(max_iter, "max_iter")
    _checks.positive_int(check_every, "check_every")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be a positive float; got {tol!r}.")


def _checked_sinkhorn(
    geom, a, b, *, epsilon, tau_a, tau_b, tol, max_iter, check_every, init, epsilon_init,
    epsilon_decay, mode, implicit_diff,
) -> OTSolution:
    """`sinkhorn` after its ``mode`` check: also the private ``mode="symmetric"`` of
    self problems on a symmetric cost (the symmetric update of `_LogEngine`, in the
    engine ``"auto"`` picks)."""
    geom, a, b, epsilon, tau_a, tau_b = _checks.problem(geom, a, b, epsilon, tau_a, tau_b)
    _check_loop_options(tol, max_iter, check_every)
    if not 0.0 < epsilon_decay < 1.0:
        raise ValueError(f"`epsilon_decay` must be in (0, 1); got {epsilon_decay!r}.")
    if epsilon_init is not None:
        epsilon_init = _checks.positive_scalar(epsilon_init, "epsilon_init", geom.dtype)
    if implicit_diff is not None and not isinstance(implicit_diff, implicit.ImplicitDiff):
        raise ValueError("`implicit_diff` must be an otlab.ImplicitDiff or None.")
    init_fn, init_pair = _checks.split_init(init, geom, a, b, epsilon)
    return _sinkhorn(
        geom,
        a,
        b,
        epsilon,
        tau_a,
        tau_b,
        init_pair,
        epsilon_init,
        init_fn=init_fn,
        tol=float(tol),
        max_iter=int(max_iter),
        check_every=int(check_every),
        epsilon_decay=float(epsilon_decay),
        mode=mode,
        implicit_diff=implicit_diff,
    )


def sinkhorn_divergence(
    x: Array,
    y: Array,
    a: Array | None = None,
    b: Array | None = None,
    *,
    cost: CostLike = None,
    epsilon: float | Array | None = None,
    block_size: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 2000,
    check_every: int = 10,
    mode: str = "auto",
    init: Init = None,
    with_status: bool = False,
) -> Array | tuple[Array, Array]:
    """Debiased Sinkhorn divergence ``OT(a, b) - (OT(a, a) + OT(b, b)) / 2``.

    Non-negative, zero iff the measures coincide, and a smooth, convex surrogate
    of ``W_p^p`` (Feydy et al., 2019). All three problems use the same epsilon
    (default ``0.05 *`` the mean cost between ``x`` and ``y``). Each ``reg_cost`` is
    differentiated by the envelope theorem (exact at the optimum, first order in the
    solves' residual; no backward linear solve).

    The value is NaN unless all three solves converged (``status == SUCCESS``,
    see `otlab.OTSolution.converged`), under ``jit`` too: a loss built on it never
    silently uses an unconverged value, and its gradient is then zero, not the
    garbage gradient of an unconverged solve. ``with_status=True`` also returns
    the worst of the three status codes. Rounding can make the debiased sum
    slightly negative for nearly equal measures; it is clipped at zero. As
    ``epsilon -> inf`` every plan tends to the product measure and the divergence
    to ``<C, ab> - (<C, aa> + <C, bb>) / 2`` (for the squared Euclidean cost,
    ``|mean(x) - mean(y)|^2``); `OTSolution.reg_cost` is evaluated in primal form
    there, so huge epsilons give that limit instead of rounding noise.

    Args:
        x: ``(n, d)`` source points.
        y: ``(m, d)`` target points.
        a: ``(n,)`` source weights, default uniform.
        b: ``(m,)`` target weights, default uniform.
        cost: ground cost (see `PointCloud`).
        epsilon: entropic regularisation.
        block_size: online block size, or ``None`` for dense geometries.
        tol: as in `sinkhorn`.
        max_iter: as in `sinkhorn`.
        check_every: as in `sinkhorn`.
        mode: as in `sinkhorn`.
        init: ``None``, ``"auto"`` or an initializer ``init(geom, a, b, epsilon)``
            (`otlab.initializers`), applied to each of the three problems; a
            precomputed pair cannot serve all three and raises ``ValueError``.
        with_status: static. Return ``(divergence, status)``, ``status`` the
            largest (worst) of the three solves' `otlab.Status` codes.

    Returns:
        The divergence (a scalar, NaN unless the three solves converged), or
        ``(divergence, status)`` with ``with_status=True``.

    Example:
        >>> import jax, jax.numpy as jnp, otlab
        >>> x = jax.random.normal(jax.random.key(0), (100, 2))
        >>> float(otlab.sinkhorn_divergence(x, x, epsilon=0.1)) < 1e-4
        True
        >>> y = 2.0 * x + 1.0
        >>> d0 = otlab.sinkhorn_divergence(x, y, epsilon=0.2)
        >>> d1 = otlab.sinkhorn_divergence(x, y, epsilon=0.2, init="auto")
        >>> bool(abs(d1 - d0) < 1e-3 * d0)
        True
        >>> d, status = otlab.sinkhorn_divergence(x, y, epsilon=1e-4, max_iter=10,
        ...                                       with_status=True)
        >>> bool(jnp.isnan(d)), otlab.Status.name(status)
        (True, 'MAX_ITER')
    """
    if init is not None and not isinstance(init, str) and not callable(init):
        raise ValueError(
            "`init` of sinkhorn_divergence must be None, 'auto' or an initializer function "
            "(it is applied to each of the three problems); got a precomputed pair or "
            f"{type(init).__name__}."
        )
    _checks.choice(mode, "mode", ("auto", "kernel", "log"))
    from otlab.geometry import PointCloud

    gxy = PointCloud(x, y, cost, block_size)
    gxy, a, b, epsilon, _, _ = _checks.problem(gxy, a, b, epsilon, 1.0, 1.0)
    _check_loop_options(tol, max_iter, check_every)
    init_fn, _ = _checks.split_init(init, gxy, a, b, epsilon)
    return _divergence(
        gxy, a, b, epsilon, init_fn=init_fn, tol=float(tol), max_iter=int(max_iter),
        check_every=int(check_every), mode=mode, with_status=with_status,
    )  # fmt: skip


def _pad_rows(z: Array, size: int) -> Array:
    """``z`` with rows appended up to ``size`` (copies of its first row: points that a
    zero weight makes inert, at a cost on the data's scale)."""
    extra = size - z.shape[0]
    if extra == 0:
        return z
    return jnp.concatenate([z, jnp.broadcast_to(z[:1], (extra,) + z.shape[1:])])


#: `sinkhorn_divergence` solves its three problems with one compiled solve (padded to a
#: common size) when the padding adds at most this factor to the entries of a pass,
#: and the padded size is at most `PAD_MAX_SIZE` (equal sizes need no padding).
PAD_OVERHEAD = 1.5
#: Above this padded size a pass costs more than the compile time that one compiled solve
#: instead of three saves (about 1 s on a 2-core CPU) over a few dozen calls.
PAD_MAX_SIZE = 1024


def _one_compiled_solve(n: int, m: int) -> bool:
    """Whether `sinkhorn_divergence` pads its three problems to one size (see `_divergence`)."""
    size = max(n, m)
    small_waste = 3 * size * size <= PAD_OVERHEAD * (n * m + n * n + m * m)
    return n == m or (small_waste and size <= PAD_MAX_SIZE)


@functools.partial(
    jax.jit,
    static_argnames=("init_fn", "tol", "max_iter", "check_every", "mode", "with_status"),
)
def _divergence(gxy, a, b, epsilon, *, init_fn, tol, max_iter, check_every, mode, with_status):
    """The three problems ``(x, y)``, ``(x, x)``, ``(y, y)``, their values differentiated
    by the envelope theorem, debiased.

    Compile time: when the clouds have equal sizes, or close and small ones (padding to
    a common size adds at most `PAD_OVERHEAD` to the work of a pass, and that size is at
    most `PAD_MAX_SIZE`), the three problems are stacked, the shorter cloud padded with
    zero-weight points (exact: zero weights change neither values nor gradients), and
    solved by one ``lax.map`` over a single traced solve (whose self problems take the
    symmetric update by a traced flag): XLA compiles one solver loop instead of three
    (measured at 300 x 400: 1.5-1.6x ott-jax's compile time instead of 3.0x, for 1.3x the
    warm time of three separate solves). Otherwise three solves are traced.
    """
    if epsilon is None:
        epsilon = gxy.default_epsilon()
    x, y = gxy.x, gxy.y
    (n, m), size = gxy.shape, max(gxy.shape)
    symmetric_cost = bool(getattr(gxy.cost, "symmetric", False))
    if mode == "auto":
        mode = "log" if gxy.is_online else "kernel"
    one = jnp.ones((), a.dtype)

    def solve(x, y, a, b, sym):
        """One problem, solved on constants (no gradient enters the solver)."""
        geom = jax.lax.stop_gradient(dataclasses.replace(gxy, x=x, y=y))
        a, b, eps = jax.lax.stop_gradient((a, b, epsilon))
        f0, g0 = _traced_defaults(geom, a, b, eps, init_fn, None)[1]
        problem = _dual.Problem(geom, a, b, eps, one, one)
        options = functools.partial(
            _forward, mode=mode, tol=tol, max_iter=max_iter, check_every=check_every,
            epsilon_decay=0.9, unroll=False, translate=init_fn is not None,
        )  # fmt: skip

        def alone(problem, init, sym):
            # (the canonical gauge, and no implicit backward: the inputs are constants)
            forward = functools.partial(options, symmetric=sym)
            f, g, (status, n_iter, _, errors) = implicit.solve(forward, problem, init, None)
            p = problem
            status = _runtime_status(status, p.a, p.b, p.epsilon, p.tau_a, p.tau_b)
            sol, reg = solution.build(p, f, g, status, n_iter, errors, tol, with_value=True)
            return dataclasses.replace(sol, geom=None), reg  # (not the geometry)

        # Under `jax.vmap` on CPU each problem is solved and checked alone, as in
        # `otlab.implicit` (32 divergences at n = 400 in lockstep: 2.6x slower than a
        # Python loop). A traced ``sym`` is an argument of the mapped function, not a
        # constant it closes over.
        if isinstance(sym, bool):  # static
            sol, reg = one_at_a_time_on_cpu(functools.partial(alone, sym=sym))(
                problem, (f0, g0, None)
            )
        else:
            sol, reg = one_at_a_time_on_cpu(alone)(problem, (f0, g0, None), sym)
        return dataclasses.replace(sol, geom=geom), reg

    def value(sol: OTSolution, reg: Array, x, y, a, b) -> Array:
        """``reg = sol.reg_cost`` (NaN unless the solve converged, computed with the
        solve), differentiated by the envelope theorem (the dual objective at the live
        inputs): no backward linear solve is compiled or run (as ott-jax's divergence,
        ``use_danskin``)."""
        theta = (dataclasses.replace(gxy, x=x, y=y), a, b, epsilon, one, one)
        return _dual.envelope(reg, sol.f, sol.g, theta)

    if _one_compiled_solve(n, m):
        xp, yp = _pad_rows(x, size), _pad_rows(y, size)
        ap, bp = jnp.pad(a, (0, size - n)), jnp.pad(b, (0, size - m))
        stack = lambda *z: jnp.stack(z)  # noqa: E731
        args = (stack(xp, xp, yp), stack(yp, xp, yp), stack(ap, ap, bp), stack(bp, ap, bp))
        flags = jnp.asarray([False, True, True])
        # (constants before the map: differentiation then never traces the map's body)
        sols, regs = jax.lax.map(
            lambda z: solve(*z[:4], sym=z[4] if symmetric_cost else False),
            (*jax.lax.stop_gradient(args), flags),
        )
        values = jax.vmap(value)(sols, regs, *args)
        status = sols.status
    else:
        sym = symmetric_cost
        problems = [(x, y, a, b, False), (x, x, a, a, sym), (y, y, b, b, sym)]
        out = [solve(*z) for z in problems]
        values = jnp.stack([value(*o, *z[:4]) for o, z in zip(out, problems, strict=True)])
        status = jnp.stack([o[0].status for o in out])
    status = jnp.max(status)
    div = values[0] - 0.5 * (values[1] + values[2])
    div = jnp.where(status == Status.SUCCESS, jnp.maximum(div, 0.0), jnp.nan)
    return (div, status) if with_status else div
