"""03_pretrain.py: schedule and data by hand, resume equals an uninterrupted run, 2-process FSDP
equals one process, downloads from a local server, and bad input."""
import http.server
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference

pre = importlib.import_module("03_pretrain")
tok = importlib.import_module("01_tokenizer")
ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the king and queen of denmark speak of love and death while python functions return "
         "values to their callers and lists hold items in order").split()


def write_corpus(folder, n_docs=12, sources=("prose", "code"), words_per_doc=300):
    rng = np.random.default_rng(0)
    for source in sources:
        (folder / source).mkdir(parents=True, exist_ok=True)
        for i in range(n_docs):
            words = rng.choice(WORDS, size=words_per_doc)
            (folder / source / f"doc{i}.txt").write_text(f"{source} {i}: " + " ".join(words) + ".\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small two-source corpus and a 600-id tokenizer trained on it."""
    folder = tmp_path_factory.mktemp("pretrain")
    data = write_corpus(folder / "data")
    tokenizer = tok.Tokenizer.train([d.text for d in tok.load_corpus(str(data))], vocab_size=600)
    tokenizer.save(folder / "tokenizer.model")
    return folder


def tiny_argv(setup, out, *extra):
    return ["--data", str(setup / "data"), "--tokenizer", str(setup / "tokenizer.model"), "--out", str(out),
            "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--multiple-of", "32",
            "--seq-len", "32", "--batch-tokens", "256", "--micro-batch", "4", "--steps", "8", "--warmup", "2",
            "--lr", "3e-3", "--eval-every", "4", "--eval-rows", "4", "--sample-every", "4", "--ckpt-every", "4",
            "--device", "cpu", "--no-curation", *extra]


def losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]


# --- schedule ------------------------------------------------------------------------------------

def test_lr_warmup_cosine_to_one_percent():
    cfg = pre.TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.01)
    assert pre.lr_at(0, cfg) == pytest.approx(0.1) and pre.lr_at(9, cfg) == pytest.approx(1.0)
    assert pre.lr_at(10, cfg) == pytest.approx(1.0)
    assert pre.lr_at(59.5, cfg) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the decay: cos = 0
    assert pre.lr_at(109, cfg) == pytest.approx(0.01)  # the last step trains at 1% of the peak (§3.4.1)
    lrs = [pre.lr_at(s, cfg) for s in range(10, 110)]
    assert lrs == sorted(lrs, reverse=True)


def test_batch_ramp_follows_the_paper_proportions():
    cfg = pre.TrainConfig(steps=1000, batch_ramp=True)
    assert [pre.batch_fraction_at(s, cfg) for s in (0, 15, 16, 183, 184, 999)] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert pre.batch_fraction_at(0, replace(cfg, batch_ramp=False)) == 1.0


# --- data ----------------------------------------------------------------------------------------

def test_shards_hold_each_document_between_bos_and_eos(setup, tmp_path):
    tokenizer = tok.Tokenizer.load(setup / "tokenizer.model")
    docs = list(tok.iter_documents(str(setup / "data")))
    meta = pre.prepare_shards(lambda: iter(docs), tokenizer, setup / "tokenizer.model", tmp_path / "shards", "test")
    train = pre.TokenShards(tmp_path / "shards", "train")
    val = pre.TokenShards(tmp_path / "shards", "val")
    assert train.sources == val.sources == ["code", "prose"]
    for source in ("code", "prose"):
        expected_train = [d for d in docs if d.source == source and not tok.is_held_out(d.name)]
        stream = np.concatenate([tokenizer.encode(d.text, bos=True, eos=True) for d in expected_train])
        n_train = len(train.tokens[source])
        if len(expected_train) == sum(d.source == source for d in docs):  # no held-out doc: tail carved off
            assert np.array_equal(np.concatenate([train.tokens[source], val.tokens[source]]), stream)
        else:
            assert np.array_equal(train.tokens[source], stream)
        starts = train.starts[source]
        assert all(train.tokens[source][s] == tokenizer.bos_id for s in starts if s < n_train)
    assert meta["tokens"]["train/prose"] == len(train.tokens["prose"])
    assert train.tokens["prose"].dtype == np.uint16  # 600 ids fit in 16 bits
    # a second call reuses the shards
    assert pre.prepare_shards(lambda: iter(()), tokenizer, setup / "tokenizer.model", tmp_path / "shards", "test") == meta


