"""KFAC files: exact round trips, no code unpickled, other formats refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import TinyCNN, classification_data


def test_save_load_round_trip(tmp_path):
    kfac = kh.compute_kfac(TinyCNN().double(), nn.CrossEntropyLoss(),
                           (torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])))
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    assert loaded.layer_names == kfac.layer_names and loaded.curvature == kfac.curvature
    for name in kfac:
        assert torch.equal(loaded[name].A, kfac[name].A) and torch.equal(loaded[name].G, kfac[name].G)
        assert loaded[name].layout == kfac[name].layout


def test_load_refuses_pickled_code(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(pickle.UnpicklingError):
        kh.KFAC.load(path)
    assert "pwned" not in capsys.readouterr().out


def test_load_refuses_other_format_versions(tmp_path):
    torch.save({"format": "kfac_hessian.KFAC/99", "meta": {}, "skipped": {}, "layers": {}}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="reads 'kfac_hessian.KFAC/2'"):
        kh.KFAC.load(tmp_path / "v99.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by KFAC.save"):
        kh.KFAC.load(tmp_path / "other.pt")


def test_dense_blocks_and_everything_about_the_result_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.PReLU(), nn.Linear(4, 3)).double()
    X, y = classification_data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["0", "1", "2"])
    assert {type(b).__name__ for b in kfac.values()} == {"KroneckerBlock", "DenseBlocks"}
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    for field in ("curvature", "approx", "loss", "reduction", "n_samples", "skipped", "parameter_names", "counts",
                  "total_params", "tied"):
        assert getattr(loaded, field) == getattr(kfac, field), field
    for name in kfac:
        assert type(loaded[name]) is type(kfac[name]) and torch.equal(loaded[name].to_dense(), kfac[name].to_dense())
    assert loaded.summary() == kfac.summary()


def test_a_block_of_an_unknown_kind_is_refused(tmp_path):
    from kfac_hessian.factors.storage import SAVE_FORMAT

    torch.save({"format": SAVE_FORMAT, "meta": {}, "blocks": {"x": {"kind": "spline"}}}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="block 'x' has an unknown kind 'spline'"):
        kh.KFAC.load(tmp_path / "k.pt")
