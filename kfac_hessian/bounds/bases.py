"""Orthonormal bases ``Q_b`` in which the PAC-Bayes posterior covariance is diagonal: ``Σ = Q_b diag(s²) Q_bᵀ``.

A basis is a list of blocks, each covering one curvature block's parameters (a layer's weight and bias, or one
parameter). A block maps coordinates ``c`` in the basis to parameter tensors ``w = Q c`` and back ``c = Qᵀ w``:

* identity: ``Q = I``; the coordinates are the parameter tensors themselves.
* Kronecker: a block ``G ⊗ A`` on its augmented matrices ``W̄ = [W b]`` (``groups × d_out × width``, row-major,
  docs/conventions.md) has eigenvectors ``v_j ⊗ u_i`` (``v_j`` of ``G``, ``u_i`` of ``A``, per group). Its
  coordinates form the matrices ``C = Vᵀ W̄ U`` and ``W̄ = V C Uᵀ``: two small products, ``V ⊗ U`` is never
  formed (``U = I`` for a diagonal ``A``: embeddings). The bias is the last column of ``W̄``, so its directions
  mix with the weights' as the block does.
* dense: the eigenvectors of dense sub-blocks on index sets of the public order (weight, then bias) — the exact
  block of a layer (``exact_layerwise``), or the ``DenseBlocks`` of ``compute_kfac`` (normalization layers, free
  parameters).
* any eigen result per block (``from_eigen``: ``kfac_hessian.eigen``): Kronecker and EKFAC eigen-structures in their
  factor form ``V ⊗ U``, every other result (a Kronecker fit's or dense block's ``eig()``, ``lanczos``, ``eigen_pairs``)
  by its eigenvectors; a result holding fewer than ``P`` pairs (a Lanczos top-k) is completed by an orthonormal
  complement of its eigenvectors (from a complete QR: the posterior is then free in those ``k`` directions and takes
  the complement's arbitrary, fixed axes for the rest).

Trainable parameters that no block covers get identity blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..blocks import DenseBlocks, EKFACEigen, KroneckerBlock, KroneckerEigen
from ..eigen import EigenResult, require_eigen_result
from ..exact import layer_operator
from ..factors import KFAC
from ..layers import select
from ..layout import BlockLayout
from ..limits import COMPARE_DENSE_LIMIT
from ..spectra import eig_descending, symmetric_eig


def _flat(params: Mapping[str, Tensor], names: tuple[str, ...]) -> Tensor:
    return torch.cat([params[n].flatten() for n in names])


def _split(flat: Tensor, names: tuple[str, ...], shapes: tuple[torch.Size, ...]) -> dict[str, Tensor]:
    return {n: f.reshape(s) for n, f, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)}


@dataclass
class _IdentityBlock:
    names: tuple[str]

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        return params[self.names[0]]

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        return {self.names[0]: coords}


@dataclass
class _KroneckerBlock:
    names: tuple[str, ...]  # public order: weight, then bias if any
    shapes: tuple[torch.Size, ...]
    layout: BlockLayout
    g_vectors: Tensor  # V: (groups, d_out, d_out), eigenvectors as columns
    a_vectors: Tensor | None  # U: (groups, width, width); None: U = I (a diagonal A)

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        augmented = self.layout.to_matrices(_flat(params, self.names).unsqueeze(0))[0]  # (groups, d_out, width)
        coords = self.g_vectors.transpose(1, 2) @ augmented
        return coords if self.a_vectors is None else coords @ self.a_vectors

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        augmented = self.g_vectors @ (coords if self.a_vectors is None else coords @ self.a_vectors.transpose(1, 2))
        return _split(self.layout.to_vectors(augmented.unsqueeze(0))[0], self.names, self.shapes)


@dataclass
class _DenseBlock:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    index: Tensor  # (B, b): public positions of each sub-block
    vectors: Tensor  # Q: (B, b, b), eigenvectors as columns

    def to_coordinates(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.einsum("bij,bi->bj", self.vectors, _flat(params, self.names)[self.index])

    def from_coordinates(self, coords: Tensor) -> dict[str, Tensor]:
        flat = coords.new_empty(self.index.numel())
        flat[self.index] = torch.einsum("bij,bj->bi", self.vectors, coords)
        return _split(flat, self.names, self.shapes)


def _carried_variances(new, old, variances: Tensor) -> Tensor:
    """``diag(Q_newᵀ Q_old diag(variances) Q_oldᵀ Q_new)`` within one block."""
    if isinstance(new, _IdentityBlock) and isinstance(old, _IdentityBlock):
        return variances
    if isinstance(new, _KroneckerBlock) and isinstance(old, _KroneckerBlock):
        r_v = (new.g_vectors.transpose(1, 2) @ old.g_vectors).square()
        carried = r_v @ variances
        if new.a_vectors is not None:
            carried = carried @ (new.a_vectors.transpose(1, 2) @ old.a_vectors).square().transpose(1, 2)
        return carried
    if isinstance(new, _DenseBlock) and isinstance(old, _DenseBlock) and torch.equal(new.index, old.index):
        return torch.einsum("bij,bj->bi", (new.vectors.transpose(1, 2) @ old.vectors).square(), variances)
    raise ValueError(f"cannot carry variances from a {type(old).__name__} to a {type(new).__name__}")


class PosteriorBasis:
    """An orthonormal basis of the trainable parameters, block by block (see the module docstring).

    Build one with ``identity``, ``kronecker``, ``exact_layerwise`` or ``from_eigen``. ``to_coordinates`` takes a
    mapping parameter name → tensor and returns one coordinate tensor per block; ``from_coordinates`` inverts it.
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

    def to_dense(self, max_params: int = COMPARE_DENSE_LIMIT) -> Tensor:
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

    def variances_from(self, other: PosteriorBasis, variances: list[Tensor]) -> list[Tensor]:
        """``diag(Q_bᵀ Σ Q_b)`` for ``Σ = Q_o diag(variances) Q_oᵀ`` given in ``other`` (same block structure).

        Used when an ``"iterative"`` run recomputes the Kronecker basis: the posterior keeps its covariance's
        diagonal in the new basis. For Kronecker blocks with ``R_V = V_newᵀ V_old`` and ``R_U = U_newᵀ U_old``
        this is ``(R_V ∘ R_V) S (R_U ∘ R_U)ᵀ`` per group — ``O(d_out² + width²)`` work per block; for dense
        blocks ``(R ∘ R) s`` per sub-block.
        """
        if len(other.blocks) != len(self.blocks):
            raise ValueError("the two bases cover the parameters with different blocks")
        return [_carried_variances(new, old, var) for new, old, var in zip(self.blocks, other.blocks, variances)]

    @classmethod
    def identity(cls, model: nn.Module) -> PosteriorBasis:
        """``Q_b = I`` (Dziugaite & Roy 2017)."""
        shapes = _trainable_shapes(model)
        return cls("identity", [_IdentityBlock((n,)) for n in shapes], shapes)

    @classmethod
    def kronecker(cls, model: nn.Module, kfac: KFAC) -> PosteriorBasis:
        """Per block of ``kfac`` its eigenbasis — ``V ⊗ U`` of a Kronecker block, the sub-blocks' eigenvectors of
        ``DenseBlocks``; identity for the other parameters. A block whose parameters are not all trainable is left
        to identity blocks, except a frozen bias of a Kronecker block, whose row and column of ``A`` are dropped."""
        params = dict(model.named_parameters(remove_duplicate=False))
        layer_blocks = {}
        for name, block in kfac.items():
            names = tuple(kfac.parameter_names.get(name, ()))
            if not names or any(n not in params for n in names):
                raise ValueError(f"the block {name!r} does not cover parameters of this model ({list(names)})")
            dtype = params[names[0]].dtype
            trainable = tuple(n for n in names if params[n].requires_grad)
            if isinstance(block, KroneckerBlock):
                eig = block.eig(dtype=torch.float64, vectors=True)
                layout = block.layout
                a_vectors = None if block.a_is_diagonal else eig.factor_vectors("A", layout.width)
                if trainable != names:
                    if not (layout.has_bias and trainable == names[:-1]) or a_vectors is None:
                        continue
                    # frozen bias: the trainable block is G ⊗ A_ww, A without its bias row and column
                    a = block.A if block.A.dim() == 3 else block.A.unsqueeze(0)
                    a_vectors = symmetric_eig(a[:, :-1, :-1].double(), vectors=True)[1]
                    layout = layout.without_bias()
                layer_blocks[trainable[0]] = _KroneckerBlock(
                    trainable, tuple(params[n].shape for n in trainable), layout,
                    eig.factor_vectors("G", layout.d_out).to(dtype), None if a_vectors is None else a_vectors.to(dtype))
            elif isinstance(block, DenseBlocks) and trainable == names:
                vectors = symmetric_eig(block.blocks.double(), vectors=True)[1].to(dtype)
                layer_blocks[names[0]] = _DenseBlock(names, tuple(params[n].shape for n in names), block.index, vectors)
        return cls("kronecker", _with_identity_rest(model, layer_blocks), _trainable_shapes(model))

    @classmethod
    def from_eigen(
        cls,
        model: nn.Module,
        eigs: Mapping[str, EigenResult],
        parameter_names: Mapping[str, list[str] | tuple[str, ...]] | None = None,
    ) -> PosteriorBasis:
        """Per block the eigenbasis of any eigen result (module docstring); identity for the other parameters.

        ``eigs`` maps block names to eigen results whose eigenvectors are in the public order of the block's
        parameters: ``parameter_names`` (``KFAC.parameter_names``), or by default a layer's own parameters or a
        parameter by its name. Every parameter of a block must be trainable.
        """
        params = dict(model.named_parameters())
        layer_blocks = {}
        for name, result in eigs.items():
            require_eigen_result(result, f"eigs[{name!r}]")
            names = tuple(parameter_names[name]) if parameter_names is not None else _block_parameters(model, name)
            if any(n not in params or not params[n].requires_grad for n in names):
                raise ValueError(f"the block {name!r} covers {list(names)}, not all of them trainable parameters of "
                                 "this model: leave it out of eigs (its parameters then get identity blocks)")
            shapes = tuple(params[n].shape for n in names)
            if sum(s.numel() for s in shapes) != result.num_params:
                raise ValueError(f"eigs[{name!r}] has P={result.num_params}, its parameters {list(names)} "
                                 f"{sum(s.numel() for s in shapes)}")
            layer_blocks[names[0]] = _eigen_block(result, names, shapes, params[names[0]].dtype)
        return cls("eigen", _with_identity_rest(model, layer_blocks), _trainable_shapes(model))

    @classmethod
    def exact_layerwise(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        data,
        layers: list[str] | None = None,
        kind: str = "hessian",
        max_params: int = COMPARE_DENSE_LIMIT,
    ) -> PosteriorBasis:
        """Per block that ``compute_kfac`` would form (``layers`` as there) the eigenvectors of its exact dense block
        (``kind`` "hessian" or "ggn"); small blocks only."""
        params = dict(model.named_parameters(remove_duplicate=False))
        layer_blocks = {}
        for entry in select(model, layers).entries:
            for block_name, names in entry.parameter_names().items():
                op = layer_operator(model, loss_fn, data, names, kind=kind)
                if op.num_params > max_params:
                    raise ValueError(f"block {block_name!r} has {op.num_params} parameters, more than "
                                     f"max_params={max_params}; use the Kronecker basis")
                vectors = eig_descending(op.to_dense(max_params).double())[1].to(params[names[0]].dtype)
                index = torch.arange(op.num_params, device=vectors.device).unsqueeze(0)
                layer_blocks[names[0]] = _DenseBlock(tuple(names), tuple(params[n].shape for n in names), index,
                                                     vectors.unsqueeze(0))
        return cls("exact-layerwise", _with_identity_rest(model, layer_blocks), _trainable_shapes(model))


