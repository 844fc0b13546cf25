"""The benchmark suite's models, built from stock ``torch.nn`` modules only.

Every model is an ordinary, unmodified ``nn.Module``: the same object is
trained non-privately, with swiftdp (hooks only) and, after Opacus'
``ModuleValidator.fix`` where Opacus needs it, with Opacus. Inputs are
synthetic tensors of the right shapes (nothing is downloaded).

``size="small"`` keeps the CPU suite fast; ``size="medium"`` uses the
published widths (full ResNet-18, ViT-tiny).

The Hugging Face rows (:data:`HF_SUITE`: GPT-2 small, its LoRA, BERT-base,
a Llama) live in :mod:`swiftdp.bench.hf`; they are not in the default suite
(slow on a CPU) and need the ``[hf]`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swiftdp.errors import InvalidArgumentError

SIZES: tuple[str, ...] = ("small", "medium")
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
GhostLossFn = Callable[[nn.Module, Tensor, Tensor, Callable[..., Tensor]], Tensor]


def suite_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy, averaged over examples (and over tokens for ``(B, T, V)`` logits)."""
    if output.dim() == 3:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def call_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The suite's loss of a plain model: :func:`suite_loss` of ``model(x)``."""
    return suite_loss(model(x), y)


def call_ghost_loss(model: nn.Module, x: Tensor, y: Tensor, criterion: Callable[..., Tensor]
                    ) -> Tensor:
    """:func:`call_loss` through Opacus' ghost criterion (per-token losses reduced per example)."""
    out = model(x)
    if out.dim() == 3:
        return criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=y.shape)
    return criterion(out, y)


