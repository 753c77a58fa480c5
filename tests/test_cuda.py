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


def test_structured_factors_and_attention_on_cuda():
    import warnings

    from benchmarks.reference_models import ResNet18, TinyGPT

    torch.manual_seed(0)
    gpt = TinyGPT(11, dim=8, depth=1, heads=2, context=6).double()
    tokens = torch.randint(0, 11, (3, 6))
    data = (tokens[:, :-1], tokens[:, 1:])
    cpu = kh.compute_kfac(gpt, nn.CrossEntropyLoss(), data)
    gpu = kh.compute_kfac(gpt.cuda(), nn.CrossEntropyLoss(), (data[0].cuda(), data[1].cuda()))
    for name, block in cpu.items():
        other = gpu[name]
        assert other.to_dense(max_params=10**6).is_cuda and other.eig().topk(2)[1].is_cuda
        assert torch.allclose(other.to_dense(max_params=10**6).cpu(), block.to_dense(max_params=10**6), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fused attention kernel may be replaced by the math one
        op = kh.layer_operator(gpt, nn.CrossEntropyLoss(), (data[0].cuda(), data[1].cuda()), "ln", kind="ggn")
        assert (op @ torch.ones(op.shape[0], device="cuda", dtype=torch.float64)).is_cuda
    resnet = ResNet18(width=4).cuda()
    kfac = kh.compute_kfac(resnet, nn.CrossEntropyLoss(), (torch.randn(2, 3, 32, 32, device="cuda"),
                                                          torch.tensor([0, 1], device="cuda")))
    assert all(b.device.type == "cuda" for b in kfac.values())
    assert all(e.eigenvalues.is_cuda for e in kfac.eig().values())


def test_per_sample_blocks_and_grouped_convolutions_on_cuda():
    from benchmarks.reference_models import ConvNeXtish, MobileNetish

    for model in (MobileNetish(width=4).double(), ConvNeXtish(widths=(4, 8)).double()):
        X, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])
        cpu = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
        gpu = kh.compute_kfac(model.cuda(), nn.CrossEntropyLoss(), (X.cuda(), y.cuda()))
        assert set(gpu) == set(cpu) and not gpu.skipped
        for name, block in cpu.items():
            assert gpu[name].device.type == "cuda"
            assert torch.allclose(gpu[name].eig().eigenvalues.cpu(), block.eig().eigenvalues, rtol=1e-8, atol=1e-14)


def test_ekfac_and_the_kronecker_fit_on_cuda():
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    for method in (kh.compute_ekfac, kh.compute_kronecker_fit):
        cpu = method(model, nn.CrossEntropyLoss(), (X, y))
        gpu = method(model.cuda(), nn.CrossEntropyLoss(), (X.cuda(), y.cuda()))
        model.cpu()
        for name, block in cpu.items():
            assert gpu[name].device.type == "cuda" and gpu[name].eig().topk(2)[1].is_cuda
            assert torch.allclose(gpu[name].to_dense().cpu(), block.to_dense(), rtol=1e-8, atol=1e-14), name
