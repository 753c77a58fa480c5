"""Finite-difference curvature products (``exact/finite_difference.py``) against dense float64 references
(``torch.func.hessian``, ``Jᵀ Λ J``), their ``ε^(2/3)`` error law, and on a model sharded with FSDP's ``fully_shard``
over two gloo processes against the same products of the unsharded model in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kfac_hessian as kh
from kfac_hessian.distributed import local_tensor
from kfac_hessian.exact.finite_difference import finite_difference_operator

from ..conftest import batches, classification_data, mlp, on_two_gloo_ranks, regression_data
from ..references import dense_ggn, dense_hessian, rel_err

REFERENCES = {"hessian": dense_hessian, "ggn": dense_ggn}
LAYERS = ["0", "2"]  # the Linear layers of mlp(nn.Tanh)
SIZES = [4, 4, 3]  # uneven batches
EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float32, torch.float64)}


def problem(dtype=torch.float64, loss_fn=None):
    """A tanh MLP (smooth: a central difference never straddles a kink), its loss and 11 samples."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    X, y = regression_data() if isinstance(loss_fn, nn.MSELoss) else classification_data()
    return mlp(nn.Tanh).to(dtype), loss_fn, X.to(dtype), (y.to(dtype) if y.is_floating_point() else y)


def reference(kind, model, loss_fn, X, y, layers=LAYERS):
    """The dense float64 block, computed on a float64 copy of the model."""
    double = mlp(nn.Tanh)
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return REFERENCES[kind](double, loss_fn, X.double(), y.double() if y.is_floating_point() else y, layers)


def vectors(n: int, m: int, dtype=torch.float64):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce-mean", "mse-sum"])
def test_blocks_equal_dense_references_to_eps_two_thirds(loss_fn, kind, dtype):
    model, loss_fn, X, y = problem(dtype, loss_fn)
    data = batches(X, y, SIZES)
    for layer, layers in ((None, LAYERS), ("0", ["0"])):
        op = finite_difference_operator(model, loss_fn, data, layer, kind=kind)
        assert "finite-difference estimate" in op.status and op.dtype == dtype
        # the error law ~ε^(2/3) with constants of unit scale, to within a factor 10
        exact = reference(kind, model, loss_fn, X, y, layers)
        assert rel_err(op.to_dense().double(), exact) < 10 * EPS[dtype] ** (2 / 3)


STEPS = [10.0**-e for e in range(1, 11)]  # relative steps s, 1e-1 … 1e-10


def slope(errors, i, j):
    return math.log(errors[i] / errors[j]) / math.log(STEPS[i] / STEPS[j])


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_default_step_is_near_the_best_and_the_error_follows_eps_two_thirds(kind):
    """Error model of a central difference: ``e(s) = a s² + b ε/s``, minimal ``∝ ε^(2/3)`` at ``s ∝ ε^(1/3)``."""
    best = {}
    for dtype in (torch.float64, torch.float32):
        model, loss_fn, X, y = problem(dtype)
        data = batches(X, y, SIZES)
        V = vectors(39, 3)
        exact = reference(kind, model, loss_fn, X, y) @ V
        errors = [rel_err((finite_difference_operator(model, loss_fn, data, kind=kind, step=s) @ V.to(dtype)).double(),
                          exact) for s in STEPS]
        default = rel_err((finite_difference_operator(model, loss_fn, data, kind=kind) @ V.to(dtype)).double(), exact)
        i = min(range(len(STEPS)), key=errors.__getitem__)
        assert abs(slope(errors, 0, 1) - 2) < 0.2  # far above the best step, truncation: e ∝ s²
        assert abs(slope(errors, i + 2, i + 3) + 1) < 0.3  # two decades below it, rounding: e ∝ 1/s
        # a step off the best by a factor r costs (r² + 2/r)/3 (above) or (1/r² + 2r)/3 (below) of the best error;
        # the rule s = ε^(1/3) is claimed within r = 3 of the best step
        r = 3.0
        assert default <= max((r**2 + 2 / r) / 3, (r**-2 + 2 * r) / 3) * min(errors)
        best[dtype] = min(errors)
    # the best error scales as ε^(2/3): float32 over float64 is (ε₃₂/ε₆₄)^(2/3) ≈ 6.6e5 to within a factor 10
    # (an exponent 1/2 or 1 would be off by 28× and 820×)
    expected = (EPS[torch.float32] / EPS[torch.float64]) ** (2 / 3)
    assert expected / 10 < best[torch.float32] / best[torch.float64] < expected * 10


