"""The probe set: models as their authors write them, each a tiny float64 problem (one batch, nothing downloaded).

Every probe is one model class the library has to handle without being told (issue 21): PyTorch's built-ins in their
default layouts (sequence-first ``(T, N, C)`` inside the model — the data batch-first, the library's convention — for
``nn.TransformerEncoder``, ``nn.TransformerDecoderLayer``, ``nn.MultiheadAttention``, recurrent layers, and a
``PReLU``/``LayerNorm`` applied to such a tensor; each with ``T == N``, where a sample axis guessed from sizes goes
wrong silently, and with ``T != N``), grouped convolutions, ``nn.EmbeddingBag``, transformers models from tiny
configs, a peft LoRA model and parametrized weights.

Conventions: models are float64 and in eval mode (no dropout: one deterministic function on both paths); ``N = 3``
samples (language models: 2 samples of 3 tokens, so that the reference Jacobian stays small); the loss is
``nn.CrossEntropyLoss`` (mean). Sequence models pool over time to one output per sample, so their normalization and
per-sample blocks are exact blocks of the GGN; language models give per-position logits ``(N, V, T)``
(``kh.sequence_logits``) and run with ``per_position=True`` (exact columns) unless the probe is about the labels of
the default ``position_signs`` estimate. Every probe runs in a few seconds (the first transformers model also imports
transformers) and is in the tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

N_SAMPLES = 3  # samples per batch; the T == N probes use sequences of this length
OTHER_LENGTH = 5  # the T != N probes
CLASSES = 3
VOCABULARY = 16


@dataclass
class Problem:
    """One batch for one model: ``compute_kfac(model, loss_fn, (inputs, targets), **options)``."""

    model: nn.Module
    inputs: Tensor | dict[str, Any]
    targets: Tensor
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    options: dict[str, Any] = field(default_factory=dict)  # pass options: output=, per_position=, …


@dataclass(frozen=True)
class Probe:
    """A named model class and how to build its problem. ``tolerance``: the relative Frobenius error an exact block
    may have (float64 round-off), larger only where the model itself computes in float32 (``tolerance_reason``);
    ``refusal_expected``: the problem breaks a convention of the library, whose answer must be a clear error."""

    name: str
    family: str
    build: Callable[[], Problem]
    requires: tuple[str, ...] = ()  # optional packages it needs
    tolerance: float = 1e-10
    tolerance_reason: str = ""
    refusal_expected: str = ""  # why the library should refuse the problem (a clear error) rather than cover it


def _generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(n: int = N_SAMPLES, classes: int = CLASSES, seed: int = 2) -> Tensor:
    return torch.randint(0, classes, (n,), generator=_generator(seed))


def _ready(model: nn.Module) -> nn.Module:
    return model.double().eval()


# --- PyTorch built-ins in their default layouts ---------------------------------------------------------------------


class SequenceClassifier(nn.Module):
    """Batch-first data ``(N, T, d_in)``, turned sequence-first ``(T, N, ·)`` first unless ``batch_first`` (as code
    written for PyTorch's default layout does) → ``Linear`` embedding → ``body`` → mean over time → ``Linear`` head:
    one output per sample."""

    def __init__(self, body: nn.Module, d: int = 8, d_in: int = 4, batch_first: bool = False):
        super().__init__()
        self.embed, self.body, self.head = nn.Linear(d_in, d), body, nn.Linear(d, CLASSES)
        self.time_axis = 1 if batch_first else 0

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.embed(x if self.time_axis else x.transpose(0, 1)))
        return self.head(h.mean(self.time_axis))


class SequenceFirstData(nn.Module):
    """A ``TransformerEncoder`` classifier that takes its data sequence-first, ``(T, N, d)``: against the library's
    data convention (the samples on axis 0 of every input)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.embed, self.body, self.head = nn.Linear(4, d), _encoder(False), nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.embed(x)).mean(0))


class AttentionBody(nn.Module):
    """``nn.MultiheadAttention`` as self-attention (``query is key is value``) in its default sequence-first layout."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class CrossAttentionClassifier(nn.Module):
    """``nn.MultiheadAttention`` with ``kdim``/``vdim`` (and optionally ``add_bias_kv``) as cross-attention from a
    query sequence to a memory of another length and width, sequence-first inside; mean over the queries → head."""

    def __init__(self, add_bias_kv: bool = False, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.attention = nn.MultiheadAttention(d, 2, kdim=6, vdim=6, add_bias_kv=add_bias_kv)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        q, m = self.embed(query.transpose(0, 1)), memory.transpose(0, 1)
        return self.head(self.attention(q, m, m, need_weights=False)[0].mean(0))


class Activated(nn.Module):
    """``module`` followed by a tanh (so that a following linear layer sees a non-linear function)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.module(x))


