"""The model zoo: every model builds, runs, takes the documented inputs, has no BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swiftdp
from swiftdp.errors import InvalidArgumentError
from swiftdp.models import (
    IMAGE_MODELS,
    MODELS,
    SIZES,
    TEXT_MODELS,
    FeatureClassifier,
    ScatterNet,
    build_model,
)


def _input(name: str):
    if name in TEXT_MODELS:
        return (12,), torch.randint(1, 50, (3, 12))
    return (3, 32, 32), torch.rand(3, 3, 32, 32)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_and_runs_a_forward_pass(name, size):
    shape, x = _input(name)
    if name == "gpt":
        x = x % 10  # the LM's vocabulary is num_classes
    torch.manual_seed(0)
    model = build_model(name, shape, 10, size, vocab_size=50)
    assert model.training
    out = model(x)
    if name == "gpt":
        assert out.shape == (3, 12, 10)  # num_classes is the vocabulary of the LM
    else:
        assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["cnn", "cnn-classic", "mlp"])
def test_image_models_take_mnist_and_digits_shapes(name):
    for shape in ((1, 28, 28), (1, 8, 8) if name != "cnn-classic" else (1, 16, 16)):
        model = build_model(name, shape, 10)
        assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_gpt_ties_input_and_output_embeddings():
    model = build_model("gpt", (8,), 30)
    tokens = torch.randint(0, 30, (2, 8))
    model(tokens).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert model.embed.weight.grad is not None


def test_gpt_is_causal():
    model = build_model("gpt", (8,), 30).eval()
    a = torch.randint(0, 30, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 30
    with torch.no_grad():
        assert torch.allclose(model(a)[0, :5], model(b)[0, :5], atol=1e-5)


def test_scatternet_is_fixed_and_per_example():
    net = ScatterNet((1, 28, 28))
    assert list(net.parameters()) == []
    assert net.output_shape() == (81, 7, 7)
    x = torch.rand(4, 1, 28, 28)
    out = net(x)
    assert out.shape == (4, 81, 7, 7) and (out[:, 1:] >= 0).all()
    assert torch.allclose(net(x[2:3]), out[2:3], atol=1e-6)
    assert len(net.state_dict()) == 0  # filters are recomputed, never stored


def test_default_model_is_scatternet_features_with_a_trainable_head():
    model = build_model("cnn", (1, 28, 28), 10)
    assert isinstance(model, FeatureClassifier)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_one_private_step_runs_through_make_private(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10)
    ds = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    params = [p for p in model.parameters() if p.requires_grad]
    dp = swiftdp.make_private(model, torch.optim.SGD(params, lr=0.1), DataLoader(ds, batch_size=16),
                              noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)
    before = [p.detach().clone() for p in params]
    x, y = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    F.cross_entropy(dp.model(x), y).backward()
    dp.optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize(
    ("name", "shape", "size", "match"),
    [
        ("alexnet", (1, 28, 28), "small", "Unknown model"),
        ("cnn", (1, 28, 28), "huge", "size"),
        ("cnn", (12,), "small", "images"),
        ("gpt", (1, 28, 28), "small", "token ids"),
        ("vit-tiny", (3, 30, 30), "small", "multiples"),
        ("cnn-classic", (1, 8, 8), "small", "14x14"),
    ],
)
def test_build_model_refuses_bad_requests(name, shape, size, match):
    with pytest.raises(InvalidArgumentError, match=match):
        build_model(name, shape, 10, size)


def test_registry_lists_are_consistent():
    assert set(MODELS) == set(IMAGE_MODELS) | set(TEXT_MODELS)
