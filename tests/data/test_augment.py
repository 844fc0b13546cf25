"""Augmented views: per-example transforms, the views' layout, and the mixing probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftdp.data.augment import Views, crop_flip, random_crop, random_flip
from swiftdp.errors import ExampleMixingError, InvalidArgumentError


def test_random_crop_is_a_shift_of_each_padded_image_drawn_per_example():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = random_crop(2, mode="constant")(x)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):  # each output is one of the 25 crops of its own padded image
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 3  # not one shift for the whole batch


def test_random_flip_flips_some_examples_and_keeps_the_others():
    torch.manual_seed(1)
    x = torch.rand(32, 1, 4, 4)
    out = random_flip()(x)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 4 < sum(flipped) < 28


def test_views_stack_k_augmented_copies_and_repeat_the_labels():
    torch.manual_seed(2)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    vx, vy = Views(4, crop_flip(2))((x, y))
    assert vx.shape == (6, 4, 3, 8, 8) and vy.shape == (6, 4)
    assert torch.equal(vy, y[:, None].expand(6, 4))
    assert not torch.equal(vx[:, 0], vx[:, 1])  # independent draws per view


def test_views_without_augment_repeat_the_inputs():
    x = torch.rand(5, 7)
    vx = Views(3)(x)
    assert vx.shape == (5, 3, 7) and torch.equal(vx[:, 2], x)


@pytest.mark.parametrize("augment", [
    lambda x: 0.5 * (x + x.roll(1, 0)),  # mixup with the neighbour
    lambda x: x - x.mean(0, keepdim=True),  # a batch statistic
    lambda x: x[torch.randperm(len(x))],  # a shuffle: rows move to other examples
])
def test_an_augment_that_mixes_examples_is_refused(augment):
    with pytest.raises(ExampleMixingError, match="mixes the examples"):
        Views(2, augment)((torch.rand(8, 5), torch.arange(8)))


def test_the_probe_leaves_the_random_stream_where_augment_alone_would():
    x = torch.rand(8, 1, 6, 6)
    torch.manual_seed(3)
    probed = Views(2, crop_flip(1))(x)
    torch.manual_seed(3)
    plain = Views(2, crop_flip(1), probe=False)(x)
    assert torch.equal(probed, plain)


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidArgumentError, match="augmult"):
        Views(0)
    with pytest.raises(InvalidArgumentError, match="augment"):
        Views(2, augment=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="input tensor first"):
        Views(2)({"x": torch.rand(2, 3)})
    with pytest.raises(InvalidArgumentError, match="keep the shape"):
        Views(2, lambda x: x[:, :1])(torch.rand(4, 3))
    with pytest.raises(InvalidArgumentError, match="padding"):
        random_crop(-1)
