"""Two gloo processes on one machine, data split unevenly: factors, eigenvalues and Lanczos equal the
single-process results (float64, ≤ 1e-10 relative)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kfac_hessian as kh

from .conftest import NormCNN, on_two_gloo_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SPLIT = [(0, 7), (7, 11)]  # rank 0 holds 7 samples, rank 1 holds 4


def problem():
    torch.manual_seed(0)
    model = NormCNN().double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(11, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def results(model, loss_fn, data, distributed):
    kfac = kh.compute_kfac(model, loss_fn, data, distributed=distributed)
    eigs = kfac.eig(distributed=distributed)
    op = kh.layer_operator(model, loss_fn, data, "conv1", distributed=distributed)
    vals = kh.lanczos(op, 4, tol=1e-12, seed=0, dense_limit=0).eigenvalues
    out = {f"{n}.block": f.to_dense() for n, f in kfac.items()}
    out |= {f"{n}.eigenvalues": e.eigenvalues for n, e in eigs.items()}
    out |= {f"{n}.topvec": e.topk(2)[1].abs() for n, e in eigs.items()}  # eigenvectors up to sign
    out["lanczos"] = vals
    return out


def worker(rank):
    torch.set_default_dtype(torch.float64)
    model, loss_fn, X, y = problem()
    lo, hi = SPLIT[rank]
    shard = list(zip(X[lo:hi].split(3), y[lo:hi].split(3)))  # uneven batches too
    return results(model, loss_fn, shard, distributed=True)


def test_two_gloo_ranks_equal_single_process():
    model, loss_fn, X, y = problem()
    single = results(model, loss_fn, list(zip(X.split(4), y.split(4))), distributed=False)
    ranks = on_two_gloo_ranks(worker)
    for key, expected in single.items():
        for got in ranks:
            assert (got[key] - expected).norm() <= 1e-10 * expected.norm(), key
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical on every rank


def test_distributed_needs_a_process_group_and_a_seed():
    model, loss_fn, X, y = problem()
    with pytest.raises(RuntimeError, match="process group"):
        kh.compute_kfac(model, loss_fn, (X, y), distributed=True)

    class FakeDistributed:
        distributed, shape, dtype, device = True, (3, 3), torch.float64, torch.device("cpu")

    with pytest.raises(ValueError, match="seed="):
        kh.lanczos(FakeDistributed(), 1, dense_limit=0)
