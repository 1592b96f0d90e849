"""
Chapter 3: pretraining, from a laptop CPU to FSDP on many GPUs.

Llama 3 §3.4.1 trains with AdamW, a linear warmup then cosine decay to 1% of the peak learning
rate, and a batch that grows 4M -> 8M -> 16M tokens; §3.3 shards the model with FSDP and keeps
gradient reductions in fp32. This script does the same at any size:

  data     documents -> 01's tokenizer -> memory-mapped token shards per source and split, each
           document wrapped in <|begin_of_text|> ... <|end_of_text|>; rows of seq_len tokens are cut
           at random places, so they pack several documents, and the model's document mask keeps
           them apart (Llama 3 §3.2). A data mix picks the source of each row.
  train    AdamW, warmup + cosine, gradient clipping and accumulation to a batch counted in tokens,
           optional batch ramp, bf16 + torch.compile on GPU, FSDP2 under torchrun.
  outputs  runs/03_pretrain/: log.jsonl, loss.png, metrics.json, ckpt_NNNNNN.pt (atomic, last k kept,
           resumable bit for bit), model.pt (the final model for the next chapter), tokenizer.model.

Run it:
    python 03_pretrain.py                               # CPU: tiny model, ~4 minutes; GPU: the gpu preset
    python 03_pretrain.py --steps 20 --eval-every 10    # a smoke test
    python 03_pretrain.py --resume                      # continue the run in --out
    torchrun --standalone --nproc_per_node=8 03_pretrain.py --preset gpu     # FSDP on 8 GPUs
    python 03_pretrain.py --data my_corpus/ --dataset tinystories            # your text / a public corpus
"""

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
Tokenizer, Transformer, ModelArgs = tok.Tokenizer, mdl.Transformer, mdl.ModelArgs

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    model: str = "tiny"  # a 02_model preset
    seq_len: int = 256
    batch_tokens: int = 4096  # global batch per optimizer step, in tokens (all ranks, all micro-steps)
    micro_batch: int = 16  # rows per forward pass on each process
    steps: int = 150
    lr: float = 2e-3  # peak; small models take larger rates (Llama 3 405B: 8e-5, 8B: 3e-4)
    min_lr_ratio: float = 0.01  # §3.4.1: cosine decay to 8e-7 from a peak of 8e-5, i.e. 1%
    warmup: int = 15  # §3.4.1: linear warmup (8,000 steps for 405B)
    # The paper does not state AdamW's betas, eps, weight decay or clipping for Llama 3; these are
    # Llama 2's (§2.2 of that paper): beta2 = 0.95, eps = 1e-5, weight decay 0.1, clip 1.0.
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_ramp: bool = False  # §3.4.1: 1/4 of the batch for the first 1.6% of steps, 1/2 until 18.4%
    doc_mask: bool = True  # §3.2 document mask inside packed rows
    dtype: str = "float32"  # float32 or bfloat16 (autocast, or FSDP's param dtype)
    compile: bool = False
    eval_every: int = 50
    eval_rows: int = 24  # validation rows per source
    sample_every: int = 75
    ckpt_every: int = 50
    keep_last: int = 2
    seed: int = 1337


TRAIN_PRESETS = {
    # 7 M parameters, 4,096 tokens per step: ~0.6 M tokens in about four minutes on 2 cores
    "cpu": TrainConfig(),
    # ~0.25 B parameters on one 80 GB GPU: 0.5M-token batches of 4K-token rows (16 micro-steps of 8
    # rows; 2 on 8 GPUs), bf16, compiled. 0.5 B tokens in all: the offline corpus has ~25 M, so this
    # repeats it ~20 times; pass --dataset fineweb-edu for web text.
    "gpu": TrainConfig(model="gpu", seq_len=4096, batch_tokens=524_288, micro_batch=8, steps=1000, lr=6e-4,
                       warmup=100, dtype="bfloat16", compile=True, eval_every=250, eval_rows=64, sample_every=500,
                       ckpt_every=500),
}


