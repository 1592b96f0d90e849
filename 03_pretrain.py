"""
Chapter 3: pretraining, from a laptop CPU to FSDP on many GPUs.

Llama 3 §3.4.1 trains with AdamW, a linear warmup then cosine decay to 1% of the peak learning
rate, and a batch that grows 4M -> 8M -> 16M tokens; §3.1 curates and mixes the data first; §3.3
shards the model with FSDP and keeps gradient reductions in fp32. This file has three parts:

  Part 1, the data (§3.1)   documents (01's sources + synthetic math) -> curation (§3.1.1: heuristic
           filters, line, near- and semantic de-duplication, a safety filter, a quality classifier)
           -> 01's tokenizer -> memory-mapped token shards per source and split, each document
           wrapped in <|begin_of_text|> ... <|end_of_text|>. Rows of seq_len tokens are cut at
           random places, so they pack several documents, and the model's document mask keeps them
           apart (§3.2). The paper's data mix (§3.1.2: 50% general, 25% math, 17% code, 8%
           multilingual) picks each row's source.
  Part 2, training (§3.4.1)  TrainConfig, the schedule, AdamW, one training step (micro-batches,
           clipping) that later chapters reuse with their own losses, evaluation, and the loop.
           `main` follows. A reader can stop there: what it calls from Part 3 (sharding, gathering
           and saving checkpoints, resuming, summing over processes) is named so that a first
           reading can take it on trust.
  Part 3, at scale (§3.3)    FSDP2 under torchrun, full-state checkpoints and resuming, the matmul
           peak behind MFU, probing flex attention on CUDA, Ctrl-C handling.
  Then the plumbing: command-line flags built from config dataclasses, plots.

Outputs in runs/03_pretrain/: log.jsonl, loss.png, metrics.json, ckpt_NNNNNN.pt (atomic, last k
kept, resumable bit for bit), model.pt (the final model for the next chapter), tokenizer.model.

Run it:
    python 03_pretrain.py                               # CPU: tiny model, ~4 minutes; GPU: the gpu preset
    python 03_pretrain.py --steps 20 --eval-every 10    # a smoke test
    python 03_pretrain.py --resume                      # continue the run in --out
    torchrun --standalone --nproc_per_node=8 03_pretrain.py --preset gpu     # FSDP on 8 GPUs
    python 03_pretrain.py --data my_corpus/ --dataset tinystories            # your text / a public corpus
"""

import argparse
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from datetime import timedelta
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
Tokenizer, Transformer, ModelArgs = tok.Tokenizer, mdl.Transformer, mdl.ModelArgs


# =============================================================================
# Part 1: the data (Llama 3 §3.1)
# =============================================================================

# -----------------------------------------------------------------------------
# Curation (Llama 3 §3.1.1): heuristics, line and document de-duplication, safety, quality

# The paper's mix (§3.1.2) is over categories: ~50% general knowledge, 25% math and reasoning,
# 17% code, 8% multilingual. Each source belongs to one.
PAPER_MIX = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
SOURCE_CATEGORY = {"shakespeare": "general", "bible": "general", "python_docs": "general", "tinystories": "general",
                   "fineweb-edu": "general", "python_code": "code", "synthetic_math": "math",
                   "ukrainian": "multilingual", "chichewa": "multilingual"}


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


# Llama 3 §3.1.1: a fastText classifier tells each document's language (176 of them), and each
# language then goes through its own de-duplication and quality filters. Here: three languages, and
# a character n-gram Naive Bayes trained on the three parallel Bibles, so what it learns to tell
# apart is the language and not the topic (every verse says the same thing in each).
LANGUAGE_OF_SOURCE = {"bible": "English", "ukrainian": "Ukrainian", "chichewa": "Chichewa"}


class LanguageID:
    """Naive Bayes over character 1-3-grams: log P(language) + Σ log P(n-gram | language)."""

    def __init__(self, orders=(1, 2, 3), snippet=2000):
        self.orders, self.snippet = orders, snippet

    def grams(self, text):
        text = " " + " ".join(text[:self.snippet].lower().split()) + " "
        return Counter(text[i:i + n] for n in self.orders for i in range(len(text) - n + 1))

    def fit(self, texts, labels):
        counts = defaultdict(Counter)
        for text, label in zip(texts, labels):
            counts[label].update(self.grams(text))
        self.languages = sorted(counts)
        self.vocab = set().union(*counts.values())
        self.log_prob, self.unseen = {}, {}
        for lang in self.languages:  # add-one smoothing; an n-gram never seen in any language is ignored
            total = sum(counts[lang].values()) + len(self.vocab)
            self.log_prob[lang] = {g: math.log((n + 1) / total) for g, n in counts[lang].items()}
            self.unseen[lang] = -math.log(total)
        return self

    def score(self, lang, grams):
        return sum(n * self.log_prob[lang].get(g, self.unseen[lang]) for g, n in grams)

    def predict(self, texts):
        out = []
        for text in texts:
            grams = [(g, n) for g, n in self.grams(text).items() if g in self.vocab]
            out.append(max(self.languages, key=lambda lang: self.score(lang, grams)))
        return out


def train_language_id(docs, chars_per_language=300_000):
    """A LanguageID fitted on the training documents of the parallel Bibles (a sample of each), or
    None when the data holds fewer than two of those languages (then curation has one pipeline)."""
    by_language = defaultdict(list)
    for d in docs:
        if d.source in LANGUAGE_OF_SOURCE:
            by_language[LANGUAGE_OF_SOURCE[d.source]].append(d.text)
    if len(by_language) < 2:
        return None
    texts, labels = [], []
    for lang, group in by_language.items():
        sample = tok.sample_text([tok.Document(lang, str(i), t) for i, t in enumerate(group)], chars_per_language)
        lines = [line for t in sample for line in t.splitlines() if line.strip()]
        texts += lines
        labels += [lang] * len(lines)
    return LanguageID().fit(texts, labels)


