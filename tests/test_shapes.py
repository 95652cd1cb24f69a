"""Stacks, 4-D batches, ragged lists, numpy, strided and transposed views: results are right for
each matrix (known spectra) and independent of how the matrices are packaged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import specfast
from conftest import TOLERANCES, case_id, geometric_spectrum, known_spectrum, rel_err, rounded_truth

SIGMA_TOL = TOLERANCES["sigma1_fp32"]


def _batch_spectra(batch, p, seed):
    """Different spectra per matrix: geometric with a random top value and ratio."""
    g = torch.Generator().manual_seed(seed)
    B = int(np.prod(batch)) if batch else 1
    top = 0.5 + 3 * torch.rand(B, generator=g, dtype=torch.float64)
    ratio = 0.75 + 0.2 * torch.rand(B, generator=g, dtype=torch.float64)
    s = top[:, None] * ratio[:, None] ** torch.arange(p, dtype=torch.float64)
    return s.reshape(*batch, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape", [(8, 64, 48), (5, 33, 70), (2, 3, 40, 30), (1, 1, 2, 17, 9)], ids=lambda s: case_id(shape=s))
def test_stacks_known_spectra(shape, dtype):
    *batch, m, n = shape
    s = _batch_spectra(tuple(batch), min(m, n), seed=len(shape) * 100 + m)
    W, s_true = known_spectrum(m, n, s, dtype, batch=tuple(batch), seed=m + n)
    truth = rounded_truth(W)
    ref = s_true if dtype != torch.bfloat16 else truth
    sig = specfast.spectral_norm(W)
    assert sig.shape == tuple(batch)
    assert rel_err(sig, ref[..., 0]) <= SIGMA_TOL
    vals = specfast.svdvals(W, 3)
    assert vals.shape == (*batch, 3)
    assert rel_err(vals, ref[..., :3]) <= TOLERANCES["topk_fp32"]
    fro = specfast.frobenius_norm_sq(W)
    assert fro.shape == tuple(batch) and fro.dtype == torch.float64
    assert rel_err(fro, truth.square().sum(-1)) <= 1e-12
    sr = specfast.stable_rank(W)
    assert rel_err(sr, truth.square().sum(-1) / truth[..., 0] ** 2) <= 2 * SIGMA_TOL + 1e-6


def _looped(fn, W, **kw):
    flat = W.reshape(-1, *W.shape[-2:])
    outs = [fn(flat[i], **kw) for i in range(flat.shape[0])]
    return torch.stack([torch.as_tensor(o) for o in outs]).reshape(*W.shape[:-2], *outs[0].shape)


@pytest.mark.parametrize("fn,kw,tol", [
    (specfast.spectral_norm, {}, "batched_vs_looped"),
    (specfast.svdvals, {"k": 4}, "batched_vs_looped"),
    (specfast.svdvals, {"k": None}, "exact_metric"),
    (specfast.stable_rank, {}, "batched_vs_looped"),
    (specfast.frobenius_norm_sq, {}, "exact_metric"),
    (specfast.spectral_entropy, {}, "exact_metric"),
    (specfast.effective_rank, {}, "exact_metric"),
    (specfast.condition_number, {}, "exact_metric"),
    (specfast.condition_number, {"method": "krylov"}, "cond_krylov"),
], ids=lambda v: getattr(v, "__name__", None) or (str(v) if isinstance(v, dict) else None))
def test_batched_equals_looped(fn, kw, tol):
    s = _batch_spectra((2, 3), 30, seed=7) + 0.05  # well conditioned for the condition number
    W, _ = known_spectrum(45, 30, s, torch.float32, batch=(2, 3), seed=8)
    batched = fn(W, **kw)
    looped = _looped(fn, W, **kw)
    assert batched.shape == looped.shape
    assert rel_err(batched, looped) <= TOLERANCES[tol]


RAGGED = [((30, 20), torch.float32), ((7, 50), torch.bfloat16), ((64, 64), torch.float64), ((1, 5), torch.float16),
          ((40, 1), torch.float32), ((13, 11), torch.bfloat16), ((3, 3), torch.float64)]


def _ragged(seed=0):
    mats, truths = [], []
    for i, ((m, n), dt) in enumerate(RAGGED):
        W, _ = known_spectrum(m, n, geometric_spectrum(min(m, n), 1 + i, 0.8), dt, seed=seed + i)
        mats.append(W)
        truths.append(rounded_truth(W))
    return mats, truths


def test_ragged_list_spectral_norm():
    mats, truths = _ragged()
    sig, info = specfast.spectral_norm(mats, return_info=True)
    assert sig.shape == (len(mats),)
    assert rel_err(sig, torch.stack([t[0] for t in truths])) <= SIGMA_TOL
    single = torch.stack([torch.as_tensor(specfast.spectral_norm(w), dtype=torch.float64) for w in mats])
    assert rel_err(sig, single) <= TOLERANCES["batched_vs_looped"]
    assert torch.as_tensor(info.converged).shape == (len(mats),)


@pytest.mark.parametrize("k", [1, 3, None], ids=lambda k: f"k={k}")
def test_ragged_list_svdvals(k):
    mats, truths = _ragged(seed=10)
    vals = specfast.svdvals(mats, k)
    assert isinstance(vals, list) and len(vals) == len(mats)
    for i, (v, w, t) in enumerate(zip(vals, mats, truths)):
        kk = min(w.shape) if k is None else min(k, *w.shape)
        assert v.shape == (kk,), f"W[{i}]"
        assert rel_err(v, t[:kk], scale=t[0]) <= TOLERANCES["topk_fp32"], f"W[{i}]"
        single = specfast.svdvals(w, None if k is None else kk)
        assert rel_err(v, single, scale=t[0]) <= TOLERANCES["batched_vs_looped"], f"W[{i}]"


@pytest.mark.parametrize("fn", [specfast.stable_rank, specfast.frobenius_norm_sq, specfast.spectral_entropy,
                                specfast.effective_rank, specfast.condition_number],
                         ids=lambda f: f.__name__)
def test_ragged_list_metrics_equal_per_matrix(fn):
    mats, _ = _ragged(seed=20)
    out = fn(mats)
    out = torch.stack(list(out)) if isinstance(out, list) else torch.as_tensor(out)
    single = torch.stack([torch.as_tensor(fn(w), dtype=torch.float64) for w in mats])
    assert out.shape == (len(mats),)
    assert rel_err(out, single) <= TOLERANCES["batched_vs_looped"]


def test_list_with_empty_matrices_and_empty_list():
    W = torch.randn(6, 4)
    sig = specfast.spectral_norm([torch.zeros(0, 4), W, torch.zeros(3, 0)])
    assert sig.shape == (3,)
    assert sig[0] == 0 and sig[2] == 0
    assert rel_err(sig[1], rounded_truth(W)[0]) <= SIGMA_TOL
    assert specfast.spectral_norm([]).shape == (0,)
    assert specfast.svdvals([], 2) == []


def test_numpy_in_numpy_out():
    W, s = known_spectrum(40, 30, geometric_spectrum(30, 2.0, 0.8), torch.float64, batch=(3,), seed=4)
    A = W.numpy()
    sig = specfast.spectral_norm(A)
    assert isinstance(sig, np.ndarray) and sig.shape == (3,)
    np.testing.assert_allclose(sig, s[:, 0].numpy(), rtol=SIGMA_TOL)
    vals = specfast.svdvals(A.astype(np.float32), 2)
    assert isinstance(vals, np.ndarray) and vals.dtype == np.float32 and vals.shape == (3, 2)
    np.testing.assert_allclose(vals, s[:, :2].numpy(), rtol=TOLERANCES["topk_fp32"])
    lst = specfast.spectral_norm([A[0], A[1].astype(np.float16)])
    assert isinstance(lst, np.ndarray) and lst.shape == (2,)


# ------------------------------------------------------------------------------------ strides
def _expert_stack(dtype, E=12, m=48, n=36, seed=5):
    s = _batch_spectra((E,), min(m, n), seed)
    return known_spectrum(m, n, s, dtype, batch=(E,), seed=seed)[0]


VIEWS = {
    "transposed": lambda E: E.mT,                                   # column-major matrices
    "every-2nd-expert": lambda E: E[::2],                           # batch stride doubled
    "every-3rd-row": lambda E: E[:, ::3, :],                        # row stride 3n
    "every-2nd-col": lambda E: E[:, :, ::2],                        # column-strided: needs a copy
    "row-col-slice": lambda E: E[1:, 5:40, 3:30],                   # storage offset, row stride > cols
    "transposed-slice": lambda E: E[::3, 2:, 1:].mT,                # strided and transposed
    "batch-last": lambda E: E.permute(1, 0, 2).contiguous().permute(1, 0, 2),  # batch stride n < row stride
    "expanded": lambda E: E[0].expand(4, *E.shape[1:]),             # batch stride 0
    "4d-view": lambda E: E.reshape(3, 4, *E.shape[1:])[:, 1:],      # 4-D, non-contiguous batch
    "single-transposed": lambda E: E[0].mT,
    "single-col-strided": lambda E: E[0][:, ::3],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("view", list(VIEWS), ids=lambda v: f"view={v}")
def test_strided_views(view, dtype):
    E = _expert_stack(dtype)
    W = VIEWS[view](E)
    truth = rounded_truth(W)   # the spectrum of exactly the elements the view selects
    sig = specfast.spectral_norm(W)
    assert sig.shape == W.shape[:-2]
    assert rel_err(sig, truth[..., 0]) <= SIGMA_TOL, view
    vals = specfast.svdvals(W, 3)
    assert rel_err(vals, truth[..., :3]) <= TOLERANCES["topk_fp32"], view
    fro = specfast.frobenius_norm_sq(W)
    assert rel_err(fro, W.double().square().sum((-2, -1))) <= 1e-12, view
    sr = specfast.stable_rank(W)
    assert rel_err(sr, truth.square().sum(-1) / truth[..., 0] ** 2) <= 3e-6, view
    # the input is never modified
    assert torch.equal(E, _expert_stack(dtype))


def test_transposed_equals_contiguous_transpose():
    E = _expert_stack(torch.float32)
    a = specfast.svdvals(E.mT, 4)
    b = specfast.svdvals(E.mT.contiguous(), 4)
    c = specfast.svdvals(E, 4)
    assert rel_err(a, b) <= TOLERANCES["batched_vs_looped"]
    assert rel_err(a, c) <= TOLERANCES["batched_vs_looped"]
