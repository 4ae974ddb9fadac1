"""The envelope-theorem ``reg_cost`` of `otlab._dual` (what ``sinkhorn_divergence``
differentiates: no backward linear solve) has the gradient of ``OTSolution.reg_cost``
(implicit) at convergence, to first and second order; and a jitted ``value_and_grad`` of
the divergence compiles once per shape and matches finite differences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

import otlab
from otlab import _dual

TIGHT = dict(tol=1e-12, max_iter=20000)


def _losses(p):
    """``reg_cost`` (envelope) and the same dual objective evaluated on the implicitly
    differentiated potentials (no envelope), as functions of every input."""

    def solve(params):
        geom = otlab.PointCloud(params["x"], params["y"])
        return otlab.sinkhorn(geom, params["a"], params["b"], epsilon=params["eps"],
                              tau_a=params["tau_a"], tau_b=params["tau_b"], **TIGHT)

    def envelope(params):
        s = solve(params)
        return _dual.reg_cost(s.f, s.g, (s.geom, s.a, s.b, s.epsilon, s.tau_a, s.tau_b))

    def through_potentials(params):
        return solve(params).reg_cost

    return envelope, through_potentials


@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.7, 0.9)], ids=["balanced", "unbalanced"])
def test_envelope_gradient_equals_implicit_gradient(taus, x64):
    p = problems.make("gauss_weighted", jnp.float64)
    params = dict(x=p.x, y=p.y, a=p.a, b=p.b, eps=jnp.asarray(p.epsilon),
                  tau_a=jnp.asarray(taus[0]), tau_b=jnp.asarray(taus[1]))
    envelope, through = _losses(p)
    ge = jax.jit(jax.grad(envelope))(params)
    gi = jax.jit(jax.grad(through))(params)
    np.testing.assert_allclose(envelope(params), through(params), rtol=1e-12)
    for key in params:
        if key.startswith("tau") and taus == (1.0, 1.0):
            continue  # one-sided at the balanced boundary
        np.testing.assert_allclose(ge[key], gi[key], rtol=1e-6, atol=1e-9, err_msg=key)

    # second order: a Hessian-vector product w.r.t. the points vs central differences
    # of the gradient (the envelope's tangent keeps the potentials differentiable)
    def grad_x(x):
        return jax.grad(envelope)({**params, "x": x})["x"]

    d = jnp.asarray(np.random.default_rng(0).normal(size=p.x.shape))
    _, hvp = jax.jit(lambda x, d: jax.jvp(grad_x, (x,), (d,)))(p.x, d)
    step = 1e-5
    fd = (grad_x(p.x + step * d) - grad_x(p.x - step * d)) / (2 * step)
    np.testing.assert_allclose(hvp, fd, rtol=1e-4, atol=1e-6 * float(jnp.abs(fd).max()))


def test_divergence_value_and_grad_compiles_once(x64):
    """A jitted ``value_and_grad`` of the divergence: new values, same shapes, no retrace."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(7, 2)) + 1.0
    div = functools.partial(otlab.sinkhorn_divergence, epsilon=0.5, tol=1e-10)
    fn = jax.jit(jax.value_and_grad(div))
    v0, g0 = fn(x, y)
    size = fn._cache_size()
    # (at 2.0 * y alternating Sinkhorn on the y-vs-y self problem stalls at 7e-7 > tol)
    v1, g1 = fn(x + 0.1 * rng.normal(size=x.shape), 2.0 * y)
    assert fn._cache_size() == size == 1
    assert np.isfinite(v1) and np.all(np.isfinite(g1)) and float(v1) != float(v0)
    # and the gradient is the divergence's (central differences along a direction)
    d = rng.normal(size=x.shape)
    step = 1e-5
    div = jax.jit(div)
    fd = (div(x + step * d, y) - div(x - step * d, y)) / (2 * step)
    np.testing.assert_allclose(np.sum(g0 * d), fd, rtol=1e-5)


