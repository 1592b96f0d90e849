"""09_tools: the Llama 3.1 tool format against Meta's documented exchange and real tokenizer, the
parser on every form (and malformed ones), the sandbox on hostile programs, the math engine on
escapes and closed-form values, BM25 against a hand computation, the agent loop with a scripted
model, §4.3.1's filters, and the whole chapter end to end on a tiny model."""
import importlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import check_kill_and_resume, tutorial_module

ROOT = Path(__file__).resolve().parent.parent

tools = importlib.import_module("09_tools")
tok = importlib.import_module("01_tokenizer")
mdl = importlib.import_module("02_model")
rwd = importlib.import_module("06_reward_model")
Call, NotACall, Malformed = tools.Call, tools.NotACall, tools.Malformed

# Meta's documented exchange (llama-models, models/llama3_1/prompt_format.md), verbatim.
DOCUMENTED = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nTools: brave_search, "
              "wolfram_alpha\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\nYou are a helpful "
              "assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nSearch the web for the latest price of 1oz "
              "gold?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>brave_search.call(query="
              "\"latest price of 1oz gold\")<|eom_id|>")


def documented_dialog():
    system = tools.system_prompt(True, today="21 September 2024") + "\n\nYou are a helpful assistant."
    return [{"role": "system", "content": system},
            {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
            tools.call_message("brave_search", {"query": "latest price of 1oz gold"})]


# --- the format ---------------------------------------------------------------


def test_a_call_encodes_as_metas_documented_exchange(small_tokenizer):
    ids = [small_tokenizer.bos_id] + [i for m in documented_dialog() for i in small_tokenizer.encode_message(m)]
    assert small_tokenizer.decode(ids) == DOCUMENTED
    assert ids[-1] == small_tokenizer.eom_id and small_tokenizer.python_tag_id in ids


def test_a_call_with_metas_tokenizer_uses_metas_special_ids(llama3):
    ids = llama3.encode_message(tools.call_message("wolfram_alpha", {"query": "2 + 2"}))
    assert ids[:4] == [128006, 78191, 128007, 271]  # header: "assistant" and "\n\n" as in Meta's tests
    assert ids[4] == 128010 and ids[-1] == 128008  # <|python_tag|> ... <|eom_id|>
    assert llama3.decode(ids[5:-1]) == 'wolfram_alpha.call(query="2 + 2")'
    assert llama3.encode_message({"role": "ipython", "content": "4"})[-1] == 128009  # results end with <|eot_id|>


def test_only_the_assistant_calls_tools(small_tokenizer):
    with pytest.raises(tok.UserError, match="only the assistant"):
        small_tokenizer.encode_message({"role": "user", "content": "x", "tool_call": True})


def test_the_loss_mask_learns_the_call_and_its_tags_but_not_the_result(small_tokenizer):
    dialog = documented_dialog() + [{"role": "ipython", "content": "2,650 dollars"},
                                    {"role": "assistant", "content": "About 2,650 dollars."}]
    ids, mask = rwd.render(small_tokenizer, dialog)
    learned = [i for i, m in zip(ids, mask) if m]
    assert small_tokenizer.python_tag_id in learned and small_tokenizer.eom_id in learned
    assert small_tokenizer.decode(learned) == ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")'
                                               '<|eom_id|>About 2,650 dollars.<|eot_id|>')


def test_generated_ids_become_the_message_they_encode(small_tokenizer):
    for message in (tools.call_message(tools.CODE_TOOL, {"code": "print(1)"}), {"role": "assistant", "content": "hi"}):
        ids = small_tokenizer.encode_message(message)[len(small_tokenizer.encode_header("assistant")):-1]
        assert tools.assistant_message(small_tokenizer, ids) == message


# --- the parser ---------------------------------------------------------------

NESTED = {"where": {"city": "Paris", "near": ["Seine", {"x": 1}]}, "note": "it's {fine}"}


