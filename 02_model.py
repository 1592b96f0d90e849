"""
Chapter 2: the Llama 3 transformer.

Llama 3 §3.2 (Table 3): a standard dense decoder-only Transformer, with four changes from Llama 2:
grouped-query attention with 8 KV heads, a document mask inside packed sequences, a 128K vocabulary,
and RoPE with θ = 500,000. Llama 3.1 adds a rescaling of RoPE frequencies for 128K contexts.
The parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...),
so Meta checkpoints load with a plain `load_state_dict`, and Hugging Face ones through one small map.

The file reads bottom-up: ModelArgs -> RMSNorm -> RoPE -> attention (the explicit math, and the
same through fused SDPA or flex kernels) -> FeedForward -> TransformerBlock -> Transformer -> KV cache and
generation -> checkpoints -> main; then, under its own heading, optional fast (compiled) decoding.
Shapes: B batch, T tokens, D model dim, H query heads, Hkv key/value heads, Dh head dim, V vocab.

Run it:
    python 02_model.py                                   # Table 3 for every preset + a random tiny model
    python 02_model.py --ckpt DIR --prompt "The capital of France is"   # a Meta or HF checkpoint
    python 02_model.py --ckpt DIR --compile --max-new-tokens 256        # compiled decode steps
"""

import argparse
import contextlib
import functools
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
Tokenizer = tok.Tokenizer

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 256  # model (residual stream) width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = 2  # key/value heads shared by groups of query heads (GQA); None: one per query head
    vocab_size: int = 8192
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # set only to load a checkpoint whose width Meta's rule can't derive
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0  # Llama 3 §3.2: raised from Llama 2's 10,000 for long contexts
    use_scaled_rope: bool = False  # Llama 3.1 frequency scaling (see rope_frequencies)
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 256  # positions the RoPE table covers
    tie_embeddings: bool = False  # Llama 3.2 1B/3B share the input embedding with the output head
    attn_impl: str = "sdpa"  # "sdpa" (fast), "math" (explicit, for teaching), "flex" (CUDA document masks)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise tok.UserError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise tok.UserError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}: "
                             f"each KV head serves a whole group of query heads")
        if self.head_dim % 2:
            raise tok.UserError(f"head dim {self.head_dim} must be even: RoPE rotates pairs of features")
        if self.attn_impl not in ("sdpa", "math", "flex"):
            raise tok.UserError(f"attn_impl={self.attn_impl!r}: choose 'sdpa', 'math' or 'flex'")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """SwiGLU width, derived as Meta's FeedForward does: 4·dim, times 2/3 (SwiGLU has three
        matrices, not two, so this keeps the parameter count of a 4·dim MLP), times the multiplier,
        rounded up to `multiple_of`. Gives 14,336 / 28,672 / 53,248 for 8B / 70B / 405B."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


_LLAMA3 = dict(vocab_size=128_256, norm_eps=1e-5, rope_theta=500_000.0, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, use_scaled_rope=True, max_seq_len=131_072)
PRESETS = {
    # ~7 M parameters: trains at ~2K tokens/s on 2 CPU cores (fp32)
    "tiny": ModelArgs(),
    # a few hundred million parameters for one 80 GB GPU (bf16, flash attention)
    "gpu": ModelArgs(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, vocab_size=32_768, max_seq_len=4096),
    # Llama 3 §3.2 Table 3; multiple_of / ffn_dim_multiplier from meta-llama/llama-models sku_list.py
    "llama3_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3_405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2, **_LLAMA3),
    # Llama 3.1: same shapes, RoPE scaled for 128K (factor 8, original context 8,192)
    "llama3.1_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1_405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2, **_LLAMA31),
    # Llama 3.2 text models: tied embeddings, RoPE factor 32 (Meta's released params.json; not in the paper)
    "llama3.2_1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                             tie_embeddings=True, rope_scale_factor=32.0, **_LLAMA31),
    "llama3.2_3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                             tie_embeddings=True, rope_scale_factor=32.0, **_LLAMA31),
}


def preset(name, **overrides):
    """A copy of a named preset with some fields changed: preset("tiny", n_layers=2)."""
    if name not in PRESETS:
        raise tok.UserError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 even under bf16 (as Meta's code does)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args):
    """RoPE inverse frequencies θ^(-2i/Dh) for i = 0..Dh/2-1: pair i of each head turns by
    position · freq[i] radians. With `use_scaled_rope`, Llama 3.1's rescaling (meta-llama/llama-models
    apply_scaling; PAPER.md §5): wavelengths shorter than original_len/high_freq_factor are kept,
    longer than original_len/low_freq_factor are divided by `factor`, and those between are blended."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if not args.use_scaled_rope:
        return freqs.float()
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = args.rope_original_max_len / args.rope_low_freq_factor
    high_freq_wavelen = args.rope_original_max_len / args.rope_high_freq_factor
    smooth = (args.rope_original_max_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor)
    blended = (1 - smooth) * freqs / args.rope_scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled).float()


