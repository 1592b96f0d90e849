"""06_reward_model.py: the loss by hand, ranked pairs, packed rows against scoring alone, the verifiers
on hand-made answers, disjoint splits, the loss mask, bad preference files, and the chapter end to end."""
import importlib
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run, kill_when, saved_step

ROOT = Path(__file__).resolve().parent.parent
rm = importlib.import_module("06_reward_model")
mdl = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")


def test_reward_loss_by_hand_and_at_extreme_margins():
    """-log σ(r_better - r_worse), summed: margins 1 and 0 give log(1 + e^-1) + log 2."""
    loss = rm.reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2), abs=1e-6)
    better = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = rm.reward_loss(better, torch.zeros(2))
    loss.backward()
    assert loss.item() == pytest.approx(100.0, abs=1e-4) and torch.isfinite(better.grad).all()
    assert better.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)  # d/dr: -(1 - σ(margin))


def record(*responses, strength=None):
    return {"family": "add", "prompt": "What is 2 + 3?",
            "responses": [{"text": t, "rank": r, "ended": e, "source": s} for t, r, e, s in responses],
            "strength": strength or {"edited>chosen": "better", "chosen>rejected": "significantly better"}}


def test_three_ranked_responses_give_every_ordered_pair_and_unclear_or_identical_ones_are_dropped():
    full = record(("5", "edited", True, "verified answer"), ("The answer is 5.", "chosen", True, "wordier"),
                  ("6", "rejected", True, "corruption: wrong_answer"))
    assert rm.ranked_pairs(full) == [(0, 1, "edited vs chosen"), (0, 2, "edited vs wrong_answer"),
                                     (1, 2, "chosen vs wrong_answer")]
    weak = record(("5", "edited", True, "v"), ("The answer is 5.", "chosen", True, "w"), ("6", "rejected", True, "x"),
                  strength={"edited>chosen": "slightly better"})
    assert [p[:2] for p in rm.ranked_pairs(weak)] == [(0, 2), (1, 2)]  # §4.2.1: only clear preferences
    same = record(("The answer is 5.", "edited", True, "v"), ("the answer  is 5.", "chosen", True, "w"))
    assert rm.ranked_pairs(same) == []  # the same text up to case and spacing: nothing to learn


def test_a_packed_row_gives_the_rewards_of_each_response_scored_alone():
    """§4.1.2's packing: the prompt once, the shuffled responses as branches that see the prompt and
    themselves, their positions continuing from the prompt's end. Checked against each response
    scored in a row of its own (prompt + response, plain causal attention)."""
    tokenizer = tok.Tokenizer.train(["What is 2 + 3? The answer is 5. six 6 seven " * 30], vocab_size=600)
    torch.manual_seed(0)
    model = mdl.Transformer(mdl.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                          max_seq_len=128))
    reward_model = rm.RewardModel(model)
    torch.nn.init.normal_(reward_model.reward_head.weight)
    rec = record(("5", "edited", True, "v"), ("The answer is 5.", "chosen", True, "w"),
                 ("six six six six", "rejected", False, "x"))
    ids, branches, ends, order = rm.pack(rec, tokenizer, random.Random(3))
    assert order != [0, 1, 2]  # shuffled
    with torch.no_grad():
        packed = reward_model(torch.tensor([ids]), torch.tensor([branches]), torch.tensor([ends]))[0]
        for k, i in enumerate(order):
            response = rec["responses"][i]
            alone = rm.prompt_ids(tokenizer, rec["prompt"]) + tokenizer.encode(response["text"]) + \
                [tokenizer.eot_id] * response["ended"]
            reward = reward_model.reward_head(model.hidden(torch.tensor([alone])))[0, -1, 0]
            assert packed[k].item() == pytest.approx(reward.item(), abs=1e-5)
    assert rm.tokens_saved([rec], tokenizer)[0] < rm.tokens_saved([rec], tokenizer)[1]


