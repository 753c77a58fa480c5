"""The model as the user left it: the guard that restores its state, and its eager (uncompiled) form.

Every curvature pass runs inside ``preserved_model_state`` and on ``eager_model(model)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, batch_norm_eval: bool = False) -> Iterator[None]:
    """Restore train/eval flags, ``requires_grad`` and ``.grad`` of every parameter, the running statistics of every
    BatchNorm (a train-mode forward pass updates them), the weight of every ``Embedding(max_norm=…)`` (its forward
    renormalizes looked-up rows in place) and the buffers of every parametrization, on exit — even on error.

    ``batch_norm_eval``: put every BatchNorm in eval mode inside (the curvature passes' default). Parametrizations
    always run in eval mode inside: ``spectral_norm`` takes a power-iteration step on its ``_u``/``_v`` buffers at
    every train-mode access of the weight, so the pass, the per-sample re-runs and the exact products would each see
    a different function.
    """
    modes = [(m, m.training) for m in model.modules()]
    batch_norms = [m for m in model.modules() if is_batch_norm(m)]
    parametrizations = [m for m in model.modules() if isinstance(m, parametrize.ParametrizationList)]
    statistics = [(b, b.detach().clone()) for m in batch_norms for b in m.buffers(recurse=False)]
    statistics += [(b, b.detach().clone()) for m in parametrizations for b in m.buffers()]
    statistics += [(m.weight, m.weight.detach().clone()) for m in model.modules()
                   if isinstance(m, nn.Embedding) and m.max_norm is not None]
    for module in parametrizations:
        module.eval()
    if batch_norm_eval:
        for module in batch_norms:
            module.eval()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for buffer, value in statistics:
                buffer.copy_(value)


@contextlib.contextmanager
def quiet_vmap_fallbacks() -> Iterator[None]:
    """Silence torch's notice that an operator runs through vmap's slow fallback (no batching rule): it concerns
    torch's own coverage, the results are the same, and our per-sample and exact products are correct with it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule")
        yield


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision our sums and linear algebra use for data of ``dtype``: float32 for bfloat16/float16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _is_compiled_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule"


def _is_data_parallel(module: nn.Module) -> bool:
    return isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def eager_model(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d or data-parallel model wraps (``_orig_mod``, ``.module``; the model itself
    otherwise).

    A compiled graph does not run the forward hooks and autograd-node hooks that gather the factors (``G``
    silently came out zero), and ``DistributedDataParallel``'s forward synchronizes buffers, which ``torch.func``
    transforms refuse; curvature is computed on the wrapped module: the same function and the same parameters,
    with the module names of the wrapped model (data parallelism: ``compute_kfac(distributed=True)``). A compiled
    *submodule* cannot be unwrapped without changing the model: that is refused with the fix.
    """
    while _is_compiled_wrapper(model) or _is_data_parallel(model):
        model = model._orig_mod if _is_compiled_wrapper(model) else model.module
    for name, module in model.named_modules():
        if _is_compiled_wrapper(module):
            raise ValueError(
                f"submodule {name!r} is a torch.compile'd OptimizedModule, whose compiled graph bypasses the hooks "
                f"that gather curvature; compute curvature on the eager model (e.g. set `{name} = {name}._orig_mod` "
                "for the analysis, or compile after it)"
            )
    return model


def no_autocast() -> contextlib.ExitStack:
    """Our own arithmetic (factor sums, loss-Hessian columns, eigensolvers) in the precision we chose, also when the
    caller runs the model under ``torch.autocast``."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


@contextlib.contextmanager
def eager_calls(model: nn.Module) -> Iterator[None]:
    """Modules compiled in place (``module.compile()``) run their eager forward inside (restored on exit)."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    try:
        for module, _ in compiled:
            module._compiled_call_impl = None
        yield
    finally:
        for module, impl in compiled:
            module._compiled_call_impl = impl
