"""otlab: optimal transport and metric learning in JAX.

Pure, jit-compiled functions: arrays -> Geometry -> solver -> OTSolution.
"""

from otlab import costs, geodesic, initializers, metric, sharding
from otlab.geometry import Geometry, PlanOperator, PointCloud, as_geometry, from_ott
from otlab.implicit import ImplicitDiff
from otlab.ragged import PaddedBatch, RaggedSolution, pad_batch, solve_ragged
from otlab.solution import OTSolution, Status, warn_if_not_converged
from otlab.solvers.cardinality import CardinalitySolution, cardinality_constrained
from otlab.solvers.progot import ProgOTSolution, progot
from otlab.solvers.sinkhorn import sinkhorn, sinkhorn_divergence
from otlab.solvers.sns import sns

__version__ = "0.1.0"

__all__ = [
    "Geometry",
    "ImplicitDiff",
    "OTSolution",
    "PlanOperator",
    "PointCloud",
    "Status",
    "as_geometry",
    "costs",
    "from_ott",
    "geodesic",
    "initializers",
    "metric",
    "sinkhorn",
    "sinkhorn_divergence",
    "sns",
    "warn_if_not_converged",
    "ProgOTSolution",
    "progot",
    "CardinalitySolution",
    "cardinality_constrained",
    "sharding",
    "PaddedBatch",
    "RaggedSolution",
    "pad_batch",
    "solve_ragged",
]
