"""
Chapter 8: Direct Preference Optimization, the Llama 3 way, in on-policy rounds.

Llama 3 §4.1.4 aligns the fine-tuned model with DPO (Rafailov et al., 2023) rather than PPO: "DPO
required less compute for large-scale models and performed better". Two changes to plain DPO: the
formatting tokens (headers, <|eot_id|>) are masked out of the chosen and rejected log-probabilities,
and an NLL term on the chosen response (coefficient 0.2) keeps its likelihood from falling. §4.1.6
runs it in rounds: each round samples the latest model, collects preferences on those samples,
retrains the reward model, rejection-samples and fine-tunes, then runs DPO on the latest batch.
Meta's announcement says why preferences help: a model often "knows how to produce the right answer,
but it does not know how to select it". This chapter measures that on 06's tasks, from 07's model:

  * per round, K samples per prompt from the current policy; a pair is (a right sample, a wrong one),
    right and wrong decided by the verifier (or, with --judge "reward model", by the reward model
    where 06 found it trustworthy), the reward model's favourites first;
  * 06's reward model retrained on every pair so far; with --sft-steps N, 07's SFT continued on the
    round's best samples (rejection sampling) before DPO;
  * DPO on the round's pairs against a frozen copy of the policy as it enters DPO (the reference);
  * per round: held-out greedy accuracy and pass@16 (any of 16 samples right) per family, win rate
    against the SFT model judged by the reward model, and the reward model's score next to the truth;
  * --ablate-nll runs the same rounds without the NLL term, side by side; --ppo adds a compact PPO
    baseline with the same prompts, samples and optimizer steps.

Run it:
    python 08_dpo.py                                   # from runs/07_sft and runs/06_reward_model
    python 08_dpo.py --seeds 3                         # three seeds: the spread of every number
    python 08_dpo.py --init path/to/model --data preferences.jsonl --out runs/my_dpo   # your model and pairs
"""

import argparse
import copy
import importlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")
rwd = importlib.import_module("06_reward_model")
sft = importlib.import_module("07_sft")
TASKS = rwd.TASKS


@dataclass
class DPOConfig:
    rounds: int = 2  # on-policy rounds (the paper: six)
    prompts: int = 100  # fresh training prompts per family and round (DPO trains on the latest batch only)
    test_prompts: int = 40  # held-out prompts per family
    samples: int = 8  # responses sampled per prompt from the current policy
    temperature: float = 1.0  # for those samples
    max_new_tokens: int = 40  # room for an answer
    judge: str = field(default="verifier", metadata={"choices": ("verifier", "reward model")})  # who decides right and wrong: the verifier in every family, or 07's rule (the reward model where 06 trusted it)
    trust_reward_model: float = 0.9  # with --judge "reward model": 06's right-vs-wrong accuracy a family needs
    clear_margin: float = 2.2  # reward gap a reward-model-judged pair needs: σ(2.2) = 90% preference
    pairs_per_prompt: int = 4  # (right, wrong) pairs kept per prompt, the reward model's favourites first
    reward_steps: int = 30  # per round: 06's reward model retrained on all pairs so far
    sft_steps: int = 0  # per round: 07's SFT continued on the round's best samples first (off: see the README)
    sft_lr: float = 2e-4  # for those steps
    epochs: float = 3.0  # DPO passes over a round's pairs
    pairs_per_step: int = 32  # preference pairs per DPO step
    lr: float = 3e-5  # DPO's peak learning rate (the paper: 1e-5 for its large models)
    warmup: int = 5  # steps of linear warmup
    beta: float = 0.1  # DPO's β (the paper's value)
    nll_weight: float = 0.2  # the NLL term on chosen responses (the paper's value; 0 is plain DPO)
    pass_k: int = 16  # samples per held-out prompt for pass@k
    ablate_nll: bool = False  # also run every round with nll_weight 0, side by side
    ppo: bool = False  # also run the PPO baseline with the same prompts, samples and optimizer steps
    ppo_lr: float = 3e-5  # PPO's learning rate
    kl_coef: float = 0.05  # PPO's per-token KL penalty to the reference
    ppo_clip: float = 0.2  # PPO's ε
    seeds: int = 1  # repeat everything with this many seeds to show the spread (3 for the README)
    dtype: str = "auto"  # auto: bf16 on CUDA, else fp32
    ckpt_every: int = 20  # steps between the checkpoints of a training phase (--resume continues from the last)
    seed: int = 8  # prompts, samples, data order


