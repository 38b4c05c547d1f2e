"""The PIE benchmark's plot for the README: cache-update time against buffer size, one dot per record.

A plain SVG written by hand, so the benchmark needs no plotting library.

    python -m bench.plot [PIE_JSON] [SVG_OUT]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.pie import DEFAULT_JSON, MODES

DEFAULT_SVG = DEFAULT_JSON.with_name("pie-update-time.svg")
COLORS = {"pie": "#1f77b4", "conflict-fast": "#ff7f0e", "full": "#d62728"}
WIDTH, HEIGHT, MARGIN = 640, 360, 56


def _scale(lo: float, hi: float, a: float, b: float):
    return lambda v: a + (v - lo) / (hi - lo or 1) * (b - a)


def update_time_svg(summary: dict[str, Any]) -> str:
    """Update milliseconds (log scale) against tokens in the buffer, per mode."""
    points = [(r["tokens"], mode, r["update_s"][mode] * 1e3) for r in summary["records"] for mode in MODES]
    if not points:
        raise ValueError("the benchmark JSON has no records to plot")
    max_tokens = max(t for t, _, _ in points)
    lo_ms = 10 ** math.floor(math.log10(max(min(ms for _, _, ms in points), 1e-3)))
    hi_ms = 10 ** math.ceil(math.log10(max(ms for _, _, ms in points)))
    x = _scale(0, max_tokens, MARGIN, WIDTH - 16)
    y = _scale(math.log10(lo_ms), math.log10(hi_ms), HEIGHT - MARGIN, 16)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
             'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 16}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
             f'<line x1="{MARGIN}" y1="16" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>']
    decade = lo_ms
    while decade <= hi_ms:
        yy = y(math.log10(decade))
        parts.append(f'<line x1="{MARGIN}" y1="{yy:.1f}" x2="{WIDTH - 16}" y2="{yy:.1f}" stroke="#ddd"/>'
                     f'<text x="{MARGIN - 6}" y="{yy + 4:.1f}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    for tick in range(0, max_tokens + 1, 1000 if max_tokens > 3000 else 500):
        parts.append(f'<text x="{x(tick):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{tick}</text>')
    parts.append(f'<text x="{(WIDTH + MARGIN) / 2}" y="{HEIGHT - 12}" text-anchor="middle">tokens in the buffer</text>'
                 f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" text-anchor="middle">'
                 'cache update, ms (log)</text>')
    for tokens, mode, ms in points:
        parts.append(f'<circle cx="{x(tokens):.1f}" cy="{y(math.log10(max(ms, lo_ms))):.1f}" r="3" '
                     f'fill="{COLORS[mode]}" fill-opacity="0.7"/>')
    for i, mode in enumerate(MODES):
        parts.append(f'<circle cx="{MARGIN + 16}" cy="{24 + 16 * i}" r="4" fill="{COLORS[mode]}"/>'
                     f'<text x="{MARGIN + 26}" y="{28 + 16 * i}">{mode}</text>')
    return "\n".join([*parts, "</svg>\n"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else DEFAULT_JSON
    target = Path(args[1]) if len(args) > 1 else DEFAULT_SVG
    target.write_text(update_time_svg(json.loads(source.read_text())), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
