"""End to end: the demo and analyze commands write their report and plots; a wrong command line or target is one
line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

from kfac_hessian.cli import build_parser, main


def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick", "--k", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | P | k | exact |" in printed and "overlap: top-k eigenspace overlap" in printed  # headers = keys
    assert "exact hessian of layer 0 (P=4160, Lanczos + SLQ + Hutchinson) …" in printed  # progress in the long phase
    assert "seeds 0 and 1" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == ["0", "2", "4"]
    assert report["layers"][0]["frobenius_rel_err"] is None  # a Lanczos layer: null, not NaN (strict JSON)
    assert report["meta"]["architecture"] == "ReLU MLP 64-64-32-10" and "digits" in report["meta"]["data"]
    assert set(report["meta"]["versions"]) == {"kfac_hessian", "torch", "python"}
    assert len(report["models"]) == 2
    for name in ("spectra.png", "top_eigenvalues.png", "overlap_across_seeds.png"):
        pytest.importorskip("matplotlib")
        assert (tmp_path / name).stat().st_size > 1000


USER_PROBLEM = (
    "import torch\n"
    "from torch import nn\n"
    "def make():\n"
    "    torch.manual_seed(0)\n"
    "    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()\n"
    "    X = torch.randn(20, 4, dtype=torch.float64)\n"
    "    return model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (20,)))\n"
    "def wrong():\n"
    "    return 'a model'\n"
)


@pytest.mark.parametrize("as_path", [False, True])
def test_analyze_user_function(tmp_path, monkeypatch, capsys, as_path):
    (tmp_path / "user_problem.py").write_text(USER_PROBLEM)
    monkeypatch.chdir(tmp_path)
    target = str(tmp_path / "user_problem.py") + ":make" if as_path else "user_problem:make"
    assert main(["analyze", target, "--k", "3", "--json", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in result["layers"]] == ["0", "2"]
    assert result["meta"]["data"] == f"returned by {target}"


def test_analyze_also_measures_ekfac_and_the_fit(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_problem.py").write_text(USER_PROBLEM)
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "user_problem:make", "--k", "3", "--json", "--no-plots", "--also", "ekfac", "fit",
                 "--out", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out)
    for row in result["layers"]:  # a ReLU network: the Hessian block is the GGN block the fit is nearest to
        assert 0 <= row["ekfac_overlap"] <= 1 + 1e-9 and row["fit_frobenius_rel_err"] <= row["frobenius_rel_err"] + 1e-6
    assert result["settings"]["also"] == ["ekfac", "fit"]


@pytest.mark.parametrize("argv, message", [
    (["analyze", "no_colon_here"], "expected MODULE:FUNCTION"),
    (["analyze"], "analyze expects MODULE:FUNCTION"),
    (["analyze", "no_such_module_xyz:make"], "cannot import no_such_module_xyz: ModuleNotFoundError"),
    (["analyze", "missing/file.py:make"], "missing/file.py: no such file"),
    (["analyze", "user_problem:nothing"], "user_problem has no function 'nothing'"),
    (["analyze", "user_problem:wrong"],
     "must return (model, loss_fn, data) or (model, loss_fn, data, output), got str"),
    (["analyze", "--checkpoint", "missing.pt"], "--checkpoint missing.pt: no such file"),
])
def test_analyze_errors_are_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_problem.py").write_text(USER_PROBLEM)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kfac-hessian analyze: error: ") and message in err


@pytest.mark.parametrize("argv", [["demo", "--k", "0"], ["analyze", "m:f", "--k", "-3"], ["demo", "--epochs", "x"]])
def test_out_of_range_numbers_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_help_shows_every_option_with_its_default_and_meaning():
    analyze = build_parser()._subparsers._group_actions[0].choices["analyze"]
    text = analyze.format_help()
    for action in analyze._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    assert "(default: 20)" in text and "(default: ggn)" in text and "MODULE importable or a .py file" in text


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
    wrong = ["analyze", "--checkpoint", str(tmp_path / "state.pt"), "--hidden", "16", "--no-plots",
             "--out", str(tmp_path)]
    assert main(wrong) == 2
    assert "is not a state_dict of the digits MLP with --hidden 16" in capsys.readouterr().err


def test_analyze_prints_the_plan_first_and_refuses_a_plan_above_the_budgets(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_problem.py").write_text(USER_PROBLEM)
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "user_problem:make", "--plan-only", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "Plan of a KFAC pass, curvature='ggn': 2 columns per batch in 2 backward passes" in printed
    assert "| 0 | A | dense | 5 × 5 | 1 |" in printed and "fits the budgets" in printed
    assert not (tmp_path / "o").exists()  # nothing computed
    monkeypatch.setattr("kfac_hessian.limits.PASS_SECONDS_LIMIT", 1e-6)  # the default time budget
    assert main(["analyze", "user_problem:make", "--no-plots", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refuses this pass before any backward pass" in err and "curvature='mc'" in err
