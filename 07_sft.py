"""
Chapter 7: supervised fine-tuning, rejection sampling with the reward model, rounds, and averaging.

Llama 3 §4.1.3 fine-tunes the pre-trained model on dialogs with the loss on the assistant's tokens
only; §4.2.2 grows the data by rejection sampling: for each prompt, K responses (10-30) from the
latest model, the reward model picks the best, and the next round fine-tunes the pre-trained model
again on everything so far (§4.1.6, six rounds). §4.3.3 keeps math solutions whose final answer is
right; §4.3.4 mixes in a little long-context data (0.1% was best); §4.1.5 averages models trained
with different data orders or hyperparameters. Here, at laptop scale, on 06's chat tasks:

  * SFT: dialogs packed into rows with the document mask, 06's loss mask, 03's training step;
  * rejection sampling: K samples per prompt from one shared prefill of the prompt (02's
    generate(num_samples=K)), scored by 06's reward model packed in one row per prompt; where the
    reward model cannot tell right from wrong (06 measured it per family), the verifier filters;
  * capability data: step-by-step sums for the addition family, and a few long-context questions;
  * rounds: round 1 on seed data; round 2 from the base model again on seed + rejection-sampled
    data, for as many steps (so round 1 is round 2's compute-matched control); a table and plot of
    held-out accuracy per family after each round, and best-of-K (greedy, a random sample, the
    reward model's pick, the verifier's pick) for the last model;
  * --average N: the last round trained with N data orders and averaged (§4.1.5);
  * --multilingual: the same tasks asked in Ukrainian, after English-only SFT and after SFT with
    translated prompts added (§4.3.2);
  * --chat: talk to the fine-tuned model (streamed; /reset clears the history; Ctrl-D leaves).

Run it:
    python 07_sft.py                                  # from runs/05_anneal and runs/06_reward_model: ~12 minutes
    python 07_sft.py --seeds 3                        # three seeds: the spread of every number
    python 07_sft.py --multilingual --out runs/07_multilingual   # §4.3.2: transfer to Ukrainian prompts
    python 07_sft.py --chat                           # talk to runs/07_sft/model.pt
    python 07_sft.py --init path/to/Llama-3.2-1B --data dialogs.jsonl --out runs/my_sft   # your model and data
"""

import argparse
import copy
import functools
import importlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")
rwd = importlib.import_module("06_reward_model")
TASKS = rwd.TASKS


@dataclass
class SFTConfig:
    seed_prompts: int = 1000  # prompts per family with a written answer (the "human" seed data; 200 are memorised,
    #                           not generalised: see the README)
    pool_prompts: int = 500  # further prompts per family, without answers: rejection sampling answers them
    test_prompts: int = 60  # held-out prompts per family
    rounds: int = 2  # round 1: seed data; each later round adds the last model's rejection samples
    steps: int = 600  # optimizer steps per round (every round the same: the rounds are compute-matched); at 250,
    #                    reverse_words and add stay near 0%: the training loss only drops between steps 300 and 400
    dialogs_per_step: int = 64  # dialogs per optimizer step, packed into rows
    seq_len: int = 256  # tokens per packed row
    lr: float = 1e-3  # peak; warmup, then cosine to 10% of it
    warmup: int = 20  # steps of linear warmup
    samples: int = 8  # rejection samples per prompt (the paper: 10-30)
    temperature: float = 0.8  # for rejection samples (the paper: 0.2-1 in early rounds)
    max_new_tokens: int = 40  # room for an answer (step-by-step sums are the longest)
    trust_reward_model: float = 0.9  # 06's held-out right-vs-wrong accuracy a family needs to be judged by it
    long_context: int = 4  # long-context dialogs in the data (§4.3.4: 0.1% of the mix was best)
    average: int = 1  # train the last round this many times (data orders) and average them (§4.1.5)
    seeds: int = 1  # repeat everything with this many seeds to show the spread (3 for the README)
    multilingual: bool = False  # §4.3.2: also measure transfer to Ukrainian prompts (two more fine-tunes)
    translated_share: float = 0.5  # with --multilingual: translated (Ukrainian) seed prompts per English one
    dtype: str = "auto"  # auto: bf16 on CUDA, else fp32
    ckpt_every: int = 50  # steps between the checkpoints of a training phase (--resume continues from the last)
    seed: int = 7  # data order, samples


