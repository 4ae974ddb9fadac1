"""`otlab.initializers.Multiscale`: a coarse-to-fine start (weighted k-means levels,
warm-started level solves, c-transform extension) that never changes the answer and
saves fine-level iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otlab
from otlab import initializers
from otlab.initializers import Multiscale


def _clouds(n=600, m=500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(m, 2)) @ np.array([[1.5, 0.3], [0.0, 0.6]]) + np.array([2.0, -1.0])
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def test_kmeans_masses_and_centres():
    x, _ = _clouds()
    w = jnp.asarray(np.random.default_rng(1).uniform(size=600), jnp.float32)
    w = w.at[:50].set(0.0)
    c, mass = initializers._kmeans(jax.random.key(0), x, w, 16, 10, block=128)
    assert c.shape == (16, 2) and mass.shape == (16,)
    np.testing.assert_allclose(float(mass.sum()), float(w.sum()), rtol=1e-5)
    # each centre is the weighted mean of its cell (Lloyd's fixed point after the steps)
    lab = jnp.argmin(jnp.sum((x[:, None] - c[None]) ** 2, -1), 1)
    for j in range(16):
        cell = (lab == j) & (w > 0)
        if bool(cell.any()):
            mean = (w[cell][:, None] * x[cell]).sum(0) / w[cell].sum()
            np.testing.assert_allclose(c[j], mean, atol=0.05)


@pytest.mark.parametrize("block_size", [None, 128])
def test_multiscale_start_same_answer_fewer_iterations(block_size):
    x, y = _clouds()
    geom = otlab.PointCloud(x, y, block_size=block_size)
    eps = 0.01 * float(otlab.PointCloud(x, y).mean_cost())
    plain = otlab.sinkhorn(geom, epsilon=eps, tol=1e-3, max_iter=5000)
    ms = otlab.sinkhorn(geom, epsilon=eps, tol=1e-3, max_iter=5000, init=Multiscale(sizes=(32, 128)))
    assert bool(plain.converged) and bool(ms.converged)
    assert int(ms.n_iter) < 0.5 * int(plain.n_iter), (int(ms.n_iter), int(plain.n_iter))
    np.testing.assert_allclose(ms.reg_cost, plain.reg_cost, rtol=1e-3)


def test_multiscale_jit_vmap_and_gradients_unchanged(x64):
    """``init`` never changes gradients (implicit differentiation at the solution)."""
    x, y = _clouds(120, 100)
    x, y = x.astype(jnp.float64), y.astype(jnp.float64)
    init = Multiscale(sizes=(16,), kmeans_iters=3)

    def loss(x, init):
        return otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.5, tol=1e-10, init=init).reg_cost

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(x, init), grad(x, None), atol=1e-8)
    xs = jnp.stack([x, x + 0.1])
    batched = jax.vmap(lambda x: loss(x, init))(xs)
    np.testing.assert_allclose(batched, [loss(x, init), loss(x + 0.1, init)], rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(sizes=()), "sizes"), (dict(sizes=(64, 16)), "sizes"), (dict(sizes=(1,)), "sizes"),
     (dict(kmeans_iters=-1), "kmeans_iters"), (dict(anneal=0.5), "anneal")],
)
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        Multiscale(**kwargs)


def test_needs_a_point_cloud():
    with pytest.raises(ValueError, match="PointCloud"):
        otlab.sinkhorn(jnp.ones((5, 4)), init=Multiscale())
