"""`otlab._control`: control flow that stays cheap under `jax.vmap`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from otlab._control import alone_or_batched


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
