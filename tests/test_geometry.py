"""The geometry layer: reductions vs dense references, online == dense, conversions,
and the memory bound of online point clouds."""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import ott.geometry.geometry as ott_geometry
import ott.geometry.pointcloud as ott_pointcloud
import problems
import pytest
from conftest import run_as_users
from ott.geometry import costs as ott_costs
from scipy.special import logsumexp

import otlab
from otlab import costs


def _potentials(p, seed=0):
    """Random potentials of the size of the problem, of the order of epsilon."""
    rng = np.random.default_rng(seed)
    n, m = p.shape
    f = jnp.asarray(p.epsilon * rng.normal(size=n), p.dtype)
    g = jnp.asarray(p.epsilon * rng.normal(size=m), p.dtype)
    return f, g, jnp.asarray(p.epsilon, p.dtype)


def _ref_logits(p, f, g, eps):
    c = p.cost_matrix()
    return (np.asarray(f, np.float64)[:, None] + np.asarray(g, np.float64)[None, :] - c) / float(eps)


def _close_scaled(actual, desired, scale, rtol):
    err = np.abs(np.asarray(actual, np.float64) - desired)
    assert np.all(err <= rtol * scale + 1e-300), np.max(err / scale)


def _lse_tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == jnp.float64 else dict(rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("name", problems.NAMES)
def test_lse_matches_scipy(name, dtype):
    p = problems.make(name, dtype)
    f, g, eps = _potentials(p)
    z = _ref_logits(p, f, g, eps)
    for axis, ref in ((1, logsumexp(z, axis=1)), (0, logsumexp(z, axis=0))):
        out = p.geom.lse(f, g, eps, axis=axis)
        assert out.shape == ref.shape and out.dtype == dtype
        np.testing.assert_allclose(out, ref, **_lse_tol(dtype))


def test_lse_is_finite_when_a_row_underflows(dtype):
    # exp(-C / eps) underflows for every entry of row 0: the max shift must keep it finite.
    c = jnp.asarray([[1e4, 2e4, 3e4], [0.0, 1.0, 2.0]], dtype)
    out = otlab.Geometry(c).lse(jnp.zeros(2, dtype), jnp.zeros(3, dtype), jnp.asarray(1.0, dtype), 1)
    np.testing.assert_allclose(out, logsumexp(-np.asarray(c, np.float64), axis=1), rtol=1e-6)


@pytest.mark.parametrize("name", problems.NAMES)
def test_plan_operator_matches_dense_plan(name, dtype):
    p = problems.make(name, dtype)
    f, g, eps = _potentials(p)
    plan = np.exp(_ref_logits(p, f, g, eps))
    np.testing.assert_allclose(p.geom.plan(f, g, eps), plan, rtol=1e-4 if dtype == jnp.float32 else 1e-10)
    op = p.geom.plan_operator(f, g, eps)
    assert op.materialized
    rng = np.random.default_rng(1)
    n, m = p.shape
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    for shape_v, shape_u in (((m,), (n,)), ((m, 3), (n, 3))):
        v = rng.normal(size=shape_v)
        u = rng.normal(size=shape_u)
        mv = op.matvec(jnp.asarray(v, dtype))
        rmv = op.rmatvec(jnp.asarray(u, dtype))
        assert mv.shape == shape_u and rmv.shape == shape_v
        # signed sums cancel: the error scale is |P| |v|, not |P v|
        _close_scaled(mv, plan @ v, np.abs(plan) @ np.abs(v), rtol)
        _close_scaled(rmv, plan.T @ u, np.abs(plan.T) @ np.abs(u), rtol)
    c = p.cost_matrix()
    np.testing.assert_allclose(p.geom.plan_cost(f, g, eps), np.sum(c * plan), rtol=10 * rtol)
    np.testing.assert_allclose(p.geom.mean_cost(), np.mean(c), rtol=10 * rtol)


# Block sizes that do not divide n or m, one larger than both, and 1.
BLOCKS = [1, 7, 64]


@jax.jit
def _reductions(geom, f, g, eps, v1, u1, v2, u2):
    """Every reduction of the geometry layer, in one compiled function."""
    op = geom.plan_operator(f, g, eps)
    return dict(
        lse0=geom.lse(f, g, eps, 0),
        lse1=geom.lse(f, g, eps, 1),
        mv1=op.matvec(v1),
        rmv1=op.rmatvec(u1),
        mv2=op.matvec(v2),
        rmv2=op.rmatvec(u2),
        plan_cost=geom.plan_cost(f, g, eps),
        mean_cost=geom.mean_cost(),
        plan=geom.plan(f, g, eps),
    )


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("name", problems.POINT_CLOUD_NAMES)
def test_online_equals_dense(name, block_size, x64):
    p = problems.make(name, x64)
    q = p.online(block_size)
    assert q.geom.is_online and not p.geom.is_online
    assert not q.geom.plan_operator(*_potentials(p)).materialized
    f, g, eps = _potentials(p)
    n, m = p.shape
    rng = np.random.default_rng(2)
    vecs = [jnp.asarray(rng.normal(size=s)) for s in ((m,), (n,), (m, 2), (n, 2))]
    dense = _reductions(p.geom, f, g, eps, *vecs)
    online = _reductions(q.geom, f, g, eps, *vecs)
    for key, val in dense.items():
        np.testing.assert_allclose(online[key], val, rtol=1e-10, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("name", ["gauss", "mahalanobis"])
def test_online_gradients_equal_dense(name, x64):
    p = problems.make(name, x64)
    f, g, eps = _potentials(p)
    w = jnp.asarray(np.random.default_rng(3).normal(size=p.shape[0]))

    def loss(x, y, f, g, block_size):
        geom = otlab.PointCloud(x, y, p.cost, block_size=block_size)
        op = geom.plan_operator(f, g, eps)
        return (
            jnp.sum(w * geom.lse(f, g, eps, 1))
            + jnp.sum(geom.lse(f, g, eps, 0) ** 2)
            + jnp.sum(w * op.matvec(jnp.ones_like(g)))
            + jnp.sum(op.rmatvec(w))
            + geom.plan_cost(f, g, eps)
        )

    dense = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(p.x, p.y, f, g, None)
    online = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(p.x, p.y, f, g, 7)
    for d, o in zip(dense, online, strict=True):
        np.testing.assert_allclose(o, d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_size", [None, 5])
def test_transport_of_new_points(block_size, dtype):
    p = problems.make("gauss_weighted", dtype, block_size=block_size)
    rng = np.random.default_rng(4)
    g = jnp.asarray(rng.normal(size=p.shape[1]) * p.epsilon, dtype)
    x_new = jnp.asarray(rng.normal(size=(6, 2)), dtype)
    out = p.geom.transport(g, jnp.asarray(p.epsilon, dtype), x_new)
    assert out.shape == (6, 2) and out.dtype == dtype
    c = np.asarray(costs.SqEuclidean().all_pairs(x_new, p.y), np.float64)
    z = (np.asarray(g, np.float64)[None, :] - c) / p.epsilon
    w = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    expected = w @ np.asarray(p.y, np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-4 if dtype == jnp.float32 else 1e-10, atol=1e-5)
    # a single point (1-D input) maps to a single point, shape (d,)
    one = p.geom.transport(g, p.epsilon, x_new[0])
    assert one.shape == (2,)
    np.testing.assert_allclose(one, expected[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- conversions


def _xy(dtype, n=9, m=6, d=2):
    rng = np.random.default_rng(5)
    return jnp.asarray(rng.normal(size=(n, d)), dtype), jnp.asarray(rng.normal(size=(m, d)), dtype)


@pytest.mark.parametrize(
    "cost_fn", [ott_costs.SqEuclidean(), ott_costs.Euclidean(), ott_costs.PNormP(1.5)],
    ids=["sqeuclidean", "euclidean", "pnormp"],
)
def test_from_ott_point_cloud(cost_fn, dtype):
    x, y = _xy(dtype)
    theirs = ott_pointcloud.PointCloud(x, y, cost_fn=cost_fn)
    ours = otlab.from_ott(theirs)
    assert isinstance(ours, otlab.PointCloud) and not ours.is_online
    np.testing.assert_array_equal(ours.x, x)
    np.testing.assert_array_equal(ours.y, y)
    np.testing.assert_allclose(ours.cost_matrix, theirs.cost_matrix, rtol=1e-5, atol=1e-6)
    assert otlab.as_geometry(theirs).shape == (9, 6)


@pytest.mark.parametrize("scale_cost", ["mean", "max_cost", 2.0])
def test_from_ott_point_cloud_keeps_cost_scaling(scale_cost, x64):
    """An ott PointCloud with ``scale_cost`` must convert to the same cost matrix."""
    x, y = _xy(x64)
    theirs = ott_pointcloud.PointCloud(x, y, scale_cost=scale_cost)
    ours = otlab.from_ott(theirs)
    np.testing.assert_allclose(ours.cost_matrix, theirs.cost_matrix, rtol=1e-10)


def test_from_ott_geometry(dtype):
    c = jnp.asarray(np.random.default_rng(6).uniform(size=(4, 7)), dtype)
    for theirs in (
        ott_geometry.Geometry(cost_matrix=c, epsilon=0.1),
        ott_geometry.Geometry(cost_matrix=c, scale_cost="max_cost"),
    ):
        ours = otlab.from_ott(theirs)
        assert isinstance(ours, otlab.Geometry)
        np.testing.assert_allclose(ours.cost_matrix, theirs.cost_matrix, rtol=1e-6)
        assert isinstance(otlab.as_geometry(theirs), otlab.Geometry)


def test_as_geometry_accepts_arrays_and_geometries(dtype):
    c = np.random.default_rng(7).uniform(size=(3, 5)).astype(np.dtype(dtype))
    for inp in (c, jnp.asarray(c)):
        geom = otlab.as_geometry(inp)
        assert isinstance(geom, otlab.Geometry) and geom.shape == (3, 5) and geom.dtype == dtype
        np.testing.assert_array_equal(geom.cost_matrix, c)
    pc = otlab.PointCloud(*_xy(dtype))
    assert otlab.as_geometry(pc) is pc
    # NumPy points are accepted and keep their dtype
    x, y = (np.asarray(t) for t in _xy(dtype))
    assert otlab.PointCloud(x, y).dtype == dtype


def test_point_cloud_defaults_y_to_x(dtype):
    x, _ = _xy(dtype)
    geom = otlab.PointCloud(x)
    assert geom.shape == (9, 9)
    np.testing.assert_allclose(np.diag(geom.cost_matrix), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: otlab.Geometry(jnp.ones(3)), "`cost_matrix`"),
        # A 3-D cost matrix is a batch (vmap rebuilds geometries that way): the
        # solver, not the constructor, rejects it.
        (lambda: otlab.sinkhorn(otlab.Geometry(jnp.ones((2, 3, 4)))), "`geom.cost_matrix`"),
        (lambda: otlab.sinkhorn(otlab.PointCloud(jnp.ones((2, 3, 2)))), "`geom.x`"),
        (lambda: otlab.PointCloud(jnp.ones(3), jnp.ones((3, 1))), "`x`"),
        (lambda: otlab.PointCloud(jnp.ones((3, 2)), jnp.ones((4, 3))), "dimension"),
        (lambda: otlab.PointCloud(jnp.ones((3, 2)), block_size=0), "`block_size`"),
        (lambda: otlab.PointCloud(jnp.ones((3, 2)), block_size=-4), "`block_size`"),
        (lambda: otlab.PointCloud(jnp.ones((3, 2)), block_size=2.5), "`block_size`"),
        (lambda: otlab.as_geometry("cost"), "`geom`"),
        (lambda: otlab.as_geometry([[0.0, 1.0]]), "`geom`"),
        (lambda: otlab.PointCloud(jnp.ones((3, 2)), cost="sqeuclidean"), "`cost`"),
    ],
)
def test_bad_geometry_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("block_size", [None, 4])
def test_bad_axis_raises(block_size):
    geom = otlab.PointCloud(jnp.ones((5, 2)), jnp.zeros((3, 2)), block_size=block_size)
    with pytest.raises(ValueError, match="`axis`"):
        geom.lse(jnp.zeros(5), jnp.zeros(3), 1.0, axis=2)


# ------------------------------------------------------------------------- memory

# n = m = 16400: the dense float32 cost matrix alone would take 1.08 GB (> 1 GiB).
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, traceback
    import jax, jax.numpy as jnp
    import otlab

    def rss_mb():
        # Peak RSS of this process image. (getrusage's ru_maxrss would also count the
        # pytest worker this process was forked from: Linux keeps it across exec.)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    n = m = 16400
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, 2))
    y = jax.random.normal(ky, (m, 2)) + 1.0
    opts = dict(epsilon=0.5, max_iter=2, check_every=1, tol=1e-3)
    out = dict(baseline_mb=rss_mb())
    sol = otlab.sinkhorn(otlab.PointCloud(x, y, block_size=256), **opts)
    out.update(
        solve_mb=rss_mb(),
        finite=bool(jnp.all(jnp.isfinite(sol.f)) & jnp.all(jnp.isfinite(sol.g))),
        n_iter=int(sol.n_iter),
        status=int(sol.status),
        reg_cost=float(sol.reg_cost),
    )
    print(json.dumps(out), flush=True)

    def loss(x):
        geom = otlab.PointCloud(x, y, block_size=256)
        return otlab.sinkhorn(geom, **opts, implicit_diff=otlab.ImplicitDiff(max_iter=1)).reg_cost

    try:
        grad = jax.grad(loss)(x)
        out.update(grad_mb=rss_mb(), grad_finite=bool(jnp.all(jnp.isfinite(grad))),
                   grad_shape=list(grad.shape), grad_error=None)
    except Exception:
        out.update(grad_mb=rss_mb(), grad_error=traceback.format_exc(limit=3)[-2000:])
    print(json.dumps(out), flush=True)
    """
)

_RSS_LIMIT_MB = 700.0  # the dense matrix alone would be ~1030 MB


@pytest.fixture(scope="module")
def memory_run():
    proc = run_as_users(_MEMORY_SCRIPT)  # measure the library as users run it
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"memory script failed:\n{proc.stderr[-3000:]}"
    return lines[-1]


# both on one xdist worker (``--dist loadgroup``): the module fixture's subprocess runs once
@pytest.mark.slow
@pytest.mark.xdist_group("online_memory")
def test_online_solve_memory_is_bounded(memory_run):
    r = memory_run
    assert r["finite"] and r["n_iter"] == 2 and r["status"] in (0, 1)
    assert np.isfinite(r["reg_cost"])
    assert r["solve_mb"] < _RSS_LIMIT_MB, r


@pytest.mark.slow
@pytest.mark.xdist_group("online_memory")
def test_online_gradient_memory_is_bounded(memory_run):
    r = memory_run
    assert r.get("grad_error") is None, r["grad_error"]
    assert r["grad_finite"] and r["grad_shape"] == [16400, 2]
    assert r["grad_mb"] < _RSS_LIMIT_MB, r