GPU_DEFAULTS = DPOConfig(prompts=400, test_prompts=200, samples=16, pairs_per_step=64, reward_steps=200, sft_steps=100)


# =============================================================================
# The objective (Llama 3 §4.1.4)
# =============================================================================


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             chosen_nll=None, nll_weight=0.2):
    """DPO per pair, on each response's summed log-probability (B,):
    -log σ(β·((π_chosen - ref_chosen) - (π_rejected - ref_rejected))). With the policy equal to the
    reference it is log 2. logsigmoid keeps it finite for any margin."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    loss = -F.logsigmoid(beta * margin)
    if chosen_nll is not None:
        loss = loss + nll_weight * chosen_nll  # Llama 3: + 0.2 × NLL of the chosen response (mean per token)
    return loss


def response_mask(tokenizer, ids, mask):
    """06's loss mask without the formatting tokens: what DPO compares of two responses."""
    formatting = set(tokenizer.special_tokens.values())
    return [m * (i not in formatting) for i, m in zip(ids, mask)]  # Llama 3: headers and <|eot_id|> masked out


def response_logps(model, tokens, mask):
    """Summed log-probabilities of each row's targets where mask is 1 (07's target_logps): (B,), and
    their number (B,). tokens, mask: (B, T+1), right-padded: padding never reaches a real token."""
    return sft.target_logps(model, tokens, mask)[0].sum(1), (mask[:, 1:] != 0).sum(1)


# =============================================================================
# On-policy preference pairs (Llama 3 §4.1.6, §4.2.1)
# =============================================================================


def preference_pairs(items, samples, rewards, judges, clear_margin, per_prompt=4):
    """Clear pairs from each prompt's samples that ended their turn. A verifier-judged family pairs
    right samples with wrong ones, up to per_prompt pairs, the ones the reward model likes most
    first (the right answers it ranks highest against the wrong answers it is most fooled by); a
    reward-model-judged family pairs its best sample with its worst when their gap is clear_margin."""
    pairs = []
    for item, options, scores in zip(items, samples, rewards):
        ended = sorted([(r, " ".join(text.split())) for (text, done), r in zip(options, scores) if done], reverse=True)
        reward = {}
        for r, text in ended:
            reward.setdefault(text, r)  # the same words once, at their best reward
        distinct = [text for text in reward if text]  # (an empty answer has nothing for DPO to weigh)
        if judges[item["family"]] == "verifier":
            right = [t for t in distinct if TASKS[item["family"]].check(item["prompt"], t)]
            wrong = [t for t in distinct if not TASKS[item["family"]].check(item["prompt"], t)]
            chosen_rejected = [(good, bad) for good in right for bad in wrong][:per_prompt]
        else:
            clear = len(distinct) > 1 and reward[distinct[0]] - reward[distinct[-1]] >= clear_margin
            chosen_rejected = [(distinct[0], distinct[-1])] if clear else []
        pairs += [{"family": item["family"], "prompt": item["prompt"], "chosen": good, "rejected": bad,
                   "judge": judges[item["family"]], "reward_margin": reward[good] - reward[bad]}
                  for good, bad in chosen_rejected]
    return pairs


def pair_rows(pairs, tokenizer, device):
    """Pairs -> one batch: tokens and DPO's mask (2B, T+1), the B chosen rows first, right-padded."""
    rows = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            ids, mask = rwd.render(tokenizer, sft.dialog(pair["prompt"], pair[side]))
            rows.append((ids, [0] * len(ids), response_mask(tokenizer, ids, mask)))  # one document a row
    tokens, _, mask = sft.to_tensors(rows, device)  # 07's right padding
    return tokens, mask


# =============================================================================
# DPO training
# =============================================================================


@torch.no_grad()
def reference_logps(reference, pairs, tokenizer, cfg, device, batch=64):
    """The frozen reference's summed log-probabilities of every pair's chosen and rejected response."""
    chosen, rejected = [], []
    with mdl.autocast(device, cfg.dtype):
        for start in range(0, len(pairs), batch):
            part = pairs[start:start + batch]
            logps, _ = response_logps(reference, *pair_rows(part, tokenizer, device))
            chosen.append(logps[:len(part)]), rejected.append(logps[len(part):])
    return torch.cat(chosen), torch.cat(rejected)


