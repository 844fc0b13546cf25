"""Hugging Face causal language models built from configs, for the byte-level ``text`` data.

Two kinds of name, both built with ``transformers`` (the ``[hf]`` extra)
from a configuration only — nothing is downloaded, ``from_pretrained`` is
never called, weights are freshly initialised from torch's RNG:

=====================  =====================================================
name                   model
=====================  =====================================================
``gpt-tiny``           ``GPT2LMHeadModel`` of :func:`gpt_tiny_config`:
                       ``small`` 2 layers, width 128, 4 heads; ``medium`` 4
                       layers, width 256, 8 heads; no dropout; tied embeddings
``hf:CONFIG``          ``AutoModelForCausalLM.from_config`` of a local
                       ``config.json`` (``CONFIG`` is the file or the folder
                       holding it, as ``config.save_pretrained`` writes it)
=====================  =====================================================

The model must cover the data's vocabulary and positions:
``config.vocab_size`` at least the data's (257 for bytes and the start id;
larger is allowed, the extra ids are never seen) and, where the config has
one, ``max_position_embeddings`` at least the example length. A config that
falls short is refused with the fix, never silently changed.

Example:
    >>> model = build_causal_lm("gpt-tiny", vocab_size=257, positions=65)  # doctest: +SKIP
    >>> model(input_ids=ids, labels=ids).loss                               # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from swiftdp.errors import InvalidArgumentError

CAUSAL_LMS = ("gpt-tiny",)
"""Named causal LMs of :func:`build_causal_lm` (besides ``hf:CONFIG``)."""

HF_PREFIX = "hf:"
"""Prefix of a model given by a local Hugging Face config: ``hf:path/to/config.json``."""

_GPT_TINY_SIZES = {
    # width, layers, heads
    "small": (128, 2, 4),
    "medium": (256, 4, 8),
}


def is_causal_lm(name: str) -> bool:
    """Whether ``name`` is built by :func:`build_causal_lm` (``gpt-tiny`` or ``hf:...``)."""
    return name in CAUSAL_LMS or name.startswith(HF_PREFIX)


def _transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError(
            f"--model {name!r} is built with Hugging Face transformers, which is not "
            "installed: pip install 'swiftdp[hf]' (the [hf] extra)."
        ) from None
    return transformers


def gpt_tiny_config(vocab_size: int, positions: int, size: str = "small",
                    bos_token_id: int | None = None) -> Any:
    """The ``GPT2Config`` of ``gpt-tiny``.

    Args:
        vocab_size: number of token ids.
        positions: the longest input (``n_positions``).
        size: ``"small"`` (2 layers, width 128, 4 heads) or ``"medium"`` (4, 256, 8).
        bos_token_id: the start (and end) id, if the data has one.

    Returns:
        A ``transformers.GPT2Config`` with dropout 0 and tied embeddings.

    Raises:
        InvalidArgumentError: unknown size, or transformers is not installed.
    """
    if size not in _GPT_TINY_SIZES:
        raise InvalidArgumentError(
            f"Unknown model size {size!r} for 'gpt-tiny'; expected one of "
            f"{', '.join(_GPT_TINY_SIZES)}."
        )
    width, layers, heads = _GPT_TINY_SIZES[size]
    tf = _transformers("gpt-tiny")
    return tf.GPT2Config(
        vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers,
        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=bos_token_id, eos_token_id=bos_token_id, tie_word_embeddings=True,
    )


def read_hf_config(spec: str) -> Any:
    """Read a local Hugging Face config: ``config.json`` or the folder holding it.

    Args:
        spec: the path (what follows ``hf:`` in ``--model``).

    Returns:
        The ``PreTrainedConfig`` of the file's ``model_type``.

    Raises:
        InvalidArgumentError: transformers missing; the path, the file or its
            ``model_type`` missing or unreadable.
    """
    name = HF_PREFIX + spec
    tf = _transformers(name)
    if not spec:
        raise InvalidArgumentError(
            "--model 'hf:' needs a path: hf:path/to/config.json, or the folder holding it."
        )
    path = Path(spec).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"folder {str(path)!r} has no config.json" if path.is_dir() else \
            f"{str(path)!r} does not exist"
        raise InvalidArgumentError(
            f"--model {name!r}: {where}. Pass a local Hugging Face config "
            "(config.json, as config.save_pretrained(folder) writes it); nothing is downloaded."
        )
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"--model {name!r}: `{file}` is not readable JSON ({e}).") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type not in tf.CONFIG_MAPPING:
        raise InvalidArgumentError(
            f"--model {name!r}: `{file}` has model_type={model_type!r}, which this transformers "
            f"({tf.__version__}) does not know; expected a config.json written by "
            "config.save_pretrained."
        )
    return tf.CONFIG_MAPPING[model_type].from_dict(raw)


def _check_fits(name: str, config: Any, vocab_size: int, positions: int) -> None:
    have = int(getattr(config, "vocab_size", 0) or 0)
    if have < vocab_size:
        raise InvalidArgumentError(
            f"--model {name!r}: the config's vocab_size={have} is smaller than the byte "
            f"vocabulary ({vocab_size}: 256 byte values and the start id). Set "
            f"\"vocab_size\": {vocab_size} (or more) in the config."
        )
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit < positions:
        raise InvalidArgumentError(
            f"--model {name!r}: the config's max_position_embeddings={limit} is shorter than "
            f"an example ({positions} ids: --seq-len {positions - 1} and the start id). Raise "
            f"it in the config or pass --seq-len {limit - 1} or less."
        )


def build_causal_lm(name: str, vocab_size: int, positions: int, size: str = "small",
                    bos_token_id: int | None = None) -> nn.Module:
    """Build a causal LM by name, freshly initialised, in training mode, on the CPU.

    Args:
        name: ``"gpt-tiny"`` or ``"hf:CONFIG"`` (see the module docstring).
        vocab_size: the data's vocabulary; the model must have at least this many ids.
        positions: the data's example length; the model must take it.
        size: size of ``gpt-tiny`` (ignored by ``hf:``).
        bos_token_id: the data's start id, recorded in the ``gpt-tiny`` config.

    Returns:
        The ``PreTrainedModel`` (called as ``model(input_ids=x, labels=x)``);
        its parameters are drawn from torch's default RNG (seed it first).

    Raises:
        InvalidArgumentError: unknown name, transformers missing, a config that
            cannot be read, is not a causal LM, or does not fit the data.
    """
    if name in CAUSAL_LMS:
        config = gpt_tiny_config(vocab_size, positions, size, bos_token_id)
    elif name.startswith(HF_PREFIX):
        config = read_hf_config(name[len(HF_PREFIX):])
        _check_fits(name, config, vocab_size, positions)
    else:
        raise InvalidArgumentError(
            f"Unknown causal LM {name!r}; expected {', '.join(CAUSAL_LMS)} or "
            f"{HF_PREFIX}path/to/config.json."
        )
    tf = _transformers(name)
    try:
        model = tf.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise InvalidArgumentError(
            f"--model {name!r}: transformers has no causal LM for model_type="
            f"{config.model_type!r} ({' '.join(str(e).split())[:200]}). Use the config of a "
            "decoder model (GPT-2, Llama, ...)."
        ) from None
    if getattr(model, "loss_type", None) is None:
        # GPT2LMHeadModel's class name does not say ForCausalLM: transformers would guess
        # the causal loss (and log that it guessed) at the first call with labels.
        model.loss_type = "ForCausalLM"
    return model.train()
