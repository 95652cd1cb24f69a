"""specfast.nn regularisers against exact values on small models (docs/regularizers.md §2–§5).

Truth: ``torch.linalg.matrix_norm(ord=2)`` / ``svdvals`` in float64 for the weight penalties, and the
full per-sample Jacobian (``vmap(jacrev)``) for the Jacobian penalties; matrices with planted
spectra where a gap matters.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import specfast.nn as snn


def _planted(m, n, s, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    s = torch.as_tensor(s, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype), U[:, 0], V[:, 0]


def _exact_sq(W):
    return torch.linalg.matrix_norm(W.detach().double(), 2).square()


def _mlp(dtype=torch.float32, seed=0, dims=(20, 32, 16, 5)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


# ------------------------------------------------------------------------------ WeightSpectralPenalty
@pytest.mark.parametrize("block_size,tol", [(4, 1e-3), (1, 5e-2)], ids=["block=4", "block=1"])
def test_weight_penalty_tracks_exact_during_training(block_size, tol):
    """Warm-started: one Gram product per matrix and call; the value follows Σσ₁² while the penalty
    itself pushes the top singular values together (the hard case for one vector)."""
    m = _mlp()
    pen = snn.WeightSpectralPenalty(m, block_size=block_size)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    worst = 0.0
    for step in range(40):
        val = pen()
        exact = float(sum(_exact_sq(p) for _, p in m.named_parameters() if p.ndim == 2))
        got = float(val.detach())
        assert got <= exact * (1 + 1e-5)                       # a Rayleigh quotient: never above
        worst = max(worst, (exact - got) / exact)
        if step == 0:
            assert worst < 1e-5                                # first value from a converged SVD
        loss = nn.functional.cross_entropy(m(x), y) + 0.01 * val
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert worst < tol


def test_weight_penalty_gradient_known_gap():
    W0, u1, v1 = _planted(40, 30, [3.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float32)
    W = nn.Parameter(W0.clone())
    pen = snn.WeightSpectralPenalty([W])
    val = pen()
    assert abs(float(val) - 9.0) < 1e-5
    val.backward()
    expect = 2 * 3.0 * torch.outer(u1, v1)
    expect = expect * torch.sign((W.grad.double() * expect).sum())   # singular vectors' sign
    assert float((W.grad.double() - expect).norm() / expect.norm()) < 1e-5
    s = pen.sigmas()
    assert list(s) == ["0"] and abs(float(s["0"]) - 3.0) < 1e-5


def test_minimising_weight_penalty_reduces_sigma():
    W = nn.Parameter(_planted(30, 20, [2.0, 1.8, 1.0, 0.5], seed=3, dtype=torch.float32)[0].clone())
    pen = snn.WeightSpectralPenalty([W])
    opt = torch.optim.SGD([W], lr=0.05)
    sig = [float(torch.linalg.matrix_norm(W.detach(), 2))]
    for _ in range(30):
        opt.zero_grad()
        pen().backward()
        opt.step()
        sig.append(float(torch.linalg.matrix_norm(W.detach(), 2)))
    assert sig[-1] < 0.8 * sig[0]
    assert all(b <= a + 1e-6 for a, b in zip(sig, sig[1:]))


class _MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(3, 12, 10))
        self.norm = nn.LayerNorm(10)


def test_weight_penalty_shapes_conv_convT_stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
    model.moe = _MoE()
    pen = snn.WeightSpectralPenalty(model)
    assert pen.names == ["0.weight", "1.weight", "3.weight", "moe.experts"]
    val = pen()
    conv, convT, lin, ex = model[0].weight, model[1].weight, model[3].weight, model.moe.experts
    sig = {"0.weight": torch.linalg.matrix_norm(conv.detach().double().flatten(1), 2),
           "1.weight": torch.linalg.matrix_norm(convT.detach().double().transpose(0, 1).flatten(1), 2),
           "3.weight": torch.linalg.matrix_norm(lin.detach().double(), 2),
           "moe.experts": torch.linalg.matrix_norm(ex.detach().double(), 2)}
    exact = sum(float(s.square().sum()) for s in sig.values())
    assert abs(float(val) - exact) / exact < 1e-5
    got = pen.sigmas()
    assert got["moe.experts"].shape == (3,)
    for k in sig:
        assert torch.allclose(got[k].double(), sig[k], rtol=1e-5)
    val.backward()
    assert all(p.grad is not None for p in (conv, convT, lin, ex))
    # a parametrized (spectrally normalised) layer is seen through its parametrization
    sn = snn.spectral_norm(nn.Conv2d(2, 3, 3))
    p2 = snn.WeightSpectralPenalty(sn)
    assert p2.names == ["parametrizations.weight.original"]
    ref = torch.linalg.matrix_norm(sn.parametrizations.weight.original.detach().double().flatten(1), 2) ** 2
    assert abs(float(p2()) - float(ref)) / float(ref) < 1e-5


def test_weight_penalty_include_and_errors():
    m = _mlp()
    assert snn.WeightSpectralPenalty(m, include=lambda n, p: n.startswith("2")).names == ["2.weight"]
    assert snn.WeightSpectralPenalty(m, include=["4.weight"]).names == ["4.weight"]
    assert snn.WeightSpectralPenalty(m, include=[m[0].weight]).names == ["0.weight"]
    assert snn.WeightSpectralPenalty([("a", m[0].weight), ("b", m[0].bias)]).names == ["a"]
    assert snn.WeightSpectralPenalty({"w": m[2].weight}).names == ["w"]
    with pytest.raises(ValueError, match=r"WeightSpectralPenalty: include names \['nope'\], which are not parameters"):
        snn.WeightSpectralPenalty(m, include=["nope"])
    with pytest.raises(ValueError,
                       match=r"include names '0.bias' with shape \(32,\); every selected parameter must have "
                             r"at least 2"):
        snn.WeightSpectralPenalty(m, include=["0.bias"])
    with pytest.raises(ValueError, match="no weight matrices selected"):
        snn.WeightSpectralPenalty(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="got a single tensor"):
        snn.WeightSpectralPenalty(m[0].weight)
    with pytest.raises(TypeError, match=r"module_or_params\[0\] must be a tensor or a \(name, tensor\) pair; got int"):
        snn.WeightSpectralPenalty([3])
    with pytest.raises(TypeError, match="include must be None, a callable"):
        snn.WeightSpectralPenalty(m, include=3)
    with pytest.raises(ValueError, match="n_power_iterations must be an integer >= 1; got 0"):
        snn.WeightSpectralPenalty(m, n_power_iterations=0)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1; got 0"):
        snn.WeightSpectralPenalty(m, block_size=0)
    with pytest.raises(TypeError, match="must have dtype float16, bfloat16, float32 or float64; got torch.int64"):
        snn.WeightSpectralPenalty([torch.ones(3, 3, dtype=torch.long)])


def test_weight_penalty_shape_change_device_dtype():
    m = _mlp()
    pen = snn.WeightSpectralPenalty(m)
    pen()
    m[2] = nn.Linear(32, 16)            # same shape, new parameter object: looked up by name
    assert float(pen()) > 0
    m[2].weight = nn.Parameter(torch.randn(7, 32))
    with pytest.raises(ValueError,
                       match=r"parameter '2.weight' changed shape from \(16, 32\) to \(7, 32\).*\.reset\('2.weight'\)"):
        pen()
    pen.reset("2.weight")
    m[4] = nn.Linear(7, 5)
    with pytest.raises(ValueError, match=r"parameter '4.weight' changed shape from \(5, 16\) to \(5, 7\)"):
        pen()
    pen.reset()
    val = pen()
    exact = sum(_exact_sq(p) for _, p in m.named_parameters() if p.ndim == 2)
    assert abs(float(val) - float(exact)) / float(exact) < 1e-5
    with pytest.raises(ValueError, match="'x' is not one of the penalised parameters"):
        pen.reset("x")
    m.double()                          # the vectors follow the parameters' dtype
    val = pen()
    assert val.dtype == torch.float64
    assert abs(float(val) - float(exact)) / float(exact) < 1e-4
    del m[4]
    with pytest.raises(ValueError, match="parameter '4.weight' is no longer in the module"):
        pen()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_weight_penalty_low_precision(dtype):
    W0, _, _ = _planted(64, 48, [2.0, 1.0, 0.7, 0.3], seed=5)
    W = nn.Parameter(W0.to(dtype))
    st = nn.Parameter((torch.randn(2, 20, 30) / 6).to(dtype))
    pen = snn.WeightSpectralPenalty([W, st])
    val = pen()
    exact = _exact_sq(W) + _exact_sq(st).sum()
    assert val.dtype == torch.float32
    assert abs(float(val) - float(exact)) / float(exact) < 1e-5     # fp32 accumulation on the rounded W
    val.backward()
    assert W.grad.dtype == dtype and st.grad.dtype == dtype


# ------------------------------------------------------------------------------ Jacobian spectral
def _exact_jac(model, x):
    J = vmap(jacrev(model))(x)                        # [B, *out, *in]
    return J.reshape(x.shape[0], -1, x[0].numel())


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def test_jacobian_spectral_lower_bound_monotone_and_converges():
    model = _tiny_model()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = _exact_jac(model, x)
    exact = float(torch.linalg.matrix_norm(J, 2).square().mean())
    vals = [float(snn.jacobian_spectral_penalty(model, x, n_power_iterations=n,
                                                generator=torch.Generator().manual_seed(7)))
            for n in (1, 2, 3, 5, 8, 60)]
    assert all(v <= exact * (1 + 1e-12) for v in vals)
    assert all(b >= a * (1 - 1e-12) for a, b in zip(vals, vals[1:]))   # more steps -> closer
    assert (exact - vals[0]) / exact > 1e-4                              # one step is visibly short
    assert (exact - vals[-1]) / exact < 1e-10


def test_jacobian_spectral_gradient_matches_exact():
    model = _tiny_model(seed=2)
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    est = snn.jacobian_spectral_penalty(model, x, n_power_iterations=80, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())[:-1]          # the last bias does not enter the Jacobian
    g_est = torch.autograd.grad(est, params)
    exact = torch.linalg.matrix_norm(_exact_jac(model, x), 2).square().mean()
    g_ex = torch.autograd.grad(exact, params)
    assert abs(float(est) - float(exact)) / float(exact) < 1e-10
    for a, b in zip(g_est, g_ex):
        assert float((a - b).norm() / b.norm()) < 1e-6


def test_jacobian_spectral_conv_model_and_dropout_masks():
    """Image input, and a model with dropout in training mode: every product of one call sees the
    same masks (the estimate converges to σ₁ of that one Jacobian), and the RNG ends where one
    forward pass leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3)).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(11)
    est = snn.jacobian_spectral_penalty(model, x, n_power_iterations=60, generator=torch.Generator().manual_seed(0))
    after = torch.rand(3)
    torch.manual_seed(11)
    full = torch.autograd.functional.jacobian(model, x)            # one forward: the same masks
    after_ref = torch.rand(3)
    assert torch.equal(after, after_ref)
    J = torch.stack([full[i, :, i].reshape(3, -1) for i in range(3)])
    exact = float(torch.linalg.matrix_norm(J, 2).square().mean())
    assert abs(float(est) - exact) / exact < 1e-8


