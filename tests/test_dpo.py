"""08_dpo.py: the loss by hand and at the reference, the formatting mask, log-probs against the
full logits, which pairs a round keeps, DPO training moving the margin, bad input, end to end."""
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run, check_kill_and_resume, saved_step, tutorial_module

ROOT = Path(__file__).resolve().parent.parent

dpo = importlib.import_module("08_dpo")
sft = importlib.import_module("07_sft")
rwd = importlib.import_module("06_reward_model")
mdl = importlib.import_module("02_model")
tok = importlib.import_module("01_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return tok.Tokenizer.train(["What is 37 + 45? The answer is 82. Sort the digits 4 1 3 2. yes no " * 30],
                               vocab_size=600)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return mdl.Transformer(mdl.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                         multiple_of=16, max_seq_len=256))


def test_dpo_loss_by_hand_with_the_nll_term():
    """β = 0.1; policy -5/-7 against reference -6/-6: margin (1) - (-1) = 2, loss -log σ(0.2);
    + 0.2 × an NLL of 1.5."""
    args = [torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])]
    assert dpo.dpo_loss(*args).item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    with_nll = dpo.dpo_loss(*args, beta=0.1, chosen_nll=torch.tensor([1.5]), nll_weight=0.2)
    assert with_nll.item() == pytest.approx(math.log(1 + math.exp(-0.2)) + 0.3, abs=1e-6)


def test_at_the_reference_the_loss_is_log_2_with_gradients_minus_and_plus_half_beta():
    chosen, rejected = torch.tensor([-12.0, -3.0], requires_grad=True), torch.tensor([-8.0, -30.0], requires_grad=True)
    loss = dpo.dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    loss.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-0.05, -0.05]) and rejected.grad.tolist() == pytest.approx([0.05, 0.05])


def test_extreme_margins_stay_finite():
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    loss = dpo.dpo_loss(chosen, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.1)  # β·margin = ±100
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss[1].item() == pytest.approx(100.0, abs=1e-3)
    assert torch.isfinite(chosen.grad).all() and chosen.grad.tolist() == pytest.approx([0.0, -0.1], abs=1e-6)


def test_log_probs_count_the_answers_words_only_and_match_the_full_logits(tokenizer):
    """The mask keeps the response's content and drops headers and <|eot_id|> (Llama 3 §4.1.4);
    the summed log-probs are those of the full logits at exactly those targets."""
    pairs = [{"prompt": "What is 37 + 45?", "chosen": "The answer is 82.", "rejected": "yes"},
             {"prompt": "Sort the digits 4 1 3 2.", "chosen": "1 2 3 4", "rejected": "no no no"}]
    tokens, mask = dpo.pair_rows(pairs, tokenizer, "cpu")
    assert tokens.shape[0] == 4
    for row, text in zip(range(4), [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]):
        kept = tokens[row][mask[row] == 1].tolist()
        assert kept == tokenizer.encode(text)  # the content, nothing else
        assert tokenizer.eot_id in tokens[row].tolist()  # the row does end its turn; the mask drops it
    model = tiny_model(tokenizer)
    logps, counts = dpo.response_logps(model, tokens, mask)
    full = torch.log_softmax(model(tokens[:, :-1]), -1)  # (4, T, V)
    for b in range(4):
        expected = sum(full[b, t, tokens[b, t + 1]] for t in range(tokens.shape[1] - 1) if mask[b, t + 1] == 1)
        assert logps[b].item() == pytest.approx(expected.item(), rel=1e-5)
        assert counts[b].item() == mask[b, 1:].sum().item()


def test_batch_loss_at_the_reference_is_log_2_plus_the_mean_nll_of_the_chosen(tokenizer):
    """Through dpo_batch_loss with the reference's log-probs equal to the policy's: per pair,
    log 2 + 0.2 × the chosen response's NLL averaged over its content tokens (from the full logits)."""
    pairs = [{"prompt": "What is 37 + 45?", "chosen": "The answer is 82.", "rejected": "yes"},
             {"prompt": "Sort the digits 4 1 3 2.", "chosen": "1 2 3 4", "rejected": "no no no"}]
    tokens, mask = dpo.pair_rows(pairs, tokenizer, "cpu")
    model = tiny_model(tokenizer)
    with torch.no_grad():
        logps, _ = dpo.response_logps(model, tokens, mask)
        full = torch.log_softmax(model(tokens[:, :-1]), -1)
    stats = {}
    loss, n = dpo.dpo_batch_loss(model, (tokens, mask, logps[:2], logps[2:]), dpo.DPOConfig(), stats)
    nll = [-(sum(full[b, t, tokens[b, t + 1]] for t in range(tokens.shape[1] - 1) if mask[b, t + 1]) /
             mask[b, 1:].sum()).item() for b in range(2)]
    assert n == 2 and loss.item() == pytest.approx(2 * math.log(2) + 0.2 * sum(nll), rel=1e-5)
    assert stats["dpo_part"] == pytest.approx(math.log(2), abs=1e-6) and stats["margin"] == pytest.approx(0, abs=1e-6)


