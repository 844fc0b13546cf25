"""swiftdp.integrations.trainer.DPTrainer: transformers.Trainer with DP-SGD steps."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import Tensor
from torch.utils.data import Dataset

from swiftdp.accounting.accountant import PrivacyAccountant
from swiftdp.errors import InvalidArgumentError
from swiftdp.integrations.trainer import DPTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

V, T, N, B = 40, 6, 24, 8


class _Tokens(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(3, V, (N, T), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
                "labels": self.ids[i]}


def _model() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
        intermediate_size=32, vocab_size=V))


def _args(tmp_path, **kw) -> tf.TrainingArguments:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": B, "num_train_epochs": 2,
            "report_to": [], "save_strategy": "no", "logging_steps": 1, "use_cpu": True,
            "learning_rate": 1e-3, "remove_unused_columns": False}
    return tf.TrainingArguments(**{**base, **kw})


PRIVACY = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "seed": 0}


def test_trainer_takes_dp_steps_on_poisson_batches_and_reports_the_accountants_epsilon(tmp_path):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(),
                        privacy=PRIVACY)
    out = trainer.train()
    dp = trainer.dp
    assert dp is not None and dp.steps == out.global_step == 2 * (N // B)
    # The accountant saw every step with the sampling rate B/N and σ: compare with a
    # fresh accountant stepped the same way.
    ref = PrivacyAccountant("pld")
    ref.step(PRIVACY["noise_multiplier"], B / N, dp.steps)
    assert dp.epsilon() == pytest.approx(ref.epsilon(PRIVACY["delta"]), rel=1e-9)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1] == pytest.approx(dp.epsilon(), abs=1e-4)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_trainer_refuses_gradient_accumulation_and_resume(tmp_path):
    with pytest.raises(InvalidArgumentError, match="max_physical_batch_size"):
        DPTrainer(model=_model(), args=_args(tmp_path, gradient_accumulation_steps=2),
                  train_dataset=_Tokens(), privacy=PRIVACY)
    with pytest.raises(InvalidArgumentError, match="label_smoothing_factor"):
        DPTrainer(model=_model(), args=_args(tmp_path, label_smoothing_factor=0.1),
                  train_dataset=_Tokens(), privacy=PRIVACY)
    with pytest.raises(InvalidArgumentError, match="privacy="):
        DPTrainer(model=_model(), args=_args(tmp_path), train_dataset=_Tokens())
    trainer = DPTrainer(model=_model(), args=_args(tmp_path), train_dataset=_Tokens(),
                        privacy=PRIVACY)
    with pytest.raises(InvalidArgumentError, match="accountant"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_trainer_respects_the_budget(tmp_path):
    trainer = DPTrainer(model=_model(), args=_args(tmp_path, num_train_epochs=1),
                        train_dataset=_Tokens(),
                        privacy={"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0,
                                 "seed": 0})
    trainer.train()
    assert trainer.dp is not None and 0 < trainer.dp.epsilon() <= 3.0
