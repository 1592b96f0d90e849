"""Exercise 3 · Grouped-query attention's KV repeat (02_model.py `repeat_kv`; Llama 3 §3.2: GQA with
8 key-value heads).

With grouped-query attention, n_heads query heads share n_kv_heads key and value heads: each KV
head serves n_rep = n_heads / n_kv_heads CONSECUTIVE query heads (query heads 0..n_rep-1 use KV
head 0, the next n_rep use KV head 1, ...). Before attention the keys and values are repeated so
that there is one per query head. The KV cache stores only the n_kv_heads, which is the point:
a cache n_rep times smaller.

    pytest tutorials/exercises -k gqa
"""
import torch


def repeat_kv(x, n_rep):
    """x: (B, Hkv, T, Dh) -> (B, Hkv·n_rep, T, Dh), KV head h at positions h·n_rep .. h·n_rep + n_rep - 1."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
