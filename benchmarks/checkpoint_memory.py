"""Peak RSS above the pre-step level with and without HF gradient checkpointing.

Usage: ``python benchmarks/checkpoint_memory.py CKPT PRIVATE`` (each 0 or 1), one
process per configuration. HF ``GPT2LMHeadModel`` (8 layers, d = 256, T = 256,
B = 16, float32, 1 thread); the first two steps are watched by a sampling thread.
"""

from __future__ import annotations

import gc
import os
import sys
import threading

import psutil
import torch
import transformers as tf


def main(ckpt: bool, private: bool) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tf.GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=2000, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 2000, (16, 256))
    if private:
        import swiftdp

        swiftdp.GradClipper(model, 1.0)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    gc.collect()
    proc = psutil.Process(os.getpid())
    idle = proc.memory_info().rss
    peak, done = [idle], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    step()
    step()
    done.set()
    watcher.join()
    print(f"ckpt={ckpt} private={private} peak_above_idle_MB={(peak[0] - idle) / 2**20:.0f}")


if __name__ == "__main__":
    main(sys.argv[1] == "1", sys.argv[2] == "1")
