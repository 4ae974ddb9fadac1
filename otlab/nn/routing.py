"""Capacity-limited mixture-of-experts routing by cardinality-constrained OT
(Liu, Puigcerver & Blondel, ICLR 2023, section 5).

Tokens are routed to experts by a transport plan between the tokens (mass 1 each)
and the experts (mass ``num_tokens / num_experts`` each) with cost ``-logits``:
`ot_route` solves `otlab.cardinality_constrained` with at most ``capacity``
nonzeros per expert column (``axis=0``), so no expert ever receives more than
``capacity`` tokens, and the expert marginal balances the load without an auxiliary
loss. The "at most ``k`` experts per token" variant constrains the rows instead
(``axis=1``). The plan is differentiable in the logits (implicit differentiation), so
the router trains end to end.

Example:
    >>> import jax, otlab.nn
    >>> logits = jax.random.normal(jax.random.key(0), (32, 4))
    >>> w = otlab.nn.ot_route(logits, capacity=10)
    >>> int((w > 0).sum(0).max()) <= 10
    True
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from otlab.solvers.cardinality import cardinality_constrained

__all__ = ["MoE", "ot_route", "topk_softmax_route", "train_routing_demo"]

Array = jax.Array


def ot_route(
    logits: Array, *, capacity: int | None = None, k: int | None = None, gamma: float = 1.0
) -> Array:
    """Combine weights ``(tokens, experts)``: the cardinality-constrained plan.

    Args:
        logits: ``(T, E)`` router scores (cost ``-logits``).
        capacity: at most this many tokens per expert (columns); exclusive with ``k``.
        k: at most this many experts per token (rows).
        gamma: quadratic regularisation (larger: smoother, denser within the limit).

    Returns:
        The ``(T, E)`` plan: token rows carry mass about 1, expert columns about
        ``T / E``; exactly at most ``capacity`` nonzeros per column (or ``k`` per row).
    """
    if (capacity is None) == (k is None):
        raise ValueError("give exactly one of `capacity` (per expert) or `k` (per token).")
    t, e = logits.shape
    a = jnp.ones((t,), logits.dtype)
    b = jnp.full((e,), t / e, logits.dtype)
    # L-BFGS, not the solver's default Newton path: on these small float32 problems,
    # solved at every training step, tests/test_nn_routing.py ran twice as long with
    # Newton (mostly compilation)
    if capacity is not None:
        sol = cardinality_constrained(
            -logits, a, b, k=capacity, gamma=gamma, axis=0, method="lbfgs"
        )
    else:
        sol = cardinality_constrained(-logits, a, b, k=k, gamma=gamma, axis=1, method="lbfgs")
    return sol.plan()


def topk_softmax_route(logits: Array, k: int = 1) -> Array:
    """The usual router: softmax weights kept on each token's top-``k`` experts."""
    p = jax.nn.softmax(logits, axis=-1)
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, p, 0.0)


class MoE(nn.Module):
    """A mixture of ``num_experts`` two-layer MLP experts with a linear router.

    Attributes:
        num_experts: experts.
        features: output size.
        hidden: hidden size of each expert.
        capacity: OT routing with at most ``capacity`` tokens per expert.
        k: OT routing with at most ``k`` experts per token (if ``capacity`` is None).
        router: ``"ot"`` (cardinality-constrained OT) or ``"topk"`` (top-``k``
            softmax, no auxiliary loss: the baseline).
        gamma: the OT router's regularisation.
    """

    num_experts: int
    features: int
    hidden: int = 32
    capacity: int | None = None
    k: int = 1
    router: str = "ot"
    gamma: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        """``x`` of shape ``(T, d)`` -> ``(outputs (T, features), weights (T, E))``."""
        logits = nn.Dense(self.num_experts, name="router")(x)
        if self.router == "ot":
            if self.capacity is not None:
                w = ot_route(logits, capacity=self.capacity, gamma=self.gamma)
            else:
                w = ot_route(logits, k=self.k, gamma=self.gamma)
        else:
            w = topk_softmax_route(logits, self.k)
        experts = nn.vmap(
            nn.Sequential,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=self.num_experts,
        )([nn.Dense(self.hidden), nn.relu, nn.Dense(self.features)])
        out = experts(x)  # (E, T, features): every expert on every token (small demo)
        return jnp.einsum("te,etf->tf", w, out), w


def _task(key, tokens: int, clusters: int = 4, dim: int = 2):
    """Tokens from ``clusters`` Gaussian blobs of unequal sizes, each with its own
    linear target map: an expert per blob is the natural solution."""
    kc, kx, kw = jax.random.split(key, 3)
    centers = 3.0 * jax.random.normal(jax.random.fold_in(jax.random.key(0), 1), (clusters, dim))
    maps = jax.random.normal(jax.random.fold_in(jax.random.key(0), 2), (clusters, dim, dim))
    probs = jnp.array([0.55, 0.25, 0.12, 0.08])[:clusters]
    c = jax.random.choice(kc, clusters, (tokens,), p=probs / probs.sum())
    x = centers[c] + 0.5 * jax.random.normal(kx, (tokens, dim))
    y = jnp.einsum("tij,tj->ti", maps[c], x)
    return x, y


def train_routing_demo(
    router: str = "ot", *, steps: int = 60, tokens: int = 64, num_experts: int = 4,
    capacity: int | None = None, k: int = 1, seed: int = 0, lr: float = 1e-2,
) -> dict:
    """Train a `MoE` on the small clustered regression task with optax (Adam).

    Returns ``dict(losses, load, max_tokens)``: the training losses, the mean load
    per expert over 8 held-out batches (mass routed, normalised to mean 1) and the
    largest number of tokens any expert received.
    """
    if capacity is None and router == "ot":
        capacity = int(np.ceil(1.25 * tokens / num_experts))
    model = MoE(num_experts, 2, capacity=capacity, k=k, router=router)
    key = jax.random.key(seed)
    x0, _ = _task(key, tokens)
    params = model.init(key, x0)
    opt = optax.adam(lr)
    state = opt.init(params)

    def loss_fn(params, x, y):
        out, _ = model.apply(params, x)
        return jnp.mean(jnp.sum((out - y) ** 2, -1))

    @jax.jit
    def step(params, state, key):
        x, y = _task(key, tokens)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, jax.random.fold_in(key, i + 1))
        losses.append(float(loss))

    @functools.partial(jax.jit)
    def evaluate(params, key):
        x, _ = _task(key, tokens)
        _, w = model.apply(params, x)
        return jnp.sum(w, 0), jnp.sum(w > 0, 0)

    loads, counts = [], []
    for i in range(8):
        load, count = evaluate(params, jax.random.fold_in(key, 10_000 + i))
        loads.append(np.asarray(load))
        counts.append(np.asarray(count))
    load = np.mean(loads, 0)
    return dict(
        losses=np.asarray(losses),
        load=load / load.mean(),
        max_tokens=int(np.max(counts)),
    )
