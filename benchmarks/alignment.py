"""Align the hidden units of two MLPs before comparing their layer blocks (Li et al. 2015; Ainsworth et al. 2023).

Hidden units are defined only up to a permutation: for an ``nn.Sequential`` of ``nn.Linear`` layers separated by
element-wise activations, permuting the outputs of hidden layer ``ℓ`` by ``π`` — the rows of ``W_ℓ`` and the entries
of ``b_ℓ`` — together with the columns of ``W_{ℓ+1}`` computes the same function. Two independently trained models
can only be compared unit by unit after such a permutation has been found.

Convention: ``perms[name][i]`` is the unit of ``other``'s layer ``name`` that is matched to unit ``i`` of
``reference``; ``permute_hidden_units(other, perms)`` is ``other`` with its units in ``reference``'s order. Only hidden
layers (every ``nn.Linear`` but the last) have a permutation; the output layer's units are the classes.

The exact curvature block of a permuted layer is the permuted block: with ``index = public_order_index(...)``,
``H_aligned = H_other[index][:, index]`` in the public parameter order (``torch.cat([W.flatten(), b])``, row-major
``W[r, c]`` at ``r·d_in + c``, bias entries after the weight), so eigenvectors ``(k, P)`` are aligned by
``vectors[:, index]`` without recomputing anything (``align_vectors``).

What no permutation removes: for ReLU (positively homogeneous) units, scaling row ``r`` of ``W_ℓ`` and ``b_ℓ[r]`` by
``α > 0`` and column ``r`` of ``W_{ℓ+1}`` by ``1/α`` also leaves the function unchanged but changes both layers'
blocks (by ``diag(1/α)`` and ``diag(α)`` factors), so two aligned models can still differ by such rescalings.
"""

from __future__ import annotations

import copy

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

# modules that act on each unit separately, so that a permutation of units commutes with them
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity,
               nn.Dropout)


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers of an MLP, in order; ``NotImplementedError`` for any other architecture."""
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError(f"alignment supports nn.Sequential MLPs, got {type(model).__name__}")
    names = []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            names.append(name)
        elif not isinstance(module, ELEMENTWISE):
            raise NotImplementedError(f"module {name!r} ({type(module).__name__}) is neither nn.Linear nor an "
                                      f"element-wise activation {[m.__name__ for m in ELEMENTWISE]}: its units "
                                      "cannot be permuted by this module")
    if len(names) < 2:
        raise ValueError(f"an MLP with {len(names)} Linear layer(s) has no hidden units to align")
    return names


def _standardized(activations: Tensor) -> Tensor:
    """Columns with mean 0 and norm 1 (a constant column stays 0: it correlates with nothing)."""
    centred = activations - activations.mean(0)
    return centred / centred.norm(dim=0).clamp_min(torch.finfo(centred.dtype).tiny)


@torch.no_grad()
def match_hidden_units(reference: nn.Sequential, other: nn.Sequential, inputs: Tensor) -> dict[str, Tensor]:
    """The permutation of every hidden layer of ``other`` that best matches ``reference`` on ``inputs``.

    Layer by layer, the pre-activations of both models on ``inputs`` are correlated unit by unit and the assignment
    of largest total correlation is taken (Hungarian, ``scipy.optimize.linear_sum_assignment``); ``other``'s next
    layer is read with its inputs already permuted. Pre-activations rather than ReLU outputs: two units whose ReLU
    outputs are both zero on ``inputs`` would tie. Returns ``perms`` (module docstring convention).
    """
    names = linear_layers(reference)
    if linear_layers(other) != names:
        raise ValueError("the two models have different layers; alignment needs the same architecture")
    for name in names:
        if reference.get_submodule(name).weight.shape != other.get_submodule(name).weight.shape:
            raise ValueError(f"layer {name!r} differs in shape between the two models")
    aligned = copy.deepcopy(other).eval()
    reference_eval = copy.deepcopy(reference).eval()
    perms: dict[str, Tensor] = {}
    for name in names[:-1]:
        pre_reference = _pre_activations(reference_eval, name, inputs)
        pre_other = _pre_activations(aligned, name, inputs)
        correlation = _standardized(pre_reference).T @ _standardized(pre_other)
        _, columns = linear_sum_assignment(correlation.double().cpu().numpy(), maximize=True)
        perms[name] = torch.as_tensor(columns, dtype=torch.long)
        aligned = permute_hidden_units(aligned, {name: perms[name]})
    return perms


def _pre_activations(model: nn.Sequential, layer: str, inputs: Tensor) -> Tensor:
    """The output of Linear layer ``layer`` on ``inputs``, flattened to ``(samples, units)``."""
    x = inputs
    for name, module in model.named_children():
        x = module(x)
        if name == layer:
            return x.reshape(-1, x.shape[-1])
    raise ValueError(f"no layer {layer!r}")


@torch.no_grad()
def permute_hidden_units(model: nn.Sequential, perms: dict[str, Tensor]) -> nn.Sequential:
    """A copy of ``model`` whose hidden unit ``i`` of layer ``name`` is ``model``'s unit ``perms[name][i]`` (rows of
    ``W`` and ``b`` permuted, columns of the next Linear layer's ``W`` likewise): the same function."""
    names = linear_layers(model)
    _check_perms(model, names, perms)
    permuted = copy.deepcopy(model)
    for name, following in zip(names[:-1], names[1:]):
        if name not in perms:
            continue
        perm = perms[name]
        layer, after = permuted.get_submodule(name), permuted.get_submodule(following)
        layer.weight.copy_(layer.weight[perm])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[perm])
        after.weight.copy_(after.weight[:, perm])
    return permuted


