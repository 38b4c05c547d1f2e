"""`superpie bench languages`, its pure parts: target lines from fixture texts, the measures, the summary, and the
pinned sources' download and extraction (from archives made here: no network, no model)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from bench.cold import Target
from bench.language_sources import (
    LANGUAGES,
    SOURCES,
    Source,
    SourceError,
    SourceFile,
    download_command,
    fetch,
    load_sources,
    normalized,
)
from bench.languages import (
    MODES,
    TEXT_RULES_SUFFIX,
    bracket_balance,
    duplicates_suffix,
    format_table,
    language_targets,
    measure,
    same_start,
    summarize,
    target_lines,
)
from inference.syntax.languages import language_of
from lsp_server.cli import BENCH_SUITES

DATA = Path(__file__).parent / "data" / "languages"
GO = (DATA / "sample.go").read_text()
PY = (DATA / "sample.py").read_text()


def source_file(language: str, text: str, name: str = "f") -> SourceFile:
    return SourceFile(language, name, text, hashlib.sha256(text.encode()).hexdigest())


# -- targets --------------------------------------------------------------------------------------------------------

def test_target_lines_are_code_not_comments_docstrings_or_closers() -> None:
    # Go: not the comment lines, the block comment, the lone `)` and `}`, the raw string's lines, blank lines
    assert target_lines(GO, "go") == [1, 3, 4, 5, 12, 14, 15, 17, 18, 24, 25]
    # Python: not the module docstring, the one-line docstring, the comment, the lone `]`
    assert target_lines(PY, "python") == [5, 7, 10, 13, 14, 15, 16, 20, 21, 22]


def test_targets_are_emptied_after_the_indentation_with_a_fixed_seed() -> None:
    files = [source_file("go", GO, "a.go"), source_file("python", PY, "b.py")]
    targets = language_targets(files, 6)
    assert targets == language_targets(files, 6)  # the same draw every time
    assert len(targets) == 6 and targets == sorted(targets, key=lambda t: (t.name, t.cursor))
    small = language_targets(files, 3)
    assert set(small) <= set(targets)  # a smaller limit draws a prefix of a larger one's targets
    assert len(language_targets(files, 1000)) == 21  # every candidate once
    for t in targets:
        original = GO if t.name == "a.go" else PY
        assert t.source == ("go" if t.name == "a.go" else "python")
        assert t.text[:t.cursor] + t.expected + t.text[t.cursor:] == original
        line_start = t.text.rfind("\n", 0, t.cursor) + 1
        assert not t.text[line_start:t.cursor].strip()  # the indentation stays
        assert t.text[t.cursor] == "\n" and t.expected == t.expected.strip()


# -- measures -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, language, balance", [
    ('return fmt.Sprintf("(%s)", s)', "go", (0, 0, 0)),
    ("if len(words) == 0 {", "go", (0, 0, 1)),
    ('foo(a, "(" // )', "go", (1, 0, 0)),
    ("} else {", "go", (0, 0, 0)),
    ("})", "javascript", (-1, 0, -1)),
    ("x = `${(}`; /* ] */ [", "typescript", (0, 1, 0)),
    ("return [", "python", (0, 1, 0)),
    ('x = f(a, "[")  # ]]', "python", (0, 0, 0)),
    ("char c = '(';", "c", (0, 0, 0)),
])
def test_bracket_balance_ignores_strings_and_comments(line: str, language: str, balance: tuple[int, ...]) -> None:
    assert bracket_balance(line, language) == balance


def _target(text: str, line: int, language: str) -> Target:
    targets = {t.expected: t for t in language_targets([source_file(language, text)], 1000)}
    expected = text.splitlines()[line].strip()
    return targets[expected]


def test_measure_exact_similarity_and_brackets() -> None:
    target = _target(GO, 14, "go")  # `if len(words) == 0 {`
    right = measure("if len(words) == 0 {\n\t\treturn \"\"\n\t}", target)
    assert right["exact"] and right["similarity"] == 1.0 and not right["bracket_mismatch"] and not right["empty"]
    assert right["first_line"] == "if len(words) == 0 {"
    close = measure("if len(words) == 0 {}", target)  # closed on its line: the balance differs
    assert not close["exact"] and 0.9 < close["similarity"] < 1.0 and close["bracket_mismatch"]
    assert close["bracket_mismatch_same_start"]  # the same clause, closed on its line
    other = measure("return strings.Join(words, sep)", target)  # another statement, balanced
    assert other["bracket_mismatch"] and not other["bracket_mismatch_same_start"]
    empty = measure("", target)
    assert empty["empty"] and not empty["exact"] and empty["similarity"] == 0.0 and empty["bracket_mismatch"]
    assert measure("  if len(words) == 0 {  ", target)["exact"]  # compared stripped


@pytest.mark.parametrize("line, expected, same", [
    ("t.Union[]", "t.Union[", True),
    ("foo(a, b)", "foo(", True),
    ("foo(a)", "bar(a", False),
    ("x = 1", "x = 1 + (", False),  # the real line has a bracket where the other has none
    ('s = "(" + f(', 's = "(" + g(', False),  # a bracket inside a string is not the first bracket
    ('s = "(" + f(', 's = "(" + f(x)', True),
])
def test_same_start_is_agreement_up_to_the_first_bracket(line: str, expected: str, same: bool) -> None:
    assert same_start(line, expected, "python") is same


def test_a_completion_repeating_the_next_line_is_a_suffix_duplication() -> None:
    target = _target(PY, 15, "python")  # `w.lower()`, before `for w in found`
    assert duplicates_suffix("for w in found", target)
    assert duplicates_suffix("w.lower()\n        for w in found", target)  # the whole text's last line
    assert duplicates_suffix("for w in found\n        if w", target) is True  # its first line
    assert not duplicates_suffix("w.lower()", target) and not duplicates_suffix("", target)
    assert measure("for w in found", target)["duplicated"]


def test_summary_and_table() -> None:
    rows = [{"language": lang, "mode": mode, "exact": exact, "similarity": sim, "duplicated": dup,
             "bracket_mismatch": brackets, "bracket_mismatch_same_start": False, "empty": False, "latency_ms": ms}
            for lang, mode, exact, sim, dup, brackets, ms in [
                ("go", "rules", True, 1.0, False, False, 100.0), ("go", "rules", False, 0.5, True, True, 300.0),
                ("go", "text", False, 0.25, True, False, 200.0), ("go", "text", False, 0.75, True, True, 400.0),
                ("python", "rules", True, 1.0, False, False, 50.0), ("python", "text", True, 1.0, False, False, 70.0)]]
    summary = summarize(rows)
    assert list(summary) == ["python", "go", "all"]  # in LANGUAGES' order, then all of them
    assert summary["go"]["rules"] == {"n": 2, "exact": 0.5, "similarity": 0.75, "duplicated": 1,
                                      "bracket_mismatch": 1, "bracket_mismatch_same_start": 0, "empty": 0,
                                      "p50_ms": 200.0}
    assert summary["go"]["text"]["duplicated"] == 2 and summary["go"]["text"]["similarity"] == 0.5
    assert summary["all"]["rules"]["n"] == 3 and summary["all"]["text"]["exact"] == round(1 / 3, 4)
    table = format_table(summary)
    assert "| go | 2 / 2 | 0.50 / 0.00 | 0.75 / 0.50 | 1 / 2 | 1 / 1 | 0 / 0 | 0 / 0 | 200 / 300 |" in table
    assert table.count("\n") == 4 and MODES == ("rules", "text")


def test_the_baseline_uri_gets_the_text_rules() -> None:
    """The server takes the language from the extension when the id is plaintext: the baseline's path hides it."""
    assert language_of("plaintext", "file:///languages/x/errors.go" + TEXT_RULES_SUFFIX).name == "plaintext"
    assert language_of("go", "file:///languages/x/errors.go").name == "go"


