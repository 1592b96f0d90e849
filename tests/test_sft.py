"""07_sft.py: the loss mask by gradient, packed batches against dialogs one by one (through the
training step), worked sums, the rejection-sampling pick, bad input, the chat loop, end to end."""
import importlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run, kill_when, saved_step, tutorial_module

ROOT = Path(__file__).resolve().parent.parent

sft = importlib.import_module("07_sft")
rwd = importlib.import_module("06_reward_model")
pre = importlib.import_module("03_pretrain")
mdl = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return tok.Tokenizer.train(["What is 37 + 45? The answer is 82. Sort the digits 4 1 3 2. " * 30], vocab_size=600)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return mdl.Transformer(mdl.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                         multiple_of=16, max_seq_len=512))


DIALOGS = [sft.dialog("What is 37 + 45?", "The answer is 82."), sft.dialog("Sort the digits 4 1 3 2.", "1 2 3 4"),
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]]


def test_masked_tokens_contribute_exactly_nothing(tokenizer):
    """Against the full logits, position by position: sft_loss is the summed cross-entropy of exactly
    the targets the mask keeps (the assistant's words and end), with the same gradients; the count
    is theirs; and changing the padding tokens of a batch changes neither the loss nor any gradient."""
    rendered = [rwd.render(tokenizer, d) for d in DIALOGS[:2]]
    batch = sft.to_tensors([(ids, [0] * len(ids), mask) for ids, mask in rendered], "cpu")  # row 0 padded
    tokens, doc_ids, mask = batch
    model = tiny_model(tokenizer)
    loss, n = sft.sft_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    log_probs = torch.log_softmax(model(tokens[:, :-1], doc_ids=doc_ids[:, :-1]), -1)  # (2, T, V)
    reference = sum(-log_probs[b, t, tokens[b, t + 1]] for b in range(2) for t in range(tokens.shape[1] - 1)
                    if mask[b, t + 1] == 1)
    reference.backward()
    assert n == sum(sum(m[1:]) for _, m in rendered) and 0 < n < mask[:, 1:].numel() / 2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters()))
    pad = doc_ids == -1
    assert pad.any()
    changed = tokens.masked_fill(pad, 7)  # other padding tokens
    model.zero_grad()
    loss2, _ = sft.sft_loss(model, (changed, doc_ids, mask))
    loss2.backward()
    assert loss.item() == loss2.item() and all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


def test_a_packed_batch_trains_like_its_dialogs_one_by_one(tokenizer):
    """loss = sum over the assistant's tokens / their number across the whole batch: the three dialogs
    packed in one row give the step of the three as separate rows (not a mean of per-row means)."""
    rendered = [rwd.render(tokenizer, d) for d in DIALOGS]
    packed = sft.to_tensors(sft.pack_dialogs(rendered, 511, random.Random(0)), "cpu")
    assert packed[0].shape[0] == 1  # all three fit in one row
    alone = [sft.to_tensors([(ids, [0] * len(ids), mask)], "cpu") for ids, mask in rendered]
    results = []
    for micro_batches in ([packed], alone):
        model = tiny_model(tokenizer)
        loss, _ = pre.train_step(model, pre.make_optimizer(model, 1e-2), micro_batches, sft.sft_loss, 1e-2)
        results.append((loss, model.state_dict()))
    (a, state_a), (b, state_b) = results
    assert a == pytest.approx(b, abs=1e-6)
    assert all(torch.allclose(state_a[k], state_b[k], atol=1e-6) for k in state_a)


def test_worked_sums_by_hand_and_by_the_verifier():
    assert sft.step_by_step_sum("What is 37 + 45?") == "7 + 5 = 12, 3 + 4 + 1 = 8. The answer is 82."
    assert sft.step_by_step_sum("What is 52 + 31?") == "2 + 1 = 3, 5 + 3 = 8. The answer is 83."
    assert sft.step_by_step_sum("What is 99 + 99?") == "9 + 9 = 18, 9 + 9 + 1 = 19. The answer is 198."
    rng = random.Random(0)
    for _ in range(200):
        prompt, _ = rwd.TASKS["add"].make(rng)
        assert rwd.TASKS["add"].check(prompt, sft.step_by_step_sum(prompt))


