"""`otlab.nn`: capacity-limited MoE routing by cardinality-constrained OT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from otlab import nn as otnn


def test_capacity_and_experts_per_token_are_respected():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (48, 4))
    w = np.asarray(otnn.ot_route(logits, capacity=14))
    assert (w > 0).sum(0).max() <= 14  # exactly at most `capacity` tokens per expert
    assert w.min() >= 0
    np.testing.assert_allclose(w.sum(0), 12.0, rtol=0.05)  # balanced expert load
    w1 = np.asarray(otnn.ot_route(logits, k=1))
    assert (w1 > 0).sum(1).max() <= 1  # at most one expert per token
    with pytest.raises(ValueError, match="capacity"):
        otnn.ot_route(logits)


def test_router_gradient_is_finite_and_nonzero():
    logits = jax.random.normal(jax.random.key(1), (48, 4))
    target = jax.random.normal(jax.random.key(2), (48, 4))
    g = jax.grad(lambda z: jnp.sum(target * otnn.ot_route(z, capacity=14)))(logits)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_training_decreases_loss_and_balances_load_better_than_topk():
    ot = otnn.train_routing_demo("ot", steps=20)
    top = otnn.train_routing_demo("topk", steps=20)
    for r in (ot, top):
        assert r["losses"][-5:].mean() < 0.5 * r["losses"][:5].mean()
    assert ot["max_tokens"] <= 20  # capacity ceil(1.25 * 64 / 4)
    imbalance = lambda r: float(np.abs(r["load"] - 1).max())  # noqa: E731
    print(f"max |load - 1|: OT {imbalance(ot):.3f}, top-1 softmax {imbalance(top):.3f}")
    assert imbalance(ot) < 0.05 < imbalance(top)