def test_jacobian_penalties_errors_and_warnings():
    model = _tiny_model()
    x = torch.randn(3, 5, dtype=torch.float64)
    for f in (snn.jacobian_spectral_penalty, snn.jacobian_frobenius_penalty):
        name = f.__name__
        with pytest.raises(TypeError, match=f"{name}: model must be callable"):
            f(3, x)
        with pytest.raises(TypeError, match=f"{name}: x must be a torch.Tensor; got list"):
            f(model, [1.0])
        with pytest.raises(TypeError, match=f"{name}: x must be a floating tensor"):
            f(model, torch.ones(3, 5, dtype=torch.long))
        with pytest.raises(ValueError, match=f"{name}: x must have a leading batch dimension of size >= 1"):
            f(model, torch.ones(0, 5, dtype=torch.float64))
        with pytest.raises(TypeError, match=f"{name}: model\\(x\\) must return a tensor; got tuple"):
            f(lambda t: (t,), x)
        with pytest.raises(ValueError,
                           match=f"{name}: model\\(x\\) must return a tensor with the batch dimension first"):
            f(lambda t: t.sum(0), x)
        with pytest.raises(TypeError, match=f"{name}: generator must be a torch.Generator or None; got int"):
            f(model, x, generator=0)
        bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
        with pytest.warns(RuntimeWarning, match="BatchNorm1d in training mode"):
            if f is snn.jacobian_spectral_penalty:   # its running-statistics update cannot run in jvp
                with pytest.raises(RuntimeError,
                                   match="jacobian_spectral_penalty: the model cannot run inside torch.func.jvp"):
                    f(bn, x)
            else:
                f(bn, x)
    with pytest.raises(ValueError, match="n_power_iterations must be an integer >= 1; got 0"):
        snn.jacobian_spectral_penalty(model, x, n_power_iterations=0)
    with pytest.raises(ValueError, match="num_projections must be an integer >= 1; got 0"):
        snn.jacobian_frobenius_penalty(model, x, num_projections=0)
    with pytest.raises(ValueError, match="distribution must be 'gaussian' or 'rademacher'; got 'x'"):
        snn.jacobian_frobenius_penalty(model, x, distribution="x")


