"""
Chapter 6: chat tasks with verifiers, preference data as Llama 3 annotates it, and the reward model.

Post-training starts here (Llama 3 §4.1-§4.2). Each round of the paper trains a reward model on
human preferences, then uses it to pick the best of many samples (rejection sampling, 07) and DPO
(08) learns from the same kind of pairs. At laptop scale the annotators are programs:

  * chat tasks (TASKS): families of prompts whose answers a program can check, with seeded train and
    held-out prompts that never overlap; later chapters train and evaluate on them;
  * render(): a dialog in the Llama 3 chat format (01's encode_message) with its loss mask, only the
    assistant's words and closing <|eot_id|> counting;
  * preferences the Llama 3 way (§4.1.2, §4.2.1): per prompt 2-3 responses ranked edited > chosen >
    rejected with a strength label, taken from the policy's own samples where they are realistic
    failures and from controlled corruptions of verified answers otherwise; near-identical pairs and
    unclear preferences are dropped;
  * the reward model: 02's transformer from the base model with a scalar head on a response's last
    token, trained with Bradley-Terry without Llama 2's margin term, and, as §4.1.2 does, the prompt
    and its shuffled responses packed into one row so the prompt is encoded once.

It reports held-out pairwise accuracy per family and per pair type next to two baselines (a coin,
and "the longer response is better"), a histogram of reward margins, and metrics.json.

Run it:
    python 06_reward_model.py                          # from runs/05_anneal: ~5 minutes on CPU
    python 06_reward_model.py --data my_prefs.jsonl    # train on your own preference records
    python 06_reward_model.py --steps 50 --train-prompts 40 --test-prompts 10   # a smoke test
"""

import argparse
import functools
import hashlib
import importlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")


@dataclass
class RewardConfig:
    train_prompts: int = 300  # training prompts per task family
    test_prompts: int = 60  # held-out prompts per task family
    policy_share: float = 0.3  # share of rejected responses taken from the base model's own samples
    steps: int = 600  # optimizer steps
    records_per_step: int = 16  # preference records per step (2-3 ranked responses, 1-3 pairs each)
    lr: float = 3e-4  # AdamW, after a short warmup
    warmup: int = 10  # steps of linear warmup
    max_response_tokens: int = 24  # samples from the policy stop here if they have not ended
    dtype: str = "auto"  # auto: bf16 on CUDA, else fp32
    ckpt_every: int = 50  # steps between the checkpoints of a training phase (--resume continues from the last)
    seed: int = 6  # prompts, corruptions, data order


# =============================================================================
# Chat tasks: prompts whose answers a program can check
# =============================================================================

WORDS = ("red blue green dog sun moon tree river stone king queen bread fire water house horse bird star gold "
         "door book hand eye wind rain salt milk fish lamb bear sword crown field city sea land cup ring").split()

# The same families in Ukrainian, for multilingual SFT (Llama 3 §4.3.2: a third of the multilingual SFT
# data was reasoning data translated from English). Each template keeps the English one's structure,
# so one verifier checks both: numbers, and the word list after ": ".
UKRAINIAN = {
    "words": ("червоний синій зелений пес сонце місяць дерево річка камінь король королева хліб вогонь вода дім "
              "кінь птах зоря золото двері книга рука око вітер дощ сіль молоко риба ягня ведмідь меч корона поле "
              "місто море земля чаша перстень").split(),
    "sort": "Впорядкуй цифри {} від найменшої до найбільшої.",
    "reverse": "Переверни слова: {}",
    "larger": "Яке число більше, {} чи {}?",
    "even": "Чи є {} парним числом? Відповідай так або ні.",
    "count": "Скільки слів у цьому списку: {}?",
    "add": "Скільки буде {} + {}?",
    "times": "Скільки буде {} помножити на {}?",
    "yes": "так", "no": "ні",
}
ENGLISH = {"words": WORDS, "sort": "Sort the digits {} from smallest to largest.", "reverse": "Reverse the words: {}",
           "larger": "Which number is larger, {} or {}?", "even": "Is {} an even number? Answer yes or no.",
           "count": "How many words are in this list: {}?", "add": "What is {} + {}?", "times": "What is {} times {}?",
           "yes": "yes", "no": "no"}
