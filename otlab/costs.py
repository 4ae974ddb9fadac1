"""Ground costs ``c(x, y)`` between points.

A cost is a frozen dataclass registered as a pytree: its parameters (for instance
the matrix of `Mahalanobis`) are leaves that ``jax.grad`` differentiates,
its options are static. Every cost evaluates one pair with ``cost(x, y)`` and a
whole block with ``cost.all_pairs(x, y)``; the squared-Euclidean family uses a
GEMM, ``|x|^2 + |y|^2 - 2 x y^T``, which is the fast way on every backend, on
both clouds centred by their common mean (exact by translation invariance, and
precise far from the origin).

`as_cost` turns an ott-jax ``CostFn`` or a plain callable ``c(x, y) ->
scalar`` into an otlab cost, so every geometry accepts all three.

Example:
    >>> import jax.numpy as jnp
    >>> from otlab import costs
    >>> x = jnp.zeros((3, 2)); y = jnp.ones((4, 2))
    >>> costs.SqEuclidean().all_pairs(x, y).shape
    (3, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp

__all__ = [
    "Cost",
    "SqEuclidean",
    "Euclidean",
    "Cosine",
    "Mahalanobis",
    "FunctionCost",
    "Scaled",
    "OTTCost",
    "as_cost",
]


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


class Cost:
    """Base class: subclasses define ``__call__(x, y)`` for one pair of points.

    ``all_pairs`` defaults to a double ``vmap`` of ``__call__``; subclasses with a
    cheaper closed form override it. ``symmetric`` (a class attribute) declares
    ``c(x, y) = c(y, x)``; solvers may then exploit it (the self problems of
    `otlab.sinkhorn_divergence`). Unknown costs are not assumed symmetric.
    """

    symmetric: ClassVar[bool] = False

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def all_pairs(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Cost matrix ``[c(x_i, y_j)]`` of shape ``(n, m)``."""
        return jax.vmap(lambda xi: jax.vmap(lambda yj: self(xi, yj))(y))(x)

    def features(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """A factored form ``(phi, psi)``, ``C = phi @ psi.T`` (shapes ``(n, r)`` and
        ``(m, r)``, ``r`` small), or ``None`` when the cost has none.

        Online geometries use it to evaluate each block of logits as one GEMM fused
        with the exponentials (`otlab.PointCloud.lse`). Computed once per pass on the
        whole clouds (jointly centred for translation-invariant costs). By default
        ``[row, 1, phi'] @ [1, col, psi']^T`` from `separable_features`.
        """
        parts = self.separable_features(x, y)
        if parts is None:
            return None
        row, col, phi, psi = parts
        phi = jnp.concatenate([row[:, None], jnp.ones_like(row[:, None]), phi], 1)
        psi = jnp.concatenate([jnp.ones_like(col[:, None]), col[:, None], psi], 1)
        return phi, psi

    def separable_features(
        self, x: jax.Array, y: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None:
        """``(row, col, phi, psi)`` with ``C_ij = row_i + col_j + phi_i . psi_j``
        (shapes ``(n,)``, ``(m,)``, ``(n, r)``, ``(m, r)``), or ``None``.

        The same factored form as `features` with its rank-one terms apart: an online
        pass adds ``row`` and ``col`` to the potentials once, and each GEMM of a block
        has ``r + 2`` terms instead of ``r + 4`` (``d + 2`` for the squared Euclidean
        cost in dimension ``d``: 5 FMAs per entry at ``d = 3``, not 7).

        Example:
            >>> import jax.numpy as jnp
            >>> from otlab import costs
            >>> x = jnp.array([[0.0, 1.0], [2.0, 0.0]]); y = jnp.array([[1.0, 1.0]])
            >>> row, col, phi, psi = costs.SqEuclidean().separable_features(x, y)
            >>> jnp.round(row[:, None] + col[None, :] + phi @ psi.T, 4).tolist()
            [[1.0], [2.0]]
        """
        return None


def _centre(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both clouds moved by their common mean (a gradient-free constant).

    Costs of ``x - y`` are translation invariant, but the GEMM form ``|x|^2 + |y|^2
    - 2 x.y`` cancels terms of size ``|x|^2``: points offset by 1e4 lose every digit
    of a unit distance in float32. Centred, the terms are of the size of the
    clouds' spread. The shift is exact for the value (translation invariance) and
    for every derivative (``d c(x - t, y - t) / dt = 0``), so it is not
    differentiated. O((n + m) d), negligible next to the GEMM.
    """
    t = jax.lax.stop_gradient((jnp.sum(x, axis=0) + jnp.sum(y, axis=0)) / (x.shape[0] + y.shape[0]))
    return x - t, y - t


def _sq_dists(x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared Euclidean distances as one GEMM of the jointly centred clouds (see
    `_centre`), clipped at zero against rounding."""
    x, y = _centre(x, y)
    xx = jnp.sum(x * x, axis=-1)
    yy = jnp.sum(y * y, axis=-1)
    d2 = xx[:, None] + yy[None, :] - 2.0 * (x @ y.T)
    return jnp.maximum(d2, 0.0)


def _safe_pow(d2: jax.Array, half_p: float) -> jax.Array:
    """``d2 ** half_p`` with a finite gradient at ``d2 = 0``."""
    pos = d2 > 0
    safe = jnp.where(pos, d2, 1.0)
    return jnp.where(pos, safe**half_p, 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SqEuclidean(Cost):
    """``c(x, y) = |x - y|^2``."""

    symmetric: ClassVar[bool] = True

    def __call__(self, x, y):
        return jnp.sum((x - y) ** 2)

    def all_pairs(self, x, y):
        return _sq_dists(x, y)

    def separable_features(self, x, y):
        x, y = _centre(x, y)
        return jnp.sum(x * x, -1), jnp.sum(y * y, -1), -2.0 * x, y


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Euclidean(Cost):
    """``c(x, y) = |x - y|^p`` (``p = 1``: the Wasserstein-1 ground cost).

    Args:
        p: the exponent, a static float ``> 0``.
    """

    symmetric: ClassVar[bool] = True

    p: float = _static(default=1.0)

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"Euclidean: `p` must be > 0, got {self.p}.")

    def __call__(self, x, y):
        return _safe_pow(jnp.sum((x - y) ** 2), 0.5 * self.p)

    def all_pairs(self, x, y):
        return _safe_pow(_sq_dists(x, y), 0.5 * self.p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cosine(Cost):
    """``c(x, y) = 1 - <x, y> / (|x| |y|)``, in ``[0, 2]``."""

    symmetric: ClassVar[bool] = True

    def __call__(self, x, y):
        return self.all_pairs(x[None], y[None])[0, 0]

    def all_pairs(self, x, y):
        # Integer points are cosines too: compute in (at least) the default float.
        dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
        x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        tiny = jnp.finfo(dtype).tiny
        xn = x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), tiny))
        yn = y / jnp.sqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), tiny))
        return 1.0 - xn @ yn.T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mahalanobis(Cost):
    """``c(x, y) = (x - y)^T M (x - y)`` with a learnable matrix ``M``.

    ``M`` is a pytree leaf: ``jax.grad`` of any otlab objective with respect to the
    cost returns a ``Mahalanobis`` whose ``matrix`` is the gradient. Only the
    symmetric part of ``M`` enters the cost.

    Args:
        matrix: a ``(d, d)`` array, positive semi-definite for a meaningful cost.
    """

    symmetric: ClassVar[bool] = True

    matrix: jax.Array

    def __call__(self, x, y):
        z = x - y
        return z @ self.matrix @ z

    def all_pairs(self, x, y):
        m = 0.5 * (self.matrix + self.matrix.T)
        x, y = _centre(x, y)
        xm = x @ m
        xx = jnp.sum(xm * x, -1)
        yy = jnp.sum((y @ m) * y, -1)
        return xx[:, None] + yy[None, :] - 2.0 * (xm @ y.T)

    def separable_features(self, x, y):
        m = 0.5 * (self.matrix + self.matrix.T)
        x, y = _centre(x, y)
        xm = x @ m
        return jnp.sum(xm * x, -1), jnp.sum((y @ m) * y, -1), -2.0 * xm, y


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scaled(Cost):
    """``factor * cost(x, y)``: a rescaled cost (``factor`` is a traced leaf).

    Args:
        cost: the otlab cost to rescale.
        factor: a positive scalar.
    """

    cost: Cost
    factor: jax.Array

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.cost.symmetric

    def __call__(self, x, y):
        return self.factor * self.cost(x, y)

    def all_pairs(self, x, y):
        return self.factor * self.cost.all_pairs(x, y)

    def features(self, x, y):
        inner = self.cost.features(x, y)
        return None if inner is None else (self.factor * inner[0], inner[1])

    def separable_features(self, x, y):
        inner = self.cost.separable_features(x, y)
        if inner is None:
            return None
        row, col, phi, psi = inner
        return self.factor * row, self.factor * col, self.factor * phi, psi


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FunctionCost(Cost):
    """A plain callable ``fn(x, y) -> scalar`` used as a cost (static, hashed by identity)."""

    fn: Callable[[jax.Array, jax.Array], jax.Array] = _static()

    def __call__(self, x, y):
        return self.fn(x, y)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OTTCost(Cost):
    """An ott-jax ``CostFn`` (itself a pytree, so its parameters stay differentiable)."""

    cost_fn: object

    def __call__(self, x, y):
        return self.cost_fn(x, y)

    def all_pairs(self, x, y):
        return self.cost_fn.all_pairs(x, y)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _StaticOTTCost(OTTCost):
    """An ott-jax ``CostFn`` that is not a registered pytree: held as static data
    (hashed like the object; its parameters are constants, not differentiated)."""

    cost_fn: object = _static()