def language_id_accuracy(language_id, val_docs):
    """Accuracy per language on single held-out verses (a line each): the hard case, short texts."""
    accuracy = {}
    for source, lang in LANGUAGE_OF_SOURCE.items():
        verses = [line for d in val_docs if d.source == source for line in d.text.splitlines()[1:] if line.strip()]
        if verses and lang in language_id.languages:
            accuracy[lang] = float(np.mean([p == lang for p in language_id.predict(verses)]))
    return accuracy


def by_language(docs, language):
    """Documents grouped by their language label, in order: one curation pipeline per language."""
    groups = defaultdict(list)
    for d in docs:
        groups[language[d.name]].append(d)
    return groups


def each_language(docs, language, step):
    """`step(language, its documents) -> (kept, lines removed)` run on each language's documents
    separately; returns everything kept, back in the documents' order, and the lines removed."""
    kept, lines = [], 0
    for lang, group in by_language(docs, language).items():
        group_kept, group_lines = step(lang, group)
        kept, lines = kept + group_kept, lines + group_lines
    order = {d.name: i for i, d in enumerate(docs)}
    return sorted(kept, key=lambda d: order[d.name]), lines


def quality_filter(docs, ids, vocab_size, threshold, log, lang="all"):
    """The quality classifier trained on `docs` (one language's) and applied to them: (kept, 0)."""
    if sum(len(ids[d.name]) // 128 for d in docs) < 20:  # too little text to train the classifier on
        log(f"quality classifier skipped{'' if lang == 'all' else ' for ' + lang}: too little text to train it")
        return docs, 0
    classifier = train_quality_classifier([ids[d.name] for d in docs], vocab_size)
    scores = quality_scores(classifier, [ids[d.name] for d in docs])
    return [d for d, s in zip(docs, scores) if s >= threshold], 0


def curate(docs, tokenizer, log=print, quality_threshold=0.5, language_id=None):
    """Run every step over the training documents; return what survives and a report of what each
    step removed (documents, lines, tokens), per source. With `language_id`, each document is
    labelled with its language and line de-duplication and the quality classifier run per language."""
    ids = {d.name: tokenizer.encode(d.text) for d in docs}
    sources = sorted({d.source for d in docs})
    report = []
    language = dict(zip([d.name for d in docs], language_id.predict([d.text for d in docs]) if language_id
                        else ["all"] * len(docs)))

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
    before, tokens_before = kept, tokens_per_source(kept)
    kept, lines = each_language(before, language, lambda lang, group: dedup_lines(group))
    old_text = {b.name: b.text for b in before}
    for d in kept:  # re-tokenize only the documents that lost lines
        if d.text != old_text[d.name]:
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
    kept, _ = each_language(before, language, lambda lang, group: quality_filter(
        group, ids, tokenizer.n_words, quality_threshold, log, lang))
    record("quality classifier", before, kept)
    if not kept:
        raise tok.UserError("curation removed every document: check the data, or pass --no-curation")
    log(f"curation: {len(docs):,} -> {len(kept):,} documents in {time.time() - t0:.1f} s")
    return kept, report, language


def curation_table(report):
    rows = [f"  {'step':<26} {'docs in':>8} {'docs out':>8} {'lines cut':>9} {'tokens in':>11} {'tokens out':>11}"]
    rows += [f"  {r['step']:<26} {r['docs_in']:>8,} {r['docs_out']:>8,} {r['lines_removed']:>9,} "
             f"{r['tokens_in']:>11,} {r['tokens_out']:>11,}" for r in report]
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Token shards on disk, rows packed from them, a mix over sources

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
        raise tok.UserError("no documents to tokenize: the corpus is empty")
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
    tok.atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
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


def normalised(weights):
    """Weights scaled to sum to 1: the one place a mix is normalised."""
    total = sum(weights.values())
    if any(w < 0 for w in weights.values()) or total <= 0:
        raise tok.UserError(f"mix weights must be >= 0 and sum to something positive, got {weights}")
    return {s: w / total for s, w in weights.items()}


def mix_weights(shards, mix="paper"):
    """Sampling weight per source. "paper" (the default): Llama 3 §3.1.2's category shares (~50%
    general knowledge, 25% math and reasoning, 17% code, 8% multilingual), renormalised over the
    categories the data has, each category's share split among its sources by size. "natural": each
    source's share of the training tokens. Or a dict {source: weight}."""
    sizes = shards.sizes()
    if mix == "natural":
        return normalised({s: float(n) for s, n in sizes.items()})
    if mix == "paper":
        category_total = Counter()
        for s, n in sizes.items():
            category_total[category_of(s)] += n
        return normalised({s: PAPER_MIX[category_of(s)] * n / category_total[category_of(s)] for s, n in sizes.items()})
    unknown = set(mix) - set(sizes)
    if unknown:
        raise tok.UserError(f"--mix names unknown sources {sorted(unknown)}; the data has {sorted(sizes)}")
    return normalised({s: float(mix.get(s, 0.0)) for s in sizes})


def parse_mix(text):
    """--mix: "paper", "natural", or "source=weight,source=weight"."""
    if text in ("paper", "natural"):
        return text
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise tok.UserError(f"--mix {text!r}: expected paper, natural, or source=weight,... (e.g. bible=1,python_code=2)") from None


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
                raise tok.UserError(f"source {source!r} has {size} tokens, fewer than one row of {length}: "
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
# The data, put together: documents -> curation -> shards -> the mix


class Data(NamedTuple):
    train: TokenShards
    val: TokenShards
    weights: dict  # sampling weight per training source, summing to 1


def corpus_documents(flags, log=print):
    """What --dataset / --data / the default corpus stand for: a function that streams the
    documents, and a key that names them for the shard cache (01 holds every source)."""
    if flags.dataset:
        cache = Path(flags.out).parent / "datasets"
        return tok.dataset_documents(flags.dataset, cache, flags.mirror, log), f"dataset:{flags.dataset}"
    if flags.data is not None:
        key = f"data:{Path(flags.data).resolve()} ({tok.data_fingerprint(flags.data)})"
        return functools.partial(tok.iter_documents, flags.data), key
    return tok.iter_documents, f"default corpus (Python {sys.version_info[0]}.{sys.version_info[1]})"


def curated_documents(documents, n_math, curation, tokenizer, out, log=print):
    """The documents plus `n_math` synthetic math problems; with `curation`, the training documents
    curated. Validation stays raw, so curated and uncurated runs are measured on the same text."""
    docs = chain(documents(), tok.math_documents(n_math))
    if not curation:
        return docs
    docs = list(docs)
    train = [d for d in docs if not tok.is_held_out(d.name)]
    held_out = [d for d in docs if tok.is_held_out(d.name)]
    language_id = train_language_id(train)
    kept, report, language = curate(train, tokenizer, log, language_id=language_id)
    log(curation_table(report))
    languages = {"documents": dict(Counter(language.values())), "per_document": language}
    if language_id:
        languages["held_out_verse_accuracy"] = language_id_accuracy(language_id, held_out)
        log("language ID (§3.1.1): " + ", ".join(f"{lang} {n:,} documents" for lang, n in languages["documents"].items())
            + "; accuracy on single held-out verses: "
            + ", ".join(f"{lang} {a:.1%}" for lang, a in languages["held_out_verse_accuracy"].items()))
    tok.atomic_write_text(out / "curation.json", json.dumps({"steps": report, "languages": languages}, indent=2))
    return iter(kept + held_out)


def prepare_data(flags, tokenizer, tokenizer_path, out, rank=0, world=1, log=print, wait=None):
    """Documents -> (synthetic math) -> curation -> token shards (built on rank 0, cached in
    `out`/data) -> the mix. Returns Data(train, val, weights). With several processes the others
    `wait()` for rank 0 (downloading and curating can take longer than a collective's timeout)."""
    documents, data_key = corpus_documents(flags, log)
    n_math = flags.math_problems if flags.math_problems is not None else (0 if flags.data or flags.dataset else 4000)
    mix = parse_mix(flags.mix)
    key = f"{data_key}; math {n_math}; curation {'v1' if flags.curation else 'off'}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        corpus = functools.partial(curated_documents, documents, n_math, flags.curation, tokenizer, out, log)
        prepare_shards(corpus, tokenizer, tokenizer_path, out / "data", key, log)
    if world > 1:
        wait()
        if not (out / "data" / "meta.json").is_file():
            raise tok.UserError(f"rank {rank} cannot see {out / 'data'}, which rank 0 wrote: with several nodes, "
                                f"--out must be on a filesystem that every node shares")
    train, val = TokenShards(out / "data", "train"), TokenShards(out / "data", "val")
    weights = mix_weights(train, mix)
    log("data mix: " + ", ".join(f"{s} {w:.1%}" for s, w in weights.items()))
    if rank == 0 and (out / "curation.json").is_file():
        report = json.loads((out / "curation.json").read_text())
        tok.atomic_write_text(out / "curation.json", json.dumps({**report, "mix": weights}, indent=2))
    return Data(train, val, weights)


# =============================================================================
# Part 2: training (Llama 3 §3.4.1)
# =============================================================================

@dataclass
class TrainConfig:
    model: str = "tiny"  # a 02_model preset
    seq_len: int = 256  # tokens per row (Llama 3: 8,192; 4,096 in its first stage)
    batch_tokens: int = 4096  # global batch per optimizer step, in tokens (all ranks, all micro-steps)
    micro_batch: int = 16  # rows per forward pass on each process
    steps: int = 150  # optimizer steps
    lr: float = 2e-3  # peak; small models take larger rates (Llama 3 405B: 8e-5, 8B: 3e-4)
    min_lr_ratio: float = 0.01  # §3.4.1: cosine decay to 8e-7 from a peak of 8e-5, i.e. 1%
    warmup: int = 15  # §3.4.1: linear warmup (8,000 steps for 405B)
    # The paper does not state AdamW's betas, eps, weight decay or clipping for Llama 3; these are
    # Llama 2's (§2.2 of that paper): beta2 = 0.95, eps = 1e-5, weight decay 0.1, clip 1.0.
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-5  # AdamW's epsilon
    weight_decay: float = 0.1  # decoupled, on matrices only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    batch_ramp: bool = False  # §3.4.1: 1/4 of the batch for the first 1.6% of steps, 1/2 until 18.4%
    doc_mask: bool = True  # §3.2 document mask inside packed rows
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})  # autocast, or FSDP's param dtype
    compile: bool = False  # torch.compile the model (worth it on GPUs)
    eval_every: int = 50  # steps between validation losses
    eval_rows: int = 24  # validation rows per source
    sample_every: int = 75  # steps between samples
    ckpt_every: int = 50  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    seed: int = 1337  # weights and the data order


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
# The schedule and the optimizer


