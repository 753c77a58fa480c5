"""Curvature products by central finite differences of first derivatives, for models torch cannot differentiate
twice as they run: a model sharded with torch FSDP (``torch.distributed.fsdp.fully_shard``), where double backward
and ``torch.func`` do not work (torch 2.13) but forwards and one ordinary backward do.

* ``kind="hessian"``: ``H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h)``: two forward+backward passes over the data per
  vector;
* ``kind="ggn"``: per batch, ``J v ≈ (f(θ + h v) − f(θ − h v)) / (2h)`` from two forwards, ``u = Λ J v`` with the
  closed-form loss Hessian ``Λ`` at ``f(θ)`` (``kfac_hessian.losses``), and ``Jᵀ u`` by one ordinary backward of
  ``⟨f(θ), u⟩``: three forwards and one backward per vector.

The objective, its reduction scale and the parameter order are those of the exact operators (``exact/operators.py``,
``docs/conventions.md``): the summed loss over every batch (of every rank), scaled once all counts are known.

**Error and step.** A central difference errs by ``O(h²)`` (third derivatives) plus ``O(ε/h)`` (rounding of the
gradients or outputs, ``ε`` the machine epsilon of the parameters' dtype); the two balance at ``h ∝ ε^(1/3)``, where
the relative error is ``~ ε^(2/3)``: about ``4e-11`` in float64 and ``2e-5`` in float32 on a problem of unit scale.
Rule: per vector, ``h = s · ‖θ‖ / ‖v‖`` with ``s = ε^(1/3)`` (``step=`` sets ``s``) and ``‖θ‖`` the norm of the
operator's parameters (1 if they are all zero), so that every perturbation moves the parameters by the fraction ``s``
of their norm whatever the scale of ``v``. The products are homogeneous (``A (c v) = c A v``) but additive only up to
that error: they are a finite-difference *estimate* of the exact block, and ``status`` says so. bfloat16/float16
parameters are refused (``ε^(2/3) ≈ 4e-2``).

**Vectors** are those of every operator of the package: columns ``(P, m)`` in public order of the *full* (unsharded)
parameters, ``torch.cat([p.flatten() for p in …])``, the same on every rank; every rank gets the full product.
Each rank perturbs only its local shard of ``θ`` (FSDP gathers the perturbed full parameters in its forward) and
contributes its gradient shard; the shards, and the sample counts, are summed into the full vector by one
all-reduce per call of ``matmat`` (``kfac_hessian.distributed.all_reduce_sum``; a sharded model adds one of ``‖θ‖²``).
A vector is the size of the block on every rank: on a model too large for one device, restrict the operator to a
layer (``layer=``).

**Data parallel.** FSDP is data parallel: each rank streams its own batches (ranks must stream the same number of
batches, since every forward and backward is a collective; sizes may differ) and FSDP reduce-scatters the gradients,
summed over the ranks during the products (gradient divide factor 1, sum-only collectives). An unsharded model with
``distributed=True`` sums its whole gradients over the ranks in the same all-reduce, like ``layer_operator(...,
distributed=True)``.

The parameters are changed in place (that is what FSDP sees) and copied back bitwise from a copy of the local
shards after every vector, even on error; ``.grad``, ``requires_grad``, train/eval flags and BatchNorm statistics are
restored (``model_state.preserved_model_state``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import distributed as _distributed
from ..data import Data, OutputSelector, iterate_batches, model_output, require_reiterable
from ..linear_operator import LinearOperator
from ..losses import check_batch, counted_terms, hessian_vector_product, loss_spec, summed_loss
from ..model_state import LOW_PRECISION, eager_model, preserved_model_state
from .operators import layer_parameter_names


def default_step(dtype: torch.dtype) -> float:
    """``ε^(1/3)`` of ``dtype``: the relative step that balances truncation ``O(h²)`` and rounding ``O(ε/h)``."""
    return torch.finfo(dtype).eps ** (1 / 3)


class FiniteDifferenceOperator(LinearOperator):
    """Finite-difference estimate of the ``(P, P)`` Hessian or GGN block of some parameters (module docstring), in the
    order of ``param_names``; ``status`` says what it is. ``step`` is the relative step ``s`` (``h = s‖θ‖/‖v‖``).

    ``n_matvecs`` and ``n_data_passes`` count the work done so far (a pass is one forward+backward over the data for
    ``kind="hessian"``, three forwards and one backward for ``kind="ggn"``; one vector at a time).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Data,
        param_names: list[str],
        kind: str = "hessian",
        distributed: bool = False,
        step: float | None = None,
        batch_norm_eval: bool = True,
        output: OutputSelector | None = None,
    ):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        require_reiterable(data)
        self.model, self.data, self.kind, self.distributed = model, data, kind, distributed
        self.batch_norm_eval, self.output = batch_norm_eval, output
        self.spec = loss_spec(loss_fn)
        params = dict(model.named_parameters())
        if distributed:
            _distributed.require_process_group()
        elif any(_distributed.is_sharded(p) for p in params.values()):
            raise ValueError("the model is sharded (FSDP's fully_shard): its gradients are reduced over the process "
                             "group, so pass distributed=True and call every product on every rank with its own data")
        self.param_names = list(param_names)
        self.params = [params[n] for n in self.param_names]
        frozen = [n for n, p in zip(self.param_names, self.params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters {frozen} do not require gradients; finite-difference products take "
                             "gradients of them: set requires_grad=True or leave those parameters out")
        local = _distributed.local_tensor(self.params[0])
        if local.dtype in LOW_PRECISION:
            raise ValueError(f"finite differences in {local.dtype} err by ~ε^(2/3) ≈ 4e-2 relative: run the model in "
                             "float32 or float64 for these products")
        self.step = default_step(local.dtype) if step is None else float(step)
        if not self.step > 0:
            raise ValueError(f"step must be a positive relative step size, got {step}")
        self._sizes = [p.numel() for p in self.params]
        offsets = [0, *itertools.accumulate(self._sizes[:-1])]
        # where each rank's local elements sit in the operator's full vector
        self._positions = [_distributed.local_positions(p) + offset for p, offset in zip(self.params, offsets)]
        self._reference = torch.empty(0, dtype=local.dtype, device=local.device)
        what = "Hessian" if kind == "hessian" else "GGN"
        self.status = (f"finite-difference estimate of the {what} block: central differences, relative step "
                       f"{self.step:.1e} (error ~ ε^(2/3))")
        self.n_matvecs = 0
        self.n_data_passes = 0

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    @property
    def reference(self) -> Tensor:
        return self._reference

    def __repr__(self) -> str:
        return f"FiniteDifferenceOperator(kind={self.kind!r}, P={self.num_params}, params={self.param_names})"

    def matmat(self, columns: Tensor) -> Tensor:
        _refuse_train_mode_dropout(self.model)
        m = columns.shape[1]
        result = torch.zeros(self.num_params, m, dtype=self.dtype, device=self.device)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)  # samples, counted loss terms
        with preserved_model_state(self.model, self.batch_norm_eval), _distributed.summed_fsdp_gradients(self.model), \
                torch.enable_grad():
            shards = [_distributed.local_tensor(p) for p in self.params]
            originals = [s.detach().clone() for s in shards]
            theta_norm = self._parameter_norm(originals)
            with _restored(shards, originals):
                for j in range(m):
                    column = columns[:, j]
                    column_norm = float(column.norm())
                    if column_norm == 0:  # every rank holds the same columns: all skip alike
                        continue
                    direction = [column[index].reshape(s.shape) for index, s in zip(self._positions, shards)]
                    h = self.step * theta_norm / column_norm
                    local, counts = self._product(shards, originals, direction, h)
                    for index, piece in zip(self._positions, local):
                        result[index, j] = piece.reshape(-1).to(self.dtype)
        if self.distributed:  # disjoint gradient shards (FSDP) or every rank's whole gradient: one sum
            result, counts = _distributed.all_reduce_sum([result, counts])
        self.n_matvecs += m
        n_samples, counted = int(counts[0]), int(counts[1])
        if n_samples == 0:  # only zero columns
            return result
        return result * self.spec.scale(n_samples, counted / n_samples)

    def _parameter_norm(self, originals: list[Tensor]) -> float:
        """``‖θ‖`` of the operator's full parameters (1 if zero): sharded parameters summed over the ranks."""
        squares = torch.zeros(2, dtype=torch.float64, device=self.device)  # sharded, whole
        for p, value in zip(self.params, originals):
            squares[0 if _distributed.is_sharded(p) else 1] += value.double().square().sum()
        if any(_distributed.is_sharded(p) for p in self.params):  # every rank holds a slice of these
            sharded = _distributed.all_reduce_sum([squares[:1]])[0]
            squares = torch.cat([sharded, squares[1:]])
        norm = float(squares.sum().sqrt())
        return norm if norm > 0 else 1.0

    def _product(self, shards: list[Tensor], originals: list[Tensor], direction: list[Tensor], h: float):
        """This rank's shard of the unscaled product with one direction, and the (local) sample and term counts."""
        if self.kind == "hessian":
            plus, counts = self._gradient(shards, originals, direction, h)
            minus, _ = self._gradient(shards, originals, direction, -h)
            return [(a - b) / (2 * h) for a, b in zip(plus, minus)], counts
        return self._gauss_newton(shards, originals, direction, h)

    def _gradient(self, shards, originals, direction, h: float) -> tuple[list[Tensor], Tensor]:
        """This rank's shard of ``∇(summed loss)`` at ``θ + h v`` over all batches."""
        _set(shards, originals, direction, h)
        self._clear_gradients()
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _, inputs, target in iterate_batches(self.data, self.device):
            output = model_output(self.model, inputs, self.output)
            check_batch(self.spec, output, target)
            summed_loss(self.spec, output, target).backward()
            counts += torch.tensor([output.shape[0], counted_terms(self.spec, output, target)], device=self.device)
        self.n_data_passes += 1
        return self._local_gradients(), counts

    def _gauss_newton(self, shards, originals, direction, h: float) -> tuple[list[Tensor], Tensor]:
        """This rank's shard of ``Σ_batches Jᵀ Λ (J v)`` with ``J v`` by central differences of two forwards."""
        self._clear_gradients()
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _, inputs, target in iterate_batches(self.data, self.device):
            with torch.no_grad():
                outputs = []
                for sign in (1.0, -1.0):
                    _set(shards, originals, direction, sign * h)
                    outputs.append(model_output(self.model, inputs, self.output))
                    _distributed.free_gathered_parameters(self.model)
            _set(shards, originals)
            output = model_output(self.model, inputs, self.output)
            check_batch(self.spec, output, target)
            jacobian_product = (outputs[0] - outputs[1]) / (2 * h)
            weighted = hessian_vector_product(self.spec, output, jacobian_product.unsqueeze(0), target)[0]
            (output * weighted).sum().backward()
            counts += torch.tensor([output.shape[0], counted_terms(self.spec, output, target)], device=self.device)
        self.n_data_passes += 1
        return self._local_gradients(), counts

    def _clear_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _local_gradients(self) -> list[Tensor]:
        return [torch.zeros_like(_distributed.local_tensor(p)) if p.grad is None
                else _distributed.local_tensor(p.grad).detach().clone() for p in self.params]


