"""Every Kronecker kind's rows reproduce the layer's own forward pass: z = W ā at every location, per group; which
parameters a Kronecker block covers."""

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.layers import kind_for
from kfac_hessian.layers.conv import ConvKind
from kfac_hessian.layers.linear import LinearKind

from ..conftest import Transpose, classification_data
from ..references import EXACT, dense_ggn, rel_err


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(4, 3), (2, 4)),
        (nn.Linear(4, 3), (2, 5, 6, 4)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 2, 9)),
        (nn.Conv1d(2, 3, 4, padding="same"), (2, 2, 9)),
        (nn.Conv1d(4, 6, 3, groups=2, padding=1), (2, 4, 7)),
        (nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 2, 6, 7)),
        (nn.Conv2d(2, 3, 2, padding="same", padding_mode="circular"), (2, 2, 5, 5)),
        (nn.Conv2d(2, 3, 3, padding="valid", bias=False), (2, 2, 5, 5)),
        (nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 5, 5)),  # depthwise
        (nn.Conv2d(6, 4, 3, groups=2, stride=2, padding=1, padding_mode="reflect"), (2, 6, 6, 6)),
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)), (2, 2, 4, 6, 5)),
        (nn.Conv3d(4, 6, 3, groups=2, padding="same", bias=False), (2, 4, 4, 4, 4)),
    ],
)
def test_rows_reproduce_forward(layer, shape):
    layer = layer.double()
    kind = kind_for(layer)
    x = torch.randn(shape)
    z = layer(x)
    layout = kind.layout(layer)
    rows = kind.input_rows(layer, x)  # (N, T, groups·d_in)
    assert rows.shape[-1] == layout.groups * layout.d_in
    n, t = rows.shape[:2]
    grouped = rows.reshape(n, t, layout.groups, layout.d_in)
    w = kind.weight_matrices(layer)  # (groups, d_out, d_in)
    z_rows = torch.einsum("ntgi,goi->ntgo", grouped, w).reshape(n, t, -1)
    if layer.bias is not None:
        z_rows = z_rows + layer.bias
    assert torch.allclose(kind.output_rows(layer, z.unsqueeze(0))[0], z_rows, atol=1e-12)


def test_unbatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="batched"):
        ConvKind().input_rows(nn.Conv2d(1, 1, 1), torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match="unbatched"):
        LinearKind().input_rows(nn.Linear(3, 1), torch.randn(3))


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 4), lambda: nn.Conv1d(5, 4, 1)], ids=["linear", "conv"])
def test_a_frozen_bias_is_not_folded_into_the_trainable_weights_block(make):
    torch.manual_seed(0)
    layer = make()
    layer.bias.requires_grad_(False)  # fine-tuning the weight only

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer, nn.Linear(4, 3)

        def forward(self, x):
            h = self.layer(x.unsqueeze(-1)).squeeze(-1) if isinstance(self.layer, nn.Conv1d) else self.layer(x)
            return self.head(torch.tanh(h))

    model = Model().double()
    X, y = classification_data(n=1)  # one sample: the Kronecker block is the exact GGN block of its parameters
    X = X.double()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.parameter_names["layer"] == ["layer.weight"] and "layer.bias" in kfac.skipped
    assert rel_err(kfac["layer"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["layer.weight"])) < EXACT


def _row_and_dense_kfac(monkeypatch, model, data, **options):
    """The same factors twice: kept as rows wherever the rows are fewer than the width, and dense throughout."""
    from kfac_hessian import limits

    dense = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, **options)
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 1)
    return kh.compute_kfac(model, nn.CrossEntropyLoss(), data, **options), dense


def test_factors_kept_as_rows_equal_the_dense_factors(monkeypatch):
    """3 samples: A (9 wide with the bias) and the hidden G (7 wide, 2 columns × 3 samples) have fewer rows than their
    width and are kept as rows; the block equals the dense G ⊗ A, and for one sample the exact GGN block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = classification_data(n=3, d=8)
    X = X.double()
    rows, dense = _row_and_dense_kfac(monkeypatch, model, (X, y))
    assert rows["0"].row_factors == ["A", "G"] and dense["0"].row_factors == []
    assert "A as 3 rows of width 9" in rows.summary() and "G as 6 rows of width 7" in rows.summary()
    reference = dense["0"].to_dense()
    assert torch.allclose(rows["0"].to_dense(), reference, atol=1e-14)
    v = torch.randn(reference.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rows["0"] @ v, reference @ v, atol=1e-14)
    eig, dense_values = rows["0"].eig(), torch.linalg.eigvalsh(reference).flip(0)
    assert torch.allclose(eig.eigenvalues, dense_values.clamp_min(0), atol=1e-13 * float(dense_values[0]))
    assert int((eig.eigenvalues == 0).sum()) >= 63 - 3 * 6  # rank ≤ 3·6: the rest is the complement, exact zeros
    values, vectors = eig.topk(5)
    assert torch.allclose(values, dense_values[:5], atol=1e-13 * float(dense_values[0]))
    assert torch.allclose(vectors @ reference @ vectors.T, torch.diag(values), atol=1e-13 * float(values[0]))
    one, _ = _row_and_dense_kfac(monkeypatch, model, (X[:1], y[:1]))
    exact = dense_ggn(model, nn.CrossEntropyLoss(), X[:1], y[:1], ["0"])
    assert rel_err(one["0"].to_dense(), exact) < EXACT


def test_kept_rows_fold_into_the_dense_sum_when_they_reach_the_width(monkeypatch):
    """Batches of 2, 2, 3 samples into A 9 wide: rows 2, 4 (kept), then 7 … 9 ≥ 9 folds — the same bits as dense
    accumulation from the start; a sequence model's rows (samples × positions) fold alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = classification_data(n=9, d=8)
    data = [(X[a:b].double(), y[a:b]) for a, b in ((0, 2), (2, 4), (4, 9))]
    rows, dense = _row_and_dense_kfac(monkeypatch, model, data)
    assert rows["0"].row_factors == [] and rows["2"].row_factors == []
    for name in ("0", "2"):
        assert torch.equal(rows[name].A, dense[name].A) and torch.equal(rows[name].G, dense[name].G)
    partial, dense_partial = _row_and_dense_kfac(monkeypatch, model, data[:2])
    assert partial["0"].row_factors == ["A"]  # 4 rows of A kept; G's 4 samples × 2 columns ≥ 7 folded
    assert torch.allclose(partial["0"].to_dense(), dense_partial["0"].to_dense(), atol=1e-14)