LANGUAGES = {"English": ENGLISH, "Ukrainian": UKRAINIAN}


def language_of(prompt):
    """A prompt's language: Ukrainian if it has a Cyrillic letter, else English."""
    return "Ukrainian" if re.search(r"[\u0400-\u04ff]", prompt) else "English"


def yes_no(prompt, answer):
    """`answer` (True for yes) in the prompt's language."""
    return LANGUAGES[language_of(prompt)]["yes" if answer else "no"]


@dataclass(frozen=True)
class Task:
    """A family of prompts: `make(rng)` draws a prompt and its canonical answer; `answer_of(prompt)`
    recomputes the answer from the prompt alone, which is what makes `check` a verifier;
    `mistake(prompt, rng)` is a wrong answer of the kind a model makes (a near miss, not noise)."""
    name: str
    make: object
    answer_of: object
    mistake: object
    hard: bool  # expected to stay partly unsolved by SFT at the CPU default (room for 07-08)

    def check(self, prompt, response):
        """Whether `response` answers `prompt`: the answer alone, or ending "The answer is ANSWER.", nothing after."""
        return normalise(response) == self.answer_of(prompt)


def normalise(response):
    """A response's answer: what follows its last "The answer is" (worked steps may come before it;
    §4.3.3 keeps step-by-step solutions by their final answer), stripped, without a final full stop."""
    text = response.strip()
    if "The answer is" in text:
        text = text[text.rindex("The answer is") + len("The answer is"):].strip()
    return text[:-1].strip() if text.endswith(".") else text


def numbers_in(prompt):
    return [int(n) for n in re.findall(r"\d+", prompt)]


def _sort(rng, lang=ENGLISH):
    digits = rng.sample(range(10), 4)
    return lang["sort"].format(" ".join(map(str, digits))), " ".join(map(str, sorted(digits)))


def _reverse(rng, lang=ENGLISH):
    words = rng.sample(lang["words"], 3)
    return lang["reverse"].format(" ".join(words)), " ".join(reversed(words))


def _larger(rng, lang=ENGLISH):
    a, b = rng.sample(range(10, 100), 2)
    return lang["larger"].format(a, b), str(max(a, b))


def _even(rng, lang=ENGLISH):
    n = rng.randrange(10, 100)
    return lang["even"].format(n), lang["yes" if n % 2 == 0 else "no"]


def _count(rng, lang=ENGLISH):
    words = rng.sample(lang["words"], rng.randint(2, 6))
    return lang["count"].format(" ".join(words)), str(len(words))


def _add(rng, lang=ENGLISH):
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return lang["add"].format(a, b), str(a + b)


def _times(rng, lang=ENGLISH):
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    return lang["times"].format(a, b), str(a * b)


def _shuffled(items, rng):
    """A different order of `items` (they are distinct): a near miss for sorting and reversing."""
    order = list(items)
    while order == list(items):
        rng.shuffle(order)
    return order


def _off_by(n, rng, steps=(-10, -2, -1, 1, 2, 10)):
    return str(max(0, n + rng.choice([s for s in steps if n + s >= 0 and s != 0])))


def _sort_mistake(p, rng):
    return " ".join(map(str, _shuffled(sorted(numbers_in(p)), rng)))


def _reverse_mistake(p, rng):
    words = p.split(": ")[1].split()
    return " ".join(_shuffled(list(reversed(words)), rng))


