"""02_model.py against Hugging Face LlamaForCausalLM, closed-form values and its own slow paths."""
import importlib
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import reference

m = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")


def tiny(**overrides):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=128)
    return m.ModelArgs(**{**base, **overrides})


def random_model(args, seed=0):
    torch.manual_seed(seed)
    model = m.Transformer(args).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm placement would show, and logits of
        for p in model.parameters():  # order 10 rather than 1 so a tolerance of 1e-5 means something
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.mul_(5)
    return model


# --- shapes and presets ------------------------------------------------------------------------

def test_ffn_width_is_derived_as_meta_does():
    assert [m.PRESETS[n].hidden_dim for n in ("llama3_8b", "llama3_70b", "llama3_405b")] == [14336, 28672, 53248]
    assert m.PRESETS["llama3.2_1b"].hidden_dim == 8192 and m.PRESETS["llama3.2_3b"].hidden_dim == 8192


def test_parameter_counts_of_the_real_models():
    # Meta's published sizes: 8.03B, 70.6B, 405B; Llama 3.2: 1.24B and 3.21B (tied embeddings)
    assert m.count_params(m.PRESETS["llama3_8b"]) == 8_030_261_248
    assert m.count_params(m.PRESETS["llama3_70b"]) == 70_553_706_496
    assert m.count_params(m.PRESETS["llama3_405b"]) == 405_853_388_800
    assert m.count_params(m.PRESETS["llama3.2_1b"]) == 1_235_814_400
    assert m.count_params(m.PRESETS["llama3.2_3b"]) == 3_212_749_824


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=100, n_heads=8), "divisible by n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=24, n_heads=8, n_kv_heads=8), "must be even"),
    (dict(attn_impl="fast"), "attn_impl"),
])
def test_invalid_shapes_fail_at_construction(kwargs, message):
    with pytest.raises(tok.UserError, match=message):
        m.ModelArgs(**kwargs)


def test_unknown_preset():
    with pytest.raises(tok.UserError, match="unknown preset 'llama4'"):
        m.preset("llama4")


def test_kv_cache_bytes_and_flops_closed_form():
    args = m.PRESETS["llama3_8b"]
    # 2 (K and V) · 32 layers · 8 KV heads · 128 dims · 131,072 positions · 2 bytes = 16 GiB
    assert m.kv_cache_bytes(args, 131_072) == 16 * 2**30
    assert m.kv_cache_bytes(replace(args, n_kv_heads=32), 131_072) == 4 * m.kv_cache_bytes(args, 131_072)
    n = 8_030_261_248 - 128_256 * 4096  # all but the input embedding
    assert m.flops_per_token(args, 8192) == 6 * n + 12 * 32 * 32 * 128 * 8192


# --- RoPE -----------------------------------------------------------------------------------------

def test_llama31_rope_scaling_bands():
    args = replace(m.PRESETS["llama3.1_8b"])
    base, scaled = m.rope_frequencies(replace(args, use_scaled_rope=False)), m.rope_frequencies(args)
    kept = torch.isclose(scaled, base)
    divided = torch.isclose(scaled, base / 8)
    # PAPER.md §5 (derived): head_dim 128, θ = 5e5 -> 29 kept, 6 interpolated, 29 divided by 8
    assert kept.sum() == 29 and divided.sum() == 29 and (~kept & ~divided).sum() == 6
    assert kept[:29].all() and divided[35:].all()


