"""Poisson subsampling: the batch sampler the privacy accountant assumes.

Privacy guarantee. At every step, every example of the dataset is included in
the batch independently of every other example and of every other step, with
probability ``sample_rate`` (q). This is the sampling scheme that the
"amplification by subsampling" analyses of DP-SGD (RDP, PLD and PRV
accountants, add/remove-one neighbouring relation) assume. Any other scheme
(shuffling into fixed-size batches, weighted sampling) is not covered by the
accountant.

The inclusion test is ``u < q`` with ``u`` a float64 uniform draw, so the real
inclusion probability is q rounded up to a multiple of 2**-53 (float32 draws
would round it up to a multiple of 2**-24, i.e. up to 6e-8 too high).

The randomness comes from ``torch.Generator`` (Mersenne Twister). The batch
membership is secret only as long as the seed and the generator state are:
treat :meth:`PoissonBatchSampler.state_dict` and ``seed`` like the data itself.

References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy".
    Zhu and Wang 2019, "Poisson Subsampled Rényi Differential Privacy".
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import Sampler

from swiftdp.checks import check_positive_int, check_sample_rate
from swiftdp.errors import CheckpointError, InvalidArgumentError, SwiftDPError

__all__ = ["PoissonBatchSampler", "make_generator", "steps_per_epoch"]

_STATE_VERSION = 1
# How many steps back `state_dict(steps_consumed=...)` can go. A DataLoader
# draws at most num_workers * prefetch_factor batches ahead of the training loop.
_SNAPSHOT_WINDOW = 1024


def make_generator(seed: int | None = None) -> tuple[torch.Generator, int]:
    """Creates a CPU ``torch.Generator`` for Poisson sampling and returns its seed.

    Args:
        seed: Seed in [0, 2**64). ``None`` draws 64 bits from the operating
            system's entropy source (``secrets``), which is what a private run
            should do: a seed an adversary can guess reveals batch membership.

    Returns:
        ``(generator, seed)``; record ``seed`` (secretly) to reproduce the run.

    Raises:
        InvalidArgumentError: If ``seed`` is not an int in [0, 2**64).
    """
    if seed is None:
        seed = secrets.randbits(64)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidArgumentError(
            f"Expected `seed` to be an int in [0, 2**64) or None, got seed={seed!r}. "
            "Pass None to draw a secret seed from the operating system."
        )
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator, seed


def exact_fraction(sample_rate: float | Fraction) -> Fraction:
    """Returns the rational number the user meant by ``sample_rate``.

    A float is read through its shortest decimal representation, so ``0.04``
    becomes exactly 1/25 and not the binary value 0.04000000000000000083...
    This is what makes step counts exact (``int(1 / 0.04)`` is 25, while the
    binary value would give 24).

    Args:
        sample_rate: A sampling rate, already checked to be in (0, 1].

    Returns:
        The exact rational value.
    """
    if isinstance(sample_rate, Fraction):
        return sample_rate
    return Fraction(repr(float(sample_rate)))


def steps_per_epoch(sample_rate: float | Fraction) -> int:
    """Number of Poisson steps that make one epoch: ``floor(1 / sample_rate)``.

    Computed exactly with fractions on the value the user wrote, so
    ``steps_per_epoch(0.04) == 25`` (the binary float 0.04 is slightly above
    1/25 and would give 24). Pass a ``Fraction`` (e.g.
    ``Fraction(batch_size, len(dataset))``) to avoid any float rounding.

    Args:
        sample_rate: Sampling rate q in (0, 1].

    Returns:
        ``floor(1 / q)``, at least 1. One epoch then draws ``floor(1/q) * q * N``
        examples in expectation, at most N.

    Raises:
        InvalidArgumentError: If ``sample_rate`` is not in (0, 1].
    """
    check_sample_rate(sample_rate, allow_zero=False)
    return max(1, math.floor(1 / exact_fraction(sample_rate)))


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``num_steps`` Poisson-sampled batches of indices per epoch.

    At each step, index ``i`` in ``range(num_samples)`` is in the batch
    independently with probability ``sample_rate``. Batch sizes are therefore
    random (Binomial(N, q)) and may be 0: an empty list is a normal step (the
    update is noise only) and is yielded like any other batch. Divide the
    clipped, noised gradient sum by the fixed ``sample_rate * num_samples``,
    never by the realised batch size.

    Each call to ``iter()`` is one epoch and continues the generator stream,
    so successive epochs differ. After :meth:`load_state_dict`, the next
    ``iter()`` finishes the interrupted epoch and yields, bit for bit, the
    batches an uninterrupted run would have yielded.

    The generator must not be used by anything else while the sampler runs.

    Example:
        >>> sampler = PoissonBatchSampler(10, 0.5, num_steps=3, seed=0)
        >>> len(list(sampler))
        3
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_steps: int,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Creates the sampler.

        Args:
            num_samples: Dataset size N.
            sample_rate: Probability q in (0, 1] that an example is in a batch.
            num_steps: Batches per epoch (``len(sampler)``); see
                :func:`steps_per_epoch` for the usual ``floor(1/q)``.
            generator: CPU generator to draw from. Mutually exclusive with
                ``seed``; ``self.seed`` is then None.
            seed: Seed for a new generator; None draws a secret seed from the
                operating system. Recorded as ``self.seed``.
            rank: this process' rank in a data-parallel group.
            world_size: the number of ranks. Every rank draws the same mask
                over all ``num_samples`` (the same generator state) and keeps
                the indices ``i`` with ``i % world_size == rank``: the union is
                the single-process sample, the ranks' batches are disjoint.

        Raises:
            InvalidArgumentError: If an argument is out of range, both
                ``generator`` and ``seed`` are given, or ``generator`` is not
                a CPU ``torch.Generator``.
        """
        self.num_samples = check_positive_int(
            num_samples, "num_samples", "Pass the dataset size, len(dataset)."
        )
        self.sample_rate = check_sample_rate(sample_rate, allow_zero=False)
        self.num_steps = check_positive_int(
            num_steps, "num_steps", "Pass the number of batches per epoch, e.g. int(1 / q)."
        )
        if generator is None:
            generator, seed = make_generator(seed)
        elif seed is not None:
            raise InvalidArgumentError(
                f"Got both `generator` and `seed` (seed={seed!r}). Pass only one: "
                "a seed creates a new generator."
            )
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise InvalidArgumentError(
                f"Expected `generator` to be a CPU torch.Generator, got {generator!r}. "
                "Pass torch.Generator(device='cpu') or a seed; sampling runs on the CPU."
            )
        self.generator: torch.Generator = generator
        self.seed: int | None = seed
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise InvalidArgumentError(
                f"Expected 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
        self.rank, self.world_size = rank, world_size
        self._mine = (torch.arange(num_samples) % world_size == rank) if world_size > 1 else None
        self.epoch = 0
        self._steps_done = 0
        # (steps drawn in the current epoch, generator state after those draws)
        self._snapshots: deque[tuple[int, torch.Tensor]] = deque(maxlen=_SNAPSHOT_WINDOW + 1)
        self._snapshots.append((0, generator.get_state()))
        self._iteration_start = 0  # `_steps_done` when the last iter() was called
        self._iteration = 0

    def __len__(self) -> int:
        """Returns ``num_steps``, the number of batches in a full epoch."""
        return self.num_steps

    @property
    def iteration_start(self) -> int:
        """The position in the epoch where the last ``iter()`` started (> 0 after a resume)."""
        return self._iteration_start

    def __iter__(self) -> Iterator[list[int]]:
        """Starts an epoch (or finishes a loaded one) and iterates its batches.

        A new epoch starts when ``iter()`` is called, not at the first batch,
        so ``state_dict(steps_consumed=0)`` right after ``iter()`` refers to it;
        it starts only if the previous iterator drew a batch or finished its
        epoch (``DataLoader`` calls ``iter()`` twice per epoch with workers).

        Returns:
            An iterator over sorted lists of dataset indices, possibly empty.
            Advancing it raises ``SwiftDPError`` if a newer iterator over this
            sampler was started since (the draws would interleave).
        """
        self._iteration += 1
        if self._steps_done >= self.num_steps or self._steps_done > self._iteration_start:
            self.epoch += 1
            self._steps_done = 0
            self._snapshots.clear()
            self._snapshots.append((0, self.generator.get_state()))
        self._iteration_start = self._steps_done
        return self._draw_batches(self._iteration)

    def _draw_batches(self, iteration: int) -> Iterator[list[int]]:
        while self._steps_done < self.num_steps:
            if iteration != self._iteration:
                raise SwiftDPError(
                    "A PoissonBatchSampler was iterated by two loops at once. Finish or "
                    "discard the old iterator before starting a new epoch."
                )
            draws = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)
            kept = draws < self.sample_rate
            if self._mine is not None:
                kept &= self._mine
            indices: list[int] = torch.nonzero(kept).flatten().tolist()
            self._steps_done += 1
            self._snapshots.append((self._steps_done, self.generator.get_state()))
            yield indices

    def state_dict(self, steps_consumed: int | None = None) -> dict[str, Any]:
        """Captures the generator state and the position within the epoch.

        Args:
            steps_consumed: Number of batches of the current epoch (the one
                whose ``iter()`` was called last) that the
                training loop has actually used. A ``DataLoader`` with workers
                draws batches ahead of the loop, so pass the loop's own count
                there. None means every batch drawn so far. It may lag the
                drawn count by at most 1024 steps.

        Returns:
            A dict of plain values and one uint8 tensor; loading it makes the
            sampler yield exactly the batches that follow the consumed ones.
            It reveals future batch membership: store it as securely as the data.

        Raises:
            InvalidArgumentError: If ``steps_consumed`` is negative, more than
                the steps drawn, or older than the kept window.
        """
        steps = self._steps_done if steps_consumed is None else steps_consumed
        states = dict(self._snapshots)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps not in states:
            oldest = min(states)
            raise InvalidArgumentError(
                f"Expected `steps_consumed` to be an int in [{oldest}, {self._steps_done}] "
                f"(steps of the current epoch drawn by the sampler, within the last "
                f"{_SNAPSHOT_WINDOW}), got steps_consumed={steps_consumed!r}. Pass the "
                "number of batches of this epoch that the training loop has used."
            )
        generator_state = states[steps].clone()
        epoch = self.epoch
        if steps == self.num_steps:  # a finished epoch resumes at the next one
            epoch, steps = epoch + 1, 0
        return {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "num_steps": self.num_steps,
            "seed": self.seed,
            "epoch": epoch,
            "steps_done": steps,
            "generator_state": generator_state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict`.

        The next ``iter()`` yields the remaining batches of the saved epoch,
        identical bit for bit to the uninterrupted run; later epochs follow.
        The generator passed at construction (if any) has its state replaced.

        Args:
            state_dict: The dict returned by :meth:`state_dict`.

        Raises:
            CheckpointError: If keys are missing, the version is unknown, or
                ``num_samples`` / ``sample_rate`` / ``num_steps`` differ from
                this sampler's (resuming would change the privacy analysis).
        """
        required = (
            "version", "num_samples", "sample_rate", "num_steps", "seed", "epoch",
            "steps_done", "generator_state",
        )  # fmt: skip
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise CheckpointError(
                f"PoissonBatchSampler state is missing keys {missing}. Load a dict saved "
                "by PoissonBatchSampler.state_dict()."
            )
        if state_dict["version"] != _STATE_VERSION:
            raise CheckpointError(
                f"PoissonBatchSampler state has version={state_dict['version']!r}; this "
                f"swiftdp reads version {_STATE_VERSION}. Resume with the swiftdp "
                "version that wrote the checkpoint."
            )
        for key in ("num_samples", "sample_rate", "num_steps"):
            if state_dict[key] != getattr(self, key):
                raise CheckpointError(
                    f"PoissonBatchSampler state has {key}={state_dict[key]!r} but this "
                    f"sampler has {key}={getattr(self, key)!r}. Resume with the same "
                    "dataset and sampling settings; changing them mid-run voids the "
                    "privacy accounting."
                )
        steps = state_dict["steps_done"]
        if not isinstance(steps, int) or not 0 <= steps < self.num_steps:
            raise CheckpointError(
                f"PoissonBatchSampler state has steps_done={steps!r}, expected an int "
                f"in [0, {self.num_steps}). The checkpoint is corrupt."
            )
        generator_state = state_dict["generator_state"].clone()
        self.generator.set_state(generator_state)
        self.seed = state_dict["seed"]
        self.epoch = int(state_dict["epoch"])
        self._steps_done = steps
        self._snapshots.clear()
        self._snapshots.append((steps, generator_state.clone()))
        self._iteration_start = steps
        self._iteration += 1  # any live iterator is now stale
