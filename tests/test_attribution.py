"""specfast.attribution: gradient attributions, their stability metrics and the spectral link.

References are independent of specfast: closed forms (linear and quadratic models, f = exp(w·x)),
Captum 0.9 (Saliency, InputXGradient, IntegratedGradients, NoiseTunnel, sensitivity_max; where Captum
draws random noise it is fed specfast's draws, so both see identical perturbed inputs) and
scipy.stats.spearmanr. Models are tiny and float64 unless the dtype is what is tested.

Tolerances (this file's own table; conftest's table holds the spectral-kernel tolerances):
- EXACT = 1e-12: float64 closed forms whose only error is float64 rounding of a few dozen terms.
- CAPTUM_IG = 1e-6 relative: Captum casts the quadrature step sizes to float32
  (``torch.tensor(step_sizes).float()``) and builds the Riemann nodes with a float32 linspace, so
  its float64 IG carries a ~6e-8 relative error in the weights; specfast uses float64 weights.
- CAPTUM_SENS = 1e-9: Captum computes the norms in the attributions' dtype (float64 here), specfast
  in float64 after flattening: identical up to summation order.
- FP32 = 1e-5 relative: float32 models, same computation in a different summation order.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import specfast.attribution as A
from specfast.attribution import (attribute, attribution_spectra, attribution_stability, cosine_similarity,
                                  input_x_gradient, integrated_gradients, max_sensitivity, perturb, relative_l2,
                                  saliency, smoothgrad, spearman, spectral_link, token_attributions, topk_overlap)

EXACT = 1e-12
CAPTUM_IG = 1e-6
CAPTUM_SENS = 1e-9
FP32 = 1e-5

captum_attr = pytest.importorskip("captum.attr")
captum_metrics = pytest.importorskip("captum.metrics")


# ------------------------------------------------------------------------------------ models
def mlp(d=6, h=16, c=4, act=nn.Tanh, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, h), act(), nn.Linear(h, c)).to(dtype).eval()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Quadratic(nn.Module):
    """f_c(x) = ½ xᵀ Q_c x, c = 0, 1."""

    def __init__(self, Q):
        super().__init__()
        self.Q = Q                                                          # [2, d, d] symmetric

    def forward(self, x):
        return 0.5 * torch.einsum("bi,cij,bj->bc", x, self.Q, x)


class ExpModel(nn.Module):
    """f(x) = exp(w·x) as a [B, 1] output."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return torch.exp(x @ self.w)[:, None]


@pytest.fixture
def data():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 1])
    return mlp(), x, t


# ------------------------------------------------------------------------------------ closed forms
def test_linear_closed_forms():
    torch.manual_seed(0)
    lin = nn.Linear(7, 3).double()
    W, x = lin.weight.detach(), torch.randn(4, 7, dtype=torch.float64)
    t = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(saliency(lin, x, t), W[t], rtol=0, atol=EXACT)
    torch.testing.assert_close(saliency(lin, x, t, abs=True), W[t].abs(), rtol=0, atol=EXACT)
    torch.testing.assert_close(input_x_gradient(lin, x, t), x * W[t], rtol=0, atol=EXACT)
    for method in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle"):
        ig, delta = integrated_gradients(lin, x, t, steps=5, method=method, return_delta=True)
        torch.testing.assert_close(ig, x * W[t], rtol=0, atol=EXACT)
        assert delta.dtype == torch.float64 and delta.abs().max() < EXACT
    # Captum's "riemann_trapezoid": nodes linspace(0, 1, n), weights 1/n with the end ones halved, so
    # the weights sum to 1 − 1/n (not 1): IG = (1 − 1/n) x ⊙ W[t] and the gap is −(f(x) − f(0))/n.
    ig, delta = integrated_gradients(lin, x, t, steps=5, method="riemann_trapezoid", return_delta=True)
    torch.testing.assert_close(ig, 0.8 * x * W[t], rtol=0, atol=EXACT)
    torch.testing.assert_close(delta, -(x * W[t]).sum(1) / 5, rtol=0, atol=EXACT)
    # target None = arg-max of model(x); a scalar target broadcasts
    torch.testing.assert_close(saliency(lin, x), W[lin(x).argmax(1)], rtol=0, atol=0)
    torch.testing.assert_close(saliency(lin, x, 1), W[[1, 1, 1, 1]], rtol=0, atol=0)
    # baselines: scalar and per-sample tensor; IG = (x − x0) W[t] for a linear model
    x0 = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(integrated_gradients(lin, x, t, baseline=x0), (x - x0) * W[t], rtol=0, atol=EXACT)
    torch.testing.assert_close(integrated_gradients(lin, x, t, baseline=0.5), (x - 0.5) * W[t], rtol=0, atol=EXACT)
    torch.testing.assert_close(integrated_gradients(lin, x, t, baseline=x0[:1]), (x - x0[:1]) * W[t],
                               rtol=0, atol=EXACT)


