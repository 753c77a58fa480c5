"""Finite-difference curvature products (the FSDP path) against the exact ones: their error and their cost.

Usage: python -m benchmarks.finite_difference [--repeats 5]
Prints the two tables of docs/distributed.md ("Finite-difference products"):

* error: ``‖F V − B V‖ / ‖B V‖`` of ``finite_difference_operator`` (float64 and float32 parameters, default step)
  against the exact float64 ``layer_operator`` product ``B V`` of the same weights, 8 Gaussian vectors, an MLP
  64-32-32-10 (tanh and ReLU) with cross-entropy on 256 samples; the last column divides by ``ε^(2/3)`` of the dtype;
* cost: one product (one vector) in units of one forward+backward of the same data, finite difference beside the exact
  product, medians measured interleaved in one run on an MLP 256-1024-1024-10 (1.3 M parameters), 1 024 samples.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import kfac_hessian as kh


def mlp(widths: list[int], activation: type[nn.Module], dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([activation()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(dtype)


def error_rows() -> list[str]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    rows = ["| activation | kind | parameters | relative error | / ε^(2/3) |", "|---|---|---|---|---|"]
    for activation in (nn.Tanh, nn.ReLU):
        for kind in ("hessian", "ggn"):
            for dtype in (torch.float64, torch.float32):
                model = mlp([64, 32, 32, 10], activation, dtype)
                exact_model = mlp([64, 32, 32, 10], activation, torch.float64)
                exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})  # same weights
                P = sum(p.numel() for p in model.parameters())
                V = torch.randn(P, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
                inputs = X.to(dtype)
                exact = kh.layer_operator(exact_model, loss_fn, (inputs.double(), y), None, kind=kind) @ V
                estimate = kh.finite_difference_operator(model, loss_fn, (inputs, y), None, kind=kind)
                error = float(((estimate @ V.to(dtype)).double() - exact).norm() / exact.norm())
                relative = error / torch.finfo(dtype).eps ** (2 / 3)
                rows.append(f"| {activation.__name__} | {kind} | {str(dtype)[6:]} | {error:.1e} | {relative:.2g} |")
    return rows


def cost_rows(repeats: int) -> list[str]:
    model = mlp([256, 1024, 1024, 10], nn.Tanh, torch.float32)
    generator = torch.Generator().manual_seed(1)
    X, y = torch.randn(1024, 256, generator=generator), torch.randint(0, 10, (1024,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(sum(p.numel() for p in model.parameters()), 1, generator=generator)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    operators = {}
    for kind in ("hessian", "ggn"):
        operators[(kind, "finite difference")] = kh.finite_difference_operator(model, loss_fn, (X, y), None, kind=kind)
        operators[(kind, "exact")] = kh.layer_operator(model, loss_fn, (X, y), None, kind=kind)
    times: dict = {"fwd+bwd": []} | {key: [] for key in operators}
    for _ in range(repeats):  # interleaved: load on a shared machine hits every measurement alike
        for key, run in [("fwd+bwd", forward_backward)] + [(k, (lambda op=op: op @ v)) for k, op in operators.items()]:
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    unit = statistics.median(times["fwd+bwd"])
    rows = [f"one forward+backward: {unit * 1e3:.0f} ms (median of {repeats})", "",
            "| kind | finite difference (× fwd+bwd) | exact (× fwd+bwd) |", "|---|---|---|"]
    for kind in ("hessian", "ggn"):
        ratios = [statistics.median(times[(kind, which)]) / unit for which in ("finite difference", "exact")]
        rows.append(f"| {kind} | {ratios[0]:.1f} | {ratios[1]:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("\n".join(error_rows()), end="\n\n", flush=True)
    print("\n".join(cost_rows(args.repeats)))


if __name__ == "__main__":
    main()
