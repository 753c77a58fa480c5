"""Curvature blocks: one protocol (``CurvatureBlock``/``BlockEigen``, both ``LinearOperator``s), four structures —
``KroneckerBlock`` (``G ⊗ A`` per group; a wide factor may be kept as its rows, ``RowFactor``), ``DenseBlocks``
(exact dense sub-blocks on a partition of the parameters), ``EKFACBlock`` (the Kronecker eigenbasis with corrected
eigenvalues) and ``BlockDiagonal`` (named Kronecker parts of one module: recurrent layers, cross-attention) — and the
eigendecompositions of many blocks in one place (``base.eig_blocks``, package-internal: ``KFAC.eig`` is the public
call)."""

from .base import BlockEigen, CurvatureBlock
from .block_diagonal import BlockDiagonal, BlockDiagonalEigen
from .dense import DenseBlocks, DenseBlocksEigen
from .ekfac import EKFACBlock, EKFACEigen
from .kronecker import KroneckerBlock, KroneckerEigen, KroneckerPairs
from .row_factor import RowFactor

__all__ = ["BlockDiagonal", "BlockDiagonalEigen", "BlockEigen", "CurvatureBlock", "DenseBlocks", "DenseBlocksEigen",
           "EKFACBlock", "EKFACEigen", "KroneckerBlock", "KroneckerEigen", "KroneckerPairs",
           "RowFactor"]
