"""The geometry layer: the one place where reductions over ``n x m`` are evaluated.

Conventions (shared with ott-jax): dual potentials ``f`` (length ``n``) and ``g``
(length ``m``) absorb ``epsilon * log a`` and ``epsilon * log b``, and the entropic
plan is

$$ P_{ij} = \\exp\\big((f_i + g_j - C_{ij}) / \\varepsilon\\big). $$

Solvers ask a geometry for

* `lse` — ``log P 1`` (``axis=1``) or ``log P^T 1`` (``axis=0``), a
  max-shifted log-sum-exp pass;
* `plan_operator` — a `PlanOperator` with ``matvec(v) = P v`` and
  ``rmatvec(u) = P^T u``; a dense geometry materialises ``P`` once so that each
  product is a bandwidth-bound matrix-vector product, an online geometry
  recomputes the blocks of ``P`` on every product;
* `plan_cost` (``<C, P>``), `plan` (dense, only when asked),
  `mean_cost`.

Two geometries exist: `Geometry` (a cost matrix) and `PointCloud`
(points and a cost). A point cloud with ``block_size=None`` evaluates its cost
matrix; with ``block_size=k`` it is *online*: every pass goes over blocks of ``k``
rows (or columns), recomputes that block of the cost, and never holds more than
``k x max(n, m)`` entries; reverse-mode passes are rematerialised block by block so
gradients keep the same memory bound.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import otlab
    >>> x = jax.random.normal(jax.random.key(0), (5, 2))
    >>> geom = otlab.PointCloud(x, x + 1.0)
    >>> geom.lse(jnp.zeros(5), jnp.zeros(5), 1.0, axis=1).shape
    (5,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otlab import costs as costs_lib

__all__ = ["Geometry", "PointCloud", "PlanOperator", "as_geometry", "from_ott", "auto_block_size"]

Array = jax.Array


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


def _maybe_array(x: Any) -> Any:
    """NumPy / Python inputs become jax arrays; tracers, tangents and sentinels pass."""
    if isinstance(x, (list, tuple, float, int)) or (
        isinstance(x, np.ndarray) and x.dtype != jax.dtypes.float0
    ):
        return jnp.asarray(x)
    return x


def _has_shape(*xs) -> bool:
    return all(hasattr(x, "shape") and hasattr(x, "ndim") for x in xs)


# --------------------------------------------------------------------------- kernels
# Dense building blocks over a (rows, cols) cost block ``c``: ``fr`` is aligned with
# rows, ``gc`` with columns. Online geometries call them block by block.


def _logits(c: Array, fr: Array, gc: Array, eps: Array) -> Array:
    return (fr[:, None] + gc[None, :] - c) / eps


def _lse_last(z: Array) -> Array:
    """Log-sum-exp along the last axis with a hand-written, gradient-free max shift."""
    mx = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    return mx + jnp.log(jnp.sum(jnp.exp(z - mx[..., None]), axis=-1))


def _lse_first(z: Array) -> Array:
    mx = jax.lax.stop_gradient(jnp.max(z, axis=0))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    return mx + jnp.log(jnp.sum(jnp.exp(z - mx[None, :]), axis=0))


def _primal_terms(c: Array, fr: Array, gc: Array, eps: Array, lar: Array, lbc: Array) -> Array:
    """Per-row ``[sum_j C P, sum_j a b phi(z), sum_j a b C]`` of a block, shape
    ``(rows, 3)``: ``z = log(P / (a b))`` and ``phi(z) = z e^z - e^z + 1 >= 0``
    (``a b phi(z)`` is the KL term of each entry, no cancellation across entries)."""
    logits = _logits(c, fr, gc, eps)
    p = jnp.exp(logits)
    lab = lar[:, None] + lbc[None, :]
    # (a product of two vector exponentials, not exp(lab): one n x m exponential less
    # in the pass, whose generated code is the largest of a divergence's compile)
    ab = jnp.exp(lar)[:, None] * jnp.exp(lbc)[None, :]
    z = logits - lab
    # ``a b expm1(z) = P - a b``; the product form is exact near z = 0, the
    # difference has no overflow for large z (where ``a b`` may underflow).
    big = z > 1.0
    kl = p * z - jnp.where(big, p - ab, ab * jnp.expm1(jnp.where(big, 1.0, z)))
    return jnp.stack(
        [jnp.sum(c * p, 1), jnp.sum(kl, 1), jnp.sum(ab * c, 1)], -1
    )


def _matvec(p: Array, v: Array) -> Array:
    return p @ v


def _rmatvec(p: Array, u: Array) -> Array:
    # ``u @ P`` reads P row-major, several times faster on CPU than ``P.T @ u``.
    return u @ p if u.ndim == 1 else (u.T @ p).T


#: `_binned_max` compares column slabs one by one (one fused pass) up to this many
#: slabs per row; beyond, a reduction over a reshaped axis (compiles to one loop).
_SLABS_UNROLLED = 128


def _binned_max(z: Array, bins: int) -> tuple[Array, Array]:
    """Max and argmax (the first) of each row of ``z`` over strided column bins ``j mod bins``."""
    n, m = z.shape
    bins = min(bins, m)
    per, rest = divmod(m, bins)
    if per <= _SLABS_UNROLLED:
        # Slab ``s`` (columns ``s * bins ...``) holds one column of every bin: a running
        # max over slabs is one fused elementwise pass. (An argmax over the middle axis
        # of the reshaped matrix ran 2-10x slower on CPU, 12x at 500 x 600, 16 bins.)
        vals, slab = z[:, :bins], jnp.zeros((n, bins), jnp.int32)
        for k in range(1, per):
            block = z[:, k * bins : (k + 1) * bins]
            better = block > vals
            vals, slab = jnp.where(better, block, vals), jnp.where(better, k, slab)
        idx = slab * bins + jnp.arange(bins)
    else:
        # The first ``per * bins`` columns reshape to (n, per, bins) with no copy.
        # (Padding to a multiple of ``bins`` copied the matrix: 3x slower at m = 2000.)
        zp = z[:, : per * bins].reshape(n, per, bins)
        t = jnp.argmax(zp, axis=1)
        vals = jnp.take_along_axis(zp, t[:, None, :], axis=1)[:, 0, :]
        idx = t * bins + jnp.arange(bins)
    # The ``rest < bins`` last columns are merged into the first bins afterwards.
    if rest:
        tail = z[:, per * bins :]
        better = tail > vals[:, :rest]
        vals = vals.at[:, :rest].set(jnp.where(better, tail, vals[:, :rest]))
        idx = idx.at[:, :rest].set(jnp.where(better, per * bins + jnp.arange(rest), idx[:, :rest]))
    return vals, idx


def _blocks(n: int, block_size: int) -> tuple[int, int]:
    """``(blocks, rows)``: ``n`` rows cut into the fewest blocks of at most
    ``block_size`` rows, balanced (rows rounded up to a multiple of 8 where that stays
    within ``block_size``), so that padding is below ``8 * blocks`` rows instead of up
    to a whole block: 3000 rows in blocks of at most 2048 run as 2 x 1504, not 2 x 2048
    (1.37x the work)."""
    nb = -(-n // block_size)
    if nb == 1:
        return 1, n
    rows = -(-n // nb)
    return nb, min(-(-rows // 8) * 8, block_size)


def _map_blocks(fn, block_size: int, args: tuple) -> Any:
    """Apply ``fn`` to consecutive row blocks of ``args`` (same leading size), blocks
    of at most ``block_size`` rows (`_blocks`).

    Pads to a whole number of blocks (repeating the last row: padded points
    stay inside the cloud, which the centred costs of `otlab.costs` rely on), runs
    a rematerialised ``lax.map`` and trims: peak memory is that of one block,
    forward and backward.
    """
    n = args[0].shape[0]
    nb, block_size = _blocks(n, block_size)
    pad = nb * block_size - n

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        return x.reshape((nb, block_size) + x.shape[1:])

    out = jax.lax.map(jax.checkpoint(lambda blk: fn(*blk)), tuple(split(x) for x in args))
    return jax.tree.map(lambda o: o.reshape((nb * block_size,) + o.shape[2:])[:n], out)


def _eager_jit(static_argnames=()):
    """A method compiled once per signature when called outside ``jit``: the geometry
    is a pytree argument of a module-level ``jax.jit``. Without it an eager call of an
    online pass (a ``lax.map`` over a fresh closure) compiled a new XLA program every
    time, and each loaded program keeps memory mappings (see
    ``tests/test_solution_compiles.py``). Inside a traced function the jitted call is
    inlined like any nested ``jit``."""

    def deco(method):
        jitted = jax.jit(method, static_argnames=static_argnames)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            return jitted(self, *args, **kwargs)

        return wrapper

    return deco


#: Bytes of one block of logits that `auto_block_size` allows. A forward pass never
#: writes a block out (XLA fuses the cost GEMM, the exponentials and the reduction); a
#: reverse pass materialises one block at a time. Measured on the 2-core CPU (float32,
#: d = 3, online Sinkhorn and shifted passes, interleaved): the pass speeds up with the
#: rows per block, as each block's fixed costs (packing the other side's features,
#: dispatch) are spread over more entries: at n = m = 10^5, 1.6, 2.3, 2.6, 2.8 and 3.1 G
#: entries/s with 16, 64, 128, 256 and 512 rows; at 4096, 2.8, 3.0 and 3.2 with 512, 1024
#: and 2048 rows, 2.7 with the whole matrix as one block.
AUTO_BLOCK_BYTES = 256 << 20

#: The most rows (or columns) per block that `auto_block_size` picks (see above).
AUTO_MAX_ROWS = 2048

#: Bytes of one block for the online passes other than the fused log-sum-exp: the
#: plan's products, top-k selections, counts, the primal terms and the passes of costs
#: without a factored form write blocks out (a cost block, logits, selections) or, for
#: products, slow down 3-4x past about 30 MB per block. They run on sub-blocks of at
#: most this many bytes (`PointCloud._pass_rows`), whatever the geometry's
#: ``block_size``: measured at n = m = 4096 (float32, d = 3), top-k, `row_sparsify`,
#: primal terms and counts took 1.2-2.3x longer with 2048 rows than with 512, and
#: ``P v`` ran at 0.7 against 2.8 G entries/s.
PASS_BLOCK_BYTES = 8 << 20


def auto_block_size(n: int, m: int, dtype=jnp.float32, budget: int = AUTO_BLOCK_BYTES) -> int:
    """Rows (or columns) per block of an online pass: the largest power of two whose
    block of ``max(n, m)`` logits fits ``budget`` bytes (the memory of a reverse pass;
    a forward pass never writes a block out), between 16 and `AUTO_MAX_ROWS`, and no
    more than ``max(n, m)`` rounded up to a power of two.

    Example:
        >>> from otlab.geometry import auto_block_size
        >>> auto_block_size(4096, 4096), auto_block_size(10**5, 10**5), auto_block_size(100, 80)
        (2048, 512, 128)
    """
    if not (isinstance(budget, (int, np.integer)) and budget > 0):
        raise ValueError(f"`budget` must be a positive int (bytes); got {budget!r}.")
    size = max(int(n), int(m), 1)
    rows = budget // (size * jnp.dtype(dtype).itemsize)
    k = 1 << max(int(rows).bit_length() - 1, 0)
    cap = 1 << (size - 1).bit_length()
    return int(min(max(k, 16), AUTO_MAX_ROWS, cap))


def _separable(cost, x: Array, y: Array) -> tuple[Array, Array, Array, Array] | None:
    """``(row, col, phi, psi)``, ``C = row_i + col_j + phi_i . psi_j``, from
    `otlab.costs.Cost.separable_features`, else from a cost's `features` alone
    (``row = col = 0``), else ``None``."""
    parts = cost.separable_features(x, y)
    if parts is not None:
        return parts
    feats = cost.features(x, y)
    if feats is None:
        return None
    phi, psi = feats
    return jnp.zeros(phi.shape[:1], phi.dtype), jnp.zeros(psi.shape[:1], psi.dtype), phi, psi


def _factored_features(parts, f, g, eps, axis: int):
    """``(own, own_feats, cols)`` of the logits GEMM of `_factored_lse`: a block of
    ``(f_i + g_j - C_ij) / eps`` along ``axis`` is ``rows_with(own) @ cols.T`` with
    ``rows_with(c) = [c, 1, own_feats]`` (use `_factored_rows`)."""
    row, col, phi, psi = parts
    a = (f - row) / eps
    b = (g - col) / eps
    if axis == 1:
        own, own_feats, other, other_feats = a, -phi / eps, b, psi
    else:
        own, own_feats, other, other_feats = b, psi, a, -phi / eps
    cols = jnp.concatenate([jnp.ones_like(other[:, None]), other[:, None], other_feats], 1)
    return own, own_feats, cols


def _factored_rows(c: Array, own_feats: Array) -> Array:
    return jnp.concatenate([c[:, None], jnp.ones_like(c[:, None]), own_feats], 1)


def _factored_lse(parts, f, g, eps, axis: int, block_size: int, shift=None) -> Array:
    """Online log-sum-exp for a cost ``C_ij = row_i + col_j + phi_i . psi_j``
    (`_separable`): the logits of a block are one GEMM of augmented features,

    $$ \\frac{f_i + g_j - C_{ij}}{\\varepsilon} - s_i
       = [a_i - s_i,\\ 1,\\ -\\varphi_i / \\varepsilon] \\cdot [1,\\ b_j,\\ \\psi_j],
       \\quad a = \\frac{f - \\mathrm{row}}{\\varepsilon},\\ b = \\frac{g - \\mathrm{col}}{\\varepsilon}, $$

    ``r + 2`` terms (``d + 2`` for the squared Euclidean cost), reduced along its
    contiguous last axis. ``axis=0`` blocks the columns instead (the roles of the two
    sides swapped), so both reductions run along rows of a block, at the same speed.

    With a ``shift`` (a guess of the result, e.g. the previous iteration's) it is
    folded into ``a`` (or ``b``) and the block is exponentiated directly: XLA on CPU
    fuses the GEMM, the exponentials and the sum into one loop that never writes the
    block out. Without ``shift`` each block is max-shifted, the max folded into the
    first feature the same way: two fused GEMMs (a max, then the sum), no block
    written out and read back. If any result leaves ``[-B, B]`` (``B = 40`` in float32,
    ``300`` in float64: no overflow, and underflowed terms negligible) the pass is
    redone with the max shift.

    Measured (float32, n = m = 4096, d = 3, 2-core CPU, per pass, interleaved with
    the former 7-term GEMM (8 with the shift)): 1.10 to 1.15x its throughput with a
    shift, about the rate of XLA's fused exp-and-sum over a block already in cache
    (the exponential bounds it); see docs/scale.md and `benchmarks/bench_scale.py`.
    """
    own, own_feats, cols = _factored_features(parts, f, g, eps, axis)

    def rows_with(c):
        return _factored_rows(c, own_feats)

    def exact_block(rb):
        # the max shift enters the GEMM too: a second GEMM (5 FMAs per entry) instead of
        # a second read of a written-out block (each GEMM fused with its reduction)
        mx = jax.lax.stop_gradient(jnp.max(rb @ cols.T, axis=-1))
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        return mx + jnp.log(jnp.sum(jnp.exp(rb.at[:, 0].add(-mx) @ cols.T), axis=-1))

    def exact():
        return _map_blocks(exact_block, block_size, (rows_with(own),))

    if shift is None:
        return exact()
    shift = jax.lax.stop_gradient(shift)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0).astype(own.dtype)
    r = _map_blocks(
        lambda rb: jnp.log(jnp.sum(jnp.exp(rb @ cols.T), axis=-1)),
        block_size,
        (rows_with(own - shift),),
    )
    bound = 300.0 if own.dtype == jnp.float64 else 40.0
    ok = jnp.all(jnp.abs(r) <= bound)  # False for NaN
    return jax.lax.cond(ok, lambda: shift + r, exact)


def _factored_product(parts, f, g, eps, axis: int, block_size: int, w: Array) -> Array:
    """``P w`` (``axis=1``, ``w`` of shape ``(m,)`` or ``(m, k)``) or ``P^T w``
    (``axis=0``, ``w`` over the rows) of the plan ``P = exp((f + g - C) / eps)`` for a
    factored cost: each block of the plan is ``exp`` of one GEMM of augmented features
    (as in `_factored_lse`), reduced against ``w`` in the same fused loop for a vector
    (a block product for a matrix), on blocks of ``block_size`` rows (callers pass
    `PointCloud._pass_rows`: that fused loop slows down 3-4x once a block passes about
    30 MB, unlike the log-sum-exp's). The former pass wrote out the cost block, the
    logits and the plan block before the product (measured at n = m = 4096, float32:
    0.4-0.7 G entries/s against 1.3-2.8 for a vector, 1.3-1.6 for four columns)."""
    own, own_feats, cols = _factored_features(parts, f, g, eps, axis)
    if w.ndim == 1:  # one fused loop: the GEMM, the exponentials, the weighted sum

        def block(rb):
            return jnp.sum(jnp.exp(rb @ cols.T) * w, axis=-1)

    else:

        def block(rb):
            return jnp.exp(rb @ cols.T) @ w

    return _map_blocks(block, block_size, (_factored_rows(own, own_feats),))


def _finite_stats(c: Array, axis=None) -> tuple[Array, Array, Array]:
    """``(max |C|, sum C / max |C|, count)`` over finite entries, along ``axis``
    (``None``: all); overflow-free, see `_GeometryBase.default_epsilon`, which reads
    the mean as ``max * sum / count``."""
    finite = jnp.isfinite(c)
    c = jnp.where(finite, c, 0.0)
    mx = jnp.max(jnp.abs(c), axis=axis)
    scale = jnp.where(mx > 0, mx, 1.0)
    scale = scale if axis is None else jnp.expand_dims(scale, axis)
    total = jnp.sum(c / scale, axis=axis)
    return mx, total, jnp.sum(finite, axis=axis).astype(c.dtype)


def _combine_stats(mx: Array, total: Array, count: Array) -> tuple[Array, Array, Array]:
    """Merge per-row `_finite_stats` into one."""
    top = jnp.max(mx)
    ratio = jnp.where(top > 0, mx / jnp.where(top > 0, top, 1.0), 0.0)
    return top, jnp.sum(total * ratio), jnp.sum(count)


# ------------------------------------------------------------------------ operators


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlanOperator:
    """Matrix-free access to an entropic plan ``P = exp((f + g - C) / eps)``.

    ``matrix`` holds ``P`` when the geometry is dense; otherwise it is ``None`` and
    every product recomputes ``P`` block by block from ``geom``, ``f``, ``g``.
    """

    geom: Any
    f: Array
    g: Array
    epsilon: Array
    matrix: Array | None

    @property
    def materialized(self) -> bool:
        return self.matrix is not None

    def matvec(self, v: Array) -> Array:
        """``P v`` for ``v`` of shape ``(m,)`` or ``(m, k)``."""
        if self.matrix is not None:
            return _matvec(self.matrix, v)
        geom, g, eps = self.geom, self.g, self.epsilon
        parts = _separable(geom.cost, geom.x, geom.y)
        if parts is not None:
            return _factored_product(parts, self.f, g, eps, 1, geom._pass_rows, v)
        return _map_blocks(
            lambda xb, fb: _matvec(jnp.exp(_logits(geom._cost_rows(xb), fb, g, eps)), v),
            geom._pass_rows,
            (geom.x, self.f),
        )

    def rmatvec(self, u: Array) -> Array:
        """``P^T u`` for ``u`` of shape ``(n,)`` or ``(n, k)``."""
        if self.matrix is not None:
            return _rmatvec(self.matrix, u)
        geom, f, eps = self.geom, self.f, self.epsilon
        parts = _separable(geom.cost, geom.x, geom.y)
        if parts is not None:
            return _factored_product(parts, f, self.g, eps, 0, geom._pass_rows, u)
        return _map_blocks(
            lambda yb, gb: _rmatvec(jnp.exp(_logits(geom._cost_cols(yb), f, gb, eps)), u),
            geom._pass_rows,
            (geom.y, self.g),
        )

    def scalings(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``(u, v) = (exp((f - self.f) / eps), exp((g - self.g) / eps))``: the plan at
        ``(f, g)`` is ``diag(u) P diag(v)`` (a materialised operator only)."""
        eps = self.epsilon
        return jnp.exp((f - self.f) / eps), jnp.exp((g - self.g) / eps)

    def marginals_at(self, f: Array, g: Array) -> tuple[Array, Array]:
        """``(P' 1, P'^T 1)`` of the plan ``P'`` at potentials ``(f, g)``, from this
        materialised plan by its diagonal scalings: two matrix-vector products and no
        exponentials over ``n x m``. Accurate while ``|f - self.f| / eps`` and
        ``|g - self.g| / eps`` stay moderate (entries of ``P`` that underflowed stay 0)."""
        u, v = self.scalings(f, g)
        return u * _matvec(self.matrix, v), v * _rmatvec(self.matrix, u)

    def moved(self, f: Array, g: Array) -> PlanOperator:
        """The materialised operator of the plan at ``(f, g)``, ``diag(u) P diag(v)``
        (see `marginals_at`): one product pass, no exponentials over ``n x m``."""
        u, v = self.scalings(f, g)
        return PlanOperator(self.geom, f, g, self.epsilon, self.matrix * u[:, None] * v[None, :])

    def row_sparsify(self, bins: int) -> tuple[Array, Array]:
        """`Geometry.row_sparsify` of this plan: from the materialised matrix when
        there is one, else recomputed from the geometry."""
        if self.matrix is None:
            return self.geom.row_sparsify(self.f, self.g, self.epsilon, bins)
        vals, idx = _binned_max(self.matrix, bins)
        return jnp.log(vals), idx


# ----------------------------------------------------------------------- geometries


class _GeometryBase:
    """Shared reductions; subclasses give ``shape``, ``dtype`` and cost access."""

    @property
    def is_online(self) -> bool:
        return False

    def materialize(self):
        """The geometry a solver loop should iterate on (dense costs evaluated once)."""
        return self

    def lse(self, f: Array, g: Array, epsilon: Array, axis: int, shift: Array | None = None) -> Array:
        """``log(P 1)`` for ``axis=1`` (length ``n``) or ``log(P^T 1)`` for ``axis=0``.

        ``shift`` (optional, no gradient): a guess of the result, which online
        geometries with a factored cost use instead of a max pass over each block
        (checked: a guess too far off for the dtype's exponent range falls back to the
        exact max shift). The result does not depend on it beyond rounding.
        """
        c = self.cost_matrix
        if axis == 1:
            return _lse_last(_logits(c, f, g, epsilon))
        if axis == 0:
            return _lse_first(_logits(c, f, g, epsilon))
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")

    def plan_operator(self, f: Array, g: Array, epsilon: Array) -> PlanOperator:
        """A `PlanOperator` for the plan of potentials ``f``, ``g``."""
        p = jnp.exp(_logits(self.cost_matrix, f, g, epsilon))
        return PlanOperator(self, f, g, jnp.asarray(epsilon), p)

    def plan(self, f: Array, g: Array, epsilon: Array) -> Array:
        """The dense ``(n, m)`` plan. Memory ``n * m``: only when asked."""
        return jnp.exp(_logits(self.cost_matrix, f, g, epsilon))

    def plan_cost(self, f: Array, g: Array, epsilon: Array) -> Array:
        """``<C, P>``, the transport cost of the plan."""
        c = self.cost_matrix
        return jnp.sum(c * jnp.exp(_logits(c, f, g, epsilon)))

    def primal_terms(self, f: Array, g: Array, epsilon: Array, log_a: Array, log_b: Array):
        """``(<C, P>, KL(P | a b^T), <C, a b^T>)`` in one pass.

        The KL is summed entry by entry as ``a b phi(log(P / a b))``, so it stays
        accurate when ``P`` is close to ``a b^T`` (large epsilon), where the dual's
        ``eps (sum P - sum a b)`` cancels. ``log_a``, ``log_b``: logs of the weights.
        """
        t = _primal_terms(self.cost_matrix, f, g, epsilon, log_a, log_b)
        return tuple(jnp.sum(t, 0))

    def mean_cost(self) -> Array:
        """Mean entry of the cost matrix."""
        return jnp.mean(self.cost_matrix)

    def _finite_stats(self) -> tuple[Array, Array, Array]:
        """``(max |C|, sum C / max |C|, count)`` over the finite entries of ``C``."""
        return _finite_stats(self.cost_matrix)

    def default_epsilon(self, fraction: float = 0.05) -> Array:
        """The solvers' default epsilon: ``fraction`` times the mean finite cost.

        Finite and positive for every input: non-finite entries (``+inf`` for
        forbidden pairs) are left out of the mean, the mean is taken as
        ``max|C| * mean(C / max|C|)`` (no overflow at costs ~1e35 in float32), a cost
        that is zero (or has no finite entry) falls back to a scale of 1 (the plan
        is then ``a b^T`` for every epsilon), and the result is at least
        ``tiny / eps_mach`` of the dtype (about 1e-31 in float32: no underflow to 0,
        or to subnormals that the CPU flushes to 0, for costs ~1e-38). No gradient
        flows through it (``stop_gradient``).

        Example:
            >>> import jax.numpy as jnp, otlab
            >>> c = jnp.array([[0.0, 3.0], [jnp.inf, 0.0]])  # mean finite cost 1
            >>> round(float(otlab.Geometry(c).default_epsilon()), 6)
            0.05
            >>> round(float(otlab.Geometry(jnp.zeros((3, 3))).default_epsilon()), 6)  # scale 1
            0.05
        """
        mx, total, count = jax.lax.stop_gradient(self._finite_stats())
        mean = mx * (total / jnp.maximum(count, 1.0))
        mean = jnp.where(jnp.isfinite(mean) & (mean > 0), mean, jnp.ones_like(mean))
        info = jnp.finfo(mean.dtype)
        return jnp.maximum(fraction * mean, info.tiny / info.eps)

    def marginals(self, f: Array, g: Array, epsilon: Array) -> tuple[Array, Array]:
        """``(P 1, P^T 1)`` from one pass of exponentials (no max shift: meant for
        potentials near a solution, where ``P <= 1``; overflow shows as ``inf``)."""
        p = jnp.exp(_logits(self.cost_matrix, f, g, epsilon))
        # Materialise P once, then two matrix-vector products: XLA fuses each
        # reduction with its own copy of the exponentials (twice the passes of exp),
        # measured ~1.8x slower at 2000 x 2000.
        ones = jnp.ones(p.shape[1], p.dtype)
        return _matvec(p, ones), _rmatvec(p, jnp.ones(p.shape[0], p.dtype))

    def row_sparsify(self, f: Array, g: Array, epsilon: Array, bins: int):
        """A static-shape sparse sketch of ``P``: the largest entry of each row in
        each of ``bins`` strided column bins (``j mod bins``).

        Returns ``(log_values, indices)``, both ``(n, bins)``. One pass of
        comparisons, no sort: an approximate per-row top-``bins`` that keeps the
        largest entry of the row exactly and spreads neighbouring columns over
        different bins. ``bins >= m`` keeps every entry.
        """
        return _binned_max(_logits(self.cost_matrix, f, g, epsilon), bins)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Geometry(_GeometryBase):
    """A geometry given by its cost matrix.

    Args:
        cost_matrix: ``(n, m)`` array of costs ``C_ij``.

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> geom = otlab.Geometry(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
        >>> geom.shape
        (2, 2)
    """

    cost_matrix: Array

    def __post_init__(self):
        c = _maybe_array(self.cost_matrix)
        object.__setattr__(self, "cost_matrix", c)
        # ``>= 2``, not ``== 2``: unflattening under ``vmap`` rebuilds the geometry
        # with batched leaves. Solvers check exact shapes on entry.
        if _has_shape(c) and c.ndim < 2:
            raise ValueError(f"`cost_matrix` must be 2-D, got shape {c.shape}.")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.cost_matrix.shape)

    @property
    def dtype(self):
        return self.cost_matrix.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PointCloud(_GeometryBase):
    """Two clouds of points and a ground cost, dense or online.

    Args:
        x: ``(n, d)`` source points.
        y: ``(m, d)`` target points (defaults to ``x``).
        cost: an otlab cost, an ott-jax ``CostFn`` or a callable ``c(x, y)``;
            default squared Euclidean.
        block_size: static. ``None``: the cost matrix is evaluated (dense). An
            integer ``k``: online mode, every pass goes over blocks of ``k`` rows
            or columns and memory stays ``O(k * max(n, m))``. ``"auto"``: online,
            ``k`` from `auto_block_size` (the sizes, the dtype and a memory budget
            per block).

    Example:
        >>> import jax, otlab
        >>> x = jax.random.normal(jax.random.key(0), (100, 2))
        >>> online = otlab.PointCloud(x, x + 1.0, block_size=32)
        >>> online.is_online
        True
    """

    x: Array
    y: Array | None = None
    cost: costs_lib.CostLike = None
    block_size: int | None = _static(default=None)

    def __post_init__(self):
        x = _maybe_array(self.x)
        y = x if self.y is None else _maybe_array(self.y)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "cost", costs_lib.as_cost(self.cost))
        if isinstance(self.block_size, str):
            if self.block_size != "auto":
                raise ValueError(
                    f"`block_size` must be a positive int, 'auto' or None, got {self.block_size!r}."
                )
            if _has_shape(x, y):
                n, m = x.shape[0], y.shape[0]
                dtype = jnp.result_type(x, y)
                object.__setattr__(self, "block_size", auto_block_size(n, m, dtype))
        elif self.block_size is not None and (
            not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1
        ):
            raise ValueError(
                f"`block_size` must be a positive int, 'auto' or None, got {self.block_size!r}."
            )
        if isinstance(self.block_size, np.integer):  # static: a plain int, as max_iter
            object.__setattr__(self, "block_size", int(self.block_size))
        if _has_shape(x, y):  # ``ndim >= 2``: see ``Geometry.__post_init__``
            if x.ndim < 2 or y.ndim < 2:
                raise ValueError(
                    f"`x` and `y` must be 2-D (points, dim); got shapes {x.shape} and {y.shape}."
                )
            if x.shape[-1] != y.shape[-1]:
                raise ValueError(
                    f"`x` and `y` must have the same dimension; got {x.shape[-1]} and {y.shape[-1]}."
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self):
        return jnp.result_type(self.x, self.y)

    @property
    def is_online(self) -> bool:
        return self.block_size is not None

    @property
    def _pass_rows(self) -> int:
        """Rows per block of the online passes other than the fused log-sum-exp:
        ``block_size``, capped to `PASS_BLOCK_BYTES` per block."""
        n, m = self.shape
        return min(self.block_size, auto_block_size(n, m, self.dtype, PASS_BLOCK_BYTES))

    @property
    def cost_matrix(self) -> Array:
        """The ``(n, m)`` cost matrix, evaluated (also in online mode, when asked)."""
        return self.cost.all_pairs(self.x, self.y)

    def _cost_rows(self, xb: Array) -> Array:
        return self.cost.all_pairs(xb, self.y)

    def _cost_cols(self, yb: Array) -> Array:
        """Cost block for columns ``yb``, shape ``(n, len(yb))`` (reduced along axis 0:
        no transpose, which costs several times the pass itself on CPU)."""
        return self.cost.all_pairs(self.x, yb)

    def materialize(self) -> _GeometryBase:
        if self.is_online:
            return self
        return Geometry(self.cost_matrix)

    @_eager_jit(("axis",))
    def lse(self, f, g, epsilon, axis, shift=None):
        if not self.is_online:
            return super().lse(f, g, epsilon, axis)
        if axis not in (0, 1):
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        parts = _separable(self.cost, self.x, self.y)
        if parts is not None:
            return _factored_lse(parts, f, g, epsilon, axis, self.block_size, shift)
        if axis == 1:
            return _map_blocks(
                lambda xb, fb: _lse_last(_logits(self._cost_rows(xb), fb, g, epsilon)),
                self._pass_rows,
                (self.x, f),
            )
        if axis == 0:
            return _map_blocks(
                lambda yb, gb: _lse_first(_logits(self._cost_cols(yb), f, gb, epsilon)),
                self._pass_rows,
                (self.y, g),
            )
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")

    def plan_operator(self, f, g, epsilon):
        if not self.is_online:
            return super().plan_operator(f, g, epsilon)
        return PlanOperator(self, f, g, jnp.asarray(epsilon), None)

    @_eager_jit()
    def plan_cost(self, f, g, epsilon):
        if not self.is_online:
            return super().plan_cost(f, g, epsilon)

        def block(xb, fb):
            c = self._cost_rows(xb)
            return jnp.sum(c * jnp.exp(_logits(c, fb, g, epsilon)), axis=1)

        return jnp.sum(_map_blocks(block, self._pass_rows, (self.x, f)))

    @_eager_jit()
    def primal_terms(self, f, g, epsilon, log_a, log_b):
        if not self.is_online:
            return super().primal_terms(f, g, epsilon, log_a, log_b)
        t = _map_blocks(
            lambda xb, fb, lab: _primal_terms(self._cost_rows(xb), fb, g, epsilon, lab, log_b),
            self._pass_rows,
            (self.x, f, log_a),
        )
        return tuple(jnp.sum(t, 0))

    def _feature_mean(self) -> Array | None:
        """The mean cost in O((n + m) r) from a factored cost (`Cost.features`), else
        ``None``: ``mean(phi) . mean(psi)``. Exact, and without cancellation for the
        squared Euclidean and Mahalanobis costs: on the jointly centred clouds it is
        ``mean|x|^2 + mean|y|^2 + 2 (m / n) |mean y|^2``, a sum of non-negative terms."""
        feats = self.cost.features(self.x, self.y)
        if feats is None:
            return None
        return jnp.mean(feats[0], 0) @ jnp.mean(feats[1], 0)

    def mean_cost(self):
        if not self.is_online:
            return super().mean_cost()
        mean = self._feature_mean()
        if mean is not None:
            return mean
        rows = _map_blocks(lambda xb: jnp.sum(self._cost_rows(xb), 1), self._pass_rows, (self.x,))
        return jnp.sum(rows) / (self.shape[0] * self.shape[1])

    def _finite_stats(self):
        mean = self._feature_mean()
        if mean is not None:  # no pass over the pairs (nor a copy of it to compile)
            one = jnp.ones((), mean.dtype)
            return mean, one, one
        if not self.is_online:
            return super()._finite_stats()
        mx, total, count = _map_blocks(
            lambda xb: _finite_stats(self._cost_rows(xb), axis=1), self._pass_rows, (self.x,)
        )
        return _combine_stats(mx, total, count)

    @_eager_jit()
    def marginals(self, f, g, epsilon):
        if not self.is_online:
            return super().marginals(f, g, epsilon)
        op = self.plan_operator(f, g, epsilon)
        return op.matvec(jnp.ones(self.shape[1], f.dtype)), op.rmatvec(jnp.ones_like(f))

    def row_sparsify(self, f, g, epsilon, bins):
        if not self.is_online:
            return super().row_sparsify(f, g, epsilon, bins)
        return _map_blocks(
            lambda xb, fb: _binned_max(_logits(self._cost_rows(xb), fb, g, epsilon), bins),
            self._pass_rows,
            (self.x, f),
        )

    def plan_cost_at(self, f: Array, g: Array, epsilon: Array, x_cost: Array) -> Array:
        """``<C(x_cost, y), P>``: this geometry's plan ``P`` priced with the cost between
        other source points ``x_cost`` (same number and order as ``x``) and ``y``.

        Used by `otlab.progot`, whose coupling is the plan of the last step's displaced
        points and whose cost is that of the original points. Dense or blocked, like
        `plan_cost`.
        """
        if not self.is_online:
            c = self.cost.all_pairs(x_cost, self.y)
            return jnp.sum(c * jnp.exp(_logits(self.cost_matrix, f, g, epsilon)))

        def block(xb, xcb, fb):
            c = self.cost.all_pairs(xcb, self.y)
            return jnp.sum(c * jnp.exp(_logits(self._cost_rows(xb), fb, g, epsilon)), axis=1)

        return jnp.sum(_map_blocks(block, self._pass_rows, (self.x, x_cost, f)))

    @_eager_jit()
    def transport(self, g: Array, epsilon: Array, x_new: Array) -> Array:
        """Entropic (barycentric) map of new points, ``T(x) = sum_j w_j(x) y_j``.

        ``w_j(x)`` is the softmax over ``j`` of ``(g_j - c(x, y_j)) / epsilon``: the
        conditional of the plan extended to ``x`` by the c-transform of ``g``.
        """
        x_new = jnp.asarray(x_new)
        new = PointCloud(jnp.atleast_2d(x_new), self.y, self.cost, self.block_size)
        f_new = -epsilon * new.lse(jnp.zeros(new.shape[0], new.dtype), g, epsilon, axis=1)
        out = new.plan_operator(f_new, g, epsilon).matvec(self.y)
        return out[0] if x_new.ndim == 1 else out