def test_lanczos_slq_and_hutchinson_run_on_it_within_the_finite_difference_error():
    model, loss_fn, X, y = problem()
    data = batches(X, y, SIZES)
    op = finite_difference_operator(model, loss_fn, data)
    exact_op = kh.layer_operator(model, loss_fn, data, None)
    exact = reference("hessian", model, loss_fn, X, y)
    error = (op.to_dense() - exact).norm()  # ‖E‖_F ≥ ‖E‖₂
    vals = kh.lanczos(op, 3, tol=1e-10, seed=0, dense_limit=0).eigenvalues
    top = torch.linalg.eigvalsh(exact)[-3:].flip(0)
    assert (vals - top).abs().max() <= error + 1e-10 * top.abs().max()  # Weyl: |Δλ| ≤ ‖E‖₂
    # the same probes z on both operators: |zᵀ E z| ≤ ‖E‖₂ ‖z‖² = ‖E‖₂ P for Rademacher probes
    bound = error * op.num_params
    assert abs(kh.hutchinson_trace(op, 4, seed=0).value - kh.hutchinson_trace(exact_op, 4, seed=0).value) <= bound
    slq = [kh.slq_density(o, n_probes=2, n_iter=8, seed=0).moment(1).value for o in (op, exact_op)]
    assert abs(slq[0] - slq[1]) <= bound


def test_model_parameters_gradients_and_modes_are_restored():
    model, loss_fn, X, y = problem()
    model.train()
    grads = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    before = [p.detach().clone() for p in model.parameters()]
    for kind in ("hessian", "ggn"):
        finite_difference_operator(model, loss_fn, batches(X, y, SIZES), "2", kind=kind) @ vectors(15, 2)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # bitwise, not θ + hv − hv
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert model.training and all(p.requires_grad for p in model.parameters())
    broken = [(X[:4], y[:4]), (X[4:], y[4:, None])]  # the second batch fails its check while θ is perturbed
    for kind in ("hessian", "ggn"):
        with pytest.raises(ValueError, match="targets have shape"):
            finite_difference_operator(model, loss_fn, broken, kind=kind) @ vectors(39, 1)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_bad_input_is_refused_with_what_to_do():
    model, loss_fn, X, y = problem()
    with pytest.raises(ValueError, match="kind"):
        finite_difference_operator(model, loss_fn, (X, y), kind="fisher")
    with pytest.raises(ValueError, match="step"):
        finite_difference_operator(model, loss_fn, (X, y), step=0.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        finite_difference_operator(mlp(nn.Tanh).bfloat16(), loss_fn, (X.bfloat16(), y))
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        finite_difference_operator(model, loss_fn, (X, y), "0")
    with pytest.raises(RuntimeError, match="process group"):
        finite_difference_operator(model, loss_fn, (X, y), distributed=True)
    dropping = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.1)).double()
    with pytest.raises(ValueError, match="eval mode"):
        finite_difference_operator(dropping, loss_fn, (X, y)) @ vectors(18, 1)


# --- FSDP over two gloo processes ---

SPLIT = [[4, 3], [2, 2]]  # each rank's batch sizes (7 and 4 samples): as many batches per rank, for FSDP's collectives
# one FSDP unit per Linear under the root, or every parameter in the root's unit; float32 too (its gradient reduction
# takes another collective in FSDP); and the unsharded model, data parallel only
LAYOUTS = {"per-layer": torch.float64, "root-only": torch.float64, "per-layer-float32": torch.float32,
           "unsharded": torch.float64}


