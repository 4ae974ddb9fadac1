"""Multi-device execution of the geometry layer (``jax.sharding`` + ``shard_map``).

`shard` wraps a `otlab.PointCloud` or `otlab.Geometry` into a `ShardedGeometry`
whose rows (the source points ``x``, or the rows of a cost matrix) are split over
the devices of a ``jax.sharding.Mesh``; the target points ``y`` (and the cost's
parameters) are replicated. A `ShardedGeometry` implements the same interface as
the geometries it wraps (`lse`, `plan_operator`, `marginals`, `plan_cost`,
`mean_cost`, `row_sparsify`, ...), so every solver runs on several devices
without code of its own:

* a reduction along the rows (``axis=1``: ``log P 1``, ``P v``) is local to each
  device and its result stays split like ``x``;
* a reduction along the columns (``axis=0``: ``log P^T 1``, ``P^T u``) is a partial
  reduction on each device, combined across devices — for log-sum-exps as

  $$ \\mathrm{lse}_j = M_j + \\log \\sum_{k} e^{\\,\\ell^{(k)}_j - M_j}, \\qquad M_j = \\max_k \\ell^{(k)}_j, $$

  one ``pmax`` and one ``psum`` of length-``m`` vectors; for products one ``psum``.

Each device evaluates (dense) or streams (online, ``block_size``) only its
``n / D x m`` block of the cost, so per-device memory is ``1/D`` of a single
device's, and only vectors of length ``n`` or ``m`` cross devices per pass. Within
one device an online geometry keeps its block size. Across hosts the same code runs
under ``jax.distributed`` on a mesh of all global devices (see docs/scale.md).

Example:
    >>> import jax, otlab
    >>> x = jax.random.normal(jax.random.key(0), (64, 2))
    >>> geom = otlab.sharding.shard(otlab.PointCloud(x, x + 1.0))  # all local devices
    >>> sol = otlab.sinkhorn(geom, epsilon=0.1)
    >>> ref = otlab.sinkhorn(otlab.PointCloud(x, x + 1.0), epsilon=0.1)
    >>> bool(abs(sol.reg_cost - ref.reg_cost) < 1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from otlab import geometry as geometry_lib
from otlab.geometry import Geometry, PlanOperator, PointCloud, _GeometryBase, _matvec, _rmatvec

__all__ = ["ShardedGeometry", "ShardedPlanOperator", "shard", "default_mesh"]

Array = jax.Array

#: The axis name of `default_mesh`.
AXIS = "points"


def _auto(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto``: the solvers place data themselves
    (`shard` splits the rows; everything else is replicated, and ``shard_map`` runs the
    per-device passes), so they work the same whether the caller built the mesh with
    ``jax.make_mesh`` (``Explicit`` axes by default in jax >= 0.7) or ``Mesh(...)``.
    Under ``Explicit`` axes ``shard_map`` would instead demand inputs already split as
    its ``in_specs`` say."""
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == jax.sharding.AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(types))