def test_ig_quadratic_riemann_left_exact_error():
    """f = ½ xᵀQx, zero baseline: ∇f(αx) = αQx, so IG with nodes α_k = k/n and weights 1/n is
    x ⊙ Qx · (n−1)/(2n), and the completeness gap is exactly −xᵀQx/(2n)."""
    torch.manual_seed(0)
    d = 5
    M = torch.randn(2, d, d, dtype=torch.float64)
    Q = M + M.transpose(1, 2)
    model = Quadratic(Q)
    x = torch.randn(3, d, dtype=torch.float64)
    t = torch.tensor([0, 1, 1])
    quad = torch.einsum("bi,bij,bj->b", x, Q[t], x)
    for n in (2, 4, 16, 64):
        ig, delta = integrated_gradients(model, x, t, steps=n, method="riemann_left", return_delta=True)
        Qx = torch.einsum("bij,bj->bi", Q[t], x)
        torch.testing.assert_close(ig, x * Qx * (n - 1) / (2 * n), rtol=EXACT, atol=EXACT)
        torch.testing.assert_close(delta, -quad / (2 * n), rtol=1e-10, atol=EXACT)
    # a linear integrand: Gauss–Legendre (any n) and the midpoint rule are exact
    for method in ("gausslegendre", "riemann_middle"):
        _, delta = integrated_gradients(model, x, t, steps=2, method=method, return_delta=True)
        assert delta.abs().max() < 1e-12 * quad.abs().max()


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_ig_completeness_converges(method):
    """f = exp(w·x): Σ IG = (w·x) Σ_k w_k exp(α_k w·x) → exp(w·x) − 1; the gap shrinks with steps
    (geometrically for Gauss–Legendre; as 1/n for Captum's trapezoid, whose weights sum to 1 − 1/n)."""
    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    model = ExpModel(w)
    gaps = []
    for n in ((2, 4, 8, 16) if method == "gausslegendre" else (4, 8, 16, 32, 64)):
        ig, delta = integrated_gradients(model, x, 0, steps=n, method=method, return_delta=True)
        s = x @ w
        if method == "gausslegendre":
            a, wq = np.polynomial.legendre.leggauss(n)
            expect = s * (torch.as_tensor(0.5 * wq) * torch.exp(torch.as_tensor(0.5 * (1 + a))[None] * s[:, None])).sum(1)
        else:
            al = torch.linspace(0, 1, n, dtype=torch.float64)
            ww = torch.full((n,), 1.0 / n, dtype=torch.float64)
            ww[0] /= 2
            ww[-1] /= 2
            expect = s * (ww * torch.exp(al[None] * s[:, None])).sum(1)
        torch.testing.assert_close(ig.sum(1), expect, rtol=1e-12, atol=EXACT)
        torch.testing.assert_close(delta, expect - (torch.exp(s) - 1), rtol=0, atol=1e-12 * float(torch.exp(s).max()))
        gaps.append(float(delta.abs().max()))
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < (1e-10 if method == "gausslegendre" else 0.2 * gaps[0])


# ------------------------------------------------------------------------------------ Captum agreement
def test_captum_saliency_inputxgradient(data):
    model, x, t = data
    for use_abs in (True, False):
        ref = captum_attr.Saliency(model).attribute(x.clone().requires_grad_(), target=t, abs=use_abs)
        torch.testing.assert_close(saliency(model, x, t, abs=use_abs), ref.detach(), rtol=0, atol=EXACT)
    ref = captum_attr.InputXGradient(model).attribute(x.clone().requires_grad_(), target=t)
    torch.testing.assert_close(input_x_gradient(model, x, t), ref.detach(), rtol=0, atol=EXACT)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("steps", [2, 13])
