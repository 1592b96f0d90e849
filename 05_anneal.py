"""
Chapter 5: annealing, checkpoint averaging, and annealing as a data-quality probe.

Llama 3 §3.4.3: over the final stretch of pretraining (the last 40M tokens of 15.6T), the learning
rate goes linearly to 0 at the long context length, on a mix that upsamples very-high-quality
sources; the checkpoints taken during annealing are averaged (Polyak averaging) into the final
pre-trained model. Benchmark training sets are kept out of the annealing data (§3.1.3).
§3.1.3 also turns annealing into a cheap test of a small dataset: anneal a half-trained model on
30% new data + 70% default mix and compare benchmark scores against annealing on the default mix.

Here, from 04's checkpoint:
  * anneal to LR 0 at the long context, upsampling math and code (and show the contamination check);
  * average the snapshots taken during annealing, and compare with the last one;
  * evaluate 04's model, the last and the averaged checkpoint on benchmarks built here: GSM8K-like
    math (few-shot) graded in three tiers (the method, the first step, the final answer), each gain
    paired item by item with its standard error, and held-out text completion, plus validation loss
    per source; print a table, save a bar chart;
  * `--probe SOURCE`: anneal an earlier 03 checkpoint with SOURCE at 30% vs a 0% control.

Run it:
    python 05_anneal.py                              # ~4 minutes on CPU; needs runs/04_long_context
    python 05_anneal.py --probe synthetic_math       # is this source worth having? (§3.1.3)
    python 05_anneal.py --probe path/to/new_data.jsonl
"""

import argparse
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

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")

BENCH_SEED, SHOT_SEED = 10_007, 20_011  # seeds no training data uses (03 adds synthetic math with seed 0)


@dataclass
class AnnealConfig:
    steps: int = 60  # annealing steps (Llama 3: the last 40M tokens of 15.6T)
    lr: float = 6e-4  # where the linear decay starts; it ends at exactly 0
    batch_tokens: int = 0  # tokens per optimizer step; 0: four rows of the long context (--probe: the 03 run's batch)
    micro_batch: int = 0  # rows per forward pass; 0: the whole batch on a CPU, one row on a GPU
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16")})  # auto: bf16 on CUDA, else fp32
    upsample: str = "math=2,code=2"  # §3.4.3 upsamples very-high-quality data: category=factor,...
    snapshots: int = 4  # checkpoints averaged, evenly spaced over the second half, the last included
    math_items: int = 200  # GSM8K-like benchmark items (before the contamination check)
    shots: int = 3  # worked examples before each math question
    completion_items: int = 100  # held-out completion benchmark items
    eval_rows: int = 16  # validation rows per source
    ckpt_every: int = 20  # steps between checkpoints (--resume continues from the last)
    seed: int = 4321  # data order


# -----------------------------------------------------------------------------
# Schedule and averaging


def anneal_lr(step, steps, peak):
    """Linear decay from `peak` at step 0 to exactly 0 at the last step (§3.4.3)."""
    return peak * (steps - 1 - step) / max(steps - 1, 1)


class PolyakAverage:
    """The element-wise mean of snapshots of one model (Polyak averaging, §3.4.3): averaging nearby
    points of a low-learning-rate trajectory lands nearer the basin's centre. Kept as a running
    float32 sum, so it costs one extra copy of the weights however many snapshots are taken, and a
    checkpoint can carry it."""

    def __init__(self, total=None, count=0):
        self.total, self.count = total, count

    def add(self, state_dict):
        if self.total is None:
            self.total = {k: v.detach().float().clone() for k, v in state_dict.items()}
            self.dtypes = {k: v.dtype for k, v in state_dict.items()}
        elif state_dict.keys() != self.total.keys():
            raise ValueError("checkpoints to average must come from the same model (different parameter names)")
        else:
            for k, v in state_dict.items():
                self.total[k] += v.detach().float()
        self.count += 1

    def average(self, dtypes=None):
        if not self.count:
            raise ValueError("nothing to average")
        dtypes = dtypes or getattr(self, "dtypes", {})
        return {k: (v / self.count).to(dtypes.get(k, v.dtype)) for k, v in self.total.items()}


def average_state_dicts(state_dicts):
    """The element-wise mean of several checkpoints of one model."""
    average = PolyakAverage()
    for sd in state_dicts:
        average.add(sd)
    return average.average()


