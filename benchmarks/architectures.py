"""Real architectures end to end: a digits MLP, ResNet-18 with BatchNorm and a small GPT with tied embeddings; and the
probe set (``benchmarks/probe_models.py``): models as their authors write them, each checked against its own dense GGN.

Usage: python -m benchmarks.architectures [--train-seconds 60] [--k 10] [--quick] [--output FILE]
       python -m benchmarks.architectures --probes [--quick] [--title TITLE] [--output FILE]
For each model: compute_kfac (GGN), eigendecompositions of every factor (timed), the summary's coverage, and
for a few layers the overlap of the KFAC, EKFAC and nearest-Kronecker top-k eigenspaces with the exact GGN block's
(block Lanczos), their λ₁ against the exact one, and the Lanczos products from a warm (Kronecker) start.
The GPT is trained for --train-seconds on the characters of Python's own argparse source (shipped with
Python, nothing downloaded). Writes docs/results/architectures.md; --quick (a smoke run of about a minute: ResNet-18 at
width 16, a GPT of width 32 and context 8, fewer layers) prints only, unless --output is given.

--probes: for every probe model (float64, one batch of N = 3), the share of its trainable parameters
``compute_kfac`` covers, every block's label, the relative Frobenius error of every block labelled exact against the
dense GGN block ``Jᵀ Λ J`` (``J`` by plain ``torch.autograd`` row by row, ``Λ`` by
``torch.autograd.functional.hessian``: independent of the library, and working where ``torch.func`` does not), the
exact path's products (``layer_operator(…, None, kind="ggn")``) against the same matrix, and every exception: a
*refusal* when it is one of the library's own ``ValueError``/``TypeError``/``NotImplementedError``/
``FloatingPointError`` (raised in ``kfac_hessian``), a *failure* otherwise. The table replaces the section named
``--title`` (default: "After: the working tree") of the output's probe part and leaves the rest of the file as it is;
--quick runs only the probes that need no optional package (torch built-ins, recurrent, parametrized) and prints.
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.probe_models import Probe, Problem
from benchmarks.reference_models import ResNet18, TinyGPT
from kfac_hessian.blocks import KroneckerBlock

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(kh.__file__).resolve().parent


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def overlaps(model, loss_fn, data, layers, k, dense_limit=2000, fit_iterations=3, **options):
    """Per layer: the top-k eigenspace overlap and λ₁ ratio of KFAC, EKFAC and the nearest Kronecker product with the
    exact GGN block (block Lanczos), and the Lanczos products from a random start and from the Kronecker top-k
    eigenvectors (``start=``). ``options`` go to every factor computation (``per_position``)."""
    timings = {}
    kfac, timings["kfac"] = timed(lambda: kh.compute_kfac(model, loss_fn, data, layers=layers, **options))
    ekfac, timings["ekfac"] = timed(lambda: kh.compute_ekfac(model, loss_fn, data, kfac=kfac, **options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fixed number of passes: the last change is reported below
        fit, timings["fit"] = timed(lambda: kh.compute_kronecker_fit(model, loss_fn, data, kfac=kfac,
                                                                     iterations=fit_iterations, tol=0.0, **options))
    rows = []
    for name in layers:
        k_layer = min(k, kfac[name].num_params - 1)
        op = kh.layer_operator(model, loss_fn, data, name, kind="ggn")
        result, seconds = timed(kh.lanczos, op, k_layer, tol=1e-3, seed=0, dense_limit=dense_limit)
        row = {"layer": name, "structure": type(kfac[name]).__name__, "P": kfac[name].num_params, "k": k_layer,
               "exact_seconds": seconds, "matvecs": result.n_matvecs}
        for label, approximation in (("kfac", kfac), ("ekfac", ekfac), ("fit", fit)):
            values, vectors = approximation[name].eig().topk(k_layer)
            row[f"{label}_overlap"] = kh.eigenspace_overlap(vectors, result.eigenvectors)
            row[f"{label}_top_ratio"] = float(values[0] / result.eigenvalues[0])
        if isinstance(kfac[name], KroneckerBlock) and kfac[name].num_params > dense_limit:
            start = kfac[name].eig().topk(k_layer)[1]
            warm = kh.lanczos(op, k_layer, tol=1e-3, seed=0, dense_limit=dense_limit, start=start)
            row["warm_matvecs"] = warm.n_matvecs
        rows.append(row)
        print(rows[-1], flush=True)
    return rows, timings


def digits_section(args):
    from benchmarks.datasets import load_tabular
    from benchmarks.reference_models import relu_mlp

    split = load_tabular("digits")
    torch.manual_seed(0)
    model = relu_mlp((64, 128, 128, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = 100 if args.quick else 1000
    for _ in range(steps):
        index = torch.randint(0, len(split.X_train), (64,), generator=g)
        loss = loss_fn(model(split.X_train[index]), split.y_train[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(split.X_train).argmax(1) == split.y_train).float().mean())
    data = list(zip(split.X_train.split(512), split.y_train.split(512)))
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    rows, costs = overlaps(model, loss_fn, data, ["0", "2", "4"], args.k, dense_limit=1000)
    extra = (f"Trained {steps} Adam steps (batch 64, lr 1e-3) on the {len(split.X_train)} training images: training "
             f"accuracy {accuracy:.3f}. Every measurement on all training images.")
    return {"name": "ReLU MLP 64-128-128-10 on scikit-learn digits",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": len(split.X_train), "extra": extra}


def resnet_section(args):
    torch.manual_seed(0)
    model = ResNet18(width=16 if args.quick else 64)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(args.n_images, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n_images,), generator=g)
    data = list(zip(X.split(32), y.split(32)))
    loss_fn = nn.CrossEntropyLoss()
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    layers = ["fc", "layers.3.1.bn2", "layers.1.0.conv1"] if not args.quick else ["fc", "layers.3.1.bn2"]
    rows, costs = overlaps(model, loss_fn, data[:1], layers, args.k)
    width = 16 if args.quick else 64
    return {"name": f"ResNet-18 (width {width}, random 32×32 inputs, N={args.n_images})",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": 32, "extra": ""}


def train_tiny_gpt(seconds: float, dim: int, model=None, context: int = 64, n_eval: int = 64):
    """TinyGPT (or ``model``, any module mapping (N, T) tokens to (N, V, T) logits) trained with AdamW for ``seconds``
    on the characters of argparse's source; returns ``(model, vocabulary, eval batches of 32, info)``."""
    text = inspect.getsource(argparse)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    torch.manual_seed(0)
    model = model if model is not None else TinyGPT(len(chars), dim=dim, depth=2, heads=4, context=context)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start, steps, first = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        offsets = torch.randint(0, len(ids) - context - 1, (32,), generator=g)
        batch = torch.stack([ids[o : o + context + 1] for o in offsets])
        loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        steps += 1
    offsets = torch.randint(0, len(ids) - context - 1, (n_eval,), generator=g)
    batch = torch.stack([ids[o : o + context + 1] for o in offsets])
    data = list(zip(batch[:, :-1].split(32), batch[:, 1:].split(32)))
    info = (f"Trained {steps} AdamW steps in {seconds:.0f} s on {len(text)} characters of argparse's source "
            f"(vocabulary {len(chars)}): training loss {first:.2f} → {loss.item():.2f}.")
    return model, len(chars), data, info