def rope_cos_sin(args, device=None):
    """cos and sin of position · freq for every position: two (max_seq_len, Dh/2) tables."""
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), rope_frequencies(args))
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) by its angle, like multiplying the complex number
    x[2i] + j·x[2i+1] by e^(j·angle) (Meta's layout; Hugging Face splits halves instead).
    x: (B, T, H, Dh); cos, sin: (T, Dh/2), or (B, T, Dh/2) when rows have positions of their own."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, Dh/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T or B·T, 1, Dh/2): the same angle for every head
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, Dh/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, T, H, Dh)


def repeat_kv(x, n_rep):
    """(B, Hkv, T, Dh) -> (B, Hkv·n_rep, T, Dh): each KV head serves n_rep consecutive query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_mask(q_doc, k_doc, q_pos, k_pos):
    """Boolean mask, True = may attend: causal (key position <= query position) and, Llama 3 §3.2,
    within the same document. q_doc (B, Tq), k_doc (B, Tk), q_pos (Tq,), k_pos (Tk,) -> (B, 1, Tq, Tk)."""
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]  # (B, Tq, Tk)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    return (same_doc & causal)[:, None]  # (B, 1, Tq, Tk): one mask for all heads


def shared_prefix_mask(branches):
    """For rows where several continuations share one prefix (Llama 3 §4.1.2 scores a prompt's
    responses in one row): branches (B, T) is 0 on the prefix, k on the k-th continuation, -1 on
    padding. A token attends to earlier tokens of its own branch and, from a branch, to the prefix;
    never to another branch. -> (B, 1, T, T)."""
    T = branches.shape[1]
    index = torch.arange(T, device=branches.device)
    causal = index[None, :] <= index[:, None]  # (T, T)
    same_branch = branches[:, :, None] == branches[:, None, :]  # (B, T, T)
    prefix = (branches[:, None, :] == 0) & (branches[:, :, None] > 0)  # (B, T, T): branch -> prefix
    return ((same_branch | prefix) & causal)[:, None]


def attention_math(q, k, v, mask=None):
    """The definition, for teaching: softmax(Q·Kᵀ/√Dh + mask)·V with the softmax in float32.
    q (B, H, T, Dh); k, v (B, Hkv, Tk, Dh); mask None (causal) or boolean (B, 1, T, Tk)."""
    T, Tk, head_dim = q.shape[2], k.shape[2], q.shape[3]
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, Tk, Dh)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, H, T, Tk)
    if mask is None:  # causal; with a cache the T queries are the last T of the Tk keys
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    # a row with no key to attend to (padding) gives NaN from softmax; it contributes nothing
    return F.softmax(scores.float(), dim=-1).nan_to_num(0.0).type_as(q) @ v  # (B, H, T, Dh)


def masked_attention(q, k, v, mask, cached=False):
    """The same result as attention_math through fused kernels, picked by the mask and the hardware:
      * a flex BlockMask (CUDA document masks): flex_attention, which skips fully masked blocks;
      * a compiled decode step on CPU (compiled_decoder): the explicit math, which inductor fuses
        into its own loops, where SDPA would stay an opaque call and measured slower;
      * a dense boolean mask: SDPA with the mask (the memory-efficient or C++ kernel); on CUDA that
        kernel takes a mask but not enable_gqa, so KV heads are repeated there."""
    if not isinstance(mask, torch.Tensor):
        return _flex(q.device.type)[0](q, k, v, block_mask=mask, enable_gqa=True)
    if cached and q.device.type == "cpu" and torch.compiler.is_compiling():
        return attention_math(q, k, v, mask)
    if q.device.type == "cuda":
        n_rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@torch.compiler.disable  # built outside the model's compiled graph, as torchtitan does
def flex_document_mask(doc_ids):
    """A flex_attention BlockMask for causal attention within documents. It skips the blocks that
    are fully masked, so unlike a dense boolean mask it keeps a fused kernel: the GPU path for long
    packed sequences. (On CPU flex_attention has no backward, so CPU training uses SDPA + mask.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    B, T = doc_ids.shape
    return _flex(doc_ids.device.type)[1](mask_mod, B, None, T, T, device=doc_ids.device)


@functools.cache
def _flex(device_type):
    """flex_attention and create_block_mask, compiled once on CUDA (the documented way; eager,
    flex_attention materialises the T×T scores and building a mask takes seconds, not milliseconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if device_type != "cuda":
        return flex_attention, create_block_mask
    # static shapes: dynamic-shape flex with masks that read the batch index has had bugs
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask, dynamic=False)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.attn_impl = args.attn_impl
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, layer_cache=None):
        """x: (B, T, D). mask: None (plain causal, no cache), a boolean (B, 1, T, Tk) tensor, or a
        flex BlockMask. layer_cache: (KVCache, layer index) to append to and attend over."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, Dh)
        if layer_cache is not None:
            cache, layer = layer_cache
            k, v = cache.update(layer, k, v)  # (B, Hkv, L, Dh): every slot of the cache
        if self.attn_impl == "math":  # the definition, for teaching
            out = attention_math(q, k, v, mask)  # (B, H, T, Dh)
        elif mask is None:  # plain causal: SDPA may pick the flash kernel, which shares KV heads itself
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, Dh)
        else:  # a document mask or a KV cache
            out = masked_attention(q, k, v, mask, cached=layer_cache is not None)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H·Dh) -> (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x), no biases."""

    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, layer_cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, layer_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Trainers may set this: keep only each block's input in the forward pass and recompute the
        # rest during backward, trading ~1/3 more compute for activation memory that no longer grows
        # with depth (useful for long contexts).
        self.activation_checkpointing = False
        # RoPE tables are derived, not learned: non-persistent buffers, rebuilt by init_rope()
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.init_weights()

    def init_rope(self):
        """(Re)compute the RoPE tables where the model lives (after loading onto the meta device)."""
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rope_cos_sin(self.args, device=None if device.type == "meta" else device)

    def init_weights(self):
        """Normal(0, 0.02) for embeddings and projections; the two projections that write into the
        residual stream (wo, w2) get 0.02/sqrt(2·n_layers) so its variance stays flat with depth
        (GPT-2's scheme; Meta publishes no training init). Norm weights start at 1."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        self.init_rope()

    def forward(self, tokens, doc_ids=None, cache=None, last_only=False, branches=None):
        """tokens: (B, T) ids -> logits (B, T, V) in float32.
        doc_ids: (B, T) document index per token in a packed row (Llama 3 §3.2 document mask);
        tokens attend only to earlier tokens of the same document. Padding can be its own document.
        cache: a KVCache; the tokens continue from cache.pos, and the cache grows by T.
        last_only: logits of the last position only, (B, 1, V): all that generation needs. It skips
        the output head for the rest of a prompt, ~40% of the tiny preset's prefill FLOPs.
        branches: (B, T) for rows of one shared prefix and several continuations (see
        shared_prefix_mask); each continuation's positions go on from the end of the prefix, so it
        computes exactly what it would alone after the prefix."""
        return self.output(self.hidden(tokens, doc_ids, cache, last_only, branches)).float()  # (B, T or 1, V)

    def hidden(self, tokens, doc_ids=None, cache=None, last_only=False, branches=None):
        """The final hidden states (B, T or 1, D), normed: what the output head (or a reward head) reads."""
        B, T = tokens.shape
        if cache is None and T > self.args.max_seq_len:
            raise ValueError(f"{T} positions exceed max_seq_len={self.args.max_seq_len} of this model")
        h = self.tok_embeddings(tokens)  # (B, T, D)

        mask = None  # None means plain causal attention over this call's tokens (the fast path)
        if cache is not None:
            positions = cache.claim(T)  # (T,) where these tokens go, a tensor so compiled steps never recompile
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, Dh/2)
            q_doc = doc_ids if doc_ids is not None else torch.zeros_like(tokens)
            k_doc = cache.update_doc_ids(q_doc)  # (B, L): every slot of the cache
            # Keys are all L slots; the ones not written yet lie in the future, so causality hides them.
            mask = attention_mask(q_doc, k_doc, positions, cache.slots)  # (B, 1, T, L)
        elif branches is not None:
            mask = shared_prefix_mask(branches)  # (B, 1, T, T)
            positions = mask[:, 0].sum(-1) - 1  # (B, T): how many tokens each one sees, itself included
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, Dh/2)
        else:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, Dh/2)
            if doc_ids is not None:
                if self.args.attn_impl == "flex":
                    mask = flex_document_mask(doc_ids)
                else:
                    positions = torch.arange(T, device=tokens.device)
                    mask = attention_mask(doc_ids, doc_ids, positions, positions)

        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, (cache, i) if cache is not None else None)
        if last_only:
            h = h[:, -1:]  # (B, 1, D)
        return self.norm(h)


