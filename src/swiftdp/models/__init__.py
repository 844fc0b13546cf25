"""The model zoo: stock-PyTorch models by name, for the CLI and the benchmarks.

:func:`build_model` is the one entry point::

    build_model(name, input_shape, num_classes, size="small", *, vocab_size=None)

=================  ===============================================  =====================
name               what                                             input
=================  ===============================================  =====================
``cnn``            fixed ScatterNet (frozen Morlet convolutions),   images ``(C, H, W)``
                   GroupNorm, linear head (``medium``: CNN head)
``cnn-classic``    the two-conv tanh CNN of the Opacus examples      images
``mlp``            tanh MLP                                          any shape
``resnet-gn``      ResNet-18 layout with GroupNorm                   images (CIFAR-sized)
``vit-tiny``       Vision Transformer, patch 4                       images, sides % 4 == 0
``wrn-16-4``       Wide ResNet 16-4 / 40-4 with GroupNorm (De et     images (CIFAR-sized)
``wrn-40-4``       al. 2022's CIFAR-10 networks; ``size`` unused)
``transformer``    text classifier: Embedding + TransformerEncoder  token ids ``(T,)``
``lstm``           text classifier: Embedding + LSTM                 token ids ``(T,)``
``gpt``            causal LM with tied embeddings; ``num_classes``   token ids ``(T,)``
                   is the vocabulary size, output ``(B, T, V)``
=================  ===============================================  =====================

All use stock modules only (``nn.Conv2d``, ``nn.GroupNorm``, ``nn.LayerNorm``,
``nn.Embedding``, ``nn.TransformerEncoderLayer``, ``nn.LSTM``), never
BatchNorm, so swiftdp clips every parameter exactly without module
replacement.

Example:
    >>> import torch
    >>> m = build_model("mlp", (1, 8, 8), 10)
    >>> m(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from swiftdp.errors import InvalidArgumentError
from swiftdp.models.resnet import ResNetGN
from swiftdp.models.scatter import ScatterNet
from swiftdp.models.text import LSTMClassifier, TinyGPT, TransformerClassifier
from swiftdp.models.vision import MLP, ClassicCNN, FeatureClassifier, scatter_classifier
from swiftdp.models.vit import ViT
from swiftdp.models.wide_resnet import WideResNetGN

SIZES = ("small", "medium")
"""Model sizes accepted by :func:`build_model`."""

IMAGE_MODELS = ("cnn", "cnn-classic", "mlp", "resnet-gn", "vit-tiny", "wrn-16-4", "wrn-40-4")
"""Models that take images ``(B, C, H, W)`` (``mlp`` takes any shape)."""

TEXT_MODELS = ("transformer", "lstm", "gpt")
"""Models that take int64 token ids ``(B, T)``."""

MODELS = IMAGE_MODELS + TEXT_MODELS
"""Every name :func:`build_model` accepts."""

DEFAULT_VOCAB_SIZE = 256
"""Vocabulary of the text classifiers when ``vocab_size`` is not given (bytes)."""


def _image(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise InvalidArgumentError(
            f"Model {name!r} takes images: expected input_shape=(C, H, W), got {input_shape!r}."
        )
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def _seq_len(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 1:
        raise InvalidArgumentError(
            f"Model {name!r} takes token ids: expected input_shape=(sequence_length,), got "
            f"{input_shape!r}."
        )
    return int(input_shape[0])


def _lstm(shape: tuple[int, ...], k: int, size: str, vocab: int) -> nn.Module:
    _seq_len(shape, "lstm")
    return LSTMClassifier(vocab, k, size)


_Builder = Callable[[tuple[int, ...], int, str, int], nn.Module]

_BUILDERS: dict[str, _Builder] = {
    "cnn": lambda s, k, z, v: scatter_classifier(_image(s, "cnn"), k, z),
    "cnn-classic": lambda s, k, z, v: ClassicCNN(_image(s, "cnn-classic"), k, z),
    "mlp": lambda s, k, z, v: MLP(s, k, z),
    "resnet-gn": lambda s, k, z, v: ResNetGN(_image(s, "resnet-gn"), k, z),
    "vit-tiny": lambda s, k, z, v: ViT(_image(s, "vit-tiny"), k, z),
    # De et al.'s CIFAR-10 networks; the name fixes the size (``size`` is not read)
    "wrn-16-4": lambda s, k, z, v: WideResNetGN(_image(s, "wrn-16-4"), k, 16, 4),
    "wrn-40-4": lambda s, k, z, v: WideResNetGN(_image(s, "wrn-40-4"), k, 40, 4),
    "transformer": lambda s, k, z, v: TransformerClassifier(v, _seq_len(s, "transformer"), k, z),
    "lstm": _lstm,
    "gpt": lambda s, k, z, v: TinyGPT(k, _seq_len(s, "gpt"), z),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                size: str = "small", *, vocab_size: int | None = None) -> nn.Module:
    """Build a model of the zoo by name, in training mode, on the CPU.

    Args:
        name: one of :data:`MODELS`.
        input_shape: shape of one example: ``(C, H, W)`` for image models,
            ``(sequence_length,)`` for text models.
        num_classes: number of output classes; for ``gpt`` the vocabulary size.
        size: ``"small"`` (fast on a CPU) or ``"medium"``.
        vocab_size: token vocabulary of ``transformer`` and ``lstm``
            (default :data:`DEFAULT_VOCAB_SIZE`); ignored by other models.

    Returns:
        The model (its parameters initialised by torch's default RNG; call
        ``torch.manual_seed`` first for reproducibility).

    Raises:
        InvalidArgumentError: unknown name or size, or an input shape the model cannot take.
    """
    if name not in _BUILDERS:
        raise InvalidArgumentError(f"Unknown model {name!r}; expected one of {', '.join(MODELS)}.")
    if size not in SIZES:
        raise InvalidArgumentError(f"Unknown model size {size!r}; expected one of {', '.join(SIZES)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgumentError(f"Expected num_classes >= 1, got {num_classes!r}.")
    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    try:
        model = _BUILDERS[name](tuple(input_shape), num_classes, size, vocab)
    except ValueError as e:
        if isinstance(e, InvalidArgumentError):
            raise
        raise InvalidArgumentError(str(e)) from None
    return model.train()


__all__ = [
    "IMAGE_MODELS",
    "MLP",
    "MODELS",
    "SIZES",
    "TEXT_MODELS",
    "ClassicCNN",
    "FeatureClassifier",
    "LSTMClassifier",
    "ResNetGN",
    "ScatterNet",
    "TinyGPT",
    "TransformerClassifier",
    "ViT",
    "WideResNetGN",
    "build_model",
    "scatter_classifier",
]