def item(family, prompt):
    return {"family": family, "prompt": prompt}


def test_a_round_keeps_only_pairs_the_ranking_tells_apart():
    """Verifier families: right samples against wrong ones, distinct texts only, the reward model's
    favourites first, at most per_prompt; all right, all wrong, or right only where it never ended:
    no pair. Reward-model families: best against worst when the gap is clear."""
    judges = {f: "verifier" for f in rwd.TASKS} | {"sort_digits": "reward model"}
    items = [item("is_even", "Is 37 an even number? Answer yes or no."),
             item("is_even", "Is 40 an even number? Answer yes or no."),
             item("is_even", "Is 41 an even number? Answer yes or no."),
             item("is_even", "Is 43 an even number? Answer yes or no."),
             item("sort_digits", "Sort the digits 4 1 3 2 from smallest to largest."),
             item("sort_digits", "Sort the digits 4 1 3 2 from smallest to largest.")]
    samples = [[("no", True), ("yes", True), ("no.", True), ("yes  yes", True), ("yes", True), ("no", True)],  # mixed
               [("yes", True), ("yes", True)],  # all right
               [("no", False), ("yes", True)],  # the right one never ended
               [("yes", True), ("yes", True)],  # all wrong
               [("1 2 3 4", True), ("4 3 2 1", True)],
               [("1 2 3 4", True), ("4 3 2 1", True)]]
    rewards = [[0.5, 2.0, 1.5, -1.0, 0.0, 0.1], [0, 0], [9, 0], [0, 0], [3.0, 0.0], [1.0, 0.0]]
    pairs = dpo.preference_pairs(items, samples, rewards, judges, clear_margin=2.2, per_prompt=3)
    assert [(p["chosen"], p["rejected"], p["judge"], p["reward_margin"]) for p in pairs] == [
        ("no.", "yes", "verifier", -0.5), ("no.", "yes yes", "verifier", 2.5), ("no", "yes", "verifier", -1.5),
        ("1 2 3 4", "4 3 2 1", "reward model", 3.0)]


def test_dpo_training_moves_the_margin_toward_the_chosen(tokenizer):
    """A preference a tiny model can learn in a few steps (always "yes" over "no"): the margin grows
    and every pair is ranked right, starting from exactly log 2."""
    pairs = [{"prompt": f"Is {n} an even number? Answer yes or no.", "chosen": "yes", "rejected": "no",
              "family": "is_even"} for n in range(20, 36)]
    policy = tiny_model(tokenizer)
    reference = tiny_model(tokenizer)
    cfg = dpo.DPOConfig(epochs=15, pairs_per_step=8, lr=3e-3, warmup=1, dtype="float32")  # 30 steps
    history = dpo.train_dpo(policy, reference, pairs, tokenizer, cfg, torch.device("cpu"), 0, log=lambda *_: None)
    assert history[0]["dpo_part"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts at the reference
    assert history[-1]["margin"] > 0.5 and history[-1]["accuracy"] == 1.0
    with pytest.raises(tok.UserError, match="no preference pairs"):
        dpo.train_dpo(policy, reference, [], tokenizer, cfg, torch.device("cpu"), 0)


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"), ('{"prompt": "hi", "chosen": "a"}', '"prompt", "chosen" and "rejected"'),
    ('{"prompt": "hi", "chosen": "a", "rejected": " a "}', "the same text"),
    ('{"prompt": "hi", "chosen": " ", "rejected": "a"}', "the chosen response is empty")])
