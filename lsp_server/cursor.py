"""Reading a source file for completion and turning a compiler-style LINE:COL into a text offset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 16 * 1024 * 1024


class InputError(ValueError):
    """Bad user input: the message is one clear line."""


@dataclass(frozen=True)
class CursorText:
    prefix: str
    suffix: str


def parse_location(spec: str) -> tuple[Path, int, int]:
    """'path/to/file.py:LINE:COL' (1-based, as in compiler messages; the path may contain ':')."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise InputError(f"expected FILE:LINE:COL with 1-based numbers, got {spec!r}")
    return Path(parts[0]), int(parts[1]), int(parts[2])


def read_source(path: Path) -> str:
    """The file as text; refuses what is not a UTF-8 text file instead of guessing."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise InputError(f"{path} is a directory")
        if size > MAX_FILE_BYTES:
            raise InputError(f"{path} is {size} bytes; files over {MAX_FILE_BYTES} bytes are not completed")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    if b"\0" in data[:8192]:
        raise InputError(f"{path} looks like a binary file (it contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None


def split_at(text: str, line: int, column: int) -> CursorText:
    """Split at a 1-based line and 1-based column counted in characters; column may be one past the end."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise InputError(f"line {line} is out of range (the file has {len(lines)} lines)")
    content = lines[line - 1].removesuffix("\r")
    if not 1 <= column <= len(content) + 1:
        raise InputError(f"column {column} is out of range (line {line} has {len(content)} characters)")
    offset = sum(len(part) + 1 for part in lines[: line - 1]) + column - 1
    return CursorText(text[:offset], text[offset:])