#: What solvers accept as ``geom``: an otlab geometry, an ott-jax geometry or a
#: cost matrix.
GeometryLike = Geometry | PointCloud | jax.Array | np.ndarray | Any


def from_ott(geom: Any) -> Geometry | PointCloud:
    """Convert an ott-jax geometry: a ``PointCloud`` keeps its points and cost,
    anything else becomes a dense `Geometry` of its cost matrix.

    ott-jax's ``epsilon`` is not part of an otlab geometry; the solvers, given an
    ott-jax geometry and no ``epsilon``, use the one it was built with
    (``epsilon=`` or ``relative_epsilon=``; otherwise otlab's default).
    """
    from ott.geometry import pointcloud as ott_pc

    if isinstance(geom, ott_pc.PointCloud):
        cost = costs_lib.as_cost(geom.cost_fn)
        if not (isinstance(geom._scale_cost, (int, float)) and geom._scale_cost == 1.0):
            cost = costs_lib.Scaled(cost, jnp.asarray(geom.inv_scale_cost))  # ott's scale_cost
        return PointCloud(geom.x, geom.y, cost=cost, block_size=geom.batch_size)
    return Geometry(geom.cost_matrix)


def as_geometry(geom: GeometryLike) -> Geometry | PointCloud:
    """Accept an otlab geometry, an ott-jax geometry, or a 2-D cost matrix."""
    if isinstance(geom, _GeometryBase):  # also otlab.sharding.ShardedGeometry
        return geom
    mod = type(geom).__module__ or ""
    if mod.startswith("ott."):
        return from_ott(geom)
    if isinstance(geom, (np.ndarray, jax.Array)):
        return Geometry(geom)
    raise ValueError(
        "`geom` must be an otlab Geometry/PointCloud, an ott-jax geometry or a cost matrix; "
        f"got {type(geom).__name__}."
    )


