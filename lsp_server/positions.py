"""LSP positions (line, character in UTF-16 or UTF-8 code units) <-> Python str offsets (code points).

Editors count columns in the encoding negotiated at `initialize` (UTF-16 unless the client offers UTF-8);
the buffer cache counts code points. Converting at the protocol boundary keeps every later stage in one unit.
Line breaks are "\\n", "\\r\\n" and a lone "\\r", as the LSP specification says.
"""

from __future__ import annotations

import re

from lsprotocol import types

from kv_cache.edits import TextEdit

UTF16 = "utf-16"
UTF8 = "utf-8"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class PositionError(ValueError):
    """A position or range that cannot address the document (a line past the end, a reversed range)."""


def choose_encoding(offered: list[str] | None) -> str:
    """UTF-8 when the client offers it (no surrogate arithmetic), else the protocol's default UTF-16."""
    return UTF8 if offered and UTF8 in offered else UTF16


def _char_units(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def units(text: str, encoding: str) -> int:
    """Length of `text` in the encoding's code units."""
    if text.isascii():
        return len(text)
    return sum(_char_units(ch, encoding) for ch in text)


def _column_to_chars(line: str, character: int, encoding: str) -> int:
    """Code points before `character` units of `line`. Past the end clamps to the end (LSP spec); a column inside
    a character (half a surrogate pair, the middle of a UTF-8 sequence) rounds down to that character's start."""
    if line.isascii():
        return min(character, len(line))
    seen = 0
    for i, ch in enumerate(line):
        seen += _char_units(ch, encoding)
        if seen > character:
            return i
    return len(line)


def line_span(text: str, line: int) -> tuple[int, int]:
    """[start, end) of line `line` in code points, without its line break. PositionError past the last line."""
    if line < 0:
        raise PositionError(f"line {line} is negative")
    start = 0
    for _ in range(line):
        brk = _LINE_BREAK.search(text, start)
        if brk is None:
            raise PositionError(f"line {line} is past the end of the document")
        start = brk.end()
    brk = _LINE_BREAK.search(text, start)
    return start, brk.start() if brk else len(text)


def offset_at(text: str, position: types.Position, encoding: str, *, clamp: bool = False) -> int:
    """The code-point offset of `position`. A line past the end is an error, or the end of the text with `clamp`
    (clients address "the end" of a whole-document replacement as (line count, 0))."""
    if position.character < 0:
        raise PositionError(f"character {position.character} is negative")
    try:
        start, end = line_span(text, position.line)
    except PositionError:
        if clamp and position.line >= 0:
            return len(text)
        raise
    return start + _column_to_chars(text[start:end], position.character, encoding)


def position_at(text: str, offset: int, encoding: str) -> types.Position:
    """The LSP position of a code-point offset."""
    if not 0 <= offset <= len(text):
        raise PositionError(f"offset {offset} is outside a text of {len(text)} characters")
    line = 0
    start = 0
    for brk in _LINE_BREAK.finditer(text, 0, offset):
        line += 1
        start = brk.end()
    return types.Position(line=line, character=units(text[start:offset], encoding))


def range_to_edit(text: str, rng: types.Range, new_text: str, encoding: str) -> TextEdit:
    """An LSP range replacement as a TextEdit against `text`; a reversed range is an error."""
    start = offset_at(text, rng.start, encoding, clamp=True)
    end = offset_at(text, rng.end, encoding, clamp=True)
    if end < start:
        raise PositionError(f"range end {rng.end.line}:{rng.end.character} is before its start "
                            f"{rng.start.line}:{rng.start.character}")
    return TextEdit(start, end, new_text)


def same_line(text: str, a: int, b: int) -> bool:
    """Whether code-point offsets `a` and `b` are on one line: no line break between them."""
    return _LINE_BREAK.search(text, min(a, b), max(a, b)) is None