def test_score_splits_a_record_that_overflows_the_context_and_keeps_each_reward():
    """A prompt with more samples than fit one row (07's best-of-k on a short-context model) is
    scored in several rows, with the rewards of each response scored alone, in the record's order."""
    tokenizer = tok.Tokenizer.train(["What is 2 + 3? The answer is 5. six 6 seven " * 30], vocab_size=600)
    torch.manual_seed(0)
    rec = record(*[(("six " * (3 + k)).strip(), "rejected", k % 2 == 0, "x") for k in range(8)])
    prompt = len(rm.prompt_ids(tokenizer, rec["prompt"]))
    context = prompt + 12  # room for about two responses a row
    model = mdl.Transformer(mdl.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                          max_seq_len=context))
    reward_model = rm.RewardModel(model)
    torch.nn.init.normal_(reward_model.reward_head.weight)
    parts = rm.fitting(rec, tokenizer, context)
    assert len(parts) > 2 and [r for p in parts for r in p["responses"]] == rec["responses"]
    assert len(rm.pack(rec, tokenizer)[0]) > context  # the whole record would not fit
    scores = rm.score(reward_model, tokenizer, [rec, record(("5", "edited", True, "v"))], "cpu", batch=3)
    assert len(scores[0]) == 8 and len(scores[1]) == 1
    with torch.no_grad():
        for response, reward in zip(rec["responses"], scores[0]):
            alone = rm.prompt_ids(tokenizer, rec["prompt"]) + tokenizer.encode(response["text"]) + \
                [tokenizer.eot_id] * response["ended"]
            assert reward == pytest.approx(reward_model.reward_head(model.hidden(torch.tensor([alone])))[0, -1, 0].item(),
                                           abs=1e-5)
    too_long = record(("six " * (context), "rejected", True, "x"))
    with pytest.raises(tok.UserError, match="more than the reward model's context"):
        rm.score(reward_model, tokenizer, [too_long], "cpu")


@pytest.mark.parametrize("family, prompt, right, wrong", [
    ("sort_digits", "Sort the digits 4 1 3 2 from smallest to largest.", "1 2 3 4", ["1234", "4 3 2 1", "1 2 3 4 5"]),
    ("reverse_words", "Reverse the words: red cat sky", "sky cat red", ["red cat sky", "sky cat"]),
    ("larger", "Which number is larger, 37 or 52?", "The answer is 52.", ["37", "52 and 37"]),
    ("is_even", "Is 37 an even number? Answer yes or no.", "no", ["yes", "no no"]),
    ("count_words", "How many words are in this list: red dog sun?", "3", ["4", "three"]),
    ("add", "What is 37 + 45?", "7 + 5 = 12, 3 + 4 + 1 = 8. The answer is 82.", ["81", "The answer is 8 2.",
                                                                               "The answer is 82. Or 81."]),
    ("times", "What is 7 times 8?", "The answer is 56.", ["54", "56!!! 56?"]),
])
def test_each_verifier_on_hand_made_answers(family, prompt, right, wrong):
    task = rm.TASKS[family]
    assert task.check(prompt, right) and task.check(prompt, f"  {right}  ")
    assert not any(task.check(prompt, w) for w in wrong)
    p, a = task.make(random.Random(1))
    assert task.check(p, a) and task.answer_of(p) == a  # the generator's answer is what the verifier recomputes


def test_train_and_held_out_prompts_never_meet():
    train, test = rm.task_prompts("train", 200, seed=1), rm.task_prompts("test", 200, seed=2)
    for family in rm.TASKS:
        a = {x["prompt"] for x in train if x["family"] == family}
        b = {x["prompt"] for x in test if x["family"] == family}
        assert a and b and not a & b, family
    evens = [x for x in test if x["family"] == "is_even"]
    assert 5 < len(evens) < 90  # a small family gives all its held-out prompts, and only those


def test_render_masks_only_the_assistants_words_and_its_end():
    tokenizer = tok.Tokenizer.train(["hello there general answer " * 20], vocab_size=600)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|eot_id|> <|python_tag|>"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
              {"role": "assistant", "content": "there"}]
    ids, mask = rm.render(tokenizer, dialog)
    assert ids == [tokenizer.bos_id] + [t for m in dialog for t in tokenizer.encode_message(m)]  # 01's format
    learned = [t for t, m in zip(ids, mask) if m]
    assert learned == tokenizer.encode("hello") + [tokenizer.eot_id] + tokenizer.encode("there") + [tokenizer.eot_id]
    first = ids.index(tokenizer.encode("hello")[0])
    assert mask[first] == 1 and mask[first - 1] == 0  # the first assistant token counts; the "\n\n" before it not
    assert tokenizer.eot_id in ids and ids.count(tokenizer.python_tag_id) == 0  # user text stays plain text
    assert sum(1 for t in ids if t == tokenizer.eot_id) == 5  # one per message, none from the user's string
    open_ids, open_mask = rm.render(tokenizer, dialog, end=False)
    assert open_ids == ids[:-1] and open_mask == mask[:-1]
    with pytest.raises(tok.UserError, match="needs an assistant message"):
        rm.render(tokenizer, dialog[:2])