@pytest.mark.parametrize("text, expected", [
    ('<|python_tag|>brave_search.call(query="gold price")', Call("brave_search", {"query": "gold price"})),
    ('brave_search.call(query="gold price")', Call("brave_search", {"query": "gold price"})),  # Meta's 2025 form
    ("<|python_tag|>wolfram_alpha.call(query='it\\'s 2 + 2')", Call("wolfram_alpha", {"query": "it's 2 + 2"})),
    ('<|python_tag|>brave_search.call(query="say \\"hi\\"")', Call("brave_search", {"query": 'say "hi"'})),
    ("<|python_tag|>import math\nprint(math.pi)", Call("code_interpreter", {"code": "import math\nprint(math.pi)"})),
    (f"<function=weather>{json.dumps(NESTED)}</function>", Call("weather", NESTED)),
    ('<|python_tag|>{"name": "weather", "parameters": ' + json.dumps(NESTED) + "}", Call("weather", NESTED)),
    ("The answer is 42.", NotACall("The answer is 42.")),
])
def test_every_documented_form_parses(text, expected):
    assert tools.parse_tool_call(text, custom_tools=("weather",)) == expected


@pytest.mark.parametrize("text, says", [
    ('<|python_tag|>sneaky.call(query="x")', "unknown tool 'sneaky'"),  # Meta's parser takes any word.call(...)
    ("<function=weather>{\"city\": \"Paris\"}", "must end with </function>"),
    ("<function=weather>{'city': 'Paris'}</function>", "not valid JSON"),
    ("<function=weather>[1, 2]</function>", "must be a JSON object"),
    ("<function=launch>{}</function>", "unknown tool 'launch'"),
    ('<|python_tag|>{"parameters": {}}', '"name"'),
    ('<|python_tag|>{"name": "weather", "parameters": {"a": 1}', "not valid JSON"),
    ('Let me look. <|python_tag|>brave_search.call(query="x")', "must start the message"),
    ("<|python_tag|>", "no code"),
    ('brave_search.call("gold")', "keyword arguments only"),
    ("brave_search.call(query=open('x').read())", "literal values"),
    ('brave_search.call(query="x"', "does not parse"),
    ("<function=weather>" + "[" * 100_000 + "]" * 100_000 + "</function>", "nested too deeply"),
    ("brave_search.call(query={[1]: 2})", "literal values"),
])
def test_malformed_calls_say_what_is_wrong(text, says):
    result = tools.parse_tool_call(text, custom_tools=("weather",))
    assert isinstance(result, Malformed) and says in result.reason, result


@pytest.mark.parametrize("name, arguments", [("brave_search", {"query": "Dune's \"author\" \\ {x}"}),
                                             ("wolfram_alpha", {"query": "x^2 = 4"}),
                                             ("code_interpreter", {"code": "print('}{')"}),
                                             ("weather", NESTED)])
def test_what_we_write_we_parse(name, arguments):
    assert tools.parse_tool_call(tools.message_text(tools.call_message(name, arguments)), ("weather",)) == \
        Call(name, arguments)


# --- the math engine ----------------------------------------------------------


