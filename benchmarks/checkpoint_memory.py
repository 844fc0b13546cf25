"""Peak RSS above the pre-step level with and without HF gradient checkpointing.

Usage: python benchmarks/checkpoint_memory.py CKPT PRIVATE   (each 0 or 1; one process per run)
GPT-2 config (8 layers, d=256, T=256, B=16, float32, 1 thread), two steps watched.
"""
import sys, torch, transformers as tf, gc
ckpt, private = sys.argv[1] == "1", sys.argv[2] == "1"
torch.manual_seed(0); torch.set_num_threads(1)
cfg = tf.GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=2000, n_positions=256, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0)
m = tf.GPT2LMHeadModel(cfg); m.train()
if ckpt: m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
ids = torch.randint(0, 2000, (16, 256))
if private:
    import swiftdp; c = swiftdp.GradClipper(m, 1.0)
def step():
    m.zero_grad(set_to_none=True)
    m(input_ids=ids, labels=ids).loss.backward()
import psutil, os
gc.collect()
p = psutil.Process(os.getpid())
idle = p.memory_info().rss
import threading
peak = [0]
stop = [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], p.memory_info().rss)
for _ in range(1):  # first and second step watched
    t = threading.Thread(target=watch); t.start()
    step(); step()
    stop[0] = True; t.join()
print(f"ckpt={ckpt} private={private} peak_above_idle_MB={(peak[0]-idle)/2**20:.0f}")
