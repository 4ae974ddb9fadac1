"""The online path's factored log-sum-exp (`otlab.costs.Cost.features`, one GEMM per
block fused with the exponentials) and its shift guess: equal to the dense reduction,
differentiable the same way, and safe when the guess is far off."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otlab
from otlab import costs


def _clouds(seed=0, n=37, m=29, d=3, offset=0.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)) + offset)
    y = jnp.asarray(rng.normal(size=(m, d)) * 1.3 + 0.5 + offset)
    return x, y


def _costs():
    m = np.random.default_rng(3).normal(size=(3, 3))
    return {
        "sqeuclidean": costs.SqEuclidean(),
        "mahalanobis": costs.Mahalanobis(jnp.asarray(m @ m.T + np.eye(3))),
        "scaled": costs.Scaled(costs.SqEuclidean(), jnp.asarray(0.7)),
    }


@pytest.mark.parametrize("name", ["sqeuclidean", "mahalanobis", "scaled"])
def test_features_factor_the_cost(x64, name):
    cost = _costs()[name]
    x, y = _clouds()
    phi, psi = cost.features(x, y)
    np.testing.assert_allclose(phi @ psi.T, cost.all_pairs(x, y), atol=1e-10)
    assert costs.Euclidean(1.0).features(x, y) is None
    assert costs.FunctionCost(lambda u, v: jnp.sum((u - v) ** 2)).features(x, y) is None


@pytest.mark.parametrize("name", ["sqeuclidean", "mahalanobis", "scaled"])
def test_separable_features_factor_the_cost(x64, name):
    cost = _costs()[name]
    x, y = _clouds(offset=5.0)
    row, col, phi, psi = cost.separable_features(x, y)
    assert (row.shape, col.shape, phi.shape, psi.shape) == ((37,), (29,), (37, 3), (29, 3))
    np.testing.assert_allclose(
        row[:, None] + col[None, :] + phi @ psi.T, cost.all_pairs(x, y), atol=1e-10
    )
    assert costs.Euclidean(1.0).separable_features(x, y) is None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FeaturesOnly(costs.Cost):
    """A custom cost that defines `features` but not `separable_features`."""

    def __call__(self, x, y):
        return jnp.sum((x - y) ** 2)

    def features(self, x, y):
        return costs.SqEuclidean().features(x, y)


@pytest.mark.parametrize("axis", [0, 1])
def test_online_lse_of_a_cost_with_features_only(x64, axis):
    x, y = _clouds(offset=5.0)
    rng = np.random.default_rng(2)
    f, g = jnp.asarray(rng.normal(size=37)), jnp.asarray(rng.normal(size=29))
    dense = otlab.PointCloud(x, y).lse(f, g, 0.05, axis)
    online = otlab.PointCloud(x, y, _FeaturesOnly(), block_size=8)
    np.testing.assert_allclose(online.lse(f, g, 0.05, axis), dense, rtol=1e-12, atol=1e-10)
    got = online.lse(f, g, 0.05, axis, shift=dense + 0.3)
    np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", ["sqeuclidean", "mahalanobis", "scaled"])
@pytest.mark.parametrize("axis", [0, 1])
def test_online_lse_equals_dense_with_and_without_shift(x64, name, axis):
    cost = _costs()[name]
    x, y = _clouds(offset=5.0)  # far from the origin: the features centre the clouds
    rng = np.random.default_rng(1)
    f, g = jnp.asarray(rng.normal(size=37)), jnp.asarray(rng.normal(size=29))
    eps = 0.05
    dense = otlab.PointCloud(x, y, cost).lse(f, g, eps, axis)
    online = otlab.PointCloud(x, y, cost, block_size=8)
    np.testing.assert_allclose(online.lse(f, g, eps, axis), dense, rtol=1e-12, atol=1e-10)
    # a good guess, a guess off by 50 (still in float64's range), and a guess off by
    # 1e4 (out of range: the exact pass is redone) all give the same result
    for off in (0.3, 50.0, 1e4, -1e4):
        got = online.lse(f, g, eps, axis, shift=dense + off)
        np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-9)
    # a non-finite guess is ignored (treated as 0)
    bad = dense.at[0].set(jnp.nan)
    np.testing.assert_allclose(online.lse(f, g, eps, axis, shift=bad), dense, atol=1e-9)


def test_float32_shift_guess_out_of_range_falls_back():
    x, y = _clouds()
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    f, g = jnp.zeros(37, jnp.float32), jnp.zeros(29, jnp.float32)
    geom = otlab.PointCloud(x, y, block_size=8)
    exact = otlab.PointCloud(x, y).lse(f, g, 0.01, 1)  # values down to about -100
    for shift in (exact, jnp.zeros_like(exact), exact + 80.0):
        np.testing.assert_allclose(geom.lse(f, g, 0.01, 1, shift=shift), exact, rtol=1e-5)


def test_online_sinkhorn_and_gradients_equal_dense(x64):
    x, y = _clouds(2)
    a = jnp.asarray(np.random.default_rng(5).uniform(0.5, 1.5, 37))
    a = (a / a.sum()).at[3].set(0.0)
    a = a / a.sum()

    def reg_cost(x, y, block_size):
        geom = otlab.PointCloud(x, y, block_size=block_size)
        return otlab.sinkhorn(geom, a, epsilon=0.1, tol=1e-11, mode="log").reg_cost

    v1, g1 = jax.value_and_grad(reg_cost, argnums=(0, 1))(x, y, None)
    v2, g2 = jax.value_and_grad(reg_cost, argnums=(0, 1))(x, y, 8)
    np.testing.assert_allclose(v2, v1, rtol=1e-10)
    for u, w in zip(g1, g2, strict=True):
        np.testing.assert_allclose(w, u, atol=1e-8)
    sol = otlab.sinkhorn(otlab.PointCloud(x, y, block_size=8), a, epsilon=0.1, tol=1e-11)
    ref = otlab.sinkhorn(otlab.PointCloud(x, y), a, epsilon=0.1, tol=1e-11, mode="log")
    assert int(sol.n_iter) == int(ref.n_iter) and bool(sol.converged)


def test_auto_block_size():
    from otlab.geometry import auto_block_size

    assert auto_block_size(4096, 4096) == 2048  # at most AUTO_MAX_ROWS
    assert auto_block_size(10**5, 10**5) == 512  # 256 MB of float32 logits per block
    assert auto_block_size(10**5, 10**5, jnp.float64) == 256
    assert auto_block_size(10**8, 10) == 16  # at least 16 rows
    assert auto_block_size(100, 80) == 128  # no more than the clouds (to a power of two)
    assert auto_block_size(50, 50, budget=1 << 40) == 64
    assert auto_block_size(4096, 4096, budget=8 << 20) == 512
    with pytest.raises(ValueError, match="budget"):
        auto_block_size(10, 10, budget=0)
    x, y = _clouds()
    geom = otlab.PointCloud(x, y, block_size="auto")
    assert geom.is_online and geom.block_size == 64
    f, g = jnp.zeros(37), jnp.zeros(29)
    np.testing.assert_allclose(
        geom.lse(f, g, 0.1, 1), otlab.PointCloud(x, y).lse(f, g, 0.1, 1), rtol=1e-5
    )
    # static under jit and vmap (the resolved size is part of the pytree's static data)
    out = jax.jit(lambda x: otlab.PointCloud(x, y, block_size="auto").lse(f, g, 0.1, 0))(x)
    np.testing.assert_allclose(out, otlab.PointCloud(x, y).lse(f, g, 0.1, 0), rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        otlab.PointCloud(x, y, block_size="big")
