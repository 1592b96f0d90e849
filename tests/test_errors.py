"""A user's mistake on the command line reads as an error, not a crash: one line on stderr,
`error: ...` saying what to do, exit status 2, in every chapter. Each chapter runs once as a real
command; the other mistakes go through the same entry point (01's run_main) in-process."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tok = importlib.import_module("01_tokenizer")

MISTAKES = {  # chapter: [(argv, what the one line must say)]
    "01_tokenizer": [(["--vocab-size", "300"], "too small"), (["--data", "{tmp}/missing"], "no such file"),
                     (["--vocab-size", "many"], "invalid int value")],
    "02_model": [(["--ckpt", "{tmp}/missing"], "expected a .pt checkpoint"), (["--device", "tpu"], "not supported"),
                 (["--max-new-tokens", "100000", "--tokenizer", "{tmp}/none"], "exceed max_seq_len")],
    "03_pretrain": [(["--resume", "--out", "{tmp}/run"], "nothing to resume"),
                    (["--batch-tokens", "1000"], "must be a multiple of"), (["--dtype", "fp8"], "invalid choice"),
                    (["--tokenizer", "{tmp}/missing.model", "--out", "{tmp}/run"], "not found")],
    "04_long_context": [(["--init", "{tmp}/missing"], "run python 03_pretrain.py first"),
                        (["--rope", "yarn"], "invalid choice"), (["--stages", "512,x"], "comma-separated int")],
    "05_anneal": [(["--data-dir", "{tmp}/missing"], "run python 03_pretrain.py first"),
                  (["--steps", "1"], "at least 2"), (["--upsample", "math"], "category=factor")],
    "06_reward_model": [(["--init", "{tmp}/missing"], "run python 05_anneal.py first"),
                        (["--policy-share", "half"], "invalid float value"), (["--steps", "many"], "invalid int value")],
    "07_sft": [(["--init", "{tmp}/missing"], "run python 05_anneal.py first"),
               (["--chat", "--out", "{tmp}/none"], "run python 07_sft.py first"), (["--seq-len", "x"], "invalid int")],
    "08_dpo": [(["--init", "{tmp}/missing"], "run python 07_sft.py first"), (["--judge", "oracle"], "invalid choice"),
               (["--beta", "x"], "invalid float value")],
    "09_tools": [(["--init", "{tmp}/missing"], "run python 08_dpo.py first"), (["--index", "web"], "invalid choice"),
                 (["--chat", "--out", "{tmp}/none"], "run python 09_tools.py first")],
}


def argv_for(argv, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


@pytest.mark.parametrize("chapter", list(MISTAKES))
def test_the_command_prints_one_line_and_exits_2(chapter, tmp_path):
    argv, said = MISTAKES[chapter][0]
    result = subprocess.run([sys.executable, str(ROOT / f"{chapter}.py"), *argv_for(argv, tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.stderr


@pytest.mark.parametrize("chapter, argv, said", [(c, a, s) for c, cases in MISTAKES.items() for a, s in cases[1:]])
def test_every_listed_mistake_is_one_line(chapter, argv, said, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    main = importlib.import_module(chapter).main
    with pytest.raises(SystemExit) as exit_:
        tok.run_main(main, argv_for(argv, tmp_path))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines


def test_programming_errors_keep_their_traceback():
    def main(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        tok.run_main(main, [])
