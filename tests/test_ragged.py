"""Ragged batches (otlab.pad_batch / otlab.solve_ragged): equal to per-problem solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otlab
from otlab.solution import Status

SIZES = [(12, 20), (25, 9), (18, 18)]  # padded: x only, y only, both


def _clouds(dtype, shift=1.0):
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(n, 2)), dtype) for n, _ in SIZES]
    ys = [jnp.asarray(rng.normal(size=(m, 2)) + shift, dtype) for _, m in SIZES]
    bs = [jnp.asarray(rng.uniform(0.5, 1.5, size=m), dtype) for _, m in SIZES]
    return xs, ys, [b / b.sum() for b in bs]


def test_pad_batch_layout():
    batch = otlab.pad_batch([jnp.zeros((3, 2)), jnp.ones((5, 2))], [jnp.ones((4, 2))] * 2, multiple=4)
    assert batch.x.shape == (2, 8, 2) and batch.y.shape == (2, 4, 2)
    assert batch.n == (3, 5) and batch.m == (4, 4) and len(batch) == 2
    np.testing.assert_allclose(batch.a.sum(1), 1.0, rtol=1e-6)
    assert not np.any(batch.a[0, 3:]) and not np.any(batch.a[1, 5:])
    # padding repeats the first point (a finite cost for every ground cost)
    np.testing.assert_array_equal(batch.x[1, 5:], jnp.ones((3, 2)))
    np.testing.assert_array_equal(batch.mask_x[0], [1, 1, 1, 0, 0, 0, 0, 0])


def test_ragged_sinkhorn_equals_each_alone(dtype):
    xs, ys, bs = _clouds(dtype)
    tol = 1e-9 if dtype == jnp.float64 else 1e-4
    atol = 1e-9 if dtype == jnp.float64 else 1e-4
    for tau_a in (1.0, 0.8):  # traced: one compilation
        res = otlab.solve_ragged(xs, ys, b=bs, tol=tol, tau_a=tau_a)  # default epsilon per problem
        assert len(res) == len(SIZES) and res.status.shape == (len(SIZES),)
        for k, (x, y, b) in enumerate(zip(xs, ys, bs, strict=True)):
            alone = otlab.sinkhorn(otlab.PointCloud(x, y), b=b, tol=tol, tau_a=tau_a)
            one = res[k]
            assert one.f.shape == alone.f.shape and one.g.shape == alone.g.shape
            np.testing.assert_allclose(one.epsilon, alone.epsilon, rtol=1e-6)
            np.testing.assert_allclose(one.f, alone.f, atol=atol)
            np.testing.assert_allclose(one.g, alone.g, atol=atol)
            np.testing.assert_allclose(one.reg_cost, alone.reg_cost, atol=atol)
            np.testing.assert_allclose(res.reg_cost[k], alone.reg_cost, atol=atol)
            np.testing.assert_allclose(one.plan(), alone.plan(), atol=atol)
            assert int(one.status) == int(alone.status) == Status.SUCCESS
            if tau_a == 1.0:  # same start, same iterates (unbalanced: a translated start)
                assert int(one.n_iter) == int(alone.n_iter)


@pytest.mark.parametrize("batch_size, buckets", [(None, "auto"), (2, 1), (1, 2)])
def test_ragged_statuses_are_per_problem(x64, batch_size, buckets):
    """vmapped (None), chunks of 2 with a remainder, one at a time; one padded shape
    or size buckets: each problem its own iterations and status, the same answers, in
    the order of the input."""
    xs, ys, _ = _clouds(jnp.float64)
    # one problem with a tiny epsilon cannot converge in 30 iterations; the others can
    eps = jnp.array([5.0, 1e-3, 5.0])
    kw = dict(epsilon=eps, max_iter=30, tol=1e-3, mode="log")
    res = otlab.solve_ragged(xs, ys, batch_size=batch_size, buckets=buckets, **kw)
    assert len(res.solutions) == (1 if buckets == 1 else 2)
    assert res.status.tolist() == [Status.SUCCESS, Status.MAX_ITER, Status.SUCCESS]
    assert res.n_iter[1] == 30 and res.n_iter[0] < 30 and res.n_iter[2] < 30
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        alone = otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=eps[k], max_iter=30, tol=1e-3, mode="log")
        assert int(res.n_iter[k]) == int(alone.n_iter)
        np.testing.assert_allclose(res[k].f, alone.f, atol=1e-9)


@pytest.mark.parametrize("batch_size, buckets", [(None, 1), (1, 2)])
def test_ragged_gradients_equal_each_alone(x64, batch_size, buckets):
    xs, ys, _ = _clouds(jnp.float64)
    xs, ys = xs[:2], ys[:2]

    def batched(xs):
        res = otlab.solve_ragged(xs, ys, epsilon=0.1, tol=1e-10, batch_size=batch_size, buckets=buckets)
        assert len(res.solutions) == buckets
        return jnp.sum(res.reg_cost)

    def loop(xs):
        return sum(
            otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.1, tol=1e-10).reg_cost
            for x, y in zip(xs, ys, strict=True)
        )

    for gb, gl in zip(jax.grad(batched)(xs), jax.grad(loop)(xs), strict=True):
        assert bool(jnp.all(jnp.isfinite(gb)))
        np.testing.assert_allclose(gb, gl, atol=1e-7)


def test_auto_batch_size():
    """"auto": one vmap when the padded kernels fit `AUTO_CHUNK_BYTES` (on CPU), else
    chunks of as many problems as fit, at least one."""
    from otlab import ragged

    def batch(count, n, m, dtype=jnp.float32):
        return otlab.pad_batch([jnp.zeros((n, 2), dtype)] * count, [jnp.zeros((m, 2), dtype)] * count)

    assert jax.default_backend() == "cpu"
    assert ragged._auto_batch_size(batch(8, 100, 100)) is None  # 8 x 40 kB
    assert ragged._auto_batch_size(batch(32, 500, 500)) == 1  # 1 MB each
    assert ragged._auto_batch_size(batch(32, 128, 256)) == 8  # 128 kB each
    assert ragged._auto_batch_size(batch(3, 600, 600)) == 1


def test_partition_into_size_buckets():
    """Buckets cover every problem once; they pad no more than the best contiguous cut
    in ``n * m`` order (brute force), and no single move of a problem to another
    bucket pads less; "auto" stops at the fewest buckets within `AUTO_PADDING` of the
    real entries; equal sizes make one bucket."""
    import itertools

    from otlab import ragged

    def padded(groups, n, m):
        return sum(len(g) * max(n[k] for k in g) * max(m[k] for k in g) for g in groups)

    rng = np.random.default_rng(1)
    for _ in range(20):
        count = int(rng.integers(1, 8))
        n, m = tuple(rng.integers(1, 60, count).tolist()), tuple(rng.integers(1, 60, count).tolist())
        order = sorted(range(count), key=lambda k: (n[k] * m[k], n[k], k))
        for buckets in (1, 2, 3):
            groups = ragged._partition(n, m, buckets, 1)
            assert sorted(k for g in groups for k in g) == list(range(count))
            assert len(groups) <= buckets
            brute = min(
                padded([order[i:j] for i, j in itertools.pairwise((0, *cuts, count))], n, m)
                for r in range(min(buckets, count))
                for cuts in itertools.combinations(range(1, count), r)
            )
            assert padded(groups, n, m) <= brute
            for s, t in itertools.permutations(range(len(groups)), 2):
                for k in groups[s] if len(groups[s]) > 1 else ():
                    moved = [[q for q in g if q != k] + ([k] if u == t else []) for u, g in enumerate(groups)]
                    assert padded(moved, n, m) >= padded(groups, n, m)
        auto = ragged._partition(n, m, "auto", 1)
        real = sum(a * b for a, b in zip(n, m, strict=True))
        fewer = ragged._partition(n, m, len(auto) - 1, 1) if len(auto) > 1 else None
        assert padded(auto, n, m) <= ragged.AUTO_PADDING * real or len(auto) == min(count, ragged.AUTO_MAX_BUCKETS)
        assert fewer is None or padded(fewer, n, m) > ragged.AUTO_PADDING * real
    assert ragged._partition((5, 5, 5), (7, 7, 7), "auto", 1) == ((0, 1, 2),)
    assert ragged._partition((5, 5, 5), (7, 7, 7), 3, 1) == ((0, 1, 2),)  # no gain: one bucket
    # rounding to `multiple` first: 5 and 7 both pad to 8, one bucket
    assert ragged._partition((5, 7), (8, 8), "auto", 4) == ((0, 1),)
    # transposed shapes: the best cut in n * m order (160, 164, 164, 168) pairs 40 x 4
    # with 4 x 41 (6724 padded entries); the moves group each kind (328 + 336)
    groups = ragged._partition((40, 4, 41, 4), (4, 41, 4, 42), 2, 1)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3]]


def test_bucketed_solution_access():
    xs, ys, _ = _clouds(jnp.float32)
    one = otlab.solve_ragged(xs, ys, epsilon=0.5, buckets=1)
    two = otlab.solve_ragged(xs, ys, epsilon=0.5, buckets=3)
    assert len(one.solutions) == 1 and one.solution is one.solutions[0]
    assert len(two.solutions) == 3 and sorted(two.where) == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="size buckets"):
        _ = two.solution
    for name in ("status", "n_iter", "converged", "reg_cost", "cost"):
        np.testing.assert_allclose(getattr(one, name), getattr(two, name), rtol=1e-5, err_msg=name)
    for u, v in zip(one, two, strict=True):
        assert u.f.shape == v.f.shape
        np.testing.assert_allclose(u.f, v.f, atol=1e-5)


def test_bad_inputs():
    x = [jnp.zeros((3, 2))]
    with pytest.raises(ValueError, match="`xs` and `ys`"):
        otlab.pad_batch(x, x + x)
    with pytest.raises(ValueError, match="same dimension"):
        otlab.pad_batch([jnp.zeros((3, 2)), jnp.zeros((3, 3))], x + x)
    with pytest.raises(ValueError, match=r"`a\[0\]`"):
        otlab.pad_batch(x, x, a=[jnp.ones(4)])
    with pytest.raises(ValueError, match="`multiple`"):
        otlab.pad_batch(x, x, multiple=0)
    with pytest.raises(ValueError, match="below the largest"):
        otlab.pad_batch(x, x, n_max=2)
    with pytest.raises(ValueError, match="`ys`"):
        otlab.solve_ragged(x)
    with pytest.raises(ValueError, match="`epsilon`"):
        otlab.solve_ragged(x, x, epsilon=-1.0)
    for bad in (0, 1.5, True, "cpu"):
        with pytest.raises(ValueError, match="`batch_size`"):
            otlab.solve_ragged(x, x, batch_size=bad)
        with pytest.raises(ValueError, match="`buckets`"):
            otlab.solve_ragged(x, x, buckets=bad)
    with pytest.raises(ValueError, match=r"`b\[0\]`"):
        otlab.pad_batch(x, x, b=[-jnp.ones(3)])
    with pytest.raises(ValueError, match="`xs\\[0\\]`"):
        otlab.pad_batch([jnp.zeros(3)], x)
