"""specfast.nn.spectral_norm against torch.nn.utils.parametrizations.spectral_norm.

The claim (docs/regularizers.md §1): same signature, state_dict and errors as torch's version, and
the same values and gradients step for step when started from the same vectors — only the
arithmetic is arranged differently (two products instead of three, σ in closed form, a fused
backward). Each test builds torch's module and ours from the same seed (same start vectors) or
copies torch's buffers into ours, then trains both identically.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import specfast.nn as snn

# relative agreement with torch: both compute the same update in the same precision; only the order
# of the floating-point operations differs (fp32: a few eps32 times the conditioning of a step)
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _pair(make, seed=0, **kw):
    torch.manual_seed(seed)
    a = torch_sn(make(), **kw)
    torch.manual_seed(seed)
    b = snn.spectral_norm(make(), **kw)
    return a, b


MODULES = {
    "linear": (lambda: nn.Linear(20, 30), (7, 20)),
    "linear_wide": (lambda: nn.Linear(40, 6), (7, 40)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 8, 8)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 3), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n_iter", [1, 3], ids=lambda n: f"iters={n}")
@pytest.mark.parametrize("kind", list(MODULES))
def test_matches_torch_step_by_step(kind, n_iter, dtype):
    make, xshape = MODULES[kind]
    a, b = _pair(lambda: make().to(dtype), n_power_iterations=n_iter)
    pa, pb = a.parametrizations.weight, b.parametrizations.weight
    tol = RTOL[dtype]
    # 15 initial iterations from the same draws
    assert _rel(pb[0]._u, pa[0]._u) < tol and _rel(pb[0]._v, pa[0]._v) < tol
    x = torch.randn(xshape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    oa = torch.optim.SGD(a.parameters(), lr=0.01)
    ob = torch.optim.SGD(b.parameters(), lr=0.01)
    for _ in range(4):
        ya, yb = a(x), b(x)
        assert _rel(yb, ya) < tol
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert _rel(pb.original.grad, pa.original.grad) < tol
        assert _rel(pb[0]._u, pa[0]._u) < tol and _rel(pb[0]._v, pa[0]._v) < tol
        oa.step(), ob.step(), oa.zero_grad(), ob.zero_grad()
    a.eval(), b.eval()
    u0 = pb[0]._u.clone()
    ya, yb = a(x), b(x)
    assert _rel(yb, ya) < tol
    ya.sum().backward()
    yb.sum().backward()
    assert _rel(pb.original.grad, pa.original.grad) < tol
    assert torch.equal(pb[0]._u, u0)  # eval mode: no power iteration


def test_state_dict_interchange():
    make, xshape = MODULES["conv2d"]
    a, b = _pair(make, seed=3)
    assert list(a.state_dict()) == list(b.state_dict())
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    x = torch.randn(xshape)
    # torch -> ours (after some torch training steps so the states differ from ours)
    a(x), a(x)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    assert _rel(b(x), a(x)) < 2e-5
    a.train(), b.train()
    assert _rel(b(x), a(x)) < 2e-5       # and the next training step continues identically
    # ours -> torch
    torch.manual_seed(9)
    c = torch_sn(make())
    b(x)
    c.load_state_dict(b.state_dict(), strict=True)
    c.eval(), b.eval()
    assert _rel(c(x), b(x)) < 2e-5


def test_loaded_state_with_arbitrary_u():
    """A loaded u need not equal normalize(W v): training mode overwrites u first (as torch does),
    eval mode uses the stored pair as it is (as torch does)."""
    make, xshape = MODULES["linear"]
    a, b = _pair(make)
    g = torch.Generator().manual_seed(5)
    sd = a.state_dict()
    sd["parametrizations.weight.0._u"] = torch.randn(sd["parametrizations.weight.0._u"].shape, generator=g)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    x = torch.randn(xshape)
    a.eval(), b.eval()
    assert _rel(b(x), a(x)) < 2e-5
    a.train(), b.train()
    for _ in range(2):
        assert _rel(b(x), a(x)) < 2e-5


def test_errors_match_torch():
    for n in (0, -1):
        with pytest.raises(ValueError) as et:
            torch_sn(nn.Linear(3, 4), n_power_iterations=n)
        with pytest.raises(ValueError) as es:
            snn.spectral_norm(nn.Linear(3, 4), n_power_iterations=n)
        assert str(es.value) == str(et.value)
    with pytest.raises(IndexError) as et:
        torch_sn(nn.Linear(3, 4), dim=2)
    with pytest.raises(IndexError) as es:
        snn.spectral_norm(nn.Linear(3, 4), dim=2)
    assert str(es.value) == str(et.value)
    with pytest.raises(ValueError) as et:
        torch_sn(nn.Linear(3, 4), name="nope")
    with pytest.raises(ValueError) as es:
        snn.spectral_norm(nn.Linear(3, 4), name="nope")
    assert str(es.value) == str(et.value)


def test_batch_dims_errors():
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="batch_dims must be an integer >= 0; got -1"):
        snn.spectral_norm(m, batch_dims=-1)
    with pytest.raises(ValueError,
                       match=r"batch_dims must be smaller than .* \(3, shape \(3, 4, 5\)\); got batch_dims=3"):
        snn.spectral_norm(m, batch_dims=3)
    with pytest.raises(ValueError, match="dim must index a matrix dimension"):
        snn.spectral_norm(m, batch_dims=1, dim=0)
    m.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="must have dtype float16, bfloat16, float32 or float64; got torch.int32"):
        snn.spectral_norm(m)


def test_right_inverse_and_vector_weight():
    a, b = _pair(lambda: nn.Linear(5, 4))
    new = torch.randn(4, 5)
    a.weight, b.weight = new, new
    assert torch.equal(b.parametrizations.weight.original, new)
    assert torch.equal(a.parametrizations.weight.original, b.parametrizations.weight.original)

    def vec():
        m = nn.Module()
        m.weight = nn.Parameter(torch.randn(7))
        return m

    a, b = _pair(vec)
    assert torch.allclose(b.weight, a.weight) and torch.allclose(b.weight.norm(), torch.tensor(1.0))
    assert not hasattr(b.parametrizations.weight[0], "_u")


def test_remove_parametrizations():
    a, b = _pair(lambda: nn.Linear(6, 5))
    parametrize.remove_parametrizations(a, "weight")
    parametrize.remove_parametrizations(b, "weight")
    assert _rel(b.weight, a.weight) < 2e-5
    assert type(b.weight) is nn.Parameter


def test_double_backward_matches_torch():
    """Gradient penalty (WGAN-GP style) through a spectrally normalised layer: create_graph=True."""
    for dtype in (torch.float32, torch.float64):
        a, b = _pair(lambda: nn.Linear(6, 8).to(dtype))
        x = torch.randn(5, 6, dtype=dtype)
        grads = []
        for m in (a, b):
            xi = x.clone().requires_grad_(True)
            out = torch.tanh(m(xi)).sum()
            (gx,) = torch.autograd.grad(out, xi, create_graph=True)
            gx.square().sum().backward()
            grads.append(m.parametrizations.weight.original.grad.clone())
        assert _rel(grads[1], grads[0]) < RTOL[dtype] * 5


def test_forward_ad_matches_torch():
    a, b = _pair(lambda: nn.Linear(6, 8))
    a.eval(), b.eval()
    W = a.parametrizations.weight.original.detach()
    dW = torch.randn_like(W)
    ta = torch.func.jvp(a.parametrizations.weight[0], (W,), (dW,))[1]
    tb = torch.func.jvp(b.parametrizations.weight[0], (W,), (dW,))[1]
    assert _rel(tb, ta) < 2e-5


class _Experts(nn.Module):
    def __init__(self, E, m, n, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, m, n, dtype=dtype) / n ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_expert_stack_equals_looped(dtype):
    """batch_dims=1: one σ per expert, each expert exactly torch's single-matrix iteration."""
    E, m, n = 4, 12, 9
    torch.manual_seed(0)
    st = snn.spectral_norm(_Experts(E, m, n, dtype), batch_dims=1)
    P = st.parametrizations.weight
    assert P[0]._u.shape == (E, m) and P[0]._v.shape == (E, n)
    W0 = P.original.detach().clone()
    singles = []
    for e in range(E):
        lin = nn.Linear(n, m, bias=False).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(W0[e])
        lin = torch_sn(lin)
        with torch.no_grad():
            lin.parametrizations.weight[0]._u.copy_(P[0]._u[e])
            lin.parametrizations.weight[0]._v.copy_(P[0]._v[e])
        singles.append(lin)
    for _ in range(3):
        Ws = st.weight
        ref = torch.stack([s.weight for s in singles])
        assert _rel(Ws, ref) < RTOL[dtype]
        G = torch.randn(E, m, n, dtype=dtype)
        (Ws * G).sum().backward()
        (ref * G).sum().backward()
        gref = torch.stack([s.parametrizations.weight.original.grad for s in singles])
        assert _rel(P.original.grad, gref) < RTOL[dtype]
    # per-expert σ converges: every expert normalised to spectral norm ~1 (planted spectra,
    # σ₂/σ₁ = 0.5, distinct σ₁ per expert)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for e in range(E):
            U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
            V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
            s = torch.linspace(1.0, 0.1, n, dtype=torch.float64) * (e + 1)
            s[0] = 2 * s[1]
            P.original[e] = (U * s) @ V.T
    for _ in range(30):
        st.weight
    st.eval()
    norms = torch.linalg.matrix_norm(st.weight.detach().double(), 2)
    assert torch.allclose(norms, torch.ones(E, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 40), (1500, 1500), (3, 64, 80), (2, 1200, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, shape):
    """Vectors in float32, products accumulated in float32: σ from the stored vectors agrees with a
    float64 evaluation of the same step to ~1e-6, where torch's bf16 arithmetic is off by ~1e-3.
    Large shapes take the block-widening path (W never widened whole)."""
    bd = len(shape) - 2
    torch.manual_seed(0)
    mod = _Experts(1, 1, 1)
    mod.weight = nn.Parameter((torch.randn(shape) / shape[-1] ** 0.5).to(dtype))
    snn.spectral_norm(mod, batch_dims=bd)
    P = mod.parametrizations.weight
    assert P[0]._u.dtype == torch.float32 and P[0]._v.dtype == torch.float32
    v0 = P[0]._v.clone()
    out = mod.weight                                    # one training step from v0
    assert out.dtype == dtype
    W = P.original.detach().double()
    # float64 reference of torch's step from the same v: u = N(W v), v' = N(Wᵀu), σ = uᵀ W v'
    y = (W @ v0.double().unsqueeze(-1)).squeeze(-1)
    u = y / y.norm(dim=-1, keepdim=True)
    wt = (W.mT @ u.unsqueeze(-1)).squeeze(-1)
    v1 = wt / wt.norm(dim=-1, keepdim=True)
    sig = (u.unsqueeze(-1) * W * v1.unsqueeze(-2)).sum((-2, -1))
    assert _rel(P[0]._u, u) < 1e-5 and _rel(P[0]._v, v1) < 1e-5
    ref = W / sig.reshape(*sig.shape, 1, 1)
    # the output is the correctly rounded W/σ: within half an ulp of dtype (plus σ's tiny error)
    fi = torch.finfo(dtype)
    allowed = (0.51 * fi.eps + 1e-5) * ref.abs() + fi.tiny * fi.eps      # + subnormal spacing
    assert bool(((out.detach().double() - ref).abs() <= allowed).all())
    out.float().sum().backward()
    assert P.original.grad.dtype == dtype and torch.isfinite(P.original.grad.float()).all()


def test_module_cast_after_registration():
    """Module.to(bfloat16) casts the buffers too (as with torch's version); forward still works and
    keeps the vectors' precision internally."""
    torch.manual_seed(0)
    m = snn.spectral_norm(nn.Linear(30, 20)).to(torch.bfloat16)
    x = torch.randn(4, 30, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    sig = torch.linalg.matrix_norm(m.weight.detach().double(), 2)
    assert abs(float(sig) - 1) < 0.05


def test_large_matrix_gram_path():
    """1024x1024 fp32 with 2 power iterations: the fused Gram steps (≥ 2^20 elements) agree with
    torch's two-product steps."""
    a, b = _pair(lambda: nn.Linear(1024, 1024, bias=False), n_power_iterations=2)
    pa, pb = a.parametrizations.weight, b.parametrizations.weight
    assert _rel(pb[0]._v, pa[0]._v) < 1e-4  # 15 + 2 steps; the bulk of a random matrix converges slowly
    for _ in range(2):
        assert _rel(b.weight, a.weight) < 1e-5


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_per_sample_grads_under_vmap(mode):
    """vmap(grad(...)) over functional_call (per-sample gradients, as Opacus-style code does) works
    and equals torch's; and the layer can sit inside torch.func.jvp of the model."""
    from torch.func import functional_call, grad, vmap

    res = []
    for mk in (torch_sn, snn.spectral_norm):
        torch.manual_seed(0)
        m = nn.Sequential(mk(nn.Linear(20, 30)), nn.Tanh(), mk(nn.Linear(30, 10)))
        getattr(m, mode)()
        xs = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
        params = dict(m.named_parameters())

        def loss(pr, xi):
            return functional_call(m, pr, (xi[None],)).square().sum()

        g = vmap(grad(loss), in_dims=(None, 0))(params, xs)
        with torch.no_grad():
            _, t = torch.func.jvp(m, (xs,), (torch.ones_like(xs),))
        res.append((g["0.parametrizations.weight.original"], t))
    assert _rel(res[1][0], res[0][0]) < 2e-5
    assert _rel(res[1][1], res[0][1]) < 2e-5


def test_bf16_more_accurate_than_torch():
    """From the same start draws, 17 iterations on a bf16 weight (15 at construction, one in the
    forward that register_parametrization runs, one more here): our float32 vectors stay within ~1e-6
    of a float64 run of the same iteration; torch's bf16 vectors drift by ~1e-2."""
    def make():
        return nn.Linear(96, 64, bias=False).to(torch.bfloat16)

    a, b = _pair(make)
    a.weight, b.weight  # one training step each
    torch.manual_seed(0)
    lin = make()
    W = lin.weight.detach().double()
    u = lin.weight.new_empty(64).normal_(0, 1)  # the same draws as both modules
    v = lin.weight.new_empty(96).normal_(0, 1).double()
    v = v / v.norm()
    for _ in range(17):
        u = W @ v
        u = u / u.norm()
        v = W.T @ u
        v = v / v.norm()
    err_ours = _rel(b.parametrizations.weight[0]._v, v)
    err_torch = _rel(a.parametrizations.weight[0]._v, v)
    assert err_ours < 1e-5 and err_ours * 50 < err_torch


def test_without_native_kernels(monkeypatch):
    """The path taken on devices without specfast kernels (e.g. CUDA): torch products only, the
    same values."""
    import specfast.nn.parametrizations as P

    monkeypatch.setattr(P, "has_native_cpu", lambda: False)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = _pair(lambda: nn.Linear(1200, 900, bias=False).to(dtype), n_power_iterations=2)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        for _ in range(2):
            assert _rel(b.weight, a.weight) < tol
