"""Geodesics under a Riemannian metric, and interpolation of measures along them.

A path ``x_0, ..., x_{K-1}`` with fixed endpoints is a discrete geodesic when it
minimises the discretised energy (midpoint rule, ``h = 1 / (K - 1)``)

$$ E(x) = \\frac{1}{h} \\sum_{k=0}^{K-2} (x_{k+1} - x_k)^T\\, G\\!\\left(\\tfrac{x_k + x_{k+1}}{2}\\right) (x_{k+1} - x_k), $$

whose minimisers have constant speed, so that ``E = L^2`` for the length
``L = sum_k |x_{k+1} - x_k|_G`` (`length`). `shortest_path` minimises ``E`` over
the interior points with L-BFGS (``optax.lbfgs`` with its zoom line search),
starting from the straight line and preconditioned by a scaled sine basis (the
eigenbasis of the discrete Laplacian that dominates the Hessian), and differentiates the minimiser by the implicit
function theorem (a ``jax.custom_vjp`` on ``grad E = 0``, a conjugate-gradient
solve with the Hessian), so gradients with respect to the endpoints and the
metric's parameters never unroll the optimiser.

Interpolating two samples (Scarvelis & Solomon, 2023, "Riemannian metric learning
via optimal transport", ICLR): couple them by entropic OT with the metric-induced
cost `otlab.costs.Riemannian`, send each source point to its barycentric target,
and move it along the geodesic to the fraction ``t`` of its length (`interpolate`).
With a constant identity metric this is McCann's displacement interpolation of the
(barycentric) entropic coupling. `trajectories` chains this through several
snapshots.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from otlab import geodesic, metric
    >>> g = metric.PoincareHalfPlane()
    >>> path = geodesic.shortest_path(g, jnp.array([-1.0, 1.0]), jnp.array([1.0, 1.0]), 33)
    >>> path.shape, round(float(path[16, 1]), 2)  # the top of the arc, sqrt(2)
    ((33, 2), 1.41)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["energy", "length", "shortest_path", "interpolate", "trajectories"]

Array = jax.Array
#: A metric: a pytree callable ``x -> G(x)`` (`otlab.metric`).
MetricLike = Callable[[Array], Array]


def _segments(metric, path: Array) -> Array:
    """``(K - 1,)`` squared metric lengths ``dx^T G(mid) dx`` of the path's segments."""
    dx = path[1:] - path[:-1]
    g = metric(0.5 * (path[1:] + path[:-1]))
    return jnp.einsum("ki,kij,kj->k", dx, g, dx)


def energy(metric: MetricLike, path: Array) -> Array:
    """The discrete path energy ``E`` of a ``(K, d)`` path (see the module docstring)."""
    return (path.shape[0] - 1) * jnp.sum(_segments(metric, path))


def _safe_sqrt(s: Array) -> Array:
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def length(metric: MetricLike, path: Array) -> Array:
    """The metric length ``sum_k sqrt(dx_k^T G(mid_k) dx_k)`` of a ``(K, d)`` path.

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab import geodesic, metric
        >>> g = metric.Constant(jnp.diag(jnp.array([4.0, 1.0])))
        >>> float(geodesic.length(g, jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0]])))
        5.0
    """
    path = jnp.asarray(path)
    if path.ndim != 2 or path.shape[0] < 2:
        raise ValueError(f"`path` must have shape (K >= 2, d); got {path.shape}.")
    return jnp.sum(_safe_sqrt(_segments(metric, path)))


