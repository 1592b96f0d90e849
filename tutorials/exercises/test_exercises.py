"""The checks: each exercise against its chapter's own implementation on random inputs, and against
cases worked by hand. Run them with `pytest tutorials/exercises` (one: add `-k rmsnorm`)."""
import math
from types import SimpleNamespace

import torch

from checking import chapter, expect, expect_close, student


def test_rmsnorm():
    rms_norm = student("ex01_rmsnorm", "rms_norm")
    hint = "divide by sqrt(mean of squares over the LAST dimension + eps) (no mean subtracted), then multiply by weight"
    got = rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), eps=0.0)  # mean of squares 12.5
    expect_close(got, [[3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]], "rms_norm([[3, 4]], eps=0)", hint)
    torch.manual_seed(0)
    for shape in [(5, 8), (2, 3, 16)]:
        x, weight = torch.randn(shape), torch.rand(shape[-1]) + 0.5
        norm = chapter("02_model").RMSNorm(shape[-1], eps=1e-2)
        norm.weight.data = weight
        expect_close(rms_norm(x, weight, eps=1e-2), norm(x).detach(), f"rms_norm on random {shape}, eps=1e-2", hint)


def test_rope():
    rotate_pairs = student("ex02_rope", "rotate_pairs")
    hint = "pairs are ADJACENT features (x[:, 0::2], x[:, 1::2]); rotate (x0, x1) to (x0 cos - x1 sin, x0 sin + x1 cos)"
    got = rotate_pairs(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), torch.tensor([[math.pi / 2, math.pi]]))
    expect_close(got, [[0.0, 1.0, 0.0, -2.0]], "rotating (1, 0) by π/2 and (0, 2) by π", hint)
    torch.manual_seed(1)
    x, angles = torch.randn(7, 16), torch.rand(7, 8) * 10
    want = chapter("02_model").apply_rope(x[None, :, None, :], angles.cos(), angles.sin())[0, :, 0]
    expect_close(rotate_pairs(x, angles), want, "rotate_pairs on random (7, 16)", hint)
    expect_close(rotate_pairs(x, angles).norm(dim=-1), x.norm(dim=-1), "a rotation keeps each vector's length", hint)

    scale = student("ex02_rope", "llama31_frequencies")
    hint = ("wavelength = 2π / freq; keep freq below original_len / high_freq_factor, divide by factor above "
            "original_len / low_freq_factor, blend in between with smooth = (original_len / wavelength - low) / (high - low)")
    by_wavelength = torch.tensor([2 * math.pi / 1000, 2 * math.pi / 4096, 2 * math.pi / 10000])
    want = by_wavelength * torch.tensor([1.0, 5 / 12, 1 / 8])
    expect_close(scale(by_wavelength.clone()), want, "wavelengths 1000 (kept), 4096 (smooth 1/3: × 5/12) and 10000 (÷ 8)",
                 hint, atol=0, rtol=1e-4)
    model = chapter("02_model")
    args = model.ModelArgs(dim=256, n_heads=2, n_kv_heads=2, rope_theta=500_000.0, use_scaled_rope=False)
    plain = model.rope_frequencies(args)
    args.use_scaled_rope = True
    expect_close(scale(plain.clone()), model.rope_frequencies(args), "the frequencies of a 128-dim head, θ = 500,000",
                 hint, atol=0, rtol=1e-4)  # atol 0: the slowest pairs turn by only ~1e-6 radians a position


def test_gqa():
    repeat_kv = student("ex03_gqa", "repeat_kv")
    hint = "each KV head serves CONSECUTIVE query heads: [h0, h0, h1, h1], not [h0, h1, h0, h1] (repeat_interleave, not repeat)"
    x = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)  # (B=1, Hkv=2, T=1, Dh=1)
    expect_close(repeat_kv(x, 2).flatten(), [1.0, 1.0, 2.0, 2.0], "KV heads [1, 2] repeated twice", hint)
    torch.manual_seed(2)
    for n_rep in (1, 3, 4):
        x = torch.randn(2, 2, 5, 4)
        expect_close(repeat_kv(x, n_rep), chapter("02_model").repeat_kv(x, n_rep), f"random (2, 2, 5, 4), n_rep={n_rep}",
                     hint)


def test_document_mask():
    mask = student("ex04_mask", "document_causal_mask")
    hint = "mask[q, k] = (k <= q) AND doc_ids[q] == doc_ids[k]; build both as (T, T) with broadcasting, keep dtype bool"
    got = mask(torch.tensor([0, 0, 1]))
    expect(torch.as_tensor(got).dtype == torch.bool, f"the mask's dtype is {torch.as_tensor(got).dtype}", hint)
    expect_close(got.int(), [[1, 0, 0], [1, 1, 0], [0, 0, 1]], "documents [0, 0, 1]", hint)
    torch.manual_seed(3)
    doc_ids = torch.randint(0, 3, (12,)).sort().values
    position = torch.arange(12)
    want = chapter("02_model").attention_mask(doc_ids[None], doc_ids[None], position, position)[0, 0]
    expect_close(mask(doc_ids).int(), want.int(), f"documents {doc_ids.tolist()}", hint)


