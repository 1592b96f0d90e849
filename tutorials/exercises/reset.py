"""Puts exercises back to their blank state: everything between the '# >>> your code' and
'# <<< your code' markers becomes `raise NotImplementedError("not filled in yet")` again.

    python tutorials/exercises/reset.py              every exercise
    python tutorials/exercises/reset.py ex01 ex04    the ones named (by the start of their file name)
"""
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLANK = re.compile(r"^([ \t]*)# >>> your code\n.*?^[ \t]*# <<< your code$", re.DOTALL | re.MULTILINE)


def blank(source):
    """The exercise's source with every filled-in block emptied again."""
    return BLANK.sub(lambda m: f'{m[1]}# >>> your code\n{m[1]}raise NotImplementedError("not filled in yet")\n'
                               f"{m[1]}# <<< your code", source)


def reset(names=(), folder=HERE):
    """Resets the exercises in `folder` whose file names start with one of `names` (all when empty)."""
    files = [p for p in sorted(folder.glob("ex[0-9][0-9]_*.py")) if not names or p.name.startswith(tuple(names))]
    if names and not files:
        sys.exit(f"error: no exercise matches {' '.join(names)}: the files are {folder}/ex01_*.py .. ex10_*.py")
    for path in files:
        source = path.read_text()
        if blank(source) != source:
            path.write_text(blank(source))
            print(f"reset {path.name}")
    return files


if __name__ == "__main__":
    reset(sys.argv[1:])
