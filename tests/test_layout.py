"""The project's ground rules: a numbered script imports only earlier numbered scripts (no later
ones, no shared utils module), and importing a script has no side effects."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in ROOT.glob("[0-9][0-9]_*.py"))


def imported_modules(path):
    """Every module a script imports: `import x`, `from x import y`, `importlib.import_module("x")`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            arg = node.args[0] if node.args else None
            yield arg.value if isinstance(arg, ast.Constant) else "<dynamic import>"


def test_scripts_exist_and_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in SCRIPTS]
    assert numbers == list(range(1, len(SCRIPTS) + 1)), f"chapters must be 01, 02, ... without gaps: {numbers}"


def test_scripts_import_only_earlier_scripts():
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    for script in SCRIPTS:
        for module in imported_modules(script):
            assert module != "<dynamic import>", f"{script.name}: import_module needs a literal name"
            if re.match(r"\d\d_", module):
                assert module < script.stem, f"{script.name} imports {module}: only earlier chapters may be imported"
            else:
                assert module not in local, f"{script.name} imports the local module {module}: no shared utils"


def test_importing_scripts_has_no_side_effects(tmp_path):
    """Import every chapter in a fresh interpreter started in an empty folder: no output, no files."""
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
            "for name in sys.argv[2:]: importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), *(p.stem for p in SCRIPTS)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"importing printed: {result.stdout[:200]}"
    assert list(tmp_path.iterdir()) == [], "importing a script wrote files"


def test_every_script_has_a_main_guard_and_cites_the_paper():
    for script in SCRIPTS:
        text = script.read_text()
        assert 'if __name__ == "__main__":' in text, script.name
        assert "def main(argv=None)" in text, f"{script.name}: main(argv=None) lets tests run a stage in-process"
        assert "§" in text, f"{script.name} should cite the Llama 3 paper's sections"
