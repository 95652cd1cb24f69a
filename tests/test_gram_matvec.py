"""gram_matvec: Wᵀ(W v) for vectors, blocks, stacks, lists and strided views, against float64 truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import specfast
from conftest import TOLERANCES, case_id

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def truth(W, v):
    """float64 Wᵀ(W v) of W and v exactly as stored; v [..., n] or [..., n, c]."""
    Wd, vd = W.double(), v.double()
    vec = vd.ndim == Wd.ndim - 1
    X = vd.unsqueeze(-1) if vec else vd
    Y = Wd.mT @ (Wd @ X)
    return Y.squeeze(-1) if vec else Y


def check(Y, W, v, expected_dtype):
    """Norm-wise relative error per vector, scaled by ||W||_F² ||v|| (the natural size of the
    product's rounding), and exact output dtype handling: a float64 result must match to
    ~1e-12; a float32 result must be the float64 truth rounded once (half an ulp per entry)."""
    T = truth(W, v)
    assert Y.shape == T.shape, (Y.shape, T.shape)
    assert Y.dtype == expected_dtype, (Y.dtype, expected_dtype)
    Wd = W.double()
    scale = Wd.square().sum((-2, -1)) * v.double().norm() + 1e-300
    err = (Y.double() - T).abs()
    if err.numel() == 0:
        return
    if Y.dtype == torch.float64:
        rel = float(err.max() / scale.max())
        assert rel <= TOLERANCES["gram_fp64"], rel
    else:
        lim = torch.finfo(Y.dtype).eps / 2 * T.abs() + TOLERANCES["gram_fp64"] * scale.max()
        assert bool((err <= lim).all()), float((err - lim).max())


SHAPES = [(1, 1), (1, 7), (7, 1), (33, 17), (17, 33), (130, 257), (3, 41, 19), (2, 3, 9, 12), (0, 5, 4)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: case_id(shape=s))
def test_vectors_float64_accumulation(shape, dtype):
    W = torch.randn(shape, dtype=torch.float64).to(dtype)
    v = torch.randn(*shape[:-2], shape[-1], dtype=torch.float64)
    # float64 vectors -> float64 result, equal to the float64 product of the stored W
    check(specfast.gram_matvec(W, v), W, v, torch.float64)
    # float32 vectors -> float32 result: the float64 result rounded once
    v32 = v.float()
    exp = torch.float64 if dtype == torch.float64 else torch.float32
    check(specfast.gram_matvec(W, v32), W, v32, exp)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape,c", [((33, 17), 1), ((33, 17), 5), ((17, 200), 4), ((4, 29, 31), 3), ((2, 2, 8, 6), 2),
                                     ((5, 5), 0)], ids=lambda v: case_id(shape=v) if isinstance(v, tuple) else f"c={v}")
def test_blocks(shape, c, dtype):
    W = torch.randn(shape, dtype=torch.float64).to(dtype)
    V = torch.randn(*shape[:-2], shape[-1], c, dtype=torch.float64)
    check(specfast.gram_matvec(W, V), W, V, torch.float64)


def test_fp32_inputs_to_1e12():
    """The acceptance: fp32 W and fp64 vectors give the float64 product to ~1e-12 relative."""
    W = torch.randn(301, 203)
    v = torch.randn(203, dtype=torch.float64)
    Y = specfast.gram_matvec(W, v)
    T = truth(W, v)
    assert float((Y - T).norm() / T.norm()) <= TOLERANCES["gram_fp64"]


@pytest.mark.parametrize("view", ["transposed", "row-strided", "col-strided", "batch-strided", "offset-slice",
                                  "expanded-batch", "permuted-batch"], ids=lambda v: f"view={v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: case_id(dtype=d))
def test_strided(view, dtype):
    E = torch.randn(6, 40, 30, dtype=torch.float64).to(dtype)
    W = {
        "transposed": E.mT,
        "row-strided": E[:, ::3, :],
        "col-strided": E[:, :, ::2],
        "batch-strided": E[::2],
        "offset-slice": E[1:, 3:37, 2:29],
        "expanded-batch": E[0].expand(3, 40, 30),
        "permuted-batch": E.permute(1, 0, 2).contiguous().permute(1, 0, 2),
    }[view]
    v = torch.randn(*W.shape[:-2], W.shape[-1], 3, dtype=torch.float64)
    check(specfast.gram_matvec(W, v), W, v, torch.float64)


def test_strided_vector():
    W = torch.randn(30, 20, dtype=torch.float64)
    V = torch.randn(20, 6, dtype=torch.float64)
    v = V[:, 2]  # stride 6
    check(specfast.gram_matvec(W, v), W, v, torch.float64)
    check(specfast.gram_matvec(W, V[:, ::2]), W, V[:, ::2], torch.float64)


def test_broadcast_batch_of_vectors():
    W = torch.randn(4, 10, 7, dtype=torch.float64)
    v = torch.randn(1, 7, dtype=torch.float64)
    Y = specfast.gram_matvec(W, v)
    assert Y.shape == (4, 7)
    check(Y, W, v.expand(4, 7), torch.float64)


def test_list_of_vectors_and_blocks():
    Ws = [torch.randn(30, 20), torch.randn(5, 9, dtype=torch.float64), torch.randn(1, 4).bfloat16(),
          torch.randn(17, 1).half(), torch.randn(12, 12)]
    vs = [torch.randn(20, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64),
          torch.randn(4, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64), torch.randn(12, 2).double()]
    Ys = specfast.gram_matvec(Ws, vs)
    assert isinstance(Ys, list) and len(Ys) == len(Ws)
    for i, (Y, W, v) in enumerate(zip(Ys, Ws, vs)):
        check(Y, W, v, torch.float64)
        single = specfast.gram_matvec(W, v)
        assert torch.allclose(Y, single, rtol=1e-13, atol=0), f"W[{i}]"


def test_list_fp32_vectors_keep_fp32():
    Ws = [torch.randn(30, 20), torch.randn(5, 9)]
    vs = [torch.randn(20), torch.randn(9, 2)]
    Ys = specfast.gram_matvec(Ws, vs)
    for Y, W, v in zip(Ys, Ws, vs):
        check(Y, W, v, torch.float32)


def test_numpy():
    W = np.random.randn(12, 8)
    v = np.random.randn(8)
    Y = specfast.gram_matvec(W, v)
    assert isinstance(Y, np.ndarray)
    np.testing.assert_allclose(Y, W.T @ (W @ v), rtol=1e-12, atol=1e-12 * np.abs(W.T @ (W @ v)).max())


def test_zero_and_nan_propagation():
    W = torch.zeros(5, 4)
    assert torch.equal(specfast.gram_matvec(W, torch.ones(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))
    Wn = torch.randn(5, 4)
    Wn[2, 1] = float("nan")
    # gram_matvec is a plain linear map (like matmul): it may raise ValueError or propagate NaN,
    # but never return finite numbers for a non-finite W.
    try:
        Y = specfast.gram_matvec(Wn, torch.ones(4, dtype=torch.float64))
    except ValueError as e:
        assert "gram_matvec" in str(e)
    else:
        assert not torch.isfinite(Y).all()
