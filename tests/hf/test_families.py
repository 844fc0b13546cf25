"""Hugging Face model families as they come, against the one-example-at-a-time float64 reference.

GPT-2, BERT, DistilBERT and ALBERT look positions up with ``position_ids`` of
shape ``(1, T)`` shared by the batch (HF's default): the lookup's output is
broadcast to the batch with its rows kept aligned, so each example's
gradient of the position table is its own. Nothing is passed that a user
would not pass anyway.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import SwiftDPError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

V, T, B = 40, 6, 3
C = 0.05
TOL = 1e-9
_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).double()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=V, max_position_embeddings=16, num_labels=2, **_NO_DROPOUT)).double()


def _distilbert() -> nn.Module:
    torch.manual_seed(0)
    return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        n_layers=1, n_heads=2, dim=16, hidden_dim=32, vocab_size=V, max_position_embeddings=16,
        num_labels=2, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)).double()


def _albert() -> nn.Module:
    torch.manual_seed(0)
    return tf.AlbertForSequenceClassification(tf.AlbertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        embedding_size=8, vocab_size=V, max_position_embeddings=16, num_labels=2,
        classifier_dropout_prob=0.0, **_NO_DROPOUT)).double()


def _causal(out, y):
    return F.cross_entropy(out.logits[0, :-1], y[0, 1:], ignore_index=-100)


def _classify(out, y):
    return F.cross_entropy(out.logits, y)


def _labels(kind: str) -> Tensor:
    if kind == "causal":
        b = _batch()
        return b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return torch.tensor([0, 1, 1])


FAMILIES = [("gpt2", _gpt2, "causal"), ("bert", _bert, "classify"),
            ("distilbert", _distilbert, "classify"), ("albert", _albert, "classify")]


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize(("name", "make", "kind"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_shared_position_lookups_train_exactly_as_they_come(name, make, kind, mode):
    batch, labels = _batch(), _labels(kind)
    ref_loss = _causal if kind == "causal" else _classify
    model = make()
    want, _ = reference_clipped_sum(copy.deepcopy(model), ref_loss, batch, labels, C,
                                    call=lambda m, x: m(**x))
    clipper = swiftdp.GradClipper(model, C, mode=mode)
    try:
        model(**batch, labels=labels).loss.backward()
    finally:
        clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < TOL


def test_gpt2_neighbour_sensitivity_stays_within_c():
    batch, labels = _batch(), _labels("causal")

    def clipped_sum(data):
        x, y = data
        model = _gpt2()
        clipper = swiftdp.GradClipper(model, C)
        try:
            model(**x, labels=y).loss.backward()
        finally:
            clipper.remove()
        return [p.grad.detach().clone() for p in model.parameters()]

    assert neighbour_sensitivity(clipped_sum, (batch, labels), B) <= C * (1 + 1e-9)


class _SharedLookup(nn.Module):
    """A position table looked up with (1, T) ids, then used in a way that mixes its rows."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.tok, self.pos, self.mix = nn.Embedding(V, 4), nn.Embedding(T, 4), mix
        self.head = nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        tok = self.tok(ids)
        pos = self.pos(torch.arange(ids.shape[1])[None])
        if self.mix:  # the rows copied to the batch, then summed over it: not one per example
            pos = (pos + torch.zeros_like(tok)).sum(0, keepdim=True)
        return self.head(tok + pos).mean(1)


def test_shared_lookup_rows_must_stay_aligned_with_the_examples():
    ids = _batch()["input_ids"]
    y = torch.tensor([0, 1, 1])
    model = _SharedLookup(mix=False).double()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _plain_ce, ids, y, C)
    clipper = swiftdp.GradClipper(model, C)
    F.cross_entropy(model(ids), y).backward()
    clipper.remove()
    assert max_rel_error([p.grad for p in model.parameters()], want) < TOL
    mixed = _SharedLookup(mix=True).double()
    clipper = swiftdp.GradClipper(mixed, C)
    try:
        with pytest.raises(SwiftDPError):
            F.cross_entropy(mixed(ids), y).backward()
    finally:
        clipper.remove()


def _plain_ce(out, y):
    return F.cross_entropy(out, y)


def test_indices_without_a_batch_dimension_are_clipped_per_example_not_guessed_by_size():
    class Table(nn.Module):  # a (T, T) relative-position lookup, T == B
        def __init__(self) -> None:
            super().__init__()
            self.rel = nn.Embedding(2 * B, 1)

        def forward(self, x: Tensor) -> Tensor:
            n = x.shape[1]
            rel = torch.arange(n)[:, None] - torch.arange(n)[None] + B
            return x * self.rel(rel).squeeze(-1)  # (B, T, T) * (T, T)

    x = torch.randn(B, B, B, dtype=torch.float64)
    model = Table().double()
    want, _ = reference_clipped_sum(copy.deepcopy(model), lambda o, _y: o.pow(2).sum(), x, None, C)
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum")
    try:
        model(x).pow(2).sum().backward()
    finally:
        clipper.remove()
    assert max_rel_error([model.rel.weight.grad], want) < TOL


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
        intermediate_size=32, vocab_size=V)).double()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(("name", "make"), [("gpt2", _gpt2), ("llama", _llama)])
def test_hf_gradient_checkpointing_is_exact(name, make, reentrant):
    batch, labels = _batch(), _labels("causal")
    model = make()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _causal, batch, labels, C,
                                    call=lambda m, x: m(**x))
    plain = copy.deepcopy(model)
    clipper = swiftdp.GradClipper(plain, C)
    plain(**batch, labels=labels).loss.backward()
    clipper.remove()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    clipper = swiftdp.GradClipper(model, C)
    try:
        model(**batch, labels=labels).loss.backward()
    finally:
        clipper.remove()
    got = [p.grad for p in model.parameters()]
    # The same clipped sum as without checkpointing; against the reference, within
    # the float64 rounding bound the norms are clipped with (about 1e-8 relative).
    assert max_rel_error(got, [p.grad for p in plain.parameters()]) < 1e-12
    assert max_rel_error(got, want) < 1e-6