def dpo_batch_loss(model, micro_batch, cfg, stats):
    """train_step's loss_fn: (sum of the per-pair loss, number of pairs); records the step's stats."""
    tokens, mask, ref_chosen, ref_rejected = micro_batch
    logps, counts = response_logps(model, tokens, mask)  # (2B,)
    B = len(ref_chosen)
    chosen, rejected = logps[:B], logps[B:]
    loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, -chosen / counts[:B].clamp(min=1),
                    cfg.nll_weight)
    margin = cfg.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()  # implicit reward margin
    stats.update(accuracy=(margin > 0).float().mean().item(), margin=margin.mean().item(),
                 chosen_logp=chosen.mean().item(), rejected_logp=rejected.mean().item(),
                 dpo_part=-F.logsigmoid(margin).mean().item())
    return loss.sum(), B


def train_dpo(policy, reference, pairs, tokenizer, cfg, device, seed, log=print, phases=None, phase="dpo"):
    """cfg.epochs over the pairs of AdamW on dpo_loss (03's training step); returns the per-step log.
    `phases` (03's PhaseCheckpoints) saves the loop's state as it goes and continues from a saved one."""
    phases = phases or pre.PhaseCheckpoints()
    if not pairs:
        raise tok.UserError("no preference pairs: every prompt's samples were all right or all wrong. "
                            "Sample more (--samples) or use more prompts (--prompts)")
    ref_chosen, ref_rejected = reference_logps(reference, pairs, tokenizer, cfg, device)
    steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.pairs_per_step))
    optimizer = pre.make_optimizer(policy.train(), cfg.lr, fused=device.type == "cuda")
    autocast, rng, history, order = mdl.autocast(device, cfg.dtype), random.Random(seed), [], []
    saved = phases.restore(phase, policy, optimizer, rng)
    history, order = saved.get("history", history), saved.get("order", order)
    for step in range(saved.get("step", 0), steps):
        while len(order) < min(cfg.pairs_per_step, len(pairs)):  # every pair once per epoch, in a new order
            order += rng.sample(range(len(pairs)), len(pairs))
        picked, order = order[:cfg.pairs_per_step], order[cfg.pairs_per_step:]
        index = torch.tensor(picked, device=device)
        batch = (*pair_rows([pairs[i] for i in picked], tokenizer, device), ref_chosen[index], ref_rejected[index])
        stats, lr = {}, cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss, grad_norm = pre.train_step(policy, optimizer, [batch],
                                         lambda m, b: dpo_batch_loss(m, b, cfg, stats), lr, autocast=autocast)
        history.append({"step": step + 1, "loss": loss, "grad_norm": grad_norm, **stats})
        if (step + 1) % 20 == 0 or step + 1 == steps:
            log(f"  dpo step {step + 1:>4}/{steps} | loss {loss:.4f} | pref acc {stats['accuracy']:.0%} | "
                f"margin {stats['margin']:+.2f} | logp chosen {stats['chosen_logp']:.2f} rejected "
                f"{stats['rejected_logp']:.2f}")
        phases.save(phase, step + 1, steps, policy, optimizer, rng, history=history, order=order)
    return history


# =============================================================================
# Evaluation: greedy, pass@k, win rate, the reward model against the truth
# =============================================================================


