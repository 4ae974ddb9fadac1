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

__all__ = ["OTSolution", "Status", "warn_if_not_converged"]

Array = jax.Array

# A solver stops when its own log-domain check of the answer it will return reads
# ``<= STOP_FRACTION * tol`` (`stop_tol`); `build` then decides the status on a fresh
# evaluation of the same formula, ``<= tol``. The two are compiled in different fusion
# contexts, so in float32 they differ by rounding (measured: 1.6 % of ``tol`` on a 1-D
# problem at eps = 1e-2, where a loop stopped at 0.99 tol and `build` read 1.016 tol:
# MAX_ITER after a converged run). The margin makes that disagreement need a rounding
# error of 10 % of ``tol``; it costs at most one more check block.
STOP_FRACTION = 0.9


def stop_tol(tol):
    """The threshold a solver's in-loop convergence check uses for a requested ``tol``
    (see `STOP_FRACTION`)."""
    return STOP_FRACTION * tol


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
            ``-1`` where not computed. The last computed entry is
            ``marginal_error`` itself (the final re-evaluation). At most ``MAX_HISTORY`` (4096)
            entries: with more blocks, each entry is the last check of ``stride``
            consecutive blocks (`otlab.solvers.sinkhorn.MAX_HISTORY`).
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
        """``status == SUCCESS``: the returned ``(f, g)``, re-evaluated in the log
        domain, meet ``tol`` (never true with non-finite potentials).

        Warning:
            Gradients of a solve that has not converged are not gradients of the
            problem. Implicit differentiation assumes the optimality condition
            holds; away from it the linear solve amplifies the residual (a
            ``MAX_ITER`` solve at small ``epsilon`` gave ``|grad x|`` of 80 where
            the converged value is 0.37). Check ``converged`` (or ``status``)
            before using a gradient, or call `warn_if_not_converged` inside a
            training step; `otlab.sinkhorn_divergence` returns NaN in that case.
        """
        return self.status == Status.SUCCESS

    def _valid(self, value: Array) -> Array:
        """``value``, or NaN where the status is ``INFEASIBLE`` or ``NONFINITE``."""
        bad = (self.status == Status.INFEASIBLE) | (self.status == Status.NONFINITE)
        return jnp.where(bad, jnp.asarray(jnp.nan, value.dtype), value)

    @_per_problem
    def plan(self) -> Array:
        """The dense ``(n, m)`` plan ``P``. Memory ``n * m``: prefer `apply`."""
        return _plan(self)

    @_per_problem
    def apply(self, v: Array, axis: int = 1) -> Array:
        """Multiply by the plan without building it.

        Args:
            v: ``(m,)`` / ``(m, k)`` for ``axis=1`` or ``(n,)`` / ``(n, k)`` for ``axis=0``.
            axis: the axis of ``P`` summed over: ``1`` gives ``P v``, ``0`` gives ``P^T v``.
        """
        if axis not in (0, 1):
            raise ValueError(f"`axis` must be 0 or 1, got {axis}.")
        return _apply(self, v, axis)


    @_per_problem
    def marginals(self) -> tuple[Array, Array]:
        """``(P 1, P^T 1)`` from one log-sum-exp pass each."""
        return _marginals(self)

    def transport(self, x: Array) -> Array:
        """Entropic map of points ``x`` (shape ``(k, d)``, or ``(d,)`` for one point,
        returned as ``(d,)``) into the target cloud.

        Needs a `PointCloud` geometry. For the source points themselves
        this is the barycentric projection ``P y / (P 1)``.
        """
        if not hasattr(self.geom, "transport"):
            raise ValueError("`transport` needs a PointCloud geometry (points and a cost).")
        return _per_problem(_transport)(self, x)  # checked above, outside the vmap

    @property
    @_per_problem
    def cost(self) -> Array:
        """Transport cost of the plan, ``<C, P>``."""
        return _cost(self)

    @property
    @_per_problem
    def reg_cost(self) -> Array:
        """The entropic objective ``<C,P> + eps KL(P|ab^T) + rho_a KL(P1|a) + rho_b KL(P^T1|b)``.

        Evaluated by duality at ``(f, g)``. For balanced problems this is ott-jax's
        ``reg_ot_cost``; for unbalanced ones otlab solves the problem above (entropy
        relative to ``a b^T``, as POT's ``sinkhorn_unbalanced``), which ott-jax 0.6
        does not: its unbalanced plans differ.

        Large epsilon (balanced problems): the dual's ``eps (sum a sum b - sum P)``
        and ``f - eps log a`` cancel, with a rounding error of about ``eps`` times
        the machine epsilon (``reg_cost`` 3836 instead of 5.69 at ``eps = 1e10`` in
        float32). The primal value ``<C, P> + eps KL(P | a b^T)``, its KL summed
        entry by entry and capped by the value ``<C, a b^T>`` of the product plan
        (an upper bound of the optimum), is used instead whenever that rounding
        exceeds the primal's own first-order error (``marginal_error`` times the
        cost scale): it tends to ``<C, a b^T>`` as ``eps -> inf``. A ``lax.cond``:
        one pass either way (both under ``vmap``).
        """
        return _reg_cost(self)