class DecoderClassifier(nn.Module):
    """``nn.TransformerDecoderLayer``: self-attention on a target sequence, cross-attention to a memory of another
    length (``T_q != T_kv``), mean over the target positions → head; batch-first data, turned sequence-first unless
    ``batch_first``."""

    def __init__(self, d: int = 8, batch_first: bool = False):
        super().__init__()
        self.embed_target, self.embed_memory = nn.Linear(4, d), nn.Linear(4, d)
        self.decoder = nn.TransformerDecoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.head, self.time_axis = nn.Linear(d, CLASSES), 1 if batch_first else 0

    def forward(self, target: Tensor, memory: Tensor) -> Tensor:
        if not self.time_axis:
            target, memory = target.transpose(0, 1), memory.transpose(0, 1)
        h = self.decoder(self.embed_target(target), self.embed_memory(memory))
        return self.head(h.mean(self.time_axis))


class RecurrentClassifier(nn.Module):
    """A recurrent layer (sequence-first unless ``batch_first``; the data batch-first ``(N, T, d)``, transposed for
    it) → mean of its outputs over time → head."""

    def __init__(self, recurrent: nn.RNNBase, out_features: int):
        super().__init__()
        self.recurrent, self.head = recurrent, nn.Linear(out_features, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        time_axis = 1 if self.recurrent.batch_first else 0
        out = self.recurrent(x if time_axis else x.transpose(0, 1))[0]
        return self.head(out.mean(time_axis))


class PackedRecurrentClassifier(nn.Module):
    """An LSTM over a ``PackedSequence`` of sequences of different lengths (an input) → the last state of each →
    head."""

    def __init__(self):
        super().__init__()
        self.recurrent, self.head = nn.LSTM(4, 6), nn.Linear(6, CLASSES)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.recurrent(packed)[1][0][-1])


class GroupedConvNet(nn.Module):
    """A grouped and a depthwise ``Conv2d`` → global average → head."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.depthwise(torch.tanh(self.grouped(x))).tanh().mean((2, 3)))


class BagClassifier(nn.Module):
    """``nn.EmbeddingBag`` (mean of a bag of tokens per sample) → head."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(VOCABULARY, 6, mode="mean"), nn.Linear(6, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(tokens)))


def _randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)


def _sequence(length: int, d: int = 4, seed: int = 1) -> Tensor:
    """Batch-first data ``(N, T, d)``: the samples on axis 0 of every input, the library's data convention."""
    return _randn(N_SAMPLES, length, d, seed=seed)


def _sequence_problem(body: nn.Module, length: int, batch_first: bool = False) -> Problem:
    torch.manual_seed(0)
    model = _ready(SequenceClassifier(body, batch_first=batch_first))
    return Problem(model, _sequence(length), _labels())


def _encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


def _sequence_first_data_problem(length: int) -> Problem:
    torch.manual_seed(0)
    return Problem(_ready(SequenceFirstData()), _randn(length, N_SAMPLES, 4), _labels())


def _decoder_problem(batch_first: bool, target_length: int) -> Problem:
    torch.manual_seed(0)
    model = _ready(DecoderClassifier(batch_first=batch_first))
    inputs = {"target": _sequence(target_length), "memory": _sequence(4, seed=3)}
    return Problem(model, inputs, _labels())


def _cross_attention_problem(add_bias_kv: bool) -> Problem:
    torch.manual_seed(0)
    model = _ready(CrossAttentionClassifier(add_bias_kv))
    return Problem(model, {"query": _sequence(T_EQ_N), "memory": _sequence(OTHER_LENGTH, d=6, seed=3)}, _labels())


def _recurrent_problem(recurrent: nn.RNNBase, out_features: int, length: int) -> Problem:
    torch.manual_seed(0)
    model = _ready(RecurrentClassifier(recurrent, out_features))
    return Problem(model, _sequence(length), _labels())


