"""otlab.geodesic: discrete geodesics against closed forms (straight lines under a
constant metric, circular arcs centred on the boundary in the Poincaré half-plane),
vmapped over 1000 pairs; implicit gradients vs closed forms and finite differences;
jit == eager, vmap == loop; eager calls compile once; interpolation and trajectories;
bad input."""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from test_solution_compiles import count_compiles

from otlab import costs, geodesic, metric

K = 49  # the midpoint rule at 33 points is 1.5e-3 off the Poincaré arcs; 49 points: 7e-4


def _pairs(n, seed=0):
    """Pairs in the upper half-plane, horizontally apart (not a vertical geodesic)."""
    rng = np.random.default_rng(seed)
    x0 = np.stack([rng.uniform(-1.5, -0.3, n), rng.uniform(0.5, 2.0, n)], 1)
    x1 = np.stack([rng.uniform(0.3, 1.5, n), rng.uniform(0.5, 2.0, n)], 1)
    return x0, x1


_batch = jax.jit(
    jax.vmap(lambda g, a, b: geodesic.shortest_path(g, a, b, K), in_axes=(None, 0, 0))
)


def test_constant_metric_straight_lines_1000_pairs():
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(1000, 2)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(1000, 2)), jnp.float32)
    g = metric.Constant(jnp.array([[2.0, 0.7], [0.7, 1.0]]))
    paths = _batch(g, x0, x1)
    u = jnp.linspace(0.0, 1.0, K)[None, :, None]
    np.testing.assert_allclose(paths, x0[:, None] + u * (x1 - x0)[:, None], atol=1e-3)
    lengths = jax.vmap(lambda p: geodesic.length(g, p))(paths)
    z = x1 - x0
    np.testing.assert_allclose(lengths, jnp.sqrt(jnp.einsum("ni,ij,nj->n", z, g.matrix, z)), rtol=1e-4)


@pytest.fixture(scope="module")
def poincare_batch():
    x0, x1 = _pairs(1000)
    x0, x1 = jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)
    return x0, x1, _batch(metric.PoincareHalfPlane(), x0, x1)


@pytest.mark.xdist_group("poincare_batch")  # the module fixture computed once
def test_poincare_circular_arcs_1000_pairs(poincare_batch):
    x0, x1, paths = (np.asarray(a, np.float64) for a in poincare_batch)
    # the circle through x0 and x1 centred on the boundary x_2 = 0
    c = (np.sum(x1**2, 1) - np.sum(x0**2, 1)) / (2 * (x1[:, 0] - x0[:, 0]))
    radius = np.hypot(x0[:, 0] - c, x0[:, 1])
    dist = np.hypot(paths[..., 0] - c[:, None], paths[..., 1])
    assert np.max(np.abs(dist - radius[:, None])) < 1e-3
    lengths = jax.vmap(lambda p: geodesic.length(metric.PoincareHalfPlane(), p))(jnp.asarray(paths))
    exact = metric.PoincareHalfPlane.distance(jnp.asarray(x0), jnp.asarray(x1))
    np.testing.assert_allclose(lengths, exact, rtol=1e-3)


def test_poincare_vertical_geodesic():
    g = metric.PoincareHalfPlane()
    path = geodesic.shortest_path(g, jnp.array([0.3, 0.5]), jnp.array([0.3, 4.0]), K)
    np.testing.assert_allclose(path[:, 0], 0.3, atol=1e-4)
    # constant hyperbolic speed: log-heights equally spaced
    np.testing.assert_allclose(jnp.log(path[:, 1]), jnp.linspace(np.log(0.5), np.log(4.0), K), atol=1e-3)