TASKS = {t.name: t for t in [
    Task("sort_digits", _sort, lambda p: " ".join(map(str, sorted(numbers_in(p)))), _sort_mistake, hard=False),
    Task("reverse_words", _reverse, lambda p: " ".join(reversed(p.split(": ")[1].split())), _reverse_mistake,
         hard=False),
    Task("larger", _larger, lambda p: str(max(numbers_in(p))), lambda p, rng: str(min(numbers_in(p))), hard=False),
    Task("is_even", _even, lambda p: yes_no(p, numbers_in(p)[0] % 2 == 0),  # yes/no: chance is 50%
         lambda p, rng: yes_no(p, numbers_in(p)[0] % 2 == 1), hard=False),
    Task("count_words", _count, lambda p: str(len(p.split(": ")[1].rstrip("?").split())),
         lambda p, rng: _off_by(len(p.split(": ")[1].rstrip("?").split()), rng, (-1, 1)), hard=False),
    Task("add", _add, lambda p: str(sum(numbers_in(p))), lambda p, rng: _off_by(sum(numbers_in(p)), rng), hard=True),
    Task("times", _times, lambda p: str(math.prod(numbers_in(p))),
         lambda p, rng: str(math.prod(numbers_in(p)) + rng.choice(numbers_in(p)) * rng.choice([-1, 1])), hard=True),
]}


def is_held_out_prompt(prompt, share=0.2):
    """Train or held out, by a hash of the prompt's text alone: the two splits never share a prompt,
    whatever the seeds (families with few distinct prompts, like is_even's 90, split the same way)."""
    return int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16) < share * 16**8


def task_prompts(split, per_family, seed, families=None, language="English"):
    """`per_family` distinct prompts of each family from one split ("train" or "test"), as dicts
    {"family", "prompt", "answer"}, in English or Ukrainian. A family with fewer distinct prompts in
    the split gives them all."""
    rng, out = random.Random(seed), []
    for task in (TASKS[f] for f in (families or TASKS)):
        seen = {}
        for _ in range(per_family * 50):
            prompt, answer = task.make(rng, LANGUAGES[language])
            if is_held_out_prompt(prompt) == (split == "test") and prompt not in seen:
                seen[prompt] = answer
                if len(seen) == per_family:
                    break
        out += [{"family": task.name, "prompt": p, "answer": a} for p, a in seen.items()]
    return out


# =============================================================================
# Dialogs in the Llama 3 chat format, with the loss mask
# =============================================================================


def render(tokenizer, messages, end=True):
    """A dialog -> (ids, loss_mask). ids: <|begin_of_text|> then each message as 01 encodes it;
    the mask is 1 on the assistant's content and on the <|eot_id|> that closes it (the model must
    learn to stop), 0 on BOS, headers and every other role's tokens. end=False leaves the last
    assistant message open (no <|eot_id|>), as a response that never stopped."""
    if not any(m["role"] == "assistant" for m in messages):
        raise tok.UserError("a dialog to learn from needs an assistant message: nothing would be trained")
    ids, mask = [tokenizer.bos_id], [0]
    for i, message in enumerate(messages):
        header = tokenizer.encode_header(message["role"])
        message_ids = tokenizer.encode_message(message)[len(header):]  # content + <|eot_id|>
        if i == len(messages) - 1 and not end:
            message_ids = message_ids[:-1]
        learn = int(message["role"] == "assistant")
        ids += header + message_ids
        mask += [0] * len(header) + [learn] * len(message_ids)
    return ids, mask


def prompt_ids(tokenizer, prompt):
    """A one-turn prompt as the model sees it before answering: it ends with an open assistant header."""
    return tokenizer.encode_dialog([{"role": "user", "content": prompt}])


# =============================================================================
# Preferences, the Llama 3 way (§4.1.2, §4.2.1)
# =============================================================================

RANKS = ("edited", "chosen", "rejected")  # best first
STRENGTHS = ("significantly better", "better", "slightly better", "marginally better")  # §4.2.1's four levels
KEPT_STRENGTHS = STRENGTHS[:2]  # §4.2.1: only clear preferences train the reward model
CORRUPTIONS = ("wrong_answer",) * 3 + ("format", "rambling", "no_end")  # being wrong is the failure that matters


