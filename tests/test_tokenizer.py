"""Tokenizers rebuilt from GGUF metadata: lossless, marker-safe, and faithful to the real vocabularies.

Real tokenizers come from the registry models in the model cache (fetched once), or from the GGUF
files named by SUPERPIE_TEST_QWEN_GGUF / SUPERPIE_TEST_SMOLLM_GGUF.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import gguf
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from inference.fetch import cache_root, resolve_gguf
from inference.tokenizer import (
    CodeTokenizer,
    SpecialTokens,
    UnsupportedTokenizer,
    tokenizer_from_gguf,
    tokenizer_metadata,
    train_tiny_vocab,
)
from tests.fixtures import cpython_files

TOKENIZERS = ["qwen", "smollm", "tiny"]
TinyVocab = tuple[list[str], list[int], list[str]]  # tokens, token_types, merges

TRICKY_TEXTS = [
    "",
    "line one\r\nline two\r\n",
    "lone\rcarriage\rreturns\r",
    "\tdef f():\n\t\treturn 1\n\t\n",
    "trailing spaces   \nand tabs\t\t\n   ",
    "emoji 😀👍🏽👨‍👩‍👧 🇺🇸",
    "中文注释  # 日本語のコメント 한국어",
    "combining e\u0301 a\u0308\u0304 \u0915\u094d\u0937 \U0002070e",
    "\x00\x01\x7f\ufeff\u00a0\u2028\u3000",
    "It's 'S 'LL don'T",
    "x = 12345678901234567890",
    "<|endoftext|><|fim_middle|> <|im_end|>",
]

# ---------------------------------------------------------------------------- fixtures


def _write_gguf(path: Path, metadata: dict[str, gguf.GGUFValue]) -> gguf.GGUFReader:
    """A tensor-less GGUF holding only tokenizer metadata, read back as the server would."""
    writer = gguf.GGUFWriter(path, arch="qwen2")
    for key, value in metadata.items():
        writer.add_key_value(key, value.value, value.type, value.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def _real_reader(var: str, model: str) -> gguf.GGUFReader:
    """The GGUF named by `var`, else the registry model from the model cache (fetched once)."""
    path = os.environ.get(var) or resolve_gguf(model, cache_root(), progress=False)
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def qwen_reader() -> gguf.GGUFReader:
    return _real_reader("SUPERPIE_TEST_QWEN_GGUF", "qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def smollm_reader() -> gguf.GGUFReader:
    return _real_reader("SUPERPIE_TEST_SMOLLM_GGUF", "smollm2-135m")


@pytest.fixture(scope="module")
def qwen(qwen_reader: gguf.GGUFReader) -> CodeTokenizer:
    return tokenizer_from_gguf(qwen_reader)


@pytest.fixture(scope="module")
def smollm(smollm_reader: gguf.GGUFReader) -> CodeTokenizer:
    return tokenizer_from_gguf(smollm_reader)


@pytest.fixture(scope="module")
def library_texts() -> list[str]:
    """The copied standard-library files (tests/data/cpython): real code, the same on every machine."""
    # Two of them are deliberately not UTF-8; U+FFFD keeps them as (valid) test text.
    return [f.read_bytes().decode("utf-8", errors="replace") for f in cpython_files()]


@pytest.fixture(scope="module")
def tiny_vocab(library_texts: list[str]) -> TinyVocab:
    return train_tiny_vocab(library_texts)


@pytest.fixture(scope="module")
def tiny(tiny_vocab: TinyVocab, tmp_path_factory: pytest.TempPathFactory) -> CodeTokenizer:
    tokens, token_types, merges = tiny_vocab
    metadata = tokenizer_metadata(tokens, token_types, merges, "qwen2", {"eos": 0, "bos": 0})
    return tokenizer_from_gguf(_write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", metadata))


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request: pytest.FixtureRequest) -> CodeTokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=["qwen", "smollm"])
def real_tokenizer(request: pytest.FixtureRequest) -> CodeTokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def library_ids(tokenizer: CodeTokenizer, library_texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(text) for text in library_texts]


def _encodable_bytes(tokenizer: CodeTokenizer, text: str) -> bytes:
    """What encoding can keep of text: its UTF-8 without the bytes the vocabulary lacks."""
    return bytes(b for b in text.encode("utf-8") if b not in tokenizer.unrepresentable_bytes)


def _expected_offsets(tokenizer: CodeTokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Span of the characters each token's bytes touch (a split character belongs to all its pieces)."""
    lacking = tokenizer.unrepresentable_bytes
    char_of_byte = [i for i, char in enumerate(text) for b in char.encode("utf-8") if b not in lacking]
    token_bytes = [tokenizer.token_bytes()[i] for i in ids]
    spans, start = [], 0
    for piece in token_bytes:
        end = start + len(piece)
        spans.append((char_of_byte[start], char_of_byte[end - 1] + 1))
        start = end
    return spans


# ---------------------------------------------------------------------------- round trip