# -----------------------------------------------------------------------------
# Data: token shards on disk, rows packed from them, a mix over sources

SHARD_VERSION = 1


def _file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_shards(documents, tokenizer, folder, val_fraction=0.05):
    """Tokenize a stream of documents once into `folder`/{split}/{source}.bin (uint16 tokens when the
    vocabulary fits, else uint32) plus {source}.starts.npy, each document's first token offset.
    Documents go to validation by a hash of their name (01's is_held_out); a source that gets none
    gives the last 5% of its tokens. Nothing is held in memory but one document at a time."""
    dtype = np.uint16 if tokenizer.n_words <= 2**16 else np.uint32
    tmp = Path(str(folder) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files, starts, sizes = {}, {}, {}
    try:
        for doc in documents:
            split = "val" if tok.is_held_out(doc.name, val_fraction) else "train"
            key = (split, doc.source)
            if key not in files:
                (tmp / split).mkdir(parents=True, exist_ok=True)
                files[key], starts[key], sizes[key] = open(tmp / split / f"{doc.source}.bin", "wb"), [], 0
            ids = np.asarray(tokenizer.encode(doc.text, bos=True, eos=True), dtype=dtype)
            starts[key].append(sizes[key])
            sizes[key] += len(ids)
            files[key].write(ids.tobytes())
    finally:
        for f in files.values():
            f.close()
    if not files:
        raise ValueError("no documents to tokenize: the corpus is empty")
    for source in {s for _, s in files} - {s for split, s in files if split == "val"}:
        # Carve the last 5% of the source's tokens into validation, so every source has a val loss.
        train_path = tmp / "train" / f"{source}.bin"
        tokens = np.fromfile(train_path, dtype=dtype)
        cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
        (tmp / "val").mkdir(exist_ok=True)
        tokens[cut:].tofile(tmp / "val" / f"{source}.bin")
        tokens[:cut].tofile(train_path)
        train_starts = starts[("train", source)]
        starts[("val", source)] = [0] + [s - cut for s in train_starts if s > cut]
        starts[("train", source)] = [s for s in train_starts if s < cut]
        sizes[("val", source)], sizes[("train", source)] = len(tokens) - cut, cut
    for (split, source), offsets in starts.items():
        np.save(tmp / split / f"{source}.starts.npy", np.asarray(offsets, dtype=np.int64))
    return tmp, {f"{split}/{source}": n for (split, source), n in sorted(sizes.items())}


def prepare_shards(documents, tokenizer, tokenizer_path, folder, data_key, log=print):
    """Reuse `folder` if it was built from the same data with the same tokenizer, else (re)build it."""
    folder = Path(folder)
    wanted = {"version": SHARD_VERSION, "data": data_key, "tokenizer_sha256": _file_sha256(tokenizer_path)}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    t0 = time.time()
    log(f"tokenizing {data_key} into {folder} ...")
    tmp, sizes = build_shards(documents(), tokenizer, folder)
    meta = {**wanted, "tokens": sizes}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the finished shards appear at once, never half-written
    total = sum(sizes.values())
    log(f"  {total:,} tokens in {time.time() - t0:.1f} s: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    return meta


class TokenShards:
    """Memory-mapped tokens of one split, per source; rows are read straight from the page cache."""

    def __init__(self, folder, split):
        sizes = json.loads((Path(folder) / "meta.json").read_text())["tokens"]
        self.tokens, self.starts = {}, {}
        for path in sorted((Path(folder) / split).glob("*.bin")):
            n = sizes[f"{split}/{path.stem}"]
            dtype = np.uint16 if path.stat().st_size == 2 * n else np.uint32
            self.tokens[path.stem] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
            self.starts[path.stem] = np.load(path.with_name(f"{path.stem}.starts.npy"))
        self.sources = sorted(self.tokens)

    def sizes(self):
        return {s: len(t) for s, t in self.tokens.items()}

    def rows(self, source, offsets, length):
        """Windows of `length` tokens at `offsets` of one source: tokens (n, length) and the index of
        the document each token belongs to (n, length), for the document mask."""
        tokens = np.stack([self.tokens[source][o:o + length] for o in offsets]).astype(np.int64)
        positions = np.asarray(offsets)[:, None] + np.arange(length)[None, :]
        doc_ids = np.searchsorted(self.starts[source], positions, side="right") - 1
        return torch.from_numpy(tokens), torch.from_numpy(doc_ids)


def mix_weights(shards, mix=None):
    """Sampling weight per source: by default each source's share of the training tokens (the corpus
    as it is); `mix` = {source: weight} sets them (Llama 3 §3.1.2: ~50% general, 25% math and
    reasoning, 17% code, 8% multilingual). Issue #5 adds curation and a paper-like default here."""
    sizes = shards.sizes()
    if mix is None:
        weights = {s: float(n) for s, n in sizes.items()}
    else:
        unknown = set(mix) - set(sizes)
        if unknown:
            raise ValueError(f"--mix names unknown sources {sorted(unknown)}; the data has {sorted(sizes)}")
        weights = {s: float(mix.get(s, 0.0)) for s in sizes}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"--mix weights must be >= 0 and sum to something positive, got {mix}")
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def sample_batch(shards, weights, n_rows, length, rng):
    """`n_rows` windows of `length` tokens: each row's source drawn by `weights`, its start uniform."""
    sources = [s for s in shards.sources if weights.get(s, 0) > 0]
    picks = rng.choice(len(sources), size=n_rows, p=[weights[s] for s in sources])
    tokens = torch.empty(n_rows, length, dtype=torch.long)
    doc_ids = torch.empty(n_rows, length, dtype=torch.long)
    for i, source in enumerate(sources):
        rows = np.flatnonzero(picks == i)
        if len(rows):
            size = len(shards.tokens[source])
            if size < length:
                raise ValueError(f"source {source!r} has {size} tokens, fewer than one row of {length}: "
                                 f"lower --seq-len or give it more text")
            offsets = rng.integers(0, size - length + 1, size=len(rows))
            tokens[rows], doc_ids[rows] = shards.rows(source, offsets, length)
    return tokens, doc_ids


def batch_for_step(shards, weights, cfg, step, rank, world, rows):
    """The rows this rank trains on at `step`: a pure function of (seed, step), so a resumed run and
    an N-process run see exactly the rows of the uninterrupted single-process run."""
    rng = np.random.default_rng([cfg.seed, step])
    tokens, doc_ids = sample_batch(shards, weights, rows, cfg.seq_len + 1, rng)  # (rows, T+1)
    per_rank = rows // world
    return tokens[rank * per_rank:(rank + 1) * per_rank], doc_ids[rank * per_rank:(rank + 1) * per_rank]


# -----------------------------------------------------------------------------
# Public pretraining corpora, downloaded once (resumable) and cached

DATASETS = {
    "tinystories": {"base": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/",
                    "files": ["TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-train.txt"],
                    "about": "2.7 M short stories written by GPT-4 for 3-4 year olds (CDLA-Sharing-1.0), 2.2 GB"},
    "fineweb-edu": {"base": "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/",
                    "files": ["000_00000.parquet", "001_00000.parquet"],
                    "about": "educational web pages filtered by a Llama 3 70B-labelled classifier (ODC-By), "
                             "2 of the 10B-token sample's shards, ~4 GB; needs pyarrow"},
}


def download(url, dest, log=print):
    """Fetch `url` to `dest` over HTTP(S), resuming a broken download from `dest`.part with a Range
    request, showing progress. An existing `dest` is reused."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header: start over
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f:
            done, t0 = have, time.time()
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    rate = (done - have) / max(time.time() - t0, 1e-9) / 2**20
                    log(f"\r  {dest.name}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB ({rate:.1f} MiB/s)", end="")
        log("")
    if total and part.stat().st_size != total:
        raise IOError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def dataset_documents(name, cache, mirror=None, log=print):
    """Download a public corpus (once) into `cache` and return a function that streams its documents.
    `mirror` replaces the base URL (a local copy, or a test server)."""
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    log(f"dataset {name}: {spec['about']}")
    base = mirror.rstrip("/") + "/" if mirror else spec["base"]
    paths = [download(base + file, Path(cache) / name / file, log) for file in spec["files"]]

    def documents():
        for path in paths:
            if path.suffix == ".parquet":
                yield from tok.iter_documents(path)
                continue
            # TinyStories: stories separated by <|endoftext|> lines in one large text file
            story, index = [], 0
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip() == "<|endoftext|>":
                        if "".join(story).strip():
                            yield tok.Document(name, f"{name}/{path.stem}:{index}", "".join(story).strip())
                        story, index = [], index + 1
                    else:
                        story.append(line)
            if "".join(story).strip():
                yield tok.Document(name, f"{name}/{path.stem}:{index}", "".join(story).strip())
    return documents


# -----------------------------------------------------------------------------
# Optimizer, schedule, speed


def lr_at(step, cfg):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio · peak at the last step (§3.4.1)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_fraction_at(step, cfg):
    """§3.4.1's ramp, scaled to this run's length: 4M tokens for the first 252M of 15.6T (1.6%),
    8M until 2.87T (18.4%), then 16M, i.e. 1/4, 1/2, then the whole batch."""
    if not cfg.batch_ramp:
        return 1.0
    done = step / max(cfg.steps, 1)
    return 0.25 if done < 0.016 else 0.5 if done < 0.184 else 1.0


def make_optimizer(model, cfg, fused):
    """AdamW with decoupled weight decay on matrices only: norms' gains and the embedding are not
    decayed (a common choice; the paper does not say)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "tok_embeddings" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


# Dense bf16 peak of the cards MFU is usually quoted for (NVIDIA datasheets, SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(device, dtype):
    """FLOP/s that MFU divides by: the datasheet peak of a known GPU, else a measured matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# -----------------------------------------------------------------------------
# Checkpoints and distributed helpers


def full_state(model, optimizer):
    """Plain (unsharded, uncompiled) model and optimizer state dicts, keyed by parameter names, so a
    checkpoint written by N FSDP ranks loads in one process and vice versa."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state, optimizer_state):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def checkpoints(out):
    return sorted(Path(out).glob("ckpt_*.pt"))


def all_reduce_mean(values, world):
    """Average a list of floats over ranks (identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def pick_attention(device, cfg, log):
    """flex attention keeps the document mask on a fused kernel, but only on CUDA (on CPU it has no
    backward). If it fails here (an old GPU, no Triton), fall back to SDPA with a dense mask."""
    if device.type != "cuda" or not cfg.doc_mask:
        return "sdpa"
    try:
        probe = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=256,
                                      attn_impl="flex")).to(device)
        tokens = torch.randint(0, 64, (1, 256), device=device)
        probe(tokens, doc_ids=(torch.arange(256, device=device) // 100)[None]).sum().backward()
        return "flex"
    except Exception as e:  # noqa: BLE001 (any failure means: use the path that always works)
        log(f"note: flex attention unavailable here ({type(e).__name__}: {e}); using SDPA with a dense document mask")
        return "sdpa"


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch (is the CUDA build installed?)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available here")
    return name


# -----------------------------------------------------------------------------
# The command line and the training loop


MODEL_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                        help="training preset (default: gpu when CUDA is available, else cpu)")
    for f in fields(TrainConfig):  # every TrainConfig field is a flag: --seq-len 512, --no-doc-mask, ...
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=f"default: {getattr(TRAIN_PRESETS['cpu'], f.name)} (cpu preset)")
    for name in MODEL_FLAGS:  # change the model preset's shape: --dim 64 --n-layers 2
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    parser.add_argument("--data", default=None, help="your text: .txt/.md/.jsonl/.parquet file or folder")
    parser.add_argument("--dataset", default=None, choices=list(DATASETS), help="download a public corpus")
    parser.add_argument("--mirror", default=None, help="base URL to download --dataset files from instead")
    parser.add_argument("--mix", default=None, help="source weights, e.g. shakespeare=2,python_code=1")
    parser.add_argument("--tokenizer", default="runs/01_tokenizer/tokenizer.model",
                        help="tokenizer.model; trained with 01_tokenizer.py's defaults if missing")
    parser.add_argument("--out", default="runs/03_pretrain", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of this run, e.g. for time-limited jobs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # launched by torchrun
    device_name = pick_device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
        if device_name.startswith("cuda"):
            device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device_name)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(device_name)
    master = rank == 0

    def log(*a, **k):  # rank 0 speaks for everyone
        if master:
            print(*a, **k, flush=True)
    try:
        run(args, device, rank, world, log)
    finally:
        if distributed:
            dist.destroy_process_group()


def run(args, device, rank, world, log):
    out = Path(args.out)
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = replace(TRAIN_PRESETS[preset_name], **overrides)
    if device.type == "cpu" and cfg.dtype == "bfloat16":
        log("note: bf16 on a CPU without AMX/AVX-512 runs ~20x slower than fp32 here; --dtype float32 is faster")
    rows = cfg.batch_tokens // cfg.seq_len
    if cfg.batch_tokens % cfg.seq_len or rows % (world * cfg.micro_batch):
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of seq_len ({cfg.seq_len}) x "
                         f"micro_batch ({cfg.micro_batch}) x processes ({world}) = "
                         f"{cfg.seq_len * cfg.micro_batch * world}")

    # Refuse to overwrite a run: nothing saved is lost to a run started by mistake.
    existing = checkpoints(out)
    if existing and not args.resume:
        raise FileExistsError(f"{out} already holds checkpoints ({existing[-1].name}): pass --resume to continue "
                              f"that run, or --out to start a new one")
    if args.resume and not existing:
        raise FileNotFoundError(f"--resume: no ckpt_*.pt in {out}; start without --resume")

    # --- tokenizer and data ---
    tokenizer_path = Path(args.tokenizer)
    if not tokenizer_path.is_file():
        if args.tokenizer != "runs/01_tokenizer/tokenizer.model":
            raise FileNotFoundError(f"--tokenizer {tokenizer_path} not found")
        if rank == 0:
            log(f"no tokenizer at {tokenizer_path} yet: training one first (python 01_tokenizer.py) ...")
            tok.train_tokenizer(out=tokenizer_path.parent)
        if world > 1:
            dist.barrier()
    tokenizer = Tokenizer.load(tokenizer_path)
    if args.dataset:
        documents = dataset_documents(args.dataset, Path(args.out).parent / "datasets", args.mirror, log)
        data_key = f"dataset:{args.dataset}"
    else:
        if args.data is not None and not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        documents = lambda: tok.iter_documents(args.data)  # noqa: E731
        data_key = f"data:{Path(args.data).resolve()}" if args.data else f"default corpus (Python {sys.version_info[0]}.{sys.version_info[1]})"
    shard_dir = out / "data"
    if rank == 0:
        prepare_shards(documents, tokenizer, tokenizer_path, shard_dir, data_key, log)
    if world > 1:
        dist.barrier()
    train, val = TokenShards(shard_dir, "train"), TokenShards(shard_dir, "val")
    mix = None if args.mix is None else {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
    weights = mix_weights(train, mix)
    log("data mix: " + ", ".join(f"{s} {w:.1%}" for s, w in weights.items()))

    # --- model and optimizer ---
    torch.manual_seed(cfg.seed)
    shape = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    model_args = mdl.preset(cfg.model, vocab_size=tokenizer.n_words, max_seq_len=cfg.seq_len,
                            attn_impl=pick_attention(device, cfg, log), **shape)
    model = Transformer(model_args)  # every rank builds the same weights from the seed, then shards them
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        # §3.3.2: parameters in bf16 for compute, gradients reduced in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
        model.to(device)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    else:
        model.to(device)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" and world == 1
                else contextlib.nullcontext())
    if cfg.compile:
        model.compile()  # in place: the state dict keeps its plain names (no _orig_mod. prefix)

    start_step, log_mode = 0, "w"
    if args.resume:
        ckpt = torch.load(existing[-1], map_location="cpu", weights_only=True)
        if ckpt["args"] != asdict(model_args):
            diff = {k: (v, asdict(model_args).get(k)) for k, v in ckpt["args"].items() if asdict(model_args).get(k) != v}
            raise ValueError(f"{existing[-1]} was trained with another model config (checkpoint vs now): {diff}")
        for key in ("seq_len", "batch_tokens", "seed"):
            if ckpt["config"][key] != getattr(cfg, key):
                raise ValueError(f"{existing[-1]} used {key}={ckpt['config'][key]}, this run {getattr(cfg, key)}: "
                                 f"resuming would not continue the same data stream")
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_step, log_mode = ckpt["step"], "a"
        log(f"resumed from {existing[-1]} at step {start_step}")
        del ckpt

    # --- run ---
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    log_file = open(out / "log.jsonl", log_mode) if rank == 0 else None
    if rank == 0 and log_mode == "w":
        log_file.write(json.dumps({"config": asdict(cfg), "model": asdict(model_args), "params": n_params,
                                   "world": world, "device": str(device)}) + "\n")
    flops_per_token = mdl.flops_per_token(model_args, cfg.seq_len)
    peak = peak_flops(device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    log(f"model {cfg.model}: {n_params / 1e6:.1f} M parameters | {world} process(es) on {device} | {cfg.dtype} | "
        f"batch {cfg.batch_tokens:,} tokens = {rows} rows x {cfg.seq_len} | {cfg.steps} steps")

    stop_requested = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True)) \
        if rank == 0 and world == 1 else None

    def write(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def save(step):
        model_state, optimizer_state = full_state(model, optimizer)
        if rank == 0:
            path = out / f"ckpt_{step:06d}.pt"
            mdl.atomic_save({"model": model_state, "optimizer": optimizer_state, "args": asdict(model_args),
                             "config": asdict(cfg), "step": step, "rng": torch.get_rng_state()}, path)
            for old in checkpoints(out)[:-cfg.keep_last]:
                old.unlink()
            log(f"saved {path}")

    def evaluate():
        """Mean loss per validation source on fixed rows (the same rows at every evaluation)."""
        model.eval()
        losses = {}
        with torch.no_grad():
            for source in val.sources:
                rng = np.random.default_rng([cfg.seed, 10**9])  # the same rows every time
                tokens, doc_ids = sample_batch(val, {source: 1.0}, cfg.eval_rows, cfg.seq_len + 1, rng)
                mine = slice(rank * cfg.eval_rows // world, (rank + 1) * cfg.eval_rows // world)
                tokens, doc_ids = tokens[mine].to(device), doc_ids[mine].to(device)
                with autocast:
                    logits = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1] if cfg.doc_mask else None)
                losses[source] = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        model.train()
        return dict(zip(losses, all_reduce_mean(list(losses.values()), world)))

    def sample():
        model.eval()
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        prompt = tokenizer.encode("\n", bos=True)
        # Generation changes shapes at every token: run it eagerly rather than recompile each time.
        with torch.compiler.set_stance("force_eager"):
            ids = mdl.generate(model, [prompt], max_new_tokens=min(64, cfg.seq_len - len(prompt)), temperature=0.8,
                               top_p=0.95, stop_tokens=tokenizer.stop_tokens, generator=generator)[0]
        model.train()
        return tokenizer.decode(ids)

    model.train()
    t_run, tokens_seen, last_loss = time.time(), 0, float("nan")
    steps_this_run = 0
    for step in range(start_step, cfg.steps + 1):
        last = step == cfg.steps
        if step % cfg.eval_every == 0 or last:
            val_losses = evaluate()
            log(f"step {step}: val " + " | ".join(f"{s} {v:.3f}" for s, v in val_losses.items()))
            write({"step": step, "val": val_losses})
        if (step % cfg.sample_every == 0 and step > 0) or last:
            text = sample()
            log(f"sample: {text!r}")
            write({"step": step, "sample": text})
        stopping = bool(stop_requested) or (args.stop_after is not None and steps_this_run >= args.stop_after)
        if step > start_step and (step % cfg.ckpt_every == 0 or last or stopping):
            save(step)
        if last or stopping:
            break

        # --- one optimizer step: micro-batches, clip, lr, update ---
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, doc_ids = batch_for_step(train, weights, cfg, step, rank, world, rows)  # (rows/world, T+1)
        n_micro = max(1, round(len(tokens) // cfg.micro_batch * batch_fraction_at(step, cfg)))
        loss_sum = 0.0
        for micro in range(n_micro):
            x = tokens[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch].to(device, non_blocking=True)
            d = doc_ids[micro * cfg.micro_batch:(micro + 1) * cfg.micro_batch].to(device, non_blocking=True)
            if world > 1:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(micro == n_micro - 1)
            with autocast:
                logits = model(x[:, :-1], doc_ids=d[:, :-1] if cfg.doc_mask else None)  # (b, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / n_micro
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        loss_value, = all_reduce_mean([loss_sum], world)
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            kept = checkpoints(out)
            raise FloatingPointError(f"step {step}: loss {loss_value}, grad norm {grad_norm}: training diverged "
                                     f"(try a lower --lr). The last good checkpoint is kept: "
                                     f"{kept[-1] if kept else 'none yet'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

        dt = time.time() - t0
        step_tokens = n_micro * cfg.micro_batch * cfg.seq_len * world
        tokens_seen += step_tokens
        steps_this_run += 1
        tps = step_tokens / dt
        mfu = tps * flops_per_token / (peak * world)
        eta = (time.time() - t_run) / steps_this_run * (cfg.steps - step - 1)
        last_loss = loss_value
        log(f"step {step + 1:>5}/{cfg.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_norm:5.2f} | "
            f"{dt * 1000:6.0f} ms | {tps:7,.0f} tok/s | MFU {mfu:5.1%} | ETA {eta / 60:4.1f} min")
        write({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000,
               "tokens_per_s": tps, "mfu": mfu, "tokens": step_tokens})

    if previous_handler is not None:
        signal.signal(signal.SIGINT, previous_handler)
    if log_file:
        log_file.close()
    finished = step == cfg.steps
    model_state, _ = full_state(model, optimizer) if finished else (None, None)
    if rank == 0:
        plot_losses(out / "log.jsonl", out / "loss.png")
        if finished:
            mdl.atomic_save({"model": model_state, "args": asdict(model_args), "step": step}, out / "model.pt")
            records = [json.loads(line) for line in open(out / "log.jsonl")]
            steps = [r for r in records if "loss" in r]
            vals = [r for r in records if "val" in r]
            metrics = {"steps": cfg.steps, "params": n_params, "final_train_loss": last_loss,
                       "val_loss": vals[-1]["val"] if vals else {},
                       "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps])) if steps else None,
                       "mfu": float(np.median([r["mfu"] for r in steps])) if steps else None,
                       "device": str(device), "world": world}
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log(f"done: {out / 'model.pt'}, {out / 'loss.png'}, {out / 'metrics.json'}")
        else:
            log(f"stopped at step {step}; continue with: python 03_pretrain.py --resume --out {out}")


def plot_losses(log_path, png_path):
    """Training loss per step and validation loss per source, from a log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(log_path)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", color="black", lw=1)
    sources = sorted({s for r in records if "val" in r for s in r["val"]})
    for source in sources:
        points = [(r["step"], r["val"][source]) for r in records if "val" in r and source in r["val"]]
        ax.plot(*zip(*points), marker="o", label=f"val: {source}")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