@pytest.mark.parametrize("line, problem", [
    ('{"family": "add", "prompt": "p", "responses": [{"text": "a", "rank": "chosen"}]}', "at least two responses"),
    ('{"family": "add", "prompt": "p", "responses": [{"text": "a", "rank": "chosen"}, {"text": "b"}]}', '"rank"'),
    ('{"family": "add", "prompt": "p", "responses": [{"text": "a", "rank": "chosen"}, {"text": "b", "rank": "chosen"}]}',
     "same rank"),
    ('{"family": "poetry", "prompt": "p", "responses": []}', "unknown family 'poetry'"),
    ('{"prompt": 3}', '"prompt" string'),
    ("not json", "not JSON"),
])
def test_malformed_preference_records_name_their_line(tmp_path, line, problem):
    good = json.dumps(record(("5", "edited", True, "v"), ("6", "rejected", True, "x")))
    (tmp_path / "p.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(tok.UserError, match=f"p.jsonl:3: .*{problem}"):
        rm.read_preferences(tmp_path / "p.jsonl")


def test_missing_base_model_names_the_command(tmp_path):
    with pytest.raises(tok.UserError, match="run python 05_anneal.py first"):
        rm.main(["--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])


def test_end_to_end_from_a_tiny_base_model(reward_run, long_context, tmp_path):
    """Data, training and the report on the tiny extended model of the test fixtures: the files
    exist, every held-out pair type is reported, and the user's own preference file trains too."""
    out = reward_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packed_tokens"] < metrics["tokens_if_scored_alone"]
    assert any("edited vs chosen" in k for k in metrics["accuracy"])
    records = [json.loads(line) for line in open(out / "preferences.jsonl")]
    assert {r["family"] for r in records} == set(rm.TASKS) and all(len(r["responses"]) == 3 for r in records)
    assert any(x["source"] == "policy sample" for r in records for x in r["responses"])  # the base model's own
    reward_model = rm.load_reward_model(out)
    assert reward_model.reward_head.weight.abs().sum() > 0  # trained away from its zero start
    rm.main(["--init", str(long_context), "--data", str(out / "preferences.jsonl"), "--out", str(tmp_path / "again"),
             "--test-prompts", "2", "--steps", "3", "--max-response-tokens", "8", "--device", "cpu"])
    assert (tmp_path / "again" / "reward_model.pt").is_file()


def test_sigkill_twice_then_resume_gives_the_uninterrupted_run(long_context, tmp_path):
    """kill -9 during training (after the checkpoint at step 4), resume, kill -9 again (after step 12),
    resume: the same preferences, losses, reward model and accuracies as a run never interrupted."""
    argv = ["--init", long_context, "--train-prompts", "12", "--test-prompts", "4", "--steps", "20",
            "--max-response-tokens", "8", "--ckpt-every", "4", "--device", "cpu"]
    rm.main([str(a) for a in argv + ["--out", tmp_path / "whole"]])
    out, phase = tmp_path / "killed", tmp_path / "killed" / "phase_reward_model.pt"
    command = [sys.executable, ROOT / "06_reward_model.py", *argv, "--out", out]
    kill_when(command, lambda: saved_step(phase) >= 4, tmp_path)
    assert saved_step(phase) < 20  # killed mid-training, not after it
    with pytest.raises(tok.UserError, match="--resume"):
        rm.main([str(a) for a in argv + ["--out", out]])  # an interrupted run is never overwritten
    kill_when(command + ["--resume"], lambda: saved_step(phase) >= 12, tmp_path)
    assert saved_step(phase) < 20
    rm.main([str(a) for a in argv + ["--out", out, "--resume"]])
    assert_same_run(out, tmp_path / "whole", model="reward_model.pt")
    head = lambda folder: torch.load(folder / "reward_model.pt", weights_only=True)["reward_head"]
    assert torch.equal(head(out), head(tmp_path / "whole"))
    assert (out / "preferences.jsonl").read_text() == (tmp_path / "whole" / "preferences.jsonl").read_text()


def test_phase_checkpoints_restore_name_a_damaged_file_and_refuse_another_config(tmp_path):
    """03's PhaseCheckpoints, which 06-09 resume from: what it saves comes back exactly; a damaged file is
    reported by name and its phase starts over; a checkpoint of another configuration is refused."""
    pre = importlib.import_module("03_pretrain")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saving = pre.PhaseCheckpoints(tmp_path, {"lr": 0.1}, every=2)
    rng = random.Random(3)
    saving.save("round 1", 1, 5, model, optimizer, rng, history=[1.0])  # not due: every 2 steps, or the last
    assert not saving.path("round 1").exists()
    saving.save("round 1", 2, 5, model, optimizer, rng, history=[1.0, 2.0])
    expected_draw = random.Random(3).random()
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_rng = random.Random(99)
    state = pre.PhaseCheckpoints(tmp_path, {"lr": 0.1}, resume=True, log=print).restore("round 1", fresh,
                                                                                       fresh_optimizer, fresh_rng)
    assert state == {"step": 2, "history": [1.0, 2.0]} and saving.path("round 1").name == "phase_round_1.pt"
    assert fresh_rng.random() == expected_draw  # the data order continues where it was saved
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert pre.PhaseCheckpoints(tmp_path, {"lr": 0.1}).restore("round 1", fresh, fresh_optimizer, rng) == {}  # no --resume
    with pytest.raises(tok.UserError, match="another configuration"):
        pre.PhaseCheckpoints(tmp_path, {"lr": 0.2}, resume=True).restore("round 1", fresh, fresh_optimizer, rng)
    path = saving.path("round 1")
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    said = []
    assert pre.PhaseCheckpoints(tmp_path, {"lr": 0.1}, resume=True, log=said.append).restore("round 1", fresh,
                                                                                               fresh_optimizer, rng) == {}
    assert str(path) in said[0] and "round 1 starts over" in said[0]
    saving.finish()
    assert not list(tmp_path.glob("phase_*.pt"))


def test_every_family_also_speaks_ukrainian_and_one_verifier_checks_both():
    """§4.3.2's translated prompts: each family's Ukrainian template keeps the English structure, so
    the same verifier recomputes the answer; English prompts are exactly what they were."""
    english = rm.task_prompts("test", 5, 3)
    ukrainian = rm.task_prompts("test", 5, 3, language="Ukrainian")
    # the English prompts and answers of a seeded draw, as they were before the Ukrainian templates came
    assert rm._add(random.Random(0)) == ("What is 59 + 63?", "122")
    assert rm._even(random.Random(0)) == ("Is 59 an even number? Answer yes or no.", "no")
    assert rm._reverse(random.Random(0)) == ("Reverse the words: rain milk green", "green milk rain")
    assert {it["family"] for it in ukrainian} == set(rm.TASKS)
    for item in ukrainian:
        task = rm.TASKS[item["family"]]
        assert rm.language_of(item["prompt"]) == "Ukrainian" and task.check(item["prompt"], item["answer"])
        assert task.check(item["prompt"], f"The answer is {item['answer']}.")
        assert not task.check(item["prompt"], task.mistake(item["prompt"], random.Random(1)))
    assert all(rm.language_of(it["prompt"]) == "English" for it in english)
    assert rm.TASKS["is_even"].answer_of("Чи є 42 парним числом? Відповідай так або ні.") == "так"
    assert rm.TASKS["is_even"].answer_of("Is 41 an even number? Answer yes or no.") == "no"
    assert rm.TASKS["reverse_words"].answer_of("Переверни слова: пес кінь птах") == "птах кінь пес"
    assert rm.TASKS["count_words"].answer_of("Скільки слів у цьому списку: пес кінь?") == "2"
    assert rm.TASKS["times"].answer_of("Скільки буде 7 помножити на 8?") == "56"
    assert rm._sort(random.Random(5)) == rm._sort(random.Random(5), rm.ENGLISH)  # English is the default