def _lbfgs_minimise(objective, z0: Array, max_steps: int, tol: float) -> Array:
    """Minimise ``objective`` from ``z0`` with optax's L-BFGS; stop when the gradient
    norm is ``<= tol`` times the initial one, when a step no longer lowers the value
    by more than its rounding (``eps |E|``), or after ``max_steps``.

    The zoom line search keeps the value and gradient at the point it accepts; the
    next step and the stopping test reuse them, so a step that accepts L-BFGS's unit
    step (nearly all of them in the sine basis) costs one value-and-gradient.
    """
    linesearch = optax.scale_by_zoom_linesearch(_LINESEARCH_STEPS, initial_guess_strategy="one")
    opt = optax.lbfgs(linesearch=linesearch)
    value_and_grad = optax.value_and_grad_from_state(objective)
    eps = jnp.finfo(z0.dtype).eps

    # The stall test matters where the start is already optimal (a constant metric): its
    # gradient is rounding noise, which a relative test on the gradient never passes,
    # and under vmap one such pair would hold the whole batch to max_steps.
    def cond(carry):
        k, _, _, gnorm, gnorm0, value, previous = carry
        moving = (k == 0) | (previous - value > eps * jnp.abs(previous))
        return (k < max_steps) & (gnorm > tol * gnorm0) & jnp.isfinite(gnorm) & moving

    def body(carry):
        k, z, state, _, gnorm0, value, _ = carry
        _, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=objective)
        z = optax.apply_updates(z, updates)
        gnorm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return k + 1, z, state, gnorm, gnorm0, optax.tree_utils.tree_get(state, "value"), value

    value0, grad0 = jax.value_and_grad(objective)(z0)
    g0 = jnp.linalg.norm(grad0)
    init = (jnp.asarray(0), z0, opt.init(z0), g0, g0, value0, value0)
    return jax.lax.while_loop(cond, body, init)[1]


#: Cap on the zoom line search's evaluations per L-BFGS step (optax's default is 20).
#: Under ``vmap`` every step waits for the slowest pair's line search.
_LINESEARCH_STEPS = 8


def _default_tol(dtype) -> float:
    return 1e-9 if dtype == jnp.float64 else 1e-5


def shortest_path(
    metric: MetricLike,
    x0: Array,
    x1: Array,
    num_points: int = 32,
    *,
    max_steps: int = 200,
    tol: float | None = None,
) -> Array:
    """The discrete geodesic from ``x0`` to ``x1``: ``num_points`` points, endpoints included.

    Pure and vmappable: ``jax.vmap(lambda a, b: shortest_path(g, a, b))(X0, X1)``
    computes a batch. A module-level ``jax.jit``: eager calls with the same shapes
    and options compile once (a metric whose leaves are arrays is traced; a plain
    function metric is static). Differentiable in ``x0``, ``x1`` and the metric's leaves by
    implicit differentiation of the optimality condition.

    Args:
        metric: an `otlab.metric` metric (or any pytree callable ``x -> G(x)``).
        x0: ``(d,)`` start point (traced).
        x1: ``(d,)`` end point (traced).
        num_points: static, ``K >= 3``: points of the discrete path.
        max_steps: static cap on L-BFGS iterations.
        tol: static. Stop when the energy's gradient norm falls below ``tol`` times
            its value at the straight line, or when a step lowers the energy by no
            more than rounding; default ``1e-5`` (float32) / ``1e-9`` (float64).

    Returns:
        Array: the ``(num_points, d)`` path.

    Raises:
        ValueError: if ``x0`` and ``x1`` are not points of the same dimension or
            an option is out of range.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from otlab import geodesic, metric
        >>> g = metric.Constant(jnp.eye(2))
        >>> x0, x1 = jnp.zeros((1000, 2)), jnp.ones((1000, 2))
        >>> paths = jax.vmap(lambda a, b: geodesic.shortest_path(g, a, b, 8))(x0, x1)
        >>> paths.shape
        (1000, 8, 2)
    """
    x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
    if x0.ndim != 1 or x0.shape != x1.shape:
        raise ValueError(
            f"`x0` and `x1` must be points of the same dimension (shape (d,)); got {x0.shape} "
            f"and {x1.shape}."
        )
    if not isinstance(num_points, (int, np.integer)) or num_points < 3:
        raise ValueError(f"`num_points` must be an int >= 3; got {num_points!r}.")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int; got {max_steps!r}.")
    dtype = jnp.result_type(x0, x1, float)
    x0, x1 = x0.astype(dtype), x1.astype(dtype)
    tol = _default_tol(dtype) if tol is None else float(tol)
    return _call(_shortest_path, metric, x0, x1, num_points=int(num_points), max_steps=int(max_steps), tol=tol)


