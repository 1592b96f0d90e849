"""
Chapter 3: pretraining, from a laptop CPU to FSDP on many GPUs.

Llama 3 §3.4.1 trains with AdamW, a linear warmup then cosine decay to 1% of the peak learning
rate, and a batch that grows 4M -> 8M -> 16M tokens; §3.3 shards the model with FSDP and keeps
gradient reductions in fp32. This script does the same at any size:

  data     documents (+ synthetic math) -> curation (§3.1.1: heuristic filters, line, near- and
           semantic de-duplication, a safety filter, a quality classifier) -> 01's tokenizer ->
           memory-mapped token shards per source and split, each document wrapped in
           <|begin_of_text|> ... <|end_of_text|>. Rows of seq_len tokens are cut at random places, so
           they pack several documents, and the model's document mask keeps them apart (§3.2). The
           paper's data mix (§3.1.2: 50% general, 25% math, 17% code, 8% multilingual) picks each
           row's source.
  train    AdamW, warmup + cosine, gradient clipping and accumulation to a batch counted in tokens,
           optional batch ramp, bf16 + torch.compile on GPU, FSDP2 under torchrun.
  outputs  runs/03_pretrain/: log.jsonl, loss.png, metrics.json, ckpt_NNNNNN.pt (atomic, last k kept,
           resumable bit for bit), model.pt (the final model for the next chapter), tokenizer.model.

Run it:
    python 03_pretrain.py                               # CPU: tiny model, ~4 minutes; GPU: the gpu preset
    python 03_pretrain.py --steps 20 --eval-every 10    # a smoke test
    python 03_pretrain.py --resume                      # continue the run in --out
    torchrun --standalone --nproc_per_node=8 03_pretrain.py --preset gpu     # FSDP on 8 GPUs
    python 03_pretrain.py --data my_corpus/ --dataset tinystories            # your text / a public corpus
"""

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from itertools import chain
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
Tokenizer, Transformer, ModelArgs = tok.Tokenizer, mdl.Transformer, mdl.ModelArgs

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    model: str = "tiny"  # a 02_model preset
    seq_len: int = 256
    batch_tokens: int = 4096  # global batch per optimizer step, in tokens (all ranks, all micro-steps)
    micro_batch: int = 16  # rows per forward pass on each process
    steps: int = 150
    lr: float = 2e-3  # peak; small models take larger rates (Llama 3 405B: 8e-5, 8B: 3e-4)
    min_lr_ratio: float = 0.01  # §3.4.1: cosine decay to 8e-7 from a peak of 8e-5, i.e. 1%
    warmup: int = 15  # §3.4.1: linear warmup (8,000 steps for 405B)
    # The paper does not state AdamW's betas, eps, weight decay or clipping for Llama 3; these are
    # Llama 2's (§2.2 of that paper): beta2 = 0.95, eps = 1e-5, weight decay 0.1, clip 1.0.
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_ramp: bool = False  # §3.4.1: 1/4 of the batch for the first 1.6% of steps, 1/2 until 18.4%
    doc_mask: bool = True  # §3.2 document mask inside packed rows
    dtype: str = "float32"  # float32 or bfloat16 (autocast, or FSDP's param dtype)
    compile: bool = False
    eval_every: int = 50
    eval_rows: int = 24  # validation rows per source
    sample_every: int = 75
    ckpt_every: int = 50
    keep_last: int = 2
    seed: int = 1337


TRAIN_PRESETS = {
    # 7 M parameters, 4,096 tokens per step: ~0.6 M tokens in about four minutes on 2 cores
    "cpu": TrainConfig(),
    # ~0.25 B parameters on one 80 GB GPU: 0.5M-token batches of 4K-token rows (16 micro-steps of 8
    # rows; 2 on 8 GPUs), bf16, compiled. 0.5 B tokens in all: the offline corpus has ~25 M, so this
    # repeats it ~20 times; pass --dataset fineweb-edu for web text.
    "gpu": TrainConfig(model="gpu", seq_len=4096, batch_tokens=524_288, micro_batch=8, steps=1000, lr=6e-4,
                       warmup=100, dtype="bfloat16", compile=True, eval_every=250, eval_rows=64, sample_every=500,
                       ckpt_every=500),
}


# -----------------------------------------------------------------------------
# Synthetic math: a source of its own (Llama 3 §3.1.2 upsamples math and reasoning)

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Femi", "Grace", "Hiro", "Ines", "Jonah", "Kira", "Liam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def math_problem(rng):
    """One grade-school problem with a worked answer that ends "The answer is N." (GSM8K-like)."""
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
    if kind == 1:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} times {b}?", f"{a} x {b} = {a * b}.", a * b
    if kind == 2:
        a, b, c = rng.randint(5, 60), rng.randint(5, 60), rng.randint(1, 5)
        c = min(c, a + b)
        return (f"{name} has {a} {items}. {name} gets {b} more and gives {c} away. How many {items} are left?",
                f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c)
    if kind == 3:
        n, p = rng.randint(2, 12), rng.randint(2, 15)
        paid = n * p + rng.randint(1, 20)
        return (f"A pen costs ${p}. {name} buys {n} pens and pays with ${paid}. How much change does {name} get?",
                f"{n} x {p} = {n * p}. {paid} - {n * p} = {paid - n * p}.", paid - n * p)
    if kind == 4:
        per_day, days = rng.randint(5, 40), rng.randint(2, 9)
        total = per_day * days + rng.randint(0, 200)
        return (f"A book has {total} pages. {name} reads {per_day} pages a day for {days} days. "
                f"How many pages are left?",
                f"{per_day} x {days} = {per_day * days}. {total} - {per_day * days} = {total - per_day * days}.",
                total - per_day * days)
    groups, size = rng.randint(2, 12), rng.randint(2, 12)
    return (f"{groups * size} {items} are shared equally among {groups} friends. How many does each friend get?",
            f"{groups * size} / {groups} = {size}.", size)


def math_problems(n, seed):
    """`n` problems as (question, worked answer, number); the same seed always gives the same ones."""
    rng = random.Random(seed)
    return [math_problem(rng) for _ in range(n)]


def format_problem(question, working, answer):
    return f"Question: {question}\nAnswer: {working} The answer is {answer}.\n"


def math_documents(n_problems, seed=0, per_document=25):
    """Synthetic math as documents of `per_document` problems, source "synthetic_math"."""
    problems = [format_problem(*p) for p in math_problems(n_problems, seed)]
    return [tok.Document("synthetic_math", f"synthetic_math/{seed}/{i}", "\n".join(problems[i:i + per_document]))
            for i in range(0, len(problems), per_document)]


