"""End to end: the demo and analyze commands write their report and plots."""

from __future__ import annotations

import json

import pytest

from kfac_hessian.cli import main


def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick", "--k", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "top-k overlap" in printed and "seeds 0 and 1" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ["0", "2", "4"]
    assert len(report["models"]) == 2
    for name in ("spectra.png", "top_eigenvalues.png", "overlap_across_seeds.png"):
        pytest.importorskip("matplotlib")
        assert (tmp_path / name).stat().st_size > 1000


def test_analyze_user_function(tmp_path, monkeypatch, capsys):
    module = tmp_path / "user_problem.py"
    module.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()\n"
        "    X = torch.randn(20, 4, dtype=torch.float64)\n"
        "    return model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (20,)))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "user_problem:make", "--k", "3", "--json", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == ["0", "2"]


def test_analyze_needs_module_function():
    with pytest.raises(SystemExit):
        main(["analyze", "no_colon_here"])


def test_analyze_checkpoint_of_builtin_architecture(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import torch

    from kfac_hessian.demo import digits_mlp

    torch.manual_seed(0)
    torch.save(digits_mlp((8,)).state_dict(), tmp_path / "state.pt")
    args = ["analyze", "--checkpoint", str(tmp_path / "state.pt"), "--hidden", "8", "--k", "3", "--json", "--no-plots",
            "--gauss-newton-residual", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [row["layer"] for row in rows] == ["0", "2"]
    assert all(abs(row["residual_trace_share"]) < 1e-8 for row in rows)  # ReLU: Hessian block = GGN block
