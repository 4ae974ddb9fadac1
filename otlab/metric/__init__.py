"""Learned Riemannian metric tensors (Scarvelis & Solomon, 2023).

A population observed only as snapshots moves along paths that are short under an
unknown metric ``G(x)``; `fit` learns ``G`` as a `MetricField` from the snapshots,
and `otlab.geodesic` interpolates along the learned geometry. Closed-form metrics
(`Constant`, `PoincareHalfPlane`, `FromCallable`) serve for tests and users. Every
metric is usable wherever otlab takes one: `otlab.costs.Riemannian` (hence every
solver), `otlab.geodesic.shortest_path`, `otlab.geodesic.interpolate`.

Example:
    >>> import jax.numpy as jnp
    >>> from otlab import metric
    >>> metric.Constant(jnp.eye(3)).dim
    3
"""

from otlab.metric.fit import FitResult, fit
from otlab.metric.tensors import (
    Constant,
    FromCallable,
    Learned,
    Metric,
    MetricField,
    PoincareHalfPlane,
)

__all__ = [
    "Constant",
    "FitResult",
    "FromCallable",
    "Learned",
    "Metric",
    "MetricField",
    "PoincareHalfPlane",
    "fit",
]
