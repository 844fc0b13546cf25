"""A Hugging Face model's own loss (``model(**batch, labels=...)``), per example.

Hugging Face models compute their loss inside ``forward`` as a token mean over
the whole batch (``-100`` labels left out), so each example's weight depends on
how many real tokens the *other* examples have — one example's presence
reweights all the others, which DP-SGD's clipping does not bound. With
:class:`ModelLoss` attached, a call with ``labels=`` runs the model without
them (no loss inside the model: its outputs are then per example, which the
independence probe checks) and sets ``loss`` from the logits and labels,
example by example, as the model's head defines it:

* causal LM (``…ForCausalLM``, decoder-only ``…ForConditionalGeneration``):
  position ``t`` predicts ``labels[t + 1]`` (or ``shift_labels`` if given),
  except from a padding position (``attention_mask`` 0: with left padding the
  last pad would otherwise predict the first real token, so a left-padded
  example's loss equals its unpadded loss); virtual tokens prepended by a
  prompt-learning adapter are left out;
* masked LM, token classification, encoder-decoder generation (T5, BART:
  ``decoder_input_ids`` are built from the labels as the model would):
  ``labels[t]`` at position ``t``;
* sequence classification: cross-entropy, squared error (``num_labels == 1``
  or ``problem_type="regression"``) or multi-label BCE, as the model infers it.

Each example's loss is the mean over its own real tokens (``token_reduction=
"mean"``; ``"sum"``: their sum; an example with none contributes 0), and the
batch's loss is their mean (``loss_reduction="mean"``) or sum. The batch-level
``num_items_in_batch`` that ``transformers.Trainer`` passes is dropped: it is
a normaliser counted over the batch.

Models are recognised by duck typing (a ``config`` and HF's ``loss_type``
naming), so ``transformers`` is never imported here; a PEFT wrapper is seen
through ``get_base_model()``. Labels given to a head this does not know are
refused with the fix (``dp.backward(losses)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swiftdp.errors import InvalidArgumentError
from swiftdp.losses import per_example_cross_entropy

TokenReduction = Literal["mean", "sum"]
_DROPPED = ("labels", "num_items_in_batch", "shift_labels")


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) is a Hugging Face model."""
    base = _base(model)
    return hasattr(base, "config") and hasattr(base, "loss_type") and hasattr(
        base, "can_generate")


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    if callable(get):
        try:
            base = get()
            if isinstance(base, nn.Module):
                return base
        except (AttributeError, TypeError):
            pass
    return model


