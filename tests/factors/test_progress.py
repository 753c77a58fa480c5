"""Progress with an ETA: tqdm's bar when installed, else plain lines with the rate and the time left."""

from __future__ import annotations

import io
import sys

import pytest
from torch import nn

import kfac_hessian as kh
from kfac_hessian.factors.progress import progress_line, tracked

from ..conftest import PerPosition


def test_plain_lines_without_tqdm_say_rate_and_time_left(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the plain printer
    out = io.StringIO()
    assert list(tracked(range(4), "KFAC (ggn)", 4, "batch", interval=0.0, stream=out)) == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("KFAC (ggn): 1/4 batch, ") and "ETA" in lines[0]
    assert lines[-1].endswith("ETA 0.0 s")
    assert progress_line("x", 3, 6, "chunk", 1.5) == "x: 3/6 chunk, 0.5 s/chunk, 1.5 s, ETA 1.5 s"
    assert progress_line("x", 2, None, "batch", 1.0) == "x: 2 batch, 0.5 s/batch, 1.0 s"  # no total: no ETA


def test_a_pass_with_many_backward_chunks_reports_them(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    import torch

    model = PerPosition(c=12).double()
    X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 12, (2, 3), generator=torch.Generator().manual_seed(1))
    kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), progress=True, per_position=True)
    err = capsys.readouterr().err
    assert "batch 0: backward passes: 33/33 chunk" in err and "KFAC (ggn): 1 batch" in err


@pytest.mark.parametrize("total", [None, 3])
def test_tqdm_is_used_when_installed(total):
    pytest.importorskip("tqdm")
    assert list(tracked(iter([1, 2, 3]), "d", total, "batch")) == [1, 2, 3]


def test_an_item_counts_as_its_size(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    out = io.StringIO()
    chunks = list(tracked([[1, 2], [3], [4, 5, 6]], "d", 6, "block", interval=0.0, stream=out, size=len))
    assert chunks == [[1, 2], [3], [4, 5, 6]]
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["d: 2/6 block", "d: 3/6 block", "d: 6/6 block"]
    assert lines[-1].endswith("ETA 0.0 s")


def test_tqdm_bar_counts_an_item_as_its_size(capsys):
    pytest.importorskip("tqdm")
    assert list(tracked([[1, 2], [3]], "d", 3, "block", size=len)) == [[1, 2], [3]]
    assert "3/3" in capsys.readouterr().err
