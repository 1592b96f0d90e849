"""04_long_context.py: the NIAH generator and scorer by hand, RoPE levers band by band, and a short
extension of a tiny pretrained model."""
import importlib
import json
import math
import re
import shutil
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


class NeedleCopier(mdl.Transformer):
    """Not a language model: a stand-in that reads the needle from what it was given (prefill and the
    tokens generated since) and answers it, token by token, through the real `generate` (left
    padding, KV cache, stop tokens) and decoding. It misses a needle that starts within the first
    `blind` positions of a prompt."""

    def __init__(self, args, tokenizer, blind=0):
        super().__init__(args)
        self.tokenizer, self.blind, self.seen = tokenizer, blind, None
        self.needle_prefix = tokenizer.encode(" The secret number is")

    def forward(self, tokens, doc_ids=None, cache=None, last_only=False):
        if self.seen is None or tokens.shape[1] > 1:  # a new prefill: forget the last prompts
            self.seen = [[] for _ in range(tokens.shape[0])]
        logits = torch.full((tokens.shape[0], 1, self.args.vocab_size), -1e9)
        for row in range(tokens.shape[0]):
            self.seen[row] += [t for t, d in zip(tokens[row].tolist(), doc_ids[row].tolist()) if d >= 0]
            logits[row, 0, self.next_token(self.seen[row])] = 0.0
        return logits

    def next_token(self, seen):
        p = self.needle_prefix
        at = next(i for i in range(len(seen) - len(p)) if seen[i:i + len(p)] == p) + len(p)  # the " " before N
        answer = self.tokenizer.encode(" 1.") if at - len(p) < self.blind else seen[at:at + 3]  # " ", "N", "."
        # how much of the answer has been generated: count the tokens after the question's last word
        question_end = max(i + len(p) for i in range(len(seen) - len(p) + 1) if seen[i:i + len(p)] == p)
        done = len(seen) - question_end
        return answer[done] if done < len(answer) else self.tokenizer.eot_id


def test_niah_with_real_greedy_generation_from_a_model_that_can_answer(pretrained):
    """niah_accuracy through greedy_answers, i.e. generate on real token ids, batched per cell with
    left padding: 100% for a model that answers, and 0% exactly where it cannot see the needle."""
    _, tokenizer = pretrained
    args = mdl.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.n_words, max_seq_len=128)
    filler = np.array(tokenizer.encode("the quick brown fox jumps over the lazy dog " * 200))
    depths = (0.0, 0.5, 1.0)
    grid = lc.niah_accuracy(NeedleCopier(args, tokenizer), tokenizer, filler, [64, 128], depths, trials=3)
    assert (grid == 1).all()
    grid = lc.niah_accuracy(NeedleCopier(args, tokenizer, blind=3), tokenizer, filler, [64, 128], depths, trials=3)
    assert (grid[0] == 0).all() and (grid[1:] == 1).all()


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


def test_the_contrast_measures_the_base_model_with_and_without_the_rope_lever(pretrained, long_context, monkeypatch):
    """The base model at the final length: RoPE untouched, then with the lever, both computed the way
    04's own long-position loss is, and the model keeps its args; the run reports the extended loss beside them."""
    folder, _ = pretrained
    model, base_args = mdl.load_checkpoint(folder / "03", mmap=False)
    val = pre.TokenShards(folder / "03" / "data", "val")
    data = pre.Data(None, val, None)
    cfg = replace(lc.LongContextConfig(), stages=(96, 128), eval_rows=4, dtype="float32", rope="theta")
    evaluated_with, measure = [], lc.long_position_loss
    monkeypatch.setattr(lc, "long_position_loss", lambda m, *a, **k: (evaluated_with.append(m.args), measure(m, *a, **k))[1])
    contrast = lc.untrained_contrast(model, data, cfg, torch.device("cpu"))
    monkeypatch.undo()
    assert evaluated_with == [lc.extend_rope(base_args, 128, 64, 128, lever) for lever in ("none", "theta")]
    assert model.args == base_args
    for (name, loss), lever in zip(contrast.items(), ["none", "theta"]):
        lc.set_args(model, lc.extend_rope(base_args, 128, 64, 128, lever))
        assert loss == pytest.approx(lc.long_position_loss(model, val, 128, 64, 4, cfg.seed, True, torch.device("cpu"))), name
    metrics = json.loads((long_context / "metrics.json").read_text())  # the run used 3.1 scaling
    reported = metrics["long_position_loss_contrast"]
    lc.set_args(model, base_args)
    scaled = lc.untrained_contrast(model, data, replace(cfg, rope="scale"), torch.device("cpu"))
    assert list(reported) == [*scaled, "extended (2 stages)"]
    assert reported["extended (2 stages)"] == metrics["final_long_position_loss"]
    for name, loss in scaled.items():  # the run measured the same base model the same way
        assert reported[name] == pytest.approx(loss, rel=1e-5)


