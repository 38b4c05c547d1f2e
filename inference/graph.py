"""Build the decoder as a plain-ops ONNX graph that leaves the KV cache entirely to the caller.

Inputs (batch B, new tokens S, past rows P, mixture width M, requested logits N):
  input_ids       int64 [B, S, M]   token ids; M > 1 mixes embeddings (superposed decoding), M = 1 is plain
  input_weights   float [B, S, M]   mixture weights (1.0 for plain decoding)
  position_ids    int64 [B, S]      explicit RoPE positions (PIE, tree verification: depth)
  attention_bias  float [B, 1, S, P+S]  additive mask over past + new rows: causal, tree or any pattern
  logits_index    int64 [N]         which of the S positions need logits (the lm_head is the costliest matmul)
  past_key.{i}.{h}    float [B, 1, P, hd]  keys of layer i, kv head h, after RoPE
  past_value.{i}.{h}  float [B, 1, P, hd]
Outputs:
  logits          float [B, N, vocab]
  new_key.{i}     float [B, kv, S, hd]  keys of the S new rows, after RoPE
  new_value.{i}   float [B, kv, S, hd]
Only the new rows come back: the caller owns the cache and decides which rows survive (accepted drafts,
edits). One past input per (layer, kv head) lets the caller pass a row slice `buf[h, :P]` of a preallocated
[kv, capacity, hd] buffer as it is (only each head's rows are contiguous there).

Attention, per kv head: the scores are Concat(q @ past_keys^T, q @ new_keys^T). Each score is one dot product
over hd whichever MatMul computes it, so the past keys are read in place and only the small score rows are
concatenated. The values are summed over Concat(past, new) in ONE MatMul: splitting that sum at the chunk
boundary makes it depend on the chunking, and with int8 activations the float noise flips roundings (94-95%
top-1 agreement with a one-shot encode, measured on SmolLM2-135M). Done this way, the graph is bit-identical
however a sequence is chunked (tested, also one token at a time), which the KV cache (filled in pieces) and
lossless speculative decoding (k tokens verified = k single steps) rely on. The past values' Concat is the one
copy of the past left in a step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inference.config import ModelConfig
from inference.quantize import BlockedEmbedding
from inference.rope import inverse_frequencies
from inference.weights import LayerWeights

OPSET = 21
LM_HEAD = "lm_head"  # the output projection's node name: quantization may treat it on its own


def past_key_name(layer: int, head: int) -> str:
    return f"past_key.{layer}.{head}"


def past_value_name(layer: int, head: int) -> str:
    return f"past_value.{layer}.{head}"


def new_key_name(layer: int) -> str:
    return f"new_key.{layer}"


def new_value_name(layer: int) -> str:
    return f"new_value.{layer}"


class _GraphBuilder:
    """Appends nodes with unique output names; constants become initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def op(self, op_type: str, inputs: Iterable[str], name: str = "", **attrs: object) -> str:
        self._count += 1
        out = f"{name or op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def op_multi(self, op_type: str, inputs: Iterable[str], n_out: int, names: Iterable[str | None] = (),
                 **attrs: object) -> list[str]:
        """A node with several outputs; `names` gives some of them graph-output names (None: generated)."""
        self._count += 1
        given = list(names) + [None] * n_out
        outs = [given[i] or f"{op_type.lower()}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type.lower()}_{self._count}",
                                           **attrs))
        return outs

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.array(values, dtype=np.int64))


def _rms_norm(b: _GraphBuilder, x: str, weight: str, eps: str) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, spelled as ONNX Runtime fuses it into one SimplifiedLayerNormalization."""
    var = b.op("ReduceMean", [b.op("Pow", [x, "two"]), "axis_last"], keepdims=1)
    return b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, eps])])]), weight], name="rmsnorm")


def _rotate(b: _GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, x: [B, heads, S, hd]."""
    lo, hi = b.op_multi("Split", [x, "half_split"], 2, axis=-1)
    rotated = b.op("Concat", [b.op("Neg", [hi]), lo], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])], name="rope")


def _heads(b: _GraphBuilder, x: str, shape: str) -> str:
    """[B, S, heads*hd] -> [B, heads, S, hd]."""
    return b.op("Transpose", [b.op("Reshape", [x, shape])], perm=[0, 2, 1, 3])


