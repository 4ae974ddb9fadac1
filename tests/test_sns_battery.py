"""``otlab.sns`` on data shaped like real data (issue 11): translated and anisotropic
clouds, Gaussian mixtures in 3-D, outliers, non-uniform weights, ``n != m``, float32
and float64, epsilon from 1e-2 to 3e-4 times the mean cost.

On every case where ``otlab.sinkhorn`` reaches the tolerance, SNS must report
``SUCCESS`` with a *true* marginal error — re-evaluated from the returned potentials
in the log domain (`OTSolution.marginals`), not the solver's own bookkeeping — at most
``tol``, in no more than ``MAX_NEWTON`` Newton steps; and it must never report
``SUCCESS`` with a larger true error. Every case is a dense ``N x M`` cost matrix, so
each solver compiles once per dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import otlab
from benchmarks.problems import battery_problem

N, M = 100, 130
TOL = {"float64": 1e-6, "float32": 1e-4}
MAX_NEWTON = 60  # the issue's target per problem
SINKHORN_MAX_ITER = 200_000

#: (name, epsilon / mean cost)
CASES = [
    ("translated-s0", 1e-2),
    ("translated-s1", 1e-3),
    ("translated-s3", 5e-4),
    ("anisotropic", 3e-4),
    ("mixture-3d", 1e-3),
    ("outliers", 1e-3),
    ("weights", 3e-4),
]



def _true_error(sol) -> float:
    """L1 marginal error of the returned potentials, re-evaluated in the log domain."""
    row, col = sol.marginals()
    return float(jnp.sum(jnp.abs(row - sol.a)) + jnp.sum(jnp.abs(col - sol.b)))


@pytest.mark.parametrize("name, rel", CASES)
def test_battery_success_wherever_sinkhorn_succeeds(dtype, name, rel):
    tol = TOL[jnp.dtype(dtype).name]
    x, y, a, b = battery_problem(name, N, M)
    c = jnp.asarray(np.sum((x[:, None] - y[None]) ** 2, axis=-1), dtype)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    eps = rel * float(jnp.mean(c))
    s = otlab.sns(c, a, b, epsilon=eps, tol=tol)
    k = otlab.sinkhorn(c, a, b, epsilon=eps, tol=tol, max_iter=SINKHORN_MAX_ITER)
    assert s.f.dtype == dtype
    err = _true_error(s)
    print(
        f"{name} eps={rel:g}*mean {jnp.dtype(dtype).name}: sns {otlab.Status.name(s.status)} "
        f"{int(s.n_iter)} Newton steps, true error {err:.1e}; sinkhorn "
        f"{otlab.Status.name(k.status)} {int(k.n_iter)} iterations"
    )
    if bool(s.converged):  # never a false SUCCESS
        assert err <= tol, err
    else:  # only at the float32 floor here: stagnation stops it well before max_iter
        assert int(s.status) == otlab.Status.MAX_ITER and int(s.n_iter) < 100
    if bool(k.converged) and _true_error(k) <= tol:
        assert int(s.status) == otlab.Status.SUCCESS, otlab.Status.name(s.status)
        assert int(s.n_iter) <= MAX_NEWTON
        if dtype == jnp.float64:
            np.testing.assert_allclose(float(s.reg_cost), float(k.reg_cost), rtol=1e-6)


def test_translated_clouds_of_the_issue(x64):
    """The issue's example at its size (500 vs 600 points, eps = 0.01, tol 1e-6,
    default ``max_iter``): it used to run out of steps at s = 3 with an error of 0.33
    (Sinkhorn converges in ~6,000 iterations; the benchmark compares both)."""
    x, y, _, _ = battery_problem("translated-s3", 500, 600)
    s = otlab.sns(otlab.PointCloud(x, y), epsilon=0.01, tol=1e-6)
    assert int(s.status) == otlab.Status.SUCCESS and int(s.n_iter) <= MAX_NEWTON
    assert _true_error(s) <= 1e-6


@pytest.mark.parametrize("scale", [30.0, 1.0, -1.0])
def test_a_step_never_ends_worse_than_its_start(x64, scale):
    """The safeguarded step (backtracking line search on the dual): along an ascent
    direction far too long (``scale = 30``) it finds a shorter step that increases
    the dual; along a descent direction (``scale = -1``) it keeps the iterate."""
    from otlab import _dual
    from otlab.solvers import sns as sns_lib

    x, y, a, b = battery_problem("translated-s3", N, M)
    geom = otlab.Geometry(jnp.asarray(np.sum((x[:, None] - y[None]) ** 2, axis=-1)))
    eps = 5e-4 * float(geom.mean_cost())
    problem = _dual.Problem(geom, jnp.asarray(a), jnp.asarray(b), jnp.asarray(eps), 1.0, 1.0)
    f, g = jnp.zeros(N), jnp.zeros(M)
    anchor, row, col, obj, ga, gb = sns_lib._fresh(problem, geom, f, g)
    err = jnp.sum(jnp.abs(ga)) + jnp.sum(jnp.abs(gb))
    zero = jnp.asarray(0)
    s = sns_lib._State(
        f, g, row, col, obj, err, 1.0, zero, zero, jnp.zeros(1), zero, False, zero, False, anchor, zero
    )
    d = (scale * ga, scale * gb)
    gd = scale * (jnp.sum(ga * ga) + jnp.sum(gb * gb))
    trial, t = sns_lib._line_search(problem, geom, s, d, gd, jnp.asarray(True))
    assert float(trial.obj) >= float(obj)
    if scale > 0:
        assert bool(trial.ok) and 0 < float(t) <= 1 and float(trial.obj) > float(obj)
        if scale > 1:
            assert float(t) < 1  # the full step was rejected
    else:
        assert not bool(trial.ok) and float(t) == 0.0
        np.testing.assert_array_equal(trial.f, f)
        np.testing.assert_array_equal(trial.g, g)


def test_anchored_plan_matches_a_fresh_one(x64):
    """Dense geometries evaluate Newton's trial points from a plan materialised at
    nearby potentials (diagonal scalings, no exponentials over n x m): the marginals,
    the moved plan and its sketch must be those computed afresh."""
    x, y, _, _ = battery_problem("outliers", N, M)
    geom = otlab.Geometry(jnp.asarray(np.sum((x[:, None] - y[None]) ** 2, axis=-1)))
    eps = 1e-3 * float(geom.mean_cost())
    rng = np.random.default_rng(0)
    f0, g0 = jnp.asarray(rng.normal(size=N) * eps), jnp.asarray(rng.normal(size=M) * eps)
    op = geom.plan_operator(f0, g0, eps)
    # moved by up to ~20 epsilon, inside the solver's re-anchoring bound
    f = f0 + jnp.asarray(rng.uniform(-20, 20, size=N) * eps)
    g = g0 + jnp.asarray(rng.uniform(-20, 20, size=M) * eps)
    row, col = geom.marginals(f, g, eps)
    row_a, col_a = op.marginals_at(f, g)
    np.testing.assert_allclose(row_a, row, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(col_a, col, rtol=1e-12, atol=1e-300)
    moved = op.moved(f, g)
    np.testing.assert_allclose(moved.matrix, geom.plan(f, g, eps), rtol=1e-12, atol=1e-300)
    logv, idx = moved.row_sparsify(16)
    logv_ref, idx_ref = geom.row_sparsify(f, g, eps, 16)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(logv, logv_ref, rtol=1e-10)