def test_the_rejection_sampling_pick():
    """The reward model's favourite among the samples that ended; for a verifier-judged family the
    favourite among the verified ones; nothing when no sample qualifies."""
    items = [{"family": "larger", "prompt": "Which number is larger, 37 or 52?"}] * 3
    samples = [[("37", True), ("52", True), ("52 52 52", False)]] * 3
    rewards = [[0.9, 0.5, 2.0], [0.9, 0.5, 2.0], [0.9, 0.1, 2.0]]
    judged = sft.pick_best(items[:1], samples[:1], rewards[:1], {"larger": "reward model"})
    assert judged[0][1] == "37"  # the highest reward that ended (the unended 2.0 is out)
    verified = sft.pick_best(items[1:2], samples[1:2], rewards[1:2], {"larger": "verifier"})
    assert verified[0][1] == "52"
    none = sft.pick_best(items[:1], [[("37", True), ("52", False)]], [[1.0, 2.0]], {"larger": "verifier"})
    assert none[0][1] is None
    metrics = {"accuracy": {"larger | chosen vs wrong_answer": {"accuracy": 0.95},
                            "add | chosen vs wrong_answer": {"accuracy": 0.6}, "add | edited vs chosen": {"accuracy": 1}}}
    judges = sft.reward_judges(metrics, 0.9)
    assert judges["larger"] == "reward model" and judges["add"] == "verifier" and judges["times"] == "verifier"


