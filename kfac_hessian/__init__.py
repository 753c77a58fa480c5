"""kfac_hessian: layer-wise Hessians of neural networks. Factors stage: ``compute_kfac`` gathers every layer's curvature
block in one streamed pass — ``G ⊗ A`` for Kronecker layers, exact blocks for normalization layers and free parameters
— as a ``KFAC`` mapping of blocks; which block a module gets is decided by the layer-kind registry
(``kfac_hessian.layers``); ``compute_ekfac`` and ``compute_kronecker_fit`` refine the Kronecker blocks;
``PassOptions`` says how a pass runs; ``plan`` says what it will cost before it runs (``PlanExceedsBudget`` when over
budget). ``block.eig()`` gives every eigenvalue and the top eigenvectors without forming the block. Exact path:
``layer_operator`` applies the true block (``finite_difference_operator`` estimates it where torch cannot
differentiate twice: a model sharded with FSDP); ``lanczos``, ``slq_density`` and ``hutchinson_trace`` measure it;
``model_spectrum`` gives the whole model's top-k and density in one call. Every eigen result (``EigenResult``: block
eigen-structures, Lanczos results, ``eigen_pairs`` of a dense matrix) has descending ``eigenvalues``, ``topk(k)`` and
``num_params``, and every analysis takes any of them. Blocks, their eigen-structures, Lanczos results and exact
operators are all ``LinearOperator``s. Built on them: ``compare`` (approximation vs exact), ``analyses`` (overlap, low
rank, outliers, ``SpectrumTracker``, back-matching local Hessians), ``bounds`` (PAC-Bayes in the Kronecker
eigenbasis), ``optim`` (``ScaleAmendedSGD``). The public names are listed in docs/api.md; the conventions in
docs/conventions.md.
"""

from . import analyses, bounds, layers, optim
from .analyses import (
    SpectrumTracker,
    back_matching_hessians,
    compare,
    count_outliers,
    eigenspace_overlap,
    find_outliers,
    low_rank_structure,
    overlap_by_layer,
)
from .blocks import BlockEigen, CurvatureBlock
from .bounds import pac_bayes_bound
from .data import sequence_logits
from .eigen import EigenResult, eigen_pairs
from .exact import finite_difference_operator, hutchinson_trace, lanczos, layer_operator, model_spectrum, slq_density
from .factors import KFAC, PassOptions, PlanExceedsBudget, compute_ekfac, compute_kfac, compute_kronecker_fit, plan
from .linear_operator import LinearOperator

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "BlockEigen",
    "CurvatureBlock",
    "EigenResult",
    "LinearOperator",
    "PassOptions",
    "PlanExceedsBudget",
    "SpectrumTracker",
    "analyses",
    "back_matching_hessians",
    "bounds",
    "compare",
    "compute_ekfac",
    "compute_kfac",
    "compute_kronecker_fit",
    "count_outliers",
    "eigen_pairs",
    "eigenspace_overlap",
    "find_outliers",
    "finite_difference_operator",
    "hutchinson_trace",
    "lanczos",
    "layer_operator",
    "layers",
    "low_rank_structure",
    "model_spectrum",
    "optim",
    "overlap_by_layer",
    "pac_bayes_bound",
    "plan",
    "sequence_logits",
    "slq_density",
]
