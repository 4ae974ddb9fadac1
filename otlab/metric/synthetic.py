"""Synthetic snapshots with known geometry, for tests, benchmarks and the demo.

`rotating_arc` is a curved flow: an arc of an annulus turning about the origin,
so that every particle moves along a circle; the metric under which such motion
is cheap is `circular_metric`, ``A(x) = I - (1 - s) v(x) v(x)^T`` with ``v`` the unit
tangent of the circle through ``x``. `translating_arc` is the straight-flow
control: the same arc shape moving along a straight line.

Example:
    >>> from otlab.metric import synthetic
    >>> snaps, times = synthetic.rotating_arc(num_times=3, n=50)
    >>> len(snaps), snaps[0].shape, times.tolist()
    (3, (50, 2), [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from otlab.metric.tensors import FromCallable

__all__ = ["rotating_arc", "translating_arc", "circular_metric", "tangent"]


def _arc(rng, n, start, arc, radius, width, dim):
    theta = start + arc * rng.uniform(size=n)
    r = radius + width * rng.standard_normal(n)
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    if dim > 2:
        pts = np.concatenate([pts, width * rng.standard_normal((n, dim - 2))], 1)
    return pts


def rotating_arc(
    num_times: int = 7,
    n: int = 200,
    *,
    speed: float = np.pi / 8,
    arc: float = np.pi / 2,
    radius: float = 2.0,
    width: float = 0.15,
    dim: int = 2,
    seed: int = 0,
    dtype=np.float32,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Independent samples at times ``0, 1, ..., num_times - 1`` of a rotating arc.

    At time ``t`` the angles are uniform on ``[speed * t, speed * t + arc]`` and the
    radii ``radius + width * N(0, 1)``; extra dimensions (``dim > 2``) are
    ``width * N(0, 1)`` noise. Returns ``(snapshots, times)``.
    """
    rng = np.random.default_rng(seed)
    times = np.arange(num_times, dtype=float)
    snaps = [_arc(rng, n, speed * t, arc, radius, width, dim).astype(dtype) for t in times]
    return snaps, times


def translating_arc(
    num_times: int = 7,
    n: int = 200,
    *,
    velocity: tuple[float, float] = (0.6, 0.3),
    arc: float = np.pi / 2,
    radius: float = 2.0,
    width: float = 0.15,
    seed: int = 0,
    dtype=np.float32,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The straight-flow control: the arc of `rotating_arc` translated by ``velocity * t``."""
    rng = np.random.default_rng(seed)
    times = np.arange(num_times, dtype=float)
    v = np.asarray(velocity)
    snaps = [(_arc(rng, n, 0.0, arc, radius, width, 2) + v * t).astype(dtype) for t in times]
    return snaps, times


def tangent(x):
    """Unit tangent ``(-x_2, x_1) / |x|`` of the circle about the origin through ``x[..., :2]``."""
    v = jnp.stack([-x[..., 1], x[..., 0]], -1)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def circular_metric(s: float = 0.1) -> FromCallable:
    """``A(x) = I - (1 - s) v v^T`` in the plane (``v`` = `tangent`): motion along circles
    about the origin costs ``s`` times motion across them."""

    def fn(x):
        v = tangent(x)
        return jnp.eye(2, dtype=x.dtype) - (1.0 - s) * jnp.outer(v, v)

    return FromCallable(fn, dim=2)