def corrupt(task, prompt, answer, kind, rng):
    """A controlled failure of a verified answer: (text, ended). Lengths vary both ways where the
    kind allows, so that "the longer response is better" cannot tell good from bad.
    wrong_answer: well formed ("The answer is ...", as chosen answers read, so that only being right
    tells them apart), wrong the way a model is wrong (the family's `mistake`: an unsorted order,
    the smaller number, a sum off by a little); format: the right content in the wrong shape; rambling: the right
    answer, then it keeps talking; no_end: the right answer repeated to the length limit, unended."""
    if kind == "wrong_answer":
        return f"The answer is {task.mistake(prompt, rng)}.", True
    if kind == "format":
        shapes = [f"[{answer}]", f"{answer}?", f"ANSWER: {answer.upper()}", f"{answer}!!! {answer}",
                  f"The answer is probably {answer}, or maybe not {answer}?", f"ANSWER >>> {answer} <<< ANSWER!!!"]
        if " " in answer:
            shapes += [answer.replace(" ", ""), answer.replace(" ", ", ")]
        return rng.choice(shapes), True
    if kind == "rambling":
        return f"{answer} and the {' '.join(rng.sample(WORDS, 6))}", True
    if kind == "no_end":
        return " ".join([answer] * 4), False
    raise ValueError(f"unknown corruption {kind!r}")


def preference_record(item, rng, policy_sample=None, policy_share=0.3):
    """One prompt's ranked responses: edited (the verified answer, alone), chosen (the same answer in
    a wordier form, or the policy's own sample when the verifier accepts it) and rejected (the
    policy's failed sample, or a corruption). Each response says where it came from."""
    task, prompt, answer = TASKS[item["family"]], item["prompt"], item["answer"]
    responses = [{"text": answer, "ended": True, "rank": "edited", "source": "verified answer"}]
    if policy_sample and policy_sample[1] and task.check(prompt, policy_sample[0]):
        responses.append({"text": policy_sample[0], "ended": True, "rank": "chosen", "source": "policy sample"})
    else:
        responses.append({"text": f"The answer is {answer}.", "ended": True, "rank": "chosen",
                          "source": "verified answer, wordier"})
    if policy_sample and not task.check(prompt, policy_sample[0]) and rng.random() < policy_share:
        responses.append({"text": policy_sample[0], "ended": policy_sample[1], "rank": "rejected",
                          "source": "policy sample"})
    else:
        kind = rng.choice(CORRUPTIONS)
        text, ended = corrupt(task, prompt, answer, kind, rng)
        responses.append({"text": text, "ended": ended, "rank": "rejected", "source": f"corruption: {kind}"})
    return {"family": task.name, "prompt": prompt, "responses": responses,
            "strength": {"edited>chosen": "better", "chosen>rejected": "significantly better"}}


def ranked_pairs(record):
    """Every ordered pair of a record's responses (better, worse) whose ranks differ and whose
    preference is clear (§4.2.1), skipping responses identical after normalisation. With three
    ranked responses that is up to three pairs. Returns (better index, worse index, pair type)."""
    pairs = []
    responses = record["responses"]
    for i, better in enumerate(responses):
        for j, worse in enumerate(responses):
            if RANKS.index(better["rank"]) >= RANKS.index(worse["rank"]):
                continue
            strength = record.get("strength", {}).get(f"{better['rank']}>{worse['rank']}", "significantly better")
            same = " ".join(better["text"].lower().split()) == " ".join(worse["text"].lower().split()) \
                and better["ended"] == worse["ended"]  # the same text, up to case and spacing
            if strength in KEPT_STRENGTHS and not same:
                pairs.append((i, j, pair_type(better, worse)))
    return pairs


def pair_type(better, worse):
    if better["rank"] == "edited" and worse["rank"] == "chosen":
        return "edited vs chosen"
    kind = worse["source"].removeprefix("corruption: ")
    return f"{better['rank']} vs {kind}"


# =============================================================================
# The reward model (§4.1.2)
# =============================================================================


class RewardModel(nn.Module):
    """02's transformer (from the base model) with a scalar head reading the final hidden state of a
    response's last token: the reward. The language-model head is kept, unused, so the trunk saves
    and loads as any checkpoint of 02."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.reward_head = nn.Linear(model.args.dim, 1, bias=False)
        nn.init.zeros_(self.reward_head.weight)  # every reward starts at 0: no preference before training

    def forward(self, tokens, branches, ends):
        """tokens, branches (B, T) as in shared_prefix_mask; ends (B, K): the position of each
        branch's last token (-1 where a row has fewer branches). -> rewards (B, K)."""
        hidden = self.model.hidden(tokens, branches=branches)  # (B, T, D)
        rewards = self.reward_head(hidden).squeeze(-1).float()  # (B, T)
        return rewards.gather(1, ends.clamp(min=0))  # (B, K)


