"""The sample-axis probe: the samples of every recorded tensor are found by rotating the samples, never guessed from
sizes — sequence-first layouts with T ≠ N and T == N, rows flattened as (N·T, d), outputs every sample shares — and
every block that needs them is exact against the dense float64 GGN or equal to its batch-first twin's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.factors.sample_axis import classify
from kfac_hessian.sample_layout import CONSTANT, SHARED

from ..conftest import batches
from ..references import EXACT, dense_ggn, rel_err

N = 3  # the samples the probe looks at (limits.SAMPLE_AXIS_PROBE_SAMPLES): T == N coincides for the probe too


def assert_exact_blocks(kfac, model: nn.Module, loss: nn.Module, X, y, names: list[str], output=None) -> None:
    """Every named block is labelled exact and equals its diagonal block of one dense GGN of all of them."""
    dense = dense_ggn(model, loss, X, y, names, output=output)
    start = 0
    for name in names:
        size = kfac[name].num_params
        assert kfac[name].status == "exact GGN block", name
        assert rel_err(kfac[name].to_dense(), dense[start:start + size, start:start + size]) < EXACT, name
        start += size


def assert_same_factors(kfac, reference, names: list[str]) -> None:
    """``A`` and ``G`` of every named Kronecker block equal the reference's (a zero factor included)."""
    for name in names:
        for ours, theirs in ((kfac[name].A, reference[name].A), (kfac[name].G, reference[name].G)):
            assert float((ours - theirs).norm()) <= EXACT * float(theirs.norm()), name


def _sequences(length: int, n: int = N, d: int = 3, classes: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, d, generator=g), torch.randint(0, classes, (n, length), generator=g)


def test_classify_finds_the_axis_that_rotates_with_the_samples_whatever_the_sizes():
    g = torch.Generator().manual_seed(0)
    sequence_first = torch.randn(N, N, 3, generator=g)  # (T, N, C) with T == N
    found = classify(sequence_first, sequence_first.roll(1, 1), N)
    assert (found.state, found.axis) == ("axis", 1)
    rows = torch.randn(N * 3, 2, generator=g)  # (N·T, d), sample-major and position-major
    found = classify(rows, rows.unflatten(0, (N, 3)).roll(1, 0).flatten(0, 1), N)
    assert (found.state, found.axis, found.sample_major) == ("rows", 0, True)
    found = classify(rows, rows.unflatten(0, (3, N)).roll(1, 1).flatten(0, 1), N)
    assert (found.state, found.sample_major) == ("rows", False)
    bias = torch.randn(N, N, 2, generator=g)  # (T, T, heads) with T == N, the same in both runs: shared
    assert classify(bias, bias, N) is SHARED
    zeros = torch.zeros(3, N, 2)  # a dead ReLU or LoRA's zero B: the probe cannot tell
    assert classify(zeros, zeros, N) is CONSTANT
    mixed = classify(rows[:N], torch.randn(N, 2, generator=g), N)  # dropout, batch statistics
    assert mixed.state == "unknown" and "along no axis" in mixed.reason


class SequenceFirstEncoder(nn.Module):
    """PyTorch's own default layout: nn.TransformerEncoderLayer(batch_first=False) on (T, N, d), a PReLU on (T, N, d),
    a head per position; logits (N, C, T)."""

    def __init__(self, batch_first: bool = False, d: int = 4, classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Linear(3, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=batch_first)
        self.act = nn.PReLU()
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (N, T, 3)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.act(self.layer(h))
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h).transpose(1, 2)


@pytest.mark.parametrize("length", [N, 4])
def test_transformer_encoder_layer_sequence_first_exact_blocks_and_the_factors_of_its_batch_first_twin(length):
    model = SequenceFirstEncoder().eval()
    twin = SequenceFirstEncoder(batch_first=True).eval()
    twin.load_state_dict(model.state_dict())
    X, y = _sequences(length)
    loss = nn.CrossEntropyLoss()
    kfac = kh.compute_kfac(model, loss, (X, y), per_position=True)
    assert not kfac.skipped
    assert_exact_blocks(kfac, model, loss, X, y, ["layer.norm1", "layer.norm2", "act.weight"])
    split = kh.compute_kfac(model, loss, batches(X, y, [1, N - 1]), per_position=True)  # a first batch of one
    assert rel_err(split["layer.norm1"].to_dense(), kfac["layer.norm1"].to_dense()) < EXACT
    for approx in ("expand", "reduce"):
        ours = kfac if approx == "expand" else kh.compute_kfac(model, loss, (X, y), approx=approx, per_position=True)
        theirs = kh.compute_kfac(twin, loss, (X, y), approx=approx, per_position=True)
        assert_same_factors(ours, theirs, ["layer.self_attn", "layer.self_attn.out_proj", "layer.linear1",
                                           "layer.linear2"])


