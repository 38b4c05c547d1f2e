"""Byte-level BPE tokenizers rebuilt from GGUF metadata with the HF `tokenizers` library.

A GGUF file carries the vocabulary, merges and a pre-tokenizer name, not a tokenizer.json,
so the pipeline is reassembled here from the published rules of each pre-tokenizer.
Encoding has no normalizer and never turns user text into special tokens, so
decode(encode(text)) == text (bar bytes a vocabulary lacks) and text offsets map exactly
onto token positions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import PreTokenizer

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Token types that are whole strings (chat/FIM markers), not byte-level spellings.
_SPECIAL_TYPES = frozenset({gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED})

# Unknown-token stand-in for missing bytes; the space keeps it apart from any byte-level token.
_UNREPRESENTABLE = "<unrepresentable byte>"

# SpecialTokens field -> stem of its GGUF key "tokenizer.ggml.<stem>_token_id".
_ID_KEY_STEMS = {
    "eos": "eos",
    "bos": "bos",
    "pad": "padding",
    "fim_prefix": "fim_pre",
    "fim_suffix": "fim_suf",
    "fim_middle": "fim_mid",
}

# Older converters write no fim_* keys (Qwen2.5-Coder has none), so FIM ids fall back to these names.
_FIM_NAMES = {
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>"),
}


FILE_SEP = "<|file_sep|>"


class UnsupportedTokenizer(ValueError):
    """The GGUF asks for a tokenizer we cannot reproduce exactly; a near miss would feed the model wrong ids."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the decoder and prompt builder need; None where the model has no such token."""

    eos: int | None
    bos: int | None
    pad: int | None
    fim_prefix: int | None
    fim_suffix: int | None
    fim_middle: int | None
    stop: frozenset[int]  # ends a completion: every control/user-defined token plus eos
    file_sep: int | None = None  # starts a file's path header in a repository prompt (Qwen2.5-Coder's <|file_sep|>)


class CodeTokenizer:
    """Lossless text <-> ids for one model; special tokens enter prompts only as ids."""

    def __init__(
        self,
        hf: Tokenizer,
        tokens: Sequence[str],
        special_ids: frozenset[int],
        specials: SpecialTokens,
        unrepresentable_bytes: frozenset[int],
    ):
        self._hf = hf
        self._tokens = tokens
        self._special_ids = special_ids
        self._token_bytes: list[bytes] | None = None
        self.specials = specials
        self.vocab_size = len(tokens)
        # Bytes without a single-byte token: no id sequence can express them, so encode drops them
        # (as llama.cpp does). Empty for Qwen2.5; SmolLM2 lacks six ASCII control bytes, for one.
        self.unrepresentable_bytes = unrepresentable_bytes

    @property
    def hf(self) -> Tokenizer:
        """The underlying tokenizer. Marker text stays text (encode_special_tokens is on); it emits
        id vocab_size for each unrepresentable byte, which CodeTokenizer's encoders remove."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: no BOS, and marker strings in the text are ordinary characters.

        Lossless except for unrepresentable_bytes.
        """
        # The batch "fast" path skips offset tracking: ~20% quicker on whole files.
        ids = self._hf.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return [i for i in ids if i != self.vocab_size] if self.unrepresentable_bytes else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus each token's (start, end) character span in text, for mapping edits to cache positions.

        A character split over several byte tokens gives each of them that character's whole span.
        """
        encoding = self._hf.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        if self.unrepresentable_bytes and self.vocab_size in ids:
            kept = [(i, span) for i, span in zip(ids, offsets) if i != self.vocab_size]
            ids, offsets = [i for i, _ in kept], [span for _, span in kept]
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens included, so decoding never silently drops anything."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """Raw bytes of every id (special tokens: their UTF-8 text), for token healing and byte offset maps.

        Built once and shared: do not mutate.
        """
        if self._token_bytes is None:
            to_byte = {ord(char): byte for char, byte in _byte_level_alphabet().items()}
            self._token_bytes = [
                token.encode("utf-8") if i in self._special_ids else token.translate(to_byte).encode("latin-1")
                for i, token in enumerate(self._tokens)
            ]
        return self._token_bytes


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> CodeTokenizer:
    """Rebuild the model's own tokenizer from the tokenizer.ggml.* metadata of a GGUF file."""
    return tokenizer_from_metadata(gguf_tokenizer_fields(reader))


def gguf_tokenizer_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The tokenizer.ggml.* key/values as plain JSON-able values; cached beside a converted model
    because opening a large GGUF just for them takes seconds."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.ggml.")}


