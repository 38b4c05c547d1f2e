"""The code `superpie bench crossfile` completes: lines that use a name another file of their package defines.

Repository-level next line: the target line uses a name (a function, class, constant, method or class attribute)
that another file of the same package defines and its own file does not, so that the right answer needs that other
file. Two kinds of package:

| package | source | version | files |
|---|---|---|---|
| requests | PyPI sdist (`pip download --no-binary requests`) | 2.32.3 | `requests-2.32.3/src/requests/*.py` (18) |
| stdlib/<name> | the running interpreter's standard library | its own | the top-level `*.py` of STDLIB_PACKAGES |

The sdist is pinned by its SHA-256 (REQUESTS below) and only its `src/requests/*.py` are extracted (with tarfile: no
install, no import) into `--data`, by default `$SUPERPIE_CACHE/bench-crossfile/`; pip prepares the sdist's metadata
in an isolated build environment, which is why the download is the only step that needs the network. The standard
library is read where it is: its text depends on the interpreter, so `sources_info()` records the version. Every
file of a package may define names; only files of MIN_BYTES–MAX_BYTES are target files.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import platform
import random
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cold import Target, _emptied
from bench.language_sources import (
    MAX_BYTES,
    MIN_BYTES,
    Source,
    SourceError,
    fetch,
    normalized,
)
from bench.lsp import split_lines
from inference.fetch import cache_root

_REQUESTS_MODULES = ("__init__", "__version__", "_internal_utils", "adapters", "api", "auth", "certs", "compat",
                     "cookies", "exceptions", "help", "hooks", "models", "packages", "sessions", "status_codes",
                     "structures", "utils")
REQUESTS = Source("python", "pypi", "requests", "2.32.3", "requests-2.32.3.tar.gz",
                  "55365417734eb18255590a9ff9eb97e9e1da868d4ccd6402399eaf68af20a760", "requests-2.32.3/src/",
                  tuple(f"requests/{m}.py" for m in _REQUESTS_MODULES))
# Not http, sqlite3: none of their files of MIN_BYTES–MAX_BYTES uses a name that another of their files defines
STDLIB_PACKAGES = ("json", "email", "importlib", "importlib/metadata", "importlib/resources", "logging",
                   "concurrent/futures", "asyncio", "urllib", "xml/etree", "wsgiref", "unittest", "multiprocessing",
                   "re", "tomllib", "zoneinfo")
PER_FILE = 8  # targets per file at most: no single file decides a package's score
# Names every Python file has without another one (builtins, methods of builtin types: `.get`, `.items`,
# `.append`): that another file also defines them is no evidence that the line needs it
GENERIC = frozenset(dir(builtins)).union(*(dir(t) for t in (str, bytes, int, float, list, dict, set, frozenset,
                                                              tuple, BaseException)))
_NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp, ast.SetComp,
               ast.DictComp, ast.GeneratorExp)
_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")  # a compound statement's fields below its header
Candidate = tuple[int, int, tuple[str, ...]]  # a file's index, a 0-based line, the cross-file names it reads


@dataclass(frozen=True)
class PackageFile:
    package: str  # "requests", "stdlib/email"
    path: str  # inside the package's folder: "requests/models.py" (the path a prompt shows)
    text: str
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class CrossTarget:
    """A line to complete and what makes it cross-file: the names it uses that other files define, and those
    files."""

    target: Target  # source: the package, name: the path
    names: tuple[str, ...]
    defining: tuple[str, ...]  # paths in the same package


# -- sources --------------------------------------------------------------------------------------------------------

def default_data() -> Path:
    return cache_root() / "bench-crossfile"


def sdist_command(source: Source, into: Path) -> list[str]:
    """pip's command that saves the source's sdist (not a wheel) in `into`."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", source.package, "--quiet",
            f"{source.package}=={source.version}", "-d", str(into)]


def download_sdist(source: Source, archives: Path) -> None:
    """The sdist saved in `archives` unless it is there (language_sources.fetch checks its SHA-256)."""
    if (archives / source.archive).exists():
        return
    archives.mkdir(parents=True, exist_ok=True)
    command = sdist_command(source, archives)
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SourceError(f"{' '.join(command)}: {err}") from err
    if run.returncode != 0 or not (archives / source.archive).exists():
        raise SourceError(f"{' '.join(command)} failed: {(run.stderr or run.stdout).strip()[-500:]}")


