"""kfac_hessian: layer-wise Hessians of neural networks.

Kronecker path: ``compute_kfac`` gathers ``A`` and ``G`` per layer (``G ⊗ A`` ≈ the layer's Hessian block);
``KroneckerFactor.eig`` gives every eigenvalue and top eigenvectors without forming the product.
Exact path: ``layer_operator`` applies the true block; ``lanczos``, ``slq_density`` and ``hutchinson_trace``
measure it. Conventions: ``docs/conventions.md``.
"""

from . import analyses
from .analyses import count_outliers, eigenspace_overlap, kronecker_overlap, low_rank_structure, overlap_by_layer
from .analyses.report import ValidationReport, compare
from .exact import (
    CurvatureOperator,
    LanczosResult,
    SLQDensity,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    layer_operator,
    slq_density,
)
from .factors import KFAC, KroneckerFactor, compute_kfac
from .layout import BlockLayout
from .spectra import KroneckerEigen, SpectralDensity

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "analyses",
    "BlockLayout",
    "CurvatureOperator",
    "KroneckerEigen",
    "KroneckerFactor",
    "LanczosResult",
    "SLQDensity",
    "SpectralDensity",
    "TraceEstimate",
    "ValidationReport",
    "compare",
    "compute_kfac",
    "count_outliers",
    "eigenspace_overlap",
    "kronecker_overlap",
    "low_rank_structure",
    "overlap_by_layer",
    "hutchinson_trace",
    "lanczos",
    "layer_operator",
    "slq_density",
]
