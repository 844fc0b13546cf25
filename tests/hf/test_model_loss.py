"""A Hugging Face model's own ``labels=`` loss, per example (swiftdp.hf.ModelLoss).

The reference is written by hand: each example run alone through an unhooked
copy of the model, its loss the mean over its own real tokens with plain
``F.cross_entropy`` (or the head's regression / multi-label loss), clipped and
summed one example at a time in float64 (``support.oracle``). The privacy
probe holds the clipped sum of ``model(**batch).loss`` to C with examples of
very different lengths — the case the model's own token mean over the batch
breaks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum
from support.sensitivity import neighbour_sensitivity
from swiftdp.errors import InvalidArgumentError
from swiftdp.hf import ModelLoss, is_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, T, V = 4, 7, 40
C = 0.05  # small: every example is clipped, so a wrong per-example loss shows
TOL = 1e-9


def _llama(**kw) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         hidden_size=16, intermediate_size=32, vocab_size=V, **kw)
    return tf.LlamaForCausalLM(cfg).double()


def _roberta(cls, **kw):
    torch.manual_seed(0)
    cfg = tf.RobertaConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                           intermediate_size=32, vocab_size=V, max_position_embeddings=T + 4,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return cls(cfg).double()


def _batch(seed: int = 0, lengths=(T, 2, 5, 1)) -> dict[str, Tensor]:
    """Right-padded token batch: example i has lengths[i] real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def _call(model, x):
    return model(**x)


def _engine_grads(model, batch, labels, *, mode="bk", **kw) -> list[Tensor | None]:
    clipper = swiftdp.GradClipper(model, C, mode=mode, **kw)
    try:
        model(**batch, labels=labels).loss.backward()
    finally:
        clipper.remove()
    return [p.grad for p in model.parameters() if p.requires_grad]


def _causal(logits, labels):  # by hand: position t predicts labels[t + 1], own tokens only
    if not (labels[0, 1:] != -100).any():
        return logits.sum() * 0.0  # no target: the example contributes nothing
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)


def _causal_ref(out, labels):
    return _causal(out.logits, labels)


def _tokens_ref(out, labels):
    return F.cross_entropy(out.logits[0], labels[0], ignore_index=-100)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
def test_causal_lm_labels_loss_is_each_examples_own_token_mean_and_exact(mode):
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref = _llama()
    want, _ = reference_clipped_sum(copy.deepcopy(ref), _causal_ref, batch, labels, C, call=_call)
    got = _engine_grads(ref, batch, labels, mode=mode)
    assert max_rel_error(got, want) < TOL


def test_the_loss_is_the_mean_of_per_example_means_not_the_batch_token_mean():
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = _llama()
    own = model(**batch, labels=labels).loss  # Hugging Face: a token mean over the batch
    clipper = swiftdp.GradClipper(model, C)
    out = model(**batch, labels=labels)
    by_hand = torch.stack([_causal(out.logits[i:i + 1], labels[i:i + 1]) for i in range(B)])
    assert torch.allclose(out.loss, by_hand.mean(), rtol=1e-12)
    assert not torch.allclose(out.loss.double(), own.double(), rtol=1e-3)
    assert list(out.keys())[:2] == ["loss", "logits"]
    out.loss.backward()
    clipper.remove()


def test_token_reduction_sum_and_loss_reduction_sum():
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = _llama()
    clipper = swiftdp.GradClipper(model, C, loss_reduction="sum", token_reduction="sum")
    out = model(**batch, labels=labels)
    by_hand = sum(F.cross_entropy(out.logits[i, :-1], labels[i, 1:], ignore_index=-100,
                                  reduction="sum") for i in range(B))  # an empty sum is 0
    assert torch.allclose(out.loss, by_hand, rtol=1e-12)
    out.loss.backward()
    clipper.remove()


