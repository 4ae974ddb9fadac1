"""Eager calls of a solution's derived values compile once per signature.

A ``lax.cond`` or ``lax.map`` built on fresh closures and called outside ``jit``
compiles a new XLA program on every call; each loaded CPU executable keeps its
memory mappings, and a few thousand such calls (a property test, a notebook loop)
exhausted ``vm.max_map_count`` and crashed XLA with a segfault or an abort.
"""

from __future__ import annotations

import contextlib

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np

import otlab

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(name, _secs, **_):
        if name == _COMPILE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _values(sol):
    z = jnp.zeros((3, 2), sol.f.dtype)
    n, m = sol.f.shape[-1], sol.g.shape[-1]
    return (sol.reg_cost, sol.cost, sol.plan(), sol.marginals(), sol.apply(jnp.ones(m)),
            sol.apply(jnp.ones(n), axis=0), sol.transport(z))


def test_repeated_eager_calls_do_not_compile():
    rng = np.random.default_rng(0)
    for block_size in (None, 4):
        sols = []
        for i in range(3):
            x = jnp.asarray(rng.normal(size=(7, 2)), jnp.float32)
            y = jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)
            geom = otlab.PointCloud(x, y, block_size=block_size)
            sols.append(otlab.sinkhorn(geom, epsilon=0.1 * (i + 1)))
        jax.block_until_ready(_values(sols[0]))  # compiles each derived value once
        with count_compiles() as compiles:
            for sol in sols[1:]:
                jax.block_until_ready(_values(sol))
        assert not compiles, (block_size, len(compiles))


def test_repeated_eager_calls_on_a_batch_do_not_compile():
    rng = np.random.default_rng(1)
    solve = jax.jit(jax.vmap(lambda x, y: otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.5)))
    sols = [solve(jnp.asarray(rng.normal(size=(2, 7, 2)), jnp.float32),
                  jnp.asarray(rng.normal(size=(2, 9, 2)), jnp.float32)) for _ in range(3)]
    jax.block_until_ready(_values(sols[0]))
    with count_compiles() as compiles:
        for sol in sols[1:]:
            jax.block_until_ready(_values(sol))
    assert not compiles, len(compiles)


def test_repeated_eager_online_geometry_passes_do_not_compile():
    """Eager passes of an online point cloud (a ``lax.map`` over blocks) compile once
    per signature, with new values each time."""
    rng = np.random.default_rng(1)

    def calls(geom, f, g):
        return (geom.lse(f, g, 0.1, 1), geom.lse(f, g, 0.1, 0, shift=jnp.zeros(9)),
                geom.marginals(f, g, 0.1), geom.plan_cost(f, g, 0.1),
                geom.transport(g, 0.1, jnp.zeros((3, 2))))

    def one():
        x = jnp.asarray(rng.normal(size=(7, 2)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)
        f = jnp.asarray(rng.normal(size=7), jnp.float32)
        g = jnp.asarray(rng.normal(size=9), jnp.float32)
        return otlab.PointCloud(x, y, block_size=4), f, g

    jax.block_until_ready(calls(*one()))
    with count_compiles() as compiles:
        for _ in range(3):
            jax.block_until_ready(calls(*one()))
    assert not compiles, len(compiles)


def test_repeated_eager_auto_initializer_does_not_compile():
    """`otlab.initializers.auto` called eagerly (a ``lax.cond`` inside) compiles once per
    signature, with new values each time."""
    rng = np.random.default_rng(2)

    def one():
        x = jnp.asarray(rng.normal(size=(7, 2)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)
        return otlab.PointCloud(x, y), jnp.full(7, 1 / 7), jnp.full(9, 1 / 9), jnp.float32(0.01)

    jax.block_until_ready(otlab.initializers.auto(*one()))
    with count_compiles() as compiles:
        outs = [otlab.initializers.auto(*one()) for _ in range(3)]
        jax.block_until_ready(outs)
    assert not compiles, len(compiles)
    assert float(jnp.abs(outs[0][0] - outs[1][0]).max()) > 0  # new values, not a cache