def test_round_trip_on_library_code(tokenizer: CodeTokenizer, library_texts: list[str], library_ids: list[list[int]]):
    mismatched = [i for i, (text, ids) in enumerate(zip(library_texts, library_ids)) if tokenizer.decode(ids) != text]
    assert mismatched == []


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_on_tricky_text(tokenizer: CodeTokenizer, text: str):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_round_trip_on_arbitrary_text(tokenizer: CodeTokenizer, text: str):
    """Exact wherever the vocabulary has every byte of text (always, for Qwen and the tiny vocab)."""
    expected = _encodable_bytes(tokenizer, text).decode("utf-8", errors="replace")
    assert tokenizer.decode(tokenizer.encode(text)) == expected


@pytest.mark.parametrize("name", ["qwen", "tiny"])
def test_every_byte_has_a_token(name: str, request: pytest.FixtureRequest):
    assert request.getfixturevalue(name).unrepresentable_bytes == frozenset()


def test_smollm_lacks_tokens_for_some_bytes(smollm: CodeTokenizer):
    ascii_controls = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D}
    lead_bytes = {0xF1, 0xF2}  # U+40000..U+BFFFF, all unassigned
    never_in_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    assert smollm.unrepresentable_bytes == ascii_controls | lead_bytes | never_in_utf8


def test_smollm_drops_unrepresentable_bytes_rather_than_guessing(smollm: CodeTokenizer):
    assert smollm.decode(smollm.encode("a\x04b\U00040000c")) == "ab\ufffd\ufffd\ufffdc"


# ---------------------------------------------------------------------------- bytes and offsets


def test_token_bytes_concatenate_to_utf8(
    tokenizer: CodeTokenizer, library_texts: list[str], library_ids: list[list[int]]
):
    token_bytes = tokenizer.token_bytes()
    for text, ids in zip(library_texts, library_ids):
        assert b"".join(token_bytes[i] for i in ids) == text.encode("utf-8")


def test_token_bytes_agree_with_decoder_for_every_token(tokenizer: CodeTokenizer):
    decoded = tokenizer.hf.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    token_bytes = tokenizer.token_bytes()
    assert len(token_bytes) == tokenizer.vocab_size
    assert [b.decode("utf-8", errors="replace") for b in token_bytes] == decoded


@settings(max_examples=100, deadline=None)
@given(text=st.text())
@example(text=TRICKY_TEXTS[5])
@example(text=TRICKY_TEXTS[7])
def test_offsets_span_the_characters_of_each_token(tokenizer: CodeTokenizer, text: str):
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert offsets == _expected_offsets(tokenizer, text, ids)


# ---------------------------------------------------------------------------- special tokens


def test_marker_text_in_user_code_stays_ordinary_tokens(tokenizer: CodeTokenizer):
    text = 'SEP = "<|endoftext|>"  # then <|fim_middle|><|fim_prefix|><|im_end|>'
    ids = tokenizer.encode(text)
    assert not set(ids) & tokenizer.specials.stop
    assert tokenizer.decode(ids) == text


def test_prompt_of_special_ids_and_text_decodes_verbatim(tokenizer: CodeTokenizer):
    fim = tokenizer.specials
    if fim.fim_prefix is None:
        pytest.skip("model has no FIM tokens")
    ids = [fim.fim_prefix, *tokenizer.encode("a = 1\n"), fim.fim_suffix, *tokenizer.encode("\nb = a"), fim.fim_middle]
    assert tokenizer.decode(ids) == "<|fim_prefix|>a = 1\n<|fim_suffix|>\nb = a<|fim_middle|>"


def test_qwen_fim_ids_are_found_by_name(qwen: CodeTokenizer):
    assert (qwen.specials.fim_prefix, qwen.specials.fim_suffix, qwen.specials.fim_middle) == (151659, 151661, 151660)
    assert qwen.specials.file_sep == qwen.hf.token_to_id("<|file_sep|>") == 151664


def test_qwen_eos_bos_pad_and_vocab_size(qwen: CodeTokenizer):
    assert (qwen.specials.eos, qwen.specials.bos, qwen.specials.pad) == (151645, 151643, 151643)
    assert qwen.vocab_size == 151936