@dataclass(frozen=True)
class SuiteModel:
    """One model of the suite and how to feed it.

    Attributes:
        name: the suite name (``"cnn"``, ``"gpt"``, ...).
        description: one line for tables and BENCHMARKS.md.
        build: builds a fresh model (call under a fixed seed for equal inits).
        input_shape: per-example input shape.
        num_classes: classes (or vocabulary size for the language model).
        integer_input: inputs are token ids in ``[0, num_classes)`` or a vocab.
        vocab: vocabulary size for integer inputs.
        sequence_output: the output is ``(B, T, V)`` logits with per-token targets.
        batch_size: the suite's default batch size for this model.
        labels_are_inputs: the targets are the inputs (a causal LM whose loss shifts them).
        loss: ``(model, x, y) -> loss``, the loss every method backpropagates
            (default: :func:`call_loss`, cross-entropy of ``model(x)``).
        ghost_loss: ``(model, x, y, criterion) -> loss`` through Opacus' ghost-clipping
            criterion wrapper (default: :func:`call_ghost_loss`).
        extra: the optional dependency group the model needs (``"hf"``), or ``""``.
        time_target: the issue's DP step-time target for this model (× non-private),
            or ``None`` for the suite's general one.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    integer_input: bool = False
    vocab: int = 0
    sequence_output: bool = False
    batch_size: int = 64
    labels_are_inputs: bool = False
    loss: LossFn = call_loss
    ghost_loss: GhostLossFn = call_ghost_loss
    extra: str = ""
    time_target: float | None = None

    def make_batch(self, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A synthetic batch ``(x, y)`` of ``batch_size`` examples (CPU tensors)."""
        g = torch.Generator().manual_seed(seed)
        shape = (batch_size, *self.input_shape)
        if self.integer_input:
            x = torch.randint(0, self.vocab, shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        if self.labels_are_inputs:
            y = x.clone()
        elif self.sequence_output:
            y = torch.randint(0, self.num_classes, shape, generator=g)
        else:
            y = torch.randint(0, self.num_classes, (batch_size,), generator=g)
        return x, y


# ------------------------------------------------------------------- models
class MLP(nn.Module):
    """A fully connected classifier on flattened 28x28 images."""

    def __init__(self, widths: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = 28 * 28
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_gn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out // 4), c_out),
        nn.ReLU(),
    ]


class GroupNormCNN(nn.Module):
    """Three conv + GroupNorm + ReLU + max-pool stages and a two-layer head (32x32x3)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_gn(3, w), nn.MaxPool2d(2),
            *_conv_gn(w, 2 * w), nn.MaxPool2d(2),
            *_conv_gn(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """The ResNet basic block with GroupNorm instead of BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        groups = min(32, c_out // 4)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) with GroupNorm; ``width`` = first stage."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.GroupNorm(min(32, width // 4), width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            for j in range(2):
                blocks.append(BasicBlock(c, out, 2 if (i > 0 and j == 0) else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(h.mean((2, 3)))


def _encoder(d: int, heads: int, depth: int, ff: int, norm_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d, heads, ff, dropout=0.1, activation="gelu", batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViT(nn.Module):
    """A Vision Transformer on 32x32 images: conv patch embedding, CLS token, learned positions."""

    def __init__(self, d: int, depth: int, heads: int, patch: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        n = (32 // patch) ** 2
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.encoder = _encoder(d, heads, depth, 4 * d, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        h = self.encoder(h)
        return self.head(self.norm(h[:, 0]))


def positions(tokens: Tensor) -> Tensor:
    """Position ids ``(B, T)`` for token ids ``(B, T)``.

    Repeated over the batch (contiguous, rather than a shared ``(T,)`` vector): neither
    swiftdp nor Opacus (pytorch/opacus#841) takes per-example gradients of an
    embedding looked up without a batch dimension.
    """
    b, t = tokens.shape[:2]
    return torch.arange(t, device=tokens.device).repeat(b, 1)


class TextTransformer(nn.Module):
    """Token + position embeddings, a stock ``nn.TransformerEncoder``, mean-pool, linear head."""

    def __init__(self, vocab: int, seq_len: int, d: int, depth: int, heads: int,
                 num_classes: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.encoder = _encoder(d, heads, depth, 2 * d, norm_first=False)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.tok(x) + self.pos(positions(x)))
        return self.head(h.mean(1))


class CausalLM(nn.Module):
    """A GPT-style causal language model; the output projection is tied to the token embedding."""

    def __init__(self, vocab: int, seq_len: int, d: int, depth: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = _encoder(d, heads, depth, 4 * d, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(positions(x))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class LSTMClassifier(nn.Module):
    """Embedding, a stock ``nn.LSTM``, and a linear head on the last hidden state."""

    def __init__(self, vocab: int, d: int, hidden: int, layers: int, num_classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, _) = self.lstm(self.emb(x))
        return self.head(h[-1])


class EncoderOnly(nn.Module):
    """A stock transformer encoder on continuous ``(B, T, d)`` inputs, mean-pooled, linear head."""

    def __init__(self, d: int = 128, depth: int = 2, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = _encoder(d, heads, depth, 4 * d, norm_first=False)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


# -------------------------------------------------------------------- suite
SUITE: tuple[str, ...] = ("mlp", "cnn", "resnet18", "vit", "transformer", "gpt", "lstm")
EXTRA: tuple[str, ...] = ("encoder",)
HF_SUITE: tuple[str, ...] = ("gpt2-small", "gpt2-small-lora", "bert-base", "llama")
# names --models accepts for a whole group of rows
GROUPS: dict[str, tuple[str, ...]] = {"default": SUITE, "hf": HF_SUITE}
SEQ_LEN = 128
TEXT_VOCAB = 10000
LM_VOCAB = 8192

# suite name -> (zoo name, per-example input shape, classes, vocab for integer inputs)
_ZOO: dict[str, tuple[str, tuple[int, ...], int, int]] = {
    "mlp": ("mlp", (1, 28, 28), 10, 0),
    "resnet18": ("resnet-gn", (3, 32, 32), 10, 0),
    "vit": ("vit-tiny", (3, 32, 32), 10, 0),
    "transformer": ("transformer", (SEQ_LEN,), 2, TEXT_VOCAB),
    "gpt": ("gpt", (SEQ_LEN,), LM_VOCAB, LM_VOCAB),
    "lstm": ("lstm", (SEQ_LEN,), 2, TEXT_VOCAB),
}
_BATCH = {"gpt": 16}
_BATCH_MEDIUM = {"resnet18": 32, "vit": 32, "gpt": 16}


def zoo_available() -> bool:
    """Whether the model zoo (:func:`swiftdp.models.build_model`) can be imported."""
    try:
        from swiftdp.models import build_model  # noqa: F401
    except ImportError:
        return False
    return True


def _zoo_model(name: str, size: str) -> SuiteModel:
    from swiftdp.models import build_model

    zoo_name, shape, k, vocab = _ZOO[name]
    kw = {"vocab_size": vocab} if name in ("transformer", "lstm") else {}
    probe = build_model(zoo_name, shape, k, size, **kw)
    n = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    del probe
    batch = (_BATCH_MEDIUM if size == "medium" else _BATCH).get(name, 64)
    return SuiteModel(
        name, f"zoo `{zoo_name}` ({size}), {n / 1e6:.2f}M params, input {shape}",
        lambda: build_model(zoo_name, shape, k, size, **kw), shape, k,
        integer_input=vocab > 0, vocab=vocab, sequence_output=name == "gpt", batch_size=batch,
    )


def _own_model(name: str, size: str) -> SuiteModel:
    med = size == "medium"
    t = SEQ_LEN
    specs: dict[str, Callable[[], SuiteModel]] = {
        "mlp": lambda: SuiteModel(
            "mlp", f"MLP 784-{'1024-1024' if med else '512-256'}-10 (MNIST-sized)",
            lambda: MLP((1024, 1024) if med else (512, 256)), (1, 28, 28), 10),
        "cnn": lambda: SuiteModel(
            "cnn", f"GroupNorm CNN, width {64 if med else 32} (32x32x3)",
            lambda: GroupNormCNN(64 if med else 32), (3, 32, 32), 10),
        "resnet18": lambda: SuiteModel(
            "resnet18", f"ResNet-18 GroupNorm, width {64 if med else 16} (32x32x3)",
            lambda: ResNet18GN(64 if med else 16), (3, 32, 32), 10,
            batch_size=32 if med else 64),
        "vit": lambda: SuiteModel(
            "vit", f"ViT {'tiny d192 x12' if med else 'd128 x4'}, patch 4 (32x32x3)",
            lambda: ViT(192, 12, 3) if med else ViT(128, 4, 4), (3, 32, 32), 10,
            batch_size=32 if med else 64),
        "transformer": lambda: SuiteModel(
            "transformer", f"Text transformer d{256 if med else 128} x{4 if med else 2}, T={t}",
            lambda: TextTransformer(TEXT_VOCAB, t, 256 if med else 128, 4 if med else 2, 4),
            (t,), 2, integer_input=True, vocab=TEXT_VOCAB),
        "gpt": lambda: SuiteModel(
            "gpt", f"GPT causal LM d{256 if med else 128} x{4 if med else 2}, tied, "
                   f"V={LM_VOCAB}, T={t}",
            lambda: CausalLM(LM_VOCAB, t, 256 if med else 128, 4 if med else 2, 4),
            (t,), LM_VOCAB, integer_input=True, vocab=LM_VOCAB, sequence_output=True,
            batch_size=16),
        "lstm": lambda: SuiteModel(
            "lstm", f"LSTM classifier h{256 if med else 128} x{2 if med else 1}, T={t}",
            lambda: LSTMClassifier(TEXT_VOCAB, 128, 256 if med else 128, 2 if med else 1),
            (t,), 2, integer_input=True, vocab=TEXT_VOCAB),
        "encoder": lambda: SuiteModel(
            "encoder", "Transformer encoder d128 x2, T=64, stock nn.MultiheadAttention "
                       "(continuous input)",
            lambda: EncoderOnly(128, 2, 4), (64, 128), 10),
    }
    return specs[name]()


def get_model(name: str, size: str = "small", *, use_zoo: bool = True) -> SuiteModel:
    """The suite model ``name`` at ``size``.

    The model zoo (:func:`swiftdp.models.build_model`) provides ``mlp``,
    ``resnet18`` (``resnet-gn``), ``vit`` (``vit-tiny``), ``transformer``,
    ``gpt`` and ``lstm`` when it is installed; ``cnn`` (the GroupNorm CNN)
    and ``encoder`` (the engine-overhead encoder) are defined here, as are
    fallbacks for the others. The Hugging Face rows come from
    :func:`swiftdp.bench.hf.hf_model` (no ``transformers`` import until a
    model is built).

    Args:
        name: one of :data:`SUITE`, :data:`HF_SUITE` (or ``"encoder"``).
        size: ``"small"`` (CPU-friendly widths) or ``"medium"`` (published widths);
            the HF rows also take ``"tiny"`` (a test size) and use their published
            configuration at both ``small`` and ``medium``.
        use_zoo: take the model from the zoo when it has it.

    Returns:
        The :class:`SuiteModel`.

    Raises:
        InvalidArgumentError: unknown name or size.
    """
    if name in HF_SUITE:
        from swiftdp.bench.hf import HF_SIZES, hf_model

        if size not in HF_SIZES:
            raise InvalidArgumentError(f"Expected size in {HF_SIZES} for {name!r}, got {size!r}.")
        return hf_model(name, size)
    if size not in SIZES:
        raise InvalidArgumentError(
            f"Expected size in {SIZES}, got {size!r}"
            + (" (size 'tiny' exists for the Hugging Face rows only)." if size == "tiny" else ".")
        )
    if name not in SUITE + EXTRA:
        raise InvalidArgumentError(
            f"Unknown benchmark model {name!r}; expected one of {SUITE + EXTRA + HF_SUITE} "
            f"or a group from {tuple(GROUPS)}."
        )
    if use_zoo and name in _ZOO and zoo_available():
        return _zoo_model(name, size)
    return _own_model(name, size)


def missing_extra(spec: SuiteModel) -> str | None:
    """Why ``spec`` cannot run here (its optional extra is not installed), or ``None``."""
    if spec.extra == "hf":
        from swiftdp.bench.hf import hf_available, missing_extra_message

        return None if hf_available() else missing_extra_message()
    return None


def describe(name: str, size: str = "small") -> dict[str, object]:
    """Description, trainable parameter count, input shape and default batch of a suite model.

    The HF rows are counted on the meta device (no memory); without their
    extra, ``params`` is ``None`` and ``missing`` says why.
    """
    spec = get_model(name, size)
    info: dict[str, object] = {"description": spec.description, "params": None,
                               "input_shape": list(spec.input_shape),
                               "batch_size": spec.batch_size}
    missing = missing_extra(spec)
    if missing is not None:
        return info | {"missing": missing}
    if spec.extra == "hf":
        from swiftdp.bench.hf import count_parameters

        return info | count_parameters(spec)
    return info | {"params": sum(p.numel() for p in spec.build().parameters()
                                 if p.requires_grad)}
