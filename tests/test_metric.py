"""otlab.metric: metric tensors (positive definite by construction, closed forms),
and `fit` at tiny sizes: metric recovery on a curved flow with a known metric,
geodesic interpolation under that metric beating McCann's, determinism under a seed, a d = 5
case end to end, gradients through the training loss, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from otlab import geodesic, metric
from otlab.metric import synthetic

# One configuration for every training test, so that the jitted step compiles once.
FIT = dict(epochs=60, hidden=(16,), learning_rate=2e-2, progress=False)


@pytest.fixture(scope="module")
def curved():
    snaps, times = synthetic.rotating_arc(num_times=5, n=48, speed=np.pi / 6, seed=3)
    res = metric.fit(snaps[::2], times[::2], seed=0, **FIT)
    return snaps, times, res


def test_metric_field_positive_definite_any_dim():
    for d in (1, 4):
        field = metric.MetricField(dim=d, hidden=(8, 8), delta=0.1)
        params = field.init(jax.random.key(d), jnp.zeros(d))
        params = jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.key(1), p.shape), params)
        g = field.apply(params, jax.random.normal(jax.random.key(2), (50, d)))
        assert g.shape == (50, d, d)
        np.testing.assert_allclose(g, jnp.swapaxes(g, -1, -2), atol=1e-5)
        assert float(jnp.min(jnp.linalg.eigvalsh(g))) >= 0.1 - 1e-4


def test_closed_form_metrics():
    m = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    x = jax.random.normal(jax.random.key(0), (7, 2))
    np.testing.assert_allclose(metric.FromCallable(lambda p: m)(x), metric.Constant(m)(x))
    g = metric.PoincareHalfPlane()(jnp.array([[0.0, 2.0]]))
    np.testing.assert_allclose(g[0], 0.25 * jnp.eye(2))
    np.testing.assert_allclose(metric.PoincareHalfPlane.distance(jnp.array([0.0, 1.0]), jnp.array([0.0, np.e])), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="matrix"):
        metric.Constant(jnp.zeros((2, 3)))
    # a Constant is a jit argument that `.lower` (and tree maps to other leaves) rebuild
    c = metric.Constant(m)
    exe = jax.jit(lambda g, x: g(x)).lower(c, x).compile()
    np.testing.assert_allclose(exe(c, x), c(x))
    assert jax.eval_shape(lambda g: g, c).matrix.shape == (2, 2)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), c, metric.Constant(2 * m))  # a batch of metrics
    assert jax.vmap(lambda g: g(x))(stacked).shape == (2, 7, 2, 2)
    with pytest.raises(ValueError, match="fn"):
        metric.FromCallable(3.0)


def _principal_cos(g, pts):
    """Mean |cos| between the cheapest direction of ``g`` and the circles' tangent."""
    v = jnp.linalg.eigh(g(pts))[1][:, :, 0]
    return float(jnp.mean(jnp.abs(jnp.sum(v * synthetic.tangent(pts), -1))))


@pytest.mark.xdist_group("curved")  # the module fixture computed once
def test_recovers_the_metric_of_a_curved_flow(curved):
    snaps, _, res = curved
    pts = jnp.concatenate([jnp.asarray(s) for s in snaps])
    assert _principal_cos(res.metric, pts) >= 0.9
    assert _principal_cos(metric.Constant(jnp.eye(2) + 0.1 * jnp.array([[1.0, 0], [0, -1]])), pts) < 0.8
    assert res.history[res.best_epoch] < res.history[0]


def _w2(a, b):
    import ot

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(ot.emd2([], [], ot.dist(a, b))))


@pytest.mark.xdist_group("curved")  # the module fixture computed once
def test_geodesic_interpolation_under_the_true_metric_beats_mccann(curved):
    """The interpolation machinery (coupling with the Riemannian cost, geodesics,
    arc-length fractions) on the curved flow, with the metric that generated it. The
    learned metric's gain over McCann needs more data and epochs than a unit test
    affords: it is measured in benchmarks/bench_metric.py."""
    snaps, _, _ = curved
    true, mccann = [], []
    for i in (1, 3):
        a, b = snaps[i - 1], snaps[i + 1]
        true.append(_w2(geodesic.interpolate(synthetic.circular_metric(0.05), a, b, 0.5), snaps[i]))
        mccann.append(_w2(geodesic.interpolate(metric.Constant(jnp.eye(2)), a, b, 0.5), snaps[i]))
    assert np.mean(true) < 0.8 * np.mean(mccann), (true, mccann)