def snapshot_steps(steps, n):
    """`n` steps, evenly spaced over the second half of annealing, ending with the last."""
    return sorted({steps - 1 - round(i * (steps // 2) / max(n - 1, 1)) for i in range(n)})


# -----------------------------------------------------------------------------
# Benchmarks built here, and the contamination check


def math_benchmark(n):
    """GSM8K-like items (question, worked answer, answer) from 01's generator, with a seed no training
    data uses."""
    return tok.math_problems(n, BENCH_SEED)


def math_prompt(tokenizer, question, shots, max_tokens):
    """Few-shot prompt ids: worked examples (from yet another seed), then the question, keeping as
    many examples as fit in `max_tokens` (a short-context model gets fewer shots)."""
    examples = [tok.format_problem(*p) for p in tok.math_problems(shots, SHOT_SEED)]
    for k in range(shots, -1, -1):
        ids = tokenizer.encode("".join(e + "\n" for e in examples[:k]) + f"Question: {question}\nAnswer:", bos=True)
        if len(ids) <= max_tokens:
            return ids
    raise tok.UserError(f"the question alone is longer than {max_tokens} tokens: {question!r}")


def extract_answer(completion):
    """The number after "The answer is" in the model's first answer; failing that, the last number
    before the next question; None if there is none."""
    first = re.split(r"\n\s*Question:", completion)[0]
    match = re.search(r"The answer is\s*\$?(-?\d[\d,]*)", first)
    if match:
        return int(match.group(1).replace(",", ""))
    numbers = re.findall(r"-?\d+", first)
    return int(numbers[-1]) if numbers else None


def operations(working):
    """The method of a worked answer: its operators in order ("33 + 16 = 49. 49 - 2 = 47." -> + then -)."""
    return re.findall(r"(?<=\d) ([-+x/]) (?=\$?\d)", working)


# Graded tiers of one GSM8K-like answer, easiest first (the final answer is GSM8K's own score). The method
# reads the question's words ("gives away", "shared equally") and needs no arithmetic; the first step needs
# the question's numbers copied and combined; the answer needs every step.
MATH_TIERS = {"math_method": "right operations, in order", "math_first_step": "first step written exactly",
              "math_accuracy": "final answer (GSM8K's score)"}


def grade_math(completion, working, answer):
    """The three tiers of one answer: {tier: right?}."""
    mine = re.split(r"\n\s*Question:|The answer is", completion)[0].strip()  # the working, before the answer
    return {"math_method": operations(mine) == operations(working),
            "math_first_step": re.match(re.escape(working.split(".")[0]) + r"\b", mine) is not None,
            "math_accuracy": extract_answer(completion) == answer}


def commonest_method_share(math_items):
    """The baseline for the method tier: the score of always writing the commonest method."""
    methods = [tuple(operations(working)) for _, working, _ in math_items]
    return max(map(methods.count, set(methods))) / len(methods) if methods else 0.0


def paired_gain(before, after):
    """Mean gain of per-item scores `after` over `before` on the same items, and its standard error."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if len(diff) < 2:  # no spread to measure
        return (float(diff[0]) if len(diff) else float("nan")), float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def completion_benchmark(val, tokenizer, n, context=48, target=8, seed=0):
    """Held-out text completion: `context` tokens of a validation document (prose and code), then the
    next `target` tokens to reproduce greedily. Items: (prompt ids, target ids)."""
    rng = np.random.default_rng(seed)
    sources = [s for s in val.sources if pre.category_of(s) in ("general", "code")]
    tokens, doc_ids = pre.sample_batch(val, {s: 1 / len(sources) for s in sources}, 4 * n, context + target, rng)
    items = [(row[:context].tolist(), row[context:].tolist()) for row, d in zip(tokens, doc_ids)
             if (d == d[0]).all() and (row < tokenizer.n_bpe).all()]  # one document, no special tokens
    return items[:n]


def contamination_filter(items, corpus_text, text_of):
    """Drop benchmark items whose text occurs verbatim in the annealing data. Returns (kept, dropped)."""
    kept = [item for item in items if text_of(item) not in corpus_text]
    return kept, len(items) - len(kept)


def annealing_text(shards, tokenizer, sources):
    """The annealing data as one string, to search benchmark items in."""
    return "\n".join(tokenizer.decode(shards.tokens[s].tolist()) for s in sources)


@torch.no_grad()
def evaluate(model, tokenizer, math_items, completion_items, val, eval_len, cfg, device, batch=25):
    """Math tiers (and each item's, to pair models on), completion exact match and per-token accuracy, and
    validation loss per source."""
    model.eval()
    autocast = mdl.autocast(device, cfg.dtype)
    per_item = {tier: [] for tier in MATH_TIERS}
    answer_room = min(32, model.args.max_seq_len // 4)  # a two-step working and its answer (less in a tiny context)
    for i in range(0, len(math_items), batch):
        chunk = math_items[i:i + batch]
        prompts = [math_prompt(tokenizer, q, cfg.shots, model.args.max_seq_len - answer_room) for q, _, _ in chunk]
        with autocast:
            outputs = mdl.generate(model, prompts, max_new_tokens=answer_room, stop_tokens=tokenizer.stop_tokens)
        for output, (_, working, answer) in zip(outputs, chunk):
            for tier, right in grade_math(tokenizer.decode(output), working, answer).items():
                per_item[tier].append(int(right))
    exact, token_hits = 0, 0
    for i in range(0, len(completion_items), batch):
        chunk = completion_items[i:i + batch]
        with autocast:
            outputs = mdl.generate(model, [p for p, _ in chunk], max_new_tokens=len(chunk[0][1]))
        exact += sum(o == t for o, (_, t) in zip(outputs, chunk))
        token_hits += sum(sum(a == b for a, b in zip(o, t)) for o, (_, t) in zip(outputs, chunk))
    n_tokens = sum(len(t) for _, t in completion_items)
    losses = pre.eval_losses(model, val, cfg.eval_rows, eval_len, cfg.seed, device, autocast=autocast,
                             micro_batch=cfg.micro_batch)
    model.train()
    return {**{tier: float(np.mean(hits)) if hits else 0.0 for tier, hits in per_item.items()},
            "per_item": per_item, "completion_exact": exact / max(len(completion_items), 1),
            "completion_token_accuracy": token_hits / max(n_tokens, 1),
            "val_loss": losses, "val_loss_mean": float(np.mean(list(losses.values())))}


# -----------------------------------------------------------------------------
# Annealing


def anneal(model, train, weights, cfg, seq_len, device, log=print, snapshot_at=(), out=None, resume_from=None,
           extra=None):
    """`cfg.steps` AdamW steps with the LR going linearly to 0, rows drawn by `weights`; the weights
    after each step in `snapshot_at` go into a PolyakAverage, which is returned. With `out`, each
    step is logged to `out`/log.jsonl and every cfg.ckpt_every steps (and after the last) `out`/ckpt.pt
    holds what resuming needs, plus `extra`; `resume_from` is such a checkpoint, loaded."""
    rows = max(1, (cfg.batch_tokens or 4 * seq_len) // seq_len)
    size = min(cfg.micro_batch or rows, rows)
    autocast = mdl.autocast(device, cfg.dtype)
    optimizer = pre.make_optimizer(model, cfg.lr, fused=device.type == "cuda")
    loss_fn = functools.partial(pre.next_token_loss, doc_mask=True)
    rng, average, start = np.random.default_rng(cfg.seed), PolyakAverage(), 0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        rng.bit_generator.state = resume_from["rng"]
        average = PolyakAverage(resume_from["average_sum"], resume_from["average_count"])
        start = resume_from["step"]
    log_file = open(out / "log.jsonl", "a") if out else None
    for step in range(start, cfg.steps):
        lr = anneal_lr(step, cfg.steps, cfg.lr)
        tokens, doc_ids = pre.sample_batch(train, weights, rows, seq_len + 1, rng)
        micro_batches = pre.split_micro_batches((tokens, doc_ids), size, math.ceil(rows / size), device)
        try:
            loss, grad_norm = pre.train_step(model, optimizer, micro_batches, loss_fn, lr, autocast=autocast)
        except FloatingPointError as e:
            raise FloatingPointError(f"annealing step {step + 1}: {e}") from None
        if log_file:
            log_file.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm}) + "\n")
            log_file.flush()
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            log(f"anneal step {step + 1:>4}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.2f}")
        if step in snapshot_at:
            average.add(model.state_dict())
        if out and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            mdl.save_checkpoint(out / "ckpt.pt", model, optimizer=optimizer.state_dict(), step=step + 1,
                                rng=rng.bit_generator.state, average_sum=average.total,
                                average_count=average.count, config=asdict(cfg), **(extra or {}))
            log(f"saved {out / 'ckpt.pt'} at step {step + 1}")
    if log_file:
        log_file.close()
    return average


def parse_factors(text):
    """--upsample "math=2,code=2": a factor per mix category (general, math, code, multilingual)."""
    try:
        factors = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise tok.UserError(f"--upsample {text!r}: expected category=factor,... (e.g. math=2,code=2)") from None
    unknown = set(factors) - set(pre.PAPER_MIX)
    if unknown or any(f < 0 for f in factors.values()):
        raise tok.UserError(f"--upsample {text!r}: categories are {', '.join(pre.PAPER_MIX)}, factors >= 0")
    return factors


def anneal_weights(train, upsample):
    """The annealing mix: the paper's category shares with high-quality categories upsampled."""
    factors = parse_factors(upsample)
    return pre.normalised({s: w * factors.get(pre.category_of(s), 1.0)
                           for s, w in pre.mix_weights(train, "paper").items()})


def probe_source(train, tokenizer, tokenizer_path, probe, folder, log):
    """A source name already in the shards, or a file/folder of new text tokenized into `folder`."""
    if probe in train.sources:
        return train, probe
    if not Path(probe).exists():
        raise tok.UserError(f"--probe {probe!r} is neither a source of the shards ({', '.join(train.sources)}) "
                         f"nor an existing file or folder")
    documents = lambda: ((replace(d, source="probe")) for d in tok.iter_documents(probe))
    pre.prepare_shards(documents, tokenizer, tokenizer_path, folder, f"probe:{Path(probe).resolve()}", log)
    merged = pre.TokenShards(folder, "train")
    merged.tokens.update({s: train.tokens[s] for s in train.sources})
    merged.starts.update({s: train.starts[s] for s in train.sources})
    merged.sources = sorted(merged.tokens)
    return merged, "probe"


def bar_chart(results, path):
    metrics = [("math_method", "math: method"), ("math_first_step", "math: first step"),
               ("math_accuracy", "math: answer"), ("completion_token_accuracy", "completion tokens")]
    fig, axes = pre.figure(ncols=2, figsize=(11, 3.8))
    width = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        axes[0].bar(np.arange(len(metrics)) + k * width, [r[m] for m, _ in metrics], width, label=name)
        sources = sorted(r["val_loss"])
        axes[1].bar(np.arange(len(sources)) + k * width, [r["val_loss"][s] for s in sources], width, label=name)
    axes[0].set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, [label for _, label in metrics], fontsize=8)
    axes[1].set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources, fontsize=8, rotation=15)
    axes[0].set_title("benchmarks (higher is better)"), axes[1].set_title("validation loss (lower is better)")
    axes[0].legend(fontsize=8), pre.save_figure(fig, path)


def print_table(results, log, baseline=None):
    width = max(len(name) for name in results) + 2
    log(f"\n{'':<34}" + "".join(f"{name:>{width}}" for name in results))
    rows = [*((f"GSM8K-like: {label}", tier) for tier, label in MATH_TIERS.items()),
            ("completion exact match", "completion_exact"), ("completion token accuracy", "completion_token_accuracy"),
            ("val loss (mean)", "val_loss_mean")]
    for label, key in rows:
        log(f"{label:<34}" + "".join(f"{r[key]:>{width}.3f}" for r in results.values()))
    for source in sorted(next(iter(results.values()))["val_loss"]):
        log(f"{'  val loss ' + source:<34}" + "".join(f"{r['val_loss'][source]:>{width}.3f}" for r in results.values()))
    if baseline is not None:
        log(f"(always writing the commonest method would score {baseline:.3f} on the method tier)")


def print_gains(before, after, names, log):
    """Each math tier's gain of `after` over `before`, paired item by item, with its standard error."""
    gains = {tier: paired_gain(before["per_item"][tier], after["per_item"][tier]) for tier in MATH_TIERS}
    n = len(before["per_item"]["math_method"])
    log(f"{names}, paired over the same {n} items: " +
        ", ".join(f"{tier.removeprefix('math_')} {g:+.3f} ± {se:.3f}" for tier, (g, se) in gains.items()))
    return gains


def main(argv=None):
    flags = parse_flags(argv)
    cfg = pre.config_from_flags(flags, AnnealConfig())
    if cfg.steps < 2:
        raise tok.UserError("--steps must be at least 2 (the learning rate decays from its peak to 0)")
    parse_factors(cfg.upsample)  # a bad value is reported now, not after loading everything
    device = torch.device(mdl.pick_device(flags.device))
    cfg = pre.for_device(cfg, device)
    data_dir = Path(flags.data_dir)
    if not (data_dir / "meta.json").is_file():
        raise tok.UserError(f"{data_dir} (03's token shards) not found: run python 03_pretrain.py first "
                                f"(or pass --data-dir)")
    out = Path(flags.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = pre.TokenShards(data_dir, "train"), pre.TokenShards(data_dir, "val")
    torch.manual_seed(cfg.seed)
    if flags.probe:
        return run_probe(flags, cfg, train, val, device, out)
    init = Path(flags.init)
    if not (init / "model.pt").is_file():
        raise tok.UserError(f"{init / 'model.pt'} not found: run python 04_long_context.py first (or pass --init DIR)")
    anneal_and_average(init, train, val, cfg, device, out, flags.resume)


def anneal_and_average(init, train, val, cfg, device, out, resume=False):
    """§3.4.3 on 04's model: anneal, average the snapshots, compare 04 / last / average, save the
    base model. An interrupted run resumes at its last checkpoint; evaluations rerun."""
    state = pre.claim_run_folder(out, resume)
    if state == "finished":
        return print(f"{out} already holds the finished run: nothing to resume")
    tokenizer = tok.Tokenizer.load(init / "tokenizer.model")
    model, args_04 = mdl.load_checkpoint(init, mmap=False)
    model = model.to(device)
    seq_len = args_04.max_seq_len  # §3.4.3: annealing runs at the long context length
    weights = anneal_weights(train, cfg.upsample)
    print("annealing mix: " + ", ".join(f"{s} {w:.1%}" for s, w in weights.items()))
    math_items, completion_items = benchmarks(train, val, tokenizer, cfg, list(weights), print)
    short = min(seq_len, 256)  # validation loss at 03's CPU length, comparable across chapters
    evaluate_now = functools.partial(evaluate, model, tokenizer, math_items, completion_items, val, short, cfg, device)
    ckpt = resume_checkpoint(out, cfg) if state == "interrupted" else None
    results = ckpt["results"] if ckpt else {"04 model": evaluate_now()}
    pre.truncate_log(out / "log.jsonl", lambda r: r["step"] <= (ckpt["step"] if ckpt else 0))
    t0, at = time.time(), snapshot_steps(cfg.steps, cfg.snapshots)
    average = anneal(model, train, weights, cfg, seq_len, device, print, at, out, ckpt, extra={"results": results})
    print(f"annealed {cfg.steps} steps at {seq_len} tokens in {time.time() - t0:.0f} s; averaging snapshots "
          f"after steps {[s + 1 for s in at]}")
    results["annealed (last)"] = evaluate_now()
    mdl.save_checkpoint(out / "last.pt", model)
    model.load_state_dict(average.average())
    results["averaged"] = evaluate_now()
    baseline = commonest_method_share(math_items)
    print_table(results, print, baseline)
    gains = {name: print_gains(results["04 model"], results[name], f"{name} − 04 model", print)
             for name in ("annealed (last)", "averaged")}
    bar_chart(results, out / "benchmarks.png")
    tokenizer.save(out / "tokenizer.model")
    tok.atomic_write_text(out / "metrics.json", json.dumps({
        "config": asdict(cfg), "mix": weights, "results": results, "gains_over_04": gains,
        "commonest_method_share": baseline,
        "benchmark_items": {"math": len(math_items), "completion": len(completion_items)}}, indent=2))
    # the averaged model is the final pre-trained ("base") model
    mdl.save_checkpoint(out / "model.pt", model, averaged_steps=[s + 1 for s in at])
    (out / "ckpt.pt").unlink(missing_ok=True)
    print(f"wrote {out / 'model.pt'} (the averaged base model), last.pt, benchmarks.png, metrics.json")


def resume_checkpoint(out, cfg):
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    if ckpt["config"] != asdict(cfg):
        raise tok.UserError(f"{out / 'ckpt.pt'} was written with another configuration; resume with the same "
                            f"flags, or start again with another --out")
    print(f"resumed from {out / 'ckpt.pt'} at step {ckpt['step']}")
    return ckpt


def benchmarks(train, val, tokenizer, cfg, sources, log):
    """Build both benchmarks and drop any item found verbatim in the annealing data."""
    corpus_text = annealing_text(train, tokenizer, sources)
    math_items, dropped_math = contamination_filter(math_benchmark(cfg.math_items), corpus_text, lambda item: item[0])
    completion_items, dropped_completion = contamination_filter(
        completion_benchmark(val, tokenizer, cfg.completion_items, seed=cfg.seed), corpus_text,
        lambda item: tokenizer.decode(item[0] + item[1]))
    log(f"contamination check against {len(corpus_text):,} characters of annealing data: dropped "
        f"{dropped_math} of {cfg.math_items} math items and {dropped_completion} completion items found there verbatim")
    return math_items, completion_items


def probe_mixes(weights, source):
    """§3.1.3's two annealing mixes: the control (the default mix without the candidate source) and
    30% candidate + 70% that same mix."""
    control = pre.normalised({s: w for s, w in weights.items() if s != source})
    return control, {**{s: 0.7 * w for s, w in control.items()}, source: 0.3}


def pretraining_batch(ckpt_path):
    """The batch (tokens a step) of the 03 run a training checkpoint belongs to, or None for a plain
    model file. The probe continues that run, so it anneals with the run's own batch size."""
    ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True) if Path(ckpt_path).is_file() else {}
    return ckpt.get("config", {}).get("batch_tokens")


def run_probe(flags, cfg, train, val, device, out):
    """§3.1.3: anneal a half-trained model with 30% candidate data, and a 0% control, then compare."""
    if flags.probe_init:
        ckpt_path = Path(flags.probe_init)
    else:
        run_03 = Path(flags.data_dir).parent  # the pretraining run the shards belong to
        kept = pre.checkpoints(run_03)
        if not kept:
            raise tok.UserError(f"no {run_03}/ckpt_*.pt to probe from: run python 03_pretrain.py first "
                                    f"(or pass --probe-init PATH)")
        ckpt_path = kept[0]  # the earliest kept checkpoint: a partly trained model
    tokenizer_path = Path(flags.data_dir).parent / "tokenizer.model"
    tokenizer = tok.Tokenizer.load(tokenizer_path)
    train, source = probe_source(train, tokenizer, tokenizer_path, flags.probe, out / "probe_data", print)
    base, candidate = probe_mixes(pre.mix_weights(train, "paper"), source)
    seq_len = mdl.load_checkpoint(ckpt_path)[1].max_seq_len  # memory-mapped: only the args are read
    cfg = replace(cfg, batch_tokens=cfg.batch_tokens or pretraining_batch(ckpt_path) or 4 * seq_len)
    print(f"each probe anneals {cfg.steps} steps of {max(1, cfg.batch_tokens // seq_len)} rows of {seq_len} tokens")
    math_items, completion_items = benchmarks(train, val, tokenizer, cfg, list(candidate), print)
    results = {}
    for name, weights in [("control (0%)", base), (f"{source} at 30%", candidate)]:
        model, _ = mdl.load_checkpoint(ckpt_path, mmap=False)
        model = model.to(device)
        print(f"\nannealing {ckpt_path} on: " + ", ".join(f"{s} {w:.0%}" for s, w in weights.items() if w))
        anneal(model, train, weights, cfg, seq_len, device, print)
        results[name] = evaluate(model, tokenizer, math_items, completion_items, val, seq_len, cfg, device)
    print_table(results, print, commonest_method_share(math_items))
    control, probe = results.values()
    gains = {k: probe[k] - control[k] for k in (*MATH_TIERS, "completion_exact", "completion_token_accuracy",
                                                  "val_loss_mean")}
    print("gain over the control: " + ", ".join(f"{k} {v:+.3f}" for k, v in gains.items()))
    paired = print_gains(control, probe, "probe − control", print)
    tok.atomic_write_text(out / "probe.json", json.dumps({"probe": flags.probe, "from": str(ckpt_path), "results": results,
                                                 "gain": gains, "paired_gain": paired}, indent=2))


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/04_long_context", help="the model to anneal")
    parser.add_argument("--data-dir", default="runs/03_pretrain/data", help="03's token shards")
    parser.add_argument("--out", default="runs/05_anneal", help="output folder")
    parser.add_argument("--probe", default=None,
                        help="a source name or a path of new text: anneal an earlier 03 checkpoint with it at 30%%")
    parser.add_argument("--probe-init", default=None,
                        help="checkpoint for --probe (default: the earliest ckpt_*.pt kept beside --data-dir)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pre.add_config_flags(parser, AnnealConfig, AnnealConfig())
    return parser.parse_args(argv)


if __name__ == "__main__":
    tok.run_main(main)