# -----------------------------------------------------------------------------
# Size, cost and the KV cache


def count_params(args):
    """Parameter count, read off a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def flops_per_token(args, seq_len):
    """Training FLOPs per token: 6·N (forward 2·N, backward 4·N, N = parameters that do matrix
    multiplies: all but the input embedding) plus attention's score and value matmuls,
    6·2·n_layers·H·Dh·seq_len (the PaLM paper's accounting, which counts the full T×T square)."""
    n = count_params(args) - (0 if args.tie_embeddings else args.vocab_size * args.dim)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def kv_cache_bytes(args, seq_len, bytes_per_value=2):
    """KV-cache size for one sequence: keys and values for every layer, KV head and position.
    GQA divides it by n_heads / n_kv_heads compared with multi-head attention."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * seq_len * bytes_per_value


class KVCache:
    """Keys and values of all layers for a batch of sequences, preallocated to max_len slots.

    Shapes are static, as in gpt-fast: attention always reads all max_len slots and the causal mask
    hides the ones not written yet. Every decode step then has the same shapes, so a compiled step
    (compiled_decoder) is built once instead of once per length. The position counter `pos` is a
    tensor for the same reason: a Python int would be baked into the compiled code."""

    def __init__(self, args, batch_size, max_len, device=None):
        if max_len > args.max_seq_len:
            raise ValueError(f"a KV cache of {max_len} positions exceeds max_seq_len={args.max_seq_len} of this model")
        self.shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = self.v = None  # allocated by the first update, in the dtype attention computes in
        self.doc_ids = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)  # (L,) the position of each slot
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # slots filled so far
        self.positions = None  # (T,) the slots of the current forward call, set by claim()

    def claim(self, n):
        """Reserve the next n slots for the current forward call and return their positions (n,)."""
        if not torch.compiler.is_compiling() and (needed := self.pos.item() + n) > self.shape[3]:
            raise ValueError(f"KV cache holds {self.shape[3]} positions; {needed} needed")
        self.positions = self.pos + torch.arange(n, device=self.pos.device)
        self.pos += n  # in place: a compiled step updates the same tensor
        return self.positions

    def update(self, layer, k, v):
        """Write this call's keys/values (B, Hkv, T, Dh) into their slots; return every slot (B, Hkv, L, Dh)."""
        if self.k is None:  # bf16 under autocast or FSDP mixed precision, else the weights' dtype
            # One tensor per layer, not views of one big tensor: a compiled step then writes the
            # new slots in place instead of copying the whole cache back after each step.
            self.k = [torch.zeros(self.shape[1:], device=k.device, dtype=k.dtype) for _ in range(self.shape[0])]
            self.v = [torch.zeros(self.shape[1:], device=k.device, dtype=k.dtype) for _ in range(self.shape[0])]
            if k.device.type == "cuda":  # CUDA graphs may then keep reading them at the same address
                for t in self.k + self.v + [self.doc_ids, self.pos]:
                    torch._dynamo.mark_static_address(t, guard=False)  # a new cache re-records, never recompiles
        self.k[layer].index_copy_(2, self.positions, k)
        self.v[layer].index_copy_(2, self.positions, v)
        return self.k[layer], self.v[layer]

    def update_doc_ids(self, doc_ids):
        """Write this call's document ids (B, T) into their slots; return every slot's (B, L)."""
        self.doc_ids.index_copy_(1, self.positions, doc_ids)
        return self.doc_ids

    def repeat_rows(self, n):
        """Make n copies of every row (row i becomes rows i·n .. i·n + n-1), keys and values included:
        after one prefill of a prompt, n samples continue from the same cache instead of encoding the
        prompt n times (Llama 3 §4.2.2 shares the prompt's KV cache across rejection samples)."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.doc_ids = self.doc_ids.repeat_interleave(n, dim=0)
        self.shape = (self.shape[0], self.shape[1] * n, *self.shape[2:])
        if self.doc_ids.device.type == "cuda":
            for t in self.k + self.v + [self.doc_ids]:
                torch._dynamo.mark_static_address(t, guard=False)


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, V) -> ids (B,). temperature 0 is greedy. top_p keeps the smallest set of tokens
    whose probabilities add up to top_p (nucleus sampling), then renormalises."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens entirely beyond the nucleus
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def decode_step(model, tokens, doc_ids, cache):
    """One generation step: the logits of each row's last position (B, V) and their argmax (B,),
    the greedy pick. The argmax lives here so that compiled_decoder fuses it into the compiled step."""
    logits = model(tokens, doc_ids=doc_ids, cache=cache, last_only=True)[:, -1]  # (B, V)
    return logits, logits.argmax(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_tokens=(), generator=None,
             compile=False, num_samples=1, on_token=None):
    """Continue each prompt (a list of ids; lengths may differ) and return the new ids of each,
    ending before the first stop token (e.g. Tokenizer.stop_tokens: end_of_text, eom, eot).
    Prompts are left-padded into one batch; the padding is a document of its own (doc id -1) so
    no real token attends to it. Because RoPE only sees relative positions, the shift that
    left-padding gives a shorter prompt changes nothing. One prefill pass fills the KV cache, then
    each step feeds one token per row. num_samples > 1: each prompt is encoded once and continued
    num_samples times from copies of its cache (sample with temperature > 0); the result then holds
    num_samples lists per prompt, prompt by prompt. on_token(row, token) is called for each new
    token as it is made (streaming). compile=True runs the steps through compiled_decoder (see
    "Optional: fast decoding" at the end of this file): several times faster after a compile for
    each new batch size and cache size (cache_slots_for_compile rounds lengths up so that a few
    compiles serve all)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > model.args.max_seq_len:
        raise tok.UserError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceed max_seq_len={model.args.max_seq_len}")
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    doc_ids = torch.full((B, P), -1, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt):] = torch.tensor(prompt, device=device)
        doc_ids[row, P - len(prompt):] = 0
    cache_len = P + max_new_tokens
    if compile:  # a compiled step has fixed shapes: 200 and 230 positions share one 256-slot compile
        cache_len = min(cache_slots_for_compile(cache_len), model.args.max_seq_len)
    cache = KVCache(model.args, B, cache_len, device=device)
    step = compiled_decoder(model) if compile else functools.partial(decode_step, model)
    logits, greedy = decode_step(model, tokens, doc_ids, cache)  # prefill, eager: (B, V), (B,)
    if num_samples > 1:  # the samples of a prompt share its prefill
        cache.repeat_rows(num_samples)
        logits, greedy, B = logits.repeat_interleave(num_samples, 0), greedy.repeat_interleave(num_samples, 0), B * num_samples
    real = torch.zeros(B, 1, dtype=torch.long, device=device)
    stop, finished, new = set(stop_tokens), [False] * B, [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        next_ids = greedy if temperature <= 0 else sample_next(logits, temperature, top_p, generator)  # (B,)
        # Bookkeeping on Python ints: after a compiled step, every tiny tensor op would cost more
        # than its arithmetic (README, "Decoding, measured").
        for row, token in enumerate(next_ids.tolist()):
            finished[row] = finished[row] or token in stop
            if not finished[row]:
                new[row].append(token)
                if on_token:
                    on_token(row, token)
        if all(finished):
            break
        # subtle: a CUDA graph step reuses its output buffers at the next replay, so the ids fed back in
        # must be a copy (gpt-fast clones them too); on CPU the copy costs nothing that matters.
        logits, greedy = step(next_ids[:, None].clone() if compile else next_ids[:, None], real, cache)
    return new


# -----------------------------------------------------------------------------
# Checkpoints: ours, Meta's and Hugging Face's


def atomic_save(obj, path):
    """torch.save, durably and atomically (01's atomic_write): a crash mid-write never leaves a
    half-written file where a good checkpoint was."""
    tok.atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, model, state_dict=None, args=None, **extra):
    """A plain dict: the Meta-named state dict, the model's args as a dict, plus `extra` (step, ...).
    `state_dict` replaces model.state_dict() (e.g. one gathered from FSDP shards), `args` its args."""
    atomic_save({"model": model.state_dict() if state_dict is None else state_dict,
                 "args": asdict(args or model.args), **extra}, path)