def test_malformed_pair_files_name_their_line(tmp_path, line, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n' + line + "\n")
    with pytest.raises(tok.UserError, match=f"pairs.jsonl:2: .*{problem}"):
        dpo.read_pairs(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(tok.UserError, match="holds no pairs"):
        dpo.read_pairs(tmp_path / "empty.jsonl")


def test_missing_inputs_name_the_command_that_makes_them(tmp_path, long_context):
    with pytest.raises(tok.UserError, match="run python 07_sft.py first"):
        dpo.main(["--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(tok.UserError, match="run python 06_reward_model.py first"):
        dpo.main(["--init", str(long_context), "--reward-model", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                  "--device", "cpu"])


def test_own_pairs_through_dpo_on_a_tiny_model(long_context, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no",
                                        "rejected": "no" if n % 2 == 0 else "yes"}) + "\n" for n in range(12)))
    dpo.main(["--init", str(long_context), "--data", str(path), "--out", str(tmp_path / "08"), "--epochs", "2",
              "--pairs-per-step", "4", "--device", "cpu"])  # 6 steps
    metrics = json.loads((tmp_path / "08" / "metrics.json").read_text())
    assert metrics["results"]["pairs"] == 12 and len((tmp_path / "08" / "log.jsonl").read_text().splitlines()) == 6
    mdl.load_checkpoint(tmp_path / "08")


def test_end_to_end_two_rounds_from_tiny_models(long_context, reward_run, tmp_path, monkeypatch):
    """The rounds, the NLL ablation and PPO on tiny models. A tiny model never ends a turn, so its
    samples are replaced by canned ones ("yes" or "no", alternating, each ending its turn): is_even
    prompts then give pairs and the whole loop runs; everything else is real."""
    def canned(model, tokenizer, prompts, cfg, seed, k=None, temperature=None):
        return [[("yes" if (i + seed) % 2 else "no", True) for i in range(k or cfg.samples)] for _ in prompts]
    monkeypatch.setattr(sft, "sample_answers", canned)
    out = tmp_path / "08"
    dpo.main(["--init", str(long_context), "--reward-model", str(reward_run), "--out", str(out), "--prompts", "6",
              "--test-prompts", "2", "--samples", "3", "--epochs", "2", "--pairs-per-step", "2", "--reward-steps", "2",
              "--sft-steps", "2", "--pass-k", "2", "--ablate-nll", "--ppo", "--device", "cpu"])
    runs = json.loads((out / "metrics.json").read_text())["results"]
    assert set(runs) == {"dpo", "dpo, no NLL", "ppo"}
    rounds = runs["dpo"][0]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[1]["eval"]["add"]) == {"greedy", "pass@2", "reward", "win_rate"}
    assert rounds[0]["eval"]["add"]["win_rate"] == 0.5  # the SFT model against itself: ties
    stats = rounds[1]["pairs"]
    assert stats["is_even"]["pairs"] > 0 and stats["is_even"]["reward_model_agrees"] <= stats["is_even"]["pairs"]
    assert sum(s["pairs"] for f, s in stats.items() if f != "is_even") == 0  # "yes"/"no" is right nowhere else
    dpo_steps = [sum(h["round"] == r for h in runs["dpo"][0]["steps"]) for r in (1, 2)]
    assert dpo_steps[0] == math.ceil(2 * stats["is_even"]["pairs"] / 2)  # --epochs 2, 2 pairs a step
    assert [sum(h["round"] == r for h in runs["ppo"][0]["steps"]) for r in (1, 2)] == dpo_steps  # PPO: the same budget
    assert (out / "dpo_steps.png").is_file() and (out / "rounds.png").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == sum(dpo_steps)
    section = "\n".join(tutorial_module("report").dpo_section(json.loads((out / "metrics.json").read_text()), out.parent))
    assert "| SFT model | 0 |" in section and "| dpo, no NLL | 2 |" in section and "| ppo | 1 |" in section  # the report


def test_rollouts_credit_the_reward_at_the_end_and_penalise_drift_from_the_reference(tokenizer, monkeypatch):
    """With the reference equal to the policy there is no KL penalty: each token's return is GAE of
    the standardised reward-model score placed on the last token. A reference that differs changes
    the returns by its per-token penalty."""
    monkeypatch.setattr(sft, "sample_answers", lambda m, t, prompts, cfg, seed, k=None, temperature=None:
                        [[("yes", True), ("no no", False)] for _ in prompts])
    monkeypatch.setattr(sft, "reward_scores", lambda rm, t, items, samples, device: [[1.0, -1.0] for _ in items])
    policy = tiny_model(tokenizer)
    torch.manual_seed(0)
    actor_critic = dpo.ActorCritic(policy)
    items = [item("is_even", "Is 40 an even number? Answer yes or no.")] * 2
    cfg = dpo.DPOConfig(dtype="float32", kl_coef=0.5)
    tokens, mask, old, advantages, returns = dpo.rollouts(actor_critic, policy, None, tokenizer, items, cfg, 0)
    assert tokens.shape[0] == 4 and torch.equal(mask[1, 1:] != 0, mask[3, 1:] != 0)
    with torch.no_grad():
        values = actor_critic(tokens, mask)[1]
    z = (torch.tensor([1.0, -1.0, 1.0, -1.0]) - 0.0) / torch.tensor([1.0, -1.0, 1.0, -1.0]).std()
    for n in range(4):
        where = (mask[n, 1:] != 0).nonzero()[:, 0]
        rewards = torch.zeros(len(where))
        rewards[-1] = z[n]
        assert returns[n, where].tolist() == pytest.approx(dpo.gae(rewards, values[n, where])[1].tolist(), abs=1e-5)
    assert mask[0, 1:].sum() == len(tokenizer.encode("yes")) + 1  # the answer and the <|eot_id|> that ended it
    keep = mask[:, 1:] != 0
    assert abs(advantages[keep].mean().item()) < 1e-5  # standardised over the batch's tokens
    _, _, _, _, drifted = dpo.rollouts(actor_critic, tiny_model(tokenizer, seed=1), None, tokenizer, items, cfg, 0)
    assert not torch.allclose(drifted[keep], returns[keep], atol=1e-3)


