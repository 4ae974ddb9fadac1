"""Flax layers built on otlab's solvers.

`otlab.nn.routing`: mixture-of-experts routing by cardinality-constrained OT
(at most ``capacity`` tokens per expert, or at most ``k`` experts per token).
"""

from otlab.nn.routing import MoE, ot_route, topk_softmax_route, train_routing_demo

__all__ = ["MoE", "ot_route", "topk_softmax_route", "train_routing_demo"]
