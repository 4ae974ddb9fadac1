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
    # (at 2.0 * y the y-vs-y self problem stalls at 7e-7 > tol: its divergence is NaN)
    v1, g1 = fn(x + 0.1 * rng.normal(size=x.shape), y + 0.1 * rng.normal(size=y.shape))
    assert fn._cache_size() == size == 1
    assert np.isfinite(v1) and np.all(np.isfinite(g1)) and float(v1) != float(v0)
    # and the gradient is the divergence's (central differences along a direction)
    d = rng.normal(size=x.shape)
    step = 1e-5
    div = jax.jit(div)
    fd = (div(x + step * d, y) - div(x - step * d, y)) / (2 * step)
    np.testing.assert_allclose(np.sum(g0 * d), fd, rtol=1e-5)
