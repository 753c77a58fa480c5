"""The exact path: true curvature blocks by products, their extreme eigenpairs, densities and traces."""

from .lanczos import LanczosResult, lanczos
from .operators import CurvatureOperator, layer_operator
from .stochastic import SLQDensity, TraceEstimate, hutchinson_trace, slq_density

__all__ = [
    "CurvatureOperator",
    "LanczosResult",
    "SLQDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "layer_operator",
    "slq_density",
]
