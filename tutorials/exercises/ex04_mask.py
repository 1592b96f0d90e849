"""Exercise 4 · The causal + document attention mask (02_model.py `attention_mask`; Llama 3 §3.2:
"an attention mask that prevents self-attention between different documents within the same sequence").

Pre-training packs several documents into one row of seq_len tokens. A token may attend to a key
when the key is not in its future (causal) AND the key belongs to the same document. Without the
second condition, a document would read the end of an unrelated one as if it were its context.

    pytest tutorials/exercises -k document
"""
import torch


def document_causal_mask(doc_ids):
    """doc_ids: (T,) integer document index of each token in a packed row.
    Returns a (T, T) bool tensor, mask[q, k] True where query q may attend to key k."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