def test_bpe():
    most_frequent_pair = student("ex05_bpe", "most_frequent_pair")
    hint = "count every adjacent pair, adding the chunk's freq each time; the max count wins, then the smallest pair"
    expect(most_frequent_pair([[1, 2], [3, 4]], [1, 5]) == (3, 4), "(3, 4) in a chunk seen 5 times, (1, 2) once", hint)
    expect(most_frequent_pair([[1, 2, 3], [1, 2]], [2, 1]) == (1, 2), "(1, 2) occurs 3 times, (2, 3) twice", hint)
    expect(most_frequent_pair([[5, 6], [3, 4]], [1, 1]) == (3, 4), "a tie between (5, 6) and (3, 4)", hint)
    expect(most_frequent_pair([[7, 7, 7]], [1]) == (7, 7), "[7, 7, 7] holds the pair (7, 7) twice", hint)
    tok = chapter("01_tokenizer")
    texts = ["the cat sat on the mat", "a hat, a bat and that cat", "thistle thatch"]
    words, freqs = tok.unique_chunks(texts)
    first = next(t for t, rank in tok.train_bpe(texts, 257).items() if rank == 256)  # 01's first merge
    left, right = most_frequent_pair(words, freqs)
    expect(bytes([left, right]) == first, f"the first merge of {texts} is {first!r}, got {bytes([left, right])!r}", hint)

    merge_pair = student("ex05_bpe", "merge_pair")
    hint = "scan left to right; after replacing a pair, skip both of its tokens: [7, 7, 7] -> [new, 7]"
    expect(merge_pair([7, 7, 7], 7, 7, 300) == [300, 7], "merging (7, 7) in [7, 7, 7]", hint)
    expect(merge_pair([1, 2, 3, 1, 2], 1, 2, 9) == [9, 3, 9], "merging (1, 2) in [1, 2, 3, 1, 2]", hint)
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        word = torch.randint(0, 3, (15,), generator=gen).tolist()
        expect(merge_pair(word, 1, 1, 9) == tok.merge_pair(word, 1, 1, 9), f"merging (1, 1) in {word}", hint)


def test_schedule():
    lr_at = student("ex06_schedule", "lr_at")
    hint = "warmup: peak·(step+1)/warmup; then progress = (step - warmup) / (steps - 1 - warmup) and the cosine formula"
    cases = {0: 0.1, 9: 1.0, 10: 1.0, 60: 0.55, 110: 0.1}  # peak 1, warmup 10, 111 steps, floor 0.1
    for step, want in cases.items():
        expect_close(lr_at(step, 1.0, 10, 111, 0.1), want, f"step {step} (peak 1, warmup 10, 111 steps)", hint)
    cfg = SimpleNamespace(lr=3e-4, warmup=25, steps=400, min_lr_ratio=0.05)
    for step in range(0, 400, 7):
        expect_close(lr_at(step, 3e-4, 25, 400, 0.05), chapter("03_pretrain").lr_at(step, cfg),
                     f"step {step} of 400 (peak 3e-4, warmup 25, floor 0.05)", hint, atol=1e-12)


def test_sft_mask():
    sft_example = student("ex07_sft_mask", "sft_example")
    hint = "BOS (mask 0); for each message its header (mask 0) then content + <|eot_id|> (mask 1 only for the assistant)"
    tok = chapter("01_tokenizer")
    tokenizer = tok.Tokenizer.train(["Hello there! How are you today? I am fine, thank you."] * 4, vocab_size=600)
    dialog = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "I am fine."}]
    ids, mask = sft_example(tokenizer, dialog)
    expect(len(ids) == len(mask), f"{len(ids)} ids but {len(mask)} mask values", hint)
    learned = [i for i, m in zip(ids, mask) if m]
    expect(learned == tokenizer.encode("I am fine.") + [tokenizer.special_tokens["<|eot_id|>"]],
           f"the learned tokens are {tokenizer.decode(learned)!r}: expected the answer and its <|eot_id|>", hint)
    expect(ids[0] == tokenizer.bos_id and mask[0] == 0, "the sequence starts with <|begin_of_text|>, not learned", hint)
    render = chapter("06_reward_model").render
    for messages in [dialog, [{"role": "system", "content": "Be brief."}, *dialog,
                              {"role": "user", "content": "Thank you."}, {"role": "assistant", "content": "Hello."}]]:
        got = sft_example(tokenizer, messages)
        expect(tuple(map(list, got)) == render(tokenizer, messages),
               f"a {len(messages)}-message dialog differs from 06's render", hint)


