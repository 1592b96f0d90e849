"""
The prepared GPU check: every CUDA path of 01-05 in one command, in about five minutes on one H100
or H200, with each result written down as it comes.

    python benchmarks/gpu_check.py                    # on a GPU machine: results in runs/gpu_check/
    python benchmarks/gpu_check.py --smoke --out DIR  # the same checks at tiny shapes on a CPU (seconds)

Each check runs in a process of its own with a time limit, so one that fails (or hangs) is recorded
and the others still run; they share one inductor/Triton cache. The checks:

  pretrain   03's gpu preset (bf16, compiled blocks, flex-attention document mask) for a fixed number
             of steps: tokens/s, MFU against the card's datasheet bf16 peak and against a measured
             bf16 matmul peak (benchmark target: >= 40% of the datasheet peak on one H100), peak memory
  fsdp       the same under `torchrun --nproc_per_node=1` (FSDP2, NCCL)
  flex       flex-attention document mask vs SDPA with a dense mask: the same loss and gradients
  decode     compiled decoding (CUDA graphs) vs eager: the same greedy tokens, tokens/s for each
  long       short 04 (one extension stage) and 05 (annealing) runs from the pretrain checkpoint

It needs only the standard library's text (the offline corpus packages need not be installed):
the corpus is the Python standard library's code and docs plus 01's synthetic math. Results:
gpu_check.json and gpu_check.md in --out.
"""

import argparse
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHECKS = ("pretrain", "fsdp", "flex", "decode", "long")
# Seconds each check may take with cold compile caches (03 compiles a block once for training and
# once for evaluation, flex its kernels, decoding one CUDA graph per batch size). All of them at
# their limits, plus preparing the data, stay under ten minutes; a rerun on the same machine reuses
# the inductor and Triton caches in --out and is much faster.
LIMITS_S = {"pretrain": 170, "fsdp": 90, "flex": 60, "decode": 90, "long": 120}
OUTPUTS = {"pretrain": ["03"], "fsdp": ["03_fsdp"], "long": ["04", "05"]}  # run folders a check starts afresh


def shape_flags(smoke):
    """03's flags: the gpu preset at a batch that gives a steady step rate quickly, or tiny shapes."""
    if smoke:
        return ["--preset", "cpu", "--device", "cpu", "--dim", "64", "--n-layers", "2", "--n-heads", "4",
                "--n-kv-heads", "2", "--multiple-of", "32", "--seq-len", "64", "--batch-tokens", "512",
                "--micro-batch", "4", "--eval-rows", "2", "--warmup", "2"]
    return ["--preset", "gpu", "--batch-tokens", "131072", "--eval-rows", "16", "--warmup", "5"]


def pretrain_flags(out, folder, steps, smoke):
    return [*shape_flags(smoke), "--data", str(folder / "corpus"), "--tokenizer", str(folder / "tokenizer.model"),
            "--math-problems", "4000", "--no-curation", "--out", str(out), "--steps", str(steps),
            "--eval-every", "1000000", "--sample-every", "1000000", "--ckpt-every", "1000000"]


# -----------------------------------------------------------------------------
# The checks, each run in a child process; each returns a dict of results


def check_pretrain(folder, smoke):
    pre = importlib.import_module("03_pretrain")
    pre.main(pretrain_flags(folder / "03", folder, 3 if smoke else 20, smoke))
    return pretrain_results(folder / "03", smoke)


def check_fsdp(folder, smoke):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(ROOT / "03_pretrain.py"), *pretrain_flags(folder / "03_fsdp", folder, 3 if smoke else 12, smoke)]
    subprocess.run(command, check=True, cwd=folder)
    return pretrain_results(folder / "03_fsdp", smoke)


def pretrain_results(out, smoke):
    """Speed and MFU from a 03 run's log, after its first steps (compiles, warm-up)."""
    import numpy as np
    import torch
    pre = importlib.import_module("03_pretrain")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    header, steps = records[0], [r for r in records if "loss" in r]
    metrics = json.loads((out / "metrics.json").read_text())
    steady = steps[min(3, len(steps) - 1):]
    tps = float(np.median([r["tokens_per_s"] for r in steady]))
    flops = tps * importlib.import_module("02_model").flops_per_token(
        importlib.import_module("02_model").ModelArgs(**header["model"]), header["config"]["seq_len"])
    device = torch.device(metrics["device"])
    dtype = torch.bfloat16 if header["config"]["dtype"] == "bfloat16" else torch.float32
    spec, measured = pre.datasheet_peak(device, dtype), pre.measured_peak(device, dtype)
    losses = [r["loss"] for r in steps]
    return {"steps": len(steps), "first_step_s": steps[0]["ms"] / 1000,
            "step_ms": float(np.median([r["ms"] for r in steady])), "tokens_per_s": tps, "mfu_datasheet": flops / spec if spec else None,
            "mfu_measured_peak": flops / measured, "datasheet_tflops": spec and spec / 1e12,
            "measured_tflops": measured / 1e12, "loss_first": losses[0], "loss_last": losses[-1],
            "attention": header["model"]["attn_impl"], "peak_memory_gb": metrics["peak_memory_gb"],
            "ok": all(np.isfinite(losses)) and losses[-1] < losses[0]}


