"""Implicit differentiation of Sinkhorn (float64): gradients vs central finite
differences, implicit vs unrolled, jit / vmap / forward mode, independence from the
initialisation, the fixed gauge and online == dense.

Every check differentiates a *vector* of outputs at once: ``reg_cost``, the transport
cost ``<C, P>`` (depends on the derivatives of the potentials), a random linear
functional ``<r, f> + <s, g>`` and ``sum(f)`` (both gauge dependent). ``tau_a`` and
``tau_b`` are traced inputs, so one compiled function serves balanced and
unbalanced problems alike."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

import otlab
from otlab import costs

TIGHT = dict(tol=1e-12, max_iter=20000)
OUTPUTS = ("reg_cost", "cost", "<r,f>+<s,g>", "sum(f)")
BALANCED = dict(tau_a=1.0, tau_b=1.0)
UNBALANCED = [dict(tau_a=0.7, tau_b=0.9), dict(tau_a=1.0, tau_b=0.8)]


def _outputs(sol, r, s):
    return jnp.stack([sol.reg_cost, sol.cost, jnp.dot(r, sol.f) + jnp.dot(s, sol.g), jnp.sum(sol.f)])


@functools.cache
def _setup(name: str, *, mode: str = "auto", block_size: int | None = None, unrolled: bool = False):
    """``(problem, raw loss, jitted loss, jitted jacobian)`` for ``name``, compiled once per worker.

    ``loss(params) -> (4,)``; params: points (or the cost matrix), the Mahalanobis
    matrix where there is one, weights, epsilon and both taus.
    """
    p = problems.make(name, jnp.float64)
    rng = np.random.default_rng(0)
    r, s = jnp.asarray(rng.normal(size=p.shape[0])), jnp.asarray(rng.normal(size=p.shape[1]))
    opts = dict(TIGHT, mode=mode)
    if unrolled:
        opts.update(max_iter=300, implicit_diff=None)

    def loss(params):
        if p.is_point_cloud:
            cost = costs.Mahalanobis(params["M"]) if "M" in params else p.cost
            geom = otlab.PointCloud(params["x"], params["y"], cost, block_size=block_size)
        else:
            geom = otlab.Geometry(params["C"])
        sol = otlab.sinkhorn(geom, params["a"], params["b"], epsilon=params["eps"],
                             tau_a=params["tau_a"], tau_b=params["tau_b"], **opts)
        return _outputs(sol, r, s)

    return p, loss, jax.jit(loss), jax.jit(jax.jacrev(loss))


def _params(p, tau_a=1.0, tau_b=1.0):
    if p.is_point_cloud:
        params = dict(x=p.x, y=p.y)
        if isinstance(p.cost, costs.Mahalanobis):
            params["M"] = p.cost.matrix
    else:
        params = dict(C=p.geom.cost_matrix)
    params.update(a=p.a, b=p.b, eps=jnp.asarray(p.epsilon))
    params.update(tau_a=jnp.asarray(tau_a, jnp.float64), tau_b=jnp.asarray(tau_b, jnp.float64))
    return params


def _direction(key, value, balanced, rng):
    """A random direction for one parameter (zero-sum for balanced weights)."""
    if np.ndim(value) == 0:
        return jnp.asarray(1.0)
    d = rng.normal(size=np.shape(value))
    if key in ("a", "b"):
        if balanced:
            d = d - d.mean()
        d = d * 0.5 * np.asarray(value).min() / np.abs(d).max()  # keeps weights positive
    return jnp.asarray(d)


def _directional(jac, d):
    return np.asarray(jnp.tensordot(jac, d, axes=d.ndim))


def _check_fd(loss, jacobian, params, *, keys, balanced, rtol=1e-4, seed=0):
    """Reverse-mode Jacobian along random directions vs central differences."""
    jac = jacobian(params)
    value = np.asarray(loss(params))
    rng = np.random.default_rng(seed)
    for key in keys:
        d = _direction(key, params[key], balanced, rng)
        step = 1e-5 * (float(params[key]) if key == "eps" else 1.0)
        plus = loss({**params, key: params[key] + step * d})
        minus = loss({**params, key: params[key] - step * d})
        fd = np.asarray((plus - minus) / (2 * step))
        ad = _directional(jac[key], d)
        err = np.abs(ad - fd) / np.maximum(np.abs(fd), 1e-3 * np.abs(value).max())
        assert np.all(err < rtol), f"{key}: autodiff {ad} vs fd {fd}: {dict(zip(OUTPUTS, err, strict=True))}"
    return jac


# ----------------------------------------------------------- grad vs finite diffs


@pytest.mark.parametrize("name", ["gauss_weighted", "cost_matrix", "mahalanobis"])
def test_balanced_gradients_match_finite_differences(name, x64):
    """Points (or cost matrix), Mahalanobis matrix, weights (zero-sum directions), epsilon."""
    p, _, loss, jacobian = _setup(name)
    params = _params(p)
    keys = [k for k in params if not k.startswith("tau")]
    _check_fd(loss, jacobian, params, keys=keys, balanced=True)


@pytest.mark.parametrize("taus", UNBALANCED, ids=["unbalanced", "semi-relaxed"])
def test_unbalanced_gradients_match_finite_differences(taus, x64):
    """Every input, weights in any direction, and the relaxations tau."""
    p, _, loss, jacobian = _setup("mahalanobis")
    params = _params(p, **taus)
    keys = [k for k in params if k != "tau_a" or taus["tau_a"] < 1]
    _check_fd(loss, jacobian, params, keys=keys, balanced=False)


def test_envelope_closed_forms(x64):
    """d reg_cost / dC = P and d reg_cost / d eps = KL(P | a b^T) (balanced)."""
    p, _, _, jacobian = _setup("cost_matrix")
    jac = jacobian(_params(p))
    sol = otlab.sinkhorn(p.geom, p.a, p.b, epsilon=p.epsilon, **TIGHT)
    plan = np.asarray(sol.plan())
    np.testing.assert_allclose(jac["C"][0], plan, rtol=1e-7, atol=1e-13)
    ab = np.outer(p.a, p.b)
    kl = np.sum(plan * np.log(plan / ab) - plan + ab)
    np.testing.assert_allclose(jac["eps"][0], kl, rtol=1e-7)


def test_mahalanobis_matrix_gradient(x64):
    """d reg_cost / dM = sum_ij P_ij z_ij z_ij^T (envelope), also as a cost pytree."""
    p, _, _, jacobian = _setup("mahalanobis")
    sol = otlab.sinkhorn(p.geom, p.a, p.b, epsilon=p.epsilon, **TIGHT)
    z = np.asarray(p.x)[:, None, :] - np.asarray(p.y)[None, :, :]
    expected = np.einsum("ij,ijk,ijl->kl", np.asarray(sol.plan()), z, z)
    np.testing.assert_allclose(jacobian(_params(p))["M"][0], expected, rtol=1e-7, atol=1e-12)

    def reg(cost):
        return otlab.sinkhorn(otlab.PointCloud(p.x, p.y, cost), p.a, p.b, epsilon=p.epsilon, **TIGHT).reg_cost

    g = jax.jit(jax.grad(reg))(p.cost)
    assert isinstance(g, costs.Mahalanobis)
    np.testing.assert_allclose(g.matrix, expected, rtol=1e-7, atol=1e-12)


def test_gauge_dependent_quantity_has_fd_gradient(x64):
    """sum(f) depends on the gauge; fixing <a,f> = <b,g> makes it a function of the data,
    with the gradient that finite differences see."""
    p, raw, loss, jacobian = _setup("gauss_weighted")
    params = _params(p)
    jac = _check_fd(loss, jacobian, params, keys=["x", "y", "a", "eps"], balanced=True, seed=5)
    assert np.abs(np.asarray(jac["x"][3])).max() > 1e-3  # not trivially zero
    sol = otlab.sinkhorn(p.geom, p.a, p.b, epsilon=p.epsilon, **TIGHT)
    np.testing.assert_allclose(jnp.dot(p.a, sol.f), jnp.dot(p.b, sol.g), atol=1e-12)


# ------------------------------------------------------- implicit vs unrolled


@pytest.mark.parametrize("taus", [BALANCED, *UNBALANCED], ids=["balanced", "unbalanced", "semi-relaxed"])
def test_implicit_equals_unrolled(taus, x64):
    p, _, _, implicit = _setup("gauss_weighted")
    *_, unrolled = _setup("gauss_weighted", unrolled=True)
    params = _params(p, **taus)
    ji, ju = implicit(params), unrolled(params)
    for key in params:
        if key.startswith("tau") and taus[key] == 1.0:
            continue  # tau = 1 is the end of the domain
        a, b = np.asarray(ju[key]), np.asarray(ji[key])
        if key in ("a", "b") and taus["tau_a"] == taus["tau_b"] == 1.0:
            # balanced: only mass-preserving (zero-sum) directions are defined
            a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=key)


# ------------------------------------------------------- transformations


def test_gradients_under_jit_and_vmap(x64):
    p, raw, _, jacobian = _setup("gauss_weighted")
    params = _params(p, tau_a=0.7, tau_b=0.9)
    xs = jnp.stack([p.x, p.x + 0.3, 1.2 * p.x])
    axes = {k: (0 if k == "x" else None) for k in params}
    batched = jax.jit(jax.vmap(jax.jacrev(raw), in_axes=(axes,)))(
        {**params, "x": xs}
    )
    for i in range(3):
        single = jacobian({**params, "x": xs[i]})
        for key in params:
            np.testing.assert_allclose(batched[key][i], single[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_forward_mode_equals_reverse_mode(x64):
    p, raw, loss, jacobian = _setup("gauss_weighted")
    for taus in (BALANCED, UNBALANCED[0]):
        params = _params(p, **taus)
        rev = jacobian(params)
        fwd = jax.jit(jax.jacfwd(raw))(params)
        for key in params:
            np.testing.assert_allclose(fwd[key], rev[key], rtol=1e-6, atol=1e-9, err_msg=key)
    # jvp with one tangent for everything
    rng = np.random.default_rng(3)
    tangent = {k: jnp.asarray(rng.normal(size=np.shape(v))) for k, v in params.items()}
    _, jvp = jax.jit(lambda prm, t: jax.jvp(raw, (prm,), (t,)))(params, tangent)
    expected = sum(_directional(rev[k], tangent[k]) for k in params)
    np.testing.assert_allclose(jvp, expected, rtol=1e-6, atol=1e-9)


def test_gradient_does_not_depend_on_init(x64):
    p = problems.make("gauss_weighted", x64)
    rng = np.random.default_rng(4)
    scale = 20 * float(np.mean(p.cost_matrix()))
    far = (jnp.asarray(scale * rng.normal(size=p.shape[0])), jnp.asarray(scale * rng.normal(size=p.shape[1])))
    zeros = (jnp.zeros(p.shape[0]), jnp.zeros(p.shape[1]))
    r, s = jnp.asarray(rng.normal(size=p.shape[0])), jnp.asarray(rng.normal(size=p.shape[1]))

    def loss(x, init):
        sol = otlab.sinkhorn(otlab.PointCloud(x, p.y), p.a, p.b, epsilon=p.epsilon, init=init, **TIGHT)
        return jnp.sum(_outputs(sol, r, s)), sol.errors[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (gx_far, g_init), err_far = grad(p.x, far)
    (gx_zero, _), err_zero = grad(p.x, zeros)
    assert abs(float(err_far) - float(err_zero)) > 1e-2 * float(err_zero)  # really different runs
    np.testing.assert_allclose(gx_far, gx_zero, rtol=1e-6, atol=1e-10)
    # the initialisation receives no gradient
    np.testing.assert_array_equal(g_init[0], 0.0)
    np.testing.assert_array_equal(g_init[1], 0.0)


def test_online_gradients_equal_dense(x64):
    p, *_, dense = _setup("mahalanobis")
    *_, online = _setup("mahalanobis", block_size=6)
    for taus in (BALANCED, UNBALANCED[0]):
        params = _params(p, **taus)
        jd, jo = dense(params), online(params)
        for key in params:
            np.testing.assert_allclose(jo[key], jd[key], rtol=1e-8, atol=1e-11, err_msg=key)


def test_float32_gradients_are_finite_and_close_to_float64():
    def grad_x(dtype):
        p = problems.make("gauss", dtype)

        def reg(x):
            return otlab.sinkhorn(otlab.PointCloud(x, p.y), epsilon=p.epsilon, tol=1e-5).reg_cost

        return jax.jit(jax.grad(reg))(p.x)

    with jax.enable_x64(False):
        g32 = grad_x(jnp.float32)
    with jax.enable_x64(True):
        g64 = grad_x(jnp.float64)
    assert g32.dtype == jnp.float32 and g64.dtype == jnp.float64
    assert np.all(np.isfinite(g32))
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4)
