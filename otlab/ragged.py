"""Ragged batches: problems of different sizes solved together under ``jax.vmap``.

`pad_batch` pads every problem to common sizes ``(N, M)``: padded points copy the
problem's first point (a finite cost for every ground cost) and get weight zero. A
zero-weight point is exact in entropic OT: its potential goes to ``eps log(tiny)``, so
its row (column) of the plan is at most ``tiny`` and the real problem's potentials,
costs and marginals are unchanged up to rounding. Padded target potentials start at
that value (real ones at zero), so that from a zero start the iterates are those of
the problem solved alone (an unbalanced problem's start is then shifted by the solver's
translation of a given start, which changes the path, not the solution).

`solve_ragged` pads the problems to common sizes (or, with ``buckets``, groups them
into size buckets, problems of similar sizes together, the grouping that pads least,
and pads each bucket to its own largest sizes), solves each stack in one compiled solver call (one compilation per
padded shape; vmapped, or on CPU mapped, below) and returns a `RaggedSolution`:
per-problem status, costs and potentials on the real points, each problem the same as
solved alone, in the order of the input.

Under ``vmap`` (``batch_size=None``) the solver's ``while_loop`` runs until the slowest
problem converges; converged problems keep their state (each has its own ``n_iter`` and
``status``). On CPU the default runs the problems one after the other inside the one
compiled program (``jax.lax.map``): a problem's kernel stays in cache over its
iterations, where a vmapped product streams every problem's kernel from memory.

Example:
    >>> import jax, otlab
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> xs = [jax.random.normal(k, (n, 2)) for k, n in zip(keys, (20, 35, 50))]
    >>> ys = [x[::-1] + 1.0 for x in xs]
    >>> res = otlab.solve_ragged(xs, ys, epsilon=0.1)
    >>> len(res), [r.f.shape for r in res]
    (3, [(20,), (35,), (50,)])
    >>> alone = otlab.sinkhorn(otlab.PointCloud(xs[1], ys[1]), epsilon=0.1)
    >>> bool(abs(res[1].reg_cost - alone.reg_cost) < 1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otlab import costs as costs_lib
from otlab import geometry as geometry_lib
from otlab.geometry import PointCloud
from otlab.solution import OTSolution
from otlab.solvers.sinkhorn import sinkhorn

__all__ = ["PaddedBatch", "RaggedSolution", "pad_batch", "solve_ragged"]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Problems of different sizes padded to common sizes ``(N, M)`` and stacked.

    Attributes:
        x: ``(B, N, d)`` source points; rows ``>= n[k]`` of problem ``k`` are padding.
        y: ``(B, M, d)`` target points; rows ``>= m[k]`` are padding.
        a: ``(B, N)`` source weights, zero on padding.
        b: ``(B, M)`` target weights, zero on padding.
        n: static tuple of the real source sizes.
        m: static tuple of the real target sizes.
    """

    x: Array
    y: Array
    a: Array
    b: Array
    n: tuple[int, ...] = geometry_lib._static()
    m: tuple[int, ...] = geometry_lib._static()

    def __len__(self) -> int:
        return len(self.n)

    @property
    def mask_x(self) -> Array:
        """``(B, N)`` booleans, true on real source points."""
        return jnp.arange(self.x.shape[1])[None, :] < jnp.asarray(self.n)[:, None]

    @property
    def mask_y(self) -> Array:
        """``(B, M)`` booleans, true on real target points."""
        return jnp.arange(self.y.shape[1])[None, :] < jnp.asarray(self.m)[:, None]


def _round_up(k: int, multiple: int) -> int:
    return -(-k // multiple) * multiple


def _concrete(arrs) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in arrs)


def _pad_points(pts: Sequence[Any], name: str, size: int | None, multiple: int):
    # Concrete inputs are padded in NumPy: eager jnp ops compile one small program per
    # new shape (measured 22 s for 32 problems of different sizes, the solve's ~5 s).
    concrete = _concrete(pts)
    arrs = [np.asarray(p) if concrete else jnp.asarray(p) for p in pts]
    for i, p in enumerate(arrs):
        if p.ndim != 2 or p.shape[0] == 0:
            raise ValueError(f"`{name}[{i}]` must be a non-empty 2-D array (points, dim); got {p.shape}.")
    if len({p.shape[1] for p in arrs}) > 1:
        raise ValueError(f"all `{name}` must have the same dimension; got {[p.shape[1] for p in arrs]}.")
    sizes = tuple(int(p.shape[0]) for p in arrs)
    top = _round_up(max(sizes), multiple)
    if size is not None:
        if size < max(sizes):
            raise ValueError(f"the padded size for `{name}` ({size}) is below the largest problem ({max(sizes)}).")
        top = _round_up(size, multiple)
    # padding repeats the first point: a finite cost for every ground cost
    xp = np if concrete else jnp
    out = xp.stack(
        [xp.concatenate([p, xp.broadcast_to(p[:1], (top - p.shape[0], p.shape[1]))]) for p in arrs]
    )
    return out, sizes


