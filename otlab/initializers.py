"""Data-dependent initial dual potentials for entropic solvers.

Thornton & Cuturi, "Rethinking Initialization of the Sinkhorn Algorithm",
AISTATS 2023. An initializer is a static callable

    ``init(geom, a, b, epsilon) -> (f0, g0)``

that every otlab entropic solver accepts as ``init=``; it only changes the number
of iterations, never the solution or its gradients (:mod:`otlab.implicit` ignores
the tangent of the initial point).

Conventions (those of :mod:`otlab.geometry`): ``P = exp((f + g - C) / eps)``, ``f``
absorbs ``eps log a``. As ``eps -> 0``, ``f`` and ``g`` tend to Kantorovich
potentials ``u, v`` of the cost ``C`` (``u_i + v_j <= C_ij``, with equality on the
support of an optimal plan). With ``P = diag(a) exp((u + v - C) / eps) diag(b)``,
``f = u + eps log a`` and ``g = v + eps log b``. Each initializer builds a
pair ``(u, v)`` (Kantorovich, or entropic for :func:`gaussian`) and returns

.. math::
    f_0 = u + \\varepsilon \\log a, \\qquad g_0 = v + \\varepsilon \\log b
    \\quad\\text{or}\\quad
    g_{0,j} = \\varepsilon \\log b_j
        - \\varepsilon \\log \\sum_i \\exp\\big((f_{0,i} - C_{ij})/\\varepsilon\\big),

the soft c-transform of ``f0`` (:func:`c_transform`, one log-sum-exp pass: the column
marginal is then exact). otlab's Sinkhorn updates ``f`` from ``g`` first, so ``g0``
is what it really starts from.

* :func:`gaussian` — squared-Euclidean cost: ``(u, v)`` are the entropic
  (Schrodinger) potentials between the Gaussian fits ``N(m_a, S_a)``,
  ``N(m_b, S_b)`` of the weighted clouds at the solver's epsilon (Janati et al.,
  NeurIPS 2020; Mallasto et al., 2021): quadratic,
  ``u(x) = |x|^2 - (x - m_a)^T A (x - m_a) - 2 <m_b, x>`` with
  ``A = S_a^{-1/2} [(S_a^{1/2} S_b S_a^{1/2} + (eps/4)^2 I)^{1/2} - (eps/4) I] S_a^{-1/2}``,
  which is Brenier's Monge map (``u = |x|^2 - 2 phi``, ``phi`` convex) at ``eps = 0``.
* :func:`sorting` — 1-D points, cost ``h(x - y)`` with ``h`` convex: ``u`` is the
  exact dual potential of 1-D OT, for any sizes and weights, read off the monotone
  (north-west corner) plan on the sorted supports; ``O((n + m) log(n + m))``,
  no ``n x m`` matrix, reverse-differentiable.
* :class:`Subsample` — solve the problem on ``k`` subsampled points, extend the
  potential to every point by the soft c-transform; average a few such draws.
* :func:`auto` — the best applicable one for the geometry, with a safeguard that
  falls back to zeros when the candidate does not beat them (see its docstring and
  docs/initializers.md for why the Gaussian initializer can hurt at small epsilon).

Example:
    >>> import jax, otlab
    >>> from otlab import initializers
    >>> x = jax.random.normal(jax.random.key(0), (200, 2))
    >>> geom = otlab.PointCloud(x, 2.0 * x + 1.0)
    >>> sol0 = otlab.sinkhorn(geom, epsilon=0.05)
    >>> sol1 = otlab.sinkhorn(geom, epsilon=0.05, init=initializers.gaussian)
    >>> bool(sol1.n_iter < sol0.n_iter)
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from otlab import _dual
from otlab import costs as costs_lib
from otlab import geometry as geometry_lib

#: The geometries an initializer receives.
Geometries = geometry_lib.Geometry | geometry_lib.PointCloud

__all__ = [
    "gaussian",
    "sorting",
    "Subsample",
    "subsample",
    "Multiscale",
    "auto",
    "c_transform",
    "gaussian_potentials",
    "sorting_potentials",
    "gaussian_map",
]

Array = jax.Array


# ------------------------------------------------------------------------- helpers


def c_transform(geom: Geometries, pot: Array, w: Array, epsilon: Array, axis: int = 0) -> Array:
    """Soft c-transform through a geometry (one log-sum-exp pass, dense or online).

    ``axis=0``: from a source potential ``f`` to the target potential that makes the
    column marginal of ``P`` equal ``w = b``,
    ``g_j = eps log b_j - eps log sum_i exp((f_i - C_ij) / eps)``;
    ``axis=1``: from ``g`` to ``f_i = eps log a_i - eps log sum_j exp((g_j - C_ij) / eps)``.

    Args:
        geom: an otlab geometry.
        pot: ``(n,)`` potential ``f`` (``axis=0``) or ``(m,)`` potential ``g`` (``axis=1``).
        w: the weights of the other side (``b`` for ``axis=0``, ``a`` for ``axis=1``).
        epsilon: the entropic regularisation.
        axis: ``0`` or ``1`` as above.

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> from otlab.initializers import c_transform
        >>> geom = otlab.Geometry(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
        >>> a = b = jnp.array([0.5, 0.5])
        >>> g = c_transform(geom, jnp.zeros(2), b, 0.1)  # column marginal is now b
        >>> bool(jnp.allclose(geom.marginals(jnp.zeros(2), g, 0.1)[1], b))
        True
    """
    n, m = geom.shape
    if axis == 0:
        lse = geom.lse(pot, jnp.zeros((m,), pot.dtype), epsilon, axis=0)
    else:
        lse = geom.lse(jnp.zeros((n,), pot.dtype), pot, epsilon, axis=1)
    return epsilon * (_dual.safe_log(w) - lse)


def _from_uv(u: Array, v: Array, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    """``(f0, g0) = (u + eps log a, v + eps log b)`` from a Kantorovich pair ``(u, v)``."""
    return u + epsilon * _dual.safe_log(a), v + epsilon * _dual.safe_log(b)


def _point_cloud(geom, name: str) -> geometry_lib.PointCloud:
    if not isinstance(geom, geometry_lib.PointCloud):
        raise ValueError(
            f"`{name}` initializer needs a PointCloud geometry (points and a cost); "
            f"got {type(geom).__name__}."
        )
    return geom


def _check_weights(geom, a, b, name: str) -> None:
    """Shapes are static: wrong-length weights raise here, not inside a gather."""
    n, m = geom.shape
    for w, size, wname in ((a, n, "a"), (b, m, "b")):
        shape = getattr(w, "shape", None)
        if shape != (size,):
            raise ValueError(
                f"`{name}`: `{wname}` must have shape ({size},) to match the geometry; "
                f"got {shape}."
            )


def _weighted_moments(x: Array, w: Array) -> tuple[Array, Array]:
    w = w / jnp.sum(w)
    mean = w @ x
    xc = x - mean
    return mean, (xc * w[:, None]).T @ xc


# --------------------------------------------------------------- PSD matrix powers


def _psd_power_fwd(m: Array, power: float) -> tuple[Array, Array, Array, Array]:
    w, v = jnp.linalg.eigh(0.5 * (m + m.T))
    floor = jnp.finfo(m.dtype).eps * 10.0 * jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(m.dtype).tiny)
    w = jnp.maximum(w, floor)
    return (v * w**power) @ v.T, w, v, w**power


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _psd_power(m: Array, power: float) -> Array:
    """``M^power`` of a symmetric PSD matrix (eigenvalues floored at ``10 eps max|w|``)."""
    return _psd_power_fwd(m, power)[0]


@_psd_power.defjvp
def _psd_power_jvp(power, primals, tangents):
    # Daleckii-Krein: d f(M) = V (F o (V^T dM V)) V^T, F_ij the divided difference of
    # f = w**power; finite for repeated eigenvalues (unlike differentiating eigh).
    (m,), (dm,) = primals, tangents
    out, w, v, fw = _psd_power_fwd(m, power)
    dw = w[:, None] - w[None, :]
    close = jnp.abs(dw) <= 1e-6 * jnp.maximum(w[:, None], w[None, :])
    mid = 0.5 * (w[:, None] + w[None, :])
    divided = jnp.where(
        close, power * mid ** (power - 1.0), (fw[:, None] - fw[None, :]) / jnp.where(close, 1.0, dw)
    )
    dmt = v.T @ (0.5 * (dm + dm.T)) @ v
    return out, v @ (divided * dmt) @ v.T


def gaussian_map(cov_a: Array, cov_b: Array, epsilon: Array | float = 0.0) -> Array:
    """The symmetric matrix ``A`` of the entropic (``epsilon > 0``) or Monge
    (``epsilon = 0``) map ``x -> m_b + A (x - m_a)`` from ``N(m_a, S_a)`` to
    ``N(m_b, S_b)`` for the cost ``|x - y|^2``:

    ``A = S_a^{-1/2} [(S_a^{1/2} S_b S_a^{1/2} + (eps/4)^2 I)^{1/2} - (eps/4) I] S_a^{-1/2}``.

    At ``eps = 0`` it is Brenier's ``S_a^{-1/2} (S_a^{1/2} S_b S_a^{1/2})^{1/2} S_a^{-1/2}``.
    For ``eps > 0`` it is ``E[y | x] = m_b + A (x - m_a)`` under the entropic plan
    between the Gaussians (Janati et al., NeurIPS 2020; Mallasto et al., 2021): the
    plan is Gaussian with cross-covariance ``K = S_a A``, and its quadratic potentials
    have Hessians ``2 (I - A)`` (see :func:`gaussian_potentials`).

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab.initializers import gaussian_map
        >>> A = gaussian_map(jnp.eye(2), 4.0 * jnp.eye(2))  # Brenier: scale by 2
        >>> bool(jnp.allclose(A, 2.0 * jnp.eye(2)))
        True
        >>> bool(jnp.all(jnp.diag(gaussian_map(jnp.eye(2), 4.0 * jnp.eye(2), 1.0)) < 2.0))
        True
    """
    dtype = jnp.result_type(cov_a, cov_b)
    # LAPACK's eigh has no half precision: compute in float32, return in the input's dtype.
    work = jnp.promote_types(dtype, jnp.float32)
    cov_a, cov_b = cov_a.astype(work), cov_b.astype(work)
    eye = jnp.eye(cov_a.shape[0], dtype=work)
    s = jnp.asarray(epsilon, work) / 4.0
    # ``A`` is invariant under (S_a, S_b, eps) -> k (S_a, S_b, eps): work at unit scale,
    # with a ridge of 10 ulps, so that singular covariances (one point, coincident or
    # collinear points) give a finite ``A`` (its eps > 0 limit; ``I``-like at eps = 0).
    k = jax.lax.stop_gradient(jnp.trace(cov_a) + jnp.trace(cov_b) + 2.0 * s * cov_a.shape[0])
    k = jnp.where(jnp.isfinite(k) & (k > 0), k, 1.0) / cov_a.shape[0]
    ridge = 10.0 * jnp.finfo(work).eps * eye
    cov_a, cov_b, s = cov_a / k + ridge, cov_b / k + ridge, s / k
    ra = _psd_power(cov_a, 0.5)
    ria = _psd_power(cov_a, -0.5)
    mid = _psd_power(ra @ cov_b @ ra + s * s * eye, 0.5) - s * eye
    return (ria @ mid @ ria).astype(dtype)


# --------------------------------------------------------------------- initializers


def _check_gaussian(geom) -> geometry_lib.PointCloud:
    geom = _point_cloud(geom, "gaussian")
    if geom.x.shape[1] == 0:
        raise ValueError("`gaussian` initializer needs points of dimension >= 1; got 0.")
    if not isinstance(geom.cost, costs_lib.SqEuclidean):
        raise ValueError(
            "`gaussian` initializer needs the squared-Euclidean cost (its potential is the "
            f"Brenier potential of |x - y|^2); got {type(geom.cost).__name__}. "
            "Use `Subsample()` for other costs."
        )
    return geom


def gaussian(geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    """Initial potentials from the entropic OT between Gaussian fits of the clouds.

    The pair ``(u, v)`` of :func:`gaussian_potentials` at the solver's ``epsilon``
    (the exact Schrodinger potentials between ``N(m_a, S_a)`` and ``N(m_b, S_b)``,
    the weighted means and covariances of the clouds: quadratic, with the entropic
    map of :func:`gaussian_map`); ``f0 = u + eps log a``, ``g0 = v + eps log b``.
    Cost: ``O((n + m) d^2 + d^3)``, no ``n x m`` pass.

    Helps most for near-Gaussian clouds; at moderate epsilon the entropic closed
    form, unlike Brenier's potential, also accounts for the blur of the plan (e.g. 1
    iteration instead of 6, 10 instead of 70, on 1-D Gaussian benchmark rows). A
    misleading start costs more iterations the smaller epsilon is (see :func:`auto`
    and docs/initializers.md).

    Args:
        geom: a :class:`~otlab.PointCloud` with the squared-Euclidean cost.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        epsilon: the entropic regularisation.

    Example:
        >>> import jax, jax.numpy as jnp, otlab
        >>> from otlab.initializers import gaussian
        >>> x = jax.random.normal(jax.random.key(0), (100, 2))
        >>> a = jnp.full(100, 0.01)
        >>> f0, g0 = gaussian(otlab.PointCloud(x, 2.0 * x), a, a, 0.1)
        >>> f0.shape, g0.shape
        ((100,), (100,))

    Raises:
        ValueError: for another geometry or cost.
    """
    u, v = gaussian_potentials(geom, a, b, epsilon)
    return _from_uv(u, v, a, b, epsilon)


def gaussian_potentials(
    geom: Geometries, a: Array, b: Array, epsilon: Array | float = 0.0
) -> tuple[Array, Array]:
    """Potentials ``(u, v)`` of ``|x - y|^2`` between the Gaussian fits of the clouds.

    With ``A = gaussian_map(S_a, S_b, eps)`` and ``B = gaussian_map(S_b, S_a, eps)``,

    ``u(x) = |x|^2 - (x - m_a)^T A (x - m_a) - 2 <m_b, x>``,
    ``v(y) = |y|^2 - (y - m_b)^T B (y - m_b) - 2 <m_a, y> + 2 <m_a, m_b>``.

    ``eps = 0``: Kantorovich potentials, ``B = A^{-1}``, ``u(x) + v(y) <= |x - y|^2``
    (Fenchel-Young for the convex pair ``phi``, ``phi^*``) with equality on Brenier's
    map ``y = m_b + A (x - m_a)``. ``eps > 0``: the Schrodinger potentials, i.e.
    ``exp((u(x) + v(y) - |x - y|^2) / eps)`` times the two Gaussian densities is a
    density with marginals exactly the two Gaussians (up to the normalising
    constant, which Sinkhorn's first update fixes).

    Args:
        geom: a :class:`~otlab.PointCloud` with the squared-Euclidean cost.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        epsilon: the entropic regularisation (``0``: unregularised).

    Example:
        >>> import jax, jax.numpy as jnp, otlab
        >>> from otlab.initializers import gaussian_potentials
        >>> x = jax.random.normal(jax.random.key(0), (50, 2))
        >>> y = 2.0 * x + 1.0  # the Monge map of the Gaussian fits, exactly
        >>> a = jnp.full(50, 0.02)
        >>> u, v = gaussian_potentials(otlab.PointCloud(x, y), a, a)
        >>> c = jnp.sum((x - y) ** 2, axis=1)  # u + v = C on the matched pairs
        >>> bool(jnp.allclose(u + v, c, atol=1e-3 * float(jnp.max(c))))
        True
    """
    geom = _check_gaussian(geom)
    _check_weights(geom, a, b, "gaussian_potentials")
    mean_a, cov_a = _weighted_moments(geom.x, a)
    mean_b, cov_b = _weighted_moments(geom.y, b)
    return _quadratic_potentials(geom.x, geom.y, mean_a, cov_a, mean_b, cov_b, epsilon)


def _quadratic_potentials(x, y, mean_a, cov_a, mean_b, cov_b, epsilon=0.0) -> tuple[Array, Array]:
    fwd = gaussian_map(cov_a, cov_b, epsilon)
    bwd = gaussian_map(cov_b, cov_a, epsilon)
    xc, yc = x - mean_a, y - mean_b
    u = jnp.sum(x * x, -1) - jnp.sum((xc @ fwd) * xc, -1) - 2.0 * (x @ mean_b)
    v = jnp.sum(y * y, -1) - jnp.sum((yc @ bwd) * yc, -1) - 2.0 * (y @ mean_a)
    return u, v + 2.0 * (mean_a @ mean_b)


_SORTABLE = (costs_lib.SqEuclidean, costs_lib.Euclidean, costs_lib.Mahalanobis)


def _check_sortable(geom) -> geometry_lib.PointCloud:
    geom = _point_cloud(geom, "sorting")
    if geom.x.shape[1] != 1:
        raise ValueError(
            f"`sorting` initializer needs 1-D points (shape (n, 1)); got dimension {geom.x.shape[1]}."
        )
    cost = geom.cost
    if not isinstance(cost, _SORTABLE) or (isinstance(cost, costs_lib.Euclidean) and cost.p < 1):
        raise ValueError(
            "`sorting` initializer needs a cost h(x - y) with h convex (the monotone matching "
            "is then optimal): SqEuclidean, Euclidean(p >= 1) or Mahalanobis; "
            f"got {cost!r}."
        )
    return geom


def sorting_potentials(geom: Geometries, a: Array, b: Array) -> tuple[Array, Array]:
    """Exact dual potentials ``(u, v)`` of 1-D OT, ``u_i + v_j <= C_ij``.

    Sort both supports; the optimal (monotone) plan is the north-west corner rule
    on the sorted supports: with cumulative weights ``A_i``, ``B_j``, the pair
    ``(i, j)`` carries mass where ``(A_{i-1}, A_i]`` and ``(B_{j-1}, B_j]`` overlap,
    a staircase of ``n + m - 1`` cells. Complementary slackness on the staircase
    telescopes: when the staircase steps from row ``i`` to ``i + 1`` in column
    ``j(i)``, ``u_{i+1} - u_i = c(x_{i+1}, y_{j(i)}) - c(x_i, y_{j(i)})``, and
    likewise for ``v`` in columns, with ``u_0 = 0``, ``v_0 = c(x_0, y_0)``. For a
    cost ``h(x - y)`` with ``h`` convex (a Monge matrix) these potentials are
    feasible, hence optimal. Sorts, cumulative sums and gathers only: ``O((n + m)
    log(n + m))``, differentiable in the points.

    Args:
        geom: a 1-D :class:`~otlab.PointCloud` (see :func:`sorting`).
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights (same total mass).

    Example:
        >>> import jax.numpy as jnp, otlab
        >>> from otlab.initializers import sorting_potentials
        >>> x, y = jnp.array([[0.0], [1.0]]), jnp.array([[0.5], [3.0]])
        >>> a = b = jnp.array([0.5, 0.5])
        >>> u, v = sorting_potentials(otlab.PointCloud(x, y), a, b)
        >>> float(a @ u + b @ v)  # = W2^2 = 0.5 * (0.25 + 4)
        2.125
    """
    geom = _check_sortable(geom)
    _check_weights(geom, a, b, "sorting_potentials")
    x, y = geom.x, geom.y
    px, py = jnp.argsort(x[:, 0]), jnp.argsort(y[:, 0])
    xs, ys = x[px], y[py]
    ca = jnp.cumsum(a[px])[:-1]
    cb = jnp.cumsum(b[py])[:-1] * (jnp.sum(a) / jnp.sum(b))
    # Cumulative masses equal up to rounding are a tie: the sorted problem splits
    # into blocks there and the offset between blocks is free in an interval.
    tie = 16.0 * jnp.finfo(ca.dtype).eps * jnp.sum(a)
    pair = jax.vmap(geom.cost)

    def staircase(row_first: bool):
        # Row step i -> i + 1 happens at mass ca[i], in the column reached by then;
        # column step j -> j + 1 at cb[j], in the row reached by then. At a tie the
        # row steps first (``row_first``) or the column does.
        if row_first:
            col = jnp.searchsorted(cb, ca - tie, side="left")
            row = jnp.searchsorted(ca, cb + tie, side="right")
        else:
            col = jnp.searchsorted(cb, ca + tie, side="right")
            row = jnp.searchsorted(ca, cb - tie, side="left")
        du = pair(xs[1:], ys[col]) - pair(xs[:-1], ys[col])
        dv = pair(xs[row], ys[1:]) - pair(xs[row], ys[:-1])
        zero = jnp.zeros((1,), du.dtype)
        us = jnp.concatenate([zero, jnp.cumsum(du)])
        vs = geom.cost(xs[0], ys[0]) + jnp.concatenate([zero, jnp.cumsum(dv)])
        return us, vs

    # Each tie rule makes one of the two cells that cross the tie tight (an extreme
    # optimal dual, e.g. an offset of 79 across the gap of ott-jax's sorting test,
    # which the entropic solver then takes thousands of iterations to undo). Their
    # mean is optimal too and leaves both crossing cells the same slack, which is
    # where the entropic potentials sit as eps -> 0 (the eps-small masses crossing
    # the tie in each direction balance). Without ties both rules agree.
    (ur, vr), (uc, vc) = staircase(True), staircase(False)
    us, vs = 0.5 * (ur + uc), 0.5 * (vr + vc)
    u = jnp.zeros_like(us).at[px].set(us)
    v = jnp.zeros_like(vs).at[py].set(vs)
    return u, v


def sorting(geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    """Initial potentials from exact 1-D OT (the monotone matching).

    ``u`` from :func:`sorting_potentials`, ``f0 = u + eps log a`` and ``g0`` its
    soft c-transform. Any sizes ``n``, ``m`` and weights; dense or online.

    Args:
        geom: a :class:`~otlab.PointCloud` of 1-D points (shape ``(n, 1)``) with a
            cost ``h(x - y)``, ``h`` convex: ``SqEuclidean``, ``Euclidean(p >= 1)``
            or ``Mahalanobis``.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        epsilon: the entropic regularisation.

    Example:
        >>> import jax, jax.numpy as jnp, otlab
        >>> from otlab.initializers import sorting
        >>> x = jax.random.uniform(jax.random.key(0), (300, 1))
        >>> geom = otlab.PointCloud(x, x ** 2)
        >>> sol0 = otlab.sinkhorn(geom, epsilon=1e-3)
        >>> sol1 = otlab.sinkhorn(geom, epsilon=1e-3, init=sorting)
        >>> bool(sol1.n_iter < sol0.n_iter)
        True

    Raises:
        ValueError: for points of dimension ``> 1``, a geometry without points, or
            another cost.
    """
    u, _ = sorting_potentials(geom, a, b)
    f0 = u + epsilon * _dual.safe_log(a)
    return f0, c_transform(geom, f0, b, epsilon)


@dataclasses.dataclass(frozen=True)
class Subsample:
    """Solve the problem on subsamples of the clouds, extend by the c-transform.

    For each of ``n_draws`` independent draws: sample ``n_samples`` source (target)
    points with replacement, with probabilities ``a`` (``b``), solve that small
    problem with :func:`otlab.sinkhorn` at the same epsilon (``tol``, ``max_iter``:
    ott-jax's defaults), and extend its ``g`` to every source point by the soft
    c-transform ``f_i = eps log a_i - eps log sum_k exp((g_k - c(x_i, y_k)) / eps)``.
    ``f0`` is the mean of the ``n_draws`` extensions (each centred: a potential is
    defined up to a constant), ``g0`` the soft c-transform of ``f0``.

    One draw (``n_draws=1``) is Thornton & Cuturi's initializer, and ott-jax's
    ``SubsampleInitializer``: its extension is a noisy estimate of the full
    potential (the points drawn matter as much as the method, e.g. 150 to 300
    iterations over seeds on one benchmark row). The draws are solved together
    (``vmap``), and averaging them reduces that noise: on the d = 16 benchmark
    rows one draw saved 5-10 % of the iterations, eight saved 25-30 %.

    A frozen dataclass: hashable, so it is a valid static ``init=``; equal options
    give equal (cache-sharing) instances.

    Args:
        n_samples: points drawn from each cloud per draw (all points are used, with
            their weights, when a cloud has at most ``n_samples``).
        n_draws: independent draws averaged.
        seed: seed of the draws.
        tol: tolerance of the small solves.
        max_iter: iteration cap of the small solves.

    Example:
        >>> import jax, otlab
        >>> from otlab.initializers import Subsample
        >>> x = jax.random.normal(jax.random.key(0), (500, 2))
        >>> sol = otlab.sinkhorn(otlab.PointCloud(x, x + 1.0), epsilon=0.05,
        ...                      init=Subsample(n_samples=100))
        >>> bool(sol.converged)
        True
    """

    n_samples: int = 200
    n_draws: int = 8
    seed: int = 0
    tol: float = 1e-3
    max_iter: int = 2000

    def __post_init__(self):
        if not isinstance(self.n_samples, int) or self.n_samples < 2:
            raise ValueError(f"`n_samples` must be an int >= 2; got {self.n_samples!r}.")
        if not isinstance(self.n_draws, int) or self.n_draws < 1:
            raise ValueError(f"`n_draws` must be an int >= 1; got {self.n_draws!r}.")

    def _draw(self, key, pts: Array, w: Array) -> tuple[Array, Array]:
        if pts.shape[0] <= self.n_samples:
            return pts, w
        idx = jax.random.choice(key, pts.shape[0], (self.n_samples,), replace=True, p=w / jnp.sum(w))
        return pts[idx], jnp.full((self.n_samples,), jnp.sum(w) / self.n_samples, w.dtype)

    def __call__(self, geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
        from otlab.solvers.sinkhorn import sinkhorn

        geom = _point_cloud(geom, "Subsample")

        def one(key):
            kx, ky = jax.random.split(key)
            xs, as_ = self._draw(kx, geom.x, a)
            ys, bs = self._draw(ky, geom.y, b)
            sub = sinkhorn(
                geometry_lib.PointCloud(xs, ys, geom.cost),
                as_,
                bs,
                epsilon=epsilon,
                tol=self.tol,
                max_iter=self.max_iter,
            )
            # Extend the small solution's g to every source point (an n x k pass).
            to_x = geometry_lib.PointCloud(geom.x, ys, geom.cost, geom.block_size)
            f = c_transform(to_x, sub.g, a, epsilon, axis=1)
            return f - (a @ f) / jnp.sum(a)

        keys = jax.random.split(jax.random.key(self.seed), self.n_draws)
        f0 = jnp.mean(jax.vmap(one)(keys), axis=0)
        # g0: the soft c-transform of f0 through the full geometry (one n x m pass,
        # as ott-jax's first iteration).
        return f0, c_transform(geom, f0, b, epsilon)


subsample = Subsample()
"""``Subsample()`` with its defaults (8 draws of 200 points, seed 0)."""


def _kmeans(key, pts: Array, w: Array, k: int, iters: int, block: int = 4096):
    """Weighted Lloyd's k-means: ``(centres (k, d), masses (k,))``; the masses are the
    weights of each cell (they sum to ``sum(w)``). Centres start at ``k`` points drawn
    by weight; an empty cell keeps its centre (and a zero mass). Assignments go
    by row blocks (memory ``O(block * k)``)."""
    n = pts.shape[0]
    p = jnp.where(w > 0, w, 0.0)
    start = jax.random.choice(key, n, (k,), replace=n < k, p=p / jnp.sum(p))
    centres = pts[start]

    def assign(c):
        cc = jnp.sum(c * c, -1)

        def rows(xb):
            return jnp.argmin(cc[None, :] - 2.0 * (xb @ c.T), axis=1)

        return geometry_lib._map_blocks(rows, min(block, n), (pts,))

    def masses(labels):
        return jax.ops.segment_sum(p, labels, k)

    def step(c, _):
        labels = assign(c)
        mass = masses(labels)
        total = jax.ops.segment_sum(p[:, None] * pts, labels, k)
        return jnp.where(mass[:, None] > 0, total / jnp.where(mass > 0, mass, 1.0)[:, None], c), None

    centres, _ = jax.lax.scan(step, centres, None, length=iters)
    return centres, masses(assign(centres))


@dataclasses.dataclass(frozen=True)
class Multiscale:
    """Coarse-to-fine start (multiscale Sinkhorn, as in GeomLoss): cluster both clouds
    with weighted k-means at each level of ``sizes`` (coarse to fine), solve each
    clustered problem with :func:`otlab.sinkhorn` at the target epsilon, warm-started
    from the previous level by soft c-transforms (the coarsest level anneals epsilon
    from ``anneal * epsilon``), then extend the finest level's ``g`` to every point by
    the soft c-transform (one online pass for each potential).

    The fine solve then starts near its solution: it needs few passes over the
    ``n x m`` entries, which dominate at large ``n`` (each costs ``n m`` exponentials;
    a level of ``k`` clusters costs ``k^2`` per iteration).

    A frozen dataclass: hashable, a valid static ``init=``.

    Args:
        sizes: clusters per cloud at each level, coarse to fine (clouds with fewer
            points use all of them).
        kmeans_iters: Lloyd iterations per level.
        seed: seed of the k-means starts.
        anneal: the coarsest level anneals epsilon from ``anneal * epsilon``
            (``epsilon_decay = 0.7`` per ``check_every`` block).
        tol: tolerance of the level solves.
        max_iter: iteration cap of each level solve.

    Example:
        >>> import jax, otlab
        >>> from otlab.initializers import Multiscale
        >>> x = jax.random.normal(jax.random.key(0), (800, 2))
        >>> geom = otlab.PointCloud(x, 0.5 * x + 1.0, block_size=200)
        >>> start = otlab.sinkhorn(geom, epsilon=0.01, init=Multiscale(sizes=(32, 128)))
        >>> plain = otlab.sinkhorn(geom, epsilon=0.01)
        >>> bool(start.converged), int(start.n_iter) < int(plain.n_iter)
        (True, True)
    """

    sizes: tuple[int, ...] = (256, 2048)
    kmeans_iters: int = 10
    seed: int = 0
    anneal: float = 16.0
    tol: float = 1e-3
    max_iter: int = 2000

    def __post_init__(self):
        sizes = tuple(self.sizes)
        if not sizes or any(not isinstance(k, int) or k < 2 for k in sizes):
            raise ValueError(f"`sizes` must be a non-empty tuple of ints >= 2; got {self.sizes!r}.")
        if list(sizes) != sorted(sizes):
            raise ValueError(f"`sizes` must increase (coarse to fine); got {self.sizes!r}.")
        object.__setattr__(self, "sizes", sizes)
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 0:
            raise ValueError(f"`kmeans_iters` must be an int >= 0; got {self.kmeans_iters!r}.")
        if not self.anneal >= 1.0:
            raise ValueError(f"`anneal` must be >= 1; got {self.anneal!r}.")

    def __call__(self, geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
        from otlab.solvers.sinkhorn import sinkhorn

        geom = _point_cloud(geom, "Multiscale")
        n, m = geom.shape
        keys = jax.random.split(jax.random.key(self.seed), 2 * len(self.sizes))
        prev = None  # (target centres, their potential g) of the previous level
        for level, k in enumerate(self.sizes):
            xc, ac = (geom.x, a) if k >= n else _kmeans(keys[2 * level], geom.x, a, k, self.kmeans_iters)
            yc, bc = (geom.y, b) if k >= m else _kmeans(keys[2 * level + 1], geom.y, b, k, self.kmeans_iters)
            coarse = geometry_lib.PointCloud(xc, yc, geom.cost)
            if prev is None:
                init, eps0 = None, self.anneal * epsilon if self.anneal > 1 else None
            else:
                f = c_transform(geometry_lib.PointCloud(xc, prev[0], geom.cost), prev[1], ac, epsilon, axis=1)
                init, eps0 = (f, c_transform(coarse, f, bc, epsilon)), None
            sol = sinkhorn(
                coarse, ac, bc, epsilon=epsilon, init=init, epsilon_init=eps0,
                epsilon_decay=0.7, tol=self.tol, max_iter=self.max_iter,
            )  # fmt: skip
            prev = (yc, sol.g)
        to_x = geometry_lib.PointCloud(geom.x, prev[0], geom.cost, geom.block_size)
        f0 = c_transform(to_x, prev[1], a, epsilon, axis=1)
        return f0, c_transform(geom, f0, b, epsilon)


#: ``epsilon / (weighted mean cost)`` at and above which :func:`auto` prefers the
#: Gaussian start to sorting on 1-D squared-Euclidean problems.
SORT_BELOW = 5e-2


def _sorting_or_gaussian(geom, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    """1-D squared Euclidean: :func:`sorting` below ``SORT_BELOW`` x mean cost, else
    :func:`gaussian` (a ``lax.cond`` on the traced ``epsilon``).

    At large epsilon Sinkhorn from zeros takes a few tens of iterations, the entropic
    Gaussian start costs nothing, while a sort plus a log-sum-exp pass costs about as
    much as ten kernel-mode iterations on a CPU (n = 1000); at small epsilon the exact
    1-D potentials of :func:`sorting` are the better start and the run pays for them.
    """
    large = epsilon >= SORT_BELOW * _mean_cost(geom, a, b)
    return jax.lax.cond(
        large, lambda: gaussian(geom, a, b, epsilon), lambda: sorting(geom, a, b, epsilon)
    )


def _applicable(geom):
    """The initializer :func:`auto` tries for ``geom`` (``None``: zeros)."""
    if not isinstance(geom, geometry_lib.PointCloud):
        return None
    sq = isinstance(geom.cost, costs_lib.SqEuclidean)
    try:
        _check_sortable(geom)
        return _sorting_or_gaussian if sq else sorting
    except ValueError:
        pass
    return gaussian if sq else None


def _half_step_dual(geom, g: Array, a: Array, b: Array, epsilon: Array) -> Array:
    """Balanced dual objective after Sinkhorn's first half-step from ``g`` (one pass)."""
    return _dual.half_step_dual(g, _dual.half_step_lse(geom, g, epsilon), a, b, epsilon, 1.0, 1.0)


#: ``epsilon / (weighted mean cost)`` below which :func:`auto` checks its candidate.
SAFEGUARD_BELOW = 5e-3


def auto(geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    """The best applicable initializer for ``geom``, never worse than zeros on the dual.

    * 1-D points with a cost ``h(x - y)``, ``h`` convex: :func:`sorting` (exact
      as ``eps -> 0``), except for the squared-Euclidean cost at ``epsilon >=
      SORT_BELOW`` times the mean cost, where the run is short and the free
      :func:`gaussian` start is used (see ``_sorting_or_gaussian``);
    * other point clouds with the squared-Euclidean cost: :func:`gaussian`;
    * anything else: zeros (the default). :class:`Subsample` is not picked: it costs
      several small solves and is random.

    Safeguard: when ``epsilon`` is below ``SAFEGUARD_BELOW`` times the mean cost
    (the regime of long runs, where a misleading start costs the most and two
    extra log-sum-exp passes cost < 1 % of the run), the candidate is kept only
    if the dual objective after Sinkhorn's first half-step from it is at least
    that from zeros; otherwise zeros are returned (the choice is made with
    ``jnp.where``: jit/vmap-safe, each problem of a batch chooses for itself).
    At larger epsilon the check is skipped (a ``lax.cond``: only one branch runs,
    outside ``vmap``): a run there is tens to hundreds of iterations, the two passes would cost
    up to ~15 % of it, and the candidates in use have not hurt there.

    A candidate with a non-finite entry is never returned (zeros instead; an
    ``O(n + m)`` check).

    Args:
        geom: any otlab geometry.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        epsilon: the entropic regularisation.

    Example:
        >>> import jax, otlab
        >>> x = jax.random.normal(jax.random.key(0), (200, 2))
        >>> geom = otlab.PointCloud(x, 2.0 * x + 1.0)
        >>> sol = otlab.sinkhorn(geom, epsilon=0.05, init="auto")  # = init=initializers.auto
        >>> bool(sol.converged)
        True
    """
    # a module-level jit: eager calls compile once per signature (a ``lax.cond`` on
    # fresh closures would compile anew on every eager call)
    return _auto(geom, a, b, epsilon)


@jax.jit
def _auto(geom: Geometries, a: Array, b: Array, epsilon: Array) -> tuple[Array, Array]:
    n, m = geom.shape
    zeros = jnp.zeros((n,), geom.dtype), jnp.zeros((m,), geom.dtype)
    init = _applicable(geom)
    if init is None:
        return zeros
    f0, g0 = init(geom, a, b, epsilon)

    def checked(_):
        better = _half_step_dual(geom, g0, a, b, epsilon) >= _half_step_dual(
            geom, zeros[1], a, b, epsilon
        )
        return jnp.where(better, f0, zeros[0]), jnp.where(better, g0, zeros[1])

    small = epsilon < SAFEGUARD_BELOW * _mean_cost(geom, a, b)
    f0, g0 = jax.lax.cond(small, checked, lambda _: (f0, g0), None)
    # Never a non-finite start (e.g. degenerate data the candidate cannot handle).
    finite = jnp.all(jnp.isfinite(f0)) & jnp.all(jnp.isfinite(g0))
    return jnp.where(finite, f0, zeros[0]), jnp.where(finite, g0, zeros[1])


def _mean_cost(geom, a: Array, b: Array) -> Array:
    """``sum_ij a_i b_j C_ij / (sum a sum b)``: closed form for squared Euclidean,
    otherwise one pass over the cost (``geom.mean_cost``, unweighted)."""
    if isinstance(geom, geometry_lib.PointCloud) and isinstance(geom.cost, costs_lib.SqEuclidean):
        ma, ca = _weighted_moments(geom.x, a)
        mb, cb = _weighted_moments(geom.y, b)
        return jnp.trace(ca) + jnp.trace(cb) + jnp.sum((ma - mb) ** 2)
    return geom.mean_cost()
