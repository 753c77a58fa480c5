"""The outlier study measures what it says: its spectra against dense float64 references, and a smoke run."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from benchmarks import outliers_study as study
from benchmarks.clusters import gaussian_clusters
from kfac_hessian.analyses.outliers import find_outliers

# a 3-pass Kronecker fit of these tiny, barely trained models may not settle to tol 1e-3; what is tested here is the
# exact spectra and the tables, not the fit
pytestmark = pytest.mark.filterwarnings("ignore:compute_kronecker_fit:RuntimeWarning")

TINY = study.Setting(n_classes=3, clusters_per_class=1, width=4, separation=3.0, epochs=3, dim=3, n_train=30)


def _flat_function(model: nn.Module, function):
    """``function(outputs)`` as a function of the flattened parameters (``model.parameters()`` order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def of_flat(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return function(params)

    return of_flat, torch.cat([p.detach().flatten() for p in model.parameters()])


def _tiny_problem(seed: int = 0):
    data = gaussian_clusters(TINY.n_classes, TINY.clusters_per_class, TINY.dim, TINY.separation, TINY.n_train,
                             n_test=10, seed=seed)
    model = study._new_model(TINY, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(20):  # away from initialization, so that the Hessian and the GGN differ
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.X_train), data.y_train).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, data


def test_measured_spectra_are_the_dense_hessian_spectra():
    model, data = _tiny_problem()
    X, y = data.X_train, data.y_train
    loss_of, flat = _flat_function(model, lambda p: nn.functional.cross_entropy(functional_call(model, p, (X,)), y))
    reference = hessian(loss_of)(flat)
    # the GGN J^T Λ J from the per-sample output Jacobian and the cross-entropy Hessian in the logits
    outputs_of, _ = _flat_function(model, lambda p: functional_call(model, p, (X,)))
    J = jacrev(outputs_of)(flat)  # (N, C, P)
    probabilities = torch.softmax(model(X).detach(), dim=1)
    Lambda = torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, Lambda, J) / len(X)

    measurement = study.measure(model, data)

    values = torch.linalg.eigvalsh(reference).flip(0)
    torch.testing.assert_close(measurement.top_hessian, values[:20], rtol=1e-9, atol=1e-12)
    expected = find_outliers(values)
    got = measurement.spectra["model/hessian"]
    assert (got.gap_position, got.n_negative) == (expected.gap_position, expected.n_negative)
    assert got.gap_ratio == pytest.approx(expected.gap_ratio, rel=1e-8)
    assert measurement.hessian_ggn_difference == pytest.approx(float((reference - ggn).norm() / reference.norm()),
                                                               rel=1e-8)
    assert measurement.hessian_ggn_difference > 1e-3  # the whole-model Hessian is not its GGN here
    assert measurement.layer_hessian_ggn_difference < 1e-10  # but every layer block of a ReLU network is
    assert measurement.spectra["model/ggn"].gap_ratio == pytest.approx(
        find_outliers(torch.linalg.eigvalsh(ggn)).gap_ratio, rel=1e-8)
    start = 0
    for name in study.LAYERS:
        size = sum(p.numel() for p in model.get_submodule(name).parameters())
        block = reference[start:start + size, start:start + size]
        start += size
        assert measurement.spectra[f"{name}/exact"].bulk_edge == pytest.approx(
            find_outliers(torch.linalg.eigvalsh(block)).bulk_edge, rel=1e-8)
        for approximation in study.APPROXIMATIONS:
            assert measurement.spectra[f"{name}/{approximation}"].n_values == size
    # the default null of the whole-model Hessian: the Marchenko–Pastur fit of the dense reference spectrum
    null = measurement.spectra["model/hessian"].null
    assert null.edge == pytest.approx(expected.null.edge, rel=1e-8) and null.count_above == expected.null.count_above


