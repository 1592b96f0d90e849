"""
Chapter 9: tool use in the Llama 3.1 format: a sandboxed Python interpreter, search, a math engine,
and a model that learns when to call them.

Llama 3 §4.3.5 teaches the model to call a search engine (Brave Search), a Python interpreter and a
math engine (Wolfram Alpha), and to call functions it has never seen from their JSON definitions;
§4.3.1 grows code data by running the model's programs (execution feedback) and by translating
code to text and back. Llama 3.1's chat format carries it: a system prompt with `Environment:
ipython` turns the interpreter on, `Tools: brave_search, wolfram_alpha` adds the built-ins, a call
is `<|python_tag|>` + the call + `<|eom_id|>` ("run this and come back"), the result returns as an
`ipython` message, and `<|eot_id|>` ends the turn. Here, offline and at laptop scale:

  * parse_tool_call: every documented form (built-in calls, code, custom tools as
    <function=NAME>{json}</function> or <|python_tag|>{"name": ..., "parameters": ...}), strict:
    nested JSON, quotes and apostrophes are parsed properly, unknown tools and prose are refused;
  * the tools: run_python (a separate process with OS limits, an unprivileged user when started as
    root, and an audit hook), search (BM25 over corpus passages and invented facts), calculate
    (exact arithmetic with sympy on a whitelisted syntax tree, never eval);
  * agent: generate, parse, execute, feed the result back, until the model ends its turn;
  * tool-use SFT (07's trainer) on dialogs the tiny model cannot solve alone: 4x5-digit products,
    facts about invented countries, a program's output, and search-then-compute, next to tasks it
    should answer without tools; held-out accuracy without tools, with tools, and with an oracle;
  * §4.3.1 at this scale: code execution feedback and backtranslation, with how many samples each
    filter kept;
  * --chat: watch the model call its tools live.

Which tag: calls to the built-ins and to the interpreter start with <|python_tag|>, as the 3.1
prompt-format page shows them and as the released 3.1 models emit them; custom tools answer in the
<function=...> form without it (Meta's 2025 encoder dropped the tag from everything but code after it
led models to tag custom calls). One token then says "a call follows" for every tool the model was
trained on. parse_tool_call reads built-in calls with or without the tag.

Run it:
    python 09_tools.py                     # from runs/08_dpo: trains and evaluates, ~10 minutes on CPU
    python 09_tools.py --seeds 3           # three seeds: the spread of every number
    python 09_tools.py --chat              # ask runs/09_tools/model.pt questions; see each call
"""

import argparse
import ast
import contextlib
import functools
import importlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

tok = importlib.import_module("01_tokenizer")  # file names start with a digit
mdl = importlib.import_module("02_model")
pre = importlib.import_module("03_pretrain")
rwd = importlib.import_module("06_reward_model")
sft = importlib.import_module("07_sft")


@dataclass
class ToolsConfig:
    train_items: int = 1000  # training dialogs per tool family (a quarter as many per direct family)
    test_items: int = 40  # held-out questions per family
    countries: int = 5000  # invented countries (a fifth held out): too many to memorise, so the model must copy
    no_tool_share: float = 0.15  # tool-family dialogs without tools in the system prompt, answered directly
    steps: int = 600  # SFT steps (07's trainer)
    dialogs_per_step: int = 24  # dialogs per step, packed into rows
    seq_len: int = 512  # tokens per packed row
    lr: float = 1.5e-3  # peak; warmup, then cosine to 10%
    warmup: int = 20  # steps of linear warmup
    max_new_tokens: int = 64  # per assistant message
    max_calls: int = 4  # tool calls per question before the loop tells the model to answer
    search_results: int = 1  # snippets per search (the best one: shorter dialogs)
    timeout_s: float = 5.0  # wall clock per program
    code_problems: int = 24  # held-out programming problems for execution feedback (§4.3.1)
    code_samples: int = 4  # solutions sampled per problem
    temperature: float = 0.8  # for those samples
    seeds: int = 1  # repeat training and evaluation with this many seeds (3 for the README)
    dtype: str = "auto"  # auto: bf16 on CUDA, else fp32
    ckpt_every: int = 50  # steps between the checkpoints of a training phase (--resume continues from the last)
    seed: int = 9  # items, data order, samples


GPU_DEFAULTS = ToolsConfig(train_items=2000, test_items=200, steps=1000, dialogs_per_step=128, code_problems=200,
                           code_samples=16)
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha")  # called as NAME.call(query="...")
CODE_TOOL = "code_interpreter"  # <|python_tag|> followed by Python source
TRAINING_DATE = "27 November 2026"  # a fixed "Today Date" keeps the data reproducible


# =============================================================================
# The format (Llama 3.1 prompt format) and a strict parser
# =============================================================================


def system_prompt(tools=True, today=TRAINING_DATE):
    """Llama 3.1's system lines: `Environment: ipython` turns the interpreter on, `Tools:` adds the
    built-ins (the interpreter is never listed there), then the knowledge and today's dates."""
    lines = ["Environment: ipython", f"Tools: {', '.join(BUILTIN_TOOLS)}"] if tools else []
    return "\n".join(lines + ["Cutting Knowledge Date: December 2023", f"Today Date: {today}"])


def call_message(name, arguments):
    """The assistant message that calls a tool (01 encodes it as <|python_tag|>...<|eom_id|>)."""
    if name == CODE_TOOL:
        return {"role": "assistant", "content": arguments["code"], "tool_call": True}
    if name in BUILTIN_TOOLS:
        return {"role": "assistant", "content": f"{name}.call(query={json.dumps(arguments['query'], ensure_ascii=False)})",
                "tool_call": True}
    return {"role": "assistant", "content": f"<function={name}>{json.dumps(arguments)}</function>"}  # custom tools