class ModelLoss:
    """Hooks on a Hugging Face model that replace its batch-coupled loss by a per-example one.

    Args:
        model: the model the user calls (a ``PreTrainedModel`` or a PEFT model).
        reduction: returns the declared ``loss_reduction`` (``"mean"`` or ``"sum"``).
        token_reduction: ``"mean"`` (each example's mean over its own real
            tokens) or ``"sum"``.
        active: whether to set ``loss`` now (the engine's own probe runs,
            without gradient, get the model's outputs without it).

    Raises:
        InvalidArgumentError: ``token_reduction`` is not ``"mean"`` or ``"sum"``.
    """

    def __init__(self, model: nn.Module, reduction: Callable[[], str],
                 token_reduction: TokenReduction = "mean",
                 active: Callable[[], bool] = lambda: True) -> None:
        if token_reduction not in ("mean", "sum"):
            raise InvalidArgumentError(
                f"Expected token_reduction in ('mean', 'sum'), got {token_reduction!r}.")
        self.model = model
        self.base = _base(model)
        self.reduction = reduction
        self.token_reduction: TokenReduction = token_reduction
        self.active = active
        self._calls: list[dict[str, Any] | None] = []
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        """Detach the hooks (the model computes its own loss again)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ----------------------------------------------------------------- hooks
    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            self._calls.append(None)
            return None
        taken = {k: kwargs[k] for k in _DROPPED if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        kind = self._kind(taken)
        if kind == "seq2seq" and rest.get("decoder_input_ids") is None and (
                rest.get("decoder_inputs_embeds") is None):
            prepare: Any = self.base.prepare_decoder_input_ids_from_labels
            rest["decoder_input_ids"] = prepare(labels=taken["labels"])
        taken["kind"] = kind
        taken["attention_mask"] = kwargs.get("attention_mask")
        self._calls.append(taken)
        return args, rest

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        taken = self._calls.pop() if self._calls else None
        if taken is None or output is None or not self.active():
            return None
        logits = output.get("logits") if hasattr(output, "get") else (
            output[0] if isinstance(output, tuple) and output else None)
        if not isinstance(logits, Tensor):
            raise InvalidArgumentError(
                f"{type(self.base).__name__} was called with labels= but returned no logits "
                "to compute the per-example loss from. Pass per-example losses to "
                "dp.backward(losses) instead.")
        per = self.per_example(logits, taken)
        loss = per.mean() if self.reduction() == "mean" else per.sum()
        return _with_loss(output, loss)

    # ------------------------------------------------------------- the loss
    def _kind(self, taken: dict[str, Any]) -> str:
        loss_type = getattr(self.base, "loss_type", None)
        config = getattr(self.base, "config", None)
        if loss_type in (None, "ForCausalLM"):
            return "causal"
        if loss_type == "ForConditionalGeneration":
            if getattr(config, "is_encoder_decoder", False):
                if not callable(getattr(self.base, "prepare_decoder_input_ids_from_labels",
                                        None)):
                    raise self._unknown(loss_type)
                return "seq2seq"
            return "causal"
        if loss_type in ("ForMaskedLM", "ForTokenClassification"):
            return "tokens"
        if loss_type in ("ForSequenceClassification", "ForImageClassification",
                         "ForAudioClassification", "ForVideoClassification"):
            return "sequence"
        raise self._unknown(loss_type)

    def _unknown(self, loss_type: Any) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{type(self.base).__name__} (loss_type={loss_type!r}) was called with labels=, "
            "but swiftdp does not know how this head forms its loss per example (its own "
            "loss couples the examples of the batch). Call the model without labels and "
            "pass one loss per example to dp.backward(losses).")

    def per_example(self, logits: Tensor, taken: dict[str, Any]) -> Tensor:
        """The ``(B,)`` losses of one call, as the model's head defines its loss.

        Args:
            logits: the model's logits.
            taken: the call's labels (and ``shift_labels``) and its head kind.

        Returns:
            Example ``i``'s loss at entry ``i``, a function of example ``i`` alone.
        """
        kind, labels = taken["kind"], taken.get("labels")
        tr = self.token_reduction
        if labels is None and not (kind == "causal" and taken.get("shift_labels") is not None):
            raise InvalidArgumentError("Expected labels= with the model call.")
        if kind == "sequence":
            assert labels is not None
            return self._sequence(logits, labels)
        if kind == "causal":
            shifted = taken.get("shift_labels")
            mask = taken.get("attention_mask")
            given: Any = shifted if shifted is not None else labels
            extra = logits.shape[1] - given.shape[1]
            if extra > 0:
                # virtual tokens of a prompt-learning adapter, prepended (as PEFT pads
                # the labels before the shift: the last one predicts the first label)
                if shifted is None:
                    labels = F.pad(given, (extra, 0), value=-100)
                else:
                    shifted = F.pad(shifted, (extra, 0), value=-100)
                if isinstance(mask, Tensor) and mask.dim() == 2:
                    mask = F.pad(mask, (extra, 0), value=1)
            if shifted is None:
                assert labels is not None
                shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            if isinstance(mask, Tensor) and mask.shape == shifted.shape:
                # a padding position predicts nothing (left padding = no padding)
                shifted = shifted.masked_fill(mask.to(shifted.device) == 0, -100)
            return per_example_cross_entropy(_upcast(logits), shifted.to(logits.device),
                                             token_reduction=tr)
        assert labels is not None
        return per_example_cross_entropy(_upcast(logits), labels.to(logits.device),
                                         token_reduction=tr)

    def _sequence(self, logits: Tensor, labels: Tensor) -> Tensor:
        config: Any = self.base.config
        n = int(config.num_labels)
        problem = config.problem_type
        if problem is None:
            problem = ("regression" if n == 1 else "single_label_classification"
                       if labels.dtype in (torch.long, torch.int) else
                       "multi_label_classification")
        labels = labels.to(logits.device)
        b = logits.shape[0]
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(b, n), labels.view(b), reduction="none")
        if problem == "regression":
            pred = _upcast(logits.view(b, -1))
            err = F.mse_loss(pred, labels.view(b, -1).to(pred.dtype), reduction="none")
            return err.mean(1)
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(
                logits.view(b, -1), labels.view(b, -1).to(logits.dtype), reduction="none"
            ).mean(1)
        raise self._unknown(f"problem_type={problem}")


def _upcast(t: Tensor) -> Tensor:
    """Half-precision logits in float32 for the loss (as the models do); others as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _with_loss(output: Any, loss: Tensor) -> Any:
    """``output`` with ``loss`` set first, as the model would have returned it."""
    if isinstance(output, tuple):
        return (loss, *output)
    keys = list(output.keys())
    try:
        return type(output)(loss=loss, **{k: output[k] for k in keys if k != "loss"})
    except TypeError:
        output["loss"] = loss
        return output
