"""``KFAC`` files: plain tensors, numbers and strings, read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import torch

from ..blocks import BLOCK_TYPES
from .result import KFAC

SAVE_FORMAT = "kfac_hessian.KFAC/2"
_META = ("curvature", "approx", "loss", "reduction", "n_samples", "skipped", "parameter_names", "counts",
         "total_params", "tied")


def save(kfac: KFAC, path) -> None:
    torch.save({
        "format": SAVE_FORMAT,
        "meta": {key: getattr(kfac, key) for key in _META},
        "blocks": {name: {"kind": block.kind, **block.state()} for name, block in kfac.blocks.items()},
    }, path)


def load(path, map_location: torch.device | str | None = None) -> KFAC:
    state = torch.load(path, map_location=map_location, weights_only=True)
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("kfac_hessian.KFAC/"):
        raise ValueError(f"{path} is not a file written by KFAC.save")
    if fmt != SAVE_FORMAT:
        raise ValueError(f"{path} has format {fmt!r}; this version of kfac_hessian reads {SAVE_FORMAT!r}")
    blocks = {}
    for name, entry in state["blocks"].items():
        if entry["kind"] not in BLOCK_TYPES:
            raise ValueError(f"{path}: block {name!r} has an unknown kind {entry['kind']!r}")
        blocks[name] = BLOCK_TYPES[entry["kind"]].from_state(entry, name)
    return KFAC(blocks, **state["meta"])