# Derived values are module-level jitted functions: an eager call compiles once per
# signature. (A ``lax.cond`` or ``lax.map`` on fresh closures, called eagerly, would
# compile a new XLA program on every call, and every loaded CPU executable keeps its
# memory mappings: thousands of eager calls exhausted ``vm.max_map_count`` and
# crashed XLA. tests/test_solution_compiles.py checks that repeated calls do not
# compile.)


@jax.jit
def _plan(sol: OTSolution) -> Array:
    return sol._valid(sol.geom.plan(sol.f, sol.g, sol.epsilon))


@functools.partial(jax.jit, static_argnums=2)
def _apply(sol: OTSolution, v: Array, axis: int) -> Array:
    op = sol.geom.plan_operator(sol.f, sol.g, sol.epsilon)
    return sol._valid(op.matvec(v) if axis == 1 else op.rmatvec(v))


@jax.jit
def _marginals(sol: OTSolution) -> tuple[Array, Array]:
    return (
        jnp.exp(sol.geom.lse(sol.f, sol.g, sol.epsilon, axis=1)),
        jnp.exp(sol.geom.lse(sol.f, sol.g, sol.epsilon, axis=0)),
    )


@jax.jit
def _transport(sol: OTSolution, x: Array) -> Array:
    return sol._valid(sol.geom.transport(sol.g, sol.epsilon, x))


@jax.jit
def _cost(sol: OTSolution) -> Array:
    return sol._valid(sol.geom.plan_cost(sol.f, sol.g, sol.epsilon))


def _dual_value(sol: OTSolution, mass: Array | None = None) -> Array:
    """The dual form; ``mass``, the plan's total mass, costs a pass when not given."""
    eps = sol.epsilon
    if mass is None:
        mass = jnp.sum(jnp.exp(sol.geom.lse(sol.f, sol.g, eps, axis=1)))
    return _dual.dual_objective(sol.f, sol.g, sol.a, sol.b, eps, sol.tau_a, sol.tau_b, mass)


def _primal_value(sol: OTSolution) -> Array:
    eps = sol.epsilon
    log_a, log_b = _dual.safe_log(sol.a), _dual.safe_log(sol.b)
    cp, kl, cab = sol.geom.primal_terms(sol.f, sol.g, eps, log_a, log_b)
    return jnp.minimum(cp + eps * kl, cab)


def _use_primal(self: OTSolution) -> Array:
    """Whether `OTSolution.reg_cost` takes the primal form (where the dual's rounding
    would dominate its error; balanced problems only)."""
    eps, a, b = self.epsilon, self.a, self.b
    log_a, log_b = _dual.safe_log(a), _dual.safe_log(b)
    # The dual's rounding ~ eps * ulp * (1 + |log a| + |log b|) * mass, against the
    # primal's first-order error ~ marginal_error * cost scale; the scale (|h|, the
    # unabsorbed potentials, bound the costs along the plan) is only an estimate.
    # (Four plain maxima: stacking a side's two into one reduction made a concatenate
    # kernel that compiled to more code than the extra reduction; the sides are never
    # concatenated, which a sharded geometry would gather.) 2 max(|log a|, |log b|)
    # bounds |log a| + |log b|.
    def side(w, log_w, pot):
        return (jnp.max(jnp.where(w > 0, jnp.abs(log_w), 0.0)),
                jnp.max(jnp.where(w > 0, jnp.abs(pot - eps * log_w), 0.0)))

    (la, sa), (lb, sb) = side(a, log_a, self.f), side(b, log_b, self.g)
    logs, scale = jnp.maximum(la, lb), jnp.maximum(sa, sb)
    ulp = jnp.finfo(self.f.dtype).eps
    dual_rounding = eps * ulp * (1.0 + 2.0 * logs)
    primal_error = (self.marginal_error + ulp) * (scale + ulp) / jnp.sum(a)
    use = (dual_rounding > primal_error) & (_dual.is_balanced(self.tau_a, self.tau_b) > 0)
    return jax.lax.stop_gradient(use)


def _value(sol: OTSolution, mass: Array | None = None) -> Array:
    """`OTSolution.reg_cost`: the primal or the dual form (one pass either way; the
    dual's is none when the plan's ``mass`` is given)."""
    dual = functools.partial(_dual_value, mass=mass)
    return sol._valid(jax.lax.cond(_use_primal(sol), _primal_value, dual, sol))


@jax.jit
def _reg_cost(self: OTSolution) -> Array:
    return _value(self)