# --- relative position bias (T5), positions without the batch (BART), a batch
# merged into the rows (OPT's (B * T, d) MLP) -------------------------------------

def _t5() -> nn.Module:
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)).double()


def _bart() -> nn.Module:
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)).double()


def _opt() -> nn.Module:
    torch.manual_seed(0)
    return tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, word_embed_proj_dim=16,
        pad_token_id=1)).double()


def _seq2seq(out, y):
    return F.cross_entropy(out.logits[0], y[0], ignore_index=-100)


def _clipped_grads(model: nn.Module, run, mode: str = "bk") -> list[Tensor]:
    """Each parameter's clipped sum after ``run(model).loss.backward()`` under GradClipper."""
    clipper = swiftdp.GradClipper(model, C, mode=mode)
    try:
        run(model).loss.backward()
    finally:
        clipper.remove()
    return [p.grad for p in model.parameters()]


def _sensitivity(base: nn.Module, run, data) -> float:
    """max_j ‖S(D) − S(D∖j)‖ of the clipped sum, ``run(model, data)`` giving the outputs."""
    def clipped_sum(d):
        grads = _clipped_grads(copy.deepcopy(base), lambda m: run(m, d))
        return [g.detach().clone() for g in grads]

    return neighbour_sensitivity(clipped_sum, data, B)


# T5's layer norm computes its variance in float32 (the model's own arithmetic:
# the plain batched gradient differs from the one-example one by ~1e-7 too).
MORE = [("t5", _t5, "seq2seq", 1e-6), ("bart", _bart, "seq2seq", 1e-8),
        ("opt", _opt, "causal", 1e-8)]


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize(("name", "make", "kind", "tol"), MORE, ids=[f[0] for f in MORE])
def test_relative_bias_batchless_positions_and_merged_rows_train_exactly(name, make, kind, tol,
                                                                          mode):
    batch, labels = _batch(), _labels("causal")
    model = make()
    if kind == "seq2seq":  # the reference sees the labels too: they make the decoder inputs
        want, _ = reference_clipped_sum(copy.deepcopy(model), _seq2seq, {**batch, "labels": labels},
                                        labels, C, call=lambda m, x: m(**x))
    else:
        want, _ = reference_clipped_sum(copy.deepcopy(model), _causal, batch, labels, C,
                                        call=lambda m, x: m(**x))
    got = _clipped_grads(model, lambda m: m(**batch, labels=labels), mode)
    assert max_rel_error(got, want) < tol


def _text_call(m: nn.Module, d):
    return m(**d[0], labels=d[1])


@pytest.mark.parametrize(("name", "make"), [("t5", _t5), ("opt", _opt)])
def test_t5_and_opt_neighbour_sensitivity_stays_within_c(name, make):
    data = (_batch(), _labels("causal"))
    assert _sensitivity(make(), _text_call, data) <= C * (1 + 1e-9)


def test_t5_with_the_sequence_as_long_as_the_batch_is_exact():
    # T == B: the (T, T) bias must not pass for batched because of its size.
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (B, B), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, B, dtype=torch.long)}
    labels = ids.clone()
    model = _t5()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _seq2seq, {**batch, "labels": labels},
                                    labels, C, call=lambda m, x: m(**x))
    got = _clipped_grads(model, lambda m: m(**batch, labels=labels))
    assert max_rel_error(got, want) < 1e-6


# --- DeBERTa-v2 (position keys tiled over its (B * H, ...) batch) and HF Swin
# (relative bias table[index] and the window mask tiled over (B * windows, ...)) ---

def _deberta() -> nn.Module:
    torch.manual_seed(0)
    return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2, relative_attention=True,
        position_buckets=8, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        max_relative_positions=8, **_NO_DROPOUT)).double()


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_deberta_v2_disentangled_attention_is_exact(mode):
    batch, labels = _batch(), _labels("classify")
    model = _deberta()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _classify, batch, labels, C,
                                    call=lambda m, x: m(**x))
    got = _clipped_grads(model, lambda m: m(**batch, labels=labels), mode)
    assert max_rel_error(got, want) < 1e-9


def _swin() -> nn.Module:
    torch.manual_seed(0)
    return tf.SwinForImageClassification(tf.SwinConfig(
        image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2], num_heads=[2],
        window_size=4, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0)).double()


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_swin_shifted_windows_are_exact(mode):
    x = torch.randn(B, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1])
    model = _swin()
    want, _ = reference_clipped_sum(copy.deepcopy(model), _classify, x, y, C,
                                    call=lambda m, a: m(pixel_values=a))
    got = _clipped_grads(model, lambda m: m(pixel_values=x, labels=y), mode)
    assert all(g is not None and g.abs().sum() > 0 for g in got)  # the bias tables included
    assert max_rel_error(got, want) < 1e-9


@pytest.mark.parametrize(("name", "make"), [("deberta", _deberta), ("swin", _swin)])
def test_deberta_and_swin_neighbour_sensitivity_stays_within_c(name, make):
    if name == "swin":
        data = (torch.randn(B, 3, 16, 16, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0)) * 3,
                torch.tensor([0, 1, 1]))

        def call(m, d):
            return m(pixel_values=d[0], labels=d[1])
    else:
        data, call = (_batch(), _labels("classify")), _text_call
    assert _sensitivity(make(), call, data) <= C * (1 + 1e-9)