def lr_at(step, cfg):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio · peak at the last step (§3.4.1)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def rows_at(step, cfg, world=1):
    """Rows in the global batch at `step`: batch_tokens / seq_len, scaled by the ramp and rounded to
    a multiple of the number of processes (each process gets at least one row)."""
    return world * max(1, round(cfg.batch_tokens // cfg.seq_len * batch_fraction_at(step, cfg) / world))


def batch_fraction_at(step, cfg):
    """§3.4.1's ramp, scaled to this run's length: 4M tokens for the first 252M of 15.6T (1.6%),
    8M until 2.87T (18.4%), then 16M, i.e. 1/4, 1/2, then the whole batch."""
    if not cfg.batch_ramp:
        return 1.0
    done = step / max(cfg.steps, 1)
    return 0.25 if done < 0.016 else 0.5 if done < 0.184 else 1.0


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5, fused=False):
    """AdamW with decoupled weight decay on matrices only: norms' gains and the embedding are not
    decayed (a common choice; the paper does not say)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "tok_embeddings" in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# -----------------------------------------------------------------------------
# One training step, the same for every chapter that trains


def next_token_loss(model, batch, doc_mask=True):
    """Pretraining's loss: the summed cross-entropy of every next token of a micro-batch of
    (tokens, doc_ids) rows of T+1 tokens, and how many targets that is."""
    tokens, doc_ids = batch
    logits = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1] if doc_mask else None)  # (b, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return loss, tokens[:, 1:].numel()


def pretraining_loss(cfg):
    """The loss_fn the loop trains with: next tokens, with the document mask unless --no-doc-mask."""
    return functools.partial(next_token_loss, doc_mask=cfg.doc_mask)


def split_micro_batches(tensors, size, n_micro, device):
    """The first n_micro·size rows of each tensor, as n_micro micro-batches of `size` rows on `device`."""
    return [tuple(t[i * size:(i + 1) * size].to(device, non_blocking=True) for t in tensors) for i in range(n_micro)]


def train_step(model, optimizer, micro_batches, loss_fn, lr, grad_clip=1.0, autocast=contextlib.nullcontext(),
               world=1):
    """One optimizer step: set the learning rate, accumulate gradients over the micro-batches, turn
    them into the mean over every target of the global batch, clip, step. The same step serves every
    chapter that trains; only `loss_fn(model, micro_batch) -> (summed loss, number of targets)`
    differs (next tokens here; answers in SFT, preference pairs in the reward model and DPO). Summing
    rather than averaging per micro-batch makes the result the same as one pass over the whole batch
    even when micro-batches hold different numbers of targets. Returns (mean loss, gradient norm
    before clipping); a NaN or inf raises FloatingPointError before the weights change."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, n_targets = 0.0, 0
    for i, micro_batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter only after the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with autocast:
            loss, n = loss_fn(model, micro_batch)
        loss.backward()  # gradients add up across micro-batches
        loss_sum, n_targets = loss_sum + loss.detach().float(), n_targets + n
    loss_sum, n_targets = all_reduce_sum([loss_sum, n_targets], world)
    scale = world / max(n_targets, 1)  # FSDP already averaged the gradients over the `world` ranks
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    mean_loss = loss_sum / max(n_targets, 1)
    if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):  # never step on a NaN
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss {mean_loss}, grad norm {grad_norm}: training diverged (try a lower --lr)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