def test_qwen_stop_ids_cover_end_of_text_and_file_boundaries(qwen: CodeTokenizer):
    names = ["<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    assert {qwen.hf.token_to_id(name) for name in names} <= qwen.specials.stop


def test_smollm_has_no_fim_tokens_and_stops_at_im_end(smollm: CodeTokenizer):
    assert (smollm.specials.fim_prefix, smollm.specials.fim_suffix, smollm.specials.fim_middle) == (None, None, None)
    assert smollm.specials.eos == smollm.hf.token_to_id("<|im_end|>") == 2
    assert smollm.specials.file_sep is None
    assert smollm.hf.token_to_id("<|endoftext|>") in smollm.specials.stop


def test_special_ids_round_trip_through_gguf_metadata(tiny_vocab: TinyVocab, tmp_path: Path):
    tokens, token_types, merges = tiny_vocab
    ids = {"eos": 5, "bos": 0, "pad": 4, "fim_prefix": 3, "fim_suffix": 1, "fim_middle": 2}
    reader = _write_gguf(tmp_path / "t.gguf", tokenizer_metadata(tokens, token_types, merges, "qwen2", ids))
    file_sep = tokens.index("<|file_sep|>")  # found by name: GGUF has no key for it
    assert tokenizer_from_gguf(reader).specials == SpecialTokens(**ids, stop=frozenset(range(6)), file_sep=file_sep)


def test_metadata_rejects_unknown_special_name(tiny_vocab: TinyVocab):
    with pytest.raises(ValueError, match="eot"):
        tokenizer_metadata(*tiny_vocab, "qwen2", {"eot": 0})


# ---------------------------------------------------------------------------- pre-tokenization


def test_vocab_tokens_survive_their_own_pre_tokenizer(real_tokenizer: CodeTokenizer):
    """The right split rule keeps (almost) every learned token whole; a wrong one (GPT-2 regex for
    Qwen) splits ~15% of them, which would make those tokens unreachable."""
    pieces = [b.decode("utf-8", errors="replace") for b in real_tokenizer.token_bytes()]
    normal = [p for i, p in enumerate(pieces) if "\ufffd" not in p and i not in real_tokenizer.specials.stop]
    split = [p for p in normal if len(real_tokenizer.hf.pre_tokenizer.pre_tokenize_str(p)) > 1]
    assert len(split) / len(normal) < 0.02


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello, my name is Ryan.", [9707, 11, 847, 829, 374, 13646, 13]),
        ("Hello, world! 123", [9707, 11, 1879, 0, 220, 16, 17, 18]),
        ("2+2=?", [17, 10, 17, 19884]),
        ("你好世界", [108386, 99489]),
    ],
)
def test_qwen_matches_ids_of_the_official_tokenizer(qwen: CodeTokenizer, text: str, ids: list[int]):
    """Ids the Qwen2 family's HF tokenizer is documented to give; its vocab is shared by Qwen2.5-Coder."""
    assert qwen.encode(text) == ids


def test_digits_are_single_tokens(tokenizer: CodeTokenizer):
    token_bytes = tokenizer.token_bytes()
    assert [token_bytes[i] for i in tokenizer.encode("12345")] == [b"1", b"2", b"3", b"4", b"5"]


def test_qwen_indentation_gives_its_last_space_to_the_keyword(qwen: CodeTokenizer):
    token_bytes = qwen.token_bytes()
    assert [token_bytes[i] for i in qwen.encode("    return x")] == [b"   ", b" return", b" x"]


def test_qwen_blank_indentation_is_one_token(qwen: CodeTokenizer):
    assert [qwen.token_bytes()[i] for i in qwen.encode("    ")] == [b"    "]


def test_nfc_normalizer_would_not_change_ids_of_nfc_text(qwen: CodeTokenizer, library_texts: list[str]):
    with_nfc = Tokenizer.from_str(qwen.hf.to_str())
    with_nfc.normalizer = normalizers.NFC()
    with_nfc.encode_special_tokens = True
    texts = [unicodedata.normalize("NFC", text) for text in library_texts + TRICKY_TEXTS]
    assert [e.ids for e in with_nfc.encode_batch(texts)] == [qwen.encode(text) for text in texts]


# ---------------------------------------------------------------------------- unsupported files


def test_unknown_pre_tokenizer_is_rejected(tiny_vocab: TinyVocab, tmp_path: Path):
    reader = _write_gguf(tmp_path / "t.gguf", tokenizer_metadata(*tiny_vocab, "llama-bpe", {}))
    with pytest.raises(UnsupportedTokenizer, match="llama-bpe"):
        tokenizer_from_gguf(reader)


def test_sentencepiece_model_is_rejected(tiny_vocab: TinyVocab, tmp_path: Path):
    metadata = tokenizer_metadata(*tiny_vocab, "default", {})
    metadata["tokenizer.ggml.model"] = gguf.GGUFValue("llama", gguf.GGUFValueType.STRING)
    with pytest.raises(UnsupportedTokenizer, match="'llama'"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", metadata))


# ---------------------------------------------------------------------------- tiny vocabulary


def test_tiny_vocab_training_is_deterministic(library_texts: list[str]):
    assert train_tiny_vocab(library_texts[:10], vocab_size=400) == train_tiny_vocab(library_texts[:10], vocab_size=400)


def test_tiny_vocab_puts_control_specials_first(tiny_vocab: TinyVocab):
    tokens, token_types, _ = tiny_vocab
    fim = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
    assert tokens[:6] == ["<|endoftext|>", *fim, "<|file_sep|>"]
    assert token_types[:6] == [gguf.TokenType.CONTROL] * 6
    assert set(token_types[6:]) == {gguf.TokenType.NORMAL}
    assert len(tokens) == 512