def _check_state_dict(model, state_dict, origin):
    """Every mismatch between a checkpoint and the model it should fill, listed in one error."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = [f"missing: {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected: {k}" for k in state_dict if k not in expected]
    problems += [f"shape of {k}: checkpoint {tuple(state_dict[k].shape)}, config expects {tuple(s)}"
                 for k, s in expected.items() if k in state_dict and state_dict[k].shape != s]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise tok.UserError(f"{origin} does not match its config ({len(problems)} problems):\n  {shown}")


def model_from_state_dict(args, state_dict, origin="checkpoint"):
    """Build the model on the meta device (no memory), then adopt the checkpoint's tensors as its
    parameters (assign=True): an 8B model loads without ever existing twice in memory."""
    state_dict = dict(state_dict)
    if args.tie_embeddings:
        state_dict.setdefault("output.weight", state_dict.get("tok_embeddings.weight"))
    with torch.device("meta"):
        model = Transformer(args)
    _check_state_dict(model, state_dict, origin)
    model.load_state_dict(state_dict, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    return model


# Meta's model-parallel shards split each weight along one dimension (fairscale layers): column-parallel
# weights and the vocab-parallel embedding along dim 0, row-parallel ones along dim 1; norms are replicated.
_META_SHARD_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
_META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope")


def load_meta(folder, max_seq_len=8192):
    """Meta's format: params.json + consolidated.NN.pth, one file per model-parallel rank."""
    params = json.loads((folder / "params.json").read_text())
    args = ModelArgs(**{k: params[k] for k in _META_PARAMS if k in params}, max_seq_len=max_seq_len)
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
              for p in sorted(folder.glob("consolidated.*.pth"))]
    state_dict = {}
    for key in shards[0]:
        if key == "rope.freqs":  # Llama 2-era checkpoints store the RoPE table; it is derived here
            continue
        dim = _META_SHARD_DIM.get(key.split(".")[-2])
        state_dict[key] = shards[0][key] if len(shards) == 1 or dim is None else torch.cat([s[key] for s in shards], dim=dim)
    if "output.weight" not in state_dict:  # Llama 3.2 1B/3B ship only the shared embedding
        args = replace(args, tie_embeddings=True)
    return model_from_state_dict(args, state_dict, f"Meta checkpoint {folder}")


