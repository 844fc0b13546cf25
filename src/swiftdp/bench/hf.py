"""The Hugging Face rows of the benchmark: GPT-2 small (full and LoRA), BERT-base, a Llama.

Each model is built from a ``transformers`` config (nothing is downloaded)
and trained on its own ``labels=`` loss,
``model(input_ids=x, attention_mask=mask, labels=y).loss``, with every token
real (the mask is all ones). swiftdp attaches :class:`swiftdp.hf.ModelLoss`
to such a model, so each example's loss is the mean over its own tokens; with
equal-length examples and no padding the model's own loss (a token mean over
the batch) is the mean of those, which is what Opacus' ``loss_reduction=
"mean"`` assumes in its ``hooks`` and ``functorch`` modes. Opacus' ``ghost``
mode takes the per-token cross-entropy through its criterion wrapper
(:func:`ghost_loss`), reduced per example as the model's head reduces it.

The rows need the optional ``[hf]`` extra (``transformers`` and ``peft``);
without it they are listed and described, and reported "not run".

``size="tiny"`` (2 layers, d = 32, vocabulary 256, T = 16) exists for the
tests only; ``small`` and ``medium`` are the published configurations.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from swiftdp.bench.models import HF_SUITE, SuiteModel

__all__ = [
    "HF_SUITE", "count_parameters", "ghost_loss", "hf_available", "hf_loss", "hf_model",
]

HF_EXTRA = "hf"
HF_SIZES: tuple[str, ...] = ("tiny", "small", "medium")
SEQ_LEN = 128
BATCH = 4
# The speed targets (GPT-2-small config, T = 128, CPU): DP step time
# over the non-private step of the same model.
TIME_TARGETS: dict[str, float] = {"gpt2-small": 1.2, "gpt2-small-lora": 1.1}
LORA_TARGETS: tuple[str, ...] = ("c_attn", "c_proj")  # attn.c_attn, attn.c_proj, mlp.c_proj
LORA_RANK = 8
GPT2_VOCAB = 50257
BERT_VOCAB = 30522
LLAMA_VOCAB = 32000
_TINY = {"layers": 2, "d": 32, "heads": 4, "ff": 64, "vocab": 256, "seq": 16}


def hf_available() -> bool:
    """Whether the ``[hf]`` extra (``transformers`` and ``peft``) can be imported."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
    except (ImportError, ValueError):  # e.g. sys.modules["transformers"] = None
        return False


def missing_extra_message() -> str:
    """The "not run" reason of an HF row without the ``[hf]`` extra."""
    return "needs the [hf] extra: pip install 'swiftdp[hf]'"


# --------------------------------------------------------------- the losses
def hf_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The model's own ``labels=`` loss on token ids ``x`` with an all-ones attention mask."""
    out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    loss: Tensor = out.loss
    return loss


def ghost_loss(model: nn.Module, x: Tensor, y: Tensor, criterion: Callable[..., Tensor],
               *, causal: bool) -> Tensor:
    """The same loss through Opacus' ghost-clipping criterion wrapper.

    Args:
        model: the wrapped model (Opacus' ``GradSampleModuleFastGradientClipping``).
        x: token ids ``(B, T)``.
        y: labels: ``(B, T)`` token ids for a causal LM (position ``t`` predicts
            ``y[t + 1]``, as the model's own loss shifts them), ``(B,)`` classes otherwise.
        criterion: Opacus' ``DPLossFastGradientClipping`` around ``nn.CrossEntropyLoss``.
        causal: the model is a causal LM.

    Returns:
        The loss Opacus backpropagates twice (each example's mean over its tokens).
    """
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    if not causal:
        return criterion(logits, y)
    lg = logits[:, :-1]
    tgt = y[:, 1:]
    return criterion(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), shape=tgt.shape)


# --------------------------------------------------------------- the models
def _dims(size: str) -> dict[str, int] | None:
    return dict(_TINY) if size == "tiny" else None