# -----------------------------------------------------------------------------
# Curation (Llama 3 §3.1.1): heuristics, line and document de-duplication, safety, quality

# The paper's mix (§3.1.2) is over categories: ~50% general knowledge, 25% math and reasoning,
# 17% code, 8% multilingual. Each source belongs to one.
PAPER_MIX = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
SOURCE_CATEGORY = {"shakespeare": "general", "bible": "general", "python_docs": "general", "tinystories": "general",
                   "fineweb-edu": "general", "python_code": "code", "synthetic_math": "math"}


def category_of(source):
    """A source's mix category: known sources by name, others by a hint in the name, else general."""
    if source in SOURCE_CATEGORY:
        return SOURCE_CATEGORY[source]
    return next((c for c in ("code", "math", "multilingual") if c in source.lower()), "general")


def heuristic_reject(doc):
    """The reason to drop a document, or None. Thresholds in the spirit of Gopher/RefinedWeb web
    heuristics (the paper names the kinds, not the numbers): too short, mostly digits or symbols
    (tables, dumps), or much of it repeating its own lines (spam, generated lists)."""
    words = doc.text.split()
    if len(words) < 20:
        return "short"
    chars = [c for c in doc.text if not c.isspace()]
    digits = sum(c.isdigit() for c in chars) / len(chars)
    symbols = sum(not c.isalnum() for c in chars) / len(chars)
    if digits > 0.25:
        return "digits"
    if symbols > (0.45 if category_of(doc.source) == "code" else 0.3):
        return "symbols"
    long_lines = [line.strip() for line in doc.text.splitlines() if len(line.strip()) >= 20]
    if long_lines and 1 - len(set(long_lines)) / len(long_lines) > 0.3:
        return "repeated lines"
    return None


def dedup_lines(docs, max_repeats=6, min_chars=30):
    """§3.1.1 line-level de-duplication: a line (of at least `min_chars`, stripped) seen more than
    `max_repeats` times in the corpus is boilerplate; remove every copy. (Meta: more than 6 times per
    bucket of 30M documents.) Code is left alone: dropping lines from a program breaks it."""
    counts = Counter(line.strip() for d in docs if category_of(d.source) != "code"
                     for line in d.text.splitlines() if len(line.strip()) >= min_chars)
    frequent = {line for line, n in counts.items() if n > max_repeats}
    out, removed = [], 0
    for d in docs:
        if category_of(d.source) == "code" or not frequent:
            out.append(d)
            continue
        lines = d.text.splitlines(keepends=True)
        kept = [line for line in lines if line.strip() not in frequent]
        removed += len(lines) - len(kept)
        out.append(replace(d, text="".join(kept)))
    return out, removed


