"""Noise on the parameter's device (issue 13): drawn there, from a generator seeded by ours.

On the CPU the noise comes from the library's generator itself (the stream
checkpoints save); on another device from that device's generator, seeded
for each call by one draw of ours, so no Gaussians are drawn on the host and
nothing is copied per coordinate. The CUDA checks run where a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch

from swiftdp.optim.noise import add_gaussian_noise, device_generator


class _Acc:
    def __init__(self, shape: tuple[int, ...], device: str = "cpu") -> None:
        self.grad = torch.zeros(shape, device=device)
        self.shape, self.dtype = self.grad.shape, self.grad.dtype


def test_cpu_noise_is_the_generators_own_stream():
    g = torch.Generator().manual_seed(3)
    acc = _Acc((4, 5))
    add_gaussian_noise([acc], 2.0, g)
    want = torch.randn((4, 5), generator=torch.Generator().manual_seed(3)) * 2.0
    torch.testing.assert_close(acc.grad, want)


def test_device_generator_is_fixed_by_the_state_and_advances_it():
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    a = torch.randn(8, generator=device_generator(g, "cpu"))
    b = torch.randn(8, generator=device_generator(g, "cpu"))
    assert not torch.equal(a, b), "two calls must give two streams"
    g.set_state(state)
    again = torch.randn(8, generator=device_generator(g, "cpu"))
    torch.testing.assert_close(a, again)  # a resumed run redraws the same seeds
    g.set_state(state)
    torch.randint(0, 1 << 62, (), generator=g)
    # one draw per call: the generator's stream after it is the seeded stream's continuation
    after = torch.randn(4, generator=g)
    g.set_state(state)
    device_generator(g, "cpu")
    torch.testing.assert_close(torch.randn(4, generator=g), after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_is_drawn_on_the_device_reproducibly_with_the_right_scale():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    accs = [_Acc((1000, 1000), "cuda"), _Acc((10,), "cuda")]
    add_gaussian_noise(accs, 3.0, g)
    x = accs[0].grad
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 3.0) < 0.02
    g.set_state(state)
    again = [_Acc((1000, 1000), "cuda"), _Acc((10,), "cuda")]
    add_gaussian_noise(again, 3.0, g)
    for a, b in zip(accs, again, strict=True):
        assert torch.equal(a.grad, b.grad)
    assert not torch.equal(accs[1].grad, accs[0].grad.reshape(-1)[:10]), "one stream per call"
    assert math.isfinite(float(x.abs().max()))
