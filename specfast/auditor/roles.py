"""Name a tensor's role and cut it into the matrices that get audited.

Rules are name patterns of the common architectures (Llama, Mistral/Mixtral, Qwen2/Qwen2-MoE,
DeepSeek-V2/V3, OLMoE, BERT, GPT-2, Phi-3, Falcon-style fused QKV) plus shape rules. Every tensor
gets a ``TensorPlan``: either matrices to audit (views into the loaded tensor, never copies) or a
skip reason. Nothing is dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

ROLES = (
    "embedding", "lm_head", "attn_q", "attn_k", "attn_v", "attn_o", "attn_q_a", "attn_q_b",
    "attn_kv_a", "attn_kv_b", "mlp_gate", "mlp_up", "mlp_down", "expert_gate", "expert_up",
    "expert_down", "shared_expert_gate", "shared_expert_up", "shared_expert_down", "router", "conv",
    "other", "norm", "bias", "vector", "scalar", "non_float",
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class MatrixSpec:
    """One audited matrix: ``take(t)`` maps the loaded tensor to a 2-D view of it."""

    matrix: str          # row key: the tensor name plus a slice suffix where the tensor is cut
    role: str
    expert: int | None
    take: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    note: str = ""


@dataclass
class TensorPlan:
    tensor: str
    role: str
    layer: int | None
    matrices: list[MatrixSpec]
    skip_reason: str = ""   # set when no matrix is audited
    note: str = ""


@dataclass
class HeadConfig:
    """Attention geometry from the model config (None where unknown)."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None       # dense MLP width
    moe_intermediate: int | None = None   # expert MLP width

    @classmethod
    def from_config(cls, cfg: dict) -> "HeadConfig":
        cfg = dict(cfg or {})
        for sub in ("text_config", "language_config"):
            if isinstance(cfg.get(sub), dict):
                cfg = {**cfg, **cfg[sub]}
        nh = cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("num_heads")
        nkv = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or cfg.get("multi_query_group_num")
        if nkv is None and nh is not None:
            nkv = 1 if cfg.get("multi_query") else nh
        hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
        hd = cfg.get("head_dim") or (hidden // nh if hidden and nh else None)
        inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim")
        moe_inter = cfg.get("moe_intermediate_size") or (inter if cfg.get("num_local_experts") else None)
        return cls(nh, nkv, hd, inter, moe_inter)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _leaf(name: str) -> str:
    """The module name right before the parameter name: '...self_attn.q_proj.weight' -> 'q_proj'."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) >= 2:
        return parts[-2]
    return parts[-1]


_ATTN_PARTS = {
    "q_proj": "attn_q", "query": "attn_q", "q_lin": "attn_q", "wq": "attn_q",
    "k_proj": "attn_k", "key": "attn_k", "k_lin": "attn_k", "wk": "attn_k",
    "v_proj": "attn_v", "value": "attn_v", "v_lin": "attn_v", "wv": "attn_v",
    "o_proj": "attn_o", "out_proj": "attn_o", "out_lin": "attn_o", "wo": "attn_o", "dense": "attn_o",
    "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a",
    "kv_b_proj": "attn_kv_b", "c_proj": "attn_o",
}
_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "in_proj")
_MLP_PARTS = {
    "gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
    "c_fc": "up", "fc1": "up", "lin1": "up", "dense_h_to_4h": "up", "fc_in": "up",
    "c_proj": "down", "fc2": "down", "lin2": "down", "dense_4h_to_h": "down", "fc_out": "down",
}
_EMBED = ("embed_tokens", "word_embeddings", "wte", "wpe", "position_embeddings",
          "token_type_embeddings", "embed_positions", "tok_embeddings", "embed_in", "shared")
_LM_HEAD = ("lm_head", "embed_out")
# Conv1D (GPT-2 family) stores weights as (in, out); the others as nn.Linear's (out, in)
_IN_OUT_LAYOUT = ("c_attn", "c_proj", "c_fc")


def _is_attention(name: str) -> bool:
    return bool(re.search(r"(?:^|\.)(?:self_attn|attention|attn|self_attention|mixer)(?:\.|$)", name))


def _whole(t):
    return t


def _plain(name, role, layer, note="") -> TensorPlan:
    return TensorPlan(name, role, layer, [MatrixSpec(name, role, None, _whole, note)], note=note)


def _rows(a: int, b: int, dim: int = 0):
    if dim == 0:
        return lambda t: t[a:b]
    return lambda t: t[:, a:b]


def plan_tensor(name: str, shape: tuple, dtype: torch.dtype, heads: HeadConfig) -> TensorPlan:
    """Decide what to audit in one tensor (see the module docstring)."""
    layer = layer_of(name)
    leaf = _leaf(name)
    ndim = len(shape)
    if not (dtype.is_floating_point):
        return TensorPlan(name, "non_float", layer, [], skip_reason=f"{str(dtype).replace('torch.', '')} "
                          "tensor (indices or masks, not weights)")
    if ndim == 0:
        return TensorPlan(name, "scalar", layer, [], skip_reason="scalar")
    if ndim == 1:
        if re.search(r"norm|(?:^|\.)ln_?\w*(?:\.|$)|layernorm", name, re.IGNORECASE):
            return TensorPlan(name, "norm", layer, [], skip_reason="normalisation gain or shift (1-D)")
        if name.endswith("bias") or "bias" in leaf:
            return TensorPlan(name, "bias", layer, [], skip_reason="bias vector (1-D)")
        return TensorPlan(name, "vector", layer, [], skip_reason="1-D vector")
    if 0 in shape:
        return TensorPlan(name, "other", layer, [], skip_reason=f"empty tensor of shape {tuple(shape)}")

    # ---- MoE experts
    m = _EXPERT.search(name)
    if m and ndim == 2 and leaf in _MLP_PARTS:
        part = _MLP_PARTS[leaf]
        role = f"expert_{part}"
        return TensorPlan(name, role, layer, [MatrixSpec(name, role, int(m.group(1)), _whole)])
    if re.search(r"\.experts\.[A-Za-z_]", name) and ndim == 3:
        return _fused_experts(name, shape, layer, leaf, heads)
    if re.search(r"shared_experts?\.|shared_mlp\.", name) and leaf in _MLP_PARTS and ndim == 2:
        role = f"shared_expert_{_MLP_PARTS[leaf]}"
        return _plain(name, role, layer)
    if ndim == 2 and (re.search(r"(?:mlp|block_sparse_moe|moe|feed_forward)\.gate\.weight$", name)
                      or re.search(r"(?:^|\.)router(?:\.layer|\.classifier)?\.weight$", name)):
        return _plain(name, "router", layer)
    if ndim == 2 and leaf == "shared_expert_gate":
        return _plain(name, "router", layer, "shared-expert gate (one output: its only σ is its norm)")

    # ---- embeddings and head
    if ndim == 2 and (leaf in _EMBED or (leaf == "weight" and "embed" in name)):
        return _plain(name, "embedding", layer)
    if ndim == 2 and (leaf in _LM_HEAD or name == "output.weight"):
        return _plain(name, "lm_head", layer)

    # ---- conv kernels: [out, in, k...] -> [out, in * prod(k)]
    if ndim >= 3 and (ndim == 4 or "conv" in name.lower()):
        note = (f"conv kernel {tuple(shape)} reshaped to [{shape[0]}, {_prod(shape[1:])}] (out × in·kernel, "
                "as torch.nn.utils.spectral_norm does); WeightWatcher slices per kernel position instead")
        return TensorPlan(name, "conv", layer, [MatrixSpec(name, "conv", None,
                                                           lambda t: t.reshape(t.shape[0], -1), note)], note=note)

    if ndim == 2:
        in_out = leaf in _IN_OUT_LAYOUT
        if leaf in _FUSED_QKV and (_is_attention(name) or leaf in ("qkv_proj", "query_key_value", "c_attn", "Wqkv")):
            return _fused_qkv(name, shape, layer, heads, in_out)
        if _is_attention(name) and leaf in _ATTN_PARTS:
            role = _ATTN_PARTS[leaf]
            if leaf == "dense" and not re.search(r"attention\.output\.dense|self_attention\.dense|attn\.dense", name):
                role = None
            if role:
                return _plain(name, role, layer)
        if leaf == "gate_up_proj":
            return _fused_gate_up_2d(name, shape, layer)
        if leaf in _MLP_PARTS:
            return _plain(name, f"mlp_{_MLP_PARTS[leaf]}", layer)
        if re.search(r"intermediate\.dense\.weight$", name):
            return _plain(name, "mlp_up", layer)
        if re.search(r"(?:^|\.)output\.dense\.weight$", name) and not _is_attention(name):
            return _plain(name, "mlp_down", layer)
        return _plain(name, "other", layer)
    # 3-D and higher, not recognised: each leading-index slice is a matrix
    if ndim == 3:
        note = f"3-D tensor {tuple(shape)} audited as {shape[0]} matrices of {shape[1]}×{shape[2]}"
        return TensorPlan(name, "other", layer, [MatrixSpec(f"{name}[{i}]", "other", None,
                                                            (lambda t, i=i: t[i]), note) for i in range(shape[0])],
                          note=note)
    note = f"{ndim}-D tensor {tuple(shape)} reshaped to [{shape[0]}, {_prod(shape[1:])}]"
    return TensorPlan(name, "other", layer, [MatrixSpec(name, "other", None, lambda t: t.reshape(t.shape[0], -1),
                                                        note)], note=note)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _fused_qkv(name, shape, layer, heads: HeadConfig, in_out: bool) -> TensorPlan:
    out_dim = shape[1] if in_out else shape[0]
    dim = 1 if in_out else 0
    nh, nkv, hd = heads.num_heads, heads.num_kv_heads, heads.head_dim
    if nh and nkv and hd and out_dim == (nh + 2 * nkv) * hd:
        sizes = [nh * hd, nkv * hd, nkv * hd]
        note = f"fused QKV split as [q {sizes[0]}; k {sizes[1]}; v {sizes[2]}] from the config's head counts"
    elif out_dim % 3 == 0:
        sizes = [out_dim // 3] * 3
        note = "fused QKV split in three equal parts [q; k; v] (no head counts matched)"
    else:
        return _plain(name, "other", layer, f"fused QKV of {out_dim} outputs could not be split into q, k, v")
    specs, start = [], 0
    for part, size in zip(("q", "k", "v"), sizes):
        specs.append(MatrixSpec(f"{name}:{part}", f"attn_{part}", None, _rows(start, start + size, dim), note))
        start += size
    return TensorPlan(name, "attn_qkv", layer, specs, note=note)


def _fused_gate_up_2d(name, shape, layer) -> TensorPlan:
    if shape[0] % 2:
        return _plain(name, "other", layer, f"gate_up_proj with an odd output count {shape[0]} was not split")
    half = shape[0] // 2
    note = f"fused gate_up_proj split as [gate {half}; up {half}] rows"
    return TensorPlan(name, "mlp_gate_up", layer, [
        MatrixSpec(f"{name}:gate", "mlp_gate", None, _rows(0, half), note),
        MatrixSpec(f"{name}:up", "mlp_up", None, _rows(half, 2 * half), note)], note=note)


def _fused_experts(name, shape, layer, leaf, heads: HeadConfig) -> TensorPlan:
    """3-D expert banks as held in memory by recent transformers: ``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]`` (nn.Linear orientation), or transposed ``[E, H, 2I]`` in some versions."""
    E = shape[0]
    leafname = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else leaf
    if leafname in ("gate_up_proj", "w13", "w1_w3", "gate_up"):
        inter = heads.moe_intermediate
        if inter and shape[1] == 2 * inter and shape[2] != 2 * inter:
            axis, how = 1, "rows (dim 1 = 2·moe_intermediate_size from the config)"
        elif inter and shape[2] == 2 * inter and shape[1] != 2 * inter:
            axis, how = 2, "columns (dim 2 = 2·moe_intermediate_size from the config)"
        else:
            axis, how = 1, "rows (the [E, 2I, H] layout of current transformers)"
        if shape[axis] % 2:
            return TensorPlan(name, "other", layer, [], skip_reason=f"fused gate_up_proj {tuple(shape)} "
                              f"has an odd split dimension")
        half = shape[axis] // 2
        note = f"fused expert bank {tuple(shape)} split into gate and up along {how}"
        specs = []
        for e in range(E):
            for part, (a, b) in (("gate", (0, half)), ("up", (half, 2 * half))):
                take = (lambda t, e=e, a=a, b=b: t[e, a:b]) if axis == 1 else (lambda t, e=e, a=a, b=b: t[e, :, a:b])
                specs.append(MatrixSpec(f"{name}[{e}]:{part}", f"expert_{part}", e, take, note))
        return TensorPlan(name, "expert_gate_up", layer, specs, note=note)
    part = _MLP_PARTS.get(leafname)
    role = f"expert_{part}" if part else "other"
    note = f"fused expert bank {tuple(shape)}: one matrix per expert"
    return TensorPlan(name, role, layer, [MatrixSpec(f"{name}[{e}]", role, e, (lambda t, e=e: t[e]), note)
                                          for e in range(E)], note=note)
