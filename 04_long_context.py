"""
Chapter 4: long-context pretraining.

Llama 3 §3.4.2 raises the context from 8K to 128K in six stages after the main pretraining, on
~800B tokens, and moves to the next stage only when (1) short-context evaluations have fully
recovered and (2) the model solves needle-in-a-haystack perfectly up to the current length.
§3.2 adds that the document mask, of limited impact in standard pretraining, matters here.

This script does the same at laptop scale, from 03's checkpoint:
  * stages: 256 -> 512 -> 768 -> 1024 tokens on CPU (4x in three stages; real lengths on GPU);
  * RoPE for long context, either lever: raise θ with the length, or Llama 3.1's frequency scaling;
  * training rows packed from the corpus (whole plays, books, modules, with the document mask), plus
    synthetic passkey documents, so the model learns retrieval over distance;
  * the stage gate as the paper defines it, printed per stage, and a NIAH heatmap (depth x length);
  * the contrast that shows what extension is for: the loss past the pretraining length, and NIAH at
    every length, of the model before extension with RoPE untouched, with the RoPE lever alone, and
    after the stages;
  * `--no-doc-mask`: the same extension without the document mask, reported side by side;
  * `--preset retrieval`: a stage 0 first teaches the base model retrieval at its own length (it has
    none: at 7 M parameters it must be taught, short documents first), so the stages have a skill to
    carry to longer contexts and NIAH shows what extension does.

Run it:
    python 04_long_context.py                     # ~5 minutes on CPU; needs runs/03_pretrain/model.pt
    python 04_long_context.py --no-doc-mask       # the ablation, printed next to the run above
    python 04_long_context.py --preset retrieval --out runs/04_retrieval   # ~20 minutes: NIAH that works
    python 04_long_context.py --rope theta --stages 512,1024
"""

import argparse
import contextlib
import functools
import importlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")


@dataclass
class LongContextConfig:
    stages: tuple = field(default=(), metadata={"item": int})  # context length of each stage; empty: 2x, 3x and 4x the pretraining length (the paper: six stages, 8K -> 128K)
    steps_per_stage: int = 40  # optimizer steps per stage
    extra_steps: int = 20  # at most this many more steps per stage while its gate fails (in chunks of 20)
    batch_tokens: int = 0  # per optimizer step: fewer, longer rows as the stages grow; 0: four rows of the final length
    micro_batch: int = 0  # rows per forward pass; 0: the whole batch on a CPU, one row on a GPU
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16")})  # auto: bf16 on CUDA, else fp32
    lr: float = 1e-3  # after a short warmup, constant within each stage
    warmup: int = 5  # steps of linear warmup at the start of each stage
    rope: str = field(default="scale", metadata={"choices": ("scale", "theta", "none")})  # scale: Llama 3.1's frequency scaling; theta: raise θ with the length
    passkey_fraction: float = 0.25  # share of training rows that are synthetic retrieval documents
    retrieval_lengths: tuple = field(default=(), metadata={"item": int})  # stage 0 (--preset retrieval): first teach retrieval at the pretraining length, with passkey documents of these lengths packed into its rows; empty: no stage 0
    retrieval_steps: tuple = field(default=(), metadata={"item": int})  # optimizer steps at each of retrieval_lengths
    retrieval_fraction: float = 0.5  # share of stage 0's rows that are packed passkey documents (the rest: the corpus)
    doc_mask: bool = True  # §3.2 document mask; --no-doc-mask runs the ablation beside the masked run
    activation_checkpointing: bool = False  # recompute activations in backward: less memory for long rows
    recover_tolerance: float = 0.03  # short-context loss may end at most 3% above the pre-extension model's
    niah_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle positions, as a fraction of the haystack
    niah_trials: int = 3  # needles per (length, depth) cell
    eval_rows: int = 16  # validation rows per source
    seed: int = 1234  # data order and needles


