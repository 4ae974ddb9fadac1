"""`otlab._control`: control flow that stays cheap under `jax.vmap`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from otlab._control import alone_or_batched, one_at_a_time_on_cpu


def test_alone_or_batched_dispatches_on_batching():
    """Unbatched: the first function; under `vmap` (also nested, also with unbatched
    arguments, which are broadcast): the second, vmapped over the batch."""
    f = alone_or_batched(lambda x, y: x + y + 1.0, lambda x, y: x + y + 2.0)
    x, y = jnp.ones(3), jnp.arange(3.0)
    np.testing.assert_array_equal(f(x, y), x + y + 1.0)
    np.testing.assert_array_equal(jax.jit(f)(x, y), x + y + 1.0)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_array_equal(jax.vmap(f, (0, None))(xs, y), xs + y + 2.0)
    np.testing.assert_array_equal(jax.jit(jax.vmap(f))(xs, xs), 2 * xs + 2.0)
    xss = jnp.stack([xs, 3 * xs])
    np.testing.assert_array_equal(jax.vmap(jax.vmap(f, (0, None)), (0, None))(xss, y), xss + y + 2.0)
    # pytrees in and out; a dict argument is rebuilt from its leaves
    g = alone_or_batched(lambda d: (d["a"] * 2.0, d["b"]), lambda d: (d["a"] * 3.0, d["b"]))
    out = jax.vmap(g)({"a": xs, "b": xs})
    np.testing.assert_array_equal(out[0], 3.0 * xs)
    np.testing.assert_array_equal(g({"a": x, "b": y})[0], 2.0 * x)


def test_alone_or_batched_has_no_gradient():
    f = alone_or_batched(lambda x: x**2, lambda x: x**2)
    assert float(jax.grad(lambda x: jnp.sum(f(x)) + jnp.sum(x))(jnp.ones(2))[0]) == 1.0


def test_one_at_a_time_on_cpu_runs_each_problem_alone():
    """Under `vmap` on CPU each problem runs the single-problem program (an inner
    `alone_or_batched` takes its unbatched branch, a `while_loop` stops at the problem's
    own count), with batched and shared arguments, nested `vmap` and pytrees; results
    equal a loop over the problems."""
    inner = alone_or_batched(lambda x: x + 1.0, lambda x: x + 100.0)

    def count(x, y):  # halvings down to y, and which branch `inner` took
        n, v = jax.lax.while_loop(lambda c: c[1] > y, lambda c: (c[0] + 1, c[1] / 2.0), (0, x))
        return {"n": n, "v": v, "branch": inner(jnp.zeros(()))}

    f = one_at_a_time_on_cpu(count)
    xs, y = jnp.array([1.5, 8.0, 40.0]), jnp.asarray(1.0)
    out = jax.jit(jax.vmap(f, (0, None)))(xs, y)
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(out["branch"], 1.0)  # each problem alone
    for i, x in enumerate(xs):
        alone = f(x, y)
        assert int(out["n"][i]) == int(alone["n"]) and float(out["v"][i]) == float(alone["v"])
    np.testing.assert_array_equal(out["n"], [1, 3, 6])
    nested = jax.vmap(jax.vmap(f))(jnp.stack([xs, 2 * xs]), jnp.ones((2, 3)))
    np.testing.assert_array_equal(nested["n"], [[1, 3, 6], [2, 4, 7]])
    np.testing.assert_array_equal(nested["branch"], 1.0)
    # held under stop_gradient, like `alone_or_batched`
    g = jax.grad(lambda x: jnp.sum(jax.vmap(f, (0, None))(x, y)["v"]) + jnp.sum(x))(xs)
    np.testing.assert_array_equal(g, 1.0)


def test_one_at_a_time_off_cpu_is_a_lockstep_vmap():
    """The accelerator branch (`lax.platform_dependent`'s default), lowered for CUDA on
    this CPU-only machine: the batch's `while_loop` is vmapped (one loop), where the CPU
    lowering maps the problems (a loop over them around each problem's loop)."""
    f = one_at_a_time_on_cpu(
        lambda x: jax.lax.while_loop(lambda v: v > 1.0, lambda v: v / 2.0, x)
    )
    traced = jax.jit(jax.vmap(f)).trace(jnp.array([1.5, 8.0]))
    loops = {p: traced.lower(lowering_platforms=(p,)).as_text().count("stablehlo.while")
             for p in ("cpu", "cuda")}  # fmt: skip
    assert loops == {"cpu": 2, "cuda": 1}, loops