def test_trainers_num_items_in_batch_is_dropped_and_return_dict_false_puts_loss_first():
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = _llama()
    clipper = swiftdp.GradClipper(model, C)
    plain = model(**batch, labels=labels).loss
    plain.backward()
    with_count = model(**batch, labels=labels, num_items_in_batch=torch.tensor(3))
    assert torch.equal(with_count.loss.detach(), plain.detach())
    with_count.loss.backward()
    tup = model(**batch, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0
    assert torch.equal(tup[0].detach(), plain.detach())
    tup[0].backward()
    clipper.remove()


def test_padding_does_not_change_an_examples_loss_right_or_left():
    model = _llama()
    clipper = swiftdp.GradClipper(model, C)
    ids = torch.randint(3, V, (1, 4), generator=torch.Generator().manual_seed(3))
    alone = model(input_ids=ids.expand(2, 4), labels=ids.expand(2, 4)).loss
    pad = torch.ones(1, 3, dtype=torch.long)
    right = torch.cat([ids, pad], 1).expand(2, 7)
    right_mask = torch.cat([torch.ones(1, 4), torch.zeros(1, 3)], 1).long().expand(2, 7)
    out_r = model(input_ids=right, attention_mask=right_mask,
                  labels=right.masked_fill(right_mask == 0, -100)).loss
    left = torch.cat([pad, ids], 1).expand(2, 7)
    left_mask = right_mask.flip(1)
    pos = (left_mask.cumsum(1) - 1).clamp(min=0)
    out_l = model(input_ids=left, attention_mask=left_mask, position_ids=pos,
                  labels=left.masked_fill(left_mask == 0, -100)).loss
    clipper.remove()
    assert torch.allclose(out_r, alone, rtol=1e-10)
    assert torch.allclose(out_l, alone, rtol=1e-10)


@pytest.mark.parametrize("problem", ["single", "regression", "multi"])
def test_sequence_classification_heads_are_exact(problem):
    n = 1 if problem == "regression" else 3
    kw = {"problem_type": "multi_label_classification"} if problem == "multi" else {}
    model = _roberta(tf.RobertaForSequenceClassification, num_labels=n, **kw)
    batch = _batch()
    g = torch.Generator().manual_seed(5)
    if problem == "single":
        labels = torch.randint(0, n, (B,), generator=g)
    elif problem == "regression":
        labels = torch.randn(B, generator=g, dtype=torch.float64)
    else:
        labels = torch.randint(0, 2, (B, n), generator=g).double()

    def ref_loss(out, y):
        if problem == "single":
            return F.cross_entropy(out.logits, y)
        if problem == "regression":
            return F.mse_loss(out.logits.view(-1), y.view(-1))
        return F.binary_cross_entropy_with_logits(out.logits, y)

    want, _ = reference_clipped_sum(copy.deepcopy(model), ref_loss, batch, labels, C, call=_call)
    assert max_rel_error(_engine_grads(model, batch, labels), want) < TOL


@pytest.mark.parametrize("head", ["masked", "tokens"])
def test_masked_lm_and_token_classification_are_exact(head):
    cls = tf.RobertaForMaskedLM if head == "masked" else tf.RobertaForTokenClassification
    model = _roberta(cls, num_labels=3)
    batch = _batch()
    g = torch.Generator().manual_seed(6)
    top = V if head == "masked" else 3
    labels = torch.randint(0, top, (B, T), generator=g)
    keep = torch.rand(B, T, generator=g) < 0.5
    keep[:, 0] = True
    labels = labels.masked_fill(~keep | (batch["attention_mask"] == 0), -100)
    want, _ = reference_clipped_sum(copy.deepcopy(model), _tokens_ref, batch, labels, C,
                                    call=_call)
    assert max_rel_error(_engine_grads(model, batch, labels), want) < TOL


def test_lora_adapters_only_and_exact():
    peft = pytest.importorskip("peft")  # installed by the [hf] extra
    base = _llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      lora_alpha=4, lora_dropout=0.0))
    model = model.double()
    assert is_hf_model(model)
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    want, _ = reference_clipped_sum(copy.deepcopy(model), _causal_ref, batch, labels, C,
                                    call=_call)
    got = _engine_grads(model, batch, labels)
    assert max_rel_error(got, want) < TOL
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


# ------------------------------------------------------------------- privacy
def test_neighbour_sensitivity_of_the_labels_loss_stays_within_c():
    # One long example and several one-token ones: the model's own token mean
    # would reweight every short example when the long one leaves.
    lengths = (T, 2, 2, 2)
    batch = _batch(lengths=lengths)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def clipped_sum(data):
        x, y = data
        model = _llama()
        return [g.detach().clone() for g in _engine_grads(model, x, y)]

    s = neighbour_sensitivity(clipped_sum, (batch, labels), B)
    assert s <= C * (1 + 1e-9), f"sensitivity {s / C:.3f} C"


def test_make_private_trains_with_the_labels_loss_and_counts_the_step():
    from torch.utils.data import DataLoader, Dataset

    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    class Rows(Dataset):
        def __len__(self) -> int:
            return B

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"input_ids": batch["input_ids"][i],
                    "attention_mask": batch["attention_mask"][i], "labels": labels[i]}

    model = _llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, opt, DataLoader(Rows(), batch_size=B), noise_multiplier=1.0,
                              max_grad_norm=C, delta=1e-3, seed=0)
    steps = 0
    for rows in dp.data_loader:
        dp.optimizer.zero_grad()
        if len(rows["input_ids"]):
            dp.model(**rows).loss.backward()
        dp.optimizer.step()
        steps += 1
    assert dp.steps == steps and dp.epsilon() > 0


# ------------------------------------------------------------ seq2seq, refusals
def test_encoder_decoder_labels_build_the_decoder_inputs_as_the_model_would():
    torch.manual_seed(0)
    cfg = tf.T5Config(num_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32, vocab_size=V,
                      decoder_start_token_id=0, pad_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).double().eval()
    batch = _batch()
    labels = batch["input_ids"][:, :5].masked_fill(batch["attention_mask"][:, :5] == 0, -100)
    own = model(**batch, labels=labels)
    hook = ModelLoss(model, lambda: "mean")
    try:
        out = model(**batch, labels=labels)
    finally:
        hook.remove()
    assert torch.allclose(out.logits, own.logits, rtol=1e-12)
    by_hand = torch.stack([F.cross_entropy(out.logits[i], labels[i], ignore_index=-100)
                           for i in range(B)]).mean()
    assert torch.allclose(out.loss, by_hand, rtol=1e-12)


def test_labels_for_a_head_without_a_known_per_example_loss_are_refused():
    model = _llama()
    model.loss_type = "ForCTC"
    hook = ModelLoss(model, lambda: "mean")
    batch = _batch()
    try:
        with pytest.raises(InvalidArgumentError, match=r"loss_type='ForCTC'.*dp.backward"):
            model(**batch, labels=batch["input_ids"])
    finally:
        hook.remove()