def test_rope_scores_depend_only_on_relative_position():
    args = tiny(n_heads=1, n_kv_heads=1, dim=16)
    cos, sin = m.rope_cos_sin(args)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(i, j):
        return (m.apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * m.apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()
    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
    # the closed form: Re sum_i q_i conj(k_i) e^(j (m - n) f_i), with q_i = q[2i] + j q[2i+1]. A rotation
    # the wrong way (e^-j...) would still depend only on m - n; this pins its direction.
    qc, kc = torch.view_as_complex(q.view(8, 2)), torch.view_as_complex(k.view(8, 2))
    closed = lambda d: (qc * kc.conj() * torch.polar(torch.ones(8), d * m.rope_frequencies(args))).real.sum()
    assert torch.allclose(score(5, 2), closed(3), atol=1e-5) and torch.allclose(score(2, 5), closed(-3), atol=1e-5)


def test_rope_matches_complex_multiplication():
    """Meta's reference multiplies (x[2i] + j·x[2i+1]) by e^(j·pos·freq) with complex tensors."""
    args = tiny()
    x = torch.randn(2, 10, 4, args.head_dim)
    angles = torch.outer(torch.arange(10).float(), m.rope_frequencies(args))
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    cos, sin = m.rope_cos_sin(args)
    assert torch.allclose(m.apply_rope(x, cos[:10], sin[:10]), expected, atol=1e-6)


# --- attention paths and the document mask --------------------------------------------------------

def doc_ids_for(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def test_sdpa_and_math_paths_agree_with_and_without_document_mask():
    args = tiny()
    model = random_model(args)
    math_model = m.Transformer(replace(args, attn_impl="math")).eval()
    math_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 300, (3, 40))
    doc_ids = doc_ids_for([10, 25, 5]).expand(3, -1)
    with torch.no_grad():
        assert torch.allclose(model(tokens), math_model(tokens), atol=1e-5)
        assert torch.allclose(model(tokens, doc_ids=doc_ids), math_model(tokens, doc_ids=doc_ids), atol=1e-5)


def test_document_mask_isolates_documents():
    model = random_model(tiny())
    tokens = torch.randint(0, 300, (1, 48))
    doc_ids = doc_ids_for([20, 28])
    changed = tokens.clone()
    changed[0, :20] = torch.randint(0, 300, (20,))  # rewrite document 0 entirely
    with torch.no_grad():
        a, b = model(tokens, doc_ids=doc_ids), model(changed, doc_ids=doc_ids)
        assert torch.allclose(a[0, 20:], b[0, 20:], atol=1e-6)  # document 1 cannot see document 0
        # ... and it equals document 1 run on its own
        assert torch.allclose(a[0, 20:], model(tokens[:, 20:])[0], atol=1e-5)
        # without the mask, document 1 does see document 0 (so the test above can fail)
        assert not torch.allclose(model(tokens)[0, 20:], model(changed)[0, 20:], atol=1e-3)


def test_flex_attention_forward_matches_sdpa():
    args = tiny(max_seq_len=128)
    model = random_model(args)
    flex = m.Transformer(replace(args, attn_impl="flex")).eval()
    flex.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 300, (2, 128))
    doc_ids = doc_ids_for([50, 78]).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(flex(tokens, doc_ids=doc_ids), model(tokens, doc_ids=doc_ids), atol=1e-4)


def test_gradients_flow_through_the_masked_path():
    model = m.Transformer(tiny())
    tokens = torch.randint(0, 300, (2, 32))
    loss = torch.nn.functional.cross_entropy(model(tokens, doc_ids=doc_ids_for([16, 16]).expand(2, -1)).flatten(0, 1),
                                             tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - math.log(300)) < 0.5  # a fresh model predicts roughly uniformly


def test_activation_checkpointing_gives_the_same_gradients():
    model = random_model(tiny())
    model.train()
    tokens = torch.randint(0, 300, (2, 24))
    doc_ids = doc_ids_for([10, 14]).expand(2, -1)
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        model(tokens, doc_ids=doc_ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# --- KV cache and generation ----------------------------------------------------------------------

def naive_greedy(model, prompt, n):
    """Recompute the whole sequence for every new token: no cache, no padding."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]


def test_cached_generation_equals_uncached_recomputation_for_a_ragged_batch():
    model = random_model(tiny())
    prompts = [[5, 17, 42, 9, 100, 7, 3], [250], [11, 12, 13]]
    with torch.no_grad():
        batched = m.generate(model, prompts, max_new_tokens=20)
        for prompt, out in zip(prompts, batched):
            assert out == naive_greedy(model, prompt, 20)
            assert m.generate(model, [prompt], max_new_tokens=20)[0] == out


def test_kv_cache_decode_logits_equal_the_full_forwards():
    """Prefill 7 tokens, then feed 5 more one at a time through the cache: each step's logits are the
    full forward's at that position (a wrong cache position or mask would move them)."""
    model = random_model(tiny())
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = m.KVCache(model.args, 2, 16)
        steps = [model(tokens[:, :7], cache=cache)]
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-5)


