"""``OTSolution``: what every entropic solver returns, and the ``Status`` codes.

A solution is a pytree (``vmap`` over solutions works) holding the dual potentials,
the problem it solves and the run's diagnostics. The plan is lazy: ``apply``,
``transport``, ``cost`` and ``reg_cost`` go through the geometry layer and never
build the ``n x m`` matrix; only `OTSolution.plan` does.

A *batch* of solutions, as returned by ``jax.vmap(solver)``, has leading batch
axes on every leaf; its methods and properties apply to each problem (they
``vmap`` themselves over the batch axes, which they read off ``f.ndim``), and
their other arguments are shared by the whole batch: ``sols.reg_cost`` has the
batch's shape, ``sols.transport(x)`` maps the same points ``x`` through each
solution. ``Status.name(sols.status)`` gives an array of names.

Values derived from a solution whose ``status`` is ``INFEASIBLE`` or
``NONFINITE`` (``reg_cost``, ``cost``, ``plan()``, ``apply``, ``transport``) are
NaN, so that a loss computed under ``jit`` cannot use them silently; ``f``,
``g`` and ``marginals()`` are returned as computed, for diagnosis. After
``MAX_ITER`` they are the values at the returned (non-converged) potentials.

Example:
    >>> import jax, otlab
    >>> x = jax.random.normal(jax.random.key(0), (50, 2))
    >>> sol = otlab.sinkhorn(otlab.PointCloud(x, x + 1.0), epsilon=0.1)
    >>> bool(sol.converged), sol.plan().shape
    (True, (50, 50))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otlab import _dual

__all__ = ["OTSolution", "Status"]

Array = jax.Array


class Status:
    """Integer status codes carried by ``OTSolution.status`` (valid under ``jit``).

    Attributes:
        SUCCESS: the optimality residual reached ``tol``.
        MAX_ITER: the iteration budget ran out first.
        NONFINITE: a NaN or infinity appeared (inputs or divergence).
        INFEASIBLE: the problem has no solution as posed (a balanced problem with
            unequal masses, negative weights, ``epsilon <= 0`` or ``tau`` outside
            ``(0, 1]``) — detected under ``jit``;
            outside ``jit`` these raise ``ValueError`` instead.
    """

    SUCCESS = 0
    MAX_ITER = 1
    NONFINITE = 2
    INFEASIBLE = 3

    NAMES = ("SUCCESS", "MAX_ITER", "NONFINITE", "INFEASIBLE")

    @classmethod
    def name(cls, code: int | Array) -> str | np.ndarray:
        """The name of an integer status code; an array of names for an array of
        codes (e.g. the ``status`` of a batch of solutions).

        Example:
            >>> import jax.numpy as jnp
            >>> from otlab import Status
            >>> Status.name(0), Status.name(jnp.array([0, 1])).tolist()
            ('SUCCESS', ['SUCCESS', 'MAX_ITER'])
        """
        codes = np.asarray(code)
        if codes.ndim == 0:
            return cls.NAMES[int(codes)]
        return np.asarray(cls.NAMES)[codes.astype(int)]


def _per_problem(method):
    """Apply ``method`` to each problem of a batch of solutions (leading axes of
    ``f`` beyond one), ``vmap``-ing over every leaf; other arguments are shared."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.f.ndim > 1:
            return jax.vmap(lambda sol: wrapper(sol, *args, **kwargs))(self)
        return method(self, *args, **kwargs)

    return wrapper