def package_file(package: str, path: str, raw: bytes) -> PackageFile:
    return PackageFile(package, path, normalized(raw), hashlib.sha256(raw).hexdigest())


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_package_files(data: Path | None = None, stdlib: tuple[str, ...] = STDLIB_PACKAGES) -> list[PackageFile]:
    """requests' files (fetched into `data` once), then those of the `stdlib` packages, each sorted by path."""
    data = data or default_data()
    if not all((data / REQUESTS.name / f).is_file() for f in REQUESTS.files):
        download_sdist(REQUESTS, data / "archives")
    folder = fetch(REQUESTS, data)
    files = [package_file("requests", f, (folder / f).read_bytes()) for f in sorted(REQUESTS.files)]
    root = stdlib_folder()
    for name in stdlib:
        files += [package_file(f"stdlib/{name}", p.relative_to(root).as_posix(), p.read_bytes())
                  for p in sorted((root / name).glob("*.py"))]
    return files


def sources_info(stdlib: tuple[str, ...] = STDLIB_PACKAGES) -> dict[str, Any]:
    """What the files came from, for a benchmark's JSON: the pinned sdist, and the interpreter whose standard library
    the other packages are."""
    return {"requests": {k: v for k, v in asdict(REQUESTS).items() if k not in ("language", "files")},
            "stdlib": {"python": platform.python_version(), "implementation": platform.python_implementation(),
                       "folder": str(stdlib_folder()), "packages": list(stdlib)}}


# -- definitions and uses -------------------------------------------------------------------------------------------

def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _scope_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The nodes of one scope (a module's or a class's statements, into their if/try/with/for blocks), and the defs
    and classes it holds but not what is inside them."""
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _NEW_SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _scope_names(body: list[ast.stmt]) -> set[str]:
    """The names one scope's statements bind, imports aside."""
    out = set()
    for node in _scope_nodes(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
    return out


def defined_names(text: str) -> set[str]:
    """What a file defines for others: its module-level functions, classes and assigned names, and the methods and
    class attributes of its module-level classes; not what it imports, not `__dunder__` names."""
    tree = ast.parse(text)
    names = _scope_names(tree.body)
    for node in _scope_nodes(tree.body):
        if isinstance(node, ast.ClassDef):
            names |= _scope_names(node.body)
    return {n for n in names if not _dunder(n)}


def _from_package(node: ast.Import | ast.ImportFrom, alias: ast.alias, package: str) -> bool:
    """Whether an import takes the name from the package itself (relative, or under its dotted name)."""
    dotted = package.removeprefix("stdlib/").replace("/", ".")
    module = alias.name if isinstance(node, ast.Import) else node.module or ""
    return isinstance(node, ast.ImportFrom) and node.level > 0 or module == dotted or module.startswith(dotted + ".")


def outside_imports(tree: ast.AST, package: str) -> set[str]:
    """The names the file imports from outside its package (`import os`, `from urllib3 import x`)."""
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return {a.asname or a.name.split(".")[0] for node in imports for a in node.names
            if not _from_package(node, a, package)}


def bound_names(tree: ast.AST, package: str) -> set[str]:
    """Every name the file binds itself, at any depth: defs, classes, parameters, assigned names and attributes
    (`self.x = ...`), `except ... as` names, and what it imports from outside the package (`import json`: not
    models.py's `Response.json`); a name imported from the package is a use of its other file."""
    out = outside_imports(tree, package)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            out.add(node.name)
    return out


def _header_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """A statement's (or except clause's) nodes but its blocks, nor the fields of its f-strings (inside the
    string's quotes)."""
    stack = [child for field, value in ast.iter_fields(node) if field not in _BODIES
             for child in (value if isinstance(value, list) else [value]) if isinstance(child, ast.AST)]
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, ast.JoinedStr):
            stack.extend(ast.iter_child_nodes(child))


def line_uses(tree: ast.AST, lines: list[str], outside: set[str]) -> dict[int, set[str]]:
    """Per 0-based line that a statement or except clause starts (at the line's indentation: not a continuation
    line, nor a comment, a blank line or a string's inside), the names read on it: `Name`s and `Attribute`s' attrs
    of the statements that start on it, outside their blocks, but attributes of a module imported from `outside`
    the package (`os.close` is not a use of a class's `close`)."""
    starts: dict[int, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.stmt, ast.ExceptHandler)):
            starts.setdefault(node.lineno - 1, []).append(node)
    out = {}
    for i, nodes in starts.items():
        indent = len(lines[i]) - len(lines[i].lstrip())
        if not any(n.col_offset == indent for n in nodes):
            continue
        out[i] = {name for n in nodes for child in _header_nodes(n) if getattr(child, "lineno", None) == i + 1
                  for name in _read(child, outside)}
    return out