def minhash_signatures(token_lists, n_perm=64, shingle=5, seed=0):
    """MinHash of each document's set of token 5-grams: for each of n_perm random hash functions,
    the smallest hash over the document's shingles. Two documents agree in a signature slot with
    probability equal to their Jaccard similarity. All arithmetic is vectorised in numpy (uint64,
    wrapping), one document at a time. -> (n_docs, n_perm) uint64."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=n_perm, dtype=np.uint64) | np.uint64(1)  # odd: a bijection mod 2^64
    b = rng.integers(0, 2**63, size=n_perm, dtype=np.uint64)
    powers = np.uint64(0x9E3779B97F4A7C15) ** np.arange(shingle, dtype=np.uint64)
    signatures = np.full((len(token_lists), n_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, ids in enumerate(token_lists):
            ids = np.asarray(ids, dtype=np.uint64)
            if len(ids) < shingle:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids, shingle)  # (n_shingles, 5)
            shingles = np.unique(windows @ powers)  # one hash per 5-gram, duplicates removed
            for start in range(0, len(shingles), 1 << 16):  # bound memory on very long documents
                chunk = shingles[start:start + (1 << 16)]
                hashed = (chunk[:, None] * a[None, :] + b[None, :]) >> np.uint64(16)  # (n, n_perm)
                signatures[i] = np.minimum(signatures[i], hashed.min(axis=0))
    return signatures


def near_duplicates(signatures, threshold=0.8, bands=16):
    """Indices of documents to drop as near-duplicates of an earlier one. Locality-sensitive hashing:
    split each signature into `bands`; documents sharing any whole band are candidates; a candidate
    pair is a duplicate when the fraction of equal slots (estimated Jaccard) reaches `threshold`."""
    n, n_perm = signatures.shape
    rows = n_perm // bands
    drop = set()
    for band in range(bands):
        buckets = defaultdict(list)
        for i in range(n):
            if signatures[i, 0] != np.iinfo(np.uint64).max:  # documents too short to shingle never match
                buckets[signatures[i, band * rows:(band + 1) * rows].tobytes()].append(i)
        for members in buckets.values():
            for j in members[1:]:
                if j not in drop and any(k not in drop and np.mean(signatures[j] == signatures[k]) >= threshold
                                         for k in members[:members.index(j)]):
                    drop.add(j)
    return drop


def semantic_duplicates(token_lists, vocab_size, threshold=0.95, dim=256, seed=0):
    """Indices of documents to drop because their meaning vector is too close to a kept document's
    (SemDeDup-style, which Llama 3 §4.2.3 uses for fine-tuning data). Vectors: TF-IDF over token ids,
    randomly projected to `dim` dimensions (Johnson-Lindenstrauss keeps cosines), L2-normalised;
    clustered with k-means so only documents in the same cluster are compared."""
    n = len(token_lists)
    if n < 2:
        return set()
    rng = np.random.default_rng(seed)
    counts = [np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size) for ids in token_lists]
    df = sum((c > 0).astype(np.float64) for c in counts)
    idf = np.log((1 + n) / (1 + df)) + 1
    projection = rng.standard_normal((vocab_size, dim)) / math.sqrt(dim)
    vectors = np.stack([(np.log1p(c) * idf) @ projection for c in counts])  # (n, dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    k = max(1, int(math.sqrt(n)))
    centroids = vectors[rng.choice(n, size=k, replace=False)]
    for _ in range(10):  # a few rounds of k-means on the unit sphere
        assign = (vectors @ centroids.T).argmax(axis=1)
        for c in range(k):
            if (assign == c).any():
                centroids[c] = vectors[assign == c].mean(axis=0)
                centroids[c] /= np.linalg.norm(centroids[c]) + 1e-12
    drop = set()
    for c in range(k):
        members = np.flatnonzero(assign == c)
        sims = vectors[members] @ vectors[members].T  # (m, m) cosines inside the cluster
        for a_pos, i in enumerate(members):
            if i in drop:
                continue
            for b_pos in range(a_pos + 1, len(members)):
                if sims[a_pos, b_pos] >= threshold:
                    drop.add(members[b_pos])
    return {int(i) for i in drop}


# Real pipelines use URL/domain blocklists and trained classifiers for adult content and PII
# (Llama 3 §3.1.1: domains "ranked as harmful by Meta safety standards", adult content, PII). With no
# web data and no such models here, this stand-in drops documents dense in adult-content terms or in
# personal data (e-mail addresses, phone numbers).
UNSAFE_TERMS = {"porn", "porno", "pornography", "nsfw", "camgirl", "camgirls", "hentai", "onlyfans", "escorts"}
_PII = regex.compile(r"[\w.+-]+@[\w-]+\.[a-z]{2,}"  # e-mail addresses
                     r"|(?<!\w)(?:\+\d{1,3}[ .-])?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\w)")  # phone numbers


def unsafe_reason(doc, max_per_1000_words=2.0):
    words = regex.findall(r"\p{L}+", doc.text.lower())
    per_1000 = lambda n: 1000 * n / max(len(words), 1)
    if per_1000(sum(w in UNSAFE_TERMS for w in words)) > max_per_1000_words:
        return "adult content"
    if category_of(doc.source) != "code" and per_1000(len(_PII.findall(doc.text))) > 5 * max_per_1000_words:
        return "personal data"
    return None


def distinct_bigram_ratio(ids):
    """Distinct bigrams / bigrams: ~0.9 for ordinary text, near 0 for text that repeats itself."""
    ids = np.asarray(ids, dtype=np.int64)
    return len(np.unique(ids[:-1] * 1_000_003 + ids[1:])) / (len(ids) - 1) if len(ids) > 1 else 0.0


class QualityClassifier:
    """A fastText-style student: logistic regression over hashed token unigrams and bigrams, plus
    two dense features (distinct unigram and bigram ratios) that let a linear model see repetition.

    Llama 3 §3.1.1 labels web documents with Llama 2 (expensive, accurate) and trains small, fast
    classifiers (fastText, DistilRoBERTa) on those labels to score the whole corpus. We keep that
    teacher -> student shape at laptop size: the teacher (see `teacher_labels`) is a token-bigram
    language model plus a repetition check, and the student learns the teacher's verdicts from
    features cheap enough for billions of documents."""

    def __init__(self, n_features=2**18, seed=0):
        self.n_features = n_features
        self.weights = np.zeros(n_features)
        self.dense_weights = np.zeros(2)
        self.bias = 0.0
        self.seed = seed

    def features(self, ids):
        """Hashed feature indices (unigrams and bigrams, each once) and the two dense features."""
        ids = np.asarray(ids, dtype=np.int64)
        bigrams = ids[:-1] * 1_000_003 + ids[1:] if len(ids) > 1 else np.zeros(0, dtype=np.int64)
        sparse = np.unique(np.concatenate([ids, bigrams * 31 + 7]) % self.n_features)
        dense = np.array([len(np.unique(ids)) / max(len(ids), 1), distinct_bigram_ratio(ids)])
        return sparse, dense

    def _logit(self, sparse, dense):
        return self.weights[sparse].sum() / math.sqrt(max(len(sparse), 1)) + self.dense_weights @ dense + self.bias

    def fit(self, token_lists, labels, epochs=8, lr=0.5, l2=1e-4):
        rng = np.random.default_rng(self.seed)
        feats = [self.features(ids) for ids in token_lists]
        for _ in range(epochs):  # plain SGD on the log loss
            for i in rng.permutation(len(feats)):
                sparse, dense = feats[i]
                grad = 1 / (1 + math.exp(-self._logit(sparse, dense))) - labels[i]
                self.weights[sparse] -= lr * (grad / math.sqrt(max(len(sparse), 1)) + l2 * self.weights[sparse])
                self.dense_weights -= lr * grad * dense
                self.bias -= lr * grad
        return self

    def predict_proba(self, token_lists):
        """P(good) for each token list."""
        return np.asarray([1 / (1 + math.exp(-self._logit(*self.features(ids)))) for ids in token_lists])


def bigram_perplexity(reference, token_lists, vocab_size):
    """Per-token perplexity under a token-bigram model fitted on `reference` (add-0.1 smoothing,
    hashed into 2^20 bigram buckets)."""
    n_buckets = 2**20
    bigram_counts = np.zeros(n_buckets)
    unigram_counts = np.zeros(vocab_size)
    for ids in reference:
        ids = np.asarray(ids, dtype=np.int64)
        np.add.at(unigram_counts, ids[:-1], 1)
        np.add.at(bigram_counts, (ids[:-1] * vocab_size + ids[1:]) % n_buckets, 1)
    out = []
    for ids in token_lists:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) < 2:
            out.append(float("inf"))
            continue
        p = (bigram_counts[(ids[:-1] * vocab_size + ids[1:]) % n_buckets] + 0.1) / (unigram_counts[ids[:-1]] + 0.1 * vocab_size)
        out.append(float(np.exp(-np.log(p).mean())))
    return np.asarray(out)


def degrade(ids, rng):
    """Synthetic low-quality text made from good text, the kinds web filters meet: word salad
    (shuffled tokens), keyword spam (a short span repeated), noise (random tokens), and character
    soup (random single-byte tokens)."""
    ids = list(ids)
    kind = rng.integers(4)
    if kind == 0:
        return [int(i) for i in rng.permutation(ids)]
    if kind == 1:
        span = ids[:max(2, len(ids) // 20)]
        return (span * (len(ids) // len(span) + 1))[:len(ids)]
    if kind == 2:
        return [int(i) for i in rng.integers(0, max(ids) + 1, size=len(ids))]
    return [int(i) for i in rng.choice(list(range(97, 123)) + [32] * 5, size=len(ids))]  # "qzv kf ..."


def teacher_labels(reference, token_lists, vocab_size, cut):
    """The teacher's verdict: good when fluent (bigram perplexity below `cut`, CCNet's criterion for
    web text) and not repeating itself (distinct bigram ratio >= 0.5). Llama 3 asked Llama 2."""
    fluent = np.log(bigram_perplexity(reference, token_lists, vocab_size)) < cut
    varied = np.array([distinct_bigram_ratio(ids) >= 0.5 for ids in token_lists])
    return (fluent & varied).astype(int)


def train_quality_classifier(token_lists, vocab_size, seed=0, chunk=128, max_chunks=4000):
    """Teacher labels -> student. Chunks of real documents, plus as many degraded chunks, are labelled
    by the teacher; its perplexity cut sits midway (in log space) between the typical real chunk and
    the typical degraded one. The student learns those labels."""
    rng = np.random.default_rng(seed)
    chunks = [ids[i:i + chunk] for ids in token_lists for i in range(0, len(ids) - chunk + 1, chunk)]
    chunks = [chunks[i] for i in rng.permutation(len(chunks))[:max_chunks]]
    reference, pool = chunks[::2], chunks[1::2]  # the teacher never scores what it was fitted on
    pool = pool + [degrade(c, rng) for c in pool]
    log_ppl = np.log(bigram_perplexity(reference, pool, vocab_size))
    cut = (np.median(log_ppl[:len(pool) // 2]) + np.median(log_ppl[len(pool) // 2:])) / 2
    return QualityClassifier(seed=seed).fit(pool, teacher_labels(reference, pool, vocab_size, cut))


def quality_scores(classifier, token_lists, chunk=128):
    """A document's quality: the mean P(good) of its chunks."""
    return np.asarray([classifier.predict_proba([ids[i:i + chunk] for i in range(0, max(len(ids) - chunk + 1, 1), chunk)]
                                                 or [ids]).mean() for ids in token_lists])


