"""Test inputs: real source files copied once into tests/data/ (sources and licenses in tests/data/README.md).

Tests read these, never the host's standard library, so every machine tests the same text."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from inference.tokenizer import CodeTokenizer

DATA = Path(__file__).parent / "data"
CPYTHON = DATA / "cpython"
VOCAB_FILES = ("textwrap.py", "bisect.py", "heapq.py")  # what the tiny test model's vocabulary is trained on


def cpython_text(name: str) -> str:
    """A CPython 3.11.7 library file from the fixtures, by its path under Lib/."""
    return (CPYTHON / name).read_text(encoding="utf-8")


def cpython_files() -> list[Path]:
    """Every copied library file, in path order."""
    return sorted(CPYTHON.rglob("*.py"), key=lambda f: f.relative_to(CPYTHON).as_posix())


def vocab_texts() -> list[str]:
    return [cpython_text(name) for name in VOCAB_FILES]


def never_ending(tokenizer: CodeTokenizer) -> CodeTokenizer:
    """The same tokenizer with no stop tokens. The random-weight model picks end-of-text at a point that
    depends on the CPU's float rounding; without it, decoding with no stop rule always runs to max_tokens,
    so a test can count on the length."""
    endless = copy.copy(tokenizer)
    endless.specials = dataclasses.replace(tokenizer.specials, stop=frozenset())
    return endless


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie that its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