class SharedBias(nn.Module):
    """T5's relative-attention bias: an Embedding called on (T, T) buckets, its output shared by every sample."""

    def __init__(self, d: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.bias, self.head = nn.Linear(3, d), nn.Embedding(7, 1), nn.Linear(d, 2)

    def forward(self, x):  # x: (N, T, 3)
        h = self.embed(x)
        t = x.shape[1]
        positions = torch.arange(t)
        buckets = (positions[None, :] - positions[:, None]).clamp(-3, 3) + 3  # (T, T)
        scores = h @ h.transpose(1, 2) + self.bias(buckets).squeeze(-1)  # (N, T, T)
        return self.head(scores.softmax(-1) @ h).transpose(1, 2)


def test_an_output_shared_by_all_samples_is_refused_when_its_size_equals_the_batch():
    model = SharedBias()
    X, y = _sequences(N)  # T == N: the bias (T, T, 1) has the batch size on axis 0
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), per_position=True)
    assert "bias" not in kfac and "shared by all samples of the batch" in kfac.skipped["bias"]
    assert "embed" in kfac and "head" in kfac
    with pytest.raises(ValueError, match="layer 'bias': its output .* is shared by all samples"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["bias"])


class Windowed(nn.Module):
    """Swin-like: attention over windows, rows (N·W, w, d), plus a relative-position bias module without inputs
    whose output (1, heads, w, w) every window of every image shares."""

    class PositionBias(nn.Module):
        def __init__(self, window: int):
            super().__init__()
            self.table = nn.Parameter(torch.randn(2 * window - 1) * 0.5)
            positions = torch.arange(window)
            self.register_buffer("index", positions[:, None] - positions[None, :] + window - 1)

        def forward(self):
            return self.table[self.index].unsqueeze(0)  # (1, w, w)

    def __init__(self, window: int = 3, d: int = 4):
        super().__init__()
        torch.manual_seed(2)
        self.window, self.embed, self.qk = window, nn.Linear(3, d), nn.Linear(d, d)
        self.bias, self.norm, self.head = self.PositionBias(window), nn.LayerNorm(d), nn.Linear(d, 2)

    def forward(self, x):  # x: (N, T, 3), T a multiple of the window
        n, t = x.shape[:2]
        rows = self.embed(x).reshape(n * t // self.window, self.window, -1)  # windows of every image, image-major
        q = self.qk(rows)
        scores = q @ rows.transpose(1, 2) + self.bias()
        mixed = self.norm(scores.softmax(-1) @ rows)
        return self.head(mixed.reshape(n, t, -1)).transpose(1, 2)


def test_windowed_rows_and_a_leading_one_bias_shared_by_windows():
    """The bias is expanded to every window of every sample (not to N, which crashed), checked by the probe; the
    windows' rows are mapped to their samples: the bias and the LayerNorm on the windows get their exact blocks."""
    model = Windowed()
    X, y = _sequences(6)  # 2 windows per sample
    loss = nn.CrossEntropyLoss()
    kfac = kh.compute_kfac(model, loss, (X, y), per_position=True)
    assert not kfac.skipped
    assert_exact_blocks(kfac, model, loss, X, y, ["bias.table", "norm"])


class Flattened(nn.Module):
    """OPT-style: the MLP and a LayerNorm on rows flattened as (N·T, d) — sample-major, or position-major after a
    transpose — and a PReLU on them; ``flatten=False`` is its batch-first twin on (N, T, d)."""

    def __init__(self, flatten: str | None = "sample", d: int = 4):
        super().__init__()
        torch.manual_seed(3)
        self.flatten = flatten
        self.fc1, self.fc2, self.act = nn.Linear(3, 5), nn.Linear(5, d), nn.PReLU()
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 2)

    def forward(self, x):  # x: (N, T, 3)
        n, t = x.shape[:2]
        if self.flatten == "sample":
            h = x.reshape(n * t, -1)
        elif self.flatten == "position":
            h = x.transpose(0, 1).reshape(t * n, -1)
        else:
            h = x
        h = self.norm(self.act(self.fc2(torch.tanh(self.fc1(h)))))
        if self.flatten == "sample":
            h = h.reshape(n, t, -1)
        elif self.flatten == "position":
            h = h.reshape(t, n, -1).transpose(0, 1)
        return self.head(h).transpose(1, 2)