def test_jacobian_penalty_through_spectral_norm_layers():
    """Models with specfast.nn.spectral_norm layers work inside the penalties' jvp/vjp products and
    give the same value and gradient as the same model with torch's layers."""
    vals = []
    for sn in (torch.nn.utils.parametrizations.spectral_norm, snn.spectral_norm):
        torch.manual_seed(0)
        m = nn.Sequential(sn(nn.Linear(8, 12)), nn.Tanh(), sn(nn.Linear(12, 3)))
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        v = snn.jacobian_spectral_penalty(m, x, generator=torch.Generator().manual_seed(2))
        v.backward()
        vals.append((float(v), m[0].parametrizations.weight.original.grad.clone()))
    assert abs(vals[0][0] - vals[1][0]) / vals[0][0] < 1e-5
    assert float((vals[0][1] - vals[1][1]).norm() / vals[0][1].norm()) < 1e-4


# ------------------------------------------------------------------------------ Jacobian Frobenius
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_jacobian_frobenius_unbiased(distribution):
    model = _tiny_model(seed=4)
    x = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    J = _exact_jac(model, x)
    exact = float(J.square().sum((1, 2)).mean())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        draws = torch.tensor([float(snn.jacobian_frobenius_penalty(model, x, generator=g, distribution=distribution))
                              for _ in range(400)], dtype=torch.float64)
    se = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * se
    assert se < 0.1 * exact                       # the test has power: the estimate is informative
    # num_projections averages independent probes: the spread shrinks like 1/sqrt(P)
    many = float(snn.jacobian_frobenius_penalty(model, x, num_projections=400, generator=g, distribution=distribution))
    assert abs(many - exact) < 4 * se