# -----------------------------------------------------------------------------
# Evaluation and samples


@torch.no_grad()
def eval_losses(model, shards, rows, seq_len, seed, device, doc_mask=True, autocast=contextlib.nullcontext(),
                micro_batch=None, rank=0, world=1):
    """Mean next-token loss per source on `rows` fixed rows of `seq_len` tokens (the same rows at
    every call), split across ranks (rows must divide evenly, so that every rank runs as many
    forward passes as the others) and run `micro_batch` rows at a time."""
    was_training = model.training
    model.eval()
    sums = []
    for source in shards.sources:
        rng = np.random.default_rng([seed, 10**9])
        tokens, doc_ids = sample_batch(shards, {source: 1.0}, rows, seq_len + 1, rng)
        mine = slice(rank * rows // world, (rank + 1) * rows // world)
        size = micro_batch or rows
        loss_sum, n_targets = 0.0, 0
        for batch in split_micro_batches((tokens[mine], doc_ids[mine]), size, math.ceil(len(tokens[mine]) / size),
                                         device):
            with autocast:
                loss, n = next_token_loss(model, batch, doc_mask)
            loss_sum, n_targets = loss_sum + loss.float(), n_targets + n
        sums += [loss_sum, n_targets]
    sums = all_reduce_sum(sums, world)
    model.train(was_training)
    return {source: sums[2 * i] / sums[2 * i + 1] for i, source in enumerate(shards.sources)}


def generate_sample(model, tokenizer, seed, context_len, device, fixed_length=False):
    """A short sample (temperature 0.8, top-p 0.95) from a BOS and a newline: progress you can read.
    `fixed_length`: under FSDP every rank must run the same number of forward passes (each gathers
    weights from all), so none may stop early on its own stop token: generate all 64, cut after."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = tokenizer.encode("\n", bos=True)
    # Generation's shapes (prompt, KV cache) are not training's: run it eagerly, not recompiled.
    with torch.compiler.set_stance("force_eager"):
        ids = mdl.generate(model, [prompt], max_new_tokens=min(64, context_len - len(prompt)), temperature=0.8,
                           top_p=0.95, stop_tokens=() if fixed_length else tokenizer.stop_tokens,
                           generator=generator)[0]
    model.train(was_training)
    stops = [i for i, t in enumerate(ids) if t in tokenizer.stop_tokens]
    return tokenizer.decode(ids[:stops[0]] if stops else ids)


# -----------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What the loop needs besides the model and the data: where it writes, who it is (the rank of
    this process among `world`), how it computes, and whether it was asked to stop."""
    out: Path
    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: object = contextlib.nullcontext()
    peak_flops: float = float("nan")  # what MFU divides by (Part 3's peak_flops)
    log_file: object = None  # log.jsonl, written by rank 0
    stop: object = None  # Part 3's StopSignal: Ctrl-C asks the loop to stop at the next step

    def __post_init__(self):
        self.stop = self.stop or StopSignal(enabled=False)
        # Part 3: data preparation on rank 0 may outlast a collective's default timeout (10 minutes):
        # the other ranks wait for it in a group of their own, with a timeout that fits a download.
        self.slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=6)) if self.world > 1 else None

    def wait_for_rank0(self):
        dist.barrier(group=self.slow_group)

    def stop_requested(self):
        """Whether Ctrl-C (or torchrun's SIGTERM) reached any process: all ranks then stop at the same
        step, so the checkpoint they gather together is complete."""
        if self.world == 1:
            return self.stop.requested
        return all_reduce_sum([torch.tensor(float(self.stop.requested), device=self.device)], self.world)[0] > 0

    def log(self, *args, **kwargs):  # rank 0 speaks for everyone
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    def write(self, record):
        if self.log_file:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()


