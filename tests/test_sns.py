"""Sinkhorn–Newton–Sparse (``otlab.sns``): same answer as ``otlab.sinkhorn``, far
fewer passes, and the solver contracts (statuses, jit, vmap, implicit gradients,
eager validation).

Compilation dominates the cost of this file (an SNS configuration takes several
seconds to compile on CPU): problems share shapes and static options wherever a
test allows, so that most calls hit the jit cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import otlab
from otlab import costs
from otlab.solvers import sinkhorn as sinkhorn_mod

#: Sinkhorn reference: one static configuration for every reference solve.
REF_TOL = 1e-10
REF_MAX_ITER = 100_000
#: SNS in float64 (its default tol is 1e-9).
TOL64 = 1e-9
POT_ATOL = 1e-7  # potentials, both in the gauge <a, f> = <b, g>

# Shapes shared across tests (one compilation each).
N_RAND = 200  # random uniform cost matrix, n x n
N_CLOUD, M_CLOUD = 200, 160  # 2-D clouds: m >= 128 so that the sparse rung (16 bins) is used


# ----------------------------------------------------------------------- problems


def _uniform_cost(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, n))


def _clouds(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(N_CLOUD, 2)), rng.uniform(size=(M_CLOUD, 2))


def _weights(k: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).uniform(0.2, 1.0, size=k)
    return w / w.sum()


@functools.cache
def _digits() -> np.ndarray:
    return load_digits().images.reshape(-1, 64).astype(np.float64)


def _digit_measure(i: int, floor: float = 0.0) -> np.ndarray:
    w = _digits()[i] / _digits()[i].sum() + floor
    return w / w.sum()


_GRID = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(-1, 2) / 7.0


def _residual(c, f, g, a, b, eps, tau_a=1.0, tau_b=1.0) -> float:
    """L1 optimality residual in float64 NumPy, independent of otlab's bookkeeping."""
    c, f, g, a, b = (np.asarray(t, np.float64) for t in (c, f, g, a, b))
    eps = float(eps)
    p = np.exp((f[:, None] + g[None, :] - c) / eps)

    def target(w, pot, tau):
        if tau == 1.0:
            return w
        k = (1.0 - tau) / (tau * eps)
        return w * np.exp(-k * (pot - eps * np.log(np.maximum(w, np.finfo(float).tiny))))

    return float(
        np.abs(target(a, f, tau_a) - p.sum(1)).sum() + np.abs(target(b, g, tau_b) - p.sum(0)).sum()
    )


def _reference(geom, a=None, b=None, **kw):
    return otlab.sinkhorn(geom, a, b, tol=REF_TOL, max_iter=REF_MAX_ITER, **kw)


def _assert_same_potentials(s, k, c, a, b, eps, tau_a=1.0, tau_b=1.0, atol=POT_ATOL):
    """Both solutions converged to ``<= 1e-9`` (re-measured) and agree on the support."""
    for sol in (s, k):
        assert int(sol.status) == otlab.Status.SUCCESS, otlab.Status.name(sol.status)
        assert bool(sol.converged)
        res = _residual(c, sol.f, sol.g, a, b, eps, tau_a, tau_b)
        assert res <= 1.5e-9, res  # 1e-9 plus rounding of the float64 re-evaluation
        assert float(sol.marginal_error) <= 1e-9
    sa, sb = np.asarray(a) > 0, np.asarray(b) > 0  # zero weights: potentials are arbitrary
    np.testing.assert_allclose(np.asarray(s.f)[sa], np.asarray(k.f)[sa], rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(s.g)[sb], np.asarray(k.g)[sb], rtol=0, atol=atol)