def test_samples_that_share_a_prompts_cache_equal_samples_from_copies_of_the_prompt():
    """num_samples=K encodes each prompt once and continues K copies of its cache: the same tokens,
    greedy or sampled with the same generator, as K copies of the prompt in the batch."""
    model = random_model(tiny())
    prompts = [[5, 17, 42, 9, 100, 7, 3], [250, 11]]
    with torch.no_grad():
        shared = m.generate(model, prompts, 12, num_samples=3)
        copies = m.generate(model, [p for p in prompts for _ in range(3)], 12)
        assert shared == copies and shared[0] == shared[1] == shared[2] != shared[3]
        sampled = m.generate(model, prompts, 12, 1.0, 1.0, generator=torch.Generator().manual_seed(0), num_samples=3)
        copied = m.generate(model, [p for p in prompts for _ in range(3)], 12, 1.0, 1.0,
                            generator=torch.Generator().manual_seed(0))
    assert sampled == copied and len({tuple(s) for s in sampled[:3]}) > 1  # samples differ from each other
    seen = []
    m.generate(model, prompts, 5, on_token=lambda row, token: seen.append((row, token)))
    assert [t for r, t in seen if r == 0] == m.generate(model, prompts, 5)[0]  # streamed as made


def test_last_only_logits_are_the_last_position_of_the_full_forward():
    model = random_model(tiny())
    tokens = torch.randint(0, model.args.vocab_size, (3, 11))
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11, [-1] * 5 + [0] * 6])
    with torch.no_grad():
        full = model(tokens, doc_ids=doc_ids)
        last = model(tokens, doc_ids=doc_ids, last_only=True)
    assert last.shape == (3, 1, model.args.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])  # fp32 tolerances: a GEMM over fewer rows may round differently


