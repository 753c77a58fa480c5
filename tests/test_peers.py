"""Cross-check against curvlinops' KFACLinearOperator (optional: skipped when curvlinops is not installed).

Same conventions (shared/design/math.md §4): fisher_type "type-2" = our "ggn", "empirical" = ours except for
MSELoss(mean), which curvlinops scales by C more (docs/conventions.md). Run with curvlinops-for-pytorch
installed next to torch 2.13.0, e.g. in a separate virtual environment.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import TinyCNN, batches, binary_data, classification_data, mlp, regression_data
from .references import rel_err

curvlinops = pytest.importorskip("curvlinops")


def curvlinops_dense(model, loss_fn, data, layer, fisher_type, approx):
    module = dict(model.named_modules())[layer]
    params = list(module.parameters())
    op = curvlinops.KFACLinearOperator(
        model, loss_fn, params, data, fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False,
        check_deterministic=False,
    )
    n = sum(p.numel() for p in params)
    return op @ torch.eye(n, dtype=params[0].dtype)


@pytest.mark.parametrize("ours, theirs", [("ggn", "type-2"), ("empirical", "empirical")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_cross_entropy(ours, theirs, reduction):
    model = mlp(nn.Tanh)
    X, y = classification_data()
    data = batches(X, y, [6, 5])
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    kfac = kh.compute_kfac(model, loss_fn, data, curvature=ours)
    for layer in ("0", "2"):
        assert rel_err(kfac[layer].to_dense(), curvlinops_dense(model, loss_fn, data, layer, theirs, "expand")) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["mse", "bce", "ce", "sequence_ce"])
def test_empirical_fisher_differs_by_the_terms_per_sample_under_mean(case, reduction):
    """curvlinops' empirical Fisher is τ times ours under reduction="mean" (τ loss terms per sample: C outputs for MSE
    and BCE, T positions for a sequence cross-entropy, 1 for classification), the same under "sum"
    (docs/conventions.md §3)."""
    from benchmarks.reference_models import SequenceMLP

    if case == "sequence_ce":
        torch.manual_seed(0)
        model, layer, tau = SequenceMLP(d=8, depth=1, classes=3).double(), "head", 5
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4, 5), generator=g)
    else:
        model, layer = mlp(nn.Tanh), "2"
        X, y = {"mse": regression_data, "bce": binary_data, "ce": classification_data}[case]()
        tau = 1 if case == "ce" else 3
    loss_cls = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}.get(case, nn.CrossEntropyLoss)
    loss_fn = loss_cls(reduction=reduction)
    ours = kh.compute_kfac(model, loss_fn, (X, y), curvature="empirical")[layer].to_dense()
    theirs = curvlinops_dense(model, loss_fn, [(X, y)], layer, "empirical", "expand")
    assert rel_err((tau if reduction == "mean" else 1) * ours, theirs) < 1e-10


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_cnn_type2(approx):
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), [(X, y)], approx=approx)
    for layer in ("conv1", "conv2", "fc"):
        theirs = curvlinops_dense(model, nn.CrossEntropyLoss(), [(X, y)], layer, "type-2", approx)
        assert rel_err(kfac[layer].to_dense(), theirs) < 1e-10


def test_sequence_model_expand_type2():
    """Per-position network with (N, C, T) logits: identical factors (conventions §3 on reduce)."""
    from benchmarks.reference_models import SequenceMLP

    torch.manual_seed(0)
    model = SequenceMLP(d=8, depth=1, classes=3).double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4, 5), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), [(X, y)])
    for layer in ("blocks.0.0", "blocks.0.2", "head"):
        theirs = curvlinops_dense(model, nn.CrossEntropyLoss(), [(X, y)], layer, "type-2", "expand")
        assert rel_err(kfac[layer].to_dense(), theirs) < 1e-10


def test_sequence_model_reduce_cross_position_terms():
    """Characterizes a documented difference (conventions §3): with approx="reduce" and several output positions,
    curvlinops' type-2 G carries cross-position terms, as our joint columns (position_signs=0) do — the two differ
    only through the square-root bases — while the per-position G (the default random signs estimate it) has none;
    A is identical."""
    import warnings

    from benchmarks.reference_models import SequenceMLP

    torch.manual_seed(0)
    model = SequenceMLP(d=8, depth=1, classes=3).double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4, 5), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the joint columns' warning
        joint = kh.compute_kfac(model, nn.CrossEntropyLoss(), [(X, y)], approx="reduce", position_signs=0)["head"]
    exact = kh.compute_kfac(model, nn.CrossEntropyLoss(), [(X, y)], approx="reduce", per_position=True)["head"]
    signs = kh.compute_kfac(model, nn.CrossEntropyLoss(), [(X, y)], approx="reduce", position_signs=256)["head"]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.head.parameters()), [(X, y)], fisher_type="type-2",
        kfac_approx="reduce", separate_weight_and_bias=False, check_deterministic=False,
    )
    op.compute_kronecker_factors()
    theirs_A, theirs_G = op._input_covariances["head"], op._gradient_covariances["head"]
    assert rel_err(joint.A, theirs_A) < 1e-12 and rel_err(exact.A, theirs_A) < 1e-12
    difference = rel_err(joint.G, theirs_G)
    print(f"relative Frobenius difference of G: joint {difference:.3e}, per-position {rel_err(exact.G, theirs_G):.3e}")
    assert 1e-4 < difference < 0.1  # the same cross terms in another square-root basis
    assert rel_err(exact.G, theirs_G) > 0.5 and rel_err(joint.G, exact.G) > 1.0
    assert rel_err(signs.G, exact.G) < 0.06


class _TensorIn(nn.Module):
    """A transformers model behind a tensor-in, tensor-out forward (curvlinops' interface): token ids or images in,
    logits out with the classes on axis 1."""

    def __init__(self, model, output, text: bool):
        super().__init__()
        self.model, self.output, self.text = model, output, text

    def forward(self, x):
        raw = self.model(input_ids=x) if self.text else self.model(x)
        return self.output(raw) if self.output is not None else raw.logits


@pytest.mark.parametrize("family", ["bert", "llama", "vit", "resnet"])
def test_transformers_models_linear_and_conv_layers(family):
    """The layers curvlinops also covers (nn.Linear, nn.Conv2d without groups) of transformers models: identical
    blocks; ours cover every other parameter too. Llama with one position: with several output positions both
    libraries' joint loss-Hessian columns add cross-position terms, and those depend on the square root each one
    chooses (ours and curvlinops' differ by ~1e-4 relative there; conventions §3)."""
    from .conftest import transformers_problem

    model, inputs, targets, output = transformers_problem(family, n=2, length=1 if family == "llama" else 3)
    wrapped = _TensorIn(model, output, text=isinstance(inputs, dict)).double()
    X = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    kfac = kh.compute_kfac(wrapped, nn.CrossEntropyLoss(), (X, targets))
    assert kfac.covered_params() == kfac.total_params
    modules = dict(wrapped.named_modules())
    layers = [n for n in kfac
              if isinstance(modules.get(n), (nn.Linear, nn.Conv2d)) and getattr(modules[n], "groups", 1) == 1]
    assert layers
    tolerance = 1e-6 if family == "llama" else 1e-10  # Llama's RMSNorm computes in float32
    theirs = {layer: curvlinops_dense(wrapped, nn.CrossEntropyLoss(), [(X, targets)], layer, "type-2", "expand")
              for layer in layers[:8]}
    scale = max(float(t.norm()) for t in theirs.values())  # attention over one key: its q/k blocks are zero
    for layer, block in theirs.items():
        assert float((kfac[layer].to_dense() - block).norm()) <= tolerance * scale, layer
