"""Every tutorial notebook executes top to bottom (its own asserts included) in a fresh kernel, and is
committed with the outputs of its current code (tutorials/refresh.py stamps a hash of the code cells)."""
import json
from pathlib import Path

import pytest

from conftest import reference, tutorial_module

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat, nbclient = reference("nbformat"), reference("nbclient")
    for var in ("JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))  # keep Jupyter and matplotlib out of $HOME
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_the_outputs_of_its_code(path):
    refresh = tutorial_module("refresh")
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    missing = [i for i, cell in enumerate(code) if "".join(cell["source"]).strip() and cell.get("execution_count") is None]
    assert not missing, f"{path.name}: code cells {missing} were never run: python tutorials/refresh.py {path.name}"
    assert any(cell.get("outputs") for cell in code), f"{path.name} has no outputs: python tutorials/refresh.py"
    stamp = notebook["metadata"].get(refresh.STAMP, {}).get("code_sha256")
    assert stamp == refresh.code_hash(notebook), \
        f"{path.name}: its code changed after its outputs were made: python tutorials/refresh.py tutorials/{path.name}"


def test_notebooks_open_with_what_they_teach_and_end_with_questions():
    for path in TUTORIALS:
        cells = json.loads(path.read_text())["cells"]
        opening, closing = "".join(cells[0]["source"]), "".join(cells[-1]["source"])
        assert cells[0]["cell_type"] == "markdown" and "§" in opening, f"{path.name}: open with what it teaches and where"
        assert cells[-1]["cell_type"] == "markdown" and closing.startswith("## Questions"), f"{path.name}: end with questions"
        assert closing.count("\n1. ") + closing.count("\n2. ") >= 2, f"{path.name}: 2-3 questions"


def test_the_stamp_tracks_code_not_markdown_or_outputs():
    refresh = tutorial_module("refresh")
    notebook = {"cells": [{"cell_type": "markdown", "source": "# a"}, {"cell_type": "code", "source": ["x = 1\n", "x"],
                                                                       "outputs": []}]}
    before = refresh.code_hash(notebook)
    notebook["cells"][0]["source"] = "# b"
    notebook["cells"][1]["outputs"] = [{"output_type": "stream", "text": "1"}]
    assert refresh.code_hash(notebook) == before
    notebook["cells"][1]["source"] = "x = 2\nx"
    assert refresh.code_hash(notebook) != before
