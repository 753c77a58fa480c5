"""kfac_hessian: layer-wise Hessians of neural networks.

Kronecker path: ``compute_kfac`` gathers ``A`` and ``G`` per layer (``G ⊗ A`` ≈ the layer's Hessian block);
``KroneckerFactor.eig`` gives every eigenvalue and top eigenvectors without forming the product.
Exact path: ``layer_operator`` applies the true block; ``lanczos``, ``slq_density`` and ``hutchinson_trace``
measure it. Built on them: ``analyses`` (overlap, low rank, outliers, ``SpectrumTracker``, back-matching local
Hessians), ``bounds`` (PAC-Bayes in the Kronecker eigenbasis), ``optim`` (``ScaleAmendedSGD``).
Conventions: ``docs/conventions.md``.
"""

from . import analyses, bounds, optim
from .analyses import (
    SpectrumTracker,
    back_matching_hessians,
    count_outliers,
    eigenspace_overlap,
    kronecker_overlap,
    low_rank_structure,
    overlap_by_layer,
)
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
from .bounds import pac_bayes_bound
from .factors import KFAC, KroneckerFactor, compute_kfac, input_second_moments
from .layout import BlockLayout
from .spectra import KroneckerEigen, SpectralDensity

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "analyses",
    "bounds",
    "optim",
    "SpectrumTracker",
    "back_matching_hessians",
    "input_second_moments",
    "pac_bayes_bound",
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