def test_reward_loss():
    reward_loss = student("ex08_reward_loss", "reward_loss")
    hint = "-logsigmoid(better - worse), summed over pairs; F.logsigmoid stays finite where log(sigmoid(...)) gives -inf"
    expect_close(reward_loss(torch.zeros(3), torch.zeros(3)), 3 * math.log(2), "three tied pairs: 3·log 2", hint)
    expect_close(reward_loss(torch.tensor([0.0]), torch.tensor([100.0])), 100.0, "a margin of -100", hint, rtol=1e-4)
    expect_close(reward_loss(torch.tensor([100.0]), torch.tensor([0.0])), 0.0, "a margin of +100", hint)
    torch.manual_seed(5)
    better, worse = torch.randn(16) * 3, torch.randn(16) * 3
    expect_close(reward_loss(better, worse), chapter("06_reward_model").reward_loss(better, worse), "16 random pairs", hint)


def test_dpo_loss():
    dpo_loss = student("ex09_dpo_loss", "dpo_loss")
    hint = ("margin = (π_c - ref_c) - (π_r - ref_r); loss = -logsigmoid(β·margin) per pair (no sum, no mean), "
            "+ nll_weight·chosen_nll when it is given")
    same = torch.full((2,), -5.0)
    expect_close(dpo_loss(same, same, same, same), [math.log(2)] * 2, "policy = reference: log 2 per pair", hint)
    expect_close(dpo_loss(same + 10, same, same, same), [math.log1p(math.exp(-1))] * 2, "chosen +10 nats, β 0.1", hint)
    expect_close(dpo_loss(same, same, same, same, chosen_nll=torch.tensor([1.5, 0.0])),
                 [math.log(2) + 0.3, math.log(2)], "with the chosen NLL 1.5 and 0, weight 0.2", hint)
    expect_close(dpo_loss(same, same + 2000, same, same), [200.0, 200.0], "a margin of -2000 (β·margin = -200)", hint,
                 rtol=1e-4)
    torch.manual_seed(6)
    logps = [-torch.rand(8) * 50 for _ in range(4)]
    nll = torch.rand(8) * 3
    want = chapter("08_dpo").dpo_loss(*logps, beta=0.3, chosen_nll=nll, nll_weight=0.2)
    expect_close(dpo_loss(*logps, beta=0.3, chosen_nll=nll), want, "8 random pairs, β 0.3, with the NLL term", hint)


TOOL_CALLS = [
    '<|python_tag|>brave_search.call(query="weather in Menlo Park")',
    "<|python_tag|>wolfram_alpha.call(query='solve x^3 - 4x^2 + 6x - 24 = 0')",
    '<|python_tag|>brave_search.call(query="it\'s \\"quoted\\"")',
    '<function=trending_songs>{"n": "5", "country": "US"}</function>',
    '<function=get_weather>{"place": {"city": "Paris", "days": [1, 2]}}</function>',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lagos"}}',
    "<|python_tag|>print(sum(range(10)))",
    "<|python_tag|>def f(x):\n    return x * 2\nf(21)",
    "The capital of France is Paris.",
    "Sure: 2 + 2 = 4.",
]
BROKEN_CALLS = ['<function=get_weather>{"city": "Paris"}', "<function=get_weather>city=Paris</function>",
                "<function=get_weather>[1, 2]</function>"]


def test_tool_call():
    parse = student("ex10_tool_call", "parse_tool_call")
    tools = chapter("09_tools")
    hint = ("strip <|python_tag|>; NAME.call(...) -> parse with ast, keywords -> dict; <function=NAME>JSON</function> "
            "and {\"name\", \"parameters\"} -> json.loads; other tagged text is code; untagged text is a final answer")
    got = parse(TOOL_CALLS[0])
    expect(got == ("brave_search", {"query": "weather in Menlo Park"}), f"{TOOL_CALLS[0]!r} -> {got!r}", hint)
    expect(parse(TOOL_CALLS[-1]) is None, f"{TOOL_CALLS[-1]!r} is a final answer: expected None", hint)
    for text in TOOL_CALLS:
        want = tools.parse_tool_call(text, custom_tools=("trending_songs", "get_weather"))
        want = (want.name, want.arguments) if isinstance(want, tools.Call) else None
        expect(parse(text) == want, f"{text!r} -> {parse(text)!r}, expected {want!r}", hint)
    for text in BROKEN_CALLS:
        assert isinstance(tools.parse_tool_call(text, custom_tools=("get_weather",)), tools.Malformed)
        try:
            got = parse(text)
        except ValueError:
            continue
        expect(False, f"{text!r} is a broken call: expected ValueError, got {got!r}", hint)
