"""``KFAC`` files: plain tensors, numbers and strings, read back with ``torch.load(weights_only=True)``.

This module knows the file format only: ``save`` writes a result's fields and its blocks' states, ``load`` returns
them (the blocks rebuilt by the class their storage tag names); ``KFAC.save``/``KFAC.load`` are the public calls.
"""

from __future__ import annotations

import torch

from ..blocks import BlockDiagonal, CurvatureBlock, DenseBlocks, EKFACBlock, KroneckerBlock

SAVE_FORMAT = "kfac_hessian.KFAC/2"
_BLOCK_CLASSES: dict[str, type[CurvatureBlock]] = {
    cls.storage_tag: cls for cls in (KroneckerBlock, DenseBlocks, EKFACBlock, BlockDiagonal)}


def save(path, meta: dict, blocks: dict[str, CurvatureBlock]) -> None:
    torch.save({
        "format": SAVE_FORMAT,
        "meta": meta,
        # SAVE_FORMAT keys the block class's storage tag as "kind": another key would need a new format version
        "blocks": {name: {"kind": block.storage_tag, "status": block.status, **block.state()}
                   for name, block in blocks.items()},
    }, path)


def load(path, map_location: torch.device | str | None = None) -> tuple[dict, dict[str, CurvatureBlock]]:
    """``(meta, blocks)`` as ``save`` wrote them."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("kfac_hessian.KFAC/"):
        raise ValueError(f"{path} is not a file written by KFAC.save")
    if fmt != SAVE_FORMAT:
        raise ValueError(f"{path} has format {fmt!r}; this version of kfac_hessian reads {SAVE_FORMAT!r}")
    blocks = {}
    for name, entry in state["blocks"].items():
        if entry["kind"] not in _BLOCK_CLASSES:
            raise ValueError(f"{path}: block {name!r} has an unknown kind {entry['kind']!r}")
        blocks[name] = _BLOCK_CLASSES[entry["kind"]].from_state(entry, name)
        blocks[name].status = entry.get("status", "")
    return state["meta"], blocks
