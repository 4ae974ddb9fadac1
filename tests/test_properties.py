"""Property-based tests (hypothesis) of Sinkhorn on random small problems (float64).

Shapes are fixed (n = 6, m = 8 points in 2-D) so that every example reuses the same
compiled solver; values (points, weights, epsilon, tau, shifts) are drawn."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import otlab

N, M = 6, 8
OPTS = dict(tol=1e-9, max_iter=10000)
# Derandomized: CI runs the same examples every time (OTLAB_EXAMPLES=300 explores more).
PROPERTY = settings(
    max_examples=int(os.environ.get("OTLAB_EXAMPLES", 15)), deadline=None, derandomize=not os.environ.get("OTLAB_EXAMPLES")
)

_coord = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=64)


def _points(k):
    return hnp.arrays(np.float64, (k, 2), elements=_coord)


def _weights(k):
    w = hnp.arrays(np.float64, (k,), elements=st.floats(0.05, 1.0, width=64))
    return w.map(lambda v: v / v.sum())


_eps_rel = st.floats(0.05, 1.0)


def _epsilon(x, y, rel):
    """Relative to the largest cost (plus a floor for coincident clouds)."""
    c = np.sum((x[:, None, :] - y[None, :, :]) ** 2, -1)
    return rel * (float(c.max()) + 0.1)


def _solve(x, y, a, b, eps, **kw):
    return otlab.sinkhorn(otlab.PointCloud(jnp.asarray(x), jnp.asarray(y)), jnp.asarray(a),
                          jnp.asarray(b), epsilon=eps, **OPTS, **kw)


@PROPERTY
@given(x=_points(N), y=_points(M), a=_weights(N), b=_weights(M), rel=_eps_rel)
def test_plan_marginals_match_weights(x, y, a, b, rel):
    with jax.enable_x64(True):
        sol = _solve(x, y, a, b, _epsilon(x, y, rel))
        assert bool(sol.converged), (int(sol.status), float(sol.marginal_error))
        plan = np.asarray(sol.plan())
        assert np.all(plan >= 0)
        err = np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum()
        assert err <= 1.01 * OPTS["tol"] + 1e-13


@PROPERTY
@given(x=_points(N), y=_points(M), a=_weights(N), b=_weights(M), rel=_eps_rel,
       tau=st.floats(0.2, 0.95))
def test_unbalanced_plan_satisfies_relaxed_marginal_conditions(x, y, a, b, rel, tau):
    """P 1 = a exp(-(f - eps log a) / rho) with rho = eps tau / (1 - tau) (and for b)."""
    with jax.enable_x64(True):
        eps = _epsilon(x, y, rel)
        sol = _solve(x, y, a, b, eps, tau_a=tau, tau_b=tau)
        assert bool(sol.converged)
        rho = eps * tau / (1 - tau)
        plan = np.asarray(sol.plan())
        f, g = np.asarray(sol.f), np.asarray(sol.g)
        np.testing.assert_allclose(plan.sum(1), a * np.exp(-(f - eps * np.log(a)) / rho), atol=1e-8)
        np.testing.assert_allclose(plan.sum(0), b * np.exp(-(g - eps * np.log(b)) / rho), atol=1e-8)


@PROPERTY
@given(x=_points(N), y=_points(M), a=_weights(N), b=_weights(M), rel=_eps_rel,
       perm_x=st.permutations(range(N)), perm_y=st.permutations(range(M)))
def test_permuting_points_permutes_potentials(x, y, a, b, rel, perm_x, perm_y):
    with jax.enable_x64(True):
        eps = _epsilon(x, y, rel)
        sol = _solve(x, y, a, b, eps)
        px, py = np.asarray(perm_x), np.asarray(perm_y)
        perm = _solve(x[px], y[py], a[px], b[py], eps)
        assert bool(sol.converged) and bool(perm.converged)
        scale = 1e-6 * (eps + 1.0)
        np.testing.assert_allclose(perm.f, np.asarray(sol.f)[px], atol=scale)
        np.testing.assert_allclose(perm.g, np.asarray(sol.g)[py], atol=scale)
        np.testing.assert_allclose(perm.reg_cost, sol.reg_cost, rtol=1e-9, atol=1e-10)


@PROPERTY
@given(x=_points(N), y=_points(M), a=_weights(N), b=_weights(M), rel=_eps_rel,
       shift=hnp.arrays(np.float64, (2,), elements=st.floats(-10.0, 10.0)))
def test_translating_both_clouds_leaves_reg_cost_unchanged(x, y, a, b, rel, shift):
    with jax.enable_x64(True):
        eps = _epsilon(x, y, rel)
        sol = _solve(x, y, a, b, eps)
        moved = _solve(x + shift, y + shift, a, b, eps)
        assert bool(sol.converged) and bool(moved.converged)
        np.testing.assert_allclose(moved.reg_cost, sol.reg_cost, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(moved.plan(), sol.plan(), atol=1e-7)


@PROPERTY
@given(c=hnp.arrays(np.float64, (N, M), elements=st.floats(0.0, 3.0, width=64)),
       a=_weights(N), b=_weights(M), rel=_eps_rel, k=st.floats(-5.0, 5.0))
def test_constant_cost_shift_shifts_reg_cost(c, a, b, rel, k):
    """Balanced, unit mass: OT_eps(C + k) = OT_eps(C) + k (and the plan is unchanged)."""
    with jax.enable_x64(True):
        eps = rel * (float(c.max()) + 0.1)

        def solve(cm):
            return otlab.sinkhorn(otlab.Geometry(jnp.asarray(cm)), jnp.asarray(a), jnp.asarray(b),
                                  epsilon=eps, **OPTS)

        sol, shifted = solve(c), solve(c + k)
        assert bool(sol.converged) and bool(shifted.converged)
        np.testing.assert_allclose(float(shifted.reg_cost) - float(sol.reg_cost), k, atol=1e-7)
        np.testing.assert_allclose(shifted.plan(), sol.plan(), atol=1e-8)


# ------------------------------------------- converged => the answer meets tol
# Hard random problems: zero weights, one far outlier, a common offset (up to 1e4),
# duplicated points. Whatever the solver reports, ``converged`` must mean that the
# returned potentials, re-evaluated independently (float64 NumPy, max-shifted), meet
# ``tol`` up to the rounding floor of the dtype: float potentials and costs are
# stored to a relative precision u, so each plan entry exp((f + g - C) / eps) is
# known only to a relative u (|f| + |g| + |C|) / eps; at an outlier (|C| ~ 800,
# eps ~ 0.09, float32) that floor alone is ~1e-4 of the outlier's mass. Both
# evaluations (the solver's, float32, and this one of the rounded numbers) carry it.


@st.composite
def _hard_problem(draw):
    x = draw(_points(N))
    y = draw(_points(M))
    if draw(st.booleans()):  # duplicated points
        x[1] = x[0]
        y[2] = y[3] = y[0]
    if draw(st.booleans()):  # one outlier far away
        x[-1] = draw(st.floats(20.0, 300.0)) * np.array([1.0, draw(st.sampled_from([1.0, -1.0]))])
    offset = draw(st.sampled_from([0.0, 0.0, 1e2, 1e4]))
    a = draw(hnp.arrays(np.float64, (N,), elements=st.floats(0.05, 1.0, width=64)))
    b = draw(hnp.arrays(np.float64, (M,), elements=st.floats(0.05, 1.0, width=64)))
    a[: draw(st.integers(0, 2))] = 0.0  # zero weights (the leading points)
    b[M - draw(st.integers(0, 2)):] = 0.0
    rel = draw(st.floats(0.01, 0.5))
    return x + offset, y + offset, a / a.sum(), b / b.sum(), rel


def _reevaluated_error(sol) -> tuple[float, float]:
    """(L1 marginal error of the returned potentials in float64, rounding floor)."""
    c = np.asarray(sol.geom.cost_matrix, np.float64)
    f, g = np.asarray(sol.f, np.float64), np.asarray(sol.g, np.float64)
    eps = float(sol.epsilon)
    z = (f[:, None] + g[None, :] - c) / eps
    p = np.exp(z)
    a, b = np.asarray(sol.a, np.float64), np.asarray(sol.b, np.float64)
    err = float(np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum())
    u = np.finfo(np.asarray(sol.f).dtype).eps / 2
    magnitude = np.abs(f)[:, None] + np.abs(g)[None, :] + np.abs(c) + eps
    floor = 2 * 2 * u * float(np.sum(p * magnitude)) / eps  # rows + columns, two evaluations
    return err, floor


@functools.cache
def _hard_solver(solver: str, dtype: str):
    tol = 1e-4 if dtype == "float32" else 1e-8

    def solve(x, y, a, b, eps):
        geom = otlab.PointCloud(x, y)
        if solver == "sns":
            return otlab.sns(geom, a, b, epsilon=eps, tol=tol, max_iter=60)
        return otlab.sinkhorn(geom, a, b, epsilon=eps, mode=solver, tol=tol, max_iter=3000)

    return jax.jit(solve), tol


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("solver", ["kernel", "log", "sns"])
def test_converged_implies_reevaluated_error_within_tol(solver, dtype):
    solve, tol = _hard_solver(solver, dtype)
    seen = []

    @PROPERTY
    @given(problem=_hard_problem())
    def check(problem):
        x, y, a, b, rel = problem
        with jax.enable_x64(dtype == "float64"):
            args = [jnp.asarray(v, dtype) for v in (x, y, a, b)]
            c = np.sum((x[:, None] - y[None]) ** 2, -1)
            # relative to the bulk of the costs: an outlier makes some entries huge
            sol = solve(*args, jnp.asarray(rel * float(np.median(c)) + 1e-2, dtype))
            seen.append(bool(sol.converged))
            assert bool(sol.converged) == bool(sol.marginal_error <= tol)
            if bool(sol.converged):
                err, floor = _reevaluated_error(sol)
                assert err <= 1.01 * tol + floor, (err, floor, int(sol.status))

    check()
    assert any(seen)  # the property was exercised on converged solves
