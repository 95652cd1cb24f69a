"""Per-head attention spectra: ‖W_Qʰ‖₂, ‖W_Kʰ‖₂, ‖W_Vʰ‖₂, ‖W_Oʰ‖₂ and the per-head bilinear form.

With nn.Linear weights W_Q [n_h·d, H], head h's query map is the row block W_Qʰ = W_Q[h·d:(h+1)·d]
([d, H]); its attention logits are ``x_iᵀ W_Qʰᵀ W_Kʰ x_j / √d`` (RoPE inserts an orthogonal rotation
between the factors, which leaves the bound below intact). So the bilinear form is
``B_h = W_Qʰᵀ W_Kʰ`` (H×H, rank ≤ d) and ``|Δlogit| ≤ σ₁(B_h)·‖x_i‖·‖Δx_j‖/√d``: σ₁(B_h) bounds how
fast the logits can move. B_h is never formed: with thin QRs W_Qʰᵀ = Q₁R₁ and W_Kʰᵀ = Q₂R₂,
B_h = Q₁ (R₁R₂ᵀ) Q₂ᵀ, whose singular values are those of the d×d matrix R₁R₂ᵀ. Grouped-query
attention maps query head h to key/value head h // (n_h / n_kv).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .. import linalg
from .roles import HeadConfig, plan_tensor


def bilinear_singular_values(Wq: torch.Tensor, Wk: torch.Tensor) -> torch.Tensor:
    """Singular values of W_qᵀ W_k for stacks Wq [h, d, H], Wk [h, d, H], from the factors.

    σ(W_qᵀW_k)² are the eigenvalues of G_k G_q with the d×d Grams G_q = W_q W_qᵀ, G_k = W_k W_kᵀ,
    i.e. of the symmetric G_q^{1/2} G_k G_q^{1/2}: two batched float64 Gram products (GEMMs, far
    cheaper than the Householder QRs of the [H, d] factors) and d×d eigen-solves."""
    Wq, Wk = Wq.double(), Wk.double()
    Gq, Gk = Wq @ Wq.mT, Wk @ Wk.mT
    lam, V = torch.linalg.eigh(Gq)
    half = V * lam.clamp_min(0).sqrt()[..., None, :] @ V.mT
    s2 = torch.linalg.eigvalsh(half @ Gk @ half)
    return s2.clamp_min(0).sqrt().flip(-1)


def audit_heads(source, hc: HeadConfig, writer, options):
    """One row per (layer, head), written per layer."""
    nh, nkv, d = hc.num_heads, hc.num_kv_heads, hc.head_dim
    if not (nh and nkv and d) or nh % nkv:
        return
    parts = defaultdict(dict)  # layer -> role -> (record, spec)
    for rec in source.records:
        plan = plan_tensor(rec.name, rec.shape, rec.dtype, hc)
        for spec in plan.matrices:
            if spec.role in ("attn_q", "attn_k", "attn_v", "attn_o") and plan.layer is not None \
                    and not rec.name.split(".")[-2:-1] == ["c_attn"] and "c_proj" not in rec.name:
                parts[plan.layer][spec.role] = (rec, spec)
    for layer in sorted(parts):
        if all((layer, h) in writer.done_heads for h in range(nh)):
            continue
        p = parts[layer]
        mats = {}
        for role, (rec, spec) in p.items():
            mats[role] = spec.take(rec.load()).detach()
        q, k, v, o = (mats.get(r) for r in ("attn_q", "attn_k", "attn_v", "attn_o"))
        ok = lambda W, rows: W is not None and W.shape[0] == rows  # noqa: E731
        stacks = {}
        if ok(q, nh * d):
            stacks["q"] = q.reshape(nh, d, q.shape[1])
        if ok(k, nkv * d):
            stacks["k"] = k.reshape(nkv, d, k.shape[1])
        if ok(v, nkv * d):
            stacks["v"] = v.reshape(nkv, d, v.shape[1])
        if o is not None and o.shape[1] == nh * d:
            stacks["o"] = o.reshape(o.shape[0], nh, d).permute(1, 0, 2)  # [nh, H, d], strided
        if not stacks:
            continue
        # the matrix rows already counted non-finite entries: scan per head only where there are some
        clean = {r["name"]: not (r.get("nan_count") or r.get("inf_count")) for r in writer.rows
                 if r.get("layer") == layer}
        all_clean = all(clean.get(spec.matrix, False) for _, spec in p.values())
        norms = {}
        for key, S in stacks.items():
            bad = (torch.zeros(S.shape[0], dtype=torch.bool) if all_clean
                   else ~torch.isfinite(S).flatten(1).all(1))
            val = linalg.spectral_norm(S, tol=options.tol, seed=options.seed, nonfinite="nan").double()
            norms[key] = torch.where(bad, torch.full_like(val, float("nan")), val)
        group = nh // nkv
        kv_of = torch.arange(nh) // group
        qk = None
        if "q" in stacks and "k" in stacks:
            Kh = stacks["k"][kv_of]
            fin = (torch.ones(nh, dtype=torch.bool) if all_clean else
                   torch.isfinite(stacks["q"]).flatten(1).all(1) & torch.isfinite(Kh).flatten(1).all(1))
            sv = bilinear_singular_values(torch.where(fin[:, None, None], stacks["q"], 0).float(),
                                          torch.where(fin[:, None, None], Kh, 0).float())
            qk = torch.where(fin[:, None], sv, torch.full_like(sv, float("nan")))
        rows = []
        for h in range(nh):
            row = dict(layer=layer, head=h, kv_head=int(kv_of[h]), head_dim=d)
            for key, col in (("q", "q_norm"), ("o", "o_norm")):
                if key in norms:
                    row[col] = float(norms[key][h])
            for key, col in (("k", "k_norm"), ("v", "v_norm")):
                if key in norms:
                    row[col] = float(norms[key][int(kv_of[h])])
            if qk is not None:
                s = qk[h]
                f2 = float((s ** 2).sum())
                row["qk_norm"] = float(s[0])
                row["qk_stable_rank"] = f2 / float(s[0]) ** 2 if float(s[0]) > 0 else 0.0
                row["qk_logit_lipschitz"] = float(s[0]) / math.sqrt(d)
            if "o" in norms and "v" in norms:
                row["ov_norm_bound"] = row["o_norm"] * row["v_norm"]
            rows.append(row)
        writer.add(rows, heads=True)
        for rec, _ in p.values():
            rec.release()