def custom_tools_message(definitions, question):
    """A user message offering custom tools (JSON definitions, §4.3.5's zero-shot tool use)."""
    return {"role": "user", "content": "You may call these functions. To call one, answer with "
            "<function=NAME>{\"argument\": value}</function> and nothing else.\n\n"
            + "\n".join(json.dumps(d) for d in definitions) + f"\n\nQuestion: {question}"}


@dataclass(frozen=True)
class Call:
    name: str  # "brave_search", "wolfram_alpha", "code_interpreter", or a custom tool's name
    arguments: dict


@dataclass(frozen=True)
class NotACall:
    text: str  # a final answer


@dataclass(frozen=True)
class Malformed:
    reason: str  # what is wrong, said to the model


def parse_tool_call(text, custom_tools=()):
    """An assistant message (with "<|python_tag|>" in front where the model emitted the tag) -> Call,
    NotACall or Malformed. Stricter than Meta's tool_utils.py: the call is the whole message (no
    prose around it), JSON is parsed whole (nested arguments, apostrophes), a built-in's arguments are
    read with Python's own parser (either quote, escapes), and unknown tool names are refused."""
    tag = "<|python_tag|>"
    text, tagged = text.strip(), text.strip().startswith(tag)
    body = text[len(tag):].strip() if tagged else text
    known = {*BUILTIN_TOOLS, *custom_tools}
    if tag in body or (not tagged and tag in text):
        return Malformed("<|python_tag|> must start the message, with nothing before it")
    if body.startswith("<function="):
        match = re.fullmatch(r"<function=([A-Za-z_][\w-]*)>(.*)</function>", body, re.DOTALL)
        if not match:
            return Malformed("a <function=NAME> call must end with </function> and hold only JSON arguments")
        arguments = _json_object(match.group(2))
        return arguments if isinstance(arguments, Malformed) else _known(Call(match.group(1), arguments), known)
    if tagged and body.startswith("{"):
        call = _json_object(body)
        if isinstance(call, Malformed):
            return call
        if not isinstance(call.get("name"), str) or not isinstance(call.get("parameters", {}), dict):
            return Malformed('a JSON call needs "name" (a string) and "parameters" (an object)')
        return _known(Call(call["name"], call.get("parameters", {})), known)
    if re.match(r"[A-Za-z_]\w*\.call\(", body):
        return _builtin_call(body, known)
    if tagged:
        return Call(CODE_TOOL, {"code": body}) if body else Malformed("<|python_tag|> with no code after it")
    return NotACall(text)


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return Malformed(f"the arguments are not valid JSON ({e.msg} at character {e.pos})")
    except RecursionError:
        return Malformed("the arguments are nested too deeply")
    return value if isinstance(value, dict) else Malformed("the arguments must be a JSON object")


def _known(call, known):
    return call if call.name in known else Malformed(f"unknown tool {call.name!r}; available: {', '.join(sorted(known))}")


def _builtin_call(body, known):
    """NAME.call(query="...") parsed as a Python expression: keyword arguments with literal values."""
    try:
        node = ast.parse(body, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError):
        return Malformed("a built-in call reads NAME.call(query=\"...\"): this one does not parse")
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.attr == "call" and not node.args and all(k.arg for k in node.keywords)):
        return Malformed("a built-in call reads NAME.call(query=\"...\") with keyword arguments only")
    try:
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, RecursionError, MemoryError):
        return Malformed("a built-in call's arguments must be literal values (a quoted string)")
    return _known(Call(node.func.value.id, arguments), known)


def assistant_message(tokenizer, ids):
    """Generated ids (without their stop token) -> the assistant message they encode."""
    if ids and ids[0] == tokenizer.python_tag_id:
        return {"role": "assistant", "content": tokenizer.decode(ids[1:]), "tool_call": True}
    return {"role": "assistant", "content": tokenizer.decode(ids)}


def message_text(message):
    return ("<|python_tag|>" if message.get("tool_call") else "") + message["content"]


# =============================================================================
# The tools: a sandboxed interpreter, search, a math engine
# =============================================================================

SANDBOX_UID = 64_999  # started as root, programs run as this id: no account has it, so nothing else does

# The child interpreter runs this first: it lowers its own limits (hard limits: the program cannot
# raise them again), installs an audit hook (PEP 578) that refuses process creation, signals,
# sockets, native code, writes outside the folder, reads under /proc, and opening folders or
# descriptors (dir_fd= would slip past the path checks), then runs the program,
# printing the value of a final expression as an interactive interpreter would.
GUARD = r'''
import ast, builtins, os, resource, signal, sys, traceback
folder, seconds, megabytes = os.path.realpath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for limit, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, megabytes << 20),
                     (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NPROC, 16), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too much output: an OSError the program sees, not a silent kill
REFUSED = frozenset("""os.system os.exec os.posix_spawn os.spawn os.fork os.forkpty subprocess.Popen os.kill os.killpg
    socket.__new__ socket.connect socket.bind socket.getaddrinfo ctypes.dlopen ctypes.dlsym ctypes.cdata
    gc.get_objects gc.get_referrers gc.get_referents sys.remote_exec""".split())
CHANGES = frozenset("""os.remove os.rename os.rmdir os.mkdir shutil.rmtree os.chmod os.chown os.link os.symlink
    os.truncate os.utime os.mkfifo os.mknod shutil.copyfile shutil.copytree shutil.move""".split())

# Every name the hook uses is bound as a default, so the program cannot swap them (REFUSED, isinstance).
def hook(event, args, folder=folder + os.sep, realpath=os.path.realpath, fsdecode=os.fsdecode, isdir=os.path.isdir,
         writes=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, PathLike=os.PathLike,
         REFUSED=REFUSED, CHANGES=CHANGES, isinstance=isinstance, any=any, str=str, bytes=bytes, int=int,
         PermissionError=PermissionError):
    def where(path):
        return realpath(fsdecode(path)) + "/" if isinstance(path, (str, bytes, PathLike)) else None
    if event in REFUSED:
        raise PermissionError(f"the sandbox does not allow {event}")
    if event == "open" or event in ("os.listdir", "os.scandir"):
        path = where(args[0])
        if isinstance(args[0], int) and args[0] > 2:
            raise PermissionError("the sandbox does not list or open by file descriptor")
        if event == "open" and path and isdir(path[:-1]):  # a folder's descriptor would allow dir_fd= escapes
            raise PermissionError("the sandbox does not open folders")
        if path and path.startswith(("/proc/", "/sys/")):
            raise PermissionError("the sandbox does not allow reading /proc or /sys")
        writing = event == "open" and (any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & writes)
        if path and writing and not path.startswith(folder):
            raise PermissionError(f"the sandbox only writes inside its folder, not {fsdecode(args[0])}")
    elif event in CHANGES and any(where(a) and not where(a).startswith(folder) for a in args):
        raise PermissionError(f"the sandbox only changes files inside its folder ({event})")
    elif event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
        raise PermissionError("the sandbox does not allow replacing a function's code")

tree = ast.parse(open("main.py").read(), "main.py")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
sys.addaudithook(hook)
namespace = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(tree, "main.py", "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "main.py", "eval"), namespace)
        if value is not None:
            print(repr(value))
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
'''


