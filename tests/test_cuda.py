"""CUDA: the same results as the CPU for the same seeds, the current (non-default) stream, CUDA-graph
capture. Marked ``cuda``: skipped without a GPU; with SPECFAST_STRICT=1, a GPU and no CUDA kernels
they fail (conftest.require_device)."""
from __future__ import annotations

import pytest
import torch

import specfast
from specfast import ops
from conftest import TOLERANCES, case_id, geometric_spectrum, known_spectrum, rel_err, rounded_truth

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape", [(257, 129), (6, 41, 401), (1, 1), (1, 300)], ids=lambda s: case_id(shape=s))
def test_cuda_matches_truth_and_cpu(shape, dtype):
    *batch, m, n = shape
    W, _ = known_spectrum(m, n, geometric_spectrum(min(m, n), 2.0, 0.9), dtype, batch=tuple(batch), seed=1)
    truth = rounded_truth(W)
    Wc = W.cuda()
    sig_gpu, info = specfast.spectral_norm(Wc, return_info=True)
    assert sig_gpu.device.type == "cuda"
    assert rel_err(sig_gpu.cpu(), truth[..., 0]) <= TOLERANCES["sigma1_fp32"]
    sig_cpu = specfast.spectral_norm(W)
    # same start vectors on both backends (counter-based RNG seeded from Python)
    assert rel_err(sig_gpu.cpu(), sig_cpu) <= TOLERANCES["batched_vs_looped"]
    k = min(3, m, n)
    assert rel_err(specfast.svdvals(Wc, k).cpu(), truth[..., :k]) <= TOLERANCES["topk_fp32"]


def test_cuda_gram_matvec():
    W = torch.randn(4, 300, 200).cuda()
    v = torch.randn(4, 200, 3, dtype=torch.float64).cuda()
    Y = specfast.gram_matvec(W, v)
    Wd = W.double()
    T = Wd.mT @ (Wd @ v)
    assert float((Y - T).norm() / T.norm()) <= 1e-6  # fp32 accumulation on the GPU at worst


def test_cuda_non_default_stream():
    W = torch.randn(8, 256, 128, device="cuda")
    ref = specfast.spectral_norm(W)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = specfast.spectral_norm(W)
        v = torch.randn(8, 128, 2, device="cuda", dtype=torch.float64)
        Y = specfast.gram_matvec(W, v)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), ref.cpu()) <= TOLERANCES["batched_vs_looped"]
    Wd = W.double()
    assert float((Y - Wd.mT @ (Wd @ v)).norm() / Y.norm()) <= 1e-6


def test_cuda_graph_capture_gram():
    W = torch.randn(512, 256, device="cuda")
    X = torch.randn(256, 2, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.gram_matvec_op(W, X)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        Y = ops.gram_matvec_op(W, X)
    X.copy_(torch.randn(256, 2, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    Wd = W.double()
    T = Wd.mT @ (Wd @ X.double())
    assert float((Y.double() - T).norm() / T.norm()) <= 1e-6


def test_cuda_nonfinite_names_matrix():
    W = torch.randn(3, 20, 10, device="cuda")
    W[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"W\[1\]"):
        specfast.spectral_norm(W)


def test_cuda_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"device"):
        specfast.spectral_norm([torch.randn(3, 3), torch.randn(3, 3, device="cuda")])
    with pytest.raises(ValueError, match=r"gram_matvec.*\bv\b"):
        specfast.gram_matvec(torch.randn(3, 3, device="cuda"), torch.randn(3))