def test_gradients_implicit_vs_closed_form_x64():
    with jax.enable_x64(True):
        g = metric.PoincareHalfPlane()
        x0, x1 = jnp.array([-0.8, 1.2]), jnp.array([0.9, 0.7])

        def dist(a):
            return geodesic.length(g, geodesic.shortest_path(g, a, x1, 65))

        grad = jax.grad(dist)(x0)
        exact = jax.grad(lambda a: metric.PoincareHalfPlane.distance(a, x1))(x0)
        np.testing.assert_allclose(grad, exact, rtol=2e-3)
        # gradient with respect to a learned metric's parameters vs central differences
        field = metric.MetricField(dim=2, hidden=(4,))
        params = field.init(jax.random.key(0), jnp.zeros(2))
        params = jax.tree.map(lambda p: 0.5 * jax.random.normal(jax.random.key(1), p.shape), params)
        learned = metric.Learned(field, params, jnp.zeros(2), jnp.asarray(1.0))
        x1b = jnp.array([0.9, -0.4])

        @jax.jit
        def energy_of(g):
            return geodesic.energy(g, geodesic.shortest_path(g, x0, x1b, 17))

        direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), learned)
        grad = jax.grad(energy_of)(learned)
        analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
        h = 1e-5
        shift = lambda s: jax.tree.map(lambda p, d: p + s * d, learned, direction)  # noqa: E731
        fd = (energy_of(shift(h)) - energy_of(shift(-h))) / (2 * h)
        np.testing.assert_allclose(analytic, fd, rtol=1e-4)


@pytest.mark.xdist_group("poincare_batch")  # the module fixture computed once
def test_jit_vmap_equals_eager_loop(poincare_batch):
    x0, x1, batched = poincare_batch
    g = metric.PoincareHalfPlane()
    for i in range(3):
        eager = geodesic.shortest_path(g, x0[i], x1[i], K)
        np.testing.assert_allclose(batched[i], eager, atol=1e-4)


def test_eager_calls_compile_once():
    """`shortest_path` is a module-level jit: eager calls with the same shapes, new
    endpoints and a new metric of the same structure (its arrays are traced) reuse one
    executable; so does a plain-function metric (held as static data)."""
    m = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    metrics = [metric.Constant(m + 0.1 * i) for i in range(4)]
    x0 = [jnp.array([0.1 * i - 1.0, 1.0 + i]) for i in range(4)]
    x1 = [jnp.array([1.0, 0.5 + 0.2 * i]) for i in range(4)]

    def plain(x):  # a metric that is a plain function, not a pytree
        return jnp.broadcast_to(jnp.eye(2) / x[..., -1, None, None] ** 2, x.shape[:-1] + (2, 2))

    for g in (metrics[0], plain):
        geodesic.shortest_path(g, x0[0], x1[0], 9)  # the one compilation
    with count_compiles() as events:
        for i in range(1, 4):
            geodesic.shortest_path(metrics[i], x0[i], x1[i], 9)
            path = geodesic.shortest_path(plain, x0[i], x1[i], 9)
    assert events == []
    exact = geodesic.shortest_path(metric.PoincareHalfPlane(), x0[3], x1[3], 9)
    np.testing.assert_allclose(path, exact, atol=5e-4)  # float32, stopped at rounding level


def test_riemannian_cost_matches_mahalanobis_in_every_solver():
    import otlab

    m = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    x = jax.random.normal(jax.random.key(0), (30, 2))
    y = jax.random.normal(jax.random.key(1), (40, 2)) + 1.0
    rc = costs.Riemannian(metric.Constant(m))
    np.testing.assert_allclose(rc.all_pairs(x, y), costs.Mahalanobis(m).all_pairs(x, y), rtol=1e-4, atol=1e-5)
    for solver in (otlab.sinkhorn, otlab.sns):
        a = solver(otlab.PointCloud(x, y, cost=rc), epsilon=0.5)
        b = solver(otlab.PointCloud(x, y, cost=costs.Mahalanobis(m)), epsilon=0.5)
        np.testing.assert_allclose(a.reg_cost, b.reg_cost, rtol=1e-4)
    # gradients with respect to the metric: the same as with respect to the Mahalanobis matrix
    ga = jax.grad(lambda g: otlab.sinkhorn(otlab.PointCloud(x, y, cost=costs.Riemannian(g)), epsilon=0.5).reg_cost)(metric.Constant(m))
    gb = jax.grad(lambda c: otlab.sinkhorn(otlab.PointCloud(x, y, cost=c), epsilon=0.5).reg_cost)(costs.Mahalanobis(m))
    np.testing.assert_allclose(ga.matrix + ga.matrix.T, gb.matrix + gb.matrix.T, rtol=1e-3, atol=1e-5)