# ------------------------------------------------------------------ top-k selection
# Column- or row-wise top-k of the scores ``f_i + g_j - C_ij`` and gathers of single
# cost entries: what the cardinality-constrained solver (`otlab.cardinality_constrained`)
# asks of a geometry. Added as functions (bound below as methods) so that the
# classes above stay untouched.


def _scores(c: Array, fr: Array, gc: Array) -> Array:
    return fr[:, None] + gc[None, :] - c


def _lax_top_k(z: Array, k: int) -> tuple[Array, Array]:
    """``lax.top_k`` along the last axis as one call on a ``(rows, n)`` operand, also
    under `jax.vmap`.

    XLA's CPU ``TopK`` runs its fast partial selection only on operands of rank
    ``<= 2``; a rank-3 operand (which ``vmap`` makes of a ``(lines, n)`` call) is
    lowered to a full sort of every row (~50x slower at ``16 x 100 x 100``). The
    leading axes are folded into one here, and a `jax.custom_batching.custom_vmap`
    rule folds the batch axes that ``vmap`` adds. (Used without gradients: the
    selections are under ``stop_gradient``.)"""
    return _top_k_fn(k)(jax.lax.stop_gradient(z))


@functools.cache
def _top_k_fn(k: int):
    @jax.custom_batching.custom_vmap
    def top_k(z):
        lead = z.shape[:-1]
        v, i = jax.lax.top_k(z.reshape((-1, z.shape[-1])), k)
        return v.reshape(lead + (k,)), i.reshape(lead + (k,))

    @top_k.def_vmap
    def _rule(axis_size, in_batched, z):
        return top_k(z), (in_batched[0], in_batched[0])

    return top_k


