"""Curvature blocks: one protocol (``CurvatureBlock``/``BlockEigen``, both ``LinearOperator``s), three structures —
``KroneckerBlock`` (``G ⊗ A`` per group), ``DenseBlocks`` (exact dense sub-blocks on a partition of the parameters)
and ``EKFACBlock`` (the Kronecker eigenbasis with corrected eigenvalues) — and the eigendecompositions of many blocks
in one place (``eig_blocks``)."""

from .base import BlockEigen, CurvatureBlock, eig_blocks
from .dense import DenseBlocks, DenseBlocksEigen
from .ekfac import EKFACBlock, EKFACEigen
from .kronecker import KroneckerBlock, KroneckerEigen, KroneckerPairs

__all__ = ["BlockEigen", "CurvatureBlock", "DenseBlocks", "DenseBlocksEigen", "EKFACBlock", "EKFACEigen",
           "KroneckerBlock", "KroneckerEigen", "KroneckerPairs", "eig_blocks"]