def _shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` over ``mesh`` (a `ShardedGeometry`'s: its axes ``Auto``,
    `_auto`), with a clear error under a context mesh of ``Explicit`` axes
    (``jax.set_mesh``), where ``shard_map`` accepts only the context's own mesh and
    inputs typed with its shardings."""
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and any(t != jax.sharding.AxisType.Auto for t in ctx.axis_types):
        raise ValueError(
            "otlab's sharded geometries do not run under a context mesh with Explicit "
            "axes (`jax.set_mesh`): call the solver outside that context and pass the "
            "mesh to `otlab.sharding.shard` (or `mesh=`) instead."
        )
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def default_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh named ``"points"`` over ``devices`` (default: ``jax.devices()``,
    every device of every process under ``jax.distributed``)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def _axis_names(axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _combine_lse(partial: Array, names) -> Array:
    """``log sum_k exp(partial_k)`` across devices: one ``pmax``, one ``psum``."""
    mx = jax.lax.pmax(jax.lax.stop_gradient(partial), names)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    return mx + jnp.log(jax.lax.psum(jnp.exp(partial - mx), names))


def _parts(inner):
    """``(arrays, split, rebuild)``: the inner geometry's leaves, which of them are split
    along rows, and how to rebuild a (local) geometry from them."""
    if isinstance(inner, PointCloud):
        bs = inner.block_size
        return (inner.x, inner.y, inner.cost), (True, False, False), (
            lambda x, y, c: PointCloud(x, y, c, bs)
        )
    return (inner.cost_matrix,), (True,), Geometry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedGeometry(_GeometryBase):
    """A `otlab.PointCloud` or `otlab.Geometry` whose rows are split over a mesh.

    Build it with `shard`. Solvers accept it wherever they accept a geometry; the
    reductions run per device inside ``jax.shard_map`` and only length-``n`` or
    length-``m`` vectors are communicated.

    Args:
        inner: the geometry split: a `otlab.PointCloud` (dense or online; ``x`` is
            split, ``y`` replicated) or a `otlab.Geometry` (its cost matrix's rows
            are split). ``n`` must be a multiple of the number of devices along
            ``axis``.
        mesh: static ``jax.sharding.Mesh``.
        axis: static mesh axis name (or tuple of names) that the rows are split over.

    Example:
        >>> import jax, otlab
        >>> x = jax.random.normal(jax.random.key(0), (32, 3))
        >>> geom = otlab.sharding.shard(otlab.PointCloud(x, block_size=8))
        >>> geom.shape, geom.is_online
        ((32, 32), True)
    """

    inner: Geometry | PointCloud
    mesh: Mesh = geometry_lib._static()
    axis: Any = geometry_lib._static()

    def __post_init__(self):
        if not isinstance(self.inner, (Geometry, PointCloud)):
            if isinstance(self.inner, ShardedGeometry):
                raise ValueError("`geom` is already sharded.")
            # pytree unflattening (vmap, tree_map) rebuilds with placeholders: allow it.
            if not hasattr(self.inner, "shape"):
                return
            raise ValueError(
                "`geom` must be an otlab PointCloud or Geometry to shard; "
                f"got {type(self.inner).__name__}."
            )
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"`mesh` must be a jax.sharding.Mesh; got {type(self.mesh).__name__}.")
        object.__setattr__(self, "mesh", _auto(self.mesh))  # every pass: `_shard_map`
        names = _axis_names(self.axis)
        for name in names:
            if name not in self.mesh.axis_names:
                raise ValueError(
                    f"`axis` {name!r} is not an axis of the mesh {self.mesh.axis_names}."
                )
        arrays, split, _ = _parts(self.inner)
        rows = arrays[0]
        if geometry_lib._has_shape(rows) and rows.ndim == 2 and rows.shape[0] % self.n_shards:
            raise ValueError(
                f"the number of rows of `geom` ({rows.shape[0]}) must be a multiple of the "
                f"number of devices along `axis` {names} ({self.n_shards}); pad the problem "
                "with zero-weight points (see otlab.pad_batch)."
            )

    # ----------------------------------------------------------------- structure

    @property
    def n_shards(self) -> int:
        """Number of devices the rows are split over."""
        return math.prod(self.mesh.shape[a] for a in _axis_names(self.axis))

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def is_online(self) -> bool:
        return self.inner.is_online

    @property
    def cost_matrix(self) -> Array:
        """The global ``(n, m)`` cost matrix (split by rows when built under ``jit``)."""
        if isinstance(self.inner, Geometry):
            return self.inner.cost_matrix
        return self._smap(lambda geom: geom.cost_matrix, self._row)

    def __getattr__(self, name):
        # ``x``, ``y``, ``cost``, ``block_size`` of a wrapped point cloud.
        if name in ("x", "y", "cost", "block_size") and isinstance(
            self.__dict__.get("inner"), PointCloud
        ):
            return getattr(self.inner, name)
        raise AttributeError(name)

    @property
    def _row(self):
        return P(self.axis)

    def _smap(self, fn, out_specs, rows=(), reps=()):
        """``fn(local_geom, *rows, *reps)`` on every device: ``rows`` are split like the
        geometry's rows, ``reps`` replicated."""
        arrays, split, rebuild = _parts(self.inner)
        in_specs = (
            tuple(self._row if s else P() for s in split),
            tuple(self._row for _ in rows),
            tuple(P() for _ in reps),
        )

        def body(parts, rows, reps):
            return fn(rebuild(*parts), *rows, *reps)

        smap = _shard_map(body, self.mesh, in_specs, out_specs)
        return smap(arrays, tuple(rows), tuple(reps))

    def _names(self):
        return _axis_names(self.axis)

    # ---------------------------------------------------------------- reductions

    def materialize(self) -> ShardedGeometry:
        """A dense point cloud evaluates its cost once, split by rows on the devices."""
        if isinstance(self.inner, PointCloud) and not self.inner.is_online:
            return ShardedGeometry(Geometry(self.cost_matrix), self.mesh, self.axis)
        return self

    def lse(self, f, g, epsilon, axis, shift=None):
        eps = jnp.asarray(epsilon)
        if axis == 1:
            if shift is None:
                return self._smap(
                    lambda geom, f, g, e: geom.lse(f, g, e, 1), self._row, (f,), (g, eps)
                )
            return self._smap(
                lambda geom, f, s, g, e: geom.lse(f, g, e, 1, s), self._row, (f, shift), (g, eps)
            )
        if axis == 0:
            # (no shift: a shard's partial sums are not near the whole column's)
            names = self._names()
            return self._smap(
                lambda geom, f, g, e: _combine_lse(geom.lse(f, g, e, 0), names),
                P(),
                (f,),
                (g, eps),
            )
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")

    def plan_operator(self, f, g, epsilon) -> ShardedPlanOperator:
        eps = jnp.asarray(epsilon)
        matrix = None
        if not self.is_online:
            matrix = self._smap(lambda geom, f, g, e: geom.plan(f, g, e), self._row, (f,), (g, eps))
        return ShardedPlanOperator(self, f, g, eps, matrix)

    def plan(self, f, g, epsilon):
        eps = jnp.asarray(epsilon)
        return self._smap(lambda geom, f, g, e: geom.plan(f, g, e), self._row, (f,), (g, eps))

    def plan_cost(self, f, g, epsilon):
        names = self._names()
        return self._smap(
            lambda geom, f, g, e: jax.lax.psum(geom.plan_cost(f, g, e), names),
            P(),
            (f,),
            (g, jnp.asarray(epsilon)),
        )

    def plan_cost_at(self, f, g, epsilon, x_cost):
        """``<C(x_cost, y), P>`` (`otlab.PointCloud.plan_cost_at`): ``x_cost`` split like
        ``x``, per-device partial sums, one ``psum``."""
        if not isinstance(self.inner, PointCloud):
            raise ValueError("`plan_cost_at` needs a PointCloud geometry (points and a cost).")
        names = self._names()
        return self._smap(
            lambda geom, f, xc, g, e: jax.lax.psum(geom.plan_cost_at(f, g, e, xc), names),
            P(),
            (f, x_cost),
            (g, jnp.asarray(epsilon)),
        )

    def mean_cost(self):
        names, k = self._names(), self.n_shards
        # equal shards: the global mean is the mean of the per-device means
        return self._smap(lambda geom: jax.lax.psum(geom.mean_cost(), names) / k, P())

    def marginals(self, f, g, epsilon):
        names = self._names()

        def local(geom, f, g, e):
            row, col = geom.marginals(f, g, e)
            return row, jax.lax.psum(col, names)

        return self._smap(local, (self._row, P()), (f,), (g, jnp.asarray(epsilon)))

    def row_sparsify(self, f, g, epsilon, bins):
        return self._smap(
            lambda geom, f, g, e: geom.row_sparsify(f, g, e, bins),
            (self._row, self._row),
            (f,),
            (g, jnp.asarray(epsilon)),
        )

    def topk(self, f: Array, g: Array, k: int, axis: int = 0) -> Array:
        """`otlab.PointCloud.topk`: indices of the ``k`` largest scores ``f_i + g_j - C_ij``
        of each column (``axis=0``, global row indices, replicated) or each row
        (``axis=1``, split like ``x``). A column's top-``k`` is each device's top-``k``
        of its rows, merged: one all-gather of ``D x m x k`` candidates (scores and
        indices), never the cost or the plan."""
        f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
        if axis == 1:
            return self._smap(lambda geom, f, g: geom.topk(f, g, k, 1), self._row, (f,), (g,))
        if axis != 0:
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        names = self._names()
        kk = min(k, self.shape[0])

        def local(geom, f, g):
            idx = geom.topk(f, g, kk, 0)  # (m, kk) local rows
            cols = jnp.arange(idx.shape[0])[:, None]
            score = f[idx] + g[:, None] - geom.cost_at(idx, cols)
            return score, idx + jax.lax.axis_index(names) * f.shape[0]

        # (m, D kk) candidates, in the order of the rows (ties: the lower row, as one device)
        split = P(None, self.axis)
        cand_v, cand_i = self._smap(local, (split, split), (f,), (g,))
        _, pos = geometry_lib._top_k(cand_v, kk)
        return jnp.take_along_axis(cand_i, pos, axis=1).astype(jnp.int32)

    def max_score(self, f: Array, g: Array, axis: int = 0) -> Array:
        """`otlab.PointCloud.max_score`: per row (``axis=1``) on the device holding it;
        per column (``axis=0``) each device's maximum, one ``pmax`` of length ``m``."""
        f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
        if axis == 1:
            return self._smap(lambda geom, f, g: geom.max_score(f, g, 1), self._row, (f,), (g,))
        if axis != 0:
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        names = self._names()
        return self._smap(
            lambda geom, f, g: jax.lax.pmax(geom.max_score(f, g, 0), names), P(), (f,), (g,)
        )

    def count_at_least(self, f: Array, g: Array, t: Array, axis: int = 0) -> Array:
        """`otlab.PointCloud.count_at_least`: per row (``axis=1``, ``t`` split like the
        rows) on the device holding it; per column (``axis=0``) a ``psum`` of the devices'
        counts, length ``m``."""
        f, g, t = (jax.lax.stop_gradient(v) for v in (f, g, t))
        if axis == 1:
            return self._smap(
                lambda geom, f, t, g: geom.count_at_least(f, g, t, 1), self._row, (f, t), (g,)
            )
        if axis != 0:
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        names = self._names()
        return self._smap(
            lambda geom, f, g, t: jax.lax.psum(geom.count_at_least(f, g, t, 0), names),
            P(), (f,), (g, t),
        )  # fmt: skip

    def cost_at(self, rows: Array, cols: Array) -> Array:
        """`otlab.PointCloud.cost_at`: ``C[rows, cols]`` for global (replicated) index
        arrays; each device prices the pairs whose row it holds, one ``psum``."""
        rows, cols = jnp.broadcast_arrays(rows, cols)
        names = self._names()

        def local(geom, rows, cols):
            n_local = geom.shape[0]
            r = rows - jax.lax.axis_index(names) * n_local
            mine = (r >= 0) & (r < n_local)
            c = geom.cost_at(jnp.where(mine, r, 0), cols)
            return jax.lax.psum(jnp.where(mine, c, 0.0), names)

        return self._smap(local, P(), (), (rows, cols))

    def transport(self, g: Array, epsilon: Array, x_new: Array) -> Array:
        """Entropic map of new points (as `otlab.PointCloud.transport`), on every
        device without communication: ``y``, ``g`` and the new points are held
        replicated. (A traced ``y`` may arrive split, as in ProgOT's centering self
        problem ``OT(x, x)``: XLA's partitioner then split the map's blocks along ``y``
        and replicated them again, with an "Involuntary full rematerialization"
        warning.)"""
        inner = self.inner
        if not isinstance(inner, PointCloud):
            raise ValueError("`transport` needs a PointCloud geometry (points and a cost).")
        rep = NamedSharding(self.mesh, P())
        y, g, x_new = (jax.lax.with_sharding_constraint(v, rep) for v in (inner.y, g, x_new))
        return dataclasses.replace(inner, y=y).transport(g, epsilon, x_new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedPlanOperator(PlanOperator):
    """`otlab.PlanOperator` of a `ShardedGeometry`: ``matvec`` is local to each
    device, ``rmatvec`` sums per-device partial products (one ``psum`` of length ``m``).
    ``matrix`` (dense geometries) is the plan split by rows."""

    def matvec(self, v: Array) -> Array:
        geom = self.geom
        if self.matrix is not None:
            return _shard_map(_matvec, geom.mesh, (geom._row, P()), geom._row)(self.matrix, v)
        return geom._smap(
            lambda lg, f, g, e, v: lg.plan_operator(f, g, e).matvec(v),
            geom._row,
            (self.f,),
            (self.g, self.epsilon, v),
        )

    def rmatvec(self, u: Array) -> Array:
        geom = self.geom
        names = geom._names()
        if self.matrix is not None:
            return _shard_map(
                lambda p, u: jax.lax.psum(_rmatvec(p, u), names), geom.mesh,
                (geom._row, geom._row), P(),
            )(self.matrix, u)
        return geom._smap(
            lambda lg, f, u, g, e: jax.lax.psum(lg.plan_operator(f, g, e).rmatvec(u), names),
            P(),
            (self.f, u),
            (self.g, self.epsilon),
        )


def _put(x, sharding):
    if isinstance(x, jax.core.Tracer):
        return x
    return jax.device_put(x, sharding)


def shard(geom: Any, mesh: Mesh | None = None, axis: Any = None) -> ShardedGeometry:
    """Split a geometry's rows over the devices of ``mesh``.

    Args:
        geom: an otlab `otlab.PointCloud` (dense or online), `otlab.Geometry`, an
            ott-jax geometry or a cost matrix. Its number of rows ``n`` must be a
            multiple of the number of devices along ``axis`` (pad with zero-weight
            points otherwise: `otlab.pad_batch`).
        mesh: a ``jax.sharding.Mesh``; default `default_mesh` (every device).
        axis: mesh axis name or tuple of names to split the rows over; default all
            the mesh's axes.

    Returns:
        ShardedGeometry: the same problem; concrete arrays are placed on the
        devices (``x`` or the cost matrix split by rows, the rest replicated).

    Raises:
        ValueError: for an unknown axis, a geometry that is already sharded, or ``n``
            not a multiple of the number of devices.

    Example:
        >>> import jax, otlab
        >>> mesh = otlab.sharding.default_mesh()
        >>> x = jax.random.normal(jax.random.key(0), (16, 2))
        >>> geom = otlab.sharding.shard(otlab.PointCloud(x), mesh)
        >>> geom.n_shards == len(jax.devices())
        True
    """
    if isinstance(geom, ShardedGeometry):
        raise ValueError("`geom` is already sharded.")
    inner = geometry_lib.as_geometry(geom)
    mesh = default_mesh() if mesh is None else mesh
    if not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    axis = tuple(mesh.axis_names) if axis is None else axis
    if not isinstance(axis, str):
        axis = tuple(axis)
        if len(axis) == 1:
            axis = axis[0]
    out = ShardedGeometry(inner, mesh, axis)  # validates
    rows, rep = NamedSharding(out.mesh, P(axis)), NamedSharding(out.mesh, P())
    if isinstance(inner, PointCloud):
        inner = PointCloud(
            _put(inner.x, rows),
            _put(inner.y, rep),
            jax.tree.map(lambda c: _put(c, rep), inner.cost),
            inner.block_size,
        )
    else:
        inner = Geometry(_put(inner.cost_matrix, rows))
    return dataclasses.replace(out, inner=inner)