def evaluate(policy, reward_model, tokenizer, items, sft_greedy, cfg, seed):
    """Per family: greedy accuracy, pass@k, the reward model's mean score of the greedy answers, and
    the win rate of those answers against the SFT model's (`sft_greedy`), judged by the reward model
    (a tie counts half). Returns (per-family table, this model's greedy answers)."""
    prompts = [it["prompt"] for it in items]
    greedy = [options[0] for options in sft.sample_answers(policy, tokenizer, prompts, cfg, 0, k=1, temperature=0.0)]
    samples = sft.sample_answers(policy, tokenizer, prompts, cfg, seed, k=cfg.pass_k)
    sft_greedy = sft_greedy or greedy
    records = [{"prompt": p, "responses": [{"text": t, "ended": e} for t, e in (ours, theirs)]}
               for p, ours, theirs in zip(prompts, greedy, sft_greedy)]
    rewards = rwd.score(reward_model, tokenizer, records, policy.tok_embeddings.weight.device)
    per = {}
    for item, (text, _), (theirs_text, _), options, (ours, theirs) in zip(items, greedy, sft_greedy, samples, rewards):
        check = lambda answer: TASKS[item["family"]].check(item["prompt"], answer)
        row = per.setdefault(item["family"], {"greedy": [], f"pass@{cfg.pass_k}": [], "reward": [], "win_rate": []})
        row["greedy"].append(check(text))
        row[f"pass@{cfg.pass_k}"].append(any(check(t) for t, _ in options))
        row["reward"].append(ours)
        tie = " ".join(text.split()) == " ".join(theirs_text.split())  # the same answer: no float noise decides
        row["win_rate"].append(0.5 if tie else float(ours > theirs))
    return {f: {k: float(np.mean(v)) for k, v in row.items()} for f, row in per.items()}, greedy


# =============================================================================
# main
# =============================================================================


def main(argv=None):
    flags = parse_flags(argv)
    device = torch.device(mdl.pick_device(flags.device))
    cfg = pre.for_device(pre.config_from_flags(flags, GPU_DEFAULTS if device.type == "cuda" else DPOConfig()), device)
    init = Path(flags.init)
    if not init.exists():
        raise tok.UserError(f"{init} not found: run python 07_sft.py first (or pass --init DIR)")
    init_path, tokenizer = sft.base_model(flags)
    out = Path(flags.out)
    if pre.claim_run_folder(out, flags.resume, "phase_*.pt") == "finished":
        return print(f"{out} already holds the finished run: nothing to resume")
    phases = pre.PhaseCheckpoints(out, asdict(cfg), cfg.ckpt_every, flags.resume)
    out.mkdir(parents=True, exist_ok=True)
    policy = mdl.load_checkpoint(init_path, mmap=False)[0].to(device).eval()
    if flags.data:  # the user's own pairs: one round of DPO against the model itself
        pairs = read_pairs(flags.data)
        history = train_dpo(policy, copy.deepcopy(policy).eval(), pairs, tokenizer, cfg, device, cfg.seed,
                            phases=phases)
        save(out, policy, tokenizer, cfg, {"pairs": len(pairs), "final": history[-1]}, history)
        return phases.finish()
    reward_model, judges = sft.load_reward_model(flags.reward_model, tokenizer, cfg, device)
    judges = judges if cfg.judge == "reward model" else {family: "verifier" for family in TASKS}
    runs, configs = {}, [replace(cfg, seed=cfg.seed + 1000 * s) for s in range(cfg.seeds)]  # one per seed
    starts = [sft_baseline(policy, reward_model, tokenizer, c) for c in configs]  # the same for every variant
    variants = [("dpo", cfg.nll_weight)] + [("dpo, no NLL", 0.0)] * cfg.ablate_nll
    for name, nll_weight in variants:
        runs[name] = [dpo_rounds(policy, reward_model, tokenizer, judges, replace(c, nll_weight=nll_weight), device,
                                 start, phases=phases) for c, start in zip(configs, starts)]
    if cfg.ppo:
        runs["ppo"] = [ppo_rounds(policy, reward_model, tokenizer, c, device, start,
                                  [sum(h["round"] == r for h in dpo_run[2]) for r in range(1, cfg.rounds + 1)],
                                  phases=phases)
                       for c, start, dpo_run in zip(configs, starts, runs["dpo"])]
    results = {name: [r[1] for r in seeds] for name, seeds in runs.items()}
    final, history = runs["dpo"][0][0], runs["dpo"][0][2]
    print_results(results, cfg)
    save(out, final, tokenizer, cfg, results, history)
    plot_steps(results, out / "dpo_steps.png")
    plot_rounds(results["dpo"][0], out / "rounds.png")
    phases.finish()


def sft_baseline(sft_model, judge, tokenizer, cfg):
    """The held-out prompts, the SFT model's evaluation on them, and its greedy answers (what every
    later model's win rate is judged against)."""
    test = rwd.task_prompts("test", cfg.test_prompts, cfg.seed + 1)
    return (test, *evaluate(sft_model, judge, tokenizer, test, None, cfg, cfg.seed + 99))


