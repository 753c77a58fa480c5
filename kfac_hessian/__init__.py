"""kfac_hessian: layer-wise Hessians of neural networks.

Factors stage: ``compute_kfac`` gathers every layer's curvature block in one streamed pass — ``G ⊗ A`` for Kronecker
layers, exact blocks for normalization layers and free parameters — as a ``KFAC`` mapping of blocks; which block a
module gets is decided by the layer-kind registry (``kfac_hessian.layers``); ``compute_ekfac`` and
``compute_kronecker_fit`` refine the Kronecker blocks; ``PassOptions`` says how a pass runs. ``block.eig()`` gives
every eigenvalue and the top eigenvectors without forming the block.
Exact path: ``layer_operator`` applies the true block; ``lanczos``, ``slq_density`` and ``hutchinson_trace``
measure it. Blocks, their eigen-structures, Lanczos results and exact operators are all ``LinearOperator``s.
Built on them: ``compare`` (approximation vs exact), ``analyses`` (overlap, low rank, outliers, ``SpectrumTracker``,
back-matching local Hessians), ``bounds`` (PAC-Bayes in the Kronecker eigenbasis), ``optim`` (``ScaleAmendedSGD``).
The public names are listed in docs/api.md; the conventions in docs/conventions.md.
"""

from . import analyses, bounds, layers, optim
from .analyses import (
    SpectrumTracker,
    back_matching_hessians,
    compare,
    count_outliers,
    eigenspace_overlap,
    low_rank_structure,
    overlap_by_layer,
)
from .blocks import BlockEigen, CurvatureBlock
from .bounds import pac_bayes_bound
from .data import sequence_logits
from .exact import hutchinson_trace, lanczos, layer_operator, slq_density
from .factors import KFAC, PassOptions, compute_ekfac, compute_kfac, compute_kronecker_fit
from .linear_operator import LinearOperator

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "BlockEigen",
    "CurvatureBlock",
    "LinearOperator",
    "PassOptions",
    "SpectrumTracker",
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