@pytest.mark.parametrize("flatten", ["sample", "position"])
def test_flattened_rows_get_kronecker_blocks_and_exact_blocks(flatten):
    model, twin = Flattened(flatten), Flattened(None)
    twin.load_state_dict(model.state_dict())
    X, y = _sequences(3)
    loss = nn.CrossEntropyLoss()
    for approx in ("expand", "reduce"):
        kfac = kh.compute_kfac(model, loss, (X, y), approx=approx, per_position=True)
        reference = kh.compute_kfac(twin, loss, (X, y), approx=approx, per_position=True)
        assert not kfac.skipped
        assert_same_factors(kfac, reference, ["fc1", "fc2"])  # were skipped as not observable
    assert_exact_blocks(kfac, model, loss, X, y, ["norm", "act.weight"])
    # the per-sample pass of EKFAC maps the rows to their samples too
    ekfac, twin_ekfac = (kh.compute_ekfac(m, loss, (X, y), per_position=True) for m in (model, twin))
    assert rel_err(ekfac["fc1"].to_dense(), twin_ekfac["fc1"].to_dense()) < EXACT


class LoRASequenceFirst(nn.Module):
    """A LoRA adapter (B zero-initialized: its output is zero for every sample) on a sequence-first (T, N, d) tensor."""

    def __init__(self, sequence_first: bool = True):
        super().__init__()
        torch.manual_seed(4)
        self.sequence_first = sequence_first
        self.base, self.lora_a, self.lora_b = nn.Linear(3, 4), nn.Linear(3, 2, bias=False), nn.Linear(2, 4, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (N, T, 3)
        h = x.transpose(0, 1) if self.sequence_first else x
        h = torch.tanh(self.base(h) + self.lora_b(self.lora_a(h)))
        h = h.transpose(0, 1) if self.sequence_first else h
        return self.head(h).transpose(1, 2)


def test_lora_zero_b_takes_the_sample_axis_of_its_input():
    model, twin = LoRASequenceFirst(), LoRASequenceFirst(sequence_first=False)
    twin.load_state_dict(model.state_dict())
    X, y = _sequences(N)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), approx="reduce", per_position=True)
    reference = kh.compute_kfac(twin, nn.CrossEntropyLoss(), (X, y), approx="reduce", per_position=True)
    assert not kfac.skipped and float(kfac["lora_b"].G.norm()) > 0  # B's output is zero, its gradient is not
    assert_same_factors(kfac, reference, ["base", "lora_a", "lora_b", "head"])


def test_identical_samples_are_placed_by_shape():
    """Identical samples (T == N): no tensor changes when they are rotated, so the probe places them by the axis that
    shrinks when a sample is left out — the sequence axis does not."""
    model = SequenceFirstEncoder().eval()
    X, y = _sequences(N, n=1)
    X, y = X.expand(N, -1, -1), y.expand(N, -1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), per_position=True)
    assert not kfac.skipped
    assert_exact_blocks(kfac, model, nn.CrossEntropyLoss(), X, y, ["layer.norm1", "act.weight"])


def test_shrunk_layout():
    from kfac_hessian.factors.sample_axis import shrunk_layout

    assert shrunk_layout(torch.Size([N, N, 2]), torch.Size([N, N - 1, 2]), N).axis == 1
    rows = shrunk_layout(torch.Size([3 * N, 2]), torch.Size([3 * (N - 1), 2]), N)
    assert (rows.state, rows.axis) == ("rows", 0)
    assert shrunk_layout(torch.Size([N, N]), torch.Size([N, N]), N) is SHARED  # T5's (T, T) buckets, T == N
    assert shrunk_layout(torch.Size([N, 5]), torch.Size([N - 1, 4]), N).state == "unknown"