def _pairwise_ranks(v: Array) -> Array:
    """Each entry's rank along the last axis of ``v`` (``0``: the largest; ties to the
    lower index), int32, by pairwise comparisons: for the few candidates of a row,
    cheaper than XLA's CPU sort (~10x at ``200 x 25``). Reduced over the second-to-last
    axis, so XLA's CPU loop runs along contiguous entries (``200 x 25``: 29 us, against
    45 us over the last axis)."""
    j = jnp.arange(v.shape[-1])
    vj, vi = v[..., :, None], v[..., None, :]  # (..., other j, entry i)
    return jnp.sum((vj > vi) | ((vj == vi) & (j[:, None] < j[None, :])), axis=-2, dtype=jnp.int32)


def _top_k(z: Array, k: int) -> tuple[Array, Array]:
    """``lax.top_k`` along the last axis, fast in float64 too.

    XLA's CPU ``top_k`` is a full sort in float64 (~50x slower than float32 at
    1000 x 1000). Float64 input: candidates are the float32 top-``(k + 4)``, then the
    exact float64 top-``k`` among them by pairwise ranks (ties to the lower index,
    as ``top_k``); only more than 4 entries tied with the ``k``-th in float32 could
    differ from an exact selection.
    """
    if z.dtype != jnp.float64 or k + 4 >= z.shape[-1]:
        return _lax_top_k(z, k)
    m = k + 4
    cand = _lax_top_k(z.astype(jnp.float32), m)[1]
    vals = jnp.take_along_axis(z, cand, axis=-1)
    rank = _pairwise_ranks(vals)
    pos = jnp.argmax(rank[..., None, :] == jnp.arange(k)[:, None], axis=-1)
    return jnp.take_along_axis(vals, pos, axis=-1), jnp.take_along_axis(cand, pos, axis=-1)


