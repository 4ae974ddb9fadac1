"""Control flow that stays cheap under `jax.vmap`."""

from __future__ import annotations

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
