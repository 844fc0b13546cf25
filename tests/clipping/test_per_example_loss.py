"""The per-example loss path: exact for padded sequences, coupled losses refused.

Reference: each example's own loss (mean over its own real tokens), one
example at a time with plain autograd in float64. Privacy: the neighbour
sensitivity max_j ‖S(D) − S(D∖j)‖ of the clipped sum stays ≤ C.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swiftdp
from support.oracle import reference_clipped_sum
from swiftdp.errors import ExampleMixingError, InvalidArgumentError
from swiftdp.losses import causal_lm_loss, per_example_cross_entropy

C = 0.3
B, T, V = 4, 6, 7


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[0, 3:] = -100  # examples with different numbers of real tokens
    labels[2, 1:] = -100
    return ids, labels


def _model() -> nn.Module:
    torch.manual_seed(1)
    return _TinyLM().double()


def _clipped_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mode: str) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    clipper = swiftdp.GradClipper(model, C, mode=mode)  # declared "mean": overridden by the vector
    clipper.backward(causal_lm_loss(model(ids), labels))
    clipper.remove()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["bk", "ghost", "per_sample", "nanobatch"])
def test_per_example_token_mean_loss_matches_the_one_example_reference(mode):
    ids, labels = _batch()
    model, ref = _model(), _model()
    got = _clipped_sum(model, ids, labels, mode)
    sums, _ = reference_clipped_sum(ref, lambda o, t: causal_lm_loss(o, t).sum(), ids, labels, C)
    for g, s in zip(got, sums, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-10)


def test_per_example_loss_neighbour_sensitivity_is_at_most_c():
    ids, labels = _batch()
    model = _model()
    full = torch.cat([g.flatten() for g in _clipped_sum(model, ids, labels, "bk")])
    worst = 0.0
    for j in range(B):
        keep = [i for i in range(B) if i != j]
        part = torch.cat([g.flatten() for g in _clipped_sum(model, ids[keep], labels[keep], "bk")])
        worst = max(worst, float((full - part).norm()))
    assert worst <= C * (1 + 1e-6)


def test_batch_token_mean_loss_is_what_the_vector_path_fixes():
    # Hugging Face's default: one mean over every real token of the batch. Its
    # per-example normaliser depends on the other examples; the vector path's
    # does not. Shown here so the difference is measured, not assumed.
    ids, labels = _batch()
    out = _model()(ids)
    tok = F.cross_entropy(out[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum")
    batch_mean = tok / (labels[:, 1:] != -100).sum()
    per_ex = causal_lm_loss(out, labels)
    assert not torch.allclose(batch_mean, per_ex.mean())


def test_contrastive_vector_loss_is_refused():
    torch.manual_seed(2)
    model = nn.Linear(4, 3).double()
    clipper = swiftdp.GradClipper(model, C)
    z = model(torch.randn(5, 4, dtype=torch.float64))
    sim = z @ z.T  # InfoNCE-style: each example's loss uses every other example
    losses = F.cross_entropy(sim, torch.arange(5), reduction="none")
    with pytest.raises(ExampleMixingError, match="per-example"):
        clipper.backward(losses)
    assert model.weight.grad is None  # refused before any backward
    clipper.remove()


def test_contrastive_scalar_loss_is_refused():
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    clipper = swiftdp.GradClipper(model, C)
    z = model(torch.randn(5, 4, dtype=torch.float64))
    loss = F.cross_entropy(z @ z.T, torch.arange(5))
    with pytest.raises(ExampleMixingError):
        clipper.backward(loss)
    clipper.remove()


def test_scalar_loss_without_cross_terms_passes_the_check_and_is_exact():
    torch.manual_seed(4)
    model, ref = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    clipper = swiftdp.GradClipper(model, C)
    clipper.backward(F.cross_entropy(model(x), y))
    clipper.remove()
    sums, _ = reference_clipped_sum(ref, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y, C)
    for p, s in zip(model.parameters(), sums, strict=True):
        torch.testing.assert_close(p.grad, s, rtol=1e-6, atol=1e-10)


def test_losses_of_the_wrong_shape_are_refused_naming_the_argument():
    model = nn.Linear(4, 3).double()
    clipper = swiftdp.GradClipper(model, C)
    out = model(torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="`losses` of shape \\(6,\\)"):
        clipper.backward(out.sum(1)[:3])
    clipper.remove()


def test_per_example_cross_entropy_reduces_each_example_over_its_own_tokens():
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[1, -100, -100], [0, 2, 3]])
    got = per_example_cross_entropy(logits, labels)
    want0 = F.cross_entropy(logits[0, :1], labels[0, :1])
    want1 = F.cross_entropy(logits[1], labels[1])
    torch.testing.assert_close(got, torch.stack([want0, want1]))
    summed = per_example_cross_entropy(logits, labels, token_reduction="sum")
    torch.testing.assert_close(summed[1], want1 * 3)
    empty = per_example_cross_entropy(logits, torch.full((2, 3), -100))
    assert torch.equal(empty, torch.zeros(2, dtype=torch.float64))


def test_make_private_backward_takes_the_per_example_losses():
    from torch.utils.data import DataLoader, TensorDataset

    ids, labels = _batch()
    ds = TensorDataset(ids.repeat(5, 1), labels.repeat(5, 1))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = swiftdp.make_private(model, opt, DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                              max_grad_norm=C, delta=1e-3, seed=0)
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        dp.backward(causal_lm_loss(dp.model(x), y))
        dp.optimizer.step()
    assert dp.steps == len(dp.data_loader)
