"""The one implicit-differentiation mechanism shared by every solver family.

A solver hands `solve` a *forward* function ``forward(problem, init) ->
(f, g, aux)`` that runs its iterations (a ``while_loop``, not differentiable) and
returns the potentials. `solve` puts the result in the canonical gauge and,
through a ``jax.custom_jvp``, differentiates it with the implicit function theorem
applied to the problem's optimality condition:

$$ F(z^\\star(\\theta), \\theta) = 0 \\;\\Rightarrow\\; A\\, \\dot z = \\partial_\\theta F \\cdot \\dot\\theta, \\qquad A = -\\partial_z F, $$

where ``A`` is the (gauge-completed) Hessian of the dual: symmetric positive
definite, applied matrix-free through the geometry's plan operator and inverted
by a Jacobi-preconditioned conjugate gradient inside ``lax.custom_linear_solve``.
JAX transposes that linear solve for reverse mode, so ``jax.grad``, ``jax.jvp``
and ``jax.jacfwd`` all work, and the gradient depends on the problem only — not
on the solver, its initialisation or how many iterations it ran.

The balanced gauge ``(f + t, g - t)`` is fixed by ``<a, f> = <b, g>`` in both the
forward output and the optimality condition, which makes the solution unique.

A problem family plugs in through the `Problem` protocol: a pytree with
``optimality(f, g)`` (the residual ``F``, zero exactly at the gauge-fixed
solution) and ``hessian_operator(f, g) -> (matvec, diagonal)`` (``A = -dF/d(f, g)``,
symmetric positive definite, matrix-free), and the canonical gauge through the
single-dispatch function `gauge`. The entropic dual (``otlab._dual.Problem``) and
the cardinality-constrained dual (``otlab.solvers.cardinality.Problem``) are its
two instances.

Example:
    >>> import jax, otlab
    >>> x = jax.random.normal(jax.random.key(0), (30, 2))
    >>> def loss(x):
    ...     return otlab.sinkhorn(otlab.PointCloud(x, x + 1.0), epsilon=0.1).reg_cost
    >>> jax.grad(loss)(x).shape
    (30, 2)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from otlab import _dual
from otlab._control import one_at_a_time_on_cpu

__all__ = ["ImplicitDiff", "Problem", "gauge", "solve"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImplicitDiff:
    """Options of the backward linear solve (static, hashable).

    Args:
        tol: relative residual of conjugate gradient; ``None`` picks ``1e-5`` in
            float32 and ``1e-10`` in float64.
        max_iter: conjugate-gradient iteration cap.
        precondition: use the Jacobi (diagonal) preconditioner.
    """

    tol: float | None = None
    max_iter: int = 1000
    precondition: bool = True


#: The default options, shared by every solver's signature.
DEFAULT = ImplicitDiff()


def _tangent_zero(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


class Problem(Protocol):
    """What a problem type declares to be differentiated by `solve` (a pytree:
    every array it holds is something the solution is differentiated against).

    Its canonical gauge comes from `gauge`: register the type there, or give it a
    ``gauge(f, g)`` method. ``linear_solve`` accepts any such problem.
    """

    def optimality(self, f: Array, g: Array) -> tuple[Array, Array]:
        """The residual ``F(f, g)``, zero exactly at the (gauge-fixed) solution."""
        ...

    def hessian_operator(self, f: Array, g: Array) -> tuple[Callable, tuple[Array, Array]]:
        """``(matvec, (da, db))``: ``A = -dF/d(f, g)`` (symmetric positive definite)
        as a function of a pair, and its diagonal (the Jacobi preconditioner)."""
        ...


@functools.singledispatch
def gauge(problem: Any, f: Array, g: Array) -> tuple[Array, Array]:
    """The canonical representative of the potentials ``(f, g)`` of ``problem``.

    Dispatches on the problem's type; a problem type without a registration must
    define a ``gauge(f, g)`` method.
    """
    return problem.gauge(f, g)


@gauge.register(_dual.Problem)
def _(problem: _dual.Problem, f: Array, g: Array) -> tuple[Array, Array]:
    return _dual.gauge_shift(f, g, problem.a, problem.b, problem.tau_a, problem.tau_b)


def _gauge(problem, f, g):
    return gauge(problem, f, g)


def linear_solve(problem: _dual.Problem, f: Array, g: Array, rhs, cfg: ImplicitDiff):
    """Solve ``A z = rhs`` with ``A = -dF/d(f, g)`` at the solution ``(f, g)``."""
    matvec, (da, db) = problem.hessian_operator(f, g)
    tol = cfg.tol
    if tol is None:
        tol = 1e-10 if f.dtype == jnp.float64 else 1e-5
    precond = (lambda z: (z[0] / da, z[1] / db)) if cfg.precondition else None

    def cg(mv, b):
        return jax.scipy.sparse.linalg.cg(mv, b, tol=tol, maxiter=cfg.max_iter, M=precond)[0]

    return jax.lax.custom_linear_solve(matvec, rhs, solve=cg, symmetric=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit(forward, cfg, problem, init):
    # Under `jax.vmap` on CPU the forward iterations run one problem at a time: each
    # stops at its own convergence with its kernel in cache, where a lockstep batch
    # runs to its slowest problem and streams every kernel at every iteration.
    f, g, aux = one_at_a_time_on_cpu(forward)(problem, init)
    f, g = _gauge(problem, f, g)
    return f, g, aux


@_implicit.defjvp
def _implicit_jvp(forward, cfg, primals, tangents):
    problem, init = primals
    dproblem, _ = tangents  # the initialisation never enters the gradient
    f, g, aux = _implicit(forward, cfg, problem, init)
    _, rhs = jax.jvp(lambda p: p.optimality(f, g), (problem,), (dproblem,))
    df, dg = linear_solve(problem, f, g, rhs, cfg)
    return (f, g, aux), (df, dg, jax.tree.map(_tangent_zero, aux))


def solve(
    forward: Callable,
    problem: Problem,
    init: tuple[Array, Array],
    implicit_diff: ImplicitDiff | None = DEFAULT,
):
    """Run ``forward`` and return ``(f, g, aux)`` in the canonical gauge.

    Args:
        forward: ``forward(problem, init) -> (f, g, aux)``; hashable (a function or
            a ``functools.partial`` of static options).
        problem: the problem solved: any `Problem` (``otlab._dual.Problem`` for
            the entropic solvers).
        init: initial potentials ``(f0, g0)``; they receive no gradient.
        implicit_diff: options of the implicit backward pass, or ``None`` to
            differentiate through ``forward`` itself (it must then be unrollable,
            e.g. a ``lax.scan``).
    """
    if implicit_diff is None:
        f, g, aux = forward(problem, init)
        f, g = _gauge(problem, f, g)
        return f, g, aux
    return _implicit(forward, implicit_diff, problem, init)
