"""The ONNX graph against the numpy reference, and the cache-control contract callers rely on."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from inference.config import UnsupportedModel, config_from_gguf
from inference.model_store import LoadedModel, load_model
from inference.quantize import QUANTIZATIONS
from inference.reference import reference_forward
from inference.runtime import NEG_INF, causal_bias
from inference.weights import load_weights
from tests.decoding import empty_past

TOLERANCE = 1e-3


def _reference(path: Path):
    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader)
    return config, load_weights(reader, config)


def _ids(model: LoadedModel, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n)


def _encode_in_pieces(model: LoadedModel, ids: np.ndarray, pieces: int) -> np.ndarray:
    """Logits of every position, encoding the sequence in `pieces` chunks through the past-KV path.

    Rows go into preallocated [kv, capacity, hd] buffers and each chunk's past is the view `buf[:, :P]`, as a
    decode cache passes it (its heads are not contiguous with each other)."""
    cfg = model.config
    shape = (cfg.n_kv_heads, len(ids), cfg.head_dim)
    keys = [np.full(shape, np.nan, np.float32) for _ in range(cfg.n_layers)]  # NaN: a row read before written shows
    values = [np.full(shape, np.nan, np.float32) for _ in range(cfg.n_layers)]
    length, logits = 0, []
    for chunk in np.array_split(ids, pieces):
        pos = np.arange(length, length + len(chunk))
        out = model.decoder.forward(chunk, pos, [k[:, :length] for k in keys], [v[:, :length] for v in values],
                                    logits_index=np.arange(len(chunk)))
        for buf, new in zip(keys + values, out.keys + out.values):
            buf[:, length:length + len(chunk)] = new
        length += len(chunk)
        logits.append(out.logits)
    return np.concatenate(logits)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_fp32_graph_matches_numpy_reference(architecture, tiny_gguf, tiny_llama_gguf, tiny_cache):
    path = tiny_gguf if architecture == "qwen2" else tiny_llama_gguf
    model = load_model(str(path), "fp32", cache=tiny_cache, progress=False)
    config, weights = _reference(path)
    ids = _ids(model, 20)
    past_k, past_v = empty_past(model.decoder)
    out = model.decoder.forward(ids, np.arange(20), past_k, past_v, logits_index=np.arange(20))
    ref_logits, ref_k, ref_v = reference_forward(
        weights, config, ids[:, None], np.ones((20, 1), np.float32), np.arange(20), causal_bias(0, 20),
        past_k, past_v, np.arange(20))
    assert np.abs(out.logits - ref_logits).max() < TOLERANCE
    assert all(np.abs(a - b).max() < TOLERANCE for a, b in zip(out.keys, ref_k))
    assert all(np.abs(a - b).max() < TOLERANCE for a, b in zip(out.values, ref_v))


def test_embedding_mixture_matches_reference(tiny_model_fp32, tiny_gguf):
    config, weights = _reference(tiny_gguf)
    ids = _ids(tiny_model_fp32, 12).reshape(4, 3)
    mix = np.random.default_rng(1).dirichlet(np.ones(3), size=4).astype(np.float32)
    past_k, past_v = empty_past(tiny_model_fp32.decoder)
    out = tiny_model_fp32.decoder.forward(ids, np.arange(4), past_k, past_v, mix_weights=mix,
                                          logits_index=np.arange(4))
    ref_logits, _, _ = reference_forward(weights, config, ids, mix, np.arange(4), causal_bias(0, 4),
                                         past_k, past_v, np.arange(4))
    assert np.abs(out.logits - ref_logits).max() < TOLERANCE


def test_mixture_of_one_token_equals_plain_decoding(tiny_model):
    ids = _ids(tiny_model, 6)
    past_k, past_v = empty_past(tiny_model.decoder)
    plain = tiny_model.decoder.forward(ids, np.arange(6), past_k, past_v)
    mixed = tiny_model.decoder.forward(np.stack([ids, ids], axis=1), np.arange(6), past_k, past_v,
                                       mix_weights=np.full((6, 2), 0.5, np.float32))
    assert np.abs(plain.logits - mixed.logits).max() < 1e-4


@pytest.mark.parametrize("quantization", sorted(QUANTIZATIONS))
@pytest.mark.parametrize("pieces", [2, 7, 40])
def test_encoding_in_pieces_gives_bit_identical_logits(quantization, pieces, tiny_gguf, tiny_cache):
    """The KV cache (filled in pieces) and speculative decoding (k tokens verified = k single steps) rely on it."""
    model = load_model(str(tiny_gguf), quantization, cache=tiny_cache, progress=False)
    ids = _ids(model, 40, seed=2)
    assert np.array_equal(_encode_in_pieces(model, ids, 1), _encode_in_pieces(model, ids, pieces))


@pytest.mark.real_model
def test_one_token_at_a_time_is_bit_identical_to_one_chunk_on_the_real_model(real_model):
    """Real widths: some MatMulNBits kernels (8-bit blocks of 128, 4-bit blocks of 64 or more) take another path
    for a single row and break this, which the tiny model (d = 64) cannot show."""
    ids = _ids(real_model, 48, seed=4)
    assert np.array_equal(_encode_in_pieces(real_model, ids, 1), _encode_in_pieces(real_model, ids, len(ids)))


def test_tree_mask_verifies_two_branches_in_one_forward(tiny_model):
    """Two 3-token branches after a shared root, positions = depth; each must equal its own linear run."""
    decoder = tiny_model.decoder
    prefix = _ids(tiny_model, 10, seed=3)
    past_k, past_v = empty_past(decoder)
    base = decoder.forward(prefix, np.arange(10), past_k, past_v)
    root, a, b = 7, [11, 12, 13], [21, 22, 23]
    tree = np.array([root, *a, *b])
    depth = np.array([0, 1, 2, 3, 1, 2, 3])
    visible = np.eye(7, dtype=bool)
    visible[:, 0] = True
    for branch in ([1, 2, 3], [4, 5, 6]):
        for i, node in enumerate(branch):
            visible[node, branch[:i]] = True
    bias = np.concatenate([np.zeros((7, 10), np.float32), np.where(visible, 0, NEG_INF).astype(np.float32)], 1)
    out = decoder.forward(tree, 10 + depth, base.keys, base.values, bias=bias, logits_index=np.arange(7))
    for branch_tokens, nodes in ((a, [0, 1, 2, 3]), (b, [0, 4, 5, 6])):
        linear = decoder.forward(np.array([root, *branch_tokens]), np.arange(10, 14), base.keys, base.values,
                                 logits_index=np.arange(4))
        assert np.abs(out.logits[nodes] - linear.logits).max() < TOLERANCE
        assert np.abs(out.keys[0][:, nodes] - linear.keys[0]).max() < TOLERANCE


def test_logits_come_only_for_requested_positions(tiny_model):
    ids = _ids(tiny_model, 8)
    past_k, past_v = empty_past(tiny_model.decoder)
    everything = tiny_model.decoder.forward(ids, np.arange(8), past_k, past_v, logits_index=np.arange(8))
    some = tiny_model.decoder.forward(ids, np.arange(8), past_k, past_v, logits_index=np.array([2, 7]))
    assert some.logits.shape == (2, tiny_model.config.vocab_size)
    assert np.abs(some.logits - everything.logits[[2, 7]]).max() < 1e-5


def test_keys_are_stored_after_rope(tiny_model_fp32):
    """The same token at two positions gives keys that differ exactly by the rotation between them."""
    from inference.rope import apply_rope, cos_sin

    decoder, hd = tiny_model_fp32.decoder, tiny_model_fp32.config.head_dim
    theta = tiny_model_fp32.config.rope_theta
    past_k, past_v = empty_past(decoder)
    at_3 = decoder.forward(np.array([5]), np.array([3]), past_k, past_v).keys[0]
    at_10 = decoder.forward(np.array([5]), np.array([10]), past_k, past_v).keys[0]
    cos, sin = cos_sin(np.array([7]), hd, theta)
    assert np.abs(apply_rope(at_3, cos, sin) - at_10).max() < 1e-4


def test_unsupported_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="unsupported GGUF architecture 'gpt2'"):
        config_from_gguf(gguf.GGUFReader(tmp_path / "gpt2.gguf"))