def _topk_last(z: Array, k: int) -> Array:
    if k >= z.shape[-1]:  # every entry: no sort
        return jnp.broadcast_to(jnp.arange(z.shape[-1], dtype=jnp.int32), z.shape)
    return _top_k(z, k)[1].astype(jnp.int32)


def _topk(self, f: Array, g: Array, k: int, axis: int = 0) -> Array:
    """Indices of the ``k`` largest scores ``f_i + g_j - C_ij`` in each column
    (``axis=0``: shape ``(m, k)``, row indices) or each row (``axis=1``: shape
    ``(n, k)``, column indices), sorted by decreasing score.

    The selection is piecewise constant in its inputs and carries no gradient
    (``stop_gradient``); gather the selected costs with `cost_at`. Online point
    clouds never build the ``n x m`` matrix: rows go block by block, and for
    ``axis=0`` a running top-``k`` per column is merged with each row block.
    """
    f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
    if axis not in (0, 1):
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
    if not self.is_online:
        c = jax.lax.stop_gradient(self.cost_matrix)
        if axis == 1:
            return _topk_last(_scores(c, f, g), k)
        return _topk_last(_scores(c.T, g, f), k)
    if axis == 1:
        return _map_blocks(
            lambda xb, fb: _topk_last(_scores(self._cost_rows(xb), fb, g), k),
            self._pass_rows,
            (jax.lax.stop_gradient(self.x), f),
        )
    return _running_topk_cols(self, f, g, k)


