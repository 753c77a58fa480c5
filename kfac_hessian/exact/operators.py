"""Exact curvature operators: the true Hessian block (or its Gauss-Newton part) applied by products.

The objective is the one ``loss_fn`` computes over the whole data set (see ``kfac_hessian.losses``); each
product streams the data once, batch by batch, and sums the per-batch products of the *summed* loss
before the reduction scale is applied, so an uneven last batch changes nothing.

* ``kind="hessian"``: ``v ↦ ∂/∂θ ⟨∂L/∂θ, v⟩`` by double backward, all other parameters held fixed;
* ``kind="ggn"``: ``v ↦ Σ_n J_nᵀ Λ_n J_n v`` with a forward-mode product ``J v`` (``torch.func.jvp``), the
  closed-form loss Hessian ``Λ`` and a reverse-mode product (``torch.func.vjp``).

Both take ``m`` vectors in one pass over the data. Parameters are passed to the model functionally
(``torch.func.functional_call``) as detached views, so the model's flags and ``.grad`` are never touched.
Where torch cannot differentiate a model twice as written, the products take another route to the same values:
a model ``torch.func`` cannot transform (an old-style ``torch.autograd.Function`` without ``setup_context``, as
BLOOM's ``GeLUFunction``) gets its GGN products by plain ``torch.autograd`` reverse mode twice (its Hessian products
are plain double backward anyway); ``nn.EmbeddingBag`` runs written out as an embedding and a sum per bag.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed as _distributed
from ..data import Data, OutputSelector, iterate_batches, model_output, require_reiterable
from ..layers.embedding import embedding_bag_written_out
from ..layers.parameters import own_parameters
from ..linear_operator import LinearOperator
from ..losses import check_batch, counted_terms, hessian_vector_product, loss_spec, summed_loss
from ..model_state import (
    compute_dtype,
    eager_calls,
    eager_model,
    is_batch_norm,
    preserved_model_state,
    quiet_vmap_fallbacks,
)


@contextlib.contextmanager
def _slow_multihead_attention():
    """``nn.MultiheadAttention``'s fused inference fast path (taken in eval mode) has neither forward-mode AD nor
    double backward: the products run its regular path (same values)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _embedding_bags_written_out(model: nn.Module):
    """``nn.EmbeddingBag``'s fused op has neither forward-mode AD nor double backward: during the products every
    plain ``EmbeddingBag`` runs ``layers.embedding.embedding_bag_written_out`` (same values; ``mode="max"`` and
    ``max_norm`` refused there with ``NotImplementedError``). The module's own ``forward`` is back on exit."""
    bags = [m for m in model.modules() if type(m).forward is nn.EmbeddingBag.forward and "forward" not in vars(m)]
    for bag in bags:
        bag.forward = functools.partial(embedding_bag_written_out, bag)
    try:
        yield
    finally:
        for bag in bags:
            del bag.forward