def check_flex(folder, smoke):
    """The same model and batch through flex attention (a BlockMask) and SDPA (a dense boolean mask)."""
    import torch
    mdl = importlib.import_module("02_model")
    device = torch.device("cpu" if smoke else "cuda")
    T = 128 if smoke else 4096
    args = mdl.ModelArgs(dim=64 if smoke else 1024, n_layers=2, n_heads=4 if smoke else 16,
                         n_kv_heads=2 if smoke else 4, vocab_size=512, max_seq_len=T)
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, T + 1), device=device)
    doc_ids = (torch.arange(T + 1, device=device) // (T // 5)).expand(2, -1).contiguous()  # 5-6 documents a row
    results = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = mdl.Transformer(mdl.replace(args, attn_impl=impl)).to(device)
        with mdl.autocast(device, "float32" if smoke else "bfloat16"), torch.set_grad_enabled(not smoke):
            logits = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1])  # (flex attention has no backward on CPU)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        if not smoke:
            loss.backward()
        results[impl] = (loss.item(), None if smoke else model.layers[0].attention.wq.weight.grad.float().clone())
    diff = abs(results["flex"][0] - results["sdpa"][0])
    grad_diff = None if smoke else ((results["flex"][1] - results["sdpa"][1]).norm() / results["sdpa"][1].norm()).item()
    return {"loss_sdpa": results["sdpa"][0], "loss_flex": results["flex"][0], "loss_difference": diff,
            "relative_grad_difference": grad_diff, "ok": diff < 2e-2 and (grad_diff is None or grad_diff < 5e-2)}


def check_decode(folder, smoke):
    """Greedy tokens and speed: eager generate vs the compiled decode step, at batch 1 and 8. (The
    smoke run compares eager with eager: a CPU compile takes a minute, and tests/test_model.py
    checks compiled CPU decoding against eager already.)"""
    import torch
    mdl = importlib.import_module("02_model")
    device = torch.device("cpu" if smoke else "cuda")
    torch.set_float32_matmul_precision("highest")  # compare the two paths, not TF32 rounding
    if (folder / "03" / "model.pt").is_file():
        model, _ = mdl.load_checkpoint(folder / "03" / "model.pt")
    else:  # the pretrain check failed: decode with random weights of the same shape
        model = mdl.Transformer(mdl.preset("tiny", dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=1024)
                                if smoke else mdl.preset("gpu", vocab_size=8192))
    model = model.to(device).eval()
    results, ok = {}, True
    for batch in (1, 8):
        prompts = [list(range(10 + i, 42 + i)) for i in range(batch)]  # 32-token prompts
        new = 16 if smoke else 128
        mdl.generate(model, prompts, new, compile=not smoke)  # compile (and CUDA-graph) first, then time
        timings = []
        for compile_ in (False, not smoke):  # eager, then compiled
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = mdl.generate(model, prompts, new, compile=compile_)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append((out, batch * new / (time.perf_counter() - t0)))
        (eager, eager_rate), (compiled, compiled_rate) = timings
        same = sum(a == b for x, y in zip(eager, compiled) for a, b in zip(x, y))
        results[f"batch{batch}"] = {"eager_tokens_per_s": eager_rate, "compiled_tokens_per_s": compiled_rate,
                                    "same_tokens": same / (batch * new),
                                    "compiled_is_greedy": greedy_up_to_ties(model, prompts, compiled)}
        # after one near-tie flips, the rest of a row differs: what must hold is that every compiled
        # token is the eager model's argmax (up to a tie) given the compiled tokens before it
        ok = ok and results[f"batch{batch}"]["compiled_is_greedy"]
    return {**results, "ok": ok}


def greedy_up_to_ties(model, prompts, generated, tie=1e-3):
    import torch
    with torch.no_grad():
        for prompt, new in zip(prompts, generated):
            tokens = torch.tensor([prompt + new], device=model.tok_embeddings.weight.device)
            logits = model(tokens)[0, len(prompt) - 1:-1]  # (len(new), V): what predicted each new token
            picked = logits.gather(1, tokens[0, len(prompt):, None])[:, 0]
            if not (picked >= logits.max(-1).values - tie).all():
                return False
    return True