def train(model, optimizer, data, cfg, run, tokenizer, start_step=0, stop_after=None):
    """The training loop. Each pass evaluates and samples when due, saves a checkpoint when due, ends
    after the last step (or when asked to stop), else takes one optimizer step and logs one line.
    Returns the step it ended at."""
    flops_per_token = mdl.flops_per_token(model.args, cfg.seq_len)
    loss_fn = pretraining_loss(cfg)
    t_run = time.time()
    for step in range(start_step, cfg.steps + 1):
        last = step == cfg.steps
        logged = step == start_step > 0  # resumed here: this step's evaluation and sample came before its checkpoint
        if (step % cfg.eval_every == 0 or last) and not logged:
            val = eval_losses(model, data.val, cfg.eval_rows, cfg.seq_len, cfg.seed, run.device, doc_mask=cfg.doc_mask,
                              autocast=run.autocast, micro_batch=cfg.micro_batch, rank=run.rank, world=run.world)
            run.log(f"step {step}: val " + " | ".join(f"{s} {v:.3f}" for s, v in val.items()))
            run.write({"step": step, "val": val})
        if ((step % cfg.sample_every == 0 and step > 0) or last) and not logged:
            text = generate_sample(model, tokenizer, cfg.seed, cfg.seq_len, run.device, fixed_length=run.world > 1)
            run.log(f"sample: {text!r}")
            run.write({"step": step, "sample": text})
        stopping = run.stop_requested() or (stop_after is not None and step - start_step >= stop_after)
        if step > start_step and (step % cfg.ckpt_every == 0 or last or stopping):
            save_training_checkpoint(model, optimizer, cfg, step, run)
        if last or stopping:
            return step

        t0 = time.time()
        rows_now = rows_at(step, cfg, run.world)  # the batch ramp, if on, in global rows
        tokens, doc_ids = batch_for_step(data.train, data.weights, cfg, step, run.rank, run.world, rows_now)
        n_micro = math.ceil(len(tokens) / cfg.micro_batch)  # (rows_now/world, T+1) in micro-batches
        micro_batches = split_micro_batches((tokens, doc_ids), cfg.micro_batch, n_micro, run.device)
        lr = lr_at(step, cfg)
        try:
            loss, grad_norm = train_step(model, optimizer, micro_batches, loss_fn, lr, cfg.grad_clip, run.autocast,
                                         run.world)
        except FloatingPointError as e:
            kept = checkpoints(run.out)
            raise FloatingPointError(f"step {step + 1}: {e}. The last good checkpoint is kept: "
                                     f"{kept[-1] if kept else 'none yet'}") from None
        if run.device.type == "cuda":
            torch.cuda.synchronize()  # the optimizer's kernels are still queued: wait, or dt reads short
        dt = time.time() - t0
        step_tokens = rows_now * cfg.seq_len
        tps, mfu = step_tokens / dt, step_tokens / dt * flops_per_token / (run.peak_flops * run.world)
        eta = (time.time() - t_run) / (step + 1 - start_step) * (cfg.steps - step - 1)
        run.log(f"step {step + 1:>5}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:5.2f} | "
                f"{dt * 1000:6.0f} ms | {tps:7,.0f} tok/s | MFU {mfu:5.1%} | ETA {eta / 60:4.1f} min")
        run.write({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000,
                   "tokens_per_s": tps, "mfu": mfu, "tokens": step_tokens})


# =============================================================================
# main: Parts 1 and 2 put together (Part 3 below adds what scale needs)
# =============================================================================