def _hf_permute(w, n_heads):
    """Meta -> HF RoPE layout for wq/wk rows: interleaved pairs (0,1),(2,3).. become halves [0..Dh/2),[Dh/2..Dh)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _hf_unpermute(w, n_heads):
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# our name -> Hugging Face name, per layer and for the rest
_HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _hf_name(ours):
    if ours in _HF_TOP:
        return _HF_TOP[ours]
    _, layer, rest = ours.split(".", 2)  # layers.N.attention.wq.weight
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{_HF_LAYER[module]}.{param}"


def args_from_hf_config(config, max_seq_len=None):
    """ModelArgs from a Hugging Face LlamaConfig dict, as written by transformers 4.x (rope_theta,
    rope_scaling) or 5.x (rope_parameters)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 500_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise tok.UserError(f"rope type {rope_type!r} is not Llama 3's; supported: default, llama3")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise tok.UserError(f"head_dim={config['head_dim']} differs from hidden_size/num_attention_heads; "
                         f"Llama 3 models never do this")
    scaled = dict(use_scaled_rope=True, rope_scale_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                  rope_high_freq_factor=rope["high_freq_factor"],
                  rope_original_max_len=rope["original_max_position_embeddings"]) if rope_type == "llama3" else {}
    return ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
                     n_kv_heads=config.get("num_key_value_heads", heads), vocab_size=config["vocab_size"],
                     ffn_hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
                     rope_theta=theta, tie_embeddings=config.get("tie_word_embeddings", False),
                     max_seq_len=max_seq_len or min(config.get("max_position_embeddings", 8192), 8192), **scaled)