def test_training_rows_mix_whole_passkey_documents_into_packed_corpus_rows(pretrained):
    folder, tokenizer = pretrained
    train = pre.TokenShards(folder / "03" / "data", "train")
    filler = lc.haystack(train, tokenizer)
    tokens, doc_ids = lc.training_rows(train, pre.mix_weights(train), filler, tokenizer, 400, 64, 0.25,
                                       np.random.default_rng(0))
    assert tokens.shape == doc_ids.shape == (400, 65)
    passkey = [i for i in range(400) if "The secret number is" in tokenizer.decode(tokens[i].tolist())]
    assert abs(len(passkey) / 400 - 0.25) < 4 * (0.25 * 0.75 / 400) ** 0.5  # binomial: within 4 sd
    for i in passkey:
        text = tokenizer.decode(tokens[i].tolist())
        number = re.search(r"The secret number is (\d+)\. ", text).group(1)
        assert text.startswith("<|begin_of_text|>") and (doc_ids[i] == 0).all()  # one document, whole
        assert f"What is the secret number? The secret number is {number}." in text  # answered
    corpus = [i for i in range(400) if i not in passkey]
    assert all((doc_ids[i][1:] >= doc_ids[i][:-1]).all() for i in corpus)  # packed windows: documents in order


def test_the_stage_gate_decides_and_extra_steps_come_in_chunks_of_20(pretrained, tmp_path, monkeypatch):
    """§3.4.2's rule: a stage ends when its gate passes, else trains 20 more steps at a time up to
    extra_steps. Here the gate fails twice, then passes: 30 + 20 + 20 steps, three gate checks."""
    folder, tokenizer = pretrained
    model, _ = mdl.load_checkpoint(folder / "03", mmap=False)
    train = pre.TokenShards(folder / "03" / "data", "train")
    data = pre.Data(train, pre.TokenShards(folder / "03" / "data", "val"), pre.mix_weights(train))
    cfg = lc.LongContextConfig(stages=(96,), steps_per_stage=30, extra_steps=50, batch_tokens=384, eval_rows=2)
    extension = lc.Extension(model, tokenizer, data, cfg, torch.device("cpu"), tmp_path, log=lambda *a: None)
    extension.short_before = 5.0
    trained, verdicts = [], iter([False, False, True])
    monkeypatch.setattr(extension, "train_steps", lambda n, stage, length, done: trained.append(n))
    monkeypatch.setattr(extension, "gate", lambda stage, lengths: (4.0, np.ones((1, 1)), True, next(verdicts)))
    with open(tmp_path / "log.jsonl", "w") as extension.log_file:
        extension.run_stage(1, 96, [64, 96])
    assert trained == [30, 20, 20] and extension.records[-1]["steps"] == 70 and extension.records[-1]["niah_solved"]
    trained.clear()
    monkeypatch.setattr(extension, "gate", lambda stage, lengths: (9.0, np.zeros((1, 1)), False, False))
    with open(tmp_path / "log.jsonl", "a") as extension.log_file:
        extension.run_stage(1, 96, [64, 96])
    assert trained == [30, 20, 20, 10] and not extension.records[-1]["recovered"]  # never passes: 30 + 50


def test_the_gate_allows_three_percent_above_the_short_context_loss_and_needs_every_needle(pretrained, tmp_path,
                                                                                     monkeypatch):
    folder, tokenizer = pretrained
    model, _ = mdl.load_checkpoint(folder / "03", mmap=False)
    train = pre.TokenShards(folder / "03" / "data", "train")
    data = pre.Data(train, pre.TokenShards(folder / "03" / "data", "val"), pre.mix_weights(train))
    extension = lc.Extension(model, tokenizer, data, lc.LongContextConfig(stages=(96,)), torch.device("cpu"), tmp_path)
    extension.short_before = 4.0
    grids = iter([np.ones((2, 2)), np.ones((2, 2)), np.array([[1.0, 1.0], [1.0, 2 / 3]])])
    monkeypatch.setattr(lc, "niah_accuracy", lambda *a, **k: next(grids))
    for short, recovered, solved in ((4.1, True, True), (4.2, False, True), (3.0, True, False)):
        monkeypatch.setattr(extension, "short_context_loss", lambda: short)
        assert extension.gate(1, [64, 96])[2:] == (recovered, solved)  # 4.1 <= 4.12 < 4.2


def test_the_recorded_gate_follows_from_the_recorded_losses_and_grid(long_context):
    for stage in json.loads((long_context / "metrics.json").read_text())["stages"]:
        assert stage["recovered"] == (stage["short_loss"] <= stage["short_loss_before"] * 1.03)
        assert stage["niah_solved"] == bool((np.array(stage["niah"]) == 1).all())