def test_captum_integrated_gradients(data, method, steps):
    model, x, t = data
    x0 = torch.randn_like(x)
    ref, ref_delta = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=x0, target=t, n_steps=steps, method=method, return_convergence_delta=True)
    ig, delta = integrated_gradients(model, x, t, baseline=x0, steps=steps, method=method, return_delta=True)
    torch.testing.assert_close(ig, ref.detach(), rtol=CAPTUM_IG, atol=CAPTUM_IG * float(ref.abs().max()))
    torch.testing.assert_close(delta, ref_delta.detach().double(), rtol=0,
                               atol=CAPTUM_IG * float(ref.abs().sum(1).max()))


def test_captum_float32_cnn():
    model = TinyCNN().eval()
    x = torch.randn(3, 2, 5, 5)
    t = torch.tensor([2, 0, 1])
    ref = captum_attr.Saliency(model).attribute(x.clone().requires_grad_(), target=t)
    out = saliency(model, x, t, abs=True)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref.detach(), rtol=FP32, atol=FP32 * float(ref.abs().max()))
    ref = captum_attr.IntegratedGradients(model).attribute(x, target=t, n_steps=9)
    torch.testing.assert_close(integrated_gradients(model, x, t, steps=9, chunk_size=5), ref.detach(),
                               rtol=FP32, atol=FP32 * float(ref.abs().max()))


@pytest.mark.parametrize("base", ["saliency", "input_x_gradient"])
def test_captum_noise_tunnel_identical_noise(data, base, monkeypatch):
    """Captum's NoiseTunnel draws its noise with torch.normal on the global RNG; we replace its
    noise function by one that returns specfast's draws (draw j for sample b at row b·n + j, the
    order of Captum's repeat_interleave), so both average the base attribution over the same points."""
    model, x, t = data
    n, std, seed = 6, 0.3, 7
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([std * torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(n)], 1)  # [B, n, d]

    def replay(inp, stdev, n_samples):
        assert n_samples == n and stdev == std
        return inp.repeat_interleave(n_samples, dim=0) + draws.reshape(-1, *x.shape[1:])

    NT = captum_attr.NoiseTunnel
    monkeypatch.setattr(NT, "_add_noise_to_input", staticmethod(replay))
    inner = captum_attr.Saliency(model) if base == "saliency" else captum_attr.InputXGradient(model)
    kw = {"abs": False} if base == "saliency" else {}
    ref = NT(inner).attribute(x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=n, stdevs=std,
                              target=t, **kw)
    ours = smoothgrad(model, x, t, noise_std=std, samples=n, generator=torch.Generator().manual_seed(seed), base=base)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=EXACT)
    # the replay is what made them equal: a different seed does not agree
    other = smoothgrad(model, x, t, noise_std=std, samples=n, generator=torch.Generator().manual_seed(seed + 1), base=base)
    assert (other - ref.detach()).abs().max() > 1e-6


