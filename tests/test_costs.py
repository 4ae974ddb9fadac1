"""Ground costs: closed forms, ott-jax parity, conversion and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ott.geometry import costs as ott_costs
from scipy.spatial.distance import cdist

import otlab
from otlab import costs


def _points(dtype, n=7, m=9, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    y = jnp.asarray(rng.normal(size=(m, d)) + 0.3, dtype)
    return x, y


def _rtol(dtype):
    return 1e-12 if dtype == jnp.float64 else 2e-5


def _atol(dtype):
    return 1e-12 if dtype == jnp.float64 else 1e-5


def _non_symmetric_matrix(dtype, d=3, seed=1):
    r = np.random.default_rng(seed).normal(size=(d, d))
    return jnp.asarray(r @ r.T + 0.5 * np.eye(d) + 0.3 * np.triu(r), dtype)


COST_FACTORIES = {
    "sqeuclidean": lambda dt: costs.SqEuclidean(),
    "euclidean": lambda dt: costs.Euclidean(),
    "euclidean_p1.5": lambda dt: costs.Euclidean(1.5),
    "euclidean_p3": lambda dt: costs.Euclidean(3.0),
    "cosine": lambda dt: costs.Cosine(),
    "mahalanobis": lambda dt: costs.Mahalanobis(_non_symmetric_matrix(dt)),
    "function": lambda dt: costs.FunctionCost(lambda x, y: jnp.sum(jnp.abs(x - y))),
    "ott_pnormp": lambda dt: costs.OTTCost(ott_costs.PNormP(1.5)),
}


def _reference(name, x, y, cost) -> np.ndarray:
    """An independent (NumPy / SciPy) cost matrix."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = cdist(x, y)
    if name == "sqeuclidean":
        return d**2
    if name.startswith("euclidean"):
        return d**cost.p
    if name == "cosine":
        return cdist(x, y, "cosine")
    if name == "mahalanobis":
        m = np.asarray(cost.matrix, np.float64)
        return cdist(x, y, "mahalanobis", VI=0.5 * (m + m.T)) ** 2
    if name == "function":
        return cdist(x, y, "cityblock")
    if name == "ott_pnormp":
        return cdist(x, y, "minkowski", p=1.5) ** 1.5 / 1.5
    raise AssertionError(name)


@pytest.mark.parametrize("name", COST_FACTORIES)
def test_all_pairs_matches_pairwise_call_and_reference(name, dtype):
    x, y = _points(dtype)
    cost = COST_FACTORIES[name](dtype)
    c = cost.all_pairs(x, y)
    assert c.shape == (7, 9) and c.dtype == dtype
    pairwise = jax.vmap(lambda xi: jax.vmap(lambda yj: cost(xi, yj))(y))(x)
    np.testing.assert_allclose(c, pairwise, rtol=_rtol(dtype) * 10, atol=_atol(dtype) * 10)
    np.testing.assert_allclose(c, _reference(name, x, y, cost), rtol=_rtol(dtype) * 10, atol=_atol(dtype) * 10)


@pytest.mark.parametrize(
    "ours, theirs, scale",
    [
        (costs.SqEuclidean(), ott_costs.SqEuclidean(), 1.0),
        (costs.Euclidean(), ott_costs.Euclidean(), 1.0),
        # ott's EuclideanP is |x - y|_2^p, the same as ours.
        (costs.Euclidean(1.5), ott_costs.EuclideanP(1.5), 1.0),
        (costs.Euclidean(3.0), ott_costs.EuclideanP(3.0), 1.0),
        # ott's PNormP(p) is |x - y|_p^p / p: identical to ours (up to 1/p) only for p = 2.
        (costs.Euclidean(2.0), ott_costs.PNormP(2.0), 2.0),
        (costs.SqEuclidean(), ott_costs.PNormP(2.0), 2.0),
        (costs.Cosine(), ott_costs.Cosine(), 1.0),
    ],
    ids=["sqeuclidean", "euclidean", "euclideanP1.5", "euclideanP3", "pnormp2", "sq-pnormp2", "cosine"],
)
def test_matches_ott(ours, theirs, scale, dtype):
    x, y = _points(dtype)
    ref = scale * np.asarray(theirs.all_pairs(x, y), np.float64)
    # ott's cosine adds a 1e-8 ridge to the denominator.
    atol = 1e-7 if isinstance(theirs, ott_costs.Cosine) else _atol(dtype) * 10
    np.testing.assert_allclose(ours.all_pairs(x, y), ref, rtol=_rtol(dtype) * 10, atol=atol)
    # single pairs too
    np.testing.assert_allclose(ours(x[0], y[1]), scale * theirs(x[0], y[1]), rtol=_rtol(dtype) * 10, atol=atol)


def test_sq_euclidean_is_non_negative_on_coincident_points(dtype):
    # the GEMM form |x|^2 + |y|^2 - 2 x.y cancels badly for large, equal points
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)) * 1e3 + 1e4, dtype)
    c = costs.SqEuclidean().all_pairs(x, x)
    assert np.all(np.asarray(c) >= 0)


def test_mahalanobis_uses_symmetric_part(x64):
    x, y = _points(x64)
    m = _non_symmetric_matrix(x64)
    a = costs.Mahalanobis(m).all_pairs(x, y)
    b = costs.Mahalanobis(0.5 * (m + m.T)).all_pairs(x, y)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    with pytest.raises(AssertionError):  # the test above can fail: M^T M differs
        np.testing.assert_allclose(a, costs.Mahalanobis(m.T @ m).all_pairs(x, y), rtol=1e-6)