def _layer(b: _GraphBuilder, cfg: ModelConfig, i: int, w: LayerWeights, x: str, cos: str, sin: str) -> str:
    p = f"blk.{i}."

    def proj(h: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        y = b.op("MatMul", [h, b.const(p + name + ".weight", weight)], name=name)
        return b.op("Add", [y, b.const(p + name + ".bias", bias)]) if bias is not None else y

    # Q, K and V in one matrix multiplication (fewer, larger MatMulNBits calls; ~2.5x fewer ops per
    # layer in all), split into heads [B, H+2kv, S, hd]; RoPE rotates the Q and K heads together.
    h = _rms_norm(b, x, b.const(p + "attn_norm", w.attn_norm), "rms_eps")
    qkv_bias = np.concatenate([w.bq, w.bk, w.bv]) if w.bq is not None else None
    qkv = _heads(b, proj(h, "qkv", np.concatenate([w.wq, w.wk, w.wv], axis=1), qkv_bias), "shape_qkv_heads")
    qk, v = b.op_multi("Split", [qkv, "split_qk_v"], 2, [None, new_value_name(i)], axis=1)
    q, k = b.op_multi("Split", [_rotate(b, qk, cos, sin), "split_q_k"], 2, [None, new_key_name(i)], axis=1)

    # Grouped-query attention without repeating K/V: the query heads of a group become extra rows of one
    # MatMul against their kv head's rows. Per kv head h: [B, 1, G*S, hd] x [B, 1, P+S, hd].
    kvh = cfg.n_kv_heads
    q_rows = b.op("Reshape", [b.op("Mul", [q, "attn_scale"]), "shape_group_rows"])  # [B, kv, G*S, hd]
    q_groups = b.op_multi("Split", [q_rows], kvh, axis=1, num_outputs=kvh)
    k_heads = b.op_multi("Split", [k], kvh, axis=1, num_outputs=kvh)
    v_heads = b.op_multi("Split", [v], kvh, axis=1, num_outputs=kvh)
    attn_heads = []
    for h, (qh, kh, vh) in enumerate(zip(q_groups, k_heads, v_heads)):
        # Each score is one dot product over hd, whichever MatMul computes it: the past's are computed on the
        # caller's rows in place, and only the [G*S, P+S] scores are concatenated, never the past keys.
        scores = b.op("Concat", [b.op("MatMul", [qh, b.op("Transpose", [rows], perm=[0, 1, 3, 2])])
                                 for rows in (past_key_name(i, h), kh)], axis=-1)  # [B, 1, G*S, P+S]
        values = b.op("Concat", [past_value_name(i, h), vh], axis=2)  # [B, 1, P+S, hd]: one sum per output
        scores = b.op("Add", [b.op("Reshape", [scores, "shape_group_scores"]), "attention_bias"])  # [B, G, S, P+S]
        probs = b.op("Reshape", [b.op("Softmax", [scores], axis=-1), "shape_group_probs"])  # [B, 1, G*S, P+S]
        attn_heads.append(b.op("MatMul", [probs, values]))  # [B, 1, G*S, hd]
    attn = b.op("Reshape", [b.op("Concat", attn_heads, axis=1), "shape_split_groups"])  # [B, H, S, hd]
    attn = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), "shape_merge_heads"])
    x = b.op("Add", [x, proj(attn, "o", w.wo)], name="residual")

    h = _rms_norm(b, x, b.const(p + "ffn_norm", w.ffn_norm), "rms_eps")
    gate, up = b.op_multi("Split", [proj(h, "gate_up", np.concatenate([w.w_gate, w.w_up], axis=1)), "split_ffn"], 2,
                          axis=-1)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
    return b.op("Add", [x, proj(act, "down", w.w_down)], name="residual")