def test_captum_sensitivity_max_same_perturbations(data):
    model, x, t = data
    n, eps = 7, 0.2
    for kind in ("linf", "gaussian"):
        ours = max_sensitivity(lambda z: saliency(model, z, t), x, eps=eps, num_samples=n, kind=kind,
                               generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        perturbed = torch.stack([perturb(x, eps, kind, generator=g) for _ in range(n)], 1).reshape(-1, x.shape[1])

        def replay(inp):
            assert torch.equal(inp, x.repeat_interleave(n, 0))
            return perturbed

        ref = captum_metrics.sensitivity_max(captum_attr.Saliency(model).attribute, x, perturb_func=replay,
                                             n_perturb_samples=n, target=t, abs=False)
        assert ours.shape == (x.shape[0],) and ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref.double(), rtol=CAPTUM_SENS, atol=0)
    # Captum's convention for a zero explanation: normalised by 1 (the absolute change)
    # explain(z) = z − x is 0 at x and δ at x + δ: the sensitivity is max_j ‖δ_j‖ (not inf)
    zero = max_sensitivity(lambda z: z - x, x, eps=0.1, num_samples=3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expect = torch.stack([(perturb(x, 0.1, generator=g) - x).norm(dim=1) for _ in range(3)], 1).max(1).values
    torch.testing.assert_close(zero, expect, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ chunking, dtype
def test_ig_and_smoothgrad_chunking(data):
    model, x, t = data
    ref, dref = integrated_gradients(model, x, t, steps=9, chunk_size=None, return_delta=True)
    for c in (1, 7, 45, 1000):
        ig, d = integrated_gradients(model, x, t, steps=9, chunk_size=c, return_delta=True)
        torch.testing.assert_close(ig, ref, rtol=1e-12, atol=EXACT)
        torch.testing.assert_close(d, dref, rtol=0, atol=EXACT)
    sref = smoothgrad(model, x, t, samples=5, generator=torch.Generator().manual_seed(3))
    for c in (1, 7, 25):
        s = smoothgrad(model, x, t, samples=5, generator=torch.Generator().manual_seed(3), chunk_size=c)
        torch.testing.assert_close(s, sref, rtol=1e-12, atol=EXACT)


def test_calls_per_chunk_bounded(data):
    model, x, t = data
    sizes = []

    def counted(z):
        sizes.append(z.shape[0])
        return model(z)

    integrated_gradients(counted, x, t, steps=8, chunk_size=3, return_delta=True)
    # target check on the batch (5 rows), B·steps = 40 points, then f(x) and f(x0): all in chunks <= 3
    assert max(sizes) == 3 and sum(sizes) == 5 + 40 + 5 + 5
    sizes.clear()
    smoothgrad(counted, x, None, samples=4, chunk_size=2)
    assert max(sizes) == 2 and sum(sizes) == 5 + 20


def test_dtype_shape_detached_and_independent(data):
    model, x, t = data
    for fn in (saliency, input_x_gradient, integrated_gradients, smoothgrad):
        out = fn(model, x, t)
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
        # samples are independent: the batch equals the samples one by one
        kw = {"generator": torch.Generator().manual_seed(0)} if fn is smoothgrad else {}
        if fn is not smoothgrad:
            one = torch.cat([fn(model, x[i:i + 1], t[i:i + 1], **kw) for i in range(x.shape[0])])
            torch.testing.assert_close(out, one, rtol=1e-12, atol=EXACT)
    assert attribute(model, x, t, "integrated_gradients", ig_method="riemann_trapezoid", steps=4).shape == x.shape
    torch.testing.assert_close(attribute(model, x, t, "saliency"), saliency(model, x, t))
    assert saliency(model, x[:0], t[:0]).shape == (0, 6)


# ------------------------------------------------------------------------------------ transformer tokens
class TinyEncoder(nn.Module):
    """inputs_embeds [B, T, H] -> logits [B, C]; padding (mask == 0) is excluded as attention key and
    from the mean pooling, so padded embeddings cannot reach the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, e, mask):
        h = self.enc(e, src_key_padding_mask=mask == 0)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_token_attributions_transformer():
    """Attributions w.r.t. the input embeddings of a small transformer encoder, with a per-sample
    attention mask passed as forward_kwargs (gathered per row in the chunked IG points)."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    model = TinyEncoder().double().eval()
    e = torch.randn(3, 5, 8, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    fk = {"mask": mask}
    g = saliency(model, e, t, forward_kwargs=fk)
    assert g.shape == e.shape
    # padded embeddings do not reach the output: their gradient is exactly zero
    assert torch.all(g[1, 3:] == 0) and torch.all(g[2, 2:] == 0) and torch.all(g[0].abs().sum(-1) > 0)
    # IG per token: the token scores add up to f(x) − f(0) up to the quadrature gap (completeness)
    ig, delta = integrated_gradients(model, e, t, steps=24, return_delta=True, chunk_size=5, forward_kwargs=fk)
    ig1 = integrated_gradients(model, e, t, steps=24, chunk_size=None, forward_kwargs=fk)
    torch.testing.assert_close(ig, ig1, rtol=1e-10, atol=1e-12)            # mask rows follow their sample
    tok = token_attributions(ig, reduce="sum", mask=mask)
    with torch.no_grad():
        gap = model(e, mask).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(e), mask).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(tok.sum(1), gap + delta, rtol=1e-10, atol=1e-12)
    # a zero baseline puts the post-LayerNorm encoder near its scale-invariant singularity (∇f(αe) ~ 1/α
    # down to LayerNorm's eps), so the quadrature converges slowly: measured gap 0.59 at 24 nodes
    _, delta_fine = integrated_gradients(model, e, t, steps=192, return_delta=True, forward_kwargs=fk)
    assert delta_fine.abs().max() < 0.2 * delta.abs().max()
    l2 = token_attributions(ig, reduce="l2", mask=mask)
    torch.testing.assert_close(l2[0], ig[0].norm(dim=-1), rtol=0, atol=0)
    assert torch.all(l2[1, 3:] == 0) and torch.all(tok[2, 2:] == 0) and torch.all(l2[1, :3] > 0)
    # the mask zeroes positions whatever the attributions there
    torch.testing.assert_close(token_attributions(torch.ones(2, 5, 3), mask=mask[:2]),
                               torch.tensor([[3.0] * 5, [3.0, 3, 3, 0, 0]]))


# ------------------------------------------------------------------------------------ metrics
def test_metric_identities_and_hand_examples():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 5)
    assert torch.equal(relative_l2(a, a), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(cosine_similarity(a, a), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(topk_overlap(a, a, 4), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(spearman(a, a), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    v = torch.arange(10.0)[None]
    torch.testing.assert_close(spearman(v, v.flip(1)), torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(spearman(v, v.exp()), torch.tensor([1.0], dtype=torch.float64))  # monotone map
    # hand computed
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(relative_l2(x, y), torch.tensor([0.8], dtype=torch.float64))
    torch.testing.assert_close(cosine_similarity(x, y), torch.tensor([0.6], dtype=torch.float64))
    p, q = torch.tensor([[5.0, -4, 3, 2, 1]]), torch.tensor([[1.0, 2, 3, -4, 5]])
    assert topk_overlap(p, q, 2).item() == 0.0
    assert topk_overlap(p, q, 3).item() == pytest.approx(1 / 3)
    assert topk_overlap(p, q, 99).item() == 1.0                              # k clamped to d
    # ties in |a|: broken by the lower index (top-2 of |[1, -1, 1, 0]| is {0, 1})
    assert topk_overlap(torch.tensor([[1.0, -1, 1, 0]]), torch.tensor([[0.0, 0.5, 0, 1]]), 2).item() == 0.5
    ties = torch.tensor([1.0, -1.0] * 1000)[None]                           # all |a| tied: top-300 = first 300
    first = torch.linspace(2, 1, 2000)[None]                                 # strictly decreasing: first 300
    assert topk_overlap(ties, first, 300).item() == 1.0
    # zero-norm conventions
    z, o = torch.zeros(1, 3), torch.ones(1, 3)
    assert relative_l2(z, z).item() == 0 and relative_l2(z, o).item() == math.inf
    assert cosine_similarity(z, z).item() == 1 and cosine_similarity(z, o).item() == 0
    assert spearman(z, o).item() == 1 and spearman(z, torch.tensor([[1.0, 2, 3]])).item() == 0


def test_spearman_ties_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(6, 17)).astype(float)                      # many ties
    b = rng.integers(0, 5, size=(6, 17)).astype(float)
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(6)]
    torch.testing.assert_close(spearman(torch.as_tensor(a), torch.as_tensor(b)),
                               torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)


def test_perturb_balls_and_distributions():
    x = torch.zeros(2000, 50, dtype=torch.float64)
    eps = 0.3
    g = torch.Generator().manual_seed(0)
    d = perturb(x, eps, "linf", generator=g)
    assert d.abs().max() <= eps and d.abs().max() > 0.99 * eps
    assert abs(float(d.mean())) < 5 * eps / math.sqrt(3 * d.numel())        # U[-eps, eps]: mean 0, var eps²/3
    assert abs(float(d.var()) / (eps**2 / 3) - 1) < 0.02
    d = perturb(x, eps, "l2", generator=g)
    r = d.norm(dim=1) / eps
    assert r.max() <= 1 + 1e-12
    # radius eps·U^{1/d}: E[r] = d/(d+1), sd(r) ≈ 1/(d+1) / sqrt(N)
    assert abs(float(r.mean()) - 50 / 51) < 5 * (1 / 51) / math.sqrt(2000)
    # uniform direction: the mean direction is ~0
    assert float((d / d.norm(dim=1, keepdim=True)).mean(0).norm()) < 5 * math.sqrt(50 / 2000) / math.sqrt(50)
    d = perturb(x, eps, "gaussian", generator=g)
    sd = float(d.std())
    assert abs(sd / eps - 1) < 5 / math.sqrt(2 * d.numel())                 # stderr of sd ≈ sd/sqrt(2N)
    assert torch.equal(perturb(x, 0.0, "gaussian", generator=g), x)
    # reproducible with a seeded generator; float32 stays float32
    a1 = perturb(torch.ones(3, 4), 0.1, generator=torch.Generator().manual_seed(5))
    a2 = perturb(torch.ones(3, 4), 0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2) and a1.dtype == torch.float32


# ------------------------------------------------------------------------------------ stability
@pytest.fixture
def relu_net():
    torch.manual_seed(3)
    model = mlp(d=8, h=32, c=3, act=nn.ReLU, seed=3)
    x = torch.randn(24, 8, dtype=torch.float64)
    return model, x


def test_attribution_stability_eps0_and_monotone(relu_net):
    model, x = relu_net
    for method, kw in (("saliency", None), ("integrated_gradients", {"steps": 4}), ("smoothgrad", {"samples": 3})):
        df = attribution_stability(model, x, method=method, eps=0.0, num_samples=2,
                                   generator=torch.Generator().manual_seed(0), method_kwargs=kw)
        assert len(df) == x.shape[0]
        assert (df["relative_l2"] == 0).all() and (df["topk_overlap"] == 1).all(), method
        assert (df["max_sensitivity"] == 0).all() and (df["prediction_flipped_share"] == 0).all()
        np.testing.assert_allclose(df["cosine"], 1, atol=1e-12)
        np.testing.assert_allclose(df["spearman"], 1, atol=1e-12)
    means = []
    for eps in (0.01, 0.05, 0.2, 0.8, 3.0):
        df = attribution_stability(model, x, eps=eps, num_samples=6, k=3, generator=torch.Generator().manual_seed(1))
        means.append((df["relative_l2"].mean(), df["topk_overlap"].mean(), df["prediction_flipped_share"].mean()))
    rel = [m[0] for m in means]
    assert all(b > a for a, b in zip(rel, rel[1:])), rel
    assert means[-1][1] < means[0][1] and means[-1][2] > means[0][2]
    # the max_sensitivity column is max_sensitivity() on the same draws (same generator state)
    df = attribution_stability(model, x, eps=0.5, kind="linf", num_samples=4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(df["target"].to_numpy())
    ms = max_sensitivity(lambda z: saliency(model, z, t), x, eps=0.5, kind="linf", num_samples=4,
                         generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(df["max_sensitivity"].to_numpy(), ms.numpy(), rtol=1e-12)
    assert (df["max_sensitivity"] >= df["relative_l2"] - 1e-12).all()
    assert df.attrs["eps"] == 0.5 and df.attrs["kind"] == "linf"


def test_relu_saliency_piecewise_constant(relu_net):
    """For a ReLU net saliency changes only when a gate flips: perturbations far inside the linear
    region (radius from specfast.stability.linear_region_radius) leave it exactly unchanged."""
    from specfast.stability import linear_region_radius

    model, x = relu_net
    r = torch.as_tensor(linear_region_radius(list(model), x))
    g = torch.Generator().manual_seed(0)
    d = perturb(torch.zeros_like(x), 1.0, "l2", generator=g)
    d = d / d.norm(dim=1, keepdim=True) * (0.5 * r)[:, None]
    t = model(x).argmax(1)
    assert torch.equal(relative_l2(saliency(model, x, t), saliency(model, x + d, t)),
                       torch.zeros(x.shape[0], dtype=torch.float64))


def test_spectral_link_and_png(relu_net, tmp_path):
    model, x = relu_net
    x = x[:12]
    png = tmp_path / "sub" / "link.png"
    stab, per, link = attribution_spectra(model, x, eps=0.3, num_samples=4, generator=torch.Generator().manual_seed(0),
                                          plot=png, topk=2)
    assert len(stab) == len(per) == 12 and link["n"] == 12 and link["metric"] == "relative_l2"
    for c in ("jac_norm", "jac_entropy"):
        assert link[c]["n"] == 12
        assert math.isfinite(link[c]["pearson"]) and math.isfinite(link[c]["spearman"])
        assert -1 <= link[c]["pearson"] <= 1 and 0 <= link[c]["pearson_p"] <= 1
    assert link["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the correlations are those of the columns (independent recomputation with scipy)
    stats = pytest.importorskip("scipy.stats")
    ref = stats.pearsonr(per["jac_norm"], stab["relative_l2"]).statistic
    assert link["jac_norm"]["pearson"] == pytest.approx(ref, abs=1e-12)
    ref = stats.spearmanr(per["jac_entropy"], stab["relative_l2"]).statistic
    assert link["jac_entropy"]["spearman"] == pytest.approx(ref, abs=1e-12)
    # matching on 'sample' when shuffled; by position without a sample column
    shuffled = spectral_link(stab.sample(frac=1, random_state=0), per, metric="spearman", against="jac_stable_rank")
    direct = spectral_link(stab.drop(columns="sample"), per.drop(columns="sample"), metric="spearman",
                           against=["jac_stable_rank"])
    assert math.isfinite(direct["jac_stable_rank"]["pearson"])
    assert shuffled["jac_stable_rank"]["pearson"] == pytest.approx(direct["jac_stable_rank"]["pearson"], abs=1e-12)
    assert direct["plot"] is None


# ------------------------------------------------------------------------------------ errors
class Flat(nn.Module):
    def forward(self, x):
        return x.sum(1)                                                      # [B], not [B, C]


ERRORS = [
    ("x-int", lambda m, x, t: saliency(m, x.long(), t),
     TypeError, r"saliency: x must be a floating-point tensor; got dtype torch.int64"),
    ("target-shape", lambda m, x, t: saliency(m, x, t[:3]),
     ValueError, r"saliency: target must have shape \[B\] = \(5,\); got shape \(3,\)"),
    ("target-range", lambda m, x, t: input_x_gradient(m, x, t + 3),
     ValueError, r"input_x_gradient: target must lie in \[0, 4\).*got range \[3, 6\]"),
    ("target-float", lambda m, x, t: saliency(m, x, t.double()),
     TypeError, r"saliency: target must be integer.*torch.float64"),
    ("steps0", lambda m, x, t: integrated_gradients(m, x, t, steps=0),
     ValueError, r"integrated_gradients: steps must be a positive integer; got 0"),
    ("steps-float", lambda m, x, t: integrated_gradients(m, x, t, steps=2.5),
     TypeError, r"integrated_gradients: steps must be an integer.*2.5"),
    ("trapezoid1", lambda m, x, t: integrated_gradients(m, x, t, steps=1, method="riemann_trapezoid"),
     ValueError, r"integrated_gradients: steps must be >= 2 .*got 1"),
    ("ig-method", lambda m, x, t: integrated_gradients(m, x, t, method="simpson"),
     ValueError, r"integrated_gradients: method must be one of.*'simpson'"),
    ("baseline", lambda m, x, t: integrated_gradients(m, x, t, baseline=torch.zeros(3)),
     ValueError, r"integrated_gradients: baseline must be broadcastable.*\(3,\)"),
    ("chunk0", lambda m, x, t: integrated_gradients(m, x, t, chunk_size=0),
     ValueError, r"integrated_gradients: chunk_size must be a positive integer; got 0"),
    ("samples0", lambda m, x, t: smoothgrad(m, x, t, samples=0),
     ValueError, r"smoothgrad: samples must be a positive integer; got 0"),
    ("noise-neg", lambda m, x, t: smoothgrad(m, x, t, noise_std=-1.0),
     ValueError, r"smoothgrad: noise_std must be non-negative and finite; got -1.0"),
    ("sg-base", lambda m, x, t: smoothgrad(m, x, t, base="gradcam"),
     ValueError, r"smoothgrad: base must be .*'gradcam'"),
    ("dispatch", lambda m, x, t: attribute(m, x, t, method="lime"),
     ValueError, r"attribute: method must be one of.*'lime'"),
    ("output-1d", lambda m, x, t: saliency(Flat(), x, t),
     ValueError, r"saliency: model must return outputs of shape \[B, C\] with B = 5; got shape \(5,\)"),
    ("perturb-eps", lambda m, x, t: perturb(x, -0.1),
     ValueError, r"perturb: eps must be non-negative and finite; got -0.1"),
    ("perturb-kind", lambda m, x, t: perturb(x, 0.1, "l1"), ValueError, r"perturb: kind must be one of.*got 'l1'"),
    ("ms-norm", lambda m, x, t: max_sensitivity(lambda z: z, x, norm="nuc"),
     ValueError, r"max_sensitivity: norm must be 'fro' or a real.*'nuc'"),
    ("ms-explain", lambda m, x, t: max_sensitivity(lambda z: z[:2], x),
     ValueError, r"max_sensitivity: explain\(x\) must return attributions with batch size 5; got shape \(2, 6\)"),
    ("ms-samples", lambda m, x, t: max_sensitivity(lambda z: z, x, num_samples=0),
     ValueError, r"max_sensitivity: num_samples must be a positive integer; got 0"),
    ("stab-eps", lambda m, x, t: attribution_stability(m, x, t, eps=-1),
     ValueError, r"attribution_stability: eps must be non-negative and finite; got -1"),
    ("stab-method", lambda m, x, t: attribution_stability(m, x, t, method="occlusion"),
     ValueError, r"attribution_stability: method must be one of.*'occlusion'"),
    ("stab-kw", lambda m, x, t: attribution_stability(m, x, t, method_kwargs={"target": t}),
     ValueError, r"attribution_stability: method_kwargs must not contain 'target'"),
    ("stab-kind", lambda m, x, t: attribution_stability(m, x, t, kind="uniform"),
     ValueError, r"attribution_stability: kind must be one of.*'uniform'"),
    ("topk-k", lambda m, x, t: topk_overlap(x, x, 0), ValueError, r"topk_overlap: k must be a positive integer; got 0"),
    ("metric-shape", lambda m, x, t: relative_l2(x, x[:, :3]),
     ValueError, r"relative_l2: a and b must have the same shape.*\(5, 6\) and \(5, 3\)"),
    ("tok-dims", lambda m, x, t: token_attributions(x),
     ValueError, r"token_attributions: attributions must have shape \[B, T, H\]; got shape \(5, 6\)"),
    ("tok-reduce", lambda m, x, t: token_attributions(x[..., None], reduce="max"),
     ValueError, r"token_attributions: reduce must be 'sum' or 'l2'; got 'max'"),
    ("tok-mask", lambda m, x, t: token_attributions(x[..., None], mask=torch.ones(5, 5)),
     ValueError, r"token_attributions: mask must have shape \[B, T\] = \(5, 6\); got shape \(5, 5\)"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(c, e, m, id=i) for i, c, e, m in ERRORS])
def test_errors(data, call, exc, match):
    model, x, t = data
    with pytest.raises(exc, match=match):
        call(model, x, t)


def test_spectral_link_errors():
    import pandas as pd

    s = pd.DataFrame({"relative_l2": [0.1, 0.2, 0.3]})
    p = pd.DataFrame({"jac_norm": [1.0, 2.0, 3.0], "jac_entropy": [0.1, 0.5, 0.2]})
    with pytest.raises(ValueError, match=r"spectral_link: metric must be a column of stability_df.*'cosine'"):
        spectral_link(s, p, metric="cosine")
    with pytest.raises(ValueError, match=r"spectral_link: against must name columns of per_sample_df.*'jac_frobenius'"):
        spectral_link(s, p, against=("jac_frobenius",))
    with pytest.raises(ValueError, match=r"spectral_link: stability_df and per_sample_df must have one row per sample.*3 and 2"):
        spectral_link(s, p.iloc[:2])
    with pytest.raises(TypeError, match=r"spectral_link: per_sample_df must be a pandas DataFrame; got dict"):
        spectral_link(s, {"jac_norm": [1.0]})
    ok = spectral_link(s, p)                                               # positive control
    assert ok["jac_norm"]["pearson"] == pytest.approx(1.0) and ok["n"] == 3


def test_public_api():
    assert set(A.__all__) >= {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "attribute",
                              "token_attributions", "perturb", "relative_l2", "cosine_similarity", "topk_overlap",
                              "spearman", "max_sensitivity", "attribution_stability", "spectral_link",
                              "attribution_spectra"}