@pytest.mark.parametrize("n, m", [(20, 20), (12, 40)], ids=["one-solve", "three-solves"])
def test_divergence_vmap_equals_loop(n, m, x64):
    """``jax.vmap`` of the divergence (each problem solved, checked and valued alone on
    CPU, `otlab._control.one_at_a_time_on_cpu`), its gradients and a Hessian-vector
    product (of the envelope: the potentials held fixed) equal a loop over the
    problems; both stacking paths of `_divergence` (one compiled solve, three)."""
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(3, n, 2)))
    ys = jnp.asarray(rng.normal(size=(3, m, 2)) * np.array([0.5, 1.0, 2.0])[:, None, None] + 1)
    div = functools.partial(otlab.sinkhorn_divergence, epsilon=0.3, tol=1e-10)
    vg = jax.jit(jax.vmap(jax.value_and_grad(div, argnums=(0, 1))))
    one = jax.jit(jax.value_and_grad(div, argnums=(0, 1)))
    values, (gx, gy) = vg(xs, ys)
    assert np.all(np.isfinite(values)) and np.all(values > 0)
    for i in range(3):
        v, (gxi, gyi) = one(xs[i], ys[i])
        np.testing.assert_allclose(values[i], v, rtol=1e-12)
        np.testing.assert_allclose(gx[i], gxi, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gy[i], gyi, rtol=1e-9, atol=1e-12)
    d = jnp.asarray(rng.normal(size=xs.shape[1:]))

    def hvp(x, y):
        return jax.jvp(lambda x: jax.grad(div)(x, y), (x,), (d,))[1]

    h = jax.jit(jax.vmap(hvp))(xs, ys)
    assert np.all(np.isfinite(h)) and float(jnp.abs(h).max()) > 0
    for i in range(3):
        np.testing.assert_allclose(h[i], jax.jit(hvp)(xs[i], ys[i]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_divergence_self_problems_converge_where_alternating_stalls(dtype, tol):
    """The debiasing terms OT(a, a), OT(b, b) use the averaged symmetric update: on
    points far apart on the scale of epsilon (a nearly diagonal plan) alternating
    Sinkhorn contracts by ~0.999 per iteration; the symmetric update converges in a
    few dozen, to the same value."""
    from otlab.solvers import sinkhorn as sk

    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(6, 2)), dtype)
        y = jnp.asarray(2.0 * (rng.normal(size=(7, 2)) + 1.0), dtype)
        alt = otlab.sinkhorn(otlab.PointCloud(y, y), epsilon=0.5, tol=tol, mode="log")
        if dtype == "float64":
            assert int(alt.status) == otlab.Status.MAX_ITER  # the defect this guards
        d, status = otlab.sinkhorn_divergence(x, y, epsilon=0.5, tol=tol, with_status=True)
        assert int(status) == otlab.Status.SUCCESS and np.isfinite(float(d))
        sym = sk._checked_sinkhorn(
            otlab.PointCloud(y, y), None, None, epsilon=0.5, tau_a=1.0, tau_b=1.0, tol=tol,
            max_iter=2000, check_every=10, init=None, epsilon_init=None, epsilon_decay=0.9,
            mode="symmetric", implicit_diff=otlab.ImplicitDiff(),
        )
        assert bool(sym.converged) and int(sym.n_iter) <= 100
        np.testing.assert_array_equal(sym.f, sym.g)
        # the same optimum as alternating Sinkhorn run to convergence
        ref_tol = max(tol, 1e-6)  # what alternating reaches in 40000 iterations
        ref = otlab.sinkhorn(
            otlab.PointCloud(y, y), epsilon=0.5, tol=ref_tol, mode="log", max_iter=40000
        )
        assert bool(ref.converged)
        # (the potentials themselves are ill-determined along the slow mode: at a
        # marginal error of 1e-6 alternating's are still 5e-3 away)
        np.testing.assert_allclose(sym.reg_cost, ref.reg_cost, rtol=ref_tol)


def test_divergence_with_an_unknown_cost_uses_alternating_updates(x64):
    """A user cost is not assumed symmetric: the self problems run alternating
    Sinkhorn (same value as the symmetric cost it happens to equal)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 2)), rng.normal(size=(25, 2)) + 0.5
    fn = otlab.costs.FunctionCost(lambda u, v: jnp.sum((u - v) ** 2))
    assert not fn.symmetric and otlab.costs.SqEuclidean().symmetric
    d1 = otlab.sinkhorn_divergence(x, y, cost=fn, epsilon=1.0, tol=1e-9)
    d2 = otlab.sinkhorn_divergence(x, y, epsilon=1.0, tol=1e-9)
    np.testing.assert_allclose(d1, d2, rtol=1e-7)
