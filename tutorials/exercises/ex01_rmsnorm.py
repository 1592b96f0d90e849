"""Exercise 1 · RMSNorm (02_model.py `RMSNorm`; Llama 3 §3.2: the Llama 2 architecture, pre-normalised).

Every Llama block normalises its input before attention and before the feed-forward network with
RMSNorm: each vector is divided by the root of the mean of its squares (nothing is subtracted,
unlike LayerNorm), then every feature is multiplied by a learned gain.

    rms_norm(x, weight, eps) = x / sqrt(mean(x², over the last dimension) + eps) · weight

Fill in the function between the markers, then check it:

    pytest tutorials/exercises -k rmsnorm
"""
import torch


def rms_norm(x, weight, eps=1e-5):
    """x: (..., D) float tensor; weight: (D,) gains. Returns a tensor shaped like x."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
