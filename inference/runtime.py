"""ONNX Runtime session for the decoder graph: one forward over new tokens against caller-owned past rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.config import ModelConfig
from inference.graph import new_key_name, new_value_name, past_key_name, past_value_name

NEG_INF = np.float32(-1e9)  # additive mask value; finite so a fully masked row cannot produce NaN


@dataclass
class StepOutput:
    logits: np.ndarray  # [n_logits, vocab]
    keys: list[np.ndarray]  # per layer [kv_heads, seq, head_dim], after RoPE
    values: list[np.ndarray]


def causal_bias(past: int, seq: int) -> np.ndarray:
    """[seq, past + seq] additive mask: every new token sees the whole past and the new tokens before it."""
    bias = np.zeros((seq, past + seq), dtype=np.float32)
    bias[:, past:][np.triu_indices(seq, k=1)] = NEG_INF
    return bias


def _head_rows(rows: np.ndarray, head: int) -> np.ndarray:
    """[1, 1, P, hd] over one kv head of `rows` [kv, P, hd]: a view, not a copy, whenever that head's rows are
    contiguous, as in a row slice `buf[:, :P]` of a preallocated [kv, capacity, hd] buffer. ONNX Runtime reads
    a C-contiguous float32 feed in place."""
    one = rows[head]
    if one.dtype != np.float32 or not one.flags.c_contiguous:
        one = np.ascontiguousarray(one, dtype=np.float32)
    return one[None, None]


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not in this ONNX Runtime build."""


def available_providers(device: str) -> list[str]:
    """'cpu' or 'cuda'; CUDA falls back to CPU only when asked for 'auto'."""
    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in have:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN libraries from the nvidia-* pip packages, if installed
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CPUExecutionProvider"]
    raise ProviderUnavailable(f"execution provider for {device!r} is not available (ONNX Runtime has {have}); "
                              "install onnxruntime-gpu for CUDA")


class Decoder:
    """Runs the graph; knows nothing about buffers, edits or decoding strategies."""

    def __init__(self, model_path: Path, config: ModelConfig, *, threads: int | None = None,
                 device: str = "cpu", profile_prefix: str | None = None, arena: bool = True,
                 mem_pattern: bool = False) -> None:
        """`profile_prefix`: record ONNX Runtime's per-op trace (`session.end_profiling()` writes it). `arena` and
        `mem_pattern`: ONNX Runtime's CPU memory arena and its planned buffers per input shapes. bench/memory.py
        measures them: without the arena the model is no smaller and slower; the plans cost ~55 MB with ten open
        documents (the past's length changes at every step, so a plan is seldom reused) and no measurable speed."""
        self.config = config
        self.model_path = model_path
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = mem_pattern
        options.intra_op_num_threads = threads or int(os.environ.get("SUPERPIE_THREADS", "2"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(model_path), options, providers=available_providers(device))
        self.providers = self.session.get_providers()
        self._outputs = ["logits"] + [n for i in range(config.n_layers) for n in (new_key_name(i), new_value_name(i))]
        self._past_names = [[(past_key_name(i, h), past_value_name(i, h)) for h in range(config.n_kv_heads)]
                            for i in range(config.n_layers)]

    def forward(
        self,
        ids: np.ndarray,  # [seq] or [seq, mix]
        positions: np.ndarray,  # [seq]
        past_keys: list[np.ndarray],  # per layer [kv, past, hd]; only each head's rows need be contiguous
        past_values: list[np.ndarray],
        *,
        mix_weights: np.ndarray | None = None,  # [seq, mix]
        bias: np.ndarray | None = None,  # [seq, past + seq]; causal when None
        logits_index: np.ndarray | None = None,  # default: the last position only
    ) -> StepOutput:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[:, None]
        seq = ids.shape[0]
        past = past_keys[0].shape[1]
        if mix_weights is None:
            mix_weights = np.ones(ids.shape, dtype=np.float32)
        if bias is None:
            bias = causal_bias(past, seq)
        if logits_index is None:
            logits_index = np.array([seq - 1], dtype=np.int64)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids[None],
            "input_weights": np.asarray(mix_weights, dtype=np.float32)[None],
            "position_ids": np.asarray(positions, dtype=np.int64)[None],
            "attention_bias": np.asarray(bias, dtype=np.float32)[None, None],
            "logits_index": np.asarray(logits_index, dtype=np.int64),
        }
        for names, k, v in zip(self._past_names, past_keys, past_values):
            for h, (key_name, value_name) in enumerate(names):
                feeds[key_name] = _head_rows(k, h)
                feeds[value_name] = _head_rows(v, h)
        out = self.session.run(self._outputs, feeds)
        return StepOutput(logits=out[0][0], keys=[a[0] for a in out[1::2]], values=[a[0] for a in out[2::2]])