def test_jacobian_frobenius_gradient_for_fixed_probes():
    """With the probes fixed by the generator, value and gradient equal those of the explicit
    (1/P) Σ_p mean_i ‖J_iᵀ u_ip‖² built from the full Jacobian."""
    model = _tiny_model(seed=7)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    P = 3
    est = snn.jacobian_frobenius_penalty(model, x, num_projections=P, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    U = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(P)]
    J = _exact_jac(model, x)
    ref = sum((torch.einsum("bcd,bc->bd", J, u).square().sum(1).mean()) for u in U) / P
    assert abs(float(est) - float(ref)) < 1e-12 * float(ref)
    params = list(model.parameters())[:-1]
    for a, b in zip(torch.autograd.grad(est, params), torch.autograd.grad(ref, params)):
        assert float((a - b).norm()) <= 1e-10 * float(b.norm())


# ------------------------------------------------------------------------------ SpectralEntropyPenalty
def test_entropy_penalty_closed_forms():
    conc = snn.SpectralEntropyPenalty.concentration
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    assert abs(float(conc(3 * Q))) < 1e-12                                 # flat spectrum -> 0
    assert abs(float(conc(_planted(7, 4, [2.0] * 4)[0]))) < 1e-12          # flat, rectangular
    assert abs(float(conc(torch.outer(torch.randn(5), torch.randn(8)).double())) - 1) < 1e-12   # rank 1 -> 1
    W = _planted(6, 4, [1.0, 1.0, 0.0, 0.0])[0]                           # p = (½, ½, 0, 0): 1 − log2/log4
    assert abs(float(conc(W)) - 0.5) < 1e-12
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    p = s**2 / (s**2).sum()
    expect = 1 + float((p * p.log()).sum()) / math.log(3)
    assert abs(float(conc(_planted(5, 3, s.tolist())[0])) - expect) < 1e-12
    assert float(conc(torch.zeros(4, 3))) == 0.0                            # zero matrix: 0
    assert float(conc(torch.randn(1, 9))) == 0.0                            # r = 1: 0
    stack = torch.stack([3 * Q[:, :4], _planted(6, 4, [1.0, 1.0, 0.0, 0.0])[0]])
    assert torch.allclose(conc(stack), torch.tensor([0.0, 0.5], dtype=torch.float64), atol=1e-12)


