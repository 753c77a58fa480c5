from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.bounds import PosteriorBasis
from kfac_hessian.eigen import eigen_pairs

from ..conftest import TinyCNN, batches, classification_data, mlp
from ..references import dense_hessian


def _layer_order(d_out: int, d_in: int, has_bias: bool) -> list[int]:
    """Public index → position in the row-major augmented vec([W b]), written out independently."""
    width = d_in + int(has_bias)
    order = [r * width + c for r in range(d_out) for c in range(d_in)]
    return order + ([r * width + d_in for r in range(d_out)] if has_bias else [])


def _kfac(model, X, y):
    return kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))


def test_kronecker_basis_is_v_kron_u_on_each_layer():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=9, d=4, classes=2)
    kfac = _kfac(model, X, y)
    basis = PosteriorBasis.kronecker(model, kfac)
    Q = basis.to_dense()
    offset = 0
    for name in ("0", "2"):
        V = torch.linalg.eigh(kfac[name].G).eigenvectors.flip(-1)
        U = torch.linalg.eigh(kfac[name].A).eigenvectors.flip(-1)
        layer = dict(model.named_modules())[name]
        d_out, d_in = layer.weight.shape
        reference = torch.kron(V, U)[_layer_order(d_out, d_in, True)]
        # The columns are eigenvectors of the layer's G ⊗ A (the dense product, in public order).
        H = torch.kron(kfac[name].G, kfac[name].A)[_layer_order(d_out, d_in, True)][:, _layer_order(d_out, d_in, True)]
        D = reference.T @ H @ reference
        assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
        P = reference.shape[0]
        block = Q[offset : offset + P, offset : offset + P]
        assert torch.allclose(block, reference, atol=1e-13)
        assert float(Q[offset : offset + P].abs().sum()) == pytest.approx(float(block.abs().sum()),
                                                                          rel=1e-14)  # block-diagonal
        offset += P
    assert offset == Q.shape[0]


@pytest.mark.parametrize("kind", ["identity", "kronecker", "exact-layerwise"])
def test_bases_are_orthonormal_and_round_trip(kind):
    model = TinyCNN()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    loss = nn.CrossEntropyLoss()
    if kind == "identity":
        basis = PosteriorBasis.identity(model)
    elif kind == "kronecker":
        basis = PosteriorBasis.kronecker(model, kh.compute_kfac(model, loss, (X, y)))
    else:
        basis = PosteriorBasis.exact_layerwise(model, loss, (X, y))
    Q = basis.to_dense()
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12)
    params = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    back = basis.from_coordinates(basis.to_coordinates(params))
    assert set(back) == set(params)
    for n in params:
        assert torch.allclose(back[n], params[n], atol=1e-12)
    flat = torch.cat([params[n].flatten() for n in basis.parameter_shapes])
    coords = torch.cat([c.flatten() for c in basis.to_coordinates(params)])
    assert torch.allclose(coords, Q.T @ flat, atol=1e-12)


def test_exact_layerwise_basis_diagonalizes_the_dense_hessian_block():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=9, d=4, classes=2)
    loss = nn.CrossEntropyLoss()
    basis = PosteriorBasis.exact_layerwise(model, loss, batches(X, y, [5, 4]))
    Q = basis.to_dense()
    P0 = 3 * 5
    H = dense_hessian(model, loss, X, y, ["0"])
    D = Q[:P0, :P0].T @ H @ Q[:P0, :P0]
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
    assert torch.all(torch.diagonal(D)[:-1] >= torch.diagonal(D)[1:] - 1e-12)  # descending


def test_frozen_and_uncovered_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    model[2].bias.requires_grad_(False)
    X, y = classification_data(n=7, d=3, classes=2)
    basis = PosteriorBasis.kronecker(model, kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y)))
    assert list(basis.parameter_shapes) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    kinds = [type(b).__name__ for b in basis.blocks]
    assert kinds == ["_KroneckerBlock", "_DenseBlock", "_KroneckerBlock"]  # the LayerNorm's exact block
    # Frozen bias: the weight directions are the eigenvectors of G ⊗ A_ww (the block of a trainable weight with a
    # frozen bias has no bias row/column in A)
    factor = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["2"]
    assert factor.A.shape == (4, 4)
    H = torch.kron(factor.G, factor.A)
    Q_w = basis.to_dense()[-8:, -8:]
    D = Q_w.T @ H @ Q_w
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
    Q = basis.to_dense()
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12)
    # factors computed before the bias was frozen carry its row/column in A: the basis drops them
    model[2].bias.requires_grad_(True)
    before = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    model[2].bias.requires_grad_(False)
    Q_w = PosteriorBasis.kronecker(model, before).to_dense()[-8:, -8:]
    D = Q_w.T @ torch.kron(before["2"].G, before["2"].A[:-1, :-1]) @ Q_w
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)


