"""Every suite model builds, runs forward on a synthetic batch, and gives a finite loss."""

from __future__ import annotations

import pytest
import torch

from swiftdp.bench.models import EXTRA, SUITE, describe, get_model, suite_loss
from swiftdp.errors import InvalidArgumentError


@pytest.mark.parametrize("use_zoo", [True, False])
@pytest.mark.parametrize("name", SUITE + EXTRA)
def test_suite_model_forward_and_loss(name: str, use_zoo: bool) -> None:
    spec = get_model(name, "small", use_zoo=use_zoo)
    x, y = spec.make_batch(2)
    torch.manual_seed(0)
    out = spec.build().train()(x)
    assert out.shape[0] == 2
    if spec.sequence_output:
        assert out.shape == (2, *spec.input_shape, spec.num_classes)
    assert torch.isfinite(suite_loss(out, y))
    info = describe(name)
    assert int(info["params"]) > 0  # type: ignore[call-overload]


def test_same_seed_same_batch() -> None:
    spec = get_model("cnn")
    assert torch.equal(spec.make_batch(3, seed=1)[0], spec.make_batch(3, seed=1)[0])


def test_unknown_model_or_size_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="Unknown benchmark model"):
        get_model("alexnet")
    with pytest.raises(InvalidArgumentError, match="size"):
        get_model("mlp", "huge")