def dpo_rounds(sft_model, judge, tokenizer, judges, cfg, device, start, log=print, phases=None):
    """The paper's loop from the SFT model; returns the last policy, per-round results and the DPO log.
    `judge`, 06's reward model, scores the win rates of every round (and of PPO) unchanged; a copy of
    it is retrained round by round to rank the samples."""
    items = rwd.task_prompts("train", cfg.prompts * cfg.rounds, cfg.seed)
    test, base_table, sft_greedy = start
    reward_model = copy.deepcopy(judge)
    results = {"rounds": [{"round": 0, "eval": base_table}], "judges": judges,
               "test_per_family": {f: sum(it["family"] == f for it in test) for f in TASKS}}
    policy, history, all_pairs = copy.deepcopy(sft_model), [], []
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        batch = items[r - 1::cfg.rounds]  # this round's fresh prompts
        pairs, stats = collect_pairs(policy, reward_model, tokenizer, batch, judges, cfg, cfg.seed + r)
        all_pairs += pairs
        log(f"round {r}: {len(pairs)} pairs from {len(batch)} prompts; the reward model retrained on all "
            f"{len(all_pairs)} so far" + (f", SFT on the chosen for {cfg.sft_steps} steps" * bool(cfg.sft_steps))
            + ", then DPO")
        retrain_reward_model(reward_model, all_pairs, tokenizer, cfg, device)
        if pairs and cfg.sft_steps:  # 07: rejection sampling's best answers, fine-tuned on
            policy, _ = sft.finetune(policy, [sft.dialog(p["prompt"], p["chosen"]) for p in pairs], tokenizer,
                                     sft.SFTConfig(steps=cfg.sft_steps, lr=cfg.sft_lr, warmup=5, dtype=cfg.dtype,
                                                   seq_len=min(256, policy.args.max_seq_len - 1)),
                                     device, cfg.seed + r, log=lambda *_: None, phases=phases,
                                     phase=f"sft nll {cfg.nll_weight} seed {cfg.seed} round {r}")
        if pairs:  # (a round whose samples were all right or all wrong has nothing to prefer)
            reference = copy.deepcopy(policy).eval()
            steps = train_dpo(policy, reference, pairs, tokenizer, cfg, device, cfg.seed + r, log, phases,
                              f"dpo nll {cfg.nll_weight} seed {cfg.seed} round {r}")
            history += [{"round": r, **s} for s in steps]
        table, _ = evaluate(policy.eval(), judge, tokenizer, test, sft_greedy, cfg, cfg.seed + 99)
        results["rounds"].append({"round": r, "pairs": stats, "eval": table, "seconds": time.time() - t0})
        log(f"round {r} held-out greedy accuracy: " + ", ".join(f"{f} {v['greedy']:.0%}" for f, v in table.items()))
    results["steps"] = history
    return policy, results, history


def collect_pairs(policy, reward_model, tokenizer, items, judges, cfg, seed):
    """K samples per prompt from the policy (one shared prefill each), scored by the reward model,
    turned into clear pairs; stats per family: prompts, pairs, and how many of them the verifier and
    the reward model each rank the same way (the reward model's accuracy on the policy's own samples)."""
    samples = sft.sample_answers(policy, tokenizer, [it["prompt"] for it in items], cfg, seed)
    rewards = sft.reward_scores(reward_model, tokenizer, items, samples, policy.tok_embeddings.weight.device)
    pairs = preference_pairs(items, samples, rewards, judges, cfg.clear_margin, cfg.pairs_per_prompt)
    stats = {f: {"prompts": sum(it["family"] == f for it in items), "pairs": sum(p["family"] == f for p in pairs),
                 "verifier_agrees": sum(p["family"] == f and TASKS[f].check(p["prompt"], p["chosen"])
                                        and not TASKS[f].check(p["prompt"], p["rejected"]) for p in pairs),
                 "reward_model_agrees": sum(p["family"] == f and p["reward_margin"] > 0 for p in pairs)}
             for f in TASKS}
    return pairs, stats