def test_each_stage_warms_up_from_a_rate_above_zero(long_context):
    cfg = json.loads((long_context / "metrics.json").read_text())["config"]
    log = [json.loads(line) for line in open(long_context / "log.jsonl") if '"stage_step"' in line]
    firsts = [r for r in log if r["stage_step"] == 1]
    assert len(firsts) == 2 and all(r["lr"] == cfg["lr"] / cfg["warmup"] for r in firsts)
    assert all(r["lr"] == cfg["lr"] for r in log if r["stage_step"] >= cfg["warmup"])


def test_the_document_mask_ablation_and_the_theta_lever_end_to_end(pretrained, long_context, tmp_path, capsys):
    """--no-doc-mask trains the same extension with plain causal attention into no_doc_mask/ and prints
    it beside the masked run; --rope theta raises θ in proportion to the length instead of scaling."""
    folder, _ = pretrained
    out = tmp_path / "04"
    out.mkdir()
    shutil.copy(long_context / "metrics.json", out / "metrics.json")  # the masked run, already done
    lc.main(long_context_argv(folder, out) + ["--no-doc-mask"])
    ablation = json.loads((out / "no_doc_mask" / "metrics.json").read_text())
    assert ablation["config"]["doc_mask"] is False and not (out / "model.pt").exists()
    masked = torch.load(long_context / "model.pt", weights_only=True)["model"]
    unmasked = torch.load(out / "no_doc_mask" / "model.pt", weights_only=True)["model"]
    assert not torch.equal(masked["layers.0.attention.wq.weight"], unmasked["layers.0.attention.wq.weight"])
    table = capsys.readouterr().out
    assert "document mask" in table and "no mask" in table
    lc.main(["--init", str(folder / "03"), "--out", str(tmp_path / "theta"), "--stages", "96", "--rope", "theta",
             "--steps-per-stage", "3", "--extra-steps", "0", "--batch-tokens", "384", "--niah-trials", "1",
             "--eval-rows", "2", "--device", "cpu"])
    _, args = mdl.load_checkpoint(tmp_path / "theta")
    assert args.max_seq_len == 96 and not args.use_scaled_rope and args.rope_theta == 500_000.0 * 96 / 64


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