def _packed_problem() -> Problem:
    torch.manual_seed(0)
    model = _ready(PackedRecurrentClassifier())
    return Problem(model, {"x": _sequence(4), "lengths": torch.tensor([4, 2, 3])}, _labels())


def _grouped_conv_problem() -> Problem:
    torch.manual_seed(0)
    return Problem(_ready(GroupedConvNet()), _randn(N_SAMPLES, 4, 5, 5), _labels())


def _embedding_bag_problem() -> Problem:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCABULARY, (N_SAMPLES, 4), generator=_generator())
    return Problem(_ready(BagClassifier()), tokens, _labels())


# --- parametrized weights -------------------------------------------------------------------------------------------


class Symmetric(nn.Module):
    """A user's own parametrization (``register_parametrization``): the weight is ``X + Xᵀ``."""

    def forward(self, X: Tensor) -> Tensor:
        return X + X.T


def _symmetric(linear: nn.Linear) -> nn.Linear:
    return nn.utils.parametrize.register_parametrization(linear, "weight", Symmetric())


def _parametrized_problem(parametrize: Callable[[nn.Linear], nn.Module]) -> Problem:
    torch.manual_seed(0)
    first = nn.Linear(4, 4).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated torch.nn.utils.weight_norm, on purpose
        model = _ready(nn.Sequential(parametrize(first), nn.Tanh(), nn.Linear(4, CLASSES)))
    return Problem(model, _randn(N_SAMPLES, 4), _labels())


# --- transformers from tiny configs ---------------------------------------------------------------------------------


def _tokens(length: int, n: int = N_SAMPLES, low: int = 3) -> Tensor:
    """Token ids above the special ones (padding, BOS/EOS) so that no model treats a random token as padding."""
    return torch.randint(low, VOCABULARY, (n, length), generator=_generator())


_TEXT = dict(vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _language_model(model: nn.Module, length: int = 3, per_position: bool = True, ignored: int = 0) -> Problem:
    """Next-token prediction ``(N, V, T)``; ``ignored`` trailing targets per sample set to ``-100`` (transformers'
    label convention, ``ignore_index=-100``)."""
    import kfac_hessian as kh

    tokens = _tokens(length + 1, n=2)
    targets = tokens[:, 1:].clone()
    if ignored:
        targets[:, -ignored:] = -100
    options: dict[str, Any] = {"output": kh.sequence_logits}
    if per_position:
        options["per_position"] = True
    return Problem(_ready(model), {"input_ids": tokens[:, :-1]}, targets, nn.CrossEntropyLoss(ignore_index=-100),
                   options)


def _gpt2(**kwargs) -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCABULARY, n_positions=12,
                                     bos_token_id=1, eos_token_id=2)
    return _language_model(transformers.GPT2LMHeadModel(config), **kwargs)


def _opt() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16)
    return _language_model(transformers.OPTForCausalLM(config))


def _bloom() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=VOCABULARY, hidden_size=16, n_layer=2, n_head=2)
    return _language_model(transformers.BloomForCausalLM(config))


def _llama() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_TEXT, num_key_value_heads=1, max_position_embeddings=16)
    return _language_model(transformers.LlamaForCausalLM(config))


def _t5() -> Problem:
    """Encoder and decoder of ``N`` tokens each (T == N: the relative-attention bias is shared by every sample)."""
    import transformers

    import kfac_hessian as kh

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCABULARY, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8)
    tokens = _tokens(N_SAMPLES + 1)
    inputs = {"input_ids": _tokens(N_SAMPLES), "decoder_input_ids": tokens[:, :-1]}
    return Problem(_ready(transformers.T5ForConditionalGeneration(config)), inputs, tokens[:, 1:],
                   options={"output": kh.sequence_logits, "per_position": True})


def _text_classifier(model: nn.Module, length: int = 5) -> Problem:
    tokens = _tokens(length)
    return Problem(_ready(model), {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, _labels())


def _bert() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**_TEXT, max_position_embeddings=12, num_labels=CLASSES)
    return _text_classifier(transformers.BertForSequenceClassification(config))


def _albert() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.AlbertConfig(**_TEXT, embedding_size=8, max_position_embeddings=12, num_labels=CLASSES)
    return _text_classifier(transformers.AlbertForSequenceClassification(config))


def _distilbert() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=VOCABULARY, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                           max_position_embeddings=12, num_labels=CLASSES)
    return _text_classifier(transformers.DistilBertForSequenceClassification(config))