def _running_topk_cols(geom, f: Array, g: Array, k: int) -> Array:
    """Column-wise top-``k`` over row blocks: memory ``O(m (k + block_size))``."""
    n, m = geom.shape
    nb, bs = _blocks(n, geom._pass_rows)
    pad = nb * bs - n
    x = jnp.pad(jax.lax.stop_gradient(geom.x), [(0, pad), (0, 0)])
    fp = jnp.pad(f, (0, pad), constant_values=-jnp.inf)  # padded rows never selected
    rows = jnp.arange(nb * bs, dtype=jnp.int32)
    kk = min(k, n)
    # (zeros computed from ``f``: inside ``shard_map`` (`otlab.sharding`) the carry then
    # varies over the devices like the body's output, as a scan requires)
    zero = jnp.where(jnp.isnan(f[:1]), 0.0, 0.0)[:, None]
    init = (
        jnp.full((m, kk), -jnp.inf, f.dtype) + zero,
        jnp.zeros((m, kk), jnp.int32) + zero.astype(jnp.int32),
    )

    def body(carry, blk):
        vals, idx = carry
        xb, fb, rb = blk
        s = _scores(geom._cost_rows(xb), fb, g).T  # (m, bs)
        cat_v = jnp.concatenate([vals, s], axis=1)
        cat_i = jnp.concatenate([idx, jnp.broadcast_to(rb, (m, bs))], axis=1)
        v, pos = _top_k(cat_v, kk)
        return (v, jnp.take_along_axis(cat_i, pos, axis=1)), None

    split = lambda z: z.reshape((nb, bs) + z.shape[1:])  # noqa: E731
    (_, idx), _ = jax.lax.scan(body, init, (split(x), split(fp), split(rows)))
    return idx