def test_entropy_penalty_gradient_sanity():
    W = _planted(6, 5, [2.0, 1.3, 0.9, 0.5, 0.2], seed=1)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(snn.SpectralEntropyPenalty.concentration, (W,))
    for Wd in (torch.outer(torch.randn(5), torch.randn(4)).double(), torch.zeros(4, 3, dtype=torch.float64)):
        Wd.requires_grad_(True)
        snn.SpectralEntropyPenalty.concentration(Wd).backward()
        assert torch.isfinite(Wd.grad).all()
    # descending the penalty flattens the spectrum
    Wp = nn.Parameter(_planted(8, 6, [3.0, 1.0, 0.5, 0.3, 0.2, 0.1], seed=2, dtype=torch.float32)[0].clone())
    pen = snn.SpectralEntropyPenalty([Wp])
    opt = torch.optim.SGD([Wp], lr=0.5)
    vals = []
    for _ in range(20):
        v = pen()
        vals.append(float(v))
        opt.zero_grad()
        v.backward()
        opt.step()
    assert vals[-1] < 0.5 * vals[0]


def test_entropy_penalty_module_selection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
    model.moe = _MoE()
    pen = snn.SpectralEntropyPenalty(model)
    val = pen()
    conc = snn.SpectralEntropyPenalty.concentration
    parts = {"0.weight": conc(model[0].weight.detach().flatten(1)),
             "1.weight": conc(model[1].weight.detach().transpose(0, 1).flatten(1)),
             "3.weight": conc(model[3].weight.detach()),
             "moe.experts": conc(model.moe.experts.detach())}
    assert abs(float(val) - sum(float(t.sum()) for t in parts.values())) < 1e-5
    terms = pen.terms()
    assert list(terms) == list(parts) and terms["moe.experts"].shape == (3,)
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t in terms.values())
    val.backward()
    assert model.moe.experts.grad is not None


def test_weight_penalty_without_native_kernels(monkeypatch):
    """The path taken on devices without specfast kernels: batched torch products, same values."""
    import specfast.nn.regularizers as R

    monkeypatch.setattr(R, "has_native_cpu", lambda: False)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    model.moe = _MoE()
    pen = snn.WeightSpectralPenalty(model)
    exact = sum(float(_exact_sq(p).sum()) for _, p in model.named_parameters() if p.ndim >= 2)
    for _ in range(2):
        assert abs(float(pen().detach()) - exact) / exact < 1e-5


def test_weight_penalty_native_gram_path():
    """Matrices of ≥ 2^20 elements go through specfast's grouped native Gram kernel (smaller ones
    through two torch products): fp32 with a planted spectrum, and a bf16 expert stack."""
    W1 = nn.Parameter(_planted(1100, 1000, [4.0, 3.0, 2.0, 1.0, 0.5], seed=11, dtype=torch.float32)[0].clone())
    g = torch.Generator().manual_seed(12)
    W2 = nn.Parameter((torch.randn(2, 1024, 600, generator=g) / 30).to(torch.bfloat16))
    pen = snn.WeightSpectralPenalty([W1, W2])
    ex2 = _exact_sq(W2).sum()
    for _ in range(2):
        val = pen()
        exact = 16.0 + float(ex2)
        assert abs(float(val.detach()) - exact) / exact < 1e-5
    val.backward()
    s = pen.sigmas()
    assert abs(float(s["0"]) - 4.0) < 1e-5 and s["1"].shape == (2,)
