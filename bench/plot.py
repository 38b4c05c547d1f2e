"""The README's plots, as plain SVG written by hand (the benchmarks need no plotting library):

- the PIE benchmark's cache-update time against buffer size, one dot per record and mode;
- the cold-start benchmark's time to the first answer against file size, main against now;
- the typing benchmark's pause latencies, sorted (a distribution), main against now, and llama.cpp where the
  run had it.

    python -m bench.plot [PIE_JSON] [SVG_OUT]
    python -m bench.plot cold [MAIN_JSON] [NOW_JSON] [SVG_OUT]
    python -m bench.plot typing [MAIN_JSON] [NOW_JSON] [SVG_OUT]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.pie import DEFAULT_JSON, MODES

DEFAULT_SVG = DEFAULT_JSON.with_name("pie-update-time.svg")
COLD_JSON, COLD_MAIN_JSON = DEFAULT_JSON.with_name("cold-served.json"), DEFAULT_JSON.with_name("cold-served-main.json")
COLD_SVG = DEFAULT_JSON.with_name("cold-first-answer.svg")
TYPING_JSON, TYPING_MAIN_JSON = DEFAULT_JSON.with_name("typing.json"), DEFAULT_JSON.with_name("typing-main-3d2f8e8.json")
TYPING_SVG = DEFAULT_JSON.with_name("typing-pauses.svg")
COLORS = {"pie": "#1f77b4", "conflict-fast": "#ff7f0e", "full": "#d62728", "now": "#1f77b4", "main": "#d62728",
          "llama.cpp": "#2ca02c"}
WIDTH, HEIGHT, MARGIN = 640, 360, 56


def _scale(lo: float, hi: float, a: float, b: float):
    return lambda v: a + (v - lo) / (hi - lo or 1) * (b - a)


def dot_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, *,
             log_x: bool = False, x_step: int | None = None) -> str:
    """Dots per named series, y on a log scale (x too with `log_x`, else ticks `x_step` apart), a legend in the
    corner."""
    points = [(x, y, name) for name, dots in series.items() for x, y in dots]
    if not points:
        raise ValueError("nothing to plot")
    fx = (lambda v: math.log10(max(v, 1))) if log_x else (lambda v: v)
    lo_y = 10 ** math.floor(math.log10(max(min(y for _, y, _ in points), 1e-3)))
    hi_y = 10 ** math.ceil(math.log10(max(y for _, y, _ in points)))
    lo_x = math.floor(min(fx(x) for x, _, _ in points)) if log_x else 0
    hi_x = max(fx(x) for x, _, _ in points)
    hi_x = math.ceil(hi_x) if log_x else hi_x
    x = _scale(lo_x, hi_x, MARGIN, WIDTH - 16)
    y = _scale(math.log10(lo_y), math.log10(hi_y), HEIGHT - MARGIN, 16)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
             'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 16}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
             f'<line x1="{MARGIN}" y1="16" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>']
    decade = lo_y
    while decade <= hi_y:
        yy = y(math.log10(decade))
        parts.append(f'<line x1="{MARGIN}" y1="{yy:.1f}" x2="{WIDTH - 16}" y2="{yy:.1f}" stroke="#ddd"/>'
                     f'<text x="{MARGIN - 6}" y="{yy + 4:.1f}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    if log_x:
        ticks = [(e, f"{10 ** e:g}") for e in range(int(lo_x), int(hi_x) + 1)]
    else:
        step = x_step or (1000 if hi_x > 3000 else 500)
        ticks = [(t, str(t)) for t in range(0, int(hi_x) + 1, step)]
    for value, label in ticks:
        anchor = "end" if x(value) > WIDTH - 40 else "middle"  # the last label stays inside the picture
        parts.append(f'<text x="{x(value):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="{anchor}">{label}</text>')
    parts.append(f'<text x="{(WIDTH + MARGIN) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{x_label}</text>'
                 f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" text-anchor="middle">'
                 f'{y_label}</text>')
    for px, py, name in points:
        parts.append(f'<circle cx="{x(fx(px)):.1f}" cy="{y(math.log10(max(py, lo_y))):.1f}" r="3" '
                     f'fill="{COLORS[name]}" fill-opacity="0.7"/>')
    for i, name in enumerate(series):
        parts.append(f'<circle cx="{MARGIN + 16}" cy="{24 + 16 * i}" r="4" fill="{COLORS[name]}"/>'
                     f'<text x="{MARGIN + 26}" y="{28 + 16 * i}">{name}</text>')
    return "\n".join([*parts, "</svg>\n"])


def update_time_svg(summary: dict[str, Any]) -> str:
    """Update milliseconds (log scale) against tokens in the buffer, per mode."""
    if not summary["records"]:
        raise ValueError("the benchmark JSON has no records to plot")
    series = {mode: [(r["tokens"], r["update_s"][mode] * 1e3) for r in summary["records"]] for mode in MODES}
    return dot_plot(series, "tokens in the buffer", "cache update, ms (log)")


def cold_answer_svg(main: dict[str, Any], now: dict[str, Any]) -> str:
    """Seconds to the first answer in a freshly opened file (log) against its size (log), main and now."""
    series = {name: [(row["bytes"], row["latency_s"]) for row in summary["served_rows"]]
              for name, summary in (("main", main), ("now", now))}
    return dot_plot(series, "file size, bytes (log)", "first answer, s (log)", log_x=True)


def typing_pauses_svg(main: dict[str, Any], now: dict[str, Any]) -> str:
    """Each engine's pause latencies (ms, log) in rising order against their percentile: superpie on main and now,
    and the peer where `now` ran it."""
    runs = [("main", main["engines"]["superpie"]), ("now", now["engines"]["superpie"])]
    runs += [(name, engine) for name, engine in now["engines"].items() if name != "superpie"]
    series = {}
    for name, engine in runs:
        latencies = sorted(pause["latency_ms"] for line in engine["lines"] for pause in line["pauses"])
        series[name] = [(100 * (i + 0.5) / len(latencies), ms) for i, ms in enumerate(latencies)]
    return dot_plot(series, "pauses, percentile", "pause → suggestion, ms (log)", x_step=25)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["typing"]:
        paths = [Path(a) for a in args[1:]]
        main_json, now_json, target = (paths + [TYPING_MAIN_JSON, TYPING_JSON, TYPING_SVG][len(paths):])[:3]
        svg = typing_pauses_svg(json.loads(main_json.read_text()), json.loads(now_json.read_text()))
    elif args[:1] == ["cold"]:
        paths = [Path(a) for a in args[1:]]
        main_json, now_json, target = (paths + [COLD_MAIN_JSON, COLD_JSON, COLD_SVG][len(paths):])[:3]
        svg = cold_answer_svg(json.loads(main_json.read_text()), json.loads(now_json.read_text()))
    else:
        source = Path(args[0]) if args else DEFAULT_JSON
        target = Path(args[1]) if len(args) > 1 else DEFAULT_SVG
        svg = update_time_svg(json.loads(source.read_text()))
    target.write_text(svg, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
