"""The shared set of small OT problems that every solver test runs on.

Each problem is built by :func:`make` in the dtype asked for (call it inside the
precision context of the test: see ``conftest.dtype``). Sizes are small and
``n != m`` everywhere, so that a transposed ``(n, m)`` bug cannot hide.

Usage in a solver test::

    @pytest.mark.parametrize("name", problems.NAMES)
    def test_something(name, dtype):
        p = problems.make(name, dtype)
        sol = otlab.sinkhorn(p.geom, p.a, p.b, epsilon=p.epsilon)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

import otlab
from otlab import costs

__all__ = ["NAMES", "POINT_CLOUD_NAMES", "TestProblem", "make", "tols", "dense_plan"]


@dataclasses.dataclass(frozen=True)
class TestProblem:
    """A geometry, its weights and a sensible (absolute) epsilon.

    ``x``, ``y`` and ``cost`` are ``None`` for a cost-matrix problem.
    """

    __test__ = False  # not a pytest test class

    name: str
    geom: Any
    a: jnp.ndarray
    b: jnp.ndarray
    epsilon: float
    x: jnp.ndarray | None = None
    y: jnp.ndarray | None = None
    cost: Any = None

    @property
    def is_point_cloud(self) -> bool:
        return self.x is not None

    @property
    def shape(self) -> tuple[int, int]:
        return self.geom.shape

    @property
    def dtype(self):
        return self.a.dtype

    def cost_matrix(self) -> np.ndarray:
        """The cost matrix as a float64 NumPy array (for reference solvers)."""
        return np.asarray(self.geom.cost_matrix, dtype=np.float64)

    def online(self, block_size: int) -> TestProblem:
        """The same problem on an online (blocked) point cloud."""
        if not self.is_point_cloud:
            raise ValueError(f"problem {self.name!r} has no points")
        geom = otlab.PointCloud(self.x, self.y, self.cost, block_size=block_size)
        return dataclasses.replace(self, geom=geom, name=f"{self.name}-online{block_size}")


def _weights(rng: np.random.Generator, k: int) -> np.ndarray:
    """Non-uniform positive weights spanning two orders of magnitude, summing to one."""
    w = rng.uniform(0.01, 1.0, size=k) ** 2 + 1e-3
    return w / w.sum()


def _gauss(rng, dtype):
    x = rng.normal(size=(23, 2))
    y = 0.7 * rng.normal(size=(31, 2)) + np.array([1.5, -0.5])
    return dict(x=x, y=y, cost=None, a=None, b=None)


def _gauss_weighted(rng, dtype):
    x = rng.normal(size=(17, 2)) * np.array([1.0, 0.5])
    y = rng.normal(size=(26, 2)) + 1.0
    return dict(x=x, y=y, cost=None, a=_weights(rng, 17), b=_weights(rng, 26))


def _cost_matrix(rng, dtype):
    c = rng.uniform(0.0, 2.0, size=(12, 19))
    return dict(c=c, a=_weights(rng, 12), b=_weights(rng, 19))


def _mahalanobis(rng, dtype):
    x = rng.normal(size=(20, 3))
    y = rng.normal(size=(15, 3)) + np.array([0.5, 0.0, -1.0])
    r = rng.normal(size=(3, 3))
    m = r @ r.T / 3 + 0.2 * np.eye(3)
    return dict(x=x, y=y, cost=costs.Mahalanobis(jnp.asarray(m, dtype)), a=None, b=_weights(rng, 15))


def _line(rng, dtype):
    x = rng.uniform(-1.0, 1.0, size=(25, 1))
    y = rng.exponential(size=(18, 1))
    return dict(x=x, y=y, cost=None, a=_weights(rng, 25), b=None)


_BUILDERS = {
    "gauss": _gauss,  # 2-D clouds, uniform weights
    "gauss_weighted": _gauss_weighted,  # 2-D clouds, non-uniform weights
    "cost_matrix": _cost_matrix,  # a random cost-matrix Geometry
    "mahalanobis": _mahalanobis,  # 3-D clouds, Mahalanobis cost
    "line": _line,  # 1-D problem
}
NAMES = tuple(_BUILDERS)
POINT_CLOUD_NAMES = tuple(n for n in NAMES if n != "cost_matrix")


def make(name: str, dtype=jnp.float32, *, block_size: int | None = None, seed: int = 0,
         eps_rel: float = 0.1) -> TestProblem:
    """Build problem ``name`` in ``dtype``; ``epsilon = eps_rel * mean cost``."""
    rng = np.random.default_rng([seed, NAMES.index(name)])
    spec = _BUILDERS[name](rng, dtype)
    if "c" in spec:
        geom = otlab.Geometry(jnp.asarray(spec["c"], dtype))
        x = y = cost = None
    else:
        x, y = jnp.asarray(spec["x"], dtype), jnp.asarray(spec["y"], dtype)
        cost = spec["cost"]
        geom = otlab.PointCloud(x, y, cost, block_size=block_size)
    n, m = geom.shape
    a = spec["a"] if spec["a"] is not None else np.full(n, 1.0 / n)
    b = spec["b"] if spec["b"] is not None else np.full(m, 1.0 / m)
    eps = eps_rel * float(np.mean(np.asarray(geom.cost_matrix, np.float64)))
    return TestProblem(name, geom, jnp.asarray(a, dtype), jnp.asarray(b, dtype), eps, x, y, cost)


def dense_plan(c, f, g, eps) -> np.ndarray:
    """``exp((f + g - C) / eps)`` in float64 NumPy."""
    c, f, g = (np.asarray(t, np.float64) for t in (c, f, g))
    return np.exp((f[:, None] + g[None, :] - c) / float(eps))


def tols(dtype) -> dict:
    """``rtol``/``atol`` for two computations of the same quantity in ``dtype``."""
    if dtype == jnp.float64:
        return dict(rtol=1e-9, atol=1e-11)
    return dict(rtol=2e-5, atol=2e-6)