#: What a geometry accepts as ``cost``.
CostLike = Cost | Callable[[jax.Array, jax.Array], jax.Array] | None


def as_cost(cost: CostLike) -> Cost:
    """Return an otlab `Cost` for ``cost``.

    Args:
        cost: ``None`` (squared Euclidean), an otlab cost, an ott-jax ``CostFn``
            (ott's squared Euclidean maps to `SqEuclidean`; a ``CostFn`` subclass
            that is not a registered pytree is held as static data, its parameters
            then being constants), or a callable ``c(x, y) -> scalar`` on single
            points.

    Raises:
        ValueError: if ``cost`` is none of these.
    """
    if cost is None:
        return SqEuclidean()
    if isinstance(cost, Cost):
        return cost
    try:
        from ott.geometry import costs as ott_costs
    except ImportError:  # pragma: no cover - ott-jax is a dependency
        ott_costs = None
    if ott_costs is not None and isinstance(cost, ott_costs.CostFn):
        if type(cost) is ott_costs.SqEuclidean:
            return SqEuclidean()
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(cost)):
            # Not a registered pytree: it cannot be a traced leaf of a geometry.
            try:
                hash(cost)
            except TypeError:
                raise ValueError(
                    f"`cost`: the ott-jax cost {type(cost).__name__} is neither a registered "
                    "pytree nor hashable; decorate its class with "
                    "`@jax.tree_util.register_pytree_node_class` (as ott-jax's own costs are) "
                    "or make it hashable to use it as a static cost."
                ) from None
            return _StaticOTTCost(cost)
        return OTTCost(cost)
    if callable(cost):
        return FunctionCost(cost)
    raise ValueError(
        f"`cost` must be an otlab cost, an ott-jax CostFn or a callable c(x, y); got {cost!r}."
    )


