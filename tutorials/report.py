"""The results report: runs the stages in order with their CPU defaults (each as `python NN_name.py` would;
08 with --ppo, so that PPO stands beside DPO), then writes runs/REPORT.md with every stage's headline
numbers and plots, laid out like the paper's result tables at our scale, the wall time of each stage
and the machine.

    python tutorials/report.py                    # run what is missing or out of date, then write the report
    python tutorials/report.py --rerun 07_sft     # run 07 again (and so everything after it)
    python tutorials/report.py --rerun all        # everything again
    python tutorials/report.py --report-only      # just write REPORT.md from what runs/ holds

A stage is up to date when its script's text is the one it last ran (recorded in runs/times.json; else,
when its metrics.json is newer than its script) and its metrics.json is newer than the outputs of the
stages it reads; a stage run again keeps its previous folder as NN_name.previous. A stage interrupted in
a chapter that resumes (03, 04, 05) is resumed. The budgets below are the course's (60 minutes on 2 CPU
cores in all); the report says which stage went over.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    name: str  # the chapter's file name without .py, and its folder under runs/
    reads: tuple  # the stages whose outputs it reads
    budget_min: float  # the course's budget on 2 CPU cores
    resumes: bool  # takes --resume after an interruption

    def argv(self, runs):
        """The chapter's own flags for where it reads and writes (and 08's --ppo); the rest stays at its defaults."""
        paths = {"01_tokenizer": [], "03_pretrain": ["--tokenizer", runs / "01_tokenizer" / "tokenizer.model"],
                 "04_long_context": ["--init", runs / "03_pretrain"],
                 "05_anneal": ["--init", runs / "04_long_context", "--data-dir", runs / "03_pretrain" / "data"],
                 "06_reward_model": ["--init", runs / "05_anneal"],
                 "07_sft": ["--init", runs / "05_anneal", "--reward-model", runs / "06_reward_model"],
                 "08_dpo": ["--init", runs / "07_sft", "--reward-model", runs / "06_reward_model", "--ppo"],
                 "09_tools": ["--init", runs / "08_dpo"]}[self.name]
        return [str(a) for a in [*paths, "--out", runs / self.name]]


STAGES = [Stage("01_tokenizer", (), 0.5, False), Stage("03_pretrain", ("01_tokenizer",), 5, True),
          Stage("04_long_context", ("03_pretrain",), 6, True), Stage("05_anneal", ("04_long_context",), 3.5, True),
          Stage("06_reward_model", ("05_anneal",), 5, False),
          Stage("07_sft", ("05_anneal", "06_reward_model"), 12, False),
          Stage("08_dpo", ("07_sft", "06_reward_model"), 12, False), Stage("09_tools", ("08_dpo",), 12, False)]


# -----------------------------------------------------------------------------
# Running the stages


def script_sha256(stage, root=ROOT):
    path = root / f"{stage.name}.py"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def out_of_date(stage, runs, root=ROOT, ran_sha256=None):
    """Why `stage` must run ("" when its outputs are up to date). Its script counts as changed when its
    text differs from the one that made the outputs (`ran_sha256`, kept in times.json), so a touched
    or re-checked-out file does not rerun a 40-minute chain; without a recorded hash, by modification time."""
    metrics = runs / stage.name / "metrics.json"
    if not metrics.is_file():
        return "not run yet"
    script = root / f"{stage.name}.py"
    if ran_sha256 is not None and script.is_file():
        changed = ran_sha256 != script_sha256(stage, root)
    else:
        changed = script.is_file() and script.stat().st_mtime > metrics.stat().st_mtime
    if changed:
        return f"{script.name} changed since"
    newer = [s for s in stage.reads if (runs / s / "metrics.json").is_file()
             and (runs / s / "metrics.json").stat().st_mtime > metrics.stat().st_mtime]
    return f"{newer[0]} changed since" if newer else ""


def run_stage(stage, runs, log=print, python=sys.executable, root=ROOT):
    """Runs one chapter as its own process, its output shown and kept in runs/NAME.log; returns seconds."""
    folder = runs / stage.name
    argv = stage.argv(runs)
    if stage.resumes and (folder / "ckpt.pt").is_file() and not (folder / "metrics.json").is_file():
        argv.append("--resume")  # an interrupted run of a chapter that resumes: go on from its checkpoint
    elif folder.exists():
        previous = folder.with_name(folder.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)  # nothing is lost: the last run stays beside the new one
        log(f"  (the previous {stage.name} is kept in {previous})")
    log(f"$ python {stage.name}.py {' '.join(argv)}")
    start = time.time()
    with open(runs / f"{stage.name}.log", "a") as transcript:
        process = subprocess.Popen([python, "-u", str(root / f"{stage.name}.py"), *argv], cwd=root, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            transcript.write(line)
            log(line.rstrip("\n"))
    if process.wait():
        raise SystemExit(f"error: {stage.name} failed (exit status {process.returncode}); its output is in "
                         f"{runs / (stage.name + '.log')}. Fix it, then run the report again: finished stages are kept")
    return time.time() - start


def run_all(runs, rerun=(), stages=STAGES, log=print, python=sys.executable, root=ROOT):
    """Runs every stage that is out of date or named in `rerun` (a stage run again makes its readers out
    of date), recording each one's wall time in runs/times.json. `root` holds the chapters."""
    runs.mkdir(parents=True, exist_ok=True)
    times_path = runs / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for stage in stages:
        ran_sha256 = times.get(stage.name, {}).get("script_sha256")
        reason = "asked to" if stage.name in rerun or "all" in rerun else out_of_date(stage, runs, root, ran_sha256)
        if not reason:
            log(f"{stage.name}: up to date")
            continue
        log(f"\n{stage.name}: running ({reason})")
        sha256 = script_sha256(stage, root)  # the text that makes these outputs
        seconds = run_stage(stage, runs, log, python, root)
        times[stage.name] = {"seconds": seconds, "finished": time.strftime("%F %T"), "script_sha256": sha256}
        times_path.write_text(json.dumps(times, indent=2))
    return times