def main(argv=None):
    flags = parse_flags(argv)
    device, rank, world = init_distributed(flags.device)  # one process unless launched by torchrun
    try:
        pretrain(flags, device, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain(flags, device, rank=0, world=1):
    """The whole run: config, tokenizer, data, model, (resume), the loop, and what it leaves behind."""
    cfg = train_config(flags, device, world)
    run = Run(Path(flags.out), device, rank, world)
    existing = checkpoints(run.out)
    # Refuse to overwrite a run: nothing saved is lost to a run started by mistake.
    if existing and not flags.resume:
        raise tok.UserError(f"{run.out} already holds checkpoints ({existing[-1].name}): pass --resume to "
                            f"continue that run, or --out to start a new one")
    if flags.resume and not existing and not (run.out / "log.jsonl").is_file():
        raise tok.UserError(f"--resume: no ckpt_*.pt and no log.jsonl in {run.out}, so nothing to resume; "
                            f"start without --resume")
    tokenizer, tokenizer_path = load_tokenizer(flags.tokenizer, run)
    data = prepare_data(flags, tokenizer, tokenizer_path, run.out, rank, world, run.log, run.wait_for_rank0)
    model, optimizer, run.autocast = build_model(cfg, flags, tokenizer, run)
    if flags.resume and not existing:
        run.log(f"no checkpoint in {run.out} yet: starting again from step 0")
    start_step = resume(model, optimizer, cfg, run) if existing else 0
    run.peak_flops = peak_flops(device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    run.log_file = start_log(model, cfg, tokenizer_path, run, resume_at=start_step if existing else None)
    run.stop = StopSignal()  # Ctrl-C: stop at the next step, with a checkpoint
    with run.stop:
        step = train(model, optimizer, data, cfg, run, tokenizer, start_step, flags.stop_after)
    finish(model, optimizer, cfg, step, run)


def train_config(flags, device, world=1):
    """The preset (gpu with CUDA, else cpu) with the flags given on the command line, checked."""
    cfg = config_from_flags(flags, TRAIN_PRESETS[flags.preset or ("gpu" if device.type == "cuda" else "cpu")])
    rows = cfg.batch_tokens // cfg.seq_len
    if flags.micro_batch is None:  # not given: no more rows per forward pass than each process gets
        cfg = replace(cfg, micro_batch=max(1, min(cfg.micro_batch, rows // world)))
    if cfg.batch_tokens % cfg.seq_len or rows % (world * cfg.micro_batch):
        raise tok.UserError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of seq_len ({cfg.seq_len}) x "
                            f"micro_batch ({cfg.micro_batch}) x processes ({world}) = "
                            f"{cfg.seq_len * cfg.micro_batch * world}")
    if cfg.eval_rows % world:
        raise tok.UserError(f"--eval-rows {cfg.eval_rows} must be a multiple of the number of processes ({world})")
    return cfg


def load_tokenizer(path, run):
    """01's tokenizer; on a fresh clone the default one is trained first (01_tokenizer.py's defaults)."""
    path = Path(path)
    if not path.is_file():
        if path != Path("runs/01_tokenizer/tokenizer.model"):
            raise tok.UserError(f"--tokenizer {path} not found")
        if run.rank == 0:
            run.log(f"no tokenizer at {path} yet: training one first (python 01_tokenizer.py) ...")
            tok.train_tokenizer(out=path.parent)
        if run.world > 1:
            run.wait_for_rank0()
    return Tokenizer.load(path), path


MODEL_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")  # --dim 64 --n-layers 2 reshape a preset


def build_model(cfg, flags, tokenizer, run):
    """The model (the same weights on every rank, from the seed), sharded across ranks when there
    are several, its optimizer, and the autocast context it computes in."""
    torch.manual_seed(cfg.seed)
    shape = {name: getattr(flags, name) for name in MODEL_FLAGS if getattr(flags, name) is not None}
    model_args = mdl.preset(cfg.model, vocab_size=tokenizer.n_words, max_seq_len=cfg.seq_len,
                            attn_impl=pick_attention(run.device, cfg, run.log), **shape)
    model = Transformer(model_args).to(run.device)
    if dist.is_initialized():  # under torchrun, even with one process (it exercises the same path)
        shard_model(model, run.device, cfg.dtype)  # Part 3: FSDP2
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                               fused=run.device.type == "cuda")  # built after sharding: it holds the shards
    if cfg.compile:
        # Each block on its own (torchtitan's choice): compiling the whole model graph-breaks in the
        # layer loop under FSDP. Static shapes: every micro-batch has the same size. In place, so the
        # state dict keeps its plain names (no _orig_mod. prefix).
        for block in model.layers:
            block.compile(dynamic=False)
    if cfg.dtype == "bfloat16" and run.device.type == "cpu" and (slowdown := bf16_slowdown()) > 1.5:
        run.log(f"note: a bf16 matmul runs {slowdown:.1f}x slower than fp32 on this CPU (it has no native bf16); "
                f"--dtype float32 is faster here")
    # one process: bf16 autocast; under FSDP its mixed-precision policy casts instead
    return model, optimizer, mdl.autocast(run.device, "float32" if dist.is_initialized() else cfg.dtype)


def start_log(model, cfg, tokenizer_path, run, resume_at=None):
    """Print what is about to run; on rank 0 copy the tokenizer beside the run and open log.jsonl (a
    header line, then one record per event). Resuming at a step keeps the records up to it and
    drops what came after (truncate_log). Returns the open log file (None on other ranks)."""
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters | {run.world} process(es) on {run.device} | "
            f"{cfg.dtype} | batch {cfg.batch_tokens:,} tokens = {cfg.batch_tokens // cfg.seq_len} rows x "
            f"{cfg.seq_len} | {cfg.steps} steps")
    if run.rank != 0:
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path, run.out / "tokenizer.model")
    # resuming at step S: the records of steps up to S were written before checkpoint S
    kept = truncate_log(run.out / "log.jsonl", lambda r: r.get("step", 0) <= resume_at) if resume_at is not None else []
    header_kept = bool(kept) and "config" in kept[0]
    log_file = open(run.out / "log.jsonl", "a" if header_kept else "w")
    if not header_kept:  # the header: what every later record is relative to
        log_file.write(json.dumps({"config": asdict(cfg), "model": asdict(model.args), "params": n_params,
                                   "world": run.world, "device": str(run.device), "peak_flops": run.peak_flops}) + "\n")
    return log_file


def finish(model, optimizer, cfg, step, run):
    """After the loop: the plot, and for a finished run the final model and its metrics."""
    if run.log_file:
        run.log_file.close()
    finished = step == cfg.steps
    model_state = full_state(model, optimizer)[0] if finished else None  # every rank takes part in gathering
    if run.rank != 0:
        return
    plot_losses(run.out / "log.jsonl", run.out / "loss.png")
    if not finished:
        run.log(f"stopped at step {step}; continue with: python 03_pretrain.py --resume --out {run.out}")
        return
    mdl.save_checkpoint(run.out / "model.pt", model, state_dict=model_state, step=step)
    records = [json.loads(line) for line in open(run.out / "log.jsonl")]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    metrics = {"steps": cfg.steps, "params": records[0]["params"],
               "final_train_loss": steps[-1]["loss"] if steps else None, "val_loss": vals[-1]["val"] if vals else {},
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps])) if steps else None,
               "mfu": float(np.median([r["mfu"] for r in steps])) if steps else None,
               "device": str(run.device), "world": run.world, "peak_flops": run.peak_flops,
               "peak_memory_gb": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None}
    tok.atomic_write_text(run.out / "metrics.json", json.dumps(metrics, indent=2))
    run.log(f"done: {run.out / 'model.pt'}, {run.out / 'loss.png'}, {run.out / 'metrics.json'}")


# =============================================================================
# Part 3: at scale (Llama 3 §3.3): several processes, checkpoints, speed, signals
# =============================================================================

# -----------------------------------------------------------------------------
# FSDP2 under torchrun