GPU_DEFAULTS = SFTConfig(seed_prompts=2000, pool_prompts=2000, test_prompts=200, steps=2000, dialogs_per_step=256,
                         seq_len=1024, samples=16)


# =============================================================================
# Data: seed dialogs, step-by-step sums, long-context questions, packing
# =============================================================================


def step_by_step_sum(prompt):
    """A worked two-digit addition, digit by digit with the carry (§4.3.3's step-wise solutions):
    "What is 37 + 45?" -> "7 + 5 = 12, 3 + 4 + 1 = 8. The answer is 82." Small transformers learn
    sums far faster this way than as one lookup of two number tokens."""
    a, b = rwd.numbers_in(prompt)
    low = a % 10 + b % 10
    high = f"{a // 10} + {b // 10}" + (" + 1" if low >= 10 else "")
    return f"{a % 10} + {b % 10} = {low}, {high} = {a // 10 + b // 10 + low // 10}. The answer is {a + b}."


def seed_answer(item):
    """The written answer of a seed prompt: the sum worked step by step, else the bare answer."""
    return step_by_step_sum(item["prompt"]) if item["family"] == "add" else item["answer"]


def dialog(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def long_context_dialogs(n, tokenizer, length, seed):
    """§4.3.4 at our scale: a question about a fact placed inside a long stretch of corpus-like text
    (a list of the task words here, so the chapter needs no corpus), `length` tokens in all."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        key, value = rng.choice(rwd.WORDS), rng.randrange(10, 100)
        words = " ".join(rng.choice(rwd.WORDS) for _ in range(length))
        filler = tokenizer.decode(tokenizer.encode(words)[:max(0, length - 60)])
        cut = rng.randrange(len(filler) + 1)
        text = f"{filler[:cut]} The number of the {key} is {value}. {filler[cut:]}"
        out.append(dialog(f"{text}\nWhat is the number of the {key}?", str(value)))
    return out


def check_dialog(messages, where):
    """A training dialog must be a list of messages that ends with the assistant's turn."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise tok.UserError(f"{where}: a dialog is a list of messages ({{\"role\", \"content\"}})")
    if messages[-1].get("role") != "assistant":
        raise tok.UserError(f"{where}: the dialog must end with the assistant's turn (that is what is learned)")


def pack_dialogs(rendered, seq_len, rng):
    """Rendered dialogs (ids, mask) -> packed rows (tokens, doc_ids, mask) of seq_len + 1, shuffled,
    next-fit in that order (a row is closed when the next dialog does not fit): no dialog is split
    and no row is padded beyond its last dialog (padding is a document of its own, -1, with mask 0).
    A dialog longer than a row gets a row of its own length."""
    order = list(range(len(rendered)))
    rng.shuffle(order)
    rows, current = [], ([], [], [])
    for i in order:
        ids, mask = rendered[i]
        if len(current[0]) + len(ids) > seq_len + 1 and current[0]:
            rows.append(current)
            current = ([], [], [])
        doc = (current[1][-1] + 1) if current[1] else 0
        current = (current[0] + ids, current[1] + [doc] * len(ids), current[2] + mask)
    rows.append(current)
    return rows


def to_tensors(rows, device):
    """Packed rows of possibly different lengths -> (tokens, doc_ids, mask), right-padded."""
    T = max(len(r[0]) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (ids, docs, m) in enumerate(rows):
        tokens[b, :len(ids)], doc_ids[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), torch.tensor(docs), torch.tensor(m)
    return tokens.to(device), doc_ids.to(device), mask.to(device)


# =============================================================================
# SFT (Llama 3 §4.1.3)
# =============================================================================


def target_logps(model, tokens, mask, doc_ids=None):
    """Each next-token target's log-probability where mask is 1, in float32 (0 elsewhere): (B, T);
    and the final hidden states (B, T, D). tokens, mask, doc_ids: (B, T+1). (08's DPO and PPO read
    log-probabilities the same way.)"""
    hidden = model.hidden(tokens[:, :-1], doc_ids=None if doc_ids is None else doc_ids[:, :-1])  # (B, T, D)
    keep = mask[:, 1:] != 0  # (B, T): a target counts where the token it predicts is the assistant's
    # The output head only where a target counts: the other positions would get zero gradient
    # anyway, and the head is ~40% of a small model's FLOPs, so SFT runs faster than pretraining.
    logps = torch.log_softmax(model.output(hidden[keep]).float(), -1)  # (n, V)
    picked = logps.gather(1, tokens[:, 1:][keep][:, None])[:, 0]  # (n,)
    return torch.zeros(keep.shape, device=tokens.device).masked_scatter(keep, picked), hidden


def sft_loss(model, batch):
    """Cross-entropy on the assistant's tokens only: the loss_fn for 03's train_step. Returns (sum
    over the tokens the mask keeps, how many): the step divides by the count over the whole batch,
    so a packed batch gives the loss of its dialogs run one by one (not a mean of per-row means)."""
    tokens, doc_ids, mask = batch  # (b, T+1) each
    logps, _ = target_logps(model, tokens, mask, doc_ids)  # (b, T)
    return -logps.sum(), (mask[:, 1:] != 0).sum()


def sft_lr(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def finetune(base, dialogs, tokenizer, cfg, device, seed, log=print, phases=None, phase="sft"):
    """A fresh copy of the base model (a checkpoint path, or a model: 08 continues its policy)
    fine-tuned on `dialogs` for cfg.steps; returns it and its log. `phases` (03's PhaseCheckpoints)
    saves the loop's state as it goes and continues from a saved one."""
    phases = phases or pre.PhaseCheckpoints()
    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else mdl.load_checkpoint(base, mmap=False)[0]
    model = model.to(device).train()
    optimizer = pre.make_optimizer(model, cfg.lr, fused=device.type == "cuda")
    autocast, rng = mdl.autocast(device, cfg.dtype), random.Random(seed)
    rendered = [rwd.render(tokenizer, d) for d in dialogs]
    too_long = [len(ids) for ids, _ in rendered if len(ids) > model.args.max_seq_len + 1]
    if too_long:
        raise tok.UserError(f"{len(too_long)} dialogs are longer than the model's context ({max(too_long)} > "
                            f"{model.args.max_seq_len} tokens): shorten them or extend the context first (04)")
    rows = []  # packed rows, refilled with a new shuffle whenever they run out
    history = []
    saved = phases.restore(phase, model, optimizer, rng)
    rows, history = saved.get("rows", rows), saved.get("history", history)
    for step in range(saved.get("step", 0), cfg.steps):
        batch_rows, n_dialogs = [], 0
        while n_dialogs < cfg.dialogs_per_step:
            if not rows:
                rows = pack_dialogs(rendered, cfg.seq_len, rng)
            row = rows.pop()
            batch_rows.append(row)
            n_dialogs += row[1][-1] + 1
        short = [r for r in batch_rows if len(r[0]) <= cfg.seq_len + 1]
        micro_batches = [to_tensors([r], device) for r in batch_rows if len(r[0]) > cfg.seq_len + 1]  # long: alone
        micro_batches += [to_tensors(short, device)] if short else []
        t0 = time.time()
        loss, grad_norm = pre.train_step(model, optimizer, micro_batches, sft_loss, sft_lr(step, cfg),
                                         autocast=autocast)
        history.append({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "ms": 1000 * (time.time() - t0),
                        "dialogs": n_dialogs})
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log(f"  sft step {step + 1:>4}/{cfg.steps} | loss {loss:.4f} | grad {grad_norm:.2f} | "
                f"{history[-1]['ms']:.0f} ms")
        phases.save(phase, step + 1, cfg.steps, model, optimizer, rng, rows=rows, history=history)
    return model.eval(), history


# =============================================================================
# Rejection sampling (Llama 3 §4.2.2)
# =============================================================================


def sample_answers(model, tokenizer, prompts, cfg, seed, k=None, temperature=None):
    """06's sample_responses with this chapter's settings: k (default cfg.samples) responses per
    prompt from one shared prefill each, greedy when temperature is 0. -> one list of (text, ended)
    per prompt."""
    return rwd.sample_responses(model, tokenizer, prompts, cfg.max_new_tokens, seed,
                                cfg.temperature if temperature is None else temperature, k or cfg.samples, cfg.dtype,
                                batch=32)


def reward_judges(rm_metrics, threshold):
    """Per family, who picks rejection samples: the reward model where 06 measured it telling a
    right answer from a wrong one on at least `threshold` of held-out pairs, else the verifier."""
    accuracy = {key.split(" | ")[0]: value["accuracy"] for key, value in rm_metrics["accuracy"].items()
                if key.endswith("chosen vs wrong_answer")}
    return {family: "reward model" if accuracy.get(family, 0.0) >= threshold else "verifier" for family in TASKS}


def pick_best(items, samples, rewards, judges):
    """Rejection sampling's choice per prompt: the highest-reward sample that ended its turn; for a
    family judged by the verifier, the highest-reward sample among those it accepts (§4.3.3). None
    when no sample qualifies. -> a list of (item, text or None)."""
    picks = []
    for item, options, scores in zip(items, samples, rewards):
        task = TASKS[item["family"]]
        candidates = [(r, text) for (text, ended), r in zip(options, scores)
                      if ended and (judges[item["family"]] == "reward model" or task.check(item["prompt"], text))]
        picks.append((item, max(candidates)[1] if candidates else None))
    return picks


def reward_scores(reward_model, tokenizer, items, samples, device):
    """The reward of every sample, a prompt and its k samples packed in one row (06's packing)."""
    records = [{"prompt": it["prompt"], "responses": [{"text": t, "ended": e} for t, e in options]}
               for it, options in zip(items, samples)]
    return rwd.score(reward_model, tokenizer, records, device)


def rejection_sample(model, reward_model, tokenizer, items, judges, cfg, seed, log=print):
    """New SFT dialogs: for each prompt, k samples from `model`, the best kept (or none)."""
    t0 = time.time()
    samples = sample_answers(model, tokenizer, [it["prompt"] for it in items], cfg, seed)
    rewards = reward_scores(reward_model, tokenizer, items, samples, model.tok_embeddings.weight.device)
    picks = pick_best(items, samples, rewards, judges)
    kept = [(it, text) for it, text in picks if text is not None]
    right = sum(TASKS[it["family"]].check(it["prompt"], text) for it, text in kept)
    log(f"rejection sampling: {len(items) * cfg.samples:,} samples for {len(items)} prompts in "
        f"{time.time() - t0:.0f} s; kept {len(kept)} ({right} verified right)")
    return [dialog(it["prompt"], text) for it, text in kept], {
        family: {"judge": judges[family], "prompts": sum(it["family"] == family for it in items),
                 "kept": sum(it["family"] == family for it, _ in kept),
                 "kept_right": sum(it["family"] == family and TASKS[family].check(it["prompt"], t) for it, t in kept)}
        for family in TASKS}


# =============================================================================
# Evaluation
# =============================================================================


def accuracy(model, tokenizer, items, cfg):
    """Held-out greedy accuracy per family (the verifier decides)."""
    answers = sample_answers(model, tokenizer, [it["prompt"] for it in items], cfg, 0, k=1, temperature=0.0)
    per = {}
    for item, ((text, _),) in zip(items, answers):
        per.setdefault(item["family"], []).append(TASKS[item["family"]].check(item["prompt"], text))
    return {family: float(np.mean(v)) for family, v in per.items()}


def best_of_k(model, reward_model, tokenizer, items, judges, cfg, seed):
    """Per family on held-out prompts: greedy, one random sample, the reward model's pick among k,
    and the verifier's pick (right if any sample is: the oracle best-of-k)."""
    greedy = accuracy(model, tokenizer, items, cfg)
    samples = sample_answers(model, tokenizer, [it["prompt"] for it in items], cfg, seed)
    rewards = reward_scores(reward_model, tokenizer, items, samples, model.tok_embeddings.weight.device)
    table = {f: {"greedy": greedy[f], "random sample": [], "reward model pick": [], "verifier pick (oracle)": []}
             for f in greedy}
    for item, options, scores in zip(items, samples, rewards):
        check = functools.partial(TASKS[item["family"]].check, item["prompt"])
        row = table[item["family"]]
        row["random sample"].append(check(options[0][0]))
        row["reward model pick"].append(check(max(zip(scores, [t for t, _ in options]))[1]))
        row["verifier pick (oracle)"].append(any(check(t) for t, _ in options))
    return {f: {k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in row.items()} for f, row in table.items()}


def cross_lingual(base_path, tokenizer, cfg, device, phases=None):
    """§4.3.2 at our scale: does SFT on English prompts carry over to the same tasks asked in
    Ukrainian, and what do translated prompts add? Two fine-tunes of the base model for the same
    steps: on English seed dialogs alone, and on those plus Ukrainian ones (the paper's "translated
    reasoning data", 34.6% of its multilingual SFT mix). Held-out accuracy per family in both languages."""
    english = rwd.task_prompts("train", cfg.seed_prompts, cfg.seed)
    translated = rwd.task_prompts("train", round(cfg.seed_prompts * cfg.translated_share), cfg.seed + 1,
                                  language="Ukrainian")
    tests = {lang: rwd.task_prompts("test", cfg.test_prompts, cfg.seed + 2, language=lang) for lang in rwd.LANGUAGES}
    base, _ = mdl.load_checkpoint(base_path, mmap=False)
    results = {"base": {lang: accuracy(base.to(device).eval(), tokenizer, items, cfg) for lang, items in tests.items()}}
    del base
    for name, items in [("English SFT", english), ("English + translated SFT", english + translated)]:
        print(f"multilingual: fine-tuning the base model on {len(items):,} dialogs ({name})")
        data = [dialog(it["prompt"], seed_answer(it)) for it in items]
        model, _ = finetune(base_path, data, tokenizer, cfg, device, cfg.seed, phases=phases, phase=f"multilingual {name}")
        results[name] = {lang: accuracy(model, tokenizer, items, cfg) for lang, items in tests.items()}
    results["items"] = {"English train": len(english), "Ukrainian train": len(translated),
                        **{f"{lang} test": len(items) for lang, items in tests.items()}}
    return results


def print_cross_lingual(results):
    runs = [r for r in results if r != "items"]
    print(f"\ncross-lingual transfer (§4.3.2): held-out greedy accuracy, English / Ukrainian prompts "
          f"({results['items']['English test']} / {results['items']['Ukrainian test']} in all)")
    print(f"{'family':<15}" + "".join(f"{r:>28}" for r in runs))
    for f in results["base"]["English"]:
        print(f"{f:<15}" + "".join(f"{results[r]['English'][f]:>21.0%} / {results[r]['Ukrainian'][f]:>4.0%}" for r in runs))
    print(f"{'mean':<15}" + "".join(f"{np.mean(list(results[r]['English'].values())):>21.1%} / "
                                   f"{np.mean(list(results[r]['Ukrainian'].values())):>4.1%}" for r in runs))


def averaged(models):
    """§4.1.5: the element-wise mean of several fine-tuned models' weights."""
    model = models[0]
    with torch.no_grad():
        state = {k: torch.stack([m.state_dict()[k].float() for m in models]).mean(0) for k in model.state_dict()}
        model.load_state_dict(state)
    return model


# =============================================================================
# main
# =============================================================================


def main(argv=None):
    flags = parse_flags(argv)
    if flags.chat:
        return chat(Path(flags.out), flags.device)
    device = torch.device(mdl.pick_device(flags.device))
    cfg = pre.for_device(pre.config_from_flags(flags, GPU_DEFAULTS if device.type == "cuda" else SFTConfig()), device)
    base_path, tokenizer = base_model(flags)
    out = Path(flags.out)
    if pre.claim_run_folder(out, flags.resume, "phase_*.pt") == "finished":
        return print(f"{out} already holds the finished run: nothing to resume")
    phases = pre.PhaseCheckpoints(out, asdict(cfg), cfg.ckpt_every, flags.resume)
    out.mkdir(parents=True, exist_ok=True)
    if flags.data:  # the user's own dialogs: plain SFT, one round
        dialogs = read_dialogs(flags.data)
        model, history = finetune(base_path, dialogs, tokenizer, replace(cfg, rounds=1), device, cfg.seed,
                                  phases=phases)
        save(out, model, tokenizer, cfg, {"dialogs": len(dialogs), "final_loss": history[-1]["loss"]}, history)
        return phases.finish()
    reward_model, judges = load_reward_model(flags.reward_model, tokenizer, cfg, device)
    runs = [sft_rounds(base_path, tokenizer, reward_model, judges, replace(cfg, seed=cfg.seed + 1000 * s), device,
                       phases) for s in range(cfg.seeds)]
    model, results, history = runs[0]
    results["seeds"] = [r[1]["rounds"] for r in runs]
    print_rounds(results, cfg)
    if cfg.multilingual:
        results["multilingual"] = cross_lingual(base_path, tokenizer, cfg, device, phases)
        print_cross_lingual(results["multilingual"])
    save(out, model, tokenizer, cfg, results, history)
    plot_rounds(results, out / "rounds.png")
    phases.finish()


def sft_rounds(base_path, tokenizer, reward_model, judges, cfg, device, phases=None):
    """Round 1 on seed data; each later round fine-tunes the base model again on the seed data and
    every round's rejection samples so far (§4.1.6). Returns the last model, results, its log."""
    seed_items = rwd.task_prompts("train", cfg.seed_prompts + cfg.pool_prompts, cfg.seed)
    by_family = {}
    for item in seed_items:
        by_family.setdefault(item["family"], []).append(item)
    seed = [it for items in by_family.values() for it in items[:cfg.seed_prompts]]
    pool = [it for items in by_family.values() for it in items[cfg.seed_prompts:]]
    test = rwd.task_prompts("test", cfg.test_prompts, cfg.seed + 1)
    model, _ = mdl.load_checkpoint(base_path, mmap=False)
    long_dialogs = long_context_dialogs(cfg.long_context, tokenizer, model.args.max_seq_len - 64, cfg.seed)
    data = [dialog(it["prompt"], seed_answer(it)) for it in seed] + long_dialogs
    results = {"rounds": [{"round": 0, "accuracy": accuracy(model.to(device).eval(), tokenizer, test, cfg)}],
               "judges": judges, "items": {"seed": len(seed), "pool": len(pool), "test": len(test),
                                           "test_per_family": {f: sum(it["family"] == f for it in test) for f in TASKS}}}
    del model
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        print(f"round {r}: fine-tuning the base model on {len(data):,} dialogs for {cfg.steps} steps")
        runs = [finetune(base_path, data, tokenizer, cfg, device, cfg.seed + r * 10 + a, phases=phases,
                         phase=f"seed {cfg.seed} round {r} order {a}") for a in range(cfg.average)]
        members = [accuracy(m, tokenizer, test, cfg) for m, _ in runs] if cfg.average > 1 else []
        model, history = runs[0] if cfg.average == 1 else (averaged([m for m, _ in runs]), runs[0][1])
        record = {"round": r, "dialogs": len(data), "accuracy": accuracy(model, tokenizer, test, cfg),
                  "seconds": time.time() - t0}
        if members:  # §4.1.5: each data order's model, next to their average
            record["members"] = members
        results["rounds"].append(record)
        print(f"round {r} held-out accuracy: " + ", ".join(f"{f} {a:.0%}" for f, a in record["accuracy"].items()))
        if r < cfg.rounds:
            new, stats = rejection_sample(model, reward_model, tokenizer, pool, judges, cfg, cfg.seed + r)
            record["rejection_sampling"] = stats
            data = data + new
    results["best_of_k"] = best_of_k(model, reward_model, tokenizer, test, judges, cfg, cfg.seed + 99)
    return model, results, history


def base_model(flags):
    """The checkpoint to fine-tune and its tokenizer (beside it, or --tokenizer), checked to match."""
    init = Path(flags.init)
    if not init.exists():
        raise tok.UserError(f"{init} not found: run python 05_anneal.py first (or pass --init DIR)")
    folder = init if init.is_dir() else init.parent
    candidates = [Path(flags.tokenizer)] if flags.tokenizer else [folder / "tokenizer.model",
                                                                  folder / "original" / "tokenizer.model"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise tok.UserError(f"no tokenizer.model beside {init}: pass --tokenizer PATH")
    tokenizer = tok.Tokenizer.load(path)
    _, args = mdl.load_checkpoint(init)  # memory-mapped: only the shapes are read here
    if args.vocab_size != tokenizer.n_words:
        raise tok.UserError(f"{path} has {tokenizer.n_words} ids but {init} was trained with {args.vocab_size}: "
                            f"pass the tokenizer the model was trained with (--tokenizer)")
    return init, tokenizer


def load_reward_model(path, tokenizer, cfg, device):
    path = Path(path)
    reward_model = rwd.load_reward_model(path, device)
    if reward_model.model.args.vocab_size != tokenizer.n_words:
        raise tok.UserError(f"the reward model in {path} uses another tokenizer ({reward_model.model.args.vocab_size} "
                            f"ids, not {tokenizer.n_words}): train one for this model with 06_reward_model.py --init")
    metrics_path = (path if path.is_dir() else path.parent) / "metrics.json"
    judges = reward_judges(json.loads(metrics_path.read_text()), cfg.trust_reward_model) if metrics_path.is_file() \
        else {family: "verifier" for family in TASKS}
    return reward_model, judges


def print_rounds(results, cfg):
    families = list(results["rounds"][0]["accuracy"])
    print("\nheld-out greedy accuracy (prompts per family in brackets)")
    print(f"{'family':<19}" + "".join(f"{'base' if r['round'] == 0 else 'round ' + str(r['round']):>10}"
                                      for r in results["rounds"]) + "   judge of rejection samples")
    for f in families:
        print(f"{f + ' (' + str(results['items']['test_per_family'][f]) + ')':<19}"
              + "".join(f"{r['accuracy'][f]:>10.0%}" for r in results["rounds"]) + f"   {results['judges'][f]}")
    print(f"{'mean':<19}" + "".join(f"{np.mean(list(r['accuracy'].values())):>10.1%}" for r in results["rounds"]))
    for member, acc in enumerate(results["rounds"][-1].get("members", []), 1):
        print(f"{'member ' + str(member):<19}" + " " * 10 * (len(results["rounds"]) - 1) + f"{np.mean(list(acc.values())):>10.1%}")
    if len(results["seeds"]) > 1:
        last = [np.mean(list(s[-1]["accuracy"].values())) for s in results["seeds"]]
        first = [np.mean(list(s[1]["accuracy"].values())) for s in results["seeds"]]
        print(f"over {len(last)} seeds: round 1 {np.mean(first):.1%} ± {np.std(first):.1%}, "
              f"last round {np.mean(last):.1%} ± {np.std(last):.1%}")
    print(f"\nbest of {cfg.samples} on held-out prompts (last model)")
    columns = ("greedy", "random sample", "reward model pick", "verifier pick (oracle)")
    print(f"{'family':<14}" + "".join(f"{c:>24}" for c in columns))
    for f, row in results["best_of_k"].items():
        print(f"{f:<14}" + "".join(f"{row[c]:>24.0%}" for c in columns))


def save(out, model, tokenizer, cfg, results, history):
    mdl.save_checkpoint(out / "model.pt", model, config=asdict(cfg))
    tokenizer.save(out / "tokenizer.model")
    tok.atomic_write_text(out / "metrics.json", json.dumps({"config": asdict(cfg), **results}, indent=2))
    tok.atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    print(f"wrote {out / 'model.pt'}, metrics.json, log.jsonl")


# =============================================================================
# Chat
# =============================================================================


def chat(folder, device_name="auto", read=input, write=print):
    """Talk to a fine-tuned model: each reply streams as it is generated and ends at <|eot_id|>;
    the dialog so far is the context; /reset starts over; an empty line is ignored; Ctrl-D leaves."""
    if not (folder / "model.pt").is_file():
        raise tok.UserError(f"{folder / 'model.pt'} not found: run python 07_sft.py first (or pass --out DIR)")
    device = torch.device(mdl.pick_device(device_name))
    model, args = mdl.load_checkpoint(folder)
    model, tokenizer = model.to(device).eval(), tok.Tokenizer.load(folder / "tokenizer.model")
    write("chat with the fine-tuned model: /reset starts over, Ctrl-D leaves")
    messages = []
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            return write("")
        if not line:
            continue
        if line == "/reset":
            messages = []
            write("(history cleared)")
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode_dialog(messages)
        while len(prompt) + 64 > args.max_seq_len and len(messages) > 1:  # forget the oldest turns
            messages = messages[2:]
            prompt = tokenizer.encode_dialog(messages)
        reply = stream_reply(model, tokenizer, prompt, min(64, args.max_seq_len - len(prompt)), write)
        messages.append({"role": "assistant", "content": reply})


def stream_reply(model, tokenizer, prompt, max_new_tokens, write):
    """Generate greedily, printing each new piece of text as soon as it decodes to whole characters."""
    made, shown = [], ""
    def show(_, token):
        nonlocal shown
        made.append(token)
        text = tokenizer.decode(made)
        if not text.endswith("\ufffd"):  # wait for the rest of a character split across tokens
            write(text[len(shown):], end="", flush=True)
            shown = text
    write("model> ", end="", flush=True)
    if max_new_tokens > 0:
        mdl.generate(model, [prompt], max_new_tokens, stop_tokens=tokenizer.stop_tokens, on_token=show)
    write("")
    return tokenizer.decode(made)


# =============================================================================
# Plumbing: dialog files, flags, plots
# =============================================================================


def read_dialogs(path):
    """A JSONL file, one dialog a line: {"messages": [{"role", "content"}, ...]} or the list itself."""
    dialogs = []
    for where, record in rwd.read_jsonl(path, "dialogs"):
        messages = record.get("messages") if isinstance(record, dict) else record
        check_dialog(messages, where)
        dialogs.append(messages)
    return dialogs


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/05_anneal", help="the model to fine-tune: ours, a Meta or HF folder")
    parser.add_argument("--tokenizer", default=None, help="its tokenizer.model (default: the one beside --init)")
    parser.add_argument("--reward-model", default="runs/06_reward_model", help="06's output")
    parser.add_argument("--data", default=None, help="fine-tune on your own dialogs (JSONL) instead of the tasks")
    parser.add_argument("--out", default="runs/07_sft", help="output folder")
    parser.add_argument("--chat", action="store_true", help="talk to the model in --out")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pre.add_config_flags(parser, SFTConfig, SFTConfig())
    return parser.parse_args(argv)


def plot_rounds(results, path):
    fig, ax = pre.figure(figsize=(8, 4))
    rounds = results["rounds"]
    for family in rounds[0]["accuracy"]:
        ax.plot([r["round"] for r in rounds], [r["accuracy"][family] for r in rounds], marker="o", label=family)
    ax.set_xticks([r["round"] for r in rounds], ["base"] + [f"round {r['round']}" for r in rounds[1:]])
    ax.set_ylabel("held-out greedy accuracy"), ax.set_ylim(-0.02, 1.02), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    pre.save_figure(fig, path)


if __name__ == "__main__":
    tok.run_main(main)
