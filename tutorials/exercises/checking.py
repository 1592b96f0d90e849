"""What the checks share: the chapters made importable, the student's functions called so that a blank
or a mistake fails with one clear line (and a hint) instead of a traceback."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if (REPO / "02_model.py").exists() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # so `pytest tutorials/exercises` finds the chapters from anywhere


def chapter(name):
    """A chapter module by its file name, e.g. chapter("02_model")."""
    return importlib.import_module(name)


def student(module, function):
    """The student's `function` from exercise file `module`, failing clearly while it is still blank."""
    fn = getattr(importlib.import_module(module), function)

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            pass  # fail outside the handler, so the message is not buried under the blank's traceback
        pytest.fail(f"{module}.py: `{function}` is not filled in yet: write it between the "
                    f"'# >>> your code' and '# <<< your code' markers", pytrace=False)
    return call


def expect(ok, what, hint):
    """Fail with what went wrong and a hint when `ok` is false."""
    if not ok:
        pytest.fail(f"{what}\n  hint: {hint}", pytrace=False)


def expect_close(got, want, what, hint, atol=1e-5, rtol=1e-5):
    """Compare tensors (or numbers): shape first, then values."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    expect(got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}", hint)
    ok = torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=False)
    worst = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    expect(ok, f"{what}: values differ (largest difference {worst:.3g})\n  got      {_short(got)}\n"
               f"  expected {_short(want)}", hint)


def _short(t):
    flat = t.flatten().tolist()
    return str([round(v, 4) if isinstance(v, float) else v for v in flat[:8]]) + (" ..." if len(flat) > 8 else "")