def test_counts_above_the_initialization_null_use_the_same_seeds_untrained_spectra(monkeypatch):
    """The null table's 'above λ₁ at initialization': the trained spectrum's eigenvalues above the largest eigenvalue
    of the same seed's model at epoch 0, each against a dense float64 Hessian (torch.func.hessian) of that model."""
    monkeypatch.setattr(study, "BASE", TINY)
    stages = (0, TINY.epochs)
    measured = {study.replace(TINY, epochs=e): [] for e in stages}
    references = {e: [] for e in stages}
    for seed in (0, 1):
        data = gaussian_clusters(TINY.n_classes, TINY.clusters_per_class, TINY.dim, TINY.separation, TINY.n_train,
                                 n_test=500, seed=seed)
        model, done = study._new_model(TINY, seed), 0
        for stage in stages:
            study.train_classifier(model, nn.CrossEntropyLoss(), data.X_train, data.y_train, stage - done,
                                   lr=study.LEARNING_RATE, batch_size=study.BATCH_SIZE, seed=seed + stage)
            done = stage
            measured[study.replace(TINY, epochs=stage)].append(study.measure(model, data))
            loss_of, flat = _flat_function(model, lambda p, m=model, X=data.X_train, y=data.y_train:
                                           nn.functional.cross_entropy(functional_call(m, p, (X,)), y))
            references[stage].append(torch.linalg.eigvalsh(hessian(loss_of)(flat)))
    lines = study.null_table(measured, {"epochs (training stage)": ("epochs", stages)})
    row = next(line for line in lines if f"epochs={TINY.epochs} (base)" in line and "| model/hessian |" in line)
    expected = [float((trained > init.max()).sum()) for trained, init in zip(references[TINY.epochs], references[0])]
    assert row.split(" | ")[-1].rstrip(" |") == study._cell(expected)


def test_path_ends_are_the_two_solutions():
    model_a, data = _tiny_problem(seed=0)
    model_b, _ = _tiny_problem(seed=5)
    path = study._path(model_a, model_b, data, points=3, seed=0)
    assert path.alphas == [0.0, 0.5, 1.0]
    X, y = data.X_train, data.y_train
    for alpha_index, model in ((0, model_a), (-1, model_b)):
        loss_of, flat = _flat_function(model, lambda p, m=model: nn.functional.cross_entropy(
            functional_call(m, p, (X,)), y))
        assert path.losses[alpha_index] == pytest.approx(float(loss_of(flat)), rel=1e-12)
        top = float(torch.linalg.eigvalsh(hessian(loss_of)(flat))[-1])
        assert path.top_eigenvalues[alpha_index] == pytest.approx(top, rel=1e-6)
    assert path.barrier == pytest.approx(max(path.losses) - max(path.losses[0], path.losses[-1]))


def test_barrier_is_the_rise_above_the_higher_end():
    assert study.PathMeasurement([0, 0.5, 1], [0.1, 0.7, 0.3], [1, 1, 1]).barrier == pytest.approx(0.4)
    assert study.PathMeasurement([0, 0.5, 1], [0.1, 0.05, 0.3], [1, 1, 1]).barrier == 0.0


def test_quick_run_writes_every_table(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "BASE", TINY)
    monkeypatch.setitem(study.FACTORS, "classes C", ("n_classes", (2, 3)))
    out = tmp_path / "outliers.md"
    text = study.main(["--quick", "--seeds", "2", "--factors", "classes C", "--no-basin", "--no-digits",
                       "--replicate", "--out", str(out)])
    assert out.read_text() == text
    for heading in ("## Whole model", "## Layer blocks", "## Counts against the nulls", "## Re-run on new seeds"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| classes C |")]
    # 2 values of C: one whole-model row, 3 layer rows, 8 null rows and 8 agreement rows each
    assert len(rows) == 2 * (1 + 3 + 8 + 8)
    assert "n_classes=3 (base)" in text and "n_classes=2 |" in text