def _pad_weights(ws, sizes, top: int, name: str, dtype, host: bool = False):
    if ws is None:
        ws = [np.full((k,), 1.0 / k) for k in sizes]
    if len(ws) != len(sizes):
        raise ValueError(f"`{name}` must have one weight vector per problem ({len(sizes)}); got {len(ws)}.")
    concrete = _concrete(ws)
    xp = np if concrete else jnp
    out = []
    for i, (w, k) in enumerate(zip(ws, sizes, strict=True)):
        w = np.asarray(w) if concrete else jnp.asarray(w, dtype)
        if w.shape != (k,):
            raise ValueError(f"`{name}[{i}]` must have shape ({k},); got {w.shape}.")
        if concrete and not bool(np.all(np.isfinite(w) & (w >= 0))):
            raise ValueError(f"`{name}[{i}]` must be finite and non-negative.")
        out.append(xp.pad(w, (0, top - k)))
    return (np.asarray if host and concrete else jnp.asarray)(xp.stack(out), dtype)


def pad_batch(
    xs: Sequence[Array],
    ys: Sequence[Array],
    a: Sequence[Array] | None = None,
    b: Sequence[Array] | None = None,
    *,
    n_max: int | None = None,
    m_max: int | None = None,
    multiple: int = 1,
) -> PaddedBatch:
    """Pad point clouds of different sizes into one stacked batch.

    Args:
        xs: ``B`` source clouds, ``(n_k, d)`` each.
        ys: ``B`` target clouds, ``(m_k, d)`` each.
        a: ``B`` source weight vectors, default uniform per problem.
        b: ``B`` target weight vectors, default uniform per problem.
        n_max: padded source size (default the largest ``n_k``).
        m_max: padded target size (default the largest ``m_k``).
        multiple: round the padded sizes up to a multiple of this (fewer distinct
            shapes, hence compilations, across batches; a multiple of the device
            count for `otlab.sharding`).

    Returns:
        PaddedBatch: stacked points and weights; padding has weight zero and sits
        on the problem's first point. Differentiable in the points and weights.

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> batch = otlab.pad_batch([jnp.zeros((3, 2)), jnp.ones((5, 2))],
        ...                         [jnp.ones((4, 2)), jnp.zeros((2, 2))], multiple=4)
        >>> batch.x.shape, batch.y.shape, batch.n, batch.m
        ((2, 8, 2), (2, 4, 2), (3, 5), (4, 2))
        >>> batch.a[0].tolist()
        [0.3333333432674408, 0.3333333432674408, 0.3333333432674408, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    return _pad_batch(xs, ys, a, b, n_max=n_max, m_max=m_max, multiple=multiple)


def _pad_batch(xs, ys, a=None, b=None, *, n_max=None, m_max=None, multiple=1, host=False) -> PaddedBatch:
    """`pad_batch`; with ``host``, concrete inputs stay NumPy arrays (`solve_ragged` cuts
    its size buckets from them on the host, and each bucket goes to the device once)."""
    if len(xs) != len(ys) or len(xs) == 0:
        raise ValueError(f"`xs` and `ys` must be non-empty and of equal length; got {len(xs)} and {len(ys)}.")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"`multiple` must be a positive int; got {multiple!r}.")
    x, n = _pad_points(xs, "xs", n_max, multiple)
    y, m = _pad_points(ys, "ys", m_max, multiple)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"`xs` and `ys` must have the same dimension; got {x.shape[-1]} and {y.shape[-1]}.")
    dtype = jnp.result_type(x, y)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    host = host and _concrete((x, y))
    to_array = np.asarray if host else jnp.asarray
    x, y = to_array(x, dtype), to_array(y, dtype)
    return PaddedBatch(
        x, y, _pad_weights(a, n, x.shape[1], "a", dtype, host), _pad_weights(b, m, y.shape[1], "b", dtype, host),
        n, m,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedSolution:
    """The solutions of a ragged batch.

    ``res[k]`` is problem ``k``'s `otlab.OTSolution` on its real points only (its
    geometry, weights and potentials trimmed), as if solved alone. The batched
    properties give one value per problem, in the order of the input, without trimming.

    Attributes:
        solutions: one batched `otlab.OTSolution` per size bucket (padded problems).
        n: static tuple of the real source sizes.
        m: static tuple of the real target sizes.
        where: static tuple, per problem, of ``(bucket, position in the bucket)``.
    """

    solutions: tuple[OTSolution, ...]
    n: tuple[int, ...] = geometry_lib._static()
    m: tuple[int, ...] = geometry_lib._static()
    where: tuple[tuple[int, int], ...] = geometry_lib._static()

    def __len__(self) -> int:
        return len(self.n)

    @property
    def solution(self) -> OTSolution:
        """The batched `otlab.OTSolution` of the padded problems (one bucket only)."""
        if len(self.solutions) != 1:
            raise ValueError(
                f"this batch was solved in {len(self.solutions)} size buckets: use "
                "`.solutions` (one batched solution per bucket), `res[k]` or the batched properties."
            )
        return self.solutions[0]

    def __getitem__(self, k: int) -> OTSolution:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k = k % len(self)
        bucket, pos = self.where[k]
        s = jax.tree.map(lambda leaf: leaf[pos], self.solutions[bucket])
        n, m = self.n[k], self.m[k]
        geom = s.geom
        geom = PointCloud(geom.x[:n], geom.y[:m], geom.cost, geom.block_size)
        return dataclasses.replace(s, f=s.f[:n], g=s.g[:m], geom=geom, a=s.a[:n], b=s.b[:m])

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def _gather(self, per_bucket: list[Array]) -> Array:
        """Per-bucket ``(B_b,)`` arrays as one ``(B,)`` array in input order."""
        if len(per_bucket) == 1:
            return per_bucket[0]
        starts = np.cumsum([0] + [len(v) for v in per_bucket])
        return jnp.concatenate(per_bucket)[np.asarray([starts[b] + p for b, p in self.where])]

    def _map(self, fn):
        return self._gather([jax.vmap(fn)(sol) for sol in self.solutions])

    @property
    def status(self) -> Array:
        """``(B,)`` status codes."""
        return self._gather([sol.status for sol in self.solutions])

    @property
    def converged(self) -> Array:
        """``(B,)`` booleans."""
        return self._gather([sol.converged for sol in self.solutions])

    @property
    def n_iter(self) -> Array:
        """``(B,)`` iterations run per problem."""
        return self._gather([sol.n_iter for sol in self.solutions])

    @property
    def reg_cost(self) -> Array:
        """``(B,)`` entropic objectives (padding contributes nothing)."""
        return self._map(lambda s: s.reg_cost)

    @property
    def cost(self) -> Array:
        """``(B,)`` transport costs ``<C, P>``."""
        return self._map(lambda s: s.cost)


def _masked_mean_cost(geom: PointCloud, mx: Array, my: Array) -> Array:
    """Mean cost over the real pairs (what a solver's default epsilon uses alone)."""
    mx, my = mx.astype(geom.dtype), my.astype(geom.dtype)
    if geom.is_online:
        rows = geometry_lib._map_blocks(
            lambda xb, mb: mb * (geom._cost_rows(xb) @ my), geom._pass_rows, (geom.x, mx)
        )
        total = jnp.sum(rows)
    else:
        total = mx @ geom.cost_matrix @ my
    return total / (jnp.sum(mx) * jnp.sum(my))


#: Bytes of kernels (``n x m`` matrices) that one vmapped chunk may hold on CPU under
#: ``batch_size="auto"``: the L2 cache of a core of the 2-core machine of
#: `benchmarks/bench_scale.py`.
AUTO_CHUNK_BYTES = 1 << 20


def _auto_batch_size(batch: PaddedBatch) -> int | None:
    """``None`` (one vmap) off CPU or when the whole batch's kernels fit
    `AUTO_CHUNK_BYTES`; else chunks of as many problems as fit (at least one)."""
    if jax.default_backend() != "cpu":
        return None
    per_problem = batch.x.shape[1] * batch.y.shape[1] * batch.x.dtype.itemsize
    fits = max(1, AUTO_CHUNK_BYTES // per_problem)
    return None if fits >= len(batch) else int(fits)


#: Largest number of size buckets that ``buckets="auto"`` uses (one compilation each).
AUTO_MAX_BUCKETS = 8
#: ``buckets="auto"``: the fewest buckets whose padded entries are within this factor of
#: the real problems' (up to `AUTO_MAX_BUCKETS`).
AUTO_PADDING = 1.3


def _sub_batch(batch: PaddedBatch, idx: Sequence[int], multiple: int) -> PaddedBatch:
    """Problems ``idx`` of a padded batch, cut to their own largest sizes (rounded up
    to ``multiple``): the same layout as `pad_batch` of those problems alone."""
    n, m = tuple(batch.n[k] for k in idx), tuple(batch.m[k] for k in idx)
    rows, cols, pick = _round_up(max(n), multiple), _round_up(max(m), multiple), np.asarray(idx)
    return PaddedBatch(
        batch.x[pick, :rows], batch.y[pick, :cols], batch.a[pick, :rows], batch.b[pick, :cols], n, m
    )


@functools.lru_cache(maxsize=64)
def _partition(n: tuple[int, ...], m: tuple[int, ...], buckets: int | str, multiple: int) -> tuple[tuple[int, ...], ...]:
    """Problems grouped into size buckets, each padded to its own largest ``(n, m)``.

    Minimises the padded entries ``sum(len(group) * N * M)`` for each number of
    groups: problems sorted by ``n * m`` are cut into contiguous groups by dynamic
    programming, then single problems move to the group where they add the fewest
    padded entries while that lowers the total (`_improve`; a cut in ``n * m`` order
    puts a 500 x 50 problem beside a 50 x 500 one). ``"auto"``: the fewest groups
    within `AUTO_PADDING` times the real entries, at most `AUTO_MAX_BUCKETS`. Depends
    only on the (static) sizes, and cached on them (a repeated batch of the same sizes
    does not search again)."""
    count = len(n)
    top = min(count, AUTO_MAX_BUCKETS if buckets == "auto" else int(buckets))
    order = sorted(range(count), key=lambda k: (n[k] * m[k], n[k], k))
    rn = [_round_up(k, multiple) for k in n]
    rm = [_round_up(k, multiple) for k in m]
    sn, sm = [rn[k] for k in order], [rm[k] for k in order]

    def padded(i: int, j: int) -> int:  # order[i:j] as one bucket
        return (j - i) * max(sn[i:j]) * max(sm[i:j])

    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(top + 1)]  # best[g][j]: order[:j] in g groups
    cut = [[0] * (count + 1) for _ in range(top + 1)]
    best[0][0] = 0
    for g in range(1, top + 1):
        for j in range(g, count + 1):
            for i in range(g - 1, j):
                v = best[g - 1][i] + padded(i, j)
                if v < best[g][j]:
                    best[g][j], cut[g][j] = v, i

    def groups_of(g: int) -> list[list[int]]:
        bounds, j = [], count
        for h in range(g, 0, -1):
            bounds.append((cut[h][j], j))
            j = cut[h][j]
        return _improve([[order[t] for t in range(i, j)] for i, j in reversed(bounds)], rn, rm)

    options = {g: groups_of(g) for g in range(1, top + 1)}
    total = {g: _padded_entries(options[g], rn, rm) for g in options}
    if buckets == "auto":
        real = sum(a * b for a, b in zip(rn, rm, strict=True))
        fits = [g for g in options if total[g] <= AUTO_PADDING * real]
        chosen = fits[0] if fits else min(options, key=lambda g: total[g])
    else:  # the fewest with the least padding
        chosen = min(options, key=lambda g: (total[g], g))
    return tuple(map(tuple, options[chosen]))


def _bucket_entries(g: Sequence[int], n: Sequence[int], m: Sequence[int]) -> int:
    """Padded entries of problems ``g`` as one bucket (0 for none)."""
    return len(g) * max(n[k] for k in g) * max(m[k] for k in g) if g else 0


def _padded_entries(groups: Sequence[Sequence[int]], n: Sequence[int], m: Sequence[int]) -> int:
    return sum(_bucket_entries(g, n, m) for g in groups)


def _improve(groups: list[list[int]], n: Sequence[int], m: Sequence[int]) -> list[list[int]]:
    """Local search on a partition: move one problem at a time to the group where the
    total padded entries fall the most, until no move lowers them (each move lowers an
    integer total: it ends). No group is emptied. Groups in order of their sizes."""
    groups = [list(g) for g in groups]

    def cost(g):
        return _bucket_entries(g, n, m)

    moved = len(groups) > 1
    while moved:
        moved = False
        for s in range(len(groups)):
            for k in list(groups[s]):
                if len(groups[s]) == 1:
                    break
                rest = [q for q in groups[s] if q != k]
                freed = cost(groups[s]) - cost(rest)
                gain, to = max(
                    (freed - cost(groups[t] + [k]) + cost(groups[t]), t) for t in range(len(groups)) if t != s
                )
                if gain > 0:
                    groups[s], moved = rest, True
                    groups[to].append(k)
    return sorted((sorted(g) for g in groups), key=lambda g: (max(n[k] * m[k] for k in g), g))


def _is_count(v) -> bool:
    """An integer >= 1 (NumPy integers too; not a bool)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


#: solver options that the solvers trace (a new value does not recompile)
_TRACED = ("tau_a", "tau_b", "epsilon_init")


def _is_arrays(v) -> bool:
    leaves = jax.tree.leaves(v)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)


@functools.partial(jax.jit, static_argnames=("solver", "block_size", "static", "batch_size"))
def _solve_padded(batch, cost, eps, traced, *, solver, block_size, static, batch_size=None):
    """One compiled program per padded shape: the vmapped solver over the batch."""

    def one(x, y, a, b, mx, my, eps):
        geom = PointCloud(x, y, cost, block_size)
        if eps is None:
            eps = 0.05 * jax.lax.stop_gradient(_masked_mean_cost(geom, mx, my))
        kwargs = {**dict(static), **traced}
        if kwargs.get("init") is None:
            # Zero potentials on the real points. A padded column starts at
            # eps * log(tiny), where a solve would put it after one half-step: from
            # zero it would count as a copy of its point in the first update of f.
            tiny = jnp.log(jnp.finfo(geom.dtype).tiny)
            kwargs["init"] = (jnp.zeros_like(a), jnp.where(my, 0.0, eps * tiny).astype(b.dtype))
        return solver(geom, a, b, epsilon=eps, **kwargs)

    args = (batch.x, batch.y, batch.a, batch.b, batch.mask_x, batch.mask_y)
    if batch_size is None:
        in_axes = (0, 0, 0, 0, 0, 0, None if eps is None else 0)
        return jax.vmap(one, in_axes=in_axes)(*args, eps)
    # (batch_size=1: a plain scan of the solver, not of its vmap over one problem)
    chunk = None if batch_size == 1 else batch_size
    if eps is None:
        return jax.lax.map(lambda t: one(*t, None), args, batch_size=chunk)
    return jax.lax.map(lambda t: one(*t), (*args, eps), batch_size=chunk)


def solve_ragged(
    xs: Sequence[Array] | PaddedBatch,
    ys: Sequence[Array] | None = None,
    a: Sequence[Array] | None = None,
    b: Sequence[Array] | None = None,
    *,
    solver: Callable[..., OTSolution] = sinkhorn,
    cost: costs_lib.CostLike = None,
    block_size: int | None = None,
    epsilon: float | Array | None = None,
    multiple: int = 1,
    batch_size: int | str | None = "auto",
    buckets: int | str = 1,
    **solver_kwargs: Any,
) -> RaggedSolution:
    """Solve OT problems of different sizes together in one compiled solver call.

    Args:
        xs: ``B`` source clouds ``(n_k, d)``, or a `PaddedBatch` (then ``ys``,
            ``a``, ``b`` and ``multiple`` are not given).
        ys: ``B`` target clouds ``(m_k, d)``.
        a: ``B`` source weight vectors, default uniform.
        b: ``B`` target weight vectors, default uniform.
        solver: an otlab solver with the signature of `otlab.sinkhorn`
            (`otlab.sinkhorn`, `otlab.sns`).
        cost: ground cost shared by all problems (see `otlab.PointCloud`).
        block_size: online block size, or ``None`` for dense geometries.
        epsilon: a scalar or ``(B,)`` values; default per problem ``0.05 *`` the
            mean cost over its real points (the solvers' own default).
        multiple: as in `pad_batch`.
        batch_size: static. ``None``: one `jax.vmap` over all problems (every
            problem's loop runs until the slowest converges; the batch's products
            stream through all kernels at once: the choice for accelerators). An
            integer ``k``: a sequential `jax.lax.map` over chunks of ``k`` problems,
            each chunk vmapped (``1``: one problem at a time, its kernel in cache and
            its loop stopping at its own convergence: 3.5x faster than ``None`` on
            CPU for 32 problems of up to 500 x 500, `benchmarks/bench_scale.py`).
            ``"auto"``: ``None`` off CPU, or when all the padded kernels fit
            `AUTO_CHUNK_BYTES` (1 MiB); else chunks of as many problems as fit
            (at least one). Same results either way.
        buckets: static. Problems are grouped by size and each group is padded to
            its own largest sizes and solved in its own compiled call (one
            compilation per distinct padded shape). An integer: at most that many
            groups, chosen to minimise the padded entries (``1``, the default:
            everything padded to the largest problem, one compilation). ``"auto"``:
            the fewest groups (at most `AUTO_MAX_BUCKETS`, 8) whose padded entries are
            within `AUTO_PADDING` (1.3x) of the real ones: for repeated solves of the
            same sizes (32 problems of 50 to 500 points: 8 groups, 1.5x faster warm
            than one group and 1.05-1.15x faster than a loop of solves, but 12x the
            compile time of one group; `benchmarks/bench_scale.py`).
            Ignored for a `PaddedBatch`.
        **solver_kwargs: static options and scalars passed to every solve (``tol``,
            ``max_iter``, ``tau_a``, ...).

    Returns:
        RaggedSolution: ``res[k]`` equals ``solver(PointCloud(xs[k], ys[k]), a[k],
        b[k], ...)`` up to rounding (potentials on the real points, costs, status).

    Example:
        >>> import jax, otlab
        >>> xs = [jax.random.normal(jax.random.key(k), (10 * k + 10, 2)) for k in range(3)]
        >>> res = otlab.solve_ragged(xs, [x[::-1] + 1.0 for x in xs], epsilon=1.0)
        >>> res.converged.tolist(), res.reg_cost.shape
        ([True, True, True], (3,))
    """
    if buckets != "auto" and not _is_count(buckets):
        raise ValueError(f"`buckets` must be 'auto' or an integer >= 1; got {buckets!r}.")
    if isinstance(xs, PaddedBatch):
        if ys is not None or a is not None or b is not None:
            raise ValueError("with a PaddedBatch, do not pass `ys`, `a` or `b`.")
        batch = xs
        groups = [list(range(len(batch)))]
    else:
        if ys is None:
            raise ValueError("`ys` is required (one target cloud per source cloud).")
        # concrete inputs are padded and cut into buckets on the host: eager device
        # gathers cost about 2 ms each (a bucketed batch of 32 spent 60 ms there, its
        # solves 90 ms); each bucket then goes to the device in its solver call
        batch = _pad_batch(xs, ys, a, b, multiple=multiple, host=True)
        groups = _partition(tuple(batch.n), tuple(batch.m), buckets, multiple)
        if len(groups) == 1:  # the whole batch, in input order
            groups = [list(range(len(batch)))]
    if not callable(solver):
        raise ValueError(f"`solver` must be an otlab solver function; got {solver!r}.")
    if batch_size != "auto" and batch_size is not None and not _is_count(batch_size):
        raise ValueError(f"`batch_size` must be None, 'auto' or an integer >= 1; got {batch_size!r}.")
    nb = len(batch)
    eps = None if epsilon is None else jnp.broadcast_to(jnp.asarray(epsilon, batch.x.dtype), (nb,))
    if eps is not None and not isinstance(eps, jax.core.Tracer):
        eps = np.asarray(eps)
        if not bool(np.all(np.isfinite(eps) & (eps > 0))):
            raise ValueError(f"`epsilon` must be finite and > 0 for every problem; got {epsilon!r}.")
    # arrays among the options are traced; the rest (tol, mode, callables, ...) static
    traced = {
        k: jnp.asarray(v, batch.x.dtype) if k in _TRACED and v is not None else v
        for k, v in solver_kwargs.items()
        if k in _TRACED or _is_arrays(v)
    }
    static = tuple(sorted((k, v) for k, v in solver_kwargs.items() if k not in traced))
    try:
        hash(static)
    except TypeError as err:
        raise ValueError(f"solver options must be arrays or hashable values: {err}") from None
    sols, where = [], [(0, 0)] * nb
    for gi, idx in enumerate(groups):
        part = batch if len(groups) == 1 else _sub_batch(batch, idx, multiple)
        for pos, k in enumerate(idx):
            where[k] = (gi, pos)
        size = _auto_batch_size(part) if batch_size == "auto" else batch_size
        sols.append(_solve_padded(
            part, costs_lib.as_cost(cost), None if eps is None else eps[np.asarray(idx)], traced,
            solver=solver, block_size=block_size, static=static,
            batch_size=None if size is None else int(size),
        ))  # fmt: skip
    return RaggedSolution(tuple(sols), batch.n, batch.m, tuple(where))
