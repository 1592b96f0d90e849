"""The classroom exercises (tutorials/exercises): their checks pass on a copy filled in from the chapters,
fail with a clear message on the blanks, and catch a plausible mistake in each exercise with its hint;
reset.py restores the blanks."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tutorial_module

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "tutorials" / "exercises"

# The filled-in copy: each blank delegates to the chapter that implements it (or, where no chapter has
# the function with this signature, a solution written here). One entry per blank, in file order.
FROM_CHAPTERS = {
    "ex01_rmsnorm.py": ["""import importlib
norm = importlib.import_module("02_model").RMSNorm(x.shape[-1], eps)
norm.weight.data = weight
return norm(x).detach()"""],
    "ex02_rope.py": ["""import importlib
return importlib.import_module("02_model").apply_rope(x[None, :, None, :], angles.cos(), angles.sin())[0, :, 0]""",
                     """wavelength = 2 * math.pi / freqs
smooth = (original_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
blended = freqs * ((1 - smooth) / factor + smooth)
scaled = torch.where(wavelength > original_len / low_freq_factor, freqs / factor, blended)
return torch.where(wavelength < original_len / high_freq_factor, freqs, scaled)"""],
    "ex03_gqa.py": ["""import importlib
return importlib.import_module("02_model").repeat_kv(x, n_rep)"""],
    "ex04_mask.py": ["""import importlib
position = torch.arange(len(doc_ids))
return importlib.import_module("02_model").attention_mask(doc_ids[None], doc_ids[None], position, position)[0, 0]"""],
    "ex05_bpe.py": ["""from collections import Counter
counts = Counter()
for word, freq in zip(words, freqs):
    for pair in zip(word, word[1:]):
        counts[pair] += freq
return min(counts, key=lambda pair: (-counts[pair], pair))""",
                    """import importlib
return importlib.import_module("01_tokenizer").merge_pair(word, left, right, new_id)"""],
    "ex06_schedule.py": ["""import importlib
from types import SimpleNamespace
cfg = SimpleNamespace(lr=peak_lr, warmup=warmup, steps=steps, min_lr_ratio=min_lr_ratio)
return importlib.import_module("03_pretrain").lr_at(step, cfg)"""],
    "ex07_sft_mask.py": ["""import importlib
return importlib.import_module("06_reward_model").render(tokenizer, messages)"""],
    "ex08_reward_loss.py": ["""import importlib
return importlib.import_module("06_reward_model").reward_loss(better_rewards, worse_rewards)"""],
    "ex09_dpo_loss.py": ["""import importlib
return importlib.import_module("08_dpo").dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
                                                  chosen_nll, nll_weight)"""],
    "ex10_tool_call.py": ["""def as_object(source):
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError("the arguments must be a JSON object")
    return value

tag, text = "<|python_tag|>", text.strip()
if text.startswith("<function="):
    match = re.fullmatch(r"<function=([\\w-]+)>(.*)</function>", text, re.DOTALL)
    if not match:
        raise ValueError("a <function=NAME> call must end with </function>")
    return match[1], as_object(match[2])
if not text.startswith(tag):
    return None
body = text[len(tag):].strip()
if body.startswith("{"):
    call = as_object(body)
    return call["name"], call.get("parameters", {})
builtin = re.match(r"(brave_search|wolfram_alpha)\\.call\\(", body)
if builtin:
    keywords = ast.parse(body, mode="eval").body.keywords
    return builtin[1], {k.arg: ast.literal_eval(k.value) for k in keywords}
return "code_interpreter", {"code": body}"""],
}

# One plausible student mistake per exercise; the check must fail on it and show the hint's start.
MISTAKES = {
    "ex01_rmsnorm.py": ("return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight", "divide by sqrt(mean"),
    "ex02_rope.py": ("""x0, x1 = x.chunk(2, dim=-1)  # Hugging Face's halves, not Meta's adjacent pairs
return torch.cat([x0 * angles.cos() - x1 * angles.sin(), x0 * angles.sin() + x1 * angles.cos()], dim=-1)""",
                     "pairs are ADJACENT"),
    "ex03_gqa.py": ("return x.repeat(1, n_rep, 1, 1)", "CONSECUTIVE query heads"),
    "ex04_mask.py": ("return torch.ones(len(doc_ids), len(doc_ids), dtype=torch.bool).tril()", "doc_ids[q] == doc_ids[k]"),
    "ex05_bpe.py": ("""counts = {}
for word, freq in zip(words, freqs):
    for pair in zip(word, word[1:]):
        counts[pair] = counts.get(pair, 0) + 1  # forgets the chunk's frequency
return max(counts, key=counts.get)""", "adding the chunk's freq"),
    "ex06_schedule.py": ("""if step < warmup:
    return peak_lr * step / warmup  # starts at 0: the first step does nothing
progress = (step - warmup) / (steps - 1 - warmup)
return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2)""", "warmup: peak"),
    "ex07_sft_mask.py": ("""ids, mask = [tokenizer.bos_id], [0]