def retrain_reward_model(reward_model, pairs, tokenizer, cfg, device):
    """§4.1.2: the reward model trained further on every pair so far (06's loss and step)."""
    records = [{"family": p["family"], "prompt": p["prompt"], "responses": [
        {"text": p["chosen"], "rank": "chosen", "ended": True, "source": "policy sample"},
        {"text": p["rejected"], "rank": "rejected", "ended": True, "source": "policy sample"}]} for p in pairs]
    rcfg = rwd.RewardConfig(steps=cfg.reward_steps, lr=1e-4, warmup=5, dtype=cfg.dtype, seed=cfg.seed)
    if records and cfg.reward_steps:
        rwd.train_reward_model(reward_model.train(), records, tokenizer, rcfg, device, log=lambda *_: None)
    reward_model.eval()


# =============================================================================
# The PPO baseline (Llama 3 §4.1.4 tried PPO and kept DPO)
# =============================================================================


def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al., 2016) over one response's tokens:
    rewards, values (T,) -> advantages, returns (T,). δ_t = r_t + γ·V_{t+1} - V_t and
    A_t = δ_t + γλ·A_{t+1}, with V = 0 after the last token."""
    advantages, running = torch.zeros_like(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def ppo_clipped_loss(logps, old_logps, advantages, clip=0.2):
    """PPO's clipped surrogate (Schulman et al., 2017) per token: -min(ρ·A, clip(ρ, 1-ε, 1+ε)·A),
    ρ = π/π_old: a token whose probability already moved by more than ε gets no further push."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


class ActorCritic(torch.nn.Module):
    """The policy and a value head on its final hidden states (detached: the value loss trains the
    head alone, so the policy moves by the clipped objective only)."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.value_head = policy, torch.nn.Linear(policy.args.dim, 1)

    def forward(self, tokens, mask):
        logps, hidden = sft.target_logps(self.policy, tokens, mask)  # (B, T), (B, T, D)
        return logps, self.value_head(hidden.detach()).squeeze(-1).float()  # (B, T), (B, T)


@torch.no_grad()
def rollouts(actor_critic, reference, reward_model, tokenizer, items, cfg, seed):
    """K samples per prompt from the policy, as rows with what PPO needs per token: the old
    log-probs, advantages and returns. The reward of a token is the KL penalty to the reference (the
    SFT model: zero while the policy still equals it); the last token adds the reward model's score,
    standardised over the batch."""
    policy, device = actor_critic.policy, actor_critic.value_head.weight.device
    samples = sft.sample_answers(policy, tokenizer, [it["prompt"] for it in items], cfg, seed)
    scores = torch.tensor(sft.reward_scores(reward_model, tokenizer, items, samples, device)).flatten()  # (N,)
    scores = (scores - scores.mean()) / (scores.std() + 1e-6)
    rendered = [rwd.render(tokenizer, sft.dialog(it["prompt"], text), end=ended)
                for it, options in zip(items, samples) for text, ended in options]
    tokens, _, mask = sft.to_tensors([(ids, [0] * len(ids), m) for ids, m in rendered], device)  # (N, T+1)
    old, values, ref = [], [], []
    with mdl.autocast(device, cfg.dtype):  # as in training, so the first ratio π/π_old is 1
        for start in range(0, len(tokens), 64):  # (N, T) in chunks: the log-softmax is (targets, V)
            chunk = tokens[start:start + 64], mask[start:start + 64]
            (o, v), r = actor_critic(*chunk), sft.target_logps(reference, *chunk)[0]
            old.append(o), values.append(v), ref.append(r)
    old, values, ref = torch.cat(old), torch.cat(values), torch.cat(ref)  # (N, T) each
    keep = mask[:, 1:] != 0  # (N, T): the sampled tokens (and the <|eot_id|> that ended a turn)
    rewards = -cfg.kl_coef * (old - ref) * keep  # (N, T)
    advantages, returns = torch.zeros_like(old), torch.zeros_like(old)
    for n in range(len(tokens)):
        where = keep[n].nonzero()[:, 0]
        if len(where) == 0:  # an empty response that never ended: nothing to credit
            continue
        rewards[n, where[-1]] += scores[n]
        advantages[n, where], returns[n, where] = gae(rewards[n, where], values[n, where])
    advantages = (advantages - advantages[keep].mean()) / (advantages[keep].std() + 1e-6) * keep
    return tokens, mask, old, advantages, returns


def ppo_batch_loss(actor_critic, micro_batch, cfg):
    """train_step's loss_fn: the clipped objective plus the value loss, summed over tokens."""
    tokens, mask, old, advantages, returns = micro_batch
    logps, values = actor_critic(tokens, mask)
    keep = mask[:, 1:] != 0
    loss = ppo_clipped_loss(logps, old, advantages, cfg.ppo_clip) + 0.5 * (values - returns) ** 2
    return (loss * keep).sum(), keep.sum()