def test_kv_cache_refuses_positions_it_does_not_hold():
    model = random_model(tiny())
    cache = m.KVCache(model.args, 1, 8)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 positions; 10 needed"):
        model(torch.ones(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        m.KVCache(model.args, 1, 129)


def test_compiled_decoder_is_rebuilt_when_the_weights_change():
    model = random_model(tiny())
    first = m.compiled_decoder(model)  # compiling is lazy: nothing is compiled until a call
    assert m.compiled_decoder(model) is first
    with torch.no_grad():
        model.output.weight.mul_(2)  # as an optimizer step would: the frozen copy is stale now
    second = m.compiled_decoder(model)
    assert second is not first and m.compiled_decoder(model) is second
    model.load_state_dict(random_model(tiny(), seed=1).state_dict())
    third = m.compiled_decoder(model)
    assert third is not second
    model.to(torch.float64)  # same parameter objects and version counters, new storage
    assert m.compiled_decoder(model) is not third


def test_compiled_generation_equals_eager_and_compiles_once_per_batch_size():
    """The compiled decode step (frozen weights, inductor's own GEMMs) gives the same greedy tokens
    as eager, for a ragged batch; a second call with other lengths reuses the compiled step."""
    torch._dynamo.reset()
    model = random_model(tiny())
    prompts = [[5, 17, 42, 9, 100, 7, 3], [250], [11, 12, 13]]
    compiled = m.generate(model, prompts, 20, compile=True)
    assert greedy_up_to_ties(model, prompts, compiled)
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other = [[1, 2, 3, 4], [9, 8], [7]]  # cache length 128 for both calls (max_seq_len caps the rounding)
    assert greedy_up_to_ties(model, other, m.generate(model, other, 30, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs


def greedy_up_to_ties(model, prompts, generated, tie=1e-4):
    """Every generated token is the eager model's argmax at its position, or within `tie` of it: the
    compiled step's autotuning times GEMM kernels and may pick one that rounds differently, which
    may flip an exact near-tie but nothing else."""
    with torch.no_grad():
        for prompt, new in zip(prompts, generated):
            logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1]  # (len(new), V)
            if not (logits.gather(1, torch.tensor(new)[:, None])[:, 0] >= logits.max(-1).values - tie).all():
                return False
    return True


def test_compiled_cache_sizes_are_two_per_doubling():
    sizes = [m.cache_slots_for_compile(n) for n in (1, 128, 129, 160, 192, 193, 257, 385, 600, 1000)]
    assert sizes == [128, 128, 192, 192, 192, 256, 384, 512, 768, 1024]


def test_compiled_generation_without_a_compiler_says_what_to_do():
    model = random_model(tiny())
    no_compiler = {"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}  # no cached kernels either
    with torch._inductor.config.patch(no_compiler), pytest.raises(tok.UserError, match="drop --compile"):
        m.generate(model, [[1, 2, 3]], 5, compile=True)


def test_generation_stops_on_stop_tokens():
    """Each row of a batch ends before its own first stop token. The stop tokens are chosen to occur
    in both rows' free generations, at different places, so that a row ignoring them would show."""
    model = random_model(tiny())
    prompts = [[1, 2, 3], [4, 5]]
    free = [m.generate(model, [p], max_new_tokens=20)[0] for p in prompts]
    stops = [free[0][4], free[1][8]]  # one from each row, wherever they first appear in either
    expected = [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in free]
    assert all(0 < len(e) < 20 for e in expected), "pick other prompts: a row never meets a stop token"
    assert [m.generate(model, [p], max_new_tokens=20, stop_tokens=stops)[0] for p in prompts] == expected
    assert m.generate(model, prompts, max_new_tokens=20, stop_tokens=stops) == expected


def test_sampling_temperature_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    # top_p so small that only the most likely token is left: sampling is greedy
    assert all(m.sample_next(logits, 1.0, 0.01, gen).item() == 0 for _ in range(20))
    # top_p = 0.8 keeps tokens 0 and 1 (p = 0.61, 0.22: 0.61 < 0.8 <= 0.83) and never samples 2 or 3
    draws = torch.cat([m.sample_next(logits, 1.0, 0.8, gen) for _ in range(400)])
    assert set(draws.tolist()) == {0, 1}
    freq0 = (draws == 0).float().mean().item()
    assert abs(freq0 - 0.61 / (0.61 + 0.22)) < 0.07
    # temperature: frequencies follow softmax(logits / T); 4,000 draws, tolerance 4 standard deviations
    for temperature in (0.5, 2.0):
        draws = m.sample_next(logits.expand(4000, -1), temperature, 1.0, torch.Generator().manual_seed(1))
        expected = torch.softmax(logits[0] / temperature, -1)
        observed = torch.bincount(draws, minlength=4).float() / 4000
        assert ((observed - expected).abs() <= 4 * (expected * (1 - expected) / 4000).sqrt() + 1e-3).all(), temperature
    # same seed, same samples
    a = m.sample_next(logits.expand(50, -1), 1.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, m.sample_next(logits.expand(50, -1), 1.0, 1.0, torch.Generator().manual_seed(3)))


def test_generation_refuses_too_long_requests():
    model = random_model(tiny(max_seq_len=16))
    with pytest.raises(tok.UserError, match="exceed max_seq_len=16"):
        m.generate(model, [[1] * 10], max_new_tokens=10)


# --- Hugging Face parity --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    """The reference implementation: only the tests that compare with it skip (or, in CI, fail) without it."""
    return reference("transformers")


HF_ARGS = tiny(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=256, ffn_hidden_dim=96,
               use_scaled_rope=True, rope_original_max_len=32, norm_eps=1e-5)


def hf_reference(transformers, args=HF_ARGS, seed=1):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        rope_scaling={"rope_type": "llama3", "factor": args.rope_scale_factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": args.rope_original_max_len},
        tie_word_embeddings=args.tie_embeddings, attn_implementation="eager", initializer_range=0.1)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def test_export_hf_then_transformers_gives_the_same_logits(tmp_path, transformers):
    model = random_model(HF_ARGS)
    m.export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, 300, (2, 100))  # 100 > original_max_position_embeddings (32): scaling matters
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_load_hf_checkpoint_gives_the_same_logits_and_greedy_tokens(tmp_path, transformers):
    hf = hf_reference(transformers)
    hf.save_pretrained(tmp_path)
    model, args = m.load_checkpoint(tmp_path)
    assert args.n_kv_heads == 2 and args.use_scaled_rope and args.rope_original_max_len == 32
    tokens = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-5
        prompt = tokens[:1, :40]
        expected = hf.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30,
                               eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    assert m.generate(model, [prompt[0].tolist()], max_new_tokens=30)[0] == expected


def test_hf_transformers4_config_and_tied_embeddings(tmp_path, transformers):
    args = replace(HF_ARGS, tie_embeddings=True, use_scaled_rope=False)
    model = random_model(args)
    m.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]  # what transformers 4.x writes: rope_theta (+ rope_scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, loaded_args = m.load_checkpoint(tmp_path)
    assert loaded_args.tie_embeddings and not loaded_args.use_scaled_rope
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), model(tokens), atol=1e-6)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-5