@pytest.mark.xdist_group("curved")  # the module fixture computed once
def test_fit_is_deterministic_under_a_seed_and_stops_early(curved):
    snaps, times, _ = curved  # the fixture's shapes and options: no new compilation
    kw = dict(FIT, epochs=3)
    a = metric.fit(snaps[::2], times[::2], seed=5, **kw)
    b = metric.fit(snaps[::2], times[::2], seed=5, **kw)
    c = metric.fit(snaps[::2], times[::2], seed=6, **kw)
    np.testing.assert_array_equal(a.history, b.history)
    assert not np.array_equal(a.history, c.history)
    x = jnp.ones((3, 2))
    np.testing.assert_array_equal(a.metric(x), b.metric(x))
    # no relative improvement of 10x is possible: stops after `patience` epochs
    res = metric.fit(snaps[::2], times[::2], **dict(FIT, epochs=50, patience=2, min_delta=10.0))
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 0


def test_fit_with_the_trapezoid_cost(curved):
    """``cost_method="trapezoid"`` trains (the loss falls) and differs from Simpson's rule."""
    snaps, times, _ = curved
    kw = dict(FIT, epochs=5)
    trap = metric.fit(snaps[::2], times[::2], cost_method="trapezoid", **kw)
    simp = metric.fit(snaps[::2], times[::2], **kw)
    assert np.all(np.isfinite(trap.history)) and trap.history[-1] < trap.history[0]
    assert not np.allclose(trap.transport, simp.transport)


def test_spectral_variation_spares_rotations_only():
    """Zero for a constant metric and for one whose eigenvectors turn with constant
    eigenvalues (the circles' metric); positive when the scale or the anisotropy varies."""
    from otlab.metric.fit import spectral_variation

    x = jnp.asarray(synthetic.rotating_arc(num_times=1, n=40, seed=1)[0][0])
    sv = jax.jit(spectral_variation)
    assert float(sv(metric.Constant(jnp.array([[2.0, 0.3], [0.3, 1.0]])), x)) == 0.0
    assert float(sv(synthetic.circular_metric(0.1), x)) < 1e-8
    assert float(sv(metric.PoincareHalfPlane(), x)) > 0.1  # scale 1 / x_2^2: |grad u| = 1 / x_2
    aniso = metric.FromCallable(lambda p: jnp.diag(jnp.array([jnp.exp(p[0]), jnp.exp(-p[0])])))
    np.testing.assert_allclose(sv(aniso, x), jnp.mean(jnp.tanh(x[:, 0]) ** 2), rtol=1e-4)


def test_fit_variation_penalty(curved):
    """The fixture trains (jitted step) with the default ``variation``: the term is recorded,
    finite, positive, and falls; a negative weight is refused before tracing."""
    snaps, times, res = curved
    assert np.all(np.isfinite(res.variation)) and res.variation[res.best_epoch] > 0
    assert res.variation[-1] < res.variation[:5].max()
    with pytest.raises(ValueError, match="variation"):
        metric.fit(snaps[::2], times[::2], variation=-1.0)


def test_d5_end_to_end_and_jit_vmap_grad():
    snaps, times = synthetic.rotating_arc(num_times=3, n=30, dim=5, seed=2)
    snaps = [snaps[0], snaps[1][:24], snaps[2][:27]]  # different sizes
    res = metric.fit(snaps, times, **dict(FIT, epochs=5, batch_size=16))
    g = res.metric
    assert g(jnp.zeros(5)).shape == (5, 5)
    path = jax.jit(lambda g, a, b: geodesic.shortest_path(g, a, b, 8))(g, snaps[0][0], snaps[1][0])
    assert path.shape == (8, 5) and bool(jnp.all(jnp.isfinite(path)))
    mid = geodesic.interpolate(g, snaps[0], snaps[1], 0.5, num_points=8)
    assert mid.shape == (30, 5) and bool(jnp.all(jnp.isfinite(mid)))
    # gradient of a geodesic length with respect to the network's parameters
    grads = jax.grad(lambda g: geodesic.length(g, geodesic.shortest_path(g, snaps[0][0], snaps[2][0], 8)))(g)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(grads.params))
    lengths = jax.vmap(lambda a, b: geodesic.length(g, jnp.stack([a, b])))(snaps[0][:5], snaps[1][:5])
    assert lengths.shape == (5,)


def test_bad_input():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="snapshots"):
        metric.fit([x, np.zeros((5, 3))], [0.0, 1.0])
    with pytest.raises(ValueError, match="snapshots"):
        metric.fit([x], [0.0])
    with pytest.raises(ValueError, match="times"):
        metric.fit([x, x + 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="times"):
        metric.fit([x, x + 1, x + 2], [0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"snapshots\[1\]"):
        metric.fit([x, np.full((5, 2), np.nan)], [0.0, 1.0])
    with pytest.raises(ValueError, match="times"):
        metric.fit([x, x + 1], [0.0])
    with pytest.raises(ValueError, match="epochs"):
        metric.fit([x, x + 1], [0.0, 1.0], epochs=0)
    with pytest.raises(ValueError, match="cost_method"):
        metric.fit([x, x + 1], [0.0, 1.0], cost_method="geodesic")
