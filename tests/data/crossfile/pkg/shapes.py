"""Shapes with an area: what render.py and layout.py draw."""

import math
from dataclasses import dataclass

UNIT = 1.0
__all__ = ["Circle", "Square", "make_square", "mean"]


@dataclass
class Square:
    side: float = UNIT
    sides = 4

    def area(self) -> float:
        return self.side * self.side


class Circle:
    def __init__(self, radius: float) -> None:
        self.radius = radius

    def area(self) -> float:
        return math.pi * self.radius ** 2


def make_square(side: float) -> Square:
    def grow(by: float) -> float:
        return side + by
    return Square(grow(0.0))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