def load_hf(folder, max_seq_len=None):
    """Hugging Face's format: config.json + model.safetensors (or shards listed in an index)."""
    from safetensors.torch import load_file
    args = args_from_hf_config(json.loads((folder / "config.json").read_text()), max_seq_len)
    hf = {}
    for file in sorted(folder.glob("*.safetensors")):
        hf.update(load_file(file))
    if args.tie_embeddings or "lm_head.weight" not in hf:
        args = replace(args, tie_embeddings=True)
        hf.pop("lm_head.weight", None)
    state_dict = {}
    with torch.device("meta"):
        names = Transformer(args).state_dict().keys()
    for ours in names:
        theirs = _hf_name(ours)
        if theirs not in hf:
            continue  # reported by the check below, with everything else that is wrong
        w = hf.pop(theirs)
        if ours.endswith("attention.wq.weight"):
            w = _hf_unpermute(w, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            w = _hf_unpermute(w, args.n_kv_heads)
        state_dict[ours] = w
    state_dict.update({f"hf:{k}": v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")})  # leftovers
    return model_from_state_dict(args, state_dict, f"Hugging Face checkpoint {folder}")


def load_checkpoint(path, max_seq_len=None, mmap=True):
    """Model and args from: one of our checkpoint files (.pt), a folder with our `model.pt`, a Meta
    folder (params.json + consolidated.*.pth) or a Hugging Face folder (config.json + *.safetensors).
    With `mmap` our files are memory-mapped (fast, light loading for inference); trainers pass
    mmap=False to get ordinary tensors they will write to at every step."""
    path = Path(path)
    if path.is_dir() and (path / "model.pt").is_file():
        path = path / "model.pt"
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
            raise tok.UserError(f"{path} is not a checkpoint of this project (expected a dict with 'model' and 'args')")
        known = {f.name for f in fields(ModelArgs)}
        args = ModelArgs(**{k: v for k, v in ckpt["args"].items() if k in known})
        if max_seq_len:
            args = replace(args, max_seq_len=max_seq_len)
        model = model_from_state_dict(args, ckpt["model"], f"checkpoint {path}")
        return model, model.args
    if (path / "params.json").is_file():
        model = load_meta(path, max_seq_len or 8192)
    elif (path / "config.json").is_file():
        model = load_hf(path, max_seq_len)
    else:
        raise tok.UserError(f"{path}: expected a .pt checkpoint, a folder with model.pt, a Meta folder "
                                f"(params.json + consolidated.*.pth) or a Hugging Face folder (config.json + *.safetensors)")
    return model, model.args


def export_hf(model, folder):
    """Write config.json + model.safetensors that transformers.LlamaForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file
    args, folder = model.args, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {}
    for ours, w in model.state_dict().items():
        if ours == "output.weight" and args.tie_embeddings:
            continue  # HF re-ties lm_head to the embedding
        if ours.endswith("attention.wq.weight"):
            w = _hf_permute(w, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            w = _hf_permute(w, args.n_kv_heads)
        state_dict[_hf_name(ours)] = w.detach().contiguous()
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scale_factor, low_freq_factor=args.rope_low_freq_factor,
                    high_freq_factor=args.rope_high_freq_factor, original_max_position_embeddings=args.rope_original_max_len)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
              "attention_bias": False, "mlp_bias": False, "torch_dtype": str(model.output.weight.dtype).removeprefix("torch."),
              # written both ways: transformers 4.x reads rope_theta + rope_scaling, 5.x rope_parameters
              "rope_theta": args.rope_theta, "rope_scaling": rope if args.use_scaled_rope else None,
              "rope_parameters": rope}
    tok.atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# The command line


def pick_device(name="auto"):
    """--device: "auto" picks CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise tok.UserError(f"--device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise tok.UserError("--device cuda: no CUDA device is visible to PyTorch (is the CUDA build installed?)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise tok.UserError("--device mps: Apple's MPS backend is not available here")
    return name


def autocast(device, dtype="float32"):
    """How a chapter computes on `device`, decided once in its entry point: "bfloat16" is bf16
    autocast (weights and optimizer state stay fp32; matmuls run in bf16), "float32" full precision,
    where on CUDA fp32 matmuls may use TF32 tensor cores (10-bit mantissa products, fp32 sums)."""
    device = torch.device(device)
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return contextlib.nullcontext()


def architecture_table():
    """Llama 3 §3.2 Table 3, for every preset, plus what each costs."""
    rows = [f"{'preset':<14} {'params':>9} {'layers':>6} {'dim':>6} {'FFN':>6} {'heads':>5} {'KV':>3} "
            f"{'vocab':>7} {'KV cache 8K':>11} {'128K':>8} {'GFLOP/tok':>9}"]
    for name, args in PRESETS.items():
        gib = lambda n: f"{kv_cache_bytes(args, n) / 2**30:.2f} GiB"
        rows.append(f"{name:<14} {count_params(args) / 1e9:>8.3f}B {args.n_layers:>6} {args.dim:>6} "
                    f"{args.hidden_dim:>6} {args.n_heads:>5} {args.n_kv_heads:>3} {args.vocab_size:>7} "
                    f"{gib(8192):>11} {gib(131072):>8} {flops_per_token(args, 8192) / 1e9:>9.2f}")
    return "\n".join(rows)


def main(argv=None):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a Meta or Hugging Face folder, or one of our checkpoints")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model (default: the one beside --ckpt, or runs/01_tokenizer/tokenizer.model)")
    parser.add_argument("--prompt", default="To be, or not to be,", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Llama 3 chat format")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (compiled_decoder): slower start, faster tokens")
    parser.add_argument("--seed", type=int, default=0)
    flags = parser.parse_args(argv)
    torch.manual_seed(flags.seed)
    device = pick_device(flags.device)
    if flags.ckpt is None:
        print("Llama 3 §3.2 Table 3 (KV cache in bf16 per sequence; GQA divides it by heads/KV heads)\n")
        print(architecture_table())
    model, tokenizer = model_and_tokenizer(flags.ckpt, flags.tokenizer, device)

    if tokenizer is None:
        print("(no tokenizer yet: run python 01_tokenizer.py to see text; showing ids)")
        prompt_ids, stop = [1, 2, 3], ()
    else:
        prompt_ids = (tokenizer.encode_dialog([{"role": "user", "content": flags.prompt}]) if flags.chat
                      else tokenizer.encode(flags.prompt, bos=True))
        stop = tokenizer.stop_tokens
    generator = torch.Generator(device=device).manual_seed(flags.seed)
    t0 = time.time()
    new = generate(model, [prompt_ids], flags.max_new_tokens, flags.temperature, flags.top_p, stop, generator,
                   compile=flags.compile)[0]
    seconds = time.time() - t0
    print(tokenizer.decode(new) if tokenizer else new)
    note = ", including compiling the decode step" if flags.compile else ""
    print(f"({len(new)} tokens in {seconds:.2f} s{note}, {len(new) / max(seconds, 1e-9):.0f} tokens/s on {device})")


def model_and_tokenizer(ckpt, tokenizer_path, device):
    """The checkpoint and its tokenizer; without a checkpoint, a random tiny model (with 01's
    tokenizer if there is one yet, else None)."""
    if ckpt is None:
        path = Path(tokenizer_path or "runs/01_tokenizer/tokenizer.model")
        tokenizer = Tokenizer.load(path) if path.is_file() else None
        model_args = preset("tiny", vocab_size=tokenizer.n_words if tokenizer else 8192)
        print(f"\na random tiny model ({count_params(model_args) / 1e6:.1f} M parameters):")
        return Transformer(model_args).to(device).eval(), tokenizer
    model, model_args = load_checkpoint(ckpt)
    folder = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
    candidates = [Path(tokenizer_path)] if tokenizer_path else [folder / "tokenizer.model",
                                                                folder / "original" / "tokenizer.model"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise tok.UserError(f"no tokenizer.model in {folder}: pass --tokenizer PATH")
    print(f"loaded {ckpt}: {count_params(model_args) / 1e9:.2f} B parameters")
    return model.to(device).eval(), Tokenizer.load(path)


# -----------------------------------------------------------------------------
# Optional: fast decoding. A compiled decode step (gpt-fast's recipe): read this after the rest.


class CompiledDecoder:
    """decode_step(model, ...) compiled for one-token steps (gpt-fast's recipe).

    A decode step of a small model is ~30 small matrix products and a few hundred tiny element-wise
    ops; eager PyTorch spends most of it in per-op dispatch and in MKL calls tuned for big matrices.
    On CPU inductor freezes the weights (treats them as constants: pre-packed, and wq|wk|wv and
    w1|w3 concatenated into one GEMM each), fuses the element-wise ops into a few C++ loops, and with
    max_autotune times its own C++ GEMM kernels for these exact shapes against MKL; cpp_wrapper
    calls them from C++ instead of Python. The first call for a shape compiles (15-60 s on 2 cores).
    On CUDA the step is recorded as a CUDA graph, which removes the launch cost of every kernel."""

    def __init__(self, model):
        self.device_type = model.tok_embeddings.weight.device.type
        # on CUDA the options go to torch.compile itself, so any recompile keeps its CUDA graphs
        cuda_options = {"triton.cudagraphs": True} if self.device_type == "cuda" else None
        self.compiled = torch.compile(functools.partial(decode_step, model), fullgraph=True, dynamic=False,
                                      options=cuda_options)
        self.shapes_compiled = set()

    def __call__(self, tokens, doc_ids, cache):
        shape = (tuple(tokens.shape), cache.shape)
        if shape in self.shapes_compiled:  # compiled already: the options below are only read while compiling
            return self.compiled(tokens, doc_ids, cache)
        with torch._inductor.config.patch(self.inductor_options(batch=tokens.shape[0])):
            try:
                out = self.compiled(tokens, doc_ids, cache)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                raise tok.UserError(f"compiling the decode step failed on {self.device_type} (inductor needs a C++ "
                                   f"compiler on CPU, Triton on CUDA): {str(e).splitlines()[0]}\n"
                                   f"Generate without compile (drop --compile) instead.") from e
        self.shapes_compiled.add(shape)
        return out

    def inductor_options(self, batch):
        if self.device_type != "cpu":
            return {}
        options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                   "cpp.enable_concat_linear": True, "cpp_wrapper": True,
                   "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        if batch <= 8:
            # Each GEMM of a decode step has `batch` rows. Inductor's C++ GEMM splits K so that a block
            # of weights stays in L1 while it serves several register blocks of rows; up to 8 rows fill
            # one AVX-512 register block, so every weight is used once and the split only adds partial
            # sums to write and re-read: take all of K in one block instead.
            options["cpp.gemm_cache_blocking"] = f"1,1,{2 ** 20}"  # capped at K by inductor
        return options


def compiled_decoder(model):
    """The model's CompiledDecoder, built once and kept on the model. Frozen weights go stale if the
    model changes, so it is cached together with each parameter's identity, version counter (bumped
    by every in-place update such as an optimizer step or load_state_dict) and storage address (new
    after model.to(dtype or device), which keeps the parameter objects): any change compiles afresh.
    (Writes through p.data bump no counter.)"""
    fingerprint = tuple((id(p), p._version, p.data_ptr()) for p in model.parameters())
    cached = getattr(model, "_compiled_decoder", None)
    if cached is None or cached[0] != fingerprint:
        cached = (fingerprint, CompiledDecoder(model))
        model._compiled_decoder = cached
    return cached[1]


def cache_slots_for_compile(n):
    """n rounded up to 128, 192, 256, 384, 512, 768, ...: two sizes per doubling. Each size is one
    compile of the decode step; attention reads every slot, so sizes a power of two apart would
    leave up to half of them empty."""
    size = 128
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 128 -> 192 -> 256 -> 384
    return size


if __name__ == "__main__":
    tok.run_main(main)
