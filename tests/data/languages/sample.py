"""A fixture for tests/test_bench_languages.py.

Its docstring spans lines.
"""

import re

PATTERN = re.compile(r"[a-z]+")  # a comment


def words(text):
    """Split `text` into words."""
    # a comment line
    found = PATTERN.findall(text)
    return [
        w.lower()
        for w in found
    ]


class Box:
    def __init__(self, items):
        self.items = list(items)
