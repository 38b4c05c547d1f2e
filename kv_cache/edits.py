"""Text edits in the form the token splicer consumes: character offsets, not LSP line/column ranges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEdit:
    """Replace text[start:end] with `text`.

    Offsets are Python str indices (code points) into the text *before* this edit; LSP ranges
    (UTF-16 line/column) are converted to these upstream. A reversed or negative range is refused
    here, so no later stage has to guess what it meant.
    """

    start: int
    end: int
    text: str

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad edit range [{self.start}, {self.end}): need 0 <= start <= end")

    @property
    def delta(self) -> int:
        """How far the characters after the edit move."""
        return len(self.text) - (self.end - self.start)

    def check_fits(self, length: int) -> None:
        """Raise ValueError unless the edit lies inside a text of `length` characters."""
        if self.end > length:
            raise ValueError(f"edit range [{self.start}, {self.end}) ends past the text's {length} characters")

    def apply(self, text: str) -> str:
        """The edited text."""
        self.check_fits(len(text))
        return text[: self.start] + self.text + text[self.end :]