def ppo_rounds(sft_model, reward_model, tokenizer, cfg, device, start, steps_per_round, log=print, phases=None):
    """PPO with DPO's budget: the same prompts, K samples each, and DPO's optimizer steps per round."""
    phases = phases or pre.PhaseCheckpoints()
    items = rwd.task_prompts("train", cfg.prompts * cfg.rounds, cfg.seed)
    test, table, sft_greedy = start
    results = {"rounds": [{"round": 0, "eval": table}], "test_per_family": {f: sum(it["family"] == f for it in test)
                                                                           for f in TASKS}, "steps": []}
    torch.manual_seed(cfg.seed)  # the value head's initial weights
    actor_critic = ActorCritic(copy.deepcopy(sft_model)).to(device)
    reference = copy.deepcopy(sft_model).eval()  # the KL penalty's anchor, fixed (InstructGPT's PPO)
    autocast, rng = mdl.autocast(device, cfg.dtype), random.Random(cfg.seed)
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        data = rollouts(actor_critic, reference, reward_model, tokenizer, items[r - 1::cfg.rounds], cfg, cfg.seed + r)
        optimizer = pre.make_optimizer(actor_critic.train(), cfg.ppo_lr, fused=device.type == "cuda")
        phase, steps = f"ppo seed {cfg.seed} round {r}", steps_per_round[r - 1]
        saved = phases.restore(phase, actor_critic, optimizer, rng)
        results["steps"] = saved.get("log", results["steps"])
        for step in range(saved.get("step", 0), steps):
            index = torch.tensor(rng.sample(range(len(data[0])), min(2 * cfg.pairs_per_step, len(data[0]))))
            lr = cfg.ppo_lr * min(1.0, (step + 1) / cfg.warmup)
            loss, _ = pre.train_step(actor_critic, optimizer, [tuple(t[index] for t in data)],
                                     lambda m, b: ppo_batch_loss(m, b, cfg), lr, autocast=autocast)
            results["steps"].append({"round": r, "step": step + 1, "loss": loss})
            phases.save(phase, step + 1, steps, actor_critic, optimizer, rng, log=results["steps"])
        table, _ = evaluate(actor_critic.policy.eval(), reward_model, tokenizer, test, sft_greedy, cfg, cfg.seed + 99)
        results["rounds"].append({"round": r, "eval": table, "seconds": time.time() - t0})
        log(f"ppo round {r} held-out greedy accuracy: " + ", ".join(f"{f} {v['greedy']:.0%}" for f, v in table.items()))
    return actor_critic.policy, results, results["steps"]


# =============================================================================
# Plumbing: results, files, flags, plots
# =============================================================================


def print_results(results, cfg):
    k = f"pass@{cfg.pass_k}"
    for name, seeds in results.items():
        rounds = seeds[0]["rounds"]
        print(f"\n{name}: held-out accuracy per family ({seeds[0]['test_per_family']['add']} prompts a family, fewer "
              f"where the held-out space is small): greedy / {k}, then win rate against the SFT model (reward model)")
        print(f"{'family':<15}" + "".join(f"{'SFT' if r['round'] == 0 else 'round ' + str(r['round']):>16}"
                                          for r in rounds))
        for f in rounds[0]["eval"]:
            print(f"{f:<15}" + "".join(f"{r['eval'][f]['greedy']:>9.0%} /{r['eval'][f][k]:>5.0%}" for r in rounds))
        means = lambda key: [np.mean([e[key] for e in r["eval"].values()]) for r in rounds]
        print(f"{'mean':<15}" + "".join(f"{g:>9.1%} /{p:>5.0%}" for g, p in zip(means("greedy"), means(k))))
        print(f"{'win rate':<15}" + "".join(f"{w:>16.0%}" for w in means("win_rate")))
        print(f"{'reward (mean)':<15}" + "".join(f"{w:>16.2f}" for w in means("reward")))
        print(f"{'seconds':<15}" + "".join(f"{r.get('seconds', 0):>16.0f}" for r in rounds))
        if len(seeds) > 1:
            last = [np.mean([e["greedy"] for e in s["rounds"][-1]["eval"].values()]) for s in seeds]
            start = [np.mean([e["greedy"] for e in s["rounds"][0]["eval"].values()]) for s in seeds]
            print(f"over {len(seeds)} seeds: SFT {np.mean(start):.1%} ± {np.std(start):.1%}, "
                  f"last round {np.mean(last):.1%} ± {np.std(last):.1%}")


