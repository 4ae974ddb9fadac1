"""Entropic OT solvers: each module is one algorithm returning an ``OTSolution``."""

from otlab.solvers.sinkhorn import sinkhorn, sinkhorn_divergence

__all__ = ["sinkhorn", "sinkhorn_divergence"]
