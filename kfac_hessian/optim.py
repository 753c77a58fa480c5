"""Scale-amended SGD: SGD whose step on each layer block is divided by a scalar approximation of the block's
local (back-matching) Hessian (Zhang, Chen & Liu, NeurIPS 2018; the derivation is in docs/local_hessians.md).

Block ``k`` = one Kronecker layer with vector inputs (``Linear``, convolutions, ``transformers``' ``Conv1D``; the
layer-kind registry decides), its weight and bias, optionally followed by a ``BatchNorm``. Its
back-matching local Hessian in ``[W b]`` is ``D ⊗ A`` (``analyses.local_hessian``): ``A = mean ā āᵀ`` over the
rows (samples × positions) of the layer input with a 1 appended, ``D = diag(γ²/(σ² + ε))`` when a BatchNorm
follows (``I`` otherwise). The best scalar approximation ``h·I`` of ``D ⊗ A`` in Frobenius norm is its mean
eigenvalue,

    h_k = tr(D ⊗ A) / (d_out · width) = mean_j(γ_j²/(σ_j² + ε)) · mean_rows(‖ā‖²) / width,

and a Newton step on the local loss with that scalar divides the block's gradient by ``h_k``. Parameters of
no block (BatchNorm's γ and β, whose local Hessian is ``≈ I`` because their input x̂ is normalized, and
everything else) take plain SGD steps (``h = 1``). With BatchNorm, scaling ``W`` by ``c`` scales the
gradient by ``1/c`` and ``h_k`` by ``1/c²``: the amended step scales like ``W`` itself, so the relative step size
no longer shrinks as the weights grow — the effect the paper attributes to the local Hessian's scale.

Estimates: ``mean ‖ā‖²`` is measured by a forward hook on every training-mode forward pass and smoothed
with an exponential moving average (``ema``); ``σ²`` is the BatchNorm's ``running_var`` (itself an average
of batch variances). Update, per parameter ``p`` with scale ``h`` (like ``torch.optim.SGD``, dampening 0):
``d = (∇p + weight_decay·p) / h``; ``buf = momentum·buf + d``; ``p ← p − lr·buf``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import KroneckerKind, kronecker_kind, select
from .model_state import is_batch_norm

__all__ = ["ScaleAmendedSGD"]


class ScaleAmendedSGD(torch.optim.Optimizer):
    """SGD with per-block scale amendment (module docstring).

    Args:
        model: the network; the optimizer registers read-only forward hooks on its layers (remove them with
            ``remove_hooks()`` or by using the optimizer as a context manager).
        batch_norm: layer name → BatchNorm module name, or ``"auto"``: a layer is paired with a BatchNorm that
            comes right after it in ``named_modules`` order and has ``d_out`` features (``nn.Sequential``
            and the usual ``conv1, bn1, …`` definitions).
        ema: smoothing of ``mean ‖ā‖²`` across steps (0 = use the last batch only).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        batch_norm: dict[str, str] | str = "auto",
        ema: float = 0.9,
        layers: list[str] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError("ScaleAmendedSGD takes the model itself (it observes its layers' inputs with forward "
                            f"hooks), got {type(model).__name__}: use ScaleAmendedSGD(model, lr=...), "
                            "not model.parameters()")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {ema!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.ema = ema
        self._layers, self._kinds = _kronecker_layers(model, layers)
        self._batch_norm = _pair_batch_norms(model, self._layers, self._kinds, batch_norm)
        self._block_of = {getattr(m, p): name for name, m in self._layers.items()
                          for p in self._kinds[name].parameter_names(m)}
        self.input_power: dict[str, float] = {}  # smoothed mean ‖ā‖² / width per layer
        self._hooks = [m.register_forward_hook(self._observe(name)) for name, m in self._layers.items()]

    def _observe(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # a deepcopy of the model carries this hook along: only the optimizer's own layer counts
            if not module.training or module is not self._layers[name]:
                return
            with torch.no_grad():
                layout = self._kinds[name].layout(module)
                rows = self._kinds[name].input_rows(module, args[0].detach())
                # mean over rows of ‖ā‖² per group / width (the constant 1 of a bias counted in every group)
                power = (float(rows.square().sum(-1).mean()) / layout.groups + int(layout.has_bias)) / layout.width
            old = self.input_power.get(name)
            self.input_power[name] = power if old is None else self.ema * old + (1 - self.ema) * power

        return hook

    def block_scales(self) -> dict[str, float]:
        """Current ``h_k`` per layer (layers not yet seen in a training-mode forward pass are absent)."""
        scales = {}
        for name, power in self.input_power.items():
            bn = self._batch_norm.get(name)
            if bn is None:
                scales[name] = power
            else:
                gamma_sq = bn.weight.detach().double().square() if bn.affine else 1.0
                scales[name] = float((gamma_sq / (bn.running_var.double() + bn.eps)).mean()) * power
        return scales

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = self.block_scales()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                block = self._block_of.get(p)
                if block is not None and block not in scales:
                    raise RuntimeError(f"layer {block!r} has a gradient but no training-mode forward pass was "
                                       "observed; run the forward pass in train mode before step()")
                scale = scales[block] if block is not None else 1.0
                d_p = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                d_p = d_p / max(scale, torch.finfo(torch.float64).tiny)
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d_p.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                    d_p = state["momentum_buffer"]
                p.add_(d_p, alpha=-group["lr"])
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["input_power"] = dict(self.input_power)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.input_power = dict(state_dict.pop("input_power", {}))
        super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def __enter__(self) -> ScaleAmendedSGD:
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()


def _kronecker_layers(model: nn.Module,
                      layers: list[str] | None) -> tuple[dict[str, nn.Module], dict[str, KroneckerKind]]:
    """The optimizer's blocks: the selected Kronecker layers with vector inputs, and their kinds."""
    selected = {e.module_name: e.module for e in select(model, layers).entries if e.kind is not None}
    kinds = {name: kronecker_kind(m) for name, m in selected.items()}
    if layers is not None:
        other = [name for name, kind in kinds.items() if kind is None]
        if other:
            raise ValueError(f"{other} are not Kronecker layers with vector inputs (Linear, convolutions, Conv1D)")
    kinds = {name: kind for name, kind in kinds.items() if kind is not None}
    if not kinds:
        raise ValueError(f"{type(model).__name__} has no Kronecker layer with vector inputs "
                         "(Linear, convolutions, Conv1D)")
    return {name: selected[name] for name in kinds}, kinds


def _pair_batch_norms(model: nn.Module, layers: dict[str, nn.Module], kinds: dict[str, KroneckerKind],
                      batch_norm: dict[str, str] | str) -> dict:
    modules = dict(model.named_modules())

    def outputs(name: str) -> int:
        layout = kinds[name].layout(layers[name])
        return layout.groups * layout.d_out

    if batch_norm == "auto":
        names = list(modules)
        pairs = {}
        for name in layers:
            following = modules[names[names.index(name) + 1]] if names.index(name) + 1 < len(names) else None
            if is_batch_norm(following) and following.num_features == outputs(name):
                pairs[name] = following
        return pairs
    if not isinstance(batch_norm, dict):
        raise ValueError(f"batch_norm must be 'auto' or a dict layer → BatchNorm name, got {batch_norm!r}")
    pairs = {}
    for name, bn_name in batch_norm.items():
        bn = modules.get(bn_name)
        if name not in layers:
            raise ValueError(f"{name!r} is not one of the optimizer's layers {list(layers)}")
        if not is_batch_norm(bn) or not bn.track_running_stats:
            raise ValueError(f"{bn_name!r} is not a BatchNorm module with running statistics")
        pairs[name] = bn
    return pairs