def fully_shard_available() -> bool:
    if not dist.is_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def products(model, loss_fn, data, distributed):
    """Products with fixed vectors of the whole model's and of layer 2's blocks, and a Hutchinson trace."""
    out = {}
    for kind in ("hessian", "ggn"):
        for layer, n in ((None, 39), ("2", 15)):
            op = finite_difference_operator(model, loss_fn, data, layer, kind=kind, distributed=distributed)
            out[f"{kind}.{layer}"] = op @ vectors(n, 2, op.dtype)
    layer_op = finite_difference_operator(model, loss_fn, data, "2", distributed=distributed)
    out["trace"] = torch.tensor(kh.hutchinson_trace(layer_op, 3, seed=0).value)
    return out


def worker(rank):
    from torch.distributed.fsdp import fully_shard

    torch.set_default_dtype(torch.float64)
    results = {}
    for layout, dtype in LAYOUTS.items():
        model, loss_fn, X, y = problem(dtype)
        start = sum(SPLIT[0]) * rank
        shard = batches(X[start : start + sum(SPLIT[rank])], y[start : start + sum(SPLIT[rank])], SPLIT[rank])
        if layout.startswith("per-layer"):
            fully_shard(model[0])
            fully_shard(model[2])
        if layout != "unsharded":
            fully_shard(model)
            with pytest.raises(ValueError, match="distributed=True"):  # a sharded model reduces over the group
                finite_difference_operator(model, loss_fn, shard)
        before = [local_tensor(p).clone() for p in model.parameters()]
        out = products(model, loss_fn, shard, distributed=True)
        out["bitwise"] = torch.tensor(all(torch.equal(b, local_tensor(p))
                                          for b, p in zip(before, model.parameters())))
        out["no grad"] = torch.tensor(all(p.grad is None for p in model.parameters()))
        results[layout] = out
    return results


@pytest.mark.slow
@pytest.mark.skipif(not fully_shard_available(), reason="torch.distributed.fsdp.fully_shard is not available")
def test_fully_shard_over_two_gloo_ranks_equals_the_unsharded_products():
    singles, exact = {}, {}
    for dtype in (torch.float64, torch.float32):
        model, loss_fn, X, y = problem(dtype)
        singles[dtype] = products(model, loss_fn, batches(X, y, SIZES), distributed=False)
        for kind in ("hessian", "ggn"):
            for layer, layers in ((None, LAYERS), ("2", ["2"])):
                exact[(dtype, f"{kind}.{layer}")] = reference(kind, model, loss_fn, X, y, layers)
    per_rank = on_two_gloo_ranks(worker)
    ranks = {(layout, r): per_rank[r][layout] for layout in LAYOUTS for r in range(2)}
    for (layout, rank), got in ranks.items():
        dtype, where = LAYOUTS[layout], (layout, rank)
        assert bool(got["bitwise"]) and bool(got["no grad"]), where  # parameters bitwise, .grad untouched
        assert all(torch.equal(got[k], ranks[(layout, 0)][k]) for k in got), where  # the same on every rank
        for kind in ("hessian", "ggn"):
            for layer in (None, "2"):
                key = f"{kind}.{layer}"
                block = exact[(dtype, key)]
                single, sharded = singles[dtype][key].double(), got[key].double()
                reference_products = block @ vectors(block.shape[0], 2)
                error = rel_err(single, reference_products)  # the finite-difference error of the unsharded product
                # both are the same central difference, rounded differently: they differ by at most two rounding
                # errors, each below the finite-difference error (rounding is 2/3 of it at the best step)
                assert rel_err(sharded, single) <= 2 * error, (key, *where)
                assert rel_err(sharded, reference_products) <= 3 * error, (key, *where)
        # the same probes z on both: |Δ| ≤ max|zᵀ (E₁ − E₂) z| ≤ (‖E₁‖_F + ‖E₂‖_F) P with each block's error ‖E‖_F
        # below 10 ε^(2/3) ‖H‖_F (test_blocks_equal_dense_references_to_eps_two_thirds)
        block = exact[(dtype, "hessian.2")]
        bound = 2 * 10 * EPS[dtype] ** (2 / 3) * block.norm() * block.shape[0]
        assert abs(got["trace"] - singles[dtype]["trace"]) <= bound, where