# -----------------------------------------------------------------------------
# The report: one section per stage, each from that stage's metrics.json


def read_metrics(runs, name):
    path = runs / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(header, rows):
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def image(runs, name, file):
    return [f"![{name} {file}]({name}/{file})"] if (runs / name / file).is_file() else []


def tokenizer_section(m, runs):
    has_llama3 = any("llama3_chars_per_token" in v for v in m["compression"].values())
    rows = [[s, f"{v['chars_per_token']:.2f}", f"{v['llama3_chars_per_token']:.2f}" if has_llama3 else "—"]
            for s, v in m["compression"].items()]
    note = [] if has_llama3 else ["", "(Meta's tokenizer file is installed by `bash install.sh --dev`.)"]
    return [f"{m['vocab_size']:,} ids ({m['english_ranks']:,} of the BPE ranks learned on English first, any others on the "
            f"other languages, §3.2) trained in {m['train_seconds']:.0f} s. "
            "Characters per token on held-out documents (§3.2: Llama 3's 128K vocabulary):", "",
            *table(["held-out source", "ours", "Llama 3 (128K)"], rows), *note]


def pretrain_section(m, runs):
    rows = [[s, f"{v:.3f}"] for s, v in m["val_loss"].items()]
    return [f"{m['params'] / 1e6:.1f} M parameters, {m['steps']} steps on {m['device']}: final training loss "
            f"{m['final_train_loss']:.3f}, {m['tokens_per_s']:,.0f} tokens/s, {100 * m['mfu']:.0f}% MFU.", "",
            *table(["validation source", "loss"], rows), "", *image(runs, "03_pretrain", "loss.png")]


def long_context_section(m, runs):
    rows = [[s["stage"], s["length"], f"{s['short_loss_before']:.3f} → {s['short_loss']:.3f}",
             "yes" if s["recovered"] else "no",
             f"{s['long_position_loss_before']:.3f} → {s['long_position_loss']:.3f}" if "long_position_loss" in s else "—",
             pct(sum(map(sum, s["niah"])) / sum(map(len, s["niah"]))), "yes" if s["niah_solved"] else "no"]
            for s in m["stages"]]
    contrast = [f"Loss past {m['base_len']} at the final length: " +
                "; ".join(f"{name} {loss:.3f}" for name, loss in m["long_position_loss_contrast"].items()) + ".", ""
                ] if "long_position_loss_contrast" in m else []
    lengths = m["stages"][-1]["niah_lengths"]
    contrast += [f"NIAH by length ({', '.join(map(str, lengths))}): " + "; ".join(
        f"{name} {' / '.join(pct(a) for a in accuracy)}" for name, accuracy in m["niah_contrast"].items()) + ".", ""
                 ] if "niah_contrast" in m else []
    return [f"From {m['base_len']} tokens, RoPE lever `{m['config']['rope']}` (§3.4.2: six stages, 8K → 128K).", "",
            *table(["stage", "length", "short-context loss", "recovered", f"loss past {m['base_len']}", "NIAH",
                    "solved"], rows), "", *contrast, *image(runs, "04_long_context", "niah.png")]


