"""Slow / memory-hungry tests (``pytest -m slow``)."""
from __future__ import annotations


import pytest
import torch

import specfast
from conftest import TOLERANCES, rel_err

pytestmark = pytest.mark.slow


def _pow2_vectors(m, n):
    """a [m], b [n] with power-of-two entries, so every product a_i b_j is exact in bf16; the tail
    (beyond element 2**31 of a 46341×46341 matrix: the last row's last ~4600 columns) is distinctive,
    so reading it from the wrong offset changes the answer."""
    a = torch.ones(m, dtype=torch.float64)
    a[-1] = 64.0          # the last row carries 8% of ||W||_F²
    a[m // 2] = -2.0
    b = torch.ones(n, dtype=torch.float64)
    b[-5000:] = 4.0       # columns whose last-row elements lie beyond offset 2**31
    b[::7] = -0.5
    return a, b


def test_more_than_2_31_elements_bf16():
    m = n = 46341
    assert m * n > 2**31
    a, b = _pow2_vectors(m, n)
    W = a.to(torch.bfloat16)[:, None] * b.to(torch.bfloat16)[None, :]   # exact: rank one
    W = W.unsqueeze(0)
    assert W.numel() > 2**31 and W.dtype == torch.bfloat16
    sigma = float(a.norm() * b.norm())
    fro = float(a.square().sum() * b.square().sum())

    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.shape == (1,)
    assert rel_err(sig, torch.tensor([sigma], dtype=torch.float64)) <= TOLERANCES["sigma1_fp32"], (float(sig), sigma)
    assert bool(torch.as_tensor(info.converged).all())

    assert rel_err(specfast.frobenius_norm_sq(W), torch.tensor([fro], dtype=torch.float64)) <= 1e-12
    assert rel_err(specfast.stable_rank(W[0]), torch.tensor(1.0, dtype=torch.float64)) <= 3 * TOLERANCES["sigma1_fp32"]

    # Wᵀ(W v) = ||a||² b (bᵀ v), exactly known
    v = torch.randn(n, dtype=torch.float64)
    Y = specfast.gram_matvec(W[0], v)
    T = float(a.square().sum()) * b * float(b @ v)
    assert float((Y - T).norm() / T.norm()) <= TOLERANCES["gram_fp64"]

    # the transposed view (column-major) takes the other Gram side
    sig_t = specfast.spectral_norm(W[0].mT)
    assert rel_err(sig_t, torch.tensor(sigma, dtype=torch.float64)) <= TOLERANCES["sigma1_fp32"]


def test_many_experts_stack():
    """A realistic MoE-sized stack: 64 experts of 512×1408 in bf16."""
    g = torch.Generator().manual_seed(0)
    E = torch.randn(64, 512, 1408, generator=g, dtype=torch.float32).to(torch.bfloat16)
    sig = specfast.spectral_norm(E)
    ref = torch.linalg.matrix_norm(E.double(), ord=2)
    assert rel_err(sig, ref) <= TOLERANCES["sigma1_fp32"]
    vals = specfast.svdvals(E[::5], 8)
    ref8 = torch.linalg.svdvals(E[::5].double())[:, :8]
    assert rel_err(vals, ref8) <= TOLERANCES["topk_fp32"]


def test_inductor_compile_stack():
    torch._dynamo.reset()

    def f(W):
        return specfast.spectral_norm(W) + specfast.stable_rank(W)

    W = torch.randn(4, 64, 48)
    assert rel_err(torch.compile(f)(W), f(W)) <= TOLERANCES["compile"]