def _clip_text() -> Problem:
    """CLIP's text tower with its projection; the projected embedding ``(N, 3)`` taken as logits."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**_TEXT, max_position_embeddings=12, projection_dim=CLASSES,
                                          bos_token_id=1, eos_token_id=2)
    model = transformers.CLIPTextModelWithProjection(config)
    return Problem(_ready(model), {"input_ids": _tokens(5)}, _labels(), options={"output": _text_embeds})


def _text_embeds(output: Any) -> Tensor:
    return output.text_embeds


def _swin() -> Problem:
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
                                     num_heads=[2, 2], window_size=4, num_labels=CLASSES)
    images = _randn(2, 3, 16, 16)
    return Problem(_ready(transformers.SwinForImageClassification(config)), images, _labels(2))


def _speech(family: str) -> Problem:
    """wav2vec2/Hubert sequence classifiers: a convolutional feature encoder and a weight-normed position convolution
    (``torch.nn.utils.parametrizations.weight_norm``)."""
    import transformers

    torch.manual_seed(0)
    audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                 conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                 classifier_proj_size=8, num_labels=CLASSES)
    if family == "wav2vec2":
        model = transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(**audio))
    else:
        model = transformers.HubertForSequenceClassification(transformers.HubertConfig(**audio))
    return Problem(_ready(model), {"input_values": _randn(N_SAMPLES, 100)}, _labels())


def _lora() -> Problem:
    """peft LoRA (r=2, B initialized to zero) on a BERT classifier's query/value projections: only the adapters and
    the classifier are trainable."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**_TEXT, max_position_embeddings=12, num_labels=CLASSES)
    base = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    return _text_classifier(peft.get_peft_model(base, lora))


# --- the probe set --------------------------------------------------------------------------------------------------

BUILTIN, RECURRENT, PARAMETRIZED, TRANSFORMERS, PEFT = ("torch built-in", "recurrent", "parametrized",
                                                        "transformers", "peft")
T_EQ_N, T_NE_N = N_SAMPLES, OTHER_LENGTH
_LLAMA_FLOAT32 = "LlamaRMSNorm computes in float32 inside a float64 model"
_SEQUENCE_FIRST_DATA = "the data carry the samples on axis 1, against the convention (axis 0 of every input)"
_T5_FLOAT32 = "T5LayerNorm computes its variance in float32 inside a float64 model"
_BLOOM_FLOAT32 = "BLOOM's attention softmax computes in float32 inside a float64 model"

