"""Fine-tune a GPT-2-config causal LM with LoRA under differential privacy.

Byte-level tokens of a local text file (default: this repository's README),
cut into fixed-length chunks; each chunk is one private example. The model
is built from a config (nothing is downloaded), LoRA adapters on the attention
projections are the only trainable parameters, and the loss is the model's own
``labels=`` loss, which swiftdp computes per example.

    python examples/hf_lora_gpt2.py --text README.md --epochs 1 --epsilon 8
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import peft
import torch
import transformers as tf
from torch.utils.data import DataLoader, TensorDataset

import swiftdp

ROOT = Path(__file__).resolve().parents[1]


def chunks(path: Path, length: int) -> torch.Tensor:
    """The file's bytes as (N, length) token ids (vocabulary: 256 byte values)."""
    data = torch.tensor(list(path.read_bytes()), dtype=torch.long)
    n = data.numel() // length
    return data[: n * length].view(n, length)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=ROOT / "README.md")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    ids = chunks(a.text, a.length)
    cfg = tf.GPT2Config(vocab_size=256, n_positions=a.length, n_embd=a.width, n_layer=a.layers,
                        n_head=4, bos_token_id=0, eos_token_id=0)
    model = peft.get_peft_model(tf.GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-3)
    loader = DataLoader(TensorDataset(ids), batch_size=a.batch_size)
    dp = swiftdp.make_private(model, opt, loader, target_epsilon=a.epsilon, delta=1e-5,
                              epochs=a.epochs, max_grad_norm=1.0, seed=0)
    losses = []
    for _epoch in range(math.ceil(a.epochs)):
        if a.max_steps and dp.steps >= a.max_steps:
            break
        for (x,) in dp.data_loader:
            dp.optimizer.zero_grad()
            if len(x):
                out = dp.model(input_ids=x, labels=x)  # each example's mean over its own tokens
                out.loss.backward()
                losses.append(float(out.loss.detach()))
            dp.optimizer.step()  # every drawn batch ends in a step
            if a.max_steps and dp.steps >= a.max_steps:
                break
    report = {"steps": dp.steps, "epsilon": dp.epsilon(),
              "perplexity": math.exp(sum(losses[-5:]) / max(len(losses[-5:]), 1))}
    print(f"steps {report['steps']}  ε = {report['epsilon']:.2f} (δ = 1e-5)  "
          f"train perplexity (last 5 steps) {report['perplexity']:.1f}")
    return report


if __name__ == "__main__":
    main()