def test_riemannian_trapezoid_cost():
    """``z^T (G(x) + G(y)) z / 2``: exact for a constant metric, symmetric, the metric at the data only."""
    m = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    x = jax.random.normal(jax.random.key(0), (6, 2))
    y = jax.random.normal(jax.random.key(1), (5, 2)) + 1.0
    rc = costs.Riemannian(metric.Constant(m), method="trapezoid")
    np.testing.assert_allclose(rc.all_pairs(x, y), costs.Mahalanobis(m).all_pairs(x, y), rtol=1e-5, atol=1e-5)
    g = metric.PoincareHalfPlane()
    x, y = x + jnp.array([0.0, 4.0]), y + jnp.array([0.0, 4.0])  # in the upper half-plane
    c = costs.Riemannian(g, method="trapezoid")
    np.testing.assert_allclose(c.all_pairs(x, y), c.all_pairs(y, x).T, rtol=1e-6)
    z = y[2] - x[3]
    np.testing.assert_allclose(c(x[3], y[2]), 0.5 * z @ (g(x[3]) + g(y[2])) @ z, rtol=1e-6)
    np.testing.assert_allclose(c.all_pairs(x, y)[3, 2], c(x[3], y[2]), rtol=1e-6)


def test_riemannian_geodesic_cost_poincare():
    g = metric.PoincareHalfPlane()
    c = costs.Riemannian(g, method="geodesic", num_points=K)
    x, y = jnp.array([[-1.0, 1.0], [0.0, 0.5]]), jnp.array([[1.0, 1.0], [0.5, 2.0], [0.2, 0.6]])
    exact = metric.PoincareHalfPlane.distance(x[:, None], y[None]) ** 2
    np.testing.assert_allclose(c.all_pairs(x, y), exact, rtol=2e-3)
    # the midpoint approximation is exact for close points only
    mid = costs.Riemannian(g).all_pairs(x, y)
    assert abs(float(mid[0, 0] - exact[0, 0])) > 0.1
    np.testing.assert_allclose(mid[1, 2], exact[1, 2], rtol=5e-2)


def test_interpolate_and_trajectories_euclidean():
    x = jax.random.normal(jax.random.key(0), (25, 2))
    eye = metric.Constant(jnp.eye(2))
    out = geodesic.interpolate(eye, x, x + jnp.array([2.0, -1.0]), jnp.array([0.25, 0.5, 1.0]))
    assert out.shape == (3, 25, 2)
    np.testing.assert_allclose(out[1], x + jnp.array([1.0, -0.5]), atol=5e-2)
    np.testing.assert_allclose(out[0].mean(0), x.mean(0) + jnp.array([0.5, -0.25]), atol=1e-2)
    # the same shapes in each interval (3 fractions, 25 points): one compilation
    snaps = [x, x + 1.0, x + jnp.array([3.0, 1.0])]
    paths = geodesic.trajectories(eye, snaps, [0.0, 1.0, 2.0], jnp.array([0.0, 0.5, 1.5, 2.0]))
    assert paths.shape == (4, 25, 2)
    np.testing.assert_allclose(paths[0], x, atol=1e-5)
    np.testing.assert_allclose(paths[1].mean(0), x.mean(0) + 0.5, atol=2e-2)
    np.testing.assert_allclose(paths[2].mean(0), x.mean(0) + jnp.array([2.0, 1.0]), atol=5e-2)


def test_bad_input():
    g = metric.Constant(jnp.eye(2))
    with pytest.raises(ValueError, match="x0"):
        geodesic.shortest_path(g, jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="num_points"):
        geodesic.shortest_path(g, jnp.zeros(2), jnp.ones(2), 2)
    with pytest.raises(ValueError, match="path"):
        geodesic.length(g, jnp.zeros(3))
    with pytest.raises(ValueError, match="samples1"):
        geodesic.interpolate(g, jnp.zeros((4, 2)), jnp.zeros((4, 3)), 0.5)
    with pytest.raises(ValueError, match="samples0"):
        geodesic.interpolate(g, jnp.full((4, 2), jnp.nan), jnp.zeros((4, 2)), 0.5)
    with pytest.raises(ValueError, match="t_eval"):
        geodesic.trajectories(g, [jnp.zeros((3, 2)), jnp.ones((3, 2))], [0.0, 1.0], jnp.array([2.0]))
    with pytest.raises(ValueError, match="method"):
        costs.Riemannian(g, method="exact")
