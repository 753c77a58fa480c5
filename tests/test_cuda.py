"""CUDA: factors, eigendecompositions and Lanczos stay on the model's device and match the CPU results.

Skipped cleanly on machines without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import TinyCNN, classification_data, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_factors_spectra_and_lanczos_on_cuda():
    cpu_model = mlp(nn.Tanh)
    X, y = classification_data()
    cpu = kh.compute_kfac(cpu_model, nn.CrossEntropyLoss(), (X, y))
    gpu_model = mlp(nn.Tanh).cuda()
    gpu = kh.compute_kfac(gpu_model, nn.CrossEntropyLoss(), (X.cuda(), y.cuda()))
    for name in cpu:
        assert gpu[name].A.is_cuda and gpu[name].G.is_cuda
        assert torch.allclose(gpu[name].to_dense().cpu(), cpu[name].to_dense(), atol=1e-12)
        e = gpu[name].eig()
        assert e.a_values.is_cuda and e.topk(3)[1].is_cuda
    op = kh.layer_operator(gpu_model, nn.CrossEntropyLoss(), (X.cuda(), y.cuda()), "0")
    result = kh.lanczos(op, 3, tol=1e-10, seed=0, dense_limit=0)
    assert result.eigenvectors.is_cuda
    dense = kh.layer_operator(cpu_model, nn.CrossEntropyLoss(), (X, y), "0").to_dense()
    assert torch.allclose(result.eigenvalues.cpu(), torch.linalg.eigvalsh(dense).flip(0)[:3], rtol=1e-8)


def test_cnn_factors_moved_with_device_argument():
    model = TinyCNN().double().cuda()
    X, y = torch.randn(3, 2, 4, 4, device="cuda"), torch.tensor([0, 1, 2], device="cuda")
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=0, device="cpu")
    assert not kfac["conv1"].A.is_cuda