def check_long(folder, smoke):
    """04 (one stage, twice the pretraining length) and 05 (a few annealing steps) from the 03 run."""
    import torch
    lc, an = importlib.import_module("04_long_context"), importlib.import_module("05_anneal")
    device = ["--device", "cpu"] if smoke else []
    lc.main(["--init", str(folder / "03"), "--out", str(folder / "04"), "--steps-per-stage", "4", "--extra-steps", "0",
             "--niah-trials", "1", "--eval-rows", "4", "--niah-depths", "0.0,1.0", *device,
             "--stages", str(2 * (64 if smoke else 4096))])
    peak_04 = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    an.main(["--init", str(folder / "04"), "--data-dir", str(folder / "03" / "data"), "--out", str(folder / "05"),
             "--steps", "4", "--snapshots", "2", "--math-items", "8", "--completion-items", "8", "--eval-rows", "4",
             *device])
    stage = json.loads((folder / "04" / "metrics.json").read_text())["stages"][0]
    anneal = json.loads((folder / "05" / "metrics.json").read_text())["results"]
    return {"long_position_loss_before": stage["long_position_loss_before"],
            "long_position_loss_after": stage["long_position_loss"], "short_loss": stage["short_loss"],
            "anneal_val_loss": {k: v["val_loss_mean"] for k, v in anneal.items()}, "peak_memory_gb_04": peak_04,
            "ok": stage["long_position_loss"] == stage["long_position_loss"]}  # finite (not NaN)


# -----------------------------------------------------------------------------
# Running them


def prepare(folder, smoke):
    """The corpus (standard-library code and docs, as JSONL) and a tokenizer trained on it."""
    tok = importlib.import_module("01_tokenizer")
    corpus = folder / "corpus"
    if not (folder / "tokenizer.model").is_file():
        corpus.mkdir(parents=True, exist_ok=True)
        docs = tok.python_code_documents() + tok.python_docs_documents()
        if smoke:
            docs = docs[:40] + [d for d in docs if d.source == "python_docs"][:40]
        for source in ("python_code", "python_docs"):
            lines = [json.dumps({"text": d.text, "source": source}) for d in docs if d.source == source]
            tok.atomic_write_text(corpus / f"{source}.jsonl", "\n".join(lines) + "\n")
        train, _ = tok.split_documents(docs)
        tokenizer = tok.Tokenizer.train(tok.sample_text(train, 300_000 if smoke else 3_000_000), 1024 if smoke else 8192)
        tokenizer.save(folder / "tokenizer.model")


def run_child(name, folder, smoke):
    """In the child process: run one check, write its result (or its error) to `name`.json."""
    import torch
    t0 = time.time()
    for run in OUTPUTS.get(name, []):
        shutil.rmtree(folder / run, ignore_errors=True)
    try:
        result = globals()[f"check_{name}"](folder, smoke)
    except BaseException as e:  # noqa: the check's failure is its result
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    result["seconds"] = time.time() - t0
    if result.get("peak_memory_gb") is None:  # this process's own (a torchrun child reports its own)
        result["peak_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, for the test suite")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    flags = parser.parse_args()
    folder = Path(flags.out).resolve()
    if flags.child:
        return run_child(flags.child, folder, flags.smoke)
    import torch
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}
    t_all = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    prepare(folder, flags.smoke)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": flags.smoke, "checks": {}}
    for name in flags.only.split(","):
        (folder / f"{name}.json").unlink(missing_ok=True)
        command = [sys.executable, __file__, "--out", str(folder), "--child", name] + ["--smoke"] * flags.smoke
        # a session of its own, so that a timeout kills the whole tree (torchrun's workers included)
        process = subprocess.Popen(command, env=env, cwd=folder, start_new_session=True)
        try:
            process.wait(timeout=LIMITS_S[name] * (3 if flags.smoke else 1))
            result = json.loads((folder / f"{name}.json").read_text())
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            result = {"ok": False, "error": f"timed out after {LIMITS_S[name]} s"}
        except FileNotFoundError:
            result = {"ok": False, "error": "the check's process died without a result (see its output above)"}
        results["checks"][name] = result
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else 'FAILED'} {result.get('error', '')}", flush=True)
        (folder / "gpu_check.json").write_text(json.dumps(results, indent=2))  # written as it goes
    results["seconds"] = time.time() - t_all
    (folder / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (folder / "gpu_check.md").write_text(table(results))
    print(table(results))


def table(results):
    rows = [f"GPU check on {results['device']}, torch {results['torch']}, {results['date']} "
            f"({results.get('seconds', 0):.0f} s{', smoke' if results['smoke'] else ''})", "",
            "| check | ok | result | peak memory (GB) | seconds |", "|---|---|---|---|---|"]
    for name, r in results["checks"].items():
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("ok", "seconds", "peak_memory_gb")}
        rows.append(f"| {name} | {'yes' if r['ok'] else '**no**'} | {shown} | {r.get('peak_memory_gb') or 0:.2f} | "
                    f"{r.get('seconds', 0):.0f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
