"""Exercise 6 · The learning-rate schedule: linear warmup, then cosine decay (03_pretrain.py `lr_at`;
Llama 3 §3.4.1: "a linear warm up of 8,000 steps and a cosine learning rate schedule decaying to
8 × 10⁻⁷ over 1,200,000 steps", the peak being 8 × 10⁻⁵: a floor of 1% of the peak, min_lr_ratio 0.01).

Steps are counted from 0. During warmup (step < warmup) the rate climbs linearly to the peak,
reaching it at step warmup - 1: peak · (step + 1) / warmup. After it, progress runs from 0 at step
`warmup` to 1 at the last step (steps - 1), and

    lr = peak · (min_lr_ratio + (1 - min_lr_ratio) · (1 + cos(π · progress)) / 2)

    pytest tutorials/exercises -k schedule
"""
import math


def lr_at(step, peak_lr, warmup, steps, min_lr_ratio=0.01):
    """The learning rate at `step` (0-based) of a run of `steps` steps."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
