"""Re-executes tutorial notebooks in place and stamps each with a hash of its code cells, so the test suite
can tell when a notebook's code changed after its committed outputs were made.

    python tutorials/refresh.py                          every notebook
    python tutorials/refresh.py tutorials/04_*.ipynb     some

Run it after editing a notebook, then commit the notebook with its outputs.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMP = "llama3_from_scratch"  # the notebook metadata key holding {"code_sha256": ...}


def code_hash(notebook):
    """sha256 of the code cells' sources, in order (markdown and outputs do not count)."""
    sources = [cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
               for cell in notebook["cells"] if cell["cell_type"] == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def refresh(path, timeout=600):
    """Executes `path` top to bottom in a fresh kernel (working folder: tutorials/), writes it back with its
    outputs and the stamp; returns the seconds it took. A cell that raises stops it with the error."""
    import nbclient
    import nbformat
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    seconds = time.perf_counter() - start
    notebook.metadata[STAMP] = {"code_sha256": code_hash(notebook)}
    nbformat.write(notebook, path)
    return seconds


if __name__ == "__main__":
    for path in sys.argv[1:] or sorted(HERE.glob("*.ipynb")):
        print(f"{path}: {refresh(path):.1f} s", flush=True)