class CurvatureOperator(LinearOperator):
    """The exact ``(P, P)`` Hessian or GGN block of some parameters, in the order of ``param_names``.

    ``n_matvecs`` and ``n_data_passes`` count the work done so far (one pass serves ``m`` vectors). ``dtype`` is the
    precision of the operator's vectors: the parameters' own, or float32 for a bfloat16/float16 model (whose
    products run in its precision while Lanczos and friends orthogonalize in float32).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Data,
        param_names: list[str],
        kind: str = "hessian",
        distributed: bool = False,
        batch_norm_eval: bool = True,
        output: OutputSelector | None = None,
    ):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        require_reiterable(data)
        self.model, self.data, self.kind, self.distributed = model, data, kind, distributed
        self.batch_norm_eval, self.output = batch_norm_eval, output
        if distributed:
            _distributed.require_process_group()
        self.spec = loss_spec(loss_fn)
        params = dict(model.named_parameters())
        self.param_names = list(param_names)
        _refuse_weight_norm_originals(model, self.param_names)
        self._shapes = [params[n].shape for n in self.param_names]
        self._sizes = [params[n].numel() for n in self.param_names]
        first = params[self.param_names[0]]
        self.param_dtype = first.dtype
        self._reference = torch.empty(0, dtype=compute_dtype(first.dtype), device=first.device)
        self.n_matvecs = 0
        self.n_data_passes = 0
        self.math_attention = False  # set once a fused attention kernel refused double backward
        self.reverse_mode_only = False  # set once torch.func refused the model (kind="ggn")

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    @property
    def reference(self) -> Tensor:
        return self._reference

    def __repr__(self) -> str:
        return f"CurvatureOperator(kind={self.kind!r}, P={self.num_params}, params={self.param_names})"

    def matmat(self, columns: Tensor) -> Tensor:
        if not self.math_attention:
            try:
                return self._products(columns)
            except (RuntimeError, NotImplementedError) as error:
                # fused scaled_dot_product_attention kernels (flash, memory-efficient) have neither double backward
                # (kind="hessian") nor forward-mode AD (kind="ggn")
                if "attention" not in str(error):
                    raise
                self.math_attention = True
                warnings.warn(
                    "a fused scaled_dot_product_attention kernel supports neither double backward nor forward-mode "
                    "AD; this operator's exact products run with the math attention kernel (same values, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._products(columns)

    def _attention_backend(self):
        return sdpa_kernel([SDPBackend.MATH]) if self.math_attention else contextlib.nullcontext()

    def _products(self, columns: Tensor) -> Tensor:
        m = columns.shape[1]
        tangents = [t.reshape(m, *shape).to(self.param_dtype)
                    for t, shape in zip(columns.T.split(self._sizes, dim=1), self._shapes)]
        result = torch.zeros(m, self.num_params, dtype=self.dtype, device=self.device)
        n_samples, counted = 0, 0
        # detached views (no copies): the model's own flags and .grad are never involved
        fixed = {name: p.detach() for name, p in self.model.named_parameters()}
        theta = tuple(fixed[name].detach().requires_grad_() for name in self.param_names)
        # BatchNorm in eval mode as in compute_kfac: the function the trained network computes at test time
        with preserved_model_state(self.model, self.batch_norm_eval), eager_calls(self.model), torch.enable_grad(), \
                self._attention_backend(), _slow_multihead_attention(), _embedding_bags_written_out(self.model):
            batch_norms = [m for m in self.model.modules() if is_batch_norm(m)]
            if self.kind == "ggn" and any(m.training and m.track_running_stats for m in batch_norms):
                raise ValueError("kind='ggn' runs the model under torch.func, where a train-mode BatchNorm cannot "
                                 "update its running statistics; use batch_norm_eval=True or kind='hessian'")
            for _, inputs, target in iterate_batches(self.data, self.device):
                products, output = self._batch_products(self._forward(inputs, fixed), theta, tangents, target)
                n_samples += output.shape[0]
                counted += counted_terms(self.spec, output, target)  # less the targets equal to ignore_index
                result += torch.cat([p.detach().reshape(m, -1) for p in products], dim=1).to(self.dtype)
        if self.distributed:  # every rank streamed its shard: sum products and counts in one collective
            counts = torch.tensor([n_samples, counted], dtype=self.dtype, device=self.device)
            result, counts = _distributed.all_reduce_sum([result, counts])
            n_samples, counted = int(counts[0]), int(counts[1])
        self.n_matvecs += m
        self.n_data_passes += 1
        return (result * self.spec.scale(n_samples, counted / n_samples if n_samples else 0)).T

    def _forward(self, inputs: Any, fixed: dict[str, Tensor]):
        """The model's output on ``inputs`` as a function of the operator's parameters (the others ``fixed``)."""

        def forward(*values: Tensor) -> Tensor:
            return model_output(self.model, inputs, self.output, {**fixed, **dict(zip(self.param_names, values))})

        return forward

    @quiet_vmap_fallbacks()
    def _batch_products(self, forward, theta: tuple[Tensor, ...], tangents: list[Tensor], target: Tensor):
        if self.kind == "hessian":
            output = forward(*theta)
            check_batch(self.spec, output, target)
            grads = torch.autograd.grad(summed_loss(self.spec, output, target), theta, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            if not flat.requires_grad:  # the loss is linear in these parameters
                return [torch.zeros_like(t) for t in tangents], output
            stacked = torch.cat([t.reshape(t.shape[0], -1) for t in tangents], dim=1)
            try:
                products = torch.autograd.grad(
                    flat, theta, grad_outputs=stacked, is_grads_batched=True, allow_unused=True, retain_graph=True
                )
            except RuntimeError:
                # some double-backward formulas (GroupNorm's) have no vmap batching rule: one vector at a time
                rows = [torch.autograd.grad(flat, theta, grad_outputs=row, allow_unused=True, retain_graph=True)
                        for row in stacked]
                products = [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                            for i in range(len(theta))]
            return [torch.zeros_like(t) if p is None else p for p, t in zip(products, tangents)], output
        if not self.reverse_mode_only:
            try:
                output, pullback = vjp(forward, *theta)
                check_batch(self.spec, output, target)
                jacobian_products = vmap(lambda *t: jvp(forward, theta, t)[1])(*tangents)
                return vmap(pullback)(hessian_vector_product(self.spec, output, jacobian_products, target)), output
            except (RuntimeError, NotImplementedError) as error:
                if not any(cue in str(error) for cue in _NO_FORWARD_MODE):
                    raise
                self.reverse_mode_only = True
                warnings.warn(f"the model has no forward-mode derivative under torch.func ({str(error)[:90]}…); "
                              "this operator's GGN products run by reverse mode twice (same values, slower)",
                              RuntimeWarning, stacklevel=5)
        return self._ggn_by_reverse_mode(forward, theta, tangents, target)

    def _ggn_by_reverse_mode(self, forward, theta: tuple[Tensor, ...], tangents: list[Tensor], target: Tensor):
        """``Jᵀ Λ J v`` with plain ``torch.autograd``: ``J v = ∂/∂u ⟨Jᵀ u, v⟩`` (``Jᵀ u`` is linear in ``u``), then one
        more backward for ``Jᵀ (Λ J v)`` — for models ``torch.func`` cannot transform (old-style
        ``torch.autograd.Function``s without ``setup_context``)."""
        output = forward(*theta)
        check_batch(self.spec, output, target)
        u = torch.zeros_like(output, requires_grad=True)
        pulled = torch.autograd.grad(output, theta, u, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(pulled) if g is not None and g.requires_grad]
        columns = []
        for column in range(tangents[0].shape[0]):
            if not used:  # the output does not depend on these parameters
                columns.append(torch.zeros_like(output))
                continue
            columns.append(torch.autograd.grad([pulled[i] for i in used], u, [tangents[i][column] for i in used],
                                               retain_graph=True)[0])
        weighted = hessian_vector_product(self.spec, output, torch.stack(columns), target)
        products = [torch.autograd.grad(output, theta, w, retain_graph=True, allow_unused=True) for w in weighted]
        return [torch.stack([torch.zeros_like(t[0]) if p[i] is None else p[i] for p in products])
                for i, t in enumerate(tangents)], output


# what torch says when torch.func cannot transform a model: an old-style autograd.Function, an op without a
# forward-mode derivative, a fused recurrent op on a PackedSequence (its kernel reads raw storage, which torch.func's
# wrapped tensors do not have)
_NO_FORWARD_MODE = ("functorch", "forward AD", "forward-mode", "setup_context", "doesn't have storage")


def _refuse_weight_norm_originals(model: nn.Module, names: list[str]) -> None:
    """Products that differentiate ``torch.nn.utils.parametrizations.weight_norm``'s originals are refused: torch
    has no forward-mode derivative of its fused ``torch._weight_norm`` (``kind="ggn"``), and its double backward
    gives an asymmetric Hessian (torch 2.13: 25 % relative Frobenius error against ``torch.func.hessian`` of the
    written-out ``g·v/‖v‖``, ``tests/exact/test_operators.py``), which would be silently wrong (``kind="hessian"``)."""
    modules = dict(model.named_modules())
    for name in names:
        owner, _, rest = name.rpartition(".parametrizations.")
        if not rest:
            continue
        originals = modules.get(f"{owner}.parametrizations.{rest.split('.')[0]}")
        if originals is not None and any(type(m).__name__ == "_WeightNorm" for m in originals):
            raise NotImplementedError(
                f"{name} is an original of torch.nn.utils.parametrizations.weight_norm, whose fused op torch has no "
                "forward-mode derivative for and a wrong (asymmetric) second derivative; exact products of it are "
                "refused. Its compute_kfac blocks (first derivatives only) are exact; for the exact path, write the "
                "weight as g * v / v.norm(dim=1, keepdim=True) in the model")


def layer_operator(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    layer: str | list[str] | None,
    kind: str = "hessian",
    distributed: bool = False,
    batch_norm_eval: bool = True,
    output: OutputSelector | None = None,
) -> CurvatureOperator:
    """Exact curvature block of one layer, of several layers jointly (a list), or of all parameters (``None``).

    A layer stands for its own parameters (``parameters(recurse=False)``), or for all parameters inside it when
    it has none of its own (a container block); a parameter name (``"embeddings.cls_token"``, as ``compute_kfac``
    names the blocks of single parameters) stands for that parameter. The order is
    ``torch.cat([p.flatten() for p in …])`` per layer, layers in the order given (``None``: ``model.parameters()``
    order, trainable parameters only). Any module with parameters works here, supported by the Kronecker path or
    not; a ``torch.compile``'d model is run through its eager module. ``distributed=True``: ``data`` is this rank's
    shard; every product is summed over the ranks of the process group (one all-reduce per product).
    ``batch_norm_eval``: BatchNorm modules run in eval mode during the products, as in ``compute_kfac``;
    ``output`` picks the output tensor from what the model returns, as in ``compute_kfac``.
    """
    model = eager_model(model)
    names = layer_parameter_names(model, layer)
    return CurvatureOperator(model, loss_fn, data, names, kind, distributed, batch_norm_eval, output)


def layer_parameter_names(model: nn.Module, layer: str | list[str] | None) -> list[str]:
    """The names of the parameters ``layer_operator`` covers for ``layer`` (its docstring), in public order."""
    if layer is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("the model has no trainable parameter")
        return names
    modules = dict(model.named_modules())
    # a tied parameter is listed once by named_parameters, under its first owner's name
    canonical = {id(p): n for n, p in model.named_parameters()}
    owned = {f"{m}.{p}" if m else p: param for m, module in modules.items()
             for p, param in module.named_parameters(recurse=False)}
    names = []
    for layer_name in [layer] if isinstance(layer, str) else layer:
        if layer_name in owned and layer_name not in modules:
            names.append(canonical[id(owned[layer_name])])
            continue
        if layer_name not in modules or layer_name == "":
            with_params = [n for n, m in modules.items() if n and list(m.parameters(recurse=False))]
            raise ValueError(f"no layer or parameter named {layer_name!r}; modules with parameters: {with_params}")
        # a module's own parameters (as its block covers them: MultiheadAttention's in-projection without
        # out_proj); a container without parameters of its own stands for everything inside it
        module = modules[layer_name]
        params = [p for _, p in own_parameters(module)] or list(module.parameters())
        own = [canonical[id(p)] for p in params if id(p) in canonical]
        if not own:
            raise ValueError(f"layer {layer_name!r} has no parameters")
        names.extend(own)
    if len(set(names)) != len(names):
        raise ValueError(f"layers {layer} share parameters; name each layer once")
    return names