def test_passkey_rows_pack_whole_answered_documents_with_their_own_doc_ids(pretrained):
    """Stage 0's rows: documents of `doc_len` tokens one after another, each a whole needle prompt
    with its answer and its own doc id, the row topped up with filler inside the last document."""
    folder, tokenizer = pretrained
    filler = lc.haystack(pre.TokenShards(folder / "03" / "data", "train"), tokenizer)
    tokens, doc_ids = lc.passkey_row(tokenizer, filler, 256, 48, np.random.default_rng(0))
    assert tokens.shape == doc_ids.shape == (257,) and doc_ids[0] == 0
    starts = [0] + (torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten() + 1).tolist()
    assert doc_ids.unique().tolist() == list(range(len(starts)))
    size = 48 - 3 + len(tokenizer.encode(" 42."))  # a prompt of doc_len - 3 tokens, then the answer
    assert doc_ids.unique().tolist() == list(range(257 // size))
    for a, b in zip(starts, [*starts[1:], starts[-1] + size]):
        assert b - a == size and tokens[a] == tokenizer.bos_id  # one whole document each
        text = tokenizer.decode(tokens[a:b].tolist())
        number = re.search(r"The secret number is (\d+)\. ", text).group(1)
        assert text.endswith(f"What is the secret number? The secret number is {number}.")
    assert (tokens[starts[-1] + size:] < tokenizer.n_bpe).all()  # the top-up is plain text, no new document
    train = pre.TokenShards(folder / "03" / "data", "train")
    rows, row_ids = lc.training_rows(train, pre.mix_weights(train), filler, tokenizer, 40, 256, 0.5,
                                     np.random.default_rng(1), passkey_len=48)
    packed = [i for i in range(40) if "What is the secret number?" in tokenizer.decode(rows[i].tolist())]
    assert 10 <= len(packed) <= 30  # about half the rows (binomial, 40 rows: within 3 sd), packed like the row above
    for i in packed:
        assert tokenizer.decode(rows[i].tolist()).count("What is the secret number?") == 257 // size == row_ids[i].max() + 1


def test_stage_0_teaches_retrieval_before_the_stages_and_the_contrast_is_measured_after_it(pretrained, tmp_path,
                                                                                         monkeypatch):
    """--preset retrieval: stage 0 trains at the pretraining length on packed passkey documents of
    each retrieval length in turn, checks the gate at that length, and the contrast (loss and NIAH
    per length, RoPE untouched and lever) is measured on the model stage 0 leaves, with the needles
    of the last gate."""
    folder, _ = pretrained
    out = tmp_path / "04"
    seen = []
    measure = lc.niah_accuracy
    monkeypatch.setattr(lc, "niah_accuracy", lambda m, t, f, lengths, d, n, seed=0, **k: (
        seen.append((m.args.max_seq_len, m.args.use_scaled_rope, tuple(lengths), seed)), measure(m, t, f, lengths, d, n, seed, **k))[1])
    rows_asked, make_rows = [], lc.training_rows
    monkeypatch.setattr(lc, "training_rows", lambda *a: (rows_asked.append((a[5], a[6], a[8])), make_rows(*a))[1])
    argv = long_context_argv(folder, out) + ["--preset", "retrieval", "--retrieval-lengths", "48,64",
                                             "--retrieval-steps", "3,4", "--steps-per-stage", "2", "--passkey-fraction", "0.25"]
    lc.main(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    stages = metrics["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2] and stages[0]["niah_lengths"] == [64] and stages[0]["steps"] == 7
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in log if "stage_step" in r]
    assert [r["length"] for r in steps] == [64] * 7 + [96] * 2 + [128] * 2
    assert [r["step"] for r in steps] == list(range(1, 12))
    assert [r["stage_step"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 1, 2, 1, 2]  # stage 0's phases: one warmup
    # (row length, share of passkey rows, their documents' length): stage 0's share, then the stages'
    assert rows_asked == [(64, 0.5, 48)] * 3 + [(64, 0.5, 64)] * 4 + [(96, 0.25, None)] * 2 + [(128, 0.25, None)] * 2
    # stage 0 is gated against the 03 model; the stages against stage 0's model, the one they extend
    assert stages[0]["short_loss_before"] != stages[0]["short_loss"]
    assert stages[1]["short_loss_before"] == stages[2]["short_loss_before"] == stages[0]["short_loss"]
    # gates: stage 0 at 64; then the contrast, untouched and lever, at every length with the last gate's needles
    assert seen[:3] == [(64, False, (64,), 1234), (128, False, (64, 96, 128), 1236), (128, True, (64, 96, 128), 1236)]
    assert seen[-1] == (128, True, (64, 96, 128), 1236)
    contrast = metrics["niah_contrast"]
    assert list(contrast) == ["no extension (RoPE untouched)", "RoPE lever (scale), no training", "extended (2 stages)"]
    assert contrast["extended (2 stages)"] == np.array(stages[-1]["niah"]).mean(axis=0).tolist()
    assert all(len(v) == 3 for v in contrast.values())
    monkeypatch.undo()

    # interrupted in stage 0's second phase, or after stage 0 before stage 1's first checkpoint, then
    # --resume: the same log, model and contrast as the run above
    train_steps, flags = lc.Extension.train_steps, argv[len(long_context_argv(folder, out)):]
    without_time = lambda folder: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "log.jsonl")]
    for name, crashes, done in [("phase2", lambda stage, kw: kw.get("passkey_len") == 64, 3),
                                ("stage1", lambda stage, kw: stage == 1, 7)]:
        cut = tmp_path / name
        def crash(self, n, stage, length, at, **kw):
            if crashes(stage, kw):
                raise KeyboardInterrupt
            return train_steps(self, n, stage, length, at, **kw)
        monkeypatch.setattr(lc.Extension, "train_steps", crash)
        with pytest.raises(KeyboardInterrupt):
            lc.main(long_context_argv(folder, cut) + flags)
        monkeypatch.undo()
        assert torch.load(cut / "ckpt.pt", weights_only=True)["done"] == done
        lc.main(long_context_argv(folder, cut) + flags + ["--resume"])
        assert without_time(cut) == without_time(out), name
        ours, theirs = (torch.load(f / "model.pt", weights_only=True)["model"] for f in (cut, out))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert json.loads((cut / "metrics.json").read_text())["niah_contrast"] == contrast
    with pytest.raises(tok.UserError, match="at most the pretraining length"):
        lc.main(long_context_argv(folder, tmp_path / "bad") + ["--retrieval-lengths", "48,96", "--retrieval-steps", "1,1"])
    with pytest.raises(tok.UserError, match="one step count"):
        lc.main(long_context_argv(folder, tmp_path / "bad") + ["--retrieval-lengths", "48,64", "--retrieval-steps", "1"])
    with pytest.raises(tok.UserError, match="needle, question and answer"):
        lc.main(long_context_argv(folder, tmp_path / "bad") + ["--retrieval-lengths", "8,64", "--retrieval-steps", "1,1"])
    with pytest.raises(tok.UserError, match="from 0 to 1"):
        lc.main(long_context_argv(folder, tmp_path / "bad") + ["--retrieval-fraction", "1.5"])
