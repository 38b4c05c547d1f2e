"""Lay shapes out on a grid."""

import statistics

from . import colors, render, shapes

GRID = 3


def layout(count: int) -> list[str]:
    squares = [shapes.make_square(i + shapes.UNIT) for i in range(count)]
    total = sum(s.area() for s in squares)
    middle = statistics.mean([count, GRID])
    rows = render.draw(
        colors.RED)
    named = {"unit": GRID}.get("unit")
    return rows[:GRID] + [str(total), str(middle), str(named)]