def tokenizer_metadata(
    tokens: list[str], token_types: list[int], merges: list[str], pre: str, special_ids: dict[str, int]
) -> dict[str, gguf.GGUFValue]:
    """GGUF tokenizer key/values (the inverse of tokenizer_from_gguf), for writing synthetic test models.

    special_ids is keyed by SpecialTokens field names (eos, bos, pad, fim_prefix, ...). Write each
    item with `writer.add_key_value(key, value.value, value.type, value.sub_type)`.
    """
    unknown = special_ids.keys() - _ID_KEY_STEMS.keys()
    if unknown:
        raise ValueError(f"no GGUF key for special ids {sorted(unknown)}; known: {sorted(_ID_KEY_STEMS)}")
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    metadata = {
        "tokenizer.ggml.model": gguf.GGUFValue("gpt2", string),
        "tokenizer.ggml.pre": gguf.GGUFValue(pre, string),
        "tokenizer.ggml.tokens": gguf.GGUFValue(list(tokens), array, string),
        "tokenizer.ggml.token_type": gguf.GGUFValue(list(token_types), array, gguf.GGUFValueType.INT32),
        "tokenizer.ggml.merges": gguf.GGUFValue(list(merges), array, string),
    }
    for name, token_id in special_ids.items():
        metadata[_id_key(name)] = gguf.GGUFValue(token_id, gguf.GGUFValueType.UINT32)
    return metadata


def train_tiny_vocab(
    texts: Iterable[str],
    vocab_size: int = 512,
    specials: Sequence[str] = (
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|file_sep|>",
    ),
) -> tuple[list[str], list[int], list[str]]:
    """Train a small byte-level BPE under the "qwen2" pre-tokenizer, as (tokens, token_types, merges) in GGUF form.

    For a tiny synthetic test model that runs through the same code path as Qwen. Every byte is in
    the alphabet, so any text is representable; specials take the first ids, typed CONTROL.
    """
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer("qwen2")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].__getitem__)
    special_set = set(specials)
    token_types = [int(gguf.TokenType.CONTROL if t in special_set else gguf.TokenType.NORMAL) for t in tokens]
    merges = [" ".join(pair) for pair in model["merges"]]
    return tokens, token_types, merges


def tokenizer_from_metadata(metadata: Mapping[str, Any]) -> CodeTokenizer:
    """Build from the tokenizer.ggml.* key/values (see gguf_tokenizer_fields)."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedTokenizer(f"tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
    # llama.cpp treats a file without a pre-tokenizer name as "default".
    pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata["tokenizer.ggml.token_type"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]

    vocab = {token: i for i, token in enumerate(tokens)}
    unrepresentable = frozenset(byte for char, byte in _byte_level_alphabet().items() if char not in vocab)
    if unrepresentable:
        # Without an unknown token the BPE drops such bytes but shifts the offsets of the rest of the
        # word; with one at id len(tokens) the offsets stay right and the encoders filter it out.
        vocab[_UNREPRESENTABLE] = len(tokens)
    hf = Tokenizer(models.BPE(vocab, merges, unk_token=_UNREPRESENTABLE if unrepresentable else None))
    # No NFC normalizer (Qwen's tokenizer.json has one): it rewrites text; NFC text gets the same ids (tested).
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    special_ids = frozenset(i for i, token_type in enumerate(token_types) if token_type in _SPECIAL_TYPES)
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    hf.encode_special_tokens = True  # user text containing "<|endoftext|>" must stay text

    ids = {field: metadata.get(_id_key(field)) for field in _ID_KEY_STEMS}
    by_name = {tokens[i]: i for i in special_ids}
    for field, names in _FIM_NAMES.items():
        if ids[field] is None:
            ids[field] = next((by_name[name] for name in names if name in by_name), None)
    stop = special_ids.union(i for i in [ids["eos"]] if i is not None)
    specials = SpecialTokens(**ids, stop=stop, file_sep=by_name.get(FILE_SEP))
    return CodeTokenizer(hf, tokens, special_ids, specials, unrepresentable)


def _pre_tokenizer(pre: str) -> PreTokenizer:
    """The split rules of each supported GGUF pre-tokenizer name (as in the models' tokenizer.json)."""
    if pre == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise UnsupportedTokenizer(f"pre-tokenizer {pre!r}: supported are 'qwen2', 'smollm', 'gpt2', 'default'")


def _id_key(field: str) -> str:
    return f"tokenizer.ggml.{_ID_KEY_STEMS[field]}_token_id"


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet: printable Latin-1 bytes stand for
    themselves, the 68 others are shifted, in byte order, to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    alphabet = {chr(byte): byte for byte in printable}
    alphabet.update({chr(0x100 + n): byte for n, byte in enumerate(shifted)})
    return alphabet