def _read(node: ast.AST, outside: set[str]) -> list[str]:
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return [node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and not (
            isinstance(node.value, ast.Name) and node.value.id in outside):
        return [node.attr]
    return []


# -- targets --------------------------------------------------------------------------------------------------------

def _definers(files: list[PackageFile]) -> dict[tuple[str, str], set[str]]:
    """(package, name) -> the paths of the package's files that define the name."""
    out: dict[tuple[str, str], set[str]] = {}
    for f in files:
        for name in defined_names(f.text):
            out.setdefault((f.package, name), set()).add(f.path)
    return out


def crossfile_candidates(files: list[PackageFile], *, min_bytes: int = MIN_BYTES,
                         max_bytes: int = MAX_BYTES) -> list[Candidate]:
    """Every line of the target files (of `min_bytes`–`max_bytes`) that reads a name another file of its package
    defines, its own file binds nowhere (nor imports from outside the package) and is not a builtin's or a builtin
    type's (GENERIC), in file and line order."""
    definers = _definers(files)
    out = []
    for k, f in enumerate(files):
        if not min_bytes <= len(f.text.encode()) <= max_bytes:
            continue
        tree = ast.parse(f.text)
        local = bound_names(tree, f.package) | defined_names(f.text)
        for i, names in sorted(line_uses(tree, split_lines(f.text), outside_imports(tree, f.package)).items()):
            cross = sorted(n for n in names - local - GENERIC if definers.get((f.package, n), set()) - {f.path})
            if cross:
                out.append((k, i, tuple(cross)))
    return out


def _interleaved(queues: list[list[Any]]) -> list[Any]:
    """One item of each queue in turn, until all are empty."""
    out, depth = [], max(map(len, queues), default=0)
    for j in range(depth):
        out += [q[j] for q in queues if j < len(q)]
    return out


def draw_order(files: list[PackageFile], candidates: list[Candidate], seed: int = 0) -> list[Candidate]:
    """The candidates in the order they are drawn: each package's shuffled with its own `random.Random` (seeded
    with the seed and the package's name: requests' draw does not depend on the interpreter's standard library),
    past PER_FILE per file dropped; the packages then take turns within their kind (requests, stdlib: the part of
    the name before "/"), and the kinds take turns, so that requests, pinned and the same on every machine, gives
    every other target."""
    packages: dict[str, list[Candidate]] = {}
    for c in candidates:
        packages.setdefault(files[c[0]].package, []).append(c)
    kinds: dict[str, list[list[Candidate]]] = {}
    for package, queue in packages.items():
        random.Random(f"{seed}:{package}").shuffle(queue)
        kept: list[Candidate] = []
        seen: dict[int, int] = {}
        for c in queue:
            seen[c[0]] = seen.get(c[0], 0) + 1
            if seen[c[0]] <= PER_FILE:
                kept.append(c)
        kinds.setdefault(package.split("/")[0], []).append(kept)
    return _interleaved([_interleaved(queues) for queues in kinds.values()])


def crossfile_targets(files: list[PackageFile], limit: int, seed: int = 0, *,
                      min_bytes: int = MIN_BYTES) -> list[CrossTarget]:
    """The first `limit` candidates of `draw_order` (a smaller limit takes a prefix of a larger one's draw), in file
    and line order, each line emptied after its indentation."""
    definers = _definers(files)
    out = []
    for k, i, names in sorted(draw_order(files, crossfile_candidates(files, min_bytes=min_bytes), seed)[:limit]):
        f = files[k]
        lines = split_lines(f.text)
        line = lines[i].rstrip("\n")
        target = _emptied(f.package, f.path, f.text, sum(map(len, lines[:i])), line[:len(line) - len(line.lstrip())],
                          line)
        defining = sorted(set().union(*(definers[(f.package, n)] for n in names)) - {f.path})
        out.append(CrossTarget(target, names, tuple(defining)))
    return out
