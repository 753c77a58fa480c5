"""What every block is with respect to its target curvature, in one vocabulary (``CurvatureBlock.status``).

The target is the GGN block for ``curvature="ggn"`` and ``"mc"`` (the Monte-Carlo Fisher estimates the GGN: they are
equal for the supported losses), the empirical Fisher block for ``"empirical"``.

* **exact** — a full block equal to its target (dense blocks from per-sample gradients with exact columns: one output
  position per sample, ``per_position=True``, or the empirical Fisher);
* **exact entries** — the entries a diagonal or per-feature block keeps are exact, the others are dropped;
* **estimate** — unbiased but random: every ``mc`` block, every block of ``column_signs`` combinations, and on
  outputs with several positions every block of the default ``position_signs`` columns (with the number of draws);
* **biased** — joint columns (``position_signs=0``) on outputs with several positions add cross-position products;
* **approximation** — Kronecker, EKFAC and fitted Kronecker blocks, with what they assume; an estimate or a biased
  one as well when their columns are.
"""

from __future__ import annotations

from ..blocks import BlockDiagonal, CurvatureBlock, DenseBlocks, EKFACBlock, KroneckerBlock
from .options import PassOptions

_TARGETS = {"ggn": "GGN", "mc": "GGN", "empirical": "empirical Fisher"}


def columns_status(options: PassOptions, positions: int) -> str:
    """How the pass's output columns relate to the target: ``""`` (exact), or what makes them an estimate or biased."""
    if options.curvature == "mc":
        draws = options.mc_samples
        return f"estimate: {draws} Monte-Carlo label draw{'s' if draws > 1 else ''} per sample"
    if options.column_signs:
        draws = options.column_signs
        return (f"estimate: {draws} random-sign combination{'s' if draws > 1 else ''} of the loss-Hessian columns per "
                f"sample{f' ({positions} positions)' if positions > 1 else ''}")
    if options.curvature == "empirical" or positions <= 1 or options.per_position:
        return ""
    draws = options.sign_draws
    if draws:
        plural = "s" if draws > 1 else ""
        return f"estimate: {draws} random-sign draw{plural} per output position ({positions} positions)"
    return f"biased: joint columns add cross-position products ({positions} positions)"


def label_blocks(blocks: dict[str, CurvatureBlock], options: PassOptions, positions: int,
                 approximation: str = "Kronecker factorization") -> None:
    """Set every block's ``status`` (module docstring); ``approximation`` names what a Kronecker block is."""
    target = _TARGETS[options.curvature]
    columns = columns_status(options, positions)
    for block in blocks.values():
        if isinstance(block, DenseBlocks):
            whole = block.blocks.shape[0] == 1
            if not columns:
                block.status = f"exact {target} block" if whole else f"exact entries of the {target} block"
            else:
                block.status = f"{target} block, {columns}"
        # an EKFAC block's structure says what it assumes; a block-diagonal's parts are Kronecker blocks
        elif isinstance(block, (KroneckerBlock, BlockDiagonal, EKFACBlock)):
            what = "" if isinstance(block, EKFACBlock) else f" ({approximation})"
            block.status = f"approximation of the {target} block{what}{'; ' + columns if columns else ''}"
