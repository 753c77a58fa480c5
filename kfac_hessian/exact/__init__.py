"""The exact path: true curvature blocks by products, their extreme eigenpairs, densities and traces, and the
whole-model spectrum (top-k and density) in one call."""

from .finite_difference import FiniteDifferenceOperator, finite_difference_operator
from .lanczos import LanczosResult, lanczos
from .operators import CurvatureOperator, layer_operator
from .spectrum import ModelSpectrum, model_spectrum
from .stochastic import SLQDensity, TraceEstimate, hutchinson_trace, slq_density

__all__ = [
    "CurvatureOperator",
    "LanczosResult",
    "ModelSpectrum",
    "SLQDensity",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "layer_operator",
    "model_spectrum",
    "slq_density",
    "FiniteDifferenceOperator",
    "finite_difference_operator",
]
