"""PEFT adapters beyond LoRA, and bias-only fine-tuning, against the float64 reference.

IA3 (learned scales on GPT-2's attention and MLP), LoRA with a
``modules_to_save`` classifier head, prefix tuning (GPT-2), prompt tuning
(BERT: the prompt looked up once and ``repeat``-ed to the batch) and BiTFiT
(only biases and the head trainable): each example's clipped gradient is the one-example-at-a-time
one, and only the trainable parameters get a gradient.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import swiftdp
from support.oracle import max_rel_error, reference_clipped_sum

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

V, T, B, C = 40, 6, 3, 0.05


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": torch.randint(3, V, (B, T), generator=g), "attention_mask": mask}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=V, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _ia3() -> nn.Module:
    return peft.get_peft_model(_gpt2(), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"]))


def _lora_head() -> nn.Module:
    return peft.get_peft_model(_bert(), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))


def _prefix() -> nn.Module:  # learned keys and values prepended in every layer
    return peft.get_peft_model(_gpt2(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3))


def _prompt() -> nn.Module:  # learned input embeddings prepended, copied to the batch
    return peft.get_peft_model(_bert(), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3))


def _bitfit() -> nn.Module:
    model = _bert()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias") or n.startswith("classifier"))
    return model


def _causal(out, y):
    return F.cross_entropy(out.logits[0, :-1], y[0, 1:], ignore_index=-100)


def _classify(out, y):
    return F.cross_entropy(out.logits, y)


CASES = [("ia3", _ia3, "causal"), ("lora_modules_to_save", _lora_head, "classify"),
         ("prefix", _prefix, "causal"), ("prompt", _prompt, "classify"),
         ("bitfit", _bitfit, "classify")]


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize(("name", "make", "kind"), CASES, ids=[c[0] for c in CASES])
def test_adapters_and_bias_only_fine_tuning_are_exact(name, make, kind, mode):
    model = make().double()
    batch = _batch()
    if kind == "causal":
        labels, ref = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100), _causal
    else:
        labels, ref = torch.tensor([0, 1, 1]), _classify
    want, _ = reference_clipped_sum(copy.deepcopy(model), ref, batch, labels, C,
                                    call=lambda m, x: m(**x))
    clipper = swiftdp.GradClipper(model, C, mode=mode)
    try:
        model(**batch, labels=labels).loss.backward()
    finally:
        clipper.remove()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert max_rel_error([p.grad for p in trainable], want) < 1e-9
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert 0 < len(trainable) < len(list(model.parameters()))