def save(out, model, tokenizer, cfg, results, history):
    mdl.save_checkpoint(out / "model.pt", model, config=asdict(cfg))
    tokenizer.save(out / "tokenizer.model")
    tok.atomic_write_text(out / "metrics.json", json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    tok.atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    print(f"wrote {out / 'model.pt'}, metrics.json, log.jsonl")


def read_pairs(path):
    """A JSONL file, one pair a line: {"prompt": ..., "chosen": ..., "rejected": ...}."""
    pairs = []
    for where, pair in rwd.read_jsonl(path, "pairs"):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise tok.UserError(f'{where}: needs "prompt", "chosen" and "rejected" strings')
        if not pair["chosen"].strip():
            raise tok.UserError(f"{where}: the chosen response is empty: nothing to learn from")
        if pair["chosen"].strip() == pair["rejected"].strip():
            raise tok.UserError(f"{where}: chosen and rejected are the same text: nothing to prefer")
        pairs.append({"family": pair.get("family", "data"), "judge": "data", **pair})
    return pairs


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/07_sft", help="the policy to start from (07's output)")
    parser.add_argument("--tokenizer", default=None, help="its tokenizer.model (default: the one beside --init)")
    parser.add_argument("--reward-model", default="runs/06_reward_model", help="06's output")
    parser.add_argument("--data", default=None, help="DPO on your own preference pairs (JSONL) instead of the tasks")
    parser.add_argument("--out", default="runs/08_dpo", help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pre.add_config_flags(parser, DPOConfig, DPOConfig())
    return parser.parse_args(argv)


def plot_steps(results, path):
    """Per DPO step: the chosen and rejected log-probabilities (a falling chosen one is DPO's known
    failure, the NLL term's reason) and the preference accuracy, for each variant."""
    fig, (ax1, ax2) = pre.figure(2, figsize=(11, 4))
    for name, seeds in results.items():
        if not name.startswith("dpo"):
            continue
        steps = seeds[0]["steps"]
        x = range(1, len(steps) + 1)
        for side, style in (("chosen_logp", "-"), ("rejected_logp", "--")):
            ax1.plot(x, [s[side] for s in steps], style, label=f"{name}: {side.split('_')[0]}")
        ax2.plot(x, [s["accuracy"] for s in steps], label=name)
    ax1.set_xlabel("DPO step (all rounds)"), ax1.set_ylabel("summed log-prob of a response"), ax1.legend(fontsize=7)
    ax2.set_xlabel("DPO step (all rounds)"), ax2.set_ylabel("preference accuracy"), ax2.legend(fontsize=7)
    pre.save_figure(fig, path)


def plot_rounds(results, path):
    fig, ax = pre.figure(figsize=(8, 4))
    rounds = results["rounds"]
    for family in rounds[0]["eval"]:
        line, = ax.plot([r["round"] for r in rounds], [r["eval"][family]["greedy"] for r in rounds], marker="o",
                        label=family)
        ax.plot([r["round"] for r in rounds], [r["eval"][family][next(k for k in r["eval"][family] if k.startswith("pass"))]
                                               for r in rounds], ":", color=line.get_color())
    ax.set_xticks([r["round"] for r in rounds], ["SFT"] + [f"round {r['round']}" for r in rounds[1:]])
    ax.set_ylabel("held-out accuracy: greedy (solid), pass@k (dotted)"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    pre.save_figure(fig, path)


if __name__ == "__main__":
    tok.run_main(main)