def reward_loss(better_rewards, worse_rewards):
    """Llama 3 §4.1.2: Llama 2's Bradley-Terry objective without its margin term,
    -log σ(r_better - r_worse), summed over pairs (train_step divides by their number)."""
    return -F.logsigmoid(better_rewards - worse_rewards).sum()  # logsigmoid: finite for any margin


def pack(record, tokenizer, rng=None):
    """One row for a record (§4.1.2): the prompt once, then its responses in shuffled order, each a
    branch that sees the prompt and itself. Returns (ids, branches, ends, order): ends[k] is the
    position of the k-th packed response's last token, order[k] its index in the record."""
    ids = prompt_ids(tokenizer, record["prompt"])
    branches = [0] * len(ids)
    order = list(range(len(record["responses"])))
    if rng is not None:
        rng.shuffle(order)
    ends = []
    for k, i in enumerate(order, 1):
        response = record["responses"][i]
        body = tokenizer.encode(response["text"].strip()) + ([tokenizer.eot_id] if response["ended"] else [])
        ids += body
        branches += [k] * len(body)
        ends.append(len(ids) - 1)
    return ids, branches, ends, order


def collate(rows, device):
    """Packed rows -> padded tensors: tokens and branches (padding is branch -1), ends (B, K)."""
    T, K = max(len(r[0]) for r in rows), max(len(r[2]) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    branches = torch.full((len(rows), T), -1, dtype=torch.long)
    ends = torch.full((len(rows), K), -1, dtype=torch.long)
    for b, (ids, br, en, _) in enumerate(rows):
        tokens[b, :len(ids)], branches[b, :len(br)], ends[b, :len(en)] = torch.tensor(ids), torch.tensor(br), torch.tensor(en)
    return tokens.to(device), branches.to(device), ends.to(device)


def preference_loss(reward_model, micro_batch):
    """train_step's loss_fn: (sum of reward_loss over every clear pair, number of pairs)."""
    (tokens, branches, ends), pairs = micro_batch
    rewards = reward_model(tokens, branches, ends)  # (B, K)
    better = torch.stack([rewards[b, i] for b, i, _ in pairs])
    worse = torch.stack([rewards[b, j] for b, _, j in pairs])
    return reward_loss(better, worse), len(pairs)


def micro_batch(records, tokenizer, rng, device):
    """Records -> one micro-batch: packed rows and the (row, better column, worse column) pairs."""
    rows, pairs = [], []
    for b, record in enumerate(records):
        row = pack(record, tokenizer, rng)
        column = {i: k for k, i in enumerate(row[3])}  # record index -> packed position
        pairs += [(b, column[i], column[j]) for i, j, _ in ranked_pairs(record)]
        rows.append(row)
    return collate(rows, device), pairs


def train_reward_model(reward_model, records, tokenizer, cfg, device, log=print, phases=None, phase="reward model"):
    """AdamW on the reward loss with 03's training step; returns the per-step log. `phases` (03's
    PhaseCheckpoints) saves the loop's state as it goes and continues from a saved one."""
    phases = phases or pre.PhaseCheckpoints()
    optimizer = pre.make_optimizer(reward_model, cfg.lr, fused=device.type == "cuda")
    autocast = mdl.autocast(device, cfg.dtype)
    rng, history = random.Random(cfg.seed), []
    saved = phases.restore(phase, reward_model, optimizer, rng)
    history = saved.get("history", history)
    usable = [r for r in records if ranked_pairs(r)]
    for step in range(saved.get("step", 0), cfg.steps):
        batch = rng.sample(usable, min(cfg.records_per_step, len(usable)))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss, grad_norm = pre.train_step(reward_model, optimizer, [micro_batch(batch, tokenizer, rng, device)],
                                         preference_loss, lr, autocast=autocast)
        history.append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            log(f"reward model step {step + 1:>4}/{cfg.steps} | loss {loss:.4f} | grad {grad_norm:.2f}")
        phases.save(phase, step + 1, cfg.steps, reward_model, optimizer, rng, history=history)
    return history


def fitting(record, tokenizer, context):
    """A record split into records of consecutive responses whose packed row fits `context` tokens
    (the prompt repeated in each); one record when it all fits."""
    prompt, parts, size = len(prompt_ids(tokenizer, record["prompt"])), [[]], 0
    for response in record["responses"]:
        length = len(tokenizer.encode(response["text"].strip())) + response["ended"]
        if prompt + length > context:
            raise tok.UserError(f"a prompt and one response take {prompt + length} tokens, more than the "
                                f"reward model's context of {context}: shorten them")
        if parts[-1] and prompt + size + length > context:
            parts.append([])
            size = 0
        parts[-1].append(response)
        size += length
    return [{**record, "responses": part} for part in parts]


@torch.no_grad()
def score(reward_model, tokenizer, records, device, batch=32):
    """Rewards of every response of every record, in the records' order: a list of lists."""
    reward_model.eval()
    context = reward_model.model.args.max_seq_len
    parts = [(i, part) for i, record in enumerate(records) for part in fitting(record, tokenizer, context)]
    out = [[] for _ in records]
    for start in range(0, len(parts), batch):
        rows = [pack(part, tokenizer) for _, part in parts[start:start + batch]]
        rewards = reward_model(*collate(rows, device)).cpu()  # (B, K)
        for b, ((i, _), row) in enumerate(zip(parts[start:start + batch], rows)):
            out[i] += [rewards[b, k].item() for k in range(len(row[3]))]
    reward_model.train()
    return out


# =============================================================================
# The base model's own samples, and what the reward model gets right
# =============================================================================


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_tokens, seed, temperature=1.0, k=1, dtype="float32", batch=64):
    """k sampled responses per prompt from `model` (top-p 0.95; greedy at temperature 0), each prompt
    encoded once and its KV cache shared by its k samples (07's rejection sampling): one list of k
    (text, ended) per prompt; ended: it stopped on its own before max_tokens."""
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    with mdl.autocast(device, dtype):
        for start in range(0, len(prompts), batch):
            ids = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch]]
            new = mdl.generate(model, ids, max_tokens, temperature, 0.95, (tokenizer.eot_id, tokenizer.eom_id),
                               generator, num_samples=k)  # generate stops before a stop token
            out += [[(tokenizer.decode(n), len(n) < max_tokens) for n in new[i * k:(i + 1) * k]]
                    for i in range(len(ids))]
    return out


