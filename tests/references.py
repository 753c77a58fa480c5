"""Dense float64 references computed independently of the library (torch.func on the whole data set)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

# the relative error below which a float64 result counts as exact (equal in exact arithmetic, round-off apart)
EXACT = 1e-10


def _flat_function(model: nn.Module, names: list[str], fn):
    """Turn ``fn(params_dict)`` into a function of one flat vector of the parameters ``names``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta0 = torch.cat([params[n].reshape(-1) for n in names])

    def wrapped(theta: Tensor):
        values = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        return fn({**params, **dict(zip(names, values))})

    return wrapped, theta0


def layer_param_names(model: nn.Module, layers: list[str]) -> list[str]:
    """The parameters of ``layers``: a module name stands for its own parameters (all inside it when it has none of
    its own), a parameter name for itself."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())

    def own(layer: str) -> list[str]:
        module = modules[layer]
        names = [n for n, _ in module.named_parameters(recurse=False)] or [n for n, _ in module.named_parameters()]
        return [f"{layer}.{n}" if layer else n for n in names]

    return [name for layer in layers for name in ([layer] if layer in params else own(layer))]


def _call(model: nn.Module, params: dict, X, output):
    """The model's output tensor: ``X`` a tensor or a dict of keyword inputs, ``output`` a selector (or ``.logits``)."""
    raw = functional_call(model, params, (), X) if isinstance(X, dict) else functional_call(model, params, (X,))
    if output is not None:
        return output(raw)
    return raw if isinstance(raw, Tensor) else raw.logits


def dense_hessian(model: nn.Module, loss_fn: nn.Module, X, y: Tensor, layers: list[str], output=None) -> Tensor:
    """``∇²_θ loss_fn(model(X), y)`` for the parameters of ``layers`` (public order), by ``torch.func.hessian``."""
    f, theta = _flat_function(model, layer_param_names(model, layers), lambda p: loss_fn(_call(model, p, X, output), y))
    return hessian(f)(theta)


def dense_ggn(model: nn.Module, loss_fn: nn.Module, X, y: Tensor, layers: list[str], output=None) -> Tensor:
    """``Jᵀ Λ J`` with ``J`` = Jacobian of all outputs (``jacrev``) and ``Λ`` = Hessian of the loss in the outputs."""
    f, theta = _flat_function(model, layer_param_names(model, layers), lambda p: _call(model, p, X, output))
    out = f(theta).detach()
    jac = jacrev(f)(theta).reshape(out.numel(), -1)
    lam = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return jac.T @ lam @ jac


def naive_kfac_sequential(model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, index: int
                          ) -> tuple[Tensor, Tensor]:
    """Per-sample KFAC reference for ``model[index]`` (a Linear on (N, d) inputs) of an ``nn.Sequential``.

    ``A = (1/N) Σ ā āᵀ``; ``G = Σ_n J_nᵀ Λ_n J_n`` with ``J_n`` the Jacobian of the rest of the network at
    sample ``n``'s layer output and ``Λ_n`` the loss Hessian (with the reduction) at its output.
    """
    prefix, layer, suffix = model[:index], model[index], model[index + 1 :]
    with torch.no_grad():
        a = prefix(X)
        z = layer(a)
        out = suffix(z)
    a_bar = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1) if layer.bias is not None else a
    A = a_bar.T @ a_bar / len(a)
    jac = jacrev(suffix)(z)  # (N, C, N, o)
    lam = hessian(lambda o: loss_fn(o, y))(out)  # (N, C, N, C)
    G = sum(jac[n, :, n, :].T @ lam[n, :, n, :] @ jac[n, :, n, :] for n in range(len(X)))
    return A.detach(), G.detach()


def public_kron(G: Tensor, A: Tensor, has_bias: bool) -> Tensor:
    """``G ⊗ A`` permuted from augmented order to public (weight, then bias) order, built element by element."""
    d_out, width = G.shape[0], A.shape[0]
    d_in = width - int(has_bias)
    order = [r * width + c for r in range(d_out) for c in range(d_in)]
    if has_bias:
        order += [r * width + d_in for r in range(d_out)]
    full = torch.kron(G, A)
    return full[order][:, order]


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def check_factor_spectra(factor, dense: Tensor, k: int = 3, atol: float = 1e-12) -> None:
    """A structured factor's ``eig`` (eigenvalues, top-k pairs), ``@`` and ``trace`` against its dense matrix."""
    eig = factor.eig()
    reference = torch.linalg.eigvalsh(dense).flip(0).clamp_min(0)
    assert torch.allclose(eig.eigenvalues, reference, atol=atol)
    values, vectors = eig.topk(k)
    assert torch.allclose(values, reference[:k], atol=atol)
    assert torch.allclose(vectors @ dense @ vectors.T, torch.diag(values), atol=atol)
    assert torch.allclose(vectors @ vectors.T, torch.eye(k, dtype=dense.dtype), atol=atol)
    v = torch.randn(factor.num_params, 2, dtype=dense.dtype, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(factor @ v, dense @ v, atol=1e-14)
    assert abs(float(factor.trace()) - float(torch.trace(dense))) <= 1e-12 * abs(float(torch.trace(dense)))


def nearest_kronecker_error(H: Tensor, layout, diagonal_a: bool = False) -> float:
    """``min ‖H − blockdiag_g(G_g ⊗ A_g)‖_F`` over Kronecker products (``A_g`` diagonal with ``diagonal_a``), from the
    SVD of each group's rearranged block (Van Loan–Pitsianis), dense."""
    kron = layout.to_matrices(torch.eye(layout.num_params, dtype=H.dtype))  # (P, groups, d_out, width)
    H4 = torch.einsum("pq,pgoi,qhjk->goihjk", H, kron, kron)  # H in the layout's (group, row, column) order
    removed = 0.0
    for g in range(layout.groups):
        block = H4[g, :, :, g]  # (o, i, o', i')
        if diagonal_a:
            R = torch.diagonal(block, dim1=1, dim2=3)  # (o, o', i): only A_ii enter
        else:
            R = block.permute(0, 2, 1, 3)  # (o, o', i, i')
        R = R.reshape(layout.d_out**2, -1)
        removed += float(torch.linalg.svdvals(R)[0]) ** 2
    return max(float(H.square().sum()) - removed, 0.0) ** 0.5
