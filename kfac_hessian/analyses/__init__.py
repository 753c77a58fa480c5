"""Analyses built on the two paths: eigenspace overlap, low-rank structure, outliers, validation report."""

from .low_rank import LowRankStructure, low_rank_structure
from .outliers import count_outliers
from .overlap import eigenspace_overlap, kronecker_overlap, overlap_by_layer

__all__ = [
    "LowRankStructure",
    "count_outliers",
    "eigenspace_overlap",
    "kronecker_overlap",
    "low_rank_structure",
    "overlap_by_layer",
]