def pairwise_accuracy(records, rewards):
    """Per family and per pair type: the share of pairs the rewards order correctly (ties count half),
    with the two baselines: a coin (50%) and "the longer response is better"."""
    table = {}
    for record, r in zip(records, rewards):
        for i, j, kind in ranked_pairs(record):
            longer = len(record["responses"][i]["text"]) - len(record["responses"][j]["text"])
            row = table.setdefault((record["family"], kind), {"n": 0, "right": 0.0, "longer": 0.0, "margins": []})
            row["n"] += 1
            row["right"] += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
            row["longer"] += 1.0 if longer > 0 else 0.5 if longer == 0 else 0.0
            row["margins"].append(r[i] - r[j])
    return {key: {"pairs": v["n"], "accuracy": v["right"] / v["n"], "longer_is_better": v["longer"] / v["n"],
                  "margins": v["margins"]} for key, v in sorted(table.items())}


def accuracy_table(results, log=print):
    """Print held-out accuracy per pair type and per family (each pooled over the other), with the
    baselines; return the mean over all (family, pair type) cells, the chapter's headline number."""
    def pooled(key_of):
        rows = {}
        for key, r in results.items():
            row = rows.setdefault(key_of(key), [0, 0.0, 0.0])
            row[0] += r["pairs"]
            row[1] += r["accuracy"] * r["pairs"]
            row[2] += r["longer_is_better"] * r["pairs"]
        return {k: (n, right / n, longer / n) for k, (n, right, longer) in sorted(rows.items())}
    for title, key_of in (("pair type", lambda key: key[1]), ("family", lambda key: key[0])):
        log(f"\n{title:<26} {'pairs':>6} {'reward model':>13} {'longer is better':>17} {'coin':>5}")
        for name, (n, accuracy, longer) in pooled(key_of).items():
            log(f"{name:<26} {n:>6} {accuracy:>13.1%} {longer:>17.1%} {'50%':>5}")
    mean = float(np.mean([r["accuracy"] for r in results.values()]))
    log(f"mean over families and pair types: {mean:.1%} ({len(results)} cells)")
    return mean