def test_rows_and_document_ids_by_hand(tmp_path):
    (tmp_path / "train").mkdir()
    np.arange(100, 120, dtype=np.uint16).tofile(tmp_path / "train" / "s.bin")  # three documents: 0-6, 7-14, 15-19
    np.save(tmp_path / "train" / "s.starts.npy", np.array([0, 7, 15]))
    (tmp_path / "meta.json").write_text(json.dumps({"tokens": {"train/s": 20}}))
    shards = pre.TokenShards(tmp_path, "train")
    tokens, doc_ids = shards.rows("s", [5, 13], 4)
    assert tokens.tolist() == [[105, 106, 107, 108], [113, 114, 115, 116]]
    assert doc_ids.tolist() == [[0, 0, 1, 1], [1, 1, 2, 2]]


def hand_made_shards(folder, sizes):
    """Source i holds `sizes[i]` copies of token i, so every row shows which source it came from."""
    (folder / "train").mkdir(parents=True)
    for i, (source, n) in enumerate(sizes.items()):
        np.full(n, i, dtype=np.uint16).tofile(folder / "train" / f"{source}.bin")
        np.save(folder / "train" / f"{source}.starts.npy", np.array([0]))
    (folder / "meta.json").write_text(json.dumps({"tokens": {f"train/{s}": n for s, n in sizes.items()}}))
    return pre.TokenShards(folder, "train")


def test_mix_weights_give_the_requested_proportions(tmp_path):
    shards = hand_made_shards(tmp_path, {"code": 1000, "prose": 3000})
    assert pre.mix_weights(shards, "natural") == {"code": 0.25, "prose": 0.75}  # by size
    # the paper's shares (general 50, math 25, code 17, multilingual 8) over the categories present
    assert pre.mix_weights(shards, "paper") == pytest.approx({"code": 17 / 67, "prose": 50 / 67})
    weights = pre.mix_weights(shards, {"code": 2, "prose": 1})
    assert weights == pytest.approx({"code": 2 / 3, "prose": 1 / 3})
    tokens, _ = pre.sample_batch(shards, weights, 4000, 8, np.random.default_rng(0))
    code_share = (tokens[:, 0] == 0).float().mean().item()
    assert abs(code_share - 2 / 3) < 0.022  # binomial sd 0.0075: 3 sd
    with pytest.raises(tok.UserError, match="unknown sources"):
        pre.mix_weights(shards, {"poetry": 1})
    with pytest.raises(tok.UserError, match="sum to something positive"):
        pre.mix_weights(shards, {"prose": 0, "code": 0})
    with pytest.raises(tok.UserError, match="fewer than one row"):
        pre.sample_batch(shards, weights, 4, 2000, np.random.default_rng(0))


def test_the_paper_mix_gives_the_two_translations_its_multilingual_8_percent(tmp_path):
    shards = hand_made_shards(tmp_path, {"bible": 4000, "python_code": 2000, "synthetic_math": 1000,
                                         "ukrainian": 1000, "chichewa": 3000})
    assert pre.mix_weights(shards, "paper") == pytest.approx(
        {"bible": 0.50, "python_code": 0.17, "synthetic_math": 0.25, "ukrainian": 0.02, "chichewa": 0.06})


