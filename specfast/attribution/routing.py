"""MoE routing stability: which tokens change their top-k expert set when the input embeddings move
by ε, measured against a certificate built from each token's router margin and ‖W_router‖₂.

``routing_stability(model, input_ids, eps=...)`` perturbs the input embeddings of every (unmasked)
token by a random vector of size ε, runs the model on ``inputs_embeds=``, captures every MoE
router's input h and logits z = W_r h with forward hooks, and reports per (sample, layer, token):

* ``flipped``   -- the model's own top-k expert set changed (observed);
* ``certified`` -- the top-k set provably cannot change for the measured router-input change ‖Δh‖:
  margin − fp_slack > c · L_g · ‖W_r‖₂ · ‖Δh‖ with c = √2 (expert stage) or 2 (group stage).

A certified token that flipped is a *violation*; there must be none (the test suite checks this on
every architecture and dtype). Full definitions and the derivation: ``docs/routing-stability.md``.

Routers are found by duck typing: any submodule with a 2-D ``weight`` [num_experts, hidden] and an
integer ``top_k`` (transformers 5: ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``,
``OlmoeTopKRouter``, ``DeepseekV3TopkRouter``). One with an ``e_score_correction_bias`` buffer is a
DeepSeek-V3 style sigmoid router (selection by sigmoid(z) + bias, group-limited by ``num_group`` /
``topk_group``); every other is a softmax router (selection by z). A router that returns the tuple
(logits, scores, indices) exposes the model's own selection, which is used as the observed one and
checked against the reproduced rule; a router returning only logits is selected by the rule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["routing_stability", "RoutingReport", "find_routers", "RouterInfo"]

_FN = "routing_stability"
_KINDS = ("l2", "relative")
_U32 = 2.0 ** -24
_UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
         torch.float16: 2.0 ** -11}
_ROUTER_HINT = ("submodules with a 2-D `weight` [num_experts, hidden] and an integer `top_k`, e.g. "
                "MixtralTopKRouter, Qwen2MoeTopKRouter, OlmoeTopKRouter, DeepseekV3TopkRouter")


# ------------------------------------------------------------------------------------ routers
@dataclass
class RouterInfo:
    """One MoE router as ``routing_stability`` understands it.

    name: module path; layer: decoder-layer index parsed from ``name`` (``...layers.{L}...``), else
    the router's ordinal; scoring: "softmax" (select top-k of z; L_g = 1) or "sigmoid" (select
    top-k of sigmoid(z) + bias within the top ``topk_group`` of ``n_group`` groups; L_g = 1/4);
    w_norm: ‖W_r‖₂ (``specfast.spectral_norm``) and w_norm_error its certified error bound; the
    certificate uses w_norm + w_norm_error.
    """

    name: str
    layer: int
    module: nn.Module = field(repr=False)
    scoring: str
    top_k: int
    num_experts: int
    hidden: int
    n_group: int = 1
    topk_group: int = 1
    bias: Optional[Tensor] = field(default=None, repr=False)
    w_norm: float = float("nan")
    w_norm_error: float = float("nan")

    @property
    def lipschitz(self) -> float:
        """L_g: Lipschitz constant of the per-expert score map z_i -> s_i (1 or 1/4)."""
        return 1.0 if self.scoring == "softmax" else 0.25

    @property
    def grouped(self) -> bool:
        return self.scoring == "sigmoid" and self.topk_group < self.n_group


def _is_router(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    k = getattr(mod, "top_k", None)
    return (isinstance(w, Tensor) and w.dim() == 2 and isinstance(k, int)
            and not isinstance(k, bool) and 1 <= k < w.shape[0])


def find_routers(model: nn.Module) -> List[RouterInfo]:
    """The MoE routers of ``model`` in module order (see the module docstring for the rule)."""
    out: List[RouterInfo] = []
    for ordinal, (name, mod) in enumerate((n, m) for n, m in model.named_modules() if _is_router(m)):
        m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)", name)
        layer = int(m.group(1)) if m else ordinal
        E, H = mod.weight.shape
        bias = getattr(mod, "e_score_correction_bias", None)
        if isinstance(bias, Tensor):
            n_group = int(getattr(mod, "num_group", None) or getattr(mod, "n_group", None) or 1)
            topk_group = int(getattr(mod, "topk_group", None) or n_group)
            if E % n_group or not 1 <= topk_group <= n_group:
                raise ValueError(f"{_FN}: router {name!r} has num_experts={E}, n_group={n_group}, "
                                 f"topk_group={topk_group}; expected n_group dividing num_experts "
                                 f"and 1 <= topk_group <= n_group")
            if n_group > 1 and topk_group < n_group and E // n_group < 2:
                raise ValueError(f"{_FN}: router {name!r}: group-limited selection needs >= 2 experts "
                                 f"per group; got {E // n_group}")
            info = RouterInfo(name, layer, mod, "sigmoid", mod.top_k, E, H, n_group, topk_group,
                              bias.detach())
        else:
            info = RouterInfo(name, layer, mod, "softmax", mod.top_k, E, H)
        out.append(info)
    return out


def select_experts(logits: Tensor, router: RouterInfo) -> Tensor:
    """The router's top-k expert indices [N, k] from its logits [N, E], reproducing the model's
    own rule in the model's own dtypes (transformers 5.24 ``*TopKRouter.forward``), sorted."""
    z = logits.reshape(-1, router.num_experts)
    if router.scoring == "softmax":
        probs = torch.softmax(z.float(), dim=-1)
        idx = torch.topk(probs, router.top_k, dim=-1)[1]
    else:
        s = z.float().sigmoid() + router.bias.to(z.device)
        if router.grouped:
            G, E = router.n_group, router.num_experts
            gs = s.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            gidx = torch.topk(gs, k=router.topk_group, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            s = s.masked_fill(~smask.bool(), float("-inf"))
        idx = torch.topk(s, k=router.top_k, dim=-1, sorted=False)[1]
    return idx.sort(dim=-1)[0]


# ------------------------------------------------------------------------------------ margins
def _scores64(z64: Tensor, router: RouterInfo) -> Tensor:
    """Selection scores in float64: z (softmax routers) or sigmoid(z) + bias (sigmoid routers)."""
    if router.scoring == "softmax":
        return z64
    return torch.sigmoid(z64) + router.bias.to(device=z64.device, dtype=torch.float64)


def _margins(s64: Tensor, sel: Tensor, router: RouterInfo):
    """(expert margin, group margin, group-selected mask) per token, float64.

    expert margin = min_{i∈S} s_i − max_{j∈C\\S} s_j, C = candidate experts (all, or those of the
    selected groups); +inf when C = S. group margin = min over selected groups of G_g − max over
    the others, G_g = sum of the group's two largest s (NaN when the group stage is trivial).
    """
    N, E = s64.shape
    in_s = torch.zeros(N, E, dtype=torch.bool, device=s64.device).scatter_(1, sel, True)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=s64.device)
    gmargin = torch.full((N,), float("nan"), dtype=torch.float64, device=s64.device)
    cand = torch.ones_like(in_s)
    if router.grouped:
        G = router.n_group
        gs = s64.view(N, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)                     # [N, G]
        # The selected groups are those holding S; if S spans fewer than topk_group groups, the
        # remaining selected groups are not identifiable from S: fill up with the best by G.
        in_grp = in_s.view(N, G, E // G).any(dim=-1)                                   # [N, G]
        pick = torch.where(in_grp, inf, gs).topk(router.topk_group, dim=-1)[1]
        gsel = torch.zeros_like(in_grp).scatter_(1, pick, True)
        lo = torch.where(gsel, gs, inf).amin(dim=-1)
        hi = torch.where(gsel, -inf, gs).amax(dim=-1)
        gmargin = lo - hi
        cand = gsel.unsqueeze(-1).expand(N, G, E // G).reshape(N, E)
    lo = torch.where(in_s, s64, inf).amin(dim=-1)
    hi = torch.where(~in_s & cand, s64, -inf).amax(dim=-1)
    margin = torch.where(torch.isinf(hi), inf, lo - hi)
    return margin, gmargin


def _logit_error(h64: Tensor, z: Tensor, router: RouterInfo, w64abs: Tensor) -> Tensor:
    """Per-entry bound [N, E] on |fl(W h) − W h| for the logits the model computed: output
    rounding u_z·|ẑ| plus the dot-product error (n+2)·u_acc·(|W||h|), doubled for safety."""
    dev = h64.device
    z_dtype = torch.float32 if router.scoring == "sigmoid" else z.dtype
    u_z = max(_UNIT.get(z_dtype, 2.0 ** -8), _U32)   # softmax routers also cast z to float32
    w_dtype = router.module.weight.dtype
    u_acc = 2.0 ** -53 if (z_dtype == torch.float64 and w_dtype == torch.float64) else _U32
    u_in = 0.0
    if dev.type == "cuda" and z_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        u_in = 2.0 ** -11                              # TF32 rounds both operands to 10 bits
    absprod = h64.abs() @ w64abs.T
    return 2.0 * (u_z * z.reshape(h64.shape[0], -1).double().abs()
                  + ((router.hidden + 2) * u_acc + 2 * u_in) * absprod)


def _score_error(h64: Tensor, z: Tensor, router: RouterInfo, w64abs: Tensor) -> Tensor:
    """η per token [N]: bound on |model's fp selection score − exact score at the same h|, in
    score units, maximised over experts (sigmoid adds the fp32 sigmoid and bias-add roundings)."""
    eta = router.lipschitz * _logit_error(h64, z, router, w64abs).amax(dim=-1)
    if router.scoring == "sigmoid":
        b = router.bias.abs().max().item()
        eta = eta + 4 * _U32 + 2 * _U32 * (2.0 + b)
    return eta


def _softmax_strictness(z: Tensor) -> Tensor:
    """θ per token [N]: a logit gap above θ keeps fl(softmax(z)) strictly ordered (fp32 subtraction
    of the max, exp and division each ≤ a few ulps; generous constants)."""
    z32 = z.double()
    spread = (z32.amax(dim=-1, keepdim=True) - z32).abs().amax(dim=-1)
    return 2 * _U32 * spread + 16 * _U32


# ------------------------------------------------------------------------------------ report
@dataclass
class RoutingReport:
    """Result of :func:`routing_stability`.

    tokens:  one row per (sample, layer, token) -- see ``docs/routing-stability.md`` for columns.
    summary: one row per MoE layer: flip_share (observed), at_risk_share (not certified: an upper
             bound on flip_share), violations (flipped while certified; must be 0), ...
    routers: one row per router (scoring rule, top_k, groups, ‖W_r‖₂ and its error bound, and
             selection_mismatches: tokens where the reproduced rule disagreed with the model's own
             selection on the clean input; must be 0 where the selection is observable).
    clean:   one row per (layer, token) on the unperturbed input (experts, margin, radius).
    eps, kind, num_samples: the perturbation asked for.
    """

    tokens: "object"
    summary: "object"
    routers: "object"
    clean: "object"
    eps: float
    kind: str
    num_samples: int
    notes: str = ""

    @property
    def violations(self) -> int:
        """Tokens that flipped although certified, over every sample and layer (0 if the bound holds)."""
        return int(self.summary["violations"].sum()) if len(self.summary) else 0

    def save(self, directory) -> Path:
        """Write tokens.csv, summary.csv, routers.csv, clean.csv to ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokens.to_csv(d / "tokens.csv", index=False)
        self.summary.to_csv(d / "summary.csv", index=False)
        self.routers.to_csv(d / "routers.csv", index=False)
        self.clean.to_csv(d / "clean.csv", index=False)
        return d

    def __repr__(self) -> str:
        return (f"RoutingReport(eps={self.eps}, kind={self.kind!r}, num_samples={self.num_samples}, "
                f"layers={len(self.summary)}, token_samples={len(self.tokens)}, "
                f"violations={self.violations})")


# ------------------------------------------------------------------------------------ checks
def _check_args(model, input_ids, eps, kind, num_samples, attention_mask, generator):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"{_FN}: model must have get_input_embeddings() (a Hugging Face style model); "
                        f"got {type(model).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{_FN}: input_ids must be a torch.Tensor of token ids; got "
                        f"{type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{_FN}: input_ids must have an integer dtype; got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise ValueError(f"{_FN}: input_ids must have shape [seq_len] or [batch, seq_len] with at "
                         f"least one token; got shape {tuple(input_ids.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{_FN}: eps must be a real number; got {type(eps).__name__}")
    if not math.isfinite(float(eps)) or eps < 0:
        raise ValueError(f"{_FN}: eps must be a finite number >= 0; got {eps!r}")
    if kind not in _KINDS:
        raise ValueError(f"{_FN}: kind must be one of {_KINDS}; got {kind!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{_FN}: num_samples must be an integer >= 1; got {num_samples!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"{_FN}: attention_mask must be a torch.Tensor or None; got "
                            f"{type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"{_FN}: attention_mask must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_FN}: generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")


def _pick_layers(routers: List[RouterInfo], layers) -> List[RouterInfo]:
    if layers is None:
        return routers
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        wanted = list(layers)
    except TypeError:
        raise TypeError(f"{_FN}: layers must be None, an int or an iterable of ints; got "
                        f"{type(layers).__name__}") from None
    have = [r.layer for r in routers]
    bad = [x for x in wanted if isinstance(x, bool) or not isinstance(x, int) or x not in have]
    if bad or not wanted:
        raise ValueError(f"{_FN}: layers must name MoE layers among {have}; got {wanted!r}")
    return [r for r in routers if r.layer in set(wanted)]


# ------------------------------------------------------------------------------------ main
class _Capture:
    def __init__(self, routers: Sequence[RouterInfo]):
        self.routers = routers
        self.data = {}
        self.handles = []

    def __enter__(self):
        for r in self.routers:
            self.handles.append(r.module.register_forward_hook(self._hook(r.name)))
        return self

    def _hook(self, name):
        def hook(mod, args, out):
            if name in self.data:
                raise RuntimeError(f"{_FN}: router {name!r} was called more than once in one forward "
                                   f"pass; only one call per forward is supported")
            h = args[0] if args else None
            if not isinstance(h, Tensor):
                raise RuntimeError(f"{_FN}: router {name!r} was not called with a tensor input")
            if isinstance(out, (tuple, list)):
                z = out[0]
                idx = out[2] if len(out) >= 3 and isinstance(out[2], Tensor) and \
                    not out[2].dtype.is_floating_point else None
            else:
                z, idx = out, None
            self.data[name] = (h.detach(), z.detach(), None if idx is None else idx.detach())
        return hook

    def take(self):
        d, self.data = self.data, {}
        return d

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _forward(model, embeds, mask, cap: _Capture):
    kw = dict(inputs_embeds=embeds)
    if mask is not None:
        kw["attention_mask"] = mask
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        kw["use_cache"] = False
    model(**kw)
    got = cap.take()
    missing = [r.name for r in cap.routers if r.name not in got]
    if missing:
        raise RuntimeError(f"{_FN}: routers {missing} were not called in the forward pass")
    return got


def _unpack(got, router: RouterInfo, n_tok: int):
    h, z, idx = got[router.name]
    h = h.reshape(-1, router.hidden)
    z = z.reshape(-1, router.num_experts)
    if h.shape[0] != n_tok or z.shape[0] != n_tok:
        raise RuntimeError(f"{_FN}: router {router.name!r} saw {h.shape[0]} rows; expected one per "
                           f"token ({n_tok})")
    rep = select_experts(z, router)
    obs = rep if idx is None else idx.reshape(n_tok, router.top_k).sort(dim=-1)[0]
    return h, z, obs, rep


@torch.no_grad()
def routing_stability(model: nn.Module, input_ids: Tensor, *, eps: float, kind: str = "l2",
                      num_samples: int = 8, attention_mask: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None,
                      layers: Optional[Iterable[int]] = None,
                      directions: Optional[Tensor] = None) -> RoutingReport:
    """Share of tokens whose top-k expert set changes when the input embeddings move by ε, against
    the certificate margin − fp_slack > c·L_g·‖W_r‖₂·‖Δh‖ (c = √2 experts, 2 groups).

    model: a Hugging Face style MoE model (``get_input_embeddings()``, ``forward(inputs_embeds=,
        attention_mask=)``), run in eval mode (restored afterwards).
    input_ids: [seq_len] or [batch, seq_len] integer token ids.
    eps: perturbation size ≥ 0. kind="l2": every unmasked token's embedding e_t gets δ_t with
        ‖δ_t‖₂ = eps; kind="relative": ‖δ_t‖₂ = eps·‖e_t‖₂. Directions are independent and uniform
        on the sphere (normalised Gaussians drawn from ``generator``; default: seed 0). Masked
        (attention_mask == 0) positions are not perturbed and not reported.
    num_samples: independent perturbations (one forward pass each, plus one clean pass).
    layers: restrict to these MoE layers (decoder-layer indices); default all.
    directions: optional explicit directions [num_samples, batch, seq_len, hidden] (or [batch,
        seq_len, hidden] for one sample) instead of random ones, e.g. adversarial ones; each token's
        vector is normalised and scaled as above (a zero vector leaves that token unperturbed);
        num_samples is then taken from it.
    """
    _check_args(model, input_ids, eps, kind, num_samples, attention_mask, generator)
    import pandas as pd

    routers = find_routers(model)
    if not routers:
        raise ValueError(f"{_FN}: model has no MoE router modules (looked for {_ROUTER_HINT}); got "
                         f"{type(model).__name__}")
    routers = _pick_layers(routers, layers)
    eps = float(eps)

    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    mask = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dim() == 2 else attention_mask.unsqueeze(0)
    B, T = ids.shape
    n_tok = B * T
    emb_layer = model.get_input_embeddings()
    ids = ids.to(emb_layer.weight.device)
    if mask is not None:
        mask = mask.to(ids.device)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    H_emb = emb_layer.weight.shape[-1]
    if directions is not None:
        if not isinstance(directions, Tensor) or not directions.dtype.is_floating_point:
            raise TypeError(f"{_FN}: directions must be a floating-point torch.Tensor or None; got "
                            f"{getattr(directions, 'dtype', type(directions).__name__)}")
        if directions.dim() == 3:
            directions = directions.unsqueeze(0)
        if directions.dim() != 4 or tuple(directions.shape[1:]) != (B, T, H_emb):
            raise ValueError(f"{_FN}: directions must have shape [num_samples, {B}, {T}, {H_emb}] "
                             f"or [{B}, {T}, {H_emb}]; got {tuple(directions.shape)}")
        num_samples = directions.shape[0]

    # ‖W_r‖₂ with its certified error bound (specfast.spectral_norm, Krylov residual certificate).
    from ..linalg import spectral_norm
    w64abs = {}
    for r in routers:
        W = r.module.weight.detach().to("cpu", torch.float64)
        sigma, info = spectral_norm(W, return_info=True)
        r.w_norm, r.w_norm_error = float(sigma), float(info.error_bound)
        w64abs[r.name] = W.abs().to(r.module.weight.device)

    was_training = model.training
    model.eval()
    try:
        with _Capture(routers) as cap:
            emb = emb_layer(ids)                                            # [B, T, H]
            clean = _forward(model, emb, mask, cap)
            valid = (torch.ones(B, T, dtype=torch.bool, device=ids.device) if mask is None
                     else mask.bool()).reshape(-1)
            base = {}
            for r in routers:
                h, z, obs, rep = _unpack(clean, r, n_tok)
                h64 = h.double()
                s64 = _scores64(z.double(), r)
                margin, gmargin = _margins(s64, obs, r)
                eta = _score_error(h64, z, r, w64abs[r.name])
                mism = int(((obs != rep).any(dim=-1) & valid).sum())
                base[r.name] = dict(h64=h64, obs=obs, margin=margin, gmargin=gmargin, eta=eta,
                                    mismatches=mism)

            e32 = emb.float()
            enorm = e32.norm(dim=-1, keepdim=True)                          # [B, T, 1]
            rows, E_dim = [], emb.shape[-1]
            for sample in range(num_samples):
                if directions is None:
                    g = torch.randn(B, T, E_dim, generator=generator, dtype=torch.float32)
                else:
                    g = directions[sample].detach().float()
                g = g.to(emb.device)
                u = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                scale = eps * (enorm if kind == "relative" else torch.ones_like(enorm))
                delta = u * scale
                if mask is not None:
                    delta = delta * mask.unsqueeze(-1).to(delta.dtype)
                pert = (e32 + delta).to(emb.dtype)
                applied = (pert.double() - emb.double()).norm(dim=-1).reshape(-1)
                got = _forward(model, pert, mask, cap)
                for r in routers:
                    b = base[r.name]
                    h2, z2, obs2, _ = _unpack(got, r, n_tok)
                    dh = (h2.double() - b["h64"]).norm(dim=-1)
                    eta2 = _score_error(h2.double(), z2, r, w64abs[r.name])
                    sig = r.w_norm + r.w_norm_error
                    L = r.lipschitz
                    theta = _softmax_strictness(z2.reshape(n_tok, -1)) if r.scoring == "softmax" \
                        else torch.zeros_like(dh)
                    slack = 2 * (b["eta"] + eta2) + theta
                    radius = b["margin"] / (math.sqrt(2) * L * sig)
                    radius_fp = (b["margin"] - slack) / (math.sqrt(2) * L * sig)
                    if r.grouped:
                        gslack = 4 * (b["eta"] + eta2)
                        radius = torch.minimum(radius, b["gmargin"] / (2 * L * sig))
                        radius_fp = torch.minimum(radius_fp, (b["gmargin"] - gslack) / (2 * L * sig))
                    flipped = (obs2 != b["obs"]).any(dim=-1)
                    certified = (dh == 0) | (dh < radius_fp)
                    rows.append(dict(
                        sample=torch.full((n_tok,), sample), layer=torch.full((n_tok,), r.layer),
                        batch=torch.arange(B).repeat_interleave(T), position=torch.arange(T).repeat(B),
                        token_id=ids.reshape(-1), delta_norm=applied, dh_norm=dh,
                        margin=b["margin"], group_margin=b["gmargin"], radius=radius,
                        fp_slack=slack, radius_fp=radius_fp, certified=certified, flipped=flipped,
                        valid=valid, _router=r.name,
                        experts=b["obs"], experts_perturbed=obs2))
    finally:
        model.train(was_training)

    tokens = _to_frame(rows, pd)
    router_df = pd.DataFrame([dict(layer=r.layer, router=r.name, cls=type(r.module).__name__,
                                   scoring=r.scoring, top_k=r.top_k, num_experts=r.num_experts,
                                   hidden=r.hidden, n_group=r.n_group, topk_group=r.topk_group,
                                   lipschitz=r.lipschitz, w_norm=r.w_norm,
                                   w_norm_error=r.w_norm_error,
                                   selection_mismatches=base[r.name]["mismatches"])
                              for r in routers])
    clean_df = _clean_frame(routers, base, ids, valid, B, T, pd)
    summary = _summarise(tokens, router_df, pd)
    notes = ("certified = (‖Δh‖ == 0) or ‖Δh‖ < radius_fp, with ‖Δh‖ the MEASURED change of the "
             "router input: the certificate is conditional on it (no bound of the embedding-to-"
             "router-input map is certified). radius is the exact-arithmetic radius "
             "margin/(√2·L_g·‖W_r‖₂) (group stage: group_margin/(2·L_g·‖W_r‖₂)); radius_fp subtracts "
             "the floating-point slack. See docs/routing-stability.md.")
    return RoutingReport(tokens=tokens, summary=summary, routers=router_df, clean=clean_df,
                         eps=eps, kind=kind, num_samples=num_samples, notes=notes)


def _fmt_sets(idx: Tensor) -> List[str]:
    return [",".join(str(int(v)) for v in row) for row in idx.cpu().tolist()]


def _to_frame(rows, pd):
    if not rows:
        return pd.DataFrame()
    frames = []
    for row in rows:
        valid = row.pop("valid").cpu()
        router = row.pop("_router")
        experts = _fmt_sets(row.pop("experts"))
        experts_p = _fmt_sets(row.pop("experts_perturbed"))
        cols = {k: v.cpu().numpy() for k, v in row.items()}
        df = pd.DataFrame(cols)
        df.insert(2, "router", router)
        df["experts"] = experts
        df["experts_perturbed"] = experts_p
        frames.append(df[valid.numpy()])
    out = pd.concat(frames, ignore_index=True)
    for c in ("sample", "layer", "batch", "position", "token_id"):
        out[c] = out[c].astype("int64")
    return out


def _clean_frame(routers, base, ids, valid, B, T, pd):
    frames = []
    for r in routers:
        b = base[r.name]
        sig = r.w_norm + r.w_norm_error
        radius = b["margin"] / (math.sqrt(2) * r.lipschitz * sig)
        if r.grouped:
            radius = torch.minimum(radius, b["gmargin"] / (2 * r.lipschitz * sig))
        df = pd.DataFrame(dict(layer=r.layer, router=r.name,
                               batch=torch.arange(B).repeat_interleave(T).numpy(),
                               position=torch.arange(T).repeat(B).numpy(),
                               token_id=ids.reshape(-1).cpu().numpy(),
                               experts=_fmt_sets(b["obs"]),
                               margin=b["margin"].cpu().numpy(),
                               group_margin=b["gmargin"].cpu().numpy(),
                               radius=radius.cpu().numpy()))
        frames.append(df[valid.cpu().numpy()])
    return pd.concat(frames, ignore_index=True)


def _summarise(tokens, router_df, pd):
    out = []
    for _, r in router_df.iterrows():
        t = tokens[tokens["router"] == r["router"]]
        n = len(t)
        flips = int(t["flipped"].sum())
        cert = int(t["certified"].sum())
        viol = int((t["flipped"] & t["certified"]).sum())
        out.append(dict(
            layer=int(r["layer"]), router=r["router"], scoring=r["scoring"], top_k=int(r["top_k"]),
            num_experts=int(r["num_experts"]), w_norm=float(r["w_norm"]), token_samples=n,
            flips=flips, flip_share=flips / n if n else float("nan"),
            at_risk_share=(n - cert) / n if n else float("nan"),
            certified_share=cert / n if n else float("nan"), violations=viol,
            margin_median=float(t["margin"].median()) if n else float("nan"),
            radius_median=float(t["radius"].median()) if n else float("nan"),
            dh_median=float(t["dh_norm"].median()) if n else float("nan"),
            dh_max=float(t["dh_norm"].max()) if n else float("nan"),
            dh_gain_median=float((t["dh_norm"] / t["delta_norm"])[t["delta_norm"] > 0].median())
            if n and bool((t["delta_norm"] > 0).any()) else float("nan"),
            fp_slack_max=float(t["fp_slack"].max()) if n else float("nan"),
            selection_mismatches=int(r["selection_mismatches"])))
    return pd.DataFrame(out)