@torch.no_grad()
def rescale_hidden_units(model: nn.Sequential, scales: dict[str, Tensor]) -> nn.Sequential:
    """A copy of ``model`` with row ``r`` of hidden layer ``name``'s ``W`` and ``b`` times ``scales[name][r] > 0`` and
    column ``r`` of the next Linear layer's ``W`` divided by it: the same function for positively homogeneous
    activations (ReLU, LeakyReLU), which is checked here; a different curvature block (module docstring)."""
    names = linear_layers(model)
    activations = [m for m in model if not isinstance(m, nn.Linear)]
    if not all(isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)) for m in activations):
        raise ValueError("rescaling keeps the function only for positively homogeneous activations (ReLU, LeakyReLU)")
    rescaled = copy.deepcopy(model)
    for name, following in zip(names[:-1], names[1:]):
        if name not in scales:
            continue
        scale = scales[name]
        layer, after = rescaled.get_submodule(name), rescaled.get_submodule(following)
        if scale.shape != (layer.out_features,) or not bool((scale > 0).all()):
            raise ValueError(f"scales[{name!r}] must be {layer.out_features} positive numbers")
        layer.weight.mul_(scale[:, None].to(layer.weight))
        if layer.bias is not None:
            layer.bias.mul_(scale.to(layer.bias))
        after.weight.div_(scale[None, :].to(after.weight))
    unknown = set(scales) - set(names[:-1])
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not hidden Linear layers of the model (hidden: {names[:-1]})")
    return rescaled


def _check_perms(model: nn.Sequential, names: list[str], perms: dict[str, Tensor]) -> None:
    for name, perm in perms.items():
        if name not in names[:-1]:
            raise ValueError(f"{name!r} is not a hidden Linear layer of the model (hidden layers: {names[:-1]})")
        units = model.get_submodule(name).out_features
        if not torch.equal(perm.sort().values, torch.arange(units)):
            raise ValueError(f"perms[{name!r}] is not a permutation of the layer's {units} units")


def public_order_index(model: nn.Sequential, layer: str, perms: dict[str, Tensor]) -> Tensor:
    """``index`` with ``aligned_vector = vector[index]`` for vectors of ``layer``'s parameters in public order.

    The rows of ``layer``'s weight (and its bias) follow ``perms[layer]`` (a hidden layer), its columns follow the
    permutation of the previous Linear layer (if that one was permuted).
    """
    names = linear_layers(model)
    if layer not in names:
        raise ValueError(f"{layer!r} is not a Linear layer of the model ({names})")
    _check_perms(model, names, perms)
    module = model.get_submodule(layer)
    d_out, d_in = module.weight.shape
    position = names.index(layer)
    rows = perms.get(layer, torch.arange(d_out))
    columns = perms.get(names[position - 1], torch.arange(d_in)) if position > 0 else torch.arange(d_in)
    index = (rows[:, None] * d_in + columns[None, :]).flatten()
    if module.bias is not None:
        index = torch.cat([index, d_out * d_in + rows])
    return index


def align_vectors(vectors: Tensor, model: nn.Sequential, layer: str, perms: dict[str, Tensor]) -> Tensor:
    """``(k, P)`` public-order vectors of ``model``'s ``layer`` (e.g. its block's eigenvectors) in the unit order of
    the reference that ``perms`` was matched to: the eigenvectors of the permuted model's block."""
    index = public_order_index(model, layer, perms)
    if vectors.dim() != 2 or vectors.shape[1] != len(index):
        raise ValueError(f"expected (k, {len(index)}) vectors of layer {layer!r}, got {tuple(vectors.shape)}")
    return vectors[:, index.to(vectors.device)]