# =============================================================================
# main
# =============================================================================


# On a GPU the defaults grow: more prompts and pairs, longer training (the flags still override them).
GPU_DEFAULTS = RewardConfig(train_prompts=2000, test_prompts=200, steps=2000, records_per_step=64)


def main(argv=None):
    flags = parse_flags(argv)
    device = torch.device(mdl.pick_device(flags.device))
    cfg = pre.for_device(pre.config_from_flags(flags, GPU_DEFAULTS if device.type == "cuda" else RewardConfig()),
                         device)
    init, out = Path(flags.init), Path(flags.out)
    if not (init / "model.pt").is_file():
        raise tok.UserError(f"{init / 'model.pt'} not found: run python 05_anneal.py first (or pass --init DIR)")
    if pre.claim_run_folder(out, flags.resume, "phase_*.pt", "reward_model.pt") == "finished":
        return print(f"{out} already holds the finished run: nothing to resume")
    phases = pre.PhaseCheckpoints(out, asdict(cfg), cfg.ckpt_every, flags.resume)
    tokenizer = tok.Tokenizer.load(init / "tokenizer.model")
    base, _ = mdl.load_checkpoint(init, mmap=False)
    base = base.to(device)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train_records = (read_preferences(flags.data) if flags.data
                     else preferences(base, tokenizer, task_prompts("train", cfg.train_prompts, cfg.seed), cfg, 1))
    test_records = preferences(base, tokenizer, task_prompts("test", cfg.test_prompts, cfg.seed + 1), cfg, 2)
    print(f"{len(train_records)} training and {len(test_records)} held-out preference records "
          f"({sum(len(ranked_pairs(r)) for r in train_records)} training pairs) in {time.time() - t0:.0f} s")
    reward_model = RewardModel(base).to(device)
    t0 = time.time()
    history = train_reward_model(reward_model, train_records, tokenizer, cfg, device, phases=phases)
    train_seconds = time.time() - t0
    results = pairwise_accuracy(test_records, score(reward_model, tokenizer, test_records, device))
    mean = accuracy_table(results)
    write_outputs(out, reward_model, tokenizer, cfg, train_records, history, results, mean, train_seconds, init)
    phases.finish()


def preferences(base, tokenizer, items, cfg, salt):
    """Preference records for prompt items, with the base model's own sampled responses."""
    samples = [options[0] for options in sample_responses(base, tokenizer, [it["prompt"] for it in items],
                                                          cfg.max_response_tokens, cfg.seed + salt, dtype=cfg.dtype)]
    rng = random.Random(cfg.seed + salt)
    return [preference_record(it, rng, s, cfg.policy_share) for it, s in zip(items, samples)]