def _eigen_block(result: EigenResult, names: tuple[str, ...], shapes: tuple[torch.Size, ...], dtype: torch.dtype):
    """The basis block of one eigen result: factor form for Kronecker and EKFAC, explicit eigenvectors otherwise."""
    if isinstance(result, KroneckerEigen):
        layout = result.layout
        a_vectors = None if result.a_is_diagonal else result.factor_vectors("A", layout.width).to(dtype)
        return _KroneckerBlock(names, shapes, layout, result.factor_vectors("G", layout.d_out).to(dtype), a_vectors)
    if isinstance(result, EKFACEigen):
        a_vectors = result.block.a_vectors
        return _KroneckerBlock(names, shapes, result.layout, result.block.g_vectors.to(dtype),
                               None if a_vectors is None else a_vectors.to(dtype))
    P = result.num_params
    held = min(len(result.eigenvalues), P)
    vectors = result.topk(held)[1].to(dtype).T  # (P, held), columns
    if held < P:  # complete the basis: the first columns of a complete QR span the eigenvectors (up to signs)
        q = torch.linalg.qr(vectors, mode="complete").Q
        vectors = torch.cat([vectors, q[:, held:]], dim=1)
    return _DenseBlock(names, shapes, torch.arange(P, device=vectors.device).unsqueeze(0), vectors.unsqueeze(0))


def _block_parameters(model: nn.Module, name: str) -> tuple[str, ...]:
    """A parameter name stands for itself, a module for its own parameters (as ``layer_operator`` reads them)."""
    params = dict(model.named_parameters())
    if name in params:
        return (name,)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise ValueError(f"no layer or parameter named {name!r}: name the blocks by layer or parameter, or pass "
                         "parameter_names (block name → parameter names, as KFAC.parameter_names)")
    own = tuple(f"{name}.{n}" for n, _ in modules[name].named_parameters(recurse=False))
    if not own:
        raise ValueError(f"layer {name!r} has no parameters of its own: pass parameter_names for its block")
    return own


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
