"""tutorials/report.py: which stages run (missing, out of date, asked for), with which flags, what is kept
and resumed, and the report written from real metrics of tiny runs."""
import importlib
import json
import os
import re
import time

import pytest

from conftest import tutorial_module

report = tutorial_module("report")

# A stand-in chapter: records its argv, writes metrics.json into --out; FAIL_ONCE in a stage's folder
# makes it leave a ckpt.pt and exit 1 (an interrupted run), once.
STUB = """import json, sys, pathlib
argv = sys.argv[1:]
out = pathlib.Path(argv[argv.index("--out") + 1])
with open(pathlib.Path(__file__).parent / "calls.jsonl", "a") as f:
    f.write(json.dumps([pathlib.Path(__file__).stem, argv]) + "\\n")
out.mkdir(parents=True, exist_ok=True)
flag = out.parent / (out.name + ".FAIL_ONCE")
if flag.exists():
    flag.unlink()
    (out / "ckpt.pt").write_text("half")
    print("interrupted"); sys.exit(1)
(out / "metrics.json").write_text(json.dumps({"argv": argv}))
print("done", out.name)
"""


@pytest.fixture
def chapters(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for stage in report.STAGES:
        (root / f"{stage.name}.py").write_text(STUB)
    return root


def calls(root):
    path = root / "calls.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    path.unlink(missing_ok=True)
    return runs


def run(root, runs, rerun=()):
    return report.run_all(runs, rerun, log=lambda line: None, root=root)


def test_a_fresh_run_runs_every_stage_in_order_reading_the_previous_outputs(chapters, tmp_path):
    runs = tmp_path / "runs"
    times = run(chapters, runs)
    made = calls(chapters)
    assert [name for name, _ in made] == [s.name for s in report.STAGES] and set(times) == {s.name for s in report.STAGES}
    argv = dict(made)
    assert argv["07_sft"] == ["--init", str(runs / "05_anneal"), "--reward-model", str(runs / "06_reward_model"),
                              "--out", str(runs / "07_sft")]
    assert "--ppo" in argv["08_dpo"] and argv["08_dpo"][-2:] == ["--out", str(runs / "08_dpo")]  # PPO beside DPO
    assert argv["03_pretrain"][:2] == ["--tokenizer", str(runs / "01_tokenizer" / "tokenizer.model")]
    assert argv["05_anneal"][argv["05_anneal"].index("--data-dir") + 1] == str(runs / "03_pretrain" / "data")
    assert json.loads((runs / "times.json").read_text()).keys() == times.keys()
    assert "done 09_tools" in (runs / "09_tools.log").read_text()


def test_up_to_date_stages_are_skipped_and_a_change_reruns_the_stage_and_its_readers(chapters, tmp_path):
    runs = tmp_path / "runs"
    run(chapters, runs)
    calls(chapters)
    run(chapters, runs)
    assert calls(chapters) == []  # all up to date
    future = time.time() + 5
    os.utime(chapters / "06_reward_model.py", (future, future))  # touched (a checkout), the same text
    run(chapters, runs)
    assert calls(chapters) == []
    with open(chapters / "07_sft.py", "a") as f:
        f.write("# a new line\n")  # 07's code changed after its run
    run(chapters, runs)
    assert [name for name, _ in calls(chapters)] == ["07_sft", "08_dpo", "09_tools"]
    assert (runs / "07_sft.previous" / "metrics.json").is_file()  # the previous run is kept
    run(chapters, runs, rerun=["04_long_context"])
    assert [name for name, _ in calls(chapters)] == ["04_long_context", "05_anneal", "06_reward_model", "07_sft",
                                                     "08_dpo", "09_tools"]


def test_without_a_recorded_script_hash_a_script_newer_than_its_outputs_reruns(chapters, tmp_path):
    runs = tmp_path / "runs"
    run(chapters, runs)
    calls(chapters)
    times = json.loads((runs / "times.json").read_text())
    assert times["05_anneal"]["script_sha256"] == report.script_sha256(report.STAGES[3], chapters)
    for entry in times.values():
        del entry["script_sha256"]  # times.json from before hashes were recorded
    (runs / "times.json").write_text(json.dumps(times))
    future = time.time() + 5
    os.utime(chapters / "05_anneal.py", (future, future))
    run(chapters, runs)
    assert [name for name, _ in calls(chapters)] == ["05_anneal", "06_reward_model", "07_sft", "08_dpo", "09_tools"]


def test_a_failed_stage_stops_the_report_and_an_interrupted_one_resumes(chapters, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "04_long_context.FAIL_ONCE").write_text("")
    with pytest.raises(SystemExit, match=r"error: 04_long_context failed \(exit status 1\); its output is in .*"
                                         r"04_long_context\.log"):
        run(chapters, runs)
    assert [name for name, _ in calls(chapters)] == ["01_tokenizer", "03_pretrain", "04_long_context"]
    run(chapters, runs)
    made = calls(chapters)
    assert [name for name, _ in made] == ["04_long_context", "05_anneal", "06_reward_model", "07_sft", "08_dpo",
                                          "09_tools"]
    assert made[0][1][-1] == "--resume"  # 04 resumes from its checkpoint
    assert not (runs / "04_long_context.previous").exists()


def test_a_failed_stage_that_cannot_resume_starts_again_with_its_folder_kept(chapters, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "06_reward_model.FAIL_ONCE").write_text("")
    with pytest.raises(SystemExit):
        run(chapters, runs)
    calls(chapters)
    run(chapters, runs)
    made = calls(chapters)
    assert made[0][0] == "06_reward_model" and "--resume" not in made[0][1]
    assert (runs / "06_reward_model.previous" / "ckpt.pt").is_file()


def test_the_report_reads_real_metrics_of_tiny_runs(pretrained, long_context, reward_run, tmp_path):
    folder, _ = pretrained
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, source in [("03_pretrain", folder / "03"), ("04_long_context", long_context),
                         ("06_reward_model", reward_run)]:
        (runs / name).symlink_to(source)
    importlib.import_module("01_tokenizer").main(["--out", str(runs / "01_tokenizer"), "--max-chars", "100000",
                                                  "--vocab-size", "700"])
    times = {"01_tokenizer": {"seconds": 12.0}, "03_pretrain": {"seconds": 400.0}}
    text = report.write_report(runs, times).read_text()
    m01 = json.loads((runs / "01_tokenizer" / "metrics.json").read_text())
    m03 = json.loads((runs / "03_pretrain" / "metrics.json").read_text())
    m04 = json.loads((runs / "04_long_context" / "metrics.json").read_text())
    m06 = json.loads((runs / "06_reward_model" / "metrics.json").read_text())
    for source, value in m01["compression"].items():
        assert f"| {source} | {value['chars_per_token']:.2f} |" in text
    for source, loss in m03["val_loss"].items():
        assert f"| {source} | {loss:.3f} |" in text
    for stage in m04["stages"]:
        assert f"| {stage['stage']} | {stage['length']} | {stage['short_loss_before']:.3f} → {stage['short_loss']:.3f} |" in text
    for name, loss in m04["long_position_loss_contrast"].items():
        assert f"{name} {loss:.3f}" in text
    for name, accuracy in m04["niah_contrast"].items():
        assert f"{name} {' / '.join(f'{100 * a:.0f}%' for a in accuracy)}" in text
    assert f"**{100 * m06['mean_accuracy']:.0f}%**" in text
    assert "| 03_pretrain | 6.7 min | 5 min (over) |" in text and "| 01_tokenizer | 0.2 min | 0.5 min |" in text
    for name in ("05_anneal", "07_sft", "08_dpo", "09_tools"):
        assert re.search(rf"## {name}: [^\n]*\n\nNot run yet", text)
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (runs / target).is_file(), target  # every plot the report shows exists
    assert len(re.findall(r"!\[", text)) == 4  # every stage's loss; 03's loss, 04's NIAH grid, 06's margins
