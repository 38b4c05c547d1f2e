"""The cross-file benchmark's dataset, its pure parts: definitions, uses and target lines of a fixture package, the
seeded draw, and the pinned sdist's extraction (from an archive made here: no network, no standard library)."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import platform
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from bench import crossfile_sources
from bench.crossfile_sources import (
    REQUESTS,
    PackageFile,
    SourceError,
    bound_names,
    crossfile_candidates,
    crossfile_targets,
    defined_names,
    draw_order,
    load_package_files,
    package_file,
    sdist_command,
    sources_info,
)

PKG = Path(__file__).parent / "data" / "crossfile" / "pkg"


def fixture_files(package: str = "pkg") -> list[PackageFile]:
    return [package_file(package, f"pkg/{p.name}", p.read_bytes()) for p in sorted(PKG.glob("*.py"))]


def text_of(name: str) -> str:
    return (PKG / name).read_text()


# -- definitions ----------------------------------------------------------------------------------------------------

def test_defined_names_are_module_level_names_methods_and_class_attributes_not_imports() -> None:
    # not `math`, `dataclass` (imports), `__all__`, `__init__` (dunders), `grow` (nested), `radius` (an instance's)
    assert defined_names(text_of("shapes.py")) == {"UNIT", "Square", "side", "sides", "area", "Circle",
                                                   "make_square", "mean"}
    # `PALETTE` inside try/except is module level too; `NamedTuple` is imported
    assert defined_names(text_of("colors.py")) == {"Color", "red", "green", "blue", "mix", "RED", "BLUE", "PALETTE",
                                                   "get"}
    assert defined_names(text_of("render.py")) == {"SCALE", "describe", "draw"}


def test_bound_names_are_every_local_binding_and_imports_from_outside_the_package() -> None:
    bound = bound_names(ast.parse(text_of("render.py")), "pkg")
    assert {"area", "shape", "color", "mixed", "note", "lines", "SCALE"} <= bound  # locals and parameters too
    assert not bound & {"Color", "RED", "UNIT", "make_square"}  # imported from the package: uses of its files
    assert "statistics" in bound_names(ast.parse(text_of("layout.py")), "pkg")  # `import statistics`


# -- targets --------------------------------------------------------------------------------------------------------

def test_candidates_use_names_that_only_other_files_define() -> None:
    files = fixture_files()
    found = {(files[k].path, files[k].text.splitlines()[i].strip(), names)
             for k, i, names in crossfile_candidates(files, min_bytes=0)}
    assert found == {
        ("pkg/layout.py", "squares = [shapes.make_square(i + shapes.UNIT) for i in range(count)]",
         ("UNIT", "make_square")),
        ("pkg/layout.py", "total = sum(s.area() for s in squares)", ("area",)),
        ("pkg/layout.py", "rows = render.draw(", ("draw",)),  # its continuation line `colors.RED)` is not one
        ("pkg/render.py", "def draw(color: Color = RED) -> list[str]:", ("Color", "RED")),
        ("pkg/render.py", "shapes = [make_square(UNIT), Circle(UNIT * SCALE)]", ("Circle", "UNIT", "make_square")),
        ("pkg/render.py", "mixed = color.mix(BLUE)", ("BLUE", "mix")),
        ("pkg/render.py", "if mixed.red > 100:", ("red",)),
    }
    # not: `area = shape.area()` (render.py binds `area`), `shape.sides` (in an f-string), `statistics.mean(...)` (an
    # outside module's), `{...}.get(...)` (a dict's, though colors.py defines `get`)


def test_a_line_inside_a_string_or_a_comment_is_never_a_target() -> None:
    files = fixture_files()
    render = next(k for k, f in enumerate(files) if f.path == "pkg/render.py")
    lines = files[render].text.splitlines()
    picked = [i for k, i, _ in crossfile_candidates(files, min_bytes=0) if k == render]
    # the docstring and `note` repeat two target lines word for word: only the code is picked
    repeated = {"    shapes = [make_square(UNIT), Circle(UNIT * SCALE)]": 19, "    mixed = color.mix(BLUE)": 20}
    for line, code in repeated.items():
        assert [i for i, x in enumerate(lines) if x == line and i in picked] == [code] and lines.count(line) == 2
    assert not any(lines[i].lstrip().startswith(("#", '"""')) for i in picked)