def _cost_at(self, rows: Array, cols: Array) -> Array:
    """The cost entries ``C[rows, cols]`` (broadcast index arrays), differentiable in
    the cost matrix, or in the points and cost parameters of a point cloud (each entry
    is ``c(x_i, y_j)``, evaluated on its own: no ``n x m`` matrix)."""
    if isinstance(self, PointCloud):
        rows, cols = jnp.broadcast_arrays(rows, cols)
        xs = self.x[rows.reshape(-1)]
        ys = self.y[cols.reshape(-1)]
        return jax.vmap(self.cost)(xs, ys).reshape(rows.shape)
    return self.cost_matrix[rows, cols]


def _reduce_scores(self, f: Array, g: Array, axis: int, fn, combine) -> Array:
    """``fn(scores, axis)`` per line of the ``n x m`` scores (``axis=0``: per column);
    online clouds go block by block, ``combine(parts, 0)`` merging the row blocks'
    results (``jnp.max`` for a max, ``jnp.sum`` for a count)."""
    f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
    if axis not in (0, 1):
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
    if not self.is_online:
        return fn(_scores(jax.lax.stop_gradient(self.cost_matrix), f, g), axis)
    x = jax.lax.stop_gradient(self.x)
    if axis == 1:
        return _map_blocks(
            lambda xb, fb: fn(_scores(self._cost_rows(xb), fb, g), 1), self._pass_rows, (x, f)
        )
    nb, bs = _blocks(x.shape[0], self._pass_rows)
    pad = nb * bs - x.shape[0]
    xp = jnp.pad(x, [(0, pad), (0, 0)], mode="edge")
    fp = jnp.pad(f, (0, pad), constant_values=-jnp.inf)  # padded rows: score -inf
    part = jax.lax.map(
        lambda blk: fn(_scores(self._cost_rows(blk[0]), blk[1], g), 0),
        (xp.reshape(nb, bs, -1), fp.reshape(nb, bs)),
    )
    return combine(part, 0)