def build(
    problem: _dual.Problem,
    f: Array,
    g: Array,
    status: Array,
    n_iter: Array,
    errors: Array,
    tol: float,
    *,
    with_value: bool = False,
) -> OTSolution | tuple[OTSolution, Array]:
    """The `OTSolution` of a solver's returned potentials: the one place where every
    solver's answer is finished and its status decided.

    `otlab._dual.complete` sets the potentials at zero-weight points to their
    c-transforms and re-evaluates the marginal error of the returned ``(f, g)`` in
    the log domain (two passes). ``SUCCESS`` then means exactly that this
    re-evaluated error is ``<= tol``: a solver's ``SUCCESS`` whose answer fails
    the check becomes ``MAX_ITER``, a ``MAX_ITER`` whose answer passes it becomes
    ``SUCCESS``; ``NONFINITE`` and ``INFEASIBLE`` are kept, and non-finite
    potentials are ``NONFINITE`` unless the problem is ``INFEASIBLE``.

    Args:
        problem: the `otlab._dual.Problem` solved.
        f: ``(n,)`` potentials from the solver (differentiable: `otlab.implicit`).
        g: ``(m,)`` potentials.
        status: the solver's `Status` code.
        n_iter: iterations run.
        errors: the solver's error history.
        tol: the tolerance the solver was asked for (static).
        with_value: static; also return `OTSolution.reg_cost` (not differentiated):
            its dual form then needs no pass of its own (the plan's mass comes from
            `otlab._dual.complete`'s passes), only the primal form, where it is used.
    """
    p = problem
    f, g, err, mass = _dual.complete(p, f, g)
    checked = jnp.where(err <= tol, Status.SUCCESS, Status.MAX_ITER)
    status = jnp.where((status == Status.SUCCESS) | (status == Status.MAX_ITER), checked, status)
    finite = ~jnp.isnan(err)  # the potentials are finite (see `otlab._dual.complete`)
    # an infeasible problem (e.g. epsilon = 0 under jit) stays INFEASIBLE whatever its potentials
    status = jnp.where(finite | (status == Status.INFEASIBLE), status, Status.NONFINITE)
    status = status.astype(jnp.int32)
    # the history ends with the error of the returned answer
    last = jnp.arange(errors.shape[-1]) == jnp.sum(errors >= 0) - 1
    errors = jnp.where(last, jax.lax.stop_gradient(err).astype(errors.dtype), errors)
    sol = OTSolution(
        f, g, p.geom, p.a, p.b, p.epsilon, p.tau_a, p.tau_b, status, n_iter,
        jax.lax.stop_gradient(err), errors,
    )
    if not with_value:
        return sol
    # The dual form from the mass (O(n + m)); the primal form's pass only where it is
    # used (a `lax.cond`: `sinkhorn_divergence` at 300 x 400, float32, warm: value
    # 5.28 -> 3.95 ms, value_and_grad 6.30 -> 5.31 ms; its compile time grows by 0.04 s
    # against a `jnp.where` of both forms, which saved nothing warm)
    return sol, jax.lax.stop_gradient(_value(sol, mass))


def _warn(status, what):
    import warnings

    code = int(status)
    if code == Status.SUCCESS:  # under vmap the cond below runs both branches
        return
    warnings.warn(
        f"{what} did not converge: status {Status.NAMES[code]} ({code}); its values and "
        "gradients do not solve the problem (see OTSolution.converged).",
        RuntimeWarning,
        stacklevel=2,
    )


def warn_if_not_converged(sol_or_status: OTSolution | Array, what: str = "OT solve"):
    """Emit a ``RuntimeWarning`` when a solve has not converged; works under ``jit``.

    A ``jax.debug.callback`` behind a ``lax.cond``: nothing is sent to the host
    for a converged solve (under ``vmap`` the callback runs for every problem and
    warns for the failed ones). Returns its argument, so it can wrap a solution or
    a status inline.

    Args:
        sol_or_status: an `OTSolution` or an integer `Status` code (array).
        what: the name used in the message.

    Example:
        >>> import jax, warnings, otlab
        >>> x = jax.random.normal(jax.random.key(0), (8, 2))
        >>> @jax.jit
        ... def loss(x):
        ...     sol = otlab.sinkhorn(otlab.PointCloud(x, x + 1.0), epsilon=1e-3, max_iter=20)
        ...     return otlab.warn_if_not_converged(sol, "sinkhorn").reg_cost
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = jax.block_until_ready(loss(x))
        ...     jax.effects_barrier()
        >>> "MAX_ITER" in str(caught[0].message)
        True
    """
    status = sol_or_status.status if isinstance(sol_or_status, OTSolution) else sol_or_status
    status = jnp.asarray(status)

    def one(code):
        jax.lax.cond(
            code != Status.SUCCESS,
            lambda c: jax.debug.callback(_warn, c, what),
            lambda c: None,
            code,
        )

    if status.ndim == 0:
        one(status)
    else:
        jax.lax.map(one, status.ravel())
    return sol_or_status