def test_llama31_scaling_in_the_blend_band_matches_hf_past_the_original_length(tmp_path, transformers):
    """Head dim 64 and an original length of 64: RoPE pairs 3, 4 and 5 have wavelengths (21, 32, 49)
    inside the blended band [64/4, 64/1], so their frequencies are neither kept nor divided by the
    factor. Checked against the closed form and against HF's logits at positions up to 200."""
    args = replace(HF_ARGS, dim=256, n_heads=4, n_kv_heads=2, rope_original_max_len=64, ffn_hidden_dim=128)
    base = 1.0 / (args.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    wavelength = 2 * math.pi / base
    band = (wavelength >= 64 / 4) & (wavelength <= 64)
    assert band.nonzero().flatten().tolist() == [3, 4, 5]
    smooth = (64 / wavelength - 1) / (4 - 1)  # 0 at the long end of the band, 1 at the short end
    expected = torch.where(wavelength < 16, base, torch.where(wavelength > 64, base / 8,
                                                              (1 - smooth) * base / 8 + smooth * base))
    ours = m.rope_frequencies(args)
    assert torch.allclose(ours.double(), expected, rtol=1e-6)
    assert not torch.allclose(ours[3:6].double(), base[3:6]) and not torch.allclose(ours[3:6].double(), base[3:6] / 8)
    hf = hf_reference(transformers, args)
    hf.save_pretrained(tmp_path)
    model, _ = m.load_checkpoint(tmp_path)
    tokens = torch.randint(0, 300, (2, 200))
    with torch.no_grad():  # fp32 rounding at this width: ~1e-4; the blend weights swapped: ~8
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-3


# --- Meta checkpoints and ours --------------------------------------------------------------------

def write_meta_checkpoint(model, folder, n_shards):
    """Split the state dict into model-parallel shards the way fairscale's layers split them."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{} for _ in range(n_shards)]
    for key, w in model.state_dict().items():
        dim = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}.get(key.split(".")[-2])
        for i, part in enumerate([w] * n_shards if dim is None else w.chunk(n_shards, dim=dim)):
            shards[i][key] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    a = model.args
    (folder / "params.json").write_text(json.dumps({
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "ffn_dim_multiplier": a.ffn_dim_multiplier,
        "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope}))


def test_meta_checkpoint_with_two_shards(tmp_path):
    args = tiny(multiple_of=32, ffn_dim_multiplier=1.3, vocab_size=320, use_scaled_rope=True)
    model = random_model(args)
    write_meta_checkpoint(model, tmp_path, n_shards=2)
    loaded, loaded_args = m.load_checkpoint(tmp_path)
    assert loaded_args.hidden_dim == args.hidden_dim and loaded_args.use_scaled_rope
    tokens = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_our_checkpoint_round_trip_is_atomic(tmp_path):
    model = random_model(tiny())
    m.save_checkpoint(tmp_path / "model.pt", model, step=7)
    assert not list(tmp_path.glob("*.tmp"))
    loaded, args = m.load_checkpoint(tmp_path)
    assert args == model.args
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 7


def test_mismatched_checkpoints_list_every_problem(tmp_path):
    model = random_model(tiny())
    state = model.state_dict()
    del state["layers.0.attention.wq.weight"]
    state["layers.9.extra.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.ones(65)
    torch.save({"model": state, "args": vars(model.args)}, tmp_path / "bad.pt")
    with pytest.raises(tok.UserError) as error:
        m.load_checkpoint(tmp_path / "bad.pt")
    text = str(error.value)
    assert "3 problems" in text and "missing: layers.0.attention.wq.weight" in text
    assert "unexpected: layers.9.extra.weight" in text and "shape of norm.weight: checkpoint (65,)" in text


def test_config_that_does_not_match_the_weights(tmp_path):
    m.export_hf(random_model(HF_ARGS), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(tok.UserError, match=r"missing: layers.2.attention.wq.weight(.|\n)*shape of layers.0.feed_forward.w1.weight"):
        m.load_checkpoint(tmp_path)


def test_load_checkpoint_rejects_unknown_paths(tmp_path):
    with pytest.raises(tok.UserError, match="Meta folder"):
        m.load_checkpoint(tmp_path)
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(tok.UserError, match="not a checkpoint of this project"):
        m.load_checkpoint(tmp_path / "x.pt")


def test_main_prints_table_and_generates(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m.main(["--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "llama3_405b" in out and "53248" in out and "tokens/s" in out


def test_main_generates_from_a_checkpoint_folder(capsys, tmp_path):
    tok = importlib.import_module("01_tokenizer")
    tokenizer = tok.Tokenizer.train(["hello world, hello there. " * 20], vocab_size=520)
    tokenizer.save(tmp_path / "tokenizer.model")
    m.export_hf(random_model(tiny(vocab_size=520)), tmp_path)
    m.main(["--ckpt", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "5", "--chat"])
    assert "loaded" in capsys.readouterr().out
