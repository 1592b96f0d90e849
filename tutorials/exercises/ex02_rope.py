"""Exercise 2 · RoPE: rotating pairs, and Llama 3.1's frequency scaling (02_model.py `apply_rope`,
`rope_frequencies`; Llama 3 §3.2: RoPE with base frequency 500,000).

Rotary position embeddings turn each adjacent pair of features (x[2i], x[2i+1]) of a query or key
by the angle position · freq[i], as if multiplying the complex number x[2i] + j·x[2i+1] by e^(j·angle):

    (x0, x1) -> (x0·cos a - x1·sin a,  x0·sin a + x1·cos a)

Llama 3.1's code rescales the frequencies once, before the position × frequency table is built (Meta's
`apply_scaling`, factor 8 for 8K -> 128K; the paper itself reaches 128K by continued pre-training in six
stages, §3.4.2): with wavelength = 2π / freq,
    wavelength < original_len / high_freq_factor   -> freq unchanged (fine position detail)
    wavelength > original_len / low_freq_factor    -> freq / factor (slow pairs stretched)
    in between: smooth = (original_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
                freq · ((1 - smooth) / factor + smooth)

    pytest tutorials/exercises -k rope
"""
import math

import torch


def rotate_pairs(x, angles):
    """x: (T, D) with D even; angles: (T, D/2), the angle of each pair at each position.
    Returns (T, D): every pair (x[:, 2i], x[:, 2i+1]) rotated by angles[:, i]."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code


def llama31_frequencies(freqs, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_len=8192):
    """freqs: (D/2,) RoPE frequencies in radians per position. Returns Llama 3.1's rescaled (D/2,)."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