@functools.partial(jax.jit, static_argnames=("num_points", "max_steps", "tol"))
def _shortest_path(metric, x0, x1, *, num_points, max_steps, tol):
    """The jitted core of `shortest_path` (compiled once per metric structure, shapes
    and static options; eager calls reuse it)."""
    w = _coefficients(metric, x0, x1, num_points, max_steps, tol)
    line, basis = _line_and_basis(x0, x1, num_points)
    return jnp.concatenate([x0[None], line + basis @ w, x1[None]])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _StaticMetric:
    """A metric that is not a pytree of arrays (a plain function ``x -> G(x)``), held
    as static data: a jitted core compiles once per such object, not per call."""

    fn: Callable = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x):
        return self.fn(x)


def _is_array_leaf(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray, np.generic, int, float, complex))


def _call(core, metric, *args, **static):
    """``core(metric, *args, **static)`` with the metric as a traced pytree argument, or,
    when its leaves are not arrays (a plain callable), as static data; a metric that
    cannot be hashed either runs the core unjitted (traced anew on every call)."""
    if all(_is_array_leaf(v) for v in jax.tree.leaves(metric)):
        return core(metric, *args, **static)
    try:
        hash(metric)
    except TypeError:
        return core.__wrapped__(metric, *args, **static)
    return core(_StaticMetric(metric), *args, **static)


def _line_and_basis(x0: Array, x1: Array, num_points: int) -> tuple[Array, Array]:
    """The straight line's interior points and the preconditioned sine basis.

    The interior points are the straight line plus a sine series whose k-th mode is
    scaled by 1 / (pi k). The discrete Laplacian, which dominates the energy's
    Hessian, is diagonal in that basis with eigenvalues ~ (pi k)^2, so the Hessian in
    the coefficients is as well conditioned as the metric itself (L-BFGS on raw
    points would need ~ num_points^2 times more iterations).
    """
    u = jnp.linspace(0.0, 1.0, num_points, dtype=x0.dtype)[1:-1, None]
    k = jnp.arange(1, num_points - 1, dtype=x0.dtype)
    return x0 + u * (x1 - x0), jnp.sin(jnp.pi * u * k[None, :]) / (jnp.pi * k[None, :])


def _path_energy(w: Array, metric, x0: Array, x1: Array, num_points: int) -> Array:
    line, basis = _line_and_basis(x0, x1, num_points)
    return energy(metric, jnp.concatenate([x0[None], line + basis @ w, x1[None]]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _coefficients(metric, x0, x1, num_points, max_steps, tol):
    """The sine coefficients of the discrete geodesic, ``argmin_w E(w; metric, x0, x1)``.

    Differentiated implicitly: at the minimiser ``grad_w E = 0``, so the cotangent
    ``w_bar`` pulls back as ``-(d grad_w E / d theta)^T H^{-1} w_bar`` with ``H`` the
    energy's Hessian in ``w`` (conjugate gradient on Hessian-vector products).
    """
    w0 = jnp.zeros((num_points - 2, x0.shape[0]), x0.dtype)
    return _lbfgs_minimise(lambda w: _path_energy(w, metric, x0, x1, num_points), w0, max_steps, tol)


def _coefficients_fwd(metric, x0, x1, num_points, max_steps, tol):
    w = _coefficients(metric, x0, x1, num_points, max_steps, tol)
    return w, (metric, x0, x1, w)


def _coefficients_bwd(num_points, max_steps, tol, res, w_bar):
    metric, x0, x1, w = res
    grad_w = jax.grad(_path_energy)

    def hvp(v):
        return jax.jvp(lambda w: grad_w(w, metric, x0, x1, num_points), (w,), (v,))[1]

    v = jax.scipy.sparse.linalg.cg(hvp, w_bar, tol=tol)[0]
    _, pullback = jax.vjp(lambda m, a, b: grad_w(w, m, a, b, num_points), metric, x0, x1)
    return pullback(-v)


_coefficients.defvjp(_coefficients_fwd, _coefficients_bwd)


def _at_fraction(metric, path: Array, t: Array) -> Array:
    """The point at fraction ``t`` of the path's metric length (linear within segments)."""
    seg = _safe_sqrt(_segments(metric, path))
    s = jnp.concatenate([jnp.zeros((1,), path.dtype), jnp.cumsum(seg)])
    total = s[-1]
    # a zero-length path (x0 == x1): parametrise by index instead
    s = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), jnp.linspace(0, 1, len(s)))
    return jax.vmap(lambda col: jnp.interp(t, s, col), in_axes=1, out_axes=-1)(path)