def test_transformers_opt_flattened_rows_covered_and_exact():
    """OPT runs its MLP and the layers' final LayerNorm on (N·T, d) rows: covered, the LayerNorm exact."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, ffn_dim=6,
                                    num_attention_heads=2, max_position_embeddings=8, word_embed_proj_dim=4)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).double().eval()
    ids = torch.randint(0, 8, (N, 4), generator=torch.Generator().manual_seed(1))
    inputs, targets = {"input_ids": ids[:, :-1]}, ids[:, 1:]
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (inputs, targets), output=kh.sequence_logits,
                           per_position=True)
    assert not kfac.skipped and "(100.0 %)" in kfac.summary()
    name = "model.decoder.layers.0.final_layer_norm"
    assert_exact_blocks(kfac, model, nn.CrossEntropyLoss(), inputs, targets, [name], output=kh.sequence_logits)


def test_transformers_swin_with_several_images():
    """Swin's relative-position bias (1, heads, w², w²) is added to N·windows rows: expanded to those (not to N, which
    crashed), its table gets the exact GGN block; every parameter is covered."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=1, embed_dim=4, depths=[1],
                                     num_heads=[1], window_size=2, num_labels=2)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(config).double().eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 2, (2,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert not kfac.skipped and "(100.0 %)" in kfac.summary()
    table = "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    assert_exact_blocks(kfac, model, nn.CrossEntropyLoss(), X, y, [table])


class _SequenceFirstData(nn.Module):
    """Reads its input as ``(T, N, C)``: data that carries the samples on axis 1, against the data convention."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(x).mean(0))


@pytest.mark.parametrize("length", [N, N + 2])
def test_data_with_the_samples_off_axis_zero_is_refused_even_when_the_sizes_coincide(length):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(length, N, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (N,), generator=g)
    with pytest.raises(ValueError, match="does not follow the samples of the data"):
        kh.compute_kfac(_SequenceFirstData().double(), nn.CrossEntropyLoss(), [(X, y)])


def _blocks_without_reuse(monkeypatch, run):
    """``run()`` with the probe's run never handed to the pass (the pass runs its forward once more)."""
    from kfac_hessian.factors import stream

    probe = stream.probe_sample_axes
    with monkeypatch.context() as patched:
        patched.setattr(stream, "probe_sample_axes", lambda *args, **kwargs: probe(*args, **{**kwargs, "keep": False}))
        return run()


@pytest.mark.parametrize("family, n", [("llama", 3), ("gpt2", 2)])
def test_the_probes_run_on_the_whole_batch_is_the_passs_own_forward(monkeypatch, family, n):
    """On a batch of at most ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples the probe's run with the pass's settings
    (GPT-2: its position embedding expanded to the batch) is the pass's forward: one forward fewer, and every block
    the same to the last bit as with the forward run again."""
    from ..conftest import transformers_problem

    model, inputs, targets, output = transformers_problem(family, n=n)
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def run():
        start = forwards[0]
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (inputs, targets), curvature="mc", seed=0,
                               output=output)
        return kfac, forwards[0] - start

    kfac, runs = run()
    again, runs_again = _blocks_without_reuse(monkeypatch, run)
    assert runs == runs_again - 1
    assert set(kfac) == set(again)
    for name in kfac:
        assert torch.equal(kfac[name].to_dense(), again[name].to_dense()), name


def test_a_model_drawing_random_numbers_runs_its_forward_again(monkeypatch):
    """Dropout in train mode draws new masks in every run: the probe's run is not the pass's forward then."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 3)).double().train()
    X = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1])
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def run():
        start = forwards[0]
        with pytest.warns(UserWarning):  # the dropout warning
            kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=0)
        return kfac, forwards[0] - start

    kfac, runs = run()
    again, runs_again = _blocks_without_reuse(monkeypatch, run)
    assert runs == runs_again
    assert all(torch.equal(kfac[name].to_dense(), again[name].to_dense()) for name in kfac)