def _shape_constants(b: _GraphBuilder, cfg: ModelConfig) -> None:
    """Dynamic shapes computed once from the inputs and shared by every layer."""
    hd, kvh, g = cfg.head_dim, cfg.n_kv_heads, cfg.group_size
    b.ints("axis_last", [-1])
    b.const("two", np.array(2.0, dtype=np.float32))
    b.ints("half_split", [hd // 2, hd // 2])
    b.const("rms_eps", np.array(cfg.rms_eps, dtype=np.float32))
    b.const("attn_scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    b.ints("shape_group_rows", [0, kvh, -1, hd])
    b.ints("shape_merge_heads", [0, 0, cfg.n_heads * hd])
    b.ints("shape_qkv_heads", [0, 0, cfg.n_heads + 2 * kvh, hd])
    b.ints("split_qk_v", [cfg.n_heads + kvh, kvh])
    b.ints("split_q_k", [cfg.n_heads, kvh])
    b.ints("split_ffn", [cfg.d_ffn, cfg.d_ffn])
    b.ints("shape_split_groups", [0, cfg.n_heads, -1, hd])
    b.ints("one_1d", [1])
    shape = b.op("Shape", ["attention_bias"])  # [B, 1, S, P+S]
    total = b.op("Slice", [shape, b.ints("three_1d", [3]), b.ints("four_1d", [4])])
    b.nodes.append(
        helper.make_node("Concat", [b.ints("prefix_group_scores", [0, g, -1]), total], ["shape_group_scores"],
                         axis=0, name="sgs")
    )
    b.nodes.append(
        helper.make_node("Concat", [b.ints("prefix_group_probs", [0, 1, -1]), total], ["shape_group_probs"], axis=0,
                         name="sgp")
    )


def _embed(b: _GraphBuilder, embedding: np.ndarray | BlockedEmbedding) -> str:
    """The embeddings of `input_ids` [B, S, M, d], gathered from an fp32 table or from int8 blocks."""
    if isinstance(embedding, np.ndarray):
        return b.op("Gather", [b.const("token_embd", embedding), "input_ids"], axis=0)
    codes = b.op("Gather", [b.const("token_embd_codes", embedding.codes), "input_ids"], axis=0)  # [B, S, M, nb, 32]
    scales = b.op("Gather", [b.const("token_embd_scales", embedding.scales), "input_ids"], axis=0)  # [.., nb, 1]
    rows = b.op("Mul", [b.op("Cast", [codes], to=TensorProto.FLOAT), scales])
    return b.op("Reshape", [rows, b.ints("shape_embedding", [0, 0, 0, -1])])


def build_graph(cfg: ModelConfig, embedding: np.ndarray | BlockedEmbedding, layers: Iterable[LayerWeights],
                final_norm: np.ndarray, lm_head: np.ndarray) -> onnx.ModelProto:
    """Assemble the model; `layers` may be a generator so only one block is dequantized at a time."""
    b = _GraphBuilder()
    _shape_constants(b, cfg)
    hd, kvh = cfg.head_dim, cfg.n_kv_heads

    # Embedding mixture: sum_m w[m] * E[id[m]]  ->  [B, S, d]
    emb = _embed(b, embedding)  # [B, S, M, d]
    mixed = b.op("Mul", [emb, b.op("Unsqueeze", ["input_weights", "axis_last"])])
    x = b.op("ReduceSum", [mixed, b.ints("two_axis", [2])], keepdims=0)

    # RoPE tables from explicit positions: [B, 1, S, hd]
    pos = b.op("Cast", [b.op("Unsqueeze", ["position_ids", "axis_last"])], to=TensorProto.FLOAT)
    angles = b.op("Mul", [pos, b.const("rope_inv_freq", inverse_frequencies(hd, cfg.rope_theta))])
    angles = b.op("Unsqueeze", [b.op("Concat", [angles, angles], axis=-1), "one_1d"])
    cos, sin = b.op("Cos", [angles]), b.op("Sin", [angles])

    for i, layer in enumerate(layers):
        x = _layer(b, cfg, i, layer, x, cos, sin)

    picked = b.op("Gather", [x, "logits_index"], axis=1)  # [B, N, d]
    normed = _rms_norm(b, picked, b.const("output_norm", final_norm), "rms_eps")
    b.nodes.append(helper.make_node("MatMul", [normed, b.const("lm_head", lm_head)], ["logits"], name=LM_HEAD))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    past_shape = ["batch", 1, "past", hd]
    new_shape = ["batch", kvh, "seq", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq", "mix"]),
        helper.make_tensor_value_info("input_weights", f32, ["batch", "seq", "mix"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_bias", f32, ["batch", 1, "seq", "total"]),
        helper.make_tensor_value_info("logits_index", i64, ["n_logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "n_logits", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for h in range(kvh):
            inputs += [helper.make_tensor_value_info(past_key_name(i, h), f32, past_shape),
                       helper.make_tensor_value_info(past_value_name(i, h), f32, past_shape)]
        outputs += [helper.make_tensor_value_info(new_key_name(i), f32, new_shape),
                    helper.make_tensor_value_info(new_value_name(i), f32, new_shape)]
    graph = helper.make_graph(b.nodes, "superpie_decoder", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="superpie")
    model.ir_version = 10
    return model
