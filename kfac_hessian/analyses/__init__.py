"""Analyses built on the two paths: the validation report (``compare``), eigenspace overlap, low-rank structure,
outliers, tracking through training, back-matching local Hessians."""

from .local_hessian import BackMatchingHessian, back_matching_hessians, condition_number
from .low_rank import LowRankStructure, low_rank_structure
from .outliers import (
    MarchenkoPastur,
    NullComparison,
    OutlierResult,
    UnseenSpectrum,
    count_outliers,
    find_outliers,
    unseen_spectrum,
)
from .overlap import eigenspace_overlap, kronecker_overlap, overlap_by_layer
from .report import ValidationReport, compare
from .tracking import SpectrumTracker, spectral_metrics

__all__ = [
    "BackMatchingHessian",
    "LowRankStructure",
    "MarchenkoPastur",
    "NullComparison",
    "OutlierResult",
    "SpectrumTracker",
    "UnseenSpectrum",
    "ValidationReport",
    "back_matching_hessians",
    "compare",
    "condition_number",
    "count_outliers",
    "eigenspace_overlap",
    "find_outliers",
    "kronecker_overlap",
    "low_rank_structure",
    "overlap_by_layer",
    "spectral_metrics",
    "unseen_spectrum",
]