# ------------------------------------------------------------------ Riemannian costs
# (otlab.metric: a metric field defines a cost; appended here for the metric module)

__all__.append("Riemannian")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Riemannian(Cost):
    """Squared Riemannian distance under a metric ``G`` (see `otlab.metric`).

    ``method="midpoint"`` (default) is the one-segment approximation
    ``c(x, y) = (y - x)^T G((x + y) / 2) (y - x)``: exact for a constant metric,
    accurate when ``G`` varies little between ``x`` and ``y``, and cheap (one
    evaluation of ``G`` per pair). ``method="simpson"`` is Simpson's rule for the
    energy of the straight segment, ``z^T (G(x) + 4 G((x + y)/2) + G(y)) z / 6``
    (``z = y - x``): it also weighs the metric at the endpoints — on the data — so
    that a long chord through a region the data never visit is not priced by the
    metric there alone. ``method="trapezoid"`` uses the metric at the endpoints
    only, ``z^T (G(x) + G(y)) z / 2``: the metric is evaluated at the data alone
    (``n + m`` evaluations, none per pair), so a metric that is cheap only where
    chords pass off the data earns nothing. ``method="geodesic"`` is ``L(x, y)^2``
    for the length of the discrete geodesic of `otlab.geodesic.shortest_path` with
    ``num_points`` points: exact up to discretisation, and one path optimisation per
    pair. The metric is a leaf: ``jax.grad`` with respect to the cost returns
    gradients for the metric's parameters, so every solver trains a metric.

    Args:
        metric: a metric (pytree callable ``x -> G(x)``, e.g. `otlab.metric.Constant`
            or a trained `otlab.metric.Learned`).
        method: static, ``"midpoint"``, ``"simpson"``, ``"trapezoid"`` or
            ``"geodesic"``.
        num_points: static, points per geodesic (``method="geodesic"``).
        max_steps: static, L-BFGS cap per geodesic (``method="geodesic"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab import costs, metric
        >>> c = costs.Riemannian(metric.Constant(jnp.diag(jnp.array([1.0, 4.0]))))
        >>> float(c(jnp.zeros(2), jnp.array([1.0, 1.0])))
        5.0
    """

    metric: object
    method: str = _static(default="midpoint")
    num_points: int = _static(default=16)
    max_steps: int = _static(default=100)

    def __post_init__(self):
        if self.method not in ("midpoint", "simpson", "trapezoid", "geodesic"):
            raise ValueError(
                "`method` must be 'midpoint', 'simpson', 'trapezoid' or 'geodesic'; "
                f"got {self.method!r}."
            )
        if not callable(self.metric):
            raise ValueError(f"`metric` must be a callable metric x -> G(x); got {self.metric!r}.")

    def __call__(self, x, y):
        if self.method != "geodesic":
            return self.all_pairs(x[None], y[None])[0, 0]
        from otlab import geodesic

        path = geodesic.shortest_path(
            self.metric, x, y, self.num_points, max_steps=self.max_steps
        )
        return geodesic.length(self.metric, path) ** 2

    def all_pairs(self, x, y):
        if self.method == "geodesic":
            return super().all_pairs(x, y)
        z = y[None, :, :] - x[:, None, :]

        def quad(g):
            return jnp.einsum("nmi,nmij,nmj->nm", z, g, z)

        if self.method != "trapezoid":
            mid = quad(self.metric(0.5 * (x[:, None, :] + y[None, :, :])))
            if self.method == "midpoint":
                return mid
        gx = self.metric(x)  # G at the ends of the segment: n + m evaluations
        gy = self.metric(y)
        ends = jnp.einsum("nmi,nij,nmj->nm", z, gx, z) + jnp.einsum("nmi,mij,nmj->nm", z, gy, z)
        if self.method == "trapezoid":
            return 0.5 * ends
        return (4.0 * mid + ends) / 6.0
