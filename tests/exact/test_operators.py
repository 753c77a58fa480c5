"""Exact operators against torch.func.hessian and an explicit Jᵀ Λ J, float64, streamed uneven batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import (
    FunctionScaled,
    NormCNN,
    OldStyleGeLU,
    TinyCNN,
    batches,
    binary_data,
    classification_data,
    mlp,
    regression_data,
)
from ..references import EXACT, dense_ggn, dense_hessian, rel_err

LOSSES = {
    "ce": (nn.CrossEntropyLoss, classification_data),
    "mse": (nn.MSELoss, regression_data),
    "bce": (nn.BCEWithLogitsLoss, binary_data),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_linear_layers_equal_dense(loss_name, reduction, kind):
    loss_cls, make_data = LOSSES[loss_name]
    loss_fn = loss_cls(reduction=reduction)
    model = mlp(nn.Tanh)
    X, y = make_data()
    data = batches(X, y, [4, 4, 3])
    reference = dense_hessian if kind == "hessian" else dense_ggn
    for layers in (["0"], ["2"], ["0", "2"]):
        op = kh.layer_operator(model, loss_fn, data, layers if len(layers) > 1 else layers[0], kind=kind)
        assert rel_err(op.to_dense(), reference(model, loss_fn, X, y, layers)) < EXACT


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_conv_layers_and_all_parameters_equal_dense(kind):
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    data = batches(X, y, [3, 2])
    reference = dense_hessian if kind == "hessian" else dense_ggn
    for layer in ("conv1", "conv2"):
        op = kh.layer_operator(model, nn.CrossEntropyLoss(), data, layer, kind=kind)
        assert rel_err(op.to_dense(), reference(model, nn.CrossEntropyLoss(), X, y, [layer])) < EXACT
    everything = kh.layer_operator(model, nn.CrossEntropyLoss(), data, None, kind=kind)
    assert rel_err(everything.to_dense(), reference(model, nn.CrossEntropyLoss(), X, y,
                                                    ["conv1", "conv2", "fc"])) < EXACT


def test_tanh_hessian_differs_from_ggn_relu_equals():
    X, y = classification_data()
    for activation, equal in ((nn.Tanh, False), (nn.ReLU, True)):
        model = mlp(activation)
        h = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", "hessian").to_dense()
        g = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", "ggn").to_dense()
        assert (rel_err(h, g) < EXACT) == equal


def test_relu_kfac_one_sample_equals_exact_hessian():
    model = mlp(nn.ReLU)
    X, y = classification_data(n=1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name in ("0", "2"):
        op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), name, "hessian")
        assert rel_err(kfac[name].to_dense(), op.to_dense()) < EXACT


def test_matvec_shapes_counts_and_scipy():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), batches(X, y, [6, 5]), "0")
    dense = op.to_dense()
    v = torch.randn(op.shape[0], 3)
    assert torch.allclose(op @ v, dense @ v, atol=1e-14) and (op @ v[:, 0]).shape == (op.shape[0],)
    passes, matvecs = op.n_data_passes, op.n_matvecs
    op @ v
    assert (op.n_data_passes, op.n_matvecs) == (passes + 1, matvecs + 3)
    sp = op.to_scipy()
    assert np.allclose(sp @ v.numpy(), (dense @ v).numpy(), atol=1e-14)
    assert np.allclose(sp.matvec(v[:, 0].numpy()), (dense @ v[:, 0]).numpy(), atol=1e-14)


def test_operator_bad_input():
    model = mlp()
    X, y = classification_data()
    with pytest.raises(ValueError, match="no layer or parameter named 'x'"):
        kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "x")
    with pytest.raises(ValueError, match="kind"):
        kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", kind="fisher")
    with pytest.raises(ValueError, match="has no parameters"):
        kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "1")
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0")
    with pytest.raises(ValueError, match="expected a vector"):
        op @ torch.ones(3)
    with pytest.raises(ValueError, match="max_params"):
        op.to_dense(max_params=3)


def test_layer_norm_block_on_exact_path():
    """The exact path covers any parameterized module, not only the Kronecker-supported ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    X, y = classification_data()
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "1")
    assert rel_err(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y, ["1"])) < EXACT


def test_group_norm_double_backward_without_batching_rule_falls_back_to_one_vector_at_a_time():
    model, loss_fn = NormCNN().double(), nn.CrossEntropyLoss()  # GroupNorm: no vmap rule for its double backward
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    data = list(zip(X.split(4), y.split(4)))
    for kind, reference in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        op = kh.layer_operator(model, loss_fn, data, "norm", kind=kind)
        assert rel_err(op.to_dense(), reference(model, loss_fn, X, y, ["norm"])) < 1e-10


