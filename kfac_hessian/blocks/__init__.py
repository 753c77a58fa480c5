"""Curvature blocks: one protocol (``CurvatureBlock``/``BlockEigen``, both ``LinearOperator``s), three structures —
``KroneckerBlock`` (``G ⊗ A`` per group), ``DenseBlocks`` (exact dense sub-blocks on a partition of the parameters)
and ``EKFACBlock`` (the Kronecker eigenbasis with corrected eigenvalues) — and the eigendecompositions of many blocks
in one place (``base.eig_blocks``, package-internal: ``KFAC.eig`` is the public call)."""

from .base import BlockEigen, CurvatureBlock
from .dense import DenseBlocks, DenseBlocksEigen
from .ekfac import EKFACBlock, EKFACEigen
from .kronecker import KroneckerBlock, KroneckerEigen, KroneckerPairs

__all__ = ["BlockEigen", "CurvatureBlock", "DenseBlocks", "DenseBlocksEigen", "EKFACBlock", "EKFACEigen",
           "KroneckerBlock", "KroneckerEigen", "KroneckerPairs"]