def test_targets_are_emptied_lines_with_their_names_and_defining_files() -> None:
    files = fixture_files()
    by_path = {f.path: f for f in files}
    targets = crossfile_targets(files, 100, min_bytes=0)
    assert len(targets) == 7 and targets == sorted(targets, key=lambda t: (t.target.name, t.target.cursor))
    for t in targets:
        original = by_path[t.target.name].text
        assert t.target.source == "pkg"
        assert t.target.text[:t.target.cursor] + t.target.expected + t.target.text[t.target.cursor:] == original
        line_start = t.target.text.rfind("\n", 0, t.target.cursor) + 1
        assert not t.target.text[line_start:t.target.cursor].strip()  # the indentation stays
        assert t.target.text[t.target.cursor] == "\n" and t.target.expected == t.target.expected.strip()
        assert all(n in t.target.expected for n in t.names)
        own = defined_names(original) | bound_names(ast.parse(original), "pkg")
        assert t.names and not set(t.names) & own
        assert t.defining and t.target.name not in t.defining
        assert set(t.names) <= set().union(*(defined_names(by_path[p].text) for p in t.defining))
    assert {t.defining for t in targets if "make_square" in t.names} == {("pkg/shapes.py",)}


def test_short_files_are_only_defining_files_by_default() -> None:
    assert crossfile_targets(fixture_files(), 100) == []  # every fixture file is under MIN_BYTES


def test_the_draw_is_seeded_and_a_smaller_limit_takes_a_prefix() -> None:
    files = fixture_files()
    large = crossfile_targets(files, 5, min_bytes=0)
    assert large == crossfile_targets(files, 5, min_bytes=0)
    small = crossfile_targets(files, 2, min_bytes=0)
    assert len(small) == 2 and set(small) <= set(large)
    order = draw_order(files, crossfile_candidates(files, min_bytes=0))
    assert sorted(order[:2]) == [(files.index(next(f for f in files if f.path == t.target.name)),
                                  t.target.text.count("\n", 0, t.target.cursor), t.names) for t in small]
    others = [draw_order(files, crossfile_candidates(files, min_bytes=0), seed) for seed in range(1, 6)]
    assert any(o != order for o in others) and all(sorted(o) == sorted(order) for o in others)


def test_the_draw_caps_files_and_alternates_kinds_of_package(monkeypatch: pytest.MonkeyPatch) -> None:
    files = fixture_files() + fixture_files("stdlib/pkg")  # the same files in a second package of another kind
    order = draw_order(files, crossfile_candidates(files, min_bytes=0))
    kinds = [files[k].package for k, _, _ in order]
    assert kinds == ["pkg", "stdlib/pkg"] * 7
    monkeypatch.setattr(crossfile_sources, "PER_FILE", 1)
    capped = draw_order(files, crossfile_candidates(files, min_bytes=0))
    assert sorted((files[k].package, files[k].path) for k, _, _ in capped) == sorted(
        (p, f"pkg/{name}") for p in ("pkg", "stdlib/pkg") for name in ("layout.py", "render.py"))


# -- sources --------------------------------------------------------------------------------------------------------

def test_requests_is_a_pinned_sdist() -> None:
    assert REQUESTS.version == "2.32.3" and REQUESTS.archive == "requests-2.32.3.tar.gz"
    assert len(REQUESTS.sha256) == 64 and int(REQUESTS.sha256, 16) >= 0
    assert len(REQUESTS.files) == 18 and all(f.startswith("requests/") and f.endswith(".py") for f in REQUESTS.files)
    command = sdist_command(REQUESTS, Path("/x"))
    assert "requests==2.32.3" in command and command[command.index("--no-binary") + 1] == "requests"
    assert sources_info()["stdlib"]["python"] == platform.python_version()
    assert sources_info()["requests"]["sha256"] == REQUESTS.sha256


