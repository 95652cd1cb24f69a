"""Bad input: TypeError for types/dtypes, ValueError for shapes and values, with messages that name
the function, the argument (and for non-finite values the offending matrix)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import specfast

# (name, callable taking W, name of the matrix argument)
ENTRY_POINTS = {
    "spectral_norm": (lambda W, **kw: specfast.spectral_norm(W, **kw), "W"),
    "svdvals": (lambda W, **kw: specfast.svdvals(W, 2, **kw), "W"),
    "svdvals_exact": (lambda W, **kw: specfast.svdvals(W, **kw), "W"),
    "stable_rank": (lambda W, **kw: specfast.stable_rank(W, **kw), "W"),
    "spectral_entropy": (lambda W, **kw: specfast.spectral_entropy(W, **kw), "W"),
    "effective_rank": (lambda W, **kw: specfast.effective_rank(W, **kw), "W"),
    "condition_number": (lambda W, **kw: specfast.condition_number(W, **kw), "W"),
    "frobenius_norm_sq": (lambda W, **kw: specfast.frobenius_norm_sq(W, **kw), "W"),
    "svd_lowrank": (lambda W, **kw: specfast.svd_lowrank(W, 2, **kw), "A"),
}
LIST_OK = [n for n in ENTRY_POINTS if n != "svd_lowrank"]


def fn_name(entry: str) -> str:
    return "svdvals" if entry.startswith("svdvals") else entry


def _stack():
    return torch.randn(4, 6, 5)


# ------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_nonfinite_single_matrix(entry, bad):
    f, arg = ENTRY_POINTS[entry]
    W = torch.randn(6, 5)
    W[3, 2] = bad
    with pytest.raises(ValueError) as ei:
        f(W)
    msg = str(ei.value)
    assert msg.startswith(fn_name(entry) + ":"), msg
    assert re.search(rf"\b{arg}\b", msg), msg
    assert re.search(r"NaN|Inf|non-?finite", msg), msg


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_nonfinite_names_index_in_stack(entry):
    f, arg = ENTRY_POINTS[entry]
    E = _stack()
    E[2, 1, 1] = float("nan")
    with pytest.raises(ValueError) as ei:
        f(E)
    msg = str(ei.value)
    assert msg.startswith(fn_name(entry) + ":"), msg
    assert f"{arg}[2]" in msg, msg
    assert f"{arg}[0]" not in msg and f"{arg}[1]" not in msg and f"{arg}[3]" not in msg, msg


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_nonfinite_names_index_in_4d(entry):
    f, arg = ENTRY_POINTS[entry]
    E = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    E[1, 0, 5, 4] = float("inf")
    with pytest.raises(ValueError) as ei:
        f(E)
    assert f"{arg}[1, 0]" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("entry", LIST_OK, ids=lambda e: f"fn={e}")
def test_nonfinite_names_index_in_list(entry):
    f, arg = ENTRY_POINTS[entry]
    mats = [torch.randn(6, 5), torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 5).bfloat16(), torch.randn(4, 2)]
    mats[2][0, 0] = float("nan")
    with pytest.raises(ValueError) as ei:
        f(mats)
    msg = str(ei.value)
    assert msg.startswith(fn_name(entry) + ":"), msg
    assert "W[2]" in msg and "W[0]" not in msg and "W[1]" not in msg and "W[3]" not in msg, msg


def test_nonfinite_several_listed():
    E = torch.randn(9, 4, 4)
    for i in (1, 4, 5, 6, 7, 8):
        E[i, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"W\[1\], W\[4\].*and 1 more"):
        specfast.spectral_norm(E)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_nonfinite_hint_is_usable(entry):
    """The error message suggests nonfinite='nan'; that advice must work for the same function."""
    f, _ = ENTRY_POINTS[entry]
    W = torch.randn(6, 5)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError) as ei:
        f(W)
    if "nonfinite='nan'" in str(ei.value):
        out = f(W, nonfinite="nan")
        first = out[1] if isinstance(out, tuple) else out
        assert bool(torch.isnan(torch.as_tensor(first)).all())


def test_nonfinite_nan_mode_spectral_norm():
    E = torch.randn(4, 6, 5)
    E[2, 1, 1] = float("nan")
    E[3, 0, 0] = float("inf")
    sig, info = specfast.spectral_norm(E, nonfinite="nan", return_info=True)
    assert torch.isnan(sig[2]) and torch.isnan(sig[3])
    good = torch.linalg.matrix_norm(E[:2].double(), ord=2)
    assert torch.allclose(sig[:2].double(), good, rtol=1e-6, atol=0)
    assert torch.as_tensor(info.status).tolist() == [0, 0, 1, 1]
    assert torch.as_tensor(info.converged).tolist()[:2] == [True, True]
    assert not bool(torch.as_tensor(info.converged)[2])


@pytest.mark.parametrize("k", [2, None], ids=lambda k: f"k={k}")
def test_nonfinite_nan_mode_svdvals_list(k):
    mats = [torch.randn(6, 5), torch.randn(3, 7), torch.randn(5, 5)]
    mats[1][2, 2] = float("nan")
    vals, info = specfast.svdvals(mats, k, nonfinite="nan", return_info=True)
    assert torch.isnan(vals[1]).all()
    for i in (0, 2):
        t = torch.linalg.svdvals(mats[i].double())[: vals[i].shape[0]]
        assert torch.allclose(vals[i].double(), t, rtol=1e-5, atol=0), i
    assert torch.as_tensor(info.status).tolist() == [0, 1, 0]


def test_nonfinite_bad_mode():
    with pytest.raises(ValueError, match=r"spectral_norm.*nonfinite"):
        specfast.spectral_norm(torch.randn(3, 3), nonfinite="ignore")


# ------------------------------------------------------------------------------------ types
BAD_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: f"dtype={str(d).replace('torch.', '')}")
@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_bad_dtype_is_type_error(entry, dtype):
    f, arg = ENTRY_POINTS[entry]
    W = torch.ones(6, 5).to(dtype)
    with pytest.raises(TypeError) as ei:
        f(W)
    msg = str(ei.value)
    assert msg.startswith(fn_name(entry) + ":") and re.search(rf"\b{arg}\b", msg) and "dtype" in msg, msg


@pytest.mark.parametrize("entry", LIST_OK, ids=lambda e: f"fn={e}")
def test_bad_dtype_in_list_names_item(entry):
    f, _ = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match=r"W\[1\]"):
        f([torch.randn(3, 3), torch.ones(3, 3, dtype=torch.int64)])


@pytest.mark.parametrize("bad", [np.ones((3, 3), dtype=np.int64), np.ones((3, 3), dtype=np.complex64), "abc", 3.0,
                                 None, [[1.0, 2.0], [3.0, 4.0]]],
                         ids=["np-int", "np-complex", "str", "float", "None", "nested-list"])
def test_bad_types(bad):
    with pytest.raises(TypeError, match=r"^spectral_norm:.*W"):
        specfast.spectral_norm(bad)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("shape", [(), (7,), (0,)], ids=lambda s: "shape=" + ("x".join(map(str, s)) or "scalar"))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda e: f"fn={e}")
def test_fewer_than_two_dims(entry, shape):
    f, arg = ENTRY_POINTS[entry]
    with pytest.raises(ValueError) as ei:
        f(torch.ones(shape))
    msg = str(ei.value)
    assert msg.startswith(fn_name(entry) + ":") and re.search(rf"\b{arg}\b", msg) and "dimension" in msg, msg


@pytest.mark.parametrize("entry", LIST_OK, ids=lambda e: f"fn={e}")
def test_list_item_not_2d(entry):
    f, _ = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=r"W\[1\]"):
        f([torch.randn(3, 3), torch.randn(2, 3, 3)])


@pytest.mark.parametrize("entry", LIST_OK, ids=lambda e: f"fn={e}")
def test_empty_list(entry):
    """An empty list is a valid (empty) batch, like an empty stack."""
    f, _ = ENTRY_POINTS[entry]
    out = f([])
    out = out[0] if isinstance(out, tuple) else out
    assert len(out) == 0


@pytest.mark.parametrize("W,v", [
    (torch.randn(5, 4), torch.randn(5)),                 # v has m entries, not n
    (torch.randn(5, 4), torch.randn(3, 4, 2, 1)),        # too many dims
    (torch.randn(5, 4), torch.randn(3, 2)),              # block with wrong n
    (torch.randn(3, 5, 4), torch.randn(2, 4)),           # batch mismatch
    (torch.randn(3, 5, 4), torch.randn(4)),              # too few dims for a stack
], ids=["wrong-n", "too-many-dims", "block-wrong-n", "batch-mismatch", "too-few-dims"])
def test_gram_matvec_mismatched_v(W, v):
    with pytest.raises(ValueError, match=r"^gram_matvec:.*\bv\b"):
        specfast.gram_matvec(W, v)


def test_gram_matvec_list_mismatch():
    with pytest.raises(ValueError, match=r"^gram_matvec:.*\bv\b"):
        specfast.gram_matvec([torch.randn(5, 4)], [torch.randn(4), torch.randn(4)])
    with pytest.raises(ValueError, match=r"^gram_matvec:.*v\[1\]"):
        specfast.gram_matvec([torch.randn(5, 4), torch.randn(2, 3)], [torch.randn(4), torch.randn(2)])
    with pytest.raises(ValueError, match=r"^gram_matvec:.*\bv\b"):
        specfast.gram_matvec([torch.randn(5, 4)], torch.randn(4))
    with pytest.raises(TypeError, match=r"^gram_matvec:.*\bv\b"):
        specfast.gram_matvec(torch.randn(5, 4), torch.ones(4, dtype=torch.int32))


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("fn", ["svdvals", "svd_lowrank"])
@pytest.mark.parametrize("k", [6, 100, 0, -1], ids=lambda k: f"k={k}")
def test_bad_k(fn, k):
    W = torch.randn(8, 5)
    arg = "k" if fn == "svdvals" else "q"
    with pytest.raises(ValueError, match=rf"^{fn}:.*\b{arg}\b"):
        getattr(specfast, fn)(W, k)


@pytest.mark.parametrize("k", [2.5, "3", True], ids=lambda k: f"k={k!r}")
def test_non_integer_k(k):
    with pytest.raises((ValueError, TypeError), match=r"^svdvals:.*\bk\b"):
        specfast.svdvals(torch.randn(8, 5), k)


@pytest.mark.parametrize("tol", [-1e-6, float("nan"), float("inf"), "1e-6"], ids=lambda t: f"tol={t!r}")
@pytest.mark.parametrize("fn", ["spectral_norm", "svdvals", "stable_rank", "condition_number", "svd_lowrank"])
def test_bad_tol(fn, tol):
    W = torch.randn(8, 5)
    f = getattr(specfast, fn)
    kwargs = {"tol": tol}
    if fn == "condition_number":
        kwargs["method"] = "krylov"
    args = (W, 2) if fn in ("svdvals", "svd_lowrank") else (W,)
    with pytest.raises((ValueError, TypeError), match=rf"^{fn}:.*\btol\b"):
        f(*args, **kwargs)


@pytest.mark.parametrize("kw", [{"max_iter": 0}, {"max_iter": -3}, {"block_size": 0}, {"max_iter": 1.5}],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_bad_krylov_params(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"^svdvals:.*\b{name}\b"):
        specfast.svdvals(torch.randn(8, 5), 2, **kw)


@pytest.mark.parametrize("fn,kw", [
    ("spectral_entropy", {"method": "bogus"}), ("spectral_entropy", {"num_probes": 0}),
    ("spectral_entropy", {"lanczos_steps": -1}), ("effective_rank", {"method": "bogus"}),
    ("condition_number", {"method": "svd"}), ("svd_lowrank", {"method": "x"}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_bad_options(fn, kw):
    name = next(iter(kw))
    args = (torch.randn(8, 5), 2) if fn == "svd_lowrank" else (torch.randn(8, 5),)
    with pytest.raises(ValueError, match=rf"^{fn}:.*\b{name}\b"):
        getattr(specfast, fn)(*args, **kw)


def test_native_checks_raise_not_abort():
    """C++ re-checks surface as Python exceptions, never a crash."""
    from specfast import _C
    with pytest.raises((ValueError, RuntimeError)):
        _C.krylov_svd([0], 0, [3], [3], [3], 0, 1, 8, 10, 1e-6, True, False, 0, 0, 0, 0, 0, 0, [], [], 1)
    with pytest.raises((ValueError, RuntimeError)):
        _C.frobenius_scan([0, 0], 9, [1, 1], [1, 1], [1, 1], 0, 0, 1)