def test_row_factors_with_reduce_and_sequences(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(2, 3, 6, dtype=torch.float64), torch.randint(0, 3, (2, 3))
    seq = nn.Sequential(model, Transpose())
    for approx in ("expand", "reduce"):
        rows, dense = _row_and_dense_kfac(monkeypatch, seq, (X, y), approx=approx)
        assert "A" in rows["0.0"].row_factors  # expand: 6 rows, reduce: 2 rows, of width 7
        assert torch.allclose(rows["0.0"].to_dense(), dense["0.0"].to_dense(), atol=1e-14)
        assert torch.allclose(rows["0.0"].eig().eigenvalues, dense["0.0"].eig().eigenvalues, atol=1e-13)


def test_row_factors_survive_save_and_load(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = classification_data(n=3, d=8)
    rows, _ = _row_and_dense_kfac(monkeypatch, model, (X.double(), y))
    rows.save(tmp_path / "rows.pt")
    loaded = kh.KFAC.load(tmp_path / "rows.pt")
    assert loaded["0"].row_factors == ["A", "G"]
    assert torch.equal(loaded["0"].a_factor.rows, rows["0"].a_factor.rows)
    assert torch.equal(loaded["0"].to_dense(), rows["0"].to_dense())


def test_kept_rows_are_folded_before_a_distributed_reduction(monkeypatch):
    """Ranks sum their factor sums; kept rows do not add, so ``prepare_reduce`` folds them into the dense sums."""
    from kfac_hessian import limits
    from kfac_hessian.layers import PassSettings

    layer = nn.Linear(4, 6).double()
    settings = PassSettings("expand", torch.float64, torch.device("cpu"))
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 1)
    kept = LinearKind().accumulator("l", layer, settings)
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 10**9)
    direct = LinearKind().accumulator("l", layer, settings)
    g = torch.Generator().manual_seed(0)
    rows, grads = torch.randn(3, 1, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g,
                                                                                        dtype=torch.float64)
    for acc in (kept, direct):
        acc.add_rows(rows)
        acc.add_gradients([[grads]])
    assert kept.state()[0].shape == (4, 3) and kept.state()[1].shape == (1, 6, 6)  # A: 3 rows kept; G: 6 ≥ 6, folded
    kept.prepare_reduce()
    assert all(torch.equal(a, b) for a, b in zip(kept.state(), direct.state()))


def test_factors_too_wide_for_dense_are_sketched_with_their_bound(monkeypatch):
    """A (12 wide) and the hidden G (12 wide) with 12² above the sketch limit: their 10 and 20 rows outgrow it and
    are sketched to ℓ = 4; each sketched factor F̃ satisfies 0 ⪯ F − F̃ ⪯ ε·I against the dense factor, with the
    ε its block carries, and the block is labelled a sketch."""
    from kfac_hessian import limits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(11, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    X, y = classification_data(n=10, d=11)
    data = (X.double(), y)
    dense = kh.compute_kfac(model, nn.CrossEntropyLoss(), data)
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 1)
    monkeypatch.setattr(limits, "ROW_SKETCH_ELEMENTS", 100)
    sketched = kh.compute_kfac(model, nn.CrossEntropyLoss(), data)
    block = sketched["0"]
    assert "sketching 10 (Frequent Directions" in block.describe() and "sketching 20" in block.describe()
    for factor, reference in ((block.a_factor, dense["0"].A), (block.g_factor, dense["0"].G)):
        assert factor.num_rows < 8 and factor.sketch is not None
        error = torch.linalg.eigvalsh(reference - factor.dense())
        bound = factor.sketch[1]
        assert float(error.min()) >= -1e-13 * float(reference.norm()) and float(error.max()) <= bound * (1 + 1e-10)
        assert 0 < bound <= float(torch.trace(reference)) / 4 * (1 + 1e-10)  # ‖F‖_*/ℓ: Frequent Directions' bound


@pytest.mark.parametrize("stride", [1, 2], ids=["shifted-moments", "unfolded-rows"])
def test_convolution_factors_with_fewer_rows_than_width(monkeypatch, stride):
    """A 3×3 convolution's A is 19 wide: 16 or 4 output positions give fewer rows. The shifted-products path (stride
    1) adds moments, which folds the kept rows into the dense sum; unfolded patches (stride 2) stay rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * (16 if stride == 1 else 4), 3)).double()
    X, y = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([1])
    rows, dense = _row_and_dense_kfac(monkeypatch, model, (X, y))
    assert ("A" in rows["0"].row_factors) == (stride == 2)
    assert torch.allclose(rows["0"].to_dense(), dense["0"].to_dense(), atol=1e-14)