def gpt_section(args):
    context, dim = (8, 32) if args.quick else (64, 64)  # --quick: V·8 per-position passes a batch, not V·64
    model, vocabulary, data, info = train_tiny_gpt(args.train_seconds, dim, context=context)
    loss_fn = nn.CrossEntropyLoss()
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    layers = ["blocks.0.q", "blocks.1.mlp.0", "ln", "pos", "tok", "head"]
    # the same batch as the exact path, per-position columns: the per-sample gradients of the exact GGN
    rows, costs = overlaps(model, loss_fn, data[:1], layers if not args.quick else layers[:2], args.k,
                           dense_limit=200 if args.quick else 2000, fit_iterations=2, per_position=True)
    extra = (f"{info} The exact-batch factors use per-position columns (`per_position=True`: the exact GGN's "
             f"per-sample gradients, {vocabulary}·{context} backward passes per batch).")
    return {"name": f"TinyGPT (dim {dim}, 2 blocks, context {context}, tied head)",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": 32, "extra": extra}

# --- the probe set ---------------------------------------------------------------------------------------------------

REFUSALS = (ValueError, TypeError, NotImplementedError, FloatingPointError)  # the library's own, with what to do
EXACT_PATH_COLUMNS = 3  # random columns the exact path's products are checked on


@dataclass
class ReferenceGGN:
    """The dense GGN ``Jᵀ Λ J`` of one batch over the trainable parameters, kept factored: ``jacobian`` ``(m, P)``
    (outputs × parameters, public order) and ``loss_hessian`` ``(m, m)``; ``columns`` maps every parameter name
    (tied aliases included) to its columns."""

    jacobian: torch.Tensor
    loss_hessian: torch.Tensor
    columns: dict[str, slice]

    def block(self, names: list[str]) -> torch.Tensor:
        J = torch.cat([self.jacobian[:, self.columns[n]] for n in names], dim=1)
        return J.T @ self.loss_hessian @ J

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.jacobian.T @ (self.loss_hessian @ (self.jacobian @ V))


@dataclass
class ProbeResult:
    """What one probe measured (``run_probe``); errors are relative Frobenius errors."""

    name: str
    family: str
    tolerance: float
    refusal_expected: bool = False
    trainable: int = 0
    covered: int | None = None
    labels: dict[str, str] = field(default_factory=dict)  # block → describe()
    exact_errors: dict[str, float] = field(default_factory=dict)  # blocks labelled exact → error to the dense GGN
    skipped: dict[str, str] = field(default_factory=dict)  # trainable entries left out → why
    frozen: int = 0  # entries left out because all their parameters are frozen
    exact_path: str = ""  # the exact path's relative error, or its refusal
    exact_path_error: float | None = None
    refusals: list[str] = field(default_factory=list)  # the library's own errors: "where: Type: message"
    failures: list[str] = field(default_factory=list)  # raw exceptions, wrong numbers, side effects
    leaked_warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def coverage(self) -> float | None:
        return None if self.covered is None else self.covered / self.trainable

    def over_tolerance(self) -> dict[str, float]:
        return {n: e for n, e in self.exact_errors.items() if not e <= self.tolerance}

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for description in self.labels.values():
            status = description.split(" — ", 1)[1] if " — " in description else "(no label)"
            counts[_label_category(status)] = counts.get(_label_category(status), 0) + 1
        return counts

    def meets_goals(self) -> bool:
        """The issue's goals: every trainable parameter covered (or, where a refusal is expected, ``compute_kfac``
        refused with the library's own error), every exact block and the exact path within tolerance, no raw
        exception, no side effect (a refusal of the exact path is allowed)."""
        exact_path_ok = self.exact_path_error is None or self.exact_path_error <= self.tolerance
        covered = self.refused() if self.refusal_expected else self.coverage == 1.0
        return covered and not self.over_tolerance() and not self.failures and exact_path_ok

    def refused(self) -> bool:
        """Whether ``compute_kfac`` refused the problem with one of the library's own errors."""
        return self.covered is None and any(r.startswith("compute_kfac:") for r in self.refusals)


def _label_category(status: str) -> str:
    for prefix in ("exact entries", "exact", "approximation"):
        if status.startswith(prefix):
            return prefix
    return "estimate" if "estimate" in status else "biased" if "biased" in status else status


def _probe_output(problem: Problem, model: nn.Module) -> torch.Tensor:
    raw = model(**problem.inputs) if isinstance(problem.inputs, dict) else model(problem.inputs)
    selector = problem.options.get("output")
    if selector is not None:
        return selector(raw)
    return raw if isinstance(raw, torch.Tensor) else raw.logits


def _jacobian_rows(out: torch.Tensor, params: list[torch.Tensor], seeds: torch.Tensor, batched: bool) -> torch.Tensor:
    """``seedsᵀ J`` (``seeds`` ``(m,)`` or, ``batched``, ``(k, m)``), flattened over ``params`` in order."""
    grads = torch.autograd.grad(out, params, seeds, retain_graph=True, allow_unused=True, is_grads_batched=batched)
    lead = (seeds.shape[0],) if batched else ()
    return torch.cat([(g if g is not None else p.new_zeros(*lead, *p.shape)).reshape(*lead, -1)
                      for g, p in zip(grads, params)], dim=-1)


def reference_ggn(problem: Problem, batched: bool = True) -> ReferenceGGN:
    """``J`` by ``torch.autograd.grad`` (all rows in one batched backward; one backward pass per output entry where the
    model cannot be batched — fused recurrent ops, ``autograd.Function``s — or with ``batched=False``) and ``Λ`` by
    ``torch.autograd.functional.hessian``; ``Λ`` carries the loss's reduction (the mean over the counted
    positions)."""
    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]  # tied parameters once
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)], start = slice(start, start + p.numel()), start + p.numel()
    columns = {n: offsets[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in offsets}
    out = _probe_output(problem, model).reshape(-1)
    seeds = torch.eye(out.numel(), dtype=out.dtype)
    rows = None
    if batched:
        try:
            rows = _jacobian_rows(out, params, seeds, batched=True)
        except (RuntimeError, NotImplementedError):  # no batching rule for one of the model's backward ops
            out = _probe_output(problem, model).reshape(-1)
    if rows is None:
        rows = torch.stack([_jacobian_rows(out, params, seed, batched=False) for seed in seeds])
    logits = _probe_output(problem, model).detach()
    loss_hessian = torch.autograd.functional.hessian(lambda o: problem.loss_fn(o, problem.targets), logits)
    return ReferenceGGN(rows, loss_hessian.reshape(out.numel(), out.numel()), columns)


def _raised_by_library(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is the library's own code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def _classify(error: BaseException, where: str, result: ProbeResult) -> str:
    """File ``error`` as a refusal or a failure; returns which, with its type."""
    message = f"{where}: {type(error).__name__}: {' '.join(str(error).split())}"
    refused = isinstance(error, REFUSALS) and _raised_by_library(error)
    (result.refusals if refused else result.failures).append(message)
    return f"{'refused' if refused else 'failure'} ({type(error).__name__})"


def _model_state(model: nn.Module) -> list:
    """Parameters and buffers, ``requires_grad`` and ``.grad``, modes and hooks: what a pass must leave as it was."""
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    flags = [(p.requires_grad, p.grad is None) for p in model.parameters()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]
    return [tensors, flags, [m.training for m in model.modules()], hooks]


def _same_state(before: list, after: list) -> bool:
    tensors_equal = len(before[0]) == len(after[0]) and all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    return tensors_equal and before[1:] == after[1:]


def _torch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings issued inside torch itself (not by the model's code nor by the library): noise for the user."""
    torch_dir = Path(torch.__file__).resolve().parent
    return sorted({" ".join(str(w.message).split())[:160] for w in caught
                   if Path(w.filename).resolve().is_relative_to(torch_dir)
                   and not issubclass(w.category, (DeprecationWarning, FutureWarning))})


def measure_kfac(kfac: kh.KFAC, reference: ReferenceGGN, result: ProbeResult) -> None:
    """Into ``result``: every block's label, every block labelled exact against the dense GGN (on the entries it
    keeps), the skipped trainable entries with their reasons and the covered trainable parameters."""
    from kfac_hessian.blocks import DenseBlocks
    from kfac_hessian.layers import FROZEN

    for name, block in kfac.items():
        result.labels[name] = block.describe()
        if not block.status.startswith("exact"):
            continue
        dense = reference.block(kfac.parameter_names[name])
        approx = block.to_dense()
        if block.status.startswith("exact entries") and isinstance(block, DenseBlocks):
            kept = torch.zeros_like(dense, dtype=torch.bool)
            kept[block.index[:, :, None], block.index[:, None, :]] = True
            dense, approx = dense[kept], approx[kept]
        scale = float(dense.norm())
        result.exact_errors[name] = float((approx - dense).norm()) / (scale if scale > 0 else 1.0)
    result.skipped = {n: why for n, why in kfac.skipped.items() if why != FROZEN}
    result.frozen = sum(1 for why in kfac.skipped.values() if why == FROZEN)
    result.covered = kfac.covered_trainable_params
    if kfac.trainable_params != result.trainable:
        result.failures.append(f"KFAC.trainable_params {kfac.trainable_params} != {result.trainable} trainable")


def _check_exact_path(problem: Problem, reference: ReferenceGGN, result: ProbeResult) -> None:
    """``layer_operator(model, …, None, kind="ggn")`` on random columns against ``Jᵀ Λ J``."""
    output = problem.options.get("output")
    op = kh.layer_operator(problem.model, problem.loss_fn, (problem.inputs, problem.targets), None, kind="ggn",
                           output=output)
    if op.num_params != result.trainable:
        result.exact_path = f"covers {op.num_params} of {result.trainable} trainable parameters"
        result.failures.append(f"exact path: {result.exact_path}")
        return
    V = torch.randn(op.num_params, EXACT_PATH_COLUMNS, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = reference.matmat(V)
    result.exact_path_error = float((op @ V - expected).norm() / expected.norm())
    result.exact_path = f"{result.exact_path_error:.1e}"


def run_probe(probe: Probe) -> ProbeResult:
    """Build the probe's problem and measure it (``ProbeResult``); never raises for the library's sake."""
    result = ProbeResult(probe.name, probe.family, probe.tolerance, bool(probe.refusal_expected))
    start = time.perf_counter()
    problem = probe.build()
    result.trainable = sum(p.numel() for p in problem.model.parameters() if p.requires_grad)  # tied ones once
    reference = reference_ggn(problem)
    state = _model_state(problem.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            kfac = kh.compute_kfac(problem.model, problem.loss_fn, (problem.inputs, problem.targets), curvature="ggn",
                                   **problem.options)
        except Exception as error:  # noqa: BLE001 - every exception is what this probe reports
            _classify(error, "compute_kfac", result)
        else:
            measure_kfac(kfac, reference, result)
        try:
            _check_exact_path(problem, reference, result)
        except Exception as error:  # noqa: BLE001
            result.exact_path = _classify(error, "layer_operator", result)
    result.leaked_warnings = _torch_warnings(caught)
    if not _same_state(state, _model_state(problem.model)):
        result.failures.append("the model was changed (parameters, buffers, flags, .grad, modes or hooks)")
    for name, error in result.over_tolerance().items():
        result.failures.append(f"{name}: labelled {result.labels[name].split(' — ')[-1]!r} but {error:.2e} off the "
                               f"dense GGN block (tolerance {probe.tolerance:.0e})")
    result.seconds = time.perf_counter() - start
    return result


PROBES_HEADING = "## Probe set: models as their authors write them"
PROBES_INTRO = (
    "Generated by `python -m benchmarks.architectures --probes --title TITLE` (models: `benchmarks/probe_models.py`; "
    "each asserted in `tests/benchmarks/test_architectures.py`). Every model float64, eval mode, one "
    "batch (N = 3; the language models N = 2, T = 3, `per_position=True`), `nn.CrossEntropyLoss`, "
    "`compute_kfac(curvature=\"ggn\")`. *Coverage*: `KFAC.covered_trainable_params` over the trainable parameters. "
    "*Labels*: how many blocks say they are exact, exact entries, estimates or approximations (`block.status`). "
    "*Exact blocks*: the largest relative Frobenius error of a block labelled exact against the dense GGN block "
    "`Jᵀ Λ J` (plain autograd, independent of the library). *Exact path*: `layer_operator(model, …, None, "
    "kind=\"ggn\")` on 3 random columns against the same matrix. A *refusal* is the library's own `ValueError`, "
    "`TypeError`, `NotImplementedError` or `FloatingPointError`; a *failure* anything else (raw exceptions, a block "
    "labelled exact off its target, a changed model). *Goals*: 100 % coverage (a refusal for data against the "
    "library's convention), every exact block and the exact path "
    "within tolerance (1e-10; 1e-6 for Llama, T5 and BLOOM, whose norms or attention softmax compute in float32), no "
    "failure.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def probe_section(title: str, results: list[ProbeResult], note: str) -> list[str]:
    """``### title``: one table row per probe, then every skipped parameter, failure and refusal, model by model."""
    lines = [f"### {title}", "", note, "",
             "| model | class | coverage | labels | exact blocks: max error | exact path | skipped | failures | "
             "goals | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        coverage = "–" if r.coverage is None else f"{r.covered}/{r.trainable} ({100 * r.coverage:.1f} %)"
        coverage += f"; {r.frozen} frozen entries apart" if r.frozen else ""
        labels = ", ".join(f"{count} {category}" for category, count in r.label_counts().items()) or "–"
        worst = f"{max(r.exact_errors.values()):.1e}" if r.exact_errors else "–"
        refused = " (refusal)" if r.refusals and r.covered is None else ""
        lines.append(f"| {r.name} | {r.family} | {coverage}{refused} | {labels} | {worst} | {_cell(r.exact_path)} | "
                     f"{len(r.skipped)} | {len(r.failures)} | {'met' if r.meets_goals() else 'NOT met'} | "
                     f"{r.seconds:.1f} |")
    lines += ["", "Skipped parameters, failures and refusals, model by model:", ""]
    for r in results:
        items = ([f"skipped `{n}`: {why}" for n, why in r.skipped.items()] + [f"FAILURE {f}" for f in r.failures]
                 + [f"refusal {f}" for f in r.refusals]
                 + [f"torch warning reaching the user: {w}" for w in r.leaked_warnings])
        if items:
            lines.append(f"* **{r.name}**")
            lines += [f"  * {_cell(item)}" for item in items]
    return lines + [""]


def with_probe_section(text: str, section: list[str]) -> str:
    """``text`` (a results file) with its probe part rewritten: the heading, the current introduction, then its
    ``### …`` sections in their order, ``section`` replacing the one of its title (or appended); the part above the
    probe heading is kept as it is."""
    lines = text.splitlines()
    head = lines[: lines.index(PROBES_HEADING)] if PROBES_HEADING in lines else lines
    probe_part = lines[len(head):]
    starts = [i for i, line in enumerate(probe_part) if line.startswith("### ")]
    sections = {probe_part[i]: probe_part[i:j] for i, j in zip(starts, starts[1:] + [len(probe_part)])}
    sections[section[0]] = section
    body = [PROBES_HEADING, "", PROBES_INTRO, ""]
    for part in sections.values():
        body += part + ([""] if part[-1] else [])  # a blank line before the next heading
    return "\n".join(head + ([""] if head and head[-1] else []) + body).strip("\n") + "\n"


def probes_main(args) -> None:
    """Run the probe set and write (or print) its section."""
    from benchmarks.probe_models import PROBES

    chosen = [p for p in PROBES if not (args.quick and p.requires) and all(_importable(m) for m in p.requires)]
    results = []
    for probe in chosen:
        results.append(run_probe(probe))
        print(f"{probe.name}: {'met' if results[-1].meets_goals() else 'NOT met'} ({results[-1].seconds:.1f} s)",
              flush=True)
        for name, description in results[-1].labels.items():  # every block's label; the table counts them
            error = results[-1].exact_errors.get(name)
            print(f"    {name}: {description}" + (f" (error {error:.1e})" if error is not None else ""))
    left_out = [p.name for p in PROBES if p not in chosen]
    print(f"kfac_hessian imported from {PACKAGE}")
    note = (f"{time.strftime('%Y-%m-%d %H:%M')} UTC, CPU, "
            f"{torch.get_num_threads()} threads; {sum(r.meets_goals() for r in results)} of {len(results)} models "
            f"meet the goals." + (f" Not run (--quick, or a package missing): {', '.join(left_out)}." if left_out
                                  else ""))
    section = probe_section(args.title, results, note)
    if args.output is None:
        print("\n".join(section))
        return
    text = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(with_probe_section(text, section))
    print("\n".join(section))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute; prints only")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the table (default: docs/results/architectures.md; none with --quick)")
    parser.add_argument("--probes", action="store_true", help="run the probe set only (module docstring)")
    parser.add_argument("--title", default="After: the working tree", help="the probe section's title")
    args = parser.parse_args()
    if args.probes:
        if args.output is None and not args.quick:
            args.output = ROOT / "docs" / "results" / "architectures.md"
        probes_main(args)
        return
    if args.quick:
        args.train_seconds, args.n_images, args.k = 2.0, 16, 3
    elif args.output is None:
        args.output = ROOT / "docs" / "results" / "architectures.md"
    sections = [digits_section(args), resnet_section(args), gpt_section(args)]
    lines = ["# Real architectures (generated)", "",
             f"Command: `python -m benchmarks.architectures --train-seconds {args.train_seconds:.0f} --k {args.k}` "
             f"({time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads, float32). "
             "Overlap = ‖V_K V_Eᵀ‖²_F / k between an approximation's top-k eigenvectors and the exact GGN block's "
             "(block Lanczos, residual tol 1e-3), on one batch of 32 (all training images for the MLP): KFAC "
             "(G ⊗ A; exact dense blocks for normalization layers), EKFAC (`compute_ekfac`: the Kronecker eigenbasis "
             "with the exact second moments) and the nearest Kronecker product (`compute_kronecker_fit`, "
             "3 power-iteration passes; 2 for the GPT). Every EKFAC eigenvalue is a Rayleigh quotient of the exact "
             "block, so its λ₁ ratio is at most 1. The last column: Lanczos products to the same tolerance started "
             "from the Kronecker top-k eigenvectors (`lanczos(start=…)`) instead of a random vector.", ""]
    for s in sections:
        lines += [f"## {s['name']}: {s['params']:,} parameters", "", s["extra"], "",
                  f"compute_kfac (ggn): {s['t_factors']:.1f} s; eig of all factors: {s['t_eig']:.2f} s with vectors, "
                  f"{s['t_eig_values']:.2f} s values only. Summary: {s['summary'].strip()}", "",
                  f"On the exact batch, for the layers below: compute_kfac {s['costs']['kfac']:.2f} s, compute_ekfac "
                  f"(eigenvectors + one pass) {s['costs']['ekfac']:.2f} s, compute_kronecker_fit "
                  f"{s['costs']['fit']:.2f} s.", "",
                  "| layer | structure | P | k | top-k overlap KFAC / EKFAC / fit | "
                  "λ₁ ÷ exact λ₁: KFAC / EKFAC / fit | exact Lanczos s (matvecs) | matvecs from the Kronecker top-k |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            overlap = " / ".join(f"{r[f'{m}_overlap']:.3f}" for m in ("kfac", "ekfac", "fit"))
            ratio = " / ".join(f"{r[f'{m}_top_ratio']:.3f}" for m in ("kfac", "ekfac", "fit"))
            warm = str(r["warm_matvecs"]) if "warm_matvecs" in r else "– (dense)"
            lines.append(f"| {r['layer']} | {r['structure']} | {r['P']:,} | {r['k']} | {overlap} | {ratio} | "
                         f"{r['exact_seconds']:.1f} ({r['matvecs']}) | {warm} |")
        lines.append("")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        previous = args.output.read_text().splitlines() if args.output.exists() else []
        probes = previous[previous.index(PROBES_HEADING):] if PROBES_HEADING in previous else []  # kept as it is
        args.output.write_text("\n".join(lines + probes) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