def _check_samples(x, name: str, dim: int | None = None) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"`{name}` must be an (n, d) array of samples; got shape {x.shape}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"`{name}` has dimension {x.shape[1]}; expected {dim}.")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"`{name}` has non-finite (NaN or inf) entries.")
    return x


def _cost_scale(geom) -> Array:
    """The unit of ``epsilon``: the mean over source points of the cheapest target's cost
    (the size of a plausible move), not the mean cost, which far-apart pairs under a
    strongly varying metric can inflate by orders of magnitude. Not differentiated."""
    c = jax.lax.stop_gradient(geom.cost_matrix)
    nearest = jnp.mean(jnp.min(c, axis=1))
    return jnp.where(nearest > 0, nearest, jnp.mean(c))


def _couple(metric, x, y, epsilon, cost_method):
    """Barycentric targets of ``x`` in ``y`` under entropic OT with the Riemannian cost."""
    from otlab import costs, sinkhorn
    from otlab.geometry import PointCloud

    cost = costs.Riemannian(metric, method=cost_method)
    geom = PointCloud(x, y, cost=cost)
    eps = epsilon * _cost_scale(geom)
    sol = sinkhorn(geom, epsilon=eps, tol=1e-4, max_iter=5000)
    return sol.transport(x)


def interpolate(
    metric: MetricLike,
    samples0: Array,
    samples1: Array,
    t: float | Array,
    *,
    epsilon: float = 0.01,
    num_points: int = 16,
    max_steps: int = 100,
    cost_method: str = "simpson",
) -> Array:
    """Samples of the geodesic interpolation between two samples at fraction ``t``.

    The samples are coupled by entropic OT with `otlab.costs.Riemannian` (``epsilon``
    times the mean cost); each source point ``x_i`` moves along the geodesic to its
    barycentric target ``T(x_i) = sum_j P_ij y_j / a_i`` and stops at fraction ``t``
    of its length.

    Args:
        metric: the metric.
        samples0: ``(n, d)`` samples at ``t = 0``.
        samples1: ``(m, d)`` samples at ``t = 1``.
        t: a fraction in ``[0, 1]``, or a ``(k,)`` array of them (traced).
        epsilon: entropic regularisation relative to the mean cost (traced).
        num_points: static, points per geodesic.
        max_steps: static L-BFGS cap per geodesic.
        cost_method: static, the `otlab.costs.Riemannian` method of the coupling:
            ``"simpson"`` (default), ``"midpoint"`` or ``"geodesic"``.

    Returns:
        Array: ``(n, d)`` interpolated samples, or ``(k, n, d)`` for ``k`` fractions.

    Raises:
        ValueError: on samples that are not ``(n, d)`` arrays of one dimension, or
            (when concrete) hold NaN or infinite entries.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from otlab import geodesic, metric
        >>> x = jax.random.normal(jax.random.key(0), (50, 2))
        >>> mid = geodesic.interpolate(metric.Constant(jnp.eye(2)), x, x + 2.0, 0.5)
        >>> bool(jnp.allclose(mid.mean(0), x.mean(0) + 1.0, atol=1e-2))
        True
    """
    x = _check_samples(samples0, "samples0")
    y = _check_samples(samples1, "samples1", x.shape[1])
    if cost_method not in ("midpoint", "simpson", "geodesic"):
        raise ValueError(
            f"`cost_method` must be 'midpoint', 'simpson' or 'geodesic'; got {cost_method!r}."
        )
    for name, v in (("num_points", num_points), ("max_steps", max_steps)):
        if not isinstance(v, (int, np.integer)) or v < (3 if name == "num_points" else 1):
            raise ValueError(f"`{name}` must be a positive int (num_points >= 3); got {v!r}.")
    dtype = jnp.result_type(x, y, float)
    x, y = x.astype(dtype), y.astype(dtype)
    t = jnp.asarray(t, dtype)
    out = _call(
        _interpolate, metric, x, y, jnp.atleast_1d(t), jnp.asarray(epsilon, dtype),
        num_points=int(num_points), max_steps=int(max_steps), cost_method=cost_method,
    )  # fmt: skip
    return out if t.ndim else out[0]


