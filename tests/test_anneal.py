"""05_anneal.py: the schedule ends at exactly 0, averaging is a plain mean, the answer extractor on
hand-made cases, no benchmark item in the annealing data, and the chapter end to end."""
import importlib
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tutorial_module

an = importlib.import_module("05_anneal")
pre = importlib.import_module("03_pretrain")
tok = importlib.import_module("01_tokenizer")
mdl = importlib.import_module("02_model")
ROOT = Path(__file__).resolve().parent.parent


def test_lr_decays_linearly_to_exactly_zero():
    lrs = [an.anneal_lr(s, 5, 1e-3) for s in range(5)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0]) and lrs[-1] == 0.0


def test_averaging_is_a_plain_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([3.0])}
    same = an.average_state_dicts([a, a, a])
    assert all(torch.equal(same[k], a[k]) for k in a)  # N identical checkpoints: that checkpoint
    mean = an.average_state_dicts([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and torch.equal(mean["b"], torch.tensor([1.5]))
    weighted = an.average_state_dicts([a, a, b])  # linear: (2a + b) / 3
    assert torch.allclose(weighted["w"], (2 * a["w"] + b["w"]) / 3)
    with pytest.raises(ValueError, match="same model"):
        an.average_state_dicts([a, {"w": a["w"]}])


def test_snapshots_cover_the_second_half_and_end_at_the_last_step():
    assert an.snapshot_steps(60, 4) == [29, 39, 49, 59]
    assert an.snapshot_steps(10, 1) == [9]


@pytest.mark.parametrize("completion, answer", [
    (" 3 + 4 = 7. The answer is 7.\n\nQuestion: What is 1 + 1?\nAnswer: The answer is 2.", 7),
    (" 600 + 634 = 1,234. The answer is 1,234.", 1234),
    (" The answer is $15.", 15),
    (" 12 - 5 = 7 and then 9", 9),  # no "The answer is": the last number of the first answer
    (" 12.\nQuestion: What is 2 times 3?\nAnswer: The answer is 6.", 12),
    (" I do not know.", None),
])
def test_extract_answer(completion, answer):
    assert an.extract_answer(completion) == answer


@pytest.mark.parametrize("completion, method, first_step, answer", [
    (" 33 + 16 = 49. 49 - 2 = 47. The answer is 47.", True, True, True),  # the worked answer itself
    (" 30 + 7 = 72. 72 - 6 = 7. The answer is 7.", True, False, False),  # the method, wrong numbers
    (" 33 + 16 = 49. 49 + 2 = 51. The answer is 51.", False, True, False),  # right first step, wrong method
    (" 33 x 16 = 47. The answer is 47.", False, False, True),  # a right answer by luck
    (" 33 + 16 = 490. 490 - 2 = 488.", True, False, False),
    (" 16 - 2 = 14. 14 + 33 = 47. The answer is 47.", False, False, True),  # the operations, in another order
    (" 33 + 16 = 49.\nQuestion: What is 9 - 2?\nAnswer: 9 - 2 = 7.", False, True, False),  # stops after one step
])
def test_math_tiers_grade_method_first_step_and_answer_apart(completion, method, first_step, answer):
    # kind 2 of 01's generator: "Femi has 33 pencils. Femi gets 16 more and gives 2 away. ..."
    grades = an.grade_math(completion, "33 + 16 = 49. 49 - 2 = 47.", 47)
    assert grades == {"math_method": method, "math_first_step": first_step, "math_accuracy": answer}


def test_operations_and_the_commonest_method_baseline():
    assert an.operations("12 x 5 = 60. 200 - 60 = 140.") == ["x", "-"]
    assert an.operations("72 / 6 = 12.") == ["/"] and an.operations("The answer is -3.") == []
    items = [("q", "1 + 2 = 3.", 3), ("q", "2 x 3 = 6. 9 - 6 = 3.", 3), ("q", "4 x 3 = 12. 20 - 12 = 8.", 8)]
    assert an.commonest_method_share(items) == pytest.approx(2 / 3) and an.commonest_method_share([]) == 0.0
    assert [round(v, 6) for v in an.paired_gain([0, 0, 1, 1], [1, 1, 1, 0])] == [0.25, round(0.957427 / 2, 6)]
    assert an.paired_gain([0], [1])[0] == 1.0 and math.isnan(an.paired_gain([0], [1])[1])  # one item: no spread


def test_math_benchmark_is_fixed_and_few_shot(pretrained):
    _, tokenizer = pretrained
    items = an.math_benchmark(20)
    assert items == an.math_benchmark(20)
    q, working, a = tok.math_problems(1, an.BENCH_SEED)[0]
    assert items[0] == (q, working, a)
    full = tokenizer.decode(an.math_prompt(tokenizer, q, 3, 10_000))
    assert full.count("Question:") == 4 and full.endswith(f"Question: {q}\nAnswer:")
    short = an.math_prompt(tokenizer, q, 3, 120)  # fewer shots when the context is short
    assert len(short) <= 120 and tokenizer.decode(short).endswith(f"Question: {q}\nAnswer:")
    with pytest.raises(tok.UserError, match="longer than 5 tokens"):
        an.math_prompt(tokenizer, q, 3, 5)


def test_contamination_filter_drops_items_found_in_the_data():
    items = [("p", 1, "What is 2 + 2?"), ("p", 2, "What is 3 + 3?")]
    kept, dropped = an.contamination_filter(items, "Question: What is 2 + 2?\nAnswer: 4", lambda i: i[2])
    assert kept == [items[1]] and dropped == 1


def anneal_argv(long_context, pretrained, out):
    folder, _ = pretrained
    return ["--init", str(long_context), "--data-dir", str(folder / "03" / "data"), "--out", str(out),
            "--steps", "12", "--batch-tokens", "512", "--snapshots", "3", "--math-items", "10",
            "--completion-items", "10", "--eval-rows", "4", "--ckpt-every", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def annealed(long_context, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("anneal") / "05"
    an.main(anneal_argv(long_context, pretrained, out))
    return out


def test_anneal_end_to_end_and_no_benchmark_item_in_the_annealing_data(annealed, pretrained):
    folder, tokenizer = pretrained
    out = annealed
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["results"]) == ["04 model", "annealed (last)", "averaged"]
    assert metrics["results"]["averaged"]["val_loss"] != metrics["results"]["annealed (last)"]["val_loss"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 12 and log[-1]["lr"] == 0.0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["averaged_steps"] == [6, 9, 12] and saved["args"]["max_seq_len"] == 128
    assert (out / "benchmarks.png").stat().st_size > 1000 and not (out / "ckpt.pt").exists()
    section = "\n".join(tutorial_module("report").anneal_section(metrics, out.parent))  # the results report's table
    assert all(f"| {name} | " in section and f"{r['val_loss_mean']:.3f} |" in section for name, r in metrics["results"].items())
    # the check itself: rebuild the benchmarks and search every item in the annealing data
    train = pre.TokenShards(folder / "03" / "data", "train")
    val = pre.TokenShards(folder / "03" / "data", "val")
    cfg = an.AnnealConfig(math_items=10, completion_items=10)
    weights = an.anneal_weights(train, cfg.upsample)
    math_items, completion_items = an.benchmarks(train, val, tokenizer, cfg, list(weights), lambda *a: None)
    text = an.annealing_text(train, tokenizer, list(weights))
    assert completion_items and all(tokenizer.decode(p + t) not in text for p, t in completion_items)
    assert math_items and all(q not in text for q, _, _ in math_items)


def test_sigkill_then_resume_gives_the_uninterrupted_run(annealed, long_context, pretrained, tmp_path):
    """kill -9 just after the checkpoint at step 5, then --resume: the same losses, the same base model."""
    out = tmp_path / "05"
    proc = subprocess.Popen([sys.executable, str(ROOT / "05_anneal.py"), *anneal_argv(long_context, pretrained, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("saved") and line.rstrip().endswith("step 5"):
            proc.kill()
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(tok.UserError, match="--resume"):
        an.main(anneal_argv(long_context, pretrained, out))  # an interrupted run is never overwritten
    an.main(anneal_argv(long_context, pretrained, out) + ["--resume"])
    log = lambda folder: [json.loads(line) for line in open(folder / "log.jsonl")]
    assert log(out) == log(annealed)
    for name in ("model.pt", "last.pt"):
        ours, theirs = (torch.load(folder / name, weights_only=True)["model"] for folder in (out, annealed))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    results = lambda folder: json.loads((folder / "metrics.json").read_text())["results"]
    assert results(out) == results(annealed)


def test_upsampling_doubles_math_and_code_against_general_text(tmp_path):
    """Llama 3 §3.4.3's annealing mix: the paper's shares with math and code upsampled 2x, renormalised."""
    tokenizer = tok.Tokenizer.train(["alpha beta gamma delta " * 50], vocab_size=600)
    for source, n in (("prose", 300), ("python_code", 200), ("synthetic_math", 100)):
        (tmp_path / "data" / source).mkdir(parents=True)
        (tmp_path / "data" / source / "a.txt").write_text("alpha beta " * n)
    pre.prepare_shards(lambda: tok.iter_documents(str(tmp_path / "data")), tokenizer, None if False else
                       _save(tokenizer, tmp_path), tmp_path / "shards", "x", log=lambda *a, **k: None)
    train = pre.TokenShards(tmp_path / "shards", "train")
    paper, annealing = pre.mix_weights(train, "paper"), an.anneal_weights(train, "math=2,code=2")
    assert paper == pytest.approx({"prose": 50 / 92, "python_code": 17 / 92, "synthetic_math": 25 / 92})
    assert annealing == pytest.approx({"prose": 50 / 134, "python_code": 34 / 134, "synthetic_math": 50 / 134})


def _save(tokenizer, folder):
    tokenizer.save(folder / "tokenizer.model")
    return folder / "tokenizer.model"


def test_the_probe_anneals_on_30_percent_candidate_and_70_percent_of_the_control_mix():
    control, candidate = an.probe_mixes({"bible": 0.5, "code": 0.3, "new": 0.2}, "new")
    assert control == pytest.approx({"bible": 0.625, "code": 0.375})
    assert candidate == pytest.approx({"bible": 0.4375, "code": 0.2625, "new": 0.3})


def test_scoring_counts_right_answers_and_matching_tokens(pretrained, monkeypatch):
    """evaluate() on answers we choose: all right, then all wrong (through the real prompt building,
    decoding, answer extraction and counting)."""
    folder, tokenizer = pretrained
    model = mdl.Transformer(mdl.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.n_words,
                                          max_seq_len=512))  # room for the few-shot prompts; it answers nothing itself
    val = pre.TokenShards(folder / "03" / "data", "val")
    math_items = an.math_benchmark(6)
    completion_items = an.completion_benchmark(val, tokenizer, 5)
    cfg = an.AnnealConfig(eval_rows=2, dtype="float32")
    def answering(right):
        def fake_generate(model, prompts, max_new_tokens, stop_tokens=()):
            if stop_tokens:  # the math prompts: the worked answer, or one whose every tier fails
                return [tokenizer.encode(f" {w} The answer is {a}." if right else f" 1 ? 1 = {a + 1}. The answer is {a + 1}.")
                        for (_, w, a) in math_items[:len(prompts)]]
            return [t if right else [t[0] + 1] + t[1:] for _, t in completion_items[:len(prompts)]]
        return fake_generate
    monkeypatch.setattr(an.mdl, "generate", answering(True))
    right = an.evaluate(model, tokenizer, math_items, completion_items, val, 64, cfg, torch.device("cpu"))
    monkeypatch.setattr(an.mdl, "generate", answering(False))
    wrong = an.evaluate(model, tokenizer, math_items, completion_items, val, 64, cfg, torch.device("cpu"))
    assert all(right[tier] == 1.0 and wrong[tier] == 0.0 for tier in an.MATH_TIERS)
    assert right["per_item"]["math_method"] == [1] * 6 and wrong["per_item"]["math_accuracy"] == [0] * 6
    assert right["completion_exact"] == 1.0 and right["completion_token_accuracy"] == 1.0
    assert wrong["completion_exact"] == 0.0
    n_tokens = sum(len(t) for _, t in completion_items)
    assert wrong["completion_token_accuracy"] == pytest.approx((n_tokens - len(completion_items)) / n_tokens)


def test_a_planted_benchmark_item_is_dropped_and_the_base_model_is_the_mean_of_the_snapshots_taken(
        pretrained, long_context, tmp_path, monkeypatch, capsys):
    """End to end: a math benchmark question planted verbatim in the annealing data is dropped (and
    only it), and model.pt is the mean of exactly the snapshots the run took (spied on as they go)."""
    folder, tokenizer = pretrained
    planted = an.math_benchmark(10)[3][0]
    data = tmp_path / "data"
    shutil.copytree(folder / "data", data)
    # a training document (not held out by its name's hash) that sorts first, far from the tail of the
    # source that build_shards may carve into validation
    stem = next(s for s in (f"AAA_planted{i}" for i in range(100)) if not tok.is_held_out(f"bible/bible/{s}"))
    (data / "bible" / f"{stem}.txt").write_text(f"And it came to pass.\nQuestion: {planted}\nAnswer: I know.\n")
    pre.prepare_shards(lambda: tok.iter_documents(str(data)), tokenizer, folder / "tokenizer.model",
                       tmp_path / "shards", "planted", log=lambda *a, **k: None)
    taken = []
    real_add = an.PolyakAverage.add
    monkeypatch.setattr(an.PolyakAverage, "add", lambda self, sd: (taken.append({k: v.clone() for k, v in sd.items()}),
                                                                   real_add(self, sd))[1])
    an.main(["--init", str(long_context), "--data-dir", str(tmp_path / "shards"), "--out", str(tmp_path / "05"),
             "--steps", "6", "--batch-tokens", "512", "--snapshots", "3", "--math-items", "10",
             "--completion-items", "4", "--eval-rows", "4", "--device", "cpu"])
    said = capsys.readouterr().out
    assert "dropped 1 of 10 math items" in said, [l for l in said.splitlines() if "contamination" in l]
    assert json.loads((tmp_path / "05" / "metrics.json").read_text())["benchmark_items"]["math"] == 9
    assert len(taken) == 3  # snapshot_steps(6, 3): after steps 3, 4 (rounded) and 6, each once
    saved = torch.load(tmp_path / "05" / "model.pt", weights_only=True)["model"]
    for k in saved:
        assert torch.allclose(saved[k], torch.stack([s[k] for s in taken]).mean(0), atol=1e-6), k
    last = torch.load(tmp_path / "05" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last[k], taken[-1][k]) for k in last)  # the last snapshot is the last step


def test_probe_with_new_data(pretrained, long_context, tmp_path, capsys):
    folder, _ = pretrained
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"text": tok.format_problem(*p)}) for p in tok.math_problems(400, 99)))
    an.main(["--probe", str(data), "--probe-init", str(long_context / "model.pt"),
             "--data-dir", str(folder / "03" / "data"), "--out", str(tmp_path / "05"), "--steps", "6",
             "--batch-tokens", "512", "--math-items", "8", "--completion-items", "8", "--eval-rows", "4",
             "--device", "cpu"])
    probe = json.loads((tmp_path / "05" / "probe.json").read_text())
    assert list(probe["results"]) == ["control (0%)", "probe at 30%"]
    assert set(probe["gain"]) == {*an.MATH_TIERS, "completion_exact", "completion_token_accuracy", "val_loss_mean"}
    assert set(probe["paired_gain"]) == set(an.MATH_TIERS)
    assert "gain over the control" in capsys.readouterr().out


def test_the_probe_anneals_with_its_pretraining_runs_batch(pretrained, long_context, tmp_path, capsys):
    """§3.1.3 continues a half-trained run: a 03 checkpoint gives its own batch; a plain model file none."""
    folder, _ = pretrained
    ckpt = pre.checkpoints(folder / "03")[0]
    assert an.pretraining_batch(ckpt) == 1024  # the fixture's --batch-tokens
    assert an.pretraining_batch(long_context / "model.pt") is None and an.pretraining_batch(long_context) is None
    an.main(["--probe", "bible", "--probe-init", str(ckpt), "--data-dir", str(folder / "03" / "data"),
             "--out", str(tmp_path / "05"), "--steps", "2", "--math-items", "1", "--completion-items", "2",
             "--eval-rows", "2", "--device", "cpu"])
    assert "each probe anneals 2 steps of 16 rows of 64 tokens" in capsys.readouterr().out


def test_bad_input(tmp_path, pretrained):
    folder, _ = pretrained
    with pytest.raises(tok.UserError, match="run python 03_pretrain.py first"):
        an.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises(tok.UserError, match="run python 04_long_context.py first"):
        an.main(["--init", str(tmp_path / "none"), "--data-dir", str(folder / "03" / "data"), "--out", str(tmp_path / "o")])
    with pytest.raises(tok.UserError, match="neither a source"):
        an.main(["--probe", "nonsense", "--probe-init", str(sorted((folder / "03").glob("ckpt_*.pt"))[0]),
                 "--data-dir", str(folder / "03" / "data"), "--out", str(tmp_path / "o")])