def test_variances_from_carries_the_covariance_diagonal():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=9, d=4, classes=2)
    old = PosteriorBasis.kronecker(model, _kfac(model, X, y))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    new = PosteriorBasis.kronecker(model, _kfac(model, X, y))
    g = torch.Generator().manual_seed(7)
    variances = [torch.rand(c.shape, generator=g) + 0.1 for c in old.to_coordinates(dict(model.named_parameters()))]
    carried = torch.cat([v.flatten() for v in new.variances_from(old, variances)])
    Q_old, Q_new = old.to_dense(), new.to_dense()
    sigma = Q_old @ torch.diag(torch.cat([v.flatten() for v in variances])) @ Q_old.T
    assert torch.allclose(carried, torch.diagonal(Q_new.T @ sigma @ Q_new), atol=1e-12)
    with pytest.raises(ValueError, match="cannot carry"):
        PosteriorBasis.exact_layerwise(model, nn.CrossEntropyLoss(), (X, y)).variances_from(old, variances)


def test_basis_errors():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    basis = PosteriorBasis.identity(model)
    with pytest.raises(ValueError, match="missing"):
        basis.to_coordinates({"0.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="coordinate tensors"):
        basis.from_coordinates([torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="max_params"):
        basis.to_dense(max_params=5)
    X, y = classification_data(n=9, d=4, classes=2)
    with pytest.raises(ValueError, match="max_params"):
        PosteriorBasis.exact_layerwise(model, nn.CrossEntropyLoss(), (X, y), max_params=10)
    frozen = mlp(nn.Tanh, widths=(4, 3, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        PosteriorBasis.identity(frozen)


def test_kronecker_basis_covers_every_kind_of_block():
    """Multi-head attention (whose block is its in-projection), a LayerNorm's exact block, a grouped convolution's
    per-group Kronecker blocks and an embedding's diagonal A: an orthonormal basis that diagonalizes every block."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(5, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens):
            h = self.embed(tokens)
            h = self.norm(h + self.mha(h, h, h, need_weights=False)[0])
            h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
            return self.head(h).transpose(1, 2)

    model = Mixed().double()
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 5, (6, 3), generator=g), torch.randint(0, 3, (6, 3), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels))
    basis = PosteriorBasis.kronecker(model, kfac)
    assert {type(b).__name__ for b in basis.blocks} == {"_KroneckerBlock", "_DenseBlock"}
    Q = basis.to_dense()
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12)
    names = list(basis.parameter_shapes)
    offsets = dict(zip(names, torch.tensor([0] + [s.numel() for s in basis.parameter_shapes.values()]).cumsum(0)
                       .tolist()))
    for block_name, block in kfac.items():
        params = kfac.parameter_names[block_name]
        index = torch.cat([torch.arange(offsets[p], offsets[p] + basis.parameter_shapes[p].numel()) for p in params])
        columns = Q[index][:, Q[index].abs().sum(0) > 0]  # the basis vectors of this block
        D = columns.T @ block.to_dense() @ columns
        assert torch.allclose(D, torch.diag(D.diagonal()), atol=1e-12), block_name


def test_from_eigen_takes_every_kind_of_eigen_result():
    """Kronecker eigen-structures give the Kronecker basis itself; a complete Lanczos result of the exact block (and a
    dense decomposition) diagonalizes the dense float64 Hessian block; a top-k Lanczos result spans the top-k
    eigenvectors of eigh in its first k columns, completed to an orthonormal basis."""
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=9, d=4, classes=2)
    loss = nn.CrossEntropyLoss()
    kfac = _kfac(model, X, y)
    from_kfac = PosteriorBasis.from_eigen(model, kfac.eig(), kfac.parameter_names).to_dense()
    assert torch.allclose(from_kfac, PosteriorBasis.kronecker(model, kfac).to_dense(), atol=1e-12)
    H = dense_hessian(model, loss, X, y, ["0"])
    P0 = H.shape[0]
    op = kh.layer_operator(model, loss, (X, y), "0")
    for result in (kh.lanczos(op, P0), eigen_pairs(H)):
        Q = PosteriorBasis.from_eigen(model, {"0": result}).to_dense()
        assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12)
        D = Q[:P0, :P0].T @ H @ Q[:P0, :P0]
        assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
    k = 4
    Q = PosteriorBasis.from_eigen(model, {"0": kh.lanczos(op, k, dense_limit=0, tol=1e-10, seed=0)}).to_dense()
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-12)
    top = torch.linalg.eigh(H).eigenvectors.flip(1)[:, :k]
    assert torch.allclose(top.T @ Q[:P0, :k] @ Q[:P0, :k].T @ top, torch.eye(k), atol=1e-8)
    with pytest.raises(ValueError, match="no layer or parameter"):
        PosteriorBasis.from_eigen(model, {"nope": kh.lanczos(op, 2)})
    with pytest.raises(ValueError, match="has P="):
        PosteriorBasis.from_eigen(model, {"2": kh.lanczos(op, 2)})