@pytest.mark.parametrize("expression, answer", [
    ("4821 * 37195", str(4821 * 37195)), ("2^100", str(2 ** 100)), ("(7 - 10) * 3 // 2", str((7 - 10) * 3 // 2)),
    ("1/3 + 1/6", "1/2 ≈ 0.5"), ("0.1 + 0.2", "3/10 ≈ 0.3"), ("sqrt(8)", "2*sqrt(2) ≈ 2.82842712475"),
    ("factorial(20)", str(math.factorial(20))), ("x**2 = 4", "-2, 2"), ("diff(x**3, x)", "3*x**2"), ("gcd(84, 36)", "12"),
    ("x = x", "true for every value"), ("2 = 3", "false"), ("(10**400)**2", str(10 ** 800)),
])
def test_the_math_engine_is_exact(expression, answer):
    assert tools.calculate(expression) == answer


@pytest.mark.parametrize("expression, says", [
    ("9**9**9", "exponents"), ("10**5000", "more than 1000 digits"), ("().__class__.__bases__", "not allowed"),
    ("__import__('os').system('echo hi')", "not allowed"), ("(lambda: 1)()", "not allowed"),
    ("signal.raise_signal(9) or 'x'.count('a')", "not allowed"), ("factorial(10**6)", "up to 500"),
    ("print(1", "cannot read"), ("1" * 400, "too long"), ("x.real", "not allowed"),
    ("1 // 0", "ZeroDivisionError"), ("solve(sin(x) - x)", "cannot compute"), ("diff(x, 1.5)", "cannot compute"),
    ("(1/10**999)**5", "more than 1000 digits"), ("1e400", "not a finite number"),
    ("expand((x + y)**10000)", "up to 50"), ("diff(exp(x), x, 60)", "order 10"),
])
def test_the_math_engine_refuses_what_it_must_not_run(expression, says):
    start = time.time()
    with pytest.raises(tools.ToolError, match=says):
        tools.calculate(expression)
    assert time.time() - start < 5


# --- the sandbox --------------------------------------------------------------


def test_a_program_runs_and_shows_its_last_value():
    assert tools.run_python("print(6 * 7)") == ("42\n", "")
    assert tools.run_python("x = 3\nx * 14") == ("42\n", "")
    assert tools.run_python("1 / 0")[1] == "ZeroDivisionError: division by zero"
    assert "SyntaxError" in tools.run_python("print(")[1]
    assert tools.run_python("import sys\nprint('hi')\nsys.exit(0)") == ("hi\n", "")
    assert tools.run_python("import sys\nsys.exit(3)") == ("", "exit status 3")


def sandbox_processes():
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and tools._uid(p) == tools.SANDBOX_UID]


@pytest.mark.parametrize("name, code, says", [
    ("infinite loop", "while True:\n    pass", "timed out"),
    ("sleeps", "import time\ntime.sleep(60)", "timed out"),
    ("memory bomb", "x = bytearray(8 << 30)", "MemoryError"),
    ("growing memory", "x = []\nwhile True:\n    x.append(' ' * 10**7)", "MemoryError"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "os.fork"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 60 &'])", "subprocess.Popen"),
    ("huge output", "while True:\n    print('x' * 10000)", "File too large"),
    ("native code", "import ctypes\nctypes.CDLL(None).fork()", "ctypes"),
    ("signals", "import os\nos.kill(1, 9)", "os.kill"),
    ("network", "import socket\nsocket.create_connection(('pypi.org', 443))", "socket"),
    ("tampering with the hook", "import __main__\n__main__.REFUSED = frozenset()\nimport os\nos.system('true')",
     "os.system"),
    ("swapping builtins", "import builtins\nbuiltins.isinstance = lambda *a: False\nimport os\nos.fork()", "os.fork"),
    ("a folder's descriptor", "import os\nd = os.open('/', os.O_RDONLY)\nos.open('proc/self/environ', 0, dir_fd=d)",
     "folders"),
])
def test_hostile_programs_end_with_a_message_and_leave_nothing_running(name, code, says):
    start = time.time()
    output, error = tools.run_python(code, timeout_s=2)
    assert says in error, (name, error)
    assert len(output) < 2200 and time.time() - start < 10
    assert sandbox_processes() == []


def test_a_program_cannot_write_or_delete_outside_its_folder(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    escape = Path(f"/tmp/llama3-escape-{os.getpid()}.txt")  # world-writable: only the audit hook stops this one
    try:
        for code in (f"open({str(precious)!r}, 'w').write('gone')", f"import os\nos.remove({str(precious)!r})",
                     f"import shutil\nshutil.rmtree({str(tmp_path)!r})", f"import os\nos.rename({str(precious)!r}, 'x')",
                     f"open({str(tmp_path / 'new.txt')!r}, 'x')", f"import os\nos.chdir('/tmp')\nopen({escape.name!r}, 'w')"):
            assert "PermissionError" in tools.run_python(code)[1], code
        assert precious.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
        assert not escape.exists()
    finally:
        escape.unlink(missing_ok=True)
    assert tools.run_python("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())") == ("ok\n", "")


def test_a_program_cannot_see_the_parents_environment(monkeypatch):
    monkeypatch.setenv("LLAMA3_SECRET", "hunter2")
    output, _ = tools.run_python("import os\nprint(dict(os.environ))")
    assert "hunter2" not in output and "LLAMA3_SECRET" not in output
    output, error = tools.run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert "hunter2" not in output and "PermissionError" in error
    assert "hunter2" not in tools.run_python("import os\nprint(os.listdir('/proc'))")[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand programs to another user")
def test_as_root_programs_run_as_the_unprivileged_sandbox_user():
    output, error = tools.run_python("import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
    assert (output, error) == (f"{tools.SANDBOX_UID} {tools.SANDBOX_UID} []\n", "")


def test_output_is_cut_and_stdin_is_closed():
    output, error = tools.run_python("print('y' * 5000)", max_output=100)
    assert output.startswith("y" * 100) and "output cut" in output and error == ""
    assert "EOFError" in tools.run_python("input()")[1]


# --- search -------------------------------------------------------------------


def test_bm25_matches_a_hand_computation():
    index = tools.SearchIndex([("a", "gold gold price"), ("b", "silver price"), ("c", "copper")])
    (best, second) = index.search("gold price", k=2)
    n, avg = 3, (4 + 3 + 2) / 3  # title words count too: "a gold gold price" has 4
    idf = lambda df: math.log(1 + (n - df + 0.5) / (df + 0.5))
    term = lambda tf, length: tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))
    assert best["title"] == "a" and best["score"] == pytest.approx(idf(1) * term(2, 4) + idf(2) * term(1, 4))
    assert second["title"] == "b" and second["score"] == pytest.approx(idf(2) * term(1, 3))
    assert index.search("platinum") == []


def test_search_finds_each_invented_country_first():
    countries = tools.invented_countries(200)
    index = tools.SearchIndex(map(tools.country_passage, countries))
    for c in countries[:50]:
        assert index.search(f"population of {c['name']}", k=2)[0]["title"] == c["name"]
    assert len({c["name"] for c in countries} | {c["capital"] for c in countries}) == 400


# --- the agent loop, with a scripted model ------------------------------------


class Scripted:
    """Stands in for 02's generate: answers each prompt with the next scripted assistant message."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies), []

    def __call__(self, model, prompts, max_new_tokens, **_):
        self.prompts += prompts
        out = []
        for _ in prompts:
            message = self.replies.pop(0)
            header = len(self.tokenizer.encode_header("assistant"))
            out.append(self.tokenizer.encode_message(message)[header:-1])  # without the stop token
        return out


MODEL = SimpleNamespace(args=SimpleNamespace(max_seq_len=4096))


def ask(question):
    return [{"role": "system", "content": tools.system_prompt()}, {"role": "user", "content": question}]


def test_a_two_step_plan_searches_then_computes(small_tokenizer, monkeypatch):
    countries = tools.invented_countries(20)
    c = countries[3]
    index = tools.SearchIndex(map(tools.country_passage, countries))
    monkeypatch.setattr(mdl, "generate", Scripted(small_tokenizer, [
        tools.call_message("brave_search", {"query": f"population of {c['name']}"}),
        tools.call_message("wolfram_alpha", {"query": f"{c['population']} * 3"}),
        {"role": "assistant", "content": f"The answer is {3 * c['population']}."}]))
    (dialog,) = tools.agent(MODEL, small_tokenizer, [ask(f"What is 3 times the population of {c['name']}?")],
                            tools.builtin_tools(index=index))
    assert [m["role"] for m in dialog[2:]] == ["assistant", "ipython", "assistant", "ipython", "assistant"]
    assert dialog[3]["content"].startswith(tools.country_passage(c)[1])
    assert dialog[5]["content"] == str(3 * c["population"])
    assert tools.final_answer(dialog) == f"The answer is {3 * c['population']}."


def test_the_loop_answers_mistakes_and_stays_bounded(small_tokenizer, monkeypatch):
    calls = [tools.call_message("brave_search", {"query": "x"})] * 10
    scripted = Scripted(small_tokenizer, [{"role": "assistant", "content": "<function=launch>{}</function>"},
                                          {"role": "assistant", "content": '<|python_tag|>brave_search.call(q="x")'},
                                          tools.call_message(tools.CODE_TOOL, {"code": "print('x' * 3000)"})] + calls)
    monkeypatch.setattr(mdl, "generate", scripted)
    index = tools.SearchIndex([("long", "word " * 400)])
    (dialog,) = tools.agent(MODEL, small_tokenizer, [ask("loop forever")], tools.builtin_tools(index=index), max_calls=4)
    results = [m["content"] for m in dialog if m["role"] == "ipython"]
    assert "unknown tool 'launch'" in results[0]
    assert "takes one argument" in results[1] or "must start" in results[1]
    assert results[2].startswith("x" * 500) and "cut at 500" in results[2] and all(len(r) <= 560 for r in results)
    assert "no more calls" in results[-1] and len(results) == 5
    assert len(scripted.prompts) == 6 and tools.final_answer(dialog) == ""  # 4 calls + the warning + one last try


def test_custom_tools_get_their_arguments_and_wrong_ones_are_answered(small_tokenizer, monkeypatch):
    weather = lambda city, unit="C": f"21 {unit} in {city}"
    monkeypatch.setattr(mdl, "generate", Scripted(small_tokenizer, [
        tools.call_message("weather", {"city": "Paris"}), tools.call_message("weather", {"town": "Paris"}),
        {"role": "assistant", "content": "21 C."}]))
    dialog = [tools.custom_tools_message([{"name": "weather", "parameters": {"city": "string"}}], "Weather in Paris?")]
    (done,) = tools.agent(MODEL, small_tokenizer, [dialog], {"weather": weather})
    assert done[2]["content"] == "21 C in Paris" and "wrong arguments for weather" in done[4]["content"]


def test_without_tools_a_call_is_refused(small_tokenizer, monkeypatch):
    monkeypatch.setattr(mdl, "generate", Scripted(small_tokenizer, [
        tools.call_message("wolfram_alpha", {"query": "2 * 2"}), {"role": "assistant", "content": "4"}]))
    (done,) = tools.agent(MODEL, small_tokenizer, [ask("2 * 2?")], {})
    assert "not available" in done[3]["content"] and tools.final_answer(done) == "4"


# --- data and §4.3.1 ------------------------------------------------------------


def test_held_out_questions_never_meet_training_ones():
    countries = tools.invented_countries(100)
    for family in tools.TOOL_FAMILIES:
        train = tools.tool_items(family, "train", 60, 0, countries)
        test = tools.tool_items(family, "test", 20, 1, countries)
        assert len(test) == 20 and not {t["prompt"] for t in train} & {t["prompt"] for t in test}
        if family in ("lookup", "search_then_compute"):
            named = lambda items: {c["name"] for c in countries for it in items if c["name"] in it["prompt"]}
            assert not named(train) & named(test)


def test_training_programs_print_what_the_sandbox_prints():
    for item in tools.tool_items("program", "train", 8, 0, []):
        code = item["calls"][0][1]["code"]
        assert tools.program_output(code) == tools.run_python(code)[0].strip() != ""


def test_coding_problems_are_solved_by_their_reference_and_not_by_a_wrong_one():
    for p in tools.coding_problems("test", 8, 0):
        assert tools.passes(p["code"], p, 5)
        assert not tools.passes(p["code"].replace("return", "return 1 +" if "s *" not in p["code"] else "return 'x' +"),
                                p, 5)


def test_execution_feedback_and_backtranslation_count_what_they_keep(small_tokenizer, monkeypatch):
    good, bad = tools.coding_problems("test", 2, 0)
    # one problem right at once (and wrong once); the other wrong, then fixed after the error comes back
    monkeypatch.setattr(rwd, "sample_responses", lambda *a, **k: [[(good["code"], True), ("def f(x):\n    return 0", True)],
                                                                  [("def g(x):\n    return 0", True)] * 2])
    replies = [{"role": "assistant", "content": c} for c in ("def f(x):\n    return 0", bad["code"], "oops")]
    replies += [{"role": "assistant", "content": good["description"]}, {"role": "assistant", "content": "It is wrong."},
                {"role": "assistant", "content": good["code"]}, {"role": "assistant", "content": "pass"}]
    scripted = Scripted(small_tokenizer, replies)
    monkeypatch.setattr(mdl, "generate", scripted)
    cfg = tools.ToolsConfig(code_samples=2, timeout_s=5)
    kept, stats = tools.code_execution_feedback(MODEL, small_tokenizer, [good, bad], cfg)
    assert stats == {"problems": 2, "samples": 4, "passed at once": 1, "failed": 3, "fixed after feedback": 1, "kept": 2}
    assert "The tests failed: AssertionError" in small_tokenizer.decode(scripted.prompts[0])
    back, stats = tools.backtranslate(MODEL, small_tokenizer, kept, cfg)
    assert stats == {"solutions": 2, "descriptions": 2, "regenerated code passed": 1} and back[0]["code"] == good["code"]


# --- the chapter, end to end ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_init(small_tokenizer, tmp_path_factory):
    """A tiny fresh model with a context long enough for tool dialogs, and its tokenizer."""
    folder = tmp_path_factory.mktemp("init09")
    torch.manual_seed(0)
    args = mdl.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=small_tokenizer.n_words,
                         multiple_of=32, max_seq_len=512)
    mdl.save_checkpoint(folder / "model.pt", mdl.Transformer(args))
    small_tokenizer.save(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tools_run(tiny_init, tmp_path_factory):
    """09 on the tiny model."""
    folder = tiny_init
    out = tmp_path_factory.mktemp("run09") / "09"
    tools.main(["--init", str(folder), "--out", str(out), "--index", "facts", "--countries", "50", "--steps", "3",
                "--train-items", "6", "--test-items", "2", "--code-problems", "2", "--code-samples", "2",
                "--max-new-tokens", "16", "--device", "cpu"])
    return out


def test_the_chapter_writes_its_results(tools_run):
    metrics = json.loads((tools_run / "metrics.json").read_text())
    section = "\n".join(tutorial_module("report").tools_section(metrics, tools_run.parent))  # the results report's
    assert all(f"| {family} | {row['items']} |" in section for family, row in metrics["after"].items())
    families = set(tools.TOOL_FAMILIES) | set(tools.DIRECT_FAMILIES)
    assert set(metrics["after"]) == set(metrics["before"]) == families
    for row in metrics["after"].values():
        assert row["items"] == 2 and 0 <= row["with tools"] <= 1 and row["calls"] >= 0
    assert metrics["code execution feedback"]["samples"] == 4
    assert (tools_run / "tools.png").stat().st_size > 0 and (tools_run / "model.pt").is_file()
    assert len((tools_run / "log.jsonl").read_text().splitlines()) == 3


def test_chat_prints_the_answer(tools_run):
    said = []
    questions = iter(["What is 12 times 13?"])
    def read(_):
        try:
            return next(questions)
        except StopIteration:
            raise EOFError
    tools.chat(tools_run, "cpu", read=read, write=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any(line.startswith("model> ") for line in said)


def test_sigkill_then_resume_gives_the_uninterrupted_run(tiny_init, tmp_path):
    """kill -9 during tool-use SFT (after the checkpoint at step 3), then --resume: the same evaluations,
    code-pipeline counts, losses and model as a run never interrupted."""
    argv = ["--init", tiny_init, "--index", "facts", "--countries", "50", "--steps", "8", "--train-items", "6",
            "--test-items", "2", "--code-problems", "2", "--code-samples", "2", "--max-new-tokens", "16",
            "--ckpt-every", "3", "--device", "cpu"]
    check_kill_and_resume(tools.main, ROOT / "09_tools.py", argv, "phase_seed_1.pt", 3, tmp_path)