def _refuse_train_mode_dropout(model: nn.Module) -> None:
    """Two forwards that draw different dropout masks differ by far more than ``h J v``."""
    dropouts = [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
                and m.p > 0]
    if dropouts:
        raise ValueError(f"dropout modules {dropouts} are in train mode: every forward of a finite difference would "
                         "draw another mask; put them in eval mode (model.eval()) for the products")


def _set(shards: list[Tensor], originals: list[Tensor], direction: list[Tensor] | None = None, h: float = 0.0) -> None:
    """Local shards ← ``θ + h v`` (``θ`` itself, bitwise, without a direction), computed from the saved ``θ``."""
    with torch.no_grad():
        for shard, original, d in zip(shards, originals, direction or [None] * len(shards)):
            if d is None:
                shard.copy_(original)
            else:
                torch.add(original, d.to(original.dtype), alpha=h, out=shard)


@contextlib.contextmanager
def _restored(shards: list[Tensor], originals: list[Tensor]) -> Iterator[None]:
    try:
        yield
    finally:
        _set(shards, originals)


def finite_difference_operator(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    layer: str | list[str] | None = None,
    kind: str = "hessian",
    distributed: bool = False,
    step: float | None = None,
    batch_norm_eval: bool = True,
    output: OutputSelector | None = None,
) -> FiniteDifferenceOperator:
    """Finite-difference estimate of the Hessian (``kind="hessian"``) or GGN (``kind="ggn"``) block of one layer, of
    several layers jointly (a list) or of all trainable parameters (``None``), chosen and ordered as by
    ``layer_operator`` — for a model sharded with FSDP's ``fully_shard`` (``distributed=True``, every rank calling
    every product with its own batches), where the exact operators cannot run. Error ``~ ε^(2/3)`` relative; ``step``
    is the relative step ``s`` of ``h = s‖θ‖/‖v‖`` (default ``ε^(1/3)``); see the module docstring. ``lanczos``,
    ``slq_density`` and ``hutchinson_trace`` run on it (with ``seed=`` when distributed).
    """
    model = eager_model(model)
    names = layer_parameter_names(model, layer)
    return FiniteDifferenceOperator(model, loss_fn, data, names, kind, distributed, step, batch_norm_eval, output)