def _max_score(self, f: Array, g: Array, axis: int = 0) -> Array:
    """The largest score ``f_i + g_j - C_ij`` of each column (``axis=0``, shape
    ``(m,)``) or row (``axis=1``, ``(n,)``): one reduction pass, no sort (no gradient).

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> geom = otlab.Geometry(jnp.array([[0.0, 2.0], [1.0, 0.5]]))
        >>> geom.max_score(jnp.zeros(2), jnp.zeros(2), axis=0)
        Array([ 0. , -0.5], dtype=float32)
    """
    return _reduce_scores(self, f, g, axis, lambda s, ax: jnp.max(s, axis=ax), jnp.max)


def _count_at_least(self, f: Array, g: Array, t: Array, axis: int = 0) -> Array:
    """How many scores ``f_i + g_j - C_ij`` of each column (``axis=0``) or row
    (``axis=1``) are ``>= t`` (one threshold per line): one reduction pass, no sort.
    With `topk` on a few candidates it certifies a top-``k`` selection (the solver
    of `otlab.cardinality_constrained` reuses candidates while this count agrees).

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> geom = otlab.Geometry(jnp.array([[0.0, 2.0], [1.0, 0.5]]))
        >>> geom.count_at_least(jnp.zeros(2), jnp.zeros(2), jnp.array([-1.0, -1.0]), axis=1)
        Array([1, 2], dtype=int32)
    """
    f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
    t = jax.lax.stop_gradient(t)
    def count(s, ax):
        return jnp.sum(s >= 0, axis=ax, dtype=jnp.int32)

    if axis == 1:
        return _reduce_scores(self, f - t, g, 1, count, jnp.sum)
    return _reduce_scores(self, f, g - t, 0, count, jnp.sum)


_GeometryBase.topk = _topk
_GeometryBase.cost_at = _cost_at
_GeometryBase.max_score = _max_score
_GeometryBase.count_at_least = _count_at_least