def _summary(x) -> str:
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
        return f"<{getattr(x, 'dtype', '')}{list(getattr(x, 'shape', ()))}>"
    v = np.asarray(x)
    if v.ndim == 0:
        return f"{v.item():.4g}" if np.issubdtype(v.dtype, np.floating) else str(v.item())
    if np.issubdtype(v.dtype, np.floating):
        return f"[{np.min(v):.4g}..{np.max(v):.4g}]"
    return f"[{np.min(v)}..{np.max(v)}]"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OTSolution:
    """Solution of an entropic OT problem.

    Attributes:
        f: ``(n,)`` dual potential (absorbs ``epsilon * log a``). Balanced
            potentials are in the gauge ``<a, f> = <b, g>``.
        g: ``(m,)`` dual potential.
        geom: the geometry of the problem.
        a: ``(n,)`` source weights.
        b: ``(m,)`` target weights.
        epsilon: the entropic regularisation.
        tau_a: ``rho_a / (rho_a + epsilon)``; 1 is a hard marginal constraint.
        tau_b: same for ``b``.
        status: a `Status` code.
        n_iter: iterations run.
        marginal_error: L1 norm of the optimality residual (both marginals);
            for a balanced problem, ``|P 1 - a|_1 + |P^T 1 - b|_1``.
        errors: ``marginal_error`` after each block of ``check_every`` iterations
            (Sinkhorn checks every iteration of its first block and stops there as
            soon as it converges: ``errors[0]`` is then the error at ``n_iter``);
            ``-1`` where not computed. At most ``MAX_HISTORY`` (4096) entries: with
            more blocks, each entry is the last check of ``stride`` consecutive
            blocks (`otlab.solvers.sinkhorn.MAX_HISTORY`).
    """

    f: Array
    g: Array
    geom: Any
    a: Array
    b: Array
    epsilon: Array
    tau_a: Array
    tau_b: Array
    status: Array
    n_iter: Array
    marginal_error: Array
    errors: Array

    def __repr__(self) -> str:
        """A summary (shapes, epsilon, status, iterations, error), not the arrays."""
        n, batch = self.f.shape[-1], self.f.shape[:-1]
        m = self.g.shape[-1]
        status = self.status
        if not isinstance(status, jax.core.Tracer):
            names = np.atleast_1d(Status.name(status))
            uniq, counts = np.unique(names, return_counts=True)
            status = names[0] if not batch else ", ".join(
                f"{u} x{c}" for u, c in zip(uniq, counts, strict=True)
            )
        else:
            status = _summary(status)
        head = f"batch={batch}, " if batch else ""
        return (
            f"OTSolution({head}n={n}, m={m}, dtype={self.f.dtype}, "
            f"epsilon={_summary(self.epsilon)}, status={status}, n_iter={_summary(self.n_iter)}, "
            f"marginal_error={_summary(self.marginal_error)}, geom={type(self.geom).__name__})"
        )

    @property
    def converged(self) -> Array:
        """``status == SUCCESS`` (never true with non-finite potentials)."""
        return self.status == Status.SUCCESS

    def _valid(self, value: Array) -> Array:
        """``value``, or NaN where the status is ``INFEASIBLE`` or ``NONFINITE``."""
        bad = (self.status == Status.INFEASIBLE) | (self.status == Status.NONFINITE)
        return jnp.where(bad, jnp.asarray(jnp.nan, value.dtype), value)

    @_per_problem
    def plan(self) -> Array:
        """The dense ``(n, m)`` plan ``P``. Memory ``n * m``: prefer `apply`."""
        return self._valid(self.geom.plan(self.f, self.g, self.epsilon))

    @_per_problem
    def apply(self, v: Array, axis: int = 1) -> Array:
        """Multiply by the plan without building it.

        Args:
            v: ``(m,)`` / ``(m, k)`` for ``axis=1`` or ``(n,)`` / ``(n, k)`` for ``axis=0``.
            axis: the axis of ``P`` summed over: ``1`` gives ``P v``, ``0`` gives ``P^T v``.
        """
        op = self.geom.plan_operator(self.f, self.g, self.epsilon)
        if axis == 1:
            return self._valid(op.matvec(v))
        if axis == 0:
            return self._valid(op.rmatvec(v))
        raise ValueError(f"`axis` must be 0 or 1, got {axis}.")

    @_per_problem
    def marginals(self) -> tuple[Array, Array]:
        """``(P 1, P^T 1)`` from one log-sum-exp pass each."""
        return (
            jnp.exp(self.geom.lse(self.f, self.g, self.epsilon, axis=1)),
            jnp.exp(self.geom.lse(self.f, self.g, self.epsilon, axis=0)),
        )

    def transport(self, x: Array) -> Array:
        """Entropic map of points ``x`` (shape ``(k, d)``, or ``(d,)`` for one point,
        returned as ``(d,)``) into the target cloud.

        Needs a `PointCloud` geometry. For the source points themselves
        this is the barycentric projection ``P y / (P 1)``.
        """
        if not hasattr(self.geom, "transport"):
            raise ValueError("`transport` needs a PointCloud geometry (points and a cost).")
        return self._transport(x)

    @_per_problem
    def _transport(self, x: Array) -> Array:
        return self._valid(self.geom.transport(self.g, self.epsilon, x))

    @property
    @_per_problem
    def cost(self) -> Array:
        """Transport cost of the plan, ``<C, P>``."""
        return self._valid(self.geom.plan_cost(self.f, self.g, self.epsilon))

    @property
    @_per_problem
    def reg_cost(self) -> Array:
        """The entropic objective ``<C,P> + eps KL(P|ab^T) + rho_a KL(P1|a) + rho_b KL(P^T1|b)``.

        Evaluated by duality at ``(f, g)``. For balanced problems this is ott-jax's
        ``reg_ot_cost``; for unbalanced ones otlab solves the problem above (entropy
        relative to ``a b^T``, as POT's ``sinkhorn_unbalanced``), which ott-jax 0.6
        does not: its unbalanced plans differ.
        """
        mass = jnp.sum(jnp.exp(self.geom.lse(self.f, self.g, self.epsilon, axis=1)))
        return self._valid(
            _dual.dual_objective(
                self.f, self.g, self.a, self.b, self.epsilon, self.tau_a, self.tau_b, mass
            )
        )