def test_data_fingerprint_changes_when_a_file_changes(tmp_path):
    data = tmp_path / "data"
    (data / "poems").mkdir(parents=True)
    (data / "poems" / "a.txt").write_text("one\n")
    first = tok.data_fingerprint(data)
    assert tok.data_fingerprint(data) == first
    (data / "poems" / "a.txt").write_text("one, edited\n")  # the cached shards of --data are stale now
    edited = tok.data_fingerprint(data)
    (data / "poems" / "b.md").write_text("two\n")
    added = tok.data_fingerprint(data)
    (data / "notes.bin").write_bytes(b"\0")  # not a text file: not read, so not part of the key
    assert len({first, edited, added}) == 3 and tok.data_fingerprint(data) == added
    assert tok.data_fingerprint(data / "poems" / "a.txt") != tok.data_fingerprint(data / "poems" / "b.md")


def test_each_rank_takes_its_slice_of_the_global_batch(setup, tmp_path):
    tokenizer = tok.Tokenizer.load(setup / "tokenizer.model")
    pre.prepare_shards(lambda: tok.iter_documents(str(setup / "data")), tokenizer, setup / "tokenizer.model",
                       tmp_path / "s", "x")
    shards = pre.TokenShards(tmp_path / "s", "train")
    cfg = pre.TrainConfig(seq_len=16)
    weights = pre.mix_weights(shards)
    whole, _ = pre.batch_for_step(shards, weights, cfg, 3, 0, 1, 8)
    parts = [pre.batch_for_step(shards, weights, cfg, 3, r, 2, 8)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(pre.batch_for_step(shards, weights, cfg, 4, 0, 1, 8)[0], whole)


# --- the training step ----------------------------------------------------------------------------

def tiny_model(seed=0):
    torch.manual_seed(seed)
    mdl = importlib.import_module("02_model")
    return mdl.Transformer(mdl.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                         multiple_of=16, max_seq_len=32))


def test_a_packed_row_trains_exactly_like_its_documents_run_separately():
    """The document mask, through the training step and the loss the loop uses: one row packing two
    documents gives the mean loss, and the weights after an AdamW step, of the two documents run on
    their own (the first with the second's BOS as its last target, which it predicts from its own
    tokens only). Without the mask the second document would see the first."""
    doc1, doc2 = [1, 5, 6, 7, 8, 2], [1, 9, 10, 11, 2]
    packed = (torch.tensor([doc1 + doc2]), torch.tensor([[0] * 6 + [1] * 5]))
    alone = [(torch.tensor([doc1 + [1]]), torch.zeros(1, 7, dtype=torch.long)),
             (torch.tensor([doc2]), torch.zeros(1, 5, dtype=torch.long))]
    loss_fn = pre.pretraining_loss(pre.TrainConfig())
    results = []
    for micro_batches in ([packed], alone):
        model = tiny_model()
        optimizer = pre.make_optimizer(model, lr=1e-2)
        loss, _ = pre.train_step(model, optimizer, micro_batches, loss_fn, lr=1e-2)
        results.append((loss, model.state_dict()))
    (packed_loss, packed_state), (alone_loss, alone_state) = results
    assert abs(packed_loss - alone_loss) < 1e-6
    assert all(torch.allclose(packed_state[k], alone_state[k], atol=1e-6) for k in packed_state)
    no_mask = pre.pretraining_loss(pre.TrainConfig(doc_mask=False))
    assert abs(pre.train_step(tiny_model(), pre.make_optimizer(tiny_model(), 1e-2), [packed], no_mask, 1e-2)[0]
               - packed_loss) > 1e-4  # (the test can tell: without the mask the loss differs)


