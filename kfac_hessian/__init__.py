"""kfac_hessian: layer-wise Hessians of neural networks.

Kronecker path: ``compute_kfac`` gathers every layer's curvature block in one streamed pass — ``G ⊗ A`` for
Kronecker layers (``KroneckerBlock``), exact blocks for normalization layers and free parameters (``DenseBlocks``);
which block a module gets is decided by the layer-kind registry (``kfac_hessian.layers``; ``layers.register`` adds
a kind). ``block.eig()`` gives every eigenvalue and the top eigenvectors without forming the block.
Exact path: ``layer_operator`` applies the true block; ``lanczos``, ``slq_density`` and ``hutchinson_trace``
measure it. Built on them: ``analyses`` (overlap, low rank, outliers, ``SpectrumTracker``, back-matching local
Hessians), ``bounds`` (PAC-Bayes in the Kronecker eigenbasis), ``optim`` (``ScaleAmendedSGD``).
Conventions: ``docs/conventions.md``.
"""

from . import analyses, bounds, layers, optim
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
from .data import sequence_logits
from .blocks import (BlockEigen, CurvatureBlock, DenseBlocks, DenseBlocksEigen, EKFACBlock, EKFACEigen,
                     KroneckerBlock, KroneckerEigen)
from .bounds import pac_bayes_bound
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
from .factors import KFAC, compute_ekfac, compute_kfac, compute_kronecker_fit, input_second_moments
from .layout import BlockLayout
from .spectra import SpectralDensity

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "BlockEigen",
    "BlockLayout",
    "CurvatureBlock",
    "CurvatureOperator",
    "DenseBlocks",
    "DenseBlocksEigen",
    "EKFACBlock",
    "EKFACEigen",
    "KroneckerBlock",
    "KroneckerEigen",
    "LanczosResult",
    "SLQDensity",
    "SpectralDensity",
    "SpectrumTracker",
    "TraceEstimate",
    "ValidationReport",
    "analyses",
    "back_matching_hessians",
    "bounds",
    "compare",
    "compute_ekfac",
    "compute_kfac",
    "compute_kronecker_fit",
    "count_outliers",
    "eigenspace_overlap",
    "hutchinson_trace",
    "input_second_moments",
    "kronecker_overlap",
    "lanczos",
    "layer_operator",
    "layers",
    "low_rank_structure",
    "optim",
    "overlap_by_layer",
    "pac_bayes_bound",
    "sequence_logits",
    "slq_density",
]
