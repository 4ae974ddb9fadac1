"""Riemannian metric tensors: closed forms and the learned `MetricField`.

A *metric* is a pytree ``G`` with ``G(x) -> (..., d, d)``: the symmetric positive
definite tensor at each point of ``x`` (shape ``(..., d)``), so that a small step
``v`` at ``x`` costs ``v^T G(x) v``. It is the metric itself, not its inverse (the
inverse is what enters the dual constraint of Scarvelis & Solomon, 2023, and what
`otlab.metric.fit` penalises). Every metric is a frozen dataclass registered as a
pytree: its arrays (a matrix, network weights) are leaves that ``jax.grad``
differentiates and ``jax.vmap`` maps over; its options are static.

Example:
    >>> import jax.numpy as jnp
    >>> from otlab import metric
    >>> g = metric.PoincareHalfPlane()
    >>> g(jnp.array([[0.0, 2.0], [1.0, 0.5]])).shape
    (2, 2, 2)
    >>> float(g(jnp.array([0.0, 2.0]))[0, 0])
    0.25
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Metric", "Constant", "PoincareHalfPlane", "FromCallable", "MetricField", "Learned"]

Array = jax.Array


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


class Metric:
    """Base class: ``metric(x)`` is the ``(..., d, d)`` tensor at points ``x`` of shape ``(..., d)``.

    ``dim`` is the dimension the metric is defined in, or ``None`` for any.
    """

    dim: int | None = None

    def __call__(self, x: Array) -> Array:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Constant(Metric):
    """A constant (Mahalanobis) metric ``G(x) = M``; geodesics are straight lines.

    Args:
        matrix: a ``(d, d)`` symmetric positive definite array (a traced leaf).

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab import metric
        >>> metric.Constant(jnp.diag(jnp.array([1.0, 4.0])))(jnp.zeros((5, 2))).shape
        (5, 2, 2)
    """

    matrix: Array

    def __post_init__(self):
        # Only a concrete array is checked: JAX rebuilds the pytree with other leaves
        # (jit's argument descriptions in `.lower`, ShapeDtypeStruct, None, tracers) and
        # with stacked ``(..., d, d)`` matrices (a batch of metrics to vmap over).
        m = self.matrix
        if isinstance(m, (np.ndarray, jax.Array)) and not isinstance(m, jax.core.Tracer):
            if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
                raise ValueError(f"`matrix` must be a square (d, d) array; got shape {m.shape}.")

    @property
    def dim(self) -> int:
        return self.matrix.shape[-1]

    def __call__(self, x):
        m = 0.5 * (self.matrix + self.matrix.T)
        return jnp.broadcast_to(m, x.shape[:-1] + m.shape).astype(jnp.result_type(x, m))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PoincareHalfPlane(Metric):
    """The hyperbolic metric of the upper half-space ``x_d > 0``: ``G(x) = I / x_d^2``.

    In the half-plane (``d = 2``) geodesics are vertical lines and circular arcs
    centred on the boundary ``x_2 = 0``, and the distance is
    ``arccosh(1 + |x - y|^2 / (2 x_2 y_2))`` (`distance`).
    """

    def __call__(self, x):
        d = x.shape[-1]
        scale = 1.0 / x[..., -1] ** 2
        return scale[..., None, None] * jnp.eye(d, dtype=x.dtype)

    @staticmethod
    def distance(x: Array, y: Array) -> Array:
        """The closed-form geodesic distance between points ``x`` and ``y`` (shape ``(..., d)``)."""
        num = jnp.sum((x - y) ** 2, -1)
        return jnp.arccosh(1.0 + num / (2.0 * x[..., -1] * y[..., -1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FromCallable(Metric):
    """A metric from a user's function ``fn(x) -> (d, d)`` on one point (static).

    ``fn`` must return a symmetric positive definite matrix; it is vectorised over
    leading axes with ``jnp.vectorize``.

    Example:
        >>> import jax.numpy as jnp
        >>> from otlab import metric
        >>> g = metric.FromCallable(lambda x: (1.0 + x @ x) * jnp.eye(2))
        >>> float(g(jnp.array([[1.0, 0.0]]))[0, 1, 1])
        2.0
    """

    fn: Callable[[Array], Array] = _static()
    dim: int | None = _static(default=None)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"`fn` must be a callable x -> G(x); got {self.fn!r}.")

    def __call__(self, x):
        return jnp.vectorize(self.fn, signature="(d)->(d,d)")(x)


class MetricField(nn.Module):
    """A neural metric tensor field ``G(x) = R(x)^T R(x) + delta I`` (flax).

    ``R(x) = I + W h(x)`` with ``h`` a tanh MLP, so that ``G`` is symmetric positive
    definite by construction (eigenvalues ``>= delta``) in any dimension, and
    starts close to the Euclidean metric (the last layer is initialised small).

    Attributes:
        dim: the dimension ``d`` of the points.
        hidden: widths of the hidden layers.
        delta: the smallest eigenvalue, ``> 0``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from otlab import metric
        >>> field = metric.MetricField(dim=3, hidden=(16,))
        >>> params = field.init(jax.random.key(0), jnp.zeros(3))
        >>> field.apply(params, jnp.zeros((4, 3))).shape
        (4, 3, 3)
    """

    dim: int
    hidden: Sequence[int] = (64, 64)
    delta: float = 0.05

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.dim
        h = x
        for width in self.hidden:
            h = jnp.tanh(nn.Dense(width, param_dtype=x.dtype, dtype=x.dtype)(h))
        w = nn.Dense(
            d * d,
            kernel_init=nn.initializers.normal(1e-2),
            param_dtype=x.dtype,
            dtype=x.dtype,
        )(h)
        eye = jnp.eye(d, dtype=x.dtype)
        r = eye + w.reshape(x.shape[:-1] + (d, d))
        return jnp.swapaxes(r, -1, -2) @ r + self.delta * eye


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Learned(Metric):
    """A trained `MetricField` and its parameters: ``G(x) = field((x - center) / scale)``.

    What `otlab.metric.fit` returns as ``.metric``. The inputs are standardised by
    the data's ``center`` and ``scale`` (fixed, not trained), so the network sees
    unit-sized coordinates whatever the units of the data.

    Args:
        field: the flax module (static).
        params: its parameters (traced leaves: differentiable).
        center: ``(d,)`` shift of the inputs.
        scale: a scalar scale of the inputs.
    """

    field: MetricField = _static()
    params: dict
    center: Array
    scale: Array

    @property
    def dim(self) -> int:
        return self.field.dim

    def __call__(self, x):
        z = (x - self.center.astype(x.dtype)) / self.scale.astype(x.dtype)
        params = jax.tree.map(lambda p: p.astype(x.dtype), self.params)
        return self.field.apply(params, z)
