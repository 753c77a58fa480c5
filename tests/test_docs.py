"""The documentation's code runs as written, and the docs stand alone."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Usage\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    beyond = re.search(r"```python\n(fit = kh.compute_kronecker_fit.*?)```", readme, re.S).group(1)
    exec(compile(beyond, "README.md", "exec"), namespace)  # continues the first example
    for row in namespace["report"].rows:  # a ReLU network: the Hessian block is the GGN block both are fitted to
        assert row["fit_frobenius_rel_err"] <= row["frobenius_rel_err"] * (1 + 1e-6)


def test_the_transformers_examples_of_the_layer_kinds_page_run():
    pytest.importorskip("transformers")
    text = (ROOT / "docs" / "layer_kinds.md").read_text()
    blocks = re.findall(r"```python\n(import torch, transformers.*?)```", text, re.S)
    assert len(blocks) == 2  # GPT-2 and BERT
    for block in blocks:
        exec(compile(block, "docs/layer_kinds.md", "exec"), {})


def test_docs_do_not_point_outside_the_repository():
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        assert "shared/" not in path.read_text(), path


def test_every_test_the_docs_cite_exists():
    """``tests/…py::test_name`` in the docs (and ``::test_name`` continuing the same file) names a test there."""
    cited = 0
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for line in path.read_text().splitlines():
            current = None
            for file, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::([\w…]+))?`", line):
                current = file or current
                if file:
                    assert (ROOT / file).exists(), (path.name, file)
                if name and current:
                    source = (ROOT / current).read_text()
                    prefix = name.rstrip("…")
                    assert re.search(rf"^def {prefix}" + ("" if name.endswith("…") else r"\("), source, re.M), \
                        (path.name, current, name)
                    cited += 1
    assert cited > 20
