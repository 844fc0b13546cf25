"""Image classifiers: the default ScatterNet model, the classic tanh CNN, an MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from swiftdp.models.scatter import ScatterNet


class FeatureClassifier(nn.Module):
    """A frozen, data-independent feature extractor followed by a trainable classifier.

    ``features`` has no trainable parameter and transforms every example on
    its own from formulas fixed in advance, so its outputs can be computed
    once per example and cached: training ``classifier`` on the cached
    features is the same computation, and the same privacy guarantee, as
    training the whole model.

    Attributes:
        features: the frozen extractor.
        classifier: the trainable part.
    """

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        if any(p.requires_grad for p in features.parameters()):
            raise ValueError("FeatureClassifier.features must have no trainable parameter.")
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for inputs ``x``."""
        return self.classifier(self.features(x))


def scatter_classifier(input_shape: tuple[int, ...], num_classes: int,
                       size: str = "small") -> FeatureClassifier:
    """The default model: ScatterNet features, GroupNorm, then a linear layer or a small CNN.

    ScatterNet (J = 2, L = 8; fixed Morlet filters, 81 channels per input
    channel at 1/4 resolution) is followed by a GroupNorm without learned
    affine parameters (27 groups of 3 channels, a data-independent
    normalisation) and:

    - ``size="small"``: a linear layer (Tramèr and Boneh's ScatterNet+linear);
    - ``size="medium"``: two 3x3 conv layers with tanh, max-pool, and a linear layer.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output classes.
        size: ``"small"`` or ``"medium"``.

    Returns:
        A :class:`FeatureClassifier` whose ``features`` is the ScatterNet.

    References:
        Tramèr and Boneh, "Differentially private learning needs better
        features (or much more data)", ICLR 2021.
    """
    scatter = ScatterNet(input_shape)
    c, h, w = scatter.output_shape()
    groups = c // 3 if c % 3 == 0 else 1
    norm = nn.GroupNorm(groups, c, affine=False)
    head: nn.Module
    if size == "small":
        head = nn.Sequential(norm, nn.Flatten(), nn.Linear(c * h * w, num_classes))
    else:
        pooled = ((h + 1) // 2) * ((w + 1) // 2)
        head = nn.Sequential(
            norm, nn.Conv2d(c, 64, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.Tanh(), nn.Flatten(),
            nn.Linear(64 * pooled, num_classes),
        )
    return FeatureClassifier(scatter, head)


class ClassicCNN(nn.Module):
    """The two-conv-layer tanh CNN of the Opacus and TF Privacy MNIST examples.

    ``Conv(16, 8x8, stride 2) → tanh → MaxPool(2, 1) → Conv(32, 4x4, stride 2)
    → tanh → MaxPool(2, 1) → Linear(32) → tanh → Linear``; ``size="medium"``
    doubles the widths. Trained end to end.

    Args:
        input_shape: ``(C, H, W)``, at least 14x14.
        num_classes: output classes.
        size: ``"small"`` or ``"medium"``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, size: str = "small") -> None:
        super().__init__()
        k = 1 if size == "small" else 2
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 16 * k, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16 * k, 32 * k, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
        )
        if min(input_shape[1:]) < 14:
            raise ValueError(
                f"cnn-classic needs images of at least 14x14, got {input_shape[1]}x"
                f"{input_shape[2]}; use --model cnn or mlp for smaller images."
            )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, 32 * k), nn.Tanh(),
                                        nn.Linear(32 * k, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, then tanh hidden layers (one of 128 units, or two of 512 for ``"medium"``).

    Args:
        input_shape: shape of one input.
        num_classes: output classes.
        size: ``"small"`` or ``"medium"``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, size: str = "small") -> None:
        super().__init__()
        d = 1
        for s in input_shape:
            d *= s
        widths = [128] if size == "small" else [512, 512]
        layers: list[nn.Module] = [nn.Flatten()]
        for w in widths:
            layers += [nn.Linear(d, w), nn.Tanh()]
            d = w
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.net(x)
