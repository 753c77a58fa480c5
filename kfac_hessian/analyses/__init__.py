"""Analyses built on the two paths: eigenspace overlap, low-rank structure, outliers, tracking, back-matching local Hessians, validation report."""

from .local_hessian import BackMatchingHessian, back_matching_hessians, condition_number
from .low_rank import LowRankStructure, low_rank_structure
from .outliers import count_outliers
from .overlap import eigenspace_overlap, kronecker_overlap, overlap_by_layer
from .tracking import SpectrumTracker, spectral_metrics

__all__ = [
    "BackMatchingHessian",
    "back_matching_hessians",
    "condition_number",
    "LowRankStructure",
    "SpectrumTracker",
    "count_outliers",
    "eigenspace_overlap",
    "kronecker_overlap",
    "low_rank_structure",
    "overlap_by_layer",
    "spectral_metrics",
]
