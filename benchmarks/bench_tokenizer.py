"""BPE training speed: 01_tokenizer.train_bpe (pure Python) vs Hugging Face `tokenizers` (Rust), same
10 MB of the default corpus, same Llama 3 regex, same number of BPE ranks. Targets (issue #2): ours
in <= 20 s and within 5x of HF on 2 cores. Also encoding speed: pure Python vs tiktoken.

    python benchmarks/bench_tokenizer.py [--chars 10000000] [--n-bpe 8192]
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
tok = importlib.import_module("01_tokenizer")


def train_hf(texts, n_bpe):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf.get_vocab_size()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chars", type=int, default=10_000_000)
    parser.add_argument("--n-bpe", type=int, default=8192, help="BPE ranks (the 256 special tokens come on top)")
    args = parser.parse_args()
    train_docs, val_docs = tok.split_documents(tok.load_corpus())
    texts = tok.sample_text(train_docs, args.chars)
    print(f"training text: {sum(map(len, texts)):,} characters of the default corpus, {args.n_bpe:,} BPE ranks")

    t0 = time.perf_counter()
    ranks = tok.train_bpe(texts, args.n_bpe)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_size = train_hf(texts, args.n_bpe)
    hf = time.perf_counter() - t0
    print(f"{'trainer':<34} {'seconds':>8} {'ranks':>7}")
    print(f"{'01_tokenizer.train_bpe (Python)':<34} {ours:>8.1f} {len(ranks):>7}")
    print(f"{'HF tokenizers BpeTrainer (Rust)':<34} {hf:>8.1f} {hf_size:>7}")
    print(f"ratio ours/HF: {ours / hf:.1f}x   (target <= 5x: {'PASS' if ours / hf <= 5 else 'FAIL'}; "
          f"ours <= 20 s: {'PASS' if ours <= 20 else 'FAIL'})")

    tokenizer = tok.Tokenizer(ranks)
    held = "".join(d.text for d in val_docs)[:2_000_000]
    t0 = time.perf_counter()
    n = len(tokenizer.encode_python(held))
    py = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer.encode(held)
    tk = time.perf_counter() - t0
    print(f"encoding {len(held):,} held-out characters ({n:,} tokens): pure Python {n / py:,.0f} tokens/s, "
          f"tiktoken {n / tk:,.0f} tokens/s ({py / tk:.0f}x)")


if __name__ == "__main__":
    main()