def test_multihead_attention_in_eval_mode_takes_the_differentiable_path():
    """nn.MultiheadAttention's fused inference fast path (eval mode) has no forward-mode AD or double backward."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0]).transpose(1, 2)

    model = Attn().double().eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(3, 5, 4, generator=g), torch.randint(0, 3, (3, 5), generator=g)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for kind, reference in (("ggn", dense_ggn), ("hessian", dense_hessian)):
        op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "mha", kind=kind)
        with pytest.warns(RuntimeWarning, match="math attention kernel"):
            dense = op.to_dense()
        with sdpa_kernel([SDPBackend.MATH]):  # the reference's forward-over-reverse needs it as well
            assert rel_err(dense, reference(model, nn.CrossEntropyLoss(), X, y, ["mha"])) < EXACT
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_bfloat16_models_run_the_linear_algebra_in_float32():
    model = mlp(nn.Tanh).to(torch.bfloat16)
    X, y = classification_data()
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X.to(torch.bfloat16), y), "0", kind="ggn")
    assert op.dtype == torch.float32 and op.param_dtype == torch.bfloat16
    result = kh.lanczos(op, 3, seed=0, dense_limit=0, tol=1e-2)  # geqrf has no bfloat16 kernel: float32 here
    reference = torch.linalg.eigvalsh(kh.layer_operator(mlp(nn.Tanh), nn.CrossEntropyLoss(), (X, y), "0",
                                                        kind="ggn").to_dense()).flip(0)[:3]
    assert torch.allclose(result.eigenvalues.double(), reference, rtol=0.05)


def test_a_distributed_data_parallel_model_is_run_through_its_module(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = mlp(nn.Tanh)
        wrapped = nn.parallel.DistributedDataParallel(model)
        X, y = classification_data()
        op = kh.layer_operator(wrapped, nn.CrossEntropyLoss(), (X, y), "0", kind="ggn")
        assert rel_err(op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["0"])) < EXACT
        kfac = kh.compute_kfac(wrapped, nn.CrossEntropyLoss(), (X, y))
        assert kfac.layer_names == ["0", "2"]
    finally:
        dist.destroy_process_group()


class _FunctionAct(nn.Module):
    def forward(self, x):
        return OldStyleGeLU.apply(x)


def test_ggn_products_by_reverse_mode_where_torch_func_cannot_transform_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), _FunctionAct(), nn.Linear(4, 3)).double()
    X, y = classification_data(n=6)
    X = X.double()
    with pytest.warns(RuntimeWarning, match="reverse mode"):
        ggn = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", kind="ggn").to_dense()
    # the reference with torch.autograd.functional alone: J of the outputs, Λ of the loss, Jᵀ Λ J
    weight, bias = model[0].weight.detach(), model[0].bias.detach()

    def outputs(theta):
        return model[2](OldStyleGeLU.apply(X @ theta[:20].reshape(4, 5).T + theta[20:]))

    theta = torch.cat([weight.flatten(), bias])
    out = outputs(theta).detach()
    jac = torch.autograd.functional.jacobian(outputs, theta).reshape(out.numel(), -1)
    lam = torch.autograd.functional.hessian(lambda o: nn.functional.cross_entropy(o.reshape(out.shape), y),
                                            out.flatten())
    assert rel_err(ggn, jac.T @ lam @ jac) < EXACT


def test_torch_double_backward_of_weight_norm_is_asymmetric_which_is_why_its_exact_products_are_refused():
    """The measurement behind the refusal (``exact.operators``): torch's second derivative through the fused
    ``torch._weight_norm`` against ``torch.func.hessian`` of the written-out ``g·v/‖v‖``. If torch fixes it, this
    fails, and the refusal can go."""
    torch.manual_seed(0)
    g, v = torch.rand(4, 1, dtype=torch.float64) + 0.5, torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)

    def loss(theta, fused):
        g_, v_ = theta[:4].reshape(4, 1), theta[4:].reshape(4, 5)
        weight = torch._weight_norm(v_, g_, 0) if fused else g_ * v_ / v_.norm(dim=1, keepdim=True)
        return torch.tanh(weight @ x).square().sum()

    theta = torch.cat([g.flatten(), v.flatten()])
    fused = torch.autograd.functional.hessian(lambda t: loss(t, True), theta)
    written = torch.func.hessian(lambda t: loss(t, False))(theta)
    assert rel_err(written, written.T) < 1e-14 and rel_err(fused, written) > 0.1


def test_ignored_targets_on_both_paths_equal_torch_func_of_the_loss():
    """transformers' labels (``-100`` where a position has no target), uneven batches whose samples count different
    numbers of tokens: compute_kfac's exact per-sample/normalization blocks (``per_position=True``) and the exact
    operator's GGN equal torch.func's ``Jᵀ Λ J`` of the mean over the counted tokens, the Hessian torch.func.hessian's;
    the empirical Fisher is ``(1/N) Σ_n g_n g_nᵀ`` with ``ℓ_n = (1/τ) Σ_{counted t of n} ℓ_{n,t}``, ``τ = Z/N``."""
    import warnings

    from torch.func import functional_call, grad, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.reference_models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(7, dim=6, depth=1, heads=2, context=4).double()
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    X, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, [0, 1, 3]], y[1, 3], y[2, 1] = -100, -100, -100  # samples count 1, 3 and 3 tokens: Z = 7, τ = 7/3
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    data = batches(X, y, [2, 1])
    names = ["ln", "blocks.0.ln1"]
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
        warnings.simplefilter("ignore")  # the exact path may switch attention kernels
        ggn = kh.compute_kfac(model, loss_fn, data, layers=names, per_position=True)
        empirical = kh.compute_kfac(model, loss_fn, data, layers=["ln"], curvature="empirical")
        for name in names:
            reference = dense_ggn(model, loss_fn, X, y, [name])
            assert rel_err(ggn[name].to_dense(), reference) < EXACT, name
            assert rel_err(kh.layer_operator(model, loss_fn, data, name, kind="ggn").to_dense(), reference) < EXACT
        hessian = kh.layer_operator(model, loss_fn, data, "ln", kind="hessian").to_dense()
        assert rel_err(hessian, dense_hessian(model, loss_fn, X, y, ["ln"])) < EXACT
        # empirical Fisher of the LayerNorm: per-sample gradients of ℓ_n by torch.func
        params = {n: p.detach() for n, p in model.named_parameters()}
        ln = {n: params[n] for n in ("ln.weight", "ln.bias")}
        tau = (y != -100).sum() / len(y)

        def sample_loss(theta, tokens_n, target_n):
            logits = functional_call(model, {**params, **theta}, (tokens_n[None],))
            return nn.functional.cross_entropy(logits, target_n[None], reduction="sum") / tau

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(ln, X, y)
        g = torch.cat([per_sample["ln.weight"], per_sample["ln.bias"]], dim=1)
    assert rel_err(empirical["ln"].to_dense(), g.T @ g / len(y)) < EXACT


def test_a_batch_without_a_counted_target_is_refused_on_both_paths():
    model = mlp(nn.Tanh)
    X, y = classification_data(n=4)
    data = batches(X, torch.tensor([0, 2, -100, -100]), [2, 2])  # the second batch counts no target
    with pytest.raises(ValueError, match="no counted target"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="no counted target"):
        kh.layer_operator(model, nn.CrossEntropyLoss(), data, "0", kind="ggn").matvec(torch.randn(24))


def test_hessian_and_ggn_of_a_model_with_an_old_style_function_equal_its_plain_twin():
    """Hessian products by plain double backward, GGN products by reverse mode twice (torch.func refuses the
    Function), against torch.func on the same model written with plain torch ops — all parameters jointly."""
    model = nn.Sequential(nn.Linear(5, 4), FunctionScaled(), nn.Linear(4, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 4), FunctionScaled(plain=True), nn.Linear(4, 3)).double()
    twin.load_state_dict(model.state_dict())
    X, y = classification_data(n=6)
    X, data = X.double(), batches(X.double(), y, [4, 2])
    layers = ["0", "1", "2"]
    hessian = kh.layer_operator(model, nn.CrossEntropyLoss(), data, None, kind="hessian").to_dense()
    assert rel_err(hessian, dense_hessian(twin, nn.CrossEntropyLoss(), X, y, layers)) < EXACT
    with pytest.warns(RuntimeWarning, match="reverse mode"):
        ggn = kh.layer_operator(model, nn.CrossEntropyLoss(), data, None, kind="ggn").to_dense()
    assert rel_err(ggn, dense_ggn(twin, nn.CrossEntropyLoss(), X, y, layers)) < EXACT


class _PackedLSTM(nn.Module):
    """A fused LSTM over a ``PackedSequence``: torch.func cannot transform it (its kernel reads raw storage)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4), nn.Linear(4, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.lstm(packed)[1][0][-1])


def test_a_fused_lstm_on_a_packed_sequence_gets_ggn_products_by_reverse_mode():
    torch.manual_seed(0)
    model = _PackedLSTM().double()
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(3, 4, 3, generator=g, dtype=torch.float64), "lengths": torch.tensor([4, 2, 3])}
    y = torch.randint(0, 3, (3,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="reverse mode twice"):
        ggn = kh.layer_operator(model, loss_fn, [(inputs, y)], "head", kind="ggn").to_dense()
    hessian = kh.layer_operator(model, loss_fn, [(inputs, y)], "head", kind="hessian").to_dense()
    names = ["head.weight", "head.bias"]
    params = dict(model.named_parameters())

    def loss(*flat):
        theta = dict(params) | {n: t for n, t in zip(names, flat)}
        return loss_fn(torch.func.functional_call(model, theta, (), inputs), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[n].detach() for n in names))
    reference = torch.cat([torch.cat([b.reshape(params[r].numel(), params[c].numel()) for c, b in zip(names, row)],
                                     dim=1) for r, row in zip(names, blocks)])
    # the head is the last layer under cross-entropy: its Hessian block is its GGN block
    assert rel_err(hessian, reference) < EXACT and rel_err(ggn, reference) < EXACT