def test_train_step_is_adamw_on_clipped_gradients_with_decay_on_matrices_only():
    """Against torch's own pieces: the mean next-token loss over the whole batch, its gradients
    clipped to a global norm of 0.05 (far below their norm, so clipping acts), then AdamW with
    weight decay on the weight matrices but not on the norms' gains or the embedding."""
    tokens = torch.randint(3, 50, (4, 17))
    doc_ids = torch.zeros(4, 17, dtype=torch.long)
    model = tiny_model()
    optimizer = pre.make_optimizer(model, lr=3e-2, weight_decay=0.5)
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in optimizer.param_groups[0]["params"])}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and n != "tok_embeddings.weight"}
    loss, grad_norm = pre.train_step(model, optimizer, [(tokens[:3], doc_ids[:3]), (tokens[3:], doc_ids[3:])],
                                     pre.pretraining_loss(pre.TrainConfig()), lr=3e-2, grad_clip=0.05)
    reference = tiny_model()
    logits = reference(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
    expected_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    expected_loss.backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item()
    groups = [{"params": [p for n, p in reference.named_parameters() if n in decayed], "weight_decay": 0.5},
              {"params": [p for n, p in reference.named_parameters() if n not in decayed], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=3e-2, betas=(0.9, 0.95), eps=1e-5).step()
    assert abs(loss - expected_loss.item()) < 1e-6 and abs(grad_norm - expected_norm) < 1e-5 and grad_norm > 0.5
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name


# --- training runs -------------------------------------------------------------------------------

def test_training_writes_logs_plot_checkpoints_and_loss_falls(setup, tmp_path, capsys):
    out = tmp_path / "run"
    pre.main(tiny_argv(setup, out, "--steps", "30", "--eval-every", "10", "--keep-last", "2", "--ckpt-every", "10"))
    trace = losses(out)
    assert len(trace) == 30 and np.mean(trace[-5:]) < np.mean(trace[:5]) - 1.0
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_000020.pt", "ckpt_000030.pt"]  # last 2 kept
    assert (out / "loss.png").stat().st_size > 1000 and (out / "tokenizer.model").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val_loss"]) == {"prose", "code"} and metrics["final_train_loss"] == trace[-1]
    model, args = importlib.import_module("02_model").load_checkpoint(out)  # the next chapter's input
    assert args.dim == 64 and args.vocab_size == 600
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("step    30/30"))
    for field in ("loss", "lr", "grad", "ms", "tok/s", "MFU", "ETA"):
        assert field in line


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(setup, tmp_path):
    pre.main(tiny_argv(setup, tmp_path / "straight"))
    pre.main(tiny_argv(setup, tmp_path / "split", "--stop-after", "3"))
    assert len(losses(tmp_path / "split")) == 3 and not (tmp_path / "split" / "model.pt").exists()
    pre.main(tiny_argv(setup, tmp_path / "split", "--resume"))
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # bit for bit on CPU


def clean_records(out):
    """log.jsonl's records without what differs between two identical runs (timings): a resumed run
    must repeat an uninterrupted one's exactly, each step once."""
    header, *records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert "config" in header
    return [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s", "mfu")} for r in records]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    pre.main(tiny_argv(setup, out))
    return clean_records(out)


def kill_when(argv, cwd, pattern):
    """Run 03 as a real process and SIGKILL it when a line of its output matches `pattern`."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "03_pretrain.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=cwd)
    for line in proc.stdout:
        if re.search(pattern, line):
            proc.kill()
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {pattern!r}"


@pytest.mark.parametrize("moment", [r"^step +2/", r"^sample:", r"^step +7/"])
def test_sigkill_at_any_moment_then_resume_gives_one_clean_run(setup, tmp_path, straight, moment):
    """kill -9 before the first checkpoint, around the first one (the sample is logged just before
    it is written) and after it: --resume then repeats the uninterrupted run's records exactly (losses,
    validation, samples), each step once, nothing of the lost steps left behind."""
    out = tmp_path / "run"
    kill_when(tiny_argv(setup, out), tmp_path, moment)
    pre.main(tiny_argv(setup, out, "--resume"))
    assert clean_records(out) == straight


def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(setup, tmp_path, straight, capsys):
    out = tmp_path / "run"
    pre.main(tiny_argv(setup, out))
    newest = sorted(out.glob("ckpt_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    pre.main(tiny_argv(setup, out, "--resume"))
    said = capsys.readouterr().out
    assert f"{newest} cannot be loaded" in said and "resumed from" in said and "ckpt_000004.pt at step 4" in said
    assert clean_records(out) == straight


def test_checkpoints_are_written_durably(tmp_path, monkeypatch):
    """atomic_write fsyncs the file before the rename and the folder after it."""
    synced, order = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("rename"), real_replace(a, b)))
    importlib.import_module("02_model").atomic_save({"x": torch.ones(2)}, tmp_path / "c.pt")
    assert order == ["fsync", "rename", "fsync"]
    import stat
    assert stat.S_ISREG(synced[0]) and stat.S_ISDIR(synced[1])
    assert torch.load(tmp_path / "c.pt", weights_only=True)["x"].sum() == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]


def _fsdp_worker(rank, world, rendezvous, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a file rendezvous: no port to pick, so no race with other processes for a free one
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    pre.main(argv)


def test_two_process_fsdp_matches_one_process(setup, tmp_path):
    """Same global batch (8 rows: 4 per rank, one micro-batch each, vs 2 micro-batches in one
    process). Tolerance 1e-5: the ranks' gradients are summed in a different order (fp32 rounding at
    ~1e-7, growing slightly over 8 AdamW steps); a sharding or data bug moves losses by ~1e-2."""
    single = tmp_path / "single"
    pre.main(tiny_argv(setup, single))
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, tmp_path / "rendezvous", tiny_argv(setup, tmp_path / "fsdp")),
                                nprocs=2)
    a, b = losses(single), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    header = json.loads(open(tmp_path / "fsdp" / "log.jsonl").readline())
    assert header["world"] == 2
    # the FSDP checkpoint is a plain state dict that one process loads and resumes from
    model, _ = importlib.import_module("02_model").load_checkpoint(tmp_path / "fsdp")
    pre.main(tiny_argv(setup, tmp_path / "fsdp", "--resume", "--steps", "10"))
    assert len(losses(tmp_path / "fsdp")) == 10


def test_the_readmes_torchrun_command_on_cpu_trains_and_stops_together_on_ctrl_c(setup, tmp_path):
    """`torchrun --nproc_per_node=2 03_pretrain.py --device cpu`, as the README writes it, with a
    small corpus and a long --steps: the default batch divides between the two processes (the
    micro-batch follows the rows each gets), it trains, and Ctrl-C (SIGINT to the whole process
    group, as a terminal sends it) stops both ranks at the same step, with one checkpoint."""
    out = tmp_path / "run"
    data = write_corpus(tmp_path / "data", words_per_doc=1500)  # held-out text for rows of 256 tokens
    argv = ["--device", "cpu", "--data", str(data), "--tokenizer", str(setup / "tokenizer.model"),
            "--out", str(out), "--no-curation", "--steps", "100000", "--eval-every", "100000",
            "--sample-every", "100000", "--ckpt-every", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "03_pretrain.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("step     2/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    said = "".join(said) + proc.communicate(timeout=180)[0]
    # (torchrun itself re-raises the signal and exits non-zero; what matters is what the workers did)
    saved = list(out.glob("ckpt_*.pt"))
    assert len(saved) == 1 and f"stopped at step {int(saved[0].stem[5:])}; continue with" in said, said[-3000:]
    assert json.loads(open(out / "log.jsonl").readline())["config"]["micro_batch"] == 8  # 16 rows / 2 processes


@pytest.mark.slow
def test_compiled_training_matches_eager(setup, tmp_path):
    """torch.compile (45-80 s cold on CPU): the same losses as eager to float tolerance, and the
    checkpoint keeps plain parameter names."""
    pre.main(tiny_argv(setup, tmp_path / "eager", "--steps", "3"))
    pre.main(tiny_argv(setup, tmp_path / "compiled", "--steps", "3", "--compile"))
    assert np.allclose(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), atol=1e-4)
    state = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod") for k in state)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(setup, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "03_pretrain.py"), *tiny_argv(setup, out, "--steps", "100000",
                            "--ckpt-every", "100000", "--eval-every", "100000", "--sample-every", "100000")],
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("step     3/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0
    assert "--resume" in rest and len(list(out.glob("ckpt_*.pt"))) == 1


def test_divergence_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="diverged"):
        pre.main(tiny_argv(setup, out, "--lr", "1e30", "--warmup", "1", "--ckpt-every", "1", "--steps", "50"))
    kept = sorted(out.glob("ckpt_*.pt"))
    assert kept and not (out / "model.pt").exists()
    assert all(torch.isfinite(v).all() for v in torch.load(kept[-1], weights_only=True)["model"].values())


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_gets_clear_errors(setup, tmp_path):
    with pytest.raises(tok.UserError, match="no such file"):
        pre.main(tiny_argv(setup, tmp_path / "a", "--data", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(tok.UserError, match="empty"):
        pre.main(tiny_argv(setup, tmp_path / "b", "--data", str(tmp_path / "empty")))
    with pytest.raises(tok.UserError, match="must be a multiple of"):
        pre.main(tiny_argv(setup, tmp_path / "c", "--batch-tokens", "200"))
    with pytest.raises(tok.UserError, match="not supported"):
        pre.main(tiny_argv(setup, tmp_path / "d", "--device", "tpu"))
    with pytest.raises(tok.UserError, match="no ckpt"):
        pre.main(tiny_argv(setup, tmp_path / "e", "--resume"))


def test_resuming_with_another_config_is_refused_and_nothing_is_overwritten(setup, tmp_path):
    out = tmp_path / "run"
    pre.main(tiny_argv(setup, out, "--steps", "4"))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    with pytest.raises(tok.UserError, match="--resume"):
        pre.main(tiny_argv(setup, out, "--steps", "4"))
    with pytest.raises(tok.UserError, match="another model config"):
        pre.main(tiny_argv(setup, out, "--resume", "--dim", "32"))
    with pytest.raises(tok.UserError, match="seq_len"):
        pre.main(tiny_argv(setup, out, "--resume", "--seq-len", "16", "--batch-tokens", "128"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == before


# --- downloads -------------------------------------------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and honours 'Range: bytes=N-' (resumed downloads); records what it was asked."""
    requests = []

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_download_resumes_a_broken_transfer(server, tmp_path):
    root, url = server
    payload = os.urandom(300_000)
    (root / "big.bin").write_bytes(payload)
    dest = tmp_path / "cache" / "big.bin"
    dest.parent.mkdir()
    (tmp_path / "cache" / "big.bin.part").write_bytes(payload[:123_456])  # an earlier, broken download
    tok.download(url + "big.bin", dest, log=lambda *a, **k: None)
    assert dest.read_bytes() == payload and not (tmp_path / "cache" / "big.bin.part").exists()
    assert RangeHandler.requests == [("/big.bin", "bytes=123456-")]
    tok.download(url + "big.bin", dest, log=lambda *a, **k: None)  # cached: no second request
    assert len(RangeHandler.requests) == 1


