"""Progressive entropic optimal transport (ProgOT).

Kassraie, Pooladian, Klein, Thornton, Niles-Weed & Cuturi, "Progressive Entropic
Optimal Transport Solvers", NeurIPS 2024.

Instead of one entropic problem between ``x`` and ``y``, ProgOT solves ``K`` of them
along the way from ``x`` to ``y``. With ``x^(0) = x``, for ``k = 0, ..., K - 1``:

$$ P_k = \\mathrm{OT}_{\\varepsilon_k}(x^{(k)}, y), \\qquad T_k(z) = \\frac{\\sum_j e^{(g_{k,j} - c(z, y_j))/\\varepsilon_k}\\, y_j}{\\sum_j e^{(g_{k,j} - c(z, y_j))/\\varepsilon_k}}, $$

$$ x^{(k+1)} = S_k(x^{(k)}), \\qquad S_k(z) = (1 - \\alpha_k)\\, z + \\alpha_k\\, T_k(z): $$

each step solves entropic OT from the *current* iterate ``x^(k)`` (ott-jax 0.6.0's
``ott.tools.progot`` displaces the original ``x`` instead, since its PR #650),
forms the entropic map ``T_k`` (`otlab.OTSolution.transport`, the barycentric
projection of the plan on the training points) and moves the points a fraction
``alpha_k`` of the way. The outputs are

* the coupling: the last step's plan ``P_{K-1}``; its rows are the source points in
  their original order (the iterates are the source points, displaced);
* the map of new points ``z -> T~_{K-1}(S_{K-2}(... S_0(z)))``
  (`ProgOTSolution.transport`); on the training points it is the last iterate
  ``x^(K)`` when ``alpha_{K-1} = 1`` (every named schedule).

Centered last step (``center=True``, the default; ``False`` is the paper's plain map).
The last problem is between ``x^(K-1)``, already close to ``y``, and ``y``: a nearly
self-to-self problem, whose entropic map carries the bias of an entropic self map (it
pulls points towards local means, a contraction of order ``epsilon`` times the inverse
local covariance). The last step therefore uses the centered map (Pooladian, Cuturi &
Niles-Weed, "Debiaser beware", ICML 2022)

$$ \tilde T_{K-1}(z) = T_{K-1}(z) - U(z) + z, $$

``U`` the entropic map of ``OT_{eps_{K-1}}(x^(K-1), x^(K-1))`` (one more solve, a self
problem: Sinkhorn's symmetric update). To first order in ``epsilon`` the bias cancels,
and the last step is exactly the identity when ``x^(K-1) = y``. Only the last step is
centered: centering an intermediate step moves the training iterates by the in-sample
self map (a point matched to itself) and new points by the out-of-sample one, so the
next steps are fitted on iterates that new points do not follow (measured worse, see
docs/progot.md).

Schedules. ``alphas`` is given by the travelled fraction ``t_k = 1 - prod_{j<k}
(1 - alpha_j)`` (``t_0 = 0``, ``t_K = 1``): ``"lin"`` (constant speed, ``t_k = k/K``,
``alpha_k = 1/(K - k)``), ``"quad"`` (accelerating, ``t_k = (k/K)^2``,
``alpha_k = (2k + 1)/(K^2 - k^2)``), ``"exp"`` (decelerating, ``alpha_k = 1/e`` and a
last full step ``alpha_{K-1} = 1``), or an explicit array in ``(0, 1]``.

``epsilons="auto"`` is the paper's Algorithm 4: the last epsilon is chosen by the
held-out error of the entropic map of the target onto itself — ``y`` is split (every
``holdout``-th point held out), ``OT_eps(y_train, y_train)`` is solved for each
``eps = s * eps_yy`` of a grid of scales ``s`` (``eps_yy = 0.05 *`` the mean cost of
``(y_train, y_train)``, otlab's default epsilon), and the ``eps`` whose map sends the
held-out points closest to themselves (weighted mean squared distance) wins. With
``center=True`` the map scored is the self map with its first-order bias removed as the
last step's is: the Richardson extrapolation ``(r T_eps - T_{r eps}) / (r - 1)`` of two
neighbouring scales (``r eps`` the next larger one of the grid; one more solve at twice
the largest), whose bias is ``O(eps^2)`` like the centered map's. (The centered self map
itself is the identity at every ``eps``: nothing to select.) The plain criterion trades
the plain map's ``O(eps)`` pull towards local means against its variance; once
centering removes that pull it picks too small an ``epsilon`` for the last step (the
debiased one picks 2x larger in 8-32 dimensions, 1-8x in 2-D, and lowers the map error;
docs/progot.md). The first epsilon is
``beta_0 *`` the default epsilon of ``(x, y)`` (by default ``beta_0 = 2`` with
``center=True``, the paper's 1 without); in between

$$ \\varepsilon_k = (1 - t_k)\\, \\varepsilon_{\\text{start}} + t_k\\, \\varepsilon_{\\text{end}}. $$

All of it runs under ``jit`` (a ``lax.scan`` over the grid, from the largest scale
down, each solve warm-started from the previous one; an ``argmin``); the schedule is a
choice of hyper-parameters and receives no gradient (``stop_gradient``).

Warm starts. Step ``k + 1`` starts from ``(1 - alpha_k) (f_k, g_k)``: for the squared
Euclidean cost, moving the source a fraction ``alpha`` along the map scales the
target-side Brenier potential's gradient by ``1 - alpha`` (``x' = (1-alpha) T^{-1}(y) +
alpha y``), so this is the next step's potential up to entropic terms (Sinkhorn
starts from ``g``). Starts never change answers or gradients.

Gradients. Every step is solved by `otlab.sinkhorn` or `otlab.sns`, whose potentials
are differentiated implicitly by `otlab.implicit`; the chain of steps (a
``lax.scan``) is differentiated by JAX through the iterates and the maps. ProgOT has
no differentiation mechanism of its own and no ``n x m`` code: every reduction goes
through the geometry layer and `otlab.OTSolution`'s methods.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otlab import _checks, implicit
from otlab import costs as costs_lib
from otlab.geometry import PointCloud
from otlab.solution import OTSolution, Status
from otlab.solvers.sinkhorn import _checked_sinkhorn, sinkhorn
from otlab.solvers.sns import sns

__all__ = ["ProgOTSolution", "alpha_schedule", "progot"]

Array = jax.Array

#: Default grid of scales of the target's default epsilon searched by ``epsilons="auto"``.
EPSILON_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)

#: A solver: ``"sinkhorn"``, ``"sns"`` or a static callable
#: ``solver(geom, a, b, *, epsilon, init) -> OTSolution``.
Solver = str | Callable[..., OTSolution]

#: `otlab.sinkhorn`'s keyword defaults: the centering self problem is solved with the
#: steps' options through its private symmetric mode.
_SINKHORN_DEFAULTS = {
    k: p.default for k, p in inspect.signature(sinkhorn).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}  # fmt: skip


# ----------------------------------------------------------------------- schedules


def alpha_schedule(kind: str, num_steps: int) -> np.ndarray:
    """The step sizes ``alpha_k`` of a named schedule (float64 NumPy, shape ``(K,)``).

    Args:
        kind: ``"lin"`` (constant speed, ``alpha_k = 1/(K - k)``), ``"quad"``
            (accelerating, travelled fraction ``(k/K)^2``) or ``"exp"``
            (decelerating, ``alpha_k = 1/e``, last step ``1``).
        num_steps: ``K >= 1``.

    Example:
        >>> from otlab.solvers.progot import alpha_schedule
        >>> alpha_schedule("lin", 4).tolist()
        [0.25, 0.3333333333333333, 0.5, 1.0]
    """
    _checks.choice(kind, "alphas", ("lin", "quad", "exp"))
    _checks.positive_int(num_steps, "num_steps")
    k = np.arange(num_steps, dtype=np.float64)
    if kind == "lin":
        return 1.0 / (num_steps - k)
    if kind == "quad":
        return (2.0 * k + 1.0) / (num_steps**2 - k**2)
    out = np.full(num_steps, np.exp(-1.0))
    out[-1] = 1.0
    return out


def _travelled(alphas: Array) -> Array:
    """``t_k = 1 - prod_{j<k} (1 - alpha_j)`` for ``k = 0 .. K-1`` (``t_0 = 0``)."""
    stay = jnp.cumprod(1.0 - alphas)
    return 1.0 - jnp.concatenate([jnp.ones((1,), alphas.dtype), stay[:-1]])


def _step_solver(solver: Solver, tol, max_iter, implicit_diff) -> tuple[Callable, Callable]:
    """``(solve, solve_self)``, each ``(geom, a, b, epsilon, init) -> OTSolution``, for a
    static choice of solver; ``solve_self`` is for self problems ``OT(a, a)`` (Sinkhorn's
    symmetric update when the cost is symmetric, which converges where alternating
    Sinkhorn stalls on nearly diagonal plans)."""
    if callable(solver):
        solve = lambda geom, a, b, eps, init: solver(geom, a, b, epsilon=eps, init=init)  # noqa: E731
        return solve, solve
    opts: dict[str, Any] = dict(implicit_diff=implicit_diff)
    if tol is not None:
        opts["tol"] = tol
    if max_iter is not None:
        opts["max_iter"] = max_iter
    fn = sinkhorn if solver == "sinkhorn" else sns
    solve = lambda geom, a, b, eps, init: fn(geom, a, b, epsilon=eps, init=init, **opts)  # noqa: E731
    if solver == "sns":
        return solve, solve

    def solve_self(geom, a, b, eps, init):
        if not geom.cost.symmetric:
            return solve(geom, a, b, eps, init)
        kw = {**_SINKHORN_DEFAULTS, **opts, "epsilon": eps, "init": init, "mode": "symmetric"}
        return _checked_sinkhorn(geom, a, b, **kw)

    return solve, solve_self


def _holdout_split(m: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """Static indices ``(train, held_out)``: every ``holdout``-th point is held out."""
    idx = np.arange(m)
    held = (idx % holdout) == holdout - 1
    return idx[~held], idx[held]


def _cloud(x, y, *, cost, block_size, mesh):
    """The point cloud of one problem: split by rows over ``mesh`` (`otlab.sharding`)
    when there is one and the rows divide evenly, else on one device."""
    geom = PointCloud(x, y, cost, block_size)
    if mesh is None or x.shape[0] % mesh.size:
        return geom
    from otlab import sharding

    return sharding.shard(geom, mesh)


def _end_epsilon(y, b, cloud, scales, holdout, solve, debias):
    """Algorithm 4's last epsilon and the held-out error of each scale of ``scales``.

    ``debias``: score the first-order debiased self map ``(r T_eps - T_{r eps}) / (r - 1)``
    (``r eps`` the next larger scale of the grid, ``2 eps`` above the largest: one more
    solve) instead of the plain ``T_eps``."""
    train, held = _holdout_split(y.shape[0], holdout)
    y_tr, y_ev = y[train], y[held]
    b_tr = b[train] / jnp.sum(b[train])
    w_ev = b[held] / jnp.sum(b[held])
    geom = cloud(y_tr, y_tr)
    eps_yy = 0.05 * geom.mean_cost()
    uniq = np.unique(np.asarray(scales))[::-1]  # largest first: warm starts go downhill
    solved = np.concatenate([[2.0 * uniq[0]], uniq]) if debias else uniq

    def body(g0, s):
        sol = solve(geom, b_tr, b_tr, s * eps_yy, (g0, g0))
        t = sol.transport(y_ev)
        ok = jnp.all(jnp.isfinite(t)) & jnp.all(jnp.isfinite(sol.g))
        return jnp.where(ok, sol.g, g0), jnp.where(ok, t, jnp.nan)

    g_init = jnp.zeros(y_tr.shape[0], y.dtype)
    _, maps = jax.lax.scan(body, g_init, jnp.asarray(solved, y.dtype))
    if debias:  # Richardson extrapolation: the O(eps) terms of T_eps and T_{r eps} cancel
        r = jnp.asarray(solved[:-1] / solved[1:], y.dtype)[:, None, None]
        maps = (r * maps[1:] - maps[:-1]) / (r - 1.0)
    errs = jnp.sum(w_ev * jnp.sum((maps - y_ev) ** 2, axis=-1), axis=-1)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    best = jnp.argmin(errs)
    errors = errs[np.searchsorted(-uniq, -np.asarray(scales))]  # in the order of ``scales``
    # All non-finite: the NaN propagates to the schedule and the status.
    end = jnp.where(jnp.isfinite(errs[best]), jnp.asarray(uniq, y.dtype)[best] * eps_yy, jnp.nan)
    return end, errors


def _auto_epsilons(x, y, b, alphas, cloud, start_scale, scales, holdout, solve, debias):
    x, y, b = jax.lax.stop_gradient((x, y, b))
    end, errors = _end_epsilon(y, b, cloud, scales, holdout, solve, debias)
    start = start_scale * 0.05 * cloud(x, y).mean_cost()
    t = _travelled(alphas)
    return jax.lax.stop_gradient((1.0 - t) * start + t * end), jax.lax.stop_gradient(errors)


# ------------------------------------------------------------------------ solution


def _take(tree, k):
    return jax.tree.map(lambda leaf: leaf[k], tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProgOTSolution:
    """What `progot` returns: the ``K`` steps, the iterates and the schedules.

    Attributes:
        steps: the per-step `OTSolution` objects stacked along a leading axis of length
            ``K`` (``steps.f``, ``steps.g``, ``steps.epsilon``, ``steps.status``,
            ``steps.n_iter``, ...; ``steps.geom.x[k]`` is ``x^(k)``). `step` takes one.
        centering: ``center=True``: the self problem ``OT(x^(K-1), x^(K-1))`` at the
            last epsilon, whose map ``U`` centers the last step's; ``None`` otherwise.
        xs: ``(K + 1, n, d)`` iterates ``x^(0) = x, ..., x^(K)``.
        alphas: ``(K,)`` step sizes.
        epsilons: ``(K,)`` entropic regularisations.
        selection_errors: held-out map error of each scale of ``epsilon_scales``
            (``epsilons="auto"``): of the debiased self map with ``center=True``, of
            the plain one otherwise; empty for an explicit schedule.
        status: overall `Status`: the worst step's (INFEASIBLE > NONFINITE >
            MAX_ITER > SUCCESS), NONFINITE if an iterate or epsilon is not finite.
    """

    steps: OTSolution
    centering: OTSolution | None
    xs: Array
    alphas: Array
    epsilons: Array
    selection_errors: Array
    status: Array

    @property
    def num_steps(self) -> int:
        """``K``."""
        return self.alphas.shape[-1]

    @property
    def converged(self) -> Array:
        """Every step converged and every iterate is finite."""
        return self.status == Status.SUCCESS

    @property
    def n_iter(self) -> Array:
        """``(K,)`` iterations of each step's solver."""
        return self.steps.n_iter

    def step(self, k: int) -> OTSolution:
        """The `OTSolution` of step ``k`` (between ``x^(k)`` and ``y``)."""
        return _take(self.steps, k)

    @property
    def last(self) -> OTSolution:
        """The last step's solution: its plan is the coupling."""
        return self.step(self.num_steps - 1)

    def plan(self) -> Array:
        """The dense ``(n, m)`` coupling ``P_{K-1}`` (rows: the source points in order)."""
        return self.last.plan()

    def apply(self, v: Array, axis: int = 1) -> Array:
        """Multiply by the coupling without building it (`OTSolution.apply`)."""
        return self.last.apply(v, axis)

    def transport(self, z: Array) -> Array:
        """ProgOT map of points ``z`` (``(k, d)``): ``T~_{K-1}(S_{K-2}(... S_0(z)))``.

        Points are moved through the steps as the training points were; new points
        only read the potentials. ``T~_{K-1}`` is the last step's map, centered when
        `centering` is set. On ``z = x`` with ``alphas[-1] == 1`` it returns the last
        iterate ``xs[-1]``.
        """
        z = jnp.atleast_2d(z)

        def body(carry, step):
            z, _, _ = carry
            sol, alpha = step
            t = sol.transport(z)
            return ((1.0 - alpha) * z + alpha * t, z, t), None

        # the carry ends with the last step's input z^(K-1) and T_{K-1}(z^(K-1))
        (_, z, t), _ = jax.lax.scan(body, (z, z, z), (self.steps, self.alphas))
        return t if self.centering is None else t - self.centering.transport(z) + z

    @property
    def cost(self) -> Array:
        """``<C(x, y), P_{K-1}>``: the coupling priced on the original source points."""
        last = self.last
        return last.geom.plan_cost_at(last.f, last.g, last.epsilon, self.xs[0])