for message in messages:
    message_ids = tokenizer.encode_message(message)
    ids += message_ids
    mask += [int(message["role"] == "assistant")] * len(message_ids)  # learns the assistant's header too
return ids, mask""", "BOS (mask 0)"),
    "ex08_reward_loss.py": ("return -torch.log(torch.sigmoid(better_rewards - worse_rewards)).sum()",
                            "F.logsigmoid stays finite"),
    "ex09_dpo_loss.py": ("""margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
loss = -F.logsigmoid(margin)  # forgets β
return loss if chosen_nll is None else loss + nll_weight * chosen_nll""", "margin = (π_c - ref_c)"),
    "ex10_tool_call.py": ("""text = text.strip()
if not text.startswith("<|python_tag|>"):
    return None
return "code_interpreter", {"code": text[len("<|python_tag|>"):].strip()}  # every tagged call as code""",
                          "strip <|python_tag|>"),
}


def fill(folder, bodies):
    """Writes each file's blanks, in order, with the given bodies (indented to the marker)."""
    reset = tutorial_module("exercises/reset")
    for name, blocks in bodies.items():
        path = folder / name
        blocks = iter(blocks)
        source = reset.BLANK.sub(lambda m: f"{m[1]}# >>> your code\n" + "".join(
            f"{m[1]}{line}\n" if line else "\n" for line in next(blocks).splitlines()) + f"{m[1]}# <<< your code",
            path.read_text())
        assert next(blocks, None) is None, f"{name} has fewer blanks than bodies"
        path.write_text(source)


def run_checks(folder):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rN",
                           "--rootdir", str(folder), str(folder)], capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def copy(tmp_path):
    folder = tmp_path / "exercises"
    shutil.copytree(EXERCISES, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_every_exercise_has_a_fill_and_a_mistake():
    files = sorted(p.name for p in EXERCISES.glob("ex[0-9][0-9]_*.py"))
    assert len(files) >= 10 and files == sorted(FROM_CHAPTERS) == sorted(MISTAKES)


def test_checks_pass_on_the_copy_filled_in_from_the_chapters(copy):
    fill(copy, FROM_CHAPTERS)
    code, output = run_checks(copy)
    assert code == 0 and "10 passed" in output, output


def test_blank_exercises_fail_with_a_clear_message(copy):
    code, output = run_checks(copy)
    assert code == 1 and "10 failed" in output, output
    for name in FROM_CHAPTERS:
        assert f"{name}: `" in output and "is not filled in yet" in output, name
    assert "NotImplementedError" not in output  # the message, not the blank's traceback


def test_each_plausible_mistake_fails_with_its_hint(copy):
    fill(copy, {name: [body] + FROM_CHAPTERS[name][1:] for name, (body, _) in MISTAKES.items()})
    code, output = run_checks(copy)
    assert code == 1 and "10 failed" in output, output
    for name, (_, hint) in MISTAKES.items():
        assert hint in output, (name, hint)
    assert output.count("  hint: ") == 10


SECOND_MISTAKES = {  # the second blank of the two-function exercises, the first filled in correctly
    "ex02_rope.py": ("""wavelength = 2 * math.pi / freqs
smooth = (original_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
blended = freqs * (smooth / factor + (1 - smooth))  # the blend's weights swapped
scaled = torch.where(wavelength > original_len / low_freq_factor, freqs / factor, blended)
return torch.where(wavelength < original_len / high_freq_factor, freqs, scaled)""", "wavelength = 2π / freq"),
    "ex05_bpe.py": ("""out, j = [], 0
while j < len(word):
    if j + 1 < len(word) and word[j] == left and word[j + 1] == right:
        out.append(new_id)
    else:
        out.append(word[j])
    j += 1  # forgets to skip the pair's second token: [7, 7, 7] -> [new, new, 7]
return out""", "after replacing a pair, skip both"),
}


def test_the_second_function_of_an_exercise_is_checked_too(copy):
    fill(copy, {name: [FROM_CHAPTERS[name][0], body] for name, (body, _) in SECOND_MISTAKES.items()})
    code, output = run_checks(copy)
    assert code == 1 and "10 failed" in output, output  # the 8 blanks, and these two
    for name, (_, hint) in SECOND_MISTAKES.items():
        assert hint in output, (name, hint)


def test_reset_restores_the_blanks(copy):
    reset = tutorial_module("exercises/reset")
    blanks = {p.name: p.read_text() for p in copy.glob("ex*.py")}
    assert all(reset.blank(text) == text for text in blanks.values())  # the committed files are blank
    fill(copy, FROM_CHAPTERS)
    assert all((copy / name).read_text() != text for name, text in blanks.items())
    reset.reset(["ex03"], folder=copy)
    assert (copy / "ex03_gqa.py").read_text() == blanks["ex03_gqa.py"]
    assert (copy / "ex01_rmsnorm.py").read_text() != blanks["ex01_rmsnorm.py"]
    reset.reset(folder=copy)
    assert {p.name: p.read_text() for p in copy.glob("ex*.py")} == blanks