def test_mahalanobis_gradient_wrt_matrix(x64):
    x, y = _points(x64)
    m = _non_symmetric_matrix(x64)
    w = jnp.asarray(np.random.default_rng(3).uniform(size=(7, 9)))

    def loss(mat):
        return jnp.sum(w * costs.Mahalanobis(mat).all_pairs(x, y))

    grad = jax.grad(loss)(m)
    assert np.all(np.isfinite(grad))
    z = np.asarray(x)[:, None, :] - np.asarray(y)[None, :, :]
    expected = np.einsum("ij,ijk,ijl->kl", np.asarray(w), z, z)  # symmetric
    np.testing.assert_allclose(grad, expected, rtol=1e-10)
    # the gradient is a pytree leaf of a cost: grad through the cost object itself
    gcost = jax.grad(lambda c: jnp.sum(w * c.all_pairs(x, y)))(costs.Mahalanobis(m))
    assert isinstance(gcost, costs.Mahalanobis)
    np.testing.assert_allclose(gcost.matrix, expected, rtol=1e-10)


def test_mahalanobis_gradient_through_sinkhorn_is_finite(dtype):
    x, y = _points(dtype)
    m = _non_symmetric_matrix(dtype)

    def loss(mat):
        geom = otlab.PointCloud(x, y, costs.Mahalanobis(mat))
        return otlab.sinkhorn(geom, epsilon=1.0).reg_cost

    grad = jax.jit(jax.grad(loss))(m)
    assert grad.dtype == dtype
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_euclidean_gradient_finite_at_coincident_points(p, dtype):
    x = jnp.asarray([[0.5, -1.0], [2.0, 0.0]], dtype)
    g_pair = jax.jit(jax.grad(lambda x: costs.Euclidean(p)(x[0], x[0])))(x)
    g_all = jax.jit(jax.grad(lambda x: jnp.sum(costs.Euclidean(p).all_pairs(x, x))))(x)
    assert np.all(np.isfinite(g_pair)) and np.all(np.isfinite(g_all))


def test_cosine_zero_vector_is_finite(dtype):
    x = jnp.asarray([[0.0, 0.0], [1.0, 0.0]], dtype)
    c = costs.Cosine().all_pairs(x, x)
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c[1], [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("p", [0.0, -1.0, float("nan")])
def test_euclidean_bad_exponent(p):
    with pytest.raises(ValueError, match="`p`"):
        costs.Euclidean(p)


def test_as_cost_conversions(dtype):
    x, y = _points(dtype)
    assert isinstance(costs.as_cost(None), costs.SqEuclidean)
    ours = costs.Euclidean(1.5)
    assert costs.as_cost(ours) is ours
    assert isinstance(costs.as_cost(ott_costs.SqEuclidean()), costs.SqEuclidean)

    wrapped = costs.as_cost(ott_costs.Euclidean())
    assert isinstance(wrapped, costs.Cost)
    np.testing.assert_allclose(
        wrapped.all_pairs(x, y), costs.Euclidean().all_pairs(x, y), rtol=_rtol(dtype) * 10, atol=1e-5
    )

    def l1(u, v):
        return jnp.sum(jnp.abs(u - v))

    fn = costs.as_cost(l1)
    assert isinstance(fn, costs.Cost)
    np.testing.assert_allclose(fn.all_pairs(x, y), cdist(np.asarray(x), np.asarray(y), "cityblock"), rtol=1e-5)


@pytest.mark.parametrize("bad", [3, "sqeuclidean", 1.5, np.eye(2)])
def test_as_cost_rejects(bad):
    with pytest.raises(ValueError, match="`cost`"):
        costs.as_cost(bad)


@pytest.mark.parametrize(
    "cost",
    [None, costs.Euclidean(), ott_costs.Euclidean(), ott_costs.SqEuclidean(),
     lambda u, v: jnp.sum((u - v) ** 2)],
    ids=["none", "otlab", "ott-euclidean", "ott-sqeuclidean", "callable"],
)
def test_point_cloud_accepts_every_cost_kind(cost, dtype):
    x, y = _points(dtype)
    geom = otlab.PointCloud(x, y, cost)
    assert isinstance(geom.cost, costs.Cost)
    expected = cdist(np.asarray(x, np.float64), np.asarray(y, np.float64))
    if cost is None or isinstance(cost, ott_costs.SqEuclidean) or callable(cost) and not isinstance(
        cost, (costs.Cost, ott_costs.CostFn)
    ):
        expected = expected**2
    np.testing.assert_allclose(geom.cost_matrix, expected, rtol=1e-4 if dtype == jnp.float32 else 1e-10, atol=1e-5)
    sol = otlab.sinkhorn(geom, epsilon=0.5)
    assert bool(sol.converged)


def test_costs_are_pytrees_with_static_options():
    leaves = jax.tree.leaves(costs.Mahalanobis(jnp.eye(2)))
    assert len(leaves) == 1
    assert jax.tree.leaves(costs.Euclidean(1.5)) == []  # p is static
    assert jax.tree.leaves(costs.SqEuclidean()) == []
    # jit over a cost with a traced matrix
    f = jax.jit(lambda c, x: c.all_pairs(x, x))
    out = f(costs.Mahalanobis(2.0 * jnp.eye(2)), jnp.ones((3, 2)))
    np.testing.assert_allclose(out, 0.0, atol=1e-6)
