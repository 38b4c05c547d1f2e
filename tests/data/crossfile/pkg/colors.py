"""Colors and how to mix them."""

from typing import NamedTuple


class Color(NamedTuple):
    red: int
    green: int
    blue: int

    def mix(self, other: "Color") -> "Color":
        return Color(*((a + b) // 2 for a, b in zip(self, other)))


RED = Color(255, 0, 0)
BLUE = Color(0, 0, 255)
try:
    PALETTE = {"red": RED, "blue": BLUE}
except NameError:
    PALETTE = {}


def get(name: str) -> Color:
    return PALETTE.get(name, RED)