def write_outputs(out, reward_model, tokenizer, cfg, records, history, results, mean, seconds, init):
    out.mkdir(parents=True, exist_ok=True)
    mdl.save_checkpoint(out / "reward_model.pt", reward_model.model, reward_head=reward_model.reward_head.weight.detach(),
                        config=asdict(cfg), base=str(init))
    tokenizer.save(out / "tokenizer.model")
    tok.atomic_write_text(out / "preferences.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    tok.atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    packed, alone = tokens_saved(records[:200], tokenizer)
    metrics = {"config": asdict(cfg), "mean_accuracy": mean, "train_seconds": seconds,
               "packed_tokens": packed, "tokens_if_scored_alone": alone,
               "accuracy": {f"{f} | {k}": {key: v[key] for key in ("pairs", "accuracy", "longer_is_better")}
                            for (f, k), v in results.items()}}
    tok.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_margins(results, out / "margins.png")
    print(f"packing a prompt with its responses in one row: {packed:,} tokens instead of {alone:,} "
          f"({1 - packed / alone:.0%} fewer)")
    print(f"wrote {out / 'reward_model.pt'}, preferences.jsonl, metrics.json, margins.png")


def tokens_saved(records, tokenizer):
    """Tokens in packed rows vs. scoring each response in a row of its own after its prompt."""
    packed = sum(len(pack(r, tokenizer)[0]) for r in records)
    alone = sum(len(prompt_ids(tokenizer, r["prompt"])) * len(r["responses"]) + sum(
        len(tokenizer.encode(x["text"].strip())) + x["ended"] for x in r["responses"]) for r in records)
    return packed, alone


def load_reward_model(path, device="cpu"):
    """A RewardModel from 06's reward_model.pt."""
    path = Path(path)
    path = path / "reward_model.pt" if path.is_dir() else path
    if not path.is_file():
        raise tok.UserError(f"{path} not found: run python 06_reward_model.py first")
    model, _ = mdl.load_checkpoint(path, mmap=False)
    reward_model = RewardModel(model)
    reward_model.reward_head.weight.data.copy_(torch.load(path, weights_only=True)["reward_head"])
    return reward_model.to(device)


# =============================================================================
# Plumbing: preference files, flags, plots
# =============================================================================


def read_jsonl(path, what):
    """The records of a JSONL file (blank lines skipped), each with its "path:line" for messages.
    A missing file, a line that is not JSON, or no records at all: an error that says so. (07 and
    08 read their --data files with it too.)"""
    path = Path(path)
    if not path.is_file():
        raise tok.UserError(f"--data {path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise tok.UserError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not records:
        raise tok.UserError(f"--data {path} holds no {what}")
    return records


def read_preferences(path):
    """A JSONL file of preference records in the format 06 writes (preferences.jsonl): each line
    {"family", "prompt", "responses": [{"text", "rank", "ended"?, "source"?}], "strength"?}. A record
    that cannot train anything is an error naming its line."""
    records = []
    for where, record in read_jsonl(path, "preference records"):
        problem = record_problem(record)
        if problem:
            raise tok.UserError(f"{where}: {problem}")
        for response in record["responses"]:
            response.setdefault("ended", True)
            response.setdefault("source", "user data")
        records.append(record)
    return records


def record_problem(record):
    """What is wrong with a preference record, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        return 'expected an object with a "prompt" string'
    if record.get("family") not in TASKS and record.get("family") != "user":
        return f'unknown family {record.get("family")!r}: one of {", ".join(TASKS)}, or "user" for your own prompts'
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        return "a preference needs at least two responses"
    for response in responses:
        if not isinstance(response, dict) or not isinstance(response.get("text"), str):
            return 'every response needs a "text" string'
        if response.get("rank") not in RANKS:
            return f'every response needs a "rank": one of {", ".join(RANKS)}'
    if len({r["rank"] for r in responses}) < 2:
        return "all responses have the same rank: nothing to prefer"
    return None


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/05_anneal", help="the base model (05's output)")
    parser.add_argument("--out", default="runs/06_reward_model", help="output folder")
    parser.add_argument("--data", default=None, help="train on your own preference records (JSONL, 06's format)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pre.add_config_flags(parser, RewardConfig, RewardConfig())
    return parser.parse_args(argv)


def plot_margins(results, path):
    """Histogram of reward margins (better - worse) on held-out pairs, one curve per pair type."""
    fig, ax = pre.figure(figsize=(8, 4))
    kinds = sorted({k for _, k in results})
    for kind in kinds:
        margins = [m for (_, k), r in results.items() if k == kind for m in r["margins"]]
        ax.hist(margins, bins=30, histtype="step", label=f"{kind} ({len(margins)})")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("reward(better) - reward(worse)"), ax.set_ylabel("held-out pairs"), ax.legend(fontsize=7)
    pre.save_figure(fig, path)


if __name__ == "__main__":
    tok.run_main(main)
