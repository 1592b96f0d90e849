"""04_long_context.py: the NIAH generator and scorer by hand, RoPE levers band by band, and a short
extension of a tiny pretrained model."""
import importlib
import json
import math
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import long_context_argv

lc = importlib.import_module("04_long_context")
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")
tok = importlib.import_module("01_tokenizer")
ROOT = Path(__file__).resolve().parent.parent


def test_needle_example_by_hand(pretrained):
    _, tokenizer = pretrained
    filler = tokenizer.encode("lorem ipsum dolor sit amet " * 40)
    needle = tokenizer.encode(lc.NEEDLE.format(number=4821))
    question = tokenizer.encode(lc.QUESTION)
    for depth in (0.0, 0.5, 1.0):
        ids = lc.needle_example(tokenizer, filler, 80, depth, 4821)
        assert len(ids) == 80 and ids[0] == tokenizer.bos_id and ids[-len(question):] == question
        n_filler = 80 - 1 - len(needle) - len(question)
        at = 1 + round(depth * n_filler)
        assert ids[at:at + len(needle)] == needle
    assert lc.needle_example(tokenizer, filler, 80, 0.0, 4821)[1:1 + len(needle)] == needle  # depth 0: first
    with_answer = lc.needle_example(tokenizer, filler, 80, 0.3, 4821, with_answer=True)
    assert tokenizer.decode(with_answer).endswith("The secret number is 4821.")
    with pytest.raises(tok.UserError, match="too short"):
        lc.needle_example(tokenizer, filler, 10, 0.5, 4821)


def test_read_number():
    assert lc.read_number(" 4821.") == 4821 and lc.read_number(" is 12 or 5") == 12 and lc.read_number("none") is None


def test_niah_scorer_with_oracles(pretrained):
    """An oracle that reads the needle from the prompt scores 100% everywhere; one that fails only
    when the needle is at depth 0 scores 0% in that row alone."""
    _, tokenizer = pretrained
    model = mdl.Transformer(mdl.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.n_words,
                                          max_seq_len=128))
    filler = np.array(tokenizer.encode("the quick brown fox jumps over the lazy dog " * 200))

    def oracle(model, prompts, fail_at_start=False):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            number = re.search(r"secret number is (\d+)\.", text).group(1)
            wrong = fail_at_start and text.index("The secret") < 5 + len("<|begin_of_text|>")
            out.append(tokenizer.encode(" 1." if wrong else f" {number}."))
        return out
    depths = (0.0, 0.5, 1.0)
    grid = lc.niah_accuracy(model, tokenizer, filler, [64, 128], depths, trials=3, answer=oracle)
    assert grid.shape == (3, 2) and (grid == 1).all()
    grid = lc.niah_accuracy(model, tokenizer, filler, [64, 128], depths, trials=3,
                            answer=lambda m, p: oracle(m, p, fail_at_start=True))
    assert (grid[0] == 0).all() and (grid[1:] == 1).all()
    with pytest.raises(tok.UserError, match="beyond the model's 128 positions"):
        lc.niah_accuracy(model, tokenizer, filler, [256], depths, trials=1, answer=oracle)


def test_rope_levers_change_only_the_intended_bands():
    base = mdl.ModelArgs(dim=256, n_heads=2, n_kv_heads=2, max_seq_len=256)  # head_dim 128
    f0 = mdl.rope_frequencies(base)
    wavelength = 2 * math.pi / f0
    scaled = lc.extend_rope(base, 512, 256, 1024, "scale")
    assert scaled.max_seq_len == 512 and scaled.rope_scale_factor == 4 and scaled.rope_original_max_len == 256
    f1 = mdl.rope_frequencies(scaled)
    short, long = wavelength < 256 / 4, wavelength > 256
    assert torch.allclose(f1[short], f0[short]) and torch.allclose(f1[long], f0[long] / 4)
    middle = ~short & ~long
    assert middle.any() and ((f1[middle] < f0[middle]) & (f1[middle] > f0[middle] / 4)).all()
    theta = lc.extend_rope(base, 1024, 256, 1024, "theta")
    assert theta.rope_theta == 4 * base.rope_theta and theta.max_seq_len == 1024
    assert lc.extend_rope(base, 512, 256, 1024, "none") == replace(base, max_seq_len=512)
    with pytest.raises(tok.UserError, match="choose scale, theta or none"):
        lc.extend_rope(base, 512, 256, 1024, "yarn")


def test_short_extension_updates_the_context_and_lowers_long_position_loss(long_context):
    out = long_context
    model, args = mdl.load_checkpoint(out)
    assert args.max_seq_len == 128 and args.use_scaled_rope and args.rope_original_max_len == 64
    metrics = json.loads((out / "metrics.json").read_text())
    stages = metrics["stages"]
    assert [s["length"] for s in stages] == [96, 128]
    for s in stages:  # the gate's two parts are measured and reported for every stage
        assert {"short_loss", "short_loss_before", "recovered", "niah", "niah_solved"} <= set(s)
    assert stages[-1]["long_position_loss"] < stages[0]["long_position_loss_before"]
    assert (out / "niah.png").stat().st_size > 1000 and (out / "rope.png").is_file()


def test_sigkill_then_resume_gives_the_uninterrupted_run(pretrained, long_context, tmp_path):
    """kill -9 in the middle of stage 2, then --resume (from the checkpoint before stage 1's gate):
    the same log, each step once, and the same model as the uninterrupted run."""
    folder, _ = pretrained
    out = tmp_path / "04"
    argv = long_context_argv(folder, out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "04_long_context.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("stage 2 (128 tokens) step  10"):
            proc.kill()
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and (out / "ckpt.pt").is_file()
    with pytest.raises(tok.UserError, match="--resume"):
        lc.main(argv)  # an interrupted run is never overwritten
    lc.main(argv + ["--resume"])
    log = lambda folder: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "log.jsonl")]
    assert log(out) == log(long_context)
    ours, theirs = (torch.load(f / "model.pt", weights_only=True)["model"] for f in (out, long_context))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and not (out / "ckpt.pt").exists()
    with pytest.raises(tok.UserError, match="finished run"):
        lc.main(argv)


def test_bad_input(pretrained, tmp_path):
    folder, _ = pretrained
    with pytest.raises(tok.UserError, match="run python 03_pretrain.py first"):
        lc.main(["--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    with pytest.raises(tok.UserError, match="longer than the current context"):
        lc.main(["--init", str(folder / "03"), "--out", str(tmp_path / "o"), "--stages", "48,96", "--device", "cpu"])
    with pytest.raises(tok.UserError, match="each stage must be longer"):
        lc.main(["--init", str(folder / "03"), "--out", str(tmp_path / "o"), "--stages", "128,96", "--device", "cpu"])