def init_distributed(device_flag):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group (NCCL between GPUs,
    gloo on CPU), one GPU per process. Without torchrun: one process. Returns (device, rank, world)."""
    device_name = mdl.pick_device(device_flag)
    if "RANK" not in os.environ and not dist.is_initialized():
        return torch.device(device_name), 0, 1
    if device_name.startswith("cuda"):  # one GPU per process, chosen before the group forms
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device_name)
    if not dist.is_initialized():  # (a test or a notebook may have joined a group already)
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
    return torch.device(device_name), dist.get_rank(), dist.get_world_size()


def shard_model(model, device, dtype):
    """FSDP2 (torchtitan's recipe): shard every block, then the root, over all ranks. Each rank keeps
    1/world of every parameter, gradient and optimizer state, and gathers a block's full weights just
    before using it. §3.3.2: parameters in bf16 for compute, gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # cast_forward_inputs=False: the fp32 RoPE tables a block receives stay fp32 (the default would
    # cast them to bf16 on several GPUs but not on one; torchtitan sets the same)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if dtype == "bfloat16" else MixedPrecisionPolicy(cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def all_reduce_sum(values, world):
    """Sum a list of numbers (floats, ints or 0-d tensors) over ranks; returns floats. The tensor
    lives on the device the numbers come from: NCCL accepts only GPU tensors."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    t = torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# Checkpoints and resuming


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


def save_training_checkpoint(model, optimizer, cfg, step, run):
    """ckpt_NNNNNN.pt: everything resuming needs (weights, optimizer, config, step, RNG), written by
    rank 0 after every rank helped gather it; only the newest cfg.keep_last are kept."""
    model_state, optimizer_state = full_state(model, optimizer)
    if run.rank != 0:
        return
    path = run.out / f"ckpt_{step:06d}.pt"
    mdl.save_checkpoint(path, model, state_dict=model_state, optimizer=optimizer_state, config=asdict(cfg),
                        step=step, rng=torch.get_rng_state())
    for old in checkpoints(run.out)[:-cfg.keep_last]:
        old.unlink()
    run.log(f"saved {path}")


def load_latest_checkpoint(out, log=print):
    """The newest checkpoint in `out` that loads, and its path. One that does not (truncated by a
    full disk, say) is reported by name and the one before it is used."""
    for path in reversed(checkpoints(out)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: any unpickling or zip error
            log(f"warning: {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                f"trying the checkpoint before it")
    raise tok.UserError(f"no checkpoint in {out} can be loaded: start a new run with --out, or without --resume")


def resume(model, optimizer, cfg, run):
    """Load the newest good checkpoint into the (possibly sharded) model and optimizer, after checking
    it continues the same run. Returns the step to continue from."""
    path, ckpt = load_latest_checkpoint(run.out, run.log)
    now = asdict(model.args)
    if ckpt["args"] != now:
        diff = {k: (v, now.get(k)) for k, v in ckpt["args"].items() if now.get(k) != v}
        raise tok.UserError(f"{path} was trained with another model config (checkpoint vs now): {diff}")
    for key in ("seq_len", "batch_tokens", "seed"):
        if ckpt["config"][key] != getattr(cfg, key):
            raise tok.UserError(f"{path} used {key}={ckpt['config'][key]}, this run {getattr(cfg, key)}: "
                                f"resuming would not continue the same data stream")
    load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    run.log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def for_device(cfg, device):
    """The compute fields of a later chapter's config (04-09) made concrete for `device`: dtype
    "auto" is bf16 autocast on CUDA and fp32 elsewhere; micro_batch 0 is the whole batch in one pass
    on a CPU and one row at a time on a GPU (rows there are long)."""
    cuda = device.type == "cuda"
    changes = {"dtype": cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")}
    if hasattr(cfg, "micro_batch"):
        changes["micro_batch"] = cfg.micro_batch or (1 if cuda else 0)
    return replace(cfg, **changes)


def claim_run_folder(out, resume, interrupted="ckpt.pt", finished="model.pt"):
    """What a chapter that resumes (04 and later) finds in its --out folder, refusing to overwrite
    anything without --resume: "interrupted" (a checkpoint to resume from: `interrupted` names it, a
    glob pattern), "finished" (the `finished` file and no checkpoint: nothing left to do) or "new"."""
    out = Path(out)
    if any(out.glob(interrupted)):
        if not resume:
            raise tok.UserError(f"{out} holds an interrupted run ({interrupted}): pass --resume to continue it, "
                                f"or --out to start another")
        return "interrupted"
    if (out / finished).is_file():
        if not resume:
            raise tok.UserError(f"{out} already holds a finished run ({finished}): pass --out to start another "
                                f"(or delete {out})")
        return "finished"
    return "new"


class PhaseCheckpoints:
    """Resuming a post-training run (06-09) at its training phases. Each training loop of a run is a
    phase with a name ("seed 7 round 2"); every `every` steps and after its last it saves what its next
    step needs (weights, optimizer, RNG states, log so far) to out/phase_NAME.pt, durably and atomically.
    A finished phase's file stays until the run ends, so a resumed run repeats its sampling and
    evaluation, which are seeded and give the same results, and skips the training already done. With
    no `out` (tests, notebooks) nothing is saved or loaded."""

    def __init__(self, out=None, config=None, every=50, resume=False, log=print):
        self.out, self.config, self.every, self.resume, self.log = out and Path(out), config, every, resume, log

    def path(self, phase):
        return self.out / ("phase_" + re.sub(r"\W+", "_", phase).strip("_") + ".pt")

    def restore(self, phase, model, optimizer, rng):
        """Loads the phase's saved weights, optimizer state and the state of its data-order `rng` (a
        random.Random); returns the rest of what it saved (step, log, ...), or {} when there is nothing
        to resume. A file that cannot be loaded is reported by name and the phase starts over."""
        path = self.out and self.path(phase)
        if not (self.resume and path and path.is_file()):
            return {}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: any unpickling or zip error
            self.log(f"warning: {path} cannot be loaded ({type(e).__name__}); {phase} starts over")
            return {}
        if state.pop("config") != self.config:
            raise tok.UserError(f"{path} was written with another configuration: resume with the same flags, "
                                f"or start again with another --out")
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        rng.setstate(state.pop("rng"))
        self.log(f"resumed {phase} at step {state['step']} from {path.name}")
        return state

    def save(self, phase, step, last, model, optimizer, rng, **state):
        """After step `step` of a phase whose last step is `last`: saves when a checkpoint is due (every
        `every` steps, and the last)."""
        if self.out and (step % self.every == 0 or step == last):
            mdl.atomic_save({"config": self.config, "step": step, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "rng": rng.getstate(), **state}, self.path(phase))

    def finish(self):
        """The run is complete: its phase files go."""
        for path in self.out.glob("phase_*.pt") if self.out else ():
            path.unlink()


def truncate_log(path, keep):
    """Make a log.jsonl read as one clean run up to the checkpoint being resumed: keep the records
    for which keep(record) holds (those written before the checkpoint), drop the others (a crash
    after the checkpoint logged steps that are about to be redone) and a last line cut short by the
    crash. Returns the records kept. Every chapter that resumes does this."""
    kept = []
    for line in (Path(path).read_text().splitlines() if Path(path).is_file() else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # cut short mid-write: nothing after it was written either
        if keep(record):
            kept.append(record)
    tok.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


# -----------------------------------------------------------------------------
# Speed: the peak that MFU divides by, and the attention kernel


# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's H100, H200 and A100 datasheets: bf16,
# and tf32 (what fp32 matmuls run as on CUDA here). Matched in order against torch.cuda.get_device_name,
# e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL".
GPU_PEAK_TFLOPS = [("H200 NVL", 835, 418), ("H200", 989, 494), ("H100 NVL", 835, 418), ("H100 PCIe", 756, 378),
                   ("H100", 989, 494), ("A100", 312, 156)]


def datasheet_peak(device, dtype):
    """The datasheet peak FLOP/s of a known GPU for `dtype`, or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32 in GPU_PEAK_TFLOPS:
        if key in name:
            return (bf16 if dtype == torch.bfloat16 else tf32) * 1e12
    return None