def _sdist(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_load_extracts_only_the_package_files_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {f"requests/{p.name}": p.read_bytes() for p in sorted(PKG.glob("*.py"))}
    payload = _sdist({**{f"requests-2.32.3/src/{k}": v for k, v in body.items()},
                      "requests-2.32.3/setup.py": b"raise SystemExit\n",
                      "requests-2.32.3/tests/test_x.py": b"x = 1\n"})
    pinned = replace(REQUESTS, sha256=hashlib.sha256(payload).hexdigest(), files=tuple(body))
    monkeypatch.setattr(crossfile_sources, "REQUESTS", pinned)
    data = tmp_path / "data"
    (data / "archives").mkdir(parents=True)
    (data / "archives" / REQUESTS.archive).write_bytes(payload)
    files = load_package_files(data, stdlib=())
    assert [(f.package, f.path) for f in files] == [("requests", p) for p in sorted(body)]
    assert all(f.sha256 == hashlib.sha256(body[f.path]).hexdigest() for f in files)
    assert not (data / "requests-2.32.3" / "setup.py").exists() and not (data / "requests-2.32.3" / "tests").exists()

    def offline(*args: object) -> None:
        raise AssertionError("no download when the files are there")

    (data / "archives" / REQUESTS.archive).unlink()
    monkeypatch.setattr(crossfile_sources, "download_sdist", offline)
    assert load_package_files(data, stdlib=()) == files


def test_an_sdist_that_is_not_the_pinned_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _sdist({"requests-2.32.3/src/requests/api.py": b"x = 1\n"})
    monkeypatch.setattr(crossfile_sources, "REQUESTS", replace(REQUESTS, sha256="0" * 64, files=("requests/api.py",)))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / REQUESTS.archive).write_bytes(payload)
    with pytest.raises(SourceError, match="not the pinned"):
        load_package_files(tmp_path, stdlib=())


# -- the whole run ----------------------------------------------------------------------------------------------

def test_the_benchmark_on_the_tiny_model_over_the_fixture_package(tiny_gguf: Path, tiny_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Both servers answer every target; the one with the setting places context; the in-process phase compares
    the borrowed-rows prompt with a fresh encode of the same ids at the targets that get context."""
    from bench import crossfile

    monkeypatch.setattr(crossfile, "load_package_files", lambda data: fixture_files())
    monkeypatch.setattr(crossfile, "crossfile_targets", lambda files, limit: crossfile_targets(files, limit,
                                                                                                min_bytes=0))
    out = tmp_path / "crossfile.json"
    summary = crossfile.run_crossfile_bench(str(tiny_gguf), cache=tiny_cache, json_out=out, limit=4, tokens=256,
                                            agreement_targets=2)
    assert json.loads(out.read_text())["results"] == summary["results"]
    rows = summary["rows"]
    assert [r["mode"] for r in rows].count("on") == [r["mode"] for r in rows].count("off") == 4
    assert all(r["context_tokens"] == 0 for r in rows if r["mode"] == "off")
    assert any(r["context_tokens"] > 0 for r in rows if r["mode"] == "on")
    assert summary["results"]["all"]["on"]["n"] == 4
    approx = summary["agreement"]
    assert approx["targets"] == 2 and 1 <= approx["with_context"] <= 2
    assert 0 <= approx["next_token_agreement"] <= 1 and set(approx["exact"]) == {"off", "borrowed", "fresh", "oracle"}
    assert set(summary["memory"]) == {"off", "on"}
    assert "| all | 4 |" in capsys.readouterr().out
    alone = crossfile.run_crossfile_bench(str(tiny_gguf), cache=tiny_cache, json_out=out, limit=4, tokens=256,
                                          agreement_targets=2, served=False)  # --no-served: the in-process phase
    assert alone["rows"] == [] and alone["results"] == {} and alone["agreement"] == approx