@functools.partial(jax.jit, static_argnames=("num_points", "max_steps", "cost_method"))
def _interpolate(metric, x, y, ts, epsilon, *, num_points, max_steps, cost_method):
    """The jitted body of `interpolate` (a thin wrapper: checks run before it)."""
    targets = _couple(metric, x, y, epsilon, cost_method)
    paths = jax.vmap(
        lambda a, b: shortest_path(metric, a, b, num_points, max_steps=max_steps)
    )(x, targets)
    return jax.vmap(lambda s: jax.vmap(lambda p: _at_fraction(metric, p, s))(paths))(ts)


def trajectories(
    metric: MetricLike,
    snapshots: Sequence[Array],
    times: Sequence[float] | Array,
    t_eval: Array,
    *,
    epsilon: float = 0.01,
    num_points: int = 16,
    max_steps: int = 100,
) -> Array:
    """Trajectories of the first snapshot's points through all the snapshots.

    Particles start at ``snapshots[0]``; on each interval ``[t_i, t_{i+1}]`` they are
    coupled to ``snapshots[i + 1]`` (entropic OT, Riemannian cost), sent to their
    barycentric targets along geodesics, and read off at the times of ``t_eval``
    that fall in the interval (at the fraction ``(t - t_i) / (t_{i+1} - t_i)`` of
    the geodesic's length).

    Args:
        metric: the metric.
        snapshots: a list of ``(n_i, d)`` samples (sizes may differ).
        times: their increasing times.
        t_eval: ``(k,)`` times in ``[t_0, t_T]``.
        epsilon: as in `interpolate`.
        num_points: as in `interpolate`.
        max_steps: as in `interpolate`.

    Returns:
        Array: ``(k, n_0, d)`` positions of the ``n_0`` particles.

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab import geodesic, metric
        >>> snaps = [jnp.zeros((5, 2)), jnp.ones((6, 2)), 2 * jnp.ones((4, 2))]
        >>> paths = geodesic.trajectories(metric.Constant(jnp.eye(2)), snaps, [0, 1, 2], jnp.array([0.5, 1.5]))
        >>> paths.shape, [round(float(v), 3) for v in paths[:, 0, 0]]
        ((2, 5, 2), [0.5, 1.5])
    """
    from otlab.metric.fit import check_snapshots

    snaps, times = check_snapshots(snapshots, times)
    t_eval = np.asarray(t_eval, dtype=float).reshape(-1)
    if np.any(t_eval < times[0]) or np.any(t_eval > times[-1]) or not np.all(np.isfinite(t_eval)):
        raise ValueError(f"`t_eval` must lie in [{times[0]}, {times[-1]}].")
    particles = snaps[0]
    out = [None] * len(t_eval)
    for i in range(len(snaps) - 1):
        t0, t1 = times[i], times[i + 1]
        idx = [k for k, s in enumerate(t_eval) if (t0 <= s <= t1 and out[k] is None)]
        fractions = jnp.asarray([(t_eval[k] - t0) / (t1 - t0) for k in idx] + [1.0], particles.dtype)
        moved = interpolate(
            metric, particles, snaps[i + 1], fractions,
            epsilon=epsilon, num_points=num_points, max_steps=max_steps,
        )  # fmt: skip
        for j, k in enumerate(idx):
            out[k] = moved[j]
        particles = moved[-1]
    return jnp.stack(out)