def _gpt2(size: str, lora: bool) -> nn.Module:
    import transformers as tf

    t = _dims(size)
    cfg = (tf.GPT2Config(vocab_size=t["vocab"], n_positions=t["seq"], n_embd=t["d"],
                         n_layer=t["layers"], n_head=t["heads"], bos_token_id=0, eos_token_id=0)
           if t else tf.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=768,
                                   n_layer=12, n_head=12))
    model: nn.Module = tf.GPT2LMHeadModel(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(  # type: ignore[arg-type]
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(LORA_TARGETS),
            lora_dropout=0.0, fan_in_fan_out=True))
    return model


def _bert(size: str) -> nn.Module:
    import transformers as tf

    t = _dims(size)
    cfg = (tf.BertConfig(vocab_size=t["vocab"], hidden_size=t["d"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], intermediate_size=t["ff"],
                         max_position_embeddings=t["seq"])
           if t else tf.BertConfig())  # BERT-base: V 30522, 12 x 768, 12 heads, FFN 3072
    cfg.num_labels = 2
    return tf.BertForSequenceClassification(cfg)


def _llama(size: str) -> nn.Module:
    import transformers as tf

    t = _dims(size)
    cfg = (tf.LlamaConfig(vocab_size=t["vocab"], hidden_size=t["d"], intermediate_size=t["ff"],
                          num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                          num_key_value_heads=t["heads"] // 2, max_position_embeddings=t["seq"])
           if t else tf.LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=512,
                                    intermediate_size=1408, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2,
                                    max_position_embeddings=2048, tie_word_embeddings=False))
    return tf.LlamaForCausalLM(cfg)


_DESCRIPTIONS = {
    "gpt2-small": f"HF GPT2LMHeadModel, GPT-2 small config (12 x 768, 12 heads, V={GPT2_VOCAB}, "
                  "tied), full fine-tuning",
    "gpt2-small-lora": f"the same GPT-2 small, frozen; peft LoRA r={LORA_RANK} (alpha "
                       f"{2 * LORA_RANK}) on attn.c_attn, attn.c_proj, mlp.c_proj",
    "bert-base": f"HF BertForSequenceClassification, BERT-base config (12 x 768, 12 heads, "
                 f"V={BERT_VOCAB}), 2 labels",
    "llama": f"HF LlamaForCausalLM, 8 x 512, 8 heads, GQA 2 KV heads, FFN 1408 (SwiGLU), "
             f"V={LLAMA_VOCAB}, untied",
}


def hf_model(name: str, size: str) -> SuiteModel:
    """The HF row ``name`` (one of :data:`HF_SUITE`); ``transformers`` is imported only to build.

    Args:
        name: the row's suite name.
        size: ``"small"`` or ``"medium"`` (both the published configuration) or
            ``"tiny"`` (a test size: 2 layers, d = 32, V = 256, T = 16).

    Returns:
        The :class:`SuiteModel`, with the model's own loss and Opacus' ghost loss.
    """
    tiny = size == "tiny"
    t = _TINY["seq"] if tiny else SEQ_LEN
    vocab = _TINY["vocab"] if tiny else {"bert-base": BERT_VOCAB, "llama": LLAMA_VOCAB}.get(
        name, GPT2_VOCAB)
    builds: dict[str, Callable[[], nn.Module]] = {
        "gpt2-small": partial(_gpt2, size, False),
        "gpt2-small-lora": partial(_gpt2, size, True),
        "bert-base": partial(_bert, size),
        "llama": partial(_llama, size),
    }
    causal = name != "bert-base"
    desc = _DESCRIPTIONS[name] + f", T={t}" + (" (tiny test size)" if tiny else "")
    return SuiteModel(
        name, desc, builds[name], (t,), vocab if causal else 2, integer_input=True, vocab=vocab,
        sequence_output=causal, labels_are_inputs=causal, batch_size=BATCH,
        loss=hf_loss, ghost_loss=partial(ghost_loss, causal=causal), extra=HF_EXTRA,
        time_target=TIME_TARGETS.get(name),
    )


def count_parameters(spec: SuiteModel) -> dict[str, Any]:
    """Total and trainable parameters of ``spec``'s model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = spec.build()
    return {"params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}