def test_tinystories_download_parse_and_train(server, setup, tmp_path):
    root, url = server
    stories = [f"Once upon a time, story {i} had a {w} and a {w}." for i, w in enumerate(WORDS * 3)]
    for name in tok.DATASETS["tinystories"]["files"]:
        (root / name).write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    docs = list(tok.dataset_documents("tinystories", tmp_path / "cache", url, log=lambda *a, **k: None)())
    assert [d.text for d in docs[:len(stories)]] == stories and {d.source for d in docs} == {"tinystories"}
    argv = tiny_argv(setup, tmp_path / "run", "--steps", "2", "--dataset", "tinystories", "--mirror", url)
    argv.remove("--data"), argv.remove(str(setup / "data"))
    pre.main(argv)
    assert (tmp_path / "run" / "model.pt").is_file()
    with pytest.raises(tok.UserError, match="unknown --dataset"):
        tok.dataset_documents("c4", tmp_path, url)


def test_parquet_documents(tmp_path):
    pa = reference("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first page", "second page"], "url": ["a", "b"]}), tmp_path / "web.parquet")
    docs = tok.load_corpus(str(tmp_path / "web.parquet"))
    assert [(d.source, d.text) for d in docs] == [("web", "first page"), ("web", "second page")]
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(tok.UserError, match='no "text" column'):
        tok.load_corpus(str(tmp_path / "bad.parquet"))