# Llama 3's base model retrieves over its 8K window before §3.4.2 begins; ours, 7 M parameters after
# 0.6 M tokens, does not (0% at 256 tokens), and direct training at 256 tokens does not teach it within
# 300 steps. What does (README, 04): short documents first, whose length then doubles. This preset puts
# that curriculum in front of the stages as a stage 0, so the extension has something to carry.
PRESETS = {"default": LongContextConfig(),
           "retrieval": LongContextConfig(retrieval_lengths=(32, 64, 128, 256), retrieval_steps=(300, 50, 50, 100),
                                          passkey_fraction=0.5, steps_per_stage=80, niah_trials=5)}


# -----------------------------------------------------------------------------
# RoPE for longer contexts


def extend_rope(args, length, base_len, final_len, lever):
    """The model's args for a stage of `length` tokens.
    "theta": θ grows in proportion to the context (×length/base_len), slowing every rotation so
             positions beyond the pretraining length look like ones the model has seen. (Llama 3 set
             θ = 500,000 from the start; Code Llama raised θ to 1e6 for 16K.)
    "scale": Llama 3.1's scaling, set once for the final length: low frequencies (wavelengths longer
             than base_len) are divided by final_len/base_len, high ones kept, the band between blended.
    "none":  positions simply continue; RoPE is untouched."""
    if lever == "theta":
        return replace(args, max_seq_len=length, rope_theta=args.rope_theta * length / base_len)
    if lever == "scale":
        return replace(args, max_seq_len=length, use_scaled_rope=True, rope_scale_factor=final_len / base_len,
                       rope_original_max_len=base_len, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
    if lever == "none":
        return replace(args, max_seq_len=length)
    raise tok.UserError(f"--rope {lever!r}: choose scale, theta or none")


def set_args(model, args):
    """Give a model new (position-related) args: the weights stay, the RoPE tables are rebuilt."""
    model.args = args
    model.init_rope()


def plot_rope(base_args, final_args, path):
    fig, ax = pre.figure()
    for args, label in [(base_args, f"pretraining (θ = {base_args.rope_theta:,.0f})"), (final_args, "after extension")]:
        ax.plot(2 * math.pi / mdl.rope_frequencies(args), marker=".", label=label)
    ax.axhline(base_args.max_seq_len, ls="--", color="gray", label=f"pretraining length {base_args.max_seq_len}")
    ax.axhline(final_args.max_seq_len, ls=":", color="black", label=f"final length {final_args.max_seq_len}")
    ax.set_yscale("log"), ax.set_xlabel("RoPE pair i"), ax.set_ylabel("wavelength (positions)")
    ax.legend(), ax.grid(alpha=0.3), pre.save_figure(fig, path)


# -----------------------------------------------------------------------------
# Needle in a haystack

NEEDLE = " The secret number is {number}. "
QUESTION = "\nWhat is the secret number? The secret number is"
ANSWER_ROOM = 4  # tokens generated for the answer; a NIAH length includes them
NUMBERS = (10, 100)  # two-digit needles: one token each, so retrieval is a single copy over a distance


def needle_example(tokenizer, filler, length, depth, number, with_answer=False):
    """Ids of one NIAH prompt of exactly `length` tokens (with the answer, `length` + answer): BOS,
    filler text with the needle inserted at `depth` (0 = start, 1 = just before the question), then
    the question. `filler` is a long list of token ids."""
    needle = tokenizer.encode(NEEDLE.format(number=number))
    question = tokenizer.encode(QUESTION)
    n_filler = length - 1 - len(needle) - len(question)
    if n_filler < 0 or len(filler) < n_filler:
        raise tok.UserError(f"length {length} is too short for the needle and question, or the filler too short")
    at = round(depth * n_filler)
    ids = [tokenizer.bos_id, *filler[:at], *needle, *filler[at:n_filler], *question]
    return ids + tokenizer.encode(f" {number}.") if with_answer else ids


def read_number(text):
    """The first integer in a model's answer, or None."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def greedy_answers(model, prompts):
    return mdl.generate(model, prompts, max_new_tokens=ANSWER_ROOM)  # generate runs without autograd


def niah_accuracy(model, tokenizer, filler, lengths, depths, trials, seed=0, answer=greedy_answers):
    """Accuracy per (length, depth): `answer(model, prompts)` (greedy decoding) to `trials` needles
    each, batched per cell."""
    if max(lengths) > model.args.max_seq_len:
        raise tok.UserError(f"NIAH length {max(lengths)} is beyond the model's {model.args.max_seq_len} positions: "
                         f"extend the context further first (or pass shorter lengths)")
    rng = np.random.default_rng(seed)
    grid = np.zeros((len(depths), len(lengths)))
    model.eval()
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            numbers = rng.integers(*NUMBERS, size=trials).tolist()
            starts = rng.integers(0, len(filler) - length, size=trials)
            prompts = [needle_example(tokenizer, filler[s:s + length].tolist(), length - ANSWER_ROOM, depth, n)
                       for s, n in zip(starts, numbers)]
            answers = answer(model, prompts)
            grid[i, j] = np.mean([read_number(tokenizer.decode(a)) == n for a, n in zip(answers, numbers)])
    model.train()
    return grid


def plot_niah(grid, lengths, depths, path, title):
    fig, ax = pre.figure(figsize=(1.2 * len(lengths) + 2, 3.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths), ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)"), ax.set_ylabel("needle depth"), ax.set_title(title)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image), pre.save_figure(fig, path)


# -----------------------------------------------------------------------------
# Data: packed corpus rows plus passkey documents


def training_rows(shards, weights, filler, tokenizer, n_rows, length, passkey_fraction, rng, passkey_len=None):
    """`n_rows` rows of `length` + 1 tokens: packed windows of the corpus (several documents per
    row, told apart by doc ids) and, with probability `passkey_fraction`, a row of retrieval documents
    of `passkey_len` tokens each (default: one document as long as the row)."""
    tokens, doc_ids = pre.sample_batch(shards, weights, n_rows, length + 1, rng)
    for row in np.flatnonzero(rng.random(n_rows) < passkey_fraction):
        tokens[row], doc_ids[row] = passkey_row(tokenizer, filler, length, passkey_len or length, rng)
    return tokens, doc_ids


def passkey_row(tokenizer, filler, length, doc_len, rng):
    """A row of `length` + 1 tokens packed with whole retrieval documents (a needle at a random depth
    and the question, `doc_len` - 3 tokens, then the answer), and their doc ids (0, 1, ...)."""
    ids, doc_ids, doc = [], [], 0
    while len(ids) + doc_len <= length + 1:  # whole documents while they fit
        start = int(rng.integers(0, len(filler) - doc_len))
        number = int(rng.integers(*NUMBERS))
        ids += needle_example(tokenizer, filler[start:start + doc_len].tolist(), doc_len - 3, float(rng.random()),
                              number, with_answer=True)
        doc_ids += [doc] * (len(ids) - len(doc_ids))
        doc += 1
    # the rest of the row: text from the last document's own filler window, inside that document (a row
    # of one document, the default, thus stays exactly what it was before stage 0 existed)
    ids = (ids + filler[start:start + length + 1].tolist())[:length + 1]
    doc_ids = (doc_ids + [doc - 1] * (length + 1))[:length + 1]
    return torch.tensor(ids), torch.tensor(doc_ids)


@torch.no_grad()
def long_position_loss(model, shards, length, base_len, rows, seed, doc_mask, device,
                       autocast=contextlib.nullcontext(), micro_batch=0):
    """Mean loss on positions base_len..length of fixed validation rows: how well the model uses
    context beyond what pretraining showed it."""
    rng = np.random.default_rng(seed)
    sources = [s for s in shards.sources if len(shards.tokens[s]) > length + 1]
    tokens, doc_ids = pre.sample_batch(shards, {s: 1 / len(sources) for s in sources}, rows, length + 1, rng)
    model.eval()
    size = micro_batch or rows
    loss_sum, n = 0.0, 0
    for x, d in pre.split_micro_batches((tokens, doc_ids), size, math.ceil(rows / size), device):
        with autocast:
            logits = model(x[:, :-1], doc_ids=d[:, :-1] if doc_mask else None)
        loss_sum += F.cross_entropy(logits[:, base_len:].flatten(0, 1), x[:, base_len + 1:].flatten(), reduction="sum")
        n += x[:, base_len + 1:].numel()
    model.train()
    return (loss_sum / n).item()


# -----------------------------------------------------------------------------
# The staged extension


def attention_cost_table(args, lengths, base_len):
    """Why long context comes last: attention work per sequence grows with the square of its length."""
    rows = [f"  {'length':>7} {'attn GFLOP/seq':>15} {'x pretraining':>14} {'scores MB/row':>14}"]
    for T in [base_len, *lengths]:
        flops = 12 * args.n_layers * args.n_heads * args.head_dim * T * T  # 12·L·H·Dh·T per token, T tokens
        rows.append(f"  {T:>7} {flops / 1e9:>15.2f} {(T / base_len) ** 2:>13.1f}x "
                    f"{args.n_layers * args.n_heads * T * T * 4 / 2**20:>14.1f}")
    return "\n".join(rows)


def haystack(shards, tokenizer):
    """Filler for needles: the prose of the general sources, without the special tokens between documents."""
    ids = np.concatenate([shards.tokens[s] for s in shards.sources if pre.category_of(s) == "general"])
    return ids[ids < tokenizer.n_bpe]


class Extension:
    """The staged extension of one model (Llama 3 §3.4.2): training steps at a stage's length, the
    paper's gate that decides when a stage is done, and a checkpoint before every gate, so that a
    run killed at any moment resumes where its last training chunk ended (--resume)."""

    def __init__(self, model, tokenizer, data, cfg, device, out, log=print):
        self.model, self.tokenizer, self.data, self.cfg, self.device = model, tokenizer, data, cfg, device
        self.out, self.log = out, log
        self.base_args, self.base_len = model.args, model.args.max_seq_len
        self.filler_train, self.filler_val = haystack(data.train, tokenizer), haystack(data.val, tokenizer)
        self.optimizer = pre.make_optimizer(model, cfg.lr, fused=device.type == "cuda")
        self.loss_fn = functools.partial(pre.next_token_loss, doc_mask=cfg.doc_mask)
        self.autocast = mdl.autocast(device, cfg.dtype)
        self.rng, self.step = np.random.default_rng(cfg.seed), 0
        self.records, self.short_before = [], None  # one record per finished stage; the loss to recover
        self.contrast = None  # {"loss": ..., "niah": ...} before extension: untrained_contrast, niah_contrast
        self.log_file = None
        model.activation_checkpointing = cfg.activation_checkpointing

    def short_context_loss(self):
        """Mean validation loss at the pretraining length: the paper's "short-context evaluations"."""
        losses = pre.eval_losses(self.model, self.data.val, self.cfg.eval_rows, self.base_len, self.cfg.seed,
                                 self.device, doc_mask=self.cfg.doc_mask, autocast=self.autocast,
                                 micro_batch=self.cfg.micro_batch)
        return float(np.mean(list(losses.values())))

    def long_position_loss(self, length):
        return long_position_loss(self.model, self.data.val, length, self.base_len, self.cfg.eval_rows, self.cfg.seed,
                                  self.cfg.doc_mask, self.device, self.autocast, self.cfg.micro_batch)

    def write(self, record):
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def train_steps(self, n, stage, length, done, passkey_len=None, fraction=None):
        """`n` optimizer steps at `length` tokens; `done` steps of this stage came before. Stage 0 packs
        passkey documents of `passkey_len` tokens into a share `fraction` of its rows."""
        rows = max(1, self.cfg.batch_tokens // length)
        fraction = self.cfg.passkey_fraction if fraction is None else fraction
        what = f"{passkey_len}-token passkey documents" if passkey_len else f"{length} tokens"
        size = min(self.cfg.micro_batch or rows, rows)
        for i in range(done, done + n):
            # warmup, then a constant rate within the stage (the paper gives no schedule here)
            lr = self.cfg.lr * min(1.0, (i + 1) / self.cfg.warmup)
            tokens, doc_ids = training_rows(self.data.train, self.data.weights, self.filler_train, self.tokenizer,
                                            rows, length, fraction, self.rng, passkey_len)
            micro_batches = pre.split_micro_batches((tokens, doc_ids), size, math.ceil(rows / size), self.device)
            try:
                loss, grad_norm = pre.train_step(self.model, self.optimizer, micro_batches, self.loss_fn, lr,
                                                 autocast=self.autocast)
            except FloatingPointError as e:
                raise FloatingPointError(f"stage {stage} step {i + 1}: {e}") from None
            self.step += 1
            self.write({"step": self.step, "stage_step": i + 1, "length": length, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm})
            if (i + 1) % 10 == 0:
                self.log(f"stage {stage} ({what}) step {i + 1:>3} | loss {loss:.4f} | grad {grad_norm:.2f}")

    def gate(self, stage, lengths):
        """§3.4.2's gate: (1) short-context loss recovered, (2) NIAH solved at every length so far."""
        short = self.short_context_loss()
        with self.autocast:
            grid = niah_accuracy(self.model, self.tokenizer, self.filler_val, lengths, self.cfg.niah_depths,
                                 self.cfg.niah_trials, seed=self.cfg.seed + stage)
        return short, grid, short <= self.short_before * (1 + self.cfg.recover_tolerance), bool((grid == 1).all())

    def teach_retrieval(self, done=0):
        """Stage 0 (--preset retrieval): passkey documents of growing length (retrieval_lengths) packed
        into rows of the pretraining length, the corpus in the other rows; then the gate at that length.
        `done` steps of it came before (resuming). A checkpoint every 50 steps at most."""
        cfg, t0 = self.cfg, time.time()
        for doc_len, end in zip(cfg.retrieval_lengths, np.cumsum(cfg.retrieval_steps).tolist()):
            while done < end:
                n = min(50, end - done)
                self.train_steps(n, 0, self.base_len, done, passkey_len=doc_len, fraction=cfg.retrieval_fraction)
                done += n
                self.save(0, done, None)
        short, grid, recovered, solved = self.gate(0, [self.base_len])
        self.log(f"stage 0 done: retrieval at {self.base_len} tokens, {done} steps | short-context loss {short:.3f} "
                 f"(before {self.short_before:.3f}, {'recovered' if recovered else 'NOT recovered'}) | "
                 f"NIAH {grid.mean():.0%} ({'solved' if solved else 'NOT solved'})")
        record = {"step": self.step, "stage": 0, "length": self.base_len, "steps": done, "seconds": time.time() - t0,
                  "short_loss": short, "short_loss_before": self.short_before, "recovered": bool(recovered),
                  "niah": grid.tolist(), "niah_lengths": [self.base_len], "niah_solved": solved}
        self.records.append(record)
        self.write(record)
        self.short_before = short  # what the stages must recover to: the model before extension is stage 0's

    def run_stage(self, stage, length, lengths, done=0, long_before=None):
        """Train a stage, then keep going in chunks of 20 steps (up to extra_steps) while its gate
        fails. `done` and `long_before` come from a checkpoint when resuming mid-stage."""
        cfg = self.cfg
        set_args(self.model, extend_rope(self.base_args, length, self.base_len, cfg.stages[-1], cfg.rope))
        if long_before is None:
            long_before = self.long_position_loss(length)
        t0, budget = time.time(), cfg.steps_per_stage - done  # resumed at a gate: nothing to train first
        while True:
            if budget > 0:
                self.train_steps(budget, stage, length, done)
                done += budget
                self.save(stage, done, long_before)
            short, grid, recovered, solved = self.gate(stage, lengths)
            if (recovered and solved) or done >= cfg.steps_per_stage + cfg.extra_steps:
                break
            budget = min(20, cfg.steps_per_stage + cfg.extra_steps - done)
            self.log(f"stage {stage}: gate not passed yet (short loss {short:.3f}, NIAH {grid.mean():.0%}): "
                     f"{budget} more steps")
        long_after = self.long_position_loss(length)
        self.log(f"stage {stage} done: {length} tokens, {done} steps | short-context loss {short:.3f} "
                 f"(before extension {self.short_before:.3f}, {'recovered' if recovered else 'NOT recovered'}) | "
                 f"NIAH {grid.mean():.0%} up to {length} ({'solved' if solved else 'NOT solved'}) | "
                 f"loss at positions {self.base_len}+: {long_before:.3f} -> {long_after:.3f}")
        record = {"step": self.step, "stage": stage, "length": length, "steps": done, "seconds": time.time() - t0,
                  "short_loss": short, "short_loss_before": self.short_before, "recovered": bool(recovered),
                  "niah": grid.tolist(), "niah_lengths": list(lengths), "niah_solved": solved,
                  "long_position_loss_before": long_before, "long_position_loss": long_after}
        self.records.append(record)
        self.write(record)
        return grid

    def save(self, stage, done, long_before):
        """ckpt.pt: what resuming at this gate needs (weights, optimizer, data order, progress)."""
        mdl.save_checkpoint(self.out / "ckpt.pt", self.model, optimizer=self.optimizer.state_dict(),
                            stage=stage, done=done, long_before=long_before, step=self.step, records=self.records,
                            short_before=self.short_before, rng=self.rng.bit_generator.state,
                            contrast=self.contrast, config=asdict(self.cfg))

    def resume(self):
        """Load ckpt.pt; returns (stage, steps done in it, its long-position loss before training)."""
        ckpt = torch.load(self.out / "ckpt.pt", map_location="cpu", weights_only=True)
        if ckpt["config"] != asdict(self.cfg):
            raise tok.UserError(f"{self.out / 'ckpt.pt'} was written with another configuration; resume with the "
                                f"same flags, or start again with another --out")
        set_args(self.model, mdl.ModelArgs(**ckpt["args"]))
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["rng"]
        self.step, self.records, self.short_before = ckpt["step"], ckpt["records"], ckpt["short_before"]
        self.contrast = ckpt["contrast"]
        self.log(f"resumed from {self.out / 'ckpt.pt'}: stage {ckpt['stage']}, {ckpt['done']} steps done in it")
        return ckpt["stage"], ckpt["done"], ckpt["long_before"], ckpt["step"]


def levers_before_extension(cfg):
    """The two ways of reading the model before extension at longer lengths: (row name, RoPE lever)."""
    return [("no extension (RoPE untouched)", "none"), (f"RoPE lever ({cfg.rope}), no training", cfg.rope)]


def untrained_contrast(model, data, cfg, device):
    """What extension is for: the loss at positions base_len..final length of the model before any
    extension (the base model, or stage 0's), first with RoPE untouched (positions it never trained
    on), then with the RoPE lever set for the final length. The model keeps its own args afterwards."""
    base_args, final = model.args, cfg.stages[-1]
    losses = {}
    for name, lever in levers_before_extension(cfg):
        set_args(model, extend_rope(base_args, final, base_args.max_seq_len, final, lever))
        losses[name] = long_position_loss(model, data.val, final, base_args.max_seq_len, cfg.eval_rows, cfg.seed,
                                          cfg.doc_mask, device, mdl.autocast(device, cfg.dtype), cfg.micro_batch)
    set_args(model, base_args)
    return losses


def niah_contrast(model, tokenizer, filler, cfg, device):
    """The same for retrieval: NIAH accuracy per length (pretraining length, then each stage's), all
    depths, before any extension, with RoPE untouched and with the lever; the needles are those of the
    last stage's gate, so each cell compares with the extended model's."""
    base_args, lengths = model.args, [model.args.max_seq_len, *cfg.stages]
    accuracy = {}
    for name, lever in levers_before_extension(cfg):
        set_args(model, extend_rope(base_args, lengths[-1], lengths[0], lengths[-1], lever))
        with mdl.autocast(device, cfg.dtype):
            grid = niah_accuracy(model, tokenizer, filler, lengths, cfg.niah_depths, cfg.niah_trials,
                                 seed=cfg.seed + len(cfg.stages))
        accuracy[name] = grid.mean(axis=0).tolist()
    set_args(model, base_args)
    return accuracy


def extend(model, tokenizer, data, cfg, device, out, resume=False, log=print):
    """Run stage 0 if there is one, measure the contrast on the model it leaves (the base model
    otherwise), then the stages; from a checkpoint when resuming. Returns per-stage records, the
    contrast (losses, NIAH per length), the final NIAH grid and its lengths."""
    extension = Extension(model, tokenizer, data, cfg, device, out, log)
    first = 0 if cfg.retrieval_lengths else 1
    start_stage, done, long_before, step = extension.resume() if resume else (first, 0, None, 0)
    # resuming at step S: training records up to S came before the checkpoint, stage records at S after it
    pre.truncate_log(out / "log.jsonl", lambda r: r.get("step", 0) < step or (r.get("step") == step and "stage" not in r))
    if extension.short_before is None:
        extension.short_before = extension.short_context_loss()
        log(f"short-context ({extension.base_len}) validation loss before extension: {extension.short_before:.3f}")
    with open(out / "log.jsonl", "a") as extension.log_file:
        if start_stage == 0:
            extension.teach_retrieval(done)
            start_stage, done, long_before = 1, 0, None
        if extension.contrast is None:
            extension.contrast = {"loss": untrained_contrast(model, data, cfg, device),
                                  "niah": niah_contrast(model, tokenizer, extension.filler_val, cfg, device)}
        lengths = [extension.base_len] + list(cfg.stages[:start_stage - 1])
        for stage, length in enumerate(cfg.stages[start_stage - 1:], start_stage):
            lengths.append(length)
            grid = extension.run_stage(stage, length, lengths, *((done, long_before) if stage == start_stage else ()))
    return extension.records, extension.contrast, grid, lengths


def main(argv=None):
    flags = parse_flags(argv)
    cfg = pre.config_from_flags(flags, PRESETS[flags.preset])
    if not cfg.doc_mask and not (Path(flags.out) / "metrics.json").is_file():
        print(f"the ablation is reported beside the masked run, which is not in {flags.out} yet: running it first")
        long_context(flags.init, flags.out, replace(cfg, doc_mask=True), flags.device, flags.resume)
    long_context(flags.init, flags.out, cfg, flags.device, flags.resume)


def long_context(init, out, cfg, device_name="auto", resume=False):
    """Extend 03's model in `init` stage by stage; write the model, plots and metrics into `out`
    (into `out`/no_doc_mask for the ablation)."""
    init, base_out = Path(init), Path(out)
    out = base_out / ("no_doc_mask" if not cfg.doc_mask else "")
    if not (init / "model.pt").is_file():
        raise tok.UserError(f"{init / 'model.pt'} not found: run python 03_pretrain.py first (or pass --init DIR)")
    if not (init / "data" / "meta.json").is_file():
        raise tok.UserError(f"{init / 'data'} (the token shards) not found: run python 03_pretrain.py first")
    state = pre.claim_run_folder(out, resume)
    if state == "finished":
        print(f"{out} already holds the finished run: nothing to resume")
        return
    device = torch.device(mdl.pick_device(device_name))
    torch.manual_seed(cfg.seed)
    model, base_args = mdl.load_checkpoint(init, mmap=False)
    model = model.to(device).train()
    base_len = base_args.max_seq_len
    # what the flags leave open follows the checkpoint and the device (so a GPU 03 run extends too)
    stages = cfg.stages or tuple(k * base_len for k in (2, 3, 4))
    cfg = pre.for_device(replace(cfg, stages=stages, batch_tokens=cfg.batch_tokens or 4 * stages[-1]), device)
    tokenizer = tok.Tokenizer.load(init / "tokenizer.model")
    check_lengths(cfg, base_len, tokenizer)
    train = pre.TokenShards(init / "data", "train")
    data = pre.Data(train, pre.TokenShards(init / "data", "val"), pre.mix_weights(train, "paper"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"extending {init / 'model.pt'} ({base_len} tokens) to {cfg.stages[-1]} in {len(cfg.stages)} stages, "
          f"RoPE lever: {cfg.rope}, document mask: {'on' if cfg.doc_mask else 'OFF (ablation)'}")
    print("attention cost per sequence (one row of the batch):\n" + attention_cost_table(base_args, cfg.stages, base_len))
    if resume and state == "new":
        print(f"no checkpoint in {out} yet: starting from the first stage")

    records, before, grid, lengths = extend(model, tokenizer, data, cfg, device, out, resume=state == "interrupted")
    extended = f"extended ({len(cfg.stages)} stages)"
    contrast = {**before["loss"], extended: records[-1]["long_position_loss"]}
    niah_by_length = {**before["niah"], extended: grid.mean(axis=0).tolist()}
    print_contrast(contrast, niah_by_length, lengths, base_len)
    final_args = replace(model.args, attn_impl="sdpa")
    plot_rope(base_args, final_args, out / "rope.png")
    plot_niah(grid, lengths, cfg.niah_depths, out / "niah.png",
              f"NIAH after extension ({'document mask' if cfg.doc_mask else 'no document mask'})")
    tokenizer.save(out / "tokenizer.model")
    metrics = {"config": asdict(cfg), "base_len": base_len, "stages": records,
               "final_long_position_loss": records[-1]["long_position_loss"],
               "final_niah_accuracy": float(np.mean(grid)), "final_short_loss": records[-1]["short_loss"],
               "long_position_loss_contrast": contrast, "niah_contrast": niah_by_length}
    tok.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    mdl.save_checkpoint(out / "model.pt", model, args=final_args, stage=len(cfg.stages))
    (out / "ckpt.pt").unlink(missing_ok=True)  # finished: model.pt is the result
    print(f"wrote {out / 'model.pt'} (context {final_args.max_seq_len}), niah.png, rope.png, metrics.json")
    if not cfg.doc_mask:
        report_ablation(base_out)


def check_lengths(cfg, base_len, tokenizer):
    """Stages grow past the pretraining length; stage 0's documents grow up to it (from a length that
    holds the needle, the question and the answer), one step count each."""
    commas = lambda values: ",".join(map(str, values))
    shortest = 4 + len(tokenizer.encode(NEEDLE.format(number=NUMBERS[0]))) + len(tokenizer.encode(QUESTION))
    if sorted(set(cfg.stages)) != list(cfg.stages) or cfg.stages[0] <= base_len:
        raise tok.UserError(f"--stages {commas(cfg.stages)}: each stage must be longer than the one before, and the "
                            f"first longer than the current context ({base_len} tokens)")
    lengths = list(cfg.retrieval_lengths)
    if (len(lengths) != len(cfg.retrieval_steps) or lengths != sorted(set(lengths)) or min(cfg.retrieval_steps, default=0) < 0
            or max(lengths, default=base_len) > base_len or min(lengths, default=shortest) < shortest):
        raise tok.UserError(f"--retrieval-lengths {commas(lengths)} --retrieval-steps {commas(cfg.retrieval_steps)}: "
                            f"one step count (>= 0) per length, lengths growing from at least {shortest} tokens (the "
                            f"needle, question and answer) to at most the pretraining length ({base_len} tokens)")
    if not (0 <= cfg.passkey_fraction <= 1 and 0 <= cfg.retrieval_fraction <= 1):
        raise tok.UserError(f"--passkey-fraction {cfg.passkey_fraction}, --retrieval-fraction {cfg.retrieval_fraction}: "
                            f"each is a share of the rows, from 0 to 1")


def print_contrast(losses, niah, lengths, base_len):
    """What the extension did: the loss past the pretraining length and NIAH per length, before and after."""
    print(f"\n{'':<38}{'loss at ' + str(base_len) + '+':>14}" + "".join(f"{'NIAH ' + str(n):>10}" for n in lengths))
    for name in losses:
        print(f"{name:<38}{losses[name]:>14.3f}" + "".join(f"{a:>10.0%}" for a in niah[name]))


def report_ablation(out):
    """The document-mask ablation, side by side (Llama 3 §3.2)."""
    runs = {"document mask": out / "metrics.json", "no mask": out / "no_doc_mask" / "metrics.json"}
    metrics = {name: json.loads(path.read_text()) for name, path in runs.items() if path.is_file()}
    print(f"\n{'':<16}" + "".join(f"{name:>16}" for name in metrics))
    for label, key in [("loss at long pos.", "final_long_position_loss"), ("NIAH accuracy", "final_niah_accuracy"),
                       ("short-ctx loss", "final_short_loss")]:
        print(f"{label:<16}" + "".join(f"{m[key]:>16.3f}" for m in metrics.values()))


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/03_pretrain", help="the pretraining run to extend")
    parser.add_argument("--out", default="runs/04_long_context", help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="retrieval: a stage 0 that teaches retrieval first, so NIAH has something to extend (~20 min on CPU)")
    pre.add_config_flags(parser, LongContextConfig, LongContextConfig(), where=" in the default preset")
    return parser.parse_args(argv)


if __name__ == "__main__":
    tok.run_main(main)