# ------------------------------------------------------------------------- solver


@functools.partial(
    jax.jit,
    static_argnames=(
        "auto", "block_size", "solver", "tol", "max_iter", "warm_start", "epsilon_scales",
        "holdout", "center", "implicit_diff", "mesh",
    ),
)  # fmt: skip
def _progot(
    x, y, a, b, alphas, epsilons, cost, epsilon_start_scale, *, auto, block_size, solver, tol,
    max_iter, warm_start, epsilon_scales, holdout, center, implicit_diff, mesh,
):  # fmt: skip
    solve, solve_self = _step_solver(solver, tol, max_iter, implicit_diff)
    cloud = functools.partial(_cloud, cost=cost, block_size=block_size, mesh=mesh)
    if auto:
        epsilons, sel_errors = _auto_epsilons(
            x, y, b, alphas, cloud, epsilon_start_scale, epsilon_scales, holdout, solve_self, center
        )
    else:
        sel_errors = jnp.zeros((0,), x.dtype)

    def step(carry, inp):
        xk, f0, g0 = carry
        alpha, eps = inp
        sol = solve(cloud(xk, y), a, b, eps, (f0, g0))
        x_next = (1.0 - alpha) * xk + alpha * sol.transport(xk)
        if warm_start:
            f0, g0 = (1.0 - alpha) * sol.f, (1.0 - alpha) * sol.g
        return (x_next, f0, g0), (sol, xk)

    carry = (x, jnp.zeros(a.shape, x.dtype), jnp.zeros(b.shape, x.dtype))
    (x_last, _, _), (steps, xs) = jax.lax.scan(step, carry, (alphas, epsilons))
    status = jnp.max(steps.status)
    centering = None
    if center:  # the last step's map minus the self map of its source
        last = _take(steps, -1)
        centering = solve_self(cloud(xs[-1], xs[-1]), a, a, epsilons[-1], (last.f, last.f))
        # x^(K) = x^(K-1) + alpha_{K-1} (T_{K-1} - U)(x^(K-1))
        x_last = xs[-1] + alphas[-1] * (last.transport(xs[-1]) - centering.transport(xs[-1]))
        status = jnp.maximum(status, centering.status)
    xs = jnp.concatenate([xs, x_last[None]], axis=0)
    finite = jnp.all(jnp.isfinite(xs)) & jnp.all(jnp.isfinite(epsilons))
    status = jnp.where(finite, status, jnp.maximum(status, Status.NONFINITE))
    status = jnp.where(jnp.any(epsilons <= 0), Status.INFEASIBLE, status).astype(jnp.int32)
    return ProgOTSolution(steps, centering, xs, alphas, epsilons, sel_errors, status)