PROBES: list[Probe] = [
    Probe("TransformerEncoder (T,N,C), T == N", BUILTIN, lambda: _sequence_problem(_encoder(False), T_EQ_N)),
    Probe("TransformerEncoder (T,N,C), T != N", BUILTIN, lambda: _sequence_problem(_encoder(False), T_NE_N)),
    Probe("TransformerEncoder batch_first", BUILTIN, lambda: _sequence_problem(_encoder(True), T_NE_N, True)),
    Probe("TransformerEncoder fed (T,N,C) data, T == N", BUILTIN, lambda: _sequence_first_data_problem(T_EQ_N),
          refusal_expected=_SEQUENCE_FIRST_DATA),
    Probe("TransformerEncoder fed (T,N,C) data, T != N", BUILTIN, lambda: _sequence_first_data_problem(T_NE_N),
          refusal_expected=_SEQUENCE_FIRST_DATA),
    Probe("TransformerDecoderLayer (T,N,C), T == N", BUILTIN, lambda: _decoder_problem(False, T_EQ_N)),
    Probe("TransformerDecoderLayer batch_first", BUILTIN, lambda: _decoder_problem(True, T_NE_N)),
    Probe("MultiheadAttention (T,N,C), T == N", BUILTIN, lambda: _sequence_problem(AttentionBody(), T_EQ_N)),
    Probe("MultiheadAttention (T,N,C), T != N", BUILTIN, lambda: _sequence_problem(AttentionBody(), T_NE_N)),
    Probe("MultiheadAttention kdim/vdim cross-attention", BUILTIN, lambda: _cross_attention_problem(False)),
    Probe("MultiheadAttention kdim/vdim, add_bias_kv", BUILTIN, lambda: _cross_attention_problem(True)),
    Probe("PReLU on (T,N,C), T == N", BUILTIN, lambda: _sequence_problem(Activated(nn.PReLU()), T_EQ_N)),
    Probe("PReLU on (T,N,C), T != N", BUILTIN, lambda: _sequence_problem(Activated(nn.PReLU()), T_NE_N)),
    Probe("LayerNorm on (T,N,C), T == N", BUILTIN, lambda: _sequence_problem(Activated(nn.LayerNorm(8)), T_EQ_N)),
    Probe("LayerNorm on (T,N,C), T != N", BUILTIN, lambda: _sequence_problem(Activated(nn.LayerNorm(8)), T_NE_N)),
    Probe("grouped + depthwise Conv2d", BUILTIN, _grouped_conv_problem),
    Probe("EmbeddingBag", BUILTIN, _embedding_bag_problem),
    Probe("LSTM (T,N,C), T == N", RECURRENT, lambda: _recurrent_problem(nn.LSTM(4, 6), 6, T_EQ_N)),
    Probe("LSTM (T,N,C), T != N", RECURRENT, lambda: _recurrent_problem(nn.LSTM(4, 6), 6, T_NE_N)),
    Probe("LSTM 2 layers, bidirectional, proj_size", RECURRENT,
          lambda: _recurrent_problem(nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3), 6, T_NE_N)),
    Probe("LSTM on a PackedSequence", RECURRENT, _packed_problem),
    Probe("GRU batch_first, bidirectional", RECURRENT,
          lambda: _recurrent_problem(nn.GRU(4, 5, batch_first=True, bidirectional=True), 10, T_NE_N)),
    Probe("RNN 2 layers (T,N,C)", RECURRENT, lambda: _recurrent_problem(nn.RNN(4, 5, num_layers=2), 5, T_NE_N)),
    Probe("weight_norm (parametrizations)", PARAMETRIZED,
          lambda: _parametrized_problem(nn.utils.parametrizations.weight_norm)),
    Probe("spectral_norm (parametrizations)", PARAMETRIZED,
          lambda: _parametrized_problem(nn.utils.parametrizations.spectral_norm)),
    Probe("orthogonal (parametrizations)", PARAMETRIZED,
          lambda: _parametrized_problem(nn.utils.parametrizations.orthogonal)),
    Probe("register_parametrization (own: X + Xᵀ)", PARAMETRIZED, lambda: _parametrized_problem(_symmetric)),
    Probe("weight_norm (deprecated hook: weight_g, weight_v)", PARAMETRIZED,
          lambda: _parametrized_problem(nn.utils.weight_norm)),
    Probe("GPT-2 LM", TRANSFORMERS, _gpt2, requires=("transformers",)),
    Probe("GPT-2 LM, default position_signs", TRANSFORMERS, lambda: _gpt2(per_position=False),
          requires=("transformers",)),
    Probe("GPT-2 LM, labels -100", TRANSFORMERS, lambda: _gpt2(ignored=1), requires=("transformers",)),
    Probe("BERT classifier", TRANSFORMERS, _bert, requires=("transformers",)),
    Probe("ALBERT classifier", TRANSFORMERS, _albert, requires=("transformers",)),
    Probe("DistilBERT classifier", TRANSFORMERS, _distilbert, requires=("transformers",)),
    Probe("CLIP text + projection", TRANSFORMERS, _clip_text, requires=("transformers",)),
    Probe("OPT LM", TRANSFORMERS, _opt, requires=("transformers",)),
    Probe("BLOOM LM", TRANSFORMERS, _bloom, requires=("transformers",), tolerance=1e-6,
          tolerance_reason=_BLOOM_FLOAT32),
    Probe("Llama LM", TRANSFORMERS, _llama, requires=("transformers",), tolerance=1e-6,
          tolerance_reason=_LLAMA_FLOAT32),
    Probe("T5 seq2seq, T == N", TRANSFORMERS, _t5, requires=("transformers",), tolerance=1e-6,
          tolerance_reason=_T5_FLOAT32),
    Probe("Swin classifier, 2 images", TRANSFORMERS, _swin, requires=("transformers",)),
    Probe("wav2vec2 classifier", TRANSFORMERS, lambda: _speech("wav2vec2"), requires=("transformers",)),
    Probe("Hubert classifier", TRANSFORMERS, lambda: _speech("hubert"), requires=("transformers",)),
    Probe("peft LoRA on BERT", PEFT, _lora, requires=("transformers", "peft")),
]
