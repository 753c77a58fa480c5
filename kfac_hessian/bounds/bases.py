"""Orthonormal bases ``Q_b`` in which the PAC-Bayes posterior covariance is diagonal: ``Σ = Q_b diag(s²) Q_bᵀ``.

A basis is a list of blocks, each covering one layer (its weight and bias) or one parameter. A block maps
coordinates ``c`` in the basis to parameter tensors ``w = Q c`` and back ``c = Qᵀ w``:

* identity: ``Q = I``; the coordinates are the parameter tensors themselves.
* Kronecker: a layer with factors ``G ⊗ A`` on its augmented matrix ``W̄ = [W b]`` (``d_out × width``,
  row-major, docs/conventions.md) has eigenvectors ``v_j ⊗ u_i`` (``v_j`` of ``G``, ``u_i`` of ``A``). Its
  coordinates form the matrix ``C = Vᵀ W̄ U`` and ``W̄ = V C Uᵀ``: two small products, ``V ⊗ U`` is never
  formed. The bias is the last column of ``W̄``, so its directions mix with the weights' as the block does.
* dense: the eigenvectors ``Q`` (``P × P``) of a layer's exact block in the public order (weight, then bias).

Trainable parameters that no layer block covers get identity blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..factors import KFAC
from ..layers import select_layers
from ..spectra import eig_descending


@dataclass
class _IdentityBlock:
    names: tuple[str]

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        return params[self.names[0]]

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        return {self.names[0]: coords}


@dataclass
class _KroneckerBlock:
    names: tuple[str, ...]  # weight, then bias if any
    weight_shape: torch.Size
    g_vectors: Tensor  # V: (d_out, d_out), eigenvectors as columns
    a_vectors: Tensor  # U: (width, width)

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        weight = params[self.names[0]].reshape(self.g_vectors.shape[0], -1)
        if len(self.names) == 2:
            weight = torch.cat([weight, params[self.names[1]].unsqueeze(1)], dim=1)
        return self.g_vectors.T @ weight @ self.a_vectors

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        augmented = self.g_vectors @ coords @ self.a_vectors.T
        d_in = self.weight_shape.numel() // self.weight_shape[0]
        out = {self.names[0]: augmented[:, :d_in].reshape(self.weight_shape)}
        if len(self.names) == 2:
            out[self.names[1]] = augmented[:, d_in]
        return out


@dataclass
class _DenseBlock:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    vectors: Tensor  # Q: (P, P), eigenvectors as columns, public order

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.vectors.T @ torch.cat([params[n].flatten() for n in self.names])

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        flat = (self.vectors @ coords).split([s.numel() for s in self.shapes])
        return {n: f.reshape(s) for n, f, s in zip(self.names, flat, self.shapes)}


class PosteriorBasis:
    """An orthonormal basis of the trainable parameters, block by block (see the module docstring).

    Build one with ``identity``, ``kronecker`` or ``exact_layerwise``. ``to_coordinates`` takes a mapping
    parameter name → tensor and returns one coordinate tensor per block; ``from_coordinates`` inverts it.
    """

    def __init__(self, kind: str, blocks: list, parameter_shapes: dict[str, torch.Size]):
        self.kind = kind
        self.blocks = blocks
        self.parameter_shapes = parameter_shapes

    def __repr__(self) -> str:
        return f"PosteriorBasis(kind={self.kind!r}, blocks={len(self.blocks)}, params={self.num_params})"

    @property
    def num_params(self) -> int:
        return sum(s.numel() for s in self.parameter_shapes.values())

    def to_coordinates(self, params: Mapping[str, Tensor]) -> list[Tensor]:
        """``Q_bᵀ w``, one tensor per block (a matrix ``Vᵀ W̄ U`` for Kronecker blocks)."""
        missing = set(self.parameter_shapes) - set(params)
        if missing:
            raise ValueError(f"parameters missing: {sorted(missing)}")
        return [block.to_coordinates(params) for block in self.blocks]

    def from_coordinates(self, coords: list[Tensor]) -> dict[str, Tensor]:
        """``Q_b c`` as parameter-shaped tensors keyed by parameter name."""
        if len(coords) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} coordinate tensors, got {len(coords)}")
        out: dict[str, Tensor] = {}
        for block, c in zip(self.blocks, coords):
            out.update(block.from_coordinates(c))
        return out

    def to_dense(self, max_params: int = 5000) -> Tensor:
        """``Q_b`` as a dense matrix in the order of ``parameter_shapes`` (for tests on small models)."""
        if self.num_params > max_params:
            raise ValueError(f"{self.num_params} parameters exceed max_params={max_params}")
        template = self.to_coordinates({n: torch.zeros(s) for n, s in self.parameter_shapes.items()})
        columns = []
        for b, t in enumerate(template):
            for index in range(t.numel()):
                coords = [torch.zeros_like(u) for u in template]
                coords[b].view(-1)[index] = 1.0
                params = self.from_coordinates(coords)
                columns.append(torch.cat([params[n].flatten() for n in self.parameter_shapes]))
        return torch.stack(columns, dim=1)

    def variances_from(self, other: "PosteriorBasis", variances: list[Tensor]) -> list[Tensor]:
        """``diag(Q_bᵀ Σ Q_b)`` for ``Σ = Q_o diag(variances) Q_oᵀ`` given in ``other`` (same block structure).

        Used when an ``"iterative"`` run recomputes the Kronecker basis: the posterior keeps its covariance's
        diagonal in the new basis. For Kronecker blocks with ``R_V = V_newᵀ V_old`` and ``R_U = U_newᵀ U_old``
        this is ``(R_V ∘ R_V) S (R_U ∘ R_U)ᵀ`` — ``O(d_out² + width²)`` work per block.
        """
        if len(other.blocks) != len(self.blocks):
            raise ValueError("the two bases cover the parameters with different blocks")
        out = []
        for new, old, var in zip(self.blocks, other.blocks, variances):
            if isinstance(new, _IdentityBlock) and isinstance(old, _IdentityBlock):
                out.append(var)
            elif isinstance(new, _KroneckerBlock) and isinstance(old, _KroneckerBlock):
                r_v = (new.g_vectors.T @ old.g_vectors).square()
                r_u = (new.a_vectors.T @ old.a_vectors).square()
                out.append(r_v @ var @ r_u.T)
            else:
                raise ValueError(f"cannot carry variances from a {type(old).__name__} to a {type(new).__name__}")
        return out

    @classmethod
    def identity(cls, model: nn.Module) -> "PosteriorBasis":
        """``Q_b = I`` (Dziugaite & Roy 2017)."""
        shapes = _trainable_shapes(model)
        return cls("identity", [_IdentityBlock((n,)) for n in shapes], shapes)

    @classmethod
    def kronecker(cls, model: nn.Module, kfac: KFAC) -> "PosteriorBasis":
        """Per layer of ``kfac`` the eigenbasis ``V ⊗ U`` of ``G ⊗ A``; identity for the other parameters."""
        modules = dict(model.named_modules())
        layer_blocks = {}
        for name, factor in kfac.items():
            if name not in modules:
                raise ValueError(f"the factors' layer {name!r} is not a module of the model")
            module = modules[name]
            A = factor.A
            names = (f"{name}.weight",)
            if module.bias is not None:
                if module.bias.requires_grad:
                    names += (f"{name}.bias",)
                else:  # frozen bias: the trainable block is G ⊗ A_ww, A without its bias row and column
                    A = A[:-1, :-1]
            dtype = module.weight.dtype
            layer_blocks[names[0]] = _KroneckerBlock(
                names, module.weight.shape, eig_descending(factor.G.double())[1].to(dtype),
                eig_descending(A.double())[1].to(dtype)
            )
        return cls("kronecker", _with_identity_rest(model, layer_blocks), _trainable_shapes(model))

    @classmethod
    def exact_layerwise(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        data,
        layers: list[str] | None = None,
        kind: str = "hessian",
        max_params: int = 5000,
    ) -> "PosteriorBasis":
        """Per layer the eigenvectors of its exact dense block (``kind`` "hessian" or "ggn"); small layers only."""
        from ..exact import layer_operator

        selected, _ = select_layers(model, layers)
        layer_blocks = {}
        for name, module in selected.items():
            op = layer_operator(model, loss_fn, data, name, kind=kind)
            if op.num_params > max_params:
                raise ValueError(
                    f"layer {name!r} has {op.num_params} parameters, more than max_params={max_params}; "
                    "use the Kronecker basis"
                )
            vectors = eig_descending(op.to_dense(max_params).double())[1]
            own = [(f"{name}.{n}", p) for n, p in module.named_parameters()]
            layer_blocks[own[0][0]] = _DenseBlock(
                tuple(n for n, _ in own), tuple(p.shape for _, p in own), vectors.to(module.weight.dtype)
            )
        return cls("exact-layerwise", _with_identity_rest(model, layer_blocks), _trainable_shapes(model))


def _trainable_shapes(model: nn.Module) -> dict[str, torch.Size]:
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    if not shapes:
        raise ValueError("the model has no trainable parameter")
    return shapes


def _with_identity_rest(model: nn.Module, layer_blocks: dict) -> list:
    """Blocks in ``named_parameters`` order: a layer block where its weight comes, identity for the rest."""
    covered = {n for block in layer_blocks.values() for n in block.names}
    blocks = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in layer_blocks:
            blocks.append(layer_blocks[name])
        elif name not in covered:
            blocks.append(_IdentityBlock((name,)))
    return blocks
