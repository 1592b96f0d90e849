"""
Two speed targets of 07_sft.py, each measured against its peer in the same run (this machine is noisy:
rounds are interleaved and the best of each kept).

  1. SFT tokens/s vs 03's pretraining tokens/s for the same model and row shapes: the loss mask and
     packing must cost little (target: at least 0.8x).
  2. Rejection sampling with the prompt's KV cache shared by the K samples (generate(num_samples=K))
     vs the prompt re-encoded for every sample (K copies in the batch), with a long prompt
     (512 tokens) and K = 16 (target: at least 3x; Llama 3 §4.2.2 reports more than 2x).

    python benchmarks/bench_sft.py
"""

import importlib
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")
rwd = importlib.import_module("06_reward_model")
sft = importlib.import_module("07_sft")


def best_of(rounds, fns):
    """Interleave the timed functions for `rounds` rounds; the best time of each."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def training_speed(rounds=5):
    torch.manual_seed(0)
    model = mdl.Transformer(mdl.preset("tiny", max_seq_len=1024))
    optimizer = pre.make_optimizer(model, 1e-3)
    rows, T = 16, 256
    tokens = torch.randint(0, 8000, (rows, T + 1))
    doc_ids = torch.arange(T + 1).repeat(rows, 1) // 40  # packed documents of 40 tokens, like packed dialogs
    mask = (torch.arange(T + 1) % 40 >= 25).long().repeat(rows, 1)  # the last 15 of each 40: "the answer"
    pretrain = lambda: pre.train_step(model, optimizer, [(tokens, doc_ids)], pre.pretraining_loss(pre.TrainConfig()), 1e-4)
    finetune = lambda: pre.train_step(model, optimizer, [(tokens, doc_ids, mask)], sft.sft_loss, 1e-4)
    pretrain(), finetune()  # warm-up
    t_pre, t_sft = best_of(rounds, [pretrain, finetune])
    n = rows * T
    print(f"training, {rows} rows x {T} tokens: pretraining {n / t_pre:,.0f} tokens/s, SFT {n / t_sft:,.0f} tokens/s: "
          f"{t_pre / t_sft:.2f}x (target >= 0.8x) {'ok' if t_pre / t_sft >= 0.8 else 'FAIL'}")


def shared_prompt_speed(rounds=3, prompt_len=512, k=16, news=(1, 16, 32)):
    """Sharing saves the prompt's encoding (K - 1 of K prefills); the decode steps after it cost the
    same either way. So the speed-up is largest for short answers: shown for 1, 16 and 32 new tokens
    (07's answers are 1-25 tokens; its limit is 40)."""
    torch.manual_seed(0)
    model = mdl.Transformer(mdl.preset("tiny", max_seq_len=1024)).eval()
    prompt = [random.Random(0).randrange(8000) for _ in range(prompt_len)]
    generator = lambda: torch.Generator().manual_seed(0)
    for new in news:
        shared = lambda: mdl.generate(model, [prompt], new, 1.0, 1.0, generator=generator(), num_samples=k)
        copies = lambda: mdl.generate(model, [prompt] * k, new, 1.0, 1.0, generator=generator())
        shared(), copies()  # warm-up
        t_shared, t_copies = best_of(rounds, [shared, copies])
        print(f"rejection sampling, a {prompt_len}-token prompt, K = {k}, {new:>2} new tokens each: shared prefill "
              f"{t_shared:.2f} s, prompt re-encoded per sample {t_copies:.2f} s: {t_copies / t_shared:.1f}x "
              f"(target >= 3x) {'ok' if t_copies / t_shared >= 3 else 'FAIL'}")


if __name__ == "__main__":
    print(f"CPU, {torch.get_num_threads()} threads" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    training_speed()
    shared_prompt_speed()