def measured_peak(device, dtype):
    """The best matmul rate measured here over a few shapes and repeats (one timing alone is at the
    mercy of clock ramp-up and other processes, and a low peak makes MFU read too high)."""
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


def peak_flops(device, dtype):
    """FLOP/s that MFU divides by: a known GPU's datasheet peak for the dtype, else a measured one."""
    return datasheet_peak(device, dtype) or measured_peak(device, dtype)


def bf16_slowdown(seconds=0.05):
    """How many times longer a bf16 matmul takes than an fp32 one on this CPU, timed for `seconds`
    each: below 1 where the CPU computes in bf16 (AVX-512 bf16, AMX), ~20 where it emulates it."""
    def rate(dtype):
        a, b = torch.randn(256, 256, dtype=dtype), torch.randn(256, 512, dtype=dtype)
        a @ b  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        return n / (time.perf_counter() - t0)
    return rate(torch.float32) / rate(torch.bfloat16)


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


# -----------------------------------------------------------------------------
# Ctrl-C


class StopSignal:
    """While active, Ctrl-C (SIGINT) and SIGTERM (what torchrun sends its workers when it is stopped)
    do not kill the run: they set `requested`, and the loop stops at the next step, saving a
    checkpoint first. A second Ctrl-C while stopping is ignored; kill -9 is not (and --resume copes)."""

    def __init__(self, enabled=True):
        self.enabled, self.requested = enabled, False

    def _ask(self, *_):
        self.requested = True

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self._ask) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        if self.enabled:
            for s, handler in self.previous.items():
                signal.signal(s, handler)


# =============================================================================
# Plumbing: command-line flags, plots
# =============================================================================


def field_comments(cls):
    """The trailing comment of each field of a dataclass, read from its source: the --help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen build): flags without help texts
        return {}
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M))


def comma_separated(kind):
    def parse(text):
        return tuple(kind(x) for x in text.split(","))
    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def add_config_flags(parser, cls, defaults, where="", only=None):
    """One flag per field of the config dataclass `cls` (or of the fields named in `only`): seq_len
    -> --seq-len N, a bool -> --doc-mask / --no-doc-mask, a tuple -> comma-separated values, a field
    with metadata {"choices": ...} -> one of those. Each defaults to None, so that config_from_flags
    can tell which were given; the help text is the field's comment. Every chapter builds its
    command line this way."""
    comments = field_comments(cls)
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{comments.get(f.name, '')} (default{where}: {shown})".strip().replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # int | None -> int
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is tuple:
            item = f.metadata.get("item", type(default[0]) if default else str)
            parser.add_argument(flag, type=comma_separated(item), default=None, help=text, metavar="A,B,...")
        else:
            parser.add_argument(flag, type=kind, default=None, help=text, choices=f.metadata.get("choices"))


def config_from_flags(flags, defaults):
    """`defaults` (a config dataclass) with the fields given on the command line replaced."""
    given = {f.name: getattr(flags, f.name) for f in fields(defaults) if getattr(flags, f.name, None) is not None}
    return replace(defaults, **given)


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                        help="training preset (default: gpu when CUDA is available, else cpu)")
    add_config_flags(parser, TrainConfig, TRAIN_PRESETS["cpu"], where=" in the cpu preset")
    add_config_flags(parser, ModelArgs, mdl.PRESETS["tiny"], where=" in the tiny preset", only=MODEL_FLAGS)
    parser.add_argument("--data", default=None, help="your text: .txt/.md/.jsonl/.parquet file or folder")
    parser.add_argument("--dataset", default=None, choices=list(tok.DATASETS), help="download a public corpus")
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


def figure(ncols=1, figsize=(7, 4)):
    """A matplotlib figure and its axes, made without pyplot: no global backend to switch, nothing
    left open, and safe to call from a notebook. Every chapter's plots start here."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def save_figure(fig, path):
    """Lay out and write a figure as PNG, atomically like every other output."""
    fig.tight_layout()
    tok.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_losses(log_path, png_path):
    """Training loss per step and validation loss per source, from a log.jsonl."""
    records = [json.loads(line) for line in open(log_path)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = figure()
    if train:
        ax.plot(*zip(*train), label="train", color="black", lw=1)
    for source in sorted({s for r in records if "val" in r for s in r["val"]}):
        points = [(r["step"], r["val"][source]) for r in records if "val" in r and source in r["val"]]
        ax.plot(*zip(*points), marker="o", label=f"val: {source}")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.grid(alpha=0.3), ax.legend()
    save_figure(fig, png_path)


if __name__ == "__main__":
    tok.run_main(main)
