"""Control flow that stays cheap under `jax.vmap`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def if_any(pred, fn, x, *, differentiable: bool = False):
    """``fn(x)`` where ``pred``, else ``x``, for a rarely taken, expensive branch.

    Unbatched it acts as ``lax.cond(pred, fn, lambda x: x, x)``. Under `jax.vmap` a
    `lax.cond` on a batched predicate becomes a ``select`` that runs ``fn`` for every
    problem at every call (a solver's rare safeguard or final check then costs as much
    as its iterations); here it is a `lax.while_loop` of at most one step, which runs
    ``fn`` (for the whole batch, keeping ``x`` where ``pred`` is false) only when some
    problem needs it. A while loop has no reverse-mode derivative:
    ``differentiable=True`` (static) falls back to `lax.cond`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from otlab._control import if_any
        >>> jax.vmap(lambda p, x: if_any(p, lambda v: v + 1.0, x))(
        ...     jnp.array([True, False]), jnp.zeros(2))
        Array([1., 0.], dtype=float32)
    """
    if differentiable:
        return jax.lax.cond(pred, fn, lambda x: x, x)
    pred = jnp.asarray(pred)
    return jax.lax.while_loop(
        lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])), (pred, x)
    )[1]


def alone_or_batched(alone, batched):
    """A function that runs ``alone(*args)`` on one problem and ``jax.vmap(batched)``
    over the batch axis that `jax.vmap` adds: two algorithms for the same result,
    one that suits a single problem and one that suits a batch run in lockstep.

    Both must compute the same thing (up to their own rounding or tolerance); the
    choice is made at trace time from whether ``vmap`` batches any argument. Not
    differentiable: the arguments are held under ``stop_gradient``.

    Example (a conjugate-gradient solve alone, a dense one batched):
        >>> import jax, jax.numpy as jnp
        >>> from otlab._control import alone_or_batched
        >>> solve = alone_or_batched(
        ...     lambda m, v: jax.scipy.sparse.linalg.cg(m, v, tol=1e-6)[0],
        ...     lambda m, v: jnp.linalg.solve(m, v))
        >>> m = 2.0 * jnp.eye(3)
        >>> solve(m, jnp.ones(3)), jax.vmap(solve, (None, 0))(m, jnp.ones((2, 3)))[1]
        (Array([0.5, 0.5, 0.5], dtype=float32), Array([0.5, 0.5, 0.5], dtype=float32))
    """

    # the custom rule sees the arguments' leaves (a pytree such as a geometry may
    # check its fields when it is rebuilt from placeholders)
    def call(*args):
        leaves, treedef = jax.tree.flatten(jax.lax.stop_gradient(args))
        return _fn(treedef)(*leaves)

    @functools.cache
    def _fn(treedef):
        @jax.custom_batching.custom_vmap
        def one(*leaves):
            return alone(*jax.tree.unflatten(treedef, leaves))

        @one.def_vmap
        def _rule(axis_size, in_batched, *leaves):
            leaves = [
                x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
                for x, b in zip(leaves, in_batched, strict=True)
            ]
            out = jax.vmap(lambda *v: batched(*jax.tree.unflatten(treedef, v)))(*leaves)
            return out, jax.tree.map(lambda _: True, out)

        return one

    return call
