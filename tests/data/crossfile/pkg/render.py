"""Draw shapes in colors.

An example, not code to complete:

    shapes = [make_square(UNIT), Circle(UNIT * SCALE)]
"""

from .colors import BLUE, RED, Color
from .shapes import UNIT, Circle, make_square

SCALE = 2


def describe(shape) -> str:
    area = shape.area()
    return f"{shape.sides} sides, {area * SCALE:.1f}"


def draw(color: Color = RED) -> list[str]:
    shapes = [make_square(UNIT), Circle(UNIT * SCALE)]
    mixed = color.mix(BLUE)
    note = """
    mixed = color.mix(BLUE)
    """
    # Circle(UNIT) in a comment
    lines = []
    for shape in shapes:
        lines.append(describe(shape) + note)
    if mixed.red > 100:
        lines.append(str(mixed))
    return lines