def _iters_to(sol, tol: float, check_every: int = 10, max_iter: int = REF_MAX_ITER) -> int:
    """Sinkhorn iterations until the error history first reaches ``tol`` (to within
    one history entry: past ``MAX_HISTORY`` blocks, entry ``k`` is the last check of
    blocks ``k * stride ... (k + 1) * stride - 1``)."""
    e = np.asarray(sol.errors)
    hit = np.nonzero((e >= 0) & (e <= tol))[0]
    blocks = -(-max_iter // check_every)
    stride = -(-blocks // sinkhorn_mod.MAX_HISTORY)
    return int((hit[0] + 1) * stride * check_every) if hit.size else -1


# ----------------------------------------------------------- same answer as Sinkhorn


def test_paper_case_matches_sinkhorn_with_far_fewer_iterations(x64):
    """Tang et al. (2024), Sec. 5: random uniform cost, n = 500, eps = 1/1200."""
    c = jnp.asarray(_uniform_cost(500, seed=0))
    eps = 1.0 / 1200
    u = jnp.full(500, 1.0 / 500)
    s = otlab.sns(c, epsilon=eps)
    k = _reference(c, epsilon=eps)
    _assert_same_potentials(s, k, c, u, u, eps)

    newton, warmup = int(s.n_iter), 20
    sinkhorn_iters = _iters_to(k, 1e-9)
    print(
        f"paper case: SNS {warmup} Sinkhorn + {newton} Newton steps; "
        f"Sinkhorn {sinkhorn_iters} iterations to 1e-9 ({int(k.n_iter)} to {REF_TOL:g})"
    )
    assert sinkhorn_iters > 10_000  # tens of thousands...
    assert newton <= 30  # ...against tens
    assert warmup + newton <= sinkhorn_iters / 200, (warmup, newton, sinkhorn_iters)


def test_cholesky_rung_where_conjugate_gradient_stalls(x64):
    """A random cost at eps = 1/1200 and n = 200: the exact Hessian is so badly
    conditioned that conjugate gradient hits its cap (``cg_max_iter=250`` on the Schur
    complement, in exact arithmetic the Krylov space of 500 iterations of CG on the
    whole system: 57 Newton steps without the Cholesky rung, ``direct_max=0``; 124
    with CG on the whole system and its cap of 500; 29 with the default cap of 500 on
    the Schur complement); the Cholesky rung restores fast convergence.
    (Sinkhorn itself does not reach 1e-9 here within 1e5 iterations.)"""
    c = jnp.asarray(_uniform_cost(N_RAND, seed=1))
    u = jnp.full(N_RAND, 1.0 / N_RAND)
    eps = 1.0 / 1200
    s = otlab.sns(c, epsilon=eps, cg_max_iter=250)
    cg_only = otlab.sns(c, epsilon=eps, direct_max=0, cg_max_iter=250)
    for sol in (s, cg_only):
        assert int(sol.status) == otlab.Status.SUCCESS
        assert _residual(c, sol.f, sol.g, u, u, eps) <= 1.5e-9
    # So ill-conditioned (weakly coupled blocks of the plan) that a 1e-9 residual
    # pins the potentials to ~1e-3 only: compare the plans.
    np.testing.assert_allclose(s.plan(), cg_only.plan(), rtol=0, atol=1e-9)
    assert int(s.n_iter) <= 30 < int(cg_only.n_iter), (int(s.n_iter), int(cg_only.n_iter))


@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
@pytest.mark.parametrize("balanced", [True, False])
def test_schur_complement_solve(x64, shape, balanced):
    """``_schur_solve`` against a dense solve of the full block system."""
    from otlab.solvers.sns import _schur_solve

    rng = np.random.default_rng(0)
    n, m = shape
    k = rng.uniform(0.1, 1.0, size=shape)
    dx, dy = k.sum(1), k.sum(0)  # the balanced dual Hessian: singular along (1, -1)
    if not balanced:
        dx, dy = dx + 0.3, dy + 0.2
    full = np.block([[np.diag(dx), k], [k.T, np.diag(dy)]])
    gx, gy = rng.normal(size=n), rng.normal(size=m)
    if balanced:  # a right-hand side in the range: orthogonal to (1, -1)
        t = (gx.sum() - gy.sum()) / (n + m)
        gx, gy = gx - t, gy + t
    gauge = float(np.mean(dx)) if balanced else 0.0
    x, y = _schur_solve(*(jnp.asarray(v) for v in (k, dx, dy, gx, gy)), gauge)
    z = np.concatenate([x, y])
    np.testing.assert_allclose(full @ z, np.concatenate([gx, gy]), rtol=0, atol=1e-10)
    if not balanced:
        np.testing.assert_allclose(z, np.linalg.solve(full, np.concatenate([gx, gy])), atol=1e-10)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
@pytest.mark.parametrize("balanced", [True, False])
def test_schur_complement_conjugate_gradient(x64, shape, balanced):
    """``_schur_cg`` (the CG rungs' solve) against the full block system, and in
    half the iterations of conjugate gradient on the whole of it (2-cyclic)."""
    from otlab.solvers.sns import _pcg, _schur_cg

    rng = np.random.default_rng(1)
    n, m = shape
    k = rng.uniform(0.1, 1.0, size=shape)
    dx, dy = k.sum(1) + 1e-3, k.sum(0) + 1e-3  # + mu: positive definite
    if not balanced:
        dx, dy = dx + 0.3, dy + 0.2
    full = np.block([[np.diag(dx), k], [k.T, np.diag(dy)]])
    gx, gy = rng.normal(size=n), rng.normal(size=m)
    kj, dxj, dyj, gxj, gyj = (jnp.asarray(v) for v in (k, dx, dy, gx, gy))
    (x, y), it = _schur_cg(lambda v: kj @ v, lambda u: u @ kj, dxj, dyj, gxj, gyj, 1e-10, 100)
    np.testing.assert_allclose(np.concatenate([x, y]), np.linalg.solve(full, np.concatenate([gx, gy])),
                               rtol=1e-7, atol=1e-9)  # fmt: skip
    whole = jnp.asarray(full)
    g = jnp.concatenate([gxj, gyj])
    _, it_whole = _pcg(lambda z: whole @ z, g, jnp.diag(whole), 1e-20 * jnp.sum(g * g), 100)
    assert int(it) < int(it_whole), (int(it), int(it_whole))


@pytest.mark.parametrize("m", [37, 40, 300])
def test_binned_max(x64, monkeypatch, m):
    """``_binned_max`` (both of its paths) against a NumPy reference: for each row and
    strided bin ``j mod bins``, the largest entry and its first column."""
    from otlab import geometry

    rng = np.random.default_rng(m)
    z = rng.normal(size=(6, m)).round(1)  # rounded: ties, resolved to the first column
    bins = 8
    ref_idx = np.array([[j + bins * np.argmax(row[j::bins]) for j in range(bins)] for row in z])
    for unrolled in (128, 0):
        monkeypatch.setattr(geometry, "_SLABS_UNROLLED", unrolled)
        vals, idx = geometry._binned_max(jnp.asarray(z), bins)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(vals, np.take_along_axis(z, ref_idx, 1))


@pytest.mark.parametrize("eps", [1e-2, 3e-3])
def test_random_cost_matches_sinkhorn(x64, eps):
    c = jnp.asarray(_uniform_cost(N_RAND, seed=1))
    a, b = _weights(N_RAND, 2), _weights(N_RAND, 3)
    s = otlab.sns(c, a, b, epsilon=eps)
    k = _reference(c, a, b, epsilon=eps)
    _assert_same_potentials(s, k, c, a, b, eps)
    assert int(s.n_iter) < int(k.n_iter)


@pytest.mark.parametrize("rel", [1e-2, 3e-3])
def test_point_clouds_match_sinkhorn(x64, rel):
    x, y = _clouds()
    geom = otlab.PointCloud(x, y)
    eps = rel * float(geom.mean_cost())
    s = otlab.sns(geom, epsilon=eps)
    k = _reference(geom, epsilon=eps)
    u, v = np.full(N_CLOUD, 1.0 / N_CLOUD), np.full(M_CLOUD, 1.0 / M_CLOUD)
    _assert_same_potentials(s, k, geom.cost_matrix, u, v, eps)
    # gauge of both: <a, f> = <b, g>
    assert abs(float(jnp.mean(s.f) - jnp.mean(s.g))) < 1e-12
    np.testing.assert_allclose(float(s.reg_cost), float(k.reg_cost), rtol=1e-10)


@pytest.mark.parametrize("ground", ["W2", "W1"])
@pytest.mark.parametrize("rel", [1e-2, 1e-3])
def test_digits_match_sinkhorn(x64, ground, rel):
    """8x8 digits as densities on the grid; zero-intensity pixels are zero weights."""
    cost = costs.SqEuclidean() if ground == "W2" else costs.Euclidean()
    c = cost.all_pairs(jnp.asarray(_GRID), jnp.asarray(_GRID))  # one 64 x 64 compilation
    a, b = _digit_measure(0), _digit_measure(1)
    assert (a == 0).sum() > 20 and (b == 0).sum() > 20
    eps = rel * float(jnp.mean(c))
    s = otlab.sns(c, a, b, epsilon=eps)
    k = _reference(c, a, b, epsilon=eps)
    _assert_same_potentials(s, k, c, a, b, eps)
    np.testing.assert_allclose(float(s.cost), float(k.cost), rtol=1e-8)


def test_digits_w1_with_floor_where_sinkhorn_stalls(x64):
    """A strictly positive W1 problem on which Sinkhorn converges sublinearly: SNS
    still reaches 1e-9 and its plan agrees with Sinkhorn's best effort."""
    c = costs.Euclidean().all_pairs(jnp.asarray(_GRID), jnp.asarray(_GRID))
    a, b = _digit_measure(0, floor=1e-3), _digit_measure(1, floor=1e-3)
    eps = 1e-2 * float(jnp.mean(c))
    s = otlab.sns(c, a, b, epsilon=eps)
    assert bool(s.converged)
    assert _residual(c, s.f, s.g, a, b, eps) <= 1.5e-9
    k = _reference(c, a, b, epsilon=eps)  # runs into its cap
    assert int(k.status) == otlab.Status.MAX_ITER
    assert 1e-9 < float(k.marginal_error) < 1e-6
    np.testing.assert_allclose(np.asarray(s.plan()), np.asarray(k.plan()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tau", [(0.5, 0.5), (0.9, 1.0)])
def test_unbalanced_matches_sinkhorn(x64, tau):
    c = jnp.asarray(_uniform_cost(N_RAND, seed=1))
    a, b = _weights(N_RAND, 2), 1.3 * _weights(N_RAND, 3)  # unequal masses
    eps = 3e-3
    s = otlab.sns(c, a, b, epsilon=eps, tau_a=tau[0], tau_b=tau[1])
    k = _reference(c, a, b, epsilon=eps, tau_a=tau[0], tau_b=tau[1])
    _assert_same_potentials(s, k, c, a, b, eps, *tau)


# ------------------------------------------------------------ geometries, precision


def test_online_equals_dense(x64):
    x, y = _clouds()
    dense = otlab.PointCloud(x, y)
    eps = 3e-3 * float(dense.mean_cost())
    s = otlab.sns(dense, epsilon=eps)
    o = otlab.sns(otlab.PointCloud(x, y, block_size=64), epsilon=eps)
    assert bool(o.converged) and float(o.marginal_error) <= TOL64
    assert _residual(dense.cost_matrix, o.f, o.g, o.a, o.b, eps) <= 1.5e-9
    np.testing.assert_allclose(o.f, s.f, rtol=0, atol=POT_ATOL)
    np.testing.assert_allclose(o.g, s.g, rtol=0, atol=POT_ATOL)


def test_float32_converges():
    with jax.enable_x64(False):
        x, y = _clouds()
        geom = otlab.PointCloud(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
        eps = 1e-2 * float(geom.mean_cost())
        default = otlab.sns(geom, epsilon=eps)
        assert int(default.status) == otlab.Status.SUCCESS
        assert float(default.marginal_error) <= 1e-4  # the float32 default tol
        s = otlab.sns(geom, epsilon=eps, tol=1e-5)
        assert s.f.dtype == jnp.float32 and s.g.dtype == jnp.float32
        assert int(s.status) == otlab.Status.SUCCESS
        assert float(s.marginal_error) <= 1e-5
    c = np.sum((x[:, None] - y[None]) ** 2, axis=-1)
    u, v = np.full(N_CLOUD, 1.0 / N_CLOUD), np.full(M_CLOUD, 1.0 / M_CLOUD)
    # Re-measured in float64 from the float32 potentials: rounding of f, g (~1e-7
    # relative) alone moves the plan by ~|f| 1e-7 / eps, so allow a few times tol.
    assert _residual(c, s.f, s.g, u, v, eps) <= 5e-5
    with jax.enable_x64(True):
        ref = otlab.sns(otlab.PointCloud(x, y), epsilon=eps)
    np.testing.assert_allclose(np.asarray(s.f, np.float64), ref.f, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ transformations


def _cloud_solve(x, y, eps):
    sol = otlab.sns(otlab.PointCloud(x, y), epsilon=eps)
    return sol.f, sol.g, sol.n_iter, sol.status, sol.marginal_error


def test_jit_equals_eager(x64):
    x, y = (jnp.asarray(t) for t in _clouds())
    eps = 3e-3 * float(otlab.PointCloud(x, y).mean_cost())
    eager = _cloud_solve(x, y, eps)
    jitted = jax.jit(_cloud_solve)(x, y, eps)
    for e, j in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(j, e, rtol=1e-12, atol=1e-14)


def test_vmap_equals_loop(x64):
    """vmap over points and epsilon; the batched OTSolution is itself a pytree."""
    x, y = (jnp.asarray(t) for t in _clouds())
    xs = jnp.stack([x, 0.8 * x + 0.1, x**2])
    mc = float(otlab.PointCloud(x, y).mean_cost())
    epss = jnp.asarray([1e-2, 3e-3, 5e-3]) * mc
    sols = jax.vmap(lambda x, e: otlab.sns(otlab.PointCloud(x, y), epsilon=e))(xs, epss)
    assert sols.f.shape == (3, N_CLOUD) and sols.geom.x.shape == (3, N_CLOUD, 2)
    batched = (sols.f, sols.g, sols.n_iter, sols.status, sols.marginal_error)
    for i in range(3):
        single = _cloud_solve(xs[i], y, epss[i])
        assert int(single[3]) == otlab.Status.SUCCESS
        for bt, st in zip(batched, single, strict=True):
            np.testing.assert_allclose(bt[i], st, rtol=1e-10, atol=1e-12)


def test_gradient_matches_sinkhorn_and_finite_differences(x64):
    x, y = _clouds()
    x, y = jnp.asarray(x), jnp.asarray(y)
    a = jnp.asarray(_weights(N_CLOUD, 4))
    eps0 = 3e-3 * float(otlab.PointCloud(x, y).mean_cost())

    def loss(solver):
        return lambda x, a, eps: solver(otlab.PointCloud(x, y), a, epsilon=eps).reg_cost

    sns_loss = loss(otlab.sns)
    g_sns = jax.grad(sns_loss, argnums=(0, 1, 2))(x, a, eps0)
    g_ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(x, a, eps0)
    for gs, gr in zip(g_sns, g_ref, strict=True):
        np.testing.assert_allclose(gs, gr, rtol=1e-7, atol=1e-12 * float(jnp.max(jnp.abs(gr))))

    rng = np.random.default_rng(5)
    dx = jnp.asarray(rng.normal(size=x.shape))
    da = jnp.asarray(rng.normal(size=N_CLOUD)) * a
    da = da - a * jnp.sum(da) / jnp.sum(a)  # keep the mass: the problem stays balanced
    de = 0.1 * eps0
    h = 1e-5
    fd = (sns_loss(x + h * dx, a + h * da, eps0 + h * de)
          - sns_loss(x - h * dx, a - h * da, eps0 - h * de)) / (2 * h)  # fmt: skip
    ad = jnp.vdot(g_sns[0], dx) + jnp.vdot(g_sns[1], da) + g_sns[2] * de
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6)


def test_no_recompilation_on_second_call(x64):
    from otlab.solvers import sns as sns_lib

    c1, c2 = (jnp.asarray(_uniform_cost(N_RAND, seed=s)) for s in (1, 7))
    otlab.sns(c1, epsilon=1e-2).f.block_until_ready()
    size = sns_lib._sns._cache_size()
    otlab.sns(c2, _weights(N_RAND, 8), epsilon=2e-2).f.block_until_ready()
    assert sns_lib._sns._cache_size() == size


# ------------------------------------------------------------------------ statuses


def test_nan_input_is_nonfinite_not_converged(x64):
    c = np.array(_uniform_cost(N_RAND, seed=1))
    c[3, 4] = np.nan
    s = otlab.sns(c, epsilon=1e-2)
    assert int(s.status) == otlab.Status.NONFINITE and not bool(s.converged)
    x, y = _clouds()
    x[0, 0] = np.nan
    s = otlab.sns(otlab.PointCloud(x, y), epsilon=1e-3)
    assert int(s.status) == otlab.Status.NONFINITE and not bool(s.converged)


def test_too_small_max_iter_is_max_iter_not_converged(x64):
    c = jnp.asarray(_uniform_cost(N_RAND, seed=1))
    s = otlab.sns(c, epsilon=1.0 / 1200, max_iter=2, warmup=1)
    assert int(s.status) == otlab.Status.MAX_ITER and not bool(s.converged)
    assert int(s.n_iter) == 2 and float(s.marginal_error) > TOL64
    assert bool(jnp.all(jnp.isfinite(s.f))) and bool(jnp.all(jnp.isfinite(s.g)))


# ---------------------------------------------------------------------- bad inputs

_C = np.random.default_rng(0).uniform(size=(6, 5))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(budgets=(0,)), "budgets"),
        (dict(budgets=(16, -4)), "budgets"),
        (dict(budgets=(8.5,)), "budgets"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=2.0), "warmup"),
        (dict(implicit_diff=None), "implicit_diff"),
        (dict(max_iter=0), "max_iter"),
        (dict(cg_max_iter=0), "cg_max_iter"),
        (dict(direct_max=-1), "direct_max"),
        (dict(tol=-1e-9), "tol"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(tau_a=1.5), "tau_a"),
        (dict(a=np.full(7, 1 / 7)), "`a`"),
        (dict(b=np.full((5, 1), 0.2)), "`b`"),
        (dict(a=np.array([0.5, 0.5, 0.5, -0.5, 0.0, 0.0])), "`a`"),
        (dict(a=np.full(6, 0.5)), "masses"),
    ],
)
def test_bad_inputs_raise(kwargs, name):
    kw = dict(epsilon=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        otlab.sns(_C, **kw)


def test_empty_budget_ladder_is_rejected():
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError) as err:
        otlab.sns(otlab.PointCloud(x, x, block_size=4), epsilon=0.1, budgets=())
    assert "budgets" in str(err.value)


def test_bad_geometry_raises():
    with pytest.raises(ValueError, match="2-D"):
        otlab.sns(np.ones(5), epsilon=0.1)
    with pytest.raises(ValueError, match="floating"):
        otlab.sns(np.ones((3, 4), np.int32), epsilon=0.1)
    with pytest.raises(ValueError, match="geom"):
        otlab.sns("not a geometry", epsilon=0.1)
