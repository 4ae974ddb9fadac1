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

    def rule(treedef, axis_size, in_batched, leaves):
        leaves = [
            x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
            for x, b in zip(leaves, in_batched, strict=True)
        ]
        return jax.vmap(lambda *v: batched(*jax.tree.unflatten(treedef, v)))(*leaves)

    return _custom_batched(alone, rule)


def one_at_a_time_on_cpu(fn):
    """A function that runs ``fn(*args)`` and, under `jax.vmap` on CPU, runs ``fn`` on
    each problem of the batch in turn (`jax.lax.map`) instead of in lockstep; on other
    platforms `jax.vmap` batches ``fn`` as usual.

    For iterative solvers whose problems take different numbers of steps and whose
    steps are many small operations: on CPU a batch run in lockstep waits for its
    slowest problem, each rare branch (`if_any`) runs whenever one problem takes it,
    and the CPU gains little from the wider operations, since it runs them one after
    the other anyway. Mapped, each problem runs the single-problem program: the batch
    costs the sum of its problems' solves, and its results are those of a Python loop
    over them. An accelerator instead runs the batch's wide operations in parallel.
    Not differentiable: the arguments are held under ``stop_gradient``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from otlab._control import one_at_a_time_on_cpu
        >>> halve = one_at_a_time_on_cpu(lambda x: jax.lax.while_loop(
        ...     lambda v: v > 1.0, lambda v: v / 2.0, x))
        >>> jax.vmap(halve)(jnp.array([1.5, 8.0]))
        Array([0.75, 1.  ], dtype=float32)
    """

    def rule(treedef, axis_size, in_batched, leaves):
        mapped = [x for x, b in zip(leaves, in_batched, strict=True) if b]

        def one(mapped):  # a problem's leaves: its own where batched, the shared ones
            it = iter(mapped)
            own = [next(it) if b else x for x, b in zip(leaves, in_batched, strict=True)]
            return fn(*jax.tree.unflatten(treedef, own))

        def vectorised(*mapped):
            return jax.vmap(one)(list(mapped))

        def sequential(*mapped):
            return jax.lax.map(one, list(mapped))

        return jax.lax.platform_dependent(*mapped, cpu=sequential, default=vectorised)

    return _custom_batched(fn, rule)


def _custom_batched(alone, rule):
    """``alone`` with the batching rule ``rule(treedef, axis_size, in_batched,
    leaves)``, which returns the batched outputs (every output batched along axis 0).
    The arguments are held under ``stop_gradient``."""

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
            out = rule(treedef, axis_size, in_batched, leaves)
            return out, jax.tree.map(lambda _: True, out)

        return one

    return call