def curate(docs, tokenizer, log=print, quality_threshold=0.5):
    """Run every step over the training documents; return what survives and a report of what each
    step removed (documents, lines, tokens), per source."""
    ids = {d.name: tokenizer.encode(d.text) for d in docs}
    sources = sorted({d.source for d in docs})
    report = []

    def tokens_per_source(ds):
        out = dict.fromkeys(sources, 0)
        for d in ds:
            out[d.source] += len(ids[d.name])
        return out

    def record(step, before, after, lines=0, tb=None):
        tb, ta = tb or tokens_per_source(before), tokens_per_source(after)
        report.append({"step": step, "docs_in": len(before), "docs_out": len(after), "lines_removed": lines,
                       "tokens_in": sum(tb.values()), "tokens_out": sum(ta.values()),
                       "per_source": {s: {"docs_in": sum(d.source == s for d in before),
                                          "docs_out": sum(d.source == s for d in after),
                                          "tokens_in": tb[s], "tokens_out": ta[s]} for s in sources}})

    t0 = time.time()
    kept = [d for d in docs if heuristic_reject(d) is None]
    record("heuristic filters", docs, kept)
    before, tokens_before, (kept, lines) = kept, tokens_per_source(kept), dedup_lines(kept)
    for d, b in zip(kept, before):  # re-tokenize only the documents that lost lines
        if d.text != b.text:
            ids[d.name] = tokenizer.encode(d.text)
    kept = [d for d in kept if d.text.strip()]
    record("line de-duplication", before, kept, lines=lines, tb=tokens_before)
    before = kept
    drop = near_duplicates(minhash_signatures([ids[d.name] for d in kept]))
    kept = [d for i, d in enumerate(kept) if i not in drop]
    record("MinHash near-duplicates", before, kept)
    before = kept
    drop = semantic_duplicates([ids[d.name] for d in kept], tokenizer.n_words)
    kept = [d for i, d in enumerate(kept) if i not in drop]
    record("semantic de-duplication", before, kept)
    before = kept
    kept = [d for d in kept if unsafe_reason(d) is None]
    record("unsafe content", before, kept)
    before = kept
    if sum(len(ids[d.name]) // 128 for d in kept) >= 20:  # enough text to train the classifier on
        classifier = train_quality_classifier([ids[d.name] for d in kept], tokenizer.n_words)
        scores = quality_scores(classifier, [ids[d.name] for d in kept])
        kept = [d for d, s in zip(kept, scores) if s >= quality_threshold]
    else:
        log("quality classifier skipped: too little text to train it")
    record("quality classifier", before, kept)
    if not kept:
        raise ValueError("curation removed every document: check the data, or pass --no-curation")
    log(f"curation: {len(docs):,} -> {len(kept):,} documents in {time.time() - t0:.1f} s")
    return kept, report


def curation_table(report):
    rows = [f"  {'step':<26} {'docs in':>8} {'docs out':>8} {'lines cut':>9} {'tokens in':>11} {'tokens out':>11}"]
    rows += [f"  {r['step']:<26} {r['docs_in']:>8,} {r['docs_out']:>8,} {r['lines_removed']:>9,} "
             f"{r['tokens_in']:>11,} {r['tokens_out']:>11,}" for r in report]
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Data: token shards on disk, rows packed from them, a mix over sources

SHARD_VERSION = 1


def _file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_shards(documents, tokenizer, folder, val_fraction=0.05):
    """Tokenize a stream of documents once into `folder`/{split}/{source}.bin (uint16 tokens when the
    vocabulary fits, else uint32) plus {source}.starts.npy, each document's first token offset.
    Documents go to validation by a hash of their name (01's is_held_out); a source that gets none
    gives the last 5% of its tokens. Nothing is held in memory but one document at a time."""
    dtype = np.uint16 if tokenizer.n_words <= 2**16 else np.uint32
    tmp = Path(str(folder) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files, starts, sizes = {}, {}, {}
    try:
        for doc in documents:
            split = "val" if tok.is_held_out(doc.name, val_fraction) else "train"
            key = (split, doc.source)
            if key not in files:
                (tmp / split).mkdir(parents=True, exist_ok=True)
                files[key], starts[key], sizes[key] = open(tmp / split / f"{doc.source}.bin", "wb"), [], 0
            ids = np.asarray(tokenizer.encode(doc.text, bos=True, eos=True), dtype=dtype)
            starts[key].append(sizes[key])
            sizes[key] += len(ids)
            files[key].write(ids.tobytes())
    finally:
        for f in files.values():
            f.close()
    if not files:
        raise ValueError("no documents to tokenize: the corpus is empty")
    for source in {s for _, s in files} - {s for split, s in files if split == "val"}:
        # Carve the last 5% of the source's tokens into validation, so every source has a val loss.
        train_path = tmp / "train" / f"{source}.bin"
        tokens = np.fromfile(train_path, dtype=dtype)
        cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
        (tmp / "val").mkdir(exist_ok=True)
        tokens[cut:].tofile(tmp / "val" / f"{source}.bin")
        tokens[:cut].tofile(train_path)
        train_starts = starts[("train", source)]
        starts[("val", source)] = [0] + [s - cut for s in train_starts if s > cut]
        starts[("train", source)] = [s for s in train_starts if s < cut]
        sizes[("val", source)], sizes[("train", source)] = len(tokens) - cut, cut
    for (split, source), offsets in starts.items():
        np.save(tmp / split / f"{source}.starts.npy", np.asarray(offsets, dtype=np.int64))
    return tmp, {f"{split}/{source}": n for (split, source), n in sorted(sizes.items())}


def prepare_shards(documents, tokenizer, tokenizer_path, folder, data_key, log=print):
    """Reuse `folder` if it was built from the same data with the same tokenizer, else (re)build it."""
    folder = Path(folder)
    wanted = {"version": SHARD_VERSION, "data": data_key, "tokenizer_sha256": _file_sha256(tokenizer_path)}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    t0 = time.time()
    log(f"tokenizing {data_key} into {folder} ...")
    tmp, sizes = build_shards(documents(), tokenizer, folder)
    meta = {**wanted, "tokens": sizes}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the finished shards appear at once, never half-written
    total = sum(sizes.values())
    log(f"  {total:,} tokens in {time.time() - t0:.1f} s: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    return meta


class TokenShards:
    """Memory-mapped tokens of one split, per source; rows are read straight from the page cache."""

    def __init__(self, folder, split):
        sizes = json.loads((Path(folder) / "meta.json").read_text())["tokens"]
        self.tokens, self.starts = {}, {}
        for path in sorted((Path(folder) / split).glob("*.bin")):
            n = sizes[f"{split}/{path.stem}"]
            dtype = np.uint16 if path.stat().st_size == 2 * n else np.uint32
            self.tokens[path.stem] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
            self.starts[path.stem] = np.load(path.with_name(f"{path.stem}.starts.npy"))
        self.sources = sorted(self.tokens)

    def sizes(self):
        return {s: len(t) for s, t in self.tokens.items()}

    def rows(self, source, offsets, length):
        """Windows of `length` tokens at `offsets` of one source: tokens (n, length) and the index of
        the document each token belongs to (n, length), for the document mask."""
        tokens = np.stack([self.tokens[source][o:o + length] for o in offsets]).astype(np.int64)
        positions = np.asarray(offsets)[:, None] + np.arange(length)[None, :]
        doc_ids = np.searchsorted(self.starts[source], positions, side="right") - 1
        return torch.from_numpy(tokens), torch.from_numpy(doc_ids)


def mix_weights(shards, mix="paper"):
    """Sampling weight per source. "paper" (the default): Llama 3 §3.1.2's category shares (~50%
    general knowledge, 25% math and reasoning, 17% code, 8% multilingual), renormalised over the
    categories the data has, each category's share split among its sources by size. "natural": each
    source's share of the training tokens. Or a dict {source: weight}."""
    sizes = shards.sizes()
    if mix == "natural":
        weights = {s: float(n) for s, n in sizes.items()}
    elif mix == "paper":
        present = {category_of(s) for s in sizes}
        category_total = {c: sum(n for s, n in sizes.items() if category_of(s) == c) for c in present}
        norm = sum(PAPER_MIX[c] for c in present)
        weights = {s: PAPER_MIX[category_of(s)] / norm * n / category_total[category_of(s)] for s, n in sizes.items()}
    else:
        unknown = set(mix) - set(sizes)
        if unknown:
            raise ValueError(f"--mix names unknown sources {sorted(unknown)}; the data has {sorted(sizes)}")
        weights = {s: float(mix.get(s, 0.0)) for s in sizes}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"--mix weights must be >= 0 and sum to something positive, got {mix}")
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def parse_mix(text):
    """--mix: "paper", "natural", or "source=weight,source=weight"."""
    if text in ("paper", "natural"):
        return text
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--mix {text!r}: expected paper, natural, or source=weight,... (e.g. bible=1,python_code=2)") from None


def sample_batch(shards, weights, n_rows, length, rng):
    """`n_rows` windows of `length` tokens: each row's source drawn by `weights`, its start uniform."""
    sources = [s for s in shards.sources if weights.get(s, 0) > 0]
    picks = rng.choice(len(sources), size=n_rows, p=[weights[s] for s in sources])
    tokens = torch.empty(n_rows, length, dtype=torch.long)
    doc_ids = torch.empty(n_rows, length, dtype=torch.long)
    for i, source in enumerate(sources):
        rows = np.flatnonzero(picks == i)
        if len(rows):
            size = len(shards.tokens[source])
            if size < length:
                raise ValueError(f"source {source!r} has {size} tokens, fewer than one row of {length}: "
                                 f"lower --seq-len or give it more text")
            offsets = rng.integers(0, size - length + 1, size=len(rows))
            tokens[rows], doc_ids[rows] = shards.rows(source, offsets, length)
    return tokens, doc_ids


def batch_for_step(shards, weights, cfg, step, rank, world, rows):
    """The rows this rank trains on at `step`: a pure function of (seed, step), so a resumed run and
    an N-process run see exactly the rows of the uninterrupted single-process run."""
    rng = np.random.default_rng([cfg.seed, step])
    tokens, doc_ids = sample_batch(shards, weights, rows, cfg.seq_len + 1, rng)  # (rows, T+1)
    per_rank = rows // world
    return tokens[rank * per_rank:(rank + 1) * per_rank], doc_ids[rank * per_rank:(rank + 1) * per_rank]


# -----------------------------------------------------------------------------
# Public pretraining corpora, downloaded once (resumable) and cached

DATASETS = {
    "tinystories": {"base": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/",
                    "files": ["TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-train.txt"],
                    "about": "2.7 M short stories written by GPT-4 for 3-4 year olds (CDLA-Sharing-1.0), 2.2 GB"},
    "fineweb-edu": {"base": "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/",
                    "files": ["000_00000.parquet", "001_00000.parquet"],
                    "about": "educational web pages filtered by a Llama 3 70B-labelled classifier (ODC-By), "
                             "2 of the 10B-token sample's shards, ~4 GB; needs pyarrow"},
}


def download(url, dest, log=print):
    """Fetch `url` to `dest` over HTTP(S), resuming a broken download from `dest`.part with a Range
    request, showing progress. An existing `dest` is reused."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header: start over
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f:
            done, t0 = have, time.time()
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    rate = (done - have) / max(time.time() - t0, 1e-9) / 2**20
                    log(f"\r  {dest.name}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB ({rate:.1f} MiB/s)", end="")
        log("")
    if total and part.stat().st_size != total:
        raise IOError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def dataset_documents(name, cache, mirror=None, log=print):
    """Download a public corpus (once) into `cache` and return a function that streams its documents.
    `mirror` replaces the base URL (a local copy, or a test server)."""
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    log(f"dataset {name}: {spec['about']}")
    base = mirror.rstrip("/") + "/" if mirror else spec["base"]
    paths = [download(base + file, Path(cache) / name / file, log) for file in spec["files"]]

    def stories(path):
        """TinyStories: (index, text) of the stories between <|endoftext|> lines of one large file."""
        with open(path, encoding="utf-8") as f:
            story, index = [], 0
            for line in chain(f, ["<|endoftext|>\n"]):  # the sentinel ends the last story too
                if line.strip() != "<|endoftext|>":
                    story.append(line)
                    continue
                if text := "".join(story).strip():
                    yield index, text
                story, index = [], index + 1

    def documents():
        for path in paths:
            if path.suffix == ".parquet":
                yield from tok.iter_documents(path)
                continue
            for index, text in stories(path):
                yield tok.Document(name, f"{name}/{path.stem}:{index}", text)
    return documents


# -----------------------------------------------------------------------------
# Optimizer, schedule, speed


def lr_at(step, cfg):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio · peak at the last step (§3.4.1)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_fraction_at(step, cfg):
    """§3.4.1's ramp, scaled to this run's length: 4M tokens for the first 252M of 15.6T (1.6%),
    8M until 2.87T (18.4%), then 16M, i.e. 1/4, 1/2, then the whole batch."""
    if not cfg.batch_ramp:
        return 1.0
    done = step / max(cfg.steps, 1)
    return 0.25 if done < 0.016 else 0.5 if done < 0.184 else 1.0


def make_optimizer(model, cfg, fused):
    """AdamW with decoupled weight decay on matrices only: norms' gains and the embedding are not
    decayed (a common choice; the paper does not say)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "tok_embeddings" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def train_step(model, optimizer, tokens, doc_ids, cfg, n_micro, device, autocast, world=1):
    """One optimizer step over `tokens` (rows, T+1) in `n_micro` micro-batches of cfg.micro_batch
    rows: forward, loss / n_micro, backward (gradients add up), clip, AdamW step. The caller sets the
    learning rate. Returns the mean loss (over ranks too) and the gradient norm before clipping."""
    loss_sum = 0.0
    for micro in range(n_micro):
        x = tokens[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch].to(device, non_blocking=True)
        d = doc_ids[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch].to(device, non_blocking=True)
        if world > 1:  # reduce-scatter gradients only after the last micro-batch
            model.set_requires_gradient_sync(micro == n_micro - 1)
        with autocast:
            logits = model(x[:, :-1], doc_ids=d[:, :-1] if cfg.doc_mask else None)  # (b, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / n_micro
        loss.backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    loss_value, = all_reduce_mean([loss_sum], world)
    if math.isfinite(loss_value) and math.isfinite(grad_norm):  # never step on a NaN
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss_value, grad_norm


@torch.no_grad()
def eval_losses(model, shards, cfg, device, autocast, rank=0, world=1, seq_len=None):
    """Mean next-token loss per source on cfg.eval_rows fixed rows (the same rows at every call),
    split across ranks."""
    seq_len = seq_len or cfg.seq_len
    was_training = model.training
    model.eval()
    losses = {}
    for source in shards.sources:
        rng = np.random.default_rng([cfg.seed, 10**9])
        tokens, doc_ids = sample_batch(shards, {source: 1.0}, cfg.eval_rows, seq_len + 1, rng)
        mine = slice(rank * cfg.eval_rows // world, (rank + 1) * cfg.eval_rows // world)
        tokens, doc_ids = tokens[mine].to(device), doc_ids[mine].to(device)
        with autocast:
            logits = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1] if cfg.doc_mask else None)
        losses[source] = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    model.train(was_training)
    return dict(zip(losses, all_reduce_mean(list(losses.values()), world)))


# Dense bf16 peak of the cards MFU is usually quoted for (NVIDIA datasheets, SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(device, dtype):
    """FLOP/s that MFU divides by: the datasheet peak of a known GPU, else the best matmul rate
    measured here over a few shapes and repeats (one timing alone is at the mercy of clock ramp-up
    and other processes, and a low peak makes MFU read too high)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    scale = 1 if device.type == "cpu" else 4
    best = 0.0
    for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 1024), (4096, 256, 1024)]:
        a = torch.randn(m * scale, k * scale, device=device, dtype=dtype)
        b = torch.randn(k * scale, n * scale, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n * scale**3 / (time.perf_counter() - t0))
    return best


# -----------------------------------------------------------------------------
# Checkpoints and distributed helpers


def full_state(model, optimizer):
    """Plain (unsharded, uncompiled) model and optimizer state dicts, keyed by parameter names, so a
    checkpoint written by N FSDP ranks loads in one process and vice versa."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state, optimizer_state):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def checkpoints(out):
    return sorted(Path(out).glob("ckpt_*.pt"))


def all_reduce_mean(values, world):
    """Average a list of floats over ranks (identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def pick_attention(device, cfg, log):
    """flex attention keeps the document mask on a fused kernel, but only on CUDA (on CPU it has no
    backward). If it fails here (an old GPU, no Triton), fall back to SDPA with a dense mask."""
    if device.type != "cuda" or not cfg.doc_mask:
        return "sdpa"
    try:
        probe = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=256,
                                      attn_impl="flex")).to(device)
        tokens = torch.randint(0, 64, (1, 256), device=device)
        probe(tokens, doc_ids=(torch.arange(256, device=device) // 100)[None]).sum().backward()
        return "flex"
    except Exception as e:  # any failure means: use the path that always works
        log(f"note: flex attention unavailable here ({type(e).__name__}: {e}); using SDPA with a dense document mask")
        return "sdpa"


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch (is the CUDA build installed?)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available here")
    return name


# -----------------------------------------------------------------------------
# The command line and the training loop


MODEL_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")


def data_fingerprint(data):
    """A short hash of the path, size and modification time of every text file under --data:
    editing, adding or removing a file changes it, so shards cached from the old files are rebuilt
    (a cheap stand-in for hashing the contents, which for a big corpus would take minutes)."""
    root = Path(data)
    digest = hashlib.sha256()
    for f in tok.data_files(data):
        stat = f.stat()
        digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepare_data(args, tokenizer, tokenizer_path, out, rank, world, log):
    """Documents -> (synthetic math) -> curation -> token shards (rank 0, cached) -> the mix."""
    if args.dataset:
        documents = dataset_documents(args.dataset, Path(args.out).parent / "datasets", args.mirror, log)
        data_key = f"dataset:{args.dataset}"
    else:
        if args.data is not None and not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        documents = lambda: tok.iter_documents(args.data)
        data_key = (f"data:{Path(args.data).resolve()} ({data_fingerprint(args.data)})" if args.data
                    else f"default corpus (Python {sys.version_info[0]}.{sys.version_info[1]})")
    math_problems = args.math_problems if args.math_problems is not None else (
        0 if args.data or args.dataset else 4000)
    mix = parse_mix(args.mix)

    def corpus():
        docs = chain(documents(), math_documents(math_problems))
        if not args.curation:
            return docs
        # Only the training documents are curated: validation stays raw, so curated and uncurated
        # runs are measured on the very same held-out text.
        docs = list(docs)
        train_docs = [d for d in docs if not tok.is_held_out(d.name)]
        kept, report = curate(train_docs, tokenizer, log)
        log(curation_table(report))
        (out / "curation.json").write_text(json.dumps({"steps": report}, indent=2))
        return iter(kept + [d for d in docs if tok.is_held_out(d.name)])

    shard_dir = out / "data"
    key = f"{data_key}; math {math_problems}; curation {'v1' if args.curation else 'off'}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        prepare_shards(corpus, tokenizer, tokenizer_path, shard_dir, key, log)
    if world > 1:
        dist.barrier()
    train, val = TokenShards(shard_dir, "train"), TokenShards(shard_dir, "val")
    weights = mix_weights(train, mix)
    log("data mix: " + ", ".join(f"{s} {w:.1%}" for s, w in weights.items()))
    if rank == 0 and (out / "curation.json").is_file():
        report = json.loads((out / "curation.json").read_text())
        (out / "curation.json").write_text(json.dumps({**report, "mix": weights}, indent=2))
    return train, val, weights


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                        help="training preset (default: gpu when CUDA is available, else cpu)")
    for f in fields(TrainConfig):  # every TrainConfig field is a flag: --seq-len 512, --no-doc-mask, ...
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=f"default: {getattr(TRAIN_PRESETS['cpu'], f.name)} (cpu preset)")
    for name in MODEL_FLAGS:  # change the model preset's shape: --dim 64 --n-layers 2
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    parser.add_argument("--data", default=None, help="your text: .txt/.md/.jsonl/.parquet file or folder")
    parser.add_argument("--dataset", default=None, choices=list(DATASETS), help="download a public corpus")
    parser.add_argument("--mirror", default=None, help="base URL to download --dataset files from instead")
    parser.add_argument("--mix", default="paper",
                        help="paper (Llama 3's category shares, default), natural (by size), or e.g. bible=2,python_code=1")
    parser.add_argument("--curation", action=argparse.BooleanOptionalAction, default=True,
                        help="curate the training documents first (--no-curation: use them as they are)")
    parser.add_argument("--math-problems", type=int, default=None,
                        help="synthetic math problems to add as a source (default 4000 with the default corpus, else 0)")
    parser.add_argument("--tokenizer", default="runs/01_tokenizer/tokenizer.model",
                        help="tokenizer.model; trained with 01_tokenizer.py's defaults if missing")
    parser.add_argument("--out", default="runs/03_pretrain", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of this run, e.g. for time-limited jobs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # launched by torchrun
    device_name = pick_device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
        if device_name.startswith("cuda"):
            device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device_name)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device_name)
    master = rank == 0

    def log(*a, **k):  # rank 0 speaks for everyone
        if master:
            print(*a, **k, flush=True)
    try:
        run(args, device, rank, world, log)
    finally:
        if distributed:
            dist.destroy_process_group()


def run(args, device, rank, world, log):
    out = Path(args.out)
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = replace(TRAIN_PRESETS[preset_name], **overrides)
    if device.type == "cpu" and cfg.dtype == "bfloat16":
        log("note: bf16 on a CPU without AMX/AVX-512 runs ~20x slower than fp32 here; --dtype float32 is faster")
    rows = cfg.batch_tokens // cfg.seq_len
    if cfg.batch_tokens % cfg.seq_len or rows % (world * cfg.micro_batch):
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of seq_len ({cfg.seq_len}) x "
                         f"micro_batch ({cfg.micro_batch}) x processes ({world}) = "
                         f"{cfg.seq_len * cfg.micro_batch * world}")

    # Refuse to overwrite a run: nothing saved is lost to a run started by mistake.
    existing = checkpoints(out)
    if existing and not args.resume:
        raise FileExistsError(f"{out} already holds checkpoints ({existing[-1].name}): pass --resume to continue "
                              f"that run, or --out to start a new one")
    if args.resume and not existing:
        raise FileNotFoundError(f"--resume: no ckpt_*.pt in {out}; start without --resume")

    # --- tokenizer and data ---
    tokenizer_path = Path(args.tokenizer)
    if not tokenizer_path.is_file():
        if args.tokenizer != "runs/01_tokenizer/tokenizer.model":
            raise FileNotFoundError(f"--tokenizer {tokenizer_path} not found")
        if rank == 0:
            log(f"no tokenizer at {tokenizer_path} yet: training one first (python 01_tokenizer.py) ...")
            tok.train_tokenizer(out=tokenizer_path.parent)
        if world > 1:
            dist.barrier()
    tokenizer = Tokenizer.load(tokenizer_path)
    train, val, weights = prepare_data(args, tokenizer, tokenizer_path, out, rank, world, log)

    # --- model and optimizer ---
    torch.manual_seed(cfg.seed)
    shape = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    model_args = mdl.preset(cfg.model, vocab_size=tokenizer.n_words, max_seq_len=cfg.seq_len,
                            attn_impl=pick_attention(device, cfg, log), **shape)
    model = Transformer(model_args)  # every rank builds the same weights from the seed, then shards them
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        # §3.3.2: parameters in bf16 for compute, gradients reduced in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
        model.to(device)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    else:
        model.to(device)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" and world == 1
                else contextlib.nullcontext())
    if cfg.compile:
        model.compile()  # in place: the state dict keeps its plain names (no _orig_mod. prefix)

    start_step, log_mode = 0, "w"
    if args.resume:
        ckpt = torch.load(existing[-1], map_location="cpu", weights_only=True)
        if ckpt["args"] != asdict(model_args):
            diff = {k: (v, asdict(model_args).get(k)) for k, v in ckpt["args"].items() if asdict(model_args).get(k) != v}
            raise ValueError(f"{existing[-1]} was trained with another model config (checkpoint vs now): {diff}")
        for key in ("seq_len", "batch_tokens", "seed"):
            if ckpt["config"][key] != getattr(cfg, key):
                raise ValueError(f"{existing[-1]} used {key}={ckpt['config'][key]}, this run {getattr(cfg, key)}: "
                                 f"resuming would not continue the same data stream")
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_step, log_mode = ckpt["step"], "a"
        log(f"resumed from {existing[-1]} at step {start_step}")
        del ckpt

    # --- run ---
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    flops_per_token = mdl.flops_per_token(model_args, cfg.seq_len)
    peak = peak_flops(device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    log_file = open(out / "log.jsonl", log_mode) if rank == 0 else None
    if rank == 0 and log_mode == "w":  # the header: what every later record is relative to
        log_file.write(json.dumps({"config": asdict(cfg), "model": asdict(model_args), "params": n_params,
                                   "world": world, "device": str(device), "peak_flops": peak}) + "\n")
    log(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters | {world} process(es) on {device} | {cfg.dtype} | "
        f"batch {cfg.batch_tokens:,} tokens = {rows} rows x {cfg.seq_len} | {cfg.steps} steps")

    stop_requested = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True)) \
        if rank == 0 and world == 1 else None

    def write(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def save(step):
        model_state, optimizer_state = full_state(model, optimizer)
        if rank == 0:
            path = out / f"ckpt_{step:06d}.pt"
            mdl.atomic_save({"model": model_state, "optimizer": optimizer_state, "args": asdict(model_args),
                             "config": asdict(cfg), "step": step, "rng": torch.get_rng_state()}, path)
            for old in checkpoints(out)[:-cfg.keep_last]:
                old.unlink()
            log(f"saved {path}")

    def evaluate():
        return eval_losses(model, val, cfg, device, autocast, rank, world)

    def sample():
        model.eval()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        prompt = tokenizer.encode("\n", bos=True)
        # Generation's shapes (prompt, KV cache) are not training's: run it eagerly, not recompiled.
        with torch.compiler.set_stance("force_eager"):
            ids = mdl.generate(model, [prompt], max_new_tokens=min(64, cfg.seq_len - len(prompt)), temperature=0.8,
                               top_p=0.95, stop_tokens=tokenizer.stop_tokens, generator=generator)[0]
        model.train()
        return tokenizer.decode(ids)

    model.train()
    t_run, last_loss = time.time(), float("nan")
    steps_this_run = 0
    for step in range(start_step, cfg.steps + 1):
        last = step == cfg.steps
        if step % cfg.eval_every == 0 or last:
            val_losses = evaluate()
            log(f"step {step}: val " + " | ".join(f"{s} {v:.3f}" for s, v in val_losses.items()))
            write({"step": step, "val": val_losses})
        if (step % cfg.sample_every == 0 and step > 0) or last:
            text = sample()
            log(f"sample: {text!r}")
            write({"step": step, "sample": text})
        stopping = bool(stop_requested) or (args.stop_after is not None and steps_this_run >= args.stop_after)
        if step > start_step and (step % cfg.ckpt_every == 0 or last or stopping):
            save(step)
        if last or stopping:
            break

        # --- one optimizer step: micro-batches, clip, lr, update ---
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, doc_ids = batch_for_step(train, weights, cfg, step, rank, world, rows)  # (rows/world, T+1)
        n_micro = max(1, round(len(tokens) // cfg.micro_batch * batch_fraction_at(step, cfg)))
        loss_value, grad_norm = train_step(model, optimizer, tokens, doc_ids, cfg, n_micro, device, autocast, world)
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            kept = checkpoints(out)
            raise FloatingPointError(f"step {step}: loss {loss_value}, grad norm {grad_norm}: training diverged "
                                     f"(try a lower --lr). The last good checkpoint is kept: "
                                     f"{kept[-1] if kept else 'none yet'}")
        dt = time.time() - t0
        step_tokens = n_micro * cfg.micro_batch * cfg.seq_len * world
        steps_this_run += 1
        tps = step_tokens / dt
        mfu = tps * flops_per_token / (peak * world)
        eta = (time.time() - t_run) / steps_this_run * (cfg.steps - step - 1)
        last_loss = loss_value
        log(f"step {step + 1:>5}/{cfg.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_norm:5.2f} | "
            f"{dt * 1000:6.0f} ms | {tps:7,.0f} tok/s | MFU {mfu:5.1%} | ETA {eta / 60:4.1f} min")
        write({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000,
               "tokens_per_s": tps, "mfu": mfu, "tokens": step_tokens})

    if previous_handler is not None:
        signal.signal(signal.SIGINT, previous_handler)
    if log_file:
        log_file.close()
    finished = step == cfg.steps
    model_state, _ = full_state(model, optimizer) if finished else (None, None)
    if rank == 0:
        plot_losses(out / "log.jsonl", out / "loss.png")
        if finished:
            mdl.atomic_save({"model": model_state, "args": asdict(model_args), "step": step}, out / "model.pt")
            records = [json.loads(line) for line in open(out / "log.jsonl")]
            steps = [r for r in records if "loss" in r]
            vals = [r for r in records if "val" in r]
            metrics = {"steps": cfg.steps, "params": n_params, "final_train_loss": last_loss,
                       "val_loss": vals[-1]["val"] if vals else {},
                       "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps])) if steps else None,
                       "mfu": float(np.median([r["mfu"] for r in steps])) if steps else None,
                       "device": str(device), "world": world}
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log(f"done: {out / 'model.pt'}, {out / 'loss.png'}, {out / 'metrics.json'}")
        else:
            log(f"stopped at step {step}; continue with: python 03_pretrain.py --resume --out {out}")


def plot_losses(log_path, png_path):
    """Training loss per step and validation loss per source, from a log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(log_path)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", color="black", lw=1)
    sources = sorted({s for r in records if "val" in r for s in r["val"]})
    for source in sources:
        points = [(r["step"], r["val"][source]) for r in records if "val" in r and source in r["val"]]
        ax.plot(*zip(*points), marker="o", label=f"val: {source}")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