def test_gae_by_hand():
    """rewards 0, 0, 1 and values 0.5 each, γ = 1, λ = 0.5: δ = 0, 0, 0.5, so A = 0.125, 0.25, 0.5
    and returns A + V; with λ = 1 the returns are the Monte Carlo return, 1 at every token."""
    advantages, returns = dpo.gae(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.5, 0.5]), gamma=1.0, lam=0.5)
    assert advantages.tolist() == pytest.approx([0.125, 0.25, 0.5]) and returns.tolist() == pytest.approx([0.625, 0.75, 1.0])
    _, returns = dpo.gae(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.3, -0.2, 0.9]), gamma=1.0, lam=1.0)
    assert returns.tolist() == pytest.approx([1.0, 1.0, 1.0])
    advantages, _ = dpo.gae(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), gamma=0.5, lam=1.0)
    assert advantages.tolist() == pytest.approx([1.5, 1.0])  # discounted: 1 + 0.5 · 1


def test_ppo_clipped_objective_by_hand():
    """ε = 0.2. ρ = 1.5: with A = +1 the gain is capped at 1.2 (no gradient), with A = -1 the full
    -1.5 counts; ρ = 0.5: A = +1 counts fully (0.5), A = -1 is capped at -0.8."""
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = dpo.ppo_clipped_loss(logps, old, advantages, clip=0.2)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0])  # d/dlogp of -ρA = -ρA where unclipped


def test_sigkill_then_resume_own_pairs_gives_the_uninterrupted_run(long_context, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no",
                                        "rejected": "no" if n % 2 == 0 else "yes"}) + "\n" for n in range(12)))
    argv = ["--init", long_context, "--data", path, "--epochs", "2", "--pairs-per-step", "2", "--ckpt-every", "3",
            "--device", "cpu"]  # 12 steps
    check_kill_and_resume(dpo.main, ROOT / "08_dpo.py", argv, "phase_dpo.pt", 6, tmp_path)


def test_rounds_interrupted_in_dpo_and_in_ppo_resume_to_the_uninterrupted_run(long_context, reward_run, tmp_path,
                                                                             monkeypatch):
    """The rounds with the NLL ablation and PPO (canned samples, as in the end-to-end test), interrupted by a
    crash at an optimizer step of round 2's DPO, then of PPO's round 1, each time resumed with --resume."""
    def canned(model, tokenizer, prompts, cfg, seed, k=None, temperature=None):
        return [[("yes" if (i + seed) % 2 else "no", True) for i in range(k or cfg.samples)] for _ in prompts]
    monkeypatch.setattr(sft, "sample_answers", canned)
    argv = [str(a) for a in ["--init", long_context, "--reward-model", reward_run, "--prompts", "6", "--test-prompts",
                             "2", "--samples", "3", "--epochs", "2", "--pairs-per-step", "2", "--reward-steps", "2",
                             "--pass-k", "2", "--ablate-nll", "--ppo", "--ckpt-every", "2", "--device", "cpu"]]
    dpo.main(argv + ["--out", str(tmp_path / "whole")])
    out, real_step = tmp_path / "killed", dpo.pre.train_step
    for i, phase in enumerate(["dpo_nll_0_0_seed_8_round_2", "ppo_seed_8_round_1"]):  # plain DPO's round 2; PPO
        def crashing(*args, **kwargs):  # an optimizer step that never finishes, once the phase has saved step 2
            if saved_step(out / f"phase_{phase}.pt") >= 2:
                raise KeyboardInterrupt("crash")
            return real_step(*args, **kwargs)
        monkeypatch.setattr(dpo.pre, "train_step", crashing)
        with pytest.raises(KeyboardInterrupt):
            dpo.main(argv + ["--out", str(out)] + ["--resume"] * i)
    monkeypatch.setattr(dpo.pre, "train_step", real_step)
    dpo.main(argv + ["--out", str(out), "--resume"])
    assert_same_run(tmp_path / "killed", tmp_path / "whole")
