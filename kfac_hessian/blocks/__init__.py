"""Curvature blocks: one protocol (``CurvatureBlock``/``BlockEigen``), three structures — ``KroneckerBlock``
(``G ⊗ A`` per group), ``DenseBlocks`` (exact dense sub-blocks on a partition of the parameters) and ``EKFACBlock``
(the Kronecker eigenbasis with corrected eigenvalues) — and the eigendecompositions of many blocks in one place
(``eig_blocks``)."""

from .base import DENSE_LIMIT, BlockEigen, CurvatureBlock
from .dense import DenseBlocks, DenseBlocksEigen
from .eig import eig_blocks
from .ekfac import EKFACBlock, EKFACEigen
from .kronecker import KroneckerBlock, KroneckerEigen, KroneckerPairs

BLOCK_TYPES: dict[str, type[CurvatureBlock]] = {cls.kind: cls for cls in (KroneckerBlock, DenseBlocks, EKFACBlock)}

__all__ = ["BLOCK_TYPES", "DENSE_LIMIT", "BlockEigen", "CurvatureBlock", "DenseBlocks", "DenseBlocksEigen", "EKFACBlock",
           "EKFACEigen", "KroneckerBlock", "KroneckerEigen", "KroneckerPairs", "eig_blocks"]