@functools.lru_cache(maxsize=2)
def sandbox_interpreter(as_root):
    """Our interpreter, or (when root hands programs to SANDBOX_UID, who may not be able to enter
    the folders above ours) the first system python3 that every user can run."""
    def open_to_all(path):
        path = Path(os.path.realpath(path))
        return path.is_file() and all(p.stat().st_mode & 0o001 for p in [path, *path.parents])
    for candidate in [sys.executable] + ([shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")] if as_root else []):
        if candidate and (not as_root or open_to_all(candidate)):
            return candidate
    raise tok.UserError(f"running as root, programs run as an unprivileged user who cannot run {sys.executable}: "
                        f"install a system python3 (e.g. apt install python3)")


def run_python(code, timeout_s=5.0, memory_mb=512, max_output=2000):
    """Run `code` in a fresh process and folder -> (output, error). Never raises for the program's
    own failures: error is "" on success, else what went wrong in one line (the exception, a timeout,
    a limit). Limits: wall clock, CPU, address space, file size (output included), processes, open
    files; an empty environment, closed stdin; the whole process group (and, as root, every process
    of SANDBOX_UID) is killed at the end, so nothing outlives the call."""
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="llama3-tool-"))
    try:
        (folder / "main.py").write_text(code)
        if as_root:
            for path in (folder, folder / "main.py"):
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
        with open(folder / "stdout", "wb+") as out, open(folder / "stderr", "wb+") as err:
            command = [sandbox_interpreter(as_root), "-I", "-S", "-B", "-c", GUARD, str(folder),
                       str(math.ceil(timeout_s) + 1), str(memory_mb)]
            user = dict(user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[]) if as_root else {}
            process = subprocess.Popen(command, cwd=folder, env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       start_new_session=True, **user)
            try:
                process.wait(timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_everything(process, as_root)
            output, errors = (_read_head(f, max_output) for f in (out, err))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if timed_out:
        return output, f"timed out after {timeout_s:g} s (the program was stopped)"
    if process.returncode < 0:
        return output, f"stopped by {signal.Signals(-process.returncode).name} (a CPU or memory limit)"
    lines = [line for line in errors.splitlines() if line.strip()]
    if process.returncode:
        return output, lines[-1].strip() if lines else f"exit status {process.returncode}"
    return output, ""


def kill_everything(process, as_root):
    """SIGKILL the program's process group (even when its first process has already exited) and, as
    root, every process SANDBOX_UID still has (a child that left the group with setsid), until none
    is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(100):
        left = [process.pid] if process.poll() is None else []
        if as_root:
            left += [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) == SANDBOX_UID]
        if not left:
            break
        for kill, pid in [(os.killpg, process.pid)] + [(os.kill, pid) for pid in left]:
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)
    process.wait()


def _uid(proc_dir):
    try:
        return proc_dir.stat().st_uid
    except FileNotFoundError:
        return None


def _read_head(f, limit):
    f.seek(0)
    data = f.read(4 * limit + 4).decode("utf-8", errors="replace")
    size = f.seek(0, os.SEEK_END)
    return data[:limit] + (f"\n... (output cut: {size:,} bytes in all)" if len(data) > limit else "")


# --- search: BM25 over passages -----------------------------------------------

SYLLABLES = "ka lo ven mar ti so ru bel dor an qu el zar mo ta rek vi nu po fen gal hu sil tor".split()


def invented_countries(n, seed=2024):
    """n countries nobody has heard of (names from syllables), each with a capital and a population:
    facts the model cannot know, so only search can answer questions about them."""
    if n > 50_000:
        raise tok.UserError(f"--countries {n}: at most 50,000 (the syllables give about 200,000 distinct names)")
    rng, names, countries = random.Random(seed), set(), []
    while len(countries) < n:
        name = "".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize() + rng.choice(["ia", "land", "stan", "esh"])
        capital = "".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize() + rng.choice(["burg", "ville", "ton"])
        if name not in names and capital not in names:
            names |= {name, capital}
            countries.append({"name": name, "capital": capital, "population": rng.randrange(100_000, 10_000_000)})
    return countries


def country_passage(c):
    return c["name"], f"{c['name']} is a country. Its capital is {c['capital']}, and {c['population']} people live there."


def words(text):
    return re.findall(r"\w+", text.lower())


class SearchIndex:
    """Okapi BM25 (k1 = 1.2, b = 0.75) over (title, text) passages. A passage's weight for a term
    does not depend on the query, so the inverted index stores it: term -> (passage ids, weights)."""

    def __init__(self, passages, k1=1.2, b=0.75):
        self.passages, postings, lengths = list(passages), {}, []
        for i, (title, text) in enumerate(self.passages):
            counts = Counter(words(f"{title} {text}"))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                postings.setdefault(term, []).append((i, tf))
        lengths = np.array(lengths, dtype=np.float64)
        n, mean_length = len(self.passages), max(1.0, float(lengths.mean())) if len(lengths) else 1.0
        self.postings = {}
        for term, posting in postings.items():
            ids, tf = (np.array(column) for column in zip(*posting))
            idf = math.log(1 + (n - len(ids) + 0.5) / (len(ids) + 0.5))
            self.postings[term] = ids, idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[ids] / mean_length))

    def search(self, query, k=3):
        """The k best passages for `query`: dicts {title, snippet, score}, best first."""
        scores = np.zeros(len(self.passages))
        for term in set(words(query)):
            if term in self.postings:
                ids, weights = self.postings[term]
                scores[ids] += weights  # a passage appears once per term: no repeated index
        hits = np.flatnonzero(scores)
        best = hits[np.lexsort((hits, -scores[hits]))][:k]  # highest score first; ties: the earlier passage
        return [{"title": self.passages[i][0], "snippet": self.passages[i][1][:150], "score": float(scores[i])}
                for i in best]


@functools.lru_cache(maxsize=2)
def default_index(countries=5000, sources=("python_docs", "shakespeare", "bible")):
    """The invented countries' facts plus the corpus (01), cut into passages of ~60 words."""
    passages = [country_passage(c) for c in invented_countries(countries)]
    for doc in tok.load_corpus(sources=list(sources)):
        text = doc.text.split()
        passages += [(doc.name, " ".join(text[i:i + 60])) for i in range(0, len(text), 60)]
    return SearchIndex(passages)


def search(query, k=3, index=None):
    """BM25 search of the local index (default_index unless `index` is given)."""
    return (index or default_index()).search(query, k)


# --- the math engine ---------------------------------------------------------

MAX_DIGITS = 1000  # a number larger than this is refused, not computed


class ToolError(ValueError):
    """A tool refused its input; the message is said to the model."""


def calculate(expression):
    """Exact arithmetic and a little algebra, from a parsed syntax tree, never eval: numbers, + - * /
    // % ** (^ is a power, as in Wolfram), x y z as symbols, and a whitelist of functions. Exponents
    and results are bounded (9**9**9 is refused). -> the answer as text; ToolError if refused."""
    import sympy  # comes with torch; imported here so that the other chapters never pay for it
    if len(expression) > 300:
        raise ToolError("the expression is too long (300 characters at most)")
    functions = {"sqrt": sympy.sqrt, "abs": sympy.Abs, "factorial": sympy.factorial, "gcd": sympy.gcd,
                 "lcm": sympy.lcm, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
                 "exp": sympy.exp, "floor": sympy.floor, "ceiling": sympy.ceiling, "expand": sympy.expand,
                 "factor": sympy.factor, "diff": sympy.diff, "solve": sympy.solve}
    names = {"pi": sympy.pi, "e": sympy.E, **{s: sympy.Symbol(s) for s in "xyz"}}
    text = expression.replace("^", "**").replace("×", "*").strip()
    try:
        sides = [_evaluate(ast.parse(side.strip(), mode="eval").body, sympy, functions, names) for side in text.split("=")]
    except ToolError:
        raise
    except SyntaxError:
        raise ToolError(f"cannot read {expression!r}: write numbers, + - * / ** and functions like sqrt(2)") from None
    except (ArithmeticError, ValueError, TypeError, NotImplementedError, RecursionError) as e:
        raise ToolError(f"cannot compute {expression!r}: {type(e).__name__}: {e}") from None
    if len(sides) > 2:
        raise ToolError("at most one = (an equation)")
    if len(sides) == 2:  # an equation: solve it for its first symbol
        difference = sides[0] - sides[1]
        symbols = sorted(getattr(difference, "free_symbols", ()), key=str)
        if difference == 0 or not symbols:
            return "true for every value" if difference == 0 else "false"
        result = sympy.solve(difference, symbols[0])
    else:
        result = sides[0]
    if isinstance(result, list):
        return ", ".join(map(str, result)) if result else "no solution"
    if result.is_Integer:
        return str(result)
    if result.is_number:
        try:
            return f"{result} ≈ {float(result):.12g}"
        except TypeError:  # a complex number
            return f"{result} ≈ {sympy.N(result, 12)}"
    return str(result)


def _evaluate(node, sympy, functions, names):
    walk = functools.partial(_evaluate, sympy=sympy, functions=functions, names=names)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):
            raise ToolError(f"{node.value} is not a finite number")
        return sympy.Rational(repr(node.value)) if isinstance(node.value, float) else sympy.Integer(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = walk(node.left), walk(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions and not node.keywords:
        args = [walk(a) for a in node.args]
        if node.func.id == "factorial" and not (args and args[0].is_number and abs(args[0]) <= 500):
            raise ToolError("factorial is computed for numbers up to 500")
        if node.func.id == "diff" and any(a.is_number and abs(a) > 10 for a in args[1:]):
            raise ToolError("derivatives are taken up to order 10")
        return _bounded(functions[node.func.id](*args))
    raise ToolError(f"{ast.unparse(node)!r} is not allowed: numbers, + - * / // % **, x y z, pi, e, and "
                    f"{', '.join(functions)}")


_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
              ast.Pow: lambda a, b: a ** b}


def _check_power(base, exponent):
    if not exponent.is_number or abs(exponent) > 10_000:
        raise ToolError("exponents are numbers up to 10,000")
    if not base.is_number and abs(exponent) > 50:  # (x + y)**10000 would take sympy forever to expand
        raise ToolError("a power of a symbol is taken up to 50")
    size = max(abs(base.p), base.q).bit_length() * math.log10(2) if base.is_Rational else \
        math.log10(max(2.0, abs(complex(base)))) if base.is_number else 0
    if abs(exponent) * size > MAX_DIGITS:
        raise ToolError(f"the result would have more than {MAX_DIGITS} digits")


def _bounded(value):
    if getattr(value, "is_Rational", False) and max(abs(value.p), value.q).bit_length() * math.log10(2) > MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    return value


# =============================================================================
# The agent loop: generate, parse, execute, feed back
# =============================================================================


def builtin_tools(cfg=None, index=None):
    """The tools a dialog with `Environment: ipython` and `Tools: brave_search, wolfram_alpha` gets."""
    cfg = cfg or ToolsConfig()
    def python(arguments):
        output, error = run_python(arguments["code"], timeout_s=cfg.timeout_s)
        return output.strip() + (f"\nerror: {error}" if error else "") if output.strip() or error else "(no output)"
    return {"brave_search": lambda a: "\n".join(r["snippet"] for r in search(a["query"], cfg.search_results, index))
            or "no results",
            "wolfram_alpha": lambda a: calculate(a["query"]), CODE_TOOL: python}


def execute(call, tools, max_chars=500):
    """A parsed call -> the text of the ipython message that answers it (errors included)."""
    if isinstance(call, Malformed):
        return f"error: {call.reason}"
    if call.name not in tools:
        return f"error: {call.name} is not available here" + (f"; available: {', '.join(tools)}" if tools else "")
    if call.name in BUILTIN_TOOLS and (set(call.arguments) != {"query"} or not isinstance(call.arguments["query"], str)):
        return f'error: {call.name}.call takes one argument, query="..."'
    try:
        builtin = call.name in (*BUILTIN_TOOLS, CODE_TOOL)  # built-ins take the arguments dict; custom tools, keywords
        result = str(tools[call.name](call.arguments) if builtin else tools[call.name](**call.arguments))
    except ToolError as e:
        result = f"error: {e}"
    except TypeError as e:
        result = f"error: wrong arguments for {call.name}: {e}"
    return result if len(result) <= max_chars else result[:max_chars] + f" ... (cut at {max_chars} characters)"


def agent(model, tokenizer, dialogs, tools, max_calls=4, max_new_tokens=64, on_event=None):
    """Continue each dialog (a list of messages the model answers next) until the model ends its
    turn: each call is parsed, executed and its result appended as an ipython message, all dialogs
    in one batch per step. A model that keeps calling is told to answer after max_calls and stopped
    after one more message; a dialog that outgrows the context stops. -> the finished dialogs."""
    custom = [name for name in tools if name not in (*BUILTIN_TOOLS, CODE_TOOL)]
    dialogs, calls = [list(d) for d in dialogs], [0] * len(dialogs)
    active = list(range(len(dialogs)))
    while active:
        prompts = {i: tokenizer.encode_dialog(dialogs[i]) for i in active}
        active = [i for i in active if len(prompts[i]) + max_new_tokens <= model.args.max_seq_len]
        new = mdl.generate(model, [prompts[i] for i in active], max_new_tokens,
                           stop_tokens=tokenizer.stop_tokens) if active else []
        still = []
        for i, ids in zip(active, new):
            dialogs[i].append(assistant_message(tokenizer, ids))
            call = parse_tool_call(message_text(dialogs[i][-1]), custom)
            if isinstance(call, NotACall) or calls[i] > max_calls:
                continue
            calls[i] += 1
            result = execute(call, tools) if calls[i] <= max_calls else \
                f"error: no more calls ({max_calls} made); answer with what you have"
            dialogs[i].append({"role": "ipython", "content": result})
            still.append(i)
            if on_event:
                on_event(dialogs[i][-2], dialogs[i][-1])
        active = still
    return dialogs


def final_answer(dialog):
    """The model's answer: its last message, unless that is a call ("" when it never answered)."""
    last = dialog[-1]
    answered = last["role"] == "assistant" and isinstance(parse_tool_call(message_text(last)), NotACall)
    return last["content"] if answered else ""


# =============================================================================
# Tasks the tiny model cannot solve alone, and tasks it should answer without tools
# =============================================================================

TOOL_FAMILIES = ("multiply", "lookup", "program", "search_then_compute")
DIRECT_FAMILIES = ("sort_digits", "reverse_words")  # 06's tasks: the model should answer them itself

PROGRAMS = [  # a short program whose output takes computing (the model copies it into a call)
    lambda r: f"x = {r.randrange(2, 9)}\nfor i in range({r.randrange(3, 7)}):\n    x = x * {r.randrange(2, 4)} + {r.randrange(1, 9)}\nprint(x)",
    lambda r: f"print(sum(range({r.randrange(10, 99)}, {r.randrange(100, 999)})))",
    lambda r: f"print({r.randrange(100, 999)} * {r.randrange(100, 999)} % {r.randrange(7, 97)})",
    lambda r: f"print(len(str({r.randrange(2, 9)} ** {r.randrange(20, 90)})))",
]


def tool_items(family, split, n, seed, countries):
    """n items of one family from one split: {family, prompt, answer, calls}; `calls` are the tool
    calls that solve it, in order (search_then_compute's second call uses the population the first
    one finds). Held-out questions never share a prompt (or, for facts, a country) with training ones."""
    rng, items, tries = random.Random(f"{family}-{split}-{seed}"), {}, 0
    countries = [c for c in countries if rwd.is_held_out_prompt(c["name"]) == (split == "test")]
    while len(items) < n and tries < 50 * n:
        tries += 1
        c = rng.choice(countries) if family in ("lookup", "search_then_compute") else None
        if family == "multiply":
            a, b = rng.randrange(1000, 10_000), rng.randrange(10_000, 100_000)
            item = (f"What is {a} times {b}?", str(a * b), [("wolfram_alpha", {"query": f"{a} * {b}"})])
        elif family == "lookup" and rng.random() < 0.5:
            item = (f"What is the capital of {c['name']}?", c["capital"],
                    [("brave_search", {"query": f"capital of {c['name']}"})])
        elif family == "lookup":
            item = (f"How many people live in {c['name']}?", str(c["population"]),
                    [("brave_search", {"query": f"population of {c['name']}"})])
        elif family == "program":
            code = rng.choice(PROGRAMS)(rng)
            item = (f"What does this program print?\n{code}", program_output(code), [(CODE_TOOL, {"code": code})])
        else:  # search, then compute with what was found
            k = rng.randrange(2, 10)
            item = (f"What is {k} times the population of {c['name']}?", str(k * c["population"]),
                    [("brave_search", {"query": f"population of {c['name']}"}),
                     ("wolfram_alpha", {"query": f"{c['population']} * {k}"})])
        if (family == "multiply" or family == "program") and rwd.is_held_out_prompt(item[0]) != (split == "test"):
            continue
        items.setdefault(item[0], {"family": family, "prompt": item[0], "answer": item[1], "calls": item[2]})
    return list(items.values())


def solved_dialog(item, tools, with_tools=True):
    """The dialog that answers `item` well: the system prompt, the question, each call with its real
    result (the tools run), then "The answer is ...". Without tools: the answer alone."""
    messages = [{"role": "system", "content": system_prompt(with_tools)}, {"role": "user", "content": item["prompt"]}]
    for name, arguments in item.get("calls", []) if with_tools else []:
        # Our own template programs are trusted: run in-process (fast); the model's code gets the sandbox.
        result = program_output(arguments["code"]) if name == CODE_TOOL else execute(Call(name, arguments), tools)
        messages += [call_message(name, arguments), {"role": "ipython", "content": result}]
    answer = f"The answer is {item['answer']}." if item.get("calls") else item["answer"]
    return messages + [{"role": "assistant", "content": answer}]


@functools.lru_cache(maxsize=None)
def program_output(code):
    """What one of PROGRAMS prints (trusted code of our own, so run here, not in the sandbox)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {})
    return buffer.getvalue().strip()


def check(item, text):
    return rwd.normalise(text).replace(",", "") == item["answer"]


def direct_items(split, n, seed):
    return [{**it, "calls": []} for it in rwd.task_prompts(split, n, seed, families=DIRECT_FAMILIES)]


# =============================================================================
# Code execution feedback and backtranslation (Llama 3 §4.3.1)
# =============================================================================

CODE_TEMPLATES = [  # (signature, what it returns, body, the reference, test inputs)
    ("f(x)", "x times {a} plus {b}", "return x * {a} + {b}", lambda a, b: lambda x: x * a + b, [0, 1, 5, -3]),
    ("f(x)", "the larger of x and {a}", "return max(x, {a})", lambda a, b: lambda x: max(x, a), [0, 50, -7, 99]),
    ("f(xs)", "the sum of the numbers in xs times {a}", "return sum(xs) * {a}", lambda a, b: lambda xs: sum(xs) * a,
     [[1, 2], [], [5, -1, 3]]),
    ("f(s)", "the text s repeated {a} times", "return s * {a}", lambda a, b: lambda s: s * a, ["ab", "", "xyz"]),
]


def coding_problems(split, n, seed):
    """Programming problems with unit tests, from templates: {prompt, code, tests, description}."""
    rng, out = random.Random(f"code-{split}-{seed}"), {}
    for _ in range(50 * n):
        signature, what, body, reference, inputs = rng.choice(CODE_TEMPLATES)
        a, b = rng.randrange(2, 20), rng.randrange(1, 20)
        prompt = f"Write a Python function {signature} that returns {what.format(a=a, b=b)}."
        if rwd.is_held_out_prompt(prompt) != (split == "test") or prompt in out:
            continue
        cases = [(x, reference(a, b)(x)) for x in inputs]
        tests = (f"for arg, want in {cases!r}:\n    got = f(arg)\n"
                 f"    assert got == want, f'f({{arg!r}}) returned {{got!r}}, expected {{want!r}}'")
        out[prompt] = {"prompt": prompt, "code": f"def {signature}:\n    {body.format(a=a, b=b)}", "tests": tests,
                       "description": f"It returns {what.format(a=a, b=b)}.", "signature": signature}
        if len(out) == n:
            break
    return list(out.values())


def describe_prompt(code):
    return f"What does this function return? Answer in one sentence.\n{code}"


def run_tests(code, problem, timeout_s):
    """Run `code` with the problem's tests in the sandbox: "" when they pass, else the error."""
    return run_python(f"{code}\n\n{problem['tests']}", timeout_s=timeout_s)[1]


def passes(code, problem, timeout_s):
    return run_tests(code, problem, timeout_s) == ""


def code_execution_feedback(model, tokenizer, problems, cfg):
    """§4.3.1: sample solutions, run each against its tests in the sandbox; a failing one gets the
    error back ("the tests failed: ...") for one corrected attempt. Keeps the dialogs that pass."""
    samples = rwd.sample_responses(model, tokenizer, [p["prompt"] for p in problems], cfg.max_new_tokens, cfg.seed,
                                   cfg.temperature, cfg.code_samples, cfg.dtype)
    kept, retries = [], []
    for problem, options in zip(problems, samples):
        for text, _ in options:
            dialog, error = sft.dialog(problem["prompt"], text.strip()), run_tests(text, problem, cfg.timeout_s)
            if not error:
                kept.append((problem, dialog))
            else:
                retries.append((problem, dialog + [{"role": "user", "content": f"The tests failed: {error}\nFix the function."}]))
    first = len(kept)
    fixes = mdl.generate(model, [tokenizer.encode_dialog(d) for _, d in retries], cfg.max_new_tokens,
                         stop_tokens=tokenizer.stop_tokens) if retries else []
    for (problem, dialog), ids in zip(retries, fixes):
        text = tokenizer.decode(ids).strip()
        if passes(text, problem, cfg.timeout_s):
            kept.append((problem, dialog + [{"role": "assistant", "content": text}]))
    stats = {"problems": len(problems), "samples": len(problems) * cfg.code_samples, "passed at once": first,
             "failed": len(retries), "fixed after feedback": len(kept) - first, "kept": len(kept)}
    return kept, stats


def backtranslate(model, tokenizer, kept, cfg):
    """§4.3.1: a kept solution -> the model describes it -> the model writes code from its own
    description -> kept when that code passes the original tests."""
    solutions = {p["prompt"]: (p, d[-1]["content"]) for p, d in kept}  # one per problem
    problems, codes = zip(*solutions.values()) if solutions else ((), ())
    describe = [rwd.prompt_ids(tokenizer, describe_prompt(c)) for c in codes]
    descriptions = [tokenizer.decode(ids).strip() for ids in
                    (mdl.generate(model, describe, cfg.max_new_tokens, stop_tokens=tokenizer.stop_tokens) if describe else [])]
    asks = [f"Write a Python function {p['signature']} that {d[3:] if d.startswith('It ') else d}"
            for p, d in zip(problems, descriptions)]
    rewrites = [tokenizer.decode(ids).strip() for ids in
                (mdl.generate(model, [rwd.prompt_ids(tokenizer, a) for a in asks], cfg.max_new_tokens,
                              stop_tokens=tokenizer.stop_tokens) if asks else [])]
    back = [{"code": c, "description": d, "regenerated": r} for p, c, d, r in zip(problems, codes, descriptions, rewrites)
            if passes(r, p, cfg.timeout_s)]
    return back, {"solutions": len(codes), "descriptions": len(descriptions), "regenerated code passed": len(back)}


# =============================================================================
# Training data, evaluation
# =============================================================================


def training_dialogs(cfg, tools, countries, seed):
    """The SFT mix: solved tool dialogs (a share without tools, answered directly), 06's direct tasks
    under the tool system prompt (no call needed), and code written from and described in words."""
    rng, dialogs = random.Random(seed), []
    for family in TOOL_FAMILIES:
        for item in tool_items(family, "train", cfg.train_items, seed, countries):
            dialogs.append(solved_dialog(item, tools))
            if rng.random() < cfg.no_tool_share:
                dialogs.append(solved_dialog(item, tools, with_tools=False))
    for item in direct_items("train", cfg.train_items // 4, seed):
        dialogs.append(solved_dialog(item, tools))
    for p in coding_problems("train", cfg.train_items // 4, seed):
        dialogs += [sft.dialog(p["prompt"], p["code"]), sft.dialog(describe_prompt(p["code"]), p["description"])]
    return dialogs


def evaluate(model, tokenizer, items, tools, cfg):
    """Per family: accuracy without tools (no tools in the system prompt), with tools (the agent
    loop), and with an oracle (the right calls and results given; the model writes the answer), plus
    calls per question. -> (table, the with-tools dialogs)."""
    model.eval()
    run = functools.partial(agent, model, tokenizer, max_calls=cfg.max_calls, max_new_tokens=cfg.max_new_tokens)
    question = lambda it, on: [{"role": "system", "content": system_prompt(on)}, {"role": "user", "content": it["prompt"]}]
    with torch.no_grad(), mdl.autocast(model.tok_embeddings.weight.device, cfg.dtype):
        without = run([question(it, False) for it in items], {})
        with_tools = run([question(it, True) for it in items], tools)
        oracle = run([solved_dialog(it, tools)[:-1] for it in items], tools)
    table = {}
    for it, a, b, c in zip(items, without, with_tools, oracle):
        row = table.setdefault(it["family"], {"items": 0, "without tools": [], "with tools": [], "oracle": [], "calls": []})
        row["items"] += 1
        row["without tools"].append(check(it, final_answer(a)))
        row["with tools"].append(check(it, final_answer(b)))
        row["oracle"].append(check(it, final_answer(c)) if it["calls"] else None)
        row["calls"].append(sum(bool(m.get("tool_call")) or m["content"].startswith("<function=") for m in b[2:]
                                if m["role"] == "assistant"))
    summary = {f: {k: (v if k == "items" else None if None in v else float(np.mean(v))) for k, v in row.items()}
               for f, row in table.items()}
    return summary, with_tools


# =============================================================================
# main
# =============================================================================


def main(argv=None):
    flags = parse_flags(argv)
    if flags.chat:
        return chat(Path(flags.out), flags.device)
    device = torch.device(mdl.pick_device(flags.device))
    cfg = pre.for_device(pre.config_from_flags(flags, GPU_DEFAULTS if device.type == "cuda" else ToolsConfig()), device)
    if not Path(flags.init).exists():
        raise tok.UserError(f"{flags.init} not found: run python 08_dpo.py first (or pass --init DIR)")
    init_path, tokenizer = sft.base_model(flags)
    out = Path(flags.out)
    if pre.claim_run_folder(out, flags.resume, "phase_*.pt") == "finished":
        return print(f"{out} already holds the finished run: nothing to resume")
    phases = pre.PhaseCheckpoints(out, asdict(cfg), cfg.ckpt_every, flags.resume)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    countries = invented_countries(cfg.countries)
    index = default_index(cfg.countries) if flags.index == "corpus" else SearchIndex(map(country_passage, countries))
    tools = builtin_tools(cfg, index)
    test = [it for f in TOOL_FAMILIES for it in tool_items(f, "test", cfg.test_items, cfg.seed + 1, countries)]
    test += direct_items("test", cfg.test_items, cfg.seed + 1)
    base = mdl.load_checkpoint(init_path, mmap=False)[0].to(device)
    results = {"before": evaluate(base, tokenizer, test, tools, cfg)[0], "seeds": []}
    for s in range(cfg.seeds):
        data = training_dialogs(cfg, tools, countries, cfg.seed + 1000 * s)
        print(f"tool-use SFT (seed {s + 1}/{cfg.seeds}) on {len(data):,} dialogs for {cfg.steps} steps")
        model, history = sft.finetune(base, data, tokenizer, cfg, device, cfg.seed + 1000 * s, phases=phases,
                                      phase=f"seed {s + 1}")
        summary, dialogs = evaluate(model, tokenizer, test, tools, cfg)
        results["seeds"].append(summary)
        if s == 0:
            final, final_history, transcripts = model, history, dialogs
    results["after"] = results["seeds"][0]
    t1 = time.time()
    kept, results["code execution feedback"] = code_execution_feedback(
        final, tokenizer, coding_problems("test", cfg.code_problems, cfg.seed + 1), cfg)
    back, results["backtranslation"] = backtranslate(final, tokenizer, kept, cfg)
    results["seconds"] = {"total": time.time() - t0, "code pipeline": time.time() - t1}
    print_results(results, cfg)
    save(out, final, tokenizer, cfg, results, final_history, transcripts, kept, back)
    plot_results(results, out / "tools.png")
    phases.finish()


def print_results(results, cfg):
    print(f"\nheld-out accuracy ({results['after'][TOOL_FAMILIES[0]]['items']} questions per family)")
    print(f"{'family':<21}{'before SFT':>12}{'without tools':>15}{'with tools':>12}{'oracle':>9}{'calls':>8}")
    for family, row in results["after"].items():
        oracle = "-" if row["oracle"] is None else f"{row['oracle']:.0%}"
        print(f"{family:<21}{results['before'][family]['with tools']:>12.0%}{row['without tools']:>15.0%}"
              f"{row['with tools']:>12.0%}{oracle:>9}{row['calls']:>8.2f}")
    if len(results["seeds"]) > 1:  # the same held-out questions; each seed its own training data and order
        print(f"with tools over {len(results['seeds'])} seeds: " + ", ".join(
            f"{f} {np.mean(v):.0%} ± {np.std(v):.0%}" for f in results["after"]
            for v in [[s[f]["with tools"] for s in results["seeds"]]]))
    print("code execution feedback:", ", ".join(f"{k} {v}" for k, v in results["code execution feedback"].items()))
    print("backtranslation:", ", ".join(f"{k} {v}" for k, v in results["backtranslation"].items()))


def save(out, model, tokenizer, cfg, results, history, transcripts, kept, back):
    mdl.save_checkpoint(out / "model.pt", model, config=asdict(cfg))
    tokenizer.save(out / "tokenizer.model")
    tok.atomic_write_text(out / "metrics.json", json.dumps({"config": asdict(cfg), **results}, indent=2))
    tok.atomic_write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    tok.atomic_write_text(out / "transcripts.jsonl", "".join(json.dumps(d) + "\n" for d in transcripts))
    tok.atomic_write_text(out / "code_feedback.jsonl", "".join(json.dumps(d) + "\n" for _, d in kept))
    tok.atomic_write_text(out / "backtranslation.jsonl", "".join(json.dumps(b) + "\n" for b in back))
    print(f"wrote {out / 'model.pt'}, metrics.json, log.jsonl, transcripts.jsonl, code_feedback.jsonl")


# =============================================================================
# Chat: watch the calls
# =============================================================================


def chat(folder, device_name="auto", read=input, write=print):
    """Ask the tool-using model questions; each call and each result is printed as it happens."""
    if not (folder / "model.pt").is_file():
        raise tok.UserError(f"{folder / 'model.pt'} not found: run python 09_tools.py first (or pass --out DIR)")
    device = torch.device(mdl.pick_device(device_name))
    model, tokenizer = mdl.load_checkpoint(folder)[0].to(device).eval(), tok.Tokenizer.load(folder / "tokenizer.model")
    tools = builtin_tools()
    write("ask a question (tools: search, calculator, Python); Ctrl-D leaves")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            return write("")
        if line:
            today = time.strftime("%d %B %Y")
            dialog = [{"role": "system", "content": system_prompt(True, today)}, {"role": "user", "content": line}]
            shown = lambda call, result: write(f"  call> {message_text(call)}\n  result> {result['content']}")
            with torch.no_grad():
                done = agent(model, tokenizer, [dialog], tools, on_event=shown)[0]
            write(f"model> {final_answer(done) or '(no answer)'}")


# =============================================================================
# Plumbing: flags, plots
# =============================================================================


def parse_flags(argv):
    parser = tok.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/08_dpo", help="the model to teach tools (08's output)")
    parser.add_argument("--tokenizer", default=None, help="its tokenizer.model (default: the one beside --init)")
    parser.add_argument("--out", default="runs/09_tools", help="output folder")
    parser.add_argument("--index", choices=("corpus", "facts"), default="corpus",
                        help="what search sees: the corpus and the invented facts, or the facts alone (fast)")
    parser.add_argument("--chat", action="store_true", help="talk to the model in --out")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pre.add_config_flags(parser, ToolsConfig, ToolsConfig())
    return parser.parse_args(argv)


def plot_results(results, path):
    fig, ax = pre.figure(figsize=(9, 4))
    families, columns = list(results["after"]), ("before SFT", "without tools", "with tools", "oracle")
    for j, column in enumerate(columns):
        values = [(results["before"][f]["with tools"] if column == "before SFT" else results["after"][f][column]) or 0
                  for f in families]
        ax.bar(np.arange(len(families)) + (j - 1.5) * 0.2, values, 0.2, label=column)
    ax.set_xticks(range(len(families)), families, rotation=15, fontsize=8)
    ax.set_ylabel("held-out accuracy"), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3, axis="y"), ax.legend(fontsize=8)
    pre.save_figure(fig, path)


if __name__ == "__main__":
    tok.run_main(main)