def anneal_section(m, runs):
    items = m.get("benchmark_items", {})
    rows = [[name, pct(r.get("math_method")), pct(r.get("math_first_step")), pct(r["math_accuracy"]),
             pct(r["completion_token_accuracy"]), f"{r['val_loss_mean']:.3f}"] for name, r in m["results"].items()]
    gain, se = m.get("gains_over_04", {}).get("averaged", {}).get("math_method", (float("nan"),) * 2)
    return [f"Annealed {m['config']['steps']} steps to LR 0, upsampling `{m['config']['upsample']}`; "
            f"{items.get('math', '?')} math and {items.get('completion', '?')} completion items after the "
            "contamination check (§3.4.3, §3.1.3). GSM8K-like answers graded in tiers: the method (the right "
            "operations in order), the first step written exactly, the final answer.", "",
            *table(["model", "math: method", "math: first step", "math: answer", "completion tokens", "val loss"],
                   rows), "",
            f"Method tier, averaged − 04 model: {100 * gain:+.1f} ± {100 * se:.1f} points (paired standard error); "
            f"always writing the commonest method scores {pct(m.get('commonest_method_share'))}.", "",
            *image(runs, "05_anneal", "benchmarks.png")]


def reward_section(m, runs):
    pooled = {}
    for key, cell in m["accuracy"].items():
        row = pooled.setdefault(key.split(" | ")[1], [0, 0.0, 0.0])
        row[0] += cell["pairs"]
        row[1] += cell["accuracy"] * cell["pairs"]
        row[2] += cell["longer_is_better"] * cell["pairs"]
    rows = [[kind, n, pct(right / n), pct(longer / n)] for kind, (n, right, longer) in sorted(pooled.items())]
    return [f"Held-out pairwise accuracy, mean over families and pair types: **{pct(m['mean_accuracy'])}** "
            "(§4.1.2; a coin gives 50%).", "", *table(["pair type", "pairs", "reward model", "longer is better"], rows),
            "", *image(runs, "06_reward_model", "margins.png")]


def sft_section(m, runs):
    families = list(m["rounds"][0]["accuracy"])
    n = m["items"]["test_per_family"]
    rows = [[f"round {r['round']}" if r["round"] else "base model", *(pct(r["accuracy"][f]) for f in families)]
            for r in m["rounds"]]
    best = [[k, *(pct(m["best_of_k"][f][k]) for f in families)] for k in next(iter(m["best_of_k"].values()))]
    return ["Held-out greedy accuracy per family (items per family: " + ", ".join(f"{f} {n[f]}" for f in families)
            + "); round 2 is rejection sampling, round 1 its compute-matched control (§4.1.3, §4.2.2).", "",
            *table(["model", *families], rows), "", f"Best of {m['config']['samples']} for the last model:", "",
            *table(["pick", *families], best), "", *image(runs, "07_sft", "rounds.png")]


def dpo_section(m, runs):
    rows = []
    for variant, seeds in m["results"].items():
        for r in seeds[0]["rounds"]:
            ev = r["eval"]
            greedy = sum(e["greedy"] for e in ev.values()) / len(ev)
            win = sum(e["win_rate"] for e in ev.values()) / len(ev)
            rows.append([variant if r["round"] else "SFT model", r["round"], pct(greedy), pct(win)])
    rows = [rows[0]] + [r for r in rows if r[1]]  # the SFT model once
    return ["Held-out greedy accuracy (mean over families) and win rate against the SFT model as 06's reward "
            "model judges it, per on-policy round (§4.1.4, §4.1.6); seed 1.", "",
            *table(["model", "round", "greedy", "win rate"], rows), "", *image(runs, "08_dpo", "rounds.png")]


