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
  * `--no-doc-mask`: the same extension without the document mask, reported side by side.

Run it:
    python 04_long_context.py                     # ~5 minutes on CPU; needs runs/03_pretrain/model.pt
    python 04_long_context.py --no-doc-mask       # the ablation, printed next to the run above
    python 04_long_context.py --rope theta --stages 512,1024
"""

import argparse
import contextlib
import importlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")


@dataclass
class LongContextConfig:
    stages: tuple = (512, 768, 1024)  # context length of each stage (the paper: six stages, 8K -> 128K)
    steps_per_stage: int = 40
    extra_steps: int = 20  # at most this many more steps per stage while its gate fails (in chunks of 20)
    batch_tokens: int = 4096  # per optimizer step, as in pretraining: fewer, longer rows
    micro_batch: int = 0  # rows per forward pass; 0 = the whole batch at once (fastest on a CPU)
    lr: float = 1e-3
    warmup: int = 5
    rope: str = "scale"  # "scale": Llama 3.1 frequency scaling; "theta": raise θ with the length; "none"
    passkey_fraction: float = 0.25  # share of training rows that are synthetic retrieval documents
    doc_mask: bool = True
    activation_checkpointing: bool = False
    recover_tolerance: float = 0.03  # short-context loss may end at most 3% above the pre-extension model's
    niah_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    niah_trials: int = 3  # needles per (length, depth) cell
    eval_rows: int = 16
    seed: int = 1234


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
    raise ValueError(f"--rope {lever!r}: choose scale, theta or none")


def set_args(model, args):
    """Give a model new (position-related) args: the weights stay, the RoPE tables are rebuilt."""
    model.args = args
    model.init_rope()


def plot_rope(base_args, final_args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for args, label in [(base_args, f"pretraining (θ = {base_args.rope_theta:,.0f})"), (final_args, "after extension")]:
        ax.plot(2 * math.pi / mdl.rope_frequencies(args), marker=".", label=label)
    ax.axhline(base_args.max_seq_len, ls="--", color="gray", label=f"pretraining length {base_args.max_seq_len}")
    ax.axhline(final_args.max_seq_len, ls=":", color="black", label=f"final length {final_args.max_seq_len}")
    ax.set_yscale("log"), ax.set_xlabel("RoPE pair i"), ax.set_ylabel("wavelength (positions)")
    ax.legend(), ax.grid(alpha=0.3), fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


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
        raise ValueError(f"length {length} is too short for the needle and question, or the filler too short")
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
        raise ValueError(f"NIAH length {max(lengths)} is beyond the model's {model.args.max_seq_len} positions: "
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 3.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths), ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)"), ax.set_ylabel("needle depth"), ax.set_title(title)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image), fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


# -----------------------------------------------------------------------------
# Data: packed corpus rows plus passkey documents


def training_rows(shards, weights, filler, tokenizer, n_rows, length, passkey_fraction, rng):
    """`n_rows` rows of `length` + 1 tokens: packed windows of the corpus (several documents per
    row, told apart by doc ids) and, with probability `passkey_fraction`, a retrieval document: a
    needle at a random depth, the question and the answer, all one document."""
    tokens, doc_ids = pre.sample_batch(shards, weights, n_rows, length + 1, rng)
    for row in np.flatnonzero(rng.random(n_rows) < passkey_fraction):
        start = int(rng.integers(0, len(filler) - length))
        number = int(rng.integers(*NUMBERS))
        ids = needle_example(tokenizer, filler[start:start + length].tolist(), length - 3, float(rng.random()),
                             number, with_answer=True)[:length + 1]
        ids = ids + filler[start:start + length + 1 - len(ids)].tolist()  # top up to the row length
        tokens[row] = torch.tensor(ids)
        doc_ids[row] = 0
    return tokens, doc_ids


def long_position_loss(model, shards, length, base_len, rows, seed, doc_mask, device):
    """Mean loss on positions base_len..length of fixed validation rows: how well the model uses
    context beyond what pretraining showed it."""
    rng = np.random.default_rng(seed)
    sources = [s for s in shards.sources if len(shards.tokens[s]) > length + 1]
    tokens, doc_ids = pre.sample_batch(shards, {s: 1 / len(sources) for s in sources}, rows, length + 1, rng)
    model.eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1].to(device), doc_ids=doc_ids[:, :-1].to(device) if doc_mask else None)
        loss = F.cross_entropy(logits[:, base_len:].flatten(0, 1), tokens[:, base_len + 1:].flatten().to(device))
    model.train()
    return loss.item()


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


def extend(model, tokenizer, train, val, weights, cfg, base_len, device, out, log):
    """Run the stages; return per-stage records and the final NIAH grid."""
    base_args = model.args
    def filler(shards):  # the haystack: prose, without the special tokens between documents
        ids = np.concatenate([shards.tokens[s] for s in shards.sources if pre.category_of(s) == "general"])
        return ids[ids < tokenizer.n_bpe]
    filler_train, filler_val = filler(train), filler(val)
    train_cfg = pre.TrainConfig(doc_mask=cfg.doc_mask, eval_rows=cfg.eval_rows,
                                seed=cfg.seed, lr=cfg.lr, warmup=cfg.warmup, seq_len=base_len)
    optimizer = pre.make_optimizer(model, train_cfg, fused=device.type == "cuda")
    model.activation_checkpointing = cfg.activation_checkpointing
    no_autocast = contextlib.nullcontext()
    short_before = np.mean(list(pre.eval_losses(model, val, train_cfg, device, no_autocast).values()))
    log(f"short-context ({base_len}) validation loss before extension: {short_before:.3f}")
    records, rng, step = [], np.random.default_rng(cfg.seed), 0
    lengths_so_far = [base_len]
    log_file = open(out / "log.jsonl", "w")
    for stage, length in enumerate(cfg.stages, 1):
        set_args(model, extend_rope(base_args, length, base_len, cfg.stages[-1], cfg.rope))
        lengths_so_far.append(length)
        rows = cfg.batch_tokens // length
        stage_cfg = replace(train_cfg, seq_len=length, micro_batch=min(cfg.micro_batch or rows, rows))
        long_before = long_position_loss(model, val, length, base_len, cfg.eval_rows, cfg.seed, cfg.doc_mask, device)
        t0, budget, done = time.time(), cfg.steps_per_stage, 0
        while True:
            for _ in range(budget):
                # warmup, then a constant rate within the stage (the paper gives no schedule here)
                lr = cfg.lr * min(1.0, (done + 1) / cfg.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tokens, doc_ids = training_rows(train, weights, filler_train, tokenizer, rows, length,
                                                cfg.passkey_fraction, rng)
                loss, grad_norm = pre.train_step(model, optimizer, tokens, doc_ids, stage_cfg,
                                                 max(1, rows // stage_cfg.micro_batch), device, no_autocast)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"stage {stage} step {done}: loss {loss}; try a lower --lr")
                done, step = done + 1, step + 1
                log_file.write(json.dumps({"step": step, "stage": stage, "length": length, "loss": loss,
                                           "lr": lr, "grad_norm": grad_norm}) + "\n")
                if done % 10 == 0:
                    log(f"stage {stage} ({length} tokens) step {done:>3} | loss {loss:.4f} | grad {grad_norm:.2f}")
            # the gate (§3.4.2): short context recovered, and NIAH solved up to this length
            short = np.mean(list(pre.eval_losses(model, val, replace(train_cfg, seq_len=base_len), device,
                                                 no_autocast).values()))
            grid = niah_accuracy(model, tokenizer, filler_val, lengths_so_far, cfg.niah_depths, cfg.niah_trials,
                                 seed=cfg.seed + stage)
            recovered = short <= short_before * (1 + cfg.recover_tolerance)
            solved = bool((grid == 1).all())
            if (recovered and solved) or done >= cfg.steps_per_stage + cfg.extra_steps:
                break
            budget = min(20, cfg.steps_per_stage + cfg.extra_steps - done)
            log(f"stage {stage}: gate not passed yet (short loss {short:.3f}, NIAH {grid.mean():.0%}): "
                f"{budget} more steps")
        long_after = long_position_loss(model, val, length, base_len, cfg.eval_rows, cfg.seed, cfg.doc_mask, device)
        record = {"stage": stage, "length": length, "steps": done, "seconds": time.time() - t0,
                  "short_loss": float(short), "short_loss_before": float(short_before), "recovered": bool(recovered),
                  "niah": grid.tolist(), "niah_lengths": lengths_so_far.copy(), "niah_solved": solved,
                  "long_position_loss_before": long_before, "long_position_loss": long_after}
        records.append(record)
        log_file.write(json.dumps(record) + "\n")
        log(f"stage {stage} done: {length} tokens, {done} steps | short-context loss {short:.3f} "
            f"(before extension {short_before:.3f}, {'recovered' if recovered else 'NOT recovered'}) | "
            f"NIAH {grid.mean():.0%} up to {length} ({'solved' if solved else 'NOT solved'}) | "
            f"loss at positions {base_len}+: {long_before:.3f} -> {long_after:.3f}")
    log_file.close()
    return records, grid, lengths_so_far


def parse_args(argv):
    defaults = LongContextConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/03_pretrain", help="the pretraining run to extend")
    parser.add_argument("--out", default="runs/04_long_context", help="output folder")
    parser.add_argument("--stages", default=None, help=f"comma-separated lengths (default {','.join(map(str, defaults.stages))})")
    parser.add_argument("--steps-per-stage", type=int, default=defaults.steps_per_stage)
    parser.add_argument("--extra-steps", type=int, default=defaults.extra_steps,
                        help="at most this many more steps per stage while its gate fails")
    parser.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens)
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--rope", choices=["scale", "theta", "none"], default=defaults.rope,
                        help="scale: Llama 3.1 frequency scaling; theta: raise θ with the length; none")
    parser.add_argument("--passkey-fraction", type=float, default=defaults.passkey_fraction)
    parser.add_argument("--niah-trials", type=int, default=defaults.niah_trials)
    parser.add_argument("--eval-rows", type=int, default=defaults.eval_rows)
    parser.add_argument("--no-doc-mask", action="store_true",
                        help="ablation: plain causal attention over packed rows, reported beside the masked run")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in backward: less memory for long rows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = LongContextConfig(steps_per_stage=args.steps_per_stage, extra_steps=args.extra_steps,
                            batch_tokens=args.batch_tokens, micro_batch=args.micro_batch, lr=args.lr, rope=args.rope,
                            passkey_fraction=args.passkey_fraction, niah_trials=args.niah_trials,
                            eval_rows=args.eval_rows, doc_mask=not args.no_doc_mask,
                            activation_checkpointing=args.activation_checkpointing, seed=args.seed)
    if args.stages:
        cfg = replace(cfg, stages=tuple(int(x) for x in args.stages.split(",")))
    if not cfg.doc_mask and not (Path(args.out) / "metrics.json").is_file():
        print(f"the ablation is reported beside the masked run, which is not in {args.out} yet: running it first")
        run(args, replace(cfg, doc_mask=True))
    run(args, cfg)


def run(args, cfg):
    init = Path(args.init)
    if not (init / "model.pt").is_file():
        raise FileNotFoundError(f"{init / 'model.pt'} not found: run python 03_pretrain.py first (or pass --init DIR)")
    if not (init / "data" / "meta.json").is_file():
        raise FileNotFoundError(f"{init / 'data'} (the token shards) not found: run python 03_pretrain.py first")
    device = torch.device(pre.pick_device(args.device))
    torch.manual_seed(cfg.seed)
    model, base_args = mdl.load_checkpoint(init, mmap=False)
    model = model.to(device).train()
    base_len = base_args.max_seq_len
    if sorted(set(cfg.stages)) != list(cfg.stages) or cfg.stages[0] <= base_len:
        raise ValueError(f"--stages {','.join(map(str, cfg.stages))}: each stage must be longer than the one before, "
                         f"and the first longer than the current context ({base_len} tokens)")
    tokenizer = tok.Tokenizer.load(init / "tokenizer.model")
    train, val = pre.TokenShards(init / "data", "train"), pre.TokenShards(init / "data", "val")
    weights = pre.mix_weights(train, "paper")
    out = Path(args.out) / ("no_doc_mask" if not cfg.doc_mask else "")
    out.mkdir(parents=True, exist_ok=True)
    print(f"extending {init / 'model.pt'} ({base_len} tokens) to {cfg.stages[-1]} in {len(cfg.stages)} stages, "
          f"RoPE lever: {cfg.rope}, document mask: {'on' if cfg.doc_mask else 'OFF (ablation)'}")
    print("attention cost per sequence (one row of the batch):\n" + attention_cost_table(base_args, cfg.stages, base_len))

    records, grid, lengths = extend(model, tokenizer, train, val, weights, cfg, base_len, device, out, print)
    final_args = replace(model.args, attn_impl="sdpa")
    plot_rope(base_args, final_args, out / "rope.png")
    plot_niah(grid, lengths, cfg.niah_depths, out / "niah.png",
              f"NIAH after extension ({'document mask' if cfg.doc_mask else 'no document mask'})")
    mdl.atomic_save({"model": model.state_dict(), "args": asdict(final_args), "stage": len(records)}, out / "model.pt")
    tokenizer.save(out / "tokenizer.model")
    metrics = {"config": asdict(cfg), "base_len": base_len, "stages": records,
               "final_long_position_loss": records[-1]["long_position_loss"],
               "final_niah_accuracy": float(np.mean(grid)), "final_short_loss": records[-1]["short_loss"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'model.pt'} (context {final_args.max_seq_len}), niah.png, rope.png, metrics.json")
    if not cfg.doc_mask:
        report_ablation(Path(args.out))


def report_ablation(out):
    """The document-mask ablation, side by side (Llama 3 §3.2)."""
    runs = {"document mask": out / "metrics.json", "no mask": out / "no_doc_mask" / "metrics.json"}
    metrics = {name: json.loads(path.read_text()) for name, path in runs.items() if path.is_file()}
    print(f"\n{'':<16}" + "".join(f"{name:>16}" for name in metrics))
    for label, key in [("loss at long pos.", "final_long_position_loss"), ("NIAH accuracy", "final_niah_accuracy"),
                       ("short-ctx loss", "final_short_loss")]:
        print(f"{label:<16}" + "".join(f"{m[key]:>16.3f}" for m in metrics.values()))


if __name__ == "__main__":
    main()
