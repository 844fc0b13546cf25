"""Contracts of PoissonBatchSampler: the sampling the privacy accountant assumes."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch

from swiftdp.errors import CheckpointError, InvalidArgumentError, SwiftDPError
from swiftdp.sampling import PoissonBatchSampler, make_generator, steps_per_epoch

N, Q, STEPS = 500, 0.05, 20_000
Z = 5.0  # z-test bound; the seed is fixed, so these tests are deterministic


@pytest.fixture(scope="module")
def inclusion() -> torch.Tensor:
    """STEPS x N inclusion matrix drawn by one sampler with a fixed seed."""
    sampler = PoissonBatchSampler(N, Q, STEPS, seed=1234)
    rows = torch.zeros(STEPS, N, dtype=torch.float32)
    for step, batch in enumerate(sampler):
        rows[step, batch] = 1.0
    return rows


def test_batch_sizes_have_binomial_mean_and_variance(inclusion: torch.Tensor) -> None:
    sizes = inclusion.sum(dim=1).double()
    mean, var = N * Q, N * Q * (1 - Q)
    assert abs(sizes.mean().item() - mean) < Z * math.sqrt(var / STEPS)
    # fourth central moment of Binomial(N, Q); Var(sample variance) ~ (mu4 - var^2) / STEPS
    mu4 = var * (1 + 3 * (N - 2) * Q * (1 - Q))
    assert abs(sizes.var().item() - var) < Z * math.sqrt((mu4 - var**2) / STEPS)


def test_each_example_is_included_with_probability_q(inclusion: torch.Tensor) -> None:
    counts = inclusion.sum(dim=0).double()
    z = (counts - STEPS * Q) / math.sqrt(STEPS * Q * (1 - Q))
    assert z.abs().max().item() < Z + 0.5  # max over 500 examples


def test_inclusions_of_different_examples_are_uncorrelated(inclusion: torch.Tensor) -> None:
    freq = inclusion.mean(dim=0).double()
    joint = (inclusion.T @ inclusion).double() / STEPS
    cov = joint - torch.outer(freq, freq)
    off_diagonal = cov[~torch.eye(N, dtype=torch.bool)]
    sd = Q * (1 - Q) / math.sqrt(STEPS)
    assert off_diagonal.abs().max().item() < 6 * sd  # max over ~125k pairs


def test_batches_are_sorted_valid_indices_and_len_is_num_steps() -> None:
    sampler = PoissonBatchSampler(50, 0.3, 40, seed=0)
    batches = list(sampler)
    assert len(sampler) == 40 == len(batches)
    for batch in batches:
        assert batch == sorted(set(batch))
        assert all(isinstance(i, int) and 0 <= i < 50 for i in batch)


def test_sample_rate_one_includes_everyone() -> None:
    assert list(PoissonBatchSampler(7, 1.0, 3, seed=0)) == [list(range(7))] * 3


def test_empty_batches_are_yielded_as_empty_lists_when_q_is_tiny() -> None:
    batches = list(PoissonBatchSampler(10, 1e-4, 200, seed=0))
    assert len(batches) == 200
    assert sum(batch == [] for batch in batches) > 190


def test_same_seed_gives_same_batches_and_epochs_differ() -> None:
    a = PoissonBatchSampler(100, 0.1, 10, seed=7)
    b = PoissonBatchSampler(100, 0.1, 10, seed=7)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # the next epoch continues the stream
    assert list(PoissonBatchSampler(100, 0.1, 10, seed=8)) != first


def test_seed_none_draws_and_records_an_os_seed() -> None:
    sampler = PoissonBatchSampler(100, 0.1, 5)
    assert isinstance(sampler.seed, int) and 0 <= sampler.seed < 2**64
    assert list(sampler) == list(PoissonBatchSampler(100, 0.1, 5, seed=sampler.seed))


def test_external_generator_is_used() -> None:
    generator, seed = make_generator(3)
    sampler = PoissonBatchSampler(100, 0.1, 5, generator)
    assert sampler.seed is None and seed == 3
    assert list(sampler) == list(PoissonBatchSampler(100, 0.1, 5, seed=3))


def _run(sampler: PoissonBatchSampler, epochs: int) -> list[list[int]]:
    return [batch for _ in range(epochs) for batch in sampler]


@pytest.mark.parametrize("consumed", [0, 1, 6, 12, 13])
@pytest.mark.parametrize("lag", [0, 3])
def test_resume_from_state_dict_yields_identical_remaining_batches(consumed: int, lag: int) -> None:
    steps = 13
    reference = _run(PoissonBatchSampler(200, 0.07, steps, seed=42), 3)

    interrupted = PoissonBatchSampler(200, 0.07, steps, seed=42)
    seen = list(interrupted)  # epoch 0
    iterator = iter(interrupted)  # epoch 1, drawn ahead of the loop by `lag`
    drawn = [next(iterator) for _ in range(min(consumed + lag, steps))]
    seen += drawn[:consumed]
    state = interrupted.state_dict(steps_consumed=consumed)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = PoissonBatchSampler(200, 0.07, steps, seed=999)
    resumed.load_state_dict(loaded)
    assert resumed.seed == 42
    rest = _run(resumed, 2 if consumed < steps else 1)
    assert seen + rest == reference


def test_state_dict_before_iteration_resumes_from_the_start() -> None:
    sampler = PoissonBatchSampler(100, 0.2, 4, seed=5)
    state = sampler.state_dict()
    expected = list(sampler)
    other = PoissonBatchSampler(100, 0.2, 4, seed=6)
    other.load_state_dict(state)
    assert list(other) == expected


def test_state_dict_rejects_steps_not_drawn() -> None:
    sampler = PoissonBatchSampler(100, 0.2, 10, seed=5)
    iterator = iter(sampler)
    next(iterator)
    with pytest.raises(
        InvalidArgumentError, match=r"`steps_consumed`.*\[0, 1\].*got steps_consumed=2"
    ):
        sampler.state_dict(steps_consumed=2)


def test_load_state_dict_rejects_other_sampling_settings() -> None:
    state = PoissonBatchSampler(100, 0.2, 10, seed=5).state_dict()
    with pytest.raises(
        CheckpointError, match=r"sample_rate=0\.2 but this sampler has sample_rate=0\.3"
    ):
        PoissonBatchSampler(100, 0.3, 10, seed=5).load_state_dict(state)
    del state["generator_state"]
    with pytest.raises(CheckpointError, match="missing keys \\['generator_state'\\]"):
        PoissonBatchSampler(100, 0.2, 10, seed=5).load_state_dict(state)


def test_two_live_iterators_are_refused() -> None:
    sampler = PoissonBatchSampler(100, 0.2, 10, seed=5)
    old = iter(sampler)
    next(old)
    new = iter(sampler)
    next(new)
    with pytest.raises(SwiftDPError, match="two loops at once"):
        next(old)


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_bad_sample_rate_is_refused_with_the_value_and_fix(rate: object) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"Expected sample_rate (in|to be) .*got "
    ) as info:
        PoissonBatchSampler(10, rate, 5)  # type: ignore[arg-type]
    assert repr(rate) in str(info.value)
    assert "expected_batch_size / dataset_size" in str(info.value)


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"num_samples": 0}, "Expected `num_samples` to be an int >= 1, got num_samples=0"),
    ({"num_steps": 2.0}, "Expected `num_steps` to be an int >= 1, got num_steps=2.0"),
    ({"seed": -1}, "Expected `seed` to be an int in [0, 2**64) or None, got seed=-1"),
    ({"seed": 1, "generator": torch.Generator()}, "Got both `generator` and `seed`"),
    ({"generator": "gen"}, "Expected `generator` to be a CPU torch.Generator"),
])  # fmt: skip
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, object], text: str) -> None:
    arguments: dict[str, object] = {"num_samples": 10, "sample_rate": 0.5, "num_steps": 3}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        PoissonBatchSampler(**arguments)  # type: ignore[arg-type]
    assert text in str(info.value)


@pytest.mark.parametrize(("rate", "steps"), [
    (0.04, 25), (Fraction(256, 60000), 234), (256 / 60000, 234), (1.0, 1), (0.3, 3),
    (0.6, 1), (1e-5, 100_000), (Fraction(150, 60000), 400), (0.001, 1000),
])  # fmt: skip
def test_steps_per_epoch_is_exact_floor_of_one_over_q(rate: float, steps: int) -> None:
    assert steps_per_epoch(rate) == steps


def test_calling_iter_twice_before_drawing_does_not_skip_an_epoch() -> None:
    # DataLoader with workers calls iter() on its batch sampler twice per epoch.
    reference = _run(PoissonBatchSampler(100, 0.2, 4, seed=5), 2)
    sampler = PoissonBatchSampler(100, 0.2, 4, seed=5)
    iter(sampler)
    first = list(sampler)
    iter(sampler)
    assert first + list(sampler) == reference


def test_state_dict_right_after_iter_refers_to_the_new_epoch() -> None:
    reference = _run(PoissonBatchSampler(100, 0.2, 4, seed=5), 2)
    sampler = PoissonBatchSampler(100, 0.2, 4, seed=5)
    first = list(sampler)
    iter(sampler)
    state = sampler.state_dict(steps_consumed=0)
    assert state["epoch"] == 1 and state["steps_done"] == 0
    resumed = PoissonBatchSampler(100, 0.2, 4, seed=1)
    resumed.load_state_dict(state)
    assert first + list(resumed) == reference