# -- sources ------------------------------------------------------------------------------------------------------

def test_every_language_has_pinned_sources() -> None:
    assert "languages" in BENCH_SUITES
    assert {s.language for s in SOURCES} == set(LANGUAGES)
    for s in SOURCES:
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0 and s.files and s.version
        assert s.registry in ("npm", "debian", "pypi") and s.archive.endswith((".tgz", ".deb", ".whl"))
    assert download_command(SOURCES[1], Path("/x"))[:3] == ["npm", "pack", "semver@7.6.3"]
    assert download_command(SOURCES[3], Path("/x")) == ["apt-get", "download", "golang-github-pkg-errors-dev=0.9.1-2"]
    assert "packaging==24.1" in download_command(SOURCES[0], Path("/x"))


def _pinned(tmp_path: Path, archive_name: str, payload: bytes, root: str, registry: str = "npm") -> Source:
    archives = tmp_path / "data" / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    (archives / archive_name).write_bytes(payload)
    return Source("go", registry, "pkg", "1.0", archive_name, hashlib.sha256(payload).hexdigest(), root, ("a/x.go",))


def _tgz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_fetch_extracts_the_named_files_of_a_pinned_tgz(tmp_path: Path) -> None:
    body = GO.encode() * 5  # 2-40 KB
    source = _pinned(tmp_path, "pkg-1.0.tgz", _tgz({"package/a/x.go": body, "package/other.go": b"x"}), "package/")
    folder = fetch(source, tmp_path / "data")
    assert (folder / "a" / "x.go").read_bytes() == body and not (folder / "other.go").exists()
    files = load_sources(tmp_path / "data", ("go",), (source,))
    assert [(f.language, f.name) for f in files] == [("go", "pkg-1.0/a/x.go")]
    assert files[0].text == GO * 5 and files[0].sha256 == hashlib.sha256(body).hexdigest()
    with pytest.raises(SourceError, match="bytes, not"):  # too small a file is refused
        small = _pinned(tmp_path / "s", "s.tgz", _tgz({"package/a/x.go": b"tiny"}), "package/")
        load_sources(tmp_path / "s" / "data", ("go",), (small,))


def test_an_archive_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    source = _pinned(tmp_path, "pkg-1.0.tgz", _tgz({"package/a/x.go": GO.encode()}), "package/")
    with pytest.raises(SourceError, match="not the pinned"):
        fetch(replace(source, sha256="0" * 64), tmp_path / "data")


def test_fetch_reads_wheels_and_debs(tmp_path: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("pkg/a/x.go", GO)
    wheel = _pinned(tmp_path / "whl", "pkg-1.0-py3-none-any.whl", out.getvalue(), "pkg/", "pypi")
    assert (fetch(wheel, tmp_path / "whl" / "data") / "a" / "x.go").read_text() == GO
    if shutil.which("dpkg-deb") is None:
        pytest.skip("no dpkg-deb here")
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: pkg\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@x>\n"
                                             "Description: a test\n")
    (tree / "usr" / "share" / "gocode" / "a").mkdir(parents=True)
    (tree / "usr" / "share" / "gocode" / "a" / "x.go").write_text(GO)
    deb = tmp_path / "pkg.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    source = _pinned(tmp_path / "deb", "pkg_1.0_all.deb", deb.read_bytes(), "./usr/share/gocode/", "debian")
    assert (fetch(source, tmp_path / "deb" / "data") / "a" / "x.go").read_text() == GO


def test_text_is_normalized_to_newlines() -> None:
    assert normalized(b"a\r\nb\rc\n") == "a\nb\nc\n"