def _schedule_array(value, name: str, num_steps: int, dtype, upper: float | None):
    """An explicit schedule: shape ``(K,)``, values in ``(0, upper]`` when concrete."""
    arr = value.astype(dtype) if isinstance(value, jax.core.Tracer) else jnp.asarray(value, dtype)
    if arr.shape != (num_steps,):
        raise ValueError(
            f"`{name}` must have shape ({num_steps},) (one per step, num_steps={num_steps}); "
            f"got {arr.shape}."
        )
    if _checks._concrete(arr):
        v = np.asarray(arr)
        bad = ~np.isfinite(v) | (v <= 0) | ((v > upper) if upper is not None else False)
        if np.any(bad):
            rng = f"(0, {upper}]" if upper is not None else "(0, inf)"
            raise ValueError(f"`{name}` must have every entry in {rng}; got {v.tolist()}.")
    return arr


def progot(
    x: Array,
    y: Array,
    a: Array | None = None,
    b: Array | None = None,
    *,
    num_steps: int,
    alphas: str | Array = "lin",
    epsilons: str | Array = "auto",
    cost: costs_lib.CostLike = None,
    block_size: int | None = None,
    solver: Solver = "sinkhorn",
    tol: float | None = None,
    max_iter: int | None = None,
    warm_start: bool = True,
    epsilon_start_scale: float | Array | None = None,
    epsilon_scales: tuple[float, ...] = EPSILON_SCALES,
    holdout: int = 5,
    center: bool = True,
    implicit_diff: implicit.ImplicitDiff = implicit.DEFAULT,
    mesh: Any = None,
) -> ProgOTSolution:
    """Progressive entropic OT between point clouds (see the module docstring).

    Args:
        x: ``(n, d)`` source points (traced).
        y: ``(m, d)`` target points (traced).
        a: ``(n,)`` source weights (traced); default uniform.
        b: ``(m,)`` target weights (traced); default uniform. Balanced: equal masses.
        num_steps: static ``K >= 1``.
        alphas: ``"lin"``, ``"quad"``, ``"exp"`` (static) or a ``(K,)`` array in
            ``(0, 1]`` (traced).
        epsilons: ``"auto"`` (Algorithm 4, under ``jit``) or a ``(K,)`` positive
            array (traced, differentiable).
        cost: ground cost (see `otlab.PointCloud`); default squared Euclidean.
        block_size: static. ``None``: dense; an int: online point clouds.
        solver: static. ``"sinkhorn"`` (`otlab.sinkhorn`), ``"sns"`` (`otlab.sns`)
            or a callable ``solver(geom, a, b, *, epsilon, init) -> OTSolution``
            (e.g. a ``functools.partial`` of either with its own options).
        tol: static. The named solver's ``tol`` (``None``: its default).
        max_iter: static. The named solver's ``max_iter`` (``None``: its default).
        warm_start: static. Start step ``k + 1`` from ``(1 - alpha_k)`` times the
            potentials of step ``k`` (otherwise from zeros).
        epsilon_start_scale: ``beta_0`` of ``epsilons="auto"`` (traced): the first
            epsilon is ``beta_0 * 0.05 * mean C(x, y)``. Default (``None``): 2 with
            ``center=True`` (ott-jax: 1): the early steps' errors are refitted by the
            later ones, which start from the displaced points, so a smoother first map
            pays (measured on the benchmark: lower error on 58 of 75 cells, higher in
            32-D, still 0.3-0.7x the one-shot map's; docs/progot.md); 1, the paper's,
            with ``center=False``, whose plain last step it does not suit (2-D
            Gaussian, K = 2: map error 0.055 at 2 against 0.030 at 1).
        epsilon_scales: static grid of scales of the target's default epsilon
            searched by ``epsilons="auto"``.
        holdout: static. ``epsilons="auto"`` holds out every ``holdout``-th target
            point to measure map errors (``2 <= holdout <= m``).
        center: static. Center the last step's map: ``T_{K-1}(z) - U(z) + z`` with ``U``
            the entropic self map of ``x^(K-1)`` at ``epsilons[-1]`` (one more solve,
            a self problem); ``False``: the paper's plain ``T_{K-1}``. It also sets
            the criterion of ``epsilons="auto"``: the held-out error of the debiased
            (Richardson-extrapolated) self map when centered, of the plain self map
            (the paper's) when not.
        implicit_diff: static options of the per-step implicit differentiation.
        mesh: static ``jax.sharding.Mesh`` or ``None``. With a mesh every step's
            problem, and the centering self problem, runs with the iterate's rows split
            over the mesh's devices (`otlab.sharding.shard`: only vectors of length
            ``n`` or ``m`` cross devices); ``n`` must be a multiple of ``mesh.size``.
            The target's self problems of ``epsilons="auto"`` are split too when their
            ``m - m // holdout`` rows divide evenly, else run on every device.

    Returns:
        ProgOTSolution: the coupling (`ProgOTSolution.plan`), the map
        (`ProgOTSolution.transport`), the steps, iterates and schedules.

    Raises:
        ValueError: on bad shapes or options, schedules of the wrong length or with
            values outside their range, and — for concrete inputs — the weight
            errors of `otlab.sinkhorn`. Under ``jit`` value errors become ``status``
            codes instead.

    Example:
        >>> import jax, otlab
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 2))
        >>> y = 0.5 * jax.random.normal(ky, (250, 2)) + 2.0
        >>> sol = otlab.progot(x, y, num_steps=4)
        >>> bool(sol.converged), sol.xs.shape, sol.plan().shape
        (True, (5, 200, 2), (200, 250))
        >>> bool(jax.numpy.allclose(sol.transport(x), sol.xs[-1], atol=1e-5))
        True
    """
    x = x if isinstance(x, jax.core.Tracer) else jnp.asarray(x)
    y = y if isinstance(y, jax.core.Tracer) else jnp.asarray(y)
    for name, arr in (("x", x), ("y", y)):
        if arr.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D (points, dim); got shape {arr.shape}.")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`x` and `y` must have the same dimension; got {x.shape[1]} and {y.shape[1]}."
        )
    dtype = jnp.result_type(x, y)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`x` and `y` must be floating-point; got {dtype}.")
    x, y = x.astype(dtype), y.astype(dtype)
    n, m = x.shape[0], y.shape[0]
    a = _checks.weights(a, n, "a", dtype)
    b = _checks.weights(b, m, "b", dtype)
    _checks.masses(a, b, jnp.asarray(1.0), jnp.asarray(1.0))
    _checks.positive_int(num_steps, "num_steps")
    if isinstance(alphas, str):
        alphas = alpha_schedule(alphas, num_steps)
    alphas = _schedule_array(alphas, "alphas", num_steps, dtype, upper=1.0)
    auto = isinstance(epsilons, str)
    if auto:
        _checks.choice(epsilons, "epsilons", ("auto",))
        epsilons = None
    else:
        epsilons = _schedule_array(epsilons, "epsilons", num_steps, dtype, upper=None)
    if not callable(solver):
        _checks.choice(solver, "solver", ("sinkhorn", "sns"))
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be a positive float or None; got {tol!r}.")
    if max_iter is not None:
        _checks.positive_int(max_iter, "max_iter")
    if block_size is not None:
        _checks.positive_int(block_size, "block_size")
    if epsilon_start_scale is None:
        epsilon_start_scale = 2.0 if center else 1.0
    epsilon_start_scale = _checks.positive_scalar(
        epsilon_start_scale, "epsilon_start_scale", dtype
    )
    scales = tuple(float(s) for s in np.atleast_1d(np.asarray(epsilon_scales, np.float64)))
    if not scales or not all(np.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"`epsilon_scales` must be non-empty and positive; got {epsilon_scales!r}.")
    if not isinstance(holdout, (int, np.integer)) or not 2 <= holdout <= m:
        raise ValueError(f"`holdout` must be an int in [2, m={m}]; got {holdout!r}.")
    if not isinstance(implicit_diff, implicit.ImplicitDiff):
        raise ValueError("`implicit_diff` must be an otlab.ImplicitDiff.")
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"`mesh` must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
        if n % mesh.size:
            raise ValueError(
                f"`x` has {n} points, which must be a multiple of the mesh's {mesh.size} "
                "devices when `mesh` is given (pad with zero-weight points: otlab.pad_batch)."
            )
    return _progot(
        x, y, a, b, alphas, epsilons, costs_lib.as_cost(cost), epsilon_start_scale,
        auto=auto, block_size=block_size, solver=solver,
        tol=None if tol is None else float(tol), max_iter=None if max_iter is None else int(max_iter),
        warm_start=bool(warm_start), epsilon_scales=scales, holdout=int(holdout),
        center=bool(center), implicit_diff=implicit_diff, mesh=mesh,
    )  # fmt: skip