def test_bad_input(tmp_path, long_context, tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(tok.UserError, match="d.jsonl:1: the dialog must end with the assistant's turn"):
        sft.read_dialogs(tmp_path / "d.jsonl")
    with pytest.raises(tok.UserError, match="run python 05_anneal.py first"):
        sft.main(["--init", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises(tok.UserError, match="run python 06_reward_model.py first"):
        sft.main(["--init", str(long_context), "--reward-model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    tokenizer.save(tmp_path / "other.model")
    with pytest.raises(tok.UserError, match="pass the tokenizer the model was trained with"):
        sft.main(["--init", str(long_context), "--tokenizer", str(tmp_path / "other.model"), "--out", str(tmp_path / "o")])
    model_tokenizer = tok.Tokenizer.load(long_context / "tokenizer.model")
    too_long = [sft.dialog("word " * 400, "yes")]
    with pytest.raises(tok.UserError, match="longer than the model's context"):
        sft.finetune(long_context, too_long, model_tokenizer, sft.SFTConfig(steps=1), torch.device("cpu"), 0)


def test_the_chat_loop_streams_keeps_history_resets_and_never_crashes(long_context, tmp_path):
    model, _ = mdl.load_checkpoint(long_context)
    mdl.save_checkpoint(tmp_path / "model.pt", model)
    tok.Tokenizer.load(long_context / "tokenizer.model").save(tmp_path / "tokenizer.model")
    lines, said = iter(["", "   ", "hello there", "/reset", "again " * 60, "ok"]), []
    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    sft.chat(tmp_path, "cpu", read, lambda *a, **k: said.append("".join(map(str, a)) + k.get("end", "\n")))
    text = "".join(said)
    assert text.count("model> ") == 3 and "(history cleared)" in text  # blank lines skipped; a long one fits


def test_end_to_end_two_rounds_from_tiny_models(long_context, reward_run, tmp_path, monkeypatch):
    out = tmp_path / "07"
    # --multilingual's two extra fine-tunes are tested on their own (the tiny tokenizer has no Cyrillic
    # merges, so Ukrainian prompts outgrow this model's 128 positions); here, that main reports them
    transfer = {"base": {"English": {}, "Ukrainian": {}}, "items": {"English test": 0, "Ukrainian test": 0}}
    monkeypatch.setattr(sft, "cross_lingual", lambda *args: transfer)
    sft.main(["--init", str(long_context), "--reward-model", str(reward_run), "--out", str(out), "--steps", "8",
              "--seed-prompts", "8", "--pool-prompts", "4", "--test-prompts", "2", "--samples", "2",
              "--max-new-tokens", "16", "--seq-len", "127", "--dialogs-per-step", "8", "--long-context", "1",
              "--device", "cpu", "--multilingual"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["multilingual"] == transfer
    stats = metrics["rounds"][1]["rejection_sampling"]
    assert set(stats) == set(rwd.TASKS) and all(s["kept"] <= s["prompts"] for s in stats.values())
    assert metrics["rounds"][2]["dialogs"] == metrics["rounds"][1]["dialogs"] + sum(s["kept"] for s in stats.values())
    assert set(metrics["best_of_k"]["add"]) == {"greedy", "random sample", "reward model pick", "verifier pick (oracle)"}
    section = "\n".join(tutorial_module("report").sft_section(metrics, out.parent))  # the results report's table
    assert "| round 2 | " + " | ".join(f"{100 * a:.0f}%" for a in metrics["rounds"][2]["accuracy"].values()) in section
    model, args = mdl.load_checkpoint(out)
    assert args.max_seq_len == 128


def test_sigkill_in_each_round_then_resume_gives_the_uninterrupted_run(long_context, reward_run, tmp_path):
    """kill -9 in round 1's fine-tuning, resume, kill -9 in round 2's (after its rejection sampling),
    resume: the same rounds, samples, losses and model as a run never interrupted."""
    argv = ["--init", long_context, "--reward-model", reward_run, "--steps", "8", "--seed-prompts", "8",
            "--pool-prompts", "4", "--test-prompts", "2", "--samples", "2", "--max-new-tokens", "16", "--seq-len", "127",
            "--dialogs-per-step", "8", "--long-context", "1", "--ckpt-every", "3", "--device", "cpu"]
    sft.main([str(a) for a in argv + ["--out", tmp_path / "whole"]])
    out = tmp_path / "killed"
    command = [sys.executable, ROOT / "07_sft.py", *argv, "--out", out]
    kill_when(command, lambda: saved_step(out / "phase_seed_7_round_1_order_0.pt") >= 3, tmp_path)
    kill_when(command + ["--resume"], lambda: saved_step(out / "phase_seed_7_round_2_order_0.pt") >= 3, tmp_path)
    assert saved_step(out / "phase_seed_7_round_1_order_0.pt") == 8  # round 1 done, round 2 under way
    assert saved_step(out / "phase_seed_7_round_2_order_0.pt") < 8
    sft.main([str(a) for a in argv + ["--out", out, "--resume"]])
    assert_same_run(out, tmp_path / "whole")
    with pytest.raises(tok.UserError, match="already holds a finished run"):
        sft.main([str(a) for a in argv + ["--out", out]])  # a finished run is never overwritten either


def test_cross_lingual_transfer_trains_on_english_then_on_english_plus_translated(tokenizer, tmp_path, capsys,
                                                                                  monkeypatch):
    """§4.3.2 behind --multilingual: two fine-tunes of the same base for the same steps, one with
    translated (Ukrainian) prompts added, each asked the held-out questions in both languages."""
    mdl.save_checkpoint(tmp_path / "model.pt", tiny_model(tokenizer))
    cfg = sft.SFTConfig(seed_prompts=4, test_prompts=2, steps=3, dialogs_per_step=8, seq_len=511, max_new_tokens=6,
                        translated_share=0.5)
    seen, original = [], sft.finetune
    def spy(base, dialogs, *args, **kwargs):
        seen.append(dialogs)
        return original(base, dialogs, *args, **kwargs)
    monkeypatch.setattr(sft, "finetune", spy)
    results = sft.cross_lingual(tmp_path / "model.pt", tokenizer, cfg, torch.device("cpu"))
    assert results["items"] == {"English train": 4 * 7, "Ukrainian train": 2 * 7, "English test": 2 * 7,
                                "Ukrainian test": 2 * 7}
    english, mixed = seen
    assert mixed[:len(english)] == english and len(mixed) == len(english) + 2 * 7
    assert all(rwd.language_of(d[0]["content"]) == "Ukrainian" for d in mixed[len(english):])
    for run in ("base", "English SFT", "English + translated SFT"):
        assert set(results[run]) == {"English", "Ukrainian"} and set(results[run]["Ukrainian"]) == set(rwd.TASKS)
    sft.print_cross_lingual(results)
    assert "English + translated SFT" in capsys.readouterr().out