def tools_section(m, runs):
    rows = [[family, r["items"], pct(r["without tools"]), pct(r["with tools"]), pct(r["oracle"])]
            for family, r in m["after"].items()]
    return ["Held-out accuracy per family after tool-use SFT, answering without tools, with them, and with an "
            "oracle (the right calls and results given, the model writes the answer) (§4.3.5).", "",
            *table(["family", "items", "without tools", "with tools", "oracle"], rows), "",
            *image(runs, "09_tools", "tools.png")]


SECTIONS = {"01_tokenizer": ("Tokenizer", tokenizer_section), "03_pretrain": ("Pretraining", pretrain_section),
            "04_long_context": ("Long context", long_context_section),
            "05_anneal": ("Annealing and averaging", anneal_section),
            "06_reward_model": ("Reward model", reward_section),
            "07_sft": ("SFT and rejection sampling", sft_section), "08_dpo": ("DPO (and PPO)", dpo_section),
            "09_tools": ("Tool use", tools_section)}


LOSS_MEANING = {"03": "next-token loss", "04": "next-token loss, long rows", "05": "next-token loss, annealing",
                "06": "Bradley-Terry loss", "07": "SFT loss (last round)", "08": "DPO loss + 0.2 NLL",
                "09": "tool-use SFT loss"}


def plot_losses(runs, stages=STAGES):
    """runs/losses.png: every stage's training loss per optimizer step, from its log.jsonl, side by side
    (each loss means something else: the panel says what). Returns the image's lines for the report."""
    logs = [(s.name, [json.loads(line) for line in open(runs / s.name / "log.jsonl")]) for s in stages
            if (runs / s.name / "log.jsonl").is_file()]
    logs = [(name, [r["loss"] for r in records if "loss" in r]) for name, records in logs]
    logs = [(name, losses) for name, losses in logs if losses]
    if not logs:
        return []
    from matplotlib.figure import Figure  # no pyplot: nothing global, nothing left open
    cols = min(4, len(logs))
    rows = -(-len(logs) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(logs):]:
        ax.set_visible(False)
    for ax, (name, losses) in zip(axes, logs):
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
        ax.set_title(name, fontsize=9), ax.set_xlabel("step"), ax.set_ylabel(LOSS_MEANING.get(name[:2], "loss"))
    fig.tight_layout()
    fig.savefig(runs / "losses.png", dpi=90)
    return ["## Training curves", "", "![every stage's training loss](losses.png)"]


def machine():
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import torch
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def write_report(runs, times, stages=STAGES):
    """runs/REPORT.md from the stages' metrics.json files; a stage not run yet says so."""
    def minutes(name):
        return times[name]["seconds"] / 60 if name in times else None
    rows = [[s.name, "—" if minutes(s.name) is None else f"{minutes(s.name):.1f} min",
             f"{s.budget_min:g} min" + (" (over)" if (minutes(s.name) or 0) > s.budget_min else "")] for s in stages]
    total = f"{sum(t['seconds'] for t in times.values()) / 60:.1f} min" if times else "—"
    lines = ["# Results report", "", f"Written {time.strftime('%F %T')} on {machine()}.", "",
             *table(["stage", "wall time", "budget"], rows), f"| all | {total} | 60 min |", "",
             *plot_losses(runs, stages)]
    for stage in stages:
        title, section = SECTIONS[stage.name]
        metrics = read_metrics(runs, stage.name)
        lines += ["", f"## {stage.name}: {title}", ""]
        lines += section(metrics, runs) if metrics else [f"Not run yet: `python tutorials/report.py`."]
    (runs / "REPORT.md").write_text("\n".join(lines) + "\n")
    return runs / "REPORT.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="the folder the stages write into")
    parser.add_argument("--rerun", nargs="*", default=(), choices=["all", *(s.name for s in STAGES)],
                        help="stages to run again even if up to date")
    parser.add_argument("--report-only", action="store_true", help="write REPORT.md without running anything")
    flags = parser.parse_args(argv)
    runs = Path(flags.runs).resolve()
    times_path = runs / "times.json"
    times = json.loads(times_path.read_text()) if flags.report_only and times_path.is_file() else None
    times = times if flags.report_only else run_all(runs, flags.rerun)
    print(f"\nwrote {write_report(runs, times or {})}")


if __name__ == "__main__":
    main()
